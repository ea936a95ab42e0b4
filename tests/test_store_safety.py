"""Nothing lost, nothing silently wrong: one writer per store (the lock), a creation killed at
any point redone, and a run stopped in its predict stage resumed without solving again."""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import zarr

import nngp_dist
from nngp_dist import KernelStore, UserError, jobs, lock
from nngp_dist.layout import CHOL, CREATING, LOCK, MEAN, PREDICT, record
from nngp_dist.verify import verify

from .test_checksums import RUN  # the same small end-to-end run

SMALL = [
    "--dataset",
    "demo",
    "--train-size",
    "300",
    "--test-size",
    "50",
    "--depth",
    "2",
    "--weight-var",
    "1.6",
    "--bias-var",
    "0.2",
    "--noise",
    "1e-3",
    "--workers",
    "1",
    "--quiet",
]


def cli(*args):
    return subprocess.Popen(
        [sys.executable, "-m", "nngp_dist.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def accuracy(stdout):
    line = next(line for line in stdout.splitlines() if line.startswith("accuracy:"))
    return float(line.split()[1])


def test_two_runs_started_together_one_writes_the_other_is_refused(tmp_path):
    store = str(tmp_path / "k.zarr")
    procs = [cli("run", "--store", store, *SMALL) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], outs
    loser = outs[[p.returncode for p in procs].index(2)][1]
    assert "in use by another nngp-dist job" in loser and "'run', pid " in loser, loser
    assert socket.gethostname() in loser and "Traceback" not in loser
    winner = outs[[p.returncode for p in procs].index(0)][0]
    assert not os.path.exists(os.path.join(store, LOCK))  # released
    assert KernelStore.open(store).status()["stage"] == "done"
    again = cli("run", "--store", store, *SMALL)
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    assert accuracy(out) == accuracy(winner)


def _lease(**fields):
    return {
        "owner": "someone",
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": lock.process_start(os.getpid()),
        "command": "run",
        "since": "2026-01-01T00:00:00+00:00",
        "heartbeat": time.time(),
        **fields,
    }


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


KERNEL = {"dataset": "demo", "train_size": 60, "test_size": 10, "depth": 2, "progress": False}


@pytest.mark.parametrize(
    "lease,why",
    [
        ({"pid": None, "started": None}, "no longer runs"),  # pid filled in: a dead one
        ({"started": 12345.0}, "no longer runs"),  # this pid, but another process's start
        ({"host": "elsewhere", "heartbeat": time.time() - 300}, "has not renewed it"),
    ],
)
def test_a_stale_lock_is_taken_over(tmp_path, capsys, lease, why):
    store = tmp_path / "k.zarr"
    store.mkdir()
    if lease.get("pid", 0) is None:
        lease = {**lease, "pid": _dead_pid()}
    (store / LOCK).write_text(json.dumps(_lease(**lease)))
    out = jobs.kernel(str(store), scheduler="synchronous", **KERNEL)
    assert out["action"] == "create" and out["tiles_computed"] == out["tiles_total"]
    err = capsys.readouterr().err
    assert "taking over the lock" in err and why in err
    assert not (store / LOCK).exists()


def test_a_live_lock_is_refused_with_its_holder_named(tmp_path):
    store = tmp_path / "k.zarr"
    jobs.kernel(str(store), scheduler="synchronous", **KERNEL)
    (store / LOCK).write_text(json.dumps(_lease(host="node7", pid=4242, command="solve")))
    for call in (
        lambda: jobs.kernel(str(store), scheduler="synchronous", **KERNEL),
        lambda: jobs.solve(str(store), noise=1e-3, workers=1, progress=False),
        lambda: jobs.predict(str(store), workers=1, progress=False),
        lambda: jobs.check_run(str(store), **KERNEL),
        lambda: verify(str(store), repair=True),
    ):
        with pytest.raises(UserError, match=r"in use by another nngp-dist job: 'solve', pid 4242"):
            call()
    assert json.loads((store / LOCK).read_text())["pid"] == 4242  # left to its holder
    assert KernelStore.open(str(store)).status()["stage"] == "kernel-done"  # readers need none
    assert verify(str(store))["problems"] == []  # verify without --repair only reads


def test_the_lock_is_reentrant_and_its_heartbeat_renews_it(tmp_path):
    url = str(tmp_path / "k.zarr")
    with lock.store_lock(url, "run", heartbeat=0.2) as lease:
        first = lock.holder(url)
        assert first["owner"] == lease["owner"] and first["pid"] == os.getpid()
        assert first["command"] == "run" and first["host"] == socket.gethostname()
        with lock.store_lock(url, "kernel"):  # nested: the same lease, not a deadlock
            assert lock.holder(url)["owner"] == lease["owner"]
        time.sleep(1.0)
        renewed = lock.holder(url)
        assert renewed["owner"] == lease["owner"] and renewed["heartbeat"] > first["heartbeat"]
    assert lock.holder(url) is None
    assert not os.path.exists(url)  # taken on a store never created: no folder left


def test_an_fsspec_store_is_locked_too():
    url = "memory://nngp-dist-lock-test/k.zarr"
    with lock.store_lock(url, "run"):
        assert lock.holder(url)["pid"] == os.getpid()
    assert lock.holder(url) is None
    other = lock._Objects(url)
    assert other.create(json.dumps(_lease(host="node7")).encode())
    assert not lock._Objects(url).create(b"{}")  # create-exclusive
    with pytest.raises(UserError, match="node7"):
        with lock.store_lock(url, "kernel"):
            pass
    other.remove()


def test_a_creation_killed_before_its_identity_was_written_is_redone(tmp_path):
    """The window of KernelStore.create: a group with no attributes yet (and the marker
    written before it). A rerun must recreate the store, not refuse it as foreign."""
    store = tmp_path / "k.zarr"
    zarr.open_group(str(store), mode="w", zarr_format=3)
    (store / CREATING).write_text("2026-01-01T00:00:00+00:00")
    with pytest.raises(UserError, match="never completely created"):
        KernelStore.open(str(store))
    out = jobs.kernel(str(store), scheduler="synchronous", **KERNEL)
    assert out["action"] == "create" and out["tiles_computed"] == out["tiles_total"]
    assert not (store / CREATING).exists()
    assert KernelStore.open(str(store)).status()["stage"] == "kernel-done"
    # killed while the old contents were being deleted: no zarr.json, debris, the marker
    (store / "zarr.json").unlink()
    (store / CREATING).write_text("2026-01-01T00:00:00+00:00")
    assert KernelStore.check(str(store), {}) == "create"


def _chunk_times(store, name):
    folder = store / name
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_a_run_stopped_in_predict_resumes_there(tmp_path, client):
    store = tmp_path / "k.zarr"
    first = jobs.run(str(store), client=client, **RUN)
    ks = KernelStore.open(str(store))
    solved, stages = ks.meta["solve"], ks.meta["stages"]["solve"]
    mean = ks.read(MEAN)
    chol = _chunk_times(store, CHOL)
    blocks = ks.read(record(PREDICT))
    assert len(blocks) >= 2 and len(chol) > 0
    # As if killed in the predict stage: one block's record gone, its rows half-written.
    g = zarr.open_group(str(store), mode="r+")
    g[record(PREDICT)][1] = np.nan
    g[MEAN][-1] = 7.0
    g.attrs["nngp_dist"] = {**g.attrs["nngp_dist"], "predict": None}
    assert KernelStore.open(str(store)).status()["stage"] == "predict"
    again = jobs.run(str(store), client=client, **RUN)
    ks = KernelStore.open(str(store))
    assert ks.meta["solve"] == solved and ks.meta["stages"]["solve"] == stages  # not solved again
    assert _chunk_times(store, CHOL) == chol  # the factor untouched
    done = ks.read(record(PREDICT))
    assert done[0] == blocks[0] and not np.isnan(done).any()  # only the missing block redone
    np.testing.assert_array_equal(ks.read(MEAN), mean)  # bitwise
    assert again["accuracy"] == first["accuracy"] and ks.status()["stage"] == "done"
    # Other solve options solve again (and forget the predictions of the old solution).
    other = jobs.run(str(store), client=client, **{**RUN, "noise": 1e-2})
    assert KernelStore.open(str(store)).meta["solve"]["noise_requested"] == 1e-2
    assert other["noise"] == 1e-2
    # An explicit solve always solves again.
    jobs.solve(str(store), client=client, noise=1e-2, progress=False)
    assert KernelStore.open(str(store)).meta["solve"]["seconds"] != solved["seconds"]


def test_status_and_open_store_read_a_locked_store(tmp_path):
    store = tmp_path / "k.zarr"
    jobs.kernel(str(store), scheduler="synchronous", **KERNEL)
    with lock.store_lock(str(store), "run"):
        assert nngp_dist.open_store(str(store)).sizes["train"] == 60
        assert jobs.status(str(store))["stage"] == "kernel-done"


def test_a_sweep_folder_and_an_estimator_store_have_one_writer(tmp_path):
    """A sweep's --out folder and an estimator's store are locked like a kernel store: a live
    holder elsewhere is refused by name, and nothing is written."""
    from nngp_dist.estimator import NNGPRegressor
    from nngp_dist.sweep import POINTS_FILE, sweep

    out = tmp_path / "sw"
    out.mkdir()
    (out / LOCK).write_text(json.dumps(_lease(host="node7", pid=4242, command="sweep")))
    grid = {"depths": "1", "weight_vars": "1.0", "bias_vars": "0.1", "noises": "1e-2"}
    with pytest.raises(UserError, match=r"in use by another nngp-dist job: 'sweep', pid 4242"):
        sweep(str(out), train_size=100, validation_size=50, progress=False, **grid)
    assert sorted(p.name for p in out.iterdir()) == [LOCK]
    assert POINTS_FILE not in os.listdir(out)
    store = tmp_path / "est.zarr"
    store.mkdir()
    (store / LOCK).write_text(json.dumps(_lease(host="node7", pid=4243, command="fit")))
    x = np.random.default_rng(0).normal(size=(20, 3))
    with pytest.raises(UserError, match=r"'fit', pid 4243 on node7"):
        NNGPRegressor(store=str(store), scheduler="synchronous").fit(x, x[:, 0])
    assert sorted(p.name for p in store.iterdir()) == [LOCK]


MARKER_MODULE = """
import os

import numpy as np

with open(os.environ["NNGP_DIST_TEST_MARKER"], "a") as f:
    f.write("imported\\n")


def phi(x):
    return np.tanh(x)
"""


def test_code_never_comes_from_a_store_without_the_opt_in(tmp_path, monkeypatch):
    """A store whose activation names a module: opening it, its status, open_store and the
    spec's dict import nothing; building its spec or computing with it is a UserError naming
    trust_code=True, and only with that opt-in is the module imported."""
    import importlib

    from nngp_dist.compute import compute_kernel

    marker = tmp_path / "imports.log"
    (tmp_path / "recorder_act.py").write_text(MARKER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("NNGP_DIST_TEST_MARKER", str(marker))
    store = str(tmp_path / "k.zarr")
    jobs.kernel(str(store), scheduler="synchronous", **{**KERNEL, "activation": "recorder_act:phi"})
    assert marker.read_text() == "imported\n"  # the caller named it: imported for the kernel
    monkeypatch.delitem(sys.modules, "recorder_act")
    marker.unlink()
    importlib.invalidate_caches()

    ks = KernelStore.open(store)
    assert ks.meta["spec"]["activation"]["function"] == "recorder_act:phi"  # shown
    assert jobs.status(store)["spec"]["activation"]["name"] == "custom"
    ds = nngp_dist.open_store(store)
    with pytest.raises(UserError, match=r"'recorder_act:phi'.*trust_code=True"):
        _ = ks.spec
    with pytest.raises(UserError, match="trust=True to Spec.from_dict"):
        nngp_dist.Spec.from_dict(ds.attrs["nngp_dist"]["spec"])
    g = zarr.open_group(store, mode="r+")
    g["tiles/k_test_diag"][...] = np.nan  # something left to compute
    with pytest.raises(UserError, match="trust_code=True"):
        compute_kernel(KernelStore.open(store, "r+"), progress=False)
    assert not marker.exists() and "recorder_act" not in sys.modules

    trusted = KernelStore.open(store, "r+", trust_code=True)
    assert trusted.spec.activation.spec["function"] == "recorder_act:phi"
    assert marker.read_text() == "imported\n"
    assert compute_kernel(trusted, progress=False)["tiles_computed"] == 1
