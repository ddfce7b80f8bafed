"""The benchmark's report: results.json, the "baseline vs FiT3D" tables, and the verdict rule.

Results JSON (written by `write_report`, read by `fit3d_hf.hub` for model cards):

```
{"fit3d_hf_version": "0.1.0",
 "protocol": {"protocol": "paper" or "fixed", pipelines or image size, probe optimisation, seeds...},
 "sources": {"original": {"role": "baseline", "description": "..."},
             "fit3d": {"role": "fit3d", ...}, "blur_control": {"role": "control", ...}},
 "results": [{"dataset": "synthetic", "split": "test", "task": "segmentation",
              "metric": "mean_iou", "source": "fit3d", "values": [0.51, 0.52, 0.5],
              "mean": 0.51, "std": 0.008, "higher_is_better": true}, ...]}
```

`compare` is the one rule that says whether two results rows differ beyond their spread: the
tables' `≈` and the demo's verdict lines both use it.
"""

import os
from dataclasses import dataclass
from pathlib import Path

from ..io import atomic_write_json, atomic_write_text

# metric key in the results JSON -> (display name, model-index metric type: one per metric, never repeated)
METRIC_NAMES = {
    "mean_iou": ("mIoU", "mean_iou"),
    "mean_accuracy": ("mean acc", "mean_accuracy"),
    "overall_accuracy": ("overall acc", "accuracy"),
    "delta1": ("δ1", "delta1"),
    "delta2": ("δ2", "delta2"),
    "delta3": ("δ3", "delta3"),
    "abs_rel": ("AbsRel", "abs_rel"),
    "sq_rel": ("SqRel", "sq_rel"),
    "rmse": ("RMSE", "rmse"),
    "rmse_log": ("RMSE-log", "rmse_log"),
    "log10": ("log10", "log10"),
    "silog": ("SILog", "silog"),
}
NO_EFFECT = "no effect beyond the spread"


@dataclass(frozen=True)
class Comparison:
    """Row a against row b of the same task and metric.

    Attributes:
        difference: mean of a - mean of b.
        spread: the larger std of the two (over probe seeds, or over test scenes for the
            probe-free correspondence metric).
        verdict: "better" or "WORSE" (for a, by the metric's direction) when |difference| >
            spread, else "no effect beyond the spread".
    """

    difference: float
    spread: float
    verdict: str

    @property
    def within_spread(self) -> bool:
        return self.verdict == NO_EFFECT


def compare(row_a: dict, row_b: dict) -> Comparison:
    """Compare two results rows: a difference no larger than the spread is no effect, since the
    seeds cannot tell the two apart."""
    difference = row_a["mean"] - row_b["mean"]
    spread = max(row_a["std"], row_b["std"])
    if abs(difference) <= spread:
        verdict = NO_EFFECT
    else:
        verdict = "better" if (difference > 0) == row_a.get("higher_is_better", True) else "WORSE"
    return Comparison(difference, spread, verdict)


def _ordered_sources(results: dict) -> list[str]:
    order = {"baseline": 0, "fit3d": 1, "control": 2}
    names = list(results["sources"])
    return sorted(names, key=lambda n: (order.get(results["sources"][n].get("role"), 3), names.index(n)))


def results_table(results: dict) -> str:
    """Markdown tables "baseline vs FiT3D" with the controls beside them, one per dataset.

    Each cell is `mean ± std` over probe seeds; other columns also show the difference to
    the baseline, marked `≈` when `compare` finds it no larger than the spread (the larger of
    the two standard deviations), i.e. when the seeds cannot tell the two apart.
    """
    sources = _ordered_sources(results)
    baseline = next((n for n in sources if results["sources"][n].get("role") == "baseline"), None)
    rows: dict[tuple[str, str, str], dict[str, dict]] = {}
    for row in results["results"]:
        rows.setdefault((row["dataset"], row["task"], row["metric"]), {})[row["source"]] = row
    lines: list[str] = []
    datasets = list(dict.fromkeys(key[0] for key in rows))
    for dataset in datasets:
        header = ["task", "metric"] + [f"{n} ({results['sources'][n].get('role', '')})" for n in sources]
        lines += [f"**{dataset}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for (ds, task, metric), by_source in rows.items():
            if ds != dataset:
                continue
            any_row = next(iter(by_source.values()))
            arrow = "↑" if any_row.get("higher_is_better", True) else "↓"
            cells = [task, f"{METRIC_NAMES.get(metric, (metric,))[0]} {arrow}"]
            base = by_source.get(baseline)
            for name in sources:
                row = by_source.get(name)
                if row is None:
                    cells.append("–")
                    continue
                cell = f"{row['mean']:.4f} ± {row['std']:.4f}"
                if base is not None and name != baseline:
                    comparison = compare(row, base)
                    cell += f" ({comparison.difference:+.4f}{' ≈' if comparison.within_spread else ''})"
                cells.append(cell)
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    n_seeds = len(results["protocol"].get("seeds", []))
    lines.append(
        f"mean ± std over {n_seeds} probe seed(s); (±x) is the difference to the baseline; "
        "≈ marks a difference no larger than the spread (the larger of the two std)."
    )
    if any(row["task"] == "correspondence" for row in results["results"]):
        lines.append("Correspondence recall has no probe: its ± is the spread over test scenes.")
    return "\n".join(lines)


def write_report(results: dict, output_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write `results.json` and `results.md` (the "baseline vs FiT3D" tables) atomically."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = output_dir / "results.json", output_dir / "results.md"
    atomic_write_json(json_path, results)
    protocol = results["protocol"]
    if protocol.get("protocol") == "paper":
        how = "protocol paper (the dataset's official probe pipelines: augmented crops, sliding-window / flip-averaged test)"
    else:
        how = "protocol fixed (features once per image at one size, no augmentation, whole-image test)"
    lines = [
        "# Probe benchmark: baseline vs FiT3D",
        "",
        f"fit3d_hf {results['fit3d_hf_version']}; trained on {protocol['train_dataset']['name']} "
        f"({protocol['train_dataset']['images']} images), tested on {protocol['test_dataset']['name']} "
        f"({protocol['test_dataset']['images']} unseen images); {how}; seeds {protocol['seeds']}; device {protocol['device']}.",
        "",
        results_table(results),
        "",
        "Sources:",
        "",
    ]
    for name, source in results["sources"].items():
        models = " + ".join(
            f"{m['family']}{'/' + m['assembly'] if m['assembly'] else ''} (width {m['hidden_size']})" for m in source["models"]
        )
        size = source.get("input_size")
        where = f"input {size[0]}×{size[1]}" if size else "input: the pipeline's crops, centre-padded to a patch multiple"
        lines.append(f"- **{name}** ({source['role']}): {source['description'] or models}; {where}")
    atomic_write_text(md_path, "\n".join(lines) + "\n")
    return json_path, md_path
