"""The search space of ``dspark-lab tune``, read from the policy schemas (:class:`~dspark_lab.policy.PolicySpec`).

Every registered policy (built-in and plugins') is a candidate key, except those whose spec says ``tunable=False``
(a request such as ``profile.steps``, or a knob that slows the job on purpose). Live ones that apply to this job are
searched; lossy values only with ``allow_lossy``; launch-only ones are listed as "needs a restart" with the values a
search would try, and never applied (one with no other value to list, a name or a path, is excluded instead).
Numbers are tried on a doubling grid from the spec's minimum, at most :data:`MAX_VALUES` per key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from dspark_lab.errors import DSparkError
from dspark_lab.policy import PolicySpec

MAX_VALUES = 8
MAX_KEYS = 32


@dataclass(slots=True)
class Space:
    keys: dict[str, list[Any]] = field(default_factory=dict)  # searched: key -> values in trial order
    needs_restart: list[dict[str, Any]] = field(default_factory=list)  # launch-only: never applied
    excluded: list[dict[str, Any]] = field(default_factory=list)  # key, reason
    bit_exact: bool = True  # every searched value leaves results bit-identical

    def as_dict(self) -> dict[str, Any]:
        return {"keys": self.keys, "needs_restart": self.needs_restart, "excluded": self.excluded,
                "bit_exact": self.bit_exact}


def values_of(spec: PolicySpec, allow_lossy: bool) -> list[Any]:
    """The values a search tries for ``spec`` (its default first, lossy ones only when allowed)."""
    if spec.type == "enum":
        values = [c for c in spec.choices if allow_lossy or c not in spec.lossy_values]
    elif spec.type == "bool":
        values = [False, True]
    elif spec.type == "str":
        values = [spec.default]  # a name or a path: nothing a search can enumerate
    else:
        low = spec.min if spec.min is not None and spec.min > 0 else 1
        high = spec.max if spec.max is not None else low * 2 ** (MAX_VALUES - 1)
        values, v = [], low
        while v <= high and len(values) < MAX_VALUES:
            values.append(int(v) if spec.type == "int" else float(v))
            v *= 2
    return sorted(values, key=lambda v: v != spec.default)


def build(specs: dict[str, PolicySpec], values: dict[str, Any], refusal: Callable[[str, Any], str | None], *,
          keys: list[str] | None = None, allow_lossy: bool = False,
          not_here: Callable[[str], str | None] = lambda key: None) -> Space:
    """The space for a job whose policies are ``values``; ``refusal(key, value)`` says why a value cannot apply;
    ``not_here(key)`` why a launch-only key would not matter to this job (then it is not offered as a restart)."""
    if keys is not None:
        unknown = [k for k in keys if k not in specs]
        if unknown:
            raise DSparkError(f"--keys: unknown policy {unknown[0]!r}; known: {', '.join(specs)}")
        if len(keys) > MAX_KEYS:
            raise DSparkError(f"--keys: {len(keys)} keys; allowed: at most {MAX_KEYS}")
        fixed = [k for k in keys if not specs[k].tunable]
        if fixed:
            raise DSparkError(f"--keys: {fixed[0]} is not a setting to tune (a request or a what-if knob); tunable: "
                              f"{', '.join(k for k, s in specs.items() if s.tunable)}")
    space = Space()
    for key, spec in specs.items():
        if keys is not None and key not in keys:
            continue
        if not spec.tunable:
            space.excluded.append({"key": key, "reason": "not a setting to tune (a request or a what-if knob)"})
            continue
        tried = values_of(spec, allow_lossy)
        if not spec.live:
            if reason := not_here(key):
                space.excluded.append({"key": key, "reason": reason})
                continue
            other = [v for v in tried if v != values.get(key)]
            if not other:  # a name or a path (comm.topology): no value a restart could be offered with
                space.excluded.append({"key": key, "reason": "launch-only, and no other value a search can list"})
                continue
            space.needs_restart.append({"key": key, "value": values.get(key), "would_try": other,
                                        "reason": f"launch-only: `dspark-lab run --policy {key}=VALUE`"})
            continue
        fine, why = [], ""
        for value in tried:
            reason = refusal(key, value) if value != values.get(key) else None
            if reason:
                why = why or reason
            else:
                fine.append(value)
        if values.get(key) not in fine:
            fine.insert(0, values.get(key))
        if len(fine) < 2:
            space.excluded.append({"key": key, "reason": why or "no other value to try"})
            continue
        space.keys[key] = fine
        space.bit_exact = space.bit_exact and spec.bit_exact
    if not space.keys:
        raise DSparkError("tune: no live policy of this job has a value to try"
                          + (f" ({space.excluded[0]['key']}: {space.excluded[0]['reason']})" if space.excluded else ""))
    return space
