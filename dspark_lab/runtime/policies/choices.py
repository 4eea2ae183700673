"""The values the built-in policies accept, apart from the code that applies them (which imports torch), so that
registering the policies plugin costs no torch import: every verb loads every plugin, and those that only plan
(``plan``, ``schedule simulate``) must start fast."""

GRAD_SYNC = ("builtin", "ring", "tree", "packed-trees", "bf16", "fp8")  # comm.grad_sync
COMPRESSED = ("bf16", "fp8")  # the lossy ones, compressed with error feedback
CHECKPOINTING = ("none", "full", "every-2", "every-4")  # memory.activation_checkpointing
OFFLOAD = ("off", "host", "host-fp8")  # memory.activation_offload
PLACEMENT = ("static", "eplb", "dspark")  # moe.placement
