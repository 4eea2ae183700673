"""Notebook 04 (profile a running job) committed clean, and executed headless by nbclient."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from test_browser import notebook_env, stop_runs

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "04_profile_a_running_job.ipynb"


def test_committed_clean():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in nb.cells if c.cell_type == "code")
    source = "\n".join(c.source for c in nb.cells)
    assert "/work/" not in source and "/home/" not in source and "/tmp/" not in source


@pytest.mark.slow
def test_notebook_runs(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("DSPARK_HOME", str(home))
    for key, value in notebook_env().items():
        monkeypatch.setenv(key, value)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    try:
        client.execute()
    finally:
        stop_runs(home)
    text = json.dumps([c.get("outputs", []) for c in nb.cells])
    assert "Traceback" not in text and '"output_type": "error"' not in text
    assert "of communication overlapped" in text and "application/vnd.bokehjs_exec.v0+json" in text
    assert "simulated zb-h1" in text and "simulated 1f1b" in text  # costs measured by the executor's op labels
    assert list(home.glob("runs/*/profiles/step*/rank1.json.gz"))
