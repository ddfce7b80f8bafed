"""Command-line layer: argument dataclasses parsed with `transformers.HfArgumentParser`.

The library modules never parse arguments; these commands (and `recipes/*.py`, which call
them) do. Every command accepts `--config FILE.yaml` with flags overriding the file; `--config NAME`
names one of the configs shipped in the package (`fit3d_hf/configs/NAME.yaml`, also reachable as
`recipes/configs/` in a checkout), e.g. `fit3d finetune --config finetune_cpu`.
"""

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"


def config_path(name: str) -> str:
    """The file a `--config` value means: an existing file as given, else the shipped config `NAME`
    (with or without `.yaml`), e.g. `config_path("accelerate_cpu_2proc")` for `accelerate launch --config_file`."""
    if os.path.isfile(name):
        return name
    shipped = CONFIGS_DIR / (name if name.endswith(".yaml") else f"{name}.yaml")
    if shipped.is_file():
        return str(shipped)
    names = sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml"))
    raise FileNotFoundError(f"--config {name}: no such file, and no shipped config of that name (shipped: {names})")


def parse_args(dataclass_types: tuple[type, ...], argv: list[str] | None, prog: str, description: str) -> tuple[Any, ...]:
    """Parse `argv` into instances of `dataclass_types`.

    `--config FILE.yaml` (a flat mapping of field names) or `--config NAME` (a shipped config,
    `config_path`) sets defaults; flags given on the command line override it. Unknown keys in the
    YAML file are an error naming them.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    # Raw formatting keeps the example commands in a command's description on their own lines.
    parser = HfArgumentParser(
        dataclass_types, prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config",
        default=None,
        help="YAML file of arguments, or the name of a shipped one (fit3d_hf/configs); flags override it.",
    )
    config_file = None
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            parser.error("--config needs a file path")
        config_file = argv[i + 1]
        argv = argv[:i] + argv[i + 2 :]
    elif any(a.startswith("--config=") for a in argv):
        arg = next(a for a in argv if a.startswith("--config="))
        config_file = arg.split("=", 1)[1]
        argv = [a for a in argv if a is not arg]
    if config_file is not None:
        try:
            config_file = config_path(config_file)
        except FileNotFoundError as error:
            parser.error(str(error))
        with open(config_file) as f:
            values = yaml.safe_load(f) or {}
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(values) - known)
        if unknown:
            parser.error(f"{config_file}: unknown keys {unknown}")
        parser.set_defaults(**values)
        # A required field given in the YAML file is no longer required on the command line.
        for action in parser._actions:
            if action.dest in values:
                action.required = False
    outputs = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=False)
    # The extra `--config` option comes back as a Namespace: drop it.
    return tuple(o for o in outputs if not isinstance(o, argparse.Namespace))
