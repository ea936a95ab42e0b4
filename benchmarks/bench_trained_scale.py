"""GP-Laplace of a trained Fashion-MNIST network on m training points, all 10 classes, out of
core, beside laplace-torch's GP-Laplace at m = 1600 and the MAP network (goal 2 of the
trained-network issue: ECE at least as good as laplace-torch's, NLL no worse than the MAP's,
accuracy within 0.5 point of the MAP's; under 60 minutes end to end at m = 20,000 on 2 cores).

The network comes from ``benchmarks/train_fmnist.py`` (its ``.pt2`` archive and its ``.json``
record, whose ``prior_precision`` is the default delta). Stages, each its own invocation so
that each is timed alone on a quiet machine; each writes one JSON file:

* ``--stage select``: the prior precision delta of least validation NLL over ``--deltas``, at
  ``--m`` training images (a pilot, smaller than the main run's), the validation images being
  the last ``--val`` test images, never among the first ``--test`` that are scored. The
  network's own weight decay gives a delta (its ``.json``), but with a subset of m << 60,000
  points in the Gauss-Newton precision that delta leaves the posterior far too wide: the
  pilot's grid says how far. The other stages take ``--prior-precision`` (default: the
  network's).
* ``--stage nngp``: ``jobs.run(arch="trained", likelihood="classification")`` on the first
  ``--m`` training images and the first ``--test`` test images, on the embedded cluster of
  ``--workers`` single-threaded workers of ``--memory-limit`` each (below one class's kernel of
  m^2 float64 numbers: the kernels, factors and solves stream through the store). Reports the
  wall time of the whole call (cluster start, network terms, the one pass over the tiles for
  all 10 outputs, 10 factors, 10 test-variance solves), the stages' seconds, the store's size,
  and the scores (probit probabilities, 15-bin ECE) on all test points and on the first
  ``--compare`` of them, with the MAP network's on the same points. With ``--lml-grid`` (small m
  only: it holds the 10 kernels in memory) also the train log marginal likelihood over
  delta in logspace(-1, 3, 9), from the same kernels.
* ``--stage laplace-torch``: ``Laplace(net, "classification", subset_of_weights="all",
  hessian_structure="gp", independent_outputs=True, n_subset=--lt-m)``, fitted on the first
  ``--m`` training images (laplace-torch draws its ``n_subset`` points among them), probit
  predictive (``link_approx="probit"``) on the first ``--compare`` test images; torch on
  ``--workers`` threads, float64. Scored with the same functions.

    python benchmarks/train_fmnist.py --net lenet5 --out /tmp/nets
    python benchmarks/bench_trained_scale.py --stage select --net /tmp/nets/lenet5 --m 2000 \\
        --tile-size 1000 --json /tmp/scale-select.json
    python benchmarks/bench_trained_scale.py --stage nngp --net /tmp/nets/lenet5 \\
        --m 20000 --test 5000 --store /data/scale.zarr --json /tmp/scale-nngp.json
    python benchmarks/bench_trained_scale.py --stage laplace-torch --net /tmp/nets/lenet5 \\
        --m 20000 --lt-m 1600 --json /tmp/scale-lt.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from nngp_dist import datasets, jobs, laplace
from nngp_dist.layout import MEAN, VARIANCE
from nngp_dist.storage import KernelStore

INPUT_SHAPE = (1, 28, 28)


def _data(a: argparse.Namespace) -> datasets.Dataset:
    return datasets.load("fashion-mnist", data_dir=a.data_dir, train_size=a.m, test_size=a.test)


def _delta(a: argparse.Namespace) -> float:
    if a.prior_precision is not None:
        return a.prior_precision
    return float(json.loads(Path(f"{a.net}.json").read_text())["prior_precision"])


def _du(path: str) -> float:
    out = subprocess.run(["du", "-sb", path], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0]) / 1e9


def _laplace_run(a: argparse.Namespace, data: datasets.Dataset, delta: float, progress: bool):
    """``run --arch trained --likelihood classification`` of the network into ``a.store``."""
    return jobs.run(
        a.store,
        dataset=data,
        arch="trained",
        model=f"{a.net}.pt2",
        input_shape=INPUT_SHAPE,
        prior_precision=delta,
        likelihood="classification",
        tile_size=a.tile_size,
        dtype="float64",
        workers=a.workers,
        memory_limit=a.memory_limit,
        progress=progress,
    )


def run_nngp(a: argparse.Namespace) -> dict:
    data = _data(a)
    delta = _delta(a)
    if Path(a.store).exists() and not a.resume:
        shutil.rmtree(a.store)  # a fresh store: the run is timed from nothing
    start = time.perf_counter()
    report = _laplace_run(a, data, delta, a.progress)
    wall = time.perf_counter() - start
    ks = KernelStore.open(a.store)
    mean, var = ks.read(MEAN), ks.read(VARIANCE)
    n = min(a.compare, len(mean))
    out = {
        "engine": "nngp_dist",
        "m": a.m,
        "test": len(mean),
        "prior_precision": delta,
        "wall_seconds": round(wall, 1),
        "stages": {k: v.get("seconds") for k, v in ks.meta.get("stages", {}).items()},
        "store_gb": round(_du(a.store), 2),
        "workers": a.workers,
        "memory_limit": a.memory_limit,
        "tile_size": ks.meta["tile_size"],
        "scores_all": {k: report[k] for k in report if k.endswith(("accuracy", "nll", "ece"))},
        f"scores_first_{n}": laplace.scores("classification", mean[:n], var[:n], data.y_test[:n]),
        "log_marginal_likelihood": report["log_marginal_likelihood"],
    }
    if a.lml_grid:
        grid = laplace.lml_grid(a.store, np.logspace(-1, 3, 9))
        out["lml_grid"] = [(r["prior_precision"], r["log_marginal_likelihood"]) for r in grid]
    return out


def run_select(a: argparse.Namespace) -> dict:
    """The prior precision of least validation NLL at ``--m`` training images, the validation
    set being the last ``--val`` test images (never among the first ``--test`` scored)."""
    full = datasets.load("fashion-mnist", data_dir=a.data_dir, train_size=a.m)
    if a.val + a.test > len(full.x_test):
        raise SystemExit(
            "--val + --test exceed the test set: the validation images would be scored"
        )
    x_val, y_val = full.x_test[-a.val :], full.y_test[-a.val :]
    data = datasets.from_arrays("fashion-mnist", full.x_train, full.y_train, x_val, y_val)
    rows = []
    for delta in a.deltas:
        if Path(a.store).exists():
            shutil.rmtree(a.store)
        rep = _laplace_run(a, data, delta, False)
        keys = ("accuracy", "nll", "ece", "map_nll", "log_marginal_likelihood")
        rows.append({"prior_precision": delta, **{k: rep[k] for k in keys}})
        print(json.dumps(rows[-1]), flush=True)
    best = min(rows, key=lambda r: r["nll"])
    return {
        "stage": "select",
        "m": a.m,
        "validation": a.val,
        "grid": rows,
        "prior_precision": best["prior_precision"],
    }


def run_laplace_torch(a: argparse.Namespace) -> dict:
    import torch
    from laplace import Laplace
    from torch.utils.data import DataLoader, TensorDataset

    torch.set_num_threads(a.workers)
    data = _data(a)
    from train_fmnist import NETS  # this folder's training script

    record = json.loads(Path(f"{a.net}.json").read_text())
    net = NETS[record["net"]]()
    net.load_state_dict(torch.load(f"{a.net}.pt", weights_only=True))
    net = net.double().eval()
    x = torch.as_tensor(data.x_train, dtype=torch.float64).reshape(-1, *INPUT_SHAPE)
    y = torch.as_tensor(data.y_train, dtype=torch.int64)
    torch.manual_seed(0)  # laplace-torch draws its subset of points at random
    la = Laplace(
        net,
        "classification",
        subset_of_weights="all",
        hessian_structure="gp",
        independent_outputs=True,
        n_subset=a.lt_m,
        prior_precision=_delta(a),
    )
    start = time.perf_counter()
    la.fit(DataLoader(TensorDataset(x, y), batch_size=a.batch))
    fit = time.perf_counter() - start
    print(f"laplace-torch fit: {fit:.1f} s", file=sys.stderr, flush=True)
    n = min(a.compare, len(data.x_test))
    xt = torch.as_tensor(data.x_test[:n], dtype=torch.float64).reshape(-1, *INPUT_SHAPE)
    start = time.perf_counter()
    probs = np.concatenate(
        [la(xb, pred_type="gp", link_approx="probit").detach().numpy() for xb in xt.split(a.batch)]
    )
    predict = time.perf_counter() - start
    from nngp_dist import likelihoods

    yt = data.y_test[:n]
    return {
        "engine": "laplace-torch",
        "m": a.lt_m,
        "prior_precision": _delta(a),
        "fit_seconds": round(fit, 1),
        "predict_seconds": round(predict, 1),
        f"scores_first_{n}": {
            "accuracy": float((probs.argmax(1) == yt).mean()),
            "nll": likelihoods.nll(probs, yt),
            "ece": likelihoods.ece(probs, yt, 15),
        },
    }


STAGES = {"select": run_select, "nngp": run_nngp, "laplace-torch": run_laplace_torch}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stage", choices=tuple(STAGES), required=True)
    p.add_argument("--net", required=True, help="path prefix of <net>.pt2 and <net>.json")
    p.add_argument("--m", type=int, default=20000)
    p.add_argument("--test", type=int, default=5000)
    p.add_argument("--compare", type=int, default=2000, help="test points scored by both")
    p.add_argument("--prior-precision", type=float, default=None)
    p.add_argument("--store", default="/tmp/bench-trained-scale.zarr")
    p.add_argument("--tile-size", type=int, default=2000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--memory-limit", default="3GB")
    p.add_argument("--lt-m", type=int, default=1600, help="laplace-torch's n_subset")
    p.add_argument("--batch", type=int, default=100, help="laplace-torch's batch size")
    p.add_argument("--lml-grid", action="store_true")
    p.add_argument("--val", type=int, default=1000, help="select: validation images")
    p.add_argument("--deltas", type=float, nargs="+", default=[3, 10, 30, 100, 300, 1000])
    p.add_argument("--progress", action="store_true")
    p.add_argument("--resume", action="store_true", help="nngp: resume the store's run")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    out = STAGES[a.stage](a)
    out["command"] = "python benchmarks/bench_trained_scale.py " + " ".join(argv or [])
    print(json.dumps(out, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
