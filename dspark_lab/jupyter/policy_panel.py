"""The policy panel: one control per policy, generated from the policy schema of a run.

The schema rows come from ``commands.policies(run)`` (key, type, choices, min/max, live, value in force, state,
since_step, pending value and step). :func:`control_for` picks the control from the schema alone: a dropdown for an
enum, a checkbox for a bool, a slider for a bounded number, a text box for an unbounded one, and a disabled control
for a launch-only policy. :class:`PolicyPanelModel` holds the logic (submit a change, keep the refusal message) over
a client with the command model's ``policies`` and ``set_policies``, so tests swap the client, not the logic.
"""

from __future__ import annotations

import html
import threading
from dataclasses import dataclass
from typing import Any

import ipywidgets as widgets

from dspark_lab.errors import DSparkError
from dspark_lab.jupyter.display import close_tree
from dspark_lab.jupyter.poller import Poller
from dspark_lab.runtime.records import find_run, wait_for_end


@dataclass(frozen=True, slots=True)
class ControlSpec:
    key: str
    kind: str  # dropdown | checkbox | int_slider | float_slider | int_text | float_text | text
    read_only: bool
    options: tuple[str, ...] = ()
    min: float | None = None
    max: float | None = None


def control_for(policy: dict[str, Any]) -> ControlSpec:
    """Which control shows this policy, from its schema row."""
    kind = policy["type"]
    read_only = not policy.get("live", True)
    lo, hi = policy.get("min"), policy.get("max")
    if kind == "enum":
        return ControlSpec(policy["key"], "dropdown", read_only, tuple(policy.get("choices") or ()))
    if kind == "bool":
        return ControlSpec(policy["key"], "checkbox", read_only)
    if kind in ("int", "float"):
        bounded = lo is not None and hi is not None
        return ControlSpec(policy["key"], f"{kind}_{'slider' if bounded else 'text'}", read_only, min=lo, max=hi)
    if kind == "str":
        return ControlSpec(policy["key"], "text", read_only)
    raise ValueError(f"policy {policy['key']}: type {kind!r} has no control; allowed: enum | bool | int | float | str")


def state_text(policy: dict[str, Any], message: str = "") -> str:
    """One line: the value in force and since when, a pending change, and the last answer (e.g. a refusal)."""
    parts = []
    if not policy.get("live", True):
        parts.append("launch-only")
    since = policy.get("since_step")
    parts.append(f"{policy.get('value')!s} in force" + (f" since step {since}" if since is not None else ""))
    if policy.get("state") == "not_applicable":
        parts.append(f"not applicable: {policy.get('reason')}")
    if policy.get("state") == "pending":
        at = policy.get("pending_step")
        parts.append(f"pending: {policy.get('pending_value')!s}" + (f" at step {at}" if at is not None else ""))
    if message:
        parts.append(message)
    return " | ".join(parts)


def _commands():
    from dspark_lab.runtime import commands

    return commands


class PolicyPanelModel:
    """The panel's state and actions, with no widgets: rows by key, the last message per key."""

    def __init__(self, run: str, client=None, timeout: float = 60.0):
        self.run = run
        self.client = client or _commands()
        self.timeout = timeout
        self.rows: dict[str, dict[str, Any]] = {}
        self.messages: dict[str, str] = {}
        self.refresh()  # the control client waits while a just-launched run brings its endpoint up

    def refresh(self) -> dict[str, dict[str, Any]]:
        rows = self.client.policies(self.run).data["policies"]
        self.rows = {row["key"]: row for row in rows}
        return self.rows

    def submit(self, key: str, value: Any) -> str:
        """Ask for ``key=value``; returns and keeps the message shown beside the control."""
        text = str(value).lower() if isinstance(value, bool) else str(value)
        try:
            reply = self.client.set_policies(self.run, [f"{key}={text}"], wait=True, timeout=self.timeout).data
        except DSparkError as exc:  # a refusal (PolicyError) or an unreachable run: one line either way
            message = f"refused: {exc}"
        else:
            state = reply.get("state")
            if state == "applied":
                message = f"applied at step {reply.get('step')}"
            elif state == "rolled_back":
                message = f"rolled back: {reply.get('reason') or 'a rank could not apply it'}"
            else:
                message = f"pending (step {reply.get('step')})"
        self.messages[key] = message
        try:
            self.refresh()
        except DSparkError as exc:
            self.messages[key] = f"{message}; refresh failed: {exc}"
        return self.messages[key]

    def status(self, key: str) -> str:
        return state_text(self.rows[key], self.messages.get(key, ""))


def _make_widget(spec: ControlSpec, value: Any, doc: str) -> widgets.ValueWidget:
    common = dict(description=spec.key.split(".", 1)[-1], disabled=spec.read_only, tooltip=doc,
                  style={"description_width": "170px"}, layout=widgets.Layout(width="420px"))
    if spec.kind == "dropdown":
        return widgets.Dropdown(options=list(spec.options), value=str(value), **common)
    if spec.kind == "checkbox":
        return widgets.Checkbox(value=bool(value), indent=True, **common)
    if spec.kind == "int_slider":
        return widgets.IntSlider(value=int(value), min=int(spec.min), max=int(spec.max), continuous_update=False,
                                 **common)
    if spec.kind == "float_slider":
        return widgets.FloatSlider(value=float(value), min=spec.min, max=spec.max, step=(spec.max - spec.min) / 100,
                                   continuous_update=False, **common)
    if spec.kind == "int_text":
        return widgets.IntText(value=int(value), continuous_update=False, **common)
    if spec.kind == "text":
        return widgets.Text(value=str(value), continuous_update=False, **common)
    return widgets.FloatText(value=float(value), continuous_update=False, **common)


class PolicyPanel(widgets.VBox):
    """Controls for every policy of a run; a change is submitted on its own thread so the kernel stays free."""

    def __init__(self, run: str, client=None, refresh_s: float = 1.0):
        self.model = PolicyPanelModel(run, client)
        self.controls: dict[str, widgets.ValueWidget] = {}
        self.states: dict[str, widgets.HTML] = {}
        self._syncing = False
        self._lock = threading.Lock()
        self.busy: set[str] = set()
        rows = []
        area = None
        for key, policy in self.model.rows.items():
            if key.split(".", 1)[0] != area:
                area = key.split(".", 1)[0]
                rows.append(widgets.HTML(f"<b>{html.escape(area)}</b>"))
            control = _make_widget(control_for(policy), policy.get("value", policy.get("default")),
                                   policy.get("doc", ""))
            control.observe(lambda change, key=key: self._on_change(key, change["new"]), "value")
            self.controls[key] = control
            self.states[key] = widgets.HTML(layout=widgets.Layout(margin="0 0 0 12px"))
            rows.append(widgets.HBox([control, self.states[key]]))
        self.header = widgets.HTML(f"<b>policies of run {html.escape(str(run))}</b>")
        super().__init__([self.header, *rows])
        self.add_class("dspark-policy-panel")
        self._render()
        self.poller = Poller(self._refresh, refresh_s, name=f"dspark-policies-{run}").start()

    def _on_change(self, key: str, value: Any) -> None:
        if self._syncing:
            return
        self.busy.add(key)
        self.states[key].value = f"<i>requesting {html.escape(str(value))}…</i>"
        threading.Thread(target=self._submit, args=(key, value), daemon=True).start()

    def _submit(self, key: str, value: Any) -> None:
        try:
            with self._lock:
                self.model.submit(key, value)
        finally:
            self.busy.discard(key)
            self._render()

    def _refresh(self) -> bool | None:
        """Read the values in force; False (the poller stops) once the run has ended: the controls then show the
        last values in force, read-only."""
        if self.busy:
            return None
        with self._lock:
            try:
                self.model.refresh()
            except DSparkError as exc:
                try:
                    ended = wait_for_end(find_run(self.model.run), 0)
                except DSparkError:  # the run cannot be found (its directory went away): not known to have ended
                    ended = None
                note = f"ended {ended}: the values shown were the last in force" if ended else str(exc)
                self.header.value = f"<b>policies of run {html.escape(self.model.run)}</b> ({html.escape(note)})"
                if ended:
                    for control in self.controls.values():
                        control.disabled = True
                    return False
                return None
        self._render()
        return None

    def _render(self) -> None:
        """Show the value in force in each control (a refused request snaps back) and its state line."""
        self._syncing = True
        try:
            for key, control in self.controls.items():
                if key in self.busy:
                    continue
                policy = self.model.rows[key]
                value = policy.get("value")
                if value is not None and control.value != value:
                    control.value = str(value) if isinstance(control, widgets.Dropdown) else value
                status = self.model.status(key)
                refused = self.model.messages.get(key, "").startswith(("refused", "rolled back"))
                color = "#d62728" if refused else "#2ca02c" if policy.get("state") == "applied" else "#ff7f0e"
                self.states[key].value = f'<span style="color:{color}">{html.escape(status)}</span>'
        finally:
            self._syncing = False

    def close(self) -> None:
        if getattr(self, "poller", None) is not None:
            self.poller.stop()
        close_tree(self.children)
        super().close()
