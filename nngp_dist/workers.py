"""Worker-side plumbing shared by every stage's tasks: the task context, the store, the allocator.

Every task that reads or writes the store takes a :class:`TaskContext` (which store, which
creation of it, its block edge and training size) and is wrapped by :func:`store_task`, which
opens the store's group once per worker, tunes the allocator, times the task and writes its
completion record. The tile mathematics inside a task are plain array functions
(:mod:`nngp_dist.solvers.tiles`), testable without a cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import errno
import functools
import hashlib
import logging
import math
import mmap
import os
import platform
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import zarr
from distributed.diagnostics.plugin import WorkerPlugin
from zarr.storage import LocalStore

from .layout import RECORDS, record
from .storage import KernelStore, is_local, local_path, solve_block
from .tiling import span

__all__ = [
    "FlushingStore",
    "Recorded",
    "TaskContext",
    "Warmup",
    "open_group",
    "release_memory",
    "store_task",
    "store_token",
    "task_key",
    "tune_allocator",
]


def store_token(meta: dict) -> str:
    """Identifies one creation of a store: its creation time and data fingerprint."""
    return f"{meta['created']}/{meta['fingerprint']}"


@dataclasses.dataclass(frozen=True)
class TaskContext:
    """What every task on a store takes: the store (``url`` and ``token``, one creation of it),
    the block edge ``t`` its task splits the training set by, and the training size ``n``."""

    url: str
    token: str
    t: int
    n: int

    @classmethod
    def of(cls, store: KernelStore, t: int | None = None) -> TaskContext:
        """The context of ``store``'s tasks; ``t`` defaults to the solvers' block."""
        meta = store.meta
        return cls(store.url, store_token(meta), t or solve_block(meta), meta["n_train"])

    @property
    def blocks(self) -> int:
        """Number of row blocks of the training set."""
        return math.ceil(self.n / self.t)

    def span(self, k: int) -> slice:
        """The training examples of block ``k``."""
        return span(self.t, self.n, k)

    def key(self, *parts: object) -> str:
        """A Dask key for a task of this store (see :func:`task_key`)."""
        return task_key(self.url, self.token, *parts)


class Recorded(NamedTuple):
    """What a :func:`store_task` returns when it has completed a unit of an array: the array
    ``name`` whose completion record ``tiles/<name>[index]`` gets the task's seconds, and the
    task's result ``value`` (the seconds themselves when None)."""

    name: str
    index: tuple[int, ...] | int
    value: Any = None


def store_task(fn: Callable | None = None, *, flush: bool = False) -> Callable:
    """Wrap a task ``fn(ctx, group, *args)`` into ``task(ctx, *args)``, run on a worker.

    The wrapper tunes the allocator, opens the store's group (once per worker; through
    :class:`FlushingStore` with ``flush``) and times the task. When ``fn`` returns
    :class:`Recorded`, the wrapper writes the task's seconds to its completion record after
    ``fn`` has written its data (so a task killed mid-write is never counted as done) and
    returns its ``value`` (or the seconds); any other result is returned as it is.
    """

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def task(ctx: TaskContext, *args: Any) -> Any:
            start = time.perf_counter()
            tune_allocator()
            group = open_group(ctx.url, ctx.token, flush=flush)
            out = fn(ctx, group, *args)
            if not isinstance(out, Recorded):
                return out
            seconds = time.perf_counter() - start
            group[record(out.name)][out.index] = max(seconds, 1e-9)
            return seconds if out.value is None else out.value

        return task

    return wrap if fn is None else wrap(fn)


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
    re-grown (a ReLU tile measured both ways: benchmarks/RESULTS.md). Here allocations below 32
    MiB (glibc's largest mmap threshold; tiles of up to 2047^2 float64 values) come from the
    heap, and up to 256 MiB of free heap is kept for reuse rather than returned to the OS, since
    page faults on fresh mappings are a tile's largest overhead on VMs that hand free memory
    back to their host. Larger allocations are still mapped and returned when freed.
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


def release_memory() -> None:
    """Hand the heap's free pages back to the OS (glibc's ``malloc_trim``), after a task whose
    temporaries were large: a trained network's tile frees gigabytes of autograd and feature
    tensors, whose pages the tuned allocator would otherwise keep, and a worker whose resident
    memory stays above Dask's pause threshold gets no more tasks."""
    if tune_allocator():
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class FlushingStore(LocalStore):
    """A local store that puts each array chunk on disk before the chunk counts as written,
    without keeping it in the page cache; completion records (``tiles/``) and metadata are
    written as zarr's :class:`~zarr.storage.LocalStore` writes them.

    The kernel stage writes its tiles through it, for two reasons:

    - Durability. A completion record follows its tile's data to disk, not just to the page
      cache. A machine that crashes or loses power after recording a tile then cannot come
      back with the record but not the tile. (The rename into place is left to the file
      system's journal, which commits it in order on ext4 and XFS.)
    - Memory. A 50k x 50k kernel is 20 GB of tiles that this stage never reads again. Chunks
      are written with O_DIRECT from a reused, page-aligned buffer, so they take no page-cache
      pages at all; where the file system refuses O_DIRECT (tmpfs, some FUSE and network
      mounts) they are written through the cache, flushed and dropped from it. On VMs that
      hand free guest memory back to the host (free page reporting), every page the cache
      takes is faulted in afresh, which costs several times the write itself (measured in
      benchmarks/RESULTS.md).

    Chunks are chosen by key, not by size: a compressed chunk's size says nothing of what it
    holds. Stages that re-read what they write (the Cholesky factor's panels) keep the plain
    store, so their reads hit the cache. On a file system that cannot flush (some FUSE
    mounts), the chunk is written without the flush.
    """

    @staticmethod
    def flushes(key: str) -> bool:
        """Whether ``key`` is written flushed: chunks of arrays, not completion records."""
        return "/c/" in f"/{key}" and not key.startswith(f"{RECORDS}/")

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


# errno values of a file system that does not support flushing, cache advice or O_DIRECT.
_UNSUPPORTED = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}

# O_DIRECT wants the buffer's address, the length and the file offset in multiples of the
# device's logical block: 4096 covers every common disk (512 and 4096 byte sectors).
_ALIGN = 4096


def _flushed_put(path: Path, data: memoryview) -> None:
    """Write ``data`` to a temporary file, flush it to disk and rename it into place
    (atomically, like zarr's own writes), without leaving it in the page cache. A failed
    write or flush (a full disk, an I/O error) removes the temporary file and raises; the
    old chunk stays."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")
    try:
        if not _put_direct(tmp, data):
            _put_cached(tmp, data)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _put_direct(tmp: Path, data: memoryview) -> bool:
    """Write ``data`` to the new file ``tmp`` with O_DIRECT, from a reused page-aligned buffer,
    and flush it. Returns False, having left no file, where the file system refuses O_DIRECT
    (tmpfs, some FUSE and network mounts) or the platform has none (macOS, Windows).

    O_DIRECT moves the bytes from the buffer to the disk without page-cache pages. A cached
    write needs about 26 MB of them per 2000 x 2000 tile, freshly faulted in on VMs that hand
    free memory back to their host.
    The tail is written padded to the block and the file then cut to its length.
    """
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return False
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | flag, 0o666)
    except OSError as e:
        if e.errno in _UNSUPPORTED:  # Linux may have created the file before refusing
            tmp.unlink(missing_ok=True)
            return False
        raise
    try:
        n = memoryview(data).nbytes
        padded = -(-n // _ALIGN) * _ALIGN
        with _aligned_buffer(padded) as buf, memoryview(buf) as view:
            buf.seek(0)
            buf.write(data)
            view[n:padded] = bytes(padded - n)  # not the previous chunk's bytes, even on disk
            done = 0
            while done < padded:
                try:
                    done += os.write(fd, view[done:padded])
                except OSError as e:
                    if done or e.errno not in _UNSUPPORTED:
                        raise
                    closing, fd = fd, -1  # refused at the first write: through the cache
                    os.close(closing)
                    tmp.unlink(missing_ok=True)
                    return False
        os.ftruncate(fd, n)
        _flush(fd, drop=False)
    finally:
        if fd >= 0:
            os.close(fd)
    return True


def _put_cached(tmp: Path, data: memoryview) -> None:
    """Write ``data`` to ``tmp`` through the page cache, flush it and drop it from the cache."""
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        _flush(f.fileno(), drop=True)


def _flush(fd: int, *, drop: bool) -> None:
    """Flush ``fd``'s data to disk (``fdatasync``; ``fsync`` on macOS), then, with ``drop``,
    advise the kernel to drop its pages from the cache. A file system that supports neither
    (some FUSE mounts) is left as it is."""
    try:
        (os.fdatasync if hasattr(os, "fdatasync") else os.fsync)(fd)
        if drop and hasattr(os, "posix_fadvise"):  # not on macOS or Windows
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError as e:
        if e.errno not in _UNSUPPORTED:
            raise


# Page-aligned buffers for O_DIRECT writes, reused across chunks (the first use faults their
# pages in; later chunks find them resident). At most _POOL_SIZE are kept: one per chunk
# written at once.
_POOL: list[mmap.mmap] = []
_POOL_LOCK = threading.Lock()
_POOL_SIZE = 4


@contextlib.contextmanager
def _aligned_buffer(size: int) -> Iterator[mmap.mmap]:
    with _POOL_LOCK:
        buf = min((b for b in _POOL if len(b) >= size), key=len, default=None)
        if buf is not None:
            _POOL.remove(buf)
    if buf is None:  # room for chunks up to 1/8 larger (compressed sizes vary), in whole MiB
        capacity = max(-(-(size + size // 8) // (1 << 20)) << 20, _ALIGN)
        buf = mmap.mmap(-1, capacity, flags=mmap.MAP_PRIVATE)  # private anonymous memory
    try:
        yield buf
    finally:
        with _POOL_LOCK:
            _POOL.append(buf)
            if len(_POOL) > _POOL_SIZE:
                _POOL.remove(smallest := min(_POOL, key=len))
                smallest.close()


@functools.lru_cache(maxsize=4)
def open_group(url: str, token: str, *, flush: bool = False) -> zarr.Group:
    """The store's root group, opened once per worker.

    ``flush``: write array chunks through :class:`FlushingStore` (local stores only; other
    file systems' stores are opened as zarr opens them). ``token`` (creation time + data
    fingerprint) keeps a worker from using the cached metadata of an earlier store that was
    overwritten at the same URL.
    """
    if flush and is_local(url):
        return zarr.open_group(FlushingStore(local_path(url)), mode="r+")
    return zarr.open_group(url, mode="r+")


def warm() -> None:
    """What a worker's first tile would otherwise pay for: import numba and load the compiled
    recursion (about a second), and tune the allocator."""
    from .kernels import fused  # numba and the compiled loops: only on workers

    tune_allocator()
    fused.warm()


# Task errors the client reports itself, with their remedy: the worker's own "Compute Failed"
# log of them (a traceback on the user's terminal for an embedded cluster) says nothing more.
HANDLED_ERRORS = ("CorruptStore(", "NotPositiveDefinite(")


class _HandledErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("Compute Failed") or not record.args:
            return True
        text = str(record.args[3]) if len(record.args) > 3 else ""
        return not any(text.startswith(name) for name in HANDLED_ERRORS)


class Warmup(WorkerPlugin):
    """Runs :func:`warm` in a background thread on every worker, as it joins: the loading then
    overlaps the client's own preparation (reading the dataset, writing the store) instead of
    delaying each worker's first tile. A tile that starts sooner waits on the import lock.
    It also keeps the worker from logging the task errors the client reports
    (:data:`HANDLED_ERRORS`)."""

    name = "nngp-dist-warmup"

    def setup(self, worker: object) -> None:
        log = logging.getLogger("distributed.worker")
        if not any(isinstance(f, _HandledErrors) for f in log.filters):
            log.addFilter(_HandledErrors())
        threading.Thread(target=warm, name=self.name, daemon=True).start()
