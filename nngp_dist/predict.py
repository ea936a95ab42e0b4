"""The GP posterior from the solved store: alpha, means, variances, and metrics.

With ``K + s I = U^T U`` (``chol``, upper tiles; docs/science.md, Exact GP regression):

* ``alpha = U^-1 U^-T T``: a forward then a backward triangular solve, streamed tile by tile by
  one task (the right-hand sides are N x C, small);
* per block of test points: ``mean = K_*D alpha`` and ``var = diag K_** - colsum(W^2)`` with
  ``W = U^-T K_D*``, a forward solve streamed over the factor's tiles, holding only W
  (N x block) and one tile in memory; negative variances (rounding) are clamped at zero and
  counted;
* ``log p(T) = -1/2 sum_c T_c^T alpha_c - C/2 log det(K + s I) - C N/2 log 2 pi`` (summed over
  the C output columns): :func:`log_marginal_likelihood`, the one place it is written.

A store with a noise scale ``S = sqrt(Lambda)`` (per-point noise ``1 / Lambda``, the
Laplace-GP posterior of a trained network) holds the factor of ``S K S + s I`` instead, and
``(K + Lambda^-1)^-1 = S (S K S + I)^-1 S``: alpha and the forward solves of the variances
apply S on both sides, and ``log det(K + Lambda^-1) = log det(S K S + I) - 2 sum log S``.

Leave-one-out predictions (Rasmussen and Williams 2006, section 5.4.2) of ``L`` training points
spread evenly over the training set give each one's predictive distribution given the other
``N - 1`` without refitting: with ``P = (K + s I)^-1``, ``mean_i = t_i - alpha_i / P_ii`` and
``var_i = 1 / P_ii - s`` (latent, as ``variance`` is for a test point), where ``P_ii =
||U^-T e_i||^2`` is a forward solve that starts at point i's block (:func:`predict_loo`).
Their squared errors against their predictive variances fit a non-decreasing (isotonic) map from
predictive variance to expected squared error, :func:`recalibration`: the test points'
recalibrated variances, fitted on training data alone (docs/science.md, Variance
recalibration).

A store solved by CG has no factor: its predictions solve ``(K + s I) Z = K_D*`` by PCG per
block of test points instead (:func:`predict_test` picks the path from the solve record).
Classification targets are one-hot with 0.9 for the true class and -0.1 elsewhere (Lee et al.);
float targets are regressed as given.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
from distributed import as_completed
from scipy.optimize import isotonic_regression

from .layout import (
    ALPHA,
    CHOL,
    K_TEST_DIAG,
    K_TEST_TRAIN,
    LAPLACE_SCALE,
    LOO,
    LOO_INDEX,
    LOO_MEAN,
    LOO_SIZE,
    LOO_VARIANCE,
    MEAN,
    PREDICT,
    T_TRAIN,
    VARIANCE,
    Y_TEST,
    Y_TRAIN,
    record,
)
from .progress import progress_bar
from .solvers.cg import StoreSystem
from .solvers.factor import Factor
from .storage import KernelStore, read_checked
from .tiling import span
from .workers import Recorded, TaskContext, store_task

__all__ = [
    "LOO_SIZE",
    "RECALIBRATION_GROUP",
    "RECALIBRATION_KNOTS",
    "calibration",
    "isotonic_map",
    "leading_alpha",
    "loo_index",
    "log_marginal_likelihood",
    "likelihoods",
    "metrics",
    "output_scale",
    "predict_block_size",
    "predict_loo",
    "predict_test",
    "predictive_variance",
    "recalibrated_variance",
    "recalibration",
    "recalibration_group",
    "scaled_log_marginal_likelihood",
    "solve_alpha",
    "targets",
]


def targets(y: np.ndarray, n_classes: int | None = None) -> np.ndarray:
    """One-hot 0.9 / -0.1 targets for integer labels; float targets as (n, C) unchanged."""
    if y.dtype.kind in "iu":
        c = int(n_classes if n_classes is not None else y.max() + 1)
        t = np.full((len(y), c), -0.1)
        t[np.arange(len(y)), y] = 0.9
        return t
    return y.reshape(len(y), -1).astype(np.float64)


def log_marginal_likelihood(quad: float, logdet: float, n: int, c: int) -> float:
    """``log p(T)`` of ``C`` independent output columns of ``n`` targets under
    ``N(0, K + s I)``: ``quad = tr(T' (K + s I)^-1 T)``, ``logdet = log det(K + s I)``."""
    return -0.5 * quad - 0.5 * c * logdet - 0.5 * c * n * math.log(2 * math.pi)


def scaled_log_marginal_likelihood(quad: float, logdet: float, n: int, c: int) -> float | None:
    """``log p(T)`` under ``N(0, s2 (K + s I))`` with the output scale ``s2`` at its maximum
    ``quad / (n C)`` (:func:`output_scale`): the marginal likelihood maximised over the scale,
    so that choosing the noise by it fits the noise and the scale jointly (type-II maximum
    likelihood). Scaling the covariance by ``s2`` divides ``quad`` by it and adds
    ``n log s2`` to the log-determinant. None where every target is zero (``quad = 0``): the
    likelihood then grows without bound as the scale goes to zero."""
    s2 = quad / (n * c)
    if not s2 > 0:
        return None
    return log_marginal_likelihood(quad / s2, logdet + n * math.log(s2), n, c)


def likelihoods(quad: float, logdet: float, n: int, c: int) -> dict:
    """From ``quad = tr(T' (K + s I)^-1 T)`` and ``log det(K + s I)``: the log marginal
    likelihood at the prior's scale 1, at the fitted scale, and that scale (``output_scale``)."""
    return {
        "log_marginal_likelihood": log_marginal_likelihood(quad, logdet, n, c),
        "log_marginal_likelihood_scaled": scaled_log_marginal_likelihood(quad, logdet, n, c),
        "output_scale": quad / (n * c),
    }


def output_scale(t_train: np.ndarray, alpha: np.ndarray) -> float:
    """The maximum-likelihood scale ``s2`` of the prior, for targets ``T ~ N(0, s2 (K + s I))``
    column by column: ``tr(T' (K + s I)^-1 T) / (N C)``. The noise is relative to the kernel,
    so scaling the prior leaves the posterior mean unchanged and scales the variances."""
    return float((t_train * alpha).sum() / t_train.size)


def leading_alpha(
    chol: Any, t: int, n: int, tt: np.ndarray, url: str | None = None
) -> tuple[np.ndarray, float]:
    """alpha = (K + s I)^-1 T for the first ``n`` training points, and log det(K + s I) for
    them (see :class:`~nngp_dist.solvers.factor.Factor`: any ``n`` up to the store's)."""
    return Factor(chol, t, n, url).solve(tt[:n])


@store_task
def _solve_alpha(ctx: TaskContext, g: Any) -> dict:
    """Worker task: alpha = (K + s I)^-1 T from the factor; the LML's two data terms."""
    tt = np.asarray(read_checked(g[T_TRAIN], url=ctx.url), dtype=np.float64)
    if LAPLACE_SCALE in g:
        scale = read_checked(g[LAPLACE_SCALE], url=ctx.url, complete=False)[:, None]
        a, logdet = leading_alpha(g[CHOL], ctx.t, ctx.n, scale * tt, ctx.url)
        a *= scale
        with np.errstate(divide="ignore"):
            logdet -= 2.0 * float(np.log(scale).sum())  # +inf where a point has no precision
    else:
        a, logdet = leading_alpha(g[CHOL], ctx.t, ctx.n, tt, ctx.url)
    g[ALPHA][...] = a
    return {"quad": float((tt * a).sum()), "logdet": logdet}


def solve_alpha(store: KernelStore, *, client: Any) -> dict:
    """Write ``alpha`` from the factor; return the log marginal likelihood (at the prior's
    scale 1, and at the fitted scale) and the output scale."""
    ctx = TaskContext.of(store)
    c = store.array(T_TRAIN).shape[1]
    parts = client.submit(_solve_alpha, ctx, key=ctx.key("alpha"), pure=False).result()
    return likelihoods(parts["quad"], parts["logdet"], ctx.n, c)


@store_task
def _predict_block(ctx: TaskContext, g: Any, m: int, block: int, b: int) -> Recorded:
    """Worker task: mean and variance of test block ``b``; returns how many were clamped."""
    rows = span(block, m, b)
    k_blocks = [
        np.asarray(read_checked(g[K_TEST_TRAIN], (rows, ctx.span(j)), url=ctx.url), np.float64)
        for j in range(ctx.blocks)
    ]
    alpha = read_checked(g[ALPHA], url=ctx.url)
    mean = sum(k_blocks[j] @ alpha[ctx.span(j)] for j in range(ctx.blocks))
    if LAPLACE_SCALE in g:
        scale = read_checked(g[LAPLACE_SCALE], url=ctx.url, complete=False)
        cols = [scale[ctx.span(j), None] * k_blocks[j].T for j in range(ctx.blocks)]
    else:
        cols = [kb.T.copy() for kb in k_blocks]
    w = Factor(g[CHOL], ctx.t, ctx.n, ctx.url).forward(cols)
    diag = np.asarray(read_checked(g[K_TEST_DIAG], rows, url=ctx.url), np.float64)
    var = diag - sum((wi * wi).sum(0) for wi in w)
    clamped = int((var < 0).sum())
    g[MEAN][rows] = mean
    g[VARIANCE][rows] = np.maximum(var, 0.0)
    return Recorded(PREDICT, b, clamped)


def predict_block_size(n: int, tile: int, m: int, workers: tuple[int, int] = (1, 0)) -> int:
    """Test points per prediction task.

    Each task streams the whole factor once, so the fewer the blocks the less is read: W
    (n x block) and the test rows (block x n) may take a quarter of a worker's memory limit, up
    to 1 GiB (256 MiB when the limit is unknown), but at most one tile and no more than keeps
    every worker busy. ``workers`` is (how many, smallest memory limit in bytes or 0).
    """
    count, limit = workers
    budget = min(1 << 30, limit // 4) if limit else 1 << 28
    per_worker = math.ceil(m / max(count, 1))
    return max(1, min(tile, per_worker, budget // (16 * max(n, 1))))


# Test points per block of a CG prediction: each block is one PCG solve with a matrix pass
# per iteration, so smaller blocks than the factor's keep each solve's right-hand side thin.
CG_PREDICT_BLOCK = 256


def predict_test(
    store: KernelStore, *, client: Any, progress: bool = True, workers: tuple[int, int] = (1, 0)
) -> dict:
    """Write ``mean`` and ``variance`` block by block (blocks already recorded are skipped), by
    the factor or, for a store solved by CG, by PCG. ``workers``: as for
    :func:`predict_block_size`. Returns ``variance_clamped`` and
    ``variance_blocks_unconverged`` (CG only; 0 otherwise)."""
    meta = store.meta
    ctx = TaskContext.of(store)
    by_cg = meta["solve"]["method"] == "cg"
    block = predict_block_size(ctx.n, ctx.t, meta["n_test"], workers)
    store.prepare_predict(min(block, CG_PREDICT_BLOCK) if by_cg else block)
    if by_cg:
        return _predict_cg(store, client, progress)
    return _predict_factor(store, ctx, client, progress)


def _predict_factor(store: KernelStore, ctx: TaskContext, client: Any, progress: bool) -> dict:
    meta = store.meta
    m, block = meta["n_test"], meta["predict_block"]
    done = ~np.isnan(store.read(record(PREDICT)))
    todo = [b for b in range(len(done)) if not done[b]]
    bar = progress_bar(len(done), int(done.sum()), progress, "predict", "block")
    futures = [
        client.submit(_predict_block, ctx, m, block, b, pure=False, key=ctx.key("predict", b))
        for b in todo
    ]
    try:
        clamped = sum(_results(client, futures, bar))
    finally:
        bar.close()
    return {"variance_clamped": clamped, "variance_blocks_unconverged": 0}


def _results(client: Any, futures: list, bar: Any) -> Iterator[Any]:
    """The tasks' results as they finish, ``bar`` ticked for each; a failed task raises here
    (``as_completed`` yields it like the others), and the tasks not yet finished are cancelled."""
    try:
        for fut in as_completed(futures):
            out = fut.result()
            bar.update()
            yield out
    except BaseException:
        client.cancel(futures)
        raise


def _predict_cg(store: KernelStore, client: Any, progress: bool) -> dict:
    """Means and variances without a factor: per block of test points, PCG solves
    ``(K + s I) Z = K_D*`` (one matrix pass per iteration per block, so practical for small test
    sets; the Cholesky path is the one for scale). The block's test rows of the kernel (block x N,
    a thin slab, not a tile) are read by the client."""
    meta = store.meta
    m, block = meta["n_test"], meta["predict_block"]
    cg_log = meta["solve"]["cg"]
    system = StoreSystem(store, client, meta["solve"]["noise_abs"], cg_log["preconditioner"])
    alpha = store.read(ALPHA, complete=True)
    done = ~np.isnan(store.read(record(PREDICT)))
    bar = progress_bar(len(done), int(done.sum()), progress, "predict (cg)", "block")
    clamped, unconverged = 0, 0
    try:
        for b in np.flatnonzero(~done):
            start = time.perf_counter()
            rows = span(block, m, int(b))
            slab = read_checked(store.array(K_TEST_TRAIN), (rows, slice(None)), url=store.url)
            slab = np.asarray(slab, dtype=np.float64)
            z, log = system.solve(slab.T, tol=cg_log["tol"], maxiter=cg_log["maxiter"])
            unconverged += not log["converged"]
            diag = read_checked(store.array(K_TEST_DIAG), rows, url=store.url)
            var = np.asarray(diag, dtype=np.float64) - (slab.T * z).sum(0)
            clamped += int((var < 0).sum())
            store.array(MEAN)[rows] = slab @ alpha
            store.array(VARIANCE)[rows] = np.maximum(var, 0.0)
            store.array(record(PREDICT))[int(b)] = max(time.perf_counter() - start, 1e-9)
            bar.update()
    finally:
        bar.close()
    return {"variance_clamped": clamped, "variance_blocks_unconverged": unconverged}


def loo_index(n: int, size: int) -> np.ndarray:
    """``min(size, n)`` training points spread evenly over ``0 .. n - 1``, increasing (evenly
    rather than at random: reproducible, and a training set ordered by class is still covered
    evenly)."""
    if size >= n:
        return np.arange(n, dtype=np.int64)
    return np.linspace(0, n - 1, size).round().astype(np.int64)  # distinct: step >= 1


def _unit_columns(idx: np.ndarray, spans: list[slice]) -> list[np.ndarray]:
    """The row blocks ``spans`` of the columns ``e_i``, i in ``idx``."""
    out = []
    for sl in spans:
        e = np.zeros((sl.stop - sl.start, len(idx)))
        inside = (idx >= sl.start) & (idx < sl.stop)
        e[idx[inside] - sl.start, np.flatnonzero(inside)] = 1.0
        out.append(e)
    return out


@store_task
def _loo_block(ctx: TaskContext, g: Any, block: int, b: int, noise_abs: float) -> Recorded:
    """Worker task: leave-one-out block ``b`` from the factor, ``P_ii = ||U^-T e_i||^2`` by a
    forward solve from the block of the block's first point (the rows before it are zero)."""
    rows = span(block, g[LOO_INDEX].shape[0], b)
    idx = np.asarray(read_checked(g[LOO_INDEX], rows, url=ctx.url), dtype=np.int64)
    start = int(idx[0]) // ctx.t
    spans = [ctx.span(i) for i in range(start, ctx.blocks)]
    w = Factor(g[CHOL], ctx.t, ctx.n, ctx.url).forward(_unit_columns(idx, spans), start)
    precision = sum((wi * wi).sum(0) for wi in w)
    tt = np.asarray(read_checked(g[T_TRAIN], url=ctx.url), dtype=np.float64)[idx]
    alpha = np.asarray(read_checked(g[ALPHA], url=ctx.url), dtype=np.float64)[idx]
    g[LOO_MEAN][rows] = tt - alpha / precision[:, None]
    g[LOO_VARIANCE][rows] = np.maximum(1.0 / precision - noise_abs, 0.0)
    return Recorded(LOO, b)


def predict_loo(
    store: KernelStore,
    *,
    client: Any,
    size: int | None = LOO_SIZE,
    progress: bool = True,
    workers: tuple[int, int] = (1, 0),
) -> dict:
    """Write the leave-one-out predictions of ``size`` training points (:func:`loo_index`;
    blocks already recorded are skipped), by the factor or, for a store solved by CG, by PCG.
    Returns ``loo_size``, ``loo_skipped`` (why there are none: ``size`` 0, which drops any, or
    a Laplace-GP store, whose per-point noise the recalibration does not model) and
    ``loo_blocks_unconverged`` (CG only). ``size`` None: none computed, none dropped (the
    estimators, whose std is the GP's)."""
    meta = store.meta
    if size is None:
        return {"loo_size": 0, "loo_skipped": "not asked for", "loo_blocks_unconverged": 0}
    if store.has(LAPLACE_SCALE) or not size:
        store.prepare_loo(np.empty(0, np.int64), 1)
        why = "--loo-size 0" if not size else "a per-point noise (Laplace-GP) store"
        return {"loo_size": 0, "loo_skipped": why, "loo_blocks_unconverged": 0}
    ctx = TaskContext.of(store)
    index = loo_index(ctx.n, size)
    by_cg = meta["solve"]["method"] == "cg"
    block = predict_block_size(ctx.n, ctx.t, len(index), workers)
    store.prepare_loo(index, min(block, CG_PREDICT_BLOCK) if by_cg else block)
    block, noise_abs = store.meta["loo_block"], meta["solve"]["noise_abs"]
    done = ~np.isnan(store.read(record(LOO)))
    bar = progress_bar(len(done), int(done.sum()), progress, "leave-one-out", "block")
    unconverged = 0
    try:
        if by_cg:
            unconverged = _loo_cg(store, client, block, np.flatnonzero(~done), bar)
        else:
            futures = [
                client.submit(
                    _loo_block, ctx, block, int(b), noise_abs, pure=False, key=ctx.key("loo", b)
                )
                for b in np.flatnonzero(~done)
            ]
            list(_results(client, futures, bar))
    finally:
        bar.close()
    return {"loo_size": len(index), "loo_skipped": None, "loo_blocks_unconverged": unconverged}


def _loo_cg(store: KernelStore, client: Any, block: int, todo: np.ndarray, bar: Any) -> int:
    """Leave-one-out blocks of a store solved by CG: ``P e_i`` by PCG per block. Returns how
    many blocks did not converge."""
    meta, n = store.meta, store.meta["n_train"]
    cg_log, noise_abs = meta["solve"]["cg"], meta["solve"]["noise_abs"]
    system = StoreSystem(store, client, noise_abs, cg_log["preconditioner"])
    index, tt = store.read(LOO_INDEX, complete=True), store.read(T_TRAIN)
    alpha, unconverged = store.read(ALPHA, complete=True), 0
    for b in todo:
        start = time.perf_counter()
        rows = span(block, len(index), int(b))
        idx = index[rows]
        e = _unit_columns(idx, [slice(0, n)])[0]
        z, log = system.solve(e, tol=cg_log["tol"], maxiter=cg_log["maxiter"])
        unconverged += not log["converged"]
        precision = z[idx, np.arange(len(idx))]
        store.array(LOO_MEAN)[rows] = tt[idx] - alpha[idx] / precision[:, None]
        store.array(LOO_VARIANCE)[rows] = np.maximum(1.0 / precision - noise_abs, 0.0)
        store.array(record(LOO))[int(b)] = max(time.perf_counter() - start, 1e-9)
        bar.update()
    return unconverged


def calibration(
    variance: np.ndarray, sq_error: np.ndarray, bins: int = 10, order_by: np.ndarray | None = None
) -> list[dict]:
    """Points binned by predicted variance (equal counts): per bin the mean predicted
    variance, the realised mean squared error and the count (Lee et al., figure 4).
    ``order_by``: bin by it instead (the raw variances, so that recalibrated variances, a
    non-decreasing map of them with flat steps, fall in the same bins as the raw ones)."""
    order = np.argsort(variance if order_by is None else order_by, kind="stable")
    out = []
    for idx in np.array_split(order, min(bins, len(order))):
        if len(idx):
            out.append(
                {
                    "mean_variance": float(variance[idx].mean()),
                    "mse": float(sq_error[idx].mean()),
                    "count": int(len(idx)),
                }
            )
    return out


def predictive_variance(store: KernelStore, name: str = VARIANCE) -> np.ndarray:
    """The targets' predictive variance, ``s2 (variance + noise)``, with the prior's scale
    ``s2`` fitted by maximum likelihood when the store was solved (the solve record's
    ``output_scale``; stores solved before it was recorded give the stored variance).
    ``name``: ``variance`` (the test points) or ``loo_variance`` (the leave-one-out points)."""
    solved = store.meta["solve"]
    var = store.read(name, complete=True)
    scale = solved.get("output_scale")
    return var if scale is None else scale * (var + solved["noise_abs"])


# Leave-one-out points pooled per knot of the recalibration map: about RECALIBRATION_GROUP
# (pools of equal count, at least that many points each), and about RECALIBRATION_KNOTS knots
# for fewer points (:func:`recalibration_group`). Single-point knots let a few points with a
# misclassification set the map's ends: on the 50k run, maps refitted on 20 random sets of
# 5,000 of its 50,000 leave-one-out points kept every test bin within 1.5 in 13 of the 20 with
# one point per knot, 17 with 50, all 20 with 200 (worst bin at most 1.37; all 50,000 points:
# 1.25). benchmarks/RESULTS.md.
RECALIBRATION_GROUP, RECALIBRATION_KNOTS = 200, 25


def recalibration_group(n: int) -> int:
    """Leave-one-out points per knot of the map fitted on ``n`` of them: ``n // 25`` (25 knots),
    between 1 and 200 (more knots for more points)."""
    return int(min(RECALIBRATION_GROUP, max(1, n // RECALIBRATION_KNOTS)))


def isotonic_map(x: np.ndarray, y: np.ndarray, group: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The weighted least-squares non-decreasing fit of ``y`` on ``x``, as knots (increasing)
    and the fit there. The points are pooled first: equal ``x`` together (``group`` 1), or,
    sorted by ``x``, into ``len(x) // group`` consecutive groups of equal count; a knot is a
    pool's mean ``x`` with its mean ``y``, weighted by its count. Between knots the map
    interpolates linearly, beyond them it holds the end values
    (``np.interp(v, *isotonic_map(x, y))``)."""
    if group > 1:
        pools = np.array_split(np.argsort(x, kind="stable"), max(1, len(x) // group))
        knots = np.array([x[p].mean() for p in pools])
        means = np.array([y[p].mean() for p in pools])
        counts = np.array([len(p) for p in pools])
    else:
        knots, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
        means = np.bincount(inverse, weights=y) / counts
    return knots, isotonic_regression(means, weights=counts.astype(np.float64)).x


def _loo_errors(store: KernelStore) -> tuple[np.ndarray, ...] | None:
    """The leave-one-out points' indices, means, squared errors (mean over outputs) and
    predictive variances; None when the store has none finished."""
    if not store.has(record(LOO)) or np.isnan(store.read(record(LOO))).any():
        return None
    idx, mean = store.read(LOO_INDEX, complete=True), store.read(LOO_MEAN, complete=True)
    sq = ((mean - store.read(T_TRAIN)[idx]) ** 2).mean(axis=1)
    return idx, mean, sq, predictive_variance(store, LOO_VARIANCE)


def recalibration(store: KernelStore | str) -> tuple[np.ndarray, np.ndarray] | None:
    """The variance recalibration of a store (or its path) with leave-one-out predictions: the
    knots of the isotonic map from predictive variance to expected squared error, fitted on
    the leave-one-out points pooled :func:`recalibration_group` to a knot
    (:func:`isotonic_map`); None without them."""
    loo = _loo_errors(KernelStore.open(store) if isinstance(store, str) else store)
    return None if loo is None else _fit_map(*loo)


def _fit_map(idx: np.ndarray, mean: np.ndarray, sq: np.ndarray, var: np.ndarray) -> tuple:
    """The recalibration map's knots from :func:`_loo_errors`' arrays."""
    return isotonic_map(var, sq, recalibration_group(len(idx)))


def recalibrated_variance(store: KernelStore | str) -> np.ndarray | None:
    """The test points' predictive variances through :func:`recalibration`: the squared error
    that training points of the same predictive variance made when left out; None without
    leave-one-out predictions. ``store``: a :class:`KernelStore` or a path.

    >>> recalibrated_variance("fm50k.zarr")  # doctest: +SKIP
    """
    store = KernelStore.open(store) if isinstance(store, str) else store
    knots = recalibration(store)
    return None if knots is None else np.interp(predictive_variance(store), *knots)


def metrics(store: KernelStore, bins: int = 10) -> dict:
    """Accuracy (classification), MSE and the calibration table from the stored posterior:
    test points binned by predictive variance (:func:`predictive_variance`), with their
    recalibrated variances in the same bins (``calibration_recalibrated``), and the
    leave-one-out points' scores and calibration (``loo``); the last two None without
    leave-one-out predictions. The posterior is read checked as complete: a result chunk
    deleted or never written is reported, not scored as its fill value."""
    mean = store.read(MEAN, complete=True)
    y = store.read(Y_TEST)
    labels = y.dtype.kind in "iu"
    truth = targets(y, mean.shape[1]) if labels else y.reshape(len(y), -1)
    sq = ((mean - truth) ** 2).mean(axis=1)
    raw = predictive_variance(store)
    out = {"mse": float(sq.mean()), "calibration": calibration(raw, sq, bins)}
    if labels:
        out["accuracy"] = float((mean.argmax(axis=1) == y).mean())
    loo = _loo_errors(store)
    out["calibration_recalibrated"] = out["loo"] = None
    if loo is not None:
        idx, loo_mean, loo_sq, loo_var = loo
        recal = np.interp(raw, *_fit_map(*loo))
        out["calibration_recalibrated"] = calibration(recal, sq, bins, order_by=raw)
        out["loo"] = {
            "size": len(idx),
            "mse": float(loo_sq.mean()),
            "calibration": calibration(loo_var, loo_sq, bins),
        }
        if labels:
            hits = loo_mean.argmax(axis=1) == store.read(Y_TRAIN)[idx]
            out["loo"]["accuracy"] = float(hits.mean())
    return out
