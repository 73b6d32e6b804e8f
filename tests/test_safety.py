"""safety: writer locks between real processes, disk space checked and reserved (a real full tmpfs and an
injected ENOSPC), HDF5 writes that cannot meet a full disk half-way, workers that die with their parent."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from robust_helpers import fill, hold_lock, stop

from clotho_retrieve import safety
from clotho_retrieve.safety import (
    OutputBusy,
    check_space,
    errno_of,
    lock_holder,
    output_lock,
    release_space,
    reserve_space,
    write_failed,
)
from clotho_retrieve.utils import ClothoRetrieveError


# ----------------------------------------------------------------------------------------------
# Locks
# ----------------------------------------------------------------------------------------------
def test_a_second_writer_is_refused_with_the_holders_pid_until_it_ends(tmp_path):
    out = tmp_path / "index"
    holder = hold_lock(out)
    try:
        assert lock_holder(out) == holder.pid
        with pytest.raises(OutputBusy) as info:
            with output_lock(out):
                pass
        assert str(info.value) == (
            f"{out} is being written by process {holder.pid}; wait for it or choose another --out"
        )
    finally:
        stop(holder)  # kill -9: the kernel releases the lock with the process
    assert lock_holder(out) is None
    with output_lock(out) as lock:
        assert lock == tmp_path / ".index.lock" and lock_holder(out) == os.getpid()
        with output_lock(out):  # re-entrant within a process (embed -> index)
            pass
        assert lock_holder(out) == os.getpid()
    assert lock_holder(out) is None and not out.exists()  # the output itself is not created


# ----------------------------------------------------------------------------------------------
# Space
# ----------------------------------------------------------------------------------------------
def test_space_checks_name_the_path_and_the_space_needed(tmp_path, monkeypatch):
    target = tmp_path / "out.h5"
    monkeypatch.setattr(safety, "free_bytes", lambda folder: 1_500_000)
    check_space(target, 1_000_000, "the features file")  # fits with the margin
    with pytest.raises(ClothoRetrieveError) as info:
        check_space(target, 2_000_000, "the features file")
    assert str(info.value) == (
        f"{target}: not enough disk space for the features file (needs about 2.1 MB, 1.5 MB free); "
        "free some space and re-run to continue"
    )
    # an ENOSPC from fallocate (the space went meanwhile) is the same one line, before anything is written
    target.write_bytes(b"x" * 100)
    monkeypatch.setattr(safety, "_fallocate", lambda *a: errno.ENOSPC)
    with pytest.raises(ClothoRetrieveError, match=r"out\.h5: not enough disk space for 3 clips \(needs"):
        reserve_space(target, 1000, "3 clips")
    assert target.read_bytes() == b"x" * 100


def test_errors_of_every_writer_are_recognised():
    h5py_message = "Unable to flush file (file write failed: time = ..., errno = 28, error message = ...)"
    assert errno_of(RuntimeError(h5py_message)) == errno.ENOSPC
    assert errno_of(OSError(errno.ENOSPC, "No space left on device")) == errno.ENOSPC
    assert errno_of(Exception('IoError(Os { code: 28, kind: StorageFull, message: "No space" })')) == 28
    assert errno_of(RuntimeError("PytorchStreamWriter failed writing file data/0")) is None
    assert safety.is_write_error(RuntimeError(h5py_message))
    assert not safety.is_write_error(RuntimeError("a bug"))
    err = write_failed(OSError(errno.EACCES, "Permission denied"), "/ro/x.h5", "the index")
    assert str(err) == (
        "/ro/x.h5: could not write the index (Permission denied); fix that and re-run to continue"
    )


def test_reserved_space_lets_hdf5_finish_a_chunk_on_a_full_disk(tmpfs):
    """The mechanism of the index writer: reserve, then fill the disk (another process), then write."""
    folder = tmpfs.mount("2m")
    path = folder / "x.h5"
    with h5py.File(path, "w") as h5:
        h5.create_dataset("a", (0, 16), np.float32, maxshape=(None, 16), chunks=(256, 16))
    h5 = h5py.File(path, "a")
    rows = np.random.default_rng(0).random((3 * 256, 16), dtype=np.float32)
    for i in range(3):
        reserve_space(path, 64 << 10, "a chunk")
        if i == 1:
            junk = fill(folder)  # the disk is full now, but this chunk's space is ours
        ds = h5["a"]
        ds.resize((i + 1) * 256, axis=0)
        ds[i * 256 :] = rows[i * 256 : (i + 1) * 256]
        h5.flush()
        if i == 1:
            with pytest.raises(ClothoRetrieveError, match="x.h5: not enough disk space for a chunk"):
                reserve_space(path, 64 << 10, "a chunk")  # the next one is refused before any write
            break
    h5.close()
    release_space(path)
    assert os.stat(path).st_blocks * 512 < os.stat(path).st_size + (64 << 10)  # the rest given back
    junk.unlink()
    with h5py.File(path, "r") as h5:
        np.testing.assert_array_equal(h5["a"][:], rows[: 2 * 256])


# ----------------------------------------------------------------------------------------------
# Worker processes
# ----------------------------------------------------------------------------------------------
def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_PDEATHSIG) is Linux only")
def test_workers_end_with_the_process_that_made_them(tmp_path):
    """As in a forkserver pool: the top process forks a server, the server forks workers. A worker that
    called end_with(top) ends when top does and takes the server down; the server's other workers
    (die_with_parent) follow it. Nothing survives a kill -9 of top."""
    script = textwrap.dedent("""
        import os, sys, time
        from clotho_retrieve.safety import die_with_parent, end_with
        top = os.getpid()
        if os.fork() == 0:                    # the "forkserver": no safeguard of its own
            for watch in (True, False):
                if os.fork() == 0:            # a worker
                    die_with_parent()
                    if watch:
                        end_with(top)
                    os.write(1, f"{os.getppid()} {os.getpid()}\\n".encode())  # one write: no interleaving
                    time.sleep(600)
                    os._exit(0)
            time.sleep(600)
            os._exit(0)
        time.sleep(600)
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    (server, first), (_, second) = (map(int, proc.stdout.readline().split()) for _ in range(2))
    assert all(_alive(pid) for pid in (server, first, second))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.time() + 20
    while time.time() < deadline and any(_alive(pid) for pid in (server, first, second)):
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in (server, first, second))


def test_any_failed_write_of_a_command_is_one_line(tmp_path, monkeypatch):
    """The CLI's last line of defence: an OSError no writer turned into a message still ends as one line."""
    from robust_helpers import error_line
    from typer.testing import CliRunner

    import clotho_retrieve.demo
    from clotho_retrieve.cli import app

    wav = tmp_path / "demo" / "development" / "x.wav"
    for exc, expected in (
        (OSError(errno.ENOSPC, "No space left on device", str(wav)),
         f"{wav}: not enough disk space for what `demo-data` writes ("),
        (PermissionError(errno.EACCES, "Permission denied", str(wav)), f"{wav}: Permission denied"),
    ):
        def fail(*args, exc=exc, **kw):
            raise exc

        monkeypatch.setattr(clotho_retrieve.demo, "make_demo_data", fail)
        result = CliRunner().invoke(app, ["demo-data", "--out", str(tmp_path / "demo")])
        assert error_line(result.output, returncode=result.exit_code).startswith(expected)
