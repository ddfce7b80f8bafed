"""`fit3d pretrain_embedded`: pre-train the embedded backbone (SimMIM on procedural rooms, CPU) and save it."""

from dataclasses import dataclass, field

from fit3d_hf.commands import parse_args
from fit3d_hf.embedded import EMBEDDED_BACKBONE_DIR, EmbeddedPretrainConfig, pretrain_embedded_backbone, save_embedded_backbone

DESCRIPTION = """Pre-train the embedded backbone that `fit3d demo` uses: SimMIM masked-patch prediction on the
package's procedural rooms, on the CPU. The seed, schedule and measured time are written to
pretraining.json beside the weights. Regenerate the shipped weights with:

  fit3d pretrain_embedded --output fit3d_hf/assets/embedded_backbone
"""


@dataclass
class EmbeddedArguments:
    output: str = field(
        default=str(EMBEDDED_BACKBONE_DIR), metadata={"help": "Folder to write the backbone into (replaced atomically)."}
    )


def main(argv: list[str] | None = None) -> None:
    args, config = parse_args(
        (EmbeddedArguments, EmbeddedPretrainConfig), argv, prog="fit3d pretrain_embedded", description=DESCRIPTION
    )
    result = pretrain_embedded_backbone(config)
    path = save_embedded_backbone(result, config, args.output)
    size_mb = (path / "model.safetensors").stat().st_size / 1e6
    print(f"saved {path} ({size_mb:.1f} MB) after {result.seconds:.0f} s; loss {result.losses[0]:.3f} → {result.losses[-1]:.3f}")
