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

import time
from typing import Any

import numpy as np
from distributed import as_completed, wait

from ..layout import CHOL, CHOL_STEP, CHOL_WORK, K_TRAIN_TRAIN, LAPLACE_SCALE, record
from ..progress import progress_bar
from ..storage import KernelStore, read_checked, utcnow
from ..workers import Recorded, TaskContext, store_task
from .tiles import NotPositiveDefinite, add_jitter, potrf, trsm, update

__all__ = ["NotPositiveDefinite", "count_operations", "factorize"]


# --- tasks (worker side): read tiles, apply the tile function, write ----------------------------


def _read_a(ctx: TaskContext, g: Any, i: int, j: int, step: int, jitter: float) -> np.ndarray:
    """The tile (i, j) of A after ``step`` updates, as float64: at step 0 the kernel's tile, or
    ``S K S`` with the store's noise scale S (``laplace_scale``) where it has one."""
    rows, cols = ctx.span(i), ctx.span(j)
    # A diagonal block's upper triangle is authoritative: below it, a block spanning several
    # kernel tiles holds the never-written lower tiles (NaN), in the kernel and in its updates.
    complete = "upper" if i == j else True
    if step == 0:
        a = read_checked(g[K_TRAIN_TRAIN], (rows, cols), url=ctx.url, complete=complete)
        a = np.asarray(a, dtype=np.float64)
        if LAPLACE_SCALE in g:
            scale = read_checked(g[LAPLACE_SCALE], url=ctx.url, complete=False)
            a = scale[rows, None] * a * scale[None, cols]
        return add_jitter(a, jitter) if i == j else a
    return read_checked(g[CHOL_WORK[step % 2]], (rows, cols), url=ctx.url, complete=complete)


def _read_u(ctx: TaskContext, g: Any, i: int, j: int) -> np.ndarray:
    """The factor's block (i, j), checked."""
    return read_checked(g[CHOL], (ctx.span(i), ctx.span(j)), url=ctx.url)


@store_task
def _potrf(ctx: TaskContext, g: Any, k: int, jitter: float, *deps: Any) -> Recorded:
    try:
        u = potrf(_read_a(ctx, g, k, k, k, jitter))
    except NotPositiveDefinite as e:
        raise NotPositiveDefinite(f"diagonal tile {k}: {e}") from None
    g[CHOL][ctx.span(k), ctx.span(k)] = u
    return Recorded(CHOL, (k, k))


@store_task
def _trsm(ctx: TaskContext, g: Any, k: int, j: int, jitter: float, *deps: Any) -> Recorded:
    u_kk = _read_u(ctx, g, k, k)
    g[CHOL][ctx.span(k), ctx.span(j)] = trsm(u_kk, _read_a(ctx, g, k, j, k, jitter))
    return Recorded(CHOL, (k, j))


@store_task
def _update(ctx: TaskContext, g: Any, k: int, i: int, j: int, jitter: float, *deps: Any) -> None:
    steps = g[record(CHOL_STEP)]
    if int(read_checked(steps, (i, j), url=ctx.url)) > k:
        return  # already applied (a re-run of a task that finished): never move back
    a = _read_a(ctx, g, i, j, k, jitter)
    u_ki = _read_u(ctx, g, k, i)
    u_kj = None if i == j else _read_u(ctx, g, k, j)
    g[CHOL_WORK[(k + 1) % 2]][ctx.span(i), ctx.span(j)] = update(a, u_ki, u_kj)
    steps[i, j] = k + 1


# --- the graph (client side) ----------------------------------------------------------------------


def _prepare(store: KernelStore, jitter: float, attempt: dict) -> None:
    """Create the factor's arrays, or keep them when the recorded jitter is the same (a
    resume); ``attempt`` (the attempt in hand) becomes the store's ``factor`` attribute."""
    rec = store.meta.get("factor") or {}
    if rec.get("noise") == jitter and store.has(CHOL):
        store.update_meta(factor={**rec, **attempt, "complete": rec.get("complete", False)})
        return
    store.create_factor()
    store.update_meta(factor={**attempt, "noise": jitter, "complete": False})


def _submit_all(client: Any, store: KernelStore, jitter: float, lookahead: int, bar: Any) -> None:
    """Submit the missing tile operations in waves of steps; raise what a task raises."""
    ctx = TaskContext.of(store)
    nt = ctx.blocks
    done = ~np.isnan(store.read(record(CHOL)))
    step = store.read(record(CHOL_STEP))
    last: dict[tuple[int, int], Any] = {}  # (i, j) -> future of its latest update
    panel: dict[tuple[int, int], Any] = {}  # (k, j) -> future of U[k, j]
    waves: list[list[Any]] = []
    submitted: set[Any] = set()

    def submit(fn: Any, name: str, priority: int, *args: Any, deps: tuple = ()) -> Any:
        fut = client.submit(
            fn,
            ctx,
            *args,
            jitter,
            *[d for d in deps if d is not None],
            key=ctx.key(name, *args, f"{jitter:.17g}"),
            priority=priority,
        )
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
        wait(list(submitted))
        raise
    except BaseException:
        client.cancel(list(submitted))
        raise


def _drain(wave: list[Any], bar: Any, submitted: set[Any]) -> None:
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

    ``noise`` is relative to the mean of the training diagonal; the jitter added to the diagonal
    is ``s = noise * mean(diag K)`` (:meth:`KernelStore.noise_unit`: for a store with a noise
    scale S the unit is 1 and the matrix ``S K S + s I``). If a pivot is not
    positive, the factorisation restarts with the noise multiplied by 10, up to ``max_noise``;
    every attempt is recorded in the store's ``factor`` attribute, whose ``noise`` is the
    absolute jitter ``s`` and ``noise_rel`` the relative noise. Returns that record.
    """
    mean_diag = store.noise_unit()
    nt = TaskContext.of(store).blocks
    rec = store.meta.get("factor") or {}
    if rec.get("noise_requested") == noise and rec.get("noise_rel"):
        # The same request as the recorded factor's: resume at the noise it had escalated to.
        rel, attempts = rec["noise_rel"], list(rec.get("attempts", []))
    else:
        rel, attempts = noise, []
    start = time.perf_counter()
    while True:
        jitter = rel * mean_diag
        _prepare(store, jitter, {"noise_rel": rel, "noise_requested": noise, "attempts": attempts})
        done = int((~np.isnan(store.read(record(CHOL)))).sum())
        bar = progress_bar(count_operations(nt), 0, progress, "cholesky")
        try:
            _submit_all(client, store, jitter, lookahead, bar)
        except NotPositiveDefinite as e:
            attempts.append(
                {"noise": rel, "noise_abs": jitter, "result": f"not positive definite: {e}"}
            )
            store.update_meta(factor={**store.meta["factor"], "attempts": attempts})
            nxt = rel * 10
            if nxt > max_noise * (1 + 1e-12):
                raise NotPositiveDefinite(
                    f"the kernel plus noise stays indefinite up to the noise cap {max_noise:g} "
                    f"(relative to the mean diagonal {mean_diag:.6g}); attempts: "
                    + ", ".join(f"{a['noise']:g}" for a in attempts)
                    + ". Raise --max-noise, or check the kernel: duplicate inputs, or a corrupt "
                    "tile ('nngp-dist verify --store STORE' reads every one)."
                ) from None
            rel = nxt
            continue
        finally:
            bar.close()
        break
    attempts.append({"noise": rel, "noise_abs": jitter, "result": "ok", "tiles_resumed": done})
    factor = {
        "noise": jitter,
        "noise_rel": rel,
        "noise_requested": noise,
        "mean_diag": mean_diag,
        "attempts": attempts,
        "complete": True,
        "finished": utcnow(),
        "seconds": round(time.perf_counter() - start, 3),
    }
    store.update_meta(factor=factor)
    store.drop_factor(work_only=True)  # the work buffers are no longer needed
    return factor
