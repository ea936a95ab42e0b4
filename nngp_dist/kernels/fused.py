"""CPU fast path for dense (leaky) ReLU networks: the whole recursion per kernel entry in one
compiled loop.

The layer-by-layer path (:mod:`.layers`, :mod:`.nonlinearities`) makes several passes over
memory per layer, and NumPy's ``arctan2`` alone costs about 15 ns per entry on the 2-core dev
machine. Here Numba compiles one loop that, for each row of a tile, runs every layer over the
row while it sits in L1 cache, with ``arccos`` from a polynomial (below) that LLVM vectorises:
about 6 ns per entry per layer, all layers and the NTK included (``benchmarks/RESULTS.md``).
The layer-by-layer path stays the reference and the path for CuPy arrays and every other
nonlinearity; the tests hold the two equal to 1e-13 and both to the Monte Carlo oracles.

``arccos``: with ``a = |x|``, ``arcsin`` on ``[0, 1/2]`` is ``a + a z P(z)`` with ``z = a^2``,
and on ``(1/2, 1]`` ``arccos(a) = 2 arcsin(sqrt(z))`` with ``z = (1 - a) / 2`` (exact in
floating point there): one polynomial ``P`` on ``z`` in ``[0, 1/4]``, the argument reduction of
Cephes' ``asin``. ``P`` is fitted here, at import, by least squares at Chebyshev nodes to the
arcsine's Taylor series (positive terms, summed to 80 of them, so the values are exact to
rounding); degree 12 holds ``P`` to 7e-16 relative, and arccos is within 4.5e-16 of NumPy's over
``[-1, 1]`` (tests/test_kernels.py).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

__all__ = ["applies", "dense_relu_cross", "warm"]

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


ARCSIN_COEFFICIENTS = _fit()


def applies(spec: Any) -> bool:
    """Whether ``spec`` has a compiled loop: dense nets with ReLU or leaky ReLU."""
    return spec.arch == "fc" and spec.activation.spec["name"] in ("relu", "leaky_relu")


@functools.cache
def _loop() -> Any:
    # numba is imported on first use: the CLI and the client never pay for it.
    from . import _relu_loop  # noqa: PLC0415

    return _relu_loop.relu_rows


def dense_relu_cross(spec: Any, gram: np.ndarray, var1: np.ndarray, var2: np.ndarray,
                     taps: dict[int, int], out: np.ndarray) -> None:  # fmt: skip
    """Fill ``out[slot]`` with the kernel at each depth ``d`` whose slot is ``taps[d]``.

    ``gram`` (n1, n2), ``var1`` (n1,) and ``var2`` (n2,) are the inputs' covariances (the
    input state of :func:`.layers.input_state`); ``out`` is (len(taps), n1, n2), float64.
    """
    slots = np.full(spec.depth + 1, -1, dtype=np.int64)
    for depth, slot in taps.items():
        slots[depth] = slot
    alpha = float(spec.activation.spec.get("alpha", 0.0))
    _loop()(
        np.ascontiguousarray(gram, dtype=np.float64),
        np.ascontiguousarray(var1, dtype=np.float64).reshape(-1),
        np.ascontiguousarray(var2, dtype=np.float64).reshape(-1),
        spec.weight_var,
        spec.bias_var,
        alpha,
        spec.depth,
        spec.kernel == "ntk",
        slots,
        out,
    )


def warm() -> None:
    """Import numba and load (or, the first time on a machine, compile) the loop."""
    from .spec import Spec  # noqa: PLC0415

    spec = Spec(depth=1)
    one = np.ones(1)
    dense_relu_cross(spec, np.ones((1, 1)), one, one, {1: 0}, np.empty((1, 1, 1)))
