"""Likelihoods of the Laplace-GP posterior of a trained network, and its scores.

Pure NumPy, no store. With the network's outputs ``f`` (n, C) at its weights ``w*``, the
gradient ``r`` of the negative log likelihood in the outputs and its Hessian ``Lambda`` (kept
diagonal per output, laplace-torch's ``diagonal_kernel=True``), the Laplace approximation with
the generalised Gauss-Newton Hessian is, output by output, the posterior of a GP with kernel
``kappa_c = J_c J_c^T / delta``, per-point noise variance ``1 / Lambda_c`` and transformed
targets ``y~_c = J_c w* - r_c / Lambda_c`` (Khan et al. 2019, DNN2GP; docs/science.md):

* ``regression`` (Gaussian, noise standard deviation ``sigma``): ``r = (f - y) / sigma^2`` and
  ``Lambda = 1 / sigma^2``, so ``y~ = J w* - f + y``;
* ``classification`` (softmax cross-entropy): ``r_c = p_c - [y = c]`` and ``Lambda_c =
  p_c (1 - p_c)`` at the MAP, a heteroscedastic noise ``1 / (p_c (1 - p_c))``;
  ``r_c / Lambda_c`` is ``-1 / p_c`` for the true class and ``1 / (1 - p_c)`` for the others,
  computed from the log-softmax so that it is finite as long as ``p_c`` is not 0 or 1 in
  float64.

The posterior of ``f(x*)`` per output has the MAP network's output as its mean (the
linearised network's posterior mean at the MAP) and the GP's variance; class probabilities by
the probit approximation ``softmax(mean / sqrt(1 + pi/8 var))``.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import UserError

__all__ = [
    "LIKELIHOODS",
    "check_targets",
    "ece",
    "gaussian_nll",
    "monte_carlo",
    "nll",
    "probit",
    "softmax",
    "terms",
]

LIKELIHOODS = ("regression", "classification")


def check_targets(likelihood: str, y: np.ndarray, n_outputs: int, where: str) -> None:
    """:class:`UserError` unless the labels or targets ``y`` fit a network of ``n_outputs``."""
    if likelihood not in LIKELIHOODS:
        raise UserError(f"--likelihood must be regression or classification, got {likelihood!r}")
    if likelihood == "classification":
        if y.dtype.kind not in "iu":
            raise UserError(f"{where}: classification needs integer class labels, got {y.dtype}")
        if len(y) and (y.min() < 0 or y.max() >= n_outputs):
            raise UserError(
                f"{where}: labels must be 0 .. {n_outputs - 1} for a network of {n_outputs} "
                f"outputs; found {int(y.min())} .. {int(y.max())}"
            )
        return
    cols = 1 if y.ndim == 1 else y.shape[1]
    if y.dtype.kind not in "fiu" or cols != n_outputs:
        raise UserError(
            f"{where}: regression needs float targets with one column per network output "
            f"({n_outputs}), got {y.dtype} with {cols} column(s)"
        )


def softmax(f: np.ndarray) -> np.ndarray:
    z = f - f.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _log_softmax(f: np.ndarray) -> np.ndarray:
    z = f - f.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def terms(
    likelihood: str, f: np.ndarray, jw: np.ndarray, y: np.ndarray, sigma: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """``(Lambda, y~)``, both (n, C): the per-point, per-output noise precision and the
    transformed targets ``J w* - r / Lambda`` (module docstring)."""
    if likelihood == "regression":
        y = y.reshape(len(y), -1).astype(np.float64)
        return np.full(f.shape, 1.0 / sigma**2), jw - f + y
    logp = _log_softmax(f)
    p = np.exp(logp)
    onehot = np.zeros_like(f, dtype=bool)
    onehot[np.arange(len(y)), y] = True
    # 1 - p_c as the sum of the other classes' probabilities: no cancellation near p_c = 1
    rest = np.empty_like(p)
    for c in range(f.shape[1]):
        rest[:, c] = np.delete(p, c, axis=1).sum(axis=1)
    lam = p * rest
    ratio = np.where(onehot, -np.exp(-logp), 1.0 / np.where(onehot, 1.0, rest))
    return lam, jw - ratio


def probit(mean: np.ndarray, var: np.ndarray) -> np.ndarray:
    """Class probabilities by the probit approximation (MacKay 1992):
    ``softmax(mean / sqrt(1 + pi/8 var))`` per test point, ``var`` per output."""
    return softmax(mean / np.sqrt(1.0 + math.pi / 8.0 * var))


def monte_carlo(mean: np.ndarray, var: np.ndarray, samples: int, seed: int = 0) -> np.ndarray:
    """Class probabilities as the Monte Carlo average of the softmax over ``samples`` draws of
    independent Gaussian logits ``N(mean, var)`` per output (seeded: reproducible), in blocks
    of test points so that memory stays ``samples x block x C``."""
    rng = np.random.default_rng(seed)
    out = np.empty_like(mean)
    block = max(1, (1 << 22) // max(samples * mean.shape[1], 1))
    for r in range(0, len(mean), block):
        m, s = mean[r : r + block], np.sqrt(var[r : r + block])
        z = m + s * rng.standard_normal((samples, *m.shape))
        z -= z.max(axis=2, keepdims=True)
        e = np.exp(z)
        out[r : r + block] = (e / e.sum(axis=2, keepdims=True)).mean(axis=0)
    return out


def nll(probs: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log probability of the true classes."""
    p = probs[np.arange(len(y)), y]
    return float(-np.log(np.maximum(p, np.finfo(np.float64).tiny)).mean())


def gaussian_nll(mean: np.ndarray, var: np.ndarray, y: np.ndarray) -> float:
    """Mean (over points) negative log density of the targets under ``N(mean, var)``, summed
    over outputs."""
    y = y.reshape(mean.shape)
    per = 0.5 * (np.log(2 * math.pi * var) + (y - mean) ** 2 / var)
    return float(per.sum(axis=1).mean())


def ece(probs: np.ndarray, y: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error: points binned by confidence (the top class's probability) in
    ``bins`` equal-width bins of (0, 1]; the count-weighted mean of |accuracy - confidence|."""
    conf = probs.max(axis=1)
    hit = (probs.argmax(axis=1) == y).astype(np.float64)
    which = np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)
    total = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            total += sel.sum() * abs(hit[sel].mean() - conf[sel].mean())
    return float(total / max(len(y), 1))
