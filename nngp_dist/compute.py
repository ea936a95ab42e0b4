"""Tile tasks on workers, submitted in a bounded sliding window, with progress.

Each task reads its input rows from the store, evaluates its tile (on the worker's GPU with CuPy
when it has one, else with NumPy), writes the tile and then its completion record to the store,
and returns only the seconds it took: tiles never travel through the client.
"""

from __future__ import annotations

import functools
import itertools
import threading
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
import zarr
from distributed import as_completed

from . import backend, config, workers
from .errors import CorruptStore, UserError
from .kernels import Spec, trained
from .layout import K_TRAIN_TRAIN, KERNEL_ARRAYS, X_TEST, X_TRAIN, record
from .progress import progress_bar
from .storage import KernelStore, read_checked, utcnow
from .tiling import Tile, TilePlan
from .workers import TaskContext

INPUTS = {"train": X_TRAIN, "test": X_TEST}

__all__ = [
    "JobError",
    "compute_kernel",
    "compute_outputs",
    "evaluate_tile",
    "probe",
    "run_output_tile",
    "run_tile",
]


class JobError(RuntimeError):
    """A task failed; what was written before it stays in the store and a re-run resumes."""


# --- worker side ------------------------------------------------------------------------------


@functools.lru_cache(maxsize=6)
def _rows(ctx: TaskContext, part: str, sel: tuple[int, int]) -> np.ndarray:
    """Input rows ``sel`` of ``part`` as float64 (cached: a worker's next tile often shares
    its row or column block with the last)."""
    group = workers.open_group(ctx.url, ctx.token, flush=True)
    x = read_checked(group[INPUTS[part]], slice(sel[0], sel[1]), url=ctx.url)
    return np.ascontiguousarray(x.reshape(len(x), -1), dtype=np.float64)


_CONFIG_LOCK = threading.Lock()


def _whole_tiles(group: zarr.Group, name: str) -> zarr.Array:
    """``group[name]`` for writing whole tiles: without zarr's pass over each chunk looking for
    an all-fill (NaN) one, which a tile just found finite is not (about a fifth of a tile's
    write). An array's config is read from zarr's global one when it is opened
    (``Array.with_config`` is in zarr 3.1.6 only); the lock keeps a worker's threads from
    restoring each other's setting. An array another thread opens meanwhile may write an
    all-fill chunk it would have skipped, which costs only disk."""
    with _CONFIG_LOCK, zarr.config.set({"array.write_empty_chunks": True}):
        return group[name]


def _on_device(x: np.ndarray, use_gpu: bool) -> Any:
    if use_gpu:
        import cupy

        return cupy.asarray(x)
    return x


def evaluate_tile(spec: Spec, x1: Any, x2: Any | None, dtype: str, *, same: bool = False) -> Any:
    """One tile's values in ``dtype`` on the host: ``k(x1, x2)``, or the diagonal ``k(x, x)``
    of ``x1`` when ``x2`` is None. ``same``: ``x2`` is ``x1`` (a diagonal tile of the train
    kernel), whose diagonal is then the diagonal recursion's, so it equals ``k_train_diag``
    exactly. Raises FloatingPointError when a value is not finite in ``dtype``."""
    if x2 is None:
        values = spec.diag(x1)
    else:
        values = spec.cross(x1, x2)
        if same:
            backend.namespace(values).fill_diagonal(values, spec.diag(x1))
    with np.errstate(over="ignore"):  # overflow to inf in float32 is caught just below
        values = backend.to_host(values).astype(dtype, copy=False)
    if not np.isfinite(values).all():  # checked in the storage dtype: float32 can overflow
        raise FloatingPointError(
            f"the kernel has {int((~np.isfinite(values)).sum())} non-finite entries in "
            f"{dtype} (spec {spec.to_json()})"
        )
    return values


@workers.store_task(flush=True)
def run_tile(
    ctx: TaskContext,
    group: zarr.Group,
    spec: Spec,
    plan: TilePlan,
    tile: Tile,
    dtype: str,
    device: str,
) -> workers.Recorded:
    """Compute one tile and write it; the wrapper then writes its completion record."""
    use_gpu = device == "gpu" or (device == "auto" and backend.cupy_available())
    part = plan.row_part(tile.array)
    rows = plan.rows(part, tile.i)
    x1 = _on_device(_rows(ctx, part, (rows.start, rows.stop)), use_gpu)
    target: tuple[slice, ...] = (rows,)
    x2 = None
    same = tile.array == K_TRAIN_TRAIN and tile.i == tile.j
    if tile.j is not None:
        cols = plan.rows("train", tile.j)
        target = (rows, cols)
        # The same array twice on the diagonal: the kernel evaluates half and mirrors it.
        x2 = x1 if same else _on_device(_rows(ctx, "train", (cols.start, cols.stop)), use_gpu)
    try:
        values = evaluate_tile(spec, x1, x2, dtype, same=same)
    except FloatingPointError as e:
        raise FloatingPointError(f"{tile}: {e}; nothing was recorded for this tile") from None
    _whole_tiles(group, tile.array)[target] = values
    return workers.Recorded(tile.array, tile.index)


def _finite(values: np.ndarray, dtype: str, what: str) -> np.ndarray:
    with np.errstate(over="ignore"):  # overflow to inf in float32 is caught just below
        values = values.astype(dtype, copy=False)
    if not np.isfinite(values).all():
        raise FloatingPointError(
            f"{what}: the kernel has {int((~np.isfinite(values)).sum())} non-finite entries in "
            f"{dtype}; nothing was recorded for this tile"
        )
    return values


def run_output_tile(
    ctx: TaskContext,
    spec: Spec,
    plan: TilePlan,
    tile: Tile,
    dtype: str,
    targets: tuple[tuple[TaskContext, Any], ...],
) -> float:
    """One tile of a trained network's per-output kernels, written to several stores at once.

    ``ctx`` is the store whose inputs the tile reads (every target holds the same inputs);
    ``targets`` are (store, what) pairs, ``what`` an output index ``c`` (that store gets
    ``kappa_c``) or ``"trace"`` (``sum_c kappa_c``). The network's features are computed
    once for all outputs (:func:`nngp_dist.kernels.trained.per_output_cross`), where one store
    per output would compute them once per output. Every target's data is written before any
    of their completion records, so a killed task leaves each target resumable."""
    start = time.perf_counter()
    workers.tune_allocator()
    part = plan.row_part(tile.array)
    rows = plan.rows(part, tile.i)
    x1 = _rows(ctx, part, (rows.start, rows.stop))
    target: tuple[slice, ...] = (rows,)
    if tile.j is None:
        values = trained.per_output_diag(spec, x1)
    else:
        cols = plan.rows("train", tile.j)
        target = (rows, cols)
        same = tile.array == K_TRAIN_TRAIN and tile.i == tile.j
        x2 = x1 if same else _rows(ctx, "train", (cols.start, cols.stop))
        values = trained.per_output_cross(spec, x1, x2)
        if same:  # each diagonal exactly the diagonal tiles' (k_train_diag)
            for k, d in zip(values, trained.per_output_diag(spec, x1), strict=True):
                np.fill_diagonal(k, d)
    written = []
    for sub, what in targets:
        v = values.sum(axis=0) if what == "trace" else values[what]
        v = _finite(v, dtype, f"{tile} of output {what}")
        group = workers.open_group(sub.url, sub.token, flush=True)
        _whole_tiles(group, tile.array)[target] = v
        written.append(group)
    del values
    seconds = max(time.perf_counter() - start, 1e-9)
    for group in written:
        group[record(tile.array)][tile.index] = seconds
    workers.release_memory()
    return seconds


# --- client side ------------------------------------------------------------------------------


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
    done are skipped, so a killed run resumes where it stopped. Without ``spec`` (the caller's
    own, used when it is the store's), the store's recorded spec is used: one naming Python code
    as its activation only from a store opened with ``trust_code=True``
    (:meth:`KernelStore.open`), else a :class:`~nngp_dist.errors.UserError` says so.
    """
    if device not in ("auto", "cpu", "gpu"):
        raise ValueError(f"device must be auto, cpu or gpu, got {device!r}")
    meta = store.meta
    plan = store.plan
    if spec is None or spec.hash != meta["spec_hash"]:
        spec = store.spec  # as recorded; a given spec is used only when it is the same one
    todo = plan.missing({a: store.done(a) for a in KERNEL_ARRAYS})
    total = plan.total()
    summary = {"tiles_total": total, "tiles_computed": 0, "tiles_skipped": total - len(todo)}
    if not todo:
        return {**summary, "seconds": 0.0}
    start = time.perf_counter()
    store.record_stage("kernel", started=utcnow(), finished=None)
    args = (TaskContext.of(store, meta["tile_size"]), spec, plan)
    bar = progress_bar(total, total - len(todo), progress)
    try:
        if client is None:
            for tile in todo:
                _local(run_tile, tile, *args, tile, meta["dtype"], device)
                bar.update()
        else:
            _run_distributed(client, args, todo, meta["dtype"], device, max_in_flight, bar)
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    summary.update(tiles_computed=len(todo), seconds=round(seconds, 3))
    store.record_stage("kernel", finished=utcnow(), seconds=summary["seconds"], tiles=len(todo))
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
    def submit(tile: Tile) -> Any:
        key = args[0].key("tile", tile.array, *tile.index)
        return client.submit(run_tile, *args, tile, dtype, device, key=key, pure=False)

    _windowed(client, submit, todo, max_in_flight, bar)


def _windowed(
    client: Any, submit: Any, todo: Iterable[Any], max_in_flight: int | None, bar: Any
) -> None:
    """Run ``submit(item)`` for every item of ``todo``, at most ``max_in_flight`` at a time
    (default: ``nngp-dist.tasks-per-thread`` per worker thread); a failure is a JobError."""
    if max_in_flight is None:
        threads = sum(client.nthreads().values()) or 1
        max_in_flight = config.value("tasks-per-thread") * threads
    pending = iter(todo)
    futures = as_completed([submit(t) for t in itertools.islice(pending, max(1, max_in_flight))])
    try:
        for fut in futures:
            try:
                fut.result()
            except CorruptStore:
                raise  # its own remedy, not a re-run
            except Exception as e:
                raise _failed(fut.key, e) from e
            bar.update()
            nxt = next(pending, None)
            if nxt is not None:
                futures.add(submit(nxt))
    except BaseException:
        client.cancel(list(futures.futures))
        raise


def compute_outputs(
    store: KernelStore,
    outputs: list[KernelStore],
    spec: Spec,
    *,
    client: Any = None,
    progress: bool = True,
) -> dict:
    """Every missing tile of a trained network's store (its own kernel: the trace or the output
    its spec names) and of its per-output
    stores ``outputs`` (``outputs[c]`` holds ``kappa_c``), in one pass over the tiles: a tile
    missing anywhere is computed once for all outputs and written where it is missing
    (:func:`run_output_tile`). ``spec`` is the store's own (trusted) spec. Returns tiles
    computed and skipped, seconds."""
    plan = store.plan
    stores = [(store, spec.output), *((sub, c) for c, sub in enumerate(outputs))]
    done = [({a: ks.done(a) for a in KERNEL_ARRAYS}, ks, what) for ks, what in stores]
    ctxs = {id(ks): TaskContext.of(ks, ks.meta["tile_size"]) for ks, _ in stores}
    todo = []
    for tile in plan.missing(
        {a: np.logical_and.reduce([d[a] for d, _, _ in done]) for a in KERNEL_ARRAYS}
    ):
        todo.append(
            (tile, tuple((ctxs[id(ks)], w) for d, ks, w in done if not d[tile.array][tile.index]))
        )
    total = plan.total()
    summary = {"tiles_total": total, "tiles_computed": 0, "tiles_skipped": total - len(todo)}
    if not todo:
        return {**summary, "seconds": 0.0}
    start = time.perf_counter()
    for ks, _ in stores:
        ks.record_stage("kernel", started=utcnow(), finished=None)
    ctx, dtype = ctxs[id(store)], store.meta["dtype"]
    bar = progress_bar(total, total - len(todo), progress)
    try:
        if client is None:
            for tile, targets in todo:
                _local(run_output_tile, tile, ctx, spec, plan, tile, dtype, targets)
                bar.update()
        else:

            def submit(item: tuple) -> Any:
                tile, targets = item
                key = ctx.key("outputs", tile.array, *tile.index)
                args = (ctx, spec, plan, tile, dtype, targets)
                return client.submit(run_output_tile, *args, key=key, pure=False)

            _windowed(client, submit, todo, None, bar)
    finally:
        bar.close()
    seconds = round(time.perf_counter() - start, 3)
    for ks, _ in stores:
        ks.record_stage("kernel", finished=utcnow(), seconds=seconds, tiles=len(todo))
    return {**summary, "tiles_computed": len(todo), "seconds": seconds}


def _local(fn: Any, tile: Tile, *args: Any) -> Any:
    """``fn(*args)`` in this process; a failure is a :class:`JobError` naming ``tile``."""
    try:
        return fn(*args)
    except CorruptStore:
        raise  # its own remedy, not a re-run
    except Exception as e:
        raise _failed(tile, e) from e


def _failed(what: Any, e: Exception) -> JobError:
    """The :class:`JobError` of a failed tile task ``what``: what is kept, how to resume."""
    return JobError(
        f"{what} failed: {type(e).__name__}: {e}\nTiles finished before it are kept; re-run "
        "the same command to resume."
    )


def probe(spec: Spec, data: Any, dtype: str) -> None:
    """Evaluate the kernel on a few inputs before anything is written, so that a bad activation
    (one that does not take arrays, or cannot be rebuilt on the workers) or overflowing inputs
    fail here with a :class:`UserError`, not inside a tile."""
    try:
        Spec.from_dict(spec.to_dict(), trust=True)  # the caller's own spec
    except ValueError as e:
        raise UserError(
            f"the activation {spec.activation.name!r} cannot be recorded in the store and "
            f"rebuilt by the workers ({e}); give a Python function as 'module:function' "
            "naming an importable module-level function"
        ) from None
    # The first inputs, and the largest of each set: a large row anywhere (one that overflows
    # float32, say) fails here, not in its tile after hours of others.
    largest = [_largest_row(data.x_train), _largest_row(data.x_test)]
    x = np.concatenate([data.x_train[:3], data.x_test[:2], *largest])
    try:
        k = spec.cross(x, x)
        d = spec.diag(x)
    except Exception as e:  # the user's function, whatever it raises
        raise UserError(f"the kernel cannot be evaluated: {type(e).__name__}: {e}") from None
    with np.errstate(over="ignore"):  # overflow in the cast is what is being checked
        finite = np.isfinite(k.astype(dtype)).all() and np.isfinite(d.astype(dtype)).all()
    if not finite:
        raise UserError(
            f"the kernel of the first and the largest inputs is not finite in {dtype} "
            "(overflow?): check the inputs' scale, --weight-var, --bias-var, --depth and --dtype"
        )


def _largest_row(x: np.ndarray) -> np.ndarray:
    """The row of ``x`` (examples first) of the largest squared norm, as a one-row array."""
    flat = x.reshape(len(x), -1)
    with np.errstate(over="ignore"):
        return x[[int(np.argmax(np.einsum("ij,ij->i", flat, flat)))]]
