import torch

from fit3d_hf.evaluation.correspondence import (
    correspondence_recall,
    ground_truth_correspondences,
    match_errors,
    patch_centers,
    view_pairs,
)
from fit3d_hf.scenes import synthetic


def test_patch_centers_and_pairs():
    centers = patch_centers((2, 3), 20, 30)
    assert centers[0].tolist() == [5.0, 5.0] and centers[-1].tolist() == [25.0, 15.0]
    assert view_pairs(4, [1, 2]) == [(0, 1), (1, 2), (2, 3), (0, 2), (1, 3)]


def test_same_camera_maps_every_patch_to_itself():
    K = torch.tensor([[50.0, 0, 32], [0, 50.0, 24], [0, 0, 1]])
    pose = torch.eye(4)
    depth = torch.full((48, 64), 3.0)
    index, xy = ground_truth_correspondences(depth, depth, K, K, pose, pose, (6, 8))
    assert index.tolist() == list(range(48))
    assert torch.allclose(xy, patch_centers((6, 8), 48, 64), atol=1e-4)


def test_translation_and_occlusion_hand_computed():
    K = torch.tensor([[10.0, 0, 2], [0, 10.0, 2], [0, 0, 1]])
    depth = torch.full((4, 4), 2.0)
    pose_b = torch.eye(4)
    pose_b[0, 3] = -0.1  # camera B sits 0.1 m to the right: points move 10 * 0.1 / 2 = 0.5 px left
    index, xy = ground_truth_correspondences(depth, depth, K, K, torch.eye(4), pose_b, (2, 2))
    assert torch.allclose(xy, patch_centers((2, 2), 4, 4)[index] - torch.tensor([0.5, 0.0]), atol=1e-5)
    assert index.tolist() == [0, 1, 2, 3]
    # B sees a nearer surface everywhere: every correspondence is occluded
    index, _ = ground_truth_correspondences(depth, torch.full((4, 4), 1.0), K, K, torch.eye(4), pose_b, (2, 2))
    assert index.numel() == 0


def test_match_errors_pick_nearest_feature():
    fa = torch.eye(4).reshape(4, 2, 2)
    fb = torch.eye(4)[:, [1, 0, 3, 2]].reshape(4, 2, 2)  # B's patches permuted
    index = torch.arange(4)
    truth = patch_centers((2, 2), 20, 20)[[1, 0, 3, 2]]
    assert match_errors(fa, fb, index, truth, 20, 20).tolist() == [0.0, 0.0, 0.0, 0.0]


def test_recall_of_3d_features_beats_random_on_a_room():
    room = synthetic.make_room(3, num_views=6, height=48, width=64)
    grid = (6, 8)
    # "oracle" features: each patch's world position -> matches are geometric, recall is high
    centers = patch_centers(grid, 48, 64).long()
    oracle = []
    for v in range(room.num_views):
        z = room.depth_m[v][centers[:, 1], centers[:, 0]]
        rays = torch.linalg.inv(room.intrinsics[v]) @ torch.cat([centers.T.float() + 0.5, torch.ones(1, len(z))])
        world = torch.linalg.inv(room.world_to_camera[v]) @ torch.cat([rays * z, torch.ones(1, len(z))])
        oracle.append((world[:3] - world[:3].mean()).reshape(3, *grid))
    oracle = torch.stack(oracle)
    args = (room.depth_m, room.intrinsics, room.world_to_camera, view_pairs(6, [1]), [4.0, 8.0, 16.0])
    good = correspondence_recall(oracle, *args)
    bad = correspondence_recall(torch.randn(6, 3, *grid, generator=torch.Generator().manual_seed(0)), *args)
    assert good["num_correspondences"] > 50
    assert good["recall@8px"] > bad["recall@8px"] + 0.3
    assert good["recall@4px"] <= good["recall@8px"] <= good["recall@16px"]
