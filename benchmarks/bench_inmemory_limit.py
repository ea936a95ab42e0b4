"""Where the plain in-memory SciPy pipeline stops on this machine, on a kernel from a store.

Runs bench_solver.py's SciPy pipeline (read the train x train kernel and mirror it, cho_factor,
cho_solve, solve_triangular for the variances: what a user writes with NumPy and SciPy) in a
fresh process on the leading N x N block of an existing store's kernel, for each N, and
records its wall time and peak memory (VmHWM), or how it failed (MemoryError, or killed by the
kernel's OOM killer: exit -9).

    python benchmarks/bench_inmemory_limit.py --store /tmp/nngp-bench/fm50k.zarr \\
        --n 30000 35000 50000 --test 2000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from bench_solver import SCIPY


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", required=True)
    p.add_argument("--n", type=int, nargs="+", required=True)
    p.add_argument("--test", type=int, default=2000)
    p.add_argument("--noise", type=float, default=1e-3)
    a = p.parse_args()
    for n in a.n:
        start = time.perf_counter()
        out = subprocess.run(
            [sys.executable, "-c", SCIPY, a.store, str(a.noise), str(n), str(a.test)],
            capture_output=True,
            text=True,
        )
        wall = round(time.perf_counter() - start, 1)
        row = {
            "n": n,
            "m": a.test,
            "date": time.strftime("%Y-%m-%d"),
            "wall_s": wall,
            "returncode": out.returncode,
        }
        if out.returncode == 0:
            r = json.loads(out.stdout)
            row.update(
                read_s=round(r["read_s"], 1),
                factor_s=round(r["factor_s"], 1),
                solve_predict_s=round(r["solve_predict_s"], 1),
                peak_rss_gb=round(r["peak_rss"] / 1e9, 2),
            )
        else:
            tail = out.stderr.strip().splitlines()[-1:] or ["(no message: killed)"]
            row["failure"] = tail[0]
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
