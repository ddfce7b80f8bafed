"""`fit3d convert`: official FiT3D (timm) checkpoints -> a FiT3DModel folder."""

import sys
from dataclasses import dataclass, field

from . import parse_args

DESCRIPTION = """Convert an official FiT3D release (two timm state dicts: the original backbone and the
3D-aware fine-tuned one) into a FiT3DModel folder (config.json, model.safetensors, the remote-code files
and preprocessor_config.json) that AutoModel.from_pretrained loads offline. .pth files are read with
torch.load(weights_only=True). Nothing is written unless the whole conversion succeeds."""


@dataclass
class ConvertArguments:
    family: str = field(
        metadata={
            "help": "Which FiT3D release the checkpoints are (sizes and architecture follow from it).",
            "choices": ["dinov2_small", "dinov2_base", "dinov2_reg_small", "clip_base", "mae_base", "deit3_base"],
        }
    )
    original: str = field(metadata={"help": "timm state dict of the original backbone (.pth or .safetensors)."})
    finetuned: str = field(metadata={"help": "timm state dict of the FiT3D fine-tuned backbone (.pth or .safetensors)."})
    output: str = field(metadata={"help": "Folder to write (must not exist unless --overwrite)."})
    assembly: str = field(
        default="concat",
        metadata={
            "help": "Output features: concat (paper), finetuned, original or add.",
            "choices": ["concat", "finetuned", "original", "add"],
        },
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing output folder."})


def main(argv: list[str] | None = None) -> None:
    (args,) = parse_args((ConvertArguments,), argv, prog="fit3d convert", description=DESCRIPTION)
    from ..backbones import preset_config
    from ..convert import ConversionError, convert_checkpoints

    try:
        output = convert_checkpoints(
            args.original,
            args.finetuned,
            args.output,
            preset_config(args.family),
            assembly=args.assembly,
            overwrite=args.overwrite,
        )
    except (ConversionError, FileNotFoundError, FileExistsError) as error:
        sys.exit(f"fit3d convert: {error}")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
