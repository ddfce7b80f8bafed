"""Stage I of FiT3D: lift a frozen backbone's features into feature Gaussians, one scene at a time.

Each Gaussian carries SH colour, an opacity, a scale, a rotation and a D-dim feature; a per-scene
`Conv2d(D, Cb, 3, padding=1, bias=False)` decodes rendered features to the backbone's width Cb.
Loss = 0.8·L1(rgb) + 0.2·(1 − SSIM(rgb)) + 1.0·L1(decoded features, backbone patch features
bilinearly upsampled to the render size); masked pixels count in neither term. The feature term
reaches only the features and the decoder (`rasterize(..., features=...)` composites them with
detached blending weights), so geometry and the densification statistics come from RGB alone.
Densification is gsplat's `DefaultStrategy` (see `_densify.py` for the 1.5.3 opacity-reset fix).

All lifting state (parameters, Adam moments, strategy state, RNG) lives in plain dicts of
tensors; it is checkpointed to `<output_dir>/.checkpoints/<scene_id>/` so a killed run resumes
and ends with the same artifact as an uninterrupted one (CPU, fixed seed).

Example:

    >>> from fit3d_hf.backbones import build_backbone, tiny_config
    >>> from fit3d_hf.scenes.synthetic import make_room
    >>> gaussians = lift_scene(make_room(0), build_backbone(tiny_config("dinov2")),
    ...                        LiftConfig.cpu_preset(), output_dir="lifted")
    >>> rgb, features, alphas = gaussians.render(K, w2c, width=160, height=120)
    >>> decoded = gaussians.decode(features)  # [V, Cb, 120, 160]
"""

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from gsplat.strategy import DefaultStrategy
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..backbones import extract_features, input_size, normalize, patch_size_of
from ..io import atomic_write, atomic_write_json
from ._densify import refine_step
from ._gaussian_init import camera_extent, initial_parameters, random_points_in_camera_bounds
from ._ssim import ssim_map
from .rasterize import rasterize

logger = logging.getLogger(__name__)

# Schedule fields of `LiftConfig` are given for a run of this many iterations (the official one).
REFERENCE_ITERATIONS = 30_000
FORMAT = "fit3d_hf.feature_gaussians.v1"
# Gaussian parameters in the order they are stored; `shN` is absent for SH degree 0.
PARAM_NAMES = ("means", "quats", "scales", "opacities", "sh0", "shN", "features")


@dataclass
class LiftConfig:
    """Hyper-parameters of Stage I. Defaults are the official FiT3D / 3DGS values (docs/protocol.md).

    Schedule fields (`sh_degree_every`, `refine_*`, `reset_opacity_every`) count iterations of a
    30k-iteration run and are scaled by `iterations / 30000`, so that any run length keeps the
    official proportions (e.g. 600 iterations: densify from 10 to 300 every 2, reset every 60).
    """

    iterations: int = field(default=30_000, metadata={"help": "Optimisation steps per scene (one view per step)."})
    feature_dim: int = field(default=64, metadata={"help": "Width D of the lifted per-Gaussian feature."})
    sh_degree: int = field(default=3, metadata={"help": "Maximum SH degree of the colour (0-3)."})
    sh_degree_every: int = field(default=1_000, metadata={"help": "One more SH degree every this many (reference) steps."})
    rgb_l1_weight: float = field(default=0.8, metadata={"help": "Weight of the RGB L1 term."})
    ssim_weight: float = field(default=0.2, metadata={"help": "Weight of the RGB (1 - SSIM) term."})
    feature_weight: float = field(default=1.0, metadata={"help": "Weight of the feature L1 term."})
    lr_means: float = field(default=1.6e-4, metadata={"help": "Initial lr of the means, times the camera extent."})
    lr_means_final: float = field(
        default=1.6e-6, metadata={"help": "Final lr of the means (exponential decay), times the extent."}
    )
    lr_sh0: float = field(default=2.5e-3, metadata={"help": "lr of the SH DC coefficients."})
    lr_shN: float = field(default=1.25e-4, metadata={"help": "lr of the higher SH coefficients."})
    lr_opacities: float = field(default=0.05, metadata={"help": "lr of the opacity logits."})
    lr_scales: float = field(default=5e-3, metadata={"help": "lr of the log-scales."})
    lr_quats: float = field(default=1e-3, metadata={"help": "lr of the rotations."})
    lr_features: float = field(default=6.25e-5, metadata={"help": "lr of the per-Gaussian features."})
    lr_decoder: float = field(default=6.25e-5, metadata={"help": "lr of the feature decoder."})
    refine_start: int = field(default=500, metadata={"help": "Densify after this many (reference) steps."})
    refine_stop: int = field(default=15_000, metadata={"help": "Stop densifying after this many (reference) steps."})
    refine_every: int = field(default=100, metadata={"help": "Densify every this many (reference) steps."})
    reset_opacity_every: int = field(
        default=3_000, metadata={"help": "Reset opacities every this many (reference) steps (0: never)."}
    )
    grow_grad2d: float = field(default=2e-4, metadata={"help": "Clone/split Gaussians whose mean screen gradient exceeds this."})
    prune_opacity: float = field(default=0.005, metadata={"help": "Prune Gaussians less opaque than this."})
    max_gaussians: int = field(default=0, metadata={"help": "Cap on the number of Gaussians (0: no cap)."})
    init_points: int = field(
        default=100_000, metadata={"help": "Initial Gaussians: random ones, or at most this many scene points."}
    )
    init_opacity: float = field(default=0.1, metadata={"help": "Initial opacity."})
    holdout_every: int = field(
        default=8,
        metadata={"help": "For scenes without test views: hold out the views whose index is a multiple of this (0: none)."},
    )
    render_downscale: int = field(default=1, metadata={"help": "Train and evaluate at the scene size divided by this."})
    feature_downscale: int = field(
        default=1, metadata={"help": "Decode and compare features at the render size divided by this."}
    )
    checkpoint_every: int = field(default=1_000, metadata={"help": "Write a resumable checkpoint every this many steps."})
    keep_checkpoints: bool = field(default=False, metadata={"help": "Keep the checkpoints of a finished scene."})
    backend: str = field(default="auto", metadata={"help": "Rasterizer: auto (gsplat on CUDA, torch elsewhere), torch, gsplat."})

    def __post_init__(self) -> None:
        if not 0 <= self.sh_degree <= 3:
            raise ValueError(f"sh_degree must be in 0..3, got {self.sh_degree}")
        for name in ("iterations", "feature_dim", "render_downscale", "feature_downscale", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @classmethod
    def cpu_preset(cls, **overrides) -> "LiftConfig":
        """Settings that lift a 160×120 synthetic room in about a minute on 2 CPU cores.

        The official losses and learning rates over 400 steps (schedules scaled), except:
        features and decoder learn at 2.5e-3 (the official 6.25e-5 moves zero-initialised features
        by only ~lr per step: far too little in 400 steps); no opacity reset (scaled, one every 40
        steps: 12.1 dB held-out PSNR instead of 26.0); densification every 20 steps instead of the
        scaled every step (25.4 dB); at most 20k Gaussians; features decoded at half the render
        size (22% faster with a 160-wide backbone, feature cosine within 0.003 at full size).
        Measurements and commands: docs/lifting.md.
        """
        values = dict(CPU_PRESET)
        values.update(overrides)
        return cls(**values)

    def scaled(self, reference_steps: int) -> int:
        """A schedule length given for the 30k-step reference run, scaled to `iterations` (>= 1)."""
        return max(1, round(reference_steps * self.iterations / REFERENCE_ITERATIONS))


# Also written out as recipes/configs/lift_cpu.yaml (a test checks they agree).
CPU_PRESET = dict(
    iterations=400,
    init_points=15_000,
    max_gaussians=20_000,
    refine_every=1_500,
    reset_opacity_every=0,
    lr_features=2.5e-3,
    lr_decoder=2.5e-3,
    feature_downscale=2,
    checkpoint_every=100,
)


class FeatureGaussians:
    """The lifted Gaussians of one scene and their feature decoder.

    Tensors (stored under these names in the `.safetensors` file):
        means `[N, 3]`, quats `[N, 4]` (wxyz, unnormalised), scales `[N, 3]` (log),
        opacities `[N]` (logit), sh0 `[N, 1, 3]`, shN `[N, K-1, 3]` (K = (sh_degree+1)^2; absent
        for degree 0), features `[N, D]`, decoder.weight `[Cb, D, 3, 3]`.
    `metadata` is a dict of strings (scene id, backbone, D, Cb, SH degree, format).
    """

    def __init__(self, params: Mapping[str, torch.Tensor], decoder_weight: torch.Tensor, metadata: Mapping[str, str]):
        self.params = {name: params[name].detach() for name in PARAM_NAMES if name in params}
        self.decoder_weight = decoder_weight.detach()
        self.metadata = dict(metadata)

    @property
    def feature_dim(self) -> int:
        """D, the width of the lifted features."""
        return self.params["features"].shape[1]

    @property
    def out_dim(self) -> int:
        """Cb, the width of the decoded features (the backbone's width)."""
        return self.decoder_weight.shape[0]

    @property
    def num_gaussians(self) -> int:
        return self.params["means"].shape[0]

    @property
    def sh_degree(self) -> int:
        num_coefficients = 1 + (self.params["shN"].shape[1] if "shN" in self.params else 0)
        return math.isqrt(num_coefficients) - 1

    def to(self, device: torch.device | str) -> "FeatureGaussians":
        """A copy on `device`."""
        params = {name: value.to(device) for name, value in self.params.items()}
        return FeatureGaussians(params, self.decoder_weight.to(device), self.metadata)

    def render(
        self,
        intrinsics: torch.Tensor,
        world_to_camera: torch.Tensor,
        width: int,
        height: int,
        backend: str = "auto",
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Render colour, lifted features and opacity on a black background.

        Args:
            intrinsics: `[V, 3, 3]` pinhole K for `width` × `height` images.
            world_to_camera: `[V, 4, 4]` OpenCV-convention viewmats.

        Returns:
            rgb `[V, 3, H, W]` in [0, 1], features `[V, D, H, W]` (decode with `decode`),
            alphas `[V, 1, H, W]`.
        """
        device = self.params["means"].device
        renders, alphas, meta = _rasterize(
            self.params, intrinsics.to(device), world_to_camera.to(device), width, height, self.sh_degree, backend
        )
        rgb = renders.clamp(0, 1).permute(0, 3, 1, 2)
        return rgb, meta["features"].permute(0, 3, 1, 2), alphas.permute(0, 3, 1, 2)

    def decode(self, features: torch.Tensor) -> torch.Tensor:
        """`[V, D, H, W]` rendered features → `[V, Cb, H, W]` in the backbone's feature space."""
        return F.conv2d(features, self.decoder_weight.to(features), padding=1)

    def save(self, path: str | os.PathLike) -> None:
        """Write the safetensors file atomically (a temp name, then `os.replace`)."""
        tensors = {name: value.contiguous().cpu() for name, value in self.params.items()}
        tensors["decoder.weight"] = self.decoder_weight.contiguous().cpu()
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=self.metadata))

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str = "cpu") -> "FeatureGaussians":
        """Read a file written by `save` / `lift_scene`."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{path}: not a feature-Gaussians file (format {metadata.get('format')!r}, expected {FORMAT!r})")
        tensors = load_file(str(path), device=str(device))
        return cls(tensors, tensors.pop("decoder.weight"), metadata)


def _rasterize(
    params: Mapping[str, torch.Tensor],
    intrinsics: torch.Tensor,
    world_to_camera: torch.Tensor,
    width: int,
    height: int,
    sh_degree: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Activate the parameters and rasterize colour (SH up to `sh_degree`) and features."""
    coefficients = params["sh0"] if "shN" not in params else torch.cat([params["sh0"], params["shN"]], dim=1)
    return rasterize(
        params["means"],
        params["quats"],
        params["scales"].exp(),
        params["opacities"].sigmoid(),
        coefficients,
        world_to_camera,
        intrinsics,
        width,
        height,
        sh_degree=sh_degree,
        features=params["features"],
        backend=backend,
    )


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of `[V, C, H, W]` values over the pixels where `mask [V, 1, H, W]` is 1."""
    if mask is None:
        return values.mean()
    return (values * mask).sum() / (mask.sum() * values.shape[1]).clamp_min(1)


@dataclass
class _Views:
    """Everything lifting reads from the scene, loaded once: images, masks, cameras, targets."""

    indices: list[int]  # scene view index of each row
    images: torch.Tensor  # [V, 3, H, W] float16, render size, CPU
    masks: torch.Tensor | None  # [V, 1, H, W] float32 (1 = use), render size, CPU
    intrinsics: torch.Tensor  # [V, 3, 3] for the render size
    world_to_camera: torch.Tensor  # [V, 4, 4]
    targets: torch.Tensor  # [V, Cb, h, w] float16 backbone patch features, CPU


def _render_size(scene, downscale: int) -> tuple[int, int]:
    return max(1, round(scene.height / downscale)), max(1, round(scene.width / downscale))


@torch.no_grad()
def _load_views(scene, indices: list[int], backbone: torch.nn.Module, render_downscale: int, batch_size: int = 8) -> _Views:
    """Load images and masks at render size and compute the backbone targets once per view.

    The backbone sees each image resized to the nearest multiple of its patch size (the official
    code recomputes these features at every iteration; they never change).
    """
    height, width = _render_size(scene, render_downscale)
    patch = patch_size_of(backbone.config)
    size = input_size(scene.height, scene.width, patch, rule="nearest")
    device = next(backbone.parameters()).device
    images, masks, targets = [], [], []
    has_masks = any(scene.mask(i) is not None for i in indices)
    for start in range(0, len(indices), batch_size):
        chunk = indices[start : start + batch_size]
        full = scene.images(chunk)
        if not torch.isfinite(full).all():
            bad = [scene.view_names[i] for i, image in zip(chunk, full) if not torch.isfinite(image).all()]
            raise ValueError(f"scene {scene.scene_id!r}: images of views {bad} contain NaN/inf")
        pixel_values = normalize(
            F.interpolate(full, size=size, mode="bilinear", antialias=True, align_corners=False), backbone.config
        )
        features = extract_features(backbone, pixel_values.to(device)).feature_maps
        targets.append(features.to("cpu", torch.float16))
        if (height, width) != (scene.height, scene.width):
            full = F.interpolate(full, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
        images.append(full.to(torch.float16))
        if has_masks:
            chunk_masks = torch.stack(
                [torch.ones(scene.height, scene.width) if scene.mask(i) is None else scene.mask(i) for i in chunk]
            )
            masks.append(F.interpolate(chunk_masks[:, None], size=(height, width), mode="nearest"))
    intrinsics = scene.intrinsics[indices].clone()
    intrinsics[:, 0] *= width / scene.width
    intrinsics[:, 1] *= height / scene.height
    return _Views(
        indices=list(indices),
        images=torch.cat(images),
        masks=torch.cat(masks) if has_masks else None,
        intrinsics=intrinsics,
        world_to_camera=scene.world_to_camera[indices].clone(),
        targets=torch.cat(targets),
    )


def _usable_views(scene, holdout_every: int) -> tuple[list[int], list[int]]:
    """Train and held-out views, minus views whose mask excludes every pixel.

    A scene without test views gets every `holdout_every`-th view held out (if that leaves some to train on).
    """
    train, test = list(scene.train_views), list(scene.test_views)
    if not test and holdout_every > 0 and len(train) > 1:
        test = [i for i in train if i % holdout_every == 0]
        train = [i for i in train if i % holdout_every != 0]
    unusable = {i for i in train + test if (m := scene.mask(i)) is not None and not (m > 0).any()}
    if unusable:
        logger.warning("scene %r: skipping views with an all-zero mask: %s", scene.scene_id, sorted(unusable))
    train = [i for i in train if i not in unusable]
    test = [i for i in test if i not in unusable]
    if not train:
        raise ValueError(
            f"scene {scene.scene_id!r} has no usable training views ({len(scene.train_views)} train views, "
            f"{len(unusable)} fully masked): nothing to lift"
        )
    return train, test


def _initial_points(scene, config: LiftConfig, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scene points (a random subset of at most `init_points`) or random points in the camera bounds."""
    if scene.points is not None and len(scene.points) > 0:
        keep = torch.randperm(len(scene.points), generator=generator)[: config.init_points].sort().values
        colors = None if scene.point_colors is None else scene.point_colors[keep]
        return scene.points[keep], colors
    points = random_points_in_camera_bounds(
        config.init_points, scene.camera_centers, scene.intrinsics, scene.world_to_camera, scene.width, scene.height, generator
    )
    return points, None


def _make_optimizers(
    params: dict[str, torch.nn.Parameter], decoder_weight: torch.nn.Parameter, config: LiftConfig, extent: float
) -> tuple[dict[str, torch.optim.Adam], torch.optim.Adam]:
    """One Adam per parameter (gsplat's strategies require it), eps 1e-15 as the official code."""
    lrs = {
        "means": config.lr_means * extent,
        "quats": config.lr_quats,
        "scales": config.lr_scales,
        "opacities": config.lr_opacities,
        "sh0": config.lr_sh0,
        "shN": config.lr_shN,
        "features": config.lr_features,
    }
    optimizers = {name: torch.optim.Adam([param], lr=lrs[name], eps=1e-15) for name, param in params.items()}
    return optimizers, torch.optim.Adam([decoder_weight], lr=config.lr_decoder, eps=1e-15)


def _means_lr(step: int, config: LiftConfig, extent: float) -> float:
    """Exponential decay from `lr_means` to `lr_means_final` over the run (times the extent)."""
    t = min(step / config.iterations, 1.0)
    return extent * math.exp((1 - t) * math.log(config.lr_means) + t * math.log(config.lr_means_final))


def _view_order(step: int, num_views: int, seed: int) -> int:
    """The training view (a row) at `step`: a fresh random permutation per epoch, a pure function of the step."""
    epoch, position = divmod(step, num_views)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return int(torch.randperm(num_views, generator=generator)[position])


def _make_strategy(config: LiftConfig) -> DefaultStrategy:
    return DefaultStrategy(
        prune_opa=config.prune_opacity,
        grow_grad2d=config.grow_grad2d,
        refine_start_iter=config.scaled(config.refine_start),
        refine_stop_iter=config.scaled(config.refine_stop),
        refine_every=config.scaled(config.refine_every),
        # 0 = never: past the end of the run (this also disables gsplat's size pruning, which starts after a reset).
        reset_every=config.scaled(config.reset_opacity_every) if config.reset_opacity_every else config.iterations + 1,
    )


def _losses(
    params: Mapping[str, torch.Tensor],
    decoder_weight: torch.Tensor,
    views: _Views,
    row: int,
    sh_degree: int,
    config: LiftConfig,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict]:
    """Loss of one training view; returns (loss, its terms, the rasterizer's meta)."""
    device = params["means"].device
    image = views.images[row : row + 1].to(device, torch.float32)
    height, width = image.shape[-2:]
    mask = None if views.masks is None else views.masks[row : row + 1].to(device)
    renders, _, meta = _rasterize(
        params,
        views.intrinsics[row : row + 1].to(device),
        views.world_to_camera[row : row + 1].to(device),
        width,
        height,
        sh_degree,
        config.backend,
    )
    rgb = renders.permute(0, 3, 1, 2)
    l1 = _masked_mean((rgb - image).abs(), mask)
    ssim = _masked_mean(ssim_map(rgb, image), mask)
    features = meta["features"].permute(0, 3, 1, 2)
    mask_small = mask
    if config.feature_downscale > 1:
        size = (max(1, height // config.feature_downscale), max(1, width // config.feature_downscale))
        features = F.adaptive_avg_pool2d(features, size)
        mask_small = None if mask is None else F.interpolate(mask, size=size, mode="nearest")
    decoded = F.conv2d(features, decoder_weight, padding=1)
    target = F.interpolate(
        views.targets[row : row + 1].to(device, torch.float32), size=decoded.shape[-2:], mode="bilinear", align_corners=False
    )
    feature_l1 = _masked_mean((decoded - target).abs(), mask_small)
    loss = config.rgb_l1_weight * l1 + config.ssim_weight * (1 - ssim) + config.feature_weight * feature_l1
    return loss, {"l1": l1, "ssim": ssim, "feature_l1": feature_l1}, meta


@torch.no_grad()
def _evaluate(gaussians: FeatureGaussians, views: _Views, config: LiftConfig) -> dict[str, float]:
    """Held-out RGB PSNR (masked) and feature L1 / cosine similarity against the backbone's features.

    Everything at the render size, as later stages use the Gaussians: features decoded at full
    render size (whatever `feature_downscale` training used), against the backbone's patch
    features bilinearly upsampled to it.
    """
    device = gaussians.params["means"].device
    squared_error = pixels = feature_l1 = cosine = feature_pixels = 0.0
    for row in range(len(views.indices)):
        image = views.images[row : row + 1].to(device, torch.float32)
        height, width = image.shape[-2:]
        rgb, features, _ = gaussians.render(
            views.intrinsics[row : row + 1], views.world_to_camera[row : row + 1], width, height, backend=config.backend
        )
        mask = torch.ones_like(image[:, :1]) if views.masks is None else views.masks[row : row + 1].to(device)
        squared_error += ((rgb - image) ** 2 * mask).sum().item()
        pixels += mask.sum().item() * 3
        decoded = gaussians.decode(features)
        target = F.interpolate(
            views.targets[row : row + 1].to(device, torch.float32), size=decoded.shape[-2:], mode="bilinear", align_corners=False
        )
        feature_l1 += ((decoded - target).abs().mean(1, keepdim=True) * mask).sum().item()
        cosine += (F.cosine_similarity(decoded, target, dim=1)[:, None] * mask).sum().item()
        feature_pixels += mask.sum().item()
    mse = squared_error / max(pixels, 1)
    return {
        "psnr": 10 * math.log10(1 / max(mse, 1e-12)),
        "feature_l1": feature_l1 / max(feature_pixels, 1),
        "feature_cosine": cosine / max(feature_pixels, 1),
    }


def _checkpoint_dir(output_dir: Path, scene_id: str) -> Path:
    return output_dir / ".checkpoints" / scene_id


def _latest_checkpoint(directory: Path) -> Path | None:
    checkpoints = sorted(directory.glob("step_*.pt"))
    return checkpoints[-1] if checkpoints else None


def _save_checkpoint(
    directory: Path,
    step: int,
    params: dict[str, torch.nn.Parameter],
    decoder_weight: torch.nn.Parameter,
    optimizers: dict[str, torch.optim.Adam],
    decoder_optimizer: torch.optim.Adam,
    strategy_state: dict,
    train_seconds: float,
    loss_history: list[float],
) -> Path:
    """Write `step_XXXXXXX.pt` (atomically) and delete older ones; `step` is the next step to run."""
    state = {
        "step": step,
        "params": {name: value.detach() for name, value in params.items()},
        "decoder_weight": decoder_weight.detach(),
        "optimizers": {name: optimizer.state_dict() for name, optimizer in optimizers.items()},
        "decoder_optimizer": decoder_optimizer.state_dict(),
        "strategy_state": strategy_state,
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state(params["means"].device) if params["means"].is_cuda else None,
        "train_seconds": train_seconds,
        "loss_history": torch.tensor(loss_history, dtype=torch.float64),
    }
    path = directory / f"step_{step:07d}.pt"
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    for old in directory.glob("step_*.pt"):
        if old != path:
            old.unlink()
    return path


def _check_finite(
    params: dict[str, torch.Tensor], decoder_weight: torch.Tensor, scene_id: str, step: int, checkpoint_dir: Path
) -> None:
    """Stop with a clear message when a parameter went NaN/inf (before it reaches a checkpoint)."""
    bad = [name for name, value in (*params.items(), ("decoder", decoder_weight)) if not torch.isfinite(value).all()]
    if bad:
        raise FloatingPointError(
            f"scene {scene_id!r}: parameters {bad} are NaN/inf at step {step}; stopped. "
            f"Last good checkpoint: {_latest_checkpoint(checkpoint_dir) or 'none yet'}. "
            "Lower the learning rates or check the inputs."
        )


def lift_scene(
    scene,
    backbone: torch.nn.Module,
    config: LiftConfig,
    *,
    output_dir: str | os.PathLike,
    seed: int = 0,
    backbone_name: str | None = None,
    callback: Callable[[int, dict[str, torch.nn.Parameter]], None] | None = None,
    progress: bool = True,
    progress_position: int = 0,
) -> FeatureGaussians:
    """Lift `backbone`'s features of one scene into feature Gaussians and write the artifact.

    Resumes from `<output_dir>/.checkpoints/<scene_id>/` when a checkpoint is there. Runs on the
    backbone's device (gsplat on CUDA, the torch rasterizer on CPU, unless `config.backend` says).

    Args:
        scene: a `fit3d_hf.scenes.Scene` (train views are fitted, test views are held out).
        backbone: a frozen backbone of any family (or a FiT3DModel), see `backbones.extract_features`.
        config: hyper-parameters (`LiftConfig()` official, `LiftConfig.cpu_preset()` for CPU).
        output_dir: where `<scene_id>.safetensors` and `<scene_id>.json` are written.
        seed: seeds the initialisation, the view order and densification.
        backbone_name: recorded in the artifact (default: the backbone's `name_or_path` or model type).
        callback: called as `callback(step, params)` after each finished step (and its checkpoint).
        progress, progress_position: show a tqdm bar, on this terminal line.

    Returns:
        The lifted `FeatureGaussians` (also written to `<output_dir>/<scene_id>.safetensors`).

    Raises:
        ValueError: no usable training view; a checkpoint made with another backbone width or D.
        FloatingPointError: the loss or the parameters became NaN/inf (the last good checkpoint is kept).
    """
    output_dir = Path(output_dir)
    started = time.perf_counter()
    device = next(backbone.parameters()).device
    backbone_name = backbone_name or getattr(backbone, "name_or_path", "") or backbone.config.model_type
    train_ids, test_ids = _usable_views(scene, config.holdout_every)
    backbone.eval()
    train = _load_views(scene, train_ids, backbone, config.render_downscale)
    # Without held-out views the metrics are measured on the training views, and say so.
    test = _load_views(scene, test_ids, backbone, config.render_downscale) if test_ids else train
    out_dim = train.targets.shape[1]
    features_seconds = time.perf_counter() - started

    extent = camera_extent(scene.camera_centers[train_ids])
    strategy = _make_strategy(config)
    checkpoint_dir = _checkpoint_dir(output_dir, scene.scene_id)
    checkpoint = _latest_checkpoint(checkpoint_dir)
    cuda_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):
        if checkpoint is None:
            torch.manual_seed(seed)
            generator = torch.Generator().manual_seed(seed)
            points, colors = _initial_points(scene, config, generator)
            initial = initial_parameters(points, colors, config.sh_degree, config.feature_dim, config.init_opacity)
            decoder = torch.nn.Conv2d(config.feature_dim, out_dim, 3, padding=1, bias=False)
            params = {name: torch.nn.Parameter(value.to(device)) for name, value in initial.items()}
            decoder_weight = torch.nn.Parameter(decoder.weight.detach().to(device))
            optimizers, decoder_optimizer = _make_optimizers(params, decoder_weight, config, extent)
            strategy_state = strategy.initialize_state(scene_scale=extent)
            start_step, train_seconds, loss_history = 0, 0.0, []
        else:
            # On CPU first: RNG states must stay CPU tensors; Adam moves its moments to the params' device.
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
            checkpoint_out_dim, checkpoint_dim = state["decoder_weight"].shape[:2]
            if (checkpoint_out_dim, checkpoint_dim) != (out_dim, config.feature_dim):
                raise ValueError(
                    f"{checkpoint}: decoder maps D={checkpoint_dim} to Cb={checkpoint_out_dim} channels, but "
                    f"backbone {backbone_name!r} gives Cb={out_dim} and feature_dim is {config.feature_dim}; "
                    f"resume with the backbone and D it was started with, or delete {checkpoint_dir}"
                )
            params = {name: torch.nn.Parameter(value.to(device)) for name, value in state["params"].items()}
            decoder_weight = torch.nn.Parameter(state["decoder_weight"].to(device))
            optimizers, decoder_optimizer = _make_optimizers(params, decoder_weight, config, extent)
            for name, optimizer in optimizers.items():
                optimizer.load_state_dict(state["optimizers"][name])
            decoder_optimizer.load_state_dict(state["decoder_optimizer"])
            strategy_state = {k: v.to(device) if torch.is_tensor(v) else v for k, v in state["strategy_state"].items()}
            torch.set_rng_state(state["rng_cpu"])
            if cuda_devices and state["rng_cuda"] is not None:
                torch.cuda.set_rng_state(state["rng_cuda"], device)
            start_step, train_seconds = state["step"], state["train_seconds"]
            loss_history = state["loss_history"].tolist()
            logger.info("scene %r: resuming from %s", scene.scene_id, checkpoint)
        strategy.check_sanity(params, optimizers)

        sh_every = config.scaled(config.sh_degree_every)
        bar = tqdm(
            total=config.iterations,
            initial=start_step,
            desc=scene.scene_id,
            position=progress_position,
            disable=not progress,
            leave=False,
            dynamic_ncols=True,
        )
        segment_started = time.perf_counter()
        for step in range(start_step, config.iterations):
            _check_finite(params, decoder_weight, scene.scene_id, step, checkpoint_dir)
            optimizers["means"].param_groups[0]["lr"] = _means_lr(step, config, extent)
            row = _view_order(step, len(train.indices), seed)
            sh_degree = min(step // sh_every, config.sh_degree)
            loss, terms, meta = _losses(params, decoder_weight, train, row, sh_degree, config)
            if not torch.isfinite(loss):
                last = _latest_checkpoint(checkpoint_dir)
                raise FloatingPointError(
                    f"scene {scene.scene_id!r}: loss is {loss.item()} at step {step} (view {train.indices[row]}); "
                    f"stopped. Last good checkpoint: {last or 'none yet'}. Lower the learning rates or check the inputs."
                )
            meta.setdefault("gaussian_ids", None)  # DefaultStrategy asserts the key even when unpacked
            strategy.step_pre_backward(params, optimizers, strategy_state, step, meta)
            loss_history.append(loss.item())
            loss.backward()
            for optimizer in (*optimizers.values(), decoder_optimizer):
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            refine_step(strategy, params, optimizers, strategy_state, step, meta, config.max_gaussians)
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{loss_history[-1]:.4f}", feat=f"{terms['feature_l1'].item():.4f}", n=len(params["means"]))
            if (step + 1) % config.checkpoint_every == 0 and step + 1 < config.iterations:
                _check_finite(params, decoder_weight, scene.scene_id, step + 1, checkpoint_dir)
                elapsed = train_seconds + time.perf_counter() - segment_started
                _save_checkpoint(
                    checkpoint_dir, step + 1, params, decoder_weight, optimizers, decoder_optimizer, strategy_state,
                    elapsed, loss_history,
                )  # fmt: skip
            if callback is not None:
                callback(step, params)
        bar.close()
    segment_seconds = time.perf_counter() - segment_started
    steps_run = config.iterations - start_step

    metadata = {
        "format": FORMAT,
        "scene_id": scene.scene_id,
        "backbone": backbone_name,
        "feature_dim": str(config.feature_dim),
        "out_dim": str(out_dim),
        "sh_degree": str(config.sh_degree),
        "iterations": str(config.iterations),
    }
    _check_finite(params, decoder_weight, scene.scene_id, config.iterations, checkpoint_dir)
    gaussians = FeatureGaussians(params, decoder_weight, metadata)
    eval_started = time.perf_counter()
    metrics = _evaluate(gaussians, test, config)
    render_height, render_width = train.images.shape[-2:]
    report = {
        "scene_id": scene.scene_id,
        "backbone": backbone_name,
        "feature_dim": config.feature_dim,
        "out_dim": out_dim,
        "iterations": config.iterations,
        "num_gaussians": gaussians.num_gaussians,
        "num_train_views": len(train_ids),
        "eval_split": "held-out" if test_ids else "train",
        "num_eval_views": len(test.indices),
        "render_size": [render_height, render_width],
        "device": str(device),
        "metrics": metrics,
        "timings_s": {
            "backbone_features": features_seconds,
            "train": train_seconds + segment_seconds,
            "eval": time.perf_counter() - eval_started,
            "total_this_run": time.perf_counter() - started,
        },
        "iterations_per_second": steps_run / segment_seconds if steps_run else None,
        "resumed_from_step": start_step or None,
        "seed": seed,
        "config": asdict(config),
        "loss_history": [round(value, 6) for value in loss_history],
    }
    gaussians.save(output_dir / f"{scene.scene_id}.safetensors")
    # The JSON is written last: its presence marks the scene as finished.
    atomic_write_json(output_dir / f"{scene.scene_id}.json", report)
    if not config.keep_checkpoints:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
        if checkpoint_dir.parent.exists() and not any(checkpoint_dir.parent.iterdir()):
            checkpoint_dir.parent.rmdir()  # other processes may still be using it otherwise
    return gaussians


def finished_report(output_dir: str | os.PathLike, scene_id: str) -> dict | None:
    """The JSON report of a scene already lifted into `output_dir`, or None."""
    path = Path(output_dir) / f"{scene_id}.json"
    if not path.exists() or not (Path(output_dir) / f"{scene_id}.safetensors").exists():
        return None
    return json.loads(path.read_text())


def lift_scenes(
    scenes: Mapping[str, Callable[[], object]],
    backbone: torch.nn.Module,
    config: LiftConfig,
    *,
    output_dir: str | os.PathLike,
    seed: int = 0,
    backbone_name: str | None = None,
    process_index: int = 0,
    num_processes: int = 1,
) -> list[dict]:
    """Lift this process's share of `scenes` (every `num_processes`-th id from `process_index`).

    Scenes are loaded one at a time, only when they need lifting. A scene whose artifact is already
    in `output_dir` is skipped — unless it was lifted with another backbone or D (ValueError).

    Args:
        scenes: scene id → a function that loads that `Scene`.

    Returns:
        One report per scene of this process (the `<scene_id>.json` content) with `status`
        "lifted" or "skipped".
    """
    backbone_name = backbone_name or getattr(backbone, "name_or_path", "") or backbone.config.model_type
    own = list(scenes)[process_index::num_processes]
    reports = []
    for scene_id in tqdm(own, desc=f"process {process_index}: scenes", position=2 * process_index, dynamic_ncols=True):
        report = finished_report(output_dir, scene_id)
        if report is not None:
            if (report["backbone"], report["feature_dim"]) != (backbone_name, config.feature_dim):
                raise ValueError(
                    f"{Path(output_dir) / scene_id}.json was lifted with backbone {report['backbone']!r}, D={report['feature_dim']}, "
                    f"not {backbone_name!r}, D={config.feature_dim}: use another output_dir or delete it"
                )
            reports.append({**report, "status": "skipped"})
            continue
        scene = scenes[scene_id]()
        if scene.scene_id != scene_id:
            raise ValueError(f"scene loaded for id {scene_id!r} calls itself {scene.scene_id!r}")
        lift_scene(
            scene,
            backbone,
            config,
            output_dir=output_dir,
            seed=seed,
            backbone_name=backbone_name,
            progress_position=2 * process_index + 1,
        )
        reports.append({**finished_report(output_dir, scene_id), "status": "lifted"})
    return reports
