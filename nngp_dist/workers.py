"""Worker-side helpers shared by every stage's tasks: the store, the allocator, task keys."""

from __future__ import annotations

import asyncio
import ctypes
import errno
import functools
import hashlib
import os
import platform
import threading
import uuid
from pathlib import Path

import zarr
from distributed.diagnostics.plugin import WorkerPlugin
from zarr.storage import LocalStore

from .storage import _is_local, _local_path

__all__ = ["FlushingStore", "Warmup", "open_group", "store_token", "task_key", "tune_allocator"]


def store_token(meta: dict) -> str:
    """Identifies one creation of a store: its creation time and data fingerprint."""
    return f"{meta['created']}/{meta['fingerprint']}"


def task_key(url: str, token: str, *parts: object) -> str:
    """A Dask key unique to this store and its creation, so jobs sharing a cluster never
    collide, and readable on the dashboard (``tile-<job>-k_train_train-3-5``)."""
    job = hashlib.sha1(f"{url}|{token}".encode()).hexdigest()[:10]
    return f"{parts[0]}-{job}-" + "-".join(map(str, parts[1:])) if parts else job


@functools.lru_cache(maxsize=1)
def tune_allocator() -> bool:
    """Let glibc reuse freed heap memory for the recursion's many short-lived temporaries.

    Dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536``, which (like any explicit
    malloc setting) turns off glibc's adaptive mmap threshold: every temporary of 128 KiB or more
    is then mapped fresh and page-faulted in, and smaller ones are trimmed from the heap and
    re-grown. Measured on a 2048 x 2048 ReLU tile: 0.84 s with that setting, 0.56 s without.
    Here allocations below 32 MiB (glibc's largest mmap threshold; tiles of up to 2047^2 float64
    values) come from the heap, and up to 256 MiB of free heap is kept for reuse rather than
    returned to the OS: page faults on fresh mappings cost about 0.08 s per 32 MB tile on these
    VMs. Larger allocations are still mapped and returned when freed.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    ok = libc.mallopt(m_mmap_threshold, 32 << 20) and libc.mallopt(m_trim_threshold, 256 << 20)
    return bool(ok)


class FlushingStore(LocalStore):
    """A local store that puts each array chunk on disk before the chunk counts as written,
    and then drops it from the page cache; completion records (``tiles/``) and metadata are
    written as zarr's :class:`~zarr.storage.LocalStore` writes them.

    The kernel stage writes its tiles through it, for two reasons:

    - Durability. A completion record follows its tile's data to disk, not just to the page
      cache. A machine that crashes or loses power after recording a tile then cannot come
      back with the record but not the tile. (The rename into place is left to the file
      system's journal, which commits it in order on ext4 and XFS.)
    - Memory. A 50k x 50k kernel is 20 GB of tiles that this stage never reads again. Dropped
      from the cache, their pages go back to the next tile's write instead of growing the
      cache. On VMs that hand free guest memory back to the host (free page reporting, as on
      the Firecracker dev VMs), each page of a growing cache is faulted in afresh: writing a
      32 MB tile into new cache pages takes 0.095 s of CPU there; written, flushed and
      dropped, it takes 0.023 s, with the disk write included.

    Chunks are chosen by key, not by size: a compressed chunk's size says nothing of what it
    holds. Stages that re-read what they write (the Cholesky factor's panels) keep the plain
    store, so their reads hit the cache. On a file system that cannot flush (some FUSE
    mounts), the chunk is written without the flush.
    """

    @staticmethod
    def flushes(key: str) -> bool:
        """Whether ``key`` is written flushed: chunks of arrays, not completion records."""
        return "/c/" in f"/{key}" and not key.startswith("tiles/")

    async def set(self, key: str, value: zarr.core.buffer.Buffer) -> None:
        if not self.flushes(key):
            return await super().set(key, value)
        if not self._is_open:
            await self._open()
        self._check_writable()
        await asyncio.to_thread(_flushed_put, self.root / key, value.as_buffer_like())
        return None

    def set_sync(self, key: str, value: zarr.core.buffer.Buffer) -> None:
        if not self.flushes(key):
            return super().set_sync(key, value)
        self._ensure_open_sync()
        self._check_writable()
        _flushed_put(self.root / key, value.as_buffer_like())
        return None


# errno values of a file system that does not support flushing or cache advice.
_UNSUPPORTED = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}


def _flushed_put(path: Path, data: memoryview) -> None:
    """Write ``data`` to a temporary file, flush it to disk, drop it from the page cache and
    rename it into place (atomically, like zarr's own writes). A failed write or flush (a full
    disk, an I/O error) removes the temporary file and raises; the old chunk stays."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")
    try:
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            try:
                (os.fdatasync if hasattr(os, "fdatasync") else os.fsync)(f.fileno())  # macOS
                if hasattr(os, "posix_fadvise"):  # not on macOS or Windows
                    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            except OSError as e:
                if e.errno not in _UNSUPPORTED:
                    raise
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@functools.lru_cache(maxsize=4)
def open_group(url: str, token: str, *, flush: bool = False) -> zarr.Group:
    """The store's root group, opened once per worker.

    ``flush``: write array chunks through :class:`FlushingStore` (local stores only; other
    file systems' stores are opened as zarr opens them). ``token`` (creation time + data
    fingerprint) keeps a worker from using the cached metadata of an earlier store that was
    overwritten at the same URL.
    """
    if flush and _is_local(url):
        return zarr.open_group(FlushingStore(_local_path(url)), mode="r+")
    return zarr.open_group(url, mode="r+")


def warm() -> None:
    """What a worker's first tile would otherwise pay for: import numba and load the compiled
    recursion (about 1 s on the 2-core dev VM), and tune the allocator."""
    from .kernels import fused  # noqa: PLC0415

    tune_allocator()
    fused.warm()


class Warmup(WorkerPlugin):
    """Runs :func:`warm` in a background thread on every worker, as it joins: the loading then
    overlaps the client's own preparation (reading the dataset, writing the store) instead of
    delaying each worker's first tile. A tile that starts sooner waits on the import lock."""

    name = "nngp-dist-warmup"

    def setup(self, worker: object) -> None:
        threading.Thread(target=warm, name=self.name, daemon=True).start()
