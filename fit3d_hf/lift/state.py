"""The resumable state of one lifting run, and the checkpoint files it is written to and read from.

A checkpoint is `<output_dir>/.checkpoints/<scene_id>/step_XXXXXXX.pt` (XXXXXXX: the next step to
run), `torch.save` of a dict of tensors and plain values that `torch.load(..., weights_only=True)`
reads back:

    step             int, the next step to run
    params           {name: tensor}: means [N, 3], quats [N, 4], scales [N, 3], opacities [N],
                     sh0 [N, 1, 3], shN [N, K-1, 3] (absent for SH degree 0), features [N, D]
    decoder_weight   [Cb, D, 3, 3]
    optimizers       {name: Adam state_dict}, one per parameter (gsplat's strategies need them apart)
    decoder_optimizer  Adam state_dict
    strategy_state   the densification strategy's dict (gradient statistics, scene scale)
    rng_cpu, rng_cuda  the global RNG states (rng_cuda None on CPU): densification draws from them
    train_seconds    float, training time so far
    loss_history     [step] float64, the loss of every step so far

Beside the checkpoints, `provenance.json` (`lift_provenance`) records what the scene was started
with: the backbone's identity, the seed, the Stage I settings and the scene. A run resumes a
checkpoint only when its own provenance is the same (`check_resume`); the lifted artifact records
it too, so that `render_targets` can check the Gaussians against the backbone it is given.
"""

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..io import atomic_write, atomic_write_json
from ..provenance import backbone_identity, check_provenance, scene_fingerprint
from .config import LiftConfig

PROVENANCE_FILE = "provenance.json"
# LiftConfig fields that leave the lifted Gaussians unchanged: a run may resume with other values of these.
RESULT_INDEPENDENT_FIELDS = ("checkpoint_every", "keep_checkpoints")


@dataclass
class LiftState:
    """Everything a lifting run needs to go on: Gaussians, decoder, optimizers, strategy state, progress.

    `params` and `decoder_weight` are leaf `Parameter`s on the training device, each with its own
    Adam (eps 1e-15, as the official code); `step` is the next step to run.
    """

    params: dict[str, torch.nn.Parameter]
    decoder_weight: torch.nn.Parameter
    optimizers: dict[str, torch.optim.Adam]
    decoder_optimizer: torch.optim.Adam
    strategy_state: dict[str, Any]
    step: int = 0
    train_seconds: float = 0.0
    loss_history: list[float] = field(default_factory=list)

    @classmethod
    def start(
        cls,
        params: dict[str, torch.Tensor],
        decoder_weight: torch.Tensor,
        strategy_state: dict[str, Any],
        config: LiftConfig,
        extent: float,
        device: torch.device,
    ) -> "LiftState":
        """A fresh state at step 0 from initial `params` and `decoder_weight [Cb, D, 3, 3]` (copied to `device`)."""
        params = {name: torch.nn.Parameter(value.to(device)) for name, value in params.items()}
        decoder_weight = torch.nn.Parameter(decoder_weight.detach().to(device))
        return cls(params, decoder_weight, *_optimizers(params, decoder_weight, config, extent), strategy_state)

    @classmethod
    def load(cls, path: str | os.PathLike, config: LiftConfig, extent: float, device: torch.device) -> "LiftState":
        """The state saved in `path`, on `device`; also restores the global RNG saved with it."""
        # On CPU first: RNG states must stay CPU tensors; Adam moves its moments to the params' device.
        saved = torch.load(path, map_location="cpu", weights_only=True)
        params = {name: torch.nn.Parameter(value.to(device)) for name, value in saved["params"].items()}
        decoder_weight = torch.nn.Parameter(saved["decoder_weight"].to(device))
        optimizers, decoder_optimizer = _optimizers(params, decoder_weight, config, extent)
        for name, optimizer in optimizers.items():
            optimizer.load_state_dict(saved["optimizers"][name])
        decoder_optimizer.load_state_dict(saved["decoder_optimizer"])
        strategy_state = {k: v.to(device) if torch.is_tensor(v) else v for k, v in saved["strategy_state"].items()}
        torch.set_rng_state(saved["rng_cpu"])
        if device.type == "cuda" and saved["rng_cuda"] is not None:
            torch.cuda.set_rng_state(saved["rng_cuda"], device)
        return cls(
            params,
            decoder_weight,
            optimizers,
            decoder_optimizer,
            strategy_state,
            step=saved["step"],
            train_seconds=saved["train_seconds"],
            loss_history=saved["loss_history"].tolist(),
        )

    def save(self, directory: str | os.PathLike) -> Path:
        """Write `directory/step_XXXXXXX.pt` atomically, with the global RNG state, and delete older ones."""
        device = self.params["means"].device
        saved = {
            "step": self.step,
            "params": {name: value.detach() for name, value in self.params.items()},
            "decoder_weight": self.decoder_weight.detach(),
            "optimizers": {name: optimizer.state_dict() for name, optimizer in self.optimizers.items()},
            "decoder_optimizer": self.decoder_optimizer.state_dict(),
            "strategy_state": self.strategy_state,
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "train_seconds": self.train_seconds,
            "loss_history": torch.tensor(self.loss_history, dtype=torch.float64),
        }
        path = Path(directory) / f"step_{self.step:07d}.pt"
        atomic_write(path, lambda tmp: torch.save(saved, tmp))
        for old in Path(directory).glob("step_*.pt"):
            if old != path:
                old.unlink()
        return path

    def all_optimizers(self) -> tuple[torch.optim.Adam, ...]:
        """The Gaussians' optimizers, then the decoder's."""
        return (*self.optimizers.values(), self.decoder_optimizer)


def checkpoint_dir(output_dir: str | os.PathLike, scene_id: str) -> Path:
    """Where the checkpoints of `scene_id` lifted into `output_dir` live."""
    return Path(output_dir) / ".checkpoints" / scene_id


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The checkpoint of the furthest step in `directory`, or None."""
    checkpoints = sorted(Path(directory).glob("step_*.pt"))
    return checkpoints[-1] if checkpoints else None


def remove_checkpoints(directory: str | os.PathLike) -> None:
    """Delete a finished scene's checkpoints, and `.checkpoints/` once no scene has any."""
    directory = Path(directory)
    shutil.rmtree(directory, ignore_errors=True)
    if directory.parent.exists() and not any(directory.parent.iterdir()):
        directory.parent.rmdir()  # other processes may still be using it otherwise


def _optimizers(
    params: dict[str, torch.nn.Parameter], decoder_weight: torch.nn.Parameter, config: LiftConfig, extent: float
) -> tuple[dict[str, torch.optim.Adam], torch.optim.Adam]:
    """One Adam per parameter (gsplat's strategies require it), eps 1e-15 as the official code."""
    lrs = {
        "means": config.lr_means * extent,
        "quats": config.lr_quats,
        "scales": config.lr_scales,
        "opacities": config.lr_opacities,
        "sh0": config.lr_sh0,
        "shN": config.lr_shN,
        "features": config.lr_features,
    }
    optimizers = {name: torch.optim.Adam([param], lr=lrs[name], eps=1e-15) for name, param in params.items()}
    return optimizers, torch.optim.Adam([decoder_weight], lr=config.lr_decoder, eps=1e-15)


def lift_provenance(scene, backbone: torch.nn.Module, config: LiftConfig, seed: int, identity: dict | None = None) -> dict:
    """What a scene's lifting depends on: backbone identity, seed, the Stage I settings that change
    the result (every `LiftConfig` field but `RESULT_INDEPENDENT_FIELDS`) and the scene's fingerprint.

    Args:
        identity: `provenance.backbone_identity(backbone)`, when the caller has it already.
    """
    settings = {key: value for key, value in asdict(config).items() if key not in RESULT_INDEPENDENT_FIELDS}
    return {
        "backbone": identity or backbone_identity(backbone),
        "seed": seed,
        "lift_config": settings,
        "scene": scene_fingerprint(scene),
    }


def write_run_record(directory: str | os.PathLike, provenance: dict) -> None:
    """Record, beside a scene's checkpoints, what the run that writes them was started with."""
    atomic_write_json(Path(directory) / PROVENANCE_FILE, provenance)


def check_resume(directory: str | os.PathLike, provenance: dict) -> None:
    """Raise a `ProvenanceError` unless the checkpoints in `directory` were started with `provenance`."""
    directory = Path(directory)
    record = directory / PROVENANCE_FILE
    recorded = json.loads(record.read_text()) if record.is_file() else None
    check_provenance(
        recorded,
        provenance,
        artifact=f"the lifting checkpoint in {directory}",
        fix=(
            "resume with the backbone, --seed and settings it was started with, or delete that folder to lift "
            "the scene again from the start (or choose another --output_dir)"
        ),
    )
