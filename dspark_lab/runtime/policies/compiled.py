"""Memory policies on modules ``torch.compile`` compiled: which are sound, and why the others are refused.

Measured on torch 2.13 (CPU; Inductor, ``aot_eager`` and ``eager`` backends alike), tests/test_compiled_policies.py:

- ``memory.activation_offload`` applies to any compiled module. AOTAutograd's compiled function keeps what its
  graph saves through ``ctx.save_for_backward``, so autograd's saved-tensor hooks (:class:`.memory.SavedActivations`)
  see, count and offload exactly those tensors; switching them costs no recompile and no graph break, and
  ``host`` gives bit-equal gradients.
- ``memory.activation_checkpointing`` applies to blocks compiled one by one (torchtitan's ``torch.compile(block)``,
  or ``block.compile()``): torch's non-reentrant checkpoint goes *around* the call of the compiled block, so
  backward recomputes by running the same compiled graph again (a cache hit, not a recompile), with bit-equal
  losses and gradients and only the block's input kept. For ``block.compile()`` the compiled call lives in the
  block's ``_compiled_call_impl`` and the checkpoint wraps that (:func:`checkpointed_attribute`): wrapping
  ``forward`` there would change the code Dynamo traced.
  torchtitan 0.2.2's debug model with ``--compile.enable`` (Inductor, FSDP2, 2 CPU ranks): switched on live at
  step 6, the same losses as plain torchrun, no recompile, peak saved bytes 739072 -> 110336.
- Refused: a block inside a bigger compiled module (a whole-model compile): its forward is part of that module's
  graph, so a checkpoint put on it is traced into the graph: one switch on a 3-block model built 6 new graphs
  with 17 graph breaks (on the checkpoint's saved-tensor hooks), a few more switches hit Dynamo's recompile limit;
  with ``fullgraph=True`` the switch fails outright. Also refused: a script's own checkpointing
  (``checkpoint_wrapper``, transformers' flag) compiled into a block's graph (torchtitan's AC with compile), which
  switching would recompile the same way.
- The runtime's own module hooks stay off blocks inside a compiled graph (:func:`hookable_blocks`).

Nothing here imports torch: :mod:`.builtin` (loaded by every verb) asks :func:`checkpointing_refusal`.
"""

from __future__ import annotations

ROOT = "model"


def compiled_call(module) -> bool:
    """True for a module compiled by ``module.compile()``: its ``__call__`` runs the compiled ``_call_impl``."""
    return module.__dict__.get("_compiled_call_impl") is not None


def checkpointed_attribute(block) -> str:
    """The instance attribute the checkpointing policy wraps on ``block``: the compiled call of a
    ``block.compile()``d block (so the checkpoint runs outside its graph), else ``forward``."""
    return "_compiled_call_impl" if compiled_call(block) else "forward"


def _compiled_modules(job) -> list[tuple[str, object]]:
    """(path, module) of each compiled module of the job's model; a path not found in it (a compile around a
    wrapper the runtime looks through) stands for the whole model."""
    if not isinstance(job.compiled, list):
        return [(ROOT, job.model)]
    named = dict(job.model.named_modules())
    found = []
    for path in job.compiled:
        name = "" if path == ROOT else path.removeprefix(ROOT + ".")
        found.append((path, named.get(name, job.model)))
    return found


def _listed(names: list[str], shown: int = 3) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _holding_blocks(job) -> list[tuple[str, set[int]]]:
    """(path, ids of the blocks it holds) of each compiled module with repeated blocks inside its graph."""
    blocks = {id(block) for block in job.blocks}
    held = [(path, {id(inner) for inner in module.modules() if inner is not module} & blocks)
            for path, module in _compiled_modules(job)]
    return [(path, ids) for path, ids in held if ids]


def hookable_blocks(job) -> list:
    """The blocks whose module hooks run outside any compiled graph. A hook on a block inside one is traced into
    it: Dynamo guards on what the hook changes (the offloader's group counter) and recompiles at every step, until
    its recompile limit makes it run the model uncompiled."""
    inside = set().union(*(ids for _, ids in _holding_blocks(job))) if job.compiled else set()
    return [block for block in job.blocks if id(block) not in inside]


def checkpointing_refusal(job) -> str | None:
    """Why the checkpointing policy cannot switch this compiled job's blocks without recompiling, or None."""
    holding = [path for path, _ in _holding_blocks(job)]
    if holding:
        return (f"torch.compile compiled {_listed(holding)}, which holds the repeated blocks: a checkpoint put on a "
                "block inside a compiled graph is traced into it, so every switch would recompile (compile each "
                "block instead, as torchtitan does: checkpointing then wraps the compiled block from outside)")
    from dspark_lab.runtime.policies import own_checkpointing  # imports torch: once a job runs

    paths = {id(module): path for path, module in _compiled_modules(job)}
    own_inside = [paths[id(block)] for block in job.blocks
                  if id(block) in paths and own_checkpointing.own(block)]
    if own_inside:
        return (f"the script's own {own_checkpointing.describe(job.blocks)} is compiled into the graphs of "
                f"{_listed(own_inside)}: switching it would recompile them")
    return None
