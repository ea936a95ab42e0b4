"""Tuning a trained network's prior precision, noise and width by the train log marginal
likelihood on scikit-learn's diabetes data (the seed's Fig. 6 experiment, DNN2GP).

The 442 x 10 diabetes regression (``sklearn.datasets.load_diabetes``, shipped with
scikit-learn, which this script needs) in random 80/20 splits (353 training, 89 test points;
seeded), inputs and targets standardised with the training split's mean and standard deviation.
A configuration is a width (one hidden layer of 5, 10, 20 or 50 tanh units), a prior precision
delta and a noise standard deviation sigma in 0.5, 0.6, ..., 1.0, with the ridge below in
logspace(0, 2, 5): 20 networks and 120 configurations per split. The MAP of ``sum (y - f)^2 /
(2 sigma^2) + delta / 2 |w|^2`` depends on delta and sigma only through the ridge ``lambda =
delta sigma^2`` (the objective times sigma^2 is ``sum (y - f)^2 / 2 + lambda / 2 |w|^2``), so
one network is trained per width and ridge (float64 L-BFGS, the same initial weights for every
ridge) and it is the MAP network of every (delta, sigma) with ``delta sigma^2 = lambda``: no
configuration reuses a network that is not its own MAP. Each network is exported
(``torch.export``) and its kernel J J^T / delta and Laplace-GP posterior computed by
``nngp_dist.jobs.run`` at (delta, sigma) = (lambda, 1); the train LML of every sigma in the
grid (delta = lambda / sigma^2) is then read from that store by ``nngp_dist.laplace.lml_grid``
(the kernel rescaled, not recomputed). The predictive mean is the network's output, so a
configuration's test MSE is its network's; its test NLL (of ``N(mean, var + sigma^2)``) needs
the posterior at its own delta and sigma, recomputed by ``jobs.run`` for the three
configurations compared per split: the highest train LML, the oracle (the lowest test MSE;
among the sigmas of that network, the highest train LML) and a fixed default (width 20, delta
1, sigma 1). Goal (the seed's Fig. 6 claim): the LML's choice is competitive, its test MSE
within 10% of the oracle's in most splits.

    python benchmarks/bench_trained_diabetes.py [--splits 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from distributed import Client, LocalCluster

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_trained_lml as fig5  # noqa: E402
from trained_figures import export  # noqa: E402

from nngp_dist import datasets, jobs, laplace  # noqa: E402

WIDTHS = (5, 10, 20, 50)
RIDGES = np.logspace(0, 2, 5)  # lambda = delta sigma^2
SIGMAS = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
SIGMAS_2 = np.array(SIGMAS) ** 2
DEFAULT = {"width": 20, "delta": 1.0, "sigma": 1.0}


def mlp(width: int) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(10, width), torch.nn.Tanh(), torch.nn.Linear(width, 1)
    ).double()


def split(seed: int) -> tuple[np.ndarray, ...]:
    """One seeded 80/20 split, standardised with the training part's statistics."""
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(y))
    n = int(round(0.8 * len(y)))
    tr, te = order[:n], order[n:]
    mx, sx = x[tr].mean(0), x[tr].std(0)
    my, sy = y[tr].mean(), y[tr].std()
    return (x[tr] - mx) / sx, (y[tr] - my) / sy, (x[te] - mx) / sx, (y[te] - my) / sy


def posterior(store: Path, data: datasets.Dataset, model: str, delta: float, sigma: float,
              client: Client) -> dict:  # fmt: skip
    return jobs.run(
        str(store),
        dataset=data,
        arch="trained",
        model=model,
        prior_precision=delta,
        likelihood="regression",
        sigma=sigma,
        tile_size=400,
        progress=False,
        client=client,
    )


def grid(seed: int, data: datasets.Dataset, folder: Path, client: Client) -> list[dict]:
    """Every configuration's train LML and test MSE (and, at sigma 1, its test NLL)."""
    rows = []
    for width in WIDTHS:
        for ridge in RIDGES:
            torch.manual_seed(seed)
            model = fig5.fit(mlp(width), data.x_train, data.y_train, 1.0, float(ridge))
            name = f"s{seed}_w{width}_r{ridge:.4g}"
            path = export(model, torch.as_tensor(data.x_train[:2]), str(folder / f"{name}.pt2"))
            rep = posterior(folder / f"{name}.zarr", data, path, float(ridge), 1.0, client)
            lml = laplace.lml_grid(str(folder / f"{name}.zarr"), ridge / SIGMAS_2, SIGMAS)
            for g in lml:  # the (delta, sigma) pairs whose MAP this network is
                if not np.isclose(g["prior_precision"] * g["sigma"] ** 2, ridge):
                    continue
                rows.append(
                    {
                        "width": width,
                        "delta": g["prior_precision"],
                        "sigma": g["sigma"],
                        "lml": g["log_marginal_likelihood"],
                        "test_mse": rep["mse"],
                        "test_nll": rep["nll"] if g["sigma"] == 1.0 else None,
                        "model": path,
                    }
                )
    return rows


def scored(row: dict, data: datasets.Dataset, folder: Path, client: Client) -> dict:
    """``row`` with its test NLL, the posterior recomputed at its own delta and sigma (and
    checked: the same test MSE, and the LML that lml_grid read for it)."""
    if row["test_nll"] is not None:
        return row
    store = folder / f"{Path(row['model']).stem}_d{row['delta']:.4g}_s{row['sigma']:g}.zarr"
    rep = posterior(store, data, row["model"], row["delta"], row["sigma"], client)
    lml = rep["log_marginal_likelihood"]
    if abs(rep["mse"] - row["test_mse"]) > 1e-9 or abs(lml - row["lml"]) > 1e-6 * abs(lml):
        raise AssertionError(f"recomputed posterior disagrees: {rep} against {row}")
    row["test_nll"] = rep["nll"]
    return row


def one_split(seed: int, folder: Path, client: Client) -> dict:
    data = datasets.from_arrays(f"diabetes-{seed}", *split(seed))
    rows = grid(seed, data, folder, client)
    chosen = max(rows, key=lambda r: r["lml"])
    best_mse = min(r["test_mse"] for r in rows)
    oracle = max((r for r in rows if r["test_mse"] == best_mse), key=lambda r: r["lml"])
    default = next(r for r in rows if all(np.isclose(r[k], v) for k, v in DEFAULT.items()))
    picks = {k: scored(r, data, folder, client) for k, r in
             (("lml", chosen), ("oracle", oracle), ("default", default))}  # fmt: skip
    for r in rows:
        del r["model"]
    return {
        "seed": seed,
        **{
            k: {c: r[c] for c in ("width", "delta", "sigma", "lml", "test_mse", "test_nll")}
            for k, r in picks.items()
        },
        "ratio": chosen["test_mse"] / oracle["test_mse"],
        "rows": rows,
    }


def summary(results: list[dict]) -> str:
    lines = ["", "| choice | test MSE mean | std | test NLL mean | std |", "|---|---|---|---|---|"]
    for k in ("lml", "default", "oracle"):
        mse = np.array([r[k]["test_mse"] for r in results])
        nll = np.array([r[k]["test_nll"] for r in results])
        lines.append(
            f"| {k} | {mse.mean():.4f} | {mse.std():.4f} | {nll.mean():.4f} | {nll.std():.4f} |"
        )
    within = sum(r["ratio"] <= 1.10 for r in results)
    lines.append(f"\nLML's choice within 10% of the oracle's test MSE: {within} of {len(results)}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--splits", type=int, default=20)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    folder = Path(tempfile.mkdtemp())
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        print("| split | LML's width, delta, sigma | its test MSE, NLL | oracle's "
              "| its test MSE, NLL | default's test MSE, NLL | ratio |")  # fmt: skip
        print("|---|---|---|---|---|---|---|", flush=True)
        results = []
        for seed in range(a.splits):
            r = one_split(seed, folder, client)
            results.append(r)
            c, o, d = r["lml"], r["oracle"], r["default"]
            print(
                f"| {seed} | {c['width']}, {c['delta']:.3g}, {c['sigma']:g} | "
                f"{c['test_mse']:.4f}, {c['test_nll']:.3f} | "
                f"{o['width']}, {o['delta']:.3g}, {o['sigma']:g} | "
                f"{o['test_mse']:.4f}, {o['test_nll']:.3f} | "
                f"{d['test_mse']:.4f}, {d['test_nll']:.3f} | {r['ratio']:.3f} |",
                flush=True,
            )
    seconds = time.perf_counter() - start
    print(summary(results))
    n = a.splits * len(WIDTHS) * len(RIDGES)
    print(f"({n} networks trained and solved, {n * len(SIGMAS)} configurations, {seconds:.0f} s)")
    if a.json:
        Path(a.json).write_text(json.dumps({"results": results}, indent=2))


if __name__ == "__main__":
    main()
