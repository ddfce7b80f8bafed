import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fit3d_hf import FiT3DModel, backbones
from fit3d_hf.evaluation.benchmark import BenchmarkConfig, benchmark_on_scenes, input_size
from fit3d_hf.evaluation.heads import DepthProbe, SegmentationProbe, depth_loss, gradient_loss, resize_bilinear, sig_loss
from fit3d_hf.evaluation.report import write_report
from fit3d_hf.evaluation.training import ProbeConfig, cached_batches, predict, train_probe
from fit3d_hf.scenes import synthetic

CONFIGS = Path(__file__).resolve().parents[1] / "recipes" / "configs"


def test_heads_shapes_and_depth_range():
    seg = SegmentationProbe(16, num_labels=5)
    assert seg(torch.randn(2, 16, 4, 6), (32, 48)).shape == (2, 5, 32, 48)
    depth = DepthProbe(16, max_depth=10.0)
    out = depth(torch.randn(2, 16, 4, 6) * 50, torch.randn(2, 16), (30, 40), output_bin_weights=True)
    assert out.depth.shape == (2, 1, 30, 40) and out.bin_weights.shape == (2, 256, 16, 24)
    assert torch.allclose(out.bin_weights.sum(1), torch.ones(2, 16, 24), atol=1e-5)
    assert out.depth.min() >= 1e-3 and out.depth.max() <= 10.0
    # the conv runs on the patch grid: same result as the protocol's upsample-then-conv order
    x, cls = torch.randn(2, 16, 4, 6), torch.randn(2, 16)
    literal = torch.nn.functional.interpolate(
        torch.cat([x, cls[:, :, None, None].expand_as(x)], 1), size=(16, 24), mode="bilinear"
    )
    weights = torch.relu(depth.conv(literal)) + 0.1
    out = depth(x, cls, (16, 24), output_bin_weights=True)
    assert torch.allclose(out.bin_weights, weights / weights.sum(1, keepdim=True), atol=1e-6)
    # depth = Σ_k w_k·bin_k / Σ_k w_k equals the protocol's expectation over the normalised weights
    bins = torch.linspace(1e-3, 10.0, 256)[None, :, None, None]
    literal_depth = ((weights / weights.sum(1, keepdim=True)) * bins).sum(1, keepdim=True)
    assert torch.allclose(out.depth, literal_depth.clamp(1e-3, 10.0), rtol=1e-5, atol=1e-5)
    assert depth(x, cls, (16, 24)).bin_weights is None  # not computed unless asked for


def test_probe_resizing_equals_interpolate():
    # resize_bilinear (two matmuls) is F.interpolate's bilinear resize, values and gradients
    x = torch.randn(3, 5, 7, 9, dtype=torch.float64, requires_grad=True)
    for size in ((28, 36), (30, 41), (7, 9), (5, 6)):
        ours = resize_bilinear(x, size)
        theirs = torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)
        assert torch.allclose(ours, theirs, atol=1e-12)
        g = torch.randn_like(theirs)
        (ours_grad,) = torch.autograd.grad(ours, x, g)
        (theirs_grad,) = torch.autograd.grad(theirs, x, g)
        assert torch.allclose(ours_grad, theirs_grad, atol=1e-12)


def test_depth_losses_hand_computed():
    target = torch.full((1, 1, 4, 4), 2.0)
    valid = torch.ones_like(target, dtype=torch.bool)
    # a constant scale error: var(g) = 0, so SigLoss = sqrt(0.15) * |log 2|
    pred = target * 2
    assert sig_loss(pred, target, valid, eps=0.0).item() == pytest.approx(math.sqrt(0.15) * math.log(2), rel=1e-5)
    assert gradient_loss(pred, target, valid, eps=0.0).item() == pytest.approx(0.0, abs=1e-6)
    # warm-up keeps only the mean term
    noisy = target * torch.exp(torch.randn_like(target) * 0.1)
    g = torch.log(noisy) - torch.log(target)
    assert sig_loss(noisy, target, valid, warm_up=True, eps=0.0).item() == pytest.approx(
        math.sqrt(0.15) * g.mean().abs().item(), rel=1e-4
    )
    assert depth_loss(noisy, target) > 0 and depth_loss(noisy, target, objective="sigloss+gradient") > depth_loss(noisy, target)
    # invalid pixels (target 0 or beyond max_depth) do not count
    broken = noisy.clone()
    broken[..., 0, 0] = 1000.0
    target_masked = target.clone()
    target_masked[..., 0, 0] = 0.0
    partly = torch.ones_like(valid)
    partly[..., 0, 0] = False
    assert sig_loss(broken, target_masked, target_masked > 1e-3).item() == pytest.approx(
        sig_loss(noisy, target, partly).item(), rel=1e-5
    )


def test_schedules():
    # mmcv: the linear warm-up scales the scheduled lr (tests/test_probes.py pins the official values)
    poly = ProbeConfig("segmentation", 100, 2, 1e-3, 0.0, "poly", warmup_iterations=10, warmup_ratio=0.0)
    assert (
        poly.lr_factor(0) == 0.0 and poly.lr_factor(5) == pytest.approx(0.95 * 0.5) and poly.lr_factor(50) == pytest.approx(0.5)
    )
    cosine = ProbeConfig("depth", 100, 2, 1e-4, 0.0, "cosine")
    assert (
        cosine.lr_factor(0) == pytest.approx(1.0)
        and cosine.lr_factor(50) == pytest.approx(0.5)
        and cosine.lr_factor(100) == pytest.approx(0.0)
    )
    with pytest.raises(ValueError, match="schedule"):
        ProbeConfig("depth", 10, 2, 1e-4, 0.0, "step").lr_factor(5)


def test_cpu_yaml_is_the_cpu_preset():
    import yaml

    values = yaml.safe_load((CONFIGS / "evaluate_synthetic_cpu.yaml").read_text())
    preset = BenchmarkConfig.cpu_preset()
    drift = {k: (v, getattr(preset, k)) for k, v in values.items() if hasattr(preset, k) and getattr(preset, k) != v}
    assert not drift
    # The paper recipe = the defaults, which pick the paper protocol for the paper datasets ("auto").
    paper = yaml.safe_load((CONFIGS / "evaluate_paper.yaml").read_text())
    assert paper.pop("protocol") == "paper" and BenchmarkConfig().protocol == "auto"
    assert {k: v for k, v in paper.items() if k in BenchmarkConfig.__dataclass_fields__} == {
        k: getattr(BenchmarkConfig(), k) for k in paper if k in BenchmarkConfig.__dataclass_fields__
    }


def test_segmentation_probe_learns_separable_features():
    torch.manual_seed(0)
    labels = torch.randint(0, 3, (32, 4, 4))
    features = torch.nn.functional.one_hot(labels, 3).permute(0, 3, 1, 2).float() * 3 + 0.1 * torch.randn(32, 3, 4, 4)
    targets = labels.repeat_interleave(4, 1).repeat_interleave(4, 2)  # [32, 16, 16]
    config = ProbeConfig("segmentation", 150, 8, 1e-2, 1e-4, "poly")
    head = train_probe(SegmentationProbe(3, 3), cached_batches(features, targets, 8), config, progress=False)
    preds = predict(head, features, (16, 16))
    accuracy = (preds == targets).float().mean()
    assert accuracy > 0.95


def test_depth_probe_learns_depth_from_features():
    torch.manual_seed(0)
    levels = torch.randint(0, 8, (32, 4, 4))
    depth = (levels + 1).float()[:, None]  # 1..8 m
    features = torch.nn.functional.one_hot(levels, 8).permute(0, 3, 1, 2).float() * 5
    targets = depth[:, 0]  # at the feature grid: no interpolation blur at level boundaries
    config = ProbeConfig("depth", 200, 8, 1e-1, 0.0, "cosine", sig_warmup_iterations=20, loss="sigloss+gradient")
    batches = cached_batches(features, targets, 8, cls_token=torch.zeros(32, 8))
    head = train_probe(DepthProbe(8, max_depth=10.0, upsample=1), batches, config, progress=False)
    preds = predict(head, features, (4, 4), cls_token=torch.zeros(32, 8))
    mean_predictor = (targets - targets.mean()).pow(2).mean().sqrt()
    assert (preds - targets).pow(2).mean().sqrt() < 0.05 * mean_predictor


def _tiny_fit3d(seed: int = 0) -> FiT3DModel:
    torch.manual_seed(seed)
    backbone = backbones.build_backbone(backbones.tiny_config("dinov2", patch_size=8))
    model = FiT3DModel.from_backbone(backbone)
    with torch.no_grad():
        for p in model.finetuned.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_benchmark_on_scenes_report_and_resume(tmp_path):
    rooms = synthetic.make_rooms(3, seed=50, num_views=6, height=48, width=64)
    model = _tiny_fit3d()
    config = BenchmarkConfig.cpu_preset(
        image_height=44,
        image_width=64,
        seg_iterations=10,
        depth_iterations=10,
        seeds=[0, 1],
        cache_dir=str(tmp_path / "cache"),
        progress=False,
    )
    assert input_size(model, config) == (40, 64)  # rounded down to the patch size
    sources = {"original": model.original, "fit3d": model, "concat_random": [model.original, _tiny_fit3d(1).finetuned]}
    results = benchmark_on_scenes(sources, rooms[:2], rooms[2:], config)
    assert results["sources"]["fit3d"]["models"][0]["assembly"] == "concat"
    assert (
        results["sources"]["concat_random"]["combination"] == "concat"
        and results["sources"]["concat_random"]["role"] == "control"
    )
    assert results["protocol"]["seeds"] == [0, 1] and results["protocol"]["train_dataset"]["images"] == 12
    rows = {(r["source"], r["task"], r["metric"]): r for r in results["results"]}
    assert {task for _, task, _ in rows} == {"segmentation", "depth", "correspondence"}
    miou = rows[("fit3d", "segmentation", "mean_iou")]
    assert len(miou["values"]) == 2 and 0 <= miou["mean"] <= 1
    assert miou["mean"] == pytest.approx(sum(miou["values"]) / 2)
    assert rows[("original", "depth", "rmse")]["higher_is_better"] is False
    assert 0 <= rows[("fit3d", "correspondence", "recall@16px")]["mean"] <= 1
    json_path, md_path = write_report(results, tmp_path / "out")
    assert json.loads(json_path.read_text())["results"] == results["results"]
    assert "baseline vs FiT3D" in md_path.read_text() and "concat_random" in md_path.read_text()
    # a second run reuses cached features and finished probe runs: identical numbers
    runs = sorted(p.name for p in (tmp_path / "cache" / "runs").iterdir())
    assert len(runs) == 3 * 2 * 2
    again = benchmark_on_scenes(sources, rooms[:2], rooms[2:], config)
    assert [r["values"] for r in again["results"]] == [r["values"] for r in results["results"]]
    # another probe protocol is another run, never a stale cached one
    benchmark_on_scenes(
        {"original": model.original}, rooms[:2], rooms[2:], replace(config, seg_iterations=11, tasks=["segmentation"])
    )
    assert len(list((tmp_path / "cache" / "runs").iterdir())) == len(runs) + 2


def test_evaluate_and_card_commands(tmp_path):
    from fit3d_hf.commands import card, evaluate

    model = _tiny_fit3d()
    model.save_pretrained(tmp_path / "model")
    results = evaluate.main(
        [
            "--config",
            str(CONFIGS / "evaluate_synthetic_cpu.yaml"),
            "--model",
            str(tmp_path / "model"),
            "--output_dir",
            str(tmp_path / "eval"),
            "--num_train_scenes",
            "1",
            "--num_test_scenes",
            "1",
            "--scene_views",
            "4",
            "--scene_height",
            "32",
            "--scene_width",
            "48",
            "--image_height",
            "32",
            "--image_width",
            "48",
            "--seg_iterations",
            "5",
            "--depth_iterations",
            "5",
            "--seeds",
            "0",
            "--progress",
            "false",
        ]
    )
    assert set(results["sources"]) == {"original", "fit3d", "finetuned_only", "concat_random"}
    assert (tmp_path / "eval" / "results.md").is_file()
    card.main(["--model_dir", str(tmp_path / "model"), "--results", str(tmp_path / "eval" / "results.json")])
    text = (tmp_path / "model" / "README.md").read_text()
    assert "model-index" in text and "finetuned_only" in text


@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    _tiny_fit3d().save_pretrained(tmp_path / "model")
    root = Path(__file__).resolve().parents[1]
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        "recipes/configs/accelerate_cpu_2proc.yaml",
        "recipes/evaluation.py",
        "--config",
        "recipes/configs/evaluate_synthetic_cpu.yaml",
        "--model",
        str(tmp_path / "model"),
        "--output_dir",
        str(tmp_path / "eval"),
        "--num_train_scenes",
        "1",
        "--num_test_scenes",
        "1",
        "--scene_views",
        "4",
        "--seg_iterations",
        "5",
        "--depth_iterations",
        "5",
        "--seeds",
        "0",
        "--progress",
        "false",
        "--no_controls",
    ]
    done = subprocess.run(
        command, cwd=root, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["protocol"]["num_processes"] == 2 and set(results["sources"]) == {"original", "fit3d"}
