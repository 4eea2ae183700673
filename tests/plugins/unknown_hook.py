"""Fixture plugin: a hook implementation whose name matches no hookspec (a typo of dspark_register_backends)."""

from dspark_lab import hookimpl


@hookimpl
def dspark_register_backend():
    return []
