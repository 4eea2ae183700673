"""Compute kernels per backend: CUDA sources with a CuPy launcher, each with a torch reference it is tested against.

::

    from dspark_lab.kernels import fp8_quantize, fp8_dequantize, flatten_scale, unflatten
    q, scale = fp8_quantize(x)                    # float8 e4m3, one scale per 1x128 tile
    bucket = flatten_scale(grads, 1 / world_size)   # one flat bucket, scaled

Every call takes ``path="device" | "reference"`` (default: auto, overridden by ``DSPARK_KERNELS``). The registry
(``registry.py``) lists the kernels each backend plugin registers and their state; docs/kernels.md has the details.
"""

from __future__ import annotations

from dspark_lab.kernels.cuda import KernelUnavailable
from dspark_lab.kernels.ops import ENV_SWITCH, choose_path, flatten_scale, fp8_dequantize, fp8_quantize, unflatten
from dspark_lab.kernels.registry import Kernel, builtin_kernels, describe_kernels

__all__ = [
    "ENV_SWITCH", "Kernel", "KernelUnavailable", "builtin_kernels", "choose_path", "describe_kernels",
    "flatten_scale", "fp8_dequantize", "fp8_quantize", "unflatten",
]
