"""What each policy does to memory, time and bandwidth, measured side by side with the default in one run.

Memory policies: peak bytes held for backward (the runtime's saved-tensor count) and step time per value of
``memory.activation_checkpointing`` and ``memory.activation_offload``, on a transformer whose activations dominate
(long sequence, narrow model), against ``none``/``off``. Beside the runtime's own count, a measure it does not
produce: on CPU the process's resident set grown by the forward pass (RSS after forward - RSS before it, psutil;
the allocator may keep freed pages, so this is an upper bound on new memory, never a count of held bytes), and on
CUDA ``torch.cuda.max_memory_allocated`` over the step less what was allocated before it.
Communication policies: all-reduce bus bandwidth of every ``comm.grad_sync`` value over gloo on 2 ranks
(benchmarks/allreduce_bandwidth.py --ranks 2: 1 and 4 MB), against ``builtin`` (compressed ones counted on logical
fp32 bytes, wire bytes beside).

    python benchmarks/policy_effects.py [--quick] [--skip-comm]
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dspark_lab" / "examples"))
from demo_train import TinyGPT  # noqa: E402  (the demo's model, the same one the runtime tests train)

from dspark_lab.output import text_table  # noqa: E402
from dspark_lab.runtime.discover import repeated_blocks  # noqa: E402
from dspark_lab.runtime.policies.memory import SavedActivations, set_checkpointing  # noqa: E402

MEMORY_CASES = (
    ("none", "off"), ("every-4", "off"), ("every-2", "off"), ("full", "off"), ("none", "host"), ("none", "host-fp8"),
)


def _return_freed_memory() -> bool:
    """Make glibc give freed tensor memory back to the OS at once (mmap every block of 64 KB or more, which also
    stops glibc raising that threshold), so the resident set follows what is allocated. False where not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, 1 << 16))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def measure_memory(steps: int, layers: int, seq: int, device: str = "cpu") -> list[dict]:
    import psutil

    if device == "cpu" and not _return_freed_memory():
        print("note: not glibc; the resident set may keep freed memory and under-report growth", file=sys.stderr)

    torch.manual_seed(0)
    torch.set_num_threads(1)
    process = psutil.Process()
    cuda = device == "cuda"
    vocab, batch = 256, 4
    model = TinyGPT(vocab, dim=64, heads=4, layers=layers, seq=seq).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    blocks = repeated_blocks(model)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    tracker = SavedActivations(lambda: params)
    tracker.install()
    data = torch.Generator().manual_seed(1)
    rows = []
    try:
        for checkpointing, offload in MEMORY_CASES:
            set_checkpointing(blocks, checkpointing, tracker)
            tracker.mode = offload
            peaks, times, measured, residents = [], [], [], []
            for step in range(steps + 2):
                tokens = torch.randint(0, vocab, (batch, seq + 1), generator=data).to(device)
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    before = torch.cuda.memory_allocated()
                else:
                    before = process.memory_info().rss
                start = time.perf_counter()
                loss = F.cross_entropy(model(tokens[:, :-1]).reshape(-1, vocab), tokens[:, 1:].reshape(-1))
                if not cuda:  # activations peak before backward
                    resident = process.memory_info().rss
                    grown = resident - before
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                if cuda:
                    torch.cuda.synchronize()
                    grown = torch.cuda.max_memory_allocated() - before
                elapsed = time.perf_counter() - start
                peak = tracker.reset_peak()
                if step >= 2:  # the first steps allocate pools and warm caches
                    peaks.append(peak)
                    times.append(elapsed)
                    measured.append(grown)
                    if not cuda:
                        residents.append(resident)
            rows.append({"checkpointing": checkpointing, "offload": offload,
                         "peak_activation_mb": statistics.median(peaks) / 2**20,
                         ("cuda_peak_mb" if cuda else "rss_forward_mb"): statistics.median(measured) / 2**20,
                         **({} if cuda else {"rss_mb": statistics.median(residents) / 2**20}),
                         "step_time_ms": statistics.median(times) * 1e3})
    finally:
        set_checkpointing(blocks, "none")
        tracker.uninstall()
    base = rows[0]
    for row in rows:
        row["peak_vs_none"] = row["peak_activation_mb"] / base["peak_activation_mb"]
        row["time_vs_none"] = row["step_time_ms"] / base["step_time_ms"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--skip-comm", action="store_true")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="memory policies on this device (auto: cuda when available)")
    args = parser.parse_args()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    rows = measure_memory(steps=3 if args.quick else 8, layers=8, seq=128 if args.quick else 256, device=device)
    other = "cuda_peak_mb" if device == "cuda" else "rss_forward_mb"
    print(f"memory policies (1 rank, {device}, TinyGPT 8 layers, dim 64; medians over steps; peak_activation_mb is "
          f"the runtime's saved-tensor count, {other} "
          + ("torch.cuda.max_memory_allocated over the step less what was allocated before it)"
             if device == "cuda" else "the resident set grown by the forward pass, psutil)") + ":")
    print(text_table(rows, ("checkpointing", "offload", "peak_activation_mb", other,
                            *(() if device == "cuda" else ("rss_mb",)), "peak_vs_none", "step_time_ms",
                            "time_vs_none")))
    if device == "cpu":
        print("rss_mb: the whole resident set after the forward pass. Host offload's pool keeps its buffers between "
              "steps, so they are resident before the forward pass starts and do not show as growth.")
    full = next(r for r in rows if r["checkpointing"] == "full")
    print(f"checkpointing every block cuts peak activation bytes by {100 * (1 - full['peak_vs_none']):.1f}% "
          f"(target >= 40%)")
    if not args.skip_comm:
        print("\ncommunication policies (2 ranks, gloo on loopback):", flush=True)
        bench = Path(__file__).with_name("allreduce_bandwidth.py")
        subprocess.run([sys.executable, str(bench), "--ranks", "2", *(["--quick"] if args.quick else [])], check=True)


if __name__ == "__main__":
    main()
