"""nngp_dist: exact infinite-width network kernels, computed in tiles by Dask into Zarr.

The public API: :func:`kernel` runs a kernel job into a store, :func:`open_store` reads a store
as an ``xarray.Dataset``, :class:`Spec` describes an architecture and evaluates its kernel on
arrays, :func:`load_dataset` loads and validates a dataset, :class:`NNGPClassifier` and
:class:`NNGPRegressor` are scikit-learn-style estimators on the same engine.
"""

__version__ = "0.1.0"

from .datasets import load as load_dataset  # noqa: E402
from .errors import UserError  # noqa: E402
from .estimator import NNGPClassifier, NNGPRegressor  # noqa: E402
from .jobs import kernel  # noqa: E402
from .kernels import Spec  # noqa: E402
from .storage import KernelStore, open_store  # noqa: E402

__all__ = [
    "KernelStore",
    "NNGPClassifier",
    "NNGPRegressor",
    "Spec",
    "UserError",
    "__version__",
    "kernel",
    "load_dataset",
    "open_store",
]
