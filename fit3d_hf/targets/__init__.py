"""Rendered-feature targets for Stage II, as a `datasets` dataset.

The official FiT3D code renders every target on the fly at every step from all scenes'
Gaussians held in RAM. Here each training view is rendered once:

    lifted Gaussians --render--> features [D, Hr, Wr] --scene decoder--> [Cb, Hr, Wr]
                     --bilinear--> target [Cb, h, w] at the backbone's patch grid

and written, with the input image and a validity mask, into a dataset that can be saved,
published (`fit3d_hf.hub.push_targets`) and streamed by any number of training processes.

    render_targets(scenes, backbone, output_dir, gaussians_dir=...)  # the stage's entry
    load_targets(path_or_repo_id)                                    # float16 kept

Modules: `schema` (columns and dataset-level metadata), `render` (`render_targets`), `load`
(`load_targets` and the float16 training view).
"""

from .load import load_targets, training_dataset
from .render import MASKS, PAPER_TARGETS, gaussian_blur, render_targets
from .schema import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MASK_DTYPES,
    METADATA_FILE,
    TRAINING_COLUMNS,
    bytes_per_view,
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
    "TRAINING_COLUMNS",
    "bytes_per_view",
    "gaussian_blur",
    "load_targets",
    "render_targets",
    "schema",
    "target_shape",
    "targets_metadata",
    "training_dataset",
]
