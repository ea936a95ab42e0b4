"""One writer per store: a lease at the store's root, renewed by a heartbeat.

Every command that writes a store (kernel, solve, predict, run, verify --repair, a detached
job's driver, the estimators' ``fit`` and ``predict`` for their whole kernel + solve or kernel +
predict, and a sweep for its ``--out`` folder) holds the store's lock while it runs: the JSON
object :data:`~nngp_dist.layout.LOCK` at the store's root, with the holder's ``owner`` (a
random id), ``host``, ``pid``, ``started`` (the process's start time), ``command``, ``since``
and ``heartbeat`` (seconds since the epoch, renewed every :data:`HEARTBEAT` seconds by a daemon
thread). Readers (``status``, ``open_store``, notebooks) never take it.

* **Taking it** is a create-exclusive write: on a file system (local, NFS, any POSIX mount) a
  complete temporary file hard-linked to the lock's name, which fails if the name exists; on
  an object store (any other fsspec URL) a conditional PUT (``If-None-Match: *``) where the
  store supports it, else a write after an existence check. Either way the lease is read back
  (on an object store after :data:`SETTLE` seconds) and only a read-back naming this owner
  counts.
* **A live holder** is refused with a :class:`~nngp_dist.errors.UserError` naming it.
* **A stale holder** is taken over, with a message on stderr: one whose heartbeat is older
  than :data:`STALE` seconds, or, on this host, whose process (pid and start time) is gone.
* **Re-entrant within a process**: a job that calls others (``run`` calls ``kernel``,
  ``solve``, ``predict``) takes the lock once; nested calls on the same store only count.

Limits: staleness by heartbeat compares clocks, so hosts sharing a store must agree on the time
to well within :data:`STALE`; on an object store without conditional writes, two processes
starting within the settle time of each other may both see the lock free and both write it,
and then the read-back makes only the last writer the holder, unless the first had already read
its own lease back (a window of milliseconds, not closed); a holder whose heartbeat stops (a
suspended machine) for longer than :data:`STALE` may be taken over while it lives: its heartbeat
notices the new owner and says so on stderr.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from .errors import UserError
from .layout import LOCK
from .storage import is_local, local_path, normalize_url, utcnow

__all__ = [
    "HEARTBEAT",
    "STALE",
    "check_free",
    "holder",
    "process_alive",
    "process_start",
    "store_lock",
]

HEARTBEAT = 10.0  # seconds between renewals
STALE = 60.0  # seconds without renewal after which a lease is taken over
SETTLE = 0.5  # seconds between writing a lease to an object store and reading it back


def process_start(pid: int) -> float | None:
    """When process ``pid`` of this host started (seconds since the epoch), None if none runs."""
    try:
        import psutil

        return float(psutil.Process(pid).create_time())
    except ImportError:  # pragma: no cover - psutil comes with distributed
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return 0.0
    except Exception:  # NoSuchProcess, AccessDenied on a zombie, ...
        return None


def process_alive(pid: int, started: float | None) -> bool:
    """Whether process ``pid`` of this host runs and is the one that started at ``started``
    (not a later process given the same pid)."""
    now = process_start(pid)
    if now is None:
        return False
    return started is None or now == 0.0 or abs(now - started) < 1.0


class _Files:
    """The lease on a file system: complete files linked or renamed into place."""

    def __init__(self, root: Path):
        self.root = root
        self.path = root / LOCK
        self.made_root = False

    def _temp(self, data: bytes) -> Path:
        tmp = self.root / f"{LOCK}.{uuid.uuid4().hex}"
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def create(self, data: bytes) -> bool:
        if not self.root.exists():
            self.root.mkdir(parents=True, exist_ok=True)
            self.made_root = True
        tmp = self._temp(data)
        try:
            os.link(tmp, self.path)  # atomic, and fails if the name exists (NFS too)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def replace(self, data: bytes) -> None:
        os.replace(self._temp(data), self.path)

    def read(self) -> bytes | None:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return None

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        if self.made_root:
            with contextlib.suppress(OSError):
                self.root.rmdir()  # the store was never created: leave no empty folder

    def age(self) -> float:
        try:
            return time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return 0.0


class _Objects:
    """The lease on an object store (or any other fsspec file system)."""

    settle = SETTLE

    def __init__(self, url: str):
        import fsspec

        self.fs, root = fsspec.core.url_to_fs(url)
        self.path = f"{root.rstrip('/')}/{LOCK}"

    def create(self, data: bytes) -> bool:
        try:
            self.fs.pipe_file(self.path, data, mode="create")
            return True
        except FileExistsError:
            return False
        except Exception:  # no conditional writes here: check, then write
            self.fs.invalidate_cache(self.path)
            if self.fs.exists(self.path):
                return False
            self.fs.pipe_file(self.path, data)
            return True

    def replace(self, data: bytes) -> None:
        self.fs.pipe_file(self.path, data)

    def read(self) -> bytes | None:
        self.fs.invalidate_cache(self.path)
        try:
            return self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.path)

    def age(self) -> float:
        return 0.0


def _place(url: str) -> _Files | _Objects:
    return _Files(local_path(url)) if is_local(url) else _Objects(url)


def _parse(raw: bytes | None) -> dict | None:
    if raw is None:
        return None
    try:
        lease = json.loads(raw)
    except ValueError:
        return {}
    return lease if isinstance(lease, dict) else {}


def holder(url: str) -> dict | None:
    """The lease of the store at ``url`` (None when nobody holds it), for messages and tests."""
    return _parse(_place(normalize_url(url)).read())


def _stale(lease: dict, place: _Files | _Objects) -> str | None:
    """Why ``lease`` may be taken over, or None if its holder may be alive."""
    if not lease:  # unreadable: a lease being written, or garbage
        age = place.age()
        return f"its lease is unreadable and {age:.0f} s old" if age > STALE else None
    age = time.time() - float(lease.get("heartbeat", 0))
    if age > STALE:
        return f"its holder ({_who(lease)}) has not renewed it for {age:.0f} s"
    if lease.get("host") == socket.gethostname() and not process_alive(
        int(lease.get("pid", -1)), lease.get("started")
    ):
        return f"its holder ({_who(lease)}) no longer runs"
    return None


def _who(lease: dict) -> str:
    return (
        f"'{lease.get('command')}', pid {lease.get('pid')} on {lease.get('host')}, "
        f"since {lease.get('since')}"
    )


@dataclasses.dataclass
class _Held:
    owner: str
    place: _Files | _Objects
    lease: dict
    count: int = 1
    stop: threading.Event = dataclasses.field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    lost: bool = False


_HELD: dict[str, _Held] = {}
_GUARD = threading.RLock()


def _acquire(url: str, command: str) -> _Held:
    place = _place(url)
    pid = os.getpid()
    lease = {
        "owner": uuid.uuid4().hex,
        "host": socket.gethostname(),
        "pid": pid,
        "started": process_start(pid),
        "command": command,
        "since": utcnow(),
        "heartbeat": time.time(),
    }
    for _ in range(5):
        if place.create(json.dumps(lease).encode()):
            time.sleep(getattr(place, "settle", 0.0))
            seen = _parse(place.read())
            if seen and seen.get("owner") == lease["owner"]:
                return _Held(lease["owner"], place, lease)
        seen = _parse(place.read())
        if seen is None:
            continue  # released meanwhile: try again
        reason = _stale(seen, place)
        if reason is None:
            age = time.time() - float(seen.get("heartbeat", time.time()))
            raise UserError(
                f"the store at {url} is in use by another nngp-dist job: {_who(seen)} (last "
                f"heartbeat {age:.0f} s ago). Only one job may write a store at a time: wait "
                "for it to finish (nngp-dist status shows its progress) or stop it (nngp-dist "
                "cancel for a detached job), then run this again. A lock whose holder has died "
                f"is taken over by the next job (after {STALE:.0f} s without a heartbeat, or at "
                "once on the holder's own host)."
            )
        print(f"nngp-dist: taking over the lock of {url}: {reason}", file=sys.stderr)
        if _parse(place.read()) == seen:  # still the stale one (not a newer holder's)
            place.remove()
    raise UserError(f"could not take the lock of {url}: other jobs kept taking it; try again")


def _heartbeat(url: str, held: _Held, every: float) -> None:
    """Renew the lease every ``every`` seconds while it is ours; say so if it was taken."""
    while not held.stop.wait(every):
        try:
            seen = _parse(held.place.read())
            if not seen or seen.get("owner") != held.owner:
                held.lost = True
                who = _who(seen) if seen else "nobody"
                print(
                    f"nngp-dist: lost the lock of {url} (now held by {who}); this job's writes "
                    "may now collide with another's",
                    file=sys.stderr,
                )
                return
            held.lease["heartbeat"] = time.time()
            held.place.replace(json.dumps(held.lease).encode())
        except Exception as e:  # a passing network error: try again at the next beat
            print(f"nngp-dist: could not renew the lock of {url}: {e}", file=sys.stderr)


@contextlib.contextmanager
def store_lock(url: str, command: str, *, heartbeat: float = HEARTBEAT) -> Iterator[dict]:
    """Hold the store's lock for the ``with`` block (see the module's description); yields the
    lease. Re-entrant within a process. :class:`UserError` if another live job holds it."""
    url = normalize_url(url)
    with _GUARD:
        held = _HELD.get(url)
        if held is not None:
            held.count += 1
        else:
            held = _acquire(url, command)
            held.thread = threading.Thread(
                target=_heartbeat, args=(url, held, heartbeat), daemon=True, name="nngp-dist-lock"
            )
            held.thread.start()
            _HELD[url] = held
    try:
        yield held.lease
    finally:
        with _GUARD:
            held.count -= 1
            if held.count == 0:
                del _HELD[url]
                _release(held)


def _release(held: _Held) -> None:
    held.stop.set()
    if held.thread is not None:
        held.thread.join(timeout=30)
    with contextlib.suppress(Exception):
        seen = _parse(held.place.read())
        if seen and seen.get("owner") == held.owner:
            held.place.remove()


def check_free(url: str) -> None:
    """:class:`UserError` if a live job holds the store's lock (for checks that write nothing)."""
    url = normalize_url(url)
    with _GUARD:
        if url in _HELD:
            return
    place = _place(url)
    seen = _parse(place.read())
    if seen is not None and _stale(seen, place) is None:
        raise UserError(
            f"the store at {url} is in use by another nngp-dist job: {_who(seen)}; wait for it "
            "to finish or stop it first"
        )
