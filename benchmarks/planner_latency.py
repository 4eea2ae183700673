"""How long `plan predict` takes per layout, with and without the caching-allocator replay (docs/planner.md).

Layouts are drawn (seeded) from `plan search`'s torchtitan space, where the replay runs: Llama 3 8B on 64 H100s at
global batch 128 and 1024, Llama 3 70B on 256 H100s at global batch 512. Each is predicted once with the replay and
once without; the script prints the median, 90th percentile and maximum of each, one core, in-process (the CLI adds
its start-up, `python -X importtime -m dspark_lab.cli` shows it).

    python benchmarks/planner_latency.py [--per-space 50] [--seed 1]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from dspark_lab.planner import predict, search

SPACES = (("llama3-8b", 64, 128), ("llama3-8b", 64, 1024), ("llama3-70b", 256, 512))


def draw(per_space: int, seed: int) -> list[predict.Inputs]:
    rng = random.Random(seed)
    out = []
    for name, gpus, global_batch in SPACES:
        base = predict.parse({"model": name, "cluster": {"gpu": "nvidia-h100", "gpus": gpus},
                              "layout": {"tp": 1, "pp": 1, "dp": gpus, "micro_batch": 1,
                                         "global_batch": global_batch}})
        layouts = search.candidates(base.model, base.cluster, global_batch, "torchtitan")
        out += [predict.Inputs(base.model, base.cluster, lay)
                for lay in rng.sample(layouts, min(per_space, len(layouts)))]
    return out


def timed(inp: predict.Inputs, allocator: bool) -> float:
    start = time.perf_counter()
    predict.predict_inputs(inp, allocator=allocator)
    return time.perf_counter() - start


def summary(times: list[float]) -> str:
    ordered = sorted(times)
    return (f"median {statistics.median(ordered):6.3f} s   p90 {ordered[int(0.9 * len(ordered))]:6.3f} s   "
            f"max {ordered[-1]:6.3f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-space", type=int, default=50)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    inputs = draw(args.per_space, args.seed)
    timed(inputs[0], True)  # warm the caches every call shares (presets, hardware, schedules' first build)
    with_replay = [timed(inp, True) for inp in inputs]
    without = [timed(inp, False) for inp in inputs]
    print(f"{len(inputs)} torchtitan layouts ({', '.join(f'{n} x{g} gb{b}' for n, g, b in SPACES)})")
    print(f"  with the allocator replay     {summary(with_replay)}")
    print(f"  without (what search sweeps)  {summary(without)}")
    slowest = max(range(len(inputs)), key=with_replay.__getitem__)
    lay = inputs[slowest].layout
    print(f"  slowest: {inputs[slowest].model.layers} layers, tp {lay.tp} pp {lay.pp} vpp {lay.vpp} cp {lay.cp} "
          f"micro-batch {lay.micro_batch}, {lay.global_batch // (lay.dp * lay.micro_batch)} micro-batches")
    print(f"  within 1 s with the replay: {sum(t < 1 for t in with_replay)} of {len(inputs)}")


if __name__ == "__main__":
    main()
