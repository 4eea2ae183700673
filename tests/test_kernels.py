"""Kernels: the torch references against independent computations, the path switch, nvcc on every source, the
registry's states, ``dspark-lab kernels``, and (``gpu``-marked) the CUDA path against the reference."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess

import pytest
import torch

from dspark_lab import hookimpl, plugins
from dspark_lab.backends import cpu as cpu_plugin
from dspark_lab.backends import nvidia as nvidia_plugin
from dspark_lab.cli import main as cli_main
from dspark_lab.kernels import (Kernel, KernelUnavailable, choose_path, describe_kernels, flatten_scale,
                                fp8_dequantize, fp8_quantize, unflatten)
from dspark_lab.kernels import cuda, nvcc, reference
from dspark_lab.kernels.registry import builtin_kernels

FP8 = torch.float8_e4m3fn
ARCHES = ("sm_90", "sm_100")
SOURCES = sorted(p.name for p in nvcc.KERNEL_DIR.glob("*.cu"))
ENTRIES = {"fp8_quant.cu": {"fp8_quantize_tiles", "fp8_dequantize_tiles"}, "bucket.cu": {"flatten_scale_chunks"}}
NVCC = nvcc.find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
needs_device = pytest.mark.skipif(not cuda.cupy_status().ok, reason=f"no device path: {cuda.cupy_status().reason}")


@pytest.fixture(autouse=True, scope="module")
def kernel_cache(tmp_path_factory):
    """Compile into a fresh cache, and keep DSPARK_KERNELS from the caller's shell out of these tests."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DSPARK_HOME", str(tmp_path_factory.mktemp("dspark_home")))
        mp.delenv("DSPARK_KERNELS", raising=False)
        yield


def tilewise(x: torch.Tensor):
    """An independent FP8 quantization: a plain loop over rows and 128-wide slices, torch's own e4m3 cast."""
    rows = x.reshape(-1, x.shape[-1]).float()
    q = torch.empty(rows.shape, dtype=FP8)
    scales = []
    for r, row in enumerate(rows):
        for start in range(0, row.numel(), 128):
            tile = row[start:start + 128]
            amax = tile.abs().max()
            s = amax / 448.0 if amax > 0 else torch.tensor(1.0)
            q[r, start:start + 128] = (tile / s).to(FP8)
            scales.append(s)
    return q.reshape(x.shape), torch.stack(scales).reshape(x.shape[:-1] + (math.ceil(x.shape[-1] / 128),))


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def sample(*shape, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    # Tiles of very different magnitudes, so a scale shared across tiles would show.
    x = torch.randn(*shape, generator=generator) * torch.logspace(-3, 3, shape[-1]) 
    return x.to(dtype)


# --- FP8 reference -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("x", [
    sample(4, 256), sample(5, 300), sample(130), sample(2, 3, 261), sample(3, 77),
    sample(6, 200, dtype=torch.bfloat16), sample(2, 129, dtype=torch.float16), sample(300, 4).t(),
], ids=["2d", "ragged", "1d", "3d", "one-short-tile", "bf16", "fp16", "non-contiguous"])
def test_quantize_matches_a_tilewise_loop(x):
    q, scale = fp8_quantize(x, path="reference")
    want_q, want_scale = tilewise(x)
    assert q.dtype == FP8 and scale.dtype == torch.float32
    assert scale.shape == x.shape[:-1] + (math.ceil(x.shape[-1] / 128),)
    assert torch.equal(scale, want_scale)
    assert same_bits(q, want_q)


def test_each_tile_largest_value_maps_to_448():
    q, _ = fp8_quantize(sample(3, 300), path="reference")
    for start in range(0, 300, 128):
        assert torch.all(q[:, start:start + 128].float().abs().amax(dim=-1) == 448.0)


def test_round_trip_error_is_within_e4m3_rounding():
    x = sample(8, 1000)
    q, scale = fp8_quantize(x, path="reference")
    y = fp8_dequantize(q, scale, path="reference")
    per_element_scale = scale.repeat_interleave(128, dim=-1)[:, :1000]
    # 3 mantissa bits: relative error <= 2^-4 for normals; subnormal spacing is 2^-9 * scale, so half of it.
    bound = torch.maximum(x.abs() * 2.0 ** -4, per_element_scale * 2.0 ** -10) * (1 + 1e-6)
    assert torch.all((y - x).abs() <= bound)
    assert (y - x).abs().max() > 0  # it really is lossy: the bound is what is being tested


def test_zero_tiles_get_scale_one_and_come_back_as_exact_zeros():
    x = sample(2, 300)
    x[0, 128:256] = 0.0
    x[1] = 0.0
    q, scale = fp8_quantize(x, path="reference")
    assert scale[0, 1] == 1.0 and torch.all(scale[1] == 1.0)
    y = fp8_dequantize(q, scale, path="reference")
    assert torch.all(y[0, 128:256] == 0) and torch.all(y[1] == 0)
    assert torch.all(y[0, :128] != 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_dequantize_output_dtype_is_one_rounding_of_the_float32_product(dtype):
    x = sample(3, 200)
    q, scale = fp8_quantize(x, path="reference")
    y = fp8_dequantize(q, scale, dtype, path="reference")
    product = q.float() * scale.repeat_interleave(128, dim=-1)[:, :200]
    assert y.dtype == dtype and torch.equal(y, product.to(dtype))


@pytest.mark.parametrize("call, field", [
    (lambda: fp8_quantize(torch.arange(4)), "x:"),
    (lambda: fp8_quantize(torch.tensor(1.0)), "x:"),
    (lambda: fp8_dequantize(torch.zeros(2, 130, dtype=FP8), torch.ones(2, 1)), "scale:"),
    (lambda: fp8_dequantize(torch.zeros(2, 130), torch.ones(2, 2)), "q:"),
    (lambda: fp8_dequantize(torch.zeros(2, 130, dtype=FP8), torch.ones(2, 2), torch.int8), "dtype:"),
    (lambda: flatten_scale([torch.ones(3)], out=torch.empty(2)), "out:"),
    (lambda: flatten_scale([torch.ones(3), torch.arange(2)]), "tensors[1]:"),
    (lambda: flatten_scale([]), "tensors:"),
    (lambda: unflatten(torch.ones(3), [torch.ones(2, 2)]), "flat:"),
])
def test_bad_arguments_name_the_field(call, field):
    with pytest.raises(ValueError, match=f"^{re.escape(field)}"):
        call()


# --- flatten_scale -----------------------------------------------------------------------------------------------

def test_flatten_scale_equals_torch_cat_times_scale():
    tensors = [sample(3, 5, seed=1), sample(7, seed=2), sample(2, 2, 2, seed=3), torch.empty(0), sample(4, 3).t()]
    flat = flatten_scale(tensors, 0.25, path="reference")
    assert torch.equal(flat, torch.cat([t.reshape(-1) for t in tensors]) * 0.25)


def test_flatten_scale_converts_mixed_inputs_into_out_and_leaves_its_tail():
    tensors = [sample(10, dtype=torch.bfloat16), sample(4, 4, dtype=torch.float16, seed=1), sample(3, seed=2)]
    out = torch.full((40,), -7.0)
    result = flatten_scale(tensors, 0.5, out, path="reference")
    want = torch.cat([t.reshape(-1).float() for t in tensors]) * 0.5
    assert result is out and torch.equal(out[:29], want) and torch.all(out[29:] == -7.0)
    bf16 = flatten_scale(tensors, 0.5, torch.empty(29, dtype=torch.bfloat16), path="reference")
    assert torch.equal(bf16, want.to(torch.bfloat16))


def test_unflatten_gives_views_in_the_original_shapes():
    like = [sample(3, 5), sample(7, seed=1), sample(2, 2, 2, seed=2)]
    flat = flatten_scale(like, path="reference")
    pieces = unflatten(flat, like)
    assert all(torch.equal(p, t) for p, t in zip(pieces, like))
    pieces[1][0] = 123.0
    assert flat[15] == 123.0


# --- the switch --------------------------------------------------------------------------------------------------

def test_auto_on_cpu_tensors_takes_the_reference(monkeypatch):
    monkeypatch.setattr(cuda, "device_problem", lambda kernel: None)  # as if CuPy could launch
    assert choose_path("fp8_quantize", None, [torch.ones(3)]) == "reference"


def test_environment_forces_reference_and_path_argument_beats_it(monkeypatch):
    monkeypatch.setattr(cuda, "device_problem", lambda kernel: None)  # as if CuPy could launch
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    assert choose_path("fp8_quantize", None, [torch.ones(3)]) == "device"
    monkeypatch.setenv("DSPARK_KERNELS", "reference")
    assert choose_path("fp8_quantize", None, [torch.ones(3)]) == "reference"
    monkeypatch.setenv("DSPARK_KERNELS", "device")
    assert choose_path("fp8_quantize", "reference", [torch.ones(3)]) == "reference"


def test_a_bad_switch_value_names_the_variable(monkeypatch):
    monkeypatch.setenv("DSPARK_KERNELS", "gpu")
    with pytest.raises(ValueError, match=r"^DSPARK_KERNELS: 'gpu' .*auto \| device \| reference"):
        fp8_quantize(torch.ones(4))
    with pytest.raises(ValueError, match=r"^path: 'fast'"):
        fp8_quantize(torch.ones(4), path="fast")


def test_device_path_refuses_dtypes_the_sources_do_not_handle(monkeypatch):
    monkeypatch.setattr(cuda, "device_problem", lambda kernel: None)  # as if CuPy could launch
    with pytest.raises(ValueError, match="float64"):
        choose_path("fp8_quantize", "device", [torch.ones(3, dtype=torch.float64)])


@pytest.mark.skipif(cuda.cupy_status().ok, reason="CuPy can launch here, so the device path does not refuse")
@pytest.mark.parametrize("how", ["argument", "environment"])
def test_forced_device_path_raises_a_clear_error_without_a_gpu(monkeypatch, how):
    if how == "environment":
        monkeypatch.setenv("DSPARK_KERNELS", "device")
    path = "device" if how == "argument" else None
    with pytest.raises(KernelUnavailable, match=r"^fp8_quantize: path='device' cannot run here: .*path='reference'"):
        fp8_quantize(torch.ones(4), path=path)
    with pytest.raises(KernelUnavailable, match=r"^flatten_scale: "):
        flatten_scale([torch.ones(4)], path=path)


# --- nvcc --------------------------------------------------------------------------------------------------------

def test_every_source_has_known_entries():
    assert SOURCES == sorted(ENTRIES)


@needs_nvcc
@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("source", SOURCES)
def test_nvcc_compiles_every_source(source, arch, tmp_path):
    built = nvcc.compile_ptx(source, arch, cache=tmp_path)
    assert built.ok, built.detail
    assert ENTRIES[source] <= set(built.entries)


@needs_nvcc
def test_an_a100_gets_the_bucket_kernel_and_the_fp8_reference(tmp_path):
    """sm_80 has no e4m3 conversion: fp8_quant.cu does not build there, so the A100 backend registers the torch
    reference for the FP8 kernels and the device source only for the bucket kernel, which builds."""
    assert not nvcc.compile_ptx("fp8_quant.cu", "sm_80", cache=tmp_path).ok
    bucket = nvcc.compile_ptx("bucket.cu", "sm_80", cache=tmp_path)
    assert bucket.ok and ENTRIES["bucket.cu"] <= set(bucket.entries), bucket.detail
    kernels = {k.name: k for k in builtin_kernels("nvidia-a100", "sm_80")}
    assert kernels["flatten_scale"].source is not None and kernels["flatten_scale"].arch == "sm_80"
    assert kernels["fp8_quantize"].source is None and "needs sm_89+" in kernels["fp8_quantize"].why_reference
    assert kernels["fp8_dequantize"].source is None


def broken_copy(tmp_path, old: str, new: str, edit: str = "fp8_quant.cu"):
    """fp8_quant.cu and its header copied to tmp_path, with ``old`` replaced by ``new`` in ``edit``."""
    for name in ("fp8_quant.cu", "common.cuh"):
        shutil.copy(nvcc.KERNEL_DIR / name, tmp_path / name)
    text = (tmp_path / edit).read_text()
    assert old in text
    (tmp_path / edit).write_text(text.replace(old, new, 1))
    return tmp_path / "fp8_quant.cu"


@needs_nvcc
@pytest.mark.parametrize("old, new, edit, message", [
    ("float s = amax", "float s = amax amax", "fp8_quant.cu", "error"),  # a C syntax error
    ("cvt.rn.satfinite.e4m3x2.f32", "cvt.rn.satfinite.e4m3x9.f32", "common.cuh", "e4m3x9"),  # only ptxas sees it
], ids=["syntax", "inline-ptx"])
def test_a_broken_source_fails_to_compile_with_nvcc_message(tmp_path, old, new, edit, message):
    built = nvcc.compile_ptx(broken_copy(tmp_path, old, new, edit), "sm_90", cache=tmp_path / "cache")
    assert not built.ok
    assert re.match(r"nvcc -(ptx|cubin) -arch=sm_90 failed: .*error", built.detail) and message in built.detail


@needs_nvcc
def test_compile_results_are_cached_and_an_edit_recompiles(tmp_path, monkeypatch):
    path = broken_copy(tmp_path, "// One thread per element", "// one thread per element")
    first = nvcc.compile_ptx(path, "sm_90", cache=tmp_path / "cache")
    assert first.ok and not first.cached

    def no_nvcc(*args, **kwargs):
        raise AssertionError("nvcc ran although the answer was cached")

    monkeypatch.setattr(subprocess, "run", no_nvcc)
    again = nvcc.compile_ptx(path, "sm_90", cache=tmp_path / "cache")
    assert again.ok and again.cached and again.entries == first.entries
    monkeypatch.undo()
    (tmp_path / "common.cuh").write_text((tmp_path / "common.cuh").read_text() + "\n// edited\n")
    assert not nvcc.compile_ptx(path, "sm_90", cache=tmp_path / "cache").cached


def test_load_source_pastes_local_includes_once():
    text = nvcc.load_source("fp8_quant.cu")
    assert '#include "common.cuh"' not in text
    assert text.count("__device__ __forceinline__ float dspark_load") == 1


def test_missing_nvcc_is_reported_not_raised(monkeypatch):
    monkeypatch.setattr(nvcc, "find_nvcc", lambda: None)
    built = nvcc.compile_ptx("bucket.cu", "sm_90")
    assert not built.ok and "nvcc not found" in built.detail


# --- the registry and the CLI ------------------------------------------------------------------------------------

def builtin_manager():
    return plugins.make_manager([cpu_plugin, nvidia_plugin], entry_points=False)


def expected_nvidia_state() -> str:
    if cuda.cupy_status().ok:
        return "runnable"  # on the GPU this machine has; the other arch's rows say "compiled"
    return "compiled" if NVCC else "fallback"


def test_describe_kernels_rows_per_backend():
    rows = describe_kernels(builtin_manager())
    by_backend = {}
    for row in rows:
        by_backend.setdefault(row["backend"], {})[row["kernel"]] = row
    # every NVIDIA family in the parts table, built for its parts' compute capability; unlisted GPUs get none
    assert sorted(by_backend) == ["cpu", "nvidia-a100", "nvidia-b200", "nvidia-gb200", "nvidia-gh200", "nvidia-h100",
                                  "nvidia-h200"]
    names = {"fp8_quantize", "fp8_dequantize", "flatten_scale"}
    assert all(set(kernels) == names for kernels in by_backend.values())
    for row in by_backend["cpu"].values():
        assert (row["state"], row["path"], row["source"]) == ("runnable", "reference", None)
    for backend, arch in (("nvidia-a100", "sm_80"), ("nvidia-h100", "sm_90"), ("nvidia-h200", "sm_90"),
                          ("nvidia-gh200", "sm_90"), ("nvidia-b200", "sm_100"), ("nvidia-gb200", "sm_100")):
        for name, row in by_backend[backend].items():
            if arch == "sm_80" and name != "flatten_scale":
                assert (row["state"], row["path"], row["source"]) == ("runnable", "reference", None)
                assert "needs sm_89+" in row["reason"]
                continue
            assert row["source"] == ("bucket.cu" if name == "flatten_scale" else "fp8_quant.cu")
            assert row["arch"] == arch
            if not cuda.cupy_status().ok:
                assert row["state"] == expected_nvidia_state() and row["path"] == "reference"
                assert cuda.cupy_status().reason in row["reason"]
            if row["state"] == "compiled":
                assert f"-arch={arch} ok" in row["reason"]


class BrokenKernelPlugin:
    """A third-party plugin: one kernel whose source does not compile, and one answer that is not a Kernel."""

    def __init__(self, source):
        self.source = source

    @hookimpl
    def dspark_register_kernels(self, backend):
        if backend.name != "nvidia-h100":
            return None
        return [Kernel(name="broken", backend=backend.name, source=str(self.source), entries=("fp8_quantize_tiles",),
                       arch="sm_90", launcher=lambda x: x, reference=lambda x: x), "not a kernel"]


@needs_nvcc
def test_a_plugin_kernel_that_does_not_compile_is_a_fallback_with_the_reason(tmp_path):
    manager = builtin_manager()
    manager.register(BrokenKernelPlugin(broken_copy(tmp_path, "float s = amax", "float s = amax amax")), "broken")
    rows = [r for r in describe_kernels(manager) if r["kernel"] == "broken"]
    assert len(rows) == 1
    assert (rows[0]["state"], rows[0]["path"], rows[0]["source"]) == ("fallback", "reference", "fp8_quant.cu")
    assert "nvcc -ptx -arch=sm_90 failed" in rows[0]["reason"]
    assert [p.stage for p in manager.problems] == ["dspark_register_kernels"]


def test_a_kernel_with_a_source_needs_arch_entries_and_launcher():
    with pytest.raises(ValueError, match="needs arch"):
        Kernel(name="k", backend="b", source="x.cu", reference=lambda: None)


def test_cli_kernels_json(monkeypatch, capsys):
    monkeypatch.setattr(plugins, "_default", builtin_manager())
    assert cli_main(["kernels", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["kind"] == "kernels" and document["schema_version"] >= 1
    assert len(document["kernels"]) == 3 * 7  # cpu and the six NVIDIA families, three kernels each
    assert {r["state"] for r in document["kernels"] if r["backend"] == "cpu"} == {"runnable"}
    assert all({"backend", "kernel", "state", "path", "reason", "source"} <= set(r) for r in document["kernels"])
    assert cli_main(["kernels"]) == 0
    assert re.search(r"nvidia-h200 +fp8_quantize", capsys.readouterr().out)


# --- the CUDA path (needs a GPU and a driver) --------------------------------------------------------------------

def devices_to_test():
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]  # cpu: staged through CuPy arrays


@pytest.mark.gpu
@needs_device
@pytest.mark.parametrize("device", devices_to_test())
@pytest.mark.parametrize("shape, dtype", [((4, 256), torch.float32), ((5, 300), torch.float32), ((130,), torch.float32),
                                          ((2, 3, 261), torch.bfloat16), ((3, 1000), torch.float16)])
def test_device_fp8_matches_reference(device, shape, dtype):
    x = sample(*shape, dtype=dtype).to(device)
    x[..., :128] = 0  # a zero tile
    q, scale = fp8_quantize(x, path="device")
    want_q, want_scale = reference.fp8_quantize(x)
    assert q.device == x.device and same_bits(q.cpu(), want_q.cpu()) and torch.equal(scale.cpu(), want_scale.cpu())
    for out_dtype in (torch.float32, torch.bfloat16, torch.float16):
        y = fp8_dequantize(q, scale, out_dtype, path="device")
        assert torch.equal(y.cpu(), reference.fp8_dequantize(want_q, want_scale, out_dtype).cpu())


@pytest.mark.gpu
@needs_device
@pytest.mark.parametrize("device", devices_to_test())
def test_device_flatten_scale_matches_reference(device):
    tensors = [sample(100_000, seed=1), sample(3, 5, dtype=torch.bfloat16, seed=2), torch.empty(0),
               sample(20_000, dtype=torch.float16, seed=3), sample(300, 4).t()]
    tensors = [t.to(device) for t in tensors]
    for out_dtype in (torch.float32, torch.bfloat16):
        total = sum(t.numel() for t in tensors)
        out = torch.full((total + 5,), -1.0, dtype=out_dtype, device=device)
        flatten_scale(tensors, 0.125, out, path="device")
        want = reference.flatten_scale(tensors, 0.125, torch.full_like(out, -1.0))
        assert torch.equal(out.cpu(), want.cpu())
