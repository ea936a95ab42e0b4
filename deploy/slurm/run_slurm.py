"""Run an nngp_dist job on a SLURM cluster, its Dask workers started as batch jobs.

    pip install dask-jobqueue          # not a dependency of nngp_dist
    python deploy/slurm/run_slurm.py --jobs 4 [CLUSTER OPTIONS] [OPTIONS OF nngp-dist run]

    python deploy/slurm/run_slurm.py --jobs 4 --queue compute --store /shared/kernels/fm.zarr \\
        --dataset fashion-mnist --train-size 50000 --depth 8 --weight-var 1.45 \\
        --bias-var 0.28 --noise 1e-3 --json fmnist.json

The options below are this script's; every other option is passed as it is to `nngp-dist
run` (see `nngp-dist run --help`), which checks it before any batch job is submitted, and
runs the job on the SLURM workers with the scheduler that this process starts.

dask-jobqueue's ``SLURMCluster`` submits one ``sbatch`` job per group of workers. Their size
comes from the site's dask-jobqueue configuration (``jobqueue.slurm`` in
``~/.config/dask/jobqueue.yaml``, ``/etc/dask/`` or ``$DASK_CONFIG``: cores, memory,
walltime, queue, account, interface, job-extra-directives, job-script-prologue ...); a
command-line option given here overrides one key, and only where the site sets no cores,
memory or walltime does the script take 8 cores, 32GB and 02:00:00. The site's processes per
job are kept too; without one, each job runs one single-threaded worker process per core, as
the embedded cluster of `nngp-dist` does. `--print-job-script` prints the batch script that
would be submitted (with a placeholder scheduler address), and submits nothing.

The workers connect back to the scheduler in this process, which should therefore run on a
login node or in an allocation of its own, on a network the compute nodes reach. The store
must be on storage that every compute node and this process share (a parallel or network file
system path, or an fsspec URL such as ``s3://bucket/kernels.zarr``). Re-running the same
command on the same store computes only what is missing, so a job whose workers hit their wall
time can simply be started again. Every compute node needs the same Python environment
(nngp_dist, dask, distributed): a shared virtual environment, or ``--prologue 'source
/shared/venv/bin/activate'``.

Whoever can connect to the scheduler (dask-jobqueue's: all interfaces of this node unless the
site's ``scheduler-options`` or ``--interface`` narrow it) can run any code as your user on the
compute nodes: run it inside the cluster's private network, and use TLS where that network is
shared (dask-jobqueue's ``security`` and ``protocol: tls://``). The workers' own dashboards
listen on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import sys

# Cluster options of `nngp-dist run` that this script decides itself.
RESERVED = ("--scheduler", "--workers", "--memory-limit")
# Where the site's configuration gives none (dask-jobqueue requires cores and memory; its own
# walltime, 30 minutes, is short for a kernel).
FALLBACK = {"cores": 8, "memory": "32GB", "walltime": "02:00:00"}


def parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: an option of `nngp-dist run` is never taken for one of these.
    p = argparse.ArgumentParser(
        description="nngp-dist run on Dask workers started by SLURM (dask-jobqueue); options "
        "not listed here go to `nngp-dist run`.",
        allow_abbrev=False,
    )
    p.add_argument("--jobs", type=int, default=2, help="number of SLURM jobs (default 2)")
    p.add_argument(
        "--print-job-script", action="store_true", help="print the batch script and exit"
    )
    p.add_argument(
        "--wait-timeout",
        type=float,
        default=1800.0,
        help="seconds to wait for the first worker to start (default 1800)",
    )
    site = p.add_argument_group("the SLURM jobs (default: the site's jobqueue.slurm configuration)")
    site.add_argument("--cores", type=int, help="cores per job")
    site.add_argument("--processes", type=int, help="worker processes per job")
    site.add_argument("--memory", help="memory per job, e.g. 64GB")
    site.add_argument("--walltime", help="e.g. 04:00:00")
    site.add_argument("--queue", help="SLURM partition")
    site.add_argument("--account")
    site.add_argument("--interface", help="network interface of scheduler and workers, e.g. ib0")
    site.add_argument("--local-directory", help="node-local scratch for spill files, e.g. $TMPDIR")
    site.add_argument(
        "--prologue",
        action="append",
        default=[],
        help="shell line run before each worker starts, after the site's (repeatable)",
    )
    site.add_argument(
        "--extra-directive",
        action="append",
        default=[],
        help="#SBATCH option added to the site's, e.g. --gres=gpu:1 (repeatable)",
    )
    return p


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """This script's options, and the rest: the options of `nngp-dist run`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args, run_args = parser().parse_known_args(argv)
    for arg in run_args:
        if arg.split("=")[0] in RESERVED:
            raise SystemExit(
                f"{arg.split('=')[0]} is this script's to set: the workers are "
                "SLURM jobs (--jobs, --cores, --memory ...)"
            )
    return args, run_args


def cluster_kwargs(args: argparse.Namespace) -> dict:
    """SLURMCluster's keyword arguments: the site's configuration, with this command's options
    over it and the fallbacks only where both are silent."""
    import dask.config

    from nngp_dist.cluster import WORKER_ENV

    # What the site configures: dask's YAML files and DASK_* variables, without the defaults
    # dask-jobqueue registers for itself.
    configured = dask.config.collect()

    def site(key: str):
        return dask.config.get(f"jobqueue.slurm.{key}", default=None, config=configured)

    given = {
        "cores": args.cores,
        "processes": args.processes,
        "memory": args.memory,
        "walltime": args.walltime,
        "queue": args.queue,
        "account": args.account,
        "interface": args.interface,
        "local_directory": args.local_directory,
    }
    kwargs = {k: v for k, v in given.items() if v is not None}
    for key, value in FALLBACK.items():
        if key not in kwargs and site(key) is None:
            kwargs[key] = value
    if "processes" not in kwargs and site("processes") is None:
        kwargs["processes"] = kwargs.get("cores") or site("cores")
    # Lists given as arguments replace the site's: so pass the site's with ours added.
    kwargs["job_script_prologue"] = [
        *(site("job-script-prologue") or []),
        # One malloc heap per worker process, as the embedded cluster has (cluster.WORKER_ENV).
        *(f"export {k}={v}" for k, v in WORKER_ENV.items()),
        *args.prologue,
    ]
    kwargs["job_extra_directives"] = [
        *(site("job-extra-directives") or []),
        *args.extra_directive,
    ]
    worker_args = list(site("worker-extra-args") or [])
    if not any(a.startswith(("--dashboard-address", "--no-dashboard")) for a in worker_args):
        worker_args += ["--dashboard-address", "127.0.0.1:0"]  # no worker HTTP off the node
    kwargs["worker_extra_args"] = worker_args
    return kwargs


def job_script(kwargs: dict) -> str:
    """The batch script SLURMCluster submits with ``kwargs``, without starting a scheduler."""
    from dask_jobqueue.slurm import SLURMJob

    return SLURMJob(scheduler="tcp://SCHEDULER:8786", name="nngp-dist", **kwargs).job_script()


def main(argv: list[str] | None = None) -> int:
    args, run_args = parse_args(argv)
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        print(
            "run_slurm.py needs dask-jobqueue, which nngp_dist does not install: "
            "pip install dask-jobqueue",
            file=sys.stderr,
        )
        return 2
    import click
    from distributed import Client

    from nngp_dist.cli import main as cli

    # The options of `nngp-dist run`, checked (names, types, required ones) before any job is
    # submitted; the job itself checks its inputs before it writes anything.
    try:
        cli.commands["run"].make_context("nngp-dist run", [*run_args, "--scheduler", "-"])
    except click.ClickException as e:
        e.show()
        return e.exit_code
    kwargs = cluster_kwargs(args)
    if args.print_job_script:
        print(job_script(kwargs))
        return 0
    cluster = SLURMCluster(**kwargs)
    try:
        if "--quiet" not in run_args:
            print(cluster.job_script(), file=sys.stderr)
        cluster.scale(jobs=args.jobs)
        with Client(cluster) as client:
            # The kernel tasks start as workers arrive; wait for one so that a queue that
            # never starts the jobs ends with a message, not a hung client.
            try:
                client.wait_for_workers(1, timeout=args.wait_timeout)
            except TimeoutError:
                print(
                    f"no worker started within {args.wait_timeout:g} s: check the jobs with "
                    "squeue, their logs, and --queue / --account / --walltime",
                    file=sys.stderr,
                )
                return 1
        # `nngp-dist run` itself, in this process, against the SLURM workers' scheduler.
        try:
            cli.main(
                ["run", *run_args, "--scheduler", cluster.scheduler_address],
                prog_name="nngp-dist",
                standalone_mode=False,
            )
        except click.ClickException as e:
            e.show()
            return e.exit_code
        except SystemExit as e:  # nngp-dist's own exits: 2 bad input, 1 failed job
            return e.code if isinstance(e.code, int) else 1
    finally:
        cluster.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
