"""Provenance: what every artifact records about how it was made, and the check its consumer runs.

Each artifact records, as JSON, the values its content depends on:

| artifact | where | recorded |
|---|---|---|
| lifted Gaussians | `<scene>.safetensors` metadata and `<scene>.json`, key `provenance` | backbone, seed, Stage I settings, scene |
| a lifting checkpoint | `.checkpoints/<scene>/provenance.json` | the same, written when the scene starts |
| targets dataset | `fit3d_targets.json` / `dataset.info.description`, key `provenance` | backbone, render settings, sha256 and provenance of every Gaussians file |
| FiT3DModel folder | `fit3d_finetune.json`, key `provenance` | backbone, seed, Stage II settings, targets dataset |
| a fine-tuning checkpoint | `trainer_state.json`, key `provenance` | the same |
| benchmark results | `results.json`, key `provenance` | sha256 of the model folder's weight files, weights of each backbone |

The backbone's identity is its weights (`backbone_identity`: the name `backbone_specs` gave it and
`backbones.weights_checksum`): two backbones are the same one when their weights are identical,
whatever they were called. A consumer compares what it is given with what the artifact records
(`check_provenance`); a difference is a `ProvenanceError` that names both sides and the fix.
"""

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from .backbone_specs import backbone_name
from .backbones import weights_checksum
from .errors import InputNotFoundError, ProvenanceError

PROVENANCE_KEY = "provenance"


def backbone_identity(model: torch.nn.Module) -> dict[str, str]:
    """`{"name": ..., "weights_sha256": ...}` of a backbone: what artifacts made with it record."""
    return {"name": backbone_name(model), "weights_sha256": weights_checksum(model)}


def describe_backbone(identity: dict[str, str] | None) -> str:
    """A backbone identity as a message shows it: its name and the start of its weights hash."""
    if not identity:
        return "an unrecorded backbone"
    return f"{identity.get('name', '?')!r} (weights sha256 {str(identity.get('weights_sha256', '?'))[:12]}…)"


def scene_fingerprint(scene) -> dict[str, Any]:
    """What identifies a `Scene` for the artifacts made from it: id, views, size and cameras.

    `poses_sha256` covers the views' names and world-to-camera poses (unchanged by `downscale`);
    `intrinsics_sha256` the pinhole matrices at the scene's size. Pixels are not hashed: a capture
    of hundreds of views would take minutes.
    """
    poses = hashlib.sha256()
    poses.update(json.dumps(list(scene.view_names)).encode())
    poses.update(scene.world_to_camera.detach().cpu().float().contiguous().numpy().tobytes())
    intrinsics = hashlib.sha256(scene.intrinsics.detach().cpu().float().contiguous().numpy().tobytes())
    return {
        "scene_id": scene.scene_id,
        "num_views": scene.num_views,
        "size": [scene.height, scene.width],
        "train_views": list(scene.train_views),
        "poses_sha256": poses.hexdigest(),
        "intrinsics_sha256": intrinsics.hexdigest(),
    }


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def weight_files_sha256(folder: str | os.PathLike) -> str | None:
    """SHA-256 over a model folder's `*.safetensors` files (names and bytes, in name order); None without any."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        digest.update(file_sha256(path).encode())
    return digest.hexdigest()


def differences(recorded: Any, current: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """`(dotted key, recorded value, current value)` for every leaf where two JSON values differ."""
    if isinstance(recorded, dict) and isinstance(current, dict):
        found = []
        for key in sorted(set(recorded) | set(current), key=str):
            found += differences(recorded.get(key), current.get(key), f"{prefix}{key}.")
        return found
    # Compared as JSON stores them: tuples are lists, keys are strings.
    if json.loads(json.dumps(recorded)) == json.loads(json.dumps(current)):
        return []
    return [(prefix.rstrip("."), recorded, current)]


def _shown(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        text = value[:12] + "…"  # a hash
    return text if len(text) <= 80 else text[:77] + "..."


def check_provenance(recorded: dict | None, current: dict, *, artifact: str, fix: str) -> None:
    """Raise a `ProvenanceError` unless `recorded` (what `artifact` was made with) equals `current`.

    Args:
        recorded: the artifact's provenance (None: the artifact records none).
        current: the same keys for this run.
        artifact: the artifact, as the message names it (e.g. a path).
        fix: what the user can do, one sentence.
    """
    if recorded is None:
        raise ProvenanceError(
            f"{artifact} records no provenance (made by an older fit3d_hf or by hand), so it cannot be checked "
            f"against this run; {fix}"
        )
    found = differences(recorded, current)
    if found:
        listed = "; ".join(f"{key}: {_shown(old)} there, {_shown(new)} now" for key, old, new in found)
        raise ProvenanceError(f"{artifact} was made with other settings than this run ({listed}); {fix}")


def check_backbone(recorded: dict | None, identity: dict, *, artifact: str, fix: str) -> None:
    """Raise a `ProvenanceError` unless `artifact` was made with the backbone `identity` (same weights;
    names may differ, e.g. "embedded" and the folder it is loaded from)."""
    if not recorded or recorded.get("weights_sha256") != identity["weights_sha256"]:
        raise ProvenanceError(
            f"{artifact} was made with the backbone {describe_backbone(recorded)}, but this run uses "
            f"{describe_backbone(identity)}: another backbone (or the same random one with another seed); {fix}"
        )


def check_source(value: str | os.PathLike, what: str) -> None:
    """Raise `InputNotFoundError` when `value` is written as a local path (./x, ../x, /x, ~/x,
    a/b/c) and nothing is there: such a value is never a Hub id, so the Hub's "couldn't connect"
    message would mislead."""
    text = str(value)
    if os.path.exists(os.path.expanduser(text)):
        return
    local = text.startswith((".", "/", "~")) or "\\" in text or text.count("/") > 1 or bool(os.path.splitdrive(text)[0])
    if local:
        raise InputNotFoundError(f"{what} {text}: no such file or folder")


def hub_error(value: str | os.PathLike, what: str, error: Exception) -> InputNotFoundError:
    """The error for `value` that is not a local path and that the Hub did not give (offline, or no such repo)."""
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return InputNotFoundError(
        f"{what} {value}: no such local file or folder, and not loadable as a Hub id ({first_line}); "
        "check the path, or the Hub id and your connection (HF_HUB_OFFLINE=1 allows only what is cached)"
    )
