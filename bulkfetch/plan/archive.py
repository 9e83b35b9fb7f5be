"""Talking to MAST through astroquery, unmodified: one ``ObservationsClass`` per thread (an
instance remembers the service of its last request), retries with backoff, column names for
``--criteria``/``--filter``, and sector discovery."""

from __future__ import annotations

import difflib
import json
import logging
import random
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import orjson
from astropy.table import Table

from ..errors import ArchiveError, UsageError
from ..sources import (
    DEFAULT_MAST_URL,
    point_astroquery_at,
)
from ..store import JobStore

if TYPE_CHECKING:  # astroquery is imported lazily: it is slow to import and the CLI may not need it
    from astroquery.mast import ObservationsClass

from .rows import _json_columns, _json_pages, _json_values, _values
from .selection import Selection

log = logging.getLogger("bulkfetch")

T = TypeVar("T")

#: Seconds a cached sector discovery stays valid (a new sector appears every ~27 days).
DISCOVERY_MAX_AGE = 24 * 3600.0

#: Per-request timeout of astroquery's HTTP calls, which have none by default (a hung server
#: would hang the plan forever).
QUERY_TIMEOUT = 600.0

#: Largest backoff between two attempts of one query, seconds.
MAX_BACKOFF = 60.0

_META_DISCOVERY = "plan.discovered_sectors"


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
