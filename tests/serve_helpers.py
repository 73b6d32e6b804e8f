"""Shared pieces of the `serve` tests: a small library (audio folder, features, run, index) and a real
`clotho-retrieve serve` process on a free loopback port."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import soundfile as sf
from test_embed import make_run

from clotho_retrieve.embed import EmbedConfig, embed
from clotho_retrieve.feature_file import write_feature_file
from clotho_retrieve.frontend import FrontEnd, file_log_mel

REPO = Path(__file__).resolve().parents[1]
SR = 44100


@dataclass
class Lib:
    root: Path
    model: object  # the RetrievalModel of the run
    audio: Path  # the library root
    names: list[str]  # clip names, in index row order
    captions: list[list[str]]
    durations: list[float]
    index: Path
    features: Path
    link_row: int  # the clip whose audio file is a symlink leaving the library root
    paths: list[Path] = field(default_factory=list)


def tone(path: Path, i: int) -> Path:
    """A recording that differs from the others in pitch, noise level and length."""
    rng = np.random.default_rng(i)
    t = np.arange(int(SR * (0.5 + 0.1 * i))) / SR
    wave = 0.3 * np.sin(2 * np.pi * (150 * 1.5**i) * t) + (0.01 + 0.02 * i) * rng.standard_normal(len(t))
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, wave.astype(np.float32), SR)
    return path


def build_library(root: Path, text_model: str, n: int = 9) -> Lib:
    """n clips in root/audio (one in a sub-folder, one a symlink to a file outside the folder), their
    features (recording the folder as their source, like `features --audio-dir`), a run and an index."""
    audio = root / "audio"
    names = [f"clip{i}.wav" for i in range(n - 2)] + ["sub/deep.wav", "link.wav"]
    paths = [tone(audio / name, i) for i, name in enumerate(names[:-1])]
    outside = tone(root / "outside" / "secret.wav", n - 1)
    (audio / "link.wav").symlink_to(outside)
    paths.append(audio / "link.wav")
    fe = FrontEnd()
    mels, durations = zip(*(file_log_mel(p, fe) for p in paths), strict=True)
    captions = [[f"tone number {i}", f"a hum at pitch {i}"] for i in range(n)]
    features = write_feature_file(
        root / "features" / "library.h5", names, list(mels), list(durations), fe, captions=captions,
        source=str(audio.resolve()), split="",
    )
    model = make_run(root / "run", text_model)
    embed(root / "run", features, root / "index", EmbedConfig())
    return Lib(root, model, audio, names, captions, list(durations), root / "index", features, n - 1, paths)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body)


def call(base: str, method: str, path: str, headers: dict | None = None, body: bytes | None = None,
         chunked: bool = False) -> Reply:
    """One HTTP request (http.client: a URL is sent exactly as given, unnormalised)."""
    url = urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    try:
        if chunked:  # no Content-Length: the body in chunked transfer encoding
            conn.putrequest(method, path)
            for k, v in (headers or {}).items():
                conn.putheader(k, v)
            conn.putheader("Transfer-Encoding", "chunked")
            conn.endheaders()
            conn.send(f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n")
        else:
            conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return Reply(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
    finally:
        conn.close()


def multipart(field_name: str, filename: str, data: bytes) -> tuple[bytes, str]:
    boundary = "----clotho-test-boundary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="{field_name}"; filename="{filename}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


@contextlib.contextmanager
def server(*args: str, env: dict | None = None, log: Path | None = None, timeout: float = 180):
    """`clotho-retrieve serve ARGS --port P` in a subprocess; yields its base URL once it answers HTTP."""
    port = free_port()
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    environ.update(env or {})
    log = log or Path(os.devnull)
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "clotho_retrieve", "serve", "--port", str(port), *args],
            stdout=out, stderr=subprocess.STDOUT, env=environ, cwd=REPO,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                text = log.read_text(errors="replace") if log != Path(os.devnull) else ""
                raise RuntimeError(f"serve exited with {proc.returncode}: {text[-2000:]}")
            try:
                call(base, "GET", "/api/health")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError("serve did not start") from None
                time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
