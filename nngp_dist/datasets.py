"""Datasets: IDX (MNIST, Fashion-MNIST), CIFAR-10 pickles, npz files, and the embedded demo.

:func:`load` returns a validated :class:`Dataset` of float64 inputs and integer labels (or the
float targets of an npz file). Integer images are scaled to [0, 1]; nothing else is done unless
``standardize=True``.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import os
import pickle
import tarfile
import zipfile
import zlib
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UserError

__all__ = [
    "CLASS_NAMES",
    "DATASETS",
    "Dataset",
    "as_dataset",
    "class_names",
    "from_arrays",
    "load",
]

# Upstream files (over https, from their publishers) and the MD5 sums the publishers list for
# them: pooch checks every download against them and keeps nothing that differs.
_IDX_FILES = {
    "mnist": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        {
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
    ),
    "fashion-mnist": (
        "https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion/",
        {
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
    ),
}
_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
_CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"

DATASETS = ("demo", "fashion-mnist", "mnist", "cifar10", "npz:PATH")


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Training and test inputs (float64, first axis = examples) and labels or targets."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def fingerprint(self) -> str:
        """SHA-256 over the shapes, dtypes and bytes of the four arrays: the data's identity."""
        return _sha256(self.x_train, self.y_train, self.x_test, self.y_test)

    @property
    def train_fingerprint(self) -> str:
        """SHA-256 of the training inputs and targets alone (a store's test set may change)."""
        return _sha256(self.x_train, self.y_train)

    def flattened(self) -> Dataset:
        """Inputs reshaped to (n, features), as fully connected networks see them."""
        return dataclasses.replace(
            self,
            x_train=self.x_train.reshape(len(self.x_train), -1),
            x_test=self.x_test.reshape(len(self.x_test), -1),
        )


def _sha256(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.shape}{a.dtype.str}".encode())
        h.update(a.data)
    return h.hexdigest()


def from_arrays(name: str, x_train: Any, y_train: Any, x_test: Any, y_test: Any) -> Dataset:
    """A dataset from in-memory arrays, converted and checked exactly as loaded files are."""
    arrays = [np.asarray(a) for a in (x_train, y_train, x_test, y_test)]
    ds = Dataset(name, *arrays)
    _check_dims(ds)
    ds = _as_float(ds)
    validate(ds)
    return ds


def as_dataset(
    dataset: str | Dataset,
    data_dir: str | os.PathLike | None = None,
    train_size: int | None = None,
    test_size: int | None = None,
    standardize: bool = False,
) -> Dataset:
    """``dataset`` itself if it is a :class:`Dataset` (validated when it was made), else the
    dataset of that name, :func:`load`-ed with these options."""
    if isinstance(dataset, Dataset):
        return dataset
    return load(
        dataset,
        data_dir=data_dir,
        train_size=train_size,
        test_size=test_size,
        standardize=standardize,
    )


def load(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    train_size: int | None = None,
    test_size: int | None = None,
    standardize: bool = False,
    download: bool = True,
) -> Dataset:
    """Load a dataset by name, take the first ``train_size`` / ``test_size`` examples, validate.

    ``name`` is ``demo`` (2,000 + 500 Fashion-MNIST images shipped with the package),
    ``fashion-mnist`` or ``mnist`` (IDX files, .gz or raw), ``cifar10`` (the python pickles), or
    ``npz:PATH`` (arrays ``x_train``, ``y_train``, ``x_test``, ``y_test``). Files are looked for
    in ``data_dir``, then ``$NNGP_DIST_DATA`` (and its ``<name>`` subfolder), then
    ``/usr/share/datasets/<name>``, then ``~/.cache/nngp_dist/<name>``; if absent there and
    ``download`` is true, pooch downloads them over https into the cache and verifies their
    published MD5 sums. A file that cannot be read (truncated, corrupt) is a :class:`UserError`
    naming it.

    Examples
    --------
    >>> ds = load("demo", train_size=100, test_size=10)
    >>> ds.x_train.shape, ds.y_test.shape, float(ds.x_train.max()) <= 1.0
    ((100, 28, 28), (10,), True)
    """
    if name == "demo":
        with resources.files("nngp_dist").joinpath("data/fashion-mnist-demo.npz").open("rb") as f:
            arrays = _read_npz(io.BytesIO(f.read()), "the embedded demo data")
    elif name.startswith("npz:"):
        path = Path(name[4:]).expanduser()
        if not path.is_file():
            raise UserError(f"npz file not found: {path}")
        arrays = _read_npz(path, str(path))
    elif name in _IDX_FILES:
        arrays = _load_idx(name, data_dir, download)
    elif name == "cifar10":
        arrays = _load_cifar(data_dir, download)
    else:
        raise UserError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    ds = Dataset(name, *(arrays[k] for k in ("x_train", "y_train", "x_test", "y_test")))
    _check_dims(ds)
    ds = _subset(ds, train_size, test_size)
    ds = _as_float(ds)
    if standardize:
        ds = _standardize(ds)
    validate(ds)
    return ds


def validate(ds: Dataset) -> None:
    """Raise :class:`UserError` for empty sets, mismatched shapes, NaN or infinite values,
    unusable class labels (not 1-D, negative, a test class unseen in training, too many
    classes) and inputs so large that the kernel would overflow float64."""
    for part in ("train", "test"):
        x, y = getattr(ds, f"x_{part}"), getattr(ds, f"y_{part}")
        if x.ndim < 2 or x.shape[0] == 0 or x[0].size == 0:
            raise UserError(f"{ds.name}: the {part} set is empty (inputs of shape {x.shape})")
        if y.shape[0] != x.shape[0] or y.ndim > 2:
            raise UserError(
                f"{ds.name}: {x.shape[0]} {part} inputs but targets of shape {y.shape}; "
                "there must be one label (or one row of targets) per input"
            )
        for label, a in ((f"x_{part}", x), (f"y_{part}", y)):
            if a.dtype.kind == "f" and not np.isfinite(a).all():
                bad = int((~np.isfinite(a)).sum())
                raise UserError(f"{ds.name}: {label} has {bad} NaN or infinite values; clean them")
    if ds.x_train.shape[1:] != ds.x_test.shape[1:]:
        raise UserError(
            f"{ds.name}: training inputs have shape {ds.x_train.shape[1:]} per example but test "
            f"inputs {ds.x_test.shape[1:]}"
        )
    if ds.y_train.shape[1:] != ds.y_test.shape[1:]:
        raise UserError(f"{ds.name}: train and test targets differ in shape per example")
    _check_labels(ds)
    for part in ("train", "test"):
        _check_scale(ds.name, f"x_{part}", getattr(ds, f"x_{part}"))


# Class labels are 0, 1, ..., C - 1 with C = the largest training label + 1; the targets and
# predictions are (N, C) arrays, so C is capped: at most this, and at most max(N, 1000).
MAX_CLASSES = 100_000
# The kernel starts from the rows' inner products (scaled by the weight variance) and then
# multiplies and takes square roots of products of them: a squared row norm above this could
# overflow float64 (1.8e308) in a tile, after hours of computing others. It is checked on every
# row here, not only on the few rows compute.probe evaluates.
MAX_SQUARED_NORM = 1e150


def _check_labels(ds: Dataset) -> None:
    """Integer labels: 1-D, in [0, C) with C from the training labels (and not huge); the test
    labels among the training set's classes."""
    integer = [y.dtype.kind in "iub" for y in (ds.y_train, ds.y_test)]
    if integer[0] != integer[1]:
        kinds = ["integer labels" if i else "float targets" for i in integer]
        raise UserError(
            f"{ds.name}: y_train has {kinds[0]} but y_test {kinds[1]}; give both the same kind"
        )
    if not integer[0]:
        return
    for part in ("train", "test"):
        y = getattr(ds, f"y_{part}")
        if y.ndim != 1:
            raise UserError(
                f"{ds.name}: y_{part} has integer labels of shape {y.shape}; class labels must "
                f"be 1-D, shape ({y.shape[0]},): flatten them (y.ravel()), or give float "
                "targets of shape (N,) or (N, C)"
            )
        if y.min() < 0:
            i = int(np.argmin(y))
            raise UserError(
                f"{ds.name}: y_{part} has the negative label {y[i]} (example {i}); class labels "
                "must be 0, 1, ..., C-1"
            )
    n = len(ds.y_train)
    i = int(np.argmax(ds.y_train))
    c = int(ds.y_train[i]) + 1
    if c > min(MAX_CLASSES, max(n, 1000)):
        raise UserError(
            f"{ds.name}: y_train's largest label is {c - 1} (example {i}), which makes {c} "
            f"classes for {n} training examples: their one-hot targets would be a {n} x {c} "
            f"array. Class labels must be 0, 1, ..., C-1 with C at most {MAX_CLASSES} and at "
            "most the number of training examples (or 1000): renumber them, e.g. "
            "np.unique(y, return_inverse=True)[1]"
        )
    j = int(np.argmax(ds.y_test))
    if ds.y_test[j] >= c:
        raise UserError(
            f"{ds.name}: y_test has the label {ds.y_test[j]} (test example {j}), but the "
            f"training labels are 0..{c - 1}: a class never seen in training cannot be "
            "predicted (drop those test examples or renumber the labels)"
        )


def _check_scale(name: str, label: str, x: np.ndarray) -> None:
    """Refuse inputs whose rows' squared norms could overflow the kernel (see
    :data:`MAX_SQUARED_NORM`), naming the first such row."""
    flat = x.reshape(len(x), -1)
    with np.errstate(over="ignore", invalid="ignore"):
        squared = np.einsum("ij,ij->i", flat, flat)
    bad = ~(squared <= MAX_SQUARED_NORM)
    if bad.any():
        i = int(np.argmax(bad))
        raise UserError(
            f"{name}: row {i} of {label} has squared norm {squared[i]:.3g} (largest |value| "
            f"{np.abs(flat[i]).max():.3g}); the kernel would overflow float64 for it (squared "
            f"norms must be at most {MAX_SQUARED_NORM:.0e}): rescale the inputs, or pass "
            "--standardize"
        )


def _check_dims(ds: Dataset) -> None:
    for part in ("train", "test"):
        x, y = getattr(ds, f"x_{part}"), getattr(ds, f"y_{part}")
        if x.ndim < 2:
            raise UserError(
                f"{ds.name}: x_{part} has shape {x.shape}; inputs need an examples axis and at "
                "least one feature axis, e.g. (n, d) or (n, height, width)"
            )
        if y.ndim < 1:
            raise UserError(f"{ds.name}: y_{part} is a scalar; give one label per example")


def _subset(ds: Dataset, train_size: int | None, test_size: int | None) -> Dataset:
    for label, size, have in (
        ("train", train_size, len(ds.x_train)),
        ("test", test_size, len(ds.x_test)),
    ):
        if size is not None and not 1 <= size <= have:
            raise UserError(f"--{label}-size {size}: {ds.name} has {have} {label} examples")
    return dataclasses.replace(
        ds,
        x_train=ds.x_train[:train_size],
        y_train=ds.y_train[:train_size],
        x_test=ds.x_test[:test_size],
        y_test=ds.y_test[:test_size],
    )


def _as_float(ds: Dataset) -> Dataset:
    def inputs(x: np.ndarray) -> np.ndarray:
        if x.dtype.kind in "ub":
            scale = 1.0 if x.dtype.kind == "b" else float(np.iinfo(x.dtype).max)
            return x.astype(np.float64) / scale
        if x.dtype.kind == "i":
            raise UserError(f"{ds.name}: signed integer images are ambiguous; give floats or uint8")
        if x.dtype.kind != "f":
            raise UserError(f"{ds.name}: inputs must be numeric, got dtype {x.dtype}")
        return x.astype(np.float64)

    def targets(y: np.ndarray) -> np.ndarray:
        if y.dtype.kind in "uib":
            if y.dtype.kind == "u" and y.size and y.max() > np.iinfo(np.int64).max:
                raise UserError(
                    f"{ds.name}: a label of {y.max()} is far too large; class labels must be "
                    "0, 1, ..., C-1"
                )
            return y.astype(np.int64)
        if y.dtype.kind == "f":
            return y.astype(np.float64)
        raise UserError(f"{ds.name}: labels must be integers or float targets, got {y.dtype}")

    return dataclasses.replace(
        ds,
        x_train=inputs(ds.x_train),
        x_test=inputs(ds.x_test),
        y_train=targets(ds.y_train),
        y_test=targets(ds.y_test),
    )


def _standardize(ds: Dataset) -> Dataset:
    def per_image(x: np.ndarray) -> np.ndarray:
        flat = x.reshape(len(x), -1)
        centred = flat - flat.mean(axis=1, keepdims=True)
        norm = np.sqrt((centred**2).mean(axis=1, keepdims=True))
        return (centred / np.where(norm > 0, norm, 1.0)).reshape(x.shape)

    return dataclasses.replace(ds, x_train=per_image(ds.x_train), x_test=per_image(ds.x_test))


# What reading a truncated, corrupt or foreign file raises, in np.load, zipfile, gzip and zlib.
UNREADABLE = (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, zlib.error)


def _read_npz(source: object, label: str) -> dict[str, np.ndarray]:
    try:
        with np.load(source, allow_pickle=False) as z:
            missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in z.files]
            if missing:
                raise UserError(
                    f"{label} lacks arrays {missing}; it needs x_train, y_train, x_test, y_test"
                )
            return {k: z[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    except UserError:
        raise
    except UNREADABLE as e:  # truncated, corrupt or not an npz file at all
        raise UserError(f"cannot read {label} as npz ({type(e).__name__}: {e})") from None


# --- IDX ------------------------------------------------------------------------------------


def _search_dirs(name: str, data_dir: str | os.PathLike | None) -> list[Path]:
    if data_dir is not None:
        return [Path(data_dir).expanduser()]  # an explicit directory is the only place looked
    dirs = []
    env = os.environ.get("NNGP_DIST_DATA")
    if env:
        dirs += [Path(env) / name, Path(env)]
    return dirs + [Path("/usr/share/datasets") / name, _cache_dir(name)]


def _cache_dir(name: str) -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nngp_dist" / name


def _load_idx(name: str, data_dir: str | os.PathLike | None, download: bool) -> dict:
    url, files = _IDX_FILES[name]
    found = None
    for d in _search_dirs(name, data_dir):
        paths = {f: _idx_path(d, f) for f in files}
        if all(p is not None for p in paths.values()):
            found = paths
            break
    if found is None:
        if data_dir is not None or not download:
            raise UserError(
                f"{name}: IDX files ({', '.join(files)}, .gz or raw) not found in "
                + ", ".join(str(d) for d in _search_dirs(name, data_dir))
            )
        cache = _cache_dir(name)
        found = {f: _download(url + f, cache / f, md5) for f, md5 in files.items()}
    arrays = {
        "x_train": _read_idx(found["train-images-idx3-ubyte.gz"]),
        "y_train": _read_idx(found["train-labels-idx1-ubyte.gz"]),
        "x_test": _read_idx(found["t10k-images-idx3-ubyte.gz"]),
        "y_test": _read_idx(found["t10k-labels-idx1-ubyte.gz"]),
    }
    return arrays


def _idx_path(d: Path, gz_name: str) -> Path | None:
    for candidate in (d / gz_name, d / gz_name[:-3]):
        if candidate.is_file():
            return candidate
    return None


_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (LeCun's format): 2 zero bytes, type code, ndim, big-endian dims."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise UserError(f"cannot read {path} ({type(e).__name__}: {e})") from None
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in _IDX_TYPES:
        raise UserError(f"{path} is not an IDX file (bad magic number)")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    body = raw[4 + 4 * ndim :]
    if len(body) != dtype.itemsize * int(np.prod(dims)):
        raise UserError(f"{path}: header says shape {dims} but the file is truncated or padded")
    return np.frombuffer(body, dtype=dtype).reshape(dims).astype(dtype.newbyteorder("="))


def _download(url: str, dest: Path, md5: str) -> Path:
    """``url`` as ``dest``, fetched by pooch over https unless ``dest`` already has MD5 ``md5``.

    pooch downloads to a temporary file, checks the hash and only then moves it into place, so
    a failed or mismatched download leaves nothing behind."""
    if not url.startswith("https://"):
        raise UserError(f"refusing to download {url}: only https URLs are used")
    import pooch  # only a download needs it

    try:
        got = pooch.retrieve(
            url, known_hash=f"md5:{md5}", fname=dest.name, path=dest.parent, progressbar=False
        )
    except ValueError as e:  # pooch's hash mismatch
        raise UserError(f"checksum mismatch for {url}: {e}; the file was not kept") from None
    except Exception as e:  # requests' connection and HTTP errors, OSError
        raise UserError(
            f"cannot download {url} ({type(e).__name__}: {e}); put the files in a folder and "
            "pass --data-dir"
        ) from None
    return Path(got)


# --- CIFAR-10 ---------------------------------------------------------------------------------


class _ArraysOnly(pickle.Unpickler):
    """Unpickles the CIFAR-10 batches (dicts of bytes, lists and NumPy arrays) and nothing else."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")


def _load_cifar(data_dir: str | os.PathLike | None, download: bool) -> dict:
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    folder = None
    for d in _search_dirs("cifar10", data_dir):
        for cand in (d, d / "cifar-10-batches-py"):
            if all((cand / n).is_file() for n in names):
                folder = cand
                break
        if folder:
            break
    if folder is None:
        if data_dir is not None or not download:
            raise UserError(
                "cifar10: the python batches (data_batch_1..5, test_batch) not found in "
                + ", ".join(str(d) for d in _search_dirs("cifar10", data_dir))
            )
        cache = _cache_dir("cifar10")
        archive = _download(_CIFAR_URL, cache / "cifar-10-python.tar.gz", _CIFAR_MD5)
        try:
            with tarfile.open(archive) as tar:
                tar.extractall(cache, filter="data")
        except (tarfile.TarError, *UNREADABLE) as e:
            raise UserError(f"cannot unpack {archive} ({type(e).__name__}: {e})") from None
        folder = cache / "cifar-10-batches-py"
    batches = []
    for n in names:
        try:
            with open(folder / n, "rb") as f:
                d = _ArraysOnly(f, encoding="bytes").load()
            x = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            labels = np.asarray(d[b"labels"], dtype=np.int64)
        except (pickle.UnpicklingError, *UNREADABLE, TypeError, AttributeError) as e:
            raise UserError(
                f"cannot read CIFAR-10 batch {folder / n} ({type(e).__name__}: {e})"
            ) from None
        batches.append((x.transpose(0, 2, 3, 1), labels))
    return {
        "x_train": np.concatenate([b[0] for b in batches[:5]]),
        "y_train": np.concatenate([b[1] for b in batches[:5]]),
        "x_test": batches[5][0],
        "y_test": batches[5][1],
    }


# The publishers' class names, in label order (the demo is a subset of Fashion-MNIST).
_FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
CLASS_NAMES = {
    "demo": _FASHION_MNIST_CLASSES,
    "fashion-mnist": _FASHION_MNIST_CLASSES,
    "mnist": tuple(str(d) for d in range(10)),
    "cifar10": (
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ),
}


def class_names(name: str, labels: Any) -> list[str]:
    """Names of the integer ``labels`` in dataset ``name`` (``class k`` where none is known)."""
    known = CLASS_NAMES.get(name, ())
    return [known[k] if 0 <= k < len(known) else f"class {k}" for k in map(int, labels)]
