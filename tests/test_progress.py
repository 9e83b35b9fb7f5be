"""Progress display: one bar or a few plain lines, never a flood, showing what the engine sent."""

from __future__ import annotations

import io
import os
import re

import pytest

from bulkfetch.progress import (
    BarProgress,
    LogProgress,
    Progress,
    format_bytes,
    format_duration,
    make_progress,
)


def _simulate_run(p: Progress, files: int = 500, chunk: int = 4096, chunks: int = 4) -> None:
    """Feed the events a fetch of ``files`` files would send (some retries, one error)."""
    p.on_start(files + 10, (files + 10) * chunk * chunks, 10, 10 * chunk * chunks)
    p.on_concurrency(8)
    for i in range(files):
        for _ in range(chunks):
            p.on_bytes(chunk)
        if i % 200 == 0:
            p.on_retry(f"mast:TESS/product/f{i}.fits", "HTTP 503")
        p.on_file(f"mast:TESS/product/f{i}.fits", i != 7, None if i != 7 else "HTTP 404")
    p.on_concurrency(12)
    p.close()


def test_counters_follow_events() -> None:
    p = Progress()
    _simulate_run(p)
    assert (p.total_files, p.done_files) == (510, 510)
    assert p.done_bytes == p.total_bytes == 510 * 4096 * 4
    assert (p.ok_files, p.errors, p.retries, p.concurrency) == (499, 1, 3, 12)
    line = p.line()
    assert "510/510 files" in line and "(100%)" in line
    assert "retries 3" in line and "errors 1" in line and "concurrency 12" in line


def test_plain_lines_are_periodic_not_per_event() -> None:
    out = io.StringIO()
    _simulate_run(LogProgress(out, interval=3600))
    lines = out.getvalue().splitlines()
    # one line at the start, one at the end: 2 000 byte events and 500 files print nothing more
    assert len(lines) == 2, lines
    assert "\r" not in out.getvalue()
    assert lines[0].startswith("[bulkfetch] ") and "10/510 files" in lines[0]
    assert "510/510 files" in lines[-1] and "errors 1" in lines[-1] and "retries 3" in lines[-1]
    assert "concurrency 12" in lines[-1]


def test_plain_lines_with_zero_interval_report_growing_counts() -> None:
    out = io.StringIO()
    p = LogProgress(out, interval=0)
    p.on_start(3, 300, 0, 0)
    for _ in range(3):
        p.on_bytes(100)
        p.on_file("u", True)
    p.close()
    p.close()  # idempotent: no second final line
    counts = [int(m) for m in re.findall(r"(\d+)/3 files", out.getvalue())]
    assert counts == sorted(counts) and counts[0] == 0 and counts[-1] == 3
    assert out.getvalue().count("\n") == 8  # start + 6 events + final


def test_bar_is_one_bar_with_files_retries_errors_concurrency() -> None:
    out = io.StringIO()
    p = BarProgress(out, mininterval=0)
    _simulate_run(p)
    text = out.getvalue()
    # a single bar redrawn in place: only the final close() ends the line
    assert text.count("\n") <= 1
    final = text.split("\r")[-1]
    assert "510/510 files" in final
    assert "retries=3 errors=1 conc=12" in final
    assert "100%" in final
    assert re.search(r"\d+(\.\d+)?[kMG]?B/s", final), final


def test_make_progress_modes() -> None:
    out = io.StringIO()  # not a terminal -> plain lines
    assert type(make_progress("auto", stream=out)) is LogProgress
    assert type(make_progress(True, stream=out)) is LogProgress
    assert type(make_progress("bar", stream=out)) is BarProgress
    quiet = make_progress(False, stream=out)
    assert type(quiet) is Progress
    _simulate_run(quiet)
    assert out.getvalue() == ""
    with pytest.raises(ValueError, match="unknown progress mode"):
        make_progress("fancy")


def test_auto_picks_the_bar_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    master, slave = os.openpty()
    try:
        with os.fdopen(slave, "w", closefd=False) as tty:
            monkeypatch.setattr("sys.stdout", tty)
            assert type(make_progress("auto", stream=tty)) is BarProgress
            assert type(make_progress("auto", stream=io.StringIO())) is LogProgress
    finally:
        os.close(master)
        os.close(slave)


def test_formatting() -> None:
    assert format_bytes(0) == "0 B"
    assert format_bytes(1500) == "1.5 kB"
    assert format_bytes(5 * 1000**3) == "5.0 GB"
    assert format_bytes(999) == "999 B"
    assert format_duration(3725) == "1h02m05s"
    assert format_duration(61) == "1m01s"
    assert format_duration(None) == "?"
