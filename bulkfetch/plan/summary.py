"""What a plan found: files and bytes per sector, refusals, and whether the job fits."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ..store import DONE, JobStore

log = logging.getLogger("bulkfetch")


# ------------------------------------------------------------------------------------------------
# the summary
# ------------------------------------------------------------------------------------------------


def _free_bytes(root: str | Path) -> int | None:
    """Free space of the file system that holds (or will hold) ``root``."""
    path = Path(root).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def _human(n: int | None) -> str:
    if n is None:
        return "unknown"
    value = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(value) < 1000 or unit == "TB":
            return f"{value:,.0f} {unit}" if unit == "B" else f"{value:,.1f} {unit}"
        value /= 1000
    return f"{n} B"


@dataclass
class PlanSummary:
    """What a plan (or a dry run) found: the selection's files and bytes, and whether they fit.

    ``files``/``total_bytes``/``per_sector`` describe the selection, including units planned by
    an earlier run; ``new_files`` is what this run added to the job (None in a dry run).
    ``needed_bytes`` is what is still to download (in a dry run an upper bound: products the job
    already holds may be counted again) and ``free_bytes`` the free space under DIR.
    """

    root: str
    dry_run: bool = False
    files: int = 0
    total_bytes: int = 0
    unknown_sizes: int = 0
    new_files: int | None = 0
    per_sector: dict[int | None, tuple[int, int]] = field(default_factory=dict)
    queried_sectors: list[int] = field(default_factory=list)
    skipped_sectors: list[int] = field(default_factory=list)
    refused: int = 0
    refused_examples: list[str] = field(default_factory=list)
    superseded_removed: int = 0
    superseded_kept: int = 0
    job_files: int = 0
    job_bytes: int = 0
    needed_bytes: int = 0
    free_bytes: int | None = None
    elapsed: float = 0.0

    @property
    def empty(self) -> bool:
        """Nothing matched the selection."""
        return self.files == 0

    @property
    def fits(self) -> bool:
        """Whether the bytes still to download fit in the free space (unknown: assume yes)."""
        return self.free_bytes is None or self.needed_bytes <= self.free_bytes

    def add(self, sector: int | None, files: int, nbytes: int) -> None:
        f, b = self.per_sector.get(sector, (0, 0))
        self.per_sector[sector] = (f + files, b + nbytes)
        self.files += files
        self.total_bytes += nbytes

    def format(self) -> str:
        """A human-readable report: totals, a per-sector table, refusals, disk space."""
        head = "Dry run for" if self.dry_run else "Plan for"
        lines: list[str] = []
        if self.empty:
            lines.append(
                f"{head} {self.root}: nothing matches this selection; no products planned."
            )
        else:
            lines.append(
                f"{head} {self.root}: {self.files:,} files, {_human(self.total_bytes)} "
                f"in {len(self.per_sector)} sector(s)"
            )
            lines.append(f"  {'sector':>8} {'files':>10} {'bytes':>12}")
            for sector in sorted(self.per_sector, key=lambda s: (s is None, s or 0)):
                files, nbytes = self.per_sector[sector]
                label = "-" if sector is None else str(sector)
                lines.append(f"  {label:>8} {files:>10,} {_human(nbytes):>12}")
        if self.queried_sectors or self.skipped_sectors:
            lines.append(
                f"  queried {len(self.queried_sectors)} sector(s); "
                f"{len(self.skipped_sectors)} already planned (not queried again)"
            )
        if self.unknown_sizes:
            lines.append(f"  {self.unknown_sizes:,} file(s) of unknown size (not in the bytes)")
        if self.new_files is not None:
            lines.append(f"  new in the job: {self.new_files:,} file(s)")
        if self.superseded_removed or self.superseded_kept:
            lines.append(
                f"  superseded DV runs: {self.superseded_removed:,} file(s) removed from the job"
                + (
                    f", {self.superseded_kept:,} kept (already downloaded)"
                    if self.superseded_kept
                    else ""
                )
            )
        if self.refused:
            lines.append(f"  refused: {self.refused:,} row(s), e.g.")
            lines.extend(f"    {m}" for m in self.refused_examples[:5])
        if not self.dry_run:
            lines.append(f"  job: {self.job_files:,} files, {_human(self.job_bytes)}")
        lines.append(
            f"  still to download: {_human(self.needed_bytes)}; "
            f"free under {self.root}: {_human(self.free_bytes)}"
        )
        if not self.fits:
            lines.append(
                f"WARNING: the job needs {_human(self.needed_bytes)} but only "
                f"{_human(self.free_bytes)} is free under {self.root}; it will not fit"
            )
        return "\n".join(lines)


def _finish_summary(summary: PlanSummary, store: JobStore | None, extra_needed: int) -> None:
    """Fill in job totals, bytes still to download and free space."""
    if store is not None:
        counts = store.counts()
        summary.job_files = sum(n for n, _ in counts.values())
        summary.job_bytes = sum(b for _, b in counts.values())
        summary.needed_bytes = summary.job_bytes - counts.get(DONE, (0, 0))[1] + extra_needed
    else:
        summary.needed_bytes = extra_needed
    summary.free_bytes = _free_bytes(summary.root)
