"""What the demo reports: the results grid, the verdict lines and summary.md."""

import time
from pathlib import Path

from fit3d_hf.evaluation.report import compare
from fit3d_hf.threads import describe_threads

from .config import DemoConfig

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


def headline(results: dict, source: str, task: str, metric: str) -> dict | None:
    """The results row of one source/task/metric, or None."""
    return next((r for r in results["results"] if (r["source"], r["task"], r["metric"]) == (source, task, metric)), None)


def verdicts(results: dict) -> list[str]:
    """One line per comparison and headline metric: the difference and whether it exceeds the spread.

    The verdict is `evaluation.report.compare`'s (the `≈` rule of the results table): "beyond the
    spread" means |mean_a - mean_b| > max(std_a, std_b), std over probe seeds, or over test rooms
    for the probe-free correspondence metric.
    """
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


def summary_markdown(run_dir: Path, config: DemoConfig, backbone_name: str, results: dict, seconds: float) -> str:
    """summary.md: the setting, the results grid, the verdicts and where the full tables are.

    Args:
        seconds: wall time of this run (stages skipped as complete cost about nothing).
    """
    return "\n".join(
        [
            f"# fit3d demo — {time.strftime('%Y-%m-%d %H:%M %Z')}",
            "",
            f"Backbone: **{backbone_name}**. Fine-tuned on {config.num_train_scenes} rooms; probes trained on "
            f"{config.num_probe_train_scenes} other rooms and tested on {config.num_test_scenes} unseen rooms; "
            f"{len(config.probe_seeds)} probe seeds. Wall time of this run: {seconds:.0f} s "
            f"({describe_threads()}; stages that were already done are skipped and not counted).",
            "",
            results_grid(results),
            "",
            "Which comparisons show an effect beyond the seed spread:",
            "",
            *verdicts(results),
            "",
            "Spread = the larger std of the two sides: over probe seeds, or over test rooms for correspondence (no probe). "
            f"Each fine-tuning ran once (seed {config.seed}), so its own variance is not in the spread: a difference just above it is weak evidence.",
            "",
            "Full tables (all metrics): " + str(run_dir / "eval" / "results.md"),
        ]
    )
