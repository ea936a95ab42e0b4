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


# --- finite convolutional networks (independent of nngp_dist.kernels.conv) ------------------


def _conv_index(n: int, k: int, stride: int, dilation: int, padding: str):
    """Input positions (into the zero-padded axis) of every tap of every output position, and
    the (before, after) padding: TensorFlow's SAME / VALID convention, written out directly."""
    span = (k - 1) * dilation + 1
    if padding == "valid":
        out, before, after = (n - span) // stride + 1, 0, 0
    else:
        out = -(-n // stride)
        total = max((out - 1) * stride + span - n, 0)
        before, after = total // 2, total - total // 2
    idx = np.arange(out)[:, None] * stride + np.arange(k)[None, :] * dilation
    return idx, (before, after)


class FiniteConvNet:
    """A random CNN of ``width`` channels in NTK parameterisation, with hand-written backprop.

    ``ops`` is a list of ("conv", k, stride, dilation, padding), ("phi",),
    ("residual", block_ops, shortcut_ops or None) and finally ("flatten",) or ("gap",) for the
    dense readout. ``forward`` returns the scalar output per image; ``ntk`` the empirical NTK
    sum over all parameters of df(x)/dp df(x')/dp; ``readout_features`` the last features, from
    which the NNGP given the network below the readout is b_var + w_var <feat, feat'> / F.
    """

    def __init__(self, rng, ops, in_channels, width, phi, dphi, w_var, b_var):
        self.phi, self.dphi, self.w, self.b = phi, dphi, w_var, b_var
        self.ops = self._init(rng, ops, in_channels, width)
        self.width = width

    def _init(self, rng, ops, c, width):
        out = []
        for op in ops:
            if op[0] == "conv":
                _, k, s, d, pad = op
                out.append(
                    {
                        "kind": "conv",
                        "k": k,
                        "s": s,
                        "d": d,
                        "pad": pad,
                        "W": rng.standard_normal((width, c * k * k)),
                        "b": rng.standard_normal(width),
                    }
                )
                c = width
            elif op[0] == "residual":
                block = self._init(rng, op[1], c, width)
                short = self._init(rng, op[2], c, width) if op[2] else None
                out.append({"kind": "residual", "block": block, "short": short})
                c = width
            elif op[0] in ("flatten", "gap"):
                out.append({"kind": op[0], "rng": rng})
            else:
                out.append({"kind": op[0]})
        return out

    # forward: returns the output and a tape for backprop
    def _conv_fwd(self, p, a):
        n, h, w, c = a.shape
        iy, py = _conv_index(h, p["k"], p["s"], p["d"], p["pad"])
        ix, px = _conv_index(w, p["k"], p["s"], p["d"], p["pad"])
        ap = np.pad(a, ((0, 0), py, px, (0, 0)))
        patches = ap[:, iy[:, None, :, None], ix[None, :, None, :], :]  # n, Ho, Wo, k, k, c
        patches = patches.reshape(*patches.shape[:3], -1)
        alpha = math.sqrt(self.w / patches.shape[-1])
        z = alpha * patches @ p["W"].T + math.sqrt(self.b) * p["b"]
        return z, (p, a.shape, ap.shape, iy, ix, py, px, patches, alpha)

    def _run(self, ops, a, tape):
        for p in ops:
            if p["kind"] == "conv":
                a, rec = self._conv_fwd(p, a)
                tape.append(("conv", rec))
            elif p["kind"] == "phi":
                tape.append(("phi", a))
                a = self.phi(a)
            elif p["kind"] == "residual":
                t_block, t_short = [], []
                out = self._run(p["block"], a, t_block)
                sc = self._run(p["short"], a, t_short) if p["short"] else a
                tape.append(("residual", (t_block, t_short)))
                a = out + sc
        return a

    def forward(self, x):
        """(outputs f(x), features before the readout, tape)."""
        tape = []
        a = self._run([p for p in self.ops if p["kind"] not in ("flatten", "gap")], x, tape)
        kind = self.ops[-1]["kind"]
        feat = a.reshape(len(a), -1) if kind == "flatten" else a.mean(axis=(1, 2))
        if not hasattr(self, "v"):
            rng = self.ops[-1]["rng"]
            self.v, self.c = rng.standard_normal(feat.shape[1]), rng.standard_normal()
        alpha = math.sqrt(self.w / feat.shape[1])
        f = alpha * feat @ self.v + math.sqrt(self.b) * self.c
        return f, feat, (tape, a.shape, kind, alpha)

    def _conv_bwd(self, rec, delta, grads):
        p, a_shape, ap_shape, iy, ix, py, px, patches, alpha = rec
        # parameter gradients, per image: dW = alpha delta^T patches, db = sqrt(b) sum delta
        gw = alpha * np.einsum("nhwo,nhwf->nof", delta, patches).reshape(len(delta), -1)
        gb = math.sqrt(self.b) * delta.sum(axis=(1, 2))
        grads.append(np.concatenate([gw, gb], axis=1))
        dpatch = (alpha * delta @ p["W"]).reshape(*delta.shape[:3], p["k"], p["k"], -1)
        gap = np.zeros(ap_shape)
        np.add.at(gap, (slice(None), iy[:, None, :, None], ix[None, :, None, :]), dpatch)
        return gap[:, py[0] : ap_shape[1] - py[1], px[0] : ap_shape[2] - px[1], :]

    def _back(self, tape, delta, grads):
        for kind, rec in reversed(tape):
            if kind == "conv":
                delta = self._conv_bwd(rec, delta, grads)
            elif kind == "phi":
                delta = delta * self.dphi(rec)
            else:
                t_block, t_short = rec
                d_block = self._back(t_block, delta, grads)
                d_short = self._back(t_short, delta, grads) if t_short else delta
                delta = d_block + d_short
        return delta

    def ntk(self, x):
        f, feat, (tape, shape, kind, alpha) = self.forward(x)
        grads = [np.concatenate([alpha * feat, np.full((len(x), 1), math.sqrt(self.b))], 1)]
        dfeat = alpha * np.broadcast_to(self.v, feat.shape)
        if kind == "flatten":
            delta = dfeat.reshape(shape)
        else:
            delta = np.broadcast_to(dfeat[:, None, None, :] / (shape[1] * shape[2]), shape)
        self._back(tape, np.array(delta), grads)
        g = np.concatenate(grads, axis=1)
        return g @ g.T

    def output_fd(self, x, eps=1e-6):
        """The NTK again, from central differences over every parameter (checks backprop)."""
        params = [self.v]
        stack = list(self.ops)
        while stack:
            p = stack.pop()
            if p["kind"] == "conv":
                params += [p["W"], p["b"]]
            elif p["kind"] == "residual":
                stack += p["block"] + (p["short"] or [])
        rows = []
        for arr in params:
            for idx in np.ndindex(arr.shape):
                old = arr[idx]
                arr[idx] = old + eps
                up = self.forward(x)[0]
                arr[idx] = old - eps
                down = self.forward(x)[0]
                arr[idx] = old
                rows.append((up - down) / (2 * eps))
        self.c += eps
        up = self.forward(x)[0]
        self.c -= 2 * eps
        down = self.forward(x)[0]
        self.c += eps
        rows.append((up - down) / (2 * eps))
        jac = np.array(rows)
        return jac.T @ jac


def monte_carlo_conv_kernels(x, ops, phi, dphi, w_var, b_var, width=256, nets=4, seed=0, ntk=True):
    """Average over random wide CNNs of the readout's NNGP and of the empirical NTK (None
    without ``ntk``: the forward passes alone are much cheaper, so wider nets fit)."""
    rng = np.random.default_rng(seed)
    n = len(x)
    nngp, ntk = np.zeros((n, n)), (np.zeros((n, n)) if ntk else None)
    for _ in range(nets):
        net = FiniteConvNet(rng, ops, x.shape[-1], width, phi, dphi, w_var, b_var)
        _, feat, _ = net.forward(x)
        nngp += b_var + w_var * feat @ feat.T / feat.shape[1]
        if ntk is not None:
            ntk = ntk + net.ntk(x)
    return nngp / nets, (None if ntk is None else ntk / nets)
