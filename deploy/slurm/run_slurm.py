"""Run an nngp_dist job on a SLURM cluster, its Dask workers started as batch jobs.

dask-jobqueue's ``SLURMCluster`` submits one ``sbatch`` job per group of workers; the workers
connect back to a scheduler in this process, which should therefore run on a login node or in
an allocation of its own, on a network the compute nodes reach. The store must be on storage
that every compute node and this process share (a parallel or network file system path, or
an fsspec URL such as ``s3://bucket/kernels.zarr``). Re-running the same command on the same
store computes only what is missing, so a job whose workers hit their wall time can simply
be started again.

    pip install dask-jobqueue          # not a dependency of nngp_dist
    python deploy/slurm/run_slurm.py --store /shared/kernels/fmnist.zarr \\
        --dataset fashion-mnist --train-size 50000 --depth 8 --weight-var 1.45 \\
        --bias-var 0.28 --noise 1e-3 --jobs 4 --cores 16 --memory 64GB \\
        --walltime 04:00:00 --queue compute --json fmnist.json

Every compute node needs the same Python environment (nngp_dist, dask, distributed): a
shared virtual environment, or ``--prologue 'source /shared/venv/bin/activate'``.
"""

from __future__ import annotations

import argparse
import json
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="nngp_dist kernel, solve and predict on Dask workers started by SLURM.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--store", required=True, help="store path on shared storage, or a URL")
    job = p.add_argument_group("the job (as `nngp-dist run`)")
    job.add_argument("--dataset", default="demo")
    job.add_argument("--data-dir", default=None)
    job.add_argument("--train-size", type=int, default=None)
    job.add_argument("--test-size", type=int, default=None)
    job.add_argument("--depth", type=int, default=3)
    job.add_argument("--activation", default="relu")
    job.add_argument("--weight-var", type=float, default=1.45)
    job.add_argument("--bias-var", type=float, default=0.28)
    job.add_argument("--kernel", choices=["nngp", "ntk"], default="nngp")
    job.add_argument("--tile-size", type=int, default=None)
    job.add_argument("--noise", default=None, help="relative noise, or a comma-separated grid")
    job.add_argument("--json", dest="json_path", default=None, help="write the report here")
    job.add_argument("--quiet", action="store_true", help="no progress bars")
    slurm = p.add_argument_group("the SLURM jobs that run the workers")
    slurm.add_argument("--jobs", type=int, default=2, help="number of SLURM jobs")
    slurm.add_argument("--cores", type=int, default=8, help="cores per job")
    slurm.add_argument(
        "--processes",
        type=int,
        default=None,
        help="worker processes per job (default: one single-threaded per core)",
    )
    slurm.add_argument("--memory", default="32GB", help="memory per job")
    slurm.add_argument("--walltime", default="02:00:00")
    slurm.add_argument("--queue", default=None, help="SLURM partition")
    slurm.add_argument("--account", default=None)
    slurm.add_argument(
        "--interface", default=None, help="network interface of the workers, e.g. ib0"
    )
    slurm.add_argument(
        "--local-directory",
        default=None,
        help="node-local scratch for worker spill files, e.g. $TMPDIR",
    )
    slurm.add_argument(
        "--prologue",
        action="append",
        default=[],
        help="shell line run before each worker starts (repeatable)",
    )
    slurm.add_argument(
        "--extra-directive",
        action="append",
        default=[],
        help="extra #SBATCH option, e.g. --gres=gpu:1 (repeatable)",
    )
    slurm.add_argument(
        "--wait-timeout",
        type=float,
        default=1800.0,
        help="seconds to wait for the first worker to start",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        print(
            "run_slurm.py needs dask-jobqueue, which nngp_dist does not install: "
            "pip install dask-jobqueue",
            file=sys.stderr,
        )
        return 2
    from distributed import Client

    from nngp_dist import UserError
    from nngp_dist.cluster import WORKER_ENV

    processes = args.processes or args.cores
    cluster = SLURMCluster(
        cores=args.cores,
        processes=processes,
        memory=args.memory,
        walltime=args.walltime,
        queue=args.queue,
        account=args.account,
        interface=args.interface,
        local_directory=args.local_directory,
        # One malloc heap per worker process, as the embedded cluster has (cluster.WORKER_ENV).
        job_script_prologue=[f"export {k}={v}" for k, v in WORKER_ENV.items()] + args.prologue,
        job_extra_directives=args.extra_directive,
    )
    try:
        if not args.quiet:
            print(cluster.job_script(), file=sys.stderr)
        cluster.scale(jobs=args.jobs)
        with Client(cluster) as client:
            # The kernel tasks start as workers arrive; wait for one so that a queue that
            # never starts the jobs ends with a message, not a hung client.
            try:
                client.wait_for_workers(1, timeout=args.wait_timeout)
            except TimeoutError:
                sys.exit(
                    f"no worker started within {args.wait_timeout:g} s: check the jobs with "
                    "squeue, their logs, and --queue / --account / --walltime"
                )
            try:
                report = run_job(args, client)
            except UserError as e:  # bad input, found before any tile is written
                print(f"error: {e}", file=sys.stderr)
                return 2
    finally:
        cluster.close()
    summary = {k: report.get(k) for k in ("accuracy", "mse", "log_marginal_likelihood", "noise")}
    print(json.dumps(summary, indent=2))
    return 0


def run_job(args: argparse.Namespace, client: object) -> dict:
    """``nngp_dist.jobs.run`` with the job's options, on the SLURM workers' client."""
    import nngp_dist.jobs

    return nngp_dist.jobs.run(
        args.store,
        dataset=args.dataset,
        data_dir=args.data_dir,
        train_size=args.train_size,
        test_size=args.test_size,
        depth=args.depth,
        activation=args.activation,
        weight_var=args.weight_var,
        bias_var=args.bias_var,
        kernel=args.kernel,
        tile_size=args.tile_size,
        noise=args.noise,
        json_path=args.json_path,
        client=client,
        progress=not args.quiet,
    )


if __name__ == "__main__":
    sys.exit(main())
