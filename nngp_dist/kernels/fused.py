"""Fast paths for (leaky) ReLU networks: the whole recursion per kernel entry in one
compiled loop, for dense nets and for image nets with a flattening readout.

The layer-by-layer path (:mod:`.layers`, :mod:`.nonlinearities`, :mod:`.conv`) makes several
passes over memory per layer, and NumPy's ``arctan2`` alone costs about 15 ns per entry on the
2-core dev machine. Here Numba compiles loops that run every layer while the data sit in L1
cache, with ``arccos`` from a polynomial (below) that LLVM vectorises:

- dense: for each row of a tile, every layer over the row; about 6 ns per entry and layer, the
  NTK included;
- image nets with a flattening readout (plain ConvNets, residual nets, ResNet-32): for each
  pair of images, the network's program (:class:`ConvProgram`: patch sums, ReLU steps,
  residual sums, readouts) over the pair's (H, W) maps; about 5.5 ns per map entry against
  21 ns layer by layer (``benchmarks/RESULTS.md``).

On GPUs the image nets' program runs as one numba.cuda kernel (:func:`conv_relu_cross_gpu`,
:mod:`._gpu_program`). The layer-by-layer path stays the reference, and the path for dense nets
on GPUs (where the Gram product dominates), pooled networks and every other nonlinearity; the
tests hold the paths equal to 1e-12 and the reference to the Monte Carlo oracles.

The arccos polynomial and the opcodes live in :mod:`.opcodes`.
"""

from __future__ import annotations

import functools
import math
import os
import tempfile
from typing import Any

import numpy as np

from .. import backend
from .conv import ConvGeometry
from .opcodes import ADD, CONV, RELU, TAP

__all__ = ["ConvProgram", "applies", "conv_relu_cross", "conv_relu_cross_gpu", "dense_relu_cross",
           "warm"]  # fmt: skip


def applies(spec: Any) -> bool:
    """Whether ``spec`` has a compiled loop: (leaky) ReLU dense nets, and (leaky) ReLU image
    nets (plain, residual, ResNet-32) with a flattening readout. Pooled networks, and every
    other activation, take the layer-by-layer path."""
    if spec.activation.spec["name"] not in ("relu", "leaky_relu"):
        return False
    return spec.arch == "fc" or spec.readout == "flatten"


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
                     taps: dict[int, int], out: np.ndarray, *,
                     symmetric: bool = False) -> None:  # fmt: skip
    """Fill ``out[slot]`` with the kernel at each depth ``d`` whose slot is ``taps[d]``.

    ``gram`` (n1, n2), ``var1`` (n1,) and ``var2`` (n2,) are the inputs' covariances (the
    input state of :func:`.layers.input_state`); ``out`` is (len(taps), n1, n2), float64.
    ``symmetric``: the inputs are one set with itself; the upper triangle is evaluated and
    mirrored.
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
        symmetric,
        out,
    )


def conv_relu_cross(spec: Any, x1: np.ndarray, x2: np.ndarray, taps: dict[int, int],
                    out: np.ndarray, *, symmetric: bool = False) -> bool:  # fmt: skip
    """Fill ``out[slot]`` with an image network's kernel after each depth ``d`` whose slot is
    ``taps[d]`` (residual networks: at full depth only), for the images in the rows of ``x1``
    (n1, H W C) and ``x2`` (n2, H W C).

    ``spec`` is an image spec for which :func:`applies` holds; ``out`` is (len(taps), n1, n2).
    ``symmetric``: ``x2`` holds the same images as ``x1``; half the pairs are evaluated.
    Returns True (it always runs), as :func:`conv_relu_cross_gpu` returns whether it ran.
    """
    program = ConvProgram.of(spec, taps)
    ops, geos, offsets = program.arrays()
    rows, cols = program.scratch_shape()
    _loops().relu_program_pairs(
        np.ascontiguousarray(x1, dtype=np.float64).reshape(len(x1), -1, spec.image_shape[2]),
        np.ascontiguousarray(x2, dtype=np.float64).reshape(len(x2), -1, spec.image_shape[2]),
        ops,
        geos,
        offsets,
        spec.weight_var,
        spec.bias_var,
        _alpha(spec),
        spec.kernel == "ntk",
        symmetric,
        np.zeros((len(geos), rows, cols)),  # zero borders, one per geometry
        np.empty((rows, cols)),
        out,
    )
    return True


def conv_relu_cross_gpu(spec: Any, x1: Any, x2: Any, taps: dict[int, int], out: Any, *,
                        symmetric: bool = False, threads: int | None = None) -> bool:  # fmt: skip
    """:func:`conv_relu_cross` on a GPU (``x1``, ``x2`` and ``out`` CuPy arrays): the
    network's program in one kernel, a thread block per pair (:mod:`._gpu_program`).

    Returns False, having done nothing, where the kernel cannot run: numba.cuda missing or
    seeing no GPU, a pair's maps too large for a block's shared memory (a ResNet-32 NTK on
    32 x 32 images), or over 65,535 rows (a grid's extent); the caller then goes layer by
    layer. The images' variance maps come from the same kernel run as the diagonal
    recursion, so that their patch sums round exactly as the pairs' do (an image paired with
    itself stays at rho = 1).
    """
    try:
        from numba import cuda  # noqa: PLC0415
    except ImportError:
        return False
    if not cuda.is_available():
        return False
    from . import _gpu_program as gpu  # noqa: PLC0415

    ntk = spec.kernel == "ntk"
    program = ConvProgram.of(spec, taps)
    ops, geos, offsets = program.arrays()
    n_maps = int(ops[:, 3].max()) + 1
    h, w, channels = spec.image_shape
    threads = threads or gpu.THREADS
    shared = gpu.shared_bytes(n_maps, h * w, ntk, threads)
    if shared > gpu.SHARED_BYTES or len(x1) > gpu.MAX_ROWS:
        return False
    if len(x1) == 0 or len(x2) == 0:  # a grid of no blocks is an error
        return True
    xp = backend.namespace(x1, x2, out)
    alpha = _alpha(spec)
    maps = [xp.ascontiguousarray(xp.asarray(x, dtype=xp.float64).reshape(len(x), -1, channels))
            for x in (x1, x2)]  # fmt: skip
    total = int(offsets[-1])  # variance entries per image
    ops, geos, offsets = (xp.asarray(a) for a in (ops, geos, offsets))

    def launch(blocks: Any, x1: Any, x2: Any, q: tuple, flags: tuple, out: Any) -> None:
        gpu.program_pairs[blocks, threads, 0, shared](
            x1, x2, ops, geos, offsets, *q, spec.weight_var, spec.bias_var, alpha, *flags,
            n_maps, out,
        )  # fmt: skip

    def variances(x: Any) -> tuple[Any, Any]:  # each image's, by the same kernel
        q, inv = xp.empty((len(x), total)), xp.empty((len(x), total))
        unused = xp.empty((1, 1))  # not q again: host arrays are copied back one by one
        launch(len(x), x, x, (q, inv, unused, unused), (False, False, True), out)
        return q, inv

    q1, inv1 = variances(maps[0])
    q2, inv2 = (q1, inv1) if symmetric else variances(maps[1])
    launch((len(x2), len(x1)), *maps, (q1, inv1, q2, inv2), (ntk, symmetric, False), out)
    return True


class ConvProgram:
    """An image network as the compiled loop runs it: a list of operations on per-pair maps.

    Values are numbered as they are made (0: the inputs' per-pixel covariance); :meth:`arrays`
    assigns them to as few map buffers as their lifetimes allow, so a ResNet-32's 81
    operations share 3 maps that stay in L1 cache. This mirrors
    :meth:`.spec.Spec.layers` for conv, residual and ResNet-32 nets; the tests hold the two
    equal to 1e-12.
    """

    def __init__(self, h: int, w: int) -> None:
        self.shapes: list[tuple[int, int]] = [(h, w)]
        self.ops: list[tuple] = []  # (code, inputs, output value or tap slot, geometry)

    @classmethod
    def of(cls, spec: Any, taps: dict[int, int]) -> ConvProgram:
        """The program of ``spec`` (conv or resnet32, flatten readout), reading out the kernel
        after each depth ``d`` in ``taps`` into slot ``taps[d]``."""
        h, w, _ = spec.image_shape
        p = cls(h, w)
        g = ConvGeometry(spec.filter_size, spec.stride, spec.dilation, spec.padding)
        residual = spec.arch == "resnet32" or (spec.skip_every and spec.depth >= 2)
        if residual and set(taps) != {spec.depth}:
            raise ValueError("residual networks give their kernel at full depth only")
        if spec.arch == "resnet32":
            v = p.conv(0, ConvGeometry(3))
            for stride in (1, 2, 2):
                for blk in range(5):
                    s = stride if blk == 0 else 1
                    u = p.conv(p.relu(p.conv(p.relu(v), ConvGeometry(3, stride=s))),
                               ConvGeometry(3))  # fmt: skip
                    v = p.add(u, p.conv(v, ConvGeometry(1, stride=s)) if blk == 0 else v)
            p.tap(p.relu(v), taps[spec.depth])
        elif residual:
            v = p.conv(0, g)
            pairs, s = spec.depth - 1, spec.skip_every
            for start in range(0, pairs, s):
                u = v
                for _ in range(min(s, pairs - start)):
                    u = p.conv(p.relu(u), g)
                v = p.add(u, v) if pairs - start >= s else u
            p.tap(p.relu(v), taps[spec.depth])
        else:
            v = 0
            for d in range(spec.depth + 1):
                if d:
                    v = p.relu(p.conv(v, g))
                if d in taps:
                    p.tap(v, taps[d])
        return p

    def _make(self, code: int, inputs: tuple[int, ...], shape: tuple[int, int],
              geometry: tuple = ()) -> int:  # fmt: skip
        self.shapes.append(shape)
        self.ops.append((code, inputs, len(self.shapes) - 1, geometry))
        return len(self.shapes) - 1

    def conv(self, v: int, g: ConvGeometry) -> int:
        h, w = self.shapes[v]
        (ho, lo_h, _), (wo, lo_w, _) = g.axis(h), g.axis(w)
        geometry = (h, w, ho, wo, lo_h, lo_w, g.filter_size, g.stride, g.dilation)
        return self._make(CONV, (v,), (ho, wo), geometry)

    def relu(self, v: int) -> int:
        return self._make(RELU, (v,), self.shapes[v])

    def add(self, a: int, b: int) -> int:
        if self.shapes[a] != self.shapes[b]:
            raise ValueError(
                f"residual branch maps {self.shapes[b]} to {self.shapes[a]}: a strided block "
                "needs a projection shortcut"
            )
        return self._make(ADD, (a, b), self.shapes[a])

    def tap(self, v: int, slot: int) -> None:
        self.ops.append((TAP, (v,), slot, ()))

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``ops`` rows (code, a, b, dst map, geometry row, var or tap slot, size, inputs'
        NTK is zero), the distinct geometry rows, and the offsets of the activations'
        variance maps."""
        last = {v: k for k, (_, inputs, _, _) in enumerate(self.ops) for v in inputs}
        where, free, n_maps = {0: 0}, [], 1
        geos: dict[tuple, int] = {}
        offsets = [0]
        rows = []
        for k, (code, inputs, result, geometry) in enumerate(self.ops):
            a, b = inputs[0], inputs[-1]
            if code == TAP:  # writes no map; its slot rides in the var column
                dst, extra, size = 0, result, math.prod(self.shapes[a])
            else:
                if free:
                    dst = free.pop()
                else:
                    dst, n_maps = n_maps, n_maps + 1
                where[result] = dst
                extra, size = 0, math.prod(self.shapes[result])
            if code == RELU:
                extra = len(offsets) - 1
                offsets.append(offsets[-1] + size)
            g = geos.setdefault(geometry, len(geos)) if geometry else 0
            rows.append((code, where[a], where[b], dst, g, extra, size, int(a == 0)))
            free += sorted({where[v] for v in inputs if last[v] == k})
        geo = np.array(list(geos) or [(1,) * 9], dtype=np.int64).reshape(-1, 9)
        return np.array(rows, dtype=np.int64), geo, np.array(offsets, dtype=np.int64)

    def scratch_shape(self) -> tuple[int, int]:
        """Rows and columns of the zero-bordered scratch every conv geometry fits in."""
        rows = cols = 1
        for code, _, _, g in self.ops:
            if code == CONV:
                hin, win, hout, wout, lo_h, lo_w, k, s, d = g
                rows = max(rows, lo_h + hin, (hout - 1) * s + (k - 1) * d + 1)
                cols = max(cols, lo_w + win, (wout - 1) * s + (k - 1) * d + 1)
        return rows, cols


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
