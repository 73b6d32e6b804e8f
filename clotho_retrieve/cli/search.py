"""Commands that search: embed, index, merge-index, export, query, status, serve."""

from __future__ import annotations

from pathlib import Path

import typer

from clotho_retrieve.cli import _ws, command
from clotho_retrieve.utils import ClothoRetrieveError, err_console

MEMORY_HELP = "Memory the FAISS index may take, e.g. 8G (0: half this machine's RAM)."
INDEX_TYPES_HELP = "exact | ivf | hnsw | pq (OPQ+IVF+PQ) | auto (exact up to 50,000 clips, then by --memory)"


def _index_type_option(what: str = ""):
    return typer.Option("auto", "--index-type", help=f"{what}{INDEX_TYPES_HELP}.")


# ----------------------------------------------------------------------------------------------
@command("embed")
def embed_cmd(
    checkpoint: str | None = typer.Option(
        None,
        "--model",
        "--checkpoint",
        help="Model to encode with: a run folder from `train` (or a model folder), or a pretrained CLAP "
        "model (hub id such as laion/clap-htsat-unfused, or its folder). Default: the latest finished run.",
    ),
    audio_dir: Path | None = typer.Option(
        None,
        "--audio-dir",
        help="Instead of --features: a folder of audio (WAV/FLAC/OGG/MP3, recursively). Its features are "
        "computed (or brought up to date) with the model's front end into OUT/features.h5, bad files "
        "skipped with a report; the index then mirrors the folder.",
    ),
    features: Path | None = typer.Option(
        None,
        "--features",
        help="A features .h5 file, or a folder of them (all Clotho splits). Default: "
        "data/features/evaluation.h5, or every file of data/features when it holds no Clotho split.",
    ),
    out: Path | None = typer.Option(
        None,
        "--out",
        help="Index folder to create, resume, or bring in step with the features. Default: "
        "indexes/RUN-NAME.",
    ),
    captions: bool = typer.Option(
        False, "--captions", help="Also embed the captions (audio-to-text queries)."
    ),
    prune: bool = typer.Option(
        False,
        "--prune",
        help="Drop index rows whose clips are not in --features (off: an index may gather several files).",
    ),
    index_type: str = _index_type_option(),
    memory: str = typer.Option("0", "--memory", help=MEMORY_HELP),
    shard: str | None = typer.Option(
        None,
        "--shard",
        help="i/N: embed only shard i of N into OUT/parts/ (e.g. a SLURM array task), then `merge-index`. "
        "Under torchrun every rank takes its own shard and rank 0 merges.",
    ),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Clips per forward pass."),
    chunk_size: int = typer.Option(256, "--chunk-size", min=1, help="Clips per write (resume granularity)."),
    which: str = typer.Option("best", "--which", help="Checkpoint of a run folder: best | last."),
    workers: int = typer.Option(
        0, "--workers", min=0, help="With --audio-dir: feature worker processes; 0 = all cores."
    ),
    device: str = typer.Option("auto", "--device", help="cpu | cuda | auto."),
) -> None:
    """5. Embed audio (and captions) with a trained run or a CLAP model into a searchable index.

    New clips are appended, clips whose features changed are re-embedded, unchanged ones kept.

    Examples: clotho-retrieve embed   (the latest finished run, the evaluation split, into indexes/RUN) ;
    clotho-retrieve embed --model laion/clap-htsat-unfused --audio-dir ~/sounds --out sounds-index ;
    torchrun --nnodes N --nproc_per_node P -m clotho_retrieve embed ...   (OUT on a shared disk)
    """
    from clotho_retrieve.embed import EmbedConfig, audio_dir_features, embed
    from clotho_retrieve.index import parse_memory
    from clotho_retrieve.utils import console, resolve_device

    if features is not None and audio_dir is not None:
        raise ClothoRetrieveError("embed: pass either --features or --audio-dir, not both")
    ws = _ws()
    checkpoint = checkpoint or ws.latest_run()
    features = features or (None if audio_dir is not None else ws.embed_features())
    out = out or ws.index_dir_for(checkpoint)
    cfg = EmbedConfig(batch_size, chunk_size, captions, index_type, which, resolve_device(device))
    cfg.memory = parse_memory(memory)
    if audio_dir is not None:
        from clotho_retrieve.features import print_report

        result = audio_dir_features(checkpoint, audio_dir, out, which, workers)
        print_report([result])
        features, prune = result["out"], True  # the index mirrors the folder
    summary = embed(checkpoint, features, out, cfg, prune=prune, shard=shard)
    if "part" in summary:  # one shard: the index is assembled later
        console.print(f"{summary['part']}: {summary['clips']:,} clips ({summary['added']:,} added)")
        return
    ws.record_latest("index", out)
    tower = summary["text_tower"] or "none (text queries use torch)"
    console.print(
        f"{summary['index']}: {summary['clips']:,} clips ({summary['added']:,} added, "
        f"{summary['updated']:,} updated, {summary['removed']:,} removed, {summary['unchanged']:,} "
        f"unchanged), search: {summary['index_type']}, ONNX text tower: {tower}",
        highlight=False,
    )


@command("index")
def index_cmd(
    index: Path = typer.Argument(..., help="Index folder written by `embed`."),
    index_type: str = _index_type_option("(exact removes the FAISS file) "),
    memory: str = typer.Option("0", "--memory", help=MEMORY_HELP),
    nlist: int = typer.Option(
        0, "--nlist", min=0, help="IVF cells (0: 4 sqrt(N) as a power of 2; 16,384 at 1-10M)."
    ),
    nprobe: int = typer.Option(
        0, "--nprobe", min=0, help="IVF cells per query (0: the most within --latency-ms)."
    ),
    latency_ms: float = typer.Option(
        10.0, "--latency-ms", min=0.01, help="One query's budget when nprobe is 0."
    ),
    pq_m: int = typer.Option(0, "--pq-m", min=0, help="pq: bytes per vector (0: the most within --memory)."),
    refine: str = typer.Option(
        "auto", "--refine", help="pq: re-rank with SQ8 | SQ6 | SQ4 | none (auto: the finest within --memory)."
    ),
    hnsw_m: int = typer.Option(32, "--hnsw-m", min=2, help="HNSW neighbours per node."),
    ef_search: int = typer.Option(128, "--ef-search", min=1, help="HNSW search breadth."),
) -> None:
    """Build or rebuild the approximate (FAISS) index of an embedding index; prints its recall@10 and memory.

    Example: clotho-retrieve index demo/index --index-type pq --memory 8G
    """
    from clotho_retrieve.index import AnnConfig, build_ann_index, parse_memory
    from clotho_retrieve.utils import console

    cfg = AnnConfig(
        nlist=nlist,
        nprobe=nprobe,
        pq_m=pq_m,
        refine=refine,
        hnsw_m=hnsw_m,
        ef_search=ef_search,
        memory=parse_memory(memory),
        latency_ms=latency_ms,
    )
    chosen = build_ann_index(index, index_type, cfg)
    console.print(f"{index}: search is now {chosen}", highlight=False)


@command("merge-index")
def merge_index_cmd(
    index: Path = typer.Argument(..., help="Index folder whose parts/ `embed --shard i/N` wrote."),
    shards: int | None = typer.Option(None, "--shards", min=1, help="N, when parts of several N are there."),
    index_type: str = _index_type_option("The search to build after merging: "),
    memory: str = typer.Option("0", "--memory", help=MEMORY_HELP),
) -> None:
    """Merge the parts of a sharded `embed` (INDEX/parts/shard-*-of-N) into INDEX/index.h5.

    Example (a SLURM array of 8): clotho-retrieve embed ... --out big --shard $SLURM_ARRAY_TASK_ID/8 ;
    then clotho-retrieve merge-index big --memory 8G
    """
    from clotho_retrieve.index import AnnConfig, build_ann_index, parse_memory
    from clotho_retrieve.index.parts import merge_parts
    from clotho_retrieve.safety import output_lock
    from clotho_retrieve.utils import console

    with output_lock(index):
        summary = merge_parts(index, shards)
        chosen = build_ann_index(index, index_type, AnnConfig(memory=parse_memory(memory)))
    parts = f"{summary['clips']:,} clips from {summary['parts']} parts"
    console.print(f"{index}: {parts}, search: {chosen}", highlight=False)


@command("export")
def export_cmd(
    index: Path | None = typer.Option(
        None, "--index", help="Index folder written by `embed`. Default: the latest index."
    ),
    checkpoint: Path | None = typer.Option(
        None, "--checkpoint", help="The run that built the index, if it has moved (checked against it)."
    ),
) -> None:
    """Export the text tower of an index's run to ONNX (INDEX/text_tower/): text queries without torch.

    Also writes its int8 version (INDEX/text_tower/int8/), which `serve` encodes with by default. `embed`
    does both for the indexes it writes; this is for an older index, or to export again.

    Example: clotho-retrieve export   (the latest index; --index DIR for another)
    """
    from clotho_retrieve.index import EmbeddingIndex
    from clotho_retrieve.query import index_model_dir
    from clotho_retrieve.text_int8 import quantize_text_tower
    from clotho_retrieve.text_onnx import export_model_dir, tower_dir
    from clotho_retrieve.utils import console

    index = index or _ws().latest_index()
    with EmbeddingIndex(index, in_memory_max=0) as idx:
        model_dir, sha256 = index_model_dir(idx, checkpoint), idx.fingerprint.sha256
    with err_console.status(f"exporting the text tower of {model_dir} to ONNX"):
        folder = export_model_dir(model_dir, tower_dir(index), sha256)
    console.print(f"{folder}: ONNX text tower of {model_dir}", highlight=False)
    try:
        with err_console.status("quantizing it to int8 (for serve)"):
            int8 = quantize_text_tower(folder)
        console.print(f"{int8}: its int8 version (serve --text-precision int8)", highlight=False)
    except ClothoRetrieveError as exc:  # the float32 tower is written: a warning, not a failure
        from rich.markup import escape

        err_console.print(f"[yellow]warning:[/] no int8 text tower: {escape(str(exc))}", soft_wrap=True)


@command("query")
def query_cmd(
    text: str | None = typer.Argument(None, help='What to look for, e.g. "dog barking in rain".'),
    index: Path | None = typer.Option(
        None, "--index", help="Index folder written by `embed`. Default: the latest index."
    ),
    top_k: int = typer.Option(10, "--top-k", "-k", min=1, help="How many results per query."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per query and line, for scripts."),
    queries: Path | None = typer.Option(
        None, "--queries", help="A UTF-8 file of queries, one per line (one process for all)."
    ),
    audio: list[Path] | None = typer.Option(
        None, "--audio", help="Query by an example recording (repeatable): audio-to-audio."
    ),
    captions: bool = typer.Option(
        False, "--captions", help="Rank the indexed captions instead of clips (needs `embed --captions`)."
    ),
    checkpoint: str | None = typer.Option(
        None,
        "--model",
        "--checkpoint",
        help="Model to encode the query with: a run or a CLAP model (default: the one recorded in the "
        "index; its weights are checked against the index's).",
    ),
    exact: bool = typer.Option(False, "--exact", help="Exact search even when a FAISS index exists."),
    device: str = typer.Option("cpu", "--device", help="cpu | cuda | auto."),
) -> None:
    """6. Rank the indexed audio for a text prompt (or an example recording).

    Example: clotho-retrieve query "dog barking in rain"   (the latest index; --index DIR for another)
    """
    import json

    from rich.markup import escape

    from clotho_retrieve.index import EmbeddingIndex
    from clotho_retrieve.query import query_audio, query_text, read_queries_file, result_table
    from clotho_retrieve.utils import console, resolve_device

    texts = ([text] if text is not None else []) + (read_queries_file(queries) if queries else [])
    if not texts and not audio:
        raise ClothoRetrieveError("nothing to look for: give a query text, --queries FILE or --audio FILE")
    index = index or _ws().latest_index()
    device = resolve_device(device)
    target = "captions" if captions else "audio"
    with EmbeddingIndex(index, load_ann=not exact) as idx:  # --exact never reads faiss.index
        if idx.incomplete:  # an unfinished `embed`: answer from what is there, and say so
            err_console.print(f"[yellow]warning:[/] {escape(idx.incomplete)}", highlight=False,
                              soft_wrap=True)
        results = query_text(idx, texts, top_k, checkpoint, target=target, device=device) if texts else []
        if audio:
            results += query_audio(idx, audio, top_k, checkpoint, target=target, device=device)
    for result in results:
        if as_json:
            typer.echo(json.dumps(result.to_json(), ensure_ascii=False))
        else:
            console.print(result_table(result, index))


# ----------------------------------------------------------------------------------------------
# table / explain  (owned by clotho_retrieve/experiments.py and clotho_retrieve/plots.py)


# ----------------------------------------------------------------------------------------------
@command("status")
def status_cmd(
    as_json: bool = typer.Option(False, "--json", help="Print the status as JSON, for scripts."),
) -> None:
    """What the workspace holds (Clotho, features, runs, indexes) and the next command to run.

    Example: clotho-retrieve status
    """
    import json

    from clotho_retrieve.utils import console
    from clotho_retrieve.workspace import status_table

    st = _ws().status()
    if as_json:
        typer.echo(json.dumps(st, indent=2))
    else:
        console.print(status_table(st))


# ----------------------------------------------------------------------------------------------
# serve  (owned by clotho_retrieve/serve/)
# ----------------------------------------------------------------------------------------------
@command("serve")
def serve_cmd(
    index: list[str] = typer.Option(
        ..., "--index", help="Index folder written by `embed` (repeatable; NAME=DIR names it in the API)."
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; another than loopback warns."),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="TCP port."),
    token: str | None = typer.Option(
        None, "--token", envvar="CLOTHO_RETRIEVE_TOKEN", help="Require this bearer token on every route."
    ),
    audio_root: list[str] | None = typer.Option(
        None, "--audio-root", help="Where the clips' audio is now ([NAME=]DIR: Clotho root or audio folder)."
    ),
    features: list[str] | None = typer.Option(
        None, "--features", help="Features file or folder the index was embedded from (audio, thumbnails)."
    ),
    max_upload_mb: float = typer.Option(20, "--max-upload-mb", min=0.001, help="Largest query clip upload."),
    device: str = typer.Option("cpu", "--device", help="cpu | cuda | auto."),
    bf16: bool = typer.Option(
        False, "--bf16",
        help="Text tower in bfloat16: faster on CPUs with AVX512-BF16 or AMX; scores move ~1e-4."
    ),
    text_precision: str = typer.Option(
        "int8", "--text-precision",
        help="ONNX text tower: int8 (~3x faster than fp32, embeddings at cosine ~0.99 to it) | fp32.",
    ),
    query_cache: int = typer.Option(
        1024, "--query-cache", min=0, help="Embeddings of this many recent query texts kept (0: none)."
    ),
) -> None:
    """7. Search, browse and listen in a browser, with a JSON API (one process keeps the model loaded).

    Example: clotho-retrieve serve --index demo/index   (then open http://127.0.0.1:8000/)
    """
    from clotho_retrieve.serve import load_libraries, run_server
    from clotho_retrieve.serve.security import is_loopback
    from clotho_retrieve.text_int8 import PRECISIONS
    from clotho_retrieve.utils import resolve_device

    if text_precision not in PRECISIONS:
        choices = " or ".join(PRECISIONS)
        raise ClothoRetrieveError(f"--text-precision {text_precision!r}: choose {choices}")
    if not is_loopback(host):
        err_console.print(
            f"[yellow]warning:[/] serving on {host}: anyone who can reach this machine can search and "
            "download the audio" + ("" if token else "; --token (or CLOTHO_RETRIEVE_TOKEN) requires a token")
        )
    with err_console.status("loading the indexes and their text models"):
        libraries = load_libraries(
            index, features, audio_root, resolve_device(device), bf16, text_precision, query_cache
        )
    for lib in libraries.values():
        audio = "audio available" if lib.audio_available else "audio unavailable (--audio-root)"
        err_console.print(
            f"index [bold]{lib.name}[/]: {lib.count:,} clips from {lib.index.path}, {audio}, "
            f"text tower {lib.text_tower_kind()}"
        )
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}/" + (f"?token={token}" if token else "")
    err_console.print(f"serving on [bold]{url}[/] (Ctrl+C to stop)", highlight=False, soft_wrap=True)
    run_server(libraries, host, port, token, int(max_upload_mb * 2**20))
