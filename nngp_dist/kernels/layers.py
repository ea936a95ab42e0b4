"""Layers as functions from :class:`KernelState` to :class:`KernelState`.

A network's kernel is ``for layer in layers: state = layer(state)`` starting from
:func:`input_state`. Parameterisation (docs/science.md, Fully connected networks): weights
``N(0, w_var / fan_in)``, biases ``N(0, b_var)``; the NTK is that of the NTK parameterisation
(Jacot et al. 2018), whose NNGP is the same. A spec's layers come from its program
(:mod:`.program`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .. import backend
from .state import KernelState

__all__ = ["Layer", "dense", "diagonal_state", "input_state", "serial"]

Layer = Callable[[KernelState], KernelState]


def input_state(x1: Any, x2: Any, *, ntk: bool = False) -> KernelState:
    """The covariance of the inputs themselves: ``<x, x'> / d`` for flattened inputs.

    ``x1`` is (n1, d) and ``x2`` (n2, d); the result is a cross state of shape (n1, n2). The NTK
    of the inputs is zero (no parameters below them). Passing the same array twice (``x2 is
    x1``) marks the state symmetric: NumPy's product is then a SYRK, exactly symmetric.
    """
    xp = backend.namespace(x1, x2)
    d = x1.shape[1]
    gram = x1 @ x2.T
    gram *= 1.0 / d
    var1 = (xp.einsum("ij,ij->i", x1, x1) / d)[:, None]
    var2 = (xp.einsum("ij,ij->i", x2, x2) / d)[None, :]
    return KernelState(gram, var1, var2, 0.0 if ntk else None, symmetric=x2 is x1)


def diagonal_state(x: Any, *, ntk: bool = False) -> KernelState:
    """The diagonal ``k(x, x)`` of the inputs' covariance, as a 1-D diagonal state."""
    xp = backend.namespace(x)
    var = xp.einsum("ij,ij->i", x, x) / x.shape[1]
    return KernelState(var, var, var, 0.0 if ntk else None, diagonal=True)


def dense(weight_var: float, bias_var: float) -> Layer:
    """A dense layer of infinite width: ``K -> b_var + w_var K``; NTK ``-> K' + w_var Theta``.

    Lee et al. (2018), eq. 4; the NTK recursion of Jacot et al. (2018).
    """
    w, b = float(weight_var), float(bias_var)

    def dense_layer(state: KernelState) -> KernelState:
        nngp = state.nngp * w
        nngp += b
        ntk = None
        if state.ntk is not None:
            ntk = state.ntk * w
            ntk += nngp
        if state.diagonal:
            var1 = var2 = nngp
        else:
            var1, var2 = b + w * state.var1, b + w * state.var2
        return state.replace(nngp=nngp, var1=var1, var2=var2, ntk=ntk)

    dense_layer.__name__ = f"dense(w_var={w:g}, b_var={b:g})"
    return dense_layer


def serial(*layers: Layer) -> Layer:
    """Compose layers left to right."""

    def serial_layer(state: KernelState) -> KernelState:
        for layer in layers:
            state = layer(state)
        return state

    serial_layer.__name__ = "serial(" + ", ".join(_name(f) for f in layers) + ")"
    return serial_layer


def _name(f: Any) -> str:
    return getattr(f, "__name__", repr(f))
