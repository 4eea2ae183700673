"""The policy schema type: what a policy is called, which values it takes, and how a change is validated.

A *policy* is a named, typed setting (``memory.activation_checkpointing``). Plugins register
:class:`PolicySpec` objects through ``dspark_register_policies``; the runtime validates every *change* against
its spec before anything is announced to the ranks, so a bad change is refused in one line.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from dspark_lab.errors import PolicyError

POLICY_TYPES = ("enum", "int", "float", "bool", "str")
MAX_STR = 1024  # a str policy's longest value (a preset name or a file path)
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_INT64 = 2**63 - 1  # the widest int every JSON reader of the records (and torch) takes
_SHOWN = 60         # characters of a refused value quoted in the error (a request may carry megabytes)


@dataclass(frozen=True, kw_only=True, slots=True)
class PolicySpec:
    """One policy's schema.

    ``live``: may change on a running job (else launch-only). ``lossy_values``: the values that change the loss
    trajectory (compression, fp8); every other value computes the same math. ``bit_exact``: whether those lossless
    values also give bit-identical results (False when they reorder floating-point sums: ring / tree all-reduce,
    another thread count); ``dspark-lab tune`` reports which kind it tried. ``tunable``: False for a key that is a
    request (``profile.steps`` starts a capture) or a what-if knob that slows the job on purpose
    (``comm.emulate_links``), not a setting a faster or smaller configuration could be made of; the tuner leaves it
    out. ``plus_collectives``: an enum that also takes the name of every collective a plugin offers
    (``dspark_collective_names``); :meth:`dspark_lab.plugins.Manager.policies` adds them to ``choices``.
    """

    key: str
    type: str
    default: Any
    doc: str
    choices: tuple[str, ...] = ()
    min: float | None = None
    max: float | None = None
    live: bool = True
    lossy_values: tuple[str, ...] = ()
    bit_exact: bool = True
    tunable: bool = True
    plus_collectives: bool = False

    def __post_init__(self):
        if "." not in self.key:
            raise ValueError(f"policy key {self.key!r} must be 'area.name'")
        if self.type not in POLICY_TYPES:
            raise ValueError(f"policy {self.key}: type must be one of {', '.join(POLICY_TYPES)}, got {self.type!r}")
        if self.type == "enum" and not self.choices:
            raise ValueError(f"policy {self.key}: an enum needs choices")
        for name, bound in (("min", self.min), ("max", self.max)):
            if bound is not None and (isinstance(bound, bool) or not isinstance(bound, (int, float))
                                      or not math.isfinite(bound)):
                raise ValueError(f"policy {self.key}: {name} must be a finite number or None, got {bound!r}")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"policy {self.key}: min {self.min:g} is above max {self.max:g}")
        self.validate(self.default)

    @property
    def lossless(self) -> bool:
        return not self.lossy_values

    @property
    def area(self) -> str:
        return self.key.split(".", 1)[0]

    def allowed(self) -> str:
        """The allowed values in words, for error messages and tables."""
        if self.type == "enum":
            return " | ".join(self.choices)
        if self.type == "bool":
            return "true | false"
        if self.type == "str":
            return f"a string of 1 to {MAX_STR} printable characters"
        # a whole bound of an int policy as digits (1000000, never 1e+06, which the int parser refuses)
        bound = lambda x: str(int(x)) if self.type == "int" and x == int(x) else f"{x:g}"  # noqa: E731
        lo = "(-inf" if self.min is None else f"[{bound(self.min)}"
        hi = "inf)" if self.max is None else f"{bound(self.max)}]"
        return f"{self.type} in {lo}, {hi}"

    def validate(self, value: Any) -> Any:
        """Return ``value`` parsed to this policy's type, or raise :class:`PolicyError` naming key and allowed values.

        Numbers are finite (no nan / inf, which would reach DDP or the records) and ints fit in 64 bits; what is
        returned is always plain JSON, since the runtime stores it in run.json and the event log.
        """
        shown = repr(value) if len(repr(value)) <= _SHOWN else f"{repr(value)[:_SHOWN]}... ({len(repr(value))} chars)"
        bad = PolicyError(f"{self.key}: {shown} is not allowed; allowed: {self.allowed()}")
        parsed = self._parse(value, bad)
        try:
            json.dumps(parsed, allow_nan=False)
        except (TypeError, ValueError):
            raise bad from None
        return parsed

    def _parse(self, value: Any, bad: PolicyError) -> Any:
        if self.type == "str":
            text = str(value).strip() if isinstance(value, (str, int, float)) and not isinstance(value, bool) else ""
            if not 0 < len(text) <= MAX_STR or not text.isprintable():
                raise bad
            return text
        if self.type == "enum":
            text = str(value).strip()
            if text not in self.choices:
                raise bad
            return text
        if self.type == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in _TRUE:
                return True
            if text in _FALSE:
                return False
            raise bad
        try:
            if isinstance(value, bool):
                raise ValueError
            number = int(str(value).strip()) if self.type == "int" else float(str(value).strip())
        except ValueError:  # not a number, or an int of over 4300 digits
            raise bad from None
        if not math.isfinite(number) or (self.type == "int" and abs(number) > _INT64):
            raise bad
        if (self.min is not None and number < self.min) or (self.max is not None and number > self.max):
            raise bad
        return number

    def as_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "type": self.type,
            "default": self.default,
            "allowed": self.allowed(),
            "choices": list(self.choices),
            "min": self.min,
            "max": self.max,
            "live": self.live,
            "lossless": self.lossless,
            "lossy_values": list(self.lossy_values),
            "bit_exact": self.bit_exact,
            "tunable": self.tunable,
            "doc": self.doc,
        }


def parse_assignment(text: str) -> tuple[str, str]:
    """Split ``key=value``; raise :class:`PolicyError` in one line when it is not of that form."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip() or not value.strip():
        raise PolicyError(f"policy: expected KEY=VALUE (e.g. memory.activation_checkpointing=full), got {text!r}")
    return key.strip(), value.strip()


def parse_assignments(texts) -> dict[str, str]:
    """``["k=v", ...]`` as a dict; a key given twice is refused in one line rather than the last one winning."""
    parsed: dict[str, str] = {}
    for text in texts:
        key, value = parse_assignment(text)
        if key in parsed:
            raise PolicyError(f"{key}: given twice ({parsed[key]!r}, then {value!r}); give each key once")
        parsed[key] = value
    return parsed
