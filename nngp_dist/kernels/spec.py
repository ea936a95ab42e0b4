"""Architecture specs: validation, canonical JSON, hash, and evaluation on blocks of inputs.

The canonical spec is what a store records and hashes: two runs share a store only when their
specs hash the same. Keys are sorted, floats written by ``repr`` (exact round trip), so the hash is
stable across processes and machines.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from typing import Any, NamedTuple

from .. import backend
from . import fused, nonlinearities
from .conv import (
    ConvGeometry,
    conv,
    conv_diagonal_state,
    conv_input_state,
    flatten_readout,
    gap_readout,
    pixels_per_pair,
    residual,
)
from .layers import Layer, dense, diagonal_state, input_state, serial
from .state import KernelState

__all__ = ["ARCHITECTURES", "KERNELS", "READOUTS", "Spec"]

ARCHITECTURES = ("fc", "conv", "resnet32")
KERNELS = ("nngp", "ntk")
READOUTS = ("flatten", "gap")

# Rows of a cross block processed together by the elementwise recursion: about 64k entries,
# so the several temporaries of one layer stay in the CPU's L2 cache (measured: 41 ns/entry for
# the ReLU step blocked, 55 ns unblocked, on the 2-core EPYC dev machine).
BLOCK_ENTRIES = 1 << 16
# Image networks: map entries (pairs x pixels) per block. Each layer streams through its
# temporaries (k shifted adds per axis), so blocks are larger than a cache: 8 MB per temporary
# on CPUs, 512 MB on GPUs.
CONV_BLOCK_ENTRIES = {"numpy": 1 << 20, "cupy": 1 << 26}

_CONV_KEYS = ("filter_size", "stride", "dilation", "padding", "skip_every", "readout",
              "image_shape")  # fmt: skip


class _Program(NamedTuple):
    layers: list[Layer]
    readout: Layer | None
    taps: dict[int, int]


@dataclasses.dataclass(frozen=True)
class Spec:
    """A network architecture whose infinite-width kernel is computed.

    ``arch="fc"``: ``depth`` hidden dense layers of infinite width, each followed by
    ``activation``, then a dense readout; weights ``N(0, weight_var / fan_in)``, biases
    ``N(0, bias_var)``. ``kernel`` selects the NNGP or the NTK (NTK parameterisation).

    ``arch="conv"``: ``depth`` conv layers of infinitely many channels (``filter_size`` x
    ``filter_size`` filters, ``stride``, ``dilation``, ``padding`` "same" or "valid"; fan_in =
    channels x filter_size^2), each followed by ``activation``; with ``skip_every=S`` > 0, a
    pre-activation residual connection around every S (activation, conv) pairs after the first
    conv; then ``readout`` "flatten" (dense layer on the flattened features) or "gap" (global
    average pooling, then a dense layer). ``arch="resnet32"``: the ResNet GP of Garriga-Alonso
    et al. (SCIENCE.md section 2; ``depth`` and the conv options do not apply). Image networks
    need ``image_shape`` (H, W, C); rows of the inputs are flattened images.

    Examples
    --------
    >>> import numpy as np
    >>> spec = Spec(depth=2, weight_var=1.5, bias_var=0.1)
    >>> x = np.random.default_rng(0).random((4, 10))
    >>> k = spec.cross(x, x)
    >>> bool(np.allclose(np.diag(k), spec.diag(x)))
    True
    >>> cnn = Spec(arch="conv", depth=2, filter_size=3, image_shape=(5, 5, 2))
    >>> cnn.cross(np.ones((2, 50)), np.ones((3, 50))).shape
    (2, 3)
    """

    arch: str = "fc"
    depth: int = 3
    weight_var: float = 1.0
    bias_var: float = 0.0
    activation: Any = "relu"
    kernel: str = "nngp"
    filter_size: int = 3
    stride: int = 1
    dilation: int = 1
    padding: str = "same"
    skip_every: int = 0
    readout: str = "flatten"
    image_shape: Any = None

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ValueError(
                f"unknown architecture {self.arch!r}; this version supports: "
                + ", ".join(ARCHITECTURES)
            )
        if self.kernel not in KERNELS:
            raise ValueError(f"unknown kernel {self.kernel!r}; choose one of {', '.join(KERNELS)}")
        if isinstance(self.depth, bool) or int(self.depth) != self.depth or self.depth < 0:
            raise ValueError(f"depth must be a non-negative integer, got {self.depth!r}")
        for name in ("weight_var", "bias_var"):
            v = float(getattr(self, name))
            if not v >= 0.0 or v == float("inf"):
                raise ValueError(f"{name} must be finite and >= 0, got {v}")
            object.__setattr__(self, name, v)
        if float(self.weight_var) == 0.0:
            raise ValueError("weight_var must be positive")
        object.__setattr__(self, "depth", int(self.depth))
        phi = self.activation
        if not isinstance(phi, nonlinearities.Nonlinearity):
            phi = nonlinearities.from_spec(phi)
        object.__setattr__(self, "activation", phi)
        if self.arch != "fc":
            ConvGeometry(self.filter_size, self.stride, self.dilation, self.padding)  # checks
            for name in ("filter_size", "stride", "dilation"):
                object.__setattr__(self, name, int(getattr(self, name)))
            if (
                isinstance(self.skip_every, bool)
                or int(self.skip_every) != self.skip_every
                or (self.skip_every < 0)
            ):
                raise ValueError(f"skip_every must be an integer >= 0, got {self.skip_every!r}")
            object.__setattr__(self, "skip_every", int(self.skip_every))
            if self.readout not in READOUTS:
                raise ValueError(f"readout must be flatten or gap, got {self.readout!r}")
            if self.arch == "resnet32" and self.readout != "flatten":
                raise ValueError("resnet32 has a dense readout (readout='flatten')")
        if self.image_shape is not None:
            shape = tuple(int(v) for v in self.image_shape)
            if len(shape) != 3 or min(shape) < 1:
                raise ValueError(f"image_shape must be (H, W, C), got {self.image_shape!r}")
            object.__setattr__(self, "image_shape", shape)

    # --- canonical form ---------------------------------------------------------------------

    def to_dict(self) -> dict:
        """The canonical, JSON-able description (what stores record)."""
        d = {
            "arch": self.arch,
            "depth": self.depth,
            "weight_var": self.weight_var,
            "bias_var": self.bias_var,
            "activation": self.activation.spec,
            "kernel": self.kernel,
        }
        if self.arch == "conv":
            d.update({k: getattr(self, k) for k in _CONV_KEYS})
        elif self.arch == "resnet32":
            del d["depth"]
            d["image_shape"] = self.image_shape
        if d.get("image_shape") is not None:
            d["image_shape"] = list(d["image_shape"])
        return d

    def to_json(self) -> str:
        """Canonical JSON: sorted keys, no whitespace."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @property
    def hash(self) -> str:
        """SHA-256 of :meth:`to_json`, hex."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    @classmethod
    def from_dict(cls, d: dict) -> Spec:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        fields = {f.name for f in dataclasses.fields(cls)}
        extra = set(d) - fields
        if extra:
            raise ValueError(f"unknown spec keys: {sorted(extra)}")
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> Spec:
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(text))

    @property
    def is_image(self) -> bool:
        return self.arch != "fc"

    def with_image_shape(self, shape: tuple[int, ...]) -> Spec:
        """This spec for images of ``shape`` ((H, W) or (H, W, C)); dense nets ignore it."""
        if not self.is_image:
            return self
        if len(shape) == 2:
            shape = (*shape, 1)
        if len(shape) != 3:
            raise ValueError(
                f"{self.arch} networks need images of shape (H, W) or (H, W, C); the inputs "
                f"have shape {tuple(shape)} per example"
            )
        return dataclasses.replace(self, image_shape=tuple(shape))

    # --- evaluation -------------------------------------------------------------------------

    def layers(self) -> list[Layer]:
        """The layers up to the readout; :meth:`_readout` finishes image networks.

        fc: ``[dense, phi] * depth + [dense]`` (the kernel at depth l follows layer ``2 l``).
        conv: ``[conv, phi] * depth`` (the kernel at depth l is the readout of layer ``2 l``),
        with residual blocks when ``skip_every`` > 0.
        """
        w, b, phi = self.weight_var, self.bias_var, self.activation
        if self.arch == "fc":
            d = dense(w, b)
            return [d, phi] * self.depth + [d]
        if self.arch == "resnet32":
            return _resnet32_layers(w, b, phi)
        c = conv(w, b, ConvGeometry(self.filter_size, self.stride, self.dilation, self.padding))
        if not self.skip_every or self.depth < 2:
            return [c, phi] * self.depth
        out: list[Layer] = [c]
        pairs = self.depth - 1
        s = self.skip_every
        for start in range(0, pairs, s):
            n = min(s, pairs - start)
            block = serial(*([phi, c] * n))
            out.append(residual(block) if n == s else block)
        return out + [phi]

    def _readout(self) -> Layer | None:
        if not self.is_image:
            return None
        if self.readout == "gap":
            return gap_readout(self.weight_var, self.bias_var)
        return flatten_readout(self.weight_var, self.bias_var)

    def _out(self, state: KernelState) -> Any:
        return state.ntk if self.kernel == "ntk" else state.nngp

    def cross(self, x1: Any, x2: Any, *, depths: list[int] | None = None) -> Any:
        """The kernel between the rows of ``x1`` (n1, d) and ``x2`` (n2, d).

        Returns an (n1, n2) array at ``self.depth``, or with ``depths`` a (len(depths), n1, n2)
        array holding the kernel at each of those depths, all from one pass. Evaluated in the
        inputs' namespace (NumPy or CuPy) and in float64. Image networks take each row as a
        flattened image of ``image_shape``.
        """
        xp = backend.namespace(x1, x2)
        same = x2 is x1  # a set with itself: half the work (see input_state)
        x1 = _as_2d(xp, x1)
        x2 = x1 if same else _as_2d(xp, x2)
        if x1.shape[1] != x2.shape[1]:
            raise ValueError(f"inputs have {x1.shape[1]} and {x2.shape[1]} features")
        if not self.is_image:
            return self.cross_from(input_state(x1, x2), depths=depths)
        shape = self._checked_image_shape(x1.shape[1])
        full = self.readout == "gap"
        program = self._program(depths)
        n1, n2 = len(x1), len(x2)
        out = xp.empty((len(program.taps), n1, n2), dtype=xp.float64)
        if fused.applies(self):  # the compiled program: a CPU loop, or a GPU kernel if it fits
            run = fused.conv_relu_cross if xp.__name__ == "numpy" else fused.conv_relu_cross_gpu
            if run(self, x1, x2, self._slots_by_depth(depths), out, symmetric=same):
                return out if depths is not None else out[0]
        pairs = max(1, CONV_BLOCK_ENTRIES[xp.__name__] // pixels_per_pair(shape, full))
        cols = max(1, min(n2, pairs))
        rows = max(1, pairs // cols)
        for r0 in range(0, n1, rows):
            for c0 in range(0, n2, cols):
                state = conv_input_state(x1[r0 : r0 + rows], x2[c0 : c0 + cols], shape, full=full)
                self._run(state, program, out[:, r0 : r0 + rows, c0 : c0 + cols])
        return out if depths is not None else out[0]

    def cross_from(self, inputs: KernelState, *, depths: list[int] | None = None) -> Any:
        """:meth:`cross` from the inputs' covariance (:func:`~.layers.input_state`).

        The Gram matrix is the only part of the kernel that depends on the raw inputs, so specs
        that differ only in depth, variances, activation or kernel can share one (a sweep does).
        Dense networks only: an image network's per-pixel covariances are too large to share.
        """
        if self.is_image:
            raise ValueError("cross_from is for fully connected networks; use cross")
        xp = backend.namespace(inputs.nngp)
        program = self._program(depths)
        n1, n2 = inputs.nngp.shape
        out = xp.empty((len(program.taps), n1, n2), dtype=xp.float64)
        if xp.__name__ == "numpy" and fused.applies(self):
            fused.dense_relu_cross(self, inputs.nngp, inputs.var1, inputs.var2,
                                   self._slots_by_depth(depths), out,
                                   symmetric=inputs.symmetric)  # fmt: skip
            return out if depths is not None else out[0]
        return self._cross_layers(inputs, program, out, depths)

    def _cross_layers(self, inputs: KernelState, program: _Program, out: Any,
                      depths: list[int] | None) -> Any:  # fmt: skip
        """:meth:`cross_from` layer by layer: the reference, and the path for CuPy arrays."""
        xp = backend.namespace(inputs.nngp)
        n1, n2 = inputs.nngp.shape
        rows = max(1, BLOCK_ENTRIES // max(n2, 1)) if xp.__name__ == "numpy" else max(n1, 1)
        for r0 in range(0, n1, rows):
            self._run(inputs.rows(r0, r0 + rows), program, out[:, r0 : r0 + rows])
        return out if depths is not None else out[0]

    def diag(self, x: Any, *, depths: list[int] | None = None) -> Any:
        """``k(x, x)`` for each row of ``x``: shape (n,), or (len(depths), n) with ``depths``."""
        xp = backend.namespace(x)
        x = _as_2d(xp, x)
        program = self._program(depths)
        out = xp.empty((len(program.taps), x.shape[0]), dtype=xp.float64)
        if not self.is_image:
            self._run(diagonal_state(x), program, out)
            return out if depths is not None else out[0]
        shape = self._checked_image_shape(x.shape[1])
        full = self.readout == "gap"
        per = max(1, CONV_BLOCK_ENTRIES[xp.__name__] // pixels_per_pair(shape, full))
        for r0 in range(0, len(x), per):
            state = conv_diagonal_state(x[r0 : r0 + per], shape, full=full)
            self._run(state, program, out[:, r0 : r0 + per])
        return out if depths is not None else out[0]

    def _run(self, state: KernelState, program: _Program, out: Any) -> None:
        """Apply the layers to ``state``, writing the kernel at each tap into ``out[slot]``."""
        state = state.replace(ntk=0.0 if self.kernel == "ntk" else None)
        readout, taps = program.readout, program.taps

        def emit(st: KernelState, slot: int) -> None:
            out[slot] = self._out(readout(st) if readout is not None else st)

        if 0 in taps:
            emit(state, taps[0])
        for i, layer in enumerate(program.layers, 1):
            state = layer(state)
            if i in taps:
                emit(state, taps[i])

    def _program(self, depths: list[int] | None) -> _Program:
        """The layers, the readout and the taps, built once per evaluation (not per block)."""
        layers = self.layers()
        return _Program(layers, self._readout(), self._taps(depths, len(layers)))

    def _taps(self, depths: list[int] | None, n_layers: int) -> dict[int, int]:
        """Layer counts after which each requested depth's kernel is read -> output slot."""
        depths = [self.depth] if depths is None else list(depths)
        if self.arch == "resnet32" or (self.is_image and self.skip_every):
            if depths != [self.depth]:
                raise ValueError("residual networks give their kernel at full depth only")
            return {n_layers: 0}
        bad = [d for d in depths if not 0 <= d <= self.depth]
        if bad or len(set(depths)) != len(depths):
            raise ValueError(f"depths must be distinct and in 0..{self.depth}, got {depths}")
        offset = 0 if self.is_image else 1
        return {2 * d + offset: k for k, d in enumerate(depths)}

    def _slots_by_depth(self, depths: list[int] | None) -> dict[int, int]:
        """Depth -> output slot, for the compiled loops (``depths`` checked by :meth:`_taps`)."""
        return {d: k for k, d in enumerate([self.depth] if depths is None else depths)}

    def map_entries_per_pair(self) -> int:
        """Map entries one pair of inputs passes through, summed over the layers: what the
        time of an image network's kernel entry scales with (1 per layer for dense nets)."""
        if not self.is_image:
            return 2 * self.depth + 1
        if self.image_shape is None:
            raise ValueError(f"{self.arch} networks need image_shape (H, W, C)")
        h, w, _ = self.image_shape
        full = self.readout == "gap"
        geometry = ConvGeometry(self.filter_size, self.stride, self.dilation, self.padding)
        plan = [geometry] * self.depth
        if self.arch == "resnet32":
            plan = [ConvGeometry(3)]
            for stride in (1, 2, 2):
                plan += [ConvGeometry(3, stride=stride)] + [ConvGeometry(3)] * 9
        total = 0
        for g in plan:
            h, w = g.axis(h)[0], g.axis(w)[0]
            total += 2 * (h * w) ** (2 if full else 1)  # the conv and the nonlinearity
        return max(total, 1)

    def _checked_image_shape(self, features: int) -> tuple[int, int, int]:
        if self.image_shape is None:
            raise ValueError(f"{self.arch} networks need image_shape (H, W, C)")
        if math.prod(self.image_shape) != features:
            raise ValueError(
                f"inputs have {features} features, not H x W x C of image_shape {self.image_shape}"
            )
        return self.image_shape


def _resnet32_layers(w: float, b: float, phi: Layer, blocks_per_stage: int = 5) -> list[Layer]:
    """Garriga-Alonso et al.'s ResNet GP: a 3x3 conv, then 3 stages of 5 pre-activation blocks
    (phi, 3x3 conv, phi, 3x3 conv; strides 1, 2, 2 on each stage's first conv, whose block has
    a 1x1 projection shortcut of the same stride on the block's input), then phi (the dense
    readout follows). 31 conv layers + the readout = 32."""
    c3 = conv(w, b, ConvGeometry(3))
    layers: list[Layer] = [c3]
    for stride in (1, 2, 2):
        for blk in range(blocks_per_stage):
            s = stride if blk == 0 else 1
            block = serial(phi, conv(w, b, ConvGeometry(3, stride=s)), phi, c3)
            shortcut = conv(w, b, ConvGeometry(1, stride=s)) if blk == 0 else None
            layers.append(residual(block, shortcut))
    return layers + [phi]


def _as_2d(xp: Any, x: Any) -> Any:
    x = xp.asarray(x, dtype=xp.float64)
    return x.reshape(x.shape[0], -1)
