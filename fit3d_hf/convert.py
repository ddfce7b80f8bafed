"""Convert the official FiT3D checkpoints (timm state dicts) into a FiT3DModel folder.

The released FiT3D models are pairs of timm ViT state dicts: the original backbone and the 3D-aware
fine-tuned one. `convert_checkpoints` maps both onto the transformers classes of `backbones`
(every source key consumed, every target key filled, or a `ConversionError` listing the keys) and
writes a `save_pretrained` folder with safetensors weights, the remote-code files and an image
processor. The folder appears only when everything succeeded. `convert_official` does the same for
a release named as in the official `hubconf.py`, fetching both files through `huggingface_hub`
(`official_files` says which).

The official code normalises every backbone's input with ImageNet's mean/std, so a converted model
records `normalization="imagenet"` (`backbones.set_normalization`) in its config and processor.
"""

import copy
import math
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled
from safetensors import SafetensorError
from safetensors.torch import load_file

from .backbones import (
    build_backbone,
    family_of,
    hidden_size_of,
    make_image_processor,
    patch_size_of,
    preset_config,
    set_normalization,
)
from .configuration_fit3d import FiT3DConfig
from .errors import InputError, InputNotFoundError
from .io import atomic_directory
from .modeling_fit3d import FiT3DModel

# Classifier heads of the CLIP and DeiT-III releases: FiT3D uses patch features only.
DROPPED_KEYS = ("head.weight", "head.bias")

# Per family: block prefix, timm module -> transformers module inside a block, qkv target pattern.
_BLOCK_NAMES = {
    "dinov2": (
        "encoder.layer.{}.",
        {"norm1": "norm1", "norm2": "norm2", "attn.proj": "attention.o_proj", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"},
        "attention.{}_proj",
    ),
    "clip": (
        "encoder.layers.{}.",
        {
            "norm1": "layer_norm1",
            "norm2": "layer_norm2",
            "attn.proj": "self_attn.out_proj",
            "mlp.fc1": "mlp.fc1",
            "mlp.fc2": "mlp.fc2",
        },
        "self_attn.{}_proj",
    ),
    "mae": (
        "layers.{}.",
        {
            "norm1": "layernorm_before",
            "norm2": "layernorm_after",
            "attn.proj": "attention.o_proj",
            "mlp.fc1": "mlp.fc1",
            "mlp.fc2": "mlp.fc2",
        },
        "attention.{}_proj",
    ),
}
_BLOCK_NAMES["dinov2_reg"] = _BLOCK_NAMES["deit3"] = _BLOCK_NAMES["dinov2"]
# timm keeps no position for the prefix tokens of these families; transformers has a CLS row.
_NO_CLS_POSITION = ("dinov2_reg", "deit3")


# The official releases (`hubconf.py` of ywyue/FiT3D): name -> the timm model of the original
# backbone. The fine-tuned weights are `<name>_finetuned.pth` in the Hub repo `FINETUNED_REPO`; the
# original ones are the timm model's weights on the Hub (`timm/<model>`, `TIMM_WEIGHTS_FILE`),
# which `timm.create_model(..., pretrained=True)` loads in the official code. Each name is also a
# `backbones.PRESETS` key.
OFFICIAL_RELEASES = {
    "dinov2_small": "vit_small_patch14_dinov2.lvd142m",
    "dinov2_base": "vit_base_patch14_dinov2.lvd142m",
    "dinov2_reg_small": "vit_small_patch14_reg4_dinov2.lvd142m",
    "clip_base": "vit_base_patch16_clip_384.laion2b_ft_in12k_in1k",
    "mae_base": "vit_base_patch16_224.mae",
    "deit3_base": "deit3_base_patch16_224.fb_in1k",
}
FINETUNED_REPO = "yuanwenyue/FiT3D"
TIMM_WEIGHTS_FILE = "model.safetensors"


class ConversionError(InputError):
    """A checkpoint that does not match the requested family or sizes, or cannot be read."""


class CheckpointsUnavailableError(InputNotFoundError):
    """The files of an official release could neither be downloaded nor found in the Hugging Face cache."""


@dataclass(frozen=True)
class HubFile:
    """One file of a Hub model repository (main branch)."""

    repo_id: str
    filename: str

    @property
    def url(self) -> str:
        return f"https://huggingface.co/{self.repo_id}/resolve/main/{self.filename}"


def official_files(name: str) -> dict[str, HubFile]:
    """The two source files of an official release: `{"original": ..., "finetuned": ...}`."""
    if name not in OFFICIAL_RELEASES:
        raise ValueError(f"unknown official FiT3D release {name!r}; choose one of {sorted(OFFICIAL_RELEASES)}")
    return {
        "original": HubFile(f"timm/{OFFICIAL_RELEASES[name]}", TIMM_WEIGHTS_FILE),
        "finetuned": HubFile(FINETUNED_REPO, f"{name}_finetuned.pth"),
    }


def resolve_official_files(
    name: str,
    roles: tuple[str, ...] = ("original", "finetuned"),
    *,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
) -> dict[str, Path]:
    """Local paths of source files of an official release, downloaded through `huggingface_hub`.

    Files already in the Hugging Face cache (`cache_dir`, default the `HF_HUB_CACHE` one) are used
    as they are; offline (`HF_HUB_OFFLINE=1` or `local_files_only`) only those are. Returns
    `{role: path}` for `roles` (keys of `official_files`).

    Raises:
        CheckpointsUnavailableError: a file is neither downloadable nor cached; the message names
            every such file, its URL and how to provide it.
    """
    files = official_files(name)
    paths, unavailable = {}, []
    for role in roles:
        file = files[role]
        try:
            paths[role] = Path(
                hf_hub_download(file.repo_id, file.filename, cache_dir=cache_dir, local_files_only=local_files_only)
            )
        except (LocalEntryNotFoundError, OfflineModeIsEnabled, HfHubHTTPError) as error:
            unavailable.append((role, file, error))
    if unavailable:
        lines = [f"  {role}: {file.filename} of {file.repo_id} ({file.url})" for role, file, _ in unavailable]
        downloads = " and ".join(f"`hf download {file.repo_id} {file.filename}`" for _, file, _ in unavailable)
        options = " ".join(f"--{role} PATH" for role, _, _ in unavailable)
        raise CheckpointsUnavailableError(
            f"official release {name!r}: these files are neither downloadable here nor in the Hugging Face cache "
            f"({cache_dir or 'HF_HUB_CACHE'}):\n" + "\n".join(lines) + "\n"
            f"Either fetch them into the cache where the Hub is reachable ({downloads}) and copy the cache folder "
            f"here, or download them anywhere and pass the local files ({options}). "
            f"First error: {unavailable[0][2]}"
        )
    return paths


def load_timm_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a timm state dict from `.safetensors` or `.pth`/`.pt`/`.bin` (torch.load, weights_only=True).

    A `{"model": ...}` or `{"state_dict": ...}` wrapper and a `module.` prefix (DDP) are removed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        try:
            state_dict = load_file(path)
        except (OSError, SafetensorError) as error:
            raise ConversionError(f"{path}: not a readable safetensors file ({error}); it may be truncated") from None
    elif path.suffix in (".pth", ".pt", ".bin"):
        try:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            if "Unsupported global" not in str(error):  # not an object, just not a pickle of tensors
                raise ConversionError(f"{path}: not a readable torch checkpoint (not a pickled state dict)") from None
            # torch's own message advises weights_only=False, which would run the pickle's code.
            raise ConversionError(
                f"{path}: refused, it holds Python objects besides tensors; fit3d_hf loads checkpoints weights only "
                "(unpickling objects could run code). Re-save the state dict as safetensors where you trust the file"
            ) from None
        except (RuntimeError, EOFError, KeyError, ValueError, OSError) as error:
            raise ConversionError(f"{path}: not a readable torch checkpoint ({type(error).__name__}: {error})") from None
    else:
        raise ConversionError(f"{path}: expected a .safetensors, .pth, .pt or .bin file")
    while isinstance(state_dict, dict) and len(state_dict) == 1 and next(iter(state_dict)) in ("model", "state_dict"):
        state_dict = next(iter(state_dict.values()))
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ConversionError(f"{path}: not a state dict (a mapping of names to tensors)")
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module.") :]: v for k, v in state_dict.items()}
    return state_dict


def detect_family(state_dict: dict[str, torch.Tensor]) -> str:
    """The FiT3D family of a timm ViT state dict, from the keys only its family has."""
    if "patch_embed.proj.weight" not in state_dict or "pos_embed" not in state_dict:
        raise ConversionError("not a timm ViT state dict: no patch_embed.proj.weight / pos_embed")
    if "reg_token" in state_dict:
        return "dinov2_reg"
    if "norm_pre.weight" in state_dict:
        return "clip"
    if any(k.endswith(".ls1.gamma") for k in state_dict):
        return "dinov2" if state_dict["patch_embed.proj.weight"].shape[-1] == 14 else "deit3"
    return "mae"


def _check_sizes(state_dict: dict[str, torch.Tensor], config) -> None:
    """Raise a ConversionError naming the first mismatch of family, width, patch size or depth."""
    family, detected = family_of(config), detect_family(state_dict)
    patch_weight = state_dict["patch_embed.proj.weight"]
    if detected != family:
        raise ConversionError(
            f"this is a {detected} checkpoint, not {family} (told apart by its keys: reg_token, norm_pre, ls1.gamma, patch size)"
        )
    if patch_weight.shape[0] != hidden_size_of(config):
        raise ConversionError(
            f"checkpoint width {patch_weight.shape[0]} (patch_embed.proj.weight {tuple(patch_weight.shape)}) "
            f"does not match the {family} config's hidden_size {hidden_size_of(config)}"
        )
    if patch_weight.shape[-1] != patch_size_of(config):
        raise ConversionError(
            f"checkpoint patch size {patch_weight.shape[-1]} does not match the config's {patch_size_of(config)}"
        )
    depth = 1 + max((int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    if depth != config.num_hidden_layers:
        raise ConversionError(
            f"checkpoint depth {depth} blocks does not match the config's num_hidden_layers {config.num_hidden_layers}"
        )


def position_grid_of(state_dict: dict[str, torch.Tensor], family: str) -> int:
    """Side of the square patch grid of the checkpoint's position table."""
    num_patches = state_dict["pos_embed"].shape[1] - (0 if family in _NO_CLS_POSITION else 1)
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ConversionError(f"pos_embed holds {num_patches} patch positions, not a square grid")
    return side


def timm_to_transformers(state_dict: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """Map a timm ViT state dict onto the state dict of `build_backbone(config)`.

    Every source key is used (except the classifier `DROPPED_KEYS`) and every target key filled;
    otherwise a ConversionError lists the offending keys.
    """
    _check_sizes(state_dict, config)
    family = family_of(config)
    block_prefix, block_names, qkv_name = _BLOCK_NAMES[family]
    clip = family == "clip"
    swiglu = getattr(config, "use_swiglu_ffn", False)  # DINOv2-giant
    source = {k: v for k, v in state_dict.items() if k not in DROPPED_KEYS}
    converted, unused = {}, []
    for key, value in source.items():
        block = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias|gamma)", key)
        if block:
            index, module, param = block.groups()
            prefix = block_prefix.format(index)
            if module == "attn.qkv":
                for name, part in zip("qkv", value.chunk(3, dim=0)):
                    converted[prefix + qkv_name.format(name) + "." + param] = part
            elif module == "mlp.fc1" and swiglu:  # timm packs [gate; up] into one layer
                for name, part in zip(("gate_proj", "up_proj"), value.chunk(2, dim=0)):
                    converted[f"{prefix}mlp.{name}.{param}"] = part
            elif module == "mlp.fc2" and swiglu:
                converted[f"{prefix}mlp.down_proj.{param}"] = value
            elif module in ("ls1", "ls2") and param == "gamma":
                converted[f"{prefix}layer_scale{module[-1]}.lambda1"] = value
            elif module in block_names:
                converted[f"{prefix}{block_names[module]}.{param}"] = value
            else:
                unused.append(key)
        elif key == "cls_token":
            converted["embeddings.class_embedding" if clip else "embeddings.cls_token"] = value.reshape(-1) if clip else value
        elif key == "reg_token":
            converted["embeddings.register_tokens"] = value
        elif key == "pos_embed":
            if family in _NO_CLS_POSITION:
                value = torch.cat([value.new_zeros(1, 1, value.shape[2]), value], dim=1)
            converted["embeddings.position_embedding.weight" if clip else "embeddings.position_embeddings"] = (
                value[0] if clip else value
            )
        elif key.startswith("patch_embed.proj."):
            target = "embeddings.patch_embedding." if clip else "embeddings.patch_embeddings.projection."
            converted[target + key.rsplit(".", 1)[1]] = value
        elif key.startswith("norm_pre.") and clip:
            converted["pre_layrnorm." + key.rsplit(".", 1)[1]] = value
        elif key.startswith("norm."):
            converted[("post_layernorm." if clip else "layernorm.") + key.rsplit(".", 1)[1]] = value
        else:
            unused.append(key)
    expected = build_backbone(config).state_dict()
    if family == "dinov2_reg":
        # transformers always has a mask token (unused without bool_masked_pos); timm has none.
        converted["embeddings.mask_token"] = torch.zeros_like(expected["embeddings.mask_token"])
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    wrong_shape = [
        f"{k}: {tuple(v.shape)} vs {tuple(expected[k].shape)}"
        for k, v in converted.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if unused or missing or unexpected or wrong_shape:
        raise ConversionError(
            "checkpoint does not map onto the model:"
            + (f"\n  source keys not used: {unused}" if unused else "")
            + (f"\n  target keys not filled: {missing}" if missing else "")
            + (f"\n  target keys that do not exist: {unexpected}" if unexpected else "")
            + (f"\n  shape mismatches (checkpoint vs model): {wrong_shape}" if wrong_shape else "")
        )
    return converted


def convert_checkpoints(
    original: str | os.PathLike,
    finetuned: str | os.PathLike,
    output_dir: str | os.PathLike,
    backbone_config,
    *,
    assembly: str = "concat",
    normalization: str = "imagenet",
    overwrite: bool = False,
) -> Path:
    """Convert a pair of timm state dicts into a FiT3DModel folder at `output_dir`.

    Args:
        original: the original (frozen) backbone's timm state dict (.pth or .safetensors).
        finetuned: the FiT3D fine-tuned backbone's timm state dict.
        output_dir: the folder to write; it must not exist (or `overwrite=True`).
        backbone_config: the backbone config (`backbones.preset_config(...)`); its `image_size` is
            set from the checkpoint's position table.
        assembly: see `FiT3DConfig.assembly`.
        normalization: the input normalisation the checkpoints were trained with, recorded in the
            config and the image processor (`backbones.set_normalization`): "imagenet" for the
            official ones (every family, CLIP included), or "family".

    Returns the output folder. On any error nothing is left at `output_dir`.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{output_dir} exists and is not empty (pass overwrite=True / --overwrite to replace it)")
    config = copy.deepcopy(backbone_config)
    set_normalization(config, normalization)
    converted = {}
    for role, path in (("original", original), ("finetuned", finetuned)):
        state_dict = load_timm_state_dict(path)
        try:
            if role == "original":  # the fine-tuned table must then match it
                _check_sizes(state_dict, config)
                config.image_size = position_grid_of(state_dict, family_of(config)) * patch_size_of(config)
            converted[role] = timm_to_transformers(state_dict, config)
        except ConversionError as error:
            raise ConversionError(f"{role} checkpoint {path}: {error}") from None
    model = FiT3DModel(FiT3DConfig(backbone_config=config, assembly=assembly))
    model.original.load_state_dict(converted["original"], strict=True)
    model.finetuned.load_state_dict(converted["finetuned"], strict=True)

    with atomic_directory(output_dir, overwrite=overwrite) as staging:
        model.save_pretrained(staging)
        make_image_processor(config).save_pretrained(staging)
    return output_dir


def convert_official(
    name: str,
    output_dir: str | os.PathLike,
    *,
    original: str | os.PathLike | None = None,
    finetuned: str | os.PathLike | None = None,
    backbone_config=None,
    cache_dir: str | os.PathLike | None = None,
    assembly: str = "concat",
    overwrite: bool = False,
) -> Path:
    """Convert an official release (a key of `OFFICIAL_RELEASES`) into a FiT3DModel folder at `output_dir`.

    The source files not given as local paths (`original`, `finetuned`) are resolved with
    `resolve_official_files` (downloaded, or found in the Hugging Face cache). The model records
    ImageNet normalisation, as the official code used. `backbone_config` defaults to
    `backbones.preset_config(name)`.

    Raises:
        CheckpointsUnavailableError: a file that is neither downloadable nor cached (what to place where).
        ConversionError, FileExistsError: as `convert_checkpoints`.
    """
    official_files(name)  # an unknown name fails before anything is fetched
    local = {"original": original, "finetuned": finetuned}
    missing = tuple(role for role, path in local.items() if path is None)
    if missing:
        local.update(resolve_official_files(name, missing, cache_dir=cache_dir))
    config = preset_config(name) if backbone_config is None else backbone_config
    return convert_checkpoints(
        local["original"],
        local["finetuned"],
        output_dir,
        config,
        assembly=assembly,
        normalization="imagenet",
        overwrite=overwrite,
    )
