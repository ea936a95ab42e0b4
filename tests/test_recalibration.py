"""Leave-one-out predictions and the variance recalibration fitted on them, against
independent oracles: each leave-one-out point refitted without it by SciPy, scikit-learn's
isotonic regression, and targets whose noise the GP's homoscedastic variance cannot follow."""

import os

import numpy as np
import pytest
import scipy.linalg as sl

import nngp_dist
from nngp_dist import KernelStore, UserError, jobs
from nngp_dist.errors import CorruptStore
from nngp_dist.layout import CHOL, LOO, LOO_INDEX, LOO_MEAN, LOO_VARIANCE, PREDICT, record
from nngp_dist.predict import (
    isotonic_map,
    loo_index,
    predictive_variance,
    recalibrated_variance,
)

from .test_checksums import RUN, chunk, cli, flip
from .test_solvers import make_kernel


def refitted_loo(store, noise_rel, index):
    """Each point of ``index`` predicted by the GP on the other training points, from scratch."""
    ds = nngp_dist.open_store(str(store))
    k = ds.k_train_train.values
    s = noise_rel * ds.k_train_diag.values.mean()
    t = KernelStore.open(str(store)).read("t_train")
    means, variances = [], []
    for i in index:
        rest = np.delete(np.arange(len(k)), i)
        low = sl.cholesky(k[np.ix_(rest, rest)] + s * np.eye(len(rest)), lower=True)
        w = sl.solve_triangular(low, k[rest, i], lower=True)
        means.append(k[i, rest] @ sl.cho_solve((low, True), t[rest]))
        variances.append(k[i, i] - w @ w)
    return np.array(means), np.array(variances)


@pytest.mark.parametrize("method", ["cholesky", "cg"])
def test_leave_one_out_predictions_equal_refitting_without_the_point(tmp_path, client, method):
    store = make_kernel(tmp_path, client, n=150, m=40, tile=32)  # 5 factor blocks
    extra = {"tol": 1e-12} if method == "cg" else {}
    jobs.solve(str(store), noise=1e-2, method=method, client=client, progress=False, **extra)
    report = jobs.predict(str(store), loo_size=37, client=client, progress=False)
    ks = KernelStore.open(str(store))
    index = ks.read(LOO_INDEX)
    assert np.array_equal(index, np.linspace(0, 149, 37).round()) and index[-1] == 149
    assert len(ks.read(record(LOO))) > 1  # several blocks, most starting past the first
    mean, var = refitted_loo(store, 1e-2, index)
    np.testing.assert_allclose(ks.read(LOO_MEAN), mean, atol=1e-6 * np.abs(mean).max())
    np.testing.assert_allclose(ks.read(LOO_VARIANCE), var, rtol=1e-5, atol=1e-8 * var.max())
    loo = report["loo"]
    assert loo["size"] == 37 and report["loo_size"] == 37 and report["loo_skipped"] is None
    y = ks.read("y_train")[index]
    assert loo["accuracy"] == pytest.approx((mean.argmax(1) == y).mean())
    assert len(report["calibration_recalibrated"]) == len(report["calibration"])


def test_loo_index_is_spread_evenly_and_distinct():
    for n, size in [(10, 3), (50000, 5000), (7, 7), (7, 100), (2, 1)]:
        idx = loo_index(n, size)
        assert len(idx) == min(n, size) and len(np.unique(idx)) == len(idx)
        assert idx[0] == 0 and (size < 2 or idx[-1] == n - 1)
        assert np.all(np.diff(idx) >= 1) and idx.max() < n


def test_isotonic_map_matches_scikit_learn():
    from sklearn.isotonic import IsotonicRegression

    rng = np.random.default_rng(3)
    x = rng.choice(np.linspace(0.1, 2.0, 60), size=400)  # many ties
    y = x**2 + rng.standard_normal(400) * 0.5
    knots, fit = isotonic_map(x, y)
    assert np.all(np.diff(knots) > 0) and np.all(np.diff(fit) >= -1e-12)
    oracle = IsotonicRegression(out_of_bounds="clip").fit(x, y)
    v = np.concatenate([rng.uniform(0.0, 2.5, 300), knots])
    np.testing.assert_allclose(np.interp(v, knots, fit), oracle.predict(v), atol=1e-10)
    # Pooled 50 to a knot: scikit-learn on the pools' means, weighted by their counts.
    x = rng.uniform(0.1, 2.0, 1030)
    y = x**2 + rng.standard_normal(1030) * 3.0  # noisy enough that pools get merged
    knots, fit = isotonic_map(x, y, group=50)
    pools = np.array_split(np.argsort(x), 20)  # 1030 // 50 pools of 51 or 52 points
    means = [y[p].mean() for p in pools]
    assert len(knots) == 20 and np.all(np.diff(knots) > 0)
    assert np.any(np.diff(means) < 0) and np.any(np.diff(fit) == 0)
    oracle = IsotonicRegression(out_of_bounds="clip").fit(
        [x[p].mean() for p in pools], means, sample_weight=[len(p) for p in pools]
    )
    np.testing.assert_allclose(np.interp(v, knots, fit), oracle.predict(v), atol=1e-10)


def test_recalibration_fixes_noise_that_grows_faster_than_the_variance(tmp_path, client):
    """Targets: a draw from the GP prior plus noise of variance 0.02 |x|^4, which the GP's one
    noise level cannot follow: realised / predicted runs from below 1 (small |x|) to above it.
    The map fitted on leave-one-out training points alone puts the test bins on the diagonal."""
    from nngp_dist.kernels import Spec

    rng = np.random.default_rng(8)
    n, m, c = 500, 400, 8
    arch = {"depth": 2, "weight_var": 1.6, "bias_var": 0.2}
    u = rng.standard_normal((n + m, 6))
    r = rng.uniform(0.3, 2.5, n + m)
    x = u / np.linalg.norm(u, axis=1, keepdims=True) * r[:, None]
    k = Spec(**arch).cross(x, x)
    f = np.linalg.cholesky(k + 1e-8 * np.eye(n + m)) @ rng.standard_normal((n + m, c))
    y = f + np.sqrt(0.02 * r**4)[:, None] * rng.standard_normal((n + m, c))
    np.savez(tmp_path / "d.npz", x_train=x[:n], y_train=y[:n], x_test=x[n:], y_test=y[n:])
    store = str(tmp_path / "k.zarr")
    jobs.kernel(
        store,
        dataset=f"npz:{tmp_path / 'd.npz'}",
        tile_size=128,
        client=client,
        progress=False,
        **arch,
    )
    jobs.solve(store, noise=1e-2, client=client, progress=False)
    report = jobs.predict(store, bins=4, client=client, progress=False)  # loo: every point
    assert report["loo"]["size"] == n
    raw = [b["mse"] / b["mean_variance"] for b in report["calibration"]]
    recal = [b["mse"] / b["mean_variance"] for b in report["calibration_recalibrated"]]
    assert max(raw) / min(raw) > 3, raw  # the raw variances are far off at both ends
    for ratio in recal:  # 100 test points x 8 columns per bin
        assert 1 / 1.3 < ratio < 1.3, recal
    v, raw_v = recalibrated_variance(store), predictive_variance(KernelStore.open(store))
    order = np.argsort(raw_v, kind="stable")
    assert np.all(np.diff(v[order]) >= 0)  # monotone in the raw variance: the same bins
    bins = [v[idx].mean() for idx in np.array_split(order, 4)]
    assert bins == pytest.approx([b["mean_variance"] for b in report["calibration_recalibrated"]])


def test_loo_size_zero_and_a_new_size(tmp_path, client):
    store = make_kernel(tmp_path, client, n=60, m=20, tile=16)
    jobs.solve(str(store), noise=1e-3, client=client, progress=False)
    report = jobs.predict(str(store), loo_size=0, client=client, progress=False)
    ks = KernelStore.open(str(store))
    assert report["loo"] is None and report["calibration_recalibrated"] is None
    assert report["loo_skipped"] == "--loo-size 0" and not ks.has(LOO_INDEX)
    assert ks.status()["stage"] == "done"
    report = jobs.predict(str(store), loo_size=25, client=client, progress=False)
    assert report["loo"]["size"] == 25 and len(KernelStore.open(str(store)).read(LOO_INDEX)) == 25
    with pytest.raises(UserError, match="--loo-size"):
        jobs.predict(str(store), loo_size=-1, client=client, progress=False)


def test_a_stopped_leave_one_out_resumes_and_a_bad_chunk_is_repaired(tmp_path, client):
    from nngp_dist.verify import verify

    store = str(tmp_path / "k.zarr")
    jobs.run(store, client=client, loo_size=120, **RUN)
    ks = KernelStore.open(store)
    mean, variance, done = ks.read(LOO_MEAN), ks.read(LOO_VARIANCE), ks.read(record(LOO))
    predicted = ks.read(record(PREDICT))
    assert len(done) >= 2
    # As a job killed in the last block leaves it: its record NaN, its data half written.
    ks = KernelStore.open(store, "r+")
    ks.array(record(LOO))[len(done) - 1] = np.nan
    ks.array(LOO_MEAN)[-1] = 0.0
    st = ks.status()
    assert st["stage"] == "predict"
    assert st["loo_blocks"] == {"done": len(done) - 1, "total": len(done)}
    shown = cli("status", "--store", store).stdout
    assert f"{len(done) - 1} / {len(done)} leave-one-out blocks" in shown, shown
    jobs.predict(store, loo_size=120, client=client, progress=False)
    ks = KernelStore.open(store)
    again = ks.read(record(LOO))
    assert np.array_equal(again[:-1], done[:-1]) and np.array_equal(ks.read(LOO_MEAN), mean)
    assert np.array_equal(ks.read(record(PREDICT)), predicted)  # the test points not redone
    flip(chunk(store, LOO_VARIANCE, 0))
    os.remove(chunk(store, LOO_INDEX, 1))  # an integer array: its fill, -1, marks the hole
    r = verify(store, repair=True)
    found = sorted((p["array"], p["tile"], p["problem"][:16]) for p in r["problems"])
    assert found == [(LOO_INDEX, [1], "it is missing, t"), (LOO_VARIANCE, [0], "it does not deco")]
    assert r["rerun"] == ["predict"] and KernelStore.open(store).status()["stage"] == "predict"
    report = jobs.run(store, client=client, loo_size=120, **RUN)
    ks = KernelStore.open(store)
    assert np.array_equal(ks.read(LOO_VARIANCE), variance) and report["loo"]["size"] == 120
    assert ks.status()["stage"] == "done" and verify(store)["problems"] == []


def test_a_failing_leave_one_out_task_stops_predict_and_a_rerun_resumes(tmp_path, client):
    store = str(tmp_path / "k.zarr")
    jobs.run(store, client=client, loo_size=120, **RUN)  # 3 factor blocks of 100
    ks = KernelStore.open(store, "r+")
    last = len(ks.read(record(LOO))) - 1
    ks.array(record(LOO))[last] = np.nan
    path = chunk(store, CHOL, 2, 2)  # read by every leave-one-out block
    good = open(path, "rb").read()
    flip(path)
    with pytest.raises(CorruptStore, match=r"array chol, tile \(2, 2\)"):
        jobs.predict(store, loo_size=120, client=client, progress=False)
    assert KernelStore.open(store).status()["stage"] == "predict"
    open(path, "wb").write(good)
    report = jobs.predict(store, loo_size=120, client=client, progress=False)
    assert report["loo"]["size"] == 120 and KernelStore.open(store).status()["stage"] == "done"


def test_leave_one_out_arrays_kept_across_block_sizes_and_by_the_estimators(tmp_path, client):
    store = str(tmp_path / "k.zarr")
    jobs.run(store, client=client, loo_size=120, **RUN)
    ks = KernelStore.open(store, "r+")
    index, done, mean = ks.read(LOO_INDEX), ks.read(record(LOO)), ks.read(LOO_MEAN)
    ks.prepare_loo(index, 7)  # complete: kept whatever the block a new run would choose
    assert np.array_equal(ks.read(record(LOO)), done) and ks.meta["loo_block"] != 7
    report = jobs.predict(store, loo_size=None, client=client, progress=False)  # estimators
    assert report["loo_skipped"] == "not asked for"
    assert np.array_equal(KernelStore.open(store).read(LOO_MEAN), mean)
    ks = KernelStore.open(store, "r+")
    ks.array(record(LOO))[0] = np.nan
    ks.prepare_loo(index, 7)  # incomplete, made with another block: made again
    assert ks.meta["loo_block"] == 7 and np.isnan(ks.read(record(LOO))).all()
    assert len(ks.read(record(LOO))) == -(-120 // 7) and ks.status()["stage"] == "predict"
    jobs.solve(store, noise=2e-3, client=client, progress=False)  # a new solution: none left
    assert not KernelStore.open(store).has(LOO_INDEX)
