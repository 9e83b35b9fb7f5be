"""The PLAN stage: turn a selection into product rows in the job state.

A selection (sectors, targets, product kinds, observation criteria, product filters) becomes
rows of the job state through astroquery, unmodified:

1. sectors: the ones given, or every sector that exists, discovered from the archive's FFI
   observations (one per sector and camera/CCD), never assumed to be contiguous (1751 exists);
2. per sector ``Observations.query_criteria(obs_collection='TESS', dataproduct_type='timeseries',
   sequence_number=S, ...)``; a sector is small enough (~20,000 2-min targets) that no query
   nears MAST's ~500,000 row limit, and a result that does is split by right ascension;
3. ``get_product_list`` in batches of a few hundred obsids (astroquery 0.4.11 would otherwise put
   every obsid of the table into one POST body), several batches in flight on worker threads,
   each thread with its own ``ObservationsClass`` (an instance remembers the service of its last
   request, so one instance cannot serve two threads), each call retried with backoff;
4. ``filter_products`` by product kind and by the user's filters, dedupe by ``dataURI``;
5. rows into the job state one sector at a time, so memory does not grow with the number of
   sectors, and the sector marked planned ("unit") only after its rows are committed.

Idempotence: a unit is ``sector:S|<kind>|<fingerprint of the rest of the selection>``. A unit
planned before is not queried again, so the same command twice sends no query, an interrupted
plan resumes with the sectors it did not finish, and a wider selection (more sectors, another
kind) queries only what is new. Rows are keyed by ``dataURI`` in the store, so overlapping
selections never duplicate a product.

Tables (``--from-table``) and MAST's bulk curl scripts (``tesscurl_sector_N_lc.sh``) become the
same kind of rows without any query.
"""

from __future__ import annotations

import csv
import difflib
import functools
import hashlib
import heapq
import io
import json
import logging
import math
import queue
import random
import re
import shlex
import shutil
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

import numpy as np
import orjson
from astropy.table import Table

from .errors import ArchiveError, UnsafePathError, UsageError
from .layout import ETAG_SUFFIX, PART_SUFFIX, resolve_inside, safe_component
from .sources import (
    BATCH_SIZE,
    DEFAULT_MAST_URL,
    MAX_BATCH_SIZE,
    PLAN_WORKERS,
    download_url,
    normalize_server,
    point_astroquery_at,
)
from .store import DONE, ERROR, PENDING, JobStore, PlannedProduct

if TYPE_CHECKING:  # astroquery is imported lazily: it is slow to import and the CLI may not need it
    from astroquery.mast import ObservationsClass

log = logging.getLogger("bulkfetch")

T = TypeVar("T")

#: Product kinds a user names (``--products``) -> MAST ``productSubGroupDescription`` values.
PRODUCT_KINDS: dict[str, tuple[str, ...]] = {
    "lc": ("LC",),
    "tp": ("TP",),
    "fast-lc": ("FAST-LC",),
    "fast-tp": ("FAST-TP",),
    "dv": ("DVT", "DVR", "DVS", "DVM"),
    "dvt": ("DVT",),
    "dvr": ("DVR",),
    "dvs": ("DVS",),
    "dvm": ("DVM",),
}
#: Subgroups that are Data Validation products (the only ones ``latest_dv_only`` touches).
DV_SUBGROUPS = frozenset({"DVT", "DVR", "DVS", "DVM"})
DEFAULT_KINDS = ("lc",)

#: Product columns in the order astroquery's ``get_product_list`` returns them (export order).
PRODUCT_COLUMNS: tuple[str, ...] = (
    "obsID",
    "obs_collection",
    "dataproduct_type",
    "obs_id",
    "description",
    "type",
    "dataURI",
    "productType",
    "productGroupDescription",
    "productSubGroupDescription",
    "productDocumentationURL",
    "project",
    "prvversion",
    "proposal_id",
    "productFilename",
    "size",
    "parent_obsid",
    "dataRights",
    "calib_level",
    "filters",
)
#: Columns of a product table that go into dedicated fields of a row, not into ``extra``.
_CORE_COLUMNS = frozenset(
    {"dataURI", "obs_collection", "obs_id", "productFilename", "size", "productSubGroupDescription"}
)
#: Columns :func:`export_plan` adds; a re-read export recomputes them, so they are not ``extra``.
_EXPORT_ONLY_COLUMNS = ("url", "local_path", "sector", "status")

#: Observation criteria the planner sets itself; the selection's fields say them instead.
_RESERVED_CRITERIA = {
    "obs_collection": "bulkfetch plans TESS only",
    "dataproduct_type": "bulkfetch plans time series only",
    "sequence_number": "use --sectors",
    "target_name": "use --targets",
}

#: MAST truncates query results near 500,000 rows; a query returning this many is split.
MAX_QUERY_ROWS = 400_000
#: Targets per ``query_criteria`` call: keeps the request body and the server's IN list small.
TARGETS_PER_QUERY = 500
#: Observation rows that may be in flight (being fetched and parsed) at once. A query holds
#: at most one page (:data:`OBS_PAGESIZE` rows, a few MB of JSON, reduced to obsids at once),
#: so four big sectors' queries overlap and every small sector's does; peak memory stays flat
#: whatever the number or size of sectors.
OBS_ROWS_IN_FLIGHT = 20_000
#: Observations of the sectors started and not yet written, at most (their obsids and queued
#: batches stay in memory; rows are collected only for the one or two sectors whose batches
#: run, in sector order): five sectors of 20,000 targets, so that the next sectors' page-by-page
#: observation queries are answered before the threads run out of batches (with two, the
#: 20-sector plan took 71 s instead of 63 s), or as many small sectors as keep threads busy.
SECTOR_ROWS_STARTED = 100_000
#: Product rows that may be in flight (answered and being parsed) at once. A batch of 500
#: light-curve targets answers ~1,500 rows, so 16 such batches fit; a batch of multi-sector DV
#: runs answers several times more (a mission's last sector holds ~200,000 of them), and then
#: fewer batches run at once, so peak memory does not depend on what a sector holds.
PRODUCT_ROWS_IN_FLIGHT = 24_000
#: Rows per page of an observation query (MAST's default page is 50,000). Pages are fetched
#: one call each and reduced to obsids at once, so this caps the memory of a big answer, for
#: a few extra round trips per big sector.
OBS_PAGESIZE = 5000
#: Seconds a cached sector discovery stays valid (a new sector appears every ~27 days).
DISCOVERY_MAX_AGE = 24 * 3600.0
#: Per-request timeout of astroquery's HTTP calls, which have none by default (a hung server
#: would hang the plan forever).
QUERY_TIMEOUT = 600.0
#: Largest backoff between two attempts of one query, seconds.
MAX_BACKOFF = 60.0
#: How many refusal messages a summary keeps (all are counted and logged).
MAX_EXAMPLES = 20

_SECTOR_RE = re.compile(r"-s(\d{4})-")
_TIC_RE = re.compile(r"^(?:TIC)?\s*-?\s*0*(\d+)$", re.IGNORECASE)

_META_DISCOVERY = "plan.discovered_sectors"
_META_UNIT = "plan.unit."


# ------------------------------------------------------------------------------------------------
# the selection
# ------------------------------------------------------------------------------------------------


@dataclass
class Selection:
    """What to plan. ``sectors=None`` means every sector the archive has.

    ``criteria`` go to ``query_criteria`` (observation columns), ``filters`` to
    ``filter_products`` (product columns, astroquery's value syntax), both as given.
    """

    sectors: list[int] | None = None
    targets: list[str] | None = None
    kinds: list[str] = field(default_factory=lambda: list(DEFAULT_KINDS))
    criteria: dict[str, Any] = field(default_factory=dict)
    filters: dict[str, Any] = field(default_factory=dict)
    latest_dv_only: bool = False
    flat: bool = False

    def subgroups(self, kinds: Iterable[str] | None = None) -> list[str]:
        """The ``productSubGroupDescription`` values of ``kinds`` (default: all selected)."""
        out: list[str] = []
        for kind in self.kinds if kinds is None else kinds:
            for sub in PRODUCT_KINDS[kind]:
                if sub not in out:
                    out.append(sub)
        return out

    def fingerprint(self, server: str) -> str:
        """A short digest of everything but sectors and kinds: those are the units themselves.

        Two selections with the same fingerprint ask the same question of each sector, so a
        unit planned under one is planned for the other.
        """
        doc = {
            "server": normalize_server(server),
            "targets": sorted(self.targets) if self.targets is not None else None,
            "criteria": {k: _jsonable(v) for k, v in sorted(self.criteria.items())},
            "filters": {k: _jsonable(v) for k, v in sorted(self.filters.items())},
            "latest_dv_only": bool(self.latest_dv_only),
            "flat": bool(self.flat),
        }
        text = json.dumps(doc, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def validate(self) -> None:
        """Refuse what cannot be planned, before any query is sent; normalise kinds and TICs.

        Normalising here (``"LC"`` -> ``"lc"``, ``"TIC 0025155310"`` -> ``"25155310"``) makes
        two spellings of one selection share a fingerprint, hence their planned units.
        """
        if not self.kinds:
            raise UsageError("no product kinds selected; valid kinds: " + ", ".join(PRODUCT_KINDS))
        self.kinds = parse_kinds(",".join(self.kinds))
        if self.sectors is not None:
            bad = [s for s in self.sectors if type(s) is not int or s < 1]
            if bad:
                raise UsageError(f"invalid sector number(s): {bad}")
        if self.targets is not None:
            self.targets = parse_targets(self.targets)
        for name in self.criteria:
            reason = _RESERVED_CRITERIA.get(name.lower())
            if reason:
                raise UsageError(f"criterion {name!r} is set by bulkfetch: {reason}")


def unit_name(sector: int, kind: str, fingerprint: str) -> str:
    """The planning unit of one sector and one product kind under one selection fingerprint."""
    return f"sector:{sector}|{kind}|{fingerprint}"


def _jsonable(value: Any) -> Any:
    """A stable JSON form of a criterion value (tuples, numpy scalars) for fingerprints."""
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


# ------------------------------------------------------------------------------------------------
# parsing user input (the CLI calls these)
# ------------------------------------------------------------------------------------------------


def parse_sectors(spec: str) -> list[int]:
    """``"1-5,7,1751"`` -> ``[1, 2, 3, 4, 5, 7, 1751]`` (sorted, unique)."""
    out: set[int] = set()
    for part in (p.strip() for p in str(spec).split(",")):
        if not part:
            continue
        try:
            if "-" in part:
                lo_text, hi_text = part.split("-", 1)
                lo, hi = int(lo_text), int(hi_text)
                if lo > hi:
                    raise UsageError(f"sector range {part!r} runs backwards")
                out.update(range(lo, hi + 1))
            else:
                out.add(int(part))
        except ValueError:
            raise UsageError(
                f"invalid sector spec {part!r}: use numbers and ranges like 1-5,7,1751"
            ) from None
    if not out:
        raise UsageError(f"no sectors in {spec!r}: use numbers and ranges like 1-5,7,1751")
    if min(out) < 1:
        raise UsageError(f"sector numbers start at 1, got {min(out)}")
    return sorted(out)


def parse_kinds(spec: str) -> list[str]:
    """``"lc,tp"`` -> ``["lc", "tp"]``; an unknown kind is a usage error listing the valid ones."""
    kinds: list[str] = []
    for part in (p.strip().lower() for p in str(spec).split(",")):
        if not part:
            continue
        if part not in PRODUCT_KINDS:
            raise UsageError(
                f"unknown product kind {part!r}; valid kinds: {', '.join(PRODUCT_KINDS)}"
            )
        if part not in kinds:
            kinds.append(part)
    if not kinds:
        raise UsageError(f"no product kinds in {spec!r}; valid kinds: {', '.join(PRODUCT_KINDS)}")
    return kinds


def parse_targets(spec: str | Iterable[str]) -> list[str]:
    """TIC IDs as MAST's ``target_name`` spells them: ``"TIC 0025155310"`` -> ``"25155310"``.

    Accepts a comma/whitespace separated string or an iterable of strings.
    """
    items = re.split(r"[,\s]+", spec) if isinstance(spec, str) else list(spec)
    out: list[str] = []
    seen: set[str] = set()
    pending_prefix = False
    for raw in items:
        text = str(raw).strip()
        if not text:
            continue
        if text.upper() == "TIC":  # "TIC 123" split on whitespace
            pending_prefix = True
            continue
        match = _TIC_RE.match(text)
        if not match:
            raise UsageError(f"invalid TIC ID {text!r}: expected digits like 25155310")
        pending_prefix = False
        tic = match.group(1)
        if tic not in seen:
            seen.add(tic)
            out.append(tic)
    if pending_prefix:
        raise UsageError("a 'TIC' without a number in the target list")
    if not out:
        raise UsageError("the target list is empty")
    return out


def read_targets_file(path: str | Path) -> list[str]:
    """TIC IDs from a text file: one or more per line, ``#`` starts a comment."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read targets file {path}: {exc.strerror or exc}") from exc
    body = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    try:
        return parse_targets(body)
    except UsageError as exc:
        raise UsageError(f"{path}: {exc}") from None


def parse_key_values(items: Iterable[str], *, what: str = "criterion") -> dict[str, Any]:
    """``["t_exptime=100..130", "proposal_id=G1,G2"]`` -> dict for astroquery.

    ``a,b`` becomes a list (OR); for criteria ``lo..hi`` with numbers becomes ``[lo, hi]``
    (astroquery's form for a numeric range). Filters keep astroquery's string syntax (``!x``,
    ``>=n``, ``a..b``), which ``filter_products`` interprets itself.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = str(item).partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"invalid {what} {item!r}: expected KEY=VALUE")
        value = value.strip()
        parsed: Any
        if what == "criterion" and ".." in value and "," not in value:
            lo, _, hi = value.partition("..")
            try:
                parsed = [float(lo), float(hi)]
            except ValueError:
                raise UsageError(f"invalid range in {what} {item!r}: expected lo..hi") from None
        elif "," in value:
            parsed = [v.strip() for v in value.split(",") if v.strip()]
        else:
            parsed = value
        if key in out:
            raise UsageError(f"{what} {key!r} given twice; give several values as {key}=a,b")
        out[key] = parsed
    return out


# ------------------------------------------------------------------------------------------------
# talking to astroquery
# ------------------------------------------------------------------------------------------------


def _new_observations(timeout: float) -> ObservationsClass:
    """A fresh ``ObservationsClass`` whose HTTP requests time out instead of hanging forever.

    astroquery passes ``timeout=None`` to requests; a transport adapter supplies a default, which
    changes nothing else about how astroquery talks to MAST.
    """
    from astroquery.mast import ObservationsClass
    from requests.adapters import HTTPAdapter

    class _TimeoutAdapter(HTTPAdapter):
        def send(self, request: Any, **kwargs: Any) -> Any:  # type: ignore[override]
            if kwargs.get("timeout") is None:
                kwargs["timeout"] = timeout
            return super().send(request, **kwargs)

    obs = ObservationsClass()
    adapter = _TimeoutAdapter()
    obs._session.mount("http://", adapter)
    obs._session.mount("https://", adapter)
    hooks = obs._session.hooks["response"]
    # astroquery 0.4.11's _response_hook formats the request and the whole decoded response
    # body into DEBUG messages even when DEBUG is off (it tests ``level >= 10`` where it means
    # ``<=``): megabytes copied per call, a sixth of the planner's CPU. Unless astroquery's
    # logger is at DEBUG, those messages are dropped anyway, so dropping the hook changes no
    # output.
    from astroquery import log as astroquery_log

    if astroquery_log.getEffectiveLevel() > logging.DEBUG and obs._response_hook in hooks:
        hooks.remove(obs._response_hook)
    hooks.append(_remember_json)
    return obs


def _remember_json(response: Any, *args: Any, **kwargs: Any) -> None:
    """requests response hook: parse a response's JSON once, however often ``.json()`` is called.

    astroquery's long-polling loop parses every answer to read its status, then its table
    builder (or our :func:`_json_pages`) parses it again; a product page is megabytes. The
    parsed document is shared, so its readers must not modify it (none do). orjson parses
    twice as fast as the standard library, with the same Python values for standard JSON; what
    it refuses (NaN literals, integers beyond 64 bits, text that is not UTF-8) goes to requests'
    own parser, so the answer is always what astroquery alone would have seen.
    """
    # Only a weak reference back: a closure holding the response would make a reference cycle,
    # which only the cyclic garbage collector frees. Every answer (megabytes, and its parsed
    # document) then outlived its use until a rare full collection: peak RSS reached 1 GB.
    ref = weakref.ref(response)
    memo: list[Any] = []

    def json(**kwargs: Any) -> Any:
        resp = ref()
        assert resp is not None  # json() is called on the response, so it is alive
        parse = type(resp).json
        if kwargs:  # unusual arguments: parse as asked, do not remember
            return parse(resp, **kwargs)
        if not memo:
            try:
                memo.append(orjson.loads(resp.content))
            except orjson.JSONDecodeError:
                memo.append(parse(resp))
        return memo[0]

    response.json = json


def _is_transient(exc: BaseException) -> bool:
    """Whether another attempt may succeed: 5xx/408/429, connection trouble, MAST ERROR status."""
    import requests
    from astroquery.exceptions import RemoteServiceError

    if isinstance(exc, requests.HTTPError):
        status = exc.response.status_code if exc.response is not None else None
        return status is None or status >= 500 or status in (408, 429)
    return isinstance(exc, (requests.RequestException, RemoteServiceError, TimeoutError))


def _retry_after(exc: BaseException) -> float | None:
    """The Retry-After of a 429/503 answer, in seconds, if the server sent a number."""
    response = getattr(exc, "response", None)
    value = response.headers.get("Retry-After") if response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _with_retries(fn: Callable[[], T], what: str, *, retries: int, backoff: float) -> T:
    """Run ``fn``; retry transient failures with jittered exponential backoff.

    A permanent failure (astroquery's ``InvalidQueryError``: the question itself is wrong) is a
    :class:`UsageError`; transient ones that outlive ``retries`` become an :class:`ArchiveError`
    naming ``what`` failed, so the user learns which sector to look at.
    """
    from astroquery.exceptions import InvalidQueryError

    attempt = 0
    while True:
        try:
            return fn()
        except InvalidQueryError as exc:
            raise UsageError(f"{what}: {exc}") from exc
        except Exception as exc:
            if not _is_transient(exc):
                raise
            if attempt >= retries:
                raise ArchiveError(
                    f"{what} failed after {attempt + 1} attempts: {_one_line(exc)}; "
                    "rerun the same command to continue"
                ) from exc
            delay = min(MAX_BACKOFF, backoff * 2**attempt) * random.uniform(0.5, 1.5)
            hint = _retry_after(exc)
            if hint is not None:
                delay = max(delay, min(hint, MAX_BACKOFF))
            attempt += 1
            log.warning(
                "%s: %s; retry %d/%d in %.1fs", what, _one_line(exc), attempt, retries, delay
            )
            time.sleep(delay)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


class _Astroquery:
    """Per-thread ``ObservationsClass`` instances plus the retry policy, for one plan run."""

    def __init__(self, *, retries: int, backoff: float, timeout: float) -> None:
        self.retries = retries
        self.backoff = backoff
        self.timeout = timeout
        self._local = threading.local()

    @property
    def obs(self) -> ObservationsClass:
        obs = getattr(self._local, "obs", None)
        if obs is None:
            obs = self._local.obs = _new_observations(self.timeout)
        return obs

    def call(self, what: str, fn: Callable[[ObservationsClass], T]) -> T:
        return _with_retries(lambda: fn(self.obs), what, retries=self.retries, backoff=self.backoff)

    def warm_column_config(self, what: str, service: str, fetch_name: str | None = None) -> None:
        """Fetch one column config into astroquery's per-process cache, if not there yet.

        Every fresh thread would otherwise fetch the same config at its first query (the cache
        is checked before any thread has filled it): one round trip wasted per thread. This
        uses astroquery's private ``_get_col_config``; if a future astroquery lacks it, the
        threads simply fetch the configs themselves as before.
        """
        portal = self.obs._portal_api_connection
        cache = getattr(portal, "_column_configs", None)
        fetch = getattr(portal, "_get_col_config", None)
        if not isinstance(cache, dict) or fetch is None or cache.get(service):
            return
        label = f"{what}: column config {fetch_name or service}"
        self.call(label, lambda obs: fetch(service, fetch_name))

    def query_criteria(self, what: str, criteria: dict[str, Any]) -> Table:
        return self.call(what, lambda obs: obs.query_criteria(**criteria))

    def product_list(self, what: str, obsids: list[str]) -> Table:
        return self.call(what, lambda obs: obs.get_product_list(obsids))

    def product_pages(
        self, what: str, obsids: list[str]
    ) -> tuple[list[dict[str, Any]], dict[str, Any] | None, list[Any]]:
        """``get_product_list``'s request, sent by astroquery, answered as parsed JSON pages.

        The same POST (service, ``obsid`` list, paging, long polling) through astroquery's
        own ``service_request_async``; returns (JSON pages, the service's column config, the
        raw responses). A page with status ERROR raises ``RemoteServiceError`` inside the
        retry, as astroquery's ``_parse_result`` would.
        """

        def fetch(obs: ObservationsClass) -> Any:
            responses = obs.get_product_list_async(obsids)
            return (*_json_pages(obs, responses), responses)

        return self.call(what, fetch)

    def obsid_page(self, what: str, criteria: dict[str, Any]) -> tuple[int, list[str]]:
        """(rows, obsids) of one ``query_criteria`` page, read from its JSON (no table).

        ``criteria`` includes ``page`` and ``pagesize``; the request is astroquery's own
        ``query_criteria_async``. The obsids are typed and masked as in astroquery's table
        (see :func:`_json_values`); empty and masked ones are left out.
        """

        def fetch(obs: ObservationsClass) -> tuple[int, list[str]]:
            results, col_config = _json_pages(obs, obs.query_criteria_async(**criteria))
            records = [rec for r in results for rec in r["data"]]
            if not records:
                return 0, []
            columns = _json_columns(results, col_config)
            found = [c for c in columns or [] if c[0] == "obsid"]
            if not found:  # unusual answer: astroquery's own table decides
                portal = obs._portal_api_connection
                portal._current_service = portal._current_service or obs._caom_filtered
                table = portal._parse_result(obs.query_criteria_async(**criteria))
                values = _values(table["obsid"])
                return len(table), [str(v) for v in values if v not in (None, "")]
            _, pytype, ignore = found[0]
            values = _json_values(records, "obsid", pytype, ignore)
            return len(records), [str(v) for v in values if v not in (None, "")]

        return self.call(what, fetch)


def column_names(
    server: str = DEFAULT_MAST_URL, *, retries: int = 4
) -> tuple[list[str], list[str]]:
    """(observation columns, product columns) the archive knows, for ``bulkfetch columns``.

    These are the names ``--criteria`` and ``--filter`` accept (astroquery's
    ``get_metadata('observations')`` and ``get_metadata('products')``).
    """
    point_astroquery_at(server)
    return _column_metadata(_Astroquery(retries=retries, backoff=1.0, timeout=QUERY_TIMEOUT))[:2]


def _column_metadata(aq: _Astroquery) -> tuple[list[str], list[str], set[str]]:
    """Observation and product column names, and which observation columns are numeric."""
    obs_meta = aq.call("column metadata", lambda o: o.get_metadata("observations"))
    prod_meta = aq.call("column metadata", lambda o: o.get_metadata("products"))
    obs_names = [str(n) for n in obs_meta["Column Name"]]
    prod_names = [str(n) for n in prod_meta["Column Name"]]
    numeric: set[str] = set()
    if "Data Type" in obs_meta.colnames:
        numeric = {
            str(n)
            for n, t in zip(obs_meta["Column Name"], obs_meta["Data Type"], strict=True)
            if str(t) == "float"
        }
    return obs_names, prod_names, numeric


def _check_names(given: Iterable[str], valid: Sequence[str], what: str, option: str) -> None:
    """Refuse an unknown column with the closest valid names, as a one-line usage error."""
    lower = {v.lower(): v for v in valid}
    for name in given:
        if name in valid or (what == "criterion" and name.lower() in lower):
            continue
        close = difflib.get_close_matches(name, valid, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UsageError(
            f"unknown {what} column {name!r} for {option}{hint} "
            "('bulkfetch columns' lists the valid names)"
        )


def validate_columns(selection: Selection, aq: _Astroquery) -> None:
    """Check criteria and filter names (and numeric criteria shapes) against the archive."""
    if not selection.criteria and not selection.filters:
        return
    obs_names, prod_names, numeric = _column_metadata(aq)
    _check_names(selection.criteria, obs_names, "criterion", "--criteria")
    _check_names(selection.filters, prod_names, "filter", "--filter")
    numeric_lower = {n.lower() for n in numeric}
    for name, value in selection.criteria.items():
        if name.lower() in numeric_lower and not (
            isinstance(value, (list, tuple)) and len(value) == 2
        ):
            raise UsageError(
                f"criterion {name!r} is numeric: give a range as {name}=MIN..MAX (got {value!r})"
            )


# ------------------------------------------------------------------------------------------------
# sector discovery
# ------------------------------------------------------------------------------------------------


def discover_sectors(
    server: str = DEFAULT_MAST_URL, *, retries: int = 4, backoff: float = 1.0
) -> list[int]:
    """Every TESS sector the archive holds, ascending, from its FFI observations.

    Each sector has full-frame-image observations (``target_name='TESS FFI'``) whose
    ``sequence_number`` is the sector, so one small query finds them all, including sectors
    with unusual numbers; nothing is assumed about contiguity.
    """
    point_astroquery_at(server)
    aq = _Astroquery(retries=retries, backoff=backoff, timeout=QUERY_TIMEOUT)
    return _discover(aq)


def _discover(aq: _Astroquery) -> list[int]:
    table = aq.query_criteria(
        "sector discovery", {"obs_collection": "TESS", "target_name": "TESS FFI"}
    )
    if len(table) == 0 or "sequence_number" not in table.colnames:
        raise ArchiveError("sector discovery: the archive lists no TESS FFI observations")
    column = table["sequence_number"]
    values = column.compressed() if hasattr(column, "compressed") else np.asarray(column)
    sectors = sorted({int(v) for v in values if int(v) > 0})
    log.info("discovered %d sectors (%d..%d)", len(sectors), sectors[0], sectors[-1])
    return sectors


def _cached_sectors(store: JobStore | None, server: str, max_age: float) -> list[int] | None:
    """The sector list an earlier plan discovered, if it is from ``server`` and fresh enough."""
    if store is None or max_age <= 0:
        return None
    raw = store.get_meta(_META_DISCOVERY)
    if not raw:
        return None
    try:
        doc = json.loads(raw)
        if doc["server"] != server or time.time() - float(doc["at"]) > max_age:
            return None
        return [int(s) for s in doc["sectors"]]
    except (ValueError, KeyError, TypeError):
        return None


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


# ------------------------------------------------------------------------------------------------
# planning by query
# ------------------------------------------------------------------------------------------------


@dataclass
class _SectorJob:
    """One sector in flight: its observation queries, then its product-list batches."""

    sector: int
    kinds: list[str]
    order: int
    obs_left: int = 0
    obsids: list[list[str]] = field(default_factory=list)
    batch_left: int = 0
    batches: dict[int, _Batch] = field(default_factory=dict)
    rows: list[PlannedProduct] | None = None  # set once every batch answered


def _obs_criteria(selection: Selection, sector: int) -> list[dict[str, Any]]:
    """The ``query_criteria`` arguments for one sector (one dict per chunk of targets)."""
    base: dict[str, Any] = {
        "obs_collection": "TESS",
        "dataproduct_type": "timeseries",
        "sequence_number": sector,
    }
    base.update(selection.criteria)
    if selection.targets is None:
        return [base]
    targets = selection.targets
    return [
        {**base, "target_name": targets[i : i + TARGETS_PER_QUERY]}
        for i in range(0, len(targets), TARGETS_PER_QUERY)
    ]


def _query_obsids(
    aq: _Astroquery, sector: int, criteria: dict[str, Any], max_rows: int
) -> list[str]:
    """obsids of one sector query, fetched page by page; near the row limit, split by RA.

    Each page is its own ``query_criteria(page=k, pagesize=OBS_PAGESIZE)`` call whose table is
    reduced to obsids at once, so memory holds one page, not the whole answer (the last
    sector of a long mission carries ~200,000 multi-sector DV observations). A query whose
    answer reaches ``max_rows`` (MAST truncates near 500,000) is asked again in two halves
    of right ascension, recursively; boundary duplicates are dropped by the caller.
    """

    def ask(ra: tuple[float, float] | None) -> list[str]:
        crit = dict(criteria)
        if ra is not None:
            crit["s_ra"] = [ra[0], ra[1]]
        label = f"sector {sector}: query_criteria" + (f" s_ra={ra[0]:g}..{ra[1]:g}" if ra else "")
        obsids: list[str] = []
        page = 1
        while True:
            what = label if page == 1 else f"{label} page {page}"
            n, found = aq.obsid_page(what, {**crit, "page": page, "pagesize": OBS_PAGESIZE})
            obsids.extend(found)
            del found
            if len(obsids) >= max_rows:
                lo, hi = ra if ra is not None else (0.0, 360.0)
                if hi - lo <= 1e-3:
                    raise ArchiveError(f"{label}: {len(obsids)} rows even in a tiny RA slice")
                log.info("%s: %d rows or more is near the archive's limit; splitting", label, n)
                mid = (lo + hi) / 2
                return ask((lo, mid)) + ask((mid, hi))
            if n < OBS_PAGESIZE:
                return obsids
            page += 1

    return ask(None)


@dataclass
class _Batch:
    """What one product-list batch yields: rows ready for the store, and refusals."""

    rows: list[PlannedProduct]
    refusals: _Refusals
    received: int = 0  # product rows in the archive's answer, wanted or not


def _product_batch(
    aq: _Astroquery,
    what: str,
    obsids: list[str],
    selection: Selection,
    subgroups: list[str],
    *,
    sector: int,
    server: str,
) -> _Batch:
    """``get_product_list`` for one batch, filtered and turned into rows in the worker.

    Doing the filtering and the conversion here, not in the thread that writes the store,
    keeps only wanted rows alive and spreads the per-row work over the pool.
    """
    refusals = _Refusals()
    if not selection.filters:
        results, col_config, responses = aq.product_pages(what, obsids)
        rows = _rows_from_json(
            results, col_config, subgroups,
            server=server, flat=selection.flat, refusals=refusals, sector=sector,
        )  # fmt: skip
        if rows is not None:
            return _Batch(rows, refusals, sum(len(r["data"]) for r in results))
        refusals = _Refusals()
        obs = aq.obs
        portal = obs._portal_api_connection
        portal._current_service = obs._caom_products  # _json_pages cleared it
        products = portal._parse_result(responses)
    else:
        products = aq.product_list(what, obsids)
        obs = aq.obs
    received = len(products)
    if received == 0:
        return _Batch([], refusals)
    try:
        products = obs.filter_products(products, productSubGroupDescription=subgroups)
        if selection.filters:
            products = obs.filter_products(products, **selection.filters)
    except Exception as exc:
        from astroquery.exceptions import InvalidQueryError

        if isinstance(exc, InvalidQueryError):
            raise UsageError(f"{what}: {exc}") from exc
        raise
    rows = rows_from_table(
        products, server=server, flat=selection.flat, refusals=refusals, sector=sector
    )
    return _Batch(rows, refusals, received)


def plan(
    store: JobStore | None,
    root: str | Path,
    selection: Selection,
    *,
    server: str = DEFAULT_MAST_URL,
    workers: int = PLAN_WORKERS,
    batch_size: int = BATCH_SIZE,
    retries: int = 4,
    backoff: float = 1.0,
    progress: bool = False,
    dry_run: bool = False,
    max_rows: int = MAX_QUERY_ROWS,
    discovery_max_age: float = DISCOVERY_MAX_AGE,
    query_timeout: float = QUERY_TIMEOUT,
) -> PlanSummary:
    """Plan ``selection`` into ``store``; return what the selection holds.

    Sectors already planned under the same selection are not queried again. A query that still
    fails after ``retries`` raises :class:`ArchiveError` naming the sector; every sector finished
    before stays planned, so rerunning continues. ``dry_run`` (or ``store=None``) queries and
    counts but writes nothing. ``workers`` threads run queries concurrently; ``batch_size``
    obsids go into one ``get_product_list`` call.
    """
    started = time.monotonic()
    selection.validate()
    if workers < 1:
        raise UsageError("workers must be at least 1")
    if not 1 <= batch_size <= MAX_BATCH_SIZE:
        raise UsageError(f"batch size must be between 1 and {MAX_BATCH_SIZE}")
    dry_run = dry_run or store is None
    server = normalize_server(server)
    fp = selection.fingerprint(server)
    summary = PlanSummary(root=str(root), dry_run=dry_run, new_files=None if dry_run else 0)
    aq = _Astroquery(retries=retries, backoff=backoff, timeout=query_timeout)
    pointed = False

    def point() -> None:
        nonlocal pointed
        if not pointed:
            point_astroquery_at(server)
            pointed = True

    with warnings.catch_warnings():
        # astroquery warns on empty results; an empty sector is normal, the summary says so.
        from astroquery.exceptions import NoResultsWarning

        warnings.simplefilter("ignore", NoResultsWarning)

        sectors = selection.sectors
        if sectors is None:
            sectors = _cached_sectors(store, server, discovery_max_age)
            if sectors is None:
                point()
                sectors = _discover(aq)
                if store is not None and not dry_run:
                    doc = {"server": server, "at": time.time(), "sectors": sectors}
                    store.set_meta(_META_DISCOVERY, json.dumps(doc))
            else:
                log.info("using the %d sectors discovered earlier", len(sectors))

        # latest_dv_only needs newer runs first (see LatestDV); otherwise ascending order.
        ordered = sorted(set(sectors), reverse=selection.latest_dv_only)
        todo: list[tuple[int, list[str]]] = []
        for sector in ordered:
            need = []
            for kind in selection.kinds:
                unit = unit_name(sector, kind, fp)
                if store is not None and store.is_unit_planned(unit):
                    files, nbytes = _unit_totals(store, unit)
                    summary.add(sector, files, nbytes)
                else:
                    need.append(kind)
            if need:
                todo.append((sector, need))
            else:
                summary.skipped_sectors.append(sector)

        extra_needed = 0
        if todo:
            point()
            validate_columns(selection, aq)
            extra_needed = _run_sectors(
                store, selection, todo, fp, aq, summary,
                server=server, workers=workers, batch_size=batch_size,
                progress=progress, dry_run=dry_run, max_rows=max_rows,
            )  # fmt: skip
        else:
            log.info("every selected sector is planned already; nothing to query")
        if selection.latest_dv_only and store is not None and not dry_run:
            removed, kept = prune_superseded_dv(store, root)
            summary.superseded_removed, summary.superseded_kept = removed, kept

    summary.queried_sectors.sort()  # sectors complete in any order; report them sorted
    _finish_summary(summary, store, extra_needed)
    summary.elapsed = time.monotonic() - started
    return summary


def _unit_totals(store: JobStore, unit: str) -> tuple[int, int]:
    """(files, bytes) a planned unit produced, as recorded when it was planned."""
    raw = store.get_meta(_META_UNIT + unit)
    if raw:
        try:
            doc = json.loads(raw)
            return int(doc["files"]), int(doc["bytes"])
        except (ValueError, KeyError, TypeError):
            pass
    return 0, 0


def _glibc() -> Any:
    """The C library when it is glibc (its malloc tuning calls exist), else None."""
    global _libc
    if _libc is None:
        try:
            import ctypes

            lib = ctypes.CDLL("libc.so.6")
            _libc = lib if hasattr(lib, "malloc_trim") and hasattr(lib, "mallopt") else False
        except OSError:
            _libc = False
    return _libc or None


_libc: Any = None
#: glibc's mallopt parameter: allocations of at least this many bytes get their own mapping.
_M_MMAP_THRESHOLD = -3


def _tame_malloc() -> None:
    """Keep big allocations out of glibc's heaps, so freed answers return to the OS at once.

    A product answer is a megabyte of bytes plus its parsed lists; glibc raises its mmap
    threshold after the first such block is freed, so later ones land in the per-thread
    arenas, where freed space fragments. A fixed 256 KiB threshold (which also stops the
    raising) keeps every big block in a mapping of its own: planning 40 full-size sectors
    peaked at 247 MiB with it, 343 MiB without. glibc only; a no-op elsewhere.
    """
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, 256 * 1024)


def _release_memory() -> None:
    """Hand freed heap memory back to the OS (glibc only; elsewhere a no-op).

    Worker threads parse answers in their own malloc arenas; freed, that memory stays in the
    arenas, so RSS would creep up sector after sector although Python holds no more objects.
    ``malloc_trim`` returns it after every sector written.
    """
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


class _DaemonPool:
    """Worker threads running submitted calls into Futures; abandoned, not joined, at exit.

    Deliberately not ``concurrent.futures.ThreadPoolExecutor``: the interpreter joins its
    threads at exit, so Ctrl-C during a plan would wait for every query in flight (minutes
    against a slow archive, up to the query timeout). These threads only run astroquery calls
    and build rows; the job state is written by the scheduling thread alone, so a thread
    killed mid-query at exit loses nothing that was committed.
    """

    def __init__(self, workers: int, name: str) -> None:
        self._tasks: queue.SimpleQueue[tuple[Future[Any], Callable[[], Any]] | None] = (
            queue.SimpleQueue()
        )
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}_{i}", daemon=True)
            for i in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    def _work(self) -> None:
        while (task := self._tasks.get()) is not None:
            future, fn = task
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn()
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
                future.set_exception(exc)
            else:
                future.set_result(result)

    def submit(self, fn: Callable[[], T]) -> Future[T]:
        future: Future[T] = Future()
        self._tasks.put((future, fn))
        return future

    def shutdown(self, *, wait: bool = True) -> None:
        """Cancel what has not started; stop the threads once their current call returns."""
        while True:
            try:
                task = self._tasks.get_nowait()
            except queue.Empty:
                break
            if task is not None:
                task[0].cancel()
        for _ in self._threads:
            self._tasks.put(None)
        if wait:
            for thread in self._threads:
                thread.join()


def _obs_limit(sector_rows: int, workers: int) -> int:
    """Observation queries allowed in flight when a sector answers ``sector_rows`` rows.

    A query holds one page at a time, so a sector bigger than a page costs one page.
    """
    per_query = max(1, min(sector_rows, OBS_PAGESIZE))
    return max(1, min(workers, OBS_ROWS_IN_FLIGHT // per_query))


def _batch_limit(answer_rows: float, workers: int) -> int:
    """Product batches allowed in flight when answers hold ``answer_rows`` rows on average."""
    return max(1, min(workers, int(PRODUCT_ROWS_IN_FLIGHT // max(1.0, answer_rows))))


def _window(sector_rows: int, workers: int) -> int:
    """Sectors that may be started and unwritten at once when one holds ``sector_rows``."""
    return max(2, min(2 * workers, SECTOR_ROWS_STARTED // max(1, sector_rows)))


def _run_sectors(
    store: JobStore | None,
    selection: Selection,
    todo: list[tuple[int, list[str]]],
    fp: str,
    aq: _Astroquery,
    summary: PlanSummary,
    *,
    server: str,
    workers: int,
    batch_size: int,
    progress: bool,
    dry_run: bool,
    max_rows: int,
) -> int:
    """Query the sectors of ``todo`` on ``workers`` threads; commit each sector when complete.

    The main thread schedules: up to ``workers`` queries are in flight, and a free thread
    takes the observation query of the next sector if the cap on observation pages in flight
    allows (see :data:`OBS_ROWS_IN_FLIGHT`), else a product batch of the earliest sector. Each
    observation answer unlocks a sector's batches, so asking them first keeps every thread busy
    and leaves no sector's two round trips (observations, then products) for the very end;
    batches in sector order finish one sector (and write its rows) before the next. Sectors
    started and unwritten hold at most about :data:`SECTOR_ROWS_STARTED` observations (and never
    more than ``2 * workers`` sectors), which bounds memory whatever the number of sectors.
    With ``latest_dv_only`` sectors are committed strictly in ``todo`` order (newest first,
    see :class:`LatestDV`); otherwise each as soon as it is complete.
    Returns the bytes of the products planned (for a dry run's space estimate).
    """
    from tqdm import tqdm

    _tame_malloc()
    ordered = selection.latest_dv_only
    # Sectors started, and observation queries in flight: few, as if sectors were big, until
    # the first answer shows how big they are (see SECTOR_ROWS_STARTED, OBS_ROWS_IN_FLIGHT).
    window = _window(SECTOR_ROWS_STARTED // 4, workers)
    obs_limit, obs_inflight = _obs_limit(OBS_PAGESIZE, workers), 0
    # Product batches in flight: as many as PRODUCT_ROWS_IN_FLIGHT allows for answers the
    # size of recent ones (a running average, first guessed at three products per obsid).
    answer_rows = 3.0 * batch_size
    batch_limit, batch_inflight = workers, 0
    pending = list(reversed(todo))
    # Tasks waiting for a thread, one heap per stage, each in sector order.
    Task = tuple[tuple[int, int], int, Callable[[], Any], _SectorJob, str, int]
    ready: dict[str, list[Task]] = {"obs": [], "batch": []}
    seq = 0
    inflight: dict[Future[Any], tuple[_SectorJob, str, int]] = {}
    jobs: dict[int, _SectorJob] = {}  # by order, until committed
    next_commit = 0
    refusals = _Refusals()
    latest = LatestDV() if selection.latest_dv_only else None
    if latest is not None and store is not None:
        dv_kinds = {k for k in selection.kinds if set(PRODUCT_KINDS[k]) & DV_SUBGROUPS}
        if dv_kinds:  # runs planned by an earlier, interrupted plan still count
            stored = store.iter_records(kinds=DV_SUBGROUPS)
            latest.seed((r.kind, r.product_filename) for r in stored)
    planned_bytes = 0
    bar = tqdm(total=len(todo), unit="sector", desc="plan", disable=not progress, leave=True)
    pool = _DaemonPool(workers, "bulkfetch-plan")

    def push(fn: Callable[[], Any], job: _SectorJob, stage: str, index: int) -> None:
        nonlocal seq
        heapq.heappush(ready[stage], ((job.order, index), seq, fn, job, stage, index))
        seq += 1

    def next_task() -> Task | None:
        """Observation queries first (each unlocks a sector's batches), within their cap."""
        if ready["obs"] and obs_inflight < obs_limit:
            return heapq.heappop(ready["obs"])
        if ready["batch"] and batch_inflight < batch_limit:
            return heapq.heappop(ready["batch"])
        return None

    def start_next() -> None:
        sector, kinds = pending.pop()
        job = _SectorJob(sector=sector, kinds=kinds, order=len(todo) - len(pending) - 1)
        jobs[job.order] = job
        for i, crit in enumerate(_obs_criteria(selection, sector)):
            job.obs_left += 1
            job.obsids.append([])
            push(functools.partial(_query_obsids, aq, sector, crit, max_rows), job, "obs", i)

    def obs_done(job: _SectorJob) -> None:
        """All observation queries of ``job`` answered: queue its product batches."""
        obsids: list[str] = []
        seen: set[str] = set()
        for part in job.obsids:
            for obsid in part:
                if obsid not in seen:
                    seen.add(obsid)
                    obsids.append(obsid)
        job.obsids = []
        subgroups = selection.subgroups(job.kinds)
        nb = math.ceil(len(obsids) / batch_size)
        size = math.ceil(len(obsids) / nb) if nb else 0  # even batches: no tiny last one
        for b in range(nb):
            chunk = obsids[b * size : (b + 1) * size]
            what = f"sector {job.sector}: get_product_list batch {b + 1}/{nb}"
            job.batch_left += 1
            push(
                functools.partial(
                    _product_batch, aq, what, chunk, selection, subgroups,
                    sector=job.sector, server=server,
                ),
                job, "batch", b,
            )  # fmt: skip
        if nb == 0:
            job.rows = []

    def batches_done(job: _SectorJob) -> None:
        """Every batch of ``job`` answered: its rows, deduped (first wins)."""
        rows: list[PlannedProduct] = []
        seen: set[str] = set()
        paths: dict[str, str] = {}
        for b in sorted(job.batches):
            batch = job.batches[b]
            refusals.merge(batch.refusals)
            for row in batch.rows:
                if row.uri in seen:
                    continue
                seen.add(row.uri)
                other = paths.setdefault(row.local_path, row.uri)
                if other != row.uri:
                    refusals.add(f"{row.uri}: would be saved as {row.local_path} like {other}")
                    continue
                rows.append(row)
        job.batches = {}
        job.rows = rows

    def commit(job: _SectorJob) -> None:
        """Write the sector's rows, then mark its units planned."""
        nonlocal planned_bytes
        rows = job.rows or []
        job.rows = None
        if latest is not None:
            rows = latest.filter(rows)
        per_kind: dict[str, tuple[int, int]] = {k: (0, 0) for k in job.kinds}
        kind_of = {sub: k for k in job.kinds for sub in PRODUCT_KINDS[k]}
        for row in rows:
            kind = kind_of.get(row.kind)
            if kind is not None:
                f, b = per_kind[kind]
                per_kind[kind] = (f + 1, b + (row.size or 0))
            if row.size is None:
                summary.unknown_sizes += 1
        nbytes = sum(b for _, b in per_kind.values())
        planned_bytes += nbytes
        summary.add(job.sector, len(rows), nbytes)
        summary.queried_sectors.append(job.sector)
        if not dry_run and store is not None:
            added = store.add_products(rows)
            assert summary.new_files is not None
            summary.new_files += added
            for kind, (f, b) in per_kind.items():
                unit = unit_name(job.sector, kind, fp)
                store.set_meta(_META_UNIT + unit, json.dumps({"files": f, "bytes": b}))
                store.mark_unit_planned(unit, f)
            log.info("sector %d: %d products planned (%d new)", job.sector, len(rows), added)
        del rows
        _release_memory()
        bar.update(1)
        bar.set_postfix(files=f"{summary.files:,}")

    try:
        # query_criteria and get_product_list each need a column config first: fetch both
        # now, in parallel, not once per thread (see _Astroquery.warm_column_config).
        # Only the observation queries wait for theirs; the product config arrives while
        # the first observation query is answered, before any product batch is sent.
        first = f"sector {todo[0][0]}"
        obs_warm = pool.submit(
            functools.partial(aq.warm_column_config, first, "Mast.Caom.Filtered", "Mast.Caom.Cone")
        )
        product_warm: Future[None] | None = pool.submit(
            functools.partial(aq.warm_column_config, first, "Mast.Caom.Products")
        )
        obs_warm.result()
        while pending or jobs:
            while pending and len(jobs) < window:
                start_next()
            while len(inflight) < workers and (task := next_task()) is not None:
                _, _, fn, job, stage, index = task
                if stage == "batch" and product_warm is not None:
                    product_warm.result()
                    product_warm = None
                inflight[pool.submit(fn)] = (job, stage, index)
                obs_inflight += stage == "obs"
                batch_inflight += stage == "batch"
            if not inflight:  # pragma: no cover - would be a scheduling bug
                raise RuntimeError(f"planner lost track of sectors {sorted(jobs)}")
            done, _ = wait(list(inflight), return_when=FIRST_COMPLETED)
            for fut in done:
                job, stage, index = inflight.pop(fut)
                result = fut.result()  # a worker's error surfaces here, naming its sector
                if stage == "obs":
                    obs_inflight -= 1
                    # the next sectors are probably as big as this one
                    obs_limit = _obs_limit(len(result), workers)
                    window = _window(len(result), workers)
                    job.obsids[index] = result
                    job.obs_left -= 1
                    if job.obs_left == 0:
                        obs_done(job)
                else:
                    batch_inflight -= 1
                    answer_rows = 0.8 * answer_rows + 0.2 * result.received
                    batch_limit = _batch_limit(answer_rows, workers)
                    job.batches[index] = result
                    job.batch_left -= 1
                    if job.batch_left == 0:
                        batches_done(job)
            if ordered:
                while next_commit in jobs and jobs[next_commit].rows is not None:
                    commit(jobs.pop(next_commit))
                    next_commit += 1
            else:
                for order in [o for o, j in jobs.items() if j.rows is not None]:
                    commit(jobs.pop(order))
    except BaseException:
        pool.shutdown(wait=False)  # an interrupt must not wait for queries in flight
        raise
    finally:
        bar.close()
        room = max(0, MAX_EXAMPLES - len(summary.refused_examples))
        summary.refused += refusals.count
        summary.refused_examples.extend(refusals.examples[:room])
    pool.shutdown(wait=True)
    return planned_bytes if dry_run else 0


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
