"""Fault campaign: inject faults at random points into real jobs and classify what happens.

Every fault starts from the same job (``nngp-dist run`` on the demo dataset, small enough that
one run takes seconds) and ends with the recovery a user would try: re-run the same command, or,
where a command says so, ``nngp-dist verify --repair`` and then the same command. The final
``mean``, ``variance`` and ``alpha`` are compared bit for bit with a clean run's.

Kinds of fault (``--kinds``):

* ``client-kill``: SIGKILL of the client's whole process group (client, embedded scheduler and
  workers) at a random moment of one stage: creation, kernel, solve, predict.
* ``worker-kill``: SIGKILL of one ``dask worker`` (nanny and worker) of a real ``dask
  scheduler`` + 2 workers cluster at a random moment of the kernel, solve or predict stage.
* ``concurrent``: two writers on one store started together (run + run, kernel + kernel,
  solve + solve with another noise, predict + predict, run + solve).
* ``corrupt``: a bit flip, a truncation or a deletion of one random chunk file of a kernel,
  factor or posterior array of a finished store; the same command is then re-run.
* ``disk-full``: the job on a small tmpfs that fills mid-run (needs root and ``mount``; skipped
  with a note otherwise); the tmpfs is then enlarged (``remount``, data kept) and the job re-run.

Columns of the table (injected faults; one fault may count in several):

* ``identical after recovery``: the final results are bitwise identical to the clean run's.
* ``refused or repaired, clear message``: some command stopped with a message and no traceback
  (a refused concurrent writer, a detected corruption, a full disk).
* ``tracebacks``: some command printed a Python traceback.
* ``silently wrong``: a command exited 0 and its results differ from the clean run's.
* ``broken for good``: the recovery did not give the clean results.
* ``missed``: the job ended before the fault could be injected (not counted as injected).

    python benchmarks/fault_campaign.py --faults 100 --seed 0

prints one JSON line per fault and the table (Markdown) for benchmarks/RESULTS.md. ``--quick``
injects one fault of every kind (the tests run it).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import zarr

from nngp_dist.layout import ALPHA, CHOL, K_TEST_TRAIN, K_TRAIN_TRAIN, MEAN, PREDICT, VARIANCE
from nngp_dist.layout import record as record_path

RESULTS = (MEAN, VARIANCE, ALPHA)
TRACEBACK = "Traceback (most recent call last)"
STAGES = ("creation", "kernel", "solve", "predict")
# The record arrays whose first chunk file marks a stage as under way.
STAGE_RECORD = {"kernel": K_TRAIN_TRAIN, "solve": CHOL, "predict": PREDICT}
# How long after a stage is seen to start a kill may come (seconds): within the stage's length at
# the campaign's default size, so that most faults land inside it.
MAX_DELAY = {"creation": 0.05, "kernel": 1.0, "solve": 0.5, "predict": 0.2}
CORRUPTIBLE = {"kernel": (K_TRAIN_TRAIN, K_TEST_TRAIN), "factor": (CHOL,), "posterior": RESULTS}


@dataclasses.dataclass
class Job:
    """The job every fault starts from, and how to run ``nngp-dist`` commands on it."""

    n: int
    m: int
    tile: int
    noise: str = "1e-3"

    def args(self, command: str, store: Path, noise: str | None = None) -> list[str]:
        data = ["--dataset", "demo", "--train-size", str(self.n), "--test-size", str(self.m)]
        arch = ["--depth", "3", "--weight-var", "1.45", "--bias-var", "0.28"]
        tiles = ["--tile-size", str(self.tile)]
        solve = ["--noise", noise or self.noise]
        parts = {
            "run": [*data, *arch, *tiles, *solve],
            "kernel": [*data, *arch, *tiles],
            "solve": solve,
            "predict": [],
            "verify": [],
        }[command]
        return [sys.executable, "-m", "nngp_dist.cli", command, "--store", str(store), *parts]


@dataclasses.dataclass
class Outcome:
    """What the commands of one fault did."""

    kind: str
    where: str
    injected: bool = True
    refused: bool = False
    traceback: bool = False
    silently_wrong: bool = False
    identical: bool = False
    notes: list[str] = dataclasses.field(default_factory=list)

    def saw(self, proc: subprocess.CompletedProcess | tuple[int, str], what: str) -> int:
        """Record one finished command; return its exit status."""
        code, text = (
            (proc.returncode, proc.stdout + proc.stderr) if hasattr(proc, "stdout") else proc
        )
        if TRACEBACK in text:
            self.traceback = True
            self.notes.append(f"{what}: traceback: {_last_line(text)}")
        elif code != 0:
            self.refused = True
            self.notes.append(f"{what}: exit {code}: {_last_line(text)}")
        return code

    @property
    def label(self) -> str:
        if not self.injected:
            return "missed"
        if self.silently_wrong:
            return "silently wrong"
        if self.traceback:
            return "traceback"
        if not self.identical:
            return "broken"
        return "refused" if self.refused else "identical"


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:200] if lines else ""


def cli(
    args: list[str], env: dict | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*args, "--quiet"] if args[3] != "verify" else args,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def results(store: Path) -> dict[str, np.ndarray] | str:
    """The store's results, or the error reading them raised (a checksum, a missing chunk)."""
    try:
        g = zarr.open_group(str(store), mode="r")
        return {name: np.asarray(g[name][...]) for name in RESULTS}
    except Exception as e:  # noqa: BLE001 - any failure to read is an outcome, not a crash
        return f"{type(e).__name__}: {e}"


def same(a: dict[str, np.ndarray] | str, b: dict[str, np.ndarray]) -> bool:
    return not isinstance(a, str) and all(
        np.array_equal(a[k], b[k], equal_nan=True) for k in RESULTS
    )


def stage_started(store: Path, stage: str) -> bool:
    """Whether ``stage`` of a job on ``store`` is under way (judged from the store's files)."""
    if stage == "creation":
        return store.exists()
    chunks = store / record_path(STAGE_RECORD[stage]) / "c"
    return chunks.exists() and any(chunks.rglob("*"))


def kill_during(
    args: list[str], store: Path, stage: str, delay: float, kill, env: dict | None = None
) -> tuple[bool, tuple[int, str]]:
    """Start ``args``, wait until ``stage`` is under way plus ``delay`` seconds, then call
    ``kill(proc)``; return whether it still ran then, and the command's exit status and output."""
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(
        [*args, "--quiet"],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, **(env or {})},
        text=True,
    )
    deadline = time.monotonic() + 600
    while proc.poll() is None and not stage_started(store, stage) and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(delay)
    injected = proc.poll() is None
    if injected:
        kill(proc)
    code = proc.wait()
    log.seek(0)
    return injected, (code, log.read())


def kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def recover(job: Job, store: Path, out: Outcome, clean: dict, env: dict | None = None) -> None:
    """Re-run the job; if it stops, follow its advice (``verify --repair``) and re-run again;
    then compare with the clean results."""
    code = out.saw(cli(job.args("run", store), env), "rerun")
    got = results(store)
    if code == 0 and isinstance(got, dict) and not same(got, clean):
        out.silently_wrong = True
        return
    if code != 0 or isinstance(got, str):
        out.refused = True
        out.saw(cli([*job.args("verify", store), "--repair"], env), "verify --repair")
        out.saw(cli(job.args("run", store), env), "rerun after repair")
        got = results(store)
    out.identical = same(got, clean)
    if not out.identical:
        out.notes.append(
            f"final results differ or unreadable: {got if isinstance(got, str) else 'differ'}"
        )


# --- the kinds of fault -------------------------------------------------------------------------


def client_kill(job: Job, work: Path, clean: dict, rng: random.Random, stage: str) -> Outcome:
    store = work / "s.zarr"
    out = Outcome("client-kill", stage)
    delay = rng.uniform(0, MAX_DELAY[stage])
    out.injected, first = kill_during(
        [*job.args("run", store), "--workers", "2"], store, stage, delay, kill_group
    )
    if not out.injected:
        return out
    recover(job, store, out, clean)
    return out


def worker_kill(
    job: Job, work: Path, clean: dict, rng: random.Random, stage: str, cluster: DaskCluster
) -> Outcome:
    store = work / "s.zarr"
    out = Outcome("worker-kill", stage)
    address = cluster.start()
    args = [*job.args("run", store), "--scheduler", address]
    delay = rng.uniform(0, MAX_DELAY[stage])
    out.injected, first = kill_during(args, store, stage, delay, lambda _p: cluster.kill_worker(0))
    code = out.saw(first, "run during the kill")
    got = results(store)
    if code == 0 and isinstance(got, dict):
        out.silently_wrong = not same(got, clean)
        out.identical = not out.silently_wrong
    else:
        recover(job, store, out, clean)
    cluster.stop()
    return out


CONCURRENT = {
    "run+run": (("run", None), ("run", None)),
    "kernel+kernel": (("kernel", None), ("kernel", None)),
    "solve+solve": (("solve", "1e-3"), ("solve", "1e-1")),
    "predict+predict": (("predict", None), ("predict", None)),
    "run+solve": (("run", None), ("solve", "1e-2")),
}


def concurrent(job: Job, work: Path, clean: dict, rng: random.Random, pair: str) -> Outcome:
    store = work / "s.zarr"
    out = Outcome("concurrent", pair)
    first, second = CONCURRENT[pair]
    if first[0] in ("solve", "predict"):  # they need a kernel (and a factor) to work on
        cli(job.args("kernel", store))
        if first[0] == "predict":
            cli(job.args("solve", store))
    procs = []
    for i, (command, noise) in enumerate((first, second)):
        procs.append(
            subprocess.Popen(
                [*job.args(command, store, noise), "--workers", "1", "--quiet"],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
        if i == 0:
            time.sleep(rng.uniform(0, 0.5))
    for i, p in enumerate(procs):
        text, _ = p.communicate(timeout=600)
        out.saw((p.returncode, text), f"writer {i + 1}")
    recover(job, store, out, clean)
    return out


def corrupt(
    job: Job, work: Path, clean: dict, rng: random.Random, what: str, sources: dict[str, Path]
) -> Outcome:
    """Damage one chunk of a store at the point where it is read next: a kernel tile of a store
    with only the kernel (the solve reads it), a factor block of a solved store (predict reads
    it), a result chunk of a finished store (the user reads it)."""
    group, how = what.split(":")
    store = work / "s.zarr"
    shutil.copytree(sources[group], store)
    name = rng.choice(CORRUPTIBLE[group])
    chunks = sorted(p for p in (store / name / "c").rglob("*") if p.is_file())
    target = rng.choice(chunks)
    out = Outcome("corrupt", f"{group} {how}")
    data = bytearray(target.read_bytes())
    if how == "flip":
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
        target.write_bytes(bytes(data))
    elif how == "truncate":
        target.write_bytes(bytes(data[: rng.randrange(len(data))]))
    else:
        target.unlink()
    out.notes.append(f"{target.relative_to(store)}")
    recover(job, store, out, clean)
    return out


def disk_full(job: Job, work: Path, clean: dict, rng: random.Random, size_mb: float) -> Outcome:
    out = Outcome("disk-full", f"{size_mb:.1f} MB tmpfs")
    mnt = work / "mnt"
    mnt.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={int(size_mb * 1024)}k", "tmpfs", str(mnt)]
    ).returncode:
        out.injected = False
        out.notes.append("cannot mount a tmpfs here")
        return out
    try:
        store = mnt / "s.zarr"
        code = out.saw(
            cli([*job.args("run", store), "--workers", "2", "--force"]), "run on a full disk"
        )
        if code == 0:
            out.injected = False  # it fitted after all
            return out
        subprocess.run(["mount", "-o", "remount,size=2g", str(mnt)], check=True)
        recover(job, store, out, clean)
        return out
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


class DaskCluster:
    """A real ``dask scheduler`` and two ``dask worker`` processes on 127.0.0.1."""

    def __init__(self, work: Path) -> None:
        self.work, self.procs = work, []

    def _spawn(self, module: str, *args: str) -> subprocess.Popen:
        p = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.procs.append(p)
        return p

    def start(self) -> str:
        file = self.work / f"scheduler-{time.monotonic_ns()}.json"
        host = ["--host", "127.0.0.1", "--dashboard-address", "127.0.0.1:0"]
        self._spawn(
            "distributed.cli.dask_scheduler", *host, "--port", "0", "--scheduler-file", str(file)
        )
        deadline = time.monotonic() + 60
        while not file.exists() or not file.read_text().strip().endswith("}"):
            if time.monotonic() > deadline:
                raise RuntimeError("dask scheduler did not start")
            time.sleep(0.05)
        address = json.loads(file.read_text())["address"]
        for _ in range(2):
            self._spawn(
                "distributed.cli.dask_worker",
                "--scheduler-file",
                str(file),
                *host,
                "--nthreads",
                "1",
            )
        from distributed import Client

        with Client(address, timeout=60) as c:
            c.wait_for_workers(2, timeout=60)
        return address

    def kill_worker(self, i: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.procs[1 + i].pid, signal.SIGKILL)

    def stop(self) -> None:
        for p in reversed(self.procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        self.procs.clear()


# --- the campaign -------------------------------------------------------------------------------


def plan(faults: int, quick: bool, rng: random.Random) -> list[tuple[str, str]]:
    """(kind, where) for every fault: the kinds in fixed proportions, the points at random."""
    menu = {
        "client-kill": list(STAGES),
        "worker-kill": ["kernel", "solve", "predict"],
        "concurrent": list(CONCURRENT),
        "corrupt": [f"{g}:{h}" for g in CORRUPTIBLE for h in ("flip", "truncate", "delete")],
        "disk-full": ["small", "medium"],
    }
    if quick:
        return [(kind, rng.choice(options)) for kind, options in menu.items()]
    share = {
        "client-kill": 0.3,
        "worker-kill": 0.15,
        "concurrent": 0.15,
        "corrupt": 0.33,
        "disk-full": 0.07,
    }
    out = []
    for kind, options in menu.items():
        count = max(len(options), round(share[kind] * faults))
        out += [(kind, options[i % len(options)]) for i in range(count)]
    rng.shuffle(out)
    return out


@contextlib.contextmanager
def scratch(root: Path) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(dir=root))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def one(
    job: Job,
    kind: str,
    where: str,
    root: Path,
    clean: dict,
    sources: dict[str, Path],
    rng: random.Random,
) -> Outcome:
    with scratch(root) as work:
        if kind == "client-kill":
            return client_kill(job, work, clean, rng, where)
        if kind == "worker-kill":
            return worker_kill(job, work, clean, rng, where, DaskCluster(work))
        if kind == "concurrent":
            return concurrent(job, work, clean, rng, where)
        if kind == "corrupt":
            return corrupt(job, work, clean, rng, where, sources)
        src = sources["posterior"]
        size = sum(p.stat().st_size for p in src.rglob("*") if p.is_file()) / 2**20
        return disk_full(job, work, clean, rng, size * (0.3 if where == "small" else 0.7))


COLUMNS = {
    "identical after recovery": lambda o: o.identical,
    "refused or repaired, clear message": lambda o: o.refused and not o.traceback,
    "tracebacks": lambda o: o.traceback,
    "silently wrong": lambda o: o.silently_wrong,
    "broken for good": lambda o: not o.identical,
}


def table(outcomes: list[Outcome]) -> str:
    """Counts per fault and point: injected faults only; a fault may count in several columns
    (a traceback followed by an identical recovery, say)."""
    rows = sorted({(o.kind, o.where) for o in outcomes})
    lines = [
        "| fault | where | injected | " + " | ".join(COLUMNS) + " | missed |",
        "|---|---|---|" + "---|" * (len(COLUMNS) + 1),
    ]

    def counts(these: list[Outcome]) -> list[int]:
        hit = [o for o in these if o.injected]
        return [len(hit), *(sum(map(f, hit)) for f in COLUMNS.values()), len(these) - len(hit)]

    for kind, where in rows:
        c = counts([o for o in outcomes if (o.kind, o.where) == (kind, where)])
        lines.append(f"| {kind} | {where} | " + " | ".join(map(str, c)) + " |")
    lines.append("| **all** | | " + " | ".join(f"**{n}**" for n in counts(outcomes)) + " |")
    return "\n".join(lines)


def clean_stores(job: Job, root: Path) -> dict[str, Path]:
    """The clean job's store after each stage: the kernel, the factor, the posterior."""
    sources = {}
    for group, command in (("kernel", "kernel"), ("factor", "solve"), ("posterior", "predict")):
        store = root / f"clean-{group}.zarr"
        shutil.rmtree(store, ignore_errors=True)
        if sources:
            shutil.copytree(list(sources.values())[-1], store)
        done = cli([*job.args(command, store), "--workers", "2"])
        if done.returncode:
            raise SystemExit(f"the clean {command} failed:\n{done.stdout}{done.stderr}")
        sources[group] = store
    return sources


def main(argv: list[str] | None = None) -> list[Outcome]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--faults", type=int, default=100)
    p.add_argument("--quick", action="store_true", help="one fault of every kind")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--test", type=int, default=200)
    p.add_argument("--tile", type=int, default=100)
    p.add_argument("--dir", default=None, help="scratch folder (default: a temporary one)")
    a = p.parse_args(argv)
    rng = random.Random(a.seed)
    job = Job(a.n, a.test, a.tile)
    root = Path(a.dir or tempfile.mkdtemp(prefix="faults-"))
    root.mkdir(parents=True, exist_ok=True)
    sources = clean_stores(job, root)
    clean = results(sources["posterior"])
    outcomes = []
    for kind, where in plan(a.faults, a.quick, rng):
        start = time.monotonic()
        o = one(job, kind, where, root, clean, sources, rng)
        outcomes.append(o)
        print(
            json.dumps(
                {
                    **dataclasses.asdict(o),
                    "label": o.label,
                    "seconds": round(time.monotonic() - start, 1),
                }
            ),
            flush=True,
        )
    print()
    print(table(outcomes))
    if not a.dir:
        shutil.rmtree(root, ignore_errors=True)
    return outcomes


if __name__ == "__main__":
    main()
