"""What each policy does to memory, time and bandwidth, measured side by side with the default in one run.

Memory policies: peak bytes held for backward (the runtime's saved-tensor count) and step time per value of
``memory.activation_checkpointing`` and ``memory.activation_offload``, on a transformer whose activations dominate
(long sequence, narrow model), against ``none``/``off``.
Communication policies: all-reduce bus bandwidth of every ``comm.grad_sync`` value over gloo on 2 ranks, 1 MB to
256 MB, against ``builtin`` (compressed ones counted on logical fp32 bytes, wire bytes beside).

    python benchmarks/policy_effects.py [--quick] [--skip-comm]
"""

from __future__ import annotations

import argparse
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


def measure_memory(steps: int, layers: int, seq: int) -> list[dict]:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    vocab, batch = 256, 4
    model = TinyGPT(vocab, dim=64, heads=4, layers=layers, seq=seq)
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
            peaks, times = [], []
            for step in range(steps + 2):
                tokens = torch.randint(0, vocab, (batch, seq + 1), generator=data)
                start = time.perf_counter()
                loss = F.cross_entropy(model(tokens[:, :-1]).reshape(-1, vocab), tokens[:, 1:].reshape(-1))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                elapsed = time.perf_counter() - start
                peak = tracker.reset_peak()
                if step >= 2:  # the first steps allocate pools and warm caches
                    peaks.append(peak)
                    times.append(elapsed)
            rows.append({"checkpointing": checkpointing, "offload": offload,
                         "peak_activation_mb": statistics.median(peaks) / 2**20,
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
    args = parser.parse_args()
    rows = measure_memory(steps=3 if args.quick else 8, layers=8, seq=128 if args.quick else 256)
    print("memory policies (1 rank, TinyGPT 8 layers, dim 64; medians over steps):")
    print(text_table(rows, ("checkpointing", "offload", "peak_activation_mb", "peak_vs_none", "step_time_ms",
                            "time_vs_none")))
    full = next(r for r in rows if r["checkpointing"] == "full")
    print(f"checkpointing every block cuts peak activation bytes by {100 * (1 - full['peak_vs_none']):.1f}% "
          f"(target >= 40%)")
    if not args.skip_comm:
        print("\ncommunication policies (2 ranks, gloo on loopback):", flush=True)
        bench = Path(__file__).with_name("allreduce_bandwidth.py")
        subprocess.run([sys.executable, str(bench), *(["--quick"] if args.quick else [])], check=True)


if __name__ == "__main__":
    main()
