r"""`fit3d lift`: Stage I, lift backbone features into feature Gaussians, one file per scene.

    fit3d lift --config recipes/configs/lift_cpu.yaml --synthetic_rooms 2 --output_dir runs/lifted
    accelerate launch --config_file recipes/configs/accelerate_cpu_2proc.yaml recipes/lift.py \
        --config recipes/configs/lift_cpu.yaml --scenes data/scene_a data/scene_b --output_dir runs/lifted

Under `accelerate launch` every process lifts its share of the scenes (round robin) with its own
progress bar; the main process prints a summary table once all are done. Rerunning the same
command skips finished scenes and resumes interrupted ones from their last checkpoint.
"""

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from fit3d_hf.commands import parse_args
from fit3d_hf.splatting.lift import LiftConfig, lift_scenes


@dataclass
class LiftArguments:
    """What to lift, with which backbone, and where to write it (hyper-parameters: `LiftConfig`)."""

    output_dir: str = field(metadata={"help": "Folder for <scene_id>.safetensors / .json (and .checkpoints/ while running)."})
    scenes: list[str] = field(default_factory=list, metadata={"help": "Scene folders to lift (see `fit3d_hf.scenes.load_scene`)."})
    synthetic_rooms: int = field(default=0, metadata={"help": "Also lift this many procedural rooms (seeds synthetic_seed, +1, ...)."})
    synthetic_seed: int = field(default=0, metadata={"help": "Seed of the first procedural room."})
    synthetic_views: int = field(default=24, metadata={"help": "Views per procedural room (every 8th is held out)."})
    synthetic_height: int = field(default=120, metadata={"help": "Image height of the procedural rooms."})
    synthetic_width: int = field(default=160, metadata={"help": "Image width of the procedural rooms."})
    downscale: float = field(default=1.0, metadata={"help": "Load scene folders at their size divided by this (>= 1)."})
    skip_missing: bool = field(default=False, metadata={"help": "Go on without frames whose image file is missing (reported)."})
    backbone: str = field(
        default="embedded",
        metadata={
            "help": "Backbone whose features are lifted: 'embedded' (the package's small pre-trained ViT), "
            "'tiny:<family>' or 'random:<preset>' (randomly initialised, seeded by --seed), or a local "
            "transformers model folder."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of the lifting (and of a random backbone)."})


def build_named_backbone(name: str, seed: int) -> tuple[torch.nn.Module, str]:
    """Resolve `--backbone` into a model and the name recorded in every artifact."""
    from fit3d_hf import backbones

    if name == "embedded":
        from fit3d_hf.embedded import EMBEDDED_BACKBONE_NAME, load_embedded_backbone

        return load_embedded_backbone(), EMBEDDED_BACKBONE_NAME
    kind, _, value = name.partition(":")
    if kind in ("tiny", "random") and value:
        config = backbones.tiny_config(value) if kind == "tiny" else backbones.preset_config(value)
        # Every process must build the same random weights.
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = backbones.build_backbone(config)
        return model, f"{name} (random init, seed {seed})"
    return backbones.load_backbone(name), name


def scene_loaders(args: LiftArguments) -> dict:
    """scene id → loader, for the scene folders and the procedural rooms (nothing is loaded yet)."""
    from fit3d_hf.scenes import load_scene, sanitize_scene_id
    from fit3d_hf.scenes.synthetic import make_room

    loaders = {}
    for path in map(Path, args.scenes):
        # Named after the capture folder (the parent of a transforms .json file).
        scene_id = sanitize_scene_id((path.parent if path.is_file() else path).resolve().name)
        loaders[scene_id] = lambda path=path, scene_id=scene_id: load_scene(
            path, downscale=args.downscale, skip_missing=args.skip_missing, scene_id=scene_id
        )
    for seed in range(args.synthetic_seed, args.synthetic_seed + args.synthetic_rooms):
        loaders[f"room_{seed:04d}"] = lambda seed=seed: make_room(
            seed, num_views=args.synthetic_views, height=args.synthetic_height, width=args.synthetic_width
        )
    return loaders


def summary_table(reports: list[dict]) -> str:
    """A markdown table with one row per scene."""
    lines = [
        "| scene | status | Gaussians | held-out PSNR (dB) | feature cosine | feature L1 | it/s | train time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(reports, key=lambda r: r["scene_id"]):
        m, its = r["metrics"], r["iterations_per_second"]
        lines.append(
            f"| {r['scene_id']} | {r['status']} | {r['num_gaussians']} | {m['psnr']:.2f} | {m['feature_cosine']:.3f} "
            f"| {m['feature_l1']:.4f} | {'-' if its is None else f'{its:.2f}'} | {r['timings_s']['train']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args, config = parse_args((LiftArguments, LiftConfig), argv, prog="fit3d lift", description=__doc__)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    loaders = scene_loaders(args)
    if not loaders:
        sys.exit("fit3d lift: no scenes given: pass --scenes FOLDER ... and/or --synthetic_rooms N")
    backbone, backbone_name = build_named_backbone(args.backbone, args.seed)
    backbone.to(accelerator.device).requires_grad_(False)
    reports = lift_scenes(
        loaders, backbone, config, output_dir=args.output_dir, seed=args.seed, backbone_name=backbone_name,
        process_index=accelerator.process_index, num_processes=accelerator.num_processes,
    )  # fmt: skip
    reports = gather_object(reports)
    if accelerator.is_main_process:
        print(f"\nlifted with {backbone_name} into {args.output_dir}:\n{summary_table(reports)}")
    accelerator.end_training()


if __name__ == "__main__":
    main()
