"""Structural similarity in plain torch (the 3DGS variant: 11×11 Gaussian window, σ = 1.5).

`fused-ssim`, which gsplat's trainer uses, is not on PyPI; this is the same formula with
`conv2d`, runs on any device and returns the per-pixel map so that masks can be applied.
"""

import torch
import torch.nn.functional as F

_C1 = 0.01**2
_C2 = 0.03**2


def _gaussian_window(size: int, sigma: float, channels: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    x = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim_map(x: torch.Tensor, y: torch.Tensor, window_size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-pixel SSIM between two image batches.

    Args:
        x, y: `[B, C, H, W]` images in [0, 1].

    Returns:
        `[B, C, H, W]` SSIM map (1 where the images agree); zero padding at the border, as in 3DGS.
    """
    channels = x.shape[1]
    window = _gaussian_window(window_size, sigma, channels, x.device, x.dtype)
    pad = window_size // 2
    mu_x = F.conv2d(x, window, padding=pad, groups=channels)
    mu_y = F.conv2d(y, window, padding=pad, groups=channels)
    var_x = F.conv2d(x * x, window, padding=pad, groups=channels) - mu_x**2
    var_y = F.conv2d(y * y, window, padding=pad, groups=channels) - mu_y**2
    cov_xy = F.conv2d(x * y, window, padding=pad, groups=channels) - mu_x * mu_y
    numerator = (2 * mu_x * mu_y + _C1) * (2 * cov_xy + _C2)
    denominator = (mu_x**2 + mu_y**2 + _C1) * (var_x + var_y + _C2)
    return numerator / denominator
