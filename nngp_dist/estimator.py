"""scikit-learn estimators on the same engine: ``NNGPRegressor`` and ``NNGPClassifier``.

``fit(X, y)`` computes the training kernel in tiles into a kernel store and factors it (or runs
CG), exactly as ``nngp-dist kernel`` + ``solve`` would; ``predict(X)`` puts ``X`` into the store
as its test set (the training kernel, factor and weights are kept; only the test tiles are
computed) and reads back the posterior means and variances. The store is a temporary directory
owned by the fitted estimator unless ``store`` names one: then it stays (``nngp-dist status``
and ``open_store`` read it), a refit on the same data resumes it, and a store of other data is
refused, never overwritten.

With scikit-learn installed (the ``sklearn`` extra) the estimators are scikit-learn estimators
(``BaseEstimator`` with ``RegressorMixin`` / ``ClassifierMixin``: tags, ``clone``, input
validation, ``Pipeline``, ``GridSearchCV``, ``check_estimator``); without it they keep the same
parameters, ``get_params``/``set_params``, ``fit``/``predict``/``score``.

Where the tiles run: ``client`` if given, else the ``scheduler`` or the embedded cluster of
``workers`` if either is given, else ``distributed``'s default client (the latest ``Client``
created) if there is one, else the scheduler of dask's config or an embedded cluster for the
call. Copies (``clone``, ``pickle``, ``copy``) never carry the client: a copy uses the default
client again. A pickled fitted model carries its training data and solve settings, not its
temporary store: the copy recomputes the kernel and factor into a temporary store of its own at
its first prediction (checking that it finds the same solution); a model fitted on a named
``store`` reads that store if it still holds the model's solution.

Examples
--------
>>> from nngp_dist import datasets
>>> ds = datasets.load("demo", train_size=200, test_size=50)
>>> clf = NNGPClassifier(depth=2, weight_var=1.6, bias_var=0.2, noise=1e-2, workers=1)
>>> clf.fit(ds.x_train, ds.y_train).score(ds.x_test, ds.y_test) > 0.6  # doctest: +SKIP
True
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np

from . import datasets, jobs
from .errors import StoreMismatch, UserError
from .layout import MEAN, VARIANCE
from .lock import store_lock
from .storage import KernelStore

__all__ = ["NNGPClassifier", "NNGPRegressor", "NotFittedError"]

_DATASET = "arrays"

try:  # scikit-learn is optional: the `sklearn` extra
    from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
    from sklearn.exceptions import NotFittedError as _SklearnNotFitted
    from sklearn.utils.multiclass import check_classification_targets
    from sklearn.utils.validation import validate_data

    SKLEARN = True
except ImportError:
    SKLEARN = False


class NotFittedError(UserError, _SklearnNotFitted if SKLEARN else AttributeError):  # type: ignore[misc]
    """``predict`` before ``fit``: a :class:`UserError` and (with scikit-learn) its
    ``NotFittedError`` (a ``ValueError`` and an ``AttributeError``)."""


if not SKLEARN:

    class BaseEstimator:  # type: ignore[no-redef]
        """scikit-learn's parameter protocol, for when scikit-learn is not installed."""

        @classmethod
        def _get_param_names(cls) -> list[str]:
            sig = inspect.signature(cls.__init__)
            return sorted(p for p in sig.parameters if p != "self")

        def get_params(self, deep: bool = True) -> dict:
            return {name: getattr(self, name) for name in self._get_param_names()}

        def set_params(self, **params: Any) -> Any:
            names = self._get_param_names()
            for name, value in params.items():
                if name not in names:
                    raise ValueError(
                        f"Invalid parameter {name!r} for estimator {type(self).__name__}. "
                        f"Valid parameters are: {names!r}."
                    )
                setattr(self, name, value)
            return self

        def __repr__(self) -> str:
            defaults = type(self)().get_params()
            changed = {k: v for k, v in self.get_params().items() if v != defaults[k]}
            args = ", ".join(f"{k}={v!r}" for k, v in changed.items())
            return f"{type(self).__name__}({args})"

        def __getstate__(self) -> dict:
            return self.__dict__.copy()

    class ClassifierMixin:  # type: ignore[no-redef]
        def score(self, X: Any, y: Any, sample_weight: Any = None) -> float:
            """Accuracy of ``predict(X)`` (weighted by ``sample_weight``)."""
            hit = (self.predict(X) == np.asarray(y)).astype(np.float64)
            return float(np.average(hit, weights=sample_weight))

    class RegressorMixin:  # type: ignore[no-redef]
        def score(self, X: Any, y: Any, sample_weight: Any = None) -> float:
            """R^2 of ``predict(X)``, averaged over the outputs (as scikit-learn's)."""
            y = np.asarray(y, dtype=np.float64).reshape(len(y), -1)
            pred = np.asarray(self.predict(X)).reshape(y.shape)
            w = np.ones(len(y)) if sample_weight is None else np.asarray(sample_weight, float)
            res = (w[:, None] * (y - pred) ** 2).sum(0)
            tot = (w[:, None] * (y - np.average(y, axis=0, weights=w)) ** 2).sum(0)
            r2 = np.where(tot > 0, 1 - res / np.where(tot > 0, tot, 1), np.where(res > 0, 0, 1))
            return float(r2.mean())


class _TempStore:
    """A temporary directory for a fitted estimator's store, removed with its last owner."""

    def __init__(self) -> None:
        folder = tempfile.mkdtemp(prefix="nngp-estimator-")
        self.url = os.path.join(folder, "kernel.zarr")
        self._remove = weakref.finalize(self, shutil.rmtree, folder, ignore_errors=True)

    def __reduce__(self) -> Any:
        raise TypeError("a temporary store belongs to its estimator and is never pickled")


def _default_client() -> Any:
    from distributed import default_client

    try:
        return default_client()
    except ValueError:  # no client has been started
        return None


class _NNGP(BaseEstimator):
    """The engine shared by both estimators (see their docstrings)."""

    def __init__(
        self,
        *,
        arch: str = "fc",
        depth: int = 3,
        weight_var: float = 1.0,
        bias_var: float = 0.0,
        activation: Any = "relu",
        kernel: str = "nngp",
        filter_size: int = 3,
        stride: int = 1,
        dilation: int = 1,
        padding: str = "same",
        skip_every: int = 0,
        readout: str = "flatten",
        noise: float = 1e-6,
        max_noise: float | None = None,
        method: str = "cholesky",
        tile_size: int | None = None,
        dtype: str | None = None,
        store: str | None = None,
        client: Any = None,
        scheduler: str | None = None,
        workers: int | None = None,
        memory_limit: str | None = None,
        progress: bool = False,
    ) -> None:
        for name, value in locals().items():
            if name != "self":
                setattr(self, name, value)

    # --- copies: the client is shared by clones and never pickled --------------------------------

    def __sklearn_clone__(self) -> Any:
        from sklearn.base import clone

        params = self.get_params(deep=False)
        return type(self)(
            **{k: v if k == "client" else clone(v, safe=False) for k, v in params.items()}
        )

    def __getstate__(self) -> dict:
        state = dict(super().__getstate__())
        state["client"] = None  # a connection, not a parameter: the copy uses the default client
        if state.pop("_tmp", None) is not None:
            state["store_"] = None  # the copy computes a temporary store of its own when used
        return state

    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "solve_")

    # --- input validation ---------------------------------------------------------------------

    def _validate(self, X: Any, y: Any = None, *, fitting: bool = False) -> tuple:
        """(X as an array of its examples' shape, y or None); the examples' shape is kept for
        image networks, and flattened for scikit-learn's checks of ``n_features_in_``."""
        if isinstance(X, (list, tuple)):
            X = np.asarray(X)
        example = None
        if isinstance(X, np.ndarray) and X.ndim > 2:  # images
            example = X.shape[1:]
            X = X.reshape(len(X), -1)
        if SKLEARN:
            if not fitting:
                X = validate_data(self, X, reset=False, dtype="numeric")
            else:
                X, y = validate_data(self, X, y, dtype="numeric", **self._y_checks())
        else:
            X = self._check_array(X, fitting)
            if fitting:
                y = self._check_y(y, len(X))
        if X.dtype.kind not in "ubf":  # signed integers are numbers; unsigned ones images
            X = X.astype(np.float64)
        return X.reshape((len(X),) + (example or X.shape[1:])), y

    def _check_array(self, X: Any, fitting: bool) -> np.ndarray:
        """scikit-learn's checks of X, where scikit-learn is not installed."""
        if X is None or getattr(X, "format", None) is not None:
            raise UserError(f"X must be a dense array, got {type(X).__name__}")
        X = np.asarray(X)
        if X.dtype.kind == "O":
            X = X.astype(np.float64)
        if X.dtype.kind not in "biuf":
            raise UserError(f"X must be numeric, got dtype {X.dtype}")
        if X.ndim != 2:
            raise UserError(f"Expected 2D array, got an array of shape {X.shape} instead")
        if len(X) == 0 or X.shape[1] == 0:
            raise UserError(f"Found array with shape {X.shape}; at least one sample and feature")
        if X.dtype.kind == "f" and not np.isfinite(X).all():
            raise UserError("Input X contains NaN or infinity.")
        if not fitting and X.shape[1] != self.n_features_in_:
            raise UserError(
                f"X has {X.shape[1]} features, but {type(self).__name__} is expecting "
                f"{self.n_features_in_} features as input."
            )
        return X

    def _check_y(self, y: Any, n: int) -> np.ndarray:
        if y is None:
            raise UserError(f"{type(self).__name__} requires y to be passed, but y is None")
        y = np.asarray(y)
        if len(y) != n:
            raise UserError(
                f"Found input variables with inconsistent numbers of samples: [{n}, {len(y)}]"
            )
        if y.dtype.kind == "f" and not np.isfinite(y).all():
            raise UserError("Input y contains NaN or infinity.")
        return y

    def _y_checks(self) -> dict:
        return {}

    # --- fitting and predicting ---------------------------------------------------------------

    def _targets(self, y: Any) -> tuple[np.ndarray, dict]:
        """(the targets the store is given, fitted attributes that go with them)."""
        raise NotImplementedError

    def fit(self, X: Any, y: Any) -> Any:
        """Compute the training kernel into the store and solve for the GP weights."""
        X, y = self._validate(X, y, fitting=True)
        y_fit, attributes = self._targets(y)
        # A store needs a test set; the first training example stands in until predict().
        data = datasets.from_arrays(_DATASET, X, y_fit, X[:1], y_fit[:1])
        tmp = _TempStore() if self.store is None else None
        url = tmp.url if tmp is not None else self.store
        # kernel and solve as one writer (no other job between them), refused before a cluster
        with store_lock(url, "fit"), self._client() as c:
            self._kernel(url, data, c, tile_size=self.tile_size, dtype=self.dtype)
            solved = jobs.solve(
                url,
                noise=self.noise,
                max_noise=self.max_noise,
                method=self.method,
                progress=self.progress,
                client=c,
            )
        meta = KernelStore.open(url).meta
        # Fitted: only now is the previous fit's state (and temporary store) replaced.
        self.__dict__.pop("_tmp", None)
        if tmp is not None:
            self._tmp = tmp
        self._tiles = {"tile_size": meta["tile_size"], "dtype": meta["dtype"]}
        self.store_ = url
        self.solve_ = solved
        self.noise_ = solved["noise"]
        self.output_scale_ = solved["output_scale"]
        self.X_train_, self.y_train_ = data.x_train, data.y_train
        self.image_shape_ = X.shape[1:]
        self.n_features_in_ = math.prod(X.shape[1:])
        for name, value in attributes.items():
            setattr(self, name, value)
        return self

    def _arch(self) -> dict:
        names = ["arch", "weight_var", "bias_var", "activation", "kernel"]
        if self.arch != "resnet32":
            names.append("depth")
        if self.arch == "conv":  # the options of the architectures that have them
            names += ["filter_size", "stride", "dilation", "padding", "skip_every", "readout"]
        return {name: getattr(self, name) for name in names}

    @contextlib.contextmanager
    def _client(self) -> Iterator[Any]:
        """The client for one fit or predict call (one embedded cluster for all its jobs)."""
        if self.client is not None:
            yield self.client
            return
        if self.scheduler is None and self.workers is None and self.memory_limit is None:
            default = _default_client()
            if default is not None:
                yield default
                return
        from .cluster import connect

        scheduler = None if self.scheduler == "synchronous" else self.scheduler
        with connect(scheduler, workers=self.workers, memory_limit=self.memory_limit) as c:
            yield c

    def _kernel(self, url: str, data: datasets.Dataset, c: Any, **tiles: Any) -> None:
        try:
            jobs.kernel(
                url,
                dataset=data,
                replace_test=True,
                progress=self.progress,
                client=c,
                **tiles,
                **self._arch(),
            )
        except StoreMismatch as e:
            raise UserError(
                f"store={url!r} holds the kernel of a different run:\n"
                + "\n".join(e.differences)
                + "\nNothing was changed. Pass another store (or none, for a temporary one); "
                "an estimator never overwrites a store."
            ) from None

    def _holds_solution(self, url: str) -> bool:
        """Whether the store (its kernel just completed by jobs.kernel) has this model's
        solution: a solve records itself only once finished, and forgets it when it starts."""
        record = KernelStore.open(url).meta.get("solve") or {}
        keys = ("method", "noise", "noise_abs", "output_scale")
        return all(record.get(k) == self.solve_.get(k) for k in keys)

    def _resolve(self, url: str, c: Any) -> None:
        """Solve the store again at the fitted noise (a copy's new store, or a named store
        deleted or re-solved since the fit), and check that the solution is the fitted one."""
        solved = jobs.solve(
            url,
            noise=self.noise_,
            max_noise=self.noise_,
            method=self.method,
            progress=self.progress,
            client=c,
        )
        if not math.isclose(solved["output_scale"], self.output_scale_, rel_tol=1e-6):
            raise UserError(
                f"the kernel recomputed in {url} does not give this model's solution (output "
                f"scale {solved['output_scale']:.6g}, fitted {self.output_scale_:.6g}); was it "
                "fitted with another version or configuration? Fit it again."
            )

    def _posterior(self, X: Any) -> tuple[np.ndarray, np.ndarray]:
        """Posterior means (N x C) and the targets' predictive standard deviations (N)."""
        if not self.__sklearn_is_fitted__():
            raise NotFittedError(
                f"This {type(self).__name__} instance is not fitted yet; call fit(X, y) first."
            )
        X, _ = self._validate(X)
        if X.shape[1:] != self.image_shape_:
            raise UserError(
                f"X has examples of shape {X.shape[1:]}; this model was fitted on "
                f"{self.image_shape_}"
            )
        placeholder = np.zeros((len(X),) + self.y_train_.shape[1:], dtype=self.y_train_.dtype)
        data = datasets.from_arrays(_DATASET, self.X_train_, self.y_train_, X, placeholder)
        with self._client() as c:
            if self.store_ is None:  # an unpickled copy of a model fitted on a temporary store
                self._tmp = _TempStore()
                self.store_ = self._tmp.url
            with store_lock(self.store_, "predict"):  # the test set and its predictions together
                self._kernel(self.store_, data, c, **self._tiles)
                if not self._holds_solution(self.store_):
                    self._resolve(self.store_, c)
                # No leave-one-out points (the std is the GP's), and a named store keeps its own.
                jobs.predict(
                    self.store_, score=False, loo_size=None, progress=self.progress, client=c
                )
                ks = KernelStore.open(self.store_)
                mean, var = ks.read(MEAN), ks.read(VARIANCE)
        # The targets' predictive variance: the prior's scale fitted by maximum likelihood
        # times the latent variance plus the noise (as nngp_dist.predict.predictive_variance).
        std = np.sqrt(self.output_scale_ * (var + self.solve_["noise_abs"]))
        return mean, std


class NNGPRegressor(RegressorMixin, _NNGP):
    """Exact Gaussian-process regression with an infinitely wide network's kernel.

    Parameters: the architecture (``arch``, ``depth``, ``weight_var``, ``bias_var``,
    ``activation``, ``kernel`` = ``"nngp"`` or ``"ntk"``; for ``arch="conv"`` also
    ``filter_size``, ``stride``, ``dilation``, ``padding``, ``skip_every``, ``readout``: see
    :class:`~nngp_dist.kernels.Spec`; image networks take ``X`` as (n, H, W[, C])); the solve
    (``noise`` relative to the mean training diagonal, ``max_noise``, ``method`` =
    ``"cholesky"`` or ``"cg"``); the tiles (``tile_size``, ``dtype``); and where to compute
    (``store``; ``client``, or ``scheduler``, or an embedded cluster of ``workers`` with
    ``memory_limit`` each; with none of these, distributed's default client if there is one).
    Unsigned-integer inputs are images scaled to [0, 1], as datasets are; other numbers are
    used as given.

    Targets (1-D, or 2-D for several outputs) are modelled as noisy observations of the GP,
    ``T ~ N(0, s2 (K + s I))`` column by column, with ``s`` the absolute noise and ``s2`` the
    prior's scale fitted by maximum likelihood (``output_scale_``; it leaves the mean
    unchanged). ``predict(X, return_std=True)`` returns the standard deviation of the predictive
    distribution of the targets at ``X``, ``sqrt(s2 (var + s))`` with ``var`` the latent
    posterior variance under the unit-scale prior (one value per example for all outputs).

    Fitted attributes: ``store_``, ``solve_`` (the solve record), ``noise_`` (the relative noise
    used, raised from ``noise`` if the factorisation needed it), ``output_scale_``,
    ``X_train_``, ``y_train_``, ``n_features_in_``, ``image_shape_``.
    """

    def _y_checks(self) -> dict:
        return {"multi_output": True, "y_numeric": True}

    def _targets(self, y: Any) -> tuple[np.ndarray, dict]:
        y = np.asarray(y, dtype=np.float64)
        if y.ndim not in (1, 2):
            raise UserError(f"y must be 1-D or 2-D, got shape {y.shape}")
        return y, {}

    def fit(self, X: Any, y: Any) -> NNGPRegressor:
        """Compute the training kernel into the store and solve for the GP weights."""
        return super().fit(X, y)

    def predict(self, X: Any, return_std: bool = False) -> Any:
        """Posterior mean at ``X`` (and the targets' predictive standard deviation)."""
        mean, std = self._posterior(X)
        if self.y_train_.ndim == 1:
            mean = mean[:, 0]
        return (mean, std) if return_std else mean

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags


class NNGPClassifier(ClassifierMixin, _NNGP):
    """Classification by GP regression on one-hot targets (0.9 for the class, -0.1 elsewhere),
    as Lee et al. (2018) do: ``predict`` is the class of the largest posterior mean;
    ``decision_function`` gives the means per class (for two classes, as scikit-learn's
    convention, one column: the second class's mean minus the first's);
    ``predict(X, return_std=True)`` also the targets' predictive standard deviation (the same
    for every class; see :class:`NNGPRegressor`). Parameters and fitted attributes as
    :class:`NNGPRegressor`'s, and ``classes_``."""

    def _check_y(self, y: Any, n: int) -> np.ndarray:
        y = np.asarray(y) if y is not None else y
        if y is not None and y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        y = super()._check_y(y, n)
        if y.ndim != 1:
            raise UserError(f"y must be 1-D class labels, got shape {y.shape}")
        if y.dtype.kind == "f" and (y != np.round(y)).any():
            raise UserError("Unknown label type: continuous. Give class labels to a classifier.")
        return y

    def _targets(self, y: Any) -> tuple[np.ndarray, dict]:
        if SKLEARN:
            check_classification_targets(y)
        classes, codes = np.unique(y, return_inverse=True)
        return codes.astype(np.int64), {"classes_": classes}

    def fit(self, X: Any, y: Any) -> NNGPClassifier:
        """Compute the training kernel into the store and solve for the GP weights."""
        return super().fit(X, y)

    def decision_function(self, X: Any) -> np.ndarray:
        """Posterior means, one column per class of ``classes_`` (one for two classes)."""
        mean = self._posterior(X)[0]
        return mean[:, 1] - mean[:, 0] if len(self.classes_) == 2 else mean

    def predict(self, X: Any, return_std: bool = False) -> Any:
        """The classes of the largest posterior means (and the predictive standard deviation)."""
        mean, std = self._posterior(X)
        labels = self.classes_[mean.argmax(axis=1)]
        return (labels, std) if return_std else labels
