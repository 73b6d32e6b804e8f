"""Helpers of the robustness tests (full disks, second writers, damaged files); not a test module.

The ``tmpfs`` fixture (conftest.py) mounts small file systems to fill; ``run_cli`` runs the command line
in a real process (exit status, segfaults and tracebacks as a user sees them).
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


class Tmpfs:
    """Small tmpfs mounts for full-disk tests (root only); unmounted at the end of the test."""

    def __init__(self, base: Path):
        self.base, self.mounts = base, []

    def mount(self, size: str) -> Path:
        folder = self.base / f"tmpfs{len(self.mounts)}"
        folder.mkdir(parents=True)
        cmd = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        except FileNotFoundError:
            pytest.skip("no `mount` command here: cannot make a small file system to fill")
        if proc.returncode:
            pytest.skip(f"cannot mount a tmpfs (needs root): {proc.stderr.strip()}")
        self.mounts.append(folder)
        return folder

    @staticmethod
    def resize(folder: Path, size: str) -> None:
        """Make the file system bigger: the space is freed."""
        subprocess.run(["mount", "-o", f"remount,size={size}", str(folder)], check=True, timeout=30)

    def close(self) -> None:
        for folder in self.mounts:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True, timeout=30)


def fill(folder: Path) -> Path:
    """Fill the file system holding ``folder`` to the last byte (as another program would); returns the
    filler file, to delete when the test frees the space."""
    junk = folder / "junk"
    fd = os.open(junk, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return junk


def run_cli(*args, timeout: int = 600) -> subprocess.CompletedProcess:
    """`clotho-retrieve ARGS` in a new process."""
    cmd = [sys.executable, "-m", "clotho_retrieve", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV)


def error_line(output: str, status: int = 1, returncode: int | None = None) -> str:
    """The one `error:` line of a failed command (and no traceback); returns it without the prefix."""
    if returncode is not None:
        assert returncode == status, (returncode, output[-3000:])  # 139 / -11 would be a segfault
    assert "Traceback" not in output, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output[-3000:]
    return errors[0].removeprefix("error: ")


def hold_lock(target: Path | None, hold_open: Path | None = None, mode: str = "a"):
    """Another process that takes the writer's lock of ``target`` (unless None) and holds the HDF5 file
    ``hold_open`` open (mode "a" as `embed`, "r" as a query or a server) until stop(); returns once it
    holds them."""
    script = textwrap.dedent(f"""
        import contextlib, time
        from clotho_retrieve.safety import output_lock
        with output_lock({str(target)!r}) if {target is not None!r} else contextlib.nullcontext():
            if {bool(hold_open)!r}:
                import h5py
                h5 = h5py.File({str(hold_open)!r}, {mode!r})
            print("locked", flush=True)
            time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=ENV)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def stop(proc) -> None:
    proc.kill()
    proc.wait(timeout=30)
