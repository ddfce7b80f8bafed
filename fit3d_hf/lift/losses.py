"""The Stage I objective, with the default weights: 0.8·L1(rgb) + 0.2·(1 − SSIM(rgb)) + 1.0·L1(decoded features, backbone features).

Masked pixels count in neither term. The feature term reaches only the features and the decoder
(`rasterize(..., features=...)` composites them with detached blending weights), so geometry and
the densification statistics come from RGB alone.
"""

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from ..splatting.ssim import ssim_map
from .config import LiftConfig
from .gaussians import rasterize_params
from .views import Views


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of `[V, C, H, W]` values over the pixels where `mask [V, 1, H, W]` is 1."""
    if mask is None:
        return values.mean()
    return (values * mask).sum() / (mask.sum() * values.shape[1]).clamp_min(1)


def training_loss(
    params: Mapping[str, torch.Tensor],
    decoder_weight: torch.Tensor,
    views: Views,
    row: int,
    sh_degree: int,
    config: LiftConfig,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict]:
    """Loss of the training view in `row` of `views`.

    Features are decoded (`decoder_weight [Cb, D, 3, 3]`) at the render size divided by
    `config.feature_downscale` and compared with the backbone's patch features bilinearly upsampled
    to that size.

    Returns:
        (loss, its terms `l1`, `ssim`, `feature_l1`, the rasterizer's meta for the densification strategy).
    """
    device = params["means"].device
    image = views.images[row : row + 1].to(device, torch.float32)
    height, width = image.shape[-2:]
    mask = None if views.masks is None else views.masks[row : row + 1].to(device)
    renders, _, meta = rasterize_params(
        params,
        views.intrinsics[row : row + 1].to(device),
        views.world_to_camera[row : row + 1].to(device),
        width,
        height,
        sh_degree,
        config.backend,
        # The lifting loop checks the parameters every `config.check_every` steps instead of every call.
        check_finite=False,
        near_plane=config.near_plane,
    )
    rgb = renders.permute(0, 3, 1, 2)
    l1 = masked_mean((rgb - image).abs(), mask)
    ssim = masked_mean(ssim_map(rgb, image), mask)
    features = meta["features"].permute(0, 3, 1, 2)
    mask_small = mask
    if config.feature_downscale > 1:
        size = (max(1, height // config.feature_downscale), max(1, width // config.feature_downscale))
        features = F.adaptive_avg_pool2d(features, size)
        mask_small = None if mask is None else F.interpolate(mask, size=size, mode="nearest")
    decoded = F.conv2d(features, decoder_weight, padding=1)
    target = F.interpolate(
        views.targets[row : row + 1].to(device, torch.float32), size=decoded.shape[-2:], mode="bilinear", align_corners=False
    )
    feature_l1 = masked_mean((decoded - target).abs(), mask_small)
    loss = config.rgb_l1_weight * l1 + config.ssim_weight * (1 - ssim) + config.feature_weight * feature_l1
    return loss, {"l1": l1, "ssim": ssim, "feature_l1": feature_l1}, meta
