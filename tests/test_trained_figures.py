"""The trained-network figures (nngp_dist.trained_figures, benchmarks/trained_figures.py): the
script writes every PNG on tiny inputs, and the in-between uncertainty it draws is checked
against a weight-space oracle (the GGN posterior over the weights, inverted directly)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from nngp_dist import LaplaceGPRegressor  # noqa: E402
from nngp_dist.errors import UserError  # noqa: E402
from nngp_dist.trained_figures import gap_variance_ratio, lml_png  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


def _script():
    spec = importlib.util.spec_from_file_location(
        "trained_figures_script", ROOT / "benchmarks" / "trained_figures.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_script_writes_every_figure(tmp_path):
    out = tmp_path / "docs"
    args = ["--out", str(out), "--dataset", "demo", "--train-size", "30", "--steps", "3",
            "--deltas", "2", "--grid", "21", "--lbfgs", "100", "--dpi", "40"]  # fmt: skip
    result = _script().main(args)
    names = {"trained-kernel.png", "trained-gap.png", "trained-lml.png"}
    assert {p.name for p in out.iterdir()} == names
    for name in names:
        assert (out / name).read_bytes()[:8] == PNG, name
    assert result["gap_ratio"] > 1


def _weight_space_variance(model, x_train, x, delta, sigma):
    """Var f(x) = J(x) (J' J / sigma^2 + delta I)^-1 J(x)', Jacobians by torch.func."""
    from torch.func import functional_call, jacrev, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(p, xi):
        return functional_call(model, p, (xi[None],))[0, 0]

    def jac(x_):
        j = vmap(jacrev(f), in_dims=(None, 0))(params, torch.as_tensor(x_))
        return torch.cat([v.flatten(1) for v in j.values()], dim=1).numpy()

    j = jac(x_train)
    precision = j.T @ j / sigma**2 + delta * np.eye(j.shape[1])
    js = jac(x)
    return np.einsum("np,np->n", js, np.linalg.solve(precision, js.T).T)


def test_gap_variance_is_larger_in_the_gap_than_at_the_data(client):
    script = _script()
    x, y = script.gap_data(30)
    assert not ((x > script.GAP[0]) & (x < script.GAP[1])).any()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1, 12), torch.nn.Tanh(), torch.nn.Linear(12, 1))
    model = model.double()
    opt = torch.optim.LBFGS(model.parameters(), max_iter=300, line_search_fn="strong_wolfe")
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)[:, None]
    delta, sigma = 1.0, script.GAP_SIGMA

    def closure():
        opt.zero_grad()
        w = torch.cat([p.flatten() for p in model.parameters()])
        loss = ((model(xt) - yt) ** 2).sum() / (2 * sigma**2) + 0.5 * delta * (w @ w)
        loss.backward()
        return loss

    opt.step(closure)
    centre = np.array([[0.0]])
    oracle_centre = _weight_space_variance(model, x, centre, delta, sigma)[0]
    oracle_data = _weight_space_variance(model, x, x, delta, sigma)
    assert oracle_centre > oracle_data.max()  # the property, from the oracle alone
    reg = LaplaceGPRegressor(model, prior_precision=delta, sigma=sigma, client=client)
    grid = np.sort(np.concatenate([x[:, 0], [0.0]]))[:, None]
    _, sd = reg.fit(x, y).predict(grid, return_std=True)
    expected = _weight_space_variance(model, x, grid, delta, sigma)
    np.testing.assert_allclose(sd**2, expected, rtol=1e-6)
    ratio = gap_variance_ratio(x, grid, sd**2, script.GAP)
    assert ratio == pytest.approx(oracle_centre / oracle_data.max(), rel=1e-6)
    assert ratio > 1


def test_gap_variance_ratio_by_hand():
    x = np.linspace(-3, 3, 61)
    x_train = np.array([-2.0, -1.5, 2.5])
    var = 1.0 + x**2  # smallest at the gap's centre 0: at the data the largest is 1 + 2.5^2
    assert gap_variance_ratio(x_train, x, var, (-1, 1)) == pytest.approx(1 / 7.25)
    assert gap_variance_ratio(x_train, x, 10 - x**2, (-1, 1)) == pytest.approx(10 / 7.75)
    with pytest.raises(UserError, match="outside the gap"):
        gap_variance_ratio([0.5], x, var, (-1, 1))


def test_lml_figure_needs_two_deltas(tmp_path):
    with pytest.raises(UserError, match="two prior precisions"):
        lml_png([{"delta": 1.0, "lml": 0.0, "test_error": 1.0}], str(tmp_path / "a.png"),
                caption="x")  # fmt: skip
    assert not list(tmp_path.iterdir())


def test_trace_kernel_figure_refuses_a_store_of_another_kernel(tmp_path, client):
    from nngp_dist import jobs
    from nngp_dist.trained_figures import trace_kernel_png

    store = str(tmp_path / "fc.zarr")
    jobs.kernel(store, dataset="demo", train_size=20, test_size=4, depth=1, tile_size=16,
                progress=False, client=client)  # fmt: skip
    with pytest.raises(UserError, match="not the trace kernel of a trained network"):
        trace_kernel_png(store, str(tmp_path / "k.png"), network="x")
    assert not (tmp_path / "k.png").exists()
