"""The tile plan: which tiles of which arrays exist, and which of them are still missing.

A tile is ``(array, i, j)``: rows ``i*T : (i+1)*T`` and columns ``j*T : (j+1)*T`` of a kernel
array (the last tile of a dimension may be ragged); the diagonals have tiles ``(array, i)``.
Only tiles with ``i <= j`` of the symmetric train x train matrix exist.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import numpy as np

from .layout import K_TEST_DIAG, K_TEST_TRAIN, K_TRAIN_DIAG, K_TRAIN_TRAIN

__all__ = ["Tile", "TilePlan", "image_tile_size", "solve_block_size", "span", "symmetric"]


# Work per tile of an image network, in map entries (pairs x pixels x layers): on the order of a
# minute on one CPU core layer by layer, less with the compiled ReLU ConvNet loop
# (kernels.fused; per-entry costs in benchmarks/RESULTS.md). Kept as it is: the tile size is
# part of a store's identity, so a new default would refuse existing stores.
IMAGE_TILE_WORK = 1 << 31


def image_tile_size(spec: Any, largest: int | None = None, *, gpu: bool = False) -> int:
    """The tile edge for an image network when none is given.

    On GPUs the default tile (``largest``, dask config ``nngp-dist.tile-size``). On CPUs as
    large as that but small enough that one tile is about ``IMAGE_TILE_WORK`` map entries, so
    a tile takes at most about a minute on a core and a killed job loses little; for 28x28
    images that is 408 for an 8-layer 3x3 ConvNet, 304 for ResNet-32, 16 with global average
    pooling.
    Memory does not limit it: a tile's maps are evaluated in blocks of at most
    ``CONV_BLOCK_ENTRIES`` entries (8 MB per temporary on CPUs, 512 MB on GPUs) whatever the
    tile. The solvers work in blocks of several such tiles (:func:`solve_block_size`).
    """
    if largest is None:
        from . import config

        largest = config.value("tile-size")
    if gpu:
        return largest
    edge = int(math.sqrt(IMAGE_TILE_WORK / spec.map_entries_per_pair()))
    return max(16, min(largest, edge // 8 * 8))


def solve_block_size(spec: Any, tile: int, largest: int | None = None) -> int:
    """Rows per block of the solvers (Cholesky, CG, prediction) for a store of ``tile``.

    Dense nets: the tile itself. Image nets: the multiple of the tile nearest the default tile
    (``largest``, dask config ``nngp-dist.tile-size``), at least one tile. An image net's tile
    is sized for a minute of kernel work (16 with pooling), while the Cholesky's task graph
    grows as (N / block)^3 and each task should be a large GEMM: 408-row tiles give
    2040-row blocks. Being a multiple of the tile, a block off the diagonal holds only upper
    tiles, and a diagonal block's upper triangle is complete.
    """
    if not spec.is_image:
        return int(tile)
    if largest is None:
        from . import config

        largest = config.value("tile-size")
    return int(tile) * max(1, round(largest / tile))


def span(t: int, n: int, k: int) -> slice:
    """Block ``k`` of edge ``t`` of a dimension of length ``n`` (the last one may be ragged)."""
    return slice(k * t, min((k + 1) * t, n))


def symmetric(tile: np.ndarray) -> np.ndarray:
    """A diagonal tile of the train kernel made symmetric from its upper triangle, which is
    the authoritative half (the kernel of a set with itself is evaluated on and above the
    diagonal only)."""
    return np.triu(tile) + np.triu(tile, 1).T


_ROWS = {K_TRAIN_TRAIN: "train", K_TEST_TRAIN: "test", K_TRAIN_DIAG: "train", K_TEST_DIAG: "test"}


@dataclasses.dataclass(frozen=True, order=True)
class Tile:
    """One unit of work: a block of one kernel array (``j`` is None for the diagonals)."""

    array: str
    i: int
    j: int | None = None

    @property
    def index(self) -> tuple[int, ...]:
        return (self.i,) if self.j is None else (self.i, self.j)


@dataclasses.dataclass(frozen=True)
class TilePlan:
    """Tiles of edge ``tile_size`` over ``n_train`` training and ``n_test`` test examples."""

    n_train: int
    n_test: int
    tile_size: int

    def __post_init__(self) -> None:
        if self.tile_size < 1:
            raise ValueError(f"tile size must be positive, got {self.tile_size}")

    def blocks(self, part: str) -> int:
        """Number of row blocks of ``part`` ("train" or "test")."""
        n = self.n_train if part == "train" else self.n_test
        return math.ceil(n / self.tile_size)

    def rows(self, part: str, block: int) -> slice:
        """The examples of ``part`` in row block ``block``."""
        return span(self.tile_size, self.n_train if part == "train" else self.n_test, block)

    def row_part(self, array: str) -> str:
        """Which examples (``train`` or ``test``) the rows of kernel array ``array`` are."""
        return _ROWS[array]

    def grid(self, array: str) -> tuple[int, ...]:
        """Shape of the tile grid of ``array``."""
        rows = self.blocks(_ROWS[array])
        return (rows,) if array.endswith("_diag") else (rows, self.blocks("train"))

    def wanted(self, array: str) -> np.ndarray:
        """Boolean map over the tile grid of the tiles that exist (upper triangle for train)."""
        grid = self.grid(array)
        if array == K_TRAIN_TRAIN:
            return np.triu(np.ones(grid, dtype=bool))
        return np.ones(grid, dtype=bool)

    def tiles(self, array: str) -> Iterator[Tile]:
        """Every tile of ``array``, in row-major order."""
        for idx in zip(*np.nonzero(self.wanted(array))):
            yield Tile(array, *(int(k) for k in idx))

    def missing(self, done: dict[str, np.ndarray]) -> list[Tile]:
        """Tiles not marked in ``done`` (array name -> boolean map), diagonals first."""
        order = (K_TRAIN_DIAG, K_TEST_DIAG, K_TRAIN_TRAIN, K_TEST_TRAIN)
        return [t for a in order for t in self.tiles(a) if not done[a][t.index]]

    def total(self) -> int:
        """Number of tiles over all four arrays."""
        return sum(int(self.wanted(a).sum()) for a in _ROWS)
