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
    st = json.loads(invoke("status", "--store", store, "--json", "-").output)
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


# --- the report, status, progress, help ----------------------------------------------------------


@pytest.fixture
def shared_client(monkeypatch, client):
    """Every job the CLI starts in this test uses the module's in-process cluster (no worker
    processes to start)."""
    from nngp_dist import jobs

    def with_client(fn, client_=None, *args, **kwargs):
        return fn(client_ or client)

    monkeypatch.setattr(jobs, "with_client", with_client)
    return client


def test_reports_carry_store_spec_version_and_this_runs_seconds(tmp_path, shared_client):
    store = str(tmp_path / "k.zarr")
    args = ["--store", store, *SMALL, "--depth", "2", "--weight-var", "1.7"]
    first = CliRunner().invoke(main, ["run", *args, "--json", str(tmp_path / "1.json")])
    assert first.exit_code == 0, first.output
    # CliRunner's stderr is no terminal: one line per stage, no bar
    assert "kernel: 13 tiles in " in first.stderr and "\r" not in first.stderr
    assert "predict: 2 blocks in " in first.stderr and "it/s" not in first.stderr
    r1 = json.loads((tmp_path / "1.json").read_text())
    assert r1["store"] == str(tmp_path / "k.zarr") and r1["version"] == nngp_dist.__version__
    assert r1["spec"] == Spec(depth=2, weight_var=1.7).to_dict()
    assert r1["seconds"]["kernel"] > 0 and r1["seconds"]["kernel"] == r1["stage_seconds"]["kernel"]
    # again: the kernel is complete, so this run computed none of it
    again = CliRunner().invoke(main, ["run", *args, "--json", str(tmp_path / "2.json")])
    assert again.exit_code == 0, again.output
    r2 = json.loads((tmp_path / "2.json").read_text())
    assert r2["seconds"]["kernel"] == 0.0 and r2["seconds"]["solve"] == 0.0  # kept, not redone
    assert r2["stage_seconds"]["kernel"] == r1["stage_seconds"]["kernel"]
    assert "time:      kernel 0.0 s, solve " in again.stdout
    solved = CliRunner().invoke(main, ["solve", "--store", store, "--json", str(tmp_path / "s")])
    assert solved.exit_code == 0, solved.output
    rs = json.loads((tmp_path / "s").read_text())
    assert rs["store"] == r1["store"] and rs["spec"] == r1["spec"] and rs["method"] == "cholesky"
    assert rs["version"] == nngp_dist.__version__


def test_status_json_file_the_deprecated_flag_and_one_predict_line(tmp_path, shared_client):
    store = str(tmp_path / "k.zarr")
    assert invoke("run", "--store", store, *SMALL, "--quiet").exit_code == 0
    r = CliRunner().invoke(main, ["status", "--store", store, "--json", str(tmp_path / "st.json")])
    assert r.exit_code == 0 and r.stderr == "", r.output
    st = json.loads((tmp_path / "st.json").read_text())
    assert st["stage"] == "done" and st["tiles_done"] == 13
    lines = r.stdout.splitlines()
    assert lines[0] == f"store:   {st['store']}"  # the text as well, as run and predict do
    predict = [line for line in lines if line.startswith("predict:")]
    assert len(predict) == 1 and "2 / 2 test blocks" in predict[0] and "finished" in predict[0]
    # the old flag: JSON on stdout, a deprecation on stderr
    old = CliRunner().invoke(main, ["status", "--store", store, "--json"])
    assert old.exit_code == 0 and json.loads(old.stdout) == st
    assert "deprecated" in old.stderr and "--json FILE" in old.stderr
    dash = CliRunner().invoke(main, ["status", "--json", "-", "--store", store])
    assert json.loads(dash.stdout) == st and dash.stderr == ""
    bad = CliRunner().invoke(main, ["status", "--store", store, "--json", "/nonexistent/x.json"])
    assert bad.exit_code == 2 and "not a writable directory" in bad.output


def test_status_after_an_interrupted_resolve_shows_no_finished_predict(tmp_path, shared_client):
    from nngp_dist import jobs

    store = str(tmp_path / "k.zarr")
    assert invoke("run", "--store", store, *SMALL, "--quiet").exit_code == 0

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(jobs, "factorize", interrupted)
        r = CliRunner().invoke(main, ["solve", "--store", store, "--noise", "1e-4"])
    assert r.exit_code == 130 and "interrupted" in r.output
    text = invoke("status", "--store", store).output
    assert "finished" not in "".join(x for x in text.splitlines() if x.startswith("predict"))
    assert "solve:   started" in text and "not finished" in text and "result:" not in text
    st = json.loads(invoke("status", "--store", store, "--json", "-").output)
    assert st["stage"] == "solve" and "predict" not in st["stages"] and st["predict"] is None


def test_status_scheduler_from_the_environment(tmp_path, monkeypatch, client):
    store = str(tmp_path / "k.zarr")
    r = invoke("kernel", "--store", store, *SMALL, "--scheduler", "synchronous", "--quiet")
    assert r.exit_code == 0, r.output
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", client.scheduler.address)
    out = invoke("status", "--store", store).output
    assert "job:     none submitted to this scheduler" in out
    # an unreachable one from the environment is reported; given on the command line, refused
    import dask.config

    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", "tcp://127.0.0.1:1")
    monkeypatch.setenv("DASK_NNGP_DIST__CONNECT_TIMEOUT", "1s")
    dask.config.refresh()
    try:
        r = CliRunner().invoke(main, ["status", "--store", store])
        assert r.exit_code == 0, r.output
        assert "job:     unknown ($DASK_SCHEDULER_ADDRESS: cannot reach" in r.output
        assert "tiles:   13 / 13 done" in r.output
        args = ["status", "--store", store, "--scheduler", "tcp://127.0.0.1:1"]
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 2 and "cannot reach" in r.output
    finally:  # dask's config would keep the unreachable scheduler for every later test
        monkeypatch.undo()
        dask.config.refresh()
    # the TLS options are cancel's own
    r = CliRunner().invoke(main, ["status", "--store", store, "--tls-ca-file", __file__])
    assert r.exit_code == 2 and "TLS needs all three" in r.output


@pytest.mark.parametrize("command", ["run", "submit", "kernel", "solve", "predict", "sweep"])
def test_help_lists_every_option_once_in_its_section(command):
    from nngp_dist.cli import SECTIONS

    r = invoke(command, "--help")
    assert r.exit_code == 0
    titles = [line[:-1] for line in r.output.splitlines() if line.endswith("options:")]
    assert titles[-1] == "Other options" and all(t in (*SECTIONS, "Other options") for t in titles)
    assert titles[:-1] == [t for t in SECTIONS if t in titles]  # in the fixed order
    section, where = None, {}
    for line in r.output.splitlines():
        if line.endswith("options:"):
            section = line[:-1]
        elif line.startswith("  --"):
            name = line.split()[0]
            assert name not in where, f"{name} listed twice"
            where[name] = section
    params = main.commands[command].params
    assert sorted(where) == sorted([*(p.opts[0] for p in params), "--help"])
    expected = {
        "--train-size": "Dataset options",
        "--quiet": "Output options",
        "--scheduler": "Cluster options",
        "--tls-key": "Cluster options",
    }
    if command in ("run", "submit", "kernel", "sweep"):
        expected["--weight-var"] = "Architecture options"
    if command in ("run", "submit", "solve", "sweep"):
        expected["--noise"] = "Solver options"
    for name, title in expected.items():
        if name != "--train-size" or command not in ("solve", "predict"):
            assert where[name] == title, (name, where[name])


def test_progress_is_one_line_per_stage_off_a_terminal(monkeypatch):
    import io

    from nngp_dist import progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    bar = progress.progress_bar(10, 3, True, "kernel")
    for _ in range(7):
        bar.update()
    bar.close()
    text = log.getvalue()
    assert text.startswith("kernel: 7 tiles in ") and text.endswith(
        " s (3 already done, 10 in all)\n"
    )
    assert text.count("\n") == 1
    stopped = progress.progress_bar(10, 0, True, "cholesky", "operation")
    stopped.update()
    stopped.close()
    assert log.getvalue().splitlines()[1].endswith("(10 in all)")  # stopped short: says of what
    tty = Terminal()
    monkeypatch.setattr(sys, "stderr", tty)
    bar = progress.progress_bar(10, 3, True, "kernel")
    bar.update()
    bar.close()
    assert "\r" in tty.getvalue() and "4/10" in tty.getvalue()  # a tqdm bar, from 3
    quiet = io.StringIO()
    monkeypatch.setattr(sys, "stderr", quiet)
    bar = progress.progress_bar(10, 0, False)
    bar.update()
    bar.close()
    assert quiet.getvalue() == ""


def test_embedded_workers_ignore_sigint_so_the_client_alone_handles_ctrl_c():
    from nngp_dist.cluster import _children_ignore_sigint

    code = "import signal; print(signal.getsignal(signal.SIGINT) is signal.SIG_IGN)"
    probe = [sys.executable, "-c", code]
    with _children_ignore_sigint():
        inside = subprocess.run(probe, capture_output=True, text=True).stdout
    outside = subprocess.run(probe, capture_output=True, text=True).stdout
    assert inside == "True\n" and outside == "False\n"


def test_ctrl_c_is_one_line_and_the_rerun_finishes_cleanly(tmp_path):
    """SIGINT to the whole process group, as Ctrl-C at a terminal sends it, mid-run: the
    friendly message without the workers' tracebacks; the re-run completes without shutdown
    noise, and leaves no temporary file of an atomic write in the store."""
    import signal
    import time

    store = tmp_path / "k.zarr"
    cmd = [sys.executable, "-m", "nngp_dist.cli", "run", "--store", str(store)]
    cmd += ["--dataset", "demo", "--train-size", "800", "--test-size", "40"]
    cmd += ["--tile-size", "50", "--workers", "2"]
    # SIGINT at its default (a shell's background job would start with it ignored)
    launch = "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    launch += "os.execv(sys.argv[1], sys.argv[1:])"
    proc = subprocess.Popen(
        [sys.executable, "-c", launch, *cmd],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    records = store / "tiles" / "k_train_train" / "c"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        if records.exists() and sum(1 for _ in records.rglob("*")) > 20:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted: finished tiles are kept" in err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # no worker process outlives it for long
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("processes of the interrupted run were still alive 30 s after it")
    (store / "tiles" / "k_train_train" / "c" / "0" / "0.0123abcd.partial").write_bytes(b"x")
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "already done" in again.stderr  # of the kernel, or of the factor if it got that far
    for noise in ("Traceback", "CommClosedError", "Cannot close a running event loop"):
        assert noise not in again.stderr, again.stderr
    assert not list(store.rglob("*.partial"))


def test_closing_is_quiet_bounded_and_restores_logging(caplog):
    """What a closing client logs (comms torn down) is not shown; a close that times out does
    not fail a finished job; the loggers' levels come back after a clean close only."""
    import logging

    from nngp_dist import cluster

    class Closing:
        def __init__(self, fails):
            self.fails, self.timeout = fails, None

        def close(self, timeout=None):
            self.timeout = timeout
            logging.getLogger("distributed.comm").error("CommClosedError: Stream is closed")
            if self.fails:
                raise TimeoutError("closing took too long")

    logger = logging.getLogger("distributed")
    levels = {name: logging.getLogger(name).level for name in cluster._LOGGERS}
    before = logger.level
    try:
        clean = Closing(fails=False)
        with cluster._closing(clean, None):
            pass
        assert clean.timeout == cluster.CLOSE_TIMEOUT and logger.level == before
        timed_out = Closing(fails=True)
        with cluster._closing(None, timed_out):
            pass
        assert logger.level > logging.CRITICAL  # what is left is torn down at exit, quietly
        logger.setLevel(before)
        with pytest.raises(KeyboardInterrupt), cluster._closing(Closing(fails=False), None):
            raise KeyboardInterrupt
        assert logger.level > logging.CRITICAL
        assert not [r for r in caplog.records if "CommClosedError" in r.getMessage()]
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


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
