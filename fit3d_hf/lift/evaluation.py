"""How well lifted Gaussians fit a scene's views, and the summary table of a lifting run."""

import math

import torch
import torch.nn.functional as F

from .gaussians import FeatureGaussians
from .views import Views


@torch.no_grad()
def evaluate(gaussians: FeatureGaussians, views: Views, backend: str = "auto") -> dict[str, float]:
    """RGB PSNR (masked) over `views` and feature L1 / cosine similarity against the backbone's features.

    Everything at the render size, as later stages use the Gaussians: features decoded at full
    render size (whatever `feature_downscale` training used), against the backbone's patch
    features bilinearly upsampled to it.

    Returns:
        `{"psnr": dB, "feature_l1": ..., "feature_cosine": ...}`, over the unmasked pixels of `views`.
    """
    device = gaussians.params["means"].device
    squared_error = pixels = feature_l1 = cosine = feature_pixels = 0.0
    for row in range(len(views.indices)):
        image = views.images[row : row + 1].to(device, torch.float32)
        height, width = image.shape[-2:]
        rgb, features, _ = gaussians.render(
            views.intrinsics[row : row + 1], views.world_to_camera[row : row + 1], width, height, backend=backend
        )
        mask = torch.ones_like(image[:, :1]) if views.masks is None else views.masks[row : row + 1].to(device)
        squared_error += ((rgb - image) ** 2 * mask).sum().item()
        pixels += mask.sum().item() * 3
        decoded = gaussians.decode(features)
        target = F.interpolate(
            views.targets[row : row + 1].to(device, torch.float32), size=decoded.shape[-2:], mode="bilinear", align_corners=False
        )
        feature_l1 += ((decoded - target).abs().mean(1, keepdim=True) * mask).sum().item()
        cosine += (F.cosine_similarity(decoded, target, dim=1)[:, None] * mask).sum().item()
        feature_pixels += mask.sum().item()
    mse = squared_error / max(pixels, 1)
    return {
        "psnr": 10 * math.log10(1 / max(mse, 1e-12)),
        "feature_l1": feature_l1 / max(feature_pixels, 1),
        "feature_cosine": cosine / max(feature_pixels, 1),
    }


def summary_table(reports: list[dict]) -> str:
    """A markdown table with one row per scene of `reports` (what `lift_scenes` returns), sorted by scene id."""
    lines = [
        "| scene | status | Gaussians | held-out PSNR (dB) | feature cosine | feature L1 | it/s | train time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(reports, key=lambda r: r["scene_id"]):
        m, its = r["metrics"], r["iterations_per_second"]
        lines.append(
            f"| {r['scene_id']} | {r['status']} | {r['num_gaussians']} | {m['psnr']:.2f} | {m['feature_cosine']:.3f} "
            f"| {m['feature_l1']:.4f} | {'-' if its is None else f'{its:.2f}'} | {r['timings_s']['train']:.1f} |"
        )
    return "\n".join(lines)
