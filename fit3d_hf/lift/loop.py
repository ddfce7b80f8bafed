"""`lift_scene` and `lift_scenes`: prepare a scene's views, start or resume, train, evaluate and write the artifact."""

import contextlib
import json
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..backbone_specs import backbone_name
from ..backbones import normalization_of
from ..errors import InputError, ResultsError
from ..io import atomic_write_json, check_output_folder, folder_lock, remove_stale_temporaries
from ..provenance import PROVENANCE_KEY, backbone_identity, check_provenance
from ..scenes.scene import Scene
from ..splatting import CappedDefaultStrategy, load_gsplat_extension, resolve_backend
from .config import LiftConfig
from .evaluation import evaluate
from .gaussians import FORMAT, FeatureGaussians
from .initialization import camera_extent, initial_parameters, initial_points
from .losses import training_loss
from .state import (
    LiftState,
    check_resume,
    checkpoint_dir,
    latest_checkpoint,
    lift_provenance,
    remove_checkpoints,
    write_run_record,
)
from .views import Views, load_views, usable_views

logger = logging.getLogger(__name__)


def lift_scene(
    scene: Scene,
    backbone: torch.nn.Module,
    config: LiftConfig,
    *,
    output_dir: str | os.PathLike,
    seed: int = 0,
    callback: Callable[[int, dict[str, torch.nn.Parameter]], None] | None = None,
    progress: bool = True,
    progress_position: int = 0,
) -> FeatureGaussians:
    """Lift `backbone`'s features of one scene into feature Gaussians and write the artifact.

    Resumes from `<output_dir>/.checkpoints/<scene_id>/` when a checkpoint is there. Runs on the
    backbone's device with the rasterizer `resolve_backend(config.backend, device, float32)` picks
    (gsplat on CUDA when its extension is built or can be, torch otherwise), recorded in the report;
    gsplat's extension is loaded (compiled on first use) before anything else.

    Args:
        scene: a `fit3d_hf.scenes.Scene` (train views are fitted, test views are held out).
        backbone: a frozen backbone of any family (or a FiT3DModel), see `backbones.extract_features`;
            the artifact records `backbone_specs.backbone_name(backbone)`.
        config: hyper-parameters (`LiftConfig.paper_preset()` the official run, `LiftConfig.cpu_preset()` for CPU).
        output_dir: where `<scene_id>.safetensors` and `<scene_id>.json` are written.
        seed: seeds the initialisation, the view order and densification.
        callback: called as `callback(step, params)` after each finished step (and its checkpoint).
        progress, progress_position: show a tqdm bar, on this terminal line.

    Returns:
        The lifted `FeatureGaussians` (also written to `<output_dir>/<scene_id>.safetensors`).

    Raises:
        ValueError: no usable training view.
        ProvenanceError: a checkpoint started with another backbone, seed or settings (`state.check_resume`).
        ResultsError: every Gaussian was pruned.
        RuntimeError: backend "gsplat" that cannot run here (the message says how to fix it).
        FloatingPointError: the loss or the parameters became NaN/inf, found by the check every
            `config.check_every` steps and before each checkpoint (the last good checkpoint is kept).
    """
    output_dir = check_output_folder(output_dir, what="the lifting output folder")
    provenance = lift_provenance(scene, backbone, config, seed)
    started = time.perf_counter()
    device = next(backbone.parameters()).device
    backend = resolve_backend(config.backend, device, torch.float32)
    if backend == "gsplat":
        load_gsplat_extension()  # fails now, with the fix, rather than in the first step
    train, test = _prepare_views(scene, backbone, config)
    features_seconds = time.perf_counter() - started
    extent = camera_extent(scene.camera_centers[train.indices])
    strategy = _make_strategy(config)
    checkpoints = checkpoint_dir(output_dir, scene.scene_id)
    # The run draws from its own RNG stream (seeded, or restored from the checkpoint); the caller's is left alone.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        state = _start_or_resume(scene, backbone, config, train, extent, strategy, checkpoints, seed, provenance)
        resumed_from = state.step
        bar = tqdm(
            total=config.iterations,
            initial=state.step,
            desc=scene.scene_id,
            position=progress_position,
            disable=not progress,
            leave=False,
            dynamic_ncols=True,
        )
        seconds = _train(state, strategy, train, config, extent, seed, scene.scene_id, checkpoints, callback, bar)
        bar.close()

    _check_finite(state, scene.scene_id, config.iterations, checkpoints)
    if len(state.params["means"]) == 0:
        raise ResultsError(
            f"scene {scene.scene_id!r}: no Gaussian is left after {config.iterations} steps (all were pruned); "
            "lower prune_opacity or check the scene's cameras and masks"
        )
    metadata = {
        "format": FORMAT,
        "scene_id": scene.scene_id,
        "backbone": backbone_name(backbone),
        "feature_dim": str(config.feature_dim),
        "out_dim": str(state.decoder_weight.shape[0]),
        "sh_degree": str(config.sh_degree),
        "iterations": str(config.iterations),
        "near_plane": str(config.near_plane),
        "normalization": _normalization(backbone, config),
        PROVENANCE_KEY: json.dumps(provenance),
    }
    gaussians = FeatureGaussians(state.params, state.decoder_weight, metadata)
    report = _evaluate_and_report(
        gaussians, train, test, state, config, backend=backend,
        seed=seed, resumed_from=resumed_from, seconds=seconds, features_seconds=features_seconds, started=started,
    )  # fmt: skip
    report[PROVENANCE_KEY] = provenance
    gaussians.save(output_dir / f"{scene.scene_id}.safetensors")
    # The JSON is written last: its presence marks the scene as finished.
    atomic_write_json(output_dir / f"{scene.scene_id}.json", report)
    if not config.keep_checkpoints:
        remove_checkpoints(checkpoints)
    return gaussians


def lift_scenes(
    scenes: Sequence[Scene],
    backbone: torch.nn.Module,
    config: LiftConfig,
    *,
    output_dir: str | os.PathLike,
    seed: int = 0,
    process_index: int = 0,
    num_processes: int = 1,
) -> list[dict]:
    """Lift this process's share of `scenes` (every `num_processes`-th one from `process_index`).

    A scene whose artifact is already in `output_dir` is skipped, and an interrupted one resumes
    from its checkpoint. Before any work, every scene's artifact and checkpoint in `output_dir` is
    checked against this run's provenance (backbone, seed, settings, scene): one made otherwise is
    a `ProvenanceError` naming both. Process 0 holds `output_dir`'s lock (`io.folder_lock`) while it
    lifts, so a second run into the same folder is refused.

    Args:
        scenes: the scenes of the run (`fit3d_hf.scenes.load_scenes`), the same list in every process.
        backbone, config, output_dir, seed: as for `lift_scene`.
        process_index, num_processes: this process's rank and the number of processes.

    Returns:
        One report per scene of this process (the `<scene_id>.json` content) with `status`
        "lifted" or "skipped".
    """
    repeated = sorted(scene_id for scene_id, count in Counter(scene.scene_id for scene in scenes).items() if count > 1)
    if repeated:
        raise InputError(f"scene ids {repeated} appear more than once: every scene's artifact is named after its id")
    output_dir = check_output_folder(output_dir, what="the lifting output folder")
    identity = backbone_identity(backbone)
    for scene in scenes:
        _check_existing(output_dir, scene, lift_provenance(scene, backbone, config, seed, identity))
    # One lock per run: process 0 holds it, the other processes of the run share the folder.
    lock = folder_lock(output_dir, what="the lifting output folder") if process_index == 0 else contextlib.nullcontext()
    with lock:
        remove_stale_temporaries(output_dir)
        reports = []
        own = list(scenes)[process_index::num_processes]
        for scene in tqdm(own, desc=f"process {process_index}: scenes", position=2 * process_index, dynamic_ncols=True):
            report = _finished_report(output_dir, scene.scene_id)
            if report is not None:
                reports.append({**report, "status": "skipped"})
                continue
            lift_scene(scene, backbone, config, output_dir=output_dir, seed=seed, progress_position=2 * process_index + 1)
            reports.append({**_finished_report(output_dir, scene.scene_id), "status": "lifted"})
    return reports


def _check_existing(output_dir: Path, scene: Scene, provenance: dict) -> None:
    """Refuse a finished artifact or a checkpoint of `scene` in `output_dir` made with other provenance."""
    report = _finished_report(output_dir, scene.scene_id)
    if report is not None:
        check_provenance(
            report.get(PROVENANCE_KEY),
            provenance,
            artifact=f"the lifted scene {output_dir / scene.scene_id}.json",
            fix=(
                f"lift into another --output_dir, or delete {scene.scene_id}.safetensors and {scene.scene_id}.json "
                "there to lift the scene again with these settings"
            ),
        )
    elif latest_checkpoint(checkpoint_dir(output_dir, scene.scene_id)) is not None:
        check_resume(checkpoint_dir(output_dir, scene.scene_id), provenance)


def _prepare_views(scene: Scene, backbone: torch.nn.Module, config: LiftConfig) -> tuple[Views, Views | None]:
    """The training views and the held-out ones (None when the scene has none), with their backbone targets."""
    train_ids, test_ids = usable_views(scene, config.holdout_every, config.train_on)
    backbone.eval()
    options = dict(size_rule=config.input_size_rule, normalization=config.normalization)
    train = load_views(scene, train_ids, backbone, config.render_downscale, **options)
    test = load_views(scene, test_ids, backbone, config.render_downscale, **options) if test_ids else None
    return train, test


def _normalization(backbone: torch.nn.Module, config: LiftConfig) -> str:
    """How the backbone's input is normalised: `config.normalization`, else what the backbone's config records."""
    return config.normalization or normalization_of(backbone.config)


def _make_strategy(config: LiftConfig) -> CappedDefaultStrategy:
    """gsplat's 3DGS densification with the config's thresholds and its schedule scaled to the run."""
    return CappedDefaultStrategy(
        prune_opa=config.prune_opacity,
        grow_grad2d=config.grow_grad2d,
        refine_start_iter=config.scaled(config.refine_start),
        refine_stop_iter=config.scaled(config.refine_stop),
        refine_every=config.scaled(config.refine_every),
        # 0 = never: past the end of the run (this also disables gsplat's size pruning, which starts after a reset).
        reset_every=config.scaled(config.reset_opacity_every) if config.reset_opacity_every else config.iterations + 1,
        max_gaussians=config.max_gaussians,
    )


def _start_or_resume(
    scene: Scene,
    backbone: torch.nn.Module,
    config: LiftConfig,
    train: Views,
    extent: float,
    strategy: CappedDefaultStrategy,
    checkpoints: Path,
    seed: int,
    provenance: dict,
) -> LiftState:
    """The state of the latest checkpoint in `checkpoints` (and its RNG) when it was started with
    `provenance` (`state.check_resume`), else a fresh one drawn from `seed`."""
    device = next(backbone.parameters()).device
    out_dim = train.targets.shape[1]
    remove_stale_temporaries(checkpoints)
    checkpoint = latest_checkpoint(checkpoints)
    if checkpoint is None:
        write_run_record(checkpoints, provenance)
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        points, colors = initial_points(scene, config.init_points, generator)
        params = initial_parameters(points, colors, config.sh_degree, config.feature_dim, config.init_opacity)
        # Conv2d's own initialisation, drawn from the global RNG just seeded.
        decoder = torch.nn.Conv2d(config.feature_dim, out_dim, 3, padding=1, bias=False)
        state = LiftState.start(params, decoder.weight, strategy.initialize_state(scene_scale=extent), config, extent, device)
    else:
        check_resume(checkpoints, provenance)
        state = LiftState.load(checkpoint, config, extent, device)
        logger.info("scene %r: resuming from %s", scene.scene_id, checkpoint)
    strategy.check_sanity(state.params, state.optimizers)
    return state


def _train(
    state: LiftState,
    strategy: CappedDefaultStrategy,
    train: Views,
    config: LiftConfig,
    extent: float,
    seed: int,
    scene_id: str,
    checkpoints: Path,
    callback: Callable[[int, dict[str, torch.nn.Parameter]], None] | None,
    bar: tqdm,
) -> float:
    """Run the steps from `state.step` to the end, one training view each, checkpointing on the way.

    Losses stay on the device until the check every `config.check_every` steps (and before each
    checkpoint) reads them back with the parameters' finite flags: each read waits for the GPU.

    Returns:
        The seconds they took (also added to `state.train_seconds`).
    """
    resumed_seconds, started = state.train_seconds, time.perf_counter()
    sh_every = config.scaled(config.sh_degree_every)
    losses: list[torch.Tensor] = []  # this run's losses since the last check, on the device
    for step in range(state.step, config.iterations):
        if step % config.check_every == 0:
            _record_losses(state, losses, train, seed, scene_id, checkpoints)
            _check_finite(state, scene_id, step, checkpoints)
        state.optimizers["means"].param_groups[0]["lr"] = _means_lr(step, config, extent)
        row = _view_order(step, len(train.indices), seed)
        sh_degree = min(step // sh_every, config.sh_degree)
        loss, terms, info = training_loss(state.params, state.decoder_weight, train, row, sh_degree, config)
        losses.append(loss.detach())
        strategy.step_pre_backward(state.params, state.optimizers, state.strategy_state, step, info)
        loss.backward()
        for optimizer in state.all_optimizers():
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        strategy.step_post_backward(state.params, state.optimizers, state.strategy_state, step, info)
        state.step = step + 1
        bar.update(1)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}", feat=f"{terms['feature_l1'].item():.4f}", n=len(state.params["means"]))
        if state.step % config.checkpoint_every == 0 and state.step < config.iterations:
            _record_losses(state, losses, train, seed, scene_id, checkpoints)
            _check_finite(state, scene_id, state.step, checkpoints)
            state.train_seconds = resumed_seconds + time.perf_counter() - started
            state.save(checkpoints)
        if callback is not None:
            callback(step, state.params)
    _record_losses(state, losses, train, seed, scene_id, checkpoints)
    seconds = time.perf_counter() - started
    state.train_seconds = resumed_seconds + seconds
    return seconds


def _evaluate_and_report(
    gaussians: FeatureGaussians,
    train: Views,
    test: Views | None,
    state: LiftState,
    config: LiftConfig,
    *,
    backend: str,
    seed: int,
    resumed_from: int,
    seconds: float,
    features_seconds: float,
    started: float,
) -> dict:
    """Evaluate the lifted Gaussians on the held-out views (else the training views); the report `<scene_id>.json` holds.

    Args:
        backend: the rasterizer that ran ("torch" or "gsplat").
        resumed_from, seconds: the step this run started from, and how long its steps took.
        features_seconds: how long computing the backbone targets took.
        started: `time.perf_counter()` when this run began.
    """
    eval_started = time.perf_counter()
    # Without held-out views the metrics are measured on the training views, and the report says so.
    eval_views = train if test is None else test
    metrics = evaluate(gaussians, eval_views, config.backend)
    steps_run = config.iterations - resumed_from
    return {
        "scene_id": gaussians.metadata["scene_id"],
        "backbone": gaussians.metadata["backbone"],
        "normalization": gaussians.metadata["normalization"],
        "feature_dim": config.feature_dim,
        "out_dim": gaussians.out_dim,
        "iterations": config.iterations,
        "num_gaussians": gaussians.num_gaussians,
        "num_train_views": len(train.indices),
        "eval_split": "train" if test is None else "held-out",
        "num_eval_views": len(eval_views.indices),
        "render_size": list(train.images.shape[-2:]),
        "device": str(gaussians.params["means"].device),
        "backend": backend,
        "metrics": metrics,
        "timings_s": {
            "backbone_features": features_seconds,
            "train": state.train_seconds,
            "eval": time.perf_counter() - eval_started,
            "total_this_run": time.perf_counter() - started,
        },
        "iterations_per_second": steps_run / seconds if steps_run else None,
        "resumed_from_step": resumed_from or None,
        "seed": seed,
        "config": asdict(config),
        "loss_history": [round(value, 6) for value in state.loss_history],
    }


def _means_lr(step: int, config: LiftConfig, extent: float) -> float:
    """Exponential decay from `lr_means` to `lr_means_final` over the run (times the extent)."""
    t = min(step / config.iterations, 1.0)
    return extent * math.exp((1 - t) * math.log(config.lr_means) + t * math.log(config.lr_means_final))


def _view_order(step: int, num_views: int, seed: int) -> int:
    """The training view (a row) at `step`: a fresh random permutation per epoch, a pure function of the step."""
    epoch, position = divmod(step, num_views)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return int(torch.randperm(num_views, generator=generator)[position])


def _record_losses(
    state: LiftState, losses: list[torch.Tensor], train: Views, seed: int, scene_id: str, checkpoints: Path
) -> None:
    """Move `losses` (the steps after `state.loss_history`'s) to the history; stop at the first that is NaN/inf."""
    if not losses:
        return
    values = torch.stack(losses).tolist()
    losses.clear()
    for value in values:
        if not math.isfinite(value):
            step = len(state.loss_history)
            view = train.indices[_view_order(step, len(train.indices), seed)]
            raise FloatingPointError(
                f"scene {scene_id!r}: loss is {value} at step {step} (view {view}); stopped. "
                f"Last good checkpoint: {latest_checkpoint(checkpoints) or 'none yet'}. "
                "Lower the learning rates or check the inputs."
            )
        state.loss_history.append(value)


def _check_finite(state: LiftState, scene_id: str, step: int, checkpoints: Path) -> None:
    """Stop with a clear message when a parameter went NaN/inf (before it reaches a checkpoint)."""
    named = (*state.params.items(), ("decoder", state.decoder_weight))
    # One flag per tensor, read back together: a single wait for the device.
    finite = torch.stack([torch.isfinite(value).all() for _, value in named]).tolist()
    bad = [name for (name, _), ok in zip(named, finite) if not ok]
    if bad:
        raise FloatingPointError(
            f"scene {scene_id!r}: parameters {bad} are NaN/inf at step {step}; stopped. "
            f"Last good checkpoint: {latest_checkpoint(checkpoints) or 'none yet'}. "
            "Lower the learning rates or check the inputs."
        )


def _finished_report(output_dir: str | os.PathLike, scene_id: str) -> dict | None:
    """The JSON report of a scene already lifted into `output_dir`, or None."""
    path = Path(output_dir) / f"{scene_id}.json"
    if not path.exists() or not (Path(output_dir) / f"{scene_id}.safetensors").exists():
        return None
    return json.loads(path.read_text())
