"""CPU fast paths for (leaky) ReLU networks: the whole recursion per kernel entry in one
compiled loop, for dense nets and for plain ConvNets with a flattening readout.

The layer-by-layer path (:mod:`.layers`, :mod:`.nonlinearities`, :mod:`.conv`) makes several
passes over memory per layer, and NumPy's ``arctan2`` alone costs about 15 ns per entry on the
2-core dev machine. Here Numba compiles loops that run every layer while the data sit in L1
cache, with ``arccos`` from a polynomial (below) that LLVM vectorises:

- dense: for each row of a tile, every layer over the row; about 6 ns per entry and layer, the
  NTK included;
- conv: for each pair of images, every layer (patch sum, then ReLU) over the pair's (H, W)
  map; about 5.5 ns per map entry against 21 ns layer by layer (``benchmarks/RESULTS.md``).

The layer-by-layer path stays the reference and the path for CuPy arrays, residual and pooled
networks and every other nonlinearity; the tests hold the two equal to 1e-12 and both to the
Monte Carlo oracles.

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
import os
import tempfile
from typing import Any

import numpy as np

__all__ = ["applies", "conv_relu_cross", "dense_relu_cross", "warm"]

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
    """Whether ``spec`` has a compiled loop: (leaky) ReLU dense nets, and (leaky) ReLU ConvNets
    with a flattening readout and no skip connections. Residual and pooled networks, and
    every other activation, take the layer-by-layer path."""
    if spec.activation.spec["name"] not in ("relu", "leaky_relu"):
        return False
    if spec.arch == "fc":
        return True
    plain = not spec.skip_every or spec.depth < 2  # Spec.layers adds no residual block then
    return spec.arch == "conv" and spec.readout == "flatten" and plain


@functools.cache
def _loops() -> Any:
    """The compiled loops' module. numba is imported on first use: the CLI and the client
    never pay for it.

    Numba caches the machine code beside the package or in ``~/.cache/numba``, and refuses
    to load the module when neither is writable (a read-only install on a worker with a
    read-only home, as in containers with a read-only root). Then the cache goes to a folder of
    this user's in the temporary directory, so each process compiles at most once per machine.
    """
    import numba  # noqa: PLC0415

    try:
        from . import _relu_loop  # noqa: PLC0415
    except RuntimeError as e:
        if "cannot cache" not in str(e) or numba.config.CACHE_DIR:
            raise
        uid = os.getuid() if hasattr(os, "getuid") else "user"  # a uid may have no name
        numba.config.CACHE_DIR = os.path.join(tempfile.gettempdir(), f"nngp-dist-numba-{uid}")
        from . import _relu_loop  # noqa: PLC0415

    return _relu_loop


def dense_relu_cross(spec: Any, gram: np.ndarray, var1: np.ndarray, var2: np.ndarray,
                     taps: dict[int, int], out: np.ndarray) -> None:  # fmt: skip
    """Fill ``out[slot]`` with the kernel at each depth ``d`` whose slot is ``taps[d]``.

    ``gram`` (n1, n2), ``var1`` (n1,) and ``var2`` (n2,) are the inputs' covariances (the
    input state of :func:`.layers.input_state`); ``out`` is (len(taps), n1, n2), float64.
    """
    _loops().relu_rows(
        np.ascontiguousarray(gram, dtype=np.float64),
        np.ascontiguousarray(var1, dtype=np.float64).reshape(-1),
        np.ascontiguousarray(var2, dtype=np.float64).reshape(-1),
        spec.weight_var,
        spec.bias_var,
        _alpha(spec),
        spec.depth,
        spec.kernel == "ntk",
        _slots(spec, taps),
        out,
    )


def conv_relu_cross(spec: Any, x1: np.ndarray, x2: np.ndarray, taps: dict[int, int],
                    out: np.ndarray) -> None:  # fmt: skip
    """Fill ``out[slot]`` with a ConvNet's kernel after each depth ``d`` whose slot is
    ``taps[d]``, for the images in the rows of ``x1`` (n1, H W C) and ``x2`` (n2, H W C).

    ``spec`` is a conv spec for which :func:`applies` holds; ``out`` is (len(taps), n1, n2).
    """
    from .conv import ConvGeometry  # noqa: PLC0415

    h, w, channels = spec.image_shape
    g = ConvGeometry(spec.filter_size, spec.stride, spec.dilation, spec.padding)
    geo = np.zeros((spec.depth, 6), dtype=np.int64)
    padded = np.zeros((spec.depth, 2), dtype=np.int64)
    for layer in range(spec.depth):
        (h_out, h_lo, h_hi), (w_out, w_lo, w_hi) = g.axis(h), g.axis(w)
        geo[layer] = h, w, h_out, w_out, h_lo, w_lo
        padded[layer] = h_lo + h + h_hi, w_lo + w + w_hi
        h, w = h_out, w_out
    hp, wp = (int(v) for v in padded.max(axis=0, initial=1))
    _loops().conv_relu_pairs(
        np.ascontiguousarray(x1, dtype=np.float64).reshape(len(x1), -1, channels),
        np.ascontiguousarray(x2, dtype=np.float64).reshape(len(x2), -1, channels),
        geo,
        g.filter_size,
        g.stride,
        g.dilation,
        spec.weight_var,
        spec.bias_var,
        _alpha(spec),
        spec.kernel == "ntk",
        _slots(spec, taps),
        np.zeros((max(spec.depth, 1), hp, wp)),  # zero borders, one per layer
        np.empty((hp, wp)),
        out,
    )


def _alpha(spec: Any) -> float:
    return float(spec.activation.spec.get("alpha", 0.0))


def _slots(spec: Any, taps: dict[int, int]) -> np.ndarray:
    slots = np.full(spec.depth + 1, -1, dtype=np.int64)
    for depth, slot in taps.items():
        slots[depth] = slot
    return slots


def warm() -> None:
    """Import numba and load (or, the first time on a machine, compile) the loops."""
    from .spec import Spec  # noqa: PLC0415

    spec = Spec(depth=1)
    one = np.ones(1)
    dense_relu_cross(spec, np.ones((1, 1)), one, one, {1: 0}, np.empty((1, 1, 1)))
    cnn = Spec(arch="conv", depth=1, image_shape=(2, 2, 1))
    conv_relu_cross(cnn, np.ones((1, 4)), np.ones((1, 4)), {1: 0}, np.empty((1, 1, 1)))
