"""Watching a campaign while it runs: a live console view, and a refreshed report.

Both are observers: callables the coordinator calls once per turn of its loop
(:attr:`palflow.pipeline.engine.coordinator.Coordinator.observers`), which throttle themselves.

- :class:`LiveView` draws a panel with ``rich`` on a terminal: labels against the
  budget, the oracle queue, tasks in flight per module, the newest ensemble, the
  latest test force MAE, failures by kind, elapsed time and the expected time left.
  While it draws, the log's console lines go through the panel's own console
  (:class:`ConsoleLogHandler`), so they scroll above the panel, which is drawn once,
  at the bottom. When the output is not a terminal (a batch job), it writes the
  same as one plain log line every ``interval_s`` seconds instead.
- :class:`ReportRefresher` rebuilds ``report.html`` in a separate process every few
  minutes (``palflow report RUN_DIR``), never holding the loop up.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger("palflow.progress")


@dataclass
class Snapshot:
    """What the view shows, taken from a coordinator at one moment."""

    name: str
    labels: int
    budget: int
    queue: int
    in_flight: dict[str, int]
    version: int | None
    version_labels: int | None
    test_mae: float | None
    failures: dict[str, int]
    elapsed_s: float
    left_s: float | None
    stopping: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    systems: dict[str, dict[str, Any]] = field(default_factory=dict)
    """With several systems: each one's active ``labels`` and newest ``force_mae``."""
    accurate: dict[str, float] = field(default_factory=dict)
    """Per system, the share of recently explored frames below the lower trust level."""


def _accurate_text(accurate: dict[str, float]) -> str:
    if len(accurate) == 1:
        return f"{next(iter(accurate.values())):.0%}"
    return ", ".join(f"{name} {share:.0%}" for name, share in accurate.items())


def _system_text(numbers: dict[str, Any]) -> str:
    mae = numbers.get("force_mae")
    return f"{numbers['labels']} labels, MAE {mae:.4f}" if mae is not None else (
        f"{numbers['labels']} labels, MAE -")  # fmt: skip


class LabelRate:
    """Labels per second over the last ``window_s`` seconds, for the time left."""

    def __init__(self, window_s: float = 120.0) -> None:
        self.window_s = window_s
        self.points: deque[tuple[float, int]] = deque()

    def add(self, t: float, labels: int) -> None:
        self.points.append((t, labels))
        while self.points and t - self.points[0][0] > self.window_s:
            self.points.popleft()

    def per_second(self) -> float | None:
        if len(self.points) < 2:
            return None
        (t0, l0), (t1, l1) = self.points[0], self.points[-1]
        return (l1 - l0) / (t1 - t0) if t1 > t0 and l1 > l0 else None


def snapshot(coordinator, rate: LabelRate) -> Snapshot:
    """Read what the view needs from a running coordinator's public view."""
    view = coordinator.view()
    now = time.time()
    rate.add(now, view.labels)
    left = view.max_wall_s - view.elapsed_s
    per_second = rate.per_second()
    if per_second:
        left = min(left, (view.budget - view.labels) / per_second)
    return Snapshot(
        name=view.name,
        labels=view.labels,
        budget=view.budget,
        queue=view.queue,
        in_flight=view.in_flight,
        version=view.version,
        version_labels=view.version_labels,
        test_mae=view.test_force_mae,
        failures=view.failures,
        elapsed_s=view.elapsed_s,
        left_s=max(left, 0.0) if not view.stop_reason else None,
        stopping=view.stop_reason,
        systems=view.systems,
        accurate=view.accurate,
    )


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def plain_line(s: Snapshot) -> str:
    """The snapshot as one log line, for batch jobs and ``--quiet``."""
    flight = " ".join(f"{m} {n}" for m, n in s.in_flight.items())
    failures = ", ".join(f"{k} {v}" for k, v in sorted(s.failures.items())) or "none"
    mae = f"{s.test_mae:.4f} eV/Å" if s.test_mae is not None else "-"
    version = f"v{s.version} ({s.version_labels} labels)" if s.version is not None else "none yet"
    state = f"stopping: {s.stopping}" if s.stopping else f"left ~{_clock(s.left_s)}"
    systems = "".join(f", {name}: {_system_text(n)}" for name, n in s.systems.items())
    accurate = f", accurate {_accurate_text(s.accurate)}" if s.accurate else ""
    return (
        f"{s.name}: labels {s.labels}/{s.budget}, queue {s.queue}, in flight [{flight}], "
        f"ensemble {version}, test force MAE {mae}{systems}{accurate}, failures {failures}, "
        f"elapsed {_clock(s.elapsed_s)}, {state}"
    )


def render(s: Snapshot):
    """The snapshot as a rich panel."""
    from rich.panel import Panel
    from rich.progress_bar import ProgressBar
    from rich.table import Table

    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    bar = Table.grid(padding=(0, 1))
    bar.add_row(ProgressBar(total=s.budget, completed=s.labels, width=30), f"{s.labels}/{s.budget}")
    table.add_row("labels", bar)
    table.add_row("oracle queue", str(s.queue))
    table.add_row("in flight", "  ".join(f"{m} {n}" for m, n in s.in_flight.items()))
    table.add_row(
        "ensemble",
        f"v{s.version} on {s.version_labels} labels" if s.version is not None else "none yet",
    )
    table.add_row("test force MAE", f"{s.test_mae:.4f} eV/Å" if s.test_mae is not None else "-")
    for name, numbers in s.systems.items():
        table.add_row(f"  {name}", _system_text(numbers))
    if s.accurate:
        table.add_row("explored, accurate", _accurate_text(s.accurate))
    failures = ", ".join(f"{k} {v}" for k, v in sorted(s.failures.items()))
    table.add_row("failures", failures or "none")
    table.add_row("elapsed", _clock(s.elapsed_s))
    table.add_row(
        "time left" if not s.stopping else "stopping",
        f"~{_clock(s.left_s)}" if not s.stopping else s.stopping,
    )
    return Panel(table, title=f"palflow: {s.name}", expand=False)


class ConsoleLogHandler(logging.Handler):
    """Write log records through a rich console, as plain text: while a ``Live``
    panel draws on that console, each line is printed above it and the panel is
    drawn again below, instead of the line drawing over the panel."""

    def __init__(self, console, level: int = logging.NOTSET) -> None:
        super().__init__(level)
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from rich.text import Text

            # soft_wrap: no line breaks added; the terminal wraps a long line.
            self.console.print(Text(self.format(record)), soft_wrap=True, highlight=False)
        except Exception:
            self.handleError(record)


def _console_handlers() -> list[logging.StreamHandler]:
    """The root logger's handlers that write to the process's stderr or stdout."""
    return [
        handler
        for handler in logging.getLogger().handlers
        if type(handler) is logging.StreamHandler
        and getattr(handler, "stream", None) in (sys.stderr, sys.stdout, sys.__stderr__)
    ]


class LiveView:
    """The live console view (see the module's description).

    Parameters
    ----------
    interactive
        Draw a rich panel (a terminal); otherwise write plain log lines.
    interval_s
        Seconds between plain lines (the panel refreshes every half second).
    """

    def __init__(self, interactive: bool, interval_s: float = 30.0) -> None:
        self.interactive = interactive
        self.interval_s = interval_s
        self.rate = LabelRate()
        self._last = float("-inf")  # the first call always shows
        self._live = None
        self._swapped: list[tuple[logging.Handler, logging.Handler]] = []
        if interactive:
            from rich.console import Console
            from rich.live import Live

            console = Console(stderr=True)
            self._live = Live(console=console, refresh_per_second=2, transient=False)
            self._route_logs(console)
            self._live.start()

    def __call__(self, coordinator) -> None:
        now = time.monotonic()
        every = 0.5 if self.interactive else self.interval_s
        if now - self._last < every:
            return
        self._last = now
        s = snapshot(coordinator, self.rate)
        if self._live is not None:
            self._live.update(render(s))
        else:
            logger.info(plain_line(s))

    def close(self, coordinator=None) -> None:
        """Show the final state once more, and give the terminal back (also when the
        last snapshot cannot be taken)."""
        try:
            if coordinator is not None:
                self._last = float("-inf")
                self(coordinator)
        finally:
            self._release()

    def _release(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None
        root = logging.getLogger()
        for console_handler, original in self._swapped:
            root.removeHandler(console_handler)
            root.addHandler(original)
        self._swapped = []

    def _route_logs(self, console) -> None:
        """Swap each console log handler for one printing through ``console``, with
        the same level, format and filters (restored by :meth:`close`)."""
        root = logging.getLogger()
        for original in _console_handlers():
            handler = ConsoleLogHandler(console, original.level)
            handler.setFormatter(original.formatter)
            for kept in original.filters:
                handler.addFilter(kept)
            root.removeHandler(original)
            root.addHandler(handler)
            self._swapped.append((handler, original))


class ReportRefresher:
    """Rebuild ``report.html`` every ``interval_s`` seconds, in its own process."""

    def __init__(self, run_root: str | Path, interval_s: float = 180.0) -> None:
        self.run_root = str(run_root)
        self.interval_s = interval_s
        self._last = time.monotonic()
        self._process: subprocess.Popen | None = None

    def __call__(self, coordinator=None) -> None:
        if time.monotonic() - self._last < self.interval_s:
            return
        if self._process is not None and self._process.poll() is None:
            return  # the last one is still drawing
        self._last = time.monotonic()
        self._process = subprocess.Popen(
            [sys.executable, "-m", "palflow.pipeline.observe.report", self.run_root],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def close(self) -> None:
        """Wait for a rebuild in progress, so that the final one is not overtaken."""
        if self._process is not None:
            try:
                self._process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self._process.kill()
