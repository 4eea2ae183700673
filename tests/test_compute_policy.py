"""``compute.threads``: applied with torch.set_num_threads on the calling (training) thread, refused above the CPUs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from dspark_lab.errors import PolicyError
from dspark_lab.runtime.policies import builtin, compute


def test_threads_apply_and_refuse_beyond_the_cpus():
    job = SimpleNamespace(model=None, blocks=[], fsdp=False, fsdp_kind="", compiled=[], state={}, registered={})
    before = torch.get_num_threads()
    target = 2 if before != 2 else 1
    try:
        note = builtin.dspark_apply_policy(job=job, key="compute.threads", value=target, old=before)
        assert torch.get_num_threads() == target and f"-> {target}" in note
        assert builtin.observed_values(job)["compute.threads"] == target
    finally:
        torch.set_num_threads(before)
    too_many = compute.cpu_count() + 1
    assert "CPU" in builtin.refusal(job, "compute.threads", too_many)
    with pytest.raises(PolicyError, match="compute.threads"):
        builtin.dspark_apply_policy(job=job, key="compute.threads", value=too_many, old=before)
    spec = builtin.SPECS_BY_KEY["compute.threads"]
    assert spec.live and spec.lossless and not spec.bit_exact


def test_the_schema_allows_256_threads_and_the_rank_refuses_above_its_own_cpus():
    # docs/runtime.md, Policies: `get` says int in [1, 256]; the rank names its own CPU count
    job = SimpleNamespace(model=None, blocks=[], fsdp=False, fsdp_kind="", compiled=[], state={}, registered={})
    assert builtin.SPECS_BY_KEY["compute.threads"].allowed() == "int in [1, 256]"
    cpus = compute.cpu_count()
    assert builtin.refusal(job, "compute.threads", cpus + 1) == (f"this rank may run on {cpus} CPU(s); "
                                                                 f"allowed: 1 to {cpus}")
    assert builtin.refusal(job, "compute.threads", cpus) is None
