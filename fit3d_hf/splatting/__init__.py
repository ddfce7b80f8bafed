"""Gaussian splatting: a differentiable rasterizer (gsplat on CUDA, pure PyTorch elsewhere) and densification."""

from .gsplat_backend import gsplat_extension_problem, load_gsplat_extension
from .rasterize import rasterize, resolve_backend
from .strategy import CappedDefaultStrategy

__all__ = ["CappedDefaultStrategy", "gsplat_extension_problem", "load_gsplat_extension", "rasterize", "resolve_backend"]
