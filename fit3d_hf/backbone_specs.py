"""`load_backbone_spec`: the one way every stage turns a `--backbone` value into a model and a name.

Specs:
    "embedded"          the package's small SimMIM-pretrained ViT (`fit3d_hf.embedded`)
    "tiny:<family>"     a tiny randomly initialised backbone of a family (`backbones.tiny_config`,
                        `backbones.FAMILIES`: dinov2, dinov3, siglip2, radio, ...)
    "random:<preset>"   a randomly initialised backbone of a published size (`backbones.preset_config`,
                        `backbones.PRESETS`: dinov2_giant, dinov3_large, aimv2_1b, ...)
    a folder or Hub id  a saved transformers model of a supported type (`backbones.ADAPTERS`; an
                        image-text model loads as its vision tower; `backbones.load_backbone`)
    a FiT3D model       (a folder written by `fit3d finetune` or `fit3d convert`, or its Hub id): its
                        fine-tuned backbone, named "<spec> (fine-tuned backbone)". A second round of
                        FiT3D lifts, renders and fine-tunes the backbone the first round produced.

Random weights are drawn from `seed`, so every process and every stage given the same spec and
seed builds the same backbone. The name returned is recorded in every artifact made with it. A
saved model whose checkpoint leaves any weight of the backbone missing is an error (transformers
would initialise it randomly and only log a warning).
"""

import os

import torch
from transformers import AutoConfig, PreTrainedModel

from . import backbones
from .errors import InputError

BACKBONE_SPEC_HELP = (
    "Backbone: 'embedded' (the package's small pre-trained ViT), 'tiny:<family>' or 'random:<preset>' "
    "(randomly initialised, seeded by --seed), a transformers model folder / Hub id of a supported type "
    "(DINOv2, DINOv3, CLIP, SigLIP, SigLIP 2, MAE, I-JEPA, AIMv2, MetaCLIP 2, RADIO, ...; docs/backbones.md), "
    "or a FiT3D model folder (its fine-tuned backbone: a second round)."
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
            model, name = _load_saved(spec)
    model.config._name_or_path = name
    return model.eval(), name


def _load_saved(spec: str) -> tuple[PreTrainedModel, str]:
    """A saved backbone (a folder or Hub id), or a FiT3D model's fine-tuned backbone, with every weight loaded."""
    from .provenance import check_source, hub_error

    check_source(spec, "backbone")
    try:
        config = AutoConfig.from_pretrained(spec)
    except OSError as error:
        raise hub_error(spec, "backbone", error) from error
    except ValueError as error:
        raise InputError(f"backbone {spec}: its config.json cannot be read ({error})") from error
    if config.model_type == "fit3d":
        return load_fit3d_folder(spec, "backbone").finetuned, f"{spec} (fine-tuned backbone)"
    try:
        backbones.family_of(config)
    except ValueError as error:
        raise InputError(f"backbone {spec}: {error}") from error
    try:
        return backbones.load_backbone(spec), spec
    except ValueError as error:  # weights the checkpoint leaves unfilled
        raise InputError(str(error)) from error


def load_fit3d_folder(path: str, what: str = "model"):
    """A FiT3DModel folder (or Hub id) with every weight loaded, in eval mode, the original half frozen.

    Args:
        path: the folder (from `fit3d finetune` or `fit3d convert`) or Hub id.
        what: the input, as errors name it (e.g. "--model").

    Raises:
        InputNotFoundError: nothing at `path`.
        InputError: not a FiT3D model (naming its model type), unreadable weights, or weights missing.
    """
    from safetensors import SafetensorError

    from .modeling_fit3d import FiT3DModel
    from .provenance import check_source, hub_error

    check_source(path, what)
    try:
        config = AutoConfig.from_pretrained(path)
    except OSError as error:
        raise hub_error(path, what, error) from error
    except ValueError as error:
        raise InputError(f"{what} {path}: its config.json cannot be read ({error})") from error
    if config.model_type != "fit3d":
        raise InputError(
            f"{what} {path} is a {config.model_type!r} model, not a FiT3D model folder (the output of `fit3d finetune` "
            "or `fit3d convert`); a plain backbone is named with --backbone / --baseline instead"
        )
    try:
        model, info = FiT3DModel.from_pretrained(path, output_loading_info=True)
    except (OSError, SafetensorError) as error:
        raise InputError(f"{what} {path}: its weights cannot be read ({error}); a file may be truncated") from error
    _check_loaded(path, info)
    model.original.requires_grad_(False)
    return model.eval()


def _check_loaded(spec: str, loading_info: dict) -> None:
    missing = sorted(loading_info.get("missing_keys") or [])
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise InputError(
            f"{spec}: its checkpoint lacks {len(missing)} weight(s) of the model ({shown}); transformers "
            "would fill them with random values. Pass a folder whose weights match its config.json"
        )


def backbone_name(model: PreTrainedModel) -> str:
    """The name recorded in artifacts for `model`: what `load_backbone_spec` named it, else its model type."""
    return getattr(model.config, "_name_or_path", "") or model.config.model_type


def hub_id_of(spec: str) -> str | None:
    """The Hub model id a spec (or a recorded name) names, e.g. for a card's `base_model`; None for a
    local folder, a built-in spec ('embedded', 'tiny:...', 'random:...') or an empty name."""
    return spec if spec.count("/") == 1 and ":" not in spec and " " not in spec and not os.path.exists(spec) else None
