"""The three notebooks, executed headless by nbclient in quick mode (every cell runs; shorter sleeps and runs).

The quickstart leaves its job running on purpose (a reader stops it by hand); the test stops it afterwards.
Also checks that what is committed carries no outputs and no absolute paths.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_browser import no_browser, notebook_env, stop_runs

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ["01_quickstart.ipynb", "02_write_a_backend_plugin.ipynb", "03_memory_and_communication.ipynb"]


def outputs_text(nb) -> str:
    return json.dumps([c.get("outputs", []) for c in nb.cells])


def read_notebook(path: Path):
    """The notebook at ``path``, validated. nbformat is imported here, not at collection: it takes seconds (its
    jsonschema builds a URI grammar at import)."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    return nb


def assert_committed_clean(path: Path) -> None:
    """No outputs, no execution counts and no absolute paths in what is committed."""
    nb = read_notebook(path)
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in nb.cells if c.cell_type == "code")
    source = "\n".join(c.source for c in nb.cells)
    assert "/work/" not in source and "/home/" not in source and "/tmp/" not in source


def execute_in_quick_mode(path: Path, home: Path, monkeypatch, timeout: int) -> str:
    """Run every cell of ``path`` headless (nbclient) in quick mode with runs under ``home``; stop what it left
    running; return its outputs as JSON text, with no error in it."""
    from nbclient import NotebookClient

    monkeypatch.setenv("DSPARK_HOME", str(home))
    for key, value in notebook_env().items():
        monkeypatch.setenv(key, value)
    nb = read_notebook(path)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    try:
        client.execute()
    finally:
        stop_runs(home)
    text = outputs_text(nb)
    assert "Traceback" not in text and '"output_type": "error"' not in text
    return text


@pytest.mark.parametrize("name", NAMES)
def test_committed_clean(name):
    assert_committed_clean(NOTEBOOKS / name)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs(name, tmp_path, monkeypatch):
    if name.startswith("01") and no_browser() is None:  # it would only cost a 2-rank job's minute again
        pytest.skip("tests/test_browser.py runs the quickstart in chromium and checks these outputs")
    text = execute_in_quick_mode(NOTEBOOKS / name, tmp_path / "home", monkeypatch, timeout=150)
    if name.startswith("01"):
        assert "activation checkpointing applied at step" in text and "application/vnd.jupyter.widget-view+json" in text
        assert "MB held for backward" in text
    elif name.startswith("02"):
        assert "loopback" in text and "-> [0.0, 10.0, 20.0, 30.0]" in text and "error: collective:" in text
    else:
        assert "checkpoint full" in text and "application/vnd.bokehjs_exec.v0+json" in text
