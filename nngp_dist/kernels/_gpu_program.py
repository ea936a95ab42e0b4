"""The conv program of :class:`.lowering.ConvProgram` on a GPU, with ``numba.cuda``.

One thread block per pair of images: the pair's maps live in the block's shared memory through
the whole network (a ResNet-32 NTK on 28 x 28 images: 6 maps, 38 KB), and the block's threads
share out each operation's pixels, with a barrier between operations. Global memory is read
for the images and their variance maps and written once per pair and tap, so the kernel is
bound by arithmetic, not by memory traffic as the layer-by-layer CuPy recursion is (that one
streams every map of every layer through GPU memory, about 2 MB per pair for a ResNet-32).

Same arithmetic as :func:`._relu_loop.relu_program_pairs` (the CPU loop), with the patch sums
in the same order (the readout's sum alone is a tree); the tests run this kernel on NumPy
arrays in numba's CUDA simulator and hold it to the CPU loop. Imported only when it is used
(it imports numba.cuda).
"""

from __future__ import annotations

import math

import numba
from numba import cuda

from .opcodes import ADD, CONV, RELU

THREADS = 128  # per block: a power of two (the tap's reduction halves it)
MAX_ROWS = 65535  # a grid's y extent: rows of images per launch
SHARED_BYTES = 48 * 1024  # dynamic shared memory a kernel may use without opting in
_PI = math.pi
_INV_2PI = 1.0 / (2.0 * math.pi)


def shared_bytes(n_maps: int, pixels: int, ntk: bool, threads: int = THREADS) -> int:
    """Shared memory one block needs: the NNGP maps (and the NTK's), and the reduction."""
    return 8 * ((2 if ntk else 1) * n_maps * pixels + 2 * threads)


@cuda.jit(device=True, inline=True)
def _relu(k12, q1, q2, i1, i2, alpha, c):
    """``(F, Fdot)`` of (leaky) ReLU, as :func:`._relu_loop._relu` computes them (with the
    GPU's own arccos): rho exactly +-1 where ``q1 q2 - k12^2 <= 0``."""
    # Not q1 q2 - k12^2 <= 0: the GPU compiler fuses that into one multiply-add, whose exact
    # residual is positive for half of the images paired with themselves (seen in the
    # machine code); two rounded products compared keep rho = +-1 exact as the CPU does.
    if q1 * q2 <= k12 * k12:
        if k12 >= 0.0:
            return (alpha + 0.5 * c) * k12, alpha + 0.5 * c
        return alpha * k12, alpha
    rho = min(max(k12 * i1 * i2, -1.0), 1.0)
    pmt = math.acos(-rho)
    s = (q1 * i1) * (q2 * i2) * math.sqrt(max((1.0 - rho) * (1.0 + rho), 0.0))
    return alpha * k12 + c * _INV_2PI * (s + pmt * k12), alpha + c * _INV_2PI * pmt


@cuda.jit(cache=True)
def program_pairs(
    x1,
    x2,
    ops,
    geos,
    offsets,
    q1,
    inv1,
    q2,
    inv2,
    w,
    b,
    alpha,
    ntk,
    symmetric,
    variances,
    n_maps,
    out,
):
    """``out[slot, i, j]`` for the pair in block ``(j, i)`` of a 2-D grid; launch with
    ``(n2, n1)`` blocks of a power-of-two number of threads and :func:`shared_bytes` of
    dynamic shared memory. ``symmetric`` (``x2`` is ``x1``): blocks below the diagonal
    return at once, and the others write both ``(i, j)`` and ``(j, i)``.

    ``variances``: instead, block ``i`` runs image ``i`` with itself as the diagonal recursion
    (``_relu_loop._program_variances``), writing its variance map before each activation to
    ``q1[i]`` and the inverse square root (inf for zero) to ``inv1[i]``; launch with ``n1``
    blocks (a 1-D grid) and ``ntk`` False. The pairs' patch sums then round exactly as these do.

    Shared memory: the NNGP maps (``n_maps`` of the input's pixels each), then the NTK maps
    from ``t0``, then the tap's reduction (2 x threads) from ``red``. Each operation is one
    device function below, its pixels shared out among the block's threads."""
    if variances:
        i = j = cuda.blockIdx.x
    else:
        i, j = cuda.blockIdx.y, cuda.blockIdx.x
    if symmetric and j < i:
        return
    tid, nt = cuda.threadIdx.x, cuda.blockDim.x
    hw0 = x1.shape[1]
    smem = cuda.shared.array(0, numba.float64)
    t0 = n_maps * hw0  # the NTK maps follow the NNGP maps
    red = (2 * t0) if ntk else t0  # then the reduction's 2 x nt
    c = (1.0 - alpha) ** 2
    _pixel_covariance(x1, x2, i, j, smem, t0, ntk, tid, nt)
    cuda.syncthreads()
    for op in range(ops.shape[0]):
        code, a, bb, dst, g, v, size = _row(ops, op)
        ka, kb, kd = a * hw0, bb * hw0, dst * hw0
        if code == CONV:  # dst is never a: each thread writes its own output pixels
            _conv(smem, geos, g, ka, kd, t0, size, w, b, ops[op, 7] != 0, ntk, tid, nt)
        elif code == RELU and variances:
            _relu_variance(smem, q1, inv1, i, offsets[v], ka, kd, size, alpha, c, tid, nt)
        elif code == RELU:
            o = offsets[v]
            _relu_pair(smem, q1, inv1, q2, inv2, i, j, o, ka, kd, t0, size, alpha, c, ntk, tid, nt)
        elif code == ADD:
            for p in range(tid, size, nt):
                smem[kd + p] = smem[ka + p] + smem[kb + p]
                if ntk:
                    smem[t0 + kd + p] = smem[t0 + ka + p] + smem[t0 + kb + p]
        elif not variances:  # TAP: the flatten readout of map a into out[v, i, j]
            value = _readout(smem, ka, t0, red, size, w, b, ntk, tid, nt)
            if tid == 0:
                out[v, i, j] = value
                if symmetric:
                    out[v, j, i] = value
        cuda.syncthreads()


@cuda.jit(device=True, inline=True)
def _row(ops, op):
    """Row ``op`` of the program: code, a, b, dst, geometry, var or tap slot, size."""
    return ops[op, 0], ops[op, 1], ops[op, 2], ops[op, 3], ops[op, 4], ops[op, 5], ops[op, 6]


@cuda.jit(device=True, inline=True)
def _pixel_covariance(x1, x2, i, j, smem, t0, ntk, tid, nt):
    """Map 0: ``<x1[i, p], x2[j, p]> / channels`` per pixel (``_relu_loop._pixel_covariance``);
    the inputs' NTK map is zero."""
    channels = x1.shape[2]
    for p in range(tid, x1.shape[1], nt):
        acc = 0.0
        for ch in range(channels):
            acc += x1[i, p, ch] * x2[j, p, ch]
        smem[p] = acc / channels
        if ntk:
            smem[t0 + p] = 0.0


@cuda.jit(device=True, inline=True)
def _conv(smem, geos, g, ka, kd, t0, size, w, b, zero_ntk, ntk, tid, nt):
    """A conv layer from map ``ka`` to map ``kd`` with geometry row ``geos[g]``; ``zero_ntk``:
    it reads the inputs, whose NTK is zero."""
    hin, win, wout = geos[g, 0], geos[g, 1], geos[g, 3]
    lo_h, lo_w, k, s, d = geos[g, 4], geos[g, 5], geos[g, 6], geos[g, 7], geos[g, 8]
    scale = w / (k * k)
    for p in range(tid, size, nt):
        # Along each row of the patch first, then down: the order (and so the rounding) of
        # the CPU loop's _box, which also computes the variance maps, so an image paired with
        # itself stays exactly at rho = 1.
        gy, gx = p // wout, p % wout
        acc = 0.0
        acct = 0.0
        for th in range(k):
            r = gy * s + th * d - lo_h
            if 0 <= r < hin:
                row = 0.0
                rowt = 0.0
                for tw in range(k):
                    col = gx * s + tw * d - lo_w
                    if 0 <= col < win:
                        row += smem[ka + r * win + col]
                        if ntk:
                            rowt += smem[t0 + ka + r * win + col]
                acc += row
                acct += rowt
        kval = b + scale * acc
        smem[kd + p] = kval
        if ntk:
            smem[t0 + kd + p] = kval if zero_ntk else scale * acct + kval


@cuda.jit(device=True, inline=True)
def _relu_variance(smem, q1, inv1, i, o, ka, kd, size, alpha, c, tid, nt):
    """An activation in the diagonal recursion: it maps a variance v to shrink v; the variance
    map before it goes to ``q1[i]`` at ``o``, its inverse square root to ``inv1[i]``."""
    for p in range(tid, size, nt):
        q = smem[ka + p]
        q1[i, o + p] = q
        inv1[i, o + p] = 1.0 / math.sqrt(q) if q > 0.0 else math.inf
        smem[kd + p] = (alpha + 0.5 * c) * q


@cuda.jit(device=True, inline=True)
def _relu_pair(smem, q1, inv1, q2, inv2, i, j, o, ka, kd, t0, size, alpha, c, ntk, tid, nt):
    """An activation for the pair (i, j), with the images' variance maps at ``o``."""
    for p in range(tid, size, nt):
        f, fdot = _relu(
            smem[ka + p], q1[i, o + p], q2[j, o + p], inv1[i, o + p], inv2[j, o + p], alpha, c
        )
        smem[kd + p] = f
        if ntk:
            smem[t0 + kd + p] = smem[t0 + ka + p] * fdot


@cuda.jit(device=True, inline=True)
def _readout(smem, ka, t0, red, size, w, b, ntk, tid, nt):
    """The flatten readout of map ``ka`` (the NTK where ``ntk``, else the NNGP): a tree
    reduction over the block's threads in ``smem[red:]``; the value is thread 0's."""
    acc = 0.0
    acct = 0.0
    for p in range(tid, size, nt):
        acc += smem[ka + p]
        if ntk:
            acct += smem[t0 + ka + p]
    smem[red + tid] = acc
    smem[red + nt + tid] = acct
    cuda.syncthreads()
    half = nt // 2
    while half > 0:
        if tid < half:
            smem[red + tid] += smem[red + tid + half]
            smem[red + nt + tid] += smem[red + nt + tid + half]
        cuda.syncthreads()
        half //= 2
    nngp = b + w * (smem[red] / size)
    return w * (smem[red + nt] / size) + nngp if ntk else nngp
