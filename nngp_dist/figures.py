"""Figures from a finished store (and a sweep): PNGs made with matplotlib's Agg backend.

* ``calibration.png``: predictive variance against realised squared error, per bin of test points
  sorted by predicted variance (Lee et al. 2018, figure 4); a calibrated GP lies on the diagonal.
* ``kernel.png``: the kernel of a sample of training points sorted by class, as correlations
  k(x, x') / sqrt(k(x, x) k(x', x')).
* ``learning-curve.png``: test accuracy (or MSE) against the number of training points, from the
  store's one factor: the GP on the first n points needs only two triangular solves with the
  leading n x n block of the factor, at the store's (absolute) noise.
* ``sweep-depth<L>.png``: validation accuracy over (w_var, b_var) at one depth, from
  ``nngp-dist sweep`` (best noise per cell), like the phase diagrams of Lee et al.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np

from .errors import UserError
from .layout import ALPHA, CHOL, K_TEST_TRAIN, K_TRAIN_TRAIN, T_TRAIN, Y_TEST, Y_TRAIN
from .predict import leading_alpha, metrics, targets
from .storage import KernelStore, read_checked, solve_block
from .tiling import span, symmetric

__all__ = ["figures", "learning_curve", "sweep_heatmap"]

DEFAULT_SIZES = (1000, 2000, 5000, 10000, 20000, 50000)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=120)
    os.replace(path + ".tmp.png", path)
    _pyplot().close(fig)
    return path


def sweep_heatmap(
    rows: list[dict],
    depth: int,
    metric: str,
    weight_vars: list[float],
    bias_vars: list[float],
    path: str,
) -> str:
    """Heat map of ``metric`` (best over noise) over w_var (x) and b_var (y) at ``depth``."""
    plt = _pyplot()
    better = max if metric == "validation_accuracy" else min
    grid = np.full((len(bias_vars), len(weight_vars)), np.nan)
    for r in rows:
        if r["depth"] != depth or r.get("result") != "ok":
            continue
        i, j = bias_vars.index(r["bias_var"]), weight_vars.index(r["weight_var"])
        v = r[metric]
        grid[i, j] = v if np.isnan(grid[i, j]) else better(grid[i, j], v)
    fig, ax = plt.subplots(
        figsize=(max(6.0, 1.6 + 0.9 * len(weight_vars)), max(3.5, 1.2 + 0.6 * len(bias_vars)))
    )
    im = ax.imshow(
        grid, origin="lower", aspect="auto", cmap="viridis" if better is max else "viridis_r"
    )
    ax.set_xticks(range(len(weight_vars)), [f"{w:g}" for w in weight_vars])
    ax.set_yticks(range(len(bias_vars)), [f"{b:g}" for b in bias_vars])
    ax.set_xlabel("weight variance $\\sigma_w^2$")
    ax.set_ylabel("bias variance $\\sigma_b^2$")
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            if not np.isnan(grid[i, j]):
                ax.text(
                    j,
                    i,
                    f"{grid[i, j]:.3f}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="w"
                    if (grid[i, j] - np.nanmin(grid)) < 0.5 * np.ptp(grid[~np.isnan(grid)])
                    else "k",
                )
    ax.set_title(f"{metric.replace('_', ' ')}, depth {depth} (best noise per cell)")
    fig.colorbar(im, ax=ax)
    return _save(fig, path)


def learning_curve(store: KernelStore, sizes: list[int] | None = None) -> list[dict]:
    """Test accuracy and MSE of the GP on the first n training points, for each n in ``sizes``.

    Uses the store's Cholesky factor (``solve --method cholesky``): U[:n, :n] factors the first
    n points' kernel plus the same absolute noise. Streams tiles; memory is a few tiles.
    """
    meta = store.meta
    solved = meta.get("solve") or {}
    if solved.get("method") != "cholesky" or not (store.has(CHOL) and store.has(ALPHA)):
        raise UserError(
            f"{store.url}: the learning curve needs a Cholesky solve; run "
            f"'nngp-dist solve --store {store.url}' (without --method cg) first"
        )
    n, t, m = meta["n_train"], solve_block(meta), meta["n_test"]
    sizes = sorted({min(s, n) for s in (sizes or DEFAULT_SIZES) if s >= 1} | {n})
    tt = np.asarray(store.read(T_TRAIN), dtype=np.float64)
    y = store.read(Y_TEST)
    labels = y.dtype.kind in "iu"
    truth = targets(y, tt.shape[1]) if labels else y.reshape(m, -1)
    out = []
    for size in sizes:
        if size == n:
            alpha = store.read(ALPHA)
        else:
            alpha = leading_alpha(store.array(CHOL), t, size, tt, store.url)[0]
        mean = np.zeros((m, tt.shape[1]))
        for j in range(math.ceil(size / t)):
            cols = span(t, size, j)
            block = read_checked(store.array(K_TEST_TRAIN), (slice(None), cols), url=store.url)
            mean += np.asarray(block, dtype=np.float64) @ alpha[cols]
        row = {"n_train": size, "mse": float(((mean - truth) ** 2).mean())}
        if labels:
            row["accuracy"] = float((mean.argmax(1) == y).mean())
        out.append(row)
    return out


def _calibration_png(store: KernelStore, path: str, bins: int) -> str:
    plt = _pyplot()
    cal = metrics(store, bins=bins)["calibration"]
    v = np.array([b["mean_variance"] for b in cal])
    e = np.array([b["mse"] for b in cal])
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    lo, hi = min(v.min(), e.min()), max(v.max(), e.max())
    ax.plot([lo, hi], [lo, hi], color="0.6", lw=1, label="calibrated")
    ax.plot(v, e, "o-", label=f"{len(cal)} bins of test points")
    ax.set_xlabel("mean predictive variance (fitted output scale)")
    ax.set_ylabel("realised mean squared error")
    ax.set_title("Calibration")
    ax.legend()
    return _save(fig, path)


def _kernel_png(store: KernelStore, path: str, sample: int) -> str:
    plt = _pyplot()
    meta = store.meta
    n, t = meta["n_train"], meta["tile_size"]
    s = min(sample, n)
    k = np.empty((s, s))
    for i in range(math.ceil(s / t)):
        for j in range(i, math.ceil(s / t)):
            r, c = span(t, s, i), span(t, s, j)
            tile = read_checked(store.array(K_TRAIN_TRAIN), (r, c), url=store.url, complete=False)
            tile = np.asarray(tile, dtype=np.float64)
            k[r, c] = tile
            k[c, r] = tile.T
    k = symmetric(k)  # diagonal tiles hold their upper triangle
    d = np.sqrt(np.diag(k))
    y = np.asarray(store.array(Y_TRAIN)[:s])
    order = np.argsort(y, kind="stable") if y.dtype.kind in "iu" else np.arange(s)
    corr = (k / d[:, None] / d[None, :])[np.ix_(order, order)]
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    im = ax.imshow(corr, cmap="magma", interpolation="nearest")
    if y.dtype.kind in "iu":
        ys = y[order]
        edges = np.flatnonzero(np.diff(ys)) + 0.5
        for e_ in edges:
            ax.axhline(e_, color="w", lw=0.4)
            ax.axvline(e_, color="w", lw=0.4)
        ax.set_xlabel(f"first {s} training points, sorted by class")
    ax.set_title("Kernel correlation")
    fig.colorbar(im, ax=ax)
    return _save(fig, path)


def _curve_png(rows: list[dict], path: str) -> str:
    plt = _pyplot()
    key = "accuracy" if "accuracy" in rows[0] else "mse"
    fig, ax = plt.subplots(figsize=(4.8, 3.8))
    ax.plot([r["n_train"] for r in rows], [r[key] for r in rows], "o-")
    ax.set_xscale("log")
    ax.set_xlabel("training points")
    ax.set_ylabel(f"test {key}")
    ax.set_title("Learning curve")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def figures(
    store: str,
    out: str,
    *,
    sweep: str | None = None,
    sizes: list[int] | None = None,
    sample: int = 500,
    bins: int = 20,
) -> dict:
    """Write the PNGs this module describes into ``out``; return their paths and the curve."""
    ks = KernelStore.open(store)
    stage = ks.status()["stage"]
    if stage != "done":
        raise UserError(f"{store} is at stage {stage!r}; figures need a finished run (done)")
    if sample < 2 or bins < 1:
        raise UserError("--sample must be at least 2 and --bins at least 1")
    sweep_doc = None
    if sweep:
        try:
            with open(sweep) as f:
                sweep_doc = json.load(f)
            sweep_doc["rows"], sweep_doc["best"]  # noqa: B018
        except (OSError, ValueError, KeyError) as e:
            raise UserError(
                f"--sweep {sweep}: not a sweep.json written by nngp-dist sweep ({e})"
            ) from None
    solved = ks.meta.get("solve") or {}
    if solved.get("method") != "cholesky":
        raise UserError(
            f"{store} was solved by CG; the figures' learning curve needs the Cholesky factor: "
            f"run 'nngp-dist solve --store {store}' (without --method cg) first"
        )
    os.makedirs(out, exist_ok=True)
    paths = {
        "calibration": _calibration_png(ks, os.path.join(out, "calibration.png"), bins),
        "kernel": _kernel_png(ks, os.path.join(out, "kernel.png"), sample),
    }
    curve = learning_curve(ks, sizes)
    paths["learning_curve"] = _curve_png(curve, os.path.join(out, "learning-curve.png"))
    with open(os.path.join(out, "learning-curve.json"), "w") as f:
        json.dump(curve, f, indent=1)
    if sweep_doc:
        rows, best = sweep_doc["rows"], sweep_doc["best"]
        metric = "validation_accuracy" if sweep_doc["select_by"] == "accuracy" else "validation_mse"
        ws = sorted({r["weight_var"] for r in rows})
        bs = sorted({r["bias_var"] for r in rows})
        png = os.path.join(out, f"sweep-depth{best['depth']}.png")
        paths["sweep"] = sweep_heatmap(rows, best["depth"], metric, ws, bs, png)
    return {"files": paths, "learning_curve": curve}
