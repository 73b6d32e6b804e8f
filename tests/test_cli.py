"""The CLI skeleton: pipeline order in --help, --version, error reporting without tracebacks."""

from __future__ import annotations

import subprocess
import sys

from typer.testing import CliRunner

from clotho_retrieve import __version__
from clotho_retrieve.cli import app

runner = CliRunner()

PIPELINE = ["download", "features", "train", "evaluate", "embed", "query"]


def test_help_lists_pipeline_in_order():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    positions = [result.output.index(name) for name in PIPELINE]
    assert positions == sorted(positions), result.output


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert __version__ in result.output


def test_module_entry_point_runs():
    proc = subprocess.run(
        [sys.executable, "-m", "clotho_retrieve", "--version"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"clotho-retrieve {__version__}"
