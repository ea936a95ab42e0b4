"""Run the notebooks top to bottom and save them with their outputs, as they are committed.

    python notebooks/execute.py [NAME.ipynb ...]     # default: every notebook in this folder

Each runs as tests/test_notebooks.py runs it: a fresh kernel, the inline matplotlib backend, no
``DASK_SCHEDULER_ADDRESS``, an empty working directory and a temporary ``TMPDIR`` (removed
after). Execution timings are not recorded, so a rerun changes only what the outputs change.
The tests execute the committed notebooks again (in memory, never rewriting them) and keep each
under ``MAX_BYTES``.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
MAX_BYTES = 300_000


def execute(path: Path) -> int:
    """Execute ``path`` in a scratch directory and write it back with its outputs; its size."""
    nb = nbformat.read(path, as_version=4)
    scratch = Path(tempfile.mkdtemp(prefix="nb-execute-"))
    env = {"MPLBACKEND": "module://matplotlib_inline.backend_inline", "TMPDIR": str(scratch)}
    saved = {k: os.environ.get(k) for k in (*env, "DASK_SCHEDULER_ADDRESS")}
    os.environ.update(env)
    os.environ.pop("DASK_SCHEDULER_ADDRESS", None)
    (scratch / "work").mkdir()
    try:
        NotebookClient(
            nb,
            kernel_name="python3",
            timeout=600,
            record_timing=False,
            resources={"metadata": {"path": str(scratch / "work")}},
        ).execute()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(scratch, ignore_errors=True)
    nbformat.write(nb, path)
    noise = [o for c in nb.cells for o in c.get("outputs", []) if o.get("name") == "stderr"]
    if noise:
        print(f"{path.name}: {len(noise)} cell(s) wrote to stderr; read them, and rerun if noise")
    return path.stat().st_size


def main(names: list[str]) -> None:
    paths = [HERE / n for n in names] if names else sorted(HERE.glob("*.ipynb"))
    for p in paths:
        size = execute(p)
        flag = "" if size <= MAX_BYTES else f"  OVER {MAX_BYTES:,} bytes: make its figures smaller"
        print(f"{p.name}: {size:,} bytes{flag}")


if __name__ == "__main__":
    main(sys.argv[1:])
