"""The compiled loops behind :mod:`.fused` (imported on first use: it imports numba).

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


@numba.njit(inline="always")
def _relu(k12, q1, q2, i1, i2, alpha, c):  # noqa: ANN001, ANN202
    """``(F, Fdot)`` of (leaky) ReLU for covariance ``k12`` of inputs of variances ``q1``, ``q2``
    (``i1``, ``i2``: their inverse square roots, inf for zero), as in
    :func:`.nonlinearities.leaky_relu`: ``F = alpha k12 + c (s + (pi - t) k12) / (2 pi)``,
    ``Fdot = alpha + c (pi - t) / (2 pi)``, ``c = (1 - alpha)^2``, ``s = sqrt(q1 q2 - k12^2)``.

    ``pi - t = arccos(-rho)``, without cancellation near rho = -1. Where ``s`` is zero (an
    image with itself or its negative, or an input of zero variance), rho is exactly +-1, as
    the reference's ``arctan2(s, k12)`` has it, rather than ``k12 i1 i2`` rounded: near +-1 the
    arccos would turn that rounding into ~1e-8. At rho = 1, ``F = (alpha + c / 2) k12`` is
    computed as the variance recursion computes ``F(q, q, q)``, so an image paired with itself
    stays exactly at rho = 1 through every layer, as its diagonal does."""
    d = q1 * q2 - k12 * k12
    if d <= 0.0:  # F is then the activation's variance map (k12 >= 0) or alpha k12, exactly
        if k12 >= 0.0:
            return (alpha + 0.5 * c) * k12, alpha + 0.5 * c
        return alpha * k12, alpha
    rho = min(max(k12 * i1 * i2, -1.0), 1.0)
    pmt = _arccos(-rho)
    # s from rho, not sqrt(d): s and pi - t then carry the same rounding of t, to which F is
    # insensitive near t = 0 (its derivative in t vanishes there); sqrt(d) would not cancel.
    s = (q1 * i1) * (q2 * i2) * math.sqrt(max((1.0 - rho) * (1.0 + rho), 0.0))
    f = alpha * k12 + c * _INV_2PI * (s + pmt * k12)
    return f, alpha + c * _INV_2PI * pmt


@numba.njit(cache=True, error_model="numpy")
def arccos(x: np.ndarray, out: np.ndarray) -> None:
    """Elementwise :func:`_arccos` (for the tests)."""
    for i in range(x.size):
        out[i] = _arccos(x[i])


@numba.njit(cache=True, error_model="numpy")
def relu_rows(gram, var1, var2, w, b, alpha, depth, ntk, slots, out):  # noqa: ANN001, PLR0913
    """Dense layer, then ``depth`` x (leaky ReLU, dense layer), for every entry of ``gram``.

    Same recursion as :func:`.layers.dense` and :func:`.nonlinearities.leaky_relu` (ReLU is
    ``alpha = 0``), one entry at a time by :func:`_relu`.
    ``out[slots[d]]`` receives the kernel after ``d`` hidden layers where ``slots[d] >= 0``.
    """
    n1, n2 = gram.shape
    c = (1.0 - alpha) ** 2
    shrink = alpha + 0.5 * c  # the activation's variance is shrink * k
    # Per-layer column quantities: the pre-activation variance and its inverse square root.
    q2 = np.empty((max(depth, 1), n2))
    inv2 = np.empty((max(depth, 1), n2))
    for j in range(n2):
        q = w * var2[j] + b
        for layer in range(depth):
            q2[layer, j] = q
            inv2[layer, j] = 1.0 / math.sqrt(q) if q > 0.0 else math.inf
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
            i1 = 1.0 / math.sqrt(q1) if q1 > 0.0 else math.inf
            for j in range(n2):
                f, fdot = _relu(k[j], q1, q2[layer, j], i1, inv2[layer, j], alpha, c)
                kn = w * f + b
                if ntk:
                    theta[j] = w * (fdot * theta[j]) + kn
                k[j] = kn
            if slots[layer + 1] >= 0:
                out[slots[layer + 1], i] = theta if ntk else k
            q1 = w * (shrink * q1) + b


@numba.njit(inline="always")
def _box(src, geo, pad, rowsum, k, s, d, scale, shift, dst):  # noqa: ANN001, PLR0913
    """``dst = shift + scale * (sum over the k x k taps of src)``: one conv layer's patch sum
    on a flat map, with ``geo`` the layer's (H in, W in, H out, W out, zeros before along H,
    along W). Through ``pad``, whose border is zero and stays so (only the interior is
    written), and ``rowsum``: along each row first, then down the columns."""
    hin, win, hout, wout, lo_h, lo_w = geo[0], geo[1], geo[2], geo[3], geo[4], geo[5]
    for h in range(hin):
        for x in range(win):
            pad[lo_h + h, lo_w + x] = src[h * win + x]
    for h in range(pad.shape[0]):
        for x in range(wout):
            rowsum[h, x] = 0.0
        for t in range(k):
            for x in range(wout):
                rowsum[h, x] += pad[h, x * s + t * d]
    for g in range(hout):
        row = g * wout
        for x in range(wout):
            dst[row + x] = 0.0
        for t in range(k):
            for x in range(wout):
                dst[row + x] += rowsum[g * s + t * d, x]
        for x in range(wout):
            dst[row + x] = shift + scale * dst[row + x]


@numba.njit(inline="always")
def _pixel_covariance(x1, i, x2, j, out):  # noqa: ANN001
    """``out[p] = <x1[i, p], x2[j, p]> / channels``: the same arithmetic for a pair and for an
    image with itself, so an image paired with itself starts exactly at its variance map."""
    channels = x1.shape[2]
    for p in range(x1.shape[1]):
        acc = 0.0
        for ch in range(channels):
            acc += x1[i, p, ch] * x2[j, p, ch]
        out[p] = acc / channels


@numba.njit(cache=True, error_model="numpy")
def _conv_variances(x, geo, k, s, d, w, b, shrink, pads, rowsum):  # noqa: ANN001, PLR0913
    """Each image's pre-activation variance per layer and pixel, and its inverse square root
    (inf where it is zero): the diagonal recursion, ``v -> b + w patch-mean(shrink v)``."""
    n, hw0 = x.shape[0], x.shape[1]
    depth = geo.shape[0]
    var = np.zeros((n, max(depth, 1), hw0))
    inv = np.zeros((n, max(depth, 1), hw0))
    v = np.empty(hw0)
    q = np.empty(hw0)
    scale = w / (k * k)
    for i in range(n):
        _pixel_covariance(x, i, x, i, v)
        for layer in range(depth):
            _box(v, geo[layer], pads[layer], rowsum, k, s, d, scale, b, q)
            for p in range(geo[layer, 2] * geo[layer, 3]):
                var[i, layer, p] = q[p]
                inv[i, layer, p] = 1.0 / math.sqrt(q[p]) if q[p] > 0.0 else math.inf
                v[p] = shrink * q[p]
    return var, inv


@numba.njit(cache=True, error_model="numpy")
def conv_relu_pairs(x1, x2, geo, k, s, d, w, b, alpha, ntk, slots, pads, rowsum, out):  # noqa: ANN001, PLR0913
    """ConvNet GP/NTK with a flattening dense readout, every pair of images of ``x1`` (n1,
    pixels, channels) and ``x2``: ``depth`` x (conv, leaky ReLU), then the readout.

    Same recursion as :func:`.conv.conv`, :func:`.nonlinearities.leaky_relu` and
    :func:`.conv.flatten_readout`, on one pair's (H, W) map at a time, which stays in L1 cache
    through all the layers. ``geo[l]`` is layer l's (H in, W in, H out, W out, zeros before
    along H, along W); ``pads[l]`` its zero-bordered scratch. ``out[slots[l], i, j]`` receives
    the kernel after ``l`` (conv, activation) pairs where ``slots[l] >= 0``.
    """
    n1, hw0 = x1.shape[0], x1.shape[1]
    n2 = x2.shape[0]
    depth = geo.shape[0]
    c = (1.0 - alpha) ** 2
    shrink = alpha + 0.5 * c
    scale = w / (k * k)
    q1, inv1 = _conv_variances(x1, geo, k, s, d, w, b, shrink, pads, rowsum)
    q2, inv2 = _conv_variances(x2, geo, k, s, d, w, b, shrink, pads, rowsum)
    kmap = np.empty(hw0)
    knew = np.empty(hw0)
    tmap = np.empty(hw0)
    tnew = np.empty(hw0)
    for i in range(n1):
        for j in range(n2):
            _pixel_covariance(x1, i, x2, j, kmap)
            size = hw0
            if slots[0] >= 0:  # the readout of the inputs; the NTK is the NNGP there
                out[slots[0], i, j] = b + w * (kmap[:size].sum() / size)
            for layer in range(depth):
                _box(kmap, geo[layer], pads[layer], rowsum, k, s, d, scale, b, knew)
                size = geo[layer, 2] * geo[layer, 3]
                if ntk:
                    if layer == 0:  # the inputs' NTK is zero
                        for p in range(size):
                            tnew[p] = knew[p]
                    else:
                        _box(tmap, geo[layer], pads[layer], rowsum, k, s, d, scale, 0.0, tnew)
                        for p in range(size):
                            tnew[p] += knew[p]
                for p in range(size):
                    f, fdot = _relu(knew[p], q1[i, layer, p], q2[j, layer, p], inv1[i, layer, p],
                                    inv2[j, layer, p], alpha, c)  # fmt: skip
                    kmap[p] = f
                    if ntk:
                        tmap[p] = tnew[p] * fdot
                slot = slots[layer + 1]
                if slot >= 0:
                    nngp = b + w * (kmap[:size].sum() / size)
                    out[slot, i, j] = w * (tmap[:size].sum() / size) + nngp if ntk else nngp
