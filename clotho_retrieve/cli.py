"""The `clotho-retrieve` command line: a thin Typer layer over the pipeline's Python functions.

Commands are listed in pipeline order. Each one imports its stage lazily, so `--help` and `query`
start fast. Every stage raises :class:`ClothoRetrieveError` for problems the user can act on; the
``command`` decorator turns that into one red line on stderr and exit status 1 (set
``CLOTHO_RETRIEVE_DEBUG=1`` to see the traceback instead).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import typer

from clotho_retrieve import __version__
from clotho_retrieve.cli_options import Fields, config_options
from clotho_retrieve.config import ModelConfig, TableConfig, TrainConfig
from clotho_retrieve.utils import ClothoRetrieveError, err_console

app = typer.Typer(
    name="clotho-retrieve",
    help=(
        "Language-based audio retrieval on Clotho (Xiao et al., 2023).\n\n"
        "Pipeline: download -> features -> train -> evaluate -> embed -> query.\n"
        "Offline demo data: demo-data. The paper's Table I: table."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def command(name: str, **kwargs):
    """Register a CLI command that reports ClothoRetrieveError as one line and exit status 1."""

    def decorator(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kw):
            try:
                return fn(*args, **kw)
            except ClothoRetrieveError as exc:
                if os.environ.get("CLOTHO_RETRIEVE_DEBUG"):
                    raise
                err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
                raise typer.Exit(1) from None
            except KeyboardInterrupt:
                err_console.print(
                    "[yellow]interrupted[/]: finished work is kept; re-run to resume (train: add --resume)."
                )
                raise typer.Exit(130) from None

        return app.command(name, **kwargs)(wrapper)

    return decorator


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"clotho-retrieve {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool | None = typer.Option(
        None, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Language-based audio retrieval on Clotho."""


# ----------------------------------------------------------------------------------------------
# download  (owned by clotho_retrieve/download.py)
# ----------------------------------------------------------------------------------------------
@command("download")
def download_cmd(
    root: Path = typer.Option(
        Path("data/clotho"), "--root", help="Clotho folder: ROOT/SPLIT/*.wav and the CSVs."
    ),
    split: str | None = typer.Option(
        None,
        "--split",
        help="development | validation | evaluation | all. Default: all, unless only --weights or "
        "--text-model is asked for.",
    ),
    mirror: str | None = typer.Option(
        None,
        "--mirror",
        help="Base URL replacing Zenodo's (proxy or local copy): files are fetched as MIRROR/NAME.",
    ),
    keep_archives: bool = typer.Option(
        False, "--keep-archives", help="Keep the .7z archives after extraction."
    ),
    weights: list[str] | None = typer.Option(
        None, "--weights", help="Also fetch a PANNs checkpoint: cnn14 | cnn10 | cnn6 (repeatable)."
    ),
    cache: Path | None = typer.Option(
        None,
        "--cache",
        help="PANNs checkpoint folder. Default: $CLOTHO_RETRIEVE_CACHE or ~/.cache/clotho-retrieve/panns.",
    ),
    text_model: str | None = typer.Option(
        None, "--text-model", help="Also pre-fetch this Hugging Face text model (e.g. bert-base-uncased)."
    ),
    retries: int = typer.Option(5, "--retries", min=0, help="Retries per file for transient network errors."),
) -> None:
    """1. Download Clotho v2.1 (and optionally PANNs weights or a text model).

    Resumable, MD5-verified and idempotent: a complete ROOT is left alone without a network request.
    """
    from rich.table import Table

    from clotho_retrieve.download import download_clotho, download_panns, download_text_model
    from clotho_retrieve.utils import console

    if split is not None or not (weights or text_model):
        report = download_clotho(
            root, split or "all", mirror=mirror, keep_archives=keep_archives, retries=retries
        )
        table = Table(title=f"Clotho v2.1 in {report.root}")
        for column in ("split", "clips", "status", "folder"):
            table.add_column(column, justify="right" if column == "clips" else "left")
        for s in report.splits:
            table.add_row(s.split, str(s.clips), s.status, str(s.folder))
        console.print(table)
        if all(s.status == "in place" for s in report.splits):
            console.print("Everything is already in place; nothing was downloaded.")
    for name in weights or []:
        console.print(f"PANNs {name}: {download_panns(name, cache=cache, mirror=mirror, retries=retries)}")
    if text_model:
        console.print(f"text model {text_model}: {download_text_model(text_model)}")


# ----------------------------------------------------------------------------------------------
# demo-data  (owned by clotho_retrieve/demo.py)
# ----------------------------------------------------------------------------------------------
@command("demo-data")
def demo_data_cmd(
    out: Path = typer.Option(..., "--out", help="Folder to write (Clotho v2.1 layout: splits + CSVs)."),
    n_development: int = typer.Option(250, help="Clips in the development split."),
    n_validation: int = typer.Option(50, help="Clips in the validation split."),
    n_evaluation: int = typer.Option(100, help="Clips in the evaluation split."),
    duration: float = typer.Option(5.0, help="Mean clip length in seconds (each clip within +-20 %)."),
    seed: int = typer.Option(0, help="Random seed; the same seed writes the same files."),
) -> None:
    """Write the synthetic demo dataset in Clotho's on-disk layout.

    Example: clotho-retrieve demo-data --out demo/data
    """
    from clotho_retrieve.demo import DemoConfig, make_demo_data
    from clotho_retrieve.utils import console

    sizes = make_demo_data(out, DemoConfig(n_development, n_validation, n_evaluation, duration, seed))
    console.print(f"demo data: {', '.join(f'{n} {s}' for s, n in sizes.items())} clips in {out}")


# ----------------------------------------------------------------------------------------------
# features  (owned by clotho_retrieve/features.py)
# ----------------------------------------------------------------------------------------------
@command("features")
def features_cmd(
    out: Path = typer.Option(..., "--out", help="A folder (with --root) or a FILE.h5 (with --audio-dir)."),
    root: Path | None = typer.Option(None, help="Clotho-layout root: split folders + clotho_captions_*.csv."),
    audio_dir: Path | None = typer.Option(
        None, help="Any folder of audio (WAV/FLAC/OGG/MP3, searched recursively) to index your own sounds."
    ),
    split: list[str] | None = typer.Option(
        None, help="Only this split (repeatable; with --root). Default: every split found."
    ),
    preset: str = typer.Option("paper", help="Front end: 'paper' (44.1 kHz, Hamming) or 'panns' (32 kHz)."),
    sample_rate: int | None = typer.Option(None, help="Override the preset's sample rate (Hz)."),
    n_fft: int | None = typer.Option(None, help="Override the FFT size."),
    win_length: int | None = typer.Option(None, help="Override the window length (samples)."),
    hop_length: int | None = typer.Option(None, help="Override the hop (samples)."),
    window: str | None = typer.Option(None, help="Override the window: hamming | hann (periodic)."),
    n_mels: int | None = typer.Option(None, help="Override the number of Mel bands."),
    f_min: float | None = typer.Option(None, help="Override the lowest Mel frequency (Hz)."),
    f_max: float | None = typer.Option(None, help="Override the highest Mel frequency (Hz)."),
    workers: int = typer.Option(0, help="Worker processes; 0 = all cores."),
    strict: bool = typer.Option(False, help="Stop at the first bad file instead of skipping it."),
) -> None:
    """2. Compute log-Mel spectrograms into an HDF5 cache.

    Examples: clotho-retrieve features --root data/clotho --out data/features ;
    clotho-retrieve features --audio-dir ~/sounds --out sounds.h5 --preset panns
    """
    from clotho_retrieve.features import FeaturesConfig, compute_features, print_report

    overrides = {
        k: v
        for k, v in dict(
            sample_rate=sample_rate,
            n_fft=n_fft,
            win_length=win_length,
            hop_length=hop_length,
            window=window,
            n_mels=n_mels,
            f_min=f_min,
            f_max=f_max,
        ).items()
        if v is not None
    }
    cfg = FeaturesConfig(preset=preset, overrides=overrides, workers=workers, strict=strict)
    print_report(compute_features(cfg, root=root, out=out, audio_dir=audio_dir, splits=split or None))


# ----------------------------------------------------------------------------------------------
# train / evaluate  (owned by clotho_retrieve/train.py and clotho_retrieve/evaluate.py)
# ----------------------------------------------------------------------------------------------
# Every option of `train` and `table` comes from a field of ModelConfig / TrainConfig / TableConfig
# (clotho_retrieve/config.py: its default and help, defined once); see clotho_retrieve/cli_options.py.
@command("train")
@config_options(train_cfg=Fields(TrainConfig, required=("out",)), model_cfg=Fields(ModelConfig))
def train_cmd(train_cfg: TrainConfig, model_cfg: ModelConfig) -> None:
    """3. Train a retrieval model (CNN14 + attention x BERT).

    Example: clotho-retrieve train --features feats --attention self --loss supcon --out runs/self

    Under torchrun (torchrun --nproc_per_node N -m clotho_retrieve train ...) it runs DistributedDataParallel.
    """
    from clotho_retrieve.train import train

    train(model_cfg, train_cfg)


@command("evaluate")
def evaluate_cmd(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="Run folder of `train` (or a model folder)."),
    features: Path = typer.Option(
        Path("features"), "--features", help="Features folder (see --split) or one HDF5 features file."
    ),
    split: str = typer.Option("evaluation", "--split", help="Split to score when --features is a folder."),
    which: str = typer.Option("best", "--which", help="Which model of a run folder: best or last."),
    json_out: bool = typer.Option(False, "--json", help="Print the results as JSON instead of a table."),
    submission: Path | None = typer.Option(
        None, "--submission", help="Write DCASE's top-10 CSV: caption,file_name_1,...,file_name_10."
    ),
    batch_size: int = typer.Option(32, "--batch-size", help="Clips per batch."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA if present, else CPU), cpu, cuda, ..."),
) -> None:
    """4. Score a trained run: text-to-audio and audio-to-text R@k, mAP@10.

    Example: clotho-retrieve evaluate --checkpoint runs/self --features feats --split evaluation
    """
    import json

    from clotho_retrieve.evaluate import evaluate, results_table
    from clotho_retrieve.utils import console

    result = evaluate(checkpoint, features, split, which, batch_size, device, submission)
    if json_out:
        typer.echo(json.dumps(result, indent=2))
    else:
        console.print(results_table(result))
    if submission is not None:
        err_console.print(f"wrote {submission}")


# ----------------------------------------------------------------------------------------------
# embed / index / query  (owned by clotho_retrieve/embed.py, index/ and query.py)
# ----------------------------------------------------------------------------------------------
@command("embed")
def embed_cmd(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="Run folder from `train` (or a model folder)."),
    features: Path = typer.Option(
        ..., "--features", help="A features .h5 file, or a folder of them (all Clotho splits)."
    ),
    out: Path = typer.Option(
        ..., "--out", help="Index folder to create, resume, or bring in step with the features."
    ),
    captions: bool = typer.Option(
        False, "--captions", help="Also embed the captions (audio-to-text queries)."
    ),
    prune: bool = typer.Option(
        False,
        "--prune",
        help="Drop index rows whose clips are not in --features (off: an index may gather several files).",
    ),
    index_type: str = typer.Option(
        "auto",
        "--index-type",
        help="exact | ivf | hnsw | pq | auto (exact up to 50,000 clips, then ivf or pq by --memory).",
    ),
    memory: str = typer.Option(
        "0", "--memory", help="Memory the FAISS index may take, e.g. 8G (0: half this machine's RAM)."
    ),
    shard: str | None = typer.Option(
        None,
        "--shard",
        help="i/N: embed only shard i of N into OUT/parts/ (e.g. a SLURM array task); then `merge-index`. "
        "Under torchrun every rank takes its own shard and rank 0 merges.",
    ),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Clips per forward pass."),
    chunk_size: int = typer.Option(256, "--chunk-size", min=1, help="Clips per write (resume granularity)."),
    which: str = typer.Option("best", "--which", help="Checkpoint of a run folder: best | last."),
    device: str = typer.Option("auto", "--device", help="cpu | cuda | auto."),
) -> None:
    """5. Embed audio (and captions) with a trained run into a searchable index.

    New clips are appended, clips whose features changed are re-embedded, unchanged ones kept.

    Example: clotho-retrieve embed --checkpoint runs/demo --features demo/features --out demo/index

    Sharded: torchrun --nnodes N --nproc_per_node P -m clotho_retrieve embed ... (OUT on a shared disk)
    """
    from clotho_retrieve.embed import EmbedConfig, embed
    from clotho_retrieve.index import parse_memory
    from clotho_retrieve.utils import console, resolve_device

    cfg = EmbedConfig(batch_size, chunk_size, captions, index_type, which, resolve_device(device))
    cfg.memory = parse_memory(memory)
    summary = embed(checkpoint, features, out, cfg, prune=prune, shard=shard)
    where = f"part {summary['part']}" if "part" in summary else summary["index"]
    console.print(
        f"{where}: {summary['clips']:,} clips ({summary['added']:,} added, "
        f"{summary['updated']:,} updated, {summary['removed']:,} removed, {summary['unchanged']:,} "
        f"unchanged), search: {summary['index_type']}",
        highlight=False,
    )


@command("index")
def index_cmd(
    index: Path = typer.Argument(..., help="Index folder written by `embed`."),
    index_type: str = typer.Option(
        "auto",
        "--index-type",
        help="exact (removes the FAISS file) | ivf | hnsw | pq (OPQ+IVF+PQ) | auto (by size and --memory).",
    ),
    memory: str = typer.Option(
        "0", "--memory", help="Memory the index may take, e.g. 8G (0: half this machine's RAM)."
    ),
    nlist: int = typer.Option(
        0, "--nlist", min=0, help="IVF cells (0: 4 sqrt(N) as a power of two; 16,384 at 1-10M)."
    ),
    nprobe: int = typer.Option(
        0, "--nprobe", min=0, help="IVF cells searched per query (0: the most within --latency-ms)."
    ),
    latency_ms: float = typer.Option(
        10.0, "--latency-ms", min=0.01, help="Latency budget of one query for nprobe 0."
    ),
    pq_m: int = typer.Option(0, "--pq-m", min=0, help="pq: bytes per vector (0: the most within --memory)."),
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
    index_type: str = typer.Option(
        "auto", "--index-type", help="Search to build after merging: exact | ivf | hnsw | pq | auto."
    ),
    memory: str = typer.Option("0", "--memory", help="Memory the FAISS index may take (0: half the RAM)."),
) -> None:
    """Merge the parts of a sharded `embed` (INDEX/parts/shard-*-of-N) into INDEX/index.h5.

    Example: clotho-retrieve merge-index big/index --index-type auto --memory 8G
    """
    from clotho_retrieve.index import AnnConfig, build_ann_index, parse_memory
    from clotho_retrieve.index.parts import merge_parts
    from clotho_retrieve.utils import console

    summary = merge_parts(index, shards)
    chosen = build_ann_index(index, index_type, AnnConfig(memory=parse_memory(memory)))
    console.print(
        f"{index}: {summary['clips']:,} clips from {summary['parts']} parts, search: {chosen}",
        highlight=False,
    )


@command("query")
def query_cmd(
    text: str | None = typer.Argument(None, help='What to look for, e.g. "dog barking in rain".'),
    index: Path = typer.Option(..., "--index", help="Index folder written by `embed`."),
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
    checkpoint: Path | None = typer.Option(
        None, "--checkpoint", help="Run to encode with (default: the run recorded in the index; checked)."
    ),
    exact: bool = typer.Option(False, "--exact", help="Exact search even when a FAISS index exists."),
    device: str = typer.Option("cpu", "--device", help="cpu | cuda | auto."),
) -> None:
    """6. Rank the indexed audio for a text prompt (or an example recording).

    Example: clotho-retrieve query "dog barking in rain" --index demo/index --top-k 5
    """
    import json

    from clotho_retrieve.index import EmbeddingIndex
    from clotho_retrieve.query import query_audio, query_text, read_queries_file, result_table
    from clotho_retrieve.utils import console, resolve_device

    texts = ([text] if text is not None else []) + (read_queries_file(queries) if queries else [])
    if not texts and not audio:
        raise ClothoRetrieveError("nothing to look for: give a query text, --queries FILE or --audio FILE")
    device = resolve_device(device)
    target = "captions" if captions else "audio"
    with EmbeddingIndex(index) as idx:
        if exact:
            idx.ann = None
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
@command("table")
@config_options(
    table_cfg=Fields(TableConfig),
    train_cfg=Fields(TrainConfig, exclude=("features", "out", "resume", "loss")),
    model_cfg=Fields(ModelConfig, exclude=("attention",)),
)
def table_cmd(table_cfg: TableConfig, train_cfg: TrainConfig, model_cfg: ModelConfig) -> None:
    """Reproduce the paper's Table I: train and evaluate the four variants.

    Every variant gets the same settings and seed; only the attention module (none | gat | self) and
    the loss (NT-Xent, Eq. 6 | supervised contrastive, Eq. 7) change. Re-run the same command to
    resume: finished variants are kept, an interrupted one continues from its last checkpoint.

    Example: clotho-retrieve table --features demo/features --out demo/table --backbone tiny --epochs 3
    """
    from rich.table import Table

    from clotho_retrieve.experiments import METRICS, PAPER_TABLE_I, VARIANTS, run_table
    from clotho_retrieve.utils import console

    split = table_cfg.split
    results, md_path, csv_path = run_table(
        table_cfg.features, table_cfg.out, model_cfg, train_cfg, table_cfg.variants, split
    )

    table = Table(title=f"Table I on the {split} split: text-to-audio, %, ours / paper")
    table.add_column("variant")
    for m in METRICS:
        table.add_column(m, justify="right")
    for name, metrics in results.items():
        paper = PAPER_TABLE_I[name]
        table.add_row(VARIANTS[name].label, *(f"{100 * metrics[m]:.1f} / {paper[m]:.1f}" for m in METRICS))
    console.print(table)
    err_console.print(f"wrote {md_path} and {csv_path}")


@command("explain")
def explain_cmd(
    checkpoint: Path = typer.Option(
        ..., "--checkpoint", help="Run folder of `train` (attention self or gat), or a model folder."
    ),
    features: Path = typer.Option(
        ..., "--features", help="Features folder (see --split) or one HDF5 features file."
    ),
    clip: str = typer.Option(..., "--clip", help="Clip file name (or its stem), or its index in the file."),
    out: Path = typer.Option(Path("attention.png"), "--out", help="PNG to write."),
    split: str = typer.Option("evaluation", "--split", help="Split to read when --features is a folder."),
    which: str = typer.Option("best", "--which", help="Which model of a run folder: best or last."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, ... or auto."),
) -> None:
    """Plot a clip's log-Mel spectrogram beside its attention map.

    Example: clotho-retrieve explain --checkpoint runs/self --features feats --clip 0 --out att.png
    """
    from clotho_retrieve.plots import explain

    path = explain(checkpoint, features, clip, out, split=split, which=which, device=device)
    err_console.print(f"wrote {path}")


def main() -> None:
    app(prog_name="clotho-retrieve")


if __name__ == "__main__":
    main()
