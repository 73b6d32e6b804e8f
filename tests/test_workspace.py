"""The workspace: conventional folders, next-step errors, run names, "latest" records, status.

One real pipeline is built once (demo-data -> features -> two trains of the same variant, the second
interrupted after its first checkpoint -> embed), then each test checks one promise against it, or
against a fresh workspace when it needs one.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import threading
from pathlib import Path

import pytest
from rich.console import Console

from clotho_retrieve.demo import DemoConfig, make_demo_data
from clotho_retrieve.utils import ClothoRetrieveError
from clotho_retrieve.workspace import ENV_VAR, STATE, Workspace, run_complete, status_table

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

TINY = DemoConfig(n_development=6, n_validation=3, n_evaluation=3, duration=1.0, seed=3)


class Interrupted(Exception):
    """Stands for a kill: raised after an epoch's checkpoint, so train never returns."""


def _digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


def _train(ws: Workspace, minilm: str, run: Path, epochs: int, stop_after: int | None = None, **kw) -> Path:
    """`train --attention gat` as the CLI will run it: record_started, train, record_latest on return."""
    from clotho_retrieve.models import ModelConfig
    from clotho_retrieve.train import TrainConfig, train

    model_cfg = ModelConfig(backbone="tiny", attention="gat", d_a=32, embed_dim=16, text_model=minilm,
                            text_trainable_layers=0, dropout=0.0)  # fmt: skip
    train_cfg = TrainConfig(features=str(ws.features_dir()), out=str(run), batch_size=6, lr=1e-3,
                            epochs=epochs, warmup_epochs=0, eval_batch_size=3, **kw)  # fmt: skip

    def stop(epoch, record):
        if epoch == stop_after:
            raise Interrupted

    ws.record_started(run)
    out = train(model_cfg, train_cfg, on_epoch_end=stop)
    ws.record_latest("run", out)
    return out


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, minilm_path):
    """A workspace after demo-data, features, a finished gat run, a killed gat run and an embed."""
    from clotho_retrieve.embed import EmbedConfig, embed
    from clotho_retrieve.features import FeaturesConfig, compute_features

    ws = Workspace(tmp_path_factory.mktemp("ws"))
    make_demo_data(ws.clotho, TINY, show_progress=False)
    compute_features(FeaturesConfig(workers=1), root=ws.clotho_root(), out=ws.features)
    ws.record_latest("features", ws.features)

    finished = _train(ws, minilm_path, ws.new_run_dir("gat", "ntxent"), epochs=1)
    finished_files = _digest(finished)
    killed = ws.new_run_dir("gat", "ntxent")
    with pytest.raises(Interrupted):
        _train(ws, minilm_path, killed, epochs=2, stop_after=1)

    index = ws.index_dir_for(ws.latest_run())
    embed(ws.latest_run(), ws.features_file(), index, EmbedConfig(device="cpu"))
    ws.record_latest("index", index)
    return dict(ws=ws, finished=finished, finished_files=finished_files, killed=killed, index=index)


# ----------------------------------------------------------------------------------------------
# Roots, paths, and each stage run too early
# ----------------------------------------------------------------------------------------------
def test_root_comes_from_the_option_then_the_environment_then_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(ENV_VAR, raising=False)
    ws = Workspace()
    assert (ws.root, ws.source) == (tmp_path, "cwd")
    assert ws.clotho == tmp_path / "data" / "clotho" and ws.features == tmp_path / "data" / "features"
    assert ws.runs == tmp_path / "runs" and ws.indexes == tmp_path / "indexes"
    assert ws.command("features") == "clotho-retrieve features"

    monkeypatch.setenv(ENV_VAR, str(tmp_path / "from-env"))
    assert (Workspace().root, Workspace().source) == (tmp_path / "from-env", "env")
    assert Workspace().command("train") == "clotho-retrieve train"  # the variable carries over by itself
    opt = Workspace(tmp_path / "my ws")
    assert (opt.root, opt.source) == (tmp_path / "my ws", "option")
    assert opt.command("embed") == f"clotho-retrieve --workspace \"{tmp_path / 'my ws'}\" embed"

    (tmp_path / "file").write_text("x")
    with pytest.raises(ClothoRetrieveError, match="file: the workspace is a file"):
        Workspace(tmp_path / "file")


def test_each_stage_run_too_early_names_the_command_to_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(ENV_VAR, raising=False)
    ws = Workspace()
    expected = {
        ws.clotho_root: "no Clotho in data/clotho; run: clotho-retrieve download "
                        "(offline demo: clotho-retrieve demo-data)",
        ws.features_dir: "no features in data/features; run: clotho-retrieve features",
        ws.features_file: "no features in data/features; run: clotho-retrieve features",
        ws.latest_run: "no finished run in runs; run: clotho-retrieve train",
        lambda: ws.latest_run(finished=False): "no run to resume in runs; run: clotho-retrieve train",
        ws.latest_index: "no index in indexes; run: clotho-retrieve embed",
    }  # fmt: skip
    for resolve, message in expected.items():
        with pytest.raises(ClothoRetrieveError) as info:
            resolve()
        assert str(info.value) == message and "\n" not in message
        assert info.value.next_command == message.split("; run: ")[1].split(" (")[0]

    (ws.features).mkdir(parents=True)
    (ws.features / "development.h5").write_bytes(b"")
    with pytest.raises(ClothoRetrieveError) as info:
        ws.features_file("evaluation")
    assert str(info.value) == (
        "no evaluation features in data/features; run: clotho-retrieve features --split evaluation"
    )
    assert not (tmp_path / ".clotho-retrieve").exists()  # resolving never writes

    # outside the current folder, paths are absolute and the command names the workspace
    other = Workspace(tmp_path.parent / "elsewhere")
    with pytest.raises(ClothoRetrieveError) as info:
        other.latest_index()
    assert str(info.value) == (
        f"no index in {other.root / 'indexes'}; run: clotho-retrieve --workspace {other.root} embed"
    )


# ----------------------------------------------------------------------------------------------
# Run names
# ----------------------------------------------------------------------------------------------
def test_run_names_take_a_suffix_and_are_reserved_atomically(tmp_path):
    ws = Workspace(tmp_path)
    names = [ws.new_run_dir("self", "supcon").name for _ in range(3)]
    assert names == ["self-supcon", "self-supcon-2", "self-supcon-3"]
    assert ws.new_run_dir("../../x", "a/b").parent == ws.runs  # never a path outside runs/

    got, barrier = [], threading.Barrier(8)

    def reserve():
        barrier.wait()
        got.append(ws.new_run_dir("gat", "ntxent"))

    threads = [threading.Thread(target=reserve) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(got)) == 8 and all(p.is_dir() for p in got)
    assert sorted(p.name for p in got) == sorted(["gat-ntxent"] + [f"gat-ntxent-{n}" for n in range(2, 9)])

    ws.release_run_dir(got[0])
    assert not got[0].exists()
    (got[1] / "config.json").write_text("{}")
    ws.release_run_dir(got[1])  # not empty: kept
    assert got[1].is_dir()


def test_under_torchrun_every_process_gets_the_folder_process_0_reserved(tmp_path, monkeypatch):
    ws = Workspace(tmp_path)
    (ws.runs / "self-ntxent").mkdir(parents=True)  # taken already
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # torchrun's default id: the same for every job
    got = {}
    other = threading.Thread(target=lambda: got.setdefault(1, ws._agreed_run_dir("self-ntxent", rank=1)))
    other.start()  # process 1 asks first and waits for process 0
    monkeypatch.setenv("RANK", "0")
    got[0] = ws.new_run_dir("self", "ntxent")
    other.join()
    assert got[0] == got[1] == ws.runs / "self-ntxent-2"
    assert sorted(p.name for p in ws.runs.iterdir() if p.is_dir()) == ["self-ntxent", "self-ntxent-2"]

    # a later job with the same id: process 1 does not take the old note for its answer
    note = next((ws.root / ".clotho-retrieve").glob("torchrun-*.json"))
    old = json.loads(note.read_text())
    note.write_text(json.dumps({**old, "time": old["time"] - 1000}))
    with pytest.raises(ClothoRetrieveError, match="process 0 named no run folder within 1 s; pass --out"):
        ws._agreed_run_dir("self-ntxent", rank=1, timeout=1.0)

    monkeypatch.setenv("RANK", "1")  # only process 0 records
    ws.record_started(got[1])
    assert not ws.state_file.exists()


def test_two_runs_of_one_variant_do_not_overwrite_each_other(pipeline):
    finished, killed = pipeline["finished"], pipeline["killed"]
    assert (finished.name, killed.name) == ("gat-ntxent", "gat-ntxent-2")
    assert _digest(finished) == pipeline["finished_files"]  # the second run left the first untouched
    for run, epochs in ((finished, 1), (killed, 2)):
        config = json.loads((run / "config.json").read_text())
        assert config["train"]["out"] == str(run) and config["train"]["epochs"] == epochs
        assert config["model"]["attention"] == "gat" and config["train"]["loss"] == "ntxent"


# ----------------------------------------------------------------------------------------------
# "Latest": recorded when a stage returns, verified when read
# ----------------------------------------------------------------------------------------------
def test_a_killed_train_is_not_the_latest_finished_run(pipeline):
    ws, finished, killed = pipeline["ws"], pipeline["finished"], pipeline["killed"]
    assert (killed / "last" / "trainer_state.pt").is_file() and (killed / "best").is_dir()
    assert not run_complete(killed) and run_complete(finished)
    assert ws.latest_run() == finished
    assert ws.latest_run(finished=False) == killed  # what `train --resume` continues

    # even a record made by mistake does not make a half-trained run the latest finished one
    state = json.loads(ws.state_file.read_text())
    assert [e["path"] for e in state["run"]] == ["runs/gat-ntxent"]
    assert [e["path"] for e in state["started"]] == ["runs/gat-ntxent", "runs/gat-ntxent-2"]
    ws.record_latest("run", killed)
    try:
        assert ws.latest_run() == finished
    finally:
        ws.state_file.write_text(json.dumps(state))


def test_only_a_killed_run_says_to_resume_it(pipeline, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ws = Workspace(tmp_path)
    run = ws.runs / "gat-ntxent"
    shutil.copytree(pipeline["killed"], run)
    ws.record_started(run)
    with pytest.raises(ClothoRetrieveError) as info:
        ws.latest_run()
    assert str(info.value) == (
        "no finished run in runs (runs/gat-ntxent stopped after epoch 1 of 2); "
        f"run: clotho-retrieve --workspace {tmp_path} train --resume"
    )


def test_resumed_to_the_end_a_run_becomes_the_latest(pipeline, minilm_path):
    ws = pipeline["ws"]
    run = ws.new_run_dir("gat", "ntxent")  # a copy of the killed run, so the others keep their state
    run.rmdir()
    shutil.copytree(pipeline["killed"], run)
    try:
        ws.record_started(run)
        assert ws.latest_run() == pipeline["finished"]
        _train(ws, minilm_path, run, epochs=2, resume=True)
        assert ws.latest_run() == run and run_complete(run)
        # a recorded run that is gone is skipped: the one finished before it is the latest again
        shutil.rmtree(run)
        assert ws.latest_run() == pipeline["finished"]
        assert ws.latest_run(finished=False) == pipeline["killed"]
    finally:
        shutil.rmtree(run, ignore_errors=True)


def test_the_latest_index_and_where_embed_writes(pipeline):
    from clotho_retrieve.index import EmbeddingIndex

    ws, finished, index = pipeline["ws"], pipeline["finished"], pipeline["index"]
    assert index == ws.indexes / "gat-ntxent" and ws.latest_index() == index
    assert ws.index_dir_for(finished) == index  # the same run: embed brings its index in step
    with EmbeddingIndex(index) as idx:
        assert idx.run == str(finished.resolve()) and len(idx) == TINY.n_evaluation
    stranger = ws.index_dir_for(ws.root.parent / "elsewhere" / "gat-ntxent")  # another run, same name
    assert stranger == ws.indexes / "gat-ntxent-2" and stranger.is_dir()
    stranger.rmdir()
    assert ws.features_file() == ws.features / "evaluation.h5"


def test_records_are_relative_serialised_and_survive_concurrent_writers(tmp_path):
    ws = Workspace(tmp_path / "ws")
    outside = tmp_path / "elsewhere" / "idx"
    paths = [ws.indexes / f"i{n}" for n in range(24)] + [outside]

    def record(chunk):
        for p in chunk:
            ws.record_latest("index", p)

    threads = [threading.Thread(target=record, args=(paths[n::5],)) for n in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    state = json.loads((ws.root / STATE).read_text())
    recorded = [e["path"] for e in state["index"]]
    assert sorted(recorded) == sorted([f"indexes/i{n}" for n in range(24)] + [str(outside)])
    with pytest.raises(ValueError, match="kind"):
        ws.record_latest("model", outside)


# ----------------------------------------------------------------------------------------------
# status
# ----------------------------------------------------------------------------------------------
def test_status_reports_the_pipeline(pipeline):
    ws, finished, killed = pipeline["ws"], pipeline["finished"], pipeline["killed"]
    st = json.loads(json.dumps(ws.status()))  # JSON-serialisable as it is

    assert [(s["split"], s["present"], s["clips"], s["verified"]) for s in st["clotho"]["splits"]] == [
        (split, True, n, False) for split, n in TINY.sizes().items()  # demo-data writes no manifest
    ]
    files = {f["file"]: f for f in st["features"]["files"]}
    assert sorted(files) == ["development.h5", "evaluation.h5", "validation.h5"]
    for split, n in TINY.sizes().items():
        f = files[f"{split}.h5"]
        keys = ("split", "front_end", "sample_rate", "n_mels", "clips", "skipped", "state")
        assert tuple(f[k] for k in keys) == (split, "paper", 44100, 64, n, 0, "ok")

    runs = {r["run"]: r for r in st["runs"]}
    metrics = [json.loads(line) for line in (finished / "metrics.jsonl").read_text().splitlines()]
    assert runs["runs/gat-ntxent"] == {
        "run": "runs/gat-ntxent", "attention": "gat", "loss": "ntxent", "backbone": "tiny", "epochs_done": 1,
        "epochs_planned": 1, "best_epoch": 1, "best_val_map10": metrics[0]["val"]["mAP@10"],
        "state": "finished", "latest": True, "resume": False,
    }  # fmt: skip
    assert runs["runs/gat-ntxent-2"]["state"] == "resumable" and runs["runs/gat-ntxent-2"]["resume"]
    assert (runs["runs/gat-ntxent-2"]["epochs_done"], runs["runs/gat-ntxent-2"]["epochs_planned"]) == (1, 2)

    assert st["indexes"] == [{"index": "indexes/gat-ntxent", "clips": TINY.n_evaluation,
                              "run": "runs/gat-ntxent", "which": "best", "search": "exact", "state": "ok",
                              "latest": True}]  # fmt: skip
    assert st["latest"] == {"run": "runs/gat-ntxent", "resume": "runs/gat-ntxent-2",
                            "index": "indexes/gat-ntxent"}  # fmt: skip
    assert st["next"] == f"clotho-retrieve --workspace {ws.root} query \"dog barking in rain\""
    assert st["record"] is None and killed.name not in st["latest"]["run"]

    wide = Console(width=200, record=True, file=io.StringIO())
    wide.print(status_table(st))
    text = wide.export_text()
    print(text)
    for piece in ("evaluation.h5", "paper (44.1 kHz, 64 Mel)", "gat + ntxent, epoch 1/2", "resumable",
                  "runs/gat-ntxent (latest)", "search exact", "clotho-retrieve --workspace"):  # fmt: skip
        assert piece in text, piece


def test_status_shows_faiss_and_verified_clotho_splits(pipeline, tmp_path):
    from clotho_retrieve.datasets.clotho import captions_name, metadata_name
    from clotho_retrieve.download import download_clotho
    from clotho_retrieve.index import build_ann_index
    from clotho_retrieve.remote import RemoteFile
    from clotho_retrieve.utils import md5sum

    ws = Workspace(tmp_path)
    shutil.copytree(pipeline["ws"].clotho, ws.clotho)
    shutil.copytree(pipeline["index"], ws.indexes / "x")
    build_ann_index(ws.indexes / "x", "hnsw")
    assert [i["search"] for i in ws.status()["indexes"]] == ["hnsw"]

    # `download` adopts a complete split it finds in place (no network: its CSVs are in place, verified)
    (ws.clotho / metadata_name("validation")).write_text("file_name,keywords\n")
    table = {name: RemoteFile(name, md5sum(ws.clotho / name), base_url="http://127.0.0.1:9/")
             for name in (captions_name("validation"), metadata_name("validation"))}  # fmt: skip
    download_clotho(ws.clotho, ["validation"], table=table)
    states = {s["split"]: (s["verified"], s["state"]) for s in ws.status()["clotho"]["splits"]}
    assert states["validation"] == (True, "verified")
    assert states["development"][0] is False

    (ws.clotho / "validation" / "validation_0001.wav").unlink()
    assert ws.status()["clotho"]["splits"][1]["state"] == "incomplete: 1 of 3 clips missing"
    with open(ws.clotho / captions_name("validation"), "a") as fh:
        fh.write("\n")
    assert ws.status()["clotho"]["splits"][1]["state"].startswith("changed: clotho_captions_validation.csv")


def test_next_command_follows_the_pipeline(pipeline, tmp_path):
    from clotho_retrieve.feature_file import write_feature_file
    from clotho_retrieve.frontend import FrontEnd

    ws = Workspace(tmp_path)
    nxt = lambda: ws.status()["next"].replace(f"--workspace {tmp_path} ", "")  # noqa: E731
    assert nxt() == "clotho-retrieve download"
    (ws.clotho / "evaluation").mkdir(parents=True)
    assert nxt() == "clotho-retrieve features"
    write_feature_file(ws.features / "evaluation.h5", [], [], [], FrontEnd())
    assert nxt() == "clotho-retrieve train"
    shutil.copytree(pipeline["killed"], ws.runs / "gat-ntxent")
    ws.record_started(ws.runs / "gat-ntxent")
    assert nxt() == "clotho-retrieve train --resume"
    shutil.copytree(pipeline["finished"], ws.runs / "gat-ntxent-2")
    ws.record_latest("run", ws.runs / "gat-ntxent-2")
    assert nxt() == "clotho-retrieve embed"
    shutil.copytree(pipeline["index"], ws.indexes / "old")  # an index of another run
    ws.record_latest("index", ws.indexes / "old")
    assert nxt() == "clotho-retrieve embed"


def test_status_survives_unreadable_pieces(tmp_path):
    ws = Workspace(tmp_path)
    ws.features.mkdir(parents=True)
    (ws.features / "evaluation.h5").write_bytes(b"not hdf5")
    (ws.features / ".development.h5.0123456789.work").mkdir()  # an interrupted `features`
    (ws.runs / "broken").mkdir(parents=True)
    (ws.runs / "broken" / "config.json").write_text("{not json")
    (ws.runs / "bare" / "last").mkdir(parents=True)
    (ws.runs / "reserved").mkdir()  # reserved by a train that never wrote: not a run
    (ws.indexes / "bad").mkdir(parents=True)
    (ws.indexes / "bad" / "index.h5").write_bytes(b"garbage")
    (ws.root / STATE).parent.mkdir()
    (ws.root / STATE).write_text("[1, 2")

    st = ws.status()
    assert [(f["file"], f["state"]) for f in st["features"]["files"]] == [
        ("evaluation.h5", "unreadable (OSError)"),
        ("development.h5", "interrupted: re-run features to finish it"),
    ]
    assert {r["run"]: r["state"] for r in st["runs"]} == {
        "runs/bare": "unreadable (no config.json)",
        "runs/broken": "unreadable (config.json: JSONDecodeError)",
    }
    assert [(i["index"], i["state"]) for i in st["indexes"]] == [("indexes/bad", "unreadable (index.h5)")]
    assert st["record"].startswith("unreadable")
    assert st["latest"] == {"run": None, "resume": None, "index": None}
    assert st["next"].endswith(" download")
    wide = Console(width=200, record=True, file=io.StringIO())
    wide.print(status_table(st))
    assert wide.export_text().count("unreadable") == 5

    ws.record_latest("features", ws.features)  # an unreadable record is replaced whole
    assert [e["path"] for e in json.loads((ws.root / STATE).read_text())["features"]] == ["data/features"]
