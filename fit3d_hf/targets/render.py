"""`render_targets`: render every training view's fine-tuning target into a targets dataset."""

import hashlib
import json
import logging
import math
import os
import shutil
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import datasets
import PIL.Image
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fit3d_hf import backbones, viz
from fit3d_hf.errors import InputError, InputNotFoundError, OutputError
from fit3d_hf.io import (
    atomic_directory,
    atomic_write_json,
    check_output_folder,
    folder_lock,
    remove_stale_temporaries,
    temporary_path,
)
from fit3d_hf.lift import FeatureGaussians
from fit3d_hf.provenance import (
    PROVENANCE_KEY,
    backbone_identity,
    check_backbone,
    check_provenance,
    file_sha256,
    scene_fingerprint,
)

from .load import load_targets
from .schema import FORMAT_NAME, FORMAT_VERSION, MASK_DTYPES, METADATA_FILE, PREVIEW_MIN_LONG_SIDE, bytes_per_view, schema

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


# How the stored mask is made (`render_targets(mask=...)`), as written into the dataset's metadata.
MASKS = {
    "coverage": "1 where the render alpha >= 0.5 at the patch grid and the scene mask (if any) >= 0.5 there, else 0 (uint8)",
    "soft": "the scene mask bilinearly resized to the patch grid (align_corners=False), in [0, 1], 1 without one; "
    "render coverage not used (float16)",
}
# The official Stage II data (`datasets/scannetpp.py`, `engine.py`): every image of the training scenes,
# the soft anonymisation mask, patch-multiple sides floored, ImageNet normalisation (lifted so by
# `LiftConfig.paper_preset()`). `render_targets(..., **PAPER_TARGETS)`, `fit3d render --protocol paper`.
PAPER_TARGETS = {"mask": "soft", "views": "all", "size_rule": "floor", "normalization": "imagenet"}


def _view_rows(
    scene,
    views: list[int],
    image_size: tuple[int, int],
    grid: tuple[int, int],
    make_target,
    mask: str,
) -> Iterator[dict[str, Any]]:
    """Rows of one scene; `make_target(view, image [1,3,H,W]) -> (target [Cb,h,w], covered [h,w] bool)`."""
    height, width = image_size
    for view in views:
        image = resize_image(scene.image(view)[None].float(), image_size)
        target, valid = make_target(view, image)
        scene_mask = scene.mask(view)
        if scene_mask is not None:
            scene_mask = F.interpolate(scene_mask[None, None].float(), size=grid, mode="bilinear", align_corners=False)[0, 0]
        if mask == "soft":
            # The official loss weights each cell by the bilinearly resized mask (mask / 255) and nothing else.
            valid = torch.ones(grid) if scene_mask is None else scene_mask
        elif scene_mask is not None:
            valid = valid & (scene_mask >= 0.5)
        pixels = (image[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        intrinsics = scale_intrinsics(scene.intrinsics[view], height / scene.height, width / scene.width)
        yield {
            "image": PIL.Image.fromarray(pixels),
            "target": target.to(torch.float16).cpu().numpy(),
            "mask": valid.to(getattr(torch, MASK_DTYPES[mask])).cpu().numpy(),
            "scene_id": scene.scene_id,
            "view_id": int(view),
            "intrinsics": intrinsics.float().cpu().numpy(),
            "world_to_camera": scene.world_to_camera[view].float().cpu().numpy(),
            "preview": target_preview(target, valid > 0),  # a soft mask weighs cells; the preview shows every weighted one
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
    mask: Literal["coverage", "soft"] = "coverage",
    size_rule: Literal["floor", "nearest"] = "floor",
    normalization: str | None = None,
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
            size. Defaults to each scene's size made a patch multiple by `size_rule`.
        render_scale: render at scene resolution × this factor before decoding (1 = official).
        views: "train" (the scene's `train_views`) or "all" (every view; the official fine-tuning
            uses every image of its training scenes).
        mask: the stored per-cell weight of the loss (`MASKS`). "coverage": 1 where the render
            covers the cell (alpha >= 0.5) and the scene mask allows it, else 0. "soft" (official):
            the scene mask (ScanNet++'s anonymisation mask / 255) bilinearly resized to the patch
            grid, values in [0, 1], stored as float16.
        size_rule: `backbones.input_size` rule of the default image size: "floor" (official) or
            "nearest".
        normalization: how the backbone's input is normalised (`backbones.NORMALIZATIONS`; None: as
            its config records; the backbone is not changed) for "single_view_blur" targets. Lifted
            targets carry the one they were lifted with (a different one given here is an error).
            The dataset records it, and fine-tuning uses it.
        num_shards: arrow shards in the saved folder (default: datasets' 500 MB shards).
        device: where rendering and decoding run.

    Scenes are rendered one at a time into per-scene parts under `<output_dir>.parts/` (each
    written atomically), so an interrupted run resumes at the first missing scene; memory stays
    flat (one view at a time, written by `Dataset.from_generator`). The parts folder is locked
    while a run writes it (`io.folder_lock`); parts of other settings are removed, and a run that
    fails before finishing any part leaves none behind.

    Before any rendering, every scene's Gaussians are checked against `backbone` and the scene
    (their recorded provenance: the backbone's weights, the scene's cameras): Gaussians lifted with
    another backbone are a `ProvenanceError`. The dataset's metadata records the backbone's identity
    and the sha256 and provenance of every Gaussians file (`metadata["provenance"]`).

    Returns:
        The saved dataset, opened with `load_targets` (float16 kept).
    """
    if target_source not in ("lifted", "single_view_blur"):
        raise InputError(f"target_source must be 'lifted' or 'single_view_blur', got {target_source!r}")
    if target_source == "lifted" and gaussians_dir is None:
        raise InputError("target_source='lifted' needs gaussians_dir (the folder written by `fit3d lift`)")
    if mask not in MASKS:
        raise InputError(f"mask must be one of {sorted(MASKS)}, got {mask!r}")
    output_dir = Path(output_dir)
    if output_dir.exists():
        raise OutputError(f"{output_dir} already exists; remove it or choose another output_dir")
    check_output_folder(output_dir, what="the targets output folder")
    scenes = list(scenes)
    repeated = sorted(scene_id for scene_id, count in Counter(scene.scene_id for scene in scenes).items() if count > 1)
    if repeated:
        raise InputError(f"scene ids {repeated} appear more than once: each scene is rendered once")
    if not scenes:
        raise InputError("no scenes given")
    hidden_size = backbones.hidden_size_of(backbone.config)
    identity = backbone_identity(backbone)
    upstream = _check_gaussians(scenes, Path(gaussians_dir), identity, hidden_size) if target_source == "lifted" else {}
    backbone = backbone.to(device).eval()
    parts_dir = output_dir.with_name(output_dir.name + ".parts")
    settings = {
        "target_source": target_source,
        "image_size": list(image_size) if image_size else None,
        "render_scale": render_scale,
        "blur_sigma": blur_sigma if target_source == "single_view_blur" else None,
        "views": views,
        "mask": mask,
        "size_rule": size_rule,
        "normalization": normalization,
        "backbone": json.loads(backbone.config.to_json_string()),
        "backbone_weights_sha256": identity["weights_sha256"],
        "gaussians_sha256": {scene_id: entry["sha256"] for scene_id, entry in upstream.items()},
        # Parts written by a version with other columns cannot be concatenated with new ones.
        "columns": list(schema(1, 1, 1)),
    }
    with folder_lock(parts_dir, what="the targets' parts folder"):
        try:
            dataset_dir = _render_parts(
                scenes, backbone, output_dir, parts_dir, settings, identity, upstream,
                gaussians_dir=gaussians_dir, target_source=target_source, image_size=image_size, render_scale=render_scale,
                blur_sigma=blur_sigma, views=views, mask=mask, size_rule=size_rule, normalization=normalization,
                num_shards=num_shards, device=device,
            )  # fmt: skip
        except BaseException:
            # A part is worth resuming from; a parts folder without one is only clutter.
            if not any(entry.is_dir() and not entry.name.startswith(".") for entry in parts_dir.iterdir()):
                shutil.rmtree(parts_dir, ignore_errors=True)
            raise
    shutil.rmtree(parts_dir)
    return load_targets(dataset_dir)


def _check_gaussians(scenes: list, gaussians_dir: Path, identity: dict, hidden_size: int) -> dict[str, dict]:
    """Check every scene's Gaussians file before rendering any: present, readable, as wide as the
    backbone, lifted with this backbone (same weights) from this scene (same cameras).

    Returns:
        scene id -> {"sha256": the file's hash, "lift": its recorded provenance (None for a file
        that records none: made by hand or by an older fit3d_hf; a warning says so)}.
    """
    paths = {scene.scene_id: gaussians_dir / f"{scene.scene_id}.safetensors" for scene in scenes}
    missing = [str(path) for path in paths.values() if not path.is_file()]
    if missing:
        raise InputNotFoundError(
            f"no lifted Gaussians for {len(missing)} scene(s): {', '.join(missing)} missing; lift them first "
            f"(`fit3d lift` with the same scenes and --output_dir {gaussians_dir})"
        )
    upstream = {}
    fix = "render with the backbone (and --seed, for a random one) the scenes were lifted with, or lift them again"
    for scene in scenes:
        path = paths[scene.scene_id]
        metadata = FeatureGaussians.read_metadata(path)
        out_dim = int(metadata.get("out_dim") or FeatureGaussians.load(path).out_dim)
        if out_dim != hidden_size:
            raise InputError(
                f"{path}: decoder width {out_dim} does not match the backbone width {hidden_size}; "
                "lift with the backbone you fine-tune"
            )
        lift = json.loads(metadata[PROVENANCE_KEY]) if PROVENANCE_KEY in metadata else None
        if lift is None:
            logger.warning("%s records no provenance (made by hand or by an older fit3d_hf): its backbone is not checked", path)
        else:
            check_backbone(lift["backbone"], identity, artifact=str(path), fix=fix)
            keys = ("scene_id", "num_views", "poses_sha256")
            current = scene_fingerprint(scene)
            check_provenance(
                {key: lift["scene"][key] for key in keys},
                {key: current[key] for key in keys},
                artifact=f"{path} (its scene)",
                fix="render the scenes the Gaussians were lifted from (same folders or procedural-room options)",
            )
        upstream[scene.scene_id] = {"sha256": file_sha256(path), "lift": lift}
    return upstream


def _render_parts(
    scenes: list,
    backbone: torch.nn.Module,
    output_dir: Path,
    parts_dir: Path,
    settings: dict,
    identity: dict,
    upstream: dict,
    *,
    gaussians_dir,
    target_source: str,
    image_size,
    render_scale: float,
    blur_sigma: float,
    views: str,
    mask: str,
    size_rule: str,
    normalization: str | None,
    num_shards: int | None,
    device,
) -> Path:
    """Render the scenes' parts that `parts_dir` lacks, then assemble and save the dataset at `output_dir`."""
    config = backbone.config
    patch_size = backbones.patch_size_of(config)
    hidden_size = backbones.hidden_size_of(config)
    # What a killed run left half-written: its staged part and final folders.
    remove_stale_temporaries(parts_dir)
    remove_stale_temporaries(output_dir.parent)
    settings_file = parts_dir / "settings.json"
    if settings_file.exists() and json.loads(settings_file.read_text())["hash"] != _settings_hash(settings):
        logger.warning("%s holds parts of an earlier run with other settings: removing them", parts_dir)
        for entry in parts_dir.iterdir():
            if entry.is_dir():
                shutil.rmtree(entry)
    atomic_write_json(settings_file, {"hash": _settings_hash(settings)}, indent=None)

    scene_ids: list[str] = []
    scene_sources: dict[str, int] = {}
    feature_dims: dict[str, int] = {}
    # How the backbone's input was normalised for each scene's targets (lifting's, or this blur's).
    blur_normalization = backbones.normalization_of(backbones.with_normalization(config, normalization))
    normalizations: dict[str, str] = {}
    grid = None
    for scene in tqdm(scenes, desc="render targets", unit="scene"):
        scene_ids.append(scene.scene_id)
        kind = scene_source_kind(scene)
        scene_sources[kind] = scene_sources.get(kind, 0) + 1
        size = tuple(image_size) if image_size else backbones.input_size(scene.height, scene.width, patch_size, rule=size_rule)
        if size[0] % patch_size or size[1] % patch_size:
            raise InputError(f"image_size {size} is not a multiple of the patch size {patch_size}")
        scene_grid = (size[0] // patch_size, size[1] // patch_size)
        if grid is not None and scene_grid != grid:
            raise InputError(
                f"scene {scene.scene_id!r} gives a {scene_grid} patch grid but earlier scenes gave {grid}; "
                "pass image_size to store every scene at one size"
            )
        grid = scene_grid
        view_list = list(scene.train_views) if views == "train" else list(range(scene.num_views))

        if target_source == "lifted":
            gaussians = FeatureGaussians.load(Path(gaussians_dir) / f"{scene.scene_id}.safetensors", device=device)
            feature_dims[scene.scene_id] = gaussians.feature_dim
            # Files from before the normalisation was recorded were lifted with the family's own.
            normalizations[scene.scene_id] = gaussians.metadata.get("normalization", "family")
            if normalization not in (None, normalizations[scene.scene_id]):
                raise InputError(
                    f"{Path(gaussians_dir) / scene.scene_id}.safetensors was lifted with {normalizations[scene.scene_id]!r} input normalisation, not "
                    f"{normalization!r}: lift with --normalization {normalization}, or render with its own"
                )
            make_target = _lifted_target_fn(gaussians, scene, grid, render_scale, device)
        else:
            normalizations[scene.scene_id] = blur_normalization
            make_target = _single_view_target_fn(backbone, normalization, grid, blur_sigma, device)

        part = parts_dir / scene.scene_id
        if part.exists():
            continue
        # datasets' generator cache: scratch space, named so that remove_stale_temporaries finds it.
        cache_dir = temporary_path(parts_dir / f"cache-{scene.scene_id}")
        try:
            part_dataset = datasets.Dataset.from_generator(
                _view_rows,
                gen_kwargs={
                    "scene": scene,
                    "views": view_list,
                    "image_size": size,
                    "grid": grid,
                    "make_target": make_target,
                    "mask": mask,
                },
                features=schema(hidden_size, *grid, mask=mask),
                cache_dir=str(cache_dir),
                # An explicit fingerprint spares hashing the Gaussians in gen_kwargs.
                fingerprint=f"{_settings_hash(settings)}-{scene.scene_id}",
            )
            with atomic_directory(part) as staging:
                part_dataset.save_to_disk(str(staging))
        finally:
            shutil.rmtree(cache_dir, ignore_errors=True)

    if len(set(normalizations.values())) > 1:
        raise InputError(
            f"the scenes were lifted with different input normalisations {normalizations}: the fine-tuned model can "
            "have one; lift them again with one --normalization"
        )
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
        "normalization": next(iter(normalizations.values())),
        "render": {
            "render_scale": render_scale,
            "decode": "scene decoder at render resolution, then bilinear resize to the patch grid (align_corners=False)",
            "mask": MASKS[mask],
            "mask_kind": mask,
            "size_rule": None if image_size else size_rule,
            "blur_sigma_cells": blur_sigma if target_source == "single_view_blur" else None,
            "views": views,
        },
        "scenes": scene_ids,
        "scene_sources": scene_sources,
        "bytes_per_view_uncompressed": bytes_per_view(hidden_size, *grid, mask=mask),
        PROVENANCE_KEY: {
            "backbone": identity,
            "gaussians": upstream or None,
            "scenes": {scene.scene_id: scene_fingerprint(scene) for scene in scenes},
        },
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
    return output_dir


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


def _single_view_target_fn(
    backbone: torch.nn.Module, normalization: str | None, grid: tuple[int, int], blur_sigma: float, device
):
    config = backbones.with_normalization(backbone.config, normalization)

    def make_target(view: int, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pixel_values = backbones.normalize(image.to(device), config)
        feature_maps = backbones.extract_features(backbone, pixel_values).feature_maps.float()
        return gaussian_blur(feature_maps, blur_sigma)[0], torch.ones(grid, dtype=torch.bool, device=device)

    return make_target
