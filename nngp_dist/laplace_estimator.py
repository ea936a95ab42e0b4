"""Estimators for trained PyTorch networks: ``LaplaceGPRegressor`` and ``LaplaceGPClassifier``.

``fit(X, y)`` exports the network (``torch.export``, a ``.pt2`` archive next to the store: no
pickled code) and computes its kernel and Laplace-GP posterior into a kernel store, exactly as
``nngp-dist run --arch trained --likelihood ...`` would (:mod:`nngp_dist.laplace`);
``predict(X)`` puts ``X`` into the store as its test set (the training kernels and factors are
kept; only the test tiles are computed) and reads back the posterior. The store is a temporary
directory unless ``store`` names one. Parameters are stored as given and fitted attributes end
in ``_`` (scikit-learn's conventions, without depending on it).

Examples
--------
>>> clf = LaplaceGPClassifier(net, prior_precision=1.0, workers=1)  # doctest: +SKIP
>>> clf.fit(x_train, y_train).predict_proba(x_test)  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import inspect
import os
import shutil
import tempfile
import weakref
from typing import Any

import numpy as np

from . import datasets, jobs, laplace
from .errors import UserError
from .layout import MEAN, VARIANCE
from .storage import KernelStore

__all__ = ["LaplaceGPClassifier", "LaplaceGPRegressor"]

_DATASET = "arrays"


class LaplaceGPRegressor:
    """The Laplace-GP posterior of a trained network ``model`` (an ``nn.Module`` trained to
    the MAP of the Gaussian likelihood with noise standard deviation ``sigma`` and the prior
    precision ``prior_precision``, i.e. weight decay). ``input_shape``: what each row of ``X``
    is reshaped to for the network (default: ``X``'s own trailing shape). Where to compute:
    ``store``, ``tile_size``, ``client`` or ``scheduler`` or ``workers`` and ``memory_limit``.
    ``predict(X, return_std=True)`` gives the standard deviation of the network's output."""

    likelihood = "regression"

    def __init__(self, model: Any, *, prior_precision: float = 1.0, sigma: float | None = 1.0,
                 input_shape: Any = None, tile_size: int | None = None,
                 store: str | None = None, client: Any = None, scheduler: str | None = None,
                 workers: int | None = None, memory_limit: str | None = None,
                 progress: bool = False) -> None:  # fmt: skip
        for name, value in locals().items():
            if name != "self":
                setattr(self, name, value)

    def get_params(self, deep: bool = True) -> dict:
        names = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
        return {name: getattr(self, name) for name in names}

    def set_params(self, **params: Any) -> LaplaceGPRegressor:
        for name, value in params.items():
            if name not in self.get_params():
                raise ValueError(f"unknown parameter {name!r} for {type(self).__name__}")
            setattr(self, name, value)
        return self

    def _options(self) -> dict:
        run = (
            {"client": self.client}
            if self.client is not None
            else {"scheduler": self.scheduler, "workers": self.workers,
                  "memory_limit": self.memory_limit}
        )  # fmt: skip
        return {"progress": self.progress, **run}

    def _export(self, folder: str, x: np.ndarray) -> str:
        import torch

        net = copy.deepcopy(self.model).double().eval()  # the caller's model stays as it is
        example = torch.as_tensor(x[:2].reshape(-1, *self.input_shape_))
        try:
            ep = torch.export.export(
                net, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},)
            )
        except Exception as e:
            raise UserError(
                f"the model cannot be exported with torch.export ({type(e).__name__}: {e})"
            ) from None
        path = os.path.join(folder, "model.pt2")
        torch.export.save(ep, path)
        return path

    def _sigma(self) -> float | None:
        return self.sigma if self.likelihood == "regression" else None

    def fit(self, X: Any, y: Any) -> LaplaceGPRegressor:
        """Export the network, compute its kernels and Laplace-GP posterior in the store."""
        X = np.asarray(X, dtype=np.float64)
        y = np.asarray(y)
        if len(y) != len(X) or len(X) < 2:
            raise UserError(f"X has {len(X)} examples and y {len(y)}: need the same, >= 2")
        self.input_shape_ = tuple(self.input_shape or X.shape[1:])
        folder = tempfile.mkdtemp(prefix="nngp-laplace-")
        self._cleanup = weakref.finalize(self, shutil.rmtree, folder, ignore_errors=True)
        self.store_ = self.store or os.path.join(folder, "kernel.zarr")
        self.model_file_ = self._export(folder, X)
        self.X_train_, self.y_train_ = X.reshape(len(X), -1), y
        self.report_ = self._posterior(self.X_train_[:1], y[:1])
        self.log_marginal_likelihood_ = self.report_["log_marginal_likelihood"]
        return self

    def _posterior(self, x_test: np.ndarray, y_test: np.ndarray) -> dict:
        data = datasets.from_arrays(_DATASET, self.X_train_, self.y_train_, x_test, y_test)
        opts = self._options()
        jobs.kernel(self.store_, dataset=data, arch="trained", model=self.model_file_,
                    prior_precision=self.prior_precision, input_shape=self.input_shape_,
                    likelihood=self.likelihood, sigma=self._sigma(), tile_size=self.tile_size,
                    replace_test=True, **opts)  # fmt: skip
        return laplace.posterior(self.store_, likelihood=self.likelihood, sigma=self._sigma(),
                                 **opts)  # fmt: skip

    def _predict(self, X: Any) -> tuple[np.ndarray, np.ndarray]:
        if not hasattr(self, "store_"):
            raise UserError(f"this {type(self).__name__} is not fitted yet: call fit(X, y)")
        X = np.asarray(X, dtype=np.float64).reshape(len(X), -1)
        placeholder = np.zeros((len(X),) + self.y_train_.shape[1:], dtype=self.y_train_.dtype)
        self._posterior(X, placeholder)
        ks = KernelStore.open(self.store_)
        return ks.read(MEAN), ks.read(VARIANCE)

    def predict(self, X: Any, return_std: bool = False) -> Any:
        """The posterior mean of the network's output at ``X`` (and its standard deviation)."""
        mean, var = self._predict(X)
        if self.y_train_.ndim == 1:
            mean, var = mean[:, 0], var[:, 0]
        return (mean, np.sqrt(var)) if return_std else mean

    def score(self, X: Any, y: Any) -> float:
        """R^2 of the posterior mean."""
        y = np.asarray(y, dtype=np.float64)
        pred = self.predict(X).reshape(y.shape)
        return float(1 - ((y - pred) ** 2).sum() / ((y - y.mean(0)) ** 2).sum())


class LaplaceGPClassifier(LaplaceGPRegressor):
    """The Laplace-GP posterior of a trained softmax classifier (``nn.Module`` with one output
    per class, trained with cross-entropy and weight decay ``prior_precision``), one GP per
    class; class probabilities by the probit approximation. Parameters as
    :class:`LaplaceGPRegressor` (``sigma`` is not used)."""

    likelihood = "classification"

    def predict_proba(self, X: Any) -> np.ndarray:
        """Probit class probabilities, (n, C)."""
        from .likelihoods import probit

        return probit(*self._predict(X))

    def predict(self, X: Any, return_std: bool = False) -> Any:
        """The most probable class."""
        return self.predict_proba(X).argmax(axis=1)

    def score(self, X: Any, y: Any) -> float:
        """Accuracy."""
        return float((self.predict(X) == np.asarray(y)).mean())
