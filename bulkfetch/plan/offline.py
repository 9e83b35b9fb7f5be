"""Planning without queries (product tables, MAST's bulk curl scripts) and exporting a plan."""

from __future__ import annotations

import csv
import io
import logging
import re
import shlex
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import numpy as np
from astropy.table import Table

from ..errors import UnsafePathError, UsageError
from ..sources import (
    DEFAULT_MAST_URL,
    download_url,
)
from ..store import JobStore, PlannedProduct
from .archive import _one_line
from .rows import _Refusals, _values, local_path, rows_from_table, sector_from_name
from .selection import _CORE_COLUMNS, _EXPORT_ONLY_COLUMNS, PRODUCT_COLUMNS, Selection
from .summary import PlanSummary, _finish_summary

log = logging.getLogger("bulkfetch")


# ------------------------------------------------------------------------------------------------
# planning from a table
# ------------------------------------------------------------------------------------------------

_TABLE_FORMATS = {
    ".ecsv": "ascii.ecsv",
    ".csv": "ascii.csv",
    ".xml": "votable",
    ".vot": "votable",
    ".votable": "votable",
    ".fits": "fits",
    ".fit": "fits",
}


def read_table(path: str | Path) -> Table:
    """A product table from any format astropy reads (ECSV, VOTable, FITS, CSV).

    The format comes from the extension when it is a known one, otherwise astropy guesses.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"no such table file: {path}")
    fmt = _TABLE_FORMATS.get(path.suffix.lower())
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # VOTable/FITS unit chatter is no user's concern
            table = Table.read(path, format=fmt) if fmt else Table.read(path)
    except Exception as exc:
        raise UsageError(f"cannot read table {path}: {_one_line(exc)}") from exc
    return table


def plan_table(
    store: JobStore | None,
    root: str | Path,
    table: Table,
    *,
    server: str = DEFAULT_MAST_URL,
    flat: bool = False,
    kinds: Sequence[str] | None = None,
    dry_run: bool = False,
) -> PlanSummary:
    """Plan the products of an astropy ``table`` (e.g. from ``get_product_list``), no query.

    The table needs ``dataURI`` and ``productFilename`` (and ``obs_collection``, ``obs_id``
    unless ``flat``); a missing one is refused by name. ``kinds`` keeps only those product
    kinds (needs ``productSubGroupDescription``). Download URLs are built from ``server`` the
    way astroquery builds them.
    """
    started = time.monotonic()
    dry_run = dry_run or store is None
    summary = PlanSummary(root=str(root), dry_run=dry_run, new_files=None if dry_run else 0)
    if kinds:
        if "productSubGroupDescription" not in table.colnames:
            raise UsageError(
                "the product table lacks the column productSubGroupDescription needed "
                "to select product kinds"
            )
        subgroups = Selection(kinds=list(kinds)).subgroups()
        mask = np.isin(np.asarray(_values(table["productSubGroupDescription"]), object), subgroups)
        table = table[mask]
    refusals = _Refusals()
    rows = rows_from_table(table, server=server, flat=flat, refusals=refusals)
    _summarize_rows(summary, rows)
    return _store_rows(store, summary, rows, refusals, started)


def _summarize_rows(summary: PlanSummary, rows: Iterable[PlannedProduct]) -> None:
    for row in rows:
        summary.add(row.sector, 1, row.size or 0)
        if row.size is None:
            summary.unknown_sizes += 1


def _store_rows(
    store: JobStore | None,
    summary: PlanSummary,
    rows: list[PlannedProduct],
    refusals: _Refusals,
    started: float,
) -> PlanSummary:
    summary.refused = refusals.count
    summary.refused_examples = list(refusals.examples)
    if not summary.dry_run and store is not None:
        summary.new_files = store.add_products(rows)
        _finish_summary(summary, store, 0)
    else:  # a dry run: the table's bytes on top of what the job still needs (an upper bound)
        _finish_summary(summary, store, summary.total_bytes)
    summary.elapsed = time.monotonic() - started
    return summary


# ------------------------------------------------------------------------------------------------
# planning from MAST's bulk curl scripts
# ------------------------------------------------------------------------------------------------

#: File name endings of TESS products -> (productSubGroupDescription, part kept in obs_id).
#: ``..._fast-lc.fits`` belongs to the observation ``..._fast`` (MAST's 20-s obs_ids end so).
_SUFFIXES: tuple[tuple[str, str, str], ...] = (
    ("_fast-lc.fits", "FAST-LC", "_fast"),
    ("_fast-tp.fits", "FAST-TP", "_fast"),
    ("_lc.fits", "LC", ""),
    ("_tp.fits", "TP", ""),
    ("_dvt.fits", "DVT", ""),
    ("_dvr.pdf", "DVR", ""),
    ("_dvr.xml", "DVM", ""),
    ("_dvm.pdf", "DVM", ""),
)
#: ``<dv obs_id stem>-<TCE>-<run>_dvs.pdf``: one summary per TCE of the DV observation.
_DVS_RE = re.compile(r"^(?P<stem>.+)-\d{2}-(?P<run>\d{5})_dvs\.pdf$")


def product_from_filename(name: str) -> tuple[str, str]:
    """(obs_id, productSubGroupDescription) derived from a TESS product file name.

    ``tess2018206045859-s0001-0000000025155310-0120-s_lc.fits`` is product ``LC`` of the
    observation ``tess2018206045859-s0001-0000000025155310-0120-s``. An unknown ending keeps
    the name without its extension as obs_id and an empty kind.
    """
    dvs = _DVS_RE.match(name)
    if dvs:
        return f"{dvs.group('stem')}-{dvs.group('run')}", "DVS"
    for suffix, kind, keep in _SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)] + keep, kind
    stem = name.rsplit(".", 1)[0] if "." in name else name
    return stem, ""


def _parse_curl_line(line: str) -> tuple[str, str]:
    """(output name, URL) of one ``curl ... -o NAME URL`` line; ValueError says what is wrong."""
    try:
        args = shlex.split(line)
    except ValueError as exc:
        raise ValueError(f"cannot parse: {exc}") from None
    if not args or Path(args[0]).name != "curl":
        raise ValueError("not a curl command")
    name: str | None = None
    url: str | None = None
    i = 1
    while i < len(args):
        arg = args[i]
        if arg in ("-o", "--output"):
            if i + 1 >= len(args):
                raise ValueError(f"{arg} without a file name")
            name = args[i + 1]
            i += 2
            continue
        if arg in ("-C", "--continue-at", "-H", "--header", "-A", "--user-agent", "--retry"):
            i += 2
            continue
        if arg.startswith(("http://", "https://")):
            if url is not None:
                raise ValueError("more than one URL")
            url = arg
        i += 1
    if name is None:
        raise ValueError("no -o NAME")
    if url is None:
        raise ValueError("no URL")
    return name, url


def _uri_from_url(url: str) -> str:
    """The MAST dataURI in a download URL's ``uri=`` parameter."""
    query = parse_qs(urlsplit(url).query)
    values = query.get("uri")
    if not values or not values[0]:
        raise ValueError("the URL has no uri= parameter")
    return unquote(values[0]) if "%" in values[0] else values[0]


def read_curl_script(path: str | Path) -> tuple[list[tuple[str, str]], list[str]]:
    """((name, url) per good line, messages for malformed lines with their line numbers)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise UsageError(f"cannot read curl script {path}: {exc.strerror or exc}") from exc
    good: list[tuple[str, str]] = []
    bad: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        try:
            good.append(_parse_curl_line(stripped))
        except ValueError as exc:
            bad.append(f"{path}:{number}: {exc}: {stripped[:120]!r}")
    return good, bad


def plan_curl_scripts(
    store: JobStore | None,
    root: str | Path,
    paths: Sequence[str | Path],
    *,
    flat: bool = False,
    server: str | None = None,
    dry_run: bool = False,
) -> PlanSummary:
    """Plan the files of MAST bulk download scripts (``tesscurl_sector_N_lc.sh``), no query.

    Each ``curl -C - -L -o NAME URL`` line becomes a row: dataURI from the URL's ``uri=``,
    obs_id and kind from the file name, the sector from ``-sNNNN-``. With ``server`` the URL is
    rebuilt for that server; otherwise the script's URL is used as written. Malformed lines are
    refused with their line numbers and the rest is planned; a script with no curl line at all
    is a usage error. Sizes are unknown until downloaded.
    """
    started = time.monotonic()
    dry_run = dry_run or store is None
    summary = PlanSummary(root=str(root), dry_run=dry_run, new_files=None if dry_run else 0)
    refusals = _Refusals()
    rows: list[PlannedProduct] = []
    seen: set[str] = set()
    taken: dict[str, str] = {}
    for script in paths:
        good, bad = read_curl_script(script)
        if not good:
            detail = f" ({bad[0]})" if bad else ""
            raise UsageError(f"{script}: no 'curl ... -o NAME URL' lines found{detail}")
        for message in bad:
            refusals.add(message)
        for name, url in good:
            try:
                uri = _uri_from_url(url)
            except ValueError as exc:
                refusals.add(f"{script}: {name}: {exc}")
                continue
            if uri in seen:
                continue
            seen.add(uri)
            obs_id, kind = product_from_filename(name)
            collection = uri.split(":", 1)[1].split("/", 1)[0] if ":" in uri else "TESS"
            try:
                local = local_path(collection, obs_id, name, flat)
            except UnsafePathError as exc:
                refusals.add(f"{script}: {uri}: {exc}")
                continue
            if local in taken:
                refusals.add(f"{script}: {uri}: would be saved as {local} like {taken[local]}")
                continue
            taken[local] = uri
            rows.append(
                PlannedProduct(
                    uri=uri,
                    url=download_url(server, uri) if server else url,
                    local_path=local,
                    size=None,
                    obs_collection=collection,
                    obs_id=obs_id,
                    product_filename=name,
                    sector=sector_from_name(name),
                    kind=kind,
                    extra={"source": Path(script).name},
                )
            )
    _summarize_rows(summary, rows)
    return _store_rows(store, summary, rows, refusals, started)


# ------------------------------------------------------------------------------------------------
# export
# ------------------------------------------------------------------------------------------------


def _export_columns(first: Iterable[dict[str, Any]]) -> list[str]:
    """Column order of an export: astroquery's product columns first, then extras, then ours."""
    keys: set[str] = set()
    for extra in first:
        keys.update(extra)
    names = [c for c in PRODUCT_COLUMNS if c in _CORE_COLUMNS or c in keys]
    names += sorted(k for k in keys if k not in PRODUCT_COLUMNS and k not in _EXPORT_ONLY_COLUMNS)
    return names + list(_EXPORT_ONLY_COLUMNS)


def _record_row(rec: Any, columns: list[str]) -> list[Any]:
    core = {
        "dataURI": rec.uri,
        "obs_collection": rec.obs_collection,
        "obs_id": rec.obs_id,
        "productFilename": rec.product_filename,
        "size": rec.size,
        "productSubGroupDescription": rec.kind,
        "url": rec.url,
        "local_path": rec.local_path,
        "sector": rec.sector,
        "status": rec.status,
    }
    return [core[c] if c in core else rec.extra.get(c) for c in columns]


def _ecsv_header(columns: list[str], sample: list[list[Any]]) -> str:
    """The ECSV header (YAML + names line) of a zero-row table with the sampled dtypes."""
    cols = []
    for j in range(len(columns)):
        values = [row[j] for row in sample if row[j] is not None]
        if values and all(isinstance(v, bool) for v in values):
            dtype: Any = bool
        elif values and all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            dtype = np.int64
        elif values and all(isinstance(v, (int, float)) for v in values):
            dtype = np.float64
        else:
            dtype = str
        cols.append(np.zeros(0, dtype=dtype))
    buf = io.StringIO()
    Table(cols, names=columns).write(buf, format="ascii.ecsv", delimiter=",")
    return buf.getvalue()


def export_plan(store: JobStore, path: str | Path, *, batch: int = 10_000) -> int:
    """Write every planned product to ``path`` (ECSV for ``.ecsv``, else CSV); return rows.

    Rows are streamed from the job state so a million-row plan is not built in memory; the
    file reads back with ``Table.read`` and plans again with :func:`plan_table`.
    """
    path = Path(path)
    ecsv = path.suffix.lower() == ".ecsv"
    records = store.iter_records(batch=batch)
    sample = []
    for rec in records:
        sample.append(rec)
        if len(sample) >= 1000:
            break
    columns = _export_columns(r.extra for r in sample)
    first_rows = [_record_row(r, columns) for r in sample]
    tmp = path.with_name(path.name + ".tmp")
    count = 0
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            if ecsv:
                fh.write(_ecsv_header(columns, first_rows))
            writer = csv.writer(fh, lineterminator="\n")
            if not ecsv:
                writer.writerow(columns)

            def cell(v: Any) -> Any:
                return "" if v is None else v

            for row in first_rows:
                writer.writerow([cell(v) for v in row])
                count += 1
            for rec in records:
                writer.writerow([cell(v) for v in _record_row(rec, columns)])
                count += 1
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UsageError(f"cannot write {path}: {exc.strerror or exc}") from exc
    return count


def iter_planned(store: JobStore) -> Iterator[PlannedProduct]:
    """The job's rows as :class:`PlannedProduct`, e.g. to compare two plans."""
    for rec in store.iter_records():
        yield PlannedProduct(
            uri=rec.uri,
            url=rec.url,
            local_path=rec.local_path,
            size=rec.size,
            obs_collection=rec.obs_collection,
            obs_id=rec.obs_id,
            product_filename=rec.product_filename,
            sector=rec.sector,
            kind=rec.kind,
            extra=rec.extra,
        )
