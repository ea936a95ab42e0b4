"""Convolutional layers of infinitely many channels: the ConvNet GP and ResNet GP recursions.

Images are (n, H, W, C). Because the weights of different filter taps are independent, a conv
layer's pre-activations at output pixel g depend on the inputs only through the covariances of
the pixels in g's patch, and with a flattening dense readout only the covariance between
*corresponding* pixels of two images is ever needed (docs/science.md, Convolutional and
residual networks)::

    v_g(X, X') = b_var + w_var * mean_{o in taps} s_{g*stride + o*dilation}(X, X')

(``mean`` over the k x k taps, zero padding counted, since fan_in = C k^2). A conv state
therefore holds, per pair of images, a map of shape (H, W) (``pixels="same"``). Global average
pooling needs the covariance of every pixel of one image with every pixel of the other, a map
of shape (H, W, H, W) per pair (``pixels="full"``), on which a conv layer shifts both pixels by
the same tap. The patch mean is a separable box filter: k shifted adds along the rows, then k
along the columns, on arrays batched over all pairs of a block (no loop over pixels or pairs),
in whichever namespace (NumPy or CuPy) the arrays live.

State layouts (:class:`~.state.KernelState`; ``var1``/``var2`` are the per-pixel variances):

==========  ======================  =====================  =====================
pixels      nngp, ntk               var1                   var2
==========  ======================  =====================  =====================
``same``    (n1, n2, H, W)          (n1, 1, H, W)          (1, n2, H, W)
``full``    (n1, n2, H, W, H, W)    (n1, 1, H, W, 1, 1)    (1, n2, 1, 1, H, W)
==========  ======================  =====================  =====================

The diagonal k(X, X) uses a diagonal state (``same``: three (n, H, W) maps) or, for ``full``,
the cross state of each image with itself with the pair axes merged: nngp (n, H, W, H, W),
var1 (n, H, W, 1, 1), var2 (n, 1, 1, H, W).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .. import backend
from .layers import Layer
from .state import KernelState

__all__ = [
    "ConvGeometry",
    "conv",
    "conv_diagonal_state",
    "conv_input_state",
    "flatten_readout",
    "gap_readout",
    "residual",
]

PADDINGS = ("same", "valid")


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
    """Filter size, stride, dilation and padding of a conv layer; output sizes per axis."""

    filter_size: int
    stride: int = 1
    dilation: int = 1
    padding: str = "same"

    def __post_init__(self) -> None:
        for name in ("filter_size", "stride", "dilation"):
            v = getattr(self, name)
            if isinstance(v, bool) or int(v) != v or v < 1:
                raise ValueError(f"{name.replace('_', ' ')} must be a positive integer, got {v!r}")
            object.__setattr__(self, name, int(v))
        if self.padding not in PADDINGS:
            raise ValueError(f"padding must be 'same' or 'valid', got {self.padding!r}")

    def axis(self, n: int) -> tuple[int, int, int]:
        """(output size, zeros before, zeros after) along an axis of ``n`` pixels."""
        k, s, d = self.filter_size, self.stride, self.dilation
        span = (k - 1) * d + 1
        if self.padding == "valid":
            out = (n - span) // s + 1
            if out < 1:
                raise ValueError(
                    f"a {k}x{k} filter (dilation {d}) with 'valid' padding does not fit in "
                    f"{n} pixels; use --padding same, a smaller filter or fewer layers"
                )
            return out, 0, 0
        out = -(-n // s)
        total = max((out - 1) * s + span - n, 0)
        return out, total // 2, total - total // 2


def _box(a: Any, groups: tuple[tuple[int, ...], tuple[int, ...]], g: ConvGeometry) -> Any:
    """Sum over the k x k taps of ``a``: along each axis group (rows, then columns), the axes
    of a group shifted together (both pixels of a ``full`` map move with the tap)."""
    xp = backend.namespace(a)
    k, s, d = g.filter_size, g.stride, g.dilation
    for group in groups:
        out, lo, hi = g.axis(a.shape[group[0]])
        if lo or hi:
            pad = [(0, 0)] * a.ndim
            for ax in group:
                pad[ax] = (lo, hi)
            a = xp.pad(a, pad)
        acc = None
        for o in range(k):
            idx = [slice(None)] * a.ndim
            for ax in group:
                idx[ax] = slice(o * d, o * d + (out - 1) * s + 1, s)
            term = a[tuple(idx)]
            if acc is None:
                acc = term.copy()
            else:
                acc += term
        a = acc
    return a


def _groups(state: KernelState, which: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    if state.pixels == "same":
        return (-2,), (-1,)
    if state.pixels != "full":
        raise ValueError("a conv layer needs an image state (conv_input_state), not a dense one")
    return {"nngp": ((-4, -2), (-3, -1)), "var1": ((-4,), (-3,)), "var2": ((-2,), (-1,))}[which]


def _affine(a: Any, groups: Any, g: ConvGeometry, w: float, b: float) -> Any:
    out = _box(a, groups, g)
    out *= w / g.filter_size**2
    out += b
    return out


def conv(weight_var: float, bias_var: float, geometry: ConvGeometry) -> Layer:
    """A conv layer of infinitely many channels: ``v -> b_var + w_var * patch-mean(v)``;
    NTK ``Theta -> v' + w_var * patch-mean(Theta)``."""
    w, b = float(weight_var), float(bias_var)

    def conv_layer(state: KernelState) -> KernelState:
        nngp = _affine(state.nngp, _groups(state, "nngp"), geometry, w, b)
        if state.diagonal:
            var1 = var2 = nngp
        else:
            var1 = _affine(state.var1, _groups(state, "var1"), geometry, w, b)
            var2 = _affine(state.var2, _groups(state, "var2"), geometry, w, b)
        ntk = state.ntk
        if ntk is not None:
            if getattr(ntk, "ndim", 0):
                ntk = _affine(ntk, _groups(state, "nngp"), geometry, w, 0.0)
                ntk += nngp
            else:  # the inputs' NTK is zero
                ntk = nngp.copy()
        return state.replace(nngp=nngp, var1=var1, var2=var2, ntk=ntk)

    g = geometry
    conv_layer.__name__ = (
        f"conv({g.filter_size}x{g.filter_size}, stride={g.stride}, dilation={g.dilation}, "
        f"{g.padding}, w_var={w:g}, b_var={b:g})"
    )
    return conv_layer


def residual(block: Layer, shortcut: Layer | None = None) -> Layer:
    """``v -> block(v) + shortcut(v)`` (identity shortcut by default), for the NNGP, the
    variances and the NTK alike: the two branches' weights are independent."""

    def residual_layer(state: KernelState) -> KernelState:
        out = block(state)
        sc = state if shortcut is None else shortcut(state)
        if getattr(out.nngp, "shape", None) != getattr(sc.nngp, "shape", None):
            raise ValueError(
                f"residual branch maps {getattr(sc.nngp, 'shape', ())} to "
                f"{out.nngp.shape}: a strided block needs a projection shortcut"
            )
        nngp = out.nngp + sc.nngp
        if state.diagonal:
            var1 = var2 = nngp
        else:
            var1, var2 = out.var1 + sc.var1, out.var2 + sc.var2
        ntk = None if out.ntk is None else out.ntk + sc.ntk
        return out.replace(nngp=nngp, var1=var1, var2=var2, ntk=ntk)

    return residual_layer


def _mean_pixels(a: Any, pixels: str) -> Any:
    """Mean over corresponding pixels of an nngp or ntk map."""
    if pixels == "same":
        return a.mean(axis=(-2, -1))
    h, w = a.shape[-2:]  # full: the diagonal of the (H, W, H, W) map
    return backend.namespace(a).einsum("...ijij->...", a) / (h * w)


def flatten_readout(weight_var: float, bias_var: float) -> Layer:
    """Flatten the (infinitely many channels x H x W) features, then a dense readout:
    ``K = b_var + w_var * mean_g s_g`` over corresponding pixels."""
    w, b = float(weight_var), float(bias_var)

    def readout(state: KernelState) -> KernelState:
        p = state.pixels
        nngp = b + w * _mean_pixels(state.nngp, p)
        if state.diagonal or (p == "full" and state.nngp.ndim == 5):
            var1 = var2 = nngp
        else:
            var1 = b + w * _flat_var(state.var1, p, 0)
            var2 = b + w * _flat_var(state.var2, p, 1)
        ntk = _readout_ntk(state, nngp, w, lambda a: _mean_pixels(a, p))
        diagonal = state.diagonal or nngp.ndim == 1
        return KernelState(nngp, var1, var2, ntk, diagonal=diagonal)

    readout.__name__ = f"flatten_readout(w_var={w:g}, b_var={b:g})"
    return readout


def _flat_var(v: Any, pixels: str, side: int) -> Any:
    """Pixel-mean of a per-pixel variance, shaped (n1, 1) or (1, n2) as a dense state's."""
    if pixels == "same":
        return v.mean(axis=(-2, -1))
    return v.mean(axis=(-4, -3) if side == 0 else (-2, -1)).reshape(v.shape[:2])


def gap_readout(weight_var: float, bias_var: float) -> Layer:
    """Global average pooling, then a dense readout: ``K = b_var + w_var * mean_{g,g'} s_gg'``
    over all pixel pairs (needs a ``full`` state)."""
    w, b = float(weight_var), float(bias_var)

    def readout(state: KernelState) -> KernelState:
        if state.pixels != "full":
            raise ValueError("global average pooling needs the full pixel-pixel covariance")
        nngp = b + w * state.nngp.mean(axis=(-4, -3, -2, -1))
        ntk = _readout_ntk(state, nngp, w, lambda a: a.mean(axis=(-4, -3, -2, -1)))
        if nngp.ndim == 1:  # an image with itself: the diagonal
            return KernelState(nngp, nngp, nngp, ntk, diagonal=True)
        # k(x, x) of a pooled network needs the full self-covariance, which a cross state does
        # not carry; nothing follows the readout, so the variances are not needed.
        nan = float("nan")
        return KernelState(nngp, nan, nan, ntk)

    readout.__name__ = f"gap_readout(w_var={w:g}, b_var={b:g})"
    return readout


def _readout_ntk(state: KernelState, nngp: Any, w: float, mean: Any) -> Any:
    if state.ntk is None:
        return None
    if not getattr(state.ntk, "ndim", 0):
        return nngp.copy()
    out = mean(state.ntk)
    out *= w
    out += nngp
    return out


def _images(xp: Any, x: Any, image_shape: tuple[int, int, int]) -> Any:
    x = xp.asarray(x, dtype=xp.float64)
    return x.reshape((x.shape[0], *image_shape))


def conv_input_state(
    x1: Any, x2: Any, image_shape: tuple[int, int, int], *, full: bool = False
) -> KernelState:
    """The inputs' per-pixel covariances ``<x_h, x'_h'> / C`` (rows of x are flattened images)."""
    xp = backend.namespace(x1, x2)
    a, b = _images(xp, x1, image_shape), _images(xp, x2, image_shape)
    c = image_shape[2]
    v1, v2 = (a * a).sum(-1) / c, (b * b).sum(-1) / c
    if full:
        nngp = xp.einsum("ahwc,bijc->abhwij", a, b) / c
        return KernelState(
            nngp, v1[:, None, :, :, None, None], v2[None, :, None, None], pixels="full"
        )
    nngp = xp.einsum("ahwc,bhwc->abhw", a, b) / c
    return KernelState(nngp, v1[:, None], v2[None], pixels="same")


def conv_diagonal_state(
    x: Any, image_shape: tuple[int, int, int], *, full: bool = False
) -> KernelState:
    """The state whose recursion gives k(x, x) for each image (see the module docstring)."""
    xp = backend.namespace(x)
    a = _images(xp, x, image_shape)
    c = image_shape[2]
    v = (a * a).sum(-1) / c
    if full:
        nngp = xp.einsum("ahwc,aijc->ahwij", a, a) / c
        return KernelState(nngp, v[:, :, :, None, None], v[:, None, None], pixels="full")
    return KernelState(v, v, v, diagonal=True, pixels="same")


def pixels_per_pair(image_shape: tuple[int, int, int], full: bool) -> int:
    """Map entries per pair of images: what a tile's memory and time scale with."""
    hw = image_shape[0] * image_shape[1]
    return hw * hw if full else hw
