import pytest

from fit3d_hf.evaluation import BenchmarkConfig, EvaluationArguments, evaluate
from fit3d_hf.evaluation.report import NO_EFFECT, compare, results_table


def _row(source, mean, std, higher=True, metric="rmse"):
    return dict(
        dataset="synthetic",
        split="test",
        task="depth",
        metric=metric,
        source=source,
        values=[mean],
        mean=mean,
        std=std,
        higher_is_better=higher,
    )


def test_compare_is_the_spread_rule_with_the_metric_direction():
    lower = compare(_row("a", 0.75, 0.01, higher=False), _row("b", 0.70, 0.02, higher=False))
    assert lower.difference == pytest.approx(0.05) and lower.spread == 0.02 and lower.verdict == "WORSE"
    assert compare(_row("a", 0.65, 0.01, higher=False), _row("b", 0.70, 0.01, higher=False)).verdict == "better"
    assert compare(_row("a", 0.75, 0.01), _row("b", 0.70, 0.01)).verdict == "better"
    # a difference equal to the spread cannot be told from seed noise
    tie = compare(_row("a", 0.5, 0.25), _row("b", 0.25, 0.0))
    assert tie.verdict == NO_EFFECT and tie.within_spread


def test_results_table_marks_what_compare_calls_no_effect():
    results = {
        "protocol": {"seeds": [0]},
        "sources": {"original": {"role": "baseline"}, "fit3d": {"role": "fit3d"}, "control": {"role": "control"}},
        "results": [_row("original", 0.5, 0.25), _row("fit3d", 0.75, 0.0), _row("control", 1.0, 0.0)],
    }
    line = next(line for line in results_table(results).splitlines() if "RMSE" in line)
    assert "(+0.2500 ≈)" in line and "(+0.5000)" in line


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"dataset": "hf"}, "needs hf_dataset"),
        ({"dataset": "nyuv2"}, "needs data_root"),
        ({"dataset": "nyu", "data_root": "x"}, "unknown dataset 'nyu'"),
        ({"dataset": "ade20k", "data_root": "x"}, "none of the tasks"),
    ],
)
def test_evaluate_names_bad_arguments_before_loading_anything(tmp_path, changes, message):
    args = EvaluationArguments(output_dir=str(tmp_path / "eval"), model=str(tmp_path / "no-model"), **changes)
    with pytest.raises(ValueError, match=message):
        evaluate(args, BenchmarkConfig(tasks=["depth", "correspondence"]))
    assert not (tmp_path / "eval").exists()
