"""Whole jobs, as the CLI and Python users start them: validate everything, then compute."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

import numpy as np

from . import backend, config, datasets
from .cluster import connect, scheduler_address
from .compute import compute_kernel
from .errors import UserError
from .kernels import Spec
from .storage import KernelStore, _utcnow, normalize_url, solve_block, writable
from .tiling import TilePlan

__all__ = ["check_run", "kernel", "predict", "run", "solve"]


def kernel(
    store: str,
    *,
    dataset: str | datasets.Dataset = "demo",
    arch: str = "fc",
    depth: int | None = None,
    activation: Any = "relu",
    weight_var: float = 1.0,
    bias_var: float = 0.0,
    kernel: str = "nngp",
    filter_size: int | None = None,
    stride: int | None = None,
    dilation: int | None = None,
    padding: str | None = None,
    skip_every: int | None = None,
    readout: str | None = None,
    tile_size: int | None = None,
    dtype: str | None = None,
    train_size: int | None = None,
    test_size: int | None = None,
    data_dir: str | None = None,
    standardize: bool = False,
    scheduler: str | None = None,
    workers: int | None = None,
    memory_limit: str | None = None,
    device: str = "auto",
    overwrite: bool = False,
    replace_test: bool = False,
    progress: bool = True,
    client: Any = None,
    dry_run: bool = False,
) -> dict:
    """Compute a network's kernel on a dataset into the store at ``store``, resuming if possible.

    ``dataset`` is a name (see :func:`nngp_dist.datasets.load`) or a
    :class:`~nngp_dist.datasets.Dataset` (:func:`~nngp_dist.datasets.from_arrays`). With
    ``replace_test``, a store of the same spec and training set but another test set keeps its
    training kernel (and factor and solution) and gets the new test set's tiles.

    Image networks (``arch`` conv or resnet32; ``filter_size``, ``stride``, ``dilation``,
    ``padding``, ``skip_every`` and ``readout`` as in :class:`~nngp_dist.kernels.Spec`, whose
    defaults apply where they are None) take the images' shape from the dataset, and without
    ``tile_size`` get one chosen by :func:`~nngp_dist.tiling.image_tile_size`. An option the
    architecture does not have (the conv options with fc, ``depth`` or the conv options with
    resnet32) is an error, not silently ignored.

    Everything is checked before the first tile is written: the data (NaN, shapes, sizes), the
    spec, the store (a store of another spec, dataset or tile size is refused unless
    ``overwrite``), and the scheduler. Returns a summary (tiles computed and skipped, seconds).
    Pass ``client`` (a ``distributed.Client``) to use it instead of connecting. ``dry_run``
    stops after the checks (nothing is written, no cluster is contacted).

    Examples
    --------
    >>> kernel("demo.zarr", dataset="demo", depth=3, weight_var=1.45, bias_var=0.28,
    ...        train_size=500, test_size=100)  # doctest: +SKIP
    {'tiles_total': 2, 'tiles_computed': 2, 'tiles_skipped': 0, 'seconds': 0.41}
    """
    conv_options = {"filter_size": filter_size, "stride": stride, "dilation": dilation,
                    "padding": padding, "skip_every": skip_every, "readout": readout}  # fmt: skip
    given = {k: v for k, v in conv_options.items() if v is not None}
    _check_applicable(arch, depth, given)
    try:
        spec = Spec(
            arch=arch,
            activation=activation,
            weight_var=weight_var,
            bias_var=bias_var,
            kernel=kernel,
            **({"depth": depth} if depth is not None else {}),
            **given,
        )
    except ValueError as e:
        raise UserError(str(e)) from None
    if tile_size is not None or not spec.is_image:
        tile_size = _integer("tile-size", config.get("tile-size", tile_size))
        if tile_size < 1:
            raise UserError(f"--tile-size must be positive, got {tile_size}")
    dtype = str(config.get("dtype", dtype))
    if dtype not in ("float64", "float32"):
        raise UserError(f"--dtype must be float64 or float32, got {dtype!r}")
    if not isinstance(dataset, datasets.Dataset):
        dataset = datasets.load(
            dataset,
            data_dir=data_dir,
            train_size=train_size,
            test_size=test_size,
            standardize=standardize,
        )
    data = dataset.flattened()
    try:
        spec = spec.with_image_shape(dataset.x_train.shape[1:])
    except ValueError as e:
        raise UserError(f"{dataset.name}: {e}") from None
    _probe(spec, data, dtype)  # before the tile size: it reports a bad geometry clearly
    if tile_size is None:
        from .tiling import image_tile_size  # noqa: PLC0415

        gpu = device == "gpu" or (device == "auto" and backend.cupy_available())
        tile_size = image_tile_size(spec, gpu=gpu)
    local = client is None and scheduler_address(scheduler) is None  # the workers are ours
    if device == "gpu" and local and not dry_run and not backend.cupy_available():
        raise UserError(
            "--device gpu: CuPy with a GPU is not available here (pip install '.[gpu]')"
        )
    store = normalize_url(store)
    meta = KernelStore.identity(spec, data, tile_size, dtype)
    action = KernelStore.check(store, meta, overwrite=overwrite, replace_test=replace_test)
    plan = TilePlan(len(data.x_train), len(data.x_test), tile_size)
    if dry_run:
        return {"store": str(store), "action": action, "tiles_total": plan.total()}

    def run(c: Any) -> dict:
        if c is not None and progress:
            print(f"dashboard: {c.dashboard_link}", file=sys.stderr)
        if action == "create":
            ks = KernelStore.create(store, meta, data, plan)
        else:
            ks = KernelStore.open(store, "r+")
            if action == "replace-test":
                ks.replace_test(data)
        return {
            "store": str(store),
            "action": action,
            **compute_kernel(ks, client=c, device=device, progress=progress, spec=spec),
        }

    return _with_client(run, client, scheduler, workers, memory_limit, allow_synchronous=True)


def _with_client(
    fn: Any,
    client: Any,
    scheduler: str | None,
    workers: int | None,
    memory_limit: str | None,
    allow_synchronous: bool = False,
) -> Any:
    if client is not None:
        return fn(client)
    if scheduler == "synchronous":
        if allow_synchronous:
            return fn(None)
        scheduler = None  # the solver stages need a task graph: use an embedded cluster
    with connect(scheduler, workers=workers, memory_limit=memory_limit) as c:
        return fn(c)


def solve(
    store: str,
    *,
    noise: float | None = None,
    max_noise: float | None = None,
    method: str = "cholesky",
    tol: float = 1e-8,
    maxiter: int = 1000,
    preconditioner: str = "nystrom",
    validation_size: int = 0,
    select_by: str | None = None,
    scheduler: str | None = None,
    workers: int | None = None,
    memory_limit: str | None = None,
    progress: bool = True,
    client: Any = None,
) -> dict:
    """Solve for ``alpha = (K + s I)^-1 T``; return the solve record (also kept in the store).

    ``noise`` may be a list (or a comma-separated string) of values: each is then evaluated by
    one in-memory Cholesky factorisation (:mod:`nngp_dist.select`), on a validation split of
    the last ``validation_size`` training examples or by the marginal likelihood, ``select_by``
    (default: validation accuracy when there is a split and labels, else ``lml``), and the
    solve uses the chosen one on all the training examples.

    ``noise`` is relative to the mean training diagonal (default ``nngp-dist.noise``).
    ``method="cholesky"`` factors K + s I into the store (on a non-positive pivot it restarts
    with 10x the noise, up to ``max_noise``) and gives the log marginal likelihood.
    ``method="cg"`` runs preconditioned conjugate gradients (``preconditioner``: nystrom,
    block-jacobi or none) to relative residual
    ``tol`` (at most ``maxiter`` iterations) with no factor; it gives no log-determinant, so no
    marginal likelihood, and warns if it stops unconverged.
    """
    from .predict import solve_alpha, targets  # noqa: PLC0415
    from .solvers.cholesky import NotPositiveDefinite, factorize  # noqa: PLC0415

    grid, max_noise = _check_solve_options(noise, max_noise, method, tol, maxiter, preconditioner)
    noise = grid[0]
    ks = KernelStore.open(store, "r+")
    st = ks.status()
    missing = st["tiles_total"] - st["tiles_done"]
    if missing:
        raise UserError(
            f"the kernel in {store} is incomplete: {missing} of {st['tiles_total']} tiles are "
            "missing. Finish it by re-running the same 'nngp-dist kernel' command (it computes "
            "only the missing tiles), then solve."
        )
    y_train, y_test = ks.group["y_train"][...], ks.group["y_test"][...]
    if y_train.dtype.kind == "f" and not np.isfinite(y_train).all():
        raise UserError(f"{store}: y_train has NaN or infinite targets")
    if y_train.dtype.kind == "i" and min(y_train.min(), y_test.min()) < 0:
        raise UserError(f"{store}: class labels must be 0, 1, 2, ...; found negative labels")
    n_classes = int(max(y_train.max(), y_test.max()) + 1) if y_train.dtype.kind in "iu" else None
    t_train = targets(y_train, n_classes)
    by = select_by or ("accuracy" if validation_size and n_classes else "lml")
    if len(grid) > 1 or validation_size:
        from .select import check_options  # noqa: PLC0415

        check_options(ks.meta["n_train"], validation_size, by, n_classes is not None)

    def go(c: Any) -> dict:
        nonlocal noise
        start = time.perf_counter()
        ks.record_stage("solve", started=_utcnow(), finished=None)
        # Forget the previous solution first: a solve that fails or is killed from here on
        # leaves a store that says it is unsolved, never one that reports old results.
        ks.prepare_solve(t_train)
        selection = None
        if len(grid) > 1 or validation_size:
            from .select import noise_grid  # noqa: PLC0415

            selection = noise_grid(ks, c, grid, validation_size=validation_size, select_by=by)
            noise = selection["chosen"]
        if method == "cg":
            return _solve_cg(ks, c, noise, t_train, tol, maxiter, preconditioner, start, selection)
        try:
            factor = factorize(ks, client=c, noise=noise, max_noise=max_noise, progress=progress)
        except NotPositiveDefinite as e:
            raise UserError(str(e)) from None
        solution = solve_alpha(ks, client=c)
        record = {
            "method": method,
            "noise": factor["noise_rel"],
            "noise_abs": factor["noise"],
            "noise_requested": noise,
            "attempts": factor["attempts"],
            "log_marginal_likelihood": solution["log_marginal_likelihood"],
            "output_scale": solution["output_scale"],
            "selection": selection,
            "seconds": round(time.perf_counter() - start, 3),
        }
        ks.update_meta(solve=record)
        ks.record_stage("solve", finished=_utcnow(), seconds=record["seconds"])
        return record

    return _with_client(go, client, scheduler, workers, memory_limit)


def _solve_cg(ks: KernelStore, c: Any, noise: float, t_train: np.ndarray, tol: float,
              maxiter: int, preconditioner: str, start: float,
              selection: dict | None) -> dict:  # fmt: skip
    import warnings  # noqa: PLC0415

    from .predict import output_scale  # noqa: PLC0415
    from .solvers import cg  # noqa: PLC0415

    mean_diag = float(np.mean(ks.group["k_train_diag"][...]))
    s = noise * mean_diag
    for name in ("chol", "chol_work0", "chol_work1", "tiles/chol", "tiles/chol_step"):
        if name in ks.group:  # a factor of an earlier Cholesky solve no longer applies
            del ks.group[name]
    ks.update_meta(factor=None)
    system = cg.StoreSystem(ks, c, s, precond=preconditioner)
    alpha, log = system.solve(t_train, tol=tol, maxiter=maxiter)
    ks.group["alpha"][...] = alpha
    if not log["converged"]:
        warnings.warn(
            f"CG stopped unconverged after {log['iterations']} iterations: relative residual "
            f"{log['true_residual']:.3g} > tol {tol:g}. Raise --maxiter or --noise, or use "
            "--method cholesky.",
            UserWarning,
            stacklevel=2,
        )
    record = {
        "method": "cg",
        "noise": noise,
        "noise_abs": s,
        "noise_requested": noise,
        "log_marginal_likelihood": None,
        "output_scale": output_scale(t_train, alpha),
        "cg": {**log, "maxiter": maxiter},
        "selection": selection,
        "seconds": round(time.perf_counter() - start, 3),
    }
    ks.update_meta(solve=record, factor=None)
    ks.record_stage("solve", finished=_utcnow(), seconds=record["seconds"])
    return record


def predict(
    store: str,
    *,
    json_path: str | None = None,
    bins: int = 10,
    score: bool = True,
    scheduler: str | None = None,
    workers: int | None = None,
    memory_limit: str | None = None,
    progress: bool = True,
    client: Any = None,
) -> dict:
    """Posterior means and variances of the test points, metrics; optionally a JSON report.

    The report has ``accuracy`` (classification), ``mse``, ``log_marginal_likelihood``,
    ``output_scale`` (the prior's scale fitted by maximum likelihood), ``calibration`` (test
    points binned by predictive variance, ``output_scale * (variance + noise_abs)``),
    ``noise``, ``n_train``, ``n_test``, ``variance_clamped`` and ``seconds`` per stage. With
    ``score=False`` (test points without labels) the three scores against the test labels are
    left out.
    """
    from .predict import metrics, predict_block_size, predict_test, predict_test_cg  # noqa: PLC0415

    _check_predict_options(bins, json_path)
    ks = KernelStore.open(store, "r+")
    if ks.status()["stage"] not in ("solved", "predict", "done"):
        raise UserError(f"{store} has no solution yet; run 'nngp-dist solve --store {store}' first")
    solved = ks.meta["solve"]
    by_cg = solved["method"] == "cg"

    def go(c: Any) -> dict:
        block = predict_block_size(ks.meta["n_train"], solve_block(ks.meta), ks.meta["n_test"],
                                   _worker_memory(c))  # fmt: skip
        ks.prepare_predict(min(block, 256) if by_cg else block)
        start = time.perf_counter()
        ks.record_stage("predict", started=_utcnow(), finished=None)
        if by_cg:
            cg_log = solved["cg"]
            out = predict_test_cg(ks, client=c, tol=cg_log["tol"], maxiter=cg_log["maxiter"],
                                  progress=progress)  # fmt: skip
            clamped, unconverged = out["variance_clamped"], out["blocks_unconverged"]
            if unconverged:
                import warnings  # noqa: PLC0415

                warnings.warn(
                    f"CG did not converge for the variances of {unconverged} test block(s); "
                    "raise --maxiter or --noise, or use --method cholesky",
                    UserWarning,
                    stacklevel=2,
                )
        else:
            clamped = predict_test(ks, client=c, progress=progress)["variance_clamped"]
            unconverged = 0
        meta = ks.meta
        report = {
            **(metrics(ks, bins=bins) if score else {}),
            "log_marginal_likelihood": meta["solve"]["log_marginal_likelihood"],
            "output_scale": meta["solve"].get("output_scale"),
            "noise": meta["solve"]["noise"],
            "noise_abs": meta["solve"]["noise_abs"],
            "n_train": meta["n_train"],
            "n_test": meta["n_test"],
            "variance_clamped": clamped,
            "variance_blocks_unconverged": unconverged,
            "selection": meta["solve"].get("selection"),
        }
        seconds = round(time.perf_counter() - start, 3)
        ks.record_stage("predict", finished=_utcnow(), seconds=seconds)
        stages = ks.meta["stages"]
        report["seconds"] = {
            k: stages.get(k, {}).get("seconds") for k in ("kernel", "solve", "predict")
        }
        ks.update_meta(predict=report)
        if json_path:
            with open(json_path, "w") as f:
                json.dump(report, f, indent=2)
        return report

    return _with_client(go, client, scheduler, workers, memory_limit)


def run(
    store: str,
    *,
    noise: float | None = None,
    max_noise: float | None = None,
    method: str = "cholesky",
    tol: float = 1e-8,
    maxiter: int = 1000,
    preconditioner: str = "nystrom",
    validation_size: int = 0,
    select_by: str | None = None,
    json_path: str | None = None,
    bins: int = 10,
    scheduler: str | None = None,
    workers: int | None = None,
    memory_limit: str | None = None,
    progress: bool = True,
    client: Any = None,
    **kernel_options: Any,
) -> dict:
    """Kernel, solve and predict in one go on one cluster; returns the predict report."""
    # Every option is checked before the kernel is computed, not after.
    _check_solve_options(noise, max_noise, method, tol, maxiter, preconditioner)
    _check_predict_options(bins, json_path)

    def go(c: Any) -> dict:
        kernel(store, client=c, progress=progress, **kernel_options)
        solve(store, noise=noise, max_noise=max_noise, method=method, tol=tol, maxiter=maxiter,
              preconditioner=preconditioner, validation_size=validation_size,
              select_by=select_by, client=c, progress=progress)  # fmt: skip
        return predict(store, json_path=json_path, bins=bins, client=c, progress=progress)

    if scheduler == "synchronous":
        scheduler = None
    return _with_client(go, client, scheduler, workers, memory_limit)


def _check_applicable(arch: str, depth: int | None, conv_options: dict) -> None:
    """Refuse options the architecture does not have, naming them as the CLI spells them."""
    unused = [] if arch == "conv" else list(conv_options)
    if arch == "resnet32" and depth is not None:
        unused.insert(0, "depth")
    if unused:
        flags = ", ".join("--" + name.replace("_", "-") for name in unused)
        fixed = "has a fixed layout" if arch == "resnet32" else "has no conv layers"
        raise UserError(f"{flags} {'does' if len(unused) == 1 else 'do'} not apply to "
                        f"--arch {arch}, which {fixed}: drop {'it' if len(unused) == 1 else 'them'}"
                        " (or use --arch conv)")  # fmt: skip


def check_run(store: str, *, noise: float | None = None, max_noise: float | None = None,
              method: str = "cholesky", tol: float = 1e-8, maxiter: int = 1000,
              preconditioner: str = "nystrom", validation_size: int = 0,
              select_by: str | None = None, json_path: str | None = None, bins: int = 10,
              **kernel_options: Any) -> dict:  # fmt: skip
    """Every check ``run`` makes before it computes anything, and nothing else."""
    _check_solve_options(noise, max_noise, method, tol, maxiter, preconditioner)
    _check_predict_options(bins, json_path)
    return kernel(store, dry_run=True, **kernel_options)


def _check_solve_options(noise: Any, max_noise: Any, method: str, tol: float, maxiter: int,
                         preconditioner: str) -> tuple[list[float], float]:  # fmt: skip
    from .solvers.cg import PRECONDITIONERS  # noqa: PLC0415

    grid = _noise_list(config.get("noise", noise))
    max_noise = _positive("--max-noise", config.get("max-noise", max_noise))
    if max_noise < max(grid):
        raise UserError(f"--max-noise {max_noise:g} is below --noise {max(grid):g}")
    if method not in ("cholesky", "cg"):
        raise UserError(f"unknown --method {method!r}; choose cholesky or cg")
    _positive("--tol", tol)
    if int(maxiter) < 1:
        raise UserError(f"--maxiter must be at least 1, got {maxiter}")
    if preconditioner not in PRECONDITIONERS:
        raise UserError(
            f"unknown --preconditioner {preconditioner!r}; choose {', '.join(PRECONDITIONERS)}"
        )
    return grid, max_noise


def _worker_memory(c: Any) -> tuple[int, int]:
    """(number of workers, smallest memory limit in bytes; 0 when unlimited)."""
    info = c.scheduler_info()["workers"].values()
    limits = [int(w.get("memory_limit") or 0) for w in info]
    return len(limits), min(limits, default=0)


def _check_predict_options(bins: int, json_path: str | None) -> None:
    if int(bins) < 1:
        raise UserError(f"--bins must be at least 1, got {bins}")
    if json_path:
        folder = os.path.dirname(os.path.abspath(json_path))
        if not os.path.isdir(folder) or not writable(folder):
            raise UserError(f"--json {json_path}: {folder} is not a writable directory")


def _noise_list(value: Any) -> list[float]:
    if isinstance(value, str):
        parts = [p for p in value.split(",") if p.strip()]
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        parts = [value]
    if not parts:
        raise UserError("--noise needs at least one value")
    return [_positive("--noise", p) for p in parts]


def _probe(spec: Spec, data: Any, dtype: str) -> None:
    """Evaluate the kernel on a few inputs before anything is written, so that a bad activation
    (one that does not take arrays) or overflowing inputs fail here, not inside a tile."""
    try:
        Spec.from_dict(spec.to_dict())
    except ValueError as e:
        raise UserError(
            f"the activation {spec.activation.name!r} cannot be recorded in the store and "
            f"rebuilt by the workers ({e}); give a Python function as 'module:function' "
            "naming an importable module-level function"
        ) from None
    x = np.concatenate([data.x_train[:3], data.x_test[:2]])
    try:
        k = spec.cross(x, x)
        d = spec.diag(x)
    except Exception as e:  # the user's function, whatever it raises
        raise UserError(f"the kernel cannot be evaluated: {type(e).__name__}: {e}") from None
    with np.errstate(over="ignore"):  # overflow in the cast is what is being checked
        finite = np.isfinite(k.astype(dtype)).all() and np.isfinite(d.astype(dtype)).all()
    if not finite:
        raise UserError(
            f"the kernel of the first inputs is not finite in {dtype} (overflow?): check the "
            "inputs' scale, --weight-var, --bias-var, --depth and --dtype"
        )


def _integer(key: str, value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise UserError(f"{key} must be an integer, got {value!r}") from None


def _positive(name: str, value: Any) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be a number, got {value!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise UserError(f"{name} must be positive and finite, got {value!r}")
    return v
