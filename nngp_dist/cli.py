"""The ``nngp-dist`` command line: parse options, call one function, print. No logic here."""

from __future__ import annotations

import errno
import functools
import json
import os
import sys
from collections.abc import Callable
from typing import Any

import click

from ._version import __version__
from .errors import CorruptStore, UserError
from .layout import LOO_SIZE

ACTIVATION_HELP = (
    "relu, leaky_relu:ALPHA, erf, tanh, gelu, linear, or module:function for any elementwise "
    "Python function (by quadrature)"
)


def _user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Print user errors and failed jobs without a traceback; exit 2 and 1 respectively."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from .compute import JobError

        try:
            _use_tls({k: kwargs.pop(k) for k in TLS_OPTIONS if k in kwargs})
            return fn(*args, **kwargs)
        except UserError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except (JobError, CorruptStore) as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted: finished tiles are kept; re-run to resume", err=True)
            sys.exit(130)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            click.echo(f"error: {_disk_full(e)}", err=True)
            sys.exit(1)

    return wrapper


def _disk_full(e: OSError) -> str:
    where = f" writing {e.filename}" if e.filename else ""
    return (
        f"the disk is full ({e.strerror or e}){where}. Free some space and re-run the same "
        "command: the tiles written so far are kept and it resumes where it stopped"
    )


TLS_OPTIONS = {
    "tls_ca_file": "distributed.comm.tls.ca-file",
    "tls_cert": "distributed.comm.tls.client.cert",
    "tls_key": "distributed.comm.tls.client.key",
}


def _use_tls(given: dict) -> None:
    """TLS for every connection this process makes (and a detached job's driver): dask's own
    configuration, which ``distributed.Client`` reads (it may also come from dask's YAML)."""
    chosen = {k: v for k, v in given.items() if v}
    if not chosen:
        return
    if len(chosen) != len(TLS_OPTIONS):
        raise UserError("TLS needs all three of --tls-ca-file, --tls-cert and --tls-key")
    import dask.config

    settings = {TLS_OPTIONS[k]: v for k, v in chosen.items()}
    dask.config.set({**settings, "distributed.comm.require-encryption": True})


def _options(*decorators: Callable[..., Any]) -> Callable[..., Any]:
    def apply(fn: Callable[..., Any]) -> Callable[..., Any]:
        for d in reversed(decorators):
            fn = d(fn)
        return fn

    return apply


# The sections of a command's --help, in this order; options not put in one are listed last.
DATASET, ARCHITECTURE, SOLVER, OUTPUT, CLUSTER = (
    "Dataset options",
    "Architecture options",
    "Solver options",
    "Output options",
    "Cluster options",
)
SECTIONS = (DATASET, ARCHITECTURE, SOLVER, OUTPUT, CLUSTER)


def _section(title: str, *decorators: Callable[..., Any]) -> Callable[..., Any]:
    """Apply option ``decorators``, listing the options they add under ``title`` in --help."""

    def apply(fn: Callable[..., Any]) -> Callable[..., Any]:
        before = len(getattr(fn, "__click_params__", []))
        fn = _options(*decorators)(fn)
        for param in fn.__click_params__[before:]:
            param.help_section = title  # type: ignore[attr-defined]
        return fn

    return apply


class SectionedCommand(click.Command):
    """A command whose --help lists its options in sections (dataset, architecture, solver,
    output, cluster) instead of one list of forty; click has no option groups of its own."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        sections: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is not None:
                title = getattr(param, "help_section", None) or "Other options"
                sections.setdefault(title, []).append(record)
        if list(sections) == ["Other options"]:
            sections = {"Options": sections["Other options"]}
        order = {title: i for i, title in enumerate(SECTIONS)}
        for title in sorted(sections, key=lambda t: order.get(t, len(order))):
            with formatter.section(title):
                formatter.write_dl(sections[title])


class SectionedGroup(click.Group):
    """The ``nngp-dist`` group: its commands are :class:`SectionedCommand` s."""

    command_class = SectionedCommand


store_option = _section(
    OUTPUT,
    click.option(
        "--store", required=True, help="Kernel store: a directory or an fsspec URL (s3://...)."
    ),
)

tls_options = _section(
    CLUSTER,
    click.option(
        "--tls-ca-file",
        type=click.Path(exists=True, dir_okay=False),
        default=None,
        help="TLS: the CA certificate the scheduler's certificate is signed by.",
    ),
    click.option(
        "--tls-cert",
        type=click.Path(exists=True, dir_okay=False),
        default=None,
        help="TLS: this client's certificate.",
    ),
    click.option(
        "--tls-key",
        type=click.Path(exists=True, dir_okay=False),
        default=None,
        help="TLS: this client's private key.",
    ),
)


def _job_scheduler_option(help_text: str) -> Callable[..., Any]:
    """``--scheduler`` of the commands that look up a detached job (status, cancel), with
    ``$DASK_SCHEDULER_ADDRESS`` as its fallback and the TLS options."""
    return _options(
        _section(
            CLUSTER,
            click.option(
                "--scheduler",
                default=None,
                envvar="DASK_SCHEDULER_ADDRESS",
                help=f"{help_text} [env: DASK_SCHEDULER_ADDRESS].",
            ),
        ),
        tls_options,
    )


dataset_options = _section(
    DATASET,
    click.option(
        "--dataset",
        default="demo",
        show_default=True,
        help="demo, fashion-mnist, mnist, cifar10 or npz:PATH.",
    ),
    click.option("--data-dir", default=None, help="Folder holding the dataset's files."),
    click.option("--train-size", type=int, default=None, help="Use the first N training examples."),
    click.option("--test-size", type=int, default=None, help="Use the first M test examples."),
    click.option("--standardize", is_flag=True, help="Centre and scale each image."),
)

architecture_options = _section(
    ARCHITECTURE,
    click.option(
        "--arch",
        type=click.Choice(["fc", "conv", "resnet32", "trained"]),
        default="fc",
        show_default=True,
        help="fc (dense layers), conv (conv layers on images), resnet32 (the ResNet GP of "
        "Garriga-Alonso et al.) or trained (the kernel J J^T / delta of a trained PyTorch "
        "network, --model).",
    ),
    click.option(
        "--model",
        default=None,
        help="trained: a torch.export archive (.pt2), or a factory 'module:function' "
        "returning the nn.Module (imported only with --trust-code).",
    ),
    click.option(
        "--weights",
        default=None,
        type=click.Path(exists=True, dir_okay=False),
        help="trained: a state_dict file (loaded with torch.load(weights_only=True)).",
    ),
    click.option(
        "--prior-precision",
        type=float,
        default=None,
        show_default="1",
        help="trained: the prior precision delta of the weights (kernel J J^T / delta).",
    ),
    click.option(
        "--input-shape",
        default=None,
        help="trained: the shape each input row is reshaped to, e.g. 1,28,28.",
    ),
    click.option(
        "--trust-code",
        is_flag=True,
        help="trained: allow importing the --model factory's module (it runs its code).",
    ),
    click.option(
        "--depth",
        type=int,
        default=None,
        show_default="3",
        help="Hidden (dense or conv) layers, each followed by the activation (not resnet32).",
    ),
    click.option(
        "--filter-size", type=int, default=None, show_default="3", help="conv: K x K filters."
    ),
    click.option("--stride", type=int, default=None, show_default="1", help="conv: stride."),
    click.option("--dilation", type=int, default=None, show_default="1", help="conv: dilation."),
    click.option(
        "--padding",
        type=click.Choice(["same", "valid"]),
        default=None,
        show_default="same",
        help="conv: zero padding.",
    ),
    click.option(
        "--skip-every",
        type=int,
        default=None,
        show_default="0",
        help="conv: a residual connection around every S (activation, conv) pairs (0: none).",
    ),
    click.option(
        "--readout",
        type=click.Choice(["flatten", "gap"]),
        default=None,
        show_default="flatten",
        help="conv: dense layer on the flattened features, or after global average pooling.",
    ),
    click.option("--activation", default="relu", show_default=True, help=ACTIVATION_HELP),
    click.option(
        "--weight-var",
        type=float,
        default=1.0,
        show_default=True,
        help="Weight variance w_var (weights ~ N(0, w_var / fan_in)).",
    ),
    click.option(
        "--bias-var", type=float, default=0.0, show_default=True, help="Bias variance b_var."
    ),
    click.option(
        "--kernel",
        "kernel_kind",
        type=click.Choice(["nngp", "ntk"]),
        default="nngp",
        show_default=True,
        help="Which kernel to compute.",
    ),
)

kernel_options = _options(
    store_option,
    dataset_options,
    architecture_options,
    _section(
        CLUSTER,
        click.option(
            "--device",
            type=click.Choice(["auto", "cpu", "gpu"]),
            default="auto",
            show_default=True,
            help="Where workers evaluate tiles (auto: GPU if CuPy sees one).",
        ),
    ),
    _section(
        OUTPUT,
        click.option(
            "--tile-size",
            type=int,
            default=None,
            help="Tile edge T [default: nngp-dist.tile-size, 2000; image networks on CPUs: "
            "chosen from the work per pair].",
        ),
        click.option(
            "--dtype",
            type=click.Choice(["float64", "float32"]),
            default=None,
            help="Storage dtype [default: float64]; evaluation is always float64.",
        ),
        click.option(
            "--overwrite",
            is_flag=True,
            help="Replace an existing store of another spec or dataset.",
        ),
        click.option(
            "--force",
            is_flag=True,
            help="Go on despite a --tile-size under 16 or less free disk than the store's "
            "estimate.",
        ),
    ),
)

cluster_options = _options(
    _section(
        CLUSTER,
        click.option(
            "--scheduler",
            default=None,
            envvar="DASK_SCHEDULER_ADDRESS",
            help="Address of a running Dask scheduler (or 'synchronous' to run in this "
            "process) [env: DASK_SCHEDULER_ADDRESS].",
        ),
        click.option(
            "--workers",
            type=int,
            default=None,
            help="Worker processes of the embedded cluster [default: one per core].",
        ),
        click.option(
            "--memory-limit",
            default=None,
            help="Memory limit per embedded worker, e.g. 2GB [default: shared evenly].",
        ),
    ),
    tls_options,
    _section(
        OUTPUT,
        click.option(
            "--quiet",
            is_flag=True,
            help="No progress (bars on a terminal, else one line per stage on stderr).",
        ),
    ),
)

solve_options = _section(
    SOLVER,
    click.option(
        "--noise",
        default=None,
        help="GP noise relative to the mean training diagonal [default: 1e-6]; a comma-"
        "separated grid (1e-8,1e-6,1e-4) is evaluated and the best chosen (--select-by).",
    ),
    click.option(
        "--max-noise",
        type=float,
        default=None,
        help="Cap of the 10x noise escalation on a non-positive pivot [default: 0.1].",
    ),
    click.option(
        "--method",
        type=click.Choice(["cholesky", "cg"]),
        default="cholesky",
        show_default=True,
        help="cholesky (exact factor; gives the marginal likelihood) or cg (no factor).",
    ),
    click.option(
        "--tol", type=float, default=1e-8, show_default=True, help="CG: relative residual to reach."
    ),
    click.option(
        "--preconditioner",
        type=click.Choice(["nystrom", "block-jacobi", "none"]),
        default="nystrom",
        show_default=True,
        help="CG: Nystrom (the first tile's points as landmarks), block-Jacobi, or none.",
    ),
    click.option(
        "--maxiter",
        type=int,
        default=1000,
        show_default=True,
        help="CG: iteration cap (a warning says when it stops unconverged).",
    ),
    click.option(
        "--validation-size",
        type=int,
        default=0,
        show_default=True,
        help="Hold out the last V training examples to choose the noise on.",
    ),
    click.option(
        "--select-by",
        type=click.Choice(["accuracy", "mse", "lml"]),
        default=None,
        help="Noise grid criterion [default: accuracy with a validation split, "
        "else lml: the marginal likelihood at each noise's fitted output scale].",
    ),
)


laplace_options = _section(
    SOLVER,
    click.option(
        "--likelihood",
        type=click.Choice(["regression", "classification"]),
        default=None,
        help="trained: the Laplace-GP posterior of the network under this likelihood (instead "
        "of the GP regression of the solve and predict stages).",
    ),
    click.option(
        "--sigma",
        type=float,
        default=None,
        show_default="1",
        help="--likelihood regression: the noise's standard deviation.",
    ),
    click.option(
        "--samples",
        type=click.IntRange(min=1),
        default=None,
        help="--likelihood classification: class probabilities by Monte Carlo over this many "
        "draws of the logits [default: the probit approximation].",
    ),
)


json_option = _section(
    OUTPUT,
    click.option(
        "--json",
        "json_path",
        default=None,
        type=click.Path(dir_okay=False),
        metavar="FILE",
        help="Write the report as JSON to FILE (with the store, the spec and this version).",
    ),
)

predict_options = _options(
    json_option,
    _section(
        OUTPUT,
        click.option(
            "--bins",
            type=int,
            default=10,
            show_default=True,
            help="Calibration bins (test points binned by predicted variance).",
        ),
        click.option(
            "--loo-size",
            type=int,
            default=LOO_SIZE,
            show_default=True,
            help="Training points whose leave-one-out predictions fit the variance "
            "recalibration (0: none).",
        ),
    ),
)


@click.group(cls=SectionedGroup)
@click.version_option(__version__, prog_name="nngp-dist")
def main() -> None:
    """Exact infinite-width network kernels, computed in tiles by Dask into a Zarr store."""


@main.command()
@kernel_options
@cluster_options
@_user_errors
def kernel(kernel_kind: str, quiet: bool, **options: Any) -> None:
    """Compute a network's kernel into a store (resumes a partly computed store)."""
    from . import jobs

    _input_shape(options)
    summary = jobs.kernel(kernel=kernel_kind, progress=not quiet, **options)
    click.echo(
        f"{summary['store']}: {summary['tiles_computed']} tiles computed, "
        f"{summary['tiles_skipped']} already done, {summary['tiles_total']} in all "
        f"({summary['seconds']:.1f} s)"
    )


@main.command()
@store_option
@solve_options
@json_option
@cluster_options
@_user_errors
def solve(quiet: bool, json_path: str | None, **options: Any) -> None:
    """Factor the kernel plus noise (tiled Cholesky) and solve for the GP weights alpha."""
    from . import jobs
    from .options import report_path

    report_path(json_path)
    rec = jobs.solve(progress=not quiet, **options)
    if json_path:
        _write_json(json_path, rec)
    lml = rec["log_marginal_likelihood"]
    how = (
        f"log marginal likelihood {lml:.6g}"
        if lml is not None
        else f"CG: {rec['cg']['iterations']} iterations, residual {rec['cg']['true_residual']:.2g}"
    )
    click.echo(
        f"{options['store']}: solved with noise {rec['noise']:g} (relative; "
        f"{rec['noise_abs']:.3g} absolute), {how} ({rec['seconds']:.1f} s)"
    )


@main.command()
@store_option
@predict_options
@cluster_options
@_user_errors
def predict(quiet: bool, **options: Any) -> None:
    """Posterior means and variances of the test points; accuracy, MSE, calibration."""
    from . import jobs

    r = jobs.predict(progress=not quiet, **options)
    for text in r.get("warnings", []):  # said when solving; predict alone repeats it
        click.echo(f"warning: {text}", err=True)
    _report(r)


@main.command()
@kernel_options
@laplace_options
@solve_options
@predict_options
@cluster_options
@_user_errors
def run(kernel_kind: str, quiet: bool, **options: Any) -> None:
    """kernel, solve and predict in one go (each resumes what a store already holds)."""
    from . import jobs

    _input_shape(options)
    if options.get("likelihood") is None and options.get("sigma") is not None:
        raise UserError("--sigma is the noise of --likelihood regression; give --likelihood")
    r = jobs.run(kernel=kernel_kind, progress=not quiet, **options)
    if r.get("likelihood"):
        _laplace_report(r)
    else:
        _report(r)


def _input_shape(options: dict) -> None:
    """``--input-shape 1,28,28`` as a tuple."""
    shape = options.get("input_shape")
    if shape is not None:
        try:
            options["input_shape"] = tuple(int(v) for v in shape.split(","))
        except ValueError:
            raise UserError(f"--input-shape must be sizes like 1,28,28, got {shape!r}") from None


def _laplace_report(r: dict) -> None:
    keys = ("accuracy", "nll", "ece", "mse", "map_accuracy", "map_nll", "map_ece")
    for k in keys:
        if k in r:
            click.echo(f"{k + ':':14s} {r[k]:.6g}")
    lml = r["log_marginal_likelihood"]
    click.echo(f"log marginal likelihood: {'n/a' if lml is None else f'{lml:.6g}'}")
    click.echo(
        f"{r['likelihood']}, prior precision {r['prior_precision']:g}, "
        f"{r['n_train']} train, {r['n_test']} test"
    )


@main.command()
@kernel_options
@solve_options
@predict_options
@cluster_options
@click.option(
    "--detach",
    is_flag=True,
    help="Return at once with a job id; the job runs on the cluster (--scheduler) on its own.",
)
@_user_errors
def submit(kernel_kind: str, quiet: bool, detach: bool, **options: Any) -> None:
    """run, on a cluster; with --detach the job outlives this command (see cancel, status)."""
    from . import jobs

    _input_shape(options)
    if not detach:
        _report(jobs.run(kernel=kernel_kind, progress=not quiet, **options))
        return
    from .detached import submit as submit_job

    for key in ("workers", "memory_limit"):
        if options.pop(key) is not None:
            raise UserError(
                f"--{key.replace('_', '-')} configures an embedded cluster; "
                "a detached job runs on the --scheduler's workers"
            )
    scheduler = options.pop("scheduler")
    rec = submit_job(scheduler=scheduler, kernel=kernel_kind, progress=not quiet, **options)
    click.echo(
        f"job {rec['job']} running on {rec['worker']} (driver pid {rec['pid']}); log: {rec['log']}"
    )
    click.echo(f"follow it: nngp-dist status --store {rec['store']}")
    click.echo(f"stop it:   nngp-dist cancel --store {rec['store']} --scheduler {rec['scheduler']}")


@main.command()
@store_option
@_job_scheduler_option("The scheduler the job was submitted to")
@_user_errors
def cancel(store: str, scheduler: str | None) -> None:
    """Stop a detached job; its finished tiles stay, and submitting it again resumes it."""
    from .detached import cancel as cancel_job

    rec = cancel_job(store, scheduler=scheduler)
    click.echo(f"job {rec['job']} on {rec['store']}: cancelled ({rec['outcome']})")


def _grid_lml(row: dict) -> str:
    """A noise grid row's marginal likelihood: at its fitted output scale (the criterion),
    or at scale 1 for a selection recorded before the scale was fitted per noise."""
    if "log_marginal_likelihood_scaled" in row:
        lml = row["log_marginal_likelihood_scaled"]
        text = "unbounded (every target zero)" if lml is None else f"{lml:.6g}"
        return f"lml {text} (scale {row['output_scale']:.4g})"
    return f"lml {row['log_marginal_likelihood']:.6g} (scale 1)"


def _report(r: dict) -> None:
    if "accuracy" in r:
        click.echo(f"accuracy:  {r['accuracy']:.4f}")
    click.echo(f"mse:       {r['mse']:.6g}")
    lml, scaled = r["log_marginal_likelihood"], r.get("log_marginal_likelihood_scaled")
    click.echo(
        "log marginal likelihood: "
        + (f"{lml:.6g}" if lml is not None else "n/a (CG computes no log-determinant)")
        + (f" (at the fitted output scale: {scaled:.6g})" if scaled is not None else "")
    )
    click.echo(f"noise:     {r['noise']:g} (relative), {r['n_train']} train, {r['n_test']} test")
    scale = r.get("output_scale")
    if scale is not None:
        click.echo(f"output scale: {scale:.6g} (the prior's scale, by maximum likelihood)")
    if r["variance_clamped"]:
        click.echo(f"warning: {r['variance_clamped']} negative variances clamped to zero", err=True)
    loo = r.get("loo")
    if loo:
        acc = f"accuracy {loo['accuracy']:.4f}, " if "accuracy" in loo else ""
        click.echo(f"leave-one-out: {loo['size']} training points, {acc}mse {loo['mse']:.6g}")
    elif r.get("loo_skipped"):
        click.echo(f"leave-one-out: none ({r['loo_skipped']}), so no recalibrated variances")
    what = "scale x (variance + noise)" if scale is not None else "variance"
    click.echo(f"calibration (test points binned by predictive variance, {what}):")
    recal = r.get("calibration_recalibrated") or [None] * len(r["calibration"])
    click.echo("  mean variance    recalibrated    realised mse    count")
    for b, rb in zip(r["calibration"], recal):
        again = f"{rb['mean_variance']:14.6g}" if rb else f"{'-':>14}"
        click.echo(f"  {b['mean_variance']:13.6g}  {again}  {b['mse']:14.6g}  {b['count']:7d}")
    sel = r.get("selection")
    if sel:
        click.echo(
            f"noise grid (chosen by {sel['select_by']}, validation {sel['validation_size']}):"
        )
        for row in sel["grid"]:
            mark = "*" if row["noise"] == sel["chosen"] else " "
            cells = [_grid_lml(row)] if row["result"] == "ok" else [row["result"]]
            for k in ("validation_accuracy", "validation_mse"):
                if k in row:
                    cells.append(f"{k.split('_')[1]} {row[k]:.4g}")
            click.echo(f" {mark} {row['noise']:<10g} " + ", ".join(cells))
    secs = ", ".join(f"{k} {v:.1f} s" for k, v in r["seconds"].items() if v is not None)
    click.echo(f"time:      {secs}")


@main.command()
@_section(
    OUTPUT,
    click.option("--out", required=True, help="Folder for sweep.csv, sweep.json and the heat map."),
    click.option(
        "--heatmap-depth", type=int, default=None, help="Depth of the heat map [default: the best]."
    ),
)
@_section(
    DATASET,
    click.option(
        "--dataset", default="demo", show_default=True, help="demo, fashion-mnist, mnist, ..."
    ),
    click.option("--data-dir", default=None, help="Folder holding the dataset's files."),
    click.option("--standardize", is_flag=True, help="Centre and scale each image."),
    click.option(
        "--train-size",
        type=int,
        default=None,
        help="Fit on the first N training examples [default: all but the validation split].",
    ),
    click.option(
        "--validation-size",
        type=int,
        default=None,
        help="Score on the last V training examples [default: a fifth of them, at most 10000].",
    ),
)
@_section(
    ARCHITECTURE,
    click.option(
        "--depth", "depths", default="1-5", show_default=True, help="Depths: 1-10 or 1,3,5."
    ),
    click.option(
        "--weight-var",
        "weight_vars",
        default="0.5:2.5:5",
        show_default=True,
        help="w_var values: 1,1.5,2 or START:STOP:NUM.",
    ),
    click.option(
        "--bias-var", "bias_vars", default="0:0.4:5", show_default=True, help="b_var values."
    ),
    click.option("--activation", default="relu", show_default=True, help=ACTIVATION_HELP),
    click.option("--kernel", type=click.Choice(["nngp", "ntk"]), default="nngp", show_default=True),
)
@_section(
    SOLVER,
    click.option(
        "--noise",
        "noises",
        default="1e-6,1e-4,1e-3,1e-2,1e-1",
        show_default=True,
        help="Noise values, relative to the mean diagonal.",
    ),
    click.option(
        "--select-by",
        type=click.Choice(["accuracy", "mse"]),
        default=None,
        help="Criterion [default: accuracy for labels, else mse].",
    ),
)
@cluster_options
@_user_errors
def sweep(quiet: bool, **options: Any) -> None:
    """Choose depth, w_var, b_var and noise on a validation split (one Gram matrix for all)."""
    from .sweep import sweep as run_sweep

    r = run_sweep(progress=not quiet, **options)
    b = r["best"]
    metric = "validation_accuracy" if r["select_by"] == "accuracy" else "validation_mse"
    click.echo(
        f"{r['grid_points']} grid points ({r['grid_points_computed']} computed now) x "
        f"{len(r['settings']['depths'])} depths x {len(r['settings']['noises'])} noises in "
        f"{r['seconds']:.1f} s"
    )
    click.echo(
        f"best: depth {b['depth']}, w_var {b['weight_var']:g}, b_var {b['bias_var']:g}, "
        f"noise {b['noise']:g}: {metric.replace('_', ' ')} {b[metric]:.4f}"
    )
    ts = r["task_seconds"]
    click.echo(f"worker time: kernel recursions {ts['kernel']:.1f} s, solves {ts['solve']:.1f} s")
    for k, v in r["files"].items():
        click.echo(f"{k}: {v}")


@main.command()
@store_option
@_section(
    OUTPUT,
    click.option("--out", required=True, help="Folder for the PNGs."),
    click.option("--sweep", default=None, help="A sweep.json from nngp-dist sweep (heat map)."),
    click.option(
        "--sizes",
        default=None,
        help="Training-set sizes of the learning curve "
        "[default: 1000,2000,5000,10000,20000,50000].",
    ),
    click.option(
        "--sample", type=int, default=500, show_default=True, help="Points in the kernel heat map."
    ),
    click.option("--bins", type=int, default=20, show_default=True, help="Calibration bins."),
)
@_user_errors
def figures(sizes: str | None, **options: Any) -> None:
    """PNGs of a finished store: calibration, kernel by class, learning curve, sweep heat map."""
    from .figures import figures as make
    from .options import integer

    size_list = [integer("--sizes", s) for s in sizes.split(",")] if sizes else None
    r = make(sizes=size_list, **options)
    for row in r["learning_curve"]:
        acc = (
            f"accuracy {row['accuracy']:.4f} +- {row['accuracy_se']:.4f}, "
            if "accuracy" in row
            else ""
        )
        click.echo(f"n_train {row['n_train']:>7d}: {acc}mse {row['mse']:.5g}")
    recal = r["calibration_recalibrated"]
    click.echo(
        "calibration (predicted variance, realised mse, realised / predicted"
        + (", and recalibrated: variance, ratio):" if recal else "):")
    )
    for b, rb in zip(r["calibration"], recal or [None] * len(r["calibration"])):
        again = f" {rb['mean_variance']:10.4g} {rb['ratio']:7.3f}" if rb else ""
        click.echo(f"  {b['mean_variance']:10.4g} {b['mse']:10.4g} {b['ratio']:7.3f}{again}")
    for k, v in r["files"].items():
        click.echo(f"{k}: {v}")


# What a bare ``status --json`` (the old flag, without FILE) stands for.
_BARE_JSON = "\0bare"


@main.command()
@store_option
@_section(
    OUTPUT,
    click.option(
        "--json",
        "json_path",
        is_flag=False,
        flag_value=_BARE_JSON,
        default=None,
        metavar="FILE",
        help="Write the status as JSON to FILE ('-': to standard output, instead of the text).",
    ),
)
@_job_scheduler_option(
    "Also show the detached job on this store (submit --detach) known to this scheduler"
)
@_user_errors
def status(store: str, json_path: str | None, scheduler: str | None) -> None:
    """Show a store's progress: tiles done and total, stage, spec, timings."""
    from . import jobs
    from .options import report_path

    if json_path == _BARE_JSON:
        click.echo(
            "warning: a bare 'status --json' is deprecated: use 'status --json FILE' as run and "
            "predict do, or 'status --json -' for standard output",
            err=True,
        )
        json_path = "-"
    if json_path != "-":
        report_path(json_path)
    st = jobs.status(store)
    if scheduler:
        st["job"] = _job(store, scheduler)
    if json_path == "-":
        click.echo(json.dumps(st, indent=2))
        return
    if json_path:
        _write_json(json_path, st)
    _show_status(st)


def _job(store: str, scheduler: str) -> dict | None:
    """The detached job on ``store`` known to ``scheduler``. A scheduler taken from
    ``$DASK_SCHEDULER_ADDRESS`` that cannot be reached is reported, not an error: the store's
    own status is still worth showing."""
    from . import detached

    source = click.get_current_context().get_parameter_source("scheduler")
    try:
        return detached.job_info(store, scheduler=scheduler)
    except UserError as e:
        if source is not click.core.ParameterSource.ENVIRONMENT:
            raise
        return {"state": "unknown", "error": f"$DASK_SCHEDULER_ADDRESS: {e}"}


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def _show_status(st: dict) -> None:
    spec = st["spec"]
    click.echo(f"store:   {st['store']}")
    click.echo(f"stage:   {st['stage']}")
    if "job" in st:
        click.echo(f"job:     {_job_line(st['job'])}")
    click.echo(f"tiles:   {st['tiles_done']} / {st['tiles_total']} done")
    for name, a in st["arrays"].items():
        click.echo(f"  {name:14s} {a['done']:>8d} / {a['total']}")
    click.echo(f"spec:    {_spec_line(spec)}")
    click.echo(
        f"data:    {st['dataset']}, {st['n_train']} train x {st['n_test']} test, "
        f"tile {st['tile_size']}, {st['dtype']}"
    )
    blocks, loo = st.get("predict_blocks"), st.get("loo_blocks")
    blocks_text = f"{blocks['done']} / {blocks['total']} test blocks" if blocks else ""
    if blocks and loo:
        blocks_text += f", {loo['done']} / {loo['total']} leave-one-out blocks"
    for stage, rec in st["stages"].items():
        end = (
            f"finished {rec['finished']}, {rec.get('seconds')} s"
            if rec.get("finished")
            else "not finished (running, or stopped: run it again to resume)"
        )
        if stage == "predict" and blocks:
            end += f"; {blocks_text}"
            blocks = None  # said here: not again below
        click.echo(f"{stage + ':':8s} started {rec.get('started')}, {end}")
    click.echo(f"task time: {st['task_seconds']} s summed over kernel tiles")
    if "factor_tiles" in st:
        f = st["factor_tiles"]
        click.echo(f"factor:  {f['done']} / {f['total']} tiles")
    if st.get("noise_grid"):
        g = st["noise_grid"]
        noises = ", ".join(f"{x:g}" for x in g["noises"])
        click.echo(f"noise grid: {g['done']} of {len(g['noises'])} factored ({noises}; by lml)")
    if blocks:
        click.echo(f"predict: {blocks_text}")
    if st.get("outputs"):
        counts = {s: st["outputs"].count(s) for s in dict.fromkeys(st["outputs"])}
        text = ", ".join(f"{n} {s}" for s, n in counts.items())
        click.echo(f"outputs: {len(st['outputs'])} per-output stores (Laplace-GP): {text}")
    if st.get("predict"):
        click.echo(f"result:  {_result_line(st['predict'])}")


def _result_line(r: dict) -> str:
    """The prediction's scores in one line (a GP posterior's, or a Laplace-GP's)."""
    if r.get("likelihood"):
        keys = ("accuracy", "nll", "ece", "mse", "map_accuracy", "map_nll", "map_ece")
        return ", ".join(f"{k} {r[k]:.4f}" for k in keys if r.get(k) is not None)
    if "mse" not in r:  # one output's store of a Laplace-GP: its variances
        return "test variances written (the scores are the parent store's)"
    acc = f"accuracy {r['accuracy']:.4f}, " if "accuracy" in r else ""
    return f"{acc}mse {r['mse']:.6g}, noise {r['noise']:g}"


@main.command()
@store_option
@click.option(
    "--repair",
    is_flag=True,
    help="Forget the bad chunks and what was computed from them, so that a re-run recomputes "
    "just those (takes the store's lock).",
)
@click.option(
    "--json",
    "json_path",
    default=None,
    metavar="FILE",
    help="Write the findings as JSON to FILE ('-': to standard output, instead of the text).",
)
@_user_errors
def verify(store: str, repair: bool, json_path: str | None) -> None:
    """Read every chunk of a store and check it (checksum, and against the completion records).

    Exit status 0 when every chunk is sound (or, with --repair, every bad one was repaired),
    1 otherwise."""
    from .options import report_path
    from .verify import verify as check

    if json_path not in (None, "-"):
        report_path(json_path)
    r = check(store, repair=repair)
    if json_path == "-":
        click.echo(json.dumps(r, indent=2))
    else:
        if json_path:
            _write_json(json_path, r)
        for p in r["problems"]:
            tile = ", ".join(map(str, p["tile"]))
            click.echo(f"bad: array {p['array']}, tile ({tile}): {p['problem']}")
        click.echo(f"{r['store']}: {r['chunks_checked']} chunks read, {len(r['problems'])} bad")
        _verify_advice(r, repair)
    if r["unrepairable"] or (r["problems"] and not repair):
        sys.exit(1)


def _verify_advice(r: dict, repair: bool) -> None:
    if r["unrepairable"]:
        click.echo(
            "the inputs (x_*, y_*) cannot be recomputed from the store: make it again with the "
            "same command and --overwrite",
            err=True,
        )
    if not r["rerun"]:
        return
    stages = ", then ".join(r["rerun"])
    if repair:
        click.echo(
            f"repaired: re-run 'nngp-dist run' with the store's options (or {stages}) to "
            "recompute just what was forgotten"
        )
    else:
        click.echo(f"repair: nngp-dist verify --store {r['store']} --repair", err=True)


def _job_line(job: dict | None) -> str:
    if job is None:
        return "none submitted to this scheduler"
    if "job" not in job:
        return f"{job['state']} ({job['error']})"
    text = f"{job['job']} {job['state']} (submitted {job['submitted']}"
    if job.get("worker"):
        text += f", driver pid {job.get('pid')} beside worker {job['worker']}"
    text += f"; log {job['log']})" if job.get("log") else ")"
    if job.get("error"):
        text += f": {job['error']}"
    return text


def _spec_line(spec: dict) -> str:
    """The spec in one line: the architecture and what defines its kernel."""
    if spec["arch"] == "trained":
        weights = f" weights {os.path.basename(spec['weights'])}" if spec.get("weights") else ""
        return (
            f"trained model {os.path.basename(spec['model'])}{weights} "
            f"(sha256 {spec['model_sha256'][:12]}) prior_precision {spec['prior_precision']} "
            f"output {spec['output']}"
        )
    return (
        f"{spec['arch']}{_depth_and_geometry(spec)} {spec['activation']['name']} "
        f"w_var {spec['weight_var']} b_var {spec['bias_var']} {spec['kernel']}"
    )


def _depth_and_geometry(spec: dict) -> str:
    if spec["arch"] == "resnet32":
        return ""
    text = f" depth {spec['depth']}"
    if spec["arch"] == "conv":
        text += (
            f" {spec['filter_size']}x{spec['filter_size']} stride {spec['stride']} "
            f"dilation {spec['dilation']} {spec['padding']} skip {spec['skip_every']} "
            f"{spec['readout']}"
        )
    return text


if __name__ == "__main__":  # pragma: no cover
    main()
