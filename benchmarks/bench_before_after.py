"""The kernel, solve and predict stages of this checkout against an earlier commit, in one run.

For a change meant to leave performance alone (a refactor), both versions run the same job in
alternating rounds (before, after, before, after, ...), each round a fresh process and a fresh
store, so that the machine's drift shows up in both columns alike. Each stage's seconds are the
ones the package records itself (the kernel summary, the solve record, the predict report), so
the embedded cluster's start-up is left out. Prints one JSON line per measurement and a Markdown
table (medians and the after / before ratio) for benchmarks/RESULTS.md.

    python benchmarks/bench_before_after.py --before 7e8ce31 --n 10000 --test 2000 --rounds 3

The earlier commit is checked out with ``git worktree`` into a temporary folder and imported
through ``PYTHONPATH``; its dependencies are this environment's. ``--warmup`` rounds (not
recorded) first fill both versions' compiled-code caches.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Runs in a child process against whichever nngp_dist PYTHONPATH points at; uses only the public
# job functions, whose signatures both versions share.
CHILD = """
import json, sys
from nngp_dist import jobs
store, n, m, workers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
cluster = {"workers": workers, "progress": False}
k = jobs.kernel(store, dataset="fashion-mnist", train_size=n, test_size=m, depth=3,
                weight_var=1.45, bias_var=0.28, tile_size=2000, **cluster)
s = jobs.solve(store, noise=1e-3, **cluster)
p = jobs.predict(store, **cluster)
print(json.dumps({"kernel": k["seconds"], "solve": s["seconds"],
                  "predict": p["seconds"]["predict"], "accuracy": p["accuracy"]}))
"""


def run_round(version: str, path: Path, args: argparse.Namespace, tmp: Path) -> dict:
    store = tmp / f"{version}.zarr"
    env = {**os.environ, "PYTHONPATH": str(path)}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(store), str(args.n), str(args.test), str(args.workers)],
        env=env,
        cwd=tmp,
        capture_output=True,
        text=True,
        check=True,
    )
    subprocess.run(["rm", "-rf", str(store)], check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", required=True, help="the earlier commit (any git revision)")
    p.add_argument("--n", type=int, default=10000)
    p.add_argument("--test", type=int, default=2000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="unrecorded rounds first (JIT caches)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="nngp-before-after-") as d:
        tmp = Path(d)
        old = tmp / "before"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(old), args.before],
            check=True,
        )
        rows: dict[str, list[dict]] = {"before": [], "after": []}
        try:
            for r in range(-args.warmup, args.rounds):
                for version, path in (("before", old), ("after", ROOT)):
                    row = run_round(version, path, args, tmp)
                    if r >= 0:
                        rows[version].append(row)
                    print(json.dumps({"round": r, "version": version, **row}), flush=True)
        finally:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], check=False
            )
    print(f"\n| stage | before (median of {args.rounds}) | after | after / before |")
    print("|---|---|---|---|")
    for stage in ("kernel", "solve", "predict"):
        b = statistics.median(r[stage] for r in rows["before"])
        a = statistics.median(r[stage] for r in rows["after"])
        print(f"| {stage} | {b:.2f} s | {a:.2f} s | {a / b:.3f} |")
    same = {r["accuracy"] for v in rows.values() for r in v}
    print(f"\naccuracy in every round: {sorted(same)}")


if __name__ == "__main__":
    main()
