"""The Zarr store: the single source of truth between stages, and a public contract.

The layout (every array's name, shape, chunks and meaning) is :mod:`nngp_dist.layout`, and the
README's table is generated from it. This module is the only one that creates, opens and drops
the store's arrays; other modules name them through :mod:`nngp_dist.layout`'s constants. Every
array carries ``dimension_names``, so ``xarray.open_zarr`` reads the store.

Root attributes, under ``nngp_dist``: ``layout`` (this layout's version), ``version`` (of the
package that created the store), ``spec`` and ``spec_hash`` (the canonical architecture),
``dataset``, ``fingerprint`` (SHA-256 of the inputs), ``train_fingerprint`` (of the training
inputs and labels alone), ``n_train``, ``n_test``, ``tile_size``, ``solve_block`` (rows per
block of the factor ``chol`` and the solvers' tasks: the tile for dense nets, a multiple of it
for image nets; absent in stores made before it existed, which use the tile), ``dtype``,
``created``, and ``stages`` (per stage: start, end, seconds, tiles computed).

A tile is written first and its completion record second, so a process killed mid-write never
leaves a tile counted as done; on local stores the kernel stage writes tiles through
:class:`~nngp_dist.workers.FlushingStore`, which puts them on disk before the record.
Workers write only their own tiles' chunks; only the client writes attributes.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec
from zarr.core.sync import collect_aiterator, sync

from ._version import __version__
from .datasets import Dataset
from .errors import CorruptStore, StoreMismatch, UserError
from .kernels import Spec
from .layout import (
    ALPHA,
    CG_BLOCKJACOBI,
    CG_NYSTROM,
    CHOL,
    CHOL_STEP,
    CHOL_WORK,
    CREATING,
    DIMS,
    K_TEST_DIAG,
    K_TEST_TRAIN,
    K_TRAIN_DIAG,
    K_TRAIN_TRAIN,
    KERNEL_ARRAYS,
    LAPLACE_SCALE,
    LOCK,
    LOO,
    LOO_ARRAYS,
    LOO_INDEX,
    LOO_MEAN,
    LOO_VARIANCE,
    MEAN,
    OUTPUTS,
    PREDICT,
    RECORDS,
    T_TRAIN,
    VARIANCE,
    X_TEST,
    X_TRAIN,
    Y_TEST,
    Y_TRAIN,
    record,
)
from .tiling import TilePlan, solve_block_size, symmetric

__all__ = [
    "KERNEL_ARRAYS",
    "LAYOUT_VERSION",
    "KernelStore",
    "chunk_problem",
    "is_local",
    "local_path",
    "normalize_url",
    "open_store",
    "read_checked",
    "remove_partials",
    "solve_block",
    "utcnow",
    "writable",
]

LAYOUT_VERSION = 1
# Identity of a store: a run may only add tiles to a store whose identity matches its own.
IDENTITY = ("layout", "spec_hash", "fingerprint", "tile_size", "dtype")
# Every chunk of every array ends in its CRC-32C (zarr v3's crc32c codec, the last bytes
# codec), checked whenever it is read: a flipped or truncated chunk is an error that names it,
# never data (about 12 GB/s, nothing beside a tile's kernel or a factor block).
CHECKSUM = (Crc32cCodec(),)
# Blosc-LZ4 with byte shuffle: 1.3x on float64 kernel tiles at 0.7 GB/s, faster than these
# machines' disks; Zstd (zarr's default) compressed only 1.1x at 0.3 GB/s (docs/design.md).
COMPRESSORS = (BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"), *CHECKSUM)


def utcnow() -> str:
    """Now, in UTC, as ISO 8601 to the second: the time stamps of the store's records."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def is_local(url: str) -> bool:
    """Whether ``url`` names a local directory (a path or ``file://``)."""
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> Path:
    """The directory a local ``url`` names."""
    return Path(url.removeprefix("file://")).expanduser()


def normalize_url(url: str | os.PathLike) -> str:
    """A local path made absolute (``~`` expanded), so the client, every worker and every later
    run mean the same directory; URLs of other file systems unchanged."""
    url = os.fspath(url)
    return str(local_path(url).resolve()) if is_local(url) else url


def _open_group(url: str, mode: str) -> zarr.Group:
    """``zarr.open_group`` with the errors of an unusable URL turned into :class:`UserError`."""
    try:
        return zarr.open_group(url, mode=mode)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        raise
    except (ImportError, ValueError, OSError) as e:
        raise UserError(
            f"cannot open {url} as a Zarr store ({type(e).__name__}: {e}); for a remote URL "
            "install its fsspec implementation (s3fs for s3://, gcsfs for gs://)"
        ) from None


class KernelStore:
    """A kernel store at ``url`` (a directory or any fsspec URL zarr accepts)."""

    def __init__(self, url: str, group: zarr.Group, *, trust_code: bool = False):
        self.url = url
        self._group = group
        self.trust_code = trust_code

    # --- opening and creating -----------------------------------------------------------------

    @classmethod
    def open(cls, url: str, mode: str = "r", *, trust_code: bool = False) -> KernelStore:
        """Open an existing store; :class:`UserError` if there is none at ``url``.

        Opening never imports anything. ``trust_code``: let :attr:`spec` import the Python
        function a store's spec may name as its activation (``module:function``), which runs
        that module's code; without it such a spec is only shown (``meta["spec"]``), and
        :attr:`spec`, or computing with the store's own spec, is a :class:`UserError`.
        """
        url = normalize_url(url)
        if _creating(url):
            raise _half_created(url)
        if is_local(url) and not (local_path(url) / "zarr.json").is_file():
            raise UserError(f"no kernel store at {url}; create one with 'nngp-dist kernel'")
        try:
            group = _open_group(url, mode)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as e:
            raise UserError(f"no kernel store at {url} ({e})") from None
        meta = group.attrs.get("nngp_dist")
        if meta is None:
            raise UserError(f"{url} is a Zarr group but not an nngp_dist kernel store")
        if meta.get("creating"):
            raise _half_created(url)
        if mode != "r" and is_local(url):
            remove_partials(local_path(url))
        return cls(url, group, trust_code=trust_code)

    @staticmethod
    def identity(spec: Spec, data: Dataset, tile_size: int, dtype: str) -> dict:
        """The attributes that must match for a run to resume a store."""
        return {
            "layout": LAYOUT_VERSION,
            "version": __version__,
            "spec": spec.to_dict(),
            "spec_hash": spec.hash,
            "dataset": data.name,
            "fingerprint": data.fingerprint,
            "train_fingerprint": data.train_fingerprint,
            "n_train": int(len(data.x_train)),
            "n_test": int(len(data.x_test)),
            "tile_size": int(tile_size),
            "solve_block": solve_block_size(spec, tile_size),
            "dtype": str(np.dtype(dtype)),
        }

    @classmethod
    def check(
        cls, url: str, meta: dict, *, overwrite: bool = False, replace_test: bool = False
    ) -> str:
        """Decide, without writing anything, what a run with identity ``meta`` may do at ``url``.

        Returns ``"create"`` (no store there, or ``overwrite``), ``"resume"`` (a matching
        store) or, with ``replace_test``, ``"replace-test"`` (a store of the same spec, tiles
        and training set whose test set differs, or whose test set replacement was stopped
        half-way: see :meth:`replace_test`). Raises :class:`UserError` for a store of another
        identity, a path that is not a store, or a location that cannot be written.
        """
        url = normalize_url(url)
        if _creating(url):
            return "create"  # a creation that was stopped half-way: start it again
        exists = cls.check_location(url)
        if not exists or overwrite:
            return "create"
        old = _open_group(url, "r").attrs.get("nngp_dist")
        if old is None:
            raise UserError(
                f"{url} is a Zarr group but not an nngp_dist kernel store; refusing to write "
                "into it (choose another --store, or --overwrite to replace it)"
            )
        if old.get("creating"):
            return "create"  # a creation that was stopped half-way: start it again
        diffs = [k for k in IDENTITY if old.get(k) != meta.get(k)]
        same_train = old.get("train_fingerprint") == meta.get("train_fingerprint")
        if replace_test and same_train and set(diffs) <= {"fingerprint"}:
            if diffs or old.get("replacing_test"):
                return "replace-test"
        if old.get("replacing_test") and not diffs:
            diffs = ["fingerprint"]  # its test arrays are half-replaced: never resume them
        if diffs:
            lines = [
                f"  {k}: store has {_show(old, k)}, this run has {_show(meta, k)}" for k in diffs
            ]
            raise StoreMismatch(
                f"the store at {url} was made by a different run:\n"
                + "\n".join(lines)
                + "\nNothing was changed. Use another --store, or --overwrite to start over.",
                lines,
            )
        return "resume"

    @staticmethod
    def check_location(url: str) -> bool:
        """Whether a Zarr group is at ``url``; :class:`UserError` if a store can be neither
        created nor opened there (a file, a read-only or foreign folder). Writes nothing."""
        url = normalize_url(url)
        if is_local(url):
            path = local_path(url)
            if path.exists() and not path.is_dir():
                raise UserError(f"{url} exists and is not a directory; choose another --store")
            probe = path
            while not probe.exists():
                probe = probe.parent
            if not probe.is_dir():
                raise UserError(f"{probe} is a file, so {url} cannot be created under it")
            if not writable(probe):
                raise UserError(f"cannot write to {probe}; choose a writable --store location")
            ours = {LOCK, CREATING}  # our own files, never a sign of someone else's folder
            entries = [p for p in path.iterdir() if p.name not in ours] if path.is_dir() else []
            if entries and not (path / "zarr.json").is_file():
                raise UserError(
                    f"{url} is a non-empty directory that is not a kernel store; refusing to "
                    "write into it (choose another --store)"
                )
            exists = (path / "zarr.json").is_file()
        else:
            try:
                _open_group(url, "r")
                exists = True
            except (FileNotFoundError, zarr.errors.GroupNotFoundError):
                exists = False
        return exists

    @classmethod
    def create(cls, url: str, meta: dict, data: Dataset, plan: TilePlan) -> KernelStore:
        """Create (or replace) the store: inputs, empty kernel arrays, completion records.

        A marker file (:data:`~nngp_dist.layout.CREATING`) is written before anything else,
        the old contents (but the lock) are deleted, the group is written with its identity
        marked ``creating`` in one write, and the mark and the marker are removed last: a
        creation stopped at any point is recognised (:meth:`check`) and redone by the next run.
        """
        url = normalize_url(url)
        _set_marker(url, True)
        _clear(url)
        root = zarr.open_group(
            url, mode="a", zarr_format=3, attributes={"nngp_dist": {**meta, "creating": True}}
        )
        t = plan.tile_size
        _create_inputs(root, data, (X_TRAIN, Y_TRAIN, X_TEST, Y_TEST), t)
        root.create_group(RECORDS)
        _create_kernel(root, plan, meta["dtype"], KERNEL_ARRAYS)
        root.attrs["nngp_dist"] = {**meta, "created": utcnow(), "stages": {}}
        _set_marker(url, False)
        return cls(url, root)

    def replace_test(self, data: Dataset) -> None:
        """Swap in the test set of ``data`` (same training set), keeping the training kernel,
        the factor and the solution: only the test tiles and the predictions are then redone.

        Marked ``replacing_test`` until done, so a replacement stopped half-way is never
        resumed as if complete (:meth:`check` asks for it to be redone).
        """
        g, meta = self._group, self.meta
        if meta.get("train_fingerprint") != data.train_fingerprint:
            raise UserError(f"{self.url}: a test set replaces one of the same training set only")
        self.update_meta(replacing_test=True)
        for name in (
            X_TEST,
            Y_TEST,
            K_TEST_TRAIN,
            K_TEST_DIAG,
            record(K_TEST_TRAIN),
            record(K_TEST_DIAG),
            MEAN,
            VARIANCE,
            record(PREDICT),
        ):
            self.drop(name)
        t = meta["tile_size"]
        plan = TilePlan(meta["n_train"], len(data.x_test), t)
        _create_inputs(g, data, (X_TEST, Y_TEST), t)
        _create_kernel(g, plan, meta["dtype"], (K_TEST_TRAIN, K_TEST_DIAG))
        meta = self.meta
        meta.pop("replacing_test")
        meta["stages"] = {k: v for k, v in meta.get("stages", {}).items() if k != "predict"}
        meta.update(
            dataset=data.name, fingerprint=data.fingerprint, n_test=len(data.x_test), predict=None
        )
        g.attrs["nngp_dist"] = meta

    # --- reading ------------------------------------------------------------------------------

    @property
    def meta(self) -> dict:
        return dict(self._group.attrs["nngp_dist"])

    @property
    def spec(self) -> Spec:
        """The store's architecture (see :meth:`open` for a spec that names Python code)."""
        return Spec.from_dict(self.meta["spec"], trust=self.trust_code)

    @property
    def plan(self) -> TilePlan:
        m = self.meta
        return TilePlan(m["n_train"], m["n_test"], m["tile_size"])

    def done(self, name: str) -> np.ndarray:
        """Boolean map of the tiles of ``name`` that are completely written."""
        return ~np.isnan(self._group[record(name)][...])

    def tile_seconds(self, name: str) -> np.ndarray:
        """The completion records of ``name``: seconds per tile, NaN where not done."""
        return self._group[record(name)][...]

    def status(self) -> dict:
        """Tiles done and total per array, stage, spec and timings."""
        meta = self.meta
        plan = self.plan
        arrays = {}
        seconds = 0.0
        for name in KERNEL_ARRAYS:
            rec = self.tile_seconds(name)
            wanted = plan.wanted(name)
            done = ~np.isnan(rec) & wanted
            arrays[name] = {"done": int(done.sum()), "total": int(wanted.sum())}
            seconds += float(np.nansum(rec))
        tiles_done = sum(a["done"] for a in arrays.values())
        tiles_total = sum(a["total"] for a in arrays.values())
        return {
            "store": self.url,
            "stage": self._stage(tiles_done < tiles_total),
            "tiles_done": tiles_done,
            "tiles_total": tiles_total,
            "arrays": arrays,
            "task_seconds": round(seconds, 3),
            "spec": meta["spec"],
            "dataset": meta["dataset"],
            "n_train": meta["n_train"],
            "n_test": meta["n_test"],
            "tile_size": meta["tile_size"],
            "dtype": meta["dtype"],
            "stages": meta.get("stages", {}),
            "factor": meta.get("factor"),
            "solve": meta.get("solve"),
            "predict": meta.get("predict"),
            **self.solver_progress(),
        }

    def _stage(self, kernel_missing: bool) -> str:
        meta = self.meta
        if kernel_missing:
            return "kernel"
        if not meta.get("solve"):
            return "solve" if meta.get("factor") else "kernel-done"
        if not self.has(record(PREDICT)):
            return "solved"
        if np.isnan(self.read(record(PREDICT))).any() or not meta.get("predict"):
            return "predict"
        if self.has(record(LOO)) and np.isnan(self.read(record(LOO))).any():
            return "predict"
        return "done"

    def solver_progress(self) -> dict:
        """Factor tiles done, prediction blocks done, per-output stores' stages and an
        out-of-core noise grid's noises done, for ``status``."""
        out = {}
        if self.has(record(CHOL)):
            rec = ~np.isnan(self.read(record(CHOL)))
            out["factor_tiles"] = {
                "done": int(np.triu(rec).sum()),
                "total": int(np.triu(np.ones_like(rec)).sum()),
            }
        if self.has(record(PREDICT)):
            rec = ~np.isnan(self.read(record(PREDICT)))
            out["predict_blocks"] = {"done": int(rec.sum()), "total": int(rec.size)}
        if self.has(record(LOO)):
            rec = ~np.isnan(self.read(record(LOO)))
            out["loo_blocks"] = {"done": int(rec.sum()), "total": int(rec.size)}
        stages = []  # a Laplace-GP's per-output stores, outputs/<c>
        while self.has(f"{OUTPUTS}/{len(stages)}/{record(K_TRAIN_TRAIN)}"):
            sub = KernelStore.open(f"{self.url}/{OUTPUTS}/{len(stages)}")
            stages.append(sub.status()["stage"])
        if stages:
            out["outputs"] = stages
        grid = self.meta.get("noise_grid")  # an out-of-core lml grid under way
        if grid:
            noises = grid["options"]["noise"]
            out["noise_grid"] = {"noises": noises, "done": len(grid["rows"])}
        return out

    # --- arrays: the only way other modules reach the group ---------------------------------

    def has(self, name: str) -> bool:
        """Whether the array (or records) ``name`` exists."""
        return name in self._group

    def array(self, name: str) -> zarr.Array:
        """The array ``name`` (a constant of :mod:`nngp_dist.layout`, or ``record(name)``)."""
        return self._group[name]

    def read(self, name: str, *, complete: bool = False) -> np.ndarray:
        """The whole array ``name``, in memory (for the small ones: inputs, labels, vectors),
        checked as :func:`read_checked` checks (``complete``: no NaN, no chunk missing)."""
        return read_checked(self._group[name], url=self.url, complete=complete)

    def array_names(self) -> list[str]:
        """The paths of every array in the store (completion records included)."""
        with warnings.catch_warnings():  # our lock and marker files are no arrays: not a concern
            warnings.filterwarnings("ignore", "Object at .* is not recognized")
            top = sorted(path for path, _ in self._group.arrays())
        return top + sorted(f"{RECORDS}/{path}" for path, _ in self._group[RECORDS].arrays())

    def chunks_present(self, name: str) -> set[tuple[int, ...]]:
        """The coordinates of the chunks of ``name`` that exist in the store (a chunk never
        written reads as the fill value)."""
        arr = self._group[name]
        prefix = f"{arr.path}/c/"
        found = set()
        for key in collect_aiterator(arr.store.list_prefix(prefix)):
            parts = key[len(prefix) :].split("/")
            if len(parts) == arr.ndim and all(p.isdigit() for p in parts):
                found.add(tuple(int(p) for p in parts))  # not a .partial file of a write
        return found

    def delete_chunk(self, name: str, coords: tuple[int, ...]) -> None:
        """Delete one chunk of ``name``: it then reads as the fill value (not done)."""
        arr = self._group[name]
        sync(arr.store.delete(_chunk_key(arr, coords)))

    def drop(self, *names: str) -> None:
        """Delete the arrays ``names`` that exist."""
        for name in names:
            if name in self._group:
                del self._group[name]

    def mean_diag(self) -> float:
        """The mean of the training kernel's diagonal: the unit of the relative ``noise``
        (the absolute jitter on the diagonal is ``noise * mean_diag``)."""
        return float(np.mean(self.read(K_TRAIN_DIAG, complete=True)))

    def noise_unit(self) -> float:
        """What the solvers' relative noise is relative to: the mean training diagonal, or 1
        for a store with a noise scale (:meth:`set_noise_scale`), whose factor is that of
        ``S K S + noise I``."""
        return 1.0 if self.has(LAPLACE_SCALE) else self.mean_diag()

    def set_noise_scale(self, scale: np.ndarray) -> None:
        """Per-point noise: from now on the factor is that of ``S K S + s I`` with ``S =
        diag(scale)`` (``scale = sqrt(Lambda)``, the noise precision's square root), so that
        ``(K + Lambda^-1)^-1 = S (S K S + I)^-1 S`` holds for any ``Lambda >= 0`` (Rasmussen and
        Williams 2006, eq. 3.26). A factor and solution made with another scale are dropped."""
        scale = np.asarray(scale, dtype=np.float64)
        if self.has(LAPLACE_SCALE) and np.array_equal(self.read(LAPLACE_SCALE), scale):
            return
        self.drop_factor()
        self.drop(T_TRAIN, ALPHA, MEAN, VARIANCE, record(PREDICT), *LOO_ARRAYS)
        self.update_meta(factor=None, solve=None, predict=None)
        n, t = self.meta["n_train"], solve_block(self.meta)
        self._create(LAPLACE_SCALE, (n,), (t,), "float64", compress=False)
        self._group[LAPLACE_SCALE][...] = scale

    def prepare_laplace(self, outputs: int) -> None:
        """The Laplace-GP posterior's ``mean`` and ``variance``, (M, C), and one prediction
        record (the posterior is assembled from the output stores in one step)."""
        m = self.meta["n_test"]
        for name in (MEAN, VARIANCE):
            self._create(name, (m, outputs), (max(m, 1), outputs), "float64", dims=DIMS[MEAN])
        self._create(record(PREDICT), (1,), (1,), "float32", compress=False, dims=("test_block",))
        self.update_meta(predict_block=max(m, 1), predict=None)

    def _create(
        self,
        name: str,
        shape: tuple[int, ...],
        chunk: tuple[int, ...],
        dtype: str,
        fill: Any = np.nan,
        *,
        compress: bool = True,
        dims: tuple[str, ...] | None = None,
    ) -> zarr.Array:
        """Create (or replace) the array ``name``; chunk edges capped at its extent."""
        return self._group.create_array(
            name,
            shape=shape,
            chunks=_chunks(shape, chunk),
            dtype=dtype,
            fill_value=fill,
            dimension_names=dims or DIMS.get(name),
            overwrite=True,
            compressors=COMPRESSORS if compress else CHECKSUM,
        )

    # --- the solve stage's arrays ---------------------------------------------------------------

    def prepare_solve(self, t_train: np.ndarray) -> None:
        """(Re)create ``t_train`` and ``alpha``; forget any earlier predictions."""
        n, c = t_train.shape
        t = solve_block(self.meta)
        for name in (T_TRAIN, ALPHA):
            self._create(name, (n, c), (t, c), "float64")
        self._group[T_TRAIN][...] = t_train
        self.drop(MEAN, VARIANCE, record(PREDICT), *LOO_ARRAYS)
        meta = self.meta
        # The old predictions are gone: so is the record saying they were finished.
        stages = {k: v for k, v in meta.get("stages", {}).items() if k != "predict"}
        self.update_meta(solve=None, predict=None, stages=stages)

    def create_factor(self) -> None:
        """Empty ``chol``, its two work arrays and their records (replacing any earlier ones)."""
        meta = self.meta
        n, t = meta["n_train"], solve_block(meta)
        nt = -(-n // t)
        for name in (CHOL, *CHOL_WORK):
            self._create(name, (n, n), (t, t), "float64", compress=False)
        records = ("train_tile", "train_col_tile")
        self._create(record(CHOL), (nt, nt), (1, 1), "float32", compress=False, dims=records)
        self._create(record(CHOL_STEP), (nt, nt), (1, 1), "int32", 0, compress=False, dims=records)

    def reset_factor(self, first: int) -> None:
        """Forget the factor from block row ``first`` on (its blocks and updates), so that the
        next factorisation of the same noise recomputes those rows from the kernel and keeps
        the rows above, which do not depend on them; the solution goes with it."""
        meta, n = self.meta, self.meta["n_train"]
        t = solve_block(meta)
        done, steps = self._group[record(CHOL)], self._group[record(CHOL_STEP)]
        done[first:, :] = np.nan  # whole chunks written: none of them is read first
        steps[first:, :] = 0
        for name in CHOL_WORK:  # deleted when the factor completed; the updates need them
            if name not in self._group:
                self._create(name, (n, n), (t, t), "float64", compress=False)
        factor = meta.get("factor")
        self.update_meta(factor=factor and {**factor, "complete": False}, solve=None, predict=None)

    def drop_factor(self, *, work_only: bool = False) -> None:
        """Delete the factor's work arrays, and unless ``work_only`` the factor and records."""
        self.drop(*CHOL_WORK)
        if not work_only:
            self.drop(CHOL, record(CHOL), record(CHOL_STEP))

    def create_scratch(self, name: str, columns: int) -> zarr.Array:
        """A CG preconditioner's (N, columns) array (``cg_nystrom`` or ``cg_blockjacobi``)."""
        if name not in (CG_NYSTROM, CG_BLOCKJACOBI):
            raise ValueError(f"{name!r} is not a scratch array of the CG solver")
        meta = self.meta
        n, t = meta["n_train"], solve_block(meta)
        return self._create(name, (n, columns), (t, columns), "float64", compress=False)

    # --- the predict stage's arrays -------------------------------------------------------------

    def prepare_predict(self, block: int) -> None:
        """Create ``mean``, ``variance`` and their records unless present for this block size."""
        meta = self.meta
        if self.has(record(PREDICT)) and meta.get("predict_block") == block:
            return
        m, c = meta["n_test"], self._group[T_TRAIN].shape[1]
        self._create(MEAN, (m, c), (block, c), "float64")
        self._create(VARIANCE, (m,), (block,), "float64")
        self._create(
            record(PREDICT),
            (-(-m // block),),
            (1,),
            "float32",
            compress=False,
            dims=("test_block",),
        )
        self.update_meta(predict_block=block, predict=None)

    def prepare_loo(self, index: np.ndarray, block: int) -> None:
        """Create the leave-one-out arrays for the training points ``index`` (increasing),
        ``block`` per task, unless present for these points (then their finished blocks stand:
        all of them when complete, whatever their block; else only if it is ``block``). With
        no points, drop them. The record is created last (a record always has its arrays), and
        ``loo_block`` is the block the arrays were made with."""
        if not len(index):
            self.drop(*LOO_ARRAYS)
            return
        if self.has(record(LOO)):
            rec = self.read(record(LOO))
            made = self._group[LOO_INDEX].chunks[0]  # the block, capped at the extent
            same = self._group[LOO_INDEX].shape == index.shape and np.array_equal(
                read_checked(self._group[LOO_INDEX], url=self.url, complete=False), index
            )
            if same and (not np.isnan(rec).any() or made == min(block, len(index))):
                self.update_meta(loo_block=int(made))
                return
        self.update_meta(predict=None)  # the report's leave-one-out part goes with them
        self.drop(*LOO_ARRAYS)
        n_loo, c = len(index), self._group[T_TRAIN].shape[1]
        self._create(LOO_INDEX, (n_loo,), (block,), "int64", fill=-1)
        self._group[LOO_INDEX][...] = index
        self._create(LOO_MEAN, (n_loo, c), (block, c), "float64")
        self._create(LOO_VARIANCE, (n_loo,), (block,), "float64")
        self.update_meta(loo_block=int(min(block, n_loo)))
        self._create(
            record(LOO), (-(-n_loo // block),), (1,), "float32", compress=False, dims=("loo_block",)
        )

    # --- attributes (client side) ---------------------------------------------------------------

    def update_meta(self, **fields: Any) -> None:
        """Set top-level entries of the ``nngp_dist`` root attribute."""
        self._group.attrs["nngp_dist"] = {**self.meta, **fields}

    def record_stage(self, stage: str, **fields: Any) -> None:
        """Merge ``fields`` into the record of ``stage`` in the root attributes."""
        meta = self.meta
        stages = dict(meta.get("stages", {}))
        stages[stage] = {**stages.get(stage, {}), **fields}
        meta["stages"] = stages
        self._group.attrs["nngp_dist"] = meta


def _half_created(url: str) -> UserError:
    return UserError(
        f"the store at {url} was never completely created (its job was stopped while "
        "creating it); run the kernel command again to create it anew"
    )


def _fs(url: str) -> tuple[Any, str]:
    """The fsspec file system of a non-local ``url``, and the store's path in it."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    return fs, root.rstrip("/")


def _creating(url: str) -> bool:
    """Whether the creation marker is at ``url``: a creation begun and not finished."""
    if is_local(url):
        return (local_path(url) / CREATING).is_file()
    try:
        fs, root = _fs(url)
        fs.invalidate_cache(root)
        return bool(fs.exists(f"{root}/{CREATING}"))
    except (ImportError, ValueError, OSError):
        return False  # an unusable URL: reported by whoever opens it


def _set_marker(url: str, present: bool) -> None:
    """Write (``present``) or remove the creation marker at ``url``."""
    if is_local(url):
        path = local_path(url) / CREATING
        if present:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(utcnow())
        else:
            path.unlink(missing_ok=True)
        return
    fs, root = _fs(url)
    if present:
        fs.pipe_file(f"{root}/{CREATING}", utcnow().encode())
    elif fs.exists(f"{root}/{CREATING}"):
        fs.rm_file(f"{root}/{CREATING}")


def _clear(url: str) -> None:
    """Delete everything at ``url`` but the lock and the creation marker."""
    keep = {LOCK, CREATING}
    if is_local(url):
        for entry in local_path(url).iterdir():
            if entry.name in keep:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        return
    fs, root = _fs(url)
    fs.invalidate_cache(root)
    for entry in fs.ls(root, detail=False) if fs.exists(root) else []:
        if entry.rstrip("/").rsplit("/", 1)[-1] not in keep:
            fs.rm(entry, recursive=True)
    fs.invalidate_cache(root)


def _chunks(shape: tuple[int, ...], chunk: int | tuple[int, ...]) -> tuple[int, ...]:
    """Chunks of edge ``chunk`` (one edge or one per dimension), capped at the array's extent.

    Zarr stores every chunk at its full shape, padding a ragged one with the fill value, so a
    test set of 10 rows in (T, T) chunks would write T / 10 times the bytes it holds (and on a
    fresh page cache those bytes cost as much CPU as the tile's kernel). Capping changes no
    tile's index: a dimension shorter than T has one tile either way.
    """
    edges = (chunk,) * len(shape) if isinstance(chunk, int) else chunk
    return tuple(max(1, min(e, s)) for e, s in zip(edges, shape))


def _create_inputs(root: zarr.Group, data: Dataset, names: tuple[str, ...], t: int) -> None:
    for name in names:
        a = getattr(data, name)
        arr = root.create_array(
            name,
            shape=a.shape,
            chunks=_chunks(a.shape[:1], t) + a.shape[1:],
            dtype=a.dtype,
            dimension_names=DIMS[name][: a.ndim] + ("target",) * (a.ndim - len(DIMS[name])),
            compressors=COMPRESSORS,
        )
        arr[...] = a


def _create_kernel(root: zarr.Group, plan: TilePlan, dtype: str, names: tuple[str, ...]) -> None:
    """Empty kernel arrays (fill NaN) and their completion records (NaN: not done)."""
    n, m, t = plan.n_train, plan.n_test, plan.tile_size
    shapes = {K_TRAIN_TRAIN: (n, n), K_TEST_TRAIN: (m, n), K_TRAIN_DIAG: (n,), K_TEST_DIAG: (m,)}
    for name in names:
        shape = shapes[name]
        root.create_array(
            name,
            shape=shape,
            chunks=_chunks(shape, t),
            dtype=dtype,
            fill_value=np.nan,
            dimension_names=DIMS[name],
            compressors=COMPRESSORS,
        )
        grid = plan.grid(name)
        root[RECORDS].create_array(
            name,
            shape=grid,
            chunks=(1,) * len(grid),
            dtype="float32",
            fill_value=np.nan,
            dimension_names=tuple(f"{d}_tile" for d in DIMS[name]),
            compressors=CHECKSUM,
        )


PARTIAL = ".partial"  # the suffix of the temporary files of atomic writes (zarr's and ours)


def remove_partials(root: Path) -> int:
    """Delete the temporary files of atomic writes left in the store at ``root`` by killed
    writers; return how many.

    Every chunk and record is written to ``<name>.<random>.partial`` and renamed into place
    (zarr's ``LocalStore`` and :func:`nngp_dist.workers._flushed_put` alike), so such a file is
    never data: a SIGKILL between the write and the rename leaves one behind. Called when a
    writer opens the store, before it submits any task of its own. A task of an earlier job
    still running on a shared cluster loses its write if its file is removed under it (its
    rename fails, so nothing is recorded as done), which costs only a recomputation.
    """
    removed = 0
    for folder, _, files in os.walk(root):
        for name in files:
            if name.endswith(PARTIAL):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(folder, name))
                    removed += 1
    return removed


def writable(folder: Path | str) -> bool:
    """Whether a file can be created in ``folder``: tried, not guessed (``os.access`` says yes
    to root everywhere, and to read-only mounts and pseudo file systems)."""
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".nngp-dist-probe-"):
            return True
    except OSError:
        return False


def _show(meta: dict, key: str) -> str:
    v = meta.get(key)
    if key == "spec_hash":
        return f"{str(v)[:12]}... ({meta.get('spec')})"
    if key == "fingerprint":
        sizes = f"{meta.get('n_train')} train, {meta.get('n_test')} test"
        return f"{str(v)[:12]}... ({meta.get('dataset')}, {sizes})"
    return repr(v)


def solve_block(meta: dict) -> int:
    """Rows per block of the solvers for a store's attributes (see ``solve_block`` above)."""
    return int(meta.get("solve_block") or meta["tile_size"])


# Errors of a chunk that does not decode: a failed checksum (ValueError), a blosc stream cut
# short or garbled (RuntimeError, from a store made before checksums), a chunk of the wrong
# length ("cannot reshape", ValueError), an unreadable file (OSError).
_DECODE_ERRORS = (ValueError, RuntimeError, OSError)


def _chunk_range(sel: Any, size: int, chunk: int) -> range:
    if isinstance(sel, slice):
        start, stop, _ = sel.indices(size)
        return range(start // chunk, max(start, stop - 1) // chunk + 1)
    return range(int(sel) // chunk, int(sel) // chunk + 1)


def _chunks_of(arr: zarr.Array, selection: Any) -> list[tuple[int, ...]]:
    """The chunk coordinates a basic selection (slices, integers, ``...``) reads."""
    sel = selection if isinstance(selection, tuple) else (selection,)
    if Ellipsis in sel:
        k = sel.index(Ellipsis)
        sel = sel[:k] + (slice(None),) * (arr.ndim - len(sel) + 1) + sel[k + 1 :]
    sel = sel + (slice(None),) * (arr.ndim - len(sel))
    ranges = [_chunk_range(x, n, c) for x, n, c in zip(sel, arr.shape, arr.chunks)]
    return list(itertools.product(*ranges))


def _store_url(arr: zarr.Array) -> str:
    root = getattr(arr.store, "root", None)
    return str(root) if root is not None else str(arr.store_path).removesuffix("/" + arr.path)


def _chunk_key(arr: zarr.Array, coords: tuple[int, ...]) -> str:
    return f"{arr.path}/{arr.metadata.encode_chunk_key(coords)}"


def _chunk_present(arr: zarr.Array, coords: tuple[int, ...]) -> bool:
    return bool(sync(arr.store.exists(_chunk_key(arr, coords))))


def _corrupt(arr: zarr.Array, coords: tuple[int, ...], why: str, url: str | None) -> CorruptStore:
    url = url or _store_url(arr)
    tile = ", ".join(map(str, coords))
    return CorruptStore(
        f"{url}: array {arr.path}, tile ({tile}) (chunk {_chunk_key(arr, coords)}): {why}. "
        "Nothing was computed from it. Run 'nngp-dist verify --store "
        f"{url} --repair': it finds every bad chunk and forgets what was computed from them, "
        "and says what to re-run to recompute just those."
    )


def chunk_problem(arr: zarr.Array, coords: tuple[int, ...], complete: bool | str) -> str | None:
    """What is wrong with chunk ``coords`` of ``arr`` (None if nothing): it does not decode
    (a failed checksum among them), or, with ``complete``, it reads NaN: missing or never
    written, though recorded. ``complete="upper"`` asks only for the tiles on and above the
    diagonal, and of the diagonal ones their upper triangle."""
    try:
        block = np.asarray(arr.get_block_selection(coords))
    except _DECODE_ERRORS as e:
        return f"it does not decode ({type(e).__name__}: {e})"
    if not complete or not _has_sentinel(arr):
        return None
    if complete == "upper" and coords[0] > coords[-1]:
        return None  # a lower tile: never written
    upper = complete == "upper" and coords[0] == coords[-1]
    if not _unwritten(np.triu(block) if upper else block, arr).any():
        return None
    if not _chunk_present(arr, coords):
        return "it is missing, though its completion record says it was written"
    return "it holds NaN, though its completion record says it was written"


def _has_sentinel(arr: zarr.Array) -> bool:
    """Whether ``arr``'s fill value marks a value never written: NaN in a float array, a
    negative fill in an integer one (``loo_index``'s -1; labels fill with 0, a real label)."""
    if arr.dtype.kind == "f":
        return True
    return arr.dtype.kind == "i" and arr.fill_value is not None and arr.fill_value < 0


def _unwritten(values: np.ndarray, arr: zarr.Array) -> np.ndarray:
    """Where ``values`` (read from ``arr``) hold its fill value: never written."""
    return np.isnan(values) if values.dtype.kind == "f" else values == arr.fill_value


def _bad_chunk(
    arr: zarr.Array, selection: Any, complete: bool | str
) -> tuple[tuple[int, ...], str] | None:
    """The first bad chunk of ``selection`` and why (after a read of it failed or found NaN)."""
    for coords in _chunks_of(arr, selection):
        why = chunk_problem(arr, coords, complete)
        if why:
            return coords, why
    return None


def read_checked(
    arr: Any, selection: Any = Ellipsis, *, url: str | None = None, complete: bool | str = True
) -> np.ndarray:
    """``arr[selection]`` as a NumPy array, every chunk's checksum verified on the way (zarr
    does it); :class:`~nngp_dist.errors.CorruptStore` naming the array and the tile if a chunk
    does not decode, or, with ``complete``, if the values read hold NaN (the fill value: a
    chunk deleted, or never written though recorded). ``complete="upper"``: only the upper
    triangle of the diagonal blocks must be written (the train kernel's diagonal tiles of a
    solver block that spans several). Arrays other than zarr's are read as they are."""
    if not isinstance(arr, zarr.Array):
        return np.asarray(arr[selection])
    try:
        out = np.asarray(arr[selection])
    except _DECODE_ERRORS:
        bad = _bad_chunk(arr, selection, complete)
        if bad is None:
            raise  # not a chunk's fault
        raise _corrupt(arr, *bad, url) from None
    if complete and _has_sentinel(arr):
        check = np.triu(out) if complete == "upper" and out.ndim == 2 else out
        if _unwritten(check, arr).any():
            bad = _bad_chunk(arr, selection, complete)
            coords, why = bad or (_chunks_of(arr, selection)[0], "it reads NaN")
            raise _corrupt(arr, coords, why, url)
    return out


def open_store(path: str) -> Any:
    """Open a kernel store as an ``xarray.Dataset``, the train x train kernel made symmetric.

    ``k_train_train`` is mirrored lazily from its upper tiles (a dask array reading each
    tile from the store when computed, a lower tile as the transpose of its upper one), so the full
    symmetric N x N matrix reads correctly; tiles not yet computed read as NaN. Coordinates:
    ``train``, ``train_col``, ``test`` (example indices) and the labels ``y_train``,
    ``y_train_col`` and ``y_test``.

    Examples
    --------
    >>> ds = open_store("kernels.zarr")  # doctest: +SKIP
    >>> ds.k_train_train.sortby("y_train").sortby("y_train_col").plot()  # doctest: +SKIP
    """
    import dask.array as da
    import xarray as xr

    store = KernelStore.open(path)  # a clear error if this is not a store
    with warnings.catch_warnings():  # the lock of a job writing it is no array: not a concern
        warnings.filterwarnings("ignore", f"Object at {LOCK} is not recognized")
        ds = xr.open_zarr(store.url, consolidated=False)
    k = store.array(K_TRAIN_TRAIN)
    t = store.meta["tile_size"]
    chunks = tuple(tuple(min(t, n - s) for s in range(0, n, t)) for n in k.shape)

    def mirrored(block_id: tuple[int, int] | None = None) -> np.ndarray:
        i, j = block_id or (0, 0)
        a, b = sorted((i, j))
        tile = k[a * t : (a + 1) * t, b * t : (b + 1) * t]
        if i > j:
            return tile.T
        return symmetric(tile) if i == j else tile

    sym = da.map_blocks(mirrored, chunks=chunks, dtype=k.dtype, meta=np.empty((0, 0), k.dtype))
    ds[K_TRAIN_TRAIN] = (DIMS[K_TRAIN_TRAIN], sym)
    ds = ds.assign_coords(
        train=np.arange(ds.sizes["train"]),
        train_col=np.arange(ds.sizes["train_col"]),
        test=np.arange(ds.sizes["test"]),
    )
    if ds[Y_TRAIN].ndim == 1:
        ds = ds.set_coords([Y_TRAIN, Y_TEST])
        ds = ds.assign_coords({f"{Y_TRAIN}_col": ("train_col", ds[Y_TRAIN].values)})
    return ds
