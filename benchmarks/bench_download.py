"""Throughput of the download stage's local work: loopback HTTP + MD5, MD5 alone, 7z extraction.

The network is what limits a real Clotho download (7.3 GB from Zenodo); this shows the machinery
itself is not the bottleneck, and how long verification and extraction take per GB on this machine.

    .venv/bin/python benchmarks/bench_download.py [--mb 256] [--audio-mb 32]
"""

from __future__ import annotations

import argparse
import functools
import http.server
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import py7zr
from rich.table import Table

from clotho_retrieve.archive import extract_7z
from clotho_retrieve.download import download_file
from clotho_retrieve.utils import console, make_progress, md5sum


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def _serve(folder: Path) -> http.server.ThreadingHTTPServer:
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _audio_like(n_bytes: int, rng: np.random.Generator) -> bytes:
    """16-bit mono 'recording' (tones + noise) so LZMA compresses it about as much as real audio."""
    t = np.arange(n_bytes // 2) / 44100.0
    x = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(t.size)
    return (x * 32767).astype("<i2").tobytes()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mb", type=int, default=256, help="size of the file to download (MiB)")
    ap.add_argument("--audio-mb", type=int, default=32, help="uncompressed audio in the 7z archive (MiB)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        served = tmp / "served"
        served.mkdir()
        blob = served / "blob.bin"
        blob.write_bytes(rng.bytes(args.mb << 20))
        md5 = md5sum(blob)
        server = _serve(served)
        url = f"http://127.0.0.1:{server.server_address[1]}/blob.bin"
        with make_progress() as bar:
            t = _timed(lambda: download_file(url, tmp / "out.bin", md5=md5, progress=bar))
        server.shutdown()
        rows.append(("download_file (loopback HTTP + MD5)", args.mb, t))
        rows.append(("md5sum", args.mb, _timed(lambda: md5sum(blob))))

        archive = tmp / "audio.7z"
        n_files = 16
        with py7zr.SevenZipFile(archive, "w") as sz:
            for i in range(n_files):
                sz.writestr(_audio_like((args.audio_mb << 20) // n_files, rng), f"development/{i:03d}.wav")
        ratio = archive.stat().st_size / (args.audio_mb << 20)
        t = _timed(lambda: extract_7z(archive, tmp / "extracted"))
        rows.append((f"extract_7z (LZMA2, {ratio:.0%} of raw)", args.audio_mb, t))

    table = Table(title="download stage throughput")
    for col in ("step", "MiB", "seconds", "MiB/s", "s per GB"):
        table.add_column(col, justify="left" if col == "step" else "right")
    for step, mib, seconds in rows:
        table.add_row(step, str(mib), f"{seconds:.2f}", f"{mib / seconds:.0f}", f"{seconds / mib * 1000:.1f}")
    console.print(table)


if __name__ == "__main__":
    main()
