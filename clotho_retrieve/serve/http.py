"""The HTTP protocol `serve` runs uvicorn with: httptools (uvicorn's C parser, ~10 % more requests/s than
h11 here; benchmarks/README.md), answering what it cannot parse with a JSON 400 like every other error.

uvicorn answers a request httptools refuses with a plain-text 400 before the app sees it. One such request
is ordinary: a request line over 65,535 bytes (httptools' URL offsets are 16-bit), e.g. a q of 10,000
characters of 3-byte UTF-8, 90 KB once percent-encoded. Its answer names the problem as the app would
(`q: 10,000 characters; at most ...`). Without httptools, h11 with a 256 KB request-line limit (the app
then answers itself).
"""

from __future__ import annotations

import json
from urllib.parse import parse_qs, urlsplit

H11_MAX_REQUEST_LINE = 256 * 1024
URL_MAX = 65_535  # httptools.parse_url: 16-bit offsets


def explain_refused(url: bytes) -> str:
    """What was wrong with a request httptools refused, in the app's words where the app has them."""
    from clotho_retrieve.serve.app import ApiError, check_query

    if len(url) <= URL_MAX:
        return "malformed HTTP request"
    query = parse_qs(urlsplit(url.decode("latin-1")).query, encoding="utf-8", errors="replace")
    if "q" in query:
        try:
            check_query(query["q"][0])
        except ApiError as exc:
            return exc.message
    return f"request line of {len(url):,} bytes; at most {URL_MAX:,}"


def http_protocol():
    """uvicorn's ``http`` setting: the httptools protocol with JSON 400s, or "h11" without httptools."""
    try:
        from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
    except ImportError:  # httptools not installed
        return "h11"

    class JsonErrorHttpTools(HttpToolsProtocol):
        def send_400_response(self, msg: str) -> None:  # uvicorn: the request could not be parsed
            body = json.dumps({"error": explain_refused(getattr(self, "url", b"") or b"")}).encode()
            head = [STATUS_LINE[400]]
            for name, value in self.server_state.default_headers:
                head += [name, b": ", value, b"\r\n"]
            head += [b"content-type: application/json\r\n", b"content-length: %d\r\n" % len(body)]
            self.transport.write(b"".join([*head, b"connection: close\r\n\r\n", body]))
            self.transport.close()

    return JsonErrorHttpTools
