"""Multi-sector DV runs: keep only the newest, widest run of each target."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..errors import UnsafePathError
from ..layout import ETAG_SUFFIX, PART_SUFFIX, resolve_inside
from ..store import DONE, ERROR, PENDING, JobStore, PlannedProduct
from .selection import DV_SUBGROUPS

log = logging.getLogger("bulkfetch")


# ------------------------------------------------------------------------------------------------
# multi-sector DV runs
# ------------------------------------------------------------------------------------------------

_DV_RANGE_RE = re.compile(r"-s(\d{4})-s(\d{4})-(\d{16})-")


def dv_run(name: str) -> tuple[str, int, int] | None:
    """(TIC, first sector, last sector) of a DV product's file name or obs_id, else None.

    DV file names carry the sector range of the run: ``tess2018206190142-s0001-s0013-
    0000000025155310-00353_dvr.pdf`` is a run over sectors 1..13 for TIC 25155310.
    """
    match = _DV_RANGE_RE.search(name)
    if not match:
        return None
    return match.group(3).lstrip("0") or "0", int(match.group(1)), int(match.group(2))


class LatestDV:
    """Keeps, per target, only the newest, widest multi-sector DV run: older runs are obsolete.

    "Newest" is the highest last sector; among runs ending there the widest (lowest first
    sector) wins. A run is known by its file names (``-s0001-s0013-<TIC>-``); single-sector DV
    results (``-s0005-s0005-``), other products and names without a range are never dropped.

    Rows already written cannot be taken back, so the planner feeds sectors newest first and
    commits them in that order: the first run accepted for a target is then its best one.
    """

    def __init__(self) -> None:
        self.best: dict[str, tuple[int, int]] = {}
        self.dropped = 0

    @staticmethod
    def _run(sub: Any, name: Any) -> tuple[str, tuple[int, int]] | None:
        if sub not in DV_SUBGROUPS or not name:
            return None
        run = dv_run(str(name))
        if run is None or run[1] == run[2]:
            return None
        return run[0], (run[2], -run[1])

    def seed(self, rows: Iterable[tuple[str, str]]) -> None:
        """Learn the runs a job already holds, from (kind, productFilename) pairs."""
        for sub, name in rows:
            run = self._run(sub, name)
            if run is not None and run[1] > self.best.get(run[0], (-1, 0)):
                self.best[run[0]] = run[1]

    def filter(self, rows: list[PlannedProduct]) -> list[PlannedProduct]:
        """``rows`` without those of runs that a newer or wider run supersedes."""
        runs = [self._run(r.kind, r.product_filename) for r in rows]
        local: dict[str, tuple[int, int]] = {}
        for run in runs:
            if run is not None and run[1] > local.get(run[0], (-1, 0)):
                local[run[0]] = run[1]
        winner: dict[str, tuple[int, int] | None] = {}
        for tic, key in local.items():
            known = self.best.get(tic)
            if known is not None and known > key:
                winner[tic] = None  # a newer run was planned already
            else:
                winner[tic] = key
                self.best[tic] = key
        kept = [
            row
            for row, run in zip(rows, runs, strict=True)
            if run is None or winner[run[0]] == run[1]
        ]
        dropped = len(rows) - len(kept)
        if dropped:
            self.dropped += dropped
            log.info("latest DV only: dropped %d products of older DV runs", dropped)
        return kept


def prune_superseded_dv(store: JobStore, root: str | Path) -> tuple[int, int]:
    """Take the rows of DV runs that a newer or wider run supersedes out of the job.

    :class:`LatestDV` only filters the rows a plan is about to write; a run stored by an earlier
    plan (a narrower sector range, or one planned without ``latest_dv_only``) can be
    superseded later, when the next multi-sector run appears. Its rows not yet downloaded are
    removed, with any partial body; rows already downloaded stay in the job, files included
    (they are the user's). Returns (removed, kept because downloaded).
    """
    runs: dict[str, dict[tuple[int, int], list[tuple[str, str, str]]]] = {}
    for rec in store.iter_records(kinds=DV_SUBGROUPS):
        run = LatestDV._run(rec.kind, rec.product_filename)
        if run is not None:
            tic, key = run
            runs.setdefault(tic, {}).setdefault(key, []).append(
                (rec.uri, rec.status, rec.local_path)
            )
    drop: list[tuple[str, str]] = []
    kept = 0
    for by_key in runs.values():
        best = max(by_key)
        for key, items in by_key.items():
            if key == best:
                continue
            for uri, status, path in items:
                if status in (PENDING, ERROR):
                    drop.append((uri, path))
                elif status == DONE:
                    kept += 1
    if not drop:
        return 0, kept
    removed = store.drop_unfinished(uri for uri, _ in drop)
    for _, path in drop:
        try:
            part = str(resolve_inside(root, path)) + PART_SUFFIX
        except UnsafePathError:  # pragma: no cover - the store only holds checked paths
            continue
        for leftover in (part, part + ETAG_SUFFIX):
            Path(leftover).unlink(missing_ok=True)
    log.info("latest DV only: removed %d products of superseded DV runs from the job", removed)
    return removed, kept
