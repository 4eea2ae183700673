"""Notebook 04 (profile a running job) committed clean, and executed headless by nbclient."""

from __future__ import annotations

from pathlib import Path

import pytest

from test_notebooks import assert_committed_clean, execute_in_quick_mode

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "04_profile_a_running_job.ipynb"


def test_committed_clean():
    assert_committed_clean(NOTEBOOK)


@pytest.mark.slow
def test_notebook_runs(tmp_path, monkeypatch):
    text = execute_in_quick_mode(NOTEBOOK, tmp_path / "home", monkeypatch, timeout=300)
    assert "of communication overlapped" in text and "application/vnd.bokehjs_exec.v0+json" in text
    assert "simulated zb-h1" in text and "simulated 1f1b" in text  # costs measured by the executor's op labels
