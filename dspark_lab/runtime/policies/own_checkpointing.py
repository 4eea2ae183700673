"""Activation checkpointing a script switched on itself, seen and switched by the checkpointing policy.

Many jobs checkpoint their blocks before the runtime sees them. Without knowing it, ``memory.activation_checkpointing``
would read ``none`` while every block recomputes, would stack a second checkpoint on a block (a third forward in
backward, no memory saved) and could never switch the script's own off to buy the speed back. Two kinds are
recognised on a repeated block:

- ``transformers``: a Hugging Face ``GradientCheckpointingLayer`` whose instance flag ``gradient_checkpointing`` was
  set by ``model.gradient_checkpointing_enable()`` or ``TrainingArguments(gradient_checkpointing=True)``; switched
  through that same flag (the layer checks it on every call).
- ``checkpoint_wrapper``: torch's ``CheckpointWrapper`` (``checkpoint_wrapper``, ``apply_activation_checkpointing``),
  which torchtitan, Lightning's FSDP strategies and Accelerate put around blocks; switched off by an instance
  ``forward`` that calls the wrapped module directly (module tree and ``state_dict`` keys unchanged), on again by
  removing it. A selective (``context_fn``) policy the script gave its wrapper is kept when it is on.

What the script had is read the first time a block is seen and kept weakly, so switching back restores exactly it.
"""

from __future__ import annotations

import weakref

from dspark_lab.runtime.discover import user_class
from dspark_lab.runtime.module_hooks import InstanceForward

TRANSFORMERS = "transformers"
CHECKPOINT_WRAPPER = "checkpoint_wrapper"

_script_had: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # block -> kind of its own checkpointing


def _kind(block) -> str | None:
    if isinstance(getattr(block, "gradient_checkpointing", None), bool) and hasattr(block,
                                                                                   "_gradient_checkpointing_func"):
        return TRANSFORMERS
    if any(cls.__name__ == "CheckpointWrapper" for cls in user_class(block).__mro__) \
            and hasattr(block, "_checkpoint_wrapped_module"):
        return CHECKPOINT_WRAPPER
    return None


def _bypassed(block) -> bool:
    forward = block.__dict__.get("forward")
    return isinstance(forward, InstanceForward) and forward.function is block._modules.get("_checkpoint_wrapped_module")


def own(block) -> str | None:
    """The kind of checkpointing the script itself put on ``block`` (as first seen), or None."""
    if block not in _script_had:
        kind = _kind(block)
        on = kind == CHECKPOINT_WRAPPER or (kind == TRANSFORMERS and block.gradient_checkpointing)
        _script_had[block] = kind if on else None
    return _script_had[block]


def is_on(block) -> bool:
    """Whether the script's own checkpointing runs on ``block`` now."""
    kind = own(block)
    if kind == TRANSFORMERS:
        return bool(block.gradient_checkpointing)
    return kind == CHECKPOINT_WRAPPER and not _bypassed(block)


def switch(block, on: bool) -> None:
    """Switch the script's own checkpointing of ``block`` on or off (a block without any is left alone)."""
    kind = own(block)
    if kind == TRANSFORMERS:
        block.gradient_checkpointing = on
    elif kind == CHECKPOINT_WRAPPER and on and _bypassed(block):
        del block.__dict__["forward"]
    elif kind == CHECKPOINT_WRAPPER and not on and not _bypassed(block):
        block.forward = InstanceForward(block, block._checkpoint_wrapped_module, None)


def describe(blocks) -> str:
    """Which of the script's own kinds the blocks carry, for an event's reason ("" when none)."""
    kinds = sorted({kind for kind in map(own, blocks) if kind})
    names = {TRANSFORMERS: "transformers gradient_checkpointing", CHECKPOINT_WRAPPER: "torch checkpoint_wrapper"}
    return " and ".join(names[k] for k in kinds)
