"""Preconditioned conjugate gradients over the kernel store, for when no factor is wanted.

The algorithm sees the matrix only through ``matvec`` and the preconditioner only through
``precond`` (Falkon's layout). Columns of the right-hand side are independent systems solved
together; each has its own step sizes::

    x = 0, r = b, z = M^-1 r, p = z
    repeat:
        q = A p
        a = (r . z) / (p . q)                  per column
        x += a p;  r -= a q
        every `recompute` iterations: r = b - A x   (the true residual, against drift)
        stop when |r_c| <= tol |b_c| for every column c
        z_new = M^-1 r;  beta = (r . z_new) / (r_old . z_old);  p = z_new + beta p

On the store, ``A = K + s I`` is applied by one task per block row of tiles (each reads the row's
upper tiles once and uses each both ways, K_ij v_j and K_ij^T v_i); the vectors (N x C) travel,
the tiles do not. Preconditioners: Nystrom (the default: landmarks = the first tile's points,
their columns kept in the store as ``cg_nystrom``, applied by Woodbury's identity), or
block-Jacobi (the diagonal tiles' Cholesky factors, kept as ``cg_blockjacobi``), or none.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .. import workers
from ..storage import KernelStore, solve_block
from ..tiling import span

__all__ = ["PRECONDITIONERS", "StoreSystem", "block_jacobi", "nystrom", "pcg", "store_operator"]

Operator = Callable[[np.ndarray], np.ndarray]


def pcg(
    matvec: Operator,
    b: np.ndarray,
    *,
    precond: Operator | None = None,
    tol: float = 1e-8,
    maxiter: int = 1000,
    recompute: int = 25,
) -> tuple[np.ndarray, dict]:
    """Solve ``A x = b`` (b: (N,) or (N, C)) for symmetric positive definite A.

    Returns ``x`` and a log: ``iterations``, ``converged``, ``residuals`` (the largest relative
    residual per iteration) and ``true_residual`` (recomputed at the end).

    Examples
    --------
    >>> import numpy as np
    >>> a = np.array([[4.0, 1.0], [1.0, 3.0]])
    >>> x, log = pcg(lambda v: a @ v, np.array([1.0, 2.0]))
    >>> bool(np.allclose(a @ x, [1.0, 2.0])), log["converged"]
    (True, True)
    """
    squeeze = b.ndim == 1
    b = b.reshape(len(b), -1).astype(np.float64)
    m = precond if precond is not None else (lambda v: v.copy())
    norm_b = np.linalg.norm(b, axis=0)
    norm_b[norm_b == 0] = 1.0
    x = np.zeros_like(b)
    r = b.copy()
    z = m(r)
    p = z.copy()
    rz = (r * z).sum(0)
    residuals = []
    converged = False
    it = 0
    for it in range(1, maxiter + 1):
        q = matvec(p)
        pq = (p * q).sum(0)
        a = np.where(pq > 0, rz / np.where(pq > 0, pq, 1.0), 0.0)
        x += a * p
        if it % recompute == 0:
            r = b - matvec(x)
        else:
            r -= a * q
        rel = float((np.linalg.norm(r, axis=0) / norm_b).max())
        residuals.append(rel)
        if rel <= tol:
            converged = True
            break
        z = m(r)
        rz_new = (r * z).sum(0)
        p = z + (rz_new / np.where(rz != 0, rz, 1.0)) * p
        rz = rz_new
    true = float((np.linalg.norm(b - matvec(x), axis=0) / norm_b).max())
    log = {"iterations": it, "converged": converged and true <= 10 * tol,
           "residuals": residuals, "true_residual": true, "tol": tol}  # fmt: skip
    return (x[:, 0] if squeeze else x), log


# --- the operator and preconditioner on the store (tasks on workers) ---------------------------


def _row_product(url: str, token: str, t: int, n: int, i: int, v: np.ndarray, noise: float) -> dict:
    """Block row i's share of (K + s I) v: {block j: partial product}."""
    workers.tune_allocator()
    g = workers.open_group(url, token)
    k = g["k_train_train"]
    nt = math.ceil(n / t)
    rows = span(t, n, i)
    out = {i: noise * v[rows]}
    for j in range(i, nt):
        cols = span(t, n, j)
        tile = np.asarray(k[rows, cols], dtype=np.float64)
        if i == j:
            tile = np.triu(tile) + np.triu(tile, 1).T
            out[i] += tile @ v[rows]
        else:
            out[i] += tile @ v[cols]
            out[j] = tile.T @ v[rows]
    return out


def _bj_factor(url: str, token: str, t: int, n: int, i: int, noise: float) -> None:
    from scipy.linalg import cholesky  # noqa: PLC0415

    workers.tune_allocator()
    g = workers.open_group(url, token)
    rows = span(t, n, i)
    a = np.asarray(g["k_train_train"][rows, rows], dtype=np.float64)
    a = np.triu(a) + np.triu(a, 1).T
    a[np.diag_indices_from(a)] += noise
    g["cg_blockjacobi"][rows, : rows.stop - rows.start] = cholesky(a, lower=True)


def _bj_apply(url: str, token: str, t: int, n: int, i: int, r: np.ndarray) -> np.ndarray:
    from scipy.linalg import cho_solve  # noqa: PLC0415

    g = workers.open_group(url, token)
    rows = span(t, n, i)
    low = np.asarray(g["cg_blockjacobi"][rows, : rows.stop - rows.start])
    return cho_solve((low, True), r, check_finite=False)


def store_operator(store: KernelStore, client: Any, noise: float) -> Operator:
    """``v -> (K + s I) v`` with K the stored kernel, one task per block row."""
    meta = store.meta
    n, t = meta["n_train"], solve_block(meta)
    url, token = store.url, workers.store_token(meta)
    nt = math.ceil(n / t)

    def matvec(v: np.ndarray) -> np.ndarray:
        vf = client.scatter(v, broadcast=True, hash=False)
        futures = [client.submit(_row_product, url, token, t, n, i, vf, noise, pure=False)
                   for i in range(nt)]  # fmt: skip
        out = np.zeros_like(v)
        for fut in futures:
            for j, part in fut.result().items():
                out[span(t, n, j)] += part
        return out

    return matvec


def block_jacobi(store: KernelStore, client: Any, noise: float) -> Operator:
    """The block-Jacobi preconditioner: ``(K_ii + s I)^-1`` on each block, factors in the store."""
    meta = store.meta
    n, t = meta["n_train"], solve_block(meta)
    url, token = store.url, workers.store_token(meta)
    nt = math.ceil(n / t)
    store.group.create_array("cg_blockjacobi", shape=(n, min(t, n)), chunks=(t, min(t, n)),
                             dtype="float64", fill_value=np.nan, compressors=None,
                             dimension_names=("train", "block_col"), overwrite=True)  # fmt: skip
    client.gather([client.submit(_bj_factor, url, token, t, n, i, noise, pure=False)
                   for i in range(nt)])  # fmt: skip

    def apply(r: np.ndarray) -> np.ndarray:
        futures = [client.submit(_bj_apply, url, token, t, n, i, r[span(t, n, i)], pure=False)
                   for i in range(nt)]  # fmt: skip
        return np.concatenate(client.gather(futures))

    return apply


def _ny_columns(url: str, token: str, t: int, n: int, i: int) -> np.ndarray:
    """Worker task: C_i = K[block i, landmarks] (the landmarks are block 0), kept in the store;
    returns C_i^T C_i."""
    workers.tune_allocator()
    g = workers.open_group(url, token)
    r = span(t, n, 0)
    tile = np.asarray(g["k_train_train"][r, span(t, n, i)], dtype=np.float64)
    c_i = (np.triu(tile) + np.triu(tile, 1).T) if i == 0 else tile.T
    g["cg_nystrom"][span(t, n, i), :] = c_i
    return c_i.T @ c_i


def _ny_project(url: str, token: str, t: int, n: int, i: int, r_i: np.ndarray) -> np.ndarray:
    g = workers.open_group(url, token)
    return np.asarray(g["cg_nystrom"][span(t, n, i), :]).T @ r_i


def _ny_expand(url: str, token: str, t: int, n: int, i: int, y: np.ndarray) -> np.ndarray:
    g = workers.open_group(url, token)
    return np.asarray(g["cg_nystrom"][span(t, n, i), :]) @ y


def nystrom(store: KernelStore, client: Any, noise: float) -> Operator:
    """The Nystrom preconditioner ``(C W^-1 C^T + s I)^-1`` with the first tile's points as
    landmarks (C = K[:, landmarks], W = K[landmarks, landmarks]), applied by Woodbury's
    identity: ``(r - C (s W + C^T C)^-1 C^T r) / s``. It captures the kernel's large low-rank
    part, which block-Jacobi misses (measured on real kernels: benchmarks/RESULTS.md)."""
    from scipy.linalg import cho_factor, cho_solve  # noqa: PLC0415

    meta = store.meta
    n, t = meta["n_train"], solve_block(meta)
    url, token = store.url, workers.store_token(meta)
    nt, r = math.ceil(n / t), min(t, n)
    store.group.create_array("cg_nystrom", shape=(n, r), chunks=(t, r), dtype="float64",
                             fill_value=np.nan, compressors=None,
                             dimension_names=("train", "landmark"), overwrite=True)  # fmt: skip
    from distributed import as_completed  # noqa: PLC0415

    gram = np.zeros((r, r))
    for fut in as_completed(
        [client.submit(_ny_columns, url, token, t, n, i, pure=False) for i in range(nt)]
    ):
        gram += fut.result()  # summed as they come: one r x r matrix at a time in memory
    w = np.asarray(store.group["cg_nystrom"][0:r, :])
    inner = cho_factor(noise * w + gram, lower=True, check_finite=False)

    def apply(v: np.ndarray) -> np.ndarray:
        parts = [client.submit(_ny_project, url, token, t, n, i, v[span(t, n, i)], pure=False)
                 for i in range(nt)]  # fmt: skip
        y = cho_solve(inner, np.sum(client.gather(parts), axis=0), check_finite=False)
        yf = client.scatter(y, broadcast=True, hash=False)
        back = client.gather([client.submit(_ny_expand, url, token, t, n, i, yf, pure=False)
                              for i in range(nt)])  # fmt: skip
        return (v - np.concatenate(back)) / noise

    return apply


PRECONDITIONERS = {"none": None, "block-jacobi": block_jacobi, "nystrom": nystrom}


class StoreSystem:
    """``K + s I`` on the store with its preconditioner, built once, solved for many b."""

    def __init__(self, store: KernelStore, client: Any, noise: float, precond: str = "nystrom"):
        if precond not in PRECONDITIONERS:
            raise ValueError(
                f"unknown preconditioner {precond!r}; choose one of {', '.join(PRECONDITIONERS)}"
            )
        self.precond_name = precond
        self.matvec = store_operator(store, client, noise)
        make = PRECONDITIONERS[precond]
        self.precond = make(store, client, noise) if make is not None else None

    def solve(self, b: np.ndarray, *, tol: float, maxiter: int) -> tuple[np.ndarray, dict]:
        """``(K + s I)^-1 b`` by PCG; the log records seconds and the preconditioner."""
        start = time.perf_counter()
        x, log = pcg(self.matvec, b, precond=self.precond, tol=tol, maxiter=maxiter)
        log.update(preconditioner=self.precond_name, seconds=round(time.perf_counter() - start, 3))
        return x, log
