"""nerfstudio / instant-ngp `transforms.json` captures, and FiT3D's preprocessed ScanNet++ layout.

Both store camera-to-world `transform_matrix` per frame in OpenGL camera axes (x right, y up,
z backwards); we convert to OpenCV world→camera. Intrinsics are top-level keys (`fl_x, fl_y, cx,
cy, w, h`, or only `camera_angle_x`) that a frame may override. OpenCV distortion (`k1 k2 k3 p1 p2`)
is removed on read with a torch remap that keeps the pinhole K; fisheye and other models are refused.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from fit3d_hf.scenes.colmap import read_points3d_text
from fit3d_hf.scenes.images import IMAGE_SUFFIXES, SceneError, image_size
from fit3d_hf.scenes.paths import inside
from fit3d_hf.scenes.scene import Scene

# OpenGL → OpenCV camera axes: flip y and z (right-multiplied onto camera-to-world).
_GL_TO_CV = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64))
_PERSPECTIVE_MODELS = {"OPENCV", "PINHOLE", "SIMPLE_PINHOLE", "SIMPLE_RADIAL", "RADIAL", "PERSPECTIVE"}


def camera_to_world_gl_to_world_to_camera(c2w_gl: torch.Tensor) -> torch.Tensor:
    """OpenGL camera-to-world [4, 4] → OpenCV world→camera [4, 4] (rigid inverse, float64).

    The inverse is taken as [Rᵀ, −Rᵀt], so a non-rigid input stays non-rigid and is reported by
    the scene's pose check instead of being silently "fixed" by a general inverse.
    """
    c2w = c2w_gl @ _GL_TO_CV
    w2c = torch.eye(4, dtype=torch.float64)
    w2c[:3, :3] = c2w[:3, :3].T
    w2c[:3, 3] = -c2w[:3, :3].T @ c2w[:3, 3]
    w2c[3] = c2w[3]  # keep a bad last row visible to the check
    return w2c


def _frame_pose(frame: dict, index: int, where: str) -> torch.Tensor:
    matrix = frame.get("transform_matrix")
    if matrix is None:
        raise SceneError(f"{where}: frame {index} ('{frame.get('file_path')}') has no transform_matrix")
    try:
        pose = torch.tensor(matrix, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as err:
        raise SceneError(
            f"{where}: frame {index} ('{frame.get('file_path')}') transform_matrix is not a 4×4 (or 3×4) matrix of "
            f"numbers: {json.dumps(matrix)[:200]}"
        ) from err
    if pose.shape == (3, 4):
        pose = torch.cat([pose, torch.tensor([[0.0, 0.0, 0.0, 1.0]], dtype=torch.float64)])
    if pose.shape != (4, 4):
        raise SceneError(
            f"{where}: frame {index} ('{frame.get('file_path')}') transform_matrix has shape "
            f"{list(pose.shape)}, expected 4×4 or 3×4"
        )
    return pose


def _frame_camera(meta: dict, frame: dict, image_path: Path, index: int, where: str):
    """(K [3, 3] at the file resolution, declared (w, h) or None, distortion [8]) of one frame."""

    def get(key):
        return frame.get(key, meta.get(key))

    name = f"frame {index} ('{frame.get('file_path')}')"
    model = str(get("camera_model") or "OPENCV").upper()
    if model not in _PERSPECTIVE_MODELS or get("is_fisheye"):
        raise SceneError(
            f"{where}: {name} uses camera model '{model}{' (fisheye)' if get('is_fisheye') else ''}', "
            f"which is not supported: undistort the images to a pinhole model first "
            f"(e.g. `colmap image_undistorter`) or export them as OPENCV/PINHOLE"
        )
    for key in ("w", "h", "fl_x", "fl_y", "cx", "cy", "camera_angle_x", "camera_angle_y", "k1", "k2", "k3", "k4", "p1", "p2"):
        value = get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)):
            raise SceneError(f"{where}: {name} has {key} = {json.dumps(value)[:80]}, which is not a finite number")
    for key in ("camera_angle_x", "camera_angle_y"):
        if get(key) is not None and not 0 < get(key) < math.pi:
            raise SceneError(f"{where}: {name} has {key} = {get(key)}; a field of view in radians lies strictly between 0 and pi")
    for key in ("w", "h", "fl_x", "fl_y"):
        if get(key) is not None and get(key) <= 0:
            raise SceneError(f"{where}: {name} has {key} = {get(key)}; it must be positive")
    width, height = get("w"), get("h")
    declared = None if width is None or height is None else (int(round(width)), int(round(height)))
    if declared is None:
        if not image_path.is_file():
            return None, None, None  # size unknown; the missing file is reported with the others
        width, height = image_size(image_path, decode=False)
    fx, fy = get("fl_x"), get("fl_y")
    if fx is None:
        angle_x = get("camera_angle_x")
        if angle_x is None:
            raise SceneError(f"{where}: {name} has neither fl_x nor camera_angle_x")
        fx = 0.5 * width / math.tan(0.5 * angle_x)
    if fy is None:
        angle_y = get("camera_angle_y")
        fy = fx if angle_y is None else 0.5 * height / math.tan(0.5 * angle_y)
    cx, cy = get("cx"), get("cy")
    cx = width / 2 if cx is None else cx
    cy = height / 2 if cy is None else cy
    K = torch.tensor([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]], dtype=torch.float64)
    distortion = torch.tensor([get(k) or 0.0 for k in ("k1", "k2", "p1", "p2", "k3")] + [0.0] * 3)
    if get("k4"):
        raise SceneError(f"{where}: {name} has k4, a fisheye coefficient; only OpenCV k1 k2 k3 p1 p2 are supported")
    return K, declared, distortion


def _resolve(root: Path, file_path: str, fallback_root: Path, capture: Path, where: str, what: str, allow: bool) -> Path:
    """Frame file path under `root` (else under `fallback_root`, if it exists there); files without an
    extension (NeRF-synthetic style) get the first image suffix that exists. Both must lie inside
    the capture folder `capture` unless `allow` (`paths.inside`)."""
    refusals = []
    for base in (root, fallback_root):
        try:
            path = inside(capture, base, file_path, source=where, what=what, allow_external_paths=allow)
        except SceneError as error:
            refusals.append(error)
            continue
        candidates = [path] + ([path.with_suffix(s) for s in IMAGE_SUFFIXES] if path.suffix == "" else [])
        for candidate in candidates:
            if candidate.is_file():
                return candidate
    if len(refusals) == 2:  # outside the capture from both folders
        raise refusals[0]
    return root / file_path


def _file_path(frame: dict, index: int, where: str) -> str:
    value = frame.get("file_path")
    if not isinstance(value, str) or not value.strip():
        raise SceneError(f"{where}: frame {index} has no file_path (got {json.dumps(value)}); every frame names its image file")
    return value


def _load_frames(
    source: Path,
    meta: dict,
    frames: list[dict],
    image_root: Path,
    poses: list[torch.Tensor],
    mask_paths: list[Path | None],
    is_test: list[bool],
    scene_id: str,
    points=None,
    point_colors=None,
    allow_external_paths: bool = False,
    **options,
) -> Scene:
    # FiT3D lists names relative to images/, but tolerate "images/<name>" (relative to the json) too.
    image_paths = [
        _resolve(
            image_root, _file_path(frame, i, str(source)), source.parent, source.parent, str(source),
            f"frame {i} file_path", allow_external_paths,
        )
        for i, frame in enumerate(frames)
    ]  # fmt: skip
    cameras = [_frame_camera(meta, frame, path, i, str(source)) for i, (frame, path) in enumerate(zip(frames, image_paths))]
    known = next((cam for cam in cameras if cam[0] is not None), None)
    if known is None:
        raise SceneError(f"{source}: none of the {len(frames)} listed image files exist (first: {image_paths[0]})")
    # Frames whose size is unknown are missing files: any K serves, they are dropped or reported.
    cameras = [cam if cam[0] is not None else known for cam in cameras]
    return Scene.from_files(
        scene_id,
        image_paths,
        torch.stack([cam[0] for cam in cameras]),
        torch.stack(poses),
        source=str(source),
        view_names=[str(frame.get("file_path")) for frame in frames],
        file_sizes=[cam[1] for cam in cameras],
        mask_paths=mask_paths if any(m is not None for m in mask_paths) else None,
        distortion=torch.stack([cam[2] for cam in cameras]),
        is_test=is_test,
        points=points,
        point_colors=point_colors,
        **options,
    )


def load_transforms_json(
    path: str | Path,
    *,
    downscale: float = 1.0,
    skip_missing: bool = False,
    verify_images: bool = True,
    test_every: int = 8,
    scene_id: str | None = None,
    allow_external_paths: bool = False,
) -> Scene:
    """Load a nerfstudio or instant-ngp capture.

    Args:
        path: the `transforms.json` file or the folder holding it. `file_path` (and nerfstudio's
            `mask_path`, non-zero = use, and `ply_file_path`, init points) are relative to that folder.
        downscale: divide image size (and intrinsics) by this.
        skip_missing: drop frames whose image file is missing instead of raising (with a warning).
        verify_images: decode every image once at load time, so corrupt files fail now.
        test_every: frames `i % test_every == 0` become test views (0: none), as in 3DGS's `llffhold`.
        scene_id: defaults to the folder name.
        allow_external_paths: accept file names that point outside the capture folder (`paths.inside`).
    """
    path = Path(path)
    source = path if path.suffix == ".json" else path / "transforms.json"
    meta = _read_json(source)
    frames = _frames(meta, "frames", source)
    if not frames:
        raise SceneError(f"{source}: no frames listed")
    root = source.parent
    poses = [camera_to_world_gl_to_world_to_camera(_frame_pose(f, i, str(source))) for i, f in enumerate(frames)]
    where, allow = str(source), allow_external_paths
    masks = [
        inside(root, root, str(f["mask_path"]), source=where, what=f"frame {i} mask_path", allow_external_paths=allow)
        if f.get("mask_path")
        else None
        for i, f in enumerate(frames)
    ]
    is_test = [test_every > 0 and i % test_every == 0 for i in range(len(frames))]
    points = colors = None
    if meta.get("ply_file_path"):
        ply = inside(root, root, str(meta["ply_file_path"]), source=where, what="ply_file_path", allow_external_paths=allow)
        if not ply.is_file():
            raise SceneError(f"{source}: ply_file_path '{meta['ply_file_path']}' names a missing file ({ply})")
        points, colors = read_ply_points(ply)
    return _load_frames(
        source,
        meta,
        frames,
        root,
        poses,
        masks,
        is_test,
        scene_id or root.name,
        points=points,
        point_colors=colors,
        allow_external_paths=allow_external_paths,
        downscale=downscale,
        skip_missing=skip_missing,
        verify_images=verify_images,
    )


def fit3d_world_to_camera(c2w: torch.Tensor) -> torch.Tensor:
    """FiT3D ScanNet++ `transform_matrix` → OpenCV world→camera in the COLMAP world of points3D.txt.

    ScanNet++'s nerfstudio export maps COLMAP world → nerfstudio world by swapping x/y and negating
    z; FiT3D (scene/dataset_readers.py, "Option 3") undoes that before the OpenGL → OpenCV flip, so
    cameras and points share one world.
    """
    colmap_world = c2w.clone()
    colmap_world[2, :] *= -1
    colmap_world = colmap_world[[1, 0, 2, 3], :]
    return camera_to_world_gl_to_world_to_camera(colmap_world)


def load_fit3d_scannetpp(
    path: str | Path,
    *,
    downscale: float = 1.0,
    skip_missing: bool = False,
    verify_images: bool = True,
    scene_id: str | None = None,
    allow_external_paths: bool = False,
) -> Scene:
    """Load a ScanNet++ scene as preprocessed for FiT3D.

    Layout: `transforms_train.json` (shared `fl_x fl_y cx cy w h`, `frames` = train views,
    `test_frames` = test views, `file_path` relative to `images/`), `images/`, optional
    `masks/<image stem>.png` (non-zero = use) and optional `points3D.txt` (COLMAP text, same world).
    Unlike FiT3D, which builds its cameras from the field of view only, we keep cx, cy.
    """
    root = Path(path)
    source = root / "transforms_train.json"
    meta = _read_json(source)
    train, test = _frames(meta, "frames", source), _frames(meta, "test_frames", source)
    frames = train + test
    if not frames:
        raise SceneError(f"{source}: no frames or test_frames listed")
    poses = [fit3d_world_to_camera(_frame_pose(f, i, str(source))) for i, f in enumerate(frames)]
    masks = []
    for i, frame in enumerate(frames):
        mask = root / "masks" / f"{Path(_file_path(frame, i, str(source))).stem}.png"
        masks.append(mask if mask.is_file() else None)
    points = colors = None
    if (root / "points3D.txt").is_file():
        points, colors = read_points3d_text(root / "points3D.txt")
    is_test = [False] * len(train) + [True] * len(test)
    return _load_frames(
        source,
        meta,
        frames,
        root / "images",
        poses,
        masks,
        is_test,
        scene_id or root.name,
        points=points,
        point_colors=colors,
        allow_external_paths=allow_external_paths,
        downscale=downscale,
        skip_missing=skip_missing,
        verify_images=verify_images,
    )


_PLY_TYPES = {
    "char": "i1",
    "uchar": "u1",
    "short": "i2",
    "ushort": "u2",
    "int": "i4",
    "uint": "u4",
    "float": "f4",
    "double": "f8",
    "int8": "i1",
    "uint8": "u1",
    "int16": "i2",
    "uint16": "u2",
    "int32": "i4",
    "uint32": "u4",
    "float32": "f4",
    "float64": "f8",
}


def read_ply_points(path: Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Vertices [P, 3] (and uchar colours [P, 3] in [0, 1], if present) of an ascii or little-endian PLY."""
    data = path.read_bytes()
    end = data.find(b"end_header")
    if not data.startswith(b"ply") or end < 0:
        raise SceneError(f"{path}: not a PLY file")
    header = data[:end].decode("ascii", errors="replace").splitlines()
    body = data[data.index(b"\n", end) + 1 :]
    fmt, count, fields, element = None, 0, [], None
    for line in header:
        words = line.split()
        if words[:1] == ["format"]:
            fmt = words[1]
        elif words[:1] == ["element"]:
            element = words[1]
            if element == "vertex":
                count = int(words[2])
            elif not fields:
                raise SceneError(f"{path}: element '{element}' comes before 'vertex'; not supported")
        elif words[:1] == ["property"] and element == "vertex":
            if words[1] == "list" or words[1] not in _PLY_TYPES:
                raise SceneError(f"{path}: vertex property '{line.strip()}' not supported")
            fields.append((words[2], "<" + _PLY_TYPES[words[1]]))
    names = [name for name, _ in fields]
    if not {"x", "y", "z"} <= set(names):
        raise SceneError(f"{path}: vertices have no x, y, z")
    if fmt == "ascii":
        rows = np.loadtxt(body.decode("ascii").splitlines()[:count], ndmin=2)
        vertices = {name: rows[:, k] for k, name in enumerate(names)}
    elif fmt == "binary_little_endian":
        array = np.frombuffer(body, dtype=np.dtype(fields), count=count)
        vertices = {name: array[name] for name in names}
    else:
        raise SceneError(f"{path}: PLY format '{fmt}' not supported (ascii or binary_little_endian)")
    xyz = torch.from_numpy(np.stack([vertices[k] for k in "xyz"], axis=1).astype(np.float32))
    if {"red", "green", "blue"} <= set(names):
        rgb = np.stack([vertices[k] for k in ("red", "green", "blue")], axis=1).astype(np.float32) / 255
        return xyz, torch.from_numpy(rgb)
    return xyz, None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise SceneError(f"{path}: file not found")
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SceneError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(value, dict):
        raise SceneError(f"{path}: expected a JSON object with a 'frames' list at the top, got a {type(value).__name__}")
    return value


def _frames(meta: dict, key: str, source: Path) -> list[dict]:
    """The list `meta[key]` (empty when absent), each entry a JSON object."""
    frames = meta.get(key) or []
    if not isinstance(frames, list) or not all(isinstance(frame, dict) for frame in frames):
        raise SceneError(f"{source}: '{key}' must be a list of objects (one per frame), got {json.dumps(frames)[:120]}")
    return frames
