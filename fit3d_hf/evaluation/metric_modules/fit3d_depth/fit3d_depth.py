"""Monocular depth metrics (DINOv2 / Monocular-Depth-Estimation-Toolbox protocol) as an `evaluate`
module: `evaluate.load("<this folder>", max_depth=10.0)`. `evaluate.load` takes the first metric
class of this file: `fit3d_hf.evaluation.metrics.DepthMetrics`, whose code this is."""

from fit3d_hf.evaluation.metrics import DepthMetrics

__all__ = ["DepthMetrics"]
