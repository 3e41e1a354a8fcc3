"""What each replica of `python -m app --replicas N` takes (app/replicas.py starts them): the CPUs each
is given, and whether the CPU replicas asked for fit in memory — each loads its own copy of the model,
whose size is counted from its checkpoint's headers without loading it. Checked before a Ray cluster
starts here, warned about on a cluster joined.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from app.backend import BackendOptions
from app.cluster import StartError
from app.replica import Scale

log = logging.getLogger(__name__)


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


def fit_in_memory(backend: BackendOptions, scale: Scale) -> None:
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


def memory_warning(backend: BackendOptions, scale: Scale, cluster_bytes: float) -> None:
    """On a cluster joined: say so when its machines' memory for tasks (Ray's `memory`) cannot hold the
    CPU replicas asked for; more machines may join, so nothing is refused."""
    each = replica_bytes(backend)
    if each is not None and cluster_bytes and scale.at_most * each > cluster_bytes:
        log.warning("The Ray cluster has %s of memory for tasks now and each CPU replica of %s takes about %s: "
                    "%d replicas may run out of memory unless more machines join.", _gb(cluster_bytes),
                    backend.model, _gb(each), scale.at_most)


def cpu_replicas_here(device: str) -> bool:
    """Whether a cluster started here would run the replicas on the CPU (Ray sees the GPUs torch sees)."""
    import torch

    return device == "cpu" or (device == "auto" and not torch.cuda.is_available())
