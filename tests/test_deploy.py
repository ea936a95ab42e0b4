"""Deployment recipes: the compose file's contract, the Kubernetes and SLURM recipes, and the
plain `dask scheduler` / `dask worker` topology run for real on 127.0.0.1."""

import importlib.util
import json
import os
import py_compile
import re
import shutil
import subprocess
import sys
from pathlib import Path

import dask.config
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
K8S = ROOT / "deploy" / "kubernetes" / "daskcluster.yaml"
SLURM = ROOT / "deploy" / "slurm" / "run_slurm.py"
REQUIREMENTS = ROOT / "deploy" / "requirements.py"


def load_script(path):
    """Import one of deploy/'s scripts as a module, leaving no __pycache__ in deploy/."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    old, sys.dont_write_bytecode = sys.dont_write_bytecode, True
    try:
        spec.loader.exec_module(module)
    finally:
        sys.dont_write_bytecode = old
    return module


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load(COMPOSE.read_text())


def command(service):
    cmd = service.get("command", [])
    return cmd.split() if isinstance(cmd, str) else [str(c) for c in cmd]


def is_gpu(service):
    reservations = service.get("deploy", {}).get("resources", {}).get("reservations", {})
    return any(
        d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", [])
        for d in reservations.get("devices", [])
    )


def cpu_workers(services):
    return {
        name: s
        for name, s in services.items()
        if command(s)[:2] == ["dask", "worker"] and not s.get("profiles")
    }


def test_compose_services_and_gpu_profile(compose):
    services = compose["services"]
    assert command(services["scheduler"])[:2] == ["dask", "scheduler"]
    assert len(cpu_workers(services)) >= 2
    assert "jupyter" in services and not services["jupyter"].get("profiles")
    gpu = {name: s for name, s in services.items() if is_gpu(s)}
    assert list(gpu) == ["gpu-worker"]
    assert services["gpu-worker"]["profiles"] == ["gpu"]
    assert command(services["gpu-worker"])[:3] == ["dask", "cuda", "worker"]
    # Only the GPU worker is optional: a plain `up` starts everything else.
    assert [n for n, s in services.items() if s.get("profiles")] == ["gpu-worker"]
    for name, s in services.items():
        if name != "scheduler":
            assert "scheduler" in s.get("depends_on", {}), name


def test_compose_images(compose):
    services = compose["services"]
    for name, s in services.items():
        dockerfile = ROOT / s["build"]["context"] / s["build"]["dockerfile"]
        assert dockerfile.is_file(), name
        expected = "Dockerfile.cuda" if is_gpu(s) else "Dockerfile"
        assert dockerfile.name == expected, name
        # One knob adds packages to every image (e.g. the GPU image's Dask pin, or s3fs).
        assert s["build"]["args"] == {"EXTRA_PACKAGES": "${NNGP_EXTRA_PACKAGES:-}"}, name
    cpu = (ROOT / "deploy" / "Dockerfile").read_text()
    cuda = (ROOT / "deploy" / "Dockerfile.cuda").read_text()
    assert re.search(r"^FROM python:3\.11-slim AS runtime$", cpu, re.M)
    assert re.search(r"^FROM runtime AS jupyter$", cpu, re.M)
    assert services["jupyter"]["build"]["target"] == "jupyter"
    assert re.search(r"^FROM nvidia/cuda:12\.[\d.]+-runtime-", cuda, re.M)
    for text, extras in ((cpu, ""), (cuda, " gpu")):
        # The dependencies, pinned, in a layer before the code: requirements from pyproject.toml
        # (with the gpu extra's in the GPU image), installed with the constraints ...
        deps = text.index(f"python requirements.py{extras} > requirements.txt")
        assert re.search(r"pip install -r requirements\.txt -c constraints\.txt", text[deps:])
        assert text.index("COPY pyproject.toml deploy/constraints.txt deploy/requirements.py")
        # ... then the code, installed without touching them, and pip check.
        code = text.index("COPY nngp_dist ")
        assert deps < code < text.index("RUN pip install --no-deps . && pip check")
    assert "RUN pip install -c /opt/nngp_dist/constraints.txt jupyterlab" in cpu
    # The files the images install from are in the repository, and in the build context.
    context = (ROOT / ".dockerignore").read_text().splitlines()
    assert "*" in context  # everything else stays out (stores, .git)
    for text in (cpu, cuda):
        for src in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", text, re.M):
            for path in src.split():
                assert (ROOT / path).exists(), path
                assert f"!{path}" in context, path


def constraints():
    pins = {}
    for line in (ROOT / "deploy" / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[canonicalize_name(name)] = Version(version)
    return pins


def test_constraints_pin_what_both_images_install():
    """deploy/constraints.txt pins every requirement of the package and its gpu extra within
    pyproject.toml's ranges, one dask for both images (the one dask-cuda's pin allows), and the
    CUDA release of the GPU image's base. (`deploy/validate.py pins` resolves it for real.)"""
    pins = constraints()
    for line in load_script(REQUIREMENTS).requirements(ROOT / "pyproject.toml", ["gpu"]):
        req = Requirement(line)
        name = canonicalize_name(req.name)
        assert name in pins, f"{name} is not pinned"
        assert req.specifier.contains(pins[name], prereleases=True), (line, pins[name])
    assert pins["dask"] == pins["distributed"]
    # dask-cuda's own pin of dask (rapids-dask-dependency, of dask-cuda's release) is met.
    assert pins["rapids-dask-dependency"].release[:2] == pins["dask-cuda"].release[:2]
    # The base image's CUDA is the CUDA of the pinned runtime wheels.
    cuda = (ROOT / "deploy" / "Dockerfile.cuda").read_text()
    (tag,) = re.findall(r"^FROM nvidia/cuda:(\d+\.\d+)\.\d+-runtime-", cuda, re.M)
    for name in ("cuda-toolkit", "nvidia-cuda-runtime-cu12", "cuda-bindings"):
        assert "{}.{}".format(*pins[name].release) == tag, name


def published_ports(service):
    for p in service.get("ports", []):
        if isinstance(p, dict):
            yield p.get("host_ip"), int(p["published"]), int(p["target"])
        else:
            parts = str(p).split("/")[0].split(":")
            assert len(parts) == 3, f"{p!r} does not name the host interface"
            yield parts[0], int(parts[1]), int(parts[2])


def test_compose_ports_are_published_on_loopback_only(compose):
    services = compose["services"]
    found = {}
    for name, s in services.items():
        for host, published, target in published_ports(s):
            assert host == "127.0.0.1", (name, host)
            found[published] = (name, target)
    assert found == {
        8786: ("scheduler", 8786),
        8787: ("scheduler", 8787),
        8888: ("jupyter", 8888),
    }
    for name, s in cpu_workers(services).items():
        assert "ports" not in s, name


def health_url(service):
    test = service["healthcheck"]["test"]
    m = re.search(r"http://127\.0\.0\.1:(\d+)(/\S*?)'", " ".join(test))
    return int(m.group(1)), m.group(2)


def test_compose_every_service_has_a_healthcheck_on_its_own_port(compose):
    for name, s in compose["services"].items():
        hc = s.get("healthcheck")
        assert hc and hc["test"][0] in ("CMD", "CMD-SHELL") and not hc.get("disable"), name
        port, path = health_url(s)
        cmd = command(s)
        if name == "jupyter":
            assert (port, path) == (8888, "/api")
        else:  # Dask answers /health on the dashboard port given on the command line
            assert path == "/health", name
            assert f":{port}" in cmd[cmd.index("--dashboard-address") + 1], name


def test_compose_shared_store_volume(compose):
    services = compose["services"]
    assert "stores" in compose["volumes"]
    touching = [*cpu_workers(services), "gpu-worker", "jupyter"]
    for name in touching:
        mounts = [v.split(":")[:2] for v in services[name].get("volumes", []) if ":" in v]
        assert ["stores", "/stores"] in mounts, name


def test_compose_tls_is_documented_and_off(compose):
    text = COMPOSE.read_text()
    for name, s in compose["services"].items():
        assert not any("tls" in c for c in command(s)), name
    # The documented flags exist on the Dask CLIs ...
    from distributed.cli.dask_scheduler import main as scheduler_cli
    from distributed.cli.dask_worker import main as worker_cli

    for cli in (scheduler_cli, worker_cli):
        opts = {o for p in cli.params for o in p.opts}
        for flag in ("--tls-ca-file", "--tls-cert", "--tls-key", "--dashboard-address"):
            assert flag in opts
            assert flag in text
    # ... and the documented environment variables are Dask configuration keys.
    names = set(re.findall(r"DASK_DISTRIBUTED__[A-Z_]+(?:__[A-Z_]+)*", text))
    assert len(names) >= 4
    for name in names:
        key = name[len("DASK_") :].lower().replace("__", ".").replace("_", "-")
        if key.endswith("."):  # a prefix in prose, e.g. DASK_DISTRIBUTED__COMM__TLS__...
            continue
        value = dask.config.get(key, default=KeyError)
        assert value is not KeyError, (name, key)


@pytest.mark.parametrize("cli", [["docker-compose"], ["docker", "compose"]], ids=" ".join)
def test_compose_config_validates(cli):
    if shutil.which(cli[0]) is None:
        pytest.skip(f"{cli[0]} is not installed")
    if len(cli) > 1:
        probe = subprocess.run([*cli, "version"], capture_output=True, text=True, timeout=30)
        if probe.returncode != 0:
            reason = (probe.stderr.strip().splitlines() or ["no message"])[0]
            pytest.skip(f"{' '.join(cli)} is not available: {reason}")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NNGP_", "COMPOSE_"))}
    for profile in ([], ["--profile", "gpu"]):
        out = subprocess.run(
            [*cli, "-f", str(COMPOSE), *profile, "config", "-q"],
            cwd=ROOT, capture_output=True, text=True, timeout=60, env=env,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr


def test_kubernetes_daskcluster_parses():
    docs = [d for d in yaml.safe_load_all(K8S.read_text()) if d]
    by_kind = {d["kind"]: d for d in docs}
    assert set(by_kind) == {"DaskCluster", "PersistentVolumeClaim"}
    pvc = by_kind["PersistentVolumeClaim"]
    assert pvc["apiVersion"] == "v1"
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    cluster = by_kind["DaskCluster"]
    assert cluster["apiVersion"] == "kubernetes.dask.org/v1"
    name = cluster["metadata"]["name"]
    spec = cluster["spec"]
    # The operator's required fields: scheduler.spec, scheduler.service, worker.spec.
    service = spec["scheduler"]["service"]
    assert service["selector"] == {
        "dask.org/cluster-name": name,
        "dask.org/component": "scheduler",
    }
    assert {p["port"] for p in service["ports"]} == {8786, 8787}
    assert spec["worker"]["replicas"] >= 1
    for role in ("scheduler", "worker"):
        (container,) = spec[role]["spec"]["containers"]
        assert container["image"].startswith("nngp-dist")
        assert container["args"][:2] == ["dask", role]
    worker = spec["worker"]["spec"]
    (claim,) = [v for v in worker["volumes"] if "persistentVolumeClaim" in v]
    assert claim["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    mounts = worker["containers"][0]["volumeMounts"]
    assert {"name": claim["name"], "mountPath": "/stores"} in mounts
    assert "s3://" in K8S.read_text()


def test_slurm_script_compiles_and_explains_its_dependency(tmp_path, capsys, monkeypatch):
    py_compile.compile(str(SLURM), cfile=str(tmp_path / "run_slurm.pyc"), doraise=True)
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # no __pycache__ in deploy/
    spec = importlib.util.spec_from_file_location("run_slurm", SLURM)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # importable without dask-jobqueue
    args = module.parse_args(["--store", "s.zarr", "--jobs", "3", "--noise", "1e-3,1e-2"])
    assert (args.jobs, args.noise, args.cores) == (3, "1e-3,1e-2", 8)
    if importlib.util.find_spec("dask_jobqueue") is None:
        assert module.main(["--store", str(tmp_path / "s.zarr")]) == 2
        assert "pip install dask-jobqueue" in capsys.readouterr().err
        assert not (tmp_path / "s.zarr").exists()


def nngp_dist_cli():
    script = Path(sys.executable).with_name("nngp-dist")
    return [str(script)] if script.exists() else [sys.executable, "-m", "nngp_dist.cli"]


def test_scheduler_two_workers_and_nngp_dist_run(tmp_path, dask_processes, compose):
    """The compose topology as plain processes: `dask scheduler`, two `dask worker`s of 1 GB,
    `nngp-dist run --scheduler ...`, and the compose health checks against them."""
    address = dask_processes.start(2, worker_args=["--memory-limit", "1GB"])
    store = str(tmp_path / "s.zarr")
    env = {k: v for k, v in os.environ.items() if k != "DASK_SCHEDULER_ADDRESS"}
    run = subprocess.run(
        [*nngp_dist_cli(), "run", "--dataset", "demo", "--train-size", "300", "--test-size",
         "100", "--store", store, "--scheduler", address, "--noise", "1e-3", "--quiet"],
        capture_output=True, text=True, timeout=180, env=env,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr + dask_processes.logs()
    status = subprocess.run(
        [*nngp_dist_cli(), "status", "--store", store, "--json"],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert status.returncode == 0, status.stderr
    st = json.loads(status.stdout)
    assert st["stage"] == "done"
    assert st["tiles_done"] == st["tiles_total"] > 0

    # The health checks of docker-compose.yml, pointed at these processes' dashboards.
    from distributed import Client

    with Client(address, timeout=30) as c:
        workers = c.scheduler_info()["workers"].values()
        worker_ports = [w["services"]["dashboard"] for w in workers]
    services = compose["services"]
    probes = [(services["scheduler"], dask_processes.dashboard_port)]
    probes += [(services["cpu-worker-1"], p) for p in worker_ports]
    for service, port in probes:
        old, _ = health_url(service)
        test = [a.replace(f":{old}/", f":{port}/") for a in service["healthcheck"]["test"][1:]]
        assert test[0] == "python"  # the images' interpreter; here, this one
        probe = subprocess.run([sys.executable, *test[1:]], capture_output=True, text=True,
                               timeout=30)  # fmt: skip
        assert probe.returncode == 0, probe.stderr
