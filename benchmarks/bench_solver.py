"""The tiled solver stages against the plain in-memory SciPy pipeline, on the same kernel.

For each N: computes (or reuses) a kernel store of the first N Fashion-MNIST training images and
M test images (3-layer ReLU NNGP), then times

  tiled   `solve` (tiled Cholesky + alpha) and `predict` (means and variances) on an embedded
          LocalCluster of --workers processes limited to --memory-limit each;
  scipy   in a fresh process: read the full matrix, `cho_factor`, `cho_solve` for alpha,
          `solve_triangular` for the variances (the plain pipeline; skipped with --no-scipy);

and records wall times, the Cholesky's GFLOP/s (N^3 / 3 flops) against the machine's GEMM rate
measured in the same run, and the peak RSS of every process (the client, which also hosts the
scheduler, each worker, and the SciPy process).

    python benchmarks/bench_solver.py --n 10000 20000 --test 2000
    python benchmarks/bench_solver.py --n 30000 --test 2000 --memory-limit 2GB --no-scipy
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import nngp_dist
from nngp_dist import jobs
from nngp_dist.cluster import connect

SPEC = {"depth": 3, "weight_var": 1.45, "bias_var": 0.28}


def peak_rss() -> int:
    """Peak resident memory since this process's exec (VmHWM; getrusage's ru_maxrss would
    include the forking parent's, which Linux keeps across exec)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def gemm_rate(n: int = 4000, k: int = 4000) -> float:
    rng = np.random.default_rng(0)
    a, b = rng.random((n, k)), rng.random((k, n))
    a @ b
    start = time.perf_counter()
    a @ b
    return 2.0 * n * n * k / (time.perf_counter() - start)


SCIPY = r"""
import json, sys, time
import numpy as np, scipy.linalg as sl, zarr
from nngp_dist.predict import targets
store, noise = sys.argv[1], float(sys.argv[2])
n, m = (int(sys.argv[3]), int(sys.argv[4])) if len(sys.argv) > 3 else (None, None)
def hwm():
    return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
g = zarr.open_group(store, mode="r")
t0 = time.perf_counter()
k = g["k_train_train"][:n, :n]
k = np.triu(k) + np.triu(k, 1).T
ks = g["k_test_train"][:m, :n]
kd = g["k_test_diag"][:m]
y = g["y_train"][:n]
read = time.perf_counter() - t0
s = noise * np.mean(np.diag(k))
k[np.diag_indices_from(k)] += s
t0 = time.perf_counter()
cf = sl.cho_factor(k, lower=True, overwrite_a=True, check_finite=False)
t_factor = time.perf_counter() - t0
alpha = sl.cho_solve(cf, targets(y, 10), check_finite=False)
mean = ks @ alpha
w = sl.solve_triangular(cf[0], ks.T, lower=True, check_finite=False)
var = kd - (w * w).sum(0)
total = time.perf_counter() - t0
print(json.dumps({"read_s": read, "factor_s": t_factor, "solve_predict_s": total,
                  "peak_rss": hwm(),
                  "mean": mean[:50].tolist(), "var": var[:50].tolist()}))
"""


def run(
    n: int,
    m: int,
    tile: int,
    workers: int,
    memory_limit: str,
    noise: float,
    scipy: bool,
    folder: Path,
) -> dict:
    store = str(folder / f"fmnist-{n}-{m}.zarr")
    with connect(workers=workers, memory_limit=memory_limit) as c:
        t0 = time.perf_counter()
        jobs.kernel(
            store,
            dataset="fashion-mnist",
            train_size=n,
            test_size=m,
            tile_size=tile,
            client=c,
            progress=False,
            **SPEC,
        )
        t_kernel = time.perf_counter() - t0
        c.run(lambda: None)
        t0 = time.perf_counter()
        rec = jobs.solve(store, noise=noise, client=c, progress=False)
        t_solve = time.perf_counter() - t0
        t0 = time.perf_counter()
        rep = jobs.predict(store, client=c, progress=False)
        t_predict = time.perf_counter() - t0
        worker_peaks = c.run(peak_rss)
    factor_s = nngp_dist.KernelStore.open(store).meta["factor"]["seconds"]
    row = {
        "n": n,
        "m": m,
        "tile": tile,
        "workers": workers,
        "memory_limit": memory_limit,
        "kernel_s": round(t_kernel, 2),
        "solve_s": round(t_solve, 2),
        "factor_s": factor_s,
        "predict_s": round(t_predict, 2),
        "accuracy": rep["accuracy"],
        "noise": rec["noise"],
        "client_peak_rss": peak_rss(),
        "worker_peak_rss": sorted(worker_peaks.values()),
        "cholesky_gflops": n**3 / 3 / factor_s / 1e9,
    }
    if scipy:
        out = subprocess.run(
            [sys.executable, "-c", SCIPY, store, str(rec["noise"])], capture_output=True, text=True
        )
        if out.returncode:
            row["scipy"] = f"failed: {out.stderr.strip().splitlines()[-1]}"
        else:
            sp = json.loads(out.stdout)
            g = nngp_dist.open_store(store)
            ours_mean, ours_var = g["mean"].values[:50], g["variance"].values[:50]
            sp_var = np.maximum(sp["var"], 0)
            row["scipy"] = {
                "read_s": round(sp["read_s"], 2),
                "factor_s": round(sp["factor_s"], 2),
                "solve_predict_s": round(sp["solve_predict_s"], 2),
                "peak_rss": sp["peak_rss"],
                "cholesky_gflops": n**3 / 3 / sp["factor_s"] / 1e9,
                "max_rel_diff_mean": float(
                    np.abs(ours_mean - sp["mean"]).max() / np.abs(sp["mean"]).max()
                ),
                "max_rel_diff_var": float(np.abs(ours_var - sp_var).max() / sp_var.max()),
            }
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, nargs="+", default=[10000, 20000])
    p.add_argument("--test", type=int, default=2000)
    p.add_argument("--tile", type=int, default=2000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--memory-limit", default="4GB")
    p.add_argument("--noise", type=float, default=1e-3)
    p.add_argument("--no-scipy", action="store_true")
    p.add_argument("--dir", default="/tmp/nngp-bench")
    a = p.parse_args()
    folder = Path(a.dir)
    folder.mkdir(parents=True, exist_ok=True)
    rate = gemm_rate()
    print(
        json.dumps(
            {
                "gemm_gflops_all_cores": rate / 1e9,
                "cores": os.cpu_count(),
                "date": time.strftime("%Y-%m-%d"),
            }
        ),
        flush=True,
    )
    for n in a.n:
        row = run(n, a.test, a.tile, a.workers, a.memory_limit, a.noise, not a.no_scipy, folder)
        row["cholesky_fraction_of_gemm"] = row["cholesky_gflops"] * 1e9 / rate
        print(json.dumps(row), flush=True)
        if isinstance(row.get("scipy"), dict):
            tiled = row["solve_s"] + row["predict_s"]
            sp = row["scipy"]["solve_predict_s"] + row["scipy"]["read_s"]
            print(
                f"N={n}: tiled solve+predict {tiled:.1f} s vs SciPy read+solve+predict "
                f"{sp:.1f} s: ratio {tiled / sp:.2f}; peak memory tiled worker "
                f"{max(row['worker_peak_rss']) / 1e9:.2f} GB, client "
                f"{row['client_peak_rss'] / 1e9:.2f} GB, SciPy "
                f"{row['scipy']['peak_rss'] / 1e9:.2f} GB",
                flush=True,
            )


if __name__ == "__main__":
    main()
