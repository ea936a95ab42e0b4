"""Model selection: depth x w_var x b_var x noise, scored on a held-out validation split.

How a grid costs little more than one kernel:

* The inputs enter the kernel only through their Gram matrix, which every grid point shares: it
  is computed once on the client and sent to each worker once (``Spec.cross_from``).
* Every depth 1..L comes from one pass of the recursion (``Spec.cross_from(depths=...)``), so a
  grid point is one (w_var, b_var) pair, one task, whatever the number of depths.
* The noise values of a grid share that task's kernel; each is one Cholesky factorisation of
  the fitted points' matrix (:func:`.select.noisy_solve`; an eigendecomposition serving every
  noise at once costs about 20 of them).

The split: the first ``train_size`` training examples are fitted and the **last**
``validation_size`` training examples scored (as Lee et al. and Garriga-Alonso et al. held out
the last 10,000 of MNIST's training set), so a later ``nngp-dist run --train-size 50000`` on
Fashion-MNIST never trains on the examples the hyperparameters were chosen on. The test set is
never read.

Results are written to ``OUT/sweep.csv`` (one row per depth, w_var, b_var and noise) and
``OUT/sweep.json`` (settings, the table and the best row); each finished grid point is appended
to ``OUT/sweep-points.jsonl`` as it arrives, so a killed sweep re-run with the same settings
redoes only the grid points that were in flight. One sweep writes a folder at a time: it
holds the folder's lock (:mod:`nngp_dist.lock`), and a second is refused, naming the first.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import sys
import time
from typing import Any, NamedTuple

import numpy as np
from distributed import as_completed

from . import config, datasets
from .cluster import with_client
from .compute import probe
from .errors import UserError
from .kernels import Spec, input_state
from .lock import store_lock
from .predict import targets
from .progress import progress_bar
from .select import noisy_solve
from .storage import writable

__all__ = ["parse_grid", "parse_depths", "sweep"]

POINTS_FILE = "sweep-points.jsonl"
# Validation rows evaluated together: keep (depths x rows x n_fit) float64 under this.
VAL_BLOCK_BYTES = 1 << 27


def parse_grid(name: str, value: Any) -> list[float]:
    """``"0.5,1,2"`` or ``"START:STOP:NUM"`` (NUM evenly spaced values, both ends included)."""
    if isinstance(value, (list, tuple)):
        vals = list(value)
    else:
        text = str(value).strip()
        try:
            if ":" in text:
                a, b, num = text.split(":")
                vals = list(np.linspace(float(a), float(b), int(num)))
            else:
                vals = [float(p) for p in text.split(",") if p.strip()]
        except ValueError:
            raise UserError(
                f"--{name} {value!r}: give comma-separated numbers or START:STOP:NUM"
            ) from None
    if not vals:
        raise UserError(f"--{name} needs at least one value")
    out = []
    for v in vals:
        v = float(v)
        if not math.isfinite(v):
            raise UserError(f"--{name} values must be finite, got {v}")
        out.append(round(v, 12))
    if len(set(out)) != len(out):
        raise UserError(f"--{name} has repeated values: {value!r}")
    return out


def parse_depths(value: Any) -> list[int]:
    """``"1-10"``, ``"1,2,4,8"`` or a list; distinct non-negative integers."""
    parts = value if isinstance(value, (list, tuple)) else str(value).split(",")
    out: list[int] = []
    try:
        for p in parts:
            p = str(p).strip()
            if "-" in p[1:]:
                a, b = p.split("-", 1)
                out.extend(range(int(a), int(b) + 1))
            elif p:
                out.append(int(p))
    except ValueError:
        raise UserError(f"--depth {value!r}: give integers like 3, 1-10 or 1,2,4,8") from None
    if not out or min(out) < 0 or len(set(out)) != len(out):
        raise UserError(f"--depth {value!r}: give distinct non-negative integers")
    return sorted(out)


def _point_task(
    state_ff: Any,
    state_vf: Any,
    t_fit: np.ndarray,
    y_val: np.ndarray,
    labels: bool,
    spec_kwargs: dict,
    depths: list[int],
    noises: list[float],
) -> list[dict]:
    """Score one (w_var, b_var) at every depth and noise (worker side)."""
    from . import workers

    workers.tune_allocator()
    clock = {"kernel": 0.0, "solve": 0.0}
    t0 = time.perf_counter()
    spec = Spec(depth=max(depths), **spec_kwargs)
    k_fit = spec.cross_from(state_ff, depths=depths)  # (D, n, n)
    clock["kernel"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    n = k_fit.shape[1]
    alphas: dict[tuple[int, int], np.ndarray] = {}
    rows = []
    for di, depth in enumerate(depths):
        scale = float(np.mean(np.diagonal(k_fit[di])))
        for ni, s in enumerate(noises):
            row = {"depth": depth, "noise": s}
            solved = noisy_solve(k_fit[di], t_fit, s * scale)
            if solved is None:
                row["result"] = "not positive definite"
            else:
                alphas[di, ni] = solved[0]
            rows.append(row)
    del k_fit
    clock["solve"] += time.perf_counter() - t0
    v = len(y_val)
    means = {key: np.empty((v, t_fit.shape[1])) for key in alphas}
    step = max(1, VAL_BLOCK_BYTES // (8 * n * len(depths)))
    for r0 in range(0, v, step):
        t0 = time.perf_counter()
        k_val = spec.cross_from(state_vf.rows(r0, r0 + step), depths=depths)
        clock["kernel"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        for (di, ni), alpha in alphas.items():
            means[di, ni][r0 : r0 + step] = k_val[di] @ alpha
        clock["solve"] += time.perf_counter() - t0
    t_val = targets(y_val, t_fit.shape[1]) if labels else y_val.reshape(v, -1)
    for row, key in zip(rows, [(di, ni) for di in range(len(depths)) for ni in range(len(noises))]):
        if key not in means:
            continue
        m = means[key]
        row["result"] = "ok"
        row["validation_mse"] = float(((m - t_val) ** 2).mean())
        if labels:
            row["validation_accuracy"] = float((m.argmax(1) == y_val).mean())
    w, b = spec_kwargs["weight_var"], spec_kwargs["bias_var"]
    clock = {k: round(v, 3) for k, v in clock.items()}
    return [{"weight_var": w, "bias_var": b, **r, "point_seconds": clock} for r in rows]


def sweep(
    out: str,
    *,
    dataset: str = "demo",
    train_size: int | None = None,
    validation_size: int | None = None,
    depths: Any = "1-5",
    weight_vars: Any = "0.5:2.5:5",
    bias_vars: Any = "0:0.4:5",
    noises: Any = "1e-6,1e-4,1e-3,1e-2,1e-1",
    activation: Any = "relu",
    kernel: str = "nngp",
    select_by: str | None = None,
    heatmap_depth: int | None = None,
    data_dir: str | None = None,
    standardize: bool = False,
    scheduler: str | None = None,
    workers: int | None = None,
    memory_limit: str | None = None,
    progress: bool = True,
    client: Any = None,
) -> dict:
    """Score every (depth, w_var, b_var, noise) on the validation split; write table and heat map.

    Returns ``{"best": row, "rows": [...], "files": {...}, "seconds": s, ...}``. Noise is relative
    to the mean of the fitted points' kernel diagonal, as in ``solve``.
    """
    depths, weight_vars, bias_vars, noises = _grid(depths, weight_vars, bias_vars, noises)
    specs = _specs(weight_vars, bias_vars, max(depths), activation, kernel)
    if heatmap_depth is not None and heatmap_depth not in depths:
        raise UserError(f"--heatmap-depth {heatmap_depth} is not one of --depth {depths}")
    ds = datasets.load(dataset, data_dir=data_dir, standardize=standardize).flattened()
    split = _split(ds, dataset, train_size, validation_size)
    select_by = _select_by(select_by, split.labels)
    for spec in specs.values():
        probe(spec, ds, "float64")
    out = _out_folder(out)
    activation_spec = specs[weight_vars[0], bias_vars[0]].activation.spec
    settings = _settings(ds.name, split, depths, activation_spec, kernel, noises, standardize)
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    os.makedirs(out, exist_ok=True)
    with store_lock(out, "sweep"):  # one sweep per folder: its points file and its tables
        done = _read_points(os.path.join(out, POINTS_FILE), key)
        todo = [wb for wb in specs if wb not in done]
        t0 = time.perf_counter()
        network = {"activation": activation, "kernel": kernel}
        points = _Points(out, key, split, network, depths, noises, len(specs), progress)
        scheduler = None if scheduler == "synchronous" else scheduler
        if todo:
            with_client(
                lambda c: points.compute(c, todo, done), client, scheduler, workers, memory_limit
            )
        rows = [r for wb in specs for r in done[wb]]
        best, metric = _best(rows, select_by)
        hd = best["depth"] if heatmap_depth is None else heatmap_depth
        files = _write(out, settings, rows, best, select_by, metric, hd, weight_vars, bias_vars)
    # worker seconds summed over grid points: the kernel recursions (fitted and validation
    # points, every depth) and the factorisations and predictions
    task_seconds = {
        k: round(sum(done[wb][0].get("point_seconds", {}).get(k, 0.0) for wb in specs), 1)
        for k in ("kernel", "solve")
    }
    return {
        "best": best,
        "rows": rows,
        "files": files,
        "select_by": select_by,
        "settings": settings,
        "grid_points": len(specs),
        "grid_points_computed": len(todo),
        "task_seconds": task_seconds,
        "seconds": time.perf_counter() - t0,
    }


def _select_by(select_by: str | None, labels: bool) -> str:
    """The criterion: ``select_by``, else validation accuracy for labels and MSE for targets."""
    select_by = select_by or ("accuracy" if labels else "mse")
    if select_by not in ("accuracy", "mse"):
        raise UserError(f"--select-by must be accuracy or mse, got {select_by!r}")
    if select_by == "accuracy" and not labels:
        raise UserError("--select-by accuracy needs integer labels; use mse")
    return select_by


def _best(rows: list[dict], select_by: str) -> tuple[dict, str]:
    """The best row of the grid by ``select_by``, and the row's key for that metric."""
    ok = [r for r in rows if r["result"] == "ok"]
    if not ok:
        raise UserError("every grid point left the kernel indefinite; try larger --noise values")
    metric = "validation_accuracy" if select_by == "accuracy" else "validation_mse"
    return (max if select_by == "accuracy" else min)(ok, key=lambda r: r[metric]), metric


def _grid(depths: Any, weight_vars: Any, bias_vars: Any, noises: Any) -> tuple[list, ...]:
    """The grid's axes parsed: depths, weight variances, bias variances, relative noises (and,
    as the first of the sweep's checks, the nngp-dist config values)."""
    config.checked()
    noise_list = parse_grid("noise", noises)
    if min(noise_list) <= 0:
        raise UserError("--noise values must be positive (relative to the mean diagonal)")
    return (
        parse_depths(depths),
        parse_grid("weight-var", weight_vars),
        parse_grid("bias-var", bias_vars),
        noise_list,
    )


def _settings(
    name: str,
    split: _Split,
    depths: list[int],
    activation: Any,
    kernel: str,
    noises: list[float],
    standardize: bool,
) -> dict:
    """What the grid's rows depend on besides (w_var, b_var): rows of the same settings are
    kept and resumed."""
    return {
        "dataset": name,
        "fingerprint": hashlib.sha256(split.x_fit.tobytes() + split.x_val.tobytes()).hexdigest(),
        "train_size": len(split.x_fit),
        "validation_size": len(split.x_val),
        "depths": depths,
        "activation": activation,
        "kernel": kernel,
        "noises": noises,
        "standardize": standardize,
    }


def _specs(
    weight_vars: list[float], bias_vars: list[float], depth: int, activation: Any, kernel: str
) -> dict[tuple[float, float], Spec]:
    """The grid's networks, by (w_var, b_var), each of the largest depth."""
    specs = {}
    for w in weight_vars:
        for b in bias_vars:
            kw = {"weight_var": w, "bias_var": b, "activation": activation, "kernel": kernel}
            try:
                specs[w, b] = Spec(depth=depth, **kw)
            except ValueError as e:
                raise UserError(str(e)) from None
    return specs


class _Split(NamedTuple):
    """The fitted points (the first ``train_size``) and the validation split (the last)."""

    x_fit: np.ndarray
    x_val: np.ndarray
    t_fit: np.ndarray
    y_val: np.ndarray
    labels: bool


def _split(
    ds: datasets.Dataset,
    name: str,
    train_size: int | None,
    validation_size: int | None,
) -> _Split:
    """The fitted points and the validation split (by default a fifth of the training set, at
    most 10,000), checked."""
    n_all = len(ds.x_train)
    v = min(10000, n_all // 5) if validation_size is None else int(validation_size)
    n = n_all - v if train_size is None else int(train_size)
    if v < 1 or n < 1 or n + v > n_all:
        given = f"--validation-size {v}" + ("" if validation_size is not None else " (default)")
        given += f" with --train-size {n}" if train_size is not None else ""
        raise UserError(
            f"{given}: the validation split (the last V training examples) and the fitted "
            "points (the first N; by default all the others) must be non-empty and together "
            f"at most the {n_all} training examples of {name}"
        )
    labels = ds.y_train.dtype.kind in "iu"
    n_classes = int(ds.y_train.max() + 1) if labels else None
    return _Split(
        ds.x_train[:n],
        ds.x_train[n_all - v :],
        targets(ds.y_train[:n], n_classes),
        ds.y_train[n_all - v :],
        labels,
    )


def _out_folder(out: str) -> str:
    """``out`` made absolute, after checking that it can be created or written."""
    out = os.path.abspath(os.path.expanduser(out))
    parent = os.path.dirname(out)
    if not os.path.isdir(out) and not (os.path.isdir(parent) and writable(parent)):
        raise UserError(f"--out {out}: cannot create it ({parent} is not a writable directory)")
    if os.path.isdir(out) and not writable(out):
        raise UserError(f"--out {out} is not writable")
    return out


class _Points(NamedTuple):
    """The grid points' tasks, and the file their rows are appended to as they finish."""

    out: str
    key: str
    split: _Split
    network: dict
    depths: list[int]
    noises: list[float]
    total: int
    progress: bool

    def compute(self, c: Any, todo: list[tuple[float, float]], done: dict) -> None:
        """Run the points ``todo`` on client ``c``; add their rows to ``done`` and the file."""
        if self.progress:
            print(f"dashboard: {c.dashboard_link}", file=sys.stderr)
        sp = self.split
        state_ff, state_vf = c.scatter(
            [input_state(sp.x_fit, sp.x_fit), input_state(sp.x_val, sp.x_fit)], broadcast=True
        )
        futures = [
            c.submit(
                _point_task,
                state_ff,
                state_vf,
                sp.t_fit,
                sp.y_val,
                sp.labels,
                {"weight_var": w, "bias_var": b, **self.network},
                self.depths,
                self.noises,
                pure=False,
            )
            for w, b in todo
        ]
        bar = progress_bar(self.total, self.total - len(todo), self.progress, "sweep")
        try:
            with open(os.path.join(self.out, POINTS_FILE), "a+") as f:
                if f.tell():  # a line cut short by a kill must not swallow the next record
                    f.seek(f.tell() - 1)
                    if f.read(1) != "\n":
                        f.write("\n")
                for fut in as_completed(futures):
                    rows = fut.result()
                    f.write(json.dumps({"key": self.key, "rows": rows}) + "\n")
                    f.flush()
                    done[rows[0]["weight_var"], rows[0]["bias_var"]] = rows
                    bar.update(1)
        finally:
            bar.close()


def _read_points(path: str, key: str) -> dict:
    done: dict = {}
    if not os.path.exists(path):
        return done
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
            if rec.get("key") == key and rec.get("rows"):
                r0 = rec["rows"][0]
                done[r0["weight_var"], r0["bias_var"]] = rec["rows"]
    return done


def _write(
    out: str,
    settings: dict,
    rows: list[dict],
    best: dict,
    select_by: str,
    metric: str,
    depth: int,
    weight_vars: list[float],
    bias_vars: list[float],
) -> dict:
    from .figures import sweep_heatmap

    cols = [
        "depth",
        "weight_var",
        "bias_var",
        "noise",
        "result",
        "validation_accuracy",
        "validation_mse",
    ]
    csv_path = os.path.join(out, "sweep.csv")
    with open(csv_path + ".tmp", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    os.replace(csv_path + ".tmp", csv_path)
    json_path = os.path.join(out, "sweep.json")
    with open(json_path + ".tmp", "w") as f:
        json.dump(
            {"settings": settings, "select_by": select_by, "best": best, "rows": rows}, f, indent=1
        )
    os.replace(json_path + ".tmp", json_path)
    png = os.path.join(out, f"sweep-depth{depth}.png")
    sweep_heatmap(rows, depth, metric, weight_vars, bias_vars, png, settings=settings)
    return {"csv": csv_path, "json": json_path, "heatmap": png}
