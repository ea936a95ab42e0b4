"""The GP posterior from the factor in the store: alpha, means, variances, and metrics.

With ``K + s I = U^T U`` (``chol``, upper tiles; SCIENCE.md section 4):

* ``alpha = U^-1 U^-T T``: a forward then a backward triangular solve, streamed tile by tile by
  one task (the right-hand sides are N x C, small);
* per block of test points: ``mean = K_*D alpha`` and ``var = diag K_** - colsum(W^2)`` with
  ``W = U^-T K_D*``, a forward solve streamed over the factor's tiles, holding only W
  (N x block) and one tile in memory; negative variances (rounding) are clamped at zero and
  counted;
* ``log p(T) = -1/2 sum_c T_c^T alpha_c - C sum log diag U - C N/2 log 2 pi`` (summed over the
  C output columns).

Classification targets are one-hot with 0.9 for the true class and -0.1 elsewhere (Lee et al.);
float targets are regressed as given.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from . import workers
from .storage import KernelStore, solve_block
from .tiling import span

__all__ = [
    "calibration",
    "leading_alpha",
    "metrics",
    "predict_test",
    "predict_test_cg",
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


def _forward(g: Any, t: int, n: int, rhs: list[np.ndarray]) -> list[np.ndarray]:
    """Solve U^T W = B block row by block row; ``rhs`` holds B's row blocks, replaced by W's."""
    from scipy.linalg import solve_triangular  # noqa: PLC0415

    nt = len(rhs)
    for i in range(nt):
        b = rhs[i]
        for m in range(i):
            b -= np.asarray(g["chol"][span(t, n, m), span(t, n, i)]).T @ rhs[m]
        u_ii = np.asarray(g["chol"][span(t, n, i), span(t, n, i)])
        rhs[i] = solve_triangular(u_ii, b, trans="T", lower=False, check_finite=False)
    return rhs


def _solve_alpha(url: str, token: str, t: int, n: int) -> dict:
    """Worker task: alpha = (K + s I)^-1 T from the factor; the LML's two data terms."""
    workers.tune_allocator()
    g = workers.open_group(url, token)
    tt = np.asarray(g["t_train"][...], dtype=np.float64)
    a, logdet_half = leading_alpha(g, t, n, tt)
    g["alpha"][...] = a
    return {"quad": float((tt * a).sum()), "logdet_half": logdet_half}


def leading_alpha(g: Any, t: int, n: int, tt: np.ndarray) -> tuple[np.ndarray, float]:
    """alpha = (K + s I)^-1 T for the first ``n`` training points, and log det(U) for them.

    The factor of a leading block is the leading block of the factor, so any ``n`` up to the
    store's works: the GP on a training subset costs two triangular solves, no new factor.
    """
    from scipy.linalg import solve_triangular  # noqa: PLC0415

    nt = math.ceil(n / t)
    z = _forward(g, t, n, [tt[span(t, n, i)].copy() for i in range(nt)])
    alpha: list[np.ndarray] = [np.empty(0)] * nt
    logdet_half = 0.0
    for i in reversed(range(nt)):
        b = z[i].copy()
        for j in range(i + 1, nt):
            b -= np.asarray(g["chol"][span(t, n, i), span(t, n, j)]) @ alpha[j]
        u_ii = np.asarray(g["chol"][span(t, n, i), span(t, n, i)])
        alpha[i] = solve_triangular(u_ii, b, lower=False, check_finite=False)
        logdet_half += float(np.log(np.diag(u_ii)).sum())
    return np.concatenate(alpha), logdet_half


def _predict_block(url: str, token: str, t: int, n: int, m: int, block: int, b: int) -> int:
    """Worker task: mean and variance of test block ``b``; returns how many were clamped."""
    start = time.perf_counter()
    workers.tune_allocator()
    g = workers.open_group(url, token)
    rows = span(block, m, b)
    nt = math.ceil(n / t)
    k_blocks = [
        np.asarray(g["k_test_train"][rows, span(t, n, j)], dtype=np.float64) for j in range(nt)
    ]
    alpha = np.asarray(g["alpha"][...])
    mean = sum(k_blocks[j] @ alpha[span(t, n, j)] for j in range(nt))
    w = _forward(g, t, n, [kb.T.copy() for kb in k_blocks])
    var = np.asarray(g["k_test_diag"][rows], dtype=np.float64) - sum((wi * wi).sum(0) for wi in w)
    clamped = int((var < 0).sum())
    g["mean"][rows] = mean
    g["variance"][rows] = np.maximum(var, 0.0)
    g["tiles/predict"][b] = max(time.perf_counter() - start, 1e-9)
    return clamped


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


def solve_alpha(store: KernelStore, *, client: Any) -> dict:
    """Write ``alpha`` from the factor; return the log marginal likelihood."""
    meta = store.meta
    n, t = meta["n_train"], solve_block(meta)
    url, token = store.url, workers.store_token(meta)
    c = store.group["t_train"].shape[1]
    key = workers.task_key(url, token, "alpha")
    parts = client.submit(_solve_alpha, url, token, t, n, key=key, pure=False).result()
    lml = -0.5 * parts["quad"] - c * parts["logdet_half"] - 0.5 * c * n * math.log(2 * math.pi)
    return {"log_marginal_likelihood": lml, "output_scale": parts["quad"] / (n * c)}


def output_scale(t_train: np.ndarray, alpha: np.ndarray) -> float:
    """The maximum-likelihood scale ``s2`` of the prior, for targets ``T ~ N(0, s2 (K + s I))``
    column by column: ``tr(T' (K + s I)^-1 T) / (N C)``. The noise is relative to the kernel,
    so scaling the prior leaves the posterior mean unchanged and scales the variances."""
    return float((t_train * alpha).sum() / t_train.size)


def predict_test(store: KernelStore, *, client: Any, progress: bool = True) -> dict:
    """Write ``mean`` and ``variance`` block by block (blocks already recorded are skipped)."""
    from .compute import _progress  # noqa: PLC0415

    meta = store.meta
    n, m, t = meta["n_train"], meta["n_test"], solve_block(meta)
    block = meta["predict_block"]
    url, token = store.url, workers.store_token(meta)
    done = ~np.isnan(store.group["tiles/predict"][...])
    todo = [b for b in range(len(done)) if not done[b]]
    bar = _progress(len(done), int(done.sum()), progress, "predict")
    futures = [
        client.submit(
            _predict_block,
            url,
            token,
            t,
            n,
            m,
            block,
            b,
            pure=False,
            key=workers.task_key(url, token, "predict", b),
        )  # fmt: skip
        for b in todo
    ]
    clamped = 0
    try:
        from distributed import as_completed  # noqa: PLC0415

        for fut in as_completed(futures):
            clamped += fut.result()
            bar.update()
    except BaseException:
        client.cancel(futures)
        raise
    finally:
        bar.close()
    return {"variance_clamped": clamped}


def predict_test_cg(store: KernelStore, *, client: Any, tol: float, maxiter: int,
                    progress: bool = True) -> dict:  # fmt: skip
    """Means and variances without a factor: per block of test points, PCG solves
    ``(K + s I) Z = K_D*`` (one matrix pass per iteration per block, so practical for small test
    sets; the Cholesky path is the one for scale). The block's test rows of the kernel (block x N,
    a thin slab, not a tile) are read by the client."""
    from .compute import _progress  # noqa: PLC0415
    from .solvers.cg import StoreSystem  # noqa: PLC0415

    meta = store.meta
    g = store.group
    m, block = meta["n_test"], meta["predict_block"]
    cg_log = meta["solve"]["cg"]
    system = StoreSystem(store, client, meta["solve"]["noise_abs"], cg_log["preconditioner"])
    alpha = np.asarray(g["alpha"][...])
    done = ~np.isnan(g["tiles/predict"][...])
    bar = _progress(len(done), int(done.sum()), progress, "predict (cg)")
    clamped, unconverged = 0, 0
    try:
        for b in np.flatnonzero(~done):
            start = time.perf_counter()
            rows = span(block, m, int(b))
            slab = np.asarray(g["k_test_train"][rows, :], dtype=np.float64)
            z, log = system.solve(slab.T, tol=tol, maxiter=maxiter)
            unconverged += not log["converged"]
            var = np.asarray(g["k_test_diag"][rows], dtype=np.float64) - (slab.T * z).sum(0)
            clamped += int((var < 0).sum())
            g["mean"][rows] = slab @ alpha
            g["variance"][rows] = np.maximum(var, 0.0)
            g["tiles/predict"][int(b)] = max(time.perf_counter() - start, 1e-9)
            bar.update()
    finally:
        bar.close()
    return {"variance_clamped": clamped, "blocks_unconverged": unconverged}


def calibration(variance: np.ndarray, sq_error: np.ndarray, bins: int = 10) -> list[dict]:
    """Test points binned by predicted variance (equal counts): per bin the mean predicted
    variance, the realised mean squared error and the count (Lee et al., figure 4)."""
    order = np.argsort(variance, kind="stable")
    out = []
    for idx in np.array_split(order, min(bins, len(order))):
        if len(idx):
            out.append({
                "mean_variance": float(variance[idx].mean()),
                "mse": float(sq_error[idx].mean()),
                "count": int(len(idx)),
            })  # fmt: skip
    return out


def predictive_variance(store: KernelStore) -> np.ndarray:
    """The test targets' predictive variance, ``s2 (variance + noise)``, with the prior's
    scale ``s2`` fitted by maximum likelihood when the store was solved (the solve record's
    ``output_scale``; stores solved before it was recorded give the stored variance)."""
    solved = store.meta["solve"]
    var = np.asarray(store.group["variance"][...])
    scale = solved.get("output_scale")
    return var if scale is None else scale * (var + solved["noise_abs"])


def metrics(store: KernelStore, bins: int = 10) -> dict:
    """Accuracy (classification), MSE and the calibration table from the stored posterior:
    test points binned by predictive variance (:func:`predictive_variance`)."""
    g = store.group
    mean = np.asarray(g["mean"][...])
    y = np.asarray(g["y_test"][...])
    truth = targets(y, mean.shape[1]) if y.dtype.kind in "iu" else y.reshape(len(y), -1)
    sq = ((mean - truth) ** 2).mean(axis=1)
    cal = calibration(predictive_variance(store), sq, bins)
    out = {"mse": float(sq.mean()), "calibration": cal}
    if y.dtype.kind in "iu":
        out["accuracy"] = float((mean.argmax(axis=1) == y).mean())
    return out
