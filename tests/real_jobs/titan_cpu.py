"""torchtitan's Trainer on CPU ranks over gloo, unmodified: the start-up adjustments a CPU test needs, and no more.

torchtitan targets an accelerator: it picks ``cuda`` when none is present and trains on text from files shipped in
its repository (not in the wheel) through a Hugging Face tokenizer. Before its modules load, this script

1. points torchtitan's device choice at ``cpu`` (the ``device_type`` / ``device_module`` names that
   ``torchtitan.tools.utils`` computes at import and its modules copy; the process group then defaults to gloo), and
2. registers a train spec ``dspark_debug``: llama3's spec (model, ``parallelize_llama`` with FSDP2 / TP, optimizer,
   loss) with a smaller debug flavour and a dataloader of seeded random token ids instead of a tokenizer and c4,
   and
3. after ``parallelize_llama``, asks FSDP2 for plain SUM reductions: torchtitan sets a gradient divide factor of 1,
   which FSDP2 turns into ``ReduceOp.PREMUL_SUM``, an op gloo does not have (the factor is 1, so SUM is the same).

The learning rate stays at its peak after the warm-up (no decay phase), so a step's loss does not depend on
``--training.steps``. Then torchtitan's own ``main(Trainer)`` runs with the command-line flags given, e.g.
``torchrun --nproc-per-node=2 titan_cpu.py --parallelism.data_parallel_shard_degree=2 --training.steps=8``.
"""

import dataclasses
import sys
import types

# torchtitan's ConfigManager.parse_args reads sys.argv as a default argument, bound when torchtitan is imported
sys.argv = [sys.argv[0], "--model.name=dspark_debug", "--model.flavor=debugmodel", "--metrics.log_freq=1",
            "--training.local_batch_size=2", "--training.seq_len=32", "--activation_checkpoint.mode=none",
            "--lr_scheduler.warmup_steps=2", "--lr_scheduler.decay_ratio=0", "--debug.seed=0", *sys.argv[1:]]

import torch  # noqa: E402
from torch.utils.data import IterableDataset  # noqa: E402
from torchtitan.components.dataloader import ParallelAwareDataloader  # noqa: E402
from torchtitan.models import llama3  # noqa: E402
from torchtitan.protocols.train_spec import register_train_spec  # noqa: E402
from torchtitan.train import Trainer, main  # noqa: E402

# torch.cpu plus the few torch.cuda calls torchtitan makes for its memory monitor (no memory stats on CPU)
cpu_module = types.SimpleNamespace(
    set_device=lambda device: None, current_device=lambda: 0, synchronize=torch.cpu.synchronize,
    get_device_name=lambda device=None: "cpu", get_device_properties=lambda device=None: types.SimpleNamespace(
        total_memory=1 << 34), reset_peak_memory_stats=lambda device=None: None, empty_cache=lambda: None,
    memory_stats=lambda device=None: {})
for name, module in list(sys.modules.items()):
    if name.startswith("torchtitan") and getattr(module, "device_type", None) == "cuda":
        module.device_type = "cpu"
        if hasattr(module, "device_module"):
            module.device_module = cpu_module

VOCAB = 256


class RandomIds(IterableDataset):
    """An endless stream of (``{"input": ids}``, next-token labels) from a generator seeded by the dp rank."""

    def __init__(self, seq_len: int, dp_rank: int):
        self.seq_len, self.dp_rank, self.taken = seq_len, dp_rank, 0

    def __iter__(self):
        generator = torch.Generator().manual_seed(1000 + self.dp_rank)
        for _ in range(self.taken):
            torch.randint(VOCAB, (self.seq_len + 1,), generator=generator)
        while True:
            ids = torch.randint(VOCAB, (self.seq_len + 1,), generator=generator)
            self.taken += 1
            yield {"input": ids[:-1]}, ids[1:]

    def state_dict(self):
        return {"taken": self.taken}

    def load_state_dict(self, state):
        self.taken = state["taken"]


def build_random_dataloader(dp_world_size, dp_rank, tokenizer, job_config, infinite=True):
    dataset = RandomIds(job_config.training.seq_len, dp_rank)
    return ParallelAwareDataloader(dataset, dp_rank=dp_rank, dp_world_size=dp_world_size,
                                   batch_size=job_config.training.local_batch_size)


def parallelize_for_gloo(model, parallel_dims, job_config):
    model = llama3.parallelize_llama(model, parallel_dims, job_config)
    for module in model.modules():
        if hasattr(module, "set_force_sum_reduction_for_comms"):
            module.set_force_sum_reduction_for_comms(True)
    return model


flavour = llama3.TransformerModelArgs(dim=64, n_layers=4, n_heads=4, vocab_size=VOCAB, rope_theta=500000)
register_train_spec("dspark_debug", dataclasses.replace(
    llama3.get_train_spec(), model_args={"debugmodel": flavour}, build_tokenizer_fn=None,
    build_dataloader_fn=build_random_dataloader, build_validator_fn=None,
    parallelize_fn=parallelize_for_gloo))

if __name__ == "__main__":
    main(Trainer)
