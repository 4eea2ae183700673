"""The bounds of the control plane: what a request, a store value or a logged line may weigh, and how to shorten.

Every size a client chooses is bounded here, in one place, so docs/security.md can quote them: a request can
neither grow the records without limit nor hold rank 0's threads.
"""

from __future__ import annotations

import math
import re
from typing import Any

from dspark_lab.errors import DSparkError

MAX_REQUEST_LINE = 2 * 1024  # bytes of a request line ("GET /metrics?tail=20 HTTP/1.1"); longer: 414
MAX_HEADERS = 20  # header lines of one request; more: 431
MAX_HEADER_BYTES = 8 * 1024  # bytes of all of one request's header lines; more: 431
MAX_BODY_BYTES = 64 * 1024  # one request body
MAX_KEYS = 32  # policy keys in one change
MAX_TEXT = 256  # characters of one key or value
MAX_TAIL = 1000  # metric records one /metrics?tail=N returns
MAX_TAIL_BYTES = 8 * 1024 * 1024  # bytes read from the end of metrics.jsonl to find them
MAX_TIMEOUT_S = 3600.0  # a request's or a command's wait
MAX_STORE_VALUE = 64 * 1024  # one announcement or agreement value read from torchrun's store
REQUEST_DEADLINE_S = 5.0  # a request (line, headers, body) must arrive in full this soon after connecting; later: 408
IDLE_TIMEOUT_S = 10.0  # a reply its client does not take within this long is dropped
MAX_CONNECTIONS = 64  # connections served at once; more close the oldest still sending its head, else get 503
LISTEN_BACKLOG = 128
LOG_CHARS = 120  # characters of a client-chosen value kept in a record or an error line


def short(value: Any, limit: int = LOG_CHARS) -> str:
    """``value`` as text of at most about ``limit`` characters, on one line (what records and errors keep)."""
    text = str(value)
    if len(text) > limit:
        text = f"{text[:limit]}... ({len(text)} chars)"
    return one_line(text)


def one_line(text: str) -> str:
    """Control characters (newlines included) escaped, so an error or a record is always one line."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


WHOLE_NUMBER = re.compile(r"[0-9]{1,18}")  # ASCII digits only: str.isdigit() also takes '²', which int() refuses


def is_whole_number(text: str) -> bool:
    """Whether ``text`` is a whole number written in ASCII digits, short enough for int() to read."""
    return WHOLE_NUMBER.fullmatch(text) is not None


def check_timeout(value: Any, field: str) -> float:
    """A wait in seconds: a finite number in (0, MAX_TIMEOUT_S]; otherwise a one-line DSparkError naming ``field``."""
    try:
        if isinstance(value, bool):
            raise ValueError
        seconds = float(value)
    except (TypeError, ValueError):
        raise DSparkError(f"{field}: {short(value, 40)!s} is not a number of seconds; allowed: "
                          f"a number in (0, {MAX_TIMEOUT_S:g}]") from None
    if not math.isfinite(seconds) or not 0 < seconds <= MAX_TIMEOUT_S:
        raise DSparkError(f"{field}: {seconds!r} seconds is not allowed; allowed: a number in (0, {MAX_TIMEOUT_S:g}]")
    return seconds
