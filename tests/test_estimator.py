"""NNGPRegressor / NNGPClassifier against the GP posterior computed directly with SciPy, and as
scikit-learn estimators (when scikit-learn is installed; without it, in a subprocess)."""

import contextlib
import gc
import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import scipy.linalg as sl
from distributed import default_client

from nngp_dist import UserError, cluster, datasets, estimator, jobs
from nngp_dist.estimator import NNGPClassifier, NNGPRegressor, NotFittedError
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


@pytest.fixture
def no_new_cluster(monkeypatch):
    """Fail if an estimator starts a cluster or connects to a scheduler of its own."""

    def refuse(*args, **kwargs):
        raise AssertionError("a new cluster was started instead of the shared client")

    monkeypatch.setattr(cluster, "connect", refuse)  # jobs connect through cluster.with_client


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
    # Several outputs: one mean per output, one standard deviation per example (s2 is pooled).
    t2 = np.stack([t, 3 * np.cos(x[:, :3].sum(1))], axis=1)
    mean2, std2 = (
        NNGPRegressor(noise=1e-2, client=client, **ARCH).fit(x, t2).predict(xs, return_std=True)
    )
    ref_mean2, ref_std2, _ = direct(x, t2, xs, 1e-2)
    np.testing.assert_allclose(mean2, ref_mean2, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(std2, ref_std2, rtol=1e-6)
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
    ref, ref_std, s2 = direct(x, one_hot(labels, clf.classes_), xs, 1e-2)
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
    with pytest.raises(ValueError, match="parameter 'width'"):
        clf.set_params(width=3)
    assert "depth=4" in repr(clf)
    # Two classes: one decision column, positive for the second class (scikit-learn's way).
    two = y < 2
    binary = NNGPClassifier(noise=1e-2, client=client, **ARCH).fit(x[two], y[two])
    ref2 = direct(x[two], targets(y[two]), xs, 1e-2)[0]
    np.testing.assert_allclose(
        binary.decision_function(xs), ref2[:, 1] - ref2[:, 0], rtol=1e-8, atol=1e-10
    )


def test_bad_input(data, client):
    x, y, xs, _ = data
    with pytest.raises(NotFittedError, match="not fitted"):
        NNGPClassifier(client=client).predict(xs)
    assert issubclass(NotFittedError, UserError)
    bad = x.copy()
    bad[3, 4] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        NNGPClassifier(client=client).fit(bad, y)
    with pytest.raises(ValueError, match="inconsistent numbers of samples"):
        NNGPClassifier(client=client).fit(x, y[:-1])
    with pytest.raises(ValueError, match="Unknown label type"):
        NNGPClassifier(client=client).fit(x, y + 0.5)
    clf = NNGPClassifier(noise=1e-2, client=client, **ARCH).fit(x, y)
    with pytest.raises(ValueError, match="783 features, but NNGPClassifier is expecting 784"):
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
    r = jobs.kernel(store, dataset=second, replace_test=True, client=client, progress=False, **ARCH)
    assert r["action"] == "replace-test" and r["tiles_computed"] == 2  # the test tiles
    ks = KernelStore.open(store)
    assert ks.status()["stage"] == "kernel-done" and "replacing_test" not in ks.meta
    np.testing.assert_allclose(
        ks.read("k_test_train"), Spec(**ARCH).cross(xs[10:30], x), rtol=1e-12
    )


def test_conv_estimator_keeps_image_shapes(client):
    ds = datasets.load("demo", train_size=60, test_size=20)
    conv = {"arch": "conv", "depth": 1, "weight_var": 1.5, "bias_var": 0.1, "filter_size": 5}
    clf = NNGPClassifier(noise=1e-2, client=client, **conv).fit(ds.x_train, ds.y_train)
    assert clf.n_features_in_ == 784 and clf.image_shape_ == (28, 28)
    spec = Spec(image_shape=(28, 28, 1), **conv)
    x, xs = ds.x_train.reshape(60, -1), ds.x_test.reshape(20, -1)
    k = spec.cross(x, x) + 1e-2 * np.mean(spec.diag(x)) * np.eye(60)
    ref = spec.cross(xs, x) @ sl.solve(k, targets(np.searchsorted(clf.classes_, ds.y_train)))
    np.testing.assert_allclose(clf.decision_function(ds.x_test), ref, rtol=1e-8, atol=1e-10)
    with pytest.raises(UserError, match="shape"):
        clf.predict(ds.x_test.reshape(20, -1))


def test_default_client_pickle_and_copies(tmp_path, data, client, no_new_cluster, monkeypatch):
    """Without client= the estimators use the default client; copies never carry a client, and
    a pickled fitted model predicts the same after its original (and store) is gone."""
    x, y, xs, _ = data
    x, y, xs = x[:40], y[:40], xs[:10]
    assert default_client() is client
    solves = []
    solve = jobs.solve
    monkeypatch.setattr(jobs, "solve", lambda *a, **k: solves.append(k["noise"]) or solve(*a, **k))
    ref, ref_std, _ = direct(x, one_hot(y, np.unique(y)), xs, 1e-2)

    unfitted = NNGPClassifier(noise=1e-2, client=client, **ARCH)
    copy = pickle.loads(pickle.dumps(unfitted))
    assert copy.client is None and copy.get_params() == {**unfitted.get_params(), "client": None}

    clf = NNGPClassifier(noise=1e-2, **ARCH).fit(x, y)  # the default client
    np.testing.assert_allclose(clf.decision_function(xs), ref, rtol=1e-8, atol=1e-10)
    fitted = NNGPClassifier(noise=1e-2, client=client, **ARCH).fit(x, y)
    assert solves == [1e-2] * 2
    folder = os.path.dirname(fitted.store_)
    blob = pickle.dumps(fitted)
    del fitted, clf
    gc.collect()
    assert not os.path.exists(folder)  # the temporary store went with its estimator
    copy = pickle.loads(blob)
    assert copy.client is None and copy.store_ is None
    labels, std = copy.predict(xs, return_std=True)  # recomputed in a store of its own
    assert (labels == np.unique(y)[ref.argmax(1)]).all()
    np.testing.assert_allclose(std, ref_std, rtol=1e-6)
    np.testing.assert_allclose(copy.decision_function(xs), ref, rtol=1e-8, atol=1e-10)
    assert solves == [1e-2] * 3  # solved once, for the first prediction
    own = os.path.dirname(copy.store_)
    assert os.path.isdir(own) and own != folder
    del copy
    gc.collect()
    assert not os.path.exists(own)

    # On a named store the copy reads the store: the training kernel is not recomputed.
    store = str(tmp_path / "named.zarr")
    named = NNGPClassifier(noise=1e-2, store=store, client=client, **ARCH).fit(x, y)
    before = KernelStore.open(store).tile_seconds("k_train_train")
    copy = pickle.loads(pickle.dumps(named))
    np.testing.assert_allclose(copy.decision_function(xs), ref, rtol=1e-8, atol=1e-10)
    after = KernelStore.open(store).tile_seconds("k_train_train")
    np.testing.assert_array_equal(after, before)
    assert solves == [1e-2] * 4  # the fit's solve, none for the copy
    # A store solved again since (another noise) is solved again at the model's noise.
    jobs.solve(store, noise=0.05, client=client, progress=False)
    np.testing.assert_allclose(named.decision_function(xs), ref, rtol=1e-8, atol=1e-10)
    assert KernelStore.open(store).meta["solve"]["noise"] == 1e-2
    assert solves == [1e-2] * 4 + [0.05, 1e-2]


def test_sklearn_clone_pipeline_cross_validation_and_grid_search(data, client, no_new_cluster):
    sklearn = pytest.importorskip("sklearn")
    from sklearn.base import clone, is_classifier, is_regressor
    from sklearn.model_selection import GridSearchCV, StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y, xs, _ = data
    x, y, xs = x[:60], y[:60], xs[:10]
    base = NNGPClassifier(noise=1e-2, client=client, **ARCH)
    assert isinstance(base, sklearn.base.BaseEstimator)
    assert is_classifier(base) and is_regressor(NNGPRegressor())
    twin = clone(base)
    assert twin.client is client and twin.get_params() == base.get_params()
    fitted = clone(base).fit(x, y)
    assert clone(fitted).client is client and not hasattr(clone(fitted), "solve_")

    pipe = make_pipeline(StandardScaler(), NNGPClassifier(noise=1e-2, **ARCH))
    assert is_classifier(pipe)
    scaler = StandardScaler().fit(x)
    ref = direct(scaler.transform(x), one_hot(y, np.unique(y)), scaler.transform(xs), 1e-2)[0]
    np.testing.assert_allclose(pipe.fit(x, y).decision_function(xs), ref, rtol=1e-8, atol=1e-10)

    def accuracy(train, test, noise, arch):
        classes = np.unique(y[train])
        mean = direct(x[train], one_hot(y[train], classes), x[test], noise, arch)[0]
        return float((classes[mean.argmax(1)] == y[test]).mean())

    folds = list(StratifiedKFold(3).split(x, y))
    scores = cross_val_score(NNGPClassifier(noise=1e-2, **ARCH), x, y, cv=3)
    np.testing.assert_allclose(scores, [accuracy(a, b, 1e-2, ARCH) for a, b in folds])

    grid = {"depth": [1, 3], "noise": [1e-3, 0.05]}
    search = GridSearchCV(NNGPClassifier(**ARCH), grid, cv=2, error_score="raise").fit(x, y)
    folds = list(StratifiedKFold(2).split(x, y))
    for params, score in zip(search.cv_results_["params"], search.cv_results_["mean_test_score"]):
        arch = {**ARCH, "depth": params["depth"]}
        expect = np.mean([accuracy(a, b, params["noise"], arch) for a, b in folds])
        assert score == pytest.approx(expect), params
    best = search.cv_results_["params"][int(np.argmin(search.cv_results_["rank_test_score"]))]
    assert search.best_params_ == best and search.best_estimator_.depth == best["depth"]
    assert search.best_estimator_.predict(xs).shape == (10,)


@pytest.mark.parametrize("cls", [NNGPClassifier, NNGPRegressor])
def test_check_estimator(cls, client):
    """scikit-learn's estimator checks, run on the default client (the module's `client`)."""
    pytest.importorskip("sklearn")
    from sklearn.utils.estimator_checks import check_estimator

    assert default_client() is client
    # No check is marked as an expected failure; array API input is skipped by scikit-learn
    # itself unless SCIPY_ARRAY_API=1 (the estimators take NumPy arrays only). With client=
    # given, see CLIENT_CANNOT_COPY below.
    results = check_estimator(cls(), on_fail=None, on_skip=None)
    failed = [f"{r['check_name']}: {r['exception']!r}" for r in results if r["status"] == "failed"]
    assert not failed, "\n".join(failed)
    skipped = {r["check_name"] for r in results if r["status"] == "skipped"}
    assert skipped <= {"check_array_api_input"}, skipped
    assert sum(r["status"] == "passed" for r in results) > 40


def test_where_the_tiles_run(data, client, monkeypatch):
    """client=, else scheduler= or workers= (a cluster for the call), else the default client,
    else (none) a cluster for the call: one per fit or predict, for all of its jobs."""
    x, y, xs, _ = data
    calls = []

    @contextlib.contextmanager
    def connect(scheduler=None, *, workers=None, memory_limit=None):
        calls.append((scheduler, workers, memory_limit))
        yield client

    def with_client(fn, client=None, *args, **kwargs):
        assert client is not None, "a job connected on its own"
        return fn(client)

    monkeypatch.setattr(cluster, "connect", connect)
    monkeypatch.setattr(jobs, "with_client", with_client)  # the estimators connect once per call
    reg = NNGPRegressor(noise=1e-2, workers=1, memory_limit="1GB", **ARCH).fit(x[:30], x[:30, 0])
    reg.predict(xs[:5])
    assert calls == [(None, 1, "1GB")] * 2  # workers= given: not the default client
    NNGPRegressor(scheduler="synchronous", **ARCH).fit(x[:30], x[:30, 0])
    assert calls[2:] == [(None, None, None)]  # synchronous: the solver needs a cluster
    NNGPRegressor(noise=1e-2, **ARCH).fit(x[:30], x[:30, 0])
    assert len(calls) == 3  # the default client
    monkeypatch.setattr(estimator, "_default_client", lambda: None)
    NNGPRegressor(noise=1e-2, **ARCH).fit(x[:30], x[:30, 0])
    assert calls[3:] == [(None, None, None)]
    NNGPRegressor(noise=1e-2, client=client, **ARCH).fit(x[:30], x[:30, 0])
    assert len(calls) == 4


# With client= given, two checks cannot pass: they deep-copy or hash the parameters, and a
# distributed.Client cannot be copied (it holds asyncio tasks). check_estimator passes with the
# default client (above), which is how to use the estimators in such tools.
CLIENT_CANNOT_COPY = {
    "check_estimators_overwrite_params": "deep-copies the parameters to compare them after fit",
    "check_set_params": "deep-copies the parameters to set them back",
}


def test_checks_with_an_explicit_client(client):
    pytest.importorskip("sklearn")
    from sklearn.utils.estimator_checks import estimator_checks_generator

    wanted = {
        "check_estimator_cloneable",
        "check_estimators_pickle",
        "check_estimator_repr",
        "check_get_params_invariance",
        "check_dont_overwrite_parameters",
        *CLIENT_CANNOT_COPY,
    }
    ran = set()
    for est, check in estimator_checks_generator(NNGPClassifier(client=client), legacy=True):
        name = getattr(check, "func", check).__name__
        if name not in wanted:
            continue
        ran.add(name)
        if name in CLIENT_CANNOT_COPY:
            with pytest.raises(TypeError, match="cannot pickle"):
                check(est)
        else:
            check(est)
    assert ran == wanted


FALLBACK = """
import importlib.abc, pickle, sys

class NoSklearn(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "sklearn" or name.startswith("sklearn."):
            raise ImportError(f"{name} is blocked for this test")

sys.meta_path.insert(0, NoSklearn())

import numpy as np
import scipy.linalg as sl
from distributed import Client, LocalCluster

from nngp_dist import estimator
from nngp_dist.estimator import NNGPClassifier, NNGPRegressor, NotFittedError
from nngp_dist.kernels import Spec

if __name__ == "__main__":
    assert not estimator.SKLEARN and not any(m.startswith("sklearn") for m in sys.modules)
    rng = np.random.default_rng(1)
    x, xs = rng.standard_normal((30, 4)), rng.standard_normal((7, 4))
    t = np.sin(x.sum(1))
    arch = {"depth": 2, "weight_var": 1.6, "bias_var": 0.2}
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        reg = NNGPRegressor(noise=1e-2, client=client, **arch)
        assert repr(reg).startswith("NNGPRegressor(bias_var=0.2, client=<Client")
        try:
            reg.predict(xs)
            raise SystemExit("predict before fit did not fail")
        except NotFittedError as e:
            assert isinstance(e, AttributeError) and isinstance(e, ValueError)
        try:
            reg.set_params(width=3)
            raise SystemExit("an unknown parameter was accepted")
        except ValueError as e:
            assert "parameter 'width'" in str(e)
        mean, std = reg.fit(x, t).predict(xs, return_std=True)
        k = Spec(**arch).cross(x, x)
        s = 1e-2 * np.mean(np.diag(k))
        f = sl.cho_factor(k + s * np.eye(30))
        alpha = sl.cho_solve(f, t)
        s2 = t @ alpha / 30
        ks = Spec(**arch).cross(xs, x)
        var = np.diag(Spec(**arch).cross(xs, xs)) - (ks.T * sl.cho_solve(f, ks.T)).sum(0)
        np.testing.assert_allclose(mean, ks @ alpha, rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(std, np.sqrt(s2 * (var + s)), rtol=1e-6)
        assert abs(reg.score(xs, ks @ alpha) - 1) < 1e-9 and reg.score(xs, -ks @ alpha) < 0
        copy = pickle.loads(pickle.dumps(reg))  # the default client from here on
        assert copy.client is None and copy.store_ is None
        assert copy.get_params() == {**reg.get_params(), "client": None}
        np.testing.assert_allclose(copy.predict(xs), mean, rtol=1e-8, atol=1e-10)
        assert reg.set_params(depth=4).get_params()["depth"] == 4
        try:
            NNGPClassifier().fit(x, t)
            raise SystemExit("float targets were taken as classes")
        except ValueError as e:
            assert "Unknown label type" in str(e)
        labels = np.where(x[:, 0] > 0, "pos", "neg")
        clf = NNGPClassifier(noise=1e-2, **arch).fit(x, labels)
        hits = clf.predict(x) == labels
        assert hits.all() and clf.score(x, labels) == 1.0
        flipped = np.where(labels == "pos", "neg", "pos")
        assert clf.score(x, flipped) == 0.0
    print("fallback ok")
"""


def test_without_sklearn(tmp_path):
    """The estimators work without scikit-learn: fit, predict and copies on their own base."""
    script = tmp_path / "fallback.py"
    script.write_text(textwrap.dedent(FALLBACK))
    root = os.path.dirname(os.path.dirname(os.path.abspath(estimator.__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0 and "fallback ok" in out.stdout, out.stdout + out.stderr
