"""Commands that bring data in: download, demo-data, features, merge."""

from __future__ import annotations

import contextlib
from pathlib import Path

import typer

from clotho_retrieve.cli import _ws, command
from clotho_retrieve.utils import ClothoRetrieveError


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
