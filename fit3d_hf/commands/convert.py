"""`fit3d convert`: official FiT3D (timm) checkpoints -> a FiT3DModel folder."""

import sys
from dataclasses import dataclass, field

from ..backbones import NORMALIZATIONS, preset_config
from ..convert import (
    OFFICIAL_RELEASES,
    CheckpointsUnavailableError,
    ConversionError,
    convert_checkpoints,
    convert_official,
)
from . import parse_args

RELEASES = list(OFFICIAL_RELEASES)

DESCRIPTION = """Convert an official FiT3D release (two timm state dicts: the original backbone and the
3D-aware fine-tuned one) into a FiT3DModel folder (config.json, model.safetensors, the remote-code files
and preprocessor_config.json) that AutoModel.from_pretrained loads offline. .pth files are read with
torch.load(weights_only=True). Nothing is written unless the whole conversion succeeds.

The model records the input normalisation the checkpoints were trained with (--normalization,
ImageNet's by default: the official code normalises every backbone with it, CLIP included), and
its image processor uses it.

  fit3d convert --official dinov2_small --output fit3d-dinov2-small
      fetches timm/vit_small_patch14_dinov2.lvd142m model.safetensors and yuanwenyue/FiT3D
      dinov2_small_finetuned.pth through huggingface_hub (offline: from its cache, or say which
      files to place where); --original / --finetuned replace either with a local file
  fit3d convert --family dinov2_small --original model.safetensors --finetuned dinov2_small_finetuned.pth \\
      --output fit3d-dinov2-small
"""


@dataclass
class ConvertArguments:
    output: str = field(metadata={"help": "Folder to write (must not exist unless --overwrite)."})
    official: str | None = field(
        default=None,
        metadata={
            "help": "An official release (names of the official hubconf.py): its two files are fetched through "
            "huggingface_hub unless given as --original / --finetuned.",
            "choices": RELEASES,
        },
    )
    family: str | None = field(
        default=None,
        metadata={
            "help": "Which FiT3D release local checkpoints are (sizes and architecture follow from it); implied by --official.",
            "choices": RELEASES,
        },
    )
    original: str | None = field(
        default=None, metadata={"help": "timm state dict of the original backbone (.pth or .safetensors)."}
    )
    finetuned: str | None = field(
        default=None, metadata={"help": "timm state dict of the FiT3D fine-tuned backbone (.pth or .safetensors)."}
    )
    assembly: str = field(
        default="concat",
        metadata={
            "help": "Output features: concat (paper), finetuned, original or add.",
            "choices": ["concat", "finetuned", "original", "add"],
        },
    )
    normalization: str = field(
        default="imagenet",
        metadata={
            "help": "Input normalisation the checkpoints were trained with: imagenet (the official code's, for every "
            "backbone) or family (the family's own statistics). With --official always imagenet.",
            "choices": list(NORMALIZATIONS),
        },
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing output folder."})


def main(argv: list[str] | None = None) -> None:
    (args,) = parse_args((ConvertArguments,), argv, prog="fit3d convert", description=DESCRIPTION)
    try:
        if args.official is not None:
            if args.family not in (None, args.official):
                sys.exit(f"fit3d convert: --family {args.family} contradicts --official {args.official}; give one")
            if args.normalization != "imagenet":
                sys.exit("fit3d convert: the official checkpoints were trained with ImageNet normalisation; drop --normalization")
            output = convert_official(
                args.official,
                args.output,
                original=args.original,
                finetuned=args.finetuned,
                assembly=args.assembly,
                overwrite=args.overwrite,
            )
        else:
            if args.family is None or args.original is None or args.finetuned is None:
                sys.exit("fit3d convert: give --official NAME, or --family, --original and --finetuned")
            output = convert_checkpoints(
                args.original,
                args.finetuned,
                args.output,
                preset_config(args.family),
                assembly=args.assembly,
                normalization=args.normalization,
                overwrite=args.overwrite,
            )
    except (ConversionError, CheckpointsUnavailableError, FileNotFoundError, FileExistsError) as error:
        sys.exit(f"fit3d convert: {error}")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
