"""Defaults, registered into ``dask.config`` under ``nngp-dist``.

Override per call (keyword arguments), in a dask YAML file, or by environment variable, e.g.
``DASK_NNGP_DIST__TILE_SIZE=4096``. Only the public API and the CLI read these (through
:func:`get`); nothing below them does.
"""

from __future__ import annotations

from typing import Any

import dask.config

__all__ = ["DEFAULTS", "get"]

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

dask.config.update_defaults({"nngp-dist": DEFAULTS})


def get(key: str, override: Any = None) -> Any:
    """``dask.config.get("nngp-dist." + key)`` unless ``override`` is given (not None)."""
    return dask.config.get(f"nngp-dist.{key}", override_with=override)
