"""The notebooks in notebooks/ run top to bottom on a fresh store without an error."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert {p.name for p in NOTEBOOKS} >= {"inspect_store.ipynb", "uncertainty.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path, monkeypatch):
    nb = nbformat.read(path, as_version=4)
    assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), (
        "store notebooks without outputs"
    )
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
    stores = list((tmp_path / "tmp").glob("nngp-*/*.zarr"))
    assert not stores, f"a notebook left its temporary store behind: {stores}"
