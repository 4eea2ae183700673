"""The ``rms_norm`` kernel of the Gaudi 3 backend: RMSNorm (Zhang and Sennrich, "Root Mean Square Layer
Normalization", NeurIPS 2019), ``y = x / sqrt(mean(x**2, -1) + eps) * weight``.

The reference is plain torch and runs anywhere. The device launcher hands that same function to the Gaudi graph
compiler (``torch.compile(backend="hpu_backend")`` from ``habana_frameworks.torch``), which fuses it into TPC code;
it is built on first use, never at import, and only where the bridge is installed.
"""

from __future__ import annotations

import functools

import torch


def reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dimension, computed in float32 and returned in ``x``'s dtype."""
    x32 = x.float()
    scale = torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (x32 * scale * weight.float()).to(x.dtype)


@functools.cache
def _compiled():
    import habana_frameworks.torch  # noqa: F401  registers the "hpu" device and the "hpu_backend" compiler

    return torch.compile(reference, backend="hpu_backend")


def launch(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Run on the Gaudi device (tensors on ``hpu``); raises ImportError where the Gaudi bridge is missing."""
    return _compiled()(x, weight, eps)
