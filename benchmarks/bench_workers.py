"""A whole job on 1, 2 and 4 worker processes, and the cost of a worker killed mid-job.

The job: `run` (kernel, tiled Cholesky, means and variances) of the 3-layer ReLU NNGP on the
first --n Fashion-MNIST training images and --m test images, tile --tile, on an embedded
LocalCluster of K single-threaded worker processes (each a nanny and its worker, as
`dask worker` runs them). Speed-up is the 1-worker wall time over the K-worker one.

The fault: the same job on 2 workers, one worker process SIGKILLed once --kill-after kernel
tiles are done; its nanny starts a new one, the scheduler reruns the lost worker's tasks, the
job finishes. Reported: the extra seconds over the clean 2-worker run, and that the results are
identical.

    python benchmarks/bench_workers.py --n 10000 --m 2000 --tile 1000 --workers 1 2 4
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from nngp_dist import KernelStore, jobs, open_store
from nngp_dist.cluster import connect

SPEC = {"depth": 3, "weight_var": 1.45, "bias_var": 0.28, "noise": 1e-3}


def run(store: str, n: int, m: int, tile: int, workers: int, kill_after: int | None) -> dict:
    with connect(workers=workers) as c:
        killed = {}
        if kill_after is not None:
            pids = c.run(os.getpid)

            def killer() -> None:
                while True:
                    time.sleep(0.05)
                    try:
                        done = KernelStore.open(store).status()["tiles_done"]
                    except Exception:  # not created yet
                        continue
                    if done >= kill_after:
                        address, pid = sorted(pids.items())[-1]
                        os.kill(pid, signal.SIGKILL)
                        killed.update(worker=address, at_tiles=done, at=time.perf_counter())
                        return

            threading.Thread(target=killer, daemon=True).start()
        start = time.perf_counter()
        report = jobs.run(
            store,
            dataset="fashion-mnist",
            train_size=n,
            test_size=m,
            tile_size=tile,
            client=c,
            progress=False,
            **SPEC,
        )
        wall = time.perf_counter() - start
    return {
        "workers": workers,
        "wall_s": round(wall, 2),
        "accuracy": report["accuracy"],
        "killed": {k: v for k, v in killed.items() if k != "at"} or None,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=10000)
    p.add_argument("--m", type=int, default=2000)
    p.add_argument("--tile", type=int, default=1000)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--kill-after", type=int, default=20)
    a = p.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench-workers-"))
    rows = []
    for k in a.workers:
        rows.append(run(str(folder / f"w{k}.zarr"), a.n, a.m, a.tile, k, None))
        print(json.dumps(rows[-1]), flush=True)
    base = rows[0]["wall_s"]
    for r in rows:
        print(f"{r['workers']} workers: {r['wall_s']:.1f} s, speed-up {base / r['wall_s']:.2f}")
    clean = next((r for r in rows if r["workers"] == 2), None)
    faulty = run(str(folder / "killed.zarr"), a.n, a.m, a.tile, 2, a.kill_after)
    print(json.dumps(faulty), flush=True)
    if clean:
        same = np.array_equal(
            open_store(str(folder / "killed.zarr"))["mean"].values,
            open_store(str(folder / "w2.zarr"))["mean"].values,
        )
        print(
            f"killed worker: {faulty['wall_s']:.1f} s against {clean['wall_s']:.1f} s clean: "
            f"{faulty['wall_s'] - clean['wall_s']:+.1f} s; means identical: {same}"
        )


if __name__ == "__main__":
    main()
