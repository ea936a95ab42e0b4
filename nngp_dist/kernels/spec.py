"""Architecture specs: validation, canonical JSON, hash, and evaluation on blocks of inputs.

The canonical spec is what a store records and hashes: two runs share a store only when their
specs hash the same. Keys are sorted, floats written by ``repr`` (exact round trip), so the hash is
stable across processes and machines.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
from typing import Any

from .. import backend
from ..errors import UserError
from . import architectures, fused, nonlinearities, trained
from .conv import ConvGeometry, conv_diagonal_state, conv_input_state, pixels_per_pair
from .layers import Layer, diagonal_state, input_state
from .program import Program
from .state import KernelState

__all__ = ["ARCHITECTURES", "KERNELS", "READOUTS", "Spec"]

ARCHITECTURES = tuple(architectures.BUILDERS)  # ("fc", "conv", "resnet32", "trained")
KERNELS = ("nngp", "ntk")
READOUTS = ("flatten", "gap")

# Rows of a cross block processed together by the elementwise recursion: about 64k entries,
# so the several temporaries of one layer stay in the CPU's L2 cache (faster than unblocked:
# benchmarks/RESULTS.md).
BLOCK_ENTRIES = 1 << 16
# Image networks: map entries (pairs x pixels) per block. Each layer streams through its
# temporaries (k shifted adds per axis), so blocks are larger than a cache: 8 MB per temporary
# on CPUs, 512 MB on GPUs.
CONV_BLOCK_ENTRIES = {"numpy": 1 << 20, "cupy": 1 << 26}

_CONV_KEYS = (
    "filter_size",
    "stride",
    "dilation",
    "padding",
    "skip_every",
    "readout",
    "image_shape",
)


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
    et al. (docs/science.md, Convolutional and residual networks; ``depth`` and the conv
    options do not apply). Image networks need ``image_shape`` (H, W, C); rows of the inputs
    are flattened images. Each architecture's layers are written once, in
    :mod:`.architectures`, as the program (:attr:`program`) every evaluation path reads.

    ``arch="trained"``: the empirical NTK of a trained PyTorch network divided by
    ``prior_precision`` (:mod:`.trained`): ``model`` a ``torch.export`` ``.pt2`` archive or a
    factory ``"module:function"`` (imported only with ``trust=True``), ``weights`` an optional
    ``state_dict`` file, ``output`` "trace" (the sum of the per-output kernels) or the index of
    the one output stored, ``input_shape`` the shape each input row is reshaped to.
    ``model_sha256`` and ``weights_sha256`` are filled in from the files; the other fields do
    not apply. ``trust`` is not part of the canonical dict or the hash.

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
    model: str | None = None
    weights: str | None = None
    prior_precision: float = 1.0
    output: Any = "trace"
    input_shape: Any = None
    model_sha256: str | None = None
    weights_sha256: str | None = None
    trust: bool = dataclasses.field(default=False, compare=False)

    def __post_init__(self) -> None:
        if self.arch == "trained":
            for name, value in trained.check_fields(self).items():
                object.__setattr__(self, name, value)
        elif self.model is not None or self.weights is not None:
            raise ValueError(f"model and weights are for arch='trained', not {self.arch!r}")
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
        if self.is_image:
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
        if self.arch == "trained":
            return trained.spec_dict(self)
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
    def from_dict(cls, d: dict, *, trust: bool = False) -> Spec:
        """Inverse of :meth:`to_dict`; unknown keys are an error.

        Code never comes from a store: without ``trust`` nothing is imported or unpickled. A
        dict whose activation is a Python function (``module:function``) is refused with a
        :class:`~nngp_dist.errors.UserError`, since building it imports that module, which runs
        its code, and a dict read from a store is only as trustworthy as whoever wrote the
        store; a trained network's model factory is imported only when the spec is evaluated,
        and evaluating it is refused likewise (:mod:`.trained`, Safety).
        """
        fields = {f.name for f in dataclasses.fields(cls)} - {"trust"}
        extra = set(d) - fields
        if extra:
            raise ValueError(f"unknown spec keys: {sorted(extra)}")
        target = nonlinearities.imported_function(d.get("activation"))
        if target and not trust:
            raise UserError(
                f"this spec's activation is the Python function {target!r}: building it would "
                f"import {target.partition(':')[0]!r}, which runs that module's code, and a "
                "spec read from a store is only as trustworthy as the store. Pass trust=True "
                "to Spec.from_dict (trust_code=True to KernelStore.open) only for a store you "
                "trust, or build the Spec yourself."
            )
        return cls(**d, trust=trust)

    @classmethod
    def from_json(cls, text: str, *, trust: bool = False) -> Spec:
        """Inverse of :meth:`to_json` (``trust`` as in :meth:`from_dict`)."""
        return cls.from_dict(json.loads(text), trust=trust)

    @property
    def is_image(self) -> bool:
        return self.arch not in ("fc", "trained")

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

    @functools.cached_property
    def program(self) -> Program:
        """The network as one program (:mod:`.program`), built once by its architecture's
        builder (:mod:`.architectures`); every evaluation path, and the cost model, read it."""
        return architectures.build(self)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("program", None)  # derived: rebuilt where it is used, not shipped
        return state

    def layers(self) -> list[Layer]:
        """The layers up to the readout (each op of :attr:`program` as its layer function).

        fc: ``[dense, phi] * depth + [dense]`` (the kernel at depth l follows layer ``2 l + 1``).
        conv: ``[conv, phi] * depth`` (the kernel at depth l is the readout of layer ``2 l``),
        with residual blocks when ``skip_every`` > 0.
        """
        return list(self.program.layers)

    def cross(self, x1: Any, x2: Any, *, depths: list[int] | None = None) -> Any:
        """The kernel between the rows of ``x1`` (n1, d) and ``x2`` (n2, d).

        Returns an (n1, n2) array at ``self.depth``, or with ``depths`` a (len(depths), n1, n2)
        array holding the kernel at each of those depths, all from one pass. Evaluated in the
        inputs' namespace (NumPy or CuPy) and in float64. Image networks take each row as a
        flattened image of ``image_shape``.
        """
        if self.arch == "trained":
            if depths is not None:
                raise ValueError("a trained network's kernel has no depths")
            return trained.cross(self, x1, x2)
        xp = backend.namespace(x1, x2)
        same = x2 is x1  # a set with itself: half the work (see input_state)
        x1 = _as_2d(xp, x1)
        x2 = x1 if same else _as_2d(xp, x2)
        if x1.shape[1] != x2.shape[1]:
            raise ValueError(f"inputs have {x1.shape[1]} and {x2.shape[1]} features")
        if not self.is_image:
            return self.cross_from(input_state(x1, x2), depths=depths)
        shape = self._checked_image_shape(x1.shape[1])
        program = self.program
        slots = program.slots(depths)
        n1, n2 = len(x1), len(x2)
        out = xp.empty((len(slots), n1, n2), dtype=xp.float64)
        if fused.applies(self):  # the compiled program: a CPU loop, or a GPU kernel if it fits
            run = fused.conv_relu_cross if xp.__name__ == "numpy" else fused.conv_relu_cross_gpu
            if run(program, x1, x2, slots, out, ntk=self._ntk, symmetric=same):
                return _result(out, depths)
        full = program.pixels == "full"
        pairs = max(1, CONV_BLOCK_ENTRIES[xp.__name__] // pixels_per_pair(shape, full))
        cols = max(1, min(n2, pairs))
        rows = max(1, pairs // cols)
        for r0 in range(0, n1, rows):
            for c0 in range(0, n2, cols):
                state = conv_input_state(x1[r0 : r0 + rows], x2[c0 : c0 + cols], shape, full=full)
                block = out[:, r0 : r0 + rows, c0 : c0 + cols]
                program.evaluate(state, slots, block, ntk=self._ntk)
        return _result(out, depths)

    def cross_from(self, inputs: KernelState, *, depths: list[int] | None = None) -> Any:
        """:meth:`cross` from the inputs' covariance (:func:`~.layers.input_state`).

        The Gram matrix is the only part of the kernel that depends on the raw inputs, so specs
        that differ only in depth, variances, activation or kernel can share one (a sweep does).
        Dense networks only: an image network's per-pixel covariances are too large to share.
        """
        if self.arch != "fc":
            raise ValueError("cross_from is for fully connected networks; use cross")
        xp = backend.namespace(inputs.nngp)
        slots = self.program.slots(depths)
        n1, n2 = inputs.nngp.shape
        out = xp.empty((len(slots), n1, n2), dtype=xp.float64)
        if xp.__name__ == "numpy" and fused.applies(self):
            fused.dense_relu_cross(
                self.program,
                inputs.nngp,
                inputs.var1,
                inputs.var2,
                slots,
                out,
                ntk=self._ntk,
                symmetric=inputs.symmetric,
            )
            return _result(out, depths)
        return self._cross_layers(inputs, slots, out, depths)

    def _cross_layers(
        self, inputs: KernelState, slots: dict[int, int], out: Any, depths: list[int] | None
    ) -> Any:
        """:meth:`cross_from` layer by layer: the reference, and the path for CuPy arrays."""
        xp = backend.namespace(inputs.nngp)
        n1, n2 = inputs.nngp.shape
        rows = max(1, BLOCK_ENTRIES // max(n2, 1)) if xp.__name__ == "numpy" else max(n1, 1)
        for r0 in range(0, n1, rows):
            block = out[:, r0 : r0 + rows]
            self.program.evaluate(inputs.rows(r0, r0 + rows), slots, block, ntk=self._ntk)
        return _result(out, depths)

    def diag(self, x: Any, *, depths: list[int] | None = None) -> Any:
        """``k(x, x)`` for each row of ``x``: shape (n,), or (len(depths), n) with ``depths``."""
        if self.arch == "trained":
            if depths is not None:
                raise ValueError("a trained network's kernel has no depths")
            return trained.diag(self, x)
        xp = backend.namespace(x)
        x = _as_2d(xp, x)
        program = self.program
        slots = program.slots(depths)
        out = xp.empty((len(slots), x.shape[0]), dtype=xp.float64)
        if not self.is_image:
            program.evaluate(diagonal_state(x), slots, out, ntk=self._ntk)
            return _result(out, depths)
        shape = self._checked_image_shape(x.shape[1])
        full = program.pixels == "full"
        per = max(1, CONV_BLOCK_ENTRIES[xp.__name__] // pixels_per_pair(shape, full))
        for r0 in range(0, len(x), per):
            state = conv_diagonal_state(x[r0 : r0 + per], shape, full=full)
            program.evaluate(state, slots, out[:, r0 : r0 + per], ntk=self._ntk)
        return _result(out, depths)

    @property
    def _ntk(self) -> bool:
        return self.kernel == "ntk"

    def map_entries_per_pair(self) -> int:
        """Map entries one pair of inputs passes through, summed over the layers: what the
        time of an image network's kernel entry scales with (1 per layer for dense nets);
        :meth:`.program.Program.map_entries`."""
        if self.is_image and self.image_shape is None:
            raise ValueError(f"{self.arch} networks need image_shape (H, W, C)")
        return self.program.map_entries()

    def _checked_image_shape(self, features: int) -> tuple[int, int, int]:
        if self.image_shape is None:
            raise ValueError(f"{self.arch} networks need image_shape (H, W, C)")
        if math.prod(self.image_shape) != features:
            raise ValueError(
                f"inputs have {features} features, not H x W x C of image_shape {self.image_shape}"
            )
        return self.image_shape


def _result(out: Any, depths: list[int] | None) -> Any:
    """``out`` for a list of depths, else its one slot."""
    return out if depths is not None else out[0]


def _as_2d(xp: Any, x: Any) -> Any:
    x = xp.asarray(x, dtype=xp.float64)
    return x.reshape(x.shape[0], -1)
