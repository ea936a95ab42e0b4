"""Per-pair cost of image-network kernels on one CPU core, or on a GPU: the compiled program
against the layer-by-layer recursion, in the same run, on the same Fashion-MNIST images.

For each network (an 8-layer 3x3 ReLU ConvNet, NNGP and NTK; the same with a residual
connection every 2 layers; ResNet-32), times ``Spec.cross`` on an n x n block of images (best
of --repeat) with the compiled program and with it switched off, and prints microseconds per
pair, nanoseconds per map entry (``Spec.map_entries_per_pair``), the ratio, the largest
relative difference between the two (pairs of distinct images), and what a 60,000 + 10,000
image kernel (upper train tiles and test x train) would take at that rate on one such device.

    python benchmarks/bench_conv_pairs.py --n 48                      # CPU: the numba loop
    python benchmarks/bench_conv_pairs.py --n 1000 --device gpu       # GPU: the numba.cuda kernel
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np

import nngp_dist.kernels.spec as spec_module
from nngp_dist import Spec
from nngp_dist.datasets import load

NETS = {
    "conv8": {"arch": "conv", "depth": 8},
    "conv8-ntk": {"arch": "conv", "depth": 8, "kernel": "ntk"},
    "conv8-skip2": {"arch": "conv", "depth": 8, "skip_every": 2},
    "resnet32": {"arch": "resnet32"},
    "resnet32-ntk": {"arch": "resnet32", "kernel": "ntk"},
}


# Pairs in a 60k-train, 10k-test kernel: the upper train x train triangle and test x train.
MNIST_PAIRS = 60_000 * 60_001 // 2 + 10_000 * 60_000


def best_seconds(spec: Spec, x1: Any, x2: Any, repeat: int, sync: Any) -> tuple[float, Any]:
    out = spec.cross(x1[:2], x2[:2])  # loads (compiles) the program outside the timing
    sync()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        out = spec.cross(x1, x2)
        sync()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=48, help="images per side of the timed block")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--nets", nargs="*", default=sorted(NETS), choices=sorted(NETS))
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    args = p.parse_args()
    x = load("fashion-mnist", train_size=2 * args.n, test_size=1).x_train.reshape(2 * args.n, -1)
    x1, x2 = x[: args.n], x[args.n :]
    sync, host = (lambda: None), np.asarray
    if args.device == "gpu":
        import cupy

        x1, x2 = cupy.asarray(x1), cupy.asarray(x2)
        sync, host = cupy.cuda.Device().synchronize, cupy.asnumpy
    pairs = args.n * args.n
    print(
        f"| network ({args.device}) | compiled us/pair | ns/entry | layer by layer us/pair | "
        "ratio | max diff | 60k + 10k, compiled |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in args.nets:
        spec = Spec(weight_var=2.0, bias_var=0.05, image_shape=(28, 28, 1), **NETS[name])
        assert spec_module.fused.applies(spec), name
        fast, got = best_seconds(spec, x1, x2, args.repeat, sync)
        applies = spec_module.fused.applies
        spec_module.fused.applies = lambda spec: False
        try:
            slow, want = best_seconds(spec, x1, x2, args.repeat, sync)
        finally:
            spec_module.fused.applies = applies
        got, want = host(got), host(want)
        diff = float(np.max(np.abs(got - want) / np.abs(want)))
        entries = spec.map_entries_per_pair()
        print(
            f"| {name} | {fast / pairs * 1e6:.2f} | {fast / pairs / entries * 1e9:.3f} | "
            f"{slow / pairs * 1e6:.2f} | {slow / fast:.2f} | {diff:.1e} | "
            f"{fast / pairs * MNIST_PAIRS / 3600:.2f} h |"
        )


if __name__ == "__main__":
    main()
