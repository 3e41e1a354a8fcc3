"""`python -m app --replicas N`: the app as N Ray Serve replicas behind one port.

Here: start them (join or start a Ray cluster, deploy the app, wait until every replica runs), serve
until Ctrl-C or SIGTERM while watching a cluster started here, and stop them. Stopping the whole app
(Ctrl-C, SIGTERM) drains nothing: a cluster started here is stopped at once.

The rest, in the order a start goes through it: app/cluster.py, what this process asks of and checks
about the Ray cluster; app/sizing.py, what each replica takes (CPUs, memory); app/replica.py, the
replica as Serve runs it — the whole app of one process with its own engine, how requests reach it,
how it drains when Serve removes it.

Ray is an optional extra (requirements-serve.txt): nothing here imports it until `serve_replicas` runs.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from app.cluster import (APP_NAME, StartError, await_ready, check_reachable, dashboard_wanted, first_line,
                         forwarded_env, metrics_urls, no_auto_connect, port_free, serve_application, serve_port,
                         sweep_shared, token_mode_if_token)
from app.replica import DRAIN_S, READY_TIMEOUT_S, ReplicaOptions, Scale, deployment
from app.sizing import cpu_replicas_here, cpus_each, fit_in_memory, memory_warning

log = logging.getLogger(__name__)

RAY_VERSION = "2.60.0"  # ConsistentHashRouter is in Serve since 2.56; requirements-serve.txt pins this one
INSTALL = ("--replicas runs the app on Ray Serve, which is not installed; install it with "
           "`bash scripts/setup.sh requirements-serve.txt` (or `pip install -r requirements-serve.txt`).")


def require_ray() -> None:
    """Exit with status 2, as every other start error does, and the one sentence saying how to install
    Ray Serve, if it is not installed."""
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError:
        print(f"error: {INSTALL}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


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

    from app.web import trust_proxies

    run = run or Run(joined=address is not None)

    device = options.backend.device
    if device.startswith("cuda:"):
        raise StartError(f"--device {device} names one GPU; with --replicas each replica has its own GPU, which Ray "
                         "picks: use --device cuda (or leave out --device).")
    if address is None:
        port_free(options.host, port)
        if cpu_replicas_here(device):
            fit_in_memory(options.backend, scale)
    elif address != "auto" and "://" not in address:
        check_reachable(address)
    if address is not None:
        token_mode_if_token()
    # Serve's proxy is the HTTP server here, and uvicorn's default believes an X-Forwarded-For from any
    # peer on 127.0.0.1: a client through a loopback hop could name a fresh address for every per-address
    # limit. As with one process (app/web.py `trust_proxies`), only the proxies named are believed.
    trust_proxies(share=False)
    env = {**forwarded_env(), "FORWARDED_ALLOW_IPS": os.environ["FORWARDED_ALLOW_IPS"]}
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
                                                  "include_dashboard": dashboard_wanted()}
    try:
        context = ray.init(**init, runtime_env={"env_vars": env}, logging_level=logging.WARNING, log_to_driver=True)
        log.info("the Ray cluster is at %s", context.address_info.get("gcs_address") or address)
    except ConnectionError as exc:
        raise StartError(f"No Ray cluster answers at --address {address} ({first_line(exc)}); start one with "
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
            memory_warning(options.backend, scale,
                            sum(n["Resources"].get("memory", 0.0) for n in ray.nodes() if n.get("Alive")))
    cpus = cpus_each(nodes, scale.at_most, gpus)
    serving = serve_port() is not None  # Serve already runs on a cluster joined (else this run starts it)
    try:
        serve.start(http_options={"host": options.host, "port": port})
    except Exception as exc:  # the proxy could not take the port (another program's, on a machine of the cluster)
        if not any(words in str(exc).lower() for words in PORT_TAKEN):
            raise
        from app.web import port_busy

        if not serving:  # Serve would stay, its proxy retrying that port, and refuse every later start on another
            serve.shutdown()
        raise StartError(port_busy(options.host, port)) from None
    taken = serve_port()
    if taken is not None and taken != port:
        raise StartError(f"Ray Serve already runs on this cluster on port {taken}: start with --port {taken}, or stop "
                         "it first (`serve shutdown`).")
    if (there := serve_application()) is not None and str(there.status).endswith("DELETING"):
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
    await_ready(url, READY_TIMEOUT_S, failure)
    return url


# What Serve's proxy says when its port is taken (Ray 2.60: "Failed to bind to address 'HOST:PORT'.").
PORT_TAKEN = ("address already in use", "errno 98", "failed to bind to address")


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
            while run.deploying.is_alive() and serve_application() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            serve.delete(APP_NAME, _blocking=False)
    finally:
        if run.deployed:  # Serve takes the app in about a second
            run.deploying.join(5.0)
        no_auto_connect()  # a Ray call still running in a thread now fails, instead of joining a cluster again
        ray.shutdown()  # a cluster started here: its processes, the replicas' and Serve's among them
        # The replicas' own folders are in it, on this machine: a replica killed leaves its own there.
        shutil.rmtree(Path(tempfile.gettempdir()) / options.shared, ignore_errors=True)


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
