"""What the demo reports: the results grid, the verdicts across replications (replications.json) and summary.md."""

import time
from collections.abc import Sequence
from pathlib import Path

from fit3d_hf.evaluation.replication import TEST, replicate
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


def p_value(p: float) -> str:
    """A p-value as printed: three decimals, or "<0.001"."""
    return f"{p:.3f}" if p >= 0.001 else "<0.001"


def replicated_comparisons(results: Sequence[dict]) -> list[dict]:
    """Every comparison x headline metric over the replications' results (one results.json each).

    Returns:
        One dict per comparison and metric present in every replication: a, b, meaning, label, task,
        metric, higher_is_better and `evaluation.replication.Replicated.to_dict()` (differences, n, mean,
        sem, ci_low, ci_high, t_p, sign_p, verdict); each difference is mean a - mean b within a replication.
    """
    rows = []
    for a, b, meaning in COMPARISONS:
        for task, metric, label, higher in HEADLINE_METRICS:
            pairs = [(headline(r, a, task, metric), headline(r, b, task, metric)) for r in results]
            if not pairs or any(row_a is None or row_b is None for row_a, row_b in pairs):
                continue
            replicated = replicate([row_a["mean"] - row_b["mean"] for row_a, row_b in pairs], higher)
            rows.append(
                dict(a=a, b=b, meaning=meaning, label=label, task=task, metric=metric, higher_is_better=higher)
                | replicated.to_dict()
            )
    return rows


def replication_lines(comparisons: Sequence[dict]) -> list[str]:
    """One line per comparison: each metric's mean difference, its 95% CI, both p-values and the verdict."""
    lines = []
    for meaning in dict.fromkeys(c["meaning"] for c in comparisons):
        parts = []
        for c in (c for c in comparisons if c["meaning"] == meaning):
            if c["n"] == 1:
                parts.append(f"{c['label']} {c['mean']:+.4f} ({c['verdict']})")
            else:
                parts.append(
                    f"{c['label']} {c['mean']:+.4f} [95% CI {c['ci_low']:+.4f}, {c['ci_high']:+.4f}; "
                    f"t-test p {p_value(c['t_p'])}, sign test p {p_value(c['sign_p'])}: {c['verdict']}]"
                )
        n = comparisons[0]["n"]
        lines.append(f"- {meaning}, n = {n}: " + "; ".join(parts))
    return lines


def replication_table(comparisons: Sequence[dict]) -> str:
    """Markdown table: comparison, metric, n, mean difference, 95% CI, t-test p, sign-test p, verdict."""
    lines = [
        "| comparison (a − b) | metric | n | mean a − b | 95% CI | t-test p | sign test p | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in comparisons:
        ci = "–" if c["n"] == 1 else f"[{c['ci_low']:+.4f}, {c['ci_high']:+.4f}]"
        t_p = "–" if c["t_p"] is None else p_value(c["t_p"])
        lines.append(
            f"| {c['a']} − {c['b']} | {c['label']} {'↑' if c['higher_is_better'] else '↓'} | {c['n']} | {c['mean']:+.4f} | "
            f"{ci} | {t_p} | {p_value(c['sign_p'])} | {c['verdict']} |"
        )
    return "\n".join(lines)


def verdicts(results: dict) -> list[str]:
    """Within ONE replication: one line per comparison and headline metric, the difference and whether it
    exceeds the probe-seed spread (which leaves out the variation between rooms and fine-tuning seeds).

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


def summary_markdown(
    run_dir: Path, config: DemoConfig, backbone_name: str, results: dict, comparisons: Sequence[dict], seconds: float
) -> str:
    """summary.md: the setting, replication 0's results grid, the verdicts across replications, replication 0's
    probe-seed spread (labelled as such) and where the full tables are.

    Args:
        results: replication 0's results (the run folder's eval/results.json).
        comparisons: `replicated_comparisons` over every replication (replications.json).
        seconds: wall time of this run (stages skipped as complete cost about nothing).
    """
    n = config.replications
    return "\n".join(
        [
            f"# fit3d demo — {time.strftime('%Y-%m-%d %H:%M %Z')}",
            "",
            f"Backbone: **{backbone_name}**. {n} replication(s), each with its own rooms and fine-tuning seed: fine-tuned on "
            f"{config.num_train_scenes} rooms; probes trained on {config.num_probe_train_scenes} other rooms and tested on "
            f"{config.num_test_scenes} unseen rooms; {len(config.probe_seeds)} probe seeds. Wall time of this run: {seconds:.0f} s "
            f"({describe_threads()}; stages that were already done are skipped and not counted).",
            "",
            f"Replication 0 (rooms from seed {config.scene_seed}, probe rooms from {config.probe_scene_seed}, seed {config.seed}):",
            "",
            results_grid(results),
            "",
            f"Verdicts across replications ({TEST}; better/WORSE only when the CI excludes 0):",
            "",
            replication_table(comparisons),
            "",
            "Replication 0 alone, spread over probe seeds only (it leaves out the variation between rooms and "
            "fine-tuning seeds, which is larger: not evidence of an effect):",
            "",
            *verdicts(results),
            "",
            "Full tables (all metrics): "
            + str(run_dir / "eval" / "results.md")
            + ("; every replication's: replications/*/eval/results.md" if n > 1 else ""),
        ]
    )
