"""Shared fixtures: fixture plugins from tests/plugins/, the built-in plugins, and the example plugin installed.

Unit tests build their own plugin manager from explicit plugins (``make_manager(..., entry_points=False)``), so
whatever happens to be installed never leaks in; only the tests about entry-point loading read the environment.
"""

from __future__ import annotations

import builtins
import collections
import importlib
import importlib.metadata
import importlib.util
import io
import os
import signal
import sys
from pathlib import Path

import pytest

from dspark_lab import plugins

TESTS = Path(__file__).resolve().parent
FIXTURE_PLUGINS = TESTS / "plugins"
EXAMPLE_PLUGIN = TESTS.parent / "plugins" / "dspark-example-backend"
BUILTIN_MODULES = ("dspark_lab.backends.cpu", "dspark_lab.backends.nvidia", "dspark_lab.backends.amd",
                   "dspark_lab.backends.topology")


def pytest_collection_modifyitems(config, items):
    """Files with the most ``slow`` tests first; ``gpu``-marked tests run only with ``DSPARK_GPU_TESTS=1``
    (tests/gpu/check_device.sh sets it), else skipped.

    The order is for ``-n 2 --dist loadfile`` (the README's full run): pytest-xdist hands whole files to its workers
    in this order. The count of slow tests is a rough proxy for a file's length (test_collectives has the most and is
    short; test_browser has one and is long): ordering by measured seconds was tried and was no faster.
    """
    slow = collections.Counter(item.path for item in items if item.get_closest_marker("slow") is not None)
    items.sort(key=lambda item: (-slow[item.path], str(item.path)))  # stable: a file's own order is kept
    if os.environ.get("DSPARK_GPU_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="gpu test: set DSPARK_GPU_TESTS=1 on a machine with a CUDA device and driver")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # not item.keywords: it holds the path's folder names too
            item.add_marker(skip)


def load_file(name: str, path: Path):
    """Import the Python file at ``path`` as a fresh module called ``name`` (not put in ``sys.modules``)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_fixture_plugin(name: str):
    """Import tests/plugins/<name>.py as a fresh module (so module-level state starts clean in every test)."""
    return load_file(f"dspark_fixture_{name}", FIXTURE_PLUGINS / f"{name}.py")


@pytest.fixture
def fixture_plugin():
    return load_fixture_plugin


@pytest.fixture
def builtin_plugins():
    """The built-in backend plugin modules, imported directly (not through entry points)."""
    return [importlib.import_module(name) for name in BUILTIN_MODULES]


class _CountingFileIO(io.FileIO):
    counts: collections.Counter

    def readinto(self, buffer):
        n = super().readinto(buffer)
        self.counts[self.name] += n or 0
        return n


@pytest.fixture
def bytes_read(monkeypatch):
    """Bytes read from the disk, by path as opened, of each file opened with ``open(path, "rb")`` during the test,
    by any thread (what buffering read ahead included): what a reader really read, however it is written."""
    counts: collections.Counter = collections.Counter()
    real_open = builtins.open

    def counting_open(file, mode="r", buffering=-1, *args, **kwargs):
        if mode != "rb" or args or kwargs or not isinstance(file, (str, os.PathLike)):
            return real_open(file, mode, buffering, *args, **kwargs)
        raw = _CountingFileIO(os.fspath(file), "r")
        raw.counts = counts
        return raw if buffering == 0 else io.BufferedReader(raw)

    monkeypatch.setattr(builtins, "open", counting_open)
    return counts


@pytest.fixture
def use_manager(monkeypatch):
    """Make ``manager`` the process-wide one the CLI and commands use, for this test only."""

    def use(manager):
        monkeypatch.setattr(plugins, "_default", manager)
        return manager

    return use


def write_dist_info(site: Path, name: str, entry_points: dict[str, str]) -> Path:
    """A minimal installed distribution (what pip writes) whose ``dspark_lab`` entry points are ``entry_points``."""
    dist = site / f"{name.replace('-', '_')}-0.0.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.0.0\n")
    lines = "".join(f"{ep} = {target}\n" for ep, target in entry_points.items())
    (dist / "entry_points.txt").write_text(f"[{plugins.ENTRY_POINT_GROUP}]\n{lines}")
    return dist


@pytest.fixture(scope="session")
def example_plugin_paths(tmp_path_factory) -> list[str]:
    """Make sure the example plugin is installed; return the sys.path entries a subprocess needs to see it.

    CI installs it with ``pip install -e plugins/dspark-example-backend``. Where it is not installed, this does what
    pip's editable install does, for this session only: a dist-info carrying the entry points of the plugin's own
    pyproject.toml, plus its source directory on sys.path, so the real entry-point machinery finds it.
    """
    if importlib.metadata.entry_points(group=plugins.ENTRY_POINT_GROUP, name="gaudi3"):
        yield []
        return
    import tomllib  # Python 3.11+: imported here so the gpu tests still load on a 3.10 GPU machine

    project = tomllib.loads((EXAMPLE_PLUGIN / "pyproject.toml").read_text())["project"]
    site = tmp_path_factory.mktemp("example-plugin-site")
    write_dist_info(site, project["name"], project["entry-points"][plugins.ENTRY_POINT_GROUP])
    paths = [str(site), str(EXAMPLE_PLUGIN)]
    with pytest.MonkeyPatch.context() as patch:
        for path in paths:
            patch.syspath_prepend(path)
        yield paths


EXIT_ABORT = "terminate called without an active exception"


def terminal_sigint() -> None:
    """``preexec_fn`` for a process a test Ctrl-Cs: SIGINT as a terminal's foreground job has it. A pytest started
    in the background by a non-interactive shell (``pytest &``) has SIGINT ignored, and every child would inherit
    that: the supervisor would never see the Ctrl-C and the test would wait out its timeout."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def plain_torchrun(args, nproc: int = 2, timeout: float = 300):
    """Run a script under plain torchrun (the reference the runtime is compared with) and return the result.

    On a loaded machine gloo's threads can abort a worker's interpreter exit after its script finished (SIGABRT,
    "terminate called without an active exception"); `dspark-lab run`'s bootstrap avoids that, plain torchrun
    does not. Such a run is tried up to twice more (it struck twice in a row once, on a fresh-clone CI run); any
    other failure fails the test.
    """
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           *map(str, args)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    for _ in range(2):
        if done.returncode == 0 or EXIT_ABORT not in done.stderr:
            break
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def wait_for_step(job, step: int, timeout: float = 90):
    """Wait until a background run (``commands.launch``) has written metrics for ``step``; fail if it exits first."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(m["step"] >= step for m in job.run_dir.metrics()):
            return
        assert job.poll() is None, (job.run_dir.path / "output.log").read_text()[-3000:]
        time.sleep(0.1)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def dynamo_counters():
    """torch._dynamo's counters, imported on first use, not at collection (importing dynamo takes seconds)."""
    from torch._dynamo.utils import counters

    return counters


def graphs() -> int:
    """The graphs torch.compile has built so far in this process."""
    return dynamo_counters()["stats"]["unique_graphs"]
