"""Loaders: round trips through files the tests write (transforms.json, FiT3D ScanNet++, COLMAP), fox."""

import json
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fit3d_hf.scenes import Scene, SceneError, detect_format, load_scene, synthetic
from fit3d_hf.scenes.colmap import MODEL_IDS
from fit3d_hf.scenes.geometry import warp_to_source

FLIP_YZ = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0]))


@pytest.fixture(scope="module")
def room() -> Scene:
    return synthetic.make_room(5, num_views=8, height=48, width=64, num_points=2000)


def quantised(room: Scene) -> torch.Tensor:
    """The room's images as they come back from 8-bit PNGs."""
    return (room.images() * 255).round() / 255


def write_images(room: Scene, folder: Path, names: list[str] | None = None) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = names or [f"frame_{i:03d}.png" for i in range(room.num_views)]
    for i, name in enumerate(names):
        array = (room.image(i).permute(1, 2, 0) * 255).round().byte().numpy()
        Image.fromarray(array).save(folder / name, quality=95, subsampling=0)  # JPEG options; PNG ignores them
    return names


def gl_camera_to_world(room: Scene) -> torch.Tensor:
    """[V, 4, 4] camera-to-world in OpenGL axes, as transforms.json stores it."""
    return torch.linalg.inv(room.world_to_camera.double()) @ FLIP_YZ.double()


def write_transforms(room: Scene, folder: Path, **top_level) -> Path:
    names = write_images(room, folder / "images")
    K = room.intrinsics[0]
    meta = {
        "fl_x": K[0, 0].item(),
        "fl_y": K[1, 1].item(),
        "cx": K[0, 2].item(),
        "cy": K[1, 2].item(),
        "w": room.width,
        "h": room.height,
        **top_level,
        "frames": [
            {"file_path": f"images/{n}", "transform_matrix": c2w.tolist()} for n, c2w in zip(names, gl_camera_to_world(room))
        ],
    }
    (folder / "transforms.json").write_text(json.dumps(meta))
    return folder / "transforms.json"


def assert_same_cameras_and_images(loaded: Scene, room: Scene, images: bool = True):
    assert loaded.num_views == room.num_views and (loaded.height, loaded.width) == (room.height, room.width)
    torch.testing.assert_close(loaded.intrinsics, room.intrinsics)
    torch.testing.assert_close(loaded.world_to_camera, room.world_to_camera, atol=1e-5, rtol=0)
    if images:
        torch.testing.assert_close(loaded.images(), quantised(room), atol=1e-6, rtol=0)


def assert_reprojects(loaded: Scene, depth_m: torch.Tensor):
    """The synthetic depth of view 1, carried into view 2 by the *loaded* cameras, finds view 1's colours."""
    K, w2c = loaded.intrinsics, loaded.world_to_camera
    colors, valid = warp_to_source(depth_m[1], K[1], w2c[1], loaded.image(2), K[2], w2c[2], depth_m[2])
    assert float(valid.float().mean()) > 0.1  # 8-view orbit: neighbours are 45° apart
    assert (colors - loaded.image(1)).abs().mean(0)[valid].median() < 0.04


def test_transforms_json_round_trip(room, tmp_path):
    write_transforms(room, tmp_path)
    assert detect_format(tmp_path) == "transforms_json"
    loaded = load_scene(tmp_path)
    assert_same_cameras_and_images(loaded, room)
    assert_reprojects(loaded, room.depth_m)
    assert loaded.scene_id == tmp_path.name and loaded.points is None and loaded.mask(0) is None
    assert loaded.test_views == [0] and loaded.train_views == list(range(1, 8))
    assert loaded.image_data is None, "file-backed scenes read images lazily"


def test_transforms_json_per_frame_and_angle_only_intrinsics(room, tmp_path):
    path = write_transforms(room, tmp_path)
    meta = json.loads(path.read_text())
    fov_x = 2 * np.arctan(room.width / 2 / room.intrinsics[0, 0, 0].item())
    angle_only = {"camera_angle_x": fov_x, "frames": meta["frames"]}  # NeRF-synthetic style: no w, h, fl, c
    path.write_text(json.dumps(angle_only))
    assert_same_cameras_and_images(load_scene(path), room, images=False)

    for k, frame in enumerate(meta["frames"]):  # per-frame focal lengths override the shared one
        frame["fl_x"] = frame["fl_y"] = 40.0 + k
    path.write_text(json.dumps(meta))
    loaded = load_scene(tmp_path)
    assert loaded.intrinsics[:, 0, 0].tolist() == [40.0 + k for k in range(8)]


def test_downscale_keeps_images_masks_and_intrinsics_consistent(room, tmp_path):
    write_transforms(room, tmp_path)
    half = load_scene(tmp_path, downscale=2)
    assert (half.height, half.width) == (24, 32)
    torch.testing.assert_close(half.intrinsics[:, :2], room.intrinsics[:, :2] / 2)
    expected = F.avg_pool2d(quantised(room), 2)
    assert (half.images() - expected).abs().max() < 2 / 255


def distort(image: torch.Tensor, K: torch.Tensor, k1: float, k2: float, p1: float, p2: float) -> torch.Tensor:
    """Render what a lens with these OpenCV coefficients would record: invert the model per pixel."""
    H, W = image.shape[1:]
    v, u = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    xd, yd = (u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1]
    x, y = xd.clone(), yd.clone()
    for _ in range(30):  # fixed point: undistorted coordinates whose distortion lands on (xd, yd)
        r2 = x * x + y * y
        radial = 1 + k1 * r2 + k2 * r2 * r2
        x = (xd - (2 * p1 * x * y + p2 * (r2 + 2 * x * x))) / radial
        y = (yd - (p1 * (r2 + 2 * y * y) + 2 * p2 * x * y)) / radial
    grid = torch.stack([(x * K[0, 0] + K[0, 2]) / W * 2 - 1, (y * K[1, 1] + K[1, 2]) / H * 2 - 1], dim=-1)
    return F.grid_sample(image[None], grid[None], align_corners=False)[0]


def test_transforms_json_undistorts(tmp_path):
    room = synthetic.make_room(6, num_views=2, height=96, width=128, num_points=100)
    coeffs = dict(k1=0.3, k2=0.03, p1=0.002, p2=-0.003)
    distorted = torch.stack([distort(room.image(i), room.intrinsics[i], **coeffs) for i in range(2)])
    recording = Scene(
        scene_id="lens",
        intrinsics=room.intrinsics,
        world_to_camera=room.world_to_camera,
        height=96,
        width=128,
        image_data=distorted,
    )
    write_transforms(recording, tmp_path, **coeffs)
    loaded = load_scene(tmp_path)
    mask = loaded.mask(1)  # pincushion: the undistorted corners were never recorded
    assert mask[0, 0] == 0 and mask[-1, -1] == 0 and mask[48, 64] == 1 and mask.mean() > 0.7
    valid = mask.bool()
    fixed = (loaded.image(1) - room.image(1)).abs().mean(0)[valid].mean()
    raw = (distorted[1] - room.image(1)).abs().mean(0)[valid].mean()
    assert fixed < 0.5 * raw and fixed < 0.02, (fixed, raw)  # what is left is bilinear resampling blur


def test_unsupported_camera_model_is_refused(room, tmp_path):
    write_transforms(room, tmp_path, camera_model="OPENCV_FISHEYE", k4=0.1)
    with pytest.raises(SceneError, match="OPENCV_FISHEYE.*not supported"):
        load_scene(tmp_path)


def test_missing_corrupt_and_odd_sized_images_are_reported(room, tmp_path):
    write_transforms(room, tmp_path)
    (tmp_path / "images" / "frame_002.png").unlink()
    (tmp_path / "images" / "frame_005.png").unlink()
    with pytest.raises(SceneError, match=r"2 of 8 image files listed are missing") as err:
        load_scene(tmp_path)
    assert "frame 2 'images/frame_002.png'" in str(err.value) and "frame_005.png" in str(err.value)
    with pytest.warns(UserWarning, match="skipping 2 of 8 frames"):
        kept = load_scene(tmp_path, skip_missing=True)
    assert kept.num_views == 6 and kept.view_names[2] == "images/frame_003.png"
    torch.testing.assert_close(kept.world_to_camera[2], room.world_to_camera[3], atol=1e-5, rtol=0)

    write_transforms(room, tmp_path)
    (tmp_path / "images" / "frame_001.png").write_bytes(b"not an image")
    png = (tmp_path / "images" / "frame_004.png").read_bytes()
    (tmp_path / "images" / "frame_004.png").write_bytes(png[: len(png) // 2])
    Image.new("RGB", (60, 48)).save(tmp_path / "images" / "frame_006.png")
    with pytest.raises(SceneError) as err:
        load_scene(tmp_path)
    message = str(err.value)
    assert "frame_001.png: unreadable or corrupt" in message and "frame_004.png: unreadable or corrupt" in message
    assert "frame 6 'images/frame_006.png'" in message and "60×48 but the capture declares 64×48" in message


def test_nan_and_non_rigid_poses_are_reported(room, tmp_path):
    path = write_transforms(room, tmp_path)
    meta = json.loads(path.read_text())
    meta["frames"][3]["transform_matrix"][0][3] = float("nan")
    meta["frames"][5]["transform_matrix"][0][0] *= 1.5
    path.write_text(json.dumps(meta))
    with pytest.raises(SceneError, match=r"(?s)frame 3 'images/frame_003.png': pose has NaN.*frame 5 .*not rigid"):
        load_scene(tmp_path)


def nerfstudio_world(c2w_opencv_colmap: torch.Tensor) -> torch.Tensor:
    """What ScanNet++'s nerfstudio export writes for a COLMAP-world OpenCV camera-to-world."""
    c2w = c2w_opencv_colmap.clone()
    c2w[:3, 1:3] *= -1
    c2w = c2w[[1, 0, 2, 3]]
    c2w[2, :] *= -1
    return c2w


def write_points3d_text(path: Path, points: torch.Tensor, colors: torch.Tensor):
    lines = ["# 3D point list with one line of data per point:"]
    for k, (p, c) in enumerate(zip(points.tolist(), (colors * 255).round().int().tolist())):
        lines.append(f"{k + 1} {p[0]!r} {p[1]!r} {p[2]!r} {c[0]} {c[1]} {c[2]} 0.5 1 0 2 0")
    path.write_text("\n".join(lines) + "\n")


def test_fit3d_scannetpp_round_trip(room, tmp_path):
    scene_dir = tmp_path / "0a5c013435 (dslr)"
    names = write_images(room, scene_dir / "images", [f"DSC{i:05d}.JPG" for i in range(room.num_views)])
    (scene_dir / "masks").mkdir()
    half = np.zeros((room.height, room.width), np.uint8)
    half[:, : room.width // 2] = 255
    Image.fromarray(half).save(scene_dir / "masks" / "DSC00001.png")
    c2w = torch.linalg.inv(room.world_to_camera.double())
    frames = [{"file_path": n, "transform_matrix": nerfstudio_world(m).tolist()} for n, m in zip(names, c2w)]
    K = room.intrinsics[0]
    meta = {
        "fl_x": K[0, 0].item(),
        "fl_y": K[1, 1].item(),
        "cx": K[0, 2].item(),
        "cy": K[1, 2].item(),
        "w": room.width,
        "h": room.height,
        "camera_model": "PINHOLE",
        "frames": frames[:6],
        "test_frames": frames[6:],
    }
    (scene_dir / "transforms_train.json").write_text(json.dumps(meta))
    write_points3d_text(scene_dir / "points3D.txt", room.points, room.point_colors)

    assert detect_format(scene_dir) == "fit3d_scannetpp"
    loaded = load_scene(scene_dir)
    assert loaded.scene_id == "0a5c013435_dslr"
    assert loaded.train_views == list(range(6)) and loaded.test_views == [6, 7]
    # JPEG is lossy: compare cameras exactly, images loosely.
    assert_same_cameras_and_images(loaded, room, images=False)
    assert float((loaded.images() - room.images()).abs().mean()) < 0.02
    assert_reprojects(loaded, room.depth_m)
    torch.testing.assert_close(loaded.points, room.points)
    torch.testing.assert_close(loaded.point_colors, (room.point_colors * 255).round() / 255)
    assert loaded.mask(0) is None
    assert loaded.mask(1)[:, :32].min() == 1 and loaded.mask(1)[:, 32:].max() == 0
    assert loaded.masks().shape == (8, 48, 64)
    half = load_scene(scene_dir, downscale=2)  # masks follow the images' size
    assert half.mask(1).shape == (24, 32) and half.mask(1)[:, :16].min() == 1 and half.mask(1)[:, 16:].max() == 0


def rotation_to_qvec(R: torch.Tensor) -> list[float]:
    """Unit quaternion (w, x, y, z) of a rotation matrix (Shepperd's method, no branches cut)."""
    m = R.double()
    trace = m.trace()
    candidates = torch.stack([trace, m[0, 0], m[1, 1], m[2, 2]])
    k = int(candidates.argmax())
    if k == 0:
        s = 2 * torch.sqrt(1 + trace)
        q = [s / 4, (m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s]
    elif k == 1:
        s = 2 * torch.sqrt(1 + m[0, 0] - m[1, 1] - m[2, 2])
        q = [(m[2, 1] - m[1, 2]) / s, s / 4, (m[0, 1] + m[1, 0]) / s, (m[0, 2] + m[2, 0]) / s]
    elif k == 2:
        s = 2 * torch.sqrt(1 + m[1, 1] - m[0, 0] - m[2, 2])
        q = [(m[0, 2] - m[2, 0]) / s, (m[0, 1] + m[1, 0]) / s, s / 4, (m[1, 2] + m[2, 1]) / s]
    else:
        s = 2 * torch.sqrt(1 + m[2, 2] - m[0, 0] - m[1, 1])
        q = [(m[1, 0] - m[0, 1]) / s, (m[0, 2] + m[2, 0]) / s, (m[1, 2] + m[2, 1]) / s, s / 4]
    return [float(v) for v in q]


def colmap_cameras(room: Scene) -> list[tuple[str, list[float]]]:
    """Alternate PINHOLE / SIMPLE_PINHOLE / OPENCV (zero distortion) cameras, one per view."""
    cameras = []
    for i, K in enumerate(room.intrinsics.tolist()):
        fx, fy, cx, cy = K[0][0], K[1][1], K[0][2], K[1][2]
        cameras.append(
            [("PINHOLE", [fx, fy, cx, cy]), ("SIMPLE_PINHOLE", [fx, cx, cy]), ("OPENCV", [fx, fy, cx, cy, 0.0, 0.0, 0.0, 0.0])][
                i % 3
            ]
        )
    return cameras


def write_colmap_text(room: Scene, model: Path, names: list[str]):
    model.mkdir(parents=True)
    cameras = colmap_cameras(room)
    (model / "cameras.txt").write_text(
        "# Camera list\n"
        + "".join(
            f"{i + 1} {m} {room.width} {room.height} {' '.join(repr(p) for p in params)}\n"
            for i, (m, params) in enumerate(cameras)
        )
    )
    lines = ["# Image list with two lines of data per image:"]
    for i in reversed(range(room.num_views)):  # the loader sorts by name
        q, t = rotation_to_qvec(room.world_to_camera[i, :3, :3]), room.world_to_camera[i, :3, 3].tolist()
        lines.append(f"{i + 10} {' '.join(map(repr, q + t))} {i + 1} {names[i]}")
        lines.append("" if i % 2 else "12.5 20.25 -1 30.5 7.5 3")
    (model / "images.txt").write_text("\n".join(lines) + "\n")
    write_points3d_text(model / "points3D.txt", room.points, room.point_colors)


def write_colmap_binary(room: Scene, model: Path, names: list[str]):
    model.mkdir(parents=True)
    cameras = colmap_cameras(room)
    data = struct.pack("<Q", len(cameras))
    for i, (m, params) in enumerate(cameras):
        data += struct.pack("<iiQQ", i + 1, MODEL_IDS[m], room.width, room.height) + struct.pack(f"<{len(params)}d", *params)
    (model / "cameras.bin").write_bytes(data)
    data = struct.pack("<Q", room.num_views)
    for i in range(room.num_views):
        q, t = rotation_to_qvec(room.world_to_camera[i, :3, :3]), room.world_to_camera[i, :3, 3].tolist()
        data += struct.pack("<i7di", i + 1, *q, *t, i + 1) + names[i].encode() + b"\0"
        data += struct.pack("<Q", 2) + struct.pack("<ddqddq", 1.5, 2.5, -1, 3.5, 4.5, 7)
    (model / "images.bin").write_bytes(data)
    data = struct.pack("<Q", len(room.points))
    for k, (p, c) in enumerate(zip(room.points.tolist(), (room.point_colors * 255).round().int().tolist())):
        data += struct.pack("<Q3d3Bd", k + 1, *p, *c, 0.25) + struct.pack("<Q", 1) + struct.pack("<ii", 1, 0)
    (model / "points3D.bin").write_bytes(data)


@pytest.mark.parametrize("writer", [write_colmap_text, write_colmap_binary], ids=["text", "binary"])
def test_colmap_round_trip(room, tmp_path, writer):
    names = write_images(room, tmp_path / "images", [f"img_{i:02d}.png" for i in range(room.num_views)])
    writer(room, tmp_path / "sparse" / "0", names)
    assert detect_format(tmp_path) == "colmap"
    for path in (tmp_path, tmp_path / "sparse" / "0"):  # scene folder or model folder
        loaded = load_scene(path)
        assert_same_cameras_and_images(loaded, room)
        assert_reprojects(loaded, room.depth_m)
        assert loaded.view_names == names and loaded.test_views == [0]
        torch.testing.assert_close(loaded.points, room.points)


def test_colmap_refuses_fisheye(room, tmp_path):
    names = write_images(room, tmp_path / "images", [f"img_{i:02d}.png" for i in range(room.num_views)])
    write_colmap_text(room, tmp_path / "sparse" / "0", names)
    cameras = tmp_path / "sparse" / "0" / "cameras.txt"
    cameras.write_text(cameras.read_text().replace("PINHOLE 64 48", "OPENCV_FISHEYE 64 48", 1))
    with pytest.raises(SceneError, match="OPENCV_FISHEYE is not supported"):
        load_scene(tmp_path)


def test_unknown_folder_is_explained(tmp_path):
    with pytest.raises(SceneError, match="not a recognised capture"):
        load_scene(tmp_path)


def test_fox_missing_frames(fox_path):
    with pytest.raises(SceneError) as err:
        load_scene(fox_path, downscale=8)
    message = str(err.value)
    assert "17 of 67 image files listed are missing" in message
    listed = [line for line in message.splitlines() if line.strip().startswith("frame ")]
    assert len(listed) == 17 and all(not Path(line.split(": ", 1)[1]).exists() for line in listed)
    assert "skip_missing=True" in message


def test_fox_loads_with_sensible_intrinsics(fox_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fox = load_scene(fox_path, downscale=8, skip_missing=True)
    assert fox.num_views == 50 and (fox.width, fox.height) == (135, 240)  # 1080×1920 portrait / 8
    K = fox.intrinsics
    torch.testing.assert_close(K[:, 0, 0], torch.full((50,), 1375.52 / 8))
    torch.testing.assert_close(K[:, 1, 1], torch.full((50,), 1374.49 / 8))
    assert (K[:, 0, 2] > 0.4 * 135).all() and (K[:, 0, 2] < 0.6 * 135).all()
    assert (K[:, 1, 2] > 0.4 * 240).all() and (K[:, 1, 2] < 0.6 * 240).all()
    image = fox.image(0)
    assert image.shape == (3, 240, 135) and image.std() > 0.05
    mask = fox.mask(0)  # undistortion leaves almost the whole frame valid
    assert mask.shape == (240, 135) and 0.9 < mask.mean() <= 1
    # Cameras surround the fox and look at it: the optical axes pass near one common point.
    centers = fox.camera_centers
    forward = fox.world_to_camera[:, 2, :3]
    A = torch.eye(3) * 50 - (forward[:, :, None] * forward[:, None, :]).sum(0)
    b = (centers - (centers * forward).sum(1, keepdim=True) * forward).sum(0)
    focus = torch.linalg.solve(A, b)
    to_focus = F.normalize(focus - centers, dim=1)
    assert (to_focus * forward).sum(1).min() > 0.8, "OpenGL → OpenCV conversion: cameras must face the subject"


@pytest.mark.parametrize("fmt", ["ascii", "binary_little_endian"])
def test_transforms_json_reads_nerfstudio_point_cloud(room, tmp_path, fmt):
    path = write_transforms(room, tmp_path, ply_file_path="sparse_pc.ply")
    colors = (room.point_colors * 255).round().byte()
    header = (
        f"ply\nformat {fmt} 1.0\nelement vertex {len(room.points)}\nproperty float x\nproperty float y\n"
        "property float z\nproperty uchar red\nproperty uchar green\nproperty uchar blue\nend_header\n"
    )
    if fmt == "ascii":
        body = "".join(
            f"{x!r} {y!r} {z!r} {r} {g} {b}\n" for (x, y, z), (r, g, b) in zip(room.points.tolist(), colors.tolist())
        ).encode()
    else:
        records = np.zeros(len(room.points), dtype=[("xyz", "<f4", 3), ("rgb", "u1", 3)])
        records["xyz"], records["rgb"] = room.points.numpy(), colors.numpy()
        body = records.tobytes()
    (path.parent / "sparse_pc.ply").write_bytes(header.encode() + body)
    loaded = load_scene(path)
    torch.testing.assert_close(loaded.points, room.points)
    torch.testing.assert_close(loaded.point_colors, colors.float() / 255)


def test_file_backed_scene_to_dataset_with_masks_and_fresh_cache(room, tmp_path):
    from fit3d_hf.scenes.dataset import dataset_to_scenes, scenes_to_dataset

    path = write_transforms(room, tmp_path)
    meta = json.loads(path.read_text())
    Image.fromarray(np.full((48, 64), 255, np.uint8)).save(tmp_path / "keep.png")
    meta["frames"][3]["mask_path"] = "keep.png"
    path.write_text(json.dumps(meta))
    dataset = scenes_to_dataset([load_scene(tmp_path)])
    assert "mask" in dataset.column_names and len(dataset) == 8
    back = dataset_to_scenes(dataset)[0]
    torch.testing.assert_close(back.images(), quantised(room), atol=1e-6, rtol=0)
    assert back.mask(3).min() == 1 and back.test_views == [0]
    # Changing a file on disk must not hand back the cached rows.
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(tmp_path / "images" / "frame_003.png")
    fresh = dataset_to_scenes(scenes_to_dataset([load_scene(tmp_path)]))[0]
    assert fresh.image(3).max() == 0 and fresh.image(2).max() > 0
