"""What the process of `python -m app --replicas N` (app/replicas.py) asks of and checks about the Ray
cluster it starts or joins: `StartError` for what keeps the replicas from starting; the environment
the replicas take from it; the port and the cluster's address, checked before Ray would fail slowly;
Serve's state there and the wait for every replica to run; where the metrics are; and the sweep of the
shared folders left on this machine by runs that are over. Ray is imported inside the functions only.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from app.replica import SHARED_PREFIX

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
APP_NAME = "afnext"


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


def port_free(host: str, port: int) -> None:
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


def token_mode_if_token() -> None:
    """Send Ray's authentication token when joining a cluster, if one is at hand (~/.ray/auth_token,
    RAY_AUTH_TOKEN) and RAY_AUTH_MODE does not say otherwise — as `ray start` does: a cluster started
    where a token is kept asks for it, and Ray's driver sends it only in token mode."""
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available)
    except ImportError:  # another Ray: its own defaults
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def check_reachable(address: str) -> None:
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


def serve_port() -> int | None:
    """The port Serve's proxies take on this cluster (Serve keeps the first start's, ignoring others)."""
    try:
        from ray.serve.context import _get_global_client

        return int(_get_global_client().http_config.port)
    except Exception:  # Serve's internals: without them the health wait below says what is wrong
        return None


def first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def _failed(app) -> str | None:
    """Why the deployment `app` (Serve's status of it) failed — Serve gave up starting its replicas —
    or None while it has not."""
    if app is not None and str(app.status).endswith("DEPLOY_FAILED"):
        return (app.message or "its replicas could not start").strip().splitlines()[-1][:300]
    return None


def serve_application():
    from ray import serve

    return serve.status().applications.get(APP_NAME)


def dashboard_wanted() -> bool:
    """Ray's dashboard (replicas, queues, latencies) on :8265 where its packages are installed."""
    try:
        import aiohttp  # noqa: F401
        import ray.dashboard  # noqa: F401
    except ImportError:
        return False
    return os.environ.get("AFNEXT_RAY_DASHBOARD", "1") != "0"


WAITING_SAID_AFTER_S = 60.0  # replicas still not placed by then: Serve's reason goes to the log, once


def await_ready(url: str, timeout_s: float, failure: list[BaseException]) -> None:
    """Until every replica runs (Serve's application RUNNING) and /health answers 200 through the proxy;
    StartError once Serve gives up, or `failure` (the deploying thread's) holds why it could not deploy."""
    started = time.monotonic()
    said = False
    while True:
        app = serve_application()
        if app is not None and str(app.status).endswith("RUNNING") and _healthy(url):
            return
        if (why := _failed(app)) is not None:
            raise StartError(f"The replicas could not start: {why}")
        if failure:
            raise StartError(f"The replicas could not start: {first_line(failure[0])}")
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


def no_auto_connect() -> None:
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
