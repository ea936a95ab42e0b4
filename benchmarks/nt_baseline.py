"""Neural-tangents baseline: throughput of the infinite-width kernel of a ReLU MLP.

Computes the full n x n NNGP (or NTK) kernel of a depth-hidden-layer ReLU fully connected
network on seeded uniform [0, 1] inputs of dimension 784, in float64, with neural-tangents
(NTK parameterization), and prints one line of JSON to stdout.

Needs neural-tangents in its own virtualenv, e.g.::

    python3 -m venv /tmp/ntenv
    /tmp/ntenv/bin/pip install neural-tangents jax==0.4.23 jaxlib==0.4.23 tf2jax==0.3.6 "numpy<2"

Run::

    /tmp/ntenv/bin/python benchmarks/nt_baseline.py --n 5000 --depth 3 --repeat 2

--batch-size 0 uses the unbatched jitted kernel_fn; otherwise nt.batch(..., batch_size=B).
--check prints K[0:3, 0:3] to stderr.
"""

import argparse
import json
import math
import sys
import time

import jax
import neural_tangents as nt
import numpy as np
from neural_tangents import stax

DIM = 784


def build_kernel_fn(depth, w_var, b_var, arch="fc"):
    w_std, b_std = math.sqrt(w_var), math.sqrt(b_var)
    if arch == "conv":  # 3x3 SAME convs, flatten, dense readout (nngp_dist's --arch conv)
        layers = [
            stax.Conv(512, (3, 3), padding="SAME", W_std=w_std, b_std=b_std),
            stax.Relu(),
        ] * depth + [stax.Flatten()]
    else:
        layers = [stax.Dense(512, W_std=w_std, b_std=b_std), stax.Relu()] * depth
    return stax.serial(*layers, stax.Dense(1, W_std=w_std, b_std=b_std))[2]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--weight-var", type=float, default=1.45)
    p.add_argument("--bias-var", type=float, default=0.28)
    p.add_argument("--kernel", choices=("nngp", "ntk"), default="nngp")
    p.add_argument("--batch-size", type=int, default=0, help="0 = unbatched (default)")
    p.add_argument("--check", action="store_true", help="print K[0:3, 0:3] to stderr")
    p.add_argument(
        "--arch",
        choices=("fc", "conv"),
        default="fc",
        help="conv: 28x28x1 images, 3x3 SAME convs, flatten, dense readout",
    )
    p.add_argument("--save", default=None, help="write the kernel here (.npy)")
    args = p.parse_args(argv)
    jax.config.update("jax_enable_x64", True)

    if args.batch_size and args.n % args.batch_size:
        p.error(f"--batch-size {args.batch_size} must divide --n {args.n}")
    x = np.random.default_rng(0).uniform(0.0, 1.0, size=(args.n, DIM))
    x = jax.device_put(x.reshape(args.n, 28, 28, 1) if args.arch == "conv" else x)
    kernel_fn = build_kernel_fn(args.depth, args.weight_var, args.bias_var, args.arch)

    if args.batch_size:
        # nt.batch jits each block itself; warm up on one block to compile that shape.
        batched = nt.batch(kernel_fn, batch_size=args.batch_size)
        np.asarray(batched(x[: args.batch_size], None, args.kernel))

        def compute():
            return batched(x, None, args.kernel)
    else:
        # Warm-up on a tiny batch, then compile the full shape ahead of time.
        jitted = jax.jit(kernel_fn, static_argnames="get")
        np.asarray(jitted(x[:8], None, get=args.kernel))
        compiled = jitted.lower(x, None, get=args.kernel).compile()

        def compute():
            return compiled(x, None)

    best = math.inf
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        k = np.asarray(compute())
        best = min(best, time.perf_counter() - t0)

    if args.save:
        np.save(args.save, k)
    if args.check:
        np.set_printoptions(precision=17)
        print(repr(k[:3, :3]), file=sys.stderr)
    result = {
        "impl": "neural-tangents",
        "arch": args.arch,
        "kernel": args.kernel,
        "n": args.n,
        "depth": args.depth,
        "seconds": best,
        "entries_per_s": args.n * args.n / best,
        "jax": jax.__version__,
        "neural_tangents": nt.__version__,
        "batch_size": args.batch_size,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
