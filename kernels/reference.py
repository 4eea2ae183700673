"""The torch references of the built-in kernels: the specification the CUDA sources are tested against.

They run on any torch device, so they are also the fallback wherever a kernel cannot be launched.

FP8 layout (DeepSeek-AI, "DeepSeek-V3 Technical Report", arXiv:2412.19437, section 3.3.2): the last dimension of a
tensor is cut into 1x128 tiles (the last tile of a row may be shorter) and each tile gets one float32 scale,
``scale = amax(|tile|) / 448`` so the tile's largest value maps to the largest finite e4m3 value. An all-zero tile
gets ``scale = 1``, so it quantizes and dequantizes to exact zeros. Arithmetic is float32 whatever the input dtype;
``q = e4m3(clamp(x / scale, -448, 448))`` rounded to nearest even. Inputs with NaN or infinity give undefined
tiles (the device and the reference may disagree on them).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

TILE = 128
E4M3_MAX = 448.0
FP8 = torch.float8_e4m3fn


def tile_count(cols: int) -> int:
    """Tiles in a row of ``cols`` elements."""
    return math.ceil(cols / TILE)


def scale_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """The shape of the scales of a tensor of ``shape``: one per tile of the last dimension."""
    return tuple(shape[:-1]) + (tile_count(shape[-1]),)


def rows_cols(shape: Sequence[int]) -> tuple[int, int]:
    """A tensor as a matrix of rows along its last dimension (a 1-D tensor is one row)."""
    return math.prod(shape[:-1]), shape[-1]


def fp8_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = rows_cols(x.shape)
    tiles = tile_count(cols)
    padded = F.pad(x.reshape(rows, cols).float(), (0, tiles * TILE - cols)).view(rows, tiles, TILE)
    amax = padded.abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    q = (padded / scale.unsqueeze(-1)).clamp(-E4M3_MAX, E4M3_MAX).to(FP8)
    return q.view(rows, tiles * TILE)[:, :cols].reshape(x.shape), scale.reshape(scale_shape(x.shape))


def fp8_dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    rows, cols = rows_cols(q.shape)
    per_element = scale.reshape(rows, -1).repeat_interleave(TILE, dim=-1)[:, :cols]
    return (q.reshape(rows, cols).float() * per_element).to(dtype).reshape(q.shape)


def flatten_scale(tensors: Sequence[torch.Tensor], scale: float, out: torch.Tensor) -> torch.Tensor:
    """Write every tensor, flattened and times ``scale``, one after another into ``out`` (1-D); return ``out``.

    The product is taken in float32 (float64 when ``out`` is float64) and rounded once to ``out``'s dtype.
    """
    compute = torch.float64 if out.dtype == torch.float64 else torch.float32
    factor = torch.tensor(scale, dtype=compute, device=out.device)
    offset = 0
    for tensor in tensors:
        n = tensor.numel()
        flat = tensor.reshape(-1).to(device=out.device, dtype=compute)
        out[offset:offset + n].copy_(flat if scale == 1.0 else flat * factor)
        offset += n
    return out
