"""The Cholesky factor in the store, behind a small interface: forward and backward
triangular solves, solve, log-determinant.

With ``K + s I = U^T U`` (``chol``: upper blocks of edge ``t``), every operation streams the
factor one block at a time, holding only the right-hand sides (N x columns) and one block in
memory. The factor of a leading block of K is the leading block of U, so a :class:`Factor`
over the first ``n`` training points (any ``n`` up to the store's) is the factor of their
kernel plus the same jitter: the GP on a training subset costs two triangular solves.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.linalg import solve_triangular

from ..storage import read_checked
from ..tiling import span

__all__ = ["Factor"]


class Factor:
    """``U`` with ``U^T U = K + s I`` for the first ``n`` training points, read in blocks of
    edge ``t`` from ``chol`` (the store's ``chol`` array, or any 2-D array of the factor)."""

    def __init__(self, chol: Any, t: int, n: int, url: str | None = None) -> None:
        self._chol = chol
        self.t, self.n = t, n
        self.url = url  # the store's, for the message of a bad block
        self.blocks = math.ceil(n / t)

    def _span(self, k: int) -> slice:
        return span(self.t, self.n, k)

    def block(self, i: int, j: int) -> np.ndarray:
        """The factor's block (i, j), i <= j (from the store: checked, see
        :func:`~nngp_dist.storage.read_checked`)."""
        return read_checked(self._chol, (self._span(i), self._span(j)), url=self.url)

    def split(self, b: np.ndarray) -> list[np.ndarray]:
        """``b``'s row blocks, copied (the solves work on them in place)."""
        return [b[self._span(i)].copy() for i in range(self.blocks)]

    def forward(self, rhs: list[np.ndarray], start: int = 0) -> list[np.ndarray]:
        """Solve ``U^T W = B`` block row by block row; ``rhs`` holds B's row blocks (as
        :meth:`split` gives them) and is replaced by W's. With ``start``, B's rows before block
        ``start`` are zero, and so are W's (``U^T`` is lower triangular): ``rhs`` holds the
        blocks from ``start`` on, and the factor's rows before it are never read."""
        for k, i in enumerate(range(start, self.blocks)):
            b = rhs[k]
            for m in range(start, i):
                b -= self.block(m, i).T @ rhs[m - start]
            rhs[k] = solve_triangular(
                self.block(i, i), b, trans="T", lower=False, check_finite=False
            )
        return rhs

    def backward(self, z: list[np.ndarray]) -> tuple[np.ndarray, float]:
        """Solve ``U X = Z`` (``z``: row blocks); returns X and ``log det U``."""
        x: list[np.ndarray] = [np.empty(0)] * self.blocks
        logdet_u = 0.0
        for i in reversed(range(self.blocks)):
            b = z[i].copy()
            for j in range(i + 1, self.blocks):
                b -= self.block(i, j) @ x[j]
            u_ii = self.block(i, i)
            x[i] = solve_triangular(u_ii, b, lower=False, check_finite=False)
            logdet_u += float(np.log(np.diag(u_ii)).sum())
        return np.concatenate(x), logdet_u

    def solve(self, b: np.ndarray) -> tuple[np.ndarray, float]:
        """``(K + s I)^-1 b`` and ``log det(K + s I)``, by a forward and a backward solve."""
        x, logdet_u = self.backward(self.forward(self.split(b)))
        return x, 2.0 * logdet_u
