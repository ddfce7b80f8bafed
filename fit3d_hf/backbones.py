"""Vision transformers of transformers as FiT3D backbones: one adapter per `model_type`, and how to read their features.

A `BackboneAdapter` tells FiT3D, for one transformers `model_type`, which class to build, how many
prefix tokens (CLS, registers) come before the patch grid, how positions adapt to a non-native
size, which norm gives "the last-layer features" and the normalisation the family was trained
with. `ADAPTERS` holds every supported type (docs/backbones.md has the table):

| model type                | class                      | patch | prefix tokens          | positions at other sizes          |
|---------------------------|----------------------------|-------|------------------------|-----------------------------------|
| `dinov2`                  | `Dinov2Model`              | 14    | 1 (CLS)                | learned table, resampled as timm  |
| `dinov2_with_registers`   | `Dinov2WithRegistersModel` | 14    | 1 + registers          | learned table, resampled as timm  |
| `clip_vision_model`       | `CLIPVisionModel`          | 16    | 1 (CLS)                | learned table, resampled as timm  |
| `vit`                     | `ViTModel`                 | 16    | 1 (CLS)                | learned table, resampled as timm  |
| `dinov3_vit`              | `DINOv3ViTModel`           | 16    | 1 + registers          | RoPE (nothing to resample)        |
| `siglip_vision_model`     | `SiglipVisionModel`        | 16    | 0                      | learned table, resampled as timm  |
| `siglip2_vision_model`    | `Siglip2VisionModel`       | 16    | 0                      | SigLIP 2's own (NaFlex) resize    |
| `ijepa`                   | `IJepaModel`               | 14    | 0                      | learned table, resampled as timm  |
| `aimv2_vision_model`      | `Aimv2VisionModel`         | 14    | 0                      | learned table, resampled as timm  |
| `vit_mae`                 | `ViTMAEModel`              | 16    | 1 (CLS)                | sin-cos table, resampled as timm  |
| `metaclip_2_vision_model` | `MetaClip2VisionModel`     | 14    | 1 (CLS)                | learned table, resampled as timm  |
| `radio`                   | `RadioModel`               | 16    | CLS tokens + registers | RADIO's own (CPE) crop and resize |

Features are the last block's tokens after the family's final norm (applied to every token),
prefix tokens dropped. "Resampled as timm" is timm's `resample_abs_pos_embed` (bicubic with
antialias, in float32), so features match timm's models at any multiple of the patch size.
`build_backbone` and `load_backbone` install that resampling once (`prepare_backbone`), so a
prepared model compiles with `torch.compile(fullgraph=True)`; `extract_features` prepares a
plain transformers model it meets for the first time.

Inputs are normalised with the family's statistics unless the config records ImageNet's
(`set_normalization(config, "imagenet")`, as the official FiT3D code and its converted checkpoints):
`normalize` and `make_image_processor` read the record.

A family (`FAMILIES`) is a named reference architecture of one model type: its config defaults
besides the sizes (`deit3` is a `dinov2` model with patch 16, `mae` a `vit` one). `PRESETS` are
sizes of the families; `tiny_config` builds test-sized ones.

This file imports only torch, transformers and the standard library: it is copied next to saved
FiT3D models and loaded as remote code by processes that never imported `fit3d_hf`.
"""

import copy
import hashlib
import math
import types
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import transformers
from transformers import AutoConfig, DPTImageProcessorPil, PreTrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN, SIGLIP_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
# RADIO normalises inside the model (its input conditioner): it takes pixels in [0, 1].
IDENTITY_MEAN, IDENTITY_STD = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)


@dataclass(frozen=True)
class BackboneAdapter:
    """What FiT3D must know about one transformers `model_type` to read its patch features.

    Args:
        model_type: the config's `model_type` (the key in `ADAPTERS`).
        family: the family (`FAMILIES`) of a config of this type that names none (`fit3d_family`).
        model_class: name of the transformers class built and loaded (the bare encoder).
        prefix_tokens: what sums to the number of tokens before the patch grid: ints, and names
            of config attributes (e.g. `(1, "num_register_tokens")`).
        final_norm: attribute of the norm applied to every last-block token, or None when the
            family has none (the last block's tokens are the features).
        mean_std: the per-channel (mean, std) the family was trained with.
        positions: how positions adapt to a non-native size: `"timm"` (the learned or fixed
            table resampled as timm does, installed by `prepare_backbone`), `"aimv2"` (the same,
            for AIMv2's embeddings, which cannot resample themselves), `"rope"`, `"naflex"`
            or `"cpe"` (the model's own, nothing to install).
        interpolate_flag: the forward needs `interpolate_pos_encoding=True` at non-native sizes.
        build_config: config values FiT3D fixes when it builds or loads a model (heads it does
            not use are not built).
        runtime_config: config values that must hold whenever features are read (set by
            `prepare_backbone`).
        dropped_modules: state-dict prefixes of modules a model may carry that FiT3D does not
            build (e.g. a pooler or a pooling head).
    """

    model_type: str
    family: str
    model_class: str
    prefix_tokens: tuple[int | str, ...]
    final_norm: str | None
    mean_std: tuple[tuple[float, float, float], tuple[float, float, float]]
    positions: str
    interpolate_flag: bool = False
    build_config: dict = field(default_factory=dict)
    runtime_config: dict = field(default_factory=dict)
    dropped_modules: tuple[str, ...] = ()

    def num_prefix_tokens(self, config: PreTrainedConfig) -> int:
        return sum(part if isinstance(part, int) else int(getattr(config, part)) for part in self.prefix_tokens)

    def model_inputs(self, model: PreTrainedModel, pixel_values: torch.Tensor) -> dict:
        """Keyword arguments of the model's forward for images `[B, 3, H, W]`."""
        return {"pixel_values": pixel_values, **({"interpolate_pos_encoding": True} if self.interpolate_flag else {})}


class _ViTMAEAdapter(BackboneAdapter):
    def model_inputs(self, model: PreTrainedModel, pixel_values: torch.Tensor) -> dict:
        # ViTMAE shuffles its tokens by argsort(noise); increasing noise keeps them in grid order
        # (and mask_ratio 0, set by prepare_backbone, keeps all of them).
        patch = patch_size_of(model.config)
        num_patches = (pixel_values.shape[-2] // patch) * (pixel_values.shape[-1] // patch)
        noise = torch.arange(num_patches, device=pixel_values.device, dtype=torch.float32).expand(pixel_values.shape[0], -1)
        return {"pixel_values": pixel_values, "noise": noise, "interpolate_pos_encoding": True}


class _Siglip2Adapter(BackboneAdapter):
    def model_inputs(self, model: PreTrainedModel, pixel_values: torch.Tensor) -> dict:
        # SigLIP 2 takes flattened patches (each `[p, p, 3]`, as its image processor lays them out)
        # and the grid of each image; every patch is real, so there is no padding mask.
        batch, channels, height, width = pixel_values.shape
        patch = patch_size_of(model.config)
        rows, cols = height // patch, width // patch
        patches = pixel_values.reshape(batch, channels, rows, patch, cols, patch).permute(0, 2, 4, 3, 5, 1)
        spatial_shapes = torch.tensor([[rows, cols]], device=pixel_values.device).expand(batch, 2)
        return {
            "pixel_values": patches.reshape(batch, rows * cols, patch * patch * channels),
            "pixel_attention_mask": None,
            "spatial_shapes": spatial_shapes,
        }


_IMAGENET, _CLIP, _SIGLIP = (IMAGENET_MEAN, IMAGENET_STD), (CLIP_MEAN, CLIP_STD), (SIGLIP_MEAN, SIGLIP_STD)
ADAPTERS: dict[str, BackboneAdapter] = {
    adapter.model_type: adapter
    for adapter in (
        BackboneAdapter(
            model_type="dinov2", family="dinov2", model_class="Dinov2Model", prefix_tokens=(1,), final_norm="layernorm",
            mean_std=_IMAGENET, positions="timm",
        ),
        BackboneAdapter(
            model_type="dinov2_with_registers", family="dinov2_reg", model_class="Dinov2WithRegistersModel",
            prefix_tokens=(1, "num_register_tokens"), final_norm="layernorm", mean_std=_IMAGENET, positions="timm",
        ),
        BackboneAdapter(
            model_type="clip_vision_model", family="clip", model_class="CLIPVisionModel", prefix_tokens=(1,), final_norm="post_layernorm",
            mean_std=_CLIP, positions="timm", interpolate_flag=True,
        ),
        BackboneAdapter(
            model_type="vit", family="mae", model_class="ViTModel", prefix_tokens=(1,), final_norm="layernorm", mean_std=_IMAGENET,
            positions="timm", interpolate_flag=True, dropped_modules=("pooler.",),
        ),
        BackboneAdapter(
            model_type="dinov3_vit", family="dinov3", model_class="DINOv3ViTModel", prefix_tokens=(1, "num_register_tokens"),
            final_norm="norm", mean_std=_IMAGENET, positions="rope",
        ),
        BackboneAdapter(
            model_type="siglip_vision_model", family="siglip", model_class="SiglipVisionModel", prefix_tokens=(), final_norm="post_layernorm",
            mean_std=_SIGLIP, positions="timm", interpolate_flag=True, build_config={"vision_use_head": False},
            dropped_modules=("head.",),
        ),
        _Siglip2Adapter(
            model_type="siglip2_vision_model", family="siglip2", model_class="Siglip2VisionModel", prefix_tokens=(),
            final_norm="post_layernorm", mean_std=_SIGLIP, positions="naflex", build_config={"vision_use_head": False},
            dropped_modules=("head.",),
        ),
        BackboneAdapter(
            model_type="ijepa", family="ijepa", model_class="IJepaModel", prefix_tokens=(), final_norm="layernorm", mean_std=_IMAGENET,
            positions="timm", interpolate_flag=True, dropped_modules=("pooler.",),
        ),
        BackboneAdapter(
            model_type="aimv2_vision_model", family="aimv2", model_class="Aimv2VisionModel", prefix_tokens=(), final_norm="rms_norm",
            mean_std=_CLIP, positions="aimv2", build_config={"use_head": False}, dropped_modules=("head.",),
        ),
        _ViTMAEAdapter(
            model_type="vit_mae", family="vit_mae", model_class="ViTMAEModel", prefix_tokens=(1,), final_norm="layernorm", mean_std=_IMAGENET,
            positions="timm", runtime_config={"mask_ratio": 0.0},
        ),
        BackboneAdapter(
            model_type="metaclip_2_vision_model", family="metaclip2", model_class="MetaClip2VisionModel", prefix_tokens=(1,),
            final_norm="post_layernorm", mean_std=_CLIP, positions="timm", interpolate_flag=True,
        ),
        BackboneAdapter(
            model_type="radio", family="radio", model_class="RadioModel", prefix_tokens=("num_cls_tokens", "num_registers"),
            final_norm=None, mean_std=(IDENTITY_MEAN, IDENTITY_STD), positions="cpe",
        ),
    )
}  # fmt: skip

# name -> (model type, the reference architecture's config values besides the sizes).
_FAMILIES = {
    "dinov2": ("dinov2", dict(patch_size=14, image_size=518, layerscale_value=1e-5, layer_norm_eps=1e-6, use_mask_token=False)),
    "dinov2_reg": (
        "dinov2_with_registers",
        dict(patch_size=14, image_size=518, layerscale_value=1e-5, layer_norm_eps=1e-6, num_register_tokens=4),
    ),
    "clip": ("clip_vision_model", dict(patch_size=16, image_size=384, layer_norm_eps=1e-5, hidden_act="gelu")),
    "mae": ("vit", dict(patch_size=16, image_size=224, layer_norm_eps=1e-6)),
    # `fit3d_family` tells DeiT-III apart from DINOv2: both are `Dinov2Model`s.
    "deit3": (
        "dinov2",
        dict(
            patch_size=16, image_size=224, layerscale_value=1e-6, layer_norm_eps=1e-6, use_mask_token=False, fit3d_family="deit3"
        ),
    ),
    "dinov3": (
        "dinov3_vit",
        dict(
            patch_size=16,
            image_size=224,
            num_register_tokens=4,
            layerscale_value=1e-5,
            layer_norm_eps=1e-5,
            rope_theta=100.0,
            query_bias=True,
            key_bias=False,
            value_bias=True,
            pos_embed_rescale=2.0,
        ),
    ),
    "siglip": (
        "siglip_vision_model",
        dict(patch_size=16, image_size=224, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, vision_use_head=False),
    ),
    "siglip2": (
        "siglip2_vision_model",
        dict(patch_size=16, num_patches=256, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, vision_use_head=False),
    ),
    "ijepa": ("ijepa", dict(patch_size=14, image_size=224, layer_norm_eps=1e-6)),
    "aimv2": (
        "aimv2_vision_model",
        dict(patch_size=14, image_size=224, rms_norm_eps=1e-5, qkv_bias=False, mlp_bias=False, hidden_act="silu", use_head=False),
    ),
    "vit_mae": ("vit_mae", dict(patch_size=16, image_size=224, layer_norm_eps=1e-6, mask_ratio=0.0)),
    "metaclip2": ("metaclip_2_vision_model", dict(patch_size=14, image_size=224, layer_norm_eps=1e-5, hidden_act="gelu")),
    "radio": ("radio", dict(patch_size=16, image_size=224, layer_norm_eps=1e-6)),
}
FAMILIES = tuple(_FAMILIES)
# The families of the official FiT3D releases (the paper's six backbones).
PAPER_FAMILIES = ("dinov2", "dinov2_reg", "clip", "mae", "deit3")


def _sizes(hidden: int, layers: int, heads: int, **more) -> dict:
    return dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, **more)


# name -> (family, sizes). The six official FiT3D releases come first (timm ids in docs/models.md);
# the others follow the families' published architectures (docs/backbones.md).
PRESETS = {
    "dinov2_small": ("dinov2", _sizes(384, 12, 6)),
    "dinov2_base": ("dinov2", _sizes(768, 12, 12)),
    "dinov2_reg_small": ("dinov2_reg", _sizes(384, 12, 6)),
    "clip_base": ("clip", _sizes(768, 12, 12)),
    "mae_base": ("mae", _sizes(768, 12, 12)),
    "deit3_base": ("deit3", _sizes(768, 12, 12)),
    "dinov2_large": ("dinov2", _sizes(1024, 24, 16)),
    "dinov2_giant": ("dinov2", _sizes(1536, 40, 24, use_swiglu_ffn=True)),
    "dinov2_reg_base": ("dinov2_reg", _sizes(768, 12, 12)),
    "dinov2_reg_large": ("dinov2_reg", _sizes(1024, 24, 16)),
    "dinov2_reg_giant": ("dinov2_reg", _sizes(1536, 40, 24, use_swiglu_ffn=True)),
    "clip_large": ("clip", _sizes(1024, 24, 16, patch_size=14, image_size=224, intermediate_size=4096)),
    "mae_large": ("mae", _sizes(1024, 24, 16, intermediate_size=4096)),
    "mae_huge": ("mae", _sizes(1280, 32, 16, patch_size=14, intermediate_size=5120)),
    "deit3_small": ("deit3", _sizes(384, 12, 6)),
    "deit3_large": ("deit3", _sizes(1024, 24, 16)),
    "dinov3_small": ("dinov3", _sizes(384, 12, 6, intermediate_size=1536)),
    "dinov3_small_plus": ("dinov3", _sizes(384, 12, 6, intermediate_size=1536, use_gated_mlp=True)),
    "dinov3_base": ("dinov3", _sizes(768, 12, 12, intermediate_size=3072)),
    "dinov3_large": ("dinov3", _sizes(1024, 24, 16, intermediate_size=4096)),
    "dinov3_huge_plus": ("dinov3", _sizes(1280, 32, 20, intermediate_size=5120, use_gated_mlp=True)),
    "siglip_base": ("siglip", _sizes(768, 12, 12, intermediate_size=3072)),
    "siglip_large": ("siglip", _sizes(1024, 24, 16, intermediate_size=4096, image_size=256)),
    "siglip_so400m": ("siglip", _sizes(1152, 27, 16, intermediate_size=4304, patch_size=14)),
    "siglip2_base": ("siglip2", _sizes(768, 12, 12, intermediate_size=3072)),
    "siglip2_large": ("siglip2", _sizes(1024, 24, 16, intermediate_size=4096)),
    "siglip2_so400m": ("siglip2", _sizes(1152, 27, 16, intermediate_size=4304)),
    "siglip2_giant": ("siglip2", _sizes(1536, 40, 16, intermediate_size=6144)),
    "ijepa_huge": ("ijepa", _sizes(1280, 32, 16, intermediate_size=5120)),
    "ijepa_giant": ("ijepa", _sizes(1408, 40, 16, intermediate_size=6144, patch_size=16)),
    "aimv2_large": ("aimv2", _sizes(1024, 24, 8, intermediate_size=2816)),
    "aimv2_huge": ("aimv2", _sizes(1536, 24, 12, intermediate_size=4096)),
    "aimv2_1b": ("aimv2", _sizes(2048, 24, 16, intermediate_size=5632)),
    "vit_mae_base": ("vit_mae", _sizes(768, 12, 12, intermediate_size=3072)),
    "vit_mae_large": ("vit_mae", _sizes(1024, 24, 16, intermediate_size=4096)),
    "vit_mae_huge": ("vit_mae", _sizes(1280, 32, 16, intermediate_size=5120, patch_size=14)),
    "metaclip2_huge": ("metaclip2", _sizes(1280, 32, 16, intermediate_size=5120)),
    "metaclip2_gigantic": ("metaclip2", _sizes(1664, 48, 16, intermediate_size=8192)),
    "radio_base": ("radio", _sizes(768, 12, 12)),
    "radio_large": ("radio", _sizes(1024, 24, 16)),
    "radio_huge": ("radio", _sizes(1280, 32, 16)),
}


@dataclass
class BackboneFeatures(ModelOutput):
    """Patch and CLS features of one backbone (or of a FiT3DModel, assembled).

    Args:
        feature_maps (`torch.FloatTensor` of shape `[B, C, h, w]`):
            Last block's patch tokens after the final norm, prefix tokens dropped.
        cls_token (`torch.FloatTensor` of shape `[B, C]`):
            The first prefix token (CLS) after the final norm; for a family without prefix
            tokens, the mean of the normed patch tokens (timm's average pooling).
        unnormed_feature_maps (`torch.FloatTensor` of shape `[B, C, h, w]`):
            Last block's patch tokens without the final norm (the depth probe's input).
        unnormed_cls_token (`torch.FloatTensor` of shape `[B, C]`):
            `cls_token` without the final norm.
        hidden_states (`tuple[torch.FloatTensor]`, one per layer, each of shape `[B, P + h*w, C]`, *optional*):
            With `output_hidden_states`: the embeddings' output, then every block's, prefix tokens
            included, without the final LayerNorm (the backbone's own `hidden_states`; a FiT3DModel's
            are its fine-tuned copy's).
        attentions (`tuple[torch.FloatTensor]`, one per block, each of shape `[B, heads, P + h*w, P + h*w]`, *optional*):
            With `output_attentions`: every block's attention weights (the backbone's own `attentions`; a
            FiT3DModel's are its fine-tuned copy's).
    """

    feature_maps: torch.FloatTensor | None = None
    cls_token: torch.FloatTensor | None = None
    unnormed_feature_maps: torch.FloatTensor | None = None
    unnormed_cls_token: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


def _backbone_config_of(config: PreTrainedConfig) -> PreTrainedConfig:
    """A FiT3DConfig's backbone config, or the config itself."""
    return config.backbone_config if getattr(config, "model_type", None) == "fit3d" else config


def _unsupported(config: PreTrainedConfig) -> ValueError:
    return ValueError(
        f"{type(config).__name__} (model_type {config.model_type!r}) is not a supported FiT3D backbone. "
        f"Supported model types: {sorted(ADAPTERS)}. An adapter (fit3d_hf.backbones.BackboneAdapter) needs: "
        "the class, the number of prefix tokens before a plain patch grid, how positions adapt to other "
        "sizes, the final norm and the input normalisation (docs/backbones.md)."
    )


def adapter_of(config: PreTrainedConfig) -> BackboneAdapter:
    """The `BackboneAdapter` of a backbone config or a FiT3DConfig; a ValueError listing the supported types otherwise."""
    config = _backbone_config_of(config)
    adapter = ADAPTERS.get(getattr(config, "model_type", None))
    if adapter is None:
        raise _unsupported(config)
    return adapter


def family_of(config: PreTrainedConfig) -> str:
    """The family (one of `FAMILIES`) of a backbone config or a FiT3DConfig."""
    config = _backbone_config_of(config)
    adapter = adapter_of(config)
    return getattr(config, "fit3d_family", None) or adapter.family


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


def num_prefix_tokens_of(config: PreTrainedConfig) -> int:
    """Tokens before the patch tokens (CLS, registers), dropped from the features."""
    config = _backbone_config_of(config)
    return adapter_of(config).num_prefix_tokens(config)


def native_image_size(config: PreTrainedConfig) -> int:
    """The side of the square images the family was trained at (SigLIP 2: its position grid times the patch)."""
    config = _backbone_config_of(config)
    image_size = getattr(config, "image_size", None)
    if image_size is None:  # SigLIP 2 keeps a `num_patches` position table instead
        return math.isqrt(config.num_patches) * patch_size_of(config)
    return int(image_size[0] if isinstance(image_size, (list, tuple)) else image_size)


# How a backbone's input is normalised, recorded on its config (`set_normalization`): "family" uses
# the statistics the family was trained with (`BackboneAdapter.mean_std`); "imagenet" uses ImageNet's
# for every family, as the official FiT3D code does for every backbone, CLIP included, in lifting,
# fine-tuning and probing (so its released checkpoints were trained that way).
NORMALIZATIONS = ("family", "imagenet")


def normalization_of(config: PreTrainedConfig) -> str:
    """The normalisation (one of `NORMALIZATIONS`) a backbone config or FiT3DConfig records; "family" when it records none."""
    return getattr(_backbone_config_of(config), "fit3d_normalization", None) or "family"


def set_normalization(config: PreTrainedConfig, normalization: str) -> None:
    """Record on a backbone config or FiT3DConfig (in place, saved with it as `fit3d_normalization`) how its input is normalised.

    `normalize`, `image_mean_std` and `make_image_processor` then use it, so every stage and a saved
    model's image processor agree.
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    config = _backbone_config_of(config)
    if normalization == "imagenet" and adapter_of(config).mean_std == (IDENTITY_MEAN, IDENTITY_STD):
        raise ValueError(f"{config.model_type} normalises its input inside the model: only normalization 'family' applies")
    config.fit3d_normalization = normalization


def with_normalization(config: PreTrainedConfig, normalization: str | None) -> PreTrainedConfig:
    """`config` itself when `normalization` is None or what it records, else a copy that records `normalization`.

    For a stage told how to normalise a backbone it does not own: the model is left unchanged.
    """
    if normalization is None or normalization == normalization_of(config):
        return config
    config = copy.deepcopy(config)
    set_normalization(config, normalization)
    return config


def image_mean_std(config: PreTrainedConfig) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """The per-channel (mean, std) the backbone's input is normalised with (`normalization_of`).

    "imagenet": ImageNet's. "family": the family's own (ImageNet's, CLIP's, SigLIP's 0.5, or none
    for RADIO).
    """
    if normalization_of(config) == "imagenet":
        return IMAGENET_MEAN, IMAGENET_STD
    return adapter_of(config).mean_std


def normalize(images: torch.Tensor, config: PreTrainedConfig) -> torch.Tensor:
    """Normalise images `[B, 3, H, W]` in [0, 1] into the backbone's `pixel_values` `[B, 3, H, W]` (`image_mean_std`)."""
    mean, std = image_mean_std(config)
    mean = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


def make_image_processor(config: PreTrainedConfig, size: int | None = None) -> DPTImageProcessorPil:
    """A stock transformers image processor for the backbone (saved with a model, loaded by AutoImageProcessor).

    It rescales to [0, 1], normalises with `image_mean_std(config)` (the recorded normalisation) and resizes bicubically keeping the
    aspect ratio, so that one side (the shorter one when shrinking) is about `size` pixels (default: the
    backbone's `native_image_size`) and both sides are multiples of the patch size.
    """
    mean, std = image_mean_std(config)
    size = size or native_image_size(config)
    return DPTImageProcessorPil(
        size={"height": size, "width": size},
        keep_aspect_ratio=True,
        ensure_multiple_of=patch_size_of(config),
        resample=3,  # PIL bicubic
        image_mean=list(mean),
        image_std=list(std),
    )


def backbone_config(family: str, **kwargs) -> PreTrainedConfig:
    """The transformers config of `family` with its reference architecture's settings; `kwargs` override them.

    The MLP is 4x `hidden_size` wide unless `intermediate_size` (or, for the DINOv2 and RADIO
    configs, `mlp_ratio`) is given.
    """
    if family not in _FAMILIES:
        raise ValueError(f"unknown backbone family {family!r}; choose one of {FAMILIES}")
    model_type, defaults = _FAMILIES[family]
    values = {**defaults, **kwargs}
    config_class = type(AutoConfig.for_model(model_type))
    if hasattr(config_class, "intermediate_size") and "intermediate_size" not in kwargs:
        values["intermediate_size"] = 4 * values.get("hidden_size", config_class.hidden_size)
    return config_class(**values)


def preset_kwargs(name: str) -> dict:
    """The config keyword arguments of a preset (a key of `PRESETS`)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    family, sizes = PRESETS[name]
    return {**_FAMILIES[family][1], **sizes}


def preset_config(name: str, **kwargs) -> PreTrainedConfig:
    """The backbone config of a preset (a key of `PRESETS`)."""
    kwargs = {**preset_kwargs(name), **kwargs}
    return backbone_config(PRESETS[name][0], **kwargs)


def tiny_config(family: str, **kwargs) -> PreTrainedConfig:
    """A tiny config of `family` for tests: width 32, 2 layers, 2 heads, a 4x4 native patch grid."""
    if family not in _FAMILIES:
        raise ValueError(f"unknown backbone family {family!r}; choose one of {FAMILIES}")
    model_type, defaults = _FAMILIES[family]
    patch = kwargs.get("patch_size", defaults["patch_size"])
    sizes = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
    if model_type == "siglip2_vision_model":
        sizes["num_patches"] = 16
    else:
        sizes["image_size"] = 4 * patch
    if model_type == "radio":
        sizes["max_img_size"] = 4 * patch  # RADIO's table holds max_img_size / patch positions per side
    return backbone_config(family, **{**sizes, **kwargs})


def resample_position_table(table: torch.Tensor, grid: tuple[int, int], num_prefix_rows: int = 1) -> torch.Tensor:
    """Resample a position table `[1, P + n*n, C]` (P prefix rows first) to a patch grid `(h, w)` as timm does.

    Returns `[1, P + h*w, C]`: the prefix rows unchanged, the `n x n` patch rows resampled
    bicubically with antialias in float32 (timm's `resample_abs_pos_embed`).
    """
    num_patches, dim = table.shape[1] - num_prefix_rows, table.shape[2]
    side = math.isqrt(num_patches)
    if (side, side) == tuple(grid):
        return table
    patch_table = table[:, num_prefix_rows:].reshape(1, side, side, dim).permute(0, 3, 1, 2).float()
    patch_table = F.interpolate(patch_table, size=tuple(grid), mode="bicubic", antialias=True)
    patch_table = patch_table.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], dim).to(table.dtype)
    return torch.cat([table[:, :num_prefix_rows], patch_table], dim=1)


def _position_table(embeddings: torch.nn.Module) -> torch.Tensor:
    """An embeddings module's table `[1, rows, C]`: an nn.Embedding (CLIP, SigLIP, AIMv2) or a Parameter."""
    if hasattr(embeddings, "position_embedding"):
        return embeddings.position_embedding.weight.unsqueeze(0)
    return embeddings.position_embeddings


def _patch_of(embeddings: torch.nn.Module) -> int:
    patch = embeddings.patch_size
    return patch[0] if isinstance(patch, (list, tuple)) else patch


def _interpolate_pos_encoding_like_timm(self, embeddings: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Replaces the `interpolate_pos_encoding` method of a transformers embeddings module (installed once)."""
    table = _position_table(self)
    # A table is a square patch grid after 0 (SigLIP, I-JEPA) or 1 (CLS) rows; 1 + n*n is never a square.
    num_prefix_rows = 0 if math.isqrt(table.shape[1]) ** 2 == table.shape[1] else 1
    patch = _patch_of(self)
    return resample_position_table(table, (height // patch, width // patch), num_prefix_rows)


def _aimv2_embeddings_forward_like_timm(self, pixel_values: torch.Tensor) -> torch.Tensor:
    """Replaces `Aimv2VisionEmbeddings.forward` (installed once): its table resampled as timm does at any size."""
    hidden_states = self.rms_norm(self.patch_embed(pixel_values).flatten(2).transpose(1, 2))
    patch = _patch_of(self)
    grid = (pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch)
    return hidden_states + resample_position_table(self.position_embedding.weight.unsqueeze(0), grid, num_prefix_rows=0)


def _installed(model: PreTrainedModel) -> types.FunctionType | None:
    """The function `prepare_backbone` installs on this model's embeddings, or None when it installs none."""
    adapter = adapter_of(model.config)
    if adapter.positions == "timm":
        return _interpolate_pos_encoding_like_timm
    if adapter.positions == "aimv2" and not model.config.is_native:  # native AIMv2 builds sin-cos for every size
        return _aimv2_embeddings_forward_like_timm
    return None


def _is_prepared(model: PreTrainedModel) -> bool:
    adapter = adapter_of(model.config)
    if any(getattr(model.config, name) != value for name, value in adapter.runtime_config.items()):
        return False
    return getattr(model, "_fit3d_prepared", False)


def _last_block_tokens(model: PreTrainedModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """The last block's tokens `[B, P + h*w, C]` (before the final norm) for images `[B, 3, H, W]`."""
    outputs = model(**adapter_of(model.config).model_inputs(model, pixel_values), output_hidden_states=True)
    return outputs.hidden_states[-1]


def prepare_backbone(model: PreTrainedModel) -> PreTrainedModel:
    """Make `model` read features as FiT3D does (in place, idempotent); returns it.

    Installs timm's position resampling on the embeddings of the families with a position table
    (`BackboneAdapter.positions`) and sets the adapter's `runtime_config` (ViTMAE: `mask_ratio`
    0, every patch kept). Then it reads the tokens of one patch: transformers installs its
    hidden-state hooks on the first such call, under a lock `torch.compile` cannot trace, so a
    prepared model compiles with `fullgraph=True`. `build_backbone` and `load_backbone` call it;
    call it yourself on a model loaded with plain transformers (or built on the meta device, where
    nothing can run: `from_pretrained` of a FiT3DModel) before compiling it.
    """
    adapter = adapter_of(model.config)
    for name, value in adapter.runtime_config.items():
        setattr(model.config, name, value)
    function = _installed(model)
    if function is _interpolate_pos_encoding_like_timm:
        model.embeddings.interpolate_pos_encoding = types.MethodType(function, model.embeddings)
    elif function is _aimv2_embeddings_forward_like_timm:
        model.embeddings.forward = types.MethodType(function, model.embeddings)
    weight = next(p for p in model.parameters() if p.is_floating_point())
    if weight.device.type != "meta":
        patch, training = patch_size_of(model.config), model.training
        with torch.no_grad():  # in eval mode: nothing random is drawn (dropout, DINOv3's RoPE jitter)
            _last_block_tokens(model.eval(), weight.new_zeros(1, 3, patch, patch))
        model.train(training)
        model._fit3d_prepared = True
    return model


def _model_class(adapter: BackboneAdapter) -> type[PreTrainedModel]:
    return getattr(transformers, adapter.model_class)


def build_backbone(config: PreTrainedConfig) -> PreTrainedModel:
    """A randomly initialised transformers backbone of the config's model type, prepared (`prepare_backbone`).

    The adapter's `build_config` (e.g. no pooling head) is set on `config` first.
    """
    adapter = adapter_of(config)
    for name, value in adapter.build_config.items():
        setattr(config, name, value)
    kwargs = {"add_pooling_layer": False} if "pooler." in adapter.dropped_modules else {}
    return prepare_backbone(_model_class(adapter)(config, **kwargs))


def _vision_config_of(config: PreTrainedConfig) -> PreTrainedConfig | None:
    """The supported vision tower's config of a composite (image-text) config, e.g. a SiglipConfig's `vision_config`."""
    vision_config = getattr(config, "vision_config", None)
    return vision_config if getattr(vision_config, "model_type", None) in ADAPTERS else None


def load_backbone(path: str, **kwargs) -> PreTrainedModel:
    """Load a saved transformers backbone (a local folder or Hub id) of a supported type, prepared.

    A composite image-text model (CLIP, SigLIP, SigLIP 2, AIMv2, MetaCLIP 2) loads as its vision
    tower. `kwargs` go to `from_pretrained` (e.g. `dtype=torch.bfloat16`). A checkpoint that
    leaves weights of the model unfilled is an error, not a silently random model.
    """
    config = AutoConfig.from_pretrained(path)
    if config.model_type == "fit3d":
        raise ValueError(
            f"{path} holds a FiT3DModel (an original and a fine-tuned backbone), not a backbone: load it with "
            "FiT3DModel.from_pretrained, or save one of its backbones (model.finetuned.save_pretrained) and pass that"
        )
    if config.model_type not in ADAPTERS and _vision_config_of(config) is not None:
        config = _vision_config_of(config)
        # The tower's weights are `vision_model.*` in the composite checkpoint (not every class strips the prefix).
        kwargs.setdefault("key_mapping", {r"^vision_model\.": ""})
    adapter = adapter_of(config)
    if "pooler." in adapter.dropped_modules:
        kwargs["add_pooling_layer"] = False
    model_class = _model_class(adapter)
    model, info = model_class.from_pretrained(path, output_loading_info=True, **{**adapter.build_config, **kwargs})
    if info["missing_keys"]:
        # transformers would fill them with random values and only log a warning
        missing = sorted(info["missing_keys"])
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ValueError(
            f"{path}: its checkpoint lacks {len(missing)} weight(s) of the model ({shown}); transformers would fill "
            f"them with random values. Pass a folder whose weights match its config.json ({model_class.__name__})"
        )
    return prepare_backbone(model)


def backbone_state_dict(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """`model.state_dict()` without the modules FiT3D does not build (a pooler or pooling head): what `build_backbone` holds."""
    dropped = adapter_of(model.config).dropped_modules
    return {key: value for key, value in model.state_dict().items() if not key.startswith(dropped)}


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


def final_norm_of(model: PreTrainedModel) -> torch.nn.Module:
    """The norm a backbone applies to every token after its last block (identity for a family without one)."""
    name = adapter_of(model.config).final_norm
    return torch.nn.Identity() if name is None else getattr(model, name)


def _summary_token(tokens: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """`[B, C]`: the first prefix token (CLS), or the mean patch token of a family without prefix tokens."""
    return tokens[:, 0] if num_prefix else tokens.mean(dim=1)


def extract_features(
    model: PreTrainedModel,
    pixel_values: torch.Tensor,
    output_hidden_states: bool = False,
    output_attentions: bool = False,
    **kwargs,
) -> BackboneFeatures:
    """Last-block features of a transformers backbone of any supported type, or a FiT3DModel's assembled ones.

    Args:
        model: a backbone of a type in `ADAPTERS` (built by `build_backbone`, loaded by
            `load_backbone` or with plain transformers: it is then prepared on first use), or a
            `FiT3DModel` (its features assembled as `config.assembly` says).
        pixel_values: `[B, 3, H, W]`, normalised (`normalize`); H and W multiples of the patch size.
        output_hidden_states: also return every layer's tokens (`BackboneFeatures.hidden_states`).
        output_attentions: also return every block's attention weights (needs eager attention).
        kwargs: passed on to the backbone's forward (transformers' `TransformersKwargs`).

    Returns:
        `BackboneFeatures` with `feature_maps`/`unnormed_feature_maps` `[B, C, H/p, W/p]` and
        `cls_token`/`unnormed_cls_token` `[B, C]`.
    """
    if getattr(model.config, "model_type", None) == "fit3d":
        return model.backbone_features(pixel_values, output_hidden_states, output_attentions, **kwargs)
    config = model.config
    adapter = adapter_of(config)
    height, width = pixel_values.shape[-2:]
    check_image_size(height, width, config)
    if not _is_prepared(model):  # a model loaded with plain transformers resamples positions differently
        prepare_backbone(model)
    inputs = adapter.model_inputs(model, pixel_values)
    outputs = model(**inputs, output_hidden_states=True, output_attentions=output_attentions, **kwargs)
    unnormed = outputs.hidden_states[-1]
    normed = final_norm_of(model)(unnormed)
    patch = patch_size_of(config)
    grid, num_prefix = (height // patch, width // patch), adapter.num_prefix_tokens(config)
    return BackboneFeatures(
        feature_maps=_tokens_to_map(normed, num_prefix, grid),
        cls_token=_summary_token(normed, num_prefix),
        unnormed_feature_maps=_tokens_to_map(unnormed, num_prefix, grid),
        unnormed_cls_token=_summary_token(unnormed, num_prefix),
        hidden_states=tuple(outputs.hidden_states) if output_hidden_states else None,
        attentions=tuple(outputs.attentions) if output_attentions else None,
    )
