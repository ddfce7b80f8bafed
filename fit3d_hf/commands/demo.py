"""`fit3d demo`: the whole FiT3D pipeline on procedural rooms, on a CPU, in minutes."""

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fit3d_hf.commands import parse_args
from fit3d_hf.io import atomic_write_json

DESCRIPTION = """Run the whole FiT3D pipeline on synthetic rooms and show what it achieved.

Stages (each writes its artifact into --output_dir atomically; a rerun skips finished stages and
resumes an interrupted one; --fresh starts over):
  1 scenes    procedural rooms: fine-tuning rooms (seeds scene_seed..), probe rooms (probe_scene_seed..)
  2 lift      Stage I: lift the backbone's features of each fine-tuning room into feature Gaussians
  3 render    the lifted targets dataset, and the single-view blurred-target control dataset
  4 finetune  Stage II on the lifted targets (the FiT3D model) and on the blurred ones (the control)
  5 evaluate  linear probes (segmentation, depth) and 3D correspondence on unseen rooms for:
              original | FiT3D concat | fine-tuned alone | blur-target control | concat with a random ViT
  6 card      the FiT3DModel folder gets a model card with the results
  7 pictures  PCA / k-means of original vs FiT3D features, loss curves (PNG)
  8 summary   the results table, which comparisons show an effect beyond the seed spread, paths

--backbone embedded (default) is the package's own small ViT, pre-trained on synthetic rooms (see
fit3d_hf/embedded.py); --backbone facebook/dinov2-small or a local folder runs a real model where
it is available (no download happens here when HF_HUB_OFFLINE=1).

  fit3d demo                                   # about 3.5 minutes on 2 CPU cores
  fit3d demo --backbone /models/dinov2-small   # a real backbone (slower)
  fit3d demo --fresh                           # start over
"""

STAGES = ("scenes", "lift", "render", "finetune", "evaluate", "card", "pictures", "summary")
# Settings that change an artifact: a rerun with other values must not mix old and new results.
RUN_SETTINGS = (
    "backbone",
    "num_train_scenes",
    "num_probe_train_scenes",
    "num_test_scenes",
    "scene_views",
    "scene_height",
    "scene_width",
    "scene_seed",
    "probe_scene_seed",
    "seed",
    "lift_iterations",
    "lift_max_gaussians",
    "lift_init_points",
    "blur_sigma",
    "finetune_steps",
    "finetune_batch_size",
    "learning_rate",
    "probe_seeds",
    "seg_iterations",
    "depth_iterations",
    "probe_height",
    "probe_width",
)
# Headline metric per task: (task, metric, label, higher is better).
HEADLINE_METRICS = (
    ("segmentation", "mean_iou", "mIoU", True),
    ("depth", "rmse", "depth RMSE (m)", False),
    ("correspondence", "recall@16px", "corr. recall@16px", True),
)
# The comparisons the demo reports: (source a, source b, what a difference would mean).
COMPARISONS = (
    ("fit3d", "original", "FiT3D concat vs the original backbone (the paper's headline)"),
    ("fit3d", "concat_random", "FiT3D concat vs concat with an unrelated random ViT (is it more than probe capacity?)"),
    ("finetuned_only", "blur_control", "fine-tuned alone vs fine-tuned on single-view blurred targets (is it the 3D?)"),
    ("finetuned_only", "original", "fine-tuned alone vs the original backbone (same width)"),
)


@dataclass
class DemoArguments:
    output_dir: str = field(default="fit3d-demo", metadata={"help": "Run folder (resumable)."})
    backbone: str = field(
        default="embedded",
        metadata={
            "help": "'embedded' (the package's small SimMIM-pretrained ViT), or a folder / Hub id of a transformers backbone."
        },
    )
    num_train_scenes: int = field(
        default=3, metadata={"help": "Rooms lifted and fine-tuned on (seeds scene_seed, scene_seed+1, ...)."}
    )
    num_probe_train_scenes: int = field(
        default=3, metadata={"help": "Other rooms the linear probes train on (seeds probe_scene_seed, ...)."}
    )
    num_test_scenes: int = field(default=2, metadata={"help": "Unseen rooms the probes and correspondence are tested on."})
    scene_views: int = field(default=16, metadata={"help": "Views per room."})
    scene_height: int = field(default=120, metadata={"help": "Room image height."})
    scene_width: int = field(default=160, metadata={"help": "Room image width."})
    scene_seed: int = field(default=0, metadata={"help": "Seed of the first fine-tuning room."})
    probe_scene_seed: int = field(
        default=1000, metadata={"help": "Seed of the first probe room (test rooms follow the probe-train rooms)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of lifting, fine-tuning and the random-ViT control."})
    lift_iterations: int = field(default=300, metadata={"help": "Lifting steps per room (CPU preset otherwise)."})
    lift_max_gaussians: int = field(default=8_000, metadata={"help": "Cap on Gaussians per room."})
    lift_init_points: int = field(default=4_000, metadata={"help": "Initial Gaussians per room (from the room's points)."})
    blur_sigma: float = field(default=1.0, metadata={"help": "Blur of the single-view control targets, in patch-grid cells."})
    finetune_steps: int = field(default=250, metadata={"help": "Fine-tuning steps (each run)."})
    finetune_batch_size: int = field(default=8, metadata={"help": "Views per fine-tuning step."})
    learning_rate: float = field(
        default=1e-4, metadata={"help": "Fine-tuning lr (10x the paper's: 1e-5 barely moves a tiny ViT)."}
    )
    probe_seeds: list[int] = field(
        default_factory=lambda: [0, 1, 2], metadata={"help": "Probe seeds (the spread the verdicts use)."}
    )
    seg_iterations: int = field(default=300, metadata={"help": "Steps of each segmentation probe."})
    depth_iterations: int = field(default=150, metadata={"help": "Steps of each depth probe (the costlier one)."})
    probe_height: int = field(default=96, metadata={"help": "Image height fed to every source by the probes."})
    probe_width: int = field(default=128, metadata={"help": "Image width fed to every source by the probes."})
    fresh: bool = field(default=False, metadata={"help": "Delete the run folder's previous results and start over."})
    threads: int = field(default=0, metadata={"help": "torch threads (0: torch's default, all cores)."})


def prepare_run_folder(args: DemoArguments, backbone_name: str) -> Path:
    """Create (or, with --fresh, recreate) the run folder; refuse to mix settings of different runs."""
    out = Path(args.output_dir)
    settings = {key: getattr(args, key) for key in RUN_SETTINGS} | {"backbone_name": backbone_name}
    record = out / "demo.json"
    if out.exists() and any(out.iterdir()) and not record.exists():
        raise SystemExit(f"fit3d demo: {out} exists and is not a demo run folder (no demo.json); choose another --output_dir")
    if args.fresh and out.exists():
        shutil.rmtree(out)
    if record.exists():
        previous = json.loads(record.read_text())["settings"]
        changed = {k: (previous.get(k), v) for k, v in settings.items() if previous.get(k) != v}
        if changed:
            listed = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
            raise SystemExit(
                f"fit3d demo: {out} holds a run with other settings ({listed}); add --fresh or choose another --output_dir"
            )
        return out
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(record, {"settings": settings, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")})
    return out


def room_seeds(args: DemoArguments) -> dict[str, list[int]]:
    """Seeds of the fine-tuning rooms, the probe-training rooms and the unseen test rooms (disjoint)."""
    probe_test_seed = args.probe_scene_seed + args.num_probe_train_scenes
    seeds = {
        "finetune": list(range(args.scene_seed, args.scene_seed + args.num_train_scenes)),
        "probe_train": list(range(args.probe_scene_seed, probe_test_seed)),
        "test": list(range(probe_test_seed, probe_test_seed + args.num_test_scenes)),
    }
    overlap = set(seeds["finetune"]) & set(seeds["probe_train"] + seeds["test"])
    if overlap:
        raise SystemExit(f"fit3d demo: fine-tuning and probe rooms share seeds {sorted(overlap)}; move --probe_scene_seed")
    return seeds


def make_scenes(args: DemoArguments, seeds: list[int]) -> list:
    """Procedural rooms of the demo's size (deterministic in the seed, so regenerated on a rerun)."""
    from fit3d_hf.scenes.synthetic import make_room

    size = dict(num_views=args.scene_views, height=args.scene_height, width=args.scene_width)
    return [make_room(seed, **size) for seed in tqdm(seeds, desc="rooms", unit="room")]


def target_coverage(dataset_dir: Path) -> float:
    """Fraction of patch-grid cells whose target is valid (mask = 1) over a targets dataset."""
    from collections import Counter

    from fit3d_hf.targets import load_targets, targets_metadata

    dataset = load_targets(dataset_dir)
    # render_targets already measured each scene's valid fraction: weight it by the scene's views.
    fractions = targets_metadata(dataset)["valid_fraction"]
    views = Counter(dataset["scene_id"])
    return sum(fractions[scene_id] * count for scene_id, count in views.items()) / sum(views.values())


def finetune_run(args: DemoArguments, dataset_dir: Path, output_dir: Path) -> None:
    """Stage II (`fit3d_hf.finetune.finetune`) and its model card, resuming from the latest checkpoint."""
    from fit3d_hf.finetune import FinetuneConfig, finetune
    from fit3d_hf.hub import finetune_card_extra, write_model_card

    config = FinetuneConfig(
        learning_rate=args.learning_rate,
        max_steps=args.finetune_steps,
        per_device_batch_size=args.finetune_batch_size,
        seed=args.seed,
        checkpointing_steps=max(1, args.finetune_steps // 3),
        checkpoints_total_limit=1,
        logging_steps=5,
    )
    result = finetune(dataset_dir, args.backbone, output_dir, config, resume_from_checkpoint="latest")
    write_model_card(output_dir, extra=finetune_card_extra(result.training_info, backbone=args.backbone))
    shutil.rmtree(output_dir / "checkpoints", ignore_errors=True)


def evaluate_run(args: DemoArguments, out: Path) -> dict:
    """The probe benchmark with every control, as `fit3d evaluate` runs it (cached in eval/cache: resumable)."""
    from fit3d_hf.evaluation import BenchmarkConfig, EvaluationArguments, evaluate

    eval_args = EvaluationArguments(
        output_dir=str(out / "eval"),
        model=str(out / "model"),
        baseline=args.backbone,
        blur_control=str(out / "control_blur"),
        controls=True,
        control_seed=args.seed + 1234,
        dataset="synthetic",
        num_train_scenes=args.num_probe_train_scenes,
        num_test_scenes=args.num_test_scenes,
        scene_seed=args.probe_scene_seed,
        scene_views=args.scene_views,
        scene_height=args.scene_height,
        scene_width=args.scene_width,
    )
    config = BenchmarkConfig.cpu_preset(
        image_height=args.probe_height,
        image_width=args.probe_width,
        seeds=list(args.probe_seeds),
        seg_iterations=args.seg_iterations,
        depth_iterations=args.depth_iterations,
    )
    return evaluate(eval_args, config)


def headline(results: dict, source: str, task: str, metric: str) -> dict | None:
    """The results row of one source/task/metric, or None."""
    return next((r for r in results["results"] if (r["source"], r["task"], r["metric"]) == (source, task, metric)), None)


def verdicts(results: dict) -> list[str]:
    """One line per comparison and headline metric: the difference and whether it exceeds the spread.

    The verdict is `evaluation.report.compare`'s (the `≈` rule of the results table): "beyond the
    spread" means |mean_a - mean_b| > max(std_a, std_b), std over probe seeds, or over test rooms
    for the probe-free correspondence metric.
    """
    from fit3d_hf.evaluation.report import compare

    lines = []
    for a, b, meaning in COMPARISONS:
        parts = []
        for task, metric, label, _ in HEADLINE_METRICS:
            row_a, row_b = headline(results, a, task, metric), headline(results, b, task, metric)
            if row_a is None or row_b is None:
                continue
            comparison = compare(row_a, row_b)
            parts.append(f"{label} {comparison.difference:+.4f} (spread {comparison.spread:.4f}: {comparison.verdict})")
        if parts:
            lines.append(f"- {meaning}: " + "; ".join(parts))
    return lines


def results_grid(results: dict) -> str:
    """A compact markdown table: one row per source, the headline metrics as mean ± std."""
    header = (
        "| source | role | " + " | ".join(f"{label} {'↑' if higher else '↓'}" for _, _, label, higher in HEADLINE_METRICS) + " |"
    )
    lines = [header, "|" + "---|" * (2 + len(HEADLINE_METRICS))]
    for name, source in results["sources"].items():
        cells = []
        for task, metric, _, _ in HEADLINE_METRICS:
            row = headline(results, name, task, metric)
            cells.append("–" if row is None else f"{row['mean']:.4f} ± {row['std']:.4f}")
        lines.append(f"| {name} | {source['role']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def make_pictures(out: Path, test_scene, lift_reports: list[dict], backbone_name: str) -> list[Path]:
    """PCA/k-means of original vs FiT3D features on unseen views, and the loss curves."""
    from fit3d_hf import FiT3DModel, backbones
    from fit3d_hf.viz import feature_figure, loss_curves_figure

    model = FiT3DModel.from_pretrained(out / "model").eval()
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
    paths = [
        feature_figure(
            views,
            sources,
            out / "pictures" / "features.png",
            title=f"unseen room {test_scene.scene_id}; backbone {backbone_name}",
        )
    ]
    curves = {}
    for name, folder in (("FiT3D (lifted targets)", "model"), ("control (single-view blurred targets)", "control_blur")):
        info = json.loads((out / folder / "fit3d_finetune.json").read_text())
        curves[name] = info["losses"]
    paths.append(
        loss_curves_figure(
            curves, out / "pictures" / "loss_finetune.png", title=f"Stage II fine-tuning, masked L1 ({backbone_name})"
        )
    )
    lifting = {r["scene_id"]: r["loss_history"] for r in lift_reports if r.get("loss_history")}
    if lifting:
        title = f"Stage I lifting, total loss (moving average of 10 steps; {backbone_name})"
        paths.append(loss_curves_figure(lifting, out / "pictures" / "loss_lifting.png", title=title, smooth=10))
    return paths


def main(argv: list[str] | None = None) -> dict:
    (args,) = parse_args((DemoArguments,), argv, prog="fit3d demo", description=DESCRIPTION)
    if args.threads:
        torch.set_num_threads(args.threads)
    from fit3d_hf.backbone_specs import load_backbone_spec
    from fit3d_hf.hub import base_model_of, write_model_card
    from fit3d_hf.lift import LiftConfig, lift_scenes, summary_table
    from fit3d_hf.targets import render_targets

    started = time.perf_counter()
    backbone, backbone_name = load_backbone_spec(args.backbone, args.seed)
    backbone.requires_grad_(False).eval()
    out = prepare_run_folder(args, backbone_name)
    print(f"fit3d demo: backbone {backbone_name}; run folder {out}/")
    timings = {}

    def stage(index: int, name: str) -> float:
        print(f"\n[{index}/8] {name}", flush=True)
        return time.perf_counter()

    t = stage(1, "scenes")
    seeds = room_seeds(args)
    scenes = make_scenes(args, seeds["finetune"])
    atomic_write_json(out / "scenes.json", {split: [f"room_{seed:04d}" for seed in group] for split, group in seeds.items()})
    timings["scenes"] = time.perf_counter() - t

    t = stage(2, f"lift {args.num_train_scenes} rooms ({args.lift_iterations} steps each, CPU preset)")
    lift_config = LiftConfig.cpu_preset(
        iterations=args.lift_iterations, max_gaussians=args.lift_max_gaussians, init_points=args.lift_init_points
    )
    lift_reports = lift_scenes(scenes, backbone, lift_config, output_dir=out / "lifted", seed=args.seed)
    print(summary_table(lift_reports))
    timings["lift"] = time.perf_counter() - t

    t = stage(3, "render the lifted targets and the single-view blurred control targets")
    for folder, source in (("targets", "lifted"), ("targets_blur", "single_view_blur")):
        if (out / folder).exists():
            print(f"{out / folder} exists: skipped")
            continue
        render_targets(
            scenes, backbone, out / folder, gaussians_dir=out / "lifted", target_source=source, blur_sigma=args.blur_sigma
        )
    coverage = target_coverage(out / "targets")
    print(f"lifted targets cover {coverage:.0%} of the patch grid (render alpha >= 0.5)")
    if coverage < 0.05:
        raise SystemExit(
            f"fit3d demo: the lifted targets cover only {coverage:.1%} of the views: lifting has not converged "
            f"(see {out / 'lifted'}/*.json); raise --lift_iterations and rerun with --fresh"
        )
    timings["render"] = time.perf_counter() - t

    t = stage(
        4, f"fine-tune on lifted targets, then on the blurred control ({args.finetune_steps} steps each, lr {args.learning_rate})"
    )
    for dataset, folder in (("targets", "model"), ("targets_blur", "control_blur")):
        if (out / folder / "model.safetensors").exists():
            print(f"{out / folder} exists: skipped")
            continue
        finetune_run(args, out / dataset, out / folder)
    timings["finetune"] = time.perf_counter() - t

    t = stage(5, "probe benchmark on unseen rooms (original, FiT3D, controls)")
    if (out / "eval" / "results.json").exists():
        print(f"{out / 'eval' / 'results.json'} exists: skipped")
        results = json.loads((out / "eval" / "results.json").read_text())
    else:
        results = evaluate_run(args, out)
    timings["evaluate"] = time.perf_counter() - t

    t = stage(6, "model card")
    verdict_lines = verdicts(results)
    limitations = (
        f"Trained and evaluated by `fit3d demo` on {args.num_train_scenes} procedural rooms with the backbone "
        f"{backbone_name}; a toy-scale run, not the paper's setting. What the probes show, with the spread over "
        f"{len(args.probe_seeds)} probe seeds:\n\n" + "\n".join(verdict_lines)
    )
    training = (
        f"Stage I: {args.num_train_scenes} procedural rooms ({args.scene_views} views, {args.scene_height}x{args.scene_width}) "
        f"lifted for {args.lift_iterations} steps each (CPU preset). Stage II: {args.finetune_steps} steps, batch "
        f"{args.finetune_batch_size}, AdamW lr {args.learning_rate} (10x the paper's: 1e-5 barely moves a tiny ViT), on the rendered targets."
    )
    card_extra = {"model_name": f"fit3d-demo ({backbone_name})", "training": training, "limitations": limitations}
    if base_model := base_model_of(args.backbone):
        card_extra["base_model"] = base_model
    card = write_model_card(out / "model", eval_results_path=out / "eval" / "results.json", extra=card_extra)
    timings["card"] = time.perf_counter() - t

    t = stage(7, "pictures")
    pictures = make_pictures(out, make_scenes(args, seeds["test"][:1])[0], lift_reports, backbone_name)
    timings["pictures"] = time.perf_counter() - t

    stage(8, "summary")
    timings["total_this_run"] = time.perf_counter() - started
    summary = "\n".join(
        [
            f"# fit3d demo — {time.strftime('%Y-%m-%d %H:%M %Z')}",
            "",
            f"Backbone: **{backbone_name}**. Fine-tuned on {args.num_train_scenes} rooms; probes trained on "
            f"{args.num_probe_train_scenes} other rooms and tested on {args.num_test_scenes} unseen rooms; "
            f"{len(args.probe_seeds)} probe seeds. Wall time of this run: {timings['total_this_run']:.0f} s "
            f"({torch.get_num_threads()} threads; stages that were already done are skipped and not counted).",
            "",
            results_grid(results),
            "",
            "Which comparisons show an effect beyond the seed spread:",
            "",
            *verdict_lines,
            "",
            "Spread = the larger std of the two sides: over probe seeds, or over test rooms for correspondence (no probe). "
            f"Each fine-tuning ran once (seed {args.seed}), so its own variance is not in the spread: a difference just above it is weak evidence.",
            "",
            "Full tables (all metrics): " + str(out / "eval" / "results.md"),
        ]
    )
    (out / "summary.md").write_text(summary + "\n")
    atomic_write_json(out / "timings.json", timings)
    print(summary)
    print("\nWritten:")
    for label, path in (
        ("FiT3DModel (with model card)", out / "model"),
        ("model card", card),
        ("blur-target control model", out / "control_blur"),
        ("lifted Gaussians", out / "lifted"),
        ("targets datasets", out / "targets"),
        ("benchmark", out / "eval" / "results.md"),
        *(("picture", p) for p in pictures),
        ("summary", out / "summary.md"),
        ("stage timings", out / "timings.json"),
    ):
        print(f"  {label:<30} {path}")
    return {"results": results, "timings": timings, "verdicts": verdict_lines}


if __name__ == "__main__":
    main()
