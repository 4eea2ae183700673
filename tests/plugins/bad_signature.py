"""Fixture plugin: one correct hook, then one whose parameters do not match its hookspec.

pluggy registers hooks in name order, so ``dspark_collective_names`` is accepted before the bad
``dspark_register_backends`` is met: the manager must take the whole plugin out, not keep half of it.
"""

from dspark_lab import hookimpl


@hookimpl
def dspark_collective_names(backend):
    return ["half-registered"]


@hookimpl
def dspark_register_backends(vendor_config):
    return []
