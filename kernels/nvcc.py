"""Load kernel sources and check that nvcc compiles them: ``nvcc -ptx -arch=sm_XX``, then ``nvcc -cubin`` on that PTX.

The second step runs ptxas, which rejects a wrong inline-PTX instruction or one the architecture lacks (nvcc 13
already runs ptxas for ``-ptx``; older releases pass inline ``asm`` through unchecked). Answers are cached on disk under
``$DSPARK_HOME/cache/kernels/`` (default ``~/.dspark``), keyed by the source text with its local ``#include``\\ s
expanded, the architecture and the nvcc binary, so ``dspark-lab kernels`` stays quick on repeat calls and an edited
source is compiled again. A failure is cached too (``.err``), with nvcc's message.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

KERNEL_DIR = Path(__file__).resolve().parent
NVCC_TIMEOUT_S = 120

_LOCAL_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]+"([^"]+)"[ \t]*$', re.MULTILINE)
_PRAGMA_ONCE = re.compile(r"^[ \t]*#[ \t]*pragma[ \t]+once[ \t]*$", re.MULTILINE)
_ENTRY = re.compile(r"^\s*(?:\.visible\s+)?\.entry\s+(\w+)", re.MULTILINE)


@dataclass(frozen=True, slots=True)
class CompileResult:
    """What nvcc said about one source for one architecture."""

    ok: bool
    arch: str
    detail: str  # "nvcc -ptx -arch=sm_90 ok", or the first error line
    entries: tuple[str, ...] = ()  # the __global__ functions found in the PTX
    cached: bool = False


def source_path(source: str | os.PathLike) -> Path:
    """A source named by file name lives in this package; a plugin names its own by absolute path."""
    path = Path(source)
    return path if path.is_absolute() else KERNEL_DIR / path


def load_source(source: str | os.PathLike) -> str:
    """The source text with its local ``#include "..."`` files pasted in (each once), as NVRTC needs it."""
    return _expand(source_path(source), set())


def _expand(path: Path, seen: set[Path]) -> str:
    seen.add(path)
    text = _PRAGMA_ONCE.sub("", path.read_text())

    def paste(match: re.Match) -> str:
        included = (path.parent / match.group(1)).resolve()
        return "" if included in seen else _expand(included, seen)

    return _LOCAL_INCLUDE.sub(paste, text)


def cache_dir() -> Path:
    home = os.environ.get("DSPARK_HOME") or Path.home() / ".dspark"
    return Path(home) / "cache" / "kernels"


def find_nvcc() -> str | None:
    """nvcc on PATH, else the usual toolkit location."""
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.exists() else None


def compile_ptx(source: str | os.PathLike, arch: str, *, nvcc: str | None = None,
                cache: Path | None = None) -> CompileResult:
    """Compile ``source`` for ``arch`` (``sm_90``, ``sm_100``, ...) or answer from the cache. Never raises for a
    compile error: the result says what went wrong."""
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        return CompileResult(False, arch, "nvcc not found on PATH (install the CUDA toolkit)")
    path = source_path(source)
    try:
        text = load_source(path)
    except OSError as exc:
        return CompileResult(False, arch, f"cannot read {path.name}: {exc.strerror or exc}")
    stat = os.stat(nvcc)
    key = hashlib.sha256("\0".join([text, arch, os.path.realpath(nvcc), str(stat.st_mtime_ns),
                                    str(stat.st_size)]).encode()).hexdigest()[:20]
    cache = cache or cache_dir()
    ptx_file = cache / f"{path.stem}-{arch}-{key}.ptx"
    err_file = cache / f"{path.stem}-{arch}-{key}.err"
    if ptx_file.exists():
        return _success(arch, ptx_file.read_text(), cached=True)
    if err_file.exists():
        return CompileResult(False, arch, err_file.read_text(), cached=True)

    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        ptx = Path(tmp) / "out.ptx"
        steps = ([nvcc, "-ptx", f"-arch={arch}", "-o", str(ptx), str(path)],
                 [nvcc, "-cubin", f"-arch={arch}", "-o", str(Path(tmp) / "out.cubin"), str(ptx)])
        for command in steps:
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=NVCC_TIMEOUT_S)
            except (OSError, subprocess.TimeoutExpired) as exc:
                return CompileResult(False, arch, f"nvcc did not run: {exc}")  # not cached: may work next time
            if done.returncode != 0:
                message = _first_error(done.stderr + done.stdout).replace(f"{path.parent}{os.sep}", "")
                detail = f"nvcc {command[1]} -arch={arch} failed: {message}"
                _write_atomic(err_file, detail)
                return CompileResult(False, arch, detail)
        ptx_text = ptx.read_text()
        _write_atomic(ptx_file, ptx_text)
    return _success(arch, ptx_text, cached=False)


def _success(arch: str, ptx_text: str, *, cached: bool) -> CompileResult:
    return CompileResult(True, arch, f"nvcc -ptx -arch={arch} ok", tuple(_ENTRY.findall(ptx_text)), cached)


def _first_error(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or lines or ["no message"])[0]


def _write_atomic(path: Path, text: str) -> None:
    """Write then rename, so a concurrent `dspark-lab kernels` never reads half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
