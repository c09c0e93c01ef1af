#!/usr/bin/env python3
"""aigateway: a personal, lightweight LLM API gateway in one file, standard library only.

Run it:
    python aigateway.py                      # GUI when a display is available, else headless
    python aigateway.py --headless [--config PATH] [--host H] [--port P]
    python aigateway.py channels|tokens|config ACTION ...   # manage config.json (see --help)

It serves one local endpoint (default http://127.0.0.1:3000) that speaks the OpenAI API
(/v1/chat/completions, /v1/responses, /v1/completions, /v1/embeddings, /v1/images/generations,
/v1/audio/speech, /v1/audio/transcriptions, /v1/models), the Anthropic API (/v1/messages,
/v1/messages/count_tokens) and Gemini's native API (/v1beta/models/{model}:generateContent and
friends), and routes each request by model name to the user's upstream channels (OpenAI,
Anthropic, Gemini, Ollama, any OpenAI-compatible server) by priority, converting between the
dialects through one internal form and falling back to the next channel when one fails.

Threads:
    Tk thread (GUI)  --call_soon_threadsafe-->  server thread (asyncio loop)  -->  upstreams
                     <--queue.Queue of (kind, payload)--
In headless mode the asyncio loop runs on the main thread and there is no queue consumer.

Outline (``grep -n '^# [0-9]*\\. ' aigateway.py``):
    0. Docstring, imports, __all__      7. Upstream HTTP client        12. Server thread bridge
    1. Constants and limits             8. HTTP server                 13. Tk GUI
    2. Errors                           9. Converters and adapters     14. Command line and main()
    3. Small helpers                   10. Configuration
    4. HTTP/1.1 wire format (no I/O)   11. Gateway
    5. Incremental decoders (no I/O)
    6. Stream helpers
Each section uses only the sections above it.

Adding a provider (section 9): every dialect converts to and from one internal form (the "IR",
documented at 9.2). A client dialect is a DialectAdapter in DIALECTS; a channel type is a
ProviderAdapter in PROVIDERS. The gateway (section 11) never compares a provider name: it asks
the channel's adapter
    relays(dialect, responses_api, model, kind)  whether a client's body goes through as it
                                     came (relay_body may rewrap it: Bedrock, Vertex)
    auth_headers(key, incoming, quirks)  the key header(s) (Bearer, x-api-key, api-key, ...)
    authorize(ch, method, url, headers, body, creds)  per-request signing (SigV4, OAuth)
    passthrough_url / chat_url / models_url / embeddings_url / base_url_for
    encode_chat(ir, model, ...)      IR -> the provider's chat body (tool names already fit
                                     tool_name_rule; max_tokens capped unless caps_in_encoder)
    decoders(signatures, kept, model)  (whole answer -> IR, factory of a StreamDecoding)
    answer_filter(model)             a relayed stream in another framing -> the client's SSE
    encode_embeddings / embed_vectors / parse_models / quirks
and reads its attributes (default_url, needs_key, embeds, inline_media, serves_as_is,
forwards_headers, lists_models). A type with config fields of its own declares them as
``fields`` (TypeField: default, label, what, JSON types, secret) with ``check_fields`` and
``credentials``: section 10 validates them, the channel dialog shows them, the command line
takes them as options and Channel.extra / Channel.creds hold them. A new channel type is one
subclass that overrides what differs from its nearest relative (Azure is OpenAIProvider with
other URLs and an api-key header; Bedrock and Vertex are CloudProviders), one PROVIDERS entry;
CHANNEL_TYPES, the default URLs, the routes' reach, the GUI's type list and the command line's
--type choices follow from the registry. A new client dialect is a
DialectAdapter (request_to_ir, response, stream_encoder, error_payload, stream_error,
keepalive, models_payload, count_payload, passthrough_decoders) plus its routes in section 11.
"""

# =================================================================================================
# 0. Docstring, imports, __all__
# =================================================================================================

from __future__ import annotations

import sys

# Start-up cache.  "python aigateway.py" makes CPython compile this whole file (a script's bytecode
# is never cached), and it keeps the script's syntax tree (~25 MiB) alive until the script ends.
# So on POSIX the run command keeps the compiled module in a bytecode cache (the __pycache__ beside
# the file, else $XDG_CACHE_HOME/aigateway) and replaces itself with a fresh interpreter that
# imports the module from there and calls main().  The cache is keyed like any import cache (the
# source's mtime and size); AIGATEWAY_NO_CACHE=1 turns it off; frozen builds never use it.
_CACHED_START = (
    "import os, sys, importlib.util as u; p = sys.argv[1];"
    " sys.pycache_prefix = sys.argv[2] or None; s = u.spec_from_file_location('aigateway', p);"
    " c = s.loader.get_code('aigateway');"
    " sys.pycache_prefix = None; m = u.module_from_spec(s); sys.modules['aigateway'] = m;"
    " sys.argv = sys.argv[1:2] + sys.argv[3:]; sys.path[0] = os.path.dirname(p);"
    " exec(c, m.__dict__); sys.exit(m.main())")


def _start_from_bytecode_cache(code: object) -> None:
    """Exec a fresh interpreter that runs this file from cached bytecode, writing the cache from
    ``code`` (this script's own code object, so nothing is compiled twice) when it is missing or
    stale.  Returns only when no cache can be read or written: the plain run then goes on."""
    import importlib.util
    import marshal
    import os
    if os.name != "posix" or os.environ.get("AIGATEWAY_NO_CACHE") or not sys.executable:
        return
    src = os.path.abspath(__file__)
    try:
        st = os.stat(src)
    except OSError:
        return
    stamp = (int(st.st_mtime) & 0xFFFFFFFF, st.st_size & 0xFFFFFFFF)
    head = importlib.util.MAGIC_NUMBER + bytes(4) + b"".join(n.to_bytes(4, "little")
                                                            for n in stamp)
    user = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                        "aigateway")
    saved = sys.pycache_prefix
    for prefix, writable in ((saved, not sys.dont_write_bytecode), (user, True)):
        try:
            sys.pycache_prefix = prefix
            path = importlib.util.cache_from_source(src)
        finally:
            sys.pycache_prefix = saved
        try:
            with open(path, "rb") as f:
                fresh = f.read(16) == head
        except OSError:
            fresh = False
        if not fresh and writable:
            tmp = f"{path}.{os.getpid()}.tmp"
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(tmp, "wb") as f:
                    f.write(head + marshal.dumps(code))
                os.replace(tmp, path)
                fresh = True
            except OSError:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
        if fresh:
            import subprocess
            sys.stdout.flush()
            sys.stderr.flush()
            os.execv(sys.executable, [sys.executable, *subprocess._args_from_interpreter_flags(),
                                      "-c", _CACHED_START, src, prefix or "", *sys.argv[1:]])


if __name__ == "__main__" and __spec__ is None and not getattr(sys, "frozen", False):
    _start_from_bytecode_cache(sys._getframe().f_code)      # a script; -m imports from cache

import argparse
import asyncio
import base64
import codecs
import collections
import copy
import csv
import datetime
import errno
import functools
import gc
import hashlib
import hmac
import http
import ipaddress
import itertools
import json
import operator
import os
import queue
import re
import secrets
import signal
import socket
import sqlite3
import ssl
import struct
import threading
import time
import urllib.parse
import zlib
from dataclasses import dataclass
from typing import (Any, AsyncIterator, Callable, Iterable, Iterator, Literal, NamedTuple, Protocol,
                    TypedDict)

__all__ = [
    "__version__", "GatewayError", "ProtocolError", "UpstreamError", "ConfigError",
    "Headers", "ChunkedDecoder", "SSEDecoder", "NDJSONDecoder", "SSEPassthrough",
    "UpstreamClient", "HTTPServer", "Request", "Response",
    "ConfigStore", "Gateway", "UsageStore", "PriceBook", "GatewayThread", "main",
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
CHUNK_SIZES_KEPT = 1024               # chunk-size lines remembered once checked (all streams)

HEADER_TIMEOUT = 10.0                 # a client that stalls mid-head is answered 408
KEEPALIVE_TIMEOUT = 75.0              # idle keep-alive connections are closed after this
BODY_IDLE_TIMEOUT = 60.0              # gap between request body bytes before 408
WRITE_TIMEOUT = 120.0                 # a client that stops reading our answer is dropped
KEEPALIVE_PING_SECONDS = 15.0         # a silent stream gets a ping / SSE comment this often
CLIENT_CHECK_SECONDS = 0.5            # how often a busy connection checks its client is there
SHUTDOWN_GRACE = 5.0                  # in-flight streams get this long when stopping
LINGER_SECONDS = 1.0                  # after an early 413, read and discard before closing
LINGER_BYTES = 8 * 1024 * 1024

CONNECT_TIMEOUT = 10.0                # TCP + proxy handshake + TLS to an upstream
HAPPY_EYEBALLS_DELAY = 0.25           # the next address is tried this long after one (RFC 8305)
CONNECT_ADDRESSES_MAX = 16            # addresses tried per connect (a DNS answer may hold 100s)
DEFAULT_CHANNEL_TIMEOUT = 300.0       # first byte and idle gap between upstream bytes
POOL_MAX_IDLE = 32                    # idle upstream connections kept per pool key
POOL_IDLE_TTL = 50.0                  # servers commonly drop idle connections after 60 s
MAX_BUFFERED_RESPONSE = 1024 * 1024   # upstream bodies up to this are read whole, else streamed
MAX_ERROR_BODY = 256 * 1024           # how much of an upstream error body we read
DEFAULT_MAX_RESPONSE_MB = 64          # settings.max_response_mb: a larger whole answer -> 502
MAX_EVENT_BYTES = 16 * 1024 * 1024    # one SSE event or NDJSON line longer than this -> 502
DECODE_PIECE = 256 * 1024             # gzip/deflate output per step: no bomb is inflated whole
UPSTREAM_HEAD_TIMEOUT = 30.0          # an upstream's head, once begun, is complete within this
MAX_IMAGE_BYTES = 20 * 1024 * 1024    # image URLs fetched for Gemini/Ollama up to this size
FETCH_TIMEOUT = 15.0                  # a URL fetched for a client: the whole fetch, redirects too
FETCH_MAX_REDIRECTS = 3               # redirects followed per fetched URL, each target re-checked

JSON_MAX_DEPTH = 256                  # deeper JSON -> 400; json's C scanner would raise
                                      # RecursionError near 1,000 and converters recurse too
EVENTS_KEPT = 1000                    # request records kept in memory for the GUI
SIGNATURES_KEPT = 10000               # Gemini thought signatures kept for replay, oldest dropped
THINKING_KEPT = 500                   # Claude thinking turns kept for replay to clients that drop
THINKING_KEPT_BYTES = 256 * 1024      # ... signatures; a larger turn is not kept (bounded memory)
EMPTY_HOLD_EVENTS = 512               # stream events held while waiting for real content
NAME_CACHE_SIZE = 256                 # host names and upstream URLs whose parse is remembered
EMPTY_HOLD_BYTES = 256 * 1024         # ... and bytes: past either, the stream is released as is
HOLD_FEED_BYTES = 1024                # a held read is decoded in pieces from this size, doubling,
                                      # so a burst is decoded only up to its first content
HEALTH_FAILURES = 3                   # consecutive failures that put a channel in cooldown
COOLDOWN_SECONDS = 30.0               # first cooldown; doubles on each failed probe
COOLDOWN_MAX_SECONDS = 300.0
KEY_BENCH_SECONDS = 60.0              # a key answered 401/403/429 rests this long (or Retry-After)
QUEUE_PER_SLOT = 4                    # waiting requests allowed per max_concurrency slot
DEFAULT_MAX_CONNECTIONS = 1024        # simultaneous client connections
AUTH_FAILURES_LIMIT = 20              # wrong tokens from one address within the window -> 429
AUTH_FAILURES_WINDOW = 60.0           # seconds over which wrong tokens are counted
AUTH_BLOCK_SECONDS = 60.0             # how long an address that went over the limit gets 429
AUTH_FAILURE_ADDRESSES = 4096         # addresses tracked at most; the least recent is dropped
DEFAULT_AFFINITY_TTL_S = 3600         # a session sticks to its channel and key this long
AFFINITY_MAX_SESSIONS = 10000         # sessions pinned at most; the least recently used is dropped
AFFINITY_HASH_CHARS = 4096            # characters of the system prompt, and of the first user
                                      # message, hashed when a client names no session
ALIAS_MAX_MEMBERS = 32                # models one settings.aliases entry may name
OVERRIDES_MAX = 32                    # override rules per channel
OVERRIDE_PATH_DEPTH = 16              # segments of one dotted override path
DEBUG_CAPTURE_MAX = 500               # settings.debug_capture: requests kept at most
DEBUG_CAPTURE_BODY_BYTES = 256 * 1024  # each captured body is cut here (memory stays bounded)
DEBUG_CAPTURE_ATTEMPTS = 4            # upstream exchanges captured per request (fallbacks)
# Browser origins allowed without settings.cors_origins: pages of desktop apps (the schemes
# Ollama allows by default after its own DNS-rebinding/CSRF fixes); loopback origins are too.
APP_ORIGIN_SCHEMES = ("app", "file", "tauri", "vscode-webview")
REQUEST_LOG_MAX_BYTES = 10 * 1024 * 1024
REQUEST_LOG_BACKUPS = 3
SSE_CARRY_LIMIT = 1024 * 1024         # an SSE event larger than this is flushed unsplit
EVENTSTREAM_MAX_HEADERS = 64          # headers in one AWS event-stream message (Bedrock sends 3)
EVENTSTREAM_MAX_HEADER_BYTES = 128 * 1024   # botocore's event-stream parser refuses more too
GOOGLE_TOKEN_MARGIN = 300.0           # a Google access token is renewed this long before expiry
GOOGLE_TOKEN_LAST = 30.0              # ... in the background until this little of it is left
GOOGLE_ASSERTION_SECONDS = 3600       # JWT bearer assertion lifetime, Google's maximum
MAX_SERVICE_ACCOUNT_FILE = 64 * 1024  # a service-account JSON key file (about 2.3 KiB) up to this
MAX_TOKEN_SOURCES = 64                # service accounts whose access tokens are kept at once
MAX_TOKEN_RESPONSE = 64 * 1024        # a token endpoint's answer (a few hundred bytes) up to this
MAX_KEY_PEM = 64 * 1024               # a PEM private key (a 4096-bit RSA key is ~3.3 KiB)
CONFIG_MAX_BYTES = 16 * 1024 * 1024   # a config.json larger than this is refused, not read
CONFIG_POLL_SECONDS = 0.5             # a running gateway checks config.json for edits this often
CONFIG_SAVE_ATTEMPTS = 5              # a save redone on a newer file this often before giving up
CONFIG_SETTLE_SECONDS = 0.3           # a file written more recently may be half-written: an error
                                      # in it is reported only if it is still there a check later

USAGE_QUEUE_LIMIT = 20_000           # usage rows waiting for the writer; beyond, rows are dropped
                                      # (and counted) rather than making a request wait on disk
USAGE_BATCH_ROWS = 1_000              # rows the writer inserts per transaction at most; a full
                                      # batch wakes it at once
USAGE_FLUSH_SECONDS = 0.25            # else it writes what is queued this often (a request never
                                      # wakes it: that would cost a thread switch each)
USAGE_PRUNE_SECONDS = 3600.0          # old rows are pruned this often
USAGE_DEFAULT_RETENTION_DAYS = 400
USAGE_REPORT_GROUPS = 1_000           # rows a usage report lists at most
USAGE_TPM_WINDOW = 60.0               # seconds the tokens-per-minute limit looks back over
USAGE_TPM_EVENTS = 10_000             # recent requests kept per token for tpm at most
ESTIMATE_BYTES_PER_TOKEN = 4          # a rough count when an upstream reports no usage
PRICES_IMPORT_MAX_BYTES = 64 * 1024 * 1024   # a models.dev api.json is ~2 MB
READ_SIZE = 64 * 1024
MAX_CONFIG_PROBLEMS = 100             # `config check` stops naming problems after this many
GC_THRESHOLDS = (50_000, 20, 20)      # the run command's garbage collector (tune_collector)

OPENAI = "openai"                     # client dialects / route families
ANTHROPIC = "anthropic"
RESPONSES = "responses"
GEMINI = "gemini"
# Channel types (a channel's "type"): each names one ProviderAdapter in PROVIDERS (section 9).
TYPE_OPENAI = "openai"
TYPE_ANTHROPIC = "anthropic"
TYPE_GEMINI = "gemini"
TYPE_OLLAMA = "ollama"
TYPE_CUSTOM = "custom"                # any OpenAI-compatible server
TYPE_AZURE = "azure"                  # Azure OpenAI
TYPE_BEDROCK = "bedrock"              # AWS Bedrock (InvokeModel for Claude, else Converse)
TYPE_VERTEX = "vertex"                # Google Vertex AI (Gemini, and Claude by rawPredict)
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


class ContextOverflow(GatewayError):
    """An upstream refused a prompt longer than the model's context window. Always a 400 in
    the client's own wording (section 9 renders it), never a channel failure: another channel
    would refuse the same prompt. ``tokens`` and ``limit`` when the upstream named them."""

    def __init__(self, message: str, tokens: int | None = None, limit: int | None = None):
        super().__init__(400, message, code="context_length_exceeded", param="messages")
        self.tokens = tokens
        self.limit = limit


class ConfigError(Exception):
    """The configuration file is invalid; the message names the file, the field and the fix."""


# =================================================================================================
# 3. Small helpers
# =================================================================================================
# Case-insensitive headers, strict JSON (duplicate keys, NaN, depth and lone surrogates refused),
# ids and keys, secret masking and control-character escaping for logs, model-name patterns, and
# which addresses count as loopback or private.

class Headers:
    """Ordered, case-insensitive HTTP headers. Repeated names are kept as separate entries."""

    __slots__ = ("_items", "_index", "_repeated")

    def __init__(self, items: Iterable[tuple[str, str]] = ()):
        self._items: list[tuple[str, str]] = list(items)
        self._index: dict[str, str] | None = None
        self._repeated: set[str] = set()        # names that came more than once (with _index)

    def _map(self) -> dict[str, str]:
        if self._index is None:
            index: dict[str, str] = {}
            repeated = self._repeated = set()
            for name, value in self._items:
                key = name.lower()
                if key in index:
                    index[key] = f"{index[key]}, {value}"
                    repeated.add(key)
                else:
                    index[key] = value
            self._index = index
        return self._index

    # The lookups take the index as it is once built (a dozen a request: no call to _map).

    def get(self, name: str, default: str | None = None) -> str | None:
        return (self._index or self._map()).get(name.lower(), default)

    def get_all(self, name: str) -> list[str]:
        key = name.lower()
        value = (self._index or self._map()).get(key)
        if value is None or key not in self._repeated:      # none, or one: no search
            return [] if value is None else [value]
        return [v for n, v in self._items if n.lower() == key]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in (self._index or self._map())

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


def is_digits(text: str) -> bool:
    """Whether ``text`` is one or more ASCII digits, as HTTP writes a count (str.isdigit() says
    yes to "²" too, which int() refuses)."""
    return text.isascii() and text.isdigit()


def has_words(text: Any) -> bool:
    """Whether ``text`` is a str with something besides white space in it."""
    return type(text) is str and text != "" and not text.isspace()


class _JSONRefused(ValueError):
    """Raised by the strict parser's hooks; the message says what was wrong and where."""


def _json_pairs(pairs: list[tuple[str, Any]]) -> dict:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _JSONRefused(f"the key {key[:100]!r} appears twice in one object")
            seen.add(key)
    return obj


def _json_constant(name: str) -> Any:
    raise _JSONRefused(f"{name} is not a JSON number")


_INF = float("inf")


def _json_float(text: str) -> float:
    value = float(text)
    if value == _INF or value == -_INF:
        raise _JSONRefused(f"the number {text[:40]} is too large for a double")
    return value


if hasattr(sys, "get_int_max_str_digits"):
    _json_int = None                    # int() itself refuses digits past the limit (3.11+)
else:                                                                  # pragma: no cover
    def _json_int(text: str) -> int:
        if len(text) > 4300:            # the limit 3.11 introduced against quadratic int()
            raise ValueError("Exceeds the limit (4300 digits) for integer string conversion")
        return int(text)

# Duplicate keys are refused through object_pairs_hook, which costs a Python call per object;
# stream events from an upstream skip that (the gateway is their only reader), nothing else.
_STRICT_JSON = json.JSONDecoder(object_pairs_hook=_json_pairs, parse_constant=_json_constant,
                                parse_float=_json_float, parse_int=_json_int)
_STRICT_JSON_EVENTS = json.JSONDecoder(parse_constant=_json_constant, parse_float=_json_float,
                                       parse_int=_json_int)
_JSON_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_JSON_BRACKET_STEPS = bytes.maketrans(b"[{]}", b"\x02\x02\x00\x00")
_SURROGATE_ESCAPE_RX = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE_RX = re.compile("[\ud800-\udfff]")


def json_too_deep(text: str, limit: int = JSON_MAX_DEPTH) -> bool:
    """Whether JSON text nests arrays/objects deeper than ``limit``, brackets inside strings
    ignored; exact for valid JSON. Linear, no recursion, and C-level string operations but for
    the last step: escaped backslashes and quotes are dropped so that splitting at quotes leaves
    the text outside strings at even places; its brackets become steps of +1/-1 (stored as 2 and
    0); each pass that removes every adjacent open-close pair takes exactly one level off; the
    running sum of what is left, minus the position, is the rest of the depth."""
    if "\\" in text:
        text = text.replace("\\\\", "").replace('\\"', "")
    outside = "".join(text.split('"')[::2]).encode("utf-8", "replace")
    steps = outside.translate(_JSON_BRACKET_STEPS, _JSON_NOT_BRACKETS)
    peeled = 0
    while peeled < 3:                   # leaves and their parents: most brackets, cheaply
        shorter = steps.replace(b"\x02\x00", b"")
        if len(shorter) == len(steps):
            break
        steps, peeled = shorter, peeled + 1
    if b"\x02" * (limit - peeled + 1) in steps:     # a plain run of opening brackets
        return True
    depth = max(map(operator.sub, itertools.accumulate(steps), itertools.count(1)), default=0)
    return depth + peeled > limit


def _lone_surrogate_at(obj: Any) -> str | None:
    """The path of the first key or string value holding an unpaired surrogate, else None."""
    stack: list[tuple[str, Any]] = [("", obj)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            if _SURROGATE_RX.search(value):
                return path or "the top-level string"
        elif isinstance(value, dict):
            for key, item in value.items():
                if _SURROGATE_RX.search(key):
                    return f"a key in {path or 'the top-level object'}"
                stack.append((f"{path}.{key}" if path else key, item))
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", item) for i, item in enumerate(value))
    return None


def json_loads(data: bytes | str, what: str = "request body", *, status: int = 400,
               unique_keys: bool = True, error: type[GatewayError] = GatewayError) -> Any:
    """Parse JSON strictly or raise ``error(status)`` naming what was wrong and where:
    text that is not UTF-8, nesting deeper than JSON_MAX_DEPTH, a key twice in one object
    (unless ``unique_keys`` is off), NaN / Infinity, numbers past a double or past Python's int
    digit limit, and escapes that leave an unpaired UTF-16 surrogate. Duplicates are caught by
    ``object_pairs_hook`` (a Python call per object, the main cost); the depth and surrogate
    checks run only when a cheap scan finds more than JSON_MAX_DEPTH brackets or a surrogate
    escape."""
    try:
        text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data
    except UnicodeDecodeError as exc:
        raise error(status, f"{what} is not valid UTF-8 (byte {exc.start})") from None
    if text.startswith("\ufeff"):
        text = text[1:]
    if len(text) > 2 * JSON_MAX_DEPTH and text.count("[") + text.count("{") > JSON_MAX_DEPTH \
            and json_too_deep(text):
        raise error(status, f"{what} nests arrays/objects deeper than {JSON_MAX_DEPTH}")
    decoder = _STRICT_JSON if unique_keys else _STRICT_JSON_EVENTS
    try:
        # The scanner alone when the value starts the text and only JSON whitespace follows
        # (the usual case), which skips decode()'s Python steps; else decode() again, for its
        # error message or leading whitespace. The same hooks check either way.
        try:
            obj, end = decoder.scan_once(text, 0)
        except StopIteration:
            end = -1
        if end < 0 or (end != len(text) and text[end:].strip(" \t\n\r")):
            obj = decoder.decode(text)
    except _JSONRefused as exc:
        raise error(status, f"{what} is refused: {exc}") from None
    except json.JSONDecodeError as exc:
        raise error(status, f"{what} is not valid JSON: {exc}") from None
    except ValueError as exc:                   # int(): past sys.get_int_max_str_digits()
        raise error(status, f"{what} is refused: a number has too many digits "
                                   f"({str(exc)[:80]})") from None
    except RecursionError:
        raise error(status, f"{what} nests arrays/objects too deeply") from None
    if "\\u" in text and _SURROGATE_ESCAPE_RX.search(text):
        where = _lone_surrogate_at(obj)
        if where is not None:
            raise error(status, f"{what} is refused: a \\u escape at {where} leaves "
                                       f"an unpaired UTF-16 surrogate")
    return obj


_JSON_ENCODE = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def json_dumps(obj: Any) -> bytes:
    """Compact JSON in UTF-8 (one encoder made once: json.dumps with options makes one per
    call)."""
    return _JSON_ENCODE(obj).encode()


_JSON_STRING = json.encoder.encode_basestring          # what _JSON_ENCODE does for a str


def json_string(text: Any) -> bytes:
    """json_dumps of a str (the text of a stream delta) without the encoder's dispatch; any
    other value goes through json_dumps."""
    return _JSON_STRING(text).encode() if type(text) is str else json_dumps(text)


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


# C0 and C1 controls, DEL and the Unicode line/paragraph separators: each could end a log line,
# forge one, or drive a terminal (ANSI escapes), so text a client sent never reaches a log raw.
_CONTROL_CHARS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_CONTROL_NAMES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape_controls(text: str) -> str:
    """``text`` with every control character written as an escape (``\\n``, ``\\x1b``,
    ``\\u2028``), so it stays on one line and prints as it is."""
    return _CONTROL_CHARS.sub(_escape_control, text) if _CONTROL_CHARS.search(text) else text


def _escape_control(m: re.Match[str]) -> str:
    c = m.group()
    return _CONTROL_NAMES.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")


def escape_record(obj: Any) -> Any:
    """``obj`` (a request record: strings, numbers, lists and dicts) with escape_controls applied
    to every string in it: ``obj`` itself when no string needed it (the usual case), else a
    copy."""
    if isinstance(obj, str):
        return escape_controls(obj)
    if not isinstance(obj, (list, dict)):
        return obj
    search = _CONTROL_CHARS.search
    out: Any = None
    for k, v in (obj.items() if isinstance(obj, dict) else enumerate(obj)):
        t = type(v)                             # exact types first: the usual record is all
        if t is str:                            # plain str, int, float, bool and None
            if not search(v):
                continue
            new = escape_controls(v)
        elif v is None or t is int or t is float or t is bool or not v:
            continue
        else:                                   # containers, and subclasses of str or of them
            new = escape_record(v)
            if new is v:
                continue
        if out is None:
            out = dict(obj) if isinstance(obj, dict) else list(obj)
        out[k] = new
    return obj if out is None else out


def make_room(kept: dict, limit: int) -> None:
    """Drop ``kept``'s oldest entries (insertion order) until one more fits within ``limit``:
    the bound of a table whose keys come from clients or upstreams."""
    while len(kept) >= limit:
        del kept[next(iter(kept))]


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


@functools.lru_cache(maxsize=NAME_CACHE_SIZE)        # asked with every request's Host
def is_loopback_host(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# Addresses a URL fetched for a client must not reach unless settings.fetch_private_urls is true
# (SSRF): the IANA special-purpose registries (RFC 6890 and updates), most specific first.
# Whatever else ipaddress does not call global is refused as "reserved".
_BLOCKED_NETWORKS = tuple((ipaddress.ip_network(net), why) for net, why in (
    ("0.0.0.0/8", "'this network'"), ("10.0.0.0/8", "private"),
    ("100.64.0.0/10", "shared (CGNAT)"), ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local"), ("172.16.0.0/12", "private"),
    ("192.0.0.0/24", "IETF protocol"), ("192.0.2.0/24", "documentation"),
    ("192.88.99.0/24", "6to4 relay"), ("192.168.0.0/16", "private"),
    ("198.18.0.0/15", "benchmarking"), ("198.51.100.0/24", "documentation"),
    ("203.0.113.0/24", "documentation"), ("224.0.0.0/4", "multicast"),
    ("255.255.255.255/32", "broadcast"), ("240.0.0.0/4", "reserved"),
    ("::/128", "unspecified"), ("::1/128", "loopback"), ("::/96", "IPv4-compatible"),
    ("64:ff9b:1::/48", "local NAT64"), ("100::/64", "discard"), ("2001::/32", "Teredo"),
    ("2001:db8::/32", "documentation"), ("2001::/23", "IETF protocol"),
    ("3fff::/20", "documentation"), ("5f00::/16", "segment routing"),
    ("fc00::/7", "private (unique local)"), ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local"), ("ff00::/8", "multicast"),
))
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def address_refusal(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why a fetch on a client's behalf may not connect to ``ip`` ("loopback", "private", ...),
    or None for a public address. IPv6 forms that carry an IPv4 address (IPv4-mapped, NAT64,
    6to4) are judged by the address they carry."""
    if isinstance(ip, ipaddress.IPv6Address):
        inner = ip.ipv4_mapped or ip.sixtofour or (
            ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF) if ip in _NAT64 else None)
        if inner is not None:
            why = address_refusal(inner)
            return None if why is None else f"{why} (carried in IPv6)"
    for net, why in _BLOCKED_NETWORKS:
        if ip.version == net.version and ip in net:
            return why
    return None if ip.is_global and not ip.is_reserved else "reserved"


# =================================================================================================
# 4. HTTP/1.1 wire format (no I/O)
# =================================================================================================
# Strict on framing (RFC 9112 section 6.3: Content-Length with Transfer-Encoding is rejected, as is
# a bad chunk size or a bad Content-Length), lenient on cosmetics (header name case, bare LF).

_TOKEN_RX = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
# Field values never hold CR, LF or NUL (RFC 9110 section 5.5: such a message is refused).
_HEADER_BLOCK_RX = re.compile(rb"(?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[^\r\n\x00]*(?:\n|\Z))*")
_VERSION_SEGMENT = re.compile(r"v\d+[a-z0-9]*\Z", re.I)        # /v1, /v4, /v1beta in URLs


@functools.lru_cache(maxsize=NAME_CACHE_SIZE)        # a channel's base URL, asked per request
def has_version_segment(url: str) -> bool:
    """Whether a base URL's path already names an API version (/v1, /v4, /v1beta/openai…)."""
    return any(_VERSION_SEGMENT.match(seg) for seg in urllib.parse.urlsplit(url).path.split("/"))
_REASONS = {s.value: s.phrase for s in http.HTTPStatus}
_REASONS[529] = "Overloaded"
_HOP_BY_HOP = frozenset((
    "connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization",
    "te", "trailer", "transfer-encoding", "upgrade",
))


def join_base_url(base: str, suffix: str) -> str:
    """``suffix`` is a /v1/... path. When the base URL already carries a version segment
    (/v1, /v4, /v1beta...), the suffix's own /v1 is dropped."""
    base = base.rstrip("/")
    if has_version_segment(base):
        suffix = suffix[3:] if suffix.startswith("/v1/") else suffix
    return base + suffix


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
    block = b"\n".join(lines)
    if _HEADER_BLOCK_RX.fullmatch(block):       # every line "token:value": split at once
        return Headers([(name, value.strip(" \t")) for name, _, value in (
            line.partition(":") for line in block.decode("latin-1").split("\n"))] if lines
            else [])
    items = []                                  # a bad line: found and named one by one
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            raise ProtocolError(400, "obsolete header line folding is not accepted")
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN_RX.match(name):
            raise ProtocolError(400, f"malformed header line {line[:60]!r}")
        if b"\r" in value or b"\x00" in value:
            raise ProtocolError(400, f"header {name[:60].decode('ascii')!r} has a CR or NUL in "
                                     f"its value")
        items.append((name.decode("ascii"), value.strip(b" \t").decode("latin-1")))
    return Headers(items)


def _split_head(data: bytes) -> list[bytes]:
    crlf = data.count(b"\n") == data.count(b"\r\n")       # every line ends in CRLF: one split
    lines = data.split(b"\r\n" if crlf else b"\n")
    while lines and not lines[-1].strip(b"\r"):
        lines.pop()
    return lines if crlf else [ln[:-1] if ln.endswith(b"\r") else ln for ln in lines]


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
    if len(parts) < 2 or parts[0] not in (b"HTTP/1.1", b"HTTP/1.0") or not parts[1].isdigit() \
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
    if len(values) == 1 and is_digits(values[0]):              # the usual one, plain
        return int(values[0])
    found = {v.strip() for value in values for v in value.split(",")}
    if len(found) != 1:
        raise ProtocolError(status, "conflicting Content-Length headers")
    value = found.pop()
    if not is_digits(value):
        raise ProtocolError(status, f"invalid Content-Length {value[:40]!r}")
    return int(value)


def body_framing(headers: Headers, *, error_status: int = 400) -> tuple[str, int]:
    """Request body framing: ("length", n) or ("chunked", 0). RFC 9112 section 6.3."""
    te = headers.get("transfer-encoding")
    if te is not None:
        if "content-length" in headers:
            raise ProtocolError(error_status,
                                "Content-Length with Transfer-Encoding is not allowed")
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
    items = headers if isinstance(headers, list) else list(headers)
    lines = [f"{name}: {value}" for name, value in items]
    head = "\r\n".join([first_line, *lines, "\r\n"])
    # Only the joins' line breaks: counted at once; a stray one is then looked for by header.
    if head.count("\n") != len(lines) + 2 or head.count("\r") != len(lines) + 2:
        for name, value in items:
            if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
                raise ValueError(f"header {name!r} contains a line break")
    return head.encode("latin-1")


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
# Size lines already read, each checked strictly once: a stream's chunks have few distinct sizes.
_CHUNK_SIZES: dict[bytes, int] = {}


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
        find, known = data.find, _CHUNK_SIZES
        while pos < n and not self.done:
            state = self._state
            if state == "size" and not self._line:
                # The common case inline: bare size lines ending in CRLF, each with its whole
                # chunk and CRLF in this read, a size line read once (strictly: "+5", "0x5" and
                # "1_0" are not sizes, though int() takes them) and then looked up. Anything
                # else (extensions, a bare LF, a split, the last chunk) goes below.
                at = pos
                while (nl := find(b"\r\n", pos, pos + 18)) > pos:
                    line = data[pos:nl]
                    size = known.get(line)
                    if size is None:
                        if not _CHUNK_SIZE_RX.fullmatch(line):
                            break
                        size = int(line, 16)
                        if len(known) < CHUNK_SIZES_KEPT:
                            known[line] = size
                    start = nl + 2
                    end = start + size
                    if end == start or not data.startswith(b"\r\n", end):
                        break
                    out.append(data[start:end])
                    pos = end + 2
                if pos != at:
                    continue
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

    __slots__ = ("_dec", "_buf", "_held", "_size", "_event", "_data", "_id", "_started", "_cr")

    def __init__(self):
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buf: list[str] = []           # pieces of the unfinished last line
        self._held = 0                      # their length
        self._size = 0                      # length of the data lines of the event so far
        self._event: str | None = None
        self._data: list[str] = []
        self._id: str | None = None
        self._started = False
        self._cr = False

    def feed(self, data: bytes, final: bool = False) -> list[tuple[str | None, str, str | None]]:
        """Raises a 502 ProtocolError once one event (its unfinished line included) holds more
        than MAX_EVENT_BYTES characters, so an endless line cannot grow the buffer."""
        text = self._dec.decode(data, final)
        if not self._started and text:
            self._started = True
            if text.startswith("\ufeff"):
                text = text[1:]
        if self._cr and text.startswith("\n"):
            text = text[1:]
        self._cr = False
        if not final and "\n" not in text and "\r" not in text:
            if text:                            # no line end: held in pieces, not re-joined
                self._buf.append(text)
                self._held += len(text)
                if self._held + self._size > MAX_EVENT_BYTES:
                    raise _event_too_long("SSE event")
            return []
        if self._buf:
            self._buf.append(text)
            buf = "".join(self._buf)
        else:
            buf = text
        out: list[tuple[str | None, str, str | None]] = []
        if (self._data or self._event is not None) and "\r" not in buf and \
                (end := buf.find("\n\n")) >= 0:
            # An event begun in an earlier read (a read of a burst ends inside one): its lines
            # up to its blank line by line, so that the whole events after it go below at once.
            for line in buf[:end].split("\n"):
                self._line(line, out)
            self._line("", out)
            self._size, buf = 0, buf[end + 2:]
        if not self._data and self._event is None and "\n\n" in buf and "\r" not in buf:
            # Whole events, each ended by a blank line, as servers send them: the usual
            # shapes ("data: ..." or "event: ...\ndata: ...") read at once, others by line.
            blocks = buf.split("\n\n")
            buf = blocks.pop()                  # the unfinished event after the last one
            for block in blocks:
                if block.startswith("data: ") and "\n" not in block:
                    out.append((None, block[6:], self._id))
                    continue
                nl = block.find("\n")
                if block.startswith("event: ") and block.startswith("data: ", nl + 1) and \
                        block.find("\n", nl + 1) < 0:
                    out.append((block[7:nl], block[nl + 7:], self._id))
                    continue
                for line in block.split("\n"):
                    self._line(line, out)
                self._line("", out)
        lines = _SSE_EOL.split(buf) if "\r" in buf else buf.split("\n")
        rest = lines.pop()                      # the unfinished last line ("" after a newline)
        self._buf, self._held = ([rest], len(rest)) if rest else ([], 0)
        if buf.endswith("\r"):
            self._cr = True         # a CR ending this read may be the first half of a CRLF
        size, event, data = self._size, self._event, self._data
        for line in lines:                      # the common lines inline, as _line reads them
            if line.startswith("data:"):
                data.append(line[6:] if line.startswith("data: ") else line[5:])
                size += len(line) + 1
            elif not line:
                if data:
                    out.append((event, "\n".join(data), self._id))
                    data = []
                event, size = None, 0
            elif line.startswith("event:"):
                event = line[7:] if line.startswith("event: ") else line[6:]
            else:
                self._event, self._data = event, data
                self._line(line, out)
                event, data = self._event, self._data
                if line.startswith("data"):
                    size += len(line) + 1
        self._size, self._event, self._data = size, event, data
        if size + self._held > MAX_EVENT_BYTES:
            raise _event_too_long("SSE event")
        if final and rest:
            self._buf, self._held = [], 0
            self._line(rest, out)
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


def _event_too_long(what: str) -> ProtocolError:
    return ProtocolError(502, f"upstream sent an {what} longer than "
                              f"{MAX_EVENT_BYTES // (1024 * 1024)} MiB")


class NDJSONDecoder:
    """Newline-delimited JSON (Ollama streams). ``feed`` returns parsed objects; a line that is
    not strict JSON (section 3) or longer than MAX_EVENT_BYTES raises a 502 ProtocolError.
    Blank lines are skipped; CRLF is accepted."""

    __slots__ = ("_buf", "_held")

    def __init__(self):
        self._buf: list[bytes] = []         # pieces of the unfinished last line
        self._held = 0

    def feed(self, data: bytes, final: bool = False) -> list[Any]:
        if not final and b"\n" not in data:
            if data:
                self._buf.append(data)
                self._held += len(data)
                if self._held > MAX_EVENT_BYTES:
                    raise _event_too_long("NDJSON line")
            return []
        if self._buf:
            self._buf.append(data)
            buf = b"".join(self._buf)
        else:
            buf = data
        lines = buf.split(b"\n")
        rest = b"" if final else lines.pop()
        self._buf, self._held = ([rest], len(rest)) if rest else ([], 0)
        out = []
        for line in lines:
            if len(line) > MAX_EVENT_BYTES or self._held > MAX_EVENT_BYTES:
                raise _event_too_long("NDJSON line")
            line = line.strip()
            if line:
                out.append(json_loads(line, "an upstream NDJSON line", status=502,
                                      unique_keys=False, error=ProtocolError))
        return out


# AWS event-stream framing (Bedrock's InvokeModelWithResponseStream and ConverseStream answers,
# "Amazon Bedrock API reference: ResponseStream"; the layout as botocore/eventstream.py reads it):
#   prelude  total length u32 | headers length u32 | CRC32 of those 8 bytes u32
#   headers  repeated: name length u8 | name | type u8 | value (big-endian, sizes by type)
#   payload  total - headers - 16 bytes
#   CRC32 of everything before it u32
_ES_FIXED = {2: (1, "!b"), 3: (2, "!h"), 4: (4, "!i"), 5: (8, "!q"), 8: (8, "!q")}
# Exception events (:message-type exception) by :exception-type: (status for our client,
# whether another channel may be tried, the HTTP status AWS documents for it).
_ES_EXCEPTIONS = {
    "throttlingException": (429, True, 429),
    "validationException": (400, False, 400),
    "modelStreamErrorException": (502, True, 424),
    "internalServerException": (502, True, 500),
    "serviceUnavailableException": (503, True, 503),
    "modelTimeoutException": (504, True, 408),
}


class EventStreamDecoder:
    """AWS event-stream messages from bytes split anywhere. ``feed`` returns (headers, payload)
    pairs of ``event`` messages; header values are bool, int (byte, short, int, long, and
    timestamps in epoch milliseconds), bytes (byte arrays, UUIDs) or str. Broken framing (a bad
    CRC, a length past MAX_EVENT_BYTES, more than EVENTSTREAM_MAX_HEADERS headers) is a 502
    ProtocolError. An ``exception`` or ``error`` message ends the stream as an UpstreamError:
    raised (once) by the ``feed`` that decodes it, or, when that call has events to return
    first, by the next ``feed`` or ``end``; later bytes are ignored. ``end`` also refuses a
    stream cut inside a message."""

    __slots__ = ("_buf", "_need", "_error", "_closed")

    def __init__(self):
        self._buf = bytearray()
        self._need = 0              # length of the message begun in _buf, once its prelude came
        self._error: UpstreamError | None = None
        self._closed = False

    @staticmethod
    def _fail(why: str) -> ProtocolError:
        return ProtocolError(502, f"upstream sent a bad AWS event-stream: {why}")

    def feed(self, data: bytes) -> list[tuple[dict[str, Any], bytes]]:
        self._raise_pending()
        if self._closed:
            return []
        buf = self._buf
        buf += data
        if len(buf) < (self._need or 12):
            return []
        out: list[tuple[dict[str, Any], bytes]] = []
        view, pos, n = bytes(buf), 0, len(buf)
        while n - pos >= 12:
            total, head_len, crc = struct.unpack_from("!III", view, pos)
            if zlib.crc32(view[pos:pos + 8]) != crc:
                raise self._fail("prelude CRC mismatch")
            if total > MAX_EVENT_BYTES:
                raise _event_too_long("AWS event-stream message")
            if head_len > EVENTSTREAM_MAX_HEADER_BYTES or total < head_len + 16:
                raise self._fail(f"lengths {total}/{head_len} do not fit")
            if n - pos < total:
                break
            message = view[pos:pos + total]
            pos += total
            if zlib.crc32(message[:-4]) != struct.unpack_from("!I", message, total - 4)[0]:
                raise self._fail("message CRC mismatch")
            headers = self._headers(message[12:12 + head_len])
            payload = message[12 + head_len:-4]
            error = eventstream_error(headers, payload)
            if error is not None:
                self._closed = True
                pos = n
                if out:
                    self._error = error
                    break
                buf.clear()
                raise error
            out.append((headers, payload))
        del buf[:pos]
        self._need = struct.unpack_from("!I", buf)[0] if len(buf) >= 12 else 0
        return out

    def end(self) -> None:
        """The upstream's body ended: raises a pending exception event, or a 502 when the
        body stopped inside a message."""
        self._raise_pending()
        if self._buf:
            raise self._fail(f"the stream ended inside a message ({len(self._buf)} bytes)")

    def _raise_pending(self) -> None:
        error, self._error = self._error, None          # raised once: the stream is over
        if error is not None:
            raise error

    def _headers(self, raw: bytes) -> dict[str, Any]:
        headers: dict[str, Any] = {}
        pos, n = 0, len(raw)
        try:
            while pos < n:
                if len(headers) >= EVENTSTREAM_MAX_HEADERS:
                    raise self._fail(f"more than {EVENTSTREAM_MAX_HEADERS} headers")
                size = raw[pos]
                name = raw[pos + 1:pos + 1 + size].decode("utf-8")
                pos += 1 + size
                kind = raw[pos]
                pos += 1
                if size == 0 or pos > n:
                    raise self._fail("a header name is empty or cut")
                if kind in (0, 1):
                    value: Any = kind == 0
                elif kind in _ES_FIXED:
                    width, fmt = _ES_FIXED[kind]
                    if pos + width > n:
                        raise self._fail(f"header {name[:40]!r} is cut")
                    value = struct.unpack_from(fmt, raw, pos)[0]
                    pos += width
                elif kind in (6, 7):
                    (width,) = struct.unpack_from("!H", raw, pos)
                    value = raw[pos + 2:pos + 2 + width]
                    pos += 2 + width
                    if pos > n:
                        raise self._fail(f"header {name[:40]!r} is cut")
                    value = value.decode("utf-8") if kind == 7 else value
                elif kind == 9:
                    value = raw[pos:pos + 16]
                    pos += 16
                    if pos > n:
                        raise self._fail(f"header {name[:40]!r} is cut")
                else:
                    raise self._fail(f"header {name[:40]!r} has unknown type {kind}")
                if name in headers:
                    raise self._fail(f"header {name[:40]!r} is repeated")
                headers[name] = value
        except (IndexError, struct.error):
            raise self._fail("a header is cut") from None
        except UnicodeDecodeError:
            raise self._fail("a header is not UTF-8") from None
        return headers


def eventstream_error(headers: dict[str, Any], payload: bytes) -> UpstreamError | None:
    """The UpstreamError an ``exception`` or ``error`` event-stream message stands for (None
    for other messages). Exception payloads are JSON with a ``message``; error messages carry
    ``:error-code`` and ``:error-message`` headers (botocore/parsers.py reads them the same)."""
    kind = headers.get(":message-type")
    if kind == "exception":
        name = str(headers.get(":exception-type") or "unknown")
        status, retryable, aws_status = _ES_EXCEPTIONS.get(name, (502, True, None))
        try:
            body = json.loads(payload) if payload else {}
        except (ValueError, RecursionError):
            body = {}
        text = body.get("message") or body.get("Message") if isinstance(body, dict) else None
        if not isinstance(text, str) or not text:
            text = payload[:200].decode("utf-8", "replace") or "(no message)"
    elif kind == "error":
        name = str(headers.get(":error-code") or "unknown")
        status, retryable, aws_status = _ES_EXCEPTIONS.get(name[:1].lower() + name[1:],
                                                          (502, True, None))
        text = str(headers.get(":error-message") or "(no message)")
    else:
        return None
    return UpstreamError(status, f"upstream stream failed: {name[:100]}: {text[:1000]}",
                         retryable=retryable, upstream_status=aws_status, code=name[:100])


def _end_of(buf: bytes, sep: bytes, start: int = 0) -> int:
    """Offset just past the last ``sep`` in ``buf`` that begins at ``start`` or later, or 0."""
    i = buf.rfind(sep, start if start > 0 else 0)
    return i + len(sep) if i >= 0 else 0


def sse_events_end(buf: bytes) -> int:
    """Offset just past the last whole SSE event in ``buf`` (its blank line: LF LF, CRLF CRLF or
    CR CR), or 0. An end of another kind that ends past the last LF LF begins no earlier than 3
    bytes before that one's end, so the usual stream (LF line ends) searches the whole buffer
    for one only."""
    cut = _end_of(buf, b"\n\n")
    return max(cut, _end_of(buf, b"\r\n\r\n", cut - 3), _end_of(buf, b"\r\r", cut - 1))


_USAGE_NULL_RX = re.compile(rb'"usage(?:Metadata)?"[ \t]*:[ \t]*null')
# re's search for a literal without the quote: JSON's many quotes each start a false match of
# '"usage' (timeit, the benchmark's 55 KB OpenAI burst: 18.6 us against 31.6 with the quote, 26.2
# for `in`; one 276-byte event 0.29 us against 0.39). A text that says "usage" costs a _sniff.
_USAGE_KEY_RX = re.compile(rb'usage')


class SSEPassthrough:
    """Passes an SSE byte stream on whole events at a time, so that a stream cut by an upstream
    failure never leaves a half event before the in-band error event, and notes the token usage
    the events report, read by ``usage`` (one event's usage in the IR form, or None: the
    client dialect's parser, section 9). Costs one concatenation and two searches per read; JSON
    is parsed only in events that mention usage."""

    __slots__ = ("_carry", "open", "usage", "_usage")

    def __init__(self, usage: Callable[[Any], dict | None] = lambda obj: None):
        self._usage = usage
        self._carry = b""
        self.open = 0               # bytes of an event flushed unsplit, still without its end
        self.usage: dict[str, int] | None = None

    @property
    def input_tokens(self) -> int | None:
        return None if self.usage is None else self.usage["input"]

    @property
    def output_tokens(self) -> int | None:
        return None if self.usage is None else self.usage["output"]

    def feed(self, data: bytes) -> bytes:
        """Raises a 502 ProtocolError once one event runs past MAX_EVENT_BYTES."""
        buf = self._carry + data if self._carry else data
        cut = sse_events_end(buf)
        if cut == 0:
            if len(buf) > SSE_CARRY_LIMIT:
                self.open += len(buf)
                if self.open > MAX_EVENT_BYTES:
                    raise _event_too_long("SSE event")
                cut = len(buf)
            else:
                self._carry = buf
                return b""
        else:
            self.open = 0
        ready, self._carry = buf[:cut], buf[cut:]
        if _USAGE_KEY_RX.search(ready):           # "usage" and Gemini's "usageMetadata"
            self._sniff(ready)
        return ready

    def flush(self) -> bytes:
        rest, self._carry = self._carry, b""
        return rest

    def _sniff(self, ready: bytes) -> None:
        """Parses the data lines that mention a usage that is not null, found by search (a
        stream that sends "usage":null in every event parses none of them)."""
        at, lo = ready.find(b'"usage'), 0
        while at >= 0:
            if _USAGE_NULL_RX.match(ready, at):
                at = ready.find(b'"usage', at + 6)
                continue
            start = max(ready.rfind(b"\n", lo, at), ready.rfind(b"\r", lo, at), lo - 1) + 1
            end = ready.find(b"\n", at)
            end = len(ready) if end < 0 else end
            cr = ready.find(b"\r", at, end)
            lo = end = cr if cr >= 0 else end
            line = ready[start:end]
            at = ready.find(b'"usage', end)
            if line.startswith(b"data:"):
                try:
                    found = self._usage(json_loads(line[5:], "an upstream event",
                                                   status=502, unique_keys=False))
                except GatewayError:
                    continue
                if found:
                    # Anthropic reports input in message_start and output in message_delta.
                    if self.usage is None:
                        self.usage = found
                    else:
                        self.usage.update((k, v) for k, v in found.items() if v)


# =================================================================================================
# 6. Stream helpers
# =================================================================================================
# Reading and writing asyncio streams under time limits: request heads (readuntil, whose
# LimitOverrunError tells an oversized head apart from a closed connection), bodies in each
# framing, drained writes, and the Watchdog that gives up on a silent peer. Sections 7 and 8 read
# and write through these; only section 8's keep-alive pinger and 413 linger touch a stream
# themselves.

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


def body_cut_short(status: int, left: int) -> ProtocolError:
    """The error of a body framed by its length whose connection closed ``left`` bytes early."""
    return ProtocolError(status, f"connection closed with {left} body bytes still to come")


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
                    raise body_cut_short(error_status, left)
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
    """A whole body (iter_body's). One no larger than a read (the usual request) is read in
    one call, with the one wait for it that iter_body would allow."""
    if mode == "length" and length <= READ_SIZE:
        watchdog.arm(idle_timeout)
        try:
            return await reader.readexactly(length)
        except asyncio.IncompleteReadError as exc:
            raise body_cut_short(kw.get("error_status", 400), length - len(exc.partial)) \
                from None
        finally:
            watchdog.disarm()
    parts = [p async for p in iter_body(reader, watchdog, mode, length, idle_timeout, **kw)]
    return parts[0] if len(parts) == 1 else b"".join(parts)


async def write_and_drain(writer: asyncio.StreamWriter, data: bytes,
                          timeout: float | None = None) -> None:
    """Write; wait for the peer to read only when our send buffer is getting full (a peer that
    reads nothing for ``timeout``, by default WRITE_TIMEOUT as it is at the call, raises
    TimeoutError). A closed peer raises at once."""
    transport = writer.transport
    if transport.is_closing():
        raise ConnectionResetError("peer closed the connection")
    writer.write(data)
    if transport.get_write_buffer_size() > READ_SIZE:
        await timed(writer.drain(), WRITE_TIMEOUT if timeout is None else timeout)


def abort_connection(writer: asyncio.StreamWriter) -> None:
    """Drop the connection now with a reset (SO_LINGER 0): data still queued for the peer, in
    our buffer or the kernel's, is discarded instead of waiting for a peer that does not read."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()


async def filtered_bytes(chunks: AsyncIterator[bytes], filt: Any) -> AsyncIterator[bytes]:
    """``chunks`` through a byte filter (``feed(bytes) -> bytes``, ``end()``, such as
    BedrockInvokeStream): what it makes of each piece, as the pieces arrive. ``end`` raises
    when the body ended inside a frame, or returns the bytes the filter still held."""
    async for data in chunks:
        out = filt.feed(data)
        if out:
            yield out
    rest = filt.end()                   # what a filter still held, if it holds any
    if rest:
        yield rest


async def close_writer(writer: asyncio.StreamWriter, timeout: float = 1.0) -> None:
    """Close, waiting at most ``timeout`` for unsent data to go out; a peer that does not take
    it (a client that stopped reading) gets its connection aborted, so no socket stays open."""
    try:
        writer.close()
        await timed(writer.wait_closed(), timeout)
    except (TimeoutError, asyncio.CancelledError):
        abort_connection(writer)
    except (OSError, ssl.SSLError):
        pass


# =================================================================================================
# 7. Upstream HTTP client
# =================================================================================================
# A pool keyed by (scheme, host, port, proxy, verify_tls) recycles a connection only when its
# response was read to the end and neither side asked to close. TLS uses the system CA store.
# Sockets set TCP_NODELAY, and on Linux ask for an immediate ACK before each read (_Conn).
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


@functools.lru_cache(maxsize=NAME_CACHE_SIZE)        # a channel's few URLs, split per request
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


# Linux only (macOS and Windows have no such option; their delayed ACK stays as it is).
_TCP_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)


class _Conn:
    __slots__ = ("reader", "writer", "key", "idle_since", "watchdog", "_sock")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, key: tuple,
                 sock: Any = None):
        self.reader, self.writer, self.key = reader, writer, key
        self.idle_since = 0.0
        self.watchdog = Watchdog(reader)
        self._sock = sock if _TCP_QUICKACK is not None else None

    def ack_at_once(self) -> None:
        """Have the kernel acknowledge the next bytes from the upstream at once. A server that
        leaves Nagle's algorithm on (no TCP_NODELAY: HAProxy's default, some inference servers)
        sends a small write only once the one before is acknowledged, and on a reused connection
        Linux delays that ACK by 40 ms or more: every event of a stream, and the end of every
        answer, would wait for it. TCP_QUICKACK does not last, so it is asked for before each
        read (one setsockopt)."""
        if self._sock is not None:
            try:
                self._sock.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)
            except OSError:
                self._sock = None

    def usable(self, now: float) -> bool:
        return (not self.writer.transport.is_closing() and not self.reader.at_eof()
                and now - self.idle_since < POOL_IDLE_TTL)

    def close(self) -> None:
        self.watchdog.close()
        try:
            self.writer.close()
        except (OSError, RuntimeError):
            pass


async def _sock_recv_exactly(loop: asyncio.AbstractEventLoop, sock: socket.socket,
                             n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        data = await loop.sock_recv(sock, n - len(buf))
        if not data:
            raise ConnectionError("proxy closed the connection during the handshake")
        buf += data
    return buf


def interleave_families(infos: list[tuple]) -> list[tuple]:
    """getaddrinfo results with the address families taking turns (IPv6, IPv4, IPv6, ... when
    the resolver put IPv6 first), each family in the resolver's order (RFC 8305 section 4)."""
    by_family: dict[int, list[tuple]] = {}
    for info in infos:
        by_family.setdefault(info[0], []).append(info)
    return [info for turn in itertools.zip_longest(*by_family.values()) for info in turn
            if info is not None]


async def _connect_one(info: tuple) -> socket.socket:
    family, type_, proto, _, addr = info
    sock = socket.socket(family, type_, proto)
    try:
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, addr)
    except BaseException:
        sock.close()
        raise
    return sock


async def _open_socket(hosts: tuple[str, ...], port: int, *, numeric: bool = False
                       ) -> socket.socket:
    """A TCP connection to the first address of ``hosts`` that answers ("Happy Eyeballs", RFC
    8305): names are resolved (``numeric``: only addresses, no lookup), the families take turns,
    and each next address (of the first CONNECT_ADDRESSES_MAX) is tried HAPPY_EYEBALLS_DELAY
    after the one before, or as soon as it failed, while the earlier ones keep trying. So an
    address that drops packets (a broken IPv6 route, a dead host of several) costs a quarter of a
    second, not the whole connect timeout. Raises the last address's error when none answered."""
    loop = asyncio.get_running_loop()
    flags = socket.AI_NUMERICHOST if numeric else 0
    infos: list[tuple] = []
    for host in hosts:
        infos += await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=flags)
    todo = iter(interleave_families(infos)[:CONNECT_ADDRESSES_MAX])
    following = next(todo, None)
    racing: set[asyncio.Task] = set()
    error: OSError = OSError(f"no address for {', '.join(hosts)}")
    try:
        while following is not None or racing:
            if following is not None:
                racing.add(asyncio.ensure_future(_connect_one(following)))
                following = next(todo, None)
            done, racing = await asyncio.wait(
                racing, timeout=HAPPY_EYEBALLS_DELAY if following is not None else None,
                return_when=asyncio.FIRST_COMPLETED)
            winner = None
            for task in done:
                exc = task.exception()
                if exc is None and winner is None:
                    winner = task.result()
                elif exc is None:
                    task.result().close()               # a second one in the same instant
                elif isinstance(exc, OSError):
                    error = exc
                else:
                    raise exc
            if winner is not None:
                return winner
        raise error
    finally:
        for task in racing:
            if not task.done():
                task.cancel()                           # it closes its own socket
            elif not task.cancelled() and task.exception() is None:
                task.result().close()                   # connected as another one won


async def _http_connect_tunnel(proxy: urllib.parse.SplitResult, t: _Target) -> socket.socket:
    loop = asyncio.get_running_loop()
    sock = await _open_socket((proxy.hostname or "",), proxy.port or 8080)
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
    sock = await _open_socket((proxy.hostname or "",), proxy.port or 1080)
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
        try:
            ip: Any = ipaddress.ip_address(t.host)
        except ValueError:
            ip = None
        if ip is None and proxy.scheme == "socks5h":
            name = t.host.encode("idna")
            addr = bytes([3, len(name)]) + name
        else:
            if ip is None:
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
        self._kept: bytes | None = None
        self.tap: Callable[[bytes], None] | None = None   # sees the decoded body as it is read

    async def keep_body(self, limit: int) -> bytes:
        """Read the body (at most ``limit`` bytes) and keep it, so that a later ``read`` or
        ``iter_bytes`` gives the same bytes again (an error body looked at before answering)."""
        if self._kept is None:
            self._kept = await self.read(limit)
        return self._kept

    @property
    def finished(self) -> bool:
        """True once the body was read to its end."""
        return self._done

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type") or ""

    def _inflate(self, data: bytes) -> Iterable[bytes]:
        """The decoded pieces of compressed ``data``, each at most DECODE_PIECE bytes: zlib is
        asked for bounded output and fed its unconsumed tail again, so a bomb (a few KiB that
        inflate to GiBs) is passed on piece by piece, never inflated whole in memory."""
        while data:
            dec = self._decoder
            try:
                out = dec.decompress(data, DECODE_PIECE)            # type: ignore[union-attr]
            except zlib.error:
                if self._deflate_raw_tried or dec.unused_data:      # type: ignore[union-attr]
                    raise ProtocolError(502, "upstream sent a corrupt compressed body") from None
                # "deflate" is sometimes sent raw, without the zlib wrapper (RFC 9110 8.4.1.2).
                self._deflate_raw_tried = True
                self._decoder = zlib.decompressobj(-zlib.MAX_WBITS)
                continue
            if out:
                yield out
            data = dec.unconsumed_tail                              # type: ignore[union-attr]

    async def iter_bytes(self) -> AsyncIterator[bytes]:
        if self._kept is not None:
            kept, self._kept = self._kept, b""
            if kept:
                yield kept
            return
        conn = self._conn
        if conn is None:
            return
        overrun: list[bytes] = []
        try:
            async for data in iter_body(conn.reader, conn.watchdog, self._mode, self._length,
                                        self._idle, error_status=502, exact=False,
                                        overrun=overrun):
                if self._decoder is None:
                    yield self._tapped(data)
                else:
                    for out in self._inflate(data):
                        yield self._tapped(out)
                conn.ack_at_once()             # once the piece is passed on, before the next read
            if self._decoder is not None:
                tail = self._decoder.flush()
                if tail:
                    yield self._tapped(tail)
            self._done = True
            self._keep = self._keep and not overrun
        except (TimeoutError, ProtocolError, OSError, asyncio.IncompleteReadError) as exc:
            raise self._broken(exc) from None
        finally:
            self.aclose_nowait()

    def _broken(self, exc: BaseException) -> UpstreamError:
        """The error of a body read that failed: silent past the idle timeout, bad framing, or a
        broken connection."""
        if isinstance(exc, TimeoutError):
            return UpstreamError(504, f"upstream went silent for {self._idle:g} s mid-answer",
                                 retryable=True)
        if isinstance(exc, ProtocolError):
            return UpstreamError(502, exc.message, retryable=True)
        return UpstreamError(502, f"upstream connection failed mid-answer: "
                                  f"{_os_error_text(exc)}", retryable=True)

    async def _read_small(self, conn: _Conn) -> bytes:
        """A body of at most READ_SIZE bytes framed by its length and not compressed (the usual
        whole JSON answer of an upstream that does not compress), read in one call instead of
        through iter_bytes' stages; the idle timeout covers it whole."""
        try:
            conn.ack_at_once()
            conn.watchdog.arm(self._idle)
            try:
                data = await conn.reader.readexactly(self._length)
            except asyncio.IncompleteReadError as exc:
                raise body_cut_short(502, self._length - len(exc.partial)) from None
            finally:
                conn.watchdog.disarm()
            self._done = True
        except (TimeoutError, ProtocolError, OSError) as exc:
            raise self._broken(exc) from None
        finally:
            self.aclose_nowait()
        return data

    def _tapped(self, data: bytes) -> bytes:
        if self.tap is not None:
            self.tap(data)
        return data

    async def read(self, limit: int | None = None) -> bytes:
        """The decoded body. With ``limit``: its first ``limit`` bytes, the rest left unread.
        Without: the whole body, or a 502 UpstreamError once it (decoded) passes the client's
        ``max_response``."""
        conn = self._conn
        if conn is not None and self._mode == "length" and self._length <= READ_SIZE and \
                limit is None and self._kept is None and self._decoder is None and \
                self.tap is None:
            return await self._read_small(conn)
        cap = self._client.max_response if limit is None else None
        parts, size = [], 0
        async for data in self.iter_bytes():
            parts.append(data)
            size += len(data)
            if limit is not None and size >= limit:
                break
            if cap is not None and size > cap:
                self.aclose_nowait()
                raise UpstreamError(502, f"upstream answer larger than the "
                                         f"{cap / (1024 * 1024):g} MiB limit "
                                         f"(settings.max_response_mb)", retryable=False)
        self.aclose_nowait()
        body = b"".join(parts)
        return body[:limit] if limit is not None and size > limit else body

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

    def __init__(self, max_response: int = DEFAULT_MAX_RESPONSE_MB * 1024 * 1024):
        self._idle: dict[tuple, list[_Conn]] = {}
        self._closed = False
        self.max_response = max_response      # bytes: the cap on a whole answer read at once

    async def request(self, method: str, url: str, headers: list[tuple[str, str]],
                      body: bytes = b"", *, proxy: str = "", verify_tls: bool = True,
                      timeout: float = DEFAULT_CHANNEL_TIMEOUT,
                      connect_timeout: float = CONNECT_TIMEOUT,
                      connect_to: tuple[str, ...] = ()) -> UpstreamResponse:
        """``connect_to``: addresses already resolved (and checked) for the URL's host; the
        connection goes to one of them, directly or through the proxy, with no second name
        lookup, while Host, TLS SNI and the certificate check keep the URL's name."""
        t = split_url(url)
        p = parse_proxy(proxy)
        key = (t.scheme, t.host, t.port, proxy, verify_tls, connect_to)
        absolute = p is not None and p.scheme == "http" and t.scheme == "http" and not connect_to
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
                conn = await self._connect(t, p, key, verify_tls, connect_timeout, connect_to)
            try:
                await write_and_drain(conn.writer, head + body if len(body) < READ_SIZE else head,
                                      timeout)
                if len(body) >= READ_SIZE:
                    await write_and_drain(conn.writer, body, timeout)
                conn.ack_at_once()
                # Each head, once its first byte came, is whole within UPSTREAM_HEAD_TIMEOUT;
                # interim heads (100 Continue, 103 Early Hints) do not extend ``timeout``.
                deadline = time.monotonic() + timeout
                raw = await read_head(conn.reader, conn.watchdog, timeout,
                                      min(timeout, UPSTREAM_HEAD_TIMEOUT), too_large_status=502)
                if raw is None and not fresh and attempt == 0:
                    conn.close()              # a pooled connection the server had closed: retry
                    continue
                if raw is None:
                    raise UpstreamError(502, "upstream closed the connection without answering",
                                        retryable=True)
                version, status, reason, rh = parse_response_head(raw)
                while 100 <= status < 200:                       # 100 Continue, 103 Early Hints
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError
                    try:
                        raw = await read_head(conn.reader, conn.watchdog, left,
                                              min(left, UPSTREAM_HEAD_TIMEOUT),
                                              too_large_status=502)
                    except ProtocolError as exc:       # cut by the answer's deadline: a 504
                        if exc.status == 408 and left < UPSTREAM_HEAD_TIMEOUT:
                            raise TimeoutError from None
                        raise
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
                       verify_tls: bool, connect_timeout: float,
                       connect_to: tuple[str, ...] = ()) -> _Conn:
        try:
            reader, writer = await timed(self._open(t, p, verify_tls, connect_to),
                                         connect_timeout)
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
        return _Conn(reader, writer, key, sock)

    @staticmethod
    async def _open(t: _Target, p: urllib.parse.SplitResult | None, verify_tls: bool,
                    connect_to: tuple[str, ...] = ()
                    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        ctx = tls_context(verify_tls) if t.scheme == "https" else None
        hostname = t.host if ctx else None
        if p is None:                       # pinned addresses are connected to, not resolved
            sock = await _open_socket(connect_to or (t.host,), t.port, numeric=bool(connect_to))
        elif p.scheme == "http" and t.scheme == "http" and not connect_to:
            sock = await _open_socket((p.hostname or "",), p.port or 8080)
        else:
            tunnel = _socks5_tunnel if p.scheme.startswith("socks5") else _http_connect_tunnel
            # The proxy is handed the checked address, never the name: it cannot resolve it anew.
            sock = await tunnel(p, _Target(t.scheme, connect_to[0], t.port, t.path)
                                if connect_to else t)
        try:
            return await asyncio.open_connection(sock=sock, ssl=ctx, server_hostname=hostname,
                                                 limit=MAX_HEAD_BYTES)
        except BaseException:
            sock.close()
            raise

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


# -- URLs fetched on a client's behalf (SSRF) -----------------------------------------------------
# A client may name an image or PDF by URL that the gateway must fetch itself (for channels that
# take only inline bytes). Only http(s); the host is resolved here, the way the system resolver
# reads it (so 2130706433, 0x7f.1, 127.1 and 0177.0.0.1 all mean 127.0.0.1), every address is
# judged by address_refusal, and the connection goes to a checked address (no second lookup that
# a rebinding DNS server could answer differently). Redirects are followed up to
# FETCH_MAX_REDIRECTS, each target checked the same way; size, total time and content type are
# capped. Messages name the host only, never the path or query (which may hold a signed token).

async def resolve_for_fetch(host: str, port: int) -> list[tuple[str, str | None]]:
    """Every address ``host`` means to this machine's resolver, each with the reason a fetch
    may not connect to it (None: public)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    found = dict.fromkeys(info[4][0] for info in infos)
    return [(addr, address_refusal(ipaddress.ip_address(addr))) for addr in found]


def media_type_accepted(media_type: str, accept: tuple[str, ...]) -> bool:
    """``accept`` holds exact types ("application/pdf") and prefixes ("image/")."""
    return any(media_type.startswith(a) if a.endswith("/") else media_type == a for a in accept)


class UrlFetcher:
    """Fetches client-named URLs with the SSRF checks above. ``resolve`` (host, port) -> [(address,
    refusal or None)] and ``timeout`` are attributes so that tests can replace them."""

    def __init__(self, client: UpstreamClient):
        self.client = client
        self.resolve: Callable[[str, int], Any] = resolve_for_fetch     # a coroutine function
        self.timeout = FETCH_TIMEOUT

    async def fetch(self, url: str, *, what: str, accept: tuple[str, ...], allow_private: bool,
                    proxy: str = "") -> tuple[str, bytes]:
        """(media type, body) of ``url``, or a GatewayError 400 naming ``what`` and the host.
        ``allow_private`` (settings.fetch_private_urls) skips the address checks: the name is
        then resolved by the connection (or the proxy) as for any upstream."""
        hosts = [_fetch_host(url, what)[1]]         # the first host, then each one tried
        try:
            return await timed(self._fetch(url, what, accept, allow_private, proxy, hosts),
                               self.timeout)
        except TimeoutError:
            raise GatewayError(400, f"cannot fetch {what} from host '{hosts[-1]}': no complete "
                                    f"answer within {self.timeout:g} s") from None

    async def _fetch(self, url: str, what: str, accept: tuple[str, ...], allow_private: bool,
                     proxy: str, hosts: list[str]) -> tuple[str, bytes]:
        headers = [("Accept", ", ".join(a + "*" if a.endswith("/") else a for a in accept)),
                   ("Accept-Encoding", "identity")]
        for _ in range(FETCH_MAX_REDIRECTS + 1):
            target, host, port = _fetch_host(url, what)
            hosts.append(host)
            where = f"cannot fetch {what} from host '{host}'"
            addrs = () if allow_private else await self._checked(host, port, where)
            try:
                # Per-read timeouts a little past the total one, which ends the fetch first.
                up = await self.client.request("GET", target, headers, proxy=proxy,
                                               timeout=self.timeout + 1, connect_to=addrs)
            except UpstreamError as exc:
                raise GatewayError(400, f"{where}: {exc.message}") from None
            try:
                if up.status in (301, 302, 303, 307, 308):
                    location = up.headers.get("location")
                    if not location:
                        raise GatewayError(400, f"{where}: redirect {up.status} without Location")
                    url = urllib.parse.urljoin(target, location.strip())
                    continue
                return await self._body(up, where, accept)
            finally:
                up.aclose_nowait()
        raise GatewayError(400, f"cannot fetch {what} from host '{hosts[0]}': more than "
                                f"{FETCH_MAX_REDIRECTS} redirects")

    async def _checked(self, host: str, port: int, where: str) -> tuple[str, ...]:
        try:
            found = await self.resolve(host, port)
        except (OSError, ValueError) as exc:
            raise GatewayError(400, f"{where}: {_os_error_text(exc)}") from None
        # One private answer refuses the name: a name that mixes public and private addresses
        # is a rebinding setup or an internal host, and either way not for a client to reach.
        for addr, why in found:
            if why is not None:
                raise GatewayError(400, f"{where}: it resolves to {addr}, a {why} address; the "
                                        f"gateway fetches such addresses only when "
                                        f"settings.fetch_private_urls is true")
        if not found:
            raise GatewayError(400, f"{where}: the name has no address")
        return tuple(addr for addr, _ in found)

    @staticmethod
    async def _body(up: UpstreamResponse, where: str, accept: tuple[str, ...]
                    ) -> tuple[str, bytes]:
        if up.status != 200:
            raise GatewayError(400, f"{where}: it answered {up.status}")
        media = up.content_type.split(";")[0].strip().lower()
        if not media_type_accepted(media, accept):
            raise GatewayError(400, f"{where}: its content type {media[:80] or '(none)'!r} is "
                                    f"not one of {', '.join(accept)}")
        size = up.headers.get("content-length") or ""
        too_large = is_digits(size) and int(size) > MAX_IMAGE_BYTES
        data = b"" if too_large else await up.read(MAX_IMAGE_BYTES + 1)     # stops past the cap
        if too_large or len(data) > MAX_IMAGE_BYTES:
            raise GatewayError(400, f"{where}: larger than {MAX_IMAGE_BYTES // 2**20} MiB")
        return media, data


_URL_SAFE = "/%:@!$&'()*+,;=-._~"     # RFC 3986 pchar: kept; spaces, controls, non-ASCII: escaped


def _fetch_host(url: str, what: str) -> tuple[str, str, int]:
    """(URL to request, host in ASCII without a trailing dot, port) of a client-named URL, or a
    GatewayError 400: only http and https, whatever settings.fetch_private_urls says."""
    try:
        u = urllib.parse.urlsplit(url)
        port = u.port
        host = u.hostname or ""
        if ":" not in host:
            host = host.encode("idna").decode("ascii").lower()
        if not host.isprintable() or " " in host:
            raise ValueError("control character or space in the host")
    except (ValueError, UnicodeError):
        raise GatewayError(400, f"cannot fetch {what}: the URL's host or port is not valid") \
            from None
    host = host[:-1] if host.endswith(".") else host
    scheme = u.scheme.lower()
    if scheme not in ("http", "https"):
        raise GatewayError(400, f"cannot fetch {what} from host '{host[:100] or '(none)'}': "
                                f"scheme {scheme[:20] + ':'!r} is not fetched, only http: and "
                                f"https: (settings.fetch_private_urls does not change this)")
    if not host:
        raise GatewayError(400, f"cannot fetch {what}: the URL has no host")
    port = port or (443 if scheme == "https" else 80)
    authority = _host_header(_Target(scheme, host, port, ""))
    path = urllib.parse.quote(u.path or "/", safe=_URL_SAFE)
    query = urllib.parse.quote(u.query, safe=_URL_SAFE + "?")
    return f"{scheme}://{authority}{path}{'?' + query if query else ''}", host, port


# -------------------------------------------------------------------------------------------------
# Upstream credentials: AWS Signature Version 4, Google service-account tokens (RS256 JWT)
# -------------------------------------------------------------------------------------------------

# Headers botocore leaves out of a signature (botocore/auth.py SIGNED_HEADERS_BLACKLIST): proxies
# and the HTTP layer may change them on the way.
_SIGV4_UNSIGNED = frozenset((
    "authorization", "connection", "expect", "keep-alive", "proxy-authenticate",
    "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade", "user-agent",
    "x-amzn-trace-id", "host", "content-length"))


def _sigv4_path(path: str) -> str:
    """The canonical URI of a request path: dot segments and empty segments removed, then the
    path (already percent-encoded on the wire) encoded once more. AWS's "Create a canonical
    request" asks every service but S3 for this double encoding; botocore does the same
    (SigV4Auth._normalize_url_path: quote(remove_dot_segments(path), safe='/~')), so a Bedrock
    model id ``...-v1:0`` sent as ``...-v1%3A0`` is signed as ``...-v1%253A0``."""
    parts: list[str] = []
    for seg in path.split("/"):
        if seg == "..":
            if parts:
                parts.pop()
        elif seg and seg != ".":
            parts.append(seg)
    out = "/" + "/".join(parts)
    if path.endswith("/") and parts:
        out += "/"
    return urllib.parse.quote(out, safe="/~")


def _sigv4_query(query: str) -> str:
    """The canonical query string: each name and value percent-encoded with only unreserved
    characters kept, pairs sorted by name, then value (AWS "Create a canonical request")."""
    pairs = []
    for pair in query.split("&"):
        if pair:
            name, _, value = pair.partition("=")
            pairs.append((urllib.parse.quote(urllib.parse.unquote(name), safe="-_.~"),
                          urllib.parse.quote(urllib.parse.unquote(value), safe="-_.~")))
    return "&".join(f"{k}={v}" for k, v in sorted(pairs))


def sigv4_headers(method: str, url: str, headers: list[tuple[str, str]], body: bytes, *,
                  region: str, service: str, access_key: str, secret_key: str,
                  session_token: str | None = None, now: float | None = None
                  ) -> list[tuple[str, str]]:
    """The headers that sign a request with AWS Signature Version 4: X-Amz-Date,
    X-Amz-Security-Token (temporary credentials only) and Authorization, to add to ``headers``.
    Signed: Host (as UpstreamClient sends it), the X-Amz ones and every header in ``headers``
    but those botocore leaves out. No X-Amz-Content-Sha256: botocore's SigV4Auth sends it
    only for unsigned payloads, and no bedrock-runtime operation has one (its service model
    marks none ``unsignedPayload``); the body's SHA-256 is still part of the signature.
    Bedrock's signing name is ``bedrock`` (service model ``signingName``), not the host's
    ``bedrock-runtime``. ``now``: epoch seconds, for tests."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))
    day = stamp[:8]
    added = [("X-Amz-Date", stamp)]
    if session_token:
        added.append(("X-Amz-Security-Token", session_token))
    u = urllib.parse.urlsplit(url)
    signed: dict[str, list[str]] = {"host": [_host_header(split_url(url))]}
    for name, value in headers + added:
        key = name.lower()
        if key not in _SIGV4_UNSIGNED:
            signed.setdefault(key, []).append(" ".join(value.split()))
    names = sorted(signed)
    canonical = "\n".join([
        method.upper(), _sigv4_path(u.path or "/"), _sigv4_query(u.query),
        "".join(f"{k}:{','.join(signed[k])}\n" for k in names), ";".join(names),
        hashlib.sha256(body).hexdigest()])
    scope = f"{day}/{region}/{service}/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", stamp, scope,
                         hashlib.sha256(canonical.encode()).hexdigest()])
    key = f"AWS4{secret_key}".encode()
    for part in (day, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    added.append(("Authorization", f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, "
                                   f"SignedHeaders={';'.join(names)}, Signature={signature}"))
    return added


# RSA private keys come as PEM: PKCS#8 "PRIVATE KEY" (what Google's service-account files hold)
# wrapping PKCS#1 "RSA PRIVATE KEY" (RFC 5208, RFC 8017 appendix A.1.2). A small strict DER
# reader: definite minimal lengths, nothing past an element's end, integers minimal.
_PEM_RX = re.compile(r"-----BEGIN ((?:RSA |ENCRYPTED )?PRIVATE KEY)-----\s*([A-Za-z0-9+/=\s]*?)"
                     r"-----END \1-----")
_OID_RSA_ENCRYPTION = bytes.fromhex("2a864886f70d010101")            # 1.2.840.113549.1.1.1
# DER of DigestInfo for SHA-256 up to the digest (RFC 8017 section 9.2, note 1).
_SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")


@dataclass(frozen=True)
class RSAKey:
    """An RSA private key with its CRT values (RFC 8017 section 3.2, second form)."""
    n: int
    e: int
    d: int
    p: int
    q: int
    dp: int
    dq: int
    qinv: int


def _der(data: bytes, pos: int, tag: int, what: str) -> tuple[bytes, int]:
    """(content, position after) of the DER element tagged ``tag`` at ``pos``."""
    if pos + 2 > len(data) or data[pos] != tag:
        raise ValueError(f"expected {what}")
    length, pos = data[pos + 1], pos + 2
    if length & 0x80:
        count = length & 0x7F
        if not 1 <= count <= 4 or pos + count > len(data) or data[pos] == 0:
            raise ValueError(f"bad length of {what}")
        length = int.from_bytes(data[pos:pos + count], "big")
        pos += count
        if length < 0x80:
            raise ValueError(f"bad length of {what}")
    if pos + length > len(data):
        raise ValueError(f"{what} runs past its end")
    return data[pos:pos + length], pos + length


def _der_int(data: bytes, pos: int, what: str) -> tuple[int, int]:
    raw, pos = _der(data, pos, 0x02, what)
    if not raw or len(raw) > 1 and (raw[0] == 0 and raw[1] < 0x80
                                     or raw[0] == 0xFF and raw[1] >= 0x80):
        raise ValueError(f"bad integer encoding of {what}")
    return int.from_bytes(raw, "big", signed=True), pos


def _rsa_pkcs1(der: bytes) -> RSAKey:
    seq, end = _der(der, 0, 0x30, "RSAPrivateKey")
    if end != len(der):
        raise ValueError("data after the RSAPrivateKey")
    version, pos = _der_int(seq, 0, "the RSAPrivateKey version")
    if version != 0:
        raise ValueError("multi-prime RSA keys are not supported")
    values = []
    for what in ("n", "e", "d", "p", "q", "dP", "dQ", "qInv"):
        value, pos = _der_int(seq, pos, f"the RSA {what}")
        if value <= 0:
            raise ValueError(f"the RSA {what} is not positive")
        values.append(value)
    if pos != len(seq):
        raise ValueError("data after the RSA values")
    key = RSAKey(*values)
    if key.p * key.q != key.n or key.n.bit_length() < 2048:
        raise ValueError("n is not p*q, or is shorter than the 2048 bits RS256 requires "
                         "(RFC 7518 section 3.3)")
    return key


def rsa_private_key(pem: str) -> RSAKey:
    """The RSA key in PEM text (PKCS#8 or PKCS#1), or a ValueError saying what is wrong; the
    message never quotes the key."""
    if len(pem) > MAX_KEY_PEM:
        raise ValueError(f"the key is longer than {MAX_KEY_PEM // 1024} KiB")
    m = _PEM_RX.search(pem)
    if m is None:
        raise ValueError("no '-----BEGIN PRIVATE KEY-----' ... '-----END PRIVATE KEY-----' "
                         "block")
    if m.group(1).startswith("ENCRYPTED"):
        raise ValueError("the key is encrypted; a service-account key file holds it unencrypted")
    try:
        der = base64.b64decode("".join(m.group(2).split()), validate=True)
    except ValueError:
        raise ValueError("the PEM block is not valid base64") from None
    if m.group(1) == "RSA PRIVATE KEY":
        return _rsa_pkcs1(der)
    seq, end = _der(der, 0, 0x30, "PrivateKeyInfo")
    if end != len(der):
        raise ValueError("data after the PrivateKeyInfo")
    version, pos = _der_int(seq, 0, "the PrivateKeyInfo version")
    if version not in (0, 1):                       # 1: OneAsymmetricKey (RFC 5958)
        raise ValueError(f"unknown PrivateKeyInfo version {version}")
    algorithm, pos = _der(seq, pos, 0x30, "the key algorithm")
    oid, _ = _der(algorithm, 0, 0x06, "the key algorithm OID")
    if oid != _OID_RSA_ENCRYPTION:
        raise ValueError("not an RSA key (RS256 needs one)")
    inner, _ = _der(seq, pos, 0x04, "the private key")
    return _rsa_pkcs1(inner)


def rs256_sign(key: RSAKey, data: bytes) -> bytes:
    """RSASSA-PKCS1-v1_5 with SHA-256 (RFC 8017 section 8.2.1; JWS "RS256", RFC 7518 3.3).
    The private operation uses the CRT (about 3x faster than ``pow(m, d, n)``) and is checked
    with the public exponent, so a fault never releases a signature that leaks the key."""
    size = (key.n.bit_length() + 7) // 8
    digest = _SHA256_DIGEST_INFO + hashlib.sha256(data).digest()
    m = int.from_bytes(b"\x00\x01" + b"\xff" * (size - len(digest) - 3) + b"\x00" + digest,
                       "big")
    s1, s2 = pow(m, key.dp, key.p), pow(m, key.dq, key.q)
    s = s2 + (key.qinv * (s1 - s2) % key.p) * key.q
    if pow(s, key.e, key.n) != m:
        raise ValueError("the RSA key's CRT values do not match it")
    return s.to_bytes(size, "big")


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


GOOGLE_TOKEN_URI = "https://oauth2.googleapis.com/token"
GOOGLE_SCOPE = "https://www.googleapis.com/auth/cloud-platform"
GOOGLE_JWT_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"       # RFC 7523 section 2.1


@dataclass(frozen=True)
class ServiceAccount:
    """What a token exchange needs from a Google service-account JSON key."""
    email: str
    key_id: str
    token_uri: str
    key: RSAKey

    def __repr__(self) -> str:                  # the key stays out of logs and tracebacks
        return f"ServiceAccount({self.email!r})"


def service_account(info: Any, where: str = "service_account") -> ServiceAccount:
    """A ServiceAccount from the parsed JSON key file, or a ConfigError naming ``where``, the
    field and the fix (never the key itself)."""
    if not isinstance(info, dict):
        raise ConfigError(f"{where}: expected the JSON object of a service-account key file")
    if info.get("type", "service_account") != "service_account":
        raise ConfigError(f"{where}: 'type' is {str(info.get('type'))[:40]!r}, not "
                          f"'service_account'; create a key for a service account in the "
                          f"Google Cloud console (IAM > Service accounts > Keys)")
    for field in ("client_email", "private_key"):
        if not isinstance(info.get(field), str) or not info[field]:
            raise ConfigError(f"{where}: '{field}' is missing; use the JSON key file exactly "
                              f"as Google Cloud downloaded it")
    token_uri = info.get("token_uri") or GOOGLE_TOKEN_URI
    if not isinstance(token_uri, str) or not token_uri.startswith(("https://", "http://")):
        raise ConfigError(f"{where}: 'token_uri' must be an http(s) URL ({GOOGLE_TOKEN_URI})")
    try:
        key = rsa_private_key(info["private_key"])
    except ValueError as exc:
        raise ConfigError(f"{where}: 'private_key' is not a usable RSA private key: {exc}; use "
                          f"the JSON key file exactly as Google Cloud downloaded it") from None
    key_id = info.get("private_key_id")
    return ServiceAccount(info["client_email"], key_id if isinstance(key_id, str) else "",
                          token_uri, key)


def google_jwt_assertion(account: ServiceAccount, now: float,
                         scope: str = GOOGLE_SCOPE) -> str:
    """The signed JWT a service account trades for an access token (Google's "Using OAuth 2.0
    for Server to Server Applications": iss, scope, aud = the token URI, iat, exp at most an
    hour later; ``kid`` names the key as google-auth sends it)."""
    header = {"alg": "RS256", "typ": "JWT"}
    if account.key_id:
        header["kid"] = account.key_id
    iat = int(now)
    claims = {"iss": account.email, "scope": scope, "aud": account.token_uri, "iat": iat,
              "exp": iat + GOOGLE_ASSERTION_SECONDS}
    signing_input = f"{_b64url(json_dumps(header))}.{_b64url(json_dumps(claims))}"
    return f"{signing_input}.{_b64url(rs256_sign(account.key, signing_input.encode()))}"


class GoogleTokenSource:
    """Access tokens of one service account, exchanged at its token URI through ``client`` and
    kept until GOOGLE_TOKEN_MARGIN before they expire. From then on one renewal runs, shared by
    every caller: while the old token has more than GOOGLE_TOKEN_LAST left, callers keep using
    it and do not wait; after that they wait for the renewal (all on the same one). A failed
    renewal fails the callers waiting on it; the next call starts another. ``clock`` gives
    epoch seconds (the JWT's iat/exp are wall-clock times)."""

    def __init__(self, account: ServiceAccount, client: UpstreamClient, *,
                 clock: Callable[[], float] = time.time, proxy: str = "",
                 verify_tls: bool = True, timeout: float = CONNECT_TIMEOUT * 3):
        self.account = account
        self._client = client
        self._clock = clock
        self._proxy, self._verify_tls, self._timeout = proxy, verify_tls, timeout
        self._token: str | None = None
        self._expires = 0.0
        self._renewal: asyncio.Future[str] | None = None

    async def token(self) -> str:
        now = self._clock()
        if self._token is not None and now < self._expires - GOOGLE_TOKEN_MARGIN:
            return self._token
        if self._renewal is None:
            self._renewal = asyncio.ensure_future(self._exchange())
            self._renewal.add_done_callback(self._renewed)
        if self._token is not None and now < self._expires - GOOGLE_TOKEN_LAST:
            return self._token
        # shield: a caller that gives up (its client left) does not cancel the others' renewal.
        return await asyncio.shield(self._renewal)

    def _renewed(self, task: asyncio.Future[str]) -> None:
        self._renewal = None
        if not task.cancelled():
            task.exception()            # retrieved here too: a background renewal may fail unseen

    async def _exchange(self) -> str:
        acct = self.account
        started = self._clock()
        body = urllib.parse.urlencode({"grant_type": GOOGLE_JWT_GRANT,
                                       "assertion": google_jwt_assertion(acct, started)})
        where = f"Google's token endpoint for service account {acct.email}"
        up = await self._client.request(
            "POST", acct.token_uri, [("Content-Type", "application/x-www-form-urlencoded"),
                                     ("Accept", "application/json")], body.encode(),
            proxy=self._proxy, verify_tls=self._verify_tls, timeout=self._timeout)
        try:
            data = await up.read(MAX_TOKEN_RESPONSE + 1)
        finally:
            up.aclose_nowait()
        if len(data) > MAX_TOKEN_RESPONSE:
            raise UpstreamError(502, f"{where} answered more than {MAX_TOKEN_RESPONSE} bytes",
                                retryable=True, upstream_status=up.status)
        problem = "the JSON is null"
        try:
            obj = json_loads(data, f"the answer of {where}", status=502)
        except GatewayError as exc:
            obj, problem = None, exc.message
        if up.status != 200:
            # RFC 6749 section 5.2: {"error": "invalid_grant", "error_description": "..."}
            detail = (f"{obj.get('error')}: {obj.get('error_description') or ''}"
                      if isinstance(obj, dict) and obj.get("error") else "")
            raise UpstreamError(502, escape_controls(f"{where} answered {up.status} "
                                                     f"{detail[:300]}").rstrip(),
                                retryable=True, upstream_status=up.status)
        token = obj.get("access_token") if isinstance(obj, dict) else None
        expires_in = obj.get("expires_in") if isinstance(obj, dict) else None
        if obj is None or not isinstance(token, str) or not token or not isinstance(
                expires_in, int) or isinstance(expires_in, bool) or expires_in <= 0:
            why = problem if obj is None else "no access_token and positive expires_in"
            raise UpstreamError(502, f"{where} sent an unusable answer: {why}",
                                retryable=True, upstream_status=up.status)
        self._token, self._expires = token, started + expires_in
        return token


class CredentialCache:
    """What channels sign their requests with and must keep between requests: one
    GoogleTokenSource per service account (by key id and e-mail), so that channels sharing an
    account share its token. At most MAX_TOKEN_SOURCES are kept (the oldest go first)."""

    def __init__(self, client: UpstreamClient, clock: Callable[[], float] = time.time):
        self.client, self.clock = client, clock
        self._google: collections.OrderedDict[tuple, GoogleTokenSource] = \
            collections.OrderedDict()

    async def google_token(self, account: ServiceAccount, *, proxy: str = "",
                           verify_tls: bool = True) -> str:
        key = (account.email, account.key_id, account.token_uri, proxy, verify_tls)
        src = self._google.get(key)
        if src is None or src.account.key != account.key:
            src = self._google[key] = GoogleTokenSource(account, self.client, clock=self.clock,
                                                        proxy=proxy, verify_tls=verify_tls)
            while len(self._google) > MAX_TOKEN_SOURCES:
                self._google.popitem(last=False)
        return await src.token()


# =================================================================================================
# 8. HTTP server
# =================================================================================================
# Keep-alive loop over asyncio streams. Pipelined requests are answered in order because one
# connection task reads the next head only after it has answered the current request. It knows
# nothing about LLMs: the gateway gives it a handler and an error renderer, and every error it
# answers itself (a bad head, a body over the limit, too many connections) goes through that.

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

    @property
    def address(self) -> str:
        """The client's IP address: ``client`` without its port."""
        return self.client.rpartition(":")[0]


class Response:
    """``body`` is bytes (sent with Content-Length) or an async iterator of bytes (sent chunked;
    if it raises, the connection is cut without the last chunk so the client sees the break).
    ``keepalive``, for a streamed body whose pieces are whole events, is written between pieces
    whenever nothing was sent for KEEPALIVE_PING_SECONDS."""

    __slots__ = ("status", "headers", "body", "keepalive")

    def __init__(self, status: int, headers: list[tuple[str, str]] | None = None,
                 body: bytes | AsyncIterator[bytes] = b"", keepalive: bytes | None = None):
        self.status, self.headers, self.body = status, headers or [], body
        self.keepalive = keepalive


class StreamBody:
    """An async iterable of bytes with a cleanup that runs exactly once when the server is done
    with it, whether the iteration finished, broke off, or never started. ``ready``: its first
    piece is made without waiting for the peer (bytes held before answering), so the server
    writes it with the head, in one send."""

    __slots__ = ("_it", "_on_close", "ready")

    def __init__(self, it: AsyncIterator[bytes], on_close: Callable[[], None],
                 ready: bool = False):
        self._it, self._on_close, self.ready = it, on_close, ready

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._it.__aiter__()         # iterated directly: one layer less per piece

    async def aclose(self) -> None:
        on_close, self._on_close = self._on_close, None
        try:
            aclose = getattr(self._it, "aclose", None)
            if aclose is not None:
                await aclose()
        finally:
            if on_close is not None:
                on_close()


class _Pinger:
    """Writes a keep-alive between the pieces of a stream while the stream is silent. Pieces are
    written whole in one call, so the keep-alive never lands inside one. Costs the stream one
    timestamp per piece."""

    __slots__ = ("loop", "last", "_writer", "_data", "_handle")

    def __init__(self, writer: asyncio.StreamWriter, data: bytes):
        self.loop = asyncio.get_running_loop()
        self.last = self.loop.time()
        self._writer, self._data = writer, data
        self._handle: asyncio.TimerHandle | None = self.loop.call_later(
            KEEPALIVE_PING_SECONDS, self._tick)

    def _tick(self) -> None:
        now = self.loop.time()
        if now - self.last >= KEEPALIVE_PING_SECONDS * 0.99:
            if self._writer.transport.is_closing():
                self._handle = None
                return
            self._writer.write(self._data)
            self.last = now
        self._handle = self.loop.call_at(self.last + KEEPALIVE_PING_SECONDS, self._tick)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


Handler = Callable[[Request], Any]
ErrorRenderer = Callable[["RequestHead | None", GatewayError], Response]


class _ConnState:
    __slots__ = ("busy",)

    def __init__(self):
        self.busy = False


class _Sentry:
    """Notices a client that went away while its request is being served (the connection's
    read side reached EOF or the transport closed) and cancels the connection's task, which
    cancels the upstream request at once instead of at the next write. One per connection:
    ``watch()`` as a request starts, ``rest()`` when it is answered; its timer checks every
    CLIENT_CHECK_SECONDS while a request is served and stops at the first check after, so
    back-to-back requests share one timer instead of making one each."""

    __slots__ = ("_loop", "_reader", "_writer", "_task", "_handle", "_busy")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 task: asyncio.Task):
        self._loop = asyncio.get_running_loop()
        self._reader, self._writer, self._task = reader, writer, task
        self._handle: asyncio.TimerHandle | None = None
        self._busy = False

    def watch(self) -> None:
        self._busy = True
        if self._handle is None:
            self._handle = self._loop.call_later(CLIENT_CHECK_SECONDS, self._check)

    def rest(self) -> None:
        self._busy = False

    def _check(self) -> None:
        if not self._busy:
            self._handle = None
            return
        if self._reader.at_eof() or self._writer.transport.is_closing():
            self._handle = None
            self._task.cancel()
            return
        self._handle = self._loop.call_later(CLIENT_CHECK_SECONDS, self._check)

    def close(self) -> None:
        self._busy = False
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


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
                 ssl_context: ssl.SSLContext | None = None,
                 max_connections: Callable[[], int] = lambda: DEFAULT_MAX_CONNECTIONS):
        self._handler = handler
        self._render_error = error_renderer
        self._max_body = max_body
        self._max_connections = max_connections
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
        if len(self._conns) >= self._max_connections():
            self._log("refused a connection: settings.max_connections reached")
            watchdog = Watchdog(reader)
            head = None
            try:
                raw = await read_head(reader, watchdog, 1.0, 1.0)   # read it: closing is clean
                head = parse_request_head(raw) if raw else None
            except (ProtocolError, TimeoutError, OSError, asyncio.IncompleteReadError):
                pass
            watchdog.close()
            busy = GatewayError(503, "too many connections", headers=[("Retry-After", "1")])
            try:
                await self._send(writer, head, self._render_error(head, busy), False)
            except (OSError, TimeoutError):
                pass
            await close_writer(writer)
            return
        state = _ConnState()
        self._conns[task] = state                                      # type: ignore[index]
        peer = writer.get_extra_info("peername")
        client = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else ""
        sock = writer.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        watchdog = Watchdog(reader)
        sentry = _Sentry(reader, writer, task)                       # type: ignore[arg-type]
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
                sentry.watch()
                try:
                    if not await self._one(reader, writer, watchdog, raw, client):
                        break
                finally:
                    sentry.rest()
        except (ConnectionError, OSError, TimeoutError, asyncio.CancelledError):
            pass
        except Exception as exc:                                       # pragma: no cover
            self._log(f"connection error: {type(exc).__name__}: {exc}")
        finally:
            sentry.close()
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
        pinger = _Pinger(writer, format_chunk(resp.keepalive) if chunked else resp.keepalive) \
            if resp.keepalive else None
        try:
            if getattr(body, "ready", False):      # held bytes: one send with the head
                piece = await anext(body.__aiter__(), b"")             # type: ignore[union-attr]
                out += (format_chunk(piece) if chunked else piece) if piece else b""
            await write_and_drain(writer, out)
            async for piece in body:                                   # type: ignore[union-attr]
                if piece:
                    await write_and_drain(writer, format_chunk(piece) if chunked else piece)
                    if pinger is not None:
                        pinger.last = pinger.loop.time()
            if pinger is not None:
                pinger.close()
            if chunked:
                await write_and_drain(writer, b"0\r\n\r\n")
            return ka
        except TimeoutError:
            # The client stopped reading: what it has not taken is dropped with the connection,
            # not left queued in the kernel for a peer that may never read it.
            self._log(f"dropped a client that read nothing for {WRITE_TIMEOUT:g} s")
            abort_connection(writer)
            return False
        except (ConnectionError, OSError):
            return False
        except Exception as exc:
            self._log(f"stream cut: {type(exc).__name__}: {exc}")
            writer.transport.abort()
            return False
        finally:
            if pinger is not None:
                pinger.close()
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
# 9. Converters and provider adapters (dict in -> dict out)
# =================================================================================================
# No I/O: every function maps dicts (or bytes of a stream) to dicts. The only state they touch is
# what the caller passes in: the gateway's memory of Gemini thought signatures and Claude thinking
# blocks (see 9.2), which decoders write and encoders read.
#
# 9.1 Dialects and errors: every client dialect's error bodies, in-band stream errors and model
# lists, and what upstream error bodies of any dialect say.

_OPENAI_ERROR_TYPE = {
    "invalid_request": "invalid_request_error", "authentication": "authentication_error",
    "billing": "insufficient_quota", "permission": "permission_error",
    "not_found": "invalid_request_error", "method_not_allowed": "invalid_request_error",
    "request_too_large": "invalid_request_error", "rate_limit": "rate_limit_exceeded",
    "conflict": "invalid_request_error", "not_implemented": "invalid_request_error",
}
# google.rpc.Code of an HTTP status (googleapis google/rpc/code.proto and the HTTP -> RPC table of
# Google's API error model: 416 OUT_OF_RANGE, 499 CANCELLED, any other 4xx FAILED_PRECONDITION,
# any other 5xx INTERNAL, the rest UNKNOWN); 405 and 413 are bad requests, 408 a deadline, and a
# 502 or an overloaded upstream (529) an unavailable service, as a Google front end says them.
_GOOGLE_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
                  404: "NOT_FOUND", 405: "INVALID_ARGUMENT", 408: "DEADLINE_EXCEEDED",
                  409: "ABORTED", 413: "INVALID_ARGUMENT", 416: "OUT_OF_RANGE",
                  429: "RESOURCE_EXHAUSTED", 499: "CANCELLED", 500: "INTERNAL",
                  501: "UNIMPLEMENTED", 502: "UNAVAILABLE", 503: "UNAVAILABLE",
                  504: "DEADLINE_EXCEEDED", 529: "UNAVAILABLE"}


def google_status(status: int) -> str:
    """The ``status`` name a Gemini client reads beside an HTTP status ``code``."""
    return _GOOGLE_STATUS.get(status) or ("FAILED_PRECONDITION" if 400 <= status < 500 else
                                          "INTERNAL" if 500 <= status < 600 else "UNKNOWN")


_ANTHROPIC_ERROR_TYPE = {
    "invalid_request": "invalid_request_error", "authentication": "authentication_error",
    "billing": "billing_error", "permission": "permission_error", "not_found": "not_found_error",
    "method_not_allowed": "invalid_request_error", "request_too_large": "request_too_large",
    "rate_limit": "rate_limit_error", "timeout": "timeout_error", "overloaded": "overloaded_error",
    "conflict": "invalid_request_error", "not_implemented": "invalid_request_error",
}


# Context-window overflow as each provider words it, and where the numbers sit (tokens, limit):
#   Anthropic  "prompt is too long: 215000 tokens > 200000 maximum" (the prefix is what Claude Code
#              2.1 matches, case-insensitively, on a 400 to decide to compact; it reads the two
#              numbers with /prompt is too long[^0-9]*(\d+)\s*tokens?\s*>\s*(\d+)/i, seen in
#              its bundled cli) and "input length and `max_tokens` exceed context limit: a + b > c"
#   OpenAI     code "context_length_exceeded"; "This model's maximum context length is L tokens.
#              However, your messages resulted in T tokens" (vLLM, DeepSeek: "you requested T")
#   Gemini     400 INVALID_ARGUMENT "The input token count (T) exceeds the maximum number of
#              tokens allowed (L)." (google-gemini/gemini-cli issues #4118, #11248)
#   Ollama     "the input length exceeds the context length" (a 400 or 500, no numbers)
#   llama.cpp  "the request exceeds the available context size" (type exceed_context_size_error)
#   Mistral    "Prompt contains T tokens ... too large for model with L maximum context length"
_OVERFLOW_NUMBERS = (
    (re.compile(r"prompt is too long\D*?(\d+)\s*tokens?\s*>\s*(\d+)", re.I), "tl"),
    (re.compile(r"exceed context limit:\s*(\d+)\s*\+\s*(\d+)\s*>\s*(\d+)", re.I), "ttl"),
    (re.compile(r"maximum context length is (\d+) tokens\W+however,? (?:your messages "
                r"resulted in|you requested) (\d+) tokens", re.I), "lt"),
    (re.compile(r"input token count \((\d+)\) exceeds the maximum number of tokens allowed "
                r"\((\d+)\)", re.I), "tl"),
    (re.compile(r"prompt contains (\d+) tokens.*?too large for model with (\d+) maximum "
                r"context length", re.I | re.S), "tl"),
)
_OVERFLOW_RX = re.compile(
    r"prompt is too long|context[_ ]length[_ ]exceeded|maximum context length|"
    r"exceed context limit|exceeds the maximum number of tokens|exceeds the context length|"
    r"exceeds the available context size|exceed_context_size|context window of this model",
    re.I)


def context_overflow(body: bytes, status: int) -> ContextOverflow | None:
    """The upstream error ``body`` as a ContextOverflow when it reports a prompt longer than the
    model's context window (in any provider's wording above), else None."""
    message = upstream_error_message(body, status)
    code = upstream_error_code(body) or ""
    text = body[:MAX_ERROR_BODY].decode("utf-8", "replace")
    if code != "context_length_exceeded" and not _OVERFLOW_RX.search(text):
        return None
    for rx, order in _OVERFLOW_NUMBERS:
        m = rx.search(text)
        if m:
            nums = [int(g) for g in m.groups()]
            if order == "ttl":
                return ContextOverflow(message, nums[0] + nums[1], nums[2])
            tokens, limit = (nums[0], nums[1]) if order == "tl" else (nums[1], nums[0])
            return ContextOverflow(message, tokens, limit)
    try:
        obj = json.loads(body)
        err = obj.get("error", obj) if isinstance(obj, dict) else {}
        tokens, limit = _num(err.get("n_prompt_tokens")), _num(err.get("n_ctx"))  # llama.cpp
    except (ValueError, UnicodeDecodeError, AttributeError):
        tokens = limit = 0
    return ContextOverflow(message, tokens or None, limit or None)


def overflow_message(dialect: str, err: ContextOverflow) -> str:
    """A context overflow in the wording the client's own provider uses (see above)."""
    known = err.tokens is not None and err.limit is not None
    if dialect == ANTHROPIC:
        if err.message.lower().startswith("prompt is too long"):
            return err.message
        if known:
            return f"prompt is too long: {err.tokens} tokens > {err.limit} maximum"
        return f"prompt is too long: {err.message}"
    if dialect == GEMINI:
        if known:
            return (f"The input token count ({err.tokens}) exceeds the maximum number of "
                    f"tokens allowed ({err.limit}).")
        return err.message
    if known:
        return (f"This model's maximum context length is {err.limit} tokens. However, your "
                f"messages resulted in {err.tokens} tokens. Please reduce the length of the "
                f"messages.")
    return err.message


def error_payload(dialect: str, err: GatewayError) -> dict:
    """The error object a client of ``dialect`` expects (PROTOCOLS.md sections 1.5, 3.8, 4.7)."""
    if isinstance(err, ContextOverflow):
        err = GatewayError(400, overflow_message(dialect, err), code=err.code, param=err.param)
    if dialect == GEMINI:
        return {"error": {"code": err.status, "message": err.message,
                          "status": google_status(err.status)}}
    if dialect == ANTHROPIC:
        return {"type": "error", "error": {
            "type": _ANTHROPIC_ERROR_TYPE.get(err.kind, "api_error"), "message": err.message}}
    return {"error": {"message": err.message,
                      "type": _OPENAI_ERROR_TYPE.get(err.kind, "server_error"),
                      "param": err.param, "code": err.code}}


def stream_error_event(dialect: str, err: GatewayError) -> bytes:
    """An in-band error for a stream whose 200 status is already sent."""
    if dialect == RESPONSES:
        message = overflow_message(dialect, err) if isinstance(err, ContextOverflow) \
            else err.message
        return b"event: error\ndata: " + json_dumps({
            "type": "error", "code": err.code or _OPENAI_ERROR_TYPE.get(err.kind, "server_error"),
            "message": message, "param": err.param}) + b"\n\n"
    data = json_dumps(error_payload(dialect, err))
    if dialect == ANTHROPIC:
        return b"event: error\ndata: " + data + b"\n\n"
    return b"data: " + data + b"\n\n"


def upstream_error_message(body: bytes, status: int) -> str:
    """The human message inside an upstream error body of any dialect (OpenAI, Anthropic,
    Gemini, Ollama or plain text), shortened; never the whole body."""
    text = ""
    try:
        obj = json_loads(body, "an upstream error", status=502, unique_keys=False)
    except GatewayError:
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


# An upstream's refusal of a max_tokens above its model's output limit, naming the limit:
# OpenAI's "max_tokens is too large: 64000. This model supports at most 16384 completion tokens,
# whereas you provided 64000." (ChatGPTNextWeb/NextChat#3195, enoch3712/ExtractThinker#346) and
# DeepSeek's "Invalid max_tokens value, the valid range of max_tokens is [1, 8192]"
# (mnfst/llm-gateway#1177, Gitlawb/openclaude#35), and Vertex AI's "Unable to submit request
# because it has a maxOutputTokens value of 655360 but the supported range is from 1 (inclusive)
# to 8193 (exclusive)." (stackblitz-labs/bolt.diy#955). Clients such as Claude Code ask for
# 128,000.
_OUTPUT_LIMIT_RX = re.compile(r"supports at most (\d{1,9}) completion tokens"
                              r"|valid range of max_tokens is \[1, ?(\d{1,9})\]"
                              r"|supported range is from 1 \(inclusive\) to (\d{1,9})"
                              r" \(exclusive\)")


def output_limit_in(message: str) -> int | None:
    """The output-token limit an upstream's error message names, if it is that refusal."""
    m = _OUTPUT_LIMIT_RX.search(message)
    if m is None:
        return None
    return int(m.group(1) or m.group(2)) if m.group(3) is None else int(m.group(3)) - 1


def sent_output_tokens(body: bytes) -> int:
    """The output-token limit a converted request we built asks for (0 when it names none)."""
    try:
        obj = json.loads(body)
    except ValueError:
        return 0
    if not isinstance(obj, dict):
        return 0
    gen, opts = obj.get("generationConfig"), obj.get("options")       # Gemini's, Ollama's
    values = [obj.get("max_tokens"), obj.get("max_completion_tokens"),
              obj.get("max_output_tokens"),
              gen.get("maxOutputTokens") if isinstance(gen, dict) else None,
              opts.get("num_predict") if isinstance(opts, dict) else None]
    return max((v for v in values if type(v) is int), default=0)


def upstream_error_code(body: bytes) -> str | None:
    try:
        err = json_loads(body, "an upstream error", status=502, unique_keys=False).get("error")
    except (GatewayError, AttributeError):
        return None
    code = err.get("code") if isinstance(err, dict) else None
    return code if isinstance(code, str) else None


def gemini_model_payload(name: str) -> dict:
    return {"name": f"models/{name}", "baseModelId": name, "version": "001",
            "displayName": name, "description": f"{name} through aigateway",
            "inputTokenLimit": 1048576, "outputTokenLimit": 65536,
            "supportedGenerationMethods": ["generateContent", "streamGenerateContent",
                                           "countTokens", "embedContent",
                                           "batchEmbedContents"]}


def models_payload(dialect: str, names: list[str], created: int) -> dict:
    """``GET /v1/models`` in OpenAI shape (section 2.6) or Anthropic shape (section 3.9)."""
    if dialect == GEMINI:
        return {"models": [gemini_model_payload(n) for n in names]}
    if dialect == ANTHROPIC:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created))
        data = [{"type": "model", "id": n, "display_name": n, "created_at": stamp}
                for n in names]
        return {"data": data, "has_more": False,
                "first_id": names[0] if names else None, "last_id": names[-1] if names else None}
    return {"object": "list", "data": [model_payload(OPENAI, n, created) for n in names]}


def model_payload(dialect: str, name: str, created: int) -> dict:
    if dialect == GEMINI:
        return gemini_model_payload(name)
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
    obj = json_loads(body)
    obj["model"] = new
    return json_dumps(obj)


def replace_multipart_field(body: bytes, content_type: str, name: str, value: str) -> bytes:
    for hdrs, start, end in parse_multipart(body, content_type):
        if multipart_field_name(hdrs) == name:
            return body[:start] + value.encode() + body[end:]
    return body


# 9.2 The internal form ("IR") of a chat exchange. Every dialect converts to and from it, so N
# dialects need 2N converters instead of N^2. Plain dicts, JSON-able, lossless for what both sides
# can express.
#
# Request:
#   model: str                       stream: bool              include_usage: bool
#   system: [Part]                   text parts of every system/developer message, in order
#   messages: [{"role": "user"|"assistant"|"tool", "content": [Part]}]
#   tools: [{"name", "description", "parameters": JSON Schema, optional keys:
#            "custom": True          a Responses custom (free-text) tool, its input as {"input"}
#            "tool_search": True     Codex's client-run tool_search
#            "namespace", "local_name"   a tool inside a Responses namespace; "name" is then
#                                    namespaced_tool_name(namespace, local_name)}]
#   tool_choice: None | "auto" | "none" | "required" | {"name": str}
#   parallel_tool_calls: bool | None  n: int                  user: str | None
#   max_tokens, temperature, top_p, top_k, seed, presence_penalty, frequency_penalty: num | None
#   stop: [str]
#   response_format: None | {"type": "json_object"} | {"type": "json_schema", "name", "schema",
#                    "strict"}
#   reasoning: None | {"effort": one of EFFORTS, "budget": int | None}   budget: the client's own
#              token budget (Anthropic budget_tokens, Gemini thinkingBudget), else None
#   gemini_sse: bool                 only from Gemini clients: they asked for ?alt=sse (a transport
#                                    hint for the stream encoder; absent from other dialects)
# Part:
#   {"type": "text", "text"}
#   {"type": "image", "url"} | {"type": "image", "media_type", "data"}       data is base64
#   {"type": "file", "media_type", "data", "filename"}                       (PDF and such)
#   {"type": "audio", "format", "data"}
#   {"type": "reasoning", "text", "signature", "redacted"}   signature: only Anthropic's own;
#                                    text "" with a signature: thinking sent with display omitted
#   {"type": "tool_call", "id", "name", "arguments"}          arguments: JSON text ("{}" when none)
#   {"type": "tool_result", "id", "name", "content": [text|image Part], "is_error": bool}
#                                                             only in role "tool", one per message
# Response: {"id", "model", "content": [text|reasoning|tool_call Part], "finish", "usage"}
#   finish: "stop" | "length" | "tool_calls" | "content_filter"
# Usage: {"input" (whole prompt, cached included), "output" (reasoning included), "cache_read",
#         "cache_write", "reasoning"}
# Stream events, tuples in this order: ("start", id, model), then any of ("text", s),
#   ("reasoning", s), ("signature", s), ("tool", index, id, name), ("args", index, s),
#   ("usage", Usage); ("finish", reason) once; ("error", GatewayError) ends a broken stream.
#   Tool indexes are dense from 0 in order of first appearance.
# Provider memory kept by the gateway between turns, passed in and written by the converters:
#   signatures: {tool call id: Gemini thoughtSignature}   (Gemini decoders write, encoder reads)
#   kept: {tool call id: [Claude thinking blocks]}        (Anthropic decoders write, encoder reads)
#
# The same IR as TypedDicts, to name in signatures (documentation only: the IR stays plain
# dicts, nothing is checked at run time). A total=False type's keys may each be absent.


class IRText(TypedDict):
    type: Literal["text"]
    text: str


class IRReference(IRText):
    """The text a ``tool_reference`` block becomes (tool_reference_text), with the tool's
    name, so that it names the tool as the channel knows it (rename_ir_tools)."""
    reference: str


class IRImage(TypedDict, total=False):
    type: Literal["image"]                   # with "url", or with "media_type" and "data"
    url: str
    media_type: str
    data: str                                # base64


class IRFile(TypedDict):
    type: Literal["file"]
    media_type: str
    data: str                                # base64
    filename: str


class IRAudio(TypedDict):
    type: Literal["audio"]
    format: str
    data: str                                # base64


class IRReasoning(TypedDict):
    type: Literal["reasoning"]
    text: str
    signature: str | None                    # only Anthropic's own
    redacted: bool


class IRToolCall(TypedDict):
    type: Literal["tool_call"]
    id: str
    name: str
    arguments: str                           # JSON text ("{}" when none)


class IRToolResult(TypedDict):
    type: Literal["tool_result"]
    id: str
    name: str | None
    content: list[IRText | IRImage]
    is_error: bool


IRPart = IRText | IRImage | IRFile | IRAudio | IRReasoning | IRToolCall | IRToolResult


class IRMessage(TypedDict):
    role: Literal["user", "assistant", "tool"]
    content: list[IRPart]


class IRTool(TypedDict, total=False):
    name: str                                # always there
    description: str                         # always there
    parameters: dict                         # JSON Schema; always there
    custom: bool
    tool_search: bool
    namespace: str
    local_name: str


class IRReasoningAsk(TypedDict):
    effort: str                              # one of EFFORTS
    budget: int | None


class _IRRequestKeys(TypedDict):
    model: str
    stream: bool
    include_usage: bool
    system: list[IRPart]
    messages: list[IRMessage]
    tools: list[IRTool]
    tool_choice: None | str | dict           # "auto", "none", "required" or {"name": str}
    parallel_tool_calls: bool | None
    n: int
    user: str | None
    max_tokens: int | None
    temperature: float | None
    top_p: float | None
    top_k: int | None
    seed: int | None
    presence_penalty: float | None
    frequency_penalty: float | None
    stop: list[str]
    response_format: dict | None
    reasoning: IRReasoningAsk | None


class IRRequest(_IRRequestKeys, total=False):
    gemini_sse: bool                         # only from Gemini clients


class IRUsage(TypedDict):
    input: int                               # the whole prompt, cached included
    output: int                              # reasoning included
    cache_read: int
    cache_write: int
    reasoning: int


class IRResponse(TypedDict):
    id: str
    model: str
    content: list[IRPart]                    # text, reasoning and tool_call parts
    finish: Literal["stop", "length", "tool_calls", "content_filter"]
    usage: IRUsage


# The adapter interface. A client dialect is a DialectAdapter in DIALECTS, a channel type a
# ProviderAdapter in PROVIDERS (both at the end of this section); the gateway (section 11) asks
# them every provider question and compares no provider name itself.


class StreamDecoding(Protocol):
    """Upstream stream bytes -> IR stream events (see "Stream events" above)."""

    def feed(self, data: bytes) -> list[tuple]: ...

    def close(self) -> list[tuple]: ...


class StreamEncoding(Protocol):
    """IR stream events -> a client dialect's stream bytes; ``usage`` is the last IR Usage
    seen (for the request log)."""

    usage: IRUsage | None

    def encode(self, events: list[tuple]) -> bytes: ...


class DialectAdapter:
    """What the gateway asks of a client dialect. Subclasses override what differs."""

    name = ""
    keepalive = b": keepalive\n\n"           # sent on an idle stream
    model_in_path = False                     # the model is named in the URL, not the body

    def request_to_ir(self, body: dict, model: str, kind: str, params: dict) -> IRRequest:
        raise NotImplementedError

    def response(self, resp: IRResponse, model: str, ir: IRRequest) -> dict:
        raise NotImplementedError

    def stream_encoder(self, model: str, ir: IRRequest) -> StreamEncoding:
        raise NotImplementedError

    def error_payload(self, err: GatewayError) -> dict:
        return error_payload(self.name, err)

    def stream_error(self, err: GatewayError) -> bytes:
        return stream_error_event(self.name, err)

    def models_payload(self, names: list[str], created: int) -> dict:
        return models_payload(self.name, names, created)

    def model_payload(self, name: str, created: int) -> dict:
        return model_payload(self.name, name, created)

    def count_payload(self, count: int) -> dict:
        return {"input_tokens": count}

    def usage(self, obj: Any) -> IRUsage | None:
        """The usage (IR form: input, output, cache_read, cache_write, reasoning) a whole
        answer or one stream event of this dialect reports, or None: how the gateway counts the
        tokens of an answer it passes through."""
        raise NotImplementedError

    def passthrough_decoders(self) -> tuple[Callable[[dict], IRResponse], Callable[[], Any]]:
        """(whole-answer decoder, stream decoder factory) that look into an answer passed
        through unchanged, for emptiness."""
        raise NotImplementedError

    def plainly_has_text(self, answer: dict) -> bool:
        """Whether a whole answer plainly has text that is not blank where this dialect puts
        it, which settles that it is not empty (answer_is_empty) without decoding it; False
        when only the decoder can tell."""
        return False

    def named(self, answer: dict, model: str) -> dict | None:
        """A relayed whole answer naming ``model``, the name the client asked for (the
        upstream's name differed: a model_mapping target); None when this dialect's clients do
        not mind, and the answer is forwarded byte for byte."""
        return None

    def stream_named(self, model: str) -> Callable[[], Any] | None:
        """The same for a relayed stream: a factory of a byte filter (feed, end), or None."""
        return None


class TypeField(NamedTuple):
    """A config field that only one channel type has."""

    default: Any
    label: str                                # as the channel dialog names it
    what: str                                 # what a valid value is, for errors
    types: tuple[type, ...] = (str,)          # the JSON types it takes
    secret: bool = False                      # masked wherever it is shown


@dataclass(slots=True)
class ChatOptions:
    """What a channel's chat request is built with besides the IR and the model."""

    stream: bool
    max_tokens_cap: int = 0                  # the channel's max_tokens_cap (0 = none)
    signatures: dict[str, str] | None = None     # Gemini thought signatures (see above)
    quirks: dict | None = None               # the channel's quirks (OpenAI-compatible types)
    thinking: str = "auto"                   # the channel's thinking setting (Anthropic)
    kept: dict[str, list[dict]] | None = None    # Claude thinking blocks (see above)


class ProviderAdapter:
    """What the gateway asks of a channel type. ``ch`` is a Channel (section 11): base_url,
    api_key, api_version, responses_api. Subclasses override what differs."""

    name = ""
    default_url = ""                          # "" when the user must write one
    serves_as_is: tuple[str, ...] = ()        # client dialects relayed without conversion
    responses_as_is = False                   # ... and Responses too with responses_api: true
    responses_for_tools = False               # converts to Responses for RESPONSES_FOR_TOOLS
    needs_key = False                         # an empty api_key is worth a warning
    embeds = False                            # reached by conversion for embeddings
    inline_media: tuple[str, ...] = ()        # takes only these media inline (URLs fetched)
    tool_name_rule: tuple[re.Pattern, int] | None = None    # (accepted names, longest)
    caps_in_encoder = False                   # encode_chat applies max_tokens_cap itself
    replaces_headers: frozenset[str] = frozenset()   # client headers its own replace
    forwards_headers: frozenset[str] | None = None   # client headers relayed (None = all)
    lists_models = True                       # the upstream has a model list to read
    signs = False                             # overrides authorize (set by __init_subclass__)
    # Config fields of this type only, type-checked by section 10 (check_fields says what
    # else must hold), shown by the channel dialog, kept in Channel.extra.
    fields: dict[str, TypeField] = {}

    def relays(self, dialect: str, responses_api: bool, model: str = "",
               kind: str = "") -> bool:
        """Whether a ``dialect`` client's request (route ``kind``, for upstream ``model``) goes
        to this channel type as it came (relay_body may still rewrap the body)."""
        return dialect in self.serves_as_is or (
            dialect == RESPONSES and responses_api and self.responses_as_is)

    def base_url_for(self, c: dict) -> str:
        """The base URL of a channel (config dict ``c``) that leaves base_url empty."""
        return self.default_url

    def check_fields(self, c: dict) -> tuple[str, str, str] | None:
        """(field, problem, fix) when this type's fields of config dict ``c`` do not fit
        together, else None."""
        return None

    def credentials(self, c: dict) -> Any:
        """What authorize signs with, prepared once per configuration (None: only api_key)."""
        return None

    def relay_body(self, body: bytes, obj: dict | None, model: str, stream: bool,
                   incoming: Headers) -> bytes:
        """A relayed request's body as this upstream takes it (``obj`` is it parsed)."""
        return body

    def relay_query(self, query: str, model: str) -> str:
        """The client's query string (``key=`` left out already) as a relayed request for
        upstream ``model`` carries it on."""
        return query

    def answer_filter(self, model: str) -> Callable[[], Any] | None:
        """A factory of a filter (``feed(bytes) -> bytes``, ``end()``) that turns a relayed
        streaming answer into the client dialect's SSE, when the upstream frames it otherwise."""
        return None

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        cls.signs = cls.authorize is not ProviderAdapter.authorize

    async def authorize(self, ch: Any, method: str, url: str, headers: list[tuple[str, str]],
                        body: bytes, creds: Any) -> list[tuple[str, str]]:
        """``headers`` with what signs this one request added (SigV4, an OAuth token from
        ``creds``, a CredentialCache); by default they are complete already."""
        return headers

    def auth_headers(self, api_key: str, incoming: Headers | None = None,
                     quirks: dict | None = None) -> list[tuple[str, str]]:
        return [("Authorization", f"Bearer {api_key}")] if api_key else []

    def passthrough_url(self, ch: Any, path: str, kind: str, model: str,
                        stream: bool = False) -> str:
        """Where a passed-through request for route ``path`` (a /v1/... path) goes."""
        return join_base_url(ch.base_url, path)

    chat_path, models_path, embeddings_path = "/v1/chat/completions", "/v1/models", \
        "/v1/embeddings"

    def join(self, base_url: str, path: str) -> str:
        """``path`` (one of the *_path above) on the channel's base URL."""
        return join_base_url(base_url, path)

    def chat_url(self, ch: Any, model: str, stream: bool) -> str:
        return self.join(ch.base_url, self.chat_path)

    def models_url(self, ch: Any) -> str:
        return self.join(ch.base_url, self.models_path)

    def embeddings_url(self, ch: Any, model: str) -> str:
        return self.join(ch.base_url, self.embeddings_path)

    def encode_chat(self, ir: IRRequest, model: str, opts: ChatOptions) -> dict:
        """The chat request body, from an IR whose tool names already fit tool_name_rule."""
        raise NotImplementedError

    def encode_embeddings(self, texts: list[str], model: str, dims: Any) -> dict:
        body: dict[str, Any] = {"model": model, "input": texts}
        if isinstance(dims, int):
            body["dimensions"] = dims
        return body

    def decoders(self, signatures: dict[str, str] | None, kept: dict[str, list[dict]] | None,
                 model: str = "") -> tuple[Callable[[dict], IRResponse],
                                           Callable[[], StreamDecoding]]:
        """(whole-answer decoder, stream decoder factory) to IR, for upstream ``model``."""
        raise NotImplementedError

    def embed_vectors(self, body: Any) -> tuple[list[list[float]], int]:
        raise NotImplementedError

    def parse_models(self, body: Any) -> list[str]:
        """Model names in the upstream's model list."""
        items = body.get("data") or body.get("models") or [] if isinstance(body, dict) else []
        names = []
        for item in items if isinstance(items, list) else ():
            name = item.get("id") or item.get("name") if isinstance(item, dict) else None
            if isinstance(name, str) and name:
                names.append(name[7:] if name.startswith("models/") else name)
        return names

    def quirks(self, body: dict, quirks: dict | None) -> dict:
        """A passed-through chat body with the channel's ``quirks`` applied."""
        return body


def guarded(status: int, what: str, check: Callable[[Any], Any] | None = None
            ) -> Callable[[Callable], Callable]:
    """Converters take input from clients and upstreams: a body of the wrong shape (a list
    where an object belongs, a number for a name) becomes a GatewayError with ``status``
    naming ``what`` was malformed, never another exception. ``check`` (checked_events,
    checked_vectors) then looks at what the converter made of it."""
    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            try:
                out = fn(*args, **kwargs)
            except GatewayError as exc:
                # A check it shares with the request converters (blocks_to_ir's 400) failed
                # on an upstream's answer: the upstream's fault, so the guard's status.
                if exc.status < 500 <= status:
                    raise GatewayError(status, f"malformed {what}: {exc.message}") from None
                raise
            except (AttributeError, TypeError, KeyError, IndexError, ValueError) as exc:
                raise GatewayError(status, f"malformed {what}: a field has an unexpected type "
                                           f"or shape ({type(exc).__name__})") from None
            return out if check is None else check(out)
        return inner
    return wrap


# The fields of each IR stream event and of each part of a decoded answer that are strings
# (the IR above): a decoder copies them from the upstream's JSON, where a hostile or broken
# upstream can put a list or a number. They are checked where decoders hand them on, so no
# encoder, look for content or client ever gets, say, a tool name that is a list.
_EVENT_STRINGS = {"start": (1, 2), "reasoning": (1,), "signature": (1,),     # and "text"
                  "tool": (2, 3), "args": (2,), "finish": (1,)}             # (its own test)
_PART_STRINGS = {"text": ("text",), "reasoning": ("text",),
                 "tool_call": ("id", "name", "arguments")}
_PART_OPTIONAL_STRINGS = {"reasoning": ("signature", "redacted")}    # or None


def _not_a_string(value: Any, where: str) -> GatewayError:
    return GatewayError(502, f"malformed upstream answer: {where} is a "
                             f"{type(value).__name__}, not a string")


def checked_events(events: list[tuple]) -> list[tuple]:
    """A stream decoder's ``events``, once every field the IR says is a string is one."""
    for ev in events:
        if ev[0] == "text":                     # nearly every event: no table, no inner loop
            if type(ev[1]) is not str:
                raise _not_a_string(ev[1], "a 'text' event's field")
            continue
        for i in _EVENT_STRINGS.get(ev[0], ()):
            if type(ev[i]) is not str:
                raise _not_a_string(ev[i], f"a {ev[0]!r} event's field")
    return events


def coalesced_text(events: list[tuple]) -> list[tuple]:
    """``events`` with each run of adjacent ("text", s) events, and of ("reasoning", s) ones,
    joined into one event: what one read of a burst brought is encoded once instead of once per
    upstream event. The client gets the same text at the same moment, in fewer deltas; a paced
    stream (one event a read) is passed as it is."""
    if len(events) < 2:
        return events
    out: list[tuple] = []
    run: list[str] = []
    kind = None
    for ev in events:
        k = ev[0]
        if k == kind:                          # kind is "text" or "reasoning" (or None)
            run.append(ev[1])
            continue
        if run:
            out.append((kind, run[0] if len(run) == 1 else "".join(run)))
            run = []
        if k == "text" or k == "reasoning":
            kind = k
            run.append(ev[1])
        else:
            kind = None
            out.append(ev)
    if run:
        out.append((kind, run[0] if len(run) == 1 else "".join(run)))
    return out


def checked_answer(resp: dict) -> dict:
    """A decoded whole answer (IR Response), once its id, model, finish and every string field
    of its parts is a string."""
    for key in ("id", "model", "finish"):       # (an outline has no id or model)
        if type(resp.get(key, "")) is not str:
            raise _not_a_string(resp[key], f"the answer's {key}")
    for part in resp["content"]:
        for key in _PART_STRINGS.get(part["type"], ()):
            if type(part[key]) is not str:
                raise _not_a_string(part[key], f"a {part['type']} part's {key}")
        for key in _PART_OPTIONAL_STRINGS.get(part["type"], ()):
            value = part.get(key)
            if value is not None and type(value) is not str:
                raise _not_a_string(value, f"a {part['type']} part's {key}")
    return resp


# Every decoder to the IR wears one of these: what it hands on is checked as it leaves.
answer_guard = guarded(502, "upstream answer", checked_answer)
stream_guard = guarded(502, "upstream stream", checked_events)


def checked_vectors(result: tuple[list, int]) -> tuple[list[list[float]], int]:
    """(vectors, tokens) of an embeddings answer, once each vector is a list of numbers."""
    for vector in result[0]:
        if type(vector) is not list or not all(
                (type(x) is float or type(x) is int) for x in vector):
            raise GatewayError(502, "malformed upstream answer: an embedding is not a list of "
                                    "numbers")
    return result


def checked_request(ir: dict) -> dict:
    """A client's request in the IR, once each of its tools has a name, a description and a
    parameters schema of the IR's types: the converters copy them from the client's body,
    where a schema can be a number; a 400 names the first tool that is not, before anything is
    sent upstream."""
    for t in ir["tools"]:
        name = t["name"]
        if type(name) is not str or not name:
            raise GatewayError(400, "a tool has no name: give each tool a non-empty string name",
                               param="tools")
        if type(t["description"]) is not str:
            raise GatewayError(400, f"tool {name[:100]!r}: its description is a "
                                    f"{type(t['description']).__name__}, not a string",
                               param="tools")
        if type(t["parameters"]) is not dict:
            raise GatewayError(400, f"tool {name[:100]!r}: its parameters are a "
                                    f"{type(t['parameters']).__name__}, not a JSON Schema object",
                               param="tools")
    return ir


UNSIGNED_THINKING = "aigateway-unsigned"      # signature we put on thinking we did not get signed
THOUGHT_SKIP = "skip_thought_signature_validator"   # Gemini's escape hatch for foreign history
DEFAULT_ANTHROPIC_MAX_TOKENS = 8192
_ANTHROPIC_ID_RX = re.compile(r"[A-Za-z0-9_-]+\Z")
_DATA_URL_RX = re.compile(r"data:([^;,]+)?(?:;[^,]*)?;base64,(.*)\Z", re.S)
# Reasoning effort on one scale, weakest first: OpenAI's reasoning_effort and Responses'
# reasoning.effort take none..xhigh; Anthropic's output_config.effort low..max; Gemini 3 a
# thinkingLevel, 2.5 a thinkingBudget. Each dialect maps to the nearest level it has.
EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")
_EFFORT_BUDGET = {"minimal": 1024, "low": 1024, "medium": 8192, "high": 24576, "xhigh": 32768,
                  "max": 32768}


def new_usage(inp: int = 0, out: int = 0, cache_read: int = 0, cache_write: int = 0,
              reasoning: int = 0) -> dict:
    return {"input": inp, "output": out, "cache_read": cache_read, "cache_write": cache_write,
            "reasoning": reasoning}


def _num(value: Any) -> int:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0


def parse_arguments(text: str | None) -> dict:
    """Tool-call arguments as an object: empty text is {} (PROTOCOLS.md section 7 #15); text that
    is not a JSON object is kept as {"raw": text} rather than lost."""
    if not text or not text.strip():
        return {}
    try:
        value = json_loads(text, "tool-call arguments")
    except GatewayError:
        return {"raw": text}
    return value if isinstance(value, dict) else {"value": value}


def anthropic_tool_id(tool_id: str) -> str:
    """Anthropic ids must match ^[a-zA-Z0-9_-]+$; other providers' ids (``functions.Bash:0``)
    are rewritten deterministically, the same way for a call and its result."""
    if tool_id and _ANTHROPIC_ID_RX.match(tool_id):
        return tool_id
    digest = hashlib.sha1(tool_id.encode()).hexdigest()[:8]
    return f"toolu_{re.sub(r'[^A-Za-z0-9_-]', '_', tool_id)[:40]}_{digest}"


def image_part_from_url(url: str) -> dict:
    m = _DATA_URL_RX.match(url)
    if m:
        return {"type": "image", "media_type": m.group(1) or "image/png", "data": m.group(2)}
    return {"type": "image", "url": url}


def image_data_url(part: dict) -> str:
    if "url" in part:
        return part["url"]
    return f"data:{part.get('media_type') or 'image/png'};base64,{part['data']}"


def result_images_moved(messages: list[dict]) -> Iterator[dict]:
    """IR ``messages`` for an API whose tool results carry text only: the images of a run of
    tool turns follow it in a user turn of their own (before the next turn)."""
    pending: list[dict] = []
    for m in messages:
        if m["role"] != "tool" and pending:
            yield {"role": "user", "content": pending}
            pending = []
        yield m
        if m["role"] == "tool":
            pending += [c for r in m["content"] for c in r["content"] if c["type"] == "image"]
    if pending:
        yield {"role": "user", "content": pending}


# Asked in a user turn of its own after a reply the client began (an Anthropic prefill, OpenAI
# messages ending with the assistant) for a model that refuses a conversation ending with its
# own turn (Claude 4.6 and later, Gemini 3.6 Flash and later): the answer then continues it.
CONTINUE_ASK = "Continue your reply from exactly where it stops, without repeating any of it."


def parts_text(parts: list[dict]) -> str:
    return "".join(p["text"] for p in parts if p.get("type") == "text")


def _text_only(content: Any) -> list[dict]:
    """String or list of text-ish parts -> IR text parts (empty text dropped)."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    out = []
    for p in content or []:
        if isinstance(p, dict):
            text = p.get("text")
            if isinstance(text, str) and text:
                out.append({"type": "text", "text": text})
        elif isinstance(p, str) and p:
            out.append({"type": "text", "text": p})
    return out


def effort_from_budget(budget: int) -> str:
    return "low" if budget < 2048 else "medium" if budget < 16384 else "high" \
        if budget < 32768 else "xhigh"


def room_for_thinking(max_tokens: int, budget: int, cap: int = 0) -> tuple[int, int]:
    """(max_tokens, budget) so that max_tokens, which counts the thinking too on Anthropic and
    Gemini, leaves room for an answer after the budget; never past the channel's ``cap``."""
    if max_tokens <= budget:
        max_tokens = budget + min(4096, max(1024, max_tokens))
        if cap and max_tokens > cap:
            budget, max_tokens = max(1024, cap - 1024), cap
    return max_tokens, budget


def ir_effort(value: Any) -> str | None:
    """A client's effort word on the IR scale (None when it is not one)."""
    value = value.lower() if isinstance(value, str) else None
    return value if value in EFFORTS else None


_OPENAI_MODEL_RX = re.compile(r"(?:^|[/:.])(?:gpt-(\d+)(?:\.(\d+))?|o(\d))(?![\d.])", re.I)


def openai_effort_levels(model: str) -> tuple[str, ...] | None:
    """The reasoning efforts an OpenAI model takes, by its name; None for a name of no family
    below (the client's effort goes as it is). gpt-6: low..xhigh, none and minimal refused
    (checked live, BerriAI/litellm-docs#1173); gpt-5.6: "Supported values are: 'none', 'low',
    'medium', 'high', and 'xhigh'" (the API's refusal, quoted in mnfst/modelparams.dev#236);
    gpt-5.1 and later no minimal (bolna-ai/bolna#852), xhigh from 5.2 on; gpt-5 minimal..high;
    the o-series low..high."""
    m = _OPENAI_MODEL_RX.search(model)
    if m is None:
        return None
    if m.group(3):
        return ("low", "medium", "high")
    major, minor = int(m.group(1)), int(m.group(2) or 0)
    if major >= 6:
        return ("low", "medium", "high", "xhigh")
    if major < 5:
        return None
    if minor >= 2:
        return ("none", "low", "medium", "high", "xhigh")
    return ("none", "low", "medium", "high") if minor else ("minimal", "low", "medium", "high")


def openai_takes_sampling(ir: dict, model: str) -> bool:
    """Whether ``model`` takes temperature and top_p for request ``ir``: OpenAI's reasoning
    models (the families of openai_effort_levels) answer any but the default with a 400
    "Unsupported value: 'temperature' does not support 0.5 with this model. Only the default
    (1) value is supported." (quoted in diffbot/code-gpt-docs#445 for gpt-5,
    johny-b/llmcomp#69 for gpt-5.4), unless they run with reasoning effort none."""
    if openai_effort_levels(model) is None:
        return True
    return bool(ir["reasoning"]) and openai_effort(ir["reasoning"]["effort"], model) == "none"


def nearest_effort(effort: str, levels: Iterable[str]) -> str:
    """Of ``levels`` (a model's, named on the EFFORTS scale), the one nearest ``effort``, a tie
    going up."""
    want = EFFORTS.index(effort)
    return min(levels, key=lambda lv: (abs(EFFORTS.index(lv) - want), -EFFORTS.index(lv)))


def openai_effort(effort: str, model: str = "") -> str:
    """IR effort -> OpenAI reasoning_effort / Responses reasoning.effort: the nearest level
    ``model`` takes, or none..xhigh (max -> xhigh) for a name we cannot place."""
    levels = openai_effort_levels(model)
    if levels is None:
        return "xhigh" if effort == "max" else effort
    return nearest_effort(effort, levels)


@guarded(400, "request body")
def estimate_tokens(ir: dict) -> int:
    """A fast local estimate of a request's prompt tokens (about 4 ASCII characters or one
    non-ASCII character per token, plus a few per message and the tool schemas)."""
    def count(text: str) -> int:
        ascii_chars = len(text.encode("ascii", "ignore"))
        return ascii_chars // 4 + (len(text) - ascii_chars) + 1

    total = sum(count(p["text"]) for p in ir["system"] if p.get("type") == "text")
    for msg in ir["messages"]:
        total += 4
        for p in msg["content"]:
            t = p["type"]
            if t == "text" or t == "reasoning":
                total += count(p.get("text") or "")
            elif t == "tool_call":
                total += count(p["name"]) + count(p["arguments"])
            elif t == "tool_result":
                total += count(parts_text(p["content"])) + 85 * sum(
                    1 for c in p["content"] if c["type"] == "image")
            elif t in ("image", "file"):
                total += 85 if t == "image" else count(p.get("data", "")) // 3
    for tool in ir["tools"]:
        total += count(tool["name"] + (tool.get("description") or "") +
                       json.dumps(tool.get("parameters") or {}))
    return max(total, 1)


def empty_request(model: str) -> dict:
    return {"model": model, "system": [], "messages": [], "tools": [], "tool_choice": None,
            "parallel_tool_calls": None, "max_tokens": None, "temperature": None, "top_p": None,
            "top_k": None, "seed": None, "presence_penalty": None, "frequency_penalty": None,
            "stop": [], "response_format": None, "reasoning": None, "stream": False,
            "include_usage": False, "user": None, "n": 1}


def _append(messages: list[dict], role: str, parts: list[dict]) -> None:
    """Add a turn, merging it into the previous one of the same role (tool turns stay apart)."""
    if not parts:
        return
    if messages and messages[-1]["role"] == role and role != "tool":
        messages[-1]["content"].extend(parts)
    else:
        messages.append({"role": role, "content": parts})


def tool_reference_text(name: str) -> str:
    """What a ``tool_reference`` block (Claude Code's tool search: the tool is loaded) tells a
    model of another provider."""
    return f"Tool {name} is now available."


def blocks_to_ir(content: Any, where: str) -> list[dict]:
    """Anthropic-style content blocks (also what some clients send on other routes) -> IR parts."""
    if isinstance(content, str):
        return _text_only(content)
    if not isinstance(content, list):
        raise GatewayError(400, f"{where}.content must be a string or a list of blocks")
    out = []
    for b in content:
        if not isinstance(b, dict):
            continue
        t = b.get("type")
        if t in ("text", "output_text", "input_text") and b.get("text"):
            out.append({"type": "text", "text": b["text"]})
        elif t in ("image", "document"):
            src = b.get("source") or {}
            kind = "image" if t == "image" else "file"
            if src.get("type") == "base64":
                part = {"type": kind, "media_type": src.get("media_type") or "", "data":
                        src.get("data") or ""}
                if kind == "file":
                    part["filename"] = b.get("title") or "document.pdf"
                out.append(part)
            elif src.get("type") == "url" and kind == "image":
                out.append({"type": "image", "url": src.get("url") or ""})
            elif src.get("type") == "text":
                out.append({"type": "text", "text": src.get("data") or ""})
        elif t == "thinking":
            sig = b.get("signature")
            out.append({"type": "reasoning", "text": b.get("thinking") or "",
                        "signature": sig if sig and sig != UNSIGNED_THINKING else None,
                        "redacted": None})
        elif t == "redacted_thinking":
            out.append({"type": "reasoning", "text": "", "signature": None,
                        "redacted": b.get("data")})
        elif t == "tool_use":
            inp = b.get("input")
            out.append({"type": "tool_call", "id": str(b.get("id") or ""),
                        "name": str(b.get("name") or ""),
                        "arguments": json.dumps(inp if inp is not None else {},
                                                ensure_ascii=False)})
        elif t == "tool_reference" and isinstance(b.get("tool_name"), str):
            out.append({"type": "text", "text": tool_reference_text(b["tool_name"]),
                        "reference": b["tool_name"]})
        elif t == "tool_result":
            out.append({"type": "tool_result", "id": str(b.get("tool_use_id") or ""),
                        "name": None,
                        "content": [p for p in blocks_to_ir(
                            b.get("content") or "", where) if p["type"] in ("text", "image")],
                        "is_error": bool(b.get("is_error"))})
    return out


_SCAN_STRING = json.decoder.scanstring         # json's C scanner for one string literal
TEMPLATE_LEARNS = 4       # attempts per stream to learn a TextTemplate (a stream may have none)
_PROBE = "aigateway-probe"                      # put in the text slot to check what it holds


class TextTemplate:
    """Reads the usual stream event, a text delta, without parsing it. Within one stream such
    events differ only in their text (the same id, model, index and keys in the same order) and,
    on OpenAI, in an ``obfuscation`` string of random padding. The template holds the bytes
    around those string literals, learned from one event that was parsed strictly; a later
    event that is exactly those bytes with a well-formed JSON string in each slot has the same
    structure, so only its strings need decoding (json's C scanner). Anything else, an escape
    that may leave a lone surrogate included, is for the strict parser. Learning checks itself:
    a probe string put in the text slot must come back, parsed, as the text the decoder
    reads."""

    __slots__ = ("_text_rx", "_ignored", "_reads", "name", "pieces", "text_at", "learns")

    def __init__(self, text_rx: re.Pattern, ignored: tuple[tuple[str, re.Pattern], ...],
                 reads: Callable[[str | None, dict], str | None]):
        """``text_rx``: the pattern before the text's string; ``ignored``: top-level string
        fields whose name the decoder reads nowhere, each with its pattern; ``reads``: the
        decoder's text of an event that is only a text event, else None."""
        self._text_rx, self._ignored, self._reads = text_rx, ignored, reads
        self.name: str | None = None        # the SSE event name the template was learned with
        # The text before each slot's string, its opening quote included, and after the last.
        self.pieces: tuple[str, ...] | None = None
        self.text_at = 0                    # which slot holds the text
        self.learns = 0

    def match(self, name: str | None, payload: str) -> str | None:
        """The text of ``payload`` when it fits the template and is not empty, else None."""
        pieces = self.pieces
        if pieces is None or name != self.name or not payload.startswith(pieces[0]):
            return None
        pos, values = len(pieces[0]), []
        try:
            for piece in pieces[1:]:
                value, pos = _SCAN_STRING(payload, pos, True)
                if not payload.startswith(piece, pos):
                    return None
                pos += len(piece)
                values.append(value)
        except ValueError:                  # json.JSONDecodeError: not one well-formed string
            return None
        if pos != len(payload) or \
                "\\u" in payload and any(_SURROGATE_RX.search(v) for v in values):
            return None
        return values[self.text_at] or None

    def learn(self, name: str | None, payload: str, text: str, obj: dict) -> None:
        """Learn from ``payload`` (parsed: ``obj``), whose text ``reads`` found to be ``text``:
        its slot is the string after ``text_rx`` holding ``text``, checked by a probe; each
        ignored key's slot the first string after its pattern holding the top-level value. At
        most TEMPLATE_LEARNS tries a stream."""
        self.learns += 1
        self.pieces = None
        spans = []
        wanted = [(text, self._text_rx)] + [(obj.get(k), rx) for k, rx in self._ignored]
        for want, rx in wanted:
            for m in rx.finditer(payload):
                try:
                    value, end = _SCAN_STRING(payload, m.end(), True)
                except ValueError:
                    continue
                if value == want:
                    spans.append((m.end() - 1, end, len(spans)))
                    break
            else:
                if want is not None:
                    return                          # a slot not found: no template
        spans.sort()
        pieces, probe, at = [], [], 0
        for start, end, slot in spans:
            pieces.append(payload[at:start + 1])
            probe += [pieces[-1], f"{_PROBE}-{slot}", '"']
            at = end
        pieces.append(payload[at:])
        probe.append(pieces[-1])
        try:
            back = json_loads("".join(probe), "a stream template", status=502,
                              unique_keys=False, error=ProtocolError)
        except ProtocolError:
            return
        if not isinstance(back, dict) or self._reads(name, back) != f"{_PROBE}-0":
            return
        self.name, self.pieces = name, tuple(pieces)
        self.text_at = [slot for _, _, slot in spans].index(0)


class StreamDecoder:
    """What every upstream stream decoder shares: the ("start", id, model) event exactly once,
    and at the end one ("finish", reason) event, where a turn with any tool call that ended
    normally finishes with "tool_calls".

    A decoder whose dialect has a usual text event names ``text_rx`` (the pattern before its
    text string), ``ignored`` (top-level string fields whose name it reads nowhere, each with
    its pattern) and ``_text_of``: then ``_sse_objects`` reads such events with a TextTemplate
    and yields their text as a str instead of the object."""

    id_prefix = "chatcmpl-"
    text_rx: re.Pattern | None = None
    ignored: tuple[tuple[str, re.Pattern], ...] = ()

    def __init__(self):
        self._sse = SSEDecoder()
        self._started = False
        self._tools = 0                  # tool calls seen, the next IR tool index
        self.finish: str | None = None
        self._template = TextTemplate(self.text_rx, self.ignored, self._text_of) \
            if self.text_rx is not None else None

    def _text_of(self, name: str | None, obj: dict) -> str | None:
        """The text when ``obj`` is the dialect's usual text event, which the decoder reads as
        ("text", that) and nothing more; else None."""
        return None

    def looking_only(self) -> "StreamDecoder":
        """This decoder, for a look at a stream's first events only (a passthrough's hold,
        dropped at the first content): it learns no template, which would never be used."""
        self._template = None
        return self

    def _sse_objects(self, data: bytes) -> Iterable[tuple[str | None, dict | str]]:
        """(event name, JSON object) for each whole SSE event in ``data``, or (name, text) for
        a text event read by the template; the [DONE] sentinel, blank events and JSON that is
        not an object are skipped (Gemini's one-element lists opened); an event that is not
        strict JSON (section 3) raises a 502 ProtocolError."""
        tpl = self._template
        for name, payload, _ in self._sse.feed(data):
            if tpl is not None and tpl.pieces is not None:
                text = tpl.match(name, payload)
                if text is not None:
                    yield name, text
                    continue
            if payload.startswith("[DONE]") or not payload or payload.isspace():
                continue
            obj = json_loads(payload, "an upstream stream event", status=502,
                             unique_keys=False, error=ProtocolError)
            if isinstance(obj, list) and obj:
                obj = obj[0]
            if isinstance(obj, dict):
                if tpl is not None and tpl.learns < TEMPLATE_LEARNS:
                    text = self._text_of(name, obj)
                    if text:
                        tpl.learn(name, payload, text, obj)
                yield name, obj

    def _start(self, out: list[tuple], rid: Any = None, model: Any = None) -> None:
        if not self._started:
            self._started = True
            out.append(("start", rid or new_id(self.id_prefix), model or ""))

    def _finish_reason(self) -> str:
        finish = self.finish or "stop"
        return "tool_calls" if self._tools and finish == "stop" else finish

    @stream_guard
    def close(self) -> list[tuple]:
        out: list[tuple] = []
        self._start(out)
        out.append(("finish", self._finish_reason()))
        return out


def response_events(resp: dict) -> list[tuple]:
    """A whole IR response as the stream events that would have carried it."""
    out: list[tuple] = [("start", resp["id"], resp["model"])]
    tools = 0
    for p in resp["content"]:
        if p["type"] in ("text", "reasoning"):
            out.append((p["type"], p.get("text") or ""))
        elif p["type"] == "tool_call":
            out += [("tool", tools, p["id"], p["name"]), ("args", tools, p["arguments"])]
            tools += 1
    return out + [("usage", resp["usage"]), ("finish", resp["finish"])]


class _Replay:
    """A stream decoder for an answer that is already whole: all its events at the end."""

    def __init__(self, events: list[tuple]):
        self._events = events

    def feed(self, data: bytes) -> list[tuple]:
        return []

    def close(self) -> list[tuple]:
        return self._events


# 9.3 OpenAI Chat Completions ---------------------------------------------------------------------
# The openai client dialect and the openai and custom channel types (custom: any OpenAI-
# compatible server, with its quirks), embeddings included.

_FOREIGN_PART_TYPES = frozenset(("tool_use", "tool_result", "input_text", "output_text",
                                 "input_image", "image"))


def chat_body_is_foreign(body: dict) -> bool:
    """Whether a /v1/chat/completions body is shaped for another API (Cursor sends Responses-style
    ``input`` and flat tools, or Anthropic blocks and ``input_schema``; section 7 #25). Such a
    body is normalised through the internal form even for an OpenAI channel."""
    if "messages" not in body and "input" in body:
        return True
    tools, messages = body.get("tools"), body.get("messages")
    # Ill-typed fields are not foreign: whoever reads the body next refuses them.
    if isinstance(tools, list) and any(isinstance(t, dict) and "function" not in t and
                                       t.get("type") != "custom" for t in tools):
        return True
    for m in messages if isinstance(messages, list) else ():
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list) and any(
                isinstance(p, dict) and isinstance(kind := p.get("type"), str) and
                kind in _FOREIGN_PART_TYPES for p in content):
            return True
    return False


def namespaced_tool_name(namespace: Any, name: str) -> str:
    """The one flat name a tool inside a Responses ``namespace`` tool goes by on every channel
    (Codex's MCP tools: namespace "mcp__server", tool "search" -> "mcp__server__search")."""
    return f"{namespace}__{name}" if isinstance(namespace, str) and namespace else name


def responses_input_to_messages(items: Any, instructions: Any = None) -> list[dict]:
    """Responses-API ``input`` (a string or items) as Chat Completions messages."""
    msgs: list[dict] = []
    if isinstance(instructions, str) and instructions:
        msgs.append({"role": "system", "content": instructions})
    if isinstance(items, str):
        return msgs + [{"role": "user", "content": items}]
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict):
            continue
        kind = item.get("type", "message")
        if kind == "message":
            msgs.append({"role": item.get("role") or "user", "content": item.get("content")})
        elif kind in ("function_call", "custom_tool_call"):
            call = {"id": item.get("call_id") or item.get("id") or new_id("call_"),
                    "type": "function", "function": {
                        "name": namespaced_tool_name(item.get("namespace"),
                                                     item.get("name") or ""),
                        "arguments": item.get("arguments") if kind == "function_call"
                        else json.dumps({"input": item.get("input") or ""})}}
            if msgs and msgs[-1]["role"] == "assistant":
                msgs[-1].setdefault("tool_calls", []).append(call)
            else:
                msgs.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind in ("function_call_output", "custom_tool_call_output"):
            msgs.append({"role": "tool", "tool_call_id": item.get("call_id") or "",
                         "content": item.get("output")})
        elif kind == "tool_search_call":
            call = {"id": item.get("call_id") or item.get("id") or new_id("call_"),
                    "type": "function", "function": {"name": TOOL_SEARCH, "arguments":
                                                     json.dumps(item.get("arguments") or {})}}
            if msgs and msgs[-1]["role"] == "assistant":
                msgs[-1].setdefault("tool_calls", []).append(call)
            else:
                msgs.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "tool_search_output":
            names = [n for n, _ in _searched_tools(item)]
            msgs.append({"role": "tool", "tool_call_id": item.get("call_id") or "",
                         "content": f"Tools now available: {', '.join(names)}" if names
                         else "No tools matched."})
    return msgs


TOOL_SEARCH = "tool_search"


def _searched_tools(item: dict) -> list[tuple[str, tuple[dict, str | None]]]:
    """(flat name, (tool, namespace)) of every tool a tool_search_output item loads."""
    out = []
    for t in item.get("tools") or []:
        if not isinstance(t, dict):
            continue
        inner = [(x, t.get("name")) for x in t.get("tools") or [] if isinstance(x, dict)] \
            if t.get("type") == "namespace" else [(t, None)]
        out += [(namespaced_tool_name(ns, str(x.get("name") or "")), (x, ns))
                for x, ns in inner if x.get("name")]
    return out


@guarded(400, "request body")
def openai_request_to_ir(body: dict) -> dict:
    ir = empty_request(body.get("model") or "")
    msgs = body.get("messages")
    if msgs is None and "input" in body:
        msgs = responses_input_to_messages(body["input"], body.get("instructions"))
    if not isinstance(msgs, list):
        raise GatewayError(400, "'messages' must be a list of message objects", param="messages")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise GatewayError(400, f"messages[{i}] is not an object", param=f"messages[{i}]")
        role = m.get("role")
        content = m.get("content")
        if role in ("system", "developer"):
            ir["system"] += _text_only(content)
        elif role == "user":
            parts = _openai_user_parts(content, i)
            for r in (p for p in parts if p["type"] == "tool_result"):
                ir["messages"].append({"role": "tool", "content": [r]})
            _append(ir["messages"], "user", [p for p in parts if p["type"] != "tool_result"])
        elif role == "assistant":
            parts: list[dict] = []
            reasoning = m.get("reasoning_content") or m.get("reasoning")
            if isinstance(reasoning, str) and reasoning:
                parts.append({"type": "reasoning", "text": reasoning, "signature": None,
                              "redacted": None})
            if isinstance(content, list):       # Anthropic-style blocks, output_text parts
                parts += [p for p in blocks_to_ir(content, f"messages[{i}]")
                          if p["type"] != "reasoning"]
            else:
                parts += _text_only(content)
            if isinstance(m.get("refusal"), str) and m["refusal"] and not parts:
                parts.append({"type": "text", "text": m["refusal"]})
            calls = m.get("tool_calls") or []
            if m.get("function_call"):
                calls = [{"id": f"call_fn_{i}", "function": m["function_call"]}]
            for c in calls:
                fn = c.get("function") or c.get("custom") or {}
                args = fn.get("arguments", fn.get("input", ""))
                parts.append({"type": "tool_call", "id": str(c.get("id") or f"call_{i}"),
                              "name": str(fn.get("name") or ""),
                              "arguments": args if isinstance(args, str) else json.dumps(args)})
            _append(ir["messages"], "assistant", parts)
        elif role in ("tool", "function"):
            result = _openai_user_parts(content, i)
            tool_id = m.get("tool_call_id") or (f"call_fn_{i - 1}" if role == "function" else "")
            ir["messages"].append({"role": "tool", "content": [{
                "type": "tool_result", "id": str(tool_id), "name": m.get("name"),
                "content": result, "is_error": False}]})
        else:
            raise GatewayError(400, f"messages[{i}].role {role!r} is not one of system, "
                                    f"developer, user, assistant, tool", param=f"messages[{i}]")
    tools = body.get("tools") or []
    if body.get("functions"):
        tools = [{"type": "function", "function": f} for f in body["functions"]]
    for t in tools:
        fn = t.get("function") if t.get("type", "function") == "function" else None
        if fn is None and t.get("name") and t.get("type", "function") == "function":
            fn = dict(t, parameters=t.get("parameters") or t.get("input_schema"))  # flat
        if fn is None and t.get("type") == "custom":
            c = t.get("custom") or {}
            fn = {"name": c.get("name"), "description": c.get("description"), "parameters": {
                "type": "object", "properties": {"input": {"type": "string"}},
                "required": ["input"]}}
        if fn and fn.get("name"):
            ir["tools"].append({"name": fn["name"], "description": fn.get("description") or "",
                                "parameters": fn.get("parameters") or
                                {"type": "object", "properties": {}}})
    tc = body.get("tool_choice", body.get("function_call"))
    if isinstance(tc, str):
        ir["tool_choice"] = {"any": "required"}.get(tc, tc) if tc in (
            "auto", "none", "required", "any") else None
    elif isinstance(tc, dict):
        name = (tc.get("function") or tc.get("custom") or {}).get("name") or tc.get("name")
        ir["tool_choice"] = {"name": name} if name else None
    ir["parallel_tool_calls"] = body.get("parallel_tool_calls")
    mt = body.get("max_completion_tokens", body.get("max_tokens"))
    ir["max_tokens"] = mt if isinstance(mt, int) and not isinstance(mt, bool) else None
    for key in ("temperature", "top_p", "top_k", "seed", "presence_penalty", "frequency_penalty"):
        value = body.get(key)
        ir[key] = value if isinstance(value, (int, float)) and not isinstance(value, bool) \
            else None
    stop = body.get("stop")
    ir["stop"] = [stop] if isinstance(stop, str) else [s for s in stop or [] if isinstance(s, str)]
    rf = body.get("response_format")
    if isinstance(rf, dict) and rf.get("type") == "json_object":
        ir["response_format"] = {"type": "json_object"}
    elif isinstance(rf, dict) and rf.get("type") == "json_schema":
        js = rf.get("json_schema") or {}
        ir["response_format"] = {"type": "json_schema", "name": js.get("name") or "output",
                                 "schema": js.get("schema") or {}, "strict": js.get("strict")}
    effort = body.get("reasoning_effort") or (body.get("reasoning") or {}).get("effort") \
        if isinstance(body.get("reasoning", {}), dict) else body.get("reasoning_effort")
    if ir_effort(effort):
        ir["reasoning"] = {"effort": ir_effort(effort), "budget": None}
    ir["stream"] = body.get("stream") is True
    ir["include_usage"] = bool((body.get("stream_options") or {}).get("include_usage"))
    ir["user"] = body.get("user") or body.get("safety_identifier")
    ir["n"] = body.get("n") if isinstance(body.get("n"), int) else 1
    return ir


def _openai_user_parts(content: Any, i: int) -> list[dict]:
    if isinstance(content, str) or content is None:
        return _text_only(content)
    if not isinstance(content, list):
        raise GatewayError(400, f"messages[{i}].content must be a string or a list of parts",
                           param=f"messages[{i}].content")
    out = []
    for p in content:
        if not isinstance(p, dict):
            continue
        t = p.get("type")
        if t in ("text", "input_text", "output_text") and p.get("text"):
            out.append({"type": "text", "text": p["text"]})
        elif t in ("image", "tool_result", "document"):
            out += blocks_to_ir([p], f"messages[{i}]")
        elif t == "input_image" and p.get("image_url"):
            out.append(image_part_from_url(p["image_url"]))
        elif t == "image_url":
            url = (p.get("image_url") or {}).get("url") if isinstance(p.get("image_url"), dict) \
                else p.get("image_url")
            if url:
                out.append(image_part_from_url(url))
        elif t == "input_audio":
            a = p.get("input_audio") or {}
            out.append({"type": "audio", "format": a.get("format") or "wav",
                        "data": a.get("data") or ""})
        elif t == "file":
            f = p.get("file") or {}
            m = _DATA_URL_RX.match(f.get("file_data") or "")
            if m:
                out.append({"type": "file", "media_type": m.group(1) or "application/pdf",
                            "data": m.group(2), "filename": f.get("filename") or "file"})
    return out


def ir_to_openai_request(ir: dict, model: str, *, stream: bool,
                         max_tokens_field: str = "max_tokens") -> dict:
    msgs: list[dict] = []
    system = parts_text(ir["system"])
    if system:
        msgs.append({"role": "system", "content": system})
    for m in result_images_moved(ir["messages"]):
        role = m["role"]
        if role == "user":
            msgs.append({"role": "user", "content": _openai_content(m["content"])})
        elif role == "assistant":
            text = parts_text(m["content"])
            out: dict[str, Any] = {"role": "assistant", "content": text or None}
            reasoning = "".join(p.get("text") or "" for p in m["content"]
                                if p["type"] == "reasoning")
            if reasoning:
                out["reasoning_content"] = reasoning
            calls = [{"id": p["id"], "type": "function", "function": {
                "name": p["name"], "arguments": p["arguments"] or "{}"}}
                for p in m["content"] if p["type"] == "tool_call"]
            if calls:
                out["tool_calls"] = calls
            msgs.append(out)
        else:
            for r in m["content"]:
                text = parts_text(r["content"])
                if r.get("is_error"):
                    text = f"Error: {text}"
                msgs.append({"role": "tool", "tool_call_id": r["id"], "content": text})
    body: dict[str, Any] = {"model": model, "messages": msgs}
    if ir["tools"]:
        body["tools"] = [{"type": "function", "function": {
            "name": t["name"], "description": t.get("description") or "",
            "parameters": t.get("parameters") or {"type": "object", "properties": {}}}}
            for t in ir["tools"]]
        tc = ir["tool_choice"]
        if isinstance(tc, dict):
            body["tool_choice"] = {"type": "function", "function": {"name": tc["name"]}}
        elif tc:
            body["tool_choice"] = tc
        if ir["parallel_tool_calls"] is not None:
            body["parallel_tool_calls"] = ir["parallel_tool_calls"]
    if ir["max_tokens"] is not None:
        body[max_tokens_field] = ir["max_tokens"]
    for key in ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty"):
        if ir[key] is not None and (key in ("seed", "presence_penalty", "frequency_penalty") or
                                    openai_takes_sampling(ir, model)):
            body[key] = ir[key]
    if ir["stop"]:
        body["stop"] = ir["stop"][:4]
    rf = ir["response_format"]
    if rf and rf["type"] == "json_schema":
        js = {"name": rf["name"], "schema": rf["schema"]}
        if rf.get("strict") is not None:
            js["strict"] = rf["strict"]
        body["response_format"] = {"type": "json_schema", "json_schema": js}
    elif rf:
        body["response_format"] = {"type": "json_object"}
    if ir["reasoning"]:
        body["reasoning_effort"] = openai_effort(ir["reasoning"]["effort"], model)
    if ir["user"]:
        body["user"] = ir["user"]
    if ir["n"] != 1:
        body["n"] = ir["n"]
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


def _openai_content(parts: list[dict]) -> Any:
    if all(p["type"] == "text" for p in parts):
        return parts_text(parts)
    out = []
    for p in parts:
        if p["type"] == "text":
            out.append({"type": "text", "text": p["text"]})
        elif p["type"] == "image":
            out.append({"type": "image_url", "image_url": {"url": image_data_url(p)}})
        elif p["type"] == "audio":
            out.append({"type": "input_audio", "input_audio": {"data": p["data"],
                                                               "format": p["format"]}})
        elif p["type"] == "file":
            out.append({"type": "file", "file": {
                "filename": p.get("filename") or "file",
                "file_data": f"data:{p['media_type']};base64,{p['data']}"}})
    return out


_OPENAI_FINISH_IN = {"stop": "stop", "length": "length", "tool_calls": "tool_calls",
                     "function_call": "tool_calls", "content_filter": "content_filter"}


def openai_usage_to_ir(u: Any) -> dict:
    if not isinstance(u, dict):
        return new_usage()
    pd, cd = u.get("prompt_tokens_details"), u.get("completion_tokens_details")
    pd, cd = pd if isinstance(pd, dict) else {}, cd if isinstance(cd, dict) else {}
    return new_usage(_num(u.get("prompt_tokens")), _num(u.get("completion_tokens")),
                     _num(pd.get("cached_tokens")), _num(pd.get("cache_write_tokens")),
                     _num(cd.get("reasoning_tokens")))


def ir_usage_to_openai(u: dict) -> dict:
    out: dict[str, Any] = {"prompt_tokens": u["input"], "completion_tokens": u["output"],
                           "total_tokens": u["input"] + u["output"]}
    if u["cache_read"] or u["cache_write"]:
        out["prompt_tokens_details"] = {"cached_tokens": u["cache_read"]}
        if u["cache_write"]:
            out["prompt_tokens_details"]["cache_write_tokens"] = u["cache_write"]
    if u["reasoning"]:
        out["completion_tokens_details"] = {"reasoning_tokens": u["reasoning"]}
    return out


@answer_guard
def openai_response_to_ir(body: dict) -> dict:
    choice = (body.get("choices") or [{}])[0] or {}
    msg = choice.get("message") or {}
    content: list[dict] = []
    reasoning = msg.get("reasoning_content") or msg.get("reasoning")
    if isinstance(reasoning, str) and reasoning:
        content.append({"type": "reasoning", "text": reasoning, "signature": None,
                        "redacted": None})
    content += _text_only(msg.get("content"))
    if not content and msg.get("refusal"):
        content.append({"type": "text", "text": msg["refusal"]})
    calls = msg.get("tool_calls") or []
    for n, c in enumerate(calls):
        fn = c.get("function") or {}
        content.append({"type": "tool_call", "id": c.get("id") or new_id("call_"),
                        "name": fn.get("name") or "", "arguments": fn.get("arguments") or "{}"})
    finish = _OPENAI_FINISH_IN.get(choice.get("finish_reason") or "stop", "stop")
    if calls and finish == "stop":
        finish = "tool_calls"
    return {"id": body.get("id") or new_id("chatcmpl-"), "model": body.get("model") or "",
            "content": content, "finish": finish, "usage": openai_usage_to_ir(body.get("usage"))}


@guarded(502, "upstream answer")
def ir_to_openai_response(resp: dict, model: str) -> dict:
    text = parts_text(resp["content"])
    msg: dict[str, Any] = {"role": "assistant", "content": text or None, "refusal": None}
    reasoning = "".join(p.get("text") or "" for p in resp["content"] if p["type"] == "reasoning")
    if reasoning:
        msg["reasoning_content"] = reasoning
    calls = [{"id": p["id"], "type": "function", "function": {
        "name": p["name"], "arguments": p["arguments"] or "{}"}}
        for p in resp["content"] if p["type"] == "tool_call"]
    if calls:
        msg["tool_calls"] = calls
    rid = resp["id"] if resp["id"].startswith("chatcmpl") else "chatcmpl-" + resp["id"]
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": msg, "logprobs": None,
                         "finish_reason": resp["finish"]}],
            "usage": ir_usage_to_openai(resp["usage"])}


class OpenAIStreamDecoder(StreamDecoder):
    """OpenAI chat-completion SSE chunks (upstream) -> IR stream events. Tool-call fragments are
    routed by their ``index``; a fragment without one goes by id, else to the newest call.

    Some servers interleave the fragments of parallel calls (index 0, 1, 0, 1 ...), which no
    client dialect but Chat Completions can carry. So only the first call streams as it comes;
    every later call is held, name and arguments, and emitted whole in index order when the
    choice finishes (or the stream ends): the IR events stay sequential, one call after the
    other, each complete before the next begins."""

    text_rx = re.compile(r'"content"\s*:\s*"')
    # Chat Completions streams pad each delta with a random "obfuscation" string unless the
    # request sets stream_options.include_obfuscation to false (OpenAI API reference,
    # ChatCompletionStreamOptions); the decoder never reads it.
    ignored = (("obfuscation", re.compile(r'"obfuscation"\s*:\s*"')),)

    def __init__(self):
        super().__init__()
        self._index: dict[int, int] = {}          # upstream index -> IR index
        self._ids: dict[str, int] = {}
        self._held: dict[int, list] = {}          # IR index -> [id, name, [argument pieces]]
        self._released = False                    # held calls went out: call 0 is closed
        self.usage: dict | None = None

    def _text_of(self, name: str | None, chunk: dict) -> str | None:
        choices = chunk.get("choices")
        if "error" in chunk or chunk.get("usage") or not isinstance(choices, list) or \
                len(choices) != 1 or not isinstance(choices[0], dict):
            return None
        choice = choices[0]
        delta = choice.get("delta")
        if choice.get("index", 0) != 0 or choice.get("finish_reason") or \
                not isinstance(delta, dict) or len(delta) != 1:
            return None
        content = delta.get("content")
        return content if type(content) is str else None

    @stream_guard
    def feed(self, data: bytes) -> list[tuple]:
        out: list[tuple] = []
        for _, chunk in self._sse_objects(data):
            if type(chunk) is str:                  # the usual text event, read by template
                out.append(("text", chunk))
                continue
            if "error" in chunk:
                err = chunk["error"] if isinstance(chunk["error"], dict) else {}
                out.append(("error", GatewayError(502, str(err.get("message") or chunk["error"]))))
                continue
            if not self._started:
                self._start(out, chunk.get("id"), chunk.get("model"))
            if chunk.get("usage"):
                self.usage = openai_usage_to_ir(chunk["usage"])
                out.append(("usage", self.usage))
            for choice in chunk.get("choices") or ():
                if choice.get("index", 0) != 0:
                    continue
                delta = choice.get("delta") or {}
                content = delta.get("content")
                if len(delta) == 1 and content and isinstance(content, str):
                    out.append(("text", content))       # the usual chunk: text only
                else:
                    self._delta(delta, out)
                if choice.get("finish_reason"):
                    self.finish = _OPENAI_FINISH_IN.get(choice["finish_reason"], "stop")
                    self._release(out)
        return out

    def _release(self, out: list[tuple]) -> None:
        """The held calls, each whole, in index order."""
        self._released = self._released or bool(self._held)
        for idx in sorted(self._held):
            tid, name, args = self._held[idx]
            out.append(("tool", idx, tid, name))
            if args:
                out.append(("args", idx, "".join(args)))
        self._held.clear()

    @stream_guard
    def close(self) -> list[tuple]:
        out: list[tuple] = []
        self._release(out)
        return out + super().close()

    def _delta(self, delta: dict, out: list[tuple]) -> None:
        reasoning = delta.get("reasoning_content") or delta.get("reasoning")
        if isinstance(reasoning, str) and reasoning:
            out.append(("reasoning", reasoning))
        if isinstance(delta.get("content"), str) and delta["content"]:
            out.append(("text", delta["content"]))
        for tc in delta.get("tool_calls") or []:
            fn = tc.get("function") or {}
            key = tc.get("index")
            tid = tc.get("id")
            if key is None:
                key = self._ids.get(tid, max(self._index, default=-1)) if tid else \
                    max(self._index, default=0)
            if key not in self._index:
                self._index[key] = self._tools
                tid = tid or new_id("call_")
                self._ids[tid] = key
                if self._tools == 0:
                    out.append(("tool", 0, tid, fn.get("name") or ""))
                else:
                    self._held[self._tools] = [tid, fn.get("name") or "", []]
                self._tools += 1
            idx = self._index[key]
            held = self._held.get(idx)
            if held is not None and not held[1] and fn.get("name"):
                held[1] = fn["name"]              # a name sent after the id
            args = fn.get("arguments")
            if isinstance(args, str) and args:
                if held is not None:
                    held[2].append(args)
                elif idx == 0 and not self._released:
                    out.append(("args", 0, args))


def _sse(data: dict) -> bytes:
    return b"data: " + json_dumps(data) + b"\n\n"


_CHUNK_OPEN_END = b',"logprobs":null,"finish_reason":null}]}\n\n'     # a chunk that does not finish


class OpenAIStreamEncoder:
    """IR stream events -> OpenAI chat-completion SSE for the client: role in the first chunk only,
    tool calls by dense ``index`` with id/type/name only in their first delta, a usage chunk with
    empty ``choices`` only when the client asked for it, then ``data: [DONE]``."""

    def __init__(self, model: str, include_usage: bool):
        self.model, self.include_usage = model, include_usage
        self.id = new_id("chatcmpl-")
        self.created = int(time.time())
        self.usage: dict | None = None
        self._role_sent = False
        self._tools = False
        self._finished = False
        self._prefix: bytes | None = None

    def _chunk(self, delta: dict, finish: str | None = None) -> bytes:
        if not self._role_sent:
            delta = dict(delta, role="assistant")
            self._role_sent = True
        if self._prefix is None:
            self._prefix = (b'data: {"id":' + json_dumps(self.id) +
                            b',"object":"chat.completion.chunk","created":%d,"model":'
                            % self.created + json_dumps(self.model) +
                            b',"choices":[{"index":0,"delta":')
        if finish is None:
            return self._prefix + json_dumps(delta) + _CHUNK_OPEN_END
        return (self._prefix + json_dumps(delta) + b',"logprobs":null,"finish_reason":' +
                json_dumps(finish) + b'}]}\n\n')

    def _text(self, key: bytes, text: str) -> bytes:
        """The chunk of a text or reasoning delta, the most frequent, built without a dict."""
        if self._prefix is None or not self._role_sent:
            return self._chunk({key.decode(): text})
        return self._prefix + b'{"%s":' % key + json_string(text) + b"}" + _CHUNK_OPEN_END

    def encode(self, events: list[tuple]) -> bytes:
        out = []
        for ev in events:
            kind = ev[0]
            if kind == "text":
                out.append(self._text(b"content", ev[1]))
            elif kind == "reasoning":
                out.append(self._text(b"reasoning_content", ev[1]))
            elif kind == "tool":
                self._tools = True
                out.append(self._chunk({"tool_calls": [{"index": ev[1], "id": ev[2],
                                                        "type": "function", "function": {
                                                            "name": ev[3], "arguments": ""}}]}))
            elif kind == "args":
                out.append(self._chunk({"tool_calls": [{"index": ev[1],
                                                        "function": {"arguments": ev[2]}}]}))
            elif kind == "usage":
                self.usage = ev[1]
            elif kind == "start":
                if not self._role_sent:
                    out.append(self._chunk({"content": ""}))
            elif kind == "finish" and not self._finished:
                self._finished = True
                reason = ev[1]
                if self._tools and reason == "stop":
                    reason = "tool_calls"
                out.append(self._chunk({}, reason))
                if self.include_usage:
                    out.append(_sse({"id": self.id, "object": "chat.completion.chunk",
                                     "created": self.created, "model": self.model,
                                     "choices": [],
                                     "usage": ir_usage_to_openai(self.usage or new_usage())}))
                out.append(b"data: [DONE]\n\n")
            elif kind == "error" and not self._finished:
                self._finished = True
                out.append(stream_error_event(OPENAI, ev[1]))
        return b"".join(out)


def embedding_inputs(body: dict) -> list[str]:
    inp = body.get("input")
    if isinstance(inp, str):
        return [inp]
    if isinstance(inp, list) and inp and all(isinstance(x, str) for x in inp):
        return inp
    raise GatewayError(400, "'input' must be a string or a list of strings for this channel "
                            "(token arrays reach only OpenAI-compatible channels)", param="input")


@guarded(502, "embeddings answer", checked_vectors)
def openai_embed_vectors(body: Any) -> tuple[list[list[float]], int]:
    if not isinstance(body, dict):
        raise GatewayError(502, "the embeddings answer is not an object")
    vectors = []
    for item in sorted(body.get("data") or [], key=lambda d: d.get("index", 0)):
        emb = item.get("embedding")
        if isinstance(emb, str):          # base64 little-endian float32
            raw = base64.b64decode(emb)
            if len(raw) % 4:
                raise GatewayError(502, "malformed upstream answer: a base64 embedding is not "
                                        "whole float32 numbers")
            emb = list(struct.unpack(f"<{len(raw) // 4}f", raw))
        vectors.append(list(emb or []))
    return vectors, _num((body.get("usage") or {}).get("prompt_tokens"))


def openai_embeddings_payload(vectors: list[list[float]], model: str, tokens: int,
                              as_base64: bool) -> dict:
    data = []
    for i, vec in enumerate(vectors):
        emb: Any = vec
        if as_base64:        # little-endian float32, as the OpenAI API sends it
            emb = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
        data.append({"object": "embedding", "index": i, "embedding": emb})
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


_MAX_COMPLETION_MODELS = re.compile(r"(o\d|gpt-(?:[5-9]|[1-9]\d)|gpt-4\.1)", re.I)

# OpenAI's tool names (and the servers' that copy its API): at most 64 of a-z, A-Z, 0-9, _ and -
# (Chat Completions reference, tools[].function.name).
OPENAI_TOOL_NAMES = (re.compile(r"[A-Za-z0-9_-]{1,64}\Z"), 64)


# Quirks of OpenAI-compatible servers, per channel ("quirks" in the channel's settings, checked
# in section 10), applied to the Chat Completions body the channel gets, converted or passed
# through:
#   tool_call_id: "mistral9"  every tool-call id as exactly 9 of a-z, A-Z, 0-9 (Mistral answers
#       400 "Tool call id was ... but must be a-z, A-Z, 0-9, with a length of 9" otherwise), the
#       same id for a call and its result
#   reasoning_back: "all" (default) | "tool_calls" | "none"  which assistant turns carry their
#       reasoning back; DeepSeek's thinking mode needs it on turns with tool calls and ignores it
#       elsewhere (api-docs.deepseek.com/guides/thinking_mode, "tool calls")
#   reasoning_field: "reasoning_content" (default, DeepSeek) | "reasoning" (OpenRouter, newer
#       vLLM) the field that reasoning goes back in; answers are read in either field
#   max_tokens_field: "max_tokens" | "max_completion_tokens"  the name the output limit goes by
#   drop_params: [top-level keys]  parameters the server refuses (stream_options,
#       parallel_tool_calls, ...), removed before sending
QUIRK_CHOICES: dict[str, tuple[str, ...]] = {
    "tool_call_id": ("", "mistral9"), "reasoning_back": ("all", "tool_calls", "none"),
    "reasoning_field": ("reasoning_content", "reasoning"),
    "max_tokens_field": ("", "max_tokens", "max_completion_tokens"),
    "cache_control": ("", "strip"),               # Anthropic-compatible channels, below
    "auth": ("", "bearer"),
}
QUIRK_LISTS = ("drop_params", "drop_headers")
_MISTRAL_ID_RX = re.compile(r"[A-Za-z0-9]{9}\Z")


def mistral_tool_id(tool_id: str) -> str:
    """A tool-call id as exactly 9 letters and digits, derived from the original."""
    if _MISTRAL_ID_RX.match(tool_id):
        return tool_id
    return hashlib.sha1(tool_id.encode()).hexdigest()[:9]


def apply_openai_quirks(body: dict, quirks: dict | None) -> dict:
    """A Chat Completions request body with the channel's quirks applied (a new dict)."""
    if not quirks:
        return body
    body = dict(body)
    ids = mistral_tool_id if quirks.get("tool_call_id") == "mistral9" else None
    back = quirks.get("reasoning_back") or "all"
    field = quirks.get("reasoning_field") or "reasoning_content"
    reshape = "reasoning_back" in quirks or "reasoning_field" in quirks
    msgs = []
    for m in body.get("messages") or []:
        if not isinstance(m, dict):
            msgs.append(m)
            continue
        m = dict(m)
        if ids and isinstance(m.get("tool_call_id"), str):
            m["tool_call_id"] = ids(m["tool_call_id"])
        if ids and isinstance(m.get("tool_calls"), list):
            m["tool_calls"] = [dict(c, id=ids(str(c.get("id") or ""))) if isinstance(c, dict)
                               else c for c in m["tool_calls"]]
        if reshape and m.get("role") == "assistant":
            reasoning = [m.pop(k, None) for k in ("reasoning_content", "reasoning")]
            text = next((r for r in reasoning if isinstance(r, str) and r), None)
            if text and (back == "all" or back == "tool_calls" and m.get("tool_calls")):
                m[field] = text
        msgs.append(m)
    if "messages" in body:
        body["messages"] = msgs
    target = quirks.get("max_tokens_field")
    if target:
        for name in ("max_tokens", "max_completion_tokens"):
            if name in body and name != target:
                body[target] = body.pop(name)
    for name in quirks.get("drop_params") or []:
        body.pop(name, None)
    return body


# Quirks of Anthropic-compatible servers (the same "quirks" object, on a channel of type
# anthropic), applied to the Messages body and headers the channel gets, converted or passed
# through:
#   drop_params: [top-level keys]  fields the server does not support, removed before sending
#   drop_headers: [header names]   headers it does not support (anthropic-beta, ...)
#   cache_control: "strip"         every cache_control marker removed (system, messages,
#       tools), for servers that do not cache
#   auth: "bearer"                 the key goes as Authorization: Bearer instead of x-api-key
#       (what Claude Code sends for ANTHROPIC_AUTH_TOKEN, the form some services document)
def apply_anthropic_quirks(body: dict, quirks: dict | None) -> dict:
    """A Messages request body with an Anthropic-compatible channel's quirks applied (a new
    dict)."""
    if not quirks:
        return body
    body = {k: v for k, v in body.items() if k not in (quirks.get("drop_params") or [])}
    if quirks.get("cache_control") != "strip":
        return body

    def strip(block: Any) -> Any:
        """A content block or tool without its marker (a tool result's blocks too); inputs
        and schemas are left alone: a property may be called cache_control."""
        if not isinstance(block, dict):
            return block
        block = {k: v for k, v in block.items() if k != "cache_control"}
        if block.get("type") == "tool_result" and isinstance(block.get("content"), list):
            block["content"] = [strip(b) for b in block["content"]]
        return block
    for key in ("system", "tools"):
        if isinstance(body.get(key), list):
            body[key] = [strip(b) for b in body[key]]
    if isinstance(body.get("messages"), list):
        body["messages"] = [dict(m, content=[strip(b) for b in m["content"]])
                            if isinstance(m, dict) and isinstance(m.get("content"), list)
                            else m for m in body["messages"]]
    return body


def anthropic_auth_header(key: str, quirks: dict | None) -> tuple[str, str]:
    """The header an Anthropic-compatible channel's key goes in."""
    if (quirks or {}).get("auth") == "bearer":
        return "Authorization", f"Bearer {key}"
    return "x-api-key", key


def quirk_dropped_headers(quirks: dict | None) -> frozenset[str]:
    """The header names (lower case) a channel's quirks say its server does not take."""
    return frozenset(n.lower() for n in (quirks or {}).get("drop_headers") or [])


class OpenAIDialect(DialectAdapter):
    name = OPENAI

    def request_to_ir(self, body: dict, model: str, kind: str, params: dict) -> dict:
        return openai_request_to_ir(body)

    def response(self, resp: dict, model: str, ir: dict) -> dict:
        return ir_to_openai_response(resp, model)

    def stream_encoder(self, model: str, ir: dict) -> StreamEncoding:
        return OpenAIStreamEncoder(model, ir["include_usage"])

    def passthrough_decoders(self) -> tuple[Callable[[dict], dict], Callable[[], Any]]:
        return openai_response_to_ir, OpenAIStreamDecoder

    def plainly_has_text(self, answer: dict) -> bool:
        choices = answer.get("choices")
        message = choices[0].get("message") if type(choices) is list and choices and \
            type(choices[0]) is dict else None
        text = message.get("content") if type(message) is dict else None
        return has_words(text)

    def usage(self, obj: Any) -> dict | None:
        u = obj.get("usage") if isinstance(obj, dict) else None
        if not isinstance(u, dict) or not ("prompt_tokens" in u or "completion_tokens" in u):
            return None
        return openai_usage_to_ir(u)


class OpenAIProvider(ProviderAdapter):
    name = TYPE_OPENAI
    default_url = "https://api.openai.com"
    serves_as_is = (OPENAI,)
    responses_as_is = True
    responses_for_tools = True
    needs_key = True
    embeds = True
    tool_name_rule = OPENAI_TOOL_NAMES
    max_completion_field = True      # o-series, gpt-4.1, gpt-5 and later take max_completion_tokens

    def encode_chat(self, ir: dict, model: str, opts: ChatOptions) -> dict:
        field = "max_completion_tokens" if self.max_completion_field and \
            _MAX_COMPLETION_MODELS.match(model) else "max_tokens"
        return apply_openai_quirks(ir_to_openai_request(ir, model, stream=opts.stream,
                                                        max_tokens_field=field), opts.quirks)

    def decoders(self, signatures: dict[str, str] | None, kept: dict[str, list[dict]] | None,
                 model: str = "") -> tuple[Callable[[dict], dict], Callable[[], StreamDecoding]]:
        return openai_response_to_ir, OpenAIStreamDecoder

    def embed_vectors(self, body: Any) -> tuple[list[list[float]], int]:
        return openai_embed_vectors(body)

    def quirks(self, body: dict, quirks: dict | None) -> dict:
        return apply_openai_quirks(body, quirks)


class CustomProvider(OpenAIProvider):
    """Any OpenAI-compatible server (vLLM, llama.cpp, LM Studio, OpenRouter, ...)."""

    name = TYPE_CUSTOM
    default_url = ""
    needs_key = False
    max_completion_field = False
    responses_for_tools = False      # the server's own rules, not OpenAI's: responses_api decides


# 9.4 OpenAI Responses ----------------------------------------------------------------------------
# The responses client dialect (Codex). Channels relay it only with responses_api: true;
# otherwise it is converted like any other dialect.

# A Responses request becomes Chat-shaped messages first (responses_input_to_messages) and then the
# internal form; tools the channels cannot run (web_search, file_search, ...) are dropped; custom
# tools (Codex's apply_patch) become function tools taking {"input": string} and come back as
# custom_tool_call items. Codex puts each MCP server's tools in a {"type": "namespace", "name",
# "description", "tools": [function or custom tools]} tool (codex-rs/tools/src/tool_spec.rs,
# ToolSpec::Namespace; responses_api.rs, ResponsesApiNamespace) and expects a call of one back as
# a function_call item naming the inner tool with the namespace beside it ({"name": "search",
# "namespace": "mcp__server", ...}), which it also sends in later turns' input. Here each inner
# tool is one IR tool under its flat name (namespaced_tool_name), remembering its namespace, and
# its calls go back to the client split again (the openai SDK's ResponseFunctionToolCall has the
# same optional `namespace`). previous_response_id is refused: the gateway keeps no conversation
# state (Codex sends the whole conversation with store:false).

_CUSTOM_SCHEMA = {"type": "object", "properties": {"input": {"type": "string"}},
                  "required": ["input"]}


@guarded(400, "request body")
def responses_request_to_ir(body: dict) -> dict:
    if body.get("previous_response_id") or body.get("conversation"):
        raise GatewayError(400, "previous_response_id and conversation are not supported: this "
                                "gateway keeps no conversation state; send the whole "
                                "conversation in 'input' (with store: false)",
                           param="previous_response_id", code="unsupported_parameter")
    if "input" not in body:
        raise GatewayError(400, "'input' is required: a string or a list of items",
                           param="input")
    ir = openai_request_to_ir({"model": body.get("model"), "messages":
                               responses_input_to_messages(body["input"],
                                                           body.get("instructions"))})
    tools = [t for t in body.get("tools") or [] if isinstance(t, dict)]
    # Tool search run by the client (Codex with the models of its own catalog): the model's
    # search is a call to a "tool_search" function that goes back to the client as a
    # tool_search_call item; the client answers with a tool_search_output item whose tools (in
    # namespaces, with defer_loading) the model may call from then on, so they join the tool list.
    # Deferred tools in `tools` wait for that search; without a client search they are all sent.
    client_search = any(t.get("type") == "tool_search" and t.get("execution") == "client"
                        for t in tools)
    for t in tools:
        if t.get("type") == "namespace" and t.get("name"):
            for inner in t.get("tools") or []:
                if not (client_search and isinstance(inner, dict) and inner.get("defer_loading")):
                    _responses_tool(ir, inner, t["name"])
        elif not (client_search and t.get("defer_loading")):
            _responses_tool(ir, t, None)
    loaded = {t["name"] for t in ir["tools"]}
    for item in body["input"] if isinstance(body["input"], list) else []:
        if isinstance(item, dict) and item.get("type") == "tool_search_output":
            for name, (t, ns) in _searched_tools(item):
                if name not in loaded:
                    loaded.add(name)
                    _responses_tool(ir, t, ns)
    tc = body.get("tool_choice")
    if tc in ("auto", "none", "required"):
        ir["tool_choice"] = tc
    elif isinstance(tc, dict) and isinstance(tc.get("name"), str) and tc["name"]:
        ir["tool_choice"] = {"name": namespaced_tool_name(tc.get("namespace"), tc["name"])}
    ir["parallel_tool_calls"] = body.get("parallel_tool_calls")
    mt = body.get("max_output_tokens")
    ir["max_tokens"] = mt if isinstance(mt, int) and not isinstance(mt, bool) else None
    for key in ("temperature", "top_p"):
        value = body.get(key)
        ir[key] = value if isinstance(value, (int, float)) and not isinstance(value, bool) \
            else None
    effort = (body.get("reasoning") or {}).get("effort")
    if ir_effort(effort):
        ir["reasoning"] = {"effort": ir_effort(effort), "budget": None}
    fmt = (body.get("text") or {}).get("format") or {}
    if fmt.get("type") == "json_schema":
        ir["response_format"] = {"type": "json_schema", "name": fmt.get("name") or "output",
                                 "schema": fmt.get("schema") or {}, "strict": fmt.get("strict")}
    elif fmt.get("type") == "json_object":
        ir["response_format"] = {"type": "json_object"}
    ir["stream"] = body.get("stream") is True
    ir["include_usage"] = True
    ir["user"] = body.get("user") or body.get("safety_identifier")
    return ir


def _responses_tool(ir: dict, t: Any, namespace: str | None) -> None:
    """Add one Responses function or custom tool (inside ``namespace`` or not), or a
    client-run tool_search, to the IR."""
    if isinstance(t, dict) and t.get("type") == "tool_search":
        t = dict(t, name=TOOL_SEARCH)
    if not isinstance(t, dict) or not isinstance(t.get("name"), str) or not t["name"]:
        return
    tool: dict[str, Any] = {"name": namespaced_tool_name(namespace, t["name"]),
                            "description": t.get("description") or ""}
    if t.get("type") == "function":
        tool["parameters"] = t.get("parameters") or {"type": "object", "properties": {}}
    elif t.get("type") == "tool_search" and t.get("execution") == "client":
        tool.update(parameters=t.get("parameters") or {
            "type": "object", "properties": {"query": {"type": "string"}}}, tool_search=True)
    elif t.get("type") == "custom":
        tool.update(parameters=_CUSTOM_SCHEMA, custom=True)
    else:
        return
    if namespace:
        tool.update(namespace=namespace, local_name=t["name"])
    ir["tools"].append(tool)


def ir_usage_to_responses(u: dict) -> dict:
    # input_tokens_details.cache_write_tokens is required beside cached_tokens (openai-python
    # 3.57, types/responses/response_usage.py, generated from OpenAI's OpenAPI spec).
    return {"input_tokens": u["input"], "input_tokens_details": {
                "cached_tokens": u["cache_read"], "cache_write_tokens": u["cache_write"]},
            "output_tokens": u["output"],
            "output_tokens_details": {"reasoning_tokens": u["reasoning"]},
            "total_tokens": u["input"] + u["output"]}


def _responses_object(rid: str, model: str, ir: dict, status: str, output: list[dict],
                      usage: dict | None, created: int, error: dict | None = None,
                      incomplete: str | None = None) -> dict:
    tc = ir["tool_choice"]
    return {"id": rid, "object": "response", "created_at": created, "status": status,
            "model": model, "output": output, "error": error,
            "incomplete_details": {"reason": incomplete} if incomplete else None,
            "instructions": parts_text(ir["system"]) or None, "metadata": {},
            "parallel_tool_calls": ir["parallel_tool_calls"] is not False,
            "temperature": ir["temperature"], "top_p": ir["top_p"],
            "max_output_tokens": ir["max_tokens"], "previous_response_id": None,
            "reasoning": {"effort": openai_effort(ir["reasoning"]["effort"])}
            if ir["reasoning"] else None,
            "tool_choice": {"type": "function", "name": tc["name"]} if isinstance(tc, dict)
            else tc or "auto",
            "tools": [{"type": "custom", "name": t["name"], "description": t["description"]}
                      if t.get("custom") else
                      {"type": "function", "name": t["name"], "description": t["description"],
                       "parameters": t["parameters"], "strict": False} for t in ir["tools"]],
            "text": {"format": {"type": "text"}}, "truncation": "disabled", "store": False,
            "usage": ir_usage_to_responses(usage) if usage else None}


def _responses_call_item(call_id: str, name: str, arguments: str, tool: dict | None) -> dict:
    """The output item of a call to ``tool`` (the IR tool of that name, None when unknown):
    a custom_tool_call for a custom tool, else a function_call; a namespaced tool's call names
    the inner tool and carries its ``namespace``."""
    tool = tool or {}
    if tool.get("tool_search"):
        return {"type": "tool_search_call", "id": new_id("tsc_"), "call_id": call_id,
                "execution": "client", "arguments": parse_arguments(arguments),
                "status": "completed"}
    if tool.get("custom"):
        item = {"type": "custom_tool_call", "id": new_id("ctc_"), "call_id": call_id,
                "name": name, "input": str(parse_arguments(arguments).get("input", "")),
                "status": "completed"}
    else:
        item = {"type": "function_call", "id": new_id("fc_"), "call_id": call_id,
                "name": name, "arguments": arguments or "{}", "status": "completed"}
    if tool.get("namespace"):
        item.update(name=tool["local_name"], namespace=tool["namespace"])
    return item


def _responses_status(finish: str) -> tuple[str, str | None]:
    if finish == "length":
        return "incomplete", "max_output_tokens"
    if finish == "content_filter":
        return "incomplete", "content_filter"
    return "completed", None


@guarded(502, "upstream answer")
def ir_to_responses_response(resp: dict, model: str, ir: dict) -> dict:
    tools = {t["name"]: t for t in ir["tools"]}
    output: list[dict] = []
    reasoning = "".join(p.get("text") or "" for p in resp["content"] if p["type"] == "reasoning")
    if reasoning:
        output.append({"type": "reasoning", "id": new_id("rs_"), "summary": [
            {"type": "summary_text", "text": reasoning}]})
    text = parts_text(resp["content"])
    if text:
        output.append({"type": "message", "id": new_id("msg_"), "role": "assistant",
                       "status": "completed", "content": [
                           {"type": "output_text", "text": text, "annotations": []}]})
    for p in resp["content"]:
        if p["type"] == "tool_call":
            output.append(_responses_call_item(p["id"], p["name"], p["arguments"],
                                               tools.get(p["name"])))
    status, reason = _responses_status(resp["finish"])
    return _responses_object(new_id("resp_"), model, ir, status, output, resp["usage"],
                             int(time.time()), incomplete=reason)


class ResponsesStreamEncoder:
    """IR stream events -> Responses API SSE: every event has ``type`` and a rising
    ``sequence_number``; created and in_progress first; each output item added, filled and done
    in order (reasoning summary, message text, function calls routed by tool index); and always a
    terminal response.completed / response.incomplete / response.failed with usage (Codex fails
    a stream that ends without one)."""

    def __init__(self, model: str, ir: dict):
        self.model, self.ir = model, ir
        self.id = new_id("resp_")
        self.created = int(time.time())
        self.usage: dict | None = None
        self._seq = 0
        self._output: list[dict] = []
        self._open: dict | None = None                # the reasoning/message item being filled
        self._calls: dict[int, dict] = {}             # IR tool index -> open call state
        self._tools = {t["name"]: t for t in ir["tools"]}
        self._started = False
        self._finished = False

    def _ev(self, kind: str, **data: Any) -> bytes:
        data = {"type": kind, "sequence_number": self._seq, **data}
        self._seq += 1
        return b"event: " + kind.encode() + b"\ndata: " + json_dumps(data) + b"\n\n"

    def _response(self, status: str, **kw: Any) -> dict:
        return _responses_object(self.id, self.model, self.ir, status, list(self._output),
                                 self.usage if status != "in_progress" else None, self.created,
                                 **kw)

    def _begin(self, out: list[bytes]) -> None:
        if not self._started:
            self._started = True
            out.append(self._ev("response.created", response=self._response("in_progress")))
            out.append(self._ev("response.in_progress", response=self._response("in_progress")))

    def _open_item(self, kind: str, out: list[bytes]) -> dict:
        if self._open is not None and self._open["item"]["type"] == kind:
            return self._open
        self._close_open(out)
        for call in self._calls.values():
            self._close_call(call, out)
        index = len(self._output)
        if kind == "reasoning":
            item = {"type": "reasoning", "id": new_id("rs_"), "summary": []}
            out.append(self._ev("response.output_item.added", output_index=index, item=item))
            out.append(self._ev("response.reasoning_summary_part.added", item_id=item["id"],
                                output_index=index, summary_index=0,
                                part={"type": "summary_text", "text": ""}))
        else:
            item = {"type": "message", "id": new_id("msg_"), "role": "assistant",
                    "status": "in_progress", "content": []}
            out.append(self._ev("response.output_item.added", output_index=index, item=item))
            out.append(self._ev("response.content_part.added", item_id=item["id"],
                                output_index=index, content_index=0,
                                part={"type": "output_text", "text": "", "annotations": []}))
        self._open = {"item": item, "index": index, "text": []}
        return self._open

    def _close_open(self, out: list[bytes]) -> None:
        state, self._open = self._open, None
        if state is None:
            return
        item, index, text = state["item"], state["index"], "".join(state["text"])
        if item["type"] == "reasoning":
            part = {"type": "summary_text", "text": text}
            out.append(self._ev("response.reasoning_summary_text.done", item_id=item["id"],
                                output_index=index, summary_index=0, text=text))
            out.append(self._ev("response.reasoning_summary_part.done", item_id=item["id"],
                                output_index=index, summary_index=0, part=part))
            item = dict(item, summary=[part])
        else:
            part = {"type": "output_text", "text": text, "annotations": []}
            out.append(self._ev("response.output_text.done", item_id=item["id"],
                                output_index=index, content_index=0, text=text, logprobs=[]))
            out.append(self._ev("response.content_part.done", item_id=item["id"],
                                output_index=index, content_index=0, part=part))
            item = dict(item, status="completed", content=[part])
        out.append(self._ev("response.output_item.done", output_index=index, item=item))
        self._output.append(item)

    def _close_call(self, state: dict, out: list[bytes]) -> None:
        if state["done"]:
            return
        state["done"] = True
        args = "".join(state["args"])
        item = _responses_call_item(state["call_id"], state["name"], args,
                                    self._tools.get(state["name"]))
        index = state["index"]
        if item["type"] == "tool_search_call":      # held: its arguments go as one object
            item["id"] = state["id"]
            out.append(self._ev("response.output_item.added", output_index=index,
                                item=dict(item, status="in_progress")))
        elif state["held"]:              # a custom tool's input is only known now
            item["id"] = state["id"]
            out.append(self._ev("response.output_item.added", output_index=index,
                                item=dict(item, input="", status="in_progress")))
            out.append(self._ev("response.custom_tool_call_input.delta", item_id=item["id"],
                                output_index=index, delta=item["input"]))
            out.append(self._ev("response.custom_tool_call_input.done", item_id=item["id"],
                                output_index=index, input=item["input"]))
        else:
            item["id"] = state["id"]
            out.append(self._ev("response.function_call_arguments.done", item_id=item["id"],
                                output_index=index, name=item["name"],
                                arguments=item["arguments"]))
        out.append(self._ev("response.output_item.done", output_index=index, item=item))
        self._output.append(item)

    def encode(self, events: list[tuple]) -> bytes:
        out: list[bytes] = []
        for ev in events:
            kind = ev[0]
            if kind == "usage":
                self.usage = ev[1]
                continue
            if self._finished:
                continue
            self._begin(out)
            if kind in ("text", "reasoning"):
                if ev[1]:
                    state = self._open_item("message" if kind == "text" else "reasoning", out)
                    state["text"].append(ev[1])
                    item = state["item"]
                    if kind == "text":
                        out.append(self._ev("response.output_text.delta", item_id=item["id"],
                                            output_index=state["index"], content_index=0,
                                            delta=ev[1], logprobs=[]))
                    else:
                        out.append(self._ev("response.reasoning_summary_text.delta",
                                            item_id=item["id"], output_index=state["index"],
                                            summary_index=0, delta=ev[1]))
            elif kind == "tool":
                self._close_open(out)
                for other in self._calls.values():
                    self._close_call(other, out)
                tool = self._tools.get(ev[3])
                held = bool(tool and (tool.get("custom") or tool.get("tool_search")))
                prefix = "fc_" if not held else "tsc_" if tool.get("tool_search") else "ctc_"
                state = {"id": new_id(prefix), "call_id": ev[2], "name": ev[3], "args": [],
                         "held": held, "done": False, "index": len(self._output)}
                self._calls[ev[1]] = state
                if not held:
                    item = _responses_call_item(ev[2], ev[3], "", tool)
                    out.append(self._ev("response.output_item.added", output_index=state["index"],
                                        item=dict(item, id=state["id"], arguments="",
                                                  status="in_progress")))
            elif kind == "args":
                state = self._calls.get(ev[1])
                if state is not None and not state["done"] and ev[2]:
                    state["args"].append(ev[2])
                    if not state["held"]:
                        out.append(self._ev("response.function_call_arguments.delta",
                                            item_id=state["id"], output_index=state["index"],
                                            delta=ev[2]))
            elif kind == "finish":
                self._close_open(out)
                for state in self._calls.values():
                    self._close_call(state, out)
                status, reason = _responses_status(ev[1])
                out.append(self._ev(f"response.{status}", response=self._response(
                    status, incomplete=reason)))
                self._finished = True
            elif kind == "error":
                err = ev[1]
                code = {429: "rate_limit_exceeded"}.get(err.status, err.code or "server_error")
                out.append(self._ev("response.failed", response=self._response(
                    "failed", error={"code": code, "message": err.message})))
                self._finished = True
        return b"".join(out)


_RESPONSES_CONTENT_ITEMS = ("message", "reasoning")     # items that may still be empty


@answer_guard
def responses_answer_outline(body: dict) -> dict:
    """A Responses API answer (passed through to a Responses client) reduced to what
    answer_is_empty looks at: its text and reasoning, whether it has any other output item (a
    function, custom or built-in tool call), and incomplete as a length cut-off."""
    content: list[dict] = []
    for item in body.get("output") or []:
        if not isinstance(item, dict):
            continue
        if item.get("type") not in _RESPONSES_CONTENT_ITEMS:
            content.append({"type": "tool_call", "id": "", "name": "", "arguments": ""})
        for part in (item.get("content") or []) + (item.get("summary") or []):
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                content.append({"type": "text", "text": part["text"]})
            elif isinstance(part, dict) and isinstance(part.get("refusal"), str):
                content.append({"type": "text", "text": part["refusal"]})
    finish = "length" if body.get("status") == "incomplete" else "stop"
    return {"content": content, "finish": finish}


class ResponsesStreamOutline(StreamDecoder):
    """Responses API SSE -> just enough IR events for event_is_content: text and reasoning
    deltas, a "tool" event for any output item that is not a message or reasoning, an error,
    and the finish (incomplete as a length cut-off)."""

    @stream_guard
    def feed(self, data: bytes) -> list[tuple]:
        out: list[tuple] = []
        for name, ev in self._sse_objects(data):
            kind = str(ev.get("type") or name or "")
            if kind in ("response.output_text.delta", "response.refusal.delta",
                        "response.reasoning_summary_text.delta", "response.reasoning_text.delta"):
                out.append(("text", str(ev.get("delta") or "")))
            elif kind == "response.output_item.added" and \
                    (ev.get("item") or {}).get("type") not in _RESPONSES_CONTENT_ITEMS:
                out.append(("tool", self._tools, "", ""))
                self._tools += 1
            elif kind in ("error", "response.failed"):
                err = ev if kind == "error" else (ev.get("response") or {}).get("error") or {}
                out.append(("error", GatewayError(502, str(err.get("message") or kind))))
            elif kind == "response.incomplete":
                self.finish = "length"
        return out


class ResponsesDialect(OpenAIDialect):
    name = RESPONSES

    def request_to_ir(self, body: dict, model: str, kind: str, params: dict) -> dict:
        return responses_request_to_ir(body)

    def response(self, resp: dict, model: str, ir: dict) -> dict:
        """The request's IR shapes the answer: custom and namespaced tools' calls come back as
        their own item types, and the response object echoes the request's settings."""
        return ir_to_responses_response(resp, model, ir)

    def stream_encoder(self, model: str, ir: dict) -> StreamEncoding:
        return ResponsesStreamEncoder(model, ir)        # the IR for the same reason

    def passthrough_decoders(self) -> tuple[Callable[[dict], dict], Callable[[], Any]]:
        return responses_answer_outline, ResponsesStreamOutline     # only what emptiness needs

    def usage(self, obj: Any) -> dict | None:
        """A whole answer's usage, or a response.completed (incomplete, failed) event's."""
        if isinstance(obj, dict) and isinstance(obj.get("response"), dict):
            obj = obj["response"]
        u = obj.get("usage") if isinstance(obj, dict) else None
        if not isinstance(u, dict) or not ("input_tokens" in u or "output_tokens" in u):
            return None
        return responses_usage_to_ir(u)


def responses_usage_to_ir(u: Any) -> dict:
    """A Responses API usage object in the IR's terms (reasoning counted in the output)."""
    if not isinstance(u, dict):
        return new_usage()
    details, out_details = u.get("input_tokens_details"), u.get("output_tokens_details")
    details = details if isinstance(details, dict) else {}
    return new_usage(_num(u.get("input_tokens")), _num(u.get("output_tokens")),
                     _num(details.get("cached_tokens")), _num(details.get("cache_write_tokens")),
                     _num(out_details.get("reasoning_tokens"))
                     if isinstance(out_details, dict) else 0)


# The Responses API as an upstream: converted chat requests go there (instead of Chat
# Completions) for a channel with responses_api: true, and on openai and azure channels for the
# models that refuse function tools on Chat Completions, when the request has tools: from
# GPT-5.4 on, a 400 "Function tools with reasoning_effort are not supported for gpt-5.6-sol in
# /v1/chat/completions. To use function tools, use /v1/responses or set reasoning_effort to
# 'none'." (community.openai.com/t/gpt-5-6-chat-completion-reasoning-effort-bug-behavior-change/
# 1386454; gpt-5.4 in everruns/bashkit#1122, gpt-6-sol in onyx-dot-app/onyx#15008), even with no
# reasoning_effort sent (the model's default effort counts: embabel/embabel-agent#1895), and
# GPT-6 takes no effort "none" (jhd3197/Prompture v1.15.1). Request fields per openai-python's
# types/responses (response_create_params, easy_input_message_param, function_tool_param:
# "strict" must be sent; the API's default is strict schemas, which the clients' tools are not).
RESPONSES_FOR_TOOLS = re.compile(r"gpt-(?:5\.(?:[4-9]|[1-9]\d)|[6-9]|[1-9]\d)(?!\d)", re.I)
RESPONSES_PATH = "/v1/responses"


def _responses_content(parts: list[dict]) -> list[dict]:
    out: list[dict] = []
    for p in parts:
        if p["type"] == "text":
            out.append({"type": "input_text", "text": p["text"]})
        elif p["type"] == "image":
            out.append({"type": "input_image", "image_url": image_data_url(p), "detail": "auto"})
        elif p["type"] == "file":
            out.append({"type": "input_file", "filename": p.get("filename") or "file",
                        "file_data": f"data:{p['media_type']};base64,{p['data']}"})
        elif p["type"] == "audio":
            raise GatewayError(400, "audio input cannot be sent to this channel's Responses API "
                                    "(it takes text, images and files)", param="messages")
    return out


def ir_to_responses_request(ir: dict, model: str, *, stream: bool) -> dict:
    """An IR chat request as a Responses API request (not stored: the whole conversation goes
    every time, as the client sent it). Reasoning from other providers is not sent back (the
    Responses API takes back only its own, encrypted); stop sequences, seed and penalties have
    no Responses field and are left out."""
    items: list[dict] = []
    for m in result_images_moved(ir["messages"]):
        role = m["role"]
        if role == "user":
            items.append({"role": "user", "content": _responses_content(m["content"])})
        elif role == "assistant":
            text = parts_text(m["content"])
            if text:
                items.append({"role": "assistant", "content": text})
            items += [{"type": "function_call", "call_id": p["id"], "name": p["name"],
                       "arguments": p["arguments"] or "{}"}
                      for p in m["content"] if p["type"] == "tool_call"]
        else:
            for r in m["content"]:
                text = parts_text(r["content"])
                items.append({"type": "function_call_output", "call_id": r["id"],
                              "output": f"Error: {text}" if r.get("is_error") else text})
    body: dict[str, Any] = {"model": model, "input": items, "store": False}
    system = parts_text(ir["system"])
    if system:
        body["instructions"] = system
    if ir["tools"]:
        body["tools"] = [{"type": "function", "name": t["name"],
                          "description": t.get("description") or "",
                          "parameters": t.get("parameters") or {"type": "object",
                                                                "properties": {}},
                          "strict": False} for t in ir["tools"]]
        tc = ir["tool_choice"]
        if isinstance(tc, dict):
            body["tool_choice"] = {"type": "function", "name": tc["name"]}
        elif tc:
            body["tool_choice"] = tc
        if ir["parallel_tool_calls"] is not None:
            body["parallel_tool_calls"] = ir["parallel_tool_calls"]
    if ir["max_tokens"] is not None:
        body["max_output_tokens"] = ir["max_tokens"]
    for key in ("temperature", "top_p"):
        if ir[key] is not None and openai_takes_sampling(ir, model):
            body[key] = ir[key]
    rf = ir["response_format"]
    if rf and rf["type"] == "json_schema":
        fmt = {"type": "json_schema", "name": rf["name"], "schema": rf["schema"]}
        if rf.get("strict") is not None:
            fmt["strict"] = rf["strict"]
        body["text"] = {"format": fmt}
    elif rf:
        body["text"] = {"format": {"type": "json_object"}}
    if ir["reasoning"]:
        body["reasoning"] = {"effort": openai_effort(ir["reasoning"]["effort"], model)}
    if ir["user"]:
        body["user"] = ir["user"]
    if stream:
        body["stream"] = True
    return body


_RESPONSES_INCOMPLETE = {"max_output_tokens": "length", "content_filter": "content_filter"}


@answer_guard
def responses_answer_to_ir(body: dict) -> dict:
    """A Responses API answer (to a request ir_to_responses_request made) in the IR's terms:
    output text and refusals as text, reasoning summaries as reasoning, function calls by
    their call_id; "incomplete" as its reason."""
    if body.get("status") == "failed":
        err = body.get("error") if isinstance(body.get("error"), dict) else {}
        raise GatewayError(502, f"the Responses API answered failed: "
                                f"{str(err.get('message') or 'no reason given')[:300]}")
    content: list[dict] = []
    for item in body.get("output") or []:
        kind = item.get("type")
        if kind == "message":
            for c in item.get("content") or []:
                text = c.get("text") if c.get("type") == "output_text" else c.get("refusal")
                if isinstance(text, str) and text:
                    content.append({"type": "text", "text": text})
        elif kind == "reasoning":
            text = "".join(s.get("text") or "" for s in item.get("summary") or []
                           if isinstance(s, dict))
            if text:
                content.append({"type": "reasoning", "text": text, "signature": None,
                                "redacted": None})
        elif kind == "function_call":
            content.append({"type": "tool_call",
                            "id": str(item.get("call_id") or "") or new_id("call_"),
                            "name": str(item.get("name") or ""),
                            "arguments": str(item.get("arguments") or "{}")})
    reason = (body.get("incomplete_details") or {}).get("reason") \
        if body.get("status") == "incomplete" else None
    finish = _RESPONSES_INCOMPLETE.get(reason, "length") if reason else "stop"
    if finish == "stop" and any(p["type"] == "tool_call" for p in content):
        finish = "tool_calls"
    return {"id": body.get("id") or new_id("resp_"), "model": body.get("model") or "",
            "content": content, "finish": finish,
            "usage": responses_usage_to_ir(body.get("usage"))}


class ResponsesStreamDecoder(StreamDecoder):
    """Responses API SSE (upstream) -> IR stream events: text and refusal deltas, reasoning
    summary deltas, each function call (its output item, then its argument deltas) as one
    tool, the usage and finish of response.completed / response.incomplete, an error for
    error and response.failed. Calls follow one another in the stream (each item is done
    before the next is added), as the IR events must."""

    id_prefix = "resp_"

    def __init__(self):
        super().__init__()
        self._calls: dict[Any, int] = {}         # output_index -> IR tool index
        self._argued: set[int] = set()           # calls whose arguments came
        self.usage: dict | None = None

    def _args(self, out: list[tuple], idx: int, text: Any) -> None:
        if text:
            out.append(("args", idx, str(text)))
            self._argued.add(idx)

    @stream_guard
    def feed(self, data: bytes) -> list[tuple]:
        out: list[tuple] = []
        for name, ev in self._sse_objects(data):
            kind = str(ev.get("type") or name or "")
            if kind in ("response.created", "response.in_progress"):
                resp = ev.get("response") if isinstance(ev.get("response"), dict) else {}
                self._start(out, resp.get("id"), resp.get("model"))
                continue
            self._start(out)
            if kind in ("response.output_text.delta", "response.refusal.delta"):
                if ev.get("delta"):
                    out.append(("text", str(ev["delta"])))
            elif kind == "response.reasoning_summary_text.delta":
                if ev.get("delta"):
                    out.append(("reasoning", str(ev["delta"])))
            elif kind == "response.output_item.added":
                item = ev.get("item") if isinstance(ev.get("item"), dict) else {}
                if item.get("type") == "function_call":
                    self._calls[ev.get("output_index")] = self._tools
                    out.append(("tool", self._tools,
                                str(item.get("call_id") or "") or new_id("call_"),
                                str(item.get("name") or "")))
                    self._args(out, self._tools, item.get("arguments"))
                    self._tools += 1
            elif kind == "response.function_call_arguments.delta":
                idx = self._calls.get(ev.get("output_index"))
                if idx is not None:
                    self._args(out, idx, ev.get("delta"))
            elif kind == "response.output_item.done":     # arguments that came only whole
                idx = self._calls.get(ev.get("output_index"))
                item = ev.get("item") if isinstance(ev.get("item"), dict) else {}
                if idx is not None and idx not in self._argued:
                    self._args(out, idx, item.get("arguments"))
            elif kind in ("response.completed", "response.incomplete"):
                resp = ev.get("response") if isinstance(ev.get("response"), dict) else {}
                self.usage = responses_usage_to_ir(resp.get("usage"))
                out.append(("usage", self.usage))
                if kind == "response.incomplete":
                    reason = (resp.get("incomplete_details") or {}).get("reason")
                    self.finish = _RESPONSES_INCOMPLETE.get(reason, "length")
            elif kind in ("error", "response.failed"):
                err = ev if kind == "error" else (ev.get("response") or {}).get("error") or {}
                out.append(("error", GatewayError(502, str(err.get("message") or kind))))
        return out


# 9.5 Anthropic Messages --------------------------------------------------------------------------
# The anthropic client dialect (Claude Code) and the anthropic channel type.

_ANTHROPIC_STOP_IN = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length",
                      "tool_use": "tool_calls", "pause_turn": "stop", "refusal": "content_filter",
                      "model_context_window_exceeded": "length"}
_ANTHROPIC_STOP_OUT = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use",
                       "content_filter": "refusal"}


# How each Claude model takes thinking, by model name (re.search, first match wins; Bedrock
# "anthropic.claude-opus-4-7" and Vertex "claude-opus-4-7@..." ids match too). From Anthropic's
# adaptive-thinking and effort pages (platform.claude.com/docs/en/build-with-claude/adaptive-
# thinking, .../effort; mirrored in docs.aws.amazon.com/bedrock/latest/userguide/claude-messages-
# adaptive-thinking.html):
#   adaptive  Opus 4.7 and later, the Claude 5 family, Mythos, Fable: only {"type": "adaptive"}
#             with output_config.effort; {"type": "enabled", "budget_tokens"} is a 400 there
#   both      Opus 4.6 and Sonnet 4.6: adaptive (preferred, budgets deprecated) or budgets
#   budget    Claude 3.7, 4.0, 4.1, 4.5 and unknown names: {"type": "enabled", "budget_tokens"}
#   none      Claude 3.5 and older: no thinking parameter at all
# Effort levels: "max" from Opus/Sonnet 4.6 on, "xhigh" only from Opus 4.7 on, so a 4.6 model
# gets "max" for xhigh. A channel's "thinking" setting ("adaptive" or "budget") overrides this.
ANTHROPIC_THINKING = (
    (re.compile(r"claude-(?:mythos|fable)|claude-(?:opus|sonnet|haiku)-(?:[5-9]|[1-9]\d)(?!\d)"
                r"|claude-opus-4[-.][7-9](?!\d)", re.I), "adaptive"),
    (re.compile(r"claude-(?:opus|sonnet)-4[-.]6(?!\d)", re.I), "both"),
    (re.compile(r"claude-3-(?:[0-6](?!\d)|opus|sonnet|haiku)|claude-(?:2|instant)", re.I), "none"),
)
THINKING_MODES = ("auto", "adaptive", "budget")      # a channel's "thinking" setting
# The Claude 5 family thinks unless told not to (Opus 5.5 and Fable 5.1 always: "thinking can't
# be disabled"), and a forced tool choice (any, tool) is an error with thinking on ("Forced tool
# use returns an error": platform.claude.com/docs/en/models/opus-5-5/whats-new-opus-5-5, and the
# Sonnet 5.5 and Opus 5 pages): so it becomes auto for them, as with thinking asked for.
CLAUDE_THINKS_BY_DEFAULT = re.compile(
    r"claude-(?:opus|sonnet|haiku|fable|mythos)-(?:[5-9]|[1-9]\d)(?!\d)", re.I)


def anthropic_thinking_mode(model: str, setting: str = "auto") -> str:
    """"adaptive", "both", "budget" or "none" for ``model`` (the table above), unless the
    channel's ``setting`` names a mode."""
    if setting in ("adaptive", "budget"):
        return setting
    for rx, mode in ANTHROPIC_THINKING:
        if rx.search(model):
            return mode
    return "budget"


def anthropic_effort(effort: str, mode: str) -> str:
    """IR effort -> output_config.effort (low, medium, high, xhigh, max)."""
    if effort in ("none", "minimal"):
        return "low"
    return "max" if effort == "xhigh" and mode == "both" else effort


BILLING_HEADER = "x-anthropic-billing-header:"


def without_billing_header(parts: list[dict]) -> list[dict]:
    """System text without Claude Code's attribution line (``x-anthropic-billing-header:
    cc_version=…; cc_entrypoint=…; cch=…;``, a block of its own or the first line of one): it
    is for Anthropic's own API, which a passed-through request still gets; to another provider
    it is noise at the head of the prompt, and its ``cch`` hash, new on every request, would
    make each prompt's prefix new, so that the provider's prompt cache never hit (reported to
    proxies that convert, e.g. 1rgs/claude-code-proxy#99, sgl-project/sglang#29169)."""
    out = []
    for p in parts:
        if p.get("type") == "text" and p["text"].startswith(BILLING_HEADER):
            rest = p["text"].partition("\n")[2]
            if rest.strip():
                out.append(dict(p, text=rest))
            continue
        out.append(p)
    return out


@guarded(400, "request body")
def anthropic_request_to_ir(body: dict) -> dict:
    ir = empty_request(body.get("model") or "")
    system = body.get("system")
    ir["system"] = _text_only(system) if system is not None else []
    msgs = body.get("messages")
    if not isinstance(msgs, list):
        raise GatewayError(400, "messages: must be a list of message objects")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise GatewayError(400, f"messages.{i}: must be an object")
        role = m.get("role")
        parts = blocks_to_ir(m.get("content"), f"messages.{i}")
        if role == "system":                     # Claude Code sends some; hoist them
            ir["system"] += [p for p in parts if p["type"] == "text"]
        elif role == "user":
            results = [p for p in parts if p["type"] == "tool_result"]
            for r in results:
                ir["messages"].append({"role": "tool", "content": [r]})
            _append(ir["messages"], "user", [p for p in parts if p["type"] != "tool_result"])
        elif role == "assistant":
            _append(ir["messages"], "assistant", parts)
        else:
            raise GatewayError(400, f"messages.{i}.role: {role!r} is not 'user' or 'assistant'")
    ir["system"] = without_billing_header(ir["system"])
    tools = [t for t in body.get("tools") or [] if isinstance(t, dict)]
    # Tool search (Claude Code's, or the API's tool_search_tool_* server tools; Anthropic docs,
    # "Tool search tool"): tools marked defer_loading: true reach the model only once a
    # {"type": "tool_reference", "tool_name": ...} block names them (in a tool_result or a
    # tool_search_tool_result). Other providers know neither the field nor the
    # block, so a deferred tool is sent as an ordinary one from the turn after it was referenced,
    # and the reference becomes a line of text in its tool result. With a server-side search,
    # which no other provider can run, every deferred tool is sent from the start.
    server_search = any(str(t.get("type") or "").startswith("tool_search_tool") for t in tools)
    loaded = set() if server_search else _tool_references(msgs)
    for t in tools:
        if t.get("name") and t.get("type") in (None, "custom") and (
                server_search or t.get("defer_loading") is not True or t["name"] in loaded):
            ir["tools"].append({"name": t["name"], "description": t.get("description") or "",
                                "parameters": t.get("input_schema") or
                                {"type": "object", "properties": {}}})
    tc = body.get("tool_choice")
    if isinstance(tc, dict):
        kind = tc.get("type")
        ir["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}.get(kind) or (
            {"name": tc.get("name")} if kind == "tool" else None)
        if tc.get("disable_parallel_tool_use"):
            ir["parallel_tool_calls"] = False
    ir["max_tokens"] = body.get("max_tokens") if isinstance(body.get("max_tokens"), int) else None
    for key in ("temperature", "top_p", "top_k"):
        value = body.get(key)
        ir[key] = value if isinstance(value, (int, float)) and not isinstance(value, bool) \
            else None
    ir["stop"] = [s for s in body.get("stop_sequences") or [] if isinstance(s, str)]
    thinking = body.get("thinking") or {}
    effort = ir_effort((body.get("output_config") or {}).get("effort"))
    if thinking.get("type") == "enabled":
        budget = _num(thinking.get("budget_tokens")) or 1024
        ir["reasoning"] = {"effort": effort or effort_from_budget(budget), "budget": budget}
    elif thinking.get("type") == "adaptive" or effort:
        ir["reasoning"] = {"effort": effort or "high", "budget": None}     # Anthropic's default
    fmt = (body.get("output_config") or {}).get("format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        ir["response_format"] = {"type": "json_schema", "name": "output",
                                 "schema": fmt.get("schema") or {}, "strict": None}
    ir["stream"] = body.get("stream") is True
    ir["include_usage"] = True
    ir["user"] = (body.get("metadata") or {}).get("user_id")
    return ir


def _tool_references(value: Any) -> set[str]:
    """The tool names of every tool_reference block anywhere in ``value`` (messages)."""
    found: set[str] = set()
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            if item.get("type") == "tool_reference" and isinstance(item.get("tool_name"), str):
                found.add(item["tool_name"])
            stack.extend(v for v in item.values() if isinstance(v, (list, dict)))
    return found


def _ir_to_anthropic_blocks(parts: list[dict]) -> list[dict]:
    out: list[dict] = []
    for p in parts:
        t = p["type"]
        if t == "text":
            if p["text"]:
                out.append({"type": "text", "text": p["text"]})
        elif t == "image":
            out.append({"type": "image", "source": {"type": "url", "url": p["url"]}} if "url" in p
                       else {"type": "image", "source": {"type": "base64", "media_type":
                                                          p["media_type"], "data": p["data"]}})
        elif t == "file":
            out.append({"type": "document", "source": {"type": "base64", "media_type":
                                                       p["media_type"], "data": p["data"]}})
        elif t == "reasoning":
            # Only thinking Anthropic signed goes back to Anthropic, byte-exact (section 7 #13).
            if p.get("redacted"):
                out.append({"type": "redacted_thinking", "data": p["redacted"]})
            elif p.get("signature"):
                out.append({"type": "thinking", "thinking": p["text"],
                            "signature": p["signature"]})
        elif t == "tool_call":
            out.append({"type": "tool_use", "id": anthropic_tool_id(p["id"]), "name": p["name"],
                        "input": parse_arguments(p["arguments"])})
        elif t == "tool_result":
            content = _ir_to_anthropic_blocks(p["content"])
            block: dict[str, Any] = {"type": "tool_result", "tool_use_id": anthropic_tool_id(
                p["id"]), "content": content or [{"type": "text", "text": "(no output)"}]}
            if p.get("is_error"):
                block["is_error"] = True
            out.append(block)
    return out


def remember_thinking(kept: dict[str, list[dict]] | None, blocks: list[dict]) -> None:
    """Keep a Claude turn's signed thinking blocks (those before its first tool_use) under that
    call's id: clients of other dialects drop signatures, yet Claude refuses a tool loop whose
    last assistant turn lost its thinking, so the next request gets them back from here."""
    if kept is None:
        return
    thinking: list[dict] = []
    for b in blocks:
        if b.get("type") == "tool_use":
            if thinking and b.get("id") and \
                    len(json.dumps(thinking)) <= THINKING_KEPT_BYTES:
                kept[b["id"]] = thinking
            return
        if b.get("type") == "redacted_thinking" and b.get("data"):
            thinking.append({"type": "redacted_thinking", "data": b["data"]})
        elif b.get("type") == "thinking" and b.get("signature") and \
                b["signature"] != UNSIGNED_THINKING:
            thinking.append({"type": "thinking", "thinking": b.get("thinking") or "",
                             "signature": b["signature"]})


def _thinking_before_tools(blocks: list[dict]) -> bool:
    return not any(b["type"] == "tool_use" for b in blocks) or \
        blocks[0]["type"] in ("thinking", "redacted_thinking")


def ir_to_anthropic_request(ir: dict, model: str, *, stream: bool, max_tokens_cap: int = 0,
                            thinking_setting: str = "auto",
                            kept: dict[str, list[dict]] | None = None) -> dict:
    msgs: list[dict] = []
    for m in ir["messages"]:
        role = "assistant" if m["role"] == "assistant" else "user"
        blocks = _ir_to_anthropic_blocks(m["content"])
        calls = [p["id"] for p in m["content"] if p["type"] == "tool_call"]
        if role == "assistant" and calls and kept and not any(
                b["type"] in ("thinking", "redacted_thinking") for b in blocks):
            blocks = copy.deepcopy(kept.get(anthropic_tool_id(calls[0]), [])) + blocks
        if not blocks:
            continue
        if msgs and msgs[-1]["role"] == role:
            prev = msgs[-1]["content"]
            # tool_result blocks must come first in their user turn (section 3.3)
            if role == "user" and any(b["type"] == "tool_result" for b in blocks):
                msgs[-1]["content"] = [b for b in prev if b["type"] == "tool_result"] + \
                    [b for b in blocks if b["type"] == "tool_result"] + \
                    [b for b in prev if b["type"] != "tool_result"] + \
                    [b for b in blocks if b["type"] != "tool_result"]
            else:
                prev.extend(blocks)
        else:
            msgs.append({"role": role, "content": blocks})
    if msgs and msgs[0]["role"] == "assistant":
        msgs.insert(0, {"role": "user", "content": [{"type": "text", "text": "(continue)"}]})
    named = anthropic_thinking_mode(model)      # by the model's name, whatever the channel says
    if msgs and msgs[-1]["role"] == "assistant" and named in ("adaptive", "both") and \
            not any(b["type"] == "tool_use" for b in msgs[-1]["content"]):     # (a call: no reply)
        # Claude 4.6 and later: "This model does not support assistant message prefill. The
        # conversation must end with a user message." (a 400; platform.claude.com/docs/en/
        # about-claude/models/whats-new-claude-4-6#prefill-removal, quoted in
        # anthropics/claude-code#28478; Opus 5 too, Kilo-Org/kilocode#13286).
        msgs.append({"role": "user", "content": [{"type": "text", "text": CONTINUE_ASK}]})
    body: dict[str, Any] = {"model": model, "messages": msgs}
    system = [{"type": "text", "text": p["text"]} for p in ir["system"] if p.get("text")]
    if system:
        body["system"] = system
    max_tokens = ir["max_tokens"] or DEFAULT_ANTHROPIC_MAX_TOKENS
    if max_tokens_cap:
        max_tokens = min(max_tokens, max_tokens_cap)
    reasoning = ir["reasoning"]
    mode = anthropic_thinking_mode(model, thinking_setting)
    last = next((m for m in reversed(msgs) if m["role"] == "assistant"), None)
    if last is not None and last is not msgs[-1] and not _thinking_before_tools(last["content"]):
        # A tool loop whose last assistant turn has no signed thinking cannot run with thinking
        # on (Anthropic's 400: "When `thinking` is enabled, a final `assistant` message must
        # start with a thinking block", quoted in sigoden/llm-functions#222): answer without.
        reasoning = None
    if reasoning and reasoning["effort"] != "none" and mode != "none":
        budget = reasoning["budget"] or _EFFORT_BUDGET.get(reasoning["effort"], 8192)
        max_tokens, budget = room_for_thinking(max_tokens, max(1024, budget), max_tokens_cap)
        if mode == "adaptive" or (mode == "both" and not reasoning["budget"]):
            body["thinking"] = {"type": "adaptive"}
            if named == "adaptive":
                # Opus 4.7 and later, the Claude 5 family: thinking text is "omitted" unless
                # asked for (platform.claude.com/docs/en/build-with-claude/thinking; Opus 5.5
                # returns the text between tool calls in thinking blocks too, empty at that
                # default: models/opus-5-5/whats-new-opus-5-5). The client asked for
                # reasoning, in a dialect that shows it: summarized.
                body["thinking"]["display"] = "summarized"
            body["output_config"] = {"effort": anthropic_effort(reasoning["effort"], mode)}
        elif budget < max_tokens:
            body["thinking"] = {"type": "enabled", "budget_tokens": budget}
    body["max_tokens"] = max_tokens
    thinking = "thinking" in body
    # Opus 4.7 and later, the Claude 5 family (the "adaptive" models by name) have no sampling
    # parameters: a 400 "`temperature` is deprecated for this model" (platform.claude.com/docs/
    # en/about-claude/models/whats-new-claude-4-7#sampling-parameters-removed, quoted in
    # anomalyco/models.dev#1468; Sonnet 5 and Opus 4.8 in bagofwords1/bagofwords#523).
    sampling = not thinking and named != "adaptive"
    if ir["temperature"] is not None and sampling:
        body["temperature"] = max(0.0, min(1.0, ir["temperature"]))
    elif ir["top_p"] is not None and sampling:       # newer models refuse both (section 7 #20)
        body["top_p"] = ir["top_p"]
    if ir["top_k"] is not None and sampling:
        body["top_k"] = ir["top_k"]
    stops = [s for s in ir["stop"] if s.strip()]
    if stops:
        body["stop_sequences"] = stops
    if ir["tools"]:
        body["tools"] = [{"name": t["name"], "description": t.get("description") or "",
                          "input_schema": t.get("parameters") or
                          {"type": "object", "properties": {}}} for t in ir["tools"]]
        tc = ir["tool_choice"]
        choice: dict[str, Any] | None = None
        if isinstance(tc, dict):
            choice = {"type": "tool", "name": tc["name"]}
        elif tc in ("auto", "none", "required"):
            choice = {"type": {"required": "any"}.get(tc, tc)}
        if (thinking or CLAUDE_THINKS_BY_DEFAULT.search(model)) and choice and \
                choice["type"] in ("any", "tool"):
            choice = {"type": "auto"}                   # thinking allows only auto/none
        if ir["parallel_tool_calls"] is False:
            choice = choice or {"type": "auto"}
            if choice["type"] != "none":
                choice["disable_parallel_tool_use"] = True
        if choice:
            body["tool_choice"] = choice
    rf = ir["response_format"]
    if rf and rf["type"] == "json_schema":
        body.setdefault("output_config", {})["format"] = {"type": "json_schema",
                                                          "schema": rf["schema"]}
    if ir["user"]:
        body["metadata"] = {"user_id": str(ir["user"])[:256]}
    if stream:
        body["stream"] = True
    return body


def anthropic_usage_to_ir(u: Any) -> dict:
    if not isinstance(u, dict):
        return new_usage()
    read = _num(u.get("cache_read_input_tokens"))
    write = _num(u.get("cache_creation_input_tokens"))
    return new_usage(_num(u.get("input_tokens")) + read + write, _num(u.get("output_tokens")),
                     read, write)


def ir_usage_to_anthropic(u: dict) -> dict:
    return {"input_tokens": max(0, u["input"] - u["cache_read"] - u["cache_write"]),
            "output_tokens": u["output"], "cache_creation_input_tokens": u["cache_write"],
            "cache_read_input_tokens": u["cache_read"]}


@answer_guard
def anthropic_response_to_ir(body: dict, kept: dict[str, list[dict]] | None = None) -> dict:
    remember_thinking(kept, [b for b in body.get("content") or [] if isinstance(b, dict)])
    content = [p for p in blocks_to_ir(body.get("content") or [], "content")
               if p["type"] in ("text", "reasoning", "tool_call")]
    finish = _ANTHROPIC_STOP_IN.get(body.get("stop_reason") or "end_turn", "stop")
    return {"id": body.get("id") or new_id("msg_"), "model": body.get("model") or "",
            "content": content, "finish": finish,
            "usage": anthropic_usage_to_ir(body.get("usage"))}


@guarded(502, "upstream answer")
def ir_to_anthropic_response(resp: dict, model: str) -> dict:
    blocks: list[dict] = []
    for p in resp["content"]:
        if p["type"] == "reasoning" and p.get("redacted"):
            blocks.append({"type": "redacted_thinking", "data": p["redacted"]})
        elif p["type"] == "reasoning" and (p.get("text") or p.get("signature")):
            blocks.append({"type": "thinking", "thinking": p.get("text") or "",
                           "signature": p.get("signature") or UNSIGNED_THINKING})
        elif p["type"] == "text" and p["text"]:
            blocks.append({"type": "text", "text": p["text"]})
        elif p["type"] == "tool_call":
            blocks.append({"type": "tool_use", "id": anthropic_tool_id(p["id"]),
                           "name": p["name"], "input": parse_arguments(p["arguments"])})
    finish = resp["finish"]
    if any(b["type"] == "tool_use" for b in blocks):
        finish = "tool_calls"
    rid = resp["id"] if resp["id"].startswith("msg_") else "msg_" + resp["id"]
    return {"id": rid, "type": "message", "role": "assistant", "model": model,
            "content": blocks, "stop_reason": _ANTHROPIC_STOP_OUT.get(finish, "end_turn"),
            "stop_sequence": None, "usage": ir_usage_to_anthropic(resp["usage"])}


class AnthropicStreamDecoder(StreamDecoder):
    """Anthropic SSE events (upstream) -> IR stream events."""

    id_prefix = "msg_"

    text_rx = re.compile(r'"text"\s*:\s*"')

    def __init__(self, kept: dict[str, list[dict]] | None = None):
        super().__init__()
        self._blocks: dict[int, int | None] = {}    # block index -> IR tool index (None: other)
        self.usage = new_usage()
        self._kept = kept
        self._thinking: list[dict] = []            # this turn's thinking blocks, for ``kept``
        self._thinking_size = 0

    def _text_of(self, name: str | None, ev: dict) -> str | None:
        delta = ev.get("delta")
        if (ev.get("type") or name) != "content_block_delta" or not isinstance(delta, dict) \
                or delta.get("type") != "text_delta":
            return None
        text = delta.get("text")
        return text if type(text) is str else None

    @stream_guard
    def feed(self, data: bytes) -> list[tuple]:
        out: list[tuple] = []
        for name, ev in self._sse_objects(data):
            if type(ev) is str:                     # the usual text event, read by template
                out.append(("text", ev))
                continue
            kind = ev.get("type") or name
            if kind == "content_block_delta":
                delta = ev.get("delta") or {}
                dt = delta.get("type")
                if dt == "text_delta":
                    out.append(("text", delta.get("text") or ""))
                elif dt == "input_json_delta":
                    tool = self._blocks.get(ev.get("index", -1))
                    if tool is not None and delta.get("partial_json"):
                        out.append(("args", tool, delta["partial_json"]))
                elif dt == "thinking_delta":
                    out.append(("reasoning", delta.get("thinking") or ""))
                    self._keep_thinking("thinking", delta.get("thinking") or "")
                elif dt == "signature_delta":
                    out.append(("signature", delta.get("signature") or ""))
                    self._keep_thinking("signature", delta.get("signature") or "")
            elif kind == "message_start":
                msg = ev.get("message") or {}
                self._start(out, msg.get("id"), msg.get("model"))
                self.usage = anthropic_usage_to_ir(msg.get("usage"))
                out.append(("usage", dict(self.usage)))
            elif kind == "content_block_start":
                block = ev.get("content_block") or {}
                idx = ev.get("index", len(self._blocks))
                if self._kept is not None and \
                        block.get("type") in ("thinking", "redacted_thinking"):
                    self._thinking.append(dict(block))
                if block.get("type") == "tool_use" and self._tools == 0:
                    remember_thinking(self._kept, self._thinking + [block])
                if block.get("type") in ("tool_use", "server_tool_use"):
                    self._blocks[idx] = self._tools
                    out.append(("tool", self._tools, block.get("id") or new_id("toolu_"),
                                block.get("name") or ""))
                    self._tools += 1
                    if block.get("input"):
                        out.append(("args", self._blocks[idx], json.dumps(block["input"])))
                else:
                    self._blocks[idx] = None
                    if block.get("type") == "text" and block.get("text"):
                        out.append(("text", block["text"]))
            elif kind == "message_delta":
                reason = (ev.get("delta") or {}).get("stop_reason")
                if reason:
                    self.finish = _ANTHROPIC_STOP_IN.get(reason, "stop")
                u = ev.get("usage") or {}
                if "output_tokens" in u:
                    self.usage["output"] = _num(u["output_tokens"])
                if "input_tokens" in u:
                    fresh = anthropic_usage_to_ir(u)
                    for key in ("input", "cache_read", "cache_write"):
                        self.usage[key] = fresh[key]
                out.append(("usage", dict(self.usage)))
            elif kind == "error":
                err = ev.get("error") or {}
                status = {"overloaded_error": 529, "rate_limit_error": 429,
                          "api_error": 500}.get(err.get("type"), 502)
                out.append(("error", GatewayError(status, str(err.get("message") or "error"))))
        return out

    def _keep_thinking(self, key: str, text: str) -> None:
        """Add a delta to the open thinking block kept for replay (bounded; past the bound the
        turn is not kept at all)."""
        if not self._thinking or self._thinking[-1].get("type") != "thinking":
            return
        self._thinking_size += len(text)
        if self._thinking_size > THINKING_KEPT_BYTES:
            self._thinking.clear()
            self._kept = None
            return
        block = self._thinking[-1]
        block[key] = (block.get(key) or "") + text


def _event(name: str, data: dict) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + json_dumps(data) + b"\n\n"


def _delta_event(index: int, kind: bytes, key: bytes, value: str) -> bytes:
    """A content_block_delta event, built without a dict (it is the most frequent event)."""
    return (b'event: content_block_delta\ndata: {"type":"content_block_delta","index":%d,'
            b'"delta":{"type":"%s","%s":' % (index, kind, key) + json_string(value) + b"}}\n\n")


class AnthropicStreamEncoder:
    """IR stream events -> Anthropic SSE for the client, as the SDKs and Claude Code parse it:
    every event with its ``event:`` line; message_start with a full usage object; content blocks
    with dense indexes, one open at a time; tool_use blocks start with ``input: {}`` and get their
    arguments as input_json_delta; message_delta with stop reason and usage; message_stop."""

    def __init__(self, model: str, input_estimate: int = 0):
        self.model = model
        self.id = new_id("msg_")
        self.usage = new_usage(input_estimate)
        self._started = False
        self._next = 0
        self._open: tuple[str, int] | None = None          # (kind, block index)
        self._tool_blocks: dict[int, int] = {}              # IR tool index -> block index
        self._signature: str | None = None
        self._tools = False
        self._finished = False

    def _start(self, out: list[bytes]) -> None:
        if not self._started:
            self._started = True
            out.append(_event("message_start", {"type": "message_start", "message": {
                "id": self.id, "type": "message", "role": "assistant", "model": self.model,
                "content": [], "stop_reason": None, "stop_sequence": None,
                "usage": ir_usage_to_anthropic(self.usage)}}))

    def _close_open(self, out: list[bytes]) -> None:
        if self._open is None:
            return
        kind, idx = self._open
        if kind == "thinking":
            out.append(_event("content_block_delta", {
                "type": "content_block_delta", "index": idx, "delta": {
                    "type": "signature_delta",
                    "signature": self._signature or UNSIGNED_THINKING}}))
            self._signature = None
        out.append(_event("content_block_stop", {"type": "content_block_stop", "index": idx}))
        self._open = None

    def _ensure(self, kind: str, out: list[bytes]) -> int:
        if self._open is not None and self._open[0] == kind:
            return self._open[1]
        self._close_open(out)
        idx = self._next
        self._next += 1
        block = {"type": "text", "text": ""} if kind == "text" else \
            {"type": "thinking", "thinking": ""}
        out.append(_event("content_block_start", {"type": "content_block_start", "index": idx,
                                                  "content_block": block}))
        self._open = (kind, idx)
        return idx

    def encode(self, events: list[tuple]) -> bytes:
        out: list[bytes] = []
        for ev in events:
            kind = ev[0]
            if kind == "text" and self._started and not self._finished:
                if ev[1]:                               # the usual event, the shortest way
                    block = self._open
                    idx = block[1] if block is not None and block[0] == "text" else \
                        self._ensure("text", out)
                    out.append(_delta_event(idx, b"text_delta", b"text", ev[1]))
                continue
            if kind == "usage":
                u = ev[1]
                if u["input"] or not self.usage["input"]:
                    self.usage.update(u)
                else:
                    self.usage["output"] = u["output"]
                continue
            if kind == "error":
                self._start(out)
                out.append(stream_error_event(ANTHROPIC, ev[1]))
                self._finished = True
                continue
            if self._finished:
                continue
            self._start(out)
            if kind == "text":
                if ev[1]:
                    out.append(_delta_event(self._ensure("text", out), b"text_delta", b"text",
                                            ev[1]))
            elif kind == "reasoning":
                if ev[1]:
                    out.append(_delta_event(self._ensure("thinking", out), b"thinking_delta",
                                            b"thinking", ev[1]))
            elif kind == "signature":
                if ev[1] and (self._open is None or self._open[0] != "thinking"):
                    self._ensure("thinking", out)        # thinking sent with display omitted
                self._signature = ev[1]
            elif kind == "tool":
                self._close_open(out)
                self._tools = True
                idx = self._next
                self._next += 1
                self._tool_blocks[ev[1]] = idx
                out.append(_event("content_block_start", {
                    "type": "content_block_start", "index": idx, "content_block": {
                        "type": "tool_use", "id": anthropic_tool_id(ev[2]), "name": ev[3],
                        "input": {}}}))
                self._open = ("tool", idx)
            elif kind == "args":
                idx = self._tool_blocks.get(ev[1])
                if idx is not None and ev[2]:
                    out.append(_delta_event(idx, b"input_json_delta", b"partial_json", ev[2]))
            elif kind == "finish":
                self._close_open(out)
                reason = ev[1]
                if self._tools and reason == "stop":
                    reason = "tool_calls"
                out.append(_event("message_delta", {
                    "type": "message_delta", "delta": {
                        "stop_reason": _ANTHROPIC_STOP_OUT.get(reason, "end_turn"),
                        "stop_sequence": None}, "usage": ir_usage_to_anthropic(self.usage)}))
                out.append(_event("message_stop", {"type": "message_stop"}))
                self._finished = True
        return b"".join(out)

# Anthropic's tool names: ^[a-zA-Z0-9_-]{1,128}$ (Messages reference, tools[].name).
ANTHROPIC_TOOL_NAMES = (re.compile(r"[A-Za-z0-9_-]{1,128}\Z"), 128)


_SSE_EVENT_END = re.compile(rb"\r?\n\r?\n")


class MessageStartModel:
    """A byte filter over a Messages SSE stream: the message_start event (the first) gets
    ``model`` as its message's model; every byte after it passes as it came. When the first
    event is not a message_start that parses, or runs past MAX_EVENT_BYTES, the stream passes
    unchanged (its decoders judge it)."""

    __slots__ = ("_model", "_buf", "_done")

    def __init__(self, model: str):
        self._model, self._buf, self._done = model, b"", False

    def feed(self, data: bytes) -> bytes:
        if self._done:
            return data
        self._buf += data
        end = _SSE_EVENT_END.search(self._buf)
        if end is None:
            if len(self._buf) <= MAX_EVENT_BYTES:
                return b""
            self._done = True
            return self._buf
        self._done = True
        event, rest = self._buf[:end.end()], self._buf[end.end():]
        self._buf = b""
        return self._renamed(event) + rest

    def _renamed(self, event: bytes) -> bytes:
        lines = event.splitlines()
        data = [ln[5:].lstrip(b" ") for ln in lines if ln.startswith(b"data:")]
        try:
            obj = json_loads(b"\n".join(data), "an upstream stream event", status=502)
        except GatewayError:
            return event
        if not (isinstance(obj, dict) and obj.get("type") == "message_start" and
                isinstance(obj.get("message"), dict)):
            return event
        obj["message"]["model"] = self._model
        return b"event: message_start\ndata: " + json_dumps(obj) + b"\n\n"

    def end(self) -> bytes:
        rest, self._buf, self._done = self._buf, b"", True
        return rest


class AnthropicDialect(DialectAdapter):
    name = ANTHROPIC
    keepalive = b'event: ping\ndata: {"type":"ping"}\n\n'

    # Claude Code keeps a turn's thinking blocks (signed, needed back on the next tool turn)
    # only when the answer names the model it asked for; an answer naming the mapped one (a
    # Bedrock inference profile, Anthropic's dated name for an alias) loses them, and Claude
    # then refuses the next turn ("Expected `thinking`...").
    def named(self, answer: dict, model: str) -> dict | None:
        return dict(answer, model=model) if "model" in answer else None

    def stream_named(self, model: str) -> Callable[[], Any] | None:
        return lambda: MessageStartModel(model)

    def request_to_ir(self, body: dict, model: str, kind: str, params: dict) -> dict:
        return anthropic_request_to_ir(body)

    def response(self, resp: dict, model: str, ir: dict) -> dict:
        return ir_to_anthropic_response(resp, model)

    def stream_encoder(self, model: str, ir: dict) -> StreamEncoding:
        return AnthropicStreamEncoder(model, estimate_tokens(ir))

    def passthrough_decoders(self) -> tuple[Callable[[dict], dict], Callable[[], Any]]:
        return anthropic_response_to_ir, AnthropicStreamDecoder

    def plainly_has_text(self, answer: dict) -> bool:
        content = answer.get("content")
        block = content[0] if type(content) is list and content else None
        text = block.get("text") if type(block) is dict and block.get("type") == "text" else None
        return has_words(text)

    def usage(self, obj: Any) -> dict | None:
        """A whole message's usage, message_start's (input) or message_delta's (output)."""
        if not isinstance(obj, dict):
            return None
        u = obj.get("usage")
        if u is None and isinstance(obj.get("message"), dict):
            u = obj["message"].get("usage")
        if not isinstance(u, dict) or not ("input_tokens" in u or "output_tokens" in u):
            return None
        return anthropic_usage_to_ir(u)


class AnthropicProvider(ProviderAdapter):
    name = TYPE_ANTHROPIC
    default_url = "https://api.anthropic.com"
    serves_as_is = (ANTHROPIC,)
    needs_key = True
    tool_name_rule = ANTHROPIC_TOOL_NAMES
    caps_in_encoder = True
    replaces_headers = frozenset(("anthropic-version",))
    chat_path = "/v1/messages"

    def auth_headers(self, api_key: str, incoming: Headers | None = None,
                     quirks: dict | None = None) -> list[tuple[str, str]]:
        version = (incoming.get("anthropic-version") if incoming is not None else None) \
            or ANTHROPIC_VERSION
        return [("anthropic-version", version)] + (
            [anthropic_auth_header(api_key, quirks)] if api_key else [])

    def quirks(self, body: dict, quirks: dict | None) -> dict:
        return apply_anthropic_quirks(body, quirks)

    def encode_chat(self, ir: dict, model: str, opts: ChatOptions) -> dict:
        return apply_anthropic_quirks(ir_to_anthropic_request(
            ir, model, stream=opts.stream, max_tokens_cap=opts.max_tokens_cap,
            thinking_setting=opts.thinking, kept=opts.kept), opts.quirks)

    def decoders(self, signatures: dict[str, str] | None, kept: dict[str, list[dict]] | None,
                 model: str = "") -> tuple[Callable[[dict], dict], Callable[[], StreamDecoding]]:
        return (lambda body: anthropic_response_to_ir(body, kept),
                lambda: AnthropicStreamDecoder(kept))


# 9.6 Gemini (generateContent) --------------------------------------------------------------------
# The gemini channel type first, then the gemini client dialect (gemini-cli, google-genai).

_GEMINI_SCHEMA_KEYS = frozenset((
    "type", "format", "title", "description", "nullable", "enum", "items", "properties",
    "required", "propertyOrdering", "minItems", "maxItems", "minLength", "maxLength",
    "minProperties", "maxProperties", "minimum", "maximum", "pattern", "example", "default",
    "anyOf"))
_GEMINI_FINISH_IN = {"STOP": "stop", "MAX_TOKENS": "length"}
_GEMINI_FILTERED = ("SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII",
                    "IMAGE_SAFETY", "IMAGE_PROHIBITED_CONTENT", "IMAGE_RECITATION")


def gemini_schema(schema: Any, defs: dict | None = None) -> Any:
    """A JSON Schema cleaned down to the OpenAPI subset Gemini accepts (PROTOCOLS.md section 4.3):
    $ref inlined, type arrays and null variants turned into ``nullable``, const into enum, enum
    kept on strings only, string formats other than enum/date-time dropped, unknown keys
    dropped."""
    if not isinstance(schema, dict):
        return schema
    if defs is None:
        defs = dict(schema.get("$defs") or {}, **(schema.get("definitions") or {}))
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.rsplit("/", 1)[-1] in defs:
        target = defs[ref.rsplit("/", 1)[-1]]
        merged = dict(target, **{k: v for k, v in schema.items() if k != "$ref"})
        return gemini_schema(merged, {k: v for k, v in defs.items() if v is not target})
    s = dict(schema)
    out: dict[str, Any] = {}
    t = s.get("type")
    if isinstance(t, list):
        kinds = [k for k in t if k != "null"]
        if "null" in t:
            out["nullable"] = True
        if len(kinds) == 1:
            t = kinds[0]
        else:
            s["anyOf"] = [{"type": k} for k in kinds]
            t = None
    variants = s.get("anyOf") or s.get("oneOf")
    if isinstance(variants, list):
        real = [v for v in variants if not (isinstance(v, dict) and v.get("type") == "null")]
        if len(real) < len(variants):
            out["nullable"] = True
        if len(real) == 1 and isinstance(real[0], dict):
            inner = gemini_schema(real[0], defs)
            inner.update({k: v for k, v in out.items()})
            for key in ("description", "title", "default"):
                if key in s and key not in inner:
                    inner[key] = s[key]
            return inner
        out["anyOf"] = [gemini_schema(v, defs) for v in real]
    if "const" in s and "enum" not in s:
        s["enum"] = [s["const"]]
    if t is not None:
        out["type"] = str(t).upper()
    for key, value in s.items():
        if key not in _GEMINI_SCHEMA_KEYS or key in ("type", "anyOf"):
            continue
        if key == "properties" and isinstance(value, dict):
            out["properties"] = {name: gemini_schema(v, defs) for name, v in value.items()}
        elif key == "items":
            out["items"] = gemini_schema(value, defs)
        elif key == "enum":
            if out.get("type") in ("STRING", None) and isinstance(value, list):
                out["enum"] = [str(v) for v in value]
                out.setdefault("type", "STRING")
        elif key == "format":
            if value in ("enum", "date-time"):
                out["format"] = value
        elif key == "required":
            if isinstance(value, list):
                out["required"] = [r for r in value if r in (s.get("properties") or {})]
        else:
            out[key] = value
    if out.get("type") == "OBJECT" and "properties" in out and not out["properties"]:
        del out["properties"]
    return out


def gemini_model_path(base_url: str, model: str, method: str) -> str:
    base = base_url.rstrip("/")
    if not has_version_segment(base):
        base += "/v1beta"
    return f"{base}/models/{urllib.parse.quote(model, safe='')}:{method}"


_GEMINI_VERSION_RX = re.compile(r"gemini-(\d+)(?:\.(\d+))?(?:-(pro|flash-lite|flash))?", re.I)


def gemini_version(model: str) -> tuple[int, int, str]:
    """(major, minor, "pro"|"flash"|"flash-lite"|"") of a Gemini model name; (0, 0, "") when the
    name is not one (a channel's own alias)."""
    m = _GEMINI_VERSION_RX.search(model)
    if not m:
        return 0, 0, ""
    return int(m.group(1)), int(m.group(2) or 0), (m.group(3) or "").lower()


_GEMINI_LEVELS = ("minimal", "low", "medium", "high")


def gemini_thinking_levels(major: int, minor: int, variant: str) -> tuple[str, ...]:
    """The thinkingLevel values a Gemini 3 model takes, from Google's model tables
    (docs.cloud.google.com/gemini-enterprise-agent-platform/models/guides/gemini-3-7-flash and
    gemini-3-8-flash, ai.google.dev/gemini-api/docs/thinking): 3 Pro low and high, 3.1 Pro
    low, medium and high; Flash-Lite and Flash up to 3.6 minimal to high; 3.7 Flash, 3.8 Flash
    (and, by that trend, later Flash) low to high: minimal there is a 400 "'minimal' is not a
    supported thinking level for this model" (fishjar/kiss-translator#1048,
    dzivkovi/video-intel v2.7.1)."""
    if variant == "pro":
        return ("low", "high") if (major, minor) < (3, 1) else ("low", "medium", "high")
    if variant == "flash-lite" or (major, minor) < (3, 7):
        return _GEMINI_LEVELS
    return _GEMINI_LEVELS[1:]


def gemini_thinking_config(model: str, reasoning: dict) -> dict | None:
    """IR reasoning -> generationConfig.thinkingConfig for ``model``: a thinkingLevel for Gemini
    3 and later (the nearest level the model takes, a tie going up), a thinkingBudget for 2.5
    (and names we cannot read), never both (a 400), none for older models. Per
    ai.google.dev/gemini-api/docs/thinking: no Gemini 3 Pro turns thinking off. 2.5 Pro budgets
    run 128..32768 (no 0), Flash 0..24576, Flash-Lite 0 or 512..24576."""
    major, minor, variant = gemini_version(model)
    effort = reasoning["effort"]
    if major >= 3:
        return {"thinkingLevel": nearest_effort(effort, gemini_thinking_levels(
            major, minor, variant)), "includeThoughts": True}
    if major and (major, minor) < (2, 5):
        return None
    budget = 0 if effort == "none" else reasoning["budget"] or _EFFORT_BUDGET.get(effort, 8192)
    if variant == "pro":
        budget = min(max(budget, 128), 32768)
    elif variant:
        budget = min(budget, 24576)
        if variant == "flash-lite" and budget:
            budget = max(budget, 512)
    return {"thinkingBudget": budget, "includeThoughts": budget != 0}


def gemini_takes_prefill(model: str) -> bool:
    """Whether ``model`` takes contents that end with a model turn (and continues it). Google's
    latest-model guide: "Starting with Gemini 3.6 Flash and Gemini 3.5 Flash-Lite ... these
    models and all future Gemini model releases": prefilling model turns is no longer
    supported, a 400 "Requests ending with a model turn are not supported" (checked live in
    LibreChat-AI/agents#323: 3.6 Flash and 3.5 Flash-Lite 400, 3.5 Flash and 2.5 Flash 200;
    3.7 Flash in #412, 3.8 Flash in anomalyco/opencode#47034). A name we cannot read may be
    any of them: no."""
    major, minor, variant = gemini_version(model)
    if not major:
        return False
    return (major, minor) < (3, 5) or ((major, minor) == (3, 5) and variant != "flash-lite")


def ir_to_gemini_request(ir: dict, signatures: dict[str, str] | None = None,
                         model: str = "", max_tokens_cap: int = 0) -> dict:
    """``signatures`` holds what Gemini said about its calls: thoughtSignature by call id, and
    "id:<call id>" for the ids Gemini itself sent. Gemini 3 returns functionCall.id and takes
    it back in functionCall.id / functionResponse.id (parallel calls of one function are told
    apart only by it; FunctionCall.id, FunctionResponse.id in ai.google.dev/api/caching); Gemini
    2.x answers an id it did not send with 400 'Unknown name "id" at ...function_call' (reported
    in JetBrains/koog#735), so ids go only to Gemini 3 and later, and only Gemini's own."""
    signatures = signatures or {}
    send_ids = gemini_version(model)[0] >= 3
    names: dict[str, str] = {}
    contents: list[dict] = []

    def add(role: str, parts: list[dict]) -> None:
        if not parts:
            return
        if contents and contents[-1]["role"] == role:
            contents[-1]["parts"].extend(parts)
        else:
            contents.append({"role": role, "parts": parts})

    for m in ir["messages"]:
        role = m["role"]
        if role == "assistant":
            parts: list[dict] = []
            first_call = True
            for p in m["content"]:
                if p["type"] == "text" and p["text"]:
                    parts.append({"text": p["text"]})
                elif p["type"] == "tool_call":
                    names[p["id"]] = p["name"]
                    part: dict[str, Any] = {"functionCall": {"name": p["name"], "args":
                                                             parse_arguments(p["arguments"])}}
                    if send_ids and f"id:{p['id']}" in signatures:
                        part["functionCall"]["id"] = p["id"]
                    sig = signatures.get(p["id"])
                    if sig or first_call:
                        part["thoughtSignature"] = sig or THOUGHT_SKIP
                    first_call = False
                    parts.append(part)
            add("model", parts)
        elif role == "tool":
            for r in m["content"]:
                name = r.get("name") or names.get(r["id"]) or "tool"
                key = "error" if r.get("is_error") else "result"
                response: dict[str, Any] = {"name": name, "response": {
                    key: parts_text(r["content"])}}
                if send_ids and f"id:{r['id']}" in signatures:
                    response["id"] = r["id"]
                add("user", [{"functionResponse": response}])
                add("user", [{"inlineData": {"mimeType": c["media_type"], "data": c["data"]}}
                             for c in r["content"] if c["type"] == "image" and "data" in c])
        else:
            parts = []
            for p in m["content"]:
                if p["type"] == "text":
                    parts.append({"text": p["text"]})
                elif p["type"] in ("image", "file") and "data" in p:
                    parts.append({"inlineData": {"mimeType": p["media_type"], "data": p["data"]}})
                elif p["type"] == "image":
                    parts.append({"fileData": {"fileUri": p["url"]}})
                elif p["type"] == "audio":
                    parts.append({"inlineData": {"mimeType": f"audio/{p['format']}",
                                                 "data": p["data"]}})
            add("user", parts)
    if contents and contents[0]["role"] == "model":
        contents.insert(0, {"role": "user", "parts": [{"text": "(continue)"}]})
    if contents and contents[-1]["role"] == "model" and not gemini_takes_prefill(model) and \
            not any("functionCall" in p for p in contents[-1]["parts"]):     # (a call: no reply)
        contents.append({"role": "user", "parts": [{"text": CONTINUE_ASK}]})
    body: dict[str, Any] = {"contents": contents}
    system = parts_text(ir["system"])
    if system:
        body["systemInstruction"] = {"parts": [{"text": system}]}
    if ir["tools"]:
        decls = []
        for t in ir["tools"]:
            decl: dict[str, Any] = {"name": t["name"], "description": t.get("description") or ""}
            params = gemini_schema(t.get("parameters") or {})
            if params.get("properties"):
                decl["parameters"] = params
            decls.append(decl)
        body["tools"] = [{"functionDeclarations": decls}]
        tc = ir["tool_choice"]
        if isinstance(tc, dict):
            body["toolConfig"] = {"functionCallingConfig": {
                "mode": "ANY", "allowedFunctionNames": [tc["name"]]}}
        elif tc in ("auto", "none", "required"):
            body["toolConfig"] = {"functionCallingConfig": {
                "mode": {"required": "ANY"}.get(tc, tc.upper())}}
    gen: dict[str, Any] = {}
    for src, dst in (("max_tokens", "maxOutputTokens"), ("temperature", "temperature"),
                     ("top_p", "topP"), ("top_k", "topK"), ("seed", "seed"),
                     ("presence_penalty", "presencePenalty"),
                     ("frequency_penalty", "frequencyPenalty")):
        if ir[src] is not None:
            gen[dst] = ir[src]
    if ir["stop"]:
        gen["stopSequences"] = ir["stop"][:5]
    if ir["n"] != 1:
        gen["candidateCount"] = ir["n"]
    rf = ir["response_format"]
    if rf:
        gen["responseMimeType"] = "application/json"
        if rf["type"] == "json_schema":
            gen["responseSchema"] = gemini_schema(rf["schema"])
    thinking = gemini_thinking_config(model, ir["reasoning"]) if ir["reasoning"] else None
    if thinking:
        gen["thinkingConfig"] = thinking
        # Gemini counts thoughts in maxOutputTokens (googleapis/python-genai#782, #811).
        if thinking.get("thinkingBudget") and gen.get("maxOutputTokens"):
            gen["maxOutputTokens"], thinking["thinkingBudget"] = room_for_thinking(
                gen["maxOutputTokens"], thinking["thinkingBudget"], max_tokens_cap)
    if gen:
        body["generationConfig"] = gen
    return body


def gemini_usage_to_ir(u: Any) -> dict:
    if not isinstance(u, dict):
        return new_usage()
    thoughts = _num(u.get("thoughtsTokenCount"))
    return new_usage(_num(u.get("promptTokenCount")) + _num(u.get("toolUsePromptTokenCount")),
                     _num(u.get("candidatesTokenCount")) + thoughts,
                     _num(u.get("cachedContentTokenCount")), 0, thoughts)


def _gemini_finish(reason: str | None, tools: bool, blocked: bool) -> str:
    if blocked or reason in _GEMINI_FILTERED:
        return "content_filter"
    finish = _GEMINI_FINISH_IN.get(reason or "STOP", "stop")
    return "tool_calls" if tools and finish == "stop" else finish


@answer_guard
def gemini_response_to_ir(body: dict, signatures: dict[str, str] | None = None) -> dict:
    cands = body.get("candidates") or []
    cand = cands[0] if cands else {}
    content: list[dict] = []
    for part in (cand.get("content") or {}).get("parts") or []:
        content += _gemini_part(part, signatures)
    tools = any(p["type"] == "tool_call" for p in content)
    blocked = not cands and bool((body.get("promptFeedback") or {}).get("blockReason"))
    return {"id": body.get("responseId") or new_id("gen-"), "model": body.get("modelVersion")
            or "", "content": content,
            "finish": _gemini_finish(cand.get("finishReason"), tools, blocked),
            "usage": gemini_usage_to_ir(body.get("usageMetadata"))}


def _gemini_part(part: dict, signatures: dict[str, str] | None) -> list[dict]:
    if "functionCall" in part:
        fc = part["functionCall"] or {}
        call_id = fc.get("id") if isinstance(fc.get("id"), str) and fc["id"] else \
            new_id("call_")
        if signatures is not None and part.get("thoughtSignature"):
            signatures[call_id] = part["thoughtSignature"]
        if signatures is not None and call_id == fc.get("id"):
            signatures[f"id:{call_id}"] = ""               # Gemini's own id: it gets it back
        args = fc.get("args") or {}
        if not isinstance(args, dict):
            raise GatewayError(502, f"malformed upstream answer: a functionCall's args is a "
                                    f"{type(args).__name__}, not an object")
        return [{"type": "tool_call", "id": call_id, "name": fc.get("name") or "",
                 "arguments": json.dumps(args, ensure_ascii=False)}]
    text = part.get("text")
    if isinstance(text, str) and text:
        if part.get("thought"):
            return [{"type": "reasoning", "text": text, "signature": None, "redacted": None}]
        return [{"type": "text", "text": text}]
    return []


class GeminiStreamDecoder(StreamDecoder):
    """Gemini ``streamGenerateContent?alt=sse`` chunks (upstream) -> IR stream events. Function
    calls arrive whole; each gets the next tool index and a minted id; any call in any chunk makes
    the turn finish with tool_calls (section 7 #7)."""

    id_prefix = "gen-"

    def __init__(self, signatures: dict[str, str] | None = None):
        super().__init__()
        self._signatures = signatures
        self._reason: str | None = None
        self._blocked = False
        self.usage: dict | None = None

    @stream_guard
    def feed(self, data: bytes) -> list[tuple]:
        out: list[tuple] = []
        for _, chunk in self._sse_objects(data):
            if "error" in chunk:
                err = chunk["error"] if isinstance(chunk["error"], dict) else {}
                out.append(("error", GatewayError(_num(err.get("code")) or 502,
                                                  str(err.get("message") or chunk["error"]))))
                continue
            self._start(out, chunk.get("responseId"), chunk.get("modelVersion"))
            cands = chunk.get("candidates") or []
            if not cands and (chunk.get("promptFeedback") or {}).get("blockReason"):
                self._blocked = True
            for cand in cands[:1]:
                for part in (cand.get("content") or {}).get("parts") or []:
                    for p in _gemini_part(part, self._signatures):
                        if p["type"] == "tool_call":
                            out.append(("tool", self._tools, p["id"], p["name"]))
                            out.append(("args", self._tools, p["arguments"]))
                            self._tools += 1
                        else:
                            out.append(("text" if p["type"] == "text" else "reasoning",
                                        p["text"]))
                if cand.get("finishReason"):
                    self._reason = cand["finishReason"]
            if chunk.get("usageMetadata"):
                self.usage = gemini_usage_to_ir(chunk["usageMetadata"])
                out.append(("usage", self.usage))
        return out

    def _finish_reason(self) -> str:
        return _gemini_finish(self._reason, self._tools > 0, self._blocked)


def gemini_embed_request(texts: list[str], model: str, dimensions: Any = None) -> dict:
    reqs = []
    for text in texts:
        r: dict[str, Any] = {"model": f"models/{model}", "content": {"parts": [{"text": text}]}}
        if isinstance(dimensions, int):
            r["outputDimensionality"] = dimensions
        reqs.append(r)
    return {"requests": reqs}


@guarded(502, "embeddings answer", checked_vectors)
def gemini_embed_vectors(body: Any) -> tuple[list[list[float]], int]:
    if not isinstance(body, dict):
        raise GatewayError(502, "the embeddings answer is not an object")
    items = body.get("embeddings") or ([body["embedding"]] if "embedding" in body else [])
    return [list(e.get("values") or []) for e in items], 0


@guarded(400, "request body")
def gemini_embed_texts(kind: str, body: dict) -> tuple[list[str], Any]:
    """(texts, outputDimensionality) of an embedContent or batchEmbedContents request."""
    reqs = [body] if kind == "embedContent" else body.get("requests") or []
    texts = []
    for r in reqs:
        parts = ((r or {}).get("content") or {}).get("parts") or []
        texts.append("".join(p.get("text") or "" for p in parts if isinstance(p, dict)))
    if not texts:
        raise GatewayError(400, "no content to embed")
    return texts, (reqs[0] or {}).get("outputDimensionality")


# gemini-cli and the google-genai SDK. Function calls get deterministic ids (call_<turn>_<n>) so
# that the functionResponse parts of the next turn (matched by id, else by name in order) become
# tool results with the same ids. The model comes from the URL, not the body.

_GEMINI_FINISH_OUT = {"stop": "STOP", "tool_calls": "STOP", "length": "MAX_TOKENS",
                      "content_filter": "SAFETY"}


def schema_from_gemini(schema: Any) -> Any:
    """Gemini's OpenAPI-style schema (upper-case types, ``nullable``) as JSON Schema."""
    if isinstance(schema, list):
        return [schema_from_gemini(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: schema_from_gemini(v) if k in ("items", "anyOf") else v
           for k, v in schema.items() if k not in ("type", "nullable", "properties",
                                                   "propertyOrdering")}
    if "properties" in schema and isinstance(schema["properties"], dict):
        out["properties"] = {k: schema_from_gemini(v) for k, v in schema["properties"].items()}
    t = schema.get("type")
    if isinstance(t, str):
        out["type"] = [t.lower(), "null"] if schema.get("nullable") else t.lower()
    return out


def _gemini_parts_to_ir(parts: list, turn: int, pending: list[tuple[str, str]],
                        role: str) -> tuple[list[dict], list[dict]]:
    """(ordinary parts, tool results) of one content."""
    out: list[dict] = []
    results: list[dict] = []
    n = 0
    for p in parts or []:
        if not isinstance(p, dict):
            continue
        if "functionCall" in p:
            fc = p["functionCall"] or {}
            call_id = fc.get("id") or f"call_{turn}_{n}"
            n += 1
            pending.append((fc.get("name") or "", call_id))
            out.append({"type": "tool_call", "id": call_id, "name": fc.get("name") or "",
                        "arguments": json.dumps(fc.get("args") or {}, ensure_ascii=False)})
        elif "functionResponse" in p:
            fr = p["functionResponse"] or {}
            name = fr.get("name") or ""
            call_id = fr.get("id")
            match = next((i for i, (nm, cid) in enumerate(pending)
                          if (cid == call_id if call_id else nm == name)), None)
            if match is not None:
                call_id = pending.pop(match)[1]
            response = fr.get("response")
            if isinstance(response, dict) and len(response) == 1 and \
                    isinstance(next(iter(response.values())), str):
                text = next(iter(response.values()))
            else:
                text = json.dumps(response, ensure_ascii=False)
            results.append({"type": "tool_result", "id": call_id or f"call_{name}",
                            "name": name, "content": [{"type": "text", "text": text}],
                            "is_error": isinstance(response, dict) and "error" in response
                            and len(response) == 1})
        elif isinstance(p.get("text"), str):
            if p["text"]:
                out.append({"type": "reasoning" if p.get("thought") and role == "model"
                            else "text", "text": p["text"], **({"signature": None,
                                                                "redacted": None}
                                                               if p.get("thought") else {})})
        elif "inlineData" in p or "inline_data" in p:
            d = p.get("inlineData") or p.get("inline_data") or {}
            mime = d.get("mimeType") or d.get("mime_type") or ""
            if mime.startswith("image/"):
                out.append({"type": "image", "media_type": mime, "data": d.get("data") or ""})
            elif mime.startswith("audio/"):
                out.append({"type": "audio", "format": mime.split("/")[1],
                            "data": d.get("data") or ""})
            else:
                out.append({"type": "file", "media_type": mime, "data": d.get("data") or "",
                            "filename": "file"})
        elif "fileData" in p:
            out.append({"type": "image", "url": (p["fileData"] or {}).get("fileUri") or ""})
    return out, results


@guarded(400, "request body")
def gemini_request_to_ir(body: dict) -> dict:
    ir = empty_request(body.get("model") or "")
    system = body.get("systemInstruction") or body.get("system_instruction")
    if isinstance(system, dict):
        ir["system"] = _text_only(system.get("parts") or [])
    elif isinstance(system, str):
        ir["system"] = _text_only(system)
    contents = body.get("contents")
    if isinstance(contents, dict):
        contents = [contents]
    if not isinstance(contents, list):
        raise GatewayError(400, "contents: must be a list of {role, parts}")
    pending: list[tuple[str, str]] = []
    for turn, c in enumerate(contents):
        if not isinstance(c, dict):
            raise GatewayError(400, f"contents[{turn}]: must be an object")
        role = c.get("role") or "user"
        parts, results = _gemini_parts_to_ir(c.get("parts") or [], turn, pending, role)
        if role == "model":
            _append(ir["messages"], "assistant", parts)
        else:
            for r in results:
                ir["messages"].append({"role": "tool", "content": [r]})
            _append(ir["messages"], "user", parts)
    for tool in body.get("tools") or []:
        for d in (tool or {}).get("functionDeclarations") or \
                (tool or {}).get("function_declarations") or []:
            params = d.get("parametersJsonSchema") or schema_from_gemini(d.get("parameters")) \
                or {"type": "object", "properties": {}}
            ir["tools"].append({"name": d.get("name") or "", "parameters": params,
                                "description": d.get("description") or ""})
    fcc = ((body.get("toolConfig") or {}).get("functionCallingConfig") or {})
    mode = (fcc.get("mode") or "").upper()
    names = fcc.get("allowedFunctionNames") or []
    if mode == "ANY":
        ir["tool_choice"] = {"name": names[0]} if len(names) == 1 else "required"
    elif mode in ("AUTO", "NONE"):
        ir["tool_choice"] = mode.lower()
    gen = body.get("generationConfig") or {}
    for src, dst in (("maxOutputTokens", "max_tokens"), ("temperature", "temperature"),
                     ("topP", "top_p"), ("topK", "top_k"), ("seed", "seed"),
                     ("presencePenalty", "presence_penalty"),
                     ("frequencyPenalty", "frequency_penalty")):
        value = gen.get(src)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            ir[dst] = value
    ir["stop"] = [s for s in gen.get("stopSequences") or [] if isinstance(s, str)]
    if isinstance(gen.get("candidateCount"), int):
        ir["n"] = gen["candidateCount"]
    schema = gen.get("responseJsonSchema") or schema_from_gemini(gen.get("responseSchema"))
    if schema:
        ir["response_format"] = {"type": "json_schema", "name": "output", "schema": schema,
                                 "strict": None}
    elif gen.get("responseMimeType") == "application/json":
        ir["response_format"] = {"type": "json_object"}
    thinking = gen.get("thinkingConfig") or gen.get("thinking_config") or {}
    # Proto JSON takes snake_case too, and the google-genai SDK sends "thinking_level" so.
    budget = thinking.get("thinkingBudget", thinking.get("thinking_budget"))
    level = str(thinking.get("thinkingLevel") or thinking.get("thinking_level") or "").lower()
    if budget is not None or level:
        if budget == 0:
            ir["reasoning"] = {"effort": "none", "budget": None}
        elif ir_effort(level):
            ir["reasoning"] = {"effort": ir_effort(level), "budget": None}
        elif isinstance(budget, int) and budget > 0:
            ir["reasoning"] = {"effort": effort_from_budget(budget), "budget": budget}
        elif budget == -1:                                 # dynamic: the model decides
            ir["reasoning"] = {"effort": "high", "budget": None}
    ir["include_usage"] = True
    return ir


def ir_usage_to_gemini(u: dict) -> dict:
    out = {"promptTokenCount": u["input"], "candidatesTokenCount": u["output"] - u["reasoning"],
           "totalTokenCount": u["input"] + u["output"]}
    if u["reasoning"]:
        out["thoughtsTokenCount"] = u["reasoning"]
    if u["cache_read"]:
        out["cachedContentTokenCount"] = u["cache_read"]
    return out


def _gemini_out_parts(content: list[dict]) -> list[dict]:
    parts: list[dict] = []
    for p in content:
        if p["type"] == "reasoning" and p.get("text"):
            parts.append({"text": p["text"], "thought": True})
        elif p["type"] == "text" and p["text"]:
            parts.append({"text": p["text"]})
        elif p["type"] == "tool_call":
            parts.append({"functionCall": {"id": p["id"], "name": p["name"],
                                           "args": parse_arguments(p["arguments"])}})
    return parts


@guarded(502, "upstream answer")
def ir_to_gemini_response(resp: dict, model: str, ir: dict | None = None) -> dict:
    return {"candidates": [{"content": {"role": "model",
                                        "parts": _gemini_out_parts(resp["content"]) or
                                        [{"text": ""}]},
                            "finishReason": _GEMINI_FINISH_OUT.get(resp["finish"], "STOP"),
                            "index": 0}],
            "usageMetadata": ir_usage_to_gemini(resp["usage"]), "modelVersion": model,
            "responseId": resp["id"]}


class GeminiStreamEncoder:
    """IR stream events -> streamGenerateContent for the client: one chunk per text delta,
    function calls held until their arguments are whole and sent as one functionCall part, the
    last chunk with finishReason and usageMetadata. With ``alt=sse`` each chunk is an SSE
    ``data:``; without it the chunks form one JSON array streamed piece by piece."""

    def __init__(self, model: str, ir: dict):
        self.model = model
        self.sse = ir.get("gemini_sse", True)
        self.usage: dict | None = None
        self._calls: dict[int, dict] = {}
        self._sent = 0
        self._done = False

    def _chunk(self, obj: dict) -> bytes:
        data = json_dumps(obj)
        self._sent += 1
        if self.sse:
            return b"data: " + data + b"\r\n\r\n"
        return (b"[" if self._sent == 1 else b",\r\n") + data

    def encode(self, events: list[tuple]) -> bytes:
        out: list[bytes] = []
        for ev in events:
            kind = ev[0]
            if kind == "usage":
                self.usage = ev[1]
            elif self._done:
                continue
            elif kind in ("text", "reasoning") and ev[1]:
                part = {"text": ev[1], "thought": True} if kind == "reasoning" else \
                    {"text": ev[1]}
                out.append(self._chunk({"candidates": [{"content": {
                    "role": "model", "parts": [part]}, "index": 0}], "modelVersion": self.model}))
            elif kind == "tool":
                self._calls[ev[1]] = {"id": ev[2], "name": ev[3], "args": []}
            elif kind == "args" and ev[1] in self._calls:
                self._calls[ev[1]]["args"].append(ev[2])
            elif kind == "finish":
                self._done = True
                parts = [{"functionCall": {"id": c["id"], "name": c["name"],
                                           "args": parse_arguments("".join(c["args"]))}}
                         for _, c in sorted(self._calls.items())] or [{"text": ""}]
                out.append(self._chunk({
                    "candidates": [{"content": {"role": "model", "parts": parts},
                                    "finishReason": _GEMINI_FINISH_OUT.get(ev[1], "STOP"),
                                    "index": 0}],
                    "usageMetadata": ir_usage_to_gemini(self.usage or new_usage()),
                    "modelVersion": self.model}))
                if not self.sse:
                    out.append(b"]")
            elif kind == "error":
                self._done = True
                err = error_payload(GEMINI, ev[1])
                out.append(self._chunk(err) + (b"]" if not self.sse else b""))
        return b"".join(out)

# Gemini's tool names: letters, digits, _ . : and -, at most 64, starting with a letter or _
# (generativelanguage v1beta FunctionDeclaration.name; google-genai FunctionDeclaration.name).
GEMINI_TOOL_NAMES = (re.compile(r"[A-Za-z_][A-Za-z0-9_.:-]{0,63}\Z"), 64)


class GeminiDialect(DialectAdapter):
    name = GEMINI
    model_in_path = True

    def request_to_ir(self, body: dict, model: str, kind: str, params: dict) -> dict:
        if kind == "countTokens" and isinstance(body.get("generateContentRequest"), dict):
            body = body["generateContentRequest"]
        ir = gemini_request_to_ir(dict(body, model=model))
        ir["gemini_sse"] = params.get("alt") == "sse"        # a transport hint
        return ir

    def response(self, resp: dict, model: str, ir: dict) -> dict:
        return ir_to_gemini_response(resp, model, ir)

    def stream_encoder(self, model: str, ir: dict) -> StreamEncoding:
        return GeminiStreamEncoder(model, ir)

    def count_payload(self, count: int) -> dict:
        return {"totalTokens": count}

    def passthrough_decoders(self) -> tuple[Callable[[dict], dict], Callable[[], Any]]:
        return gemini_response_to_ir, GeminiStreamDecoder

    def usage(self, obj: Any) -> dict | None:
        u = obj.get("usageMetadata") if isinstance(obj, dict) else None
        if not isinstance(u, dict):
            return None
        return gemini_usage_to_ir(u)


class GeminiProvider(ProviderAdapter):
    name = TYPE_GEMINI
    default_url = "https://generativelanguage.googleapis.com"
    serves_as_is = (GEMINI,)
    needs_key = True
    embeds = True
    # Gemini's inlineData takes PDFs too (ai.google.dev/gemini-api/docs/document-processing,
    # "Passing PDF data inline"); image URLs are fetched for it (UrlFetcher).
    inline_media = ("image/", "application/pdf")
    tool_name_rule = GEMINI_TOOL_NAMES

    def auth_headers(self, api_key: str, incoming: Headers | None = None,
                     quirks: dict | None = None) -> list[tuple[str, str]]:
        return [("x-goog-api-key", api_key)] if api_key else []

    def passthrough_url(self, ch: Any, path: str, kind: str, model: str,
                        stream: bool = False) -> str:
        return gemini_model_path(ch.base_url, model, kind)

    def chat_url(self, ch: Any, model: str, stream: bool) -> str:
        return gemini_model_path(ch.base_url, model, "streamGenerateContent?alt=sse"
                                 if stream else "generateContent")

    def models_url(self, ch: Any) -> str:
        return gemini_model_path(ch.base_url, "", "").rsplit("/", 1)[0] + "?pageSize=1000"

    def embeddings_url(self, ch: Any, model: str) -> str:
        return gemini_model_path(ch.base_url, model, "batchEmbedContents")

    def encode_chat(self, ir: dict, model: str, opts: ChatOptions) -> dict:
        return ir_to_gemini_request(ir, opts.signatures, model, opts.max_tokens_cap)

    def encode_embeddings(self, texts: list[str], model: str, dims: Any) -> dict:
        return gemini_embed_request(texts, model, dims)

    def decoders(self, signatures: dict[str, str] | None, kept: dict[str, list[dict]] | None,
                 model: str = "") -> tuple[Callable[[dict], dict], Callable[[], StreamDecoding]]:
        return (lambda body: gemini_response_to_ir(body, signatures),
                lambda: GeminiStreamDecoder(signatures))

    def embed_vectors(self, body: Any) -> tuple[list[list[float]], int]:
        return gemini_embed_vectors(body)


# 9.7 Ollama (native /api/chat) -------------------------------------------------------------------
# The ollama channel type (channel only: Ollama clients use its OpenAI-compatible /v1).

def ir_to_ollama_request(ir: dict, model: str, *, stream: bool) -> dict:
    msgs: list[dict] = []
    system = parts_text(ir["system"])
    if system:
        msgs.append({"role": "system", "content": system})
    names: dict[str, str] = {}
    for m in ir["messages"]:
        if m["role"] == "tool":
            for r in m["content"]:
                text = parts_text(r["content"])
                msgs.append({"role": "tool", "content": f"Error: {text}" if r.get("is_error")
                             else text, "tool_call_id": r["id"],
                             "tool_name": r.get("name") or names.get(r["id"], "")})
            continue
        out: dict[str, Any] = {"role": m["role"], "content": parts_text(m["content"])}
        images = [p["data"] for p in m["content"] if p["type"] == "image" and "data" in p]
        if images:
            out["images"] = images
        thinking = "".join(p.get("text") or "" for p in m["content"] if p["type"] == "reasoning")
        if thinking:
            out["thinking"] = thinking
        calls = []
        for p in m["content"]:
            if p["type"] == "tool_call":
                names[p["id"]] = p["name"]
                calls.append({"id": p["id"], "function": {
                    "name": p["name"], "arguments": parse_arguments(p["arguments"])}})
        if calls:
            out["tool_calls"] = calls
        msgs.append(out)
    body: dict[str, Any] = {"model": model, "messages": msgs, "stream": stream}
    if ir["tools"]:
        body["tools"] = [{"type": "function", "function": {
            "name": t["name"], "description": t.get("description") or "",
            "parameters": t.get("parameters") or {"type": "object", "properties": {}}}}
            for t in ir["tools"]]
    options: dict[str, Any] = {}
    for src, dst in (("max_tokens", "num_predict"), ("temperature", "temperature"),
                     ("top_p", "top_p"), ("top_k", "top_k"), ("seed", "seed"),
                     ("presence_penalty", "presence_penalty"),
                     ("frequency_penalty", "frequency_penalty")):
        if ir[src] is not None:
            options[dst] = ir[src]
    if ir["stop"]:
        options["stop"] = ir["stop"]
    if options:
        body["options"] = options
    rf = ir["response_format"]
    if rf:
        body["format"] = rf["schema"] if rf["type"] == "json_schema" else "json"
    if ir["reasoning"]:
        effort = ir["reasoning"]["effort"]
        body["think"] = False if effort == "none" else \
            {"minimal": "low", "xhigh": "high", "max": "high"}.get(effort, effort)
    return body


def _ollama_message_parts(msg: dict) -> list[dict]:
    out: list[dict] = []
    if isinstance(msg.get("thinking"), str) and msg["thinking"]:
        out.append({"type": "reasoning", "text": msg["thinking"], "signature": None,
                    "redacted": None})
    if isinstance(msg.get("content"), str) and msg["content"]:
        out.append({"type": "text", "text": msg["content"]})
    for c in msg.get("tool_calls") or []:
        fn = c.get("function") or {}
        args = fn.get("arguments")
        out.append({"type": "tool_call", "id": c.get("id") or new_id("call_"),
                    "name": fn.get("name") or "",
                    "arguments": args if isinstance(args, str) else json.dumps(
                        args or {}, ensure_ascii=False)})
    return out


def _ollama_finish(obj: dict, tools: bool) -> str:
    reason = "length" if obj.get("done_reason") == "length" else "stop"
    return "tool_calls" if tools and reason == "stop" else reason


def ollama_usage_to_ir(obj: dict) -> dict:
    return new_usage(_num(obj.get("prompt_eval_count")), _num(obj.get("eval_count")))


@answer_guard
def ollama_response_to_ir(body: dict) -> dict:
    content = _ollama_message_parts(body.get("message") or {})
    tools = any(p["type"] == "tool_call" for p in content)
    return {"id": new_id("chatcmpl-"), "model": body.get("model") or "", "content": content,
            "finish": _ollama_finish(body, tools), "usage": ollama_usage_to_ir(body)}


class OllamaStreamDecoder(StreamDecoder):
    """Ollama NDJSON objects (upstream) -> IR stream events; a line with ``error`` ends it."""

    def __init__(self):
        super().__init__()
        self._nd = NDJSONDecoder()
        self._final: dict | None = None

    @stream_guard
    def feed(self, data: bytes) -> list[tuple]:
        out: list[tuple] = []
        for obj in self._nd.feed(data):
            if not isinstance(obj, dict):
                continue
            if obj.get("error"):
                out.append(("error", GatewayError(502, str(obj["error"]))))
                continue
            self._start(out, None, obj.get("model"))
            for p in _ollama_message_parts(obj.get("message") or {}):
                if p["type"] == "tool_call":
                    out.append(("tool", self._tools, p["id"], p["name"]))
                    out.append(("args", self._tools, p["arguments"]))
                    self._tools += 1
                else:
                    out.append(("text" if p["type"] == "text" else "reasoning", p["text"]))
            if obj.get("done"):
                self._final = obj
                out.append(("usage", ollama_usage_to_ir(obj)))
        return out

    def _finish_reason(self) -> str:
        return _ollama_finish(self._final or {}, self._tools > 0)


@guarded(502, "embeddings answer", checked_vectors)
def ollama_embed_vectors(body: Any) -> tuple[list[list[float]], int]:
    if not isinstance(body, dict):
        raise GatewayError(502, "the embeddings answer is not an object")
    return [list(v) for v in body.get("embeddings") or []], _num(body.get("prompt_eval_count"))


def ollama_url(base_url: str, path: str) -> str:
    """Ollama's native API lives at the root even when the channel URL names its /v1."""
    base = base_url.rstrip("/")
    return (base[:-3] if base.endswith("/v1") else base) + path


class OllamaProvider(ProviderAdapter):
    name = TYPE_OLLAMA
    default_url = "http://localhost:11434"
    embeds = True
    inline_media = ("image/",)        # images only as base64 (image URLs are fetched for it)

    chat_path, models_path, embeddings_path = "/api/chat", "/api/tags", "/api/embed"

    def join(self, base_url: str, path: str) -> str:
        return ollama_url(base_url, path)

    def encode_chat(self, ir: dict, model: str, opts: ChatOptions) -> dict:
        return ir_to_ollama_request(ir, model, stream=opts.stream)

    def decoders(self, signatures: dict[str, str] | None, kept: dict[str, list[dict]] | None,
                 model: str = "") -> tuple[Callable[[dict], dict], Callable[[], StreamDecoding]]:
        return ollama_response_to_ir, OllamaStreamDecoder

    def embed_vectors(self, body: Any) -> tuple[list[list[float]], int]:
        return ollama_embed_vectors(body)


# 9.8 Azure OpenAI --------------------------------------------------------------------------------
# The azure channel type (channel only): the OpenAI wire format at other URLs.

# Azure OpenAI: the OpenAI wire format at other URLs and with another key header.
# learn.microsoft.com/azure/ai-foundry/openai/reference ("API specs", "Authentication"): a
# resource endpoint https://{resource}.openai.azure.com, the key in an `api-key` header, the
# deployment in the path (/openai/deployments/{deployment}/chat/completions, /embeddings,
# /images/generations, /audio/...) and a dated ?api-version; the latest GA data-plane inference
# version there is 2024-10-21. Responses, in the dated form, is /openai/responses?api-version=
# with the deployment as "model" (learn.microsoft.com/azure/ai-foundry/openai/how-to/responses).
# The v1 API (learn.microsoft.com/azure/ai-foundry/openai/api-version-lifecycle) drops the
# api-version and the deployment segment: {endpoint}/openai/v1/chat/completions, /responses,
# /embeddings, /models, with the deployment as "model" in the body.
AZURE_API_VERSION = "2024-10-21"
_AZURE_UNDEPLOYED = ("/models", "/responses")     # dated-form paths without a deployment


class AzureProvider(OpenAIProvider):
    name = TYPE_AZURE
    default_url = ""                         # each resource has its own endpoint

    def auth_headers(self, api_key: str, incoming: Headers | None = None,
                     quirks: dict | None = None) -> list[tuple[str, str]]:
        return [("api-key", api_key)] if api_key else []

    @staticmethod
    def deployment_url(ch: Any, model: str, suffix: str) -> str:
        """``suffix`` (such as /chat/completions) on the channel's endpoint, in the v1 form when
        its base_url ends in /openai/v1, else in the dated form for deployment ``model``."""
        base = ch.base_url.rstrip("/")
        if base.endswith("/openai/v1"):
            return base + suffix
        base = base[:-7] if base.endswith("/openai") else base
        query = "?api-version=" + urllib.parse.quote(ch.api_version or AZURE_API_VERSION)
        if suffix in _AZURE_UNDEPLOYED:
            return f"{base}/openai{suffix}{query}"
        return f"{base}/openai/deployments/{urllib.parse.quote(model, safe='')}{suffix}{query}"

    def passthrough_url(self, ch: Any, path: str, kind: str, model: str,
                        stream: bool = False) -> str:
        return self.deployment_url(ch, model, path[3:] if path.startswith("/v1/") else path)

    def chat_url(self, ch: Any, model: str, stream: bool) -> str:
        return self.passthrough_url(ch, self.chat_path, "chat", model)

    def models_url(self, ch: Any) -> str:
        return self.passthrough_url(ch, self.models_path, "models", "")

    def embeddings_url(self, ch: Any, model: str) -> str:
        return self.passthrough_url(ch, self.embeddings_path, "embeddings", model)


# 9.9 AWS Bedrock and Google Vertex AI -----------------------------------------------------------
# The two cloud channel types (channel side only): URLs, the Anthropic Messages body as
# Bedrock's InvokeModel and Vertex's rawPredict take it, Bedrock's own Converse format <-> IR,
# and their adapters. Bedrock's streams arrive as AWS event-stream messages
# (EventStreamDecoder, section 5).

BEDROCK_ANTHROPIC_VERSION = "bedrock-2023-05-31"     # AWS Bedrock user guide, "Anthropic Claude
                                                     # Messages API", request body
# The beta flags InvokeModel takes in anthropic_beta (AWS Bedrock user guide, "Anthropic Claude
# Messages API", request parameters, as BerriAI/litellm#19875 lists them; the later ones from
# LiteLLM's anthropic_beta_headers_config.json, its bedrock column).
# Any other flag fails the whole request with a 400 "invalid beta flag", and Claude Code sends
# first-party ones (prompt-caching-scope-..., thinking-token-count-...) to a base URL:
# anthropics/claude-code#49370, #56595; router-for-me/CLIProxyAPI#4750 tried them one by one.
BEDROCK_BETAS = frozenset((
    "computer-use-2024-10-22", "computer-use-2025-01-24", "token-efficient-tools-2025-02-19",
    "interleaved-thinking-2025-05-14", "output-128k-2025-02-19", "dev-full-thinking-2025-05-14",
    "context-1m-2025-08-07", "context-management-2025-06-27", "effort-2025-11-24",
    "tool-search-tool-2025-10-19", "tool-examples-2025-10-29", "compact-2026-01-12",
    "computer-use-2025-11-24", "fine-grained-tool-streaming-2025-05-14",
    "thinking-display-updates-2026-08-18"))
VERTEX_ANTHROPIC_VERSION = "vertex-2023-10-16"       # Google Cloud docs, "Use Claude models":
                                                     # the rawPredict request body
# The anthropic-beta flags Claude on Vertex takes (LiteLLM's anthropic_beta_headers_config.json,
# its vertex_ai column). Any other is a 400 "Unexpected value(s) `prompt-caching-scope-2026-01-
# 05` for the `anthropic-beta` header" (anthropics/claude-code#21625, Claude Code through a
# gateway; #34802 for effort-2025-11-24; vercel/ai#10981 for structured-outputs).
VERTEX_BETAS = frozenset((
    "interleaved-thinking-2025-05-14", "context-1m-2025-08-07", "context-management-2025-06-27",
    "computer-use-2025-01-24", "computer-use-2025-11-24", "tool-search-tool-2025-10-19",
    "web-search-2025-03-05", "compact-2026-01-12", "thinking-display-updates-2026-08-18"))


def known_betas(flags: Iterable[Any], known: frozenset[str]) -> list[str]:
    """The beta flags of ``flags`` (items of an anthropic_beta list, pieces of an
    anthropic-beta header) that are in ``known``, in order, each once."""
    return [f for f in dict.fromkeys(f.strip() for f in flags if isinstance(f, str))
            if f in known]


def bedrock_base_url(region: str) -> str:
    """The bedrock-runtime endpoint of ``region`` (AWS general reference, Amazon Bedrock
    endpoints; the anthropic SDK's AnthropicBedrock uses the same default)."""
    return f"https://bedrock-runtime.{region}.amazonaws.com"


def bedrock_url(base_url: str, model: str, operation: str) -> str:
    """``operation``: invoke, invoke-with-response-stream, converse or converse-stream
    (bedrock-runtime service model: requestUri ``/model/{modelId}/<operation>``). The model id,
    inference-profile id or ARN is one path segment, escaped as botocore escapes it
    (serialize.py _render_uri_template -> percent_encode): ``:`` and ``/`` become %3A, %2F."""
    return f"{base_url.rstrip('/')}/model/{urllib.parse.quote(model, safe='')}/{operation}"


BEDROCK_MODELS_PATH = "/foundation-models?byOutputModality=TEXT&byInferenceType=ON_DEMAND"


def bedrock_models_url(region: str) -> str:
    """ListFoundationModels on the Bedrock control plane (host ``bedrock.{region}``, signing
    name ``bedrock``): the text models that can be called on demand."""
    return f"https://bedrock.{region}.amazonaws.com{BEDROCK_MODELS_PATH}"


def bedrock_model_ids(body: Any) -> list[str]:
    """The model ids of a ListFoundationModels answer ({"modelSummaries": [{"modelId", ...}]},
    Amazon Bedrock API reference), in its order, each once."""
    found = body.get("modelSummaries") if isinstance(body, dict) else None
    ids = [m.get("modelId") for m in found or [] if isinstance(m, dict)]
    return list(dict.fromkeys(i for i in ids if isinstance(i, str) and i))


def bedrock_invoke_body(body: dict, beta: str | None = None) -> dict:
    """An Anthropic Messages request as Bedrock's InvokeModel body: no ``model`` (it is in the
    path), no ``stream`` (the operation says it), ``anthropic_version`` set, and the client's
    ``anthropic-beta`` header as the ``anthropic_beta`` list (AWS Bedrock user guide,
    "Anthropic Claude Messages API": anthropic_beta; the anthropic SDK's Bedrock client moves
    the header the same way), holding only the flags Bedrock takes (BEDROCK_BETAS). Other
    fields pass through untouched."""
    out = {k: v for k, v in body.items() if k not in ("model", "stream")}
    out["anthropic_version"] = BEDROCK_ANTHROPIC_VERSION
    kept = out.pop("anthropic_beta", None)
    betas = known_betas((kept if isinstance(kept, list) else []) + (beta or "").split(","),
                        BEDROCK_BETAS)
    if betas:
        out["anthropic_beta"] = betas
    return out


def vertex_base_url(location: str) -> str:
    """Vertex AI's host for ``location``: the global endpoint, or the regional one (Google
    Cloud, "Vertex AI locations"; the anthropic SDK's AnthropicVertex uses the same)."""
    if location == "global":
        return "https://aiplatform.googleapis.com"
    return f"https://{location}-aiplatform.googleapis.com"


def vertex_model_url(base_url: str, project: str, location: str, publisher: str, model: str,
                     method: str, *, sse: bool = True) -> str:
    """``.../v1/projects/{p}/locations/{l}/publishers/{publisher}/models/{m}:{method}``;
    publisher ``google`` (generateContent, streamGenerateContent, with ``?alt=sse`` so the
    stream is SSE unless ``sse`` is False) or ``anthropic`` (rawPredict, streamRawPredict).
    Without a project it is express mode's form, ``.../v1/publishers/google/models/{m}:...``
    (Vertex AI in express mode REST reference: the global host, no projects or locations)."""
    q = functools.partial(urllib.parse.quote, safe="")
    scope = f"/projects/{q(project)}/locations/{q(location)}" if project else ""
    url = (f"{base_url.rstrip('/')}/v1{scope}/publishers/{q(publisher)}/models/{q(model)}:"
           f"{method}")
    return url + "?alt=sse" if sse and method == "streamGenerateContent" else url


def vertex_raw_predict_body(body: dict) -> dict:
    """An Anthropic Messages request as Vertex's rawPredict/streamRawPredict body: no
    ``model`` (it is in the URL), ``anthropic_version`` set, ``stream`` kept (the anthropic
    SDK's AnthropicVertex keeps it; lib/vertex/_client.py). Beta flags stay in the
    ``anthropic-beta`` header."""
    out = {k: v for k, v in body.items() if k != "model"}
    out["anthropic_version"] = VERTEX_ANTHROPIC_VERSION
    return out


class BedrockInvokeStream:
    """InvokeModelWithResponseStream (AWS event-stream bytes) -> the Anthropic Messages SSE
    stream it carries, so that Claude on Bedrock streams like Anthropic's own API. Each
    ``chunk`` event holds {"bytes": base64 of one Messages stream event} (Amazon Bedrock API
    reference, ResponseStream and PayloadPart); it becomes ``event: <type>`` and ``data:
    <that JSON>``. Exception events raise as EventStreamDecoder raises them; call ``end`` when
    the body ends."""

    __slots__ = ("_frames",)

    def __init__(self):
        self._frames = EventStreamDecoder()

    def feed(self, data: bytes) -> bytes:
        out = []
        for headers, payload in self._frames.feed(data):
            if headers.get(":event-type") != "chunk":
                continue
            part = json_loads(payload, "an upstream chunk event", status=502,
                              unique_keys=False, error=ProtocolError)
            try:
                raw = base64.b64decode(part["bytes"], validate=True)
            except (TypeError, KeyError, ValueError):
                raise ProtocolError(502, "upstream sent a chunk event without base64 bytes") \
                    from None
            event = json_loads(raw, "an upstream Claude stream event", status=502,
                               unique_keys=False, error=ProtocolError)
            if not isinstance(event, dict) or not isinstance(event.get("type"), str):
                raise ProtocolError(502, "upstream sent a Claude stream event without a type")
            if b"\n" in raw or b"\r" in raw:          # JSON white space may hold line ends
                raw = json_dumps(event)
            out.append(b"event: %s\ndata: %s\n\n" % (event["type"].encode(), raw))
        return b"".join(out)

    def end(self) -> None:
        self._frames.end()


# Converse (Amazon Bedrock API reference "Converse", "ConverseStream"; the shapes as the AWS API
# model in botocore/data/bedrock-runtime/2023-09-30/service-2.json has them). Blobs are base64.
_CONVERSE_IMAGE_FORMATS = {"image/png": "png", "image/jpeg": "jpeg", "image/jpg": "jpeg",
                           "image/gif": "gif", "image/webp": "webp"}
_CONVERSE_DOC_FORMATS = {
    "application/pdf": "pdf", "text/csv": "csv", "application/msword": "doc",
    "application/vnd.openxmlformats-officedocument.wordprocessingml.document": "docx",
    "application/vnd.ms-excel": "xls",
    "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet": "xlsx",
    "text/html": "html", "text/plain": "txt", "text/markdown": "md"}
# DocumentBlock.name: letters, digits, single spaces, hyphens, parentheses, square brackets.
_CONVERSE_DOC_NAME_RX = re.compile(r"[^A-Za-z0-9()\[\]-]+")
_CONVERSE_FINISH = {"end_turn": "stop", "stop_sequence": "stop", "tool_use": "tool_calls",
                    "max_tokens": "length", "model_context_window_exceeded": "length",
                    "guardrail_intervened": "content_filter",
                    "content_filtered": "content_filter"}


def _converse_media(part: dict) -> dict:
    media = (part.get("media_type") or "").lower()
    if part["type"] == "image":
        if "url" in part or media not in _CONVERSE_IMAGE_FORMATS:
            raise GatewayError(400, f"Bedrock Converse takes images as png, jpeg, gif or webp "
                                    f"bytes, not {('a URL' if 'url' in part else media)[:60]}")
        return {"image": {"format": _CONVERSE_IMAGE_FORMATS[media],
                          "source": {"bytes": part["data"]}}}
    if media not in _CONVERSE_DOC_FORMATS:
        kinds = ", ".join(sorted(set(_CONVERSE_DOC_FORMATS.values())))
        raise GatewayError(400, f"Bedrock Converse takes no {media[:60] or 'untyped'} files; "
                                f"it takes {kinds}")
    stem = (part.get("filename") or "").rsplit(".", 1)[0]
    name = " ".join(_CONVERSE_DOC_NAME_RX.sub(" ", stem).split())[:200] or "document"
    return {"document": {"format": _CONVERSE_DOC_FORMATS[media], "name": name,
                         "source": {"bytes": part["data"]}}}


def _converse_blocks(parts: list[dict]) -> list[dict]:
    blocks: list[dict] = []
    for p in parts:
        kind = p["type"]
        if kind == "text":
            if p["text"]:
                blocks.append({"text": p["text"]})
        elif kind in ("image", "file"):
            blocks.append(_converse_media(p))
        elif kind == "reasoning":
            # Only reasoning the model signed goes back (Claude checks it); other models'
            # reasoning is not part of their input.
            if p.get("redacted"):
                blocks.append({"reasoningContent": {"redactedContent": p["redacted"]}})
            elif p.get("signature") and p["signature"] != UNSIGNED_THINKING:
                blocks.append({"reasoningContent": {"reasoningText": {
                    "text": p.get("text") or "", "signature": p["signature"]}}})
        elif kind == "tool_call":
            blocks.append({"toolUse": {"toolUseId": p["id"], "name": p["name"],
                                       "input": parse_arguments(p["arguments"])}})
        elif kind == "tool_result":
            content = [{"text": c["text"]} if c["type"] == "text" else _converse_media(c)
                       for c in p["content"] if c["type"] != "text" or c["text"]]
            blocks.append({"toolResult": {"toolUseId": p["id"],
                                          "content": content or [{"text": ""}],
                                          "status": "error" if p.get("is_error") else "success"}})
        else:
            raise GatewayError(400, f"Bedrock Converse takes no {kind} parts")
    return blocks


@guarded(400, "request")
def ir_to_converse_request(ir: dict) -> dict:
    """An IR request as a Converse body (the model id goes in the URL). Tool results travel in
    user turns; consecutive turns of one role are merged (Converse wants them alternating).
    A history with tool calls needs a toolConfig even when the client sent no tools: the called
    tools are declared then with an open schema. ``tool_choice: "none"`` has no Converse form:
    the tools stay declared (the history may need them) with no toolChoice."""
    messages: list[dict] = []
    for msg in ir["messages"]:
        role = "assistant" if msg["role"] == "assistant" else "user"
        blocks = _converse_blocks(msg["content"])
        if not blocks:
            continue
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += blocks
        else:
            messages.append({"role": role, "content": blocks})
    body: dict[str, Any] = {"messages": messages}
    system = [{"text": p["text"]} for p in ir["system"] if p["type"] == "text" and p["text"]]
    if system:
        body["system"] = system
    config = {key: ir[name] for name, key in (("max_tokens", "maxTokens"),
                                              ("temperature", "temperature"), ("top_p", "topP"))
              if ir.get(name) is not None}
    if ir.get("stop"):
        config["stopSequences"] = list(ir["stop"])
    if config:
        body["inferenceConfig"] = config
    tools = [{"toolSpec": {"name": t["name"], **({"description": t["description"]}
                                                 if t.get("description") else {}),
                           "inputSchema": {"json": t.get("parameters") or {"type": "object"}}}}
             for t in ir.get("tools") or []]
    declared = {t["toolSpec"]["name"] for t in tools}
    for msg in messages:
        for block in msg["content"]:
            name = block.get("toolUse", {}).get("name")
            if name and name not in declared:
                declared.add(name)
                tools.append({"toolSpec": {"name": name, "inputSchema": {"json": {
                    "type": "object"}}}})
    if tools:
        body["toolConfig"] = {"tools": tools}
        choice = ir.get("tool_choice")
        if choice == "auto":
            body["toolConfig"]["toolChoice"] = {"auto": {}}
        elif choice == "required":
            body["toolConfig"]["toolChoice"] = {"any": {}}
        elif isinstance(choice, dict):
            body["toolConfig"]["toolChoice"] = {"tool": {"name": choice["name"]}}
    return body


def converse_usage_to_ir(u: Any) -> dict:
    """TokenUsage: inputTokens leave out the cache reads and writes, counted apart."""
    if not isinstance(u, dict):
        return new_usage()
    read, write = _num(u.get("cacheReadInputTokens")), _num(u.get("cacheWriteInputTokens"))
    return new_usage(_num(u.get("inputTokens")) + read + write, _num(u.get("outputTokens")),
                     read, write)


def _converse_part(block: dict) -> dict | None:
    if isinstance(block.get("text"), str):
        return {"type": "text", "text": block["text"]}
    if isinstance(block.get("toolUse"), dict):
        use = block["toolUse"]
        return {"type": "tool_call", "id": str(use["toolUseId"]), "name": str(use["name"]),
                "arguments": json.dumps(use.get("input") or {}, ensure_ascii=False)}
    reasoning = block.get("reasoningContent")
    if isinstance(reasoning, dict):
        if reasoning.get("redactedContent"):       # the IR's redacted: the opaque data
            return {"type": "reasoning", "text": "", "signature": None,
                    "redacted": reasoning["redactedContent"]}
        text = reasoning.get("reasoningText") or {}
        return {"type": "reasoning", "text": str(text.get("text") or ""),
                "signature": text.get("signature"), "redacted": None}
    return None


@guarded(502, "upstream response", checked_answer)
def converse_response_to_ir(body: dict, model: str = "") -> dict:
    """A Converse answer as an IR response. Converse has no answer id: one is minted."""
    blocks = body["output"]["message"]["content"]
    content = [p for p in map(_converse_part, blocks) if p is not None]
    finish = _CONVERSE_FINISH.get(body.get("stopReason"), "stop")
    if finish == "stop" and any(p["type"] == "tool_call" for p in content):
        finish = "tool_calls"
    return {"id": new_id("msg_"), "model": model, "content": content, "finish": finish,
            "usage": converse_usage_to_ir(body.get("usage"))}


class ConverseStreamDecoder(StreamDecoder):
    """ConverseStream (upstream, AWS event-stream bytes) -> IR stream events. Accepted order:
    messageStart, then per content block contentBlockStart (tool use only) / contentBlockDelta*
    / contentBlockStop, then messageStop {stopReason}, then metadata {usage}. A tool block's
    index (contentBlockIndex) maps to the next dense IR tool index. Exception events end the
    stream as ("error", UpstreamError) (eventstream_error, section 5)."""

    id_prefix = "msg_"

    def __init__(self, model: str = ""):
        super().__init__()
        self._frames = EventStreamDecoder()
        self._model = model
        self._tool_index: dict[int, int] = {}       # contentBlockIndex -> IR tool index
        self._failed = False

    def _error(self, exc: GatewayError) -> list[tuple]:
        out: list[tuple] = []
        self._start(out, None, self._model)
        self._failed = True
        return out + [("error", exc)]

    @stream_guard
    def feed(self, data: bytes) -> list[tuple]:
        if self._failed:
            return []
        out: list[tuple] = []
        try:
            frames = self._frames.feed(data)
        except UpstreamError as exc:
            return self._error(exc)
        for headers, payload in frames:
            self._event(str(headers.get(":event-type") or ""), payload, out)
        return out

    def _event(self, kind: str, payload: bytes, out: list[tuple]) -> None:
        obj = json_loads(payload or b"{}", f"an upstream {kind[:40]} event", status=502,
                         unique_keys=False, error=ProtocolError)
        if not isinstance(obj, dict):
            return
        self._start(out, None, self._model)
        index = _num(obj.get("contentBlockIndex"))
        if kind == "contentBlockStart":
            use = (obj.get("start") or {}).get("toolUse")
            if isinstance(use, dict):
                self._tool_index[index] = self._tools
                out.append(("tool", self._tools, str(use["toolUseId"]), str(use["name"])))
                self._tools += 1
        elif kind == "contentBlockDelta":
            delta = obj.get("delta") or {}
            if isinstance(delta.get("text"), str):
                out.append(("text", delta["text"]))
            elif isinstance(delta.get("toolUse"), dict) and index in self._tool_index:
                out.append(("args", self._tool_index[index],
                            str(delta["toolUse"].get("input") or "")))
            elif isinstance(delta.get("reasoningContent"), dict):
                rc = delta["reasoningContent"]
                if isinstance(rc.get("text"), str):
                    out.append(("reasoning", rc["text"]))
                if isinstance(rc.get("signature"), str):
                    out.append(("signature", rc["signature"]))
        elif kind == "messageStop":
            self.finish = _CONVERSE_FINISH.get(obj.get("stopReason"), "stop")
        elif kind == "metadata" and isinstance(obj.get("usage"), dict):
            out.append(("usage", converse_usage_to_ir(obj["usage"])))

    def close(self) -> list[tuple]:
        if self._failed:
            return []
        try:
            self._frames.end()
        except GatewayError as exc:
            return self._error(exc)
        return super().close()


# The two channel types. Each serves two model families: Claude, in the Anthropic Messages
# body (InvokeModel on Bedrock, rawPredict on Vertex), and the rest in the cloud's own chat
# format (Converse on Bedrock, generateContent on Vertex). Which one a request takes follows
# from the upstream model name (after model_mapping): names with "claude" or "anthropic." are
# Claude. Anthropic clients' Claude requests and Gemini clients' Gemini requests are relayed
# as they came (rewrapped for the cloud); the rest are converted. The key header (a Bedrock
# API key as Bearer, a Vertex express-mode key as x-goog-api-key) comes from auth_headers;
# SigV4 signatures and service-account tokens are added per request by authorize.

# Tool names every family on them takes: Converse's toolSpec name is [a-zA-Z0-9_-]{1,64}
# (bedrock-runtime service model, ToolName), Anthropic's fits, Gemini's starts with a letter
# or underscore.
CLOUD_TOOL_NAMES = (re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,63}\Z"), 64)
_AWS_REGION_RX = re.compile(r"[a-z]{2}(?:-[a-z]+)+-\d{1,2}\Z")
_GCP_NAME_RX = re.compile(r"[a-z][a-z0-9-]{0,62}\Z")


def is_claude_model(model: str) -> bool:
    """Whether an upstream model id names Claude (anthropic.claude-..., us.anthropic...,
    claude-sonnet-4-5@20250929, an ARN with either in it)."""
    low = model.lower()
    return "claude" in low or "anthropic." in low


class FilteredStream:
    """A stream decoder fed through a byte filter (``feed(bytes) -> bytes``, ``end()``), such as
    BedrockInvokeStream before the Anthropic decoder. The filter's errors end the stream as an
    ("error", exc) event, as the decoders' own do."""

    __slots__ = ("_filter", "_inner", "_failed")

    def __init__(self, filt: Any, inner: Any):
        self._filter, self._inner, self._failed = filt, inner, False

    def _fail(self, exc: GatewayError) -> list[tuple]:
        self._failed = True
        out: list[tuple] = []
        self._inner._start(out)
        return out + [("error", exc)]

    def feed(self, data: bytes) -> list[tuple]:
        if self._failed:
            return []
        try:
            return self._inner.feed(self._filter.feed(data))
        except GatewayError as exc:
            return self._fail(exc)

    def close(self) -> list[tuple]:
        if self._failed:
            return []
        try:
            self._filter.end()
        except GatewayError as exc:
            return self._fail(exc)
        return self._inner.close()


class CloudProvider(ProviderAdapter):
    """What Bedrock and Vertex share: Claude in the Anthropic body, only the gateway's own
    headers upstream (a client's Anthropic or Google headers mean nothing to a cloud API),
    media only inline."""

    serves_as_is = (ANTHROPIC,)
    forwards_headers: frozenset[str] | None = frozenset()
    inline_media = ("image/", "application/pdf")
    tool_name_rule = CLOUD_TOOL_NAMES
    anthropic = AnthropicProvider()

    def claude_body(self, body: dict, incoming: Headers | None) -> dict:
        raise NotImplementedError

    def relay_body(self, body: bytes, obj: dict | None, model: str, stream: bool,
                   incoming: Headers) -> bytes:
        if obj is None or not is_claude_model(model):
            return body
        return json_dumps(self.claude_body(obj, incoming))

    def relay_query(self, query: str, model: str) -> str:
        # A Claude operation's URL takes no query: Bedrock's InvokeModel has no querystring
        # members (bedrock-runtime service model), and the anthropic SDK's Bedrock and Vertex
        # clients rebuild the URL from the model, leaving the ?beta=true of the Messages beta
        # path (Claude Code's) behind. Gemini's (?alt=sse) stays.
        return "" if is_claude_model(model) else query

    def encode_claude(self, ir: IRRequest, model: str, opts: ChatOptions) -> dict:
        return self.claude_body(self.anthropic.encode_chat(ir, model, opts), None)

    def claude_decoders(self, kept: dict[str, list[dict]] | None
                        ) -> tuple[Callable[[dict], IRResponse], Callable[[], StreamDecoding]]:
        return self.anthropic.decoders(None, kept)


class BedrockProvider(CloudProvider):
    name = TYPE_BEDROCK
    fields = {"region": TypeField("", "AWS region", 'an AWS region such as "us-east-1"'),
              "aws_access_key_id": TypeField("", "Access key ID", 'an AWS access key id, or ""'),
              "aws_secret_access_key": TypeField("", "Secret access key",
                                                 'an AWS secret access key, or ""', secret=True),
              "aws_session_token": TypeField("", "Session token", 'an AWS session token, or ""',
                                             secret=True)}

    def relays(self, dialect: str, responses_api: bool, model: str = "",
               kind: str = "") -> bool:
        return dialect == ANTHROPIC and kind == "messages" and is_claude_model(model)

    def base_url_for(self, c: dict) -> str:
        region = c.get("region") or ""
        return bedrock_base_url(region) if _AWS_REGION_RX.match(region) else ""

    def check_fields(self, c: dict) -> tuple[str, str, str] | None:
        if not _AWS_REGION_RX.match(c.get("region") or ""):
            return ("region", f"{(c.get('region') or '')[:40]!r} is not an AWS region",
                    'write the region of your Bedrock models, such as "us-east-1"')
        has_id, has_secret = bool(c.get("aws_access_key_id")), bool(
            c.get("aws_secret_access_key"))
        if has_id != has_secret:
            missing = "aws_secret_access_key" if has_id else "aws_access_key_id"
            return (missing, "is empty while its pair is set",
                    "write both the access key id and its secret, or neither")
        if c.get("aws_session_token") and not has_id:
            return ("aws_session_token", "is set without an access key",
                    "write the temporary credentials' access key id and secret too")
        if not has_id and not c.get("api_key") and not c.get("api_keys"):
            return ("api_key", "is empty and no AWS access key is set",
                    "write a Bedrock API key, or aws_access_key_id and aws_secret_access_key")
        return None

    def credentials(self, c: dict) -> Any:
        if not c.get("aws_access_key_id"):
            return None
        return (c["aws_access_key_id"], c["aws_secret_access_key"],
                c.get("aws_session_token") or None)

    async def authorize(self, ch: Any, method: str, url: str, headers: list[tuple[str, str]],
                        body: bytes, creds: Any) -> list[tuple[str, str]]:
        if ch.creds is None or ch.api_key:          # a Bedrock API key is a Bearer token
            return headers
        access, secret, session = ch.creds
        return headers + sigv4_headers(method, url, headers, body, region=ch.extra["region"],
                                       service="bedrock", access_key=access, secret_key=secret,
                                       session_token=session, now=creds.clock())

    def claude_body(self, body: dict, incoming: Headers | None) -> dict:
        return bedrock_invoke_body(body, incoming.get("anthropic-beta") if incoming else None)

    def passthrough_url(self, ch: Any, path: str, kind: str, model: str,
                        stream: bool = False) -> str:
        return self.chat_url(ch, model, stream)

    def answer_filter(self, model: str) -> Callable[[], Any] | None:
        return BedrockInvokeStream if is_claude_model(model) else None

    def chat_url(self, ch: Any, model: str, stream: bool) -> str:
        if is_claude_model(model):
            return bedrock_url(ch.base_url, model,
                               "invoke-with-response-stream" if stream else "invoke")
        return bedrock_url(ch.base_url, model, "converse-stream" if stream else "converse")

    def models_url(self, ch: Any) -> str:
        """ListFoundationModels: on the control-plane host when base_url is the default one,
        else under base_url (a private endpoint or a test's fake)."""
        if ch.base_url == self.base_url_for(ch.extra):
            return bedrock_models_url(ch.extra["region"])
        return ch.base_url.rstrip("/") + BEDROCK_MODELS_PATH

    @guarded(502, "model list")
    def parse_models(self, body: Any) -> list[str]:
        return bedrock_model_ids(body)

    def encode_chat(self, ir: IRRequest, model: str, opts: ChatOptions) -> dict:
        if is_claude_model(model):
            return self.encode_claude(ir, model, opts)
        return ir_to_converse_request(ir)

    def decoders(self, signatures: dict[str, str] | None, kept: dict[str, list[dict]] | None,
                 model: str = "") -> tuple[Callable[[dict], IRResponse],
                                           Callable[[], StreamDecoding]]:
        if is_claude_model(model):
            whole, stream = self.claude_decoders(kept)
            return whole, lambda: FilteredStream(BedrockInvokeStream(), stream())
        return (lambda body: converse_response_to_ir(body, model),
                lambda: ConverseStreamDecoder(model))


class VertexProvider(CloudProvider):
    name = TYPE_VERTEX
    serves_as_is = (ANTHROPIC, GEMINI)
    lists_models = False
    fields = {"project": TypeField("", "Project", 'a Google Cloud project id, or "" (express '
                                                  'mode)'),
              "location": TypeField("global", "Location",
                                    'a Vertex AI location such as "global" or "us-east5"'),
              "service_account": TypeField("", "Service account",
                                           "the path of a service-account JSON key file, or the "
                                           "key's JSON object", (str, dict), secret=True)}
    gemini = GeminiProvider()

    def relays(self, dialect: str, responses_api: bool, model: str = "",
               kind: str = "") -> bool:
        if is_claude_model(model):
            return dialect == ANTHROPIC and kind == "messages"
        return dialect == GEMINI and kind in ("generateContent", "streamGenerateContent")

    def base_url_for(self, c: dict) -> str:
        location = c.get("location") or "global"
        return vertex_base_url(location) if _GCP_NAME_RX.match(location) else ""

    def check_fields(self, c: dict) -> tuple[str, str, str] | None:
        if not _GCP_NAME_RX.match(c.get("location") or "global"):
            return ("location", f"{c['location'][:40]!r} is not a Vertex AI location",
                    'write "global" or a region such as "us-east5"')
        if c.get("project") and not re.fullmatch(r"[a-z][a-z0-9:.-]{2,62}", c["project"]):
            return ("project", f"{c['project'][:40]!r} is not a Google Cloud project id",
                    "write the project's id (lower case), as the console shows it")
        account = c.get("service_account")
        if account:
            if not c.get("project"):
                return ("project", "is empty while a service account is set",
                        "write the id of the project the service account may use")
            try:
                self.credentials(c)
            except ConfigError as exc:
                return ("service_account", str(exc).split(": ", 1)[-1],
                        "point it at the JSON key file Google Cloud downloaded")
        elif not c.get("api_key") and not c.get("api_keys"):
            return ("api_key", "is empty and no service account is set",
                    "write a Vertex AI API key (express mode), or set service_account")
        return None

    def credentials(self, c: dict) -> Any:
        info = c.get("service_account")
        if not info:
            return None
        if isinstance(info, str):
            path = os.path.expanduser(info)
            try:
                with open(path, "rb") as f:
                    data = f.read(MAX_SERVICE_ACCOUNT_FILE + 1)
            except OSError as exc:
                raise ConfigError(f"service_account: cannot read {info!r} "
                                  f"({exc.strerror or exc})") from None
            if len(data) > MAX_SERVICE_ACCOUNT_FILE:
                raise ConfigError(f"service_account: {info!r} is larger than a key file")
            try:
                info = json_loads(data, "the service-account key file")
            except GatewayError as exc:
                raise ConfigError(f"service_account: {exc.message}") from None
        return service_account(info)

    async def authorize(self, ch: Any, method: str, url: str, headers: list[tuple[str, str]],
                        body: bytes, creds: Any) -> list[tuple[str, str]]:
        if ch.creds is None:
            return headers
        token = await creds.google_token(ch.creds, proxy=ch.proxy, verify_tls=ch.verify_tls)
        return [(n, v) for n, v in headers if n.lower() != "authorization"] + [
            ("Authorization", f"Bearer {token}")]

    def auth_headers(self, api_key: str, incoming: Headers | None = None,
                     quirks: dict | None = None) -> list[tuple[str, str]]:
        """The express-mode key, and the client's anthropic-beta flags that Vertex takes
        (VERTEX_BETAS; Vertex takes betas as that header, and refuses the request for any
        other flag)."""
        betas = known_betas((incoming.get("anthropic-beta") or "").split(","), VERTEX_BETAS) \
            if incoming is not None else []
        return self.gemini.auth_headers(api_key) + (
            [("anthropic-beta", ",".join(betas))] if betas else [])

    def claude_body(self, body: dict, incoming: Headers | None) -> dict:
        return vertex_raw_predict_body(body)

    def url(self, ch: Any, model: str, method: str, sse: bool = True) -> str:
        publisher = "anthropic" if is_claude_model(model) else "google"
        return vertex_model_url(ch.base_url, ch.extra["project"], ch.extra["location"] or
                                "global", publisher, model, method, sse=sse)

    def passthrough_url(self, ch: Any, path: str, kind: str, model: str,
                        stream: bool = False) -> str:
        if is_claude_model(model):
            return self.chat_url(ch, model, stream)
        return self.url(ch, model, kind, sse=False)    # the client's ?alt=sse is kept

    def chat_url(self, ch: Any, model: str, stream: bool) -> str:
        if is_claude_model(model):
            return self.url(ch, model, "streamRawPredict" if stream else "rawPredict")
        return self.url(ch, model, "streamGenerateContent" if stream else "generateContent")

    def encode_chat(self, ir: IRRequest, model: str, opts: ChatOptions) -> dict:
        if is_claude_model(model):
            return self.encode_claude(ir, model, opts)
        return self.gemini.encode_chat(ir, model, opts)

    def decoders(self, signatures: dict[str, str] | None, kept: dict[str, list[dict]] | None,
                 model: str = "") -> tuple[Callable[[dict], IRResponse],
                                           Callable[[], StreamDecoding]]:
        if is_claude_model(model):
            return self.claude_decoders(kept)
        return self.gemini.decoders(signatures, kept)


# 9.10 Dispatch and registries --------------------------------------------------------------------
# What every channel type's request shares (tool names in the forms the channel accepts,
# the max_tokens cap), the empty-answer check, and the two registries: DIALECTS (client
# side) and PROVIDERS (channel side), the only way the gateway reaches an adapter.

# Each channel type's adapter names the tool names it accepts (tool_name_rule; Ollama documents
# no rule). A name outside its channel's rule is sent as a readable head plus 8 hex digits of its
# SHA-1, always the same for the same name, so the tool list, the calls in earlier turns and the
# call that comes back agree; the answer gets the client's own name back.
def channel_tool_name(name: str, ctype: str) -> str:
    """``name`` as a channel of type ``ctype`` accepts it (itself when it already does)."""
    rule = PROVIDERS[ctype].tool_name_rule if ctype in PROVIDERS else None
    if rule is None or rule[0].match(name):
        return name
    head = re.sub(r"[^A-Za-z0-9_-]", "_", name)
    if not head[:1].isalpha():
        head = "t_" + head
    digest = hashlib.sha1(name.encode()).hexdigest()[:8]
    return f"{head[:rule[1] - 9]}_{digest}"


def _ir_tool_names(ir: dict) -> set[str]:
    names = {t["name"] for t in ir["tools"]}
    for m in ir["messages"]:
        names.update(p["name"] for p in m["content"]
                     if p["type"] in ("tool_call", "tool_result") and p.get("name"))
    if isinstance(ir["tool_choice"], dict) and ir["tool_choice"].get("name"):
        names.add(ir["tool_choice"]["name"])
    return names


def upstream_tool_names(ir: dict, ctype: str) -> dict[str, str]:
    """{name sent upstream: the client's name} for every tool name a channel of type ``ctype``
    gets in another form."""
    out = {}
    for name in _ir_tool_names(ir):
        short = channel_tool_name(name, ctype)
        if short != name:
            out[short] = name
    return out


def rename_ir_tools(ir: dict, ctype: str) -> dict:
    """The request with every tool name (tool list, tool_choice, calls, results and tool
    references in earlier turns) in the form a channel of type ``ctype`` accepts; ``ir`` itself
    when none changes."""
    if not upstream_tool_names(ir, ctype):
        return ir

    def part(p: dict) -> dict:
        if p["type"] in ("tool_call", "tool_result") and p.get("name"):
            p = dict(p, name=channel_tool_name(p["name"], ctype))
        if p["type"] == "tool_result":
            return dict(p, content=[part(c) for c in p["content"]])
        if "reference" in p:                    # a loaded tool, named as the channel has it
            return dict(p, text=tool_reference_text(channel_tool_name(p["reference"], ctype)))
        return p

    out = dict(ir, tools=[dict(t, name=channel_tool_name(t["name"], ctype))
                          for t in ir["tools"]],
               messages=[dict(m, content=[part(p) for p in m["content"]])
                         for m in ir["messages"]])
    if isinstance(ir["tool_choice"], dict) and ir["tool_choice"].get("name"):
        out["tool_choice"] = {"name": channel_tool_name(ir["tool_choice"]["name"], ctype)}
    return out


def restore_tool_names(resp: dict, names: dict[str, str]) -> dict:
    """A decoded answer with the client's tool names back in its calls."""
    if names:
        for p in resp["content"]:
            if p["type"] == "tool_call":
                p["name"] = names.get(p["name"], p["name"])
    return resp


class RenamedStream:
    """A stream decoder whose tool events carry the client's tool names."""

    def __init__(self, inner: Any, names: dict[str, str]):
        self._inner, self._names = inner, names

    def _map(self, events: list[tuple]) -> list[tuple]:
        return [("tool", e[1], e[2], self._names.get(e[3], e[3])) if e[0] == "tool" else e
                for e in events]

    def feed(self, data: bytes) -> list[tuple]:
        return self._map(self._inner.feed(data))

    def close(self) -> list[tuple]:
        return self._map(self._inner.close())


@guarded(400, "request body")
def encode_upstream_chat(ctype: str, ir: dict, model: str, *, stream: bool,
                         max_tokens_cap: int = 0,
                         signatures: dict[str, str] | None = None,
                         quirks: dict | None = None, thinking: str = "auto",
                         kept: dict[str, list[dict]] | None = None,
                         responses: bool = False) -> dict:
    """The chat request body for a channel of type ``ctype``: tool names in the forms it
    accepts and, on an OpenAI-compatible channel, its ``quirks`` applied. ``signatures`` and
    ``kept`` are what Gemini and Claude said about earlier calls (thought signatures, thinking
    blocks); ``thinking`` is the channel's thinking setting; ``responses``: a Responses API
    request instead (converts_to_responses)."""
    if ir["n"] > 1:
        raise GatewayError(400, f"n = {ir['n']} (candidateCount for Gemini clients) cannot be "
                                f"served: this model's channel ({ctype}) is reached by "
                                f"conversion, which relays one choice; ask for 1 and send "
                                f"several requests instead", param="n",
                           code="unsupported_parameter")
    provider = PROVIDERS[ctype]
    ir = rename_ir_tools(ir, ctype)
    if max_tokens_cap and not provider.caps_in_encoder and ir["max_tokens"]:
        ir = dict(ir, max_tokens=min(ir["max_tokens"], max_tokens_cap))
    if responses:
        return ir_to_responses_request(ir, model, stream=stream)
    return provider.encode_chat(ir, model, ChatOptions(stream, max_tokens_cap, signatures,
                                                       quirks, thinking, kept))


def converts_to_responses(ctype: str, responses_api: bool, model: str, ir: dict) -> bool:
    """Whether a converted chat request for ``model`` on a channel of type ``ctype`` goes to
    the Responses API: with responses_api: true on a type that has it, and on openai and azure
    channels for a request with tools to a model that refuses them on Chat Completions
    (RESPONSES_FOR_TOOLS)."""
    provider = PROVIDERS[ctype]
    if not provider.responses_as_is:
        return False
    return responses_api or (provider.responses_for_tools and bool(ir["tools"]) and
                             RESPONSES_FOR_TOOLS.search(model) is not None)


def answer_is_empty(resp: dict) -> bool:
    """A whole answer with no text or reasoning beyond white space and no tool call, whose
    finish reason does not explain that (a length cut-off, a content filter or a refusal
    does): a relay's blank turn, which the gateway treats as the channel's failure when
    fallback is on."""
    if resp["finish"] in ("length", "content_filter"):
        return False
    return not any(p["type"] == "tool_call" or (p["type"] in ("text", "reasoning") and (
        p.get("text") or "").strip()) for p in resp["content"])


def event_is_content(ev: tuple) -> bool:
    """Whether a stream event settles that the answer is not empty (see answer_is_empty); an
    in-band error settles it too (it is passed on as the stream's end)."""
    kind = ev[0]
    return kind in ("tool", "error") or (kind in ("text", "reasoning") and bool(
        ev[1].strip())) or (
        kind == "finish" and ev[1] in ("length", "content_filter"))


CHAT_KINDS = frozenset(("chat", "messages", "generateContent", "streamGenerateContent",
                        "responses"))


def upstream_decoders(ctype: str, signatures: dict[str, str] | None = None,
                      names: dict[str, str] | None = None,
                      kept: dict[str, list[dict]] | None = None, model: str = "",
                      responses: bool = False
                      ) -> tuple[Callable[[dict], dict], Callable[[], Any]]:
    """(whole-answer decoder, stream decoder factory) for a channel type and its upstream
    ``model`` (``responses``: of the Responses API); with ``names`` (upstream_tool_names) the
    calls that come back carry the client's tool names."""
    whole, stream = (responses_answer_to_ir, ResponsesStreamDecoder) if responses else \
        PROVIDERS[ctype].decoders(signatures, kept, model)
    if not names:
        return whole, stream
    return (lambda body: restore_tool_names(whole(body), names),
            lambda: RenamedStream(stream(), names))


# Presets: what a channel for a known service needs, filled in where the channel leaves it
# out (section 10): type, base_url, headers and quirks (the channel's own win). "model_list"
# is False where the service has no model list (the GUI's Fetch models then says so); "notes"
# is shown by `aigateway presets` and in the channel dialog. Each entry was checked against
# the service's documentation, cited beside it (read 2026-12-01); what could not be
# confirmed there is left out and said so. Auth is the type's (Bearer for custom, x-api-key
# for anthropic) unless the "auth" quirk says otherwise.
PRESETS: dict[str, dict[str, Any]] = {
    # api-docs.deepseek.com ("Your First API Call": base URL, Bearer; /v1 allowed for OpenAI
    # compatibility; GET /models). Thinking mode wants reasoning back on tool-call turns only:
    # api-docs.deepseek.com/guides/thinking_mode.
    "deepseek": {"label": "DeepSeek", "type": "custom",
                 "base_url": "https://api.deepseek.com/v1",
                 "quirks": {"reasoning_back": "tool_calls"}},
    # api-docs.deepseek.com/guides/anthropic_api: anthropic-beta, container, mcp_servers,
    # service_tier, top_k and cache_control are "Ignored"; x-api-key supported. No model
    # list is documented on that endpoint.
    "deepseek-anthropic": {"label": "DeepSeek (Anthropic API)", "type": "anthropic",
                           "base_url": "https://api.deepseek.com/anthropic",
                           "model_list": False,
                           "quirks": {"drop_headers": ["anthropic-beta"],
                                      "drop_params": ["container", "mcp_servers",
                                                      "service_tier", "top_k"],
                                      "cache_control": "strip"}},
    # Mistral's API (servers: https://api.mistral.ai/v1; /chat/completions, /models, Bearer)
    # answers 400 unless tool-call ids are 9 letters and digits (see QUIRK_CHOICES above), and
    # 422 "Extra inputs are not permitted" for stream_options and max_completion_tokens
    # (quoted in avante-corp/avante.nvim#2347, editor-code-assistant/eca#231).
    "mistral": {"label": "Mistral", "type": "custom", "base_url": "https://api.mistral.ai/v1",
                "quirks": {"tool_call_id": "mistral9", "drop_params": ["stream_options"],
                           "max_tokens_field": "max_tokens"}},
    # console.groq.com/docs/openai: base URL; logprobs, logit_bias and top_logprobs "will
    # result in a 400 error"; messages[].name too (not a top-level field: not handled).
    "groq": {"label": "Groq", "type": "custom", "base_url": "https://api.groq.com/openai/v1",
             "quirks": {"drop_params": ["logprobs", "logit_bias", "top_logprobs"]}},
    # openrouter.ai (quick start): base URL, Bearer; HTTP-Referer and X-Title are optional
    # attribution headers (add them under Extra headers). Reasoning goes back in "reasoning".
    "openrouter": {"label": "OpenRouter", "type": "custom",
                   "base_url": "https://openrouter.ai/api/v1",
                   "quirks": {"reasoning_field": "reasoning"},
                   "notes": "optional headers HTTP-Referer and X-Title (app attribution)"},
    # docs.x.ai/developers/rest-api-reference/inference: base https://api.x.ai, Bearer;
    # docs.x.ai/api/integrations: OpenAI SDK base URL https://api.x.ai/v1.
    "xai": {"label": "xAI (Grok)", "type": "custom", "base_url": "https://api.x.ai/v1"},
    # platform.moonshot.ai/docs/api/chat and platform.kimi.ai/docs/api/overview: base_url
    # https://api.moonshot.ai/v1, Bearer, GET /v1/models (China: api.moonshot.cn). Quirks: none
    # documented.
    "moonshot": {"label": "Moonshot (Kimi)", "type": "custom",
                 "base_url": "https://api.moonshot.ai/v1"},
    "moonshot-cn": {"label": "Moonshot (Kimi), China", "type": "custom",
                    "base_url": "https://api.moonshot.cn/v1"},
    # Moonshot's Claude Code guide: ANTHROPIC_BASE_URL https://api.moonshot.ai/anthropic with
    # the key as ANTHROPIC_AUTH_TOKEN (Bearer). Its list of unsupported Messages fields could
    # not be found: nothing is stripped.
    "moonshot-anthropic": {"label": "Moonshot (Kimi), Anthropic API", "type": "anthropic",
                           "base_url": "https://api.moonshot.ai/anthropic",
                           "model_list": False, "quirks": {"auth": "bearer"}},
    # Zhipu BigModel (open.bigmodel.cn docs): OpenAI-compatible base path /api/paas/v4 (the
    # version segment is v4: the gateway appends /chat/completions and /models to it);
    # Z.ai is its international site with the same paths (docs.z.ai).
    "zhipu": {"label": "Zhipu (GLM), China", "type": "custom",
              "base_url": "https://open.bigmodel.cn/api/paas/v4"},
    "zai": {"label": "Z.ai (GLM), international", "type": "custom",
            "base_url": "https://api.z.ai/api/paas/v4"},
    # Zhipu's Claude Code guide: ANTHROPIC_BASE_URL https://open.bigmodel.cn/api/anthropic;
    # docs.z.ai/devpack/tool/claude: https://api.z.ai/api/anthropic; both with the key as
    # ANTHROPIC_AUTH_TOKEN (Bearer). Unsupported fields are not documented: none stripped.
    "zhipu-anthropic": {"label": "Zhipu (GLM), Anthropic API", "type": "anthropic",
                        "base_url": "https://open.bigmodel.cn/api/anthropic",
                        "model_list": False, "quirks": {"auth": "bearer"}},
    "zai-anthropic": {"label": "Z.ai (GLM), Anthropic API", "type": "anthropic",
                      "base_url": "https://api.z.ai/api/anthropic",
                      "model_list": False, "quirks": {"auth": "bearer"}},
    # alibabacloud.com/help/en/model-studio/compatibility-of-openai-with-dashscope: base URLs
    # Singapore dashscope-intl, US dashscope-us, China (Beijing) dashscope.
    "qwen": {"label": "Qwen (DashScope), Singapore", "type": "custom",
             "base_url": "https://dashscope-intl.aliyuncs.com/compatible-mode/v1"},
    "qwen-us": {"label": "Qwen (DashScope), US", "type": "custom",
                "base_url": "https://dashscope-us.aliyuncs.com/compatible-mode/v1"},
    "qwen-cn": {"label": "Qwen (DashScope), China", "type": "custom",
                "base_url": "https://dashscope.aliyuncs.com/compatible-mode/v1"},
    # docs.siliconflow.cn/docs/userguide/quickstart (China: api.siliconflow.cn/v1);
    # siliconflow.com quick start (global: api.siliconflow.com/v1).
    "siliconflow": {"label": "SiliconFlow, China", "type": "custom",
                    "base_url": "https://api.siliconflow.cn/v1"},
    "siliconflow-intl": {"label": "SiliconFlow, global", "type": "custom",
                         "base_url": "https://api.siliconflow.com/v1"},
    # docs.together.ai/docs/inference/openai-compatibility: base URL https://api.together.ai/v1.
    "together": {"label": "Together AI", "type": "custom",
                 "base_url": "https://api.together.ai/v1"},
    # Fireworks' OpenAI compatibility docs: https://api.fireworks.ai/inference/v1.
    "fireworks": {"label": "Fireworks AI", "type": "custom",
                  "base_url": "https://api.fireworks.ai/inference/v1"},
    # inference-docs.cerebras.ai/resources/openai: base URL https://api.cerebras.ai/v1. Lists
    # of refused parameters come only from third parties: none dropped.
    "cerebras": {"label": "Cerebras", "type": "custom", "base_url": "https://api.cerebras.ai/v1"},
    # build.nvidia.com (API catalog): https://integrate.api.nvidia.com/v1, Bearer.
    "nvidia": {"label": "NVIDIA NIM (API catalog)", "type": "custom",
               "base_url": "https://integrate.api.nvidia.com/v1"},
    # docs.vllm.ai (OpenAI-compatible server): http://localhost:8000/v1; key only with
    # --api-key.
    "vllm": {"label": "vLLM (local)", "type": "custom", "base_url": "http://localhost:8000/v1"},
    # lmstudio.ai/docs/api/openai-api: http://localhost:1234/v1 (/v1/models, chat, responses).
    "lmstudio": {"label": "LM Studio (local)", "type": "custom",
                 "base_url": "http://localhost:1234/v1"},
    # llama.cpp's tools/server README: llama-server listens on 8080 with /v1/chat/completions.
    "llamacpp": {"label": "llama.cpp server (local)", "type": "custom",
                 "base_url": "http://localhost:8080/v1"},
    # docs.ollama.com/api/openai-compatibility: http://localhost:11434/v1 (key ignored).
    "ollama-openai": {"label": "Ollama, OpenAI mode (local)", "type": "custom",
                      "base_url": "http://localhost:11434/v1"},
    # platform.minimax.io/docs/api-reference/text-anthropic-api: base URL; top_k,
    # stop_sequences, service_tier, mcp_servers, context_management and container "Ignored";
    # text and tool calls only (no image or document input).
    "minimax-anthropic": {"label": "MiniMax (Anthropic API)", "type": "anthropic",
                          "base_url": "https://api.minimax.io/anthropic",
                          "model_list": False,
                          "quirks": {"drop_params": ["top_k", "stop_sequences",
                                                     "service_tier", "mcp_servers",
                                                     "context_management", "container"]}},
}
# Perplexity is not a preset: its docs (docs.perplexity.ai/docs/sonar/openai-compatibility)
# name POST /chat/completions at https://api.perplexity.ai and POST /v1/sonar, while the
# gateway sends /v1/chat/completions to a base URL without a version; that path is not
# documented there.


def guess_dialect(path: str, headers: Headers) -> str:
    """The dialect of a request whose route does not say it (for its error's shape)."""
    if "anthropic-version" in headers or "/messages" in path:
        return ANTHROPIC
    if path.startswith(("/v1beta/", "/v1alpha/")) or ":" in path:
        return GEMINI
    return OPENAI


def models_dialect(headers: Headers, query: str) -> str:
    """The dialect of a model list asked for at OpenAI's /v1/models: Anthropic's SDK sends
    anthropic-version, the google-genai SDK its key header or ?key=."""
    if "anthropic-version" in headers:
        return ANTHROPIC
    if "x-goog-api-key" in headers or "key=" in query:
        return GEMINI
    return OPENAI


DIALECTS: dict[str, DialectAdapter] = {d.name: d for d in (
    OpenAIDialect(), ResponsesDialect(), AnthropicDialect(), GeminiDialect())}
PROVIDERS: dict[str, ProviderAdapter] = {p.name: p for p in (
    OpenAIProvider(), AnthropicProvider(), GeminiProvider(), OllamaProvider(), CustomProvider(),
    AzureProvider(), BedrockProvider(), VertexProvider())}

# Derived views, for validation, routes, the GUI and the command line.
CHANNEL_TYPES = tuple(PROVIDERS)
CHANNEL_DEFAULT_URLS = {name: p.default_url for name, p in PROVIDERS.items()}
PASSTHROUGH_TYPES = {d: tuple(n for n, p in PROVIDERS.items() if d in p.serves_as_is)
                     for d in DIALECTS}
EMBEDDING_TYPES = tuple(n for n, p in PROVIDERS.items() if p.embeds)
TOOL_NAME_RULES = {n: p.tool_name_rule for n, p in PROVIDERS.items() if p.tool_name_rule}


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
    "empty_answer_fallback": True,    # with fallback: a blank 200 answer tries the next channel
    "proxy": "",
    "max_body_mb": DEFAULT_MAX_BODY_MB,
    "max_response_mb": DEFAULT_MAX_RESPONSE_MB,   # a whole upstream answer larger -> 502
    "log_requests": False,
    "log_file": "requests.jsonl",
    "cors_origins": [],
    "allowed_hosts": [],              # Host names accepted beyond loopback and settings.host
    "max_connections": DEFAULT_MAX_CONNECTIONS,
    "allow_unauthenticated_remote": False,   # needed to listen beyond loopback with auth off
    "fetch_private_urls": False,      # image URLs may name loopback/private/link-local addresses
    "tls_cert": "",                   # PEM files: serve HTTPS (for LAN use)
    "tls_key": "",
    "start_on_open": True,            # the GUI starts the gateway when it opens
    "theme": "light",                 # the GUI's theme: light or dark
    "window": "",                     # the GUI's last window geometry
    "default_timeout": DEFAULT_CHANNEL_TIMEOUT,   # a channel's timeout when it gives none
    "affinity_ttl_s": DEFAULT_AFFINITY_TTL_S,    # a session keeps its channel and key; 0 = off
    "aliases": {},                    # {"fast": ["gpt-4o-mini", {"model": "...", "weight": 2}]}
    "debug_capture": 0,               # keep the last N request/response bodies (masked); 0 = off
    "debug_capture_file": "",         # ... and append them to this JSONL file (owner-only)
    "usage_db": "usage.db",           # SQLite usage history beside config.json; "" = off
    "usage_retention_days": USAGE_DEFAULT_RETENTION_DAYS,
}
CHANNEL_DEFAULTS: dict[str, Any] = {
    "name": "", "type": TYPE_OPENAI, "base_url": "", "api_key": "", "models": [],
    "model_mapping": {}, "priority": 0, "enabled": True, "timeout": DEFAULT_CHANNEL_TIMEOUT,
    "proxy": "", "verify_tls": True, "headers": {}, "max_tokens_cap": 0, "responses_api": False,
    "api_version": "",
    "api_keys": [], "max_concurrency": 0, "quirks": {}, "thinking": "auto", "weight": 1,
    "overrides": [],
}
TOKEN_DEFAULTS: dict[str, Any] = {
    "name": "", "key": "", "enabled": True, "allowed_models": [], "allowed_channels": [],
    "rpm": 0, "limits": {}, "expires_at": "",
}
LIMIT_KINDS = ("requests_per_day", "tokens_per_day", "cost_per_day", "cost_per_month", "tpm")
PRICE_FIELDS = ("input", "output", "cache_read", "cache_write")     # USD per million tokens


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
        err = ConfigError(f"{self.source}: {where}: {problem}; {fix}")
        err.where = where                                  # type: ignore[attr-defined]
        return err

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


# The old "Light AI Gateway" app (which this one replaces) wrote the same three sections with a
# few keys of its own; they are mapped here, and every other key of its is kept as it is:
#   settings.enable_cors    true: cors_origins as written, ["*"] when absent; false: no CORS
#   channels[].proxy_enabled + proxy_url   -> proxy (proxy_url when enabled, else none)
#   channels[].max_concurrency null        -> 0 (no limit; the old app adapted it by itself)
#   channels[] of type "builtin"           -> moved to unsupported_channels (not served: those
#                                             were the old app's own clients of web chat sites)
# Its settings.default_timeout is our default_timeout (a channel's timeout when it gives none).
UNSUPPORTED_CHANNELS = "unsupported_channels"


def _migrate_old_app(cfg: dict, ck: _Checker, notes: list[str]) -> list[int]:
    """Map the old app's keys in place; return each kept channel's place in the file (so that
    messages name the entry the user sees)."""
    settings = cfg.get("settings")
    if isinstance(settings, dict) and "enable_cors" in settings:
        enable = settings["enable_cors"]
        if not isinstance(enable, bool):
            raise ck.fail("settings.enable_cors", f"{json.dumps(enable)[:60]} is not true or "
                          "false", 'write true or false, or use "cors_origins": ["*"]')
        del settings["enable_cors"]
        if not enable:
            settings["cors_origins"] = []
        elif "cors_origins" not in settings:
            settings["cors_origins"] = ["*"]
    if isinstance(settings, dict) and settings.get("high_availability_mode") is True:
        notes.append(f"{ck.source}: settings.high_availability_mode (the old app's \"any "
                     f"channel for any model\") is not supported; requests go to the channels "
                     f"that serve their model (give a channel no models to let it serve all)")
    channels = cfg.get("channels")
    if not isinstance(channels, list):
        return []
    kept, places = [], []
    for place, ch in enumerate(channels):
        if isinstance(ch, dict):
            if "proxy_enabled" in ch or "proxy_url" in ch:
                enabled, url = ch.pop("proxy_enabled", False), ch.pop("proxy_url", "")
                if "proxy" not in ch:
                    ch["proxy"] = url if enabled is True and isinstance(url, str) else ""
            if "max_concurrency" in ch and ch["max_concurrency"] is None:
                ch["max_concurrency"] = 0
            if ch.get("type") == "builtin":
                cfg.setdefault(UNSUPPORTED_CHANNELS, []).append(ch)
                notes.append(f"{ck.source}: channel {ch.get('name')!r} used the old app's "
                             f"built-in {ch.get('base_url')!r} client, which aigateway does not "
                             f"have; it is kept in {UNSUPPORTED_CHANNELS} and not served")
                continue
        kept.append(ch)
        places.append(place)
    cfg["channels"] = kept
    return places


def validate_config(raw: Any, source: str, notes: list[str] | None = None) -> dict:
    """Return a normalised deep copy of ``raw`` or raise ConfigError. Keys of the old app's
    file are mapped to ours; what that changed is appended to ``notes``."""
    ck = _Checker(source)
    if not isinstance(raw, dict):
        raise ck.fail("top level", "is not a JSON object",
                      'write {"settings": {...}, "channels": [...], "tokens": [...]}')
    cfg = copy.deepcopy(raw)
    places = _migrate_old_app(cfg, ck, notes if notes is not None else [])
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
    for key in ("require_auth", "enable_fallback", "empty_answer_fallback", "log_requests"):
        ck.typed(settings, key, "settings", (bool,), "true or false")
    ck.typed(settings, "proxy", "settings", (str,), "a proxy URL or an empty string")
    ck.url(settings["proxy"], "settings.proxy", allow_empty=True,
           schemes=("http", "socks5", "socks5h"), example="http://127.0.0.1:8080")
    mb = ck.typed(settings, "max_body_mb", "settings", (int, float), "a number of MiB")
    if not 0 < mb < float("inf"):                     # NaN and Infinity too
        raise ck.fail("settings.max_body_mb", f"{mb} is not a positive number",
                      "use a size such as 64")
    mb = ck.typed(settings, "max_response_mb", "settings", (int, float), "a number of MiB")
    if not 0 < mb < float("inf"):
        raise ck.fail("settings.max_response_mb", f"{mb} is not a positive number",
                      "use a size such as 64")
    ck.typed(settings, "log_file", "settings", (str,), "a file path")
    ck.str_list(settings, "cors_origins", "settings")
    ck.str_list(settings, "allowed_hosts", "settings")
    ck.typed(settings, "start_on_open", "settings", (bool,), "true or false")
    conns = ck.typed(settings, "max_connections", "settings", (int,), "a whole number")
    if conns < 1:
        raise ck.fail("settings.max_connections", f"{conns} is below 1", "use 1024 or so")
    ck.typed(settings, "allow_unauthenticated_remote", "settings", (bool,), "true or false")
    ck.typed(settings, "fetch_private_urls", "settings", (bool,), "true or false")
    for key in ("tls_cert", "tls_key"):
        ck.typed(settings, key, "settings", (str,), "a file path or an empty string")
    if bool(settings["tls_cert"]) != bool(settings["tls_key"]):
        raise ck.fail("settings.tls_cert", "tls_cert and tls_key go together",
                      "set both PEM file paths, or neither")
    if not is_loopback_host(settings["host"]) and not settings["require_auth"] and \
            not settings["allow_unauthenticated_remote"]:
        raise ck.fail("settings.host", f"{settings['host']!r} is reachable from other machines "
                      f"and require_auth is off", "turn require_auth on, listen on 127.0.0.1, "
                      "or set allow_unauthenticated_remote to true if you really mean it")
    if ck.typed(settings, "theme", "settings", (str,), "a theme name") not in ("light", "dark"):
        raise ck.fail("settings.theme", f"{settings['theme']!r} is not a theme",
                      'use "light" or "dark"')
    ck.typed(settings, "window", "settings", (str,), "a window geometry such as 1100x720")
    dt = ck.typed(settings, "default_timeout", "settings", (int, float), "a number of seconds")
    if not 0 < dt < float("inf"):
        raise ck.fail("settings.default_timeout", f"{dt} is not a positive number",
                      "use seconds, such as 300")
    ttl = ck.typed(settings, "affinity_ttl_s", "settings", (int, float), "a number of seconds")
    if not 0 <= ttl < float("inf"):
        raise ck.fail("settings.affinity_ttl_s", f"{ttl} is not a number of seconds",
                      "use 3600 (an hour), or 0 to turn session affinity off")
    _check_aliases(ck, settings)
    n = ck.typed(settings, "debug_capture", "settings", (int,), "a whole number (0 = off)")
    if not 0 <= n <= DEBUG_CAPTURE_MAX:
        raise ck.fail("settings.debug_capture", f"{n} is not from 0 to {DEBUG_CAPTURE_MAX}",
                      "use 0 (off) or the number of requests to keep, such as 20")
    ck.typed(settings, "debug_capture_file", "settings", (str,), "a file path or an empty string")
    ck.typed(settings, "usage_db", "settings", (str,), 'a file path, or "" for no history')
    days = ck.typed(settings, "usage_retention_days", "settings", (int,), "a number of days")
    if days < 1:
        raise ck.fail("settings.usage_retention_days", f"{days} is below 1",
                      f"keep {USAGE_DEFAULT_RETENTION_DAYS} days or so")
    _check_prices(ck, cfg.setdefault("prices", {}))

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
            where = f"{section}[{places[i] if section == 'channels' else i}]"
            if not isinstance(item, dict):
                raise ck.fail(where, "is not an object", "write {...}")
            if section == "channels":
                _apply_preset(ck, item, where)
                item.setdefault("timeout", settings["default_timeout"])
            for key, value in defaults.items():
                item.setdefault(key, copy.deepcopy(value))
            if "id" in item:
                item_id = ck.typed(item, "id", where, (int,), "a whole number")
                if item_id in seen_ids or item_id <= 0:
                    raise ck.fail(f"{where}.id", f"{item_id} is used twice or not positive",
                                  "give each entry its own positive id, or delete the id")
                seen_ids.add(item_id)
        if section == "channels":          # their ids stay taken: tokens may name them
            aside = cfg.get(UNSUPPORTED_CHANNELS)
            seen_ids |= {c["id"] for c in (aside if isinstance(aside, list) else [])
                         if isinstance(c, dict) and isinstance(c.get("id"), int)}
        nxt = max([next_ids.get(kind, 1) if isinstance(next_ids.get(kind), int) else 1]
                  + [i + 1 for i in seen_ids])
        for item in items:
            if "id" not in item:
                item["id"] = nxt
                nxt += 1
        next_ids[kind] = nxt
        if section == "channels":
            _check_channel(ck, items, places)
        else:
            _check_token(ck, items)
    return cfg


def _apply_preset(ck: _Checker, ch: dict, where: str) -> None:
    """A channel's ``preset`` (section 9's PRESETS; "" for none) fills what the channel leaves
    out: its type when absent, an absent or empty base_url, and the preset's headers and
    quirks under the channel's own. The name stays in the channel as written."""
    if ch.get("preset", "") == "":
        return
    name = ch["preset"]
    if not isinstance(name, str) or name not in PRESETS:
        raise ck.fail(f"{where}.preset", f"{json.dumps(name)[:60]} is not a preset",
                      f"use one of {', '.join(PRESETS)} (`aigateway presets` lists them), "
                      f"or delete the key")
    preset = PRESETS[name]
    ch.setdefault("type", preset["type"])
    if not ch.get("base_url"):
        ch["base_url"] = preset["base_url"]
    for key in ("headers", "quirks"):
        if preset.get(key) and isinstance(ch.get(key, {}), dict):
            ch[key] = {**copy.deepcopy(preset[key]), **ch.get(key, {})}


def _check_channel(ck: _Checker, channels: list[dict], places: list[int]) -> None:
    names: set[str] = set()
    for i, ch in enumerate(channels):
        where = f"channels[{places[i]}]"
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
        ck.typed(ch, "api_key", where, (str,), "a string")
        ck.str_list(ch, "api_keys", where)
        derived = _check_type_fields(ck, ch, where)
        if not ch["base_url"].strip():
            if not CHANNEL_DEFAULT_URLS[ctype] and not derived:
                raise ck.fail(f"{where}.base_url", "is empty",
                              "write the server's URL, such as http://localhost:8000/v1")
            ch["base_url"] = CHANNEL_DEFAULT_URLS[ctype]     # "" when derived (Channel)
        ck.url(ch["base_url"] or derived, f"{where}.base_url", allow_empty=False,
               schemes=("http", "https"), example="https://api.openai.com")
        ck.str_list(ch, "models", where)
        ck.str_map(ch, "model_mapping", where, '{"gpt-4o": "gpt-4o-2024-11-20"}')
        ck.typed(ch, "priority", where, (int,), "a whole number (lower is tried first)")
        ck.typed(ch, "enabled", where, (bool,), "true or false")
        t = ck.typed(ch, "timeout", where, (int, float), "a number of seconds")
        if not 0 < t < float("inf"):
            raise ck.fail(f"{where}.timeout", f"{t} is not a positive number",
                          "use seconds, such as 300")
        ck.typed(ch, "proxy", where, (str,), "a proxy URL or an empty string")
        ck.url(ch["proxy"], f"{where}.proxy", allow_empty=True,
               schemes=("http", "socks5", "socks5h"), example="socks5h://127.0.0.1:1080")
        ck.typed(ch, "verify_tls", where, (bool,), "true or false")
        ck.typed(ch, "responses_api", where, (bool,), "true or false")
        ck.typed(ch, "api_version", where, (str,), 'an API version such as "2024-10-21", or ""')
        if ck.typed(ch, "thinking", where, (str,), "a thinking mode") not in THINKING_MODES:
            raise ck.fail(f"{where}.thinking", f"{ch['thinking']!r} is not a thinking mode",
                          'write "auto" (by model name), "adaptive" or "budget"')
        mc = ck.typed(ch, "max_concurrency", where, (int,), "a whole number (0 = no limit)")
        if mc < 0:
            raise ck.fail(f"{where}.max_concurrency", f"{mc} is negative", "use 0 for no limit")
        cap = ck.typed(ch, "max_tokens_cap", where, (int,), "a whole number (0 = no cap)")
        if cap < 0:
            raise ck.fail(f"{where}.max_tokens_cap", f"{cap} is negative",
                          "use 0 for no cap or the model's largest output, such as 8192")
        _check_quirks(ck, ch, where)
        w = ck.typed(ch, "weight", where, (int, float), "a positive number")
        if not 0 < w < float("inf"):
            raise ck.fail(f"{where}.weight", f"{w} is not a positive number",
                          "use 1 (the default), or 3 to get three times the share of a 1")
        _check_overrides(ck, ch, where)
        hdrs = ck.str_map(ch, "headers", where, '{"HTTP-Referer": "https://example.com"}')
        for name, value in hdrs.items():
            if not header_ok(name, value):
                raise ck.fail(f"{where}.headers", f"{name!r} is not a valid header",
                              "use header names without spaces and values without line breaks")


def _check_type_fields(ck: _Checker, ch: dict, where: str) -> str:
    """The fields of the channel's type only (ProviderAdapter.fields: Bedrock's region and
    AWS keys, Vertex's project, location and service account), defaults filled in, then the
    adapter's own check. Returns the base URL the type derives from them ("" when none)."""
    provider = PROVIDERS[ch["type"]]
    for key, f in provider.fields.items():
        ch.setdefault(key, copy.deepcopy(f.default))
        ck.typed(ch, key, where, f.types, f.what)
    problem = provider.check_fields(ch)
    if problem is not None:
        raise ck.fail(f"{where}.{problem[0]}", problem[1], problem[2])
    return provider.base_url_for(ch) if not provider.default_url else ""


def _check_quirks(ck: _Checker, ch: dict, where: str) -> None:
    """A channel's ``quirks`` (section 9.3): an object of known keys with known values."""
    quirks = ch["quirks"]
    if not isinstance(quirks, dict):
        raise ck.fail(f"{where}.quirks", "is not an object",
                      'write an object such as {"tool_call_id": "mistral9"}, or {}')
    known = [*QUIRK_CHOICES, *QUIRK_LISTS]
    for key, value in quirks.items():
        if key in QUIRK_CHOICES:
            if value not in QUIRK_CHOICES[key]:
                choices = ", ".join(json.dumps(c) for c in QUIRK_CHOICES[key])
                raise ck.fail(f"{where}.quirks.{key}", f"{json.dumps(value)[:60]} is not a "
                              f"choice", f"use one of {choices}")
        elif key in QUIRK_LISTS:
            ck.str_list(quirks, key, f"{where}.quirks")
        else:
            raise ck.fail(f"{where}.quirks", f"{key!r} is not a quirk",
                          f"use only {', '.join(known)}")


def alias_members(entry: list) -> list[tuple[str, float]]:
    """A validated settings.aliases entry as (model, weight) pairs."""
    return [(m, 1.0) if isinstance(m, str) else (m["model"], float(m.get("weight", 1)))
            for m in entry]


def _check_aliases(ck: _Checker, settings: dict) -> None:
    """settings.aliases: a client name -> the models that serve it, each a name or
    {"model": name, "weight": number}."""
    aliases = settings["aliases"]
    example = '{"fast": ["gpt-4o-mini", {"model": "gemini-2.5-flash", "weight": 2}]}'
    if not isinstance(aliases, dict):
        raise ck.fail("settings.aliases", "is not an object", f"write an object such as {example}")
    names = {k.lower() for k in aliases}
    for name, entry in aliases.items():
        where = "settings.aliases"          # a name config_problems can set aside
        if not name.strip():
            raise ck.fail("settings.aliases", "an alias has an empty name", "give it a name")
        if not isinstance(entry, list) or not entry or len(entry) > ALIAS_MAX_MEMBERS:
            raise ck.fail(where, f"{name!r} is not a list of 1 to {ALIAS_MAX_MEMBERS} models",
                          f"write a list such as {example[9:-1]}")
        for member in entry:
            if isinstance(member, dict):
                unknown = set(member) - {"model", "weight"}
                if unknown or not isinstance(member.get("model"), str):
                    raise ck.fail(where, f"{name!r}: {json.dumps(member)[:60]} is not a model "
                                         f"entry",
                                  'write {"model": "name", "weight": 2}')
                weight = member.get("weight", 1)
                if isinstance(weight, bool) or not isinstance(weight, (int, float)) or \
                        not 0 < weight < float("inf"):
                    raise ck.fail(where, f"{name!r}: the weight of {member['model']!r} is not "
                                         f"a positive number", "use a number such as 1 or 2")
                model = member["model"]
            elif isinstance(member, str):
                model = member
            else:
                raise ck.fail(where, f"{name!r}: {json.dumps(member)[:60]} is not a model",
                              'write a model name, or {"model": "name", "weight": 2}')
            if not model.strip():
                raise ck.fail(where, f"{name!r} names an empty model",
                              "write the upstream model's name")
            if model.lower() in names:
                raise ck.fail(where, f"{name!r}: {model!r} is an alias itself",
                              "name the upstream models directly (aliases do not nest)")


# Headers an override may not set: the channel's key goes in api_key / api_keys (kept out of
# every log); nor set or remove: the framing headers, which are the HTTP client's.
_OVERRIDE_SECRET_HEADERS = ("authorization", "x-api-key", "x-goog-api-key", "api-key")
_OVERRIDE_FRAMING_HEADERS = ("host", "content-length", "transfer-encoding", "connection")
_OVERRIDE_KEYS = ("models", "set", "remove", "headers", "remove_headers")


def override_path(path: str) -> list[str] | None:
    """A dotted override path's segments ("messages.0.role" -> ["messages", "0", "role"]), or
    None when it is not usable (empty segments, too deep)."""
    parts = path.split(".")
    if not path or any(not p for p in parts) or len(parts) > OVERRIDE_PATH_DEPTH:
        return None
    return parts


def _check_overrides(ck: _Checker, ch: dict, where: str) -> None:
    """A channel's ``overrides``: rules applied to the request sent upstream (section 11)."""
    rules = ch["overrides"]
    example = '[{"models": "gpt-5*", "set": {"reasoning.effort": "low"}}]'
    if not isinstance(rules, list) or len(rules) > OVERRIDES_MAX:
        raise ck.fail(f"{where}.overrides", f"is not a list of at most {OVERRIDES_MAX} rules",
                      f"write a list such as {example}")
    for i, rule in enumerate(rules):
        at = f"{where}.overrides[{i}]"
        if not isinstance(rule, dict):
            raise ck.fail(at, "is not an object", f"write a rule such as {example[1:-1]}")
        unknown = [k for k in rule if k not in _OVERRIDE_KEYS]
        if unknown:
            raise ck.fail(at, f"{unknown[0]!r} is not an override key",
                          f"use only {', '.join(_OVERRIDE_KEYS)}")
        if not any(rule.get(k) for k in _OVERRIDE_KEYS[1:]):
            raise ck.fail(at, "changes nothing", "give it set, remove, headers or remove_headers")
        models = rule.get("models", [])
        if isinstance(models, str):
            models = [models]
        if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
            raise ck.fail(f"{at}.models", "is not a model pattern or a list of them",
                          'write "gpt-4o*" or ["gpt-4o", "o3*"] (leave it out for every model)')
        sets, removes = rule.get("set", {}), rule.get("remove", [])
        if not isinstance(sets, dict):
            raise ck.fail(f"{at}.set", "is not an object",
                          'write dotted paths and values, such as {"reasoning.effort": "low"}')
        if not isinstance(removes, list) or not all(isinstance(p, str) for p in removes):
            raise ck.fail(f"{at}.remove", "is not a list of paths",
                          'write a list such as ["stream_options", "metadata.user_id"]')
        for path in [*sets, *removes]:
            if override_path(path) is None:
                raise ck.fail(at, f"{path!r} is not a dotted path",
                              f"write names joined by dots (list items by number), at most "
                              f"{OVERRIDE_PATH_DEPTH} deep, such as \"messages.0.role\"")
        hdrs, dropped = rule.get("headers", {}), rule.get("remove_headers", [])
        if not isinstance(hdrs, dict) or not all(isinstance(v, str) for v in hdrs.values()):
            raise ck.fail(f"{at}.headers", "is not an object of strings",
                          'write an object such as {"X-Title": "aigateway"}')
        if not isinstance(dropped, list) or not all(isinstance(h, str) for h in dropped):
            raise ck.fail(f"{at}.remove_headers", "is not a list of header names",
                          'write a list such as ["anthropic-beta"]')
        for name in [*hdrs, *dropped]:
            low = name.lower()
            if low in _OVERRIDE_SECRET_HEADERS and name in hdrs:     # removing one is fine
                raise ck.fail(at, f"{name!r} carries the channel's key",
                              "put the key in the channel's api_key (it is kept out of logs)")
            if low in _OVERRIDE_FRAMING_HEADERS:
                raise ck.fail(at, f"{name!r} is set by the HTTP client",
                              "leave it out of the override")
            if not header_ok(name, hdrs.get(name, "")):
                raise ck.fail(at, f"{name!r} is not a valid header",
                              "use header names without spaces and values without line breaks")


def header_ok(name: str, value: str) -> bool:
    """A channel's extra header: a token name (RFC 9110 5.1) and a value without line breaks."""
    return bool(_TOKEN_RX.match(name.encode("latin-1", "replace"))) and "\r" not in value \
        and "\n" not in value


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
        rpm = ck.typed(tok, "rpm", where, (int,), "a whole number (0 = no limit)")
        if rpm < 0:
            raise ck.fail(f"{where}.rpm", f"{rpm} is negative", "use 0 for no limit")
        limits = tok["limits"]
        if not isinstance(limits, dict):
            raise ck.fail(f"{where}.limits", "is not an object",
                          'write {"requests_per_day": 1000, "cost_per_month": 20}, or {}')
        for kind, value in limits.items():
            if kind not in LIMIT_KINDS:
                raise ck.fail(f"{where}.limits", f"{kind!r} is not a limit",
                              f"use only {', '.join(LIMIT_KINDS)}")
            whole = not kind.startswith("cost")
            if isinstance(value, bool) or not isinstance(value, int if whole else (int, float)) \
                    or not 0 <= value < float("inf"):
                raise ck.fail(f"{where}.limits.{kind}", f"{json.dumps(value)[:60]} is not a "
                              f"{'whole number' if whole else 'number'} of 0 or more",
                              "use 0 for no limit" if whole else "write US dollars, such as 5")
        expires = ck.typed(tok, "expires_at", where, (str,), 'an ISO date, or "" for never')
        if expires and parse_utc(expires) is None:
            raise ck.fail(f"{where}.expires_at", f"{expires[:40]!r} is not an ISO date",
                          'write a UTC date such as "2026-12-31" or "2026-12-31T18:00:00Z"')


def parse_utc(text: str) -> float | None:
    """Epoch seconds of an ISO date ("2026-12-31": its midnight) or date-time (UTC unless it
    names an offset), or None."""
    try:
        when = datetime.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return when.timestamp()


def _check_prices(ck: _Checker, prices: Any) -> None:
    """The top-level ``prices``: model pattern (``*`` wildcards) -> USD per million tokens."""
    example = '{"gpt-5*": {"input": 1.25, "output": 10, "cache_read": 0.125}}'
    if not isinstance(prices, dict):
        raise ck.fail("prices", "is not an object", f"write {example}, or {{}}")
    for pattern, entry in prices.items():
        where = f"prices.{pattern[:60]}"
        if not pattern.strip():
            raise ck.fail("prices", "has an empty model pattern", f"write {example}")
        if not isinstance(entry, dict):
            raise ck.fail(where, "is not an object", f"write {example}")
        for key, value in entry.items():
            if key not in PRICE_FIELDS:
                raise ck.fail(where, f"{key!r} is not a price", f"use {', '.join(PRICE_FIELDS)}")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                    not 0 <= value < float("inf"):
                raise ck.fail(f"{where}.{key}", f"{json.dumps(value)[:60]} is not a price",
                              "write US dollars per million tokens, such as 2.5")


# A deeper field (channels[0].overrides[1], settings.aliases) names the top field set aside.
_WHERE_RX = re.compile(r"(settings|next_ids|channels|tokens)(?:\[(\d+)\])?(?:\.(\w+))?"
                       r"(?:[.\[].*)?")


def config_problems(raw: Any, source: str) -> list[str]:
    """Every problem validate_config finds in ``raw``, not just the first: after each one the
    field it names is put back to its default (or its entry replaced by a harmless one, or
    its section emptied) in a scratch copy, and validation runs again."""
    problems: list[str] = []
    scratch = copy.deepcopy(raw)
    tried: set[str] = set()
    for _ in range(MAX_CONFIG_PROBLEMS):
        try:
            validate_config(scratch, source)
            return problems
        except ConfigError as exc:
            where = getattr(exc, "where", "")
            if where not in tried:            # else an echo of what was set aside there
                problems.append(str(exc))
            match = _WHERE_RX.fullmatch(where)
            if match is None:
                return problems
            _set_aside(scratch, *match.groups(), again=where in tried)
            tried.add(where)
    problems.append(f"{source}: more than {MAX_CONFIG_PROBLEMS} problems; fix these first")
    return problems


def _set_aside(cfg: dict, section: str, index: str | None, key: str | None, *,
               again: bool) -> None:
    if index is None:
        part = cfg.get(section)
        if key is not None and not again and isinstance(part, dict):
            part.pop(key, None)
        else:
            cfg[section] = [] if section in ("channels", "tokens") else {}
        return
    items, i = cfg[section], int(index)
    if key is not None and not again:
        items[i].pop(key, None)
        return
    old = items[i] if isinstance(items[i], dict) else {}
    name = old.get("name") if key != "name" and isinstance(old.get("name"), str) else ""
    items[i] = {"name": name, "type": "ollama"} if section == "channels" else {
        "name": name, "key": new_token_key()}        # kept: its name, for the checks by name


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


class InstanceLock:
    """An exclusive lock beside the configuration file, held while this process runs, so a
    second aigateway started on the same file says so instead of fighting over it."""

    def __init__(self, config_path: str):
        self.path = config_path + ".lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise ConfigError(f"cannot create the lock file {self.path} ({exc.strerror}); make "
                              f"its folder writable, or give aigateway a configuration file in "
                              f"a writable folder with --config PATH") from None
        try:
            if sys.platform == "win32":
                import msvcrt
                msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            else:
                import fcntl
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                pid = os.read(fd, 32).decode(errors="replace").strip() or "?"
            except OSError:                  # Windows: the locked byte cannot be read
                pid = "?"
            finally:
                os.close(fd)
            raise ConfigError(f"another aigateway (pid {pid}) is already using "
                              f"{self.path[:-5]}; stop it first, or give this one its own "
                              f"file with --config") from None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
        except OSError:                    # a full disk: the lock holds, only the pid is lost
            pass
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _file_stamp(path: str) -> tuple[int, ...] | None:
    """What changes when a file is edited or replaced: mtime, size, inode, ctime (None when
    the file is missing)."""
    try:
        st = os.stat(path)
    except OSError:                        # missing or unreadable: reading it says which
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_ctime_ns)


def _read_config_file(path: str) -> bytes:
    """The file's bytes, at most CONFIG_MAX_BYTES; FileNotFoundError passes through."""
    try:
        with open(path, "rb") as f:
            raw = f.read(CONFIG_MAX_BYTES + 1)
    except FileNotFoundError:                   # the callers decide what a missing file means
        raise
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the file ({exc.strerror}); check its "
                          f"permissions, or choose another file with --config PATH") from None
    if len(raw) > CONFIG_MAX_BYTES:
        raise ConfigError(f"{path}: the file is larger than {CONFIG_MAX_BYTES // 2**20} MiB; "
                          f"this is not a configuration file")
    return raw


def _parse_config(path: str, raw_bytes: bytes, notes: list[str] | None = None) -> dict:
    try:
        raw = json.loads(raw_bytes.decode("utf-8-sig"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: the file is not UTF-8 text; save it as UTF-8") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: line {exc.lineno} column {exc.colno}: {exc.msg}; fix the "
                          f"JSON syntax there (a missing comma or quote is usual)") from None
    return validate_config(raw, path, notes)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ConfigStore:
    """The configuration file and its in-memory form. Edits go through the methods here, each of
    which validates and saves at once; ``snapshot()`` gives the server a private copy.

    The store remembers the file it read or wrote last (its content hash and stat stamp), so it
    never overwrites a version it has not seen: an edit made while the file changed on disk (by
    hand, or by another process such as the command line) is redone on the newer file, and
    ``reload()`` takes such a version when the caller asks."""

    def __init__(self, path: str, data: dict, raw: bytes | None = None):
        self.path = path
        self.data = data
        self._lock = threading.RLock()
        self.notes: list[str] = []        # what loading changed (the old app's keys mapped)
        # the version in self.data; None: not read from the file (the data given is what counts)
        self._digest = _digest(raw) if raw is not None else None
        self._stamp = _file_stamp(path)
        self._problem: str | None = None       # why the file on disk is not taken, if it is not

    @classmethod
    def load(cls, path: str, *, create: bool = True) -> tuple[ConfigStore, str | None]:
        """Load ``path``; a missing file is created with defaults and one new token, whose key
        is returned so the caller can show it once. An invalid file raises ConfigError and is
        left untouched."""
        try:
            raw_bytes = _read_config_file(path)
        except FileNotFoundError:
            if not create:
                raise ConfigError(f"{path}: the file does not exist") from None
            key = new_token_key()
            data = validate_config({"tokens": [{"name": "default", "key": key}]}, path)
            store = cls(path, data)
            try:
                store.save()
            except OSError as exc:
                raise ConfigError(f"cannot create {path} ({exc.strerror}); make sure its "
                                  f"folder exists and is writable, or choose another file with "
                                  f"--config PATH or AIGATEWAY_CONFIG") from None
            return store, key
        notes: list[str] = []
        store = cls(path, _parse_config(path, raw_bytes, notes), raw_bytes)
        store.notes = notes
        return store, None

    def _disk_version(self) -> tuple[bytes | None, bool]:
        """The file's bytes (None when missing) and whether they differ from the version this
        store read or wrote."""
        try:
            raw = _read_config_file(self.path)
        except FileNotFoundError:
            return None, False
        return raw, self._digest is not None and _digest(raw) != self._digest

    def save(self) -> None:
        """Write the in-memory configuration. Refuses with ConfigError when the file changed on
        disk since this store read or wrote it: the other edit would be lost unseen (the edit
        methods redo their change on the newer file instead)."""
        with self._lock:
            if self._disk_version()[1]:
                raise ConfigError(f"{self.path}: the file was changed by another program since "
                                  f"it was read; reload it before saving")
            self._write()

    def _write(self) -> None:
        data = (json.dumps(self.data, indent=2, ensure_ascii=False) + "\n").encode()
        atomic_write(self.path, data)
        self._digest, self._stamp, self._problem = _digest(data), _file_stamp(self.path), None

    def reload(self, force: bool = False, now: Callable[[], float] = time.time) -> bool:
        """Take the file on disk if it changed since it was read or written here (``force``:
        re-read it even when its stamp is the same). Returns True when a new version was taken.
        An invalid or missing file raises ConfigError and the configuration in force stays;
        one written in the last CONFIG_SETTLE_SECONDS (by the clock ``now``) may still be
        being written, so its error waits for the next call (not when forced)."""
        with self._lock:
            stamp = _file_stamp(self.path)
            if stamp == self._stamp and not force:
                if self._problem:
                    raise ConfigError(self._problem)
                return False
            self._stamp = stamp
            try:
                raw, changed = self._disk_version()
                if raw is None:
                    raise ConfigError(f"{self.path}: the file is missing; the window's next "
                                      f"save writes it again")
                if changed:
                    data = _parse_config(self.path, raw)
            except ConfigError as exc:
                if not force and stamp is not None and \
                        now() - stamp[0] / 1e9 < CONFIG_SETTLE_SECONDS:
                    self._stamp = None                         # read it again next time
                    return False
                self._problem = str(exc)
                raise
            self._problem = None
            if not changed:
                return False
            self.data, self._digest = data, _digest(raw)
            return True

    def snapshot(self) -> dict:
        with self._lock:
            return copy.deepcopy(self.data)

    def _apply(self, mutate: Callable[[dict], Any]) -> Any:
        """Run ``mutate`` on a copy of the newest valid file, validate, save. A file changed on
        disk meanwhile is taken first, so both edits survive; an invalid one stops the edit."""
        with self._lock:
            for _ in range(CONFIG_SAVE_ATTEMPTS):
                try:
                    self.reload(force=True)        # a save is rare: always read the file
                except ConfigError as exc:
                    if os.path.exists(self.path):
                        raise ConfigError(f"{exc} (not saved: the file changed on disk and is "
                                          f"invalid now; fix it first)") from None
                candidate = copy.deepcopy(self.data)
                result = mutate(candidate)
                data = validate_config(candidate, self.path)
                if self._disk_version()[1]:             # written again since the reload
                    self._stamp = None
                    continue
                self.data = data
                self._write()
                return result
            raise ConfigError(f"{self.path}: the file kept changing on disk while saving; "
                              f"the change was not saved, try again")

    def update_settings(self, **changes: Any) -> None:
        self._apply(lambda d: d["settings"].update(changes))

    def update_prices(self, changes: dict[str, dict], remove: Iterable[str] = ()) -> None:
        """Set (replace) the price entries of ``changes`` and delete those of ``remove``."""
        def mutate(d: dict) -> None:
            prices = d.setdefault("prices", {})
            for pattern in remove:
                prices.pop(pattern, None)
            prices.update(copy.deepcopy(changes))
        self._apply(mutate)

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


def prices_from_models_dev(obj: Any) -> dict[str, dict[str, float]]:
    """Prices from a models.dev-style file: {provider: {"models": {id: {"cost": {...}}}}}, or
    one provider's {"models": {...}}, or {id: {"cost": {...}}}. Costs are USD per million
    tokens there too; entries without a cost are skipped."""
    if not isinstance(obj, dict):
        raise ConfigError("the prices file is not a JSON object")
    providers = [obj] if "models" in obj else list(obj.values())
    out: dict[str, dict[str, float]] = {}
    for prov in providers:
        models = prov.get("models") if isinstance(prov, dict) and "models" in prov else None
        if models is None and isinstance(prov, dict) and "cost" in prov:
            models = {prov.get("id", ""): prov}
        for mid, m in (models or {}).items() if isinstance(models, dict) else ():
            cost = m.get("cost") if isinstance(m, dict) else None
            name = m.get("id", mid) if isinstance(m, dict) else mid
            if not isinstance(cost, dict) or not isinstance(name, str) or not name.strip():
                continue
            entry = {k: float(v) for k, v in cost.items() if k in PRICE_FIELDS and
                     isinstance(v, (int, float)) and not isinstance(v, bool) and
                     0 <= v < float("inf")}
            if "input" in entry or "output" in entry:
                out.setdefault(name, entry)
    if not out:
        raise ConfigError("the prices file names no model with a cost; it should look like "
                          'models.dev\'s api.json: {"openai": {"models": {"gpt-4o": '
                          '{"cost": {"input": 2.5, "output": 10}}}}}')
    return out


def import_prices(store: ConfigStore, file: str, raw: bytes | None = None) -> int:
    """Add or replace the prices a models.dev-style file names (``raw``: its bytes, already
    fetched); return how many."""
    try:
        if raw is None:
            with open(file, "rb") as f:
                raw = f.read(PRICES_IMPORT_MAX_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read {file}: {exc.strerror}") from None
    if len(raw) > PRICES_IMPORT_MAX_BYTES:
        raise ConfigError(f"{file} is larger than {PRICES_IMPORT_MAX_BYTES // 2**20} MiB")
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{file} is not JSON: {exc}") from None
    prices = prices_from_models_dev(obj)
    store.update_prices(prices)
    return len(prices)


# =================================================================================================
# 11. Gateway
# =================================================================================================
# Auth (Access), routing (Router: model -> channels), health and limits (Limits), relaying with
# fallback over channels and keys (Relay: passed through or converted by the adapters of section
# 9, which it asks every provider question), request records and events; the Gateway at the end
# is the facade over them. Runs on the server loop.

@dataclass(frozen=True, slots=True)
class Route:
    path: str
    methods: tuple[str, ...]
    dialect: str
    kind: str
    body: str = "json"          # "json", "multipart" or "none"
    reach: tuple[str, ...] = ()  # channel types reached by conversion, beyond passthrough


ROUTES: dict[str, Route] = {r.path: r for r in (
    Route("/v1/chat/completions", ("POST",), OPENAI, "chat", reach=CHANNEL_TYPES),
    Route("/v1/completions", ("POST",), OPENAI, "completions"),
    Route("/v1/embeddings", ("POST",), OPENAI, "embeddings", reach=EMBEDDING_TYPES),
    Route("/v1/images/generations", ("POST",), OPENAI, "images"),
    Route("/v1/audio/speech", ("POST",), OPENAI, "speech"),
    Route("/v1/audio/transcriptions", ("POST",), OPENAI, "transcriptions", "multipart"),
    Route("/v1/models", ("GET",), OPENAI, "models", "none"),
    Route("/v1/responses", ("POST",), RESPONSES, "responses", reach=CHANNEL_TYPES),
    Route("/v1/messages", ("POST",), ANTHROPIC, "messages", reach=CHANNEL_TYPES),
    Route("/v1/messages/count_tokens", ("POST",), ANTHROPIC, "count_tokens",
          reach=CHANNEL_TYPES),
    Route("/health", ("GET",), OPENAI, "health", "none"),
    Route("/usage", ("GET",), OPENAI, "usage", "none"),
)}
MODEL_ROUTE = Route("/v1/models/{model}", ("GET",), OPENAI, "model", "none")
GEMINI_ROUTES = {kind: Route(f"/v1beta/models/{{model}}:{kind}", ("POST",), GEMINI, kind,
                             reach=reach) for kind, reach in (
    ("generateContent", CHANNEL_TYPES), ("streamGenerateContent", CHANNEL_TYPES),
    ("countTokens", CHANNEL_TYPES), ("embedContent", EMBEDDING_TYPES),
    ("batchEmbedContents", EMBEDDING_TYPES))}
# Token counting is free at every provider: it is not usage (no row, no cost, no limit use).
UNBILLED_ROUTES = {ROUTES["/v1/messages/count_tokens"].path, GEMINI_ROUTES["countTokens"].path}
GEMINI_MODELS_ROUTE = Route("/v1beta/models", ("GET",), GEMINI, "models", "none")
GEMINI_MODEL_ROUTE = Route("/v1beta/models/{model}", ("GET",), GEMINI, "model", "none")
_GEMINI_PATH = re.compile(r"/(?:v1beta|v1alpha|v1)/models/([^:]+):([A-Za-z]+)\Z")
_EMBED_KINDS = ("embeddings", "embedContent", "batchEmbedContents")
IMAGES_DEFAULT_MODEL = "dall-e-2"         # what the OpenAI API assumes when `model` is left out

_DROP_REQUEST_HEADERS = _HOP_BY_HOP | {
    "host", "content-length", "authorization", "x-api-key", "x-goog-api-key", "api-key",
    "cookie", "accept-encoding", "expect", "origin", "referer",
}
_DROP_RESPONSE_HEADERS = _HOP_BY_HOP | {
    "content-length", "content-encoding", "set-cookie", "date", "server", "alt-svc",
    "strict-transport-security",
}


def find_route(path: str) -> tuple[Route | None, str]:
    """The route for ``path`` (with or without the /v1 prefix) and, for routes naming a model
    (/v1/models/{id}, Gemini's /v1beta/models/{model}:{method}), that model."""
    if len(path) > 1 and path.endswith("/"):
        path = path.rstrip("/")
    if ":" in path:
        m = _GEMINI_PATH.match(path)
        if m:
            return GEMINI_ROUTES.get(m.group(2)), urllib.parse.unquote(m.group(1))
    if path.startswith(("/v1beta/models", "/v1alpha/models")):
        rest = path.split("/models", 1)[1].lstrip("/")
        if not rest:
            return GEMINI_MODELS_ROUTE, ""
        return GEMINI_MODEL_ROUTE, urllib.parse.unquote(rest.removeprefix("models/"))
    route = ROUTES.get(path)
    if route is None and not path.startswith("/v1/"):
        route = ROUTES.get("/v1" + path)
        if route is None:
            path = "/v1" + path
    if route is None and path.startswith("/v1/models/") and len(path) > 11:
        return MODEL_ROUTE, urllib.parse.unquote(path[11:])
    return route, ""


def upstream_json(raw: bytes, channel: str, what: str = "an answer") -> Any:
    """An upstream's JSON answer, parsed strictly; anything else is the channel's fault: 502."""
    return json_loads(raw, f"channel '{channel}' sent {what} that", status=502)


class Channel:
    """A configured upstream, prepared for routing."""

    __slots__ = ("id", "name", "type", "base_url", "api_key", "models", "mapping", "priority",
                 "enabled", "timeout", "proxy", "verify_tls", "headers", "max_tokens_cap",
                 "responses_api", "api_version", "keys", "max_concurrency", "quirks", "thinking",
                 "preset", "weight", "overrides", "extra", "creds", "_exact", "relay_drops",
                 "_mapped")

    def __init__(self, c: dict, default_proxy: str):
        self.id: int = c["id"]
        self.name: str = c["name"]
        self.type: str = c["type"]
        provider = PROVIDERS[self.type]
        self.base_url: str = c["base_url"] or provider.base_url_for(c)
        self.api_key: str = c["api_key"]
        # The type's own fields (region, project, ...) and what they sign with, prepared here.
        self.extra: dict[str, Any] = {k: c.get(k, f.default) for k, f in provider.fields.items()}
        self.creds: Any = provider.credentials(c)
        self.models: list[str] = c["models"]
        # Exact names, and patterns with "*" (such as "claude-*", for a client whose model
        # names change with its versions) tried when no exact name is mapped, longest first.
        self.mapping = {k.lower(): v for k, v in c["model_mapping"].items() if "*" not in k}
        self._mapped = sorted(((k, v) for k, v in c["model_mapping"].items() if "*" in k),
                              key=lambda kv: -len(kv[0]))
        self.priority: int = c["priority"]
        self.enabled: bool = c["enabled"]
        self.timeout = float(c["timeout"])
        self.proxy: str = c["proxy"] or default_proxy
        self.verify_tls: bool = c["verify_tls"]
        self.headers = list(c["headers"].items())
        self.max_tokens_cap: int = c["max_tokens_cap"]
        self.responses_api: bool = c["responses_api"]
        self.api_version: str = c.get("api_version", "")
        self.keys = tuple(dict.fromkeys(k for k in [c["api_key"], *c["api_keys"]] if k))
        self.max_concurrency: int = c["max_concurrency"]
        self.quirks: dict = c["quirks"]
        self.thinking: str = c["thinking"]
        self.preset: str = c.get("preset", "")
        self.weight = float(c["weight"])
        self.overrides: list[dict] = c["overrides"]
        self._exact = {m.lower() for m in self.models if "*" not in m}
        # A passed-through request's header names (lower case) this channel sets itself or
        # its quirks drop, and with them every name it never forwards (Relay._upstream_request).
        own = frozenset(n.lower() for n in c["headers"]) | quirk_dropped_headers(self.quirks)
        self.relay_drops = (own, _DROP_REQUEST_HEADERS | own | provider.replaces_headers)

    def secrets(self) -> list[str]:
        """Every credential of this channel (its keys, its type's secret fields, a service
        account's private key), for masking."""
        out = list(self.keys)
        for name, f in PROVIDERS[self.type].fields.items():
            value = self.extra.get(name)
            if f.secret and isinstance(value, str) and value:
                out.append(value)
            elif f.secret and isinstance(value, dict):
                out += [v for v in value.values() if isinstance(v, str) and len(v) > 40]
        return out

    def serves(self, model: str) -> bool:
        low = model.lower()
        if not self.models or low in self._exact or low in self.mapping:
            return True
        return any(name_matches(m, model) for m in self.models if "*" in m) or any(
            name_matches(k, model) for k, _ in self._mapped)

    def upstream_model(self, model: str) -> str:
        """The name the upstream gets for ``model``: its model_mapping target (an exact key,
        else the longest pattern that matches), else ``model`` itself."""
        target = self.mapping.get(model.lower())
        if target is None and self._mapped:         # (no generator on the usual path)
            target = next((v for k, v in self._mapped if name_matches(k, model)), None)
        return model if target is None else target

    def with_cap(self, cap: int) -> Channel:
        """This channel with ``cap`` as its max_tokens_cap (a limit its upstream named)."""
        if self.max_tokens_cap and self.max_tokens_cap <= cap:
            return self
        other = copy.copy(self)
        other.max_tokens_cap = cap
        return other

    def with_key(self, key: str) -> Channel:
        """This channel, sending ``key`` instead of its first one."""
        if key == self.api_key:
            return self
        other = copy.copy(self)
        other.api_key = key
        return other

    def for_alias(self, alias: str, member: str) -> Channel:
        """This channel serving ``alias`` (settings.aliases) as its member model ``member``."""
        other = copy.copy(self)
        other.mapping = dict(self.mapping, **{alias.lower(): self.upstream_model(member)})
        return other

    def listed_models(self) -> list[str]:
        return [m for m in self.models if "*" not in m] + [
            k for k in self.mapping if k not in self._exact]


class Token:
    __slots__ = ("id", "name", "key", "enabled", "allowed_models", "allowed_channels", "rpm",
                 "limits", "expires")

    def __init__(self, t: dict):
        self.id: int = t["id"]
        self.name: str = t["name"]
        self.key: bytes = t["key"].encode()
        self.enabled: bool = t["enabled"]
        self.allowed_models: list[str] = t["allowed_models"]
        self.allowed_channels = {c.lower() if isinstance(c, str) else c
                                 for c in t["allowed_channels"]}
        self.rpm: int = t["rpm"]
        self.limits: dict[str, float] = {k: v for k, v in t["limits"].items() if v}
        self.expires: float | None = parse_utc(t["expires_at"]) if t["expires_at"] else None

    def may_use_model(self, model: str) -> bool:
        return not self.allowed_models or any(name_matches(p, model) for p in self.allowed_models)

    def may_use_channel(self, ch: Channel) -> bool:
        return not self.allowed_channels or ch.id in self.allowed_channels \
            or ch.name.lower() in self.allowed_channels


TOKEN_PLACES = ("send it as 'Authorization: Bearer <token>', 'x-api-key: <token>', "
                "'x-goog-api-key: <token>' or the query parameter '?key=<token>'")


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


def host_name(value: str) -> str:
    """The host of a Host header (or of an origin without its scheme): no port, no brackets,
    lower case, no final dot."""
    value = value.strip().lower()
    if value.startswith("["):
        value = value[1:].partition("]")[0]
    elif value.count(":") == 1:
        value = value.partition(":")[0]
    return value.rstrip(".")


def is_local_name(name: str) -> bool:
    """A loopback host: localhost and its subdomains (RFC 6761 section 6.3: they never leave
    the machine), 127.0.0.0/8 or ::1."""
    return name == "localhost" or name.endswith(".localhost") or is_loopback_host(name)


def is_ip_literal(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def origin_is_local(origin: str) -> bool:
    """A browser origin allowed without settings.cors_origins: a page served from this machine
    (http/https on a loopback host, any port) or a desktop app's page (APP_ORIGIN_SCHEMES)."""
    scheme, sep, rest = origin.partition("://")
    scheme = scheme.lower()
    if not sep:
        return False
    return scheme in APP_ORIGIN_SCHEMES or (scheme in ("http", "https") and
                                            is_local_name(host_name(rest)))


class AuthThrottle:
    """Wrong gateway tokens per client address: AUTH_FAILURES_LIMIT of them within
    AUTH_FAILURES_WINDOW seconds block the address for AUTH_BLOCK_SECONDS. At most
    AUTH_FAILURE_ADDRESSES are tracked (the least recently failed is dropped). Times are the
    caller's clock, so tests drive it without waiting."""

    def __init__(self, max_addresses: int = AUTH_FAILURE_ADDRESSES):
        self.max_addresses = max_addresses
        # address -> (times of its latest failures, monotonic end of its block or 0)
        self._table: collections.OrderedDict[str, tuple[collections.deque[float], float]] = \
            collections.OrderedDict()

    def blocked_for(self, address: str, now: float) -> float:
        """Seconds ``address`` is still blocked (0 when it is not)."""
        entry = self._table.get(address)
        return max(0.0, entry[1] - now) if entry is not None else 0.0

    def failed(self, address: str, now: float) -> None:
        times, until = self._table.pop(address, None) or \
            (collections.deque(maxlen=AUTH_FAILURES_LIMIT), 0.0)
        times.append(now)
        if len(times) == AUTH_FAILURES_LIMIT and now - times[0] <= AUTH_FAILURES_WINDOW:
            times.clear()
            until = now + AUTH_BLOCK_SECONDS
        self._table[address] = (times, until)
        while len(self._table) > self.max_addresses:
            self._table.popitem(last=False)

    def __len__(self) -> int:
        return len(self._table)


class RequestLog:
    """Appends one JSON line per request; rotates at REQUEST_LOG_MAX_BYTES. A write that fails
    (full disk, read-only folder) loses that line, never the request: ``errors`` counts them,
    and ``on_error(text)`` hears of the first failure after each success, so a broken disk is
    reported once rather than on every request."""

    def __init__(self, path: str, on_error: Callable[[str], None] | None = None):
        self.path = path
        self._file: Any = None
        self.errors = 0
        self._on_error = on_error or (lambda text: None)
        self._failing = False

    def open(self) -> None:
        """Open the file now (at start), raising ConfigError when that is impossible."""
        try:
            if self._file is None:
                self._file = self._open()
        except OSError as exc:
            raise ConfigError(f"cannot open the request log {self.path} ({exc.strerror}); "
                              f"set settings.log_file to a writable path, or turn "
                              f"settings.log_requests off") from None

    def write(self, record: dict) -> None:
        try:
            if self._file is None:
                self._file = self._open()
            self._file.write(json_dumps(record) + b"\n")
            self._file.flush()
            if self._file.tell() > REQUEST_LOG_MAX_BYTES:
                self._rotate()
        except OSError as exc:
            self.errors += 1
            self.close()
            if not self._failing:
                self._failing = True
                self._on_error(f"cannot write the request log {self.path} ({exc.strerror}); "
                               f"requests are served but not logged there until it works again")
            return
        self._failing = False

    def _open(self) -> Any:
        """Append, owner-only: a log may hold what clients sent."""
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT |
                     getattr(os, "O_BINARY", 0), 0o600)
        return os.fdopen(fd, "ab")

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


class ChannelHealth:
    """Circuit breaker of one channel. Consecutive failures (connect errors, timeouts, 5xx) or
    a 429 put it in a cooldown (Retry-After honoured) during which routing skips it; when the
    cooldown ends one request may go through as a probe ("half-open"): success closes the
    breaker, failure doubles the cooldown."""

    __slots__ = ("failures", "until", "backoff", "probing", "last_status", "last_error",
                 "last_latency_ms", "inflight", "waiting", "slots")

    def __init__(self):
        self.failures = 0
        self.until = 0.0                 # monotonic time the cooldown ends; 0 = none
        self.backoff = COOLDOWN_SECONDS
        self.probing = False
        self.last_status: int | None = None
        self.last_error: str | None = None
        self.last_latency_ms: float | None = None
        self.inflight = 0                # requests holding a max_concurrency slot
        self.waiting = 0
        self.slots: asyncio.Event | None = None     # set whenever a slot frees

    def state(self, now: float) -> str:
        if self.probing:
            return "probing"
        return "cooldown" if self.until > now else "ok"

    def succeeded(self, status: int, latency_ms: float) -> None:
        self.failures, self.until, self.probing = 0, 0.0, False
        self.backoff = COOLDOWN_SECONDS
        self.last_status, self.last_latency_ms, self.last_error = status, latency_ms, None

    def failed(self, exc: UpstreamError, now: float) -> bool:
        """Note a failure; return whether the channel went into cooldown."""
        self.failures += 1
        self.last_status, self.last_error = exc.upstream_status or exc.status, exc.message
        retry_after = retry_after_seconds(exc.headers)
        if exc.upstream_status == 429 or self.probing or self.failures >= HEALTH_FAILURES:
            wait = retry_after if exc.upstream_status == 429 and retry_after else self.backoff
            self.until = now + wait
            if self.probing or self.failures > HEALTH_FAILURES:
                self.backoff = min(self.backoff * 2, COOLDOWN_MAX_SECONDS)
            self.probing = False
            return True
        return False

    def snapshot(self, now: float) -> dict:
        return {"state": self.state(now), "consecutive_failures": self.failures,
                "cooldown_remaining_s": round(max(0.0, self.until - now), 1),
                "last_status": self.last_status, "last_error": self.last_error,
                "last_latency_ms": self.last_latency_ms, "in_flight": self.inflight,
                "waiting": self.waiting}


def retry_after_seconds(headers: list[tuple[str, str]]) -> float | None:
    for name, value in headers:
        try:
            if name.lower() == "retry-after-ms":
                return float(value) / 1000
            if name.lower() == "retry-after":
                return float(value)
        except ValueError:
            continue
    return None


# -- session affinity, weights, aliases, overrides, debug capture (issue 13) ----------------------

# Where clients name their session, first found (header names are case-insensitive):
#   X-Claude-Code-Session-Id   Claude Code since v2.1.86, one UUID per session (coder/aibridge
#                              pull request 241; Anthropic's LLM-gateway protocol page)
#   session_id / session-id    Codex: codex-rs/codex-api/src/requests/headers.rs
#                              (build_conversation_headers sends the conversation id as
#                              "session_id"; newer builds spell it "session-id")
#   prompt_cache_key           OpenAI's body field for grouping cached prompts (Codex sets it too)
#   metadata.user_id           Anthropic's body field; Claude Code puts its session id in it
SESSION_HEADERS = ("x-claude-code-session-id", "session_id", "session-id")


def session_key(headers: Headers, obj: dict | None) -> str | None:
    """The session a request belongs to (see SESSION_HEADERS), else a hash of its system prompt
    and first user message; None when the body has neither."""
    for name in SESSION_HEADERS:
        value = (headers.get(name) or "").strip()
        if value:
            return f"h:{value[:200]}"
    obj = obj or {}
    pck = obj.get("prompt_cache_key")
    if isinstance(pck, str) and pck:
        return f"p:{pck[:200]}"
    meta = obj.get("metadata")
    if isinstance(meta, dict) and isinstance(meta.get("user_id"), str) and meta["user_id"]:
        return f"u:{meta['user_id'][:400]}"
    # Field names of every dialect (chat/Messages, Responses, Gemini), read without judging them.
    system = obj.get("system") or obj.get("instructions") or obj.get("systemInstruction")
    turns = obj.get("messages") or obj.get("input") or obj.get("contents")
    first_user = None
    if isinstance(turns, list):
        for m in turns:
            if not isinstance(m, dict):
                continue
            if m.get("role") in ("system", "developer") and system is None:
                system = m.get("content")
            elif m.get("role") == "user":
                first_user = m.get("content", m.get("parts"))
                break
    elif isinstance(turns, str):
        first_user = turns
    if system is None and first_user is None:
        return None
    text = _text_prefix(system, AFFINITY_HASH_CHARS) + "\x01" + \
        _text_prefix(first_user, AFFINITY_HASH_CHARS)
    return "s:" + hashlib.sha256(text.encode("utf-8", "replace")).hexdigest()[:32]


def _text_prefix(value: Any, budget: int) -> str:
    """The first ``budget`` characters of the keys and values in ``value``, depth first (keys
    sorted), visiting at most ``budget`` items: a prompt's cost to hash stays bounded however
    large it is (a long system prompt, a first message with an image)."""
    out: list[str] = []
    size, stack = 0, [value]
    for _ in range(budget):
        if not stack or size >= budget:
            break
        item = stack.pop()
        if isinstance(item, dict):
            stack += [x for k in sorted(item, reverse=True) for x in (item[k], k)]
        elif isinstance(item, list):
            stack += reversed(item)
        else:
            piece = item if isinstance(item, str) else repr(item)
            out.append(piece[:budget - size] + "\x00")
            size += len(out[-1])
    return "".join(out)


class Affinity:
    """Which channel, upstream model and key served a session last: (scope) -> pin, where a
    scope is (gateway token id, requested model, session key). A pin lasts ``ttl`` seconds after
    the request that last used it (0 = affinity off); at most ``max_sessions`` are kept, the
    least recently used dropped first. Times come from ``clock`` (tests drive it)."""

    def __init__(self, ttl: float = DEFAULT_AFFINITY_TTL_S,
                 clock: Callable[[], float] = time.monotonic,
                 max_sessions: int = AFFINITY_MAX_SESSIONS):
        self.ttl, self.clock, self.max_sessions = ttl, clock, max_sessions
        self._table: collections.OrderedDict[tuple, tuple[float, tuple]] = \
            collections.OrderedDict()

    def lookup(self, scope: tuple) -> tuple | None:
        """The pin of ``scope``, (channel id, upstream model, key index), or None."""
        entry = self._table.get(scope)
        if entry is None:
            return None
        if entry[0] <= self.clock():
            del self._table[scope]
            return None
        return entry[1]

    def served(self, scope: tuple, before: tuple | None, pin: tuple) -> str:
        """Pin ``scope`` to what served it; "new", "hit" (the pin held) or "repinned"."""
        self._table.pop(scope, None)
        self._table[scope] = (self.clock() + self.ttl, pin)
        while len(self._table) > self.max_sessions:
            self._table.popitem(last=False)
        return "new" if before is None else "hit" if before == pin else "repinned"

    def __len__(self) -> int:
        return len(self._table)


def pinned_first(chans: list[Channel], pin: tuple | None, model: str) -> list[Channel]:
    """``chans`` with the pinned one (same channel, same upstream model) first, the rest in
    their order, so that a failing pin falls back as usual."""
    if pin is None:
        return chans
    for i, ch in enumerate(chans):
        if (ch.id, ch.upstream_model(model)) == pin[:2]:
            return [ch] + chans[:i] + chans[i + 1:]
    return chans


WEIGHT_STATES_MAX = 4096      # weighted-turn states kept (one per model and priority or alias)
ROUTER_CACHE_MAX = 1024       # routing decisions kept (one per model, route dialect and token)
LEARNED_CAPS_MAX = 256        # output limits learned from upstreams' refusals (channel, model)


def pin_key(pin: tuple | None, ch: Channel, model: str) -> int | None:
    """The key index a session's pin names for ``ch`` (None: no pin on this channel)."""
    return pin[2] if pin is not None and pin[:2] == (ch.id, ch.upstream_model(model)) else None


def key_index(ch: Channel, key: str) -> int:
    return ch.keys.index(key) if key in ch.keys else 0


def weighted_order(members: list, weights: list[float], current: dict) -> list:
    """Smooth weighted round-robin (the one nginx uses): each turn every member's running
    score grows by its weight, the highest (the first on a tie) is picked and loses the total.
    Over any run of sum(weights) turns each member is picked in proportion to its weight, evenly
    spread; with equal weights it is plain round-robin. ``current`` holds the scores between
    calls (members are hashable keys). Returns the members, the picked one first and the others
    following it in their order (the fallback order)."""
    for key in [k for k in current if k not in members]:
        del current[key]
    for m, w in zip(members, weights):
        current[m] = current.get(m, 0.0) + w
    best = max(range(len(members)), key=lambda i: (current[members[i]], -i))
    current[members[best]] -= sum(weights)
    return members[best:] + members[:best]


def _override_target(obj: Any, parts: list[str], create: bool) -> tuple[Any, Any] | None:
    """The container holding the last segment of ``parts`` and its key (an int for a list),
    making missing objects on the way when ``create``; None when the path cannot be reached."""
    cur = obj
    for i, seg in enumerate(parts):
        if isinstance(cur, list):
            if not is_digits(seg) or int(seg) >= len(cur):
                return None
            key: Any = int(seg)
        elif isinstance(cur, dict):
            key = seg
            if i < len(parts) - 1 and key not in cur:
                if not create:
                    return None
                cur[key] = {}
        else:
            return None
        if i == len(parts) - 1:
            return cur, key
        cur = cur[key]
    return None


def apply_overrides(body: bytes, headers: list[tuple[str, str]], rules: list[dict],
                    models: tuple[str, ...]) -> tuple[bytes, list[tuple[str, str]]]:
    """A channel's override rules (validated in section 10) applied to the request about to be
    sent: the rules whose ``models`` patterns match one of ``models`` (the name the client asked
    for, the name sent upstream), in order. ``set`` and ``remove`` take dotted paths ("a.b",
    "messages.0.role": a number indexes a list); a path that does not reach is skipped. The body
    is re-serialised only when a body rule applies (and only when it is a JSON object)."""
    picked = [r for r in rules if not r.get("models") or any(
        name_matches(p, m) for p in ([r["models"]] if isinstance(r["models"], str)
                                     else r["models"]) for m in models)]
    if not picked:
        return body, headers
    obj: Any = None
    if any(r.get("set") or r.get("remove") for r in picked):
        try:
            obj = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            obj = None                                   # a form or other body: headers only
    for rule in picked:
        if isinstance(obj, dict):
            for path, value in (rule.get("set") or {}).items():
                found = _override_target(obj, path.split("."), create=True)
                if found is not None:
                    found[0][found[1]] = copy.deepcopy(value)
            for path in rule.get("remove") or []:
                found = _override_target(obj, path.split("."), create=False)
                if found is not None and (isinstance(found[0], list) or found[1] in found[0]):
                    del found[0][found[1]]
        drop = {h.lower() for h in [*(rule.get("remove_headers") or []),
                                    *(rule.get("headers") or {})]}
        headers = [(n, v) for n, v in headers if n.lower() not in drop]
        headers += list((rule.get("headers") or {}).items())
    return (json_dumps(obj) if isinstance(obj, dict) else body), headers


# Headers whose values are credentials: a capture shows them masked.
_SECRET_HEADERS = frozenset(("authorization", "proxy-authorization", "x-api-key",
                             "x-goog-api-key", "api-key", "cookie", "x-amz-security-token"))
_KEY_PARAM_RX = re.compile(r"([?&](?:key|api_key|api-key)=)[^&\s\"']+", re.I)
_BEARER_RX = re.compile(r"(?i)\b(bearer\s+)([A-Za-z0-9._~+/=-]{8,})")


def mask_text(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with every known secret, bearer credential and ?key= value masked."""
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, mask_secret(secret))
    text = _BEARER_RX.sub(lambda m: m.group(1) + mask_secret(m.group(2)), text)
    return _KEY_PARAM_RX.sub(lambda m: m.group(1) + "***", text)


class DebugCapture:
    """The last ``keep`` requests' bodies for the Logs tab (off when 0): the client's request,
    each upstream request (up to DEBUG_CAPTURE_ATTEMPTS) and the start of each upstream answer,
    every body cut at DEBUG_CAPTURE_BODY_BYTES. Secrets (the configured keys and tokens, the
    credential headers, bearer values, ?key=) are masked when a body is captured and again when
    it is shown or written. With a ``path``, each finished request is appended to it as one JSON
    line (owner-only file). The Tk thread reads ``text()`` while the server loop writes, so the
    entries are guarded by a lock."""

    def __init__(self) -> None:
        self.keep = 0
        self._entries: collections.OrderedDict[int, dict] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._secrets: list[str] = []
        self._file: RequestLog | None = None

    def configure(self, keep: int, path: str | None, secrets: Iterable[str],
                  on_error: Callable[[str], None]) -> None:
        with self._lock:
            self.keep = keep
            self._secrets = sorted({s for s in secrets if len(s) >= 8}, key=len, reverse=True)
            while len(self._entries) > keep:
                self._entries.popitem(last=False)
        if self._file is not None and (not keep or self._file.path != path):
            self._file.close()
            self._file = None
        if keep and path and self._file is None:
            self._file = RequestLog(path, on_error)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    def _body(self, data: bytes) -> str:
        cut = len(data) > DEBUG_CAPTURE_BODY_BYTES
        text = data[:DEBUG_CAPTURE_BODY_BYTES].decode("utf-8", "replace")
        return mask_text(text, self._secrets) + (
            f"\n… (cut at {DEBUG_CAPTURE_BODY_BYTES // 1024} KiB of {len(data)} bytes)"
            if cut else "")

    def _headers(self, headers: Iterable[tuple[str, str]]) -> list[list[str]]:
        def masked(value: str) -> str:              # "Bearer sk-…1234": the scheme stays
            scheme, sep, cred = value.strip().partition(" ")
            return f"{scheme} {mask_secret(cred)}" if sep else mask_secret(value)
        return [[n, masked(v) if n.lower() in _SECRET_HEADERS else
                 mask_text(v, self._secrets)] for n, v in headers]

    def client(self, rec_id: int, req: Request) -> None:
        if not self.keep:
            return
        target = req.path + (f"?{req.query}" if req.query else "")
        entry = {"id": rec_id, "time": time.time(), "client_request": {
            "method": req.method, "target": mask_text(target, self._secrets),
            "headers": self._headers(req.headers), "body": self._body(req.body)},
            "upstream": []}
        with self._lock:
            self._entries[rec_id] = entry
            while len(self._entries) > self.keep:
                self._entries.popitem(last=False)

    def upstream(self, rec_id: int, method: str, url: str, headers: list[tuple[str, str]],
                 body: bytes) -> dict | None:
        """Note an upstream request; returns its exchange for ``response`` (None: not kept)."""
        with self._lock:
            entry = self._entries.get(rec_id)
            if entry is None or len(entry["upstream"]) >= DEBUG_CAPTURE_ATTEMPTS:
                return None
            exchange = {"request": {"method": method, "url": mask_text(url, self._secrets),
                                    "headers": self._headers(headers),
                                    "body": self._body(body)}, "response": None}
            entry["upstream"].append(exchange)
            return exchange

    def response(self, exchange: dict | None, up: UpstreamResponse) -> None:
        """Note an upstream answer's head, and tap its body's first bytes as they are read."""
        if exchange is None:
            return
        raw = bytearray()
        with self._lock:
            exchange["response"] = {"status": up.status, "headers": self._headers(up.headers),
                                    "raw": raw}

        def tap(data: bytes) -> None:
            room = DEBUG_CAPTURE_BODY_BYTES + 1 - len(raw)
            if room > 0:
                with self._lock:
                    raw.extend(data[:room])
        up.tap = tap

    def _finished(self, entry: dict) -> dict:
        """A copy of ``entry`` with the answers' bodies as masked text."""
        out = copy.deepcopy({k: v for k, v in entry.items() if k != "upstream"})
        out["upstream"] = []
        for ex in entry["upstream"]:
            resp = ex["response"]
            if resp is not None:
                resp = dict(resp, body=self._body(bytes(resp["raw"])))
                del resp["raw"]
            out["upstream"].append({"request": dict(ex["request"]), "response": resp})
        return out

    def finish(self, rec_id: int) -> None:
        if self._file is None:
            return
        with self._lock:
            entry = self._entries.get(rec_id)
            done = self._finished(entry) if entry is not None else None
        if done is not None:
            self._file.write(done)

    def text(self, rec_id: int) -> str:
        """What the Logs tab shows for a request: its bodies, masked; "" when not captured."""
        with self._lock:
            entry = self._entries.get(rec_id)
            if entry is None:
                return ""
            e = self._finished(entry)

        def block(title: str, headers: list, body: str) -> list[str]:
            return [f"── {title}", *(f"{n}: {v}" for n, v in headers), "", body, ""]
        c = e["client_request"]
        lines = block(f"client request: {c['method']} {c['target']}", c["headers"], c["body"])
        for i, ex in enumerate(e["upstream"], 1):
            r = ex["request"]
            lines += block(f"upstream request {i}: {r['method']} {r['url']}", r["headers"],
                           r["body"])
            if ex["response"] is not None:
                a = ex["response"]
                lines += block(f"upstream answer {i}: {a['status']}", a["headers"], a["body"])
        return "\n".join(lines).rstrip() + "\n"


# -- usage: prices, the store, per-token limits ----------------------------------------------
# One row per proxied request goes to a SQLite file (settings.usage_db) through a bounded queue
# and one writer thread, so no request waits on the disk. The writer also keeps a daily rollup
# (day, token, model, channel), which reports and charts read: a 30-day report touches a few
# thousand rollup rows however many requests there were. Per-token limits are checked against
# counters in memory, seeded from the database at start, so they survive restarts and cost no
# disk I/O per request.

# Built-in prices, USD per million tokens, read 2026-12-03: OpenAI's
# https://developers.openai.com/api/docs/pricing and model pages (gpt-5.6 and gpt-6 Astra in
# developers.openai.com/api/docs/models; gpt-6 Sol and Luna, 2026-09-22, with their cache writes
# as merefield/codexometer v0.18.4 and BerriAI/litellm#42515 quote them; gpt-6.1 Sol and gpt-6.2
# as premk134/codex-token-watch v0.3.3 and BerriAI/litellm discussion 52347 do), Anthropic's
# https://platform.claude.com/docs/en/about-claude/pricing and model pages (models/opus-5-5,
# sonnet-5-5, sonnet-5, opus-5 overviews; Haiku 5.5 at its prompts up to 100k tokens; Fable 5.2
# and Mythos 5.2 as phuryn/claude-usage v1.5.7 quotes them), Google's
# https://ai.google.dev/gemini-api/docs/pricing (prompts up to 200k tokens; 3.6 Flash and 3.5
# Flash-Lite in docs/latest-model; 3.8 Flash at its price until 2026-12-31, $1.50 / $7.50 from
# 2027-01-01, BerriAI/litellm discussion 39357). "cache_write" is Anthropic's 5-minute cache
# write (and OpenAI's, for gpt-6). Long-context tiers are left out. Entries in config.json's
# "prices" win over these; a model none matches costs 0 (3.x Flash models without a price of
# their own here, for instance, rather than Gemini 3 Flash's).
BUILTIN_PRICES_DATE = "2026-12-03"
BUILTIN_PRICES: dict[str, dict[str, float]] = {
    "gpt-6-astra*": {"input": 10.0, "output": 50.0, "cache_read": 1.0, "cache_write": 12.5},
    "gpt-6-sol*": {"input": 2.0, "output": 10.0, "cache_read": 0.2, "cache_write": 2.5},
    "gpt-6-luna*": {"input": 0.1, "output": 0.5, "cache_read": 0.01, "cache_write": 0.125},
    "gpt-6.1-sol*": {"input": 2.0, "output": 10.0, "cache_read": 0.1},
    "gpt-6.2-astra*": {"input": 8.0, "output": 40.0, "cache_read": 0.4},
    "gpt-6.2-sol*": {"input": 2.0, "output": 10.0},
    "gpt-5.6*": {"input": 4.0, "output": 20.0, "cache_read": 0.4},          # gpt-5.6 is Sol
    "gpt-5.6-terra*": {"input": 2.0, "output": 12.0, "cache_read": 0.2},
    "gpt-5.6-luna*": {"input": 0.2, "output": 1.2, "cache_read": 0.02},
    "gpt-5.5*": {"input": 5.0, "output": 30.0, "cache_read": 0.5},
    "gpt-5.5-pro*": {"input": 30.0, "output": 180.0},
    "gpt-5.4*": {"input": 2.5, "output": 15.0, "cache_read": 0.25},
    "gpt-5.4-mini*": {"input": 0.75, "output": 4.5, "cache_read": 0.075},
    "gpt-5.4-nano*": {"input": 0.2, "output": 1.25, "cache_read": 0.02},
    "gpt-5.4-pro*": {"input": 30.0, "output": 180.0},
    "gpt-5.2*": {"input": 1.75, "output": 14.0, "cache_read": 0.175},
    "gpt-5.2-pro*": {"input": 21.0, "output": 168.0},
    "gpt-5*": {"input": 1.25, "output": 10.0, "cache_read": 0.125},
    "gpt-5-mini*": {"input": 0.25, "output": 2.0, "cache_read": 0.025},
    "gpt-5-nano*": {"input": 0.05, "output": 0.4, "cache_read": 0.005},
    "gpt-4.1*": {"input": 2.0, "output": 8.0, "cache_read": 0.5},
    "gpt-4.1-mini*": {"input": 0.4, "output": 1.6, "cache_read": 0.1},
    "gpt-4.1-nano*": {"input": 0.1, "output": 0.4, "cache_read": 0.025},
    "gpt-4o*": {"input": 2.5, "output": 10.0, "cache_read": 1.25},
    "gpt-4o-mini*": {"input": 0.15, "output": 0.6, "cache_read": 0.075},
    "o1*": {"input": 15.0, "output": 60.0, "cache_read": 7.5},
    "o3*": {"input": 2.0, "output": 8.0, "cache_read": 0.5},
    "o3-mini*": {"input": 1.1, "output": 4.4, "cache_read": 0.55},
    "o3-pro*": {"input": 20.0, "output": 80.0},
    "o4-mini*": {"input": 1.1, "output": 4.4, "cache_read": 0.275},
    "claude-opus-5-5*": {"input": 4.0, "output": 20.0, "cache_read": 0.2, "cache_write": 5.0},
    "claude-opus-5*": {"input": 5.0, "output": 25.0, "cache_read": 0.5, "cache_write": 6.25},
    "claude-sonnet-5*": {"input": 2.0, "output": 10.0, "cache_read": 0.2, "cache_write": 2.5},
    "claude-haiku-5-5*": {"input": 0.1, "output": 0.5},
    "claude-fable-5*": {"input": 10.0, "output": 50.0, "cache_read": 1.0},
    "claude-fable-5-1*": {"input": 10.0, "output": 50.0},
    "claude-fable-5-2*": {"input": 8.0, "output": 40.0, "cache_read": 0.2},
    "claude-mythos-5-2*": {"input": 8.0, "output": 40.0, "cache_read": 0.2},
    "claude-opus-4-5*": {"input": 5.0, "output": 25.0, "cache_read": 0.5, "cache_write": 6.25},
    "claude-opus-4-6*": {"input": 5.0, "output": 25.0, "cache_read": 0.5, "cache_write": 6.25},
    "claude-opus-4-7*": {"input": 5.0, "output": 25.0, "cache_read": 0.5, "cache_write": 6.25},
    "claude-opus-4-1*": {"input": 15.0, "output": 75.0, "cache_read": 1.5, "cache_write": 18.75},
    "claude-opus-4-2025*": {"input": 15.0, "output": 75.0, "cache_read": 1.5,
                            "cache_write": 18.75},
    "claude-sonnet-4*": {"input": 3.0, "output": 15.0, "cache_read": 0.3, "cache_write": 3.75},
    "claude-haiku-4-5*": {"input": 1.0, "output": 5.0, "cache_read": 0.1, "cache_write": 1.25},
    "gemini-3*-pro*": {"input": 2.0, "output": 12.0, "cache_read": 0.2},
    "gemini-3-flash*": {"input": 0.5, "output": 3.0, "cache_read": 0.05},
    "gemini-3.8-flash*": {"input": 0.75, "output": 3.75, "cache_read": 0.075},
    "gemini-3.6-flash*": {"input": 1.5, "output": 7.5},
    "gemini-3.5-flash-lite*": {"input": 0.3, "output": 2.5},
    "gemini-2.5-pro*": {"input": 1.25, "output": 10.0, "cache_read": 0.125},
    "gemini-2.5-flash*": {"input": 0.3, "output": 2.5, "cache_read": 0.03},
    "gemini-2.5-flash-lite*": {"input": 0.1, "output": 0.4, "cache_read": 0.01},
}


class PriceBook:
    """Model name -> price entry: the user's patterns first, then the built-in ones; among the
    patterns of one source that match, the longest (the most specific) wins. A name with a
    vendor prefix ("anthropic/claude-...") is looked up without it when it matches nothing."""

    def __init__(self, user: dict[str, dict[str, float]]):
        self.sources = [sorted(src.items(), key=lambda kv: -len(kv[0]))
                        for src in (user, BUILTIN_PRICES)]
        self._cache: dict[str, dict[str, float] | None] = {}

    def lookup(self, model: str) -> dict[str, float] | None:
        key = model.lower()
        if key not in self._cache:
            found = None
            for name in dict.fromkeys((model, model.rpartition("/")[2])):
                for src in self.sources:
                    found = next((e for p, e in src if name_matches(p, name)), None)
                    if found is not None:
                        break
                if found is not None:
                    break
            if len(self._cache) >= USAGE_REPORT_GROUPS:
                self._cache.clear()
            self._cache[key] = found
        return self._cache[key]


def usage_cost(price: dict[str, float] | None, usage: dict[str, int]) -> float | None:
    """USD for one request's usage (keys USAGE_KEYS, "input" the whole prompt): fresh input,
    cache reads and cache writes each at their price (input's when they have none), output
    (reasoning included) at the output price."""
    if price is None:
        return None
    inp = price.get("input", 0.0)
    fresh = max(0, usage["input"] - usage["cache_read"] - usage["cache_write"])
    return (fresh * inp + usage["cache_read"] * price.get("cache_read", inp)
            + usage["cache_write"] * price.get("cache_write", inp)
            + usage["output"] * price.get("output", 0.0)) / 1e6


USAGE_COLUMNS = ("time", "day", "token_id", "token", "dialect", "route", "model",
                 "upstream_model", "channel", "key_index", "status", "error_class", "stream",
                 "latency_ms", "ttfb_ms", "input_tokens", "output_tokens", "cache_read_tokens",
                 "cache_write_tokens", "reasoning_tokens", "cost", "cost_estimated")
_SUMS = ("requests", "errors", "input_tokens", "output_tokens", "cache_read_tokens",
         "cache_write_tokens", "reasoning_tokens", "cost", "estimated")
# Each step brings the schema from version i to i + 1; a file of a newer version is refused.
USAGE_MIGRATIONS = (
    """CREATE TABLE requests (id INTEGER PRIMARY KEY, time REAL NOT NULL, day INTEGER NOT NULL,
        token_id INTEGER NOT NULL, token TEXT NOT NULL, dialect TEXT, route TEXT,
        model TEXT NOT NULL, upstream_model TEXT, channel TEXT NOT NULL, key_index INTEGER,
        status INTEGER, error_class TEXT, stream INTEGER, latency_ms REAL, ttfb_ms REAL,
        input_tokens INTEGER, output_tokens INTEGER, cache_read_tokens INTEGER,
        cache_write_tokens INTEGER, reasoning_tokens INTEGER, cost REAL,
        cost_estimated INTEGER);
    CREATE INDEX requests_time ON requests (time);
    CREATE TABLE daily (day INTEGER NOT NULL, token_id INTEGER NOT NULL, token TEXT NOT NULL,
        model TEXT NOT NULL, channel TEXT NOT NULL, requests INTEGER NOT NULL,
        errors INTEGER NOT NULL, input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL,
        cache_read_tokens INTEGER NOT NULL, cache_write_tokens INTEGER NOT NULL,
        reasoning_tokens INTEGER NOT NULL, cost REAL NOT NULL, estimated INTEGER NOT NULL,
        PRIMARY KEY (day, token_id, model, channel)) WITHOUT ROWID;""",
)
_DAILY_UPSERT = (
    f"INSERT INTO daily (day, token_id, model, channel, token, {', '.join(_SUMS)}) "
    f"VALUES ({', '.join('?' * (5 + len(_SUMS)))}) "
    f"ON CONFLICT (day, token_id, model, channel) DO UPDATE SET token = excluded.token, "
    + ", ".join(f"{c} = {c} + excluded.{c}" for c in _SUMS))


def open_usage_db(path: str) -> sqlite3.Connection:
    """The usage database, created or migrated to the current schema (WAL mode)."""
    conn = sqlite3.connect(path, timeout=10, isolation_level=None, check_same_thread=False)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")    # WAL: durable to the last checkpoint
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = conn.execute("SELECT version FROM schema_version").fetchone()
        version = row[0] if row else 0
        if version > len(USAGE_MIGRATIONS):
            raise ConfigError(f"{path} was written by a newer aigateway (usage schema "
                              f"{version}); upgrade, or set settings.usage_db to another file")
        for step in range(version, len(USAGE_MIGRATIONS)):
            conn.execute("BEGIN IMMEDIATE")
            for statement in USAGE_MIGRATIONS[step].split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute("DELETE FROM schema_version")
            conn.execute("INSERT INTO schema_version VALUES (?)", (step + 1,))
            conn.execute("COMMIT")
    except sqlite3.Error as exc:
        conn.close()
        raise ConfigError(f"cannot use the usage database {path}: {exc}; fix or delete it, or "
                          f"set settings.usage_db to another file (\"\" turns history off)") \
            from None
    return conn


def utc_day(t: float) -> int:
    return int(t // 86400)


def day_text(day: int) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(day * 86400))


def month_start(t: float) -> float:
    g = time.gmtime(t)
    return datetime.datetime(g.tm_year, g.tm_mon, 1, tzinfo=datetime.timezone.utc).timestamp()


def next_month(t: float) -> float:
    g = time.gmtime(t)
    y, m = (g.tm_year + 1, 1) if g.tm_mon == 12 else (g.tm_year, g.tm_mon + 1)
    return datetime.datetime(y, m, 1, tzinfo=datetime.timezone.utc).timestamp()


def parse_since(text: str, now: float) -> int:
    """The first UTC day of "7d" (today and the 6 before), "YYYY-MM-DD", or raises ValueError."""
    text = (text or "").strip()
    if is_digits(text[:-1]) and text.endswith("d") and 0 < int(text[:-1]) <= 100_000:
        return utc_day(now) - int(text[:-1]) + 1
    if len(text) == 10:
        when = parse_utc(text)
        if when is not None:
            return utc_day(when)
    raise ValueError(f"since={text[:40]!r} is not a period: write 7d, 30d or a date such as "
                     f"2026-11-01")


USAGE_GROUPS = {"model": "model", "channel": "channel", "token": "token", "day": "day"}


def usage_report(conn: sqlite3.Connection, since_day: int, by: str,
                 token_id: int | None = None) -> list[dict]:
    """Sums from the daily rollup since ``since_day``, one row per model, channel, token or
    day (days oldest first, others costliest first), with the cache-hit rate:
    cache_read / (input + cache_read), input here being the fresh part of the prompt."""
    col = USAGE_GROUPS[by]
    where, args = "day >= ?", [since_day]
    if token_id is not None:
        where, args = where + " AND token_id = ?", args + [token_id]
    order = "day" if by == "day" else "cost DESC, requests DESC"
    rows = conn.execute(
        f"SELECT {col}, {', '.join(f'SUM({c}) AS {c}' for c in _SUMS)} FROM daily "
        f"WHERE {where} "
        f"GROUP BY {col} ORDER BY {order} LIMIT {USAGE_REPORT_GROUPS}", args).fetchall()
    out = []
    for key, *sums in rows:
        row = dict(zip(_SUMS, sums))
        row["cost"] = round(row["cost"], 6)
        row["cost_estimated"] = bool(row.pop("estimated"))
        fresh = row["input_tokens"] - row["cache_read_tokens"] - row["cache_write_tokens"]
        seen = max(0, fresh) + row["cache_read_tokens"]
        row["cache_hit_rate"] = round(row["cache_read_tokens"] / seen, 4) if seen else 0.0
        out.append(dict({by: day_text(key) if by == "day" else key}, **row))
    return out


def usage_totals(rows: list[dict]) -> dict:
    total = {k: sum(r[k] for r in rows) for k in _SUMS if k != "estimated"}
    total["cost"] = round(total["cost"], 6)
    total["cost_estimated"] = any(r["cost_estimated"] for r in rows)
    fresh = max(0, total["input_tokens"] - total["cache_read_tokens"]
                - total["cache_write_tokens"])
    seen = fresh + total["cache_read_tokens"]
    total["cache_hit_rate"] = round(total["cache_read_tokens"] / seen, 4) if seen else 0.0
    return total


def token_spend(conn: sqlite3.Connection, now: float) -> dict[int, dict[str, float]]:
    """Each token's use that its limits count: requests, tokens and cost of today (UTC), cost of
    this UTC month and tokens of the last minute."""
    today, first = utc_day(now), utc_day(month_start(now))
    out: dict[int, dict[str, float]] = {}
    for tid, day, reqs, toks, cost in conn.execute(
            "SELECT token_id, day, SUM(requests), SUM(input_tokens + output_tokens), SUM(cost) "
            "FROM daily WHERE day >= ? GROUP BY token_id, day", (min(today, first),)):
        spend = out.setdefault(tid, dict.fromkeys(LIMIT_KINDS, 0))
        spend["cost_per_month"] += cost
        if day == today:
            spend["requests_per_day"], spend["tokens_per_day"], spend["cost_per_day"] = \
                reqs, toks, cost
    for tid, toks in conn.execute(
            "SELECT token_id, SUM(input_tokens + output_tokens) FROM requests WHERE time > ? "
            "GROUP BY token_id", (now - USAGE_TPM_WINDOW,)):
        out.setdefault(tid, dict.fromkeys(LIMIT_KINDS, 0))["tpm"] = toks
    return out


def error_class(rec: dict) -> str:
    """A short name for why a request failed, or "" when it did not."""
    status = rec["status"] or 0
    if status == 0 or (status < 400 and rec["error"]):
        return "client_disconnected" if rec["error"] == "client disconnected" else \
            "stream_broken" if rec["error"] else "no_answer"
    if status < 400:
        return ""
    if status == 429:
        return "rate_limited"
    if status in (401, 403):
        return "refused"
    if status >= 500:
        return "upstream" if rec["failures"] else "gateway"
    return "bad_request"


class TpmWindow:
    """One token's requests of the last USAGE_TPM_WINDOW seconds, (time, tokens) oldest first,
    at most USAGE_TPM_EVENTS of them (the oldest go first), with their token total kept as they
    come and go: a token's tpm is read with every request it makes, without a pass over them."""

    __slots__ = ("events", "total")

    def __init__(self) -> None:
        self.events: collections.deque[tuple[float, int]] = collections.deque()
        self.total = 0

    def add(self, t: float, tokens: int) -> None:
        events = self.events
        if len(events) >= USAGE_TPM_EVENTS:
            self.total -= events.popleft()[1]
        events.append((t, tokens))
        self.total += tokens

    def tokens(self, now: float) -> int:
        """The tokens of the requests made after ``now - USAGE_TPM_WINDOW``."""
        events, cut = self.events, now - USAGE_TPM_WINDOW
        while events and events[0][0] <= cut:
            self.total -= events.popleft()[1]
        return self.total


class UsageStore:
    """Usage rows to ``path`` (None: counters only, no history) by one writer thread, and the
    per-token counters the limits are checked against. ``record`` runs on the server loop and
    never blocks; ``clock`` is the wall clock (UTC days and months)."""

    def __init__(self, path: str | None, *, prices: dict, retention_days: int,
                 clock: Callable[[], float] = time.time,
                 on_error: Callable[[str], None] = lambda text: None):
        self.path, self.clock, self.on_error = path, clock, on_error
        self.retention_days = retention_days
        self.prices = PriceBook(prices)
        self.dropped = 0                     # rows refused because the queue was full
        self.write_errors = 0
        self.written = 0
        self._rows: collections.deque[tuple] = collections.deque()     # appends are atomic
        self._wake = threading.Event()
        self._closing = False
        self._spend: dict[int, dict[str, float]] = {}
        self._recent: dict[int, TpmWindow] = {}
        now = clock()
        self._day, self._month = utc_day(now), month_start(now)
        self._thread: threading.Thread | None = None
        if path is not None:
            conn = open_usage_db(path)
            try:
                self._spend = token_spend(conn, now)
                for tid, t, toks in conn.execute(
                        "SELECT token_id, time, input_tokens + output_tokens FROM requests "
                        "WHERE time > ? ORDER BY time", (now - USAGE_TPM_WINDOW,)):
                    self._recent.setdefault(tid, TpmWindow()).add(t, toks)
            finally:
                conn.close()
            self._thread = threading.Thread(target=self._writer, name="usage-writer",
                                            daemon=True)
            self._thread.start()

    # -- on the server loop ----------------------------------------------------------------------

    def record(self, rec: dict, token_id: int | None, upstream_model: str | None) -> None:
        """Note one finished request (a record of Gateway._finish that names a model)."""
        now = self.clock()
        usage = {"input": rec["input_tokens"] or 0, "output": rec["output_tokens"] or 0,
                 "cache_read": rec.get("cache_read_tokens") or 0,
                 "cache_write": rec.get("cache_write_tokens") or 0,
                 "reasoning": rec.get("reasoning_tokens") or 0}
        estimated = rec["input_tokens"] is None and rec["output_tokens"] is None
        if estimated:
            if (rec["status"] or 500) < 400:
                usage["input"] = rec["bytes_in"] // ESTIMATE_BYTES_PER_TOKEN
                usage["output"] = rec["bytes_out"] // ESTIMATE_BYTES_PER_TOKEN
            else:
                estimated = False            # refused: nothing to pay
        cost = usage_cost(self.prices.lookup(upstream_model or rec["model"]), usage) or 0.0
        rec["cost"], rec["cost_estimated"] = round(cost, 8), estimated
        tid = token_id or 0
        self._count(tid, usage["input"] + usage["output"], cost, now)
        if self._thread is None:
            return
        row = (now, utc_day(now), tid, rec["token"] or "", rec.get("dialect"), rec["route"],
               rec["model"], upstream_model, rec["channel"] or "", rec.get("key_index"),
               rec["status"], error_class(rec), int(bool(rec["stream"])), rec["latency_ms"],
               rec["ttfb_ms"], usage["input"], usage["output"], usage["cache_read"],
               usage["cache_write"], usage["reasoning"], cost, int(estimated))
        if len(self._rows) >= USAGE_QUEUE_LIMIT:
            self.dropped += 1
            return
        self._rows.append(row)
        if len(self._rows) >= USAGE_BATCH_ROWS:
            self._wake.set()

    def _roll(self, now: float) -> None:
        day = utc_day(now)
        if day != self._day:
            self._day = day
            for spend in self._spend.values():
                spend["requests_per_day"] = spend["tokens_per_day"] = spend["cost_per_day"] = 0
            if month_start(now) != self._month:
                self._month = month_start(now)
                for spend in self._spend.values():
                    spend["cost_per_month"] = 0

    def _count(self, tid: int, tokens: int, cost: float, now: float) -> None:
        self._roll(now)
        spend = self._spend.get(tid)
        if spend is None:
            spend = self._spend[tid] = dict.fromkeys(LIMIT_KINDS, 0)
        spend["requests_per_day"] += 1
        spend["tokens_per_day"] += tokens
        spend["cost_per_day"] += cost
        spend["cost_per_month"] += cost
        recent = self._recent.get(tid)
        if recent is None:
            recent = self._recent[tid] = TpmWindow()
        recent.add(now, tokens)

    def spend(self, tid: int) -> dict[str, float]:
        """A token's use as its limits count it, now."""
        now = self.clock()
        self._roll(now)
        out = dict(self._spend.get(tid) or dict.fromkeys(LIMIT_KINDS, 0))
        recent = self._recent.get(tid)
        out["tpm"] = recent.tokens(now) if recent is not None else 0
        return out

    def check(self, token: Any, spending: bool = True) -> None:
        """Raise 401 for an expired token and, for a request that spends (not a listing),
        429 for one past a limit (the message names the limit, the use and when it resets;
        Retry-After says it in seconds)."""
        now = self.clock()
        if token.expires is not None and now >= token.expires:
            raise GatewayError(401, f"gateway token '{token.name}' expired at "
                                    f"{_utc_text(token.expires)}; ask for a new one or move "
                                    f"its expires_at", code="token_expired")
        if not token.limits or not spending:
            return
        spend = self.spend(token.id)
        for kind in LIMIT_KINDS:
            limit = token.limits.get(kind)
            if not limit or spend[kind] < limit:
                continue
            if kind == "tpm":
                recent = self._recent[token.id].events
                total, reset = spend[kind], now + USAGE_TPM_WINDOW
                for t, toks in recent:       # oldest first: when enough of them have aged out
                    total -= toks
                    if total < limit:
                        reset = t + USAGE_TPM_WINDOW
                        break
            elif kind == "cost_per_month":
                reset = next_month(now)
            else:
                reset = (utc_day(now) + 1) * 86400.0
            used = f"${spend[kind]:.4f} of ${limit:g}" if kind.startswith("cost") else \
                f"{int(spend[kind])} of {limit}"
            period = {"tpm": "in the last minute", "cost_per_month": "this month (UTC)"}.get(
                kind, "today (UTC)")
            wait = max(1, int(-(-(reset - now) // 1)))
            raise GatewayError(429, f"gateway token '{token.name}' reached its {kind} limit: "
                                    f"{used} used {period}; it resets at {_utc_text(reset)} "
                                    f"(in {wait} s)",
                               code="insufficient_quota" if kind.startswith("cost") else
                               "rate_limit_exceeded", headers=[("Retry-After", str(wait))])

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, then stop the writer."""
        if self._thread is not None:
            self._closing = True
            self._wake.set()
            self._thread.join(timeout)
            self._thread = None

    # -- on the writer thread --------------------------------------------------------------------

    def _writer(self) -> None:
        try:
            conn = open_usage_db(self.path or "")
        except ConfigError as exc:
            self.write_errors += 1
            self.on_error(str(exc))
            return
        pruned = 0.0
        try:
            while True:
                if self.clock() - pruned > USAGE_PRUNE_SECONDS:
                    pruned = self.clock()
                    self._prune(conn, pruned)
                self._wake.wait(USAGE_FLUSH_SECONDS)
                self._wake.clear()
                closing = self._closing              # read before the last drain
                while self._rows:
                    batch = []
                    while self._rows and len(batch) < USAGE_BATCH_ROWS:
                        batch.append(self._rows.popleft())
                    self._write(conn, batch)
                if closing:
                    return
        finally:
            conn.close()

    def _write(self, conn: sqlite3.Connection, batch: list[tuple]) -> None:
        daily: dict[tuple, list] = {}
        for r in batch:
            key = (r[1], r[2], r[6], r[8])                   # day, token_id, model, channel
            sums = daily.get(key)
            if sums is None:
                sums = daily[key] = [r[3]] + [0] * len(_SUMS)
            sums[1] += 1
            sums[2] += 1 if r[11] else 0
            for i, col in enumerate(range(15, 21)):          # tokens and cost
                sums[3 + i] += r[col] or 0
            sums[9] |= r[21]
        try:
            conn.execute("BEGIN")
            conn.executemany(f"INSERT INTO requests ({', '.join(USAGE_COLUMNS)}) VALUES "
                             f"({', '.join('?' * len(USAGE_COLUMNS))})", batch)
            conn.executemany(_DAILY_UPSERT, [k + tuple(v) for k, v in daily.items()])
            conn.execute("COMMIT")
            self.written += len(batch)
        except sqlite3.Error as exc:
            self.write_errors += 1
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            self.on_error(f"usage database {self.path}: {len(batch)} rows not written ({exc})")

    def _prune(self, conn: sqlite3.Connection, now: float) -> None:
        cutoff = utc_day(now) - self.retention_days
        try:
            conn.execute("DELETE FROM requests WHERE time < ?", (cutoff * 86400.0,))
            conn.execute("DELETE FROM daily WHERE day < ?", (cutoff,))
        except sqlite3.Error as exc:
            self.on_error(f"usage database {self.path}: old rows not pruned ({exc})")


def _utc_text(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


USAGE_KEYS = ("input", "output", "cache_read", "cache_write", "reasoning")   # new_usage's keys


def note_usage(rec: Any, usage: dict | None) -> None:
    """Put an answer's token usage (keys USAGE_KEYS) on a request record."""
    if usage:
        for k in USAGE_KEYS:
            rec[f"{k}_tokens"] = usage.get(k) or 0


class Exchange(dict):
    """One request's state while the gateway serves it: the logged fields themselves (a dict:
    Gateway.records, the request log, the GUI; see _new_record), with the timing and the
    concurrency slot it holds as attributes, which are not logged. A dict subclass, so that
    the ~30 reads and writes of a request's fields are the dict's own, not Python calls."""

    __slots__ = ("t0", "slot", "finished")

    def __init__(self, record: dict, t0: float):
        super().__init__(record)
        self.t0 = t0                             # perf_counter when the request came in
        self.slot: ChannelHealth | None = None   # whose max_concurrency slot it holds
        self.finished = False                    # recorded (at most once)


class Limits:
    """Each channel's health (cooldowns after failures, concurrency slots), its keys' turns and
    rest, and each token's requests-per-minute window, all read on the gateway's ``clock``."""

    def __init__(self, clock: Callable[[], float], log: Callable[[str], None]):
        self.clock, self.log = clock, log
        self.health: dict[int, ChannelHealth] = {}
        self._key_turn: dict[int, int] = {}
        self._key_bench: dict[tuple[int, str], float] = {}
        self._rpm: dict[int, collections.deque[float]] = {}

    def health_of(self, ch: Channel) -> ChannelHealth:
        h = self.health.get(ch.id)
        if h is None:
            h = self.health[ch.id] = ChannelHealth()
        return h

    def failed(self, ch: Channel, exc: UpstreamError) -> bool:
        """Note a failure; True when the channel starts to cool down."""
        if exc.code == "concurrency_limit":            # busy by our own limit, not unhealthy
            return False
        return self.health_of(ch).failed(exc, self.clock())

    def pick_key(self, ch: Channel, tried: set[str], prefer: int | None = None) -> str:
        """The channel's next key in turn that is neither benched nor already tried (the key
        ``prefer`` first: the one a session is pinned to)."""
        keys = ch.keys
        if len(keys) <= 1:
            return keys[0] if keys else ""
        now = self.clock()
        turn = self._key_turn.get(ch.id, 0)
        self._key_turn[ch.id] = turn + 1
        if prefer is not None and prefer < len(keys):
            turn = prefer
        order = [keys[(turn + i) % len(keys)] for i in range(len(keys))]
        fresh = [k for k in order if k not in tried]
        rested = [k for k in fresh if self._key_bench.get((ch.id, k), 0) <= now]
        if rested:
            return rested[0]
        return min(fresh or order, key=lambda k: self._key_bench.get((ch.id, k), 0))

    def bench_key(self, ch: Channel, key: str, exc: UpstreamError) -> None:
        wait = retry_after_seconds(exc.headers) or KEY_BENCH_SECONDS
        self._key_bench[(ch.id, key)] = self.clock() + wait
        self.log(f"channel '{ch.name}': key {mask_secret(key)} rests {wait:.0f} s after "
                 f"{exc.upstream_status}")

    async def acquire_slot(self, ch: Channel, rec: Exchange) -> None:
        """Take one of the channel's max_concurrency slots, waiting in a bounded queue; a full
        queue is this channel's failure (the next candidate is tried, else 429)."""
        if not ch.max_concurrency:
            return
        h = self.health_of(ch)
        while h.inflight >= ch.max_concurrency:
            if h.waiting >= ch.max_concurrency * QUEUE_PER_SLOT:
                raise UpstreamError(429, f"channel '{ch.name}' is at its concurrency limit "
                                         f"({ch.max_concurrency}) with a full queue",
                                    retryable=True, code="concurrency_limit",
                                    headers=[("Retry-After", "1")])
            if h.slots is None:
                h.slots = asyncio.Event()
            h.waiting += 1
            try:
                h.slots.clear()
                await h.slots.wait()
            finally:
                h.waiting -= 1
        h.inflight += 1
        rec.slot = h

    @staticmethod
    def release_slot(rec: Exchange) -> None:
        h, rec.slot = rec.slot, None
        if h is not None:
            h.inflight -= 1
            if h.slots is not None:
                h.slots.set()

    def check_rpm(self, token: Token | None) -> None:
        if token is None or not token.rpm:
            return
        now = self.clock()
        window = self._rpm.setdefault(token.id, collections.deque())
        while window and window[0] <= now - 60:
            window.popleft()
        if len(window) >= token.rpm:
            wait = max(1, int(window[0] + 60 - now) + 1)
            raise GatewayError(429, f"gateway token '{token.name}' is over its limit of "
                                    f"{token.rpm} requests per minute; retry in {wait} s",
                               code="rate_limit_exceeded", headers=[("Retry-After", str(wait))])
        window.append(now)

    def ready(self, ordered: list[Channel], rec: Exchange | None = None) -> list[Channel]:
        """``ordered`` without the channels cooling down (the first one whose cooldown is over
        becomes the probe); all of them when every one is cooling down."""
        now = self.clock()
        ready = []
        for ch in ordered:
            h = self.health.get(ch.id)
            if h is None or (h.until <= now and not h.probing):
                if h is not None and h.until:        # cooldown over: this one is the probe
                    h.probing, h.until = True, 0.0
                ready.append(ch)
        if rec is not None and ready:
            rec["skipped"] = [ch.name for ch in ordered if ch not in ready]
        # When every candidate is cooling down, try them anyway: an answer beats a refusal.
        return ready or ordered

    def report(self, channels: list[Channel]) -> list[dict]:
        now = self.clock()
        out = []
        for ch in channels:
            h = self.health.get(ch.id)
            entry = {"id": ch.id, "name": ch.name, "type": ch.type, "enabled": ch.enabled}
            entry.update(h.snapshot(now) if h else ChannelHealth().snapshot(now))
            if len(ch.keys) > 1:
                entry["keys"] = len(ch.keys)
                entry["keys_resting"] = sum(1 for k in ch.keys
                                            if self._key_bench.get((ch.id, k), 0) > now)
            out.append(entry)
        return out


class Router:
    """Which channels may serve a request, in the order to try them: enabled, serving the model,
    allowed for the token, reaching the route's dialect (as is or by conversion), by priority,
    equal priorities taking turns."""

    def __init__(self):
        self._scores: dict[tuple, dict] = {}     # weighted-turn scores (weighted_order)
        self._cached_for: list[Channel] | None = None
        self._cache: dict[tuple, list[tuple[int, list[Channel]]]] = {}

    def turns(self, key: tuple) -> dict:
        """The weighted-turn scores kept for ``key``, at most WEIGHT_STATES_MAX of them."""
        turns = self._scores.get(key)
        if turns is None:
            make_room(self._scores, WEIGHT_STATES_MAX)
            turns = self._scores[key] = {}
        return turns

    def order(self, channels: list[Channel], model: str, route: Route, token: Token | None
              ) -> list[Channel]:
        # The groups depend only on the configuration and the request's model, route and
        # token: worked out once each and kept (ROUTER_CACHE_MAX of them, for the same
        # configuration: a new one's channels list starts a new cache); only the turns of a
        # group of several are taken per request.
        if channels is not self._cached_for:
            self._cached_for, self._cache = channels, {}
        key = (model, route.dialect, route.reach, token.id if token is not None else None)
        groups = self._cache.get(key)
        if groups is None:
            groups = self._groups(channels, model, route, token)
            make_room(self._cache, ROUTER_CACHE_MAX)
            self._cache[key] = groups
        ordered: list[Channel] = []
        for prio, members in groups:
            if len(members) > 1:
                members = weighted_order(members, [ch.weight for ch in members],
                                         self.turns((model.lower(), prio)))
            ordered += members
        return ordered

    def _groups(self, channels: list[Channel], model: str, route: Route, token: Token | None
                ) -> list[tuple[int, list[Channel]]]:
        """The channels that may serve ``model`` on ``route`` for ``token``, by priority in
        groups of equal priority; the refusal when there are none."""
        serving = [ch for ch in channels if ch.enabled and ch.serves(model)]
        if not serving:
            # A new install's first request: say what to do, not only what is missing.
            hint = "" if channels else (
                ": no channel is configured yet; add one in the window's Channels tab, with "
                "'python aigateway.py channels add --name NAME --type TYPE --api-key -', or in "
                "config.json (see config.example.json)")
            raise GatewayError(404, f"model '{model}' is not served by any enabled channel"
                                    f"{hint}", code="model_not_found", param="model")
        if token is not None:
            serving = [ch for ch in serving if token.may_use_channel(ch)]
            if not serving:
                raise GatewayError(403, f"gateway token '{token.name}' may not use the channels "
                                        f"that serve '{model}'")
        reach = PASSTHROUGH_TYPES[route.dialect] + route.reach
        usable = [ch for ch in serving if ch.type in reach]
        if not usable:
            kinds = ", ".join(sorted({f"{ch.type} channel '{ch.name}'" for ch in serving}))
            raise GatewayError(501, f"model '{model}' is served by {kinds}; {route.path} "
                                    f"reaches only {', '.join(dict.fromkeys(reach))} channels",
                               code="conversion_not_available")
        return [(prio, list(group)) for prio, group in itertools.groupby(
            sorted(usable, key=lambda c: c.priority), key=lambda c: c.priority)]


class Access:
    """Who may call: the Host (DNS rebinding), the browser Origin, the body's type and the
    gateway token (with the failed-token throttle, on the gateway's ``clock``); and the CORS
    headers an allowed page gets."""

    def __init__(self, clock: Callable[[], float], listen_host: str | None):
        self.clock = clock
        self.listen_host = listen_host           # when it differs from settings.host (--host)
        self.throttle = AuthThrottle()

    def configure(self, s: dict, tokens: list[Token]) -> None:
        self.require_auth: bool = s["require_auth"]
        self.tokens = tokens
        self.cors = {o.rstrip("/").lower() for o in s["cors_origins"]}
        self.allowed_hosts = [host_name(h) for h in s["allowed_hosts"]]
        binds = {host_name(h) for h in (s["host"], self.listen_host) if h}
        self.any_host_ip = bool(binds & {"0.0.0.0", "::", ""})
        if self.any_host_ip:                     # listening on every address of the machine
            name = socket.gethostname().lower()
            short = name.partition(".")[0]
            binds |= {name, short, f"{short}.local"}
        self.host_names = binds

    def cors_headers(self, headers: Headers) -> list[tuple[str, str]]:
        origin = headers.get("origin")
        if not origin or not self.origin_allowed(origin):
            return []
        return [("Access-Control-Allow-Origin", "*" if "*" in self.cors else origin),
                ("Vary", "Origin"),
                ("Access-Control-Expose-Headers", "request-id, x-request-id, retry-after")]

    def check_host(self, req: Request) -> None:
        """Refuse a Host that is not this gateway's: a DNS-rebinding page reaches the loopback
        port under its own name, and that name is what its requests carry."""
        values = req.headers.get_all("host")
        if len(values) > 1:                      # RFC 9112 section 3.2: answer 400
            raise GatewayError(400, "the request has more than one Host header")
        if not values:
            if req.version == "HTTP/1.0":
                return
            raise GatewayError(400, "the request has no Host header (HTTP/1.1 requires one)")
        name = host_name(values[0])
        if is_local_name(name) or name in self.host_names or \
                (self.any_host_ip and is_ip_literal(name)) or \
                any(name_matches(p, name) for p in self.allowed_hosts):
            return
        raise GatewayError(403, f"Host {name[:100]!r} is not one of this gateway's names "
                                f"(protection against DNS rebinding); to reach the gateway under "
                                f"that name add it to settings.allowed_hosts",
                           code="host_not_allowed")

    def origin_allowed(self, origin: str) -> bool:
        return origin_is_local(origin) or "*" in self.cors or \
            origin.rstrip("/").lower() in self.cors

    def check_origin(self, req: Request) -> None:
        """Refuse a browser page of another site: its request carries an Origin (every
        cross-origin request and every POST does) or, without one, Sec-Fetch-Site: cross-site.
        Content types do not matter: a "simple" text/plain POST needs no preflight."""
        origin = req.headers.get("origin")
        if origin is not None:
            if not self.origin_allowed(origin):
                raise GatewayError(403, f"requests from the web page origin {origin[:100]!r} are "
                                        f"refused; to let that page use the gateway add the "
                                        f"origin to settings.cors_origins",
                                   code="origin_not_allowed")
        elif (req.headers.get("sec-fetch-site") or "").lower() == "cross-site" and \
                "*" not in self.cors:
            raise GatewayError(403, "cross-site requests from web pages are refused; to allow "
                                    "them set settings.cors_origins to [\"*\"]",
                               code="origin_not_allowed")

    @staticmethod
    def check_content_type(req: Request, route: Route) -> None:
        """JSON routes take application/json (an absent Content-Type too: scripts often leave it
        out, and a browser page that can leave it out sends an Origin); the transcription route
        takes multipart/form-data. A form or text/plain body is what a cross-site page can send
        without a preflight, so it never reaches an upstream."""
        if route.body == "none" or req.method != "POST":
            return
        want = "multipart/form-data" if route.body == "multipart" else "application/json"
        content_type = req.headers.get("content-type")
        if content_type is None and route.body == "json":
            return
        if (content_type or "").partition(";")[0].strip().lower() != want:
            raise GatewayError(415, f"{route.path} takes Content-Type: {want}, not "
                                    f"{(content_type or 'none')[:100]!r}",
                               code="unsupported_media_type")

    def preflight(self, req: Request) -> Response:
        route, _ = find_route(req.path)
        allow = ", ".join((route.methods if route else ("GET", "POST")) + ("OPTIONS",))
        hdrs = [("Allow", allow)]
        cors = self.cors_headers(req.headers)
        if cors:
            hdrs += cors + [
                ("Access-Control-Allow-Methods", allow),
                ("Access-Control-Allow-Headers",
                 req.headers.get("access-control-request-headers") or
                 "authorization, content-type, x-api-key, x-goog-api-key, anthropic-version, "
                 "anthropic-beta"),
                ("Access-Control-Max-Age", "600")]
        return Response(204, hdrs)

    def authenticate(self, req: Request) -> Token | None:
        if not self.require_auth:
            return None
        wait = self.throttle.blocked_for(req.address, self.clock())
        if wait:
            secs = str(int(-(-wait // 1)))
            raise GatewayError(429, f"too many wrong gateway tokens from {req.address}; retry in "
                                    f"{secs} s", code="rate_limit_exceeded",
                               headers=[("Retry-After", secs)])
        presented = request_token(req)
        found = None
        if presented is not None:
            key = presented.encode()
            for tok in self.tokens:              # compare with every token: no early exit
                if hmac.compare_digest(tok.key, key):
                    found = tok
        if presented is None:
            raise GatewayError(401, f"missing gateway token: {TOKEN_PLACES}")
        if found is None:
            self.throttle.failed(req.address, self.clock())
            raise GatewayError(401, f"invalid gateway token: {TOKEN_PLACES}",
                               code="invalid_api_key")
        if not found.enabled:
            raise GatewayError(401, f"gateway token '{found.name}' is disabled",
                               code="invalid_api_key")
        return found


@dataclass(slots=True)
class Job:
    """One routed request as the Relay serves it: what the Gateway parsed and decided (model,
    body, session pin, whether to hold for content), and what the relay builds from the body
    once and reuses on every channel (the IR, the texts to embed, images fetched inline)."""

    req: Request
    route: Route
    dialect: str
    rec: Exchange
    model: str
    obj: dict | None                         # the parsed JSON body (None for a form)
    stream: bool
    scope: tuple | None                      # affinity scope and its pin (Gateway._session)
    pin: tuple | None
    foreign: bool                            # a chat body only the converter understands
    hold: bool                               # a blank answer is the channel's failure
    inlined: dict[str, dict]                 # by channel type: ir with image URLs fetched
    ir: IRRequest | None = None              # the client's request in IR, once converted
    texts: list[str] | None = None           # what an embeddings request embeds
    dims: Any = None


@dataclass(slots=True)
class Attempt:
    """One try of one channel with one key: the upstream request and how its answer is read
    (``answer``: "passthrough", "embeddings", "converted", or "local" for a token count
    estimated here and never sent)."""

    base: Channel                            # as routed (its keys, health, affinity id)
    ch: Channel                              # with the key of this try
    answer: str
    method: str
    url: str
    headers: list[tuple[str, str]]
    body: bytes


class Relay:
    """The relay job of the Gateway: for each channel in the routed order and each of its keys,
    build the upstream request (passed through, converted or embeddings), send it, answer the
    client from the first that serves, and count the others' failures (Limits) for fallback.
    ``finish`` records an Exchange; ``on_health`` tells that a channel started to cool down."""

    def __init__(self, client: UpstreamClient, fetcher: UrlFetcher, limits: Limits,
                 affinity: Affinity, capture: DebugCapture, access: Access, *,
                 log: Callable[[str], None], finish: Callable[[Exchange], None],
                 on_health: Callable[[], None]):
        self.client, self.fetcher, self.limits = client, fetcher, limits
        self.affinity, self.capture, self.access = affinity, capture, access
        self.log, self.finish, self.on_health = log, finish, on_health
        self.settings: dict = {}                 # the Gateway's, set by apply_config
        self.creds = CredentialCache(client)     # what channels sign requests with
        self.signatures: dict[str, str] = {}     # Gemini thoughtSignature by tool-call id
        self.thinking: dict[str, list[dict]] = {}   # Claude's signed thinking by tool-call id
        self.learned_caps: dict[tuple, int] = {}     # (channel id, model): output limit
        self.learned_responses: dict[tuple, bool] = {}   # (channel id, model): use Responses

    # -- the fallback loop -----------------------------------------------------------------------

    async def run(self, job: Job, chans: list[Channel]) -> Response:
        """Try ``chans`` in order, each with its keys in turn, until one answers."""
        failures: list[tuple[Channel, UpstreamError]] = []
        for base in chans:
            keys_tried: set[str] = set()
            while True:
                attempt = await self.build(job, base, self._take_key(job, base, keys_tried))
                if attempt.answer == "local":
                    return self._count_locally(job)
                try:
                    up = await self.send(job, attempt)
                    capped = await self._learned_cap(job, attempt, up) or \
                        await self._learned_responses(job, attempt, up)
                    if capped is not None:      # the same try, within the limit or API
                        attempt = await self.build(job, base, capped)
                        up = await self.send(job, attempt)
                    return await self.answer(job, attempt, up)
                except UpstreamError as exc:
                    failures.append((attempt.ch, exc))
                    if not self._failed(job, attempt, exc, keys_tried):
                        break
        raise self._all_failed(failures)

    async def _learned_cap(self, job: Job, at: Attempt, up: UpstreamResponse
                           ) -> Channel | None:
        """For a converted request the upstream refused for a max_tokens above its model's
        output limit (output_limit_in): the channel capped at that limit, to try again once,
        and the limit kept for the channel and model (LEARNED_CAPS_MAX of them), so that the
        next requests are capped from the start. None for any other answer."""
        if up.status != 400 or at.answer != "converted" or job.ir is None:
            return None
        limit = output_limit_in(upstream_error_message(await up.keep_body(MAX_ERROR_BODY),
                                                        400))
        if limit is None or limit < 1 or sent_output_tokens(at.body) <= limit:
            return None                 # (what was sent, thinking's room included, was within)
        self._keep_learned(self.learned_caps, job, at, up, limit,
                           f"takes at most {limit} output tokens (its answer said); asked again "
                           f"with max_tokens {limit}, and so from now on (a max_tokens_cap on "
                           f"the channel keeps it past a restart)")
        return at.ch.with_cap(limit)

    def _keep_learned(self, table: dict, job: Job, at: Attempt, up: UpstreamResponse,
                      value: Any, said: str) -> None:
        """Keep ``value`` for the try's channel and model in ``table`` (LEARNED_CAPS_MAX pairs,
        the oldest dropped), let the refused answer go, and log what was learned."""
        key = (at.base.id, job.rec["upstream_model"])
        table.pop(key, None)
        make_room(table, LEARNED_CAPS_MAX)
        table[key] = value
        up.aclose_nowait()
        self.limits.release_slot(job.rec)
        self.log(f"channel '{at.ch.name}': {job.rec['upstream_model']} {said}")

    async def _learned_responses(self, job: Job, at: Attempt, up: UpstreamResponse
                                 ) -> Channel | None:
        """For a converted Chat Completions request that the upstream refused, telling it to
        use /v1/responses (OpenAI's 400 for function tools with reasoning, RESPONSES_FOR_TOOLS;
        an Azure deployment or an OpenAI-compatible server under another model name): the same
        channel, to try again once on the Responses API, which it then gets for that model from
        the start (LEARNED_CAPS_MAX pairs). None for any other answer."""
        if up.status != 400 or at.answer != "converted" or job.ir is None or \
                not PROVIDERS[at.ch.type].responses_as_is or \
                self.via_responses(at.ch, job.rec["upstream_model"], job.ir):
            return None
        message = upstream_error_message(await up.keep_body(MAX_ERROR_BODY), 400)
        if RESPONSES_PATH not in message:
            return None
        self._keep_learned(self.learned_responses, job, at, up, True,
                           "wants the Responses API (its answer said); asked again there, and "
                           "so from now on (responses_api: true on the channel keeps it past a "
                           "restart)")
        return at.ch

    def via_responses(self, ch: Channel, model: str, ir: dict) -> bool:
        """Whether a converted chat request for upstream ``model`` on ``ch`` goes to the
        Responses API: converts_to_responses, or learned from the upstream's refusal."""
        return converts_to_responses(ch.type, ch.responses_api, model, ir) or \
            (ch.id, model) in self.learned_responses

    def _take_key(self, job: Job, base: Channel, keys_tried: set[str]) -> Channel:
        """``base`` with its next key to try (the session's pinned key first)."""
        ch = base.with_key(self.limits.pick_key(base, keys_tried,
                                                pin_key(job.pin, base, job.model)))
        keys_tried.add(ch.api_key)
        rec = job.rec
        rec["upstream_model"] = ch.upstream_model(job.model)
        rec["key_index"] = base.keys.index(ch.api_key) if ch.api_key in base.keys else 0
        rec["tried"].append(ch.name if len(keys_tried) == 1 else
                            f"{ch.name} (key {len(keys_tried)})")
        return ch

    async def build(self, job: Job, base: Channel, ch: Channel) -> Attempt:
        """The upstream request of one try: the client's own request when the channel speaks
        its dialect, else one the adapters convert (embeddings apart); overrides last."""
        route, model, obj = job.route, job.model, job.obj
        provider = PROVIDERS[ch.type]
        method = "POST"
        if provider.relays(job.dialect, ch.responses_api, job.rec["upstream_model"],
                           route.kind) and not job.foreign:
            answer, method = "passthrough", job.req.method
            url, hdrs, body = self._upstream_request(ch, route, job.req, model, obj, job.stream)
        elif route.kind in _EMBED_KINDS:
            if job.texts is None and route.kind == "embeddings":
                job.texts, job.dims = embedding_inputs(obj or {}), (obj or {}).get("dimensions")
            elif job.texts is None:
                job.texts, job.dims = gemini_embed_texts(route.kind, obj or {})
            answer = "embeddings"
            url, hdrs, body = self._embeddings_request(ch, job.texts, model, job.dims)
        else:
            if job.ir is None:
                job.ir = self._client_ir(job.dialect, route, obj or {}, model, job.req)
                job.ir["stream"] = job.stream
            if route.kind in ("count_tokens", "countTokens"):
                return Attempt(base, ch, "local", method, "", [], b"")
            if provider.inline_media and ch.type not in job.inlined:
                job.inlined[ch.type] = await self._inline_remote_images(job.ir, ch)
            answer = "converted"
            learned = self.learned_caps.get((base.id, job.rec["upstream_model"])) \
                if self.learned_caps else None
            if learned is not None:
                ch = ch.with_cap(learned)
            url, hdrs, body = self.converted_request(ch, job.inlined.get(ch.type, job.ir), model)
        if ch.overrides:
            body, hdrs = apply_overrides(body, hdrs, ch.overrides,
                                         (model, job.rec["upstream_model"]))
        return Attempt(base, ch, answer, method, url, hdrs, body)

    async def send(self, job: Job, at: Attempt) -> UpstreamResponse:
        """Send one try, holding a concurrency slot of its channel; the upstream's answer when
        the channel served (any status but the ones below). Raises UpstreamError when the
        next key or channel may serve (401, 403, 408, 429, 5xx), ContextOverflow when the
        prompt is too long for any channel."""
        ch, rec = at.ch, job.rec
        # Awaited only where there is something to wait for (a signature, a slot).
        headers = await self.signed(ch, at.method, at.url, at.headers, at.body) \
            if PROVIDERS[ch.type].signs else at.headers
        exchange = self.capture.upstream(rec["id"], at.method, at.url, headers, at.body)
        if ch.max_concurrency:
            await self.limits.acquire_slot(ch, rec)
        t0 = time.perf_counter()
        up = await self.client.request(at.method, at.url, headers, at.body, proxy=ch.proxy,
                                       verify_tls=ch.verify_tls, timeout=ch.timeout)
        self.capture.response(exchange, up)
        overflow = context_overflow(await up.keep_body(MAX_ERROR_BODY),
                                    up.status) if up.status >= 400 else None
        if overflow is not None:
            # The channel works; the prompt is too long for any channel.
            rec["channel"] = ch.name
            self.limits.health_of(ch).succeeded(up.status,
                                                round((time.perf_counter() - t0) * 1000, 1))
            self.limits.release_slot(rec)
            self.log(f"channel '{ch.name}': context window exceeded for {job.model}")
            raise overflow
        if up.status < 300 or not (up.status in (401, 403, 408, 429) or up.status >= 500):
            rec["channel"] = ch.name
            if job.scope is not None and up.status < 300:
                rec["affinity"] = self.affinity.served(job.scope, job.pin, (
                    at.base.id, rec["upstream_model"], key_index(at.base, ch.api_key)))
            self.limits.health_of(ch).succeeded(up.status,
                                                round((time.perf_counter() - t0) * 1000, 1))
            return up
        err_body = await up.read(MAX_ERROR_BODY)
        retry = [(n, v) for n, v in up.headers if n.lower() in ("retry-after", "retry-after-ms")]
        raise UpstreamError(up.status, upstream_error_message(err_body, up.status),
                            retryable=True, upstream_status=up.status,
                            code=upstream_error_code(err_body), headers=retry)

    async def answer(self, job: Job, at: Attempt, up: UpstreamResponse) -> Response:
        """The client's answer from the upstream's, by the try's answer kind; raises
        UpstreamError for a blank answer while holding (the next channel is tried)."""
        if at.answer == "passthrough":
            return await self._answer(job, up, at.ch)
        if at.answer == "embeddings":
            return await self._answer_embeddings(job, up, at.ch)
        return await self._answer_converted(job, up, at.ch)

    def _failed(self, job: Job, at: Attempt, exc: UpstreamError, keys_tried: set[str]) -> bool:
        """Count a failed try: release its slot, note it in the record and the log, bench its
        key (401, 403, 429 of a channel with more keys) or cool the channel down. True when the
        same channel is tried again with its next key."""
        ch, base, rec = at.ch, at.base, job.rec
        self.limits.release_slot(rec)
        rec["failures"].append({"channel": ch.name, "status": exc.status, "error": exc.message})
        self.log(f"channel '{ch.name}' failed for {job.model}: {exc.status} {exc.message}")
        if exc.upstream_status in (401, 403, 429) and len(base.keys) > 1:
            self.limits.bench_key(base, ch.api_key, exc)
            if len(keys_tried) < len(base.keys):
                return True
        if self.limits.failed(base, exc):
            self.log(f"channel '{base.name}' cools down for "
                     f"{self.limits.health_of(base).until - self.limits.clock():.0f} s")
            self.on_health()
        return False

    # -- request builders ------------------------------------------------------------------------

    def _upstream_request(self, ch: Channel, route: Route, req: Request, model: str,
                          obj: dict | None, stream: bool = False
                          ) -> tuple[str, list[tuple[str, str]], bytes]:
        body = req.body
        target = ch.upstream_model(model)
        provider = PROVIDERS[ch.type]
        if ch.quirks and route.kind in ("chat", "messages") and obj is not None:
            obj = provider.quirks(dict(obj, model=model), ch.quirks)
            body = json_dumps(obj)
        if target != model:
            if obj is None:
                body = replace_multipart_field(body, req.headers.get("content-type") or "",
                                               "model", target)
            elif "model" in obj:
                body = replace_json_model(body, model, target)
        body = provider.relay_body(body, obj, target, stream, req.headers)
        query = provider.relay_query("&".join(
            p for p in req.query.split("&") if p and not p.startswith("key=")), target) \
            if req.query else ""
        url = provider.passthrough_url(ch, route.path, route.kind, target, stream)
        if query:
            url += ("&" if "?" in url else "?") + query
        connection = req.headers.get("connection")
        extra, dropped = ch.relay_drops
        if connection:
            dropped = dropped | {v.strip().lower() for v in connection.split(",")}
        kept = provider.forwards_headers
        hdrs = [(n, v) for n, v in req.headers if (low := n.lower()) not in dropped
                and (kept is None or low in kept)]
        if kept is not None and obj is not None:
            hdrs.append(("Content-Type", "application/json"))
        hdrs += [(n, v) for n, v in provider.auth_headers(ch.api_key, req.headers, ch.quirks)
                 if n.lower() not in extra]
        hdrs += ch.headers
        hdrs.append(("Accept-Encoding", "gzip, deflate"))
        return url, hdrs, body

    def converted_request(self, ch: Channel, ir: dict, model: str
                          ) -> tuple[str, list[tuple[str, str]], bytes]:
        """(url, headers, body) of a chat request the adapters build from ``ir`` in the
        channel's own dialect."""
        target = ch.upstream_model(model)
        stream = ir["stream"]
        responses = self.via_responses(ch, target, ir)
        body = encode_upstream_chat(ch.type, ir, target, stream=stream,
                                    max_tokens_cap=ch.max_tokens_cap,
                                    signatures=self.signatures, quirks=ch.quirks,
                                    thinking=ch.thinking, kept=self.thinking,
                                    responses=responses)
        provider = PROVIDERS[ch.type]
        url = provider.passthrough_url(ch, RESPONSES_PATH, "responses", target, stream) \
            if responses else provider.chat_url(ch, target, stream)
        return url, self.native_headers(ch), json_dumps(body)

    def _embeddings_request(self, ch: Channel, texts: list[str], model: str, dims: Any
                            ) -> tuple[str, list[tuple[str, str]], bytes]:
        target = ch.upstream_model(model)
        provider = PROVIDERS[ch.type]
        return (provider.embeddings_url(ch, target), self.native_headers(ch),
                json_dumps(provider.encode_embeddings(texts, target, dims)))

    async def signed(self, ch: Channel, method: str, url: str, headers: list[tuple[str, str]],
                     body: bytes) -> list[tuple[str, str]]:
        """The headers of one upstream request with what its channel signs it with (SigV4, a
        service account's token); the channel's failure when that cannot be had."""
        return await PROVIDERS[ch.type].authorize(ch, method, url, headers, body, self.creds)

    @staticmethod
    def native_headers(ch: Channel) -> list[tuple[str, str]]:
        """Headers for a request the gateway builds itself in the channel's own dialect."""
        hdrs = [("Content-Type", "application/json"), ("Accept-Encoding", "gzip, deflate"),
                *PROVIDERS[ch.type].auth_headers(ch.api_key, None, ch.quirks)]
        extra = {n.lower() for n, _ in ch.headers}
        return [(n, v) for n, v in hdrs if n.lower() not in extra] + ch.headers

    # -- conversion ------------------------------------------------------------------------------

    async def _inline_remote_images(self, ir: dict, ch: Channel) -> dict:
        """Gemini and Ollama take images only inline: fetch image URLs (UrlFetcher's checks,
        through the channel's proxy) into base64 parts of a copy of ``ir``; a fetched PDF
        becomes a file part."""
        def parts(msgs: list[dict]) -> Iterable[dict]:
            for m in msgs:
                for p in m["content"]:
                    yield p
                    if p["type"] == "tool_result":
                        yield from p["content"]
        if not any(p["type"] == "image" and "url" in p for p in parts(ir["messages"])):
            return ir
        ir = copy.deepcopy(ir)
        for p in parts(ir["messages"]):
            if p["type"] != "image" or "url" not in p:
                continue
            media, data = await self.fetcher.fetch(
                p.pop("url"), what="image", accept=PROVIDERS[ch.type].inline_media,
                allow_private=self.settings["fetch_private_urls"], proxy=ch.proxy)
            if not media.startswith("image/"):
                p.update(type="file", filename="document.pdf")
            p["media_type"], p["data"] = media, base64.b64encode(data).decode()
        return ir

    @staticmethod
    def _client_ir(dialect: str, route: Route, obj: dict, model: str, req: Request) -> dict:
        return checked_request(DIALECTS[dialect].request_to_ir(obj, model, route.kind,
                                                               req.params))

    def _count_locally(self, job: Job) -> Response:
        """Token counting for a model on a channel of another dialect: a local estimate, never
        an upstream call (Claude Code sends many of these)."""
        ir, rec, dialect = job.ir, job.rec, job.dialect
        count = estimate_tokens(ir)
        rec["status"], rec["channel"], rec["input_tokens"] = 200, "(local estimate)", count
        self.finish(rec)
        body = DIALECTS[dialect].count_payload(count)
        return Response(200, [("Content-Type", "application/json")], json_dumps(body))

    # -- answers ---------------------------------------------------------------------------------

    async def _answer(self, job: Job, up: UpstreamResponse, ch: Channel) -> Response:
        """The answer of a channel the request was passed through to, forwarded as it came
        (a whole JSON answer checked and, holding, looked into for content first; a stream in
        another framing turned into SSE by the adapter's answer_filter)."""
        dialect, rec, req = job.dialect, job.rec, job.req
        hold = job.hold and job.route.kind in CHAT_KINDS
        hdrs = [(n, v) for n, v in up.headers if n.lower() not in _DROP_RESPONSE_HEADERS]
        hdrs += self.access.cors_headers(req.headers)
        rec["status"] = up.status
        rec["ttfb_ms"] = round((time.perf_counter() - rec.t0) * 1000, 1)
        content_type = up.content_type.lower()
        streamed = up.status < 300 and "json" not in content_type
        make_filter = PROVIDERS[ch.type].answer_filter(rec["upstream_model"]) \
            if streamed else None
        renamer = DIALECTS[dialect].stream_named(job.model) \
            if streamed and rec["upstream_model"] != job.model else None
        if make_filter is not None:
            content_type = "text/event-stream"
            hdrs = [(n, v) for n, v in hdrs if n.lower() != "content-type"] + [
                ("Content-Type", content_type)]
        sse = content_type.startswith("text/event-stream")
        length = up.headers.get("content-length")
        small = length is not None and is_digits(length) and int(length) <= MAX_BUFFERED_RESPONSE
        # A whole JSON answer (not a streamed one) is read whole, up to max_response_mb, however
        # it is framed or compressed, so that it is checked before it is forwarded.
        whole_json = "json" in content_type and up.status < 300 and not rec["stream"]
        if not sse and (whole_json or (small and "content-encoding" not in up.headers)):
            try:
                body = await up.read()
            except UpstreamError as exc:
                raise GatewayError(exc.status, f"channel '{rec['channel']}': {exc.message}") \
                    from None
            answer: Any = None
            if up.status < 300 and "json" in content_type:
                # Forwarded as it came, but only once it parsed strictly (section 3).
                answer = upstream_json(body, rec["channel"])
                note_usage(rec, DIALECTS[dialect].usage(answer))
                named = DIALECTS[dialect].named(answer, job.model) if isinstance(
                    answer, dict) and rec["upstream_model"] != job.model else None
                if named is not None:
                    body = json_dumps(named)
            if up.status >= 400:
                rec["error"] = upstream_error_message(body, up.status)
            elif hold and self._passthrough_empty(dialect, answer):
                raise self._empty_answer(up)
            rec["bytes_out"] = len(body)
            self.finish(rec)
            return Response(up.status, hdrs, body)
        pt = SSEPassthrough(DIALECTS[dialect].usage) if sse else None
        chunks = up.iter_bytes() if make_filter is None else \
            filtered_bytes(up.iter_bytes(), make_filter())
        if renamer is not None and sse:
            chunks = filtered_bytes(chunks, renamer())
        held: list[bytes] = []
        if sse and hold and up.status < 300:
            stream_decoder = DIALECTS[dialect].passthrough_decoders()[1]
            await self._hold_until_content(chunks, stream_decoder().looking_only(), up, held)
        if sse:
            hdrs = [(n, v) for n, v in hdrs if n.lower() != "cache-control"]
            hdrs += [("Cache-Control", "no-cache"), ("X-Accel-Buffering", "no")]
            rec["stream"] = True
        return Response(up.status, hdrs, self._stream(up, dialect, pt, rec, chunks, held),
                        keepalive=DIALECTS[dialect].keepalive if sse else None)

    @staticmethod
    def _passthrough_empty(dialect: str, answer: Any) -> bool:
        """Whether a passed-through answer (already parsed strictly, None when it is not
        JSON) is a blank turn."""
        if not isinstance(answer, dict) or DIALECTS[dialect].plainly_has_text(answer):
            return False
        try:
            return answer_is_empty(DIALECTS[dialect].passthrough_decoders()[0](answer))
        except (ValueError, GatewayError):
            return False

    def _stream(self, up: UpstreamResponse, dialect: str, pt: SSEPassthrough | None, rec: Exchange,
                chunks: AsyncIterator[bytes], held: list[bytes]) -> StreamBody:
        def done() -> None:
            up.aclose_nowait()
            if pt is not None:
                note_usage(rec, pt.usage)
            if rec["error"] is None and not up.finished:
                rec["error"] = "client disconnected"
            self.finish(rec)
        return StreamBody(self._relay(held, chunks, dialect, pt, rec), done, ready=bool(held))

    async def _relay(self, held: list[bytes], chunks: AsyncIterator[bytes], dialect: str,
                     pt: SSEPassthrough | None, rec: Exchange) -> AsyncIterator[bytes]:
        """Pass an upstream body on as it arrives (``held`` bytes, read while waiting for real
        content, first). An SSE stream that breaks gets an in-band error event and a clean end;
        any other body is cut, so the client sees the break."""
        def relayed(data: bytes) -> bytes:
            out = pt.feed(data) if pt is not None else data
            rec["bytes_out"] += len(out)
            return out
        try:
            if held:                            # first, even if empty: the StreamBody is ready
                yield relayed(b"".join(held))       # (one piece: join gives it back)
            async for data in chunks:           # after the held bytes, without a wrapper
                if out := relayed(data):
                    yield out
            if pt is not None:
                rest = pt.flush()
                if rest:
                    rec["bytes_out"] += len(rest)
                    yield rest
        except GatewayError as exc:        # upstream failures, an SSE event past its limit
            self._broke_off(rec, exc.message)
            if pt is None:
                raise
            # An event cut unfinished (flushed unsplit) is ended first, so the error stands alone.
            yield (b"\n\n" if pt.open else b"") + \
                DIALECTS[dialect].stream_error(GatewayError(exc.status, rec["error"]))

    async def _answer_converted(self, job: Job, up: UpstreamResponse, ch: Channel) -> Response:
        """The answer of a channel in another dialect, converted through the IR to the
        client's, whole or as a stream."""
        dialect, ir, model, rec, req = job.dialect, job.ir, job.model, job.rec, job.req
        hold = job.hold
        rec["ttfb_ms"] = round((time.perf_counter() - rec.t0) * 1000, 1)
        decode_whole, stream_decoder = upstream_decoders(
            ch.type, self.signatures, upstream_tool_names(ir, ch.type), self.thinking,
            rec["upstream_model"], self.via_responses(ch, rec["upstream_model"], ir))
        if up.status >= 300:
            await self.read_converted(up, ch)
        hdrs = [("Content-Type", "application/json")] + self.access.cors_headers(req.headers)
        rec["status"] = 200
        if not ir["stream"]:
            answer = upstream_json(await self.read_converted(up, ch), ch.name)
            if not isinstance(answer, dict):
                raise GatewayError(502, f"channel '{ch.name}' sent an answer that is not an "
                                        f"object")
            resp = decode_whole(answer)
            if hold and answer_is_empty(resp):
                raise self._empty_answer(up)
            note_usage(rec, resp["usage"])
            out = json_dumps(DIALECTS[dialect].response(resp, model, ir))
            rec["bytes_out"] = len(out)
            self._trim_signatures()
            self.finish(rec)
            return Response(200, hdrs, out)
        rec["stream"] = True
        hdrs = [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache"),
                ("X-Accel-Buffering", "no")] + self.access.cors_headers(req.headers)
        encoder = DIALECTS[dialect].stream_encoder(model, ir)
        decoder = stream_decoder()
        content_type = up.content_type.lower()
        if "json" in content_type and "ndjson" not in content_type:
            # The upstream ignored stream:true and answered whole: stream it as events.
            answer = upstream_json(await self.read_converted(up, ch), ch.name)
            resp = decode_whole(answer if isinstance(answer, dict) else {})
            decoder = _Replay(response_events(resp))
        chunks = up.iter_bytes()
        held, ended = await self._hold_until_content(chunks, decoder, up) if hold \
            else ([], False)

        def done() -> None:
            up.aclose_nowait()
            note_usage(rec, encoder.usage)
            if rec["error"] is None and not up.finished:
                rec["error"] = "client disconnected"
            self._trim_signatures()
            self.finish(rec)
        relay = self._relay_converted(chunks, decoder, encoder, rec, held, ended)
        return Response(200, hdrs, StreamBody(relay, done, ready=bool(held)),
                        keepalive=DIALECTS[dialect].keepalive)

    async def _relay_converted(self, chunks: AsyncIterator[bytes], decoder: Any, encoder: Any,
                               rec: Exchange, held: list[tuple], ended: bool
                               ) -> AsyncIterator[bytes]:
        """Upstream stream -> internal events -> the client's stream format, as bytes arrive;
        ``held`` events (read while waiting for content) go first."""
        try:
            out = encoder.encode(self._note_stream_error(coalesced_text(held), rec))
            if out or held:                     # held: the StreamBody is ready, even if empty
                rec["bytes_out"] += len(out)
                yield out
            if ended:
                return
            async for data in chunks:
                out = encoder.encode(self._note_stream_error(coalesced_text(
                    decoder.feed(data)), rec))
                if out:
                    rec["bytes_out"] += len(out)
                    yield out
            out = encoder.encode(self._note_stream_error(decoder.close(), rec))
        except GatewayError as exc:        # upstream failures, bad events, limits passed
            out = encoder.encode([("error", GatewayError(exc.status,
                                                         self._broke_off(rec, exc.message)))])
        if out:
            rec["bytes_out"] += len(out)
            yield out

    def _note_stream_error(self, events: list[tuple], rec: Exchange) -> list[tuple]:
        """``events`` as they are; an ("error", exc) among them (an upstream's in-band error,
        such as Bedrock's throttlingException event) is noted in the record and the log, as a
        raised one is, so the request does not count as served."""
        for event in events:
            if event[0] == "error" and rec["error"] is None:
                self._broke_off(rec, event[1].message)
        return events

    def _broke_off(self, rec: Exchange, message: str) -> str:
        """Note in the record and the log that the channel's stream ended in an error."""
        rec["error"] = f"channel '{rec['channel']}' broke off: {message}"
        self.log(rec["error"])
        return rec["error"]

    async def _answer_embeddings(self, job: Job, up: UpstreamResponse, ch: Channel) -> Response:
        """Converted embeddings, in the shape of the client's route."""
        route, obj, model, rec, req = job.route, job.obj or {}, job.model, job.rec, job.req
        texts = job.texts or []
        answer = upstream_json(await self.read_converted(up, ch), ch.name)
        vectors, tokens = PROVIDERS[ch.type].embed_vectors(answer)
        tokens = tokens or sum(len(t) // 4 + 1 for t in texts)
        if route.kind == "embeddings":
            payload = openai_embeddings_payload(vectors, model, tokens,
                                                obj.get("encoding_format") == "base64")
        elif route.kind == "embedContent":
            payload = {"embedding": {"values": vectors[0] if vectors else []}}
        else:
            payload = {"embeddings": [{"values": v} for v in vectors]}
        out = json_dumps(payload)
        rec["status"], rec["input_tokens"], rec["bytes_out"] = 200, tokens, len(out)
        self.finish(rec)
        return Response(200, [("Content-Type", "application/json")] +
                        self.access.cors_headers(req.headers), out)

    @staticmethod
    async def read_converted(up: UpstreamResponse, ch: Channel) -> bytes:
        """The whole upstream answer, or its error in the client's shape (the client's own
        mistake, so no fallback)."""
        try:
            raw = await up.read(MAX_ERROR_BODY if up.status >= 300 else None)
        except UpstreamError as exc:
            raise GatewayError(exc.status, f"channel '{ch.name}': {exc.message}") from None
        if up.status >= 300:
            raise GatewayError(up.status, f"channel '{ch.name}': "
                                          f"{upstream_error_message(raw, up.status)}",
                               code=upstream_error_code(raw))
        return raw

    @staticmethod
    def _empty_answer(up: UpstreamResponse) -> UpstreamError:
        up.aclose_nowait()
        return UpstreamError(502, "answered 200 with an empty answer (no text, reasoning or "
                                  "tool call)", retryable=True)

    async def _hold_until_content(self, chunks: AsyncIterator[bytes], decoder: Any,
                                  up: UpstreamResponse, raw: list[bytes] | None = None
                                  ) -> tuple[list[tuple], bool]:
        """Read a stream until it shows real content (event_is_content), holding its events
        (and, for a passthrough, its bytes in ``raw``) so that nothing reaches the client
        before; at most EMPTY_HOLD_EVENTS events or EMPTY_HOLD_BYTES bytes, then it is released
        as it is. Returns (events, whether the stream ended); a stream that ends without content
        raises the channel's failure."""
        events: list[tuple] = []
        size = 0
        async for data in chunks:
            size += len(data)
            if raw is not None:
                raw.append(data)
            # Decoded in growing pieces (HOLD_FEED_BYTES, doubling) and only up to the piece with
            # the first content: a passthrough never decodes the rest of a burst; a conversion
            # decodes the rest of the read once, as the relay would.
            pos, step, n = 0, HOLD_FEED_BYTES, len(data)
            while pos < n:
                fresh = decoder.feed(data[pos:pos + step] if pos or step < n else data)
                pos, step = pos + step, step * 2
                events += fresh
                for ev in fresh:    # an overflow told in-band before any content: still a 400
                    if ev[0] == "error" and not isinstance(ev[1], ContextOverflow):
                        overflow = context_overflow(ev[1].message.encode(), ev[1].status)
                        if overflow is not None:
                            up.aclose_nowait()
                            raise overflow
                if any(event_is_content(ev) for ev in fresh):
                    if raw is None and pos < n:
                        events += decoder.feed(data[pos:])
                    return events, False
            if len(events) > EMPTY_HOLD_EVENTS or size > EMPTY_HOLD_BYTES:
                return events, False
        events += decoder.close()
        if any(event_is_content(ev) for ev in events):
            return events, True
        raise self._empty_answer(up)

    def _trim_signatures(self) -> None:
        for kept, limit in ((self.signatures, SIGNATURES_KEPT), (self.thinking, THINKING_KEPT)):
            while len(kept) > limit:
                del kept[next(iter(kept))]

    @staticmethod
    def _all_failed(failures: list[tuple[Channel, UpstreamError]]) -> GatewayError:
        ch, last = failures[-1]
        if last.upstream_status is not None:
            return GatewayError(last.upstream_status, f"channel '{ch.name}': {last.message}",
                                code=last.code, headers=last.headers)
        tried = "; ".join(f"'{c.name}': {e.message}" for c, e in failures)
        if len(failures) == 1:
            return GatewayError(last.status, f"channel {tried}", headers=last.headers)
        return GatewayError(last.status, f"all {len(failures)} channels failed: {tried}",
                            headers=last.headers)


def _ignore(_payload: Any) -> None:
    """A Gateway callback nobody listens to."""


class Gateway:
    """Serves requests from the HTTP server, as a pipeline: ``access`` (Access) checks who
    calls, ``limits`` (Limits) and ``usage`` their rate and spending, find_route and _route
    (Router) pick the route and the channels in order, ``relay`` (Relay) sends to them
    (passed through or converted by the adapters of section 9) with fallback, and _finish
    records the Exchange. The facade the bridge, the GUI and the command line use. What
    happens goes to three callbacks: ``on_request`` (a finished request's logged record),
    ``on_log`` (an activity-log line) and ``on_health`` (health_report(), when a channel
    starts to cool down); section 12 turns them into its events."""

    def __init__(self, config: dict, *, config_dir: str = ".",
                 on_request: Callable[[dict], None] | None = None,
                 on_log: Callable[[str], None] | None = None,
                 on_health: Callable[[dict], None] | None = None,
                 client: UpstreamClient | None = None, listen_host: str | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time):
        self.client = client or UpstreamClient()
        self.fetcher = UrlFetcher(self.client)
        self.clock = clock                       # cooldowns, keys' rest, rpm, auth throttle
        self.access = Access(lambda: self.clock(), listen_host)
        self.on_request = on_request or _ignore
        self.on_log = on_log or _ignore
        self.on_health = on_health or _ignore
        self.config_dir = config_dir
        self.records: collections.deque[dict] = collections.deque(maxlen=EVENTS_KEPT)
        self.stats = {"requests": 0, "errors": 0, "input_tokens": 0, "output_tokens": 0}
        self.started = time.time()
        self.router = Router()
        self.affinity = Affinity(clock=clock)
        self.capture = DebugCapture()
        self._seq = itertools.count(1)
        self.limits = Limits(lambda: self.clock(), self.log)
        self.health = self.limits.health         # by channel id (routing skips cooling ones)
        self.relay = Relay(self.client, self.fetcher, self.limits, self.affinity, self.capture,
                           self.access, log=self.log, finish=self._finish,
                           on_health=lambda: self.on_health(self.health_report()))
        self._request_log: RequestLog | None = None
        self.usage: UsageStore | None = None
        self.wall_clock = wall_clock             # UTC days and months of the usage limits
        self.config_error: str | None = None      # why the file on disk is not in force
        self.apply_config(config)

    @property
    def signatures(self) -> dict[str, str]:
        """Gemini thoughtSignature by tool-call id (kept by the Relay)."""
        return self.relay.signatures

    @property
    def thinking(self) -> dict[str, list[dict]]:
        """Claude's signed thinking by tool-call id (kept by the Relay)."""
        return self.relay.thinking

    # -- configuration ---------------------------------------------------------------------------

    def apply_config(self, config: dict) -> None:
        """Take a new validated configuration; requests already running keep their channels."""
        s = config["settings"]
        self.settings = self.relay.settings = s
        self.channels = [Channel(c, s["proxy"]) for c in config["channels"]]
        self.relay.learned_caps.clear()          # a channel may now go elsewhere
        self.relay.learned_responses.clear()
        self.tokens = [Token(t) for t in config["tokens"]]
        self.max_body = int(s["max_body_mb"] * 1024 * 1024)
        self.client.max_response = int(s["max_response_mb"] * 1024 * 1024)
        self.access.configure(s, self.tokens)
        self.affinity.ttl = s["affinity_ttl_s"]
        self.aliases = {k.lower(): alias_members(v) for k, v in s["aliases"].items()}
        self.alias_names = list(s["aliases"])
        capture_file = s["debug_capture_file"]
        self.capture.configure(s["debug_capture"], capture_file and os.path.join(
            self.config_dir, capture_file), [k for ch in self.channels for k in ch.secrets()] +
            [t["key"] for t in config["tokens"]], self.log)
        log_path = os.path.join(self.config_dir, s["log_file"]) if s["log_requests"] else None
        if self._request_log is not None and self._request_log.path != log_path:
            self._request_log.close()
            self._request_log = None
        if log_path and self._request_log is None:
            self._request_log = RequestLog(log_path, self.log)
        self._open_usage(config)

    def _open_usage(self, config: dict) -> None:
        """The usage store of settings.usage_db (relative to the config file); a new price table
        alone does not reopen it."""
        s = config["settings"]
        path = os.path.join(self.config_dir, s["usage_db"]) if s["usage_db"] else None
        if self.usage is not None and self.usage.path == path and \
                self.usage.retention_days == s["usage_retention_days"]:
            self.usage.prices = PriceBook(config["prices"])
            return
        if self.usage is not None:
            self.usage.close()
        self.usage = UsageStore(path, prices=config["prices"],
                                retention_days=s["usage_retention_days"], clock=self.wall_clock,
                                on_error=self.log)

    def open_request_log(self) -> None:
        """At start: a request log that cannot be opened is a ConfigError naming its path
        (later write failures are only counted and reported)."""
        if self._request_log is not None:
            self._request_log.open()

    def close(self) -> None:
        self.client.close()
        self.capture.close()
        if self._request_log is not None:
            self._request_log.close()
        if self.usage is not None:
            self.usage.close()

    def log(self, text: str) -> None:
        self.on_log(escape_controls(text))

    # -- errors ----------------------------------------------------------------------------------

    def render_error(self, head: RequestHead | None, err: GatewayError,
                     dialect: str | None = None) -> Response:
        if dialect is None and head is not None:
            # The route decides (a Gemini request with anthropic-version is still Gemini's);
            # model lists, health and usage serve every dialect: their headers decide.
            route, _ = find_route(head.path)
            dialect = route.dialect if route is not None and route.kind not in (
                "models", "model", "health", "usage") else guess_dialect(head.path, head.headers)
        dialect = dialect or OPENAI
        hdrs = [("Content-Type", "application/json")] + err.headers
        if head is not None:
            hdrs += self.access.cors_headers(head.headers)
        return Response(err.status, hdrs, json_dumps(DIALECTS[dialect].error_payload(err)))

    # -- entry point -----------------------------------------------------------------------------

    async def handle(self, req: Request) -> Response:
        """One request through the pipeline: access (host, origin, preflight, then who calls),
        limits (rate, usage), the router, the relay. A failure past the route is answered in
        the client's dialect and recorded."""
        self.access.check_host(req)
        self.access.check_origin(req)
        if req.method == "OPTIONS":
            return self.access.preflight(req)
        route, model_id = self._checked_route(req)
        if route.kind == "health":
            return self._health_answer(req)
        dialect = route.dialect
        if route.path in ("/v1/models", MODEL_ROUTE.path):
            dialect = models_dialect(req.headers, req.query)
        rec = self._new_record(req, route.path)
        rec["dialect"] = dialect
        try:
            token = self.access.authenticate(req)
            rec["token"], rec["token_id"] = (token.name, token.id) if token else (None, None)
            self.limits.check_rpm(token)
            if token is not None and self.usage is not None:
                self.usage.check(token, spending=route.kind not in ("models", "model", "usage"))
            if route.kind == "usage":
                return await self._usage_answer(req, token, rec)
            if route.kind in ("models", "model"):
                resp = self._models(req, dialect, token, model_id)
                rec["status"], rec["bytes_out"] = resp.status, len(resp.body)  # type: ignore
                self._finish(rec)
                return resp
            job, chans = self._route(req, route, dialect, token, rec, model_id)
            return await self.relay.run(job, chans)
        except asyncio.CancelledError:
            rec["error"] = rec["error"] or "client disconnected"
            self._finish(rec)
            raise
        except GatewayError as err:
            rec["status"], rec["error"] = err.status, err.message
            self._finish(rec)
            resp = self.render_error(None, err, dialect)
            resp.headers += self.access.cors_headers(req.headers)
            return resp

    def _checked_route(self, req: Request) -> tuple[Route, str]:
        """The route of ``req`` and the model its path names; 404, 405 or 415 otherwise."""
        route, model_id = find_route(req.path)
        if route is None:
            raise GatewayError(404, f"no route {req.path}: see /v1/models, /v1/chat/completions "
                                    f"or /v1/messages", code="not_found")
        method = "GET" if req.method == "HEAD" else req.method
        if method not in route.methods:
            raise GatewayError(405, f"{req.method} is not allowed on {route.path}; use "
                                    f"{' or '.join(route.methods)}",
                               headers=[("Allow", ", ".join(route.methods))])
        self.access.check_content_type(req, route)
        return route, model_id

    def _health_answer(self, req: Request) -> Response:
        """GET /health: up and its version; ?details=1 (authenticated) adds the channels'
        health, request log errors and a configuration error."""
        body: dict[str, Any] = {"status": "ok", "version": __version__,
                                "uptime_s": round(time.time() - self.started, 1)}
        if req.params.get("details") not in (None, "", "0", "false"):
            try:
                self.access.authenticate(req)
            except GatewayError as err:
                return self.render_error(None, err, OPENAI)
            body["channels"] = self.health_report()
            body["request_log_errors"] = self._request_log.errors if self._request_log else 0
            if self.config_error:
                body["config_error"] = self.config_error
        return Response(200, [("Content-Type", "application/json")], json_dumps(body))

    async def _usage_answer(self, req: Request, token: Token | None,
                            rec: Exchange) -> Response:
        """GET /usage?since=7d|YYYY-MM-DD&by=model|channel|token|day: the usage history as
        JSON; a gateway token sees its own requests only (all of them with auth off)."""
        by, since = req.params.get("by") or "model", req.params.get("since") or "30d"
        if by not in USAGE_GROUPS:
            raise GatewayError(400, f"by={by[:40]!r} is not a grouping: use "
                                    f"{', '.join(USAGE_GROUPS)}", param="by")
        try:
            first = parse_since(since, self.wall_clock())
        except ValueError as exc:
            raise GatewayError(400, str(exc), param="since") from None
        store = self.usage
        if store is None or store.path is None:
            raise GatewayError(404, "usage history is off: set settings.usage_db to a file "
                                    "name such as \"usage.db\"", code="usage_off")

        def query() -> list[dict]:
            conn = open_usage_db(store.path or "")
            try:
                return usage_report(conn, first, by, token.id if token else None)
            finally:
                conn.close()
        try:
            rows = await asyncio.to_thread(query)
        except (ConfigError, sqlite3.Error) as exc:
            raise GatewayError(500, f"the usage database cannot be read: {exc}") from None
        body = json_dumps({"object": "usage", "since": day_text(first), "by": by,
                           "rows": rows, "totals": usage_totals(rows),
                           "dropped_rows": store.dropped})
        rec["status"], rec["bytes_out"] = 200, len(body)
        self._finish(rec)
        return Response(200, [("Content-Type", "application/json")] +
                        self.access.cors_headers(req.headers), body)

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
        for name in self.alias_names:              # an alias is a model clients may pick
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
            payload = DIALECTS[dialect].model_payload(model_id, created)
        else:
            payload = DIALECTS[dialect].models_payload(names, created)
        return Response(200, [("Content-Type", "application/json")] +
                        self.access.cors_headers(req.headers), json_dumps(payload))

    # -- routing ---------------------------------------------------------------------------------

    def candidates(self, model: str, route: Route, token: Token | None,
                   rec: Exchange | None = None) -> list[Channel]:
        """The channels to try for ``model`` in order (Router), cooling ones left out (Limits)."""
        return self.limits.ready(self.router.order(self.channels, model, route, token), rec)

    def route_channels(self, model: str, route: Route, token: Token | None,
                       rec: Exchange) -> list[Channel]:
        """The channels to try for ``model``: an alias (settings.aliases) is served by its
        members that have channels, weighted in turn, each member's channels in the usual order,
        then the next member's as fallback; any other name by ``candidates``."""
        members = self.aliases.get(model.lower())
        if not members:
            return self.candidates(model, route, token, rec)
        served: dict[str, tuple[float, list[Channel]]] = {}
        refused: GatewayError | None = None
        skipped: list[str] = []
        for member, weight in members:
            seen: dict = {}
            try:
                served[member] = (weight, self.candidates(member, route, token, seen))
            except GatewayError as exc:      # this member has no channel: it gets no turn
                refused = refused or exc
            skipped += seen.get("skipped", [])
        if refused is not None and not served:
            raise refused
        order = weighted_order(list(served), [served[m][0] for m in served],
                               self.router.turns(("alias", model.lower())))
        rec["skipped"] = skipped
        return [ch.for_alias(model, m) for m in order for ch in served[m][1]]

    def _session(self, token: Token | None, model: str, route: Route, req: Request,
                 obj: dict | None) -> tuple[tuple | None, tuple | None]:
        """(affinity scope, its pin) of a chat request; (None, None) when affinity is off or
        the request names no session."""
        if not self.affinity.ttl or route.kind not in CHAT_KINDS:
            return None, None
        key = session_key(req.headers, obj)
        if key is None:
            return None, None
        scope = (token.id if token else None, model.lower(), key)
        return scope, self.affinity.lookup(scope)

    # -- the model and the channels of a request ----------------------------------------------

    def _parse_model(self, req: Request, route: Route,
                     path_model: str = "") -> tuple[str, dict | None, bool]:
        """(model, parsed JSON body or None, stream flag)."""
        if route.body == "multipart":
            form = req.headers.get("content-type") or ""     # checked by check_content_type
            # One 'model' field, in UTF-8: what is authorised is exactly what is forwarded.
            fields = [req.body[start:end] for hdrs, start, end in
                      parse_multipart(req.body, form) if multipart_field_name(hdrs) == "model"]
            if len(fields) > 1:
                raise GatewayError(400, "the form has more than one 'model' field",
                                   param="model")
            try:
                model = fields[0].decode("utf-8").strip() if fields else ""
            except UnicodeDecodeError:
                raise GatewayError(400, "the form's 'model' field is not UTF-8",
                                   param="model") from None
            if model:
                return model, None, False
            raise GatewayError(400, "the form has no 'model' field", param="model")
        if not req.body:
            raise GatewayError(400, "the request body is empty; send a JSON object")
        obj = json_loads(req.body)
        if not isinstance(obj, dict):
            raise GatewayError(400, "the request body must be a JSON object")
        if DIALECTS[route.dialect].model_in_path:
            return path_model, obj, route.kind == "streamGenerateContent"
        model = obj.get("model")
        if model is None and route.kind == "images":
            model = IMAGES_DEFAULT_MODEL
        if not isinstance(model, str) or not model.strip():
            raise GatewayError(400, "'model' is required: name the model to use",
                               param="model", code="missing_required_parameter")
        return model, obj, obj.get("stream") is True

    def _route(self, req: Request, route: Route, dialect: str, token: Token | None,
               rec: Exchange, path_model: str = "") -> tuple[Job, list[Channel]]:
        """The Relay's job for a request and the channels to try, in order: the model the
        token may use, its alias members' or its own channels, the session's pinned one first,
        only the first without fallback."""
        model, obj, stream = self._parse_model(req, route, path_model)
        rec["model"], rec["stream"] = model, stream
        if token is not None and not token.may_use_model(model):
            raise GatewayError(403, f"gateway token '{token.name}' may not use model '{model}'")
        self.capture.client(rec["id"], req)
        chans = self.route_channels(model, route, token, rec)
        # A pin keeps a session on one of several channels or keys: with one of each there is
        # no choice to keep (the affinity machinery is ~6% of such a request's instructions).
        scope, pin = self._session(token, model, route, req, obj) \
            if len(chans) > 1 or (chans and len(chans[0].keys) > 1) else (None, None)
        chans = pinned_first(chans, pin, model)
        if not self.settings["enable_fallback"]:
            chans = chans[:1]
        foreign = route.kind == "chat" and chat_body_is_foreign(obj or {})
        # A blank answer counts as the channel's failure while the client has seen nothing.
        hold = self.settings["enable_fallback"] and self.settings["empty_answer_fallback"] \
            and route.kind not in _EMBED_KINDS
        return Job(req, route, dialect, rec, model, obj, stream, scope, pin, foreign, hold,
                   inlined={}), chans

    # -- health, keys and limits (Limits) ---------------------------------------------------------

    def health_report(self) -> list[dict]:
        return self.limits.report(self.channels)

    def channel(self, channel_id: int) -> Channel:
        for ch in self.channels:
            if ch.id == channel_id:
                return ch
        raise GatewayError(404, f"no channel with id {channel_id}")

    async def test_channel(self, ch: Channel) -> dict:
        """Send a minimal chat request through ``ch`` in its own dialect; return the model, the
        latency and the start of the reply, or raise with the upstream's message."""
        model = next((m for m in ch.listed_models()), None)
        if model is None:
            names = await self.fetch_models(ch)
            if not names:
                raise GatewayError(400, "the channel lists no model: add a model name to test")
            model = names[0]
        ir = empty_request(model)
        ir["messages"] = [{"role": "user", "content": [{"type": "text", "text": "ping"}]}]
        ir["max_tokens"] = 16
        url, hdrs, body = self.relay.converted_request(ch, ir, model)
        t0 = time.perf_counter()
        hdrs = await self.relay.signed(ch, "POST", url, hdrs, body)
        up = await self.client.request("POST", url, hdrs, body, proxy=ch.proxy,
                                       verify_tls=ch.verify_tls, timeout=min(ch.timeout, 60))
        raw = await self.relay.read_converted(up, ch)
        latency = (time.perf_counter() - t0) * 1000
        resp = upstream_decoders(ch.type, model=ch.upstream_model(model))[0](
            upstream_json(raw, ch.name))
        return {"model": model, "latency_ms": round(latency, 1),
                "reply": parts_text(resp["content"])[:200]}

    async def fetch_models(self, ch: Channel) -> list[str]:
        """The model names a channel's upstream lists (``/v1/models``; Gemini ``models``;
        Ollama ``/api/tags``), for the GUI's model picker."""
        provider = PROVIDERS[ch.type]
        if PRESETS.get(ch.preset, {}).get("model_list") is False or not provider.lists_models:
            label = PRESETS[ch.preset]["label"] if ch.preset in PRESETS else \
                f"A {ch.type} channel"
            raise GatewayError(400, f"{label} has no model list the gateway can read; type the "
                                    f"model names")
        url = provider.models_url(ch)
        hdrs = [(n, v) for n, v in self.relay.native_headers(ch) if n.lower() != "content-type"]
        hdrs = await self.relay.signed(ch, "GET", url, hdrs, b"")
        up = await self.client.request("GET", url, hdrs, proxy=ch.proxy,
                                       verify_tls=ch.verify_tls, timeout=min(ch.timeout, 30))
        raw = await self.relay.read_converted(up, ch)
        return provider.parse_models(upstream_json(raw, ch.name, "a model list"))

    # -- records ---------------------------------------------------------------------------------

    def _new_record(self, req: Request, route: str) -> Exchange:
        return Exchange({"id": next(self._seq), "time": time.time(),
                         "method": req.method, "route": route, "model": None, "stream": False,
                         "token": None, "channel": None, "tried": [], "failures": [],
                         "skipped": [], "status": None, "latency_ms": None, "ttfb_ms": None,
                         "bytes_in": len(req.body), "bytes_out": 0, "input_tokens": None,
                         "output_tokens": None, "cache_read_tokens": None,
                         "cache_write_tokens": None, "reasoning_tokens": None, "error": None,
                         "upstream_model": None, "affinity": None}, time.perf_counter())

    def _finish(self, rec: Exchange) -> None:
        self.limits.release_slot(rec)
        if rec.finished:
            return
        self.capture.finish(rec["id"])
        rec.finished = True
        rec["latency_ms"] = round((time.perf_counter() - rec.t0) * 1000, 1)
        st = self.stats
        st["requests"] += 1
        if rec["error"] or (rec["status"] or 500) >= 400:
            st["errors"] += 1
        st["input_tokens"] += rec["input_tokens"] or 0
        st["output_tokens"] += rec["output_tokens"] or 0
        # The one place records are made safe for every view of them (access line, GUI, JSONL):
        # the model, errors and the rest may hold text a client sent.
        escaped = escape_record(rec)
        if escaped is not rec:
            rec.update(escaped)
        if self.usage is not None and rec["model"] is not None and \
                rec["route"] not in UNBILLED_ROUTES:
            ch = next((c for c in self.channels if c.name == rec["channel"]), None)
            self.usage.record(rec, rec.get("token_id"), rec["upstream_model"] or (
                ch.upstream_model(rec["model"]) if ch else None))
        self.records.append(rec)
        if self._request_log is not None:
            self._request_log.write(rec)
        self.on_request(rec)


# =================================================================================================
# 12. Server thread bridge
# =================================================================================================
# The only place the GUI thread and the server thread meet. The GUI calls start/stop/reload/
# apply_config and run_task (tests also submit); events come back through ``events``, a
# queue.Queue of (kind, payload) tuples of the EVENT_* kinds below. The Gateway's callbacks
# (section 11) become request, log and health events; the bridge adds config, state and result.

# Event kinds, declared here once: (kind, payload) to the window (section 13) and the headless
# printer (section 14).
EVENT_REQUEST = "request"        # the request's logged record (dict), when it is finished
EVENT_LOG = "log"                # a line for the activity log (str)
EVENT_HEALTH = "health"          # Gateway.health_report(), when a channel starts to cool down
EVENT_CONFIG = "config"          # None: config.json was reloaded from disk
EVENT_STATE = "state"            # "running" | "stopped"
EVENT_RESULT = "result"          # (tag, ok, value or error text) of a run_task



async def watch_config(store: ConfigStore, gateway: Gateway, wake: asyncio.Event,
                       interval: float, on_event: Callable[[str, Any], None]) -> None:
    """Apply edits of the configuration file to the running gateway: checked every
    ``interval`` seconds and at once when ``wake`` is set (SIGHUP). An invalid file is
    reported once (activity log, /health?details=1) and the last good configuration stays."""
    while True:
        try:
            await asyncio.wait_for(wake.wait(), interval)
        except asyncio.TimeoutError:
            pass
        forced = wake.is_set()
        wake.clear()
        before = gateway.settings
        try:
            changed = await asyncio.to_thread(store.reload, forced)
        except ConfigError as exc:
            if gateway.config_error != str(exc):
                gateway.config_error = str(exc)
                gateway.log(f"configuration not reloaded: {exc}; the last good configuration "
                            f"stays in force")
            continue
        if gateway.config_error is not None and not changed:
            gateway.log("configuration file is valid again")
        gateway.config_error = None
        if not changed:
            continue
        try:
            gateway.apply_config(store.snapshot())
        except Exception as exc:                     # a request log that cannot be opened
            gateway.log(f"configuration reloaded, but not all of it applies: "
                        f"{type(exc).__name__}: {exc}")
        on_event(EVENT_CONFIG, None)
        gateway.log(f"configuration reloaded from {os.path.basename(store.path)}")
        if (before["host"], before["port"]) != (gateway.settings["host"],
                                                gateway.settings["port"]):
            gateway.log("the new host or port takes effect when the gateway restarts")


async def run_gateway(store: ConfigStore, stop: asyncio.Event, *, host: str | None = None,
                      port: int | None = None, on_event: Callable[[str, Any], None] | None = None,
                      on_ready: Callable[[Gateway, HTTPServer], None] | None = None,
                      reload: asyncio.Event | None = None,
                      poll_interval: float | None = None) -> None:
    """Serve until ``stop`` is set, taking edits of the configuration file every
    ``poll_interval`` seconds (CONFIG_POLL_SECONDS) and whenever ``reload`` is set. Raises
    OSError when the address cannot be bound."""
    config = store.snapshot()
    s = config["settings"]
    bind = host or s["host"]
    if not is_loopback_host(bind) and not s["require_auth"] and \
            not s["allow_unauthenticated_remote"]:
        raise ConfigError(f"{store.path}: listening on {bind} with require_auth off needs "
                          f"settings.allow_unauthenticated_remote: true (or turn auth on)")
    config_dir = os.path.dirname(os.path.abspath(store.path))
    tls = None
    if s["tls_cert"]:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            tls.load_cert_chain(os.path.join(config_dir, s["tls_cert"]),
                                os.path.join(config_dir, s["tls_key"]))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"{store.path}: settings.tls_cert / tls_key: cannot load them "
                              f"({exc}); give PEM files of a certificate and its key") from None
    emit = on_event or (lambda kind, payload: None)
    gateway = Gateway(config, config_dir=config_dir, listen_host=bind,
                      on_request=functools.partial(emit, EVENT_REQUEST),
                      on_log=functools.partial(emit, EVENT_LOG),
                      on_health=functools.partial(emit, EVENT_HEALTH))
    try:
        gateway.open_request_log()
    except ConfigError:
        gateway.close()
        raise
    server = HTTPServer(gateway.handle, gateway.render_error, max_body=lambda: gateway.max_body,
                        log=gateway.log, ssl_context=tls,
                        max_connections=lambda: gateway.settings["max_connections"])
    try:
        await server.start(bind, s["port"] if port is None else port)
        scheme = "https" if tls else "http"
        gateway.log(f"listening on {scheme}://{_url_host(bind)}:{server.port}")
        if not is_loopback_host(bind) and not s["require_auth"]:
            gateway.log("warning: listening beyond this machine with require_auth off: anyone "
                        "who can reach the port can use your upstream keys")
        elif not is_loopback_host(bind):
            gateway.log(f"warning: {bind} is reachable from other machines; every client needs "
                        f"a gateway token (listen on 127.0.0.1 to keep it to this machine)")
        if "*" in s["cors_origins"] and not s["require_auth"]:
            gateway.log('warning: cors_origins has "*" and require_auth is off: any web page '
                        'you open can use your upstream keys')
        watcher = asyncio.create_task(watch_config(
            store, gateway, reload or asyncio.Event(),
            CONFIG_POLL_SECONDS if poll_interval is None else poll_interval, emit))
        if on_ready is not None:
            on_ready(gateway, server)
        try:
            await stop.wait()
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
    finally:
        await server.stop()
        gateway.close()
        if server.sockets:                          # a refused start is one line, not two
            gateway.log("stopped")


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def listen_error(host: str, port: int, exc: OSError) -> str:
    """One line for a failed bind that blames what is wrong: the host or the port."""
    reason = exc.strerror or str(exc)
    if isinstance(exc, socket.gaierror):
        return (f"cannot listen on {host}: it is not an address or a name this machine can "
                f"resolve ({reason}); give an address of this machine with --host or "
                f"settings.host, such as 127.0.0.1 (this machine only) or 0.0.0.0 (every network)")
    if exc.errno == errno.EADDRNOTAVAIL:
        return (f"cannot listen on {host}: it is not an address of this machine ({reason}); "
                f"give one of its addresses with --host or settings.host, such as 127.0.0.1")
    if exc.errno == errno.EACCES:
        return (f"cannot listen on {host}:{port}: permission denied (ports below 1024 need "
                f"privileges); choose another port with --port or settings.port")
    return (f"cannot listen on {host}:{port}: {reason}. Another program (or another aigateway) "
            f"may hold the port; choose another with --port or settings.port.")


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
        self._reload: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.server is not None

    @property
    def url(self) -> str:
        settings = self.store.data["settings"]
        host = self.host or settings["host"]
        port = self.server.port if self.server else 0
        return f"{'https' if settings['tls_cert'] else 'http'}://{_url_host(host)}:{port}"

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
        self._stop, self._reload = asyncio.Event(), asyncio.Event()

        def ready(gateway: Gateway, server: HTTPServer) -> None:
            self.gateway, self.server = gateway, server
            self._ready.set()
            self._emit(EVENT_STATE, "running")
        try:
            loop.run_until_complete(run_gateway(self.store, self._stop, host=self.host,
                                                port=self.port, on_event=self._emit,
                                                on_ready=ready, reload=self._reload))
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
            self._emit(EVENT_STATE, "stopped")

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

    def reload(self) -> None:
        """Have the running gateway re-read the configuration file now (SIGHUP)."""
        loop, event = self._loop, self._reload
        if loop is not None and event is not None:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:                                       # the loop just closed
                pass

    def apply_config(self) -> None:
        """Hand the store's current configuration to the running gateway."""
        snap = self.store.snapshot()
        loop, gateway = self._loop, self.gateway
        if loop is not None and gateway is not None:
            loop.call_soon_threadsafe(gateway.apply_config, snap)

    def run_task(self, make: Callable[[Gateway], Any], tag: Any) -> None:
        """Run the coroutine ``make(gateway)`` on the server loop, or on a short-lived loop of
        its own when the gateway is stopped; its outcome arrives on the queue as
        ("result", (tag, ok, value or error text)). Never blocks the caller."""
        async def wrapped(gateway: Gateway) -> None:
            try:
                self._emit(EVENT_RESULT, (tag, True, await make(gateway)))
            except GatewayError as exc:
                self._emit(EVENT_RESULT, (tag, False, exc.message))
            except Exception as exc:                                   # reported, not raised
                self._emit(EVENT_RESULT, (tag, False, f"{type(exc).__name__}: {exc}"))

        loop, gateway = self._loop, self.gateway
        if loop is not None and gateway is not None:
            asyncio.run_coroutine_threadsafe(wrapped(gateway), loop)
            return

        async def alone() -> None:
            gateway = Gateway(self.store.snapshot(),
                              config_dir=os.path.dirname(os.path.abspath(self.store.path)))
            try:
                await wrapped(gateway)
            finally:
                gateway.close()
        threading.Thread(target=asyncio.run, args=(alone(),), daemon=True).start()

    def submit(self, coro: Any) -> Any:
        """Run a coroutine on the server loop; returns a concurrent.futures.Future."""
        if self._loop is None:
            raise RuntimeError("the gateway is not running")
        return asyncio.run_coroutine_threadsafe(coro, self._loop)


# =================================================================================================
# 13. Tk GUI
# =================================================================================================
# The GUI never touches the event loop: the server thread sends (kind, payload) tuples through the
# bridge's queue, drained here by after() in bounded batches; the GUI reaches the server only
# through GatewayThread (start/stop/apply_config/run_task). tkinter is imported only when the
# window opens, so a headless server neither pays its start-up time nor its memory; for the same
# reason each tab is a class that owns its ttk.Frame rather than subclassing it.

tk: Any = None
ttk: Any = None
messagebox: Any = None
tkfont: Any = None

GUI_POLL_MS = 100             # how often the queue is drained
GUI_BATCH = 500               # events handled per drain at most
GUI_LOG_ROWS = 1000           # rows kept in the Logs table
GUI_CELL_PAD = 24             # pixels a Treeview cell or heading adds around its text
GUI_COLUMN_MAX = 420          # a column widens to its longest cell up to this many pixels
GUI_RESULT_CHARS = 1000       # a channel test's error kept for the Channels tab's detail line
CHART_MINUTES = 30            # the requests-per-minute chart's width

THEMES = {
    "light": {"bg": "#f6f7fb", "panel": "#ffffff", "fg": "#1d2330", "muted": "#6b7385",
              "accent": "#3b6ef5", "accent_fg": "#ffffff", "border": "#dfe3ec",
              "select": "#dce6ff", "ok": "#1f9d55", "bad": "#d64545", "warn": "#b7791f",
              "field": "#ffffff"},
    "dark": {"bg": "#171a21", "panel": "#1f232c", "fg": "#e6e9f0", "muted": "#9aa3b5",
             "accent": "#5b8cff", "accent_fg": "#ffffff", "border": "#2e3440",
             "select": "#2c3a5c", "ok": "#3ecf7a", "bad": "#ff6b6b", "warn": "#f0b429",
             "field": "#262b36"},
}


def gui_available() -> bool:
    if sys.platform != "win32" and sys.platform != "darwin" and not os.environ.get("DISPLAY") \
            and not os.environ.get("WAYLAND_DISPLAY"):
        return False
    try:
        import tkinter  # noqa: F401
    except ImportError:
        return False
    return True


def _load_tk() -> None:
    global tk, ttk, messagebox, tkfont
    if tk is None:
        import tkinter
        import tkinter.font
        import tkinter.messagebox
        import tkinter.ttk
        tk, ttk, messagebox = tkinter, tkinter.ttk, tkinter.messagebox
        tkfont = tkinter.font


def _dpi_aware() -> None:
    """Crisp text on HiDPI Windows screens (per-monitor DPI awareness); elsewhere nothing."""
    if sys.platform == "win32":
        try:
            import ctypes
            ctypes.windll.shcore.SetProcessDpiAwareness(2)
        except (OSError, AttributeError):
            pass


def _icon_image(master: Any) -> Any:
    """The app icon, drawn: a rounded blue tile with a white gateway arrow."""
    size = 32
    img = tk.PhotoImage(master=master, width=size, height=size)
    rows = []
    for y in range(size):
        row = []
        for x in range(size):
            cx, cy = min(x, size - 1 - x), min(y, size - 1 - y)
            inside = not (cx < 4 and cy < 4 and (4 - cx) ** 2 + (4 - cy) ** 2 > 16)
            arrow = (14 <= y <= 17 and 7 <= x <= 22) or \
                (abs(y - 15.5) <= 24 - x and 18 <= x <= 24 and 8 <= y <= 23)
            row.append("#ffffff" if inside and arrow else "#3b6ef5" if inside else "")
        rows.append(row)
    for y, row in enumerate(rows):
        for x, color in enumerate(row):
            if color:
                img.put(color, (x, y))
    return img


def apply_theme(root: Any, name: str) -> dict:
    c = THEMES.get(name, THEMES["light"])
    style = ttk.Style(root)
    style.theme_use("clam")
    family = "Segoe UI" if sys.platform == "win32" else "Helvetica"
    base, small, title = (family, 10), (family, 9), (family, 15, "bold")
    root.configure(background=c["bg"])
    style.configure(".", background=c["bg"], foreground=c["fg"], font=base,
                    bordercolor=c["border"], lightcolor=c["bg"], darkcolor=c["bg"],
                    troughcolor=c["border"], fieldbackground=c["field"],
                    selectbackground=c["select"], selectforeground=c["fg"],
                    insertcolor=c["fg"])
    style.configure("TFrame", background=c["bg"])
    style.configure("Card.TFrame", background=c["panel"], relief="solid", borderwidth=1)
    style.configure("TLabel", background=c["bg"], foreground=c["fg"])
    style.configure("Card.TLabel", background=c["panel"])
    style.configure("Muted.TLabel", foreground=c["muted"], font=small)
    style.configure("CardMuted.TLabel", background=c["panel"], foreground=c["muted"], font=small)
    style.configure("Title.TLabel", font=title)
    style.configure("Big.TLabel", background=c["panel"], font=(family, 18, "bold"))
    style.configure("Ok.TLabel", foreground=c["ok"], font=(family, 11, "bold"))
    style.configure("Bad.TLabel", foreground=c["bad"], font=(family, 11, "bold"))
    style.configure("Warn.TLabel", foreground=c["warn"])
    style.configure("Error.TLabel", foreground=c["bad"])
    style.configure("TButton", padding=(10, 4), background=c["panel"], foreground=c["fg"])
    style.map("TButton", background=[("active", c["select"])])
    style.configure("Accent.TButton", background=c["accent"], foreground=c["accent_fg"])
    style.map("Accent.TButton", background=[("active", c["accent"]), ("disabled", c["border"])])
    style.configure("TNotebook", background=c["bg"], borderwidth=0)
    style.configure("TNotebook.Tab", padding=(14, 6), background=c["bg"], foreground=c["muted"])
    style.map("TNotebook.Tab", background=[("selected", c["panel"])],
              foreground=[("selected", c["fg"])])
    style.configure("Treeview", background=c["panel"], fieldbackground=c["panel"],
                    foreground=c["fg"], rowheight=24, borderwidth=0)
    style.configure("Treeview.Heading", background=c["bg"], foreground=c["muted"], font=small)
    style.map("Treeview", background=[("selected", c["select"])],
              foreground=[("selected", c["fg"])])
    style.configure("TCheckbutton", background=c["bg"])
    style.configure("TEntry", fieldbackground=c["field"], foreground=c["fg"])
    style.configure("TCombobox", fieldbackground=c["field"], foreground=c["fg"],
                    arrowcolor=c["fg"], background=c["panel"])
    # clam draws a readonly Combobox with its own pale field unless the states are mapped
    style.map("TCombobox", fieldbackground=[("readonly", c["field"]), ("disabled", c["bg"])],
              foreground=[("readonly", c["fg"]), ("disabled", c["muted"])],
              selectbackground=[("readonly", c["field"])],
              selectforeground=[("readonly", c["fg"])],
              background=[("readonly", c["panel"]), ("active", c["select"])])
    root.option_add("*TCombobox*Listbox.background", c["field"])
    root.option_add("*TCombobox*Listbox.foreground", c["fg"])
    root.option_add("*TCombobox*Listbox.selectBackground", c["select"])
    root.option_add("*TCombobox*Listbox.selectForeground", c["fg"])
    return c


def _tree(parent: Any, columns: list[tuple[str, str, int]], height: int = 10) -> Any:
    frame = ttk.Frame(parent)
    tree = ttk.Treeview(frame, columns=[c[0] for c in columns], show="headings", height=height,
                        selectmode="browse")
    for key, title, width in columns:        # only the last column stretches, so the others
        tree.heading(key, text=title)          # keep the widths that fit their text
        tree.column(key, width=width, anchor="w", stretch=key == columns[-1][0])
    tree.base_widths = {key: width for key, _, width in columns}
    bar = ttk.Scrollbar(frame, orient="vertical", command=tree.yview)
    across = ttk.Scrollbar(frame, orient="horizontal", command=tree.xview)

    def scrolled(first: str, last: str) -> None:     # shown only when the columns overflow
        if float(first) <= 0.0 and float(last) >= 1.0:
            across.grid_remove()
        else:
            across.grid()
        across.set(first, last)
    tree.configure(yscrollcommand=bar.set, xscrollcommand=scrolled)
    tree.grid(row=0, column=0, sticky="nsew")
    bar.grid(row=0, column=1, sticky="ns")
    across.grid(row=1, column=0, sticky="ew")
    across.grid_remove()
    frame.rowconfigure(0, weight=1)
    frame.columnconfigure(0, weight=1)
    tree.container = frame
    _fit_columns(tree)
    return tree


def _style_font(widget: Any, style_name: str) -> Any:
    desc = ttk.Style(widget).lookup(style_name, "font") or "TkDefaultFont"
    return tkfont.Font(root=widget, font=desc)


def _fit_columns(tree: Any, added: tuple | None = None) -> None:
    """Size each column to its heading and its longest cell, as the fonts measure them (cells
    up to GUI_COLUMN_MAX), and never narrower than that: the tree scrolls sideways instead.
    With ``added`` (one new row) the columns only widen for it, without measuring them all."""
    if not hasattr(tree, "fonts"):                      # measured often: made once per tree
        tree.fonts = (_style_font(tree, "Treeview.Heading"), _style_font(tree, "Treeview"))
    head, cell = tree.fonts
    rows = [added] if added is not None else [tree.item(i, "values")
                                              for i in tree.get_children()]
    for index, key in enumerate(tree["columns"]):
        title = tree.heading(key, "text")
        need = head.measure(title) + GUI_CELL_PAD
        longest = max((cell.measure(str(r[index])) for r in rows if index < len(r)), default=0)
        width = max(tree.base_widths.get(key, 0), need,
                    min(longest + GUI_CELL_PAD, GUI_COLUMN_MAX),
                    tree.column(key, "width") if added is not None else 0)
        tree.column(key, minwidth=width, width=width)


def _short(items: Iterable[Any], limit: int = 40) -> str:
    text = ", ".join(str(i) for i in items)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def format_record(rec: dict) -> tuple[str, ...]:
    """A request record as the Logs table shows it (no secret is in a record)."""
    tokens = "" if rec.get("input_tokens") is None and rec.get("output_tokens") is None else \
        f"{rec.get('input_tokens') or 0}/{rec.get('output_tokens') or 0}"
    latency = rec.get("latency_ms")
    return (time.strftime("%H:%M:%S", time.localtime(rec["time"])), rec["route"],
            rec.get("model") or "", rec.get("channel") or "", str(rec.get("status") or ""),
            f"{latency:.0f} ms" if latency is not None else "", tokens)


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.0f} ms"


def record_detail(rec: dict) -> str:
    lines = [f"{rec['method']} {rec['route']}  model={rec.get('model') or '-'}  "
             f"status={rec.get('status')}  {'stream' if rec.get('stream') else ''}",
             f"token: {rec.get('token') or '-'}   channel: {rec.get('channel') or '-'}   "
             f"tried: {', '.join(rec.get('tried') or []) or '-'}",
             f"latency: {_ms(rec.get('latency_ms'))}   first byte: {_ms(rec.get('ttfb_ms'))}   "
             f"bytes in/out: {rec.get('bytes_in')}/{rec.get('bytes_out')}"]
    if rec.get("upstream_model") and rec["upstream_model"] != rec.get("model"):
        lines.append(f"sent upstream as: {rec['upstream_model']}")
    if rec.get("affinity"):
        lines.append(f"session affinity: {rec['affinity']}")
    for f in rec.get("failures") or []:
        lines.append(f"  ✗ {f['channel']}: {f['status']} {f['error']}")
    if rec.get("skipped"):
        lines.append(f"skipped (cooling down): {', '.join(rec['skipped'])}")
    if rec.get("error"):
        lines.append(f"error: {rec['error']}")
    return "\n".join(lines)


def parse_mapping(text: str) -> dict[str, str]:
    """``client-name = upstream-name`` per line (or comma-separated) -> dict; raises ValueError."""
    out = {}
    for item in re.split(r"[\n,]", text):
        if not item.strip():
            continue
        left, sep, right = item.partition("=")
        if not sep or not left.strip() or not right.strip():
            raise ValueError(f"'{item.strip()}' is not 'client name = upstream name'")
        out[left.strip()] = right.strip()
    return out


def parse_headers(text: str) -> dict[str, str]:
    """Extra upstream headers as a JSON object or ``Name: value`` lines -> dict; raises
    ValueError naming the line and the fix."""
    text = text.strip()
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"Headers: the JSON object is not valid ({exc.msg} at column "
                             f"{exc.colno}); or write one 'Name: value' per line") from None
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise ValueError('Headers: write a JSON object of strings such as '
                             '{"HTTP-Referer": "https://example.com"}')
        pairs = list(value.items())
    else:
        pairs = []
        for line in text.splitlines():
            if not line.strip():
                continue
            name, sep, val = line.partition(":")
            if not sep or not name.strip():
                raise ValueError(f"Headers: '{line.strip()}' is not 'Name: value'")
            pairs.append((name.strip(), val.strip()))
    for name, val in pairs:
        if not header_ok(name, val):
            raise ValueError(f"Headers: '{name}' is not a header name (letters, digits and "
                             f"-, no spaces) or its value has a line break")
    return dict(pairs)


def validate_settings_form(values: dict[str, str]) -> dict[str, Any]:
    """The Settings tab's strings -> settings values; raises ValueError naming the field."""
    out: dict[str, Any] = {}
    host = values["host"].strip()
    if not host:
        raise ValueError("Host: enter an address, such as 127.0.0.1")
    out["host"] = host
    try:
        port = int(values["port"])
    except ValueError:
        raise ValueError("Port: enter a whole number from 1 to 65535") from None
    if not 1 <= port <= 65535:
        raise ValueError("Port: enter a whole number from 1 to 65535")
    out["port"] = port
    proxy = values["proxy"].strip()
    if proxy:
        u = urllib.parse.urlsplit(proxy)
        if u.scheme not in ("http", "socks5", "socks5h") or not u.hostname:
            raise ValueError("Proxy: use http://host:port, socks5://host:port or socks5h://…")
    out["proxy"] = proxy
    try:
        mb = float(values["max_body_mb"])
    except ValueError:
        raise ValueError("Max body: enter a number of MiB") from None
    if mb <= 0:
        raise ValueError("Max body: enter a positive number of MiB")
    out["max_body_mb"] = int(mb) if mb.is_integer() else mb
    out["cors_origins"] = [o.strip() for o in values["cors_origins"].split(",") if o.strip()]
    if not values["log_file"].strip():
        raise ValueError("Request log file: enter a file name")
    out["log_file"] = values["log_file"].strip()
    return out


class DashboardTab:
    def __init__(self, app: App, parent: Any):
        self.app = app
        self.frame = f = ttk.Frame(parent, padding=14)
        top = ttk.Frame(f)
        top.pack(fill="x")
        self.state = ttk.Label(top, text="● Stopped", style="Bad.TLabel")
        self.state.pack(side="left")
        self.address = ttk.Label(top, text="", style="Muted.TLabel")
        self.address.pack(side="left", padx=12)
        ttk.Button(top, text="Restart", command=app.restart).pack(side="right", padx=(6, 0))
        self.stop_button = ttk.Button(top, text="Stop", command=app.stop)
        self.stop_button.pack(side="right", padx=(6, 0))
        self.start_button = ttk.Button(top, text="Start", style="Accent.TButton",
                                       command=app.start)
        self.start_button.pack(side="right", padx=(6, 0))
        urls = ttk.Frame(f, style="Card.TFrame", padding=10)
        urls.pack(fill="x", pady=(12, 8))
        self.url_vars = {}
        for row, (label, key) in enumerate((("OpenAI base URL", "openai"),
                                            ("Anthropic base URL / Claude Code", "anthropic"),
                                            ("Gemini base URL / gemini-cli", "gemini"))):
            ttk.Label(urls, text=label, style="CardMuted.TLabel").grid(row=row, column=0,
                                                                      sticky="w", padx=(0, 12))
            var = tk.StringVar()
            self.url_vars[key] = var
            ttk.Entry(urls, textvariable=var, state="readonly", width=44).grid(
                row=row, column=1, sticky="we", pady=2)
            ttk.Button(urls, text="Copy", command=lambda v=var: app.copy(v.get())).grid(
                row=row, column=2, padx=(8, 0))
        urls.columnconfigure(1, weight=1)
        cards = ttk.Frame(f)
        cards.pack(fill="x")
        self.counters = {}
        for i, (key, title) in enumerate((("requests", "Requests"), ("errors", "Errors"),
                                          ("tokens_in", "Tokens in"), ("tokens_out", "Tokens out"),
                                          ("median", "Median latency"))):
            card = ttk.Frame(cards, style="Card.TFrame", padding=(12, 8))
            card.grid(row=0, column=i, sticky="we", padx=(0 if i == 0 else 8, 0))
            cards.columnconfigure(i, weight=1)
            ttk.Label(card, text=title, style="CardMuted.TLabel").pack(anchor="w")
            var = tk.StringVar(value="—" if key == "median" else "0")
            self.counters[key] = var
            ttk.Label(card, textvariable=var, style="Big.TLabel").pack(anchor="w")
        ttk.Label(f, text="Requests per minute", style="Muted.TLabel").pack(anchor="w",
                                                                          pady=(10, 2))
        colors = app.colors
        self.chart = tk.Canvas(f, height=90, background=colors["panel"], highlightthickness=1,
                               highlightbackground=colors["border"])
        self.chart.pack(fill="x")
        self.chart.bind("<Configure>", lambda e: self.draw_chart())
        bottom = ttk.Frame(f)
        bottom.pack(fill="both", expand=True, pady=(10, 0))
        left = ttk.Frame(bottom)
        left.pack(side="left", fill="both", expand=True)
        ttk.Label(left, text="Channel health", style="Muted.TLabel").pack(anchor="w")
        self.health = _tree(left, [("channel", "Channel", 130), ("state", "State", 100),
                                   ("status", "Last status", 70), ("latency", "Latency", 70),
                                   ("fails", "Recent failures", 100)], height=6)
        self.health.container.pack(fill="both", expand=True)
        right = ttk.Frame(bottom)
        right.pack(side="left", fill="both", expand=True, padx=(10, 0))
        ttk.Label(right, text="Activity", style="Muted.TLabel").pack(anchor="w")
        self.activity = tk.Text(right, height=8, wrap="word", relief="flat",
                                background=colors["panel"], foreground=colors["fg"],
                                font=("TkFixedFont", 9), state="disabled")
        self.activity.pack(fill="both", expand=True)
        self.latencies: collections.deque[float] = collections.deque(maxlen=500)
        self.per_minute: collections.Counter[int] = collections.Counter()
        self.health_rows: dict[str, dict] = {}
        self.totals = {"requests": 0, "errors": 0, "tokens_in": 0, "tokens_out": 0}

    def set_state(self, running: bool, url: str = "") -> None:
        self.state.configure(text="● Running" if running else "● Stopped",
                             style="Ok.TLabel" if running else "Bad.TLabel")
        self.start_button.configure(state="disabled" if running else "normal")
        self.stop_button.configure(state="normal" if running else "disabled")
        self.address.configure(text=f"listening on {url}" if running else "")
        self.url_vars["openai"].set(f"{url}/v1" if running else "")
        self.url_vars["anthropic"].set(url if running else "")
        self.url_vars["gemini"].set(url if running else "")

    def log(self, text: str) -> None:
        self.activity.configure(state="normal")
        self.activity.insert("end", f"{time.strftime('%H:%M:%S')}  {text}\n")
        if int(self.activity.index("end-1c").split(".")[0]) > 500:
            self.activity.delete("1.0", "100.0")
        self.activity.see("end")
        self.activity.configure(state="disabled")

    def add_record(self, rec: dict) -> None:
        t = self.totals
        t["requests"] += 1
        failed = rec.get("error") is not None or (rec.get("status") or 500) >= 400
        t["errors"] += failed
        t["tokens_in"] += rec.get("input_tokens") or 0
        t["tokens_out"] += rec.get("output_tokens") or 0
        if rec.get("latency_ms") is not None:
            self.latencies.append(rec["latency_ms"])
        for key, value in t.items():
            self.counters[key].set(f"{value:,}")
        if self.latencies:
            self.counters["median"].set(f"{statistics_median(self.latencies):.0f} ms")
        self.per_minute[int(rec["time"] // 60)] += 1
        for f in rec.get("failures") or []:
            row = self.health_rows.setdefault(f["channel"], {"fails": 0})
            row.update(status=f["status"], latency="")
            row["fails"] += 1
        if rec.get("channel") and rec["channel"] != "(local estimate)":
            row = self.health_rows.setdefault(rec["channel"], {"fails": 0})
            row.update(status=rec.get("status"), latency=f"{rec.get('ttfb_ms') or 0:.0f} ms",
                       state="ok")
        self.draw_health()
        self.draw_chart()

    def draw_health(self) -> None:
        self.health.delete(*self.health.get_children())
        for name, row in sorted(self.health_rows.items()):
            self.health.insert("", "end", values=(name, row.get("state") or "ok",
                                                  row.get("status") or "",
                                                  row.get("latency") or "", row["fails"]))
        _fit_columns(self.health)

    def set_health(self, report: list[dict]) -> None:
        """A channel health report from the gateway (cooldowns, probes)."""
        for entry in report:
            row = self.health_rows.setdefault(entry["name"], {"fails": 0})
            state = entry["state"]
            if state == "cooldown":
                state = f"cooldown {entry['cooldown_remaining_s']:.0f} s"
            row["state"] = state
        self.draw_health()

    def draw_chart(self) -> None:
        c, colors = self.chart, self.app.colors
        c.delete("all")
        width, height = max(c.winfo_width(), 100), max(c.winfo_height(), 60)
        now = int(time.time() // 60)
        counts = [self.per_minute.get(now - i, 0) for i in range(CHART_MINUTES - 1, -1, -1)]
        top = max(counts)
        bar = width / CHART_MINUTES
        c.create_line(0, height - 4, width, height - 4, fill=colors["border"])
        for i, n in enumerate(counts):
            if n:
                h = (height - 20) * n / top
                c.create_rectangle(i * bar + 2, height - 4 - h, (i + 1) * bar - 2, height - 4,
                                   fill=colors["accent"], outline="")
        c.create_text(6, 4, anchor="nw", fill=colors["muted"], font=("TkDefaultFont", 8),
                      text=f"last {CHART_MINUTES} min, peak {top}/min" if top else
                      "no requests in the last 30 minutes")


def statistics_median(values: Iterable[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _dialog(app: App, title: str, parent: Any = None) -> tuple[Any, Any]:
    """A themed Toplevel over ``parent`` (the main window by default) and its padded body."""
    owner = parent or app.root
    top = tk.Toplevel(owner)
    top.withdraw()                       # shown once built and placed, so it never jumps
    top.title(title)
    top.transient(owner)
    top.configure(background=app.colors["bg"])
    body = ttk.Frame(top, padding=14)
    body.pack(fill="both", expand=True)
    top.after_idle(lambda: _center_over(top, owner))
    return top, body


def _field_text(value: Any) -> str:
    """A channel type's field as its dialog entry shows it (a JSON object as JSON)."""
    return json.dumps(value, ensure_ascii=False) if isinstance(value, dict) else str(value)


def _changed(fields: dict, original: dict) -> dict:
    """The dialog's fields that differ from the item it opened with: only these are saved, so
    an edit of the file made while the dialog was open survives."""
    return {k: v for k, v in fields.items() if v != original.get(k)}


def _center_over(top: Any, owner: Any) -> None:
    """Place ``top`` centred over ``owner``, kept on the screen, then show it."""
    if not top.winfo_exists():
        return
    if not owner.winfo_viewable():        # the main window is not on screen yet
        top.after(GUI_POLL_MS, lambda: _center_over(top, owner))
        return
    top.update_idletasks()
    w, h = top.winfo_reqwidth(), top.winfo_reqheight()
    x = owner.winfo_rootx() + (owner.winfo_width() - w) // 2
    y = owner.winfo_rooty() + (owner.winfo_height() - h) // 2
    x = max(0, min(x, top.winfo_screenwidth() - w))
    y = max(0, min(y, top.winfo_screenheight() - h))
    top.geometry(f"+{x}+{y}")
    top.deiconify()


class ChannelDialog:
    """Add or edit one channel. ``result`` holds the saved channel's fields after Save."""

    def __init__(self, app: App, channel: dict | None):
        self.app, self.channel = app, channel
        self.top, body = _dialog(app, "Edit channel" if channel else "Add channel")
        top = self.top
        c = channel or dict(CHANNEL_DEFAULTS, base_url=CHANNEL_DEFAULT_URLS[TYPE_OPENAI])
        self.vars = {
            "name": tk.StringVar(value=c.get("name", "")),
            "type": tk.StringVar(value=c.get("type", TYPE_OPENAI)),
            "base_url": tk.StringVar(value=c.get("base_url", "")),
            "api_key": tk.StringVar(value=c.get("api_key", "")),
            "models": tk.StringVar(value=", ".join(c.get("models", []))),
            "priority": tk.StringVar(value=str(c.get("priority", 0))),
            "weight": tk.StringVar(value=f"{c.get('weight', 1):g}"),
            "timeout": tk.StringVar(value=f"{c.get('timeout', DEFAULT_CHANNEL_TIMEOUT):g}"),
            "max_tokens_cap": tk.StringVar(value=str(c.get("max_tokens_cap", 0))),
            "api_keys": tk.StringVar(value=", ".join(c.get("api_keys", []))),
            "max_concurrency": tk.StringVar(value=str(c.get("max_concurrency", 0))),
            "thinking": tk.StringVar(value=c.get("thinking", "auto")),
            "preset": tk.StringVar(value=c.get("preset", "")),
            "quirks": tk.StringVar(value=json.dumps(c.get("quirks", {}), ensure_ascii=False)),
            "proxy": tk.StringVar(value=c.get("proxy", "")),
            "verify_tls": tk.BooleanVar(value=c.get("verify_tls", True)),
            "responses_api": tk.BooleanVar(value=c.get("responses_api", False)),
            "enabled": tk.BooleanVar(value=c.get("enabled", True)),
            "show_key": tk.BooleanVar(value=False),
        }
        row = 0

        def field(label: str, widget: Any, hint: str = "") -> None:
            nonlocal row
            ttk.Label(body, text=label).grid(row=row, column=0, sticky="nw", pady=3, padx=(0, 10))
            widget.grid(row=row, column=1, sticky="we", pady=3)
            if hint:
                ttk.Label(body, text=hint, style="Muted.TLabel").grid(row=row, column=2,
                                                                     sticky="w", padx=(8, 0))
            row += 1
        field("Name", ttk.Entry(body, textvariable=self.vars["name"], width=42))
        self.preset_box = ttk.Combobox(body, textvariable=self.vars["preset"], state="readonly",
                                       values=("", *PRESETS))
        self.preset_box.bind("<<ComboboxSelected>>", self._preset_changed)
        self.preset_note = ttk.Label(body, text=self._preset_note(), style="Muted.TLabel",
                                     wraplength=260)
        field("Preset", self.preset_box)
        self.preset_note.grid(row=row - 1, column=2, sticky="w", padx=(8, 0))
        self.type_box = ttk.Combobox(body, textvariable=self.vars["type"], state="readonly",
                                     values=CHANNEL_TYPES)
        self.type_box.bind("<<ComboboxSelected>>", self._type_changed)
        field("Type", self.type_box)
        field("Base URL", ttk.Entry(body, textvariable=self.vars["base_url"]),
              "empty = the type's default")
        # The fields of the chosen type only (Bedrock's region and keys, Vertex's project...).
        self.type_vars = {name: tk.StringVar(value=_field_text(c.get(name, f.default)))
                          for p in PROVIDERS.values() for name, f in p.fields.items()}
        self.type_frame = ttk.Frame(body)
        self.type_frame.grid(row=row, column=0, columnspan=3, sticky="we")
        self.type_frame.columnconfigure(1, weight=1)
        self.type_entries: list[Any] = []
        row += 1
        keyrow = ttk.Frame(body)
        self.key_entry = ttk.Entry(keyrow, textvariable=self.vars["api_key"], show="•")
        self.key_entry.pack(side="left", fill="x", expand=True)
        ttk.Checkbutton(keyrow, text="Show", variable=self.vars["show_key"],
                        command=self._toggle_keys).pack(side="left", padx=(6, 0))
        field("API key", keyrow)
        self.more_keys = ttk.Entry(body, textvariable=self.vars["api_keys"], show="•")
        field("More API keys", self.more_keys, "comma list, used in turn")
        modelrow = ttk.Frame(body)
        ttk.Entry(modelrow, textvariable=self.vars["models"]).pack(side="left", fill="x",
                                                                   expand=True)
        self.fetch_button = ttk.Button(modelrow, text="Fetch models", command=self.fetch)
        self.fetch_button.pack(side="left", padx=(6, 0))
        field("Models", modelrow, "comma list; * wildcards; empty = all")
        self.mapping = tk.Text(body, height=3, width=40, relief="flat",
                               background=app.colors["field"], foreground=app.colors["fg"])
        self.mapping.insert("1.0", "\n".join(f"{k} = {v}" for k, v in
                                             c.get("model_mapping", {}).items()))
        field("Model mapping", self.mapping,
              "client name (or a pattern: claude-*) = upstream name")
        field("Priority", ttk.Entry(body, textvariable=self.vars["priority"], width=8),
              "lower is tried first")
        field("Weight", ttk.Entry(body, textvariable=self.vars["weight"], width=8),
              "share among channels of equal priority")
        field("Timeout (s)", ttk.Entry(body, textvariable=self.vars["timeout"], width=8))
        field("Max tokens cap", ttk.Entry(body, textvariable=self.vars["max_tokens_cap"],
                                          width=8), "0 = none")
        field("Max concurrency", ttk.Entry(body, textvariable=self.vars["max_concurrency"],
                                           width=8), "0 = no limit")
        field("Claude thinking", ttk.Combobox(body, textvariable=self.vars["thinking"], width=9,
                                              values=THINKING_MODES, state="readonly"),
              "auto = by model name")
        field("Quirks", ttk.Entry(body, textvariable=self.vars["quirks"]),
              'JSON, e.g. {"tool_call_id": "mistral9"}')
        field("Proxy", ttk.Entry(body, textvariable=self.vars["proxy"]),
              "http:// or socks5://")
        self.headers = tk.Text(body, height=3, width=40, relief="flat",
                               background=app.colors["field"], foreground=app.colors["fg"])
        self.headers.insert("1.0", "\n".join(f"{k}: {v}" for k, v in
                                             c.get("headers", {}).items()))
        field("Extra headers", self.headers, "Name: value per line, or a JSON object")
        field("", ttk.Checkbutton(body, text="Verify TLS certificates",
                                  variable=self.vars["verify_tls"]))
        field("", ttk.Checkbutton(body, text="Pass /v1/responses through",
                                  variable=self.vars["responses_api"]),
              "the upstream has the Responses API")
        field("", ttk.Checkbutton(body, text="Enabled", variable=self.vars["enabled"]))
        self.error = ttk.Label(body, text="", style="Error.TLabel", wraplength=420)
        self.error.grid(row=row, column=0, columnspan=3, sticky="w", pady=(6, 0))
        row += 1
        buttons = ttk.Frame(body)
        buttons.grid(row=row, column=0, columnspan=3, sticky="e", pady=(10, 0))
        ttk.Button(buttons, text="Cancel", command=top.destroy).pack(side="right")
        ttk.Button(buttons, text="Save", style="Accent.TButton", command=self.save).pack(
            side="right", padx=(0, 6))
        body.columnconfigure(1, weight=1)
        self.result: dict | None = None
        self._show_type_fields()
        top.bind("<Escape>", lambda e: top.destroy())

    def _show_type_fields(self) -> None:
        """One row per field of the chosen channel type; secret ones masked like the key."""
        for child in self.type_frame.winfo_children():
            child.destroy()
        self.type_entries = []
        fields = PROVIDERS[self.vars["type"].get()].fields
        for i, (name, f) in enumerate(fields.items()):
            ttk.Label(self.type_frame, text=f.label).grid(row=i, column=0, sticky="nw", pady=3,
                                                          padx=(0, 10))
            entry = ttk.Entry(self.type_frame, textvariable=self.type_vars[name],
                              show="•" if f.secret and not self.vars["show_key"].get() else "")
            entry.grid(row=i, column=1, sticky="we", pady=3)
            if f.secret:
                self.type_entries.append(entry)
            ttk.Label(self.type_frame, text=f.what, style="Muted.TLabel", wraplength=260).grid(
                row=i, column=2, sticky="w", padx=(8, 0))

    def _type_fields(self) -> dict:
        """The chosen type's fields as the config holds them (a JSON object where one is
        taken and the text is one)."""
        out: dict[str, Any] = {}
        for name, f in PROVIDERS[self.vars["type"].get()].fields.items():
            text = self.type_vars[name].get().strip()
            if dict in f.types and text.startswith("{"):
                try:
                    out[name] = json.loads(text)
                except ValueError:
                    raise ValueError(f"{f.label} is a file path or a JSON object") from None
            else:
                out[name] = text
        return out

    def _toggle_keys(self) -> None:
        show = "" if self.vars["show_key"].get() else "•"
        self.key_entry.configure(show=show)
        self.more_keys.configure(show=show)
        for entry in self.type_entries:
            entry.configure(show=show)

    def _preset_note(self) -> str:
        p = PRESETS.get(self.vars["preset"].get())
        return "; ".join(filter(None, (p["label"], p.get("notes", "")))) if p else \
            "a known service: fills type, base URL, quirks"

    def _preset_changed(self, _event: Any = None) -> None:
        """A preset picked: its type, base URL, quirks and headers go into the fields (the
        user can still edit them)."""
        name = self.vars["preset"].get()
        self.preset_note.configure(text=self._preset_note())
        p = PRESETS.get(name)
        if p is None:
            return
        self.vars["type"].set(p["type"])
        self._show_type_fields()
        self.vars["base_url"].set(p["base_url"])
        self.vars["quirks"].set(json.dumps(p.get("quirks", {}), ensure_ascii=False))
        if p.get("headers"):
            try:
                headers = parse_headers(self.headers.get("1.0", "end"))
            except ValueError:
                headers = {}
            self.headers.delete("1.0", "end")
            self.headers.insert("1.0", "\n".join(f"{k}: {v}" for k, v in
                                                 {**p["headers"], **headers}.items()))
        if not self.vars["name"].get().strip():
            self.vars["name"].set(name)

    def _type_changed(self, _event: Any = None) -> None:
        current = self.vars["base_url"].get().strip()
        if not current or current in CHANNEL_DEFAULT_URLS.values():
            self.vars["base_url"].set(CHANNEL_DEFAULT_URLS[self.vars["type"].get()])
        self._show_type_fields()

    def fields(self) -> dict:
        v = self.vars
        try:
            priority, cap = int(v["priority"].get()), int(v["max_tokens_cap"].get())
            concurrency = int(v["max_concurrency"].get())
        except ValueError:
            raise ValueError("Priority, max tokens cap and max concurrency are whole "
                             "numbers") from None
        try:
            timeout = float(v["timeout"].get())
        except ValueError:
            raise ValueError("Timeout is a number of seconds") from None
        try:
            quirks = json.loads(v["quirks"].get().strip() or "{}")
        except ValueError:
            quirks = None
        if not isinstance(quirks, dict):
            raise ValueError('Quirks is a JSON object, such as {"tool_call_id": "mistral9"} '
                             'or {}')
        try:
            weight = float(v["weight"].get())
        except ValueError:
            raise ValueError("Weight is a positive number, such as 1 or 3") from None
        preset = {"preset": v["preset"].get()} if v["preset"].get() or \
            "preset" in (self.channel or {}) else {}
        return {**preset, **self._type_fields(), "quirks": quirks,
                "name": v["name"].get().strip(), "type": v["type"].get(),
                "base_url": v["base_url"].get().strip(), "api_key": v["api_key"].get().strip(),
                "models": [m.strip() for m in v["models"].get().split(",") if m.strip()],
                "model_mapping": parse_mapping(self.mapping.get("1.0", "end")),
                "priority": priority, "timeout": int(timeout) if timeout.is_integer() else timeout,
                "weight": int(weight) if weight.is_integer() else weight,
                "max_tokens_cap": cap, "max_concurrency": concurrency,
                "thinking": v["thinking"].get(),
                "api_keys": [k.strip() for k in v["api_keys"].get().split(",") if k.strip()],
                "proxy": v["proxy"].get().strip(),
                "headers": parse_headers(self.headers.get("1.0", "end")),
                "verify_tls": v["verify_tls"].get(), "responses_api": v["responses_api"].get(),
                "enabled": v["enabled"].get()}

    def save(self) -> None:
        try:
            fields = self.fields()
            store = self.app.store
            if self.channel:
                self.result = store.update_channel(self.channel["id"],
                                                   **_changed(fields, self.channel))
            else:
                self.result = store.add_channel(**fields)
        except (ValueError, ConfigError) as exc:
            self.error.configure(text=str(exc).split(": ", 1)[-1] if isinstance(
                exc, ConfigError) else str(exc))
            return
        self.app.config_changed(f"channel '{self.result['name']}' saved")
        self.top.destroy()

    def fetch(self) -> None:
        """Ask the upstream for its models on the server loop; pick from the answer."""
        try:
            fields = self.fields()
            probe = validate_config({"channels": [dict(fields, id=1)]},
                                    "channel")["channels"][0]
        except (ValueError, ConfigError) as exc:
            self.error.configure(text=str(exc))
            return
        self.fetch_button.configure(state="disabled", text="Fetching…")
        ch = Channel(probe, self.app.store.data["settings"]["proxy"])
        self.app.run_task(lambda gw: gw.fetch_models(ch), self._fetched)

    def _fetched(self, ok: bool, value: Any) -> None:
        if not self.top.winfo_exists():
            return
        self.fetch_button.configure(state="normal", text="Fetch models")
        if not ok:
            self.error.configure(text=f"Fetch failed: {value}")
            return
        self.picker = ModelPicker(self.app, self.top, value, self.vars["models"])


class ModelPicker:
    def __init__(self, app: App, parent: Any, names: list[str], target: Any):
        self.top, frame = _dialog(app, "Pick models", parent)
        self.target = target
        ttk.Label(frame, text=f"{len(names)} models; select the ones to serve",
                  style="Muted.TLabel").pack(anchor="w")
        self.listbox = tk.Listbox(frame, selectmode="extended", height=14, width=48,
                                  background=app.colors["panel"], foreground=app.colors["fg"],
                                  relief="flat")
        current = {m.strip() for m in target.get().split(",")}
        for i, name in enumerate(names):
            self.listbox.insert("end", name)
            if name in current:
                self.listbox.selection_set(i)
        self.listbox.pack(fill="both", expand=True, pady=6)
        ttk.Button(frame, text="Use selected", style="Accent.TButton",
                   command=self.use).pack(anchor="e")

    def use(self) -> None:
        picked = [self.listbox.get(i) for i in self.listbox.curselection()]
        self.target.set(", ".join(picked))
        self.top.destroy()


class _ListTab:
    """A table of configured channels or tokens with the actions both have: a toolbar, edit on
    double-click, enable/disable in place and delete after a confirmation."""

    kind = ""                                       # "channel" or "token"
    COLUMNS: list[tuple[str, str, int]] = []

    def __init__(self, app: App, parent: Any, buttons: list[tuple[str, Callable[[], None]]]):
        self.app = app
        self.frame = f = ttk.Frame(parent, padding=14)
        bar = ttk.Frame(f)
        bar.pack(fill="x", pady=(0, 8))
        for i, (text, cmd) in enumerate(buttons):
            ttk.Button(bar, text=text, command=cmd,
                       style="Accent.TButton" if i == 0 else "TButton").pack(
                side="left", padx=(0 if i == 0 else 6, 0))
        self.tree = _tree(f, self.COLUMNS, height=14)
        self.tree.container.pack(fill="both", expand=True)
        self.tree.bind("<Double-1>", lambda e: self.edit())
        self.dialog: Any = None

    def row(self, item: dict) -> tuple:
        raise NotImplementedError

    def open_dialog(self, item: dict | None) -> None:
        raise NotImplementedError

    def refresh(self) -> None:
        self.tree.delete(*self.tree.get_children())
        for item in self.app.store.data[self.kind + "s"]:
            self.tree.insert("", "end", iid=str(item["id"]), values=self.row(item))
        _fit_columns(self.tree)

    def selected(self) -> dict | None:
        sel = self.tree.selection()
        return self.app.store.get(self.kind, int(sel[0])) if sel else None

    def edit(self) -> None:
        item = self.selected()
        if item:
            self.open_dialog(item)

    def toggle(self) -> None:
        item = self.selected()
        if item:
            update = getattr(self.app.store, f"update_{self.kind}")
            self.app.save(lambda: update(item["id"], enabled=not item["enabled"]),
                          f"{self.kind} '{item['name']}' "
                          f"{'disabled' if item['enabled'] else 'enabled'}")

    def delete(self) -> None:
        item = self.selected()
        if item and self.app.confirm(f"Delete {self.kind}", f"Delete {self.kind} "
                                                             f"'{item['name']}'?"):
            remove = getattr(self.app.store, f"delete_{self.kind}")
            self.app.save(lambda: remove(item["id"]), f"{self.kind} '{item['name']}' deleted")


class ChannelsTab(_ListTab):
    kind = "channel"
    COLUMNS = [("name", "Name", 130), ("type", "Type", 80), ("base_url", "Base URL", 230),
               ("models", "Models", 170), ("priority", "Priority", 60),
               ("enabled", "Enabled", 60), ("result", "Last result", 150)]

    def __init__(self, app: App, parent: Any):
        self.results: dict[int, str] = {}
        super().__init__(app, parent, [("Add", self.add), ("Edit", self.edit),
                                       ("Duplicate", self.duplicate),
                                       ("Enable / Disable", self.toggle), ("Test", self.test),
                                       ("Delete", self.delete)])
        self.hint = ttk.Label(self.tree.container, style="CardMuted.TLabel", justify="center",
                              text="No channels yet. Click Add to connect an upstream: OpenAI, "
                                   "Anthropic, Gemini,\nOllama or any OpenAI-compatible server "
                                   "(or edit config.json; see the README).")
        self.detail = ttk.Label(self.frame, text="", style="Muted.TLabel", wraplength=1000)
        self.detail.pack(fill="x", pady=(6, 0))
        self.tree.bind("<<TreeviewSelect>>", lambda e: self.show_detail())
        self.refresh()

    def refresh(self) -> None:
        super().refresh()
        if self.app.store.data["channels"]:
            self.hint.place_forget()
        else:
            self.hint.place(relx=0.5, rely=0.35, anchor="center")
        self.show_detail()

    def show_detail(self) -> None:
        """The selected channel's whole last test result, which its column may cut off."""
        c = self.selected()
        result = self.results.get(c["id"], "") if c else ""
        self.detail.configure(text=f"Last result of '{c['name']}': {result}" if result else "")

    def row(self, c: dict) -> tuple:
        return (c["name"], c["type"], c["base_url"], _short(c["models"]) or "(all)",
                c["priority"], "yes" if c["enabled"] else "no", self.results.get(c["id"], ""))

    def open_dialog(self, item: dict | None) -> None:
        self.dialog = ChannelDialog(self.app, item)

    def add(self) -> None:
        self.open_dialog(None)

    def duplicate(self) -> None:
        c = self.selected()
        if not c:
            return
        names = {x["name"].lower() for x in self.app.store.data["channels"]}
        n = 2
        while f"{c['name']} ({n})".lower() in names:
            n += 1
        fields = {k: v for k, v in c.items() if k != "id"}
        fields["name"] = f"{c['name']} ({n})"
        self.app.save(lambda: self.app.store.add_channel(**fields), "channel duplicated")

    def test(self) -> None:
        c = self.selected()
        if not c:
            return
        cid = c["id"]
        self.results[cid] = "testing…"
        self.refresh()
        ch = Channel(c, self.app.store.data["settings"]["proxy"])

        def done(ok: bool, value: Any) -> None:
            self.results[cid] = (f"✓ {value['latency_ms']:.0f} ms ({value['model']})" if ok
                                 else f"✗ {value}"[:GUI_RESULT_CHARS])
            self.app.dashboard.log(f"test of '{c['name']}': {self.results[cid]}")
            self.refresh()
        self.app.run_task(lambda gw: gw.test_channel(ch), done)


class TokensTab(_ListTab):
    kind = "token"
    COLUMNS = [("name", "Name", 140), ("key", "Key", 170), ("enabled", "Enabled", 60),
               ("models", "Allowed models", 200), ("channels", "Allowed channels", 200)]

    def __init__(self, app: App, parent: Any):
        self.shown_key: str | None = None
        super().__init__(app, parent, [("Create", self.create), ("Edit limits", self.edit),
                                       ("Enable / Disable", self.toggle),
                                       ("Delete", self.delete)])
        self.refresh()

    def row(self, t: dict) -> tuple:
        return (t["name"], mask_secret(t["key"]), "yes" if t["enabled"] else "no",
                _short(t["allowed_models"]) or "(all)",
                _short(t["allowed_channels"]) or "(all)")

    def open_dialog(self, item: dict | None) -> None:
        self.dialog = TokenDialog(self.app, item)

    def create(self) -> None:
        self.open_dialog(None)

    def show_once(self, name: str, key: str) -> None:
        """The new key, shown this once with a copy button."""
        self.shown_key = key
        top, frame = _dialog(self.app, "New token")
        ttk.Label(frame, text=f"Token '{name}' created. Copy it now: it is shown only once.",
                  wraplength=420).pack(anchor="w")
        # the text is inserted, not bound to a StringVar: a variable that only this function
        # held was collected on return and Tk then showed an empty box
        self.key_entry = ttk.Entry(frame, width=56)
        self.key_entry.insert(0, key)
        self.key_entry.configure(state="readonly")
        self.key_entry.pack(fill="x", pady=8)
        buttons = ttk.Frame(frame)
        buttons.pack(anchor="e")
        ttk.Button(buttons, text="Copy", style="Accent.TButton",
                   command=lambda: self.app.copy(key)).pack(side="left")
        ttk.Button(buttons, text="Close", command=top.destroy).pack(side="left", padx=(6, 0))
        self.key_window = top


class TokenDialog:
    def __init__(self, app: App, token: dict | None):
        self.app, self.token = app, token
        self.top, body = _dialog(app, "Edit token" if token else "Create token")
        top = self.top
        self.name = tk.StringVar(value=token["name"] if token else "")
        ttk.Label(body, text="Name").grid(row=0, column=0, sticky="w")
        ttk.Entry(body, textvariable=self.name, width=36).grid(row=0, column=1, sticky="we",
                                                               pady=3)
        models = sorted({m for c in app.store.data["channels"] for m in
                         list(c["models"]) + list(c["model_mapping"])})
        channels = [c["name"] for c in app.store.data["channels"]]
        self.models = self._list(body, 1, "Allowed models (none = all)", models,
                                 token["allowed_models"] if token else [])
        self.extra = tk.StringVar(value=", ".join(m for m in (token or {}).get(
            "allowed_models", []) if m not in models))
        ttk.Label(body, text="More patterns", style="Muted.TLabel").grid(row=2, column=0,
                                                                        sticky="w")
        ttk.Entry(body, textvariable=self.extra).grid(row=2, column=1, sticky="we", pady=3)
        allowed = {str(x).lower() for x in (token or {}).get("allowed_channels", [])}
        ids = {str(c["id"]): c["name"] for c in app.store.data["channels"]}
        self.channels = self._list(body, 3, "Allowed channels (none = all)", channels,
                                   [n for n in channels if n.lower() in allowed or any(
                                       ids.get(a) == n for a in allowed)])
        self.rpm = tk.StringVar(value=str((token or {}).get("rpm", 0)))
        ttk.Label(body, text="Requests per minute").grid(row=4, column=0, sticky="w")
        ttk.Entry(body, textvariable=self.rpm, width=8).grid(row=4, column=1, sticky="w",
                                                             pady=3)
        self.error = ttk.Label(body, text="", style="Error.TLabel")
        self.error.grid(row=5, column=0, columnspan=2, sticky="w")
        buttons = ttk.Frame(body)
        buttons.grid(row=6, column=0, columnspan=2, sticky="e", pady=(8, 0))
        ttk.Button(buttons, text="Cancel", command=top.destroy).pack(side="right")
        ttk.Button(buttons, text="Save" if token else "Create", style="Accent.TButton",
                   command=self.save).pack(side="right", padx=(0, 6))
        body.columnconfigure(1, weight=1)

    def _list(self, body: Any, row: int, label: str, items: list[str],
              selected: list[str]) -> Any:
        ttk.Label(body, text=label).grid(row=row, column=0, sticky="nw", pady=3, padx=(0, 10))
        lb = tk.Listbox(body, selectmode="multiple", height=min(8, max(3, len(items))),
                        exportselection=False, background=self.app.colors["panel"],
                        foreground=self.app.colors["fg"], relief="flat")
        for i, item in enumerate(items):
            lb.insert("end", item)
            if item in selected:
                lb.selection_set(i)
        lb.grid(row=row, column=1, sticky="we", pady=3)
        return lb

    def save(self) -> None:
        models = [self.models.get(i) for i in self.models.curselection()] + [
            m.strip() for m in self.extra.get().split(",") if m.strip()]
        channels = [self.channels.get(i) for i in self.channels.curselection()]
        name = self.name.get().strip()
        if not name:
            self.error.configure(text="Give the token a name")
            return
        try:
            rpm = int(self.rpm.get() or 0)
        except ValueError:
            self.error.configure(text="Requests per minute is a whole number (0 = no limit)")
            return
        fields = {"name": name, "allowed_models": models, "allowed_channels": channels,
                  "rpm": rpm}
        try:
            if self.token:
                self.app.store.update_token(self.token["id"], **_changed(fields, self.token))
            else:
                created = self.app.store.add_token(**fields)
        except ConfigError as exc:
            self.error.configure(text=str(exc).split(": ", 1)[-1])
            return
        self.app.config_changed(f"token '{name}' saved")
        self.top.destroy()
        if not self.token:
            self.app.tokens.show_once(name, created["key"])


class SettingsTab:
    def __init__(self, app: App, parent: Any):
        self.app = app
        self.frame = f = ttk.Frame(parent, padding=14)
        self.vars = {k: tk.StringVar() for k in
                     ("host", "port", "proxy", "max_body_mb", "log_file", "cors_origins")}
        self.flags = {k: tk.BooleanVar() for k in
                      ("require_auth", "enable_fallback", "log_requests", "start_on_open")}
        self.theme = tk.StringVar()
        self.shown: dict[str, Any] = {}         # each field's value as loaded from the store
        self.reload()
        rows = [("Host", "host", "127.0.0.1 = this machine only"), ("Port", "port", ""),
                ("Proxy", "proxy", "default for channels without their own"),
                ("Max body (MiB)", "max_body_mb", ""),
                ("CORS origins", "cors_origins", "comma list; * = any; empty = off"),
                ("Request log file", "log_file", "relative to the config file")]
        for i, (label, key, hint) in enumerate(rows):
            ttk.Label(f, text=label).grid(row=i, column=0, sticky="w", pady=3, padx=(0, 10))
            ttk.Entry(f, textvariable=self.vars[key], width=36).grid(row=i, column=1,
                                                                     sticky="we", pady=3)
            ttk.Label(f, text=hint, style="Muted.TLabel").grid(row=i, column=2, sticky="w",
                                                              padx=(8, 0))
        row = len(rows)
        for key, label in (("require_auth", "Require a gateway token"),
                           ("enable_fallback", "Fall back to the next channel on failure"),
                           ("log_requests", "Write the request log"),
                           ("start_on_open", "Start the gateway when the app opens")):
            ttk.Checkbutton(f, text=label, variable=self.flags[key],
                            command=self.update_warning).grid(row=row, column=1, sticky="w",
                                                              pady=2)
            row += 1
        ttk.Label(f, text="Theme").grid(row=row, column=0, sticky="w", pady=3)
        ttk.Combobox(f, textvariable=self.theme, values=list(THEMES), state="readonly",
                     width=10).grid(row=row, column=1, sticky="w", pady=3)
        row += 1
        self.warning = ttk.Label(f, text="", style="Warn.TLabel", wraplength=560)
        self.warning.grid(row=row, column=0, columnspan=3, sticky="w", pady=(8, 0))
        self.error = ttk.Label(f, text="", style="Error.TLabel", wraplength=560)
        self.error.grid(row=row + 1, column=0, columnspan=3, sticky="w")
        ttk.Button(f, text="Save", style="Accent.TButton", command=self.save).grid(
            row=row + 2, column=1, sticky="w", pady=(10, 0))
        f.columnconfigure(1, weight=1)
        self.vars["host"].trace_add("write", lambda *a: self.update_warning())
        self.update_warning()

    def _form(self) -> dict[str, Any]:
        fields = {k: v.get() for k, v in self.vars.items()}
        fields.update({k: v.get() for k, v in self.flags.items()}, theme=self.theme.get())
        return fields

    def reload(self) -> None:
        """Show the store's settings in the fields the user has not changed since they were
        shown (after an edit of the file on disk, say); the user's own changes stay."""
        s = self.app.store.data["settings"]
        current = self._form()
        for key, var in (*self.vars.items(), *self.flags.items(), ("theme", self.theme)):
            value = ", ".join(s[key]) if key == "cors_origins" else \
                s[key] if key in self.flags else str(s[key])
            if key not in self.shown or current[key] == self.shown[key]:
                var.set(value)
            self.shown[key] = value

    def update_warning(self) -> None:
        host = self.vars["host"].get().strip()
        exposed = bool(host) and not is_loopback_host(host)
        if exposed and not self.flags["require_auth"].get():
            text = (f"Warning: {host} is reachable from other machines and no token is "
                    f"required — anyone on the network can spend your upstream keys.")
        elif exposed:
            text = f"{host} is reachable from other machines; clients need a gateway token."
        else:
            text = ""
        self.warning.configure(text=text)

    def save(self) -> None:
        try:
            values = validate_settings_form({k: v.get() for k, v in self.vars.items()})
        except ValueError as exc:
            self.error.configure(text=str(exc))
            return
        values.update({k: v.get() for k, v in self.flags.items()})
        values["theme"] = self.theme.get()
        old = dict(self.app.store.data["settings"])
        form = self._form()              # saved: the fields changed here, so that an edit of
        changed = {k: values[k] for k in values if form[k] != self.shown[k]}   # the file stays
        if not self.app.save(lambda: self.app.store.update_settings(**changed),
                             "settings saved"):
            return
        self.shown = {}
        self.reload()
        self.error.configure(text="")
        if values["theme"] != old["theme"]:
            self.app.set_theme(values["theme"])
        if (values["host"], values["port"]) != (old["host"], old["port"]) and \
                self.app.bridge.running and self.app.confirm(
                    "Restart needed", f"Listen on {values['host']}:{values['port']} now? "
                                      f"The gateway restarts."):
            self.app.restart()


class LogsTab:
    COLUMNS = [("time", "Time", 70), ("route", "Route", 170), ("model", "Model", 150),
               ("channel", "Channel", 120), ("status", "Status", 60),
               ("latency", "Latency", 80), ("tokens", "Tokens in/out", 100)]

    def __init__(self, app: App, parent: Any):
        self.app = app
        self.frame = f = ttk.Frame(parent, padding=14)
        bar = ttk.Frame(f)
        bar.pack(fill="x", pady=(0, 8))
        ttk.Label(bar, text="Filter").pack(side="left")
        self.filter = tk.StringVar()
        self.filter.trace_add("write", lambda *a: self.refill())
        ttk.Entry(bar, textvariable=self.filter, width=30).pack(side="left", padx=6)
        self.paused = tk.BooleanVar(value=False)
        ttk.Checkbutton(bar, text="Pause", variable=self.paused,
                        command=self.refill).pack(side="left", padx=6)
        ttk.Button(bar, text="Clear", command=self.clear).pack(side="left")
        panes = ttk.PanedWindow(f, orient="vertical")
        panes.pack(fill="both", expand=True)
        self.tree = _tree(panes, self.COLUMNS, height=12)
        panes.add(self.tree.container, weight=3)
        self.detail = tk.Text(panes, height=6, wrap="word", relief="flat",
                              background=app.colors["panel"], foreground=app.colors["fg"],
                              font=("TkFixedFont", 9), state="disabled")
        panes.add(self.detail, weight=1)
        # The selected request's bodies, when settings.debug_capture keeps them (masked).
        self.bodies = tk.Text(panes, height=8, wrap="none", relief="flat",
                              background=app.colors["panel"], foreground=app.colors["fg"],
                              font=("TkFixedFont", 9), state="disabled")
        panes.add(self.bodies, weight=2)
        self.tree.bind("<<TreeviewSelect>>", lambda e: self.show_detail())
        self.tree.tag_configure("bad", foreground=app.colors["bad"])
        self.records: collections.deque[dict] = collections.deque(maxlen=GUI_LOG_ROWS)

    def matches(self, rec: dict) -> bool:
        needle = self.filter.get().strip().lower()
        return not needle or needle in " ".join(format_record(rec)).lower() or \
            needle in (rec.get("error") or "").lower()

    def add_record(self, rec: dict) -> None:
        self.records.append(rec)
        if not self.paused.get() and self.matches(rec):
            self._insert(rec)

    def _insert(self, rec: dict) -> None:
        bad = rec.get("error") is not None or (rec.get("status") or 500) >= 400
        values = format_record(rec)
        self.tree.insert("", 0, iid=str(rec["id"]), values=values, tags=("bad",) if bad else ())
        _fit_columns(self.tree, values)
        children = self.tree.get_children()
        if len(children) > GUI_LOG_ROWS:
            self.tree.delete(*children[GUI_LOG_ROWS:])

    def refill(self) -> None:
        if self.paused.get():
            return
        self.tree.delete(*self.tree.get_children())
        for rec in self.records:
            if self.matches(rec):
                self._insert(rec)

    def clear(self) -> None:
        self.records.clear()
        self.tree.delete(*self.tree.get_children())
        self._set_detail("")
        self._set_detail("", self.bodies)

    def show_detail(self) -> None:
        sel = self.tree.selection()
        rec = next((r for r in self.records if sel and str(r["id"]) == sel[0]), None)
        self._set_detail(record_detail(rec) if rec else "")
        gateway = self.app.bridge.gateway
        bodies = gateway.capture.text(rec["id"]) if rec and gateway else ""
        if rec and not bodies:
            bodies = "(no bodies kept: set settings.debug_capture to keep the last N)"
        self._set_detail(bodies, self.bodies)

    def _set_detail(self, text: str, widget: Any = None) -> None:
        widget = widget or self.detail
        widget.configure(state="normal")
        widget.delete("1.0", "end")
        widget.insert("1.0", text)
        widget.configure(state="disabled")


class PriceDialog:
    """Add or edit one row of the price table; ``result`` is (pattern, entry) after Save."""

    def __init__(self, app: App, pattern: str = "", entry: dict | None = None,
                 parent: Any = None):
        self.app, self.original, self.result = app, pattern, None
        self.top, body = _dialog(app, "Edit price" if pattern else "Add price", parent)
        self.vars = {"pattern": tk.StringVar(value=pattern)}
        self.vars.update({k: tk.StringVar(value=f"{(entry or {})[k]:g}" if k in (entry or {})
                                          else "") for k in PRICE_FIELDS})
        labels = [("pattern", "Model pattern (* wildcards)")] + [
            (k, f"{k.replace('_', ' ').capitalize()} $/Mtok") for k in PRICE_FIELDS]
        for row, (key, label) in enumerate(labels):
            ttk.Label(body, text=label).grid(row=row, column=0, sticky="w", pady=2)
            ttk.Entry(body, textvariable=self.vars[key], width=30).grid(
                row=row, column=1, sticky="we", padx=(8, 0), pady=2)
        self.error = ttk.Label(body, text="", style="Bad.TLabel")
        self.error.grid(row=len(labels), column=0, columnspan=2, sticky="w")
        buttons = ttk.Frame(body)
        buttons.grid(row=len(labels) + 1, column=0, columnspan=2, sticky="e", pady=(8, 0))
        ttk.Button(buttons, text="Cancel", command=self.top.destroy).pack(side="right")
        ttk.Button(buttons, text="Save", style="Accent.TButton",
                   command=self.save).pack(side="right", padx=6)

    def values(self) -> tuple[str, dict[str, float]]:
        pattern = self.vars["pattern"].get().strip()
        if not pattern:
            raise ValueError("write a model pattern, such as gpt-5*")
        entry = {}
        for key in PRICE_FIELDS:
            text = self.vars[key].get().strip()
            if text:
                try:
                    entry[key] = float(text)
                except ValueError:
                    raise ValueError(f"{key}: {text[:20]!r} is not a number") from None
        return pattern, entry

    def save(self) -> None:
        try:
            pattern, entry = self.values()
        except ValueError as exc:
            self.error.configure(text=str(exc))
            return
        gone = [self.original] if self.original and self.original != pattern else []
        if self.app.save(lambda: self.app.store.update_prices({pattern: entry}, gone),
                         f"price for {pattern} saved"):
            self.result = (pattern, entry)
            self.top.destroy()


class UsageTab:
    """The usage history: cost and tokens per day (a Canvas chart), sums by model, channel and
    token with their cache-hit rate, each token's use against its limits, and the price table.
    It reads the database itself (a reader beside the gateway's writer, WAL mode)."""

    RANGES = ("7 days", "30 days", "90 days")
    SUM_COLUMNS = [("requests", "Requests", 70), ("tokens", "Tokens in/out", 130),
                   ("cache", "Cache hit", 70), ("cost", "Cost $", 90)]

    def __init__(self, app: App, parent: Any):
        self.app = app
        self.frame = f = ttk.Frame(parent, padding=14)
        bar = ttk.Frame(f)
        bar.pack(fill="x")
        ttk.Label(bar, text="Range").pack(side="left")
        self.range = tk.StringVar(value=self.RANGES[1])
        box = ttk.Combobox(bar, textvariable=self.range, values=self.RANGES, state="readonly",
                           width=10)
        box.pack(side="left", padx=6)
        box.bind("<<ComboboxSelected>>", lambda e: self.refresh())
        ttk.Button(bar, text="Refresh", command=self.refresh).pack(side="left")
        self.summary = ttk.Label(bar, text="", style="Muted.TLabel")
        self.summary.pack(side="left", padx=12)
        colors = app.colors
        self.chart = tk.Canvas(f, height=120, background=colors["panel"],
                               highlightthickness=1, highlightbackground=colors["border"])
        self.chart.pack(fill="x", pady=(8, 8))
        self.chart.bind("<Configure>", lambda e: self.draw_chart())
        self.views = ttk.Notebook(f)
        self.views.pack(fill="both", expand=True)
        self.trees = {}
        for by, title in (("model", "By model"), ("channel", "By channel"), ("token", "By token")):
            tree = _tree(self.views, [(by, by.capitalize(), 200)] + self.SUM_COLUMNS, height=8)
            self.views.add(tree.container, text=title)
            self.trees[by] = tree
        self.limits = _tree(self.views, [("token", "Token", 140), ("limit", "Limit", 130),
                                         ("used", "Used", 110), ("allowed", "Allowed", 110),
                                         ("expires", "Expires", 160)], height=8)
        self.views.add(self.limits.container, text="Token limits")
        prices = ttk.Frame(self.views)
        self.prices = _tree(prices, [("pattern", "Model pattern", 190)] + [
            (k, f"{k.replace('_', ' ')} $/Mtok", 100) for k in PRICE_FIELDS] +
            [("source", "Source", 140)], height=7)
        self.prices.container.pack(fill="both", expand=True)
        buttons = ttk.Frame(prices)
        buttons.pack(fill="x", pady=(6, 0))
        for text, command in (("Add", self.add_price), ("Edit", self.edit_price),
                              ("Remove", self.remove_price), ("Import file…", self.import_file)):
            ttk.Button(buttons, text=text, command=command).pack(side="left", padx=(0, 6))
        self.views.add(prices, text="Prices")
        self.days: list[dict] = []
        self.error: str | None = None
        self.refresh()
        app.notebook.bind("<<NotebookTabChanged>>", self._shown, add="+")

    def _shown(self, event: Any) -> None:
        if self.app.notebook.select() == str(self.frame):
            self.refresh()

    # -- reading ---------------------------------------------------------------------------------

    def db_path(self) -> str | None:
        name = self.app.store.data["settings"]["usage_db"]
        return os.path.join(os.path.dirname(os.path.abspath(self.app.store.path)), name) \
            if name else None

    def refresh(self) -> None:
        self.fill_prices()
        path, now = self.db_path(), time.time()
        span = int(self.range.get().split()[0])
        first = utc_day(now) - span + 1
        reports: dict[str, list[dict]] = {by: [] for by in (*self.trees, "day")}
        spend: dict[int, dict[str, float]] = {}
        self.error = None if path else "usage history is off (settings.usage_db is empty)"
        if path:
            try:
                conn = open_usage_db(path)
                try:
                    for by in reports:
                        reports[by] = usage_report(conn, first, by)
                    spend = token_spend(conn, now)
                finally:
                    conn.close()
            except (ConfigError, sqlite3.Error) as exc:
                self.error = str(exc)
        by_day = {r["day"]: r for r in reports["day"]}
        self.days = [by_day.get(day_text(d)) or {"day": day_text(d), "cost": 0.0,
                                                 "input_tokens": 0, "output_tokens": 0}
                     for d in range(first, utc_day(now) + 1)]
        for by, tree in self.trees.items():
            tree.delete(*tree.get_children())
            for r in reports[by]:
                tree.insert("", "end", values=(r[by] or "-", *self.sums(r)))
        total = usage_totals(reports["model"])
        self.summary.configure(text=self.error or (
            f"{total['requests']} requests, {total['input_tokens']}/{total['output_tokens']} "
            f"tokens, cache hit {total['cache_hit_rate'] * 100:.1f}%, "
            f"{'~' if total['cost_estimated'] else ''}${total['cost']:.4f}"))
        self.fill_limits(spend)
        self.draw_chart()

    @staticmethod
    def sums(r: dict) -> tuple:
        return (r["requests"], f"{r['input_tokens']}/{r['output_tokens']}",
                f"{r['cache_hit_rate'] * 100:.1f}%",
                ("~" if r["cost_estimated"] else "") + f"{r['cost']:.4f}")

    def fill_limits(self, spend: dict[int, dict[str, float]]) -> None:
        self.limits.delete(*self.limits.get_children())
        for t in self.app.store.data["tokens"]:
            used = spend.get(t["id"]) or dict.fromkeys(LIMIT_KINDS, 0)
            kinds = [k for k in LIMIT_KINDS if t["limits"].get(k)] or [None]
            for kind in kinds:
                if kind is None:
                    row = ("(none)", f"{int(used['requests_per_day'])} today", "-")
                elif kind.startswith("cost"):
                    row = (kind, f"${used[kind]:.4f}", f"${t['limits'][kind]:g}")
                else:
                    row = (kind, str(int(used[kind])), str(t["limits"][kind]))
                self.limits.insert("", "end", values=(t["name"], *row,
                                                      t["expires_at"] or "never"))

    def fill_prices(self) -> None:
        self.prices.delete(*self.prices.get_children())
        user = self.app.store.data.get("prices") or {}
        rows = [(p, e, "yours") for p, e in sorted(user.items())] + [
            (p, e, f"built-in {BUILTIN_PRICES_DATE}") for p, e in BUILTIN_PRICES.items()
            if p not in user]
        for pattern, entry, source in rows:
            self.prices.insert("", "end", iid=f"{source[0]}:{pattern}", values=(
                pattern, *(f"{entry[k]:g}" if k in entry else "-" for k in PRICE_FIELDS),
                source))

    def draw_chart(self) -> None:
        """Cost per day as bars, tokens per day as a line, over the chosen range."""
        c, colors = self.chart, self.app.colors
        c.delete("all")
        width, height = max(c.winfo_width(), 100), max(c.winfo_height(), 60)
        days = self.days
        if not days:
            return
        top_cost = max(d["cost"] for d in days)
        top_tokens = max(d["input_tokens"] + d["output_tokens"] for d in days)
        step = width / len(days)
        base = height - 16
        c.create_line(0, base, width, base, fill=colors["border"])
        points = []
        for i, d in enumerate(days):
            if d["cost"]:
                h = (base - 22) * d["cost"] / top_cost
                c.create_rectangle(i * step + 1, base - h, (i + 1) * step - 1, base,
                                   fill=colors["accent"], outline="", tags=("cost",))
            if top_tokens:
                tokens = d["input_tokens"] + d["output_tokens"]
                points += [i * step + step / 2, base - (base - 22) * tokens / top_tokens]
        if len(points) >= 4:
            c.create_line(*points, fill=colors["muted"], width=2, tags=("tokens",))
        c.create_text(6, 4, anchor="nw", fill=colors["muted"], font=("TkDefaultFont", 8),
                      tags=("caption",),
                      text=f"cost per day (bars, peak ${top_cost:.4f}) and tokens per day "
                           f"(line, peak {top_tokens}), {days[0]['day']} to {days[-1]['day']}"
                      if top_cost or top_tokens else "no usage in this range")

    # -- the price table -------------------------------------------------------------------------

    def _selected_price(self) -> tuple[str, dict] | None:
        sel = self.prices.selection()
        if not sel:
            return None
        pattern = sel[0].partition(":")[2]
        user = self.app.store.data.get("prices") or {}
        return pattern, user.get(pattern) or BUILTIN_PRICES.get(pattern, {})

    def add_price(self) -> Any:
        dialog = PriceDialog(self.app)
        dialog.top.bind("<Destroy>", lambda e: self.fill_prices(), add="+")
        return dialog

    def edit_price(self) -> Any:
        chosen = self._selected_price()
        if chosen is None:
            return None
        dialog = PriceDialog(self.app, *chosen)
        dialog.top.bind("<Destroy>", lambda e: self.fill_prices(), add="+")
        return dialog

    def remove_price(self) -> None:
        chosen = self._selected_price()
        user = self.app.store.data.get("prices") or {}
        if chosen is None or chosen[0] not in user:
            self.app.dashboard.log("only your own prices can be removed (built-in ones can "
                                   "be overridden by a row of yours)")
            return
        if self.app.save(lambda: self.app.store.update_prices({}, [chosen[0]]),
                         f"price for {chosen[0]} removed"):
            self.fill_prices()

    def import_file(self, path: str | None = None) -> None:
        if path is None:
            from tkinter import filedialog
            path = filedialog.askopenfilename(parent=self.app.root, title="Import prices",
                                              filetypes=[("JSON", "*.json"), ("All", "*")])
            if not path:
                return
        self.app.save(lambda: self.app.dashboard.log(
            f"imported {import_prices(self.app.store, path)} prices from {path}"),
            "prices imported")
        self.fill_prices()


class App:
    """The window. ``pump()`` drains the bridge's queue; tests call it instead of mainloop."""

    def __init__(self, store: ConfigStore, *, host: str | None = None, port: int | None = None,
                 start: bool | None = None, new_key: str | None = None):
        _load_tk()
        _dpi_aware()
        self.store = store
        self.bridge = GatewayThread(store, host=host, port=port)
        self.root = root = tk.Tk(className="aigateway")
        root.title(f"AI Gateway {__version__}")
        self.colors = apply_theme(root, store.data["settings"]["theme"])
        self._icon = _icon_image(root)
        root.iconphoto(True, self._icon)
        root.geometry(store.data["settings"]["window"] or "1100x720")
        root.minsize(820, 560)
        self.notebook = ttk.Notebook(root)
        self.notebook.pack(fill="both", expand=True, padx=8, pady=8)
        self.dashboard = DashboardTab(self, self.notebook)
        self.channels = ChannelsTab(self, self.notebook)
        self.tokens = TokensTab(self, self.notebook)
        self.settings = SettingsTab(self, self.notebook)
        self.logs = LogsTab(self, self.notebook)
        self.usage = UsageTab(self, self.notebook)
        for tab, title in ((self.dashboard, "Dashboard"), (self.channels, "Channels"),
                           (self.tokens, "Tokens"), (self.usage, "Usage"),
                           (self.settings, "Settings"), (self.logs, "Logs")):
            self.notebook.add(tab.frame, text=title)
        self._tasks: dict[int, Callable[[bool, Any], None]] = {}
        self._task_ids = itertools.count(1)
        self.confirm_answer: bool | None = None       # tests answer confirmations with this
        root.protocol("WM_DELETE_WINDOW", self.close)
        self._poll_id = root.after(GUI_POLL_MS, self._poll)
        self._followed, self._file_problem = 0.0, None
        self.closed = False
        if store.data["settings"]["start_on_open"] if start is None else start:
            self.start()
        if new_key is not None:          # first run: the token made with the config file
            self.notebook.select(self.tokens.frame)
            self.tokens.show_once(store.data["tokens"][0]["name"], new_key)

    # -- gateway control ------------------------------------------------------------------------

    def start(self) -> None:
        if self.bridge.running:
            return
        try:
            self.bridge.start()
        except ConfigError as exc:
            self.dashboard.log(f"cannot start: {exc}")
            self.dashboard.set_state(False)
            return
        except OSError as exc:
            s = self.store.data["settings"]
            self.dashboard.log(listen_error(
                self.bridge.host or s["host"],
                s["port"] if self.bridge.port is None else self.bridge.port, exc))
            self.dashboard.set_state(False)
            return
        self.dashboard.set_state(True, self.bridge.url)

    def stop(self) -> None:
        self.bridge.stop()
        self.dashboard.set_state(False)

    def restart(self) -> None:
        self.stop()
        self.start()

    def run_task(self, make: Callable[[Gateway], Any], done: Callable[[bool, Any], None]) -> None:
        tag = next(self._task_ids)
        self._tasks[tag] = done
        self.bridge.run_task(make, tag)

    # -- configuration --------------------------------------------------------------------------

    def save(self, mutate: Callable[[], Any], message: str) -> bool:
        try:
            mutate()
        except (ConfigError, KeyError) as exc:
            self.dashboard.log(f"not saved: {exc}")
            if messagebox is not None and self.confirm_answer is None:
                messagebox.showerror("Not saved", str(exc), parent=self.root)
            return False
        self.config_changed(message)
        return True

    def config_changed(self, message: str) -> None:
        self.bridge.apply_config()
        self.channels.refresh()
        self.tokens.refresh()
        self.dashboard.log(message)

    def confirm(self, title: str, question: str) -> bool:
        if self.confirm_answer is not None:
            return self.confirm_answer
        return bool(messagebox.askyesno(title, question, parent=self.root))

    def copy(self, text: str) -> None:
        self.root.clipboard_clear()
        self.root.clipboard_append(text)

    def set_theme(self, name: str) -> None:
        self.colors = apply_theme(self.root, name)
        self.dashboard.chart.configure(background=self.colors["panel"])
        for widget in (self.dashboard.activity, self.logs.detail, self.logs.bodies):
            widget.configure(background=self.colors["panel"], foreground=self.colors["fg"])
        self.dashboard.draw_chart()

    # -- the queue ------------------------------------------------------------------------------

    def pump(self) -> int:
        """Handle up to GUI_BATCH queued events; return how many were handled."""
        handled = 0
        while handled < GUI_BATCH:
            try:
                kind, payload = self.bridge.events.get_nowait()
            except queue.Empty:
                break
            handled += 1
            if kind == EVENT_REQUEST:
                self.dashboard.add_record(payload)
                self.logs.add_record(payload)
            elif kind == EVENT_LOG:
                self.dashboard.log(payload)
            elif kind == EVENT_HEALTH:
                self.dashboard.set_health(payload)
            elif kind == EVENT_CONFIG:                     # config.json was edited on disk
                self._show_new_config()
            elif kind == EVENT_STATE:
                self.dashboard.set_state(payload == "running" and self.bridge.running,
                                         self.bridge.url)
            elif kind == EVENT_RESULT:
                tag, ok, value = payload
                done = self._tasks.pop(tag, None)
                if done is not None:
                    done(ok, value)
        return handled

    def _show_new_config(self) -> None:
        self.channels.refresh()
        self.tokens.refresh()
        self.settings.reload()

    def _follow_file(self) -> None:
        """With the gateway stopped nothing watches config.json; the window does, so that its
        tables show an edit made meanwhile (a running gateway reports them as events)."""
        try:
            changed = self.store.reload()
        except ConfigError as exc:
            if str(exc) != self._file_problem:
                self._file_problem = str(exc)
                self.dashboard.log(f"configuration not reloaded: {exc}")
            return
        self._file_problem = None
        if changed:
            self._show_new_config()
            self.dashboard.log("configuration reloaded")

    def _poll(self) -> None:
        if self.closed:
            return
        self.pump()
        now = time.monotonic()
        if not self.bridge.running and now - self._followed >= CONFIG_POLL_SECONDS:
            self._followed = now
            self._follow_file()
        self._poll_id = self.root.after(GUI_POLL_MS, self._poll)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            geometry = self.root.winfo_geometry()
            if geometry != self.store.data["settings"]["window"]:
                self.store.update_settings(window=geometry)
        except (ConfigError, OSError):
            pass
        self.root.after_cancel(self._poll_id)
        self.bridge.stop()
        self.root.destroy()

    def run(self) -> None:
        if hasattr(signal, "SIGHUP"):       # reload, as headless does, rather than be killed
            signal.signal(signal.SIGHUP, lambda *_: self.bridge.reload())
        self.root.mainloop()


# =================================================================================================
# 14. Command line and main()
# =================================================================================================
# The access line of the headless console, the management commands (channels, tokens, config:
# edits of config.json through ConfigStore), start-up checks and main(): the GUI when a display
# is there, else the server on this thread, either with the garbage collector tuned for serving.

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
        parts.append(f"error=\"{rec['error'][:200]}\"")     # escaped by Gateway._finish
    return " ".join(parts)


def _port_number(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is out of range; use a port from 1 to 65535 "
                                         f"(0 picks any free port)")
    return port


def _positive_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a positive number of seconds")
    return int(value) if value.is_integer() else value


def _name_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _mapping(text: str) -> dict[str, str]:
    out = {}
    for pair in _name_list(text):
        name, eq, target = pair.partition("=")
        if not eq or not name.strip() or not target.strip():
            raise argparse.ArgumentTypeError(f"{pair!r} is not NAME=UPSTREAM_NAME")
        out[name.strip()] = target.strip()
    return out


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text[:60]!r} is not a JSON object")
    return value


def _field_value(text: str) -> tuple[str, Any]:
    key, eq, value = text.partition("=")
    if not eq or not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not FIELD=VALUE")
    def refuse(word: str) -> Any:                  # NaN and Infinity are not JSON
        raise ValueError(word)
    try:
        return key.strip(), json.loads(value, parse_constant=refuse)
    except ValueError:                             # JSONDecodeError too
        return key.strip(), value                  # a bare word is a string


_CLI_EPILOG = """\
management commands (they edit the configuration file; a running aigateway picks the edit up):
  channels list [--json]            channels add --name N --type T|--preset P [options]
  channels edit ID|NAME [options]   channels remove ID|NAME   channels test ID|NAME
  tokens list [--json]              tokens create --name N [--models a,b]
  tokens edit ID|NAME [options]     tokens enable|disable|remove ID|NAME
  config check                      presets [--json]
  usage [--since 7d|30d|YYYY-MM-DD] [--by model|channel|token|day] [--format table|csv|json]
  prices import FILE|URL            (a models.dev-style api.json)
Run "aigateway COMMAND --help" (e.g. "channels add --help") for a command's options."""


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="aigateway", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Personal LLM API gateway: one local endpoint that speaks the OpenAI API\n"
                    "(Chat Completions, Responses, embeddings, ...), the Anthropic Messages API\n"
                    "and Gemini's native API (generateContent, streamGenerateContent, ...), and\n"
                    "routes each request by model to your upstream channels.\n\n"
                    "Without a COMMAND it serves: in the window when there is a display, else\n"
                    "headless (or with --headless).", epilog=_CLI_EPILOG)
    p.add_argument("--headless", action="store_true", help="run without the GUI")
    p.add_argument("--config", metavar="PATH", help="configuration file (default: config.json "
                   "beside the program, or $AIGATEWAY_CONFIG)")
    p.add_argument("--host", help="listen address for this run (default: settings.host)")
    p.add_argument("--port", type=_port_number,
                   help="listen port for this run, 0-65535 (default: settings.port)")
    p.add_argument("--quiet", action="store_true", help="no access line per request")
    p.add_argument("--version", action="version", version=f"aigateway {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS,
                        help="configuration file (as before the command)")
    commands = p.add_subparsers(dest="command", metavar="COMMAND")

    def group(name: str, help_text: str) -> Any:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        return sub.add_subparsers(dest="action", metavar="ACTION", required=True)

    def command(actions: Any, name: str, help_text: str, *, ref: bool = False) -> Any:
        sub = actions.add_parser(name, parents=[common], help=help_text,
                                 description=help_text)
        if ref:
            sub.add_argument("ref", metavar="ID|NAME", help="the id or the name")
        return sub

    ch = group("channels", "list, add, edit, remove and test upstream channels")
    command(ch, "list", "list the channels (keys masked)").add_argument(
        "--json", action="store_true", help="print JSON (keys masked)")
    _channel_options(command(ch, "add", "add a channel"), adding=True)
    _channel_options(command(ch, "edit", "change a channel's fields", ref=True), adding=False)
    command(ch, "remove", "delete a channel", ref=True)
    command(ch, "test", "send a short chat request through a channel (exit 1 if it fails)",
            ref=True)
    tok = group("tokens", "list, create, edit, enable, disable and remove gateway tokens")
    command(tok, "list", "list the tokens (keys masked)").add_argument(
        "--json", action="store_true", help="print JSON (keys masked)")
    _token_options(command(tok, "create", "create a token and print its key (only this once)"),
                   adding=True)
    _token_options(command(tok, "edit", "change a token's name or limits", ref=True),
                   adding=False)
    for name in ("enable", "disable", "remove"):
        command(tok, name, f"{name} a token", ref=True)
    cfg = group("config", "check the configuration file")
    command(cfg, "check", "name every problem in the file (exit 0 when it is valid, else 2)")
    help_text = "list the channel presets (known services: type, base URL, quirks)"
    commands.add_parser("presets", help=help_text, description=help_text).add_argument(
        "--json", action="store_true", help="print JSON")
    use = commands.add_parser("usage", parents=[common], help="what the requests cost, from "
                              "the usage history", description="Sums from the usage history "
                              "(settings.usage_db); costs marked ~ are estimated.")
    use.add_argument("--since", default="7d", metavar="7d|30d|YYYY-MM-DD",
                     help="the first UTC day (default 7d: today and the 6 days before)")
    use.add_argument("--by", default="model", choices=tuple(USAGE_GROUPS))
    use.add_argument("--format", default="table", choices=("table", "csv", "json"))
    pri = group("prices", "the price table used for costs")
    command(pri, "import", "add or replace prices from a models.dev-style JSON file or URL "
            "(such as https://models.dev/api.json, fetched through settings.proxy)").add_argument(
        "file", metavar="FILE|URL")
    return p


def _channel_options(p: argparse.ArgumentParser, *, adding: bool) -> None:
    p.add_argument("--name", required=adding, help="unique name")
    p.add_argument("--type", choices=CHANNEL_TYPES,
                   help="upstream dialect (needed when adding without --preset)")
    p.add_argument("--preset", choices=PRESETS, metavar="NAME",
                   help="a known service (`aigateway presets`): fills type, base URL and quirks")
    p.add_argument("--base-url", help="upstream URL (default: the type's public API)")
    p.add_argument("--api-key", metavar="KEY", help='upstream key; "-" reads it from stdin '
                   "(keeps it out of the shell history)")
    p.add_argument("--models", type=_name_list, metavar="a,b",
                   help="model names served (* wildcards); empty string = every model")
    p.add_argument("--model-mapping", type=_mapping, metavar="a=x,b=y",
                   help="names clients use = names the upstream knows")
    p.add_argument("--priority", type=int, help="lower is tried first")
    p.add_argument("--timeout", type=_positive_number, metavar="SECONDS",
                   help="to the first byte and between bytes")
    p.add_argument("--proxy", metavar="URL", help="http:// or socks5h:// proxy; empty = none")
    p.add_argument("--max-concurrency", type=int, metavar="N", help="0 = no limit")
    for name, (types, f) in _TYPE_FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), metavar="VALUE", help=f"{types} channels: "
                       f"{f.what}" + ('; "-" reads it from stdin' if _stdin_field(f) else ""))
    onoff = p.add_mutually_exclusive_group()
    onoff.add_argument("--enabled", dest="enabled", action="store_const", const=True,
                       help="route requests to it (the default for a new channel)")
    onoff.add_argument("--disabled", dest="enabled", action="store_const", const=False,
                       help="keep it, but route nothing to it")
    p.add_argument("--set", dest="fields", type=_field_value, action="append", default=[],
                   metavar="FIELD=JSON", help='any other channel field, e.g. verify_tls=false '
                   'or \'headers={"HTTP-Referer": "https://example.com"}\'')


def _token_options(p: argparse.ArgumentParser, *, adding: bool) -> None:
    p.add_argument("--name", required=adding, help="shown in logs instead of the key")
    p.add_argument("--models", type=_name_list, metavar="a,b",
                   help="models it may use (* wildcards); empty string = all")
    p.add_argument("--channels", type=_name_list, metavar="a,b",
                   help="channel names or ids it may use; empty string = all")
    p.add_argument("--rpm", type=int, metavar="N", help="requests per minute (0 = no limit)")
    p.add_argument("--limits", type=_json_object, metavar="JSON",
                   help='e.g. \'{"requests_per_day": 500, "cost_per_month": 10}\' '
                        "(requests_per_day, tokens_per_day, cost_per_day, cost_per_month, tpm)")
    p.add_argument("--expires-at", metavar="DATE", help='ISO date or date-time, UTC; "" = never')


# The channel types' own fields (ProviderAdapter.fields) as options: field -> (types, field).
_TYPE_FLAGS = {name: (" and ".join(p.name for p in PROVIDERS.values() if name in p.fields), f)
               for q in PROVIDERS.values() for name, f in q.fields.items()}


def _stdin_field(f: TypeField) -> bool:
    """A secret string field: "-" on the command line reads it from stdin."""
    return f.secret and f.types == (str,)


_CHANNEL_FLAGS = {flag: flag for flag in ("name", "type", "base_url", "api_key", "models",
                                           "model_mapping", "priority", "timeout", "proxy",
                                           "max_concurrency", "enabled",
                                           "preset", *_TYPE_FLAGS)}        # option: field
_TOKEN_FLAGS = {"name": "name", "models": "allowed_models", "channels": "allowed_channels",
                "rpm": "rpm", "limits": "limits", "expires_at": "expires_at"}
_SECRET_HEADER_RX = re.compile(r"auth|key|token|secret|cookie|password", re.I)


def _masked(kind: str, item: dict) -> dict:
    """A channel or token as listings show it: every key, secret header and proxy password
    masked."""
    out = copy.deepcopy(item)
    if kind == "token":
        out["key"] = mask_secret(out["key"])
        return out
    out["api_key"] = mask_secret(out["api_key"])
    out["api_keys"] = [mask_secret(k) for k in out["api_keys"]]
    for name, f in PROVIDERS[out["type"]].fields.items():
        if f.secret and out.get(name):
            out[name] = mask_secret(out[name]) if isinstance(out[name], str) else \
                "(a service-account key, hidden)"
    out["headers"] = {n: mask_secret(v) if _SECRET_HEADER_RX.search(n) else v
                      for n, v in out["headers"].items()}
    if out["proxy"]:
        u = urllib.parse.urlsplit(out["proxy"])
        if u.password:
            netloc = f"{u.username}:***@{u.hostname}" + (f":{u.port}" if u.port else "")
            out["proxy"] = urllib.parse.urlunsplit(u._replace(netloc=netloc))
    return out


def _table(rows: list[tuple], header: tuple) -> str:
    cells = [tuple(str(c) for c in header)] + [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


class _CommandFailed(Exception):
    """A management command cannot go on; the message says why (exit status 2)."""


def _find(store: ConfigStore, kind: str, ref: str) -> dict:
    items = store.data[kind + "s"]
    if is_digits(ref):
        for item in items:
            if item["id"] == int(ref):
                return item
    for item in items:
        if item["name"].lower() == ref.lower():
            return item
    raise _CommandFailed(f"no {kind} {ref!r} in {store.path}; "
                         f"`aigateway {kind}s list` shows their ids and names")


def _changes(store: ConfigStore, args: argparse.Namespace, flags: dict[str, str]) -> dict:
    """The fields a command's options set; a token's channels must name existing channels
    (kept as written: a name, or an id as a number)."""
    out = {field: getattr(args, flag) for flag, field in flags.items()
           if getattr(args, flag, None) is not None}
    for name in ("api_key", *(n for n, (_, f) in _TYPE_FLAGS.items() if _stdin_field(f))):
        if out.get(name) == "-":
            out[name] = sys.stdin.readline().strip()
    for key, value in getattr(args, "fields", []):
        out[key] = value
    if "allowed_channels" in out:
        refs = []
        for ref in out["allowed_channels"]:
            ch = _find(store, "channel", ref)
            refs.append(ch["id"] if is_digits(ref) and ch["id"] == int(ref) else ch["name"])
        out["allowed_channels"] = refs
    return out


def run_command(args: argparse.Namespace, path: str) -> int:
    """A management subcommand: edits go through ConfigStore, which validates every change and
    saves the file atomically; nothing is written when a change is refused."""
    if args.command == "config":
        return check_config(path)
    if args.command == "presets":
        return list_presets(args.json)
    if args.command in ("usage", "prices"):
        try:
            store, _ = ConfigStore.load(path)
            return (usage_command if args.command == "usage" else prices_command)(args, store)
        except (ConfigError, _CommandFailed) as exc:
            print(f"aigateway: {exc}", file=sys.stderr)
        except OSError as exc:
            print(f"aigateway: {exc.filename or path}: {exc.strerror}", file=sys.stderr)
        return 2
    creating = args.action in ("add", "create")
    try:
        store, new_key = ConfigStore.load(path, create=creating)
        if new_key is not None:
            print(f"aigateway: created {path} with a gateway token named "
                  f"'{store.data['tokens'][0]['name']}' (shown only this once): {new_key}",
                  file=sys.stderr)
        return _run_command(args, store)
    except (ConfigError, _CommandFailed) as exc:
        print(f"aigateway: {exc}", file=sys.stderr)
    except OSError as exc:
        print(f"aigateway: cannot save {path} ({exc.strerror}); make it writable, or choose "
              f"another file with --config PATH", file=sys.stderr)
    except KeyboardInterrupt:
        return 130
    return 2


def _run_command(args: argparse.Namespace, store: ConfigStore) -> int:
    kind = args.command[:-1]
    action = args.action
    if action == "list":
        items = [dict({"id": i["id"]}, **_masked(kind, i)) for i in store.data[kind + "s"]]
        if args.json:
            print(json.dumps(items, indent=2, ensure_ascii=False))
        elif kind == "channel":
            print(_table([(c["id"], c["name"], c["type"], "yes" if c["enabled"] else "no",
                           c["priority"], c["base_url"] or PROVIDERS[c["type"]].base_url_for(c),
                           ",".join(c["models"]) or "(all)",
                           c["api_key"] or "-") for c in items],
                         ("ID", "NAME", "TYPE", "ENABLED", "PRIORITY", "BASE URL", "MODELS",
                          "KEY")))
        else:
            print(_table([(t["id"], t["name"], "yes" if t["enabled"] else "no", t["key"],
                           ",".join(t["allowed_models"]) or "(all)",
                           ",".join(map(str, t["allowed_channels"])) or "(all)",
                           t["rpm"] or "-") for t in items],
                         ("ID", "NAME", "ENABLED", "KEY", "MODELS", "CHANNELS", "RPM")))
        return 0
    flags = _CHANNEL_FLAGS if kind == "channel" else _TOKEN_FLAGS
    if action in ("add", "create"):
        fields = _changes(store, args, flags)
        if kind == "channel":
            if "type" not in fields and "preset" not in fields:
                raise _CommandFailed("channels add needs --type or --preset "
                                     "(`aigateway presets` lists the presets)")
            item = store.add_channel(**fields)
            print(f"added channel {item['name']!r} (id {item['id']})")
        else:
            item = store.add_token(**fields)
            print(item["key"])
            print(f"aigateway: created token {item['name']!r} (id {item['id']}); its key, above, "
                  f"is shown only this once. Clients send it as 'Authorization: Bearer <key>', "
                  f"'x-api-key: <key>', 'x-goog-api-key: <key>' or '?key=<key>'.",
                  file=sys.stderr)
        return 0
    item = _find(store, kind, args.ref)
    if action == "test":
        return _test_channel(store, item)
    if action == "remove":
        (store.delete_channel if kind == "channel" else store.delete_token)(item["id"])
        print(f"removed {kind} {item['name']!r} (id {item['id']})")
        return 0
    changes = _changes(store, args, flags) if action == "edit" else {
        "enabled": action == "enable"}
    if "type" in changes and "base_url" not in changes and \
            item["base_url"] == CHANNEL_DEFAULT_URLS.get(item["type"]):
        changes["base_url"] = ""                  # the new type's own default URL
    update = store.update_channel if kind == "channel" else store.update_token
    item = update(item["id"], **changes)
    done = {"edit": "changed", "enable": "enabled", "disable": "disabled"}[action]
    print(f"{done} {kind} {item['name']!r} (id {item['id']})")
    return 0


def list_presets(as_json: bool) -> int:
    """`aigateway presets`: the PRESETS table, as text or JSON."""
    if as_json:
        print(json.dumps(PRESETS, indent=2, ensure_ascii=False))
        return 0
    rows = []
    for name, p in PRESETS.items():
        notes = [", ".join(f"{k}={','.join(v) if isinstance(v, list) else v}"
                           for k, v in p.get("quirks", {}).items())]
        notes += ["no model list"] if p.get("model_list") is False else []
        notes += [p["notes"]] if p.get("notes") else []
        rows.append((name, p["type"], p["base_url"], "; ".join(n for n in notes if n) or "-"))
    print(_table(rows, ("PRESET", "TYPE", "BASE URL", "NOTES")))
    return 0


def usage_command(args: argparse.Namespace, store: ConfigStore) -> int:
    """`aigateway usage`: the usage report as a table, CSV or JSON on stdout."""
    name = store.data["settings"]["usage_db"]
    if not name:
        raise _CommandFailed(f"usage history is off in {store.path} (settings.usage_db is "
                             f"empty); set it to a file name such as \"usage.db\"")
    try:
        first = parse_since(args.since, time.time())
    except ValueError as exc:
        raise _CommandFailed(str(exc)) from None
    conn = open_usage_db(os.path.join(os.path.dirname(os.path.abspath(store.path)), name))
    try:
        rows = usage_report(conn, first, args.by)
    finally:
        conn.close()
    total = usage_totals(rows)
    if args.format == "json":
        print(json.dumps({"since": day_text(first), "by": args.by, "rows": rows,
                          "totals": total}, indent=2, ensure_ascii=False))
        return 0
    fields = (args.by,) + tuple(k for k in rows[0] if k != args.by) if rows else \
        (args.by, *_SUMS[:-2], "cost", "cost_estimated", "cache_hit_rate")
    if args.format == "csv":
        out = csv.writer(sys.stdout, lineterminator="\n")
        out.writerow(fields)
        out.writerows([[r[f] for f in fields] for r in rows])
        return 0

    def line(key: Any, r: dict) -> tuple:
        return (key if key not in (None, "") else "-", r["requests"], r["errors"],
                r["input_tokens"], r["output_tokens"], r["cache_read_tokens"],
                r["cache_write_tokens"], r["reasoning_tokens"],
                f"{r['cache_hit_rate'] * 100:.1f}%",
                ("~" if r["cost_estimated"] else "") + f"{r['cost']:.4f}")
    print(f"usage since {day_text(first)} (UTC) by {args.by}; ~ = estimated")
    print(_table([line(r[args.by], r) for r in rows] + [line("TOTAL", total)],
                 (args.by.upper(), "REQUESTS", "ERRORS", "INPUT", "OUTPUT", "CACHE READ",
                  "CACHE WRITE", "REASONING", "CACHE HIT", "COST $")))
    return 0


def fetch_prices_file(url: str, proxy: str) -> bytes:
    """GET a prices file through the gateway's upstream client (and the global proxy)."""
    async def get() -> bytes:
        client = UpstreamClient(max_response=PRICES_IMPORT_MAX_BYTES)
        try:
            up = await client.request("GET", url, [("Accept", "application/json"),
                                                   ("Accept-Encoding", "gzip, deflate")],
                                      proxy=proxy, timeout=DEFAULT_CHANNEL_TIMEOUT)
            body = await up.read()
            if up.status != 200:
                raise ConfigError(f"{url} answered {up.status}")
            return body
        except GatewayError as exc:
            raise ConfigError(f"cannot fetch {url}: {exc.message}") from None
        finally:
            client.close()
    return asyncio.run(get())


def prices_command(args: argparse.Namespace, store: ConfigStore) -> int:
    raw = None
    if args.file.startswith(("http://", "https://")):
        raw = fetch_prices_file(args.file, store.data["settings"]["proxy"])
    count = import_prices(store, args.file, raw)
    print(f"imported {count} prices into {store.path}")
    return 0


def _test_channel(store: ConfigStore, item: dict) -> int:
    async def test() -> dict:
        gateway = Gateway(store.snapshot(),
                          config_dir=os.path.dirname(os.path.abspath(store.path)))
        try:
            return await gateway.test_channel(gateway.channel(item["id"]))
        finally:
            gateway.close()
    try:
        result = asyncio.run(test())
    except GatewayError as exc:
        print(f"channel {item['name']!r} failed: {exc.message}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"channel {item['name']!r} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(f"ok: channel {item['name']!r} answered {result['model']} in "
          f"{result['latency_ms']:.0f} ms: {result['reply']!r}")
    return 0


def _count(items: list, word: str) -> str:
    return f"{len(items)} {word}{'' if len(items) == 1 else 's'}"


def check_config(path: str) -> int:
    """`config check`: every problem (exit 2) or warnings only (exit 0), one per line."""
    try:
        store, _ = ConfigStore.load(path, create=False)
    except ConfigError as exc:
        problems = [str(exc)]
        if getattr(exc, "where", None):
            with open(path, "rb") as f:
                problems = config_problems(json.loads(f.read().decode("utf-8-sig")), path)
        for problem in problems:
            print(f"error: {problem}")
        print(f"{path}: {_count(problems, 'problem')}; aigateway will not start with this file")
        return 2
    data, warnings = store.data, list(store.notes)
    s = data["settings"]
    errors = [f"{path}: settings.{key}: {s[key]!r} does not exist; give the path of a PEM "
              f"file (relative to the configuration file)" for key in ("tls_cert", "tls_key")
              if s[key] and not os.path.isfile(os.path.join(os.path.dirname(path), s[key]))]
    if not is_loopback_host(s["host"]):
        warnings.append(f"{path}: settings.host: {s['host']} is reachable from other machines")
    if s["require_auth"] and not any(t["enabled"] for t in data["tokens"]):
        warnings.append(f"{path}: tokens: no enabled token, so every request gets 401; "
                        f"`aigateway tokens create --name NAME` makes one")
    names = {c["name"].lower() for c in data["channels"]} | {c["id"] for c in data["channels"]}
    for i, t in enumerate(data["tokens"]):
        for ref in t["allowed_channels"]:
            if (ref.lower() if isinstance(ref, str) else ref) not in names:
                warnings.append(f"{path}: tokens[{i}].allowed_channels: {ref!r} is no channel's "
                                f"name or id, so it allows nothing")
    for i, c in enumerate(data["channels"]):
        if c["enabled"] and not c["api_key"] and PROVIDERS[c["type"]].needs_key:
            warnings.append(f"{path}: channels[{i}].api_key: channel {c['name']!r} has no key")
    for problem in errors:
        print(f"error: {problem}")
    for warning in warnings:
        print(f"warning: {warning}")
    if errors:
        print(f"{path}: {_count(errors, 'problem')}")
        return 2
    print(f"{path}: valid ({_count(data['channels'], 'channel')}, "
          f"{_count(data['tokens'], 'token')})")
    return 0


def run_headless(store: ConfigStore, host: str | None, port: int | None, quiet: bool) -> int:
    settings = store.data["settings"]
    bind_host = host or settings["host"]
    bind_port = settings["port"] if port is None else port

    def on_event(kind: str, payload: Any) -> None:
        if kind == EVENT_REQUEST and not quiet:
            print(access_line(payload), flush=True)
        elif kind == EVENT_LOG:
            print(f"{time.strftime('%H:%M:%S')} {payload}", file=sys.stderr, flush=True)

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, stop.set)
            except (NotImplementedError, RuntimeError):                # Windows
                signal.signal(sig, lambda *_: loop.call_soon_threadsafe(stop.set))
        reload = asyncio.Event()
        if hasattr(signal, "SIGHUP"):                                  # not on Windows
            loop.add_signal_handler(signal.SIGHUP, reload.set)
        await run_gateway(store, stop, host=bind_host, port=bind_port, on_event=on_event,
                          reload=reload)

    try:
        asyncio.run(serve())
    except ConfigError as exc:
        print(f"aigateway: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"aigateway: {listen_error(bind_host, bind_port, exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


def report_error(text: str) -> None:
    """An error for the user: on stderr, or in a message box when there is none (the windowed
    EXE has no console)."""
    if sys.stderr is not None:
        print(f"aigateway: {text}", file=sys.stderr)
        return
    try:
        _load_tk()
        root = tk.Tk()
        root.withdraw()
        messagebox.showerror("AI Gateway", text, parent=root)
        root.destroy()
    except Exception:                                                  # nowhere left to say it
        pass


def main(argv: list[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    path = os.path.abspath(args.config) if args.config else default_config_path()
    if args.command is not None:
        return run_command(args, path)
    try:
        store, new_key = ConfigStore.load(path)
    except ConfigError as exc:
        report_error(str(exc))
        return 2
    if sys.stderr is not None:
        for note in store.notes:
            print(f"aigateway: note: {note}", file=sys.stderr)
    lock = InstanceLock(path)
    try:
        lock.acquire()
    except ConfigError as exc:
        report_error(str(exc))
        return 2
    try:
        return _run(args, store, path, new_key)
    except OSError as exc:                    # anything else the system refused at start
        where = f" ({exc.filename})" if exc.filename else ""
        report_error(f"cannot start: {exc.strerror or exc}{where}")
        return 2
    finally:
        lock.release()


def tune_collector() -> None:
    """The garbage collector of a running gateway: what start-up made is frozen (never scanned
    again), and a collection waits for GC_THRESHOLDS[0] new container objects instead of 700.
    With 1,000 streams open, the defaults ran about 26 collections a second, 6-7% of the
    gateway's CPU, two of them full ones that held every stream for 55-110 ms; these settings
    run two or three collections in 10 s, of 15-35 ms each (bench/README).  Cyclic garbage
    waits longer to be freed; most of what a request makes is freed by reference counting."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def _run(args: argparse.Namespace, store: ConfigStore, path: str, new_key: str | None) -> int:
    tune_collector()
    if not args.headless and gui_available():
        try:
            app = App(store, host=args.host, port=args.port, new_key=new_key)
        except Exception as exc:          # tkinter.TclError: no usable display after all
            if tk is None or not isinstance(exc, tk.TclError):
                raise
            print(f"aigateway: cannot open the window ({exc}); running headless.",
                  file=sys.stderr)
        else:
            app.run()
            return 0
    if new_key is not None:
        print(f"Created {path} with a new gateway token (shown only this once):\n  {new_key}\n"
              f"Clients send it as 'Authorization: Bearer <token>' (OpenAI SDKs), "
              f"'x-api-key: <token>' (Anthropic), 'x-goog-api-key: <token>' or '?key=<token>' "
              f"(Gemini).", flush=True)
    if not args.headless and not gui_available():
        print("aigateway: no display (or no tkinter) here; running headless.", file=sys.stderr)
    return run_headless(store, args.host, args.port, args.quiet)


if __name__ == "__main__":
    sys.exit(main())
