"""`load_backbone_spec`: the one way every stage turns a `--backbone` value into a model and a name.

Specs:
    "embedded"          the package's small SimMIM-pretrained ViT (`fit3d_hf.embedded`)
    "tiny:<family>"     a tiny randomly initialised backbone of a family (`backbones.tiny_config`,
                        `backbones.FAMILIES`: dinov2, dinov3, siglip2, radio, ...)
    "random:<preset>"   a randomly initialised backbone of a published size (`backbones.preset_config`,
                        `backbones.PRESETS`: dinov2_giant, dinov3_large, aimv2_1b, ...)
    a folder or Hub id  a saved transformers model of a supported type (`backbones.ADAPTERS`; an
                        image-text model loads as its vision tower; `backbones.load_backbone`)

Random weights are drawn from `seed`, so every process and every stage given the same spec and
seed builds the same backbone. The name returned is recorded in every artifact made with it.
"""

import os

import torch
from transformers import PreTrainedModel

from . import backbones

BACKBONE_SPEC_HELP = (
    "Backbone: 'embedded' (the package's small pre-trained ViT), 'tiny:<family>' or 'random:<preset>' "
    "(randomly initialised, seeded by --seed), or a transformers model folder / Hub id of a supported type "
    "(DINOv2, DINOv3, CLIP, SigLIP, SigLIP 2, MAE, I-JEPA, AIMv2, MetaCLIP 2, RADIO, ...; docs/backbones.md)."
)


def load_backbone_spec(spec: str, seed: int = 0) -> tuple[PreTrainedModel, str]:
    """The backbone a spec names, in eval mode, and the name recorded in artifacts.

    Args:
        spec: see the module docstring.
        seed: seeds the weights of "tiny:" and "random:" backbones.

    Returns:
        (model, name); `model.config._name_or_path` is set to the name.
    """
    if spec == "embedded":
        from .embedded import EMBEDDED_BACKBONE_NAME, load_embedded_backbone

        model, name = load_embedded_backbone(), EMBEDDED_BACKBONE_NAME
    else:
        kind, _, value = spec.partition(":")
        if kind in ("tiny", "random") and value:
            config = backbones.tiny_config(value) if kind == "tiny" else backbones.preset_config(value)
            # Every process must build the same random weights.
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                model = backbones.build_backbone(config)
            name = f"{spec} (random init, seed {seed})"
        else:
            model, name = backbones.load_backbone(spec), spec
    model.config._name_or_path = name
    return model.eval(), name


def backbone_name(model: PreTrainedModel) -> str:
    """The name recorded in artifacts for `model`: what `load_backbone_spec` named it, else its model type."""
    return getattr(model.config, "_name_or_path", "") or model.config.model_type


def hub_id_of(spec: str) -> str | None:
    """The Hub model id a spec (or a recorded name) names, e.g. for a card's `base_model`; None for a
    local folder, a built-in spec ('embedded', 'tiny:...', 'random:...') or an empty name."""
    return spec if spec.count("/") == 1 and ":" not in spec and " " not in spec and not os.path.exists(spec) else None
