"""`rasterize()`: one differentiable Gaussian rasterizer, gsplat on CUDA and pure PyTorch elsewhere."""

import math
import warnings

import torch
from torch import Tensor

from ._torch_backend import rasterize_torch
from .gsplat_backend import gsplat_extension_problem, rasterize_gsplat

RENDER_MODES = ("RGB", "RGB+D", "RGB+ED")
BACKENDS = ("auto", "torch", "gsplat")
MAX_SH_DEGREE = 4


def rasterize(
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
    sh_degree: int | None = None,
    backgrounds: Tensor | None = None,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    eps2d: float = 0.3,
    render_mode: str = "RGB",
    features: Tensor | None = None,
    features_downscale: int = 1,
    backend: str = "auto",
    check_finite: bool = True,
) -> tuple[Tensor, Tensor, dict]:
    """Rasterize N 3D Gaussians into C pinhole cameras, with gsplat 1.5.3's meaning for every argument.

    Both backends composite front to back per tile with gsplat's rules: EWA projection with
    the 2D covariance dilated by `eps2d`, an opacity-aware radius of min(3.33, sqrt(2 ln(255·o)))
    standard deviations, alpha clamped to 0.999, contributions with alpha < 1/255 skipped, and a
    pixel stopping before the Gaussian that would take its transmittance to 1e-4 or below.

    Args:
        means: `[N, 3]` centres in world coordinates.
        quats: `[N, 4]` rotations as wxyz quaternions (normalised inside).
        scales: `[N, 3]` standard deviations along the rotated axes (linear, not log).
        opacities: `[N]` opacities in [0, 1] (after the sigmoid).
        colors: `[N, D]` colours or features of any width D; or, with `sh_degree`, SH coefficients
            `[N, K, 3]` with K >= (sh_degree + 1)^2, evaluated per camera in the direction from the
            camera centre to the Gaussian, plus 0.5, clamped at 0 (as gsplat and 3DGS).
        viewmats: `[C, 4, 4]` world-to-camera transforms, OpenCV axes (x right, y down, z forward).
        Ks: `[C, 3, 3]` pinhole intrinsics in pixels.
        width, height: image size in pixels.
        sh_degree: SH degree in 0..4 to evaluate, or None when `colors` are plain channels.
        backgrounds: `[C, D]` colour behind the Gaussians (D = 3 with SH); black when None.
        near_plane, far_plane: Gaussians whose camera depth lies outside [near, far] are culled.
        eps2d: added to the diagonal of every 2D covariance (anti-aliasing dilation), in pixels^2.
        render_mode: "RGB" renders `colors`; "RGB+D" appends the accumulated depth sum_i w_i z_i;
            "RGB+ED" appends the expected depth (accumulated depth / alpha).
        features: `[N, F]` extra per-Gaussian features composited with the same blending weights
            (background 0) into `meta["features"]`. Their gradients reach `features` only, never
            means, quats, scales or opacities. The torch backend blends them in the same pass as
            the colours; gsplat in a second pass over the colour pass's tile lists, with detached
            geometry. Any width F (and D): gsplat renders them in chunks its backward kernel can
            run on the GPU (`gsplat_backend.channel_chunk`).
        features_downscale: `meta["features"]` averaged over blocks of this many pixels squared,
            `[C, H / s, W / s, F]` (width and height must be multiples): what a feature loss at
            lower resolution needs. The torch backend composites the averages directly, s² times
            less work than rendering every pixel and pooling.
        backend: "torch" (pure PyTorch, any device), "gsplat" (CUDA float32 tensors, gsplat's CUDA
            extension) or "auto": gsplat when it can take the inputs, torch otherwise
            (`resolve_backend`); `meta["backend"]` says which ran.
        check_finite: scan every input for NaN/Inf (one host-device synchronisation per call);
            shapes, dtypes and devices are always checked.

    Returns:
        renders: `[C, H, W, D]`, or `[C, H, W, D + 1]` with depth in the last channel.
        alphas: `[C, H, W, 1]` accumulated opacity (1 - final transmittance).
        meta: dict with what gsplat's `DefaultStrategy` reads, in gsplat's unpacked layout:
            `means2d` `[C, N, 2]` projected centres in pixels (call `retain_grad()` before backward,
            as DefaultStrategy.step_pre_backward does; then `.grad` holds image-plane gradients),
            `radii` `[C, N, 2]` int32 bounding-box half sizes (0 = not visible in that camera),
            `depths` `[C, N]`, `gaussian_ids` None (unpacked), `width`, `height`, `n_cameras`,
            `backend` ("torch" or "gsplat"), and `features` `[C, H / s, W / s, F]` when features
            are given (s = features_downscale).

    Raises:
        ValueError / TypeError naming the offending argument for wrong shapes, dtypes, devices,
        NaN/Inf values or unknown options; backend="gsplat" for inputs gsplat cannot take:
        RuntimeError for non-CUDA tensors or a missing CUDA extension (with the fix), TypeError
        for float64.

    Example:
        >>> renders, alphas, meta = rasterize(means, quats, scales, opacities, colors, viewmats, Ks, 160, 120)
        >>> renders.shape, alphas.shape
        (torch.Size([C, 120, 160, D]), torch.Size([C, 120, 160, 1]))
    """
    if not isinstance(means, torch.Tensor):
        raise TypeError(f"means must be a torch.Tensor, got {type(means).__name__}")
    # The backend that will run, chosen before anything else: gsplat's requirements (CUDA, float32, its
    # extension) are checked there, so "auto" never hands gsplat inputs it cannot take.
    backend = resolve_backend(backend, means.device, means.dtype)
    _validate(
        means, quats, scales, opacities, colors, viewmats, Ks, width, height, sh_degree, backgrounds,
        near_plane, far_plane, eps2d, render_mode, features, check_finite,
    )  # fmt: skip
    if isinstance(features_downscale, bool) or not isinstance(features_downscale, int) or features_downscale < 1:
        raise ValueError(f"features_downscale must be a positive int, got {features_downscale!r}")
    if width % features_downscale or height % features_downscale:
        raise ValueError(
            f"features_downscale={features_downscale} must divide width={width} and height={height} "
            "(pool a full-size feature render with adaptive pooling otherwise)"
        )
    kwargs = dict(
        sh_degree=sh_degree,
        backgrounds=backgrounds,
        near_plane=near_plane,
        far_plane=far_plane,
        eps2d=eps2d,
        render_mode=render_mode,
        features=features,
    )
    if backend == "gsplat":
        renders, alphas, meta = rasterize_gsplat(means, quats, scales, opacities, colors, viewmats, Ks, width, height, **kwargs)
        if features is not None and features_downscale > 1:
            pooled = torch.nn.functional.avg_pool2d(meta["features"].permute(0, 3, 1, 2), features_downscale)
            meta["features"] = pooled.permute(0, 2, 3, 1)
        return renders, alphas, meta
    return rasterize_torch(
        means, quats, scales, opacities, colors, viewmats, Ks, width, height, features_downscale=features_downscale, **kwargs
    )


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend `rasterize(..., backend=backend)` runs for inputs on `device` of `dtype`: "torch" or "gsplat".

    "auto" is gsplat only when gsplat can take the inputs: CUDA float32 tensors and gsplat's CUDA
    extension loaded or buildable (`gsplat_extension_problem`); otherwise torch, with a warning
    when CUDA inputs fall back because of the extension. "gsplat" is checked the same way.

    Raises:
        ValueError: an unknown backend.
        RuntimeError: backend="gsplat" on a device other than CUDA, or without gsplat's extension.
        TypeError: backend="gsplat" with a dtype other than float32.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch" or (backend == "auto" and (device.type != "cuda" or dtype != torch.float32)):
        return "torch"
    if backend == "auto":
        problem = gsplat_extension_problem()
        if problem is None:
            return "gsplat"
        warnings.warn(f"backend='auto' renders CUDA tensors with the torch backend (much slower): {problem}", stacklevel=3)
        return "torch"
    if device.type != "cuda":
        raise RuntimeError(
            f"backend='gsplat' needs CUDA tensors, but means is on {device}: gsplat has no CPU kernels. "
            "Use backend='torch' (or 'auto') on CPU."
        )
    if dtype != torch.float32:
        raise TypeError(f"backend='gsplat' needs float32 tensors, means has dtype {dtype}")
    problem = gsplat_extension_problem()
    if problem is not None:
        raise RuntimeError(problem)
    return "gsplat"


def _check_tensor(name: str, x, shape: tuple, dtype: torch.dtype, device: torch.device) -> None:
    """`shape` holds ints or None (any size); raises naming `name`."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype != dtype:
        raise TypeError(f"{name} has dtype {x.dtype}, expected {dtype} (the dtype of means)")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device}, but means is on {device}: put all inputs on one device")
    if x.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, x.shape)):
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{name} has shape {list(x.shape)}, expected {want}")


def _validate(
    means, quats, scales, opacities, colors, viewmats, Ks, width, height, sh_degree, backgrounds,
    near_plane, far_plane, eps2d, render_mode, features, check_finite,
) -> None:  # fmt: skip
    if means.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"means has dtype {means.dtype}, expected torch.float32 or torch.float64")
    if means.dim() != 2 or means.shape[1] != 3:
        raise ValueError(f"means has shape {list(means.shape)}, expected [N, 3]")
    n, dtype, device = means.shape[0], means.dtype, means.device
    tensors = {"means": means, "quats": quats, "scales": scales, "opacities": opacities, "colors": colors}
    _check_tensor("quats", quats, (n, 4), dtype, device)
    _check_tensor("scales", scales, (n, 3), dtype, device)
    _check_tensor("opacities", opacities, (n,), dtype, device)
    if sh_degree is None:
        _check_tensor("colors", colors, (n, None), dtype, device)
        n_colors = colors.shape[1]
    else:
        if not isinstance(sh_degree, int) or not 0 <= sh_degree <= MAX_SH_DEGREE:
            raise ValueError(f"sh_degree must be an int in 0..{MAX_SH_DEGREE} or None, got {sh_degree!r}")
        _check_tensor("colors", colors, (n, None, 3), dtype, device)
        if colors.shape[1] < (sh_degree + 1) ** 2:
            raise ValueError(
                f"colors has {colors.shape[1]} SH coefficients per Gaussian, sh_degree={sh_degree} "
                f"needs at least {(sh_degree + 1) ** 2}"
            )
        n_colors = 3
    if n_colors < 1:
        raise ValueError("colors has zero channels")
    if not isinstance(viewmats, torch.Tensor) or viewmats.dim() != 3:
        raise ValueError(f"viewmats must be a [C, 4, 4] tensor, got {getattr(viewmats, 'shape', type(viewmats))}")
    c = viewmats.shape[0]
    if c < 1:
        raise ValueError("viewmats holds no camera (C = 0)")
    _check_tensor("viewmats", viewmats, (c, 4, 4), dtype, device)
    _check_tensor("Ks", Ks, (c, 3, 3), dtype, device)
    tensors.update(viewmats=viewmats, Ks=Ks)
    if backgrounds is not None:
        _check_tensor("backgrounds", backgrounds, (c, n_colors), dtype, device)
        tensors["backgrounds"] = backgrounds
    if features is not None:
        _check_tensor("features", features, (n, None), dtype, device)
        if features.shape[1] < 1:
            raise ValueError("features has zero channels")
        tensors["features"] = features
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    for name, value in (("near_plane", near_plane), ("far_plane", far_plane), ("eps2d", eps2d)):
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if not 0 < near_plane < far_plane:
        raise ValueError(f"need 0 < near_plane < far_plane, got near_plane={near_plane}, far_plane={far_plane}")
    if render_mode not in RENDER_MODES:
        raise ValueError(f"render_mode must be one of {RENDER_MODES}, got {render_mode!r}")
    if check_finite:
        # One reduction per tensor, read back together: a single host-device synchronisation.
        finite = torch.stack([torch.isfinite(x).all() for x in tensors.values()]).tolist()
        bad = [name for name, ok in zip(tensors, finite) if not ok]
        if bad:
            raise ValueError(f"{', '.join(bad)} contain{'s' if len(bad) == 1 else ''} NaN or Inf values")
