"""Scene type and procedural rooms: conventions, determinism, validation."""

import pytest
import torch

from fit3d_hf.scenes import Scene, SceneError, sanitize_scene_id, synthetic
from fit3d_hf.scenes.geometry import backproject, warp_to_source


@pytest.fixture(scope="module")
def room() -> Scene:
    return synthetic.make_room(3)


def reproject(scene: Scene, src: int, dst: int, world_to_camera: torch.Tensor):
    """View `dst`'s colours and labels at view `src`'s pixels, through src's depth and the cameras."""
    K, depth = scene.intrinsics, scene.depth_m
    colors, visible = warp_to_source(
        depth[src], K[src], world_to_camera[src], scene.image(dst), K[dst], world_to_camera[dst], depth[dst]
    )
    labels, _ = warp_to_source(
        depth[src], K[src], world_to_camera[src], scene.semantics[dst][None], K[dst], world_to_camera[dst], mode="nearest"
    )
    return colors, labels[0], visible


def test_room_shapes_and_classes(room):
    V, H, W = 24, 120, 160
    assert room.num_views == V and (room.height, room.width) == (H, W)
    assert room.images().shape == (V, 3, H, W) and room.images().dtype == torch.float32
    assert 0 <= room.images().min() and room.images().max() <= 1
    assert room.depth_m.shape == (V, H, W) and room.depth_m.min() > 0.2 and room.depth_m.max() < 12
    assert room.semantics.dtype == torch.int64 and room.semantics.shape == (V, H, W)
    assert len(synthetic.CLASS_NAMES) >= 8 and room.class_names == synthetic.CLASS_NAMES
    assert len(room.semantics.unique()) >= 8, "a room shows at least 8 classes across its views"
    assert room.points.shape == (20_000, 3) and room.point_colors.shape == (20_000, 3)
    assert room.test_views and set(room.train_views).isdisjoint(room.test_views)
    assert sorted(room.train_views + room.test_views) == list(range(V))
    assert room.mask(0) is None and room.masks() is None
    # Images carry texture, not flat colour: strong local gradients in every view.
    grad = (room.images()[:, :, :, 1:] - room.images()[:, :, :, :-1]).abs().mean(dim=(1, 2, 3))
    assert (grad > 0.01).all()


def test_room_is_deterministic_and_seed_dependent(room):
    again = synthetic.make_room(3)
    assert torch.equal(again.images(), room.images()) and torch.equal(again.points, room.points)
    other = synthetic.make_room(4, num_views=8, height=48, width=64)
    assert other.images().shape == (8, 3, 48, 64) and other.scene_id == "room_0004"
    assert not torch.allclose(other.world_to_camera, room.world_to_camera[:8])


def test_depth_is_z_depth_in_metres(room):
    """Floor pixels back-project to z = 0 and ceiling pixels to one height only if depth is z-depth."""
    floor, ceiling = synthetic.CLASS_NAMES.index("floor"), synthetic.CLASS_NAMES.index("ceiling")
    for view in (0, 5, 13):
        world = backproject(room.depth_m[view], room.intrinsics[view], room.world_to_camera[view])
        labels = room.semantics[view]
        assert (world[labels == floor][:, 2]).abs().max() < 1e-3
        ceiling_z = world[labels == ceiling][:, 2]
        if len(ceiling_z):
            assert ceiling_z.max() - ceiling_z.min() < 1e-3 and 2.5 < ceiling_z.mean() < 3.1


def test_reprojection_matches_colours_and_labels(room):
    """Depth of one view, warped into a neighbour with the cameras, finds the same colours/labels."""

    def matched(world_to_camera):
        colors, labels, visible = reproject(room, 4, 5, world_to_camera)
        agree = ((colors - room.image(4)).abs().mean(0) < 0.05) & (labels == room.semantics[4])
        return (visible & agree).float().mean(), colors, labels, visible

    fraction, colors, labels, visible = matched(room.world_to_camera)
    assert fraction > 0.3, "neighbouring views must overlap"
    assert (colors - room.image(4)).abs().mean(0)[visible].median() < 0.03
    assert (labels[visible] == room.semantics[4][visible]).float().mean() > 0.97
    # A convention error (every camera's axes flipped to OpenGL) loses the match.
    flip = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0]))
    assert matched(flip @ room.world_to_camera)[0] < 0.1 * fraction


def test_init_points_project_to_their_colours(room):
    view = room.test_views[0]
    cam = room.points @ room.world_to_camera[view, :3, :3].T + room.world_to_camera[view, :3, 3]
    pix = cam @ room.intrinsics[view].T
    uv = pix[:, :2] / pix[:, 2:]
    inside = (cam[:, 2] > 0) & (uv[:, 0] >= 0) & (uv[:, 0] < room.width) & (uv[:, 1] >= 0) & (uv[:, 1] < room.height)
    u, v = uv[inside, 0].long(), uv[inside, 1].long()
    in_front = (cam[inside, 2] - room.depth_m[view, v, u]).abs() < 0.01 * cam[inside, 2]
    assert in_front.sum() > 100
    diff = (room.point_colors[inside][in_front] - room.image(view)[:, v[in_front], u[in_front]].T).abs()
    assert diff.mean(1).median() < 0.05


def test_make_rooms():
    rooms = synthetic.make_rooms(2, seed=7, num_views=4, height=24, width=32, num_points=100)
    assert [r.scene_id for r in rooms] == ["room_0007", "room_0008"]


def _tiny_scene(**overrides) -> dict:
    args = dict(
        scene_id="s",
        intrinsics=torch.tensor([[[20.0, 0, 8], [0, 20.0, 6], [0, 0, 1]]]).repeat(2, 1, 1),
        world_to_camera=torch.eye(4).repeat(2, 1, 1),
        height=12,
        width=16,
        image_data=torch.rand(2, 3, 12, 16),
    )
    args.update(overrides)
    return args


def test_scene_validation_names_the_frame():
    pose = torch.eye(4).repeat(2, 1, 1)
    pose[1, 0, 3] = float("nan")
    with pytest.raises(SceneError, match=r"frame 1 'b\.png'.*NaN"):
        Scene(**_tiny_scene(world_to_camera=pose, view_names=["a.png", "b.png"]))
    scaled = torch.eye(4).repeat(2, 1, 1)
    scaled[0, :3, :3] *= 2
    with pytest.raises(SceneError, match=r"frame 0 .*not rigid"):
        Scene(**_tiny_scene(world_to_camera=scaled))
    with pytest.raises(SceneError, match=r"image_data has shape \[2, 3, 12, 15\]"):
        Scene(**_tiny_scene(image_data=torch.rand(2, 3, 12, 15)))
    behind = torch.tensor([[0.0, 0.0, -1.0]])
    with pytest.raises(SceneError, match=r"2 of 2 camera\(s\) see none of the 1 init points"):
        Scene(**_tiny_scene(points=behind))
    scene = Scene(**_tiny_scene(points=torch.tensor([[0.0, 0.0, 1.0]]), scene_id="../my scene/é"))
    assert scene.scene_id == "my_scene" and scene.train_views == [0, 1]


def test_sanitize_scene_id():
    assert sanitize_scene_id("scannet++/0a5c013435") == "scannet_0a5c013435"
    assert sanitize_scene_id("..") == "scene"
    assert sanitize_scene_id("a" * 300) == "a" * 100


def test_dataset_round_trip_through_disk(tmp_path):
    import datasets

    from fit3d_hf.scenes.dataset import dataset_to_scenes, scenes_to_dataset

    rooms = synthetic.make_rooms(2, seed=20, num_views=9, height=24, width=32, num_points=50)
    dataset = scenes_to_dataset(rooms)
    assert len(dataset) == 18 and {"image", "depth", "semantics", "intrinsics", "world_to_camera", "scene_id", "view_id"} <= set(
        dataset.column_names
    )
    dataset.save_to_disk(str(tmp_path / "rooms"))
    back = dataset_to_scenes(datasets.load_from_disk(str(tmp_path / "rooms")))
    assert [s.scene_id for s in back] == ["room_0020", "room_0021"]
    for room, loaded in zip(rooms, back):
        torch.testing.assert_close(loaded.images(), (room.images() * 255).round() / 255, atol=1e-6, rtol=0)
        torch.testing.assert_close(loaded.depth_m, room.depth_m, atol=0, rtol=0)
        assert torch.equal(loaded.semantics, room.semantics)
        torch.testing.assert_close(loaded.intrinsics, room.intrinsics, atol=0, rtol=0)
        torch.testing.assert_close(loaded.world_to_camera, room.world_to_camera, atol=0, rtol=0)
        assert loaded.test_views == room.test_views == [0, 8] and loaded.train_views == room.train_views
        assert loaded.class_names == synthetic.CLASS_NAMES


def test_dataset_refuses_mixed_sizes():
    from fit3d_hf.scenes.dataset import scenes_to_dataset

    small = synthetic.make_room(1, num_views=2, height=24, width=32, num_points=10)
    large = synthetic.make_room(2, num_views=2, height=48, width=64, num_points=10)
    with pytest.raises(SceneError, match="differ in image size"):
        scenes_to_dataset([small, large])
