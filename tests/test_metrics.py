import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fit3d_hf.evaluation.metrics import DepthMetrics, MeanIoU, depth_errors


def test_mean_iou_hand_computed():
    ref = np.array([[[0, 0, 1], [1, 2, 255]]])
    pred = np.array([[[0, 1, 1], [1, 1, 0]]])
    # class 0: I=1 U=2; class 1: I=2 U=4; class 2: I=0 U=1; the 255 pixel counts nowhere
    out = MeanIoU(num_labels=3).compute(predictions=pred, references=ref)
    assert out["per_category_iou"] == pytest.approx([0.5, 0.5, 0.0])
    assert out["mean_iou"] == pytest.approx(1 / 3)
    assert out["mean_accuracy"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert out["overall_accuracy"] == pytest.approx(3 / 5)


def test_mean_iou_sums_over_images_and_skips_absent_classes():
    metric = MeanIoU(num_labels=4)
    metric.add_batch(predictions=torch.tensor([[0, 0], [1, 1]]), references=torch.tensor([[0, 0], [1, 0]]))
    metric.add_batch(predictions=torch.tensor([[[1, 1]]]), references=torch.tensor([[[1, 1]]]))
    out = metric.compute()
    # totals: class 0 I=2 U=3, class 1 I=3 U=4; classes 2, 3 never seen -> NaN, skipped
    assert out["per_category_iou"][:2] == pytest.approx([2 / 3, 3 / 4])
    assert all(math.isnan(v) for v in out["per_category_iou"][2:])
    assert out["mean_iou"] == pytest.approx((2 / 3 + 3 / 4) / 2)
    assert out["overall_accuracy"] == pytest.approx(5 / 6)


def test_mean_iou_rejects_bad_input():
    with pytest.raises(ValueError, match="differ in shape"):
        MeanIoU(num_labels=2).compute(predictions=np.zeros((1, 2, 2)), references=np.zeros((1, 2, 3)))
    with pytest.raises(ValueError, match="outside"):
        MeanIoU(num_labels=2).compute(predictions=np.zeros((1, 2, 2)), references=np.full((1, 2, 2), 7))


def test_depth_metrics_hand_computed():
    gt = np.array([[[1.0, 2.0], [4.0, 0.0]]])  # the 0 is invalid (<= min_depth)
    pred = np.array([[[1.0, 1.8], [7.2, 5.0]]])
    out = DepthMetrics(max_depth=10.0).compute(predictions=pred, references=gt)
    # ratios max(g/p, p/g): 1, 1.111, 1.8
    assert out["delta1"] == pytest.approx(2 / 3)
    assert out["delta2"] == pytest.approx(2 / 3)
    assert out["delta3"] == pytest.approx(1.0)
    assert out["abs_rel"] == pytest.approx((0 + 0.2 / 2 + 3.2 / 4) / 3)
    assert out["sq_rel"] == pytest.approx((0 + 0.04 / 2 + 10.24 / 4) / 3)
    assert out["rmse"] == pytest.approx(math.sqrt((0 + 0.04 + 10.24) / 3))
    logs = [0.0, math.log(1.8 / 2), math.log(7.2 / 4)]
    assert out["rmse_log"] == pytest.approx(math.sqrt(sum(e * e for e in logs) / 3))
    assert out["log10"] == pytest.approx(sum(abs(e) for e in logs) / math.log(10) / 3)
    mean = sum(logs) / 3
    assert out["silog"] == pytest.approx(100 * math.sqrt(sum(e * e for e in logs) / 3 - mean**2))


def test_depth_metrics_average_over_images_clamp_and_skip_empty():
    metric = DepthMetrics(max_depth=10.0)
    metric.add_batch(predictions=np.full((1, 2, 2), 2.0), references=np.full((1, 2, 2), 1.0))  # rmse 1
    metric.add_batch(predictions=np.full((1, 2, 2), 3.0), references=np.full((1, 2, 2), 3.0))  # rmse 0
    metric.add_batch(predictions=np.full((1, 2, 2), 3.0), references=np.full((1, 2, 2), 50.0))  # all invalid
    out = metric.compute()
    assert out["rmse"] == pytest.approx(0.5) and out["num_images"] == 2
    # a prediction above max_depth is clamped to it: |10 - 9| = 1
    assert depth_errors(torch.tensor([[100.0]]), torch.tensor([[9.0]]), max_depth=10.0)[0, 5] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="NaN"):
        depth_errors(torch.tensor([[float("nan")]]), torch.tensor([[1.0]]))


def test_hub_style_compute_matches_the_constructor_form():
    rng = np.random.default_rng(0)
    pred, ref = rng.integers(0, 4, (2, 5, 6)), rng.integers(0, 4, (2, 5, 6))
    ref[0, 0] = 9  # ignored below
    constructed = MeanIoU(num_labels=4, ignore_index=9).compute(predictions=pred, references=ref)
    # As the Hub's mean_iou is called: the classes and the ignored label at compute, a list of maps.
    hub_style = MeanIoU().compute(predictions=list(pred), references=list(ref), num_labels=4, ignore_index=9)
    assert hub_style["mean_iou"] == pytest.approx(constructed["mean_iou"])
    assert hub_style["overall_accuracy"] == pytest.approx(constructed["overall_accuracy"])
    with pytest.raises(ValueError, match="num_labels"):
        MeanIoU().compute(predictions=pred, references=ref)


def test_shipped_metric_folders_load_with_evaluate_and_have_cards():
    import evaluate

    from fit3d_hf.evaluation.metrics import metric_path

    pred = np.array([[[0, 1], [1, 1]]])
    ref = np.array([[[0, 1], [0, 1]]])
    miou = evaluate.load(metric_path("mean_iou"))
    out = miou.compute(predictions=pred, references=ref, num_labels=2, ignore_index=255)
    assert out["mean_iou"] == pytest.approx(MeanIoU(num_labels=2).compute(predictions=pred, references=ref)["mean_iou"])
    depth = evaluate.load(metric_path("depth"), max_depth=10.0)
    gt = np.full((1, 2, 2), 2.0)
    assert depth.compute(predictions=gt * 1.1, references=gt)["abs_rel"] == pytest.approx(0.1)
    for name in ("mean_iou", "depth"):
        card = (Path(metric_path(name)) / "README.md").read_text()
        assert card.startswith("---") and "title:" in card  # a metric card with its Hub header
    with pytest.raises(ValueError, match="unknown metric"):
        metric_path("accuracy")
