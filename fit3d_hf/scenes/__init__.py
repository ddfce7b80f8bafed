"""Posed multi-view scenes: loaders for real captures and procedural synthetic rooms."""

from fit3d_hf.scenes.collection import load_scenes
from fit3d_hf.scenes.images import SceneError
from fit3d_hf.scenes.load import detect_format, load_scene
from fit3d_hf.scenes.scene import IGNORE_LABEL, Scene, sanitize_scene_id

__all__ = ["IGNORE_LABEL", "Scene", "SceneError", "detect_format", "load_scene", "load_scenes", "sanitize_scene_id"]
