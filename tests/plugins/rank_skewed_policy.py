"""A plugin whose policy takes a value on rank 0 that the other ranks' copy refuses, as when two nodes run two
versions of one plugin: ``skew.mode`` is a | b | c on rank 0 and a | b elsewhere."""

from __future__ import annotations

import os

from dspark_lab import hookimpl
from dspark_lab.policy import PolicySpec


@hookimpl
def dspark_register_policies():
    choices = ("a", "b", "c") if os.environ.get("RANK", "0") == "0" else ("a", "b")
    return [PolicySpec(key="skew.mode", type="enum", choices=choices, default="a", doc="differs by rank")]


@hookimpl
def dspark_apply_policy(job, key, value, old):
    return f"mode {old} -> {value}" if key == "skew.mode" else None
