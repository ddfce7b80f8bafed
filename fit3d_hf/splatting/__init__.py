"""Gaussian splatting: a differentiable rasterizer (gsplat on CUDA, pure PyTorch elsewhere)."""

from .lift import FeatureGaussians, LiftConfig, lift_scene, lift_scenes
from .rasterize import rasterize

__all__ = ["FeatureGaussians", "LiftConfig", "lift_scene", "lift_scenes", "rasterize"]
