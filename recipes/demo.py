"""The whole pipeline on synthetic rooms: `python recipes/demo.py --help` (same as `fit3d demo`)."""

from fit3d_hf.cli import run_command

if __name__ == "__main__":
    run_command("demo")
