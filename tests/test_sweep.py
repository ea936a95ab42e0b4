"""The sweep (model selection on a validation split) and the figures, against SciPy solves."""

import json

import numpy as np
import pytest
import scipy.linalg as sl
from click.testing import CliRunner

import nngp_dist
from nngp_dist import UserError, datasets, jobs
from nngp_dist.cli import main
from nngp_dist.figures import figures, learning_curve
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


def test_figures_write_pngs(tmp_path, finished_store):
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
    r = figures(str(finished_store), str(tmp_path / "png"), sweep=sw["files"]["json"], sample=90)
    assert set(r["files"]) == {"calibration", "kernel", "learning_curve", "sweep"}
    for path in r["files"].values():
        img = mpimg.imread(path)
        assert img.ndim == 3 and img.shape[0] > 100 and img.std() > 0  # a real picture


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
