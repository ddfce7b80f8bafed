"""FiT3D: a frozen 2D backbone and its 3D-aware fine-tuned copy, features assembled (concat by default).

Yue et al., "Improving 2D Feature Representations by 3D-Aware Fine-Tuning", ECCV 2024.

`FiT3DModel` (AutoModel) returns the assembled last-layer features; `FiT3DBackbone` (AutoBackbone)
returns assembled intermediate layers for dense heads such as `DPTForDepthEstimation` or
`UperNetForSemanticSegmentation`. Both hold the same two copies under the same names, so either loads
any saved FiT3D folder.
"""

import copy
import os
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel
from transformers.backbone_utils import BackboneMixin
from transformers.modeling_outputs import BackboneOutput, BaseModelOutputWithPooling
from transformers.utils.output_capturing import (
    resolve_hidden_states_indices,
    selected_hidden_states,
)

from .backbones import (
    BackboneFeatures,
    backbone_state_dict,
    build_backbone,
    extract_features,
    family_of,
    final_norm_of,
    hidden_size_of,
    load_backbone,
    num_prefix_tokens_of,
    patch_size_of,
    prepare_backbone,
)
from .configuration_fit3d import FiT3DConfig


@dataclass
class FiT3DModelOutput(BaseModelOutputWithPooling):
    """Output of [`FiT3DModel`]. The features are assembled as `config.assembly` says (`C_out` = 2 Cb for
    `"concat"`, Cb otherwise); `hidden_states` and `attentions` are one copy's own activations (`P` prefix tokens).

    Args:
        last_hidden_state (`torch.FloatTensor` of shape `[B, h*w, C_out]`):
            The assembled patch features as tokens, row-major over the patch grid (no prefix tokens).
        pooler_output (`torch.FloatTensor` of shape `[B, C_out]`):
            The assembled CLS token after each backbone's final norm.
        hidden_states (`tuple[torch.FloatTensor]`, *optional*, `num_hidden_layers + 1` of shape `[B, P + h*w, Cb]`):
            With `output_hidden_states`: the fine-tuned backbone's own hidden states (the embeddings' output,
            then every block's, before the final norm, prefix tokens included). An index list for
            `output_hidden_states` keeps those entries and sets the others to None.
        attentions (`tuple[torch.FloatTensor]`, *optional*, `num_hidden_layers` of shape `[B, heads, P + h*w, P + h*w]`):
            With `output_attentions` (eager attention): the fine-tuned backbone's own attention weights.
        feature_maps (`torch.FloatTensor` of shape `[B, C_out, h, w]`):
            The assembled patch features.
        original_feature_maps (`torch.FloatTensor` of shape `[B, Cb, h, w]`):
            Patch features of the frozen original backbone.
        finetuned_feature_maps (`torch.FloatTensor` of shape `[B, Cb, h, w]`):
            Patch features of the fine-tuned backbone.
        cls_token (`torch.FloatTensor` of shape `[B, Cb]`):
            The original backbone's CLS token after its final norm.
        original_hidden_states (`tuple[torch.FloatTensor]`, *optional*):
            As `hidden_states`, of the frozen original backbone.
        original_attentions (`tuple[torch.FloatTensor]`, *optional*):
            As `attentions`, of the frozen original backbone.
    """

    feature_maps: torch.FloatTensor | None = None
    original_feature_maps: torch.FloatTensor | None = None
    finetuned_feature_maps: torch.FloatTensor | None = None
    cls_token: torch.FloatTensor | None = None
    original_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    original_attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class FiT3DBackboneOutput(BackboneOutput):
    """Output of [`FiT3DBackbone`].

    Args:
        feature_maps (`tuple[torch.FloatTensor]`, one `[B, C_out, h, w]` per stage in `config.out_features`):
            Each stage's normed patch features of both copies, assembled as `config.assembly` says.
        hidden_states, attentions, original_hidden_states, original_attentions:
            As in [`FiT3DModelOutput`]: the fine-tuned copy's own, then the original's.
    """

    original_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    original_attentions: tuple[torch.FloatTensor, ...] | None = None


class FiT3DPreTrainedModel(PreTrainedModel):
    """The two copies, `original` (frozen, run without gradient, never in training mode) and `finetuned`:
    plain transformers backbones of one family, built from `config.backbone_config`."""

    config_class = FiT3DConfig
    base_model_prefix = "fit3d"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def __init__(self, config: FiT3DConfig):
        super().__init__(config)
        self.original = build_backbone(config.backbone_config)
        self.finetuned = build_backbone(config.backbone_config)
        self.original.requires_grad_(False)

    def _init_weights(self, module: torch.nn.Module) -> None:
        # Each backbone class knows how to initialise its own modules.
        self.finetuned._init_weights(module)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        loaded = super().from_pretrained(*args, **kwargs)
        # `output_loading_info=True` returns `(model, loading_info)`.
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        model.original.requires_grad_(False)  # loading makes fresh Parameters, trainable by default
        # Built on the meta device, the copies could not be fully prepared (`prepare_backbone`'s first
        # call installs transformers' hooks): do it now, so the loaded model compiles with fullgraph.
        for backbone in (model.original, model.finetuned):
            prepare_backbone(backbone)
        return loaded

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        # Either class loads any FiT3D folder, so both Auto classes go into `auto_map` whichever is saved.
        self.config.auto_map = {
            **getattr(self.config, "auto_map", {}),
            "AutoModel": "modeling_fit3d.FiT3DModel",
            "AutoBackbone": "modeling_fit3d.FiT3DBackbone",
        }
        super().save_pretrained(save_directory, *args, **kwargs)

    def train(self, mode: bool = True):
        super().train(mode)
        self.original.eval()  # frozen: never in training mode
        return self

    def get_input_embeddings(self) -> torch.nn.Module:
        """The fine-tuned copy's patch embedding: the trainable input layer (PEFT, `enable_input_require_grads`)."""
        return self.finetuned.get_input_embeddings()

    def assemble(self, original: torch.Tensor, finetuned: torch.Tensor) -> torch.Tensor:
        """Combine `[B, Cb, ...]` features of the two backbones as `config.assembly` says (dim 1)."""
        if self.config.assembly == "concat":
            return torch.cat([original, finetuned], dim=1)
        if self.config.assembly == "add":
            return original + finetuned
        return original if self.config.assembly == "original" else finetuned

    def _both_features(
        self, pixel_values: torch.Tensor, output_hidden_states: bool = False, output_attentions: bool = False, **kwargs
    ) -> tuple[BackboneFeatures, BackboneFeatures]:
        with torch.no_grad():
            original = extract_features(self.original, pixel_values, output_hidden_states, output_attentions, **kwargs)
        return original, extract_features(self.finetuned, pixel_values, output_hidden_states, output_attentions, **kwargs)

    def _selected(self, features: BackboneFeatures, output_hidden_states: bool | int | list[int]) -> tuple | None:
        """A copy's `hidden_states` as `output_hidden_states` asks: None, all, or the indexed ones (None elsewhere)."""
        if not output_hidden_states:
            return None
        selected = selected_hidden_states(output_hidden_states)
        if selected is None:
            return features.hidden_states
        kept = resolve_hidden_states_indices(self, selected, num_hidden_states=len(features.hidden_states))
        return tuple(state if index in kept else None for index, state in enumerate(features.hidden_states))

    def _output_flags(self, output_hidden_states, output_attentions, return_dict) -> tuple:
        """The forward arguments, or the config's values where they are None (transformers' convention)."""
        return (
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states,
            self.config.output_attentions if output_attentions is None else output_attentions,
            self.config.return_dict if return_dict is None else return_dict,
        )


class FiT3DModel(FiT3DPreTrainedModel):
    """The frozen `original` backbone and the `finetuned` one, features assembled as `config.assembly` says.

    `forward(pixel_values [B, 3, H, W])` -> `FiT3DModelOutput`; H and W must be multiples of the patch
    size. Features are each backbone's last block after its final norm, prefix tokens dropped.
    """

    def __init__(self, config: FiT3DConfig):
        super().__init__(config)
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

    def backbone_features(
        self, pixel_values: torch.Tensor, output_hidden_states: bool = False, output_attentions: bool = False, **kwargs
    ) -> BackboneFeatures:
        """What `backbones.extract_features` returns for a FiT3DModel: both backbones' features, each assembled
        (concat: 2 Cb channels); `hidden_states` and `attentions` are the fine-tuned copy's, as in `forward`."""
        original, finetuned = self._both_features(pixel_values, output_hidden_states, output_attentions, **kwargs)
        maps = ("feature_maps", "cls_token", "unnormed_feature_maps", "unnormed_cls_token")
        assembled = {key: self.assemble(original[key], finetuned[key]) for key in maps}
        return BackboneFeatures(**assembled, hidden_states=finetuned.hidden_states, attentions=finetuned.attentions)

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | int | list[int] | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> FiT3DModelOutput | tuple:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `[B, 3, H, W]`):
                Normalised images (`AutoImageProcessor` or `fit3d_hf.backbones.normalize`).
            output_hidden_states (`bool` or `list[int]`, *optional*):
                Return both copies' hidden states (all, or those at the given indices). Defaults to
                `config.output_hidden_states`.
            output_attentions (`bool`, *optional*):
                Return both copies' attentions (needs `attn_implementation="eager"`). Defaults to
                `config.output_attentions`.
            return_dict (`bool`, *optional*):
                Return a `FiT3DModelOutput` rather than a tuple. Defaults to `config.return_dict`.
            kwargs:
                Passed on to both backbones' forward, as transformers models pass their `TransformersKwargs`.
        """
        output_hidden_states, output_attentions, return_dict = self._output_flags(
            output_hidden_states, output_attentions, return_dict
        )
        original, finetuned = self._both_features(pixel_values, bool(output_hidden_states), output_attentions, **kwargs)
        feature_maps = self.assemble(original.feature_maps, finetuned.feature_maps)
        output = FiT3DModelOutput(
            last_hidden_state=feature_maps.flatten(2).transpose(1, 2),
            pooler_output=self.assemble(original.cls_token, finetuned.cls_token),
            hidden_states=self._selected(finetuned, output_hidden_states),
            attentions=finetuned.attentions,
            feature_maps=feature_maps,
            original_feature_maps=original.feature_maps,
            finetuned_feature_maps=finetuned.feature_maps,
            cls_token=original.cls_token,
            original_hidden_states=self._selected(original, output_hidden_states),
            original_attentions=original.attentions,
        )
        return output if return_dict else output.to_tuple()


class FiT3DBackbone(BackboneMixin, FiT3DPreTrainedModel):
    """FiT3D as a transformers backbone (`AutoBackbone`) for dense heads.

    Stage `"stem"` is the patch embeddings, `"stageN"` block N's output (`config.stage_names`). Each stage in
    `config.out_features` is, for both copies, that layer's tokens after the backbone's final norm with the
    prefix tokens dropped (the official `get_intermediate_layers(norm=True, reshape=True)`), assembled as
    `config.assembly` says: `feature_maps` are `[B, C_out, H/p, W/p]`. The last stage equals
    `FiT3DModel`'s `feature_maps`. As in `FiT3DModel`, the original copy runs without gradient.
    """

    def __init__(self, config: FiT3DConfig):
        super().__init__(config)
        width = hidden_size_of(config) * (2 if config.assembly == "concat" else 1)
        self.num_features = [width] * len(config.stage_names)
        self.post_init()

    def post_init(self) -> None:
        # Not BackboneMixin's: it installs transformers' output hooks over the whole model, a second time on
        # the copies that `prepare_backbone` already hooked, and their hidden states would be recorded twice.
        FiT3DPreTrainedModel.post_init(self)

    def _stage_map(self, backbone: PreTrainedModel, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Tokens `[B, P + h*w, Cb]` of one layer -> normed patch features `[B, Cb, h, w]`."""
        patches = final_norm_of(backbone)(tokens)[:, num_prefix_tokens_of(self.config) :]
        return patches.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid)

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | int | list[int] | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> FiT3DBackboneOutput | tuple:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `[B, 3, H, W]`):
                Normalised images; H and W multiples of the patch size.
            output_hidden_states, output_attentions, return_dict, kwargs:
                As for [`FiT3DModel.forward`].

        Returns:
            `FiT3DBackboneOutput` with `feature_maps`: one `[B, C_out, H/p, W/p]` per stage in `config.out_features`.
        """
        output_hidden_states, output_attentions, return_dict = self._output_flags(
            output_hidden_states, output_attentions, return_dict
        )
        original, finetuned = self._both_features(pixel_values, True, output_attentions, **kwargs)
        patch = patch_size_of(self.config)
        grid = (pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch)
        feature_maps = []
        for index in self.out_indices:  # hidden_states has one entry per stage name, so indices match
            with torch.no_grad():
                original_map = self._stage_map(self.original, original.hidden_states[index], grid)
            finetuned_map = self._stage_map(self.finetuned, finetuned.hidden_states[index], grid)
            feature_maps.append(self.assemble(original_map, finetuned_map))
        output = FiT3DBackboneOutput(
            feature_maps=tuple(feature_maps),
            hidden_states=self._selected(finetuned, output_hidden_states),
            attentions=finetuned.attentions,
            original_hidden_states=self._selected(original, output_hidden_states),
            original_attentions=original.attentions,
        )
        return output if return_dict else output.to_tuple()


__all__ = ["FiT3DBackbone", "FiT3DBackboneOutput", "FiT3DModel", "FiT3DModelOutput", "FiT3DPreTrainedModel"]

# save_pretrained() writes `auto_map` and copies the modeling files, for trust_remote_code loading.
FiT3DModel.register_for_auto_class("AutoModel")
FiT3DBackbone.register_for_auto_class("AutoBackbone")
