"""A :class:`~.program.Program` lowered to what the compiled loops take: constants and arrays.

- The dense loop (:func:`._relu_loop.relu_rows`) runs ``[dense, phi] * depth + [dense]``:
  :func:`dense_depth` recognises that form and gives its depth.
- The image loops (:func:`._relu_loop.relu_program_pairs` on CPUs,
  :func:`._gpu_program.program_pairs` on GPUs) run a list of opcodes (:mod:`.opcodes`) on the
  maps of one pair of images: :class:`ConvProgram` lowers the ops to it, taps included.

Both loops take one weight and one bias variance, and one (leaky) ReLU, as constants
(:func:`relu_constants`). A program with any other activation or op, or a pooling readout,
does not lower (:func:`lowers`): it runs layer by layer (:meth:`.program.Program.evaluate`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping

import numpy as np

from .conv import ConvGeometry
from .nonlinearities import Nonlinearity
from .opcodes import ADD, CONV, RELU, TAP
from .program import Activation, Conv, Dense, Op, Program, Readout, Residual

__all__ = ["ConvProgram", "dense_depth", "lowers", "relu_alpha", "relu_constants"]


def relu_alpha(phi: Nonlinearity) -> float | None:
    """The negative slope of a (leaky) ReLU (0 for ReLU); None for any other nonlinearity."""
    name = phi.spec["name"]
    if name == "relu":
        return 0.0
    if name == "leaky_relu":
        return float(phi.spec.get("alpha", 0.0))
    return None


def relu_constants(program: Program) -> tuple[float, float, float] | None:
    """``(weight_var, bias_var, alpha)`` shared by every layer and (leaky ReLU) activation of
    ``program``, the readout included; None where they differ or another op appears."""
    variances, alphas = set(), set()
    for op in _walk(program):
        if isinstance(op, Activation):
            alphas.add(relu_alpha(op.phi))
        elif isinstance(op, (Dense, Conv, Readout)):
            variances.add((op.weight_var, op.bias_var))
        elif not isinstance(op, Residual):
            return None
    if len(variances) != 1 or len(alphas) > 1 or None in alphas:
        return None
    (w, b), alpha = variances.pop(), (alphas.pop() if alphas else 0.0)
    return w, b, alpha


def dense_depth(program: Program) -> int | None:
    """``depth`` where ``program`` is ``[dense, phi] * depth + [dense]`` read after each dense
    layer (the dense loop's network); None otherwise."""
    ops, depth = program.ops, len(program.ops) // 2
    pattern = [Dense, Activation] * depth + [Dense]
    if program.readout is not None or [type(op) for op in ops] != pattern:
        return None
    return depth if dict(program.taps) == {d: 2 * d + 1 for d in range(depth + 1)} else None


def lowers(program: Program) -> bool:
    """Whether a compiled loop runs ``program``: uniform (leaky) ReLU layers, and either the
    dense loop's form or conv, activation and residual ops with a flattening readout."""
    if relu_constants(program) is None:
        return False
    if program.pixels == "none":
        return dense_depth(program) is not None
    image_ops = (Conv, Activation, Residual)
    return program.pixels == "same" and all(
        isinstance(op, image_ops) for op in _walk_ops(program.ops)
    )


def _walk(program: Program) -> Iterator[Op | Readout]:
    yield from _walk_ops(program.ops)
    if program.readout is not None:
        yield program.readout


def _walk_ops(ops: tuple[Op, ...]) -> Iterator[Op]:
    for op in ops:
        yield op
        if isinstance(op, Residual):
            yield from _walk_ops(op.block)
            yield from _walk_ops(op.shortcut or ())


class ConvProgram:
    """An image network as the compiled loops run it: a list of operations on per-pair maps.

    Values are numbered as they are made (0: the inputs' per-pixel covariance); :meth:`arrays`
    assigns them to as few map buffers as their lifetimes allow, so a ResNet-32's 81
    operations share 3 maps that stay in L1 cache. Lowered from the same
    :class:`~.program.Program` as the layer-by-layer path runs; the tests hold the two equal
    to 1e-12.
    """

    def __init__(self, h: int, w: int) -> None:
        self.shapes: list[tuple[int, int]] = [(h, w)]
        self.ops: list[tuple] = []  # (code, inputs, output value or tap slot, geometry)

    @classmethod
    def of(cls, program: Program, slots: Mapping[int, int]) -> ConvProgram:
        """``program`` (an image network that :func:`lowers`), reading out the kernel at each
        depth ``d`` of ``slots`` into slot ``slots[d]``."""
        h, w, _ = program.image_shape
        p = cls(h, w)
        at = program.op_slots(slots)
        v = 0
        for i, op in enumerate(program.ops):
            if i in at:
                p.tap(v, at[i])
            v = p.lower(op, v)
        if len(program.ops) in at:
            p.tap(v, at[len(program.ops)])
        return p

    def lower(self, op: Op, v: int) -> int:
        """Append the operations of ``op`` on value ``v``; returns the value it makes."""
        if isinstance(op, Conv):
            return self.conv(v, op.geometry)
        if isinstance(op, Activation):
            return self.relu(v)
        if isinstance(op, Residual):
            u = v
            for inner in op.block:
                u = self.lower(inner, u)
            s = v
            for inner in op.shortcut or ():
                s = self.lower(inner, s)
            return self.add(u, s)
        raise ValueError(f"the compiled conv loop has no operation for {op!r}")

    def _make(
        self, code: int, inputs: tuple[int, ...], shape: tuple[int, int], geometry: tuple = ()
    ) -> int:
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
