"""Linear probe heads and their losses (DINOv2 protocol, as used by FiT3D).

Segmentation: BatchNorm + 1×1 conv on the last layer's normed patch features; logits are
bilinearly upsampled to the label size; cross-entropy ignoring 255.

Every bilinear resize here is `resize_bilinear`: F.interpolate's weights applied as two matmuls,
the same numbers up to float rounding and, forward and backward, about 2× faster on a CPU.

Depth: the last layer's patch features *without* the final norm, concatenated with the CLS
token broadcast over the grid; upsampled ×4; a 1×1 conv to 256 bins spread uniformly over
[min_depth, max_depth]; bin weights relu(x) + 0.1, normalised; depth = Σ weights · centres. For
FiT3D the input is [original patches ‖ fine-tuned patches ‖ original CLS], 3C channels, as the
official `linear_evaluate_fit3d.py` and `linear_head.py` build it (the benchmark picks the CLS).
Loss (`depth_loss`): SigLoss (λ = 0.15), what the official configs effectively train (see
`depth_loss`), or SigLoss + 0.5 · our multi-scale gradient loss on log depth.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput


def _bilinear_matrix(n_in: int, n_out: int, like: torch.Tensor) -> torch.Tensor:
    """`[n_out, n_in]` weights of 1-D bilinear resizing (align_corners=False), so that
    `A_h @ x @ A_w.T` equals `F.interpolate(x, mode="bilinear")`."""
    eye = torch.eye(n_in, device=like.device, dtype=like.dtype)[None]
    return F.interpolate(eye, size=n_out, mode="linear", align_corners=False)[0].T


def resize_bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """`F.interpolate(x, size, mode="bilinear", align_corners=False)` of `[B, C, h, w]` -> `[B, C, H, W]`,
    as `A_h @ x @ A_w.T`: separable, so exact up to float rounding, and its backward is two matmuls
    instead of upsample_bilinear2d_backward's scatter."""
    h, w = x.shape[-2:]
    return _bilinear_matrix(h, size[0], x) @ x @ _bilinear_matrix(w, size[1], x).T


@dataclass
class DepthProbeOutput(ModelOutput):
    """Args:
    depth (`[B, 1, H', W']`): predicted depth in metres at the requested size.
    bin_weights (`[B, n_bins, 4h, 4w]`): normalised weights over the depth bins (only with `output_bin_weights`).
    """

    depth: torch.Tensor | None = None
    bin_weights: torch.Tensor | None = None


class SegmentationProbe(nn.Module):
    """BatchNorm + 1×1 conv: patch features `[B, C, h, w]` -> logits `[B, K, H, W]`."""

    def __init__(self, in_channels: int, num_labels: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(in_channels)
        self.conv = nn.Conv2d(in_channels, num_labels, kernel_size=1)
        nn.init.normal_(self.conv.weight, std=0.01)
        nn.init.zeros_(self.conv.bias)

    def forward(self, feature_maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """feature_maps `[B, C, h, w]`, size (H, W) of the labels -> logits `[B, K, H, W]`."""
        return resize_bilinear(self.conv(self.bn(feature_maps)), size)


SEGMENTATION_LOSSES = ("all_pixels", "labelled_pixels")


def segmentation_loss(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255, mean_over: str = "all_pixels"
) -> torch.Tensor:
    """Cross-entropy of logits `[B, K, H, W]` against labels `[B, H, W]`; ignored pixels add nothing.

    mean_over: "all_pixels" divides by every pixel, ignored and padded ones included (mmseg 0.27's
    CrossEntropyLoss, `avg_non_ignore=False`, what the official probes train with);
    "labelled_pixels" divides by the labelled ones (PyTorch's default).
    """
    if mean_over not in SEGMENTATION_LOSSES:
        raise ValueError(f"mean_over must be one of {SEGMENTATION_LOSSES}, got {mean_over!r}")
    if mean_over == "labelled_pixels":
        return F.cross_entropy(logits, labels.long(), ignore_index=ignore_index)
    return F.cross_entropy(logits, labels.long(), ignore_index=ignore_index, reduction="none").mean()


class DepthProbe(nn.Module):
    """Binned linear depth head over `[patch features, CLS]`.

    Args:
        in_channels: width of the patch features C.
        max_depth, min_depth: range of the uniform bins (metres).
        n_bins: number of bins (256 in the protocol).
        upsample: factor applied to the feature grid before the 1×1 conv (4).
        cls_channels: width of the CLS token (default C); the conv sees `in_channels + cls_channels`
            (FiT3D ViT-S: 768 + 384 = 1152, the official `channels`).
    """

    def __init__(
        self,
        in_channels: int,
        max_depth: float,
        min_depth: float = 1e-3,
        n_bins: int = 256,
        upsample: int = 4,
        cls_channels: int | None = None,
    ):
        super().__init__()
        self.upsample = upsample
        self.conv = nn.Conv2d(in_channels + (in_channels if cls_channels is None else cls_channels), n_bins, kernel_size=1)
        nn.init.normal_(self.conv.weight, std=0.01)
        nn.init.zeros_(self.conv.bias)
        self.register_buffer("bins", torch.linspace(min_depth, max_depth, n_bins), persistent=False)
        # [bin centres; ones] as a fixed 1×1 conv: Σ_k w_k·bin_k and Σ_k w_k in one pass over the weights.
        self.register_buffer("bin_moments", torch.stack([self.bins, torch.ones(n_bins)])[:, :, None, None], persistent=False)
        self.min_depth, self.max_depth = min_depth, max_depth

    def forward(
        self, feature_maps: torch.Tensor, cls_token: torch.Tensor, size: tuple[int, int], output_bin_weights: bool = False
    ) -> DepthProbeOutput:
        """feature_maps `[B, C, h, w]` (unnormed), cls_token `[B, C_cls]`, size (H, W) -> depth `[B, 1, H, W]`
        (and, with `output_bin_weights`, the normalised bin weights `[B, n_bins, 4h, 4w]`)."""
        cls = cls_token[:, :, None, None].expand(-1, -1, *feature_maps.shape[-2:])
        x = torch.cat([feature_maps, cls], dim=1)
        h, w = feature_maps.shape[-2:]
        # Bilinear upsampling and a 1×1 conv commute (both linear; interpolation weights sum
        # to 1), so convolving on the patch grid equals the protocol's order at upsample² less cost.
        logits = resize_bilinear(self.conv(x), (h * self.upsample, w * self.upsample))
        weights = torch.relu(logits) + 0.1
        # depth = Σ_k w_k·bin_k / Σ_k w_k, the protocol's Σ_k (w_k / Σ_j w_j)·bin_k without
        # materialising the normalised weights (the costliest tensor of a training step).
        moments = F.conv2d(weights, self.bin_moments)
        depth = resize_bilinear(moments[:, :1] / moments[:, 1:], size)
        bin_weights = weights / moments[:, 1:] if output_bin_weights else None
        return DepthProbeOutput(depth=depth.clamp(self.min_depth, self.max_depth), bin_weights=bin_weights)


def sig_loss(
    pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, lam: float = 0.15, warm_up: bool = False, eps: float = 1e-3
) -> torch.Tensor:
    """Scale-invariant log loss `sqrt(var(g) + λ·mean(g)²)`, g = log(pred+eps) − log(target+eps),
    over valid pixels of `[B, 1, H, W]` maps; during warm-up only `sqrt(λ·mean(g)²)` (as mmdepth)."""
    g = torch.log(pred[valid] + eps) - torch.log(target[valid] + eps)
    if g.numel() < 2:
        return pred.sum() * 0
    if warm_up:
        return torch.sqrt(lam * g.mean() ** 2 + 1e-12)
    return torch.sqrt(g.var() + lam * g.mean() ** 2)


def gradient_loss(
    pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, eps: float = 1e-3, scales: int = 4
) -> torch.Tensor:
    """Multi-scale gradient matching of log depth over `[B, 1, H, W]` maps (mmdepth's
    GradientLoss at strides 1, 2, 4, 6, with 2-pixel differences), corrected: the official one
    slices the first two dims of the 4D tensor (batch, channel), which is exactly zero at its 2
    images per GPU; here the strides and differences apply to H and W."""
    total = pred.new_zeros(())
    for i in range(scales):
        step = max(1, 2 * i)
        p, t, m = pred[..., ::step, ::step], target[..., ::step, ::step], valid[..., ::step, ::step].float()
        n = m.sum()
        if n == 0:
            continue
        diff = (torch.log(p + eps) - torch.log(t + eps)) * m
        v = (diff[..., :-2, :] - diff[..., 2:, :]).abs() * m[..., :-2, :] * m[..., 2:, :]
        h = (diff[..., :, :-2] - diff[..., :, 2:]).abs() * m[..., :, :-2] * m[..., :, 2:]
        total = total + (v.sum() + h.sum()) / n
    return total


DEPTH_LOSSES = ("sigloss", "sigloss+gradient")


def depth_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    *,
    objective: str = "sigloss",
    warm_up: bool = False,
    group_size: int | None = None,
) -> torch.Tensor:
    """The depth probe's loss; pred, target `[B, 1, H, W]` metres, valid where target > 0 (the
    official losses set no upper bound).

    objective: "sigloss" — SigLoss (λ 0.15) alone: what the official configs effectively train,
        since their `SigLoss + 0.5 · GradientLoss` has a gradient term that is exactly zero at 2
        images per GPU; "sigloss+gradient" — SigLoss + 0.5 · `gradient_loss`, the gradient term
        as intended (a deviation from what the paper's probes trained on).
    warm_up: SigLoss keeps only its mean term (its first 100 steps in the official configs).
    group_size: compute the loss over groups of this many images and average the groups, as
        data-parallel training with this many images per GPU does (the official: 2); None: one
        group, the whole batch.
    """
    if objective not in DEPTH_LOSSES:
        raise ValueError(f"objective must be one of {DEPTH_LOSSES}, got {objective!r}")
    step = group_size or pred.shape[0]
    losses = []
    for start in range(0, pred.shape[0], step):
        p, t = pred[start : start + step], target[start : start + step]
        valid = t > 0
        loss = sig_loss(p, t, valid, warm_up=warm_up)
        if objective == "sigloss+gradient":
            loss = loss + 0.5 * gradient_loss(p, t, valid)
        losses.append(loss)
    return torch.stack(losses).mean()
