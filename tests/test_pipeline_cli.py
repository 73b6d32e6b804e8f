"""The pipeline chains as users type it: bare commands in a workspace, no path options (issue 9).

Each command run too early says which command to run first; the bare chain demo-data -> features ->
train --attention gat -> evaluate -> embed -> query "dog barking in rain" then runs without a path;
a second run of the same variant gets its own folder; `status` shows every stage.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from clotho_retrieve.cli import app

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

runner = CliRunner()


@pytest.fixture(autouse=True)
def in_workspace(tmp_path, monkeypatch):
    """Users type the stages bare, in the workspace folder."""
    monkeypatch.delenv("CLOTHO_RETRIEVE_WORKSPACE", raising=False)
    monkeypatch.chdir(tmp_path)


def cli(ws: Path, *args: str):
    """`clotho-retrieve ARGS...` typed in the workspace folder ``ws`` (the current folder)."""
    assert Path.cwd() == ws
    return runner.invoke(app, list(args))


def tiny_train(minilm: str) -> list[str]:
    return ["--backbone", "tiny", "--d-a", "32", "--embed-dim", "16", "--text-model", minilm,
            "--text-trainable-layers", "0", "--epochs", "1", "--batch-size", "6", "--lr", "1e-3",
            "--warmup-epochs", "0", "--eval-batch-size", "3", "--dropout", "0"]  # fmt: skip


def test_each_stage_run_too_early_names_the_command_to_run(tmp_path):
    expected = {
        ("query", "dog barking in rain"): "no index in indexes; run: clotho-retrieve",
        ("embed",): "no finished run in runs; run: clotho-retrieve",
        ("evaluate",): "no finished run in runs; run: clotho-retrieve",
        ("train", "--attention", "gat"): "no features in data/features; run: clotho-retrieve",
        ("features",): "no Clotho in data/clotho; run: clotho-retrieve",
    }
    for args, message in expected.items():
        result = cli(tmp_path, *args)
        assert result.exit_code == 1, (args, result.output)
        assert message in " ".join(result.output.split()), (args, result.output)
        assert "Traceback" not in result.output
    # nothing was left behind by the refused commands (no reserved run folder, no index folder)
    assert not (tmp_path / "runs").exists() or not any(p.is_dir() for p in (tmp_path / "runs").iterdir())
    # elsewhere, --workspace names the folder, and the suggested command carries it
    result = runner.invoke(app, ["--workspace", str(tmp_path / "elsewhere"), "query", "rain"])
    assert result.exit_code == 1
    suggested = f"run: clotho-retrieve --workspace {tmp_path / 'elsewhere'} embed"
    assert suggested in " ".join(result.output.split())


def test_the_bare_chain_runs_with_no_path_options(tmp_path, minilm_path):
    ws = tmp_path
    tiny = ["--n-development", "6", "--n-validation", "3", "--n-evaluation", "3", "--duration", "1"]
    assert cli(ws, "demo-data", *tiny).exit_code == 0
    assert (ws / "data/clotho/evaluation").is_dir()
    assert cli(ws, "features", "--workers", "1").exit_code == 0
    assert sorted(p.name for p in (ws / "data/features").glob("*.h5")) == [
        "development.h5", "evaluation.h5", "validation.h5"]  # fmt: skip

    first = cli(ws, "train", "--attention", "gat", *tiny_train(minilm_path))
    assert first.exit_code == 0, first.output
    second = cli(ws, "train", "--attention", "gat", *tiny_train(minilm_path))
    assert second.exit_code == 0, second.output
    runs = sorted(p.name for p in (ws / "runs").iterdir() if not p.name.startswith("."))  # .NAME.lock
    assert runs == ["gat-ntxent", "gat-ntxent-2"]  # the second run did not overwrite the first
    assert (ws / "runs/gat-ntxent/best/model.safetensors").is_file()

    evaluated = cli(ws, "evaluate", "--json")
    assert evaluated.exit_code == 0, evaluated.output
    result = json.loads(evaluated.output)
    assert Path(result["run"]).name == "gat-ntxent-2"  # the latest finished run
    assert Path(result["features"]).name == "evaluation.h5" and result["n_clips"] == 3

    embedded = cli(ws, "embed")
    assert embedded.exit_code == 0, embedded.output
    assert (ws / "indexes/gat-ntxent-2/index.h5").is_file()

    queried = cli(ws, "query", "dog barking in rain", "--json", "--top-k", "2")
    assert queried.exit_code == 0, queried.output
    answer = json.loads(queried.output.strip().splitlines()[-1])
    assert answer["query"] == "dog barking in rain" and len(answer["hits"]) == 2

    status = cli(ws, "status", "--json")
    assert status.exit_code == 0, status.output
    st = json.loads(status.output)
    assert [s["split"] for s in st["clotho"]["splits"]] == ["development", "validation", "evaluation"]
    assert len(st["features"]["files"]) == 3
    assert {r["state"] for r in st["runs"]} == {"finished"}
    assert len(st["indexes"]) == 1 and "query" in st["next"]


def test_resume_without_out_continues_the_latest_started_run(tmp_path, minilm_path):
    ws = tmp_path
    tiny = ["--n-development", "6", "--n-validation", "3", "--n-evaluation", "3", "--duration", "1"]
    assert cli(ws, "demo-data", *tiny).exit_code == 0
    assert cli(ws, "features", "--workers", "1").exit_code == 0
    assert cli(ws, "train", "--attention", "self", *tiny_train(minilm_path)).exit_code == 0
    refused = cli(ws, "train", "--resume", "--epochs", "2")  # epochs set the schedule: saved ones only
    assert refused.exit_code == 1 and "--epochs 2 (saved: 1)" in " ".join(refused.output.split())
    resumed = cli(ws, "train", "--resume")  # the latest started run, already finished: nothing to do
    assert resumed.exit_code == 0, resumed.output
    lines = (ws / "runs/self-ntxent/metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1]
    assert sorted(p.name for p in (ws / "runs").iterdir() if not p.name.startswith(".")) == ["self-ntxent"]
