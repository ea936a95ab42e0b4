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

A store solved by CG has no factor: its predictions solve ``(K + s I) Z = K_D*`` by PCG per
block of test points instead (:func:`predict_test` picks the path from the solve record).
Classification targets are one-hot with 0.9 for the true class and -0.1 elsewhere (Lee et al.);
float targets are regressed as given.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
from distributed import as_completed

from .layout import (
    ALPHA,
    CHOL,
    K_TEST_DIAG,
    K_TEST_TRAIN,
    LAPLACE_SCALE,
    MEAN,
    PREDICT,
    T_TRAIN,
    VARIANCE,
    Y_TEST,
    record,
)
from .progress import progress_bar
from .solvers.cg import StoreSystem
from .solvers.factor import Factor
from .storage import KernelStore, read_checked
from .tiling import span
from .workers import Recorded, TaskContext, store_task

__all__ = [
    "calibration",
    "leading_alpha",
    "log_marginal_likelihood",
    "likelihoods",
    "metrics",
    "output_scale",
    "predict_block_size",
    "predict_test",
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
    clamped = 0
    try:
        for fut in as_completed(futures):
            clamped += fut.result()
            bar.update()
    except BaseException:
        client.cancel(futures)
        raise
    finally:
        bar.close()
    return {"variance_clamped": clamped, "variance_blocks_unconverged": 0}


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


def calibration(variance: np.ndarray, sq_error: np.ndarray, bins: int = 10) -> list[dict]:
    """Test points binned by predicted variance (equal counts): per bin the mean predicted
    variance, the realised mean squared error and the count (Lee et al., figure 4)."""
    order = np.argsort(variance, kind="stable")
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


def predictive_variance(store: KernelStore) -> np.ndarray:
    """The test targets' predictive variance, ``s2 (variance + noise)``, with the prior's
    scale ``s2`` fitted by maximum likelihood when the store was solved (the solve record's
    ``output_scale``; stores solved before it was recorded give the stored variance)."""
    solved = store.meta["solve"]
    var = store.read(VARIANCE, complete=True)
    scale = solved.get("output_scale")
    return var if scale is None else scale * (var + solved["noise_abs"])


def metrics(store: KernelStore, bins: int = 10) -> dict:
    """Accuracy (classification), MSE and the calibration table from the stored posterior:
    test points binned by predictive variance (:func:`predictive_variance`). The posterior is
    read checked as complete: a result chunk deleted or never written is reported, not scored
    as its fill value."""
    mean = store.read(MEAN, complete=True)
    y = store.read(Y_TEST)
    truth = targets(y, mean.shape[1]) if y.dtype.kind in "iu" else y.reshape(len(y), -1)
    sq = ((mean - truth) ** 2).mean(axis=1)
    cal = calibration(predictive_variance(store), sq, bins)
    out = {"mse": float(sq.mean()), "calibration": cal}
    if y.dtype.kind in "iu":
        out["accuracy"] = float((mean.argmax(axis=1) == y).mean())
    return out
