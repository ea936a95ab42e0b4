"""Choosing the noise: each value of a grid is one in-memory Cholesky factorisation.

With ``K_fit`` the kernel of the training points not held out for validation, each noise s
gives ``alpha(s) = (K_fit + s I)^-1 T``, the log marginal likelihood
``-1/2 tr(T' alpha) - C/2 log det(K_fit + s I) - C N/2 log 2 pi``, and the held-out points'
predictions ``K_val,fit alpha(s)`` (their accuracy and MSE). ``--select-by lml`` compares the
likelihoods at the output scale fitted for each noise (``s2 = tr(T' alpha) / (N C)``, which the
posterior then uses): the noise and the scale are fitted jointly, by type-II maximum likelihood.
At the prior's scale 1 instead, a larger noise would stand in for the missing scale.

One eigendecomposition would serve every value at once, but costs about 20 factorisations
(benchmarks/RESULTS.md), and grids hold 3 to 6 values. The validation split is the last ``V``
training examples (as Lee et al. and Garriga-Alonso et al. held out the last 10,000 of MNIST's
training set). The factorisations run on one worker in memory, so this is for N up to about
20,000 (a 3.2 GB matrix and its factor); above that, ``solve`` evaluates an ``lml`` grid by one
out-of-core factorisation per noise.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.linalg import LinAlgError, cho_factor, cho_solve

from .errors import UserError
from .layout import K_TRAIN_TRAIN, Y_TEST, Y_TRAIN
from .predict import likelihoods, targets
from .storage import KernelStore, read_checked
from .tiling import symmetric
from .workers import TaskContext, store_task

__all__ = ["MAX_GRID_N", "best_by_lml", "check_options", "in_memory", "noise_grid", "noisy_solve"]

MAX_GRID_N = 20000


def _columns(ctx: TaskContext, g: Any, n_fit: int) -> np.ndarray:
    """``K[:, :n_fit]`` of the symmetric train matrix, from the upper tiles (worker side);
    the validation x validation block is never needed, so never read."""
    n = ctx.n
    k = np.empty((n, n_fit))
    arr = g[K_TRAIN_TRAIN]
    for i in range(ctx.blocks):
        for j in range(i, ctx.blocks):
            r, c = ctx.span(i), ctx.span(j)
            if r.start >= n_fit:
                continue
            tile = read_checked(arr, (r, c), url=ctx.url, complete="upper" if i == j else True)
            tile = np.asarray(tile, dtype=np.float64)
            if i == j:
                tile = symmetric(tile)
            cf = slice(c.start, min(c.stop, n_fit))
            if cf.start < cf.stop:
                k[r, cf] = tile[:, : cf.stop - cf.start]
            rf = slice(r.start, min(r.stop, n_fit))
            if i != j:
                k[c, rf] = tile[: rf.stop - rf.start].T
    return k


def noisy_solve(k: np.ndarray, t: np.ndarray, noise: float) -> tuple[np.ndarray, float] | None:
    """``(K + noise I)^-1 t`` and ``log det(K + noise I)``, by one Cholesky factorisation of a
    copy of ``K``; None where ``K + noise I`` is not positive definite."""
    a = np.array(k, dtype=np.float64, order="F")
    a[np.diag_indices(len(a))] += noise
    try:
        low = cho_factor(a, lower=True, overwrite_a=True, check_finite=False)
    except LinAlgError:
        return None
    logdet = 2.0 * float(np.log(np.diagonal(low[0])).sum())
    return cho_solve(low, t, check_finite=False), logdet


@store_task
def _grid_task(
    ctx: TaskContext, g: Any, n_fit: int, jitters: list[float], n_classes: int | None
) -> list[dict]:
    n = ctx.n
    k = _columns(ctx, g, n_fit)
    y = np.asarray(g[Y_TRAIN][...])
    tt = targets(y, n_classes)
    fit, k_val, t_fit = k[:n_fit], k[n_fit:], tt[:n_fit]
    c = tt.shape[1]
    rows = []
    for s in jitters:
        solved = noisy_solve(fit, t_fit, s)
        if solved is None:
            rows.append({"noise_abs": s, "result": "not positive definite"})
            continue
        alpha, logdet = solved
        quad = float((t_fit * alpha).sum())
        row = {"noise_abs": s, "result": "ok", **likelihoods(quad, logdet, n_fit, c)}
        if n_fit < n:
            mean = k_val @ alpha
            row["validation_mse"] = float(((mean - tt[n_fit:]) ** 2).mean())
            if n_classes is not None:
                row["validation_accuracy"] = float((mean.argmax(1) == y[n_fit:]).mean())
        rows.append(row)
    return rows


def _score(value: float | None) -> float:
    """A row's criterion for max / min: a likelihood that is None (every target zero, no
    scale to fit) ranks below every number, so the first such row is kept."""
    return -math.inf if value is None else value


def in_memory(n: int) -> bool:
    """Whether a noise grid over ``n`` training points is evaluated in memory on one worker;
    above :data:`MAX_GRID_N`, only ``--select-by lml`` is offered, and each noise is one
    out-of-core factorisation (:func:`nngp_dist.jobs.solve`)."""
    return n <= MAX_GRID_N


def best_by_lml(rows: list[dict]) -> dict:
    """The row with the largest likelihood at its fitted output scale."""
    return max(rows, key=lambda r: _score(r["log_marginal_likelihood_scaled"]))


def check_options(
    n: int, validation_size: int, select_by: str, labels: bool, method: str = "cholesky"
) -> None:
    """:class:`UserError` for a grid that cannot be evaluated, before anything runs
    (``method``: the solve's, which evaluates a grid above the in-memory size)."""
    if not 0 <= validation_size < n - 1:
        raise UserError(f"--validation-size {validation_size} must be between 0 and {n - 2}")
    if not in_memory(n) and (validation_size or select_by != "lml"):
        raise UserError(
            f"a validation split factors the kernel of the {n} training points in memory on "
            f"one worker, which is for N up to {MAX_GRID_N}; above that, a noise grid is "
            "chosen by --select-by lml with no --validation-size (each noise one out-of-core "
            "factorisation), or give one --noise, or a smaller --train-size"
        )
    if not in_memory(n) and method != "cholesky":
        raise UserError(
            "a noise grid above the in-memory size is chosen by the marginal likelihood of "
            "one Cholesky factorisation per noise; CG computes no log-determinant. Use "
            "--method cholesky, or give one --noise"
        )
    if select_by not in ("accuracy", "mse", "lml"):
        raise UserError(f"--select-by must be accuracy, mse or lml, got {select_by!r}")
    if select_by != "lml" and validation_size == 0:
        raise UserError(f"--select-by {select_by} needs a validation split (--validation-size V)")
    if select_by == "accuracy" and not labels:
        raise UserError("--select-by accuracy needs integer labels; use mse or lml")


def noise_grid(
    store: KernelStore, client: Any, noises: list[float], *, validation_size: int, select_by: str
) -> dict:
    """Evaluate every relative noise in ``noises``; return the table and the chosen noise.

    ``select_by`` is ``accuracy`` (validation accuracy; needs a validation split and labels),
    ``mse`` (validation MSE) or ``lml`` (the log marginal likelihood of the fitted points, at
    the output scale fitted for each noise: noise and scale fitted jointly).
    """
    ctx = TaskContext.of(store)
    n = ctx.n
    n_fit = n - validation_size
    y = store.read(Y_TRAIN)
    n_classes = None
    if y.dtype.kind in "iu":
        n_classes = int(max(y.max(), store.read(Y_TEST).max()) + 1)
    check_options(n, validation_size, select_by, n_classes is not None)
    mean_diag = store.mean_diag()
    jitters = [s * mean_diag for s in noises]
    rows = client.submit(_grid_task, ctx, n_fit, jitters, n_classes, pure=False).result()
    for rel, row in zip(noises, rows):
        row["noise"] = rel
    ok = [r for r in rows if r["result"] == "ok"]
    if not ok:
        raise UserError("every noise of the grid leaves the kernel indefinite; try larger ones")
    key = {
        "accuracy": "validation_accuracy",
        "mse": "validation_mse",
        "lml": "log_marginal_likelihood_scaled",
    }
    best = (min if select_by == "mse" else max)(ok, key=lambda r: _score(r[key[select_by]]))
    return {
        "grid": rows,
        "chosen": best["noise"],
        "select_by": select_by,
        "validation_size": validation_size,
    }
