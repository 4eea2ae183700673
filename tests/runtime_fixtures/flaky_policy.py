"""A test plugin: policy ``test.flaky`` whose apply fails on the rank named by its value (``fail-rank-1``)."""

from dspark_lab import hookimpl
from dspark_lab.errors import PolicyError
from dspark_lab.policy import PolicySpec


@hookimpl
def dspark_register_policies():
    return [PolicySpec(key="test.flaky", type="enum", choices=("ok", "fail-rank-1"), default="ok",
                       doc="applies fine, or fails on rank 1 (for rollback tests)")]


@hookimpl
def dspark_apply_policy(job, key, value, old):
    if key != "test.flaky":
        return None
    if value == "fail-rank-1" and job.rank == 1:
        raise PolicyError("test.flaky: rank 1 refuses on purpose")
    return ""
