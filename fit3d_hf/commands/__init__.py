"""Command-line layer: argument dataclasses parsed with `transformers.HfArgumentParser`.

The library modules never parse arguments; these commands (and `recipes/*.py`, which call
them) do. Every command accepts `--config FILE.yaml` with flags overriding the file.
"""

import argparse
import sys
from typing import Any

import yaml
from transformers import HfArgumentParser


def parse_args(dataclass_types: tuple[type, ...], argv: list[str] | None, prog: str, description: str) -> tuple[Any, ...]:
    """Parse `argv` into instances of `dataclass_types`.

    `--config FILE.yaml` (a flat mapping of field names) sets defaults; flags given on the
    command line override it. Unknown keys in the YAML file are an error naming them. A value a
    dataclass refuses (its `__post_init__`) is a usage error (exit code 2), like a bad flag.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    # Raw formatting keeps the example commands in a command's description on their own lines.
    parser = HfArgumentParser(
        dataclass_types, prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=None, help="YAML file of arguments; flags override it.")
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
        try:
            with open(config_path) as f:
                values = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as error:
            parser.error(f"--config {config_path}: {error}")
        if not isinstance(values, dict):
            parser.error(f"--config {config_path}: expected a mapping of option names to values")
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(values) - known)
        if unknown:
            parser.error(f"{config_path}: unknown keys {unknown}")
        parser.set_defaults(**values)
        # A required field given in the YAML file is no longer required on the command line.
        for action in parser._actions:
            if action.dest in values:
                action.required = False
    try:
        outputs = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=False)
    except ValueError as error:  # a dataclass's own check of the values (e.g. LiftConfig's)
        parser.error(str(error))
    # The extra `--config` option comes back as a Namespace: drop it.
    return tuple(o for o in outputs if not isinstance(o, argparse.Namespace))
