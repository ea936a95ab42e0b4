"""Whole jobs, as the CLI and Python users start them: validate everything, then compute."""

from __future__ import annotations

import functools
import json
import sys
import time
import warnings
from typing import Any

import numpy as np

from . import backend, config, datasets, laplace
from ._version import __version__
from .cluster import (
    check_job,
    check_solve,
    check_workers,
    scheduler_address,
    with_client,
    worker_memory,
)
from .compute import compute_kernel, probe
from .errors import UserError
from .kernels import Spec
from .layout import ALPHA, KERNEL_ARRAYS, Y_TEST, Y_TRAIN
from .lock import check_free, store_lock
from .options import ClusterOptions, PredictOptions, SolveOptions, take
from .predict import metrics, output_scale, predict_loo, predict_test, solve_alpha, targets
from .select import best_by_lml, check_options, in_memory, noise_grid
from .solvers import cg
from .solvers.cholesky import NotPositiveDefinite, factorize
from .storage import KernelStore, normalize_url, utcnow
from .tiling import TilePlan, image_tile_size

__all__ = ["check_run", "kernel", "predict", "run", "solve", "status"]


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
    model: str | None = None,
    weights: str | None = None,
    prior_precision: float | None = None,
    output: Any = None,
    input_shape: Any = None,
    trust_code: bool = False,
    likelihood: str | None = None,
    sigma: float | None = None,
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
    force: bool = False,
) -> dict:
    """Compute a network's kernel on a dataset into the store at ``store``, resuming if possible.

    ``dataset`` is a name (:func:`nngp_dist.datasets.load`) or a ``Dataset``. With
    ``replace_test``, a store of the same spec and training set but another test set keeps its
    training kernel (and factor and solution) and gets the new test set's tiles. Image nets
    (``arch`` conv or resnet32) take the images' shape from the dataset and, without
    ``tile_size``, a tile from ``image_tile_size``; an option the architecture lacks is an
    error. ``arch="trained"``: a trained network (a factory imported only with ``trust_code``);
    ``likelihood`` and ``sigma`` are checked against it (the tiles then left to the posterior).

    All is checked before the first tile is written: data, spec, store (one of another spec,
    dataset or tile size refused unless ``overwrite``; one another job writes, always), the
    scheduler, worker memory, tiles under 16 and free disk (unless ``force``). Returns tiles
    computed and skipped, seconds. ``client``: a Client to use; ``dry_run``: only check.

    Examples
    --------
    >>> kernel("k.zarr", dataset="demo", depth=3, train_size=500, test_size=100)  # doctest: +SKIP
    {'tiles_total': 2, 'tiles_computed': 2, 'tiles_skipped': 0, 'seconds': 0.41}
    """
    conv = {k: v for k, v in locals().items() if k in CONV_OPTIONS + TRAINED_OPTIONS}
    config.checked()
    spec = _spec(arch, depth, activation, weight_var, bias_var, kernel, conv, trust_code)
    dataset = datasets.as_dataset(dataset, data_dir, train_size, test_size, standardize)
    spec, data, tile_size, dtype = _resolve(spec, dataset, tile_size, dtype, device, force)
    laplace.check_inputs(spec, data, likelihood, sigma)
    if device == "gpu" and not dry_run and client is None and not scheduler_address(scheduler):
        _need_gpu()  # the embedded cluster's workers are this machine's
    store = normalize_url(store)
    meta = KernelStore.identity(spec, data, tile_size, dtype)
    action = KernelStore.check(store, meta, overwrite=overwrite, replace_test=replace_test)
    plan = TilePlan(len(data.x_train), len(data.x_test), tile_size)
    check_job(store, action, plan, data.x_train.shape[1], dtype, memory_limit, force=force)
    if dry_run:
        return {"store": str(store), "action": action, "tiles_total": plan.total()}
    with store_lock(store, "kernel"):  # one writer per store; _fill decides again under it
        how, fill = {"overwrite": overwrite, "replace_test": replace_test}, likelihood is None
        job = functools.partial(_fill, store, how, meta, data, plan, spec, device, progress, fill)
        return with_client(job, client, scheduler, workers, memory_limit, allow_synchronous=True)


def _fill(
    store: str,
    how: dict,
    meta: dict,
    data: datasets.Dataset,
    plan: TilePlan,
    spec: Spec,
    device: str,
    progress: bool,
    tiles: bool,
    c: Any,
) -> dict:
    """Create, resume or replace the test set of the store as :meth:`KernelStore.check` decides
    with the options ``how`` (under the store's lock), then compute its missing tiles with client
    ``c`` (None: in this process). Without ``tiles`` (a Laplace-GP job) they are left to
    :func:`nngp_dist.laplace.posterior`, which computes them with the per-output kernels."""
    action = KernelStore.check(store, meta, **how)
    if c is not None:
        check_workers(c, plan.tile_size, data.x_train.shape[1])
    if c is not None and progress:
        print(f"dashboard: {c.dashboard_link}", file=sys.stderr)
    if action == "create":
        ks = KernelStore.create(store, meta, data, plan)
    else:
        ks = KernelStore.open(store, "r+")
        if action == "replace-test":
            ks.replace_test(data)
    if not tiles:
        left = len(ks.plan.missing({a: ks.done(a) for a in KERNEL_ARRAYS}))
        summary = {"tiles_total": ks.plan.total(), "tiles_left": left, "seconds": 0.0}
        return {"store": str(store), "action": action, **summary}
    summary = compute_kernel(ks, client=c, device=device, progress=progress, spec=spec)
    return {"store": str(store), "action": action, **summary}


def _need_gpu() -> None:
    if not backend.cupy_available():
        raise UserError(
            "--device gpu: CuPy with a GPU is not available here (pip install '.[gpu]')"
        )


def _resolve(
    spec: Spec,
    dataset: datasets.Dataset,
    tile_size: int | None,
    dtype: str | None,
    device: str,
    force: bool = False,
) -> tuple[Spec, datasets.Dataset, int, str]:
    """The spec with the images' shape, the flattened data, the tile size and the dtype, all
    checked (the kernel is probed on a few inputs before the tile size is chosen, so that a
    bad geometry is reported clearly)."""
    if tile_size is not None or not spec.is_image:
        sizes = (len(dataset.x_train), len(dataset.x_test))
        tile_size = config.tile_size(tile_size, force=force, sizes=sizes)
    dtype = config.value("dtype", dtype)
    data = dataset.flattened()
    try:
        spec = spec.with_image_shape(dataset.x_train.shape[1:])
    except ValueError as e:
        raise UserError(f"{dataset.name}: {e}") from None
    probe(spec, data, dtype)
    if tile_size is None:
        gpu = device == "gpu" or (device == "auto" and backend.cupy_available())
        tile_size = image_tile_size(spec, gpu=gpu)
    return spec, data, tile_size, dtype


# Which of the architecture options each architecture has; the others are refused, not ignored.
CONV_OPTIONS = ("filter_size", "stride", "dilation", "padding", "skip_every", "readout")
TRAINED_OPTIONS = ("model", "weights", "prior_precision", "output", "input_shape")
ARCH_OPTIONS = {
    "fc": ("depth",),
    "conv": ("depth", *CONV_OPTIONS),
    "resnet32": (),
    "trained": TRAINED_OPTIONS,
}


def _spec(
    arch: str,
    depth: int | None,
    activation: Any,
    weight_var: float,
    bias_var: float,
    kernel: str,
    conv: dict,
    trust: bool = False,
) -> Spec:
    """The architecture from the kernel options, refusing options ``arch`` does not have."""
    given = {k: v for k, v in {"depth": depth, **conv}.items() if v is not None}
    unused = [k for k in given if k not in ARCH_OPTIONS.get(arch, given)]
    if unused:
        flags = ", ".join("--" + name.replace("_", "-") for name in unused)
        fixed = {"resnet32": "has a fixed layout", "trained": "is a trained network"}.get(
            arch, "has no conv layers"
        )
        one = len(unused) == 1
        other = "trained" if set(unused) & set(TRAINED_OPTIONS) else "conv"
        raise UserError(
            f"{flags} {'does' if one else 'do'} not apply to --arch {arch}, which "
            f"{fixed}: drop {'it' if one else 'them'} (or use --arch {other})"
        )
    try:
        return Spec(
            arch=arch,
            activation=activation,
            weight_var=weight_var,
            bias_var=bias_var,
            kernel=kernel,
            **given,
            trust=trust,
        )
    except ValueError as e:
        raise UserError(str(e)) from None


def solve(store: str, *, progress: bool = True, reuse: bool = False, **options: Any) -> dict:
    """Solve for ``alpha = (K + s I)^-1 T``; return the solve record (also kept in the store).

    ``noise`` may be a list (or a comma-separated string) of values: each is then evaluated by
    one in-memory Cholesky factorisation (:mod:`nngp_dist.select`), on a validation split of
    the last ``validation_size`` training examples or by the marginal likelihood, ``select_by``
    (default: validation accuracy when there is a split and labels, else ``lml``: the
    likelihood at each noise's fitted output scale), and the solve uses the chosen one on all
    the training examples. Above :data:`~nngp_dist.select.MAX_GRID_N` training points only
    ``lml`` is offered, each noise one out-of-core factorisation (a killed grid resumes).

    ``noise`` is relative to the mean training diagonal (default ``nngp-dist.noise``).
    ``method="cholesky"`` factors K + s I into the store (on a non-positive pivot it restarts
    with 10x the noise, up to ``max_noise``) and gives the log marginal likelihood.
    ``method="cg"`` runs preconditioned conjugate gradients (``preconditioner``: nystrom,
    block-jacobi or none) to relative residual
    ``tol`` (at most ``maxiter`` iterations) with no factor; it gives no log-determinant, so no
    marginal likelihood, and warns if it stops unconverged.

    The record returned also says what it is about: ``store``, ``spec``, ``version``.
    ``options`` are those of :class:`~nngp_dist.options.SolveOptions` (``noise``,
    ``max_noise``, ``method``, ``tol``, ``maxiter``, ``preconditioner``, ``validation_size``,
    ``select_by``) and of :class:`~nngp_dist.options.ClusterOptions` (``client``,
    ``scheduler``, ``workers``, ``memory_limit``). With ``reuse`` (as ``run`` does), a store
    whose last solve completed with the same options keeps it, and its predictions.
    """
    config.checked()
    cluster = take(options, ClusterOptions)
    opts = SolveOptions.checked(**options)
    KernelStore.open(store)  # a clear error if there is no store, before the lock
    with store_lock(store, "solve"):
        ks = KernelStore.open(store, "r+")
        if reuse and _solved_with(ks, opts):  # kept: this call computed nothing
            return {**ks.meta["solve"], **_about(ks), "reused": True}
        return _solve(ks, opts, progress, cluster)


def _solve_options(opts: SolveOptions) -> dict:
    """The options a solve record depends on (CG's only for CG), as JSON keeps them."""
    fields = {
        "method": opts.method,
        "noise": list(opts.noise),
        "max_noise": opts.max_noise,
        "validation_size": opts.validation_size,
        "select_by": opts.select_by,
    }
    if opts.method == "cg":
        fields.update(tol=opts.tol, maxiter=opts.maxiter, preconditioner=opts.preconditioner)
    return fields


def _solved_with(ks: KernelStore, opts: SolveOptions) -> bool:
    """Whether the store holds a completed solve of these options (its record is written
    last, and removed when a solve starts, so a record means a complete solution)."""
    record = ks.meta.get("solve")
    finished = ks.meta.get("stages", {}).get("solve", {}).get("finished")
    return bool(record and finished and record.get("options") == _solve_options(opts))


def _solve(ks: KernelStore, opts: SolveOptions, progress: bool, cluster: dict) -> dict:
    t_train, by = _solve_inputs(ks, opts)
    check_solve(ks, opts.method, cluster.get("memory_limit"))

    def go(c: Any) -> dict:
        start = time.perf_counter()
        ks.record_stage("solve", started=utcnow(), finished=None)
        # Forget the previous solution first: a solve that fails or is killed from here on
        # leaves a store that says it is unsolved, never one that reports old results.
        ks.prepare_solve(t_train)
        selection, chosen = None, opts.noise[0]
        if opts.selects and not in_memory(ks.meta["n_train"]):
            record, selection = _factored_grid(ks, c, t_train, opts, progress)
        else:
            if opts.selects:
                selection = noise_grid(
                    ks, c, list(opts.noise), validation_size=opts.validation_size, select_by=by
                )
                chosen = selection["chosen"]
            record = _SOLVERS[opts.method](ks, c, chosen, t_train, opts, progress)
        ks.update_meta(noise_grid=None)
        record.update(
            selection=selection,
            seconds=round(time.perf_counter() - start, 3),
            options=_solve_options(opts),
        )
        ks.update_meta(solve=record)
        ks.record_stage("solve", finished=utcnow(), seconds=record["seconds"])
        return {**record, **_about(ks)}

    return with_client(go, **cluster)


# What a factored grid's row keeps of each noise's solve record.
_GRID_KEYS = (
    "noise_abs",
    "log_marginal_likelihood",
    "log_marginal_likelihood_scaled",
    "output_scale",
)


def _factored_grid(
    ks: KernelStore, c: Any, t_train: np.ndarray, opts: SolveOptions, progress: bool
) -> tuple[dict, dict]:
    """An ``lml`` noise grid above the in-memory size: each noise one out-of-core Cholesky
    factorisation of all the training points, chosen by the marginal likelihood at its fitted
    output scale; the chosen noise is factored again unless it was the last one. Each finished
    row is kept in the store's ``noise_grid`` attribute, so a killed grid resumes at the noise
    it was factoring (and that factorisation where it stopped)."""
    options = _solve_options(opts)
    kept = ks.meta.get("noise_grid") or {}
    rows = list(kept.get("rows", [])) if kept.get("options") == options else []
    record: dict = {}
    for noise in opts.noise[len(rows) :]:
        record = _solve_cholesky(ks, c, noise, t_train, opts, progress)
        row = {"noise": noise, "noise_used": record["noise"], "result": "ok"}
        rows.append({**row, **{k: record[k] for k in _GRID_KEYS}})
        ks.update_meta(noise_grid={"options": options, "rows": rows})
    best = best_by_lml(rows)
    if best is not rows[-1] or not record:
        record = _solve_cholesky(ks, c, best["noise"], t_train, opts, progress)
    selection = {"grid": rows, "chosen": best["noise"], "select_by": "lml", "validation_size": 0}
    return record, selection


def _about(ks: KernelStore) -> dict:
    """What a report is about: the store's URL, its network's spec, this package's version."""
    return {"store": ks.url, "spec": ks.meta["spec"], "version": __version__}


def _solve_inputs(ks: KernelStore, opts: SolveOptions) -> tuple[np.ndarray, str]:
    """The training targets and the noise criterion, after checking that the store can be
    solved: its kernel complete, its labels usable, the grid's options valid."""
    st = ks.status()
    missing = st["tiles_total"] - st["tiles_done"]
    if missing:
        raise UserError(
            f"the kernel in {ks.url} is incomplete: {missing} of {st['tiles_total']} tiles are "
            "missing. Finish it by re-running the same 'nngp-dist kernel' command (it computes "
            "only the missing tiles), then solve."
        )
    y_train, y_test = ks.read(Y_TRAIN), ks.read(Y_TEST)
    if y_train.dtype.kind == "f" and not np.isfinite(y_train).all():
        raise UserError(f"{ks.url}: y_train has NaN or infinite targets")
    if y_train.dtype.kind == "i" and min(y_train.min(), y_test.min()) < 0:
        raise UserError(f"{ks.url}: class labels must be 0, 1, 2, ...; found negative labels")
    n_classes = int(max(y_train.max(), y_test.max()) + 1) if y_train.dtype.kind in "iu" else None
    by = opts.select_by or ("accuracy" if opts.validation_size and n_classes else "lml")
    if opts.selects:
        n, labels = ks.meta["n_train"], n_classes is not None
        check_options(n, opts.validation_size, by, labels, opts.method)
    return targets(y_train, n_classes), by


def _solve_cholesky(
    ks: KernelStore, c: Any, noise: float, t_train: np.ndarray, opts: SolveOptions, progress: bool
) -> dict:
    """Factor ``K + s I`` into the store, then alpha from the factor."""
    try:
        factor = factorize(ks, client=c, noise=noise, max_noise=opts.max_noise, progress=progress)
    except NotPositiveDefinite as e:
        raise UserError(str(e)) from None
    solution = solve_alpha(ks, client=c)
    record = {
        "method": "cholesky",
        "noise": factor["noise_rel"],
        "noise_abs": factor["noise"],
        "noise_requested": noise,
        "attempts": factor["attempts"],
        "log_marginal_likelihood": solution["log_marginal_likelihood"],
        "log_marginal_likelihood_scaled": solution["log_marginal_likelihood_scaled"],
        "output_scale": solution["output_scale"],
    }
    if factor["noise_rel"] != noise:
        record["warnings"] = [_escalated(ks, noise, factor)]
    return record


def _escalated(ks: KernelStore, requested: float, factor: dict) -> str:
    """Say on stderr that the noise was escalated, and why that may be; the text, for the
    solve record and the report."""
    text = (
        f"the kernel plus the noise {requested:g} is not positive definite, so the noise was "
        f"escalated to {factor['noise_rel']:g} (relative; {factor['noise']:.3g} absolute) and "
        "every result is for that noise. Likely causes: a corrupt kernel tile (check the store "
        f"with 'nngp-dist verify --store {ks.url}'), or a noise too small for this kernel "
        "(raise --noise; --max-noise caps the escalation)."
    )
    print(f"warning: {text}", file=sys.stderr, flush=True)
    return text


def _solve_cg(
    ks: KernelStore, c: Any, noise: float, t_train: np.ndarray, opts: SolveOptions, progress: bool
) -> dict:
    """Preconditioned CG on the stored kernel; no factor (an earlier one no longer applies)."""
    jitter = noise * ks.mean_diag()
    ks.drop_factor()
    ks.update_meta(factor=None)
    system = cg.StoreSystem(ks, c, jitter, precond=opts.preconditioner)
    alpha, log = system.solve(t_train, tol=opts.tol, maxiter=opts.maxiter)
    ks.array(ALPHA)[...] = alpha
    if not log["converged"]:
        warnings.warn(
            f"CG stopped unconverged after {log['iterations']} iterations: relative residual "
            f"{log['true_residual']:.3g} > tol {opts.tol:g}. Raise --maxiter or --noise, or use "
            "--method cholesky.",
            UserWarning,
            stacklevel=2,
        )
    return {
        "method": "cg",
        "noise": noise,
        "noise_abs": jitter,
        "noise_requested": noise,
        "log_marginal_likelihood": None,
        "output_scale": output_scale(t_train, alpha),
        "cg": {**log, "maxiter": opts.maxiter},
    }


_SOLVERS = {"cholesky": _solve_cholesky, "cg": _solve_cg}


def predict(
    store: str,
    *,
    score: bool = True,
    progress: bool = True,
    ran: dict | None = None,
    **options: Any,
) -> dict:
    """Posterior means and variances of the test points, metrics; optionally a JSON report.

    The report has ``accuracy`` (classification), ``mse``, ``log_marginal_likelihood`` (at
    the prior's scale 1), ``log_marginal_likelihood_scaled`` (at the fitted scale),
    ``output_scale`` (the prior's scale fitted by maximum likelihood), ``calibration`` (test
    points binned by predictive variance, ``output_scale * (variance + noise_abs)``),
    ``noise``, ``n_train``, ``n_test``, ``variance_clamped``, ``seconds`` (per stage this
    command ran: ``predict``, and the seconds ``ran`` gives for the stages before it, as
    :func:`run` passes them; a stage that found nothing to do took 0 s), ``stage_seconds`` (the
    store's records: the last time each stage did work), and what the report is about:
    ``store`` (its URL), ``spec`` (the network) and ``version`` (of nngp_dist). With
    leave-one-out predictions (``loo_size`` training points,
    :func:`~nngp_dist.predict.predict_loo`): ``calibration_recalibrated`` (the same bins, the
    variances through the map fitted on them) and ``loo`` (their size, accuracy, MSE and
    calibration), both None without them; and always ``loo_size``, ``loo_skipped`` and
    ``loo_blocks_unconverged``. With ``score=False`` (test points without labels) the scores
    against the test labels (accuracy, MSE, calibration, ``calibration_recalibrated``,
    ``loo``) are left out. ``options`` are those of
    :class:`~nngp_dist.options.PredictOptions` (``json_path``, ``bins``, ``loo_size``) and
    :class:`~nngp_dist.options.ClusterOptions`.
    """
    config.checked()
    cluster = take(options, ClusterOptions)
    opts = PredictOptions.checked(**options)
    KernelStore.open(store)  # a clear error if there is no store, before the lock
    with store_lock(store, "predict"):
        return _predict(KernelStore.open(store, "r+"), opts, score, progress, cluster, ran)


def _predict(
    ks: KernelStore,
    opts: PredictOptions,
    score: bool,
    progress: bool,
    cluster: dict,
    ran: dict | None,
) -> dict:
    store = ks.url
    if ks.status()["stage"] not in ("solved", "predict", "done"):
        raise UserError(f"{store} has no solution yet; run 'nngp-dist solve --store {store}' first")

    def go(c: Any) -> dict:
        start = time.perf_counter()
        ks.record_stage("predict", started=utcnow(), finished=None)
        workers = worker_memory(c)
        out = {
            **predict_test(ks, client=c, progress=progress, workers=workers),
            **predict_loo(ks, client=c, size=opts.loo_size, progress=progress, workers=workers),
        }
        for key, what in (
            ("variance_blocks_unconverged", "the variances of"),
            ("loo_blocks_unconverged", "the leave-one-out predictions of"),
        ):
            if out[key]:
                warnings.warn(
                    f"CG did not converge for {what} {out[key]} block(s); raise --maxiter or "
                    "--noise, or use --method cholesky",
                    UserWarning,
                    stacklevel=2,
                )
        solved = ks.meta["solve"]
        report = {
            **(metrics(ks, bins=opts.bins) if score else {}),
            "log_marginal_likelihood": solved["log_marginal_likelihood"],
            "log_marginal_likelihood_scaled": solved.get("log_marginal_likelihood_scaled"),
            "output_scale": solved.get("output_scale"),
            "noise": solved["noise"],
            "noise_abs": solved["noise_abs"],
            "n_train": ks.meta["n_train"],
            "n_test": ks.meta["n_test"],
            "variance_clamped": out["variance_clamped"],
            "variance_blocks_unconverged": out["variance_blocks_unconverged"],
            "loo_size": out["loo_size"],
            "loo_skipped": out["loo_skipped"],
            "loo_blocks_unconverged": out["loo_blocks_unconverged"],
            "selection": solved.get("selection"),
            "warnings": list(solved.get("warnings", [])),
        }
        seconds = round(time.perf_counter() - start, 3)
        ks.record_stage("predict", finished=utcnow(), seconds=seconds)
        stages = ks.meta["stages"]
        report["seconds"] = {"kernel": None, "solve": None, **(ran or {}), "predict": seconds}
        report["stage_seconds"] = {
            k: stages.get(k, {}).get("seconds") for k in ("kernel", "solve", "predict")
        }
        report.update(_about(ks))
        ks.update_meta(predict=report)
        if opts.json_path:
            with open(opts.json_path, "w") as f:
                json.dump(report, f, indent=2)
        return report

    return with_client(go, **cluster)


def run(store: str, *, progress: bool = True, **options: Any) -> dict:
    """Kernel, solve and predict in one go on one cluster; returns the predict report. With
    ``likelihood`` (a trained network), the Laplace-GP posterior of :mod:`nngp_dist.laplace`
    instead of the solve and predict stages (whose noise options do not apply to it).

    ``options`` are those of :func:`kernel`, :func:`solve` and :func:`predict`; every one is
    checked before the kernel is computed, not after. A store already solved with the same
    solve options keeps its solution and its finished prediction blocks (a run stopped in the
    predict stage resumes there). The store's lock is held from the first check to the report.
    """
    cluster = take(options, ClusterOptions)
    solve_kw, predict_kw, kernel_kw = _split(options)
    SolveOptions.checked(**solve_kw)
    PredictOptions.checked(**predict_kw)
    if cluster.get("scheduler") == "synchronous":
        cluster["scheduler"] = None
    post = {k: kernel_kw.get(k) for k in ("likelihood", "sigma", "trust_code")}
    post["samples"] = kernel_kw.pop("samples", None)

    def go(c: Any) -> dict:
        summary = kernel(store, client=c, progress=progress, **kernel_kw)
        if post["likelihood"] is not None:  # a trained network's Laplace-GP posterior
            return laplace.posterior(
                store, client=c, progress=progress, json_path=predict_kw.get("json_path"), **post
            )
        solved = solve(store, client=c, progress=progress, reuse=True, **solve_kw)
        ran = {
            "kernel": summary["seconds"],
            "solve": 0.0 if solved.get("reused") else solved["seconds"],
        }
        return predict(store, client=c, progress=progress, ran=ran, **predict_kw)

    KernelStore.check_location(store)  # a store path that can never be one: before the lock
    with store_lock(store, "run"):
        return with_client(go, **cluster)


def check_run(store: str, **options: Any) -> dict:
    """Every check ``run`` makes before it computes anything, and nothing else."""
    solve_kw, predict_kw, kernel_kw = _split(options)
    SolveOptions.checked(**solve_kw)
    PredictOptions.checked(**predict_kw)
    checked = kernel(store, dry_run=True, **kernel_kw)
    check_free(store)  # a store another job writes
    return checked


def _split(options: dict) -> tuple[dict, dict, dict]:
    """``options`` split into the solve stage's, the predict stage's and the kernel's."""
    return take(options, SolveOptions), take(options, PredictOptions), options


def status(store: str) -> dict:
    """A store's progress: tiles done and total, stage, spec, timings (see
    :meth:`KernelStore.status`). Reads only."""
    return KernelStore.open(store).status()
