"""The tile mathematics of the solvers: pure functions of NumPy arrays, no store, no cluster.

The tiled Cholesky factorisation (:mod:`nngp_dist.solvers.cholesky`) and the triangular
solves on its factor (:mod:`nngp_dist.solvers.factor`) are built from these; their tasks only
read the tiles from the store and write the results back, so the arithmetic here is tested
directly against SciPy on matrices in memory.
"""

from __future__ import annotations

import numpy as np
from scipy.linalg import cholesky, solve_triangular

from ..tiling import symmetric

__all__ = ["NotPositiveDefinite", "add_jitter", "potrf", "trsm", "update"]


class NotPositiveDefinite(np.linalg.LinAlgError):
    """A non-positive pivot: the matrix plus the current noise is not numerically SPD."""


def add_jitter(tile: np.ndarray, jitter: float) -> np.ndarray:
    """A diagonal tile of K as float64 with ``jitter`` (absolute) added to its diagonal."""
    a = np.array(tile, dtype=np.float64)
    a[np.diag_indices_from(a)] += jitter
    return a


def potrf(a: np.ndarray) -> np.ndarray:
    """The upper Cholesky factor U (U^T U = A) of a diagonal tile whose upper triangle is
    authoritative; :class:`NotPositiveDefinite` on a non-positive pivot."""
    try:
        return cholesky(symmetric(a), lower=False, check_finite=True)
    except np.linalg.LinAlgError as e:
        raise NotPositiveDefinite(str(e)) from None


def trsm(u_kk: np.ndarray, a: np.ndarray) -> np.ndarray:
    """The panel tile ``U_kk^-T A_kj``."""
    return solve_triangular(u_kk, a, trans="T", lower=False, check_finite=False)


def update(a: np.ndarray, u_ki: np.ndarray, u_kj: np.ndarray | None = None) -> np.ndarray:
    """The trailing update ``A_ij - U_ki^T U_kj`` (a SYRK on the diagonal: ``u_kj`` None)."""
    if u_kj is None:
        return a - u_ki.T @ u_ki
    return a - u_ki.T @ u_kj
