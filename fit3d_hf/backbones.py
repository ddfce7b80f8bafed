"""The five FiT3D backbone families as plain transformers models, and how to read their features.

| family       | transformers class                         | patch | prefix tokens dropped |
|--------------|--------------------------------------------|-------|-----------------------|
| `dinov2`     | `Dinov2Model`                              | 14    | 1 (CLS)               |
| `dinov2_reg` | `Dinov2WithRegistersModel`                 | 14    | 5 (CLS + 4 registers) |
| `clip`       | `CLIPVisionModel`                          | 16    | 1 (CLS)               |
| `mae`        | `ViTModel(add_pooling_layer=False)`        | 16    | 1 (CLS)               |
| `deit3`      | `Dinov2Model` (transformers has no DeiT-III) | 16  | 1 (CLS)               |

Features are the last block's tokens after the final LayerNorm (CLIP: `post_layernorm`, applied to
every token), prefix tokens dropped. Position embeddings are resampled as timm does (bicubic with
antialias, in float32), so features match the official timm models at any size that is a multiple
of the patch size. `build_backbone`, `load_backbone` and `extract_features` install that
resampling on the model's embeddings (`use_timm_interpolation`).

This file imports only torch and transformers: it is copied next to saved FiT3D models and loaded
as remote code by processes that never imported `fit3d_hf`.
"""

import hashlib
import math
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import (
    AutoConfig,
    CLIPVisionConfig,
    CLIPVisionModel,
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    DPTImageProcessorPil,
    PreTrainedConfig,
    PreTrainedModel,
    ViTConfig,
    ViTModel,
)
from transformers.utils import ModelOutput

FAMILIES = ("dinov2", "dinov2_reg", "clip", "mae", "deit3")

# name -> (family, sizes); the official FiT3D releases (timm ids in docs/models.md).
PRESETS = {
    "dinov2_small": ("dinov2", {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6}),
    "dinov2_base": ("dinov2", {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12}),
    "dinov2_reg_small": ("dinov2_reg", {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6}),
    "clip_base": ("clip", {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12}),
    "mae_base": ("mae", {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12}),
    "deit3_base": ("deit3", {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12}),
}

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)

# Everything that differs between families besides the sizes, as in the official timm models.
_FAMILY_DEFAULTS = {
    "dinov2": dict(patch_size=14, image_size=518, layerscale_value=1e-5, layer_norm_eps=1e-6, use_mask_token=False),
    "dinov2_reg": dict(patch_size=14, image_size=518, layerscale_value=1e-5, layer_norm_eps=1e-6, num_register_tokens=4),
    "clip": dict(patch_size=16, image_size=384, layer_norm_eps=1e-5, hidden_act="gelu"),
    "mae": dict(patch_size=16, image_size=224, layer_norm_eps=1e-6),
    # `fit3d_family` tells DeiT-III apart from DINOv2: both are `Dinov2Model`s.
    "deit3": dict(
        patch_size=16, image_size=224, layerscale_value=1e-6, layer_norm_eps=1e-6, use_mask_token=False, fit3d_family="deit3"
    ),
}
_CONFIG_CLASSES = {
    "dinov2": Dinov2Config,
    "dinov2_reg": Dinov2WithRegistersConfig,
    "clip": CLIPVisionConfig,
    "mae": ViTConfig,
    "deit3": Dinov2Config,
}
_MODEL_CLASSES = {
    "dinov2": Dinov2Model,
    "dinov2_reg": Dinov2WithRegistersModel,
    "clip": CLIPVisionModel,
    "mae": ViTModel,
    "deit3": Dinov2Model,
}
_FAMILY_OF_MODEL_TYPE = {"dinov2": "dinov2", "dinov2_with_registers": "dinov2_reg", "clip_vision_model": "clip", "vit": "mae"}


@dataclass
class BackboneFeatures(ModelOutput):
    """Patch and CLS features of one backbone (or of a FiT3DModel, assembled).

    Args:
        feature_maps (`torch.FloatTensor` of shape `[B, C, h, w]`):
            Last block's patch tokens after the final LayerNorm, prefix tokens dropped.
        cls_token (`torch.FloatTensor` of shape `[B, C]`):
            The CLS token after the final LayerNorm.
        unnormed_feature_maps (`torch.FloatTensor` of shape `[B, C, h, w]`):
            Last block's patch tokens without the final LayerNorm (the depth probe's input).
        unnormed_cls_token (`torch.FloatTensor` of shape `[B, C]`):
            The CLS token without the final LayerNorm.
    """

    feature_maps: torch.FloatTensor | None = None
    cls_token: torch.FloatTensor | None = None
    unnormed_feature_maps: torch.FloatTensor | None = None
    unnormed_cls_token: torch.FloatTensor | None = None


def _backbone_config_of(config: PreTrainedConfig) -> PreTrainedConfig:
    """A FiT3DConfig's backbone config, or the config itself."""
    return config.backbone_config if getattr(config, "model_type", None) == "fit3d" else config


def family_of(config: PreTrainedConfig) -> str:
    """The FiT3D family (one of `FAMILIES`) of a backbone config or a FiT3DConfig."""
    config = _backbone_config_of(config)
    family = getattr(config, "fit3d_family", None) or _FAMILY_OF_MODEL_TYPE.get(config.model_type)
    if family not in FAMILIES:
        raise ValueError(
            f"{type(config).__name__} (model_type {config.model_type!r}) is not a FiT3D backbone; "
            f"supported model types: {sorted(_FAMILY_OF_MODEL_TYPE)}"
        )
    return family


def patch_size_of(config: PreTrainedConfig) -> int:
    """The (square) patch size of a backbone config or a FiT3DConfig."""
    patch = _backbone_config_of(config).patch_size
    if isinstance(patch, (list, tuple)):
        if len(set(patch)) != 1:
            raise ValueError(f"only square patches are supported, got patch_size {patch}")
        patch = patch[0]
    return int(patch)


def hidden_size_of(config: PreTrainedConfig) -> int:
    """The token width Cb of a backbone config or a FiT3DConfig."""
    return int(_backbone_config_of(config).hidden_size)


def image_mean_std(config: PreTrainedConfig) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """The per-channel (mean, std) the family was trained with: CLIP's own for `clip`, ImageNet's otherwise."""
    return (CLIP_MEAN, CLIP_STD) if family_of(config) == "clip" else (IMAGENET_MEAN, IMAGENET_STD)


def normalize(images: torch.Tensor, config: PreTrainedConfig) -> torch.Tensor:
    """Normalise images `[B, 3, H, W]` in [0, 1] into the backbone's `pixel_values` `[B, 3, H, W]`."""
    mean, std = image_mean_std(config)
    mean = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


def make_image_processor(config: PreTrainedConfig, size: int | None = None) -> DPTImageProcessorPil:
    """A stock transformers image processor for the backbone (saved with a model, loaded by AutoImageProcessor).

    It rescales to [0, 1], normalises with `image_mean_std(config)` and resizes bicubically keeping the
    aspect ratio, so that one side (the shorter one when shrinking) is about `size` pixels (default: the
    backbone's native `image_size`) and both sides are multiples of the patch size.
    """
    patch = patch_size_of(config)
    image_size = _backbone_config_of(config).image_size
    size = size or (image_size[0] if isinstance(image_size, (list, tuple)) else image_size)
    mean, std = image_mean_std(config)
    return DPTImageProcessorPil(
        size={"height": size, "width": size},
        keep_aspect_ratio=True,
        ensure_multiple_of=patch,
        resample=3,  # PIL bicubic
        image_mean=list(mean),
        image_std=list(std),
    )


def backbone_config(family: str, **kwargs) -> PreTrainedConfig:
    """The transformers config of `family` with the official models' settings; `kwargs` override them.

    MLP width is 4x `hidden_size` unless `intermediate_size` (CLIP, MAE) or `mlp_ratio` (DINOv2,
    DeiT-III) is given.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown backbone family {family!r}; choose one of {FAMILIES}")
    values = dict(_FAMILY_DEFAULTS[family])
    values.update(kwargs)
    if family in ("clip", "mae") and "intermediate_size" not in kwargs:
        values["intermediate_size"] = 4 * values.get("hidden_size", 768)
    return _CONFIG_CLASSES[family](**values)


def preset_kwargs(name: str) -> dict:
    """The config keyword arguments of an official FiT3D release (a key of `PRESETS`)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    family, sizes = PRESETS[name]
    return {**_FAMILY_DEFAULTS[family], **sizes}


def preset_config(name: str, **kwargs) -> PreTrainedConfig:
    """The backbone config of an official FiT3D release (a key of `PRESETS`)."""
    kwargs = {**preset_kwargs(name), **kwargs}
    return backbone_config(PRESETS[name][0], **kwargs)


def tiny_config(family: str, **kwargs) -> PreTrainedConfig:
    """A tiny config of `family` for tests: width 32, 2 layers, 2 heads, a 4x4 native patch grid."""
    patch = kwargs.get("patch_size", _FAMILY_DEFAULTS.get(family, {}).get("patch_size", 16))
    sizes = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=4 * patch)
    return backbone_config(family, **{**sizes, **kwargs})


def resample_position_table(table: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Resample a position table `[1, 1 + n*n, C]` (CLS row first) to a patch grid `(h, w)` as timm does.

    Returns `[1, 1 + h*w, C]`: the CLS row unchanged, the `n x n` patch rows resampled bicubically
    with antialias in float32 (timm's `resample_abs_pos_embed`).
    """
    num_patches, dim = table.shape[1] - 1, table.shape[2]
    side = math.isqrt(num_patches)
    if (side, side) == tuple(grid):
        return table
    patch_table = table[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2).float()
    patch_table = F.interpolate(patch_table, size=tuple(grid), mode="bicubic", antialias=True)
    patch_table = patch_table.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], dim).to(table.dtype)
    return torch.cat([table[:, :1], patch_table], dim=1)


def _interpolate_pos_encoding_like_timm(self, embeddings: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Replaces the `interpolate_pos_encoding` method of a transformers ViT embeddings module."""
    # CLIP keeps its table in an nn.Embedding, the others in a Parameter.
    table = self.position_embedding.weight.unsqueeze(0) if hasattr(self, "position_embedding") else self.position_embeddings
    patch = self.patch_size[0] if isinstance(self.patch_size, (list, tuple)) else self.patch_size
    return resample_position_table(table, (height // patch, width // patch))


def use_timm_interpolation(model: PreTrainedModel) -> PreTrainedModel:
    """Make `model` resample its position embeddings as timm does (in place, idempotent); returns it."""
    embeddings = model.embeddings
    embeddings.interpolate_pos_encoding = types.MethodType(_interpolate_pos_encoding_like_timm, embeddings)
    return model


def build_backbone(config: PreTrainedConfig) -> PreTrainedModel:
    """A randomly initialised transformers backbone of the config's family, with timm's interpolation."""
    family = family_of(config)
    if family == "mae":
        model = ViTModel(config, add_pooling_layer=False)
    else:
        model = _MODEL_CLASSES[family](config)
    return use_timm_interpolation(model)


def load_backbone(path: str, **kwargs) -> PreTrainedModel:
    """Load a saved transformers backbone (a local folder or Hub id) as its family's class.

    `kwargs` go to `from_pretrained` (e.g. `dtype=torch.bfloat16`); with `output_loading_info=True`
    the result is `(model, loading_info)`, as from `from_pretrained`.
    """
    family = family_of(AutoConfig.from_pretrained(path))
    if family == "mae":
        kwargs["add_pooling_layer"] = False
    loaded = _MODEL_CLASSES[family].from_pretrained(path, **kwargs)
    if kwargs.get("output_loading_info"):
        return use_timm_interpolation(loaded[0]), loaded[1]
    return use_timm_interpolation(loaded)


def num_prefix_tokens_of(config: PreTrainedConfig) -> int:
    """Tokens before the patch tokens: CLS, plus registers for `dinov2_reg`."""
    config = _backbone_config_of(config)
    return 1 + (config.num_register_tokens if family_of(config) == "dinov2_reg" else 0)


SIZE_RULES = ("floor", "nearest")


def input_size(height: int, width: int, patch_size: int, rule: str = "floor") -> tuple[int, int]:
    """The backbone input size (H, W) for an image of `height` x `width`: each side made a multiple of the patch size.

    The one definition of the input-size rule. `"floor"` rounds each side down, as the official
    FiT3D code does (876x584 at patch 14 -> 868x574, a 41x62 grid); `"nearest"` rounds to the
    nearest multiple (882x588). Every side is at least one patch.
    """
    if rule not in SIZE_RULES:
        raise ValueError(f"input-size rule must be one of {SIZE_RULES}, got {rule!r}")
    snap = (lambda side: side // patch_size) if rule == "floor" else (lambda side: round(side / patch_size))
    return max(1, snap(height)) * patch_size, max(1, snap(width)) * patch_size


def check_image_size(height: int, width: int, config: PreTrainedConfig) -> None:
    """Raise a ValueError naming the sizes unless both are positive multiples of the patch size."""
    patch = patch_size_of(config)
    if height < patch or width < patch or height % patch or width % patch:
        suggestion = "x".join(map(str, input_size(height, width, patch)))
        raise ValueError(
            f"image size {height}x{width} (HxW) is not a multiple of the patch size {patch}; resize or crop to e.g. {suggestion}"
        )


def weights_checksum(*models: torch.nn.Module) -> str:
    """SHA-256 of the models' weights (class, names, dtypes, shapes and bytes): equal iff the weights are identical."""
    digest = hashlib.sha256()
    for model in models:
        digest.update(type(model).__name__.encode())
        for name, tensor in sorted(model.state_dict().items()):
            tensor = tensor.detach().cpu().contiguous()
            digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _tokens_to_map(tokens: torch.Tensor, num_prefix: int, grid: tuple[int, int]) -> torch.Tensor:
    """Tokens `[B, P + h*w, C]` -> patch feature map `[B, C, h, w]`."""
    patches = tokens[:, num_prefix:]
    return patches.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], grid[0], grid[1])


def extract_features(model: PreTrainedModel, pixel_values: torch.Tensor) -> BackboneFeatures:
    """Last-block features of a transformers backbone of any family, or a FiT3DModel's assembled ones.

    Args:
        model: a backbone of one of `FAMILIES` (as built by `build_backbone` or loaded with
            transformers), or a `FiT3DModel` (its features assembled as `config.assembly` says).
        pixel_values: `[B, 3, H, W]`, normalised (`normalize`); H and W multiples of the patch size.

    Returns:
        `BackboneFeatures` with `feature_maps`/`unnormed_feature_maps` `[B, C, H/p, W/p]` and
        `cls_token`/`unnormed_cls_token` `[B, C]`.
    """
    if getattr(model.config, "model_type", None) == "fit3d":
        return model.backbone_features(pixel_values)
    config = model.config
    family = family_of(config)
    height, width = pixel_values.shape[-2:]
    check_image_size(height, width, config)
    use_timm_interpolation(model)  # a backbone loaded with plain transformers resamples differently
    patch = patch_size_of(config)
    # CLIP and ViT refuse non-native sizes unless asked; the DINOv2 classes always interpolate.
    kwargs = {"interpolate_pos_encoding": True} if family in ("clip", "mae") else {}
    outputs = model(pixel_values=pixel_values, output_hidden_states=True, **kwargs)
    unnormed = outputs.hidden_states[-1]
    normed = model.post_layernorm(unnormed) if family == "clip" else outputs.last_hidden_state
    grid, num_prefix = (height // patch, width // patch), num_prefix_tokens_of(config)
    return BackboneFeatures(
        feature_maps=_tokens_to_map(normed, num_prefix, grid),
        cls_token=normed[:, 0],
        unnormed_feature_maps=_tokens_to_map(unnormed, num_prefix, grid),
        unnormed_cls_token=unnormed[:, 0],
    )
