"""Commands that train and score models: train, evaluate, table, explain."""

from __future__ import annotations

from pathlib import Path

import typer

from clotho_retrieve.cli import _ws, command
from clotho_retrieve.cli_options import Fields, config_options
from clotho_retrieve.config import ModelConfig, TableConfig, TrainConfig
from clotho_retrieve.utils import ClothoRetrieveError, err_console


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
