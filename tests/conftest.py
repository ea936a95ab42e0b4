import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from distributed import Client, LocalCluster

from nngp_dist import backend


@pytest.fixture(params=["numpy", pytest.param("cupy", marks=pytest.mark.gpu)])
def xp(request):
    """The array namespaces under test: CuPy only where a GPU is present."""
    if request.param == "cupy":
        if not backend.cupy_available():
            pytest.skip("CuPy with a GPU is not available")
        import cupy

        return cupy
    return np


@pytest.fixture
def small_npz(tmp_path):
    """A small random dataset as an npz file (float inputs used as given)."""
    rng = np.random.default_rng(0)
    path = tmp_path / "small.npz"
    np.savez(
        path,
        x_train=rng.random((37, 5, 3)),
        y_train=rng.integers(0, 3, 37),
        x_test=rng.random((11, 5, 3)),
        y_test=rng.integers(0, 3, 11),
    )
    return path


@pytest.fixture(scope="module")
def client():
    """Two in-process single-threaded workers, shared by a module's tests."""
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None
        ) as cluster,
        Client(cluster) as c,
    ):
        yield c


class DaskProcesses:
    """Real ``dask scheduler`` and ``dask worker`` processes on 127.0.0.1, as on a cluster.

    The CLIs run as ``python -m distributed.cli.dask_*`` under this interpreter (the ``dask``
    console script may belong to another environment). The scheduler takes a free port and
    writes its address to a scheduler file, which the workers read; each process runs in a
    session of its own, so that stopping or killing it also ends a worker's child process.
    ``start`` may be called again after ``stop`` (a scheduler restart); each start's logs are
    kept, and ``logs()`` gives their ends for failure messages.
    """

    def __init__(self, folder):
        self.folder = folder
        self.procs = []  # (process, log file): the scheduler first, then the workers
        self.address = None
        self.dashboard_port = None
        self.starts = 0

    def _spawn(self, name, args):
        log = open(self.folder / f"{self.starts}-{name}.log", "wb")  # closed in stop()
        p = subprocess.Popen(
            [sys.executable, "-m", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs.append((p, log))
        return p

    def logs(self):
        return "\n".join(
            f"--- {f.name}\n" + f.read_text(errors="replace")[-2000:]
            for f in sorted(self.folder.glob("*.log"))
        )

    def start(self, n_workers=2, *, scheduler_args=(), worker_args=(), timeout=60):
        """Start the scheduler and ``n_workers`` workers; return the scheduler's address.

        ``scheduler_args`` and ``worker_args`` are added to the command lines (e.g. TLS
        options: with ``--tls-ca-file``, ``--tls-cert`` and ``--tls-key`` among the scheduler's,
        the check that the workers arrived connects with the same certificate)."""
        if self.procs:
            raise RuntimeError("already started; stop() first")
        self.starts += 1
        file = self.folder / "scheduler.json"
        file.unlink(missing_ok=True)  # a previous start's address
        sched = self._spawn(
            "scheduler",
            [
                "distributed.cli.dask_scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--dashboard-address",
                "127.0.0.1:0",
                "--scheduler-file",
                str(file),
                *scheduler_args,
            ],
        )
        deadline = time.monotonic() + timeout
        info = None
        while info is None:
            if sched.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dask scheduler did not start\n{self.logs()}")
            time.sleep(0.05)
            try:
                info = json.loads(file.read_text())
            except (FileNotFoundError, json.JSONDecodeError):  # not yet (completely) written
                pass
        self.address = info["address"]
        self.dashboard_port = info.get("services", {}).get("dashboard")
        for i in range(n_workers):
            self._spawn(
                f"worker-{i}",
                [
                    "distributed.cli.dask_worker",
                    "--scheduler-file",
                    str(file),
                    "--host",
                    "127.0.0.1",
                    "--nthreads",
                    "1",
                    "--dashboard-address",
                    "127.0.0.1:0",
                    *worker_args,
                ],
            )
        with Client(self.address, timeout=timeout, security=_security(scheduler_args)) as c:
            try:
                c.wait_for_workers(n_workers, timeout=timeout)
            except TimeoutError:
                raise RuntimeError(f"dask workers did not start\n{self.logs()}") from None
        return self.address

    def kill_worker(self, i):
        """SIGKILL worker ``i`` of the current start: its nanny and worker process at once."""
        p, _ = self.procs[1 + i]
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=10)

    def stop(self):
        """Terminate the workers, then the scheduler (a worker whose scheduler went first
        retries for seconds); kill a process that does not exit within 10 s."""
        for group in (self.procs[1:], self.procs[:1]):
            for p, _ in group:
                if p.poll() is None:
                    p.terminate()
            for p, log in group:
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)  # the process and its children, no others
                    p.wait(timeout=10)
                log.close()
        self.procs.clear()


def _security(args):
    """A client ``Security`` from a dask CLI's TLS options, or None without them."""
    args = list(args)
    opts = {
        k: args[args.index(k) + 1]
        for k in ("--tls-ca-file", "--tls-cert", "--tls-key")
        if k in args
    }
    if not opts:
        return None
    from distributed.security import Security

    return Security(
        tls_ca_file=opts.get("--tls-ca-file"),
        tls_client_cert=opts.get("--tls-cert"),
        tls_client_key=opts.get("--tls-key"),
        require_encryption=True,
    )


@pytest.fixture
def dask_processes(tmp_path):
    """A :class:`DaskProcesses`, always stopped after the test; call ``.start(n)`` in it."""
    folder = tmp_path / "dask-processes"
    folder.mkdir()
    procs = DaskProcesses(folder)
    try:
        yield procs
    finally:
        procs.stop()
