"""`load_scenes`: the scenes a pipeline stage works on, from capture folders and procedural rooms."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from fit3d_hf.scenes.images import SceneError
from fit3d_hf.scenes.load import load_scene
from fit3d_hf.scenes.scene import Scene, sanitize_scene_id


def load_scenes(
    folders: Sequence[str | os.PathLike] = (),
    *,
    downscale: float = 1.0,
    skip_missing: bool = False,
    synthetic_rooms: int = 0,
    synthetic_seed: int = 0,
    synthetic_views: int = 24,
    synthetic_height: int = 120,
    synthetic_width: int = 160,
) -> list[Scene]:
    """The scenes of a run, in a fixed order: the capture folders, then the procedural rooms.

    Every stage takes its scenes in this one shape (a list of `Scene`s, images read lazily for
    captures), so that `fit3d lift` and `fit3d render` given the same options see the same scenes.

    Args:
        folders: capture folders (or transforms .json files), see `load_scene`. A scene is named
            after its capture folder (the parent of a .json file).
        downscale, skip_missing: passed to `load_scene`.
        synthetic_rooms: also make this many procedural rooms, seeds `synthetic_seed`, +1, ...
            (`synthetic.make_room` with `synthetic_views` views of `synthetic_height` x `synthetic_width`).

    Raises:
        SceneError: two inputs would get the same scene id (naming both).
    """
    from fit3d_hf.scenes.synthetic import make_room

    scenes: list[Scene] = []
    sources: dict[str, str] = {}
    for path in map(Path, folders):
        scene_id = sanitize_scene_id((path.parent if path.is_file() else path).resolve().name)
        if scene_id in sources:
            raise SceneError(f"{path} and {sources[scene_id]} would both be scene {scene_id!r}; rename one capture folder")
        sources[scene_id] = str(path)
        scenes.append(load_scene(path, downscale=downscale, skip_missing=skip_missing, scene_id=scene_id))
    for seed in range(synthetic_seed, synthetic_seed + synthetic_rooms):
        scene = make_room(seed, num_views=synthetic_views, height=synthetic_height, width=synthetic_width)
        if scene.scene_id in sources:
            raise SceneError(f"procedural room {scene.scene_id!r} has the name of capture {sources[scene.scene_id]}")
        sources[scene.scene_id] = f"procedural room seed {seed}"
        scenes.append(scene)
    return scenes
