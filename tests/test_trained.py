"""Kernels of trained networks (nngp_dist.kernels.trained) against a full-Jacobian oracle."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

from nngp_dist.errors import UserError  # noqa: E402
from nngp_dist.kernels import Spec, trained  # noqa: E402

# The test nets' factories live in a module the workers can import (tests is a package).
FACTORIES = "tests._trained_nets"


def oracle(model: nn.Module, x1: np.ndarray, x2: np.ndarray, delta: float = 1.0) -> np.ndarray:
    """(C, n1, n2): J_c(x1) . J_c(x2) / delta from the full Jacobian over all parameters."""
    from torch.func import functional_call, jacrev, vmap

    model = model.double().eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def f(p, xi):
        return functional_call(model, (p, buffers), (xi[None],))[0]

    def jac(x):
        j = vmap(jacrev(f), in_dims=(None, 0))(params, torch.as_tensor(x))
        return torch.cat([v.flatten(2) for v in j.values()], dim=2)  # (n, C, P)

    j1, j2 = jac(x1), jac(x2)
    return torch.einsum("ncp,mcp->cnm", j1, j2).numpy() / delta


def _nets():
    from tests import _trained_nets as nets

    return nets


def _factory_spec(name: str, tmp_path, **kw) -> tuple[Spec, nn.Module]:
    nets = _nets()
    torch.manual_seed(0)
    model = getattr(nets, name)()
    path = tmp_path / f"{name}.pt"
    torch.save(model.state_dict(), path)
    spec = Spec(arch="trained", model=f"{FACTORIES}:{name}", weights=str(path), trust=True, **kw)
    return spec, model


def _close(a, b, rtol=1e-10):
    scale = np.abs(b).max()
    assert np.abs(a - b).max() <= rtol * scale, np.abs(a - b).max() / scale


CASES = {
    "mlp_tanh": ((7, 5), None),
    "mlp_relu": ((7, 5), None),
    "cnn": ((5, 2 * 8 * 8), (2, 8, 8)),
    "cnn_nobias_maxpool": ((5, 3 * 9 * 9), (3, 9, 9)),
    "mlp_layernorm": ((6, 5), None),
    "cnn_batchnorm": ((5, 2 * 8 * 8), (2, 8, 8)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_per_output_kernels_match_the_full_jacobian(name, tmp_path):
    (n, d), shape = CASES[name]
    spec, model = _factory_spec(name, tmp_path, input_shape=shape, prior_precision=2.5)
    rng = np.random.default_rng(1)
    x1, x2 = rng.normal(size=(n, d)), rng.normal(size=(n + 2, d))
    shaped = (lambda x: x.reshape(len(x), *shape)) if shape else (lambda x: x)
    want = oracle(model, shaped(x1), shaped(x2), 2.5)
    got = trained.per_output_cross(spec, x1, x2)
    assert got.shape == want.shape
    _close(got, want)
    _close(spec.cross(x1, x2), want.sum(0))
    one = dataclasses.replace(spec, output=1)
    _close(one.cross(x1, x2), want[1])
    d = trained.per_output_diag(spec, x1)
    _close(d, np.einsum("cnn->cn", oracle(model, shaped(x1), shaped(x1), 2.5)))
    _close(spec.diag(x1), np.diag(spec.cross(x1, x1)))


def test_recorded_paths(tmp_path):
    spec, _ = _factory_spec("cnn_batchnorm", tmp_path, input_shape=(2, 8, 8))
    assert trained.paths(spec) == {
        "0": "structured",
        "1": "generic",
        "5": "structured",
    }
    spec, _ = _factory_spec("mlp_layernorm", tmp_path)
    assert trained.paths(spec) == {"0": "structured", "1": "generic", "3": "structured"}


def test_a_tile_is_a_block_of_the_whole_kernel(tmp_path, monkeypatch):
    spec, _ = _factory_spec("cnn", tmp_path, input_shape=(2, 8, 8))
    x = np.random.default_rng(2).normal(size=(9, 128))
    whole = spec.cross(x, x)
    monkeypatch.setattr(trained, "MEMORY_BUDGET", 200_000)  # several blocks of rows per tile
    _close(spec.cross(x[2:7], x[4:9]), whole[2:7, 4:9])
    _close(spec.cross(x, x), whole)
    _close(spec.diag(x), np.diag(whole))


@pytest.mark.parametrize("name", ["mlp_tanh", "cnn_batchnorm", "cnn_nobias_maxpool"])
def test_pt2_archive_and_factory_give_the_same_kernel(tmp_path, name):
    (_, d), shape = CASES[name]
    spec, model = _factory_spec(name, tmp_path, input_shape=shape)
    model = model.double().eval()
    ep = torch.export.export(
        model,
        (torch.zeros(2, *(shape or (d,)), dtype=torch.float64),),
        dynamic_shapes=({0: torch.export.Dim("batch")},),
    )
    path = tmp_path / "m.pt2"
    torch.export.save(ep, path)
    archive = Spec(arch="trained", model=str(path), input_shape=shape)
    x = np.random.default_rng(3).normal(size=(6, d))
    _close(archive.cross(x, x[:4]), spec.cross(x, x[:4]))
    # the graph's linear and conv2d nodes take the structured path, as the modules do
    assert trained.paths(archive) == trained.paths(spec)
    # evaluable from its canonical dict alone: nothing to import
    again = Spec.from_dict(archive.to_dict())
    assert again.hash == archive.hash
    _close(again.diag(x), archive.diag(x))


def test_the_hash_follows_the_weights_and_from_dict_imports_nothing(tmp_path):
    spec, model = _factory_spec("mlp_relu", tmp_path)
    d = spec.to_dict()
    assert d["weights_sha256"] and d["model_sha256"]
    with torch.no_grad():
        model[0].weight[0, 0] += 1e-3
    other = tmp_path / "other.pt"
    torch.save(model.state_dict(), other)
    changed = dataclasses.replace(spec, weights=str(other), weights_sha256=None)
    assert changed.hash != spec.hash
    back = Spec.from_dict(d)  # untrusted: made, hashed, but not evaluable
    assert back.hash == spec.hash and not back.trust
    with pytest.raises(UserError, match="trust"):
        back.cross(np.zeros((1, 5)), np.zeros((1, 5)))
    assert Spec.from_dict(d, trust=True).cross(np.ones((1, 5)), np.ones((1, 5))).shape == (1, 1)


def test_a_changed_weights_file_is_refused_when_loaded(tmp_path):
    spec, model = _factory_spec("mlp_tanh", tmp_path, output=0)
    with torch.no_grad():
        model[0].bias[0] += 1.0
    torch.save(model.state_dict(), spec.weights)
    with pytest.raises(UserError, match="changed"):
        spec.diag(np.zeros((2, 5)))


def test_bad_models_are_refused(tmp_path):
    nets = _nets()
    model = nets.mlp_tanh()
    pickled = tmp_path / "whole.pt"
    torch.save(model, pickled)  # a pickled module, not a state_dict
    spec = Spec(arch="trained", model=f"{FACTORIES}:mlp_tanh", weights=str(pickled), trust=True)
    with pytest.raises(UserError, match="weights_only"):
        spec.diag(np.zeros((1, 5)))
    junk = tmp_path / "junk.pt2"
    junk.write_bytes(b"not a model")
    with pytest.raises(UserError, match="not a torch.export archive"):
        Spec(arch="trained", model=str(junk)).diag(np.zeros((1, 5)))
    with pytest.raises(ValueError, match="neither a file"):
        Spec(arch="trained", model=str(tmp_path / "missing.pt2"))
    with pytest.raises(UserError, match=r"\(n, C\)"):
        Spec(arch="trained", model=f"{FACTORIES}:one_d", trust=True).diag(np.zeros((2, 5)))
    with pytest.raises(UserError, match="'body'"):
        Spec(arch="trained", model=f"{FACTORIES}:no_grad", trust=True).diag(np.zeros((2, 5)))
    with pytest.raises(UserError, match="called more than once"):
        Spec(arch="trained", model=f"{FACTORIES}:shared", trust=True).diag(np.zeros((2, 5)))
    with pytest.raises(UserError, match="outputs"):
        Spec(arch="trained", model=f"{FACTORIES}:mlp_tanh", trust=True, output=7).diag(
            np.zeros((2, 5))
        )


def test_without_torch_a_user_error_says_what_to_install(tmp_path):
    path = tmp_path / "m.pt2"
    path.write_bytes(b"x")
    code = textwrap.dedent(
        f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("blocked")
        sys.meta_path.insert(0, Block())
        import numpy as np
        import nngp_dist
        from nngp_dist.errors import UserError
        from nngp_dist.kernels import Spec
        assert "torch" not in sys.modules
        spec = Spec(arch="trained", model={str(path)!r})
        try:
            spec.diag(np.zeros((1, 1)))
        except UserError as e:
            print(e)
        """
    )
    env = {**os.environ}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert "pip install 'nngp_dist[torch]'" in out.stdout


def test_importing_the_package_does_not_import_torch():
    code = "import sys, nngp_dist, nngp_dist.jobs, nngp_dist.kernels; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


def _job_data(tmp_path):
    from nngp_dist import datasets

    rng = np.random.default_rng(4)
    x_train, x_test = rng.normal(size=(40, 5)), rng.normal(size=(10, 5))
    y_train, y_test = rng.integers(0, 3, 40), rng.integers(0, 3, 10)
    return datasets.from_arrays("tiny", x_train, y_train, x_test, y_test)


@pytest.mark.parametrize("scheduler", ["synchronous", "processes"])
def test_kernel_job_stores_the_oracle_kernel(tmp_path, scheduler):
    from nngp_dist import jobs
    from nngp_dist.layout import K_TEST_DIAG, K_TEST_TRAIN, K_TRAIN_DIAG, K_TRAIN_TRAIN
    from nngp_dist.storage import KernelStore

    spec, model = _factory_spec("mlp_tanh", tmp_path)
    data = _job_data(tmp_path)
    kw = dict(
        dataset=data,
        arch="trained",
        model=spec.model,
        weights=spec.weights,
        prior_precision=0.5,
        tile_size=16,
        trust_code=True,
        progress=False,
    )
    store = str(tmp_path / "k.zarr")
    if scheduler == "synchronous":
        summary = jobs.kernel(store, scheduler="synchronous", **kw)
    else:
        from distributed import Client, LocalCluster

        with (
            LocalCluster(
                n_workers=1, threads_per_worker=2, processes=True, dashboard_address=":0"
            ) as cluster,
            Client(cluster) as client,
        ):
            summary = jobs.kernel(store, client=client, **kw)
    assert summary["tiles_computed"] == summary["tiles_total"] > 1
    ks = KernelStore.open(store)
    want = oracle(model, data.x_train, data.x_train, 0.5).sum(0)
    got = ks.read(K_TRAIN_TRAIN)
    upper = np.triu(np.ones((40, 40), bool))
    for i in range(0, 40, 16):  # upper tiles only
        upper[i + 16 :, i : i + 16] = False
    _close(got[upper], want[upper])
    _close(ks.read(K_TEST_TRAIN), oracle(model, data.x_test, data.x_train, 0.5).sum(0))
    _close(ks.read(K_TRAIN_DIAG), np.diag(want))
    _close(ks.read(K_TEST_DIAG), np.einsum("cnn->n", oracle(model, data.x_test, data.x_test, 0.5)))
    stored = ks.spec.to_dict()  # the store's identity carries the files' hashes
    assert stored["weights_sha256"] == spec.weights_sha256
    assert stored["model_sha256"] == spec.model_sha256
    with pytest.raises(UserError, match="do not apply"):
        jobs.kernel(store, scheduler="synchronous", **{**kw, "arch": "fc"}, dry_run=True)
    # other weights: the store refuses the resume
    with torch.no_grad():
        model[2].weight[0, 0] += 0.1
    torch.save(model.state_dict(), tmp_path / "w2.pt")
    with pytest.raises(UserError):
        jobs.kernel(store, scheduler="synchronous", **{**kw, "weights": str(tmp_path / "w2.pt")})


def test_a_factory_from_a_store_needs_trust(tmp_path):
    from nngp_dist import jobs

    spec, _ = _factory_spec("mlp_tanh", tmp_path)
    kw = dict(dataset=_job_data(tmp_path), arch="trained", model=spec.model, dry_run=True)
    with pytest.raises(UserError, match="trust_code"):
        jobs.kernel(str(tmp_path / "k.zarr"), scheduler="synchronous", **kw)
