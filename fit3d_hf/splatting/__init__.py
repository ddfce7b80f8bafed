"""Gaussian splatting: a differentiable rasterizer (gsplat on CUDA, pure PyTorch elsewhere) and densification."""

from .rasterize import rasterize
from .strategy import CappedDefaultStrategy

__all__ = ["CappedDefaultStrategy", "rasterize"]
