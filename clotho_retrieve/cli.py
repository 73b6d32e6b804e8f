"""The `clotho-retrieve` command line: a thin Typer layer over the pipeline's Python functions.

Commands are listed in pipeline order. Each one imports its stage lazily, so `--help` and `query`
start fast. Every stage raises :class:`ClothoRetrieveError` for problems the user can act on; the
``command`` decorator turns that into one red line on stderr and exit status 1 (set
``CLOTHO_RETRIEVE_DEBUG=1`` to see the traceback instead).
"""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path

import typer

from clotho_retrieve import __version__
from clotho_retrieve.cli_options import Fields, config_options
from clotho_retrieve.config import ModelConfig, TableConfig, TrainConfig
from clotho_retrieve.utils import ClothoRetrieveError, err_console, one_line

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


def _fail(message: str) -> typer.Exit:
    from rich.markup import escape

    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(1)


def command(name: str, **kwargs):
    """Register a CLI command that reports ClothoRetrieveError (and a failed disk write: full disk,
    no permission) as one line and exit status 1; set CLOTHO_RETRIEVE_DEBUG=1 for the traceback."""

    def decorator(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kw):
            from clotho_retrieve.safety import NO_SPACE, errno_of, is_write_error, no_space

            try:
                return fn(*args, **kw)
            except ClothoRetrieveError as exc:
                if os.environ.get("CLOTHO_RETRIEVE_DEBUG"):
                    raise
                raise _fail(str(exc)) from None
            except (OSError, RuntimeError) as exc:
                if os.environ.get("CLOTHO_RETRIEVE_DEBUG") or not is_write_error(exc):
                    raise
                where = getattr(exc, "filename", None) or name
                if errno_of(exc) in NO_SPACE:
                    raise _fail(str(no_space(where, None, f"what `{name}` writes"))) from None
                raise _fail(f"{where}: {getattr(exc, 'strerror', None) or one_line(exc)}") from None
            except KeyboardInterrupt:
                err_console.print("[yellow]interrupted[/]: finished work is kept; re-run the same command "
                                  "to resume")
                raise typer.Exit(130) from None

        return app.command(name, **kwargs)(wrapper)

    return decorator


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"clotho-retrieve {__version__}")
        raise typer.Exit()


_workspace_root: Path | None = None  # --workspace, set by the root callback before any command runs


@app.callback()
def _root(
    version: bool | None = typer.Option(
        None, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."
    ),
    workspace: Path | None = typer.Option(
        None,
        "--workspace",
        "-w",
        help="Workspace folder (default: $CLOTHO_RETRIEVE_WORKSPACE, else the current folder): Clotho in "
        "data/clotho, features in data/features, runs in runs/, indexes in indexes/.",
    ),
) -> None:
    """Language-based audio retrieval on Clotho."""
    global _workspace_root
    _workspace_root = workspace


def _ws():
    """The workspace every stage takes its default inputs and outputs from (see workspace.py)."""
    from clotho_retrieve.workspace import Workspace

    return Workspace(_workspace_root)


# ----------------------------------------------------------------------------------------------
# download  (owned by clotho_retrieve/download.py)
# ----------------------------------------------------------------------------------------------
@command("download")
def download_cmd(
    root: Path | None = typer.Option(
        None, "--root", help="Clotho folder: ROOT/SPLIT/*.wav and the CSVs. Default: data/clotho."
    ),
    split: str | None = typer.Option(
        None,
        "--split",
        help="development | validation | evaluation | all. Default: all, unless only --weights or "
        "--model is asked for.",
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
        None,
        "--model",
        "--text-model",
        help="Also pre-fetch this Hugging Face model for offline use: a text model to train with "
        "(bert-base-uncased) or a pretrained CLAP model to embed and query with (laion/clap-htsat-unfused).",
    ),
    retries: int = typer.Option(5, "--retries", min=0, help="Retries per file for transient network errors."),
) -> None:
    """1. Download Clotho v2.1 (and optionally PANNs weights, a text model or a CLAP model).

    Resumable, MD5-verified and idempotent: a complete ROOT is left alone without a network request.
    """
    from rich.table import Table

    from clotho_retrieve.download import download_clotho, download_panns, download_text_model
    from clotho_retrieve.utils import console

    if split is not None or not (weights or text_model):
        root = root or _ws().clotho
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
        console.print(f"model {text_model}: {download_text_model(text_model)}")


# ----------------------------------------------------------------------------------------------
# demo-data  (owned by clotho_retrieve/demo.py)
# ----------------------------------------------------------------------------------------------
@command("demo-data")
def demo_data_cmd(
    out: Path | None = typer.Option(
        None, "--out", help="Folder to write (Clotho v2.1 layout: splits + CSVs). Default: data/clotho."
    ),
    n_development: int = typer.Option(250, help="Clips in the development split."),
    n_validation: int = typer.Option(50, help="Clips in the validation split."),
    n_evaluation: int = typer.Option(100, help="Clips in the evaluation split."),
    duration: float = typer.Option(5.0, help="Mean clip length in seconds (each clip within +-20 %)."),
    seed: int = typer.Option(0, help="Random seed; the same seed writes the same files."),
) -> None:
    """Write the synthetic demo dataset in Clotho's on-disk layout.

    Example: clotho-retrieve demo-data   (then: features, train, embed, query)
    """
    from clotho_retrieve.demo import DemoConfig, make_demo_data
    from clotho_retrieve.utils import console

    out = out or _ws().clotho
    sizes = make_demo_data(out, DemoConfig(n_development, n_validation, n_evaluation, duration, seed))
    console.print(f"demo data: {', '.join(f'{n} {s}' for s, n in sizes.items())} clips in {out}")


# ----------------------------------------------------------------------------------------------
# features  (owned by clotho_retrieve/features.py)
# ----------------------------------------------------------------------------------------------
@command("features")
def features_cmd(
    out: Path | None = typer.Option(
        None,
        "--out",
        help="A folder (with --root) or a FILE.h5 (with --audio-dir). Default: data/features "
        "(data/features/DIRNAME.h5 with --audio-dir).",
    ),
    root: Path | None = typer.Option(
        None, help="Clotho-layout root: split folders + clotho_captions_*.csv. Default: data/clotho."
    ),
    audio_dir: Path | None = typer.Option(
        None, help="Any folder of audio (WAV/FLAC/OGG/MP3, searched recursively) to index your own sounds."
    ),
    split: list[str] | None = typer.Option(
        None, help="Only this split (repeatable; with --root). Default: every split found."
    ),
    preset: str | None = typer.Option(
        None, help="Front end: 'paper' (44.1 kHz, Hamming; the default) or 'panns' (32 kHz)."
    ),
    model: str | None = typer.Option(
        None,
        "--model",
        help="Instead of a preset: the input of this pretrained CLAP model (hub id such as "
        "laion/clap-htsat-unfused, or its folder), exactly as its ClapFeatureExtractor computes it.",
    ),
    sample_rate: int | None = typer.Option(None, help="Override the preset's sample rate (Hz)."),
    n_fft: int | None = typer.Option(None, help="Override the FFT size."),
    win_length: int | None = typer.Option(None, help="Override the window length (samples)."),
    hop_length: int | None = typer.Option(None, help="Override the hop (samples)."),
    window: str | None = typer.Option(None, help="Override the window: hamming | hann (periodic)."),
    n_mels: int | None = typer.Option(None, help="Override the number of Mel bands."),
    f_min: float | None = typer.Option(None, help="Override the lowest Mel frequency (Hz)."),
    f_max: float | None = typer.Option(None, help="Override the highest Mel frequency (Hz)."),
    workers: int = typer.Option(0, help="Worker processes; 0 = all cores (shared by torchrun's ranks)."),
    strict: bool = typer.Option(False, help="Stop at the first bad file instead of skipping it."),
    shard: str | None = typer.Option(
        None, help="Compute only part I/N (e.g. 3/8, one job of a SLURM array); `merge` assembles the parts. "
        "Under torchrun each rank takes its part by itself and rank 0 assembles."
    ),
    allow_missing_captions: bool = typer.Option(
        False, help="Use a captions CSV without some of caption_1 .. caption_5 (a warning names them)."
    ),
) -> None:
    """2. Compute log-Mel spectrograms into an HDF5 cache.

    Examples: clotho-retrieve features --root data/clotho --out data/features ;
    clotho-retrieve features --audio-dir ~/sounds --out sounds.h5 --preset panns ;
    clotho-retrieve features --root data/clotho --split evaluation --model laion/clap-htsat-unfused
    --out data/features-clap ;
    torchrun --nproc_per_node 4 -m clotho_retrieve features --root data/clotho --out data/features
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
    if model is not None and (preset is not None or overrides):
        raise ClothoRetrieveError("features: --model sets the front end; drop --preset and the overrides")
    cfg = FeaturesConfig(preset or "paper", overrides, workers, strict, model=model, shard=shard or "",
                         allow_missing_captions=allow_missing_captions)
    ws = _ws()
    if root is None and audio_dir is None:
        root = ws.clotho_root()
    if out is None:
        out = ws.features / f"{Path(audio_dir).resolve().name}.h5" if audio_dir else ws.features
    with _sigterm_as_interrupt():
        results = compute_features(cfg, root=root, out=out, audio_dir=audio_dir, splits=split or None)
    print_report(results)
    if not any("part" in r for r in results):  # a part of a sharded run: the files come later
        ws.record_latest("features", out)


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (a scheduler's stop, torchrun ending the other ranks) acts as Ctrl-C meanwhile: the clips
    finished so far are saved before the process ends."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ----------------------------------------------------------------------------------------------
# train / evaluate  (owned by clotho_retrieve/train.py and clotho_retrieve/evaluate.py)
# ----------------------------------------------------------------------------------------------
# Every option of `train` and `table` comes from a field of ModelConfig / TrainConfig / TableConfig
# (clotho_retrieve/config.py: its default and help, defined once); see clotho_retrieve/cli_options.py.
@command("train")
@config_options(train_cfg=Fields(TrainConfig), model_cfg=Fields(ModelConfig))
def train_cmd(ctx: typer.Context, train_cfg: TrainConfig, model_cfg: ModelConfig) -> None:
    """3. Train a retrieval model (CNN14 + attention x BERT).

    Example: clotho-retrieve train --attention gat   (features from data/features, run in runs/gat-ntxent)

    Resume an interrupted run with: clotho-retrieve train --out runs/self --resume (its settings are saved).

    Under torchrun (torchrun --nproc_per_node N -m clotho_retrieve train ...) it runs DistributedDataParallel.
    """
    from clotho_retrieve import checkpoints
    from clotho_retrieve.cli_options import given_options
    from clotho_retrieve.train import train

    ws = _ws()
    reserved = None
    if train_cfg.features is None and not train_cfg.resume:
        train_cfg.features = str(ws.features_dir())
    if train_cfg.out is None:
        if train_cfg.resume:
            train_cfg.out = str(ws.latest_run(finished=False))
        else:
            reserved = ws.new_run_dir(model_cfg.attention, train_cfg.loss)
            train_cfg.out = str(reserved)
    run = Path(train_cfg.out)
    if train_cfg.resume:  # options given with --resume must agree with the saved run (even at their default)
        given = given_options(ctx)
        values = {n: getattr(train_cfg if hasattr(train_cfg, n) else model_cfg, n) for n in given}
        checkpoints.check_resume(run, values)
    ws.record_started(run)
    try:
        run = train(model_cfg, train_cfg)
    except ClothoRetrieveError:
        if reserved is not None:
            ws.release_run_dir(reserved)
        raise
    except KeyboardInterrupt:
        err_console.print(f"[yellow]interrupted[/]: finished epochs are kept; resume with: "
                          f"{checkpoints.resume_command(run)}", highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None
    ws.record_latest("run", run)


@command("evaluate")
def evaluate_cmd(
    checkpoint: str | None = typer.Option(
        None,
        "--model",
        "--checkpoint",
        help="Model to score: a run folder of `train` (or a model folder), or a pretrained CLAP model "
        "(hub id such as laion/clap-htsat-unfused, or its folder), zero-shot. Default: the latest "
        "finished run.",
    ),
    features: Path | None = typer.Option(
        None,
        "--features",
        help="Features folder (see --split) or one HDF5 features file, computed with the model's front end "
        "(a CLAP model's: `features --model MODEL`). Default: data/features.",
    ),
    split: str = typer.Option("evaluation", "--split", help="Split to score when --features is a folder."),
    which: str = typer.Option("best", "--which", help="Which model of a run folder: best or last."),
    json_out: bool = typer.Option(False, "--json", help="Print the results as JSON instead of a table."),
    submission: Path | None = typer.Option(
        None, "--submission", help="Write DCASE's top-10 CSV: caption,file_name_1,...,file_name_10."
    ),
    relevance: Path | None = typer.Option(
        None,
        "--relevance",
        help="CSV of judged pairs (header: caption or query, file_name, relevance): score those queries "
        "with several relevant clips each (DCASE 2025: R@k, mAP@k) instead of one clip per caption.",
    ),
    k: int | None = typer.Option(
        None, "--k", min=1, help="With --relevance: the mAP@k cutoff (default 16, as DCASE 2025)."
    ),
    batch_size: int = typer.Option(32, "--batch-size", help="Clips per batch."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA if present, else CPU), cpu, cuda, ..."),
) -> None:
    """4. Score a trained run or a CLAP model: text-to-audio and audio-to-text R@k, mAP@10.

    Examples: clotho-retrieve evaluate   (the latest finished run on data/features/evaluation.h5) ;
    clotho-retrieve evaluate --model laion/clap-htsat-unfused --features data/features-clap ;
    clotho-retrieve evaluate --relevance judgements.csv --k 16
    """
    import json

    from clotho_retrieve.evaluate import evaluate, results_table
    from clotho_retrieve.metrics import MAP_K
    from clotho_retrieve.utils import console

    if k is not None and relevance is None:
        raise ClothoRetrieveError("--k goes with --relevance (the one-clip protocol reports mAP@10)")
    ws = _ws()
    checkpoint = checkpoint or ws.latest_run()
    features = features or ws.features_file(split)
    k = k or MAP_K
    result = evaluate(checkpoint, features, split, which, batch_size, device, submission, relevance, k)
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
    index_type: str = typer.Option(
        "auto", "--index-type", help="exact | ivf | hnsw | auto (exact up to 50,000 clips, else ivf)."
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
    clotho-retrieve embed --model laion/clap-htsat-unfused --audio-dir ~/sounds --out sounds-index
    """
    from clotho_retrieve.embed import EmbedConfig, audio_dir_features, embed
    from clotho_retrieve.utils import console, resolve_device

    if features is not None and audio_dir is not None:
        raise ClothoRetrieveError("embed: pass either --features or --audio-dir, not both")
    ws = _ws()
    checkpoint = checkpoint or ws.latest_run()
    features = features or (None if audio_dir is not None else ws.embed_features())
    out = out or ws.index_dir_for(checkpoint)
    cfg = EmbedConfig(batch_size, chunk_size, captions, index_type, which, resolve_device(device))
    if audio_dir is not None:
        from clotho_retrieve.features import print_report

        result = audio_dir_features(checkpoint, audio_dir, out, which, workers)
        print_report([result])
        features, prune = result["out"], True  # the index mirrors the folder
    summary = embed(checkpoint, features, out, cfg, prune=prune)
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
    index_type: str = typer.Option(
        "auto", "--index-type", help="exact (removes the FAISS file) | ivf | hnsw | auto (by size)."
    ),
    nlist: int = typer.Option(0, "--nlist", min=0, help="IVF cells (0: about 2 sqrt(N))."),
    nprobe: int = typer.Option(0, "--nprobe", min=0, help="IVF cells searched per query (0: 16)."),
    hnsw_m: int = typer.Option(32, "--hnsw-m", min=2, help="HNSW neighbours per node."),
    ef_search: int = typer.Option(128, "--ef-search", min=1, help="HNSW search breadth."),
) -> None:
    """Build or rebuild the approximate (FAISS) index of an embedding index.

    Example: clotho-retrieve index demo/index --index-type hnsw
    """
    from clotho_retrieve.index import AnnConfig, build_ann_index
    from clotho_retrieve.utils import console

    cfg = AnnConfig(nlist=nlist, nprobe=nprobe, hnsw_m=hnsw_m, ef_search=ef_search)
    chosen = build_ann_index(index, index_type, cfg)
    console.print(f"{index}: search is now {chosen}", highlight=False)


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

    `embed` does it for the indexes it writes; this is for an older index, or to export again.

    Example: clotho-retrieve export   (the latest index; --index DIR for another)
    """
    from clotho_retrieve.index import EmbeddingIndex
    from clotho_retrieve.query import index_model_dir
    from clotho_retrieve.text_onnx import export_model_dir, tower_dir
    from clotho_retrieve.utils import console

    index = index or _ws().latest_index()
    with EmbeddingIndex(index, in_memory_max=0) as idx:
        model_dir, sha256 = index_model_dir(idx, checkpoint), idx.fingerprint.sha256
    with err_console.status(f"exporting the text tower of {model_dir} to ONNX"):
        folder = export_model_dir(model_dir, tower_dir(index), sha256)
    console.print(f"{folder}: ONNX text tower of {model_dir}", highlight=False)


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

    Example: clotho-retrieve table --features demo/features --out demo/table --backbone tiny --epochs 3 ;
    pretrained CLAP models beside them (zero-shot): add --peers laion/clap-htsat-unfused
    """
    from clotho_retrieve.experiments import rich_table, run_peers, run_table
    from clotho_retrieve.utils import console

    split = table_cfg.split
    ws = _ws()
    table_cfg.features = table_cfg.features or str(ws.features_dir())
    table_cfg.out = table_cfg.out or str(ws.runs / "table")
    peers = run_peers(table_cfg.features, table_cfg.out, table_cfg.peers, split,
                      train_cfg.eval_batch_size, train_cfg.device)  # fmt: skip
    results, md_path, csv_path = run_table(
        table_cfg.features, table_cfg.out, model_cfg, train_cfg, table_cfg.variants, split, peers
    )
    console.print(rich_table(results, split, peers))
    err_console.print(f"wrote {md_path} and {csv_path}")


@command("explain")
def explain_cmd(
    checkpoint: Path | None = typer.Option(
        None,
        "--checkpoint",
        help="Run folder of `train` (attention self or gat), or a model folder. Default: the latest "
        "finished run.",
    ),
    features: Path | None = typer.Option(
        None,
        "--features",
        help="Features folder (see --split) or one HDF5 features file. Default: data/features.",
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

    ws = _ws()
    checkpoint = checkpoint or ws.latest_run()
    features = features or ws.features_file(split)
    path = explain(checkpoint, features, clip, out, split=split, which=which, device=device)
    err_console.print(f"wrote {path}")


# ----------------------------------------------------------------------------------------------
# status  (owned by clotho_retrieve/workspace.py)
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
) -> None:
    """7. Search, browse and listen in a browser, with a JSON API (one process keeps the model loaded).

    Example: clotho-retrieve serve --index demo/index   (then open http://127.0.0.1:8000/)
    """
    from clotho_retrieve.serve import load_libraries, run_server
    from clotho_retrieve.serve.security import is_loopback
    from clotho_retrieve.utils import resolve_device

    if not is_loopback(host):
        err_console.print(
            f"[yellow]warning:[/] serving on {host}: anyone who can reach this machine can search and "
            "download the audio" + ("" if token else "; --token (or CLOTHO_RETRIEVE_TOKEN) requires a token")
        )
    with err_console.status("loading the indexes and their text models"):
        libraries = load_libraries(index, features, audio_root, resolve_device(device), bf16)
    for lib in libraries.values():
        audio = "audio available" if lib.audio_available else "audio unavailable (--audio-root)"
        err_console.print(f"index [bold]{lib.name}[/]: {lib.count:,} clips from {lib.index.path}, {audio}")
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}/" + (f"?token={token}" if token else "")
    err_console.print(f"serving on [bold]{url}[/] (Ctrl+C to stop)", highlight=False, soft_wrap=True)
    run_server(libraries, host, port, token, int(max_upload_mb * 2**20))


# ----------------------------------------------------------------------------------------------
# merge  (owned by clotho_retrieve/features.py)
# ----------------------------------------------------------------------------------------------
@command("merge")
def merge_cmd(
    out: Path | None = typer.Option(
        None, "--out", help="The --out of the `features --shard I/N` runs. Default: data/features."
    ),
) -> None:
    """Assemble the features files of a run split with `features --shard I/N`, once every part finished.

    Example (a SLURM array of 8): clotho-retrieve features --root R --out F --shard $SLURM_ARRAY_TASK_ID/8 ;
    then clotho-retrieve merge --out F
    """
    from clotho_retrieve.features import merge_features, print_report

    ws = _ws()
    out = out or ws.features
    print_report(merge_features(out))
    ws.record_latest("features", out)


def main() -> None:
    try:
        app(prog_name="clotho-retrieve")
    except SystemExit as exc:
        from clotho_retrieve.safety import hard_exit, hdf5_poisoned

        if hdf5_poisoned():  # an HDF5 file whose writes failed: HDF5's clean-up at exit could crash on it
            hard_exit(exc.code if isinstance(exc.code, int) else 1)
        raise


if __name__ == "__main__":
    main()
