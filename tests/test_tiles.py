"""The solvers' tile mathematics and the worker-task wrapper, without a cluster.

Oracles: SciPy's dense Cholesky, triangular solves and log-determinant on seeded SPD matrices,
with tile edges that do not divide N.
"""

import numpy as np
import pytest
import scipy.linalg
import zarr

from nngp_dist import workers
from nngp_dist.layout import record
from nngp_dist.solvers.factor import Factor
from nngp_dist.solvers.tiles import NotPositiveDefinite, add_jitter, potrf, trsm, update
from nngp_dist.tiling import span, symmetric


def spd(n, seed=0):
    a = np.random.default_rng(seed).standard_normal((n, n + 3))
    return a @ a.T / n


def tiled_cholesky(a, t):
    """The right-looking tiled factorisation the store's task graph runs, as a plain loop over
    upper tiles (each tile given only its upper triangle on the diagonal, as stored)."""
    n = len(a)
    nt = -(-n // t)
    s = [span(t, n, k) for k in range(nt)]
    work = {
        (i, j): np.triu(a[s[i], s[j]]) if i == j else a[s[i], s[j]].copy()
        for i in range(nt)
        for j in range(i, nt)
    }
    u = np.zeros_like(a)
    for k in range(nt):
        u[s[k], s[k]] = potrf(work[k, k])
        for j in range(k + 1, nt):
            u[s[k], s[j]] = trsm(u[s[k], s[k]], work[k, j])
        for i in range(k + 1, nt):
            for j in range(i, nt):
                u_kj = None if i == j else u[s[k], s[j]]
                work[i, j] = update(work[i, j], u[s[k], s[i]], u_kj)
    return u


@pytest.mark.parametrize("n,t", [(50, 50), (50, 16), (37, 10)])
def test_tiled_cholesky_equals_scipy(n, t):
    a = spd(n)
    u = tiled_cholesky(a, t)
    np.testing.assert_allclose(u, scipy.linalg.cholesky(a, lower=False), rtol=1e-10, atol=1e-12)


def test_potrf_uses_the_upper_triangle_and_refuses_an_indefinite_tile():
    a = spd(12)
    garbage = np.triu(a) + np.tril(np.full_like(a, 7.0), -1)  # below the diagonal: not read
    np.testing.assert_allclose(potrf(garbage), scipy.linalg.cholesky(a), rtol=1e-12)
    with pytest.raises(NotPositiveDefinite):
        potrf(a - 10 * np.eye(12))


def test_add_jitter_copies_as_float64():
    tile = np.eye(3, dtype=np.float32)
    out = add_jitter(tile, 0.5)
    assert out.dtype == np.float64 and np.allclose(np.diag(out), 1.5)
    assert tile[0, 0] == 1.0  # the input is not changed


@pytest.mark.parametrize("n,t,m", [(40, 40, 40), (37, 10, 37), (37, 10, 23)])
def test_factor_solves_and_log_determinant_equal_scipy(n, t, m):
    """A Factor over the first m points is the factor of their kernel (leading blocks)."""
    a = spd(n, seed=1)
    u = scipy.linalg.cholesky(a, lower=False)
    b = np.random.default_rng(2).standard_normal((n, 3))
    f = Factor(u, t, m)
    x, logdet = f.solve(b)
    np.testing.assert_allclose(x, np.linalg.solve(a[:m, :m], b[:m]), rtol=1e-9)
    assert logdet == pytest.approx(np.linalg.slogdet(a[:m, :m])[1], rel=1e-12)
    w = np.concatenate(f.forward(f.split(b)))
    np.testing.assert_allclose(w, scipy.linalg.solve_triangular(u[:m, :m].T, b[:m], lower=True))


def test_symmetric_mirrors_the_upper_triangle():
    a = np.arange(9.0).reshape(3, 3)
    s = symmetric(a)
    assert np.array_equal(s, s.T) and np.array_equal(np.triu(s), np.triu(a))


def test_store_task_writes_the_record_after_the_data_and_returns_the_value(tmp_path):
    url = str(tmp_path / "s.zarr")
    g = zarr.open_group(url, mode="w")
    g.create_array("a", shape=(4,), chunks=(2,), dtype="f8", fill_value=np.nan)
    g.create_group("tiles").create_array(
        "a", shape=(2,), chunks=(1,), dtype="f4", fill_value=np.nan
    )
    seen = {}

    @workers.store_task
    def fill(ctx, group, k, value):
        seen["record_before"] = float(group[record("a")][k])
        group["a"][ctx.span(k)] = value
        return workers.Recorded("a", k, value * 10)

    @workers.store_task
    def fails(ctx, group, k):
        group["a"][ctx.span(k)] = -1.0
        raise RuntimeError("killed mid-task")

    ctx = workers.TaskContext(url, "token-1", t=2, n=4)
    assert fill(ctx, 1, 3.0) == 30.0
    assert np.isnan(seen["record_before"])
    g = zarr.open_group(url, mode="r")
    assert np.array_equal(g["a"][2:], [3.0, 3.0]) and g["tiles/a"][1] > 0
    with pytest.raises(RuntimeError):
        fails(ctx, 0)
    assert np.isnan(zarr.open_group(url, mode="r")["tiles/a"][0])  # no record without success
    assert ctx.blocks == 2 and ctx.key("t", 1).startswith("t-")
