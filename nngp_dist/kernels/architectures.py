"""The architectures, each written once: as a :class:`~.program.Program`.

:data:`BUILDERS` maps a spec's ``arch`` to the function that builds its program from the spec;
:func:`build` is what :class:`~.spec.Spec` calls. The builders below also take plain
parameters (:func:`fc`, :func:`convnet`, :func:`resnet32`), for the compiled loops' warm-up
and for tests of variants. Another architecture is one more entry of :data:`BUILDERS`; one with
no layer-wise recursion (a trained network's empirical NTK, say) would build a program of one
op of its own, which no compiled loop lowers, so that it runs by its op's layer function.

Parameterisation: weights ``N(0, w_var / fan_in)``, biases ``N(0, b_var)``, the same variances
in every layer (docs/science.md, Fully connected networks; Convolutional and residual
networks).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from .conv import ConvGeometry
from .nonlinearities import Nonlinearity
from .program import Activation, Conv, Dense, Op, Program, Readout, Residual

__all__ = ["BUILDERS", "TrainedNetwork", "build", "convnet", "fc", "resnet32"]


def fc(depth: int, weight_var: float, bias_var: float, phi: Nonlinearity) -> Program:
    """``depth`` hidden dense layers, each followed by ``phi``, then a dense readout: ops
    ``[dense, phi] * depth + [dense]``, the kernel at depth ``d`` after op ``2 d + 1``."""
    d = Dense(weight_var, bias_var)
    ops = (d, Activation(phi)) * depth + (d,)
    return Program(ops, {k: 2 * k + 1 for k in range(depth + 1)})


def convnet(
    depth: int,
    weight_var: float,
    bias_var: float,
    phi: Nonlinearity,
    geometry: ConvGeometry,
    *,
    skip_every: int = 0,
    readout: str = "flatten",
    image_shape: tuple[int, int, int] | None = None,
) -> Program:
    """``depth`` conv layers, each followed by ``phi``: ops ``[conv, phi] * depth``, the kernel
    at depth ``d`` the readout after op ``2 d``.

    With ``skip_every=S`` > 0 and ``depth`` >= 2: the first conv, then pre-activation residual
    blocks of S (phi, conv) pairs each (a trailing partial block without its shortcut), then
    phi; the kernel at full depth only (so also for ``depth`` < 2).
    """
    c, a = Conv(weight_var, bias_var, geometry), Activation(phi)
    if not skip_every or depth < 2:
        ops: tuple[Op, ...] = (c, a) * depth
    else:
        body: list[Op] = [c]
        pairs = depth - 1
        for start in range(0, pairs, skip_every):
            block = (a, c) * min(skip_every, pairs - start)
            body += [Residual(block)] if len(block) == 2 * skip_every else list(block)
        ops = (*body, a)
    taps = {depth: len(ops)} if skip_every else {d: 2 * d for d in range(depth + 1)}
    return Program(
        ops,
        taps,
        Readout(readout, weight_var, bias_var),
        image_shape,
        full_depth_only=bool(skip_every),
    )


def resnet32(
    weight_var: float,
    bias_var: float,
    phi: Nonlinearity,
    image_shape: tuple[int, int, int] | None = None,
    *,
    depth: int = 3,
    blocks_per_stage: int = 5,
) -> Program:
    """Garriga-Alonso et al.'s ResNet GP: a 3x3 conv, then 3 stages of 5 pre-activation blocks
    (phi, 3x3 conv, phi, 3x3 conv; strides 1, 2, 2 on each stage's first conv, whose block has
    a 1x1 projection shortcut of the same stride on the block's input), then phi and the dense
    readout: 31 conv layers + the readout = 32. The kernel at full depth only, read under the
    label ``depth`` (the spec's, which does not otherwise apply to this preset)."""
    c3, a = Conv(weight_var, bias_var, ConvGeometry(3)), Activation(phi)
    ops: list[Op] = [c3]
    for stride in (1, 2, 2):
        for blk in range(blocks_per_stage):
            s = stride if blk == 0 else 1
            block = (a, Conv(weight_var, bias_var, ConvGeometry(3, stride=s)), a, c3)
            shortcut = (Conv(weight_var, bias_var, ConvGeometry(1, stride=s)),)
            ops.append(Residual(block, shortcut if blk == 0 else None))
    ops.append(a)
    return Program(
        tuple(ops),
        {depth: len(ops)},
        Readout("flatten", weight_var, bias_var),
        image_shape,
        full_depth_only=True,
    )


def _fc(spec: Any) -> Program:
    return fc(spec.depth, spec.weight_var, spec.bias_var, spec.activation)


def _convnet(spec: Any) -> Program:
    geometry = ConvGeometry(spec.filter_size, spec.stride, spec.dilation, spec.padding)
    return convnet(
        spec.depth,
        spec.weight_var,
        spec.bias_var,
        spec.activation,
        geometry,
        skip_every=spec.skip_every,
        readout=spec.readout,
        image_shape=spec.image_shape,
    )


def _resnet32(spec: Any) -> Program:
    return resnet32(
        spec.weight_var, spec.bias_var, spec.activation, spec.image_shape, depth=spec.depth
    )


@dataclasses.dataclass(frozen=True)
class TrainedNetwork:
    """The one op of a trained network's program: its empirical NTK has no layer-wise
    recursion over a kernel state, so :class:`~.spec.Spec` evaluates it from the raw inputs
    (:mod:`.trained`); no compiled loop lowers it."""

    def layer(self) -> Any:
        raise ValueError("a trained network's kernel is evaluated by kernels.trained")


def _trained(spec: Any) -> Program:
    return Program((TrainedNetwork(),), {0: 1})  # type: ignore[arg-type]


# arch -> the program of a spec of that architecture (a validated :class:`~.spec.Spec`).
BUILDERS: dict[str, Callable[[Any], Program]] = {
    "fc": _fc,
    "conv": _convnet,
    "resnet32": _resnet32,
    "trained": _trained,
}


def build(spec: Any) -> Program:
    """The program of ``spec``, by its architecture's builder."""
    return BUILDERS[spec.arch](spec)
