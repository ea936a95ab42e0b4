"""``nngp-dist verify``: every chunk of a store read and checked, every completion record held
to its data, and with ``repair`` the bad chunks forgotten so that a re-run recomputes just them.

A chunk is bad when it does not decode (its CRC-32C fails: a flipped bit, a truncated or
foreign file; in a store made before checksums, a blosc stream that fails) or when it is
missing or NaN though a record says it was written. Which chunks must be written follows from
the records: the kernel's tiles recorded done, the factor's blocks recorded done (and the work
tile each unfinished block's recorded updates are in), the prediction and leave-one-out blocks
recorded done (and every chunk of ``loo_index``), and, once a solve is recorded, ``t_train``
and ``alpha``.

A repair deletes each bad chunk (it then reads as not written) and forgets what depends on it:

* a kernel tile: its record (kernel tiles are deterministic, so the kernel stage recomputes it;
  a factor already computed was computed from the tile before it went bad, since a bad tile
  stops the factorisation that reads it);
* a factor block, a work tile or their records, at block row ``i``: the factor from row ``i``
  on, and the solution (the next solve of the same options recomputes those rows only);
* ``t_train``, ``alpha``, a CG preconditioner's scratch or a Laplace noise scale: the
  solution (solved again);
* a prediction block of ``mean`` or ``variance``, or its record: that block and the report;
* a chunk of the leave-one-out arrays or their record: all of them (recomputed whole by the next
  predict) and the report.

The inputs (``x_*``, ``y_*``) cannot be recomputed from the store: a bad input chunk is reported
and left, and the store must be made again (``--overwrite``).
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

from .errors import CorruptStore
from .layout import (
    ALPHA,
    CG_BLOCKJACOBI,
    CG_NYSTROM,
    CHOL,
    CHOL_STEP,
    CHOL_WORK,
    KERNEL_ARRAYS,
    LAPLACE_SCALE,
    LOO,
    LOO_ARRAYS,
    LOO_INDEX,
    LOO_MEAN,
    LOO_VARIANCE,
    MEAN,
    PREDICT,
    T_TRAIN,
    VARIANCE,
    X_TEST,
    X_TRAIN,
    Y_TEST,
    Y_TRAIN,
    record,
)
from .lock import store_lock
from .storage import KernelStore, chunk_problem, read_checked

__all__ = ["verify"]

INPUTS = (X_TRAIN, Y_TRAIN, X_TEST, Y_TEST)
FACTOR = (CHOL, *CHOL_WORK, record(CHOL), record(CHOL_STEP))
SOLUTION = (T_TRAIN, ALPHA, CG_NYSTROM, CG_BLOCKJACOBI, LAPLACE_SCALE)
POSTERIOR = (MEAN, VARIANCE, record(PREDICT), *LOO_ARRAYS)
STAGES = ("kernel", "solve", "predict")


def verify(store: str, *, repair: bool = False) -> dict:
    """Check every chunk of the store at ``store``; with ``repair`` (under the store's lock),
    forget the bad ones and what depends on them (see the module's description).

    Returns ``{"store", "chunks_checked", "problems": [{"array", "tile", "problem"}],
    "repaired", "unrepairable", "rerun"}``: ``rerun`` the stages a re-run recomputes
    (kernel, solve, predict), ``unrepairable`` the problems a repair cannot mend.
    """
    ks = KernelStore.open(store)
    if not repair:
        problems, checked = _scan(ks)
        return _report(ks, problems, checked, repaired=False)
    with store_lock(ks.url, "verify --repair"):
        ks = KernelStore.open(store, "r+")
        problems, checked = _scan(ks)
        _repair(ks, problems)
        return _report(ks, problems, checked, repaired=True)


def _report(ks: KernelStore, problems: list[dict], checked: int, *, repaired: bool) -> dict:
    return {
        "store": ks.url,
        "chunks_checked": checked,
        "problems": problems,
        "repaired": repaired and bool(problems),
        "unrepairable": [p for p in problems if p["array"] in INPUTS],
        "rerun": [s for s in STAGES if any(_stage(p["array"]) == s for p in problems)],
    }


def _stage(name: str) -> str | None:
    """The stage that recomputes array ``name`` (None for the inputs)."""
    if name in KERNEL_ARRAYS or name in {record(k) for k in KERNEL_ARRAYS}:
        return "kernel"
    if name in FACTOR or name in SOLUTION:
        return "solve"
    if name in POSTERIOR:
        return "predict"
    return None


def _scan(ks: KernelStore) -> tuple[list[dict], int]:
    """Every bad chunk of every array, and how many chunks were read."""
    expected = _expected(ks)
    problems, checked = [], 0
    for name in ks.array_names():
        arr = ks.array(name)
        must = expected.get(name, {})
        for coords in sorted(ks.chunks_present(name) | set(must)):
            checked += 1
            why = chunk_problem(arr, coords, must.get(coords, False))
            if why:
                problems.append({"array": name, "tile": list(coords), "problem": why})
    return problems, checked


def _records(ks: KernelStore, name: str) -> np.ndarray:
    """The records ``name`` (one per chunk), a bad chunk of them read as its fill value (the
    scan reports it)."""
    arr = ks.array(name)
    try:
        return read_checked(arr, url=ks.url, complete=False)
    except CorruptStore:
        out = np.full(arr.shape, arr.fill_value, dtype=arr.dtype)
        for coords in np.ndindex(arr.shape):
            if not chunk_problem(arr, coords, False):
                out[coords] = arr[coords]
        return out


def _expected(ks: KernelStore) -> dict[str, dict[tuple[int, ...], bool | str]]:
    """Per array, the chunks its records say are written (and so must read complete; a
    diagonal work block ``"upper"``: only its upper triangle, as the Cholesky reads it)."""
    plan, meta = ks.plan, ks.meta
    out: dict[str, dict[tuple[int, ...], bool | str]] = {}
    for name in INPUTS:
        out[name] = {c: True for c in _all_chunks(ks.array(name))}
    for name in KERNEL_ARRAYS:
        done = ~np.isnan(_records(ks, record(name))) & plan.wanted(name)
        out[name] = {tuple(map(int, c)): True for c in np.argwhere(done)}
    if ks.has(record(CHOL)):
        done = np.triu(~np.isnan(_records(ks, record(CHOL))))
        out[CHOL] = {tuple(map(int, c)): True for c in np.argwhere(done)}
        steps = np.triu(_records(ks, record(CHOL_STEP)))
        for name, parity in zip(CHOL_WORK, (0, 1)):
            if ks.has(name):
                held = (steps > 0) & (steps % 2 == parity) & ~done
                out[name] = {
                    (int(i), int(j)): "upper" if i == j else True for i, j in np.argwhere(held)
                }
    if ks.has(record(PREDICT)):
        blocks = np.flatnonzero(~np.isnan(_records(ks, record(PREDICT))))
        for name in (MEAN, VARIANCE):
            if ks.has(name):
                tail = (0,) * (ks.array(name).ndim - 1)
                out[name] = {(int(b), *tail): True for b in blocks}
    if ks.has(record(LOO)):
        blocks = np.flatnonzero(~np.isnan(_records(ks, record(LOO))))
        out[LOO_INDEX] = {c: True for c in _all_chunks(ks.array(LOO_INDEX))}
        for name in (LOO_MEAN, LOO_VARIANCE):
            if ks.has(name):
                tail = (0,) * (ks.array(name).ndim - 1)
                out[name] = {(int(b), *tail): True for b in blocks}
    if meta.get("solve"):
        for name in (T_TRAIN, ALPHA):
            if ks.has(name):
                out[name] = {c: True for c in _all_chunks(ks.array(name))}
    return out


def _all_chunks(arr: Any) -> list[tuple[int, ...]]:
    grid = [-(-n // c) for n, c in zip(arr.shape, arr.chunks)]
    return list(itertools.product(*map(range, grid)))


def _repair(ks: KernelStore, problems: list[dict]) -> None:
    """Delete each bad chunk and forget what depends on it (see the module's description)."""
    first_row, solution, blocks, loo = None, False, set(), False
    for p in problems:
        name, coords = p["array"], tuple(p["tile"])
        stage = _stage(name)
        if stage is None:
            continue  # an input: nothing in the store can recompute it
        ks.delete_chunk(name, coords)
        if name in KERNEL_ARRAYS:
            ks.array(record(name))[coords] = np.nan
        elif name in FACTOR:
            first_row = coords[0] if first_row is None else min(first_row, coords[0])
        elif name in SOLUTION:
            solution = True
        elif name in LOO_ARRAYS:
            loo = True
        elif name in POSTERIOR:
            blocks.add(coords[0])
    if first_row is not None and ks.has(record(CHOL)):
        ks.reset_factor(first_row)
    if solution:
        ks.update_meta(solve=None, predict=None)
    for b in sorted(blocks):
        if ks.has(record(PREDICT)):
            ks.array(record(PREDICT))[b] = np.nan
    if loo:  # a few minutes to recompute at most: the next predict makes them anew
        ks.drop(*LOO_ARRAYS)
    if blocks or loo:
        ks.update_meta(predict=None)
