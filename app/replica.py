"""One replica of `python -m app --replicas N` (app/replicas.py), as Ray Serve runs it, and the deployment
that makes N of them.

Each replica is the whole app of one process — the page, /v1 (Chat Completions, Realtime), /health —
with its own engine: one GPU each where the cluster has GPUs, else CPU. Ray Serve's proxy takes every
request on the one port and hands it to a replica chosen by `AffinityRouter` (app/serve_router.py):

- a request with an `x-session-id` header goes where every earlier request with that id went (a hash
  ring over the replicas, Serve's `ConsistentHashRouter`), so a conversation's KV cache is found again.
  The page sends its browser's own id on every request (app/static/affinity.js); API clients send
  one per conversation. A Realtime socket is one connection: it stays on its replica for its lifetime.
- a request without one goes to the less busy of two replicas picked at random (Serve's "power of
  two choices" on ongoing requests).

Every response names its replica in the `x-afnext-replica` header (a socket's handshake too).

When a replica dies, Serve starts another and the ring moves the dead one's ids to the others. A
Chat Completions request carries its whole history, so the next turn is answered there, its prompt
prefilled again (`cached_tokens` is 0 once). Conversations kept in the store (the page's, Realtime
sessions with an owner) are rebuilt from it when the store is shared: replicas on one machine open the
same data folder (SQLite in WAL mode takes several processes; a write waits for another's up to
afnext/store.py's BUSY_TIMEOUT_MS). Replicas on several machines each keep their own store (SQLite over
a network file system is not safe); the README says what a user sees.

When Serve removes a replica (autoscaling down, a redeploy, the app deleted from a cluster joined), the
replica drains: Serve sends it nothing new and waits, up to DRAIN_S, for what it has in flight. Answers
finish; a Realtime socket is closed with a sentence once its reply is over, and the page's heartbeat
streams end (`Drain`), so that an idle socket or page does not keep the replica for the whole DRAIN_S.

Here: what every replica is started with (`ReplicaOptions`) and how many run (`Scale`); the middleware
that names a replica (`ReplicaHeader`) and lets a draining one go (`Drain`); the replica's class and the
bound deployment. Ray's worker processes import this module: it imports Ray only inside `replica_class`
and `deployment`, and the web app only in a replica's constructor.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import secrets
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from app import realtime_wire as wire
from app.backend import BackendOptions
from app.guard import REQUESTS_PER_S

log = logging.getLogger(__name__)

REPLICA_HEADER = "x-afnext-replica"
# Serve's default of 5 ongoing requests a replica would count every open page and socket against it and
# spill conversations onto other replicas; each replica has its own admission (429s, Gradio's queue).
MAX_ONGOING = 1024
# Autoscaling aims at this many ongoing requests a replica (a GPU holds a few dozen voice conversations).
TARGET_ONGOING = 32
READY_TIMEOUT_S = 1800.0  # replicas loading a real checkpoint from a cold disk take minutes
# How long Serve lets a replica it removes finish what it has in flight before it kills the process.
# The longest answer the app gives by default is a Think answer (4096 tokens, the Think card's limit)
# about a 30-minute recording: a prefill of seconds, then 1.5-3 minutes of decoding at 20-40 ms a token
# on a GPU, more while it is shared with other conversations. Ten minutes finish that with room; an
# answer asked for longer through the API (max_tokens up to the context) is cut at the bound. A drain
# that long only waits for answers: idle sockets and pages are let go at once (Drain). A replica still
# draining holds its GPU, so a redeploy on a machine with no GPU free waits for it.
DRAIN_S = 600.0
DRAIN_POLL_S = 1.0  # how often a replica's open sockets look whether it has begun to drain
GOING_AWAY = 1001  # the WebSocket close code for "the server is going away" (RFC 6455)
DRAINING = "This replica of the app is stopping; connect again to go on (a kept conversation resumes)."
# A Realtime reply starts and ends with these events (app/realtime_wire.py puts an event's type first).
REPLY_EVENT = re.compile(r'\{"type": ?"response\.(created|done)"')


@dataclass(frozen=True)
class ReplicaOptions:
    """What every replica is started with: what `python -m app` takes for one process."""

    backend: BackendOptions
    host: str
    api_key: str | None
    data: str | None
    keep_days: float
    max_history_gb: float
    upload_quota_bytes: int
    requests_per_s: float = REQUESTS_PER_S  # per client address, after a burst (app/guard.py)
    page_secret: bytes = field(default_factory=lambda: secrets.token_bytes(32))  # one for all: tokens work anywhere
    # The folder, in each machine's temporary folder, its replicas' own folders go in: their uploads, and
    # the WAV copies any of them serves (app/web.py, assemble).
    shared: str = field(default_factory=lambda: shared_folder_name())


SHARED_PREFIX = "afnext-replicas-"


def shared_folder_name() -> str:
    """This run's shared folder's name: the starting process's id in it, so a later run can tell it was left."""
    return f"{SHARED_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"


@dataclass(frozen=True)
class Scale:
    """How many replicas: `replicas` fixed, or autoscaled between `least` and `most` on ongoing requests."""

    replicas: int = 1
    least: int | None = None
    most: int | None = None

    @classmethod
    def of(cls, replicas: int | None, least: int | None, most: int | None) -> Scale:
        """From the flags: --max-replicas alone autoscales from 1; --replicas is then where it starts."""
        if least is not None and most is None:
            raise ValueError("--min-replicas needs --max-replicas (the most replicas to scale up to).")
        if most is not None and least is None:
            least = 1
        return cls(replicas if replicas is not None else (least or 1), least, most)

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"--replicas must be at least 1 (given {self.replicas}).")
        if (self.least is None) != (self.most is None):
            raise ValueError("--min-replicas and --max-replicas go together.")
        if self.least is not None and not 0 < self.least <= self.replicas <= self.most:
            raise ValueError(f"Replicas must satisfy 1 <= --min-replicas <= --replicas <= --max-replicas "
                             f"(given {self.least}, {self.replicas}, {self.most}).")

    def deployment_options(self) -> dict:
        if self.least is None:
            return {"num_replicas": self.replicas}
        return {"autoscaling_config": {"min_replicas": self.least, "initial_replicas": self.replicas,
                                       "max_replicas": self.most, "target_ongoing_requests": TARGET_ONGOING}}

    @property
    def at_most(self) -> int:
        return self.most or self.replicas


class ReplicaHeader:
    """ASGI middleware: every HTTP response and WebSocket handshake names the replica that served it."""

    def __init__(self, app, name: str) -> None:
        self.app, self.header = app, (REPLICA_HEADER.encode(), name.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)

        async def named(message):
            if message["type"] in ("http.response.start", "websocket.accept"):
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            return await send(message)

        return await self.app(scope, receive, named)


def _draining() -> bool:
    """Whether Serve has begun to remove this replica. Serve tells a replica's own code only once the
    drain is over (its __del__), so this reads the flag Serve's replica sets when it begins (Ray 2.60's
    `Replica._shutting_down`); False where that is not found (sockets are then cut at DRAIN_S)."""
    try:
        from ray._private.worker import global_worker

        return bool(global_worker.actors[global_worker.actor_id]._replica_impl._shutting_down)
    except Exception:  # noqa: BLE001 - Ray's internals, not there outside a replica or in another Ray
        return False


class Drain:
    """ASGI middleware: what a draining replica lets go without cutting an answer. Serve counts an open
    Realtime socket, and a page's heartbeat stream, as a request in flight until it closes; left alone,
    either keeps the replica for all of DRAIN_S and is then cut. Once the replica drains:

    - each Realtime socket is told, as soon as no reply is running on it (a reply being given is
      finished first): an `error` event (code `replica_stopping`) and the close GOING_AWAY, both with
      the sentence DRAINING; its conversation ends here as if the client had left, and one kept in the
      store goes on from it when the client connects again (another replica answers);
    - the page's heartbeat streams end, as Gradio ends them when its own server stops; the browser
      opens the stream again and reaches a replica that stays.

    Everything else (Chat Completions, the page's questions, files) is served to its end."""

    def __init__(self, app, draining: Callable[[], bool] = _draining) -> None:
        self.app, self.draining = app, draining
        self.watcher: asyncio.Task | None = None

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        if self.watcher is None:  # started by the first request, on the loop the app serves on
            self.watcher = asyncio.get_running_loop().create_task(self._end_heartbeats())
        if scope["type"] == "http":
            return await self.app(scope, receive, send)
        return await self._socket(scope, receive, send)

    async def _drained(self) -> None:
        while not self.draining():
            await asyncio.sleep(DRAIN_POLL_S)

    async def _end_heartbeats(self) -> None:
        await self._drained()
        for route in getattr(self.app, "routes", ()):  # Gradio's app, mounted in the outer one (web.asgi_app)
            stop = getattr(getattr(route, "app", None), "stop_event", None)
            if stop is not None:
                stop.set()

    async def _socket(self, scope, receive, send) -> None:
        state = {"accepted": False, "replying": False, "closed": False}

        async def sent(message) -> None:
            if state["closed"]:
                return  # the client was told and the socket closed: what the app still sends goes nowhere
            if message["type"] == "websocket.accept":
                state["accepted"] = True
            elif message["type"] == "websocket.close":
                state["closed"] = True
            elif message["type"] == "websocket.send" and (reply := REPLY_EVENT.match(message.get("text") or "")):
                state["replying"] = reply.group(1) == "created"
            await send(message)

        async def tell() -> None:  # once draining and no reply runs: the client is told, the app sees it leave
            await self._drained()
            while not state["closed"] and (state["replying"] or not state["accepted"]):
                await asyncio.sleep(DRAIN_POLL_S)
            if state["closed"]:
                return
            state["closed"] = True
            error = {"type": "server_error", "code": "replica_stopping", "message": DRAINING, "param": None,
                     "event_id": None}
            try:
                await send({"type": "websocket.send", "text": json.dumps(wire.event("error", error=error))})
                await send({"type": "websocket.close", "code": GOING_AWAY, "reason": DRAINING})
            except Exception:  # noqa: BLE001 - the client has gone already: nothing to tell
                pass

        teller, waiting = asyncio.ensure_future(tell()), None

        async def received():
            nonlocal waiting
            waiting = waiting or asyncio.ensure_future(receive())
            await asyncio.wait((waiting, teller), return_when=asyncio.FIRST_COMPLETED)
            if not waiting.done():  # told: to the app, the client has left
                return {"type": "websocket.disconnect", "code": GOING_AWAY}
            message, waiting = waiting.result(), None
            return message

        try:
            await self.app(scope, received, sent)
        finally:
            teller.cancel()
            if waiting is not None:
                waiting.cancel()


def replica_class():
    """The deployment's class, made when Ray is imported (Serve's decorators need it)."""
    from ray import serve

    @serve.ingress()
    class AFNextReplica:
        """One replica: the whole app of one process, built once its model has loaded (Serve sends it
        nothing before its constructor returns, so no request meets a model still loading)."""

        def __init__(self, options: dict) -> None:
            from functools import partial

            from starlette.middleware import Middleware

            import ray
            import torch

            from app import web
            from app.backend import BackendLoader, start_backend

            logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
            # The CPUs Ray gave this replica, whatever OMP_NUM_THREADS the cluster's shell had.
            torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
            opts = ReplicaOptions(**{**options, "backend": BackendOptions(**options["backend"])})
            self.name = serve.get_replica_context().replica_id.unique_id
            self.loader = BackendLoader(partial(start_backend, opts.backend), opts.backend.model)
            self.loader.wait(READY_TIMEOUT_S)  # BackendUnavailable: Serve retries the constructor
            self.site = web.assemble(self.loader, host=opts.host, upload_quota_bytes=opts.upload_quota_bytes,
                                     api_key=opts.api_key, data=opts.data, keep_days=opts.keep_days,
                                     max_history_gb=opts.max_history_gb, page_secret=opts.page_secret,
                                     requests_per_s=opts.requests_per_s,
                                     extra_middleware=[Middleware(ReplicaHeader, name=self.name)],
                                     shared_root=Path(tempfile.gettempdir()) / opts.shared)
            log.info("replica %s ready (pid %d, %d torch threads)", self.name, os.getpid(), torch.get_num_threads())

        def __serve_build_asgi_app__(self):
            from app import web

            return Drain(web.asgi_app(self.site))

        def check_health(self) -> None:
            """Serve calls this every few seconds; a raise has the replica replaced."""
            backend = self.loader.wait(0)
            for engine in {backend.main, backend.think}:
                if not engine.alive:
                    raise RuntimeError("the engine's worker thread has stopped")

        def __del__(self) -> None:
            site = getattr(self, "site", None)
            if site is not None:
                site.close()

    return AFNextReplica


def deployment(options: ReplicaOptions, scale: Scale, gpus: bool, cpus: int, env: dict[str, str]):
    """The bound Serve application: `scale` replicas of the app, one GPU each if `gpus`, each with
    `cpus` CPUs (its torch threads: Ray sets OMP_NUM_THREADS to them) and the environment `env`."""
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    resources = {"num_gpus": 1, "num_cpus": cpus} if gpus else {"num_cpus": cpus}
    replica = serve.deployment(
        replica_class(), name="AFNextReplica", max_ongoing_requests=MAX_ONGOING,
        ray_actor_options={**resources, "runtime_env": {"env_vars": env}},
        request_router_config=RequestRouterConfig(request_router_class="app.serve_router.AffinityRouter"),
        health_check_period_s=5, health_check_timeout_s=30, graceful_shutdown_timeout_s=DRAIN_S,
        **scale.deployment_options())
    return replica.bind(asdict(options))
