"""Initial Gaussians for lifting: from a point cloud (3DGS init) or random inside the camera bounds."""

import math

import torch

from ..scenes.geometry import project
from ..scenes.scene import Scene
from ..splatting._torch_backend import SH_C0
from .config import RANDOM_INIT_POINTS


def camera_extent(centers: torch.Tensor) -> float:
    """Scene scale as in 3DGS (`getNerfppNorm`): 1.1 × the largest distance of `centers [V, 3]` from their mean.

    Learning rates of the means and the densification size thresholds are relative to it.
    """
    radius = (centers - centers.mean(0)).norm(dim=-1).max().item()
    # A single camera (or cameras at one spot) has no spread: fall back to unit scale.
    return 1.1 * radius if radius > 1e-6 else 1.0


def visible_in_any_view(
    points: torch.Tensor, intrinsics: torch.Tensor, world_to_camera: torch.Tensor, width: int, height: int
) -> torch.Tensor:
    """`[P, 3]` points → `[P]` bool: in front of and inside the image of at least one camera."""
    visible = torch.zeros(len(points), dtype=torch.bool, device=points.device)
    for K, w2c in zip(intrinsics, world_to_camera):
        uv, z = project(points, K, w2c)
        visible |= (z > 1e-3) & (uv[:, 0] >= 0) & (uv[:, 0] < width) & (uv[:, 1] >= 0) & (uv[:, 1] < height)
    return visible


def random_points_in_camera_bounds(
    num_points: int,
    centers: torch.Tensor,
    intrinsics: torch.Tensor,
    world_to_camera: torch.Tensor,
    width: int,
    height: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """Uniform points in a cube around the camera `centers [V, 3]`, kept only where some camera sees them.

    The cube is centred on the mean camera centre with half-side `camera_extent`, which holds
    an object the cameras look at from all around (an inward capture) and the near part of a
    room the cameras stand in. Rejection sampling stops after 50 rounds with what it has.

    Returns:
        `[P, 3]` points, `P <= num_points` (at least one).
    """
    center, half = centers.mean(0), camera_extent(centers)
    kept: list[torch.Tensor] = []
    count = 0
    for _ in range(50):
        candidates = center + half * (2 * torch.rand(2 * num_points, 3, generator=generator) - 1)
        candidates = candidates[visible_in_any_view(candidates, intrinsics.cpu(), world_to_camera.cpu(), width, height)]
        kept.append(candidates)
        count += len(candidates)
        if count >= num_points:
            break
    points = torch.cat(kept)[:num_points]
    if len(points) == 0:
        raise ValueError("no random point inside the camera bounds is seen by any camera: check the camera poses")
    return points


def knn_scale(points: torch.Tensor, k: int = 3, chunk: int = 2048) -> torch.Tensor:
    """`[P, 3]` → `[P]` sqrt of the mean squared distance to the k nearest neighbours (the 3DGS init scale)."""
    if len(points) <= k:
        return torch.full((len(points),), 0.01, device=points.device)
    scales = []
    for start in range(0, len(points), chunk):
        d2 = torch.cdist(points[start : start + chunk], points).square()
        nearest = d2.topk(k + 1, dim=-1, largest=False).values[:, 1:]  # drop the point itself
        scales.append(nearest.mean(-1).sqrt())
    return torch.cat(scales).clamp_min(1e-7)


def initial_parameters(
    points: torch.Tensor, colors: torch.Tensor | None, sh_degree: int, feature_dim: int, opacity: float
) -> dict[str, torch.Tensor]:
    """Gaussian parameters for one Gaussian per point, in the activations' input space.

    Args:
        points: `[N, 3]` means.
        colors: `[N, 3]` RGB in [0, 1], or None for grey.

    Returns:
        `means [N, 3]`, `quats [N, 4]` (identity, wxyz), `scales [N, 3]` (log), `opacities [N]`
        (logit), `sh0 [N, 1, 3]`, `shN [N, (sh_degree+1)^2 - 1, 3]` (absent for degree 0),
        `features [N, D]` (zeros, as the official code).
    """
    n = len(points)
    colors = torch.full_like(points, 0.5) if colors is None else colors.to(points)
    params = {
        "means": points.clone(),
        "quats": torch.cat([torch.ones(n, 1), torch.zeros(n, 3)], dim=-1).to(points),
        "scales": knn_scale(points).log()[:, None].repeat(1, 3),
        "opacities": torch.full((n,), math.log(opacity / (1 - opacity))).to(points),
        "sh0": ((colors - 0.5) / SH_C0)[:, None, :],
        "features": torch.zeros(n, feature_dim).to(points),
    }
    if sh_degree > 0:
        params["shN"] = torch.zeros(n, (sh_degree + 1) ** 2 - 1, 3).to(points)
    return params


def initial_points(
    scene: Scene, num_points: int, generator: torch.Generator, random_points: int = RANDOM_INIT_POINTS
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Where lifting starts: the scene's points, or random points in its camera bounds.

    Args:
        num_points: at most this many scene points, a random subset; 0 for all of them (the official
            initialisation from the whole point cloud). Also the number of random points of a scene
            without points, `random_points` when 0.

    Returns:
        points `[P, 3]` (scene points in their order) and their colours `[P, 3]` (None when the
        scene has none, or for random points).
    """
    if scene.points is not None and len(scene.points) > 0:
        if num_points == 0:
            return scene.points, scene.point_colors
        keep = torch.randperm(len(scene.points), generator=generator)[:num_points].sort().values
        colors = None if scene.point_colors is None else scene.point_colors[keep]
        return scene.points[keep], colors
    points = random_points_in_camera_bounds(
        num_points or random_points,
        scene.camera_centers,
        scene.intrinsics,
        scene.world_to_camera,
        scene.width,
        scene.height,
        generator,
    )
    return points, None
