"""Print nngp_dist's requirements from pyproject.toml, one a line, with those of the extras
named on the command line: the images install them (with deploy/constraints.txt) in a layer
of their own, before the package's code is copied in, so that a change to the code does not
reinstall the dependencies.

    python requirements.py [--pyproject pyproject.toml] [EXTRA ...] > requirements.txt
"""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path


def requirements(pyproject: Path, extras: list[str]) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    optional = project.get("optional-dependencies", {})
    unknown = sorted(set(extras) - set(optional))
    if unknown:
        raise SystemExit(f"no such extra in {pyproject}: {', '.join(unknown)}")
    return list(project["dependencies"]) + [r for e in extras for r in optional[e]]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pyproject", type=Path, default=Path("pyproject.toml"))
    p.add_argument("extras", nargs="*")
    args = p.parse_args(argv)
    print("\n".join(requirements(args.pyproject, args.extras)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
