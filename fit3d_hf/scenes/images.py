"""Reading frames from disk: decode, downscale, undistort — one frame at a time.

Pixel convention everywhere in `fit3d_hf.scenes`: pixel (u, v) covers [u, u+1] × [v, v+1], so its
centre is (u + 0.5, v + 0.5), as in COLMAP, nerfstudio and gsplat. Under that convention a resize
by (sx, sy) scales fx, cx by sx and fy, cy by sy, with no half-pixel offsets.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fit3d_hf.errors import InputError

# File suffixes tried, in this order, for an image named without one.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".PNG", ".JPG", ".JPEG")


class SceneError(InputError):
    """A scene on disk is missing files or holds inconsistent data; the message names file and frame."""


def image_size(path: Path, *, decode: bool = True) -> tuple[int, int]:
    """(width, height) of an image file; with `decode`, decode it fully so corrupt data is found now.

    Raises:
        SceneError: the file is missing, not an image, or truncated/corrupt.
    """
    try:
        with Image.open(path) as img:
            size = img.size
            if decode:
                # Decoding at 1/8 scale still reads every JPEG block, so truncation is found, ~10× faster.
                img.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
                img.load()
    except (OSError, SyntaxError, ValueError) as err:
        raise SceneError(f"{path}: unreadable or corrupt image ({err})") from err
    return size


def read_image(path: Path, width: int, height: int) -> torch.Tensor:
    """Decode an RGB image and resize it (area average) to width × height.

    Alpha is composited onto black (as FiT3D does). Returns [3, height, width] float32 in [0, 1].
    """
    with Image.open(path) as img:
        img.draft("RGB", (width, height))  # JPEG only: decode at the smallest DCT scale ≥ the target
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = np.asarray(img.convert("RGBA"), dtype=np.float32) / 255.0
            img = Image.fromarray(np.round(rgba[..., :3] * rgba[..., 3:] * 255.0).astype(np.uint8))
        img = img.convert("RGB")
        if img.size != (width, height):
            img = img.resize((width, height), Image.Resampling.BOX)
        array = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def read_mask(path: Path, width: int, height: int) -> torch.Tensor:
    """Read a mask image (non-zero = use) at width × height. Returns [height, width] float32 in {0, 1}.

    A downscaled pixel is kept only if every source pixel under it was kept.
    """
    with Image.open(path) as img:
        img = img.convert("L").point(lambda value: 255 if value > 0 else 0)
        if img.size != (width, height):
            img = img.resize((width, height), Image.Resampling.BOX)
        array = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(array >= 255).float()


def distorted_grid(intrinsics: torch.Tensor, distortion: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Where each pixel of the undistorted pinhole image lies in the distorted image.

    Args:
        intrinsics: [3, 3] pinhole K, shared by the distorted and the undistorted image.
        distortion: [8] OpenCV coefficients (k1, k2, p1, p2, k3, k4, k5, k6); zeros where absent.

    Returns:
        [height, width, 2] sampling grid for `F.grid_sample(..., align_corners=False)`.
    """
    k1, k2, p1, p2, k3, k4, k5, k6 = distortion.double().tolist()
    fx, fy, cx, cy = (intrinsics[0, 0].item(), intrinsics[1, 1].item(), intrinsics[0, 2].item(), intrinsics[1, 2].item())
    v, u = torch.meshgrid(torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64), indexing="ij")
    x = (u + 0.5 - cx) / fx
    y = (v + 0.5 - cy) / fy
    r2 = x * x + y * y
    radial = (1 + r2 * (k1 + r2 * (k2 + r2 * k3))) / (1 + r2 * (k4 + r2 * (k5 + r2 * k6)))
    xd = x * radial + 2 * p1 * x * y + p2 * (r2 + 2 * x * x)
    yd = y * radial + p1 * (r2 + 2 * y * y) + 2 * p2 * x * y
    grid_x = (xd * fx + cx) / width * 2 - 1
    grid_y = (yd * fy + cy) / height * 2 - 1
    return torch.stack([grid_x, grid_y], dim=-1).float()


def undistort(image: torch.Tensor, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Resample a distorted image [C, H, W] onto the pinhole grid from `distorted_grid`.

    Returns (undistorted [C, H, W], valid [H, W] float32: 0 where the pinhole pixel falls outside the
    distorted image).
    """
    sampled = F.grid_sample(image[None], grid[None], mode="bilinear", padding_mode="zeros", align_corners=False)[0]
    inside = (grid.abs() <= 1).all(dim=-1).float()
    return sampled, inside


@dataclass
class FrameFiles:
    """The image (and mask) files behind a lazily loaded scene, and how to turn them into frames.

    Attributes:
        image_paths: one file per view.
        mask_paths: one file (or None) per view, or None when the scene has no masks.
        distortion: [V, 8] OpenCV coefficients (k1, k2, p1, p2, k3, k4, k5, k6) to undistort each
            frame with, or None for pinhole images.
    """

    image_paths: list[Path]
    mask_paths: list[Path | None] | None = None
    distortion: torch.Tensor | None = None
