"""The gsplat path of fit3d_hf.splatting on CPU: channel chunks for given GPU limits, backend
resolution and the validation order, gsplat's CUDA extension check (absent here, and with stand-in
toolkits), and the plumbing of `rasterize_gsplat` with stand-ins for gsplat's kernels."""

import importlib
import sys
import types
from types import SimpleNamespace

import pytest
import torch
from torch.utils import cpp_extension

from fit3d_hf.splatting import gsplat_backend, load_gsplat_extension, rasterize, resolve_backend
from fit3d_hf.splatting._torch_backend import rasterize_torch
from fit3d_hf.splatting.gsplat_backend import (
    KERNEL_WIDTHS,
    backward_shared_memory,
    channel_chunk,
    device_channel_chunk,
    gsplat_extension_problem,
    rasterize_gsplat,
)

# The module, not the function the package exports under the same name.
rasterize_module = importlib.import_module("fit3d_hf.splatting.rasterize")
CUDA = torch.device("cuda")
# Opt-in shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin) of common GPUs, and the chunk for each.
GPUS = {
    "no opt-in (48 KiB)": (49152, 33),
    "T4": (65536, 33),
    "V100": (98304, 65),
    "RTX 3090 / 4090": (101376, 65),
    "A100": (166912, 65),
    "H100 / H200": (232448, 65),
}


def test_backward_shared_memory_follows_gsplat_kernel_widths():
    # 256 pixels x (int32 id + vec3 + vec3 + C floats); C padded to the next power of two unless compiled.
    assert backward_shared_memory(64) == 256 * (28 + 4 * 64) == 72704  # > a T4's 64 KiB
    assert backward_shared_memory(65) == 256 * (28 + 4 * 65)
    assert backward_shared_memory(67) == backward_shared_memory(128) == 138240  # > V100, RTX 30/40
    assert backward_shared_memory(130) == backward_shared_memory(256) == 269312  # > any GPU (H200: 232448)
    assert backward_shared_memory(3, tile_size=8) == 64 * (28 + 12)


@pytest.mark.parametrize("gpu", GPUS)
def test_channel_chunk_fits_every_chunk_of_any_width(gpu):
    limit, expected = GPUS[gpu]
    chunk = channel_chunk(limit)
    assert chunk == expected and chunk in KERNEL_WIDTHS
    for d in range(1, 600):
        # gsplat slices D into chunks of `chunk` channels; each is padded to a kernel width and must fit.
        widths = [min(chunk, d - start) for start in range(0, d, chunk)]
        assert all(backward_shared_memory(w) <= limit for w in widths), (gpu, d, widths)
        assert sum(widths) == d


def test_channel_chunk_edges():
    assert channel_chunk(backward_shared_memory(65)) == 65
    assert channel_chunk(backward_shared_memory(65) - 1) == 64
    assert channel_chunk(backward_shared_memory(1)) == 1
    assert channel_chunk(10**9) == 65  # never wider than MAX_CHUNK
    with pytest.raises(ValueError, match="cannot run gsplat's backward pass"):
        channel_chunk(backward_shared_memory(1) - 1)


def test_device_channel_chunk_reads_the_device_limit(monkeypatch):
    device_channel_chunk.cache_clear()
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(shared_memory_per_block_optin=65536))
    assert device_channel_chunk(torch.device("cuda", 0)) == 33
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(shared_memory_per_block_optin=232448))
    assert device_channel_chunk(torch.device("cuda", 1)) == 65
    # A torch without the property: the 48 KiB every GPU grants.
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace())
    assert device_channel_chunk(torch.device("cuda", 2)) == 33
    device_channel_chunk.cache_clear()


def _problem(text):
    return lambda: text


def test_resolve_backend(monkeypatch):
    def must_not_be_asked():
        raise AssertionError("the extension was consulted")

    monkeypatch.setattr(rasterize_module, "gsplat_extension_problem", must_not_be_asked)
    assert resolve_backend("torch", CUDA, torch.float32) == "torch"
    assert resolve_backend("auto", torch.device("cpu"), torch.float32) == "torch"
    assert resolve_backend("auto", CUDA, torch.float64) == "torch"  # gsplat takes float32 only
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("cuda", CUDA, torch.float32)
    with pytest.raises(RuntimeError, match="needs CUDA tensors, but means is on cpu"):
        resolve_backend("gsplat", torch.device("cpu"), torch.float32)
    with pytest.raises(TypeError, match="float32"):
        resolve_backend("gsplat", CUDA, torch.float64)

    monkeypatch.setattr(rasterize_module, "gsplat_extension_problem", _problem(None))
    assert resolve_backend("auto", CUDA, torch.float32) == "gsplat"
    assert resolve_backend("gsplat", CUDA, torch.float32) == "gsplat"

    monkeypatch.setattr(rasterize_module, "gsplat_extension_problem", _problem("no nvcc. Fix: install it"))
    with pytest.warns(UserWarning, match="torch backend.*no nvcc. Fix: install it"):
        assert resolve_backend("auto", CUDA, torch.float32) == "torch"
    with pytest.raises(RuntimeError, match="no nvcc. Fix: install it"):
        resolve_backend("gsplat", CUDA, torch.float32)


def _scene(n=12, d=3, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    means = (torch.rand(n, 3, generator=g, dtype=dtype) - 0.5) * 1.5 + torch.tensor([0.0, 0.0, 3.0], dtype=dtype)
    quats = torch.randn(n, 4, generator=g, dtype=dtype)
    scales = torch.rand(n, 3, generator=g, dtype=dtype) * 0.1 + 0.05
    opacities = torch.rand(n, generator=g, dtype=dtype) * 0.8 + 0.1
    colors = torch.rand(n, d, generator=g, dtype=dtype)
    viewmats = torch.eye(4, dtype=dtype)[None].repeat(2, 1, 1)
    viewmats[1, 0, 3] = 0.2
    Ks = torch.tensor([[[30.0, 0, 14], [0, 30.0, 10], [0, 0, 1]]], dtype=dtype).repeat(2, 1, 1)
    return [means, quats, scales, opacities, colors, viewmats, Ks]


def test_backend_is_resolved_before_the_inputs_are_validated():
    scene = _scene(dtype=torch.float64)
    scene[0] = scene[0].clone()
    scene[0][0, 0] = float("nan")
    # gsplat is refused for these tensors (CPU) before their values are looked at.
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        rasterize(*scene, 28, 20, backend="gsplat")
    with pytest.raises(ValueError, match="means contains NaN"):
        rasterize(*scene, 28, 20, backend="auto")


def test_finite_check_names_every_bad_tensor_and_can_be_skipped():
    scene = _scene()
    scene[2] = scene[2].clone()
    scene[2][1] = float("inf")
    features = torch.full((12, 4), float("nan"))
    with pytest.raises(ValueError, match="scales, features contain NaN or Inf"):
        rasterize(*scene, 28, 20, features=features)
    scene = _scene()
    _, _, meta = rasterize(*scene, 28, 20, features=features, check_finite=False)
    covered = meta["features"].abs().sum(-1) != 0  # NaN != 0 is True: NaN features reach covered pixels only
    assert meta["features"].isnan().any() and covered.any()


# --- gsplat's CUDA extension, absent on this machine and with stand-in toolkits ------------------------------


@pytest.fixture
def fresh_extension_state(monkeypatch):
    """gsplat_backend as in a new process in which gsplat's extension module was never imported."""
    monkeypatch.setattr(gsplat_backend, "_load_error", None)
    monkeypatch.delitem(sys.modules, "gsplat.cuda._backend", raising=False)
    gsplat_backend._toolkit_problem.cache_clear()
    yield
    gsplat_backend._toolkit_problem.cache_clear()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_extension_check_without_a_gpu(fresh_extension_state):
    problem = gsplat_extension_problem()
    assert "torch.cuda.is_available() is False" in problem and "backend='torch'" in problem
    with pytest.raises(RuntimeError, match=r"torch.cuda.is_available\(\) is False"):
        load_gsplat_extension()
    assert "gsplat.cuda._backend" not in sys.modules, "the check must not try to build gsplat"


@pytest.fixture
def toolkit(tmp_path, monkeypatch, fresh_extension_state):
    """A GPU that torch (built with CUDA 12.1) sees, and a stand-in CUDA 12.4 toolkit at CUDA_HOME."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "include").mkdir()
    nvcc = tmp_path / "bin" / "nvcc"
    nvcc.write_text(
        '#!/bin/sh\necho "nvcc: NVIDIA (R) Cuda compiler driver"\necho "Cuda compilation tools, release 12.4, V12.4.131"\n'
    )
    nvcc.chmod(0o755)
    (tmp_path / "include" / "cuda_runtime.h").write_text("")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(tmp_path))
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: True)
    monkeypatch.setattr(torch.version, "cuda", "12.1")
    return tmp_path


def test_extension_check_accepts_a_matching_toolkit(toolkit):
    assert gsplat_extension_problem() is None  # another minor version only makes torch warn


def test_extension_check_names_what_is_missing(toolkit, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    problem = gsplat_extension_problem()
    assert "is CUDA 12.4 while torch was built with CUDA 13.0" in problem
    assert "torch.version.cuda = 13.0" in problem and "CUDA_HOME" in problem and "backend='torch'" in problem

    (toolkit / "include" / "cuda_runtime.h").unlink()
    monkeypatch.setattr(torch.version, "cuda", "12.1")
    assert "no include/cuda_runtime.h" in gsplat_extension_problem()

    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    assert "no CUDA compiler was found" in gsplat_extension_problem()

    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: False)
    gsplat_backend._toolkit_problem.cache_clear()  # cached per (CUDA_HOME, torch CUDA version)
    assert "pip install ninja" in gsplat_extension_problem()


def test_extension_imported_without_kernels_is_reported(toolkit, monkeypatch):
    monkeypatch.setitem(sys.modules, "gsplat.cuda._backend", types.SimpleNamespace(_C=None))
    assert "imported in this process without it" in gsplat_extension_problem()
    with pytest.raises(RuntimeError, match="without it"):
        load_gsplat_extension()
    monkeypatch.setitem(sys.modules, "gsplat.cuda._backend", types.SimpleNamespace(_C=object()))
    assert gsplat_extension_problem() is None
    load_gsplat_extension()  # already loaded: nothing to do


def test_failed_build_is_reported_once_with_the_fix(toolkit, monkeypatch):
    # None in sys.modules makes `from gsplat.cuda import _backend` fail, as a failing build does.
    monkeypatch.setitem(sys.modules, "gsplat.cuda._backend", None)
    with pytest.raises(RuntimeError, match="building or loading gsplat's CUDA extension failed.*Fix: install") as info:
        load_gsplat_extension()
    assert isinstance(info.value.__cause__, ImportError)
    # gsplat would not retry in this process: later checks give the same answer, without building.
    assert gsplat_extension_problem() == str(info.value)
    with pytest.warns(UserWarning, match="building or loading"):
        assert resolve_backend("auto", CUDA, torch.float32) == "torch"


# --- rasterize_gsplat with stand-ins for gsplat's kernels ----------------------------------------------------


def test_rasterize_gsplat_plumbing_with_stand_ins(monkeypatch):
    """gsplat.rasterization and gsplat.rasterize_to_pixels replaced by recorders that render with the torch
    backend: the colour pass gets the device's chunk, unpacked; the feature pass reuses its tile lists
    in chunks, on detached geometry, and gives the torch backend's features."""
    import gsplat

    scene = _scene(n=20, d=64, dtype=torch.float64, seed=3)
    means, quats, scales, opacities, colors = (t.clone().requires_grad_(True) for t in scene[:5])
    viewmats, Ks = scene[5:]
    features = torch.rand(20, 21, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    lists = {"isect_offsets": object(), "flatten_ids": object()}  # gsplat's tile lists, passed on untouched
    calls = []

    def rasterization(means_, quats_, scales_, opacities_, colors_, viewmats_, Ks_, width, height, **kwargs):
        calls.append(("rasterization", kwargs))
        renders, alphas, meta = rasterize_torch(
            means_, quats_, scales_, opacities_, colors_, viewmats_, Ks_, width, height,
            sh_degree=kwargs["sh_degree"], backgrounds=kwargs["backgrounds"], near_plane=kwargs["near_plane"],
            far_plane=kwargs["far_plane"], eps2d=kwargs["eps2d"], render_mode=kwargs["render_mode"], features=None,
        )  # fmt: skip
        n_cameras = viewmats_.shape[0]
        meta.update(lists, conics=torch.ones(n_cameras, 20, 3, dtype=means_.dtype, requires_grad=True))
        meta["opacities"] = opacities_[None].expand(n_cameras, -1)
        return renders, alphas, meta

    def rasterize_to_pixels(means2d, conics, colors_, pair_opacities, width, height, tile_size, isect_offsets,
                            flatten_ids, packed):  # fmt: skip
        calls.append(("rasterize_to_pixels", colors_.shape, packed, tile_size))
        assert isect_offsets is lists["isect_offsets"] and flatten_ids is lists["flatten_ids"]
        assert not (means2d.requires_grad or conics.requires_grad or pair_opacities.requires_grad)
        # The same weights as the colour pass: render this chunk with the torch backend on detached geometry.
        rendered, alphas, _ = rasterize_torch(
            means.detach(), quats.detach(), scales.detach(), opacities.detach(), colors_[0], viewmats, Ks, width, height,
            sh_degree=None, backgrounds=None, near_plane=0.01, far_plane=1e10, eps2d=0.3, render_mode="RGB", features=None,
        )  # fmt: skip
        return rendered, alphas

    monkeypatch.setattr(gsplat, "rasterization", rasterization)
    monkeypatch.setattr(gsplat, "rasterize_to_pixels", rasterize_to_pixels)
    monkeypatch.setattr(gsplat_backend, "load_gsplat_extension", lambda: None)
    monkeypatch.setattr(gsplat_backend, "device_channel_chunk", lambda device: 8)
    renders, _, meta = rasterize_gsplat(
        means, quats, scales, opacities, colors, viewmats, Ks, 28, 20, sh_degree=None, backgrounds=None,
        near_plane=0.01, far_plane=1e10, eps2d=0.3, render_mode="RGB+D", features=features,
    )  # fmt: skip
    assert calls[0][0] == "rasterization"
    assert calls[0][1]["channel_chunk"] == 8 and calls[0][1]["packed"] is False and calls[0][1]["tile_size"] == 16
    assert calls[1:] == [("rasterize_to_pixels", (2, 20, w), False, 16) for w in (8, 8, 5)]
    assert renders.shape == (2, 20, 28, 65) and meta["backend"] == "gsplat"

    _, _, expected = rasterize_torch(
        means, quats, scales, opacities, colors, viewmats, Ks, 28, 20, sh_degree=None, backgrounds=None,
        near_plane=0.01, far_plane=1e10, eps2d=0.3, render_mode="RGB", features=features,
    )  # fmt: skip
    assert meta["features"].shape == (2, 20, 28, 21)
    torch.testing.assert_close(meta["features"], expected["features"], rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(meta["features"].square().sum(), [means, features], allow_unused=True)
    assert grads[0] is None and grads[1].abs().sum() > 0
    (expected_grad,) = torch.autograd.grad(expected["features"].square().sum(), features)
    torch.testing.assert_close(grads[1], expected_grad, rtol=1e-10, atol=1e-12)
