"""`fit3d <command> [args]`: one sub-command per pipeline stage.

Each sub-command lives in `fit3d_hf/commands/<name>.py` and exposes `main(argv)`; the
`recipes/*.py` scripts run the same commands through `run_command`, so `fit3d lift ...` and
`accelerate launch recipes/lift.py ...` take the same arguments and report errors the same way.

Errors: an input the user can fix (`fit3d_hf.errors.UserError`: a bad file, option or folder, an
artifact made with other settings) is printed as one message naming the input and the fix, and
the command exits with code 2 (`errors.USER_ERROR_EXIT_CODE`), without a traceback. `--debug`
(anywhere on the command line) or `FIT3D_DEBUG=1` shows the traceback too. Any other exception
is a bug and keeps its traceback; Ctrl-C exits with code 130 and says which stages resume.
"""

import importlib
import os
import sys

from fit3d_hf.errors import USER_ERROR_EXIT_CODE, UserError

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
DEBUG_FLAG = "--debug"
DEBUG_VARIABLE = "FIT3D_DEBUG"
INTERRUPTED_EXIT_CODE = 130


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: fit3d <command> [--help] [--debug] [args]", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]
    lines += ["", f"{DEBUG_FLAG} (or {DEBUG_VARIABLE}=1) shows the traceback of a refused input."]
    return "\n".join(lines)


def run_command(name: str, argv: list[str] | None = None):
    """Run `fit3d <name>` with `argv` (default: `sys.argv[1:]`): the command's `main`, with user
    errors reported as a message and exit code 2 (the module docstring). Returns what `main` returns."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv or os.environ.get(DEBUG_VARIABLE, "").lower() not in ("", "0", "false", "no")
    argv = [arg for arg in argv if arg != DEBUG_FLAG]
    module = importlib.import_module(f"fit3d_hf.commands.{name}")
    try:
        return module.main(argv)
    except UserError as error:
        if debug:
            raise
        print(f"fit3d {name}: error: {error}", file=sys.stderr)
        print(f"(run with {DEBUG_FLAG} or {DEBUG_VARIABLE}=1 to see where it was raised)", file=sys.stderr)
        raise SystemExit(USER_ERROR_EXIT_CODE) from None
    except KeyboardInterrupt:
        if debug:
            raise
        print(
            f"\nfit3d {name}: interrupted (lift, render, evaluate and demo resume when run again; "
            "finetune with --resume_from_checkpoint latest)",
            file=sys.stderr,
        )
        raise SystemExit(INTERRUPTED_EXIT_CODE) from None


def main(argv: list[str] | None = None) -> None:
    """The `fit3d` console script. Returns nothing: the console wrapper calls `sys.exit(main())`, which
    would print a returned object and exit with 1 (a command's result is `run_command`'s return value)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        sys.exit(f"fit3d: unknown command {name!r}\n\n{_usage()}")
    run_command(name, rest)


if __name__ == "__main__":
    main()
