"""Choosing a trained network's prior precision by the train log marginal likelihood (the
seed's Fig. 5 experiment, DNN2GP).

Ten 1-D regression sets of N = 100: 90 points with |x| in [1, 3] and 10 near x = 0 (|x| <
0.3), targets sin(2x) + N(0, sigma^2), sigma = 0.3. For each prior precision delta in
logspace(-2, 2, 21) a network of one hidden layer of 20 tanh units is trained to its MAP
(float64 L-BFGS on sum (y - f)^2 / (2 sigma^2) + delta / 2 |w|^2, the same initial weights for
every delta), its kernel J J^T / delta computed into a store and its Laplace-GP posterior
solved there (nngp_dist.laplace): the train LML of the transformed targets. The delta with
the highest LML is compared with the delta of lowest test MSE (the MAP network's, on 400
test points uniform on [-3, 3] with noisy targets). Goal: the LML's delta within 10% of the
best test MSE in at least 8 of 10 sets.

    python benchmarks/bench_trained_lml.py [--sets 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from distributed import Client, LocalCluster

from nngp_dist import datasets, jobs, laplace
from nngp_dist.layout import MEAN
from nngp_dist.storage import KernelStore

SIGMA = 0.3
DELTAS = np.logspace(-2, 2, 21)


def net() -> torch.nn.Module:
    """The model factory the stores name (``bench_trained_lml:net``)."""
    return torch.nn.Sequential(torch.nn.Linear(1, 20), torch.nn.Tanh(), torch.nn.Linear(20, 1))


def dataset(seed: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    far = rng.uniform(1, 3, 90) * rng.choice([-1, 1], 90)
    near = rng.uniform(-0.3, 0.3, 10)
    x = np.concatenate([far, near])[:, None]
    x_test = rng.uniform(-3, 3, 400)[:, None]
    y = np.sin(2 * x[:, 0]) + SIGMA * rng.normal(size=100)
    y_test = np.sin(2 * x_test[:, 0]) + SIGMA * rng.normal(size=400)
    return x, y, x_test, y_test


def train(x: np.ndarray, y: np.ndarray, delta: float, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return fit(net().double(), x, y, SIGMA, delta)


def fit(
    model: torch.nn.Module, x: np.ndarray, y: np.ndarray, sigma: float, delta: float
) -> torch.nn.Module:
    """``model`` (float64) trained in place to its MAP by full-batch L-BFGS on
    ``sum (y - f)^2 / (2 sigma^2) + delta / 2 |w|^2``: the Gaussian likelihood of noise
    ``sigma`` and the prior N(0, I / delta) whose Laplace-GP nngp_dist computes."""
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)[:, None]
    opt = torch.optim.LBFGS(
        model.parameters(),
        max_iter=2000,
        tolerance_grad=1e-10,
        tolerance_change=1e-14,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        w = torch.cat([p.flatten() for p in model.parameters()])
        loss = ((model(xt) - yt) ** 2).sum() / (2 * sigma**2) + 0.5 * delta * (w @ w)
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    return model


def one_set(seed: int, folder: Path, client: Client) -> dict:
    x, y, x_test, y_test = dataset(seed)
    data = datasets.from_arrays(f"fig5-{seed}", x, y, x_test, y_test)
    rows = []
    for delta in DELTAS:
        model = train(x, y, float(delta), seed)
        weights = folder / f"w{seed}_{delta:.4g}.pt"
        torch.save(model.state_dict(), weights)
        store = str(folder / f"s{seed}_{delta:.4g}.zarr")
        jobs.kernel(
            store,
            dataset=data,
            arch="trained",
            model="bench_trained_lml:net",
            weights=str(weights),
            prior_precision=float(delta),
            trust_code=True,
            tile_size=100,
            progress=False,
            client=client,
        )
        rep = laplace.posterior(
            store,
            likelihood="regression",
            sigma=SIGMA,
            trust_code=True,
            progress=False,
            client=client,
        )
        mean = KernelStore.open(store).read(MEAN)[:, 0]
        rows.append(
            {
                "delta": float(delta),
                "lml": rep["log_marginal_likelihood"],
                "test_mse": float(((mean - y_test) ** 2).mean()),
            }
        )
    chosen = max(rows, key=lambda r: r["lml"])
    best = min(rows, key=lambda r: r["test_mse"])
    return {
        "seed": seed,
        "lml_delta": chosen["delta"],
        "lml_delta_mse": chosen["test_mse"],
        "best_delta": best["delta"],
        "best_mse": best["test_mse"],
        "ratio": chosen["test_mse"] / best["test_mse"],
        "rows": rows,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sets", type=int, default=10)
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
        print("| set | LML's delta | its test MSE | best delta | best test MSE | ratio |")
        print("|---|---|---|---|---|---|", flush=True)
        results = []
        for seed in range(a.sets):
            r = one_set(seed, folder, client)
            results.append(r)
            print(
                f"| {r['seed']} | {r['lml_delta']:.3g} | {r['lml_delta_mse']:.4f} | "
                f"{r['best_delta']:.3g} | {r['best_mse']:.4f} | {r['ratio']:.3f} |",
                flush=True,
            )
    within = sum(r["ratio"] <= 1.10 for r in results)
    seconds = time.perf_counter() - start
    print(f"\nwithin 10% of the best delta's test MSE: {within} of {len(results)} sets")
    print(f"({len(results) * len(DELTAS)} networks trained and solved in {seconds:.0f} s)")
    if a.json:
        Path(a.json).write_text(json.dumps({"results": results, "within": within}, indent=2))


if __name__ == "__main__":
    main()
