"""Rendered-feature targets for Stage II, as a `datasets` dataset.

The official FiT3D code renders every target on the fly at every step from all scenes'
Gaussians held in RAM. Here each training view is rendered once:

    lifted Gaussians --render--> features [D, Hr, Wr] --scene decoder--> [Cb, Hr, Wr]
                     --bilinear--> target [Cb, h, w] at the backbone's patch grid

and written, with the input image and a validity mask, into a dataset that can be saved,
published (`fit3d_hf.hub.push_targets`) and streamed by any number of training processes.

    render_targets(scenes, backbone, output_dir, gaussians_dir=...)  # the stage's entry
    load_targets(path_or_repo_id)                                    # float16 kept
    load_targets(path_or_repo_id, streaming=True)                    # an IterableDataset

Modules: `schema` (columns and dataset-level metadata), `render` (`render_targets`, the preview
picture), `load` (`load_targets` and the float16 training views, map-style and streamed).
"""

from .load import collate_training_rows, load_targets, training_dataset, training_stream
from .render import MASKS, PAPER_TARGETS, gaussian_blur, render_targets, scene_source_kind, target_preview
from .schema import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MASK_DTYPES,
    METADATA_FILE,
    PREVIEW_MIN_LONG_SIDE,
    TRAINING_COLUMNS,
    bytes_per_view,
    parse_metadata,
    schema,
    target_shape,
    targets_metadata,
)

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MASKS",
    "MASK_DTYPES",
    "METADATA_FILE",
    "PAPER_TARGETS",
    "PREVIEW_MIN_LONG_SIDE",
    "TRAINING_COLUMNS",
    "bytes_per_view",
    "collate_training_rows",
    "gaussian_blur",
    "load_targets",
    "parse_metadata",
    "render_targets",
    "scene_source_kind",
    "schema",
    "target_preview",
    "target_shape",
    "targets_metadata",
    "training_dataset",
    "training_stream",
]
