"""The HTTP API and the page: FastAPI routes over served libraries (see clotho_retrieve/serve/__init__.py).

Every parameter is checked before any work, so a bad request gets a 4xx JSON error ``{"error": ...}``
that names the parameter and the problem. An unexpected exception still gets JSON (500, no traceback;
the traceback goes to the server's log) and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from clotho_retrieve.serve.backend import ClothoRetrieveError
from clotho_retrieve.serve.library import AUDIO_TYPES, Library
from clotho_retrieve.serve.security import Guard, RangeError, parse_range

log = logging.getLogger("clotho_retrieve.serve")

MAX_K = 1000  # results per request
MAX_QUERY_CHARS = 1000  # a caption is ~10-20 words; the text tower reads 64 tokens at most
DEFAULT_MAX_UPLOAD = 20 * 1024 * 1024
STATIC = Path(__file__).parent / "static"
STATIC_TYPES = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; media-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
CHUNK = 1 << 16


class ApiError(Exception):
    """A request the server refuses: HTTP ``status`` with a JSON {"error": message}."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


# ----------------------------------------------------------------------------------------------
# Parameter checks
# ----------------------------------------------------------------------------------------------
def check_k(k: str | None, max_k: int = MAX_K) -> int:
    try:
        value = int(k) if k is not None else 10
    except ValueError:
        raise ApiError(400, f"k: {k[:20]!r} is not a whole number (1..{max_k})") from None
    if not 1 <= value <= max_k:
        raise ApiError(400, f"k: {value} is out of range; ask for 1..{max_k} results")
    return value


def check_query(q: str | None, max_chars: int = MAX_QUERY_CHARS) -> str:
    if q is None:
        raise ApiError(400, 'q: missing; give a description such as "dog barking in the rain"')
    if len(q) > max_chars:
        raise ApiError(400, f"q: {len(q):,} characters; at most {max_chars:,}")
    text = " ".join(q.split())
    if not text:
        raise ApiError(400, 'q: empty; give a description such as "dog barking in the rain"')
    return text


def check_id(lib: Library, clip_id: str) -> int:
    try:
        row = int(clip_id)
    except ValueError:
        row = -1
    if not 0 <= row < lib.count or not clip_id.isdigit():
        raise ApiError(404, f"id: {clip_id[:20]!r} is not a clip of index {lib.name!r} (0..{lib.count - 1})")
    return row


# ----------------------------------------------------------------------------------------------
# The app
# ----------------------------------------------------------------------------------------------
def create_app(
    libraries: dict[str, Library],
    token: str | None = None,
    max_upload: int = DEFAULT_MAX_UPLOAD,
    loopback_only_hosts: bool = True,
):
    """The ASGI app serving ``libraries`` (name -> Library), wrapped in the token / Host guard."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        for lib in libraries.values():
            lib.close()

    app = FastAPI(title="clotho-retrieve", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    add_error_handlers(app)
    add_page_routes(app)
    add_api_routes(app, libraries, max_upload)
    return Guard(app, token=token, loopback_only_hosts=loopback_only_hosts)


def add_error_handlers(app: FastAPI) -> None:
    """Every error as JSON {"error": ...}: ours (4xx), FastAPI's and, as a last resort, the unexpected."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return _error(exc.status, exc.message, exc.headers)

    @app.exception_handler(ClothoRetrieveError)
    async def _user_error(request: Request, exc: ClothoRetrieveError):
        return _error(400, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        message = f"not found: {request.url.path[:100]}" if exc.status_code == 404 else str(exc.detail)
        return _error(exc.status_code, message, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "request"
        return _error(422, f"{where}: {first.get('msg', 'invalid')}")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):  # last resort: JSON, traceback to the log
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return _error(500, f"internal error ({type(exc).__name__}); see the server log")


def add_page_routes(app: FastAPI) -> None:
    """The page and its two static files, read once; nothing else under /static is served."""
    static = {name: (STATIC / name).read_bytes() for name in STATIC_TYPES}
    page = (STATIC / "index.html").read_bytes()

    @app.get("/")
    async def index_page():
        headers = {"content-security-policy": PAGE_CSP, "referrer-policy": "no-referrer"}
        return Response(page, media_type="text/html; charset=utf-8", headers=headers)

    @app.get("/favicon.ico")
    async def favicon():
        return Response(status_code=204)

    @app.get("/static/{name}")
    async def static_file(name: str):
        if name not in static:
            raise ApiError(404, f"not found: /static/{name[:60]}")
        return Response(static[name], media_type=STATIC_TYPES[name], headers={"cache-control": "no-cache"})


def add_api_routes(app: FastAPI, libraries: dict[str, Library], max_upload: int) -> None:
    """/api/health, /api/search, /api/search/audio, /api/similar, /api/thumbnail and /audio."""

    def pick(index: str | None) -> Library:
        if index is None or index == "":
            if len(libraries) == 1:
                return next(iter(libraries.values()))
            raise ApiError(400, f"index: missing; choose one of {', '.join(libraries)}")
        lib = libraries.get(index)
        if lib is None:
            raise ApiError(404, f"index {index[:40]!r}: unknown; served: {', '.join(libraries)}")
        return lib

    def answer(lib: Library, kind: str, query, t0: float, scores, rows) -> JSONResponse:
        results = lib.hits(scores, rows)
        took = round((time.perf_counter() - t0) * 1e3, 2)
        body = {"index": lib.name, "kind": kind, "query": query, "took_ms": took, "results": results}
        return JSONResponse(body)

    @app.get("/api/health")
    async def health():
        return JSONResponse({"status": "ok", "indexes": [lib.describe() for lib in libraries.values()]})

    @app.get("/api/search")
    async def search(q: str | None = None, k: str | None = None, index: str | None = None):
        lib, k, text = pick(index), check_k(k), check_query(q)
        t0 = time.perf_counter()
        scores, rows = await asyncio.wrap_future(lib.search_text(text, k))
        return answer(lib, "text", text, t0, scores, rows)

    @app.get("/api/similar/{index}/{clip_id}")
    def similar(index: str, clip_id: str, k: str | None = None):
        lib = pick(index)
        row, k = check_id(lib, clip_id), check_k(k)
        t0 = time.perf_counter()
        scores, rows = lib.similar(row, k)
        return answer(lib, "similar", {"id": row, "file": lib.clip(row)[0]}, t0, scores, rows)

    @app.post("/api/search/audio")
    async def search_audio(request: Request, k: str | None = None, index: str | None = None):
        lib, k = pick(index), check_k(k)
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="clotho-serve-") as tmp:
            path, name = await receive_upload(request, Path(tmp), max_upload)
            scores, rows = await run_in_threadpool(lib.search_clip, path, k)
        return answer(lib, "audio", {"file": name}, t0, scores, rows)

    @app.get("/api/thumbnail/{index}/{clip_id}")
    def thumbnail(index: str, clip_id: str):
        lib = pick(index)
        row = check_id(lib, clip_id)
        data = lib.thumbnail(row)
        if data is None:
            raise ApiError(404, f"id {row}: no cached features for its thumbnail (serve --features)")
        return Response(data, media_type="image/png", headers={"cache-control": "private, max-age=86400"})

    @app.get("/audio/{index}/{clip_id}")
    def audio(index: str, clip_id: str, request: Request):
        lib = pick(index)
        row = check_id(lib, clip_id)
        path, why = lib.audio_file(row)
        if path is None:
            raise ApiError(404, why)
        return stream_file(path, request.headers.get("range"))


# ----------------------------------------------------------------------------------------------
# Files in and out
# ----------------------------------------------------------------------------------------------
async def receive_upload(request: Request, folder: Path, max_upload: int) -> tuple[Path, str]:
    """Save an uploaded clip (a multipart form's file, or the raw body) as ``folder``/clip, refusing more
    than ``max_upload`` bytes. Returns the path and the client's file name (for display only)."""
    length = request.headers.get("content-length")
    if length is None:
        raise ApiError(411, "upload: Content-Length required")
    if not length.isdigit():
        raise ApiError(400, f"upload: bad Content-Length {length[:20]!r}")
    limit_mb = f"{max_upload / 2**20:g} MB"
    if int(length) > max_upload:
        raise ApiError(413, f"upload: {int(length):,} bytes; at most {limit_mb} (serve --max-upload-mb)")
    path, name, size = folder / "clip", "uploaded clip", 0
    with open(path, "wb") as out:
        if request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
            form = await request.form(max_files=1, max_fields=10)
            try:
                files = [v for v in form.values() if hasattr(v, "read") and hasattr(v, "filename")]
                if not files:
                    raise ApiError(400, "upload: no file in the form (send it as the field 'file')")
                upload = files[0]
                name = os.path.basename(upload.filename or name)[:200]
                while chunk := await upload.read(CHUNK):
                    size += len(chunk)
                    out.write(chunk)
            finally:
                await form.close()
        else:
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_upload:
                    raise ApiError(413, f"upload: more than {limit_mb} (serve --max-upload-mb)")
                out.write(chunk)
    if size == 0:
        raise ApiError(400, "upload: empty; send an audio file (WAV, FLAC, OGG or MP3)")
    return path, name


def stream_file(path: Path, range_header: str | None) -> Response:
    """The file, or the byte range the Range header asks for (206), for seeking in the page."""
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed by the generator
        size = os.fstat(fh.fileno()).st_size
    except OSError:
        raise ApiError(404, f"audio of {path.name} unavailable: cannot be read") from None
    try:
        span = parse_range(range_header, size)
    except RangeError as exc:
        fh.close()
        raise ApiError(416, str(exc), {"content-range": f"bytes */{size}"}) from None
    start, end = span or (0, size)
    headers = {"accept-ranges": "bytes", "content-length": str(end - start), "cache-control": "private"}
    if span is not None:
        headers["content-range"] = f"bytes {start}-{end - 1}/{size}"

    def chunks():
        with fh:
            fh.seek(start)
            left = end - start
            while left > 0 and (data := fh.read(min(CHUNK, left))):
                left -= len(data)
                yield data

    media = AUDIO_TYPES.get(path.suffix.lower(), "application/octet-stream")
    return StreamingResponse(chunks(), status_code=206 if span else 200, media_type=media, headers=headers)
