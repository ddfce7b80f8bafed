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
    images: Sequence[str | os.PathLike | None] = (),
    allow_external_paths: bool = False,
) -> list[Scene]:
    """The scenes of a run, in a fixed order: the capture folders, then the procedural rooms.

    Every stage takes its scenes in this one shape (a list of `Scene`s, images read lazily for
    captures), so that `fit3d lift` and `fit3d render` given the same options see the same scenes.

    Args:
        folders: capture folders (or transforms .json files), see `load_scene`. A scene is named
            after its capture folder (the parent of a .json file).
        downscale, skip_missing, allow_external_paths: passed to `load_scene`.
        synthetic_rooms: also make this many procedural rooms, seeds `synthetic_seed`, +1, ...
            (`synthetic.make_room` with `synthetic_views` views of `synthetic_height` x `synthetic_width`).
        images: the images folder of each COLMAP folder in `folders` (one per folder, or none).

    Raises:
        SceneError: two inputs would get the same scene id (naming both); a bad option (naming it).
    """
    from fit3d_hf.scenes.synthetic import make_room

    checks = (
        ("downscale", downscale, 1, "load captures at their size divided by it"),
        ("synthetic_rooms", synthetic_rooms, 0, "the number of procedural rooms"),
        ("synthetic_views", synthetic_views, 2, "views per procedural room"),
        ("synthetic_height", synthetic_height, 1, "image height of the procedural rooms, in pixels"),
        ("synthetic_width", synthetic_width, 1, "image width of the procedural rooms, in pixels"),
    )
    for name, value, least, meaning in checks:
        if value < least:
            raise SceneError(f"{name} is {value}, it must be at least {least} ({meaning})")
    images = list(images)
    if images and len(images) != len(folders):
        raise SceneError(f"{len(images)} images folders for {len(folders)} scene folders; give one per scene folder, or none")
    sources: dict[str, str] = {}
    # Every name is checked before any capture is read: reading one verifies all its images.
    for path in map(Path, folders):
        scene_id = sanitize_scene_id((path.parent if path.is_file() else path).resolve().name)
        if scene_id in sources:
            raise SceneError(f"{path} and {sources[scene_id]} would both be scene {scene_id!r}; rename one capture folder")
        sources[scene_id] = str(path)
    for seed in range(synthetic_seed, synthetic_seed + synthetic_rooms):
        if f"room_{seed:04d}" in sources:
            raise SceneError(f"procedural room 'room_{seed:04d}' has the name of capture {sources[f'room_{seed:04d}']}")
    scenes: list[Scene] = []
    for scene_id, path, images_dir in zip(sources, map(Path, folders), images or [None] * len(folders)):
        scenes.append(
            load_scene(
                path,
                downscale=downscale,
                skip_missing=skip_missing,
                scene_id=scene_id,
                images_dir=images_dir,
                allow_external_paths=allow_external_paths,
            )
        )
    for seed in range(synthetic_seed, synthetic_seed + synthetic_rooms):
        scenes.append(make_room(seed, num_views=synthetic_views, height=synthetic_height, width=synthetic_width))
    return scenes
