"""FiT3D: a frozen 2D backbone and its 3D-aware fine-tuned copy, features assembled (concat by default).

Yue et al., "Improving 2D Feature Representations by 3D-Aware Fine-Tuning", ECCV 2024.
"""

import copy
import os
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from .backbones import BackboneFeatures, backbone_state_dict, build_backbone, extract_features, family_of, load_backbone
from .configuration_fit3d import FiT3DConfig


@dataclass
class FiT3DModelOutput(ModelOutput):
    """Output of [`FiT3DModel`].

    Args:
        last_hidden_state (`torch.FloatTensor` of shape `[B, h*w, C_out]`):
            The assembled patch features as tokens, row-major over the patch grid.
        feature_maps (`torch.FloatTensor` of shape `[B, C_out, h, w]`):
            The assembled patch features (`C_out` = 2 Cb for `"concat"`, Cb otherwise).
        original_feature_maps (`torch.FloatTensor` of shape `[B, Cb, h, w]`):
            Patch features of the frozen original backbone.
        finetuned_feature_maps (`torch.FloatTensor` of shape `[B, Cb, h, w]`):
            Patch features of the fine-tuned backbone.
        cls_token (`torch.FloatTensor` of shape `[B, Cb]`):
            The original backbone's CLS token after its final norm.
    """

    last_hidden_state: torch.FloatTensor | None = None
    feature_maps: torch.FloatTensor | None = None
    original_feature_maps: torch.FloatTensor | None = None
    finetuned_feature_maps: torch.FloatTensor | None = None
    cls_token: torch.FloatTensor | None = None


class FiT3DPreTrainedModel(PreTrainedModel):
    config_class = FiT3DConfig
    base_model_prefix = "fit3d"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module: torch.nn.Module) -> None:
        # Each backbone class knows how to initialise its own modules.
        self.finetuned._init_weights(module)


class FiT3DModel(FiT3DPreTrainedModel):
    """The frozen `original` backbone and the `finetuned` one (plain transformers models of one family).

    `forward(pixel_values [B, 3, H, W])` -> `FiT3DModelOutput`; H and W must be multiples of the patch
    size. Features are each backbone's last block after its final norm, prefix tokens dropped.
    """

    def __init__(self, config: FiT3DConfig):
        super().__init__(config)
        self.original = build_backbone(config.backbone_config)
        self.finetuned = build_backbone(config.backbone_config)
        self.original.requires_grad_(False)
        self.post_init()

    @classmethod
    def from_backbone(cls, backbone: PreTrainedModel | str | os.PathLike, assembly: str = "concat") -> "FiT3DModel":
        """Pair a backbone with a copy of itself for fine-tuning; both start from its weights.

        Args:
            backbone: a transformers backbone of a supported type (`backbones.ADAPTERS`), or a
                local folder (or Hub id) holding one.
            assembly: see `FiT3DConfig.assembly`.
        """
        if isinstance(backbone, (str, os.PathLike)):
            backbone = load_backbone(str(backbone))
        family_of(backbone.config)  # a clear error for a model that is no FiT3D backbone
        config = FiT3DConfig(backbone_config=copy.deepcopy(backbone.config), assembly=assembly)
        model = cls(config).to(backbone.dtype)
        # A backbone may carry modules FiT3D does not build (a pooler, a pooling head); nothing else may differ.
        state = backbone_state_dict(backbone)
        for target in (model.original, model.finetuned):
            target.load_state_dict(state, strict=True)
        return model.to(backbone.device)

    @classmethod
    def from_pretrained(cls, *args, **kwargs) -> "FiT3DModel":
        model = super().from_pretrained(*args, **kwargs)
        model.original.requires_grad_(False)  # loading makes fresh Parameters, trainable by default
        return model

    def train(self, mode: bool = True) -> "FiT3DModel":
        super().train(mode)
        self.original.eval()  # frozen: never in training mode
        return self

    def assemble(self, original: torch.Tensor, finetuned: torch.Tensor) -> torch.Tensor:
        """Combine `[B, Cb, ...]` features of the two backbones as `config.assembly` says (dim 1)."""
        if self.config.assembly == "concat":
            return torch.cat([original, finetuned], dim=1)
        if self.config.assembly == "add":
            return original + finetuned
        return original if self.config.assembly == "original" else finetuned

    def _both_features(self, pixel_values: torch.Tensor) -> tuple[BackboneFeatures, BackboneFeatures]:
        with torch.no_grad():
            original = extract_features(self.original, pixel_values)
        return original, extract_features(self.finetuned, pixel_values)

    def backbone_features(self, pixel_values: torch.Tensor) -> BackboneFeatures:
        """`BackboneFeatures` of both backbones, every field assembled (concat: 2 Cb channels)."""
        original, finetuned = self._both_features(pixel_values)
        return BackboneFeatures(**{key: self.assemble(original[key], finetuned[key]) for key in original.keys()})

    def forward(self, pixel_values: torch.Tensor) -> FiT3DModelOutput:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `[B, 3, H, W]`):
                Normalised images (`AutoImageProcessor` or `fit3d_hf.backbones.normalize`).
        """
        original, finetuned = self._both_features(pixel_values)
        feature_maps = self.assemble(original.feature_maps, finetuned.feature_maps)
        return FiT3DModelOutput(
            last_hidden_state=feature_maps.flatten(2).transpose(1, 2),
            feature_maps=feature_maps,
            original_feature_maps=original.feature_maps,
            finetuned_feature_maps=finetuned.feature_maps,
            cls_token=original.cls_token,
        )


__all__ = ["FiT3DModel", "FiT3DModelOutput", "FiT3DPreTrainedModel"]

# save_pretrained() writes `auto_map` and copies the modeling files, for trust_remote_code loading.
FiT3DModel.register_for_auto_class("AutoModel")
