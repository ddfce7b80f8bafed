"""`render_targets`: render every training view's fine-tuning target into a targets dataset."""

import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import datasets
import PIL.Image
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fit3d_hf import backbones, viz
from fit3d_hf.io import atomic_directory, atomic_write_json, remove_stale_temporaries, temporary_path
from fit3d_hf.lift import FeatureGaussians

from .load import load_targets
from .schema import FORMAT_NAME, FORMAT_VERSION, METADATA_FILE, PREVIEW_MIN_LONG_SIDE, bytes_per_view, schema

logger = logging.getLogger(__name__)


def resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear, antialiased resize of images [B, 3, H, W] to `size` (H', W')."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return F.interpolate(image, size=size, mode="bilinear", align_corners=False, antialias=True)


def scale_intrinsics(intrinsics: torch.Tensor, scale_y: float, scale_x: float) -> torch.Tensor:
    """Intrinsics [..., 3, 3] for an image resized by (scale_y, scale_x) (pixel-edge convention)."""
    scaled = intrinsics.clone()
    scaled[..., 0, :] *= scale_x
    scaled[..., 1, :] *= scale_y
    return scaled


def gaussian_blur(feature_maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of feature maps [B, C, h, w] with `sigma` in grid cells (reflect padding)."""
    if sigma <= 0:
        return feature_maps
    radius = max(1, int(round(3 * sigma)))
    offsets = torch.arange(-radius, radius + 1, dtype=feature_maps.dtype, device=feature_maps.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = feature_maps.shape[1]
    out = feature_maps
    for shape in ((1, 1, 2 * radius + 1, 1), (1, 1, 1, 2 * radius + 1)):
        weight = kernel.view(shape).expand(channels, 1, *shape[2:])
        pad = (0, 0, radius, radius) if shape[2] > 1 else (radius, radius, 0, 0)
        out = F.conv2d(F.pad(out, pad, mode="reflect"), weight, groups=channels)
    return out


def target_preview(target: torch.Tensor, valid: torch.Tensor) -> PIL.Image.Image:
    """The preview column's picture of one target [Cb, h, w]: its valid cells' first three principal
    components as RGB (`viz.pca_rgb`, fitted on this view alone), black where `valid` [h, w] is False,
    each cell enlarged to a block so that the long side is at least `PREVIEW_MIN_LONG_SIDE` pixels."""
    target, valid = target.float().cpu(), valid.cpu()
    channels, height, width = target.shape
    rgb = torch.zeros(3, height, width)
    if valid.sum() >= 3:  # three components need three vectors; a view with fewer stays black
        vectors = target.permute(1, 2, 0)[valid]  # [n, Cb]
        rgb[:, valid] = viz.pca_rgb(vectors.T.reshape(1, channels, -1, 1))[0, :, :, 0]
    scale = math.ceil(PREVIEW_MIN_LONG_SIDE / max(height, width))
    pixels = (rgb * 255).round().to(torch.uint8).repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    return PIL.Image.fromarray(pixels.permute(1, 2, 0).numpy())


def scene_source_kind(scene) -> str:
    """Where a scene's images come from, as far as licences go: "scannetpp" (FiT3D's ScanNet++ layout,
    whose terms restrict redistribution), "synthetic" (the package's procedural rooms) or "capture"
    (any other folder or dataset). Recorded per kind in the metadata (never the paths), for the dataset card."""
    source = str(scene.source)
    if source.endswith("transforms_train.json"):
        return "scannetpp"
    return "synthetic" if source.startswith("synthetic room") else "capture"


def _settings_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _view_rows(
    scene,
    views: list[int],
    image_size: tuple[int, int],
    grid: tuple[int, int],
    make_target,
) -> Iterator[dict[str, Any]]:
    """Rows of one scene; `make_target(view, image [1,3,H,W]) -> (target [Cb,h,w], valid [h,w] bool)`."""
    height, width = image_size
    for view in views:
        image = resize_image(scene.image(view)[None].float(), image_size)
        target, valid = make_target(view, image)
        scene_mask = scene.mask(view)
        if scene_mask is not None:
            scene_mask = F.interpolate(scene_mask[None, None].float(), size=grid, mode="bilinear", align_corners=False)
            valid = valid & (scene_mask[0, 0] >= 0.5)
        pixels = (image[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        intrinsics = scale_intrinsics(scene.intrinsics[view], height / scene.height, width / scene.width)
        yield {
            "image": PIL.Image.fromarray(pixels),
            "target": target.to(torch.float16).cpu().numpy(),
            "mask": valid.to(torch.uint8).cpu().numpy(),
            "scene_id": scene.scene_id,
            "view_id": int(view),
            "intrinsics": intrinsics.float().cpu().numpy(),
            "world_to_camera": scene.world_to_camera[view].float().cpu().numpy(),
            "preview": target_preview(target, valid),
        }


@torch.no_grad()
def render_targets(
    scenes: Iterable,
    backbone: torch.nn.Module,
    output_dir: str | os.PathLike,
    *,
    gaussians_dir: str | os.PathLike | None = None,
    target_source: Literal["lifted", "single_view_blur"] = "lifted",
    image_size: tuple[int, int] | None = None,
    render_scale: float = 1.0,
    blur_sigma: float = 1.0,
    views: Literal["train", "all"] = "train",
    num_shards: int | None = None,
    device: str | torch.device = "cpu",
) -> datasets.Dataset:
    """Render every training view's fine-tuning target and save the dataset to `output_dir`.

    Args:
        scenes: `fit3d_hf.scenes.Scene` objects (images [3, H, W] in [0, 1], intrinsics [V, 3, 3],
            world_to_camera [V, 4, 4], optional masks [H, W]).
        backbone: the transformers backbone to be fine-tuned; its config gives the patch size and
            width Cb. Its weights are only used for `target_source="single_view_blur"`.
        output_dir: the dataset folder (`save_to_disk` layout + `fit3d_targets.json`). Written under
            a temporary name and renamed when complete; an existing folder is an error.
        gaussians_dir: folder of `<scene_id>.safetensors` written by `lift_scene` (needed for "lifted").
        target_source: "lifted" renders the lifted features and decodes them with the scene's
            decoder at render resolution (the FiT3D target). "single_view_blur" is the single-view
            control: the backbone's own features of the view, Gaussian-blurred by `blur_sigma`
            grid cells — same images, grid and masks, no 3D.
        image_size: (H, W) of the stored images = the fine-tuning input; multiples of the patch
            size. Defaults to each scene's size rounded to the nearest whole patches (as lifting).
        render_scale: render at scene resolution × this factor before decoding (1 = official).
        views: "train" (the scene's `train_views`) or "all".
        num_shards: arrow shards in the saved folder (default: datasets' 500 MB shards).
        device: where rendering and decoding run.

    Scenes are rendered one at a time into per-scene parts under `<output_dir>.parts/` (each
    written atomically), so an interrupted run resumes at the first missing scene; memory stays
    flat (one view at a time, written by `Dataset.from_generator`).

    Returns:
        The saved dataset, opened with `load_targets` (float16 kept).
    """
    if target_source not in ("lifted", "single_view_blur"):
        raise ValueError(f"target_source must be 'lifted' or 'single_view_blur', got {target_source!r}")
    if target_source == "lifted" and gaussians_dir is None:
        raise ValueError("target_source='lifted' needs gaussians_dir (the folder written by `fit3d lift`)")
    output_dir = Path(output_dir)
    if output_dir.exists():
        raise FileExistsError(f"{output_dir} already exists; remove it or choose another output_dir")
    config = backbone.config
    patch_size = backbones.patch_size_of(config)
    hidden_size = backbones.hidden_size_of(config)
    backbone = backbone.to(device).eval()
    parts_dir = output_dir.with_name(output_dir.name + ".parts")
    parts_dir.mkdir(parents=True, exist_ok=True)
    # What a killed run left half-written: its staged part and final folders.
    remove_stale_temporaries(parts_dir)
    remove_stale_temporaries(output_dir.parent)

    settings = {
        "target_source": target_source,
        "image_size": list(image_size) if image_size else None,
        "render_scale": render_scale,
        "blur_sigma": blur_sigma if target_source == "single_view_blur" else None,
        "views": views,
        "backbone": json.loads(config.to_json_string()),
        # Parts written by a version with other columns cannot be concatenated with new ones.
        "columns": list(schema(1, 1, 1)),
    }
    settings_file = parts_dir / "settings.json"
    if settings_file.exists() and json.loads(settings_file.read_text())["hash"] != _settings_hash(settings):
        raise ValueError(f"{parts_dir} holds parts rendered with other settings; delete it to start over")
    atomic_write_json(settings_file, {"hash": _settings_hash(settings)}, indent=None)

    scene_ids: list[str] = []
    scene_sources: dict[str, int] = {}
    feature_dims: dict[str, int] = {}
    grid = None
    for scene in tqdm(scenes, desc="render targets", unit="scene"):
        if scene.scene_id in scene_ids:
            raise ValueError(f"scene_id {scene.scene_id!r} appears twice")
        scene_ids.append(scene.scene_id)
        kind = scene_source_kind(scene)
        scene_sources[kind] = scene_sources.get(kind, 0) + 1
        size = tuple(image_size) if image_size else backbones.input_size(scene.height, scene.width, patch_size, rule="nearest")
        if size[0] % patch_size or size[1] % patch_size:
            raise ValueError(f"image_size {size} is not a multiple of the patch size {patch_size}")
        scene_grid = (size[0] // patch_size, size[1] // patch_size)
        if grid is not None and scene_grid != grid:
            raise ValueError(
                f"scene {scene.scene_id!r} gives a {scene_grid} patch grid but earlier scenes gave {grid}; "
                "pass image_size to store every scene at one size"
            )
        grid = scene_grid
        view_list = list(scene.train_views) if views == "train" else list(range(scene.num_views))

        if target_source == "lifted":
            gaussians_path = Path(gaussians_dir) / f"{scene.scene_id}.safetensors"
            if not gaussians_path.exists():
                raise FileNotFoundError(f"no lifted Gaussians for scene {scene.scene_id!r}: {gaussians_path} is missing")
            gaussians = FeatureGaussians.load(gaussians_path, device=device)
            if gaussians.out_dim != hidden_size:
                raise ValueError(
                    f"{gaussians_path}: decoder width {gaussians.out_dim} does not match the backbone width "
                    f"{hidden_size}; lift with the backbone you fine-tune"
                )
            feature_dims[scene.scene_id] = gaussians.feature_dim
            make_target = _lifted_target_fn(gaussians, scene, grid, render_scale, device)
        else:
            make_target = _single_view_target_fn(backbone, grid, blur_sigma, device)

        part = parts_dir / scene.scene_id
        if part.exists():
            continue
        # datasets' generator cache: scratch space, named so that remove_stale_temporaries finds it.
        cache_dir = temporary_path(parts_dir / f"cache-{scene.scene_id}")
        try:
            part_dataset = datasets.Dataset.from_generator(
                _view_rows,
                gen_kwargs={"scene": scene, "views": view_list, "image_size": size, "grid": grid, "make_target": make_target},
                features=schema(hidden_size, *grid),
                cache_dir=str(cache_dir),
                # An explicit fingerprint spares hashing the Gaussians in gen_kwargs.
                fingerprint=f"{_settings_hash(settings)}-{scene.scene_id}",
            )
            with atomic_directory(part) as staging:
                part_dataset.save_to_disk(str(staging))
        finally:
            shutil.rmtree(cache_dir, ignore_errors=True)

    if grid is None:
        raise ValueError("no scenes given")
    metadata = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "backbone": {
            "name_or_path": getattr(config, "_name_or_path", "") or "",
            "family": backbones.family_of(config),
            "model_type": config.model_type,
            "hidden_size": hidden_size,
            "patch_size": patch_size,
        },
        "image_size": [grid[0] * patch_size, grid[1] * patch_size],
        "patch_grid": list(grid),
        "target_source": target_source,
        "feature_dim": feature_dims if target_source == "lifted" else None,
        "render": {
            "render_scale": render_scale,
            "decode": "scene decoder at render resolution, then bilinear resize to the patch grid (align_corners=False)",
            "mask": "render alpha >= 0.5 at the patch grid, and the scene mask >= 0.5 where given",
            "blur_sigma_cells": blur_sigma if target_source == "single_view_blur" else None,
            "views": views,
        },
        "scenes": scene_ids,
        "scene_sources": scene_sources,
        "bytes_per_view_uncompressed": bytes_per_view(hidden_size, *grid),
    }
    parts = [datasets.load_from_disk(str(parts_dir / scene_id)) for scene_id in scene_ids]
    valid_fraction = {}
    for scene_id, part in zip(scene_ids, parts):
        valid_fraction[scene_id] = round(float(part.with_format("numpy", columns=["mask"])[:]["mask"].mean()), 4)
        if valid_fraction[scene_id] < 0.05:
            logger.warning(
                "scene %r: only %.1f%% of the target cells are valid (render alpha >= 0.5 and scene mask); "
                "was it lifted long enough?",
                scene_id,
                100 * valid_fraction[scene_id],
            )
    metadata["valid_fraction"] = valid_fraction
    dataset = datasets.concatenate_datasets(parts)
    metadata["num_views"] = dataset.num_rows
    dataset.info.description = json.dumps(metadata)
    with atomic_directory(output_dir) as staging:
        dataset.save_to_disk(str(staging), num_shards=num_shards)
        (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2))
    shutil.rmtree(parts_dir)
    return load_targets(output_dir)


def _lifted_target_fn(gaussians: FeatureGaussians, scene, grid: tuple[int, int], render_scale: float, device):
    render_height = max(1, round(scene.height * render_scale))
    render_width = max(1, round(scene.width * render_scale))

    def make_target(view: int, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        intrinsics = scale_intrinsics(scene.intrinsics[view : view + 1], render_height / scene.height, render_width / scene.width)
        _, features, alphas = gaussians.render(
            intrinsics.to(device), scene.world_to_camera[view : view + 1].to(device), render_width, render_height
        )
        decoded = gaussians.decode(features)
        target = F.interpolate(decoded.float(), size=grid, mode="bilinear", align_corners=False)[0]
        alpha = F.interpolate(alphas.float(), size=grid, mode="bilinear", align_corners=False)[0, 0]
        if not torch.isfinite(target).all():
            raise ValueError(f"scene {scene.scene_id!r} view {view}: the rendered target has NaN/inf values")
        return target, alpha >= 0.5

    return make_target


def _single_view_target_fn(backbone: torch.nn.Module, grid: tuple[int, int], blur_sigma: float, device):
    def make_target(view: int, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pixel_values = backbones.normalize(image.to(device), backbone.config)
        feature_maps = backbones.extract_features(backbone, pixel_values).feature_maps.float()
        return gaussian_blur(feature_maps, blur_sigma)[0], torch.ones(grid, dtype=torch.bool, device=device)

    return make_target
