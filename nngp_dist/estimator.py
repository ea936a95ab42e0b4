"""scikit-learn-style estimators on the same engine: ``NNGPRegressor`` and ``NNGPClassifier``.

``fit(X, y)`` computes the training kernel in tiles into a kernel store and factors it (or runs
CG), exactly as ``nngp-dist kernel`` + ``solve`` would; ``predict(X)`` puts ``X`` into the store
as its test set (the training kernel, factor and weights are kept; only the test tiles are
computed) and reads back the posterior means and variances. The store is a temporary directory
unless ``store`` names one: then it stays (``nngp-dist status`` and ``open_store`` read it), a
refit on the same data resumes it, and a store of other data is refused, never overwritten.

The estimators follow scikit-learn's conventions (``get_params``/``set_params``, parameters
stored as given, fitted attributes ending in ``_``) without depending on scikit-learn.

Examples
--------
>>> from nngp_dist import datasets
>>> ds = datasets.load("demo", train_size=200, test_size=50)
>>> clf = NNGPClassifier(depth=2, weight_var=1.6, bias_var=0.2, noise=1e-2, workers=1)
>>> clf.fit(ds.x_train, ds.y_train).score(ds.x_test, ds.y_test) > 0.6  # doctest: +SKIP
True
"""

from __future__ import annotations

import inspect
import os
import shutil
import tempfile
import weakref
from typing import Any

import numpy as np

from . import datasets, jobs
from .errors import StoreMismatch, UserError
from .layout import MEAN, VARIANCE
from .lock import store_lock
from .storage import KernelStore

__all__ = ["NNGPClassifier", "NNGPRegressor"]

_DATASET = "arrays"


class NNGPRegressor:
    """Exact Gaussian-process regression with an infinitely wide network's kernel.

    Parameters: the architecture (``arch``, ``depth``, ``weight_var``, ``bias_var``,
    ``activation``, ``kernel`` = ``"nngp"`` or ``"ntk"``; for ``arch="conv"`` also
    ``filter_size``, ``stride``, ``dilation``, ``padding``, ``skip_every``, ``readout``: see
    :class:`~nngp_dist.kernels.Spec`; image networks take ``X`` as (n, H, W[, C])); the solve
    (``noise`` relative to the mean training diagonal, ``max_noise``, ``method`` =
    ``"cholesky"`` or ``"cg"``); the tiles (``tile_size``, ``dtype``); and where to compute
    (``store``; ``client``, or ``scheduler``, or an embedded cluster of ``workers`` with
    ``memory_limit`` each). Targets are modelled as noisy observations of the GP;
    ``predict(X, return_std=True)`` returns the standard deviation of the noise-free latent
    function at ``X``.
    """

    def __init__(self, *, arch: str = "fc", depth: int = 3, weight_var: float = 1.0,
                 bias_var: float = 0.0, activation: Any = "relu", kernel: str = "nngp",
                 filter_size: int = 3, stride: int = 1, dilation: int = 1,
                 padding: str = "same", skip_every: int = 0, readout: str = "flatten",
                 noise: float = 1e-6, max_noise: float | None = None, method: str = "cholesky",
                 tile_size: int | None = None, dtype: str | None = None,
                 store: str | None = None, client: Any = None, scheduler: str | None = None,
                 workers: int | None = None, memory_limit: str | None = None,
                 progress: bool = False) -> None:  # fmt: skip
        for name, value in locals().items():
            if name != "self":
                setattr(self, name, value)

    # --- scikit-learn's parameter protocol ------------------------------------------------------

    @classmethod
    def _param_names(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        return [p for p in sig.parameters if p != "self"]

    def get_params(self, deep: bool = True) -> dict:
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self, **params: Any) -> NNGPRegressor:
        names = self._param_names()
        for name, value in params.items():
            if name not in names:
                raise ValueError(f"unknown parameter {name!r} for {type(self).__name__}")
            setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        defaults = type(self)().get_params()
        changed = {k: v for k, v in self.get_params().items() if v != defaults[k]}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in changed.items())})"

    # --- fitting and predicting ---------------------------------------------------------------

    def _targets(self, y: np.ndarray) -> np.ndarray:
        y = np.asarray(y, dtype=np.float64)
        if y.ndim not in (1, 2):
            raise UserError(f"y must be 1-D or 2-D, got shape {y.shape}")
        return y

    def fit(self, X: Any, y: Any) -> NNGPRegressor:
        """Compute the training kernel into the store and solve for the GP weights."""
        X = np.asarray(X)
        y_fit = self._targets(y)
        if len(y_fit) != len(X):
            raise UserError(f"X has {len(X)} examples but y has {len(y_fit)}")
        # A store needs a test set; the first training example stands in until predict().
        data = datasets.from_arrays(_DATASET, X, y_fit, X[:1], y_fit[:1])
        if self.store is None:
            folder = tempfile.mkdtemp(prefix="nngp-estimator-")
            self._cleanup = weakref.finalize(self, shutil.rmtree, folder, ignore_errors=True)
            url = os.path.join(folder, "kernel.zarr")
        else:
            url = self.store
        with store_lock(url, "fit"):  # kernel and solve as one writer: none between them
            self.solve_ = self._fit_store(url, data)
        self.store_ = url
        self.X_train_, self.y_train_ = data.x_train, data.y_train
        self.n_features_in_ = int(np.prod(X.shape[1:]))
        self.image_shape_ = X.shape[1:]
        self.noise_ = self.solve_["noise"]
        return self

    def _fit_store(self, url: str, data: datasets.Dataset) -> dict:
        """The training kernel into the store at ``url``, then the solve; its record."""
        run = self._cluster()
        try:
            jobs.kernel(url, dataset=data, tile_size=self.tile_size, dtype=self.dtype,
                        replace_test=True, progress=self.progress, **self._arch(),
                        **run)  # fmt: skip
        except StoreMismatch as e:
            raise UserError(
                f"store={url!r} holds the kernel of a different run:\n"
                + "\n".join(e.differences)
                + "\nNothing was changed. Pass another store (or none, for a temporary one); "
                "an estimator never overwrites a store."
            ) from None
        return jobs.solve(url, noise=self.noise, max_noise=self.max_noise, method=self.method,
                          progress=self.progress, **run)  # fmt: skip

    def _arch(self) -> dict:
        names = ["arch", "weight_var", "bias_var", "activation", "kernel"]
        if self.arch != "resnet32":
            names.append("depth")
        if self.arch == "conv":  # the options of the architectures that have them
            names += ["filter_size", "stride", "dilation", "padding", "skip_every", "readout"]
        return {name: getattr(self, name) for name in names}

    def _cluster(self) -> dict:
        if self.client is not None:
            return {"client": self.client}
        return {"scheduler": self.scheduler, "workers": self.workers,
                "memory_limit": self.memory_limit}  # fmt: skip

    def _posterior(self, X: Any) -> tuple[np.ndarray, np.ndarray]:
        if not hasattr(self, "store_"):
            raise UserError(f"this {type(self).__name__} is not fitted yet; call fit(X, y) first")
        X = np.asarray(X)
        if X.ndim < 2 or X.shape[1:] != self.image_shape_:
            raise UserError(
                f"X has examples of shape {X.shape[1:]}; this model was fitted on "
                f"{self.image_shape_}"
            )
        placeholder = np.zeros((len(X),) + self.y_train_.shape[1:], dtype=self.y_train_.dtype)
        data = datasets.from_arrays(_DATASET, self.X_train_, self.y_train_, X, placeholder)
        run = self._cluster()
        with store_lock(self.store_, "predict"):  # the test set and its predictions together
            jobs.kernel(self.store_, dataset=data, tile_size=self.tile_size, dtype=self.dtype,
                        replace_test=True, progress=self.progress, **self._arch(),
                        **run)  # fmt: skip
            jobs.predict(self.store_, score=False, progress=self.progress, **run)
            ks = KernelStore.open(self.store_)
            return ks.read(MEAN), ks.read(VARIANCE)

    def predict(self, X: Any, return_std: bool = False) -> Any:
        """Posterior mean at ``X`` (and the latent standard deviation with ``return_std``)."""
        mean, var = self._posterior(X)
        if self.y_train_.ndim == 1:
            mean = mean[:, 0]
        return (mean, np.sqrt(var)) if return_std else mean

    def score(self, X: Any, y: Any) -> float:
        """The coefficient of determination R^2 of ``predict(X)``."""
        y = self._targets(y)
        pred = self.predict(X).reshape(y.shape)
        return float(1 - ((y - pred) ** 2).sum() / ((y - y.mean(axis=0)) ** 2).sum())


class NNGPClassifier(NNGPRegressor):
    """Classification by GP regression on one-hot targets (0.9 for the class, -0.1 elsewhere),
    as Lee et al. (2018) do: ``predict`` is the class of the largest posterior mean;
    ``decision_function`` gives the means per class; ``predict(X, return_std=True)`` also the
    latent standard deviation (the same for every class)."""

    def _targets(self, y: np.ndarray) -> np.ndarray:
        y = np.asarray(y)
        if y.ndim != 1:
            raise UserError(f"y must be 1-D class labels, got shape {y.shape}")
        if y.dtype.kind == "f" and not np.isfinite(y).all():
            raise UserError("y has NaN or infinite labels")
        self.classes_, codes = np.unique(y, return_inverse=True)
        return codes.astype(np.int64)

    def fit(self, X: Any, y: Any) -> NNGPClassifier:
        super().fit(X, y)
        return self

    def decision_function(self, X: Any) -> np.ndarray:
        """Posterior means, one column per class of ``classes_``."""
        return self._posterior(X)[0]

    def predict(self, X: Any, return_std: bool = False) -> Any:
        mean, var = self._posterior(X)
        labels = self.classes_[mean.argmax(axis=1)]
        return (labels, np.sqrt(var)) if return_std else labels

    def score(self, X: Any, y: Any) -> float:
        """Accuracy of ``predict(X)``."""
        return float((self.predict(X) == np.asarray(y)).mean())
