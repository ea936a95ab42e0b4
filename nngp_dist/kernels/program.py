"""A network as one program: the list of operations every evaluation path reads.

As in neural-tangents' ``stax``, a network is a composition of layers over one kernel state
(:class:`~.state.KernelState`). A :class:`Program` writes that composition down once, as data:

- ``ops``, the layers in order: :class:`Dense` and :class:`Conv` (weight and bias variances,
  and a conv's :class:`~.conv.ConvGeometry`), :class:`Activation` (a
  :class:`~.nonlinearities.Nonlinearity`), and :class:`Residual` (a block of ops summed with a
  shortcut of ops, or with its input);
- ``readout``, applied wherever the kernel is read: a :class:`Readout` (flatten or global
  average pooling, then a dense layer) for image networks, None for dense ones (whose last
  ``Dense`` is the readout);
- ``taps``: for each depth at which the kernel can be read, the number of ops before it.

Who reads it:

- :meth:`Program.evaluate`, the layer-by-layer path: each op as its layer function
  (:mod:`.layers`, :mod:`.conv`, :mod:`.nonlinearities`). The reference, and the path of every
  network that no compiled loop covers;
- :mod:`.fused` lowers it to the compiled loops: to the constants of the dense loop, or to the
  opcode arrays (:mod:`.opcodes`) of :class:`.fused.ConvProgram`, which the CPU loop
  (:mod:`._relu_loop`) and the GPU kernel (:mod:`._gpu_program`) run;
- :meth:`Program.map_entries`, the cost model behind an image network's tile size
  (:func:`nngp_dist.tiling.image_tile_size`).

:mod:`.architectures` builds the program of each architecture, the one place each is written.
An op is any object with a ``layer()`` method returning its layer function; the lowerings know
the ops above and leave a program holding any other op to the layer-by-layer path.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Mapping
from typing import Any

from .conv import ConvGeometry, conv, flatten_readout, gap_readout, residual
from .layers import Layer, dense, serial
from .nonlinearities import Nonlinearity
from .state import KernelState

__all__ = ["Activation", "Conv", "Dense", "Op", "Program", "Readout", "Residual"]


@dataclasses.dataclass(frozen=True)
class Dense:
    """A dense layer of infinite width (:func:`.layers.dense`)."""

    weight_var: float
    bias_var: float

    def layer(self) -> Layer:
        return dense(self.weight_var, self.bias_var)


@dataclasses.dataclass(frozen=True)
class Conv:
    """A conv layer of infinitely many channels (:func:`.conv.conv`)."""

    weight_var: float
    bias_var: float
    geometry: ConvGeometry

    def layer(self) -> Layer:
        return conv(self.weight_var, self.bias_var, self.geometry)


@dataclasses.dataclass(frozen=True)
class Activation:
    """An elementwise nonlinearity, itself a layer (:class:`.nonlinearities.Nonlinearity`)."""

    phi: Nonlinearity

    def layer(self) -> Layer:
        return self.phi


@dataclasses.dataclass(frozen=True)
class Residual:
    """``block(v) + shortcut(v)``, the shortcut the identity when None (:func:`.conv.residual`)."""

    block: tuple[Op, ...]
    shortcut: tuple[Op, ...] | None = None

    def layer(self) -> Layer:
        shortcut = None if self.shortcut is None else _serial(self.shortcut)
        return residual(_serial(self.block), shortcut)


@dataclasses.dataclass(frozen=True)
class Readout:
    """An image network's readout: ``"flatten"`` the features or global average pool them
    (``"gap"``), then a dense layer (:func:`.conv.flatten_readout`, :func:`.conv.gap_readout`)."""

    pooling: str
    weight_var: float
    bias_var: float

    def layer(self) -> Layer:
        make = gap_readout if self.pooling == "gap" else flatten_readout
        return make(self.weight_var, self.bias_var)


Op = Dense | Conv | Activation | Residual


def _serial(ops: tuple[Op, ...]) -> Layer:
    return serial(*(op.layer() for op in ops))


@dataclasses.dataclass(frozen=True)
class Program:
    """A network: ``ops`` in order, the ``readout`` applied where the kernel is read, and
    ``taps``, depth -> number of ops after which the kernel at that depth is read.

    ``image_shape`` (H, W, C) for image networks (None until known); ``full_depth_only``: the
    kernel is read at the network's full depth only, even where ``taps`` could hold more
    (residual networks).
    """

    ops: tuple[Op, ...]
    taps: Mapping[int, int]
    readout: Readout | None = None
    image_shape: tuple[int, int, int] | None = None
    full_depth_only: bool = False

    @property
    def depth(self) -> int:
        """The network's full depth: the deepest tap."""
        return max(self.taps)

    @property
    def pixels(self) -> str:
        """The inputs' state layout: "none" (dense), "same" or "full" (:mod:`.conv`)."""
        if self.readout is None:
            return "none"
        return "full" if self.readout.pooling == "gap" else "same"

    @functools.cached_property
    def layers(self) -> tuple[Layer, ...]:
        """Each op's layer function, made once."""
        return tuple(op.layer() for op in self.ops)

    def slots(self, depths: list[int] | None = None) -> dict[int, int]:
        """Depth -> output slot for the kernel at each of ``depths`` (default: full depth)."""
        depths = [self.depth] if depths is None else list(depths)
        if self.full_depth_only and depths != [self.depth]:
            raise ValueError("residual networks give their kernel at full depth only")
        if any(d not in self.taps for d in depths) or len(set(depths)) != len(depths):
            raise ValueError(f"depths must be distinct and in 0..{self.depth}, got {depths}")
        return {d: k for k, d in enumerate(depths)}

    def op_slots(self, slots: Mapping[int, int]) -> dict[int, int]:
        """:meth:`slots` by position: number of ops before each read -> output slot."""
        self.slots(sorted(slots, key=slots.__getitem__))  # checks the depths
        return {self.taps[d]: slot for d, slot in slots.items()}

    def evaluate(
        self, state: KernelState, slots: Mapping[int, int], out: Any, *, ntk: bool
    ) -> None:
        """The layer-by-layer path: apply the layers to the inputs' ``state``, writing the
        kernel (the NTK where ``ntk``, else the NNGP) at each depth ``d`` of ``slots`` into
        ``out[slots[d]]``."""
        state = state.replace(ntk=0.0 if ntk else None)
        readout = None if self.readout is None else self.readout.layer()
        at = self.op_slots(slots)

        def emit(st: KernelState, slot: int) -> None:
            st = readout(st) if readout is not None else st
            out[slot] = st.ntk if ntk else st.nngp

        if 0 in at:
            emit(state, at[0])
        for i, layer in enumerate(self.layers, 1):
            state = layer(state)
            if i in at:
                emit(state, at[i])

    def depth_path(self) -> Iterator[Op]:
        """The ops along the network's depth: residual blocks, not their shortcuts."""
        return _depth_path(self.ops)

    def map_entries(self) -> int:
        """Map entries one pair of inputs passes through, summed along the network's depth:
        what the time of an image network's kernel entry scales with.

        Dense networks count one entry per op. Image networks count each conv's output map
        twice, once for the conv and once for the activation that goes with it; residual sums
        and shortcuts are not counted. Kept exactly so: a store's default tile size follows
        from it (:func:`nngp_dist.tiling.image_tile_size`), and a store refuses another.
        """
        if self.readout is None:
            return sum(1 for _ in self.depth_path())
        if self.image_shape is None:
            raise ValueError("image networks need image_shape (H, W, C)")
        h, w, _ = self.image_shape
        power = 2 if self.pixels == "full" else 1
        total = 0
        for op in self.depth_path():
            if isinstance(op, Conv):
                h, w = op.geometry.axis(h)[0], op.geometry.axis(w)[0]
                total += 2 * (h * w) ** power
        return max(total, 1)


def _depth_path(ops: tuple[Op, ...]) -> Iterator[Op]:
    for op in ops:
        if isinstance(op, Residual):
            yield from _depth_path(op.block)
        else:
            yield op
