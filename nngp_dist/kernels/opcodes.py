"""What the compiled loops import: the conv program's opcodes and the arcsine's coefficients.

A leaf module (NumPy only), so that the loops (:mod:`._relu_loop` on CPUs,
:mod:`._gpu_program` on GPUs) and the module that lowers a network to them (:mod:`.fused`)
share these constants without importing each other.

Opcodes: the operations of a lowered image network (:class:`.fused.ConvProgram`), one per row
of its ``ops`` array, column 0.

``arccos``: with ``a = |x|``, ``arcsin`` on ``[0, 1/2]`` is ``a + a z P(z)`` with ``z = a^2``,
and on ``(1/2, 1]`` ``arccos(a) = 2 arcsin(sqrt(z))`` with ``z = (1 - a) / 2`` (exact in
floating point there): one polynomial ``P`` on ``z`` in ``[0, 1/4]``, the argument reduction of
Cephes' ``asin``. ``P`` is fitted here, at import, by least squares at Chebyshev nodes to the
arcsine's Taylor series (positive terms, summed to 80 of them, so the values are exact to
rounding); degree 12 holds ``P`` to 7e-16 relative, and arccos is within 4.5e-16 of NumPy's over
``[-1, 1]`` (tests/test_kernels.py).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["ADD", "ARCSIN_COEFFICIENTS", "CONV", "RELU", "TAP"]

# The operations of a lowered conv program, as the compiled loops read them.
CONV, RELU, ADD, TAP = 0, 1, 2, 3

_DEGREE = 12


def _arcsin_series(z: np.ndarray) -> np.ndarray:
    """``(arcsin(sqrt z) - sqrt z) / z^(3/2)``: the arcsine's Taylor series past its first term."""
    out = np.zeros_like(z)
    for n in range(80, 0, -1):
        out = out * z + math.comb(2 * n, n) / 4**n / (2 * n + 1)
    return out


def _fit() -> tuple[float, ...]:
    nodes = 0.125 + 0.125 * np.cos(np.pi * (np.arange(64) + 0.5) / 64)
    poly = np.polynomial.Polynomial.fit(
        nodes, _arcsin_series(nodes), _DEGREE, domain=[0.0, 0.25], window=[0.0, 0.25]
    )
    return tuple(float(c) for c in poly.coef)


# P's coefficients, lowest degree first.
ARCSIN_COEFFICIENTS = _fit()
