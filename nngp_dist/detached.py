"""Detached jobs: a whole run (kernel, solve, predict) that outlives the client that started it.

``submit`` starts a *driver*: a separate ``python -m nngp_dist.detached`` process, launched by a
task on one of the cluster's workers, in its own session, which connects to the same scheduler
and runs :func:`nngp_dist.jobs.run`. The submitting client returns at once with a job id; the
driver keeps going after it exits (and after the task that launched it has finished). Its state
(``running``, ``done``, ``failed`` with the error, ``cancelled``) lives in a Dask ``Variable``
on the scheduler, named after the store, and its output in ``<store>.job.log`` for a local
store (else in the worker's temporary directory).

``cancel`` sends SIGTERM to the driver's process group on its worker (SIGKILL after 10 s): its
client disconnects, the scheduler forgets its queued tasks, and the tasks running finish their
tiles (each tile and its record are written before the next), so the store stays consistent
and a re-submission resumes it. ``nngp-dist status --store`` follows a job's progress.

The record keeps the driver's pid with its start time and job id, and a task on the driver's
worker checks them whenever a running job is looked at (``status --scheduler``, ``submit``,
``cancel``): a driver that died without reporting (SIGKILL, out of memory) shows as
``failed``, does not block a new submission, and ``cancel`` signals a pid only while it is
still that driver (same start time, the job's id on its command line), never a process that
was given the pid later. The driver holds the store's lock (:mod:`nngp_dist.lock`) like any
other writer.

Because the driver runs on a worker, the dataset and the store must be reachable from the
workers (shared storage, or an fsspec URL such as ``s3://``), as they must be for the tiles.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any

from .errors import UserError
from .lock import process_alive, process_start
from .storage import normalize_url

__all__ = ["cancel", "job_info", "submit"]

STOP_GRACE = 10.0  # seconds between SIGTERM and SIGKILL


def _variable_name(store: str) -> str:
    return f"nngp-dist-job:{normalize_url(store)}"


def _log_path(store: str) -> str:
    url = normalize_url(store)
    if "://" not in url or url.startswith("file://"):
        return url.removeprefix("file://").rstrip("/") + ".job.log"
    return os.path.join(tempfile.gettempdir(), f"nngp-dist-{uuid.uuid4().hex[:8]}.job.log")


def _launch(options: dict, log: str, env: dict) -> dict:
    """Worker task: start the driver process in a session of its own; return where it runs."""
    import threading

    from distributed import get_worker

    worker = get_worker()
    options = {**options, "scheduler": worker.scheduler.address}
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "nngp_dist.detached", json.dumps(options)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, **env},
        )
    started = process_start(proc.pid)
    threading.Thread(target=proc.wait, daemon=True).start()  # reap it when it ends
    return {"pid": proc.pid, "pid_started": started, "worker": worker.address, "log": log}


def _is_driver(pid: int, started: float | None, job: str) -> bool:
    """Whether process ``pid`` of this host is still job ``job``'s driver: it runs, started
    when the driver did, and has the job's id on its command line (never a reused pid)."""
    if not process_alive(pid, started):
        return False
    try:
        import psutil

        proc = psutil.Process(pid)
        for _ in range(20):  # empty for a moment while a process execs: look again
            cmdline = proc.cmdline()
            if cmdline:
                break
            time.sleep(0.1)
        return any(job in part for part in cmdline)
    except ImportError:  # pragma: no cover - psutil comes with distributed
        return True
    except Exception:  # it ended meanwhile, or is not ours to inspect
        return False


def _alive(pid: int, started: float | None, job: str) -> bool:
    """Worker task: :func:`_is_driver` on the driver's host."""
    return _is_driver(pid, started, job)


def _stop(pid: int, grace: float, started: float | None = None, job: str = "") -> str:
    """Worker task: SIGTERM the driver's process group, SIGKILL it after ``grace`` seconds;
    each signal only while ``pid`` is still the driver (see :func:`_is_driver`)."""
    if job and not _is_driver(pid, started, job):
        return "not running (the driver had already ended)"
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return "not running"
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return "stopped"
        if job and not _is_driver(pid, started, job):
            return "stopped"  # the driver is gone; its group's pid may be another's now
        time.sleep(0.1)
    os.killpg(pid, signal.SIGKILL)
    return "killed"


def _check_driver(c: Any, var: Any, rec: dict | None) -> dict | None:
    """``rec`` with a running job whose driver has died marked ``failed`` (and stored so);
    unchanged if its driver lives, or cannot be checked (its worker has left the cluster)."""
    if not rec or rec.get("state") not in ("running", "starting") or "pid" not in rec:
        return rec
    if rec.get("worker") not in c.scheduler_info()["workers"]:
        return rec
    alive = c.submit(
        _alive,
        rec["pid"],
        rec.get("pid_started"),
        rec["job"],
        workers=[rec["worker"]],
        allow_other_workers=False,
        pure=False,
    ).result()
    if alive:
        return rec
    current = _get(var) or rec
    if current.get("job") != rec["job"] or current.get("state") not in ("running", "starting"):
        return current  # it reported its end meanwhile
    current = {
        **current,
        "state": "failed",
        "error": f"the driver (pid {rec['pid']}) died without reporting (killed?)",
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    var.set(current)
    return current


def _tls_env() -> dict:
    """The client's TLS settings, for the driver to connect the same way."""
    import dask.config

    keys = {
        "DASK_DISTRIBUTED__COMM__TLS__CA_FILE": "distributed.comm.tls.ca-file",
        "DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT": "distributed.comm.tls.client.cert",
        "DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY": "distributed.comm.tls.client.key",
        "DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION": "distributed.comm.require-encryption",
    }
    out = {}
    for env, key in keys.items():
        value = dask.config.get(key, None)
        if value not in (None, False):
            out[env] = str(value)
    return out


def submit(store: str, *, scheduler: str | None, **run_options: Any) -> dict:
    """Start ``run`` on the cluster at ``scheduler`` as a detached job; return its record.

    Options are checked here first (the same checks as ``run``: spec, dataset, store, noise,
    ...), so bad input fails at once with nothing started. A job already running on this
    store is refused (cancel it first).
    """
    from distributed import Variable

    from . import jobs
    from .cluster import connect, scheduler_address

    if not scheduler_address(scheduler):
        raise UserError(
            "--detach needs a running cluster (--scheduler ADDRESS or DASK_SCHEDULER_ADDRESS): "
            "an embedded cluster would stop with this command"
        )
    store = normalize_url(store)
    jobs.check_run(store, **run_options)
    options = {"store": store, **run_options, "progress": False}
    with connect(scheduler) as c:
        var = Variable(_variable_name(store), client=c)
        old = _check_driver(c, var, _get(var))
        if old and old.get("state") == "running":
            raise UserError(
                f"job {old['job']} is already running on {store} (since {old['submitted']}); "
                f"'nngp-dist cancel --store {store} --scheduler {c.scheduler.address}' stops it"
            )
        job = uuid.uuid4().hex[:12]
        record = {
            "job": job,
            "state": "starting",
            "store": store,
            "submitted": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        var.set(record)
        where = c.submit(
            _launch, {**options, "job": job}, _log_path(store), _tls_env(), pure=False
        ).result()
        current = _get(var) or record
        if current.get("job") == job:  # merge: the driver may have reported already
            current.update(where)
            if current.get("state") == "starting":
                current["state"] = "running"
            var.set(current)
        return {**current, "scheduler": c.scheduler.address}


def _get(var: Any) -> dict | None:
    try:
        return var.get(timeout=2)
    except (TimeoutError, OSError):
        return None


def job_info(store: str, *, scheduler: str | None) -> dict | None:
    """The record of the last job submitted on ``store`` to the cluster at ``scheduler``, or
    None if none was."""
    from distributed import Variable

    from .cluster import connect

    with connect(scheduler) as c:
        var = Variable(_variable_name(store), client=c)
        return _check_driver(c, var, _get(var))


def cancel(store: str, *, scheduler: str | None) -> dict:
    """Stop the running job on ``store``; its finished tiles stay, a re-submission resumes."""
    from distributed import Variable

    from .cluster import connect, scheduler_address

    if not scheduler_address(scheduler):
        raise UserError("cancel needs the cluster the job runs on: --scheduler ADDRESS")
    with connect(scheduler) as c:
        var = Variable(_variable_name(store), client=c)
        rec = _check_driver(c, var, _get(var))
        if rec is None or rec.get("state") not in ("running", "starting") or "pid" not in rec:
            state = rec.get("state") if rec else "none"
            if rec and rec.get("error"):
                state += f": {rec['error']}"
            raise UserError(f"no running job on {normalize_url(store)} (last job: {state})")
        if rec["worker"] not in c.scheduler_info()["workers"]:
            outcome = "its worker has left the cluster (and the driver with it, if on it)"
        else:
            outcome = c.submit(
                _stop,
                rec["pid"],
                STOP_GRACE,
                rec.get("pid_started"),
                rec["job"],
                workers=[rec["worker"]],
                allow_other_workers=False,
                pure=False,
            ).result()
        rec.update(state="cancelled", cancelled=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        var.set(rec)
        return {**rec, "outcome": outcome}


def _driver(argv: list[str]) -> int:
    """The driver process: run the job, report its end in the job's Variable."""
    from distributed import Client, Variable

    from . import jobs

    options = json.loads(argv[0])
    job = options.pop("job")
    store = options.pop("store")
    scheduler = options.pop("scheduler")
    with Client(scheduler, timeout=30) as c:
        var = Variable(_variable_name(store), client=c)

        def report(**fields: Any) -> None:
            rec = _get(var) or {}
            if rec.get("job") == job and rec.get("state") != "cancelled":
                var.set({**rec, **fields})

        report(state="running", pid=os.getpid(), pid_started=process_start(os.getpid()))
        print(f"job {job} (driver pid {os.getpid()}): run on {store} via {scheduler}", flush=True)
        try:
            result = jobs.run(store, client=c, **options)
        except Exception as e:  # reported, then re-raised for the log
            report(
                state="failed",
                error=f"{type(e).__name__}: {e}",
                finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            )
            raise
        report(
            state="done",
            accuracy=result.get("accuracy"),
            finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        )
        print(json.dumps({k: result.get(k) for k in ("accuracy", "mse", "noise")}), flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover - the driver process
    sys.exit(_driver(sys.argv[1:]))
