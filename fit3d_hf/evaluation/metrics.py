"""Probe metrics as `evaluate` modules shipped in the package (no Hub access needed).

`evaluate.load("mean_iou")` downloads a script from the Hub; these `evaluate.Metric` subclasses
work offline, instantiated directly or loaded from the metric folders shipped beside this file
(`metric_path`), each with its own metric card:

```python
import evaluate
from fit3d_hf.evaluation.metrics import DepthMetrics, MeanIoU, metric_path

miou = MeanIoU(num_labels=13)               # ignore_index=255
for pred, label in batches:                 # [B, H, W] int tensors or arrays, or lists of [H, W]
    miou.add_batch(predictions=pred, references=label)
miou.compute()  # {"mean_iou", "mean_accuracy", "overall_accuracy", "per_category_iou", ...}

# as the Hub's mean_iou is called: the number of classes (and the ignored label) at compute
evaluate.load(metric_path("mean_iou")).compute(predictions=pred, references=label, num_labels=13, ignore_index=255)

depth = DepthMetrics(max_depth=10.0)        # min_depth=1e-3; evaluate.load(metric_path("depth"), max_depth=10.0)
depth.compute(predictions=pred_m, references=gt_m)  # [B, H, W] metres
```

Dense maps are reduced to per-image statistics in `add_batch` before `evaluate` stores them
(storing raw pixels through Arrow costs ~30 s per 20M pixels); the result is identical.
Segmentation keeps each image's distinct (reference, prediction) label pairs with their pixel
counts, so the number of classes, the ignored label and `reduce_labels` can still be chosen at
`compute`; it follows mmseg: intersections and unions are summed over the whole set, then IoU per
class (classes absent from both prediction and label are NaN and skipped by the mean). Depth
follows the Monocular-Depth-Estimation-Toolbox used by DINOv2's depth probes: each image's metrics
over its valid pixels (min_depth < gt < max_depth), then the mean over images.
"""

import os
from pathlib import Path

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


# The metric folders `evaluate.load` reads: <name>/<name>.py and its metric card <name>/README.md.
METRIC_FOLDERS = Path(__file__).resolve().parent / "metric_modules"
METRIC_MODULES = {"mean_iou": "fit3d_mean_iou", "depth": "fit3d_depth"}


def metric_path(name: str) -> str:
    """The shipped folder of a metric ("mean_iou" or "depth"), for `evaluate.load(metric_path(name))`."""
    if name not in METRIC_MODULES:
        raise ValueError(f"unknown metric {name!r}; the package ships {sorted(METRIC_MODULES)}")
    return os.fspath(METRIC_FOLDERS / METRIC_MODULES[name])


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


def _images(x, dtype: torch.dtype, name: str) -> list[torch.Tensor]:
    """`[H, W]` maps of `[B, H, W]` / `[H, W]` tensors or arrays, or of a list of `[H, W]` maps of any sizes (the Hub's form)."""
    if isinstance(x, (list, tuple)) and x and np.ndim(x[0]) == 2:
        return [_as_tensor(image, dtype) for image in x]
    return list(_batched(_as_tensor(x, dtype), name))


# Up to this many (reference, prediction) combinations a bincount is used; beyond it (label values
# spread far apart) a sort, which needs no table.
_MAX_PAIR_TABLE = 1 << 24


def label_pairs(predictions, references) -> list[np.ndarray]:
    """Per image, the distinct (reference, prediction) label pairs and their pixel counts: `[3, P]`
    int64 arrays (rows: reference, prediction, count); every pixel counts, `ignore_index` included.

    predictions, references: `[B, H, W]` (or `[H, W]`) integer class maps, or lists of `[H, W]` maps.
    """
    preds = _images(predictions, torch.long, "predictions")
    refs = _images(references, torch.long, "references")
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions but {len(refs)} references")
    out = []
    for pred, ref in zip(preds, refs):
        if pred.shape != ref.shape:
            raise ValueError(f"predictions {tuple(pred.shape)} and references {tuple(ref.shape)} differ in shape")
        pred, ref = pred.flatten(), ref.flatten()
        if pred.numel() == 0:
            out.append(np.zeros((3, 0), dtype=np.int64))
            continue
        pred_low, ref_low = int(pred.min()), int(ref.min())
        width = int(pred.max()) - pred_low + 1
        keys = (ref - ref_low) * width + (pred - pred_low)
        size = (int(ref.max()) - ref_low + 1) * width
        if size <= _MAX_PAIR_TABLE:
            counts = torch.bincount(keys, minlength=size)
            keys = counts.nonzero().flatten()
            counts = counts[keys]
        else:
            keys, counts = torch.unique(keys, return_counts=True)
        out.append(torch.stack([keys // width + ref_low, keys % width + pred_low, counts]).numpy())
    return out


def segmentation_areas(pairs: np.ndarray, num_labels: int, ignore_index: int = 255, reduce_labels: bool = False) -> np.ndarray:
    """Intersection, union, predicted and labelled pixels per class, `[4, K]`, from label pairs
    (`label_pairs`, concatenated over any number of images).

    Pixels whose reference is `ignore_index` count nowhere; a prediction outside [0, K) counts as
    a wrong pixel of its labelled class. `reduce_labels` (mmseg's `reduce_zero_label`, the Hub
    metric's `reduce_labels`) first maps reference 0 to ignored and k to k - 1.
    """
    reference, prediction, count = pairs
    if reduce_labels:
        reference = np.where(reference == 0, 255, reference - 1)
        reference = np.where(reference == 254, 255, reference)
    valid = reference != ignore_index
    bad = valid & ((reference < 0) | (reference >= num_labels))
    if bad.any():
        raise ValueError(
            f"references hold labels outside [0, {num_labels}) other than ignore_index={ignore_index}: "
            f"{np.unique(reference[bad])[:10].tolist()}"
        )
    reference, prediction, count = reference[valid], prediction[valid], count[valid]
    hit = prediction == reference
    in_range = (prediction >= 0) & (prediction < num_labels)
    intersect = np.bincount(reference[hit], weights=count[hit], minlength=num_labels)
    area_pred = np.bincount(prediction[in_range], weights=count[in_range], minlength=num_labels)
    area_label = np.bincount(reference, weights=count, minlength=num_labels)
    return np.stack([intersect, area_pred + area_label - intersect, area_pred, area_label]).astype(np.int64)


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
        num_labels: number of classes K; may instead be given to `compute`, as the Hub's `mean_iou` takes it.
        ignore_index: label of pixels that count nowhere (default 255); `compute` may override it.
        **kwargs: passed to `evaluate.Metric` (e.g. `keep_in_memory`, `cache_dir`).
    """

    def __init__(self, num_labels: int | None = None, ignore_index: int = 255, **kwargs):
        if num_labels is not None and num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {num_labels}")
        self.num_labels = num_labels
        self.ignore_index = ignore_index
        super().__init__(**kwargs)

    def _info(self) -> evaluate.MetricInfo:
        labels = datasets.Sequence(datasets.Value("int64"))
        return evaluate.MetricInfo(
            description="Mean IoU / mean accuracy / overall accuracy over a set of segmentation maps (mmseg protocol).",
            citation=_CITATION,
            inputs_description=(
                "predictions, references: [B, H, W] integer class maps (or lists of [H, W] maps); "
                "compute(num_labels=K, ignore_index=255, reduce_labels=False)."
            ),
            features=datasets.Features({"reference": labels, "prediction": labels, "count": labels}),
        )

    def add_batch(self, *, predictions=None, references=None):
        """Add `[B, H, W]` predicted and reference class maps (or lists of `[H, W]` maps)."""
        pairs = label_pairs(predictions, references)
        if self.num_labels is not None:  # known now: refuse bad labels before anything is stored
            for image_pairs in pairs:
                segmentation_areas(image_pairs, self.num_labels, self.ignore_index)
        super().add_batch(reference=[p[0] for p in pairs], prediction=[p[1] for p in pairs], count=[p[2] for p in pairs])

    def compute(
        self,
        *,
        predictions=None,
        references=None,
        num_labels: int | None = None,
        ignore_index: int | None = None,
        reduce_labels: bool = False,
        **kwargs,
    ):
        """Add an optional last batch, then return the metrics over everything added.

        `num_labels` and `ignore_index` default to the constructor's; `reduce_labels` maps
        reference 0 to ignored and k to k - 1 first (the Hub's `mean_iou` arguments).
        """
        if predictions is not None or references is not None:
            self.add_batch(predictions=predictions, references=references)
        num_labels = num_labels or self.num_labels
        if num_labels is None:
            raise ValueError("MeanIoU needs num_labels: MeanIoU(num_labels=K) or compute(..., num_labels=K)")
        ignore_index = self.ignore_index if ignore_index is None else ignore_index
        return super().compute(num_labels=num_labels, ignore_index=ignore_index, reduce_labels=reduce_labels, **kwargs)

    def _compute(self, reference, prediction, count, num_labels: int, ignore_index: int, reduce_labels: bool):
        pairs = np.concatenate([np.stack([r, p, c]).reshape(3, -1) for r, p, c in zip(reference, prediction, count)], axis=1)
        intersect, union, _, area_label = segmentation_areas(pairs.astype(np.int64), num_labels, ignore_index, reduce_labels)
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
        # An image without a valid pixel has NaN errors; some datasets/pyarrow versions hand them back as None.
        per_image = {key: np.asarray(values, dtype=np.float64) for key, values in per_image.items()}
        valid = np.isfinite(per_image["rmse"])
        out = {key: float(np.mean(per_image[key][valid])) if valid.any() else float("nan") for key in DEPTH_KEYS}
        out["num_images"] = int(valid.sum())
        return out
