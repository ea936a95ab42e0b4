"""ConvNet GP kernel throughput (8-layer 3x3 ReLU, flatten readout, 28x28x1), against
neural-tangents' stax.Conv on the same inputs, in the same run, with the values compared.

Counts the N^2 entries of the full symmetric matrix. nngp_dist: the whole kernel stage (tiles
of --tile on an embedded LocalCluster of --workers single-threaded processes, or --device gpu);
neural-tangents: its jitted kernel_fn (float64) in its own virtualenv (benchmarks/nt_baseline.py
says how to build it), on all cores. Both see the same seeded uniform [0, 1] images, and the
largest relative difference between the two kernels is printed: an independent check of the
conv recursion (neural-tangents' Conv normalises by fan_in = channels x filter size too).

    python benchmarks/bench_conv_kernel.py --n 400 --tile 100 --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from nngp_dist import KernelStore, jobs, open_store
from nngp_dist.cluster import connect

SPEC = {
    "arch": "conv",
    "depth": 8,
    "filter_size": 3,
    "padding": "same",
    "weight_var": 2.0,
    "bias_var": 0.05,
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=400)
    p.add_argument("--tile", type=int, default=100)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--kernel", default="nngp")
    p.add_argument("--nt-python", default="/tmp/ntenv/bin/python")
    a = p.parse_args()
    rng = np.random.default_rng(0)  # the same draws as nt_baseline.py
    x = rng.uniform(0.0, 1.0, size=(a.n, 784)).reshape(a.n, 28, 28, 1)
    folder = Path(tempfile.mkdtemp(prefix="bench-conv-"))
    data = folder / "images.npz"
    np.savez(data, x_train=x, y_train=np.zeros(a.n, int), x_test=x[:1], y_test=np.zeros(1, int))
    store = str(folder / "k.zarr")
    with connect(workers=a.workers) as c:
        start = time.perf_counter()
        jobs.kernel(
            store,
            dataset=f"npz:{data}",
            tile_size=a.tile,
            device=a.device,
            kernel=a.kernel,
            client=c,
            progress=False,
            **SPEC,
        )
        ours = time.perf_counter() - start
    row = {
        "impl": "nngp_dist",
        "n": a.n,
        "tile": a.tile,
        "workers": a.workers,
        "device": a.device,
        "kernel": a.kernel,
        "seconds": round(ours, 2),
        "entries_per_s": a.n**2 / ours,
        "date": time.strftime("%Y-%m-%d"),
        "tile_seconds_mean": float(
            np.nanmean(KernelStore.open(store).tile_seconds("k_train_train"))
        ),
    }
    print(json.dumps(row), flush=True)
    if not os.path.exists(a.nt_python):
        print(json.dumps({"impl": "neural-tangents", "skipped": f"no {a.nt_python}"}))
        return
    saved = folder / "nt.npy"
    script = Path(__file__).with_name("nt_baseline.py")
    out = subprocess.run(
        [
            a.nt_python,
            str(script),
            "--arch",
            "conv",
            "--n",
            str(a.n),
            "--depth",
            "8",
            "--weight-var",
            str(SPEC["weight_var"]),
            "--bias-var",
            str(SPEC["bias_var"]),
            "--kernel",
            a.kernel,
            "--repeat",
            "1",
            "--save",
            str(saved),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    nt = json.loads(out.stdout.strip().splitlines()[-1])
    k_nt = np.load(saved)
    k_ours = open_store(store)["k_train_train"].values
    nt["max_rel_diff_vs_nngp_dist"] = float(np.abs(k_nt - k_ours).max() / np.abs(k_nt).max())
    print(json.dumps(nt), flush=True)
    print(
        f"nngp_dist {row['entries_per_s'] / 1e3:.1f} k entries/s, neural-tangents "
        f"{nt['entries_per_s'] / 1e3:.1f} k entries/s: ratio "
        f"{row['entries_per_s'] / nt['entries_per_s']:.2f}; kernels agree to "
        f"{nt['max_rel_diff_vs_nngp_dist']:.1e}"
    )


if __name__ == "__main__":
    main()
