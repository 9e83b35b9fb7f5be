"""The simulated archive's query API: MAST's ``/api/v0/invoke`` and ``columnsconfig`` endpoints.

Unmodified astroquery 0.4.11 talks to these routes exactly as it talks to MAST: a form body
``request=<url-encoded JSON>`` (or ``colConfigId=...``), JSON answers with ``status``, ``fields``,
``data`` and ``paging``. The answers come from :class:`~bulkfetch.testing.catalog.Catalog`; this
module adds what is about HTTP rather than data:

* ``query_latency`` seconds before every answer (invoke and columnsconfig);
* ``query_fail_rate``: a seeded fraction of invoke calls fail with HTTP 500 or 503 (503 with
  ``Retry-After``). The draw is per call, so a retry of the same query can succeed; astroquery
  itself surfaces these as ``requests.HTTPError`` (it does not retry);
* ``config.extra["query_executing_polls"]``: answer each distinct request body with status
  ``EXECUTING`` that many times before the real answer, as MAST does for slow queries
  (astroquery re-posts the identical body until it is no longer EXECUTING);
* malformed requests get status ``ERROR`` with a message (astroquery: ``RemoteServiceError``).

Building a 50,000-row page takes a fraction of a second of pure Python, so it runs in a
dedicated one-thread pool: the event loop keeps serving downloads meanwhile, and a burst of
concurrent queries queues there instead of occupying the loop's default pool, which the
download server uses to generate bodies.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import parse_qs

from aiohttp import web

from .catalog import Catalog, error_answer
from .config import SimConfig

log = logging.getLogger("bulkfetch.testing")

INVOKE_PATH = "/api/v0/invoke"
COLUMNS_CONFIG_PATH = "/portal/Mashup/Mashup.asmx/columnsconfig"
#: Key of ``config.extra``: EXECUTING answers per distinct request before the real one.
EXECUTING_KNOB = "query_executing_polls"
#: Distinct request bodies remembered for the EXECUTING countdown (bounded memory).
_EXECUTING_MEMORY = 4096


@dataclass
class QueryStats:
    """What the query API did, for tests: calls, injected failures, EXECUTING and ERROR answers."""

    invoke_calls: int = 0
    columnsconfig_calls: int = 0
    failures: int = 0
    executing: int = 0
    errors: int = 0
    rows: int = 0
    seconds: float = 0.0  # time spent building answers (in the thread pool)


#: Where :func:`add_query_routes` puts its :class:`QueryStats` on the application.
QUERY_STATS: web.AppKey[QueryStats] = web.AppKey("bulkfetch_query_stats", QueryStats)


def _mix(x: int) -> int:
    """splitmix64 finaliser (same idea as the catalog's): cheap seeded per-call randomness."""
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


class _QueryAPI:
    """Request handlers bound to one catalog and one (mutable, shared) SimConfig."""

    def __init__(self, catalog: Catalog, config: SimConfig, stats: QueryStats) -> None:
        self.catalog = catalog
        self.config = config
        self.stats = stats
        self._calls = 0
        self._polls: OrderedDict[bytes, int] = OrderedDict()
        # One worker: answers are CPU-bound Python (threads would only fight over the GIL).
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sim-query")
        # The catalog's caches are plain dicts; guard them also against direct callers.
        self._lock = threading.Lock()

    async def close(self, app: web.Application) -> None:
        """on_cleanup hook: stop the worker thread with the server."""
        self.executor.shutdown(wait=False, cancel_futures=True)

    # -- helpers ---------------------------------------------------------------------------

    async def _delay(self) -> None:
        latency = self.config.query_latency
        if latency > 0:
            await asyncio.sleep(latency)

    def _draw_failure(self) -> int | None:
        """Seeded per-call fault: HTTP 500 or 503 with probability ``query_fail_rate``."""
        self._calls += 1
        rate = self.config.query_fail_rate
        if rate <= 0:
            return None
        h = _mix(_mix(self.config.seed ^ 0x51ED) ^ self._calls)
        if (h >> 11) / 9007199254740992.0 >= rate:
            return None
        return 503 if h & 1 else 500

    def _executing(self, body: bytes) -> bool:
        """True while this exact body still owes EXECUTING answers (the knob in config.extra)."""
        polls = int(self.config.extra.get(EXECUTING_KNOB, 0))
        if polls <= 0:
            return False
        key = hashlib.sha1(body).digest()
        seen = self._polls.get(key, 0)
        if seen >= polls:
            self._polls.pop(key, None)
            return False
        self._polls[key] = seen + 1
        self._polls.move_to_end(key)
        while len(self._polls) > _EXECUTING_MEMORY:
            self._polls.popitem(last=False)
        return True

    def _answer(self, body: bytes) -> tuple[bytes, int, bool]:
        """Decode ``request=...`` and answer it; returns (JSON bytes, rows, was_error)."""
        try:
            form = parse_qs(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
            raw = form.get("request")
            if not raw:
                raise ValueError("missing request= parameter")
            request = json.loads(raw[0])
        except (UnicodeDecodeError, ValueError) as exc:
            return json.dumps(error_answer(f"Malformed request: {exc}")).encode(), 0, True
        with self._lock:
            answer = self.catalog.invoke_json(request)
        # Cheap peek instead of re-parsing megabytes: the answer starts with its status.
        if answer.startswith(b'{"status": "ERROR"'):
            return answer, 0, True
        rows = _rows_in(answer)
        log.debug("invoke %s: %d rows", request.get("service"), rows)
        return answer, rows, False

    # -- handlers --------------------------------------------------------------------------

    async def invoke(self, request: web.Request) -> web.StreamResponse:
        """POST /api/v0/invoke: MAST's Mashup request endpoint."""
        self.stats.invoke_calls += 1
        await self._delay()
        status = self._draw_failure()
        if status is not None:
            self.stats.failures += 1
            await request.read()  # drain the body so keep-alive connections stay usable
            if status == 503:
                headers = {"Retry-After": f"{max(0, round(self.config.retry_after))}"}
                return web.Response(status=503, text="Service Unavailable", headers=headers)
            return web.Response(status=500, text="Internal Server Error")
        body = await request.read()
        if self._executing(body):
            self.stats.executing += 1
            answer = {"status": "EXECUTING", "msg": "", "fields": [], "data": []}
            return web.json_response(answer)
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        payload, rows, failed = await loop.run_in_executor(self.executor, self._answer, body)
        self.stats.seconds += time.perf_counter() - started
        self.stats.rows += rows
        if failed:
            self.stats.errors += 1
        return web.Response(body=payload, content_type="application/json")

    async def columnsconfig(self, request: web.Request) -> web.StreamResponse:
        """POST columnsconfig: per-column metadata; ``{}`` for an unknown id, as MAST does."""
        self.stats.columnsconfig_calls += 1
        await self._delay()
        body = await request.read()
        form = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
        ident = (form.get("colConfigId") or [""])[0]
        return web.json_response(self.catalog.column_config(ident))


def _rows_in(answer: bytes) -> int:
    """Rows of a page, read from the trailing ``paging`` object (no full JSON parse)."""
    at = answer.rfind(b'"paging":')
    if at < 0:
        return 0
    try:
        return int(json.loads(answer[at + 9 : -1]).get("rows", 0))
    except (ValueError, AttributeError):
        return 0


def add_query_routes(app: web.Application, catalog: Catalog, config: SimConfig) -> None:
    """Registers POST /api/v0/invoke and POST /portal/Mashup/Mashup.asmx/columnsconfig.

    Also stores a :class:`QueryStats` under ``app[QUERY_STATS]``. ``config`` is read on every
    request, so changing ``query_latency`` / ``query_fail_rate`` on a running server works.
    """
    stats = QueryStats()
    app[QUERY_STATS] = stats
    api = _QueryAPI(catalog, config, stats)
    app.router.add_post(INVOKE_PATH, api.invoke)
    app.router.add_post(COLUMNS_CONFIG_PATH, api.columnsconfig)
    app.on_cleanup.append(api.close)
