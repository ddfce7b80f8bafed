"""The demo's stages and `run_demo`, which runs them under the rerun rule (`rerun.run_stage`).

Each stage function takes the run folder and the config (and the backbone or rooms it needs,
which are expensive to make twice), writes its artifact into the run folder and returns nothing:
later stages read what they need from the folder, so a stage reads the same whether the one before
it ran now or in an earlier run.
"""

import contextlib
import functools
import io
import json
import shutil
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fit3d_hf import backbones
from fit3d_hf.backbone_specs import load_backbone_spec
from fit3d_hf.evaluation import BenchmarkConfig, EvaluationArguments, evaluate
from fit3d_hf.evaluation.replication import TEST
from fit3d_hf.finetune import FinetuneConfig, finetune
from fit3d_hf.hub import base_model_of, finetune_card_extra, write_model_card
from fit3d_hf.io import atomic_write_json, atomic_write_text
from fit3d_hf.lift import LiftConfig, lift_scenes, summary_table
from fit3d_hf.modeling_fit3d import FiT3DModel
from fit3d_hf.scenes import Scene
from fit3d_hf.scenes.synthetic import make_room
from fit3d_hf.targets import load_targets, render_targets, targets_metadata
from fit3d_hf.viz import feature_figure, loss_curves_figure

from .config import STAGES, DemoConfig, DemoError, replication_configs, room_seeds, stage_settings
from .report import replicated_comparisons, replication_lines, summary_markdown
from .rerun import prepare_run_folder, run_stage
from .workers import resolve_workers, run_jobs

# What a finished run folder holds, as `run_demo` lists it: (name in DemoResult.paths, label, path).
WRITTEN = (
    ("model", "FiT3DModel (with model card)", "model"),
    ("model_card", "model card", "model/README.md"),
    ("control_blur", "blur-target control model", "control_blur"),
    ("lifted", "lifted Gaussians", "lifted"),
    ("targets", "targets datasets", "targets"),
    ("benchmark", "benchmark", "eval/results.md"),
    ("replications", "verdicts across replications", "replications.json"),
    ("features", "picture", "pictures/features.png"),
    ("loss_finetune", "picture", "pictures/loss_finetune.png"),
    ("loss_lifting", "picture", "pictures/loss_lifting.png"),
    ("summary", "summary", "summary.md"),
    ("timings", "stage timings", "timings.json"),
)
# Below this fraction of valid target cells lifting has not converged and fine-tuning would learn nothing.
MIN_TARGET_COVERAGE = 0.05


@dataclass
class DemoResult:
    """What `run_demo` returns.

    Args:
        run_dir: the run folder (`DemoConfig.output_dir`).
        results: replication 0's benchmark results (`eval/results.json`, see `fit3d_hf.evaluation.report`).
        replications: replications.json: the replications' folders and seeds, the test, and `comparisons`
            (`report.replicated_comparisons`: per comparison and metric, the differences, mean, 95% CI, p-values, verdict).
        verdicts: one line per comparison across replications (`report.replication_lines`), as in the model card.
        timings: seconds of each stage in this run (a skipped stage costs about nothing) and
            `total_this_run` (up to the summary); replication k >= 1's stages are named `replications/k/<stage>`.
        skipped: the stages that were complete with these settings and not run again (named as in timings).
        paths: what the run folder holds, by the names of `WRITTEN`.
    """

    run_dir: Path
    results: dict
    replications: dict
    verdicts: list[str]
    timings: dict[str, float]
    skipped: list[str]
    paths: dict[str, Path]


class DemoRooms:
    """The fine-tuning rooms, made on first use: a rerun whose stages are all complete makes none."""

    def __init__(self, config: DemoConfig):
        self.config = config

    @functools.cached_property
    def finetune(self) -> list[Scene]:
        return make_scenes(self.config, room_seeds(self.config)["finetune"])


def make_scenes(config: DemoConfig, seeds: Sequence[int]) -> list[Scene]:
    """Procedural rooms of the demo's size (deterministic in the seed, so regenerated on a rerun)."""
    size = dict(num_views=config.scene_views, height=config.scene_height, width=config.scene_width)
    return [make_room(seed, **size) for seed in tqdm(seeds, desc="rooms", unit="room")]


def scenes_stage(run_dir: Path, config: DemoConfig, rooms: DemoRooms) -> None:
    """Stage 1: make the fine-tuning rooms and write the room ids of each split to scenes.json."""
    # Made here, so that the stage's time is theirs; the lift and render stages reuse them.
    rooms.finetune  # noqa: B018
    seeds = room_seeds(config)
    atomic_write_json(run_dir / "scenes.json", {split: [f"room_{seed:04d}" for seed in group] for split, group in seeds.items()})


def lift_stage(run_dir: Path, config: DemoConfig, backbone: torch.nn.Module, rooms: Sequence[Scene]) -> None:
    """Stage 2: lift each fine-tuning room into lifted/ (`lift_scenes` skips finished rooms and resumes from
    checkpoints). With several workers (`workers.run_jobs`) they share the rooms and this process reads their reports."""
    workers = resolve_workers(config.workers, len(rooms))
    if workers > 1:
        run_jobs([functools.partial(lift_share, run_dir, config, index, workers) for index in range(workers)], workers)
    reports = lift_scenes(rooms, backbone, lift_config(config), output_dir=run_dir / "lifted", seed=config.seed)
    print(summary_table(reports))


def lift_config(config: DemoConfig) -> LiftConfig:
    """The demo's lifting settings: the CPU preset with its steps and Gaussian counts."""
    return LiftConfig.cpu_preset(
        iterations=config.lift_iterations, max_gaussians=config.lift_max_gaussians, init_points=config.lift_init_points
    )


def lift_share(run_dir: Path, config: DemoConfig, index: int, count: int) -> None:
    """A worker's share of stage 2, rooms index, index + count, ... (`lift_scenes`'s process_index / num_processes),
    with the backbone and rooms made here as the demo's process makes them (both deterministic in the seeds)."""
    backbone, _ = load_backbone_spec(config.backbone, config.seed)
    backbone.requires_grad_(False).eval()
    rooms = make_scenes(config, room_seeds(config)["finetune"])
    lift_scenes(
        rooms,
        backbone,
        lift_config(config),
        output_dir=run_dir / "lifted",
        seed=config.seed,
        process_index=index,
        num_processes=count,
    )


def render_stage(run_dir: Path, config: DemoConfig, backbone: torch.nn.Module, rooms: Sequence[Scene]) -> None:
    """Stage 3: the lifted targets dataset and the single-view blurred control dataset.

    A dataset folder appears complete or not at all, so an existing one is kept; `render_targets`
    resumes an unfinished one from its per-room parts.

    Raises:
        DemoError: the lifted targets cover under 5% of the patch grid (lifting has not converged).
    """
    for folder, source in (("targets", "lifted"), ("targets_blur", "single_view_blur")):
        if (run_dir / folder).exists():
            print(f"{run_dir / folder} exists: skipped")
            continue
        render_targets(
            rooms,
            backbone,
            run_dir / folder,
            gaussians_dir=run_dir / "lifted",
            target_source=source,
            blur_sigma=config.blur_sigma,
        )
    coverage = target_coverage(run_dir / "targets")
    print(f"lifted targets cover {coverage:.0%} of the patch grid (render alpha >= 0.5)")
    if coverage < MIN_TARGET_COVERAGE:
        raise DemoError(
            f"the lifted targets cover only {coverage:.1%} of the views: lifting has not converged "
            f"(see {run_dir / 'lifted'}/*.json); raise --lift_iterations and rerun with --fresh"
        )


def target_coverage(dataset_dir: Path) -> float:
    """Fraction of patch-grid cells whose target is valid (mask = 1) over a targets dataset."""
    dataset = load_targets(dataset_dir)
    # render_targets already measured each scene's valid fraction: weight it by the scene's views.
    fractions = targets_metadata(dataset)["valid_fraction"]
    views = Counter(dataset["scene_id"])
    return sum(fractions[scene_id] * count for scene_id, count in views.items()) / sum(views.values())


def finetune_stage(run_dir: Path, config: DemoConfig) -> None:
    """Stage 4: Stage II on the lifted targets (model/) and on the blurred ones (control_blur/), the two runs
    side by side when there are several workers (`workers.run_jobs`)."""
    jobs = []
    for dataset, folder in (("targets", "model"), ("targets_blur", "control_blur")):
        output_dir = run_dir / folder
        # The checkpoints go last, after the model and its card: without them the folder is complete.
        if (output_dir / "model.safetensors").exists() and not (output_dir / "checkpoints").exists():
            print(f"{output_dir} exists: skipped")
            continue
        jobs.append(functools.partial(finetune_model, config, run_dir / dataset, output_dir))
    run_jobs(jobs, resolve_workers(config.workers, len(jobs)))


def finetune_model(config: DemoConfig, dataset_dir: Path, output_dir: Path) -> None:
    """`fit3d_hf.finetune.finetune` and its model card, resuming from the latest checkpoint."""
    finetune_config = FinetuneConfig(
        learning_rate=config.learning_rate,
        max_steps=config.finetune_steps,
        per_device_batch_size=config.finetune_batch_size,
        seed=config.seed,
        checkpointing_steps=max(1, config.finetune_steps // 3),
        checkpoints_total_limit=1,
        logging_steps=5,
    )
    result = finetune(dataset_dir, config.backbone, output_dir, finetune_config, resume_from_checkpoint="latest")
    write_model_card(output_dir, extra=finetune_card_extra(result.training_info, backbone=config.backbone))
    shutil.rmtree(output_dir / "checkpoints", ignore_errors=True)


def evaluate_stage(run_dir: Path, config: DemoConfig) -> None:
    """Stage 5: the probe benchmark with every control, as `fit3d evaluate` runs it, into eval/
    (features and finished probe runs are cached in eval/cache: an interrupted run resumes).

    With several workers (`workers.run_jobs`) each probe seed first runs in a worker (`probe_seed`),
    into the shared cache; this process's pass over every seed then finds the probes trained.
    """
    seeds = list(config.probe_seeds)
    workers = resolve_workers(config.workers, len(seeds))
    if workers > 1:
        run_jobs([functools.partial(probe_seed, run_dir, config, seed) for seed in seeds], workers)
    evaluate(evaluation_arguments(run_dir, config), benchmark_config(config))


def probe_seed(run_dir: Path, config: DemoConfig, seed: int) -> None:
    """A worker's share of stage 5: the probes of one seed, cached in eval/cache (safe to share: each file is
    written atomically and only a dead process's temporaries are removed). Its own report goes to a folder
    removed afterwards; correspondence, which has no seed, is left to the pass over every seed."""
    folder = run_dir / "eval" / f".seed-{seed}"
    args = replace(evaluation_arguments(run_dir, config), output_dir=str(folder))
    benchmark = replace(
        benchmark_config(config), seeds=[seed], tasks=["segmentation", "depth"], cache_dir=str(run_dir / "eval" / "cache")
    )
    # The partial results table is not this stage's: only the pass over every seed prints one.
    with contextlib.redirect_stdout(io.StringIO()):
        evaluate(args, benchmark)
    shutil.rmtree(folder)


def evaluation_arguments(run_dir: Path, config: DemoConfig) -> EvaluationArguments:
    """What stage 5 evaluates: the FiT3DModel in model/ against its original backbone, with every control."""
    return EvaluationArguments(
        output_dir=str(run_dir / "eval"),
        # The baseline is the model's own original backbone: `--backbone` with a random spec would be drawn
        # from --control_seed, another random backbone than the one fine-tuned.
        model=str(run_dir / "model"),
        blur_control=str(run_dir / "control_blur"),
        controls=True,
        control_seed=config.seed + 1234,
        dataset="synthetic",
        num_train_scenes=config.num_probe_train_scenes,
        num_test_scenes=config.num_test_scenes,
        scene_seed=config.probe_scene_seed,
        scene_views=config.scene_views,
        scene_height=config.scene_height,
        scene_width=config.scene_width,
    )


def benchmark_config(config: DemoConfig) -> BenchmarkConfig:
    """How stage 5 probes: the CPU preset at the demo's probe size, seeds and steps."""
    return BenchmarkConfig.cpu_preset(
        image_height=config.probe_height,
        image_width=config.probe_width,
        seeds=list(config.probe_seeds),
        seg_iterations=config.seg_iterations,
        depth_iterations=config.depth_iterations,
    )


def card_stage(run_dir: Path, config: DemoConfig, backbone_name: str) -> None:
    """Stage 8: the FiT3DModel's model card, with replication 0's benchmark results and the verdicts across replications."""
    replications = read_replications(run_dir)
    limitations = (
        f"Trained and evaluated by `fit3d demo` on {config.num_train_scenes} procedural rooms with the backbone "
        f"{backbone_name}; a toy-scale run, not the paper's setting. The results above are this model's (replication 0). "
        f"Verdicts across {replications['n']} independent replication(s) (own fine-tuning rooms, probe rooms and seed each; "
        f"{replications['test']}; better/WORSE only when the CI excludes 0):\n\n"
        + "\n".join(replication_lines(replications["comparisons"]))
    )
    training = (
        f"Stage I: {config.num_train_scenes} procedural rooms ({config.scene_views} views, {config.scene_height}x{config.scene_width}) "
        f"lifted for {config.lift_iterations} steps each (CPU preset). Stage II: {config.finetune_steps} steps, batch "
        f"{config.finetune_batch_size}, AdamW lr {config.learning_rate} (the paper's is 1e-5, which barely moves a tiny ViT), on the rendered targets."
    )
    card_extra = {"model_name": f"fit3d-demo ({backbone_name})", "training": training, "limitations": limitations}
    if base_model := base_model_of(config.backbone):
        card_extra["base_model"] = base_model
    write_model_card(run_dir / "model", eval_results_path=run_dir / "eval" / "results.json", extra=card_extra)


def pictures_stage(run_dir: Path, config: DemoConfig, backbone_name: str) -> None:
    """Stage 6 (replication 0 only): PCA/k-means of original vs FiT3D features on an unseen room's views, and the loss curves."""
    test_scene = make_scenes(config, room_seeds(config)["test"][:1])[0]
    model = FiT3DModel.from_pretrained(run_dir / "model").eval()
    views = test_scene.images(list(range(0, test_scene.num_views, max(1, test_scene.num_views // 3)))[:3])
    patch = backbones.patch_size_of(model.config)
    size = backbones.input_size(*views.shape[-2:], patch)
    views = torch.nn.functional.interpolate(views, size=size, mode="bilinear", align_corners=False, antialias=True)
    with torch.no_grad():
        output = model(backbones.normalize(views, model.config))
    sources = {
        "original": output.original_feature_maps,
        "FiT3D (concat)": output.feature_maps,
        "fine-tuned alone": output.finetuned_feature_maps,
    }
    title = f"unseen room {test_scene.scene_id}; backbone {backbone_name}"
    feature_figure(views, sources, run_dir / "pictures" / "features.png", title=title)
    curves = {}
    for name, folder in (("FiT3D (lifted targets)", "model"), ("control (single-view blurred targets)", "control_blur")):
        info = json.loads((run_dir / folder / "fit3d_finetune.json").read_text())
        curves[name] = info["losses"]
    title = f"Stage II fine-tuning, masked L1 ({backbone_name})"
    loss_curves_figure(curves, run_dir / "pictures" / "loss_finetune.png", title=title)
    lift_reports = [
        json.loads((run_dir / "lifted" / f"{scene_id}.json").read_text()) for scene_id in scene_ids(run_dir)["finetune"]
    ]
    lifting = {r["scene_id"]: r["loss_history"] for r in lift_reports if r.get("loss_history")}
    if lifting:
        title = f"Stage I lifting, total loss (moving average of 10 steps; {backbone_name})"
        loss_curves_figure(lifting, run_dir / "pictures" / "loss_lifting.png", title=title, smooth=10)


def replicate_stage(run_dir: Path, config: DemoConfig) -> None:
    """Stage 7: replications.json, the verdicts across the replications (`report.replicated_comparisons`)."""
    configs = replication_configs(config)
    folders = [Path(c.output_dir) for c in configs]
    record = {
        "n": len(configs),
        "test": TEST,
        "replications": [
            {
                "index": k,
                "folder": str(folder.relative_to(run_dir)) or ".",
                "scene_seed": c.scene_seed,
                "probe_scene_seed": c.probe_scene_seed,
                "seed": c.seed,
            }
            for k, (c, folder) in enumerate(zip(configs, folders, strict=True))
        ],
        "comparisons": replicated_comparisons([read_results(folder) for folder in folders]),
    }
    atomic_write_json(run_dir / "replications.json", record)


def summary_stage(run_dir: Path, config: DemoConfig, backbone_name: str, timings: dict[str, float]) -> None:
    """Stage 9: summary.md (`report.summary_markdown`) and timings.json (this run's seconds per stage)."""
    comparisons = read_replications(run_dir)["comparisons"]
    summary = summary_markdown(run_dir, config, backbone_name, read_results(run_dir), comparisons, timings["total_this_run"])
    atomic_write_text(run_dir / "summary.md", summary + "\n")
    atomic_write_json(run_dir / "timings.json", timings)


def read_results(run_dir: Path) -> dict:
    """The benchmark results the evaluate stage wrote."""
    return json.loads((run_dir / "eval" / "results.json").read_text())


def read_replications(run_dir: Path) -> dict:
    """The verdicts across replications the replicate stage wrote (replications.json)."""
    return json.loads((run_dir / "replications.json").read_text())


def scene_ids(run_dir: Path) -> dict[str, list[str]]:
    """The room ids of each split (scenes.json, written by the scenes stage)."""
    return json.loads((run_dir / "scenes.json").read_text())


def run_demo(config: DemoConfig) -> DemoResult:
    """Run the demo's stages into `config.output_dir` under the rerun rule, and print the summary.

    Each of `config.replications` replications runs the stages up to evaluate in its own folder
    (replication 0 in the run folder, replication k in replications/k: `config.replication_config`);
    then the pictures (of replication 0), the verdicts across replications, the card and the summary
    run once. A finished stage is skipped (so is a finished replication), an interrupted one
    resumes, and a stage made with other settings is refused (`rerun` module). Threads follow
    `fit3d_hf.threads` (`fit3d demo --threads N`, or `fit3d_hf.threads.configure_threads(N)` from Python).

    Raises:
        DemoError: overlapping room seeds, a run folder that is not the demo's or holds other
            settings, or targets too sparse to fine-tune on.
    """
    started = time.perf_counter()
    configs = replication_configs(config)  # refuses overlapping seeds before anything is written
    run_dir = prepare_run_folder(config)
    timings: dict[str, float] = {}
    skipped: list[str] = []
    backbone_name = ""

    def stage(folder: Path, replication: DemoConfig, backbone_name: str, name: str, title: str, work, derived=False) -> None:
        label = str(folder.relative_to(run_dir) / name) if folder != run_dir else name
        print(f"\n[{STAGES.index(name) + 1}/{len(STAGES)}] {title}" + (f" ({folder})" if folder != run_dir else ""), flush=True)
        t = time.perf_counter()
        if not run_stage(folder, name, stage_settings(replication, name, backbone_name), work, redo_when_changed=derived):
            skipped.append(label)
        timings[label] = time.perf_counter() - t

    for index, replication in enumerate(configs):
        folder = run_dir if index == 0 else prepare_run_folder(replication)
        # Loaded per replication: a random backbone spec is drawn from the replication's seed.
        backbone, name = load_backbone_spec(replication.backbone, replication.seed)
        backbone.requires_grad_(False).eval()
        print(
            f"\nfit3d demo, replication {index + 1}/{config.replications}: backbone {name}; rooms from seed "
            f"{replication.scene_seed}, probe rooms from {replication.probe_scene_seed}, seed {replication.seed}; folder {folder}/"
        )
        run_replication(folder, replication, backbone, functools.partial(stage, folder, replication, name))
        backbone_name = backbone_name if index else name  # replication 0's, for the card and the summary

    top = functools.partial(stage, run_dir, config, backbone_name)
    top("pictures", "pictures (replication 0)", lambda: pictures_stage(run_dir, config, backbone_name))
    top(
        "replicate",
        f"verdicts across {config.replications} replication(s)",
        lambda: replicate_stage(run_dir, config),
        derived=True,
    )
    top("card", "model card", lambda: card_stage(run_dir, config, backbone_name), derived=True)
    timings["total_this_run"] = time.perf_counter() - started
    top("summary", "summary", lambda: summary_stage(run_dir, config, backbone_name, dict(timings)), derived=True)

    results = read_results(run_dir)
    replications = read_replications(run_dir)
    print((run_dir / "summary.md").read_text(), end="")
    print("\nWritten:")
    paths = {}
    for name, label, relative in WRITTEN:
        if (run_dir / relative).exists():
            paths[name] = run_dir / relative
            print(f"  {label:<30} {paths[name]}")
    return DemoResult(
        run_dir=run_dir,
        results=results,
        replications=replications,
        verdicts=replication_lines(replications["comparisons"]),
        timings=timings,
        skipped=skipped,
        paths=paths,
    )


def run_replication(run_dir: Path, config: DemoConfig, backbone: torch.nn.Module, stage) -> None:
    """The stages of one replication (scenes to evaluate) in its folder, each through `stage(name, title, work)`."""
    rooms = DemoRooms(config)
    stage("scenes", "scenes", lambda: scenes_stage(run_dir, config, rooms))
    stage(
        "lift",
        f"lift {config.num_train_scenes} rooms ({config.lift_iterations} steps each, CPU preset)",
        lambda: lift_stage(run_dir, config, backbone, rooms.finetune),
    )
    stage(
        "render",
        "render the lifted targets and the single-view blurred control targets",
        lambda: render_stage(run_dir, config, backbone, rooms.finetune),
    )
    stage(
        "finetune",
        f"fine-tune on lifted targets, then on the blurred control ({config.finetune_steps} steps each, lr {config.learning_rate})",
        lambda: finetune_stage(run_dir, config),
    )
    stage("evaluate", "probe benchmark on unseen rooms (original, FiT3D, controls)", lambda: evaluate_stage(run_dir, config))
