"""Built-in backends: datasheet specs, honest probes (real here, simulated devices through fake NVML / AMD SMI),
NVML never started at import, and samplers that return numbers."""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from pathlib import Path

import psutil
import pytest

from dspark_lab.backend import Availability, Backend, DeviceSpec
from dspark_lab.backends import amd, cpu, nvidia
from dspark_lab.plugins import make_manager

NO_NVIDIA_DRIVER = not Path("/dev/nvidiactl").exists()
NO_AMD_DRIVER = not Path("/dev/kfd").exists()


@pytest.fixture
def backends(builtin_plugins) -> dict[str, Backend]:
    return {b.name: b for b in make_manager(builtin_plugins, entry_points=False).backends()}


# --- specs -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, figures", [
    ("nvidia-h100", dict(bf16_tflops=989.4, fp8_tflops=1978.9, tf32_tflops=494.7, memory_gb=80,
                         memory_bandwidth_gb_s=3350, link_gb_s=450)),
    ("nvidia-b200", dict(bf16_tflops=2250, fp8_tflops=4500, fp4_tflops=9000, memory_gb=180,
                         memory_bandwidth_gb_s=8000, link_gb_s=900)),
    ("amd-mi300x", dict(bf16_tflops=1307.4, fp8_tflops=2614.9, memory_gb=192, memory_bandwidth_gb_s=5300,
                        link_gb_s=448)),
])
def test_accelerator_specs_match_datasheets(backends, name, figures):
    spec = backends[name].spec
    assert {key: getattr(spec, key) for key in figures} == figures
    assert "datasheet" in spec.source.replace(" ", "").lower() or "data sheet" in spec.source.lower()


def test_spec_keys_carry_units():
    keys = set(DeviceSpec().as_dict())
    assert {"bf16_tflops", "memory_gb", "memory_bandwidth_gb_s", "link_gb_s"} <= keys
    numeric = keys - {"link", "source", "cores"}
    assert all(k.endswith(("_tflops", "_gb", "_gb_s", "_w")) for k in numeric), numeric


def test_cpu_spec_is_derived_from_this_machine(backends):
    spec = backends["cpu"].spec
    assert spec.cores == (psutil.cpu_count(logical=False) or psutil.cpu_count(logical=True))
    assert spec.memory_gb == pytest.approx(psutil.virtual_memory().total / 1e9, rel=0.01)
    mhz = float(cpu._cpuinfo().get("cpu MHz", 0) or 0)
    if mhz:  # /proc/cpuinfo gives a clock: the peak is cores x clock x FLOPs per cycle, at least that
        flags = set(cpu._cpuinfo().get("flags", "").split())
        assert spec.fp32_tflops >= round(spec.cores * mhz * 1e6 * cpu.flops_per_cycle(flags) / 1e12, 3) > 0


@pytest.mark.parametrize("flags, expected", [({"avx512f", "avx2", "fma"}, 32), ({"avx2", "fma"}, 32),
                                             ({"avx2"}, 8), (set(), 8)])
def test_cpu_flops_per_cycle(flags, expected):
    assert cpu.flops_per_cycle(flags) == expected


# --- probes on this machine --------------------------------------------------------------------------------


def test_cpu_is_available(backends):
    availability = backends["cpu"].availability()
    assert availability.available and availability.devices == 1


@pytest.mark.skipif(not NO_NVIDIA_DRIVER, reason="an NVIDIA driver is present")
@pytest.mark.parametrize("name", ["nvidia-h100", "nvidia-b200"])
def test_nvidia_unavailable_without_driver_says_why(backends, name):
    availability = backends[name].availability()
    assert not availability.available and availability.devices == 0
    reason = availability.reason
    assert ("nvidia-ml-py is not installed" in reason) or ("NVML could not start" in reason and "driver" in reason)
    assert "torch" in reason


@pytest.mark.skipif(not NO_AMD_DRIVER, reason="an AMD GPU driver is present")
def test_amd_unavailable_without_driver_says_why(backends):
    availability = backends["amd-mi300x"].availability()
    assert not availability.available
    assert "amdsmi" in availability.reason and "rocm-smi" in availability.reason


def test_a_raising_probe_becomes_unavailable():
    def probe():
        raise OSError("boom")

    backend = Backend(name="x", vendor="v", spec=DeviceSpec(), probe=probe)
    assert backend.availability() == Availability(False, "probe raised OSError: boom", 0)


# --- NVIDIA through a fake NVML ----------------------------------------------------------------------------


class FakeNVML(types.ModuleType):
    """The slice of pynvml the backend and doctor use, over a list of GPU names; counts init/shutdown."""

    class NVMLError(Exception):
        pass

    NVML_TEMPERATURE_GPU, NVML_PCIE_UTIL_TX_BYTES, NVML_PCIE_UTIL_RX_BYTES = 0, 0, 1

    def __init__(self, names, init_error: str | None = None):
        super().__init__("pynvml")
        self.names, self.init_error, self.inits, self.shutdowns = names, init_error, 0, 0

    def nvmlInit(self):
        self.inits += 1
        if self.init_error:
            raise self.NVMLError(self.init_error)

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlDeviceGetCount(self):
        return len(self.names)

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetName(self, handle):
        return self.names[handle].encode()  # older bindings return bytes

    def nvmlSystemGetDriverVersion(self):
        return "550.54"

    def nvmlDeviceGetMemoryInfo(self, handle):
        return types.SimpleNamespace(used=(handle + 1) * 10**9, total=80 * 10**9)

    def nvmlDeviceGetUtilizationRates(self, handle):
        return types.SimpleNamespace(gpu=40 + 20 * handle)

    def nvmlDeviceGetPowerUsage(self, handle):
        return 300_000  # mW

    def nvmlDeviceGetTemperature(self, handle, sensor):
        raise self.NVMLError("Not Supported")

    def nvmlDeviceGetPcieThroughput(self, handle, counter):
        return 2_000_000  # KB/s


H100_NODE = ["NVIDIA H100 80GB HBM3", "NVIDIA H100 80GB HBM3", "NVIDIA A10"]


def test_nvidia_probe_with_h100s_present(backends, monkeypatch):
    nvml = FakeNVML(H100_NODE)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    h100 = backends["nvidia-h100"].availability()
    assert h100.available and h100.devices == 2 and "NVIDIA H100 80GB HBM3" in h100.reason
    b200 = backends["nvidia-b200"].availability()
    assert not b200.available and "no nvidia-b200 part among NVML devices" in b200.reason and "NVIDIA A10" in b200.reason
    unlisted = backends["nvidia-unlisted"]  # the A10 is in no table entry: reported, not silently dropped
    with pytest.warns(UserWarning, match="NVIDIA A10.* not in .*gpu_parts.json"):
        availability = unlisted.availability()
    assert availability.available and availability.devices == 1 and "peak figures unknown" in availability.reason
    assert nvml.inits == nvml.shutdowns == 3


def test_nvidia_sampler_reads_nvml(builtin_plugins, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", FakeNVML(H100_NODE))
    manager = make_manager(builtin_plugins, entry_points=False)
    sample = manager.device_sampler(manager.backend("nvidia-h100"))()
    assert sample["utilization_pct"] == 50.0  # mean of 40 and 60 over the two H100s, not the A10
    assert sample["memory_used_gb"] == 3.0 and sample["memory_total_gb"] == 160.0
    first = sample["devices"][0]
    assert first["power_w"] == 300.0 and first["temperature_c"] is None and first["link_tx_gb_s"] == 2.0


def test_nvidia_sampler_absent_without_device(builtin_plugins, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", FakeNVML([], init_error="Driver Not Loaded"))
    manager = make_manager(builtin_plugins, entry_points=False)
    assert manager.device_sampler(manager.backend("nvidia-h100")) is None


def test_nvml_is_not_initialised_at_import(monkeypatch):
    nvml = FakeNVML(H100_NODE, init_error="Driver Not Loaded")
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    spec = importlib.util.spec_from_file_location("dspark_fresh_nvidia", nvidia.__file__)
    fresh = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, fresh)  # dataclasses look their module up while it executes
    spec.loader.exec_module(fresh)
    registered = fresh.dspark_register_backends()
    assert nvml.inits == 0  # neither importing nor registering starts NVML
    reason = registered[0].availability().reason
    assert nvml.inits == 1 and "NVML could not start (Driver Not Loaded)" in reason


def test_nvidia_probe_without_nvidia_ml_py(backends, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    reason = backends["nvidia-h100"].availability().reason
    assert "nvidia-ml-py is not installed" in reason
    assert nvidia.check_nvml().status == "missing"


def test_doctor_nvml_check_with_a_driver(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", FakeNVML(H100_NODE))
    check = nvidia.check_nvml()
    assert (check.status, check.detail) == ("ok", "driver 550.54, 3 GPU(s)")


# --- AMD through a fake AMD SMI and a fake rocm-smi --------------------------------------------------------


class FakeAMDSMI(types.ModuleType):
    AmdSmiTemperatureType = types.SimpleNamespace(HOTSPOT="hotspot")
    AmdSmiTemperatureMetric = types.SimpleNamespace(CURRENT="current")

    def __init__(self, names):
        super().__init__("amdsmi")
        self.names, self.inits = names, 0

    def amdsmi_init(self):
        self.inits += 1

    def amdsmi_shut_down(self):
        pass

    def amdsmi_get_processor_handles(self):
        return list(range(len(self.names)))

    def amdsmi_get_gpu_asic_info(self, handle):
        return {"market_name": self.names[handle]}

    def amdsmi_get_gpu_vram_usage(self, handle):
        return {"vram_used": 4000, "vram_total": 192000}  # MB

    def amdsmi_get_gpu_activity(self, handle):
        return {"gfx_activity": 75}

    def amdsmi_get_power_info(self, handle):
        return {"average_socket_power": 650}

    def amdsmi_get_temp_metric(self, handle, kind, metric):
        return 61


def test_amd_probe_and_sampler_with_mi300x_present(builtin_plugins, monkeypatch):
    monkeypatch.setitem(sys.modules, "amdsmi", FakeAMDSMI(["AMD Instinct MI300X"] * 8))
    manager = make_manager(builtin_plugins, entry_points=False)
    availability = manager.backend("amd-mi300x").availability()
    assert availability.available and availability.devices == 8
    sample = manager.device_sampler(manager.backend("amd-mi300x"))()
    assert sample["utilization_pct"] == 75.0 and sample["memory_total_gb"] == pytest.approx(8 * 192.0)
    assert sample["devices"][0]["power_w"] == 650 and sample["devices"][0]["temperature_c"] == 61


def test_amd_probe_other_gpu(monkeypatch):
    monkeypatch.setitem(sys.modules, "amdsmi", FakeAMDSMI(["AMD Radeon RX 7900 XTX"]))
    availability = amd.probe()
    assert not availability.available and "no MI300X among AMD devices (AMD Radeon RX 7900 XTX)" in availability.reason


@pytest.mark.parametrize("label", ["Card series", "Card Series"])  # older and newer rocm-smi
def test_amd_probe_through_rocm_smi(monkeypatch, tmp_path, label):
    monkeypatch.setitem(sys.modules, "amdsmi", None)
    script = tmp_path / "rocm-smi"
    script.write_text("#!/bin/sh\necho '==== Product Info ===='\n"
                      f"echo 'GPU[0]\t\t: {label}: \t\tAMD Instinct MI300X OAM'\n"
                      "echo 'GPU[0]\t\t: Card model: \t\t0x74a1'\n"
                      f"echo 'GPU[1]\t\t: {label}: \t\tAMD Instinct MI300X OAM'\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    availability = amd.probe()
    assert availability.available and availability.devices == 2


# --- CPU sampler -------------------------------------------------------------------------------------------


def test_cpu_sampler_returns_real_numbers(builtin_plugins):
    manager = make_manager(builtin_plugins, entry_points=False)
    sampler = manager.device_sampler(manager.backend("cpu"))
    sum(i * i for i in range(200_000))  # some work between the priming call and the reading
    sample = sampler()
    total = psutil.virtual_memory().total / 1e9
    assert 0.0 <= sample["utilization_pct"] <= 100.0
    assert sample["memory_total_gb"] == pytest.approx(total, rel=1e-3)
    assert 0.0 < sample["memory_used_gb"] < total
    assert sample["process_rss_gb"] == pytest.approx(psutil.Process().memory_info().rss / 1e9, rel=0.2)
    assert len(sample["devices"]) == psutil.cpu_count(logical=True)


def test_samplers_of_other_backends_ignore_cpu(builtin_plugins):
    cpu_backend = make_manager(builtin_plugins, entry_points=False).backend("cpu")
    assert nvidia.dspark_device_sampler(cpu_backend) is None and amd.dspark_device_sampler(cpu_backend) is None


# --- doctor: each backend plugin checks its own vendor's pieces ---------------------------------------------


def test_vendor_checks_come_from_the_backend_plugins(builtin_plugins, monkeypatch):
    from dspark_lab import doctor

    monkeypatch.setitem(sys.modules, "pynvml", FakeNVML(H100_NODE))
    monkeypatch.setitem(sys.modules, "amdsmi", FakeAMDSMI(["AMD Instinct MI300X"] * 2))
    names = lambda manager: [c.name for c in doctor.run_checks(manager)]
    cpu_only = names(make_manager([cpu], entry_points=False))
    assert not {"cuda", "nvml", "cupy", "nvcc", "rocm", "amd driver"} & set(cpu_only)
    checks = {c.name: c for c in doctor.run_checks(make_manager(builtin_plugins, entry_points=False))}
    assert (checks["nvml"].status, checks["nvml"].detail) == ("ok", "driver 550.54, 3 GPU(s)")
    assert checks["amd driver"].detail == "2 AMD GPU(s): AMD Instinct MI300X, AMD Instinct MI300X"
    assert {"torch", "cuda", "cupy", "nvcc", "rocm"} <= set(checks)
    core = Path(doctor.__file__).read_text()
    assert not any(word in core for word in ("pynvml", "cupy", "nvcc", "amdsmi", "torch.version.cuda"))


def test_a_plugin_check_that_is_not_a_check_is_a_problem_not_a_crash():
    from dspark_lab import doctor, hookimpl

    class Plugin:
        @hookimpl
        def dspark_doctor_checks(self):
            return [doctor.Check("widget driver", "missing", "not installed", "pip install widget"), "oops"]

    checks = doctor.run_checks(make_manager([Plugin()], entry_points=False))
    assert doctor.Check("widget driver", "missing", "not installed", "pip install widget") in checks
    bad = [c for c in checks if c.status == "problem"]
    assert len(bad) == 1 and "returned a str, not a Check" in bad[0].detail and bad[0].hint


def test_each_nvidia_family_has_one_kernel_target_from_its_parts():
    """A family's kernels are built once, so all its parts must share a compute capability; an H200 or GH200 gets
    the sm_90 kernels, an A100 sm_80, a GB200 sm_100 (the datasheets' compute capability)."""
    from dspark_lab.backends import nvidia, parts

    families: dict[str, set] = {}
    for part in parts.parts():
        if part["backend"].startswith("nvidia-"):
            families.setdefault(part["backend"], set()).add(part["cuda_arch"])
    assert all(len(arches) == 1 for arches in families.values()), families
    assert nvidia.KERNEL_ARCH == {name: arches.pop() for name, arches in families.items()}
    assert (nvidia.KERNEL_ARCH["nvidia-a100"], nvidia.KERNEL_ARCH["nvidia-h200"],
            nvidia.KERNEL_ARCH["nvidia-gb200"]) == ("sm_80", "sm_90", "sm_100")
