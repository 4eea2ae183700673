"""Gradient compression with error feedback: what ``comm.grad_sync = bf16 | fp8`` runs.

Each rank compresses ``gradient + residual``, keeps ``residual = (gradient + residual) - decompress(compressed)``
for the next step of the same bucket, and communicates the compressed form. What one step's compression drops is
added back the next step, so the sum of what was communicated over ``T`` steps differs from the true sum by the last
residual only, instead of by ``T`` rounding errors (Seide et al., "1-bit stochastic gradient descent and its
application to data-parallel distributed training of speech DNNs", Interspeech 2014; Karimireddy et al., "Error
feedback fixes SignSGD and other gradient compression operators", ICML 2019).

Both codecs all-gather every rank's compressed bytes and sum the decoded parts in fp32, in rank order (so every rank
gets bit-identical sums):

- ``bf16``: gloo can all-reduce bfloat16, but it adds partial sums in bfloat16, rounding again at every hop; that
  rounding happens after compression, so no residual sees it and it accumulates step after step. Gathering the
  bf16 values and summing in fp32 leaves the local rounding as the only error, which the residual captures
  exactly. The price: a rank sends ``(world - 1) * 2`` bytes per element, against ``2 (world - 1) / world * 2`` for a
  ring all-reduce in bf16 (the same at two ranks, ``world / 2`` times more beyond).
- ``fp8``: no backend reduces float8, so the float8 e4m3 codes travel as bytes, with one fp32 scale per 1x128 tile
  (``dspark_lab.kernels.fp8_quantize``; the flat gradient is zero-padded to whole rows of 128).

This module sums; averaging over ranks is the caller's business.
"""

from __future__ import annotations

import math
from typing import Hashable

import torch

from dspark_lab.collectives.base import flat_view, in_place
from dspark_lab.collectives.builtin import BuiltinCollective

CODECS = ("bf16", "fp8")
TILE = 128  # elements per fp8 scale, as the kernels quantize


class Bf16Codec:
    name = "bf16"

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.bfloat16)

    def decode(self, encoded: torch.Tensor, numel: int) -> torch.Tensor:
        return encoded.float()

    def encoded_bytes(self, numel: int) -> int:
        return 2 * numel


class Fp8Codec:
    """One uint8 message per rank (any backend can move bytes): the float8 e4m3 codes of every row of ``TILE``
    elements, then the rows' fp32 scales. Its length, ``132`` bytes a row, keeps every rank's scales 4-byte aligned."""

    name = "fp8"

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        from dspark_lab.kernels import fp8_quantize

        rows = torch.nn.functional.pad(x, (0, -x.numel() % TILE)).view(-1, TILE)
        q, scale = fp8_quantize(rows)
        return torch.cat([q.view(torch.uint8).reshape(-1), scale.reshape(-1).view(torch.uint8)])

    def decode(self, encoded: torch.Tensor, numel: int) -> torch.Tensor:
        from dspark_lab.kernels import fp8_dequantize

        tiles = math.ceil(numel / TILE)
        q = encoded[: tiles * TILE].view(torch.float8_e4m3fn).view(tiles, TILE)
        scale = encoded[tiles * TILE:].view(torch.float32).view(tiles, 1)
        return fp8_dequantize(q, scale, torch.float32).view(-1)[:numel]

    def encoded_bytes(self, numel: int) -> int:
        tiles = math.ceil(numel / TILE)
        return tiles * TILE + 4 * tiles


def make_codec(name: str) -> Bf16Codec | Fp8Codec:
    if name == "bf16":
        return Bf16Codec()
    if name == "fp8":
        return Fp8Codec()
    raise ValueError(f"codec: {name!r} is not a compression codec; allowed: {' | '.join(CODECS)}")


def ring_wire_bytes(numel: int, world_size: int, element_size: int = 4) -> int:
    """Bytes one rank sends in a ring all-reduce of ``numel`` elements: ``2 (n - 1) / n`` of the tensor."""
    return round(2 * (world_size - 1) / world_size * numel * element_size)


class ErrorFeedbackAllReduce:
    """Sum a tensor over ``group`` through a lossy codec, keeping one residual per ``key`` (a bucket index).

    ``feedback=False`` drops the residual (plain compression), for comparison.
    """

    def __init__(self, codec: str, group=None, *, feedback: bool = True):
        self.codec = make_codec(codec)
        self.name = self.codec.name
        self.feedback = feedback
        self.transport = BuiltinCollective(group)
        self.residuals: dict[Hashable, torch.Tensor] = {}

    @property
    def world_size(self) -> int:
        return self.transport.world_size

    def all_reduce(self, tensor: torch.Tensor, key: Hashable = 0) -> torch.Tensor:
        """Sum ``tensor`` over the group, in place (the sum of every rank's decoded part, in fp32); returns it."""
        x = flat_view(tensor).float()
        residual = self.residuals.get(key)
        if residual is not None:
            if residual.numel() != x.numel():
                raise ValueError(f"key: bucket {key!r} had {residual.numel()} elements and now has {x.numel()}; "
                                 "call reset() when the buckets change")
            x = x + residual
        gathered = self.transport.all_gather(self.codec.encode(x)).view(self.world_size, -1)
        total = torch.zeros_like(x)
        for rank in range(self.world_size):
            decoded = self.codec.decode(gathered[rank], x.numel())
            total += decoded
            if rank == self.transport.rank and self.feedback:
                self.residuals[key] = x - decoded
        return in_place(tensor, lambda flat: flat.copy_(total))

    def reset(self, key: Hashable | None = None) -> None:
        """Forget the residual of ``key`` (every key when ``None``)."""
        if key is None:
            self.residuals.clear()
        else:
            self.residuals.pop(key, None)

    def wire_bytes(self, numel: int) -> int:
        """Bytes this rank sends per ``all_reduce`` of ``numel`` elements (a ring all-gather of the encoding)."""
        return (self.world_size - 1) * self.codec.encoded_bytes(numel)
