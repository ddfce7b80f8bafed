"""A 3D-awareness metric: multi-view patch correspondence by nearest-neighbour feature matching.

For two views of a scene with ground-truth depth and cameras, each patch centre of view A is
back-projected with its depth and projected into view B; where it lands inside B and is
not occluded there (B's depth agrees), the pair is a ground-truth correspondence. The
patch of B whose feature is nearest (cosine) to A's patch feature is the match; recall at
t pixels is the fraction of correspondences whose matched patch centre lies within t pixels
of the true projection (pixels of the scene's images). Features that encode 3D structure
consistently across views score higher.
"""

import torch
import torch.nn.functional as F

from ..scenes.geometry import project, unproject


def patch_centers(grid: tuple[int, int], height: int, width: int) -> torch.Tensor:
    """Pixel coordinates (x, y) `[h*w, 2]` of the patch centres of an `h × w` grid laid over
    an `H × W` image (pixel i covers [i, i+1))."""
    h, w = grid
    ys, xs = torch.meshgrid((torch.arange(h) + 0.5) * height / h, (torch.arange(w) + 0.5) * width / w, indexing="ij")
    return torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=1)


def ground_truth_correspondences(
    depth_a: torch.Tensor,
    depth_b: torch.Tensor,
    intrinsics_a: torch.Tensor,
    intrinsics_b: torch.Tensor,
    world_to_camera_a: torch.Tensor,
    world_to_camera_b: torch.Tensor,
    grid: tuple[int, int],
    *,
    occlusion_tolerance: float = 0.05,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Patches of view A that are visible in view B, and where they land.

    Args:
        depth_a, depth_b: `[H, W]` z-depth in metres (<= 0 = unknown).
        intrinsics_a, intrinsics_b: `[3, 3]` pinhole K for H × W images.
        world_to_camera_a, world_to_camera_b: `[4, 4]` OpenCV world→camera.
        grid: the feature grid (h, w) of view A.
        occlusion_tolerance: a projection counts as visible when B's depth there is within
            this fraction of the projected depth.

    Returns:
        index_a `[M]` flat patch indices into A's grid, and xy_b `[M, 2]` their pixel
        coordinates in B.
    """
    height, width = depth_a.shape
    centers = patch_centers(grid, height, width)
    px = centers.long()
    z = depth_a[px[:, 1], px[:, 0]].double()
    points = unproject(centers.double(), z, intrinsics_a.double(), world_to_camera_a.double())
    xy, z_b = project(points, intrinsics_b.double(), world_to_camera_b.double())  # [P, 2], [P]
    inside = (z > 0) & (z_b > 1e-6) & (xy[:, 0] >= 0) & (xy[:, 0] < width) & (xy[:, 1] >= 0) & (xy[:, 1] < height)
    seen = torch.zeros_like(inside)
    idx = inside.nonzero().squeeze(1)
    pix = xy[idx].long()
    depth_there = depth_b[pix[:, 1], pix[:, 0]].double()
    seen[idx] = (depth_there > 0) & ((depth_there - z_b[idx]).abs() <= occlusion_tolerance * z_b[idx])
    index_a = seen.nonzero().squeeze(1)
    return index_a, xy[index_a].float()


def match_errors(
    features_a: torch.Tensor, features_b: torch.Tensor, index_a: torch.Tensor, xy_b: torch.Tensor, height: int, width: int
) -> torch.Tensor:
    """Pixel distance `[M]` between each A patch's nearest-neighbour patch in B and its true
    location xy_b `[M, 2]`; features `[C, h, w]` of both views (cosine similarity)."""
    c, h, w = features_b.shape
    fa = F.normalize(features_a.reshape(c, -1)[:, index_a].float(), dim=0)
    fb = F.normalize(features_b.reshape(c, -1).float(), dim=0)
    nearest = (fa.T @ fb).argmax(dim=1)
    centers_b = patch_centers((h, w), height, width)
    return (centers_b[nearest] - xy_b).norm(dim=1)


def view_pairs(num_views: int, offsets: list[int]) -> list[tuple[int, int]]:
    """Pairs (i, i + k) for every offset k: neighbours along a capture trajectory overlap."""
    return [(i, i + k) for k in offsets for i in range(num_views - k)]


def correspondence_recall(
    features: torch.Tensor,
    depth_m: torch.Tensor,
    intrinsics: torch.Tensor,
    world_to_camera: torch.Tensor,
    pairs: list[tuple[int, int]],
    thresholds_px: list[float],
) -> dict[str, float]:
    """Recall of nearest-neighbour patch matching over the given view pairs of one scene.

    Args:
        features: `[V, C, h, w]` patch features of every view.
        depth_m: `[V, H, W]`; intrinsics `[V, 3, 3]`; world_to_camera `[V, 4, 4]`.
        pairs: view index pairs (a, b); both directions are not added automatically.
        thresholds_px: pixel radii t.

    Returns:
        `{"recall@{t}px": fraction, ..., "num_correspondences": M}` pooled over all pairs.
    """
    height, width = depth_m.shape[-2:]
    grid = tuple(features.shape[-2:])
    errors = []
    for a, b in pairs:
        index_a, xy_b = ground_truth_correspondences(
            depth_m[a], depth_m[b], intrinsics[a], intrinsics[b], world_to_camera[a], world_to_camera[b], grid
        )
        if index_a.numel():
            errors.append(match_errors(features[a], features[b], index_a, xy_b, height, width))
    errors = torch.cat(errors) if errors else torch.zeros(0)
    out = {f"recall@{t:g}px": float((errors <= t).float().mean()) if errors.numel() else float("nan") for t in thresholds_px}
    out["num_correspondences"] = int(errors.numel())
    return out
