"""The notebooks in notebooks/ are saved with their outputs, stay small, and run top to bottom on
a fresh store without an error (executed in memory: the committed files are never rewritten;
``python notebooks/execute.py`` refreshes their outputs)."""

import hashlib
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
MAX_BYTES = 300_000  # as notebooks/execute.py checks


def test_there_are_notebooks():
    assert {p.name for p in NOTEBOOKS} >= {
        "estimator_sweep_cluster.ipynb",
        "inspect_store.ipynb",
        "trained_network.ipynb",
        "uncertainty.ipynb",
    }


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_saved_with_outputs(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code), "run it with python notebooks/execute.py"
    outputs = [o for c in code for o in c.get("outputs", [])]
    assert any("image/png" in o.get("data", {}) for o in outputs), "no figure saved"
    assert not any(o.output_type == "error" for o in outputs)
    assert path.stat().st_size <= MAX_BYTES, f"{path.name}: make its figures smaller"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path, monkeypatch):
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    nb = nbformat.read(path, as_version=4)
    # The kernel inherits this environment. The notebooks start their own one-worker cluster,
    # which a configured scheduler address would override; their temporary stores go under
    # tmp_path, and they run in an empty working directory, which they must leave empty.
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    cwd = tmp_path / "work"
    cwd.mkdir()
    client = NotebookClient(
        nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(cwd)}}
    )
    client.execute()  # raises CellExecutionError, naming the cell, on the first error
    assert not list(cwd.iterdir()), "a notebook wrote into its working directory"
    leftovers = list((tmp_path / "tmp").glob("nngp-*/*"))
    assert not leftovers, f"a notebook left its temporary files behind: {leftovers}"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before, "the notebook was rewritten"
