"""The tiled job into the store: tiled equals untiled, resume, refusal, the public layout."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

import nngp_dist
from nngp_dist import KernelStore, Spec, UserError
from nngp_dist.storage import COMPRESSORS

SPEC = {"depth": 3, "weight_var": 1.45, "bias_var": 0.28}


def run(store, data, **kw):
    args = {**SPEC, "scheduler": "synchronous", "progress": False, **kw}
    return nngp_dist.kernel(str(store), dataset=f"npz:{data}", **args)


def untiled(data, **kw):
    with np.load(data) as z:
        x, xt = z["x_train"].reshape(37, -1), z["x_test"].reshape(11, -1)
    spec = Spec(**{**SPEC, **kw})
    return spec, x, xt


@pytest.mark.parametrize("tile", [37, 8, 5, 64])  # one tile, ragged, ragged, larger than N
@pytest.mark.parametrize("kernel", ["nngp", "ntk"])
def test_tiled_equals_untiled(tmp_path, small_npz, tile, kernel):
    run(tmp_path / "k.zarr", small_npz, tile_size=tile, kernel=kernel)
    spec, x, xt = untiled(small_npz, kernel=kernel)
    ds = nngp_dist.open_store(str(tmp_path / "k.zarr"))
    want = spec.cross(x, x)
    # The stored diagonal comes from the diagonal recursion (exact correlation 1); the cross
    # evaluation of it carries arccos(1 - eps) rounding, ~1e-8 in the ReLU NTK.
    np.fill_diagonal(want, spec.diag(x))
    np.testing.assert_allclose(ds.k_train_train.values, want, rtol=1e-12)
    np.testing.assert_allclose(ds.k_test_train.values, spec.cross(xt, x), rtol=1e-12)
    np.testing.assert_allclose(ds.k_train_diag.values, spec.diag(x), rtol=1e-12)
    np.testing.assert_allclose(ds.k_test_diag.values, spec.diag(xt), rtol=1e-12)
    # the diagonal tiles' diagonals are the diagonal recursion's values exactly
    assert np.array_equal(np.diag(ds.k_train_train.values), ds.k_train_diag.values)


def test_layout_is_readable_with_plain_zarr(tmp_path, small_npz):
    run(tmp_path / "k.zarr", small_npz, tile_size=8, dtype="float32")
    g = zarr.open_group(str(tmp_path / "k.zarr"), mode="r")
    meta = g.attrs["nngp_dist"]
    assert meta["spec"]["depth"] == 3 and meta["tile_size"] == 8 and meta["dtype"] == "float32"
    k = g["k_train_train"]
    assert k.shape == (37, 37) and k.chunks == (8, 8) and k.dtype == np.float32
    upper, lower = k[0:8, 8:16], k[8:16, 0:8]
    assert np.isfinite(upper).all() and np.isnan(lower).all()  # lower tiles never written
    assert g["x_train"].shape == (37, 15) and g["y_test"].shape == (11,)
    assert np.isnan(g["tiles/k_train_train"][1, 0]) and g["tiles/k_train_train"][0, 1] > 0
    # chunk edges are capped at the extent: 11 test rows are one (11, T) row of chunks
    assert g["k_test_train"].chunks == (8, 8)
    run(tmp_path / "t16.zarr", small_npz, tile_size=16)
    g16 = zarr.open_group(str(tmp_path / "t16.zarr"), mode="r")
    assert g16["k_test_train"].chunks == (11, 16) and g16["k_test_diag"].chunks == (11,)
    assert g16["x_test"].chunks == (11, 15) and g16["k_train_train"].chunks == (16, 16)
    assert np.isfinite(g16["k_test_train"][...]).all()
    spec, x, _ = untiled(small_npz)
    np.testing.assert_allclose(upper, spec.cross(x[:8], x[8:16]), rtol=1e-6)


def test_rerun_computes_only_missing_tiles(tmp_path, small_npz):
    store = tmp_path / "k.zarr"
    first = run(store, small_npz, tile_size=8)
    assert first["tiles_computed"] == first["tiles_total"] == 15 + 10 + 5 + 2
    g = zarr.open_group(str(store), mode="r+")
    before = g["tiles/k_test_train"][...]
    # forget two tiles, as if the job had been killed before writing them
    g["tiles/k_train_train"][1, 3] = np.nan
    g["tiles/k_test_diag"][0] = np.nan
    g["k_train_train"][8:16, 24:32] = -1.0
    second = run(store, small_npz, tile_size=8)
    assert second["tiles_computed"] == 2 and second["tiles_skipped"] == 30
    assert np.array_equal(g["tiles/k_test_train"][...], before)  # others not recomputed
    spec, x, _ = untiled(small_npz)
    np.testing.assert_allclose(g["k_train_train"][8:16, 24:32], spec.cross(x[8:16], x[24:32]))


@pytest.mark.parametrize(
    "change",
    [{"depth": 4}, {"tile_size": 16}, {"dtype": "float32"}, {"kernel": "ntk"}, {"train_size": 30}],
)
def test_mismatched_run_is_refused_and_store_untouched(tmp_path, small_npz, change):
    store = tmp_path / "k.zarr"
    run(store, small_npz, tile_size=8)
    files = {p: p.stat().st_mtime_ns for p in store.rglob("*")}
    with pytest.raises(UserError, match="different run"):
        run(store, small_npz, **{"tile_size": 8, **change})
    assert {p: p.stat().st_mtime_ns for p in store.rglob("*")} == files
    run(store, small_npz, **{"tile_size": 8, **change}, overwrite=True)
    assert KernelStore.open(str(store)).status()["stage"] == "kernel-done"


def test_refuses_to_write_into_a_foreign_directory(tmp_path, small_npz):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("precious")
    with pytest.raises(UserError, match="not a kernel store"):
        run(tmp_path / "notes", small_npz)
    assert (tmp_path / "notes" / "keep.txt").read_text() == "precious"


def test_unwritable_location_is_refused(tmp_path, small_npz):
    """A read-only folder (for root, who may write anywhere else, /proc: writability is
    tried, not guessed from permissions)."""
    if os.geteuid() == 0:
        if not os.path.isdir("/proc/self"):
            pytest.skip("root, and no /proc to try")
        ro = Path("/proc")
    else:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
    with pytest.raises(UserError, match="cannot write"):
        run(ro / "k.zarr", small_npz)
    from nngp_dist.sweep import sweep

    with pytest.raises(UserError, match="--out"):
        sweep(
            str(ro / "sw"),
            dataset="demo",
            train_size=50,
            validation_size=20,
            depths="1",
            weight_vars="1",
            bias_vars="0",
            noises="1e-2",
            progress=False,
        )


def test_status_counts_tiles_and_stage(tmp_path, small_npz):
    store = tmp_path / "k.zarr"
    run(store, small_npz, tile_size=8)
    st = KernelStore.open(str(store)).status()
    assert (st["tiles_done"], st["tiles_total"], st["stage"]) == (32, 32, "kernel-done")
    zarr.open_group(str(store), mode="r+")["tiles/k_test_train"][0, 0] = np.nan
    st = KernelStore.open(str(store)).status()
    assert (st["tiles_done"], st["stage"]) == (31, "kernel")
    assert st["stages"]["kernel"]["tiles"] == 32


def test_killed_job_resumes_where_it_stopped(tmp_path):
    """SIGKILL a real job mid-way, then re-run: done tiles are kept, the result is exact."""
    store = tmp_path / "k.zarr"
    cmd = [
        sys.executable,
        "-m",
        "nngp_dist.cli",
        "kernel",
        "--store",
        str(store),
        "--dataset",
        "demo",
        "--train-size",
        "600",
        "--test-size",
        "100",
        "--tile-size",
        "40",
        "--activation",
        "erf",
        "--depth",
        "300",
        "--weight-var",
        "1.5",
        "--bias-var",
        "0.1",
        "--scheduler",
        "synchronous",
        "--quiet",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    tiles_file = store / "tiles" / "k_train_train"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if tiles_file.exists() and len(list((tiles_file / "c").rglob("*"))) > 40:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the job finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rec = zarr.open_group(str(store), mode="r")["tiles/k_train_train"][...]
    done_before = ~np.isnan(rec)
    assert 0 < done_before.sum() < np.triu(np.ones_like(rec)).sum()
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    summary = out.stdout
    assert "already done" in summary
    g = zarr.open_group(str(store), mode="r")
    after = g["tiles/k_train_train"][...]
    assert np.array_equal(after[done_before], rec[done_before])  # not recomputed
    st = KernelStore.open(str(store)).status()
    assert st["tiles_done"] == st["tiles_total"]
    ds = nngp_dist.open_store(str(store))
    spec = Spec(depth=300, weight_var=1.5, bias_var=0.1, activation="erf")
    x = ds.x_train.values
    np.testing.assert_allclose(ds.k_train_train.values, spec.cross(x, x), rtol=1e-12)
    assert json.loads(json.dumps(st))  # status is JSON-able


def test_fsspec_url_store(small_npz):
    """Any fsspec URL zarr accepts (here the in-memory file system) holds a store."""
    url = "memory://nngp-dist-test/k.zarr"
    first = run(url, small_npz, tile_size=16)
    assert first["action"] == "create" and first["tiles_computed"] == first["tiles_total"]
    assert run(url, small_npz, tile_size=16)["tiles_computed"] == 0
    with pytest.raises(UserError, match="different run"):
        run(url, small_npz, tile_size=8)
    spec, x, _ = untiled(small_npz)
    np.testing.assert_allclose(
        nngp_dist.open_store(url).k_test_train.values[:, :5],
        spec.cross(untiled(small_npz)[2], x[:5]),
        rtol=1e-12,
    )


def test_half_created_store_is_redone_and_foreign_group_refused(tmp_path, small_npz):
    store = tmp_path / "k.zarr"
    run(store, small_npz, tile_size=8)
    g = zarr.open_group(str(store), mode="r+")
    g.attrs["nngp_dist"] = {**g.attrs["nngp_dist"], "creating": True}  # as if killed mid-create
    with pytest.raises(UserError, match="never completely created"):
        KernelStore.open(str(store))
    assert run(store, small_npz, tile_size=8)["action"] == "create"
    foreign = tmp_path / "foreign.zarr"
    zarr.open_group(str(foreign), mode="w").create_array("a", shape=(2,), dtype="f8")
    with pytest.raises(UserError, match="not an nngp_dist kernel store"):
        run(foreign, small_npz)
    assert run(foreign, small_npz, overwrite=True)["action"] == "create"


def test_home_and_relative_paths_mean_one_store(tmp_path, small_npz, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert run("~/k.zarr", small_npz, tile_size=8)["tiles_computed"] == 32
    assert run("k.zarr", small_npz, tile_size=8)["tiles_computed"] == 0
    assert KernelStore.open(str(tmp_path / "k.zarr")).status()["stage"] == "kernel-done"


def test_a_python_nonlinearity_object_is_used_and_recorded(tmp_path, small_npz):
    from nngp_dist.kernels import elementwise

    phi = elementwise(
        np.sin, lambda x: np.cos(x), name="sin", spec={"name": "custom", "function": "numpy:sin"}
    )
    run(tmp_path / "k.zarr", small_npz, tile_size=8, activation=phi, kernel="ntk")
    spec, x, _ = untiled(small_npz, activation="numpy:sin", kernel="ntk")
    ds = nngp_dist.open_store(str(tmp_path / "k.zarr"))
    np.testing.assert_allclose(ds.k_train_diag.values, spec.diag(x), rtol=1e-7)
    with pytest.raises(UserError, match="module:function"):
        run(tmp_path / "k2.zarr", small_npz, activation=elementwise(lambda v: np.sin(v)))
    assert not (tmp_path / "k2.zarr").exists()


def test_flushed_tiles_read_back_with_plain_zarr(tmp_path, monkeypatch):
    """The kernel stage's store (workers.FlushingStore) flushes every array chunk, large or
    small, compressible or not, before renaming it into place, but not the completion records
    (tiles/) or metadata; plain zarr reads everything back, and no temporary file is left."""
    from nngp_dist import workers

    flushed = []
    real = workers.os.fdatasync
    monkeypatch.setattr(workers.os, "fdatasync", lambda fd: flushed.append(fd) or real(fd))
    rng = np.random.default_rng(3)
    arrays = {
        "big": rng.standard_normal((600, 600)),
        "small": rng.standard_normal((5, 5)),
        "constant": np.full((300, 300), 7.0),
        "tiles/k": np.ones((2, 2)),
    }
    group = zarr.open_group(workers.FlushingStore(tmp_path / "s.zarr"), mode="w")
    for name, a in arrays.items():
        group.create_array(name, shape=a.shape, chunks=a.shape, dtype="float64")[...] = a
    assert len(flushed) == 3  # one chunk each, not the record's
    plain = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    for name, a in arrays.items():
        np.testing.assert_array_equal(plain[name][...], a)
    assert not list((tmp_path / "s.zarr").rglob("*.partial"))


def _takes_o_direct(folder: Path) -> bool:
    try:
        os.close(os.open(folder / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT))
    except OSError:
        return False
    finally:
        (folder / "probe").unlink(missing_ok=True)
    return True


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT on this platform")
@pytest.mark.parametrize("refuse", [None, "open", "write"])
def test_direct_chunks_are_byte_for_byte_zarrs_own(tmp_path, monkeypatch, refuse):
    """FlushingStore writes array chunks with O_DIRECT where the file system takes it, and
    through the page cache where it refuses O_DIRECT at open (tmpfs) or at the first write.
    Either way every chunk file (of sizes that are and are not multiples of the 4096-byte
    block) is byte for byte the file plain zarr writes, and no temporary file is left."""
    from nngp_dist import workers

    real_open, real_write = os.open, os.write
    direct: set[int] = set()
    written = []

    def spy_open(path, flags, *args, **kwargs):
        if flags & os.O_DIRECT and refuse == "open":
            raise OSError(22, "Invalid argument")
        fd = real_open(path, flags, *args, **kwargs)
        if flags & os.O_DIRECT:
            direct.add(fd)
        return fd

    def spy_write(fd, data):
        if fd in direct:
            if refuse == "write":
                raise OSError(22, "Invalid argument")
            written.append(len(data))
        return real_write(fd, data)

    fds = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    monkeypatch.setattr(workers.os, "open", spy_open)
    monkeypatch.setattr(workers.os, "write", spy_write)
    rng = np.random.default_rng(5)
    arrays = {
        "big": rng.standard_normal((700, 700)),
        "small": rng.standard_normal((3, 3)),
        "block": rng.standard_normal(512),
        "ramp": np.arange(40000.0).reshape(200, 200),
    }
    roots = {"flushing": tmp_path / "f.zarr", "plain": tmp_path / "p.zarr"}
    for kind, root in roots.items():
        store = workers.FlushingStore(root) if kind == "flushing" else str(root)
        group = zarr.open_group(store, mode="w")
        for name, a in arrays.items():
            chunks = (350, 350) if name == "big" else a.shape
            codecs = None if name == "block" else COMPRESSORS  # 4096 bytes exactly
            group.create_array(
                name, shape=a.shape, chunks=chunks, dtype="float64", compressors=codecs
            )[...] = a
    files = (p.relative_to(roots["plain"]) for p in roots["plain"].rglob("*") if p.is_file())
    chunks = [rel for rel in files if "c" in rel.parts]  # chunk keys: <array>/c/<i>/<j>
    assert len(chunks) >= 7
    sizes = set()
    for rel in chunks:
        ours, theirs = (roots[k] / rel for k in ("flushing", "plain"))
        assert ours.read_bytes() == theirs.read_bytes(), rel
        sizes.add(ours.stat().st_size % 4096 == 0)
    assert sizes == {True, False}
    assert not list(roots["flushing"].rglob("*.partial"))
    assert fds is None or len(os.listdir("/proc/self/fd")) == fds  # every file closed
    if refuse is None and _takes_o_direct(tmp_path):
        assert len(written) >= 7 and all(n % 4096 == 0 for n in written)
    else:
        assert not written


def test_a_failed_flush_keeps_the_old_tile_and_leaves_no_debris(tmp_path, monkeypatch):
    """A write that fails on its way to disk raises, and the chunk keeps its previous value:
    the temporary file is removed, never renamed into place. A file system that cannot flush
    at all (EINVAL, as some FUSE mounts answer) still gets the chunk."""
    from nngp_dist import workers

    old = np.random.default_rng(4).standard_normal((60, 60))
    group = zarr.open_group(workers.FlushingStore(tmp_path / "s.zarr"), mode="w")
    arr = group.create_array("k", shape=old.shape, chunks=old.shape, dtype="float64")
    arr[...] = old

    def failing(code, words):
        def flush(*args):
            raise OSError(code, words)

        return flush

    for name in ("fdatasync", "fsync"):
        monkeypatch.setattr(workers.os, name, failing(28, "No space left on device"), raising=False)
    with pytest.raises(OSError, match="No space left"):
        arr[...] = 2 * old
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "s.zarr" / "k"))[...], old)
    assert not list((tmp_path / "s.zarr").rglob("*.partial"))
    for name in ("fdatasync", "fsync"):
        monkeypatch.setattr(workers.os, name, failing(22, "Invalid argument"), raising=False)
    arr[...] = 3 * old
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "s.zarr" / "k"))[...], 3 * old)
    if not hasattr(os, "O_DIRECT") or not _takes_o_direct(tmp_path):
        return
    # A full disk met by the O_DIRECT write itself, not by the flush.
    monkeypatch.setattr(workers.os, "write", failing(28, "No space left on device"))
    with pytest.raises(OSError, match="No space left"):
        arr[...] = 4 * old
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "s.zarr" / "k"))[...], 3 * old)
    assert not list((tmp_path / "s.zarr").rglob("*.partial"))


def test_temporary_files_of_killed_writes_are_removed_when_a_writer_opens(tmp_path, small_npz):
    """A SIGKILL between an atomic write and its rename leaves ``<chunk>.<hex>.partial``:
    never data, removed when the store is next opened for writing (not when read)."""
    run(tmp_path / "k.zarr", small_npz, tile_size=8)
    left = [
        tmp_path / "k.zarr" / "tiles" / "k_train_train" / "c" / "0" / "1.5f3e.partial",
        tmp_path / "k.zarr" / "k_train_train" / "c" / "0" / "0.77aa.partial",
    ]
    for p in left:
        p.write_bytes(b"half a chunk")
    KernelStore.open(str(tmp_path / "k.zarr"))
    assert all(p.exists() for p in left)  # a reader changes nothing
    KernelStore.open(str(tmp_path / "k.zarr"), "r+")
    assert not list((tmp_path / "k.zarr").rglob("*.partial"))
    run(tmp_path / "k.zarr", small_npz, tile_size=8)  # still a complete, valid store
    assert KernelStore.open(str(tmp_path / "k.zarr")).status()["stage"] == "kernel-done"
