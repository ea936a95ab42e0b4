"""Tiled Cholesky, solves and posterior against SciPy; resume, jitter escalation, memory."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg as sl
import zarr

import nngp_dist
from nngp_dist import KernelStore, UserError, jobs
from nngp_dist.predict import targets


def scipy_posterior(store, noise_rel):
    """The plain in-memory SciPy pipeline on the kernel read back from the store."""
    ds = nngp_dist.open_store(str(store))
    k, ks = ds.k_train_train.values, ds.k_test_train.values
    s = noise_rel * ds.k_train_diag.values.mean()
    y = ds.y_train.values
    t = (
        targets(y, int(max(y.max(), ds.y_test.values.max()) + 1))
        if y.dtype.kind == "i"
        else y[:, None]
    )
    c = t.shape[1]
    low = sl.cholesky(k + s * np.eye(len(k)), lower=True)
    alpha = sl.cho_solve((low, True), t)
    w = sl.solve_triangular(low, ks.T, lower=True)
    var = ds.k_test_diag.values - (w * w).sum(0)
    lml = (
        -0.5 * (t * alpha).sum()
        - c * np.log(np.diag(low)).sum()
        - 0.5 * c * len(k) * np.log(2 * np.pi)
    )
    return alpha, ks @ alpha, var, lml


def check_against_scipy(store, noise_rel, report):
    alpha, mean, var, lml = scipy_posterior(store, noise_rel)
    g = zarr.open_group(str(store), mode="r")
    scale = np.abs(mean).max()
    np.testing.assert_allclose(g["alpha"][...], alpha, rtol=1e-7, atol=1e-8 * np.abs(alpha).max())
    np.testing.assert_allclose(g["mean"][...], mean, rtol=1e-8, atol=1e-8 * scale)
    np.testing.assert_allclose(g["variance"][...], np.maximum(var, 0), atol=1e-6 * var.max())
    assert report["log_marginal_likelihood"] == pytest.approx(lml, rel=1e-9)


def make_kernel(tmp_path, client, n=150, m=40, tile=32, **kw):
    store = tmp_path / "k.zarr"
    spec = {"depth": 2, "weight_var": 1.6, "bias_var": 0.2, **kw}
    jobs.kernel(
        str(store),
        dataset="demo",
        train_size=n,
        test_size=m,
        tile_size=tile,
        client=client,
        progress=False,
        **spec,
    )
    return store


@pytest.mark.parametrize("n,tile", [(150, 32), (150, 50), (130, 130), (97, 200)])
def test_real_kernel_against_scipy(tmp_path, client, n, tile):
    store = make_kernel(tmp_path, client, n=n, tile=tile)
    jobs.solve(str(store), noise=1e-3, client=client, progress=False)
    report = jobs.predict(str(store), client=client, progress=False)
    check_against_scipy(store, 1e-3, report)
    assert 0 <= report["accuracy"] <= 1 and report["n_train"] == n
    assert sum(b["count"] for b in report["calibration"]) == 40
    assert KernelStore.open(str(store)).status()["stage"] == "done"


def test_seeded_spd_matrix_regression_targets(tmp_path, client):
    """A random SPD matrix (not a network kernel) with float targets, written into a store."""
    rng = np.random.default_rng(5)
    n, m = 90, 25
    x = rng.standard_normal((n + m, 12))
    np.savez(
        tmp_path / "d.npz",
        x_train=x[:n],
        y_train=rng.standard_normal(n),
        x_test=x[n:],
        y_test=rng.standard_normal(m),
    )
    store = tmp_path / "k.zarr"
    jobs.kernel(
        str(store), dataset=f"npz:{tmp_path / 'd.npz'}", tile_size=20, client=client, progress=False
    )
    a = rng.standard_normal((n + m, n + m))
    full = a @ a.T / (n + m) + 0.5 * np.eye(n + m)
    g = zarr.open_group(str(store), mode="r+")
    g["k_train_train"][...] = np.triu(full[:n, :n])  # only the upper tiles are read
    g["k_test_train"][...] = full[n:, :n]
    g["k_train_diag"][...] = np.diag(full)[:n]
    g["k_test_diag"][...] = np.diag(full)[n:]
    jobs.solve(str(store), noise=1e-6, client=client, progress=False)
    report = jobs.predict(str(store), client=client, progress=False)
    assert "accuracy" not in report
    ds = nngp_dist.open_store(str(store))
    np.testing.assert_array_equal(
        ds.k_train_train.values, np.triu(full[:n, :n]) + np.triu(full[:n, :n], 1).T
    )
    check_against_scipy(store, 1e-6, report)


@pytest.mark.parametrize("method", ["cholesky", "cg"])
def test_output_scale_and_calibration_on_draws_from_the_prior(tmp_path, client, method):
    """Targets drawn from the GP prior scaled by s2 = 3.7, noise included: the fitted output
    scale recovers s2, and the predictive variances match the realised squared errors (a Monte
    Carlo average over 400 output columns). The unscaled variances would be off 3.7x."""
    from nngp_dist.kernels import Spec

    rng = np.random.default_rng(21)
    n, m, c, s2, noise = 120, 60, 400, 3.7, 1e-2
    arch = {"depth": 2, "weight_var": 1.6, "bias_var": 0.2}
    x = rng.standard_normal((n + m, 10))
    k = Spec(**arch).cross(x, x)
    s = noise * np.diag(k)[:n].mean()
    y = np.linalg.cholesky(s2 * (k + s * np.eye(n + m))) @ rng.standard_normal((n + m, c))
    np.savez(tmp_path / "d.npz", x_train=x[:n], y_train=y[:n], x_test=x[n:], y_test=y[n:])
    store = str(tmp_path / "k.zarr")
    jobs.kernel(
        store,
        dataset=f"npz:{tmp_path / 'd.npz'}",
        tile_size=32,
        client=client,
        progress=False,
        **arch,
    )
    solved = jobs.solve(store, noise=noise, method=method, client=client, progress=False)
    assert solved["output_scale"] == pytest.approx(s2, rel=0.05)  # sd sqrt(2 / (n c)) = 1%
    report = jobs.predict(store, bins=4, client=client, progress=False)
    assert report["output_scale"] == solved["output_scale"]
    for b in report["calibration"]:  # 15 test points x 400 columns per bin: sd about 2%
        assert b["mse"] == pytest.approx(b["mean_variance"], rel=0.1)


def test_jitter_escalates_on_a_rank_deficient_kernel(tmp_path, client):
    # A linear kernel of 10-dimensional inputs has rank 11 < N: singular without noise.
    rng = np.random.default_rng(6)
    np.savez(
        tmp_path / "d.npz",
        x_train=rng.random((60, 10)),
        y_train=rng.integers(0, 3, 60),
        x_test=rng.random((7, 10)),
        y_test=rng.integers(0, 3, 7),
    )
    store = tmp_path / "k.zarr"
    jobs.kernel(
        str(store),
        dataset=f"npz:{tmp_path / 'd.npz'}",
        depth=0,
        bias_var=0.1,
        tile_size=16,
        client=client,
        progress=False,
    )
    rec = jobs.solve(str(store), noise=1e-18, client=client, progress=False)
    assert rec["noise"] > 1e-18 and len(rec["attempts"]) >= 2
    assert rec["attempts"][-1]["result"] == "ok"
    assert all("not positive definite" in a["result"] for a in rec["attempts"][:-1])
    assert [a["noise"] for a in rec["attempts"]] == pytest.approx(
        [1e-18 * 10**i for i in range(len(rec["attempts"]))], rel=1e-9
    )
    # At a noise this small the system is ill-conditioned (cond ~ 1e13), so check that alpha
    # solves it (a backward-stable residual) rather than compare it with another solver.
    ds = nngp_dist.open_store(str(store))
    k = ds.k_train_train.values + rec["noise_abs"] * np.eye(60)
    t = targets(ds.y_train.values, 3)
    alpha = zarr.open_group(str(store))["alpha"][...]
    norm = np.linalg.norm
    backward_error = norm(k @ alpha - t) / (norm(k, 2) * norm(alpha) + norm(t))
    assert backward_error < 1e-13
    # the same request again resumes at the escalated noise instead of climbing anew
    again = jobs.solve(str(store), noise=1e-18, client=client, progress=False)
    assert again["noise"] == rec["noise"] and len(again["attempts"]) == len(rec["attempts"]) + 1
    assert again["attempts"][-1]["tiles_resumed"] == 10  # every factor tile of 4 x 4


def test_indefinite_at_the_cap_is_a_clear_error_and_kernel_untouched(tmp_path, client):
    store = make_kernel(tmp_path, client, n=64, tile=16)
    jobs.solve(str(store), noise=1e-3, client=client, progress=False)
    jobs.predict(str(store), client=client, progress=False)
    g = zarr.open_group(str(store), mode="r+")
    g["k_train_train"][0:16, 0:16] = -np.eye(16)  # a negative-definite block
    before = g["k_train_train"][...]
    with pytest.raises(UserError, match="stays indefinite"):
        jobs.solve(str(store), noise=1e-6, max_noise=1e-4, client=client, progress=False)
    np.testing.assert_array_equal(g["k_train_train"][...], before)
    meta = zarr.open_group(str(store), mode="r").attrs["nngp_dist"]
    assert len(meta["factor"]["attempts"]) == 3  # 1e-6, 1e-5, 1e-4
    # the earlier solution is not reported as if it still held
    assert KernelStore.open(str(store)).status()["stage"] == "solve"
    with pytest.raises(UserError, match="no solution yet"):
        jobs.predict(str(store), client=client, progress=False)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"noise": 0.0}, "positive"),
        ({"noise": float("nan")}, "positive"),
        ({"noise": "abc"}, "number"),
        ({"noise": 1e-3, "max_noise": 1e-4}, "below"),
        ({"method": "lu"}, "unknown --method"),
        ({"maxiter": 0}, "maxiter"),
        ({"tol": 0}, "tol"),
        ({"noise": "1e-3,1e-2", "validation_size": 40}, "validation-size"),
        ({"preconditioner": "ilu"}, "preconditioner"),
    ],
)
def test_bad_solver_options(tmp_path, client, kw, match):
    store = make_kernel(tmp_path, client, n=40, tile=16)
    with pytest.raises(UserError, match=match):
        jobs.solve(str(store), client=client, progress=False, **kw)


@pytest.mark.parametrize("precond", [False, True])
def test_pcg_against_scipy_on_seeded_spd(precond):
    from nngp_dist.solvers.cg import pcg

    rng = np.random.default_rng(11)
    a = rng.standard_normal((120, 120))
    a = a @ a.T / 120 + np.diag(rng.uniform(0.05, 3.0, 120))
    b = rng.standard_normal((120, 3))
    m = None
    if precond:
        blocks = [sl.cho_factor(a[i : i + 40, i : i + 40]) for i in range(0, 120, 40)]

        def m(r):
            return np.concatenate(
                [sl.cho_solve(f, r[i * 40 : (i + 1) * 40]) for i, f in enumerate(blocks)]
            )

    x, log = pcg(lambda v: a @ v, b, precond=m, tol=1e-10, maxiter=500)
    want = sl.solve(a, b, assume_a="pos")
    assert log["converged"] and log["true_residual"] <= 1e-9
    np.testing.assert_allclose(x, want, rtol=1e-7, atol=1e-8 * np.abs(want).max())


def test_pcg_reports_when_it_stops_unconverged():
    from nngp_dist.solvers.cg import pcg

    a = np.diag(np.logspace(0, 6, 50))
    _, log = pcg(lambda v: a @ v, np.ones(50), tol=1e-12, maxiter=3)
    assert not log["converged"] and log["iterations"] == 3 and len(log["residuals"]) == 3


@pytest.mark.parametrize("precond", ["nystrom", "block-jacobi", "none"])
def test_cg_on_the_store_against_scipy(tmp_path, client, precond):
    store = make_kernel(tmp_path, client, n=150, m=40, tile=32)
    rec = jobs.solve(
        str(store),
        method="cg",
        noise=1e-2,
        tol=1e-10,
        preconditioner=precond,
        client=client,
        progress=False,
    )
    assert rec["cg"]["converged"] and rec["log_marginal_likelihood"] is None
    report = jobs.predict(str(store), client=client, progress=False)
    alpha, mean, var, _ = scipy_posterior(store, 1e-2)
    g = zarr.open_group(str(store), mode="r")
    np.testing.assert_allclose(g["alpha"][...], alpha, rtol=1e-6, atol=1e-7 * np.abs(alpha).max())
    np.testing.assert_allclose(g["mean"][...], mean, atol=1e-7 * np.abs(mean).max())
    np.testing.assert_allclose(g["variance"][...], np.maximum(var, 0), atol=1e-7 * var.max())
    assert report["log_marginal_likelihood"] is None and report["n_test"] == 40
    assert KernelStore.open(str(store)).status()["stage"] == "done"
    with pytest.warns(UserWarning, match="unconverged"):
        rec = jobs.solve(
            str(store), method="cg", noise=1e-6, tol=1e-14, maxiter=2, client=client, progress=False
        )
    assert not rec["cg"]["converged"]


def test_incomplete_kernel_and_unsolved_store_are_refused(tmp_path, client):
    store = make_kernel(tmp_path, client, n=40, tile=16)
    with pytest.raises(UserError, match="no solution yet"):
        jobs.predict(str(store), client=client, progress=False)
    zarr.open_group(str(store), mode="r+")["tiles/k_train_train"][0, 2] = np.nan
    with pytest.raises(UserError, match="1 of 21 tiles are missing"):
        jobs.solve(str(store), client=client, progress=False)


def test_killed_factorisation_resumes(tmp_path):
    """SIGKILL a real `nngp-dist solve` (client, scheduler and workers) mid-way, then re-run."""
    store = tmp_path / "k.zarr"
    nngp_dist.kernel(
        str(store),
        dataset="demo",
        train_size=1200,
        test_size=50,
        tile_size=100,
        depth=2,
        scheduler="synchronous",
        progress=False,
    )
    cmd = [
        sys.executable,
        "-m",
        "nngp_dist.cli",
        "solve",
        "--store",
        str(store),
        "--noise",
        "1e-3",
        "--workers",
        "2",
        "--quiet",
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    rec_dir = store / "tiles" / "chol" / "c"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if rec_dir.exists() and sum(1 for _ in rec_dir.rglob("*")) > 25:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the factorisation finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # the whole job: client, scheduler and workers
    proc.wait()
    done_before = int((~np.isnan(zarr.open_group(str(store))["tiles/chol"][...])).sum())
    assert 0 < done_before < 78
    out = subprocess.run([*cmd[:-1], "--quiet"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    meta = zarr.open_group(str(store)).attrs["nngp_dist"]
    assert meta["factor"]["attempts"][-1]["tiles_resumed"] >= done_before
    assert not list(store.rglob("*.partial"))  # a killed write's temporary file does not stay
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "nngp_dist.cli",
            "predict",
            "--store",
            str(store),
            "--json",
            str(tmp_path / "r.json"),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    check_against_scipy(store, 1e-3, json.loads((tmp_path / "r.json").read_text()))


def _peak_rss() -> int:
    """This process's peak resident memory since its exec (VmHWM; getrusage's ru_maxrss would
    include the forking parent's, which it keeps across exec)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def _environ_at_start() -> dict[str, str]:
    """This process's environment as it was when the process started (Linux)."""
    raw = Path("/proc/self/environ").read_bytes().split(b"\0")
    return dict(v.decode().split("=", 1) for v in raw if b"=" in v)


def test_kernel_several_times_larger_than_worker_memory(tmp_path):
    """N = 13,000: the 1.35 GB float64 kernel is 2.6x each worker's 512 MB limit, the least
    the README advises (an idle worker with numba's compiled loops loaded takes 200-300 MB,
    300 in a fresh virtualenv, and Dask pauses a worker at 80% of its limit: at 400 MB a fresh
    install's workers sat paused from the start); the whole job (kernel, factor, solve,
    predict) completes and no worker's peak RSS passes its limit."""
    from nngp_dist.cluster import WORKER_ENV, connect

    rng = np.random.default_rng(9)
    n = 13_000
    np.savez(
        tmp_path / "d.npz",
        x_train=rng.random((n, 20)),
        y_train=rng.integers(0, 10, n),
        x_test=rng.random((300, 20)),
        y_test=rng.integers(0, 10, 300),
    )
    store = str(tmp_path / "k.zarr")
    limit = 512e6
    with connect(workers=2, memory_limit=int(limit)) as c:
        options = {"depth": 2, "weight_var": 1.5, "bias_var": 0.1, "tile_size": 500}
        data = f"npz:{tmp_path / 'd.npz'}"
        report = jobs.run(store, dataset=data, noise=1e-3, client=c, progress=False, **options)
        peaks = c.run(_peak_rss)
        environ = c.run(_environ_at_start) if Path("/proc/self/environ").exists() else {}
    # One malloc arena: set before each worker started (what glibc reads), not after.
    assert all(env.items() >= WORKER_ENV.items() for env in environ.values()), environ
    assert n * n * 8 > 2.5 * limit
    assert max(peaks.values()) < limit, peaks
    assert report["n_train"] == n and KernelStore.open(store).status()["stage"] == "done"
    ds = nngp_dist.open_store(store)
    k = ds.k_train_train.values + report["noise_abs"] * np.eye(n)
    alpha = ds["alpha"].values
    t = targets(ds.y_train.values, 10)
    assert np.linalg.norm(k @ alpha - t) / np.linalg.norm(t) < 1e-8


def test_noise_grid_against_brute_force(tmp_path, client):
    """Every grid value's LML and validation accuracy against a separate SciPy solve."""
    store = make_kernel(tmp_path, client, n=160, m=30, tile=48)
    grid = [1e-4, 1e-2, 1e-1]
    rec = jobs.solve(
        str(store),
        noise=",".join(map(str, grid)),
        validation_size=40,
        client=client,
        progress=False,
    )
    sel = rec["selection"]
    ds = nngp_dist.open_store(str(store))
    k, y = ds.k_train_train.values, ds.y_train.values
    t = targets(y, int(max(y.max(), ds.y_test.values.max()) + 1))
    mean_diag = ds.k_train_diag.values.mean()
    accs = []
    for row, rel in zip(sel["grid"], grid):
        kf = k[:120, :120] + rel * mean_diag * np.eye(120)
        low = np.linalg.cholesky(kf)
        alpha = sl.cho_solve((low, True), t[:120])
        lml = (
            -0.5 * (t[:120] * alpha).sum()
            - t.shape[1] * np.log(np.diag(low)).sum()
            - 0.5 * t.shape[1] * 120 * np.log(2 * np.pi)
        )
        acc = ((k[120:, :120] @ alpha).argmax(1) == y[120:]).mean()
        accs.append(acc)
        assert row["log_marginal_likelihood"] == pytest.approx(lml, rel=1e-9)
        assert row["validation_accuracy"] == pytest.approx(acc)
    assert sel["select_by"] == "accuracy" and sel["chosen"] == grid[int(np.argmax(accs))]
    assert rec["noise"] == sel["chosen"]  # the final solve used it, on all 160 points
    report = jobs.predict(str(store), client=client, progress=False)
    check_against_scipy(store, sel["chosen"], report)
    by_lml = jobs.solve(str(store), noise=grid, select_by="lml", client=client, progress=False)
    check_lml_grid(store, by_lml, grid, 160)
    with pytest.raises(UserError, match="needs a validation split"):
        jobs.solve(str(store), noise=grid, select_by="accuracy", client=client, progress=False)


def scaled_lml_oracle(store, rel, n):
    """The marginal likelihood of the first ``n`` points maximised over the output scale s2,
    numerically (SciPy's multivariate normal, bounded scalar search on log s2): the oracle
    for the grid's ``log_marginal_likelihood_scaled`` and ``output_scale``."""
    from scipy.optimize import minimize_scalar
    from scipy.stats import multivariate_normal

    ds = nngp_dist.open_store(str(store))
    k, y = ds.k_train_train.values[:n, :n], ds.y_train.values[:n]
    t = targets(y, int(max(ds.y_train.values.max(), ds.y_test.values.max()) + 1))
    cov = k + rel * ds.k_train_diag.values.mean() * np.eye(n)

    def nll(log_s2):
        dist = multivariate_normal(np.zeros(n), np.exp(log_s2) * cov)
        return -sum(dist.logpdf(t[:, j]) for j in range(t.shape[1]))

    best = minimize_scalar(nll, bounds=(-12, 12), method="bounded", options={"xatol": 1e-10})
    return -best.fun, float(np.exp(best.x))


def check_lml_grid(store, rec, grid, n):
    """Every row's scaled LML and output scale against the oracle; the chosen noise is the
    oracle's best, and the final solve used it."""
    rows = rec["selection"]["grid"]
    want = [scaled_lml_oracle(store, rel, n) for rel in grid]
    for row, rel, (lml, s2) in zip(rows, grid, want, strict=True):
        assert row["noise"] == rel
        assert row["log_marginal_likelihood_scaled"] == pytest.approx(lml, rel=1e-7)
        assert row["output_scale"] == pytest.approx(s2, rel=1e-4)
    chosen = grid[int(np.argmax([w[0] for w in want]))]
    assert rec["selection"]["chosen"] == chosen and rec["noise"] == chosen
    assert rec["selection"]["select_by"] == "lml"


def test_out_of_core_lml_grid_fits_noise_and_scale_and_resumes(tmp_path, client, monkeypatch):
    """Above the in-memory size, an lml grid factors the store once per noise: each row's
    likelihood at its fitted scale against SciPy, the chosen noise's factor in the store; a
    grid stopped after its first noise resumes there, keeping the finished row."""
    from nngp_dist import select

    monkeypatch.setattr(select, "MAX_GRID_N", 100)
    store = make_kernel(tmp_path, client, n=130, m=20, tile=32)
    grid = [4e-2, 1e-2, 2e-2]  # here the likelihood at scale 1 would choose 4e-2
    with pytest.raises(UserError, match="--select-by lml with no --validation-size"):
        jobs.solve(str(store), noise=grid, validation_size=30, client=client, progress=False)
    with pytest.raises(UserError, match="CG computes no log-determinant"):
        jobs.solve(str(store), noise=grid, method="cg", client=client, progress=False)
    rec = jobs.solve(str(store), noise=grid, select_by="lml", client=client, progress=False)
    check_lml_grid(store, rec, grid, 130)
    at_one = max(rec["selection"]["grid"], key=lambda r: r["log_marginal_likelihood"])
    assert at_one["noise"] != rec["noise"]  # the scale fitted per noise changed the choice
    assert KernelStore.open(str(store)).meta["noise_grid"] is None  # done: nothing to resume
    report = jobs.predict(str(store), client=client, progress=False)
    check_against_scipy(store, rec["noise"], report)  # the factor left is the chosen noise's

    # A grid killed while factoring its second noise: the first row is in the store.
    first = dict(rec["selection"]["grid"][0], log_marginal_likelihood_scaled=1e300)
    options = jobs._solve_options(jobs.SolveOptions.checked(noise=grid, select_by="lml"))
    ks = KernelStore.open(str(store), "r+")
    ks.update_meta(noise_grid={"options": options, "rows": [first]})
    assert ks.status()["noise_grid"] == {"noises": grid, "done": 1}  # what status says
    again = jobs.solve(str(store), noise=grid, select_by="lml", client=client, progress=False)
    assert again["selection"]["grid"][0] == first  # kept, not recomputed
    assert again["noise"] == grid[0]  # the kept row wins, so its noise is factored again
    check_against_scipy(store, grid[0], jobs.predict(str(store), client=client, progress=False))


def test_switching_between_cg_and_cholesky(tmp_path, client):
    store = make_kernel(tmp_path, client, n=100, m=20, tile=32)
    jobs.solve(str(store), noise=1e-2, client=client, progress=False)
    jobs.solve(str(store), method="cg", noise=1e-2, tol=1e-10, client=client, progress=False)
    st = KernelStore.open(str(store)).status()
    assert "factor_tiles" not in st and st["factor"] is None
    jobs.solve(str(store), noise=1e-2, client=client, progress=False)
    report = jobs.predict(str(store), client=client, progress=False)
    check_against_scipy(store, 1e-2, report)


@pytest.mark.parametrize(
    "kw,match",
    [({"bins": 0}, "--bins"), ({"json_path": "/nonexistent/dir/r.json"}, "writable directory")],
)
def test_bad_predict_options_fail_before_work(tmp_path, client, kw, match):
    store = make_kernel(tmp_path, client, n=40, tile=16)
    jobs.solve(str(store), noise=1e-3, client=client, progress=False)
    with pytest.raises(UserError, match=match):
        jobs.predict(str(store), client=client, progress=False, **kw)
    with pytest.raises(UserError, match=match):  # run checks them before the kernel
        jobs.run(
            str(tmp_path / "new.zarr"),
            dataset="demo",
            train_size=40,
            test_size=10,
            client=client,
            progress=False,
            **kw,
        )
    assert not (tmp_path / "new.zarr").exists()


def test_resumed_factorisation_counts_what_is_left():
    """The operations still to run, against a hand count of a 3 x 3-tile factorisation whose
    first step is done but for one update, and whose (1, 1) and (1, 2) tiles have had theirs."""
    from nngp_dist.solvers.cholesky import _missing, count_operations

    nan = np.nan
    done = ~np.isnan(np.array([[0, 0, 0], [nan, nan, nan], [nan, nan, nan]]))
    step = np.array([[0, 0, 0], [0, 1, 1], [0, 0, 0]])
    todo = _missing(done, step)
    assert todo == [
        [("update", 0, 2, 2)],
        [("potrf", 1), ("trsm", 1, 2), ("update", 1, 2, 2)],
        [("potrf", 2)],
    ]
    assert count_operations(3) == 10  # 3 potrf, 3 trsm, 3 + 1 updates
    fresh = _missing(np.zeros((3, 3), bool), np.zeros((3, 3), int))
    assert sum(map(len, fresh)) == 10
    assert _missing(np.ones((3, 3), bool), step) == [[], [], []]


def test_a_resumed_factorisation_bar_starts_at_the_done_count(tmp_path, client, monkeypatch):
    from nngp_dist.solvers import cholesky

    bars = []
    real = cholesky.progress_bar

    def spy(total, initial, enabled, desc="kernel", unit="tile"):
        bars.append((desc, total, initial))
        return real(total, initial, False, desc, unit)

    monkeypatch.setattr(cholesky, "progress_bar", spy)
    store = make_kernel(tmp_path, client, n=64, tile=16)  # 4 x 4 tiles: 20 + 10 + 4 ... ops
    jobs.solve(str(store), noise=1e-3, client=client, progress=True)
    total = cholesky.count_operations(4)
    assert bars == [("cholesky", total, 0)]
    jobs.solve(str(store), noise=1e-3, client=client, progress=True)  # resumes: all done
    assert bars[-1] == ("cholesky", total, total)


def test_scaled_lml_of_all_zero_targets_is_unbounded_and_ranks_last():
    """Zero targets: the likelihood grows without bound as the scale goes to 0 (None, not a
    division by zero), and a grid prefers any row with a finite likelihood."""
    from nngp_dist.predict import scaled_log_marginal_likelihood
    from nngp_dist.select import best_by_lml

    assert scaled_log_marginal_likelihood(0.0, -87.9, 30, 1) is None
    rows = [{"log_marginal_likelihood_scaled": None}, {"log_marginal_likelihood_scaled": -3.0}]
    assert best_by_lml(rows) is rows[1]
