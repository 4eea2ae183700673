"""Memory policies: activation checkpointing and activation offload, plus the saved-activation byte counter.

- Activation checkpointing (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost") recomputes a block's
  forward during backward instead of keeping its activations. We use torch's non-reentrant
  ``torch.utils.checkpoint`` and install it by replacing the block's ``forward`` on the instance, so the module tree
  and ``state_dict`` keys never change (torch's ``checkpoint_wrapper`` would add a ``_checkpoint_wrapped_module.``
  prefix to every key).
- Activation offload (as in ZeRO-Offload / "Capuchin"-style swapping) moves tensors saved for backward into host
  buffers from the backend's allocator hook, through autograd's saved-tensor hooks; ``host-fp8`` stores them as FP8
  e4m3 with one scale per 1x128 tile (the DeepSeek-V3 layout), about 4x fewer bytes than fp32, lossy. The copies,
  their streams and events and the prefetch ahead of backward are :mod:`.offload`'s.

One pair of saved-tensor hooks (:class:`SavedActivations`) does both the offload and the counting, so the byte count
is of what is really held: on a CPU backend ``host`` holds the same bytes and has no memory effect.

- ``reshard_after_forward`` (FSDP2, Zhao et al. 2023 "PyTorch FSDP"; ZeRO-3 vs ZeRO-2 in Rajbhandari et al. 2020):
  after a block's forward, free its all-gathered weights (gather again for backward) or keep them until backward.
  Switched through FSDP2's own ``FSDPModule.set_reshard_after_forward``; the math is the same either way.
"""

from __future__ import annotations

import functools
import weakref
from typing import Callable

import torch
from torch.nn.modules.batchnorm import _NormBase
from torch.utils.checkpoint import checkpoint

from dspark_lab.allocator import HostPool
from dspark_lab.runtime.discover import fsdp2_groups, fsdp2_modules
from dspark_lab.runtime.module_hooks import InstanceForward
from dspark_lab.runtime.policies import compiled, own_checkpointing
from dspark_lab.runtime.policies.choices import CHECKPOINTING
from dspark_lab.runtime.policies.offload import Offloader

MIN_OFFLOAD_BYTES = 1 << 14  # tiny tensors (masks, indices, scalars) are not worth a copy


def _is_wrapper_subclass(tensor: torch.Tensor) -> bool:
    """A tensor subclass with no storage of its own (DTensor, FSDP's views): its ``untyped_storage`` is invalid."""
    return type(tensor) not in (torch.Tensor, torch.nn.Parameter) and hasattr(tensor, "__tensor_flatten__")


class _Held(tuple):
    """A saved tensor kept as it is: ``(tensor, counter, key, version)``. A tuple, built and read by C code, so the
    Python a kept tensor costs is :meth:`SavedActivations.pack`, :func:`_unpack` and this ``__del__``, which
    releases its storage's bytes from the count when autograd drops it."""

    __slots__ = ()

    @property
    def tensor(self):
        return tuple.__getitem__(self, 0)

    def __del__(self):
        counter, key = tuple.__getitem__(self, 1), tuple.__getitem__(self, 2)
        refs = counter._refs
        ref = refs.get(key)
        if ref is not None:
            ref[0] -= 1
            if not ref[0]:
                del refs[key]
                counter.held -= ref[1]


class _HeldOffloaded(_Held):
    """A saved tensor in host buffers: ``(Offloaded, counter, key)``; unpacking it brings it back."""

    __slots__ = ()

    def __getitem__(self, index):
        _, counter, _ = self
        return counter.offloader.unpack(tuple.__getitem__(self, 0))


def _kept(tensor: torch.Tensor) -> torch.Tensor:
    """What a pack keeps of a tensor that needs its gradient: an alias without autograd history (``detach``, the
    same storage and version counter). Holding the tensor itself would close a reference cycle when an op saves its
    own output (tensor -> grad_fn -> saved value -> tensor) that Python's collector cannot see through autograd's
    C++ nodes: a forward whose graph is dropped without backward (an evaluation without ``no_grad``) would keep
    its saved outputs, and their bytes in the count, for the rest of the run (torch's ``saved_tensors_hooks``
    warns of this). About 0.5 us a tensor (1.6 on a loaded machine)."""
    return tensor.detach() if tensor.requires_grad else tensor


def _unpack(packed: tuple) -> torch.Tensor:
    """The unpack hook: the tensor :meth:`SavedActivations.pack` kept, after the check PyTorch makes itself only
    when no saved-tensor hooks are installed: that it was not modified in place since it was saved (its version).
    Without it a script that changes a saved tensor in place, which fails under plain torchrun, would compute wrong
    gradients here. ``(tensor, version)`` passed through or a :class:`_Held` is checked; a :class:`_HeldOffloaded`
    (3 items; its source may be gone: the point of offload) and ``(tensor,)`` (a kind pack could not look into)
    are not."""
    tensor = packed[0]
    if len(packed) in (2, 4):
        saved = packed[-1]
        if tensor._version != saved:
            raise RuntimeError(
                "one of the variables needed for gradient computation has been modified by an inplace operation: "
                f"[{tensor.type()} {list(tensor.shape)}] is at version {tensor._version}; expected version {saved} "
                "instead (checked by dspark-lab's saved-tensor hooks, as PyTorch checks without them)")
    return tensor


_Tensor, _Parameter = torch.Tensor, torch.nn.Parameter


class SavedActivations:
    """Autograd saved-tensor hooks that count bytes held for backward and, when asked, offload them.

    ``held`` / ``peak`` are bytes of distinct storages kept for backward (a storage saved by several ops counts
    once); parameters are not activations and are never counted or moved. ``reset_peak()`` starts a new step.

    Cost: they see every tensor autograd saves (about a hundred a step in the demo model), so the common case, a
    plain tensor kept as it is, runs one Python function on pack (:meth:`pack`, no ``isinstance`` against
    ``Parameter``, whose metaclass check is Python), one on unpack (:func:`_unpack`, the in-place check) and one on
    release (``_Held.__del__``).
    The parameter storages are read once per step (:meth:`refresh_params`), not per tensor.
    """

    def __init__(self, param_storages: Callable[[], set[int]] = set, allocator_factory=None, copies_factory=None):
        self.held = 0
        self.peak = 0
        self._refs: dict[object, list[int]] = {}  # key -> [references, bytes]
        self._offloaded: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self._param_storages = param_storages
        self._params: set[int] = param_storages()
        self.offloader = Offloader(allocator_factory or HostPool, copies_factory)
        self._mode = "off"
        self._hooks = None
        self._seen: set[int] | None = None  # storages pack received while a checkpoint saved its inputs

    @property
    def mode(self) -> str:
        """``off``, ``host`` or ``host-fp8`` (``memory.activation_offload``); the offloader's block hooks are on
        only while it is not ``off``."""
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        self._mode = value
        self.offloader.activate(value != "off")

    def refresh_params(self) -> None:
        """Read the parameter storages again (the model was found or changed; and at every step boundary)."""
        self._params = self._param_storages()

    # --- accounting --------------------------------------------------------------------------------------------

    def _hold(self, key, nbytes: int) -> None:
        ref = self._refs.get(key)
        if ref is None:
            self._refs[key] = [1, nbytes]
            self.held += nbytes
            if self.held > self.peak:
                self.peak = self.held
        else:
            ref[0] += 1

    def release(self, key) -> None:
        ref = self._refs.get(key)
        if ref is None:
            return
        ref[0] -= 1
        if ref[0] == 0:
            del self._refs[key]
            self.held -= ref[1]

    def reset_peak(self) -> int:
        """Return the peak since the last reset and start counting from what is held now (a step boundary)."""
        peak, self.peak = self.peak, self.held
        self.offloader.poll()
        self.refresh_params()
        return peak

    def track_blocks(self, blocks) -> None:
        """Group offloaded tensors by these blocks' forward calls, so backward can prefetch one block ahead."""
        self.offloader.track_blocks(blocks)

    # --- hooks -------------------------------------------------------------------------------------------------

    def pack(self, tensor: torch.Tensor, offload: bool = True):
        """What autograd keeps of a saved tensor: ``(tensor, version)`` for one not counted (a parameter, a view of
        one), a :class:`_Held` for one counted, a :class:`_HeldOffloaded` for one moved to host buffers, ``(tensor,)``
        for a kind it cannot look into (:func:`_unpack` checks the version of the first two)."""
        if self._seen is not None:
            self._seen.add(_storage_ptr(tensor))
        try:
            kind = type(tensor)
            if kind is not _Tensor:  # a parameter (kept as it is), a DTensor, another subclass: the careful path
                return (tensor, tensor._version) if kind is _Parameter else self._pack_other(tensor, offload)
            storage = tensor.untyped_storage()
            ptr = storage.data_ptr()
            if not ptr or ptr in self._params:  # a weight's storage, or none (nothing to count, still no cycle)
                return (tensor, tensor._version) if ptr else (_kept(tensor), tensor._version)
            base = tensor._base
            if base is not None and type(base) is not _Tensor and isinstance(base, _Parameter):
                # a view of a weight (FSDP2's unsharded weights live in fresh storage every step)
                return (tensor, tensor._version)
            nbytes = storage.nbytes()
            if offload and self._mode != "off" and nbytes >= MIN_OFFLOAD_BYTES and tensor.is_floating_point():
                return self._offload(tensor, ptr)
            refs = self._refs
            ref = refs.get(ptr)
            if ref is None:
                refs[ptr] = [1, nbytes]
                held = self.held = self.held + nbytes
                if held > self.peak:
                    self.peak = held
            else:
                ref[0] += 1
            # _kept, inline: one Python call less per saved tensor on the path every step takes
            return _Held((tensor.detach() if tensor.requires_grad else tensor, self, ptr, tensor._version))
        except RuntimeError:  # a tensor kind we cannot look into: keep it as it is, never fail the user's forward
            return (tensor,)

    def _pack_other(self, tensor: torch.Tensor, offload: bool):
        if _is_wrapper_subclass(tensor):  # a DTensor (TP): count its local shard, never move the wrapper
            local = getattr(tensor, "_local_tensor", None)
            if isinstance(local, torch.Tensor) and not _is_wrapper_subclass(local):
                ptr = local.untyped_storage().data_ptr()
                if ptr and ptr not in self._params:
                    self._hold(ptr, local.untyped_storage().nbytes())
                    return _Held((_kept(tensor), self, ptr, tensor._version))
            return (tensor,)
        if isinstance(tensor, torch.nn.Parameter) or isinstance(tensor._base, torch.nn.Parameter):
            return (tensor, tensor._version)  # a weight or a view of one
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr == 0 or ptr in self._params:
            return (tensor, tensor._version)
        nbytes = storage.nbytes()
        if offload and self._mode != "off" and nbytes >= MIN_OFFLOAD_BYTES and tensor.is_floating_point():
            return self._offload(tensor, ptr)
        self._hold(ptr, nbytes)
        return _Held((_kept(tensor), self, ptr, tensor._version))

    def _offload(self, tensor: torch.Tensor, ptr: int):
        # One copy per tensor saved several times (y * y saves y twice). The original may be freed once copied and
        # its address reused by another tensor, so a cached copy counts only while its source tensor is alive.
        view_key = (ptr, tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()), tensor._version)
        packed = self._offloaded.get(view_key)
        if packed is None or packed.source() is not tensor:
            packed = self.offloader.offload(tensor, fp8=self._mode == "host-fp8")
            self._offloaded[view_key] = packed
        self._hold(id(packed), packed.nbytes)
        return _HeldOffloaded((packed, self, id(packed)))

    def unpack(self, packed):
        """The tensor :meth:`pack` kept (brought back from host buffers if it was offloaded)."""
        return _unpack(packed) if isinstance(packed, tuple) else packed

    def install(self) -> None:
        """Push the hooks for the rest of this thread's life (forward passes run on the training thread)."""
        if self._hooks is None:
            self.refresh_params()
            self._hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, _unpack)
            self._hooks.__enter__()

    def uninstall(self) -> None:
        if self._hooks is not None:
            self._hooks.__exit__(None, None, None)
            self._hooks = None

    def checkpoint(self, function, args, kwargs):
        """Run torch's non-reentrant checkpoint of ``function`` and count the inputs it keeps for recomputation.

        Inputs the checkpoint saves through autograd (torch >= 2.1 saves the positional ones with
        ``save_for_backward``) went through :meth:`pack`, offloaded or counted there; the others (tensor keyword
        arguments, which the checkpoint keeps in a closure) are counted here, until the output's backward ran.
        """
        outer, self._seen = self._seen, set()
        try:
            output = checkpoint(function, *args, use_reentrant=False, **kwargs)
            seen = self._seen
        finally:
            self._seen = outer
        first = output[0] if isinstance(output, (tuple, list)) else output
        kept = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor) and _storage_ptr(t) not in seen]
        self.hold_until_backward(kept, first)
        return output

    def hold_until_backward(self, tensors, output) -> None:
        """Count ``tensors`` (kept by a checkpoint outside autograd's saved tensors) until ``output``'s backward."""
        grad_fn = getattr(output, "grad_fn", None)
        if grad_fn is None or not tensors:
            return
        # counted only: the checkpoint keeps these tensors itself, so a host copy would free nothing
        held = [self.pack(t, offload=False) for t in tensors]
        def release(*_):
            held.clear()
        grad_fn.register_hook(release)


def _storage_ptr(tensor: torch.Tensor) -> int | None:
    """The tensor's storage address (a DTensor's: its local shard's); None when it has no storage to look at."""
    try:
        if _is_wrapper_subclass(tensor):
            tensor = tensor._local_tensor
        return tensor.untyped_storage().data_ptr()
    except (RuntimeError, AttributeError):
        return None


# --- activation checkpointing ------------------------------------------------------------------------------------


def blocks_to_checkpoint(policy: str, count: int) -> list[int]:
    """Indices of the blocks a checkpointing policy wraps: all, every 2nd or every 4th (starting with the first)."""
    if policy == "none":
        return []
    every = 1 if policy == "full" else int(policy.split("-")[1])
    return list(range(0, count, every))


def _checkpointed_forward(original, norms, tracker, *args, **kwargs):
    if not torch.is_grad_enabled():
        return original(*args, **kwargs)
    function = _restoring_running_stats(original, norms) if norms else original
    if tracker is None:
        return checkpoint(function, *args, use_reentrant=False, **kwargs)
    return tracker.checkpoint(function, args, kwargs)


def _restoring_running_stats(original, norms):
    """``original`` for one checkpointed call: the checkpoint runs it again in backward, where a training-mode
    BatchNorm would update its running statistics (and ``num_batches_tracked``) a second time; the second run
    puts back what the first left, so the module's state is what it is without checkpointing."""
    calls = 0

    def run(*args, **kwargs):
        nonlocal calls
        calls += 1
        live = [m for m in norms if m.training and m.track_running_stats] if calls > 1 else []
        kept = [(b, b.clone()) for m in live for b in (m.running_mean, m.running_var, m.num_batches_tracked)
                if b is not None]
        try:
            return original(*args, **kwargs)
        finally:
            with torch.no_grad():
                for buffer, value in kept:
                    buffer.copy_(value)
    return run


def set_checkpointing(blocks, policy: str, tracker: SavedActivations | None = None) -> tuple[list[int], int]:
    """Make exactly the blocks that ``policy`` names checkpointed; returns their indices and how many of them the
    script's own checkpointing covers (:mod:`.own_checkpointing`).

    A block the script checkpoints itself is switched through the script's own mechanism and never gets a second
    checkpoint. Others get an instance attribute ``forward``
    (:class:`~dspark_lab.runtime.module_hooks.InstanceForward`): module hooks, parameters and ``state_dict`` keys
    stay as they were, deleting the attribute restores the class's forward, and a copy of the block
    (``copy.deepcopy``, pickle) gets its plain forward. A ``block.compile()``d block gets it on its compiled call
    instead (:mod:`.compiled`), so the checkpoint runs the compiled graph and never changes what it traced.
    """
    wanted = set(blocks_to_checkpoint(policy, len(blocks)))
    by_script = 0
    for index, block in enumerate(blocks):
        if own_checkpointing.own(block):
            own_checkpointing.switch(block, index in wanted)
            by_script += index in wanted
            continue
        attribute = compiled.checkpointed_attribute(block)  # a block.compile()d block: its compiled call
        wrapped = isinstance(block.__dict__.get(attribute), InstanceForward)
        if index in wanted and not wrapped:
            norms = [m for m in block.modules() if isinstance(m, _NormBase)]
            replaced = block.__dict__.get(attribute)  # a script's own instance forward, if any
            setattr(block, attribute, InstanceForward(
                block, functools.partial(_checkpointed_forward, getattr(block, attribute), norms, tracker), replaced))
        elif index not in wanted and wrapped:
            replaced = block.__dict__.pop(attribute).replaced
            if replaced is not None:
                setattr(block, attribute, replaced)
    return sorted(wanted), by_script


def checkpointing_in_force(blocks) -> str | None:
    """The policy value the script's own checkpointing amounts to (``full``, ``every-2``, ...), or None where the
    script checkpoints no block itself or a pattern no value names."""
    on = [index for index, block in enumerate(blocks) if own_checkpointing.is_on(block)]
    if not on:
        return None
    return next((policy for policy in CHECKPOINTING if blocks_to_checkpoint(policy, len(blocks)) == on), None)


# --- FSDP2 resharding --------------------------------------------------------------------------------------------


def _reshardable(model) -> list:
    """The FSDP2 modules whose reshard_after_forward matters: every one but the root (FSDP2 never reshards the
    root after forward, it would all-gather again at once for backward), or the root when it is the only one."""
    modules = fsdp2_modules(model)
    inner = [m for name, m in modules if name]
    return inner or [m for _, m in modules]


def reshard_after_forward(model) -> bool | str | None:
    """The setting in force: True, False, "mixed", or None when no FSDP2 module holds parameters."""
    settings = {g.post_forward_mesh_info is not None for m in _reshardable(model) for g in fsdp2_groups(m)}
    return settings.pop() if len(settings) == 1 else ("mixed" if settings else None)


def set_reshard_after_forward(model, value: bool) -> int:
    """Switch FSDP2's reshard_after_forward through its own API on every module it matters for; returns how many."""
    modules = _reshardable(model)
    for module in modules:
        module.set_reshard_after_forward(bool(value), recurse=False)
    return len(modules)
