"""Figures from a finished store (and a sweep): PNGs made with matplotlib's Agg backend.

Each figure's caption names the dataset, the sizes, the network and its hyperparameters.

* ``calibration.png``: the targets' predictive variance (with the fitted output scale, as
  ``predict`` reports it) against the realised squared error, per equal-count bin of test points
  sorted by predicted variance (Lee et al. 2018, figure 4); a calibrated GP lies on the diagonal,
  and the band marks a factor 1.5 either side. With leave-one-out predictions in the store, the
  same bins again with the recalibrated variances (``nngp_dist.predict.recalibration``).
* ``kernel.png``: the kernel of a sample of training points sorted by class (ticks name the
  classes), as correlations k(x, x') / sqrt(k(x, x) k(x', x')).
* ``learning-curve.png``: test accuracy (or MSE) against the number of training points, with
  one-standard-error bars (binomial for accuracy), from the store's one factor: the GP on the
  first n points needs only two triangular solves with the leading n x n block of the factor, at
  the store's (absolute) noise.
* ``sweep-depth<L>.png``: validation accuracy over (w_var, b_var) at one depth, from
  ``nngp-dist sweep`` (best noise per cell), like the phase diagrams of Lee et al.; each cell
  with its binomial standard error, and the cells within one standard error of the best
  outlined as ties.
"""

from __future__ import annotations

import json
import math
import os
import textwrap
from typing import Any

import numpy as np

from .datasets import class_names
from .errors import UserError
from .layout import ALPHA, CHOL, K_TEST_TRAIN, K_TRAIN_TRAIN, T_TRAIN, Y_TEST, Y_TRAIN
from .predict import leading_alpha, metrics, targets
from .storage import KernelStore, read_checked, solve_block
from .tiling import span, symmetric

__all__ = [
    "binomial_se",
    "calibration_ratios",
    "figures",
    "learning_curve",
    "store_caption",
    "sweep_caption",
    "sweep_heatmap",
    "ties",
]

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


def binomial_se(p: Any, n: int) -> Any:
    """Standard error ``sqrt(p (1 - p) / n)`` of an accuracy ``p`` measured on ``n`` points."""
    p = np.asarray(p, dtype=np.float64)
    return np.sqrt(p * (1.0 - p) / n)


def ties(grid: np.ndarray, n_validation: int) -> np.ndarray:
    """Cells of an accuracy ``grid`` within one binomial standard error of its best cell (the
    standard error of the best accuracy on ``n_validation`` points); empty (NaN) cells never."""
    best = np.nanmax(grid)
    with np.errstate(invalid="ignore"):
        return np.nan_to_num(grid, nan=-np.inf) >= best - binomial_se(best, n_validation)


def _title(ax: Any, title: str, caption: str, width: int) -> None:
    """A title and, below it in smaller type, the caption wrapped to ``width`` characters."""
    ax.set_title(f"{title}\n" + textwrap.fill(caption, width), fontsize=8.5, loc="left")


def store_caption(meta: dict) -> str:
    """Dataset, sizes, network and hyperparameters of a solved store, in one line."""
    spec, solved = meta["spec"], meta.get("solve") or {}
    net = spec["arch"] if spec.get("depth") is None else f"{spec['arch']} depth {spec['depth']}"
    noise, sel = solved.get("noise"), solved.get("selection")
    chosen = f" (chosen by {sel['select_by']})" if sel else ""
    return (
        f"{meta['dataset']}, N = {meta['n_train']:,} train / {meta['n_test']:,} test; "
        f"{net} {spec['activation']['name']} {spec['kernel'].upper()}, "
        f"$\\sigma_w^2$ = {spec['weight_var']:g}, $\\sigma_b^2$ = {spec['bias_var']:g}"
        + ("" if noise is None else f", relative noise {noise:g}{chosen}")
    )


def sweep_caption(settings: dict) -> str:
    """Dataset, split and fixed choices of a sweep, in one line."""
    return (
        f"{settings['dataset']}: fit on {settings['train_size']:,}, scored on "
        f"{settings['validation_size']:,} validation points; "
        f"{settings['activation']['name']} {settings['kernel'].upper()}, noises "
        + ", ".join(f"{s:g}" for s in settings["noises"])
        + (" (relative); standardized" if settings.get("standardize") else " (relative)")
    )


def _grid(rows: list[dict], depth: int, metric: str, ws: list, bs: list) -> np.ndarray:
    """``metric`` at ``depth`` over (b_var, w_var), the best over noise per cell (NaN: none)."""
    better = max if metric == "validation_accuracy" else min
    grid = np.full((len(bs), len(ws)), np.nan)
    for r in rows:
        if r["depth"] != depth or r.get("result") != "ok":
            continue
        i, j = bs.index(r["bias_var"]), ws.index(r["weight_var"])
        v = r[metric]
        grid[i, j] = v if np.isnan(grid[i, j]) else better(grid[i, j], v)
    return grid


def _annotate(ax: Any, grid: np.ndarray, se: np.ndarray | None, tied: np.ndarray | None) -> None:
    """Each cell's value (and its standard error); tied cells outlined, the best in bold."""
    from matplotlib.patches import Rectangle

    lo, span_ = np.nanmin(grid), np.ptp(grid[~np.isnan(grid)])
    for i, j in zip(*np.nonzero(~np.isnan(grid)), strict=True):
        text = f"{grid[i, j]:.3f}" + ("" if se is None else f"\n\u00b1{se[i, j]:.3f}")
        best = tied is not None and grid[i, j] == np.nanmax(grid)
        dark = (grid[i, j] - lo) < 0.5 * span_
        ax.text(
            j,
            i,
            text,
            ha="center",
            va="center",
            fontsize=7,
            color="w" if dark else "k",
            fontweight="bold" if best else "normal",
        )
        if tied is not None and tied[i, j]:
            ax.add_patch(Rectangle((j - 0.47, i - 0.47), 0.94, 0.94, fill=False, ec="red", lw=1.6))


def sweep_heatmap(
    rows: list[dict],
    depth: int,
    metric: str,
    weight_vars: list[float],
    bias_vars: list[float],
    path: str,
    settings: dict | None = None,
) -> str:
    """Heat map of ``metric`` (best over noise) over w_var (x) and b_var (y) at ``depth``.

    With the sweep's ``settings`` (and accuracy as the metric) each cell shows its binomial
    standard error on the validation set, and the cells within one standard error of the best
    are outlined as ties; the caption names the dataset, the split and the noises."""
    from matplotlib.lines import Line2D

    plt = _pyplot()
    grid = _grid(rows, depth, metric, weight_vars, bias_vars)
    accuracy = metric == "validation_accuracy"
    n_val = settings["validation_size"] if settings else None
    se = binomial_se(grid, n_val) if accuracy and n_val else None
    tied = ties(grid, n_val) if se is not None else None
    fig, ax = plt.subplots(
        figsize=(max(6.4, 1.8 + 1.0 * len(weight_vars)), max(4.2, 2.2 + 0.7 * len(bias_vars)))
    )
    im = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis" if accuracy else "viridis_r")
    ax.set_xticks(range(len(weight_vars)), [f"{w:g}" for w in weight_vars])
    ax.set_yticks(range(len(bias_vars)), [f"{b:g}" for b in bias_vars])
    ax.set_xlabel("weight variance $\\sigma_w^2$")
    ax.set_ylabel("bias variance $\\sigma_b^2$")
    _annotate(ax, grid, se, tied)
    label = metric.replace("_", " ")
    caption = f"depth {depth}, best noise per cell. " + (
        sweep_caption(settings) if settings else ""
    )
    _title(ax, f"Sweep: {label}", caption, 80)
    fig.colorbar(im, ax=ax, label=f"{label} (best over noise)")
    if tied is not None:
        best = np.nanmax(grid)
        ax.legend(
            [Line2D([], [], marker="s", ms=10, mfc="none", mec="red", ls="none")],
            [
                f"{int(tied.sum())} cells within one standard error "
                f"({float(binomial_se(best, n_val)):.4f}) of the best {best:.4f} (bold): ties"
            ],
            loc="upper center",
            bbox_to_anchor=(0.5, -0.13),
            frameon=False,
            fontsize=8,
        )
    return _save(fig, path)


def learning_curve(store: KernelStore, sizes: list[int] | None = None) -> list[dict]:
    """Test accuracy and MSE of the GP on the first n training points, for each n in ``sizes``,
    with their standard errors over the test points (``accuracy_se`` binomial, ``mse_se`` the
    standard error of the mean of the per-point squared errors).

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
        sq = ((mean - truth) ** 2).mean(axis=1)
        row = {
            "n_train": size,
            "mse": float(sq.mean()),
            "mse_se": float(sq.std(ddof=1) / math.sqrt(m)) if m > 1 else math.nan,
        }
        if labels:
            row["accuracy"] = float((mean.argmax(1) == y).mean())
            row["accuracy_se"] = float(binomial_se(row["accuracy"], m))
        out.append(row)
    return out


def calibration_ratios(cal: list[dict]) -> list[float]:
    """Per calibration bin, realised mean squared error over mean predicted variance (1 on the
    diagonal; above 1: the model is overconfident there)."""
    return [b["mse"] / b["mean_variance"] if b["mean_variance"] > 0 else math.inf for b in cal]


def _calibration_png(
    store: KernelStore, path: str, bins: int
) -> tuple[str, list[dict], list[dict] | None]:
    plt = _pyplot()
    found = metrics(store, bins=bins)
    cal, recal = found["calibration"], found["calibration_recalibrated"]
    scale = (store.meta.get("solve") or {}).get("output_scale")
    v = np.array([b["mean_variance"] for b in cal])
    e = np.array([b["mse"] for b in cal])
    rv = np.array([b["mean_variance"] for b in recal]) if recal else v
    ratio = calibration_ratios(cal)
    fig, ax = plt.subplots(figsize=(5.4, 5.0))
    lo = 0.8 * min(v.min(), e.min(), rv.min())
    hi = 1.25 * max(v.max(), e.max(), rv.max())
    grid = np.geomspace(lo, hi, 50) if lo > 0 else np.linspace(lo, hi, 50)
    ax.fill_between(grid, grid / 1.5, grid * 1.5, color="0.9", label="within a factor 1.5")
    ax.plot(grid, grid, color="0.5", lw=1, label="calibrated (realised = predicted)")
    ax.plot(v, e, "o-", ms=4, label=f"GP variance ({len(cal)} equal-count bins of test points)")
    caption = f"Realised / predicted per bin: GP {min(ratio):.2f} to {max(ratio):.2f}"
    if recal:
        loo = found["loo"]
        ax.plot(rv, e, "s--", ms=4, label=f"recalibrated (leave-one-out, {loo['size']} points)")
        recal = [dict(b, ratio=r) for b, r in zip(recal, calibration_ratios(recal), strict=True)]
        again = [b["ratio"] for b in recal]
        caption += f", recalibrated {min(again):.2f} to {max(again):.2f}"
    if lo > 0:
        from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            axis.set_major_formatter(FormatStrFormatter("%g"))
            axis.set_minor_formatter(NullFormatter())
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel(
        "mean predictive variance of the targets, $s^2(\\sigma^2_*$ + noise)\n"
        + (
            f"with the output scale $s^2$ = {scale:.4g} fitted by maximum likelihood"
            if scale is not None
            else "(no fitted output scale: solved before it was recorded)"
        )
    )
    ax.set_ylabel("realised mean squared error (per output)")
    _title(ax, "Calibration", f"{store_caption(store.meta)}. {caption}.", 62)
    ax.legend(loc="upper left", fontsize=8)
    rows = [dict(b, ratio=r) for b, r in zip(cal, ratio, strict=True)]
    return _save(fig, path), rows, recal


def _kernel_matrix(store: KernelStore, s: int) -> np.ndarray:
    """The first ``s`` training points' kernel, read tile by tile and mirrored."""
    t = store.meta["tile_size"]
    k = np.empty((s, s))
    for i in range(math.ceil(s / t)):
        for j in range(i, math.ceil(s / t)):
            r, c = span(t, s, i), span(t, s, j)
            tile = read_checked(store.array(K_TRAIN_TRAIN), (r, c), url=store.url, complete=False)
            tile = np.asarray(tile, dtype=np.float64)
            k[r, c] = tile
            k[c, r] = tile.T
    return symmetric(k)  # diagonal tiles hold their upper triangle


def _kernel_png(store: KernelStore, path: str, sample: int) -> str:
    plt = _pyplot()
    meta = store.meta
    s = min(sample, meta["n_train"])
    k = _kernel_matrix(store, s)
    d = np.sqrt(np.diag(k))
    y = np.asarray(store.array(Y_TRAIN)[:s])
    labels = y.dtype.kind in "iu"
    order = np.argsort(y, kind="stable") if labels else np.arange(s)
    corr = (k / d[:, None] / d[None, :])[np.ix_(order, order)]
    fig, ax = plt.subplots(figsize=(5.8, 5.3))
    im = ax.imshow(corr, cmap="magma", interpolation="nearest")
    if labels:
        ys = y[order]
        starts = np.r_[0, np.flatnonzero(np.diff(ys)) + 1]
        ends = np.r_[starts[1:], s]
        for e_ in starts[1:] - 0.5:
            ax.axhline(e_, color="w", lw=0.4)
            ax.axvline(e_, color="w", lw=0.4)
        names = class_names(meta["dataset"], ys[starts])
        ax.set_xticks((starts + ends - 1) / 2, names, rotation=90, fontsize=7)
        ax.set_yticks((starts + ends - 1) / 2, names, fontsize=7)
        ax.tick_params(length=0)
    ax.set_xlabel(f"first {s:,} training points" + (", sorted by class" if labels else ""))
    _title(ax, "Kernel correlation", store_caption(meta), 70)
    fig.colorbar(im, ax=ax, label="$k(x, x') / \\sqrt{k(x, x)\\, k(x', x')}$")
    return _save(fig, path)


def _curve_png(rows: list[dict], path: str, meta: dict) -> str:
    plt = _pyplot()
    key = "accuracy" if "accuracy" in rows[0] else "mse"
    fig, ax = plt.subplots(figsize=(5.6, 4.4))
    ax.errorbar(
        [r["n_train"] for r in rows],
        [r[key] for r in rows],
        yerr=[r[f"{key}_se"] for r in rows],
        fmt="o-",
        ms=4,
        capsize=3,
        label="\u00b1 one standard error" + (" (binomial)" if key == "accuracy" else ""),
    )
    for r in rows:
        ax.annotate(
            f"{r[key]:.4f}",
            (r["n_train"], r[key]),
            textcoords="offset points",
            xytext=(0, 7),
            ha="center",
            fontsize=7,
        )
    ax.set_xscale("log")
    sizes = [r["n_train"] for r in rows]
    ax.set_xticks(sizes, [f"{n:,}" for n in sizes], fontsize=8)
    ax.minorticks_off()
    ax.set_xlabel("training points (the first n, one factor)")
    ax.set_ylabel(f"test {key} ({meta['n_test']:,} test points)")
    _title(ax, "Learning curve", store_caption(meta), 70)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
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
    """Write the PNGs this module describes into ``out``; return their paths, the learning curve
    and the calibration bins (each with its ``ratio``, realised over predicted), raw and
    recalibrated (None without leave-one-out predictions)."""
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
    cal_png, cal, recal = _calibration_png(ks, os.path.join(out, "calibration.png"), bins)
    paths = {
        "calibration": cal_png,
        "kernel": _kernel_png(ks, os.path.join(out, "kernel.png"), sample),
    }
    curve = learning_curve(ks, sizes)
    paths["learning_curve"] = _curve_png(curve, os.path.join(out, "learning-curve.png"), ks.meta)
    with open(os.path.join(out, "learning-curve.json"), "w") as f:
        json.dump(curve, f, indent=1)
    if sweep_doc:
        rows, best = sweep_doc["rows"], sweep_doc["best"]
        metric = "validation_accuracy" if sweep_doc["select_by"] == "accuracy" else "validation_mse"
        ws = sorted({r["weight_var"] for r in rows})
        bs = sorted({r["bias_var"] for r in rows})
        png = os.path.join(out, f"sweep-depth{best['depth']}.png")
        paths["sweep"] = sweep_heatmap(
            rows, best["depth"], metric, ws, bs, png, settings=sweep_doc.get("settings")
        )
    return {
        "files": paths,
        "learning_curve": curve,
        "calibration": cal,
        "calibration_recalibrated": recal,
    }
