"""`load_scene(path)`: detect the capture format of a folder and load it."""

from __future__ import annotations

from pathlib import Path

from fit3d_hf.scenes.colmap import find_model_dir, load_colmap
from fit3d_hf.scenes.images import SceneError
from fit3d_hf.scenes.scene import Scene
from fit3d_hf.scenes.transforms_json import load_fit3d_scannetpp, load_transforms_json


def detect_format(path: str | Path) -> str:
    """ "fit3d_scannetpp", "transforms_json" or "colmap" for a capture folder (or transforms .json file).

    Checked in that order: `transforms_train.json` (FiT3D's ScanNet++ layout), `transforms.json`
    (nerfstudio / instant-ngp), a COLMAP model in the folder, `sparse/0/`, `sparse/` or `colmap/sparse/0/`.
    """
    path = Path(path)
    if path.is_file() and path.suffix == ".json":
        return "fit3d_scannetpp" if path.name == "transforms_train.json" else "transforms_json"
    if not path.is_dir():
        raise SceneError(f"{path}: no such folder")
    if (path / "transforms_train.json").is_file():
        return "fit3d_scannetpp"
    if (path / "transforms.json").is_file():
        return "transforms_json"
    if find_model_dir(path) is not None:
        return "colmap"
    raise SceneError(
        f"{path}: not a recognised capture; expected transforms_train.json (FiT3D ScanNet++), "
        f"transforms.json (nerfstudio / instant-ngp) or a COLMAP model (cameras/images/points3D "
        f".bin or .txt in the folder, sparse/0/, sparse/ or colmap/sparse/0/)"
    )


def load_scene(
    path: str | Path,
    *,
    downscale: float = 1.0,
    skip_missing: bool = False,
    verify_images: bool = True,
    scene_id: str | None = None,
    images_dir: str | Path | None = None,
    allow_external_paths: bool = False,
) -> Scene:
    """Load a posed capture from disk as a lazily read `Scene` (see `detect_format` for the formats).

    Args:
        path: capture folder, or a transforms .json file.
        downscale: divide the image size by this (≥ 1); images, masks and intrinsics stay consistent.
        skip_missing: drop frames whose image file is missing (warning) instead of raising a
            SceneError that lists every missing file.
        verify_images: decode each image once now (fast reduced-size decode for JPEG) so that
            corrupt files are reported at load time with their frame.
        scene_id: defaults to the folder name; sanitised for use as a file name.
        images_dir: the images of a COLMAP model (default: see `colmap.load_colmap`).
        allow_external_paths: accept file names in the capture files that point outside the
            capture folder (`paths.inside`); refused by default.
    """
    fmt = detect_format(path)
    path = Path(path)
    options = dict(
        downscale=downscale,
        skip_missing=skip_missing,
        verify_images=verify_images,
        scene_id=scene_id,
        allow_external_paths=allow_external_paths,
    )
    if images_dir is not None and fmt != "colmap":
        raise SceneError(f"{path}: an images folder ({images_dir}) is only used for COLMAP models; this is a {fmt} capture")
    if fmt == "fit3d_scannetpp":
        return load_fit3d_scannetpp(path.parent if path.is_file() else path, **options)
    if fmt == "transforms_json":
        return load_transforms_json(path, **options)
    return load_colmap(path, images_dir=images_dir, **options)
