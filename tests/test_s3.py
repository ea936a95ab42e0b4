"""The store on an object store: a real S3-compatible server (moto's, over HTTP on 127.0.0.1),
written by worker processes through s3fs, exactly as on AWS S3 or MinIO."""

import socket
import uuid

import numpy as np
import pytest

import nngp_dist
from nngp_dist import UserError, jobs

moto_server = pytest.importorskip("moto.server", reason="needs moto[server] (the test extra)")
pytest.importorskip("s3fs", reason="needs s3fs (the test extra)")


@pytest.fixture
def s3(monkeypatch):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    for key, value in {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }.items():
        monkeypatch.setenv(key, value)  # read by s3fs in this process and in the workers
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    # moto keeps its buckets for the whole process, whatever server: one bucket per test
    bucket = f"kernels-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem().mkdir(bucket)
    try:
        yield f"s3://{bucket}"
    finally:
        server.stop()
        s3fs.S3FileSystem.clear_instance_cache()


def test_whole_job_on_an_s3_store(s3):
    store = f"{s3}/demo.zarr"
    small = {
        "dataset": "demo",
        "train_size": 200,
        "test_size": 60,
        "tile_size": 64,
        "depth": 2,
        "weight_var": 1.6,
        "bias_var": 0.2,
    }
    report = jobs.run(store, noise=1e-3, workers=2, progress=False, **small)
    assert report["accuracy"] > 0.5
    ds = nngp_dist.open_store(store)
    spec = nngp_dist.Spec(depth=2, weight_var=1.6, bias_var=0.2)
    x, xt = ds.x_train.values, ds.x_test.values
    np.testing.assert_allclose(ds.k_test_train.values, spec.cross(xt, x), rtol=1e-12)
    assert nngp_dist.KernelStore.open(store).status()["stage"] == "done"
    again = jobs.kernel(store, workers=1, progress=False, **small)
    assert again["tiles_computed"] == 0 and again["action"] == "resume"
    with pytest.raises(UserError, match="different run"):
        jobs.kernel(store, workers=1, progress=False, **{**small, "depth": 3})


def test_the_lock_on_an_s3_store(s3):
    """The lease is created exclusively (a conditional PUT, or a check and a read-back), refused
    while its holder is live, and taken over once its heartbeat is a minute old."""
    import json
    import time

    from nngp_dist import lock

    store = f"{s3}/locked.zarr"
    with lock.store_lock(store, "run", heartbeat=0.2) as lease:
        first = lock.holder(store)
        assert first["owner"] == lease["owner"]
        with pytest.raises(UserError, match="in use by another nngp-dist job: 'run'"):
            lock._acquire(store, "kernel")  # another process's attempt, as it would see it
        time.sleep(1.0)
        assert lock.holder(store)["heartbeat"] > first["heartbeat"]
    assert lock.holder(store) is None
    place = lock._Objects(store)
    old = {**first, "owner": "gone", "host": "elsewhere", "heartbeat": time.time() - 120}
    assert place.create(json.dumps(old).encode())
    assert not lock._Objects(store).create(b"{}")  # exclusive
    with lock.store_lock(store, "kernel") as lease:  # stale: taken over
        assert lock.holder(store)["owner"] == lease["owner"] != "gone"
    assert lock.holder(store) is None
