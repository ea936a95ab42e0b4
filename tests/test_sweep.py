"""The sweep (model selection on a validation split) and the figures, against SciPy solves."""

import json

import numpy as np
import pytest
import scipy.linalg as sl
from click.testing import CliRunner

import nngp_dist
from nngp_dist import UserError, datasets, jobs
from nngp_dist.cli import main
from nngp_dist.figures import binomial_se, figures, learning_curve, store_caption, ties
from nngp_dist.kernels import Spec
from nngp_dist.predict import targets
from nngp_dist.storage import KernelStore
from nngp_dist.sweep import POINTS_FILE, parse_depths, parse_grid, sweep

GRID = {"depths": "1-3", "weight_vars": "1.2,2", "bias_vars": "0,0.3", "noises": "1e-3,1e-1"}


def scores(rows):
    """The rows without their timings."""
    return [{k: v for k, v in r.items() if k != "point_seconds"} for r in rows]


def test_parse_grid_and_depths():
    assert parse_grid("w", "1:2:3") == [1.0, 1.5, 2.0]
    assert parse_grid("w", "0.5, 1") == [0.5, 1.0]
    assert parse_depths("1-3,5") == [1, 2, 3, 5]
    for bad in ("", "a,b", "1:2", "1,1"):
        with pytest.raises(UserError):
            parse_grid("w", bad)
    for bad in ("x", "3-1", "1,1", "-1"):
        with pytest.raises(UserError):
            parse_depths(bad)


def oracle(ds, n, v, depth, w, b, noise):
    """The same model fitted directly: the kernel of one spec, a dense SciPy solve."""
    x = ds.x_train.reshape(len(ds.x_train), -1)
    xf, xv = x[:n], x[len(x) - v :]
    yf, yv = ds.y_train[:n], ds.y_train[len(x) - v :]
    spec = Spec(depth=depth, weight_var=w, bias_var=b)
    k = spec.cross(xf, xf)
    k += noise * np.mean(np.diag(k)) * np.eye(n)
    c = int(ds.y_train.max()) + 1
    mean = spec.cross(xv, xf) @ sl.solve(k, targets(yf, c), assume_a="pos")
    return float((mean.argmax(1) == yv).mean()), float(((mean - targets(yv, c)) ** 2).mean())


def test_sweep_matches_direct_fits_and_resumes(tmp_path, client):
    out = tmp_path / "sw"
    r = sweep(
        str(out),
        dataset="demo",
        train_size=300,
        validation_size=200,
        client=client,
        progress=False,
        **GRID,
    )
    assert r["grid_points"] == r["grid_points_computed"] == 4
    assert len(r["rows"]) == 4 * 3 * 2
    ds = datasets.load("demo")
    for row in r["rows"][::5]:
        acc, mse = oracle(
            ds, 300, 200, row["depth"], row["weight_var"], row["bias_var"], row["noise"]
        )
        assert row["validation_accuracy"] == pytest.approx(acc, abs=1e-12)
        assert row["validation_mse"] == pytest.approx(mse, rel=1e-9)
    best = r["best"]
    assert best["validation_accuracy"] == max(x["validation_accuracy"] for x in r["rows"])
    for name in ("csv", "json", "heatmap"):
        assert (out / r["files"][name].split("/")[-1]).stat().st_size > 0
    assert json.loads((out / "sweep.json").read_text())["best"] == best

    # A killed sweep: one finished point on disk, one line cut short. Only 3 are redone.
    lines = (out / POINTS_FILE).read_text().splitlines()
    (out / POINTS_FILE).write_text(lines[0] + "\n" + lines[1][:40])
    r2 = sweep(
        str(out),
        dataset="demo",
        train_size=300,
        validation_size=200,
        client=client,
        progress=False,
        **GRID,
    )
    assert r2["grid_points_computed"] == 3
    assert scores(r2["rows"]) == scores(r["rows"])
    r4 = sweep(
        str(out),
        dataset="demo",
        train_size=300,
        validation_size=200,
        client=client,
        progress=False,
        **GRID,
    )
    assert r4["grid_points_computed"] == 0 and scores(r4["rows"]) == scores(r["rows"])
    # Other settings (here the split) are never mixed with these results.
    r3 = sweep(
        str(out),
        dataset="demo",
        train_size=250,
        validation_size=200,
        client=client,
        progress=False,
        **{**GRID, "weight_vars": "2", "bias_vars": "0.3"},
    )
    assert r3["grid_points_computed"] == 1


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"train_size": 1900, "validation_size": 200}, "at most"),
        ({"activation": "nope"}, "nope"),
        ({"heatmap_depth": 7}, "--heatmap-depth"),
        ({"noises": "0,1e-3"}, "positive"),
        ({"weight_vars": "0,1"}, "weight_var"),
    ],
)
def test_sweep_bad_input_fails_before_any_work(tmp_path, kw, message):
    out = tmp_path / "sw"
    args = {"dataset": "demo", "train_size": 100, "validation_size": 50, **GRID, **kw}
    with pytest.raises(UserError, match=message):
        sweep(str(out), progress=False, **args)
    assert not out.exists()


def test_sweep_cli_exit_codes(tmp_path):
    res = CliRunner().invoke(main, ["sweep", "--out", str(tmp_path / "s"), "--depth", "x"])
    assert res.exit_code == 2 and "--depth" in res.output


@pytest.fixture(scope="module")
def finished_store(tmp_path_factory, client):
    store = tmp_path_factory.mktemp("fig") / "k.zarr"
    jobs.run(
        str(store),
        dataset="demo",
        train_size=300,
        test_size=120,
        tile_size=64,
        depth=2,
        weight_var=1.6,
        bias_var=0.2,
        noise=1e-2,
        client=client,
        progress=False,
    )
    return store


def test_learning_curve_against_scipy(finished_store):
    ks = KernelStore.open(str(finished_store))
    rows = learning_curve(ks, [50, 130, 300, 1000])
    assert [r["n_train"] for r in rows] == [50, 130, 300]
    ds = nngp_dist.open_store(str(finished_store))
    k, kt = ds.k_train_train.values, ds.k_test_train.values
    s = ks.meta["solve"]["noise_abs"]
    y, yt = ds.y_train.values, ds.y_test.values
    c = int(max(y.max(), yt.max())) + 1
    for r in rows:
        n = r["n_train"]
        mean = kt[:, :n] @ sl.solve(k[:n, :n] + s * np.eye(n), targets(y[:n], c), assume_a="pos")
        assert r["accuracy"] == pytest.approx(float((mean.argmax(1) == yt).mean()), abs=1e-12)
        assert r["mse"] == pytest.approx(float(((mean - targets(yt, c)) ** 2).mean()), rel=1e-8)


def test_figures_write_every_png(tmp_path, finished_store):
    import matplotlib.image as mpimg

    sw = sweep(
        str(tmp_path / "sw"),
        dataset="demo",
        train_size=100,
        validation_size=50,
        progress=False,
        scheduler="synchronous",
        **GRID,
    )
    out = tmp_path / "png"
    res = CliRunner().invoke(
        main,
        ["figures", "--store", str(finished_store), "--out", str(out), "--sample", "90"]
        + ["--sweep", sw["files"]["json"], "--sizes", "100,300", "--bins", "6"],
    )
    assert res.exit_code == 0, res.output
    best = sw["best"]["depth"]
    names = {"calibration.png", "kernel.png", "learning-curve.png", f"sweep-depth{best}.png"}
    assert {p.name for p in out.iterdir()} == names | {"learning-curve.json"}
    for name in names:
        img = mpimg.imread(out / name)
        assert img.ndim == 3 and img.shape[0] > 100 and img.std() > 0  # a real picture
    head = "calibration (predicted variance, realised mse, realised / predicted, and recalibrated"
    assert head in res.output  # the store has leave-one-out predictions: both columns
    assert len(json.loads((out / "learning-curve.json").read_text())) == 2


def test_calibration_uses_the_fitted_output_scale(tmp_path, finished_store):
    """The calibration bins against a direct GP: the kernel of the spec, a dense solve, the
    maximum-likelihood scale tr(T' (K + s I)^-1 T) / (N C), and s2 (k** - k*' (K + s I)^-1 k* + s)
    as the targets' predictive variance; realised error from the direct posterior mean."""
    r = figures(str(finished_store), str(tmp_path / "png"), sample=40, sizes=[300], bins=4)
    ds = datasets.load("demo", train_size=300, test_size=120).flattened()
    spec = Spec(depth=2, weight_var=1.6, bias_var=0.2)
    k = spec.cross(ds.x_train, ds.x_train)
    noise = 1e-2 * np.mean(np.diag(k))
    t = targets(ds.y_train, 10)
    kt = spec.cross(ds.x_test, ds.x_train)
    c = sl.cho_factor(k + noise * np.eye(len(k)))
    s2 = float((t * sl.cho_solve(c, t)).sum() / t.size)
    var = s2 * (np.diag(spec.cross(ds.x_test, ds.x_test)) - (kt * sl.cho_solve(c, kt.T).T).sum(1))
    var += s2 * noise
    sq = ((kt @ sl.cho_solve(c, t) - targets(ds.y_test, 10)) ** 2).mean(1)
    order = np.argsort(var)
    bins = np.array_split(order, 4)
    cal = r["calibration"]
    assert [b["count"] for b in cal] == [len(i) for i in bins]
    for b, idx in zip(cal, bins, strict=True):
        assert b["mean_variance"] == pytest.approx(var[idx].mean(), rel=1e-6)
        assert b["mse"] == pytest.approx(sq[idx].mean(), rel=1e-6)
        assert b["ratio"] == pytest.approx(sq[idx].mean() / var[idx].mean(), rel=1e-6)


def test_learning_curve_standard_errors(finished_store):
    rows = learning_curve(KernelStore.open(str(finished_store)), [300])
    (r,) = rows
    m = 120
    assert r["accuracy_se"] == pytest.approx(np.sqrt(r["accuracy"] * (1 - r["accuracy"]) / m))
    assert 0 < r["mse_se"] < r["mse"]


def test_ties_against_a_hand_made_grid():
    # best 0.85 on 10,000 points: standard error sqrt(0.85 * 0.15 / 1e4) = 0.0035707
    grid = np.array([[0.80, 0.8465, np.nan], [0.846, 0.85, 0.8480]])
    assert binomial_se(0.85, 10_000) == pytest.approx(0.0035707, abs=1e-7)
    expect = np.array([[False, True, False], [False, True, True]])
    np.testing.assert_array_equal(ties(grid, 10_000), expect)
    # on 100 points the standard error is 0.0357: all but 0.80 (below 0.8143) and the empty cell
    expect = np.array([[False, True, False], [True, True, True]])
    np.testing.assert_array_equal(ties(grid, 100), expect)


def test_captions_and_class_names(finished_store):
    meta = KernelStore.open(str(finished_store)).meta
    caption = store_caption(meta)
    for part in ("demo", "N = 300 train / 120 test", "fc depth 2 relu NNGP", "1.6", "0.2"):
        assert part in caption
    assert caption.endswith("relative noise 0.01")
    meta["solve"] = {**meta["solve"], "selection": {"select_by": "lml", "chosen": 0.01}}
    assert store_caption(meta).endswith("relative noise 0.01 (chosen by lml)")
    assert datasets.class_names("fashion-mnist", [0, 9, 6]) == [
        "T-shirt/top",
        "Ankle boot",
        "Shirt",
    ]
    assert datasets.class_names("demo", [1]) == ["Trouser"]
    assert datasets.class_names("npz:x.npz", [3]) == ["class 3"]


def test_figures_refuse_unfinished_store(tmp_path, client):
    store = tmp_path / "k.zarr"
    jobs.kernel(
        str(store), dataset="demo", train_size=60, test_size=20, client=client, progress=False
    )
    res = CliRunner().invoke(main, ["figures", "--store", str(store), "--out", str(tmp_path)])
    assert res.exit_code == 2 and "finished run" in res.output


def test_default_validation_split_fits_the_dataset_and_errors_name_what_was_given():
    from nngp_dist.sweep import _split

    ds = datasets.load("demo").flattened()  # 2000 training images
    split = _split(ds, "demo", None, None)  # the CLI's defaults
    assert (len(split.x_fit), len(split.x_val)) == (1600, 400)
    with pytest.raises(UserError, match=r"--validation-size 10000: .* at most the 2000"):
        _split(ds, "demo", None, 10000)
    with pytest.raises(UserError, match="--validation-size 400 .default. with --train-size 1900"):
        _split(ds, "demo", 1900, None)
