"""The views lifting fits and evaluates: images, masks and cameras at render size, and the backbone's features."""

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..backbones import extract_features, input_size, normalize, patch_size_of, with_normalization
from ..scenes.scene import Scene

logger = logging.getLogger(__name__)


@dataclass
class Views:
    """Everything lifting reads from the scene, loaded once: images, masks, cameras, targets."""

    indices: list[int]  # scene view index of each row
    images: torch.Tensor  # [V, 3, H, W] float16, render size, CPU
    masks: torch.Tensor | None  # [V, 1, H, W] float32 (1 = use), render size, CPU
    intrinsics: torch.Tensor  # [V, 3, 3] for the render size
    world_to_camera: torch.Tensor  # [V, 4, 4]
    targets: torch.Tensor  # [V, Cb, h, w] float16 backbone patch features, CPU


def render_size(scene: Scene, downscale: int) -> tuple[int, int]:
    """(height, width) lifting renders `scene` at: its size divided by `downscale`, rounded, at least 1."""
    return max(1, round(scene.height / downscale)), max(1, round(scene.width / downscale))


@torch.no_grad()
def load_views(
    scene: Scene,
    indices: list[int],
    backbone: torch.nn.Module,
    render_downscale: int,
    batch_size: int = 8,
    *,
    size_rule: str = "floor",
    normalization: str | None = None,
) -> Views:
    """Load images and masks at render size and compute the backbone targets once per view.

    The backbone sees each image resized to patch multiples (`backbones.input_size(..., size_rule)`)
    and normalised as `normalization` says (None: as its config records; the backbone is not
    changed). The official code recomputes these features at every iteration; they never change.
    """
    height, width = render_size(scene, render_downscale)
    patch = patch_size_of(backbone.config)
    size = input_size(scene.height, scene.width, patch, rule=size_rule)
    config = with_normalization(backbone.config, normalization)
    device = next(backbone.parameters()).device
    images, masks, targets = [], [], []
    has_masks = any(scene.mask(i) is not None for i in indices)
    for start in range(0, len(indices), batch_size):
        chunk = indices[start : start + batch_size]
        full = scene.images(chunk)
        if not torch.isfinite(full).all():
            bad = [scene.view_names[i] for i, image in zip(chunk, full) if not torch.isfinite(image).all()]
            raise ValueError(f"scene {scene.scene_id!r}: images of views {bad} contain NaN/inf")
        pixel_values = normalize(F.interpolate(full, size=size, mode="bilinear", antialias=True, align_corners=False), config)
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
    return Views(
        indices=list(indices),
        images=torch.cat(images),
        masks=torch.cat(masks) if has_masks else None,
        intrinsics=intrinsics,
        world_to_camera=scene.world_to_camera[indices].clone(),
        targets=torch.cat(targets),
    )


def usable_views(scene: Scene, holdout_every: int, train_on: str = "train") -> tuple[list[int], list[int]]:
    """Train and held-out views, minus views whose mask excludes every pixel.

    `train_on="train"`: the scene's train views, its test views held out; a scene without test
    views gets every `holdout_every`-th view held out (if that leaves some to train on).
    `train_on="all"`: every view is trained on, none held out (the official `eval=False`).
    """
    train, test = list(scene.train_views), list(scene.test_views)
    if train_on == "all":
        train, test = list(range(scene.num_views)), []
    elif not test and holdout_every > 0 and len(train) > 1:
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
