"""Kernel throughput of a fully connected ReLU NNGP, against baselines measured in the same run.

Counts the N^2 entries of the full symmetric train x train matrix (the tiled engine computes the
upper tiles only; the baselines compute all of them). Prints one JSON object per measurement and
a Markdown table for benchmarks/RESULTS.md: one row per round, each round measuring the floor,
the engine and neural-tangents one after the other, since these VMs drift by 20-50% within
minutes; the ratios are taken within a round.

    python benchmarks/bench_fc_kernel.py --n 10000 --depth 3 --workers 2

Baselines:
  naive   the plain in-memory NumPy recursion on the whole matrix (no tiles, no symmetry);
  nt      neural-tangents (jit, float64) from its own virtualenv, if --nt-python points at one
          (see benchmarks/nt_baseline.py for how to build it);
  floor   the machine's floor: the Gram GEMM of the upper tiles at the GEMM rate measured here,
          plus the L-layer ReLU recursion over the upper tiles at the per-entry, per-layer cost
          of the engine's compiled loop measured here on one core (cache-resident), divided
          over the workers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import nngp_dist
from nngp_dist.kernels import Spec, input_state

W_VAR, B_VAR = 1.45, 0.28


def fashion_mnist(n: int) -> np.ndarray:
    ds = nngp_dist.load_dataset("fashion-mnist", train_size=n, test_size=1, download=False)
    return ds.x_train.reshape(n, -1)


def naive(x: np.ndarray, depth: int) -> float:
    start = time.perf_counter()
    d = x.shape[1]
    k = W_VAR * (x @ x.T) / d + B_VAR
    v = np.diag(k).copy()
    for _ in range(depth):
        s = np.sqrt(np.outer(v, v))
        rho = np.clip(k / s, -1, 1)
        theta = np.arccos(rho)
        k = W_VAR * s * (np.sin(theta) + (np.pi - theta) * rho) / (2 * np.pi) + B_VAR
        v = W_VAR * v / 2 + B_VAR
    return time.perf_counter() - start


def gemm_rate(x: np.ndarray) -> float:
    """FLOP/s of a general product on all cores (distinct operands: ``x @ x.T`` would be a SYRK
    doing half the work, which overstates the rate 1.7x here)."""
    a, b = x[: len(x) // 2], x[len(x) // 2 :].copy()
    best = math.inf
    for _ in range(3):
        start = time.perf_counter()
        a @ b.T
        best = min(best, time.perf_counter() - start)
    return 2.0 * len(a) * len(b) * x.shape[1] / best


def relu_step_seconds_per_entry(depth: int) -> float:
    """One core's cost per entry and layer of the recursion the engine runs (the compiled loop
    of ``nngp_dist.kernels.fused``), on a cache-resident block, the Gram matrix excluded."""
    rng = np.random.default_rng(0)
    x1, x2 = rng.random((32, 64)), rng.random((2048, 64))
    state = input_state(x1, x2)
    spec = Spec(depth=depth, weight_var=W_VAR, bias_var=B_VAR)
    spec.cross_from(state)  # compile or load the loop
    best = math.inf
    for _ in range(20):
        start = time.perf_counter()
        spec.cross_from(state)
        best = min(best, time.perf_counter() - start)
    return best / (state.nngp.size * depth)


def engine(x: np.ndarray, depth: int, tile: int, workers: int) -> float:
    folder = Path(tempfile.mkdtemp())
    try:
        data = folder / "data.npz"
        np.savez(data, x_train=x, y_train=np.zeros(len(x), int), x_test=x[:1], y_test=[0])
        from nngp_dist.cluster import connect

        with connect(workers=workers) as client:
            summary = nngp_dist.kernel(
                str(folder / "k.zarr"),
                dataset=f"npz:{data}",
                depth=depth,
                weight_var=W_VAR,
                bias_var=B_VAR,
                tile_size=tile,
                client=client,
                progress=False,
            )
        return summary["seconds"]
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def neural_tangents(python: str, n: int, depth: int) -> float | None:
    script = Path(__file__).with_name("nt_baseline.py")
    out = subprocess.run(
        [python, str(script), "--n", str(n), "--depth", str(depth), "--repeat", "2"],
        capture_output=True,
        text=True,
    )
    if out.returncode:
        print(out.stderr[-2000:], file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])["seconds"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=10000)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--tiles", default="1000,2000", help="tile sizes to try, comma-separated")
    p.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="rounds of (floor, engine, neural-tangents), interleaved so that the "
        "VM's drift hits every contestant; the median round is reported",
    )
    p.add_argument("--nt-python", default="/tmp/ntenv/bin/python")
    p.add_argument("--skip-naive", action="store_true")
    a = p.parse_args()
    n, depth = a.n, a.depth
    x = fashion_mnist(n)
    entries = float(n) * n
    rows = []

    def record(name: str, seconds: float | None, **extra: object) -> None:
        if seconds is None:
            return
        row = {
            "impl": name,
            "n": n,
            "depth": depth,
            "seconds": round(seconds, 3),
            "entries_per_s": entries / seconds,
            **extra,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)

    for r in range(a.rounds):
        rate = gemm_rate(x)
        per_entry = relu_step_seconds_per_entry(depth)
        for tile in (int(t) for t in a.tiles.split(",")):
            blocks = math.ceil(n / tile)
            upper = blocks * (blocks + 1) // 2 * tile * tile  # entries in the upper tiles
            floor = 2.0 * upper * x.shape[1] / rate + depth * upper * per_entry / a.workers
            record(
                "floor",
                floor,
                tile=tile,
                round=r,
                gemm_gflops=round(rate / 1e9, 1),
                relu_ns_per_entry=round(per_entry * 1e9, 1),
            )
            record(
                "nngp_dist",
                engine(x, depth, tile, a.workers),
                tile=tile,
                round=r,
                workers=a.workers,
            )
        if os.path.exists(a.nt_python):
            record("neural-tangents", neural_tangents(a.nt_python, n, depth), round=r)
    if not a.skip_naive:
        record("naive-numpy", naive(x, depth))

    print(
        f"\n{platform.node()} {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}, N={n}, "
        f"depth {depth}, float64"
    )
    print(
        "| round | nngp_dist best (tile) | neural-tangents | speed-up | floor | nngp_dist / floor |"
    )
    print("|---|---|---|---|---|---|")
    summary = []
    for r in range(a.rounds):
        mine = [x for x in rows if x["impl"] == "nngp_dist" and x.get("round") == r]
        best = min(mine, key=lambda x: x["seconds"])
        floor = next(
            x
            for x in rows
            if x["impl"] == "floor" and x.get("round") == r and x["tile"] == best["tile"]
        )
        nt = next((x for x in rows if x["impl"] == "neural-tangents" and x["round"] == r), None)
        speedup = nt["seconds"] / best["seconds"] if nt else math.nan
        summary.append((speedup, best["seconds"] / floor["seconds"]))
        print(
            f"| {r + 1} | {best['seconds']:.2f} s ({best['tile']}) | "
            f"{nt['seconds'] if nt else math.nan:.2f} s | {speedup:.2f}x | "
            f"{floor['seconds']:.2f} s | {summary[-1][1]:.2f} |"
        )
    naive_row = next((x for x in rows if x["impl"] == "naive-numpy"), None)
    if naive_row:
        print(f"\nnaive in-memory NumPy: {naive_row['seconds']:.2f} s")
    speedups, floors = zip(*summary)
    print(
        f"\nmedian round: {np.median(speedups):.2f}x neural-tangents, "
        f"{np.median(floors):.2f}x the floor's time"
    )


if __name__ == "__main__":
    main()
