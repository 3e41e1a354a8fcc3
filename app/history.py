"""What the app keeps across restarts: where its store lives, and the routes a page reads its history by.

Each browser sees its own conversations only (app/access.py: an owner token, sent as the
`X-AFNext-Owner` header). A conversation of another owner answers exactly as a missing one does: 404.

    GET    /afnext/conversations?kind=talk|recording  → {"conversations": [...], "disk_bytes": N}
    GET    /afnext/conversations/{id}                 → the conversation and its turns
    GET    /afnext/conversations/{id}/audio/{n}       → user turn n's audio ("recording": the recording)
    PATCH  /afnext/conversations/{id}  {"title": …}  → renamed
    DELETE /afnext/conversations/{id}                 → deleted, with the audio nothing else uses

Where the store lives (`data_folder`): `--data DIR`; else on a Hugging Face Space its persistent
storage (`/data`) when one is mounted, else a temporary folder, and the page says that history ends
with the Space's next restart; elsewhere the per-user data folder (afnext.store.default_path).
"""

from __future__ import annotations

import asyncio
import logging
import mimetypes
import os
import sqlite3
import tempfile
import threading
from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from afnext import strict_json
from afnext.store import Store, StoreError, StoreFull, default_path

from .access import OWNER_HEADER, OWNER_REFUSAL, Access

log = logging.getLogger(__name__)

ROUTE = "/afnext/conversations"
SPACES_DATA = Path("/data")  # where a Space's persistent storage is mounted
PRUNE_EVERY_S = 6 * 3600.0
MAX_LISTED = 500  # conversations one listing returns, the most recent first
MAX_BODY_BYTES = 4096  # a rename


def data_folder(given: str | None) -> tuple[Path, str | None]:
    """Where the app's store lives, and a notice for the page when history will not outlive a restart."""
    if given:
        return Path(given).expanduser(), None
    if os.environ.get("SPACE_ID") and not os.environ.get("AFNEXT_DATA"):  # a Hugging Face Space
        if SPACES_DATA.is_dir() and os.access(SPACES_DATA, os.W_OK):
            return SPACES_DATA / "afnext", None
        return Path(tempfile.mkdtemp(prefix="afnext-history-")), (
            "This Space has no persistent storage, so conversations and recordings are kept only until it "
            "restarts; add persistent storage in the Space's settings to keep them.")
    return default_path(), None


MAX_HISTORY_GB = 10.0  # audio the app's store holds; beyond it the conversations least recently used go first


def open_store(given: str | None, max_gb: float = MAX_HISTORY_GB) -> tuple[Store, str | None]:
    """The app's store (holding at most `max_gb` of audio), and a notice (also logged) when history is
    not kept across restarts. A folder that cannot be used is said, and a temporary one serves
    instead: the app still starts."""
    folder, notice = data_folder(given)
    limit = int(max_gb * 1e9)
    try:
        store = Store(folder, max_bytes=limit)
    except (OSError, sqlite3.Error, StoreError) as exc:
        fallback = Path(tempfile.mkdtemp(prefix="afnext-history-"))
        if isinstance(exc, StoreError):  # its sentence says what is wrong with the store, and what to do
            notice = f"{exc} Until then, history is kept in a temporary folder, lost when the app stops."
        else:
            notice = (f"History cannot be kept in {folder} ({exc}), so it is kept in a temporary folder until the "
                      "app stops; start with --data DIR to choose a writable folder.")
        store = Store(fallback, max_bytes=limit)
    if notice:
        log.warning(notice)
    log.info("conversations are kept in %s", store.path)
    return store, notice


def prune_every(store: Store, keep_days: float, interval_s: float = PRUNE_EVERY_S,
                stop: threading.Event | None = None) -> None:
    """Delete what has not been used for `keep_days`, now and every `interval_s` (a daemon thread)."""
    stop = stop or threading.Event()
    while True:
        try:
            if gone := store.prune(keep_days):
                log.info("deleted %d conversation(s) unused for %g days", gone, keep_days)
        except (OSError, sqlite3.Error) as exc:
            log.warning("could not prune the store: %s", exc)
        if stop.wait(interval_s):
            return


def listing(store: Store, owner: str, kind: str | None) -> dict:
    """`owner`'s conversations (of `kind`) and the disk their audio takes."""
    shown = [c for c in store.list(owner=owner, kind=kind) if c.turns or c.kind == "recording"][:MAX_LISTED]
    return {"conversations": [{"id": c.id, "kind": c.kind, "title": c.title or _untitled(c.kind), "turns": c.turns,
                               "created": c.created, "updated": c.updated} for c in shown],
            "disk_bytes": store.disk_bytes(owner=owner)}


def _untitled(kind: str) -> str:
    return {"talk": "Voice conversation", "recording": "Recording"}.get(kind, "Conversation")


def transcript(store: Store, cid: str, owner: str) -> dict | None:
    """One conversation, turn by turn, as the page shows it; None if `owner` has none by that id."""
    conversation = store.get(cid, owner=owner)
    if conversation is None:
        return None
    turns = [{"role": t.role, "text": t.text if t.role == "user" else t.answer, "think": t.think,
              "audio": t.audio is not None, "seconds": _seconds(store, t.audio), "reasoning": t.reasoning,
              "steps": t.steps, "interrupted": t.interrupted, "timings": t.timings} for t in store.turns(cid)]
    return {"id": cid, "kind": conversation.kind, "title": conversation.title or _untitled(conversation.kind),
            "created": conversation.created, "updated": conversation.updated,
            "recording": conversation.audio is not None, "turns": turns}


def _seconds(store: Store, key: str | None) -> float | None:
    """How long a turn's kept audio is (read from its header), or None."""
    if key is None:
        return None
    try:
        import soundfile

        return round(soundfile.info(str(store.audio_path(key))).duration, 1)
    except (StoreError, RuntimeError, ValueError):  # a format libsndfile does not read (mp3 is fine)
        return None


def audio_file(store: Store, cid: str, owner: str, which: str) -> Path | None:
    """The audio of `owner`'s conversation `cid`: its recording ("recording") or user turn `which`
    (0-based, counted among user turns); None if there is none."""
    conversation = store.get(cid, owner=owner)
    if conversation is None:
        return None
    if which == "recording":
        key = conversation.audio
    else:
        users = [t for t in store.turns(cid) if t.role == "user"]
        n = int(which) if which.isascii() and which.isdigit() and len(which) <= 9 else len(users)
        key = users[n].audio if n < len(users) else None
    try:
        return None if key is None else store.audio_path(key)
    except StoreError:
        return None


DELETED = "This conversation was deleted (here or in another tab); start a new one."


def forget_live(live, cid: str, owner: str) -> None:
    """A deleted conversation's live state goes too, and whoever still holds it (another tab's socket
    or page) is told at its next turn, in one sentence, instead of writing to a conversation that is gone."""
    if live is None:
        return
    journal = getattr(live.get(cid, owner), "journal", None)
    if journal is not None:
        journal.broken = DELETED
    live.drop(cid, owner)


class HistoryRoutes:
    """The routes above, over one store."""

    def __init__(self, store: Store, access: Access, live=None) -> None:
        self.store, self.access = store, access
        self.live = live  # the app's Live registry: a deleted conversation's live state goes too

    def routes(self) -> list[Route]:
        return [Route(ROUTE, self._list, methods=["GET"]),
                Route(ROUTE + "/{cid}", self._one, methods=["GET", "PATCH", "DELETE"]),
                Route(ROUTE + "/{cid}/audio/{which}", self._audio, methods=["GET"])]

    def _owner(self, request: Request) -> str:
        owner = self.access.owner(request.headers)
        if owner is None:
            raise _Refused(400 if request.headers.get(OWNER_HEADER) is not None else 401,
                           OWNER_REFUSAL if request.headers.get(OWNER_HEADER) is not None else
                           "Send your owner token as the X-AFNext-Owner header (the page does).")
        return owner

    async def _list(self, request: Request) -> Response:
        async def run():
            owner = self._owner(request)
            kind = request.query_params.get("kind")
            return JSONResponse(await asyncio.to_thread(listing, self.store, owner, kind), headers=_PRIVATE)
        return await _answering(run)

    async def _one(self, request: Request) -> Response:
        async def run():
            owner, cid = self._owner(request), request.path_params["cid"]
            if request.method == "GET":
                found = await asyncio.to_thread(transcript, self.store, cid, owner)
                if found is None:
                    raise _missing(cid)
                return JSONResponse(found, headers=_PRIVATE)
            if request.method == "DELETE":
                if not await asyncio.to_thread(self.store.delete, cid, owner=owner):
                    raise _missing(cid)
                forget_live(self.live, cid, owner)
                return JSONResponse({"deleted": cid})
            body = b""
            async for chunk in request.stream():  # read no further than a rename can be
                body += chunk
                if len(body) > MAX_BODY_BYTES:
                    raise _Refused(413, "A rename is a short JSON object such as {\"title\": \"Monday's meeting\"}.")
            try:
                payload = strict_json.loads(body or b"{}")
            except (ValueError, UnicodeDecodeError, RecursionError):
                raise _Refused(400, "The request body is not valid JSON.") from None
            title = payload.get("title") if isinstance(payload, dict) else None
            if not isinstance(title, str):
                raise _Refused(400, "Send the new name as {\"title\": \"…\"}.")
            try:
                renamed = await asyncio.to_thread(self.store.rename, cid, title, owner=owner)
            except StoreError as exc:
                raise _Refused(507 if isinstance(exc, StoreFull) else 400, str(exc)) from None
            kept = await asyncio.to_thread(self.store.get, cid, owner=owner) if renamed else None
            if kept is None:  # none such, or deleted from another tab since it was renamed
                raise _missing(cid)
            return JSONResponse({"id": cid, "title": kept.title})
        return await _answering(run)

    async def _audio(self, request: Request) -> Response:
        async def run():
            owner, cid = self._owner(request), request.path_params["cid"]
            path = await asyncio.to_thread(audio_file, self.store, cid, owner, request.path_params["which"])
            if path is None:
                raise _Refused(404, "There is no such audio in your conversations.")
            # A recording is kept under its upload's suffix: audio named "x.html" must not come back as a page.
            kind = mimetypes.guess_type(path.name)[0] or ""
            if not kind.startswith(("audio/", "video/")):
                kind = "application/octet-stream"
            return _StoredFile(path, media_type=kind, headers={**_PRIVATE, "X-Content-Type-Options": "nosniff"})
        return await _answering(run)


class _StoredFile(FileResponse):
    """A stored file, or the one-sentence 404 when its conversation was deleted (another tab, another
    replica) between finding the file and sending it: Starlette raises then, a 500 with a traceback."""

    async def __call__(self, scope, receive, send) -> None:
        started = False

        async def sending(message) -> None:
            nonlocal started
            started = True
            await send(message)
        try:
            await super().__call__(scope, receive, sending)
        except (RuntimeError, FileNotFoundError):
            if started or os.path.exists(self.path):
                raise
            await JSONResponse({"error": "That audio was deleted a moment ago."}, 404, headers=_PRIVATE)(
                scope, receive, send)


_PRIVATE = {"Cache-Control": "private, no-store"}


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _missing(cid: str) -> _Refused:
    return _Refused(404, f"There is no conversation {cid[:64]!r} of yours here.")


async def _answering(run) -> Response:
    try:
        return await run()
    except _Refused as refusal:
        return JSONResponse({"error": str(refusal)}, refusal.status)
    except StoreFull as exc:  # a delete on a full disk: nothing changed, and "try again" would not help
        return JSONResponse({"error": str(exc)}, 507)
    except (OSError, sqlite3.Error) as exc:
        log.exception("history request failed")
        return JSONResponse({"error": f"The history could not be read ({type(exc).__name__}); try again."}, 503)
