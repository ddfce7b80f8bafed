"""Mean IoU for semantic segmentation (mmseg protocol) as an `evaluate` module:
`evaluate.load("<this folder>")`, then `compute(..., num_labels=K)`. `evaluate.load` takes the first
metric class of this file: `fit3d_hf.evaluation.metrics.MeanIoU`, whose code this is."""

from fit3d_hf.evaluation.metrics import MeanIoU

__all__ = ["MeanIoU"]
