"""Which CG preconditioner converges faster on real kernels: none, block-Jacobi or Nystrom.

Builds a kernel store of the first N Fashion-MNIST training images (3-layer ReLU NNGP), then for
each noise level solves (K + s I) alpha = T (one-hot targets) by CG on the store, with and
without the block-Jacobi preconditioner, and records iterations and seconds to reach --tol.

    python benchmarks/bench_cg.py --n 5000 --tile 1000 --noise 1e-1 1e-2 1e-3
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from nngp_dist import KernelStore, jobs
from nngp_dist.cluster import connect
from nngp_dist.predict import targets
from nngp_dist.solvers.cg import StoreSystem


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--tile", type=int, default=1000)
    p.add_argument("--noise", type=float, nargs="+", default=[1e-1, 1e-2, 1e-3])
    p.add_argument("--tol", type=float, default=1e-6)
    p.add_argument("--maxiter", type=int, default=2000)
    a = p.parse_args()
    store = str(Path(tempfile.mkdtemp()) / "k.zarr")
    with connect(workers=2) as c:
        jobs.kernel(
            store,
            dataset="fashion-mnist",
            train_size=a.n,
            test_size=10,
            tile_size=a.tile,
            depth=3,
            weight_var=1.45,
            bias_var=0.28,
            client=c,
            progress=False,
        )
        ks = KernelStore.open(store, "r+")
        t = targets(ks.read("y_train"), 10)
        mean_diag = ks.mean_diag()
        for noise in a.noise:
            for precond in ("none", "block-jacobi", "nystrom"):
                start = time.perf_counter()
                system = StoreSystem(ks, c, noise * mean_diag, precond=precond)
                _, log = system.solve(t, tol=a.tol, maxiter=a.maxiter)
                print(
                    json.dumps(
                        {
                            "n": a.n,
                            "tile": a.tile,
                            "noise": noise,
                            "preconditioner": precond,
                            "iterations": log["iterations"],
                            "converged": log["converged"],
                            "true_residual": log["true_residual"],
                            "seconds": round(time.perf_counter() - start, 2),
                        }
                    ),
                    flush=True,
                )


if __name__ == "__main__":
    main()
