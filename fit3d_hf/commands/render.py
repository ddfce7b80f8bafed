"""`fit3d render`: render lifted features of every training view into a targets dataset."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from fit3d_hf.backbone_specs import load_backbone_spec
from fit3d_hf.commands import parse_args
from fit3d_hf.commands.scene_args import SceneArguments, scenes_of
from fit3d_hf.errors import InputError, OutputError
from fit3d_hf.io import check_output_folder

DESCRIPTION = """Render the fine-tuning targets of Stage II into a `datasets` dataset.

For every training view: render the scene's lifted features, decode them with the scene's decoder
at render resolution, resize bilinearly to the backbone's patch grid and store them (float16) with
the image, a validity mask, the camera and a preview picture. The folder is written atomically and
can be published with --push_to_hub (Parquet shards of at most --max_shard_size, a dataset card and
fit3d_targets.json; ScanNet++-derived data gets a gated repo). `--target_source single_view_blur` builds the single-view control instead
(the backbone's own features, blurred; no Gaussians needed).

`--protocol paper` stores the official Stage II data (`targets.PAPER_TARGETS`): every view, the soft
anonymisation mask (the scene mask bilinearly resized to the patch grid, float16) instead of the
coverage mask, ImageNet normalisation (checked against the lifting's).

Example:
  fit3d lift --synthetic_rooms 2 --backbone embedded --output_dir lifted
  fit3d render --synthetic_rooms 2 --backbone embedded --gaussians_dir lifted --output_dir targets
"""


@dataclass
class RenderArguments:
    """How to render (scenes and backbone: `SceneArguments`, the same options as `fit3d lift`)."""

    output_dir: str = field(metadata={"help": "Dataset folder to create (must not exist)."})
    gaussians_dir: str | None = field(
        default=None, metadata={"help": "The --output_dir of `fit3d lift` (<scene_id>.safetensors)."}
    )
    target_source: Literal["lifted", "single_view_blur"] = field(
        default="lifted", metadata={"help": "'lifted' (FiT3D targets) or 'single_view_blur' (the control: no Gaussians)."}
    )
    image_height: int | None = field(default=None, metadata={"help": "Stored image height (multiple of the patch size)."})
    image_width: int | None = field(default=None, metadata={"help": "Stored image width (multiple of the patch size)."})
    render_scale: float = field(default=1.0, metadata={"help": "Render at scene resolution x this before decoding."})
    blur_sigma: float = field(default=1.0, metadata={"help": "Blur of the single-view control, in patch-grid cells."})
    views: Literal["train", "all"] = field(default="train", metadata={"help": "Which views of each scene."})
    mask: Literal["coverage", "soft"] = field(
        default="coverage",
        metadata={
            "help": "Stored loss weight per cell: 'coverage' (1 where rendered and the scene mask allows, else 0) or "
            "'soft' (the scene mask bilinearly resized, in [0, 1]: the official one)."
        },
    )
    size_rule: Literal["floor", "nearest"] = field(
        default="floor", metadata={"help": "Default image size: each side 'floor'ed (official) or rounded to patch multiples."}
    )
    normalization: str | None = field(
        default=None,
        metadata={
            "help": "Input normalisation: 'imagenet' or 'family' (single_view_blur targets use it; lifted ones are "
            "checked against the lifting's); unset: the backbone's record / the lifting's."
        },
    )
    num_shards: int | None = field(default=None, metadata={"help": "Arrow shards in the saved folder."})
    device: str = field(default="auto", metadata={"help": "'auto' (cuda when available), 'cpu' or 'cuda'."})
    push_to_hub: str | None = field(default=None, metadata={"help": "Also upload the dataset to this Hub dataset repo."})
    private: bool = field(default=False, metadata={"help": "Create the Hub repo as private."})
    max_shard_size: str = field(default="500MB", metadata={"help": "--push_to_hub: the largest Parquet shard (e.g. 500MB, 2GB)."})


def main(argv: list[str] | None = None):
    from fit3d_hf.hub import push_targets
    from fit3d_hf.targets import PAPER_TARGETS, render_targets

    args, scene_args = parse_args(
        (RenderArguments, SceneArguments), argv, prog="fit3d render", description=DESCRIPTION, protocols={"paper": PAPER_TARGETS}
    )

    if (args.image_height is None) != (args.image_width is None):
        raise InputError("give both --image_height and --image_width, or neither")
    if Path(args.output_dir).exists():
        raise OutputError(f"--output_dir {args.output_dir} already exists; remove it or choose another output folder")
    check_output_folder(args.output_dir, what="--output_dir")
    scenes = scenes_of(scene_args)
    if not scenes:
        raise InputError("no scenes; pass --scenes FOLDER ... and/or --synthetic_rooms N (as for `fit3d lift`)")
    backbone, _ = load_backbone_spec(scene_args.backbone, scene_args.seed)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    dataset = render_targets(
        scenes,
        backbone,
        args.output_dir,
        gaussians_dir=args.gaussians_dir,
        target_source=args.target_source,
        image_size=(args.image_height, args.image_width) if args.image_height else None,
        render_scale=args.render_scale,
        blur_sigma=args.blur_sigma,
        views=args.views,
        mask=args.mask,
        size_rule=args.size_rule,
        normalization=args.normalization,
        num_shards=args.num_shards,
        device=device,
    )
    print(f"wrote {dataset.num_rows} views to {args.output_dir} (target {tuple(dataset.features['target'].shape)} float16)")
    if args.push_to_hub:
        push_targets(args.output_dir, args.push_to_hub, private=args.private, max_shard_size=args.max_shard_size)
        print(f"pushed to https://huggingface.co/datasets/{args.push_to_hub}")
    return dataset
