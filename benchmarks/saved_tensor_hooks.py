"""What the runtime's saved-tensor hooks (``memory.activation_checkpointing`` / ``activation_offload`` and the
``peak_activation_bytes`` count, :class:`dspark_lab.runtime.policies.memory.SavedActivations`) cost a training step,
against the same step with no hooks: the reference is plain autograd.

One process, one thread (``torch.set_num_threads(1)``), the demo job's model (``dspark_lab/examples/demo_train.py``:
4 blocks of width 128, sequence 128, batch 8). Two figures:

- per saved tensor: pack, unpack and release of every tensor one step saves, replayed in a loop (best of
  ``--repeats``), in microseconds; this is the Python the hooks run;
- per step: forward and backward with the hooks installed and without, in pairs whose order alternates, each timed
  in process CPU time (``time.process_time``: other processes' load barely moves it); the ratio is the geometric
  mean of the pairs' ratios with a Student-t 95% interval (:func:`dspark_lab.tune.stats.paired_ratio_ci`). This
  includes autograd's own cost of calling any hooks at all.

    python benchmarks/saved_tensor_hooks.py [--pairs 60] [--repeats 200]
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

from dspark_lab.examples.demo_train import TinyGPT
from dspark_lab.runtime.policies.memory import SavedActivations
from dspark_lab.tune.stats import paired_ratio_ci

VOCAB, DIM, HEADS, LAYERS, SEQ, BATCH = 256, 128, 4, 4, 128, 8


def demo_step():
    torch.manual_seed(0)
    model = TinyGPT(VOCAB, DIM, HEADS, LAYERS, SEQ)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ))

    def step():
        logits = model(tokens)
        F.cross_entropy(logits.flatten(0, 1), tokens.flatten()).backward()

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return model, tokens, step, params


def per_tensor_us(repeats: int) -> tuple[int, float]:
    model, tokens, _, params = demo_step()
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        F.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())
    acts = SavedActivations(lambda: params)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        for tensor in saved:
            packed = acts.pack(tensor)
            acts.unpack(packed)
            del packed
        best = min(best, time.perf_counter() - start)
    return len(saved), best / len(saved) * 1e6


def step_pairs(pairs: int) -> tuple[list[float], list[float]]:
    _, _, step, params = demo_step()
    acts = SavedActivations(lambda: params)
    for _ in range(3):  # warm both ways
        step()
    plain, hooked = [], []
    for i in range(pairs):
        for with_hooks in ((False, True) if i % 2 == 0 else (True, False)):
            if with_hooks:
                acts.install()
            start = time.process_time()
            step()
            elapsed = time.process_time() - start
            if with_hooks:
                acts.uninstall()
            (hooked if with_hooks else plain).append(elapsed)
    return plain, hooked


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=60, help="hooked/plain step pairs (2 to 10000)")
    parser.add_argument("--repeats", type=int, default=200, help="replays of one step's saved tensors (1 to 100000)")
    args = parser.parse_args(argv)
    if not 2 <= args.pairs <= 10_000 or not 1 <= args.repeats <= 100_000:
        parser.error("--pairs: 2 to 10000; --repeats: 1 to 100000")
    torch.set_num_threads(1)
    count, us = per_tensor_us(args.repeats)
    print(f"pack + unpack + release: {us:.2f} us per saved tensor, {count} tensors a step: {count * us:.0f} us a step")
    plain, hooked = step_pairs(args.pairs)
    ratio, interval = paired_ratio_ci([math.log(h / p) for p, h in zip(plain, hooked)], 0.95)
    low, high = interval
    median = sorted(plain)[len(plain) // 2]
    print(f"step (cpu time, {args.pairs} pairs): no hooks median {median * 1e3:.2f} ms; "
          f"ratio hooks/no hooks {ratio:.4f} (overhead {100 * (ratio - 1):+.2f}%, "
          f"95% CI {100 * (low - 1):+.2f}% .. {100 * (high - 1):+.2f}%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
