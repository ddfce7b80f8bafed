"""Command-line layer: argument dataclasses parsed with `transformers.HfArgumentParser`.

The library modules never parse arguments; these commands (and `recipes/*.py`, which call
them) do. Every command accepts `--config FILE.yaml` with flags overriding the file (`--config NAME`
names one of the configs shipped in the package, `fit3d_hf/configs/NAME.yaml`, also reachable as
`recipes/configs/` in a checkout, e.g. `fit3d finetune --config finetune_cpu`), and `--threads N`
(`fit3d_hf.threads`, applied before the command runs).
"""

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser

from fit3d_hf.threads import THREADS_HELP, configure_threads

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
    raise FileNotFoundError(f"--config {name}: No such file, and no shipped config of that name (shipped: {names})")


def parse_args(
    dataclass_types: tuple[type, ...],
    argv: list[str] | None,
    prog: str,
    description: str,
    protocols: dict[str, dict[str, Any]] | None = None,
) -> tuple[Any, ...]:
    """Parse `argv` into instances of `dataclass_types` and apply `--threads` (`fit3d_hf.threads`).

    `--protocol NAME` (when the command has `protocols`: name -> field values, e.g. "paper") sets
    defaults; `--config FILE.yaml` (a flat mapping of field names) or `--config NAME` (a shipped
    config, `config_path`) overrides them; flags given on
    the command line override both. Unknown keys in the YAML file are an error naming them. A value
    a dataclass refuses (its `__post_init__`) is a usage error (exit code 2), like a bad flag.
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
    parser.add_argument("--threads", type=int, default=0, help=THREADS_HELP)
    if protocols:
        parser.add_argument(
            "--protocol",
            default=None,
            choices=sorted(protocols),
            help="A named preset of the arguments (paper: the official FiT3D settings, docs/protocol.md); "
            "--config and flags override it.",
        )
    protocol, argv = _pop_option(argv, "--protocol", parser) if protocols else (None, argv)
    config_file, argv = _pop_option(argv, "--config", parser)
    values = {}
    if protocol is not None:
        if protocol not in protocols:
            parser.error(f"--protocol must be one of {sorted(protocols)}, got {protocol!r}")
        values.update(protocols[protocol])
    if config_file is not None:
        try:
            config_file = config_path(config_file)
        except FileNotFoundError as error:
            parser.error(str(error))
        try:
            with open(config_file) as f:
                from_file = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as error:
            parser.error(f"--config {config_file}: {error}")
        if not isinstance(from_file, dict):
            parser.error(f"--config {config_file}: expected a mapping of option names to values")
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(from_file) - known)
        if unknown:
            parser.error(f"{config_file}: unknown keys {unknown}")
        values.update(from_file)
    if values:
        parser.set_defaults(**values)
        # A required field given in the YAML file is no longer required on the command line.
        for action in parser._actions:
            if action.dest in values:
                action.required = False
    try:
        outputs = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=False)
    except ValueError as error:  # a dataclass's own check of the values (e.g. LiftConfig's)
        parser.error(str(error))
    # The extra options (`--config`, `--threads`, `--protocol`) come back as a Namespace.
    (extra,) = [o for o in outputs if isinstance(o, argparse.Namespace)]
    if extra.threads < 0:
        parser.error(f"--threads must be >= 0, got {extra.threads}")
    configure_threads(extra.threads)
    return tuple(o for o in outputs if not isinstance(o, argparse.Namespace))


def _pop_option(argv: list[str], name: str, parser: argparse.ArgumentParser) -> tuple[str | None, list[str]]:
    """The value of `name VALUE` or `name=VALUE` in `argv` (None when absent) and `argv` without it."""
    if name in argv:
        i = argv.index(name)
        if i + 1 >= len(argv):
            parser.error(f"{name} needs a value")
        return argv[i + 1], argv[:i] + argv[i + 2 :]
    arg = next((a for a in argv if a.startswith(name + "=")), None)
    if arg is None:
        return None, argv
    return arg.split("=", 1)[1], [a for a in argv if a is not arg]
