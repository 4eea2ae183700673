"""The environment variables of the step reads (:mod:`.step_reads`), parsed without torch: ``dspark-lab run``
checks them before any rank starts, so a bad value is one line there rather than every rank dying of it."""

from __future__ import annotations

import os

from dspark_lab.errors import DSparkError

LOSS_READ_ENV = "DSPARK_LOSS_READ"
LOSS_READS = ("auto", "late")
MEMORY_EVERY_ENV = "DSPARK_MEMORY_EVERY"
MEMORY_EVERY_DEFAULT, MEMORY_EVERY_MAX = 10, 100_000


def loss_read() -> str:
    value = os.environ.get(LOSS_READ_ENV, "").strip().lower() or "auto"
    if value not in LOSS_READS:
        raise DSparkError(f"{LOSS_READ_ENV}: {value!r} is not allowed; allowed: {' | '.join(LOSS_READS)}")
    return value


def memory_every() -> int:
    text = os.environ.get(MEMORY_EVERY_ENV, "").strip() or str(MEMORY_EVERY_DEFAULT)
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= MEMORY_EVERY_MAX:
        raise DSparkError(f"{MEMORY_EVERY_ENV}: {text!r} is not allowed; allowed: an integer in "
                          f"[1, {MEMORY_EVERY_MAX}]")
    return value
