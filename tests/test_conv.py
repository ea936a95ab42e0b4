"""ConvNet GP and ResNet GP kernels against wide random CNNs, the dense kernel, and themselves
tiled; the CLI and store path for image networks."""

import os
import subprocess
import sys

import numpy as np
import pytest
import zarr

from nngp_dist.kernels import Spec

from . import reference

RELU = (lambda z: np.maximum(z, 0.0), lambda z: (z > 0).astype(float))
ERF = (
    lambda z: __import__("scipy.special").special.erf(z),
    lambda z: 2 / np.sqrt(np.pi) * np.exp(-z * z),
)


def conv_ops(depth, k=3, stride=1, dilation=1, padding="same", skip_every=0, readout="flatten"):
    """The finite-network description of Spec(arch="conv", ...): the same layer order."""
    c = ("conv", k, stride, dilation, padding)
    if not skip_every:
        return [c, ("phi",)] * depth + [(readout,)]
    ops, pairs = [c], depth - 1
    for start in range(0, pairs, skip_every):
        n = min(skip_every, pairs - start)
        block = [("phi",), c] * n
        ops += [("residual", block, None)] if n == skip_every else block
    return ops + [("phi",), (readout,)]


def resnet_ops(blocks_per_stage):
    c3 = ("conv", 3, 1, 1, "same")
    ops = [c3]
    for stride in (1, 2, 2):
        for blk in range(blocks_per_stage):
            s = stride if blk == 0 else 1
            block = [("phi",), ("conv", 3, s, 1, "same"), ("phi",), c3]
            short = [("conv", 1, s, 1, "same")] if blk == 0 else None
            ops.append(("residual", block, short))
    return ops + [("phi",), ("flatten",)]


CASES = {
    "relu-3x3-same": ({"depth": 2}, RELU, "relu"),
    "erf-stride-dilation-valid": (
        {"depth": 2, "stride": 2, "dilation": 2, "padding": "valid", "filter_size": 2},
        ERF,
        "erf",
    ),
    "relu-residual": ({"depth": 3, "skip_every": 1}, RELU, "relu"),
    "relu-gap": ({"depth": 2, "readout": "gap"}, RELU, "relu"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_conv_kernels_match_wide_random_cnns(case):
    kw, (phi, dphi), name = CASES[case]
    rng = np.random.default_rng(7)
    shape = (9, 8, 2)
    x = rng.standard_normal((4, *shape)) * 0.8
    w_var, b_var = 1.7, 0.2
    ops = conv_ops(
        kw["depth"],
        kw.get("filter_size", 3),
        kw.get("stride", 1),
        kw.get("dilation", 1),
        kw.get("padding", "same"),
        kw.get("skip_every", 0),
        kw.get("readout", "flatten"),
    )
    nngp_mc, ntk_mc = reference.monte_carlo_conv_kernels(
        x, ops, phi, dphi, w_var, b_var, width=192, nets=6
    )
    flat = x.reshape(len(x), -1)
    for kind, mc in (("nngp", nngp_mc), ("ntk", ntk_mc)):
        spec = Spec(
            arch="conv",
            weight_var=w_var,
            bias_var=b_var,
            activation=name,
            kernel=kind,
            image_shape=shape,
            **kw,
        )
        k = spec.cross(flat, flat)
        np.testing.assert_allclose(k, mc, atol=0.03 * np.abs(mc).max(), rtol=0.05)
        np.testing.assert_allclose(np.diag(k), spec.diag(flat), rtol=1e-12)


def test_resnet_gp_matches_a_wide_random_resnet():
    """The resnet32 layer order with one block per stage (the preset has five) against finite
    networks of that order; the preset itself is checked for shape and consistency below. The
    NNGP from wide networks (forward passes only); the NTK from narrower ones, whose Monte
    Carlo error through 10 layers is about 10%, so only to 20% (the NTK of residual, strided
    and projection layers is checked tightly in the cases above)."""
    from nngp_dist.kernels import architectures

    rng = np.random.default_rng(8)
    shape = (8, 8, 1)
    x = rng.standard_normal((3, *shape))
    flat = x.reshape(3, -1)
    nngp_mc, _ = reference.monte_carlo_conv_kernels(
        x, resnet_ops(1), *RELU, 1.0, 0.0, width=512, nets=12, ntk=False
    )
    _, ntk_mc = reference.monte_carlo_conv_kernels(
        x, resnet_ops(1), *RELU, 1.0, 0.0, width=128, nets=4, seed=1
    )
    for kind, mc, tol in (("nngp", nngp_mc, 0.05), ("ntk", ntk_mc, 0.2)):
        spec = Spec(arch="resnet32", image_shape=shape, kernel=kind)
        program = architectures.resnet32(1.0, 0.0, spec.activation, blocks_per_stage=1)
        k = _evaluate(spec, program.layers, flat)
        np.testing.assert_allclose(k, mc, atol=tol * np.abs(mc).max(), rtol=tol)


def _evaluate(spec, layers, flat):
    from nngp_dist.kernels.conv import conv_input_state

    state = conv_input_state(flat, flat, spec.image_shape)
    state = state.replace(ntk=0.0 if spec.kernel == "ntk" else None)
    for layer in layers:
        state = layer(state)
    state = spec.program.readout.layer()(state)
    return state.ntk if spec.kernel == "ntk" else state.nngp


def test_conv_equals_dense_when_the_filter_covers_the_image():
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((5, 32)), rng.standard_normal((3, 32))
    for kind in ("nngp", "ntk"):
        fc = Spec(depth=1, weight_var=1.7, bias_var=0.3, kernel=kind)
        cv = Spec(
            arch="conv",
            depth=1,
            weight_var=1.7,
            bias_var=0.3,
            kernel=kind,
            filter_size=4,
            padding="valid",
            image_shape=(4, 4, 2),
        )
        np.testing.assert_allclose(cv.cross(x, y), fc.cross(x, y), rtol=1e-13)
        np.testing.assert_allclose(cv.diag(x), fc.diag(x), rtol=1e-13)


@pytest.mark.parametrize("readout", ["flatten", "gap"])
def test_blocked_equals_unblocked_and_depths_from_one_pass(monkeypatch, readout):
    import nngp_dist.kernels.spec as spec_module

    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((7, 75)), rng.standard_normal((5, 75))
    spec = Spec(
        arch="conv",
        depth=3,
        weight_var=1.5,
        bias_var=0.1,
        image_shape=(5, 5, 3),
        readout=readout,
        kernel="ntk",
    )
    whole = spec.cross(x, y, depths=[0, 1, 3])
    monkeypatch.setattr(spec_module.fused, "applies", lambda spec: False)  # layer by layer
    monkeypatch.setitem(spec_module.CONV_BLOCK_ENTRIES, "numpy", 1)  # one pair per block
    np.testing.assert_allclose(spec.cross(x, y, depths=[0, 1, 3]), whole, rtol=1e-13)
    for k, depth in enumerate([0, 1, 3]):
        single = Spec(
            arch="conv",
            depth=depth,
            weight_var=1.5,
            bias_var=0.1,
            image_shape=(5, 5, 3),
            readout=readout,
            kernel="ntk",
        )
        np.testing.assert_allclose(single.cross(x, y), whole[k], rtol=1e-12)


GEOMETRIES = {
    "3x3-same": {"filter_size": 3},
    "3x3-valid": {"filter_size": 3, "padding": "valid"},
    "3x3-same-stride-2": {"filter_size": 3, "stride": 2},
    "2x2-valid-dilation-2": {"filter_size": 2, "dilation": 2, "padding": "valid"},
    "2x2-valid-stride-2": {"filter_size": 2, "stride": 2, "padding": "valid"},
    "5x5-same-dilation-2": {"filter_size": 5, "dilation": 2},
}


@pytest.mark.parametrize("kind", ["nngp", "ntk"])
@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_compiled_conv_loop_equals_layer_by_layer(monkeypatch, geometry, kind):
    """The compiled ConvNet loop (kernels.fused) against the layer-by-layer recursion, for
    each padding, stride and dilation, ReLU and leaky ReLU, with and without biases, at several
    depths from one pass, on pairs that are random, identical, negated, and zero images."""
    import nngp_dist.kernels.spec as spec_module

    rng = np.random.default_rng(13)
    x1 = rng.standard_normal((6, 13 * 12 * 2))
    x2 = np.concatenate([x1[:2], -x1[2:3], rng.standard_normal((4, x1.shape[1]))])
    x1[-1] = 0.0
    for activation, b_var in (("relu", 0.0), ("leaky_relu:0.2", 0.1)):
        spec = Spec(
            arch="conv",
            depth=3,
            weight_var=1.7,
            bias_var=b_var,
            activation=activation,
            kernel=kind,
            image_shape=(13, 12, 2),
            **GEOMETRIES[geometry],
        )
        assert spec_module.fused.applies(spec)
        got = spec.cross(x1, x2, depths=[0, 1, 3])
        with monkeypatch.context() as m:
            m.setattr(spec_module.fused, "applies", lambda spec: False)
            want = spec.cross(x1, x2, depths=[0, 1, 3])
        # Identical and negated images too: both forms keep rho exactly +-1 at every pixel
        # there (an NTK rounding rho would be off by ~1e-8 through arccos).
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


RESIDUAL = {
    "skip-1-leaky": {"depth": 3, "skip_every": 1, "activation": "leaky_relu:0.2"},
    "skip-2-partial-block": {"depth": 4, "skip_every": 2},  # 3 pairs: a block of 2, then 1
    "resnet32": {"arch": "resnet32"},
}


@pytest.mark.parametrize("kind", ["nngp", "ntk"])
@pytest.mark.parametrize("net", sorted(RESIDUAL))
def test_compiled_loop_runs_residual_nets_and_resnet32(monkeypatch, net, kind):
    """The compiled loop's program for residual nets (identity and 1x1 projection shortcuts,
    strided stages, a trailing partial block) against the layer-by-layer recursion on distinct
    images, and against the diagonal recursion on an image paired with itself."""
    import nngp_dist.kernels.spec as spec_module

    rng = np.random.default_rng(17)
    x1 = rng.standard_normal((4, 8 * 8 * 2))
    x2 = np.concatenate([x1[:1], -x1[1:2], rng.standard_normal((3, x1.shape[1]))])
    x1[-1] = 0.0
    kw = {
        "arch": "conv",
        "weight_var": 1.6,
        "bias_var": 0.1,
        "kernel": kind,
        "image_shape": (8, 8, 2),
        **RESIDUAL[net],
    }
    spec = Spec(**kw)
    with monkeypatch.context() as m:
        m.setattr(spec_module.fused, "applies", lambda spec: False)
        want = spec.cross(x1, x2)
    assert spec_module.fused.applies(spec)
    got = spec.cross(x1, x2)
    np.testing.assert_allclose(got[:, 1:], want[:, 1:], rtol=1e-12, atol=1e-15)
    # Image 0 with itself: the layer-by-layer cross form drifts from rho = 1 by rounding in
    # residual nets (~1e-10 in the NTK); the compiled loop keeps rho = 1 exactly, as the
    # diagonal recursion does.
    np.testing.assert_allclose(got[0, 0], spec.diag(x1[:1])[0], rtol=1e-14)
    np.testing.assert_allclose(got[0, 0], want[0, 0], rtol=1e-9)
    # A set with itself (a diagonal tile): half the pairs, mirrored; its diagonal is the
    # diagonal recursion's.
    both = np.concatenate([x1, x2[1:]])
    sym = spec.cross(both, both)
    assert (sym == sym.T).all()
    off = ~np.eye(len(both), dtype=bool)
    with monkeypatch.context() as m:
        m.setattr(spec_module.fused, "applies", lambda spec: False)
        np.testing.assert_allclose(
            sym[off], spec.cross(both, both.copy())[off], rtol=1e-12, atol=1e-15
        )
    np.testing.assert_allclose(np.diag(sym), spec.diag(both), rtol=1e-14)


def test_compiled_conv_loop_only_where_it_applies():
    from nngp_dist.kernels import fused

    conv = {"arch": "conv", "image_shape": (6, 6, 1)}
    assert fused.applies(Spec(**conv))
    assert fused.applies(Spec(**conv, depth=1, skip_every=1))
    assert fused.applies(Spec(**conv, skip_every=1))
    assert fused.applies(Spec(arch="resnet32", image_shape=(8, 8, 1)))
    assert not fused.applies(Spec(**conv, readout="gap"))
    assert not fused.applies(Spec(**conv, activation="erf"))
    # both paths refuse a strided residual block without a projection shortcut
    strided = Spec(**conv, depth=3, skip_every=2, stride=2)
    with pytest.raises(ValueError, match="needs a projection shortcut"):
        strided.cross(np.ones((1, 36)), np.ones((1, 36)))


def test_resnet32_preset_shape_and_symmetry():
    spec = Spec(arch="resnet32", image_shape=(8, 8, 1))
    assert "depth" not in spec.to_dict() and spec.to_dict()["image_shape"] == [8, 8, 1]
    convs = sum(1 for layer in spec.layers() for _ in [layer])  # 1 conv + 15 blocks + phi
    assert convs == 17
    x = np.random.default_rng(4).standard_normal((4, 64))
    k = spec.cross(x, x)
    np.testing.assert_allclose(k, k.T, rtol=1e-12)
    np.testing.assert_allclose(np.diag(k), spec.diag(x), rtol=1e-12)
    assert np.linalg.eigvalsh(k).min() > 0


def test_one_program_per_spec_which_every_path_reads():
    """A spec's network is built once, as a program (kernels.program): the layers, the
    compiled loops' lowering and the cost model all come from it; it is not shipped with the
    spec to workers."""
    import cloudpickle

    from nngp_dist.kernels.lowering import ConvProgram
    from nngp_dist.kernels.program import Residual

    spec = Spec(arch="resnet32", image_shape=(8, 8, 1))
    program = spec.program
    assert spec.program is program and spec.layers() == list(program.layers)
    blocks = [op for op in program.ops if isinstance(op, Residual)]
    assert len(blocks) == 15 and sum(op.shortcut is not None for op in blocks) == 3
    lowered = ConvProgram.of(program, {spec.depth: 0})
    assert len(lowered.ops) == 1 + 15 * 5 + 3 + 1 + 1  # + projections, last phi, the tap
    assert spec.map_entries_per_pair() == program.map_entries()
    clone = cloudpickle.loads(cloudpickle.dumps(spec))
    assert clone == spec and "program" not in clone.__dict__


@pytest.mark.parametrize(
    "kw, entries, tile",
    [
        ({"depth": 3}, 7, None),
        ({"arch": "conv", "depth": 8, "image_shape": (28, 28, 1)}, 12544, 408),
        ({"arch": "resnet32", "image_shape": (28, 28, 1)}, 22148, 304),
        ({"arch": "resnet32", "image_shape": (32, 32, 3)}, 28928, 272),
        ({"arch": "conv", "depth": 2, "readout": "gap", "image_shape": (28, 28, 1)}, 2458624, 24),
        (
            {
                "arch": "conv",
                "depth": 3,
                "skip_every": 2,
                "stride": 2,
                "filter_size": 2,
                "padding": "valid",
                "image_shape": (13, 12, 2),
            },
            92,
            2048,
        ),
    ],
)
def test_cost_model_is_unchanged(kw, entries, tile):
    """The cost model sets an image store's default tile size, part of the store's identity:
    pinned to the values of the formula the program's cost model replaced."""
    from nngp_dist.tiling import image_tile_size

    spec = Spec(**kw)
    assert spec.map_entries_per_pair() == entries
    if tile is not None:
        assert image_tile_size(spec, 2048) == tile


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"filter_size": 0}, "filter size"),
        ({"padding": "full"}, "padding"),
        ({"readout": "max"}, "readout"),
        ({"skip_every": -1}, "skip_every"),
        ({"image_shape": (3, 3)}, "image_shape"),
    ],
)
def test_bad_conv_specs(kw, message):
    with pytest.raises(ValueError, match=message):
        Spec(arch="conv", **kw)


def test_valid_filter_too_large_and_strided_identity_skip_fail_clearly():
    x = np.ones((2, 16))
    with pytest.raises(ValueError, match="does not fit"):
        Spec(arch="conv", depth=3, filter_size=3, padding="valid", image_shape=(4, 4, 1)).cross(
            x, x
        )
    with pytest.raises(ValueError, match="projection shortcut"):
        Spec(arch="conv", depth=3, stride=2, skip_every=1, image_shape=(4, 4, 1)).cross(x, x)


def test_reference_cnn_backprop_matches_finite_differences():
    """The Monte Carlo oracle's hand-written backprop, checked by central differences."""
    rng = np.random.default_rng(1)
    ops = [
        ("conv", 3, 1, 1, "same"),
        ("phi",),
        (
            "residual",
            [("phi",), ("conv", 3, 2, 1, "same"), ("phi",), ("conv", 3, 1, 1, "same")],
            [("conv", 1, 2, 1, "same")],
        ),
        ("phi",),
        ("gap",),
    ]
    for ops_, shape in ((ops, (5, 5, 2)), (conv_ops(2, 2, 2, 2, "valid"), (7, 8, 2))):
        x = rng.standard_normal((3, *shape))
        net = reference.FiniteConvNet(
            rng, ops_, 2, 3, np.tanh, lambda z: 1 - np.tanh(z) ** 2, 1.3, 0.2
        )
        np.testing.assert_allclose(net.ntk(x), net.output_fd(x), rtol=1e-6, atol=1e-8)


def test_cli_conv_store_is_tiled_exactly_and_records_the_image_shape(tmp_path):
    from click.testing import CliRunner

    from nngp_dist import datasets, open_store
    from nngp_dist.cli import main

    store = tmp_path / "cnn.zarr"
    args = [
        "kernel",
        "--dataset",
        "demo",
        "--store",
        str(store),
        "--arch",
        "conv",
        "--depth",
        "2",
        "--filter-size",
        "5",
        "--stride",
        "2",
        "--train-size",
        "70",
        "--test-size",
        "20",
        "--tile-size",
        "32",
        "--kernel",
        "ntk",
        "--scheduler",
        "synchronous",
        "--quiet",
    ]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    ds = open_store(str(store))
    spec = Spec.from_dict(ds.attrs["nngp_dist"]["spec"])
    assert spec.image_shape == (28, 28, 1) and spec.stride == 2 and spec.kernel == "ntk"
    data = datasets.load("demo", train_size=70, test_size=20)
    x, xs = data.x_train.reshape(70, -1), data.x_test.reshape(20, -1)
    k = ds.k_train_train.values
    off = ~np.eye(70, dtype=bool)  # the stored diagonal is the diagonal recursion's (below)
    np.testing.assert_allclose(k[off], spec.cross(x, x)[off], rtol=1e-12)
    np.testing.assert_allclose(np.diag(k), spec.diag(x), rtol=1e-13)
    np.testing.assert_allclose(ds.k_test_train.values, spec.cross(xs, x), rtol=1e-12)
    np.testing.assert_allclose(ds.k_test_diag.values, spec.diag(xs), rtol=1e-12)
    res = CliRunner().invoke(main, ["status", "--store", str(store)])
    assert res.exit_code == 0 and "conv depth 2 5x5 stride 2" in res.output, res.output


def test_cli_conv_needs_images_and_checks_geometry_before_writing(tmp_path):
    from click.testing import CliRunner

    from nngp_dist.cli import main

    flat = tmp_path / "flat.npz"
    rng = np.random.default_rng(0)
    np.savez(
        flat,
        x_train=rng.random((10, 12)),
        y_train=np.arange(10) % 2,
        x_test=rng.random((3, 12)),
        y_test=np.arange(3) % 2,
    )
    for extra, message in (
        ([f"npz:{flat}", "--arch", "conv"], "images"),
        (
            ["demo", "--arch", "conv", "--depth", "9", "--padding", "valid", "--filter-size", "5"],
            "does not fit",
        ),
        (["demo", "--arch", "conv", "--stride", "2", "--skip-every", "1"], "projection"),
        (["demo", "--filter-size", "5"], "--filter-size does not apply to --arch fc"),
        (["demo", "--readout", "gap", "--padding", "same"], "--padding, --readout do not apply"),
        (["demo", "--arch", "resnet32", "--depth", "3"], "--depth does not apply"),
    ):
        store = tmp_path / "s.zarr"
        res = CliRunner().invoke(
            main,
            [
                "kernel",
                "--dataset",
                *extra,
                "--store",
                str(store),
                "--train-size",
                "20",
                "--test-size",
                "5",
            ],
        )
        assert res.exit_code == 2 and message in res.output, res.output
        assert not store.exists()


# neural-tangents 0.6.5 (jax 0.4.23, float64), an independent implementation, on
# x = default_rng(11).standard_normal((3, 6, 5, 2)): stax.Conv(64, (k, k), strides, padding,
# W_std=sqrt(1.7), b_std=sqrt(0.2)) + Relu, twice, then Flatten or GlobalAvgPool, then
# Dense(1, same stds); kernel_fn(x, x, ("nngp", "ntk")), upper triangle row by row.
NEURAL_TANGENTS = {
    "flatten": (
        {},
        [
            1.0639411313765472,
            0.8678040916055477,
            0.7862650741695859,
            1.3087191755937497,
            0.7631989990661284,
            1.0762742327752648,
        ],
        [
            2.6218233941296414,
            1.429429945606128,
            1.2557143619037656,
            3.356157526781249,
            1.0592729072162168,
            2.6588226983257948,
        ],
    ),
    "gap": (
        {"readout": "gap"},
        [
            0.7067370255594133,
            0.742444735096139,
            0.6908095306692013,
            0.8088357397677776,
            0.7438203657566452,
            0.7016349727425992,
        ],
        [
            1.0430945034700922,
            1.0480737796203077,
            0.9750021599174139,
            1.1778940058915774,
            1.0514177891025742,
            1.0250413633382487,
        ],
    ),
    "stride2-valid-2x2": (
        {"stride": 2, "padding": "valid", "filter_size": 2},
        [
            1.3407896124508645,
            1.0374477756298972,
            0.9562073135809692,
            1.823944641020329,
            0.9526873583380372,
            1.57028995564645,
        ],
        [
            3.4523688373525934,
            1.6240937580470802,
            1.4533598709036037,
            4.9018339230609875,
            1.2259445527264077,
            4.140869865455436,
        ],
    ),
}


@pytest.mark.parametrize("case", sorted(NEURAL_TANGENTS))
def test_against_neural_tangents(case):
    kw, nngp, ntk = NEURAL_TANGENTS[case]
    x = np.random.default_rng(11).standard_normal((3, 6, 5, 2)).reshape(3, -1)
    upper = np.triu_indices(3)
    for kind, ref in (("nngp", nngp), ("ntk", ntk)):
        spec = Spec(
            arch="conv",
            depth=2,
            weight_var=1.7,
            bias_var=0.2,
            image_shape=(6, 5, 2),
            kernel=kind,
            **kw,
        )
        # its NTK diagonal carries arccos(1 - eps) rounding (~1e-10 here)
        np.testing.assert_allclose(spec.cross(x, x)[upper], ref, rtol=1e-9)


@pytest.mark.parametrize("readout", ["flatten", "gap"])
def test_backends_agree_on_conv(xp, readout):
    """The conv recursion on each array namespace (CuPy runs only where a GPU is present)."""
    from nngp_dist.backend import to_host

    x = np.random.default_rng(9).standard_normal((5, 48))
    spec = Spec(
        arch="conv",
        depth=3,
        weight_var=1.6,
        bias_var=0.1,
        image_shape=(4, 4, 3),
        readout=readout,
        skip_every=1,
        kernel="ntk",
    )
    got = to_host(spec.cross(xp.asarray(x), xp.asarray(x[:3])))
    np.testing.assert_allclose(got, spec.cross(x, x[:3]), rtol=1e-10)
    np.testing.assert_allclose(to_host(spec.diag(xp.asarray(x))), spec.diag(x), rtol=1e-10)
    # Each image with itself stays exactly at rho = 1 through every layer (on a GPU the
    # compiler's fused multiply-adds must not move it): the cross form's diagonal is the
    # diagonal recursion's, where the NTK's arccos would turn a rounding into ~1e-8.
    square = to_host(spec.cross(xp.asarray(x), xp.asarray(x)))
    np.testing.assert_allclose(np.diag(square), spec.diag(x), rtol=1e-13)


@pytest.mark.parametrize("method", ["cholesky", "cg"])
def test_image_store_solves_in_blocks_of_several_tiles(tmp_path, client, method):
    """An image net's small kernel tiles are grouped into the solvers' blocks (a multiple of the
    tile nearest the default tile); the factor and the predictions are still exact."""
    import dask.config
    from scipy.linalg import cho_factor, cho_solve

    import nngp_dist
    from nngp_dist import jobs
    from nngp_dist.predict import targets

    store = str(tmp_path / "cnn.zarr")
    with dask.config.set({"nngp-dist.tile-size": 23}):  # 8-row tiles -> 3-tile blocks of 24
        report = jobs.run(
            store,
            dataset="demo",
            arch="conv",
            depth=1,
            tile_size=8,
            train_size=60,
            test_size=10,
            noise=1e-3,
            method=method,
            tol=1e-12,
            client=client,
            progress=False,
        )
    ds = nngp_dist.open_store(store)
    meta = ds.attrs["nngp_dist"]
    assert (meta["tile_size"], meta["solve_block"]) == (8, 24)
    g = zarr.open_group(store, mode="r")
    assert g["alpha"].chunks[0] == 24
    if method == "cholesky":
        assert g["chol"].chunks == (24, 24) and g["tiles/chol"].shape == (3, 3)
    k = ds.k_train_train.values + report["noise_abs"] * np.eye(60)
    y = ds.y_train.values
    t = targets(y, int(max(y.max(), ds.y_test.values.max()) + 1))
    factor = cho_factor(k)
    kt = ds.k_test_train.values
    np.testing.assert_allclose(ds["mean"].values, kt @ cho_solve(factor, t), rtol=1e-8, atol=1e-10)
    var = ds.k_test_diag.values - np.einsum("ij,ji->i", kt, cho_solve(factor, kt.T))
    np.testing.assert_allclose(ds["variance"].values, np.maximum(var, 0), rtol=1e-6, atol=1e-10)


GPU_PROGRAM_CHECK = """
import numpy as np
from nngp_dist.kernels import Spec, fused

rng = np.random.default_rng(5)
x1 = rng.standard_normal((3, 8 * 8 * 2))
x2 = np.concatenate([x1[:1], -x1[1:2], rng.standard_normal((1, 128)), np.zeros((1, 128))])
nets = [({"depth": 3}, "nngp", {0: 0, 1: 1, 3: 2}), ({"depth": 3}, "ntk", {1: 0, 3: 1}),
        ({"depth": 4, "skip_every": 2}, "ntk", None), ({"arch": "resnet32"}, "ntk", None)]
for kw, kind, taps in nets:
    spec = Spec(**{"arch": "conv", "weight_var": 1.6, "bias_var": 0.1, "kernel": kind,
                   "image_shape": (8, 8, 2), **kw})
    taps = taps or {spec.depth: 0}  # residual nets: at full depth only
    for a, b, sym in ((x1, x2, False), (x1, x1, True)):
        want = np.empty((len(taps), len(a), len(b)))
        ntk = spec.kernel == "ntk"
        fused.conv_relu_cross(spec.program, a, b, taps, want, ntk=ntk, symmetric=sym)
        got = np.full_like(want, np.nan)
        assert fused.conv_relu_cross_gpu(spec.program, a, b, taps, got, ntk=ntk, symmetric=sym,
                                         threads=8)
        np.testing.assert_allclose(got, want, rtol=1e-14, atol=1e-15, err_msg=f"{kw} {kind}")
print("ok")
"""


def test_gpu_conv_program_in_the_cuda_simulator():
    """The GPU kernel of the conv program (kernels._gpu_program: a thread block per pair, maps
    in shared memory), run in numba's CUDA simulator on the CPU, against the CPU loop: plain,
    residual and ResNet-32 nets, NNGP and NTK, taps at several depths, pairs of distinct,
    identical, negated and zero images, and a set with itself (half the blocks, mirrored).
    On a GPU machine, the backend tests above run it for real."""
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1"}
    out = subprocess.run(
        [sys.executable, "-c", GPU_PROGRAM_CHECK],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "ok"
