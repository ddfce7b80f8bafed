r"""`fit3d lift`: Stage I, lift backbone features into feature Gaussians, one file per scene.

    fit3d lift --config recipes/configs/lift_cpu.yaml --synthetic_rooms 2 --output_dir runs/lifted
    accelerate launch --config_file recipes/configs/accelerate_cpu_2proc.yaml recipes/lift.py \
        --config recipes/configs/lift_cpu.yaml --scenes data/scene_a data/scene_b --output_dir runs/lifted
    accelerate launch recipes/lift.py --protocol paper --scenes <ScanNet++ scenes> --backbone <model> --output_dir runs/lifted

`--protocol paper` is the official Stage I (`LiftConfig.paper_preset()`: every scene point, every
view, near plane 0.2, ImageNet normalisation; docs/protocol.md), `--protocol cpu` the CPU preset.

Under `accelerate launch` every process lifts its share of the scenes (round robin) with its own
progress bar; the main process prints a summary table once all are done. Rerunning the same
command skips finished scenes and resumes interrupted ones from their last checkpoint.

On a GPU the rasterizer is gsplat: the first run on a machine compiles its CUDA kernels (about 4-5
minutes; nvcc of the CUDA major version torch was built with), once, in the main process first.
"""

import logging
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from fit3d_hf.backbone_specs import load_backbone_spec
from fit3d_hf.commands import parse_args
from fit3d_hf.commands.scene_args import SceneArguments, scenes_of
from fit3d_hf.errors import InputError
from fit3d_hf.io import check_output_folder
from fit3d_hf.lift import LiftConfig, lift_scenes, summary_table
from fit3d_hf.lift.config import CPU_PRESET, PAPER_PRESET
from fit3d_hf.splatting import load_gsplat_extension, resolve_backend


@dataclass
class LiftArguments:
    """Where to write (scenes and backbone: `SceneArguments`; hyper-parameters: `LiftConfig`)."""

    output_dir: str = field(metadata={"help": "Folder for <scene_id>.safetensors / .json (and .checkpoints/ while running)."})


def main(argv: list[str] | None = None) -> None:
    args, config, scene_args = parse_args(
        (LiftArguments, LiftConfig, SceneArguments),
        argv,
        prog="fit3d lift",
        description=__doc__,
        protocols={"paper": PAPER_PRESET, "cpu": CPU_PRESET},
    )
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # Before the scenes are read (which verifies every image): an unusable folder is found at once.
    check_output_folder(args.output_dir, what="--output_dir")
    # CPU only where torch sees no accelerator (CUDA, MPS, XPU, ...): accelerate alone would start a
    # launched CPU process as a silent single process; `use_cpu` in an accelerate config still applies.
    accelerator = Accelerator(cpu=not torch.accelerator.is_available())
    scenes = scenes_of(scene_args)
    if not scenes:
        raise InputError("no scenes given: pass --scenes FOLDER ... and/or --synthetic_rooms N")
    backbone, backbone_name = load_backbone_spec(scene_args.backbone, scene_args.seed)
    backbone.to(accelerator.device).requires_grad_(False)
    if resolve_backend(config.backend, accelerator.device, torch.float32) == "gsplat":
        # gsplat compiles its kernels on first use into one folder per machine, which a process that finds
        # no finished build there deletes: one process builds (the main one, then each machine's first if
        # the folder is not shared) while the others wait, then they load the build.
        with accelerator.main_process_first(), accelerator.local_main_process_first():
            load_gsplat_extension()
    reports = lift_scenes(
        scenes, backbone, config, output_dir=args.output_dir, seed=scene_args.seed,
        process_index=accelerator.process_index, num_processes=accelerator.num_processes,
    )  # fmt: skip
    reports = gather_object(reports)
    if accelerator.is_main_process:
        print(f"\nlifted with {backbone_name} into {args.output_dir}:\n{summary_table(reports)}")
    accelerator.end_training()


if __name__ == "__main__":
    main()
