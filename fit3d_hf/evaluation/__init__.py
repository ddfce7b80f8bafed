"""Evaluation: linear probes (segmentation, depth) and a multi-view correspondence metric.

The entry point is `evaluate(EvaluationArguments, BenchmarkConfig)`: a FiT3DModel folder
against its original backbone and the controls, on synthetic rooms, a paper dataset or a
`datasets` folder; it writes results.json and results.md (`report`). `run_benchmark` and
`benchmark_on_scenes` compare any frozen feature sources in memory.
"""

from .benchmark import BenchmarkConfig, EvaluationArguments, benchmark_on_scenes, evaluate, run_benchmark
from .data import EvalDataset, from_hf_dataset, from_scenes, load_eval_dataset
from .metrics import DepthMetrics, MeanIoU
from .report import Comparison, compare, results_table, write_report

__all__ = [
    "BenchmarkConfig",
    "Comparison",
    "DepthMetrics",
    "EvalDataset",
    "EvaluationArguments",
    "MeanIoU",
    "benchmark_on_scenes",
    "compare",
    "evaluate",
    "from_hf_dataset",
    "from_scenes",
    "load_eval_dataset",
    "results_table",
    "run_benchmark",
    "write_report",
]
