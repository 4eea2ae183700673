"""The run dashboard: :class:`~dspark_lab.views.MetricCharts` in a widget, fed from the run directory.

A :class:`~dspark_lab.jupyter.poller.Poller` tails ``metrics.jsonl``/``events.jsonl``
(:class:`~dspark_lab.views.RunFeed`) and streams the new records into the bokeh sources, which jupyter_bokeh
forwards as small patches. It needs no control plane: a finished run shows whole (its last :data:`STEPS_KEPT`
steps), a live one grows. Each dashboard owns its thread; ``close()`` ends it.

Two panels come with the same poller: what the job is (``status``'s ``job`` object from rank 0's control endpoint,
read while the run is live: once, then after each applied change and every :data:`JOB_REFRESH_S`; shown as
:mod:`dspark_lab.runtime.jobtext` rows), and, once every rank wrote its trace of the newest profile
(``dspark-lab profile``), the per-rank overlap/idle bar of :func:`dspark_lab.trace.view.breakdown_figure`.
"""

from __future__ import annotations

import html
import threading
import time

import ipywidgets as widgets
from dspark_lab.jupyter.plot import BokehPlot

from dspark_lab.jupyter.display import close_tree, ensure_bokehjs
from dspark_lab.jupyter.live_box import LiveBox, rate_slider
from dspark_lab.errors import DSparkError
from dspark_lab.jupyter.poller import Poller, interval_for
from dspark_lab.runtime import jobtext, liveness
from dspark_lab.runtime.limits import is_whole_number
from dspark_lab.runtime.records import RunDir, find_run
from dspark_lab.views import CHART_RANKS, MetricCharts, RunFeed

DEFAULT_HZ = 2.0
EVENT_KINDS_SHOWN = ("pending", "apply", "refuse", "rollback", "stop", "error", "profile")
STEPS_KEPT = 20_000  # steps per rank a dashboard holds (kernel and browser); `dspark-lab show` draws a whole run
JOB_REFRESH_S = 10.0  # a live run's job object is read again at most this often (and after each change)


def resolve_run(run: str | RunDir) -> RunDir:
    return run if isinstance(run, RunDir) else find_run(str(run))


def live_job(run_dir: RunDir) -> dict | None:
    """Rank 0's ``job`` object, or None when the run has no live control endpoint (not started, or ended)."""
    if liveness.read_endpoint(run_dir.path) is None:
        return None
    from dspark_lab.runtime.control import ControlClient

    try:
        return ControlClient(run_dir, timeout=3.0, start_wait=0.0).request("GET", "/status").get("job")
    except DSparkError:
        return None


def analyse_profile(files: list) -> dict:
    """``trace analyze``'s data for one profile's rank files."""
    from dspark_lab.trace.commands import analyze

    return analyze([str(f) for f in files]).data


def chart_ranks_note(ranks: int) -> str:
    """One line when a run has more ranks than the charts draw up front (:data:`CHART_RANKS`), else ''."""
    if ranks <= CHART_RANKS:
        return ""
    return (f"ranks: {ranks} in run.json; the charts start with {CHART_RANKS} ranks' lines and add a rank's when "
            "its metrics arrive")


class RunWatch:
    """The dashboard's logic without widgets: read what is new, stream it into the charts, describe the state."""

    def __init__(self, run: str | RunDir, charts: MetricCharts | None = None, job_source=live_job,
                 analyse=analyse_profile):
        self.run_dir = resolve_run(run)
        self.feed = RunFeed(self.run_dir)
        info = self.feed.info()
        self.ranks = int(info.get("ranks") or 1)  # bounded by records.bounded: 1 to records.MAX_RANKS
        self.note = chart_ranks_note(self.ranks)
        self.charts = charts or MetricCharts(ranks=min(self.ranks, CHART_RANKS), rollover=STEPS_KEPT)
        self.step: int | None = None
        self.events: list[dict] = []
        self.done = False
        self._job_source, self._analyse = job_source, analyse
        self.job: dict | None = None
        self._job_read_at: float | None = None
        self._profile_files: dict[str, dict[int, str | None]] = {}  # profile id -> rank -> file (None: failed)
        self.profile: dict | None = None  # {"id", "first_step", "result"} of the newest profile analysed
        self.profile_error = ""

    def tick(self) -> bool:
        """Read and stream what was appended; False once the run has ended and everything was read."""
        ended = self.feed.finished()  # checked before reading, so a last read follows the final write
        metrics, events = self.feed.poll()
        self.charts.update(metrics, events)
        steps = [m["step"] for m in metrics if isinstance(m.get("step"), int)]
        if steps:
            self.step = max(steps + ([self.step] if self.step is not None else []))
        self.events.extend(e for e in events if e.get("kind") in EVENT_KINDS_SHOWN)
        changed = any(e.get("kind") in ("apply", "rollback") for e in events)
        if not ended:
            self._read_job(changed)
        self._note_profiles(events)
        self.done = ended
        return not ended

    def _read_job(self, changed: bool) -> None:
        now = time.monotonic()
        if self.job is not None and not changed and now - (self._job_read_at or 0.0) < JOB_REFRESH_S:
            return
        job = self._job_source(self.run_dir)
        self._job_read_at = now
        if job is not None:
            self.job = job

    def _note_profiles(self, events: list[dict]) -> None:
        for e in events:
            if e.get("kind") == "profile" and isinstance(e.get("id"), str) and isinstance(e.get("rank"), int):
                self._profile_files.setdefault(e["id"], {})[e["rank"]] = e.get("file")
        complete = [pid for pid, files in self._profile_files.items() if len(files) >= self.ranks]
        if not complete:
            return
        newest = max(complete, key=lambda pid: int(pid[4:]) if is_whole_number(pid[4:]) else -1)
        if self.profile is not None and self.profile["id"] == newest:
            return
        files = self._profile_files[newest]
        paths = [self.run_dir.path / files[r] for r in sorted(files) if files[r]]
        self.profile = {"id": newest, "first_step": int(newest[4:]) if is_whole_number(newest[4:]) else None,
                        "result": None}
        try:
            if not paths:
                raise DSparkError("no rank wrote a trace")
            self.profile["result"] = self._analyse(paths)
            self.profile_error = ""
        except (DSparkError, OSError, ValueError) as exc:
            self.profile_error = f"profile {newest}: {exc}"

    def job_rows(self) -> list[tuple[str, str]]:
        return jobtext.rows(self.job)

    def profile_line(self) -> str:
        """One line per rank of the newest profile: compute, exposed comm, overlap, idle (ms and fractions)."""
        if not self.profile or not self.profile["result"]:
            return self.profile_error
        parts = []
        for r in self.profile["result"].get("ranks", []):
            span = r["span_ms"] or 1.0
            overlap = r.get("comm_overlap_fraction")
            parts.append(f"rank {r['rank']}: span {r['span_ms']:.1f} ms, compute {r['compute_ms'] / span:.0%}, "
                         f"exposed comm {r['comm_exposed_ms'] / span:.0%}, idle {r['idle_ms'] / span:.0%}, "
                         f"comm overlapped {'-' if overlap is None else f'{overlap:.0%}'}")
        return f"profile {self.profile['id']}: " + "; ".join(parts)

    def summary(self) -> str:
        info = self.feed.info()
        state = info.get("state", "?")
        name = info.get("name") or ""
        step = "-" if self.step is None else self.step
        extra = " (whole run shown)" if self.done else ""
        note = f" | {self.note}" if self.note else ""
        return f"run {self.run_dir.id} {name} | {state}{extra} | step {step} | {self.charts.points} points{note}"

    def event_lines(self, last: int = 6) -> list[str]:
        out = []
        for e in self.events[-last:]:
            rank = "" if e.get("rank") is None else f" rank {e['rank']}"
            what = f"{e.get('key')}: {e.get('old')} -> {e.get('new')}" if e.get("key") else ""
            reason = f" ({e['reason']})" if e.get("reason") else ""
            out.append(f"step {e.get('step')}{rank} {e.get('kind')} {what}{reason}")
        return out


class Dashboard(LiveBox):
    """A live dashboard of one run: charts, a pause toggle, the refresh rate, recent events, stop and close."""

    def __init__(self, run: str | RunDir, refresh_hz: float = DEFAULT_HZ, stop_run=None, job_source=live_job):
        ensure_bokehjs()
        interval = interval_for(refresh_hz)
        self.watch = RunWatch(run, job_source=job_source)
        # The history so far goes into the charts before the plot widget is made: jupyter_bokeh sends the document
        # as it is then, and a browser that renders the view later never receives the streams sent before it.
        self.watch.tick()
        self._stop_run = stop_run
        self.header = widgets.HTML()
        self.pause = widgets.ToggleButton(value=False, description="pause", icon="pause", tooltip="pause updates",
                                          layout=widgets.Layout(width="90px"))
        self.rate = rate_slider(refresh_hz)
        self.stop_button = widgets.Button(description="stop run", icon="stop", button_style="danger",
                                          tooltip="stop the training job", layout=widgets.Layout(width="100px"))
        self.close_button = widgets.Button(description="close", icon="times", tooltip="close this dashboard",
                                           layout=widgets.Layout(width="90px"))
        self.event_log = widgets.HTML()
        self.job_panel = widgets.HTML()
        self.profile_panel = widgets.VBox()
        self._profile_shown: str | None = None
        self.plot = BokehPlot(self.watch.charts.layout)
        self.pause.observe(self._on_pause, "value")
        self.rate.observe(self._on_rate, "value")
        self.stop_button.on_click(self._on_stop)
        self.close_button.on_click(lambda _: self.close())
        super().__init__([self.header, widgets.HBox([self.pause, self.rate, self.stop_button, self.close_button]),
                          self.job_panel, self.plot, self.profile_panel, self.event_log])
        self.add_class("dspark-dashboard")
        self._lock = threading.Lock()
        self.poller = Poller(self._tick, interval, name=f"dspark-dashboard-{self.watch.run_dir.id}")
        self._render_text()
        if not self.watch.done:
            self.poller.start()

    @property
    def charts(self) -> MetricCharts:
        return self.watch.charts

    def _tick(self) -> bool:
        with self._lock:
            more = self.watch.tick()
            self._render_text()
        return more

    def _render_text(self) -> None:
        error = f' <span style="color:#d62728">read error: {html.escape(str(self.poller.error))}</span>' \
            if getattr(self, "poller", None) and self.poller.error else ""
        self.header.value = f"<b>{html.escape(self.watch.summary())}</b>{error}"
        lines = self.watch.event_lines()
        markers = ", ".join(f"step {step}: {label}" for step, label in sorted(self.watch.charts.marker_labels.items()))
        self.event_log.value = "<br>".join(
            ([f'<span class="dspark-markers">changes: {html.escape(markers)}</span>'] if markers else [])
            + [f"<code>{html.escape(line)}</code>" for line in lines])
        rows = self.watch.job_rows()
        self.job_panel.value = ('<table class="dspark-job" style="font-size:12px">' + "".join(
            f"<tr><td style='padding-right:1em'><b>{html.escape(field)}</b></td><td>{html.escape(text)}</td></tr>"
            for field, text in rows) + "</table>") if rows else ""
        self._render_profile()
        if self.watch.done:
            self.stop_button.disabled = True
            self.pause.disabled = True

    def _render_profile(self) -> None:
        profile = self.watch.profile
        key = profile["id"] if profile and profile["result"] else None
        if key is None and self.watch.profile_error and self._profile_shown != self.watch.profile_error:
            old = self.profile_panel.children
            self.profile_panel.children = [widgets.HTML(f'<span class="dspark-profile" style="color:#d62728">'
                                                        f'{html.escape(self.watch.profile_error)}</span>')]
            close_tree(old)
            self._profile_shown = self.watch.profile_error
        if key is None or key == self._profile_shown:
            return
        from dspark_lab.trace.view import breakdown_figure

        old = self.profile_panel.children
        line = widgets.HTML(f'<span class="dspark-profile">{html.escape(self.watch.profile_line())}</span>')
        self.profile_panel.children = [line, BokehPlot(breakdown_figure(
            profile["result"], title=f"profile {key}: where the time goes per rank (ms)"))]
        close_tree(old)
        self._profile_shown = key

    def _on_pause(self, change) -> None:
        self.poller.pause(change["new"])
        self.pause.description = "resume" if change["new"] else "pause"
        self.pause.icon = "play" if change["new"] else "pause"

    def _on_rate(self, change) -> None:
        self.poller.set_interval(1.0 / max(change["new"], 0.01))

    def _on_stop(self, _button) -> None:
        stop = self._stop_run
        if stop is None:
            from dspark_lab.runtime import commands

            stop = commands.stop
        self._stop_in_background(stop, self.watch.run_dir.id, self.event_log, self.stop_button)
