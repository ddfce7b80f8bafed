"""Gaussian splatting: a differentiable rasterizer (gsplat on CUDA, pure PyTorch elsewhere)."""

from .rasterize import rasterize
from .lift import FeatureGaussians, LiftConfig, lift_scene, lift_scenes
