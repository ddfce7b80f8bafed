"""Command-line layer: argument dataclasses parsed with `transformers.HfArgumentParser`.

The library modules never parse arguments; these commands (and `recipes/*.py`, which call
them) do. Every command accepts `--config FILE.yaml` with flags overriding the file, and
`--threads N` (`fit3d_hf.threads`, applied before the command runs).
"""

import argparse
import sys
from typing import Any

import yaml
from transformers import HfArgumentParser

from fit3d_hf.threads import THREADS_HELP, configure_threads


def parse_args(dataclass_types: tuple[type, ...], argv: list[str] | None, prog: str, description: str) -> tuple[Any, ...]:
    """Parse `argv` into instances of `dataclass_types` and apply `--threads` (`fit3d_hf.threads`).

    `--config FILE.yaml` (a flat mapping of field names) sets defaults; flags given on the
    command line override it. Unknown keys in the YAML file are an error naming them.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    # Raw formatting keeps the example commands in a command's description on their own lines.
    parser = HfArgumentParser(
        dataclass_types, prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=None, help="YAML file of arguments; flags override it.")
    parser.add_argument("--threads", type=int, default=0, help=THREADS_HELP)
    config_path = None
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            parser.error("--config needs a file path")
        config_path = argv[i + 1]
        argv = argv[:i] + argv[i + 2 :]
    elif any(a.startswith("--config=") for a in argv):
        arg = next(a for a in argv if a.startswith("--config="))
        config_path = arg.split("=", 1)[1]
        argv = [a for a in argv if a is not arg]
    if config_path is not None:
        with open(config_path) as f:
            values = yaml.safe_load(f) or {}
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(values) - known)
        if unknown:
            parser.error(f"{config_path}: unknown keys {unknown}")
        parser.set_defaults(**values)
        # A required field given in the YAML file is no longer required on the command line.
        for action in parser._actions:
            if action.dest in values:
                action.required = False
    outputs = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=False)
    # The extra options (`--config`, `--threads`) come back as a Namespace.
    (extra,) = [o for o in outputs if isinstance(o, argparse.Namespace)]
    if extra.threads < 0:
        parser.error(f"--threads must be >= 0, got {extra.threads}")
    configure_threads(extra.threads)
    return tuple(o for o in outputs if not isinstance(o, argparse.Namespace))
