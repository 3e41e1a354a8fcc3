"""`python -m app --replicas N`: the app as N Ray Serve replicas behind one port.

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

Ray is an optional extra (requirements-serve.txt): nothing here imports it until `serve_replicas` runs.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from app.backend import BackendOptions

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
RAY_VERSION = "2.60.0"  # ConsistentHashRouter is in Serve since 2.56; requirements-serve.txt pins this one
INSTALL = ("--replicas runs the app on Ray Serve, which is not installed; install it with "
           "`bash scripts/setup.sh requirements-serve.txt` (or `pip install -r requirements-serve.txt`).")
APP_NAME = "afnext"
REPLICA_HEADER = "x-afnext-replica"
# Serve's default of 5 ongoing requests a replica would count every open page and socket against it and
# spill conversations onto other replicas; each replica has its own admission (429s, Gradio's queue).
MAX_ONGOING = 1024
# Autoscaling aims at this many ongoing requests a replica (a GPU holds a few dozen voice conversations).
TARGET_ONGOING = 32
READY_TIMEOUT_S = 1800.0  # replicas loading a real checkpoint from a cold disk take minutes


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
    page_secret: bytes = field(default_factory=lambda: secrets.token_bytes(32))  # one for all: tokens work anywhere
    # The folder, in each machine's temporary folder, that its replicas' uploads go in (app/web.py, assemble).
    shared: str = field(default_factory=lambda: f"afnext-replicas-{secrets.token_hex(6)}")


@dataclass(frozen=True)
class Scale:
    """How many replicas: `replicas` fixed, or autoscaled between `least` and `most` on ongoing requests."""

    replicas: int = 1
    least: int | None = None
    most: int | None = None

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError("--replicas must be at least 1.")
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


def require_ray() -> None:
    """SystemExit with the one sentence saying how to install Ray Serve, if it is not installed."""
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError:
        raise SystemExit(f"error: {INSTALL}") from None


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

            from app import web
            from app.backend import BackendLoader, start_backend

            logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
            opts = ReplicaOptions(**{**options, "backend": BackendOptions(**options["backend"])})
            self.name = serve.get_replica_context().replica_id.unique_id
            self.loader = BackendLoader(partial(start_backend, opts.backend), opts.backend.model)
            self.loader.wait(READY_TIMEOUT_S)  # BackendUnavailable: Serve retries the constructor
            self.site = web.assemble(self.loader, host=opts.host, upload_quota_bytes=opts.upload_quota_bytes,
                                     api_key=opts.api_key, data=opts.data, keep_days=opts.keep_days,
                                     max_history_gb=opts.max_history_gb, page_secret=opts.page_secret,
                                     extra_middleware=[Middleware(ReplicaHeader, name=self.name)],
                                     shared_root=Path(tempfile.gettempdir()) / opts.shared)
            log.info("replica %s ready (pid %d)", self.name, os.getpid())

        def __serve_build_asgi_app__(self):
            from app import web

            return web.asgi_app(self.site)

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


def deployment(options: ReplicaOptions, scale: Scale, gpus: bool):
    """The bound Serve application: `scale` replicas of the app, one GPU each if `gpus`, else one CPU."""
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    resources = {"num_gpus": 1} if gpus else {"num_cpus": 1}
    replica = serve.deployment(
        replica_class(), name="AFNextReplica", max_ongoing_requests=MAX_ONGOING,
        ray_actor_options={**resources, "runtime_env": {"env_vars": {"PYTHONPATH": str(ROOT)}}},
        request_router_config=RequestRouterConfig(request_router_class="app.serve_router.AffinityRouter"),
        health_check_period_s=5, health_check_timeout_s=30, graceful_shutdown_timeout_s=10,
        **scale.deployment_options())
    return replica.bind(asdict(options))


def start(options: ReplicaOptions, scale: Scale, *, port: int, address: str | None = None) -> str:
    """Join the Ray cluster at `address` (None: start one on this machine), run the replicas behind
    Serve's proxy on `options.host`:`port`, and return the app's URL once /health answers 200."""
    import ray
    from ray import serve

    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # Ray reports usage to its makers only if asked to
    init = {"address": address} if address else {"num_cpus": max(os.cpu_count() or 1, scale.at_most),
                                                  "include_dashboard": _dashboard()}
    ray.init(**init, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}}, logging_level=logging.WARNING,
             log_to_driver=True)
    gpus = ray.cluster_resources().get("GPU", 0) >= 1
    if options.backend.device.startswith("cuda") and not gpus:
        raise SystemExit("error: --device cuda was given but the Ray cluster has no GPU.")
    if not gpus:
        log.warning("The Ray cluster has no GPU: %d CPU replica(s), each with its model on the CPU.", scale.replicas)
    serve.start(http_options={"host": options.host, "port": port})
    serve.run(deployment(options, scale, gpus), name=APP_NAME, route_prefix="/", blocking=False)
    url = f"http://{'127.0.0.1' if options.host in ('0.0.0.0', '::') else options.host}:{port}/"
    _await_health(url, READY_TIMEOUT_S)
    return url


def _failed() -> str | None:
    """Why the deployment failed (Serve gave up starting its replicas), or None while it has not."""
    from ray import serve

    app = serve.status().applications.get(APP_NAME)
    if app is not None and str(app.status).endswith("DEPLOY_FAILED"):
        return (app.message or "its replicas could not start").strip().splitlines()[-1][:300]
    return None


def _dashboard() -> bool:
    """Ray's dashboard (replicas, queues, latencies) on :8265 where its packages are installed."""
    try:
        import aiohttp  # noqa: F401
        import ray.dashboard  # noqa: F401
    except ImportError:
        return False
    return os.environ.get("AFNEXT_RAY_DASHBOARD", "1") != "0"


def _await_health(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url + "health", timeout=10) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if (why := _failed()) is not None:
            raise SystemExit(f"error: the replicas could not start: {why}")
        if time.monotonic() > deadline:
            raise SystemExit(f"error: the replicas did not answer {url}health within {timeout_s:.0f} s.")
        time.sleep(0.5)


def stop(options: ReplicaOptions) -> None:
    """Stop the replicas (each removes its own folder), leave the cluster (stopping it if started here)."""
    import ray
    from ray import serve

    try:
        if ray.is_initialized():
            serve.shutdown()
    finally:
        ray.shutdown()
        shutil.rmtree(Path(tempfile.gettempdir()) / options.shared, ignore_errors=True)


def serve_replicas(options: ReplicaOptions, scale: Scale, *, port: int, address: str | None = None) -> int:
    """`python -m app --replicas N`: start, say where, serve until Ctrl-C or SIGTERM, then stop the replicas."""
    require_ray()
    stopping = threading.Event()
    try:
        url = start(options, scale, port=port, address=address)
        for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which sets its own (it aborts the process)
            signal.signal(sig, lambda *_: stopping.set())
        where = f"autoscaled {scale.least}-{scale.most}" if scale.least is not None else str(scale.replicas)
        print(f"Serving {url} with {where} replica(s) on Ray Serve; Ctrl-C stops them.", flush=True)
        stopping.wait()
    finally:
        stop(options)
    return 0


if __name__ == "__main__":  # pragma: no cover - run through python -m app --replicas
    sys.exit("Run python -m app --replicas N.")
