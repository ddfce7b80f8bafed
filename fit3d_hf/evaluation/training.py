"""Train and apply a linear probe on features of a frozen source.

The loop takes batches of (features, targets[, CLS]) from any iterator: `cached_batches` draws
them from features computed once per image (the `fixed` protocol, where a probe step costs only
the head's forward and backward); the benchmark's `paper` protocol computes them on the fly from
augmented crops. One visible loop, in the shape of accelerate's examples: prepare, forward,
backward, clip, step. Schedules and momentum follow mmcv's hooks, which the official probes use.
"""

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from .heads import DepthProbe, SegmentationProbe, depth_loss, segmentation_loss


class ProbeBatch(NamedTuple):
    """One probe step's input: features `[B, C, h, w]`, targets `[B, H, W]` (class ids, 255 =
    ignore, or metres, 0 = invalid) and, for depth probes, the CLS token `[B, C_cls]`."""

    features: torch.Tensor
    targets: torch.Tensor
    cls_token: torch.Tensor | None = None


def _annealing_cos(start: float, end: float, fraction: float) -> float:
    return end + 0.5 * (start - end) * (math.cos(math.pi * fraction) + 1)


@dataclass
class ProbeConfig:
    """Optimisation of one probe (mmcv's iteration-based hooks, as in the official configs).

    Args:
        task: "segmentation" or "depth".
        iterations: optimizer steps.
        batch_size: images per step (per process).
        lr, weight_decay: AdamW (betas 0.9, 0.999).
        schedule: "poly" (power 1, segmentation) or "cosine" (depth), from lr down to
            `min_lr_ratio`·lr at `iterations`.
        warmup_iterations, warmup_ratio: linear warm-up; as mmcv's, it scales the schedule's lr at
            that step by a factor rising from `warmup_ratio` to 1.
        min_lr_ratio: the schedule's final lr, relative to lr (cosine only; poly ends at 0).
        sig_warmup_iterations: depth only; SigLoss uses only its mean term for these steps.
        max_grad_norm: clip the gradients' global 2-norm to this (None: no clipping).
        momentum_cycle: (low, high, fraction): mmcv's OneCycle momentum for AdamW's beta1 —
            cosine from high to low over the first `fraction` of the steps, then back to high
            (None: beta1 stays 0.9).
        loss: segmentation: "all_pixels" or "labelled_pixels" (`heads.segmentation_loss`);
            depth: "sigloss" or "sigloss+gradient" (`heads.depth_loss`).
        loss_group_size: depth only: images per loss term (`heads.depth_loss`'s group_size).
    """

    task: str
    iterations: int
    batch_size: int
    lr: float
    weight_decay: float
    schedule: str
    warmup_iterations: int = 0
    warmup_ratio: float = 1e-6
    min_lr_ratio: float = 0.0
    sig_warmup_iterations: int = 0
    max_grad_norm: float | None = None
    momentum_cycle: tuple[float, float, float] | None = None
    loss: str = "all_pixels"
    loss_group_size: int | None = None

    def lr_factor(self, step: int) -> float:
        """Multiplier of lr at optimizer step `step` (0-based)."""
        progress = min(1.0, step / max(1, self.iterations))
        if self.schedule == "poly":
            factor = 1.0 - progress
        elif self.schedule == "cosine":
            factor = _annealing_cos(1.0, self.min_lr_ratio, progress)
        else:
            raise ValueError(f"unknown schedule {self.schedule!r} (poly or cosine)")
        if step < self.warmup_iterations:
            factor *= self.warmup_ratio + (1 - self.warmup_ratio) * step / self.warmup_iterations
        return factor

    def beta1(self, step: int) -> float:
        """AdamW's beta1 at optimizer step `step` (mmcv's OneCycleMomentumUpdaterHook, two phases)."""
        if self.momentum_cycle is None:
            return 0.9
        low, high, fraction = self.momentum_cycle
        turn = fraction * self.iterations - 1
        if step <= turn:
            return _annealing_cos(high, low, step / max(turn, 1e-12))
        return _annealing_cos(low, high, (step - turn) / max(self.iterations - 1 - turn, 1e-12))


def build_head(
    task: str,
    in_channels: int,
    *,
    num_labels: int | None = None,
    max_depth: float | None = None,
    min_depth: float = 1e-3,
    cls_channels: int | None = None,
) -> nn.Module:
    """A fresh `SegmentationProbe` (needs num_labels) or `DepthProbe` (needs max_depth; its CLS
    token is `cls_channels` wide, default `in_channels`)."""
    if task == "segmentation":
        if num_labels is None:
            raise ValueError("a segmentation probe needs num_labels")
        return SegmentationProbe(in_channels, num_labels)
    if task == "depth":
        if max_depth is None:
            raise ValueError("a depth probe needs max_depth")
        return DepthProbe(in_channels, max_depth=max_depth, min_depth=min_depth, cls_channels=cls_channels)
    raise ValueError(f"unknown probe task {task!r} (segmentation or depth)")


def _head_forward(head: nn.Module, features: torch.Tensor, cls_token: torch.Tensor | None, size: tuple[int, int]) -> torch.Tensor:
    if cls_token is None:
        return head(features, size)
    return head(features, cls_token, size).depth


def cached_batches(
    features: torch.Tensor,
    targets: torch.Tensor,
    batch_size: int,
    *,
    cls_token: torch.Tensor | None = None,
    seed: int = 0,
    process_index: int = 0,
) -> Iterator[ProbeBatch]:
    """Endless random batches (with replacement) of precomputed features `[N, C, h, w]` (any float
    dtype), targets `[N, H, W]` and CLS tokens `[N, C_cls]`; each process draws its own."""
    if features.shape[0] != targets.shape[0]:
        raise ValueError(f"{features.shape[0]} feature maps for {targets.shape[0]} targets")
    generator = torch.Generator().manual_seed(seed * 1000 + process_index)
    while True:
        index = torch.randint(features.shape[0], (batch_size,), generator=generator)
        yield ProbeBatch(features[index], targets[index], None if cls_token is None else cls_token[index])


def train_probe(
    head: nn.Module,
    batches: Iterable[ProbeBatch],
    config: ProbeConfig,
    *,
    accelerator: Accelerator | None = None,
    progress: bool = True,
    description: str = "",
) -> nn.Module:
    """Train `head` for `config.iterations` steps on `batches`; return it (unwrapped, in eval mode).

    Args:
        head: a `SegmentationProbe` or `DepthProbe` (see `build_head`).
        batches: `ProbeBatch`es, at least `config.iterations` of them (`cached_batches`, or the
            benchmark's augmented batches); depth batches carry a CLS token, segmentation ones none.
    """
    accelerator = accelerator or Accelerator(cpu=not torch.accelerator.is_available())  # as in `finetune`
    if accelerator.num_processes > 1 and accelerator.device.type == "cuda":
        # batch statistics over the global batch, as the official probes' SyncBN
        head = nn.SyncBatchNorm.convert_sync_batchnorm(head)
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.999))
    # Not prepared: a prepared scheduler would step once per process per optimizer step.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, config.lr_factor)
    head, optimizer = accelerator.prepare(head, optimizer)
    head.train()
    bar = tqdm(
        zip(range(config.iterations), batches),
        total=config.iterations,
        desc=f"{config.task} probe {description}".strip(),
        disable=not (progress and accelerator.is_main_process),
        leave=False,
    )
    for step, batch in bar:
        if (batch.cls_token is None) != (config.task == "segmentation"):
            raise ValueError("depth probes need a CLS token in every batch; segmentation probes take none")
        x = batch.features.to(accelerator.device, torch.float32)
        y = batch.targets.to(accelerator.device)
        cls = None if batch.cls_token is None else batch.cls_token.to(accelerator.device, torch.float32)
        out = _head_forward(head, x, cls, tuple(y.shape[-2:]))
        if config.task == "segmentation":
            loss = segmentation_loss(out, y, mean_over=config.loss)
        else:
            loss = depth_loss(
                out,
                y[:, None].float(),
                objective=config.loss,
                warm_up=step < config.sig_warmup_iterations,
                group_size=config.loss_group_size,
            )
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        if config.max_grad_norm is not None:
            accelerator.clip_grad_norm_(head.parameters(), config.max_grad_norm)
        for group in optimizer.param_groups:
            group["betas"] = (config.beta1(step), group["betas"][1])
        optimizer.step()
        scheduler.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    head = accelerator.unwrap_model(head)
    return head.eval()


@torch.no_grad()
def predict(
    head: nn.Module, features: torch.Tensor, size: tuple[int, int], *, cls_token: torch.Tensor | None = None
) -> torch.Tensor:
    """Predictions `[N, H, W]` at the label size (H, W): class ids (segmentation) or depth in
    metres (depth); features `[N, C, h, w]`, cls_token `[N, C_cls]` (depth only)."""
    out = predict_raw(head, features, size, cls_token=cls_token)
    return (out.argmax(1) if cls_token is None else out[:, 0]).cpu()


@torch.no_grad()
def predict_raw(
    head: nn.Module, features: torch.Tensor, size: tuple[int, int], *, cls_token: torch.Tensor | None = None
) -> torch.Tensor:
    """The head's output at size (H, W), on its device: logits `[N, K, H, W]` or depth `[N, 1, H, W]`."""
    head.eval()
    device = next(head.parameters()).device
    x = features.to(device, torch.float32)
    cls = None if cls_token is None else cls_token.to(device, torch.float32)
    return _head_forward(head, x, cls, size)
