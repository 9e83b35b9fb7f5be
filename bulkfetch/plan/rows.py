"""Product tables and astroquery's JSON answers become rows of the job state: typed as
astroquery types them, deduped by dataURI, every local path checked before it is accepted."""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from astropy.table import Table

from ..errors import UnsafePathError, UsageError
from ..layout import safe_component
from ..sources import (
    download_url,
    normalize_server,
)
from ..store import PlannedProduct

if TYPE_CHECKING:  # astroquery is imported lazily: it is slow to import and the CLI may not need it
    from astroquery.mast import ObservationsClass

from .selection import _CORE_COLUMNS, _EXPORT_ONLY_COLUMNS

log = logging.getLogger("bulkfetch")

#: How many refusal messages a summary keeps (all are counted and logged).
MAX_EXAMPLES = 20

_SECTOR_RE = re.compile(r"-s(\d{4})-")


# ------------------------------------------------------------------------------------------------
# product tables -> rows
# ------------------------------------------------------------------------------------------------


def _values(column: Any) -> list[Any]:
    """A column as Python values, masked -> None, NaN -> None (JSON-able, no numpy types)."""
    values = column.tolist()
    if column.dtype.kind == "f":
        values = [None if v is not None and math.isnan(v) else v for v in values]
    elif column.dtype.kind == "S":
        values = [v.decode() if isinstance(v, bytes) else v for v in values]
    return values


def sector_from_name(name: str) -> int | None:
    """The sector in a TESS file name or obs_id (``...-s0001-...``), if it has one."""
    match = _SECTOR_RE.search(name)
    return int(match.group(1)) if match else None


def local_path(obs_collection: str, obs_id: str, product_filename: str, flat: bool) -> str:
    """Where astroquery saves a product, relative to DIR; an unsafe component is refused.

    The same result and checks as :func:`bulkfetch.layout.relative_path`, spelled as a string
    join: it runs once per product, millions of times in a full plan, and building a
    ``PurePosixPath`` each time costs ten times more than the checks themselves.
    """
    name = safe_component(product_filename, "productFilename")
    if flat:
        return name
    collection = safe_component(obs_collection, "obs_collection")
    return f"mastDownload/{collection}/{safe_component(obs_id, 'obs_id')}/{name}"


@dataclass
class _Refusals:
    """Rows refused for an unsafe path or a clash, counted, with a few examples kept.

    Not shared between threads: each product batch has its own, merged by the main thread.
    """

    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, message: str) -> None:
        self.count += 1
        log.warning("%s", message)
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(message)

    def merge(self, other: _Refusals) -> None:
        self.count += other.count
        room = max(0, MAX_EXAMPLES - len(self.examples))
        self.examples.extend(other.examples[:room])


def rows_from_table(
    products: Table,
    *,
    server: str,
    flat: bool,
    refusals: _Refusals,
    sector: int | None = None,
) -> list[PlannedProduct]:
    """Product rows of ``products`` (deduped by dataURI, first wins; unsafe paths refused).

    ``sector`` is the sector the rows were planned for; without it a ``sequence_number``
    column or the ``-sNNNN-`` part of the file name is used.
    """
    missing = [c for c in ("dataURI", "productFilename") if c not in products.colnames]
    if not flat:
        missing += [c for c in ("obs_collection", "obs_id") if c not in products.colnames]
    if missing:
        raise UsageError(
            "the product table lacks the column(s) "
            + ", ".join(missing)
            + " (a table from astroquery's get_product_list has them)"
        )
    n = len(products)
    if n == 0:
        return []
    data = {c: _values(products[c]) for c in products.colnames}
    return _rows_from_columns(
        list(products.colnames), data, n, server=server, flat=flat, refusals=refusals,
        sector=sector,
    )  # fmt: skip


def _rows_from_columns(
    colnames: list[str],
    data: dict[str, list[Any]],
    n: int,
    *,
    server: str,
    flat: bool,
    refusals: _Refusals,
    sector: int | None,
) -> list[PlannedProduct]:
    """The rows of ``n`` products given column by column as Python values (None = masked).

    Shared by the table path (:func:`rows_from_table`) and the JSON fast path
    (:func:`_rows_from_json`), so both apply the same dedupe, path checks and typing.
    """
    uris = data["dataURI"]
    names = data["productFilename"]
    collections = data.get("obs_collection") or [""] * n
    obs_ids = data.get("obs_id") or [""] * n
    sizes = data.get("size") or [None] * n
    kinds = data.get("productSubGroupDescription") or [""] * n
    sequence = data.get("sequence_number")
    extra_cols = [c for c in colnames if c not in _CORE_COLUMNS and c not in _EXPORT_ONLY_COLUMNS]
    base = normalize_server(server)
    seen: set[str] = set()
    paths: dict[str, str] = {}
    rows: list[PlannedProduct] = []
    for i in range(n):
        uri = uris[i]
        if not uri:
            refusals.add(f"row {i}: empty dataURI, skipped")
            continue
        uri = str(uri)
        if uri in seen:
            continue
        seen.add(uri)
        name = "" if names[i] is None else str(names[i])
        collection = "" if collections[i] is None else str(collections[i])
        obs_id = "" if obs_ids[i] is None else str(obs_ids[i])
        try:
            path = local_path(collection, obs_id, name, flat)
        except UnsafePathError as exc:
            refusals.add(f"{uri}: {exc}")
            continue
        other = paths.get(path)
        if other is not None:
            refusals.add(f"{uri}: would be saved as {path} like {other}; refused")
            continue
        paths[path] = uri
        row_sector = sector
        if row_sector is None and sequence is not None and sequence[i] is not None:
            row_sector = int(sequence[i])
        if row_sector is None:
            row_sector = sector_from_name(name) or sector_from_name(obs_id)
        size = sizes[i]
        rows.append(
            PlannedProduct(
                uri=uri,
                url=download_url(base, uri),
                local_path=path,
                size=None if size is None or size < 0 else int(size),
                obs_collection=collection,
                obs_id=obs_id,
                product_filename=name,
                sector=row_sector,
                kind="" if kinds[i] is None else str(kinds[i]),
                extra={c: data[c][i] for c in extra_cols},
            )
        )
    return rows


def _cast_one(value: Any, pytype: Any) -> Any:
    """``value`` converted as numpy's ``astype(pytype)`` of an object array converts it.

    Python's own str/int/float values (all MAST sends in practice) take a shortcut with the
    same result; anything else goes through numpy itself, one value at a time.
    """
    kind = type(value)
    if pytype is str:
        if kind is str:  # numpy's fixed-width strings cannot end in NULs
            return value.rstrip("\x00") if value.endswith("\x00") else value
        if kind is int or kind is float or kind is bool:
            return str(value)  # what numpy's object -> str cast calls
    elif pytype is np.int64:
        if kind is int:
            return value
    elif pytype is np.float64:
        if kind is float:
            return value
        if kind is int:
            return float(value)
    return np.array([value], dtype=object).astype(pytype)[0].item()


def _json_pages(
    obs: ObservationsClass, responses: list[Any]
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """The JSON pages of astroquery's raw responses and the column config of their service.

    A page with status ERROR raises ``RemoteServiceError``, as astroquery's ``_parse_result``
    does; the service's name is taken (and cleared) the way ``_parse_result`` takes it.
    """
    from astroquery.exceptions import RemoteServiceError

    portal = obs._portal_api_connection
    service = portal._current_service
    portal._current_service = None
    col_config = portal._column_configs.get(service) if service else None
    results = [r.json() for r in responses]
    for result in results:
        if result["status"] == "ERROR":
            raise RemoteServiceError(result.get("msg", "There was an error with your request."))
    return results, col_config


def _json_columns(
    results: list[dict[str, Any]], col_config: dict[str, Any] | None
) -> list[tuple[str, Any, Any]] | None:
    """(name, python type, ignore value) per column, as ``_json_to_table`` would type them.

    None when the pages disagree on their fields (astroquery's ``vstack`` would then promote
    types or mask missing columns): the caller takes astroquery's own table path instead.
    """
    from astroquery.mast.utils import parse_type

    fields = [[(f["name"], f["type"]) for f in r["fields"]] for r in results]
    if any(f != fields[0] for f in fields[1:]):
        return None
    columns: list[tuple[str, Any, Any]] = []
    seen: set[str] = set()
    for name, dbtype in fields[0]:
        if name == "_selected_" or name in seen:  # astroquery drops both
            continue
        seen.add(name)
        ignore = (col_config or {}).get(name, {}).get("ignoreValue", None)
        _, pytype, default = parse_type(dbtype)
        columns.append((name, pytype, default if ignore is None else ignore))
    return columns


def _json_values(records: list[dict[str, Any]], name: str, pytype: Any, ignore: Any) -> list[Any]:
    """One column of ``records`` as :func:`_values` would give it from astroquery's table.

    A missing or null value becomes the column's ignore value; a value equal to the ignore
    value is masked (None); floats that are NaN are None; the rest is cast to the column type.
    """
    # None -> the ignore value -> masked, so a None is always None; one comprehension per
    # type keeps the common case (the value already has the column's type) cheap.
    raw = [record.get(name, ignore) for record in records]
    if pytype is str:
        return [
            None
            if v is None or v == ignore
            else v
            if type(v) is str and not v.endswith("\x00")
            else _cast_one(v, str)
            for v in raw
        ]
    if pytype is np.int64:
        return [
            None if v is None or v == ignore else v if type(v) is int else _cast_one(v, pytype)
            for v in raw
        ]
    if pytype is np.float64:
        cast = [
            None if v is None or v == ignore else v if type(v) is float else _cast_one(v, pytype)
            for v in raw
        ]
        return [None if v is None or v != v else v for v in cast]  # NaN -> None
    return [None if v is None or v == ignore else _cast_one(v, pytype) for v in raw]


def _kind_keep(records: list[dict[str, Any]], ignore: Any, subgroups: list[str]) -> list[int]:
    """Indexes of the records whose ``productSubGroupDescription`` is one of ``subgroups``.

    ``filter_products`` compares the column's stored strings, masked entries included (they
    hold the ignore value): the same test on the same strings.
    """
    wanted = set(subgroups)
    keep: list[int] = []
    for i, record in enumerate(records):
        value = record.get("productSubGroupDescription", ignore)
        if value is None:
            value = ignore
        text = value if type(value) is str else _cast_one(value, str)
        if text in wanted:
            keep.append(i)
    return keep


def _rows_from_json(
    results: list[dict[str, Any]],
    col_config: dict[str, Any] | None,
    subgroups: list[str],
    *,
    server: str,
    flat: bool,
    refusals: _Refusals,
    sector: int | None,
) -> list[PlannedProduct] | None:
    """Rows of the wanted kinds straight from ``get_product_list``'s JSON pages.

    The same rows as ``_json_to_table`` + ``vstack`` + ``filter_products(kind)`` +
    :func:`rows_from_table`, without building astropy tables: that conversion dominated the
    plan's CPU time, and the worker threads share one GIL. Only the wanted rows' columns are
    converted. None when the answer is unusual (pages with different fields, a
    non-string kind column): the caller then uses astroquery's table path.
    """
    columns = _json_columns(results, col_config)
    if columns is None:
        return None
    types = {name: (pytype, ignore) for name, pytype, ignore in columns}
    kind_type = types.get("productSubGroupDescription")
    if kind_type is None or kind_type[0] is not str:
        return None
    records = [rec for r in results for rec in r["data"]]
    keep = _kind_keep(records, kind_type[1], subgroups)
    if not keep:
        return []
    if len(keep) != len(records):
        records = [records[i] for i in keep]
    data = {name: _json_values(records, name, pytype, ign) for name, pytype, ign in columns}
    missing = [c for c in ("dataURI", "productFilename", "obs_collection", "obs_id")
               if c not in data]  # fmt: skip
    if missing:
        return None  # rows_from_table names the missing columns
    return _rows_from_columns(
        [name for name, _, _ in columns], data, len(records),
        server=server, flat=flat, refusals=refusals, sector=sector,
    )  # fmt: skip
