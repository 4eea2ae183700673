"""What an event is: communication, a synchronisation wait, or compute, from a registry of patterns.

HTA (Holistic Trace Analysis) recognises communication by NCCL kernel names only, so DeepEP's dispatch/combine
kernels, gloo's CPU collectives or a custom all-reduce count as compute there. Here each library is one
:class:`Pattern`; a backend plugin adds its own through the ``dspark_trace_classifiers`` hook, and its patterns are
tried before the built-in ones (so a plugin can also declare a kernel ``compute``). An event no pattern claims is
compute. Waits (stream waits, synchronise calls, functional-collective waits) are neither compute nor communication.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from dspark_lab.errors import DSparkError

CATEGORIES = ("compute", "comm", "wait")


@dataclass(frozen=True, slots=True, kw_only=True)
class Pattern:
    """One library's events. Every criterion given must hold: ``regex`` is searched in the event name,
    ``kineto_cat`` must equal the event's Kineto category, ``metadata`` requires record_param_comms keys in its args."""

    name: str
    category: str
    regex: str = ""
    kineto_cat: str = ""
    metadata: bool = False
    doc: str = ""

    def __post_init__(self):
        if self.category not in CATEGORIES:
            raise DSparkError(f"trace pattern {self.name}: category {self.category!r} is not one of "
                              f"{', '.join(CATEGORIES)}")
        if not (self.regex or self.kineto_cat or self.metadata):
            raise DSparkError(f"trace pattern {self.name}: give at least one of regex, kineto_cat, metadata")
        if self.regex:
            try:
                re.compile(self.regex)
            except re.error as exc:
                raise DSparkError(f"trace pattern {self.name}: regex {self.regex!r} does not compile ({exc})") from None


def _comm(name, regex, doc, **kw):
    return Pattern(name=name, category="comm", regex=regex, doc=doc, **kw)


def _wait(name, doc, **kw):
    return Pattern(name=name, category="wait", doc=doc, **kw)


# Waits first: a functional collective's wait_tensor must not be taken for the collective itself.
BUILTIN: tuple[Pattern, ...] = (
    _wait("cuda-sync", "Kineto's GPU-side synchronisation records (stream wait, event sync)", kineto_cat="cuda_sync"),
    _wait("sync-call", "host or stream synchronise calls (CUDA, HIP)",
          regex=r"^(cuda|hip)(Device|Stream|Event)Synchronize|^(cuda|hip)StreamWaitEvent|^Stream Wait|^Event Sync"
                r"|^Context Sync"),
    _wait("collective-wait", "waiting on an async collective's work handle",
          regex=r"^(_?c10d_functional::wait_tensor|c10d::wait|aten::wait$|ProcessGroup\w*::wait)"),
    _comm("nccl", r"\bnccl(Dev)?Kernel|^nccl:", "NCCL kernels and torch's nccl:* ranges"),
    _comm("rccl", r"(?i)\brccl|^rccl:", "RCCL (ROCm) kernels and ranges; its kernels also match nccl"),
    _comm("hccl", r"(?i)\bhccl|^hcom_|^HcclAllReduce", "HCCL (Ascend) collectives"),
    _comm("gloo", r"^gloo:", "gloo collectives, recorded on gloo's worker threads"),
    _comm("c10d", r"^_?c10d(_functional)?::(?!wait)", "torch.distributed collective ops (any backend)"),
    _comm("record_param_comms", r"^record_param_comms$", "torch's collective bookkeeping range"),
    _comm("record_param_comms-metadata", "", "events carrying record_param_comms metadata (Collective name)",
          metadata=True),
    _comm("deepep", r"dpsk::ep::|\bdeep_ep::", "DeepEP expert-parallel dispatch/combine kernels"),
    _comm("nvshmem", r"(?i)nvshmem", "NVSHMEM kernels and device calls"),
    _comm("mscclpp", r"(?i)\bmscclpp|\bmsccl", "MSCCL / MSCCL++ kernels"),
    _comm("custom-allreduce",
          r"cross_device_reduce|(?i:custom_?all_?reduce)|one_?shot_all_?reduce|two_?shot_all_?reduce"
          r"|multimem_all_?reduce|(?i:oneShotAllReduce|twoShotAllReduce|allReduceKernel)|lamport",
          "custom all-reduce kernels (vLLM, SGLang, TensorRT-LLM, torch symmetric memory)"),
    _comm("p2p-copy", r"^Memcpy PtoP|^Memcpy DtoD \(Device -> Device\) peer", "peer-to-peer copies"),
)


@dataclass(frozen=True, slots=True)
class Verdict:
    category: str
    pattern: str  # the pattern that decided, "" for compute by default


COMPUTE = Verdict("compute", "")


class Classifier:
    """Patterns in priority order; answers are cached per (name, Kineto category, metadata)."""

    def __init__(self, patterns):
        self.patterns = tuple(patterns)
        self._compiled = [(p, re.compile(p.regex) if p.regex else None) for p in self.patterns]
        self.classify = lru_cache(maxsize=1 << 16)(self._classify)

    def _classify(self, name: str, kineto_cat: str = "", metadata: bool = False) -> Verdict:
        for pattern, regex in self._compiled:
            if pattern.kineto_cat and pattern.kineto_cat != kineto_cat:
                continue
            if pattern.metadata and not metadata:
                continue
            if regex is not None and not regex.search(name):
                continue
            return Verdict(pattern.category, pattern.name)
        return COMPUTE


def plugin_patterns(manager) -> list[Pattern]:
    """Patterns from every plugin's ``dspark_trace_classifiers``; a wrong answer is a plugin problem, skipped."""
    found = []
    for plugin, answer in manager.call_each("dspark_trace_classifiers"):
        items = answer if isinstance(answer, (list, tuple)) else [answer]
        for item in items:
            if isinstance(item, Pattern):
                found.append(item)
            else:
                manager.problem(plugin, "dspark_trace_classifiers", f"returned a {type(item).__name__}, not a Pattern")
    return found


def default_classifier(manager=None) -> Classifier:
    """Plugin patterns (newest plugin first), then the built-in ones."""
    if manager is None:
        from dspark_lab.plugins import get_manager

        manager = get_manager()
    return Classifier([*plugin_patterns(manager), *BUILTIN])
