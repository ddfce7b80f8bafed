"""`fit3d <command> [args]`: one sub-command per pipeline stage.

Each sub-command lives in `fit3d_hf/commands/<name>.py` and exposes `main(argv)`; the
`recipes/*.py` scripts call the same functions, so `fit3d lift ...` and
`accelerate launch recipes/lift.py ...` take the same arguments.
"""

import importlib
import sys

COMMANDS = {
    "demo": "Run the whole pipeline on the embedded synthetic scenes (CPU, minutes).",
    "convert": "Convert official FiT3D (timm) checkpoints into a FiT3DModel folder.",
    "lift": "Stage I: lift backbone features into feature Gaussians, one file per scene.",
    "render": "Render lifted features into a `datasets` dataset of fine-tuning targets.",
    "finetune": "Stage II: fine-tune the backbone on rendered targets (use accelerate launch for several processes).",
    "evaluate": "Linear-probe benchmark (segmentation, depth, 3D correspondence): original vs FiT3D.",
    "card": "Render a model card with eval results into a model folder.",
    "push": "Upload a model folder, a dataset or a Space folder to the Hugging Face Hub.",
    "app": "See a FiT3D model's features in a Gradio app (pip install 'fit3d_hf[app]').",
    "space": "Write a Hugging Face Space folder of the app for a model (push it with fit3d push).",
    "pretrain_embedded": "Pre-train the embedded backbone of the demo (SimMIM on procedural rooms, CPU).",
}


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: fit3d <command> [--help] [args]", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        sys.exit(f"fit3d: unknown command {name!r}\n\n{_usage()}")
    module = importlib.import_module(f"fit3d_hf.commands.{name}")
    module.main(rest)


if __name__ == "__main__":
    main()
