"""The policies in force on one rank: values, since-steps, launch values, and validate / apply / commit / rollback.

A change goes through :meth:`PolicyState.validate` (schema, live-only, and the built-in refusals once the job is
discovered), then at its step boundary :meth:`apply` (every key through the ``dspark_apply_policy`` hook; the first
failure stops), then :meth:`commit` or :meth:`rollback` once every rank agreed (:mod:`.coordinator`).
"""

from __future__ import annotations

from typing import Any

from dspark_lab.errors import PolicyError
from dspark_lab.runtime.policies import builtin as builtin_policies

NOT_DISCOVERED = "the job has not reached its first optimizer step yet (the runtime finds the model there)"


class PolicyState:
    """Values, since-steps and launch values of every registered policy, for one :class:`~.attach.Job`."""

    def __init__(self, job, launch: dict[str, Any] | None):
        self.job = job
        self.specs = job.manager.policies()
        self.values = {key: spec.default for key, spec in self.specs.items()}
        self.since = {key: 0 for key in self.specs}
        self.launch = self.validate(launch or {}, live_only=False)

    def validate(self, changes: dict[str, Any], *, live_only: bool = True) -> dict[str, Any]:
        """Parse ``changes`` against the schema; raise PolicyError (one line) for the first bad key or value.

        Before the model is discovered a built-in key is not refused for what the job lacks: the change waits for
        its step boundary, which comes after discovery, and is checked (and if need be rolled back) there.
        """
        parsed = {}
        for key, value in changes.items():
            spec = self.specs.get(key)
            if spec is None:
                raise PolicyError(f"{key}: unknown policy; known: {', '.join(self.specs)}")
            parsed[key] = spec.validate(value)
            if live_only and not spec.live:
                raise PolicyError(f"{key} is launch-only: set it with `dspark-lab run --policy {key}=VALUE`")
            if live_only and key in builtin_policies.SPECS_BY_KEY and self.job.discovered:
                reason = builtin_policies.refusal(self.job, key, parsed[key])
                if reason:
                    raise PolicyError(f"{key}: {reason}")
        return parsed

    def not_here(self, key: str) -> str | None:
        """Why a built-in policy cannot matter to this job at any value (the job lacks what it acts on), or None;
        also for a launch-only key, which ``validate`` refuses first for being launch-only."""
        if key not in builtin_policies.SPECS_BY_KEY or not self.job.discovered:
            return None
        return builtin_policies.refusal(self.job, key, self.specs[key].default)

    def apply(self, changes: dict[str, Any]) -> tuple[str, list[tuple]]:
        """Apply every key in order; stop at the first failure. Returns (failure reason or "", what was applied)."""
        applied = []
        for key, value in changes.items():
            old = self.values[key]
            try:
                if not self.job.discovered and key in builtin_policies.SPECS_BY_KEY:
                    raise PolicyError(f"{key}: {NOT_DISCOVERED}")
                answers = self.job.manager.dispatch("dspark_apply_policy", job=self.job, key=key, value=value,
                                                    old=old)
                if not answers:
                    raise PolicyError("; ".join(f"{key}: {p.plugin} failed: {p.reason}" for p in answers.failed)
                                      or f"{key}: no plugin applies this policy")
                note = answers[0][1]
            except Exception as exc:  # a failing apply must never take the job down: it rolls back
                return f"{key}={value}: {exc}", applied
            applied.append((key, old, value, note))
        return "", applied

    def commit(self, applied, announcement, note: str = "") -> None:
        for key, old, new, apply_note in applied:
            self.values[key] = new
            self.since[key] = announcement["step"]
            self.job.record_event("apply", step=announcement["step"], rank=self.job.rank, key=key, old=old, new=new,
                                  reason="; ".join(n for n in (apply_note, note) if n),
                                  change_id=announcement["change_id"])
            self.job.meter.watch_effect(key, old, new, announcement["step"])

    def rollback(self, applied, announcement, reason: str) -> None:
        for key, old, new, _ in reversed(applied):
            try:
                if not self.job.manager.dispatch("dspark_apply_policy", job=self.job, key=key, value=old, old=new):
                    raise PolicyError("no plugin restored it")
            except Exception as exc:
                reason += f"; restoring {key}={old} failed: {exc}"
        for key, new in announcement["changes"].items():
            self.job.record_event("rollback", step=announcement["step"], rank=self.job.rank, key=key,
                                  old=self.values.get(key), new=new, reason=reason, change_id=announcement["change_id"])

    def apply_launch(self, prefixes: tuple[str, ...], step: int) -> None:
        """Apply the launch values (``--policy k=v``) of keys starting with ``prefixes`` that differ from now."""
        changes = {k: v for k, v in self.launch.items() if k.startswith(prefixes) and v != self.values[k]}
        # launch-only keys first: they set up what the live ones use (comm.topology before grad_sync=packed-trees)
        changes = dict(sorted(changes.items(), key=lambda kv: self.specs[kv[0]].live))
        if not changes:
            return
        failure, applied = self.apply(changes)
        announcement = {"step": step, "changes": changes, "change_id": "launch"}
        if failure:
            self.rollback(applied, announcement, failure)
        else:
            self.commit(applied, announcement, "set at launch")

    def applicability(self) -> dict[str, dict[str, Any]]:
        """For every policy: can it apply to this job, and if not, why (built-in keys; plugins decide at apply)."""
        rows = {}
        for key, spec in self.specs.items():
            if key not in builtin_policies.SPECS_BY_KEY:
                rows[key] = {"applies": None, "reason": "a plugin's policy: it decides when the change applies"}
                continue
            if not self.job.discovered:
                rows[key] = {"applies": None, "reason": NOT_DISCOVERED}
                continue
            if not spec.live:
                rows[key] = {"applies": False, "reason": "launch-only: set it with `dspark-lab run --policy`"}
                continue
            probe = next((c for c in (spec.choices or ()) if c != spec.default), spec.default)
            reason = builtin_policies.refusal(self.job, key, probe)
            rows[key] = {"applies": reason is None, "reason": reason}
        return rows
