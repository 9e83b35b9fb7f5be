"""Progress of a fetch: one tqdm bar on a terminal, periodic plain lines elsewhere, or nothing.

The engine reports through the ``FetchEvents`` callbacks (``on_start``, ``on_bytes``,
``on_file``, ``on_retry``, ``on_concurrency``); every class here implements them. A download of
a million files must not print a million lines or open a million bars, so there is exactly one
overall bar (bytes with rate and ETA, files done/total, retries, errors and the effective
concurrency in its text), and when output is not a terminal - a log file, a batch job, CI -
one plain line every ``interval`` seconds instead, because a bar's carriage returns make a log
file unreadable.

All callbacks run on the engine's event loop thread and must be cheap: ``on_bytes`` is called
for every chunk, so it only adds to counters and lets tqdm (or a clock check) decide when to
draw.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, TextIO

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

log = logging.getLogger("bulkfetch")

_UNITS = ("B", "kB", "MB", "GB", "TB", "PB")


def format_bytes(n: float) -> str:
    """``1500`` -> ``"1.5 kB"``: decimal units, one decimal, the same units the plan summary
    and the engine's summary use, so the numbers a user compares agree."""
    value = float(n)
    for unit in _UNITS:
        if abs(value) < 1000 or unit == _UNITS[-1]:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def format_duration(seconds: float | None) -> str:
    """``3725`` -> ``"1h02m05s"``; None or negative -> ``"?"`` (no rate yet, so no ETA)."""
    if seconds is None or seconds < 0 or seconds != seconds:
        return "?"
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    if h:
        return f"{h}h{m:02d}m{s:02d}s"
    if m:
        return f"{m}m{s:02d}s"
    return f"{s}s"


class Progress:
    """Counts what the engine reports and shows nothing: the ``--quiet``/``progress=False`` sink.

    Subclasses draw; the counters live here so every display (and the final summary) agrees.
    """

    def __init__(self) -> None:
        self.total_files = 0
        self.total_bytes = 0
        self.done_files = 0
        self.done_bytes = 0
        self.ok_files = 0
        self.errors = 0
        self.retries = 0
        self.concurrency: int | None = None
        self.started = time.monotonic()
        self._start_bytes = 0

    # -- FetchEvents -------------------------------------------------------------------------
    def on_start(
        self, total_files: int, total_bytes: int, done_files: int, done_bytes: int
    ) -> None:
        """The engine begins: totals of the whole job and what earlier runs already finished."""
        self.total_files = int(total_files)
        self.total_bytes = int(total_bytes or 0)
        self.done_files = int(done_files)
        self.done_bytes = int(done_bytes or 0)
        self._start_bytes = self.done_bytes
        self.started = time.monotonic()

    def on_bytes(self, n: int) -> None:
        """``n`` more bytes arrived (negative when a restarted download discards a partial)."""
        self.done_bytes += n

    def on_file(self, uri: str, ok: bool, message: str | None = None) -> None:
        """A product reached a final state: verified on disk (``ok``) or failed for good."""
        self.done_files += 1
        if ok:
            self.ok_files += 1
        else:
            self.errors += 1

    def on_retry(self, uri: str, message: str | None = None) -> None:
        """An attempt failed and the product will be tried again."""
        self.retries += 1

    def on_concurrency(self, n: int) -> None:
        """The engine's effective number of simultaneous downloads changed (adaptive limit)."""
        self.concurrency = int(n)

    # -- summaries ---------------------------------------------------------------------------
    @property
    def elapsed(self) -> float:
        """Seconds since :meth:`on_start`."""
        return time.monotonic() - self.started

    def rate(self) -> float:
        """Bytes per second downloaded by this run (not counting earlier runs)."""
        elapsed = self.elapsed
        return (self.done_bytes - self._start_bytes) / elapsed if elapsed > 0 else 0.0

    def eta(self) -> float | None:
        """Seconds left at the current average rate, or None before any bytes arrived."""
        rate = self.rate()
        if rate <= 0 or not self.total_bytes:
            return None
        return max(self.total_bytes - self.done_bytes, 0) / rate

    def line(self) -> str:
        """One human line with everything the bar shows: the plain-output form of the bar."""
        pct = f" ({100 * self.done_bytes / self.total_bytes:.0f}%)" if self.total_bytes else ""
        parts = [
            f"{self.done_files}/{self.total_files} files",
            f"{format_bytes(self.done_bytes)}/{format_bytes(self.total_bytes)}{pct}",
            f"{format_bytes(self.rate())}/s",
            f"ETA {format_duration(self.eta())}",
            f"retries {self.retries}",
            f"errors {self.errors}",
        ]
        if self.concurrency is not None:
            parts.append(f"concurrency {self.concurrency}")
        return ", ".join(parts)

    def close(self) -> None:
        """Finish the display; safe to call twice."""

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class BarProgress(Progress):
    """One tqdm bar in bytes (rate, ETA) whose text carries files, retries, errors, concurrency."""

    def __init__(self, stream: TextIO | None = None, *, mininterval: float = 0.5) -> None:
        super().__init__()
        self._stream = stream if stream is not None else sys.stderr
        self._mininterval = mininterval
        self._bar: tqdm | None = None
        self._redirect: Any = None

    def on_start(
        self, total_files: int, total_bytes: int, done_files: int, done_bytes: int
    ) -> None:
        super().on_start(total_files, total_bytes, done_files, done_bytes)
        if self._bar is not None:
            self._bar.close()
        if self._redirect is None:
            # Log lines (a retry, a 404) printed under the bar instead of through it.
            self._redirect = logging_redirect_tqdm(loggers=[log], tqdm_class=tqdm)
            self._redirect.__enter__()
        self._bar = tqdm(
            total=self.total_bytes or None,
            initial=self.done_bytes,
            unit="B",
            unit_scale=True,
            unit_divisor=1000,
            file=self._stream,
            mininterval=self._mininterval,
            dynamic_ncols=True,
            leave=True,
        )
        self._describe()

    def _describe(self) -> None:
        """Refresh the bar's text; tqdm redraws on its own schedule (``refresh=False``)."""
        if self._bar is None:
            return
        self._bar.set_description_str(f"{self.done_files}/{self.total_files} files", refresh=False)
        post = f"retries={self.retries} errors={self.errors}"
        if self.concurrency is not None:
            post += f" conc={self.concurrency}"
        self._bar.set_postfix_str(post, refresh=False)

    def on_bytes(self, n: int) -> None:
        super().on_bytes(n)
        if self._bar is not None:
            self._bar.update(n)

    def on_file(self, uri: str, ok: bool, message: str | None = None) -> None:
        super().on_file(uri, ok, message)
        self._describe()

    def on_retry(self, uri: str, message: str | None = None) -> None:
        super().on_retry(uri, message)
        self._describe()

    def on_concurrency(self, n: int) -> None:
        super().on_concurrency(n)
        self._describe()

    def close(self) -> None:
        if self._bar is not None:
            self._describe()
            self._bar.refresh()
            self._bar.close()
            self._bar = None
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)
            self._redirect = None


class LogProgress(Progress):
    """Plain ``[bulkfetch] HH:MM:SS <line>`` every ``interval`` seconds, and once at the end.

    Lines are written to ``stream`` directly (not through ``logging``) so a script that never
    configured logging still sees them, as it would see a bar.
    """

    def __init__(self, stream: TextIO | None = None, *, interval: float = 10.0) -> None:
        super().__init__()
        self._stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self._last = time.monotonic()
        self._started_once = False
        self._closed = False

    def _emit(self) -> None:
        stamp = time.strftime("%H:%M:%S")
        self._stream.write(f"[bulkfetch] {stamp} {self.line()}\n")
        self._stream.flush()
        self._last = time.monotonic()

    def _maybe_emit(self) -> None:
        if time.monotonic() - self._last >= self.interval:
            self._emit()

    def on_start(
        self, total_files: int, total_bytes: int, done_files: int, done_bytes: int
    ) -> None:
        super().on_start(total_files, total_bytes, done_files, done_bytes)
        self._started_once = True
        self._closed = False
        self._emit()

    def on_bytes(self, n: int) -> None:
        super().on_bytes(n)
        self._maybe_emit()

    def on_file(self, uri: str, ok: bool, message: str | None = None) -> None:
        super().on_file(uri, ok, message)
        self._maybe_emit()

    def on_retry(self, uri: str, message: str | None = None) -> None:
        super().on_retry(uri, message)
        self._maybe_emit()

    def on_concurrency(self, n: int) -> None:
        super().on_concurrency(n)
        self._maybe_emit()

    def close(self) -> None:
        if self._started_once and not self._closed:
            self._emit()
        self._closed = True


def is_terminal(stream: Any) -> bool:
    """Whether ``stream`` is an interactive terminal (False for files, pipes, closed streams)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def in_notebook() -> bool:
    """Whether we run inside a Jupyter kernel, whose output cell redraws a bar fine although
    its streams are not terminals."""
    shell = sys.modules.get("IPython")
    if shell is None or "ipykernel" not in sys.modules:
        return False
    try:
        ip = shell.get_ipython()  # type: ignore[attr-defined]
    except Exception:
        return False
    return ip is not None and type(ip).__name__ == "ZMQInteractiveShell"


def make_progress(
    mode: str | bool = "auto",
    *,
    stream: TextIO | None = None,
    interval: float = 10.0,
) -> Progress:
    """Pick the display: ``"bar"``, ``"log"``, ``"none"``, or ``"auto"``.

    ``auto`` draws a bar when both stdout and the output stream are terminals (a user
    watching) or in a Jupyter notebook, and falls back to plain lines when either is
    redirected - the case of a ``nohup``/batch job whose output ends up in a file. ``True``
    means ``auto``, ``False``
    ``none``, so API callers can pass ``progress=True`` as they would to astroquery.
    """
    if mode is True:
        mode = "auto"
    elif mode is False or mode is None:
        mode = "none"
    out = stream if stream is not None else sys.stderr
    if mode == "auto":
        watched = (is_terminal(sys.stdout) and is_terminal(out)) or in_notebook()
        mode = "bar" if watched else "log"
    if mode == "bar":
        return BarProgress(out)
    if mode == "log":
        return LogProgress(out, interval=interval)
    if mode == "none":
        return Progress()
    raise ValueError(f"unknown progress mode {mode!r}: use auto, bar, log or none")


__all__ = [
    "Progress",
    "BarProgress",
    "LogProgress",
    "make_progress",
    "format_bytes",
    "format_duration",
    "is_terminal",
    "in_notebook",
]
