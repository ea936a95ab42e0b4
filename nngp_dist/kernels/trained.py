"""Kernels of trained networks: the empirical NTK of a PyTorch model divided by the prior precision.

For a trained network ``f_w`` (``C`` outputs) with Jacobian ``J(x) = d f_w(x) / d w`` at its
weights, the kernel of output ``c`` is ``kappa_c(x, x') = J_c(x) . J_c(x') / delta``
(docs/science.md, Kernels of trained networks; laplace-torch's ``diagonal_kernel=True``), and
the *trace* kernel is ``sum_c kappa_c``.

What a spec stores. A store holds one kernel per array, so a ``Spec(arch="trained")`` selects
one: ``output="trace"`` (the default) stores ``sum_c kappa_c``, ``output=c`` (an int) stores
``kappa_c``. :func:`per_output_cross` and :func:`per_output_diag` return all ``C`` kernels at
once (one forward and ``C`` backward passes per block of rows), for tests and for the
per-class GPs to come.

The model. ``model`` is either a ``torch.export`` archive (a path ending in ``.pt2``, loaded
with ``torch.export.load(...).module()``) or an importable factory ``"package.module:function"``
returning the ``nn.Module``; ``weights`` (optional) is a ``state_dict`` file loaded with
``torch.load(..., weights_only=True)``, so no pickled code runs. The spec's canonical dict
carries the SHA-256 of the archive (or of the factory's module source file, found without
importing it) and of the weights: a store made with other weights refuses a resume as it
refuses another spec. The hashes are computed once when a spec is made and checked again when a
process loads the model.

Safety. Making a spec (``Spec(...)``, ``Spec.from_dict``) imports and unpickles nothing: the
model is loaded lazily, on the first evaluation in a process, and cached per process. An
archive is evaluable from any spec. A factory imports the user's code, so it is imported only
for a spec made with ``trust=True`` (the caller's explicit choice: ``jobs.kernel(...,
trust_code=True)``); a spec read back from a store is untrusted unless the caller passes
``Spec.from_dict(d, trust=True)``, and evaluating an untrusted factory spec is a
:class:`~nngp_dist.errors.UserError`. ``trust`` is not part of the spec's identity.

Evaluation. The model is converted to float64 and put in evaluation mode (dropout off, batch
norm with its running statistics; a ``.pt2`` archive keeps the mode it was exported in, as
``torch.export`` fixes it). Rows of the inputs are reshaped to ``(n, *input_shape)`` when the
spec has an ``input_shape``. The model's output must be ``(n, C)``.

Structured derivatives (Novak et al. 2022). Forward hooks capture the input ``a`` and output
``z`` of every ``nn.Linear`` and ``nn.Conv2d`` (groups 1, zero padding given as numbers or
"valid") and one backward pass per output ``c`` gives every layer's cotangent ``g_c = d
sum_n f_c(x_n) / d z`` at once (samples are independent in evaluation mode). With ``A`` the
layer's input positions (a Linear's leading dims, a conv's unfolded patches, ``S`` of them) and
``G_c`` the cotangents at those positions, the layer's contribution to ``kappa_c(x, x')`` is

    sum_{p,q} (A_p(x) . A_q(x') + [bias]) (G_{c,p}(x) . G_{c,q}(x'))

evaluated either pair of positions by pair (cost ``S^2 (in + out)`` per pair of inputs) or
through the per-example weight gradient ``G_c^T A`` (cost ``in x out`` per pair), whichever is
cheaper for the layer. Every other module with parameters of its own (BatchNorm and LayerNorm
affine parameters, custom modules) takes the generic path: the per-example Jacobian of the
outputs with respect to that module's parameters by ``torch.func`` (``vmap`` of ``jacrev``
over the whole model), contracted over its parameters. :func:`paths` records the path each
parameterised module took. A ``.pt2`` archive has no module hierarchy to hook (its layers are
graph nodes): its ``aten.linear`` and ``aten.conv2d`` nodes are found in the graph instead
(:class:`Loaded`).

Memory. A tile is processed in blocks of rows: the features of a block (per structured layer
its inputs ``A`` and cotangents ``G_c``, or its per-example weight gradients; per generic module
its per-example Jacobian) are what memory holds, with the pair temporaries of one block of rows
by one block of columns. Blocks are sized so that a block's features, and a pair of blocks'
temporaries, stay under :data:`MEMORY_BUDGET` bytes (measured on one example); the features
of the tile's second input are kept when they fit in twice that budget, else recomputed for
each block of rows. The autograd temporaries of computing a block's features (every captured
layer's input and output, once per output asked and once more, taken twice: 1.6 MB per
example for LeNet-5 with 10 outputs, measured 1.56-1.67 MB) stay under the budget too, which
is what sizes the blocks of a network with large activations (LeNet-5: 167 rows). A worker's
peak is thus about the model and torch (0.75 GB), the tile (C x tile^2 float64 numbers), and
the budgets: kept features 2, a row block's features, its autograd temporaries and a pair's
temporaries 1 each.

A module called more than once per forward pass (weights shared across calls) is refused.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import importlib.machinery
import os
import re
import threading
from typing import Any

import numpy as np

from .. import backend
from ..errors import UserError

__all__ = [
    "MEMORY_BUDGET",
    "check_fields",
    "cross",
    "diag",
    "load",
    "network_outputs",
    "paths",
    "per_output_cross",
    "per_output_diag",
    "spec_dict",
]

MEMORY_BUDGET = 1 << 28  # bytes: a block's features, and a pair of blocks' temporaries
_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_INSTALL = "PyTorch is needed for arch='trained': pip install 'nngp_dist[torch]' (or torch>=2.4)"


def _torch() -> Any:
    try:
        import torch
    except ImportError:
        raise UserError(_INSTALL) from None
    return torch


# --- the spec's fields: checked and hashed without importing anything -------------------------


def is_factory(model: str) -> bool:
    """``model`` names a factory ``module:function`` (else it is a ``.pt2`` archive's path)."""
    return bool(_FACTORY.match(model)) and not model.endswith(".pt2")


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _module_source(name: str) -> str:
    """The source file of module ``name``, found on ``sys.path`` without importing anything
    (no package ``__init__`` runs)."""
    search = None
    spec = None
    parts = name.split(".")
    for i in range(len(parts)):
        spec = importlib.machinery.PathFinder.find_spec(".".join(parts[: i + 1]), search)
        if spec is None:
            raise ValueError(f"model factory {name!r}: no module {'.'.join(parts[: i + 1])!r}")
        search = spec.submodule_search_locations
    if spec is None or not spec.origin or not os.path.isfile(spec.origin):
        raise ValueError(f"model factory {name!r}: the module has no source file")
    return spec.origin


def model_sha256(model: str) -> str:
    """SHA-256 of the model's architecture: the archive, or the factory's module source."""
    if is_factory(model):
        return _sha256_file(_module_source(model.partition(":")[0]))
    return _sha256_file(model)


def check_fields(spec: Any) -> dict:
    """The checked values of a trained spec's fields (the spec sets them); reads the files to
    hash them when the spec does not carry the hashes already, imports nothing."""
    model = spec.model
    if not isinstance(model, str) or not model:
        raise ValueError("arch='trained' needs model: a .pt2 archive or 'module:function'")
    if not is_factory(model):
        if not os.path.isfile(model):
            raise ValueError(
                f"model {model!r} is neither a file (a torch.export .pt2 archive) nor an "
                "importable factory 'module:function'"
            )
        model = os.path.abspath(model)  # the workers' working directory may differ
    weights = spec.weights
    if weights is not None:
        if not os.path.isfile(weights):
            raise ValueError(f"weights {weights!r}: no such file")
        weights = os.path.abspath(weights)
    delta = float(spec.prior_precision)
    if not (delta > 0.0 and np.isfinite(delta)):
        raise ValueError(f"prior_precision must be finite and > 0, got {spec.prior_precision!r}")
    output = spec.output
    if output != "trace":
        if isinstance(output, bool) or not isinstance(output, (int, np.integer)) or output < 0:
            raise ValueError(f"output must be 'trace' or an output index >= 0, got {output!r}")
        output = int(output)
    shape = spec.input_shape
    if shape is not None:
        shape = tuple(int(v) for v in shape)
        if not shape or min(shape) < 1:
            raise ValueError(f"input_shape must be positive sizes, got {spec.input_shape!r}")
    msha = spec.model_sha256 or model_sha256(model)
    wsha = spec.weights_sha256 or (None if weights is None else _sha256_file(weights))
    return {
        "model": model,
        "weights": weights,
        "prior_precision": delta,
        "output": output,
        "input_shape": shape,
        "model_sha256": msha,
        "weights_sha256": wsha,
    }


def spec_dict(spec: Any) -> dict:
    """The canonical dict of a trained spec: the files and their SHA-256s, the prior
    precision, the output stored and the input shape."""
    return {
        "arch": "trained",
        "model": spec.model,
        "model_sha256": spec.model_sha256,
        "weights": spec.weights,
        "weights_sha256": spec.weights_sha256,
        "prior_precision": spec.prior_precision,
        "output": spec.output,
        "input_shape": None if spec.input_shape is None else list(spec.input_shape),
    }


# --- loading, once per process ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Geometry:
    """A structured layer: dense (``conv`` False) or a 2-D convolution's geometry."""

    conv: bool
    bias: bool
    kernel_size: tuple = ()
    stride: tuple = ()
    padding: tuple = ()
    dilation: tuple = ()


class Loaded:
    """A loaded model (float64, evaluation mode) and how each parameterised module is treated.

    An ``nn.Module``: its ``nn.Linear`` and ``nn.Conv2d`` modules are found by type and hooked.
    A ``torch.export`` module (a ``GraphModule`` whose layers are graph nodes): its
    ``aten.linear`` and ``aten.conv2d`` nodes whose weight and bias are the only parameters of
    a submodule, used by that node alone, are found in the graph and captured by running it
    with a ``torch.fx.Interpreter``.
    """

    def __init__(self, model: Any) -> None:
        torch = _torch()
        self.model = model
        self.lock = threading.Lock()  # hooks are per module: one evaluation at a time
        self.structured: dict[str, _Geometry] = {}  # name -> its layer's geometry
        self.modules: dict[str, Any] = {}  # name -> module, for the hooks
        self.nodes: dict[str, str] = {}  # graph node -> name (a torch.export module)
        self.generic: dict[str, Any] = {}  # name -> module with parameters of its own
        # outputs asked -> bytes per example of the autograd temporaries of _features
        self.transient: dict[int, int] = {}
        if isinstance(model, torch.fx.GraphModule):
            for node, (name, geometry) in _graph_layers(torch, model).items():
                self.nodes[node] = name
                self.structured[name] = geometry
        for name, mod in model.named_modules():
            if not list(mod.parameters(recurse=False)) or name in self.structured:
                continue
            geometry = None if self.nodes else _module_geometry(torch, mod)
            if geometry is not None:
                self.structured[name] = geometry
            self.modules[name] = mod
            if geometry is None:
                self.generic[name] = mod
        if not self.structured and not self.generic:
            raise UserError("the model has no parameters: its kernel is zero")
        for p in model.parameters():
            p.requires_grad_(True)

    @property
    def paths(self) -> dict[str, str]:
        return {
            **{n: "structured" for n in self.structured},
            **{n: "generic" for n in self.generic},
        }


def _module_geometry(torch: Any, mod: Any) -> _Geometry | None:
    """A structured layer's geometry, or None for a module of the generic path."""
    nn = torch.nn
    if type(mod) is nn.Linear:
        return _Geometry(False, mod.bias is not None)
    if type(mod) is nn.Conv2d:
        pad = mod.padding
        if mod.groups != 1 or mod.padding_mode != "zeros" or pad == "same":
            return None
        pad = (0, 0) if pad == "valid" else tuple(pad)
        return _Geometry(True, mod.bias is not None, mod.kernel_size, mod.stride, pad, mod.dilation)
    return None


def _graph_layers(torch: Any, gm: Any) -> dict[str, tuple[str, _Geometry]]:
    """Graph node -> (owner module, geometry) for the structured layers of an exported model."""
    aten = torch.ops.aten
    if sum(n.op == "placeholder" for n in gm.graph.nodes) != 1:
        return {}  # captured by running the graph on the one input tensor
    found: dict[str, tuple[str, _Geometry]] = {}
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target not in (aten.linear.default, aten.conv2d.default):
            continue
        conv = n.target is aten.conv2d.default
        args = list(n.args) + [None] * (7 - len(n.args))
        w, b = args[1], args[2] if len(n.args) > 2 else n.kwargs.get("bias")
        attrs = [w] + ([b] if b is not None else [])
        if n.kwargs and set(n.kwargs) != {"bias"}:
            continue
        if any(getattr(t, "op", None) != "get_attr" or len(t.users) != 1 for t in attrs):
            continue
        owners = {t.target.rpartition(".")[0] for t in attrs}
        owner = owners.pop()
        if owners or not owner:
            continue
        own = {f"{owner}.{k}" for k, _ in gm.get_submodule(owner).named_parameters(recurse=False)}
        if own != {t.target for t in attrs} or owner in {o for o, _ in found.values()}:
            continue
        if not conv:
            found[n.name] = (owner, _Geometry(False, b is not None))
            continue
        stride, padding, dilation, groups = (
            args[3] or [1, 1],
            args[4] or [0, 0],
            args[5] or [1, 1],
            args[6] or 1,
        )
        weight = gm.get_parameter(w.target)
        if groups != 1 or weight.ndim != 4:
            continue
        geometry = _Geometry(
            True,
            b is not None,
            tuple(weight.shape[2:]),
            tuple(stride),
            tuple(padding),
            tuple(dilation),
        )
        found[n.name] = (owner, geometry)
    return found


@functools.lru_cache(maxsize=4)
def _load(model: str, weights: str | None, msha: str, wsha: str | None, trust: bool) -> Loaded:
    torch = _torch()
    if model_sha256(model) != msha:
        raise UserError(f"model {model!r} changed since the spec was made (its SHA-256 differs)")
    if weights is not None and _sha256_file(weights) != wsha:
        raise UserError(f"weights {weights!r} changed since the spec was made (SHA-256 differs)")
    if is_factory(model):
        if not trust:
            raise UserError(
                f"the model factory {model!r} would import code: pass trust_code=True to "
                "jobs.kernel (or Spec(..., trust=True), Spec.from_dict(d, trust=True)) if you "
                "trust it"
            )
        mod_name, _, fn_name = model.partition(":")
        try:
            net = getattr(importlib.import_module(mod_name), fn_name)()
        except Exception as e:
            raise UserError(f"model factory {model!r} failed: {type(e).__name__}: {e}") from None
        if not isinstance(net, torch.nn.Module):
            raise UserError(f"model factory {model!r} returned {type(net).__name__}, not a Module")
    else:
        try:
            net = torch.export.load(model).module()
        except Exception as e:
            raise UserError(
                f"model {model!r} is not a torch.export archive ({type(e).__name__}: {e}); save "
                "one with torch.export.save(torch.export.export(model.eval(), (x,)), path)"
            ) from None
    net = net.double()  # before the weights: float64 weights keep their precision
    if weights is not None:
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(
                f"weights {weights!r} cannot be loaded with torch.load(weights_only=True) "
                f"(a pickled checkpoint or module is refused; save model.state_dict()): "
                f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            ) from None
        if not isinstance(state, dict):
            raise UserError(f"weights {weights!r} hold a {type(state).__name__}, not a state_dict")
        try:
            net.load_state_dict(state)
        except Exception as e:
            raise UserError(f"weights {weights!r} do not fit the model: {e}") from None
    net = net.double()
    try:
        net.eval()
    except NotImplementedError:  # an exported module keeps the mode it was exported in
        pass
    return Loaded(net)


def load(spec: Any) -> Loaded:
    """The spec's model, loaded and checked against its hashes once per process."""
    return _load(spec.model, spec.weights, spec.model_sha256, spec.weights_sha256, spec.trust)


def paths(spec: Any) -> dict[str, str]:
    """Module name -> "structured" or "generic": the path each parameterised module takes."""
    return load(spec).paths


# --- features of a block of inputs ------------------------------------------------------------


class _Layer:
    """One structured layer's features for a block: ``A`` (b, S, in) and ``G`` (C', b, S, out),
    or the per-example weight gradients ``M`` (C', b, out * in); ``gb`` (C', b, out): the bias
    cotangents summed over positions (None without bias)."""

    def __init__(self, a: Any, g: Any, gb: Any, grads: bool) -> None:
        self.grads = grads
        if grads:
            torch = _torch()
            c, b, n_s, n_o = g.shape  # per example: (C' out, S) @ (S, in), one batched GEMM
            m = torch.bmm(g.permute(1, 0, 3, 2).reshape(b, c * n_o, n_s), a)
            self.m = m.reshape(b, c, -1).transpose(0, 1)
            self.a = self.g = None
        else:
            self.a, self.g, self.m = a, g, None
        self.gb = gb


def _positions(torch: Any, geo: _Geometry, a: Any) -> tuple[Any, Any]:
    """The layer's input positions (b, S, in) and its output's (b, S, out) layout."""
    b = a.shape[0]
    if geo.conv:
        patches = torch.nn.functional.unfold(
            a, geo.kernel_size, dilation=geo.dilation, padding=geo.padding, stride=geo.stride
        )
        return patches.transpose(1, 2), (lambda g: g.flatten(2).transpose(1, 2))
    return a.reshape(b, -1, a.shape[-1]), (lambda g: g.reshape(len(g), -1, g.shape[-1]))


def _features(loaded: Loaded, x: Any, outputs: list[int] | None) -> tuple[list, Any, int]:
    """Features of the block ``x`` (a float64 tensor) for ``outputs`` (None: all): the
    structured layers' and the generic modules' Jacobian (C', b, P_generic) or None; and C."""
    torch = _torch()
    model = loaded.model
    seen: dict[str, list] = {}
    hooks = []

    def hook(name: str) -> Any:
        def capture(mod: Any, args: tuple, out: Any) -> Any:
            if name in seen:
                raise UserError(
                    f"module {name!r} ({type(mod).__name__}) is called more than once per "
                    "forward pass: weights shared across calls are not supported"
                )
            seen[name] = [args[0].detach().clone() if args else None, out]
            return out.clone() if isinstance(out, torch.Tensor) else out

        return capture

    for name, mod in loaded.modules.items():
        hooks.append(mod.register_forward_hook(hook(name)))
    try:
        with torch.enable_grad():
            y = _run_graph(torch, loaded, x, seen) if loaded.nodes else model(x)
            if not isinstance(y, torch.Tensor) or y.ndim != 2 or y.shape[0] != x.shape[0]:
                shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
                raise UserError(
                    f"the model's output must be (n, C) for n inputs; got {shape} for "
                    f"{x.shape[0]} inputs"
                )
            n_out = y.shape[1]
            outs = list(range(n_out)) if outputs is None else outputs
            if outs and max(outs) >= n_out:
                raise UserError(f"output {max(outs)} asked of a model with {n_out} outputs")
            for name, (_, z) in seen.items():
                if not isinstance(z, torch.Tensor) or not z.requires_grad:
                    raise UserError(
                        f"module {name!r} cannot be differentiated: its output "
                        + (
                            "is not a tensor"
                            if not isinstance(z, torch.Tensor)
                            else "has no gradient (computed under no_grad, or detached)"
                        )
                    )
            if not y.requires_grad:
                raise UserError("the model's output does not depend differentiably on its weights")
            names = [n for n in loaded.structured if n in seen]
            zs = [seen[n][1] for n in names]
            cot = _cotangents(torch, y, zs, outs, names) if zs else []
    finally:
        for h in hooks:
            h.remove()
    raw = sum(seen[n][0][0].numel() + seen[n][1][0].numel() for n in names)
    loaded.transient[len(outs)] = 16 * (len(outs) + 1) * raw
    layers = []
    for name, gs in zip(names, cot, strict=True):
        geo = loaded.structured[name]
        a, layout = _positions(torch, geo, seen[name][0])
        g = layout(gs.flatten(0, 1)).unflatten(0, gs.shape[:2])  # (C', b, S, out)
        s, n_in, n_o = a.shape[1], a.shape[2], g.shape[-1]
        grads = n_in * n_o <= s * s * (n_in + n_o)
        gb = g.sum(2) if geo.bias else None
        layers.append(_Layer(a, g, gb, grads))
    jac = _generic_jacobian(loaded, x, outs) if loaded.generic else None
    return layers, jac, n_out


def _run_graph(torch: Any, loaded: Loaded, x: Any, seen: dict) -> Any:
    """Run an exported model's graph on ``x``, capturing its structured layers' inputs and
    outputs into ``seen`` (as the hooks do for an ``nn.Module``)."""
    from torch.utils import _pytree

    nodes = loaded.nodes

    class Capture(torch.fx.Interpreter):
        def run_node(self, n: Any) -> Any:
            out = super().run_node(n)
            if n.name not in nodes:
                return out
            seen[nodes[n.name]] = [self.env[n.args[0]].detach().clone(), out]
            return out.clone()  # an in-place op downstream must not change the captured output

    gm = loaded.model
    res = Capture(gm).run(x)
    flat = list(res) if isinstance(res, (tuple, list)) else [res]
    spec = getattr(gm, "_out_spec", None)
    if spec is not None:
        return _pytree.tree_unflatten(flat, spec)
    return flat[0] if len(flat) == 1 else res


def _cotangents(torch: Any, y: Any, zs: list, outs: list[int], names: list[str]) -> list:
    """Each layer output's cotangents for the outputs ``outs``: (C', *z.shape) per layer, from
    one batched backward pass (one pass per output where an op has no batching rule)."""
    seed = torch.zeros((len(outs), *y.shape), dtype=y.dtype)
    seed[torch.arange(len(outs)), :, torch.tensor(outs)] = 1.0
    try:
        grads = torch.autograd.grad(
            y, zs, seed, retain_graph=True, allow_unused=True, is_grads_batched=True
        )
    except RuntimeError:
        per = [torch.autograd.grad(y, zs, s, retain_graph=True, allow_unused=True) for s in seed]
        grads = tuple(
            None if any(p[i] is None for p in per) else torch.stack([p[i] for p in per])
            for i in range(len(zs))
        )
    for name, g in zip(names, grads, strict=True):
        if g is None:
            raise UserError(
                f"module {name!r} cannot be differentiated: the output does not depend on it "
                "through autograd (detached?)"
            )
    return [g.detach() for g in grads]


def _generic_jacobian(loaded: Loaded, x: Any, outs: list[int]) -> Any:
    """The per-example Jacobian of the outputs ``outs`` w.r.t. the generic modules'
    parameters: (C', b, P_generic), by ``torch.func`` (vmap of jacrev), module by module."""
    torch = _torch()
    from torch.func import functional_call, jacrev, vmap

    model = loaded.model
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())
    idx = torch.tensor(outs)
    blocks = []
    for name, mod in loaded.generic.items():
        prefix = f"{name}." if name else ""
        own = {prefix + k: v.detach() for k, v in mod.named_parameters(recurse=False)}

        def f(p: dict, xi: Any, own: dict = own) -> Any:
            y = functional_call(model, ({**params, **p}, buffers), (xi[None],))
            return y[0, idx]

        try:
            jac = vmap(jacrev(f), in_dims=(None, 0))(own, x)  # name -> (b, C', *shape)
        except UserError:
            raise
        except Exception as e:
            raise UserError(
                f"module {name!r} ({type(mod).__name__}) cannot be differentiated by torch.func: "
                f"{type(e).__name__}: {e}"
            ) from None
        for v in jac.values():
            blocks.append(v.flatten(2).transpose(0, 1))  # (C', b, P)
    return torch.cat(blocks, dim=2)


# --- contraction --------------------------------------------------------------------------------


def _pair(f1: tuple, f2: tuple) -> Any:
    """(C', n1, n2): the per-output kernels (times delta) between two blocks' features."""
    torch = _torch()
    (l1, j1, _), (l2, j2, _) = f1, f2
    out = None

    def add(t: Any) -> None:
        nonlocal out
        out = t if out is None else out.add_(t)

    for u, v in zip(l1, l2, strict=True):
        if u.grads:
            add(torch.einsum("cnk,cmk->cnm", u.m, v.m))
        else:
            aa = torch.einsum("npi,mqi->nmpq", u.a, v.a)
            add(torch.einsum("cnpo,cmqo,nmpq->cnm", u.g, v.g, aa))
        if u.gb is not None:
            add(torch.einsum("cno,cmo->cnm", u.gb, v.gb))
    if j1 is not None:
        add(torch.einsum("cnk,cmk->cnm", j1, j2))
    return out


def _self(f: tuple) -> Any:
    """(C', n): the per-output kernels (times delta) of each example with itself."""
    torch = _torch()
    layers, jac, _ = f
    out = None

    def add(t: Any) -> None:
        nonlocal out
        out = t if out is None else out.add_(t)

    for u in layers:
        if u.grads:
            add((u.m * u.m).sum(-1))
        else:
            aa = torch.einsum("npi,nqi->npq", u.a, u.a)
            add(torch.einsum("cnpo,cnqo,npq->cn", u.g, u.g, aa))
        if u.gb is not None:
            add((u.gb * u.gb).sum(-1))
    if jac is not None:
        add((jac * jac).sum(-1))
    return out


def _nbytes(f: tuple) -> int:
    layers, jac, _ = f
    total = 0 if jac is None else jac.numel()
    for u in layers:
        for t in (u.a, u.g, u.m, u.gb):
            total += 0 if t is None else t.numel()
    return 8 * total


def _pair_bytes(f: tuple) -> int:
    """Bytes of the pair temporaries per pair of examples."""
    return 8 * max([1] + [u.a.shape[1] ** 2 for u in f[0] if not u.grads])


def _tensor(spec: Any, x: Any) -> Any:
    torch = _torch()
    x = np.ascontiguousarray(backend.to_host(x), dtype=np.float64)
    x = x.reshape(len(x), -1)
    t = torch.from_numpy(x)
    if spec.input_shape is not None:
        t = t.reshape(len(x), *spec.input_shape)
    return t


def _rows(loaded: Loaded, x: Any, outs: list[int] | None) -> tuple[int, int]:
    """Rows per block and the bytes of one example's features, measured on one example. A
    block's features, the temporaries of a pair of blocks, and the autograd temporaries of
    computing a block's features (the cotangents of every captured layer's input and output
    for each output asked, about twice over) each stay within :data:`MEMORY_BUDGET`."""
    one = _features(loaded, x[:1], outs)
    per_row = max(1, _nbytes(one))
    per_pair = _pair_bytes(one) * _count(one)
    transient = max(1, loaded.transient[_count(one)])
    rows = min(
        MEMORY_BUDGET // per_row,
        int(np.sqrt(MEMORY_BUDGET // per_pair)),
        MEMORY_BUDGET // transient,
    )
    return max(1, rows), per_row


def _outputs(spec: Any) -> list[int] | None:
    return None if spec.output == "trace" else [spec.output]


def per_output_cross(spec: Any, x1: Any, x2: Any, *, outputs: list[int] | None = None) -> Any:
    """(C', n1, n2) NumPy float64: ``kappa_c(x1, x2)`` for every output ``c`` of ``outputs``
    (None: all C), in blocks of rows (module docstring, Memory)."""
    torch = _torch()
    loaded = load(spec)
    same = x2 is x1
    t1 = _tensor(spec, x1)
    t2 = t1 if same else _tensor(spec, x2)
    with loaded.lock:
        if len(t1) == 0 or len(t2) == 0:
            return np.zeros((0 if outputs is None else len(outputs), len(t1), len(t2)))
        rows, per_row = _rows(loaded, t1, outputs)
        blocks2 = [(c0, t2[c0 : c0 + rows]) for c0 in range(0, len(t2), rows)]
        keep = len(t2) * per_row <= 2 * MEMORY_BUDGET  # x2's features, for every row block
        cache: dict[int, tuple] = {}
        out = None
        for r0 in range(0, len(t1), rows):
            f1 = _features(loaded, t1[r0 : r0 + rows], outputs)
            if out is None:
                out = np.empty((_count(f1), len(t1), len(t2)))
            for c0, b2 in blocks2:
                if same and c0 == r0:
                    f2 = f1
                elif c0 in cache:
                    f2 = cache[c0]
                else:
                    f2 = _features(loaded, b2, outputs)
                    if keep:
                        cache[c0] = f2
                with torch.no_grad():
                    k = _pair(f1, f2)
                out[:, r0 : r0 + rows, c0 : c0 + len(b2)] = k.numpy()
    out /= spec.prior_precision
    return out


def _count(f: tuple) -> int:
    layers, jac, _ = f
    if layers:
        u = layers[0]
        return (u.m if u.grads else u.g).shape[0]
    return jac.shape[0]


def per_output_diag(spec: Any, x: Any, *, outputs: list[int] | None = None) -> Any:
    """(C', n) NumPy float64: ``kappa_c(x, x)`` for each row of ``x`` and output ``c``."""
    torch = _torch()
    loaded = load(spec)
    t = _tensor(spec, x)
    with loaded.lock:
        rows = _rows(loaded, t, outputs)[0] if len(t) else 1
        parts = []
        for r0 in range(0, len(t), rows):
            f = _features(loaded, t[r0 : r0 + rows], outputs)
            with torch.no_grad():
                parts.append(_self(f).numpy())
    if not parts:
        return np.zeros((0 if outputs is None else len(outputs), 0))
    return np.concatenate(parts, axis=1) / spec.prior_precision


def cross(spec: Any, x1: Any, x2: Any) -> np.ndarray:
    """The stored kernel between the rows of ``x1`` and ``x2``: the trace, or one output."""
    k = per_output_cross(spec, x1, x2, outputs=_outputs(spec))
    return k.sum(axis=0) if spec.output == "trace" else k[0]


def diag(spec: Any, x: Any) -> np.ndarray:
    """The stored kernel's diagonal ``k(x, x)`` for each row of ``x``."""
    k = per_output_diag(spec, x, outputs=_outputs(spec))
    return k.sum(axis=0) if spec.output == "trace" else k[0]


def network_outputs(spec: Any, x: Any, *, jvp: bool = True) -> tuple[np.ndarray, Any]:
    """The network at its weights ``w*``: ``f(x)`` (n, C) and, with ``jvp``, ``J(x) w*`` (n, C),
    its Jacobian applied to its own weights (one forward-mode JVP with the weights as tangent),
    which the transformed targets ``J w* - Lambda^-1 r`` of the Laplace-GP need; NumPy float64,
    in blocks of rows. ``J`` is over every parameter, as the kernel's is."""
    torch = _torch()
    loaded = load(spec)
    model = loaded.model
    t = _tensor(spec, x)
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def f(p: dict, xb: Any) -> Any:
        return torch.func.functional_call(model, (p, buffers), (xb,))

    fs, jws = [], []
    with loaded.lock:
        for r0 in range(0, len(t), 1024):
            xb = t[r0 : r0 + 1024]
            if jvp:
                y, jw = torch.func.jvp(lambda p, xb=xb: f(p, xb), (params,), (params,))
                jws.append(jw.detach().numpy())
            else:
                with torch.no_grad():
                    y = f(params, xb)
            if not isinstance(y, torch.Tensor) or y.ndim != 2:
                raise UserError("the model's output must be (n, C) for n inputs")
            fs.append(y.detach().numpy())
    if not fs:
        return np.zeros((0, 0)), (np.zeros((0, 0)) if jvp else None)
    return np.concatenate(fs), (np.concatenate(jws) if jvp else None)
