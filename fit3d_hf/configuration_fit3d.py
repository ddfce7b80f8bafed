"""FiT3D model configuration."""

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.backbone_utils import BackboneConfigMixin
from transformers.configuration_utils import SubConfigSpec

from .backbones import FAMILIES, family_of, preset_kwargs

ASSEMBLIES = ("concat", "finetuned", "original", "add")


@strict
class FiT3DConfig(BackboneConfigMixin, PreTrainedConfig):
    r"""
    Configuration of a [`FiT3DModel`]: a frozen original backbone and its 3D-aware fine-tuned copy.

    Args:
        backbone_config (`dict` or `PreTrainedConfig`, *optional*):
            Config of both backbones: a `Dinov2Config` (families `dinov2`, `deit3`), a
            `Dinov2WithRegistersConfig` (`dinov2_reg`), a `CLIPVisionConfig` (`clip`) or a `ViTConfig`
            (`mae`); build one with `fit3d_hf.backbones.backbone_config` / `preset_config`. Defaults to
            DINOv2 ViT-S/14. Its `fit3d_normalization` records the input normalisation both backbones
            were trained with (`backbones.set_normalization`): `"imagenet"` (ImageNet mean/std for every
            family, as the official FiT3D code; converted official checkpoints) or `"family"` (the
            family's own statistics, the default); the saved image processor uses the same.
        assembly (`str`, *optional*, defaults to `"concat"`):
            How the two backbones' patch features make the output: `"concat"` (channels
            `[original, finetuned]`, 2x width, the paper's choice), `"finetuned"`, `"original"` or `"add"`.
        out_features (`list[str]`, *optional*):
            The stages a [`FiT3DBackbone`] returns, among `stage_names`: `"stem"` (the patch embeddings)
            and `"stage1"` ... `"stageN"` (the N blocks). Defaults to the last stage.
        out_indices (`list[int]`, *optional*):
            The same as indices into `stage_names`; give either, or both if they agree.

    Example:

    ```python
    >>> from fit3d_hf import FiT3DConfig, FiT3DModel, backbones
    >>> config = FiT3DConfig(backbone_config=backbones.preset_config("dinov2_small"))
    >>> model = FiT3DModel(config)
    >>> # The official demo's layers 8-11 (0-based blocks) for a dense head through AutoBackbone:
    >>> config = FiT3DConfig(backbone_config=backbones.preset_config("dinov2_small"), out_indices=[9, 10, 11, 12])
    ```"""

    model_type = "fit3d"
    sub_configs_defaults = {
        "backbone_config": SubConfigSpec(config_class=AutoConfig, model_type="dinov2", init_kwargs=preset_kwargs("dinov2_small")),
    }

    backbone_config: dict | PreTrainedConfig | None = None
    assembly: str = "concat"
    _out_features: list[str] | None = None
    _out_indices: list[int] | None = None

    def __post_init__(self, **kwargs):
        # Popped first: the out_* setters need `stage_names`, which needs the resolved backbone config.
        out_features, out_indices = kwargs.pop("out_features", None), kwargs.pop("out_indices", None)
        super().__post_init__(**kwargs)
        self.stage_names = ["stem"] + [f"stage{index}" for index in range(1, self.backbone_config.num_hidden_layers + 1)]
        self.set_output_features_output_indices(out_features=out_features, out_indices=out_indices)

    def validate_architecture(self):
        """Part of `@strict`-powered validation: a known assembly and backbone family."""
        if self.assembly not in ASSEMBLIES:
            raise ValueError(f"assembly must be one of {ASSEMBLIES}, got {self.assembly!r}")
        if family_of(self.backbone_config) not in FAMILIES:
            raise ValueError(f"backbone family must be one of {FAMILIES}")


__all__ = ["FiT3DConfig"]

# save_pretrained() writes `auto_map` and copies this file, for trust_remote_code loading.
FiT3DConfig.register_for_auto_class()
