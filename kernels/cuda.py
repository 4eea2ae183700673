"""The device path of the built-in kernels: the ``.cu`` sources loaded with ``cupy.RawModule`` and launched on torch
tensors.

CUDA tensors are used in place and the launch goes on torch's current stream. CPU tensors are staged through CuPy
arrays and the results copied back, so the device path can be checked against the reference on a machine whose
torch is a CPU build. Nothing here imports CuPy until a kernel is probed or launched.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from dspark_lab.errors import DSparkError
from dspark_lab.plugins import _one_line
from dspark_lab.kernels import nvcc
from dspark_lab.kernels.reference import FP8, TILE, rows_cols, scale_shape, tile_count

# Element types the sources read and write; the codes match common.cuh.
DEVICE_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
BLOCK = 256
MAX_GRID = 65535 * 32  # the kernels loop over the rest
CHUNK = 8192  # elements of one input handled by one block of the bucket kernel

# kernel name -> (source file, __global__ entry) of the built-in kernels.
ENTRIES = {
    "fp8_quantize": ("fp8_quant.cu", "fp8_quantize_tiles"),
    "fp8_dequantize": ("fp8_quant.cu", "fp8_dequantize_tiles"),
    "flatten_scale": ("bucket.cu", "flatten_scale_chunks"),
}


class KernelUnavailable(DSparkError, RuntimeError):
    """``path="device"`` was asked for where the device path cannot run."""


@dataclass(frozen=True, slots=True)
class CupyStatus:
    ok: bool
    reason: str
    arch: str | None = None  # "sm_90" for the current device


@functools.lru_cache(maxsize=1)
def cupy_status() -> CupyStatus:
    """Can CuPy launch a kernel here? Probed once per process; never raises."""
    try:
        import cupy
    except ImportError:
        return CupyStatus(False, "cupy is not installed (pip install 'dspark-lab[cuda12]' or 'dspark-lab[cuda13]')")
    except Exception as exc:  # a broken CUDA library install raises more than ImportError
        return CupyStatus(False, f"cupy failed to import: {_one_line(exc)}")
    try:
        count = cupy.cuda.runtime.getDeviceCount()
        major, minor = divmod(int(cupy.cuda.Device(0).compute_capability), 10) if count else (0, 0)
    except Exception as exc:
        message = str(exc).strip().splitlines() or [type(exc).__name__]
        return CupyStatus(False, f"cupy cannot reach a GPU ({message[0]})")
    if count == 0:
        return CupyStatus(False, "cupy sees no CUDA device")
    arch = f"sm_{major}{minor}"
    # The kernels are compiled at first use by NVRTC, which a driver-only host lacks unless the extra brought it.
    try:
        nvrtc = ".".join(map(str, cupy.cuda.nvrtc.getVersion()))
    except Exception as exc:
        return CupyStatus(False, f"NVRTC cannot be loaded ({_one_line(exc)}); install the extra that matches the "
                                 "driver's CUDA major version: pip install 'dspark-lab[cuda12]' or 'dspark-lab[cuda13]'")
    return CupyStatus(True, f"cupy {cupy.__version__} sees {count} device(s), {arch}, NVRTC {nvrtc}", arch)


@functools.lru_cache(maxsize=None)
def module(source: str):
    """The ``cupy.RawModule`` of a source (compiled by NVRTC for the current device on first use)."""
    import cupy

    return cupy.RawModule(code=nvcc.load_source(source), options=("--std=c++17",))


@functools.lru_cache(maxsize=None)
def load_error(source: str, entries: tuple[str, ...]) -> str | None:
    """Why the entries of ``source`` cannot be loaded on this device, or ``None`` when they can."""
    try:
        for entry in entries:
            module(source).get_function(entry)
    except Exception as exc:
        return f"cupy.RawModule failed: {_one_line(exc)}"
    return None


def _unsupported(tensors: Sequence[torch.Tensor], out_dtype: torch.dtype | None) -> list[str]:
    dtypes = {t.dtype for t in tensors} | ({out_dtype} if out_dtype is not None else set())
    return sorted(str(d) for d in dtypes if d not in DEVICE_DTYPES and d != FP8)


def require(kernel: str, tensors: Sequence[torch.Tensor], out_dtype: torch.dtype | None = None) -> None:
    """Raise a one-line error when ``kernel`` cannot take the device path for ``tensors``."""
    problem = device_problem(kernel)
    if problem:
        raise KernelUnavailable(f"{kernel}: path='device' cannot run here: {problem}; "
                                "use path='reference' or DSPARK_KERNELS=auto")
    bad = _unsupported(tensors, out_dtype)
    if bad:
        raise ValueError(f"{kernel}: path='device' takes float32 | bfloat16 | float16 tensors, got {', '.join(bad)}")


def supports(kernel: str, tensors: Sequence[torch.Tensor], out_dtype: torch.dtype | None = None) -> bool:
    """Whether auto mode may pick the device path: CUDA tensors of device dtypes, and CuPy can launch ``kernel``."""
    return (all(t.is_cuda for t in tensors) and not _unsupported(tensors, out_dtype)
            and device_problem(kernel) is None)


def device_problem(kernel: str) -> str | None:
    """Why the built-in ``kernel`` cannot be launched here, or ``None`` when it can."""
    status = cupy_status()
    if not status.ok:
        return status.reason
    source, entry = ENTRIES[kernel]
    return load_error(source, (entry,))


def _function(kernel: str):
    source, entry = ENTRIES[kernel]
    return module(source).get_function(entry)


class _Buffers:
    """Device addresses for torch tensors: CUDA tensors in place, CPU tensors through CuPy copies."""

    def __init__(self, device: torch.device):
        import cupy

        self.cupy = cupy
        self.device = device
        self._alive: list[Any] = []

    def address(self, tensor: torch.Tensor) -> np.uint64:
        tensor = tensor.contiguous()
        if tensor.is_cuda:
            self._alive.append(tensor)
            return np.uint64(tensor.data_ptr())
        array = self.cupy.asarray(tensor.reshape(-1).view(torch.uint8).numpy())
        self._alive.append(array)
        return np.uint64(array.data.ptr)

    def empty(self, shape: Sequence[int], dtype: torch.dtype) -> tuple[np.uint64, Any]:
        if self.device.type == "cuda":
            tensor = torch.empty(tuple(shape), dtype=dtype, device=self.device)
            return np.uint64(tensor.data_ptr()), tensor
        nbytes = max(int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size(), 1)
        array = self.cupy.empty(nbytes, dtype=self.cupy.uint8)
        return np.uint64(array.data.ptr), (array, tuple(shape), dtype)

    def result(self, handle: Any) -> torch.Tensor:
        if isinstance(handle, torch.Tensor):
            return handle
        array, shape, dtype = handle
        data = torch.from_numpy(self.cupy.asnumpy(array))
        return data[: int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()].view(dtype).reshape(shape)

    def stream(self):
        """Launch on torch's current stream for CUDA tensors, so the kernel orders with torch's own work."""
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(self.cupy.cuda.Device(self.device.index or 0))
        stack.enter_context(self.cupy.cuda.ExternalStream(torch.cuda.current_stream(self.device).cuda_stream))
        return stack


def _grid(work_items: int) -> tuple[int]:
    return (max(1, min(work_items, MAX_GRID)),)


def fp8_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = rows_cols(x.shape)
    tiles = tile_count(cols)
    buffers = _Buffers(x.device)
    q_address, q = buffers.empty(x.shape, FP8)
    scale_address, scale = buffers.empty(scale_shape(x.shape), torch.float32)
    if rows * tiles:
        with buffers.stream():
            _function("fp8_quantize")(
                _grid(rows * tiles), (TILE,),
                (buffers.address(x), np.int32(DEVICE_DTYPES[x.dtype]), q_address, scale_address,
                 np.int64(rows * tiles), np.int64(cols), np.int64(tiles)))
    return buffers.result(q), buffers.result(scale)


def fp8_dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    rows, cols = rows_cols(q.shape)
    buffers = _Buffers(q.device)
    y_address, y = buffers.empty(q.shape, dtype)
    n = rows * cols
    if n:
        with buffers.stream():
            _function("fp8_dequantize")(
                _grid(-(-n // BLOCK)), (BLOCK,),
                (buffers.address(q.view(torch.uint8)), buffers.address(scale.float()), y_address,
                 np.int32(DEVICE_DTYPES[dtype]), np.int64(n), np.int64(cols), np.int64(tile_count(cols))))
    return buffers.result(y)


def flatten_scale(tensors: Sequence[torch.Tensor], scale: float, out: torch.Tensor) -> torch.Tensor:
    total = sum(t.numel() for t in tensors)
    buffers = _Buffers(out.device)
    if out.is_cuda:  # validated contiguous: write in place
        bucket_address, bucket = np.uint64(out.data_ptr()), out
    else:
        bucket_address, bucket = buffers.empty((total,), out.dtype)
    chunks = []  # rows of {source address, offset in the bucket, count, source dtype}
    offset = 0
    for tensor in tensors:
        n = tensor.numel()
        if n:
            base = int(buffers.address(tensor))
            size = tensor.element_size()
            chunks.extend((base + start * size, offset + start, min(CHUNK, n - start), DEVICE_DTYPES[tensor.dtype])
                          for start in range(0, n, CHUNK))
        offset += n
    if chunks:
        with buffers.stream():
            table = buffers.cupy.asarray(np.array(chunks, dtype=np.int64))
            _function("flatten_scale")(
                _grid(len(chunks)), (BLOCK,),
                (table, np.int64(len(chunks)), bucket_address, np.int32(DEVICE_DTYPES[out.dtype]),
                 np.float32(scale)))
    if bucket is not out:  # staged through CuPy
        out[:total].copy_(buffers.result(bucket))
    return out
