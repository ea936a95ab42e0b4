"""Real clusters (`dask scheduler` and `dask worker` processes on 127.0.0.1): detached jobs,
cancel and resume, a worker killed mid-job, a scheduler restart, TLS."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import nngp_dist
from nngp_dist import detached

RUN = [
    "--dataset",
    "demo",
    "--depth",
    "2",
    "--weight-var",
    "1.6",
    "--bias-var",
    "0.2",
    "--noise",
    "1e-3",
]


def cli(*args, env=None, timeout=180):
    env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "nngp_dist.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def status(store):
    out = cli("status", "--store", store, "--json")
    return json.loads(out.stdout) if out.returncode == 0 else None


def wait_for(predicate, timeout, what, procs=None):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            logs = procs.logs() if procs else ""
            raise AssertionError(f"timed out waiting for {what}\n{logs}")
        time.sleep(0.3)


def tiles_done(store):
    try:
        return nngp_dist.KernelStore.open(store).status()["tiles_done"]
    except nngp_dist.UserError:  # not created yet
        return 0


def progress(store):
    st = nngp_dist.KernelStore.open(store).status()
    return (
        st["stage"],
        st["tiles_done"],
        str(st.get("factor_tiles")),
        str(st.get("predict_blocks")),
    )


def submit_and_wait_for_ten_tiles(address, store, job, procs):
    assert cli("submit", "--detach", "--scheduler", address, "--store", store, *job).returncode == 0
    wait_for(lambda: tiles_done(store) >= 10, 120, "ten tiles", procs)


def test_detached_job_runs_after_the_client_exits(tmp_path, dask_processes):
    address = dask_processes.start(2)
    store = str(tmp_path / "k.zarr")
    out = cli(
        "submit",
        "--detach",
        "--scheduler",
        address,
        "--store",
        store,
        *RUN,
        "--train-size",
        "400",
        "--test-size",
        "100",
    )
    assert out.returncode == 0, out.stderr
    assert "job " in out.stdout and "nngp-dist cancel" in out.stdout
    wait_for(lambda: (status(store) or {}).get("stage") == "done", 120, "the job", dask_processes)
    st = status(store)
    assert st["predict"]["accuracy"] > 0.5 and st["tiles_done"] == st["tiles_total"]
    info = detached.job_info(store, scheduler=address)
    assert info["state"] == "done" and info["accuracy"] == st["predict"]["accuracy"]
    log = open(store + ".job.log").read()
    assert "accuracy" in log
    shown = cli("status", "--store", store, "--scheduler", address)
    assert shown.returncode == 0 and f"job:     {info['job']} done" in shown.stdout, shown.stdout
    assert (
        json.loads(cli("status", "--store", store, "--scheduler", address, "--json").stdout)["job"][
            "state"
        ]
        == "done"
    )
    # A second detached job while none runs is fine; bad input fails at once, nothing started.
    bad = cli(
        "submit",
        "--detach",
        "--scheduler",
        address,
        "--store",
        store,
        *RUN,
        "--train-size",
        "400",
        "--test-size",
        "100",
        "--noise",
        "-1",
    )
    assert bad.returncode == 2 and "--noise" in bad.stderr
    assert cli("submit", "--detach", "--store", store, *RUN).returncode == 2  # no scheduler


def test_cancel_then_resubmit_resumes(tmp_path, dask_processes):
    address = dask_processes.start(2)
    store = str(tmp_path / "k.zarr")
    job = [*RUN, "--train-size", "2000", "--test-size", "500", "--tile-size", "100"]
    submit_and_wait_for_ten_tiles(address, store, job, dask_processes)
    out = cli("cancel", "--store", store, "--scheduler", address)
    assert out.returncode == 0 and "cancelled" in out.stdout, out.stderr
    time.sleep(2)  # tiles running when it was cancelled finish
    frozen = progress(store)
    time.sleep(3)
    assert progress(store) == frozen and frozen[0] != "done"  # nothing moves any more
    assert detached.job_info(store, scheduler=address)["state"] == "cancelled"
    assert cli("cancel", "--store", store, "--scheduler", address).returncode == 2  # none runs
    assert cli("submit", "--detach", "--scheduler", address, "--store", store, *job).returncode == 0
    wait_for(
        lambda: (status(store) or {}).get("stage") == "done", 240, "the resumed job", dask_processes
    )
    st = status(store)
    if frozen[0] == "kernel":  # cancelled in the kernel stage: only the rest was computed
        assert st["stages"]["kernel"]["tiles"] == st["tiles_total"] - frozen[1]
    check_kernel(store)


def test_a_killed_driver_shows_failed_and_a_resubmission_runs(tmp_path, dask_processes):
    """A driver SIGKILLed (no chance to report) is found dead from its worker's side: status
    says failed, a new submission is accepted (taking over the dead driver's store lock) and
    finishes the job; cancel then has nothing to stop."""
    address = dask_processes.start(2)
    store = str(tmp_path / "k.zarr")
    job = [*RUN, "--train-size", "2000", "--test-size", "500", "--tile-size", "100"]
    submit_and_wait_for_ten_tiles(address, store, job, dask_processes)
    info = detached.job_info(store, scheduler=address)
    assert info["state"] == "running" and info["pid_started"] is not None
    os.kill(info["pid"], signal.SIGKILL)
    wait_for(
        lambda: detached.job_info(store, scheduler=address)["state"] == "failed",
        30,
        "the dead driver to show as failed",
        dask_processes,
    )
    dead = detached.job_info(store, scheduler=address)
    assert dead["job"] == info["job"] and "died" in dead["error"]
    shown = cli("status", "--store", store, "--scheduler", address)
    assert f"job:     {info['job']} failed" in shown.stdout, shown.stdout
    out = cli("cancel", "--store", store, "--scheduler", address)
    assert out.returncode == 2 and "died" in out.stderr
    out = cli("submit", "--detach", "--scheduler", address, "--store", store, *job)
    assert out.returncode == 0, out.stderr
    wait_for(
        lambda: (status(store) or {}).get("stage") == "done", 240, "the new job", dask_processes
    )
    assert detached.job_info(store, scheduler=address)["state"] == "done"
    assert "taking over the lock" in open(store + ".job.log").read()
    check_kernel(store)


def test_cancel_signals_only_the_driver_it_started():
    """A recorded pid whose process is another one now (another start time, or not the job's
    command line) is never signalled; the driver itself is."""
    from nngp_dist.lock import process_start

    job = "job-0123456789ab"
    sleeper = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", job], start_new_session=True
    )
    try:
        import psutil

        for _ in range(100):  # a loaded machine may take a while to exec it
            if job in psutil.Process(sleeper.pid).cmdline():
                break
            time.sleep(0.1)
        started = process_start(sleeper.pid)
        for pid_started, name in ((started + 100, job), (started, "job-another")):
            assert detached._stop(sleeper.pid, 1.0, pid_started, name).startswith("not running")
            assert sleeper.poll() is None  # not signalled
        proc = psutil.Process(sleeper.pid)
        debug = (started, process_start(sleeper.pid), proc.cmdline(), proc.status())
        assert detached._stop(sleeper.pid, 5.0, started, job) in ("stopped", "killed"), debug
        assert sleeper.wait(timeout=10) == -signal.SIGTERM
    finally:
        if sleeper.poll() is None:
            sleeper.kill()


def check_kernel(store):
    ds = nngp_dist.open_store(store)
    spec = nngp_dist.Spec.from_dict(ds.attrs["nngp_dist"]["spec"])
    x, xt = ds.x_train.values, ds.x_test.values
    np.testing.assert_allclose(ds.k_test_train.values, spec.cross(xt, x), rtol=1e-12)
    np.testing.assert_allclose(
        ds.k_train_train.values[::7, ::5], spec.cross(x[::7], x[::5]), rtol=1e-12
    )


def test_killed_worker_costs_only_its_tiles(tmp_path, dask_processes):
    address = dask_processes.start(2)
    store = str(tmp_path / "k.zarr")
    job = [*RUN, "--train-size", "1500", "--test-size", "300", "--tile-size", "100", "--quiet"]
    run = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nngp_dist.cli",
            "run",
            "--store",
            store,
            "--scheduler",
            address,
            "--json",
            store + ".json",
            *job,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: tiles_done(store) >= 10, 120, "ten tiles", dask_processes)
        dask_processes.kill_worker(1)  # SIGKILL, nanny and worker
        out, err = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 0, err
    check_kernel(store)
    # The same result as a clean run of the same job on an embedded cluster.
    clean = str(tmp_path / "clean.zarr")
    assert cli("run", "--store", clean, "--workers", "1", *job).returncode == 0
    a, b = nngp_dist.open_store(store), nngp_dist.open_store(clean)
    np.testing.assert_allclose(a["mean"].values, b["mean"].values, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(a["variance"].values, b["variance"].values, rtol=1e-7, atol=1e-12)


def test_scheduler_restart_then_resubmission_resumes(tmp_path, dask_processes):
    address = dask_processes.start(2)
    store = str(tmp_path / "k.zarr")
    job = [*RUN, "--train-size", "1500", "--test-size", "200", "--tile-size", "100"]
    submit_and_wait_for_ten_tiles(address, store, job, dask_processes)
    dask_processes.stop()  # the scheduler and its workers go; the driver loses its cluster
    done = tiles_done(store)
    address = dask_processes.start(2)
    out = cli("submit", "--scheduler", address, "--store", store, *job, "--quiet")
    assert out.returncode == 0, out.stderr
    st = status(store)
    assert st["stage"] == "done" and st["stages"]["kernel"]["tiles"] <= st["tiles_total"] - done


def _certificates(folder):
    """A CA and one certificate for 127.0.0.1 signed by it, made with the openssl CLI."""

    def ssl(*args):
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    ssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "1",
        "-subj",
        "/CN=nngp-dist test CA",
    )
    ssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "node.key",
        "-out",
        "node.csr",
        "-subj",
        "/CN=127.0.0.1",
    )
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    ssl(
        "x509",
        "-req",
        "-in",
        "node.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "node.pem",
        "-days",
        "1",
        "-extfile",
        "san.ext",
    )
    return [str(folder / n) for n in ("ca.pem", "node.pem", "node.key")]


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_tls_cluster(tmp_path, dask_processes):
    ca, cert, key = _certificates(tmp_path)
    tls = ["--tls-ca-file", ca, "--tls-cert", cert, "--tls-key", key]
    address = dask_processes.start(2, scheduler_args=["--protocol", "tls", *tls], worker_args=tls)
    assert address.startswith("tls://")
    store = str(tmp_path / "k.zarr")
    job = ["--store", store, *RUN, "--train-size", "300", "--test-size", "50", "--quiet"]
    plain = cli("run", "--scheduler", address, *job, env={"DASK_NNGP_DIST__CONNECT_TIMEOUT": "3s"})
    assert plain.returncode == 2 and "speaks TLS" in plain.stderr
    assert not os.path.exists(store)
    out = cli("run", "--scheduler", address, *job, *tls)
    assert out.returncode == 0, out.stderr + dask_processes.logs()
    assert status(store)["stage"] == "done"
    half = cli("run", "--scheduler", address, *job, "--tls-ca-file", ca)
    assert half.returncode == 2 and "all three" in half.stderr
