"""COLMAP sparse models, text or binary: cameras, images (poses) and points3D.

COLMAP poses are world→camera in OpenCV axes already (quaternion qw qx qy qz, translation t), and
its pixel convention matches ours (centre of the top-left pixel at (0.5, 0.5)). Supported camera
models: SIMPLE_PINHOLE, PINHOLE, and the OpenCV-family SIMPLE_RADIAL, RADIAL, OPENCV, FULL_OPENCV,
whose images are undistorted on read (K kept). Fisheye models are refused.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fit3d_hf.scenes.images import SceneError
from fit3d_hf.scenes.paths import inside
from fit3d_hf.scenes.scene import Scene

# model id → (name, number of params), as in COLMAP's src/colmap/sensor/models.h
CAMERA_MODELS = {
    0: ("SIMPLE_PINHOLE", 3),
    1: ("PINHOLE", 4),
    2: ("SIMPLE_RADIAL", 4),
    3: ("RADIAL", 5),
    4: ("OPENCV", 8),
    5: ("OPENCV_FISHEYE", 8),
    6: ("FULL_OPENCV", 12),
    7: ("FOV", 5),
    8: ("SIMPLE_RADIAL_FISHEYE", 4),
    9: ("RADIAL_FISHEYE", 5),
    10: ("THIN_PRISM_FISHEYE", 12),
}
MODEL_IDS = {name: model_id for model_id, (name, _) in CAMERA_MODELS.items()}


@dataclass
class ColmapCamera:
    model: str
    width: int
    height: int
    params: list[float]


@dataclass
class ColmapImage:
    qvec: list[float]  # qw, qx, qy, qz
    tvec: list[float]
    camera_id: int
    name: str


_NUM_PARAMS = dict(CAMERA_MODELS.values())
_SUPPORTED_MODELS = ("SIMPLE_PINHOLE", "PINHOLE", "SIMPLE_RADIAL", "RADIAL", "OPENCV", "FULL_OPENCV")


def camera_matrices(camera: ColmapCamera, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(K [3, 3], OpenCV distortion [8] = k1 k2 p1 p2 k3 k4 k5 k6) of a COLMAP camera."""
    p = camera.params
    expected = _NUM_PARAMS[camera.model] if camera.model in _SUPPORTED_MODELS else None
    if expected is not None and len(p) != expected:
        raise SceneError(
            f"{where}: a {camera.model} camera has {expected} parameters, this one has {len(p)} ({p}); "
            "re-export the model from COLMAP"
        )
    zeros = [0.0] * 8
    if camera.model == "SIMPLE_PINHOLE":
        fx = fy = p[0]
        cx, cy, dist = p[1], p[2], zeros
    elif camera.model == "PINHOLE":
        (fx, fy, cx, cy), dist = p, zeros
    elif camera.model == "SIMPLE_RADIAL":
        fx = fy = p[0]
        cx, cy, dist = p[1], p[2], [p[3]] + zeros[1:]
    elif camera.model == "RADIAL":
        fx = fy = p[0]
        cx, cy, dist = p[1], p[2], [p[3], p[4]] + zeros[2:]
    elif camera.model in ("OPENCV", "FULL_OPENCV"):  # k1 k2 p1 p2 (k3 k4 k5 k6): already our order
        fx, fy, cx, cy = p[:4]
        dist = (list(p[4:]) + zeros)[:8]
    else:
        raise SceneError(
            f"{where}: camera model {camera.model} is not supported (only SIMPLE_PINHOLE, PINHOLE, "
            f"SIMPLE_RADIAL, RADIAL, OPENCV, FULL_OPENCV); run `colmap image_undistorter` first"
        )
    K = torch.tensor([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]], dtype=torch.float64)
    return K, torch.tensor(dist, dtype=torch.float32)


def qvec_to_rotation(qvec: list[float]) -> torch.Tensor:
    """[3, 3] rotation of a unit quaternion (w, x, y, z); the quaternion is normalised first."""
    w, x, y, z = (torch.tensor(qvec, dtype=torch.float64) / torch.tensor(qvec, dtype=torch.float64).norm()).tolist()
    return torch.tensor(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
        ],
        dtype=torch.float64,
    )


def _data_lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if not line.startswith("#")]


def read_cameras_text(path: Path) -> dict[int, ColmapCamera]:
    cameras = {}
    for line in _data_lines(path):
        if not line.strip():
            continue
        fields = line.split()
        try:
            cameras[int(fields[0])] = ColmapCamera(fields[1], int(fields[2]), int(fields[3]), [float(v) for v in fields[4:]])
        except (IndexError, ValueError) as err:
            raise SceneError(f"{path}: cannot parse camera line '{line}' ({err})") from err
    return cameras


def read_images_text(path: Path) -> dict[int, ColmapImage]:
    """Images: pairs of lines (pose line, then a 2D-points line that may be empty)."""
    lines = _data_lines(path)
    images, i = {}, 0
    while i < len(lines):
        if not lines[i].strip():
            i += 1
            continue
        fields = lines[i].split()
        try:
            images[int(fields[0])] = ColmapImage(
                [float(v) for v in fields[1:5]], [float(v) for v in fields[5:8]], int(fields[8]), " ".join(fields[9:])
            )
        except (IndexError, ValueError) as err:
            raise SceneError(f"{path}: cannot parse image line '{lines[i]}' ({err})") from err
        i += 2
    return images


def read_points3d_text(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Points [P, 3] float32 and colours [P, 3] float32 in [0, 1] from a points3D.txt."""
    xyz, rgb = [], []
    for line in _data_lines(path):
        fields = line.split()
        if len(fields) < 7:
            continue
        xyz.append([float(v) for v in fields[1:4]])
        rgb.append([int(v) for v in fields[4:7]])
    return (torch.tensor(xyz, dtype=torch.float32).reshape(-1, 3), torch.tensor(rgb, dtype=torch.float32).reshape(-1, 3) / 255)


class _Reader:
    """Little-endian struct reader over a binary COLMAP file, with errors that name the file."""

    def __init__(self, path: Path):
        self.path, self.data, self.offset = path, path.read_bytes(), 0

    def read(self, fmt: str):
        size = struct.calcsize("<" + fmt)
        if self.offset + size > len(self.data):
            raise SceneError(f"{self.path}: truncated binary file (needed {size} bytes at offset {self.offset})")
        values = struct.unpack_from("<" + fmt, self.data, self.offset)
        self.offset += size
        return values

    def read_string(self) -> str:
        end = self.data.find(b"\0", self.offset)
        if end < 0:
            raise SceneError(f"{self.path}: truncated binary file (unterminated image name)")
        name = self.data[self.offset : end].decode("utf-8")
        self.offset = end + 1
        return name


def read_cameras_binary(path: Path) -> dict[int, ColmapCamera]:
    reader, cameras = _Reader(path), {}
    for _ in range(reader.read("Q")[0]):
        camera_id, model_id, width, height = reader.read("iiQQ")
        if model_id not in CAMERA_MODELS:
            raise SceneError(f"{path}: camera {camera_id} has unknown model id {model_id}")
        name, num_params = CAMERA_MODELS[model_id]
        cameras[camera_id] = ColmapCamera(name, width, height, list(reader.read("d" * num_params)))
    return cameras


def read_images_binary(path: Path) -> dict[int, ColmapImage]:
    reader, images = _Reader(path), {}
    for _ in range(reader.read("Q")[0]):
        image_id, *pose, camera_id = reader.read("idddddddi")
        name = reader.read_string()
        num_points = reader.read("Q")[0]
        reader.offset += num_points * struct.calcsize("<ddq")
        images[image_id] = ColmapImage(list(pose[:4]), list(pose[4:]), camera_id, name)
    return images


def read_points3d_binary(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    reader = _Reader(path)
    count = reader.read("Q")[0]
    xyz, rgb = np.empty((count, 3)), np.empty((count, 3))
    for k in range(count):
        _, x, y, z, r, g, b, _ = reader.read("QdddBBBd")
        xyz[k], rgb[k] = (x, y, z), (r, g, b)
        track_length = reader.read("Q")[0]
        reader.offset += track_length * struct.calcsize("<ii")
    return torch.from_numpy(xyz).float(), torch.from_numpy(rgb).float() / 255


def find_model_dir(path: Path) -> Path | None:
    """The folder holding cameras.{bin,txt}: `path`, `path/sparse/0`, `path/sparse` or
    `path/colmap/sparse/0` (nerfstudio's processed layout, images in `path/images`)."""
    for candidate in (path, path / "sparse" / "0", path / "sparse", path / "colmap" / "sparse" / "0"):
        if (candidate / "cameras.bin").is_file() or (candidate / "cameras.txt").is_file():
            return candidate
    return None


def load_colmap(
    path: str | Path,
    *,
    images_dir: str | Path | None = None,
    downscale: float = 1.0,
    skip_missing: bool = False,
    verify_images: bool = True,
    test_every: int = 8,
    scene_id: str | None = None,
    allow_external_paths: bool = False,
) -> Scene:
    """Load a COLMAP reconstruction (binary preferred over text when both exist).

    Args:
        path: the scene folder (with `sparse/0/`, `sparse/` or nerfstudio's `colmap/sparse/0/`, and
            `images/`) or the model folder.
        images_dir: where image names are resolved; default `<scene>/images` (for a model in
            `<data>/colmap/sparse/0`, `<data>/images` when `<data>/colmap/images` does not exist).
            Image names must stay inside it (`paths.inside`) unless `allow_external_paths`.
        test_every: images sorted by name; every `test_every`-th (i % test_every == 0) is a test view
            (0: none), as 3DGS does.
        Masks: `<scene>/masks/<image stem>.png` (non-zero = use) when present, as FiT3D reads them.
    """
    path = Path(path)
    model = find_model_dir(path)
    if model is None:
        raise SceneError(f"{path}: no COLMAP model (cameras.bin/.txt) in it, in sparse/0/, sparse/ or colmap/sparse/0/")
    if model == path:
        root = model.parent.parent if model.parent.name == "sparse" else model.parent
    else:
        root = model.parent.parent if model == path / "colmap" / "sparse" / "0" else path
    # nerfstudio keeps the model in <data>/colmap/sparse/0 and the images in <data>/images.
    if root.name == "colmap" and not (root / "images").is_dir() and (root.parent / "images").is_dir():
        root = root.parent
    binary = (model / "cameras.bin").is_file()
    suffix = ".bin" if binary else ".txt"
    for name in ("cameras", "images"):
        if not (model / f"{name}{suffix}").is_file():
            raise SceneError(f"{model}: {name}{suffix} is missing (cameras{suffix} is there)")
    cameras = (read_cameras_binary if binary else read_cameras_text)(model / f"cameras{suffix}")
    images = (read_images_binary if binary else read_images_text)(model / f"images{suffix}")
    if not images:
        raise SceneError(f"{model / ('images' + suffix)}: no registered images")
    points = colors = None
    if (model / f"points3D{suffix}").is_file():
        points, colors = (read_points3d_binary if binary else read_points3d_text)(model / f"points3D{suffix}")

    image_root = Path(images_dir) if images_dir is not None else root / "images"
    if images_dir is not None and not image_root.is_dir():
        raise SceneError(f"{model}: the images folder {image_root} does not exist")
    ordered = sorted(images.values(), key=lambda image: image.name)
    where = str(model / f"images{suffix}")
    image_paths = [
        inside(
            image_root,
            image_root,
            image.name,
            source=where,
            what="image",
            allow_external_paths=allow_external_paths,
        )
        for image in ordered
    ]
    intrinsics, poses, distortion, sizes, masks = [], [], [], [], []
    for image in ordered:
        if image.camera_id not in cameras:
            raise SceneError(f"{model}: image '{image.name}' refers to camera {image.camera_id}, not in cameras{suffix}")
        camera = cameras[image.camera_id]
        K, dist = camera_matrices(camera, f"{model / ('cameras' + suffix)} (camera {image.camera_id})")
        pose = torch.eye(4, dtype=torch.float64)
        pose[:3, :3] = qvec_to_rotation(image.qvec)
        pose[:3, 3] = torch.tensor(image.tvec, dtype=torch.float64)
        intrinsics.append(K)
        poses.append(pose)
        distortion.append(dist)
        sizes.append((camera.width, camera.height))
        mask = root / "masks" / f"{Path(image.name).stem}.png"
        masks.append(mask if mask.is_file() else None)
    return Scene.from_files(
        scene_id or root.name,
        image_paths,
        torch.stack(intrinsics),
        torch.stack(poses),
        source=str(model / f"images{suffix}"),
        view_names=[image.name for image in ordered],
        file_sizes=sizes,
        mask_paths=masks if any(m is not None for m in masks) else None,
        distortion=torch.stack(distortion),
        is_test=[test_every > 0 and i % test_every == 0 for i in range(len(ordered))],
        points=points,
        point_colors=colors,
        downscale=downscale,
        skip_missing=skip_missing,
        verify_images=verify_images,
    )
