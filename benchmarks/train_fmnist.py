"""Train the Fashion-MNIST networks of the trained-network benchmarks: LeNet-5 and an MLP.

The networks (:func:`lenet5`, 61,706 weights; :func:`mlp`, 784-256-128-10, 235,146 weights)
are trained by Adam in float32 on the first ``--train`` images of the training set (all 60,000
by default), inputs in [0, 1] as ``nngp_dist.datasets.load`` gives them, softmax
cross-entropy plus weight decay. The objective is ``mean CE + wd/2 |w|^2``, i.e. ``N`` times
less than ``sum CE + delta/2 |w|^2`` with ``delta = N wd``: the MAP of a Gaussian prior of
precision ``delta``, which each output file records (``prior_precision``) so that the
Laplace-GP can use the same prior. Seeded; a few minutes on 2 cores.

Writes ``<out>/<net>.pt`` (a ``state_dict``, loadable with ``torch.load(weights_only=True)``),
``<out>/<net>.pt2`` (a ``torch.export`` archive of the float64 network, batch size dynamic:
what ``--arch trained --model`` takes) and ``<out>/<net>.json`` (training record, MAP test
accuracy)::

    python benchmarks/train_fmnist.py --net lenet5 --threads 1 --out /tmp/fmnist-nets
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from nngp_dist import datasets


def lenet5() -> nn.Module:
    """LeNet-5 for 28 x 28 inputs (61,706 weights), input (n, 1, 28, 28)."""
    return nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10),
    )  # fmt: skip


def mlp() -> nn.Module:
    """A two-hidden-layer ReLU MLP (784-256-128-10, 235,146 weights), input (n, 1, 28, 28)."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(),
        nn.Linear(128, 10),
    )  # fmt: skip


NETS = {"lenet5": lenet5, "mlp": mlp}
INPUT_SHAPE = (1, 28, 28)


def train(net: nn.Module, x: np.ndarray, y: np.ndarray, a: argparse.Namespace) -> list[float]:
    """Adam on mean cross-entropy + weight decay; the mean loss of each epoch."""
    xt = torch.as_tensor(x, dtype=torch.float32).reshape(len(x), *INPUT_SHAPE)
    yt = torch.as_tensor(y, dtype=torch.int64)
    opt = torch.optim.Adam(net.parameters(), lr=a.lr, weight_decay=a.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, a.epochs)
    gen = torch.Generator().manual_seed(a.seed)
    losses = []
    net.train()
    for _ in range(a.epochs):
        total = 0.0
        for idx in torch.randperm(len(xt), generator=gen).split(a.batch):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(net(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        sched.step()
        losses.append(total / len(xt))
        print(f"epoch {len(losses)}: loss {losses[-1]:.4f}", flush=True)
    return losses


def accuracy(net: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        xt = torch.as_tensor(x, dtype=torch.float32).reshape(len(x), *INPUT_SHAPE)
        return float((net.eval()(xt).argmax(1).numpy() == y).mean())


def export(net: nn.Module, path: Path) -> None:
    """A float64 ``torch.export`` archive of ``net`` in evaluation mode, batch size dynamic."""
    net64 = net.double().eval()
    example = torch.zeros((2, *INPUT_SHAPE), dtype=torch.float64)
    ep = torch.export.export(net64, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(ep, str(path))
    net.float()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--net", choices=sorted(NETS), default="lenet5")
    p.add_argument("--out", required=True, help="folder for <net>.pt, <net>.pt2, <net>.json")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--train", type=int, default=60000, help="training images used")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    ds = datasets.load("fashion-mnist", data_dir=a.data_dir, train_size=a.train)
    net = NETS[a.net]()
    start = time.perf_counter()
    losses = train(net, ds.x_train, ds.y_train, a)
    seconds = time.perf_counter() - start
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), out / f"{a.net}.pt")
    record = {
        "net": a.net,
        "weights": int(sum(v.numel() for v in net.parameters())),
        "train_images": len(ds.x_train),
        "epochs": a.epochs,
        "lr": a.lr,
        "weight_decay": a.weight_decay,
        "prior_precision": a.weight_decay * len(ds.x_train),
        "losses": losses,
        "train_seconds": round(seconds, 1),
        "map_test_accuracy": accuracy(net, ds.x_test, ds.y_test),
        "seed": a.seed,
    }
    export(net, out / f"{a.net}.pt2")
    (out / f"{a.net}.json").write_text(json.dumps(record, indent=2))
    print(json.dumps(record))
    return record


if __name__ == "__main__":
    main()
