"""The Laplace-GP posterior of trained networks (nngp_dist.laplace, nngp_dist.likelihoods)
against a weight-space oracle (full Jacobians, the GGN posterior inverted directly) and
against laplace-torch."""

from __future__ import annotations

import os
from decimal import Decimal, getcontext

import numpy as np
import pytest
from scipy.stats import multivariate_normal

torch = pytest.importorskip("torch")

from nngp_dist import datasets, jobs, laplace, likelihoods  # noqa: E402
from nngp_dist.errors import UserError  # noqa: E402
from nngp_dist.layout import MEAN, OUTPUTS, VARIANCE  # noqa: E402
from nngp_dist.storage import KernelStore  # noqa: E402

FACTORIES = "tests._trained_nets"


def _jac(model, x):
    """(n, C, P) full Jacobian and the flat parameters (P,)."""
    from torch.func import functional_call, jacrev, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def f(p, xi):
        return functional_call(model, (p, buffers), (xi[None],))[0]

    j = vmap(jacrev(f), in_dims=(None, 0))(params, torch.as_tensor(x))
    flat = torch.cat([v.flatten() for v in params.values()])
    return torch.cat([v.flatten(2) for v in j.values()], dim=2).numpy(), flat.numpy()


def weight_space(model, x_train, y_train, x_test, delta, likelihood, sigma=1.0):
    """Per output c the GGN posterior over a separate copy of the weights (independent
    outputs): variance J_c* (J_c' L_c J_c + delta I)^-1 J_c*', and the dense log N(y~_c | 0,
    J_c J_c' / delta + L_c^-1); L and the loss gradient r from torch.autograd."""
    model = model.double().eval()
    xt = torch.as_tensor(x_train)
    f = model(xt).detach()
    if likelihood == "regression":
        y = torch.as_tensor(y_train).reshape(f.shape)
        loss = lambda out, i: ((out - y[i]) ** 2).sum() / (2 * sigma**2)  # noqa: E731
    else:
        y = torch.as_tensor(y_train)
        loss = lambda out, i: torch.nn.functional.cross_entropy(out[None], y[i : i + 1])  # noqa: E731
    r = np.stack([torch.func.grad(lambda o, i=i: loss(o, i))(f[i]).numpy() for i in range(len(f))])
    hess = np.stack(
        [torch.func.hessian(lambda o, i=i: loss(o, i))(f[i]).numpy() for i in range(len(f))]
    )
    lam = np.einsum("ncc->nc", hess)
    j, w = _jac(model, x_train)
    js, _ = _jac(model, x_test)
    var, lml = [], 0.0
    for c in range(f.shape[1]):
        jc = j[:, c]
        prec = jc.T @ (lam[:, c, None] * jc) + delta * np.eye(len(w))
        var.append(np.einsum("np,np->n", js[:, c], np.linalg.solve(prec, js[:, c].T).T))
        yt = jc @ w - r[:, c] / lam[:, c]
        cov = jc @ jc.T / delta + np.diag(1.0 / lam[:, c])
        lml += multivariate_normal(np.zeros(len(yt)), cov).logpdf(yt)
    return model(torch.as_tensor(x_test)).detach().numpy(), np.stack(var, 1), lml


def _net(name, tmp_path, seed=0):
    from tests import _trained_nets as nets

    torch.manual_seed(seed)
    model = getattr(nets, name)()
    path = tmp_path / f"{name}.pt"
    torch.save(model.state_dict(), path)
    return model, str(path)


def _store(tmp_path, name, weights, data, delta, client):
    store = str(tmp_path / "k.zarr")
    jobs.kernel(
        store,
        dataset=data,
        arch="trained",
        model=f"{FACTORIES}:{name}",
        weights=weights,
        prior_precision=delta,
        tile_size=16,
        trust_code=True,
        progress=False,
        client=client,
    )
    return store


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_posterior_equals_the_weight_space_oracle(tmp_path, client, likelihood):
    model, weights = _net("mlp_tanh", tmp_path)
    rng = np.random.default_rng(0)
    x_train, x_test = rng.normal(size=(37, 5)), rng.normal(size=(9, 5))
    if likelihood == "classification":
        y_train, y_test = rng.integers(0, 3, 37), rng.integers(0, 3, 9)
    else:
        y_train, y_test = rng.normal(size=(37, 3)), rng.normal(size=(9, 3))
    data = datasets.from_arrays("t", x_train, y_train, x_test, y_test)
    store = _store(tmp_path, "mlp_tanh", weights, data, 0.7, client)
    sigma = 0.3 if likelihood == "regression" else None
    rep = laplace.posterior(
        store, likelihood=likelihood, sigma=sigma, trust_code=True, progress=False, client=client
    )
    mean, var, lml = weight_space(model, x_train, y_train, x_test, 0.7, likelihood, sigma or 1.0)
    ks = KernelStore.open(store)
    assert ks.read(MEAN).shape == ks.read(VARIANCE).shape == (9, 3)
    assert _rel(ks.read(MEAN), mean) < 1e-12
    assert _rel(ks.read(VARIANCE), var) < 1e-8
    assert abs(rep["log_marginal_likelihood"] - lml) < 1e-8 * abs(lml)
    assert ks.status()["stage"] == "done"
    # the grid reuses the kernel: at delta itself the same LML, elsewhere the oracle's
    grid = laplace.lml_grid(store, [0.7, 2.0])
    assert abs(grid[0]["log_marginal_likelihood"] - lml) < 1e-8 * abs(lml)
    other = weight_space(model, x_train, y_train, x_test, 2.0, likelihood, sigma or 1.0)[2]
    assert abs(grid[1]["log_marginal_likelihood"] - other) < 1e-8 * abs(other)
    # a second run resumes: the output stores' kernels and factors are kept
    again = laplace.posterior(
        store, likelihood=likelihood, sigma=sigma, trust_code=True, progress=False, client=client
    )
    assert again["log_marginal_likelihood"] == pytest.approx(rep["log_marginal_likelihood"])


def test_one_pass_writes_every_output_and_the_trace_and_resumes(tmp_path, client):
    """``run --likelihood`` leaves the store's tiles to the posterior's single pass, which
    writes the trace to the store and kappa_c to each output store (the direct Jacobian's
    contraction is the oracle); a tile lost in one output store alone is recomputed there."""
    from nngp_dist.layout import K_TEST_TRAIN, K_TRAIN_DIAG, K_TRAIN_TRAIN, record
    from nngp_dist.tiling import symmetric

    model, weights = _net("mlp_tanh", tmp_path)
    rng = np.random.default_rng(3)
    x_train, x_test = rng.normal(size=(37, 5)), rng.normal(size=(9, 5))
    data = datasets.from_arrays("t", x_train, rng.integers(0, 3, 37), x_test, np.arange(9) % 3)
    store, delta = str(tmp_path / "k.zarr"), 0.7
    kw = dict(likelihood="classification", trust_code=True, progress=False, client=client)
    spec = dict(arch="trained", model=f"{FACTORIES}:mlp_tanh", weights=weights)
    jobs.run(store, dataset=data, prior_precision=delta, tile_size=16, **spec, **kw)
    j, _ = _jac(model.double(), x_train)
    js, _ = _jac(model, x_test)
    kc = np.einsum("ncp,mcp->cnm", j, j) / delta
    ks = KernelStore.open(store)
    assert _rel(symmetric(ks.read(K_TRAIN_TRAIN)), kc.sum(0)) < 1e-12
    assert _rel(ks.read(K_TEST_TRAIN), np.einsum("ncp,mcp->nm", js, j) / delta) < 1e-12
    subs = [KernelStore.open(f"{store}/{OUTPUTS}/{c}", "r+") for c in range(3)]
    for c, sub in enumerate(subs):
        assert _rel(symmetric(sub.read(K_TRAIN_TRAIN)), kc[c]) < 1e-12
        assert _rel(sub.read(K_TRAIN_DIAG), np.diagonal(kc[c])) < 1e-12
    before = subs[1].read(VARIANCE)
    # output 1 loses tile (0, 2) of its training kernel: only there is it recomputed
    subs[1].array(K_TRAIN_TRAIN)[0:16, 32:37] = -1.0
    subs[1].array(record(K_TRAIN_TRAIN))[0, 2] = np.nan
    kept = subs[0].array(record(K_TRAIN_TRAIN))[0, 2]
    subs[1].drop_factor()
    laplace.posterior(store, **kw)
    assert _rel(symmetric(subs[1].read(K_TRAIN_TRAIN)), kc[1]) < 1e-12
    assert subs[0].array(record(K_TRAIN_TRAIN))[0, 2] == kept
    assert _rel(subs[1].read(VARIANCE), before) < 1e-10

def test_classification_terms_match_autograd():
    rng = np.random.default_rng(1)
    f = rng.normal(size=(6, 4)) * 3
    f[0, 2] = 30.0  # a confident point: 1 - p is computed without cancellation
    y = np.array([2, 1, 0, 3, 3, 2])
    jw = rng.normal(size=(6, 4))
    lam, yt = likelihoods.terms("classification", f, jw, y)
    # the oracle in 50-digit decimals: no cancellation in 1 - p anywhere
    getcontext().prec = 50
    for i in range(6):
        e = [Decimal(float(v)).exp() for v in f[i]]
        p = [v / sum(e) for v in e]
        for c in range(4):
            want_lam = p[c] * (1 - p[c])
            want_yt = Decimal(float(jw[i, c])) - (p[c] - (c == y[i])) / want_lam
            assert lam[i, c] == pytest.approx(float(want_lam), rel=1e-9)
            assert yt[i, c] == pytest.approx(float(want_yt), rel=1e-9)
    assert np.isfinite(yt).all() and lam[0, 2] > 0


def test_scores_against_direct_computation():
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.55, 0.45]])
    y = np.array([0, 1, 1, 0])
    # bins of width 1/15: 0.9 -> bin 13, 0.6 -> 8, 0.8 -> 11, 0.55 -> 8
    want = (abs(1 - 0.9) + 2 * abs(0.5 - 0.575) + abs(1 - 0.8)) / 4
    assert likelihoods.ece(probs, y, 15) == pytest.approx(want)
    assert likelihoods.nll(probs, y) == pytest.approx(-np.log([0.9, 0.4, 0.8, 0.55]).mean())
    # probit: zero variance is the softmax; a large variance flattens towards uniform
    m = np.array([[2.0, -1.0, 0.5]])
    assert np.allclose(likelihoods.probit(m, np.zeros_like(m)), likelihoods.softmax(m))
    flat = likelihoods.probit(m, np.full_like(m, 1e6))
    assert np.allclose(flat, 1 / 3, atol=1e-2)


def _laplace_torch_data(n=40, m=8, d=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-2, 2, size=(n + m, d))
    return x[:n], x[n:]


def _fit_map(model, x, y, delta, likelihood, sigma=1.0):
    """Train to the MAP in float64 (L-BFGS to a tiny gradient): the loss is the negative log
    joint, sum of the likelihood's terms plus delta / 2 |w|^2."""
    model = model.double()
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    opt = torch.optim.LBFGS(
        model.parameters(),
        lr=1,
        max_iter=5000,
        tolerance_grad=1e-14,
        tolerance_change=1e-16,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        out = model(xt)
        if likelihood == "regression":
            nll = ((out - yt.reshape(out.shape)) ** 2).sum() / (2 * sigma**2)
        else:
            nll = torch.nn.functional.cross_entropy(out, yt, reduction="sum")
        w = torch.cat([p.flatten() for p in model.parameters()])
        loss = nll + 0.5 * delta * (w @ w)
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    return model


def test_regression_equals_laplace_torch_full_ggn(tmp_path, client):
    lp = pytest.importorskip("laplace")
    from torch.utils.data import DataLoader, TensorDataset

    from tests import _trained_nets as nets

    x_train, x_test = _laplace_torch_data()
    y_train = np.sin(2 * x_train[:, :1]) + 0.1 * np.random.default_rng(5).normal(size=(40, 1))
    delta, sigma = 0.5, 0.2
    torch.manual_seed(0)
    model = _fit_map(nets.mlp_small_regression(), x_train, y_train, delta, "regression", sigma)
    weights = tmp_path / "w.pt"
    torch.save(model.state_dict(), weights)
    la = lp.Laplace(
        model,
        "regression",
        subset_of_weights="all",
        hessian_structure="full",
        sigma_noise=sigma,
        prior_precision=delta,
        # BackPACK's GGN is exact in float64 (the default Curvlinops backend's differed by
        # 2e-8 relative here, which became 2e-6 in the variances)
        backend=lp.curvature.BackPackGGN,
    )
    la.fit(DataLoader(TensorDataset(torch.as_tensor(x_train), torch.as_tensor(y_train)), 8))
    f_mu, f_var = la(torch.as_tensor(x_test), pred_type="glm")
    data = datasets.from_arrays("r", x_train, y_train[:, 0], x_test, np.zeros(len(x_test)))
    store = _store(tmp_path, "mlp_small_regression", str(weights), data, delta, client)
    rep = laplace.posterior(
        store, likelihood="regression", sigma=sigma, trust_code=True, progress=False, client=client
    )
    ks = KernelStore.open(store)
    assert _rel(ks.read(MEAN), f_mu.detach().numpy()) < 1e-8
    assert _rel(ks.read(VARIANCE), f_var.detach().numpy()[:, :, 0]) < 1e-8
    # at the MAP the GP's evidence of y~ is the Laplace evidence of the network
    want = float(la.log_marginal_likelihood())
    assert abs(rep["log_marginal_likelihood"] - want) < 1e-6 * abs(want)


def test_classification_equals_laplace_torch_gp_diagonal_kernel(tmp_path, client):
    lp = pytest.importorskip("laplace")
    from torch.utils.data import DataLoader, TensorDataset

    from tests import _trained_nets as nets

    x_train, x_test = _laplace_torch_data(seed=1)
    y_train = (x_train[:, 0] > 0).astype(int) + (x_train[:, 1] > 1).astype(int)
    delta = 2.0
    torch.manual_seed(1)
    model = _fit_map(nets.mlp_small_classifier(), x_train, y_train, delta, "classification")
    weights = tmp_path / "w.pt"
    torch.save(model.state_dict(), weights)
    la = lp.Laplace(
        model,
        "classification",
        subset_of_weights="all",
        hessian_structure="gp",
        prior_precision=delta,
        n_subset=len(x_train),
        independent_outputs=True,
    )
    la.fit(DataLoader(TensorDataset(torch.as_tensor(x_train), torch.as_tensor(y_train)), 8))
    f_mu, f_var = la._glm_predictive_distribution(torch.as_tensor(x_test))
    data = datasets.from_arrays("c", x_train, y_train, x_test, np.zeros(len(x_test), int))
    store = _store(tmp_path, "mlp_small_classifier", str(weights), data, delta, client)
    laplace.posterior(
        store, likelihood="classification", trust_code=True, progress=False, client=client
    )
    ks = KernelStore.open(store)
    assert _rel(ks.read(MEAN), f_mu.detach().numpy()) < 1e-6
    assert _rel(ks.read(VARIANCE), np.einsum("mcc->mc", f_var.detach().numpy())) < 1e-6


def test_bad_input_is_refused(tmp_path, client):
    model, weights = _net("mlp_tanh", tmp_path)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 5))
    data = datasets.from_arrays("t", x[:16], rng.integers(0, 5, 16), x[16:], np.zeros(4, int))
    store = _store(tmp_path, "mlp_tanh", weights, data, 1.0, client)
    kw = dict(trust_code=True, progress=False, client=client)
    with pytest.raises(UserError, match="labels must be 0 .. 2"):
        laplace.posterior(store, likelihood="classification", **kw)
    with pytest.raises(UserError, match="float targets with one column per network output"):
        laplace.posterior(store, likelihood="regression", **kw)
    with pytest.raises(UserError, match="--sigma"):
        laplace.posterior(store, likelihood="classification", sigma=0.5, **kw)
    with pytest.raises(UserError, match="--likelihood"):
        laplace.posterior(store, likelihood="poisson", **kw)
    with pytest.raises(UserError, match="samples must be a positive integer"):
        laplace.posterior(store, likelihood="classification", samples=0, **kw)
    assert not KernelStore.open(store).has(OUTPUTS)  # nothing written


# --- the command line -------------------------------------------------------------------------


def _npz(tmp_path, y_train, y_test, name="d.npz"):
    rng = np.random.default_rng(7)
    path = tmp_path / name
    np.savez(
        path,
        x_train=rng.normal(size=(len(y_train), 5)),
        y_train=y_train,
        x_test=rng.normal(size=(len(y_test), 5)),
        y_test=y_test,
    )
    return f"npz:{path}"


def _cli(*args):
    from click.testing import CliRunner

    from nngp_dist.cli import main

    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def _run_args(tmp_path, weights, dataset, *extra, model=f"{FACTORIES}:mlp_tanh"):
    store = str(tmp_path / "cli.zarr")
    return store, [
        "run",
        "--store",
        store,
        "--dataset",
        dataset,
        "--arch",
        "trained",
        "--model",
        model,
        "--weights",
        weights,
        "--trust-code",
        "--tile-size",
        "16",
        "--workers",
        "1",
        "--quiet",
        *extra,
    ]


def test_cli_run_classification_and_regression(tmp_path):
    _, weights = _net("mlp_tanh", tmp_path)
    labels = _npz(tmp_path, np.arange(20) % 3, np.arange(6) % 3)
    store, args = _run_args(tmp_path, weights, labels, "--likelihood", "classification")
    r = _cli(*args, "--prior-precision", "2", "--samples", "50", "--json", str(tmp_path / "r.json"))
    assert r.exit_code == 0, r.output
    for key in ("accuracy:", "nll:", "ece:", "map_accuracy:", "map_nll:", "map_ece:"):
        assert key in r.output
    import json

    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["prior_precision"] == 2.0 and rep["likelihood"] == "classification"
    from nngp_dist import __version__

    assert rep["store"] == store and rep["version"] == __version__
    assert rep["spec"]["arch"] == "trained" and rep["spec"] == KernelStore.open(store).meta["spec"]
    assert KernelStore.open(store).read(VARIANCE).shape == (6, 3)
    st = _cli("status", "--store", store)
    assert st.exit_code == 0, st.output
    assert "spec:    trained model" in st.output and "prior_precision 2.0" in st.output
    assert "outputs: 3 per-output stores (Laplace-GP): 3 done" in st.output
    assert f"accuracy {rep['accuracy']:.4f}, nll {rep['nll']:.4f}" in st.output
    sub = _cli("status", "--store", f"{store}/{OUTPUTS}/1")
    assert sub.exit_code == 0 and "output 1" in sub.output, sub.output
    floats = _npz(tmp_path, np.ones((20, 3)), np.ones((6, 3)), "f.npz")
    _, args = _run_args(tmp_path / "r", weights, floats, "--likelihood", "regression")
    (tmp_path / "r").mkdir()
    r = _cli(*args, "--sigma", "0.5")
    assert r.exit_code == 0, r.output
    assert "mse:" in r.output and "log marginal likelihood:" in r.output


@pytest.mark.parametrize(
    "case,message",
    [
        ("junk model", "not a torch.export archive"),
        ("labels above the outputs", "labels must be 0 .. 2"),
        ("negative labels", "negative label -1"),  # refused with the dataset
        ("regression columns", "one column per network output (3)"),
        ("delta zero", "prior_precision must be finite and > 0"),
        ("sigma negative", "--sigma must be positive"),
        ("sigma with classification", "--sigma is the regression noise"),
        ("sigma alone", "give --likelihood"),
        ("fc with likelihood", "--likelihood needs --arch trained"),
    ],
)
def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path, case, message):
    _, weights = _net("mlp_tanh", tmp_path)
    good = _npz(tmp_path, np.arange(20) % 3, np.arange(6) % 3)
    dataset, extra, model = good, ["--likelihood", "classification"], f"{FACTORIES}:mlp_tanh"
    if case == "junk model":
        model = str(tmp_path / "junk.pt2")
        (tmp_path / "junk.pt2").write_bytes(b"not a model")
    elif case == "labels above the outputs":
        dataset = _npz(tmp_path, np.arange(20) % 5, np.arange(6) % 3, "b.npz")
    elif case == "negative labels":
        dataset = _npz(tmp_path, np.arange(20) % 3 - 1, np.arange(6) % 3, "b.npz")
    elif case == "regression columns":
        dataset = _npz(tmp_path, np.ones((20, 2)), np.ones((6, 2)), "b.npz")
        extra = ["--likelihood", "regression"]
    elif case == "delta zero":
        extra += ["--prior-precision", "0"]
    elif case == "sigma negative":
        extra = ["--likelihood", "regression", "--sigma", "-1"]
        dataset = _npz(tmp_path, np.ones((20, 3)), np.ones((6, 3)), "b.npz")
    elif case == "sigma with classification":
        extra += ["--sigma", "1"]
    elif case == "sigma alone":
        extra = ["--sigma", "1"]
    store, args = _run_args(tmp_path, weights, dataset, *extra, model=model)
    if case == "fc with likelihood":
        args = ["run", "--store", store, "--dataset", good, "--likelihood", "classification"]
    r = _cli(*args)
    assert r.exit_code == 2, r.output
    assert message in r.output
    assert not os.path.exists(store)


def test_cli_changed_weights_are_refused_and_the_store_kept(tmp_path):
    model, weights = _net("mlp_tanh", tmp_path)
    dataset = _npz(tmp_path, np.arange(20) % 3, np.arange(6) % 3)
    store, args = _run_args(tmp_path, weights, dataset, "--likelihood", "classification")
    assert _cli(*args).exit_code == 0
    before = KernelStore.open(store).read(VARIANCE)
    with torch.no_grad():
        model[0].weight[0, 0] += 0.5
    torch.save(model.state_dict(), weights)
    r = _cli(*args)
    assert r.exit_code == 2 and "--overwrite" in r.output, r.output
    assert np.array_equal(KernelStore.open(store).read(VARIANCE), before)


def test_cli_without_torch_exits_2_saying_what_to_install(tmp_path):
    import subprocess
    import sys

    (tmp_path / "m.pt2").write_bytes(b"x")
    dataset = _npz(tmp_path, np.arange(20) % 3, np.arange(6) % 3)
    store = str(tmp_path / "s.zarr")
    code = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("blocked")
sys.meta_path.insert(0, Block())
from nngp_dist.cli import main
main(["run", "--store", {store!r}, "--dataset", {dataset!r}, "--arch", "trained",
      "--model", {str(tmp_path / "m.pt2")!r}, "--likelihood", "classification",
      "--scheduler", "synchronous", "--quiet"])
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 2, out.stderr
    assert "pip install 'nngp_dist[torch]'" in out.stderr
    assert not os.path.exists(store)


def test_estimators_equal_the_weight_space_oracle(tmp_path, client):
    from nngp_dist.laplace_estimator import LaplaceGPClassifier, LaplaceGPRegressor
    from tests import _trained_nets as nets

    x_train, x_test = _laplace_torch_data(n=30, m=5, seed=2)
    y_class = (x_train[:, 0] > 0).astype(int) + (x_train[:, 2] > 0.5).astype(int)
    torch.manual_seed(2)
    model = nets.mlp_small_classifier().double()
    before = [p.detach().clone() for p in model.parameters()]
    clf = LaplaceGPClassifier(model, prior_precision=1.5, tile_size=16, client=client)
    probs = clf.fit(x_train, y_class).predict_proba(x_test)
    mean, var, lml = weight_space(model, x_train, y_class, x_test, 1.5, "classification")
    assert np.abs(probs - likelihoods.probit(mean, var)).max() < 1e-10
    assert clf.log_marginal_likelihood_ == pytest.approx(lml, rel=1e-8)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert list(clf.predict(x_test)) == list(probs.argmax(1))
    y_reg = np.sin(x_train[:, 0])
    reg = LaplaceGPRegressor(
        nets.mlp_small_regression().double(), prior_precision=0.5, sigma=0.3, client=client
    )
    model = reg.model
    got, std = reg.fit(x_train, y_reg).predict(x_test, return_std=True)
    mean, var, _ = weight_space(model, x_train, y_reg, x_test, 0.5, "regression", 0.3)
    assert np.abs(got - mean[:, 0]).max() < 1e-12
    assert np.abs(std**2 - var[:, 0]).max() < 1e-8 * var.max()
    with pytest.raises(UserError, match="not fitted"):
        LaplaceGPRegressor(model).predict(x_test)


def test_monte_carlo_probabilities_against_quadrature():
    # two classes, independent Gaussian logits: E[softmax] by 2-D Gauss-Hermite quadrature
    mean = np.array([[1.0, -0.5], [0.2, 0.3]])
    var = np.array([[2.0, 0.5], [0.1, 3.0]])
    t, w = np.polynomial.hermite_e.hermegauss(60)
    w = w / w.sum()
    for i in range(2):
        a = mean[i, 0] + np.sqrt(var[i, 0]) * t[:, None]
        b = mean[i, 1] + np.sqrt(var[i, 1]) * t[None, :]
        want = (w[:, None] * w[None, :] / (1 + np.exp(b - a))).sum()
        got = likelihoods.monte_carlo(mean[i : i + 1], var[i : i + 1], 200_000, seed=i)[0, 0]
        assert abs(got - want) < 4e-3  # a few standard errors of 200,000 draws
    assert likelihoods.monte_carlo(mean, var, 10).sum(axis=1) == pytest.approx(1.0)
    y = np.array([0, 1])
    mc = laplace.scores("classification", mean, var, y, samples=200_000)
    probs = likelihoods.monte_carlo(mean, var, 200_000)
    assert mc["nll"] == pytest.approx(likelihoods.nll(probs, y))
    assert mc["nll"] != laplace.scores("classification", mean, var, y)["nll"]
