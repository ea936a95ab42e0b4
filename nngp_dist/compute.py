"""Tile tasks on workers, submitted in a bounded sliding window, with progress.

Each task reads its input rows from the store, evaluates its tile (on the worker's GPU with CuPy
when it has one, else with NumPy), writes the tile and then its completion record to the store,
and returns only the seconds it took: tiles never travel through the client.
"""

from __future__ import annotations

import functools
import itertools
import sys
import threading
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
import zarr

from . import backend, workers
from .kernels import Spec
from .storage import KERNEL_ARRAYS, KernelStore, _utcnow
from .tiling import Tile, TilePlan

__all__ = ["JobError", "compute_kernel", "run_tile"]


class JobError(RuntimeError):
    """A task failed; what was written before it stays in the store and a re-run resumes."""


# --- worker side ------------------------------------------------------------------------------


@functools.lru_cache(maxsize=6)
def _rows(url: str, token: str, part: str, sel: tuple[int, int]) -> np.ndarray:
    x = workers.open_group(url, token, flush=True)[f"x_{part}"][sel[0] : sel[1]]  # run_tile's
    return np.ascontiguousarray(x.reshape(len(x), -1), dtype=np.float64)


_CONFIG_LOCK = threading.Lock()


def _whole_tiles(group: zarr.Group, name: str) -> zarr.Array:
    """``group[name]`` for writing whole tiles: without zarr's pass over each chunk looking for
    an all-fill (NaN) one, which a tile just found finite is not (8 ms of a 2000 x 2000 tile's
    45 ms write). An array's config is read from zarr's global one when it is opened
    (``Array.with_config`` is in zarr 3.1.6 only); the lock keeps a worker's threads from
    restoring each other's setting. An array another thread opens meanwhile may write an
    all-fill chunk it would have skipped, which costs only disk."""
    with _CONFIG_LOCK, zarr.config.set({"array.write_empty_chunks": True}):
        return group[name]


def _on_device(x: np.ndarray, use_gpu: bool) -> Any:
    if use_gpu:
        import cupy  # noqa: PLC0415

        return cupy.asarray(x)
    return x


def run_tile(
    url: str, token: str, spec: Spec, plan: TilePlan, tile: Tile, dtype: str, device: str
) -> float:
    """Compute one tile and write it, then its completion record. Returns seconds taken."""
    start = time.perf_counter()
    workers.tune_allocator()
    use_gpu = device == "gpu" or (device == "auto" and backend.cupy_available())
    group = workers.open_group(url, token, flush=True)
    row_part = "train" if tile.array in ("k_train_train", "k_train_diag") else "test"
    rows = plan.rows(row_part, tile.i)
    x1 = _on_device(_rows(url, token, row_part, (rows.start, rows.stop)), use_gpu)
    if tile.j is None:
        values = spec.diag(x1)
        target: tuple[slice, ...] = (rows,)
    else:
        cols = plan.rows("train", tile.j)
        on_diagonal = tile.array == "k_train_train" and tile.i == tile.j
        if on_diagonal:  # the same array twice: the kernel evaluates half and mirrors it
            x2 = x1
        else:
            x2 = _on_device(_rows(url, token, "train", (cols.start, cols.stop)), use_gpu)
        values = spec.cross(x1, x2)
        if on_diagonal:
            # The diagonal from the diagonal recursion, so it equals k_train_diag exactly.
            xp = backend.namespace(values)
            xp.fill_diagonal(values, spec.diag(x1))
        target = (rows, cols)
    with np.errstate(over="ignore"):  # overflow to inf in float32 is caught just below
        values = backend.to_host(values).astype(dtype, copy=False)
    if not np.isfinite(values).all():  # checked in the storage dtype: float32 can overflow
        raise FloatingPointError(
            f"{tile}: the kernel has {int((~np.isfinite(values)).sum())} non-finite entries in "
            f"{dtype} (spec {spec.to_json()}); nothing was recorded for this tile"
        )
    _whole_tiles(group, tile.array)[target] = values
    seconds = time.perf_counter() - start
    group[f"tiles/{tile.array}"][tile.index] = max(seconds, 1e-9)
    return seconds


# --- client side ------------------------------------------------------------------------------


def _progress(total: int, initial: int, enabled: bool, desc: str = "kernel") -> Any:
    # tqdm.auto picks a notebook widget in Jupyter (and warns there when ipywidgets is
    # missing, even for a disabled bar): only import it when a bar is wanted.
    if enabled:
        from tqdm.auto import tqdm  # noqa: PLC0415
    else:
        from tqdm import tqdm  # noqa: PLC0415

    return tqdm(
        total=total,
        initial=initial,
        unit="tile",
        desc=desc,
        disable=not enabled,
        file=sys.stderr,
        dynamic_ncols=True,
    )


def compute_kernel(
    store: KernelStore,
    *,
    client: Any = None,
    max_in_flight: int | None = None,
    device: str = "auto",
    progress: bool = True,
    spec: Spec | None = None,
) -> dict:
    """Compute every missing tile of ``store``; return a summary of this run.

    With a ``distributed.Client`` the tiles run on its workers, at most ``max_in_flight`` at a
    time (default: ``nngp-dist.tasks-per-thread`` per worker thread); with ``client=None``
    they run one by one in this process (for tests and debugging). Tiles already recorded as
    done are skipped, so a killed run resumes where it stopped.
    """
    if device not in ("auto", "cpu", "gpu"):
        raise ValueError(f"device must be auto, cpu or gpu, got {device!r}")
    meta = store.meta
    plan = store.plan
    if spec is None or spec.hash != meta["spec_hash"]:
        spec = store.spec  # as recorded; a given spec is used only when it is the same one
    token = workers.store_token(meta)
    todo = plan.missing({a: store.done(a) for a in KERNEL_ARRAYS})
    total = plan.total()
    summary = {"tiles_total": total, "tiles_computed": 0, "tiles_skipped": total - len(todo)}
    if not todo:
        return {**summary, "seconds": 0.0}
    start = time.perf_counter()
    store.record_stage("kernel", started=_utcnow(), finished=None)
    args = (store.url, token, spec, plan)
    bar = _progress(total, total - len(todo), progress)
    try:
        if client is None:
            for tile in todo:
                try:
                    run_tile(*args, tile, meta["dtype"], device)
                except Exception as e:
                    raise JobError(
                        f"{tile} failed: {type(e).__name__}: {e}\nTiles finished before it are "
                        "kept; re-run the same command to resume."
                    ) from e
                bar.update()
        else:
            _run_distributed(client, args, todo, meta["dtype"], device, max_in_flight, bar)
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    summary.update(tiles_computed=len(todo), seconds=round(seconds, 3))
    store.record_stage("kernel", finished=_utcnow(), seconds=summary["seconds"], tiles=len(todo))
    return summary


def _run_distributed(
    client: Any,
    args: tuple,
    todo: Iterable[Tile],
    dtype: str,
    device: str,
    max_in_flight: int | None,
    bar: Any,
) -> None:
    from distributed import as_completed  # noqa: PLC0415

    from . import config  # noqa: PLC0415

    if max_in_flight is None:
        threads = sum(client.nthreads().values()) or 1
        max_in_flight = int(config.get("tasks-per-thread")) * threads
    pending = iter(todo)

    def submit(tile: Tile) -> Any:
        key = workers.task_key(args[0], args[1], "tile", tile.array, *tile.index)
        return client.submit(run_tile, *args, tile, dtype, device, key=key, pure=False)

    futures = as_completed([submit(t) for t in itertools.islice(pending, max(1, max_in_flight))])
    try:
        for fut in futures:
            try:
                fut.result()
            except Exception as e:
                raise JobError(
                    f"{fut.key} failed: {type(e).__name__}: {e}\nTiles finished before it are "
                    "kept; re-run the same command to resume."
                ) from e
            bar.update()
            nxt = next(pending, None)
            if nxt is not None:
                futures.add(submit(nxt))
    except BaseException:
        client.cancel(list(futures.futures))
        raise
