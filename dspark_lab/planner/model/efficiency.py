"""Achieved fraction of peak: a GEMM of smallest dimension ``d`` runs at ``e_max * d / (d + d0)`` of the dense
peak; memory-bound element-wise work runs at ``MEMORY_EFFICIENCY`` of HBM bandwidth.

The saturating form follows the observation behind Megatron-LM's weak-scaling table (bigger GEMMs reach a higher
fraction of peak) and Calculon's per-size efficiency tables (Isaev et al. SC'23, section 3.2); its two constants are
fitted per GPU on ONE declared source (``data/calibration.json``, refit with
``python -m dspark_lab.planner.calibrate``).
A backend without its own constants borrows those of the calibrated part named in ``BORROW``; its own datasheet
figures (peaks, HBM, links) still apply.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

CALIBRATION = Path(__file__).resolve().parent.parent / "data" / "calibration.json"
MEMORY_EFFICIENCY = 0.8  # STREAM-like copy kernels reach ~80-90% of HBM bandwidth on A100/H100
# An FP8 GEMM reaches about the same fraction of the FP8 peak as a BF16 GEMM of the same shape does of the BF16 peak
# (both tensor-core bound); what FP8 costs on top are the casts and amax reductions, which the planner counts as
# memory traffic (predict.FP8_CAST_BYTES) rather than as a lower GEMM efficiency. Not calibrated (no FP8 source).
FP8_GEMM_FACTOR = 1.0
BORROW = {"nvidia-h200": "nvidia-h100", "nvidia-gh200": "nvidia-h100", "nvidia-b200": "nvidia-h100",
          "nvidia-gb200": "nvidia-h100", "amd-mi300x": "nvidia-h100"}
FALLBACK = "nvidia-h100"


@dataclass(frozen=True, slots=True)
class Efficiency:
    e_max: float
    d0: float
    calibrated_on: str  # the backend whose fit this is
    source: str

    def gemm(self, min_dim: float) -> float:
        return self.e_max * min_dim / (min_dim + self.d0)


@lru_cache(maxsize=1)
def _table() -> dict:
    return json.loads(CALIBRATION.read_text())["constants"]


def efficiency(backend: str) -> Efficiency:
    """The constants for ``backend``: its own fit, or the borrowed one (third-party backends borrow H100's)."""
    table = _table()
    name = backend if backend in table else BORROW.get(backend, FALLBACK)
    row = table[name]
    return Efficiency(row["e_max"], row["d0"], name, row["source"])
