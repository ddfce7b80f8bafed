"""Probe benchmark recipe: `accelerate launch recipes/evaluation.py --help` (same as `fit3d evaluate`)."""

from fit3d_hf.commands.evaluate import main

if __name__ == "__main__":
    main()
