"""`clotho-retrieve serve`: search, browse and listen in a browser, with a JSON API over the same index.

One long-lived process holds each index and its run's text tower (the audio tower is loaded on the
first query by example), so a query costs one text encoding and one index search, not a model load.

    GET  /                              the page (search box, results with audio, thumbnails, drop zone)
    GET  /api/health                    the served indexes
    GET  /api/search?q=TEXT&k=10&index=NAME          text-to-audio results
    POST /api/search/audio?k=10&index=NAME           audio-to-audio for an uploaded clip (form or body)
    GET  /api/similar/{index}/{id}?k=10              "more like this": the clips nearest to clip id
    GET  /api/thumbnail/{index}/{id}                 PNG of the clip's cached log-Mel
    GET  /audio/{index}/{id}                         the clip's audio file (HTTP Range: seekable)

Results: {"index", "kind", "query", "took_ms", "results": [{"rank", "score", "id", "file", "duration",
"captions", "audio", "thumbnail"}]} where audio / thumbnail are URLs, or null when unavailable.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from clotho_retrieve.serve.backend import ClothoRetrieveError

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def split_named(arg: str) -> tuple[str | None, str]:
    """"NAME=PATH" -> (NAME, PATH); a plain path (or one that exists as given) -> (None, PATH)."""
    name, sep, path = arg.partition("=")
    if sep and NAME.match(name) and not Path(arg).exists():
        return name, path
    return None, arg


def index_names(paths: list[str]) -> dict[str, Path]:
    """Name each --index: NAME=DIR, else the folder's name (its parent's for a folder called "index")."""
    named: dict[str, Path] = {}
    for arg in paths:
        name, path = split_named(arg)
        folder = Path(path).expanduser()
        if name is None:
            resolved = folder.resolve()
            base = resolved.name
            if base == "index" and resolved.parent.name:  # demo/index -> demo
                base = resolved.parent.name
            base = re.sub(r"[^A-Za-z0-9_.-]", "-", base).lstrip("._-")[:60] or "index"
            name, n = base, 2
            while name in named:
                name, n = f"{base}-{n}", n + 1
        elif name in named:
            raise ClothoRetrieveError(f"--index {arg}: the name {name!r} is given twice")
        named[name] = folder
    return named


def audio_roots(args: list[str], names: list[str]) -> dict[str, Path]:
    """--audio-root [NAME=]DIR -> index name -> folder (a plain DIR applies to every index)."""
    roots: dict[str, Path] = {}
    for arg in args:
        name, path = split_named(arg)
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise ClothoRetrieveError(f"--audio-root {arg}: not a folder")
        if name is not None and name not in names:
            raise ClothoRetrieveError(
                f"--audio-root {arg}: no index named {name!r} (served: {', '.join(names)})"
            )
        for n in [name] if name is not None else names:
            roots[n] = folder
    return roots


def load_libraries(
    indexes: list[str],
    features: list[str] | None = None,
    roots: list[str] | None = None,
    device: str = "cpu",
    bf16: bool = False,
    text_precision: str = "int8",
    query_cache: int = 1024,
):
    """Open every --index (and its run's text tower, shared by indexes of the same run; ONNX towers in
    ``text_precision``, see clotho_retrieve/text_int8.py)."""
    import torch

    from clotho_retrieve.serve.backend import faiss_threads
    from clotho_retrieve.serve.library import Library

    # one thread per model call and per FAISS search: several calls run at once (one text worker per core,
    # see Library), and on a small CPU threads of one call would wait on each other
    # (see clotho_retrieve/encoder.py)
    torch.set_num_threads(1)
    faiss_threads(1)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    named = index_names(indexes)
    by_index = audio_roots(roots or [], list(named))
    feature_paths = [Path(f).expanduser() for f in features or []]
    for f in feature_paths:
        if not f.exists():
            raise ClothoRetrieveError(f"--features {f}: no such file or folder")
    encoders: dict = {}
    libraries = {}
    try:
        for name, folder in named.items():
            root = by_index.get(name)
            libraries[name] = Library(
                name, folder, feature_paths, root, device, encoders, bf16=bf16, text_precision=text_precision,
                query_cache=query_cache,
            )
    except BaseException:
        for lib in libraries.values():
            lib.close()
        raise
    return libraries


def run_server(
    libraries: dict,
    host: str = "127.0.0.1",
    port: int = 8000,
    token: str | None = None,
    max_upload: int = 20 * 2**20,
    log_level: str = "warning",
) -> None:
    """Serve until interrupted (uvicorn, one process: the model and the index are loaded once)."""
    import uvicorn

    from clotho_retrieve.serve.app import create_app
    from clotho_retrieve.serve.http import H11_MAX_REQUEST_LINE, http_protocol
    from clotho_retrieve.serve.security import is_loopback

    app = create_app(libraries, token=token, max_upload=max_upload, loopback_only_hosts=is_loopback(host))
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, access_log=False, server_header=False, lifespan="on",
        http=http_protocol(),  # httptools, whose refusals (e.g. a 90 KB query) get JSON errors too
        h11_max_incomplete_event_size=H11_MAX_REQUEST_LINE,  # without httptools: the app answers those
    )
    uvicorn.Server(config).run()
