import os
import sys
from dataclasses import dataclass, field

import pytest
import torch
import yaml

from fit3d_hf import threads
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


def test_threads_option_of_every_command(monkeypatch, capsys):
    """`--threads N` sets torch's intra-op threads for any command; 0 keeps the default; negative is an error."""
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    (args,) = parse_args((_Args,), ["--output_dir", "out", "--threads", "1"], "prog", "desc")
    assert args.output_dir == "out" and calls == [1]
    parse_args((_Args,), ["--output_dir", "out"], "prog", "desc")
    assert calls == [1], "--threads 0 (the default) keeps torch's own count"
    with pytest.raises(SystemExit):
        parse_args((_Args,), ["--output_dir", "out", "--threads", "-2"], "prog", "desc")
    assert "--threads" in capsys.readouterr().err


def test_openmp_waits_passively_unless_torch_is_loaded_or_the_user_chose(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    threads.prepare_openmp()  # torch is loaded here: too late for OpenMP, so nothing is set
    assert "OMP_WAIT_POLICY" not in os.environ
    monkeypatch.delitem(sys.modules, "torch")
    threads.prepare_openmp()
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    threads.prepare_openmp()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def test_config_names_a_shipped_config(tmp_path, capsys):
    from fit3d_hf.commands import CONFIGS_DIR, config_path
    from fit3d_hf.commands.finetune import FinetuneArguments
    from fit3d_hf.finetune import FinetuneConfig

    assert config_path("finetune_cpu") == config_path("finetune_cpu.yaml") == str(CONFIGS_DIR / "finetune_cpu.yaml")
    local = tmp_path / "finetune_cpu"  # an existing file wins over a shipped name
    local.write_text("max_steps: 3\n")
    assert config_path(str(local)) == str(local)
    shipped = yaml.safe_load((CONFIGS_DIR / "finetune_cpu.yaml").read_text())
    _, config = parse_args(
        (FinetuneArguments, FinetuneConfig), ["--config", "finetune_cpu", "--dataset", "d", "--output_dir", "o"], "p", "d"
    )
    assert all(getattr(config, key) == value for key, value in shipped.items() if hasattr(config, key))
    with pytest.raises(SystemExit):
        parse_args((FinetuneArguments, FinetuneConfig), ["--config", "no_such_preset"], "p", "d")
    assert "shipped: [" in capsys.readouterr().err


def test_console_script_returns_nothing(monkeypatch):
    """`sys.exit(main())` in the console wrapper would print a command's result and exit with 1."""
    from fit3d_hf import cli

    monkeypatch.setattr(cli, "run_command", lambda name, argv: {"a": "command's result"})
    assert cli.main(["finetune"]) is None
