"""The compiled loop behind :mod:`.fused` (imported on first use: it imports numba).

Compiled once per machine: ``cache=True`` keeps the machine code next to this file (or in
Numba's user cache directory when the package is read-only), so a worker process loads it in
milliseconds instead of compiling for a second.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from .fused import ARCSIN_COEFFICIENTS

# Horner's rule, highest degree first: P's top coefficient, then the rest as a tuple of
# constants, over which Numba unrolls the loop.
_TOP, _HORNER = ARCSIN_COEFFICIENTS[-1], ARCSIN_COEFFICIENTS[-2::-1]
_PI = math.pi
_INV_2PI = 1.0 / (2.0 * math.pi)


@numba.njit(inline="always")
def _arccos(x: float) -> float:
    """``arccos(x)`` for ``x`` in [-1, 1], branch-free enough for LLVM to vectorise."""
    a = abs(x)
    small = a <= 0.5
    z = a * a if small else 0.5 - 0.5 * a
    u = a if small else math.sqrt(z)
    p = _TOP
    for c in _HORNER:
        p = p * z + c
    s = u + u * z * p  # arcsin(u)
    if small:
        return 0.5 * _PI - s if x >= 0.0 else 0.5 * _PI + s
    return 2.0 * s if x >= 0.0 else _PI - 2.0 * s


@numba.njit(cache=True, error_model="numpy")
def arccos(x: np.ndarray, out: np.ndarray) -> None:
    """Elementwise :func:`_arccos` (for the tests)."""
    for i in range(x.size):
        out[i] = _arccos(x[i])


@numba.njit(cache=True, error_model="numpy")
def relu_rows(gram, var1, var2, w, b, alpha, depth, ntk, slots, out):  # noqa: ANN001, PLR0913
    """Dense layer, then ``depth`` x (leaky ReLU, dense layer), for every entry of ``gram``.

    Same recursion as :func:`.layers.dense` and :func:`.nonlinearities.leaky_relu` (ReLU is
    ``alpha = 0``): ``F = alpha k12 + c (s + (pi - t) k12) / (2 pi)`` and
    ``Fdot = alpha + c (pi - t) / (2 pi)``, ``c = (1 - alpha)^2``, ``pi - t = arccos(-rho)``. A pair
    in which either input has zero variance gets ``t = 0``, as ``arctan2(0, 0)`` gives there.
    ``out[slots[d]]`` receives the kernel after ``d`` hidden layers where ``slots[d] >= 0``.
    """
    n1, n2 = gram.shape
    c = (1.0 - alpha) ** 2
    shrink = alpha + 0.5 * c  # the activation's variance is shrink * k
    # Per-layer column quantities: sqrt of the pre-activation variance and its inverse.
    sq2 = np.empty((max(depth, 1), n2))
    inv2 = np.empty((max(depth, 1), n2))
    for j in range(n2):
        q = w * var2[j] + b
        for layer in range(depth):
            sq2[layer, j] = math.sqrt(q)
            inv2[layer, j] = 1.0 / sq2[layer, j] if q > 0.0 else math.inf
            q = w * (shrink * q) + b
    k = np.empty(n2)
    theta = np.empty(n2)
    for i in range(n1):
        for j in range(n2):
            k[j] = w * gram[i, j] + b
            theta[j] = k[j]  # the NTK after the first dense layer equals its NNGP
        if slots[0] >= 0:
            out[slots[0], i] = theta if ntk else k
        q1 = w * var1[i] + b
        for layer in range(depth):
            s1 = math.sqrt(q1)
            i1 = 1.0 / s1 if q1 > 0.0 else math.inf
            for j in range(n2):
                k12 = k[j]
                rho = k12 * i1 * inv2[layer, j]
                if rho != rho:  # 0 * inf: an input of zero variance
                    rho = 1.0
                rho = min(max(rho, -1.0), 1.0)
                pmt = _arccos(-rho)  # pi - t, without cancellation near rho = -1
                sin_t = math.sqrt(max((1.0 - rho) * (1.0 + rho), 0.0))
                f = alpha * k12 + c * _INV_2PI * (s1 * sq2[layer, j] * sin_t + pmt * k12)
                kn = w * f + b
                if ntk:
                    fdot = alpha + c * _INV_2PI * pmt
                    theta[j] = w * (fdot * theta[j]) + kn
                k[j] = kn
            if slots[layer + 1] >= 0:
                out[slots[layer + 1], i] = theta if ntk else k
            q1 = w * (shrink * q1) + b
