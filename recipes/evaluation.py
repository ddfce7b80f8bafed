"""Probe benchmark recipe: `accelerate launch recipes/evaluation.py --help` (same as `fit3d evaluate`)."""

from fit3d_hf.cli import run_command

if __name__ == "__main__":
    run_command("evaluate")
