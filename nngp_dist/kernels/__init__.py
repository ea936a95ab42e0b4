"""Infinite-width kernels: layers as state-to-state functions, nonlinearities, specs.

A spec's network is one program (:mod:`.program`), written per architecture in
:mod:`.architectures`; the layer-by-layer path runs it, and :mod:`.fused` lowers it to the
compiled loops.
"""

from .layers import dense, diagonal_state, input_state, serial
from .nonlinearities import (
    ACTIVATIONS,
    Nonlinearity,
    elementwise,
    erf,
    gelu,
    leaky_relu,
    linear,
    relu,
    tanh,
)
from .spec import Spec
from .state import KernelState

__all__ = [
    "ACTIVATIONS",
    "KernelState",
    "Nonlinearity",
    "Spec",
    "dense",
    "diagonal_state",
    "elementwise",
    "erf",
    "gelu",
    "input_state",
    "leaky_relu",
    "linear",
    "relu",
    "serial",
    "tanh",
]
