"""Where the tiles run: an existing Dask cluster, or an embedded LocalCluster on loopback; and
whether its workers' memory and the store's disk can hold the job (checked before anything is
written)."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

import dask.config
import numpy as np
from dask.utils import parse_bytes
from distributed import Client, LocalCluster

from . import config
from .errors import UserError
from .storage import is_local, local_path, solve_block
from .workers import Warmup

__all__ = [
    "WORKER_ENV",
    "check_disk",
    "check_job",
    "check_solve",
    "check_memory",
    "check_workers",
    "kernel_bytes",
    "connect",
    "memory_bytes",
    "scheduler_address",
    "tile_memory",
    "with_client",
    "worker_memory",
]

# Set in the environment of every embedded worker before it starts (glibc reads it at a process's
# first allocation, too early for the worker itself to set it); the deploy images set it too. One
# malloc arena: the threads of a worker (its task thread, zarr's I/O threads) then share one heap,
# whose freed memory stays mapped and is reused, instead of a heap each (of 64 MiB pieces,
# unmapped as soon as they are empty) that faults in the next tile's buffers afresh (the FC kernel
# stage measured both ways: benchmarks/RESULTS.md). (Dask's nanny puts these variables in the
# spawning process's own environment too, as it does its MALLOC_TRIM_THRESHOLD_ and
# OMP_NUM_THREADS.)
WORKER_ENV = {"MALLOC_ARENA_MAX": "1"}


def scheduler_address(scheduler: str | None) -> str | None:
    """The scheduler to use: ``scheduler``, else ``$DASK_SCHEDULER_ADDRESS`` / dask config."""
    return scheduler or dask.config.get("scheduler-address", None) or None


@contextlib.contextmanager
def connect(
    scheduler: str | None = None,
    *,
    workers: int | None = None,
    memory_limit: str | int | None = None,
    timeout: str | float | None = None,
) -> Iterator[Any]:
    """Yield a ``distributed.Client``: to ``scheduler`` if one is given, else to a new cluster.

    The embedded cluster has ``workers`` single-threaded worker processes (default: one per
    core) with ``memory_limit`` each (default: the machine's memory shared evenly), bound to
    127.0.0.1, with its dashboard on a free port. An unreachable scheduler is a
    :class:`UserError` after ``timeout`` (default ``nngp-dist.connect-timeout``).
    """
    address = scheduler_address(scheduler)
    wait = config.value("connect-timeout", timeout)
    if address:
        if workers is not None or memory_limit is not None:
            raise UserError(
                "--workers and --memory-limit configure the embedded cluster; with --scheduler "
                "the cluster's own workers are used (drop one or the other)"
            )
        if dask.config.get("distributed.comm.require-encryption", False) and not (
            address.startswith("tls://")
        ):
            raise UserError(
                f"TLS options (--tls-ca-file, --tls-cert, --tls-key or dask's "
                f"require-encryption) were given, but the scheduler address {address} is not a "
                "TLS one: give it as tls://HOST:PORT (the scheduler must listen with TLS), or "
                "drop the TLS options"
            )
        if address.startswith("tls://") and not dask.config.get("distributed.comm.tls.ca-file"):
            raise UserError(
                f"the scheduler at {address} speaks TLS: give --tls-ca-file, --tls-cert and "
                "--tls-key (or dask's distributed.comm.tls configuration)"
            )
        try:
            client = Client(address, timeout=wait)
        except (OSError, TimeoutError, ValueError, TypeError) as e:
            raise UserError(
                f"cannot reach the Dask scheduler at {address} within {wait:g} s ({e}). Check "
                "the address and that the scheduler runs, or leave out --scheduler (and unset "
                "DASK_SCHEDULER_ADDRESS) for an embedded local cluster."
            ) from None
        with _closing(client, None):
            _warm_workers(client)
            yield client
        return
    if dask.config.get("distributed.comm.require-encryption", False):
        raise UserError(
            "TLS (--tls-ca-file, --tls-cert, --tls-key or dask's require-encryption) is for a "
            "cluster given by --scheduler; the embedded cluster runs on 127.0.0.1 without it"
        )
    n = workers if workers is not None else (os.cpu_count() or 1)
    if n < 1:
        raise UserError(f"--workers must be at least 1, got {n}")
    limit: Any = memory_bytes(memory_limit) or "auto"
    with (
        dask.config.set(
            {f"distributed.nanny.pre-spawn-environ.{k}": v for k, v in WORKER_ENV.items()}
        ),
        _children_ignore_sigint(),
    ):
        cluster = LocalCluster(
            n_workers=n,
            threads_per_worker=1,
            processes=True,
            memory_limit=limit,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
            silence_logs=logging.ERROR,
        )
    with _closing(None, cluster):
        client = Client(cluster)
        with _closing(client, None):
            _warm_workers(client)
            yield client


# Seconds each of the client and the embedded cluster get to close, after which shutdown goes
# on regardless: the job's results are in the store by then (or it was interrupted).
CLOSE_TIMEOUT = 30

# distributed's loggers, and those of the libraries its comms and event loops log through.
_LOGGERS = ("distributed", "tornado", "asyncio")


@contextlib.contextmanager
def _closing(client: Any, cluster: Any) -> Iterator[None]:
    """Close ``client`` or ``cluster`` on the way out, within :data:`CLOSE_TIMEOUT`, with
    distributed's logging quiet meanwhile.

    A client is closed before its cluster (the nesting in :func:`connect`). Comms that close
    as the processes go are logged by distributed as errors (``CommClosedError``, "Cannot
    close a running event loop" from an event loop closed on a timeout): noise after a
    finished job. After a KeyboardInterrupt, or a close that timed out, the loggers stay quiet,
    so that Ctrl-C ends in the CLI's one-line message and not in the tracebacks of every comm
    torn down with the process.
    """
    interrupted = False
    try:
        yield
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        levels = _set_levels(logging.CRITICAL + 1)
        closed = False
        try:
            with contextlib.suppress(OSError, TimeoutError, RuntimeError):
                (client if client is not None else cluster).close(timeout=CLOSE_TIMEOUT)
                closed = True
        finally:
            if closed and not interrupted:  # else what is left is torn down at exit: quietly
                _set_levels(levels)


def _set_levels(level: int | dict) -> dict:
    """Set the level of each of :data:`_LOGGERS` (one level, or a dict by name, as returned);
    return the levels they had."""
    old = {}
    for name in _LOGGERS:
        logger = logging.getLogger(name)
        old[name] = logger.level
        logger.setLevel(level[name] if isinstance(level, dict) else level)
    return old


@contextlib.contextmanager
def _children_ignore_sigint() -> Iterator[None]:
    """Processes started in here (the embedded workers) inherit SIGINT ignored: a disposition
    survives ``exec``, and Python installs its KeyboardInterrupt handler only over the default
    one. Ctrl-C at a terminal signals the whole foreground process group; the workers would
    each die printing a KeyboardInterrupt traceback, whereas the client alone should handle it
    and close the cluster, which stops them. (Only the main thread may set a handler; elsewhere
    this does nothing.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def _warm_workers(client: Any) -> None:
    client.register_plugin(Warmup())


def with_client(
    fn: Callable[[Any], Any],
    client: Any = None,
    scheduler: str | None = None,
    workers: int | None = None,
    memory_limit: str | int | None = None,
    *,
    allow_synchronous: bool = False,
) -> Any:
    """``fn(client)`` with ``client`` if given, else with one from :func:`connect`.

    ``scheduler="synchronous"`` runs ``fn(None)`` in this process where ``allow_synchronous``
    (the kernel stage can); elsewhere it means an embedded cluster (the solvers need a graph).
    """
    if client is not None:
        return fn(client)
    if scheduler == "synchronous":
        if allow_synchronous:
            return fn(None)
        scheduler = None
    with connect(scheduler, workers=workers, memory_limit=memory_limit) as c:
        return fn(c)


def worker_memory(client: Any) -> tuple[int, int]:
    """(number of workers, smallest memory limit in bytes; 0 when unlimited)."""
    info = client.scheduler_info()["workers"].values()
    limits = [int(w.get("memory_limit") or 0) for w in info]
    return len(limits), min(limits, default=0)


def memory_bytes(memory_limit: str | int | None) -> int | None:
    """``--memory-limit`` in bytes (None when not given), or :class:`UserError`."""
    if memory_limit is None:
        return None
    try:
        limit = parse_bytes(memory_limit) if isinstance(memory_limit, str) else int(memory_limit)
    except (ValueError, TypeError):
        raise UserError(
            f"--memory-limit {memory_limit!r} is not a size like 2GB or 512MiB"
        ) from None
    if limit <= 0:
        raise UserError("--memory-limit must be positive")
    return int(limit)


# What a worker process takes before its first tile: Python, NumPy, zarr, distributed and the
# compiled kernel loop (the README: 200-300 MB).
WORKER_BASE_BYTES = 200 * 2**20


def tile_memory(tile_size: int, features: int) -> int:
    """Estimated peak bytes of a worker computing a kernel tile of ``tile_size`` rows of
    ``features`` inputs: the process itself, about six T x T float64 buffers (the tile, the
    recursion's temporaries, the storage copy) and two blocks of input rows."""
    return WORKER_BASE_BYTES + 6 * 8 * tile_size**2 + 2 * 8 * tile_size * features


def _mb(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def check_memory(memory_limit: str | int | None, need: int, tile_size: int) -> None:
    """Refuse an embedded cluster's ``--memory-limit`` below ``need`` bytes (a worker would
    pause at the limit and the job would hang without a word)."""
    limit = memory_bytes(memory_limit)
    if limit is not None and limit < need:
        raise UserError(
            f"--memory-limit {memory_limit} ({_mb(limit)}) is too small for a worker computing "
            f"tiles of {tile_size}: it needs about {_mb(need)} (the worker process itself and a "
            f"few {tile_size} x {tile_size} float64 buffers). Give at least {_mb(need)}, or a "
            "smaller --tile-size"
        )


def check_workers(client: Any, tile_size: int, features: int) -> None:
    """Refuse a cluster whose smallest worker memory limit is too small for a tile (see
    :func:`tile_memory`; checked after connecting, before the first tile)."""
    need = tile_memory(tile_size, features)
    n, smallest = worker_memory(client)
    if n and smallest and smallest < need:
        raise UserError(
            f"the cluster's smallest worker memory limit is {_mb(smallest)}, too small for tiles "
            f"of {tile_size}: a worker needs about {_mb(need)} (the process itself and a few "
            f"{tile_size} x {tile_size} float64 buffers). Give the workers more memory, or use "
            "a smaller --tile-size. Nothing was written"
        )


def check_disk(url: str, need: int, what: str, *, force: bool = False) -> None:
    """Refuse to write about ``need`` bytes (``what``) to a local store at ``url`` whose file
    system has less free space, unless ``force`` (the estimate is on the high side)."""
    if force or not is_local(url):
        return
    path = local_path(url)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        free = shutil.disk_usage(path).free
    except OSError:
        return  # not knowable here: let the write itself report
    if free < need:
        raise UserError(
            f"{what} would take about {_mb(need)} in {url}, but only {_mb(free)} are free "
            "there. Free some space or choose another --store; the estimate is on the high "
            "side, so --force (force=True) goes on anyway"
        )


def kernel_bytes(action: str, n_train: int, n_test: int, features: int, dtype: str) -> int:
    """Estimated bytes a kernel run with ``action`` (see ``KernelStore.check``) adds to the
    store: the kernel arrays, N (N + M) entries of ``dtype`` compressed by about 1.3, and the
    inputs; nothing for a resumed store (its arrays exist)."""
    size = np.dtype(dtype).itemsize
    if action == "create":
        return int(n_train * (n_train + n_test) * size / 1.3 + (n_train + n_test) * features * 8)
    if action == "replace-test":
        return int(n_test * (n_train + 1) * size / 1.3 + n_test * features * 8)
    return 0


def check_job(
    url: str,
    action: str,
    plan: Any,
    features: int,
    dtype: str,
    memory_limit: str | int | None,
    *,
    force: bool = False,
) -> None:
    """A kernel job's resources, before anything is written: the embedded workers'
    ``memory_limit`` against a tile of ``plan`` (:func:`check_memory`) and the local store's
    free disk against the kernel's size (:func:`check_disk`, skipped with ``force``)."""
    check_memory(memory_limit, tile_memory(plan.tile_size, features), plan.tile_size)
    need = kernel_bytes(action, plan.n_train, plan.n_test, features, dtype)
    what = f"the kernel ({plan.n_train} x {plan.n_train + plan.n_test}, {dtype})"
    check_disk(url, need, what, force=force)


def check_solve(store: Any, method: str, memory_limit: str | int | None) -> None:
    """A solve's resources, before anything is written: the embedded workers' ``memory_limit``
    against a block of the factorisation, and for a first Cholesky factor of the
    :class:`~nngp_dist.storage.KernelStore` ``store`` the local disk against its size (the
    factor and its work arrays, uncompressed: about N^2 float64 values)."""
    meta = store.meta
    block, n = solve_block(meta), meta["n_train"]
    check_memory(memory_limit, tile_memory(block, 0), block)
    if method == "cholesky" and not meta.get("factor"):
        check_disk(store.url, 8 * n * n, f"the Cholesky factor of the {n} x {n} kernel")
