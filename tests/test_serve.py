"""`serve`: the JSON API against a real `clotho-retrieve serve` process on a free loopback port, every
hostile request of the issue (4xx JSON naming the problem, the server keeps serving), the token and Host
guards, byte ranges, and the pieces (range parsing, path containment, batching, thumbnails) on their own."""

from __future__ import annotations

import json
import struct
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote

import numpy as np
import pytest
import torch
from serve_helpers import build_library, call, multipart, server
from test_search import brute_force
from typer.testing import CliRunner

from clotho_retrieve.cli import app as cli_app
from clotho_retrieve.index import EmbeddingIndex
from clotho_retrieve.serve import index_names
from clotho_retrieve.serve.batcher import Batcher
from clotho_retrieve.serve.library import find_sources, locate
from clotho_retrieve.serve.security import RangeError, is_loopback, parse_range
from clotho_retrieve.serve.thumbs import downsample, png, to_pixels

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def lib(tmp_path_factory, minilm_path):
    return build_library(tmp_path_factory.mktemp("serve"), minilm_path)


@pytest.fixture(scope="module")
def base(lib):
    # float32 text tower: its answers are compared with torch's to 1e-5 (the int8 default: see below)
    args = ("--index", f"lib={lib.index}", "--max-upload-mb", "1", "--text-precision", "fp32")
    with server(*args, log=lib.root / "serve.log") as url:
        yield url


@pytest.fixture(scope="module")
def vectors(lib):
    with EmbeddingIndex(lib.index) as idx:
        return np.asarray(idx.vectors)


def get(base, path, **headers):
    return call(base, "GET", path, headers)


def encode(model, text: str) -> np.ndarray:
    with torch.inference_mode():
        return model.encode_text([text]).numpy()  # (1, D)


# ----------------------------------------------------------------------------------------------
# The API
# ----------------------------------------------------------------------------------------------
def test_health_describes_the_index(base, lib):
    r = get(base, "/api/health")
    assert r.status == 200 and r.headers["content-type"] == "application/json"
    (index,) = r.json()["indexes"]
    assert index["name"] == "lib" and index["clips"] == len(lib.names)
    assert index["audio"] is True and index["thumbnails"] is True and index["index_type"] == "exact"
    assert index["text_tower"] == "onnx fp32"


def test_text_search_equals_brute_force_with_the_clips_metadata(base, lib, vectors):
    q = "tone number 3"
    r = get(base, f"/api/search?q={quote(q)}&k=5")
    assert r.status == 200
    data = r.json()
    assert data["kind"] == "text" and data["query"] == q and data["index"] == "lib"
    want = brute_force(vectors, encode(lib.model, q), 5)[0]
    results = data["results"]
    assert [h["id"] for h in results] == list(want)
    assert [h["rank"] for h in results] == [1, 2, 3, 4, 5]
    scores = vectors[want] @ encode(lib.model, q)[0]
    np.testing.assert_allclose([h["score"] for h in results], scores, atol=1e-5)
    for h in results:
        row = h["id"]
        assert h["file"] == lib.names[row]
        assert h["captions"] == lib.captions[row]
        assert h["duration"] == pytest.approx(lib.durations[row], abs=1e-3)
        assert h["thumbnail"] == f"/api/thumbnail/lib/{row}"
        # the symlink that leaves the library root is never offered
        assert h["audio"] == (None if row == lib.link_row else f"/audio/lib/{row}")


def test_concurrent_searches_each_get_their_own_answer(base, lib, vectors):
    """Requests batched together by the server's text worker are answered as if asked one by one."""
    queries = [(f"a hum at pitch {i % 7} number {i}", 1 + i % 9) for i in range(24)]

    def ask(item):
        q, k = item
        return get(base, f"/api/search?q={quote(q)}&k={k}").json()

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, queries))
    for (q, k), data in zip(queries, answers, strict=True):
        assert data["query"] == q
        assert [h["id"] for h in data["results"]] == list(brute_force(vectors, encode(lib.model, q), k)[0])


def test_a_repeated_query_is_answered_from_the_query_cache(base):
    def cache():
        return get(base, "/api/health").json()["indexes"][0]["query_cache"]

    before = cache()
    first = get(base, "/api/search?q=a%20cached%20hum&k=3").json()["results"]
    again = get(base, "/api/search?q=a%20%20cached%20hum%20&k=3").json()["results"]  # same text, spaced
    after = cache()
    assert again == first
    assert (after["hits"] - before["hits"], after["misses"] - before["misses"]) == (1, 1)


def test_more_like_this_ranks_the_others_by_the_clips_own_embedding(base, lib, vectors):
    row = 4
    data = get(base, f"/api/similar/lib/{row}?k=4").json()
    order = [int(i) for i in brute_force(vectors, vectors[row : row + 1], len(vectors))[0] if i != row]
    assert [h["id"] for h in data["results"]] == order[:4]
    assert data["kind"] == "similar" and data["query"] == {"id": row, "file": lib.names[row]}


@pytest.mark.parametrize("form", [True, False])
def test_query_by_uploaded_clip_finds_that_clip(base, lib, form):
    row = 5
    audio = lib.paths[row].read_bytes()
    if form:
        body, ctype = multipart("file", "../../evil name.wav", audio)
    else:
        body, ctype = audio, "audio/wav"
    r = call(base, "POST", "/api/search/audio?k=3", {"Content-Type": ctype}, body)
    assert r.status == 200, r.body
    data = r.json()
    assert data["kind"] == "audio"
    assert data["query"]["file"] == ("evil name.wav" if form else "uploaded clip")  # a name, never a path
    first = data["results"][0]
    assert first["id"] == row and first["score"] == pytest.approx(1.0, abs=1e-4)


def test_audio_streams_the_file_with_byte_ranges(base, lib):
    row = 7  # sub/deep.wav: a name with a folder, inside the root
    whole = lib.paths[row].read_bytes()
    r = get(base, f"/audio/lib/{row}")
    assert r.status == 200 and r.body == whole
    assert r.headers["content-type"] == "audio/wav" and r.headers["accept-ranges"] == "bytes"
    n = len(whole)
    cases = {"bytes=10-99": (10, 100), "bytes=100-": (100, n), "bytes=-64": (n - 64, n)}
    cases[f"bytes=5-{n + 50}"] = (5, n)  # an end past the file: up to its last byte
    for header, (a, b) in cases.items():
        r = get(base, f"/audio/lib/{row}", Range=header)
        assert r.status == 206, header
        assert r.body == whole[a:b]
        assert r.headers["content-range"] == f"bytes {a}-{b - 1}/{n}"
    r = get(base, f"/audio/lib/{row}", Range="bytes=0-1,5-9")  # several ranges: the whole file (RFC 9110)
    assert r.status == 200 and r.body == whole
    r = get(base, f"/audio/lib/{row}", Range=f"bytes={n}-")
    assert r.status == 416 and r.headers["content-range"] == f"bytes */{n}"
    assert "not satisfiable" in r.json()["error"]


def test_thumbnail_is_a_png_of_the_cached_features(base, lib):
    r = get(base, "/api/thumbnail/lib/2")
    assert r.status == 200 and r.headers["content-type"] == "image/png"
    assert r.body[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", r.body[16:24])
    assert height == 64 and width >= 1  # 64 Mel bands; one column per frame up to 240


def test_page_and_static_files(base):
    r = get(base, "/")
    assert r.status == 200 and r.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in r.headers["content-security-policy"]
    page = r.body.decode()
    assert "/static/app.js" in page and "/static/style.css" in page
    assert "http://" not in page and "https://" not in page  # nothing from elsewhere: works offline
    for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
        r = get(base, f"/static/{name}")
        assert r.status == 200 and r.headers["content-type"].startswith(kind)
        assert b"http://" not in r.body and b"https://" not in r.body


# ----------------------------------------------------------------------------------------------
# Hostile requests: 4xx JSON naming the problem; the server keeps serving
# ----------------------------------------------------------------------------------------------
HOSTILE_GETS = [
    ("/api/search?q=&k=5", 400, "q: empty"),
    ("/api/search?q=%20%20%09&k=5", 400, "q: empty"),
    ("/api/search?k=5", 400, "q: missing"),
    ("/api/search?q=" + "a" * 10_000, 400, "q: 10,000 characters"),
    ("/api/search?q=" + quote("犬") * 10_000, 400, "q: 10,000 characters"),
    ("/api/search?q=dog&k=0", 400, "k: 0 is out of range"),
    ("/api/search?q=dog&k=-3", 400, "k: -3 is out of range"),
    ("/api/search?q=dog&k=1000000", 400, "k: 1000000 is out of range"),
    ("/api/search?q=dog&k=abc", 400, "k: 'abc' is not a whole number"),
    ("/api/search?q=dog&k=1e3", 400, "k: '1e3' is not a whole number"),
    ("/api/search?q=dog&index=nope", 404, "index 'nope': unknown"),
    ("/api/similar/lib/999999", 404, "id: '999999' is not a clip"),
    ("/api/similar/lib/-1", 404, "id: '-1' is not a clip"),
    ("/api/similar/lib/abc", 404, "id: 'abc' is not a clip"),
    ("/api/similar/nope/0", 404, "index 'nope': unknown"),
    ("/api/similar/lib/0?k=0", 400, "k: 0 is out of range"),
    ("/audio/lib/9", 404, "id: '9' is not a clip"),
    ("/audio/lib/8", 404, "link.wav unavailable: its path leads out of the library root"),
    ("/audio/lib/..%2F..%2F..%2Fetc%2Fpasswd", 404, "not found"),
    ("/audio/lib/../../../etc/passwd", 404, "not found"),
    ("/audio/../pyproject.toml", 404, "index '..': unknown"),
    ("/static/..%2F..%2F..%2Fpyproject.toml", 404, "not found"),
    ("/static/app.py", 404, "not found"),
    ("/api/thumbnail/lib/12", 404, "id: '12' is not a clip"),
    ("/api/nothing-here", 404, "not found: /api/nothing-here"),
]


@pytest.mark.parametrize(("path", "status", "message"), HOSTILE_GETS)
def test_hostile_get_gets_a_json_error_naming_the_problem(base, path, status, message):
    r = get(base, path)
    assert r.status == status, r.body
    assert r.headers["content-type"] == "application/json"
    assert message in r.json()["error"]


def test_bad_range_header_is_a_json_416(base):
    r = get(base, "/audio/lib/0", Range="pages=1-2")
    assert r.status == 416 and "expected bytes=START-END" in r.json()["error"]


def test_hostile_uploads(base, lib, tmp_path):
    text = b"this is not audio, just some text\n" * 20
    form, form_type = multipart("file", "notes.txt", text)
    cases = [
        ({"Content-Type": "text/plain"}, text, 400, "uploaded clip: unreadable audio"),
        ({"Content-Type": form_type}, form, 400, "uploaded clip: unreadable audio"),
        ({"Content-Type": "audio/wav"}, b"", 400, "upload: empty"),
        ({"Content-Type": "audio/wav"}, lib.paths[0].read_bytes()[:300], 400, "uploaded clip: "),
        ({"Content-Type": "audio/wav"}, b"\0" * (1536 * 1024), 413, "at most 1 MB"),
    ]
    body, ctype = multipart("file", "a.wav", b"x")
    no_file = body.replace(b'; filename="a.wav"', b"")  # a plain field, no file
    cases.append(({"Content-Type": ctype}, no_file, 400, "no file in the form"))
    for headers, body, status, message in cases:
        r = call(base, "POST", "/api/search/audio", headers, body)
        assert r.status == status, (message, r.body)
        assert message in r.json()["error"]
    r = call(base, "POST", "/api/search/audio", {"Content-Type": "audio/wav"}, text, chunked=True)
    assert r.status == 411 and "Content-Length required" in r.json()["error"]
    r = call(base, "POST", "/api/search/audio?k=0", {"Content-Type": "audio/wav"}, text)
    assert r.status == 400 and "k: 0" in r.json()["error"]


def test_wrong_method_and_foreign_host_are_refused(base):
    r = call(base, "DELETE", "/api/search?q=dog")
    assert r.status == 405 and "error" in r.json()
    r = get(base, "/api/health", Host="attacker.example:8000")  # DNS rebinding to 127.0.0.1
    assert r.status == 421 and "attacker.example" in r.json()["error"]


def test_the_server_keeps_serving_after_hostile_requests(base, lib):
    for path, _, _ in HOSTILE_GETS:
        get(base, path)
    r = get(base, "/api/search?q=tone&k=2")
    assert r.status == 200 and len(r.json()["results"]) == 2
    log = (lib.root / "serve.log").read_text()
    assert "Traceback" not in log


# ----------------------------------------------------------------------------------------------
# Token, audio moved
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def guarded(lib, tmp_path_factory):
    empty = tmp_path_factory.mktemp("moved")  # the library's audio is not here
    env = {"CLOTHO_RETRIEVE_TOKEN": TOKEN}
    with server("--index", f"lib={lib.index}", "--audio-root", str(empty), env=env) as url:
        yield url


def test_token_is_required_on_every_route(guarded):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    for path in ("/", "/static/app.js", "/api/health", "/api/search?q=dog", "/api/similar/lib/0",
                 "/audio/lib/0", "/api/thumbnail/lib/0", "/nowhere"):
        r = get(guarded, path)
        assert r.status == 401 and "bearer token is required" in r.json()["error"], path
        assert r.headers["www-authenticate"] == "Bearer"
        assert get(guarded, path, Authorization="Bearer wrong").status == 401
    assert get(guarded, "/api/health", **auth).status == 200
    r = call(guarded, "POST", "/api/search/audio", {"Content-Type": "audio/wav"}, b"RIFF")
    assert r.status == 401


def test_page_opened_with_the_token_sets_a_cookie_that_authorises(guarded):
    assert get(guarded, "/?token=wrong").status == 401
    r = get(guarded, f"/?token={TOKEN}")
    assert r.status == 200
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    r = get(guarded, "/api/health", Cookie=cookie.split(";")[0])
    assert r.status == 200 and r.json()["indexes"][0]["name"] == "lib"


def test_moved_audio_still_searches_and_says_unavailable(guarded):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert get(guarded, "/api/health", **auth).json()["indexes"][0]["audio"] is False
    r = get(guarded, "/api/search?q=tone%20number%202&k=4", **auth)
    assert r.status == 200
    results = r.json()["results"]
    assert len(results) == 4 and all(h["audio"] is None for h in results)
    assert all(h["thumbnail"] for h in results)  # the features are still found
    r = get(guarded, "/audio/lib/0", **auth)
    assert r.status == 404 and "clip0.wav unavailable: not found in" in r.json()["error"]


def test_the_default_int8_text_tower_scores_as_float32_does_to_its_precision(guarded, lib, vectors):
    """`serve` encodes with the int8 tower by default. Its embeddings keep a cosine >= 0.98 to float32
    ones (text_int8.MIN_COSINE), so each score moves by at most ||e_int8 - e_fp32|| <= sqrt(2 (1 - 0.98)),
    and the clip that torch ranks first stays near the top."""
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert get(guarded, "/api/health", **auth).json()["indexes"][0]["text_tower"] == "onnx int8"
    for q in ["tone number 3", "a hum at pitch 5", "a dog barks in the rain"]:
        results = get(guarded, f"/api/search?q={quote(q)}&k={len(lib.names)}", **auth).json()["results"]
        want = vectors @ encode(lib.model, q)[0]  # (N,) float32 torch scores
        got = {h["id"]: h["score"] for h in results}
        assert sorted(got) == list(range(len(lib.names)))
        bound = (2 * (1 - 0.98)) ** 0.5
        assert max(abs(got[i] - want[i]) for i in got) <= bound
        order = [h["id"] for h in results]
        above = order[: order.index(int(np.argmax(want)))]  # clips int8 puts above torch's first
        assert all(want[i] >= want.max() - 2 * bound for i in above)


def test_a_bad_text_precision_is_refused_in_one_line(lib):
    result = CliRunner().invoke(cli_app, ["serve", "--index", str(lib.index), "--text-precision", "int4"])
    assert result.exit_code == 1
    assert "--text-precision 'int4': choose int8 or fp32" in result.stderr
    assert result.stderr.strip().count("\n") == 0


def test_non_loopback_host_warns(tmp_path):
    result = CliRunner().invoke(cli_app, ["serve", "--index", str(tmp_path / "none"), "--host", "0.0.0.0"])
    assert result.exit_code == 1
    assert "warning" in result.stderr and "0.0.0.0" in result.stderr and "--token" in result.stderr
    assert "no index.h5" in result.stderr


# ----------------------------------------------------------------------------------------------
# The pieces
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("header", "size", "want"),
    [
        (None, 100, None),
        ("bytes=0-0", 100, (0, 1)),
        ("bytes=10-19", 100, (10, 20)),
        ("bytes=90-", 100, (90, 100)),
        ("bytes=-10", 100, (90, 100)),
        ("bytes=-1000", 100, (0, 100)),
        ("bytes=50-5000", 100, (50, 100)),
        ("BYTES = 3-4", 100, (3, 5)),
        ("bytes=1-2,4-5", 100, None),
    ],
)
def test_parse_range(header, size, want):
    assert parse_range(header, size) == want


@pytest.mark.parametrize(
    ("header", "size"),
    [("bytes=100-", 100), ("bytes=5-4", 100), ("bytes=-0", 100), ("bytes=-", 100), ("bytes=a-b", 100),
     ("items=0-1", 100), ("bytes=0-", 0)],
)
def test_parse_range_refuses(header, size):
    with pytest.raises(RangeError):
        parse_range(header, size)


def test_loopback_hosts():
    assert all(map(is_loopback, ["127.0.0.1", "127.3.2.1", "::1", "[::1]", "localhost", "LOCALHOST"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "192.168.1.4", "example.org", ""]))


def test_locate_keeps_files_inside_the_root(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside.wav"
    (root / "a").mkdir(parents=True)
    (root / "a" / "x.wav").write_bytes(b"x")
    outside.write_bytes(b"o")
    (root / "escape.wav").symlink_to(outside)
    (root / "a" / "inner.wav").symlink_to(root / "a" / "x.wav")  # a link that stays inside is fine
    assert locate(root, "a/x.wav")[0] == (root / "a" / "x.wav").resolve()
    assert locate(root, "a/inner.wav")[0] == (root / "a" / "x.wav").resolve()
    for name in ("escape.wav", "../outside.wav", "a/../../outside.wav", str(outside), "."):
        path, why = locate(root, name)
        assert path is None and "leads out of the library root" in why, name
    assert locate(root, "a/missing.wav") == (None, f"not found in {root}")
    assert locate(root, "a\0b")[0] is None


def test_audio_root_override_for_an_index_whose_features_moved(lib, tmp_path):
    import shutil

    moved = shutil.copytree(lib.index, tmp_path / "elsewhere" / "index")
    with EmbeddingIndex(moved) as idx:
        (src,) = find_sources(idx, ["library.h5"], [], None).values()
        assert src.features is None and src.root is None  # old-style: nothing to go by
        (src,) = find_sources(idx, ["library.h5"], [], lib.audio).values()
        assert src.root == lib.audio
        # --features finds the features file, and from it the library root
        (src,) = find_sources(idx, ["library.h5"], [lib.features.parent], None).values()
        assert src.features == lib.features and src.root == lib.audio.resolve()


def test_index_names():
    named = index_names(["demo/index", "runs/a/index", "x=some/where", "/data/clotho-eval"])
    assert list(named) == ["demo", "a", "x", "clotho-eval"]
    assert list(index_names(["a/index", "b/a"])) == ["a", "a-2"]


def test_batcher_keeps_order_and_reports_errors_to_each_caller():
    calls, gate = [], threading.Event()

    def fn(items):
        gate.wait(5)
        calls.append(list(items))
        if "boom" in items:
            raise ValueError("boom")
        return [x * 2 for x in items]

    batcher = Batcher(fn, max_batch=4)
    first = batcher.submit(0)  # the worker takes this alone and waits at the gate
    futures = [batcher.submit(i) for i in range(1, 7)]
    gate.set()
    assert first.result(5) == 0 and [f.result(5) for f in futures] == [2, 4, 6, 8, 10, 12]
    assert all(len(c) <= 4 for c in calls) and sum(map(len, calls)) == 7 and len(calls) < 7
    bad = batcher.submit("boom")
    with pytest.raises(ValueError, match="boom"):
        bad.result(5)
    assert batcher.submit(5).result(5) == 10  # still serving
    batcher.close()


def test_thumbnail_pixels():
    mel = np.arange(10 * 4, dtype=np.float32).reshape(10, 4)  # (T=10, M=4)
    small = downsample(mel, 3)  # runs of frames [0,3), [3,6), [6,10)
    np.testing.assert_allclose(small, [mel[0:3].mean(0), mel[3:6].mean(0), mel[6:10].mean(0)])
    px = to_pixels(mel, width=3)
    assert px.shape == (4, 3, 3) and px.dtype == np.uint8
    # the highest band is the top row and brighter than the lowest band (the bottom row)
    assert px[0].astype(int).sum() > px[-1].astype(int).sum()
    data = png(px)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    idat_len = struct.unpack(">I", data[33:37])[0]
    raw = zlib.decompress(data[41 : 41 + idat_len])
    rows = np.frombuffer(raw, np.uint8).reshape(4, 1 + 3 * 3)
    assert (rows[:, 0] == 0).all()  # filter byte "none"
    np.testing.assert_array_equal(rows[:, 1:].reshape(4, 3, 3), px)


def test_bf16_text_tower_agrees_with_float32(lib):
    from clotho_retrieve.serve.library import Library

    texts = ["tone number 3", "a hum at pitch 5", "Café au lait — naïve 犬の鳴き声"]
    libs = [
        Library("a", lib.index, text_precision="fp32"),
        Library("b", lib.index, bf16=True, text_precision="fp32"),
    ]
    try:
        fp32, bf16 = (x.encode_texts(texts) for x in libs)  # (3, D) each
    finally:
        for x in libs:
            x.close()
    assert bf16.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(bf16, axis=1), 1, atol=1e-6)
    assert (fp32 * bf16).sum(1).min() > 0.999  # the same direction, to bfloat16's precision


def test_captions_in_memory_equal_index_h5_and_disk_reads_stay_when_too_big(lib):
    from clotho_retrieve.serve.library import Library

    big, small = Library("a", lib.index, text_precision="fp32"), None
    try:
        assert big.captions is not None and len(big.captions) == len(lib.names)
        assert [json.loads(big.captions[i]) for i in range(len(lib.names))] == lib.captions
        small = Library("b", lib.index, text_precision="fp32", captions_in_memory_max=10)
        assert small.captions is None  # more than 10 bytes of captions: read per answer
        rows = np.array([4, 0, 7])
        for x in (big, small):
            assert [h["captions"] for h in x.hits(np.zeros(3), rows)] == [lib.captions[r] for r in rows]
    finally:
        for x in (big, small):
            if x is not None:
                x.close()



def test_requests_httptools_refuses_are_explained_as_the_app_would():
    """uvicorn's httptools parser refuses request lines over 65,535 bytes before the app sees them; the
    JSON 400 then names the problem (the over-long q, as the app's own check words it)."""
    from clotho_retrieve.serve.http import URL_MAX, explain_refused

    long_q = ("/api/search?k=3&q=" + quote("犬") * 10_000).encode()
    assert len(long_q) > URL_MAX
    assert explain_refused(long_q).startswith("q: 10,000 characters; at most")
    other = b"/api/search?x=" + b"a" * 70_000
    assert explain_refused(other) == f"request line of {len(other):,} bytes; at most 65,535"
    assert explain_refused(b"/api/search?q=dog") == "malformed HTTP request"
