"""The seed's number: NNGP GP-20-1.45-0.28 (ReLU) on 1,000 MNIST images (Lee et al.: 0.9279).

The MNIST training images were not on the machine this was measured on (no network beyond the
package registries); the official test set was (t10k-images-idx3-ubyte and
t10k-labels-idx1-ubyte, in --mnist-dir). So this trains on the first 1,000 images of the
official test set and tests on the other 9,000, and says so. The noise is chosen from a
grid by the accuracy on the last 200 of the 1,000 training images held out (Lee et al. chose on
a validation set), then the GP is fitted on all 1,000 with it; no test label is used to choose.
Every grid point's test accuracy is printed too, for reference.

    python benchmarks/bench_seed_mnist.py --mnist-dir DIR
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from nngp_dist import jobs
from nngp_dist.cluster import connect
from nngp_dist.datasets import _read_idx


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mnist-dir", required=True, help="folder with MNIST's t10k IDX files")
    p.add_argument("--train", type=int, default=1000)
    p.add_argument("--noise", default="1e-10,1e-8,1e-6,1e-4,1e-3,1e-2")
    p.add_argument("--validation-size", type=int, default=200)
    a = p.parse_args()
    d = Path(a.mnist_dir)
    x = _read_idx(d / "t10k-images-idx3-ubyte.gz")
    y = _read_idx(d / "t10k-labels-idx1-ubyte.gz").astype(np.int64)
    folder = Path(tempfile.mkdtemp())
    n = a.train
    np.savez(folder / "mnist.npz", x_train=x[:n], y_train=y[:n], x_test=x[n:], y_test=y[n:])
    store = str(folder / "k.zarr")
    rows = []
    with connect(workers=2) as c:
        t0 = time.perf_counter()
        jobs.kernel(
            store,
            dataset=f"npz:{folder / 'mnist.npz'}",
            depth=20,
            weight_var=1.45,
            bias_var=0.28,
            tile_size=1024,
            client=c,
            progress=False,
        )
        t_kernel = time.perf_counter() - t0
        for noise in (float(s) for s in a.noise.split(",")):
            rec = jobs.solve(store, noise=noise, client=c, progress=False)
            rep = jobs.predict(store, client=c, progress=False)
            rows.append(
                {
                    "noise_requested": noise,
                    "noise": rec["noise"],
                    "log_marginal_likelihood": rec["log_marginal_likelihood"],
                    "accuracy": rep["accuracy"],
                    "mse": rep["mse"],
                }
            )
            print(json.dumps(rows[-1]), flush=True)
        rec = jobs.solve(
            store, noise=a.noise, validation_size=a.validation_size, client=c, progress=False
        )
        rep = jobs.predict(store, client=c, progress=False)
    print(
        json.dumps(
            {
                "train": f"official MNIST test images 0..{n - 1}",
                "test": f"official MNIST test images {n}..9999",
                "kernel_s": t_kernel,
                "selection": rec["selection"],
                "chosen_noise": rec["noise"],
                "test_accuracy": rep["accuracy"],
                "published": 0.9279,
            }
        )
    )


if __name__ == "__main__":
    main()
