"""The gsplat backend of `rasterize`: channel chunks that fit the GPU, the feature pass, and gsplat's CUDA extension.

Everything here follows gsplat 1.5.3 (pinned `>=1.5.3,<1.6`): the kernel widths it compiles, the
shared memory its backward kernel asks for, and how it builds its extension on first use.
"""

import functools
import importlib.util
import logging
import os
import re
import subprocess
import sys

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

# The channel counts gsplat 1.5.3 compiles rasterization kernels for; `rasterize_to_pixels` pads
# any other count with zeros up to the next power of two.
KERNEL_WIDTHS = (1, 2, 3, 4, 5, 8, 9, 16, 17, 32, 33, 64, 65, 128, 129, 256, 257, 512, 513)
# Chunks are at most this wide: the official D = 64 (and RGB + D) in one pass, and no chunk padded
# past 64 channels (a 67-wide chunk would run as 128: twice the work of 65 + 2).
MAX_CHUNK = 65
TILE_SIZE = 16  # gsplat.rasterization's default, which `rasterize` keeps
# What every CUDA GPU grants a block without opting in: the limit when the device does not say.
DEFAULT_SHARED_MEMORY = 48 * 1024

FIX = (
    "Fix: install the CUDA toolkit of the major version torch was built with (torch.version.cuda = {torch_cuda}) "
    "and point CUDA_HOME at it (the folder holding bin/nvcc and include/), then start a new process; gsplat "
    "compiles its kernels on first use (about 4-5 minutes, once per machine). Or install a gsplat wheel with "
    "prebuilt kernels, or render with backend='torch' (`--backend torch`), which runs anywhere, slower."
)

# Set when building or loading the extension failed in this process: gsplat would not retry.
_load_error: str | None = None


def backward_shared_memory(channels: int, tile_size: int = TILE_SIZE) -> int:
    """Bytes of shared memory gsplat 1.5.3's `rasterize_to_pixels` backward kernel asks for, for `channels` channels.

    Per pixel of a tile: a Gaussian id (int32), its 2D mean and opacity (vec3), its conic (vec3)
    and its colour (`channels` floats, after padding to a kernel width). The forward kernel needs no
    per-channel shared memory, so only training can fail on it.
    """
    width = channels if channels in KERNEL_WIDTHS else 1 << (channels - 1).bit_length()
    return tile_size * tile_size * (4 + 12 + 12 + 4 * width)


def channel_chunk(shared_memory_per_block: int, tile_size: int = TILE_SIZE) -> int:
    """The channels gsplat rasterizes per pass on a GPU granting a block `shared_memory_per_block` bytes (opt-in).

    The widest kernel width up to `MAX_CHUNK` whose backward kernel fits: any number of channels is
    then split into chunks of this width, and a last, narrower chunk is padded to at most this
    width (kernel widths are 2^k or 2^k + 1), so it fits too. Examples (16×16 tiles): 48 KiB → 33;
    T4 (64 KiB) → 33; V100 (96 KiB), RTX 30/40 (99 KiB), A100 (163 KiB), H100/H200 (227 KiB) → 65.

    Raises:
        ValueError: not even one channel fits.
    """
    fitting = [w for w in KERNEL_WIDTHS if w <= MAX_CHUNK and backward_shared_memory(w, tile_size) <= shared_memory_per_block]
    if not fitting:
        raise ValueError(
            f"a GPU block with {shared_memory_per_block} bytes of shared memory cannot run gsplat's backward pass "
            f"for even one channel with {tile_size}x{tile_size} tiles (needs {backward_shared_memory(1, tile_size)})"
        )
    return fitting[-1]


@functools.cache
def device_channel_chunk(device: torch.device) -> int:
    """`channel_chunk` for the CUDA `device`, from its opt-in shared memory per block."""
    properties = torch.cuda.get_device_properties(device)
    return channel_chunk(getattr(properties, "shared_memory_per_block_optin", DEFAULT_SHARED_MEMORY))


def gsplat_extension_problem() -> str | None:
    """Why gsplat's CUDA kernels cannot run in this process (with the fix), or None when they are loaded or can be.

    Never compiles anything. "Can be" means a gsplat wheel with prebuilt kernels, or what gsplat's
    first-use build needs (torch's JIT extension builder): a visible CUDA device, ninja, and a CUDA
    toolkit at torch's `CUDA_HOME` (bin/nvcc, include/cuda_runtime.h) of the major version torch
    was built with (torch refuses another major version; another minor only warns).
    """
    if _load_error is not None:
        return _load_error
    loaded = sys.modules.get("gsplat.cuda._backend")
    if loaded is not None:
        if loaded._C is not None:
            return None
        return (
            "gsplat's CUDA extension is missing: gsplat.cuda._backend was imported in this process without it "
            "(gsplat found no CUDA toolkit then, and does not look again). " + FIX.format(torch_cuda=torch.version.cuda)
        )
    if not torch.cuda.is_available():
        return (
            "gsplat needs a CUDA GPU, and torch sees none (torch.cuda.is_available() is False). "
            "Use backend='torch' (`--backend torch`), or run on a machine with an NVIDIA GPU and a CUDA build of torch."
        )
    if importlib.util.find_spec("gsplat.csrc") is not None:
        return None  # a wheel with prebuilt kernels
    from torch.utils import cpp_extension

    return _toolkit_problem(cpp_extension.CUDA_HOME, torch.version.cuda)


@functools.cache
def _toolkit_problem(cuda_home: str | None, torch_cuda: str | None) -> str | None:
    """What keeps torch's JIT builder from compiling gsplat with the toolkit at `cuda_home`, or None."""
    from torch.utils import cpp_extension

    fix = FIX.format(torch_cuda=torch_cuda)
    if not cpp_extension.is_ninja_available():
        return "gsplat compiles its CUDA kernels on first use with torch's JIT builder, which needs ninja: pip install ninja."
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else None
    if nvcc is None or not os.path.isfile(nvcc):
        return (
            f"gsplat's CUDA extension is not built, and no CUDA compiler was found to build it (torch's CUDA_HOME is "
            f"{cuda_home!r}: it takes $CUDA_HOME, else the folder above the nvcc on PATH, else /usr/local/cuda). " + fix
        )
    if not os.path.isfile(os.path.join(cuda_home, "include", "cuda_runtime.h")):
        return (
            f"gsplat's CUDA extension is not built, and CUDA_HOME={cuda_home!r} has bin/nvcc but no "
            "include/cuda_runtime.h (is that nvcc a wrapper or link to the real toolkit?). " + fix
        )
    try:
        output = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as error:
        return f"gsplat's CUDA extension is not built, and {nvcc} --version failed ({error}). " + fix
    release = re.search(r"release (\d+)\.(\d+)", output)
    if release is None:
        return f"gsplat's CUDA extension is not built, and {nvcc} --version names no CUDA release. " + fix
    if torch_cuda is not None and release.group(1) != torch_cuda.split(".")[0]:
        return (
            f"gsplat's CUDA extension is not built, and {nvcc} is CUDA {release.group(1)}.{release.group(2)} while "
            f"torch was built with CUDA {torch_cuda}: torch builds no extension with another major version. " + fix
        )
    return None


def load_gsplat_extension() -> None:
    """Load gsplat's CUDA kernels, compiling them on first use; RuntimeError with the fix when they cannot run.

    The first build takes about 4-5 minutes and goes to one folder per machine (torch's extension
    cache, `$TORCH_EXTENSIONS_DIR` or ~/.cache/torch_extensions) that gsplat deletes first whenever
    it finds no finished build there: processes building at the same time delete each other's
    work. Under `accelerate launch`, call this inside `accelerator.main_process_first()` (as
    `fit3d lift` does) before the other processes touch gsplat.
    """
    global _load_error
    problem = gsplat_extension_problem()
    if problem is not None:
        raise RuntimeError(problem)
    if sys.modules.get("gsplat.cuda._backend") is not None:
        return  # loaded, with its kernels (else there would be a problem)
    if importlib.util.find_spec("gsplat.csrc") is None:
        logger.info("gsplat: loading its CUDA kernels (compiled on first use: about 4-5 minutes, once per machine)")
    try:
        from gsplat.cuda import _backend
    except Exception as error:  # the build raises whatever nvcc, ninja or the linker hit
        _load_error = f"building or loading gsplat's CUDA extension failed ({type(error).__name__}: {error}). " + FIX.format(
            torch_cuda=torch.version.cuda
        )
        raise RuntimeError(_load_error) from error
    if _backend._C is None:
        raise RuntimeError(gsplat_extension_problem())


def rasterize_gsplat(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    colors: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    *,
    sh_degree: int | None,
    backgrounds: Tensor | None,
    near_plane: float,
    far_plane: float,
    eps2d: float,
    render_mode: str,
    features: Tensor | None,
) -> tuple[Tensor, Tensor, dict]:
    """`rasterize` on gsplat's kernels (inputs validated there: CUDA float32), unpacked, in chunks that fit the GPU.

    The feature pass `[N, F]` → `meta["features"]` `[C, H, W, F]` reuses the colour pass's
    projection, tile intersections and depth order (`gsplat.rasterize_to_pixels` on its `meta`),
    with detached 2D means, conics and opacities: the feature loss must not move the Gaussians.
    """
    import gsplat

    load_gsplat_extension()
    chunk = device_channel_chunk(means.device)
    renders, alphas, meta = gsplat.rasterization(
        means, quats, scales, opacities, colors, viewmats, Ks, width, height,
        near_plane=near_plane, far_plane=far_plane, eps2d=eps2d, sh_degree=sh_degree, backgrounds=backgrounds,
        render_mode=render_mode, packed=False, tile_size=TILE_SIZE, channel_chunk=chunk,
    )  # fmt: skip
    if features is not None:
        n_cameras, n = meta["means2d"].shape[:2]
        means2d, conics, pair_opacities = meta["means2d"].detach(), meta["conics"].detach(), meta["opacities"].detach()
        parts = [
            gsplat.rasterize_to_pixels(
                means2d, conics, part.expand(n_cameras, n, -1), pair_opacities, width, height, TILE_SIZE,
                meta["isect_offsets"], meta["flatten_ids"], packed=False,
            )[0]
            for part in features.split(chunk, dim=-1)
        ]  # fmt: skip
        meta["features"] = torch.cat(parts, dim=-1)
    meta["backend"] = "gsplat"
    return renders, alphas, meta
