"""Where the tiles run: an existing Dask cluster, or an embedded LocalCluster on loopback."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import dask.config
from dask.utils import parse_bytes, parse_timedelta
from distributed import Client, LocalCluster

from . import config
from .errors import UserError
from .workers import Warmup

__all__ = ["WORKER_ENV", "connect", "scheduler_address", "with_client", "worker_memory"]

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
    wait = parse_timedelta(config.get("connect-timeout", timeout))
    if address:
        if workers is not None or memory_limit is not None:
            raise UserError(
                "--workers and --memory-limit configure the embedded cluster; with --scheduler "
                "the cluster's own workers are used (drop one or the other)"
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
        with client:
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
    limit: Any = "auto"
    if memory_limit is not None:
        try:
            limit = (
                parse_bytes(memory_limit) if isinstance(memory_limit, str) else int(memory_limit)
            )
        except (ValueError, TypeError):
            raise UserError(
                f"--memory-limit {memory_limit!r} is not a size like 2GB or 512MiB"
            ) from None
        if limit <= 0:
            raise UserError("--memory-limit must be positive")
    with (
        dask.config.set(
            {f"distributed.nanny.pre-spawn-environ.{k}": v for k, v in WORKER_ENV.items()}
        ),
        LocalCluster(
            n_workers=n,
            threads_per_worker=1,
            processes=True,
            memory_limit=limit,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
            silence_logs=logging.ERROR,
        ) as cluster,
        Client(cluster) as client,
    ):
        _warm_workers(client)
        yield client


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
