"""Rank 0 reaches each step boundary a little after the other ranks (it sleeps in ``dspark_step_end``), so a rank
checks the store for the next announcement *before* rank 0 writes it: a test that races to delete or overwrite the
announcement then always wins, as an attacker with a fast link to the store would."""

from __future__ import annotations

import os
import time

from dspark_lab import hookimpl


@hookimpl
def dspark_step_end(job, step):
    if job.rank == 0:
        time.sleep(float(os.environ.get("DSPARK_TEST_RANK0_LATE_S", "0.05")))
