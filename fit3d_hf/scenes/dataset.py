"""Scenes ⇄ a `datasets.Dataset` (one row per view), so a benchmark can be saved or pushed to the Hub."""

from __future__ import annotations

import hashlib
import json

import datasets
import numpy as np
import torch

from fit3d_hf.scenes.images import SceneError
from fit3d_hf.scenes.scene import Scene


def _features(height: int, width: int, with_depth: bool, with_semantics: bool, with_mask: bool) -> datasets.Features:
    features = {
        "image": datasets.Image(),
        "intrinsics": datasets.Array2D((3, 3), "float32"),
        "world_to_camera": datasets.Array2D((4, 4), "float32"),
        "scene_id": datasets.Value("string"),
        "view_id": datasets.Value("int32"),
        "split": datasets.ClassLabel(names=["train", "test", "unused"]),
    }
    if with_depth:
        features["depth"] = datasets.Array2D((height, width), "float32")
    if with_semantics:
        features["semantics"] = datasets.Array2D((height, width), "uint8")
    if with_mask:
        features["mask"] = datasets.Array2D((height, width), "uint8")
    return datasets.Features(features)


def _rows(scenes: list[Scene], with_depth: bool, with_semantics: bool, with_mask: bool):
    for scene in scenes:
        test = set(scene.test_views)
        train = set(scene.train_views)
        for i in range(scene.num_views):
            row = {
                "image": (scene.image(i).permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy(),
                "intrinsics": scene.intrinsics[i].numpy(),
                "world_to_camera": scene.world_to_camera[i].numpy(),
                "scene_id": scene.scene_id,
                "view_id": i,
                "split": 1 if i in test else 0 if i in train else 2,
            }
            if with_depth:
                row["depth"] = scene.depth_m[i].numpy()
            if with_semantics:
                row["semantics"] = scene.semantics[i].numpy().astype(np.uint8)
            if with_mask:
                mask = scene.mask(i)
                row["mask"] = np.ones((scene.height, scene.width), np.uint8) if mask is None else mask.numpy().astype(np.uint8)
            yield row


def _fingerprint(scenes: list[Scene]) -> str:
    """Content fingerprint for `datasets`' cache: tensors by value, files by path, size and mtime
    (hashing paths alone would reuse a stale cache after the files change)."""
    digest = hashlib.sha256()
    for scene in scenes:
        digest.update(f"{scene.scene_id}|{scene.train_views}|{scene.test_views}|{scene.class_names}".encode())
        for name in ("intrinsics", "world_to_camera", "image_data", "mask_data", "depth_m", "semantics"):
            value = getattr(scene, name)
            digest.update(name.encode() + (b"-" if value is None else value.contiguous().numpy().tobytes()))
        if scene.files is not None:
            paths = scene.files.image_paths + [p for p in scene.files.mask_paths or [] if p is not None]
            for path in paths:
                stat = path.stat()
                digest.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode())
            if scene.files.distortion is not None:
                digest.update(scene.files.distortion.numpy().tobytes())
    return digest.hexdigest()


def scenes_to_dataset(scenes: list[Scene]) -> datasets.Dataset:
    """One row per view: image (PNG, uint8), intrinsics [3, 3], world_to_camera [4, 4], scene_id,
    view_id, split (train/test/unused), and — when every scene has them — depth [H, W] float32 metres
    (z-depth), semantics [H, W] uint8 (255 = ignore) and mask [H, W] uint8 (1 = use).

    Rows are generated view by view (`Dataset.from_generator`), so lazily loaded scenes are never held
    in memory at once. Class names go to `dataset.info.description` as JSON. Init points are not stored.

    Raises:
        SceneError: scenes differ in image size (the fixed-shape columns need one size).
    """
    if not scenes:
        raise SceneError("scenes_to_dataset: no scenes given")
    sizes = {(s.height, s.width) for s in scenes}
    if len(sizes) > 1:
        raise SceneError(f"scenes_to_dataset: scenes differ in image size {sorted(sizes)}; load them with one size")
    height, width = sizes.pop()
    with_depth = all(s.depth_m is not None for s in scenes)
    with_semantics = all(s.semantics is not None for s in scenes)
    if with_semantics and max(int(s.semantics.max()) for s in scenes) > 255:
        raise SceneError("scenes_to_dataset: semantic labels above 255 do not fit the uint8 column")
    with_mask = any(s.mask_data is not None or s.files is not None for s in scenes)
    class_names = next((s.class_names for s in scenes if s.class_names), None)
    info = datasets.DatasetInfo(description=json.dumps({"class_names": class_names}))
    return datasets.Dataset.from_generator(
        _rows,
        features=_features(height, width, with_depth, with_semantics, with_mask),
        gen_kwargs={"scenes": scenes, "with_depth": with_depth, "with_semantics": with_semantics, "with_mask": with_mask},
        info=info,
        fingerprint=_fingerprint(scenes),
    )


def dataset_to_scenes(dataset: datasets.Dataset) -> list[Scene]:
    """Rebuild in-memory scenes from `scenes_to_dataset`'s rows (in order of first appearance)."""
    class_names = json.loads(dataset.info.description or "{}").get("class_names")
    columns = set(dataset.column_names)
    table = dataset.with_format("numpy")
    rows_of: dict[str, list[int]] = {}
    for row, scene_id in enumerate(dataset["scene_id"]):
        rows_of.setdefault(scene_id, []).append(row)
    scenes = []
    for scene_id, rows in rows_of.items():
        part = table[rows]  # column → stacked array
        order = np.argsort(part["view_id"], kind="stable")

        def column(name: str, dtype: torch.dtype, part=part, order=order) -> torch.Tensor | None:
            return torch.from_numpy(np.ascontiguousarray(part[name][order])).to(dtype) if name in columns else None

        images = column("image", torch.float32).permute(0, 3, 1, 2) / 255
        split = part["split"][order].tolist()
        scenes.append(
            Scene(
                scene_id=scene_id,
                intrinsics=column("intrinsics", torch.float32),
                world_to_camera=column("world_to_camera", torch.float32),
                height=images.shape[2],
                width=images.shape[3],
                image_data=images.contiguous(),
                mask_data=column("mask", torch.float32),
                depth_m=column("depth", torch.float32),
                semantics=column("semantics", torch.int64),
                train_views=[i for i, s in enumerate(split) if s == 0],
                test_views=[i for i, s in enumerate(split) if s == 1],
                class_names=class_names,
                source=f"dataset rows of scene '{scene_id}'",
            )
        )
    return scenes
