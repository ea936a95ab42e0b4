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

import time
from collections.abc import Callable
from typing import Any

import numpy as np
from distributed import as_completed
from scipy.linalg import cho_factor, cho_solve, cholesky

from ..layout import CG_BLOCKJACOBI, CG_NYSTROM, K_TRAIN_TRAIN
from ..storage import KernelStore, read_checked
from ..tiling import symmetric
from ..workers import TaskContext, store_task
from .tiles import add_jitter

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
    log = {
        "iterations": it,
        "converged": converged and true <= 10 * tol,
        "residuals": residuals,
        "true_residual": true,
        "tol": tol,
    }
    return (x[:, 0] if squeeze else x), log


# --- the operator and preconditioner on the store (tasks on workers) ---------------------------


def _tile(ctx: TaskContext, k: Any, rows: slice, cols: slice, diagonal: bool) -> np.ndarray:
    """A block of the stored kernel as float64, checked (a diagonal one: its upper half)."""
    tile = read_checked(k, (rows, cols), url=ctx.url, complete="upper" if diagonal else True)
    return np.asarray(tile, dtype=np.float64)


@store_task
def _row_product(ctx: TaskContext, g: Any, i: int, v: np.ndarray, jitter: float) -> dict:
    """Block row i's share of (K + s I) v: {block j: partial product}."""
    k = g[K_TRAIN_TRAIN]
    rows = ctx.span(i)
    out = {i: jitter * v[rows]}
    for j in range(i, ctx.blocks):
        cols = ctx.span(j)
        tile = _tile(ctx, k, rows, cols, i == j)
        if i == j:
            out[i] += symmetric(tile) @ v[rows]
        else:
            out[i] += tile @ v[cols]
            out[j] = tile.T @ v[rows]
    return out


@store_task
def _bj_factor(ctx: TaskContext, g: Any, i: int, jitter: float) -> None:
    rows = ctx.span(i)
    a = add_jitter(symmetric(_tile(ctx, g[K_TRAIN_TRAIN], rows, rows, True)), jitter)
    g[CG_BLOCKJACOBI][rows, : rows.stop - rows.start] = cholesky(a, lower=True)


@store_task
def _bj_apply(ctx: TaskContext, g: Any, i: int, r: np.ndarray) -> np.ndarray:
    rows = ctx.span(i)
    low = read_checked(g[CG_BLOCKJACOBI], (rows, slice(0, rows.stop - rows.start)), url=ctx.url)
    return cho_solve((low, True), r, check_finite=False)


def store_operator(store: KernelStore, client: Any, jitter: float) -> Operator:
    """``v -> (K + s I) v`` with K the stored kernel, one task per block row."""
    ctx = TaskContext.of(store)

    def matvec(v: np.ndarray) -> np.ndarray:
        vf = client.scatter(v, broadcast=True, hash=False)
        futures = [
            client.submit(_row_product, ctx, i, vf, jitter, pure=False) for i in range(ctx.blocks)
        ]
        out = np.zeros_like(v)
        for fut in futures:
            for j, part in fut.result().items():
                out[ctx.span(j)] += part
        return out

    return matvec


def block_jacobi(store: KernelStore, client: Any, jitter: float) -> Operator:
    """The block-Jacobi preconditioner: ``(K_ii + s I)^-1`` on each block, factors in the store."""
    ctx = TaskContext.of(store)
    store.create_scratch(CG_BLOCKJACOBI, min(ctx.t, ctx.n))
    client.gather(
        [client.submit(_bj_factor, ctx, i, jitter, pure=False) for i in range(ctx.blocks)]
    )

    def apply(r: np.ndarray) -> np.ndarray:
        futures = [
            client.submit(_bj_apply, ctx, i, r[ctx.span(i)], pure=False) for i in range(ctx.blocks)
        ]
        return np.concatenate(client.gather(futures))

    return apply


@store_task
def _ny_columns(ctx: TaskContext, g: Any, i: int) -> np.ndarray:
    """Worker task: C_i = K[block i, landmarks] (the landmarks are block 0), kept in the store;
    returns C_i^T C_i."""
    tile = _tile(ctx, g[K_TRAIN_TRAIN], ctx.span(0), ctx.span(i), i == 0)
    c_i = symmetric(tile) if i == 0 else tile.T
    g[CG_NYSTROM][ctx.span(i), :] = c_i
    return c_i.T @ c_i


@store_task
def _ny_project(ctx: TaskContext, g: Any, i: int, r_i: np.ndarray) -> np.ndarray:
    return read_checked(g[CG_NYSTROM], (ctx.span(i), slice(None)), url=ctx.url).T @ r_i


@store_task
def _ny_expand(ctx: TaskContext, g: Any, i: int, y: np.ndarray) -> np.ndarray:
    return read_checked(g[CG_NYSTROM], (ctx.span(i), slice(None)), url=ctx.url) @ y


def nystrom(store: KernelStore, client: Any, jitter: float) -> Operator:
    """The Nystrom preconditioner ``(C W^-1 C^T + s I)^-1`` with the first tile's points as
    landmarks (C = K[:, landmarks], W = K[landmarks, landmarks]), applied by Woodbury's
    identity: ``(r - C (s W + C^T C)^-1 C^T r) / s``. It captures the kernel's large low-rank
    part, which block-Jacobi misses (measured on real kernels: benchmarks/RESULTS.md)."""
    ctx = TaskContext.of(store)
    nt, r = ctx.blocks, min(ctx.t, ctx.n)
    columns = store.create_scratch(CG_NYSTROM, r)
    gram = np.zeros((r, r))
    for fut in as_completed([client.submit(_ny_columns, ctx, i, pure=False) for i in range(nt)]):
        gram += fut.result()  # summed as they come: one r x r matrix at a time in memory
    w = np.asarray(columns[0:r, :])
    inner = cho_factor(jitter * w + gram, lower=True, check_finite=False)

    def apply(v: np.ndarray) -> np.ndarray:
        parts = [client.submit(_ny_project, ctx, i, v[ctx.span(i)], pure=False) for i in range(nt)]
        y = cho_solve(inner, np.sum(client.gather(parts), axis=0), check_finite=False)
        yf = client.scatter(y, broadcast=True, hash=False)
        back = client.gather([client.submit(_ny_expand, ctx, i, yf, pure=False) for i in range(nt)])
        return (v - np.concatenate(back)) / jitter

    return apply


PRECONDITIONERS = {"none": None, "block-jacobi": block_jacobi, "nystrom": nystrom}


class StoreSystem:
    """``K + s I`` on the store (``jitter`` = s, absolute) with its preconditioner, built once,
    solved for many b."""

    def __init__(self, store: KernelStore, client: Any, jitter: float, precond: str = "nystrom"):
        if precond not in PRECONDITIONERS:
            raise ValueError(
                f"unknown preconditioner {precond!r}; choose one of {', '.join(PRECONDITIONERS)}"
            )
        self.precond_name = precond
        self.matvec = store_operator(store, client, jitter)
        make = PRECONDITIONERS[precond]
        self.precond = make(store, client, jitter) if make is not None else None

    def solve(self, b: np.ndarray, *, tol: float, maxiter: int) -> tuple[np.ndarray, dict]:
        """``(K + s I)^-1 b`` by PCG; the log records seconds and the preconditioner."""
        start = time.perf_counter()
        x, log = pcg(self.matvec, b, precond=self.precond, tol=tol, maxiter=maxiter)
        log.update(preconditioner=self.precond_name, seconds=round(time.perf_counter() - start, 3))
        return x, log
