"""The options of the solve and predict stages, validated once where they enter.

The command line, the estimators and :mod:`nngp_dist.jobs` all build these with
:meth:`SolveOptions.checked` / :meth:`PredictOptions.checked`, which resolve the dask config
defaults and raise :class:`~nngp_dist.errors.UserError` naming the option as the CLI spells it.
Below that boundary nothing re-checks or re-reads the config.

Units: ``noise`` is always relative to the mean of the training kernel's diagonal (what a user
gives and what the solve record reports); the absolute value added to the diagonal is called
the *jitter*, ``noise * KernelStore.mean_diag()``, and exists only from the factorisation down.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

from . import config
from .errors import UserError
from .layout import LOO_SIZE
from .storage import writable

__all__ = [
    "ClusterOptions",
    "METHODS",
    "PRECONDITIONERS",
    "SELECT_BY",
    "PredictOptions",
    "SolveOptions",
    "fields",
    "integer",
    "positive",
    "report_path",
    "take",
]

METHODS = ("cholesky", "cg")
PRECONDITIONERS = ("nystrom", "block-jacobi", "none")
SELECT_BY = ("accuracy", "mse", "lml")


def integer(name: str, value: Any) -> int:
    """``value`` as an int, or :class:`UserError` naming the option ``name``."""
    try:
        return int(value)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be an integer, got {value!r}") from None


def positive(name: str, value: Any) -> float:
    """``value`` as a positive finite float, or :class:`UserError` naming the option ``name``."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be a number, got {value!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise UserError(f"{name} must be positive and finite, got {value!r}")
    return v


def _noise_list(value: Any) -> tuple[float, ...]:
    if isinstance(value, str):
        parts = [p for p in value.split(",") if p.strip()]
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        parts = [value]
    if not parts:
        raise UserError("--noise needs at least one value")
    return tuple(positive("--noise", p) for p in parts)


@dataclasses.dataclass(frozen=True)
class SolveOptions:
    """How to solve for ``alpha = (K + s I)^-1 T`` (see :func:`nngp_dist.jobs.solve`).

    ``noise`` is one relative noise, or a grid of them to choose from (``validation_size``,
    ``select_by``); ``max_noise`` caps the escalation on a non-positive pivot.
    """

    noise: tuple[float, ...]
    max_noise: float
    method: str = "cholesky"
    tol: float = 1e-8
    maxiter: int = 1000
    preconditioner: str = "nystrom"
    validation_size: int = 0
    select_by: str | None = None

    @classmethod
    def checked(
        cls,
        noise: Any = None,
        max_noise: Any = None,
        method: str = "cholesky",
        tol: float = 1e-8,
        maxiter: int = 1000,
        preconditioner: str = "nystrom",
        validation_size: int = 0,
        select_by: str | None = None,
    ) -> SolveOptions:
        """Validated options, config defaults resolved (``nngp-dist.noise``, ``max-noise``)."""
        grid = _noise_list(config.get("noise", noise))
        cap = positive("--max-noise", config.get("max-noise", max_noise))
        if cap < max(grid):
            raise UserError(f"--max-noise {cap:g} is below --noise {max(grid):g}")
        if method not in METHODS:
            raise UserError(f"unknown --method {method!r}; choose cholesky or cg")
        positive("--tol", tol)
        if integer("--maxiter", maxiter) < 1:
            raise UserError(f"--maxiter must be at least 1, got {maxiter}")
        if preconditioner not in PRECONDITIONERS:
            raise UserError(
                f"unknown --preconditioner {preconditioner!r}; choose {', '.join(PRECONDITIONERS)}"
            )
        if select_by is not None and select_by not in SELECT_BY:
            raise UserError(f"--select-by must be accuracy, mse or lml, got {select_by!r}")
        return cls(
            grid,
            cap,
            method,
            float(tol),
            int(maxiter),
            preconditioner,
            integer("--validation-size", validation_size),
            select_by,
        )

    @property
    def selects(self) -> bool:
        """Whether the noise is chosen (a grid, or a validation split) before the solve."""
        return len(self.noise) > 1 or self.validation_size > 0


@dataclasses.dataclass(frozen=True)
class PredictOptions:
    """What the predict stage reports: calibration ``bins``, and a JSON copy at ``json_path``;
    ``loo_size`` training points predicted leave-one-out to fit the variance recalibration
    (:func:`nngp_dist.predict.predict_loo`)."""

    json_path: str | None = None
    bins: int = 10
    loo_size: int | None = LOO_SIZE

    @classmethod
    def checked(
        cls, json_path: str | None = None, bins: int = 10, loo_size: int | None = LOO_SIZE
    ) -> PredictOptions:
        """Validated options: at least one bin, no negative leave-one-out size (None: leave
        the store's as they are, compute none), and a writable folder for the JSON report."""
        if integer("--bins", bins) < 1:
            raise UserError(f"--bins must be at least 1, got {bins}")
        if loo_size is not None and integer("--loo-size", loo_size) < 0:
            raise UserError(f"--loo-size must be 0 (none) or more, got {loo_size}")
        return cls(report_path(json_path), int(bins), None if loo_size is None else int(loo_size))


def report_path(json_path: str | None) -> str | None:
    """``json_path`` (``--json FILE``), checked: its folder must exist and be writable."""
    if json_path:
        folder = os.path.dirname(os.path.abspath(json_path))
        if not os.path.isdir(folder) or not writable(folder):
            raise UserError(f"--json {json_path}: {folder} is not a writable directory")
    return json_path


@dataclasses.dataclass(frozen=True)
class ClusterOptions:
    """Where a job runs: ``client`` (a ``distributed.Client``), else the scheduler at
    ``scheduler`` (or ``$DASK_SCHEDULER_ADDRESS``), else an embedded cluster of ``workers``
    processes with ``memory_limit`` each (see :func:`nngp_dist.cluster.connect`)."""

    scheduler: str | None = None
    workers: int | None = None
    memory_limit: str | None = None
    client: Any = None


def fields(cls: type) -> tuple[str, ...]:
    """The option names of an options dataclass (to split a keyword dictionary by stage)."""
    return tuple(f.name for f in dataclasses.fields(cls))


def take(options: dict, cls: type) -> dict:
    """Remove the options of dataclass ``cls`` from ``options`` and return them."""
    return {k: options.pop(k) for k in fields(cls) if k in options}
