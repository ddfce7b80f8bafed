"""Linear-probe benchmarks (segmentation, depth) and a multi-view correspondence metric.

See `benchmark` for the entry points (`run_benchmark`, `benchmark_on_scenes`, `write_report`).
"""

from .benchmark import BenchmarkConfig, benchmark_on_scenes, run_benchmark, write_report
from .datasets import EvalDataset, from_hf_dataset, from_scenes, load_eval_dataset
from .metrics import DepthMetrics, MeanIoU

__all__ = [
    "BenchmarkConfig",
    "DepthMetrics",
    "EvalDataset",
    "MeanIoU",
    "benchmark_on_scenes",
    "from_hf_dataset",
    "from_scenes",
    "load_eval_dataset",
    "run_benchmark",
    "write_report",
]
