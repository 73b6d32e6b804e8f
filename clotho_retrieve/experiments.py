"""The paper's Table I: four model variants trained and evaluated with identical settings.

Xiao et al. (2023), Table I, compare on the Clotho evaluation split (text-to-audio, %):

    variant                          attention   loss              R@1   R@5   R@10  mAP@10
    CNN14 only                       none        NT-Xent (Eq. 6)   13.7  35.6  48.7  23.2
    graph attention                  gat         NT-Xent (Eq. 6)   14.6  36.2  50.2  23.9
    self-attention                   self        NT-Xent (Eq. 6)   14.1  38.0  51.3  24.3
    self-attention + supervised      self        SupCon (Eq. 7)    14.0  38.5  52.0  24.4

:func:`run_table` trains each variant into ``OUT/<variant>/`` (same seed, same settings except the
attention module and the loss), evaluates it, and :func:`write_table` writes ``OUT/table.md`` and
``OUT/table.csv`` with our numbers beside the paper's and beside chance level. :func:`run_peers` adds
pretrained CLAP models (``table --peers``), scored zero-shot on the same split with their own input
(computed from the Clotho root the features came from into ``FEATURES-<model>/``).

Resumable: a variant whose ``OUT/<variant>/table_result.json`` exists is neither retrained nor
re-evaluated; one whose training was interrupted resumes from its ``last/`` checkpoint. A peer whose
``OUT/peers/<model>.json`` exists is not evaluated again.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from dataclasses import dataclass
from pathlib import Path

from clotho_retrieve.utils import ClothoRetrieveError, atomic_write_text, err_console

METRICS: tuple[str, ...] = ("R@1", "R@5", "R@10", "mAP@10")


@dataclass(frozen=True)
class Variant:
    """One row of Table I: which attention module (Sec. 2.2) and which loss (Sec. 2.4)."""

    name: str  # folder name and --variants key
    label: str  # row label as in the paper
    attention: str  # none | gat (Eq. 1-2) | self (Eq. 3-4)
    loss: str  # ntxent (Eq. 6) | supcon (Eq. 7)


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("cnn14", "CNN14 only", "none", "ntxent"),
        Variant("gat", "graph attention", "gat", "ntxent"),
        Variant("self", "self-attention", "self", "ntxent"),
        Variant("self-supcon", "self-attention + supervised", "self", "supcon"),
    )
}

# Table I of the paper, Clotho evaluation split, text-to-audio, in percent.
PAPER_TABLE_I: dict[str, dict[str, float]] = {
    "cnn14": {"R@1": 13.7, "R@5": 35.6, "R@10": 48.7, "mAP@10": 23.2},
    "gat": {"R@1": 14.6, "R@5": 36.2, "R@10": 50.2, "mAP@10": 23.9},
    "self": {"R@1": 14.1, "R@5": 38.0, "R@10": 51.3, "mAP@10": 24.3},
    "self-supcon": {"R@1": 14.0, "R@5": 38.5, "R@10": 52.0, "mAP@10": 24.4},
}

RESULT_FILE = "table_result.json"  # per variant: the evaluation metrics, written last (= "finished")
PEERS_DIR = "peers"  # OUT/peers/<slug>.json: a peer's zero-shot evaluation


def parse_variants(spec: str | list[str] | None) -> list[Variant]:
    """``"gat,self"`` (or a list of names, or None for all four; "none": no variant, e.g. peers only)
    -> Variants in the paper's order."""
    if spec is None:
        return list(VARIANTS.values())
    if isinstance(spec, str) and spec.strip().lower() == "none":
        return []
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [n.strip() for n in names if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        raise ClothoRetrieveError(
            f"--variants: unknown variant(s) {', '.join(unknown) or '(none given)'}; "
            f"choose from {', '.join(VARIANTS)}"
        )
    return [v for v in VARIANTS.values() if v.name in names]


def chance_level(n_clips: int) -> dict[str, float]:
    """Expected metrics of a random ranking of ``n_clips`` clips with one relevant clip per query.

    R@k = k / N (the relevant clip's rank is uniform on 1..N); mAP@10 = E[1/rank; rank <= 10]
    = (1/N) * sum_{r=1}^{min(10, N)} 1/r. Fractions in [0, 1], like the metrics module.
    """
    if n_clips < 1:
        raise ValueError("n_clips must be >= 1")
    chance = {f"R@{k}": min(k, n_clips) / n_clips for k in (1, 5, 10)}
    chance["mAP@10"] = sum(1.0 / r for r in range(1, min(10, n_clips) + 1)) / n_clips
    return chance


# ----------------------------------------------------------------------------------------------
# Writers
# ----------------------------------------------------------------------------------------------
def peer_label(peer: str) -> str:
    return f"{peer} (zero-shot)"


Rows = list[tuple[str, str, dict[str, float]]]


def _rows(results: dict[str, dict[str, float]], n_clips: int, peers: dict | None = None) -> Rows:
    """(source, label, metrics in %) rows: ours (variants run), peers (zero-shot), the paper's four,
    chance level."""
    rows: Rows = []
    for name, metrics in results.items():
        rows.append(("ours", VARIANTS[name].label, {m: 100.0 * metrics[m] for m in METRICS}))
    for peer, metrics in (peers or {}).items():
        rows.append(("peer", peer_label(peer), {m: 100.0 * metrics[m] for m in METRICS}))
    for name, metrics in PAPER_TABLE_I.items():
        rows.append(("paper", VARIANTS[name].label, dict(metrics)))
    rows.append(
        ("chance", f"chance level (N = {n_clips})", {m: 100.0 * v for m, v in chance_level(n_clips).items()})
    )
    return rows


def table_csv(results: dict[str, dict[str, float]], n_clips: int, peers: dict | None = None) -> str:
    """CSV with columns source, variant, R@1, R@5, R@10, mAP@10 (percent, 2 decimals)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["source", "variant", *METRICS])
    for source, label, metrics in _rows(results, n_clips, peers):
        writer.writerow([source, label, *(f"{metrics[m]:.2f}" for m in METRICS)])
    return buf.getvalue()


def table_markdown(
    results: dict[str, dict[str, float]],
    n_clips: int,
    split: str = "evaluation",
    note: str = "",
    peers: dict | None = None,
) -> str:
    """Markdown table: our rows, then the paper's Table I, then chance level (all in %)."""
    lines = [
        f"# Table I: text-to-audio retrieval on the `{split}` split ({n_clips} clips), %",
        "",
        "| source | variant | " + " | ".join(METRICS) + " |",
        "| --- | --- | " + " | ".join("---:" for _ in METRICS) + " |",
    ]
    for source, label, metrics in _rows(results, n_clips, peers):
        lines.append(f"| {source} | {label} | " + " | ".join(f"{metrics[m]:.1f}" for m in METRICS) + " |")
    lines += [
        "",
        "Paper: Xiao, Zhu, Guan, Wang (2023), Table I, Clotho v2.1 evaluation split. "
        "Chance: R@k = k/N, mAP@10 = (1/N) sum_{r<=10} 1/r.",
    ]
    if peers:
        lines += ["", "Peers: pretrained CLAP models, not trained on Clotho here (zero-shot), each given its "
                  "own ClapFeatureExtractor input of the same clips."]  # fmt: skip
    if note:
        lines += ["", note]
    return "\n".join(lines) + "\n"


def write_table(
    results: dict[str, dict[str, float]],
    out_dir: str | Path,
    n_clips: int,
    split: str = "evaluation",
    note: str = "",
    peers: dict[str, dict[str, float]] | None = None,
) -> tuple[Path, Path]:
    """Write ``out_dir/table.md`` and ``out_dir/table.csv`` atomically; return their paths.

    ``results`` maps variant names (keys of :data:`VARIANTS`) to metric dicts with fractions in [0, 1];
    ``peers`` maps pretrained models (as given to --peers) to the same (rows "MODEL (zero-shot)").
    """
    for name in results:
        if name not in VARIANTS:
            raise ClothoRetrieveError(f"table: unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
    for name, metrics in {**results, **(peers or {})}.items():
        missing = [m for m in METRICS if m not in metrics]
        if missing:
            raise ClothoRetrieveError(f"table: results of {name!r} lack {', '.join(missing)}")
    out_dir = Path(out_dir)
    md_path, csv_path = out_dir / "table.md", out_dir / "table.csv"
    atomic_write_text(md_path, table_markdown(results, n_clips, split, note, peers))
    atomic_write_text(csv_path, table_csv(results, n_clips, peers))
    return md_path, csv_path


def rich_table(results: dict[str, dict[str, float]], split: str, peers: dict | None = None):
    """The table `table` prints: ours / the paper's per variant run, then each peer (zero-shot), in %."""
    from rich.table import Table

    table = Table(title=f"Table I on the {split} split: text-to-audio, %, ours / paper")
    table.add_column("variant")
    for m in METRICS:
        table.add_column(m, justify="right")
    for name, metrics in results.items():
        paper = PAPER_TABLE_I[name]
        table.add_row(VARIANTS[name].label, *(f"{100 * metrics[m]:.1f} / {paper[m]:.1f}" for m in METRICS))
    for peer, metrics in (peers or {}).items():
        table.add_row(peer_label(peer), *(f"{100 * metrics[m]:.1f} / -" for m in METRICS))
    return table


# ----------------------------------------------------------------------------------------------
# The experiment
# ----------------------------------------------------------------------------------------------
def _text_to_audio(metrics: dict) -> dict[str, float]:
    """The text-to-audio metrics (Table I's direction) of evaluate()'s result."""
    metrics = metrics.get("text_to_audio", metrics)
    missing = [m for m in METRICS if m not in metrics]
    if missing:
        raise ClothoRetrieveError(
            f"table: evaluate() returned no {', '.join(missing)} (got keys {sorted(metrics)})"
        )
    return {m: float(metrics[m]) for m in METRICS}


# TrainConfig fields that are not compared between variants: set per variant, or only say where and
# how fast to run (a resumed table may move to another device); everything else, seed included, is shared.
_PER_VARIANT_TRAIN_FIELDS = ("loss", "out", "resume", "device", "num_workers", "eval_batch_size")


def _settings(model_cfg, train_cfg) -> dict:
    """The settings every variant shares, as JSON-able dicts (attention and loss are set per variant)."""
    model = {k: v for k, v in dataclasses.asdict(model_cfg).items() if k != "attention"}
    train = {k: v for k, v in dataclasses.asdict(train_cfg).items() if k not in _PER_VARIANT_TRAIN_FIELDS}
    return json.loads(json.dumps({"model": model, "train": train}, default=str))


def _check_settings(out: Path, settings: dict) -> None:
    """Refuse to mix variants trained with different shared settings in one --out folder."""
    path = out / "table_settings.json"
    if path.is_file():
        previous = json.loads(path.read_text(encoding="utf-8"))
        changed = sorted(
            f"{part}.{k}"
            for part in ("model", "train")
            for k in set(previous.get(part, {})) | set(settings[part])
            if previous.get(part, {}).get(k) != settings[part].get(k)
        )
        if changed:
            raise ClothoRetrieveError(
                f"{path}: the variants in {out} were trained with other settings ({', '.join(changed)}); "
                "use a new --out folder, or the same settings to resume"
            )
    else:
        atomic_write_text(path, json.dumps(settings, indent=2) + "\n")


def run_table(
    features: str | Path,
    out: str | Path,
    model_cfg,
    train_cfg,
    variants: str | list[str] | None = None,
    split: str = "evaluation",
    peers: dict[str, dict[str, float]] | None = None,
) -> tuple[dict[str, dict[str, float]], Path, Path]:
    """Train and evaluate each variant with identical settings and seed; write table.md and table.csv.

    ``model_cfg`` (ModelConfig) and ``train_cfg`` (TrainConfig) hold the shared settings; each variant
    only changes ``model_cfg.attention`` and ``train_cfg.loss`` and trains into ``out/<variant>/``.
    ``peers``: zero-shot rows to add (:func:`run_peers`' result). Returns (text-to-audio metrics per
    variant as fractions, table.md path, table.csv path).
    """
    from clotho_retrieve.evaluate import evaluate
    from clotho_retrieve.feature_file import FeatureFile, features_path
    from clotho_retrieve.plots import plot_training_curves
    from clotho_retrieve.train import train

    features, out = Path(features), Path(out)
    train_cfg = dataclasses.replace(train_cfg, features=str(features.resolve()))
    chosen = parse_variants(variants)
    eval_file = features_path(features, split)
    with FeatureFile(eval_file) as ff:
        n_clips = len(ff)
    if n_clips == 0:
        raise ClothoRetrieveError(f"{eval_file}: no clips to evaluate on")
    out.mkdir(parents=True, exist_ok=True)
    _check_settings(out, _settings(model_cfg, train_cfg))
    note = ""
    if getattr(train_cfg, "captions", "all") == "random" and VARIANTS["self-supcon"] in chosen:
        # One caption per clip and epoch: no batch holds two captions of a clip, so Eq. 7 has no extra
        # positives and equals Eq. 6 -- the supervised row repeats the self-attention row.
        note = (
            "Note: trained with --captions random, where supervised contrastive loss (Eq. 7) equals "
            "NT-Xent (Eq. 6); use --captions all to compare them."
        )
        err_console.print(f"[yellow]warning:[/] {note}")

    results: dict[str, dict[str, float]] = {}
    for variant in chosen:
        run_dir = out / variant.name
        result_path = run_dir / RESULT_FILE
        if result_path.is_file():
            results[variant.name] = _text_to_audio(
                json.loads(result_path.read_text(encoding="utf-8"))["metrics"]
            )
            err_console.print(f"[green]{variant.name}[/]: finished earlier, not retrained ({result_path})")
            continue
        err_console.rule(f"{variant.label}: attention {variant.attention}, loss {variant.loss}")
        resume = (run_dir / "last" / "trainer_state.pt").is_file()
        if not resume and (run_dir / "config.json").is_file():
            # Interrupted before its first checkpoint: nothing learned yet, so start this variant over.
            err_console.print(f"{run_dir}: no checkpoint yet; starting this variant over")
            (run_dir / "config.json").unlink()
        run = train(
            dataclasses.replace(model_cfg, attention=variant.attention),
            dataclasses.replace(train_cfg, loss=variant.loss, out=str(run_dir), resume=resume),
        )
        if (Path(run) / "metrics.jsonl").is_file():
            plot_training_curves(run)  # RUN/curves.png: loss and validation mAP@10 per epoch
        metrics = evaluate(
            run, features, split, batch_size=train_cfg.eval_batch_size, device=train_cfg.device
        )
        results[variant.name] = _text_to_audio(metrics)
        record = {"variant": dataclasses.asdict(variant), "split": split, "run": str(run), "metrics": metrics}
        atomic_write_text(result_path, json.dumps(record, indent=2, default=float) + "\n")

    for peer, metrics in (peers or {}).items():
        if metrics.get("n_clips", n_clips) != n_clips:
            note += (f"\n\n{peer_label(peer)} is scored on {metrics['n_clips']} clips: its features of the "
                     f"split hold a different set of readable clips than {eval_file}.")  # fmt: skip
    md_path, csv_path = write_table(results, out, n_clips, split, note.strip(), peers)
    return results, md_path, csv_path


# ----------------------------------------------------------------------------------------------
# Peers: pretrained CLAP models, zero-shot
# ----------------------------------------------------------------------------------------------
def peer_slug(peer: str) -> str:
    """A folder-name-safe form of a model name: laion/clap-htsat-unfused -> laion-clap-htsat-unfused."""
    import re

    return re.sub(r"[^A-Za-z0-9._]+", "-", str(peer).strip("/")).strip("-.") or "model"


def peer_features(features: Path, peer: str, split: str, workers: int = 0) -> Path:
    """The features folder holding ``split`` with ``peer``'s front end: FEATURES-<slug>/, computed (or
    brought up to date) from the Clotho root recorded in FEATURES/<split>.h5 (its ``source`` attribute)."""
    from clotho_retrieve.feature_file import FeatureFile, features_path
    from clotho_retrieve.features import FeaturesConfig, compute_features

    features = Path(features)
    folder = features.parent / f"{features.name}-{peer_slug(peer)}"
    with FeatureFile(features_path(features, split)) as ff:
        root = ff.attrs.get("source")
    if root and Path(root).is_dir():
        compute_features(FeaturesConfig(model=peer, workers=workers), root=root, out=folder, splits=[split])
    elif not features_path(folder, split).is_file():
        raise ClothoRetrieveError(
            f"{features_path(features, split)}: its Clotho root ({root or 'not recorded'}) is not here to "
            f"compute {peer}'s input from; run `clotho-retrieve features --root ROOT --split {split} "
            f"--model {peer} --out {folder}`"
        )
    return folder


def run_peers(
    features: str | Path,
    out: str | Path,
    peers: str | list[str] | None,
    split: str = "evaluation",
    batch_size: int = 32,
    device: str = "auto",
    workers: int = 0,
) -> dict[str, dict[str, float]]:
    """Score each pretrained model of ``peers`` ("A,B" or a list) zero-shot on ``split``: its features
    (:func:`peer_features`), then evaluate(); results cached in OUT/peers/<slug>.json. Returns model ->
    text-to-audio metrics (fractions) plus "n_clips"."""
    from clotho_retrieve.clap import is_clap_model
    from clotho_retrieve.evaluate import evaluate

    names = peers.split(",") if isinstance(peers, str) else list(peers or [])
    results: dict[str, dict[str, float]] = {}
    for peer in (n.strip() for n in names if n.strip()):
        if not is_clap_model(peer):
            raise ClothoRetrieveError(
                f"--peers {peer}: not a CLAP model (a hub id such as laion/clap-htsat-unfused, or a folder "
                "whose config.json has model_type clap)"
            )
        result_path = Path(out) / PEERS_DIR / f"{peer_slug(peer)}.json"
        if result_path.is_file():
            record = json.loads(result_path.read_text(encoding="utf-8"))
            err_console.print(f"[green]{peer}[/]: scored earlier ({result_path})")
        else:
            err_console.rule(f"{peer_label(peer)}")
            folder = peer_features(Path(features), peer, split, workers)
            metrics = evaluate(peer, folder, split, batch_size=batch_size, device=device)
            record = {"peer": peer, "split": split, "features": str(folder), "metrics": metrics}
            atomic_write_text(result_path, json.dumps(record, indent=2, default=float) + "\n")
        results[peer] = {**_text_to_audio(record["metrics"]), "n_clips": record["metrics"].get("n_clips")}
    return results
