"""KernelState: the per-pair quantities one layer of the recursion reads and writes."""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["KernelState"]


@dataclasses.dataclass(frozen=True)
class KernelState:
    """Covariances of one layer's pre-activations (or activations) for a block of pairs.

    For a cross block of ``n1`` x ``n2`` pairs, ``nngp`` and ``ntk`` have shape (n1, n2), ``var1``
    has shape (n1, 1) and ``var2`` shape (1, n2): the per-input variances that every
    nonlinearity needs beside the covariance (docs/science.md, Fully connected networks). For a
    *diagonal* state (``diagonal=True``) all four are 1-D of shape (n,) and ``nngp`` equals
    ``var1`` and ``var2``: the same layer code then computes k(x, x) for each input.

    ``ntk`` is None when only the NNGP is wanted, and may be the scalar 0.0 (the inputs' NTK).
    ``symmetric`` marks a cross block of one set of inputs with itself (its ``nngp`` is
    symmetric and ``var1`` equals ``var2``): the compiled loop then evaluates half of it. Row
    and column slices of such a block are not symmetric.
    """

    nngp: Any
    var1: Any
    var2: Any
    ntk: Any = None
    diagonal: bool = False
    pixels: str = "none"  # "none" (dense), or an image layout: "same" or "full" (kernels.conv)
    symmetric: bool = False

    def rows(self, start: int, stop: int) -> KernelState:
        """The state of rows ``start:stop`` of a cross block (views, no copies)."""
        ntk = self.ntk
        if ntk is not None and getattr(ntk, "ndim", 0) >= 2:
            ntk = ntk[start:stop]
        return self.replace(
            nngp=self.nngp[start:stop], var1=self.var1[start:stop], ntk=ntk, symmetric=False
        )

    def cols(self, start: int, stop: int) -> KernelState:
        """The state of columns ``start:stop`` of a cross block (views, no copies)."""
        ntk = self.ntk
        if ntk is not None and getattr(ntk, "ndim", 0) >= 2:
            ntk = ntk[:, start:stop]
        return self.replace(
            nngp=self.nngp[:, start:stop], var2=self.var2[:, start:stop], ntk=ntk, symmetric=False
        )

    def replace(self, **changes: Any) -> KernelState:
        """A copy with ``changes`` applied (the state is immutable)."""
        return dataclasses.replace(self, **changes)
