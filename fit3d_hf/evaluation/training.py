"""Train and apply a linear probe over precomputed features of a frozen source.

The source's features are computed once per image (`benchmark.extract_source_features`) and
reused by every probe seed, so training a probe costs only the head's forward and backward.
One visible loop, in the shape of accelerate's examples: prepare, forward, backward, step.
"""

import math
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from .heads import DepthProbe, SegmentationProbe, depth_loss, segmentation_loss


@dataclass
class ProbeConfig:
    """Optimisation of one probe.

    Args:
        task: "segmentation" or "depth".
        iterations: optimizer steps.
        batch_size: images per step (per process).
        lr, weight_decay: AdamW.
        schedule: "poly" (power 1, DINOv2 segmentation) or "cosine" (DINOv2 depth).
        warmup_iterations: linear warm-up from `warmup_ratio`·lr.
        warmup_ratio: starting fraction of lr during warm-up.
        sig_warmup_iterations: depth only; SigLoss uses only its mean term for these
            steps (mmdepth's warm-up).
    """

    task: str
    iterations: int
    batch_size: int
    lr: float
    weight_decay: float
    schedule: str
    warmup_iterations: int = 0
    warmup_ratio: float = 1e-6
    sig_warmup_iterations: int = 0

    def lr_factor(self, step: int) -> float:
        """Multiplier of lr at optimizer step `step` (0-based)."""
        if step < self.warmup_iterations:
            return self.warmup_ratio + (1 - self.warmup_ratio) * step / self.warmup_iterations
        progress = min(1.0, step / max(1, self.iterations))
        if self.schedule == "poly":
            return 1.0 - progress
        if self.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        raise ValueError(f"unknown schedule {self.schedule!r} (poly or cosine)")


def build_head(
    task: str, in_channels: int, *, num_labels: int | None = None, max_depth: float | None = None, min_depth: float = 1e-3
) -> nn.Module:
    """A fresh `SegmentationProbe` (needs num_labels) or `DepthProbe` (needs max_depth)."""
    if task == "segmentation":
        if num_labels is None:
            raise ValueError("a segmentation probe needs num_labels")
        return SegmentationProbe(in_channels, num_labels)
    if task == "depth":
        if max_depth is None:
            raise ValueError("a depth probe needs max_depth")
        return DepthProbe(in_channels, max_depth=max_depth, min_depth=min_depth)
    raise ValueError(f"unknown probe task {task!r} (segmentation or depth)")


def _head_forward(head: nn.Module, features: torch.Tensor, cls_token: torch.Tensor | None, size: tuple[int, int]) -> torch.Tensor:
    if cls_token is None:
        return head(features, size)
    return head(features, cls_token, size).depth


def train_probe(
    head: nn.Module,
    features: torch.Tensor,
    targets: torch.Tensor,
    config: ProbeConfig,
    *,
    cls_token: torch.Tensor | None = None,
    seed: int = 0,
    accelerator: Accelerator | None = None,
    progress: bool = True,
) -> nn.Module:
    """Train `head` on cached features; return it (unwrapped, in eval mode).

    Args:
        head: a `SegmentationProbe` or `DepthProbe` (see `build_head`).
        features: `[N, C, h, w]` (any float dtype; cast to float32 per batch).
        targets: `[N, H, W]`: class ids (255 = ignore) or depth in metres (0 = invalid).
        cls_token: `[N, C]`, depth probes only.
        seed: seeds the head's init-independent randomness (batch order); init the head
            under the same seed for a fully seeded run.
    """
    if features.shape[0] != targets.shape[0]:
        raise ValueError(f"{features.shape[0]} feature maps for {targets.shape[0]} targets")
    if (cls_token is None) != (config.task == "segmentation"):
        raise ValueError("depth probes need cls_token; segmentation probes take none")
    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    # Not prepared: a prepared scheduler would step once per process per optimizer step.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, config.lr_factor)
    head, optimizer = accelerator.prepare(head, optimizer)
    generator = torch.Generator().manual_seed(seed * 1000 + accelerator.process_index)
    size = tuple(targets.shape[-2:])
    max_depth = getattr(accelerator.unwrap_model(head), "max_depth", None)
    head.train()
    bar = tqdm(
        range(config.iterations),
        desc=f"{config.task} probe seed {seed}",
        disable=not (progress and accelerator.is_main_process),
        leave=False,
    )
    for step in bar:
        index = torch.randint(features.shape[0], (config.batch_size,), generator=generator)
        x = features[index].to(accelerator.device, torch.float32)
        y = targets[index].to(accelerator.device)
        cls = None if cls_token is None else cls_token[index].to(accelerator.device, torch.float32)
        out = _head_forward(head, x, cls, size)
        if config.task == "segmentation":
            loss = segmentation_loss(out, y)
        else:
            loss = depth_loss(out, y[:, None].float(), max_depth=max_depth, warm_up=step < config.sig_warmup_iterations)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
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
    metres (depth); features `[N, C, h, w]`, cls_token `[N, C]` (depth only)."""
    head.eval()
    device = next(head.parameters()).device
    x = features.to(device, torch.float32)
    cls = None if cls_token is None else cls_token.to(device, torch.float32)
    out = _head_forward(head, x, cls, size)
    return (out.argmax(1) if cls_token is None else out[:, 0]).cpu()
