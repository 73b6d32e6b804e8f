"""download.py and archive.py against a loopback HTTP server,
which serves small archives and CSVs made here.

The server (127.0.0.1, port chosen by the OS) logs every request, can drop a connection halfway or
serve wrong bytes, and shuts itself down after a minute at the latest. No test touches the internet.
"""

from __future__ import annotations

import csv
import hashlib
import http.server
import io
import os
import socket
import struct
import subprocess
import sys
import threading
import unicodedata
import zlib
from pathlib import Path
from urllib.parse import unquote

import py7zr
import pytest
from typer.testing import CliRunner

from clotho_retrieve import download, utils
from clotho_retrieve.archive import extract_7z
from clotho_retrieve.cli import app
from clotho_retrieve.datasets import clotho
from clotho_retrieve.download import (
    MANIFEST_NAME,
    download_clotho,
    download_file,
    missing_clips,
    panns_checkpoint_path,
)
from clotho_retrieve.remote import RemoteFile
from clotho_retrieve.utils import ClothoRetrieveError

# ----------------------------------------------------------------------------------------------
# A tiny Zenodo
# ----------------------------------------------------------------------------------------------


class FakeZenodo:
    """Serves ``files`` by name with Range support; records (name, Range header) per request."""

    def __init__(self, files: dict[str, bytes]):
        self.files = dict(files)
        self.requests: list[tuple[str, str | None]] = []
        self.drop_once: set[str] = set()  # first full response is cut after half its body
        self.corrupt: set[str] = set()  # same length, first bytes flipped
        self.ignore_range: set[str] = set()  # answers 200 with the whole file, as some servers do
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_GET(self):
                name = unquote(self.path.lstrip("/").split("?")[0])
                rng = self.headers.get("Range")
                fake.requests.append((name, rng))
                if name in fake.ignore_range:
                    rng = None
                if name not in fake.files:
                    self.send_error(404)
                    return
                data = fake.files[name]
                if name in fake.corrupt:
                    data = bytes(b ^ 0xFF for b in data[:8]) + data[8:]
                start = int(rng.removeprefix("bytes=").rstrip("-")) if rng else 0
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = data[start:]
                self.send_response(206 if rng else 200)
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if name in fake.drop_once and not rng:
                    fake.drop_once.discard(name)
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05})
        self.thread.daemon = True
        self.deadline = threading.Timer(60.0, self.server.shutdown)  # bounded even if a test hangs
        self.deadline.daemon = True

    def __enter__(self) -> FakeZenodo:
        self.thread.start()
        self.deadline.start()
        return self

    def __exit__(self, *exc) -> None:
        self.deadline.cancel()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def _7z(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with py7zr.SevenZipFile(buf, "w") as sz:
        for name, data in members.items():
            sz.writestr(data, name)
    return buf.getvalue()


def _7z_with_member(members: dict[str, bytes], placeholder: str, evil: str) -> bytes:
    """A 7z whose member ``placeholder`` is renamed to ``evil`` (py7zr refuses to write '../' names).

    The header is written unencoded, the UTF-16 name patched in place and both header CRCs redone.
    """
    assert len(placeholder) == len(evil)
    buf = io.BytesIO()
    with py7zr.SevenZipFile(buf, "w") as sz:
        sz.set_encoded_header_mode(False)
        for name, data in members.items():
            sz.writestr(data, name)
    raw = bytearray(buf.getvalue())
    offset, size = struct.unpack("<QQ", raw[12:28])
    header = 32 + offset
    at = raw.index(placeholder.encode("utf-16-le"), header)
    raw[at : at + 2 * len(evil)] = evil.encode("utf-16-le")
    struct.pack_into("<I", raw, 28, zlib.crc32(raw[header : header + size]))
    struct.pack_into("<I", raw, 8, zlib.crc32(raw[12:32]))
    return bytes(raw)


def _clip_bytes(name: str) -> bytes:
    return b"RIFF" + hashlib.sha256(name.encode()).digest() * 8


def clotho_files(splits=("development", "validation", "evaluation"), n_clips: int = 3) -> dict[str, bytes]:
    """A miniature Clotho v2.1: per split, a captions CSV (UTF-8), metadata CSV (ISO-8859-1), 7z."""
    files: dict[str, bytes] = {}
    for split in splits:
        names = [f"{split}_{i}.wav" for i in range(n_clips - 1)] + [f"café {split}.wav"]
        captions = io.StringIO()
        w = csv.writer(captions)
        w.writerow(["file_name"] + [f"caption_{k}" for k in range(1, 6)])
        for n in names:
            w.writerow([n] + [f"a sound, «{n}» number {k}" for k in range(1, 6)])
        meta = io.StringIO()
        w = csv.writer(meta)
        w.writerow(
            [
                "file_name",
                "keywords",
                "sound_id",
                "sound_link",
                "start_end_samples",
                "manufacturer",
                "license",
            ]
        )
        for i, n in enumerate(names):
            w.writerow([n, "café;rain", i, f"https://freesound.org/s/{i}", "", "José", "CC0"])
        files[f"clotho_captions_{split}.csv"] = captions.getvalue().encode("utf-8")
        files[f"clotho_metadata_{split}.csv"] = meta.getvalue().encode("iso-8859-1")
        files[f"clotho_audio_{split}.7z"] = _7z({f"{split}/{n}": _clip_bytes(n) for n in names})
    return files


def table_for(files: dict[str, bytes]) -> dict[str, RemoteFile]:
    return {n: RemoteFile(n, hashlib.md5(b).hexdigest(), len(b)) for n, b in files.items()}


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.rglob("*") if p.name.endswith((".part", ".extracting", ".tmp")))


# ----------------------------------------------------------------------------------------------
# download_file
# ----------------------------------------------------------------------------------------------


def test_resume_after_dropped_connection(tmp_path):
    blob = os.urandom(300_000)
    with FakeZenodo({"blob.bin": blob}) as srv:
        srv.drop_once.add("blob.bin")
        out = download_file(
            srv.url + "blob.bin", tmp_path / "blob.bin", md5=hashlib.md5(blob).hexdigest(), backoff=0
        )
    assert out.read_bytes() == blob
    # First request cut after half the body; the second asks for exactly the rest.
    assert srv.requests == [("blob.bin", None), ("blob.bin", f"bytes={len(blob) // 2}-")]
    assert not (tmp_path / "blob.bin.part").exists()


def test_resumes_part_left_by_an_earlier_run(tmp_path):
    blob = os.urandom(50_000)
    (tmp_path / "blob.bin.part").write_bytes(blob[:12_345])
    with FakeZenodo({"blob.bin": blob}) as srv:
        download_file(srv.url + "blob.bin", tmp_path / "blob.bin", md5=hashlib.md5(blob).hexdigest())
    assert srv.requests == [("blob.bin", "bytes=12345-")]
    assert (tmp_path / "blob.bin").read_bytes() == blob


def test_server_ignoring_range_gets_a_fresh_file(tmp_path):
    blob = os.urandom(30_000)
    (tmp_path / "blob.bin.part").write_bytes(blob[:10_000])
    with FakeZenodo({"blob.bin": blob}) as srv:
        srv.ignore_range.add("blob.bin")
        download_file(srv.url + "blob.bin", tmp_path / "blob.bin", md5=hashlib.md5(blob).hexdigest())
    assert srv.requests == [("blob.bin", "bytes=10000-")]
    assert (tmp_path / "blob.bin").read_bytes() == blob  # not the first 10,000 bytes twice


def test_complete_part_of_unknown_size_is_finished_not_refetched(tmp_path):
    blob = os.urandom(20_000)
    (tmp_path / "blob.bin.part").write_bytes(blob)  # e.g. interrupted between last byte and rename
    with FakeZenodo({"blob.bin": blob}) as srv:
        download_file(srv.url + "blob.bin", tmp_path / "blob.bin", md5=hashlib.md5(blob).hexdigest())
    assert srv.requests == [("blob.bin", "bytes=20000-")]  # answered 416 "bytes */20000"
    assert (tmp_path / "blob.bin").read_bytes() == blob


def test_wrong_resumed_part_restarts_from_scratch_once(tmp_path):
    blob = os.urandom(20_000)
    (tmp_path / "blob.bin.part").write_bytes(b"\0" * 5_000)  # not a prefix of the real file
    with FakeZenodo({"blob.bin": blob}) as srv:
        download_file(srv.url + "blob.bin", tmp_path / "blob.bin", md5=hashlib.md5(blob).hexdigest())
    assert srv.requests == [("blob.bin", "bytes=5000-"), ("blob.bin", None)]
    assert (tmp_path / "blob.bin").read_bytes() == blob


def test_checksum_mismatch_keeps_nothing(tmp_path):
    blob = os.urandom(10_000)
    with FakeZenodo({"blob.bin": blob}) as srv:
        srv.corrupt.add("blob.bin")
        with pytest.raises(ClothoRetrieveError, match=r"blob\.bin: checksum mismatch") as err:
            download_file(srv.url + "blob.bin", tmp_path / "blob.bin", md5=hashlib.md5(blob).hexdigest())
    assert "\n" not in str(err.value) and "--mirror" in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_verified_file_in_place_needs_no_request_and_wrong_one_is_kept(tmp_path):
    blob = b"hello clotho"
    (tmp_path / "a.bin").write_bytes(blob)
    (tmp_path / "b.bin").write_bytes(b"not it")
    with FakeZenodo({}) as srv:
        download_file(srv.url + "a.bin", tmp_path / "a.bin", md5=hashlib.md5(blob).hexdigest())
        with pytest.raises(ClothoRetrieveError, match=r"b\.bin: MD5 is .* delete it"):
            download_file(srv.url + "b.bin", tmp_path / "b.bin", md5=hashlib.md5(blob).hexdigest())
    assert srv.requests == []
    assert (tmp_path / "b.bin").read_bytes() == b"not it"  # a user's file is never deleted


def test_retries_transient_failures_then_gives_up(tmp_path):
    with FakeZenodo({}) as srv:
        with pytest.raises(ClothoRetrieveError, match=r"x\.bin: .*HTTP 404.*--mirror"):
            download_file(srv.url + "x.bin", tmp_path / "x.bin", retries=3, backoff=0)
        assert len(srv.requests) == 1  # 404 is not transient: no retry
        port = srv.server.server_address[1]
    # The server is gone: connection refused is transient, tried 1 + retries times.
    with pytest.raises(ClothoRetrieveError, match=r"after 3 tries.*use --mirror URL, or put the file at"):
        download_file(f"http://127.0.0.1:{port}/x.bin", tmp_path / "x.bin", retries=2, backoff=0)


def test_full_disk_is_refused_before_downloading(tmp_path, monkeypatch):
    monkeypatch.setattr(utils, "free_bytes", lambda folder: 1000)
    with FakeZenodo({"big.bin": b"x" * 5000}) as srv:
        with pytest.raises(ClothoRetrieveError, match=r"downloading big\.bin: needs .* free some space"):
            download_file(srv.url + "big.bin", tmp_path / "big.bin")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------
# extract_7z
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["dotdot", "absolute"])
def test_extract_refuses_member_outside_target(tmp_path, kind):
    target = tmp_path / "out" / "x"
    evil = "../evil.wav" if kind == "dotdot" else str(tmp_path / "abs.wav")
    placeholder = "Q" * (len(evil) - 4) + ".wav"
    archive = tmp_path / "a.7z"
    archive.write_bytes(_7z_with_member({"ok.wav": b"fine", placeholder: b"evil"}, placeholder, evil))
    with py7zr.SevenZipFile(archive) as sz:
        assert evil in sz.getnames()  # the crafted archive really carries the dangerous name
    with pytest.raises(ClothoRetrieveError, match=f"refusing to extract member '{evil}'"):
        extract_7z(archive, target)
    assert not target.exists()
    assert not (tmp_path / "out" / "evil.wav").exists() and not (tmp_path / "abs.wav").exists()


def test_extract_corrupt_archive_leaves_nothing(tmp_path):
    good = _7z({"d/a.wav": os.urandom(4000)})
    archive = tmp_path / "a.7z"
    archive.write_bytes(good[: len(good) // 2])
    with pytest.raises(ClothoRetrieveError, match=r"a\.7z: corrupt or unreadable 7z archive"):
        extract_7z(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_extract_checks_free_space_first(tmp_path, monkeypatch):
    archive = tmp_path / "a.7z"
    archive.write_bytes(_7z({"d/a.wav": b"\0" * 100_000}))  # compresses to a few hundred bytes
    monkeypatch.setattr(utils, "free_bytes", lambda folder: utils.DISK_MARGIN_BYTES + 50_000)
    with pytest.raises(ClothoRetrieveError, match=r"extracting a\.7z: needs 0\.00 GiB but only"):
        extract_7z(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(utils, "free_bytes", lambda folder: utils.DISK_MARGIN_BYTES + 100_000)
    assert (extract_7z(archive, tmp_path / "out") / "d" / "a.wav").read_bytes() == b"\0" * 100_000


def test_missing_clips_compares_unicode_normalised_names(tmp_path):
    nfd = unicodedata.normalize("NFD", "café.wav")
    (tmp_path / nfd).write_bytes(b"x")
    assert missing_clips(tmp_path, ["café.wav", "other.wav"]) == ["other.wav"]


# ----------------------------------------------------------------------------------------------
# download_clotho
# ----------------------------------------------------------------------------------------------


def test_download_clotho_complete_then_idempotent(tmp_path):
    files = clotho_files()
    root = tmp_path / "clotho"
    with FakeZenodo(files) as srv:
        srv.drop_once.add("clotho_audio_validation.7z")
        report = download_clotho(root, "all", mirror=srv.url, table=table_for(files), backoff=0)
        assert [(s.split, s.clips, s.status) for s in report.splits] == [
            ("development", 3, "downloaded"),
            ("validation", 3, "downloaded"),
            ("evaluation", 3, "downloaded"),
        ]
        for split in ("development", "validation", "evaluation"):
            wavs = {p.name: p.read_bytes() for p in (root / split).glob("*.wav")}
            assert wavs == {n: _clip_bytes(n) for n in wavs} and len(wavs) == 3
            assert (root / split / MANIFEST_NAME).is_file()
            for kind in ("captions", "metadata"):
                name = f"clotho_{kind}_{split}.csv"
                assert (root / name).read_bytes() == files[name]
            assert not (root / f"clotho_audio_{split}.7z").exists()  # archives go unless --keep-archives
        assert _leftovers(root) == []

        srv.requests.clear()
        again = download_clotho(root, "all", mirror=srv.url, table=table_for(files))
        assert srv.requests == []
        assert {s.status for s in again.splits} == {"in place"}


def test_keep_archives_and_archive_put_in_root_by_hand(tmp_path):
    files = clotho_files(["validation"])
    root = tmp_path / "clotho"
    root.mkdir()
    (root / "clotho_audio_validation.7z").write_bytes(files["clotho_audio_validation.7z"])
    with FakeZenodo(files) as srv:
        report = download_clotho(
            root, ["validation"], mirror=srv.url, keep_archives=True, table=table_for(files)
        )
    assert [name for name, _ in srv.requests] == [
        "clotho_captions_validation.csv",
        "clotho_metadata_validation.csv",
    ]
    assert report.splits[0].status == "extracted"
    assert (root / "clotho_audio_validation.7z").is_file()


@pytest.mark.parametrize("fault", ["wrong_bytes", "dangerous_member", "corrupt_archive", "missing_clip"])
def test_failed_split_is_never_left_looking_complete(tmp_path, fault):
    files = clotho_files(["evaluation"])
    archive = "clotho_audio_evaluation.7z"
    wavs = {n: _clip_bytes(n) for n in ["evaluation_0.wav", "evaluation_1.wav", "café evaluation.wav"]}
    if fault == "dangerous_member":
        members = {f"evaluation/{n}": b for n, b in wavs.items()} | {"evaluation/QQQQQQQ.wav": b"x"}
        files[archive] = _7z_with_member(members, "evaluation/QQQQQQQ.wav", "evaluation/../../x.wav")
    elif fault == "corrupt_archive":
        files[archive] = files[archive][:-40]
    elif fault == "missing_clip":
        files[archive] = _7z({f"evaluation/{n}": b for n, b in list(wavs.items())[:2]})
    table = table_for(files)
    root = tmp_path / "clotho"
    expected = {
        "wrong_bytes": r"clotho_audio_evaluation\.7z: checksum mismatch",
        "dangerous_member": r"refusing to extract member 'evaluation/\.\./\.\./x\.wav'",
        "corrupt_archive": "corrupt or unreadable 7z archive",
        "missing_clip": r"lacks 1 of 3 clips .* \(e\.g\. 'café evaluation\.wav'\)",
    }[fault]
    with FakeZenodo(files) as srv:
        if fault == "wrong_bytes":
            srv.corrupt.add(archive)
        with pytest.raises(ClothoRetrieveError, match=expected):
            download_clotho(root, "evaluation", mirror=srv.url, table=table)
    assert not (root / "evaluation").exists() and _leftovers(root) == []
    assert not (tmp_path / "x.wav").exists()


def test_existing_incomplete_split_folder_is_not_touched(tmp_path):
    files = clotho_files(["validation"])
    root = tmp_path / "clotho"
    (root / "validation").mkdir(parents=True)
    (root / "validation" / "mine.wav").write_bytes(b"user data")
    with FakeZenodo(files) as srv:
        with pytest.raises(ClothoRetrieveError, match=r"validation: exists but lacks 3 of 3 clips"):
            download_clotho(root, "validation", mirror=srv.url, table=table_for(files))
    assert [p.name for p in (root / "validation").iterdir()] == ["mine.wav"]


# ----------------------------------------------------------------------------------------------
# PANNs and text model
# ----------------------------------------------------------------------------------------------


def test_panns_cache_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("CLOTHO_RETRIEVE_CACHE", str(tmp_path / "env"))
    assert panns_checkpoint_path("CNN14") == tmp_path / "env" / "Cnn14_mAP=0.431.pth"
    assert panns_checkpoint_path("cnn6", cache=tmp_path / "c") == tmp_path / "c" / "Cnn6_mAP=0.343.pth"
    monkeypatch.delenv("CLOTHO_RETRIEVE_CACHE")
    assert panns_checkpoint_path("cnn10") == Path.home() / ".cache/clotho-retrieve/panns/Cnn10_mAP=0.380.pth"
    with pytest.raises(ClothoRetrieveError, match="unknown PANNs checkpoint 'resnet38'"):
        panns_checkpoint_path("resnet38")
    assert RemoteFile("Cnn14_mAP=0.431.pth", None).url("http://m/x/") == "http://m/x/Cnn14_mAP%3D0.431.pth"


def test_download_panns_without_md5_checks_the_file_format(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    buf = io.BytesIO()
    weights = {"model": {"conv.weight": torch.arange(300_000, dtype=torch.float32)}, "iteration": 7}
    torch.save(weights, buf)
    ckpt = buf.getvalue()
    html = b"<html>proxy says no</html>" + b" " * (2 << 20)
    entry = RemoteFile("Cnn10_mAP=0.380.pth", None, None, "https://unused/")
    monkeypatch.setitem(download.PANNS_FILES, "cnn10", entry)
    with FakeZenodo({entry.name: ckpt}) as srv:
        path = download.download_panns("cnn10", cache=tmp_path, mirror=srv.url)
        assert srv.requests == [("Cnn10_mAP=0.380.pth", None)]
        srv.files[entry.name] = html
        with pytest.raises(ClothoRetrieveError, match="not a PyTorch checkpoint"):
            download.download_panns("cnn10", cache=tmp_path / "other", mirror=srv.url)
    assert path == tmp_path / "Cnn10_mAP=0.380.pth"
    loaded = torch.load(path, weights_only=True)
    assert loaded["iteration"] == 7 and torch.equal(
        loaded["model"]["conv.weight"], weights["model"]["conv.weight"]
    )
    assert not (tmp_path / "other" / entry.name).exists()


def test_text_model(minilm_path):
    assert download.download_text_model(minilm_path) == Path(minilm_path)  # a local folder: nothing to fetch
    with pytest.raises(ClothoRetrieveError, match=r"model 'no-such-org/no-such-model': could not fetch"):
        download.download_text_model("no-such-org/no-such-model")  # HF_HUB_OFFLINE=1 in conftest


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def test_cli_wrong_bytes_one_line_no_traceback_no_split(tmp_path):
    """The real table: the server's evaluation captions do not match Zenodo's published MD5."""
    files = {n: b + b"tampered" for n, b in clotho_files(["evaluation"]).items()}
    root = tmp_path / "R"
    with FakeZenodo(files) as srv:
        proc = subprocess.run(
            [sys.executable, "-m", "clotho_retrieve", "download", "--mirror", srv.url, "--root", str(root),
             "--split", "evaluation", "--retries", "0"],
            capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "300"},
        )  # fmt: skip
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    assert "clotho_captions_evaluation.csv: checksum mismatch" in lines[0]
    assert "1b16b9e57cf7bdb7f13a13802aeb57e2" in lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (root / "evaluation").exists() and _leftovers(root) == []


def test_cli_complete_then_nothing_to_do(tmp_path, monkeypatch):
    files = clotho_files(["development", "validation"])
    monkeypatch.setattr(clotho, "CLOTHO_FILES", table_for(files))
    root = tmp_path / "R"
    args = ["download", "--root", str(root), "--split", "validation"]
    runner = CliRunner()
    with FakeZenodo(files) as srv:
        first = runner.invoke(app, [*args, "--mirror", srv.url])
        assert first.exit_code == 0, first.output
        assert "validation" in first.stdout and "downloaded" in first.stdout
        srv.requests.clear()
        second = runner.invoke(app, [*args, "--mirror", srv.url])
        assert second.exit_code == 0 and srv.requests == []
        assert "already in place" in second.stdout
    assert sorted(p.name for p in root.iterdir()) == [
        "clotho_captions_validation.csv", "clotho_metadata_validation.csv", "validation",
    ]  # fmt: skip


def test_cli_unreachable_host(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = CliRunner().invoke(
        app, ["download", "--root", str(tmp_path), "--mirror", f"http://127.0.0.1:{port}/", "--retries", "0"]
    )
    assert result.exit_code == 1
    assert result.stderr.count("error:") == 1 and "Traceback" not in result.output
    assert "clotho_captions_development.csv: could not download from 127.0.0.1" in " ".join(
        result.stderr.split()
    )
    assert "--mirror" in result.stderr
