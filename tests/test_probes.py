"""The paper protocol's probe values, losses and optimisation, pinned against the official configs
(`evaluation/configs/vits_*_linear_config.py` of the official FiT3D code; docs/protocol.md)."""

import math

import pytest
import torch

from fit3d_hf import FiT3DModel, backbones
from fit3d_hf.evaluation.benchmark import BenchmarkConfig, _feature_widths
from fit3d_hf.evaluation.features import source_features
from fit3d_hf.evaluation.heads import DepthProbe, depth_loss, gradient_loss, segmentation_loss, sig_loss
from fit3d_hf.evaluation.training import ProbeBatch, ProbeConfig, build_head, train_probe


def test_paper_defaults_are_the_official_optimisation():
    config = BenchmarkConfig()
    assert config.protocol == "auto"  # paper on the paper datasets (test_eval_datasets), fixed elsewhere
    seg = config.probe_config("segmentation")
    # vits_*_sem_linear_config.py: AdamW 1e-3 wd 1e-4, poly power 1, warm-up 1500 from 1e-6, 40k x (2 per GPU x 8)
    assert (seg.iterations, seg.batch_size, seg.lr, seg.weight_decay, seg.schedule) == (40000, 16, 1e-3, 1e-4, "poly")
    assert (seg.warmup_iterations, seg.warmup_ratio, seg.max_grad_norm, seg.momentum_cycle) == (1500, 1e-6, None, None)
    assert seg.loss == "all_pixels"  # mmseg 0.27 CrossEntropyLoss, avg_non_ignore=False
    depth = config.probe_config("depth")
    # vits_*_depth_linear_config.py: AdamW 1e-4 wd 0.01, cosine to 1e-8, warm-up 12800 from 1e-3, 38.4k x 16,
    # grad clip 35, OneCycle momentum, SigLoss warm-up 100, 2 images per GPU
    assert (depth.iterations, depth.batch_size, depth.lr, depth.weight_decay, depth.schedule) == (38400, 16, 1e-4, 1e-2, "cosine")
    assert (depth.warmup_iterations, depth.warmup_ratio, depth.min_lr_ratio) == (12800, 1e-3, 1e-8)
    assert (depth.max_grad_norm, depth.momentum_cycle, depth.sig_warmup_iterations) == (35.0, (0.85, 0.95, 0.3), 100)
    assert (depth.loss, depth.loss_group_size) == ("sigloss", 2)


def test_cpu_preset_keeps_its_own_probe_settings():
    config = BenchmarkConfig.cpu_preset()
    assert config.protocol == "fixed" and (config.image_height, config.image_width) == (96, 128)
    depth = config.probe_config("depth")
    assert (depth.loss, depth.loss_group_size, depth.max_grad_norm, depth.momentum_cycle) == (
        "sigloss+gradient",
        None,
        None,
        None,
    )
    assert config.probe_config("segmentation").loss == "labelled_pixels"
    with pytest.raises(ValueError, match="protocol"):
        BenchmarkConfig(protocol="official")
    with pytest.raises(ValueError, match="depth_loss"):
        BenchmarkConfig(depth_loss="gradient")


def test_learning_rate_follows_mmcv_warmup_times_schedule():
    depth = BenchmarkConfig().probe_config("depth")
    cosine = lambda step: 1e-8 + (1 - 1e-8) * 0.5 * (1 + math.cos(math.pi * step / 38400))  # noqa: E731
    assert depth.lr_factor(0) == pytest.approx(1e-3)
    # mmcv's linear warm-up scales the scheduled lr, so the lr is continuous where warm-up ends
    assert depth.lr_factor(6400) == pytest.approx(cosine(6400) * (1e-3 + (1 - 1e-3) * 0.5))
    assert depth.lr_factor(12800) == pytest.approx(cosine(12800)) == pytest.approx(0.75, abs=1e-6)
    assert depth.lr_factor(12799) == pytest.approx(depth.lr_factor(12800), rel=1e-3)
    assert depth.lr_factor(38400) == pytest.approx(1e-8)
    seg = BenchmarkConfig().probe_config("segmentation")
    assert seg.lr_factor(750) == pytest.approx((1 - 750 / 40000) * (1e-6 + (1 - 1e-6) * 0.5))
    assert seg.lr_factor(20000) == pytest.approx(0.5) and seg.lr_factor(40000) == 0.0
    with pytest.raises(ValueError, match="schedule"):
        ProbeConfig("depth", 10, 2, 1e-4, 0.0, "step").lr_factor(5)


def test_depth_momentum_is_mmcv_one_cycle():
    depth = BenchmarkConfig().probe_config("depth")
    turn = 0.3 * 38400 - 1  # end of the first phase, as mmcv computes it
    assert depth.beta1(0) == pytest.approx(0.95)
    assert depth.beta1(turn / 2) == pytest.approx(0.9)
    assert depth.beta1(turn) == pytest.approx(0.85)
    assert depth.beta1(38399) == pytest.approx(0.95)
    assert BenchmarkConfig().probe_config("segmentation").beta1(100) == 0.9  # no momentum policy there


def _official_gradient_loss(pred, target):
    """The official GradientLoss transcribed as written: its `[::2i, ::2i]` slices and
    differences index the first two axes of the `[B, 1, H, W]` maps (batch and channel)."""
    total = 0.0
    for p, t in zip(
        [pred] + [pred[:: 2 * i, :: 2 * i] for i in range(1, 4)], [target] + [target[:: 2 * i, :: 2 * i] for i in range(1, 4)]
    ):
        mask = (t > 0).float()
        diff = (torch.log(p + 1e-3) - torch.log(t + 1e-3)) * mask
        v = (diff[0:-2, :] - diff[2:, :]).abs() * mask[0:-2, :] * mask[2:, :]
        h = (diff[:, 0:-2] - diff[:, 2:]).abs() * mask[:, 0:-2] * mask[:, 2:]
        total = total + (h.sum() + v.sum()) / mask.sum()
    return total


def test_depth_objective_is_sigloss_per_two_images():
    torch.manual_seed(0)
    target = torch.rand(4, 1, 8, 8) * 5 + 0.5
    pred = target * torch.exp(0.3 * torch.randn_like(target))
    # what the official code computes on each GPU's 2 images: its gradient term is exactly zero
    assert float(_official_gradient_loss(pred[:2], target[:2])) == 0.0
    assert float(_official_gradient_loss(pred, target)) > 0  # ... but not at 4 per GPU (batch axis differences)
    valid = target > 0
    per_gpu = [sig_loss(pred[i : i + 2], target[i : i + 2], valid[i : i + 2]) for i in (0, 2)]
    assert depth_loss(pred, target, group_size=2).item() == pytest.approx(torch.stack(per_gpu).mean().item(), rel=1e-6)
    pooled = sig_loss(pred, target, valid)
    assert depth_loss(pred, target).item() == pytest.approx(pooled.item(), rel=1e-6)
    assert abs(depth_loss(pred, target, group_size=2).item() - pooled.item()) > 1e-4  # grouping matters
    with_gradient = depth_loss(pred, target, objective="sigloss+gradient")
    assert with_gradient.item() == pytest.approx((pooled + 0.5 * gradient_loss(pred, target, valid)).item(), rel=1e-6)
    # the official losses count every pixel with positive ground truth, with no upper bound
    far = target.clone()
    far[0, 0, 0, 0] = 1000.0
    assert depth_loss(pred, far).item() != pytest.approx(depth_loss(pred, target).item())
    with pytest.raises(ValueError, match="objective"):
        depth_loss(pred, target, objective="l1")


def test_segmentation_loss_over_all_pixels_counts_padding():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 4, 4)
    labels = torch.randint(0, 5, (2, 4, 4))
    labels[:, 2:] = 255  # half the pixels padded or ignored
    labelled = segmentation_loss(logits, labels, mean_over="labelled_pixels")
    assert segmentation_loss(logits, labels).item() == pytest.approx(0.5 * labelled.item(), rel=1e-6)
    with pytest.raises(ValueError, match="mean_over"):
        segmentation_loss(logits, labels, mean_over="batch")


def _tiny_fit3d(hidden: int = 32) -> FiT3DModel:
    torch.manual_seed(0)
    backbone = backbones.build_backbone(backbones.tiny_config("dinov2", patch_size=8, hidden_size=hidden))
    model = FiT3DModel.from_backbone(backbone)
    with torch.no_grad():
        for p in model.finetuned.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_fit3d_depth_probe_input_is_original_finetuned_and_original_cls():
    model = _tiny_fit3d()
    images = torch.rand(2, 3, 16, 24)
    features = source_features(model, images)
    original = backbones.extract_features(model.original, backbones.normalize(images, model.config))
    finetuned = backbones.extract_features(model.finetuned, backbones.normalize(images, model.config))
    assert torch.equal(
        features.unnormed_feature_maps, torch.cat([original.unnormed_feature_maps, finetuned.unnormed_feature_maps], 1)
    )
    assert torch.equal(features.unnormed_cls_token, original.unnormed_cls_token)  # the original's CLS only
    assert torch.equal(features.feature_maps, torch.cat([original.feature_maps, finetuned.feature_maps], 1))
    # [original || fine-tuned || original CLS] = 3C; the concat-random control gets the same width
    assert _feature_widths(model, "depth", "cpu") == (64, 32)
    assert _feature_widths([model.original, model.finetuned], "depth", "cpu") == (64, 32)
    assert _feature_widths(model, "segmentation", "cpu") == (64, None)
    assert build_head("depth", 64, cls_channels=32, max_depth=10.0).conv.in_channels == 96
    assert DepthProbe(768, max_depth=10.0, cls_channels=384).conv.in_channels == 1152  # the official ViT-S `channels`


def test_source_features_zero_padding_after_normalisation_and_center_pad():
    model = _tiny_fit3d()
    images = torch.rand(1, 3, 20, 20)
    valid = torch.ones(1, 1, 20, 20, dtype=torch.bool)
    valid[..., 12:, :] = False
    features = source_features(model.original, images, valid=valid)
    assert features.feature_maps.shape[-2:] == (3, 3)  # 20 -> 24 = 3 patches of 8, centre-padded
    pixels = backbones.normalize(images, model.original.config) * valid
    padded = torch.nn.functional.pad(pixels, (2, 2, 2, 2))
    expected = backbones.extract_features(model.original, padded)
    assert torch.allclose(features.feature_maps, expected.feature_maps, atol=1e-6)


def test_train_probe_clips_and_cycles_momentum(monkeypatch):
    from accelerate import Accelerator

    clips, betas = [], []
    original_clip = Accelerator.clip_grad_norm_

    def spy_clip(self, parameters, max_norm, **kwargs):
        clips.append(max_norm)
        return original_clip(self, parameters, max_norm, **kwargs)

    original_step = torch.optim.AdamW.step

    def spy_step(self, *args, **kwargs):
        betas.append(self.param_groups[0]["betas"][0])
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(Accelerator, "clip_grad_norm_", spy_clip)
    monkeypatch.setattr(torch.optim.AdamW, "step", spy_step)
    config = BenchmarkConfig(depth_iterations=10, depth_batch_size=2, depth_warmup_iterations=2).probe_config("depth")
    batch = ProbeBatch(torch.randn(2, 4, 3, 3), torch.rand(2, 12, 12) + 1, torch.randn(2, 4))
    train_probe(DepthProbe(4, max_depth=10.0), iter([batch] * 10), config, progress=False)
    assert clips == [35.0] * 10
    assert betas == pytest.approx([config.beta1(step) for step in range(10)]) and betas[0] == pytest.approx(0.95)
