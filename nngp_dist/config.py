"""Defaults, registered into ``dask.config`` under ``nngp-dist``, and their validation.

Override per call (keyword arguments), in a dask YAML file, or by environment variable, e.g.
``DASK_NNGP_DIST__TILE_SIZE=4096``. Only the public API and the CLI read these (through
:func:`get`, or typed and checked through :func:`value`); nothing below them does.
:func:`checked` validates every value once where a job starts, before anything is written, so
that a bad value (``DASK_NNGP_DIST__TASKS_PER_THREAD=abc``) is a :class:`UserError` naming its
key and environment variable, not a traceback halfway through a job.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

import dask.config
from dask.utils import parse_timedelta

from .errors import UserError

__all__ = ["DEFAULTS", "MIN_TILE_SIZE", "checked", "get", "tile_size", "value"]

DEFAULTS = {
    # Tile edge. CPU tiles of 2k-4k keep Dask's ~1 ms per task negligible (docs/design.md).
    # 2000, not 2048: a float64 tile of 2000^2 (32.0 MB) stays under glibc's largest mmap
    # threshold (32 MiB), so tile buffers are reused from the heap instead of being mapped and
    # faulted in on every allocation (benchmarks/RESULTS.md has the solve measured both ways).
    "tile-size": 2000,
    # Storage dtype of the kernel arrays; evaluation is always float64.
    "dtype": "float64",
    # Tile tasks in flight per worker thread (the client submits in a sliding window).
    "tasks-per-thread": 2,
    # GP noise (jitter) relative to the mean training diagonal, and the cap of its escalation.
    "noise": 1e-6,
    "max-noise": 0.1,
    # How long to wait for a scheduler before giving up.
    "connect-timeout": "10s",
}

# Smaller tiles making more than MAX_SMALL_TILES tiles are refused unless forced: each tile is a
# task (~1 ms of Dask overhead), a chunk file and a completion record, so a tile of 1 turns a
# 1-second job into minutes and 10^4 files. (A few small tiles, as tests use, are fine.)
MIN_TILE_SIZE = 16
MAX_SMALL_TILES = 500

dask.config.update_defaults({"nngp-dist": DEFAULTS})


def get(key: str, override: Any = None) -> Any:
    """``dask.config.get("nngp-dist." + key)`` unless ``override`` is given (not None)."""
    return dask.config.get(f"nngp-dist.{key}", override_with=override)


class _Bad(ValueError):
    """What a value should have been (the caller names where the value came from)."""


def _positive_int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, str, float)):
        raise _Bad("must be an integer of at least 1")
    try:
        n = int(v) if not isinstance(v, float) or v.is_integer() else None
    except ValueError:
        n = None
    if n is None or n < 1:
        raise _Bad("must be an integer of at least 1")
    return n


def _positive_number(v: Any) -> float:
    if isinstance(v, bool):
        raise _Bad("must be a positive number")
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise _Bad("must be a positive number") from None
    if not (x > 0 and math.isfinite(x)):
        raise _Bad("must be a positive, finite number")
    return x


def _noise(v: Any) -> Any:
    """One positive number, or a list / comma-separated string of them (a grid); returned as
    given (the solve options parse the grid)."""
    parts = v.split(",") if isinstance(v, str) else v if isinstance(v, (list, tuple)) else [v]
    parts = [p for p in parts if not (isinstance(p, str) and not p.strip())]
    if not parts:
        raise _Bad("must be a positive number or a comma-separated list of them")
    for p in parts:
        _positive_number(p)
    return v


def _dtype(v: Any) -> str:
    if v not in ("float64", "float32"):
        raise _Bad("must be float64 or float32")
    return str(v)


def _seconds(v: Any) -> float:
    if isinstance(v, bool):
        raise _Bad('must be a time like "30s", "2 minutes" or a number of seconds')
    try:
        s = parse_timedelta(v, default="seconds")
    except (TypeError, ValueError, KeyError, AttributeError):
        raise _Bad('must be a time like "30s", "2 minutes" or a number of seconds') from None
    if s is None or not (s > 0 and math.isfinite(s)):
        raise _Bad("must be a positive time")
    return float(s)


_CHECKS: dict[str, Callable[[Any], Any]] = {
    "tile-size": _positive_int,
    "dtype": _dtype,
    "tasks-per-thread": _positive_int,
    "noise": _noise,
    "max-noise": _positive_number,
    "connect-timeout": _seconds,
}


def value(key: str, override: Any = None) -> Any:
    """The value of ``nngp-dist.<key>`` (or ``override``), typed and checked: a
    :class:`UserError` names the option (``--tile-size``) or the config key and its
    environment variable (``DASK_NNGP_DIST__TILE_SIZE``)."""
    raw = get(key, override)
    try:
        return _CHECKS[key](raw)
    except _Bad as e:
        if override is not None:
            raise UserError(f"--{key} {e}, got {raw!r}") from None
        env = "DASK_NNGP_DIST__" + key.upper().replace("-", "_")
        source = f"set by {env}" if env in os.environ else f"or {env}"
        raise UserError(
            f"{key} {e}, got {raw!r} (the dask config value nngp-dist.{key}, {source})"
        ) from None


def checked() -> dict[str, Any]:
    """Every ``nngp-dist`` config value, typed and checked (see :func:`value`); call once where
    a job starts, before anything is written."""
    return {key: value(key) for key in DEFAULTS}


def tile_size(
    override: Any = None, *, force: bool = False, sizes: tuple[int, int] | None = None
) -> int:
    """The tile edge (``override`` or the config), checked. A tile under :data:`MIN_TILE_SIZE`
    that would cut ``sizes`` (training and test points) into more than
    :data:`MAX_SMALL_TILES` tiles is refused unless ``force``."""
    t = value("tile-size", override)
    if t < MIN_TILE_SIZE and not force and sizes is not None:
        b, bt = (math.ceil(n / t) for n in sizes)
        tiles = b * (b + 1) // 2 + b * bt
        if tiles > MAX_SMALL_TILES:
            raise UserError(
                f"--tile-size {t} is below {MIN_TILE_SIZE} and cuts {sizes[0]} training and "
                f"{sizes[1]} test points into {tiles:,} tiles, each a task, a file and a record: "
                "far slower and larger than a few big tiles. Give a --tile-size of "
                f"{MIN_TILE_SIZE} or more (or leave it out for the default), or pass --force "
                "(force=True) to use it anyway"
            )
    return t
