"""The whole pipeline on synthetic rooms: `python recipes/demo.py --help` (same as `fit3d demo`)."""

from fit3d_hf.commands.demo import main

if __name__ == "__main__":
    main()
