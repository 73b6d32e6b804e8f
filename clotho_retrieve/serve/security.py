"""The server's guards: the bearer token, the Host header, byte ranges, loopback addresses.

Every request passes :class:`Guard` (a plain ASGI middleware, cheap enough for every request): with a
token set, it needs ``Authorization: Bearer TOKEN`` or the ``clotho_token`` cookie (which the page sets
when opened once as ``/?token=TOKEN``, so its <audio> elements, which cannot send headers, are
authorised too). On a loopback address, requests must also name a loopback host, so a web page
elsewhere cannot reach the server through a DNS name rebound to 127.0.0.1.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import re
from http.cookies import SimpleCookie
from urllib.parse import parse_qs

COOKIE = "clotho_token"
TOKEN_ENV = "CLOTHO_RETRIEVE_TOKEN"
LOOPBACK_NAMES = {"localhost", "localhost.", "ip6-localhost"}


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost."""
    host = host.strip("[]").lower()
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_name(host_header: str) -> str:
    """The host of a Host header: "127.0.0.1:8000" -> "127.0.0.1", "[::1]:80" -> "::1"."""
    if host_header.startswith("["):
        return host_header[1 : host_header.find("]")] if "]" in host_header else host_header
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


def json_error(status: int, message: str, headers: dict[str, str] | None = None):
    """ASGI messages of a JSON error response {"error": message}."""
    body = json.dumps({"error": message}).encode("utf-8")
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    head += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    return [
        {"type": "http.response.start", "status": status, "headers": head},
        {"type": "http.response.body", "body": body},
    ]


class Guard:
    """ASGI middleware: token check, Host check on loopback, and `nosniff` on every response."""

    def __init__(self, app, token: str | None = None, loopback_only_hosts: bool = True):
        self.app = app
        self.token = token.encode("utf-8") if token else None
        self.loopback_only_hosts = loopback_only_hosts

    def _authorised(self, scope) -> bool:
        if self.token is None:
            return True
        headers = dict(scope.get("headers") or [])
        auth = headers.get(b"authorization", b"")
        if auth[:7].lower() == b"bearer " and hmac.compare_digest(auth[7:].strip(), self.token):
            return True
        cookie = SimpleCookie()
        try:
            cookie.load(headers.get(b"cookie", b"").decode("latin-1"))
        except Exception:  # a malformed Cookie header is simply no cookie
            return False
        value = cookie.get(COOKIE)
        return value is not None and hmac.compare_digest(value.value.encode("utf-8"), self.token)

    def _page_token(self, scope) -> bool:
        """GET / with ?token=TOKEN: the page is allowed and the cookie is set."""
        if self.token is None or scope.get("path") != "/":
            return False
        given = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token", [""])[0]
        return hmac.compare_digest(given.encode("utf-8"), self.token)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.loopback_only_hosts:
            host = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
            if not is_loopback(_host_name(host)):
                for msg in json_error(421, f"Host {host!r} is not served; use http://127.0.0.1 or localhost"):
                    await send(msg)
                return
        set_cookie = self._page_token(scope)
        if not set_cookie and not self._authorised(scope):
            for msg in json_error(401, "a bearer token is required (Authorization: Bearer TOKEN, or open "
                                  "the page once as /?token=TOKEN)", {"www-authenticate": "Bearer"}):
                await send(msg)
            return

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.append((b"x-content-type-options", b"nosniff"))
                if set_cookie:
                    value = f"{COOKIE}={self.token.decode('utf-8')}; Path=/; HttpOnly; SameSite=Strict"
                    headers.append((b"set-cookie", value.encode("utf-8")))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


_RANGE = re.compile(r"^\s*(\d*)\s*-\s*(\d*)\s*$")


class RangeError(ValueError):
    """A Range header that cannot be served (416)."""


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """One byte range of a file of ``size`` bytes -> (start, end exclusive); None: send the whole file.

    Supports ``bytes=A-B``, ``bytes=A-`` and ``bytes=-N`` (the last N bytes). A list of ranges gets the
    whole file (allowed by RFC 9110). Raises RangeError for a malformed or unsatisfiable range.
    """
    if header is None:
        return None
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or not spec:
        raise RangeError(f"Range {header[:60]!r}: expected bytes=START-END")
    if "," in spec:
        return None
    m = _RANGE.match(spec)
    if not m or (not m.group(1) and not m.group(2)):
        raise RangeError(f"Range {header[:60]!r}: expected bytes=START-END")
    first, last = m.group(1), m.group(2)
    if not first:  # suffix: the last N bytes
        n = int(last)
        if n == 0 or size == 0:
            raise RangeError(f"Range {header[:60]!r}: not satisfiable for a file of {size} bytes")
        return max(0, size - n), size
    start = int(first)
    end = min(int(last) + 1, size) if last else size
    if start >= size or (last and int(last) < start):
        raise RangeError(f"Range {header[:60]!r}: not satisfiable for a file of {size} bytes")
    return start, end
