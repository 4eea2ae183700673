"""Files only their owner reads: run.json, control.json and the heartbeat, notebook cell scripts and chart pages
hold tokens' whereabouts, training code and run data. :data:`FILE_MODE` is every record file's mode.

Directories come from :func:`dspark_lab.runtime.records.make_private_dir`; this module writes the files.
"""

from __future__ import annotations

import os
from pathlib import Path

FILE_MODE = 0o600


def write_private_text(path: Path, text: str) -> Path:
    """Replace ``path`` atomically with ``text`` (UTF-8), mode 0600 whatever the umask or the old file's mode."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(fd, FILE_MODE)  # O_CREAT's mode is masked by the umask, and a leftover tmp keeps its own
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
