"""Errors a user can cause. Each carries one line that names the field and what is allowed."""

from __future__ import annotations


class DSparkError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits 2; magics print it."""


class PolicyError(DSparkError):
    """A policy change that cannot be accepted (unknown key, bad value, launch-only, not supported here)."""


class RunNotFound(DSparkError):
    """No run matches the id, name or prefix given."""


class ControlError(DSparkError):
    """The control endpoint of a run could not be reached or refused the request."""
