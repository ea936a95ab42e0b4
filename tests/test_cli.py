"""The command line: exit codes, messages, and real clusters (LocalCluster, dask processes)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

import nngp_dist
from nngp_dist import Spec
from nngp_dist.cli import main

SMALL = ["--dataset", "demo", "--train-size", "90", "--test-size", "20", "--tile-size", "32"]


def invoke(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_kernel_then_status_json(tmp_path):
    store = str(tmp_path / "k.zarr")
    r = invoke("kernel", "--store", store, *SMALL, "--scheduler", "synchronous", "--quiet")
    assert r.exit_code == 0, r.output
    # 3 row blocks: 6 upper train tiles, 3 test tiles, 3 + 1 diagonal tiles
    assert "13 tiles computed" in r.output
    st = json.loads(invoke("status", "--store", store, "--json").output)
    assert st["tiles_done"] == st["tiles_total"] and st["stage"] == "kernel-done"
    assert "tiles:" in invoke("status", "--store", store).output


@pytest.mark.parametrize(
    "args,message",
    [
        (["--activation", "swish"], "unknown activation"),
        (["--depth", "-2"], "depth"),
        (["--weight-var", "nan"], "weight_var"),
        (["--train-size", "999999"], "has 2000 train"),
        (["--dataset", "nope"], "unknown dataset"),
        (["--tile-size", "0"], "tile-size"),
        (["--workers", "0"], "workers"),
        (["--memory-limit", "lots"], "memory-limit"),
        (["--scheduler", "tcp://127.0.0.1:1"], "cannot reach the Dask scheduler"),
        (["--scheduler", "garbage"], "cannot reach the Dask scheduler"),
        (["--activation", "os:system"], "cannot be evaluated"),
        (["--activation", "leaky_relu:abc"], "leaky_relu needs a number"),
        (["--device", "gpu"], "CuPy"),
        (
            ["--standardize", "--weight-var", "1e30", "--dtype", "float32", "--depth", "1"],
            "not finite in float32",
        ),
    ],
)
def test_bad_input_exits_2_with_a_message_and_writes_nothing(tmp_path, args, message, monkeypatch):
    monkeypatch.setenv("DASK_NNGP_DIST__CONNECT_TIMEOUT", "2s")
    import dask.config

    dask.config.refresh()
    store = tmp_path / "k.zarr"
    r = CliRunner().invoke(main, ["kernel", "--store", str(store), *SMALL, "--quiet", *args])
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output
    assert not store.exists()


def test_status_of_missing_store(tmp_path):
    r = CliRunner().invoke(main, ["status", "--store", str(tmp_path / "none.zarr")])
    assert r.exit_code == 2 and "no kernel store" in r.output


def test_embedded_local_cluster(tmp_path):
    store = str(tmp_path / "k.zarr")
    r = invoke(
        "kernel",
        "--store",
        store,
        *SMALL,
        "--workers",
        "2",
        "--memory-limit",
        "1GB",
        "--kernel",
        "ntk",
        "--quiet",
    )
    assert r.exit_code == 0, r.output
    check_store(store, kernel="ntk")


def check_store(store, **spec):
    ds = nngp_dist.open_store(store)
    s = Spec(**{"depth": 3, **spec})
    x, xt = ds.x_train.values, ds.x_test.values
    np.testing.assert_allclose(ds.k_test_train.values, s.cross(xt, x), rtol=1e-12)
    k = ds.k_train_train.values
    off = ~np.eye(len(x), dtype=bool)
    np.testing.assert_allclose(k[off], s.cross(x, x)[off], rtol=1e-12)


def test_real_scheduler_and_worker_processes(tmp_path, dask_processes):
    """`dask scheduler` + two `dask worker` processes on 127.0.0.1, driven by the CLI."""
    address = dask_processes.start(2)
    store = str(tmp_path / "k.zarr")
    out = subprocess.run(
        [sys.executable, "-m", "nngp_dist.cli", "kernel", "--store", store, *SMALL, "--quiet"],
        env={**os.environ, "DASK_SCHEDULER_ADDRESS": address},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    check_store(store)


def test_store_paths_that_cannot_be_stores(tmp_path):
    (tmp_path / "afile").write_text("x")
    r = CliRunner().invoke(main, ["kernel", "--store", str(tmp_path / "afile" / "k.zarr"), *SMALL])
    assert r.exit_code == 2 and "is a file" in r.output
    r = CliRunner().invoke(main, ["status", "--store", "nosuchfs://bucket/k.zarr"])
    assert r.exit_code == 2 and "error:" in r.output and "Traceback" not in r.output


def test_bad_config_value(monkeypatch, tmp_path):
    import dask.config

    monkeypatch.setenv("DASK_NNGP_DIST__TILE_SIZE", "abc")
    dask.config.refresh()
    try:
        r = CliRunner().invoke(main, ["kernel", "--store", str(tmp_path / "k.zarr"), "--quiet"])
    finally:
        monkeypatch.delenv("DASK_NNGP_DIST__TILE_SIZE")
        dask.config.refresh()
    assert r.exit_code == 2 and "tile-size must be an integer" in r.output


def test_cg_preconditioner_option(tmp_path):
    store = str(tmp_path / "k.zarr")
    r = invoke(
        "run",
        "--store",
        store,
        *SMALL,
        "--method",
        "cg",
        "--preconditioner",
        "block-jacobi",
        "--noise",
        "1e-2",
        "--workers",
        "1",
        "--quiet",
    )
    assert r.exit_code == 0, r.output
    solved = nngp_dist.KernelStore.open(store).meta["solve"]
    assert solved["method"] == "cg" and "blockjacobi" in json.dumps(solved).replace("-", "")
    bad = CliRunner().invoke(main, ["solve", "--store", store, "--preconditioner", "ilu"])
    assert bad.exit_code == 2 and "ilu" in bad.output


# --- bad input refused up front: exit 2, a message, nothing written ---------------------------


def _npz(tmp_path, **over):
    rng = np.random.default_rng(7)
    arrays = {
        "x_train": rng.random((300, 6)),
        "y_train": np.arange(300) % 3,
        "x_test": rng.random((20, 6)),
        "y_test": np.arange(20) % 3,
        **over,
    }
    np.savez(tmp_path / "d.npz", **arrays)
    return f"npz:{tmp_path / 'd.npz'}"


def _refused(tmp_path, args, message, command="kernel"):
    store = tmp_path / "k.zarr"
    r = CliRunner().invoke(main, [command, "--store", str(store), "--quiet", *args])
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output, r.output
    assert not store.exists()
    return r.output


@pytest.mark.parametrize("command", ["kernel", "run"])
def test_labels_of_shape_n_by_1_are_refused(tmp_path, command):
    data = _npz(tmp_path, y_train=(np.arange(300) % 3)[:, None], y_test=np.zeros((20, 1), int))
    _refused(tmp_path, ["--dataset", data, "--tile-size", "100"], "shape (300,)", command)


@pytest.mark.parametrize(
    "labels,message",
    [
        (np.array([0, 1, 2, 3] * 5), "label 3 (test example 3)"),
        (np.array([0, -1] * 10), "negative label -1"),
        (np.array([0, 1] * 9 + [10**9, 0]), "training labels are 0..2"),
    ],
)
def test_test_labels_outside_the_training_classes_are_refused(tmp_path, labels, message):
    _refused(tmp_path, ["--dataset", _npz(tmp_path, y_test=labels)], message)


def test_huge_or_uint64_labels_are_refused_before_the_kernel(tmp_path):
    y = np.arange(300) % 3
    y[7] = 10**9
    _refused(tmp_path, ["--dataset", _npz(tmp_path, y_train=y)], "1000000001 classes")
    y = (np.arange(300) % 3).astype(np.uint64)
    y[7] = 2**63 + 5
    _refused(tmp_path, ["--dataset", _npz(tmp_path, y_train=y)], "far too large")


def test_a_row_that_would_overflow_the_kernel_is_named(tmp_path):
    x = np.random.default_rng(8).random((300, 6))
    x[250, 2] = 1e160
    _refused(tmp_path, ["--dataset", _npz(tmp_path, x_train=x)], "row 250 of x_train")


def test_truncated_npz_is_refused_naming_the_file(tmp_path):
    data = _npz(tmp_path)
    path = tmp_path / "d.npz"
    path.write_bytes(path.read_bytes()[:3000])
    _refused(tmp_path, ["--dataset", data], str(path))


@pytest.mark.parametrize(
    "env,value,message",
    [
        ("DASK_NNGP_DIST__TASKS_PER_THREAD", "abc", "tasks-per-thread must be an integer"),
        ("DASK_NNGP_DIST__CONNECT_TIMEOUT", "abc", "connect-timeout must be a time"),
        ("DASK_NNGP_DIST__DTYPE", "float16", "dtype must be float64 or float32"),
        ("DASK_NNGP_DIST__MAX_NOISE", "-1", "max-noise must be a positive"),
    ],
)
def test_bad_config_values_are_refused_before_an_existing_store_changes(
    tmp_path, monkeypatch, env, value, message
):
    import dask.config

    store = tmp_path / "k.zarr"
    args = ["--store", str(store), *SMALL, "--scheduler", "synchronous", "--quiet"]
    assert invoke("kernel", *args).exit_code == 0
    before = sorted((p, p.stat().st_mtime_ns) for p in store.rglob("*"))
    monkeypatch.setenv(env, value)
    dask.config.refresh()
    try:
        for command in (["kernel", *args, "--overwrite"], ["solve", *args[:2]]):
            r = CliRunner().invoke(main, command)
            assert r.exit_code == 2, r.output
            assert message in r.output and env in r.output and "Traceback" not in r.output
    finally:
        monkeypatch.delenv(env)
        dask.config.refresh()
    assert sorted((p, p.stat().st_mtime_ns) for p in store.rglob("*")) == before


@pytest.fixture
def restore_dask_config():
    """Put dask's global configuration back after a CLI call that sets TLS in it (as a CLI
    process should): ``dask.config.set`` binds the global dictionary as a default argument, so
    it must be restored in place, not replaced."""
    import copy

    import dask.config

    saved = copy.deepcopy(dask.config.config)
    yield
    dask.config.config.clear()
    dask.config.config.update(saved)


def test_tls_options_with_a_tcp_scheduler_are_refused(tmp_path, restore_dask_config):
    files = []
    for name in ("ca.pem", "cert.pem", "key.pem"):
        (tmp_path / name).write_text("not a real certificate")
        files.append(str(tmp_path / name))
    tls = ["--tls-ca-file", files[0], "--tls-cert", files[1], "--tls-key", files[2]]
    args = [*SMALL, "--scheduler", "tcp://127.0.0.1:1", *tls]
    _refused(tmp_path, args, "is not a TLS one")


def test_tiny_tiles_are_refused_unless_forced(tmp_path):
    from nngp_dist import jobs

    out = _refused(tmp_path, [*SMALL, "--tile-size", "1"], "--tile-size 1 is below 16")
    assert "--force" in out
    store = str(tmp_path / "k.zarr")
    checks = jobs.check_run(
        store, dataset="demo", train_size=90, test_size=20, tile_size=1, force=True
    )
    assert checks["tiles_total"] > 4000
    assert jobs.check_run(store, dataset="demo", train_size=30, test_size=5, tile_size=8)


def test_a_memory_limit_too_small_for_a_tile_is_refused(tmp_path):
    out = _refused(tmp_path, [*SMALL, "--memory-limit", "64MB", "--tile-size", "2000"], "64MB")
    assert "needs about" in out and "MiB" in out


def test_external_workers_too_small_for_a_tile_are_refused_before_writing(tmp_path):
    from nngp_dist import UserError, jobs

    class TinyWorkers:  # what the check reads of a distributed.Client
        def scheduler_info(self):
            return {"workers": {"a": {"memory_limit": 2**30}, "b": {"memory_limit": 64e6}}}

    store = tmp_path / "k.zarr"
    with pytest.raises(UserError, match="smallest worker memory limit is 61 MiB"):
        jobs.kernel(str(store), train_size=90, test_size=20, client=TinyWorkers(), progress=False)
    assert not store.exists()


def test_too_little_free_disk_is_refused_unless_forced(tmp_path, monkeypatch):
    import shutil

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=10_000))
    out = _refused(tmp_path, SMALL, "only 0 MiB are free")
    assert "--force" in out and "the kernel (90 x 110" in out
    store = str(tmp_path / "k.zarr")
    r = invoke("kernel", "--store", store, *SMALL, "--scheduler", "synchronous", "--force")
    assert r.exit_code == 0, r.output


def test_a_large_row_beyond_the_first_that_overflows_float32_is_refused(tmp_path):
    x = np.random.default_rng(9).random((300, 6))
    x[250] = 1e20  # fine in float64; its kernel entries (~1e40) are not in float32
    args = ["--dataset", _npz(tmp_path, x_train=x), "--dtype", "float32"]
    _refused(tmp_path, args, "not finite in float32")


def test_solve_refuses_too_little_disk_or_memory_before_changing_the_store(tmp_path, monkeypatch):
    import shutil

    store = tmp_path / "k.zarr"
    assert (
        invoke("kernel", "--store", str(store), *SMALL, "--scheduler", "synchronous").exit_code == 0
    )
    before = sorted((p, p.stat().st_mtime_ns) for p in store.rglob("*"))
    r = CliRunner().invoke(main, ["solve", "--store", str(store), "--memory-limit", "64MB"])
    assert r.exit_code == 2 and "--memory-limit 64MB" in r.output, r.output
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=10_000))
    r = CliRunner().invoke(main, ["solve", "--store", str(store)])
    assert r.exit_code == 2 and "the Cholesky factor of the 90 x 90 kernel" in r.output, r.output
    assert sorted((p, p.stat().st_mtime_ns) for p in store.rglob("*")) == before


def test_a_full_disk_stops_with_a_message_not_a_traceback(tmp_path, monkeypatch):
    """(The fault campaign fills a real tmpfs; here the store's first write fails as a full
    disk makes it fail, wherever that happens.)"""
    import errno

    from nngp_dist.storage import KernelStore

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "k.zarr/x_train"))

    monkeypatch.setattr(KernelStore, "create", full)
    r = CliRunner().invoke(
        main, ["kernel", "--store", str(tmp_path / "k.zarr"), *SMALL, "--scheduler", "synchronous"]
    )
    assert r.exit_code == 1, r.output
    assert "the disk is full (No space left on device) writing" in r.output
    assert "re-run the same command" in r.output and "Traceback" not in r.output
