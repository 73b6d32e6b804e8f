"""Writing safely, for every stage that writes: one writer per output, disk space checked (and reserved)
before large writes, a failed write as one line, HDF5 files closed carefully, workers that die with us.

* Locks: :func:`output_lock` takes an exclusive ``fcntl.flock`` on ``.NAME.lock`` beside an output (a
  file or a folder), re-entrant within a process and released when the process ends, however it ends.
  A second writer gets one line naming the process that holds it (:class:`OutputBusy`);
  :func:`lock_holder` tells a reader whether someone is writing.
* Space: :func:`check_space` refuses a write of a known size that would not fit; :func:`reserve_space`
  also allocates it beyond the end of a file (``fallocate`` with ``FALLOC_FL_KEEP_SIZE``) so that a
  library writing in place (HDF5) never meets a full disk half-way through a chunk; :func:`release_space`
  gives back what was not used. :func:`write_failed` turns an ``OSError`` (ENOSPC above all) into a
  :class:`ClothoRetrieveError` that names the path and the space needed.
* HDF5 after a failed write: :func:`close_h5` closes a file whose writes failed without letting the
  library crash later (it keeps the handle alive and ``hard_exit`` ends the CLI before HDF5's own
  clean-up at exit, which can segfault on such a file).
* Workers: :func:`die_with_parent` (Linux ``prctl(PR_SET_PDEATHSIG)``): a worker process ends when its
  parent does; :func:`end_with` ends a forkserver's worker (and the forkserver) when the process that
  made the pool ends. So ``kill -9`` of a stage leaves no process behind.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import re
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

from clotho_retrieve.utils import ClothoRetrieveError, free_bytes

SPACE_MARGIN = 64 << 10  # bytes kept free beyond an estimate (file-system and HDF5 metadata)
NO_SPACE = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


# ----------------------------------------------------------------------------------------------
# One writer per output
# ----------------------------------------------------------------------------------------------
class OutputBusy(ClothoRetrieveError):
    """Another process is writing this output."""


_held: dict[str, list] = {}  # lock path -> [fd, depth]: locks this process holds (re-entrant)


def lock_path(target: str | os.PathLike) -> Path:
    """``.NAME.lock`` beside the output ``target`` (a file or a folder; it need not exist yet)."""
    target = Path(target).absolute()
    return target.parent / f".{target.name}.lock"


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text(encoding="ascii").split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _busy(target: Path, pid: int | None) -> OutputBusy:
    who = f"process {pid}" if pid else "another process"
    return OutputBusy(f"{target} is being written by {who}; wait for it or choose another --out")


@contextlib.contextmanager
def output_lock(target: str | os.PathLike) -> Iterator[Path]:
    """Hold the exclusive writer's lock of ``target`` for the block; raise OutputBusy when another process
    holds it. Nested blocks on the same target in one process share the lock."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system: no lock (the rest works as before)
        yield lock_path(target)
        return
    path = lock_path(target)
    key = str(path)
    if key in _held:
        _held[key][1] += 1
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _busy(Path(target), _read_pid(path)) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        _held[key] = [fd, 1]
    try:
        yield path
    finally:
        _held[key][1] -= 1
        if _held[key][1] == 0:
            os.close(_held.pop(key)[0])  # closing the descriptor releases the lock


def lock_holder(target: str | os.PathLike) -> int | None:
    """The PID of the process writing ``target`` now (holding its lock), else None."""
    try:
        import fcntl
    except ImportError:
        return None
    path = lock_path(target)
    if str(path) in _held:
        return os.getpid()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read_pid(path) or -1
    finally:
        os.close(fd)  # also drops the shared lock when it was granted
    return None


# ----------------------------------------------------------------------------------------------
# Disk space
# ----------------------------------------------------------------------------------------------
def human(n: float) -> str:
    """Bytes for people: 512 B, 1.4 MB, 2.31 GB (powers of 1000, as `df -H`)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.{2 if unit == 'GB' else 1}f} {unit}"
    return f"{int(n)} B"


RERUN = "re-run to continue"


class NoSpace(ClothoRetrieveError):
    """A write that does not fit on the disk (the message names the path and the space needed)."""


def no_space(path: str | os.PathLike, needed: int | None, what: str, then: str = RERUN) -> NoSpace:
    """The one-line error for a write that does not fit: the path, the space needed, what is free, and
    ``then``, what to do once space is freed."""
    free = free_bytes(Path(path).parent)
    need = f"needs about {human(needed)}, " if needed else ""
    return NoSpace(f"{path}: not enough disk space for {what} ({need}{human(free)} free); free some space "
                   f"and {then}")


def check_space(path: str | os.PathLike, needed: int, what: str, then: str = RERUN) -> None:
    """Refuse (one line, nothing written) when ``needed`` bytes and a margin do not fit beside ``path``."""
    if needed + SPACE_MARGIN > free_bytes(Path(path).parent):
        raise no_space(path, needed + SPACE_MARGIN, what, then)


def _fallocate(fd: int, mode: int, offset: int, length: int) -> int:
    """libc fallocate(2); 0 or an errno (EOPNOTSUPP where the file system or platform has none)."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.fallocate
    except (OSError, AttributeError):
        return errno.EOPNOTSUPP
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    return 0 if fn(fd, mode, offset, length) == 0 else ctypes.get_errno()


_KEEP_SIZE, _PUNCH_HOLE = 0x01, 0x02  # linux/falloc.h


def reserve_space(
    path: str | os.PathLike, needed: int, what: str, then: str = RERUN, shown: str | os.PathLike | None = None
) -> None:
    """Make sure the next ``needed`` bytes written at the end of the existing file ``path`` will fit.

    Checks the free space, then allocates it (plus SPACE_MARGIN) beyond the file's end without changing
    its size (Linux fallocate KEEP_SIZE), so writes there cannot fail for want of space; elsewhere, or
    on a file system without fallocate, the check only. Raises the one-line error of :func:`no_space`
    before anything is written (naming ``shown``, by default ``path``).
    """
    shown = shown or path
    check_space(shown, needed, what, then)
    if not sys.platform.startswith("linux"):
        return
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        err = _fallocate(fd, _KEEP_SIZE, os.fstat(fd).st_size, int(needed) + SPACE_MARGIN)
    finally:
        os.close(fd)
    if err in NO_SPACE:
        raise no_space(shown, int(needed) + SPACE_MARGIN, what, then)


def release_space(path: str | os.PathLike) -> None:
    """Give back what :func:`reserve_space` allocated beyond the end of ``path`` and was not used."""
    if not sys.platform.startswith("linux"):
        return
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return
    try:
        _fallocate(fd, _PUNCH_HOLE | _KEEP_SIZE, os.fstat(fd).st_size, 1 << 50)
    finally:
        os.close(fd)


def h5_growth(ds, new_rows: int, payload: int = 0) -> int:
    """Bytes HDF5 allocates when the chunked dataset ``ds`` grows by ``new_rows`` rows along axis 0:
    whole new chunks (plus chunk-index entries), and ``payload`` bytes of variable-length strings."""
    if ds.chunks is None:  # contiguous: written in place, nothing allocated
        return 0
    rows = ds.chunks[0]
    new_chunks = math.ceil((ds.shape[0] + new_rows) / rows) - math.ceil(ds.shape[0] / rows)
    itemsize = 16 if ds.dtype.kind == "O" else ds.dtype.itemsize  # a vlen string: a 16-byte heap id
    chunk_bytes = math.prod(ds.chunks) * itemsize
    strings = (2 * payload + 64 * new_rows + 8192) if payload else 0  # global heap collections
    return new_chunks * (chunk_bytes + 64) + strings


# ----------------------------------------------------------------------------------------------
# Failed writes
# ----------------------------------------------------------------------------------------------
def errno_of(exc: BaseException) -> int | None:
    """The errno of an OSError, or of the HDF5 error h5py raises as RuntimeError ("errno = 28")."""
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    match = re.search(r"(?:errno = |\[Errno |Os \{ code: )(\d+)", str(exc))  # h5py, OSError text, Rust
    return int(match.group(1)) if match else None


def is_write_error(exc: BaseException) -> bool:
    """An OSError, or an h5py RuntimeError that reports a failed write or flush."""
    if isinstance(exc, OSError):
        return True
    return isinstance(exc, RuntimeError) and errno_of(exc) is not None


def write_failed(
    exc: BaseException, path: str | os.PathLike, what: str, needed: int | None = None, then: str = RERUN
) -> ClothoRetrieveError:
    """A ClothoRetrieveError for a write of ``what`` into ``path`` that raised ``exc``."""
    if errno_of(exc) in NO_SPACE:
        return no_space(path, needed, what, then)
    reason = getattr(exc, "strerror", None) or " ".join(str(exc).split())[:200]
    return ClothoRetrieveError(f"{path}: could not write {what} ({reason}); fix that and {then}")


@contextlib.contextmanager
def writes(path: str | os.PathLike, what: str, needed: int | None = None, then: str = RERUN) -> Iterator:
    """Turn an OSError of the block (a full disk above all) into the one line of :func:`write_failed`."""
    try:
        yield
    except OSError as exc:
        raise write_failed(exc, path, what, needed, then) from None


_poisoned: list = []  # HDF5 handles whose close failed: kept alive, never closed by the garbage collector


def close_h5(h5) -> Exception | None:
    """Close an h5py File; None when it closed cleanly, else what closing raised. Then (its writes
    failed before) the handle is kept alive and :func:`hdf5_poisoned` turns true: the CLI ends with
    :func:`hard_exit`, before HDF5's clean-up at exit could crash on the damaged handle."""
    if h5 is None:
        return None
    try:
        h5.close()
        return None
    except Exception as exc:  # noqa: BLE001 - whatever HDF5 reports, the handle is not usable any more
        _poisoned.append(h5)
        return exc


@contextlib.contextmanager
def h5_new_file(tmp: Path, needed: int, what: str, shown: Path, then: str = RERUN):
    """A new HDF5 file at ``tmp`` (to be renamed to ``shown``) with ``needed`` bytes checked and reserved.
    A failed write (a full disk above all) closes it with care and becomes one line naming ``shown``."""
    import h5py

    try:
        h5 = h5py.File(tmp, "w", rdcc_nbytes=0)  # no chunk cache: a failed write raises where it happens
    except OSError as exc:
        raise write_failed(exc, shown, what, needed, then) from None
    try:
        reserve_space(tmp, needed, what, then, shown)
        yield h5
    except BaseException as exc:
        close_h5(h5)
        if is_write_error(exc):
            raise write_failed(exc, shown, what, needed, then) from None
        raise
    failed = close_h5(h5)
    release_space(tmp)
    if failed is not None:
        raise write_failed(failed, shown, what, needed, then)


def hdf5_poisoned() -> bool:
    return bool(_poisoned)


def hard_exit(code: int) -> None:
    """Flush the standard streams and end the process now, skipping interpreter clean-up."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


# ----------------------------------------------------------------------------------------------
# Worker processes
# ----------------------------------------------------------------------------------------------
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Have the kernel send ``sig`` to this process when its parent ends (Linux; elsewhere a no-op).

    Returns True when set. If the parent already ended (this process was re-parented), exit at once."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)
    return True


def _wait_for_exit(pid: int) -> None:
    """Block until process ``pid`` has ended (a pidfd where the platform has one, else polling)."""
    import select
    import time

    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except (AttributeError, OSError):
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            except PermissionError:
                pass
            time.sleep(1.0)
    try:
        select.select([fd], [], [])  # a pidfd becomes readable when its process ends
    finally:
        os.close(fd)


def end_with(pid: int) -> None:
    """In a pool worker: end this process when process ``pid`` (the one that made the pool) ends.

    A forkserver worker's parent is the forkserver, not ``pid``: then the forkserver is ended too (its
    other workers follow it by :func:`die_with_parent`), and with them multiprocessing's resource
    tracker, which exits once nobody holds its pipe. A daemon thread waits; nothing polls."""
    import threading

    server = os.getppid()

    def watch() -> None:
        _wait_for_exit(pid)
        if server not in (pid, 0, 1) and os.getppid() == server:
            with contextlib.suppress(OSError):
                os.kill(server, signal.SIGKILL)
        os._exit(1)

    threading.Thread(target=watch, name="end-with-parent", daemon=True).start()
