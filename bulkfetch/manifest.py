"""The manifest: one row per planned product, astroquery's columns first, streamed to disk.

astroquery's ``Observations.download_products`` returns a Table with exactly four columns,
``Local Path``, ``Status``, ``Message``, ``URL``; scripts written against astroquery index those
names, so ours come first with the same meaning:

* ``COMPLETE`` - the file is on disk, verified; ``Message`` and ``URL`` are empty (astroquery
  sets them to None on success).
* ``ERROR`` - the product failed for good (retries exhausted or a permanent HTTP status);
  ``Message`` says why (``HTTPError: 404 ...``, ``size mismatch ...``) and ``URL`` is the
  download URL, as astroquery sets both for errors.
* ``SKIPPED`` - the product was planned but not downloaded *yet*: the run was interrupted, the
  job is still running, or a fetch has not been started. ``Message`` says so, with the last
  transient error (or the reason ``verify`` gave the file back) in parentheses, and ``URL`` is
  set, so a user can tell these from errors and knows that re-running the same command resumes
  them. astroquery uses ``SKIPPED`` for "not fetched on purpose" (cloud-only), the closest of
  its three words.

Then our own columns: ``dataURI``, ``obs_collection``, ``obs_id``, ``productFilename``,
``sector``, ``kind``, ``size`` (bytes), ``sha256``, ``attempts``, ``http_status`` and
``finished`` (ISO 8601 UTC time the file was verified).

Millions of rows must not be built into a Table in memory, so :func:`write_manifest` writes
``manifest.csv`` and ``manifest.ecsv`` row batch by row batch straight from the job state: the
ECSV header comes from astropy itself (a zero-row Table with the right dtypes, units and
descriptions), the rows are quoted the way astropy's ECSV reader expects. ``Table.read`` gives
either file back. Files are written to a temporary name and renamed, so a reader never sees half
a manifest.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import os
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from astropy import units as u
from astropy.table import Column, MaskedColumn, Table

from .store import DONE, ERROR, JobStore, ProductRecord

log = logging.getLogger("bulkfetch")

#: astroquery's manifest columns, in its order.
ASTROQUERY_COLUMNS: tuple[str, ...] = ("Local Path", "Status", "Message", "URL")

COMPLETE = "COMPLETE"
ERROR_STATUS = "ERROR"
SKIPPED = "SKIPPED"

#: Message of a product that is planned but not downloaded yet.
NOT_YET_MESSAGE = "not downloaded yet: run interrupted or not started; rerun to resume"

CSV_NAME = "manifest.csv"
ECSV_NAME = "manifest.ecsv"


@dataclass(frozen=True)
class _Col:
    """One manifest column: its name, numpy dtype, unit and a description for the ECSV header."""

    name: str
    kind: str  # "str" or "int"
    description: str
    unit: u.UnitBase | None = None


COLUMNS: tuple[_Col, ...] = (
    _Col("Local Path", "str", "where the file is (download_dir joined as astroquery joins it)"),
    _Col("Status", "str", "COMPLETE, ERROR or SKIPPED (planned, not downloaded yet)"),
    _Col("Message", "str", "why a product is not COMPLETE; empty when it is"),
    _Col("URL", "str", "download URL of a product that is not COMPLETE; empty when it is"),
    _Col("dataURI", "str", "MAST data URI, the product's key"),
    _Col("obs_collection", "str", "mission (TESS)"),
    _Col("obs_id", "str", "observation id; the directory in the nested layout"),
    _Col("productFilename", "str", "file name"),
    _Col("sector", "int", "TESS sector, when known"),
    _Col("kind", "str", "productSubGroupDescription (LC, TP, DVT, ...)"),
    _Col("size", "int", "size in bytes (verified for COMPLETE, expected otherwise)", u.byte),
    _Col("sha256", "str", "SHA-256 of the verified file, hex"),
    _Col("attempts", "int", "failed download attempts (retries used)"),
    _Col("http_status", "int", "last HTTP status of a failed attempt"),
    _Col("finished", "str", "UTC time the file was verified (ISO 8601)"),
)

COLUMN_NAMES: tuple[str, ...] = tuple(c.name for c in COLUMNS)


@dataclass
class ManifestSummary:
    """What a written manifest holds: rows per astroquery status, and where it went."""

    paths: list[Path] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)

    @property
    def rows(self) -> int:
        """Total number of rows written."""
        return sum(self.statuses.values())


def manifest_status(record: ProductRecord) -> tuple[str, str | None, str | None]:
    """Map a job-state row to astroquery's ``(Status, Message, URL)``.

    Kept in one place because the CLI summary, the API's returned Table and both files must
    agree on what ``ERROR`` and ``SKIPPED`` mean.
    """
    if record.status == DONE:
        return COMPLETE, None, None
    if record.status == ERROR:
        message = record.message or "failed"
        if record.http_status and str(record.http_status) not in message:
            message = f"HTTP {record.http_status}: {message}"
        return ERROR_STATUS, _one_line(message), record.url
    # pending or active: planned, not downloaded (yet)
    message = NOT_YET_MESSAGE
    if record.message:
        message = f"{NOT_YET_MESSAGE} (last: {_one_line(record.message)})"
    return SKIPPED, message, record.url


def local_path(download_dir: str | os.PathLike[str], rel: str) -> str:
    """``Local Path`` as astroquery builds it: ``os.path.join(download_dir, <parts>)``.

    astroquery does not make the path absolute; it joins what the caller gave (``'.'`` by
    default), so ``./mastDownload/TESS/<obs_id>/<file>``. We do the same, so a script comparing
    our manifest with astroquery's sees identical strings.
    """
    base = os.fspath(download_dir)
    if os.sep == "/":  # fast path (millions of rows): the same string os.path.join builds
        if not base:
            return rel
        return base + rel if base.endswith("/") else f"{base}/{rel}"
    return os.path.join(base, *rel.split("/"))


def _one_line(text: str) -> str:
    """Collapse newlines: a manifest row is one line, and ECSV rows cannot span lines."""
    return " ".join(str(text).split()) if ("\n" in text or "\r" in text) else str(text)


def _iso(ts: float | None) -> str | None:
    """Unix time -> ISO 8601 UTC with milliseconds, or None."""
    if ts is None:
        return None
    whole = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts))
    return f"{whole}.{int((ts % 1) * 1000):03d}Z"


def record_row(record: ProductRecord, download_dir: str | os.PathLike[str]) -> list[Any]:
    """One manifest row, in :data:`COLUMN_NAMES` order; None marks an empty (masked) value."""
    status, message, url = manifest_status(record)
    return [
        local_path(download_dir, record.local_path),
        status,
        message,
        url,
        record.uri,
        record.obs_collection,
        record.obs_id,
        record.product_filename,
        record.sector,
        record.kind or None,
        record.size,
        record.sha256 if record.status == DONE else None,
        record.attempts,
        record.http_status,
        _iso(record.finished_at) if record.status == DONE else None,
    ]


# -- ECSV -----------------------------------------------------------------------------------


def _empty_table() -> Table:
    """A zero-row Table with every column's dtype, unit and description: the ECSV header source."""
    table = Table()
    for col in COLUMNS:
        dtype = np.int64 if col.kind == "int" else str
        table[col.name] = Column([], dtype=dtype, unit=col.unit, description=col.description)
    table.meta["comments"] = [
        "bulkfetch manifest: astroquery's Local Path/Status/Message/URL first.",
        "Status SKIPPED = planned but not downloaded yet; rerun the same command to resume.",
    ]
    return table


def ecsv_header() -> str:
    """The ECSV header lines and the column-name line, exactly as astropy writes them."""
    buf = io.StringIO()
    _empty_table().write(buf, format="ascii.ecsv")
    return buf.getvalue()


_NEEDS_QUOTES = frozenset(' "\t,')


def _ecsv_field(value: Any) -> str:
    """Quote one value for a space-delimited ECSV row.

    Empty and missing values become ``""`` (astropy reads them back as masked); values with a
    space, quote, tab or comma, or starting with ``#`` (a comment otherwise), are double-quoted
    with inner quotes doubled, which is what astropy's reader undoes.
    """
    if value is None:
        return '""'
    text = str(value)
    if not text:
        return '""'
    if text[0] == "#" or not _NEEDS_QUOTES.isdisjoint(text):
        return '"' + text.replace('"', '""') + '"'
    return text


def _ecsv_line(row: Sequence[Any]) -> str:
    return " ".join(_ecsv_field(v) for v in row) + "\n"


# -- writing ----------------------------------------------------------------------------------


def iter_rows(
    records: Iterable[ProductRecord], download_dir: str | os.PathLike[str]
) -> Iterator[list[Any]]:
    """Manifest rows for ``records``, lazily."""
    for record in records:
        yield record_row(record, download_dir)


def write_rows(
    rows: Iterable[Sequence[Any]],
    *,
    csv_path: str | os.PathLike[str] | None = None,
    ecsv_path: str | os.PathLike[str] | None = None,
) -> ManifestSummary:
    """Stream ``rows`` into a CSV and/or an ECSV file; return counts per status.

    Each file is written under ``<name>.tmp`` and renamed at the end, so an interrupted write
    leaves the previous manifest intact rather than a truncated one.
    """
    summary = ManifestSummary()
    targets = [Path(p) for p in (csv_path, ecsv_path) if p is not None]
    if not targets:
        raise ValueError("write_rows needs csv_path or ecsv_path")
    tmp = {p: p.with_name(p.name + ".tmp") for p in targets}
    for p in targets:
        p.parent.mkdir(parents=True, exist_ok=True)
    csv_fh = open(tmp[Path(csv_path)], "w", newline="", encoding="utf-8") if csv_path else None
    ecsv_fh = open(tmp[Path(ecsv_path)], "w", encoding="utf-8") if ecsv_path else None
    try:
        writer = csv.writer(csv_fh, lineterminator="\n") if csv_fh else None
        if writer is not None:
            writer.writerow(COLUMN_NAMES)
        if ecsv_fh is not None:
            ecsv_fh.write(ecsv_header())
        status_index = COLUMN_NAMES.index("Status")
        for row in rows:
            summary.statuses[row[status_index]] += 1
            if writer is not None:
                writer.writerow(["" if v is None else v for v in row])
            if ecsv_fh is not None:
                ecsv_fh.write(_ecsv_line(row))
        for fh in (csv_fh, ecsv_fh):
            if fh is not None:
                fh.close()  # the last write happens here: a full disk fails here, too
    except BaseException:
        for fh in (csv_fh, ecsv_fh):
            if fh is not None:
                with contextlib.suppress(OSError):
                    fh.close()
        for t in tmp.values():
            t.unlink(missing_ok=True)
        raise
    for final, t in tmp.items():
        os.replace(t, final)
        summary.paths.append(final)
    return summary


def write_manifest(
    store: JobStore,
    download_dir: str | os.PathLike[str],
    *,
    output: str | os.PathLike[str] | None = None,
    batch: int = 10_000,
) -> ManifestSummary:
    """Write the job's manifest, streamed from the job state.

    Without ``output``: ``DIR/manifest.csv`` and ``DIR/manifest.ecsv``. With ``output``: one
    file, ECSV if its name ends in ``.ecsv``, CSV otherwise. ``download_dir`` is the directory
    as the user named it; ``Local Path`` is joined onto it unchanged, as astroquery does.
    """
    records = store.iter_records(batch=batch)
    rows = iter_rows(records, download_dir)
    if output is None:
        base = Path(download_dir)
        summary = write_rows(rows, csv_path=base / CSV_NAME, ecsv_path=base / ECSV_NAME)
    elif str(output).lower().endswith(".ecsv"):
        summary = write_rows(rows, ecsv_path=output)
    else:
        summary = write_rows(rows, csv_path=output)
    log.info(
        "manifest: %d rows (%s) -> %s",
        summary.rows,
        ", ".join(f"{k} {v}" for k, v in sorted(summary.statuses.items())) or "empty",
        ", ".join(str(p) for p in summary.paths),
    )
    return summary


# -- in memory (the API's return value) -------------------------------------------------------


def manifest_table(records: Iterable[ProductRecord], download_dir: str | os.PathLike[str]) -> Table:
    """An in-memory manifest Table for ``records`` (the API returns this, like astroquery).

    ``Message`` and ``URL`` are object columns holding None on success, exactly like
    astroquery's, so ``row['Message'] is None`` keeps working in ported scripts. The other
    columns are typed (masked where a value is unknown) and carry the same units as the ECSV.
    """
    rows = list(iter_rows(records, download_dir))
    columns: list[Column] = []
    for i, col in enumerate(COLUMNS):
        values = [r[i] for r in rows]
        if col.name in ("Message", "URL"):
            data = np.empty(len(values), dtype=object)
            data[:] = values
            columns.append(Column(data, name=col.name, description=col.description))
        elif col.kind == "int":
            mask = [v is None for v in values]
            ints = np.array([0 if v is None else int(v) for v in values], dtype=np.int64)
            columns.append(
                MaskedColumn(
                    ints, mask=mask, name=col.name, unit=col.unit, description=col.description
                )
            )
        else:
            mask = [v is None for v in values]
            strs = np.array(["" if v is None else str(v) for v in values], dtype=str)
            if any(mask):
                columns.append(
                    MaskedColumn(strs, mask=mask, name=col.name, description=col.description)
                )
            else:
                columns.append(Column(strs, name=col.name, description=col.description))
    return Table(columns)


def read_manifest(path: str | os.PathLike[str]) -> Table:
    """Read a manifest written by :func:`write_manifest` (CSV or ECSV) back into a Table."""
    p = Path(path)
    fmt = "ascii.ecsv" if p.suffix.lower() == ".ecsv" else "ascii.csv"
    return Table.read(p, format=fmt)


__all__ = [
    "ASTROQUERY_COLUMNS",
    "COLUMN_NAMES",
    "COMPLETE",
    "ERROR_STATUS",
    "SKIPPED",
    "NOT_YET_MESSAGE",
    "ManifestSummary",
    "manifest_status",
    "local_path",
    "record_row",
    "write_rows",
    "write_manifest",
    "manifest_table",
    "read_manifest",
    "ecsv_header",
]
