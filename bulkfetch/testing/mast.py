"""The simulated MAST archive's HTTP server: downloads, realism knobs, faults and introspection.

A real aiohttp server on 127.0.0.1 that unmodified astroquery 0.4.11 and the bulkfetch engine
both talk to. The query API (``/api/v0/invoke``, ``columnsconfig``) comes from
:mod:`bulkfetch.testing.query_api`; this module owns the download endpoint
``/api/v0.1/Download/file`` (and its ``/file/`` form used by MAST's curl scripts), everything
that makes it behave like a real, imperfect archive (latency, bandwidth, a connection cap,
seeded faults that vary across attempts) and the ``/_sim/`` endpoints a test uses to check
what the client really did (bytes served, statuses, peak concurrency, the true SHA-256).

Faults are decided from ``hash(seed, uri, method, attempt number for that uri)``: a replayed
run sees the same faults, and a retry of a uri draws again, so retries can succeed. Only
``missing_rate`` depends on ``(seed, uri)`` alone: those uris are gone on every attempt.

:class:`MastSimulator` runs the app in a background thread with its own event loop so that
synchronous code (astroquery) and async code (the fetch engine) can use it alike;
``python -m bulkfetch.testing.mast`` serves it from the command line.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import json
import logging
import signal
import socket
import struct
import sys
import threading
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Future
from typing import Any, Protocol

from aiohttp import web

from .config import SimConfig

log = logging.getLogger("bulkfetch.testing")

#: Both spellings MAST accepts: astroquery uses the first, MAST's curl scripts the second.
DOWNLOAD_PATHS = ("/api/v0.1/Download/file", "/api/v0.1/Download/file/")
#: Paths of the query API, counted as ``query_requests`` in the stats.
QUERY_PATHS = ("/api/v0/invoke", "/portal/Mashup/Mashup.asmx/columnsconfig")

#: Largest single write of a body. Big writes keep the server far above any client's speed on
#: loopback; pacing uses smaller pieces (see :func:`_chunk_size`).
WRITE_CHUNK = 1 << 20
#: Default byte budget of the body cache: bodies are generated once and then served from memory.
DEFAULT_BODY_CACHE_BYTES = 256 * 1024 * 1024

#: SimConfig fields that shape the catalog; changing them on a running server would make the
#: catalog, the bodies and the truth disagree, so :meth:`MastSimulator.set` refuses them.
CATALOG_FIELDS = frozenset(
    {"seed", "sectors", "n_sectors", "targets_per_sector", "scale", "fast_fraction", "dv_fraction"}
)

#: Faults in the order a single uniform draw walks through them (each is exclusive).
STATUS_FAULTS = (("fail_500", 500), ("fail_503", 503), ("fail_429", 429))
BODY_FAULTS = ("reset_rate", "truncate_rate", "corrupt_rate", "stall_rate", "html_rate")

_CONTENT_TYPES = {
    ".fits": "application/fits",
    ".fit": "application/fits",
    ".fz": "application/fits",
    ".pdf": "application/pdf",
    ".xml": "text/xml",
    ".txt": "text/plain",
}

_HTML_ERROR_PAGE = (
    '<!DOCTYPE html>\n<html lang="en">\n<head><meta charset="utf-8">'
    "<title>MAST: Service Temporarily Unavailable</title></head>\n<body>\n"
    "<h1>Service Temporarily Unavailable</h1>\n"
    "<p>The Mikulski Archive for Space Telescopes is experiencing high load. "
    "Your request for <code>{uri}</code> could not be completed. Please try again later.</p>\n"
    "</body>\n</html>\n"
)


class ProductLike(Protocol):
    """What the server needs to know about a product (``catalog.ProductInfo`` satisfies it)."""

    uri: str
    filename: str
    size: int


class CatalogLike(Protocol):
    """The catalog interface the server uses: an O(1) uri -> product lookup."""

    def product(self, uri: str) -> Any: ...


class BodySource(Protocol):
    """Where product bodies come from (``fitsgen.BodyCache`` satisfies it); must be thread-safe."""

    def get(self, info: Any, seed: int) -> bytes: ...


# -------------------------------------------------------------------------------------------------
# deterministic draws


def unit_draw(seed: int, *parts: object) -> float:
    """A uniform number in [0, 1) that depends only on ``seed`` and ``parts``.

    A keyed hash instead of a shared ``random.Random``: concurrent requests arrive in any order,
    and the decision for one (uri, attempt) must not depend on what else was in flight.
    """
    text = "\x1f".join([str(seed), *(str(p) for p in parts)]).encode()
    digest = hashlib.blake2b(text, digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def is_missing(config: SimConfig, uri: str) -> bool:
    """Whether ``uri`` belongs to the fixed subset that is permanently missing (404)."""
    return config.missing_rate > 0 and unit_draw(config.seed, "missing", uri) < config.missing_rate


def choose_fault(config: SimConfig, uri: str, method: str, attempt: int) -> str | None:
    """The fault (a SimConfig rate name) for this attempt of ``method uri``, or None.

    One uniform draw is walked through the cumulative rates, so the kinds are exclusive and each
    occurs with its own probability (as long as the rates sum to at most 1). HEAD only draws from
    the status faults: it has no body to break.
    """
    u = unit_draw(config.seed, "fault", method, uri, attempt)
    names = [name for name, _ in STATUS_FAULTS]
    if method == "GET":
        names += list(BODY_FAULTS)
    cumulative = 0.0
    for name in names:
        rate = float(getattr(config, name))
        if rate <= 0:
            continue
        cumulative += rate
        if u < cumulative:
            return name
    return None


def etag_for(config: SimConfig, uri: str, size: int) -> str:
    """A strong ETag that is stable for a uri in a given archive (seed) and size."""
    digest = hashlib.blake2b(f"{config.seed}\x1f{uri}\x1f{size}".encode(), digest_size=12)
    return f'"{digest.hexdigest()}"'


def content_type_for(filename: str) -> str:
    """The Content-Type MAST would send for ``filename``."""
    lower = filename.lower()
    for suffix, ctype in _CONTENT_TYPES.items():
        if lower.endswith(suffix):
            return ctype
    return "application/octet-stream"


def format_retry_after(seconds: float) -> str:
    """Retry-After value: whole seconds when integral, else a decimal.

    A decimal is not RFC 9110 delay-seconds, but tests need sub-second waits; clients should
    parse it as a float (and the default, 1.0, is sent as plain ``1``).
    """
    if float(seconds).is_integer():
        return str(int(seconds))
    return f"{seconds:g}"


def parse_range(header: str, size: int) -> tuple[int, int] | None | str:
    """Parse a single-range ``Range`` header against a body of ``size`` bytes.

    Returns ``(start, end_inclusive)``, ``None`` when the header must be ignored (malformed,
    other unit, several ranges: RFC 9110 lets a server answer those with the whole body) or the
    string ``"unsatisfiable"`` for a well-formed range that lies outside the body (416).
    """
    text = header.strip()
    if not text.lower().startswith("bytes="):
        return None
    spec = text[6:].strip()
    if "," in spec or "-" not in spec:
        return None
    first, _, last = spec.partition("-")
    first, last = first.strip(), last.strip()
    try:
        if first == "":
            if not last.isdigit():
                return None
            suffix = int(last)
            if suffix == 0 or size == 0:
                return "unsatisfiable"
            return max(0, size - suffix), size - 1
        if not first.isdigit() or (last and not last.isdigit()):
            return None
        start = int(first)
        end = int(last) if last else size - 1
    except ValueError:
        return None
    if last and end < start:
        return None
    if start >= size:
        return "unsatisfiable"
    return start, min(end, size - 1)


# -------------------------------------------------------------------------------------------------
# run-time state


class _TokenBucket:
    """A shared pacing schedule for ``total_bandwidth``: each write reserves its time slot.

    Reservations are handed out in call order, so concurrent responses interleave instead of
    one starving the others; a small burst allowance keeps the first piece from waiting.
    """

    BURST_SECONDS = 0.02

    def __init__(self) -> None:
        self._next = 0.0

    def reserve(self, nbytes: int, rate: float, now: float) -> float:
        """Reserve ``nbytes`` at ``rate`` B/s; return how long the caller must wait first."""
        start = max(self._next, now - self.BURST_SECONDS)
        self._next = start + nbytes / rate
        return max(0.0, start - now)


@dataclasses.dataclass
class _UriStats:
    requests: int = 0
    gets: int = 0
    heads: int = 0
    body_bytes: int = 0
    range_requests: int = 0
    statuses: list[int] = dataclasses.field(default_factory=list)
    faults: list[str] = dataclasses.field(default_factory=list)


class StatusCounts(dict):  # type: ignore[type-arg]
    """``{status: count}`` that answers to ``200`` and ``"200"`` alike.

    JSON turns the keys into strings; accepting both keeps tests written against the HTTP
    endpoint and against :meth:`MastSimulator.stats` interchangeable.
    """

    def __getitem__(self, key: object) -> Any:
        return super().__getitem__(str(key))

    def get(self, key: object, default: Any = None) -> Any:
        return super().get(str(key), default)

    def __contains__(self, key: object) -> bool:
        return super().__contains__(str(key))


class SimState:
    """Everything the server keeps between requests. Touched only from the server's loop."""

    def __init__(self, config: SimConfig, catalog: CatalogLike, bodies: BodySource) -> None:
        self.config = config
        self.catalog = catalog
        self.bodies = bodies
        self.bucket = _TokenBucket()
        #: Attempt counters per (method, uri); deliberately NOT cleared by reset, so a test that
        #: resets the stats does not replay the faults from the first attempt again.
        self.attempts: Counter[tuple[str, str]] = Counter()
        self._sha256: dict[str, str] = {}
        self.stopping = asyncio.Event()
        self.reset()

    def reset(self) -> None:
        """Zero every counter (``active_connections`` keeps counting what is in flight)."""
        self.bytes_served = 0
        self.requests = 0
        self.head_requests = 0
        self.range_requests = 0
        self.query_requests = 0
        self.rejected_connections = 0
        self.status_counts: Counter[int] = Counter()
        self.fault_counts: Counter[str] = Counter()
        self.per_uri: dict[str, _UriStats] = {}
        self.active = getattr(self, "active", 0)
        self.peak_connections = self.active

    def uri_stats(self, uri: str) -> _UriStats:
        stats = self.per_uri.get(uri)
        if stats is None:
            stats = self.per_uri[uri] = _UriStats()
        return stats

    def record_status(self, uri_stats: _UriStats, status: int) -> None:
        self.status_counts[status] += 1
        uri_stats.statuses.append(status)

    def record_fault(self, uri_stats: _UriStats, fault: str) -> None:
        self.fault_counts[fault] += 1
        uri_stats.faults.append(fault)

    def snapshot(self) -> dict[str, Any]:
        """The stats as a JSON-ready dict (status codes as string keys)."""
        return {
            "bytes_served": self.bytes_served,
            "requests": self.requests,
            "head_requests": self.head_requests,
            "range_requests": self.range_requests,
            "query_requests": self.query_requests,
            "status_counts": {str(k): v for k, v in sorted(self.status_counts.items())},
            "fault_counts": dict(sorted(self.fault_counts.items())),
            "rejected_connections": self.rejected_connections,
            "peak_connections": self.peak_connections,
            "active_connections": self.active,
            "per_uri": {uri: dataclasses.asdict(s) for uri, s in self.per_uri.items()},
        }

    async def body(self, info: Any) -> bytes:
        """The product's body, generated off the loop (it can take milliseconds) and cached."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, self.bodies.get, info, self.config.seed)

    async def truth(self, uri: str) -> dict[str, Any] | None:
        """What a correct download of ``uri`` is, or None for a uri the catalog does not know."""
        info = self.catalog.product(uri)
        if info is None:
            return None
        digest = self._sha256.get(uri)
        if digest is None:
            body = await self.body(info)
            digest = self._sha256[uri] = hashlib.sha256(body).hexdigest()
        return {
            "uri": uri,
            "size": int(info.size),
            "sha256": digest,
            "filename": info.filename,
            "missing": is_missing(self.config, uri),
        }

    async def pause(self, seconds: float) -> bool:
        """Sleep ``seconds`` unless the server is stopping; True if it is stopping."""
        if seconds <= 0:
            return self.stopping.is_set()
        try:
            await asyncio.wait_for(self.stopping.wait(), seconds)
        except asyncio.TimeoutError:
            return False
        return True


SIM_STATE: web.AppKey[SimState] = web.AppKey("bulkfetch_sim_state", SimState)


def apply_knobs(config: SimConfig, knobs: dict[str, Any]) -> None:
    """Change run-time knobs of ``config`` in place; refuse unknown and catalog-shaping ones."""
    names = {f.name: f for f in dataclasses.fields(config)}
    for key in knobs:
        if key not in names:
            raise ValueError(f"unknown simulator knob {key!r}")
        if key in CATALOG_FIELDS:
            raise ValueError(f"knob {key!r} shapes the catalog and cannot change while serving")
    for key, value in knobs.items():
        setattr(config, key, value)


# -------------------------------------------------------------------------------------------------
# handlers


async def _close_after_flush(request: web.Request, *, reset: bool) -> None:
    """End the connection once what was written has left: FIN (``reset=False``) or RST.

    asyncio's ``abort()`` would drop buffered bytes, and a plain close sends FIN; waiting for the
    buffer and then closing with ``SO_LINGER 0`` is how a real peer resets a connection mid-body.
    """
    transport = request.transport
    if transport is None or transport.is_closing():
        return
    for _ in range(2000):
        if transport.get_write_buffer_size() == 0:
            break
        await asyncio.sleep(0.001)
    if reset:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:  # pragma: no cover - platform specific
                pass
        transport.abort()
    else:
        transport.close()


def _chunk_size(config: SimConfig) -> int:
    """Write size: big for speed, but about 20 ms worth of data when bandwidth is paced."""
    size = WRITE_CHUNK
    for rate in (config.conn_bandwidth, config.total_bandwidth):
        if rate:
            size = min(size, max(1024, int(rate * 0.02)))
    return size


async def _write_body(
    request: web.Request,
    resp: web.StreamResponse,
    data: memoryview,
    state: SimState,
    uri_stats: _UriStats,
) -> bool:
    """Write ``data`` with the bandwidth knobs applied; False if the client went away."""
    config = state.config
    loop = asyncio.get_running_loop()
    chunk = _chunk_size(config)
    conn_rate = config.conn_bandwidth
    started = loop.time()
    sent = 0
    total = len(data)
    while sent < total:
        piece = data[sent : sent + chunk]
        total_rate = config.total_bandwidth
        if total_rate:
            wait = state.bucket.reserve(len(piece), total_rate, loop.time())
            if await state.pause(wait):
                return False
        try:
            await resp.write(piece)
        except (ConnectionError, RuntimeError):
            log.debug("client left during body of %s", request.query.get("uri"))
            return False
        sent += len(piece)
        state.bytes_served += len(piece)
        uri_stats.body_bytes += len(piece)
        if conn_rate:
            due = started + sent / conn_rate
            if await state.pause(due - loop.time()):
                return False
    return True


def _plain(status: int, text: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, text=text, headers=headers)


async def handle_download(request: web.Request) -> web.StreamResponse:
    """``GET|HEAD /api/v0.1/Download/file?uri=...``: one product, with knobs and faults."""
    state = request.app[SIM_STATE]
    config = state.config
    method = request.method
    uri = request.query.get("uri", "")
    is_head = method == "HEAD"

    state.requests += 1
    if is_head:
        state.head_requests += 1
    uri_stats = state.uri_stats(uri)
    uri_stats.requests += 1
    if is_head:
        uri_stats.heads += 1
    else:
        uri_stats.gets += 1
    range_header = request.headers.get("Range")
    if range_header is not None:
        state.range_requests += 1
        uri_stats.range_requests += 1

    cap = config.max_connections
    if cap is not None and state.active >= cap:
        state.rejected_connections += 1
        state.record_status(uri_stats, 503)
        state.record_fault(uri_stats, "max_connections")
        return _plain(
            503,
            "Too many concurrent downloads; retry later.\n",
            {"Retry-After": format_retry_after(config.retry_after)},
        )

    state.active += 1
    state.peak_connections = max(state.peak_connections, state.active)
    try:
        return await _serve_product(request, state, uri, uri_stats, range_header)
    finally:
        state.active -= 1


async def _serve_product(
    request: web.Request,
    state: SimState,
    uri: str,
    uri_stats: _UriStats,
    range_header: str | None,
) -> web.StreamResponse:
    config = state.config
    method = request.method
    if await state.pause(config.latency):
        return _plain(503, "Server shutting down.\n")

    if not uri:
        state.record_status(uri_stats, 400)
        return _plain(400, "Missing required parameter: uri\n")
    info = state.catalog.product(uri)
    if info is None or is_missing(config, uri):
        state.record_status(uri_stats, 404)
        return _plain(404, f"File not found: {uri}\n")

    attempt = state.attempts[(method, uri)]
    state.attempts[(method, uri)] += 1
    fault = choose_fault(config, uri, method, attempt)
    if fault is not None:
        state.record_fault(uri_stats, fault)
    for name, status in STATUS_FAULTS:
        if fault == name:
            state.record_status(uri_stats, status)
            headers = {}
            if status in (429, 503):
                headers["Retry-After"] = format_retry_after(config.retry_after)
            return _plain(status, f"Simulated HTTP {status} for {uri}\n", headers)

    if fault == "html_rate":
        page = _HTML_ERROR_PAGE.format(uri=uri).encode()
        resp = web.StreamResponse(status=200)
        resp.content_type = "text/html"
        resp.charset = "utf-8"
        resp.content_length = len(page)
        state.record_status(uri_stats, 200)
        await resp.prepare(request)
        await _write_body(request, resp, memoryview(page), state, uri_stats)
        return resp

    size = int(info.size)
    etag = etag_for(config, uri, size)
    start, end = 0, size - 1
    status = 200
    if range_header is not None and not config.ignore_range:
        if_range = request.headers.get("If-Range")
        if if_range is None or if_range.strip() == etag:
            parsed = parse_range(range_header, size)
            if parsed == "unsatisfiable":
                state.record_status(uri_stats, 416)
                return web.Response(
                    status=416,
                    headers={"Content-Range": f"bytes */{size}", "Accept-Ranges": "bytes"},
                )
            if isinstance(parsed, tuple):
                start, end = parsed
                status = 206

    resp = web.StreamResponse(status=status)
    resp.headers["Accept-Ranges"] = "bytes"
    resp.headers["ETag"] = etag
    resp.headers["Content-Type"] = content_type_for(info.filename)
    resp.headers["Content-Disposition"] = f"attachment; filename={info.filename}"
    if status == 206:
        resp.headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    length = end - start + 1 if size else 0
    resp.content_length = length
    state.record_status(uri_stats, status)

    if method == "HEAD":
        await resp.prepare(request)
        return resp

    body = await state.body(info)
    view = memoryview(body)[start : end + 1]
    if fault == "corrupt_rate" and length:
        view = memoryview(_corrupt(bytes(view), config.seed, uri, attempt))
    await resp.prepare(request)

    if fault in ("reset_rate", "truncate_rate", "stall_rate"):
        cut = int(length * (0.1 + 0.8 * unit_draw(config.seed, "cut", uri, attempt)))
        cut = min(cut, max(length - 1, 0))
        if not await _write_body(request, resp, view[:cut], state, uri_stats):
            return resp
        await _flush(request)
        if fault == "stall_rate":
            await state.pause(config.stall_seconds)
        await _close_after_flush(request, reset=fault == "reset_rate")
        return resp

    await _write_body(request, resp, view, state, uri_stats)
    return resp


async def _flush(request: web.Request) -> None:
    """Push buffered headers and bytes out so a stalled response really shows its first part."""
    transport = request.transport
    writer = request.writer if hasattr(request, "writer") else None
    if writer is not None:
        send_headers = getattr(writer, "send_headers", None)
        if send_headers is not None:
            send_headers()
    if transport is None:
        return
    for _ in range(1000):
        if transport.is_closing() or transport.get_write_buffer_size() == 0:
            return
        await asyncio.sleep(0.001)


def _corrupt(data: bytes, seed: int, uri: str, attempt: int) -> bytes:
    """``data`` with a few bytes inverted at seeded positions (same length, different digest)."""
    buf = bytearray(data)
    for i in range(3):
        pos = int(unit_draw(seed, "corrupt", uri, attempt, i) * len(buf))
        buf[pos] ^= 0xFF
    return bytes(buf)


async def handle_stats(request: web.Request) -> web.Response:
    """``GET /_sim/stats``: every counter, as JSON."""
    return web.json_response(request.app[SIM_STATE].snapshot())


async def handle_reset(request: web.Request) -> web.Response:
    """``POST /_sim/reset``: zero the counters (fault attempt numbering continues)."""
    request.app[SIM_STATE].reset()
    return web.json_response({"ok": True})


async def handle_truth(request: web.Request) -> web.Response:
    """``GET /_sim/truth?uri=``: size, SHA-256, file name and whether the uri is missing."""
    uri = request.query.get("uri", "")
    truth = await request.app[SIM_STATE].truth(uri)
    if truth is None:
        return web.json_response({"error": f"unknown uri {uri!r}"}, status=404)
    return web.json_response(truth)


def config_knobs(config: SimConfig) -> dict[str, Any]:
    """The config as a JSON-ready dict."""
    data = dataclasses.asdict(config)
    if data.get("sectors") is not None:
        data["sectors"] = list(data["sectors"])
    return data


async def handle_config(request: web.Request) -> web.Response:
    """``GET|POST /_sim/config``: read, or change run-time knobs with a JSON object."""
    state = request.app[SIM_STATE]
    if request.method == "POST":
        try:
            knobs = await request.json()
            if not isinstance(knobs, dict):
                raise ValueError("expected a JSON object of knobs")
            apply_knobs(state.config, knobs)
        except (ValueError, json.JSONDecodeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        log.info("simulator knobs changed: %s", knobs)
    return web.json_response(config_knobs(state.config))


@web.middleware
async def _count_queries(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Count query API calls without the query module having to know about the stats."""
    if request.path in QUERY_PATHS:
        request.app[SIM_STATE].query_requests += 1
    return await handler(request)


# -------------------------------------------------------------------------------------------------
# app, background runner, CLI


def make_app(
    config: SimConfig,
    *,
    catalog: CatalogLike | None = None,
    bodies: BodySource | None = None,
    query_routes: bool = True,
    body_cache_bytes: int = DEFAULT_BODY_CACHE_BYTES,
) -> web.Application:
    """Build the simulated archive's application for ``config``.

    ``catalog`` and ``bodies`` default to the real ``Catalog(config)`` and ``BodyCache``; passing
    others lets a test serve a hand-made archive. ``query_routes=False`` leaves out the query API
    (a download-only server).
    """
    if catalog is None:
        from .catalog import Catalog

        catalog = Catalog(config)
    if bodies is None:
        from .fitsgen import BodyCache

        bodies = BodyCache(body_cache_bytes)
    app = web.Application(middlewares=[_count_queries], client_max_size=64 * 1024 * 1024)
    app[SIM_STATE] = SimState(config, catalog, bodies)
    for path in DOWNLOAD_PATHS:
        # HEAD is registered explicitly: add_get's implicit HEAD route would share one handler
        # anyway, but naming it makes the routing table say what MAST supports.
        app.router.add_route("GET", path, handle_download)
        app.router.add_route("HEAD", path, handle_download)
    app.router.add_get("/_sim/stats", handle_stats, allow_head=False)
    app.router.add_post("/_sim/reset", handle_reset)
    app.router.add_get("/_sim/truth", handle_truth, allow_head=False)
    app.router.add_get("/_sim/config", handle_config, allow_head=False)
    app.router.add_post("/_sim/config", handle_config)
    if query_routes:
        from .query_api import add_query_routes

        add_query_routes(app, catalog, config)  # type: ignore[arg-type]
    return app


class MastSimulator:
    """The simulated archive served from a background thread, for sync and async callers.

    ``MastSimulator(SimConfig(...), latency=0.1)`` or ``MastSimulator(scale=0.01)``; use it as a
    context manager or call :meth:`start`/:meth:`stop`. The methods below are called from the
    caller's thread and run on the server's loop, so they never race a request in flight.
    """

    def __init__(
        self,
        config: SimConfig | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        catalog: CatalogLike | None = None,
        bodies: BodySource | None = None,
        query_routes: bool = True,
        body_cache_bytes: int = DEFAULT_BODY_CACHE_BYTES,
        **knobs: Any,
    ) -> None:
        base = config if config is not None else SimConfig()
        self.config: SimConfig = dataclasses.replace(base, **knobs) if knobs else base
        self.host = host
        self._port = port
        self._app = make_app(
            self.config,
            catalog=catalog,
            bodies=bodies,
            query_routes=query_routes,
            body_cache_bytes=body_cache_bytes,
        )
        self._state = self._app[SIM_STATE]
        self.catalog = self._state.catalog
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self.url = ""

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> MastSimulator:
        """Start serving; returns once the socket listens and :attr:`url` is set."""
        if self._thread is not None:
            raise RuntimeError("simulator already started")
        ready: Future[str] = Future()
        loop = asyncio.new_event_loop()
        self._loop = loop

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                url = loop.run_until_complete(self._startup())
            except BaseException as exc:  # surface bind errors in the caller's thread
                ready.set_exception(exc)
                loop.close()
                return
            ready.set_result(url)
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name="mast-simulator", daemon=True)
        self._thread.start()
        self.url = ready.result(timeout=30)
        log.info("simulated MAST serving at %s", self.url)
        return self

    async def _startup(self) -> str:
        # The Event binds to this loop when first awaited; create it here to be explicit.
        self._state.stopping = asyncio.Event()
        runner = web.AppRunner(self._app, access_log=None, shutdown_timeout=2.0)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self._port, reuse_address=True)
        await site.start()
        self._runner = runner
        host, port = runner.addresses[0][:2]
        return f"http://{host}:{port}"

    async def _shutdown(self) -> None:
        self._state.stopping.set()
        if self._runner is not None:
            await self._runner.cleanup()

    def stop(self) -> None:
        """Stop serving: stalled responses end at once, then the thread is joined."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if loop.is_running():
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout=30)
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        self._thread = None
        self._loop = None

    def __enter__(self) -> MastSimulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- introspection -----------------------------------------------------------------------
    def _call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the server loop (or inline when not started) and return its result."""
        loop = self._loop
        if loop is None or not loop.is_running():
            return fn()

        async def wrapper() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(wrapper(), loop).result(timeout=30)

    def stats(self) -> dict[str, Any]:
        """A snapshot of the counters (same shape as ``GET /_sim/stats``).

        ``status_counts`` accepts int and str keys alike (:class:`StatusCounts`).
        """
        snap = self._call(self._state.snapshot)
        snap["status_counts"] = StatusCounts(snap["status_counts"])
        return snap

    def reset_stats(self) -> None:
        """Zero the counters, as ``POST /_sim/reset`` does."""
        self._call(self._state.reset)

    def truth(self, uri: str) -> dict[str, Any]:
        """``{"uri", "size", "sha256", "filename", "missing"}`` of ``uri``; KeyError if unknown."""
        loop = self._loop
        coro = self._state.truth(uri)
        if loop is None or not loop.is_running():
            result = asyncio.run(coro)
        else:
            result = asyncio.run_coroutine_threadsafe(coro, loop).result(timeout=60)
        if result is None:
            raise KeyError(f"unknown uri {uri!r}")
        return result

    def set(self, **knobs: Any) -> None:
        """Change run-time knobs (latency, bandwidths, fault rates, ...) while serving."""
        self._call(lambda: apply_knobs(self.config, knobs))

    def download_url(self, uri: str) -> str:
        """The download URL of ``uri`` on this server, escaped as astroquery escapes it."""
        from ..sources import download_url

        return download_url(self.url, uri)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bulkfetch.testing.mast",
        description="Serve a simulated MAST archive on this machine until SIGINT/SIGTERM.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--log-level", default="WARNING")
    parser.add_argument("--body-cache-mb", type=float, default=DEFAULT_BODY_CACHE_BYTES / 2**20)
    # Friendly short names the brief and the docs use.
    parser.add_argument("--sectors", dest="n_sectors", type=int, help="number of sectors")
    parser.add_argument("--targets", dest="targets_per_sector", type=int, help="targets/sector")
    parser.add_argument(
        "--sector-list", help="explicit comma-separated sector numbers (overrides --sectors)"
    )
    parser.add_argument("--extra", action="append", default=[], metavar="KEY=VALUE")
    taken = {"sectors", "extra", "n_sectors", "targets_per_sector"}
    for f in dataclasses.fields(SimConfig):
        if f.name in taken:
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction)
        elif f.type in ("int", int, "int | None"):
            parser.add_argument(flag, dest=f.name, type=int)
        else:
            parser.add_argument(flag, dest=f.name, type=float)
    parser.add_argument("--n-sectors", dest="n_sectors", type=int, help=argparse.SUPPRESS)
    parser.add_argument(
        "--targets-per-sector", dest="targets_per_sector", type=int, help=argparse.SUPPRESS
    )
    return parser


def config_from_args(args: argparse.Namespace) -> SimConfig:
    """A SimConfig from parsed CLI arguments (unset options keep their defaults)."""
    knobs: dict[str, Any] = {}
    for f in dataclasses.fields(SimConfig):
        value = getattr(args, f.name, None)
        if value is not None and f.name not in ("sectors", "extra"):
            knobs[f.name] = value
    if args.sector_list:
        knobs["sectors"] = tuple(int(s) for s in args.sector_list.split(",") if s.strip())
    extra: dict[str, float] = {}
    for item in args.extra:
        key, _, value = item.partition("=")
        extra[key.strip()] = float(value)
    if extra:
        knobs["extra"] = extra
    return SimConfig(**knobs)


async def _serve_forever(config: SimConfig, host: str, port: int, body_cache_bytes: int) -> None:
    app = make_app(config, body_cache_bytes=body_cache_bytes)
    state = app[SIM_STATE]
    state.stopping = asyncio.Event()
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    bound_host, bound_port = runner.addresses[0][:2]
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, done.set)
    print(f"http://{bound_host}:{bound_port}", flush=True)
    try:
        await done.wait()
    finally:
        state.stopping.set()
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    """Serve until SIGINT/SIGTERM; print the base URL on one line as soon as it listens."""
    args = _build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr)
    config = config_from_args(args)
    asyncio.run(_serve_forever(config, args.host, args.port, int(args.body_cache_mb * 2**20)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
