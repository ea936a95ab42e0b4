"""NNGPRegressor / NNGPClassifier against the GP posterior computed directly with SciPy."""

import numpy as np
import pytest
import scipy.linalg as sl

from nngp_dist import UserError, datasets, jobs
from nngp_dist.estimator import NNGPClassifier, NNGPRegressor
from nngp_dist.kernels import Spec
from nngp_dist.predict import targets
from nngp_dist.storage import KernelStore

ARCH = {"depth": 2, "weight_var": 1.6, "bias_var": 0.2}


def direct(x, t, xs, noise, arch=ARCH):
    """The GP posterior by SciPy from the closed-form kernel: the mean, the targets' predictive
    standard deviation sqrt(s2 (var + s)) and s2.

    s2 is the prior's scale by maximum likelihood: for T ~ N(0, s2 A) column by column
    (A = K + s I, N x C targets), log p = -NC/2 log(2 pi s2) - 1/2 log det A^C
    - tr(T' A^-1 T) / (2 s2), whose derivative in s2 vanishes at s2 = tr(T' A^-1 T) / (N C).
    """
    spec = Spec(**arch)
    k = spec.cross(x, x)
    s = noise * np.mean(np.diag(k))  # the noise is relative to the mean training diagonal
    factor = sl.cho_factor(k + s * np.eye(len(x)), lower=True)
    alpha = sl.cho_solve(factor, t)
    s2 = np.trace(t.T @ alpha) / t.size
    ks = spec.cross(xs, x)
    var = np.diag(spec.cross(xs, xs)) - (ks.T * sl.cho_solve(factor, ks.T)).sum(0)
    return ks @ alpha, np.sqrt(s2 * (np.maximum(var, 0) + s)), s2


def one_hot(labels, classes):
    return targets(np.searchsorted(classes, labels))


@pytest.fixture(scope="module")
def data():
    ds = datasets.load("demo", train_size=150, test_size=60)
    return ds.x_train.reshape(150, -1), ds.y_train, ds.x_test.reshape(60, -1), ds.y_test


def test_regressor_matches_scipy_and_reuses_the_training_kernel(tmp_path, data, client):
    x, y, xs, _ = data
    rng = np.random.default_rng(0)
    t = np.sin(x[:, :5].sum(1)) + 0.1 * rng.standard_normal(len(x))
    store = str(tmp_path / "est.zarr")
    est = NNGPRegressor(noise=1e-2, tile_size=64, store=store, client=client, **ARCH)
    est.fit(x, t)
    mean, std = est.predict(xs, return_std=True)
    ref_mean, ref_std, s2 = direct(x, t[:, None], xs, 1e-2)
    assert est.output_scale_ == pytest.approx(s2, rel=1e-8)
    assert not 0.5 < s2 < 2  # the scale matters here: a std without it would fail below
    np.testing.assert_allclose(mean, ref_mean[:, 0], rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(std, ref_std, rtol=1e-6)
    # A second test set: the training tiles are not recomputed (their records are unchanged).
    before = KernelStore.open(store).tile_seconds("k_train_train")
    mean2 = est.predict(x[:20])
    np.testing.assert_allclose(
        KernelStore.open(store).tile_seconds("k_train_train"), before, equal_nan=True
    )
    np.testing.assert_allclose(mean2, direct(x, t[:, None], x[:20], 1e-2)[0][:, 0], rtol=1e-8)
    assert est.score(xs, ref_mean[:, 0]) == pytest.approx(1.0)
    # Refit on the same data resumes the named store; other data there is refused.
    est.fit(x, t)
    with pytest.raises(UserError, match="different run") as err:
        NNGPRegressor(store=store, client=client, **ARCH).fit(x[:100], t[:100])
    assert "fingerprint" in str(err.value) and "another store" in str(err.value)
    assert "--" not in str(err.value)  # no command-line flags in a Python API's message


def test_classifier_labels_scores_and_params(data, client):
    x, y, xs, ys = data
    labels = np.array(list("abcdefghij"))[y]  # any label type
    clf = NNGPClassifier(noise=1e-2, client=client, **ARCH).fit(x, labels)
    assert list(clf.classes_) == sorted(set(labels))
    ref, ref_std, s2 = direct(x, targets(np.searchsorted(clf.classes_, labels)), xs, 1e-2)
    assert clf.output_scale_ == pytest.approx(s2, rel=1e-8)
    np.testing.assert_allclose(clf.decision_function(xs), ref, rtol=1e-8, atol=1e-10)
    pred, std = clf.predict(xs, return_std=True)
    assert (pred == clf.classes_[ref.argmax(1)]).all()
    np.testing.assert_allclose(std, ref_std, rtol=1e-6)
    acc = clf.score(xs, np.array(list("abcdefghij"))[ys])
    assert acc == pytest.approx(float((ref.argmax(1) == ys).mean()))
    assert acc > 0.5
    assert clf.get_params()["depth"] == 2
    assert clf.set_params(depth=4).depth == 4
    with pytest.raises(ValueError, match="unknown parameter"):
        clf.set_params(width=3)
    assert "depth=4" in repr(clf)


def test_bad_input(data, client):
    x, y, xs, _ = data
    with pytest.raises(UserError, match="not fitted"):
        NNGPClassifier(client=client).predict(xs)
    bad = x.copy()
    bad[3, 4] = np.nan
    with pytest.raises(UserError, match="NaN"):
        NNGPClassifier(client=client).fit(bad, y)
    with pytest.raises(UserError, match="examples"):
        NNGPClassifier(client=client).fit(x, y[:-1])
    clf = NNGPClassifier(noise=1e-2, client=client, **ARCH).fit(x, y)
    with pytest.raises(UserError, match="shape"):
        clf.predict(xs[:, :-1])


def test_interrupted_test_replacement_is_never_resumed(tmp_path, data, client):
    x, y, xs, ys = data
    store = str(tmp_path / "k.zarr")
    first = datasets.from_arrays("a", x, y, xs[:10], ys[:10])
    second = datasets.from_arrays("a", x, y, xs[10:30], ys[10:30])
    jobs.kernel(store, dataset=first, client=client, progress=False, **ARCH)
    KernelStore.open(store, "r+").update_meta(replacing_test=True)  # killed mid-replacement
    with pytest.raises(UserError, match="different run"):
        jobs.kernel(store, dataset=first, client=client, progress=False, **ARCH)
    r = jobs.kernel(store, dataset=second, replace_test=True, client=client, progress=False,
                    **ARCH)  # fmt: skip
    assert r["action"] == "replace-test" and r["tiles_computed"] == 2  # the test tiles
    ks = KernelStore.open(store)
    assert ks.status()["stage"] == "kernel-done" and "replacing_test" not in ks.meta
    np.testing.assert_allclose(ks.group["k_test_train"][...], Spec(**ARCH).cross(xs[10:30], x),
                               rtol=1e-12)  # fmt: skip


def test_conv_estimator_keeps_image_shapes(client):
    ds = datasets.load("demo", train_size=60, test_size=20)
    conv = {"arch": "conv", "depth": 1, "weight_var": 1.5, "bias_var": 0.1, "filter_size": 5}
    clf = NNGPClassifier(noise=1e-2, client=client, **conv).fit(ds.x_train, ds.y_train)
    spec = Spec(image_shape=(28, 28, 1), **conv)
    x, xs = ds.x_train.reshape(60, -1), ds.x_test.reshape(20, -1)
    k = spec.cross(x, x) + 1e-2 * np.mean(spec.diag(x)) * np.eye(60)
    ref = spec.cross(xs, x) @ sl.solve(k, targets(np.searchsorted(clf.classes_, ds.y_train)))
    np.testing.assert_allclose(clf.decision_function(ds.x_test), ref, rtol=1e-8, atol=1e-10)
    with pytest.raises(UserError, match="shape"):
        clf.predict(ds.x_test.reshape(20, -1))
