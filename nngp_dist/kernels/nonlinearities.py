"""Nonlinearities as kernel layers: closed forms where they exist, quadrature for any other phi.

Each nonlinearity maps the covariance of pre-activations ``(k12, k11, k22)`` to

* ``F(k12, k11, k22) = E[phi(u) phi(v)]`` and
* ``Fdot(k12, k11, k22) = E[phi'(u) phi'(v)]`` (needed only for the NTK),

with ``(u, v) ~ N(0, [[k11, k12], [k12, k22]])`` (docs/science.md, Fully connected networks).
A :class:`Nonlinearity` is itself a layer: calling it on a :class:`KernelState` applies the
map.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from .. import backend
from .state import KernelState

__all__ = [
    "ACTIVATIONS",
    "Nonlinearity",
    "elementwise",
    "erf",
    "from_spec",
    "gelu",
    "leaky_relu",
    "linear",
    "relu",
    "tanh",
]

Moments = Callable[[Any, Any, Any, bool], tuple[Any, Any]]


@dataclasses.dataclass(frozen=True)
class Nonlinearity:
    """An elementwise nonlinearity seen through its Gaussian moments.

    ``moments(k12, k11, k22, need_dot)`` returns ``(F, Fdot)`` (``Fdot`` None unless asked);
    ``variance(k)`` returns ``F(k, k, k)`` exactly, for the diagonal. ``spec`` is the canonical
    JSON-able description recorded in stores.
    """

    name: str
    spec: dict
    moments: Moments = dataclasses.field(repr=False, compare=False)
    variance: Callable[[Any], Any] = dataclasses.field(repr=False, compare=False)

    @property
    def __name__(self) -> str:  # layers read well in reprs and errors
        return self.name

    def __call__(self, state: KernelState) -> KernelState:
        need_dot = state.ntk is not None
        f, fdot = self.moments(state.nngp, state.var1, state.var2, need_dot)
        if state.diagonal:
            f = self.variance(state.var1)
            var1 = var2 = f
        else:
            var1, var2 = self.variance(state.var1), self.variance(state.var2)
        ntk = fdot * state.ntk if need_dot else None
        return state.replace(nngp=f, var1=var1, var2=var2, ntk=ntk)


# --- closed forms ---------------------------------------------------------------------------


def _relu_moments(k12: Any, k11: Any, k22: Any, need_dot: bool) -> tuple[Any, Any]:
    return _leaky_relu_moments(k12, k11, k22, need_dot, 0.0)


def _leaky_relu_moments(
    k12: Any, k11: Any, k22: Any, need_dot: bool, alpha: float
) -> tuple[Any, Any]:
    """``F`` and ``Fdot`` of leaky ReLU (ReLU: ``alpha = 0``); see :func:`leaky_relu`.

    ReLU's is the arc-cosine kernel of degree 1 (Cho & Saul 2009) in the stable arctan2
    form: ``sqrt(k11 k22) (sin t + (pi - t) cos t) / (2 pi) = (s + (pi - t) k12) / (2 pi)``
    with ``s = sqrt(k11 k22 - k12^2) = sqrt(k11 k22) sin t``. NumPy: about ten array passes.
    CuPy: one fused GPU pass (:data:`RELU_CUDA_BODY`), so a ConvNet's ReLU step reads its
    three maps once and writes its one or two once."""
    xp = backend.namespace(k12, k11, k22)
    if not xp.broadcast_shapes(xp.shape(k12), xp.shape(k11), xp.shape(k22)):  # all 0-d
        f, fdot = _leaky_relu_moments(
            *(xp.reshape(xp.asarray(a), (1,)) for a in (k12, k11, k22)), need_dot, alpha
        )
        return f[0], (fdot[0] if need_dot else None)
    c = (1.0 - alpha) ** 2
    if xp.__name__ == "cupy":
        if need_dot:
            return _relu_cuda(True)(k12, k11, k22, alpha, c)
        return _relu_cuda(False)(k12, k11, k22, alpha, c), None
    s = k11 * k22
    s -= k12 * k12
    xp.maximum(s, 0.0, out=s)
    xp.sqrt(s, out=s)
    theta = xp.arctan2(s, k12)
    xp.subtract(math.pi, theta, out=theta)  # now pi - theta
    f = theta * k12
    f += s
    f *= _INV_2PI
    if alpha:
        f *= c
        f += alpha * k12
    if not need_dot:
        return f, None
    theta *= _INV_2PI
    if alpha:
        theta *= c
        theta += alpha
    return f, theta


_INV_2PI = 1.0 / (2.0 * math.pi)
# The same arithmetic for one element, as CUDA C (and C: the tests compile it on the CPU).
# Constants are written as the shortest decimals that round-trip, so they are NumPy's doubles.
RELU_CUDA_BODY = f"""
double s = sqrt(fmax(k11 * k22 - k12 * k12, 0.0));
double pmt = {math.pi!r} - atan2(s, k12);
f = (pmt * k12 + s) * {_INV_2PI!r};
if (alpha != 0.0) f = f * c + alpha * k12;
"""
RELU_CUDA_DOT = f"""
fdot = pmt * {_INV_2PI!r};
if (alpha != 0.0) fdot = fdot * c + alpha;
"""


@functools.lru_cache(maxsize=2)
def _relu_cuda(need_dot: bool) -> Any:
    """The fused CuPy kernel of the ReLU family: inputs broadcast like NumPy's, outputs new
    float64 arrays. Compiled by CuPy on first use (and cached on disk by CuPy)."""
    import cupy

    out = "float64 f, float64 fdot" if need_dot else "float64 f"
    return cupy.ElementwiseKernel(
        "float64 k12, float64 k11, float64 k22, float64 alpha, float64 c",
        out,
        RELU_CUDA_BODY + (RELU_CUDA_DOT if need_dot else ""),
        f"nngp_dist_leaky_relu{'_ntk' if need_dot else ''}",
        # No fused multiply-adds, so the GPU rounds as NumPy does: an image paired with itself
        # keeps k11 k22 - k12^2 exactly 0, where an FMA would leave its rounding error, which
        # arctan2 turns into ~1e-8 in the NTK.
        options=("--fmad=false",),
    )


def relu() -> Nonlinearity:
    """ReLU, ``max(0, x)``: the arc-cosine kernel of Cho & Saul (2009), in closed form.

    Examples
    --------
    >>> import numpy as np
    >>> f, fdot = relu().moments(np.array(0.0), np.array(1.0), np.array(1.0), True)
    >>> round(float(f), 6), float(fdot)
    (0.159155, 0.25)
    """
    return Nonlinearity("relu", {"name": "relu"}, _relu_moments, lambda k: 0.5 * k)


def leaky_relu(alpha: float) -> Nonlinearity:
    """Leaky ReLU ``max(alpha x, x)`` for ``0 <= alpha < 1``, in closed form.

    ``phi = alpha x + (1 - alpha) relu(x)``, and ``E[u relu(v)] = k12 / 2``, hence
    ``F = alpha k12 + (1 - alpha)^2 F_relu`` and ``Fdot = alpha + (1 - alpha)^2 Fdot_relu``.
    """
    alpha = float(alpha)
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"leaky_relu needs 0 <= alpha < 1, got {alpha}")
    c = (1.0 - alpha) ** 2

    def moments(k12: Any, k11: Any, k22: Any, need_dot: bool) -> tuple[Any, Any]:
        return _leaky_relu_moments(k12, k11, k22, need_dot, alpha)

    def variance(k: Any) -> Any:
        return (alpha + 0.5 * c) * k

    return Nonlinearity(
        f"leaky_relu({alpha:g})", {"name": "leaky_relu", "alpha": alpha}, moments, variance
    )


def erf() -> Nonlinearity:
    """The error function, in closed form (Williams 1997)."""

    def moments(k12: Any, k11: Any, k22: Any, need_dot: bool) -> tuple[Any, Any]:
        xp = backend.namespace(k12, k11, k22)
        d = (1.0 + 2.0 * k11) * (1.0 + 2.0 * k22)
        f = xp.arcsin(xp.clip(2.0 * k12 / xp.sqrt(d), -1.0, 1.0)) * (2.0 / math.pi)
        if not need_dot:
            return f, None
        fdot = (4.0 / math.pi) / xp.sqrt(xp.maximum(d - 4.0 * k12 * k12, 1e-300))
        return f, fdot

    def variance(k: Any) -> Any:
        xp = backend.namespace(k)
        return (2.0 / math.pi) * xp.arcsin(2.0 * k / (1.0 + 2.0 * k))

    return Nonlinearity("erf", {"name": "erf"}, moments, variance)


def linear() -> Nonlinearity:
    """The identity: a deep linear network. ``F = k12``, ``Fdot = 1``."""

    def moments(k12: Any, k11: Any, k22: Any, need_dot: bool) -> tuple[Any, Any]:
        xp = backend.namespace(k12)
        return k12.copy(), (xp.ones_like(k12) if need_dot else None)

    return Nonlinearity("linear", {"name": "linear"}, moments, lambda k: k.copy())


# --- quadrature for any phi -----------------------------------------------------------------

DEFAULT_ORDER = 73
_HALF_WIDTH = 9.0  # the N(0, 1) density beyond |z| = 9 is below 3e-18 of its peak


_MAX_NODES = 1000


def _order_for(order: int, kmax: float) -> int:
    """Nodes per axis for variances up to ``kmax``: the spacing shrinks like 1 / sqrt(kmax) past
    2.5, since the singularities of functions like tanh(sqrt(k) z) near the real axis approach
    it like 1 / sqrt(k) (measured: tanh to 3e-9 relative, Fdot included, at variance 25)."""
    n = order if kmax <= 2.5 else math.ceil(order * math.sqrt(kmax / 2.5))
    if n > _MAX_NODES:
        raise ValueError(
            f"quadrature: variance {kmax:.3g} needs {n} nodes per axis (over {_MAX_NODES}); "
            "scale the inputs down or lower weight_var / bias_var"
        )
    return n


@functools.lru_cache(maxsize=16)
def _nodes(order: int) -> tuple[np.ndarray, np.ndarray]:
    # The trapezoidal rule on [-9, 9], weights normalised to integrate against N(0, 1). For
    # integrands analytic in a strip |Im z| < d it converges like exp(-2 pi d / h); measured
    # against adaptive quadrature it beats Gauss-Hermite of the same order several-fold for
    # tanh (whose poles approach the real axis as the variance grows).
    z = np.linspace(-_HALF_WIDTH, _HALF_WIDTH, order)
    w = np.exp(-0.5 * z * z)
    return z, w / w.sum()


def _central_difference(fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
    h = 1e-5

    def dfn(x: Any) -> Any:
        return (fn(x + h) - fn(x - h)) / (2.0 * h)

    return dfn


def elementwise(
    fn: Callable[[Any], Any],
    dfn: Callable[[Any], Any] | None = None,
    *,
    name: str | None = None,
    order: int = DEFAULT_ORDER,
    spec: dict | None = None,
) -> Nonlinearity:
    """Any elementwise ``phi`` by a product quadrature rule on the Cholesky factor.

    ``(u, v) = (sqrt(k11) z1, sqrt(k22) (rho z1 + sqrt(1 - rho^2) z2))`` with ``z1, z2`` standard
    normal, so ``E[phi(u) phi(v)]`` is a 2-D sum of ``order**2`` terms per pair (the trapezoidal
    rule on [-9, 9]: ``order`` nodes per axis up to variance 2.5, more beyond, growing like the
    square root of the largest variance of the block). Measured against adaptive quadrature at
    the default order 73: GELU to 1e-13 relative; tanh to 1e-10 (F) and 3e-9 (Fdot) for variances
    from 0.5 to 25.
    Each pair costs ``order**2`` evaluations of ``phi``: use the closed forms (ReLU, erf) where
    they exist; kinks converge slowly under any quadrature. ``fn`` (and ``dfn``, the derivative,
    needed for the NTK) must accept and return arrays of the namespace they are given; without
    ``dfn`` a central difference is used.

    Examples
    --------
    >>> import numpy as np
    >>> cube = elementwise(lambda x: x**3, lambda x: 3 * x**2, name="cube")
    >>> round(float(cube.variance(np.array(1.0))), 9)  # E[u^6] for u ~ N(0, 1)
    15.0
    """
    if order < 2:
        raise ValueError(f"quadrature order must be at least 2, got {order}")
    label = name or getattr(fn, "__name__", "custom")
    dphi = dfn if dfn is not None else _central_difference(fn)

    def expect2(g: Callable[[Any], Any], k12: Any, k11: Any, k22: Any) -> Any:
        xp = backend.namespace(k12, k11, k22)
        z, w = _nodes(_order_for(order, float(max(xp.max(k11), xp.max(k22)))))
        zz, ww = xp.asarray(z), xp.asarray(w)
        s11, s22 = xp.sqrt(k11), xp.sqrt(k22)
        rho = xp.clip(k12 / xp.maximum(s11 * s22, 1e-300), -1.0, 1.0)
        a = (s22 * rho)[..., None]  # mean of v given z1, per unit z1
        c = (s22 * xp.sqrt(1.0 - rho * rho))[..., None] * zz  # (..., order)
        out = xp.zeros(xp.broadcast_shapes(k12.shape, k11.shape, k22.shape), dtype=xp.float64)
        for zi, wi in zip(z.tolist(), w.tolist()):
            inner = g(a * zi + c) @ ww  # E[g(v) | z1 = zi]
            out += (wi * g(s11 * zi)) * inner
        return out

    def expect1(g: Callable[[Any], Any], k: Any) -> Any:
        xp = backend.namespace(k)
        z, w = _nodes(_order_for(order, float(xp.max(k))))
        return g(xp.sqrt(k)[..., None] * xp.asarray(z)) @ xp.asarray(w)

    def moments(k12: Any, k11: Any, k22: Any, need_dot: bool) -> tuple[Any, Any]:
        f = expect2(fn, k12, k11, k22)
        return f, (expect2(dphi, k12, k11, k22) if need_dot else None)

    def variance(k: Any) -> Any:
        return expect1(lambda x: fn(x) * fn(x), k)

    record = spec if spec is not None else {"name": "custom", "function": _qualified(fn)}
    return Nonlinearity(label, {**record, "order": int(order)}, moments, variance)


def _qualified(fn: Callable[[Any], Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}"


def _tanh(x: Any) -> Any:
    return backend.namespace(x).tanh(x)


def _dtanh(x: Any) -> Any:
    t = backend.namespace(x).tanh(x)
    return 1.0 - t * t


def tanh(order: int = DEFAULT_ORDER) -> Nonlinearity:
    """Hyperbolic tangent, by quadrature."""
    return elementwise(_tanh, _dtanh, name="tanh", order=order, spec={"name": "tanh"})


def _gelu(x: Any) -> Any:
    return 0.5 * x * (1.0 + backend.erf(x * (1.0 / math.sqrt(2.0))))


def _dgelu(x: Any) -> Any:
    xp = backend.namespace(x)
    cdf = 0.5 * (1.0 + backend.erf(x * (1.0 / math.sqrt(2.0))))
    return cdf + x * xp.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


def gelu(order: int = DEFAULT_ORDER) -> Nonlinearity:
    """GELU, ``x Phi(x)`` with the exact Gaussian CDF (Hendrycks & Gimpel 2016), by quadrature."""
    return elementwise(_gelu, _dgelu, name="gelu", order=order, spec={"name": "gelu"})


ACTIVATIONS: dict[str, Callable[..., Nonlinearity]] = {
    "relu": relu,
    "leaky_relu": leaky_relu,
    "erf": erf,
    "linear": linear,
    "tanh": tanh,
    "gelu": gelu,
}


def from_spec(spec: dict | str) -> Nonlinearity:
    """Build a nonlinearity from its canonical spec, or from a CLI string.

    Strings: a name from :data:`ACTIVATIONS` (``relu``, ``erf``, ``tanh``, ...), ``leaky_relu:A``
    with the negative slope ``A``, or ``module:function`` naming an importable Python function of
    one array argument (evaluated by quadrature).
    """
    if isinstance(spec, str):
        spec = _parse(spec)
    spec = dict(spec)
    name = spec.pop("name", None)
    if name == "custom":
        target = spec.pop("function")
        order = spec.pop("order", DEFAULT_ORDER)
        _no_extra(name, spec)
        return elementwise(
            _import(target), name=target, order=order, spec={"name": "custom", "function": target}
        )
    if name not in ACTIVATIONS:
        known = ", ".join(sorted(ACTIVATIONS))
        raise ValueError(
            f"unknown activation {name!r}; choose one of {known}, 'leaky_relu:ALPHA', "
            "or 'module:function' for a Python function"
        )
    try:
        return ACTIVATIONS[name](**spec)
    except TypeError as e:
        raise ValueError(f"bad parameters for activation {name!r}: {spec} ({e})") from None


def imported_function(spec: Any) -> str | None:
    """The ``module:function`` an activation spec (a canonical dict or a CLI string) would
    import to be built, or None for the built-in activations."""
    if isinstance(spec, Nonlinearity):
        spec = spec.spec
    if isinstance(spec, str):
        spec = _parse(spec)
    if isinstance(spec, dict) and spec.get("name") == "custom":
        return str(spec.get("function"))
    return None


def _no_extra(name: str, rest: dict) -> None:
    if rest:
        raise ValueError(f"unexpected parameters for activation {name!r}: {sorted(rest)}")


def _parse(text: str) -> dict:
    text = text.strip()
    if text.startswith("leaky_relu:"):
        try:
            return {"name": "leaky_relu", "alpha": float(text.split(":", 1)[1])}
        except ValueError:
            raise ValueError(f"leaky_relu needs a number after ':', got {text!r}") from None
    if ":" in text:
        return {"name": "custom", "function": text}
    return {"name": text.lower()}


def _import(target: str) -> Callable[[Any], Any]:
    module, _, attr = target.partition(":")
    try:
        obj: Any = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot import activation function {target!r}: {e}") from None
    if not callable(obj):
        raise ValueError(f"activation {target!r} is not callable")
    return obj
