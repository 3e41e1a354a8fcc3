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

import errno
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
        health_check_period_s=5, health_check_timeout_s=30, graceful_shutdown_timeout_s=10,
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


@dataclass
class Run:
    """One `serve_replicas`: whether it joined a cluster (else started one here) and has deployed the app
    there (what `stop` may remove: never another run's app of the same name)."""

    joined: bool
    deploying: threading.Thread | None = None  # serve.run's, from when this run deployed the app

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
    elif address != "auto" and "://" not in address:
        _reachable(address)
    if address is not None:
        _token_mode_if_token()
    env = forwarded_env()
    os.environ["PYTHONPATH"] = env["PYTHONPATH"]  # Serve's proxy and controller import the router from there
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # Ray reports usage to its makers only if asked to
    here = os.cpu_count() or 1
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
    if _application() is not None:
        raise StartError(f"The app already runs on this Ray cluster (Serve application {APP_NAME!r}, port {port}); "
                         f"use it, or stop it first (Ctrl-C where it was started, or `serve delete {APP_NAME}`).")
    failure: list[BaseException] = []

    def deploy() -> None:  # serve.run returns once every replica runs: meanwhile the wait below says why not
        try:
            serve.run(deployment(options, scale, gpus, cpus, env), name=APP_NAME, route_prefix="/", blocking=False)
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
    """Stop the replicas (each removes its own folders) and leave the cluster: a cluster started here
    stops with its Serve; on a cluster joined, only this run's app goes, Serve and others stay."""
    import ray
    from ray import serve

    try:
        if ray.is_initialized() and not run.joined:
            if _cluster_down(run) is None:  # else Serve's controller is gone: its shutdown would wait 30 s
                serve.shutdown()
        elif ray.is_initialized() and run.deployed:
            # Stopped while deploying: the app may not be submitted yet, and would land after a delete.
            deadline = time.monotonic() + 30
            while run.deploying.is_alive() and _application() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            serve.delete(APP_NAME)
    finally:
        ray.shutdown()
        shutil.rmtree(Path(tempfile.gettempdir()) / options.shared, ignore_errors=True)


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
            if (down := _cluster_down(run)) is not None:  # a supervisor restarts an app that exits
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
