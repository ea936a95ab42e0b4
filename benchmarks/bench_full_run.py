"""The whole job at full scale: kernel, tiled Cholesky, means and variances, against the floor.

Runs ``jobs.run`` (what ``nngp-dist run`` does) on an embedded LocalCluster of --workers
processes limited to --memory-limit each, then records per stage the wall time, the peak
resident memory (VmHWM) of the client (which also hosts the scheduler) and of every worker, the
test accuracy, and the floor computed from this machine's rates measured in the same run:

  GEMM-bound work   Cholesky N^3/3, the variances' triangular solve N^2 M, the Gram matrices
                    2 D (N^2/2 + N M) flops, at the measured GEMM rate of all cores
  elementwise work  the recursion's passes over the N^2/2 + N M entries at the measured
                    per-entry cost of one core (Spec.cross_from on a 2000 x 2000 tile, whose
                    Gram is precomputed), divided over the cores

    python benchmarks/bench_full_run.py --train-size 50000 --test-size 10000 \
        --depth 3 --weight-var 1.5 --bias-var 0.1 --noise 1e-3 --memory-limit 5GB
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

import nngp_dist
from nngp_dist import jobs
from nngp_dist.cluster import connect
from nngp_dist.kernels import Spec, input_state


def peak_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def gemm_rate(n: int = 4000) -> float:
    rng = np.random.default_rng(0)
    a, b = rng.random((n, n)), rng.random((n, n))
    a @ b
    start = time.perf_counter()
    a @ b
    return 2.0 * n**3 / (time.perf_counter() - start)


def elementwise_seconds_per_entry(spec: Spec, t: int = 2000) -> float:
    """One core's cost per kernel entry of everything but the Gram GEMM (elementwise NumPy,
    single-threaded: the Gram is precomputed)."""
    x = np.random.default_rng(0).random((t, 784))
    state = input_state(x, x[::-1].copy())
    spec.cross_from(state)
    start = time.perf_counter()
    spec.cross_from(state)
    return (time.perf_counter() - start) / t**2


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--train-size", type=int, default=50000)
    p.add_argument("--test-size", type=int, default=10000)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--weight-var", type=float, default=1.5)
    p.add_argument("--bias-var", type=float, default=0.1)
    p.add_argument("--kernel", default="nngp")
    p.add_argument("--noise", type=float, default=1e-3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--memory-limit", default="5GB")
    p.add_argument("--store", default="/tmp/nngp-bench/full-run.zarr")
    p.add_argument("--json", default=None, help="Also write the record here.")
    a = p.parse_args()

    spec_kw = {
        "depth": a.depth,
        "weight_var": a.weight_var,
        "bias_var": a.bias_var,
        "kernel": a.kernel,
    }
    n, m = a.train_size, a.test_size
    cores = os.cpu_count() or 1
    gemm = gemm_rate()
    per_entry = elementwise_seconds_per_entry(Spec(**spec_kw))
    entries = n * (n + 1) / 2 + n * m
    floor = {
        "cholesky_s": n**3 / 3 / gemm,
        "variance_solve_s": n**2 * m / gemm,
        "kernel_s": 2 * 784 * entries / gemm + entries * per_entry / cores,
    }
    floor["total_s"] = sum(floor.values())
    Path(a.store).parent.mkdir(parents=True, exist_ok=True)
    with connect(workers=a.workers, memory_limit=a.memory_limit) as c:
        start = time.perf_counter()
        report = jobs.run(
            a.store,
            dataset=a.dataset,
            train_size=n,
            test_size=m,
            noise=a.noise,
            client=c,
            progress=False,
            **spec_kw,
        )
        wall = time.perf_counter() - start
        workers = sorted(c.run(peak_rss).values())
    meta = nngp_dist.KernelStore.open(a.store).meta
    stages = {k: v.get("seconds") for k, v in meta["stages"].items()}
    row = {
        "date": time.strftime("%Y-%m-%d"),
        "n_train": n,
        "n_test": m,
        "spec": spec_kw,
        "noise": report["noise"],
        "workers": a.workers,
        "memory_limit": a.memory_limit,
        "accuracy": report.get("accuracy"),
        "mse": report["mse"],
        "wall_s": round(wall, 1),
        "stages_s": stages,
        "factor_s": meta["factor"]["seconds"],
        "gemm_gflops": round(gemm / 1e9, 1),
        "elementwise_ns_per_entry": round(per_entry * 1e9, 2),
        "floor_s": {k: round(v, 1) for k, v in floor.items()},
        "ratio_to_floor": round(wall / floor["total_s"], 2),
        "cholesky_gflops": round(n**3 / 3 / meta["factor"]["seconds"] / 1e9, 1),
        "peak_rss_gb": {
            "client": round(peak_rss() / 1e9, 2),
            "workers": [round(w / 1e9, 2) for w in workers],
        },
        "train_matrix_gb": round(8 * n * n / 1e9, 1),
        "calibration": report["calibration"],
    }
    text = json.dumps(row, indent=1)
    print(text)
    if a.json:
        Path(a.json).write_text(text)


if __name__ == "__main__":
    main()
