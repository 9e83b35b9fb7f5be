"""Reliability: the fault soak and the crash-and-resume experiment, short versions.

Both run the code of ``scripts/soak.py`` and ``scripts/crash_resume.py`` (the README quotes
their full-size figures): the simulator in its own process, the real ``python -m bulkfetch``
command, and every check made from outside against the simulator's truth. Here they run small
enough for the suite's time budget - 200 files for the soak, 3 kills for the crash test - but
with the same fault mix and the same thresholds.
"""

from __future__ import annotations

import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))

from crash_resume import run_crash_resume  # noqa: E402
from soak import FAULT_MIX, run_soak  # noqa: E402


def test_fault_soak_200_files(tmp_path: Path) -> None:
    """10% 503/429 with Retry-After, 5% resets, 3% corrupt bodies, 2% stalls, 2% HTML pages
    served as 200, 1% permanent 404: every available file byte-exact, nothing bad left under a
    final name, every 404 an ERROR row naming its status, exit 1, at most 1.3x the payload."""
    result = run_soak(files=200, seed=1, concurrency=16, retry_after=0.5, workdir=tmp_path)
    print(result.format())
    # the archive really misbehaved, in every way the mix says
    for fault in ("fail_503", "fail_429", "reset_rate", "corrupt_rate", "stall_rate", "html_rate"):
        assert result.fault_counts.get(fault, 0) > 0, (fault, result.fault_counts)
    assert FAULT_MIX["missing_rate"] > 0 and result.missing > 0
    # what a user relies on
    assert result.files == 200
    assert result.good == result.available == 200 - result.missing
    assert result.corrupt == [] and result.absent == [] and result.ghosts == []
    assert result.stray == []  # no .part, .etag, .tmp nor unknown file left
    assert result.unexpected_errors == []
    assert result.errors_reported == result.missing  # each 404 an ERROR row with "404"
    assert result.exit_code == 1
    assert result.ratio <= 1.3, result.format()
    assert result.failures(1.3) == []


def test_kill_9_at_random_moments_then_resume(tmp_path: Path) -> None:
    """kill -9 once while planning and three times while downloading, then SIGINT and SIGTERM:
    the state passes integrity_check every time, final names are always byte-exact, finished
    files are never fetched again, partial ones resume with Range, and the archive serves at
    most 1.1x the payload."""
    result = run_crash_resume(
        kills=3,
        seed=2,
        targets=3,
        sectors=1,
        scale=0.5,
        concurrency=3,
        bandwidth=15e6,
        kill_window=0.6,
        workdir=tmp_path,
    )
    report = result.format() + "\n" + "\n".join(result.failures(1.1)) + "\n" + result.log_tail
    print(report)
    assert result.failures(1.1) == [], report
    assert result.planning_kill_before_downloads and result.planned_at_kill < result.files
    assert result.kills_done == 3
    assert result.integrity == ["ok"] * (1 + 3 + 2)
    assert result.invariant_failures == []
    assert (result.sigint_exit, result.sigterm_exit) == (130, 143)
    assert result.signal_manifest_failures == []
    assert result.final_exit == 0
    assert result.files == 6 and result.good == 6
    assert result.corrupt == [] and result.absent == [] and result.stray == []
    assert result.refetched == []
    assert result.range_requests > 0 and result.partial_responses > 0
    assert result.ratio <= 1.1, result.format()
