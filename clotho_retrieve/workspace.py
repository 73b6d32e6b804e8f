"""The workspace: where every stage of the pipeline reads and writes when it is not told.

One folder holds the whole pipeline by convention. Its root is the ``--workspace`` option, else the
environment variable ``CLOTHO_RETRIEVE_WORKSPACE``, else the current folder::

    ROOT/data/clotho/            CLOTHO    Clotho v2.1 (`download`, `demo-data`): SPLIT/*.wav and the CSVs
    ROOT/data/features/          FEATURES  log-Mel HDF5 files (`features`): development.h5, ..., evaluation.h5
    ROOT/runs/NAME/              RUNS      training runs (`train`): NAME = ATTENTION-LOSS, then -2, -3, ...
    ROOT/indexes/NAME/           INDEXES   embedding indexes (`embed`): NAME = the name of the run embedded
    ROOT/.clotho-retrieve/latest.json      STATE: which stages finished (and which runs started), in order
    ROOT/.clotho-retrieve/torchrun-*.json  under torchrun: the run folder process 0 chose, for the others

Every default goes through a :class:`Workspace`. When the stage a command needs has not run, the
resolver raises ClothoRetrieveError with one line naming the command to run, e.g.
``no features in data/features; run: clotho-retrieve features``.

"Latest" is recorded, never guessed from folders. ``latest.json`` lists per kind (run | index |
features) the folders whose stage returned normally, oldest first (``record_latest``), and under
``started`` the runs `train` began (``record_started``, what ``train --resume`` continues). It is
read, changed and written back under a lock file, by a rename, so a reader sees the old list or the
new one. A recorded run is taken as finished only while it still verifies: ``best/`` holds weights and
``metrics.jsonl`` reaches the epochs planned in ``config.json``. A killed `train` is never recorded, and
a finished run resumed with more epochs and killed is unfinished again: the run finished before it is
then the latest.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shlex
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from clotho_retrieve.datasets.clotho import SPLITS
from clotho_retrieve.utils import ClothoRetrieveError, atomic_write_text

ENV_VAR = "CLOTHO_RETRIEVE_WORKSPACE"
CLOTHO = Path("data", "clotho")
FEATURES = Path("data", "features")
RUNS = Path("runs")
INDEXES = Path("indexes")
STATE_DIR = Path(".clotho-retrieve")
STATE = STATE_DIR / "latest.json"
LOCK = STATE_DIR / "lock"
STATE_FORMAT = "clotho-retrieve-workspace"
KINDS = ("run", "index", "features")  # what record_latest records; "started" is record_started's
HISTORY = 100  # entries kept per kind
PROG = "clotho-retrieve"
EXAMPLE_QUERY = "dog barking in rain"
NOTE_FRESH_S = 120.0  # torchrun: processes of one job start asking for the run folder within this
TABLE_RESULT = "table_result.json"  # experiments.RESULT_FILE: a `table` variant trained and evaluated


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _slug(text: str) -> str:
    """A folder-name part: letters, digits, "_", "-", "." (anything else: "_"; never a path separator)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text)).strip("._-") or "run"


def _quote(word: str) -> str:
    """Shell quoting that reads well: "dog barking in rain" in double quotes when that is safe."""
    quoted = shlex.quote(word)
    if quoted != word and not any(c in word for c in '"$`\\!'):
        return f'"{word}"'
    return quoted


def _read_json(path: Path) -> dict:
    """A JSON object from ``path``; ValueError when it is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path.name}: {type(exc).__name__}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path.name}: not a JSON object")
    return data


# ----------------------------------------------------------------------------------------------
# Runs: progress read from config.json and metrics.jsonl
# ----------------------------------------------------------------------------------------------
def run_progress(run: str | os.PathLike) -> dict:
    """What a run folder says about itself; never raises.

    Returns {"attention", "loss", "backbone", "epochs_done", "epochs_planned", "best_epoch",
    "best_val_map10" (a fraction, None without validation), "has_best", "has_checkpoint", "error"}.
    ``error`` names the first unreadable piece (None when all read).
    """
    run = Path(run)
    out = {"attention": None, "loss": None, "backbone": None, "epochs_done": 0, "epochs_planned": None,
           "best_epoch": None, "best_val_map10": None, "error": None,
           "has_best": (run / "best" / "model.safetensors").is_file(),
           "has_checkpoint": (run / "last" / "trainer_state.pt").is_file()}  # fmt: skip
    try:
        config = _read_json(run / "config.json")
        model, train = config.get("model") or {}, config.get("train") or {}
        out.update(attention=model.get("attention"), loss=train.get("loss"), backbone=model.get("backbone"))
        out["epochs_planned"] = int(train["epochs"])
    except ValueError as exc:
        out["error"] = str(exc) if (run / "config.json").exists() else "no config.json"
        return out
    except (KeyError, TypeError):
        out["error"] = "config.json: no train.epochs"
        return out
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        return out
    try:
        lines = metrics.read_text(encoding="utf-8").splitlines()
        records = [json.loads(line) for line in lines if line.strip()]
        epochs = {int(r["epoch"]): r for r in records}
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        out["error"] = f"metrics.jsonl: {type(exc).__name__}"
        return out
    if epochs:
        last = epochs[max(epochs)]
        out["epochs_done"] = max(epochs)
        best = last.get("best_epoch")
        out["best_epoch"] = best
        val = (epochs.get(best) or {}).get("val") if best is not None else None
        if isinstance(val, dict) and isinstance(val.get("mAP@10"), (int, float)):
            out["best_val_map10"] = float(val["mAP@10"])
    return out


def run_complete(run: str | os.PathLike) -> bool:
    """All planned epochs are in metrics.jsonl and best/ holds weights, as a `train` that returned leaves."""
    p = run_progress(run)
    return (p["error"] is None and p["has_best"] and p["epochs_planned"] is not None
            and p["epochs_done"] >= p["epochs_planned"])  # fmt: skip


# ----------------------------------------------------------------------------------------------
# The workspace
# ----------------------------------------------------------------------------------------------
class Workspace:
    """The folders of one workspace, the defaults each stage resolves from them, and what finished.

    ``root``: the ``--workspace`` option; None takes ``$CLOTHO_RETRIEVE_WORKSPACE``, else the current
    folder. ``source`` says which ("option", "env", "cwd"); commands suggested in messages carry
    ``--workspace ROOT`` only when the root came from the option.
    """

    def __init__(self, root: str | os.PathLike | None = None):
        if root is not None:
            path, self.source = Path(root), "option"
        elif os.environ.get(ENV_VAR):
            path, self.source = Path(os.environ[ENV_VAR]), "env"
        else:
            path, self.source = Path.cwd(), "cwd"
        self.root = path.expanduser().absolute()
        if self.root.exists() and not self.root.is_dir():
            raise ClothoRetrieveError(f"{self.root}: the workspace is a file, not a folder")

    def __repr__(self) -> str:
        return f"Workspace({str(self.root)!r})"

    clotho = property(lambda self: self.root / CLOTHO, doc="ROOT/data/clotho: the Clotho v2.1 tree")
    features = property(lambda self: self.root / FEATURES, doc="ROOT/data/features: the HDF5 features")
    runs = property(lambda self: self.root / RUNS, doc="ROOT/runs: one folder per training run")
    indexes = property(lambda self: self.root / INDEXES, doc="ROOT/indexes: one folder per index")
    state_file = property(lambda self: self.root / STATE, doc="ROOT/.clotho-retrieve/latest.json")

    # -- how paths and commands are shown -------------------------------------------------------
    def show(self, path: str | os.PathLike) -> str:
        """A path for messages: relative to the current folder when inside it, else absolute."""
        path = Path(path).absolute()
        with contextlib.suppress(ValueError):
            return path.relative_to(Path.cwd()).as_posix() or "."
        return str(path)

    def rel(self, path: str | os.PathLike) -> str:
        """A path for records and status: relative to the root when inside it, else absolute."""
        path = Path(path).absolute()
        with contextlib.suppress(ValueError):
            return path.relative_to(self.root).as_posix() or "."
        return str(path)

    def command(self, *args: str) -> str:
        """The command line to suggest, e.g. ``clotho-retrieve features`` (+ ``--workspace ROOT``)."""
        words = [PROG, *(["--workspace", str(self.root)] if self.source == "option" else []), *args]
        return " ".join(_quote(w) for w in words)

    def _need(self, what: str, *command: str, also: str = "") -> ClothoRetrieveError:
        """The one-line next-step error; its ``next_command`` attribute is the command alone."""
        exc = ClothoRetrieveError(f"{what}; run: {self.command(*command)}{also}")
        exc.next_command = self.command(*command)
        return exc

    # -- resolvers: a path, or the one-line next step ----------------------------------------------
    def clotho_root(self) -> Path:
        """ROOT/data/clotho, holding at least one split folder."""
        if not any((self.clotho / s).is_dir() for s in SPLITS):
            raise self._need(f"no Clotho in {self.show(self.clotho)}", "download",
                             also=f" (offline demo: {self.command('demo-data')})")
        return self.clotho

    def feature_files(self) -> list[Path]:
        """The .h5 files of ROOT/data/features (hidden ones, being written, left out), by name."""
        if not self.features.is_dir():
            return []
        return sorted(p for p in self.features.glob("*.h5") if p.is_file() and not p.name.startswith("."))

    def features_dir(self) -> Path:
        """ROOT/data/features, holding at least one .h5 file."""
        if not self.feature_files():
            raise self._need(f"no features in {self.show(self.features)}", "features")
        return self.features

    def features_file(self, split: str = "evaluation") -> Path:
        """ROOT/data/features/SPLIT.h5 (the default of `embed`: the evaluation split)."""
        path = self.features_dir() / f"{split}.h5"
        if not path.is_file():
            where = self.show(self.features)
            raise self._need(f"no {split} features in {where}", "features", "--split", split)
        return path

    def embed_features(self) -> Path:
        """embed's default --features: the evaluation split, or, in a workspace whose data/features holds
        no Clotho split (a sound library: `features --audio-dir`), every feature file in it."""
        files = [p.stem for p in self.feature_files()]
        if files and not any(s in files for s in SPLITS):
            return self.features
        return self.features_file("evaluation")

    def new_run_dir(self, attention: str, loss: str) -> Path:
        """Reserve ROOT/runs/ATTENTION-LOSS, or -2, -3, ... when taken; the folder is created (mkdir is
        atomic, so two trains started together get two folders). Give it back with release_run_dir.

        Under torchrun (WORLD_SIZE > 1) every process asks; all of them get process 0's folder.
        """
        base = f"{_slug(attention)}-{_slug(loss)}"
        rank, world_size = _rank()
        return _reserve(self.runs, base) if world_size <= 1 else self._agreed_run_dir(base, rank)

    def _agreed_run_dir(self, base: str, rank: int, timeout: float = 600.0) -> Path:
        """Process 0 reserves the folder and writes its name in a note keyed by the torchrun job; the other
        processes wait for a note written since they started asking (an older one is another job's)."""
        job = "-".join(os.environ.get(k, "") for k in ("TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT"))
        note = self.root / STATE_DIR / f"torchrun-{_slug(job)}-{base}.json"
        if rank == 0:
            path = _reserve(self.runs, base)
            atomic_write_text(note, json.dumps({"run": self.rel(path), "time": time.time()}) + "\n")
            return path
        asked = time.time()
        while time.time() - asked < timeout:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                data = _read_json(note)
                if float(data["time"]) >= asked - NOTE_FRESH_S:
                    return self.root / data["run"]
            time.sleep(0.1)
        raise ClothoRetrieveError(f"{note}: process 0 named no run folder within {timeout:.0f} s; pass --out")

    def release_run_dir(self, run: str | os.PathLike) -> None:
        """Remove a reserved run folder that is still empty (train refused its settings)."""
        with contextlib.suppress(OSError):
            Path(run).rmdir()

    def latest_run(self, finished: bool = True) -> Path:
        """The latest finished run (evaluate, embed, explain), or with ``finished=False`` the latest
        started run that wrote its config (train --resume)."""
        if finished:
            for run in self._recorded("run"):
                if run_complete(run):
                    return run
            raise self._no_finished_run()
        for run in self._recorded("started"):
            if (run / "config.json").is_file():
                return run
        raise self._need(f"no run to resume in {self.show(self.runs)}", "train")

    def _no_finished_run(self) -> ClothoRetrieveError:
        """The next step when no recorded run verifies: resume the latest started run, or train one."""
        for run in self._recorded("started"):
            p = run_progress(run)
            if p["error"] is not None:
                continue
            done, planned = p["epochs_done"], p["epochs_planned"]
            why = f"stopped after epoch {done} of {planned}" if done < planned else "was interrupted"
            return self._need(
                f"no finished run in {self.show(self.runs)} ({self.show(run)} {why})", "train", "--resume"
            )
        return self._need(f"no finished run in {self.show(self.runs)}", "train")

    def latest_index(self) -> Path:
        """The index `embed` finished last (query's default)."""
        from clotho_retrieve.index import INDEX_FILE

        for index in self._recorded("index"):
            if (index / INDEX_FILE).is_file():
                return index
        raise self._need(f"no index in {self.show(self.indexes)}", "embed")

    def new_index_dir(self, name: str) -> Path:
        """Reserve ROOT/indexes/NAME, or -2, -3, ... when taken (created, like new_run_dir)."""
        return _reserve(self.indexes, _slug(name))

    def index_dir_for(self, run: str | os.PathLike) -> Path:
        """embed's default --out for ``run``: ROOT/indexes/RUN_NAME when free, empty or already this run's
        index (so a re-run brings it in step), else the next free RUN_NAME-2, -3, ... A CLAP model is
        recorded as embed records it (clap_source: its hub id, or its folder's absolute path)."""
        from clotho_retrieve.clap import clap_source, is_clap_model

        run = clap_source(run) if is_clap_model(run) else str(Path(run).resolve())
        base = _slug(Path(run).name)
        for n in itertools.count(1):
            path = self.indexes / (base if n == 1 else f"{base}-{n}")
            if path.is_dir() and (not any(path.iterdir()) or _index_attrs(path).get("run") == run):
                return path
            if not path.exists():
                with contextlib.suppress(FileExistsError):
                    path.mkdir(parents=True)
                    return path
        raise AssertionError("unreachable")

    # -- records ------------------------------------------------------------------------------
    def read_state(self) -> tuple[dict, str | None]:
        """(latest.json's content, None) or ({}, the problem) when it is unreadable; ({}, None) if absent."""
        if not self.state_file.exists():
            return {}, None
        try:
            state = _read_json(self.state_file)
        except ValueError as exc:
            return {}, f"unreadable ({exc})"
        if state.get("format") != STATE_FORMAT:
            return {}, "unreadable (not a clotho-retrieve workspace record)"
        return state, None

    def _recorded(self, key: str) -> list[Path]:
        """Recorded folders of one kind, newest first, as absolute paths."""
        entries = self.read_state()[0].get(key)
        paths = [e.get("path") for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []
        return [self.root / p for p in reversed(paths) if isinstance(p, str) and p]

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One writer of latest.json at a time (an flock on ROOT/.clotho-retrieve/lock where available)."""
        (self.root / STATE_DIR).mkdir(parents=True, exist_ok=True)
        with open(self.root / LOCK, "a+") as fh:
            try:
                import fcntl
            except ImportError:  # no flock (Windows): the rename still keeps the file whole
                yield
                return
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _record(self, key: str, path: str | os.PathLike) -> None:
        if _rank()[0] != 0:  # under torchrun, process 0 records for all
            return
        rel = self.rel(path)
        with self._locked():
            state, _ = self.read_state()  # an unreadable record is replaced
            entries = [e for e in state.get(key) or [] if isinstance(e, dict) and e.get("path") != rel]
            entries.append({"path": rel, "at": _now()})
            state.update({"format": STATE_FORMAT, "version": 1, key: entries[-HISTORY:]})
            atomic_write_text(self.state_file, json.dumps(state, indent=2) + "\n")

    def record_latest(self, kind: str, path: str | os.PathLike) -> None:
        """Record that a stage finished (call only after it returned normally): ``kind`` run | index |
        features, ``path`` its output folder. The newest record that still verifies is the latest."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
        self._record(kind, path)

    def record_started(self, run: str | os.PathLike) -> None:
        """Record that `train` starts (or resumes) ``run``: the run `train --resume` continues."""
        self._record("started", run)

    # -- status ---------------------------------------------------------------------------------
    def status(self) -> dict:
        """What the workspace holds, JSON-serialisable; see clotho_retrieve.workspace_status."""
        from clotho_retrieve.workspace_status import workspace_status

        return workspace_status(self)


def status_table(status: dict):
    """The Rich table of Workspace.status()'s dict (see clotho_retrieve.workspace_status)."""
    from clotho_retrieve.workspace_status import status_table as table

    return table(status)


def _rank() -> tuple[int, int]:
    """(RANK, WORLD_SIZE) of this process under torchrun; (0, 1) otherwise."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _reserve(parent: Path, base: str) -> Path:
    """Create and return PARENT/BASE, or PARENT/BASE-2, -3, ...: the first name no one took."""
    parent.mkdir(parents=True, exist_ok=True)
    for n in itertools.count(1):
        path = parent / (base if n == 1 else f"{base}-{n}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise AssertionError("unreachable")


def _index_attrs(index: Path) -> dict:
    """The attributes of INDEX/index.h5 that status shows ({} when unreadable or absent)."""
    from clotho_retrieve.index import INDEX_FILE

    try:
        import h5py

        with h5py.File(index / INDEX_FILE, "r") as h5:
            a = h5.attrs
            return {"run": str(a["run"]), "which": str(a["which"]), "count": int(a["count"]),
                    "fingerprint": str(a["fingerprint"])}  # fmt: skip
    except (OSError, KeyError, ValueError, TypeError):
        return {}
