"""The targets dataset's columns and its dataset-level metadata.

Columns (see `schema`):
    image            datasets.Image  RGB at the fine-tuning input size [H, W] (PNG)
    target           float16 [Cb, h, w]  decoded render at the patch grid (h = H / patch)
    mask             [h, w]              the loss weight of each cell: uint8 1 where the render
                                         covers it (alpha >= 0.5) and the scene mask (if any) says
                                         valid (mask "coverage"), or float16 in [0, 1], the scene
                                         mask bilinearly resized (mask "soft", the official one)
    scene_id         string
    view_id          int32               index of the view in its scene
    intrinsics       float32 [3, 3]      pinhole, for the stored image size
    world_to_camera  float32 [4, 4]      OpenCV axes
    preview          datasets.Image  PCA of the target as RGB (PNG), black where the mask is 0, the
                                     patch grid enlarged by whole cells: what the Hub viewer shows
Dataset-level metadata (backbone, patch size, image size, D, how it was rendered) is a JSON
object in `dataset.info.description`, and `fit3d_targets.json` beside the data: inside the saved
folder, and at the root of a Hub repo (`fit3d_hf.hub.push_targets`), where `load_targets` reads it
back (`datasets` keeps no description on the Hub).
"""

import json
from typing import Any

import datasets

METADATA_FILE = "fit3d_targets.json"
FORMAT_NAME = "fit3d-targets"
FORMAT_VERSION = 1
TRAINING_COLUMNS = ["image", "target", "mask"]
# The preview's long side is at least this many pixels: each patch-grid cell becomes a block.
PREVIEW_MIN_LONG_SIDE = 128
# dtype of the mask column per kind of mask (`render_targets(mask=...)`).
MASK_DTYPES = {"coverage": "uint8", "soft": "float16"}


def schema(hidden_size: int, grid_height: int, grid_width: int, mask: str = "coverage") -> datasets.Features:
    """The dataset's columns for a backbone of width `hidden_size` (Cb) at patch grid h × w, with a `mask` kind of mask."""
    return datasets.Features(
        {
            "image": datasets.Image(),
            "target": datasets.Array3D((hidden_size, grid_height, grid_width), "float16"),
            "mask": datasets.Array2D((grid_height, grid_width), MASK_DTYPES[mask]),
            "scene_id": datasets.Value("string"),
            "view_id": datasets.Value("int32"),
            "intrinsics": datasets.Array2D((3, 3), "float32"),
            "world_to_camera": datasets.Array2D((4, 4), "float32"),
            "preview": datasets.Image(),
        }
    )


def bytes_per_view(hidden_size: int, grid_height: int, grid_width: int, mask: str = "coverage") -> int:
    """Uncompressed bytes of one row's target + mask + cameras (the PNG image comes on top)."""
    mask_bytes = 1 if MASK_DTYPES[mask] == "uint8" else 2
    return 2 * hidden_size * grid_height * grid_width + mask_bytes * grid_height * grid_width + 4 * (9 + 16)


def parse_metadata(text: str | None) -> dict[str, Any]:
    """The metadata in a JSON text (`fit3d_targets.json` or `info.description`); {} when it is none of ours."""
    try:
        metadata = json.loads(text or "{}")
    except json.JSONDecodeError:
        return {}
    return metadata if isinstance(metadata, dict) and metadata.get("format") == FORMAT_NAME else {}


def targets_metadata(dataset: datasets.Dataset | datasets.IterableDataset) -> dict[str, Any]:
    """The dataset-level metadata written by `render_targets` (empty dict for foreign datasets)."""
    return parse_metadata(dataset.info.description)


def target_shape(dataset: datasets.Dataset | datasets.IterableDataset) -> tuple[int, int, int]:
    """(Cb, h, w) of the `target` column, read from the dataset's features (any source)."""
    feature = (dataset.features or {}).get("target")
    if not isinstance(feature, datasets.Array3D):
        raise ValueError(f"dataset has no Array3D 'target' column (columns: {list(dataset.features or {})})")
    return tuple(feature.shape)
