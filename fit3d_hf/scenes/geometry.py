"""Pinhole geometry in the scenes' conventions (OpenCV axes, pixel centres at +0.5, z-depth).

The one place where points are projected into views and pixels lifted back to points; the
rasterizer's projection of Gaussians (means and covariances, batched over cameras) is its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def backproject(depth_m: torch.Tensor, intrinsics: torch.Tensor, world_to_camera: torch.Tensor) -> torch.Tensor:
    """World points of every pixel of one view.

    Args:
        depth_m: [H, W] z-depth in metres.
        intrinsics: [3, 3] pinhole K.
        world_to_camera: [4, 4] OpenCV world→camera.

    Returns:
        [H, W, 3] world coordinates.
    """
    height, width = depth_m.shape
    v, u = torch.meshgrid(
        torch.arange(height, dtype=depth_m.dtype) + 0.5, torch.arange(width, dtype=depth_m.dtype) + 0.5, indexing="ij"
    )
    return unproject(torch.stack([u, v], dim=-1), depth_m, intrinsics, world_to_camera)


def unproject(uv: torch.Tensor, z: torch.Tensor, intrinsics: torch.Tensor, world_to_camera: torch.Tensor) -> torch.Tensor:
    """World points at pixel coordinates `uv [..., 2]` with z-depth `z [...]` (metres) in one view.

    Returns:
        [..., 3] world coordinates (the inverse of `project`).
    """
    rays = torch.cat([uv, torch.ones_like(uv[..., :1])], dim=-1) @ torch.linalg.inv(intrinsics).T
    camera_to_world = torch.linalg.inv(world_to_camera)
    return (rays * z[..., None]) @ camera_to_world[:3, :3].T + camera_to_world[:3, 3]


def project(points: torch.Tensor, intrinsics: torch.Tensor, world_to_camera: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel coordinates and z-depth of world points [..., 3] in one view.

    Returns:
        (uv [..., 2] in pixels (centre of the top-left pixel at (0.5, 0.5)), z [...] in metres;
        points behind the camera have z ≤ 0 and meaningless uv).
    """
    camera = points @ world_to_camera[:3, :3].T + world_to_camera[:3, 3]
    z = camera[..., 2]
    uv = (camera @ intrinsics.T)[..., :2] / z.clamp_min(1e-9)[..., None]
    return uv, z


def sample_at(values: torch.Tensor, uv: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Sample values [C, H, W] at pixel coordinates uv [..., 2] → [C, ...] (zeros outside)."""
    height, width = values.shape[-2:]
    grid = torch.stack([uv[..., 0] / width * 2 - 1, uv[..., 1] / height * 2 - 1], dim=-1)
    flat = grid.reshape(1, 1, -1, 2)
    sampled = F.grid_sample(values[None].to(grid.dtype), flat, mode=mode, align_corners=False)[0, :, 0]
    return sampled.reshape(values.shape[0], *uv.shape[:-1])


def warp_to_source(
    depth_src: torch.Tensor,
    intrinsics_src: torch.Tensor,
    world_to_camera_src: torch.Tensor,
    values_dst: torch.Tensor,
    intrinsics_dst: torch.Tensor,
    world_to_camera_dst: torch.Tensor,
    depth_dst: torch.Tensor | None = None,
    *,
    mode: str = "bilinear",
    depth_tolerance: float = 0.02,
) -> tuple[torch.Tensor, torch.Tensor]:
    """What view `dst` sees at each pixel of view `src`, through src's depth.

    Args:
        depth_src: [H, W] z-depth of the source view.
        values_dst: [C, H', W'] anything per pixel of the destination view (colours, features, labels).
        depth_dst: [H', W'] z-depth of the destination view, to mark occluded pixels invalid.
        mode: "bilinear" or "nearest" (labels).
        depth_tolerance: relative depth difference still counted as the same surface.

    Returns:
        (warped [C, H, W], valid [H, W] bool: in front of dst, inside its image, and not occluded).
    """
    uv, z = project(backproject(depth_src, intrinsics_src, world_to_camera_src), intrinsics_dst, world_to_camera_dst)
    height, width = values_dst.shape[-2:]
    valid = (z > 1e-6) & (uv[..., 0] >= 0.5) & (uv[..., 0] <= width - 0.5) & (uv[..., 1] >= 0.5) & (uv[..., 1] <= height - 0.5)
    if depth_dst is not None:
        seen = sample_at(depth_dst[None], uv, "nearest")[0]
        valid &= (seen - z).abs() <= depth_tolerance * z
    return sample_at(values_dst, uv, mode), valid
