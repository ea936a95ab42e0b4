"""Independent oracles for the tests: Monte Carlo of wide finite networks, numerical integrals.

Nothing here imports nngp_dist: these are the yardsticks the package is measured against.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import integrate


def gaussian_expectation(g, k12: float, k11: float, k22: float) -> float:
    """E[g(u, v)] for (u, v) ~ N(0, [[k11, k12], [k12, k22]]), by adaptive 2-D quadrature.

    Integrates over standard normal (z1, z2) with u = l11 z1, v = l21 z1 + l22 z2, split along
    the lines u = 0 and v = 0 where kinked functions (ReLU and its derivative) break.
    """
    l11 = math.sqrt(k11)
    l21 = k12 / l11
    l22 = math.sqrt(max(k22 - l21 * l21, 1e-30))

    def integrand(z2: float, z1: float) -> float:
        u, v = l11 * z1, l21 * z1 + l22 * z2
        return g(u, v) * math.exp(-0.5 * (z1 * z1 + z2 * z2)) / (2 * math.pi)

    total = 0.0
    for a, b in ((-10.0, 0.0), (0.0, 10.0)):
        for lo, hi in (
            (lambda z1: -10.0, lambda z1: -l21 * z1 / l22),
            (lambda z1: -l21 * z1 / l22, lambda z1: 10.0),
        ):
            val, _ = integrate.dblquad(integrand, a, b, lo, hi, epsabs=1e-12, epsrel=1e-10)
            total += val
    return total


def mlp_forward(x, params, phi, w_var, b_var):
    """Forward pass of a finite MLP in NTK parameterisation; returns pre-activations per layer."""
    hs, a = [], x
    for W, b in params:
        h = a @ W.T * math.sqrt(w_var / a.shape[1]) + math.sqrt(b_var) * b
        hs.append(h)
        a = phi(h)
    return hs


def random_mlp(rng, d: int, width: int, depth: int):
    """Standard-normal weights and biases of ``depth`` hidden layers of ``width`` and a readout."""
    sizes = [d] + [width] * depth + [1]
    return [(rng.standard_normal((o, i)), rng.standard_normal(o)) for i, o in zip(sizes, sizes[1:])]


def mlp_output(x, params, phi, w_var, b_var):
    return mlp_forward(x, params, phi, w_var, b_var)[-1][:, 0]


def mlp_ntk(x, params, phi, dphi, w_var, b_var):
    """The empirical NTK sum_p df(x)/dp df(x')/dp of a finite MLP, by hand-written backprop."""
    hs = mlp_forward(x, params, phi, w_var, b_var)
    acts = [x] + [phi(h) for h in hs[:-1]]
    delta = np.ones((x.shape[0], 1))
    ntk = np.zeros((x.shape[0], x.shape[0]))
    for layer in range(len(params) - 1, -1, -1):
        a = acts[layer]
        ntk += (delta @ delta.T) * (w_var / a.shape[1] * (a @ a.T) + b_var)
        if layer:
            W = params[layer][0]
            delta = (delta @ W) * math.sqrt(w_var / a.shape[1]) * dphi(hs[layer - 1])
    return ntk


def mlp_ntk_finite_difference(x, params, phi, w_var, b_var, eps=1e-6):
    """The same NTK from a central-difference Jacobian: checks :func:`mlp_ntk` itself."""
    flat = [p for W, b in params for p in (W, b)]
    rows = []
    for p in flat:
        for idx in np.ndindex(p.shape):
            old = p[idx]
            p[idx] = old + eps
            up = mlp_output(x, params, phi, w_var, b_var)
            p[idx] = old - eps
            down = mlp_output(x, params, phi, w_var, b_var)
            p[idx] = old
            rows.append((up - down) / (2 * eps))
    jac = np.array(rows)
    return jac.T @ jac


def monte_carlo_kernels(x, phi, dphi, depth, w_var, b_var, width=2048, nets=6, seed=0):
    """Average over random wide MLPs of the readout's NNGP (b + w <a, a'> / n) and the NTK."""
    rng = np.random.default_rng(seed)
    nngp = np.zeros((x.shape[0], x.shape[0]))
    ntk = np.zeros_like(nngp)
    for _ in range(nets):
        params = random_mlp(rng, x.shape[1], width, depth)
        hs = mlp_forward(x, params, phi, w_var, b_var)
        a = phi(hs[-2]) if depth else x
        nngp += b_var + w_var * (a @ a.T) / a.shape[1]
        ntk += mlp_ntk(x, params, phi, dphi, w_var, b_var)
    return nngp / nets, ntk / nets
