"""How the noise shapes calibration: every noise of a grid from one eigendecomposition.

Computes the depth-8 ReLU NNGP of the 50k run on the first N Fashion-MNIST training images and
M test images into a store (``jobs.kernel``), reads the kernel back, and eigendecomposes it
once (``K = Q diag(lam) Q'``). Each relative noise s then costs only matrix products: the
posterior mean ``K_*D Q diag(1/(lam+s)) Q'T``, variance ``k_** - sum_i (K_*D Q)_i^2/(lam_i+s)``,
the output scale ``s2 = tr(T'(K+sI)^-1 T)/(NC)`` and the log marginal likelihood at scale 1
and at ``s2`` (the ``--select-by lml`` criterion). Per noise it records the test accuracy and
the calibration ratios (realised / predicted squared error) in equal-count bins of the targets'
predictive variance ``s2 (var + s)``, as ``nngp-dist predict`` reports them.

At the noise the likelihood prefers it also records, as a diagnostic of what no single noise
can do, the ratios after an isotonic map from predicted variance to squared error fitted on
one half of the test points and applied to the other (and the other way round): a held-out
recalibration on test points (the product fits its map on leave-one-out training points
instead, ``nngp_dist.predict.recalibration``).

    python benchmarks/bench_calibration_noise.py --train-size 10000 --test-size 10000 \\
        --store /tmp/nngp-bench/cal10k.zarr --json /tmp/cal10k.json

With ``--solved`` instead, it reads a solved and predicted store (the 50k run's) and prints its
bins' ratios with 95% bootstrap intervals, the same with the product's recalibrated variances
when the store has leave-one-out predictions (the map held fixed: the interval is the test
points' sampling error only), and the same two-fold isotonic diagnostic:

    python benchmarks/bench_calibration_noise.py --solved /work/stores/fm50k.zarr
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

import nngp_dist
from nngp_dist import jobs
from nngp_dist.predict import likelihoods, targets
from nngp_dist.select import best_by_lml

NOISES = (1e-3, 1.6e-3, 2.5e-3, 4e-3, 6.3e-3, 1e-2, 1.6e-2, 2.5e-2, 4e-2, 1e-1)


def ratios(pv: np.ndarray, sq: np.ndarray, bins: int, by: np.ndarray | None = None) -> list[float]:
    """Realised over predicted squared error in equal-count bins of predicted variance (of
    ``by``, when given: the raw variance, for recalibrated ones, as ``predict`` bins them)."""
    order = np.argsort(pv if by is None else by, kind="stable")
    return [float(sq[i].mean() / pv[i].mean()) for i in np.array_split(order, bins)]


def held_out_isotonic(pv: np.ndarray, sq: np.ndarray, bins: int, seed: int = 0) -> list[float]:
    """Ratios after a two-fold isotonic recalibration of the variance (a diagnostic)."""
    from sklearn.isotonic import IsotonicRegression

    halves = np.array_split(np.random.default_rng(seed).permutation(len(pv)), 2)
    cal = np.empty_like(pv)
    for fit, apply in ((0, 1), (1, 0)):
        iso = IsotonicRegression(out_of_bounds="clip", y_min=1e-12)
        iso.fit(np.log(pv[halves[fit]]), sq[halves[fit]])
        cal[halves[apply]] = iso.predict(np.log(pv[halves[apply]]))
    return ratios(cal, sq, bins)


def map_sensitivity(ks, pv: np.ndarray, sq: np.ndarray, bins: int, draws: int = 20) -> None:
    """The map's own sampling error: refitted on ``draws`` random subsets (without replacement)
    of the store's leave-one-out points, per subset size and points per knot, the worst test
    bin's factor from the diagonal (median, 90th percentile, max over the subsets) and how
    many subsets keep every bin within 1.5."""
    from nngp_dist.layout import LOO_INDEX, LOO_MEAN, LOO_VARIANCE, T_TRAIN
    from nngp_dist.predict import isotonic_map, predictive_variance, recalibration_group

    idx = ks.read(LOO_INDEX)
    loo_sq = ((ks.read(LOO_MEAN) - ks.read(T_TRAIN)[idx]) ** 2).mean(1)
    loo_pv = predictive_variance(ks, LOO_VARIANCE)
    n, rng = len(idx), np.random.default_rng(1)
    sizes = [s for s in (2500, 5000, 10000, 20000) if s <= n // 2] + [n]
    print(
        "leave-one-out points, points per knot: worst bin's factor median / 90% / max, "
        "subsets with every bin within 1.5"
    )
    for size in sizes:
        subsets = (
            [np.arange(n)]
            if size == n
            else [np.sort(rng.choice(n, size, replace=False)) for _ in range(draws)]
        )
        for group in sorted({1, 50, 200, recalibration_group(size)}):
            worst = []
            for sel in subsets:
                v = np.interp(pv, *isotonic_map(loo_pv[sel], loo_sq[sel], group))
                worst.append(np.exp(np.abs(np.log(ratios(v, sq, bins, by=pv))).max()))
            worst = np.array(worst)
            print(
                f"  {size:6d}, {group:3d}: {np.median(worst):.2f} / "
                f"{np.percentile(worst, 90):.2f} / {worst.max():.2f}, "
                f"{(worst <= 1.5).sum()} of {len(worst)}"
            )


def solved_bins(store: str, bins: int, resamples: int = 2000) -> None:
    """A predicted store's calibration bins with bootstrap intervals, and the diagnostic."""
    from nngp_dist import KernelStore
    from nngp_dist.layout import MEAN, Y_TEST
    from nngp_dist.predict import predictive_variance, recalibrated_variance

    ks = KernelStore.open(store)
    pv, y = predictive_variance(ks), ks.read(Y_TEST)
    mean = ks.read(MEAN, complete=True)
    sq = ((mean - targets(y, mean.shape[1])) ** 2).mean(1)
    recal = recalibrated_variance(ks)
    rng = np.random.default_rng(0)
    print(
        "ratio  95% bootstrap interval"
        + ("  | recalibrated, interval" if recal is not None else "")
    )
    for b in np.array_split(np.argsort(pv, kind="stable"), bins):
        line, draws = "", [rng.choice(b, len(b)) for _ in range(resamples)]  # paired
        for v in (pv, recal) if recal is not None else (pv,):
            lo, hi = np.percentile([sq[i].mean() / v[i].mean() for i in draws], [2.5, 97.5])
            line += f"{' | ' if line else ''}{sq[b].mean() / v[b].mean():.3f}  {lo:.3f}-{hi:.3f}"
        print(line)
    if recal is not None:
        map_sensitivity(ks, pv, sq, bins)
    print("two-fold isotonic: " + " ".join(f"{x:.2f}" for x in held_out_isotonic(pv, sq, bins)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-size", type=int, default=10000)
    p.add_argument("--test-size", type=int, default=10000)
    p.add_argument("--store", help="Where to compute the kernel.")
    p.add_argument("--noises", type=float, nargs="+", default=list(NOISES))
    p.add_argument("--bins", type=int, default=20)
    p.add_argument("--json", help="Where to write the rows.")
    p.add_argument("--solved", help="Only report the bins of this solved, predicted store.")
    a = p.parse_args()
    if a.solved:
        solved_bins(a.solved, a.bins)
        return
    if not (a.store and a.json):
        p.error("--store and --json are required (or --solved)")
    start = time.perf_counter()
    spec = {"depth": 8, "weight_var": 2.0, "bias_var": 0.0}
    jobs.kernel(
        a.store,
        dataset="fashion-mnist",
        train_size=a.train_size,
        test_size=a.test_size,
        progress=False,
        workers=2,
        **spec,
    )
    ds = nngp_dist.open_store(a.store)
    k, ks = ds.k_train_train.values, ds.k_test_train.values
    kss, mean_diag = ds.k_test_diag.values, float(ds.k_train_diag.values.mean())
    y, y_test = ds.y_train.values, ds.y_test.values
    t, truth = targets(y, 10), targets(y_test, 10)
    lam, q = np.linalg.eigh(k)
    del k
    qt, p_ = q.T @ t, ks @ q
    n, c = t.shape
    rows, errors = [], {}
    for rel in a.noises:
        s = rel * mean_diag
        w = 1.0 / (lam + s)
        quad, logdet = float((qt**2 * w[:, None]).sum()), float(np.log(lam + s).sum())
        row = {"noise": rel, **likelihoods(quad, logdet, n, c)}
        mean = p_ @ (w[:, None] * qt)
        pv = row["output_scale"] * (kss - (p_ * p_) @ w + s)
        errors[rel] = pv, ((mean - truth) ** 2).mean(1)  # for the diagnostic below
        r = ratios(*errors[rel], a.bins)
        row["accuracy"] = float((mean.argmax(1) == y_test).mean())
        row.update(ratios=r, within_1_5=sum(1 / 1.5 <= x <= 1.5 for x in r))
        rows.append(row)
        print(
            f"noise {rel:<8g} lml {row['log_marginal_likelihood']:11.1f}  at s2: "
            f"{row['log_marginal_likelihood_scaled']:11.1f}  s2 {row['output_scale']:6.3f}  "
            f"accuracy {row['accuracy']:.4f}  ratios {min(r):.2f}-{max(r):.2f}  "
            f"{row['within_1_5']}/{a.bins} within 1.5",
            flush=True,
        )
    best = best_by_lml(rows)
    iso = held_out_isotonic(*errors[best["noise"]], a.bins)
    print(f"at {best['noise']:g}, two-fold isotonic: " + " ".join(f"{x:.2f}" for x in iso))
    doc = {
        "train_size": a.train_size,
        "test_size": a.test_size,
        "spec": spec,
        "rows": rows,
        "best_by_lml": best["noise"],
        "isotonic_ratios": iso,
        "seconds": round(time.perf_counter() - start, 1),
    }
    with open(a.json, "w") as f:
        json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()
