"""Kernel build of a trained LeNet-5-sized CNN at m training points, float64: nngp_dist against
laplace-torch's GP-Laplace (goal 3 of the trained-network issue: at least 5x faster, with
bounded memory).

* nngp_dist: ``jobs.kernel(arch="trained")`` on a ``torch.export`` archive of the network, on
  the embedded cluster of 2 single-threaded worker processes (``workers=2``); the time is the
  kernel stage's (``seconds`` of its summary: planning, the tiles and their writes; not the
  cluster's start, which is reported apart as the wall time of the call). The trace kernel
  ``sum_c J_c J_c^T / delta`` (one store, what ``run --arch trained`` computes first): its
  pass computes every output's kernel ``J_c J_c^T / delta`` of a tile (``per_output_cross``)
  and sums them before writing, so it does the contractions of laplace-torch's C kernels.
  ``--outputs all`` adds the Laplace-GP's kernels: ``jobs.run(..., likelihood=
  "classification")`` on a fresh store, whose one pass over the tiles writes the C per-output
  kernels and the trace (its ``kernel`` stage's seconds, as recorded in the store); the
  posterior's factors and test variances (two test images) follow and are reported apart.
* laplace-torch: ``Laplace(model, "classification", subset_of_weights="all",
  hessian_structure="gp", independent_outputs=True, n_subset=m)`` (its current names of
  ``diagonal_kernel=True`` and ``M=m``), ``.fit(loader)`` on the same m images (batches of
  ``--batch``) with torch on 2 threads; ``fit`` builds the C m x m kernels batch pair by
  batch pair and then takes C Cholesky factors of m x m matrices (included in its time: at
  m = 1600, C m^3 / 3 = 14 GFLOP, a few seconds on 2 cores).

Each measurement runs in a fresh process (so that no caches or allocator state carry over and
its peak memory is its own); the two engines alternate, the first one swapped every round.
Reported per round: seconds and peak resident memory (the driver's and, for nngp_dist, its
largest worker's). Same machine, same dtype (float64), same weights.

What bounds nngp_dist's memory. Per worker: the network (P weights), one tile of
``tile_size^2`` float64 numbers, and the features of one block of a tile's rows -- per Linear
or Conv2d layer its inputs at every position and one cotangent per output (never the per-
example Jacobian of P numbers per output), or its per-example weight gradients when these are
smaller -- with the pair temporaries of one block of rows by one of columns, and the column
block's features when they are kept: each of the three is sized to stay under
``nngp_dist.kernels.trained.MEMORY_BUDGET`` (256 MiB). So a worker needs about model + tile +
3 x 256 MiB, whatever m (the kernel goes to disk, m^2 / 2 numbers per kernel); the driver holds
the inputs. laplace-torch holds C m x m kernels and C m x m inverses (m = 1600, C = 10: 2 x 205
MB in float64; growing as m^2 C) and a batch pair's Jacobians (2 x batch x C x P float64
numbers: 0.99 GB at batch 100, P = 61,706), all in one process.

    python benchmarks/bench_trained_speed.py --m 1600 --rounds 3 [--outputs all] [--json F]

Test at small m: ``--m 200 --rounds 1``. The network: seeded initial weights, or
``--weights FILE`` (a state_dict of :func:`lenet5`, e.g. a trained one).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from train_fmnist import lenet5  # this folder's networks

from nngp_dist import datasets, jobs
from nngp_dist.storage import KernelStore

HERE = Path(__file__).resolve()
DELTA = 1.0


def network(weights: str | None) -> torch.nn.Module:
    torch.manual_seed(0)
    net = lenet5()
    if weights:
        net.load_state_dict(torch.load(weights, weights_only=True))
    return net.double().eval()


def _data(a: argparse.Namespace) -> datasets.Dataset:
    return datasets.load(a.dataset, train_size=a.m, test_size=2)


def _peak_mib(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # Linux: KiB


def run_nngp(a: argparse.Namespace) -> dict:
    data = _data(a)
    with tempfile.TemporaryDirectory(prefix="nngp-speed-") as folder:
        example = torch.as_tensor(data.x_train[:2], dtype=torch.float64)[:, None]
        ep = torch.export.export(network(a.weights), (example,),
                                 dynamic_shapes=({0: torch.export.Dim("batch")},))  # fmt: skip
        model = os.path.join(folder, "lenet5.pt2")
        torch.export.save(ep, model)
        out = {"engine": "nngp_dist", "m": a.m}
        kw = dict(dataset=data, arch="trained", model=model, input_shape=(1, 28, 28),
                  prior_precision=DELTA, tile_size=a.tile_size, dtype="float64", workers=2,
                  progress=False)  # fmt: skip
        start = time.perf_counter()
        summary = jobs.kernel(os.path.join(folder, "trace.zarr"), **kw)
        out["trace_wall_seconds"] = time.perf_counter() - start
        out["trace_seconds"] = summary["seconds"]
        if a.outputs == "all":
            store = os.path.join(folder, "laplace.zarr")
            start = time.perf_counter()
            jobs.run(store, likelihood="classification", **kw)
            out["laplace_wall_seconds"] = time.perf_counter() - start
            out["per_output_seconds"] = KernelStore.open(store).meta["stages"]["kernel"]["seconds"]
    out["driver_peak_mib"] = _peak_mib(resource.RUSAGE_SELF)
    out["worker_peak_mib"] = _peak_mib(resource.RUSAGE_CHILDREN)  # the largest child
    return out


def run_laplace_torch(a: argparse.Namespace) -> dict:
    from laplace import Laplace
    from torch.utils.data import DataLoader, TensorDataset

    torch.set_num_threads(2)
    data = _data(a)
    x = torch.as_tensor(data.x_train, dtype=torch.float64)[:, None]
    y = torch.as_tensor(data.y_train, dtype=torch.int64)
    la = Laplace(network(a.weights), "classification", subset_of_weights="all",
                 hessian_structure="gp", independent_outputs=True, n_subset=a.m,
                 prior_precision=DELTA)  # fmt: skip
    loader = DataLoader(TensorDataset(x, y), batch_size=a.batch)
    start = time.perf_counter()
    la.fit(loader)
    seconds = time.perf_counter() - start
    return {"engine": "laplace-torch", "m": a.m, "batch": a.batch, "fit_seconds": seconds,
            "driver_peak_mib": _peak_mib(resource.RUSAGE_SELF)}  # fmt: skip


def _one(engine: str, argv: list[str]) -> dict:
    """One measurement in a fresh process: its JSON line."""
    cmd = [sys.executable, str(HERE), "--one", engine, *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"{engine} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--m", type=int, default=1600)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--weights", default=None, help="a state_dict of lenet5 (default: seeded)")
    p.add_argument("--outputs", choices=("trace", "all"), default="trace")
    p.add_argument("--tile-size", type=int, default=None)
    p.add_argument("--batch", type=int, default=100, help="laplace-torch's batch size")
    p.add_argument("--json", default=None)
    p.add_argument("--one", choices=("nngp", "laplace"), default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    a = parser().parse_args(argv)
    if a.one:
        result = run_nngp(a) if a.one == "nngp" else run_laplace_torch(a)
        print(json.dumps(result))
        return result
    rows = []
    for r in range(a.rounds):
        order = ("nngp", "laplace") if r % 2 == 0 else ("laplace", "nngp")
        for engine in order:
            row = {"round": r, **_one(engine, argv)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    nn = np.median([r["trace_seconds"] for r in rows if r["engine"] == "nngp_dist"])
    lt = np.median([r["fit_seconds"] for r in rows if r["engine"] == "laplace-torch"])
    summary = {"m": a.m, "nngp_trace_seconds": float(nn), "laplace_torch_fit_seconds": float(lt),
               "speedup_trace": float(lt / nn)}  # fmt: skip
    if a.outputs == "all":
        per = np.median([r["per_output_seconds"] for r in rows if r["engine"] == "nngp_dist"])
        summary.update(nngp_per_output_seconds=float(per), speedup_per_output=float(lt / per))
    print(json.dumps(summary))
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": rows, "summary": summary}, indent=2))
    return summary


if __name__ == "__main__":
    main()
