"""Frozen features of a probe's source: one model, a FiT3DModel, or several models concatenated.

The one definition of what a probe sees: patch maps concatenated over the source's models (a
FiT3DModel assembled as its `config.assembly` says), and the CLS token of the source's first
backbone — for FiT3D the original's, so the depth probe's input is [original patches ‖
fine-tuned patches ‖ original CLS] (3C), as the official `linear_evaluate_fit3d.py` builds it.
"""

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from .. import backbones
from ..backbones import BackboneFeatures
from ..modeling_fit3d import FiT3DModel
from .pipelines import center_pad

FeatureSource = PreTrainedModel | list[PreTrainedModel] | tuple[PreTrainedModel, ...]
# Part of every feature cache key: changing what a probe sees must never reuse stale features.
FEATURES_RULE = "patches concatenated over models (FiT3DModel assembled); CLS of the first backbone"


def source_models(source: FeatureSource) -> list[PreTrainedModel]:
    """The models of a source, in concatenation order."""
    return list(source) if isinstance(source, (list, tuple)) else [source]


def source_patch_size(source: FeatureSource) -> int:
    """The least common multiple of the source's patch sizes (its inputs must be multiples of it)."""
    patch = 1
    for model in source_models(source):
        patch = math.lcm(patch, backbones.patch_size_of(model.config))
    return patch


def _model_features(model: PreTrainedModel, pixel_values: torch.Tensor) -> BackboneFeatures:
    if isinstance(model, FiT3DModel):
        original = backbones.extract_features(model.original, pixel_values)
        finetuned = backbones.extract_features(model.finetuned, pixel_values)
        return BackboneFeatures(
            feature_maps=model.assemble(original.feature_maps, finetuned.feature_maps),
            unnormed_feature_maps=model.assemble(original.unnormed_feature_maps, finetuned.unnormed_feature_maps),
            cls_token=original.cls_token,
            unnormed_cls_token=original.unnormed_cls_token,
        )
    return backbones.extract_features(model, pixel_values)


@torch.no_grad()
def source_features(source: FeatureSource, images: torch.Tensor, *, valid: torch.Tensor | None = None) -> BackboneFeatures:
    """Features of `images` `[B, 3, H, W]` in [0, 1] (on the models' device).

    Each model normalises the images as its config says (`backbones.normalize`); pixels where
    `valid` `[B, 1, H, W]` is False become 0 after normalisation (mmseg pads after Normalize);
    the result is padded with zeros, centred, to a multiple of the patch size (the official
    probes' CenterPadding; a no-op for sizes that are multiples already). Returns
    `BackboneFeatures`: `feature_maps` / `unnormed_feature_maps` `[B, ΣC, h, w]` concatenated
    over the models, `cls_token` / `unnormed_cls_token` `[B, C_first]` of the first backbone.
    """
    patch = source_patch_size(source)
    outputs = []
    for model in source_models(source):
        pixel_values = backbones.normalize(images, model.config)
        if valid is not None:
            pixel_values = pixel_values * valid
        outputs.append(_model_features(model, center_pad(pixel_values, patch)))
    return BackboneFeatures(
        feature_maps=torch.cat([o.feature_maps for o in outputs], dim=1),
        unnormed_feature_maps=torch.cat([o.unnormed_feature_maps for o in outputs], dim=1),
        cls_token=outputs[0].cls_token,
        unnormed_cls_token=outputs[0].unnormed_cls_token,
    )


@torch.no_grad()
def extract_source_features(
    source: FeatureSource,
    images,
    size: tuple[int, int],
    *,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Frozen features of one source for a sequence of images, each resized to `size` (the `fixed` protocol).

    images: `[N, 3, H, W]` or anything indexable giving `[3, H_i, W_i]` in [0, 1] (sizes may
    differ; an `EvalDataset`'s images are read lazily); each is resized to `size` (bilinear,
    antialiased) and passed through `source_features`. Returns float16 CPU tensors
    `feature_maps` / `unnormed_feature_maps` `[N, C, h, w]` and `cls_token` /
    `unnormed_cls_token` `[N, C_first]`.
    """
    keys = ("feature_maps", "unnormed_feature_maps", "cls_token", "unnormed_cls_token")
    chunks: dict[str, list[torch.Tensor]] = {key: [] for key in keys}
    for model in source_models(source):
        model.eval().to(device)
    for start in tqdm(range(0, len(images), batch_size), desc="features", disable=not progress, leave=False):
        batch = torch.cat(
            [
                F.interpolate(
                    images[i][None].to(device, torch.float32), size=size, mode="bilinear", align_corners=False, antialias=True
                )
                for i in range(start, min(start + batch_size, len(images)))
            ]
        ).clamp(0, 1)
        features = source_features(source, batch)
        for key in keys:
            chunks[key].append(features[key].half().cpu())
    return {key: torch.cat(value) for key, value in chunks.items()}
