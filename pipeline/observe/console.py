"""What a run prints and logs: the console's lines and the run's own log file.

- :func:`set_up_logging` writes to stderr, warnings only with ``--quiet``. Parsl
  logs everything to its own files in the run directory; on the console only its
  warnings, each message once, on one line, without a traceback
  (:class:`ConsoleFilter`, :class:`ConsoleFormatter`), so that a provider that
  fails every few seconds cannot flood it.
- :func:`log_file` writes the run's log, :data:`LOG_FILE` in its run directory:
  everything logged, and a failure's traceback.

While the live panel draws, :mod:`palflow.pipeline.observe.live` routes the same
console lines through the panel's console.
"""

from __future__ import annotations

import copy
import logging
import re

LOG_FILE = "palflow.log"
"""The run's log in its run directory: everything logged, and a failure's traceback."""
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def set_up_logging(quiet: bool, side_by_side: bool) -> None:
    """Log to stderr, warnings only when ``quiet`` (progress lines included)."""
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO)
    for handler in logging.getLogger().handlers:
        handler.addFilter(ConsoleFilter())
        if type(handler) is logging.StreamHandler:  # the console (not pytest's capture)
            handler.setFormatter(ConsoleFormatter(console_format(side_by_side), "%H:%M:%S"))


def console_format(side_by_side: bool) -> str:
    # With several campaigns, the thread names which campaign a line is about.
    return LOG_FORMAT.replace(": ", " [%(threadName)s]: ", 1) if side_by_side else LOG_FORMAT


PARSL_NOISE = ("Simple Launcher only supports single node per block",)
"""Parsl warnings that are no news to a palflow user: an MPI executor's SimpleLauncher
starts one manager per block by design (its tasks span the block's nodes with srun)."""


class ConsoleFilter(logging.Filter):
    """What reaches the console. Parsl logs everything to its own files in the run
    directory (``parsl/``); on the console only its warnings, each once (a provider
    that fails repeats itself every few seconds), so that the campaign's progress stays
    readable. A failure's traceback goes to the run's log only."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[tuple[str, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "log_file_only", False):
            return False
        if not record.name.startswith("parsl"):
            return True
        if record.levelno < logging.WARNING:
            return False
        message = record.getMessage()
        if any(noise in message for noise in PARSL_NOISE):
            return False
        key = (record.name, re.sub(r"\d+", "#", message))
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


class ConsoleFormatter(logging.Formatter):
    """Parsl's lines on one console line each, without their tracebacks (those stay in
    Parsl's own log files in the run directory)."""

    def format(self, record: logging.LogRecord) -> str:
        if record.name.startswith("parsl"):
            record = copy.copy(record)
            record.msg, record.args = " ".join(record.getMessage().split()), None
            record.exc_info, record.exc_text, record.stack_info = None, None, None
        return super().format(record)


def log_file(run, thread: str | None = None) -> logging.Handler:
    """A handler writing the run's log, :data:`LOG_FILE` in its run directory; with
    several campaigns side by side, only the lines of its own ``thread`` and the main
    thread's."""
    handler = logging.FileHandler(run.root / LOG_FILE, encoding="utf-8")
    handler.setFormatter(logging.Formatter(LOG_FORMAT.replace(": ", " [%(threadName)s]: ", 1)))
    handler.addFilter(
        lambda r: (
            (not r.name.startswith("parsl") or r.levelno >= logging.WARNING)
            and (thread is None or r.threadName in ("MainThread", thread))
        )
    )
    return handler
