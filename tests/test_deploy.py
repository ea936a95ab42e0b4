"""Deployment recipes: the compose file's contract, the Kubernetes and SLURM recipes, and the
plain `dask scheduler` / `dask worker` topology run for real on 127.0.0.1."""

import importlib.util
import json
import os
import py_compile
import re
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
K8S_JOB = ROOT / "deploy" / "kubernetes" / "daskjob.yaml"
K8S_STORES = ROOT / "deploy" / "kubernetes" / "stores.yaml"
VALIDATE = ROOT / "deploy" / "validate.py"
PLAIN = ROOT / "deploy" / "plain" / "README.md"
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


# ------------------------------------------------------------------ deploy/validate.py


def validate(*args, env=None):
    """Run deploy/validate.py; skip the test where a tool or the network it needs is missing
    (.ci/run installs them, so in CI these tests run)."""
    out = subprocess.run(
        [sys.executable, str(VALIDATE), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=env,
    )
    if out.returncode == 3:
        pytest.skip(out.stderr.strip().splitlines()[-1])
    return out


# (check, the file option, the repository's files, a broken copy's edit, what the error names)
BROKEN = {
    "compose": (
        "--compose-file",
        [COMPOSE],
        lambda t: t.replace("    init: true", "    init: maybe", 1),
        "init",
    ),
    "dockerfiles": (
        "--dockerfile",
        [ROOT / "deploy" / "Dockerfile"],
        lambda t: t.replace("WORKDIR /home/nngp", "RUN cd /home/nngp", 1),
        "DL3003",  # cd in RUN: use WORKDIR
    ),
    "shell": (
        "--script",
        [ROOT / ".ci" / "run"],
        lambda t: t.replace('cd "$(dirname "$0")/.."', "cd $(dirname $0)/..", 1),
        "SC2046",  # unquoted command substitution
    ),
    "kubernetes": (
        "--manifest",
        [K8S_JOB],
        lambda t: t.replace("      restartPolicy: Never", "      restartPolcy: Never", 1),
        "'restartPolcy' was unexpected",
    ),
}


@pytest.mark.parametrize("check", list(BROKEN))
def test_validator_passes_the_repository_and_fails_a_broken_copy(check, tmp_path):
    option, files, breaks, message = BROKEN[check]
    ok = validate(check)
    assert ok.returncode == 0, ok.stderr
    assert f"ok {check}" in ok.stdout
    (original,) = files
    text = original.read_text()
    broken = breaks(text)
    assert broken != text, "the edit no longer applies: update BROKEN"
    copy = tmp_path / original.name
    copy.write_text(broken)
    out = validate(check, option, copy)
    assert out.returncode == 1, out.stdout + out.stderr
    assert message in out.stderr


def test_validator_checks_kubernetes_field_types(tmp_path):
    copy = tmp_path / "daskcluster.yaml"
    copy.write_text(K8S.read_text().replace("    replicas: 4", "    replicas: four", 1))
    out = validate("kubernetes", "--manifest", copy)
    assert out.returncode == 1, out.stdout
    assert "spec.worker.replicas: 'four' is not of type 'integer'" in out.stderr


def test_validator_refuses_unknown_checks():
    out = subprocess.run(
        [sys.executable, str(VALIDATE), "everything"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2 and "no such check: everything" in out.stderr


# ------------------------------------------------------------------ Kubernetes


def k8s_documents(path):
    return {d["kind"]: d for d in yaml.safe_load_all(path.read_text()) if d}


def test_kubernetes_manifests():
    (pvc,) = k8s_documents(K8S_STORES).values()
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["apiVersion"] == "v1"
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    cluster = k8s_documents(K8S)["DaskCluster"]
    job = k8s_documents(K8S_JOB)["DaskJob"]
    for doc, name in ((cluster, "nngp-dist"), (job, "nngp-dist-demo")):
        assert doc["apiVersion"] == "kubernetes.dask.org/v1"
        assert doc["metadata"]["name"] == name
    specs = ((cluster["spec"], "nngp-dist"), (job["spec"]["cluster"]["spec"], "nngp-dist-demo"))
    for spec, name in specs:
        # The operator's required fields: scheduler.spec, scheduler.service, worker.spec.
        service = spec["scheduler"]["service"]
        assert service["type"] == "ClusterIP"  # reachable from inside the cluster only
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
        assert_mounts_stores(worker, pvc)
    assert "s3://" in K8S.read_text()


def assert_mounts_stores(pod, pvc):
    (claim,) = [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert claim["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    for container in pod["containers"]:
        assert {"name": claim["name"], "mountPath": "/stores"} in container["volumeMounts"]


def test_kubernetes_daskjob_runs_nngp_dist_in_its_own_pod():
    """The DaskJob's driver is a pod of its own that runs `nngp-dist run` against the job's
    scheduler (from the operator's DASK_SCHEDULER_ADDRESS), with options the CLI accepts."""
    from nngp_dist.cli import main as cli

    (pvc,) = k8s_documents(K8S_STORES).values()
    pod = k8s_documents(K8S_JOB)["DaskJob"]["spec"]["job"]["spec"]
    assert pod["restartPolicy"] == "Never"  # so the pod ends and the operator ends the job
    assert_mounts_stores(pod, pvc)
    (container,) = pod["containers"]
    args = container["args"]
    assert args[:4] == ["nngp-dist", "run", "--scheduler", "$(DASK_SCHEDULER_ADDRESS)"]
    ctx = cli.commands["run"].make_context(
        "run", [a.replace("$(", "").replace(")", "") for a in args[2:]]
    )
    assert ctx.params["store"].startswith("/stores/")
    assert ctx.params["json_path"].startswith("/stores/")
    # The deployment docs no longer start jobs by exec into a worker pod.
    for doc in (K8S, K8S_JOB, ROOT / "deploy" / "README.md", ROOT / "README.md"):
        assert "kubectl exec -it" not in doc.read_text(), doc


# ------------------------------------------------------------------ SLURM


def test_slurm_script_splits_its_options_from_nngp_dist_run(tmp_path, capsys):
    py_compile.compile(str(SLURM), cfile=str(tmp_path / "run_slurm.pyc"), doraise=True)
    module = load_script(SLURM)  # importable without dask-jobqueue
    args, rest = module.parse_args(
        [
            "--jobs",
            "3",
            "--store",
            "s.zarr",
            "--noise",
            "1e-3,1e-2",
            "--walltime",
            "04:00:00",
            "--quiet",
        ]
    )
    assert (args.jobs, args.walltime, args.cores) == (3, "04:00:00", None)
    assert rest == ["--store", "s.zarr", "--noise", "1e-3,1e-2", "--quiet"]
    for reserved in ("--scheduler", "--workers=2", "--memory-limit"):
        with pytest.raises(SystemExit, match="this script's to set"):
            module.parse_args(["--store", "s.zarr", reserved, "x"])
    # No option of this script shadows one of `nngp-dist run` (both take them in one line).
    from nngp_dist.cli import main as cli

    ours = {o for a in module.parser()._actions for o in a.option_strings} - {"-h", "--help"}
    theirs = {o for p in cli.commands["run"].params for o in p.opts}
    assert not ours & theirs
    if importlib.util.find_spec("dask_jobqueue") is None:
        assert module.main(["--store", str(tmp_path / "s.zarr")]) == 2
        assert "pip install dask-jobqueue" in capsys.readouterr().err
        assert not (tmp_path / "s.zarr").exists()


def slurm_job_script(tmp_path, jobqueue_yaml, *args):
    """`run_slurm.py --print-job-script` with only ``jobqueue_yaml`` as dask's configuration."""
    pytest.importorskip("dask_jobqueue", reason="dask-jobqueue is not installed")
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    if jobqueue_yaml:
        (site / "jobqueue.yaml").write_text(jobqueue_yaml)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASK_")}
    env.update(DASK_CONFIG=str(site), DASK_ROOT_CONFIG=str(site), HOME=str(tmp_path))
    out = subprocess.run(
        [sys.executable, str(SLURM), "--print-job-script", "--store", "s.zarr", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


SITE = """\
jobqueue:
  slurm:
    cores: 32
    memory: 128GB
    walltime: '12:00:00'
    queue: long
"""


def test_slurm_job_script_honours_the_sites_jobqueue_yaml(tmp_path):
    script = slurm_job_script(tmp_path, SITE)
    assert "#SBATCH --cpus-per-task=32\n" in script
    assert "#SBATCH --mem=120G\n" in script  # 128 GB, as dask-jobqueue writes it in GiB
    assert "#SBATCH -t 12:00:00\n" in script
    assert "#SBATCH -p long\n" in script
    # One single-threaded worker process per core, with the embedded cluster's environment,
    # and the workers' HTTP servers on the node's loopback only.
    assert "--nthreads 1 " in script and "--nworkers 32 " in script
    assert "export MALLOC_ARENA_MAX=1\n" in script
    assert "--dashboard-address 127.0.0.1:0" in script
    # A command-line option overrides one key of the site's and leaves the others.
    script = slurm_job_script(tmp_path, SITE, "--cores", "16", "--walltime", "04:00:00")
    assert "#SBATCH --cpus-per-task=16\n" in script and "#SBATCH -t 04:00:00\n" in script
    assert "#SBATCH --mem=120G\n" in script and "--nworkers 16 " in script


def test_slurm_job_script_falls_back_only_where_the_site_is_silent(tmp_path):
    script = slurm_job_script(tmp_path, None)
    assert "#SBATCH --cpus-per-task=8\n" in script
    assert "#SBATCH --mem=30G\n" in script  # 32 GB
    assert "#SBATCH -t 02:00:00\n" in script
    script = slurm_job_script(tmp_path, "jobqueue:\n  slurm:\n    processes: 4\n    cores: 16\n")
    assert "#SBATCH --cpus-per-task=16\n" in script and "--nworkers 4 " in script
    assert "#SBATCH -t 02:00:00\n" in script


def test_slurm_checks_nngp_dist_options_before_submitting(tmp_path):
    pytest.importorskip("dask_jobqueue", reason="dask-jobqueue is not installed")
    out = subprocess.run(
        [sys.executable, str(SLURM), "--store", "s.zarr", "--depht", "3"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert out.returncode == 2
    assert "No such option '--depht'" in out.stderr
    assert "#SBATCH" not in out.stdout + out.stderr  # no cluster, no job


# ------------------------------------------------------------------ what listens where


def listening(pid):
    """(ip, port) of every listening TCP socket of process ``pid`` and its descendants."""
    psutil = pytest.importorskip("psutil")
    proc = psutil.Process(pid)
    found = set()
    for p in [proc, *proc.children(recursive=True)]:
        conns = getattr(p, "net_connections", None) or p.connections
        found |= {c.laddr[:2] for c in conns("inet") if c.status == psutil.CONN_LISTEN}
    return found


def recipe_commands(path):
    """The shell commands of a Markdown file's bash blocks, continuation lines joined."""
    blocks = re.findall(r"```bash\n(.*?)```", path.read_text(), re.S)
    return [c.strip() for b in blocks for c in b.replace("\\\n", " ").splitlines() if c.strip()]


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_plain_recipe_binds_http_to_loopback(tmp_path):
    """deploy/plain's `dask scheduler` and `dask worker` lines, run as written with their host
    variables set to 127.0.0.1 (free ports, one small worker): nothing they open listens
    anywhere but 127.0.0.1. A worker without --dashboard-address listens on 0.0.0.0 for HTTP
    even with --host 127.0.0.1, so this fails if the recipe drops it."""
    import shlex

    commands = recipe_commands(PLAIN)
    (scheduler,) = [c for c in commands if c.startswith("dask scheduler ")]
    (worker,) = [c for c in commands if " dask worker " in f" {c}"]
    (cuda,) = [c for c in commands if c.startswith("dask cuda worker ")]
    assert "--dashboard-address 127.0.0.1:" in cuda and '--host "$WORKER_HOST"' in cuda
    ports = {"8786": str(free_port()), "8787": str(free_port())}

    def argv(line):
        line = line.replace("$HOST", "127.0.0.1").replace("$WORKER_HOST", "127.0.0.1")
        for old, new in ports.items():
            line = line.replace(f":{old}", f":{new}").replace(f" {old} ", f" {new} ")
        words = shlex.split(line)
        env = dict(w.split("=", 1) for w in words[: words.index("dask")])
        words = words[words.index("dask") + 2 :]
        for option, value in (
            ("--nworkers", "1"),
            ("--memory-limit", "1GB"),
            ("--local-directory", str(tmp_path / "dask")),
        ):
            if option in words:
                words[words.index(option) + 1] = value
        return env, words

    procs = []
    try:
        for line, module in ((scheduler, "dask_scheduler"), (worker, "dask_worker")):
            env, words = argv(line)
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", f"distributed.cli.{module}", *words],
                    env={**os.environ, **env},
                    start_new_session=True,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        from distributed import Client

        with Client(f"tcp://127.0.0.1:{ports['8786']}", timeout=60) as c:
            c.wait_for_workers(1, timeout=60)
            (info,) = c.scheduler_info()["workers"].values()
        sched, work = (listening(p.pid) for p in procs)
        assert ("127.0.0.1", int(ports["8786"])) in sched
        assert ("127.0.0.1", int(ports["8787"])) in sched  # the dashboard
        assert ("127.0.0.1", info["services"]["dashboard"]) in work  # the worker's HTTP
        assert {ip for ip, _ in sched | work} == {"127.0.0.1"}, sched | work
    finally:
        for p in procs[::-1]:
            p.terminate()
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, 9)
                p.wait(timeout=10)


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
        [
            *nngp_dist_cli(),
            "run",
            "--dataset",
            "demo",
            "--train-size",
            "300",
            "--test-size",
            "100",
            "--store",
            store,
            "--scheduler",
            address,
            "--noise",
            "1e-3",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert run.returncode == 0, run.stderr + dask_processes.logs()
    status = subprocess.run(
        [*nngp_dist_cli(), "status", "--store", store, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert status.returncode == 0, status.stderr
    st = json.loads(status.stdout)
    assert st["stage"] == "done"
    assert st["tiles_done"] == st["tiles_total"] > 0

    # The health checks of docker-compose.yml, pointed at these processes' dashboards.
    from distributed import Client

    with Client(address, timeout=30) as c:
        workers = c.scheduler_info()["workers"].values()
        worker_ports = [w["services"]["dashboard"] for w in workers]
    # Every process of this topology, HTTP servers included, listens on 127.0.0.1 only.
    for p, _ in dask_processes.procs:
        assert {ip for ip, _ in listening(p.pid)} == {"127.0.0.1"}
    services = compose["services"]
    probes = [(services["scheduler"], dask_processes.dashboard_port)]
    probes += [(services["cpu-worker-1"], p) for p in worker_ports]
    for service, port in probes:
        old, _ = health_url(service)
        test = [a.replace(f":{old}/", f":{port}/") for a in service["healthcheck"]["test"][1:]]
        assert test[0] == "python"  # the images' interpreter; here, this one
        probe = subprocess.run(
            [sys.executable, *test[1:]], capture_output=True, text=True, timeout=30
        )
        assert probe.returncode == 0, probe.stderr
