"""The trained-network figures in docs/ (nngp_dist.trained_figures draws them):

* ``trained-kernel.png``: the class-sorted trace kernel sum_c J_c J_c^T / delta of a small CNN
  trained (Adam, full batch, weight decay = the prior precision delta) on the first N
  Fashion-MNIST training images, computed into a store by ``jobs.kernel(arch="trained")``.
* ``trained-gap.png``: a 1-D regression with a gap in its inputs (x in [-3, -1] and [1, 3],
  targets sin(2x) + N(0, 0.1^2)), a 1-hidden-layer tanh MLP trained to its MAP (L-BFGS), and
  its Laplace-GP posterior from ``LaplaceGPRegressor``: mean +- 2 sd of f and of y. The script
  checks that the variance of f at the gap's centre exceeds the variance at the data, and
  prints the ratio.
* ``trained-lml.png``: train log marginal likelihood and test MSE over delta for one data set
  of ``bench_trained_lml.py`` (the seed's Fig. 5), a network trained per delta.

    python benchmarks/trained_figures.py [--out docs] [--train-size 300] [--deltas 21]
                                         [--only kernel gap lml]

Small, for the tests: ``--dataset demo --train-size 40 --steps 5 --deltas 3 --grid 41``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from distributed import Client, LocalCluster

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_trained_lml as fig5  # noqa: E402

from nngp_dist import LaplaceGPRegressor, datasets, jobs  # noqa: E402
from nngp_dist.trained_figures import gap_png, lml_png, trace_kernel_png  # noqa: E402

GAP = (-1.0, 1.0)
GAP_SIGMA = 0.1


def cnn() -> torch.nn.Module:
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(1, 8, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(256, 10),
    )  # fmt: skip


def map_train(model: torch.nn.Module, x: torch.Tensor, loss_fn, delta: float, steps: int,
              seconds: float, lr: float = 1e-2) -> torch.nn.Module:  # fmt: skip
    """Adam on the whole batch: loss(model(x)) + delta / 2 |w|^2 (the MAP of the prior
    N(0, I / delta)), for ``steps`` steps or ``seconds``, whichever ends first."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    start = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad()
        w = torch.cat([p.flatten() for p in model.parameters()])
        loss = loss_fn(model(x)) + 0.5 * delta * (w @ w)
        loss.backward()
        opt.step()
        if time.perf_counter() - start > seconds:
            break
    return model.eval()


def _name(model: torch.nn.Module) -> str:
    count = sum(p.numel() for p in model.parameters())
    return f"CNN (2 conv + max-pool, 1 linear; {count:,} weights)"


def export(model: torch.nn.Module, example: torch.Tensor, path: str) -> str:
    net = model.double().eval()
    ep = torch.export.export(
        net, (example.double(),), dynamic_shapes=({0: torch.export.Dim("batch")},)
    )
    torch.export.save(ep, path)
    return path


def kernel_figure(a: argparse.Namespace, folder: str, client: Client) -> str:
    data = datasets.load(a.dataset, train_size=a.train_size, test_size=2)
    x = torch.as_tensor(data.x_train, dtype=torch.float32)[:, None]
    y = torch.as_tensor(data.y_train, dtype=torch.int64)
    torch.manual_seed(0)

    def loss(out: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(out, y, reduction="sum")

    model = map_train(cnn(), x, loss, a.delta, a.steps, a.train_seconds)
    acc = float((model(x).argmax(1) == y).float().mean())
    print(f"CNN trained: training accuracy {acc:.3f}", flush=True)
    model_file = export(model, x[:2], os.path.join(folder, "cnn.pt2"))
    store = os.path.join(folder, "cnn.zarr")
    start = time.perf_counter()
    jobs.kernel(store, dataset=data, arch="trained", model=model_file, input_shape=(1, 28, 28),
                prior_precision=a.delta, tile_size=max(16, -(-a.train_size // 2)),
                progress=False, client=client)  # fmt: skip
    print(f"trace kernel of {a.train_size} images: {time.perf_counter() - start:.1f} s")
    return trace_kernel_png(store, os.path.join(a.out, "trained-kernel.png"), network=_name(model),
                            sample=a.train_size, dpi=a.dpi)  # fmt: skip


def gap_data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.uniform(-3, GAP[0], n // 2), rng.uniform(GAP[1], 3, n - n // 2)])
    return x[:, None], np.sin(2 * x) + GAP_SIGMA * rng.normal(size=n)


def gap_figure(a: argparse.Namespace, client: Client) -> tuple[str, float]:
    x, y = gap_data(a.gap_points)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1, 50), torch.nn.Tanh(), torch.nn.Linear(50, 1))
    model = model.double()
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)[:, None]
    opt = torch.optim.LBFGS(model.parameters(), max_iter=a.lbfgs, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        w = torch.cat([p.flatten() for p in model.parameters()])
        loss = ((model(xt) - yt) ** 2).sum() / (2 * GAP_SIGMA**2) + 0.5 * a.gap_delta * (w @ w)
        loss.backward()
        return loss

    opt.step(closure)
    reg = LaplaceGPRegressor(model, prior_precision=a.gap_delta, sigma=GAP_SIGMA, client=client)
    grid = np.linspace(-4, 4, a.grid)[:, None]
    mean, sd = reg.fit(x, y).predict(grid, return_std=True)
    caption = (f"Laplace-GP of a 1-50-1 tanh MLP on a 1-D regression with a gap\n"
               f"N = {len(x)}, delta = {a.gap_delta:g}, sigma = {GAP_SIGMA:g}")  # fmt: skip
    return gap_png(x, y, grid, mean, sd**2, GAP_SIGMA, os.path.join(a.out, "trained-gap.png"),
                   gap=GAP, caption=caption, dpi=a.dpi)  # fmt: skip


def lml_figure(a: argparse.Namespace, client: Client) -> str:
    x, y, x_test, y_test = fig5.dataset(a.lml_set)
    rows = []
    for delta in np.logspace(-2, 2, a.deltas):
        model = fig5.train(x, y, float(delta), a.lml_set)
        reg = LaplaceGPRegressor(model, prior_precision=float(delta), sigma=fig5.SIGMA,
                                 client=client).fit(x, y)  # fmt: skip
        mse = float(((reg.predict(x_test) - y_test) ** 2).mean())
        rows.append({"delta": float(delta), "lml": reg.log_marginal_likelihood_,
                     "test_error": mse})  # fmt: skip
    best = min(rows, key=lambda r: r["test_error"])
    chosen = max(rows, key=lambda r: r["lml"])
    print(f"LML's delta {chosen['delta']:.3g} (test MSE {chosen['test_error']:.4f}), "
          f"best delta {best['delta']:.3g} (test MSE {best['test_error']:.4f})")  # fmt: skip
    caption = (
        f"Seed Fig. 5 (set {a.lml_set}): 1-20-1 tanh MLP, N = {len(x)} (few near x = 0),\n"
        f"sigma = {fig5.SIGMA:g}, a network trained per delta"
    )
    return lml_png(rows, os.path.join(a.out, "trained-lml.png"), caption=caption, dpi=a.dpi)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="docs")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--train-size", type=int, default=300)
    p.add_argument("--delta", type=float, default=1.0, help="the CNN's prior precision")
    p.add_argument("--steps", type=int, default=400, help="the CNN's Adam steps")
    p.add_argument("--train-seconds", type=float, default=120.0)
    p.add_argument("--gap-points", type=int, default=60)
    p.add_argument("--gap-delta", type=float, default=1.0)
    p.add_argument("--lbfgs", type=int, default=2000, help="L-BFGS iterations, gap MLP")
    p.add_argument("--grid", type=int, default=201, help="x grid of the gap figure")
    p.add_argument("--deltas", type=int, default=21, help="points of logspace(-2, 2)")
    p.add_argument("--lml-set", type=int, default=0)
    p.add_argument("--dpi", type=int, default=100)
    p.add_argument("--only", nargs="+", choices=("kernel", "gap", "lml"),
                   default=["kernel", "gap", "lml"], help="make only these figures")  # fmt: skip
    return p


def main(argv: list[str] | None = None) -> dict:
    a = parser().parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    torch.set_num_threads(1)
    with (
        tempfile.TemporaryDirectory(prefix="nngp-trained-figures-") as folder,
        LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                     dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):  # fmt: skip
        files, ratio = {}, None
        if "kernel" in a.only:
            files["kernel"] = kernel_figure(a, folder, client)
        if "gap" in a.only:
            files["gap"], ratio = gap_figure(a, client)
            print(f"variance of f at the gap's centre / at the data: {ratio:.2f}")
            if not ratio > 1:
                raise SystemExit(f"the variance in the gap is not larger than at the data: {ratio}")
        if "lml" in a.only:
            files["lml"] = lml_figure(a, client)
    for f in files.values():
        print("wrote", f)
    return {"files": files, "gap_ratio": ratio}


if __name__ == "__main__":
    main()
