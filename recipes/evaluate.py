import os
import sys

# This script shares its name with the `evaluate` library: keep its folder off the import path.
sys.path = [p for p in sys.path if os.path.abspath(p or os.curdir) != os.path.dirname(os.path.abspath(__file__))]

from fit3d_hf.commands.evaluate import main  # noqa: E402

main()
