"""The compiled loops behind :mod:`.fused` (imported on first use: it imports numba).

Compiled once per machine: ``cache=True`` keeps the machine code next to this file (or in
Numba's user cache directory when the package is read-only), so a worker process loads it in
milliseconds instead of compiling for a second.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from .opcodes import ADD, ARCSIN_COEFFICIENTS, CONV, RELU

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
def _relu(k12, q1, q2, i1, i2, alpha, c):
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


@numba.njit(cache=True, nogil=True, error_model="numpy")
def arccos(x: np.ndarray, out: np.ndarray) -> None:
    """Elementwise :func:`_arccos` (for the tests)."""
    for i in range(x.size):
        out[i] = _arccos(x[i])


@numba.njit(inline="always")
def _mirror_upper(a):
    """Copy the upper triangle of the square ``a`` onto its lower one, in cache-sized blocks."""
    n, blk = a.shape[0], 64
    for r0 in range(0, n, blk):
        for c0 in range(0, r0 + 1, blk):
            for r in range(r0, min(r0 + blk, n)):
                for col in range(c0, min(c0 + blk, r)):
                    a[r, col] = a[col, r]


@numba.njit(cache=True, nogil=True, error_model="numpy")
def relu_rows(gram, var1, var2, w, b, alpha, depth, ntk, slots, symmetric, out):
    """Dense layer, then ``depth`` x (leaky ReLU, dense layer), for every entry of ``gram``.

    Same recursion as :func:`.layers.dense` and :func:`.nonlinearities.leaky_relu` (ReLU is
    ``alpha = 0``), one entry at a time by :func:`_relu`.
    ``out[slots[d]]`` receives the kernel after ``d`` hidden layers where ``slots[d] >= 0``.
    ``symmetric``: ``gram`` is a set's Gram matrix with itself (``var1`` equal to ``var2``);
    only the entries on and above the diagonal are evaluated, and mirrored below it.
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
        j0 = i if symmetric else 0  # row i's columns: j0 onwards, as views from 0
        m, row = n2 - j0, gram[i, j0:]
        kr, tr = k[:m], theta[:m]
        for j in range(m):
            kr[j] = w * row[j] + b
            tr[j] = kr[j]  # the NTK after the first dense layer equals its NNGP
        if slots[0] >= 0:
            out[slots[0], i, j0:] = tr if ntk else kr
        q1 = w * var1[i] + b
        for layer in range(depth):
            i1 = 1.0 / math.sqrt(q1) if q1 > 0.0 else math.inf
            qr, ir = q2[layer, j0:], inv2[layer, j0:]
            for j in range(m):
                f, fdot = _relu(kr[j], q1, qr[j], i1, ir[j], alpha, c)
                kn = w * f + b
                if ntk:
                    tr[j] = w * (fdot * tr[j]) + kn
                kr[j] = kn
            if slots[layer + 1] >= 0:
                out[slots[layer + 1], i, j0:] = tr if ntk else kr
            q1 = w * (shrink * q1) + b
    if symmetric:
        for slot in range(out.shape[0]):
            _mirror_upper(out[slot])


# The conv program's rows of ``ops``: code, a, b, dst, geometry, var, size, flag (built by
# :class:`.lowering.ConvProgram`); anything not CONV, RELU or ADD is a TAP.


@numba.njit(inline="always")
def _row(ops, op):
    """Row ``op`` of a conv program: code, a, b, dst, geometry, var or tap slot, size."""
    return ops[op, 0], ops[op, 1], ops[op, 2], ops[op, 3], ops[op, 4], ops[op, 5], ops[op, 6]


@numba.njit(inline="always")
def _box(src, geo, pad, rowsum, scale, shift, dst):
    """``dst = shift + scale * (sum over the k x k taps of src)``: one conv layer's patch sum
    on a flat map, with ``geo`` the layer's (H in, W in, H out, W out, zeros before along H,
    along W, filter size, stride, dilation). Through ``pad``, whose border is zero and stays
    so (only the interior is written), and ``rowsum``: along each row first, then down the
    columns."""
    hin, win, hout, wout, lo_h, lo_w = geo[0], geo[1], geo[2], geo[3], geo[4], geo[5]
    k, s, d = geo[6], geo[7], geo[8]
    for h in range(hin):
        for x in range(win):
            pad[lo_h + h, lo_w + x] = src[h * win + x]
    for h in range((hout - 1) * s + (k - 1) * d + 1):
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
def _pixel_covariance(x1, i, x2, j, out):
    """``out[p] = <x1[i, p], x2[j, p]> / channels``: the same arithmetic for a pair and for an
    image with itself, so an image paired with itself starts exactly at its variance map."""
    channels = x1.shape[2]
    for p in range(x1.shape[1]):
        acc = 0.0
        for ch in range(channels):
            acc += x1[i, p, ch] * x2[j, p, ch]
        out[p] = acc / channels


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _program_variances(x, ops, geos, offsets, w, b, shrink, pads, rowsum, maps):
    """Each image's pre-activation variance map before each activation of the program, and
    its inverse square root (inf where it is zero), flat at ``offsets[var]``: the diagonal
    recursion, in which an activation maps a variance ``v`` to ``shrink v``."""
    n = x.shape[0]
    var = np.zeros((n, offsets[-1]))
    inv = np.zeros((n, offsets[-1]))
    for i in range(n):
        _pixel_covariance(x, i, x, i, maps[0])
        for op in range(ops.shape[0]):
            code, a, bb, dst, g, v, size = _row(ops, op)
            src, out = maps[a], maps[dst]
            if code == CONV:
                k = geos[g, 6]
                _box(src, geos[g], pads[g], rowsum, w / (k * k), b, out)
            elif code == RELU:
                o = offsets[v]
                for p in range(size):
                    var[i, o + p] = src[p]
                    inv[i, o + p] = 1.0 / math.sqrt(src[p]) if src[p] > 0.0 else math.inf
                    out[p] = shrink * src[p]
            elif code == ADD:
                other = maps[bb]
                for p in range(size):
                    out[p] = src[p] + other[p]
    return var, inv


@numba.njit(cache=True, nogil=True, error_model="numpy")
def relu_program_pairs(x1, x2, ops, geos, offsets, w, b, alpha, ntk, symmetric, pads, rowsum, out):
    """The GP/NTK of a (leaky) ReLU ConvNet with a flattening dense readout, for every pair of
    images of ``x1`` (n1, pixels, channels) and ``x2``, running the network's program ``ops``.

    Operations (each reads maps ``a`` (and ``b``) and writes map ``dst``, of ``size``
    pixels): CONV with geometry row ``geos[g]`` (:func:`_box`), as :func:`.conv.conv`; RELU
    with the images' variance maps at ``offsets[var]``, as :func:`.nonlinearities.leaky_relu`;
    ADD, as :func:`.conv.residual`; TAP: ``out[var, i, j]`` = the flatten readout of map ``a``
    (:func:`.conv.flatten_readout`). Map 0 holds the inputs' per-pixel covariance. A CONV with
    ``flag`` set reads the inputs, whose NTK is zero.

    One pair's maps stay in L1 cache through the whole program; ``pads[g]`` is geometry g's
    zero-bordered scratch. ``symmetric``: ``x2`` is ``x1``; the pairs on and above the
    diagonal are evaluated, and mirrored below it.
    """
    n1, n2 = x1.shape[0], x2.shape[0]
    c = (1.0 - alpha) ** 2
    shrink = alpha + 0.5 * c
    n_maps, hw0 = ops[:, 3].max() + 1, x1.shape[1]
    kmaps = np.zeros((n_maps, hw0))
    tmaps = np.zeros((n_maps, hw0))
    q1, inv1 = _program_variances(x1, ops, geos, offsets, w, b, shrink, pads, rowsum, kmaps)
    if symmetric:
        q2, inv2 = q1, inv1
    else:
        q2, inv2 = _program_variances(x2, ops, geos, offsets, w, b, shrink, pads, rowsum, kmaps)
    for i in range(n1):
        for j in range(i if symmetric else 0, n2):
            _pixel_covariance(x1, i, x2, j, kmaps[0])
            if ntk:  # the inputs' NTK (map 0 may have held another value in the last pair)
                tmaps[0, :] = 0.0
            for op in range(ops.shape[0]):
                code, a, bb, dst, g, v, size = _row(ops, op)
                ksrc, kout, tsrc, tout = kmaps[a], kmaps[dst], tmaps[a], tmaps[dst]
                if code == CONV:
                    k = geos[g, 6]
                    scale = w / (k * k)
                    _box(ksrc, geos[g], pads[g], rowsum, scale, b, kout)
                    if ntk:
                        if ops[op, 7]:  # the inputs' NTK is zero
                            for p in range(size):
                                tout[p] = kout[p]
                        else:
                            _box(tsrc, geos[g], pads[g], rowsum, scale, 0.0, tout)
                            for p in range(size):
                                tout[p] += kout[p]
                elif code == RELU:
                    o = offsets[v]
                    qa, qb = q1[i, o : o + size], q2[j, o : o + size]
                    ia, ib = inv1[i, o : o + size], inv2[j, o : o + size]
                    for p in range(size):
                        f, fdot = _relu(ksrc[p], qa[p], qb[p], ia[p], ib[p], alpha, c)
                        kout[p] = f
                        if ntk:
                            tout[p] = tsrc[p] * fdot
                elif code == ADD:
                    kother, tother = kmaps[bb], tmaps[bb]
                    for p in range(size):
                        kout[p] = ksrc[p] + kother[p]
                    if ntk:
                        for p in range(size):
                            tout[p] = tsrc[p] + tother[p]
                else:  # TAP; at the inputs the NTK is the NNGP
                    nngp = b + w * (ksrc[:size].sum() / size)
                    out[v, i, j] = w * (tsrc[:size].sum() / size) + nngp if ntk else nngp
    if symmetric:
        for slot in range(out.shape[0]):
            _mirror_upper(out[slot])
