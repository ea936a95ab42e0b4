"""Dataset loading and validation."""

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest

from nngp_dist import UserError, load_dataset

SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist-t10k"


def test_demo_is_real_fashion_mnist_sample():
    ds = load_dataset("demo")
    assert ds.x_train.shape == (2000, 28, 28) and ds.x_test.shape == (500, 28, 28)
    assert ds.x_train.min() == 0.0 and ds.x_train.max() == 1.0
    assert set(np.unique(ds.y_train)) == set(range(10))


def write_idx(folder: Path, name: str, array: np.ndarray, gz: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(n).to_bytes(4, "big") for n in array.shape
    )
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(folder / name, "wb") as f:
            f.write(data)
    else:
        (folder / name.removesuffix(".gz")).write_bytes(data)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_files_from_data_dir(tmp_path, gz):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (20, 4, 4))
    labels = rng.integers(0, 10, 20)
    for prefix, n in (("train", 20), ("t10k", 7)):
        write_idx(tmp_path, f"{prefix}-images-idx3-ubyte.gz", imgs[:n], gz)
        write_idx(tmp_path, f"{prefix}-labels-idx1-ubyte.gz", labels[:n], gz)
    ds = load_dataset("mnist", data_dir=tmp_path, train_size=15)
    assert ds.x_train.shape == (15, 4, 4) and ds.x_test.shape == (7, 4, 4)
    np.testing.assert_array_equal(ds.x_train, imgs[:15] / 255.0)
    np.testing.assert_array_equal(ds.y_test, labels[:7])


@pytest.mark.skipif(not SHARED_MNIST.is_dir(), reason="shared MNIST test set not present")
def test_real_mnist_test_images_parse(tmp_path):
    for prefix in ("train", "t10k"):  # the test files stand in for the training files here
        for kind in ("images-idx3", "labels-idx1"):
            shutil.copy(
                SHARED_MNIST / f"t10k-{kind}-ubyte.gz", tmp_path / f"{prefix}-{kind}-ubyte.gz"
            )
    ds = load_dataset("mnist", data_dir=tmp_path)
    assert ds.x_test.shape == (10000, 28, 28)
    assert np.bincount(ds.y_test).tolist()[:3] == [980, 1135, 1032]  # MNIST's published counts


def test_truncated_idx_is_refused(tmp_path):
    write_idx(tmp_path, "train-images-idx3-ubyte.gz", np.zeros((5, 2, 2)), gz=False)
    raw = tmp_path / "train-images-idx3-ubyte"
    raw.write_bytes(raw.read_bytes()[:-3])
    for name in ("train-labels-idx1-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        write_idx(tmp_path, name, np.zeros(5), gz=False)
    write_idx(tmp_path, "t10k-images-idx3-ubyte.gz", np.zeros((5, 2, 2)), gz=False)
    with pytest.raises(UserError, match="truncated"):
        load_dataset("mnist", data_dir=tmp_path)


def test_missing_files_say_where_they_were_looked_for(tmp_path):
    with pytest.raises(UserError, match=str(tmp_path)):
        load_dataset("fashion-mnist", data_dir=tmp_path)


def npz(tmp_path, **over):
    rng = np.random.default_rng(1)
    arrays = {
        "x_train": rng.random((10, 6)),
        "y_train": rng.integers(0, 2, 10),
        "x_test": rng.random((4, 6)),
        "y_test": rng.integers(0, 2, 4),
        **over,
    }
    arrays = {k: v for k, v in arrays.items() if v is not None}
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    return f"npz:{path}"


@pytest.mark.parametrize(
    "over,match",
    [
        ({"x_train": np.full((10, 6), np.nan)}, "NaN or infinite"),
        ({"x_test": np.array([[np.inf] * 6] * 4)}, "NaN or infinite"),
        ({"y_train": np.zeros(9, int)}, "one label"),
        ({"x_test": np.zeros((4, 5))}, "shape"),
        ({"x_train": np.zeros((0, 6)), "y_train": np.zeros(0, int)}, "empty"),
        ({"y_test": None}, "lacks arrays"),
        ({"x_train": np.zeros((10, 6), dtype=np.int32)}, "signed integer"),
        ({"x_train": np.zeros(10)}, "examples axis"),
        ({"x_test": np.float64(3.0)}, "examples axis"),
        ({"y_train": np.int64(1)}, "scalar"),
    ],
)
def test_bad_npz_is_refused(tmp_path, over, match):
    with pytest.raises(UserError, match=match):
        load_dataset(npz(tmp_path, **over))


def test_npz_integer_images_scaled_floats_kept(tmp_path):
    imgs = np.arange(60, dtype=np.uint8).reshape(10, 6)
    assert load_dataset(npz(tmp_path, x_train=imgs)).x_train.max() == 59 / 255
    floats = np.random.default_rng(2).standard_normal((10, 6)) * 7
    np.testing.assert_array_equal(load_dataset(npz(tmp_path, x_train=floats)).x_train, floats)


def test_sizes_and_standardize(tmp_path):
    with pytest.raises(UserError, match="has 10 train"):
        load_dataset(npz(tmp_path), train_size=11)
    ds = load_dataset("demo", train_size=50, test_size=5, standardize=True)
    flat = ds.x_train.reshape(50, -1)
    np.testing.assert_allclose(flat.mean(1), 0, atol=1e-12)
    np.testing.assert_allclose((flat**2).mean(1), 1, rtol=1e-12)


def test_unknown_dataset():
    with pytest.raises(UserError, match="unknown dataset"):
        load_dataset("imagenet")


def test_download_checks_the_checksum(tmp_path, monkeypatch):
    """pooch fetches the files over https with the published MD5 sums (its retrieve mocked:
    no network); a mismatch is a UserError and nothing is kept; a verified cache is reused."""
    import hashlib

    import pooch

    from nngp_dist import datasets

    src = tmp_path / "mirror"
    src.mkdir()
    rng = np.random.default_rng(3)
    for prefix, n in (("train", 12), ("t10k", 4)):
        write_idx(src, f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 3, 3)), True)
        write_idx(src, f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n), True)
    sums = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in src.iterdir()}
    calls = []

    def retrieve(url, known_hash, fname, path, progressbar=False):
        calls.append((url, known_hash))
        dest = Path(path) / fname
        if dest.is_file() and known_hash == "md5:" + hashlib.md5(dest.read_bytes()).hexdigest():
            return str(dest)
        data = (src / url.rsplit("/", 1)[1]).read_bytes()
        if known_hash != "md5:" + hashlib.md5(data).hexdigest():
            raise ValueError(f"MD5 hash of downloaded file ({fname}) does not match")
        Path(path).mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
        return str(dest)

    monkeypatch.setattr(pooch, "retrieve", retrieve)
    cache = tmp_path / "cache"
    monkeypatch.setattr(datasets, "_search_dirs", lambda name, d: [cache / name])
    monkeypatch.setattr(datasets, "_cache_dir", lambda name: cache / name)
    url = "https://example.org/mnist/"
    bad = {**sums, "t10k-labels-idx1-ubyte.gz": "0" * 32}
    monkeypatch.setitem(datasets._IDX_FILES, "mnist", (url, bad))
    with pytest.raises(UserError, match="checksum mismatch"):
        load_dataset("mnist")
    assert not (cache / "mnist" / "t10k-labels-idx1-ubyte.gz").exists()  # not kept
    monkeypatch.setitem(datasets._IDX_FILES, "mnist", (url, sums))
    assert load_dataset("mnist").x_train.shape == (12, 3, 3)
    assert {u for u, _ in calls} == {url + f for f in sums}
    assert all(h == "md5:" + sums[u.rsplit("/", 1)[1]] for u, h in calls[-4:])


def test_downloads_are_https_with_the_published_checksums(monkeypatch, tmp_path):
    from nngp_dist import datasets

    for url, files in datasets._IDX_FILES.values():
        assert url.startswith("https://") and all(len(md5) == 32 for md5 in files.values())
    assert datasets._CIFAR_URL.startswith("https://") and len(datasets._CIFAR_MD5) == 32
    with pytest.raises(UserError, match="only https"):
        datasets._download("http://example.org/f.gz", tmp_path / "f.gz", "0" * 32)
    import pooch

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(pooch, "retrieve", offline)
    with pytest.raises(UserError, match="--data-dir"):
        datasets._download("https://example.org/f.gz", tmp_path / "f.gz", "0" * 32)


def test_lookup_order_data_dir_env_system_cache(monkeypatch, tmp_path):
    from nngp_dist import datasets

    monkeypatch.setenv("NNGP_DIST_DATA", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert datasets._search_dirs("mnist", tmp_path / "d") == [tmp_path / "d"]
    assert datasets._search_dirs("mnist", None) == [
        tmp_path / "env" / "mnist",
        tmp_path / "env",
        Path("/usr/share/datasets/mnist"),
        tmp_path / "xdg" / "nngp_dist" / "mnist",
    ]


@pytest.mark.parametrize(
    "over,match",
    [
        ({"y_train": np.zeros((10, 1), int), "y_test": np.zeros((4, 1), int)}, r"shape \(10,\)"),
        ({"y_train": np.array([0, 1, -1, 0, 1, 0, 1, 0, 1, 0])}, "negative label -1"),
        ({"y_test": np.array([0, 1, 2, 0])}, "label 2 .test example 2"),
        ({"y_train": np.array([0, 1, 10**9, 0, 1, 0, 1, 0, 1, 0])}, "1000000001 classes"),
        ({"y_train": np.array([0, 1, 2**63 + 5, 0, 1, 0, 1, 0, 1, 0], np.uint64)}, "too large"),
        ({"y_test": np.zeros(4)}, "integer labels but y_test float"),
    ],
)
def test_bad_labels_are_refused(tmp_path, over, match):
    with pytest.raises(UserError, match=match):
        load_dataset(npz(tmp_path, **over))


def test_float_targets_and_many_classes_are_kept(tmp_path):
    rng = np.random.default_rng(4)
    for y, yt in ((rng.random(10), rng.random(4)), (rng.random((10, 3)), rng.random((4, 3)))):
        ds = load_dataset(npz(tmp_path, y_train=y, y_test=yt))
        np.testing.assert_array_equal(ds.y_train, y)
    labels = np.arange(10) * 99  # 892 classes for 10 examples: sparse, but allowed
    assert load_dataset(npz(tmp_path, y_train=labels)).y_train.max() == 891


def test_inputs_that_would_overflow_the_kernel_are_refused_by_row(tmp_path):
    x = np.random.default_rng(5).random((300, 6))
    x[250, 3] = 1e160  # finite, but its square is not
    with pytest.raises(UserError, match="row 250 of x_train"):
        load_dataset(npz(tmp_path, x_train=x, y_train=np.arange(300) % 2))
    x[250, 3] = 1e74  # squared norm 1e148: fine
    assert load_dataset(npz(tmp_path, x_train=x, y_train=np.arange(300) % 2)).x_train[250, 3]


@pytest.mark.parametrize("cut", [0.5, 0.9])
def test_truncated_npz_is_a_user_error_naming_the_file(tmp_path, cut):
    path = Path(npz(tmp_path)[4:])
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * cut)])
    with pytest.raises(UserError, match=str(path)):
        load_dataset(f"npz:{path}")


@pytest.mark.parametrize("damage", ["truncate", "bad-block"])
def test_corrupt_gzip_idx_is_a_user_error(tmp_path, damage):
    rng = np.random.default_rng(6)
    for prefix in ("train", "t10k"):
        write_idx(tmp_path, f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (5, 8, 8)), True)
        write_idx(tmp_path, f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 2, 5), True)
    bad = tmp_path / "t10k-images-idx3-ubyte.gz"
    raw = bytearray(bad.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    else:
        start = raw.index(0, 10) + 1  # after the header's file name: the deflate stream
        raw[start] = 0xFF  # its first block's header: an invalid block type (zlib.error)
    bad.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="t10k-images"):
        load_dataset("mnist", data_dir=tmp_path)
