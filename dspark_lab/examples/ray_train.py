"""Ray Train: a ``TorchTrainer`` whose training function opts into DSpark Lab with ``dspark_lab.attach``.

Ray starts the workers and their process group; ``attach`` (called before ``prepare_model`` wraps the model in
DDP) creates the run directory under ``DSPARK_HOME``, and rank 0 serves the control endpoint, so ``dspark-lab jobs``,
``set``, ``events`` and the notebooks see and steer the run like any other. Needs ``pip install 'dspark-lab[ray]'``::

    python -m dspark_lab.examples.ray_train --workers 2 --steps 300
    dspark-lab set ray-train memory.activation_checkpointing=full     # from another shell, while it trains
"""

from __future__ import annotations

import argparse
import os
import time


def build_model():
    import torch.nn as nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = nn.Linear(16, 64), nn.Linear(64, 16)

        def forward(self, x):
            return x + self.down(self.up(x).relu())

    return nn.Sequential(nn.Linear(8, 16), *[Block() for _ in range(4)], nn.Linear(16, 1))


def train_func(config: dict) -> None:
    import ray.train
    import ray.train.torch
    import torch

    import dspark_lab

    torch.manual_seed(0)
    model = build_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    dspark_lab.attach(model, optimizer, name=config["name"])  # before prepare_model wraps it in DDP
    model = ray.train.torch.prepare_model(model)
    for step in range(config["steps"]):
        loss = model(torch.randn(8, 8)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        time.sleep(config["sleep"])
    ray.train.report({"loss": float(loss)})


def trainer(workers: int, steps: int, sleep: float = 0.05, name: str = "ray-train"):
    """The TorchTrainer: ``workers`` CPU workers of one CPU each."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    return TorchTrainer(train_func, train_loop_config={"steps": steps, "sleep": sleep, "name": name},
                        scaling_config=ScalingConfig(num_workers=workers, use_gpu=False,
                                                     resources_per_worker={"CPU": 1}),
                        run_config=RunConfig(name=name, storage_path=os.path.abspath(os.environ.get(
                            "RAY_STORAGE", os.path.join(os.environ.get("DSPARK_HOME", "."), "ray")))))


def main() -> None:
    import ray

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--sleep", type=float, default=0.05)
    args = parser.parse_args()
    # Ray's CPU count set by hand: the workers start even on a 2-core machine
    ray.init(num_cpus=max(args.workers, 2), include_dashboard=False,
             runtime_env={"env_vars": {k: v for k, v in os.environ.items() if k.startswith("DSPARK_")}})
    print(trainer(args.workers, args.steps, args.sleep).fit())


if __name__ == "__main__":
    main()
