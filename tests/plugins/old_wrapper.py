"""Fixture plugin: an old-style ``hookwrapper=True`` around the step-end hook; refused at registration."""

from dspark_lab import hookimpl


@hookimpl(hookwrapper=True)
def dspark_step_end(job, step):
    yield
