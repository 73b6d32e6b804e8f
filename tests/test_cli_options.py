"""`train` and `table` options come from the config dataclasses: each shows its field's default and help,
so the command line and the Python API cannot drift apart; values reach the configs parsed."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import typer
import typer.rich_utils
from typer.testing import CliRunner

from clotho_retrieve.cli import app
from clotho_retrieve.config import ModelConfig, TableConfig, TrainConfig

COMMANDS = {"train": (TrainConfig, ModelConfig), "table": (TableConfig, TrainConfig, ModelConfig)}


def _cli_fields(*classes) -> set[str]:
    return {f.name for cls in classes for f in dataclasses.fields(cls) if f.metadata.get("cli", True)}


def _shown_default(f: dataclasses.Field) -> str | None:
    """How --help shows a field's default (None: no default shown)."""
    if f.default is None:
        return None
    if isinstance(f.default, bool):
        return ("" if f.default else "no-") + f.name.replace("_", "-")
    if isinstance(f.default, tuple):
        return ",".join(f.default)
    return str(f.default)


def _help_lines(command: str, monkeypatch) -> list[str]:
    monkeypatch.setattr(typer.rich_utils, "MAX_WIDTH", 500)  # one line per option
    result = CliRunner().invoke(app, [command, "--help"], terminal_width=500)
    assert result.exit_code == 0, result.output
    return result.output.splitlines()


def test_train_offers_every_model_and_training_setting():
    click_cmd = typer.main.get_command(app).commands["train"]
    options = {p.name for p in click_cmd.params} - {"help"}
    assert options == _cli_fields(TrainConfig, ModelConfig)
    assert "front_end" not in options and "n_mels" not in options  # taken from the features


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_option_shows_its_fields_default_and_help(command, monkeypatch):
    click_cmd = typer.main.get_command(app).commands[command]
    targets = click_cmd.callback.config_targets  # which fields the command offers (cli.py)
    assert tuple(spec.cls for spec in targets.values()) == COMMANDS[command]
    offered = {f.name: (spec, f) for spec in targets.values() for f in spec.fields()}
    options = [p for p in click_cmd.params if p.name != "help"]
    assert sorted(p.name for p in options) == sorted(offered)  # every option is exactly one field
    lines = _help_lines(command, monkeypatch)
    for param in options:
        spec, f = offered[param.name]
        help_text = f.metadata["help"]
        assert help_text and param.help == help_text, param.name
        flag = "--" + f.name.replace("_", "-")
        (line,) = [s for s in lines if re.match(rf"^│\s*\*?\s*{re.escape(flag)}(\s|$)", s)]
        assert help_text in line, (flag, line)
        if f.name in spec.required or f.default is dataclasses.MISSING:
            assert "[required]" in line, line
        elif _shown_default(f) is None:
            assert "[default:" not in line, line
        else:
            assert f"[default: {_shown_default(f)}]" in line, line


def test_train_options_reach_the_configs_parsed(monkeypatch, tmp_path):
    import clotho_retrieve.train

    monkeypatch.chdir(tmp_path)  # the workspace records the run it started
    calls = []
    monkeypatch.setattr(clotho_retrieve.train, "train", lambda m, t: calls.append((m, t)) or Path(t.out))
    args = ["train", "--out", "runs/x", "--backbone", "tiny", "--train-splits", "development, validation",
            "--val-split", "none", "--no-spec-augment", "--lr", "0.001", "--attention", "gat",
            "--resume"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    ((model_cfg, train_cfg),) = calls
    assert isinstance(model_cfg, ModelConfig) and isinstance(train_cfg, TrainConfig)
    assert (model_cfg.backbone, model_cfg.attention, model_cfg.embed_dim) == ("tiny", "gat", 1024)
    assert train_cfg.train_splits == ("development", "validation")
    assert train_cfg.val_split is None and train_cfg.audio_weights is None
    assert (train_cfg.spec_augment, train_cfg.resume, train_cfg.lr) == (False, True, 0.001)
    # --resume without --features keeps the run's own (None here: checkpoints.load_resume_config)
    assert (train_cfg.out, train_cfg.features, train_cfg.batch_size) == ("runs/x", None, 60)


def test_train_without_features_names_the_stage_to_run(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CLOTHO_RETRIEVE_WORKSPACE", raising=False)
    result = CliRunner().invoke(app, ["train"])
    assert result.exit_code == 1
    assert "no features in data/features; run: clotho-retrieve features" in result.output
