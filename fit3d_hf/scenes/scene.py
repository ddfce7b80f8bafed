"""`Scene`: posed multi-view images (+ masks, depth, semantics, init points) of one capture."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fit3d_hf.scenes.images import FrameFiles, SceneError, distorted_grid, image_size, read_image, read_mask, undistort

IGNORE_LABEL = 255


def sanitize_scene_id(name: str) -> str:
    """A scene id that is safe as a file name: [A-Za-z0-9._-] only, no leading dot, ≤ 100 chars."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._-")[:100]
    return cleaned or "scene"


@dataclass
class Scene:
    """Posed views of one scene, in OpenCV camera axes (x right, y down, z forward).

    Images come either from memory (`image_data`) or, lazily, from files (`files`): `image(i)` reads
    one view on demand, so a 600-view capture never has to sit in RAM. File frames are resized to
    `height` × `width` on read; `intrinsics` already describe that size (see `images.py` for the
    pixel convention).

    Attributes:
        scene_id: file-name-safe name (sanitised on construction).
        intrinsics: [V, 3, 3] pinhole K for `height` × `width` images.
        world_to_camera: [V, 4, 4] rigid world→camera transforms (gsplat's `viewmats`).
        height, width: size of every view, in pixels.
        image_data: [V, 3, H, W] float32 in [0, 1], for in-memory scenes.
        files: image/mask files for lazily loaded scenes.
        mask_data: [V, H, W] float32, 1 = use the pixel; optional.
        depth_m: [V, H, W] float32 z-depth in metres (distance along the optical axis); optional.
        semantics: [V, H, W] int64 class ids, 255 = ignore; optional.
        points: [P, 3] float32 world points to initialise Gaussians from; optional.
        point_colors: [P, 3] float32 in [0, 1]; optional (only with `points`).
        train_views, test_views: view indices; if both are empty every view is a train view.
        view_names: a name per view (the file name for loaded scenes), used in error messages.
        class_names: names of the semantic classes, when `semantics` is given.
        source: where the scene came from (a path or a generator), used in error messages.
    """

    scene_id: str
    intrinsics: torch.Tensor
    world_to_camera: torch.Tensor
    height: int
    width: int
    image_data: torch.Tensor | None = None
    files: FrameFiles | None = None
    mask_data: torch.Tensor | None = None
    depth_m: torch.Tensor | None = None
    semantics: torch.Tensor | None = None
    points: torch.Tensor | None = None
    point_colors: torch.Tensor | None = None
    train_views: list[int] = field(default_factory=list)
    test_views: list[int] = field(default_factory=list)
    view_names: list[str] = field(default_factory=list)
    class_names: list[str] | None = None
    source: str = ""
    _grids: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.scene_id = sanitize_scene_id(self.scene_id)
        self.intrinsics = torch.as_tensor(self.intrinsics, dtype=torch.float32)
        self.world_to_camera = torch.as_tensor(self.world_to_camera, dtype=torch.float32)
        num_views = self.intrinsics.shape[0]
        if not self.view_names:
            self.view_names = [f"view_{i:04d}" for i in range(num_views)]
        where = self.source or self.scene_id
        _check_shape(self.intrinsics, (num_views, 3, 3), "intrinsics", where)
        _check_shape(self.world_to_camera, (num_views, 4, 4), "world_to_camera", where)
        if len(self.view_names) != num_views:
            raise SceneError(f"{where}: {len(self.view_names)} view names for {num_views} views")
        if (self.image_data is None) == (self.files is None):
            raise SceneError(f"{where}: give exactly one of image_data (in memory) or files (lazy)")
        per_view = {
            "image_data": (3, self.height, self.width),
            "mask_data": (self.height, self.width),
            "depth_m": (self.height, self.width),
            "semantics": (self.height, self.width),
        }
        for name, shape in per_view.items():
            value = getattr(self, name)
            if value is not None:
                _check_shape(value, (num_views, *shape), name, where)
        if self.files is not None and len(self.files.image_paths) != num_views:
            raise SceneError(f"{where}: {len(self.files.image_paths)} image files for {num_views} views")
        if self.image_data is not None and not self.image_data.is_floating_point():
            raise SceneError(f"{where}: image_data must be float in [0, 1], got {self.image_data.dtype}")
        if self.depth_m is not None:
            self.depth_m = self.depth_m.float()
        if self.semantics is not None:
            self.semantics = self.semantics.long()
        if self.points is not None:
            self.points = torch.as_tensor(self.points, dtype=torch.float32)
            _check_shape(self.points, (self.points.shape[0], 3), "points", where)
            if self.point_colors is not None:
                self.point_colors = torch.as_tensor(self.point_colors, dtype=torch.float32)
                _check_shape(self.point_colors, (self.points.shape[0], 3), "point_colors", where)
        if not self.train_views and not self.test_views:
            self.train_views = list(range(num_views))
        bad = [i for i in self.train_views + self.test_views if not 0 <= i < num_views]
        if bad:
            raise SceneError(f"{where}: view indices {bad} out of range for {num_views} views")
        check_cameras(self.intrinsics, self.world_to_camera, self.view_names, where)
        if self.points is not None and len(self.points) > 0:
            check_points_seen(self.points, self.intrinsics, self.world_to_camera, self.width, self.height, self.view_names, where)

    @classmethod
    def from_files(
        cls,
        scene_id: str,
        image_paths: list[Path],
        intrinsics: torch.Tensor,
        world_to_camera: torch.Tensor,
        *,
        source: str,
        view_names: list[str] | None = None,
        file_sizes: list[tuple[int, int] | None] | None = None,
        mask_paths: list[Path | None] | None = None,
        distortion: torch.Tensor | None = None,
        is_test: list[bool] | None = None,
        points: torch.Tensor | None = None,
        point_colors: torch.Tensor | None = None,
        downscale: float = 1.0,
        skip_missing: bool = False,
        verify_images: bool = True,
    ) -> Scene:
        """Validate the files of a capture and build a lazily loaded scene from them.

        Args:
            image_paths: a file per frame.
            intrinsics: [V, 3, 3] pinhole K at the files' resolution.
            world_to_camera: [V, 4, 4] OpenCV world→camera poses.
            source: the file the frames were listed in, named in every error.
            file_sizes: the (width, height) the capture declares per frame (None: not declared);
                a file of another size is an error.
            mask_paths: a mask file (non-zero = use) or None per frame.
            distortion: [V, 8] OpenCV coefficients; frames are undistorted on read, K kept.
            is_test: per frame, whether it is a held-out view.
            downscale: divide the image size by this (≥ 1); intrinsics are scaled to match.
            skip_missing: drop frames whose image file is missing (with a warning) instead of failing.
            verify_images: decode every image once now so corrupt files fail here, not mid-training.

        Raises:
            SceneError: listing every missing file, every unreadable image, every frame whose size
                differs, or (from the constructor) every bad pose.
        """
        count = len(image_paths)
        view_names = view_names or [Path(p).name for p in image_paths]
        keep = list(range(count))
        missing = [i for i in keep if not Path(image_paths[i]).is_file()]
        if missing:
            listing = "\n  ".join(f"frame {i} '{view_names[i]}': {image_paths[i]}" for i in missing)
            if not skip_missing:
                raise SceneError(
                    f"{source}: {len(missing)} of {count} image files listed are missing:\n  {listing}\n"
                    f"Pass --skip_missing (skip_missing=True in Python) to load the {count - len(missing)} that exist."
                )
            warnings.warn(
                f"{source}: skipping {len(missing)} of {count} frames whose image file is missing:\n  {listing}", stacklevel=2
            )
            keep = [i for i in keep if i not in set(missing)]
        if not keep:
            raise SceneError(f"{source}: none of the {count} listed image files exist")

        problems, sizes = [], {}
        for i in tqdm(keep, desc=f"checking images of {scene_id}", disable=len(keep) < 100, leave=False):
            try:
                sizes[i] = image_size(Path(image_paths[i]), decode=verify_images)
            except SceneError as err:
                problems.append(f"frame {i} '{view_names[i]}': {err}")
                continue
            declared = file_sizes[i] if file_sizes is not None else None
            if declared is not None and tuple(declared) != sizes[i]:
                problems.append(
                    f"frame {i} '{view_names[i]}': {image_paths[i]} is {sizes[i][0]}×{sizes[i][1]} "
                    f"but the capture declares {declared[0]}×{declared[1]}"
                )
            mask = mask_paths[i] if mask_paths is not None else None
            if mask is not None:
                try:
                    mask_size = image_size(Path(mask), decode=verify_images)
                except SceneError as err:
                    problems.append(f"frame {i} '{view_names[i]}' mask: {err}")
                    continue
                if mask_size != sizes[i]:
                    problems.append(
                        f"frame {i} '{view_names[i]}': mask {mask} is {mask_size[0]}×{mask_size[1]}, "
                        f"image is {sizes[i][0]}×{sizes[i][1]}"
                    )
        distinct = sorted(set(sizes.values()), key=list(sizes.values()).count, reverse=True)
        if len(distinct) > 1:
            odd = [f"frame {i} '{view_names[i]}': {w}×{h}" for i, (w, h) in sizes.items() if (w, h) != distinct[0]]
            problems.append(f"images differ in size (most are {distinct[0][0]}×{distinct[0][1]}): " + "; ".join(odd))
        if problems:
            raise SceneError(f"{source}: {len(problems)} problem(s) with the image files:\n  " + "\n  ".join(problems))

        if downscale < 1:
            raise SceneError(f"{source}: downscale must be ≥ 1, got {downscale}")
        file_width, file_height = distinct[0]
        width, height = max(1, round(file_width / downscale)), max(1, round(file_height / downscale))
        scale = torch.tensor([width / file_width, height / file_height, 1.0])[:, None]
        index = torch.tensor(keep)
        return cls(
            scene_id=scene_id,
            intrinsics=torch.as_tensor(intrinsics, dtype=torch.float32)[index] * scale,
            world_to_camera=torch.as_tensor(world_to_camera, dtype=torch.float32)[index],
            height=height,
            width=width,
            files=FrameFiles(
                image_paths=[Path(image_paths[i]) for i in keep],
                mask_paths=None if mask_paths is None else [mask_paths[i] and Path(mask_paths[i]) for i in keep],
                distortion=None if distortion is None else torch.as_tensor(distortion, dtype=torch.float32)[index],
            ),
            points=points,
            point_colors=point_colors,
            train_views=[j for j, i in enumerate(keep) if not (is_test and is_test[i])],
            test_views=[j for j, i in enumerate(keep) if is_test and is_test[i]],
            view_names=[view_names[i] for i in keep],
            source=source,
        )

    def __repr__(self) -> str:
        extras = [name for name in ("mask_data", "depth_m", "semantics", "points") if getattr(self, name) is not None]
        storage = "in memory" if self.image_data is not None else "lazy from files"
        return (
            f"Scene('{self.scene_id}', {self.num_views} views ({len(self.train_views)} train, "
            f"{len(self.test_views)} test), {self.width}×{self.height}, images {storage}"
            + (f", with {', '.join(extras)}" if extras else "")
            + (f", from {self.source}" if self.source else "")
            + ")"
        )

    @property
    def num_views(self) -> int:
        return self.intrinsics.shape[0]

    @property
    def camera_centers(self) -> torch.Tensor:
        """[V, 3] camera positions in world coordinates."""
        rotation = self.world_to_camera[:, :3, :3]
        return -(rotation.transpose(1, 2) @ self.world_to_camera[:, :3, 3:])[..., 0]

    def image(self, i: int) -> torch.Tensor:
        """View i as [3, H, W] float32 in [0, 1] (read from disk for file-backed scenes)."""
        if self.image_data is not None:
            return self.image_data[i]
        path = self.files.image_paths[i]
        try:
            image = read_image(path, self.width, self.height)
        except (OSError, SyntaxError, ValueError) as err:
            raise SceneError(
                f"{path} (frame {i} '{self.view_names[i]}' of scene '{self.scene_id}'): cannot decode image ({err})"
            ) from err
        grid = self._distortion_grid(i)
        if grid is not None:
            image = undistort(image, grid)[0]
        return image

    def images(self, indices: list[int] | None = None) -> torch.Tensor:
        """Views `indices` (all by default) as [V', 3, H, W]."""
        indices = range(self.num_views) if indices is None else indices
        return torch.stack([self.image(i) for i in indices])

    def mask(self, i: int) -> torch.Tensor | None:
        """[H, W] float32 (1 = use) for view i, or None when every pixel of the scene is valid.

        For undistorted frames, pixels that fall outside the original image are 0.
        """
        mask = None if self.mask_data is None else self.mask_data[i]
        if self.files is not None:
            if self.files.mask_paths is not None and self.files.mask_paths[i] is not None:
                mask = read_mask(self.files.mask_paths[i], self.width, self.height)
            grid = self._distortion_grid(i)
            if grid is not None:
                valid = undistort(torch.ones(1, self.height, self.width), grid)[1]
                mask = valid if mask is None else (undistort(mask[None], grid)[0][0] > 0.999).float() * valid
        return mask

    def masks(self, indices: list[int] | None = None) -> torch.Tensor | None:
        """Masks of views `indices` (all by default) as [V', H, W], or None if the scene has none."""
        indices = list(range(self.num_views)) if indices is None else indices
        masks = [self.mask(i) for i in indices]
        if all(m is None for m in masks):
            return None
        return torch.stack([torch.ones(self.height, self.width) if m is None else m for m in masks])

    def _distortion_grid(self, i: int) -> torch.Tensor | None:
        if self.files is None or self.files.distortion is None or not self.files.distortion[i].any():
            return None
        key = tuple(self.intrinsics[i].flatten().tolist() + self.files.distortion[i].tolist())
        if key not in self._grids:
            if len(self._grids) >= 8:  # per-frame intrinsics: keep a few grids, not one per view
                self._grids.pop(next(iter(self._grids)))
            self._grids[key] = distorted_grid(self.intrinsics[i], self.files.distortion[i], self.width, self.height)
        return self._grids[key]


def _check_shape(value: torch.Tensor, shape: tuple[int, ...], name: str, where: str) -> None:
    if tuple(value.shape) != tuple(shape):
        raise SceneError(f"{where}: {name} has shape {list(value.shape)}, expected {list(shape)}")


def check_cameras(intrinsics: torch.Tensor, world_to_camera: torch.Tensor, view_names: list[str], where: str) -> None:
    """Raise SceneError naming every frame whose pose is not finite and rigid or whose K is invalid.

    Args:
        intrinsics: [V, 3, 3]; focal lengths must be positive and finite.
        world_to_camera: [V, 4, 4]; rotation orthonormal with det +1 (tolerance 1e-3), last row [0, 0, 0, 1].
    """
    problems = []
    eye = torch.eye(3, dtype=torch.float64)
    for i, (K, pose) in enumerate(zip(intrinsics.double(), world_to_camera.double())):
        name = f"frame {i} '{view_names[i]}'"
        if not torch.isfinite(pose).all():
            problems.append(f"{name}: pose has NaN/inf entries")
            continue
        rotation = pose[:3, :3]
        if (rotation.T @ rotation - eye).abs().max() > 1e-3 or abs(torch.linalg.det(rotation) - 1) > 1e-3:
            problems.append(f"{name}: pose is not rigid (rotation not orthonormal with det +1; scaled or sheared?)")
        elif (pose[3] - torch.tensor([0, 0, 0, 1.0], dtype=torch.float64)).abs().max() > 1e-6:
            problems.append(f"{name}: pose last row is {pose[3].tolist()}, expected [0, 0, 0, 1]")
        if not torch.isfinite(K).all() or K[0, 0] <= 0 or K[1, 1] <= 0:
            problems.append(f"{name}: intrinsics invalid (fx={K[0, 0].item()}, fy={K[1, 1].item()})")
    if problems:
        raise SceneError(f"{where}: {len(problems)} bad camera(s):\n  " + "\n  ".join(problems))


def check_points_seen(
    points: torch.Tensor,
    intrinsics: torch.Tensor,
    world_to_camera: torch.Tensor,
    width: int,
    height: int,
    view_names: list[str],
    where: str,
) -> None:
    """Raise SceneError naming every camera that sees none of `points` [P, 3] (a pose-convention check)."""
    homogeneous = torch.cat([points, torch.ones(len(points), 1)], dim=1)  # [P, 4]
    blind = []
    for start in range(0, len(intrinsics), 32):
        cam = world_to_camera[start : start + 32, :3] @ homogeneous.T  # [v, 3, P]
        pix = intrinsics[start : start + 32] @ cam
        z = cam[:, 2]
        u = pix[:, 0] / z.clamp_min(1e-9)
        v = pix[:, 1] / z.clamp_min(1e-9)
        seen = ((z > 1e-6) & (u >= 0) & (u <= width) & (v >= 0) & (v <= height)).any(dim=1)
        blind += [start + j for j in torch.nonzero(~seen).flatten().tolist()]
    if blind:
        names = ", ".join(f"{i} '{view_names[i]}'" for i in blind[:20]) + (" ..." if len(blind) > 20 else "")
        raise SceneError(
            f"{where}: {len(blind)} of {len(intrinsics)} camera(s) see none of the {len(points)} "
            f"init points (wrong pose convention or wrong point file?): frames {names}"
        )
