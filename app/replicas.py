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

When Serve removes a replica (autoscaling down, a redeploy, the app deleted from a cluster joined), the
replica drains: Serve sends it nothing new and waits, up to DRAIN_S, for what it has in flight. Answers
finish; a Realtime socket is closed with a sentence once its reply is over, and the page's heartbeat
streams end (`Drain`), so that an idle socket or page does not keep the replica for the whole DRAIN_S.
Stopping the whole app (Ctrl-C, SIGTERM) drains nothing: a cluster started here is stopped at once.

Ray is an optional extra (requirements-serve.txt): nothing here imports it until `serve_replicas` runs.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import math
import os
import re
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from app import realtime_wire as wire
from app.backend import BackendOptions
from app.guard import REQUESTS_PER_S

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


def require_ray() -> None:
    """Exit with status 2, as every other start error does, and the one sentence saying how to install
    Ray Serve, if it is not installed."""
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError:
        print(f"error: {INSTALL}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


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


class StartError(RuntimeError):
    """The replicas cannot start as asked; the message says why, in one sentence, and what to do."""


# What the replicas take from the environment of the `python -m app` that starts them, wherever in the
# cluster they run: the model cache and offline mode, the store's place, the app's own settings.
# Not secrets (a runtime environment is shown in Ray's dashboard: set HF_TOKEN where each machine's Ray
# starts), nor what only means something on this machine.
FORWARDED = ("AFNEXT_", "HF_", "XDG_", "TRANSFORMERS_", "TORCH_HOME", "GRADIO_ANALYTICS_ENABLED")
NOT_FORWARDED = ("TOKEN", "SECRET", "PASSWORD", "KEY", "XDG_RUNTIME_DIR", "XDG_SESSION_")


def forwarded_env(environ: dict[str, str] | os._Environ = os.environ) -> dict[str, str]:
    env = {k: v for k, v in environ.items() if k.startswith(FORWARDED) and not any(n in k for n in NOT_FORWARDED)}
    return {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), environ.get("PYTHONPATH")]))}


def cpus_each(nodes: list[tuple[float, float]], replicas: int, gpus: bool) -> int:
    """The most CPUs each of `replicas` replicas can have with all of them placed on `nodes`, each
    (CPUs, GPUs): with `gpus`, a node holds at most one replica a GPU. At least 1."""
    for cpus in range(int(max((c for c, _ in nodes), default=1)), 1, -1):
        if sum(min(int(c // cpus), int(g)) if gpus else int(c // cpus) for c, g in nodes) >= replicas:
            return cpus
    return 1


# What a CPU replica's process holds besides its models' weights: Python, torch, Gradio, the engine's
# worker and its first buffers (its paged KV pool is committed as conversations grow, afnext/engine.py).
# Measured: a replica of the tiny model (1 MB of weights) held 0.6 GB once it had served a few requests.
REPLICA_PROCESS_BYTES = 600 << 20
CPU_BYTES_PER_PARAM = 4  # CPU replicas load their weights in float32 (afnext/model.py, pick_dtype)


def available_memory() -> int | None:
    """The memory this machine has available for new processes now, in bytes (Linux's MemAvailable);
    None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def checkpoint_folder(model: str) -> Path | None:
    """The folder `model` (a short name, folder or hub id) is in on this machine, found without loading,
    downloading or writing anything; None where it is not here yet (a replica would download it)."""
    from afnext.checkpoints import CHECKPOINTS
    from afnext.model import cached_file, tiny_root

    # not `model.resolve`: for "tiny" it writes the checkpoint when it is not there
    source = tiny_root() / "tiny-random" if model == "tiny" else Path(CHECKPOINTS.get(model, model)).expanduser()
    config = cached_file(str(source), "config.json")
    return config.parent if config is not None else None


def checkpoint_params(folder: Path) -> int | None:
    """The parameters in the checkpoint's safetensors files, counted from their headers (no weights are
    read); None when a file is missing (not all of it downloaded yet) or unreadable."""
    index = folder / "model.safetensors.index.json"
    try:
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() \
            else ["model.safetensors"]
        total = 0
        for name in files:
            with open(folder / name, "rb") as f:  # 8 bytes: the header's length; then the header, JSON
                header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
            total += sum(math.prod(t["shape"]) for key, t in header.items() if key != "__metadata__")
        return total
    except (OSError, ValueError, KeyError, TypeError):
        return None


def replica_bytes(backend: BackendOptions) -> int | None:
    """About the memory one CPU replica takes: its own copy of each model it loads, in float32, and its
    process; None when a model's size cannot be known here (then nothing is refused)."""
    weights = 0
    for model in filter(None, (backend.model, backend.think_model)):
        folder = checkpoint_folder(model)
        params = checkpoint_params(folder) if folder is not None else None
        if params is None:
            return None
        weights += params * CPU_BYTES_PER_PARAM
    return weights + REPLICA_PROCESS_BYTES


def _gb(n: float) -> str:
    return f"{n / (1 << 30):.1f} GB"


def _fit_in_memory(backend: BackendOptions, scale: Scale) -> None:
    """StartError, before any Ray cluster starts here, when the CPU replicas asked for cannot all fit in
    this machine's available memory (each loads the whole model); nothing when either is unknown."""
    each, free = replica_bytes(backend), available_memory()
    if each is None or free is None or scale.at_most * each <= free:
        return
    fit = int(free // each)
    told = f"This machine has {_gb(free)} of memory available and each CPU replica of {backend.model} takes about " \
           f"{_gb(each)} (its own copy of the model in float32, and its process)"
    if fit == 0:
        raise StartError(f"{told}: free some memory, or run it where there is more (or on GPUs).")
    raise StartError(f"{told}: start at most {fit} (--replicas / --max-replicas {fit}).")


def _memory_warning(backend: BackendOptions, scale: Scale, cluster_bytes: float) -> None:
    """On a cluster joined: say so when its machines' memory for tasks (Ray's `memory`) cannot hold the
    CPU replicas asked for; more machines may join, so nothing is refused."""
    each = replica_bytes(backend)
    if each is not None and cluster_bytes and scale.at_most * each > cluster_bytes:
        log.warning("The Ray cluster has %s of memory for tasks now and each CPU replica of %s takes about %s: "
                    "%d replicas may run out of memory unless more machines join.", _gb(cluster_bytes),
                    backend.model, _gb(each), scale.at_most)


def _cpu_replicas_here(device: str) -> bool:
    """Whether a cluster started here would run the replicas on the CPU (Ray sees the GPUs torch sees)."""
    import torch

    return device == "cpu" or (device == "auto" and not torch.cuda.is_available())


@dataclass
class Run:
    """One `serve_replicas`: whether it joined a cluster (else started one here) and has deployed the app
    there (what `stop` may remove: never another run's app of the same name)."""

    joined: bool
    deploying: threading.Thread | None = None  # the one giving Serve the app, from when this run deployed it

    @property
    def deployed(self) -> bool:
        return self.deploying is not None


def start(options: ReplicaOptions, scale: Scale, *, port: int, address: str | None = None,
          run: Run | None = None) -> str:
    """Join the Ray cluster at `address` (None: start one on this machine), run the replicas behind
    Serve's proxy on `options.host`:`port`, and return the app's URL once every replica is running
    and /health answers. StartError, with its sentence, for what the user can change. `run` is told
    once the app is deployed."""
    import ray
    from ray import serve

    run = run or Run(joined=address is not None)

    device = options.backend.device
    if device.startswith("cuda:"):
        raise StartError(f"--device {device} names one GPU; with --replicas each replica has its own GPU, which Ray "
                         "picks: use --device cuda (or leave out --device).")
    if address is None:
        _port_free(options.host, port)
        if _cpu_replicas_here(device):
            _fit_in_memory(options.backend, scale)
    elif address != "auto" and "://" not in address:
        _reachable(address)
    if address is not None:
        _token_mode_if_token()
    env = forwarded_env()
    os.environ["PYTHONPATH"] = env["PYTHONPATH"]  # Serve's proxy and controller import the router from there
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # Ray reports usage to its makers only if asked to
    here = os.cpu_count() or 1
    if address is None:
        # A stop by SIGTERM to the app's process group (a terminal closed, a supervisor) reaches Ray's
        # processes too: ray.shutdown then finds them going and waits for its driver's task events to
        # reach the GCS, by default 5 s; they only feed Ray's dashboard.
        os.environ.setdefault("RAY_task_events_shutdown_flush_timeout_ms", "500")
    # "local": a new cluster, even where `ray start` left one that ray.init would otherwise join.
    init = {"address": address} if address else {"address": "local", "num_cpus": max(here, scale.at_most),
                                                  "include_dashboard": _dashboard()}
    try:
        context = ray.init(**init, runtime_env={"env_vars": env}, logging_level=logging.WARNING, log_to_driver=True)
        log.info("the Ray cluster is at %s", context.address_info.get("gcs_address") or address)
    except ConnectionError as exc:
        raise StartError(f"No Ray cluster answers at --address {address} ({_first_line(exc)}); start one with "
                         "`ray start --head` (one using token authentication needs its token here: "
                         "~/.ray/auth_token or RAY_AUTH_TOKEN), or leave out --address to start one on this "
                         "machine.") from None
    if threading.current_thread() is threading.main_thread():
        # ray.init put its own handler on SIGTERM, which aborts the process (a stack dump, status -6):
        # until serve_replicas takes the signals, SIGTERM stops the start as Ctrl-C does (status 130).
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    nodes = [(n["Resources"].get("CPU", 0.0), n["Resources"].get("GPU", 0.0)) for n in ray.nodes() if n.get("Alive")]
    cluster_gpus = int(sum(g for _, g in nodes))
    if device.startswith("cuda") and not cluster_gpus:
        raise StartError("--device cuda was given but the Ray cluster has no GPU.")
    gpus = cluster_gpus >= 1 and device != "cpu"
    if gpus and cluster_gpus < scale.at_most and not run.joined:
        raise StartError(f"This machine has {cluster_gpus} GPU(s) and each replica takes one: start at most "
                         f"{cluster_gpus} (--replicas / --max-replicas {cluster_gpus}), or --device cpu for CPU replicas.")
    if gpus and cluster_gpus < scale.at_most:  # a cluster joined may grow (Ray's autoscaler adds machines)
        log.warning("The Ray cluster has %d GPU(s) now for up to %d replicas, one GPU each: the others wait for "
                    "more GPUs to join.", cluster_gpus, scale.at_most)
    if not gpus:
        log.warning("%s: %d CPU replica(s), each with its model on the CPU.",
                    "--device cpu" if cluster_gpus else "The Ray cluster has no GPU", scale.replicas)
        if run.joined:
            _memory_warning(options.backend, scale,
                            sum(n["Resources"].get("memory", 0.0) for n in ray.nodes() if n.get("Alive")))
    cpus = cpus_each(nodes, scale.at_most, gpus)
    serving = _serve_port() is not None  # Serve already runs on a cluster joined (else this run starts it)
    try:
        serve.start(http_options={"host": options.host, "port": port})
    except Exception as exc:  # the proxy could not take the port (another program's, on a machine of the cluster)
        if not any(words in str(exc).lower() for words in PORT_TAKEN):
            raise
        from app.web import port_busy

        if not serving:  # Serve would stay, its proxy retrying that port, and refuse every later start on another
            serve.shutdown()
        raise StartError(port_busy(options.host, port)) from None
    taken = _serve_port()
    if taken is not None and taken != port:
        raise StartError(f"Ray Serve already runs on this cluster on port {taken}: start with --port {taken}, or stop "
                         "it first (`serve shutdown`).")
    if (there := _application()) is not None and str(there.status).endswith("DELETING"):
        raise StartError(f"The app on this Ray cluster is still stopping (its replicas finish the answers they are "
                         f"giving, for up to {DRAIN_S / 60:.0f} minutes); start it again once `serve status` no "
                         f"longer lists {APP_NAME!r}.")
    if there is not None:
        raise StartError(f"The app already runs on this Ray cluster (Serve application {APP_NAME!r}, port {port}); "
                         f"use it, or stop it first (Ctrl-C where it was started, or `serve delete {APP_NAME}`).")
    failure: list[BaseException] = []

    # Serve takes the app and returns (serve.run would also wait for every replica to run, polling Serve from
    # its thread: a stop meanwhile found that call in flight as Ray shut down, and exited 1). The wait below
    # follows the replicas and says why they are not running.
    def deploy() -> None:
        try:
            serve._run(deployment(options, scale, gpus, cpus, env), name=APP_NAME, route_prefix="/", _blocking=False)
        except BaseException as exc:  # noqa: BLE001 - told to the waiting thread, which stops the start
            failure.append(exc)

    run.deploying = threading.Thread(target=deploy, name="afnext-serve-run", daemon=True)
    run.deploying.start()
    url = f"http://{'127.0.0.1' if options.host in ('0.0.0.0', '::') else options.host}:{port}/"
    _await_ready(url, READY_TIMEOUT_S, failure)
    return url


# What Serve's proxy says when its port is taken (Ray 2.60: "Failed to bind to address 'HOST:PORT'.").
PORT_TAKEN = ("address already in use", "errno 98", "failed to bind to address")


def _port_free(host: str, port: int) -> None:
    """StartError if `port` on `host` is taken here (Serve's proxy would fail in its own process, later)."""
    import socket

    from app.web import cannot_serve, port_busy

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise StartError(port_busy(host, port) if exc.errno == errno.EADDRINUSE
                             else cannot_serve(host, port, exc)) from None


def _token_mode_if_token() -> None:
    """Send Ray's authentication token when joining a cluster, if one is at hand (~/.ray/auth_token,
    RAY_AUTH_TOKEN) and RAY_AUTH_MODE does not say otherwise — as `ray start` does: a cluster started
    where a token is kept asks for it, and Ray's driver sends it only in token mode."""
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available)
    except ImportError:  # another Ray: its own defaults
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def _reachable(address: str) -> None:
    """StartError at once if nothing listens at `address` (HOST:PORT): Ray would wait a minute first."""
    import socket

    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise StartError(f"--address takes auto or HOST:PORT of the cluster's head (e.g. 10.0.0.5:6379), "
                         f"not {address!r}.")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as exc:
        raise StartError(f"No Ray cluster answers at --address {address} ({exc.strerror or exc}); start one "
                         "there with `ray start --head`, or leave out --address to start one on this machine.") from None


def _serve_port() -> int | None:
    """The port Serve's proxies take on this cluster (Serve keeps the first start's, ignoring others)."""
    try:
        from ray.serve.context import _get_global_client

        return int(_get_global_client().http_config.port)
    except Exception:  # Serve's internals: without them the health wait below says what is wrong
        return None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def _failed(app) -> str | None:
    """Why the deployment `app` (Serve's status of it) failed — Serve gave up starting its replicas —
    or None while it has not."""
    if app is not None and str(app.status).endswith("DEPLOY_FAILED"):
        return (app.message or "its replicas could not start").strip().splitlines()[-1][:300]
    return None


def _application():
    from ray import serve

    return serve.status().applications.get(APP_NAME)


def _dashboard() -> bool:
    """Ray's dashboard (replicas, queues, latencies) on :8265 where its packages are installed."""
    try:
        import aiohttp  # noqa: F401
        import ray.dashboard  # noqa: F401
    except ImportError:
        return False
    return os.environ.get("AFNEXT_RAY_DASHBOARD", "1") != "0"


WAITING_SAID_AFTER_S = 60.0  # replicas still not placed by then: Serve's reason goes to the log, once


def _await_ready(url: str, timeout_s: float, failure: list[BaseException]) -> None:
    """Until every replica runs (Serve's application RUNNING) and /health answers 200 through the proxy;
    StartError once Serve gives up, or `failure` (the deploying thread's) holds why it could not deploy."""
    started = time.monotonic()
    said = False
    while True:
        app = _application()
        if app is not None and str(app.status).endswith("RUNNING") and _healthy(url):
            return
        if (why := _failed(app)) is not None:
            raise StartError(f"The replicas could not start: {why}")
        if failure:
            raise StartError(f"The replicas could not start: {_first_line(failure[0])}")
        waited = time.monotonic() - started
        if not said and waited > WAITING_SAID_AFTER_S:
            said = True
            pending = [d.message for d in (app.deployments.values() if app is not None else []) if d.message]
            log.warning("The replicas are not all running after %.0f s%s", waited,
                        f": {' '.join(pending[0].split())[:400]}" if pending else " (a model still loading?)")
        if waited > timeout_s:
            raise StartError(f"The replicas were not all running within {timeout_s:.0f} s; `serve status` says why.")
        time.sleep(0.5)


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "health", timeout=10) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


WATCH_EVERY_S = 2.0  # how often a run checks that the cluster it started still runs


def _cluster_down(run: Run) -> str | None:
    """On a cluster this run started: the name of the Ray process that has exited (its node's raylet, or
    the GCS that holds its state), without which no replica or proxy runs; None while both run, on a
    cluster joined (others keep it up), or where Ray's internals are not as expected."""
    if run.joined:
        return None
    try:
        from ray._private import worker

        node = worker._global_node
        dead = {kind for kind, _ in node.dead_processes()} if node is not None else set()
    except Exception:  # Ray's internals: without them, nothing is watched
        return None
    return next((kind for kind in ("raylet", "gcs_server") if kind in dead), None)


def _cluster_gone(down: str, port: int) -> str:
    return (f"The Ray cluster this app started has stopped (its {down} process exited: was it killed, e.g. for "
            f"lack of memory?), and the replicas with it; nothing serves port {port} now: start the app again.")


def stop(options: ReplicaOptions, run: Run) -> None:
    """Stop the replicas and leave the cluster, in seconds. A cluster started here is stopped whole,
    its replicas with it, answers in flight or not: Serve's own shutdown would drain them first (up to
    DRAIN_S), and wait 30 s for a controller already gone. On a cluster joined, only this run's app goes:
    its replicas drain there, after this process has left; Serve and other apps stay."""
    import ray
    from ray import serve

    try:
        if ray.is_initialized() and run.joined and run.deployed:
            # Stopped while deploying: the app may not be submitted yet, and would land after a delete.
            deadline = time.monotonic() + 30
            while run.deploying.is_alive() and _application() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            serve.delete(APP_NAME, _blocking=False)
    finally:
        if run.deployed:  # Serve takes the app in about a second
            run.deploying.join(5.0)
        _no_auto_connect()  # a Ray call still running in a thread now fails, instead of joining a cluster again
        ray.shutdown()  # a cluster started here: its processes, the replicas' and Serve's among them
        # The replicas' own folders are in it, on this machine: a replica killed leaves its own there.
        shutil.rmtree(Path(tempfile.gettempdir()) / options.shared, ignore_errors=True)


def _no_auto_connect() -> None:
    """Turn off Ray's auto-connect in this process: a Ray call made after ray.shutdown would otherwise call
    ray.init() itself, which joins the last cluster started on this machine (Ray 2.60; it aborted the
    process when that was the cluster being stopped)."""
    try:
        from ray._private import auto_init_hook

        auto_init_hook.enable_auto_connect = False
    except ImportError:  # another Ray: its own ways
        pass


def metrics_urls() -> list[str]:
    """Where each machine of the cluster serves its metrics, Serve's among them (`ray_serve_*`)."""
    import ray

    return [f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics" for n in ray.nodes()
            if n.get("Alive") and n.get("MetricsExportPort")]


SHARED_PREFIX = "afnext-replicas-"


def shared_folder_name() -> str:
    """This run's shared folder's name: the starting process's id in it, so a later run can tell it was left."""
    return f"{SHARED_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"


def sweep_shared(base: Path | None = None) -> None:
    """Remove the shared folders left on this machine by runs that are over: no replica here uses them
    (each replica's own folders inside name its pid) and the process that started the run is gone. A
    replica may outlive its starter (a cluster joined keeps the app when the starter is killed), and a
    starter on another machine is never alive here: the replicas' pids decide."""
    from app.web import alive

    def pids(folder: Path) -> list[int]:
        names = [f.name.removeprefix("afnext-app-") for f in folder.glob("*/afnext-app-*")]
        return [int(n) for n in names if n.isdigit()]

    for left in (base or Path(tempfile.gettempdir())).glob(f"{SHARED_PREFIX}*"):
        starter = left.name.removeprefix(SHARED_PREFIX).split("-")[0]
        if not starter.isdigit() or int(starter) == os.getpid() or alive(int(starter)):
            continue
        if not any(alive(pid) for pid in pids(left)):
            shutil.rmtree(left, ignore_errors=True)


def serve_replicas(options: ReplicaOptions, scale: Scale, *, port: int, address: str | None = None) -> int:
    """`python -m app --replicas N`: start, say where, serve until Ctrl-C or SIGTERM, then stop the
    replicas. RAY_ADDRESS in the environment is an --address. The exit status: 2 when they could
    not start (the sentence on stderr), 130 when stopped before they were ready, 1 when the cluster
    started here stopped under them."""
    require_ray()
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is not None:
        log.info("joining the Ray cluster at %s", address)
    stopping, run = threading.Event(), Run(joined=address is not None)
    said, status = None, 0  # said last, after Ray's own lines from the stop: what the user reads first
    try:
        url = start(options, scale, port=port, address=address, run=run)
        sweep_shared()  # once this run's replicas are up: folders left by runs that are over
        for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which sets its own (it aborts the process)
            signal.signal(sig, lambda *_: stopping.set())
        where = f"autoscaled {scale.least}-{scale.most}" if scale.least is not None else str(scale.replicas)
        print(f"Serving {url} with {where} replica(s) on Ray Serve; Ctrl-C stops them.", flush=True)
        for metrics in metrics_urls():
            log.info("Serve's metrics (Prometheus text: ongoing and queued requests, latencies, per replica): %s",
                     metrics)
        while not stopping.wait(WATCH_EVERY_S):
            # A supervisor restarts an app that exits. A signal to the whole process group stops Ray's
            # processes too: that is the stop asked for, not a cluster that died.
            if (down := _cluster_down(run)) is not None and not stopping.is_set():
                said, status = f"error: {_cluster_gone(down, port)}", 1
                break
    except StartError as exc:
        said, status = f"error: {exc}", 2
    except KeyboardInterrupt:
        said, status = "Stopped before the replicas were ready.", 130
    finally:
        try:
            stop(options, run)
        finally:
            if said is not None:
                print(said, file=sys.stderr, flush=True)
    return status


if __name__ == "__main__":  # pragma: no cover - run through python -m app --replicas
    sys.exit("Run python -m app --replicas N.")
