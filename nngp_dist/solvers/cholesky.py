"""Tiled Cholesky factorisation of the stored kernel, as a Dask task graph of our own.

The store holds the upper tiles of K (``k_train_train``, row tile <= column tile), so the factor
is upper too: ``K + s I = U^T U``, written tile by tile to ``chol``. Right-looking, one tile
operation per task::

    for k in 0 .. nt-1:
        U[k,k] = potrf(A[k,k])                           # A = K + s I, updated in place below
        U[k,j] = U[k,k]^-T A[k,j]            for j > k    # trsm, the panel: high priority
        A[i,j] = A[i,j] - U[k,i]^T U[k,j]    for k < i <= j   # syrk (i == j) or gemm

Tasks read their tiles from the store and write their results to it; only small tokens pass
between them. The updated tiles ``A^(k)`` alternate between two work arrays by the parity of
``k`` (``A^(0)`` is the kernel itself), and ``tiles/chol_step`` records how many updates each
tile has received: an update reads one buffer, writes the other, then advances the record, so a
task killed at any point can simply run again. A factorisation killed midway therefore resumes
from the factor tiles and updates already recorded. Steps are submitted in waves a few steps
ahead of the slowest, so the graph in flight stays O(nt^2) however large the matrix.

Workers hold at most four tiles at a time, whatever N is.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from .. import workers
from ..storage import KernelStore, _utcnow, solve_block
from ..tiling import span

__all__ = ["NotPositiveDefinite", "factorize"]

WORK = ("chol_work0", "chol_work1")


class NotPositiveDefinite(np.linalg.LinAlgError):
    """A non-positive pivot: the matrix plus the current noise is not numerically SPD."""


# --- tile operations (worker side) --------------------------------------------------------------


def _read_a(g: Any, t: int, n: int, i: int, j: int, step: int, noise: float) -> np.ndarray:
    """The tile (i, j) of A after ``step`` updates, as float64."""
    rows, cols = span(t, n, i), span(t, n, j)
    if step == 0:
        a = np.asarray(g["k_train_train"][rows, cols], dtype=np.float64)
        if i == j:
            a = a.copy()
            a[np.diag_indices_from(a)] += noise
        return a
    return np.asarray(g[WORK[step % 2]][rows, cols])


def _potrf(url: str, token: str, t: int, n: int, k: int, noise: float, *deps: Any) -> float:
    from scipy.linalg import cholesky  # noqa: PLC0415

    start = time.perf_counter()
    workers.tune_allocator()
    g = workers.open_group(url, token)
    a = _read_a(g, t, n, k, k, k, noise)
    a = np.triu(a) + np.triu(a, 1).T  # the stored tile's upper triangle is authoritative
    try:
        u = cholesky(a, lower=False, check_finite=True)
    except np.linalg.LinAlgError as e:
        raise NotPositiveDefinite(f"diagonal tile {k}: {e}") from None
    block = span(t, n, k)
    g["chol"][block, block] = u
    seconds = time.perf_counter() - start
    g["tiles/chol"][k, k] = max(seconds, 1e-9)
    return seconds


def _trsm(url: str, token: str, t: int, n: int, k: int, j: int, noise: float, *deps: Any) -> float:
    from scipy.linalg import solve_triangular  # noqa: PLC0415

    start = time.perf_counter()
    workers.tune_allocator()
    g = workers.open_group(url, token)
    a = _read_a(g, t, n, k, j, k, noise)
    u_kk = np.asarray(g["chol"][span(t, n, k), span(t, n, k)])
    u = solve_triangular(u_kk, a, trans="T", lower=False, check_finite=False)
    g["chol"][span(t, n, k), span(t, n, j)] = u
    seconds = time.perf_counter() - start
    g["tiles/chol"][k, j] = max(seconds, 1e-9)
    return seconds


def _update(
    url: str, token: str, t: int, n: int, k: int, i: int, j: int, noise: float, *deps: Any
) -> float:
    start = time.perf_counter()
    workers.tune_allocator()
    g = workers.open_group(url, token)
    if int(g["tiles/chol_step"][i, j]) > k:
        return 0.0  # already applied (a re-run of a task that finished): never move back
    a = _read_a(g, t, n, i, j, k, noise)
    u_ki = np.asarray(g["chol"][span(t, n, k), span(t, n, i)])
    if i == j:
        a = a - u_ki.T @ u_ki  # SYRK
    else:
        a = a - u_ki.T @ np.asarray(g["chol"][span(t, n, k), span(t, n, j)])
    g[WORK[(k + 1) % 2]][span(t, n, i), span(t, n, j)] = a
    g["tiles/chol_step"][i, j] = k + 1
    return time.perf_counter() - start


# --- the graph (client side) ----------------------------------------------------------------------


def _prepare(store: KernelStore, noise: float, record: dict) -> None:
    """Create the factor's arrays, or reset them when the recorded noise differs; ``record``
    (the attempt in hand) becomes the store's ``factor`` attribute either way."""
    meta = store.meta
    n, t = meta["n_train"], solve_block(meta)
    nt = math.ceil(n / t)
    rec = meta.get("factor") or {}
    fresh = rec.get("noise") != noise or "chol" not in store.group
    if not fresh:
        store.update_meta(factor={**rec, **record, "complete": rec.get("complete", False)})
        return
    if not fresh:
        return
    g = store.group
    dims = ("train", "train_col")
    for name in ("chol", *WORK):
        g.create_array(name, shape=(n, n), chunks=(t, t), dtype="float64", fill_value=np.nan,
                       dimension_names=dims, compressors=None, overwrite=True)  # fmt: skip
    g["tiles"].create_array("chol", shape=(nt, nt), chunks=(1, 1), dtype="float32",
                            fill_value=np.nan, compressors=None, overwrite=True)  # fmt: skip
    g["tiles"].create_array("chol_step", shape=(nt, nt), chunks=(1, 1), dtype="int32",
                            fill_value=0, compressors=None, overwrite=True)  # fmt: skip
    store.update_meta(factor={**record, "noise": noise, "complete": False})


def _submit_all(client: Any, store: KernelStore, noise: float, lookahead: int, bar: Any) -> None:
    """Submit the missing tile operations in waves of steps; raise what a task raises."""
    meta = store.meta
    n, t = meta["n_train"], solve_block(meta)
    nt = math.ceil(n / t)
    url, token = store.url, workers.store_token(meta)
    done = ~np.isnan(store.group["tiles/chol"][...])
    step = store.group["tiles/chol_step"][...]
    last: dict[tuple[int, int], Any] = {}  # (i, j) -> future of its latest update
    panel: dict[tuple[int, int], Any] = {}  # (k, j) -> future of U[k, j]
    waves: list[list[Any]] = []
    submitted: set[Any] = set()

    def submit(fn: Any, name: str, priority: int, *args: Any, deps: tuple = ()) -> Any:
        fut = client.submit(
            fn, url, token, t, n, *args, noise, *[d for d in deps if d is not None],
            key=workers.task_key(url, token, name, *args, f"{noise:.17g}"), priority=priority,
        )  # fmt: skip
        submitted.add(fut)
        waves[-1].append(fut)
        return fut

    try:
        for k in range(nt):
            waves.append([])
            if not done[k, k]:
                panel[(k, k)] = submit(_potrf, "potrf", 3 * nt - k, k, deps=(last.get((k, k)),))
            for j in range(k + 1, nt):
                if not done[k, j]:
                    deps = (panel.get((k, k)), last.get((k, j)))
                    panel[(k, j)] = submit(_trsm, "trsm", 2 * nt - k, k, j, deps=deps)
            for i in range(k + 1, nt):
                for j in range(i, nt):
                    if done[i, j] or step[i, j] > k:
                        continue
                    deps = (panel.get((k, i)), panel.get((k, j)), last.get((i, j)))
                    last[(i, j)] = submit(_update, "update", nt - k, k, i, j, deps=deps)
            for old in [kj for kj in panel if kj[0] < k]:  # no later step depends on these
                del panel[old]
            if len(waves) > lookahead:
                _drain(waves.pop(0), bar, submitted)
        for wave in waves:
            _drain(wave, bar, submitted)
    except Exception:
        # Let every submitted task settle (dependents of the failed one err at once) before the
        # caller restarts: a cancelled task that is already running would go on writing into
        # the next attempt's arrays.
        from distributed import wait  # noqa: PLC0415

        wait(list(submitted))
        raise
    except BaseException:
        client.cancel(list(submitted))
        raise


def _drain(wave: list[Any], bar: Any, submitted: set[Any]) -> None:
    from distributed import as_completed  # noqa: PLC0415

    for fut in as_completed(wave):
        fut.result()  # raises the task's exception, NotPositiveDefinite included
        submitted.discard(fut)
        bar.update()


def count_operations(nt: int) -> int:
    """Tile operations of a full factorisation of nt x nt tiles."""
    return nt + nt * (nt - 1) // 2 + sum((nt - k - 1) * (nt - k) // 2 for k in range(nt))


def factorize(
    store: KernelStore,
    *,
    client: Any,
    noise: float,
    max_noise: float = 0.1,
    lookahead: int = 2,
    progress: bool = True,
) -> dict:
    """Factor ``k_train_train + s I`` into ``chol``; escalate the noise on a non-positive pivot.

    ``noise`` is relative to the mean of the training diagonal: ``s = noise * mean(diag K)``. If
    a pivot is not positive, the factorisation restarts with the noise multiplied by 10, up to
    ``max_noise``; every attempt is recorded in the store's ``factor`` attribute. Returns the
    record: the noise used (relative and absolute), the attempts, seconds.
    """
    from ..compute import _progress  # noqa: PLC0415

    meta = store.meta
    mean_diag = float(np.mean(store.group["k_train_diag"][...]))
    nt = math.ceil(meta["n_train"] / solve_block(meta))
    rec = meta.get("factor") or {}
    if rec.get("noise_requested") == noise and rec.get("noise_rel"):
        # The same request as the recorded factor's: resume at the noise it had escalated to.
        rel, attempts = rec["noise_rel"], list(rec.get("attempts", []))
    else:
        rel, attempts = noise, []
    start = time.perf_counter()
    while True:
        s = rel * mean_diag
        _prepare(store, s, {"noise_rel": rel, "noise_requested": noise, "attempts": attempts})
        done = int((~np.isnan(store.group["tiles/chol"][...])).sum())
        bar = _progress(count_operations(nt), 0, progress, "cholesky")
        try:
            _submit_all(client, store, s, lookahead, bar)
        except NotPositiveDefinite as e:
            attempts.append({"noise": rel, "noise_abs": s, "result": f"not positive definite: {e}"})
            store.update_meta(factor={**store.meta["factor"], "attempts": attempts})
            nxt = rel * 10
            if nxt > max_noise * (1 + 1e-12):
                raise NotPositiveDefinite(
                    f"the kernel plus noise stays indefinite up to the noise cap {max_noise:g} "
                    f"(relative to the mean diagonal {mean_diag:.6g}); attempts: "
                    + ", ".join(f"{a['noise']:g}" for a in attempts)
                    + ". Raise --max-noise, or check the kernel for NaN or duplicate inputs."
                ) from None
            rel = nxt
            continue
        finally:
            bar.close()
        break
    attempts.append({"noise": rel, "noise_abs": s, "result": "ok", "tiles_resumed": done})
    record = {
        "noise": s,
        "noise_rel": rel,
        "noise_requested": noise,
        "mean_diag": mean_diag,
        "attempts": attempts,
        "complete": True,
        "finished": _utcnow(),
        "seconds": round(time.perf_counter() - start, 3),
    }
    store.update_meta(factor=record)
    for name in WORK:  # the work buffers are no longer needed
        if name in store.group:
            del store.group[name]
    return record
