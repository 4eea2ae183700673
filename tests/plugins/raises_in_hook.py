"""Fixture plugin: imports and registers fine, then raises when its hooks are called."""

from dspark_lab import hookimpl


@hookimpl
def dspark_register_backends():
    raise RuntimeError("vendor library crashed")


@hookimpl
def dspark_collective_names(backend):
    raise KeyError(backend.name)
