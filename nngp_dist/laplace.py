"""The Laplace-GP posterior of a trained network over its whole training set (DNN2GP).

For a store of a trained network's kernel (``arch="trained"``, prior precision ``delta`` in
its spec), :func:`posterior` computes, per output ``c``, the GP with kernel
``kappa_c = J_c J_c^T / delta``, per-point noise ``1 / Lambda_c`` and transformed targets
``y~_c = J_c w* - r_c / Lambda_c`` (:mod:`nngp_dist.likelihoods`), exactly, out of core:

1. the network's outputs ``f`` and ``J w*`` on the training and test inputs (in this process;
   (N + M) x C numbers);
2. per output ``c``, a kernel store of ``kappa_c`` in the group ``outputs/<c>`` of the store
   (created or resumed like any store; the tiles of every output, and of the store's own trace
   kernel where missing, computed by the workers in one pass: one feature computation per
   tile for all outputs, :func:`nngp_dist.compute.compute_outputs`), its noise scale
   ``sqrt(Lambda_c)`` (``laplace_scale``), the tiled Cholesky factor of
   ``S K S + I`` (always positive definite: no noise escalation), alpha and the log marginal
   likelihood of ``y~_c``, and the variance of each test point;
3. in the store itself, ``mean`` (M, C): the MAP network's outputs (the linearised network's
   posterior mean at the MAP, as laplace-torch's GLM predictive), and ``variance`` (M, C).

Cost. Classification has a different noise per output, so each output has its own factor:
C kernels of N^2 / 2 entries (one pass over the tiles computes them all, and the trace kernel
with them: the network's features once per tile, the ``C`` kernels' contractions), C
factorisations of N^3 / 3 flops, C triangular solves of N^2 M flops for the M test variances,
and C x N^2 / 2 float64 numbers on disk per factor. With
regression (one noise for all points and outputs) the outputs still get a store each: the
C-output regression is the same independent-output approximation. The outputs run one after
another, each over all the workers.

:func:`lml_grid` evaluates the train log marginal likelihood over a grid of prior precisions
(and, for regression, noises) from the output stores' kernels in memory: ``kappa`` scales as
``1 / delta``, so the kernel is reused.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from typing import Any

import numpy as np

from . import likelihoods
from ._version import __version__
from .cluster import with_client, worker_memory
from .compute import compute_outputs
from .datasets import from_arrays
from .errors import StoreMismatch, UserError
from .kernels import Spec, trained
from .layout import (
    K_TRAIN_TRAIN,
    LAPLACE_SCALE,
    MEAN,
    OUTPUTS,
    PREDICT,
    T_TRAIN,
    VARIANCE,
    X_TEST,
    X_TRAIN,
    Y_TEST,
    Y_TRAIN,
    record,
)
from .lock import store_lock
from .options import ClusterOptions, positive, take
from .predict import log_marginal_likelihood, predict_test, solve_alpha
from .solvers.cholesky import factorize
from .storage import KernelStore, utcnow
from .tiling import TilePlan, symmetric

__all__ = ["check_inputs", "lml_grid", "output_store", "posterior", "scores"]


def check_inputs(spec: Spec, data: Any, likelihood: str | None, sigma: Any) -> None:
    """Before anything is written: the likelihood's options, the architecture, and the labels
    against the network's output count (evaluated on two training inputs). Neither given:
    nothing to check."""
    if likelihood is None and sigma is None:
        return
    if likelihood not in likelihoods.LIKELIHOODS:
        raise UserError(f"--likelihood must be regression or classification, got {likelihood!r}")
    if spec.arch != "trained":
        raise UserError(f"--likelihood needs --arch trained (a trained network), not {spec.arch}")
    if likelihood == "classification" and sigma is not None:
        raise UserError("--sigma is the regression noise; drop it for classification")
    if sigma is not None:
        positive("--sigma", sigma)
    try:
        n_out = trained.network_outputs(spec, data.x_train[:2], jvp=False)[0].shape[1]
    except UserError:
        raise
    except Exception as e:  # the user's network, whatever it raises
        raise UserError(f"the network cannot be evaluated: {type(e).__name__}: {e}") from None
    likelihoods.check_targets(likelihood, data.y_train, n_out, "y_train")
    likelihoods.check_targets(likelihood, data.y_test, n_out, "y_test")


def _checked(ks: KernelStore, likelihood: str, sigma: Any, trust: bool) -> tuple[Spec, float]:
    """The store's trained spec and the noise's standard deviation, or a :class:`UserError`."""
    if likelihood not in likelihoods.LIKELIHOODS:
        raise UserError(f"--likelihood must be regression or classification, got {likelihood!r}")
    spec = Spec.from_dict(ks.meta["spec"], trust=trust)
    if spec.arch != "trained":
        raise UserError(
            f"{ks.url} holds the kernel of --arch {spec.arch}; --likelihood needs --arch trained"
        )
    if likelihood == "classification":
        if sigma is not None:
            raise UserError("--sigma is the regression noise; drop it for classification")
        return spec, 1.0
    return spec, positive("--sigma", 1.0 if sigma is None else sigma)


def output_store(ks: KernelStore, spec: Spec, c: int) -> KernelStore:
    """The kernel store of output ``c`` (``outputs/<c>``): created, or resumed when its
    identity matches, its test set replaced when only that differs (as the store's own may
    have been), else made anew (it is derived from the store, whose identity was checked).
    Its tiles are computed by :func:`nngp_dist.compute.compute_outputs`, all outputs at once."""
    meta = ks.meta
    spec_c = dataclasses.replace(spec, output=c)
    data = from_arrays(
        meta["dataset"], ks.read(X_TRAIN), ks.read(Y_TRAIN), ks.read(X_TEST), ks.read(Y_TEST)
    )
    url = f"{ks.url}/{OUTPUTS}/{c}"
    ident = KernelStore.identity(spec_c, data, meta["tile_size"], meta["dtype"])
    try:
        action = KernelStore.check(url, ident, replace_test=True)
    except StoreMismatch:
        action = "create"
    if action == "create":
        plan = TilePlan(meta["n_train"], meta["n_test"], meta["tile_size"])
        sub = KernelStore.create(url, ident, data, plan)
    else:
        sub = KernelStore.open(url, "r+")
        if action == "replace-test":  # a new test set: the training kernel and factor stay
            sub.replace_test(data)
    return sub


def _solve_output(
    sub: KernelStore, client: Any, scale: np.ndarray, y_tilde: np.ndarray, progress: bool
) -> tuple[float, np.ndarray]:
    """Factor, alpha and test variances of one output's GP; (its LML, its variances)."""
    sub.set_noise_scale(scale)
    sub.prepare_solve(y_tilde[:, None])
    factor = factorize(sub, client=client, noise=1.0, max_noise=1.0, progress=progress)
    sol = solve_alpha(sub, client=client)
    sub.update_meta(
        solve={
            "method": "cholesky",
            "noise": 1.0,
            "noise_abs": factor["noise"],
            "log_marginal_likelihood": sol["log_marginal_likelihood"],
            "output_scale": None,
        }
    )
    predict_test(sub, client=client, progress=progress, workers=worker_memory(client))
    sub.update_meta(predict={"output_of": "laplace", "variance": True})  # the store's: done
    return sol["log_marginal_likelihood"], sub.read(VARIANCE)


def posterior(
    store: str,
    *,
    likelihood: str,
    sigma: float | None = None,
    trust_code: bool = False,
    json_path: str | None = None,
    samples: int | None = None,
    progress: bool = True,
    **options: Any,
) -> dict:
    """The Laplace-GP posterior of the trained network whose kernel the store holds (module
    docstring); returns the report (also kept in the store, and written to ``json_path``).

    ``likelihood``: ``regression`` (Gaussian, noise standard deviation ``sigma``, default 1)
    or ``classification`` (softmax; integer labels < the network's outputs). The prior
    precision is the spec's. The report: ``log_marginal_likelihood`` (of the transformed
    targets, summed over outputs; None when a point has no noise precision), ``nll``,
    ``accuracy`` and ``ece`` (15 bins) of the probit probabilities, the MAP network's own
    ``map_accuracy``, ``map_nll``, ``map_ece`` (classification); ``mse`` and ``nll`` of the
    predictive ``N(mean, variance + sigma^2)`` and the MAP's ``map_nll`` with ``sigma^2``
    alone (regression). With ``samples``, classification's probabilities are the Monte Carlo
    average of the softmax over that many draws of the logits instead of the probit
    approximation. ``options``: those of :class:`~nngp_dist.options.ClusterOptions`.
    """
    cluster = take(options, ClusterOptions)
    if options:
        raise TypeError(f"unexpected options {sorted(options)}")
    if samples is not None and (
        isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples < 1
    ):
        raise UserError(f"samples must be a positive integer, got {samples!r}")
    ks = KernelStore.open(store, "r+")
    spec, sig = _checked(ks, likelihood, sigma, trust_code)
    f_test, lam, y_tilde = _network_terms(ks, spec, likelihood, sig)
    y_test = ks.read(Y_TEST)
    n_out = f_test.shape[1]

    def go(c: Any) -> dict:
        start = time.perf_counter()
        ks.record_stage("laplace", started=utcnow(), finished=None)
        var = np.empty((len(f_test), n_out))
        lml = 0.0
        subs = [output_store(ks, spec, k) for k in range(n_out)]
        compute_outputs(ks, subs, spec, client=c, progress=progress)
        for k, sub in enumerate(subs):
            part, v = _solve_output(sub, c, np.sqrt(lam[:, k]), y_tilde[:, k], progress)
            lml += part
            var[:, k] = v
        ks.prepare_laplace(n_out)
        ks.array(MEAN)[...] = f_test
        ks.array(VARIANCE)[...] = var
        ks.array(record(PREDICT))[0] = max(time.perf_counter() - start, 1e-9)
        report = {
            "likelihood": likelihood,
            "prior_precision": spec.prior_precision,
            "sigma": sig if likelihood == "regression" else None,
            "log_marginal_likelihood": lml if math.isfinite(lml) else None,
            **scores(likelihood, f_test, var, y_test, sig, samples),
            "n_train": len(y_tilde),
            "n_test": len(y_test),
            "seconds": round(time.perf_counter() - start, 3),
            "store": ks.url,
            "spec": ks.meta["spec"],
            "version": __version__,
        }
        ks.update_meta(solve={"method": "laplace", **report}, predict=report)
        ks.record_stage("laplace", finished=utcnow(), seconds=report["seconds"])
        if json_path:
            with open(json_path, "w") as f:
                json.dump(report, f, indent=2)
        return report

    with store_lock(ks.url, "laplace"):  # one writer per store (a run holds it already)
        return with_client(go, **cluster)


def _network_terms(
    ks: KernelStore, spec: Spec, likelihood: str, sigma: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The MAP network's test outputs (M, C), and the training points' noise precisions and
    transformed targets (N, C); the labels checked against the network's outputs first."""
    y_train, y_test = ks.read(Y_TRAIN), ks.read(Y_TEST)
    try:
        f_train, jw = trained.network_outputs(spec, ks.read(X_TRAIN))
        f_test, _ = trained.network_outputs(spec, ks.read(X_TEST), jvp=False)
    except UserError:
        raise
    except Exception as e:  # the user's network, whatever it raises
        raise UserError(f"the network cannot be evaluated: {type(e).__name__}: {e}") from None
    n_out = f_train.shape[1]
    likelihoods.check_targets(likelihood, y_train, n_out, "y_train")
    likelihoods.check_targets(likelihood, y_test, n_out, "y_test")
    lam, y_tilde = likelihoods.terms(likelihood, f_train, jw, y_train, sigma)
    return f_test, lam, y_tilde


def scores(
    likelihood: str,
    mean: np.ndarray,
    var: np.ndarray,
    y: np.ndarray,
    sigma: float = 1.0,
    samples: int | None = None,
) -> dict:
    """The report's scores of a posterior ``mean``, ``var`` (M, C) against the labels ``y``,
    and of the MAP network (whose outputs are ``mean``) alone; class probabilities by the
    probit approximation, or Monte Carlo with ``samples`` draws."""
    if likelihood == "classification":
        if samples:
            probs = likelihoods.monte_carlo(mean, var, int(samples))
        else:
            probs = likelihoods.probit(mean, var)
        map_probs = likelihoods.softmax(mean)
        return {
            "accuracy": float((probs.argmax(1) == y).mean()),
            "nll": likelihoods.nll(probs, y),
            "ece": likelihoods.ece(probs, y, 15),
            "map_accuracy": float((map_probs.argmax(1) == y).mean()),
            "map_nll": likelihoods.nll(map_probs, y),
            "map_ece": likelihoods.ece(map_probs, y, 15),
        }
    y = y.reshape(mean.shape)
    return {
        "mse": float(((mean - y) ** 2).mean()),
        "nll": likelihoods.gaussian_nll(mean, var + sigma**2, y),
        "map_nll": likelihoods.gaussian_nll(mean, np.full_like(mean, sigma**2), y),
    }


def lml_grid(store: str, deltas: Any, sigmas: Any = None) -> list[dict]:
    """The train log marginal likelihood of the store's Laplace-GP (after :func:`posterior`)
    for every prior precision in ``deltas`` and, for regression, noise standard deviation in
    ``sigmas`` (default: the posterior's), the network and so ``y~`` held fixed. In memory
    (an N x N matrix per output): the output stores' kernels rescaled by ``delta_0 / delta``.
    Rows: ``prior_precision``, ``sigma``, ``log_marginal_likelihood``."""
    ks = KernelStore.open(store)
    rec = ks.meta.get("predict") or {}
    if not rec.get("likelihood"):
        raise UserError(f"{store} has no Laplace posterior yet: run it with --likelihood first")
    delta0, regression = float(rec["prior_precision"]), rec["likelihood"] == "regression"
    grid_s = [rec["sigma"]] if sigmas is None or not regression else list(sigmas)
    outputs = []
    c = 0
    while ks.has(f"{OUTPUTS}/{c}/{K_TRAIN_TRAIN}"):
        sub = KernelStore.open(f"{ks.url}/{OUTPUTS}/{c}")
        k = symmetric(np.asarray(sub.read(K_TRAIN_TRAIN), dtype=np.float64))
        outputs.append((k, sub.read(LAPLACE_SCALE), sub.read(T_TRAIN)[:, 0]))
        c += 1
    rows = []
    for delta in deltas:
        d = positive("--prior-precision", delta)
        for s in grid_s:
            total = 0.0
            for k, scale, yt in outputs:
                if regression:
                    scale = np.full_like(scale, 1.0 / positive("--sigma", s))
                total += _lml(k * (delta0 / d), scale, yt)
            rows.append({"prior_precision": d, "sigma": s, "log_marginal_likelihood": total})
    return rows


def _lml(k: np.ndarray, scale: np.ndarray, y: np.ndarray) -> float:
    """``log N(y | 0, K + S^-2)`` through the factor of ``S K S + I``."""
    b = scale[:, None] * k * scale[None, :]
    b[np.diag_indices_from(b)] += 1.0
    u = np.linalg.cholesky(b)
    z = np.linalg.solve(u, scale * y)
    with np.errstate(divide="ignore"):
        logdet = 2.0 * np.log(np.diag(u)).sum() - 2.0 * np.log(scale).sum()
    return log_marginal_likelihood(float(z @ z), float(logdet), len(y), 1)
