"""`clotho-retrieve status`: what a workspace holds, as a JSON-serialisable dict and as one Rich table.

Everything is read cheaply and defensively: a Clotho split's folder listing, captions CSV and download
manifest; HDF5 attributes and dataset shapes of the feature files (never the features themselves);
config.json and metrics.jsonl of the runs; index.h5 attributes and faiss.json of the indexes. A piece
that cannot be read shows as "unreadable (...)", it never raises. ``next`` is the command to run now:
the command named by the first stage whose default would fail, else a query.
"""

from __future__ import annotations

from pathlib import Path

from clotho_retrieve.utils import ClothoRetrieveError
from clotho_retrieve.workspace import (
    EXAMPLE_QUERY,
    SPLITS,
    TABLE_RESULT,
    Workspace,
    _index_attrs,
    _read_json,
    run_complete,
    run_progress,
)

OK = "ok"


def workspace_status(ws: Workspace) -> dict:
    """What ``ws`` holds: {"workspace", "source", "record", "clotho", "features", "runs", "indexes",
    "latest", "next"}; paths relative to the workspace root (absolute when outside it)."""
    _, record_problem = ws.read_state()
    features = features_status(ws)
    latest = {
        "run": _or_none(lambda: ws.rel(ws.latest_run())),
        "resume": _or_none(lambda: ws.rel(ws.latest_run(finished=False))),
        "index": _or_none(lambda: ws.rel(ws.latest_index())),
    }
    return {
        "workspace": str(ws.root),
        "source": ws.source,
        "record": record_problem,  # None, or what is wrong with .clotho-retrieve/latest.json
        "clotho": {"path": ws.rel(ws.clotho), "splits": clotho_status(ws.clotho)},
        "features": {"path": ws.rel(ws.features), "files": features},
        "runs": runs_status(ws, latest),
        "indexes": indexes_status(ws, latest),
        "latest": latest,
        "next": next_command(ws, features),
    }


def _or_none(fn):
    try:
        return fn()
    except ClothoRetrieveError:
        return None


# ----------------------------------------------------------------------------------------------
# Clotho splits
# ----------------------------------------------------------------------------------------------
def clotho_status(root: Path) -> list[dict]:
    """Per split: present (its folder exists), clips (audio files in it), verified, state.

    Verified: the manifest `download` writes is there, the captions CSV still has the MD5 it records,
    and every clip the CSV lists is on disk. `demo-data` writes no manifest: present, not verified.
    """
    from clotho_retrieve.audio import AUDIO_SUFFIXES
    from clotho_retrieve.datasets.clotho import captions_name, clip_names
    from clotho_retrieve.download import MANIFEST_NAME, missing_clips
    from clotho_retrieve.utils import md5sum

    out = []
    for split in SPLITS:
        folder, csv_path = root / split, root / captions_name(split)
        entry = {"split": split, "present": folder.is_dir(), "clips": None, "verified": False,
                 "state": "missing"}  # fmt: skip
        out.append(entry)
        if not entry["present"]:
            continue
        try:
            entry["clips"] = sum(1 for p in folder.iterdir() if p.suffix.lower() in AUDIO_SUFFIXES)
            if not (folder / MANIFEST_NAME).is_file():
                entry["state"] = "present, not verified (no download manifest)"
                continue
            manifest = _read_json(folder / MANIFEST_NAME)
            names = clip_names(csv_path)
            recorded_md5 = (manifest.get("md5") or {}).get(csv_path.name)
            missing = missing_clips(folder, names)
            if recorded_md5 and md5sum(csv_path) != recorded_md5:
                entry["state"] = f"changed: {csv_path.name} differs from the download"
            elif missing:
                entry["state"] = f"incomplete: {len(missing)} of {len(names)} clips missing"
            else:
                entry["verified"], entry["state"] = True, "verified"
        except (OSError, ValueError, ClothoRetrieveError) as exc:
            entry["state"] = f"unreadable ({_short(exc)})"
    return out


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text if len(text) <= 80 else text[:77] + "..."


# ----------------------------------------------------------------------------------------------
# Feature files
# ----------------------------------------------------------------------------------------------
def features_status(ws: Workspace) -> list[dict]:
    """Per .h5 file: split, front end (preset name or "custom"), sample rate, Mel bands, clips, skipped;
    plus a row per file an interrupted `features` left unfinished (its shard folder, no .h5 yet)."""
    files = [feature_file_status(p) for p in ws.feature_files()]
    if ws.features.is_dir():
        for work in sorted(ws.features.glob(".*.work")):  # features._work_dir: .NAME.DIGEST.work
            target = work.name[1 : -len(".work")].rsplit(".", 1)[0]
            if not (ws.features / target).exists():
                files.append(_file_entry(target, state="interrupted: re-run features to finish it"))
    return files


def _file_entry(name: str, **kw) -> dict:
    entry = {"file": name, "split": None, "front_end": None, "sample_rate": None, "n_mels": None,
             "clips": None, "skipped": None, "state": OK}  # fmt: skip
    entry.update(kw)
    return entry


def feature_file_status(path: Path) -> dict:
    """One features file, from its attributes and dataset shapes only."""
    import h5py

    from clotho_retrieve.clap import CLAP_PRESET, ClapFrontEnd
    from clotho_retrieve.feature_file import FORMAT
    from clotho_retrieve.frontend import PRESETS, front_end_from_dict

    entry = _file_entry(path.name)
    try:
        with h5py.File(path, "r") as h5:
            if h5.attrs.get("format") != FORMAT:
                entry["state"] = "unreadable (not a clotho-retrieve features file)"
                return entry
            front_end = front_end_from_dict(dict(h5.attrs))
            preset = next((name for name, fe in PRESETS.items() if fe == front_end), "custom")
            preset = CLAP_PRESET if isinstance(front_end, ClapFrontEnd) else preset
            entry.update(
                split=str(h5.attrs.get("split", "")) or None,
                front_end=preset,
                sample_rate=front_end.sample_rate,
                n_mels=front_end.n_mels,
                clips=int(h5["names"].shape[0]),
                skipped=int(h5["skipped/names"].shape[0]),
            )
    except (OSError, KeyError, ValueError, TypeError, ClothoRetrieveError) as exc:
        entry["state"] = f"unreadable ({type(exc).__name__})"
    return entry


# ----------------------------------------------------------------------------------------------
# Runs and indexes
# ----------------------------------------------------------------------------------------------
def _is_run(folder: Path) -> bool:
    return any((folder / name).exists() for name in ("config.json", "last", "best"))


def _folders(parent: Path) -> list[Path]:
    if not parent.is_dir():
        return []
    return sorted(p for p in parent.iterdir() if p.is_dir() and not p.name.startswith("."))


def _run_dirs(ws: Workspace) -> list[Path]:
    """Run folders under runs/ (one level down too, e.g. runs/table/gat), then recorded ones elsewhere."""
    runs = []
    for folder in _folders(ws.runs):
        runs += [folder] if _is_run(folder) else [sub for sub in _folders(folder) if _is_run(sub)]
    for key in ("started", "run"):
        runs += [r for r in ws._recorded(key) if r.is_dir() and r not in runs]
    return runs


def runs_status(ws: Workspace, latest: dict) -> list[dict]:
    """Per run: variant, epochs done / planned, best validation mAP@10, state finished | resumable."""
    finished = set(ws._recorded("run"))
    out = []
    for run in _run_dirs(ws):
        p = run_progress(run)
        if p["error"] is not None:
            state = f"unreadable ({p['error']})"
        elif (run in finished or (run / TABLE_RESULT).is_file()) and run_complete(run):
            state = "finished"
        else:
            state = "resumable"  # `train --resume` continues it (or, when complete, records it)
        rel = ws.rel(run)
        out.append({
            "run": rel, "attention": p["attention"], "loss": p["loss"], "backbone": p["backbone"],
            "epochs_done": p["epochs_done"], "epochs_planned": p["epochs_planned"],
            "best_epoch": p["best_epoch"], "best_val_map10": p["best_val_map10"], "state": state,
            "latest": rel == latest["run"], "resume": rel == latest["resume"],
        })  # fmt: skip
    return out


def _search_type(index: Path, count: int | None) -> str:
    """exact, or the FAISS type of faiss.json when faiss.index is there and built for these rows."""
    from clotho_retrieve.index import FAISS_FILE, FAISS_META

    if not (index / FAISS_META).is_file() or not (index / FAISS_FILE).is_file():
        return "exact"
    try:
        meta = _read_json(index / FAISS_META)
        kind = str(meta["config"]["index_type"])
    except (ValueError, KeyError, TypeError):
        return "exact (faiss.json unreadable)"
    return kind if meta.get("count") == count else f"exact ({kind} stale: rebuild with `index`)"


def indexes_status(ws: Workspace, latest: dict) -> list[dict]:
    """Per index: clips, the run (and best | last) it embeds with, search type (exact | ivf | hnsw)."""
    from clotho_retrieve.index import INDEX_FILE

    folders = _folders(ws.indexes)
    folders += [i for i in ws._recorded("index") if i.is_dir() and i not in folders]
    out = []
    for index in folders:
        rel = ws.rel(index)
        entry = {"index": rel, "clips": None, "run": None, "which": None, "search": None, "state": OK,
                 "latest": rel == latest["index"]}  # fmt: skip
        attrs = _index_attrs(index)
        if not (index / INDEX_FILE).exists():
            entry["state"] = "empty (no index.h5): run embed"
        elif not attrs:
            entry["state"] = "unreadable (index.h5)"
        else:
            entry.update(clips=attrs["count"], run=ws.rel(attrs["run"]), which=attrs["which"],
                         search=_search_type(index, attrs["count"]))  # fmt: skip
        out.append(entry)
    return out


# ----------------------------------------------------------------------------------------------
# The next step
# ----------------------------------------------------------------------------------------------
def next_command(ws: Workspace, features: list[dict] | None = None) -> str:
    """The command to run now: that of the first stage whose default input is missing, else a query.

    ``features``: features_status(ws), when already read; a Clotho split without a readable features
    file asks for `features`.
    """
    present = [s for s in SPLITS if (ws.clotho / s).is_dir()]
    features = features_status(ws) if features is None else features
    readable = {f["file"] for f in features if f["state"] == OK}
    if not readable:
        return ws.command("features") if present else ws.command("download")
    if any(f"{s}.h5" not in readable for s in present):
        return ws.command("features")
    try:
        run = ws.latest_run()
        index = ws.latest_index()
    except ClothoRetrieveError as exc:
        return exc.next_command
    if _index_attrs(index).get("run") != str(run.resolve()):  # a newer run than the index's
        return ws.command("embed")
    return ws.command("query", EXAMPLE_QUERY)


# ----------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------
_STYLE = {"ok": "green", "verified": "green", "finished": "green", "resumable": "yellow",
          "missing": "dim", "none": "dim"}  # fmt: skip


def _state(text: str) -> str:
    first = text.split(" ", 1)[0].rstrip(",:")
    style = _STYLE.get(first, "red" if first in ("unreadable", "changed", "incomplete") else "yellow")
    return f"[{style}]{text}[/]"


def _feature_details(f: dict) -> str:
    if f["clips"] is None:
        return ""
    khz = f"{f['sample_rate'] / 1000:g} kHz"
    return f"{f['front_end']} ({khz}, {f['n_mels']} Mel), {f['clips']:,} clips, {f['skipped']:,} skipped"


def _run_details(r: dict) -> str:
    if r["epochs_planned"] is None:
        return ""
    text = f"{r['attention']} + {r['loss']}, epoch {r['epochs_done']}/{r['epochs_planned']}"
    if r["best_val_map10"] is not None:
        text += f", best val mAP@10 {100 * r['best_val_map10']:.2f} (epoch {r['best_epoch']})"
    return text


def status_table(status: dict):
    """One Rich table of workspace_status(): Clotho, features, runs, indexes, and the next command."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"workspace {escape(status['workspace'])}", title_justify="left")
    for col in ("", "what", "details", "state"):
        table.add_column(col, overflow="fold")

    def section(name: str, rows: list[tuple[str, str, str]], empty: str) -> None:
        for i, (what, details, state) in enumerate(rows or [(empty, "", "none")]):
            table.add_row(f"[bold]{name}[/]" if i == 0 else "", escape(what), escape(details), _state(state))
        table.add_section()

    clotho = [s for s in status["clotho"]["splits"] if s["present"]]
    section("Clotho", [(s["split"], f"{s['clips']:,} clips" if s["clips"] is not None else "", s["state"])
                       for s in clotho], status["clotho"]["path"])  # fmt: skip
    section("features", [(f["file"], _feature_details(f), f["state"]) for f in status["features"]["files"]],
            status["features"]["path"])  # fmt: skip
    marks = {"latest": " (latest)", "resume": " (--resume continues it)"}
    section("runs", [(r["run"] + "".join(m for k, m in marks.items() if r[k]), _run_details(r), r["state"])
                     for r in status["runs"]], "runs")  # fmt: skip
    indexes = [(i["index"] + (" (latest)" if i["latest"] else ""),
                f"{i['clips']:,} clips, model {i['run']} ({i['which']}), search {i['search']}"
                if i["clips"] is not None else "", i["state"]) for i in status["indexes"]]  # fmt: skip
    section("indexes", indexes, "indexes")
    if status["record"]:
        table.add_row("[bold]record[/]", ".clotho-retrieve/latest.json", "", _state(status["record"]))
        table.add_section()
    table.add_row("[bold]next[/]", f"[bold cyan]{escape(status['next'])}[/]", "", "")
    return table
