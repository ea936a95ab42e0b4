"""Fast paths for (leaky) ReLU networks: the whole recursion per kernel entry in one
compiled loop, for dense nets and for image nets with a flattening readout.

The layer-by-layer path (:mod:`.layers`, :mod:`.nonlinearities`, :mod:`.conv`) makes several
passes over memory per layer, and NumPy's ``arctan2`` alone is a large share of a ReLU step.
Here Numba compiles loops that run every layer while the data sit in L1 cache, with ``arccos``
from a polynomial (:mod:`.opcodes`) that LLVM vectorises:

- dense: for each row of a tile, every layer over the row, the NTK included;
- image nets with a flattening readout (plain ConvNets, residual nets, ResNet-32): for each
  pair of images, the network's program lowered to opcodes (:class:`.lowering.ConvProgram`:
  patch sums, ReLU steps, residual sums, readouts) over the pair's (H, W) maps.

Both are several times faster than layer by layer (timings: ``benchmarks/RESULTS.md``).

On GPUs the image nets' program runs as one numba.cuda kernel (:func:`conv_relu_cross_gpu`,
:mod:`._gpu_program`). The layer-by-layer path stays the reference, and the path for dense nets
on GPUs (where the Gram product dominates), pooled networks and every other nonlinearity; the
tests hold the paths equal to 1e-12 and the reference to the Monte Carlo oracles.

Each function here takes the network as its :class:`~.program.Program` (what
:attr:`.spec.Spec.program` builds) and lowers it (:mod:`.lowering`); the arccos polynomial and
the opcodes live in :mod:`.opcodes`.
"""

from __future__ import annotations

import functools
import os
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from .. import backend
from . import architectures
from .conv import ConvGeometry
from .lowering import ConvProgram, dense_depth, lowers, relu_alpha, relu_constants
from .nonlinearities import relu
from .program import Program

__all__ = [
    "ConvProgram",
    "applies",
    "conv_relu_cross",
    "conv_relu_cross_gpu",
    "dense_relu_cross",
    "warm",
]


def applies(spec: Any) -> bool:
    """Whether ``spec`` has a compiled loop: (leaky) ReLU dense nets, and (leaky) ReLU image
    nets (plain, residual, ResNet-32) with a flattening readout. Pooled networks, and every
    other activation, take the layer-by-layer path.

    The spec's activation decides even where its program has none (depth 0), so that a spec
    takes the same path at every depth; then its program must lower (:func:`.lowering.lowers`).
    """
    return relu_alpha(spec.activation) is not None and lowers(spec.program)


@functools.cache
def _loops() -> Any:
    """The compiled loops' module. numba is imported on first use: the CLI and the client
    never pay for it.

    Numba caches the machine code beside the package or in ``~/.cache/numba``, and refuses
    to load the module when neither is writable (a read-only install on a worker with a
    read-only home, as in containers with a read-only root). Then the cache goes to a folder of
    this user's in the temporary directory, so each process compiles at most once per machine.
    """
    import numba

    try:
        from . import _relu_loop
    except RuntimeError as e:
        if "cannot cache" not in str(e) or numba.config.CACHE_DIR:
            raise
        uid = os.getuid() if hasattr(os, "getuid") else "user"  # a uid may have no name
        numba.config.CACHE_DIR = os.path.join(tempfile.gettempdir(), f"nngp-dist-numba-{uid}")
        from . import _relu_loop

    return _relu_loop


def dense_relu_cross(
    program: Program,
    gram: np.ndarray,
    var1: np.ndarray,
    var2: np.ndarray,
    slots: Mapping[int, int],
    out: np.ndarray,
    *,
    ntk: bool = False,
    symmetric: bool = False,
) -> None:
    """Fill ``out[slot]`` with the kernel (the NTK where ``ntk``, else the NNGP) at each depth
    ``d`` whose slot is ``slots[d]``, for a dense ``program`` that :func:`.lowering.lowers`.

    ``gram`` (n1, n2), ``var1`` (n1,) and ``var2`` (n2,) are the inputs' covariances (the
    input state of :func:`.layers.input_state`); ``out`` is (len(slots), n1, n2), float64.
    ``symmetric``: the inputs are one set with itself; the upper triangle is evaluated and
    mirrored.
    """
    w, b, alpha = relu_constants(program)
    depth = dense_depth(program)
    program.op_slots(slots)  # checks the depths
    by_depth = np.full(depth + 1, -1, dtype=np.int64)
    for d, slot in slots.items():
        by_depth[d] = slot
    _loops().relu_rows(
        np.ascontiguousarray(gram, dtype=np.float64),
        np.ascontiguousarray(var1, dtype=np.float64).reshape(-1),
        np.ascontiguousarray(var2, dtype=np.float64).reshape(-1),
        w,
        b,
        alpha,
        depth,
        ntk,
        by_depth,
        symmetric,
        out,
    )


def conv_relu_cross(
    program: Program,
    x1: np.ndarray,
    x2: np.ndarray,
    slots: Mapping[int, int],
    out: np.ndarray,
    *,
    ntk: bool = False,
    symmetric: bool = False,
) -> bool:
    """Fill ``out[slot]`` with an image network's kernel after each depth ``d`` whose slot is
    ``slots[d]`` (residual networks: at full depth only), for the images in the rows of ``x1``
    (n1, H W C) and ``x2`` (n2, H W C).

    ``program`` is an image network's that :func:`.lowering.lowers`; ``out`` is
    (len(slots), n1, n2). ``symmetric``: ``x2`` holds the same images as ``x1``; half the
    pairs are evaluated. Returns True (it always runs), as :func:`conv_relu_cross_gpu` returns
    whether it ran.
    """
    w, b, alpha = relu_constants(program)
    lowered = ConvProgram.of(program, slots)
    ops, geos, offsets = lowered.arrays()
    rows, cols = lowered.scratch_shape()
    channels = program.image_shape[2]
    _loops().relu_program_pairs(
        np.ascontiguousarray(x1, dtype=np.float64).reshape(len(x1), -1, channels),
        np.ascontiguousarray(x2, dtype=np.float64).reshape(len(x2), -1, channels),
        ops,
        geos,
        offsets,
        w,
        b,
        alpha,
        ntk,
        symmetric,
        np.zeros((len(geos), rows, cols)),  # zero borders, one per geometry
        np.empty((rows, cols)),
        out,
    )
    return True


def conv_relu_cross_gpu(
    program: Program,
    x1: Any,
    x2: Any,
    slots: Mapping[int, int],
    out: Any,
    *,
    ntk: bool = False,
    symmetric: bool = False,
    threads: int | None = None,
) -> bool:
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
        from numba import cuda
    except ImportError:
        return False
    if not cuda.is_available():
        return False
    from . import _gpu_program as gpu

    w, b, alpha = relu_constants(program)
    ops, geos, offsets = ConvProgram.of(program, slots).arrays()
    n_maps = int(ops[:, 3].max()) + 1
    h, wd, channels = program.image_shape
    threads = threads or gpu.THREADS
    shared = gpu.shared_bytes(n_maps, h * wd, ntk, threads)
    if shared > gpu.SHARED_BYTES or len(x1) > gpu.MAX_ROWS:
        return False
    if len(x1) == 0 or len(x2) == 0:  # a grid of no blocks is an error
        return True
    xp = backend.namespace(x1, x2, out)
    maps = [
        xp.ascontiguousarray(xp.asarray(x, dtype=xp.float64).reshape(len(x), -1, channels))
        for x in (x1, x2)
    ]
    total = int(offsets[-1])  # variance entries per image
    ops, geos, offsets = (xp.asarray(a) for a in (ops, geos, offsets))

    def launch(blocks: Any, x1: Any, x2: Any, q: tuple, flags: tuple, out: Any) -> None:
        kernel = gpu.program_pairs[blocks, threads, 0, shared]
        kernel(x1, x2, ops, geos, offsets, *q, w, b, alpha, *flags, n_maps, out)

    def variances(x: Any) -> tuple[Any, Any]:  # each image's, by the same kernel
        q, inv = xp.empty((len(x), total)), xp.empty((len(x), total))
        unused = xp.empty((1, 1))  # not q again: host arrays are copied back one by one
        launch(len(x), x, x, (q, inv, unused, unused), (False, False, True), out)
        return q, inv

    q1, inv1 = variances(maps[0])
    q2, inv2 = (q1, inv1) if symmetric else variances(maps[1])
    launch((len(x2), len(x1)), *maps, (q1, inv1, q2, inv2), (ntk, symmetric, False), out)
    return True


def warm() -> None:
    """Import numba and load (or, the first time on a machine, compile) the loops."""
    phi, one = relu(), np.ones(1)
    dense = architectures.fc(1, 1.0, 0.0, phi)
    dense_relu_cross(dense, np.ones((1, 1)), one, one, {1: 0}, np.empty((1, 1, 1)))
    cnn = architectures.convnet(1, 1.0, 0.0, phi, ConvGeometry(3), image_shape=(2, 2, 1))
    conv_relu_cross(cnn, np.ones((1, 4)), np.ones((1, 4)), {1: 0}, np.empty((1, 1, 1)))
