"""Table I: writers against hand-made metrics, chance level by hand, the orchestration and resuming."""

from __future__ import annotations

import csv
import dataclasses
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from clotho_retrieve.experiments import (
    PAPER_TABLE_I,
    VARIANTS,
    chance_level,
    parse_variants,
    run_table,
    write_table,
)
from clotho_retrieve.utils import ClothoRetrieveError

OURS = {
    "cnn14": {"R@1": 0.125, "R@5": 0.5, "R@10": 0.75, "mAP@10": 0.3125},
    "self-supcon": {"R@1": 0.0, "R@5": 0.25, "R@10": 1.0, "mAP@10": 0.1},
}


def test_chance_level_by_hand():
    # N = 4 clips: R@1 = 1/4, R@5 = R@10 = 1 (every clip is in the top 4);
    # mAP@10 = (1/4)(1 + 1/2 + 1/3 + 1/4) = 25/48.
    assert chance_level(4) == pytest.approx({"R@1": 0.25, "R@5": 1.0, "R@10": 1.0, "mAP@10": 25 / 48})
    # N = 1045 (Clotho evaluation): R@10 = 10/1045, mAP@10 = H_10 / 1045, H_10 = 7381/2520.
    c = chance_level(1045)
    assert c["R@10"] == pytest.approx(10 / 1045)
    assert c["mAP@10"] == pytest.approx(7381 / 2520 / 1045)


def test_chance_level_matches_random_rankings():
    """A property: the closed form equals the average over every possible rank of the relevant clip."""
    n = 37
    ranks = range(1, n + 1)
    assert chance_level(n)["R@5"] == pytest.approx(sum(r <= 5 for r in ranks) / n)
    assert chance_level(n)["mAP@10"] == pytest.approx(sum(1 / r if r <= 10 else 0 for r in ranks) / n)


def test_csv_parses_back_to_the_same_numbers(tmp_path):
    md_path, csv_path = write_table(OURS, tmp_path, n_clips=4)
    with open(csv_path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    ours = {r["variant"]: r for r in rows if r["source"] == "ours"}
    assert set(ours) == {"CNN14 only", "self-attention + supervised"}
    for name, metrics in OURS.items():
        row = ours[VARIANTS[name].label]
        for key, value in metrics.items():
            assert float(row[key]) == pytest.approx(100 * value, abs=0.005)
    paper = {r["variant"]: r for r in rows if r["source"] == "paper"}
    assert float(paper["graph attention"]["R@1"]) == 14.6
    assert float(paper["self-attention + supervised"]["R@10"]) == 52.0
    (chance,) = [r for r in rows if r["source"] == "chance"]
    assert float(chance["R@1"]) == 25.0
    assert float(chance["mAP@10"]) == pytest.approx(100 * 25 / 48, abs=0.005)


def test_markdown_has_the_papers_rows(tmp_path):
    md_path, _ = write_table(OURS, tmp_path, n_clips=1045)
    md = md_path.read_text()
    assert "| paper | CNN14 only | 13.7 | 35.6 | 48.7 | 23.2 |" in md
    assert "| paper | graph attention | 14.6 | 36.2 | 50.2 | 23.9 |" in md
    assert "| paper | self-attention | 14.1 | 38.0 | 51.3 | 24.3 |" in md
    assert "| paper | self-attention + supervised | 14.0 | 38.5 | 52.0 | 24.4 |" in md
    assert "| ours | CNN14 only | 12.5 | 50.0 | 75.0 | 31.2 |" in md
    assert "| chance | chance level (N = 1045) | 0.1 | 0.5 | 1.0 | 0.3 |" in md
    # Every table row has the same number of cells.
    rows = [line for line in md.splitlines() if line.startswith("|")]
    assert len(rows) == 2 + len(OURS) + len(PAPER_TABLE_I) + 1
    assert len({line.count("|") for line in rows}) == 1


def test_write_table_rejects_incomplete_results(tmp_path):
    with pytest.raises(ClothoRetrieveError, match="lack mAP@10"):
        write_table({"gat": {"R@1": 0.1, "R@5": 0.2, "R@10": 0.3}}, tmp_path, n_clips=10)
    assert not (tmp_path / "table.md").exists()


def test_parse_variants():
    assert [v.name for v in parse_variants(None)] == ["cnn14", "gat", "self", "self-supcon"]
    assert [v.name for v in parse_variants("self-supcon, cnn14")] == ["cnn14", "self-supcon"]  # paper order
    assert [(v.attention, v.loss) for v in parse_variants(None)] == [
        ("none", "ntxent"),
        ("gat", "ntxent"),
        ("self", "ntxent"),
        ("self", "supcon"),
    ]
    with pytest.raises(ClothoRetrieveError, match="unknown variant.*selfie"):
        parse_variants("self,selfie")


# ----------------------------------------------------------------------------------------------
# Orchestration, with train/evaluate replaced by recording fakes
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class FakeModelConfig:
    backbone: str = "tiny"
    attention: str = "self"
    embed_dim: int = 8


@dataclasses.dataclass
class FakeTrainConfig:
    features: str = ""
    out: str = "runs/x"
    loss: str = "ntxent"
    epochs: int = 1
    seed: int = 1234
    resume: bool = False
    device: str = "cpu"
    eval_batch_size: int = 4
    captions: str = "all"


class FakeTrainer:
    """Stands in for clotho_retrieve.train and .evaluate: records calls; can be interrupted once."""

    def __init__(self, interrupt: str | None = None):
        self.calls: list[tuple[FakeModelConfig, FakeTrainConfig]] = []
        self.evaluated: list[tuple[Path, Path, str]] = []
        self.interrupt = interrupt

    def train(self, model_cfg, train_cfg) -> Path:
        self.calls.append((model_cfg, train_cfg))
        run = Path(train_cfg.out)
        if not train_cfg.resume and ((run / "config.json").exists() or (run / "last").exists()):
            raise ClothoRetrieveError(f"{run}: already holds a run")  # as the real train() does
        (run / "last").mkdir(parents=True, exist_ok=True)
        (run / "config.json").write_text("{}")
        (run / "last" / "trainer_state.pt").write_bytes(b"")
        (run / "metrics.jsonl").write_text(
            json.dumps({"epoch": 1, "train_loss": 1.0, "val/mAP@10": 0.1}) + "\n"
        )
        if self.interrupt == Path(train_cfg.out).name:
            self.interrupt = None
            raise KeyboardInterrupt
        return run

    def evaluate(self, run, features, split, batch_size, device) -> dict:
        self.evaluated.append((Path(run), Path(features), split, device))
        r1 = 0.1 * (1 + list(VARIANTS).index(Path(run).name))  # a distinct, known number per variant
        t2a = {"R@1": r1, "R@5": 0.5, "R@10": 0.75, "mAP@10": 0.25}
        return {"text_to_audio": t2a, "audio_to_text": {k: 0.0 for k in t2a}}

    def install(self, monkeypatch) -> None:
        for name, fn in (("train", self.train), ("evaluate", self.evaluate)):
            module = types.ModuleType(f"clotho_retrieve.{name}")
            setattr(module, name, fn)
            monkeypatch.setitem(sys.modules, f"clotho_retrieve.{name}", module)


@pytest.fixture()
def tiny_features(tmp_path) -> Path:
    from clotho_retrieve.feature_file import write_feature_file
    from clotho_retrieve.frontend import PRESETS

    folder = tmp_path / "features"
    rng = np.random.default_rng(0)
    names = [f"clip{i}.wav" for i in range(5)]
    mels = [rng.normal(size=(20, 64)).astype(np.float32) for _ in names]
    write_feature_file(folder / "evaluation.h5", names, mels, [1.0] * 5, PRESETS["paper"], [["a cap"]] * 5)
    return folder


def test_run_table_trains_each_variant_with_identical_settings(tmp_path, tiny_features, monkeypatch):
    fake = FakeTrainer()
    fake.install(monkeypatch)
    out = tmp_path / "table"
    results, md_path, csv_path = run_table(tiny_features, out, FakeModelConfig(), FakeTrainConfig())

    assert [(m.attention, t.loss) for m, t in fake.calls] == [
        ("none", "ntxent"),
        ("gat", "ntxent"),
        ("self", "ntxent"),
        ("self", "supcon"),
    ]
    assert [Path(t.out) for _, t in fake.calls] == [out / name for name in VARIANTS]
    # Everything but attention, loss and the output folder is the same for every variant.
    assert {(m.backbone, m.embed_dim, t.seed, t.epochs, t.resume) for m, t in fake.calls} == {
        ("tiny", 8, 1234, 1, False)
    }
    assert {t.features for _, t in fake.calls} == {str(tiny_features.resolve())}
    assert [e[2:] for e in fake.evaluated] == [("evaluation", "cpu")] * 4
    assert results["gat"]["R@1"] == pytest.approx(0.2)
    assert "| ours | graph attention | 20.0 | 50.0 | 75.0 | 25.0 |" in md_path.read_text()
    assert "| chance | chance level (N = 5) | 20.0 | 100.0 | 100.0 | 45.7 |" in md_path.read_text()
    assert csv_path.is_file() and (out / "self" / "curves.png").is_file()


def test_run_table_resumes(tmp_path, tiny_features, monkeypatch):
    """A finished variant is not retrained; an interrupted one resumes via train's resume flag."""
    fake = FakeTrainer(interrupt="gat")
    fake.install(monkeypatch)
    out = tmp_path / "table"
    with pytest.raises(KeyboardInterrupt):
        run_table(tiny_features, out, FakeModelConfig(), FakeTrainConfig())
    assert (out / "cnn14" / "table_result.json").is_file()
    assert not (out / "table.md").exists()

    fake.calls.clear()
    results, md_path, _ = run_table(
        tiny_features, out, FakeModelConfig(), FakeTrainConfig(), variants="cnn14,gat"
    )
    assert [(Path(t.out).name, t.resume) for _, t in fake.calls] == [("gat", True)]
    assert list(results) == ["cnn14", "gat"]
    assert results["cnn14"]["R@1"] == pytest.approx(0.1)  # read back from the first run


def test_run_table_starts_over_a_variant_interrupted_before_its_first_checkpoint(
    tmp_path, tiny_features, monkeypatch
):
    fake = FakeTrainer()
    fake.install(monkeypatch)
    out = tmp_path / "table"
    (out / "gat").mkdir(parents=True)
    (out / "gat" / "config.json").write_text("{}")  # what train writes before its first epoch ends
    run_table(tiny_features, out, FakeModelConfig(), FakeTrainConfig(), variants="gat")
    assert [(Path(t.out).name, t.resume) for _, t in fake.calls] == [("gat", False)]


def test_run_table_refuses_other_settings_in_the_same_folder(tmp_path, tiny_features, monkeypatch):
    FakeTrainer().install(monkeypatch)
    out = tmp_path / "table"
    run_table(tiny_features, out, FakeModelConfig(), FakeTrainConfig(), variants="cnn14")
    with pytest.raises(ClothoRetrieveError, match=r"other settings \(train.seed\)"):
        run_table(tiny_features, out, FakeModelConfig(), FakeTrainConfig(seed=7), variants="gat")


# ----------------------------------------------------------------------------------------------
# The real thing, one variant: train.train / evaluate.evaluate / explain on a tiny generated folder
# ----------------------------------------------------------------------------------------------
def test_table_command_trains_and_explains_for_real(tmp_path, minilm_path):
    """`table` with the real trainer (tiny backbone, frozen MiniLM, 1 epoch), then `explain` on its run."""
    from matplotlib.image import imread
    from typer.testing import CliRunner

    from clotho_retrieve.cli import app
    from clotho_retrieve.feature_file import write_feature_file
    from clotho_retrieve.frontend import PRESETS
    from clotho_retrieve.plots import DPI, EXPLAIN_SIZE

    rng = np.random.default_rng(0)
    feats = tmp_path / "features"
    for split, n in (("development", 6), ("validation", 3), ("evaluation", 3)):
        names = [f"{split}_{i}.wav" for i in range(n)]
        mels = [rng.normal(size=(int(rng.integers(40, 70)), 64)).astype(np.float32) for _ in names]
        caps = [[f"sound {i} of the {split} split"] for i in range(n)]
        write_feature_file(feats / f"{split}.h5", names, mels, [1.0] * n, PRESETS["paper"], caps)

    out = tmp_path / "table"
    common = ["--features", str(feats), "--out", str(out), "--variants", "self-supcon", "--backbone", "tiny"]
    common += ["--text-model", minilm_path, "--text-trainable-layers", "0", "--d-a", "16", "--embed-dim", "8"]
    common += ["--epochs", "1", "--batch-size", "3", "--device", "cpu", "--val-split", "none"]
    result = CliRunner().invoke(app, ["table", *common])
    assert result.exit_code == 0, result.output
    run = out / "self-supcon"
    config = json.loads((run / "config.json").read_text())
    assert (config["model"]["attention"], config["train"]["loss"]) == ("self", "supcon")
    saved = json.loads((run / "table_result.json").read_text())
    with open(out / "table.csv", newline="") as fh:
        (ours,) = [r for r in csv.DictReader(fh) if r["source"] == "ours"]
    assert ours["variant"] == "self-attention + supervised"
    assert float(ours["mAP@10"]) == pytest.approx(
        100 * saved["metrics"]["text_to_audio"]["mAP@10"], abs=0.005
    )
    assert 1 / 3 - 1e-9 <= saved["metrics"]["text_to_audio"]["mAP@10"] <= 1.0  # 3 clips: rank <= 3
    assert (run / "curves.png").is_file()

    # Finished: re-running does not train again (the run folder is left as it was).
    mtime = (run / "last" / "trainer_state.pt").stat().st_mtime_ns
    assert CliRunner().invoke(app, ["table", *common]).exit_code == 0
    assert (run / "last" / "trainer_state.pt").stat().st_mtime_ns == mtime

    png = tmp_path / "explain.png"
    args = ["explain", "--checkpoint", str(run), "--features", str(feats), "--clip", "evaluation_1"]
    result = CliRunner().invoke(app, [*args, "--out", str(png)])
    assert result.exit_code == 0, result.output
    assert imread(png).shape[:2] == (EXPLAIN_SIZE[1] * DPI, EXPLAIN_SIZE[0] * DPI)


def test_run_table_notes_that_supcon_equals_ntxent_with_one_caption_per_clip(
    tmp_path, tiny_features, monkeypatch
):
    FakeTrainer().install(monkeypatch)
    _, md_all, _ = run_table(
        tiny_features, tmp_path / "a", FakeModelConfig(), FakeTrainConfig(), "self-supcon"
    )
    assert "--captions random" not in md_all.read_text()
    cfg = FakeTrainConfig(captions="random")
    _, md_random, _ = run_table(tiny_features, tmp_path / "r", FakeModelConfig(), cfg, "self-supcon")
    assert "trained with --captions random" in md_random.read_text()
