import numpy as np
import pytest
from distributed import Client, LocalCluster

from nngp_dist import backend


@pytest.fixture(params=["numpy", pytest.param("cupy", marks=pytest.mark.gpu)])
def xp(request):
    """The array namespaces under test: CuPy only where a GPU is present."""
    if request.param == "cupy":
        if not backend.cupy_available():
            pytest.skip("CuPy with a GPU is not available")
        import cupy

        return cupy
    return np


@pytest.fixture
def small_npz(tmp_path):
    """A small random dataset as an npz file (float inputs used as given)."""
    rng = np.random.default_rng(0)
    path = tmp_path / "small.npz"
    np.savez(
        path,
        x_train=rng.random((37, 5, 3)),
        y_train=rng.integers(0, 3, 37),
        x_test=rng.random((11, 5, 3)),
        y_test=rng.integers(0, 3, 11),
    )
    return path


@pytest.fixture(scope="module")
def client():
    """Two in-process single-threaded workers, shared by a module's tests."""
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                      dashboard_address=None) as cluster, Client(cluster) as c:  # fmt: skip
        yield c
