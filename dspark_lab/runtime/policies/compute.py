"""``compute.threads``: the intra-op threads of each rank (``torch.set_num_threads``), changed at a step boundary.

The boundary runs on the training thread, which is the thread whose OpenMP team torch's CPU kernels use, so the
new count holds from the next step. Measured on the demo model (torch 2.13 CPU, 15 steps, 1 vs 2 threads): the
losses differ by up to 7.5e-8 relative, because a kernel split over more threads sums in another order; the policy
is therefore lossless but not bit-exact on CPU (``PolicySpec.bit_exact=False``).
"""

from __future__ import annotations

import os

MAX_THREADS = 256


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def refusal(value: int) -> str | None:
    if value > cpu_count():
        return f"this rank may run on {cpu_count()} CPU(s); allowed: 1 to {cpu_count()}"
    return None


def current() -> int:
    import torch

    return torch.get_num_threads()


def apply(value: int) -> str:
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(value)
    return f"intra-op threads {old} -> {torch.get_num_threads()}"
