"""Step metering: what one rank measures between two step boundaries, written as one metrics record per step.

Forward time runs from the boundary to the first backward, backward time is summed over ``torch.autograd.backward``
calls, and so is the loss (each one-element tensor backpropagated in the step: under gradient accumulation the
micro-batches' shares add up to the batch's loss), optimizer time from the step pre-hook to the boundary; samples
and tokens are counted from the model's first tensor argument. After a policy change whose effect is worth a number
(:data:`MEASURED`), the meter compares the :data:`EFFECT_STEPS` steps before the apply with the first
:data:`EFFECT_STEPS` after it and logs an ``effect`` event with the step-time and memory change. Nothing here waits
for the device: the loss is read one step late and memory counters every few steps (:mod:`.step_reads`).
"""

from __future__ import annotations

import time
from collections import deque
from statistics import median
from typing import Any

import psutil
import torch

from dspark_lab.runtime import step_env, step_reads
from dspark_lab.runtime.module_hooks import RuntimeHook

SAMPLE_EVERY_S = 1.0
EFFECT_STEPS = 3
MEASURED = ("memory.reshard_after_forward",)
MEMORY_FIELDS = ("memory_peak_bytes", "rss_bytes")


class StepMeter:
    """Per-step counters of one rank, and the record they become at each boundary."""

    def __init__(self, job):
        self.job = job
        self._process = psutil.Process()
        self._sampler = None
        self._last_sample = 0.0
        self.autocast: str | None = None  # "cuda:torch.bfloat16" when a forward ran under autocast
        self._recent: deque[dict] = deque(maxlen=EFFECT_STEPS)
        self._recent_memory: deque[dict] = deque(maxlen=EFFECT_STEPS)  # the last records with memory read
        self._watches: list[dict] = []
        self.memory_every = step_env.memory_every()
        self._memory_wanted: set[str] = set()
        # looked up at each write: a multi-node cluster swaps job._metrics for a relaying writer after this
        self._late = step_reads.LateLoss(job.write_metrics_record,
                                         late_on_cpu=step_env.loss_read() == "late")
        self._later: list = []  # (key, tensor, on_read) for this step's record, read with its loss
        self.reset(time.perf_counter())

    def reset(self, now: float) -> None:
        self._last_boundary = now
        self._first_backward = None
        self._backward_s = 0.0
        self._optimizer_start = None
        self._loss = None
        self._samples = 0
        self._tokens = 0

    # --- hooks the job installs --------------------------------------------------------------------------------

    def count_batch(self, module, args, kwargs):
        """Forward pre-hook on the model: samples and tokens of this call, and whether autocast is on."""
        first = next((a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)), None)
        if first is not None and first.dim() > 0:
            self._samples += first.shape[0]
            if not first.is_floating_point() and first.dim() >= 2:
                self._tokens += first.numel()
            if self.autocast is None:
                self._look_for_autocast(first.device.type)

    def _look_for_autocast(self, device: str) -> None:
        try:
            if torch.is_autocast_enabled(device):
                self.autocast = f"{device}:{torch.get_autocast_dtype(device)}"
        except (RuntimeError, TypeError, AttributeError):  # a device type autocast does not know, or
            # a torch before 2.4 (no device argument, no get_autocast_dtype): nothing to report
            self.autocast = ""

    def watch_autocast(self, block: torch.nn.Module) -> None:
        """Look once from inside the model's forward, at ``block``'s first call: autocast that a wrapper of the
        model's own ``forward`` enters (Accelerate's ``mixed_precision``, so the Hugging Face Trainer's
        ``bf16=True``) is not on yet in the model's forward pre-hook. The hook removes itself after that call."""
        def look(module, args):
            handle.remove()
            if self.autocast is None:
                first = next((a for a in args if isinstance(a, torch.Tensor)), None)
                param = next(module.parameters(), None)
                device = first if first is not None else param
                if device is not None:
                    self._look_for_autocast(device.device.type)

        handle = block.register_forward_pre_hook(RuntimeHook(look))

    def on_backward(self, tensors, run):
        start = time.perf_counter()
        if self._first_backward is None:
            self._first_backward = start
        if isinstance(tensors, torch.Tensor) and tensors.numel() == 1:
            # under gradient accumulation each micro-batch backpropagates its share of the loss: their sum is the
            # step's loss (added on the device, read with the record)
            loss = tensors.detach()
            self._loss = loss if self._loss is None else self._loss + loss
        try:
            return run()
        finally:
            self._backward_s += time.perf_counter() - start

    def on_step_begin(self) -> None:
        self._optimizer_start = time.perf_counter()

    # --- the record --------------------------------------------------------------------------------------------

    def record(self, now: float, step: int, comm_s: float | None) -> dict[str, Any]:
        job = self.job
        step_time = now - self._last_boundary
        record: dict[str, Any] = {
            "time": time.time(), "step": step, "rank": job.rank,
            "step_time_s": step_time,
            "forward_s": (self._first_backward - self._last_boundary) if self._first_backward else None,
            "backward_s": self._backward_s or None,
            "optimizer_s": (now - self._optimizer_start) if self._optimizer_start else None,
            "comm_s": comm_s,
            "loss": None,  # filled in by write(), from the loss tensor of this step
            "samples_per_s": self._samples / step_time if self._samples else None,
            "tokens_per_s": self._tokens / step_time if self._tokens else None,
            "peak_activation_bytes": job.activations.reset_peak(),
        }
        read = step == 1 or step % self.memory_every == 0 or bool(self._memory_wanted)
        record["rss_bytes"] = self._process.memory_info().rss if read else None
        if job.backend.torch_device == "cuda" and torch.cuda.is_available():
            record["memory_allocated_bytes"] = torch.cuda.memory_allocated() if read else None
            record["memory_peak_bytes"] = torch.cuda.max_memory_allocated() if read else None  # since the last read
            if read:
                torch.cuda.reset_peak_memory_stats()
        if now - self._last_sample >= SAMPLE_EVERY_S:
            record["device"] = self._sample()
            self._last_sample = now
        self._recent.append(record)
        if read:
            self._recent_memory.append(record)
        self._check_effects(record)
        return record

    def write(self, record: dict[str, Any]) -> None:
        """Write the record of the step that just ended, now or once its loss reached the host."""
        later, self._later = self._later, []
        self._late.put(record, self._loss, later)

    def read_later(self, key: str, tensor: torch.Tensor, on_read=None) -> bool:
        """Have this step's record carry ``tensor.tolist()`` as ``key``, read with the loss (no sync on CUDA);
        ``on_read(value)`` is called once it is on the host. False: a CPU value the caller should read now."""
        if not self._late.defers(tensor):
            return False
        self._later.append((key, tensor, on_read))
        return True

    def flush(self) -> None:
        self._late.flush()

    def want_memory(self, owner: str, on: bool = True) -> None:
        """Read memory counters at every step while any owner wants them (else every ``memory_every`` steps)."""
        (self._memory_wanted.add if on else self._memory_wanted.discard)(owner)

    def _sample(self) -> dict | None:
        if self._sampler is None:
            self._sampler = self.job.manager.device_sampler(self.job.backend) or (lambda: None)
        try:
            return self._sampler()
        except Exception as exc:  # a vendor library hiccup must not stop training
            return {"error": str(exc)}

    # --- effect of a change ------------------------------------------------------------------------------------

    def watch_effect(self, key: str, old: Any, new: Any, step: int) -> None:
        """After ``key`` changed (effective from ``step``), log an ``effect`` event once EFFECT_STEPS steps ran;
        none when fewer than EFFECT_STEPS steps ran before it (a launch value: step 1 alone is no baseline)."""
        if key in MEASURED and len(self._recent) == EFFECT_STEPS:
            before = _summary(list(self._recent))  # memory from the last records that read it
            before.update({f: v for f, v in _summary(list(self._recent_memory)).items() if f in MEMORY_FIELDS})
            owner = f"effect:{key}:{step}"
            self._watches.append({"key": key, "old": old, "new": new, "from": step, "before": before, "after": [],
                                  "owner": owner})
            self.want_memory(owner)
            if self.job.backend.torch_device == "cuda" and torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()  # the steps after the change start their own peak

    def _check_effects(self, record: dict) -> None:
        for watch in list(self._watches):
            if record["step"] < watch["from"]:
                continue
            watch["after"].append(record)
            if len(watch["after"]) < EFFECT_STEPS:
                continue
            self._watches.remove(watch)
            self.want_memory(watch["owner"], False)
            before, after = watch["before"], _summary(watch["after"])
            memory = "memory_peak_bytes" if before.get("memory_peak_bytes") is not None else "rss_bytes"
            change = {f: (after[f] / before[f] - 1) if before.get(f) and after.get(f) is not None else None
                      for f in ("step_time_s", memory)}
            text = ", ".join(f"{f} {v:+.1%}" for f, v in change.items() if v is not None)
            self.job.record_event("effect", step=record["step"], rank=self.job.rank, key=watch["key"],
                                  old=watch["old"], new=watch["new"],
                                  reason=f"median of {EFFECT_STEPS} steps before vs after: {text}",
                                  before=before, after=after, memory_field=memory)


def _summary(records: list[dict]) -> dict[str, float | None]:
    out = {}
    for field in ("step_time_s", "memory_peak_bytes", "rss_bytes", "peak_activation_bytes"):
        values = [r[field] for r in records if r.get(field) is not None]
        out[field] = median(values) if values else None
    return out
