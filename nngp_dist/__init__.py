"""nngp_dist: exact infinite-width network kernels, computed in tiles by Dask into Zarr.

The public API: :func:`kernel` runs a kernel job into a store, :func:`open_store` reads a store
as an ``xarray.Dataset``, :class:`Spec` describes an architecture and evaluates its kernel on
arrays, :func:`load_dataset` loads and validates a dataset, :class:`NNGPClassifier` and
:class:`NNGPRegressor` are scikit-learn estimators on the same engine (loaded on first use, so
that importing the package, as every Dask worker does, does not import scikit-learn), and
:class:`LaplaceGPClassifier` and :class:`LaplaceGPRegressor` the Laplace-GP posteriors of
trained PyTorch networks (torch is imported only when they are fitted).
"""

from ._version import __version__
from .datasets import load as load_dataset
from .errors import UserError
from .jobs import kernel
from .kernels import Spec
from .laplace_estimator import LaplaceGPClassifier, LaplaceGPRegressor
from .storage import KernelStore, open_store

__all__ = [
    "KernelStore",
    "LaplaceGPClassifier",
    "LaplaceGPRegressor",
    "NNGPClassifier",
    "NNGPRegressor",
    "Spec",
    "UserError",
    "__version__",
    "kernel",
    "load_dataset",
    "open_store",
]


def __getattr__(name: str):  # PEP 562: the estimators (and scikit-learn) load on first use
    if name in ("NNGPClassifier", "NNGPRegressor"):
        from . import estimator

        return getattr(estimator, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
