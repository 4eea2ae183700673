"""The kernel API the rest of DSpark Lab calls: validate the arguments, pick a path, run it.

``path`` is ``"device"`` (the CUDA source through CuPy; raises :class:`KernelUnavailable` where that cannot run),
``"reference"`` (the torch reference, on any device) or ``None``/``"auto"``. Auto reads ``DSPARK_KERNELS``
(``auto | device | reference``) and, left at auto, takes the device path when every tensor is on CUDA in a dtype
the sources handle (float32, bfloat16, float16) and CuPy can launch, else the reference.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch

from dspark_lab.kernels import cuda, reference
from dspark_lab.kernels.reference import FP8, scale_shape

ENV_SWITCH = "DSPARK_KERNELS"
PATHS = ("auto", "device", "reference")
OUTPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def choose_path(kernel: str, path: str | None, tensors: Sequence[torch.Tensor],
                out_dtype: torch.dtype | None = None) -> str:
    """``"device"`` or ``"reference"`` for this call; raises when ``device`` is forced and cannot run."""
    where = "path"
    if path is None or path == "auto":
        path, where = os.environ.get(ENV_SWITCH, "").strip().lower() or "auto", ENV_SWITCH
    if path not in PATHS:
        raise ValueError(f"{where}: {path!r} is not a kernel path; allowed: {' | '.join(PATHS)}")
    if path == "device":
        cuda.require(kernel, tensors, out_dtype)
        return "device"
    if path == "auto" and cuda.supports(kernel, tensors, out_dtype):
        return "device"
    return "reference"


def fp8_quantize(x: torch.Tensor, *, path: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` to float8 e4m3 with one float32 scale per 1x128 tile of the last dimension.

    Returns ``(q, scale)``: ``q`` has ``x``'s shape and dtype ``torch.float8_e4m3fn``; ``scale`` has shape
    ``x.shape[:-1] + (ceil(D / 128),)``. ``scale = amax(|tile|) / 448``, and 1 for an all-zero tile.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dtype == FP8:
        raise ValueError(f"x: expected a floating-point tensor (not float8), got {_describe(x)}")
    if x.dim() == 0:
        raise ValueError("x: expected at least one dimension, got a 0-d tensor")
    if choose_path("fp8_quantize", path, [x]) == "device":
        return cuda.fp8_quantize(x)
    return reference.fp8_quantize(x)


def fp8_dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32, *,
                   path: str | None = None) -> torch.Tensor:
    """Undo :func:`fp8_quantize`: ``q * scale`` per tile, returned as ``dtype``."""
    if not isinstance(q, torch.Tensor) or q.dtype != FP8 or q.dim() == 0:
        raise ValueError(f"q: expected a float8_e4m3fn tensor with at least one dimension, got {_describe(q)}")
    expected = scale_shape(q.shape)
    if not isinstance(scale, torch.Tensor) or scale.dtype != torch.float32 or tuple(scale.shape) != expected:
        raise ValueError(f"scale: expected float32 of shape {expected} for q of shape {tuple(q.shape)}, "
                         f"got {_describe(scale)}")
    if scale.device != q.device:
        raise ValueError(f"scale: on {scale.device}, q on {q.device}; put both on one device")
    if dtype not in OUTPUT_DTYPES:
        raise ValueError(f"dtype: {dtype} is not allowed; allowed: {' | '.join(map(str, OUTPUT_DTYPES))}")
    if choose_path("fp8_dequantize", path, [q, scale], dtype) == "device":
        return cuda.fp8_dequantize(q, scale, dtype)
    return reference.fp8_dequantize(q, scale, dtype)


def flatten_scale(tensors: Sequence[torch.Tensor], scale: float = 1.0, out: torch.Tensor | None = None, *,
                  path: str | None = None) -> torch.Tensor:
    """Copy every tensor, flattened, one after another into one flat bucket, multiplied by ``scale``.

    The bucket is ``out`` (1-D, contiguous, at least as many elements as the inputs hold; the inputs fill its
    start and the rest is left as it was) or a new tensor of the first input's dtype and device. Returns it.
    """
    tensors = list(tensors)
    for i, tensor in enumerate(tensors):
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point() or tensor.dtype == FP8:
            raise ValueError(f"tensors[{i}]: expected a floating-point tensor (not float8), got {_describe(tensor)}")
    total = sum(t.numel() for t in tensors)
    if out is None:
        if not tensors:
            raise ValueError("tensors: empty, and no out to take the dtype from")
        out = torch.empty(total, dtype=tensors[0].dtype, device=tensors[0].device)
    elif out.dim() != 1 or not out.is_contiguous() or out.numel() < total or out.dtype not in OUTPUT_DTYPES:
        raise ValueError(f"out: expected a contiguous 1-D {' | '.join(map(str, OUTPUT_DTYPES))} tensor of at least "
                         f"{total} elements, got {_describe(out)}")
    for i, tensor in enumerate(tensors):
        if tensor.device != out.device:
            raise ValueError(f"tensors[{i}]: on {tensor.device}, the bucket on {out.device}; use one device")
    if choose_path("flatten_scale", path, [*tensors, out]) == "device":
        return cuda.flatten_scale(tensors, float(scale), out)
    return reference.flatten_scale(tensors, float(scale), out)


def unflatten(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Views of ``flat`` shaped like each of ``like`` in turn (the inverse of :func:`flatten_scale` with scale 1).

    Views share ``flat``'s storage and keep its dtype; a non-contiguous ``flat`` gives copies.
    """
    shapes = [tuple(t.shape) for t in like]
    total = sum(t.numel() for t in like)
    if flat.dim() != 1 or flat.numel() < total:
        raise ValueError(f"flat: expected a 1-D tensor of at least {total} elements, got {_describe(flat)}")
    pieces, offset = [], 0
    for shape, tensor in zip(shapes, like):
        pieces.append(flat[offset:offset + tensor.numel()].reshape(shape))
        offset += tensor.numel()
    return pieces


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        layout = "" if value.is_contiguous() else ", non-contiguous"
        return f"{value.dtype} of shape {tuple(value.shape)} on {value.device}{layout}"
    return type(value).__name__
