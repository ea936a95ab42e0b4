"""Whole jobs, as the CLI and Python users start them: validate everything, then compute."""

from __future__ import annotations

import sys
from typing import Any

from . import config, datasets
from .cluster import connect
from .compute import compute_kernel
from .errors import UserError
from .kernels import Spec
from .storage import KernelStore
from .tiling import TilePlan

__all__ = ["kernel"]


def kernel(
    store: str,
    *,
    dataset: str = "demo",
    arch: str = "fc",
    depth: int = 3,
    activation: Any = "relu",
    weight_var: float = 1.0,
    bias_var: float = 0.0,
    kernel: str = "nngp",
    tile_size: int | None = None,
    dtype: str | None = None,
    train_size: int | None = None,
    test_size: int | None = None,
    data_dir: str | None = None,
    standardize: bool = False,
    scheduler: str | None = None,
    workers: int | None = None,
    memory_limit: str | None = None,
    device: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
    client: Any = None,
) -> dict:
    """Compute a network's kernel on a dataset into the store at ``store``, resuming if possible.

    Everything is checked before the first tile is written: the data (NaN, shapes, sizes), the
    spec, the store (a store of another spec, dataset or tile size is refused unless
    ``overwrite``), and the scheduler. Returns a summary (tiles computed and skipped, seconds).
    Pass ``client`` (a ``distributed.Client``) to use it instead of connecting.

    Examples
    --------
    >>> kernel("demo.zarr", dataset="demo", depth=3, weight_var=1.45, bias_var=0.28,
    ...        train_size=500, test_size=100)  # doctest: +SKIP
    {'tiles_total': 2, 'tiles_computed': 2, 'tiles_skipped': 0, 'seconds': 0.41}
    """
    try:
        spec = Spec(
            arch=arch,
            depth=depth,
            activation=activation,
            weight_var=weight_var,
            bias_var=bias_var,
            kernel=kernel,
        )
    except ValueError as e:
        raise UserError(str(e)) from None
    tile_size = int(config.get("tile-size", tile_size))
    if tile_size < 1:
        raise UserError(f"--tile-size must be positive, got {tile_size}")
    dtype = str(config.get("dtype", dtype))
    if dtype not in ("float64", "float32"):
        raise UserError(f"--dtype must be float64 or float32, got {dtype!r}")
    data = datasets.load(
        dataset,
        data_dir=data_dir,
        train_size=train_size,
        test_size=test_size,
        standardize=standardize,
    ).flattened()
    meta = KernelStore.identity(spec, data, tile_size, dtype)
    action = KernelStore.check(store, meta, overwrite=overwrite)
    plan = TilePlan(len(data.x_train), len(data.x_test), tile_size)

    def run(c: Any) -> dict:
        if c is not None and progress:
            print(f"dashboard: {c.dashboard_link}", file=sys.stderr)
        ks = (
            KernelStore.create(store, meta, data, plan)
            if action == "create"
            else KernelStore.open(store, "r+")
        )
        return {
            "store": str(store),
            "action": action,
            **compute_kernel(ks, client=c, device=device, progress=progress),
        }

    if client is not None or scheduler == "synchronous":
        return run(client)
    with connect(scheduler, workers=workers, memory_limit=memory_limit) as c:
        return run(c)
