"""Probe metrics as `evaluate` modules shipped in the package (no Hub access needed).

`evaluate.load("mean_iou")` downloads a script from the Hub; these `evaluate.Metric`
subclasses are instantiated directly and work offline:

```python
from fit3d_hf.evaluation.metrics import DepthMetrics, MeanIoU

miou = MeanIoU(num_labels=13)               # ignore_index=255
for pred, label in batches:                 # [B, H, W] int tensors or arrays
    miou.add_batch(predictions=pred, references=label)
miou.compute()  # {"mean_iou", "mean_accuracy", "overall_accuracy", "per_category_iou", ...}

depth = DepthMetrics(max_depth=10.0)        # min_depth=1e-3
depth.compute(predictions=pred_m, references=gt_m)  # [B, H, W] metres
```

Dense maps are reduced to per-image statistics in `add_batch` before `evaluate` stores them
(storing raw pixels through Arrow costs ~30 s per 20M pixels); the result is identical.
Segmentation follows mmseg: intersections and unions are summed over the whole set, then
IoU per class (classes absent from both prediction and label are NaN and skipped by the
mean). Depth follows the Monocular-Depth-Estimation-Toolbox used by DINOv2's depth probes:
each image's metrics over its valid pixels (min_depth < gt < max_depth), then the mean over
images.
"""

import datasets
import evaluate
import numpy as np
import torch

_CITATION = """\
@inproceedings{yue2024improving,
  title={Improving 2D Feature Representations by 3D-Aware Fine-Tuning},
  author={Yue, Yuanwen and Das, Anurag and Engelmann, Francis and Tang, Siyu and Lenssen, Jan Eric},
  booktitle={ECCV}, year={2024}}
"""

DEPTH_KEYS = ("delta1", "delta2", "delta3", "abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "silog")
DEPTH_HIGHER_IS_BETTER = {"delta1": True, "delta2": True, "delta3": True}


def _as_tensor(x, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to(dtype)
    return torch.as_tensor(np.asarray(x), dtype=dtype)


def _batched(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.ndim == 2:
        return x[None]
    if x.ndim != 3:
        raise ValueError(f"{name} must be [H, W] or [B, H, W], got shape {tuple(x.shape)}")
    return x


def segmentation_areas(
    predictions: torch.Tensor, references: torch.Tensor, num_labels: int, ignore_index: int = 255
) -> torch.Tensor:
    """Per-image areas `[B, 4, K]`: intersection, union, predicted, labelled pixels per class.

    predictions, references: `[B, H, W]` (or `[H, W]`) integer class maps; pixels whose
    reference is `ignore_index` count nowhere.
    """
    pred = _batched(_as_tensor(predictions, torch.long), "predictions")
    ref = _batched(_as_tensor(references, torch.long), "references")
    if pred.shape != ref.shape:
        raise ValueError(f"predictions {tuple(pred.shape)} and references {tuple(ref.shape)} differ in shape")
    valid = ref != ignore_index
    bad = valid & ((ref < 0) | (ref >= num_labels))
    if bad.any():
        raise ValueError(
            f"references hold labels outside [0, {num_labels}) other than ignore_index={ignore_index}: {ref[bad].unique()[:10].tolist()}"
        )
    areas = torch.zeros(pred.shape[0], 4, num_labels, dtype=torch.long)
    for i in range(pred.shape[0]):
        p, r = pred[i][valid[i]], ref[i][valid[i]]
        # out-of-range predictions still count as wrong pixels of the labelled class
        p_in = p[(p >= 0) & (p < num_labels)]
        intersect = torch.bincount(r[p == r], minlength=num_labels)
        area_pred = torch.bincount(p_in, minlength=num_labels)
        area_label = torch.bincount(r, minlength=num_labels)
        areas[i] = torch.stack([intersect, area_pred + area_label - intersect, area_pred, area_label]).cpu()
    return areas


def depth_errors(
    predictions: torch.Tensor, references: torch.Tensor, min_depth: float = 1e-3, max_depth: float = 10.0
) -> torch.Tensor:
    """Per-image depth metrics `[B, 9]` in the order of `DEPTH_KEYS` (NaN for an image with
    no valid pixel).

    predictions, references: `[B, H, W]` (or `[H, W]`) depth in metres; valid pixels have
    `min_depth < reference < max_depth`. Predictions are clamped to `[min_depth, max_depth]`
    as the DINOv2 depth head does. SILog is `100·sqrt(mean(e²) − mean(e)²)`, e = log pred − log gt.
    """
    pred = _batched(_as_tensor(predictions, torch.float64), "predictions")
    gt = _batched(_as_tensor(references, torch.float64), "references")
    if pred.shape != gt.shape:
        raise ValueError(f"predictions {tuple(pred.shape)} and references {tuple(gt.shape)} differ in shape")
    if not torch.isfinite(pred).all():
        raise ValueError("depth predictions contain NaN or inf")
    out = torch.full((pred.shape[0], len(DEPTH_KEYS)), float("nan"), dtype=torch.float64)
    for i in range(pred.shape[0]):
        valid = (gt[i] > min_depth) & (gt[i] < max_depth)
        if not valid.any():
            continue
        g, p = gt[i][valid], pred[i][valid].clamp(min_depth, max_depth)
        thresh = torch.maximum(g / p, p / g)
        err_log = torch.log(p) - torch.log(g)
        out[i] = torch.stack(
            [
                (thresh < 1.25).double().mean(),
                (thresh < 1.25**2).double().mean(),
                (thresh < 1.25**3).double().mean(),
                ((g - p).abs() / g).mean(),
                ((g - p) ** 2 / g).mean(),
                ((g - p) ** 2).mean().sqrt(),
                (err_log**2).mean().sqrt(),
                (torch.log10(p) - torch.log10(g)).abs().mean(),
                ((err_log**2).mean() - err_log.mean() ** 2).clamp_min(0).sqrt() * 100,
            ]
        ).cpu()
    return out


class MeanIoU(evaluate.Metric):
    """Mean IoU, mean (per-class) accuracy and overall pixel accuracy for semantic segmentation.

    Args:
        num_labels: number of classes K.
        ignore_index: label of pixels that count nowhere (default 255).
        **kwargs: passed to `evaluate.Metric` (e.g. `keep_in_memory`, `cache_dir`).
    """

    def __init__(self, num_labels: int, ignore_index: int = 255, **kwargs):
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {num_labels}")
        self.num_labels = num_labels
        self.ignore_index = ignore_index
        super().__init__(**kwargs)

    def _info(self) -> evaluate.MetricInfo:
        areas = datasets.Sequence(datasets.Value("int64"))
        return evaluate.MetricInfo(
            description="Mean IoU / mean accuracy / overall accuracy over a set of segmentation maps (mmseg protocol).",
            citation=_CITATION,
            inputs_description="predictions, references: [B, H, W] integer class maps; 255 = ignore.",
            features=datasets.Features({"intersect": areas, "union": areas, "area_pred": areas, "area_label": areas}),
        )

    def add_batch(self, *, predictions=None, references=None):
        """Add `[B, H, W]` predicted and reference class maps."""
        areas = segmentation_areas(predictions, references, self.num_labels, self.ignore_index).numpy()
        super().add_batch(intersect=areas[:, 0], union=areas[:, 1], area_pred=areas[:, 2], area_label=areas[:, 3])

    def compute(self, *, predictions=None, references=None, **kwargs):
        """Add an optional last batch, then return the metrics over everything added."""
        if predictions is not None or references is not None:
            self.add_batch(predictions=predictions, references=references)
        return super().compute(**kwargs)

    def _compute(self, intersect, union, area_pred, area_label):
        intersect, union = np.asarray(intersect).sum(0), np.asarray(union).sum(0)
        area_label = np.asarray(area_label).sum(0)
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = np.where(union > 0, intersect / np.maximum(union, 1), np.nan)
            acc = np.where(area_label > 0, intersect / np.maximum(area_label, 1), np.nan)
        return {
            "mean_iou": float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan"),
            "mean_accuracy": float(np.nanmean(acc)) if np.isfinite(acc).any() else float("nan"),
            "overall_accuracy": float(intersect.sum() / max(area_label.sum(), 1)),
            "per_category_iou": iou.tolist(),
            "per_category_accuracy": acc.tolist(),
        }


class DepthMetrics(evaluate.Metric):
    """Monocular depth metrics: δ1 δ2 δ3, AbsRel, SqRel, RMSE, RMSE-log, log10, SILog.

    Args:
        min_depth, max_depth: valid ground truth lies strictly between them (metres);
            predictions are clamped to this range. Max depth per dataset: ScanNet++ 20,
            NYUv2 and ScanNet 10, KITTI 80.
        **kwargs: passed to `evaluate.Metric`.
    """

    def __init__(self, max_depth: float = 10.0, min_depth: float = 1e-3, **kwargs):
        if not 0 <= min_depth < max_depth:
            raise ValueError(f"need 0 <= min_depth < max_depth, got {min_depth}, {max_depth}")
        self.min_depth = min_depth
        self.max_depth = max_depth
        super().__init__(**kwargs)

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Depth metrics per image over valid pixels, averaged over images (DINOv2 / depth toolbox protocol).",
            citation=_CITATION,
            inputs_description="predictions, references: [B, H, W] depth in metres.",
            features=datasets.Features({key: datasets.Value("float64") for key in DEPTH_KEYS}),
            format="numpy",
        )

    def add_batch(self, *, predictions=None, references=None):
        """Add `[B, H, W]` predicted and ground-truth depth maps (metres)."""
        errors = depth_errors(predictions, references, self.min_depth, self.max_depth).numpy()
        super().add_batch(**{key: errors[:, j] for j, key in enumerate(DEPTH_KEYS)})

    def compute(self, *, predictions=None, references=None, **kwargs):
        """Add an optional last batch, then return the metrics averaged over images."""
        if predictions is not None or references is not None:
            self.add_batch(predictions=predictions, references=references)
        return super().compute(**kwargs)

    def _compute(self, **per_image):
        valid = np.isfinite(per_image["rmse"])
        out = {key: float(np.mean(per_image[key][valid])) if valid.any() else float("nan") for key in DEPTH_KEYS}
        out["num_images"] = int(valid.sum())
        return out
