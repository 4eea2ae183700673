"""The live view of ``%dspark tune RUN``: a table of the trials and a chart of each trial's step time with its CI.

The search runs in rank 0's process (:mod:`dspark_lab.tune.driver`) and writes a ``tune`` event per trial, and one
for its start and its decision, to the run's events.jsonl. :class:`TuneWatch` tails that file with the dashboard's
:class:`~dspark_lab.views.RunFeed` and rebuilds the tune's state from the events, so the table is
:func:`dspark_lab.tune.commands.report` itself (the CLI's rows: values, steps, median step time, ratio, CI, peak
memory, verdict) and the view needs no control plane: it works on a finished run too. :class:`TuneView` puts it in a
widget driven by the dashboard's :class:`~dspark_lab.jupyter.poller.Poller`; new trials are streamed into the bokeh
source (small patches through jupyter_bokeh).

The chart plots each trial at the incumbent's step time times the trial's ratio, with its whiskers at the incumbent
times the ratio's interval: the ratio is the drift-corrected statistic the search decides on (the geometric mean of
candidate/incumbent over adjacent ABBA pairs of blocks, with its Student-t interval at 95% over the trial's looks,
docs/tune.md), so the points and whiskers are the numbers the verdict came from. Trials with no ratio (over the cap,
failed) are drawn at their raw median step time without whiskers.
"""

from __future__ import annotations

import html
import threading
from typing import Any

import ipywidgets as widgets
from bokeh.models import ColumnDataSource, HoverTool
from bokeh.plotting import figure

from dspark_lab.jupyter.display import ensure_bokehjs
from dspark_lab.jupyter.live_box import LiveBox
from dspark_lab.jupyter.plot import BokehPlot
from dspark_lab.jupyter.poller import Poller, interval_for
from dspark_lab.output import Report
from dspark_lab.runtime.records import RunDir, find_run
from dspark_lab.tune import commands as tune_commands
from dspark_lab.views import RunFeed

DEFAULT_HZ = 2.0
NAN = float("nan")
VERDICT_COLORS = {"win": "#2ca02c", "loss": "#d62728", "tie": "#1f77b4", "over_cap": "#ff7f0e",
                  "predicted_over_cap": "#ff7f0e", "failed": "#7f7f7f", "stopped": "#9467bd",
                  "skipped_budget": "#7f7f7f"}
CHART_COLUMNS = ("trial", "change", "verdict", "color", "step_ms", "lo_ms", "hi_ms", "incumbent_ms")


def chart_row(number: int, trial: dict[str, Any]) -> dict[str, Any]:
    """One point of the chart: the trial's step time (ms) and its CI, and the incumbent's, as plain numbers."""
    ref, ratio, ci = trial.get("incumbent_step_time_s"), trial.get("ratio"), trial.get("ci")
    if ref is not None and ratio is not None:
        step = ref * ratio
    else:
        step = trial.get("median_step_time_s")
    lo, hi = (ref * ci[0], ref * ci[1]) if ref is not None and ci else (None, None)
    ms = lambda s: NAN if s is None else s * 1e3
    return {"trial": number, "change": ", ".join(f"{k}={v}" for k, v in trial.get("change", {}).items()),
            "verdict": trial.get("verdict", ""), "color": VERDICT_COLORS.get(trial.get("verdict"), "#000000"),
            "step_ms": ms(step), "lo_ms": ms(lo), "hi_ms": ms(hi), "incumbent_ms": ms(ref)}


class TuneChart:
    """A bokeh figure of step time per trial: the trial (coloured by verdict) with its CI, the incumbent in grey."""

    def __init__(self, width: int = 640, height: int = 260):
        self.source = ColumnDataSource({c: [] for c in CHART_COLUMNS})
        fig = figure(title="Step time per trial (95% CI); grey: the incumbent it was compared with", width=width,
                     height=height, x_axis_label="trial", y_axis_label="ms", tools="pan,wheel_zoom,box_zoom,reset,save")
        fig.segment(x0="trial", y0="lo_ms", x1="trial", y1="hi_ms", source=self.source, line_color="color",
                    line_width=2)
        fig.scatter("trial", "incumbent_ms", source=self.source, marker="dash", size=14, color="#7f7f7f")
        points = fig.scatter("trial", "step_ms", source=self.source, size=9, color="color")
        fig.add_tools(HoverTool(renderers=[points], tooltips=[("trial", "@trial"), ("change", "@change"),
                                                             ("verdict", "@verdict"), ("step", "@step_ms ms"),
                                                             ("CI", "[@lo_ms, @hi_ms] ms")]))
        fig.xaxis.minor_tick_line_color = None
        fig.toolbar.logo = None
        self.figure = fig

    @property
    def points(self) -> int:
        return len(self.source.data["trial"])

    def add(self, trials: list[dict[str, Any]]) -> None:
        start = self.points
        rows = [chart_row(start + i + 1, t) for i, t in enumerate(trials)]
        if rows:
            self.source.stream({c: [r[c] for r in rows] for c in CHART_COLUMNS})

    def reset(self) -> None:
        self.source.data = {c: [] for c in CHART_COLUMNS}


class TuneWatch:
    """The view's logic without widgets: read new ``tune`` events, rebuild the tune's state, feed the chart.

    ``tune_id`` follows one tune; without it the view follows the newest tune started on the run.
    """

    def __init__(self, run: str | RunDir, tune_id: str | None = None, chart: TuneChart | None = None):
        self.run_dir = run if isinstance(run, RunDir) else find_run(str(run))
        self.feed = RunFeed(self.run_dir)
        self.tune_id = tune_id
        self.chart = chart or TuneChart()
        self.state: dict[str, Any] = {"id": tune_id, "state": "waiting", "trials": [], "space": {}, "outcome": None,
                                      "error": ""}
        self.step: int | None = None
        self.done = False

    def tick(self) -> bool:
        """Read what was appended; False once the tune (or the run) has ended and everything was read."""
        ended = self.feed.finished()
        _metrics, events = self.feed.poll()
        new: list[dict] = []
        for e in events:
            if e.get("kind") != "tune":
                continue
            if self.tune_id is None and e.get("reason") == "start":
                self._reset(e.get("tune_id"))
                new = []
            if e.get("tune_id") != self.state["id"]:
                continue
            self._apply(e, new)
        self.chart.add(new)
        self.done = ended or self.state["state"] in ("done", "stopped", "failed")
        return not self.done

    def _reset(self, tune_id: str | None) -> None:
        self.state = {"id": tune_id, "state": "waiting", "trials": [], "space": {}, "outcome": None, "error": ""}
        self.chart.reset()

    def _apply(self, event: dict, new: list[dict]) -> None:
        reason, self.step = event.get("reason"), event.get("step")
        if reason == "start":
            self.state.update(state="running", space=event.get("space") or {}, options=event.get("options"))
        elif reason == "trial" and isinstance(event.get("trial"), dict):
            self.state["trials"].append(event["trial"])
            new.append(event["trial"])
        elif reason == "decision" and isinstance(event.get("decision"), dict):
            self.state.update(outcome=event["decision"],
                              state="stopped" if event["decision"].get("stopped") else "done")
        elif reason == "error":
            self.state.update(state="failed", error=str(event.get("error", "")))

    def report(self) -> Report:
        return tune_commands.report(self.state)

    def summary(self) -> str:
        s = self.state
        step = "" if self.step is None else f" | step {self.step}"
        return (f"tune {s['id'] or '?'} on run {self.run_dir.id} | {s['state']} | {len(s['trials'])} trials"
                f"{step}")


class TuneView(LiveBox):
    """A live tune: its header, a stop button, the chart and the table; ``close()`` ends its polling thread."""

    def __init__(self, run: str | RunDir, tune_id: str | None = None, refresh_hz: float = DEFAULT_HZ,
                 stop_tune=None):
        ensure_bokehjs()
        interval = interval_for(refresh_hz)
        self.watch = TuneWatch(run, tune_id)
        self.watch.tick()  # before the plot widget is made (see dashboard.Dashboard)
        self._stop_tune = stop_tune or tune_commands.stop
        self.header = widgets.HTML()
        self.table = widgets.HTML()
        self.message = widgets.HTML()
        self.stop_button = widgets.Button(description="stop tune", icon="stop", button_style="warning",
                                          tooltip="end the search at its next block; the best found so far stays",
                                          layout=widgets.Layout(width="110px"))
        self.close_button = widgets.Button(description="close", icon="times", layout=widgets.Layout(width="90px"))
        self.plot = BokehPlot(self.watch.chart.figure)
        self.stop_button.on_click(self._on_stop)
        self.close_button.on_click(lambda _: self.close())
        super().__init__([self.header, widgets.HBox([self.stop_button, self.close_button]), self.plot, self.table,
                          self.message])
        self.add_class("dspark-tune")
        self._lock = threading.Lock()
        self.poller = Poller(self._tick, interval, name=f"dspark-tune-{self.watch.run_dir.id}")
        self._render()
        if not self.watch.done:
            self.poller.start()

    @property
    def rows(self) -> list[dict[str, Any]]:
        return list(self.watch.report().rows)

    def _tick(self) -> bool:
        with self._lock:
            more = self.watch.tick()
            self._render()
        return more

    def _render(self) -> None:
        error = getattr(self, "poller", None) and self.poller.error
        self.header.value = f"<b>{html.escape(self.watch.summary())}</b>" + (
            f' <span style="color:#d62728">read error: {html.escape(str(error))}</span>' if error else "")
        self.table.value = self.watch.report()._repr_html_()
        if self.watch.done:
            self.stop_button.disabled = True

    def _on_stop(self, _button) -> None:
        self._stop_in_background(self._stop_tune, self.watch.run_dir.id, self.message, self.stop_button)


def start(run: str, options: dict[str, Any], refresh_hz: float = DEFAULT_HZ) -> TuneView:
    """Start a tune on ``run`` (rank 0 runs it) and return its live view at once; the cell does not block."""
    state = tune_commands.start(run, **options)
    return TuneView(run, tune_id=state["id"], refresh_hz=refresh_hz)
