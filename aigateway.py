#!/usr/bin/env python3
"""aigateway: a personal, lightweight LLM API gateway in one file, standard library only.

Run it:
    python aigateway.py                      # GUI when a display is available, else headless
    python aigateway.py --headless [--config PATH] [--host H] [--port P]

It serves one local endpoint (default http://127.0.0.1:3000) that speaks the OpenAI API
(/v1/chat/completions, /v1/completions, /v1/embeddings, /v1/images/generations,
/v1/audio/speech, /v1/audio/transcriptions, /v1/models) and the Anthropic API (/v1/messages,
/v1/messages/count_tokens), and routes each request by model name to the user's upstream
channels by priority, falling back to the next channel when one fails.

Threads:
    Tk thread (GUI)  --call_soon_threadsafe-->  server thread (asyncio loop)  -->  upstreams
                     <--queue.Queue of (kind, payload)--
In headless mode the asyncio loop runs on the main thread and there is no queue consumer.

Outline (``grep -n '^# [0-9]*\\. ' aigateway.py``):
    0. Docstring, imports, __all__      7. Upstream HTTP client        12. Server thread bridge
    1. Constants and limits             8. HTTP server                 13. Tk GUI
    2. Errors                           9. Converters                  14. Command line and main()
    3. Small helpers                   10. Configuration
    4. HTTP/1.1 wire format (no I/O)   11. Gateway
    5. Incremental decoders (no I/O)
    6. Stream helpers
Each section uses only the sections above it.
"""

# =================================================================================================
# 0. Docstring, imports, __all__
# =================================================================================================

from __future__ import annotations

import argparse
import asyncio
import base64
import codecs
import collections
import copy
import hmac
import http
import ipaddress
import itertools
import json
import os
import queue
import re
import secrets
import signal
import socket
import ssl
import struct
import sys
import threading
import time
import urllib.parse
import zlib
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Iterable

__all__ = [
    "__version__", "GatewayError", "ProtocolError", "UpstreamError", "ConfigError",
    "Headers", "ChunkedDecoder", "SSEDecoder", "NDJSONDecoder", "SSEPassthrough",
    "UpstreamClient", "HTTPServer", "Request", "Response",
    "ConfigStore", "Gateway", "GatewayThread", "main",
]

# =================================================================================================
# 1. Constants and limits
# =================================================================================================

__version__ = "0.1.0"

DEFAULT_HOST = "127.0.0.1"            # loopback unless the user says otherwise
DEFAULT_PORT = 3000

MAX_HEAD_BYTES = 64 * 1024            # request/response head larger than this -> 431
MAX_REQUEST_LINE = 16 * 1024          # request line longer than this -> 414
MAX_HEADER_COUNT = 200                # more header lines than this -> 431
DEFAULT_MAX_BODY_MB = 64              # settings.max_body_mb; larger bodies -> 413
MAX_CHUNK_LINE = 4 * 1024             # a chunk-size line longer than this -> 400

HEADER_TIMEOUT = 10.0                 # a client that stalls mid-head is answered 408
KEEPALIVE_TIMEOUT = 75.0              # idle keep-alive connections are closed after this
BODY_IDLE_TIMEOUT = 60.0              # gap between request body bytes before 408
WRITE_TIMEOUT = 120.0                 # a client that stops reading our answer is dropped
SHUTDOWN_GRACE = 5.0                  # in-flight streams get this long when stopping
LINGER_SECONDS = 1.0                  # after an early 413, read and discard before closing
LINGER_BYTES = 8 * 1024 * 1024

CONNECT_TIMEOUT = 10.0                # TCP + proxy handshake + TLS to an upstream
DEFAULT_CHANNEL_TIMEOUT = 300.0       # first byte and idle gap between upstream bytes
POOL_MAX_IDLE = 32                    # idle upstream connections kept per pool key
POOL_IDLE_TTL = 50.0                  # servers commonly drop idle connections after 60 s
MAX_BUFFERED_RESPONSE = 1024 * 1024   # upstream bodies up to this are read whole, else streamed
MAX_ERROR_BODY = 256 * 1024           # how much of an upstream error body we read

EVENTS_KEPT = 1000                    # request records kept in memory for the GUI
REQUEST_LOG_MAX_BYTES = 10 * 1024 * 1024
REQUEST_LOG_BACKUPS = 3
SSE_CARRY_LIMIT = 1024 * 1024         # an SSE event larger than this is flushed unsplit

READ_SIZE = 64 * 1024

OPENAI = "openai"                     # client dialects / route families
ANTHROPIC = "anthropic"
CHANNEL_TYPES = ("openai", "anthropic", "gemini", "ollama", "custom")
CHANNEL_DEFAULT_URLS = {
    "openai": "https://api.openai.com",
    "anthropic": "https://api.anthropic.com",
    "gemini": "https://generativelanguage.googleapis.com",
    "ollama": "http://localhost:11434",
    "custom": "",
}
ANTHROPIC_VERSION = "2023-06-01"
TOKEN_PREFIX = "sk-gw-"

# =================================================================================================
# 2. Errors
# =================================================================================================

# The kinds a client can be told about; section 9 renders each in the client's dialect.
_KIND_BY_STATUS = {
    400: "invalid_request", 401: "authentication", 402: "billing", 403: "permission",
    404: "not_found", 405: "method_not_allowed", 408: "timeout", 409: "conflict",
    413: "request_too_large", 414: "invalid_request", 422: "invalid_request",
    429: "rate_limit", 431: "invalid_request", 500: "api_error", 501: "not_implemented",
    502: "bad_gateway", 503: "overloaded", 504: "timeout", 529: "overloaded",
}


class GatewayError(Exception):
    """An error with the HTTP status to answer and an error kind (see _KIND_BY_STATUS)."""

    def __init__(self, status: int, message: str, *, kind: str | None = None,
                 code: str | None = None, param: str | None = None,
                 headers: list[tuple[str, str]] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind or _KIND_BY_STATUS.get(status, "api_error" if status >= 500
                                                 else "invalid_request")
        self.code = code
        self.param = param
        self.headers = headers or []


class ProtocolError(GatewayError):
    """A peer broke HTTP/1.1 framing; the connection cannot be reused."""


class UpstreamError(GatewayError):
    """Talking to an upstream failed. ``retryable`` says whether fallback may try another channel;
    ``upstream_status`` is the upstream's own status (None for connect errors and timeouts)."""

    def __init__(self, status: int, message: str, *, retryable: bool,
                 upstream_status: int | None = None, **kw: Any):
        super().__init__(status, message, **kw)
        self.retryable = retryable
        self.upstream_status = upstream_status


class ConfigError(Exception):
    """The configuration file is invalid; the message names the file, the field and the fix."""


# =================================================================================================
# 3. Small helpers
# =================================================================================================

class Headers:
    """Ordered, case-insensitive HTTP headers. Repeated names are kept as separate entries."""

    __slots__ = ("_items", "_index")

    def __init__(self, items: Iterable[tuple[str, str]] = ()):
        self._items: list[tuple[str, str]] = list(items)
        self._index: dict[str, str] | None = None

    def _map(self) -> dict[str, str]:
        if self._index is None:
            index: dict[str, str] = {}
            for name, value in self._items:
                key = name.lower()
                index[key] = f"{index[key]}, {value}" if key in index else value
            self._index = index
        return self._index

    def get(self, name: str, default: str | None = None) -> str | None:
        return self._map().get(name.lower(), default)

    def get_all(self, name: str) -> list[str]:
        key = name.lower()
        return [v for n, v in self._items if n.lower() == key]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._map()

    def add(self, name: str, value: str) -> None:
        self._items.append((name, value))
        self._index = None

    def set(self, name: str, value: str) -> None:
        self.remove(name)
        self.add(name, value)

    def remove(self, name: str) -> None:
        key = name.lower()
        self._items = [(n, v) for n, v in self._items if n.lower() != key]
        self._index = None

    def items(self) -> list[tuple[str, str]]:
        return list(self._items)

    def __iter__(self):
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Headers({self._items!r})"


def json_loads(data: bytes | str, what: str = "request body") -> Any:
    """Parse JSON or raise a 400 naming what was wrong."""
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise GatewayError(400, f"{what} is not valid JSON: {exc}") from None


def json_dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def new_id(prefix: str, nbytes: int = 12) -> str:
    return prefix + secrets.token_hex(nbytes)


def new_token_key() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def mask_secret(secret: str | None) -> str:
    """Show enough of a key to recognise it, never enough to use it."""
    if not secret:
        return ""
    if len(secret) <= 12:
        return "*" * len(secret)
    return f"{secret[:6]}…{secret[-4:]}"


def secret_equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


_PATTERN_CACHE: dict[str, re.Pattern[str]] = {}


def name_matches(pattern: str, name: str) -> bool:
    """Case-insensitive match of a model or channel name against ``pattern`` where ``*`` stands
    for any run of characters (no other wildcard: model names contain ``[`` and ``?`` rarely,
    but ``.`` and ``:`` often)."""
    if "*" not in pattern:
        return pattern.lower() == name.lower()
    rx = _PATTERN_CACHE.get(pattern)
    if rx is None:
        rx = re.compile(".*".join(re.escape(p) for p in pattern.split("*")), re.I | re.S)
        _PATTERN_CACHE[pattern] = rx
    return rx.fullmatch(name) is not None


def is_loopback_host(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def now_iso(ts: float | None = None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(ts if ts is not None else time.time()))


# =================================================================================================
# 4. HTTP/1.1 wire format (no I/O)
# =================================================================================================
# Strict on framing (RFC 9112 section 6.3: Content-Length with Transfer-Encoding is rejected, as is
# a bad chunk size or a bad Content-Length), lenient on cosmetics (header name case, bare LF).

_TOKEN_RX = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_REASONS = {s.value: s.phrase for s in http.HTTPStatus}
_REASONS[529] = "Overloaded"
_HOP_BY_HOP = frozenset((
    "connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization",
    "te", "trailer", "transfer-encoding", "upgrade",
))


@dataclass(slots=True)
class RequestHead:
    method: str
    target: str
    version: str
    headers: Headers
    path: str
    query: str


def _parse_header_lines(lines: list[bytes]) -> Headers:
    if len(lines) > MAX_HEADER_COUNT:
        raise ProtocolError(431, f"more than {MAX_HEADER_COUNT} header lines")
    items = []
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            raise ProtocolError(400, "obsolete header line folding is not accepted")
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN_RX.match(name):
            raise ProtocolError(400, f"malformed header line {line[:60]!r}")
        items.append((name.decode("ascii"), value.strip(b" \t").decode("latin-1")))
    return Headers(items)


def _split_head(data: bytes) -> list[bytes]:
    lines = data.split(b"\n")
    while lines and not lines[-1].strip(b"\r"):
        lines.pop()
    return [ln[:-1] if ln.endswith(b"\r") else ln for ln in lines]


def parse_request_head(data: bytes) -> RequestHead:
    """Parse a request head (request line + headers, blank line included or not)."""
    lines = _split_head(data)
    if not lines:
        raise ProtocolError(400, "empty request")
    line = lines[0]
    if len(line) > MAX_REQUEST_LINE:
        raise ProtocolError(414, "request line too long")
    parts = line.split(b" ")
    if len(parts) != 3 or not _TOKEN_RX.match(parts[0]) or not parts[1]:
        raise ProtocolError(400, f"malformed request line {line[:80]!r}")
    method, target, version = parts[0].decode("ascii"), parts[1], parts[2]
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise ProtocolError(505 if version.startswith(b"HTTP/") else 400,
                            "only HTTP/1.0 and HTTP/1.1 are served")
    try:
        target_s = target.decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError(400, "request target is not ASCII") from None
    if target_s.startswith(("http://", "https://")):
        split = urllib.parse.urlsplit(target_s)
        path, query = split.path or "/", split.query
    elif target_s.startswith("/") or target_s == "*":
        path, _, query = target_s.partition("?")
    else:
        raise ProtocolError(400, f"malformed request target {target_s[:80]!r}")
    headers = _parse_header_lines(lines[1:])
    return RequestHead(method, target_s, version.decode("ascii"), headers, path, query)


def parse_response_head(data: bytes) -> tuple[str, int, str, Headers]:
    lines = _split_head(data)
    if not lines:
        raise ProtocolError(502, "empty response head")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit() \
            or len(parts[1]) != 3:
        raise ProtocolError(502, f"malformed status line {lines[0][:80]!r}")
    reason = parts[2].decode("latin-1") if len(parts) > 2 else ""
    try:
        headers = _parse_header_lines(lines[1:])
    except ProtocolError as exc:
        raise ProtocolError(502, f"upstream sent {exc.message}") from None
    return parts[0].decode("ascii"), int(parts[1]), reason, headers


def _content_length(headers: Headers, status: int) -> int | None:
    values = headers.get_all("content-length")
    if not values:
        return None
    found = {v.strip() for value in values for v in value.split(",")}
    if len(found) != 1:
        raise ProtocolError(status, "conflicting Content-Length headers")
    value = found.pop()
    if not value.isdigit():
        raise ProtocolError(status, f"invalid Content-Length {value[:40]!r}")
    return int(value)


def body_framing(headers: Headers, *, error_status: int = 400) -> tuple[str, int]:
    """Request body framing: ("length", n) or ("chunked", 0). RFC 9112 section 6.3."""
    te = headers.get("transfer-encoding")
    if te is not None:
        if "content-length" in headers:
            raise ProtocolError(error_status, "Content-Length with Transfer-Encoding is not allowed")
        codings = [c.strip().lower() for c in te.split(",") if c.strip()]
        if codings != ["chunked"]:
            raise ProtocolError(501 if error_status == 400 else error_status,
                                f"unsupported Transfer-Encoding {te[:40]!r}")
        return "chunked", 0
    return "length", _content_length(headers, error_status) or 0


def response_framing(method: str, status: int, headers: Headers) -> tuple[str, int]:
    """Response body framing: ("none"|"length"|"chunked"|"close", n)."""
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        return "none", 0
    if "transfer-encoding" in headers:
        te = headers.get("transfer-encoding", "").lower()
        if te.rsplit(",", 1)[-1].strip() == "chunked":
            return "chunked", 0
        return "close", 0
    n = _content_length(headers, 502)
    return ("length", n) if n is not None else ("close", 0)


def keep_alive(version: str, headers: Headers) -> bool:
    conn = (headers.get("connection") or "").lower()
    if version == "HTTP/1.0":
        return "keep-alive" in conn
    return "close" not in conn


def format_head(first_line: str, headers: Iterable[tuple[str, str]]) -> bytes:
    out = [first_line]
    for name, value in headers:
        if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
            raise ValueError(f"header {name!r} contains a line break")
        out.append(f"{name}: {value}")
    out.append("\r\n")
    return "\r\n".join(out).encode("latin-1")


def status_line(status: int, version: str = "HTTP/1.1") -> str:
    return f"{version} {status} {_REASONS.get(status, 'Unknown')}"


def format_chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


def parse_multipart(body: bytes, content_type: str) -> list[tuple[dict[str, str], int, int]]:
    """Split a multipart/form-data body. Returns (part headers, value start, value end) triples
    with offsets into ``body`` so a caller can replace one value and keep the rest byte-exact."""
    m = re.search(r'boundary="?([^";]+)"?', content_type, re.I)
    if not m:
        raise GatewayError(400, "multipart/form-data body without a boundary")
    delim = b"--" + m.group(1).encode("latin-1")
    parts = []
    pos = body.find(delim)
    while pos != -1:
        start = pos + len(delim)
        if body[start:start + 2] == b"--":
            break
        head_end = body.find(b"\r\n\r\n", start)
        nxt = body.find(b"\r\n" + delim, start)
        if head_end == -1 or nxt == -1 or head_end > nxt:
            raise GatewayError(400, "malformed multipart/form-data body")
        hdrs = {}
        for line in body[start:head_end].split(b"\r\n"):
            name, sep, value = line.partition(b":")
            if sep:
                hdrs[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
        parts.append((hdrs, head_end + 4, nxt))
        pos = nxt + 2
    return parts


def multipart_field_name(part_headers: dict[str, str]) -> str | None:
    m = re.search(r'(?:^|;)\s*name="([^"]*)"', part_headers.get("content-disposition", ""))
    return m.group(1) if m else None


# =================================================================================================
# 5. Incremental decoders (no I/O)
# =================================================================================================
# Every decoder here takes bytes as they come, split anywhere, and gives the same result fed whole
# or one byte at a time.

_CHUNK_SIZE_RX = re.compile(rb"[0-9A-Fa-f]{1,16}")


class ChunkedDecoder:
    """``Transfer-Encoding: chunked`` (RFC 9112 section 7.1). ``feed`` returns the data pieces;
    ``done`` turns true after the last-chunk and trailers; bytes fed past that end are kept in
    ``tail``. ``data_left`` tells an I/O caller how
    many data bytes it may read without passing the end of the current chunk; outside chunk data
    the caller reads one line at a time, so no byte past the message end is ever consumed."""

    __slots__ = ("_state", "data_left", "_line", "done", "_error_status", "tail")

    def __init__(self, error_status: int = 400):
        self._state = "size"        # size -> data -> crlf -> size ... -> trailer -> done
        self.data_left = 0
        self._line = bytearray()
        self.done = False
        self._error_status = error_status
        self.tail = b""             # bytes fed after the end of the body (not part of it)

    @property
    def in_data(self) -> bool:
        return self._state == "data"

    def _fail(self, why: str) -> ProtocolError:
        return ProtocolError(self._error_status, f"bad chunked encoding: {why}")

    def feed(self, data: bytes) -> list[bytes]:
        out: list[bytes] = []
        pos, n = 0, len(data)
        while pos < n and not self.done:
            state = self._state
            if state == "data":
                take = min(self.data_left, n - pos)
                out.append(data[pos:pos + take])
                pos += take
                self.data_left -= take
                if self.data_left == 0:
                    self._state = "crlf"
                continue
            if state == "crlf" and not self._line and data.startswith(b"\r\n", pos):
                pos += 2                                # the usual end of a chunk's data
                self._state = "size"
                continue
            nl = data.find(b"\n", pos)
            if nl == -1 or self._line:                  # a line split across reads
                self._line += data[pos:n if nl == -1 else nl]
                if len(self._line) > MAX_CHUNK_LINE:
                    raise self._fail("line too long")
                if nl == -1:
                    break
                line = bytes(self._line)
                self._line.clear()
            else:
                if nl - pos > MAX_CHUNK_LINE:
                    raise self._fail("line too long")
                line = data[pos:nl]
            pos = nl + 1
            self._on_line(line[:-1] if line.endswith(b"\r") else line)
        if self.done and pos < n:
            self.tail = data[pos:]
        return out

    def _on_line(self, line: bytes) -> None:
        if self._state == "crlf":
            if line:
                raise self._fail("chunk data longer than its size")
            self._state = "size"
        elif self._state == "size":
            size = line.split(b";", 1)[0].strip(b" \t")
            if not _CHUNK_SIZE_RX.fullmatch(size):
                raise self._fail(f"invalid chunk size {line[:40]!r}")
            self.data_left = int(size, 16)
            self._state = "data" if self.data_left else "trailer"
        elif self._state == "trailer":
            if not line:
                self.done = True
                self._state = "done"


_SSE_EOL = re.compile("\r\n|\r|\n")


class SSEDecoder:
    """Server-sent events, WHATWG HTML section 9.2.6: lines end in CRLF, LF or CR; ``data`` lines
    join with LF; a leading BOM is dropped; comment lines start with a colon; an event is
    dispatched at a blank line when it has data. UTF-8 is decoded incrementally, so a character
    split across reads is not mangled. ``feed`` returns (event, data, id) tuples; ``event`` is
    None when the stream named none."""

    __slots__ = ("_dec", "_buf", "_event", "_data", "_id", "_started", "_cr")

    def __init__(self):
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buf = ""
        self._event: str | None = None
        self._data: list[str] = []
        self._id: str | None = None
        self._started = False
        self._cr = False

    def feed(self, data: bytes, final: bool = False) -> list[tuple[str | None, str, str | None]]:
        text = self._dec.decode(data, final)
        if not self._started and text:
            self._started = True
            if text.startswith("\ufeff"):
                text = text[1:]
        if self._cr and text.startswith("\n"):
            text = text[1:]
        self._cr = False
        buf = self._buf + text
        out: list[tuple[str | None, str, str | None]] = []
        pos = 0
        for m in _SSE_EOL.finditer(buf):
            self._line(buf[pos:m.start()], out)
            pos = m.end()
        self._buf = buf[pos:]
        if buf.endswith("\r"):
            self._cr = True         # a CR ending this read may be the first half of a CRLF
        if final and self._buf:
            self._line(self._buf, out)
            self._buf = ""
        return out

    def _line(self, line: str, out: list) -> None:
        if not line:
            if self._data:
                out.append((self._event, "\n".join(self._data), self._id))
            self._event, self._data = None, []
            return
        if line.startswith(":"):
            return
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._id = value


class NDJSONDecoder:
    """Newline-delimited JSON (Ollama streams). ``feed`` returns parsed objects; a line that is
    not JSON raises a 502 ProtocolError. Blank lines are skipped; CRLF is accepted."""

    __slots__ = ("_buf",)

    def __init__(self):
        self._buf = b""

    def feed(self, data: bytes, final: bool = False) -> list[Any]:
        buf = self._buf + data
        lines = buf.split(b"\n")
        self._buf = b"" if final else lines.pop()
        out = []
        for line in lines:
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    raise ProtocolError(502, f"upstream sent a line that is not JSON: "
                                             f"{line[:60]!r}") from None
        return out


def _usage_numbers(usage: Any) -> tuple[int, int] | None:
    """(input tokens, output tokens) from an OpenAI or Anthropic ``usage`` object."""
    if not isinstance(usage, dict):
        return None
    if "prompt_tokens" in usage or "completion_tokens" in usage:
        return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
    if "input_tokens" in usage or "output_tokens" in usage:
        inp = sum(int(usage.get(k) or 0) for k in (
            "input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"))
        return inp, int(usage.get("output_tokens") or 0)
    return None


def usage_from_json(obj: Any) -> tuple[int, int] | None:
    """Usage from a whole JSON answer or one stream event (OpenAI or Anthropic shape)."""
    if not isinstance(obj, dict):
        return None
    found = _usage_numbers(obj.get("usage"))
    if found is None and isinstance(obj.get("message"), dict):     # Anthropic message_start
        found = _usage_numbers(obj["message"].get("usage"))
    return found


def _end_of(buf: bytes, sep: bytes) -> int:
    """Offset just past the last ``sep`` in ``buf``, or 0."""
    i = buf.rfind(sep)
    return i + len(sep) if i >= 0 else 0


class SSEPassthrough:
    """Passes an SSE byte stream on whole events at a time, so that a stream cut by an upstream
    failure never leaves a half event before the in-band error event, and notes the token usage
    the events report. Costs one concatenation and two searches per read; JSON is parsed only in
    events that mention usage."""

    __slots__ = ("_carry", "input_tokens", "output_tokens")

    def __init__(self):
        self._carry = b""
        self.input_tokens: int | None = None
        self.output_tokens: int | None = None

    def feed(self, data: bytes) -> bytes:
        buf = self._carry + data if self._carry else data
        cut = max(_end_of(buf, b"\n\n"), _end_of(buf, b"\r\n\r\n"), _end_of(buf, b"\r\r"))
        if cut == 0:
            if len(buf) > SSE_CARRY_LIMIT:
                cut = len(buf)
            else:
                self._carry = buf
                return b""
        ready, self._carry = buf[:cut], buf[cut:]
        if b'"usage"' in ready:
            self._sniff(ready)
        return ready

    def flush(self) -> bytes:
        rest, self._carry = self._carry, b""
        return rest

    def _sniff(self, ready: bytes) -> None:
        for line in ready.splitlines():
            if line.startswith(b"data:") and b'"usage"' in line:
                try:
                    found = usage_from_json(json.loads(line[5:]))
                except ValueError:
                    continue
                if found:
                    # Anthropic reports input in message_start and output in message_delta.
                    if found[0] or self.input_tokens is None:
                        self.input_tokens = found[0]
                    if found[1] or self.output_tokens is None:
                        self.output_tokens = found[1]


# =================================================================================================
# 6. Stream helpers
# =================================================================================================
# The only code that touches StreamReader/StreamWriter directly. Heads are read with readuntil,
# whose LimitOverrunError tells an oversized head apart from a closed connection.

if sys.version_info >= (3, 11):
    async def timed(aw: Any, seconds: float) -> Any:
        """Await ``aw`` for at most ``seconds``; raise TimeoutError after."""
        async with asyncio.timeout(seconds):
            return await aw
else:                                                                  # pragma: no cover
    async def timed(aw: Any, seconds: float) -> Any:
        try:
            return await asyncio.wait_for(aw, seconds)
        except asyncio.TimeoutError:
            raise TimeoutError from None


class Watchdog:
    """Read timeouts for one connection with one timer instead of one per read. ``arm(t)``
    only records a deadline (cheap enough to call before every read); when the timer fires past
    the deadline it puts TimeoutError into the reader, which wakes the pending read with it. The
    reader is unusable afterwards, so the connection is closed. ``disarm`` stops the clock."""

    __slots__ = ("_loop", "_reader", "_deadline", "_handle")

    def __init__(self, reader: asyncio.StreamReader):
        self._loop = asyncio.get_running_loop()
        self._reader = reader
        self._deadline: float | None = None
        self._handle: asyncio.TimerHandle | None = None

    def arm(self, seconds: float) -> None:
        deadline = self._loop.time() + seconds
        self._deadline = deadline
        handle = self._handle
        if handle is None:
            self._handle = self._loop.call_at(deadline, self._fire)
        elif handle.when() > deadline:
            handle.cancel()
            self._handle = self._loop.call_at(deadline, self._fire)

    def disarm(self) -> None:
        self._deadline = None

    def close(self) -> None:
        self._deadline = None
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _fire(self) -> None:
        self._handle = None
        deadline = self._deadline
        if deadline is None:
            return
        if self._loop.time() >= deadline:
            self._deadline = None
            self._reader.set_exception(TimeoutError())
        else:
            self._handle = self._loop.call_at(deadline, self._fire)


async def read_head(reader: asyncio.StreamReader, watchdog: Watchdog, first_timeout: float,
                    rest_timeout: float, too_large_status: int = 431) -> bytes | None:
    """Read one message head. Returns None when the peer closed cleanly before sending anything;
    raises TimeoutError when nothing came within ``first_timeout`` (keep-alive idle) and a 408
    ProtocolError when the rest of the head took longer than ``rest_timeout``."""
    watchdog.arm(first_timeout)
    first = await reader.read(1)
    if not first:
        watchdog.disarm()
        return None
    watchdog.arm(rest_timeout)
    try:
        rest = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError:
        raise ProtocolError(too_large_status, f"message head larger than {MAX_HEAD_BYTES} bytes")
    except asyncio.IncompleteReadError as exc:
        raise ProtocolError(400, "connection closed in the middle of a message head") from exc
    except TimeoutError:
        raise ProtocolError(408, "timed out waiting for the rest of the message head") from None
    watchdog.disarm()
    return first + rest


async def iter_body(reader: asyncio.StreamReader, watchdog: Watchdog, mode: str, length: int,
                    idle_timeout: float, *, error_status: int = 400, exact: bool = True,
                    overrun: list[bytes] | None = None, limit: int | None = None,
                    limit_error: Callable[[], GatewayError] | None = None
                    ) -> AsyncIterator[bytes]:
    """Yield a message body framed as ``mode`` ("length", "chunked", "close", "none"); each read
    may wait ``idle_timeout``. Raises ``limit_error()`` once more than ``limit`` bytes came.

    With ``exact`` a chunked body is read line by line so that no byte of a pipelined next
    message is consumed (request bodies); without it, reads take whatever has arrived, which is
    cheaper for a stream of small chunks (response bodies: a server sends nothing after its
    response until asked again); bytes read past the body end are put in ``overrun``, and the
    connection must not be reused. Raises ProtocolError(error_status) on bad framing."""
    seen = 0
    try:
        if mode == "length":
            left = length
            while left > 0:
                watchdog.arm(idle_timeout)
                data = await reader.read(min(left, READ_SIZE))
                if not data:
                    raise ProtocolError(error_status, f"connection closed with {left} body "
                                                      f"bytes still to come")
                left -= len(data)
                seen += len(data)
                if limit is not None and seen > limit and limit_error is not None:
                    raise limit_error()
                yield data
        elif mode == "chunked":
            dec = ChunkedDecoder(error_status)
            while not dec.done:
                watchdog.arm(idle_timeout)
                try:
                    if not exact:
                        data = await reader.read(READ_SIZE)
                    elif dec.in_data:
                        data = await reader.read(min(dec.data_left, READ_SIZE))
                    else:
                        data = await reader.readuntil(b"\n")
                except asyncio.IncompleteReadError:
                    data = b""
                except asyncio.LimitOverrunError:
                    raise ProtocolError(error_status, "bad chunked encoding: line too long") \
                        from None
                if not data:
                    raise ProtocolError(error_status, "connection closed inside a chunked body")
                pieces = dec.feed(data)
                if pieces:                  # what one read brought is passed on in one piece
                    piece = pieces[0] if len(pieces) == 1 else b"".join(pieces)
                    seen += len(piece)
                    if limit is not None and seen > limit and limit_error is not None:
                        raise limit_error()
                    yield piece
            if dec.tail and overrun is not None:
                overrun.append(dec.tail)
        elif mode == "close":
            while True:
                watchdog.arm(idle_timeout)
                data = await reader.read(READ_SIZE)
                if not data:
                    return
                seen += len(data)
                if limit is not None and seen > limit and limit_error is not None:
                    raise limit_error()
                yield data
    finally:
        watchdog.disarm()


async def read_body(reader: asyncio.StreamReader, watchdog: Watchdog, mode: str, length: int,
                    idle_timeout: float, **kw: Any) -> bytes:
    parts = [p async for p in iter_body(reader, watchdog, mode, length, idle_timeout, **kw)]
    return parts[0] if len(parts) == 1 else b"".join(parts)


async def write_and_drain(writer: asyncio.StreamWriter, data: bytes,
                          timeout: float = WRITE_TIMEOUT) -> None:
    """Write; wait for the peer to read only when our send buffer is getting full (a peer that
    reads nothing for ``timeout`` raises TimeoutError). A closed peer raises at once."""
    transport = writer.transport
    if transport.is_closing():
        raise ConnectionResetError("peer closed the connection")
    writer.write(data)
    if transport.get_write_buffer_size() > READ_SIZE:
        await timed(writer.drain(), timeout)


async def close_writer(writer: asyncio.StreamWriter, timeout: float = 1.0) -> None:
    try:
        writer.close()
        await timed(writer.wait_closed(), timeout)
    except (OSError, TimeoutError, asyncio.CancelledError, ssl.SSLError):
        pass


# =================================================================================================
# 7. Upstream HTTP client
# =================================================================================================
# A pool keyed by (scheme, host, port, proxy, verify_tls) recycles a connection only when its
# response was read to the end and neither side asked to close. TLS uses the system CA store.
# Proxies: http://[user:pass@]host:port (CONNECT tunnel for https targets, absolute-form for http
# ones), socks5:// (we resolve names) and socks5h:// (the proxy resolves names).

_TLS_CONTEXTS: dict[bool, ssl.SSLContext] = {}


def tls_context(verify: bool) -> ssl.SSLContext:
    ctx = _TLS_CONTEXTS.get(verify)
    if ctx is None:
        ctx = ssl.create_default_context()
        if not verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        ctx.set_alpn_protocols(["http/1.1"])
        _TLS_CONTEXTS[verify] = ctx
    return ctx


@dataclass(slots=True)
class _Target:
    scheme: str
    host: str
    port: int
    path: str                  # path + query, as sent in origin-form


def split_url(url: str) -> _Target:
    try:
        u = urllib.parse.urlsplit(url)
        port = u.port
    except ValueError as exc:
        raise UpstreamError(502, f"bad upstream URL: {exc}", retryable=True) from None
    if u.scheme not in ("http", "https") or not u.hostname:
        raise UpstreamError(502, f"bad upstream URL {url!r}: needs http:// or https:// and a host",
                            retryable=True)
    path = (u.path or "/") + (f"?{u.query}" if u.query else "")
    return _Target(u.scheme, u.hostname, port or (443 if u.scheme == "https" else 80), path)


def _host_header(t: _Target) -> str:
    host = f"[{t.host}]" if ":" in t.host else t.host
    default = 443 if t.scheme == "https" else 80
    return host if t.port == default else f"{host}:{t.port}"


class _Conn:
    __slots__ = ("reader", "writer", "key", "idle_since", "watchdog")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, key: tuple):
        self.reader, self.writer, self.key = reader, writer, key
        self.idle_since = 0.0
        self.watchdog = Watchdog(reader)

    def usable(self, now: float) -> bool:
        return (not self.writer.transport.is_closing() and not self.reader.at_eof()
                and now - self.idle_since < POOL_IDLE_TTL)

    def close(self) -> None:
        self.watchdog.close()
        try:
            self.writer.close()
        except (OSError, RuntimeError):
            pass


async def _sock_recv_exactly(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        data = await loop.sock_recv(sock, n - len(buf))
        if not data:
            raise ConnectionError("proxy closed the connection during the handshake")
        buf += data
    return buf


async def _open_socket(host: str, port: int) -> socket.socket:
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    last: Exception = OSError(f"cannot resolve {host}")
    for family, type_, proto, _, addr in infos:
        sock = socket.socket(family, type_, proto)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, addr)
            return sock
        except OSError as exc:
            sock.close()
            last = exc
    raise last


async def _http_connect_tunnel(proxy: urllib.parse.SplitResult, t: _Target) -> socket.socket:
    loop = asyncio.get_running_loop()
    sock = await _open_socket(proxy.hostname or "", proxy.port or 8080)
    try:
        authority = _host_header(_Target(t.scheme, t.host, t.port, ""))
        if ":" not in authority.rsplit("]", 1)[-1]:
            authority = f"{authority}:{t.port}"
        hdrs = [("Host", authority)] + _proxy_auth(proxy)
        await loop.sock_sendall(sock, format_head(f"CONNECT {authority} HTTP/1.1", hdrs))
        head = b""
        while b"\r\n\r\n" not in head:
            data = await loop.sock_recv(sock, 1)
            if not data:
                raise ConnectionError("proxy closed the connection during CONNECT")
            head += data
            if len(head) > MAX_HEAD_BYTES:
                raise ConnectionError("proxy answered CONNECT with an oversized head")
        _, status, reason, _ = parse_response_head(head)
        if not 200 <= status < 300:
            raise ConnectionError(f"proxy refused CONNECT: {status} {reason}")
        return sock
    except BaseException:
        sock.close()
        raise


async def _socks5_tunnel(proxy: urllib.parse.SplitResult, t: _Target) -> socket.socket:
    """RFC 1928 CONNECT with optional RFC 1929 username/password."""
    loop = asyncio.get_running_loop()
    sock = await _open_socket(proxy.hostname or "", proxy.port or 1080)
    try:
        user = urllib.parse.unquote(proxy.username or "")
        password = urllib.parse.unquote(proxy.password or "")
        methods = b"\x00\x02" if user else b"\x00"
        await loop.sock_sendall(sock, bytes([5, len(methods)]) + methods)
        ver, method = await _sock_recv_exactly(loop, sock, 2)
        if ver != 5 or method == 0xFF or (method == 2 and not user) or method not in (0, 2):
            raise ConnectionError("SOCKS5 proxy offered no acceptable authentication method")
        if method == 2:
            u, p = user.encode(), password.encode()
            await loop.sock_sendall(sock, bytes([1, len(u)]) + u + bytes([len(p)]) + p)
            if (await _sock_recv_exactly(loop, sock, 2))[1] != 0:
                raise ConnectionError("SOCKS5 proxy rejected the username or password")
        if proxy.scheme == "socks5h":
            name = t.host.encode("idna")
            addr = bytes([3, len(name)]) + name
        else:
            try:
                ip = ipaddress.ip_address(t.host)
            except ValueError:
                infos = await loop.getaddrinfo(t.host, t.port, type=socket.SOCK_STREAM)
                ip = ipaddress.ip_address(infos[0][4][0])
            addr = (b"\x01" if ip.version == 4 else b"\x04") + ip.packed
        await loop.sock_sendall(sock, b"\x05\x01\x00" + addr + struct.pack("!H", t.port))
        ver, rep, _, atyp = await _sock_recv_exactly(loop, sock, 4)
        if ver != 5 or rep != 0:
            raise ConnectionError(f"SOCKS5 proxy could not connect (reply code {rep})")
        skip = {1: 4, 4: 16}.get(atyp)
        if skip is None:
            skip = (await _sock_recv_exactly(loop, sock, 1))[0]
        await _sock_recv_exactly(loop, sock, skip + 2)
        return sock
    except BaseException:
        sock.close()
        raise


def _proxy_auth(proxy: urllib.parse.SplitResult) -> list[tuple[str, str]]:
    if not proxy.username:
        return []
    cred = f"{urllib.parse.unquote(proxy.username)}:{urllib.parse.unquote(proxy.password or '')}"
    return [("Proxy-Authorization", "Basic " + base64.b64encode(cred.encode()).decode())]


def parse_proxy(proxy: str) -> urllib.parse.SplitResult | None:
    if not proxy:
        return None
    p = urllib.parse.urlsplit(proxy)
    if p.scheme not in ("http", "socks5", "socks5h") or not p.hostname:
        raise UpstreamError(502, "bad proxy URL: use http://, socks5:// or socks5h:// with a host",
                            retryable=True)
    return p


class UpstreamResponse:
    """An upstream answer whose head has arrived. Read the body with ``iter_bytes`` or ``read``;
    gzip/deflate are decoded. ``aclose`` must be called (the helpers do) to free the connection:
    it goes back to the pool only when the body was read to the end."""

    def __init__(self, client: UpstreamClient, conn: _Conn, method: str, status: int,
                 reason: str, headers: Headers, keep: bool, idle_timeout: float):
        self._client = client
        self._conn: _Conn | None = conn
        self.status, self.reason, self.headers = status, reason, headers
        self._mode, self._length = response_framing(method, status, headers)
        self._keep = keep and self._mode in ("none", "length", "chunked")
        self._idle = idle_timeout
        self._done = self._mode == "none"
        enc = (headers.get("content-encoding") or "").strip().lower()
        self._decoder = None
        if enc in ("gzip", "x-gzip"):
            self._decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif enc == "deflate":
            self._decoder = zlib.decompressobj(zlib.MAX_WBITS)
        self._deflate_raw_tried = False

    @property
    def finished(self) -> bool:
        """True once the body was read to its end."""
        return self._done

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type") or ""

    def _decode(self, data: bytes) -> bytes:
        if self._decoder is None:
            return data
        try:
            return self._decoder.decompress(data)
        except zlib.error:
            if self._deflate_raw_tried or self._decoder.unused_data:
                raise ProtocolError(502, "upstream sent a corrupt compressed body") from None
            # "deflate" is sometimes sent raw, without the zlib wrapper (RFC 9110 section 8.4.1.2).
            self._deflate_raw_tried = True
            self._decoder = zlib.decompressobj(-zlib.MAX_WBITS)
            return self._decode(data)

    async def iter_bytes(self) -> AsyncIterator[bytes]:
        conn = self._conn
        if conn is None:
            return
        overrun: list[bytes] = []
        try:
            async for data in iter_body(conn.reader, conn.watchdog, self._mode, self._length,
                                        self._idle, error_status=502, exact=False,
                                        overrun=overrun):
                out = self._decode(data)
                if out:
                    yield out
            if self._decoder is not None:
                tail = self._decoder.flush()
                if tail:
                    yield tail
            self._done = True
            self._keep = self._keep and not overrun
        except TimeoutError:
            raise UpstreamError(504, f"upstream went silent for {self._idle:g} s mid-answer",
                                retryable=True) from None
        except ProtocolError as exc:
            raise UpstreamError(502, exc.message, retryable=True) from None
        except (OSError, asyncio.IncompleteReadError) as exc:
            raise UpstreamError(502, f"upstream connection failed mid-answer: "
                                     f"{_os_error_text(exc)}", retryable=True) from None
        finally:
            self.aclose_nowait()

    async def read(self, limit: int | None = None) -> bytes:
        parts, size = [], 0
        async for data in self.iter_bytes():
            parts.append(data)
            size += len(data)
            if limit is not None and size >= limit:
                break
        self.aclose_nowait()
        return b"".join(parts)

    def aclose_nowait(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._done and self._keep:
            self._client._release(conn)
        else:
            conn.close()


class UpstreamClient:
    """HTTP/1.1 client with a keep-alive pool, TLS, proxies and per-read timeouts."""

    def __init__(self):
        self._idle: dict[tuple, list[_Conn]] = {}
        self._closed = False

    async def request(self, method: str, url: str, headers: list[tuple[str, str]],
                      body: bytes = b"", *, proxy: str = "", verify_tls: bool = True,
                      timeout: float = DEFAULT_CHANNEL_TIMEOUT,
                      connect_timeout: float = CONNECT_TIMEOUT) -> UpstreamResponse:
        t = split_url(url)
        p = parse_proxy(proxy)
        key = (t.scheme, t.host, t.port, proxy, verify_tls)
        absolute = p is not None and p.scheme == "http" and t.scheme == "http"
        target = f"http://{_host_header(t)}{t.path}" if absolute else t.path
        hdrs = [("Host", _host_header(t))]
        hdrs += headers
        if absolute:
            hdrs += _proxy_auth(p)                                     # type: ignore[arg-type]
        if body or method in ("POST", "PUT", "PATCH"):
            hdrs.append(("Content-Length", str(len(body))))
        head = format_head(f"{method} {target} HTTP/1.1", hdrs)
        for attempt in (0, 1):
            conn = self._take(key)
            fresh = conn is None
            if conn is None:
                conn = await self._connect(t, p, key, verify_tls, connect_timeout)
            try:
                await write_and_drain(conn.writer, head + body if len(body) < READ_SIZE else head,
                                      timeout)
                if len(body) >= READ_SIZE:
                    await write_and_drain(conn.writer, body, timeout)
                raw = await read_head(conn.reader, conn.watchdog, timeout, timeout,
                                      too_large_status=502)
                if raw is None and not fresh and attempt == 0:
                    conn.close()              # a pooled connection the server had closed: retry
                    continue
                if raw is None:
                    raise UpstreamError(502, "upstream closed the connection without answering",
                                        retryable=True)
                version, status, reason, rh = parse_response_head(raw)
                while 100 <= status < 200:                       # 100 Continue, 103 Early Hints
                    raw = await read_head(conn.reader, conn.watchdog, timeout, timeout,
                                          too_large_status=502)
                    if raw is None:
                        raise UpstreamError(502, "upstream closed after an interim answer",
                                            retryable=True)
                    version, status, reason, rh = parse_response_head(raw)
            except TimeoutError:
                conn.close()
                raise UpstreamError(504, f"upstream sent no answer within {timeout:g} s",
                                    retryable=True) from None
            except ProtocolError as exc:
                conn.close()
                raise UpstreamError(502, f"upstream broke HTTP: {exc.message}",
                                    retryable=True) from None
            except (OSError, asyncio.IncompleteReadError) as exc:
                conn.close()
                if not fresh and attempt == 0:
                    continue
                raise UpstreamError(502, f"upstream connection failed: {_os_error_text(exc)}",
                                    retryable=True) from None
            except BaseException:
                conn.close()
                raise
            return UpstreamResponse(self, conn, method, status, reason, rh,
                                    keep_alive(version, rh), timeout)
        raise AssertionError("unreachable")

    async def _connect(self, t: _Target, p: urllib.parse.SplitResult | None, key: tuple,
                       verify_tls: bool, connect_timeout: float) -> _Conn:
        try:
            reader, writer = await timed(self._open(t, p, verify_tls), connect_timeout)
        except TimeoutError:
            raise UpstreamError(504, f"connecting to {t.host}:{t.port} timed out after "
                                     f"{connect_timeout:g} s", retryable=True) from None
        except ssl.SSLError as exc:
            raise UpstreamError(502, f"TLS with {t.host} failed: {exc.reason or exc}",
                                retryable=True) from None
        except (OSError, ConnectionError) as exc:
            raise UpstreamError(502, f"cannot connect to {t.host}:{t.port}: "
                                     f"{_os_error_text(exc)}", retryable=True) from None
        sock = writer.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        return _Conn(reader, writer, key)

    @staticmethod
    async def _open(t: _Target, p: urllib.parse.SplitResult | None,
                    verify_tls: bool) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        ctx = tls_context(verify_tls) if t.scheme == "https" else None
        hostname = t.host if ctx else None
        if p is None:
            return await asyncio.open_connection(t.host, t.port, ssl=ctx, server_hostname=hostname,
                                                 limit=MAX_HEAD_BYTES)
        if p.scheme == "http" and t.scheme == "http":
            return await asyncio.open_connection(p.hostname, p.port or 8080, limit=MAX_HEAD_BYTES)
        tunnel = _socks5_tunnel if p.scheme.startswith("socks5") else _http_connect_tunnel
        sock = await tunnel(p, t)
        return await asyncio.open_connection(sock=sock, ssl=ctx, server_hostname=hostname,
                                             limit=MAX_HEAD_BYTES)

    def _take(self, key: tuple) -> _Conn | None:
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if conn.usable(now):
                return conn
            conn.close()
        return None

    def _release(self, conn: _Conn) -> None:
        if self._closed:
            conn.close()
            return
        idle = self._idle.setdefault(conn.key, [])
        if len(idle) >= POOL_MAX_IDLE:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        idle.append(conn)

    def idle_count(self) -> int:
        return sum(len(v) for v in self._idle.values())

    def close(self) -> None:
        self._closed = True
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()


def _os_error_text(exc: BaseException) -> str:
    if isinstance(exc, socket.gaierror):
        return f"name lookup failed ({exc.strerror})"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


# =================================================================================================
# 8. HTTP server
# =================================================================================================
# Keep-alive loop over asyncio streams. Pipelined requests are answered in order because one
# connection task reads the next head only after it has answered the current request. It knows
# nothing about LLMs: the gateway gives it a handler and an error renderer.

@dataclass(slots=True)
class Request:
    method: str
    path: str
    query: str
    headers: Headers
    body: bytes
    version: str = "HTTP/1.1"
    client: str = ""
    _params: dict[str, str] | None = None

    @property
    def params(self) -> dict[str, str]:
        if self._params is None:
            self._params = dict(urllib.parse.parse_qsl(self.query, keep_blank_values=True))
        return self._params


class Response:
    """``body`` is bytes (sent with Content-Length) or an async iterator of bytes (sent chunked;
    if it raises, the connection is cut without the last chunk so the client sees the break)."""

    __slots__ = ("status", "headers", "body")

    def __init__(self, status: int, headers: list[tuple[str, str]] | None = None,
                 body: bytes | AsyncIterator[bytes] = b""):
        self.status, self.headers, self.body = status, headers or [], body


class StreamBody:
    """An async iterator of bytes with a cleanup that runs exactly once when the server is done
    with it, whether the iteration finished, broke off, or never started."""

    __slots__ = ("_it", "_on_close")

    def __init__(self, it: AsyncIterator[bytes], on_close: Callable[[], None]):
        self._it, self._on_close = it, on_close

    def __aiter__(self) -> StreamBody:
        return self

    async def __anext__(self) -> bytes:
        return await self._it.__anext__()

    async def aclose(self) -> None:
        on_close, self._on_close = self._on_close, None
        try:
            aclose = getattr(self._it, "aclose", None)
            if aclose is not None:
                await aclose()
        finally:
            if on_close is not None:
                on_close()


Handler = Callable[[Request], Any]
ErrorRenderer = Callable[["RequestHead | None", GatewayError], Response]


class _ConnState:
    __slots__ = ("busy",)

    def __init__(self):
        self.busy = False


_date_cache: list[Any] = [0, ""]


def http_date() -> str:
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[0] = now
        _date_cache[1] = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now))
    return _date_cache[1]


class HTTPServer:
    def __init__(self, handler: Handler, error_renderer: ErrorRenderer, *,
                 max_body: Callable[[], int], log: Callable[[str], None] = lambda m: None,
                 ssl_context: ssl.SSLContext | None = None):
        self._handler = handler
        self._render_error = error_renderer
        self._max_body = max_body
        self._log = log
        self._ssl = ssl_context
        self._server: asyncio.base_events.Server | None = None
        self._conns: dict[asyncio.Task, _ConnState] = {}
        self._stopping = False
        self.sockets: list[tuple[str, int]] = []

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._serve, host, port, limit=MAX_HEAD_BYTES,
                                                  ssl=self._ssl, reuse_address=True)
        self.sockets = [s.getsockname()[:2] for s in self._server.sockets]

    @property
    def port(self) -> int:
        return self.sockets[0][1] if self.sockets else 0

    def connection_count(self) -> int:
        return len(self._conns)

    async def stop(self, grace: float = SHUTDOWN_GRACE) -> None:
        """Stop accepting, close idle connections, give in-flight requests ``grace`` seconds."""
        self._stopping = True
        if self._server is not None:
            self._server.close()
        for task, state in list(self._conns.items()):
            if not state.busy:
                task.cancel()
        pending = set(self._conns)
        if pending:
            _, pending = await asyncio.wait(pending, timeout=grace)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=1.0)
        if self._server is not None:
            try:
                await timed(self._server.wait_closed(), 1.0)
            except TimeoutError:
                pass

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        state = _ConnState()
        self._conns[task] = state                                      # type: ignore[index]
        peer = writer.get_extra_info("peername")
        client = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else ""
        sock = writer.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        watchdog = Watchdog(reader)
        try:
            while not self._stopping:
                state.busy = False
                try:
                    raw = await read_head(reader, watchdog, KEEPALIVE_TIMEOUT, HEADER_TIMEOUT)
                except TimeoutError:
                    break
                except ProtocolError as exc:
                    await self._send(writer, None, self._render_error(None, exc), False)
                    break
                if raw is None:
                    break
                state.busy = True
                if not await self._one(reader, writer, watchdog, raw, client):
                    break
        except (ConnectionError, OSError, TimeoutError, asyncio.CancelledError):
            pass
        except Exception as exc:                                       # pragma: no cover
            self._log(f"connection error: {type(exc).__name__}: {exc}")
        finally:
            watchdog.close()
            self._conns.pop(task, None)                                # type: ignore[arg-type]
            await close_writer(writer)

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   watchdog: Watchdog, raw: bytes, client: str) -> bool:
        """Serve one request; return whether the connection may carry another."""
        head = None
        try:
            head = parse_request_head(raw)
            mode, length = body_framing(head.headers)
            limit = self._max_body()
            too_large = lambda: ProtocolError(                         # noqa: E731
                413, f"request body larger than the {limit // (1024 * 1024)} MiB limit "
                     f"(settings.max_body_mb)")
            if mode == "length" and length > limit:
                raise too_large()
            if (mode == "chunked" or length) and head.version == "HTTP/1.1" and \
                    (head.headers.get("expect") or "").lower() == "100-continue":
                await write_and_drain(writer, b"HTTP/1.1 100 Continue\r\n\r\n")
            try:
                body = await read_body(reader, watchdog, mode, length, BODY_IDLE_TIMEOUT,
                                       limit=limit, limit_error=too_large) \
                    if (length or mode != "length") else b""
            except TimeoutError:
                raise ProtocolError(408, "timed out waiting for the request body") from None
        except ProtocolError as exc:
            await self._send(writer, head, self._render_error(head, exc), False)
            if exc.status == 413:
                await self._linger(reader)
            return False
        ka = keep_alive(head.version, head.headers) and not self._stopping
        req = Request(head.method, head.path, head.query, head.headers, body, head.version,
                      client)
        try:
            resp = await self._handler(req)
        except GatewayError as exc:
            resp = self._render_error(head, exc)
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception as exc:
            self._log(f"internal error on {head.method} {head.path}: "
                      f"{type(exc).__name__}: {exc}")
            resp = self._render_error(head, GatewayError(500, "internal gateway error"))
        return await self._send(writer, head, resp, ka)

    async def _send(self, writer: asyncio.StreamWriter, head: RequestHead | None,
                    resp: Response, ka: bool) -> bool:
        version = head.version if head else "HTTP/1.1"
        is_head = head is not None and head.method == "HEAD"
        hdrs = [("Date", http_date()), ("Server", f"aigateway/{__version__}")]
        hdrs += resp.headers
        body = resp.body
        streaming = not isinstance(body, (bytes, bytearray))
        if streaming:
            if is_head:
                await body.aclose()                                    # type: ignore[union-attr]
                streaming, body = False, b""
            elif version == "HTTP/1.1":
                hdrs.append(("Transfer-Encoding", "chunked"))
            else:
                ka = False
        if not streaming and resp.status not in (204, 304):
            hdrs.append(("Content-Length", str(len(body))))            # type: ignore[arg-type]
        if not ka:
            hdrs.append(("Connection", "close"))
        elif version == "HTTP/1.0":
            hdrs.append(("Connection", "keep-alive"))
        out = format_head(status_line(resp.status, "HTTP/1.1"), hdrs)
        if not streaming:
            await write_and_drain(writer, out if is_head else out + body)  # type: ignore[operator]
            return ka
        chunked = version == "HTTP/1.1"
        try:
            await write_and_drain(writer, out)
            async for piece in body:                                   # type: ignore[union-attr]
                if piece:
                    await write_and_drain(writer, format_chunk(piece) if chunked else piece)
            if chunked:
                await write_and_drain(writer, b"0\r\n\r\n")
            return ka
        except (ConnectionError, OSError, TimeoutError):
            return False
        except Exception as exc:
            self._log(f"stream cut: {type(exc).__name__}: {exc}")
            writer.transport.abort()
            return False
        finally:
            aclose = getattr(body, "aclose", None)
            if aclose is not None:
                await aclose()

    @staticmethod
    async def _linger(reader: asyncio.StreamReader) -> None:
        """After answering 413 early, read and drop some of the unread body so the client can
        read our answer before the close resets the connection."""
        deadline = time.monotonic() + LINGER_SECONDS
        seen = 0
        try:
            while seen < LINGER_BYTES:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                data = await timed(reader.read(READ_SIZE), left)
                if not data:
                    break
                seen += len(data)
        except (TimeoutError, OSError):
            pass


# =================================================================================================
# 9. Converters (pure, dict in -> dict out)
# =================================================================================================
# 9.1 Dialects and errors. Each client dialect is served without conversion by the channel types
# listed here; the body then goes through unchanged but for the model name.

PASSTHROUGH_TYPES = {OPENAI: ("openai", "custom"), ANTHROPIC: ("anthropic",)}

_OPENAI_ERROR_TYPE = {
    "invalid_request": "invalid_request_error", "authentication": "authentication_error",
    "billing": "insufficient_quota", "permission": "permission_error",
    "not_found": "invalid_request_error", "method_not_allowed": "invalid_request_error",
    "request_too_large": "invalid_request_error", "rate_limit": "rate_limit_exceeded",
    "conflict": "invalid_request_error", "not_implemented": "invalid_request_error",
}
_ANTHROPIC_ERROR_TYPE = {
    "invalid_request": "invalid_request_error", "authentication": "authentication_error",
    "billing": "billing_error", "permission": "permission_error", "not_found": "not_found_error",
    "method_not_allowed": "invalid_request_error", "request_too_large": "request_too_large",
    "rate_limit": "rate_limit_error", "timeout": "timeout_error", "overloaded": "overloaded_error",
    "conflict": "invalid_request_error", "not_implemented": "invalid_request_error",
}


def error_payload(dialect: str, err: GatewayError) -> dict:
    """The error object a client of ``dialect`` expects (PROTOCOLS.md sections 1.5 and 3.8)."""
    if dialect == ANTHROPIC:
        return {"type": "error", "error": {
            "type": _ANTHROPIC_ERROR_TYPE.get(err.kind, "api_error"), "message": err.message}}
    return {"error": {"message": err.message,
                      "type": _OPENAI_ERROR_TYPE.get(err.kind, "server_error"),
                      "param": err.param, "code": err.code}}


def stream_error_event(dialect: str, err: GatewayError) -> bytes:
    """An in-band error for a stream whose 200 status is already sent."""
    data = json_dumps(error_payload(dialect, err))
    if dialect == ANTHROPIC:
        return b"event: error\ndata: " + data + b"\n\n"
    return b"data: " + data + b"\n\n"


def upstream_error_message(body: bytes, status: int) -> str:
    """The human message inside an upstream error body of any dialect (OpenAI, Anthropic,
    Gemini, Ollama or plain text), shortened; never the whole body."""
    text = ""
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        obj = None
    if isinstance(obj, list) and obj and isinstance(obj[0], dict):
        obj = obj[0]                                   # Gemini sometimes wraps errors in a list
    if isinstance(obj, dict):
        err = obj.get("error", obj)
        if isinstance(err, dict):
            text = str(err.get("message") or err.get("detail") or "")
        elif isinstance(err, str):
            text = err
        if not text and isinstance(obj.get("message"), str):
            text = obj["message"]
    if not text:
        text = body.decode("utf-8", "replace").strip()
        if text.lstrip().startswith("<"):
            text = re.sub(r"<[^>]+>", " ", text)
            text = " ".join(text.split())
    text = text[:500]
    return text or f"upstream answered {status} {_REASONS.get(status, '')}".strip()


def upstream_error_code(body: bytes) -> str | None:
    try:
        err = json.loads(body).get("error")
    except (ValueError, UnicodeDecodeError, AttributeError):
        return None
    code = err.get("code") if isinstance(err, dict) else None
    return code if isinstance(code, str) else None


def models_payload(dialect: str, names: list[str], created: int) -> dict:
    """``GET /v1/models`` in OpenAI shape (section 2.6) or Anthropic shape (section 3.9)."""
    if dialect == ANTHROPIC:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created))
        data = [{"type": "model", "id": n, "display_name": n, "created_at": stamp}
                for n in names]
        return {"data": data, "has_more": False,
                "first_id": names[0] if names else None, "last_id": names[-1] if names else None}
    return {"object": "list", "data": [model_payload(OPENAI, n, created) for n in names]}


def model_payload(dialect: str, name: str, created: int) -> dict:
    if dialect == ANTHROPIC:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created))
        return {"type": "model", "id": name, "display_name": name, "created_at": stamp}
    return {"id": name, "object": "model", "created": created, "owned_by": "aigateway"}


def replace_json_model(body: bytes, old: str, new: str) -> bytes:
    """Replace the top-level ``"model"`` value in a JSON body, byte-exact elsewhere. When the
    pair occurs more than once (a nested "model" key with the same value) the body is
    re-serialised instead, which keeps every value but not the original spacing."""
    rx = re.compile(rb'"model"\s*:\s*' + re.escape(json.dumps(old).encode()))
    matches = rx.findall(body)
    if len(matches) == 1:
        return rx.sub(lambda m: b'"model":' + json.dumps(new).encode(), body, count=1)
    obj = json.loads(body)
    obj["model"] = new
    return json_dumps(obj)


def replace_multipart_field(body: bytes, content_type: str, name: str, value: str) -> bytes:
    for hdrs, start, end in parse_multipart(body, content_type):
        if multipart_field_name(hdrs) == name:
            return body[:start] + value.encode() + body[end:]
    return body


# =================================================================================================
# 10. Configuration
# =================================================================================================
# config.json holds "settings", "channels", "tokens" and "next_ids" (ids are never reused after a
# delete). Validation fills defaults, keeps keys it does not know, and names the file, the field
# and the fix in every message. Saves are atomic (temp file, fsync, os.replace) and owner-only.

DEFAULT_SETTINGS: dict[str, Any] = {
    "host": DEFAULT_HOST,
    "port": DEFAULT_PORT,
    "require_auth": True,
    "enable_fallback": True,
    "proxy": "",
    "max_body_mb": DEFAULT_MAX_BODY_MB,
    "log_requests": False,
    "log_file": "requests.jsonl",
    "cors_origins": [],
}
CHANNEL_DEFAULTS: dict[str, Any] = {
    "name": "", "type": "openai", "base_url": "", "api_key": "", "models": [],
    "model_mapping": {}, "priority": 0, "enabled": True, "timeout": DEFAULT_CHANNEL_TIMEOUT,
    "proxy": "", "verify_tls": True, "headers": {},
}
TOKEN_DEFAULTS: dict[str, Any] = {
    "name": "", "key": "", "enabled": True, "allowed_models": [], "allowed_channels": [],
}


def default_config_path() -> str:
    env = os.environ.get("AIGATEWAY_CONFIG")
    if env:
        return os.path.abspath(env)
    if getattr(sys, "frozen", False):
        base = os.path.dirname(os.path.abspath(sys.executable))
    else:
        base = os.path.dirname(os.path.abspath(__file__))
    return os.path.join(base, "config.json")


class _Checker:
    def __init__(self, source: str):
        self.source = source

    def fail(self, where: str, problem: str, fix: str) -> ConfigError:
        return ConfigError(f"{self.source}: {where}: {problem}; {fix}")

    def typed(self, obj: dict, key: str, where: str, types: tuple, what: str) -> Any:
        value = obj[key]
        if isinstance(value, bool) and bool not in types:
            raise self.fail(f"{where}.{key}", f"{value!r} is not {what}", f"write {what}")
        if not isinstance(value, types):
            raise self.fail(f"{where}.{key}", f"{json.dumps(value)[:60]} is not {what}",
                            f"write {what}")
        return value

    def str_list(self, obj: dict, key: str, where: str, allow_int: bool = False) -> list:
        value = obj[key]
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        types = (str, int) if allow_int else (str,)
        if not isinstance(value, list) or not all(
                isinstance(v, types) and not isinstance(v, bool) for v in value):
            raise self.fail(f"{where}.{key}", "is not a list of names",
                            'write a list such as ["gpt-4o", "claude-*"]')
        obj[key] = value
        return value

    def str_map(self, obj: dict, key: str, where: str, example: str) -> dict:
        value = obj[key]
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise self.fail(f"{where}.{key}", "is not an object of strings",
                            f"write an object such as {example}")
        return value

    def url(self, value: str, where: str, *, allow_empty: bool, schemes: tuple[str, ...],
            example: str) -> None:
        if not value and allow_empty:
            return
        try:
            u = urllib.parse.urlsplit(value)
            u.port
        except ValueError:
            u = None
        if u is None or u.scheme not in schemes or not u.hostname:
            raise self.fail(where, f"{value!r} is not a usable URL",
                            f"write a URL such as {example}")


def validate_config(raw: Any, source: str) -> dict:
    """Return a normalised deep copy of ``raw`` or raise ConfigError."""
    ck = _Checker(source)
    if not isinstance(raw, dict):
        raise ck.fail("top level", "is not a JSON object",
                      'write {"settings": {...}, "channels": [...], "tokens": [...]}')
    cfg = copy.deepcopy(raw)
    settings = cfg.setdefault("settings", {})
    if not isinstance(settings, dict):
        raise ck.fail("settings", "is not an object", 'write "settings": {...}')
    for key, value in DEFAULT_SETTINGS.items():
        settings.setdefault(key, copy.deepcopy(value))
    ck.typed(settings, "host", "settings", (str,), "a host name or IP address")
    if not settings["host"].strip():
        raise ck.fail("settings.host", "is empty", f'write "{DEFAULT_HOST}" for this machine only')
    port = ck.typed(settings, "port", "settings", (int,), "a whole number")
    if not 0 <= port <= 65535:
        raise ck.fail("settings.port", f"{port} is out of range", "use a port from 1 to 65535")
    for key in ("require_auth", "enable_fallback", "log_requests"):
        ck.typed(settings, key, "settings", (bool,), "true or false")
    ck.typed(settings, "proxy", "settings", (str,), "a proxy URL or an empty string")
    ck.url(settings["proxy"], "settings.proxy", allow_empty=True,
           schemes=("http", "socks5", "socks5h"), example="http://127.0.0.1:8080")
    mb = ck.typed(settings, "max_body_mb", "settings", (int, float), "a number of MiB")
    if mb <= 0:
        raise ck.fail("settings.max_body_mb", f"{mb} is not positive", "use a size such as 64")
    ck.typed(settings, "log_file", "settings", (str,), "a file path")
    ck.str_list(settings, "cors_origins", "settings")

    next_ids = cfg.setdefault("next_ids", {})
    if not isinstance(next_ids, dict):
        raise ck.fail("next_ids", "is not an object", "delete it; it is rebuilt")
    for section, defaults in (("channels", CHANNEL_DEFAULTS), ("tokens", TOKEN_DEFAULTS)):
        items = cfg.setdefault(section, [])
        if not isinstance(items, list):
            raise ck.fail(section, "is not a list", f'write "{section}": [...]')
        kind = section[:-1]
        seen_ids: set[int] = set()
        for i, item in enumerate(items):
            where = f"{section}[{i}]"
            if not isinstance(item, dict):
                raise ck.fail(where, "is not an object", "write {...}")
            for key, value in defaults.items():
                item.setdefault(key, copy.deepcopy(value))
            if "id" in item:
                item_id = ck.typed(item, "id", where, (int,), "a whole number")
                if item_id in seen_ids or item_id <= 0:
                    raise ck.fail(f"{where}.id", f"{item_id} is used twice or not positive",
                                  "give each entry its own positive id, or delete the id")
                seen_ids.add(item_id)
        nxt = max([next_ids.get(kind, 1) if isinstance(next_ids.get(kind), int) else 1]
                  + [i + 1 for i in seen_ids])
        for item in items:
            if "id" not in item:
                item["id"] = nxt
                nxt += 1
        next_ids[kind] = nxt
        (_check_channel if section == "channels" else _check_token)(ck, items)
    return cfg


def _check_channel(ck: _Checker, channels: list[dict]) -> None:
    names: set[str] = set()
    for i, ch in enumerate(channels):
        where = f"channels[{i}]"
        ck.typed(ch, "name", where, (str,), "a name")
        if not ch["name"].strip():
            ch["name"] = f"channel-{ch['id']}"
        if ch["name"].lower() in names:
            raise ck.fail(f"{where}.name", f"{ch['name']!r} is used by another channel",
                          "give each channel its own name")
        names.add(ch["name"].lower())
        ctype = ck.typed(ch, "type", where, (str,), "a channel type")
        if ctype not in CHANNEL_TYPES:
            raise ck.fail(f"{where}.type", f"{ctype!r} is not a channel type",
                          f"use one of {', '.join(CHANNEL_TYPES)}")
        ck.typed(ch, "base_url", where, (str,), "a URL")
        if not ch["base_url"].strip():
            if not CHANNEL_DEFAULT_URLS[ctype]:
                raise ck.fail(f"{where}.base_url", "is empty",
                              "write the server's URL, such as http://localhost:8000/v1")
            ch["base_url"] = CHANNEL_DEFAULT_URLS[ctype]
        ck.url(ch["base_url"], f"{where}.base_url", allow_empty=False, schemes=("http", "https"),
               example="https://api.openai.com")
        ck.typed(ch, "api_key", where, (str,), "a string")
        ck.str_list(ch, "models", where)
        ck.str_map(ch, "model_mapping", where, '{"gpt-4o": "gpt-4o-2024-11-20"}')
        ck.typed(ch, "priority", where, (int,), "a whole number (lower is tried first)")
        ck.typed(ch, "enabled", where, (bool,), "true or false")
        t = ck.typed(ch, "timeout", where, (int, float), "a number of seconds")
        if t <= 0:
            raise ck.fail(f"{where}.timeout", f"{t} is not positive", "use seconds, such as 300")
        ck.typed(ch, "proxy", where, (str,), "a proxy URL or an empty string")
        ck.url(ch["proxy"], f"{where}.proxy", allow_empty=True,
               schemes=("http", "socks5", "socks5h"), example="socks5h://127.0.0.1:1080")
        ck.typed(ch, "verify_tls", where, (bool,), "true or false")
        hdrs = ck.str_map(ch, "headers", where, '{"HTTP-Referer": "https://example.com"}')
        for name, value in hdrs.items():
            if not _TOKEN_RX.match(name.encode("latin-1", "replace")) or "\r" in value \
                    or "\n" in value:
                raise ck.fail(f"{where}.headers", f"{name!r} is not a valid header",
                              "use header names without spaces and values without line breaks")


def _check_token(ck: _Checker, tokens: list[dict]) -> None:
    keys: set[str] = set()
    for i, tok in enumerate(tokens):
        where = f"tokens[{i}]"
        ck.typed(tok, "name", where, (str,), "a name")
        if not tok["name"].strip():
            tok["name"] = f"token-{tok['id']}"
        key = ck.typed(tok, "key", where, (str,), "a secret string")
        if len(key) < 8:
            raise ck.fail(f"{where}.key", "is shorter than 8 characters",
                          "use a long random secret (the GUI makes one: sk-gw-...)")
        if key in keys:
            raise ck.fail(f"{where}.key", "is the same as another token's key",
                          "give each token its own secret")
        keys.add(key)
        ck.typed(tok, "enabled", where, (bool,), "true or false")
        ck.str_list(tok, "allowed_models", where)
        ck.str_list(tok, "allowed_channels", where, allow_int=True)


def atomic_write(path: str, data: bytes) -> None:
    """Write ``data`` so that ``path`` holds either the old or the new content, never a mix,
    readable by the owner only."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0), 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:
        os.chmod(path, 0o600)
    except OSError:
        pass
    if hasattr(os, "O_DIRECTORY"):
        try:
            dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            pass


class ConfigStore:
    """The configuration file and its in-memory form. Edits go through the methods here, each of
    which validates and saves at once; ``snapshot()`` gives the server a private copy."""

    def __init__(self, path: str, data: dict):
        self.path = path
        self.data = data
        self._lock = threading.RLock()

    @classmethod
    def load(cls, path: str, *, create: bool = True) -> tuple[ConfigStore, str | None]:
        """Load ``path``; a missing file is created with defaults and one new token, whose key
        is returned so the caller can show it once. An invalid file raises ConfigError and is
        left untouched."""
        try:
            with open(path, "rb") as f:
                raw_bytes = f.read()
        except FileNotFoundError:
            if not create:
                raise ConfigError(f"{path}: the file does not exist") from None
            key = new_token_key()
            data = validate_config({"tokens": [{"name": "default", "key": key}]}, path)
            store = cls(path, data)
            store.save()
            return store, key
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read the file ({exc.strerror})") from None
        try:
            raw = json.loads(raw_bytes.decode("utf-8-sig"))
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: the file is not UTF-8 text; save it as UTF-8") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: line {exc.lineno} column {exc.colno}: {exc.msg}; fix the "
                              f"JSON syntax there (a missing comma or quote is usual)") from None
        return cls(path, validate_config(raw, path)), None

    def save(self) -> None:
        with self._lock:
            atomic_write(self.path, (json.dumps(self.data, indent=2, ensure_ascii=False)
                                     + "\n").encode())

    def snapshot(self) -> dict:
        with self._lock:
            return copy.deepcopy(self.data)

    def _apply(self, mutate: Callable[[dict], Any]) -> Any:
        with self._lock:
            candidate = copy.deepcopy(self.data)
            result = mutate(candidate)
            self.data = validate_config(candidate, self.path)
            self.save()
            return result

    def update_settings(self, **changes: Any) -> None:
        self._apply(lambda d: d["settings"].update(changes))

    def _add(self, kind: str, fields: dict) -> dict:
        def mutate(d: dict) -> dict:
            item = dict(fields)
            item["id"] = d["next_ids"][kind]
            d["next_ids"][kind] = item["id"] + 1
            d[kind + "s"].append(item)
            return item
        item = self._apply(mutate)
        return self.get(kind, item["id"])                              # type: ignore[return-value]

    def _update(self, kind: str, item_id: int, fields: dict) -> dict:
        def mutate(d: dict) -> None:
            for item in d[kind + "s"]:
                if item["id"] == item_id:
                    item.update({k: v for k, v in fields.items() if k != "id"})
                    return
            raise KeyError(f"no {kind} with id {item_id}")
        self._apply(mutate)
        return self.get(kind, item_id)                                 # type: ignore[return-value]

    def _delete(self, kind: str, item_id: int) -> None:
        def mutate(d: dict) -> None:
            d[kind + "s"] = [i for i in d[kind + "s"] if i["id"] != item_id]
        self._apply(mutate)

    def get(self, kind: str, item_id: int) -> dict | None:
        with self._lock:
            for item in self.data[kind + "s"]:
                if item["id"] == item_id:
                    return copy.deepcopy(item)
        return None

    def add_channel(self, **fields: Any) -> dict:
        return self._add("channel", fields)

    def update_channel(self, channel_id: int, **fields: Any) -> dict:
        return self._update("channel", channel_id, fields)

    def delete_channel(self, channel_id: int) -> None:
        self._delete("channel", channel_id)

    def add_token(self, **fields: Any) -> dict:
        fields.setdefault("key", new_token_key())
        return self._add("token", fields)

    def update_token(self, token_id: int, **fields: Any) -> dict:
        return self._update("token", token_id, fields)

    def delete_token(self, token_id: int) -> None:
        self._delete("token", token_id)


# =================================================================================================
# 11. Gateway
# =================================================================================================
# Auth, routing (model -> channels), fallback, proxying, request records. Runs on the server loop.

@dataclass(frozen=True, slots=True)
class Route:
    path: str
    methods: tuple[str, ...]
    dialect: str
    kind: str
    body: str = "json"          # "json", "multipart" or "none"


ROUTES: dict[str, Route] = {r.path: r for r in (
    Route("/v1/chat/completions", ("POST",), OPENAI, "chat"),
    Route("/v1/completions", ("POST",), OPENAI, "completions"),
    Route("/v1/embeddings", ("POST",), OPENAI, "embeddings"),
    Route("/v1/images/generations", ("POST",), OPENAI, "images"),
    Route("/v1/audio/speech", ("POST",), OPENAI, "speech"),
    Route("/v1/audio/transcriptions", ("POST",), OPENAI, "transcriptions", "multipart"),
    Route("/v1/models", ("GET",), OPENAI, "models", "none"),
    Route("/v1/messages", ("POST",), ANTHROPIC, "messages"),
    Route("/v1/messages/count_tokens", ("POST",), ANTHROPIC, "count_tokens"),
    Route("/health", ("GET",), OPENAI, "health", "none"),
)}
MODEL_ROUTE = Route("/v1/models/{model}", ("GET",), OPENAI, "model", "none")
IMAGES_DEFAULT_MODEL = "dall-e-2"         # what the OpenAI API assumes when `model` is left out

_VERSION_SEGMENT = re.compile(r"v\d+[a-z0-9]*\Z", re.I)
_DROP_REQUEST_HEADERS = _HOP_BY_HOP | {
    "host", "content-length", "authorization", "x-api-key", "x-goog-api-key", "api-key",
    "cookie", "accept-encoding", "expect", "origin", "referer",
}
_DROP_RESPONSE_HEADERS = _HOP_BY_HOP | {
    "content-length", "content-encoding", "set-cookie", "date", "server", "alt-svc",
    "strict-transport-security",
}


def find_route(path: str) -> tuple[Route | None, str]:
    """The route for ``path`` (with or without the /v1 prefix) and, for /v1/models/{id}, the id."""
    if len(path) > 1 and path.endswith("/"):
        path = path.rstrip("/")
    route = ROUTES.get(path)
    if route is None and not path.startswith("/v1/"):
        route = ROUTES.get("/v1" + path)
        if route is None:
            path = "/v1" + path
    if route is None and path.startswith("/v1/models/") and len(path) > 11:
        return MODEL_ROUTE, urllib.parse.unquote(path[11:])
    return route, ""


def guess_dialect(path: str, headers: Headers) -> str:
    if "anthropic-version" in headers or "/messages" in path:
        return ANTHROPIC
    return OPENAI


def join_base_url(base: str, suffix: str) -> str:
    """``suffix`` is a /v1/... path. When the base URL already carries a version segment
    (/v1, /v4, /v1beta...), the suffix's own /v1 is dropped."""
    base = base.rstrip("/")
    path = urllib.parse.urlsplit(base).path
    if any(_VERSION_SEGMENT.match(seg) for seg in path.split("/")):
        suffix = suffix[3:] if suffix.startswith("/v1/") else suffix
    return base + suffix


class Channel:
    """A configured upstream, prepared for routing."""

    __slots__ = ("id", "name", "type", "base_url", "api_key", "models", "mapping", "priority",
                 "enabled", "timeout", "proxy", "verify_tls", "headers", "_exact")

    def __init__(self, c: dict, default_proxy: str):
        self.id: int = c["id"]
        self.name: str = c["name"]
        self.type: str = c["type"]
        self.base_url: str = c["base_url"]
        self.api_key: str = c["api_key"]
        self.models: list[str] = c["models"]
        self.mapping = {k.lower(): v for k, v in c["model_mapping"].items()}
        self.priority: int = c["priority"]
        self.enabled: bool = c["enabled"]
        self.timeout = float(c["timeout"])
        self.proxy: str = c["proxy"] or default_proxy
        self.verify_tls: bool = c["verify_tls"]
        self.headers = list(c["headers"].items())
        self._exact = {m.lower() for m in self.models if "*" not in m}

    def serves(self, model: str) -> bool:
        low = model.lower()
        if not self.models or low in self._exact or low in self.mapping:
            return True
        return any(name_matches(m, model) for m in self.models if "*" in m)

    def upstream_model(self, model: str) -> str:
        return self.mapping.get(model.lower(), model)

    def listed_models(self) -> list[str]:
        return [m for m in self.models if "*" not in m] + [
            k for k in self.mapping if k not in self._exact]


class Token:
    __slots__ = ("id", "name", "key", "enabled", "allowed_models", "allowed_channels")

    def __init__(self, t: dict):
        self.id: int = t["id"]
        self.name: str = t["name"]
        self.key: bytes = t["key"].encode()
        self.enabled: bool = t["enabled"]
        self.allowed_models: list[str] = t["allowed_models"]
        self.allowed_channels = {c.lower() if isinstance(c, str) else c
                                 for c in t["allowed_channels"]}

    def may_use_model(self, model: str) -> bool:
        return not self.allowed_models or any(name_matches(p, model) for p in self.allowed_models)

    def may_use_channel(self, ch: Channel) -> bool:
        return not self.allowed_channels or ch.id in self.allowed_channels \
            or ch.name.lower() in self.allowed_channels


def request_token(req: Request) -> str | None:
    """The gateway token a client sent, from any of the places SDKs put it."""
    auth = req.headers.get("authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    for name in ("x-api-key", "x-goog-api-key"):
        value = req.headers.get(name)
        if value:
            return value.strip()
    if "key=" in req.query:
        return req.params.get("key") or None
    return None


class RequestLog:
    """Appends one JSON line per request; rotates at REQUEST_LOG_MAX_BYTES."""

    def __init__(self, path: str):
        self.path = path
        self._file: Any = None

    def write(self, record: dict) -> None:
        try:
            if self._file is None:
                self._file = open(self.path, "ab")
            self._file.write(json_dumps(record) + b"\n")
            self._file.flush()
            if self._file.tell() > REQUEST_LOG_MAX_BYTES:
                self._rotate()
        except OSError:
            self.close()

    def _rotate(self) -> None:
        self.close()
        for i in range(REQUEST_LOG_BACKUPS - 1, 0, -1):
            if os.path.exists(f"{self.path}.{i}"):
                os.replace(f"{self.path}.{i}", f"{self.path}.{i + 1}")
        os.replace(self.path, f"{self.path}.1")

    def close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None


class Gateway:
    """Serves requests from the HTTP server; owns routing state, the upstream client and the
    request records. ``on_event(kind, payload)`` receives ("request", record) and ("log", text)."""

    def __init__(self, config: dict, *, config_dir: str = ".",
                 on_event: Callable[[str, Any], None] | None = None,
                 client: UpstreamClient | None = None):
        self.client = client or UpstreamClient()
        self.on_event = on_event or (lambda kind, payload: None)
        self.config_dir = config_dir
        self.records: collections.deque[dict] = collections.deque(maxlen=EVENTS_KEPT)
        self.stats = {"requests": 0, "errors": 0, "input_tokens": 0, "output_tokens": 0}
        self.started = time.time()
        self._rr: dict[tuple[str, int], int] = {}
        self._seq = itertools.count(1)
        self._request_log: RequestLog | None = None
        self.apply_config(config)

    # -- configuration ---------------------------------------------------------------------------

    def apply_config(self, config: dict) -> None:
        """Take a new validated configuration; requests already running keep their channels."""
        s = config["settings"]
        self.settings = s
        self.channels = [Channel(c, s["proxy"]) for c in config["channels"]]
        self.tokens = [Token(t) for t in config["tokens"]]
        self.max_body = int(s["max_body_mb"] * 1024 * 1024)
        self.cors = {o.rstrip("/") for o in s["cors_origins"]}
        log_path = os.path.join(self.config_dir, s["log_file"]) if s["log_requests"] else None
        if self._request_log is not None and self._request_log.path != log_path:
            self._request_log.close()
            self._request_log = None
        if log_path and self._request_log is None:
            self._request_log = RequestLog(log_path)

    def close(self) -> None:
        self.client.close()
        if self._request_log is not None:
            self._request_log.close()

    def log(self, text: str) -> None:
        self.on_event("log", text)

    # -- errors ----------------------------------------------------------------------------------

    def render_error(self, head: RequestHead | None, err: GatewayError,
                     dialect: str | None = None) -> Response:
        if dialect is None:
            dialect = guess_dialect(head.path, head.headers) if head else OPENAI
        hdrs = [("Content-Type", "application/json")] + err.headers
        if head is not None:
            hdrs += self._cors_headers(head.headers)
        return Response(err.status, hdrs, json_dumps(error_payload(dialect, err)))

    def _cors_headers(self, headers: Headers) -> list[tuple[str, str]]:
        origin = headers.get("origin")
        if not origin or not self.cors or ("*" not in self.cors and origin not in self.cors):
            return []
        return [("Access-Control-Allow-Origin", "*" if "*" in self.cors else origin),
                ("Vary", "Origin"),
                ("Access-Control-Expose-Headers", "request-id, x-request-id, retry-after")]

    # -- entry point -----------------------------------------------------------------------------

    async def handle(self, req: Request) -> Response:
        if req.method == "OPTIONS":
            return self._preflight(req)
        route, model_id = find_route(req.path)
        if route is None:
            raise GatewayError(404, f"no route {req.path}: see /v1/models, /v1/chat/completions "
                                    f"or /v1/messages", code="not_found")
        dialect = route.dialect
        method = "GET" if req.method == "HEAD" else req.method
        if method not in route.methods:
            raise GatewayError(405, f"{req.method} is not allowed on {route.path}; use "
                                    f"{' or '.join(route.methods)}",
                               headers=[("Allow", ", ".join(route.methods))])
        if route.kind == "health":
            body = {"status": "ok", "version": __version__,
                    "uptime_s": round(time.time() - self.started, 1)}
            return Response(200, [("Content-Type", "application/json")], json_dumps(body))
        if "anthropic-version" in req.headers and route.kind in ("models", "model"):
            dialect = ANTHROPIC
        rec = self._new_record(req, route.path)
        try:
            token = self._authenticate(req)
            rec["token"] = token.name if token else None
            if route.kind in ("models", "model"):
                resp = self._models(req, dialect, token, model_id)
                rec["status"], rec["bytes_out"] = resp.status, len(resp.body)  # type: ignore
                self._finish(rec)
                return resp
            return await self._proxy(req, route, dialect, token, rec)
        except GatewayError as err:
            rec["status"], rec["error"] = err.status, err.message
            self._finish(rec)
            resp = self.render_error(None, err, dialect)
            resp.headers += self._cors_headers(req.headers)
            return resp

    def _preflight(self, req: Request) -> Response:
        route, _ = find_route(req.path)
        allow = ", ".join((route.methods if route else ("GET", "POST")) + ("OPTIONS",))
        hdrs = [("Allow", allow)]
        cors = self._cors_headers(req.headers)
        if cors:
            hdrs += cors + [
                ("Access-Control-Allow-Methods", allow),
                ("Access-Control-Allow-Headers",
                 req.headers.get("access-control-request-headers") or
                 "authorization, content-type, x-api-key, anthropic-version, anthropic-beta"),
                ("Access-Control-Max-Age", "600")]
        return Response(204, hdrs)

    def _authenticate(self, req: Request) -> Token | None:
        presented = request_token(req)
        found = None
        if presented is not None:
            key = presented.encode()
            for tok in self.tokens:              # compare with every token: no early exit
                if hmac.compare_digest(tok.key, key):
                    found = tok
        if not self.settings["require_auth"]:
            return None
        if presented is None:
            raise GatewayError(401, "missing gateway token: send it as 'Authorization: Bearer "
                                    "<token>' or 'x-api-key: <token>'")
        if found is None:
            raise GatewayError(401, "invalid gateway token", code="invalid_api_key")
        if not found.enabled:
            raise GatewayError(401, f"gateway token '{found.name}' is disabled",
                               code="invalid_api_key")
        return found

    def _models(self, req: Request, dialect: str, token: Token | None, model_id: str) -> Response:
        names: list[str] = []
        seen: set[str] = set()
        for ch in sorted(self.channels, key=lambda c: c.priority):
            if not ch.enabled or (token is not None and not token.may_use_channel(ch)):
                continue
            for name in ch.listed_models():
                if name.lower() not in seen and (token is None or token.may_use_model(name)):
                    seen.add(name.lower())
                    names.append(name)
        created = int(self.started)
        if model_id:
            if model_id.lower() not in seen:
                routable = token is None or token.may_use_model(model_id)
                if not routable or not any(ch.enabled and ch.serves(model_id)
                                           for ch in self.channels):
                    raise GatewayError(404, f"model '{model_id}' is not served by any enabled "
                                            f"channel", code="model_not_found")
            payload = model_payload(dialect, model_id, created)
        else:
            payload = models_payload(dialect, names, created)
        return Response(200, [("Content-Type", "application/json")] +
                        self._cors_headers(req.headers), json_dumps(payload))

    # -- routing ---------------------------------------------------------------------------------

    def candidates(self, model: str, dialect: str, token: Token | None) -> list[Channel]:
        serving = [ch for ch in self.channels if ch.enabled and ch.serves(model)]
        if not serving:
            raise GatewayError(404, f"model '{model}' is not served by any enabled channel",
                               code="model_not_found", param="model")
        if token is not None:
            serving = [ch for ch in serving if token.may_use_channel(ch)]
            if not serving:
                raise GatewayError(403, f"gateway token '{token.name}' may not use the channels "
                                        f"that serve '{model}'")
        usable = [ch for ch in serving if ch.type in PASSTHROUGH_TYPES[dialect]]
        if not usable:
            kinds = ", ".join(sorted({f"{ch.type} channel '{ch.name}'" for ch in serving}))
            raise GatewayError(501, f"model '{model}' is served by {kinds}; this version passes "
                                    f"{'Anthropic' if dialect == ANTHROPIC else 'OpenAI'} "
                                    f"requests only to "
                                    f"{' or '.join(PASSTHROUGH_TYPES[dialect])} channels",
                               code="conversion_not_available")
        ordered: list[Channel] = []
        for prio, group in itertools.groupby(sorted(usable, key=lambda c: c.priority),
                                             key=lambda c: c.priority):
            members = list(group)
            if len(members) > 1:
                key = (model.lower(), prio)
                turn = self._rr.get(key, 0)
                self._rr[key] = turn + 1
                shift = turn % len(members)
                members = members[shift:] + members[:shift]
            ordered += members
        return ordered

    # -- proxying --------------------------------------------------------------------------------

    def _parse_model(self, req: Request, route: Route) -> tuple[str, dict | None, bool]:
        """(model, parsed JSON body or None, stream flag)."""
        if route.body == "multipart":
            ctype = req.headers.get("content-type") or ""
            if not ctype.lower().startswith("multipart/form-data"):
                raise GatewayError(400, f"{route.path} takes multipart/form-data with a 'file' "
                                        f"and a 'model' field")
            for hdrs, start, end in parse_multipart(req.body, ctype):
                if multipart_field_name(hdrs) == "model":
                    model = req.body[start:end].decode("utf-8", "replace").strip()
                    if model:
                        return model, None, False
            raise GatewayError(400, "the form has no 'model' field", param="model")
        if not req.body:
            raise GatewayError(400, "the request body is empty; send a JSON object")
        obj = json_loads(req.body)
        if not isinstance(obj, dict):
            raise GatewayError(400, "the request body must be a JSON object")
        model = obj.get("model")
        if model is None and route.kind == "images":
            model = IMAGES_DEFAULT_MODEL
        if not isinstance(model, str) or not model.strip():
            raise GatewayError(400, "'model' is required: name the model to use",
                               param="model", code="missing_required_parameter")
        return model, obj, obj.get("stream") is True

    def _upstream_request(self, ch: Channel, route: Route, req: Request, model: str,
                          obj: dict | None) -> tuple[str, list[tuple[str, str]], bytes]:
        body = req.body
        target = ch.upstream_model(model)
        if target != model:
            if obj is None:
                body = replace_multipart_field(body, req.headers.get("content-type") or "",
                                               "model", target)
            elif "model" in obj:
                body = replace_json_model(body, model, target)
        query = "&".join(p for p in req.query.split("&") if p and not p.startswith("key=")) \
            if req.query else ""
        url = join_base_url(ch.base_url, route.path) + (f"?{query}" if query else "")
        listed = {v.strip().lower() for v in (req.headers.get("connection") or "").split(",")}
        extra = {name.lower() for name, _ in ch.headers}
        hdrs = [(n, v) for n, v in req.headers if n.lower() not in _DROP_REQUEST_HEADERS
                and n.lower() not in listed and n.lower() not in extra
                and not (route.dialect == ANTHROPIC and n.lower() == "anthropic-version")]
        if route.dialect == ANTHROPIC:
            hdrs.append(("anthropic-version",
                         req.headers.get("anthropic-version") or ANTHROPIC_VERSION))
            if ch.api_key and "x-api-key" not in extra:
                hdrs.append(("x-api-key", ch.api_key))
        elif ch.api_key and "authorization" not in extra:
            hdrs.append(("Authorization", f"Bearer {ch.api_key}"))
        hdrs += ch.headers
        hdrs.append(("Accept-Encoding", "gzip, deflate"))
        return url, hdrs, body

    async def _proxy(self, req: Request, route: Route, dialect: str, token: Token | None,
                     rec: dict) -> Response:
        model, obj, stream = self._parse_model(req, route)
        rec["model"], rec["stream"] = model, stream
        if token is not None and not token.may_use_model(model):
            raise GatewayError(403, f"gateway token '{token.name}' may not use model '{model}'")
        chans = self.candidates(model, dialect, token)
        if not self.settings["enable_fallback"]:
            chans = chans[:1]
        failures: list[tuple[Channel, UpstreamError]] = []
        for ch in chans:
            rec["tried"].append(ch.name)
            url, hdrs, body = self._upstream_request(ch, route, req, model, obj)
            try:
                up = await self.client.request(req.method, url, hdrs, body, proxy=ch.proxy,
                                               verify_tls=ch.verify_tls, timeout=ch.timeout)
                if up.status < 300 or not (up.status in (401, 403, 408, 429) or up.status >= 500):
                    rec["channel"] = ch.name
                    return await self._answer(up, dialect, rec, req)
                err_body = await up.read(MAX_ERROR_BODY)
                retry = [(n, v) for n, v in up.headers
                         if n.lower() in ("retry-after", "retry-after-ms")]
                raise UpstreamError(up.status, upstream_error_message(err_body, up.status),
                                    retryable=True, upstream_status=up.status,
                                    code=upstream_error_code(err_body), headers=retry)
            except UpstreamError as exc:
                failures.append((ch, exc))
                self.log(f"channel '{ch.name}' failed for {model}: {exc.status} {exc.message}")
        raise self._all_failed(failures)

    @staticmethod
    def _all_failed(failures: list[tuple[Channel, UpstreamError]]) -> GatewayError:
        ch, last = failures[-1]
        if last.upstream_status is not None:
            return GatewayError(last.upstream_status, f"channel '{ch.name}': {last.message}",
                                code=last.code, headers=last.headers)
        tried = "; ".join(f"'{c.name}': {e.message}" for c, e in failures)
        if len(failures) == 1:
            return GatewayError(last.status, f"channel {tried}")
        return GatewayError(last.status, f"all {len(failures)} channels failed: {tried}")

    async def _answer(self, up: UpstreamResponse, dialect: str, rec: dict,
                      req: Request) -> Response:
        hdrs = [(n, v) for n, v in up.headers if n.lower() not in _DROP_RESPONSE_HEADERS]
        hdrs += self._cors_headers(req.headers)
        rec["status"] = up.status
        rec["ttfb_ms"] = round((time.perf_counter() - rec["_t0"]) * 1000, 1)
        ctype = up.content_type.lower()
        sse = ctype.startswith("text/event-stream")
        length = up.headers.get("content-length")
        small = length is not None and length.isdigit() and int(length) <= MAX_BUFFERED_RESPONSE
        if not sse and small and "content-encoding" not in up.headers:
            try:
                body = await up.read()
            except UpstreamError as exc:
                raise GatewayError(exc.status, f"channel '{rec['channel']}': {exc.message}") \
                    from None
            if b'"usage"' in body and "json" in ctype:
                try:
                    found = usage_from_json(json.loads(body))
                except ValueError:
                    found = None
                if found:
                    rec["input_tokens"], rec["output_tokens"] = found
            if up.status >= 400:
                rec["error"] = upstream_error_message(body, up.status)
            rec["bytes_out"] = len(body)
            self._finish(rec)
            return Response(up.status, hdrs, body)
        if sse:
            hdrs = [(n, v) for n, v in hdrs if n.lower() != "cache-control"]
            hdrs += [("Cache-Control", "no-cache"), ("X-Accel-Buffering", "no")]
            rec["stream"] = True
        return Response(up.status, hdrs, self._stream(up, dialect, sse, rec))

    def _stream(self, up: UpstreamResponse, dialect: str, sse: bool, rec: dict) -> StreamBody:
        pt = SSEPassthrough() if sse else None

        def done() -> None:
            up.aclose_nowait()
            if pt is not None:
                rec["input_tokens"], rec["output_tokens"] = pt.input_tokens, pt.output_tokens
            if rec["error"] is None and not up.finished:
                rec["error"] = "client disconnected"
            self._finish(rec)
        return StreamBody(self._relay(up, dialect, pt, rec), done)

    async def _relay(self, up: UpstreamResponse, dialect: str, pt: SSEPassthrough | None,
                     rec: dict) -> AsyncIterator[bytes]:
        """Pass an upstream body on as it arrives. An SSE stream that breaks gets an in-band
        error event and a clean end; any other body is cut, so the client sees the break."""
        try:
            async for data in up.iter_bytes():
                out = pt.feed(data) if pt is not None else data
                if out:
                    rec["bytes_out"] += len(out)
                    yield out
            if pt is not None:
                rest = pt.flush()
                if rest:
                    rec["bytes_out"] += len(rest)
                    yield rest
        except UpstreamError as exc:
            rec["error"] = f"channel '{rec['channel']}' broke off: {exc.message}"
            self.log(rec["error"])
            if pt is None:
                raise
            yield stream_error_event(dialect, GatewayError(exc.status, rec["error"]))

    # -- records ---------------------------------------------------------------------------------

    def _new_record(self, req: Request, route: str) -> dict:
        return {"id": next(self._seq), "time": time.time(), "_t0": time.perf_counter(),
                "method": req.method, "route": route, "model": None, "stream": False,
                "token": None, "channel": None, "tried": [],
                "status": None, "latency_ms": None, "ttfb_ms": None,
                "bytes_in": len(req.body), "bytes_out": 0, "input_tokens": None,
                "output_tokens": None, "error": None}

    def _finish(self, rec: dict) -> None:
        if "_t0" not in rec:
            return
        rec["latency_ms"] = round((time.perf_counter() - rec.pop("_t0")) * 1000, 1)
        st = self.stats
        st["requests"] += 1
        if rec["error"] or (rec["status"] or 500) >= 400:
            st["errors"] += 1
        st["input_tokens"] += rec["input_tokens"] or 0
        st["output_tokens"] += rec["output_tokens"] or 0
        self.records.append(rec)
        if self._request_log is not None:
            self._request_log.write(rec)
        self.on_event("request", rec)


# =================================================================================================
# 12. Server thread bridge
# =================================================================================================
# The only place the GUI thread and the server thread meet. The GUI calls start/stop/apply_config
# and submit; events come back through ``events``, a queue.Queue of (kind, payload) tuples:
# ("state", "running"|"stopped"), ("request", record), ("log", text).

async def run_gateway(store: ConfigStore, stop: asyncio.Event, *, host: str | None = None,
                      port: int | None = None, on_event: Callable[[str, Any], None] | None = None,
                      on_ready: Callable[[Gateway, HTTPServer], None] | None = None) -> None:
    """Serve until ``stop`` is set. Raises OSError when the address cannot be bound."""
    config = store.snapshot()
    s = config["settings"]
    gateway = Gateway(config, config_dir=os.path.dirname(os.path.abspath(store.path)),
                      on_event=on_event)
    server = HTTPServer(gateway.handle, gateway.render_error, max_body=lambda: gateway.max_body,
                        log=gateway.log)
    try:
        await server.start(host or s["host"], s["port"] if port is None else port)
        gateway.log(f"listening on http://{_url_host(host or s['host'])}:{server.port}")
        if not is_loopback_host(host or s["host"]) and not s["require_auth"]:
            gateway.log("warning: listening beyond this machine with require_auth off: anyone "
                        "who can reach the port can use your upstream keys")
        if on_ready is not None:
            on_ready(gateway, server)
        await stop.wait()
    finally:
        await server.stop()
        gateway.close()
        gateway.log("stopped")


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class GatewayThread:
    """Runs the gateway on its own thread and event loop."""

    def __init__(self, store: ConfigStore, events: queue.Queue | None = None, *,
                 host: str | None = None, port: int | None = None):
        self.store = store
        self.events: queue.Queue = events if events is not None else queue.Queue()
        self.host, self.port = host, port
        self.gateway: Gateway | None = None
        self.server: HTTPServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.server is not None

    @property
    def url(self) -> str:
        host = self.host or self.store.data["settings"]["host"]
        port = self.server.port if self.server else 0
        return f"http://{_url_host(host)}:{port}"

    def _emit(self, kind: str, payload: Any) -> None:
        self.events.put((kind, payload))

    def start(self, timeout: float = 10.0) -> None:
        """Start serving; raises the bind error (OSError) if the address is unusable."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._ready.clear()
        self._error = None
        self._thread = threading.Thread(target=self._run, name="aigateway-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("the gateway did not start in time")
        if self._error is not None:
            self._thread.join(timeout)
            self._thread = None
            raise self._error

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._stop = asyncio.Event()

        def ready(gateway: Gateway, server: HTTPServer) -> None:
            self.gateway, self.server = gateway, server
            self._ready.set()
            self._emit("state", "running")
        try:
            loop.run_until_complete(run_gateway(self.store, self._stop, host=self.host,
                                                port=self.port, on_event=self._emit,
                                                on_ready=ready))
        except BaseException as exc:                                   # bind errors mostly
            self._error = exc
        finally:
            self.gateway = self.server = None
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()
            self._loop = None
            self._ready.set()
            self._emit("state", "stopped")

    def stop(self, timeout: float = SHUTDOWN_GRACE + 5) -> None:
        loop, stop, thread = self._loop, self._stop, self._thread
        if loop is not None and stop is not None:
            try:
                loop.call_soon_threadsafe(stop.set)
            except RuntimeError:
                pass
        if thread is not None:
            thread.join(timeout)
        self._thread = None

    def apply_config(self) -> None:
        """Hand the store's current configuration to the running gateway."""
        snap = self.store.snapshot()
        loop, gateway = self._loop, self.gateway
        if loop is not None and gateway is not None:
            loop.call_soon_threadsafe(gateway.apply_config, snap)

    def submit(self, coro: Any) -> Any:
        """Run a coroutine on the server loop; returns a concurrent.futures.Future."""
        if self._loop is None:
            raise RuntimeError("the gateway is not running")
        return asyncio.run_coroutine_threadsafe(coro, self._loop)


# =================================================================================================
# 13. Tk GUI
# =================================================================================================
# The window itself comes with the GUI issue; until then only the check for a usable display.

def gui_available() -> bool:
    if sys.platform != "win32" and sys.platform != "darwin" and not os.environ.get("DISPLAY") \
            and not os.environ.get("WAYLAND_DISPLAY"):
        return False
    try:
        import tkinter  # noqa: F401
    except ImportError:
        return False
    return True


# =================================================================================================
# 14. Command line and main()
# =================================================================================================

def access_line(rec: dict) -> str:
    """One line per request for the headless console; never a secret."""
    parts = [time.strftime("%H:%M:%S", time.localtime(rec["time"])), rec["method"], rec["route"],
             rec["model"] or "-", "->", rec["channel"] or "-", str(rec["status"] or "-"),
             f"{rec['latency_ms']:.0f}ms"]
    if rec["stream"]:
        parts.append("stream")
    if rec["input_tokens"] is not None or rec["output_tokens"] is not None:
        parts.append(f"tokens={rec['input_tokens'] or 0}/{rec['output_tokens'] or 0}")
    if len(rec["tried"]) > 1:
        parts.append(f"tried={','.join(rec['tried'])}")
    if rec["error"]:
        parts.append(f"error={rec['error'][:200]!r}")
    return " ".join(parts)


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="aigateway", description="Personal LLM API gateway: one "
                                "local OpenAI- and Anthropic-compatible endpoint for your "
                                "upstream channels.")
    p.add_argument("--headless", action="store_true", help="run without the GUI")
    p.add_argument("--config", metavar="PATH", help="configuration file (default: config.json "
                   "beside the program, or $AIGATEWAY_CONFIG)")
    p.add_argument("--host", help="listen address for this run (default: settings.host)")
    p.add_argument("--port", type=int, help="listen port for this run (default: settings.port)")
    p.add_argument("--quiet", action="store_true", help="no access line per request")
    p.add_argument("--version", action="version", version=f"aigateway {__version__}")
    return p


def run_headless(store: ConfigStore, host: str | None, port: int | None, quiet: bool) -> int:
    settings = store.data["settings"]
    bind_host = host or settings["host"]
    bind_port = settings["port"] if port is None else port

    def on_event(kind: str, payload: Any) -> None:
        if kind == "request" and not quiet:
            print(access_line(payload), flush=True)
        elif kind == "log":
            print(f"{time.strftime('%H:%M:%S')} {payload}", file=sys.stderr, flush=True)

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, stop.set)
            except (NotImplementedError, RuntimeError):                # Windows
                signal.signal(sig, lambda *_: loop.call_soon_threadsafe(stop.set))
        await run_gateway(store, stop, host=bind_host, port=bind_port, on_event=on_event)

    try:
        asyncio.run(serve())
    except OSError as exc:
        print(f"aigateway: cannot listen on {bind_host}:{bind_port}: "
              f"{exc.strerror or exc}. Another program (or another aigateway) may hold the port; "
              f"choose another with --port or settings.port.", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    path = os.path.abspath(args.config) if args.config else default_config_path()
    try:
        store, new_key = ConfigStore.load(path)
    except ConfigError as exc:
        print(f"aigateway: invalid configuration: {exc}", file=sys.stderr)
        return 2
    if new_key is not None:
        print(f"Created {path} with a new gateway token (shown only this once):\n  {new_key}\n"
              f"Clients send it as 'Authorization: Bearer <token>' or 'x-api-key: <token>'.",
              flush=True)
    if not args.headless and gui_available():
        print("aigateway: this version has no GUI yet; running headless.", file=sys.stderr)
    return run_headless(store, args.host, args.port, args.quiet)


if __name__ == "__main__":
    sys.exit(main())
