"""The HTTP gate in front of the Gradio app: what a public server must refuse before Gradio sees it.

Gradio lets any HTTP client call any event of a page by name, uploads files into a cache without
limit, and takes request bodies of any size. In front of it, this ASGI middleware:

- lets through only the POST routes the page and the API client use (upload, queue, calls, cancel,
  reset; every other one, such as Gradio's recording and streaming uploads, is answered 404), and
  no method but GET, HEAD, OPTIONS and POST;
- answers calls by name (`/gradio_api/call/NAME`, `/run/NAME`, `/api/NAME`) only for the endpoints
  we document; the page's own events are called by their index, as the page itself calls them;
- refuses any file in a request that is not an upload of this server (a server path such as
  `{"path": "/home/me/private.wav"}` never reaches a handler), whatever Gradio would do with it;
- caps every request body in bytes, and uploads by size and by the disk quota (bytes and files) of
  the upload folder, counting the uploads in flight; an upload that stops sending, or sends too slowly,
  is ended, so a few idle connections cannot hold the quota and keep everyone else's uploads out;
- refuses Gradio's file route for a URL (`/gradio_api/file=https://…`), which Gradio would fetch
  from the internet for anyone and stream back: the page names only files on this server;
- limits each client address to a fair share: a burst of requests, then a steady rate, and a few
  uploads at a time.

Every refusal is one sentence (JSON `{"error": …}`, plain text for uploads, which the page shows as
it is) and one log line, never a traceback.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from starlette.requests import ClientDisconnect

from afnext import strict_json

from .access import HOST_REFUSAL, client_group

log = logging.getLogger(__name__)

API_PREFIX = "/gradio_api"
OPENAI_PREFIX = "/v1/"  # app/api.py: rate-limited here, everything else checked there
HISTORY_PREFIX = "/afnext/conversations"  # app/history.py: the same
NAMED_CALLS = ("/call/v2/", "/call/", "/run/", "/api/")  # Gradio's routes that pick an event by name
POST_ROUTES = ("/upload", "/queue/join", "/cancel", "/reset")  # and NAMED_CALLS: what the page and the client send
OPEN_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})  # passed through as they are (no handler reads their body)
MAX_BODY_BYTES = 1 << 20  # bytes of JSON in one call: a question is at most 32,000 characters (afnext.session)
UPLOAD_QUOTA_BYTES = 4 << 30  # bytes the upload folder may hold: a dozen 30-minute WAVs at once
MAX_UPLOAD_FILES = 2000  # files it may hold (one upload request may carry many): bounds its scans too
FOLDER_REFRESH_S = 1.0  # the folder is measured (off the event loop) at most this often
# Per client address. Behind a reverse proxy every client has the proxy's address unless uvicorn is
# told to trust its X-Forwarded-For (FORWARDED_ALLOW_IPS=<proxy address>; nobody's by default, see
# app/web.py `trust_proxies`), so the budget is generous.
REQUEST_BURST = 120  # calls and uploads one client address may make at once…
REQUESTS_PER_S = 5.0  # …then this many a second (the page makes two or three per question)
UPLOADS_AT_ONCE = 2  # uploads in flight per client address
# An upload holds its Content-Length of the quota from its header on, so one that sends nothing would
# hold it for as long as its connection stays open (uvicorn has no body timeout): 4 idle connections
# declaring 1 GiB each kept every other upload out. It is ended after this long without a byte…
UPLOAD_IDLE_S = 30.0
UPLOAD_MIN_BYTES_PER_S = 64 << 10  # …or once it falls behind this rate (0.5 Mbit/s; a 1 GiB file: 4.5 h)
# Gradio's file routes; given a URL instead of a path, Gradio fetches it and streams it back.
FILE_ROUTES = (API_PREFIX + "/file=", API_PREFIX + "/file/")
URL_START = re.compile(r"[a-zA-Z][a-zA-Z0-9+.\-]*://|//|\\\\|\\/|/\\")  # scheme://, or a network path


@dataclass(frozen=True)
class GuardOptions:
    """What the gate lets through; `launch()` fills it in."""

    upload_dir: Path  # Gradio's upload folder (GRADIO_TEMP_DIR): the only place request files may be
    public_api: frozenset[str]  # api_names callable by name: the documented endpoints
    max_file_bytes: int  # bytes in one upload
    quota_bytes: int = UPLOAD_QUOTA_BYTES  # bytes the upload folder may hold
    burst: int = REQUEST_BURST
    rate_per_s: float = REQUESTS_PER_S
    uploads_at_once: int = UPLOADS_AT_ONCE
    # Whether a request's headers name this server (app/access.py: a server on 127.0.0.1 answers only to
    # its own names, against DNS rebinding); None: every Host is served.
    host_ok: Callable[[dict], bool] | None = None


class Refused(Exception):
    """A request the gate turns away: an HTTP status and one sentence."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class _Client:
    tokens: float
    stamp: float
    uploads: int = 0


@dataclass
class _Ledger:
    """Per-address request budgets (token buckets) and uploads in flight."""

    options: GuardOptions
    clients: dict[str, _Client] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def spend(self, address: str) -> None:
        now = time.monotonic()
        with self.lock:
            client = self.clients.setdefault(address, _Client(float(self.options.burst), now))
            client.tokens = min(self.options.burst, client.tokens + (now - client.stamp) * self.options.rate_per_s)
            client.stamp = now
            if client.tokens < 1:
                raise Refused(429, "Too many requests from your address; wait a few seconds and try again.")
            client.tokens -= 1
            if len(self.clients) > 10_000:  # forget addresses that have been quiet long enough to be full again
                full = self.options.burst / self.options.rate_per_s
                self.clients = {a: c for a, c in self.clients.items() if now - c.stamp < full or c.uploads}

    def upload_started(self, address: str) -> None:
        with self.lock:
            client = self.clients[address]
            if client.uploads >= self.options.uploads_at_once:
                raise Refused(429, "Your address is already sending files; wait for those uploads to finish.")
            client.uploads += 1

    def upload_ended(self, address: str) -> None:
        with self.lock:
            self.clients[address].uploads -= 1


class _Folder:
    """What the upload folder holds: measured on a worker thread at most every FOLDER_REFRESH_S, plus
    the bytes of uploads in flight, reserved when they start (so concurrent uploads cannot overshoot)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.bytes = self.files = self.reserved = 0
        self._measured_at = float("-inf")
        self._lock = asyncio.Lock()

    async def reserve(self, size: int, options: GuardOptions) -> None:
        async with self._lock:
            if time.monotonic() - self._measured_at > FOLDER_REFRESH_S:
                self.bytes, self.files = await asyncio.to_thread(measure_folder, self.path)
                self._measured_at = time.monotonic()
            if self.files >= MAX_UPLOAD_FILES or self.bytes + self.reserved + size > options.quota_bytes:
                raise Refused(507, "The server has no room for more uploads right now; try again in a few minutes.")
            self.reserved += size

    def settle(self, size: int) -> None:
        """An upload ended: its bytes are on disk now (or were refused); measure again next time."""
        self.reserved -= size
        self._measured_at = float("-inf")


class Guard:
    """ASGI middleware; see the module docstring. Gradio builds it from `launch(app_kwargs=…)`."""

    def __init__(self, app: Callable[..., Awaitable[None]], options: GuardOptions) -> None:
        self.app, self.options, self.ledger = app, options, _Ledger(options)
        self.folder = _Folder(options.upload_dir)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and self.options.host_ok is not None and not self.options.host_ok(
                {"host": (_header(scope, b"host") or b"").decode("latin-1")}):
            await _answer(send, 403, HOST_REFUSAL, openai=scope["path"].startswith(OPENAI_PREFIX), kind="permission_error")
            return
        if scope["type"] == "http" and _names_url(scope["path"]):
            log.info("refused %s %s from %s: a URL", scope["method"], scope["path"][:200], _address(scope))
            await _answer(send, 403, "This server serves its own files only; it fetches no URLs.")
            return
        # History reads take the store's lock, which the engine's commits take too: they count as well.
        if scope["type"] != "http" or (scope["method"] in OPEN_METHODS and not scope["path"].startswith(HISTORY_PREFIX)):
            await self.app(scope, receive, send)
            return
        full, address = scope["path"], _address(scope)
        if full.startswith((OPENAI_PREFIX, HISTORY_PREFIX)):  # app/api.py and app/history.py check their own bodies
            try:
                self.ledger.spend(address)
            except Refused as refusal:
                await _answer(send, refusal.status, str(refusal), openai=full.startswith(OPENAI_PREFIX))
                return
            await self.app(scope, receive, send)
            return
        path = full[len(API_PREFIX):] if full.startswith(API_PREFIX + "/") else None
        upload = path is not None and path.rstrip("/") == "/upload"
        try:
            self._check_route(scope["method"], path)
            self.ledger.spend(address)
            if _header(scope, b"transfer-encoding") is not None and _header(scope, b"content-length") is not None:
                raise Refused(400, "Send Content-Length or chunked transfer encoding, not both.")
            if upload:
                await self._upload(scope, receive, send, address)
                return
            body = await _body(receive, MAX_BODY_BYTES)
            if path.startswith(("/queue/join",) + NAMED_CALLS):
                self._check_call(path, body)
            receive = _replay(body, receive)
        except Refused as refusal:
            log.info("refused %s %s from %s: %s", scope["method"], full, address, refusal)
            # The page shows an upload's refusal as "HTTP <status>: <body>": plain text reads best there.
            await _answer(send, refusal.status, str(refusal), plain=upload)
            return
        await self.app(scope, receive, send)

    @staticmethod
    def _check_route(method: str, path: str | None) -> None:
        if method != "POST":
            raise Refused(405, f"This server takes no {method[:16]} requests.")
        if path is None or not (path.rstrip("/") in POST_ROUTES or path.startswith(NAMED_CALLS)):
            raise Refused(404, "There is no such endpoint; see the page's 'Use via API' list.")

    def _check_call(self, path: str, body: bytes) -> None:
        try:
            payload = strict_json.loads(body or b"{}")
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise Refused(400, "The request body is not valid JSON.") from None
        if not isinstance(payload, dict):
            raise Refused(400, "The request body must be a JSON object such as {\"data\": [...]}.")
        by_index = payload.get("fn_index") is not None  # as the page calls
        for prefix in NAMED_CALLS:
            if path.startswith(prefix) and not by_index:
                name = path[len(prefix):].split("/")[0]
                if name not in self.options.public_api:
                    raise Refused(404, f"There is no API endpoint named {name!r}; see the page's 'Use via API' list.")
        for file_path in _file_paths(payload):
            if not _inside(file_path, self.options.upload_dir):
                raise Refused(403, "Files must be uploaded to this server first (POST /gradio_api/upload); "
                                   "paths on the server are not accepted.")

    async def _upload(self, scope, receive, send, address: str) -> None:
        size = _content_length(scope)
        if size is None:
            raise Refused(411, "Send the upload with a Content-Length header.")
        if size > self.options.max_file_bytes + (1 << 16):  # multipart framing around the file
            raise Refused(413, f"The file is over the {self.options.max_file_bytes >> 20} MiB upload limit.")
        self.ledger.upload_started(address)
        try:
            await self.folder.reserve(size, self.options)
            body = _UploadBody(receive, size)
            try:
                await self.app(scope, body, send)
            except ClientDisconnect:  # Gradio's reader met the end we gave it, or the client left
                if body.why is None:
                    log.info("an upload from %s ended when its client left", address)
                    return
                raise Refused(body.status, body.why) from None
            finally:
                self.folder.settle(size)
        finally:
            self.ledger.upload_ended(address)


def _file_paths(value) -> Iterator[str]:
    """Every `path` inside a JSON payload: Gradio takes any object with one as a file (a FileData, or a
    component value nested in a chat message), so every one must name an upload."""
    if isinstance(value, dict):
        if "path" in value:
            yield str(value["path"])
        for item in value.values():
            yield from _file_paths(item)
    elif isinstance(value, list):
        for item in value:
            yield from _file_paths(item)


def _inside(path: str, folder: Path) -> bool:
    """Whether `path` resolves (links and `..` followed) to a file inside `folder`."""
    try:
        return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(folder))
    except (OSError, ValueError):
        return False


def folder_bytes(folder: Path) -> int:
    """Bytes of the regular files under `folder` (what its uploads occupy on disk)."""
    return measure_folder(folder)[0]


def measure_folder(folder: Path, *, stale_s: float = 60.0) -> tuple[int, int]:
    """(bytes, files) of the regular files under `folder`, tidying what Gradio leaves there: the folders
    it made for uploads since deleted, and the empty temporary file its File component makes in the
    top folder on every call (never removed), once they are `stale_s` old (younger ones may be in use)."""
    total = count = 0
    now = time.time()
    for root, dirs, files in os.walk(folder, topdown=False):
        top = root == str(folder)
        for name in files:
            path = os.path.join(root, name)
            try:
                info = os.lstat(path)
                if top and info.st_size == 0 and now - info.st_mtime > stale_s:
                    os.remove(path)
                    continue
                total += info.st_size
                count += 1
            except OSError:
                pass  # deleted meanwhile
        if not files and not dirs and not top:
            try:
                if now - os.stat(root).st_mtime > stale_s:
                    os.rmdir(root)
            except OSError:
                pass  # filled or removed meanwhile
    return total, count


def _header(scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return value
    return None


def _content_length(scope) -> int | None:
    value = _header(scope, b"content-length")
    try:
        return None if value is None else max(0, int(value))
    except ValueError:
        return None


async def _body(receive, limit: int) -> bytes:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise Refused(400, "The request ended before its body did.")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise Refused(413, f"The request body is over {limit >> 10} KiB.")
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


def _replay(body: bytes, receive):
    """`receive` that gives the body already read, then waits on the connection as before."""
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()
    return replayed


class _UploadBody:
    """`receive` for an upload: it ends the body (a disconnect, as if the client had gone, with `why` said)
    when more bytes come than its Content-Length said, when none come for UPLOAD_IDLE_S, or when the
    upload falls behind UPLOAD_MIN_BYTES_PER_S."""

    def __init__(self, receive, declared: int) -> None:
        self.receive, self.declared, self.seen, self.done = receive, declared, 0, False
        self.deadline = time.monotonic() + UPLOAD_IDLE_S + declared / UPLOAD_MIN_BYTES_PER_S
        self.why: str | None = None
        self.status = 408

    async def __call__(self):
        if self.done or self.why is not None:  # after the body: whatever the app waits for (a disconnect)
            return await self.receive() if self.why is None else {"type": "http.disconnect"}
        wait = min(UPLOAD_IDLE_S, self.deadline - time.monotonic())
        try:
            message = await asyncio.wait_for(self.receive(), max(wait, 0.0))
        except TimeoutError:
            self.why = (f"The upload sent nothing for {UPLOAD_IDLE_S:g} s; send the file again." if wait == UPLOAD_IDLE_S
                        else f"The upload was slower than {UPLOAD_MIN_BYTES_PER_S >> 10} KiB a second; send the file "
                             "again over a faster connection.")
            return {"type": "http.disconnect"}
        self.seen += len(message.get("body", b""))
        if self.seen > self.declared:
            self.why, self.status = "The upload was longer than its Content-Length header said.", 400
            return {"type": "http.disconnect"}
        self.done = message["type"] == "http.request" and not message.get("more_body")
        return message


def _names_url(path: str) -> bool:
    """Whether `path` (percent-decoded, as routes see it) asks Gradio's file route for a URL."""
    return any(path.startswith(route) and URL_START.match(path[len(route):]) is not None for route in FILE_ROUTES)


def _address(scope) -> str:
    return client_group((scope.get("client") or (None,))[0])


async def _answer(send, status: int, message: str, plain: bool = False, openai: bool = False,
                  kind: str = "rate_limit_exceeded") -> None:
    code = "rate_limit_exceeded" if status == 429 else None
    error = {"message": message, "type": kind, "param": None, "code": code} if openai else message
    body = message.encode() if plain else json.dumps({"error": error}).encode()
    kind = b"text/plain; charset=utf-8" if plain else b"application/json"
    headers = [(b"content-type", kind), (b"content-length", str(len(body)).encode())]
    if status == 429:  # how long to wait before trying again (the openai SDK reads it)
        headers.append((b"retry-after", b"2"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
