"""`fit3d finetune` / `accelerate launch recipes/finetune.py`: Stage II fine-tuning."""

from dataclasses import dataclass, field

from fit3d_hf.commands import parse_args
from fit3d_hf.finetune import PAPER_PRESET, FinetuneConfig

DESCRIPTION = """Fine-tune a backbone on rendered 3D-aware targets (FiT3D Stage II).

Trains the fine-tuned copy of a FiT3DModel with masked L1 on a targets dataset written by
`fit3d render`, then saves the whole FiT3DModel (both backbones), its image processor and a
model card to --output_dir. Checkpoints go to <output_dir>/checkpoints/step_<N>; resume with
--resume_from_checkpoint latest. Defaults are the paper's (AdamW lr 1e-5, wd 1e-4, clip 0.1,
batch 2, flip 0.5, one epoch, fp32), which `--protocol paper` pins. The paper's effective batch is 2
(per-device batch x processes) at lr 1e-5: on N processes keep the product at 2, or scale the
learning rate linearly with it (a deviation). The input is normalised as the targets were lifted.

One process:      fit3d finetune --dataset targets --backbone embedded --output_dir fit3d-model
Several / GPUs:   accelerate launch --config_file recipes/configs/accelerate_cpu_2proc.yaml \\
                      recipes/finetune.py --config recipes/configs/finetune_cpu.yaml
(`accelerate launch --cpu --num_processes 2` silently runs ONE process: use a config file with
distributed_type MULTI_GPU, as recipes/configs/accelerate_cpu_2proc.yaml does.)
"""


@dataclass
class FinetuneArguments:
    dataset: str = field(metadata={"help": "Targets dataset: a folder from `fit3d render`, a pushed folder or a Hub dataset id."})
    output_dir: str = field(metadata={"help": "Where the FiT3DModel folder and checkpoints go."})
    backbone: str = field(
        default="embedded",
        metadata={
            "help": "The backbone the targets were rendered for (as for `fit3d lift`: 'embedded', 'tiny:<family>', "
            "'random:<preset>' (seeded by --seed) or a transformers model folder / Hub id)."
        },
    )
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={"help": "A checkpoint folder, or 'latest' (the newest in <output_dir>/checkpoints; fresh start if none)."},
    )
    push_to_hub: str | None = field(default=None, metadata={"help": "Upload the final model folder to this Hub repo."})
    private: bool = field(default=False, metadata={"help": "Create the Hub repo as private."})


def main(argv: list[str] | None = None):
    args, config = parse_args(
        (FinetuneArguments, FinetuneConfig),
        argv,
        prog="fit3d finetune",
        description=DESCRIPTION,
        protocols={"paper": PAPER_PRESET},
    )
    from accelerate import PartialState

    from fit3d_hf import hub
    from fit3d_hf.finetune import finetune

    result = finetune(args.dataset, args.backbone, args.output_dir, config, resume_from_checkpoint=args.resume_from_checkpoint)
    if not PartialState().is_main_process:
        return result
    extra = hub.finetune_card_extra(result.training_info, backbone=args.backbone)
    if args.push_to_hub:
        extra["repo_id"] = args.push_to_hub
    hub.write_model_card(args.output_dir, extra=extra)
    print(f"saved the FiT3DModel to {args.output_dir}")
    if args.push_to_hub:
        print(hub.push_to_hub(args.output_dir, args.push_to_hub, private=args.private))
    return result
