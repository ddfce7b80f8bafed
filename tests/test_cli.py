from dataclasses import dataclass, field

import pytest
import yaml

from fit3d_hf.cli import COMMANDS, main
from fit3d_hf.commands import parse_args


@dataclass
class _Args:
    output_dir: str = field(metadata={"help": "where to write"})
    steps: int = 10
    lr: float = 1e-5


def test_yaml_sets_defaults_and_flags_override(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"output_dir": "out", "steps": 3}))
    (args,) = parse_args((_Args,), ["--config", str(config), "--lr", "0.1"], "prog", "desc")
    assert (args.output_dir, args.steps, args.lr) == ("out", 3, 0.1)
    (args,) = parse_args((_Args,), [f"--config={config}", "--steps", "7"], "prog", "desc")
    assert (args.output_dir, args.steps) == ("out", 7)


def test_unknown_yaml_key_is_an_error_naming_it(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"output_dri": "out"}))
    with pytest.raises(SystemExit):
        parse_args((_Args,), ["--config", str(config)], "prog", "desc")
    assert "output_dri" in capsys.readouterr().err


def test_required_field_missing_is_an_error(capsys):
    with pytest.raises(SystemExit):
        parse_args((_Args,), [], "prog", "desc")
    assert "--output_dir" in capsys.readouterr().err


def test_cli_lists_every_command(capsys):
    main([])
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)
    with pytest.raises(SystemExit, match="unknown command"):
        main(["no-such-command"])


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_help(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    assert "usage" in capsys.readouterr().out
