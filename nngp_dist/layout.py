"""The store's layout: every array's name, dimensions and chunking, in one place.

This is the public contract of a kernel store (readable with plain ``zarr`` or ``xarray``,
without this package). Every other module names arrays through these constants; the README's
layout table is generated from :data:`ARRAYS` (a test checks that it is). The storage module
(:mod:`nngp_dist.storage`) is the only one that creates, opens and drops them.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = [
    "ALPHA",
    "ARRAYS",
    "CG_BLOCKJACOBI",
    "CG_NYSTROM",
    "CHOL",
    "CHOL_STEP",
    "CHOL_WORK",
    "CREATING",
    "DIMS",
    "K_TEST_DIAG",
    "K_TEST_TRAIN",
    "K_TRAIN_DIAG",
    "K_TRAIN_TRAIN",
    "KERNEL_ARRAYS",
    "LAPLACE_SCALE",
    "LOCK",
    "LOO",
    "LOO_ARRAYS",
    "LOO_INDEX",
    "LOO_MEAN",
    "LOO_SIZE",
    "LOO_VARIANCE",
    "MEAN",
    "OUTPUTS",
    "PREDICT",
    "RECORDS",
    "T_TRAIN",
    "VARIANCE",
    "X_TEST",
    "X_TRAIN",
    "Y_TEST",
    "Y_TRAIN",
    "layout_table",
    "record",
]

# Inputs, written when the store is created.
X_TRAIN, X_TEST, Y_TRAIN, Y_TEST = "x_train", "x_test", "y_train", "y_test"
# The kernel stage.
K_TRAIN_TRAIN, K_TEST_TRAIN = "k_train_train", "k_test_train"
K_TRAIN_DIAG, K_TEST_DIAG = "k_train_diag", "k_test_diag"
KERNEL_ARRAYS = (K_TRAIN_TRAIN, K_TEST_TRAIN, K_TRAIN_DIAG, K_TEST_DIAG)
# The solve stage.
T_TRAIN, ALPHA = "t_train", "alpha"
CHOL, CHOL_WORK = "chol", ("chol_work0", "chol_work1")
CG_NYSTROM, CG_BLOCKJACOBI = "cg_nystrom", "cg_blockjacobi"
# The predict stage.
MEAN, VARIANCE = "mean", "variance"
# The leave-one-out predictions of a subset of the training points (the predict stage), each
# given all the other training points, which fit the variance recalibration: LOO_INDEX which
# training points, LOO_MEAN and LOO_VARIANCE their mean and latent variance (as MEAN and
# VARIANCE are for a test point), recorded per block in record(LOO).
LOO_INDEX, LOO_MEAN, LOO_VARIANCE = "loo_index", "loo_mean", "loo_variance"
LOO = "loo"
# How many leave-one-out points by default (``--loo-size``): at 50,000 training points they cost
# 76 s on 2 cores (a quarter of predicting 10,000 test points), and the map fitted on them put
# every bin of the 10,000 test points within 0.77-1.22 of the diagonal; maps from 20 random
# sets of 5,000 kept every bin within 1.37 (benchmarks/RESULTS.md).
LOO_SIZE = 5000
# The Laplace-GP posterior of a trained network: one store per output c in the group
# OUTPUTS ("outputs/<c>", each a whole kernel store of kappa_c), whose LAPLACE_SCALE holds
# sqrt(Lambda_c), the square root of each training point's noise precision.
OUTPUTS, LAPLACE_SCALE = "outputs", "laplace_scale"
# Completion records live in the group RECORDS, one array per tiled array, plus CHOL_STEP (the
# updates each factor tile has received) and PREDICT (one per block of test points).
RECORDS = "tiles"
CHOL_STEP, PREDICT = "chol_step", "predict"


# Files at the store's root that are not arrays (zarr and xarray ignore them): the lease of the one
# process that may write the store (nngp_dist.lock), and the marker of a creation in progress,
# written before anything else of a new store and removed after its identity is complete.
LOCK, CREATING = ".nngp-dist-lock", ".nngp-dist-creating"


def record(name: str) -> str:
    """The path of the completion records of ``name`` (an array, ``chol_step`` or ``predict``)."""
    return f"{RECORDS}/{name}"


# Dimension names, so that xarray.open_zarr reads the store.
DIMS = {
    X_TRAIN: ("train", "feature"),
    X_TEST: ("test", "feature"),
    Y_TRAIN: ("train",),
    Y_TEST: ("test",),
    K_TRAIN_TRAIN: ("train", "train_col"),
    K_TEST_TRAIN: ("test", "train_col"),
    K_TRAIN_DIAG: ("train",),
    K_TEST_DIAG: ("test",),
    T_TRAIN: ("train", "output"),
    ALPHA: ("train", "output"),
    CHOL: ("train", "train_col"),
    CHOL_WORK[0]: ("train", "train_col"),
    CHOL_WORK[1]: ("train", "train_col"),
    CG_NYSTROM: ("train", "landmark"),
    CG_BLOCKJACOBI: ("train", "block_col"),
    MEAN: ("test", "output"),
    VARIANCE: ("test",),
    LAPLACE_SCALE: ("train",),
    LOO_INDEX: ("loo",),
    LOO_MEAN: ("loo", "output"),
    LOO_VARIANCE: ("loo",),
}
# The leave-one-out arrays with their record: created, dropped and repaired together. The
# record first: dropped first and created last, so that a record always has its arrays.
LOO_ARRAYS = (record(LOO), LOO_INDEX, LOO_MEAN, LOO_VARIANCE)


class ArrayDoc(NamedTuple):
    """One row of the layout table: what a user reading the store finds."""

    name: str
    shape: str
    chunks: str
    contents: str


# T is the tile edge, S the solvers' block (the attribute ``solve_block``), B the test points per
# prediction task (``predict_block``), L the leave-one-out points (``loo_size``) and
# L_B per leave-one-out task (``loo_block``), C the outputs (classes).
ARRAYS = (
    ArrayDoc(
        f"`{X_TRAIN}`, `{X_TEST}`",
        "(N, D), (M, D)",
        "(T, D)",
        "the inputs exactly as used (float64)",
    ),
    ArrayDoc(
        f"`{Y_TRAIN}`, `{Y_TEST}`", "(N,), (M,)", "(T,)", "labels (int64), or float targets (N, C)"
    ),
    ArrayDoc(
        f"`{K_TRAIN_TRAIN}`",
        "(N, N)",
        "(T, T)",
        "the kernel; only tiles with row tile <= column tile are written, the others stay NaN",
    ),
    ArrayDoc(f"`{K_TEST_TRAIN}`", "(M, N)", "(T, T)", "test x train kernel"),
    ArrayDoc(f"`{K_TRAIN_DIAG}`, `{K_TEST_DIAG}`", "(N,), (M,)", "(T,)", "k(x, x)"),
    ArrayDoc(
        f"`{RECORDS}/<array>`",
        "the tile grid",
        "one per tile",
        "completion record: NaN until the tile is completely written, then the seconds it took",
    ),
    ArrayDoc(
        f"`{CHOL}`",
        "(N, N)",
        "(S, S)",
        "upper Cholesky factor U of K + s I (K + s I = U^T U); upper blocks only",
    ),
    ArrayDoc(
        f"`{RECORDS}/{CHOL}`, `{RECORDS}/{CHOL_STEP}`",
        "(N / S, N / S)",
        "one per block",
        "factor block done (seconds); updates applied to a block so far",
    ),
    ArrayDoc(
        f"`{CHOL_WORK[0]}`, `{CHOL_WORK[1]}`",
        "(N, N)",
        "(S, S)",
        "scratch: the factorisation's updated blocks; deleted when it completes",
    ),
    ArrayDoc(
        f"`{CG_NYSTROM}`, `{CG_BLOCKJACOBI}`",
        "(N, min(S, N))",
        "(S, min(S, N))",
        "scratch of a `--method cg` solve: its preconditioner's columns or block factors",
    ),
    ArrayDoc(
        f"`{T_TRAIN}`",
        "(N, C)",
        "(S, C)",
        "the regression targets used (one-hot 0.9 / -0.1 for labels)",
    ),
    ArrayDoc(f"`{ALPHA}`", "(N, C)", "(S, C)", "(K + s I)^-1 t_train"),
    ArrayDoc(
        f"`{MEAN}`, `{VARIANCE}`",
        "(M, C), (M,)",
        "(B, C), (B,)",
        "posterior mean and variance (clamped at 0) of each test point; (M, C) both for "
        "the Laplace-GP posterior of a trained network (`--likelihood`), in its output space",
    ),
    ArrayDoc(
        f"`{OUTPUTS}/<c>`",
        "a store",
        "",
        "Laplace-GP posterior: the kernel store of output c (kappa_c), with its own factor",
    ),
    ArrayDoc(
        f"`{OUTPUTS}/<c>/{LAPLACE_SCALE}`",
        "(N,)",
        "(S,)",
        "sqrt of each training point's noise precision Lambda_c (1 / sigma for regression)",
    ),
    ArrayDoc(f"`{RECORDS}/{PREDICT}`", "(M / B,)", "1", "prediction block done (seconds)"),
    ArrayDoc(
        f"`{LOO_INDEX}`, `{LOO_MEAN}`, `{LOO_VARIANCE}`",
        "(L,), (L, C), (L,)",
        "(L_B,), (L_B, C), (L_B,)",
        "leave-one-out predictions of L training points spread evenly over the training set "
        "(which ones, mean, latent variance given the other N - 1): fit the variance "
        "recalibration",
    ),
    ArrayDoc(f"`{RECORDS}/{LOO}`", "(L / L_B,)", "1", "leave-one-out block done (seconds)"),
)


def layout_table() -> str:
    """:data:`ARRAYS` as the Markdown table the README shows."""
    rows = ["| array | shape | chunks | contents |", "|---|---|---|---|"]
    rows += [f"| {a.name} | {a.shape} | {a.chunks} | {a.contents} |" for a in ARRAYS]
    return "\n".join(rows)
