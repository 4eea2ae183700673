"""Discovery (issue 12 §2, issue 13's mixed container): blocks in any container, real torch.compile detection, the
``job`` description, policy state owned through ``dspark_job_started``, and a change sent before discovery."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from dspark_lab.errors import PolicyError
from dspark_lab.plugins import make_manager
from dspark_lab.runtime import discover
from dspark_lab.runtime.attach import Job
from dspark_lab.runtime.policies import builtin as builtin_policies
from dspark_lab.runtime.policies.comm import CommState
from dspark_lab.runtime.policies.sched import PipelineState
from dspark_lab.runtime.policy_state import NOT_DISCOVERED
from dspark_lab.runtime.records import RunDir


class Block(nn.Module):
    def __init__(self, width=16):
        super().__init__()
        self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


def mixed_sequential(n=4):
    return nn.Sequential(nn.Linear(8, 16), *[Block() for _ in range(n)], nn.Linear(16, 1))


class HFStyle(nn.Module):
    """``model.transformer.h`` as in GPT-2, with an embedding and a head of other types around it."""

    def __init__(self):
        super().__init__()
        self.transformer = nn.Module()
        self.transformer.wte = nn.Embedding(32, 16)
        self.transformer.h = nn.ModuleList(Block() for _ in range(3))
        self.transformer.ln_f = nn.LayerNorm(16)
        self.lm_head = nn.Linear(16, 32)


class LlamaStyle(nn.Module):
    """``model.model.layers`` as in Hugging Face's LlamaForCausalLM."""

    def __init__(self):
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(32, 16)
        self.model.layers = nn.ModuleList(Block() for _ in range(2))
        self.model.norm = nn.LayerNorm(16)
        self.lm_head = nn.Linear(16, 32)


class TitanStyle(nn.Module):
    """torchtitan's ``model.layers`` is an nn.ModuleDict keyed "0", "1", ..."""

    def __init__(self):
        super().__init__()
        self.tok_embeddings = nn.Embedding(32, 16)
        self.layers = nn.ModuleDict({str(i): Block() for i in range(5)})
        self.norm = nn.LayerNorm(16)
        self.output = nn.Linear(16, 32)


@pytest.mark.parametrize("model, count, path", [
    (mixed_sequential(), 4, "model[1:5]"),
    (HFStyle(), 3, "model.transformer.h"),
    (LlamaStyle(), 2, "model.model.layers"),
    (TitanStyle(), 5, "model.layers"),
])
def test_blocks_are_the_longest_same_type_run_in_any_container(model, count, path):
    found = discover.find_blocks(model)
    assert (found.kind, len(found.modules), found.path) == ("Block", count, path)
    assert all(type(b) is Block for b in found.modules)
    assert path in found.why


def test_longer_run_wins_and_parameterless_runs_are_not_blocks():
    model = nn.Sequential(nn.ReLU(), nn.ReLU(), nn.ReLU(), nn.ReLU(), nn.ReLU(), Block(), Block())
    assert discover.find_blocks(model).path == "model[5:7]"
    assert discover.find_blocks(nn.Sequential(nn.Linear(2, 2), nn.ReLU())).modules == []


class LlamaLayer(nn.Module):
    """Hugging Face's LlamaDecoderLayer: four projections in attention and three in the MLP, each a Linear."""

    def __init__(self, width=16):
        super().__init__()
        self.self_attn = nn.Module()
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self.self_attn, name, nn.Linear(width, width))
        self.mlp = nn.Module()
        self.mlp.gate_proj, self.mlp.up_proj = nn.Linear(width, 2 * width), nn.Linear(width, 2 * width)
        self.mlp.down_proj = nn.Linear(2 * width, width)
        self.input_layernorm, self.post_attention_layernorm = nn.LayerNorm(width), nn.LayerNorm(width)


@pytest.mark.parametrize("layers", [2, 3, 4])
def test_a_small_llama_s_blocks_are_its_layers_not_the_projections_of_one_attention(layers):
    # a debug-sized LlamaForCausalLM (1 to 4 layers) used to give "4 x Linear at model.model.layers.0.self_attn":
    # checkpointing one layer's projections, each of which keeps its input anyway
    model = nn.Module()
    model.model = nn.Module()
    model.model.embed_tokens = nn.Embedding(32, 16)
    model.model.layers = nn.ModuleList(LlamaLayer() for _ in range(layers))
    model.lm_head = nn.Linear(16, 32)
    found = discover.find_blocks(model)
    assert (found.kind, len(found.modules), found.path) == ("LlamaLayer", layers, "model.model.layers")


def test_a_run_of_plain_layers_is_taken_when_nothing_holds_blocks():
    found = discover.find_blocks(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)))
    assert (found.kind, len(found.modules), found.path) == ("Linear", 3, "model")


@pytest.fixture
def job(tmp_path):
    from dspark_lab.backends import cpu

    manager = make_manager([cpu, builtin_policies], entry_points=False)
    job = Job(RunDir.create("20260101-000000-abcdef", {"name": "unit"}, root=tmp_path), rank=0, world=1,
              manager=manager)
    yield job
    job.close()


def test_policies_keep_their_state_through_dspark_job_started(job):
    assert isinstance(job.state["comm"], CommState) and job.state["comm"].grad_sync is None
    assert isinstance(job.state["pipeline"], PipelineState) and job.state["pipeline"].schedule is None
    assert not hasattr(job, "grad_sync") and not hasattr(job, "moe")


def test_ddp_knobs_do_not_matter_to_a_job_without_ddp(job):
    """``tune`` offers a launch-only key as "needs a restart" only where the job has what it acts on."""
    job.set_model(mixed_sequential())
    assert job.discovered
    for key in ("comm.bucket_mb", "comm.topology", "comm.grad_sync"):
        assert "no DistributedDataParallel model" in job.policy_state.not_here(key)
    assert job.policy_state.not_here("memory.activation_checkpointing") is None

@pytest.fixture
def one_rank_world():
    import torch.distributed as dist

    from dspark_lab.localhost import free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_get_shows_policies_a_ddp_job_cannot_use_as_not_applicable_with_the_reason(job, one_rank_world):
    from dspark_lab.runtime.control import policy_rows

    ddp = nn.parallel.DistributedDataParallel(mixed_sequential())
    job.on_ddp(ddp)
    rows = {row["key"]: row for row in policy_rows(job)}
    reshard = rows["memory.reshard_after_forward"]  # FSDP2's: a DDP job has nothing to reshard
    assert reshard["state"] == "not_applicable" and not reshard["applicable"]
    assert reshard["reason"].startswith("the model is not sharded with FSDP2's fully_shard")
    assert rows["comm.grad_sync"]["state"] == "applied" and rows["comm.grad_sync"]["reason"] is None

    def my_powersgd(state, bucket):
        return bucket

    ddp.register_comm_hook(None, my_powersgd)  # the script's own hook: the runtime's grad_sync no longer runs
    row = {row["key"]: row for row in policy_rows(job)}["comm.grad_sync"]
    assert row["state"] == "not_applicable" and not row["applicable"]
    assert row["reason"] == "the script registered its own DDP comm hook (my_powersgd)"


def test_a_refusal_names_at_most_three_compiled_blocks_and_counts_the_rest(job):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    model = mixed_sequential(5)
    for index in range(1, 6):  # torchtitan with AC and compile: the script's own checkpoint is inside each graph
        model[index] = torch.compile(checkpoint_wrapper(model[index]))
    job.set_model(model)
    assert job.compiled == [f"model.{i}" for i in range(1, 6)]
    with pytest.raises(PolicyError, match=r"compiled into the graphs of model.1, model.2, model.3 and 2 more: "):
        job.validate({"memory.activation_checkpointing": "full"})


def test_compiling_a_function_is_not_a_compiled_model(job):
    """torchtitan compiles flex_attention (a function) at import; that must not refuse memory policies."""
    job.on_compile(lambda q, k, v: q)
    job.set_model(mixed_sequential())
    assert job.compiled == [] and job.compiled_functions == 1
    job.validate({"memory.activation_checkpointing": "full"})
    assert job.describe()["compile"] == {"compiled": False, "modules": [], "functions_compiled": 1}


def test_a_compiled_block_is_found_and_a_compiled_container_named_in_the_refusal(job):
    model = mixed_sequential()
    model[2].compile()  # module.compile() of one block; nothing compiles until it runs
    job.set_model(model)
    assert job.compiled == ["model.2"]
    job.validate({"memory.activation_checkpointing": "full"})  # wrapped from outside its graph
    model = nn.Sequential(nn.Linear(8, 16), nn.Sequential(*[Block() for _ in range(4)]), nn.Linear(16, 1))
    model[1].compile()  # the container holding the blocks: they are inside its graph
    job.set_model(model)
    assert job.compiled == ["model.1"]
    with pytest.raises(PolicyError, match=r"torch.compile compiled model.1, which holds the repeated blocks"):
        job.validate({"memory.activation_checkpointing": "full"})


def test_torch_compile_of_the_model_is_seen_through_the_wrapper(job):
    model = mixed_sequential()
    job.on_compile(model)
    job.set_model(torch.compile(model))
    assert job.compiled == ["model"] and job.model is model


def test_a_change_before_discovery_waits_and_applies_after_the_first_step(job):
    model = mixed_sequential()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    # accepted, not refused with a false "no repeated blocks"
    assert job.validate({"memory.activation_checkpointing": "full"}) == {"memory.activation_checkpointing": "full"}
    failure, applied = job.apply_changes({"memory.activation_checkpointing": "full"})
    assert NOT_DISCOVERED in failure and applied == []
    assert job.describe()["policies"]["memory.activation_checkpointing"]["reason"] == NOT_DISCOVERED
    pending = job.request({"memory.activation_checkpointing": "full"})
    model(torch.randn(4, 8)).sum().backward()
    optimizer.step()
    job.on_step_end(optimizer)  # the first boundary: the model is found, then the queued change is announced
    job.on_step_end(optimizer)
    assert pending.state == "applied", pending.reason
    assert len(job.blocks) == 4 and all("forward" in b.__dict__ for b in job.blocks)


def test_a_true_refusal_after_discovery(job):
    job.set_model(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1)))
    with pytest.raises(PolicyError, match="no repeated blocks were found"):
        job.validate({"memory.activation_checkpointing": "full"})


def test_describe_reports_the_model_blocks_and_what_applies(job):
    job.set_model(TitanStyle())
    info = job.describe()
    assert info["model"]["class"].endswith("TitanStyle")
    assert info["blocks"]["path"] == "model.layers" and info["blocks"]["count"] == 5
    assert info["data_parallel"] is None and info["tensor_parallel"] is None and info["pipeline"] is None
    policies = info["policies"]
    assert policies["memory.activation_checkpointing"] == {"applies": True, "reason": None}
    grad_sync = policies["comm.grad_sync"]
    assert not grad_sync["applies"] and "DistributedDataParallel" in grad_sync["reason"]
    assert "fully_shard" in policies["memory.reshard_after_forward"]["reason"]
    assert info["mixed_precision"]["param_dtypes"] == {"torch.float32": 25}


def test_autocast_is_reported(job):
    model = mixed_sequential()
    job.set_model(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(2, 8))
    assert job.describe()["mixed_precision"]["autocast"] == "cpu:torch.bfloat16"


def test_autocast_entered_by_a_wrapper_of_the_models_own_forward_is_reported(job):
    # Accelerate's mixed_precision (and so the Hugging Face Trainer's bf16=True) replaces the model's forward with
    # one that enters autocast: the model's forward pre-hook runs before it, so status said "autocast: null"
    model = mixed_sequential()
    model.forward = torch.autocast("cpu", dtype=torch.bfloat16)(model.forward)
    job.set_model(model)
    model(torch.randn(2, 8))
    assert job.describe()["mixed_precision"]["autocast"] == "cpu:torch.bfloat16"


def test_no_autocast_is_reported_as_none(job):
    model = mixed_sequential()
    job.set_model(model)
    model(torch.randn(2, 8))
    model(torch.randn(2, 8))
    assert job.describe()["mixed_precision"]["autocast"] is None


# --- registration instead of sys.modules scanning ----------------------------------------------------------------


class ThirdPartyRouter(nn.Module):
    def __init__(self, experts):
        super().__init__()
        self.gate = nn.Linear(16, experts)

    def forward(self, x):
        return (self.gate(x).argmax(-1),)


class ThirdPartyMoE(nn.Module):
    """Not DSpark's class: meets the MoE layer contract of docs/runtime.md (router loads out, placement in)."""

    def __init__(self, experts=4):
        super().__init__()
        self.config = type("Config", (), {"experts": experts})()
        self.router = ThirdPartyRouter(experts)
        self.experts = nn.ModuleList(nn.Linear(16, 16) for _ in range(experts))
        self.phy2log = torch.arange(experts)
        self.last_rank_load = 0

    def set_placement(self, phy2log):
        self.phy2log = phy2log

    def forward(self, x):
        (chosen,) = self.router(x)
        self.last_rank_load = len(chosen)
        return torch.stack([self.experts[int(e)](row) for row, e in zip(x, chosen)])


def test_registered_moe_layers_are_steered_and_their_loads_recorded(tmp_path):
    from dspark_lab.backends import cpu

    layer = ThirdPartyMoE()
    model = nn.Sequential(nn.Linear(16, 16), layer)
    job = Job(RunDir.create("20260101-000000-abcdee", {"name": "moe"}, root=tmp_path), rank=0, world=1,
              manager=make_manager([cpu, builtin_policies], entry_points=False), registered={"moe_layers": [layer]})
    job.set_model(model)
    assert job.validate({"moe.placement": "eplb"}) == {"moe.placement": "eplb"}
    model(torch.randn(6, 16))
    record = job.manager.pm.hook.dspark_step_end(job=job, step=1)
    loads = next(r for r in record if r)["expert_loads"]
    assert sum(loads[0]) == 6 and job.describe()["policies"]["moe.placement"]["applies"] is True
    job.close()


def test_a_registered_layer_missing_the_contract_is_named(tmp_path):
    from dspark_lab.backends import cpu

    job = Job(RunDir.create("20260101-000000-abcded", {"name": "moe"}, root=tmp_path), rank=0, world=1,
              manager=make_manager([cpu, builtin_policies], entry_points=False),
              registered={"moe_layers": [nn.Linear(2, 2)]})
    with pytest.raises(PolicyError, match=r"^moe_layers\[0\]: Linear lacks config, router, phy2log, experts, "
                                          r"set_placement, last_rank_load \(the MoE layer contract"):
        job.set_model(nn.Sequential(nn.Linear(2, 2)))
    job.close()


def test_module_compile_goes_through_torch_compile_with_the_bound_call(job):
    block = Block()
    job.on_compile(block._call_impl)  # what nn.Module.compile() hands torch.compile
    model = nn.Sequential(nn.Linear(16, 16), block, Block())
    job.set_model(model)
    assert job.compiled == ["model.1"] and job.compiled_functions == 0


def test_weights_in_storage_the_runtime_never_saw_are_not_counted_as_activations():
    """FSDP2 all-gathers weights into new storage each step: they must not count as saved activations."""
    from dspark_lab.runtime.policies.memory import SavedActivations

    tracker = SavedActivations()  # knows no parameter storage at all
    layer = nn.Linear(256, 256, bias=False)
    x = torch.randn(4, 256, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(tracker.pack, tracker.unpack):
        y = layer(x)
    assert tracker.held == x.untyped_storage().nbytes()  # the input only, not the 256 KiB weight
    y.sum().backward()


def test_a_second_ddp_model_gets_the_gradient_sync_in_force_and_every_change(job, one_rank_world):
    from dspark_lab.runtime.policies import builtin

    generator = nn.parallel.DistributedDataParallel(mixed_sequential())
    job.on_ddp(generator)
    builtin.dspark_apply_policy(job, "comm.grad_sync", "bf16", "builtin")
    discriminator = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 1)))
    job.on_ddp(discriminator)  # a GAN's second network, built after the change
    assert job.ddp is generator and job.model is generator.module  # the job's model stays the first
    members = job.state["comm"].grad_sync.members
    assert [m.mode for m in members] == ["bf16", "bf16"]
    discriminator(torch.randn(4, 8)).sum().backward()  # its buckets go through the runtime's dispatcher
    assert members[1].take_comm_time() > 0 and members[0].take_comm_time() == 0
    builtin.dspark_apply_policy(job, "comm.grad_sync", "ring", "bf16")
    assert [m.mode for m in members] == ["ring", "ring"]
