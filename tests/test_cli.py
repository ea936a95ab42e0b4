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
