"""Figures of trained networks (DNN2GP): PNGs made with matplotlib's Agg backend.

* :func:`trace_kernel_png`: the trace kernel ``sum_c J_c J_c^T / delta`` of a store made with
  ``arch="trained"`` on a sample of its training points, sorted by class, with the class names
  and a labelled colorbar (the seed's Fig. 4).
* :func:`gap_png`: a 1-D regression's Laplace-GP posterior (mean +- 2 standard deviations of
  the network's output ``f`` and of the target ``y``) over ``x``, with a gap in the training
  inputs; the in-between uncertainty (the seed's Fig. 3). :func:`gap_variance_ratio` is the
  number it shows: the variance at the gap's centre over the largest variance at the data.
* :func:`lml_png`: the train log marginal likelihood and the test error over the prior
  precision ``delta``, each one's best ``delta`` marked (the seed's Fig. 5).

The callers (``benchmarks/trained_figures.py``, ``notebooks/trained_network.ipynb``) train
the networks and compute the posteriors; these functions only draw, from arrays and stores,
and need no PyTorch.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from .datasets import class_names
from .errors import UserError
from .kernels import Spec
from .layout import K_TRAIN_TRAIN, Y_TRAIN
from .storage import KernelStore
from .tiling import span, symmetric

__all__ = ["gap_png", "gap_variance_ratio", "lml_png", "trace_kernel_png"]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str, dpi: int) -> str:
    """Write ``fig`` to ``path`` in the format its extension names (png, jpg, svg, ...)."""
    fig.tight_layout()
    ext = os.path.splitext(path)[1]
    fig.savefig(path + ".tmp" + ext, dpi=dpi, bbox_inches="tight")
    os.replace(path + ".tmp" + ext, path)
    _pyplot().close(fig)
    return path


def _train_kernel(ks: KernelStore, s: int) -> np.ndarray:
    """The first ``s`` training points' kernel, read tile by tile (upper tiles only)."""
    t = ks.meta["tile_size"]
    k = np.empty((s, s))
    for i in range(math.ceil(s / t)):
        for j in range(i, math.ceil(s / t)):
            r, c = span(t, s, i), span(t, s, j)
            tile = np.asarray(ks.array(K_TRAIN_TRAIN)[r, c], dtype=np.float64)
            k[r, c] = tile
            k[c, r] = tile.T
    return symmetric(k)  # diagonal tiles hold their upper triangle


def trace_kernel_png(
    store: str, path: str, *, network: str, sample: int = 1000, dpi: int = 120
) -> str:
    """The class-sorted trace kernel of a trained network's store (its first ``sample``
    training points), as it is and as a correlation; ``network`` names the network in the
    caption. The format follows ``path``'s extension (a ``.jpg`` is far smaller)."""
    ks = KernelStore.open(store)
    spec = Spec.from_dict(ks.meta["spec"])
    if spec.arch != "trained" or spec.output != "trace":
        raise UserError(f"{store}: not the trace kernel of a trained network (arch='trained')")
    st = ks.status()
    if st["tiles_done"] < st["tiles_total"]:
        raise UserError(f"the kernel in {store} is incomplete: re-run the kernel command")
    s = min(sample, ks.meta["n_train"])
    k = _train_kernel(ks, s)
    y = np.asarray(ks.array(Y_TRAIN)[:s])
    if y.dtype.kind not in "iu":
        raise UserError(f"{store}: the class-sorted kernel needs integer class labels")
    order = np.argsort(y, kind="stable")
    ys = y[order]
    k = k[np.ix_(order, order)]
    d = np.sqrt(np.diag(k))
    starts = np.concatenate([[0], np.flatnonzero(np.diff(ys)) + 1])
    centres = (starts + np.concatenate([starts[1:], [s]]) - 1) / 2
    names = class_names(ks.meta["dataset"], ys[starts])
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11.0, 5.0))
    panels = (
        (k, "viridis", "kappa(x, x') = sum_c J_c(x) . J_c(x') / delta"),
        (k / d[:, None] / d[None, :], "magma", "kappa(x, x') / sqrt(kappa(x, x) kappa(x', x'))"),
    )
    for ax, (values, cmap, label) in zip(axes, panels):
        im = ax.imshow(values, cmap=cmap, interpolation="nearest")
        for e in starts[1:] - 0.5:
            ax.axhline(e, color="w", lw=0.5)
            ax.axvline(e, color="w", lw=0.5)
        ax.set_xticks(centres, names, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(centres, names, fontsize=7)
        fig.colorbar(im, ax=ax, shrink=0.85).set_label(label, fontsize=8)
    axes[0].set_title("trace kernel", fontsize=9)
    axes[1].set_title("as a correlation", fontsize=9)
    fig.suptitle(
        f"Trace kernel of a trained {network}: {ks.meta['dataset']}, "
        f"N = {s} training images sorted by class, delta = {spec.prior_precision:g}",
        fontsize=10,
    )
    return _save(fig, path, dpi)


def gap_variance_ratio(x_train: Any, x: Any, var: Any, gap: tuple[float, float]) -> float:
    """The variance ``var`` at the centre of ``gap`` (at the grid point of ``x`` nearest it)
    over the largest variance at the data (at the grid points nearest the training inputs
    outside the gap): above 1 when the posterior is less sure in the gap than at any data."""
    x_train, x, var = (np.asarray(a, dtype=np.float64).ravel() for a in (x_train, x, var))
    lo, hi = gap
    centre = var[np.abs(x - (lo + hi) / 2).argmin()]
    near = np.abs(x[:, None] - x_train[None, :]).argmin(axis=0)  # grid points at the data
    at_data = var[np.unique(near[(x_train < lo) | (x_train > hi)])]
    if not len(at_data):
        raise UserError("no training input outside the gap")
    return float(centre / at_data.max())


def gap_png(
    x_train: Any,
    y_train: Any,
    x: Any,
    mean: Any,
    var_f: Any,
    sigma: float,
    path: str,
    *,
    gap: tuple[float, float],
    caption: str,
    dpi: int = 120,
) -> tuple[str, float]:
    """The posterior over the grid ``x`` (sorted): mean +- 2 sd of f (variance ``var_f``) and
    of y (``var_f + sigma^2``), the training points and the gap; (the file, the ratio of
    :func:`gap_variance_ratio`)."""
    x, mean, var_f = (np.asarray(a, dtype=np.float64).ravel() for a in (x, mean, var_f))
    ratio = gap_variance_ratio(x_train, x, var_f, gap)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 3.6))
    sd_f, sd_y = np.sqrt(var_f), np.sqrt(var_f + sigma**2)
    ax.axvspan(*gap, color="0.92", label="gap in the data")
    ax.fill_between(x, mean - 2 * sd_y, mean + 2 * sd_y, color="C0", alpha=0.15,
                    label="mean +- 2 sd of y")  # fmt: skip
    ax.fill_between(x, mean - 2 * sd_f, mean + 2 * sd_f, color="C0", alpha=0.35,
                    label="mean +- 2 sd of f")  # fmt: skip
    ax.plot(x, mean, color="C0", lw=1.5, label="posterior mean (MAP network)")
    ax.plot(np.ravel(x_train), np.ravel(y_train), "k.", ms=3, label="training data")
    ax.set_xlabel("x")
    ax.set_ylabel("f(x), y")
    ax.set_title(f"{caption}\nvariance of f at the gap's centre / at the data: {ratio:.1f}x",
                 fontsize=9)  # fmt: skip
    ax.legend(fontsize=7, loc="lower left", ncol=2)
    return _save(fig, path, dpi), ratio


def lml_png(rows: list[dict], path: str, *, caption: str, error: str = "test MSE",
            dpi: int = 120) -> str:  # fmt: skip
    """Train LML (left axis) and test error (right axis) over the prior precision; ``rows``
    have ``delta``, ``lml`` and ``test_error``. The LML's best delta and the error's are
    marked."""
    if len(rows) < 2:
        raise UserError("the LML figure needs at least two prior precisions")
    d = np.array([r["delta"] for r in rows], dtype=np.float64)
    lml = np.array([r["lml"] for r in rows], dtype=np.float64)
    err = np.array([r["test_error"] for r in rows], dtype=np.float64)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    ax.plot(d, lml, "o-", color="C0", ms=3, label="train log marginal likelihood")
    ax.axvline(d[lml.argmax()], color="C0", ls="--", lw=1, label="LML's delta")
    ax.set_xscale("log")
    ax.set_xlabel("prior precision delta")
    ax.set_ylabel("train log marginal likelihood", color="C0")
    ax2 = ax.twinx()
    ax2.plot(d, err, "s-", color="C3", ms=3, label=error)
    ax2.axvline(d[err.argmin()], color="C3", ls=":", lw=1, label=f"lowest {error}")
    ax2.set_ylabel(error, color="C3")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2),
              ncol=2)  # fmt: skip
    ax.set_title(caption, fontsize=9)
    return _save(fig, path, dpi)
