"""Nothing silently wrong: every chunk carries a CRC-32C checked on read, a bad chunk stops the
job naming its array and tile (exit 1), and ``nngp-dist verify [--repair]`` finds every bad
chunk and makes a re-run recompute just those, bitwise as a clean run."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from nngp_dist import KernelStore, jobs
from nngp_dist.errors import CorruptStore
from nngp_dist.layout import CHOL, K_TEST_TRAIN, K_TRAIN_TRAIN, MEAN, PREDICT, VARIANCE, record
from nngp_dist.storage import read_checked

RUN = {
    "dataset": "demo",
    "train_size": 300,
    "test_size": 50,
    "tile_size": 100,
    "depth": 2,
    "weight_var": 1.6,
    "bias_var": 0.2,
    "noise": 1e-3,
    "progress": False,
}


def cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "nngp_dist.cli", *args], capture_output=True, text=True, timeout=300
    )


def chunk(store, name, *coords):
    return os.path.join(store, name, "c", *map(str, coords))


def flip(path, at=100):
    data = bytearray(open(path, "rb").read())
    data[at % len(data)] ^= 0xFF
    open(path, "wb").write(bytes(data))


def truncate(path):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


def test_every_array_of_a_store_ends_in_a_checksum(tmp_path, client):
    store = str(tmp_path / "k.zarr")
    jobs.run(store, client=client, **RUN)
    g = zarr.open_group(store, mode="r")
    names = [p for p, _ in g.arrays()] + [f"tiles/{p}" for p, _ in g["tiles"].arrays()]
    assert {CHOL, MEAN, VARIANCE, K_TRAIN_TRAIN, record(PREDICT)} <= set(names)
    for name in names:
        codecs = g[name].metadata.codecs
        assert isinstance(codecs[-1], Crc32cCodec), (name, codecs)
        if name in (K_TRAIN_TRAIN, K_TEST_TRAIN):
            assert isinstance(codecs[-2], BloscCodec)  # compressed first, then checksummed


def garbage(path):
    open(path, "wb").write(b"not a blosc stream")


def header_only(path):
    data = open(path, "rb").read()
    open(path, "wb").write(data[:8])


@pytest.mark.parametrize("damage", [garbage, header_only])
def test_a_store_without_checksums_is_still_named_not_a_blosc_traceback(tmp_path, damage):
    """A store made before checksums: a chunk that blosc cannot decode is reported by array and
    tile (a flipped bit inside the stream, or a stream cut short, may decode to garbage: what
    the checksums are for)."""
    g = zarr.open_group(str(tmp_path / "old.zarr"), mode="w")
    codecs = (BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),)
    arr = g.create_array(
        "k_train_train", shape=(100, 100), chunks=(50, 50), dtype="f8", compressors=codecs
    )
    arr[...] = np.random.default_rng(0).random((100, 100))
    damage(chunk(str(tmp_path / "old.zarr"), "k_train_train", 1, 0))
    np.testing.assert_array_equal(read_checked(arr, (slice(0, 50), slice(None))), arr[:50])
    with pytest.raises(CorruptStore, match=r"array k_train_train, tile \(1, 0\).*verify --store"):
        read_checked(arr, (slice(50, 100), slice(None)))


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_a_bad_kernel_tile_stops_the_solve_with_exit_1_and_the_repair(tmp_path, damage):
    store = str(tmp_path / "k.zarr")
    kw = {**RUN, "train_size": 120, "test_size": 20, "tile_size": 40}
    jobs.kernel(store, scheduler="synchronous", **{k: v for k, v in kw.items() if k != "noise"})
    path = chunk(store, K_TRAIN_TRAIN, 1, 2)
    {"flip": flip, "truncate": truncate, "delete": os.remove}[damage](path)
    out = cli("solve", "--store", store, "--noise", "1e-3", "--workers", "1", "--quiet")
    assert out.returncode == 1, out.stderr
    assert "array k_train_train, tile (1, 2)" in out.stderr, out.stderr
    assert f"nngp-dist verify --store {store} --repair" in out.stderr
    assert "Traceback" not in out.stderr and "blosc" not in out.stderr.lower()
    why = "missing" if damage == "delete" else "does not decode"
    assert why in out.stderr
    ks = KernelStore.open(store)
    assert ks.status()["stage"] != "solved" and not (ks.meta.get("factor") or {}).get("complete")
    assert len((ks.meta.get("factor") or {}).get("attempts", [])) <= 1  # no noise escalation


def test_verify_finds_every_bad_chunk_and_a_repaired_run_is_bitwise_a_clean_one(tmp_path, client):
    store = str(tmp_path / "k.zarr")
    first = jobs.run(store, client=client, **RUN)
    ks = KernelStore.open(store)
    mean, variance = ks.read(MEAN), ks.read(VARIANCE)
    clean = cli("verify", "--store", store)
    assert clean.returncode == 0 and " 0 bad" in clean.stdout, clean.stdout + clean.stderr
    flip(chunk(store, K_TRAIN_TRAIN, 0, 1))
    flip(chunk(store, CHOL, 1, 2), at=5000)
    truncate(chunk(store, VARIANCE, 1))
    os.remove(chunk(store, K_TEST_TRAIN, 0, 2))
    bad = {
        (K_TRAIN_TRAIN, "(0, 1)", "does not decode"),
        (CHOL, "(1, 2)", "does not decode"),
        (VARIANCE, "(1)", "does not decode"),
        (K_TEST_TRAIN, "(0, 2)", "is missing"),
    }
    out = cli("verify", "--store", store)
    assert out.returncode == 1
    lines = [line for line in out.stdout.splitlines() if line.startswith("bad:")]
    assert len(lines) == len(bad), out.stdout
    for name, tile, why in bad:
        assert any(f"array {name}, tile {tile}: it {why}" in line for line in lines), (name, lines)
    assert f"nngp-dist verify --store {store} --repair" in out.stderr
    report = json.loads(cli("verify", "--store", store, "--json", "-").stdout)
    assert report["rerun"] == ["kernel", "solve", "predict"] and not report["repaired"]
    out = cli("verify", "--store", store, "--repair")
    assert out.returncode == 0, out.stderr
    assert "repaired: re-run" in out.stdout
    after = cli("verify", "--store", store)
    assert after.returncode == 0 and " 0 bad" in after.stdout, after.stdout
    ks = KernelStore.open(store)
    st = ks.status()
    assert st["stage"] == "kernel" and st["tiles_total"] - st["tiles_done"] == 2
    assert st["factor_tiles"] == {"done": 3, "total": 6}  # block row 0 kept, rows 1, 2 redone
    again = jobs.run(store, client=client, **RUN)
    ks = KernelStore.open(store)
    assert ks.status()["stage"] == "done"
    assert np.array_equal(ks.read(MEAN), mean) and np.array_equal(ks.read(VARIANCE), variance)
    assert again["accuracy"] == first["accuracy"]
    assert again["log_marginal_likelihood"] == first["log_marginal_likelihood"]
    assert cli("verify", "--store", store).returncode == 0


def test_a_bad_prediction_block_is_predicted_again_alone(tmp_path, client):
    store = str(tmp_path / "k.zarr")
    jobs.run(store, client=client, **RUN)
    ks = KernelStore.open(store)
    mean, records = ks.read(MEAN), ks.read(record(PREDICT))
    assert len(records) >= 2
    flip(chunk(store, MEAN, 1, 0))
    with pytest.raises(CorruptStore, match=r"array mean, tile \(1, 0\)"):
        jobs.predict(store, client=client, progress=False)
    from nngp_dist.verify import verify

    r = verify(store, repair=True)
    assert [(p["array"], p["tile"]) for p in r["problems"]] == [(MEAN, [1, 0])]
    assert r["rerun"] == ["predict"] and KernelStore.open(store).status()["stage"] == "predict"
    solved = KernelStore.open(store).meta["solve"]
    jobs.run(store, client=client, **RUN)
    ks = KernelStore.open(store)
    assert ks.meta["solve"] == solved  # not solved again
    assert ks.read(record(PREDICT))[0] == records[0]  # the sound block kept
    assert np.array_equal(ks.read(MEAN), mean)


def _indefinite_by(k, md, rows, cols, target):
    """A symmetric perturbation E of k, nonzero in the block (rows, cols) and its mirror,
    scaled (by bisection, with NumPy's eigenvalues as the judge) so that the smallest eigenvalue
    of k + E is ``target * md``."""
    rng = np.random.default_rng(3)
    u = rng.standard_normal((rows.stop - rows.start, cols.stop - cols.start))
    e = np.zeros_like(k)
    e[rows, cols] = u
    e[cols, rows] = u.T
    lo, hi = 0.0, 1.0
    for _ in range(60):
        c = (lo + hi) / 2
        lo, hi = (c, hi) if np.linalg.eigvalsh(k + c * e)[0] > target * md else (lo, c)
    return hi * e


def test_an_escalated_noise_is_loud_on_stderr_and_in_the_report(tmp_path, client, capsys):
    """A kernel tile changed so that K + 1e-3 I is indefinite but K + 1e-2 I is not (NumPy's
    eigenvalues say so): the solve escalates to 1e-2, says so on stderr naming the likely
    causes, and the solve record and the predict report carry it."""
    store = str(tmp_path / "k.zarr")
    kw = {**RUN, "train_size": 120, "test_size": 20, "tile_size": 40}
    jobs.kernel(store, client=client, **{k: v for k, v in kw.items() if k != "noise"})
    g = zarr.open_group(store, mode="r+")
    n, t = 120, 40
    k = np.triu(g[K_TRAIN_TRAIN][...])
    k = k + np.triu(k, 1).T
    md = float(np.mean(np.diag(k)))
    e = _indefinite_by(k, md, slice(0, t), slice(t, 2 * t), -0.005)
    g[K_TRAIN_TRAIN][0:t, t : 2 * t] = g[K_TRAIN_TRAIN][0:t, t : 2 * t] + e[0:t, t : 2 * t]
    bad = k + e
    for noise, pd in ((1e-3, False), (1e-2, True)):
        assert (np.linalg.eigvalsh(bad + noise * md * np.eye(n))[0] > 0) == pd
    capsys.readouterr()
    rec = jobs.solve(store, client=client, noise=1e-3, max_noise=0.1, progress=False)
    err = capsys.readouterr().err
    assert rec["noise"] == pytest.approx(1e-2) and rec["noise_requested"] == 1e-3
    assert "warning:" in err and "escalated to 0.01" in err and "noise 0.001" in err
    assert "corrupt kernel tile" in err and f"nngp-dist verify --store {store}" in err
    assert rec["warnings"] and "escalated to 0.01" in rec["warnings"][0]
    report = jobs.predict(store, client=client, progress=False)
    assert report["warnings"] == rec["warnings"] and report["noise"] == pytest.approx(1e-2)
    # a solve that needs no escalation warns of nothing
    clean = jobs.solve(store, client=client, noise=1e-2, max_noise=0.1, progress=False)
    assert "warnings" not in clean and "warning:" not in capsys.readouterr().err


def test_verify_and_repair_on_an_fsspec_store():
    """The same on an object-store-like file system (fsspec's memory://): chunks are listed,
    read and deleted through the store, not the local disk."""
    import uuid

    import fsspec

    from nngp_dist.verify import verify

    root = f"/verify-{uuid.uuid4().hex}/k.zarr"
    url = f"memory://{root.lstrip('/')}"
    kw = {k: v for k, v in RUN.items() if k != "noise"}
    kw.update(train_size=60, test_size=10, tile_size=20)
    jobs.kernel(url, scheduler="synchronous", **kw)
    expected = np.asarray(zarr.open_group(url, mode="r")[K_TRAIN_TRAIN][0:20, 20:40])
    fs = fsspec.filesystem("memory")
    data = bytearray(fs.cat_file(f"{root}/{K_TRAIN_TRAIN}/c/0/1"))
    data[50] ^= 0xFF
    fs.pipe_file(f"{root}/{K_TRAIN_TRAIN}/c/0/1", bytes(data))
    fs.rm_file(f"{root}/{K_TEST_TRAIN}/c/0/2")
    r = verify(url, repair=True)
    found = sorted((p["array"], p["tile"]) for p in r["problems"])
    assert found == [(K_TEST_TRAIN, [0, 2]), (K_TRAIN_TRAIN, [0, 1])] and r["rerun"] == ["kernel"]
    assert verify(url)["problems"] == []
    assert jobs.kernel(url, scheduler="synchronous", **kw)["tiles_computed"] == 2
    g = zarr.open_group(url, mode="r")
    np.testing.assert_array_equal(g[K_TRAIN_TRAIN][0:20, 20:40], expected)
    fs.rm(root.rsplit("/", 1)[0], recursive=True)


def test_an_image_store_whose_blocks_span_several_tiles_verifies_and_repairs(tmp_path, client):
    """Solver blocks of three kernel tiles: the lower tiles of a diagonal block are never
    written (NaN), which is no fault; a bad factor block is, and its repair is bitwise."""
    import dask.config

    from nngp_dist.verify import verify

    store = str(tmp_path / "cnn.zarr")
    kw = {
        "dataset": "demo",
        "arch": "conv",
        "depth": 1,
        "tile_size": 8,
        "train_size": 60,
        "test_size": 10,
        "noise": 1e-3,
        "progress": False,
    }
    with dask.config.set({"nngp-dist.tile-size": 23}):  # 8-row tiles -> 3-tile blocks of 24
        jobs.run(store, client=client, **kw)
        ks = KernelStore.open(store)
        assert ks.meta["solve_block"] == 24 and np.isnan(ks.array(K_TRAIN_TRAIN)[8:16, 0:8]).all()
        mean, variance = ks.read(MEAN), ks.read(VARIANCE)
        assert verify(store)["problems"] == []
        flip(chunk(store, CHOL, 1, 1), at=777)
        r = verify(store, repair=True)
        assert [(p["array"], p["tile"]) for p in r["problems"]] == [(CHOL, [1, 1])]
        jobs.run(store, client=client, **kw)
    ks = KernelStore.open(store)
    assert np.array_equal(ks.read(MEAN), mean) and np.array_equal(ks.read(VARIANCE), variance)
    assert verify(store)["problems"] == []


@pytest.mark.parametrize("name", [MEAN, VARIANCE])
def test_a_deleted_result_chunk_is_reported_by_a_rerun_not_scored_as_its_fill(tmp_path, name):
    """(Found by the fault campaign: with the predictions recorded done, a re-run scored the
    fill value of a deleted chunk and exited 0.)"""
    store = str(tmp_path / "k.zarr")
    kw = {**RUN, "train_size": 120, "test_size": 20, "tile_size": 40}
    jobs.run(store, scheduler="synchronous", **kw)
    clean = {v: np.asarray(zarr.open_group(store)[v][...]) for v in (MEAN, VARIANCE)}
    os.remove(chunk(store, name, 0, 0) if name == MEAN else chunk(store, name, 0))
    args = ["--dataset", "demo", "--train-size", "120", "--test-size", "20", "--tile-size", "40"]
    arch = ["--depth", "2", "--weight-var", "1.6", "--bias-var", "0.2", "--noise", "1e-3"]
    rerun = ["run", "--store", store, *args, *arch, "--scheduler", "synchronous", "--quiet"]
    out = cli(*rerun)
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"array {name}" in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert f"nngp-dist verify --store {store} --repair" in out.stderr
    assert cli("verify", "--store", store, "--repair").returncode == 0
    assert cli(*rerun).returncode == 0
    g = zarr.open_group(store)
    for v in (MEAN, VARIANCE):
        assert np.array_equal(np.asarray(g[v][...]), clean[v])
