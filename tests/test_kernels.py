"""Kernel mathematics against independent oracles (tests/reference.py)."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy import special

from nngp_dist import kernels
from nngp_dist.kernels import Spec

from . import reference

PAIRS = [
    (0.3, 1.0, 1.0),
    (-0.7, 1.2, 0.9),
    (1.9, 2.0, 2.5),
    (0.0, 0.5, 3.0),
    (0.99, 1.0, 1.0),
    (9.5, 10.0, 10.0),  # large variances: quadrature must refine its rule
    (-3.0, 10.0, 25.0),
]

PHIS = {
    "relu": (lambda x: np.maximum(x, 0), lambda x: np.where(x > 0, 1.0, 0.0)),
    "erf": (special.erf, lambda x: 2 / math.sqrt(math.pi) * np.exp(-x * x)),
    "tanh": (np.tanh, lambda x: 1 - np.tanh(x) ** 2),
    "gelu": (
        lambda x: x * special.ndtr(x),
        lambda x: special.ndtr(x) + x * np.exp(-x * x / 2) / math.sqrt(2 * math.pi),
    ),
    "leaky_relu:0.2": (lambda x: np.where(x > 0, x, 0.2 * x), lambda x: np.where(x > 0, 1.0, 0.2)),
    "linear": (lambda x: x, lambda x: 1.0 + 0.0 * x),
}


@pytest.mark.parametrize("name", PHIS)
@pytest.mark.parametrize("k12,k11,k22", PAIRS)
def test_moments_against_2d_quadrature(name, k12, k11, k22):
    phi, dphi = PHIS[name]
    nl = kernels.nonlinearities.from_spec(name)
    f, fdot = nl.moments(np.array([k12]), np.array([k11]), np.array([k22]), True)
    want_f = reference.gaussian_expectation(lambda u, v: phi(u) * phi(v), k12, k11, k22)
    # The derivative of a kink is a step: split-free dblquad is still accurate to ~1e-8 there.
    want_fdot = reference.gaussian_expectation(lambda u, v: dphi(u) * dphi(v), k12, k11, k22)
    assert f[0] == pytest.approx(want_f, rel=1e-6, abs=1e-9)
    assert fdot[0] == pytest.approx(want_fdot, rel=1e-6, abs=1e-8)


@pytest.mark.parametrize("name", PHIS)
def test_variance_against_1d_quadrature(name):
    from scipy import integrate

    phi = PHIS[name][0]
    nl = kernels.nonlinearities.from_spec(name)
    for k in (0.1, 1.0, 3.7, 20.0):

        def integrand(z, k=k):
            return phi(math.sqrt(k) * z) ** 2 * math.exp(-z * z / 2) / math.sqrt(2 * math.pi)

        want = sum(
            integrate.quad(integrand, a, b, epsabs=1e-13, epsrel=1e-12)[0]
            for a, b in ((-12, 0), (0, 12))
        )
        assert float(nl.variance(np.array([k]))[0]) == pytest.approx(want, rel=1e-8)


def test_relu_diagonal_is_exactly_half():
    state = kernels.diagonal_state(np.array([[0.3], [1.7], [12.5]]))
    assert np.array_equal(kernels.relu()(state).nngp, state.nngp / 2)


def test_relu_closed_form_is_stable_near_rho_one():
    # k12 marginally above sqrt(k11 k22) (rounding in a Gram matrix) must not give NaN.
    f, fdot = kernels.relu().moments(
        np.array([1.0 + 1e-15]), np.array([1.0]), np.array([1.0]), True
    )
    assert f[0] == pytest.approx(0.5, rel=1e-12)
    assert fdot[0] == pytest.approx(0.5, rel=1e-12)


def test_user_function_by_quadrature_matches_closed_form():
    quad = kernels.elementwise(special.erf, name="erf-by-quadrature")
    x = np.random.default_rng(1).standard_normal((6, 9))
    for kind in ("nngp", "ntk"):
        closed = Spec(depth=3, weight_var=1.7, bias_var=0.2, activation="erf", kernel=kind)
        by_quad = Spec(depth=3, weight_var=1.7, bias_var=0.2, activation=quad, kernel=kind)
        np.testing.assert_allclose(by_quad.cross(x, x), closed.cross(x, x), rtol=1e-8)


@pytest.mark.parametrize("name", ["relu", "erf", "tanh"])
def test_against_monte_carlo_of_wide_networks(name):
    phi, dphi = PHIS[name]
    rng = np.random.default_rng(2)
    x = rng.standard_normal((5, 16)) * rng.uniform(0.5, 1.5, (5, 1))
    depth, w_var, b_var = 3, 1.6, 0.2
    nngp_mc, ntk_mc = reference.monte_carlo_kernels(x, phi, dphi, depth, w_var, b_var)
    for kind, mc in (("nngp", nngp_mc), ("ntk", ntk_mc)):
        spec = Spec(depth=depth, weight_var=w_var, bias_var=b_var, activation=name, kernel=kind)
        np.testing.assert_allclose(spec.cross(x, x), mc, atol=0.01 * np.abs(mc).max(), rtol=0.05)


def test_reference_ntk_backprop_matches_finite_differences():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 4))
    params = reference.random_mlp(rng, 4, 5, 2)
    phi, dphi = PHIS["tanh"]
    by_hand = reference.mlp_ntk(x, params, phi, dphi, 1.3, 0.4)
    by_fd = reference.mlp_ntk_finite_difference(x, params, phi, 1.3, 0.4)
    np.testing.assert_allclose(by_hand, by_fd, rtol=1e-6)


def test_all_depths_from_one_pass_equal_separate_specs():
    x = np.random.default_rng(4).random((7, 12))
    y = np.random.default_rng(5).random((3, 12))
    for kind in ("nngp", "ntk"):
        deep = Spec(depth=5, weight_var=1.45, bias_var=0.28, kernel=kind)
        stacked = deep.cross(x, y, depths=[0, 2, 5])
        diags = deep.diag(x, depths=[0, 2, 5])
        for k, depth in enumerate([0, 2, 5]):
            single = Spec(depth=depth, weight_var=1.45, bias_var=0.28, kernel=kind)
            np.testing.assert_allclose(stacked[k], single.cross(x, y), rtol=1e-13)
            np.testing.assert_allclose(diags[k], single.diag(x), rtol=1e-13)


def test_depth_zero_is_the_linear_kernel():
    x = np.random.default_rng(6).random((4, 8))
    k = Spec(depth=0, weight_var=2.0, bias_var=0.5).cross(x, x)
    np.testing.assert_allclose(k, 0.5 + 2.0 * x @ x.T / 8, rtol=1e-14)


def test_row_blocking_does_not_change_the_result(monkeypatch):
    x = np.random.default_rng(7).random((37, 11))
    spec = Spec(depth=4, weight_var=1.3, bias_var=0.1, kernel="ntk")
    monkeypatch.setattr(kernels.fused, "applies", lambda spec: False)  # layer by layer
    whole = spec.cross(x, x)
    monkeypatch.setattr(kernels.spec, "BLOCK_ENTRIES", 50)  # 1 row per block
    np.testing.assert_array_equal(spec.cross(x, x), whole)


def test_compiled_arccos_against_numpy():
    from nngp_dist.kernels import _relu_loop

    x = np.concatenate(
        [
            np.linspace(-1, 1, 200_001),
            [-1.0, -0.5, 0.5, 1.0],
            1 - np.logspace(-16, -1, 200),
            -1 + np.logspace(-16, -1, 200),
        ]
    )
    got = np.empty_like(x)
    _relu_loop.arccos(x, got)
    want = np.arccos(x)
    assert np.max(np.abs(got - want)) <= 4.5e-16
    # Relative accuracy where arccos is small (x near 1): what pi - t near rho = -1 relies on.
    near = x > 0.99
    np.testing.assert_allclose(got[near], want[near], rtol=4e-16, atol=0)


@pytest.mark.parametrize("activation", ["relu", "leaky_relu:0.2"])
@pytest.mark.parametrize("kind", ["nngp", "ntk"])
def test_compiled_loop_equals_layer_by_layer(monkeypatch, activation, kind):
    """The compiled CPU loop (kernels.fused) against the layer-by-layer recursion, on pairs
    at every correlation: random, identical, negated, orthogonal-ish, and zero inputs."""
    rng = np.random.default_rng(11)
    x1 = rng.standard_normal((40, 30))
    x2 = np.concatenate([x1[:10], -x1[10:20], rng.standard_normal((15, 30)), np.zeros((2, 30))])
    x1[-1] = 0.0
    depths = [0, 1, 2, 5]
    for b_var in (0.0, 0.3):
        spec = Spec(depth=5, weight_var=1.7, bias_var=b_var, activation=activation, kernel=kind)
        assert kernels.fused.applies(spec)
        got = spec.cross(x1, x2, depths=depths)
        with monkeypatch.context() as m:
            m.setattr(kernels.fused, "applies", lambda spec: False)
            want = spec.cross(x1, x2, depths=depths)
        assert np.isfinite(got).all()
        # At rho = +-1 the NTK's (pi - t) = arccos(-rho) turns a rounding of rho into ~1e-8:
        # identical and negated pairs get that tolerance, in both forms alike.
        norms = np.outer(np.linalg.norm(x1, axis=1), np.linalg.norm(x2, axis=1))
        edge = np.isclose(np.abs(x1 @ x2.T), norms, rtol=1e-12, atol=0)  # and zero inputs
        np.testing.assert_allclose(got[:, ~edge], want[:, ~edge], rtol=1e-12, atol=1e-15)
        tol = (1e-7 if kind == "ntk" else 1e-13) * np.abs(want).max()
        np.testing.assert_allclose(got[:, edge], want[:, edge], rtol=0, atol=tol)


@pytest.mark.parametrize("kind", ["nngp", "ntk"])
def test_compiled_loop_on_a_set_with_itself(monkeypatch, kind):
    """``cross(x, x)`` (a diagonal tile) evaluates the upper triangle and mirrors it: exactly
    symmetric, and equal to the layer-by-layer recursion on a copy of ``x``, at every depth,
    with repeated, negated and zero rows among the inputs."""
    rng = np.random.default_rng(12)
    x = rng.standard_normal((70, 30))  # over one 64-row block of the mirror
    x[5], x[6], x[-1] = x[3], -x[4], 0.0
    depths = [0, 1, 3]
    spec = Spec(depth=3, weight_var=1.7, bias_var=0.2, kernel=kind)
    got = spec.cross(x, x, depths=depths)
    with monkeypatch.context() as m:
        m.setattr(kernels.fused, "applies", lambda spec: False)
        want = spec.cross(x, x.copy(), depths=depths)
    assert (got == got.transpose(0, 2, 1)).all()
    norms = np.outer(*(2 * [np.linalg.norm(x, axis=1)]))
    edge = np.isclose(np.abs(x @ x.T), norms, rtol=1e-12, atol=0)  # as in the test above
    np.testing.assert_allclose(got[:, ~edge], want[:, ~edge], rtol=1e-12, atol=1e-15)
    tol = (1e-7 if kind == "ntk" else 1e-13) * np.abs(want).max()
    np.testing.assert_allclose(got[:, edge], want[:, edge], rtol=0, atol=tol)


@pytest.mark.parametrize("arch", ["fc", "conv"])
def test_compiled_loops_release_the_gil(arch):
    """A worker's event loop (heartbeats, the dashboard, cancellation) must keep running while
    a tile's compiled loop does: another thread runs Python while the loop is in flight.
    Holding the GIL, an 8-layer ConvNet tile (about 15 s) made its worker deaf that long."""
    import threading
    import time

    rng = np.random.default_rng(0)
    if arch == "fc":
        spec, x1, x2 = Spec(depth=40), rng.random((1500, 20)), rng.random((1500, 20))
    else:
        spec = Spec(arch="conv", depth=8, image_shape=(28, 28, 1))
        x1, x2 = rng.random((48, 784)), rng.random((48, 784))
    spec.cross(x1[:2], x2[:2])  # load the loop first
    worker = threading.Thread(target=spec.cross, args=(x1, x2))
    worker.start()
    time.sleep(0.02)
    ticks = 0
    while worker.is_alive() and ticks < 5:
        ticks += 1
        time.sleep(0.001)
    worker.join()
    assert ticks == 5, "the compiled loop held the GIL for its whole run"


def test_compiled_loops_load_where_the_install_and_home_are_read_only(tmp_path):
    """Numba refuses to cache (and so to load) the loops where neither the package folder nor
    the user's cache folder is writable; the loops then cache in the temporary directory."""
    script = (
        "import numba.core.caching as c, numpy as np\n"
        "for cls in (c.InTreeCacheLocator, c.UserWideCacheLocator):\n"
        "    cls.from_function = classmethod(lambda cls, f, p: None)  # neither writable\n"
        "from nngp_dist.kernels import Spec, fused\n"
        "x = np.random.default_rng(0).random((3, 5))\n"
        "print(Spec(depth=2).cross(x, x)[0, 1], fused._loops().__name__)\n"
    )
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    env.pop("NUMBA_CACHE_DIR", None)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[1].endswith("_relu_loop")
    assert list(tmp_path.glob("nngp-dist-numba-*/*/*.nbi"))  # cached there


def test_compiled_loop_only_for_relu():
    assert kernels.fused.applies(Spec(activation="leaky_relu:0.1"))
    assert not kernels.fused.applies(Spec(activation="erf"))
    assert not kernels.fused.applies(Spec(activation="tanh"))


def test_spec_round_trips_and_hash_is_canonical():
    spec = Spec(depth=7, weight_var=1.45, bias_var=0.28, activation="leaky_relu:0.1", kernel="ntk")
    again = Spec.from_json(spec.to_json())
    assert again.to_json() == spec.to_json()
    assert again.hash == spec.hash
    assert Spec(depth=7, weight_var=1.45, bias_var=0.28).hash != spec.hash


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"activation": "swish"}, "unknown activation"),
        ({"kernel": "gp"}, "unknown kernel"),
        ({"arch": "transformer"}, "unknown architecture"),
        ({"depth": -1}, "depth"),
        ({"weight_var": float("nan")}, "weight_var"),
        ({"bias_var": -1.0}, "bias_var"),
        ({"activation": "leaky_relu:2"}, "alpha"),
        ({"activation": "nosuchmodule:fn"}, "cannot import"),
    ],
)
def test_bad_specs_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Spec(**kwargs)


def test_matches_neural_tangents():
    """Values printed by neural-tangents 0.6.5 (jax 0.4.23, float64, benchmarks/nt_baseline.py
    --check) for depth 3, w_var 1.45, b_var 0.28, ReLU, on default_rng(0).random((5, 784))."""
    nt_nngp = [
        [0.9307982186996858, 0.8920958119484155, 0.8822188152703511],
        [0.8920958119484155, 0.920353466986598, 0.8788641951850188],
        [0.8822188152703511, 0.8788641951850188, 0.9061220256723318],
    ]
    nt_ntk_offdiag = [1.9066337048035253, 1.8606768654603734, 1.8558077320018602]
    x = np.random.default_rng(0).random((5, 784))
    kw = {"depth": 3, "weight_var": 1.45, "bias_var": 0.28}
    np.testing.assert_allclose(Spec(**kw).cross(x, x)[:3, :3], nt_nngp, rtol=1e-12)
    ntk = Spec(**kw, kernel="ntk")
    k = ntk.cross(x, x)
    np.testing.assert_allclose([k[0, 1], k[0, 2], k[1, 2]], nt_ntk_offdiag, rtol=1e-12)
    # neural-tangents' NTK diagonal carries arccos(1 - eps) rounding (~1e-8): loose there
    np.testing.assert_allclose(
        ntk.diag(x)[:3], [2.330017858883189, 2.288238846351671, 2.2313130971344424], rtol=1e-7
    )


@pytest.mark.parametrize("kind", ["nngp", "ntk"])
@pytest.mark.parametrize("activation", ["relu", "leaky_relu:0.2", "erf", "tanh"])
def test_backends_agree(xp, activation, kind):
    """The same code on each array namespace (CuPy runs only where a GPU is present; there the
    ReLU family runs as one fused kernel). The pairs include images with themselves."""
    x = np.random.default_rng(8).random((9, 20))
    spec = Spec(depth=4, weight_var=1.6, bias_var=0.1, activation=activation, kernel=kind)
    from nngp_dist.backend import to_host

    got = to_host(spec.cross(xp.asarray(x), xp.asarray(x[:4])))
    np.testing.assert_allclose(got, spec.cross(x, x[:4]), rtol=1e-10)
    np.testing.assert_allclose(to_host(spec.diag(xp.asarray(x))), spec.diag(x), rtol=1e-10)


def test_fused_gpu_relu_body_compiled_as_c_equals_numpy(tmp_path):
    """The CUDA body of the GPU's fused ReLU-family kernel is plain C too: compiled on the CPU
    (without FMA contraction, as the GPU kernel is), it must give NumPy's closed form at every
    correlation, rho = +-1 and zero variances included. This checks its arithmetic where no
    GPU is; the backend test above checks the kernel itself on one."""
    import ctypes
    import shutil
    import subprocess

    from nngp_dist.kernels.nonlinearities import RELU_CUDA_BODY, RELU_CUDA_DOT, leaky_relu

    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    src = tmp_path / "relu.c"
    src.write_text(
        "#include <math.h>\n"
        "void run(long n, const double *K12, const double *K11, const double *K22,\n"
        "         double alpha, double c, double *F, double *FD) {\n"
        "  for (long i = 0; i < n; i++) {\n"
        "    double k12 = K12[i], k11 = K11[i], k22 = K22[i], f, fdot;\n"
        f"{RELU_CUDA_BODY}{RELU_CUDA_DOT}"
        "    F[i] = f; FD[i] = fdot;\n"
        "  }\n"
        "}\n"
    )
    lib = tmp_path / "relu.so"
    cmd = [cc, "-O2", "-ffp-contract=off", "-shared", "-fPIC", "-o", str(lib), str(src), "-lm"]
    subprocess.run(cmd, check=True, capture_output=True)
    run = ctypes.CDLL(str(lib)).run
    rng = np.random.default_rng(21)
    k11, k22 = rng.uniform(0.1, 3.0, 400), rng.uniform(0.1, 3.0, 400)
    rho = np.concatenate([rng.uniform(-1, 1, 394), [1.0, -1.0, 0.0, 1 - 1e-12, -1 + 1e-12, 1]])
    k22[-6:-3] = k11[-6:-3]  # an input with itself, its negative, and an orthogonal one
    k12 = rho * np.sqrt(k11 * k22)
    k12[-6], k12[-5] = k11[-6], -k11[-5]
    k11[-1] = k12[-1] = 0.0  # a zero input
    ptr = ctypes.POINTER(ctypes.c_double)
    for alpha in (0.0, 0.2):
        f, fdot = np.empty(400), np.empty(400)
        c = (1.0 - alpha) ** 2
        args = [a.ctypes.data_as(ptr) for a in (k12, k11, k22)]
        run(
            ctypes.c_long(400),
            *args,
            ctypes.c_double(alpha),
            ctypes.c_double(c),
            f.ctypes.data_as(ptr),
            fdot.ctypes.data_as(ptr),
        )
        want_f, want_dot = leaky_relu(alpha).moments(k12, k11, k22, True)
        # F's terms are of the size of sqrt(k11 k22) and cancel near rho = -1, where F is
        # small: there a last-bit difference of the two arctangents (libm's here, NumPy's
        # SIMD one on AVX-512 machines) is a few 1e-15 of F. Bounded on the terms' scale.
        err = np.abs(f - want_f)
        assert (err <= 1e-15 * (np.abs(want_f) + np.sqrt(k11 * k22))).all(), err.max()
        np.testing.assert_allclose(fdot, want_dot, rtol=1e-15, atol=0)


def test_module_function_activation_against_closed_form():
    """'numpy:sin' by quadrature against E[sin u sin v] = exp(-(k11 + k22) / 2) sinh(k12)."""
    nl = kernels.nonlinearities.from_spec("numpy:sin")
    assert nl.spec == {"name": "custom", "function": "numpy:sin", "order": 73}
    k12, k11, k22 = np.array([0.4, -1.1]), np.array([1.0, 2.0]), np.array([0.7, 3.0])
    f, fdot = nl.moments(k12, k11, k22, True)
    np.testing.assert_allclose(f, np.exp(-(k11 + k22) / 2) * np.sinh(k12), rtol=1e-9)
    np.testing.assert_allclose(fdot, np.exp(-(k11 + k22) / 2) * np.cosh(k12), rtol=1e-8)
    assert (
        Spec.from_dict(Spec(activation="numpy:sin").to_dict(), trust=True).hash
        == Spec(activation="numpy:sin").hash
    )
