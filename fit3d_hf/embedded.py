"""The embedded backbone: a small `Dinov2Model` that this package pre-trains itself.

No pretrained weights can be downloaded where the demo must run, and a randomly initialised
ViT gives features that are random functions of each patch: lifting them mostly
averages noise and the probes say little. So the package ships a small ViT (patch 8) that was
pre-trained on the package's own synthetic rooms (`scenes.synthetic.make_room`, seeds from
`PRETRAIN_SCENE_SEED_OFFSET` on, disjoint from every demo scene) with SimMIM masked-patch
prediction (Xie et al., CVPR 2022): blocks of patches are replaced by the mask token and a
linear head regresses their per-patch normalised pixels (MAE's `norm_pix_loss`); the head is
discarded. It is a plain transformers `Dinov2Model`, so every part of the package treats it
like `facebook/dinov2-small`.

Regenerate the shipped weights (CPU; the seed, steps and measured time are written beside
them in `pretraining.json`):

    fit3d pretrain_embedded --output fit3d_hf/assets/embedded_backbone
"""

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import Dinov2Config, Dinov2Model

from .backbones import backbone_config, build_backbone, load_backbone, normalize
from .io import atomic_directory

EMBEDDED_BACKBONE_DIR = Path(__file__).resolve().parent / "assets" / "embedded_backbone"
EMBEDDED_BACKBONE_NAME = "fit3d-embedded-vit-p8 (SimMIM on synthetic rooms, shipped in fit3d_hf/assets)"
# Pre-training rooms use seeds from here on; demo and benchmark scenes use smaller seeds.
PRETRAIN_SCENE_SEED_OFFSET = 100_000


@dataclass
class EmbeddedPretrainConfig:
    """Architecture and SimMIM pre-training schedule of the embedded backbone.

    Args:
        hidden_size, num_hidden_layers, num_attention_heads, patch_size: the `Dinov2Config`.
        image_size: side of the square position-embedding table (interpolated to other sizes).
        num_scenes: synthetic rooms rendered for pre-training (seeds `PRETRAIN_SCENE_SEED_OFFSET + i`).
        views_per_scene, height, width: views per room and their size (the demo's room size).
        crop_height, crop_width: training resolution; random resized crops (scale `crop_scale`) of
            the rendered views, which also makes the features robust to a range of zooms.
        steps, batch_size, learning_rate, weight_decay, warmup_steps: AdamW, linear warm-up then cosine.
        mask_ratio, mask_block: fraction of patches masked, in square blocks of `mask_block` patches.
        seed: seeds the model initialisation, the crops and the masks.
    """

    hidden_size: int = field(default=128, metadata={"help": "Transformer width."})
    num_hidden_layers: int = field(default=4, metadata={"help": "Transformer depth."})
    num_attention_heads: int = field(default=4, metadata={"help": "Attention heads (must divide hidden_size)."})
    patch_size: int = field(default=8, metadata={"help": "Patch size in pixels."})
    image_size: int = field(default=160, metadata={"help": "Side of the square position-embedding table in pixels."})
    num_scenes: int = field(default=32, metadata={"help": "Synthetic rooms rendered for pre-training."})
    views_per_scene: int = field(default=24, metadata={"help": "Views rendered per room."})
    height: int = field(default=120, metadata={"help": "Rendered view height."})
    width: int = field(default=160, metadata={"help": "Rendered view width."})
    crop_height: int = field(default=96, metadata={"help": "Training crop height (multiple of patch_size)."})
    crop_width: int = field(default=128, metadata={"help": "Training crop width (multiple of patch_size)."})
    crop_scale: tuple[float, float] = field(default=(0.4, 1.0), metadata={"help": "Area fraction range of random crops."})
    steps: int = field(default=1200, metadata={"help": "Optimizer steps."})
    batch_size: int = field(default=32, metadata={"help": "Images per step."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak AdamW learning rate."})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay."})
    warmup_steps: int = field(default=100, metadata={"help": "Linear warm-up steps."})
    mask_ratio: float = field(default=0.5, metadata={"help": "Fraction of patches masked."})
    mask_block: int = field(default=2, metadata={"help": "Masks are squares of this many patches."})
    seed: int = field(default=0, metadata={"help": "Seed for initialisation, crops and masks."})


@dataclass
class PretrainResult:
    """What `pretrain_embedded_backbone` returns: the model, its loss curve and the wall time."""

    model: Dinov2Model
    losses: list[float]
    seconds: float


def embedded_backbone_config(config: EmbeddedPretrainConfig) -> Dinov2Config:
    """The `Dinov2Config` of the embedded backbone: DINOv2 settings, but layer scale 1 and a mask token for SimMIM."""
    if config.hidden_size % config.num_attention_heads:
        raise ValueError(f"hidden_size {config.hidden_size} is not divisible by num_attention_heads {config.num_attention_heads}")
    return backbone_config(
        "dinov2",
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        patch_size=config.patch_size,
        image_size=config.image_size,
        layerscale_value=1.0,
        use_mask_token=True,
    )


def render_pretraining_views(config: EmbeddedPretrainConfig, progress: bool = True) -> torch.Tensor:
    """Render the pre-training views from the package's synthetic rooms.

    Returns:
        images: `[num_scenes * views_per_scene, 3, height, width]` uint8 (kept small in memory).
    """
    from .scenes.synthetic import make_room

    views = []
    for i in tqdm(range(config.num_scenes), desc="pretrain rooms", disable=not progress):
        scene = make_room(
            PRETRAIN_SCENE_SEED_OFFSET + i, num_views=config.views_per_scene, height=config.height, width=config.width
        )
        views.append((scene.images() * 255).round().to(torch.uint8))
    return torch.cat(views)


def random_resized_crops(
    images: torch.Tensor, height: int, width: int, scale: tuple[float, float], generator: torch.Generator
) -> torch.Tensor:
    """Random crops (area fraction in `scale`, the image's aspect ratio) resized to `[B, 3, height, width]`, random h-flips.

    Args:
        images: `[B, 3, H, W]` float in [0, 1].
    """
    batch, _, full_h, full_w = images.shape
    crops = []
    for b in range(batch):
        area = scale[0] + (scale[1] - scale[0]) * torch.rand((), generator=generator).item()
        crop_h, crop_w = max(1, round(full_h * math.sqrt(area))), max(1, round(full_w * math.sqrt(area)))
        top = int(torch.randint(0, full_h - crop_h + 1, (), generator=generator))
        left = int(torch.randint(0, full_w - crop_w + 1, (), generator=generator))
        crop = images[b : b + 1, :, top : top + crop_h, left : left + crop_w]
        crop = F.interpolate(crop, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
        if torch.rand((), generator=generator) < 0.5:
            crop = crop.flip(-1)
        crops.append(crop)
    return torch.cat(crops).clamp(0, 1)


def random_block_mask(batch: int, grid_h: int, grid_w: int, block: int, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """SimMIM mask: `round(ratio * blocks)` random `block`×`block` squares of patches per image.

    Returns:
        bool_masked_pos: `[B, grid_h * grid_w]` bool, True = masked (the layout `Dinov2Model` takes).
    """
    blocks_h, blocks_w = math.ceil(grid_h / block), math.ceil(grid_w / block)
    num_masked = max(1, round(ratio * blocks_h * blocks_w))
    order = torch.rand(batch, blocks_h * blocks_w, generator=generator).argsort(dim=1)
    coarse = torch.zeros(batch, blocks_h * blocks_w, dtype=torch.bool)
    coarse.scatter_(1, order[:, :num_masked], True)
    coarse = coarse.view(batch, blocks_h, blocks_w)
    fine = coarse.repeat_interleave(block, dim=1).repeat_interleave(block, dim=2)[:, :grid_h, :grid_w]
    return fine.reshape(batch, grid_h * grid_w)


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """`[B, 3, H, W]` → `[B, (H/p)*(W/p), p*p*3]`, patches in the row-major order of ViT tokens."""
    batch, channels, height, width = images.shape
    grid_h, grid_w = height // patch_size, width // patch_size
    patches = images.reshape(batch, channels, grid_h, patch_size, grid_w, patch_size)
    return patches.permute(0, 2, 4, 3, 5, 1).reshape(batch, grid_h * grid_w, patch_size * patch_size * channels)


def simmim_loss(model: Dinov2Model, head: torch.nn.Linear, images: torch.Tensor, bool_masked_pos: torch.Tensor) -> torch.Tensor:
    """L1 between the head's prediction and the per-patch normalised pixels, on masked patches only.

    Args:
        images: `[B, 3, H, W]` in [0, 1]; bool_masked_pos: `[B, h*w]`.
    """
    pixel_values = normalize(images, model.config)
    tokens = model(pixel_values=pixel_values, bool_masked_pos=bool_masked_pos).last_hidden_state[:, 1:]
    prediction = head(tokens)
    target = patchify(images, model.config.patch_size)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    per_patch = (prediction - target).abs().mean(-1)
    mask = bool_masked_pos.float()
    return (per_patch * mask).sum() / mask.sum()


def pretrain_embedded_backbone(
    config: EmbeddedPretrainConfig, images: torch.Tensor | None = None, progress: bool = True
) -> PretrainResult:
    """Pre-train the embedded backbone with SimMIM on synthetic rooms.

    Args:
        config: architecture and schedule.
        images: `[N, 3, H, W]` uint8 or float in [0, 1]; default: `render_pretraining_views(config)`.
        progress: show progress bars.

    Returns:
        `PretrainResult` with the trained `Dinov2Model` (float32, eval mode), the per-step loss and the seconds spent.
    """
    if config.crop_height % config.patch_size or config.crop_width % config.patch_size:
        raise ValueError(f"crop {config.crop_height}x{config.crop_width} is not a multiple of patch_size {config.patch_size}")
    start = time.perf_counter()
    if images is None:
        images = render_pretraining_views(config, progress=progress)
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    model = build_backbone(embedded_backbone_config(config))
    head = torch.nn.Linear(config.hidden_size, config.patch_size**2 * 3)
    parameters = list(model.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay, betas=(0.9, 0.95))

    def lr_factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress_fraction = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * progress_fraction))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    grid_h, grid_w = config.crop_height // config.patch_size, config.crop_width // config.patch_size
    losses = []
    model.train()
    bar = tqdm(range(config.steps), desc="SimMIM pre-training", disable=not progress)
    for _ in bar:
        index = torch.randint(0, len(images), (config.batch_size,), generator=generator)
        batch = images[index]
        batch = batch.float() / 255 if batch.dtype == torch.uint8 else batch.float()
        batch = random_resized_crops(batch, config.crop_height, config.crop_width, config.crop_scale, generator)
        mask = random_block_mask(config.batch_size, grid_h, grid_w, config.mask_block, config.mask_ratio, generator)
        loss = simmim_loss(model, head, batch, mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return PretrainResult(model=model, losses=losses, seconds=time.perf_counter() - start)


def save_embedded_backbone(result: PretrainResult, config: EmbeddedPretrainConfig, output_dir: str | os.PathLike) -> Path:
    """Write `config.json`, `model.safetensors` (float16) and `pretraining.json` into `output_dir`, atomically."""
    with atomic_directory(output_dir, overwrite=True) as staging:
        result.model.half().save_pretrained(staging)
        result.model.float()
        record = {
            "name": EMBEDDED_BACKBONE_NAME,
            "objective": "SimMIM masked-patch prediction (L1 on per-patch normalised pixels)",
            "scene_seeds": [PRETRAIN_SCENE_SEED_OFFSET, PRETRAIN_SCENE_SEED_OFFSET + config.num_scenes - 1],
            "config": asdict(config),
            "seconds": round(result.seconds, 1),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "loss_first_50": sum(result.losses[:50]) / max(1, len(result.losses[:50])),
            "loss_last_50": sum(result.losses[-50:]) / max(1, len(result.losses[-50:])),
            "losses": [round(x, 5) for x in result.losses],
        }
        (staging / "pretraining.json").write_text(json.dumps(record, indent=1) + "\n")
    return Path(output_dir)


def load_embedded_backbone(path: str | os.PathLike | None = None) -> Dinov2Model:
    """Load the embedded backbone (default: the weights shipped in `fit3d_hf/assets/embedded_backbone`) in float32, eval mode."""
    path = Path(path) if path is not None else EMBEDDED_BACKBONE_DIR
    if not (path / "model.safetensors").exists():
        raise FileNotFoundError(
            f"no embedded backbone weights at {path}/model.safetensors; regenerate them with "
            f"`fit3d pretrain_embedded --output {path}`"
        )
    return load_backbone(str(path), dtype=torch.float32).eval()
