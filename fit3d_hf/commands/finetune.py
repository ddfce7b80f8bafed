"""`fit3d finetune` / `accelerate launch recipes/finetune.py`: Stage II fine-tuning."""

import os
from dataclasses import asdict, dataclass, field

from fit3d_hf.commands import parse_args
from fit3d_hf.finetune import FinetuneConfig

DESCRIPTION = """Fine-tune a backbone on rendered 3D-aware targets (FiT3D Stage II).

Trains the fine-tuned copy of a FiT3DModel with masked L1 on a targets dataset written by
`fit3d render`, then saves the whole FiT3DModel (both backbones), its image processor and a
model card to --output_dir. Checkpoints go to <output_dir>/checkpoints/step_<N>; resume with
--resume_from_checkpoint latest. Defaults are the paper's (AdamW lr 1e-5, wd 1e-4, clip 0.1,
batch 2, flip 0.5, one epoch).

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
    args, config = parse_args((FinetuneArguments, FinetuneConfig), argv, prog="fit3d finetune", description=DESCRIPTION)
    from accelerate import PartialState

    from fit3d_hf import FiT3DModel, hub
    from fit3d_hf.backbone_specs import load_backbone_spec
    from fit3d_hf.features_dataset import load_targets, targets_metadata
    from fit3d_hf.finetune import finetune, save_finetuned

    dataset = load_targets(args.dataset)
    backbone, backbone_name = load_backbone_spec(args.backbone, config.seed)
    model = FiT3DModel.from_backbone(backbone, assembly="concat")
    result = finetune(model, dataset, config, args.output_dir, resume_from_checkpoint=args.resume_from_checkpoint)
    if not PartialState().is_main_process:
        return result
    image = dataset[0]["image"]
    final_loss = result.losses[-1][1] if result.losses else None
    training_info = {
        "dataset": args.dataset,
        "dataset_metadata": targets_metadata(dataset),
        "backbone": backbone_name,
        "config": asdict(config),
        "num_views": dataset.num_rows,
        "global_step": result.global_step,
        "num_processes": len(result.rank_checksums),
        "rank_checksums": result.rank_checksums,
        "losses": result.losses,
    }
    card_extra = {
        "training": (
            f"`{backbone_name}` fine-tuned for {result.global_step} steps on {dataset.num_rows} rendered views of `{args.dataset}` "
            f"({len(result.rank_checksums)} process(es), batch {config.per_device_batch_size} per process, AdamW lr "
            f"{config.learning_rate}, wd {config.weight_decay}, grad clip {config.max_grad_norm}, flip p {config.flip_probability}); "
            f"final masked-L1 loss {final_loss if final_loss is None else round(final_loss, 5)}. Details in `fit3d_finetune.json`."
        ),
    }
    if "/" in args.backbone and not os.path.exists(args.backbone):
        card_extra["base_model"] = args.backbone
    save_finetuned(
        result.model, args.output_dir, image_size=tuple(image.shape[-2:]), training_info=training_info, card_extra=card_extra
    )
    print(f"saved the FiT3DModel to {args.output_dir}")
    if args.push_to_hub:
        print(hub.push_to_hub(args.output_dir, args.push_to_hub, private=args.private))
    return result
