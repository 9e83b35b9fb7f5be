"""The fetch engine against the simulated archive: real HTTP, real files, real SQLite.

Every test checks what a user relies on: bytes equal to the archive's (SHA-256 against the
simulator's truth), the right status per file, and - through the simulator's own request
counters - that nothing is requested twice that did not need to be.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from bulkfetch.errors import StateError, UsageError
from bulkfetch.fetch import (
    AdaptiveLimiter,
    Fetcher,
    FetchOptions,
    FetchResult,
    fetch,
    parse_rate,
    parse_retry_after,
)
from bulkfetch.layout import PART_SUFFIX, relative_path
from bulkfetch.sources import download_url
from bulkfetch.store import DONE, ERROR, PlannedProduct, open_store
from bulkfetch.testing.catalog import CAT_2MIN
from bulkfetch.testing.mast import MastSimulator

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------


def lc_products(sim: MastSimulator, limit: int | None = None) -> list[PlannedProduct]:
    """The light curves of the simulator's catalog as the planner would store them."""
    cat = sim.catalog
    rows: list[PlannedProduct] = []
    for si in range(len(cat.sectors())):
        for idx in range(cat.count(si, CAT_2MIN)):
            key = (si, CAT_2MIN, idx)
            obs_id = cat.obs_id(key)
            for info in cat.products_of(cat.obsid_of(key)):
                if info.kind != "LC":
                    continue
                rows.append(
                    PlannedProduct(
                        uri=info.uri,
                        url=download_url(sim.url, info.uri),
                        local_path=relative_path("TESS", obs_id, info.filename, False),
                        size=info.size,
                        obs_collection="TESS",
                        obs_id=obs_id,
                        product_filename=info.filename,
                        sector=info.sector,
                        kind=info.kind,
                    )
                )
                if limit is not None and len(rows) >= limit:
                    return rows
    return rows


def planned(root: Path, rows: list[PlannedProduct]) -> Any:
    store = open_store(root)
    assert store.add_products(rows) == len(rows)
    return store


def quick(**overrides: Any) -> FetchOptions:
    """Options for tests: the defaults, with backoffs and stall timers scaled down."""
    base: dict[str, Any] = dict(
        concurrency=8,
        retries=12,
        backoff_base=0.01,
        backoff_max=0.2,
        stall_timeout=1.0,
        timeout=10.0,
    )
    base.update(overrides)
    return FetchOptions(**base)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_exact(sim: MastSimulator, root: Path, rows: list[PlannedProduct]) -> None:
    """Every file is present, byte-exact, and no .part or .etag is left behind."""
    for row in rows:
        path = root / row.local_path
        assert path.is_file(), f"missing {row.local_path}"
        assert sha256(path) == sim.truth(row.uri)["sha256"], f"wrong bytes in {row.local_path}"
    leftovers = [p for p in root.rglob("*") if p.name.endswith((PART_SUFFIX, ".etag"))]
    assert leftovers == []


def records(store: Any) -> dict[str, Any]:
    return {r.uri: r for r in store.iter_records()}


def get_body(sim: MastSimulator, uri: str) -> tuple[bytes, str]:
    """The product's bytes and ETag, straight from the server (stats are reset by callers)."""
    with urllib.request.urlopen(sim.download_url(uri)) as resp:
        return resp.read(), resp.headers["ETag"]


class Recorder:
    """FetchEvents that remembers what the engine reported."""

    def __init__(self) -> None:
        self.start: tuple[int, int, int, int] | None = None
        self.nbytes = 0
        self.files: list[tuple[str, bool, str | None]] = []
        self.retries: list[tuple[str, str]] = []
        self.limits: list[int] = []

    def on_start(
        self, total_files: int, total_bytes: int, done_files: int, done_bytes: int
    ) -> None:
        self.start = (total_files, total_bytes, done_files, done_bytes)

    def on_bytes(self, n: int) -> None:
        self.nbytes += n

    def on_file(self, uri: str, ok: bool, message: str | None) -> None:
        self.files.append((uri, ok, message))

    def on_retry(self, uri: str, message: str) -> None:
        self.retries.append((uri, message))

    def on_concurrency(self, n: int) -> None:
        self.limits.append(n)


# ------------------------------------------------------------------------------------------
# the happy path
# ------------------------------------------------------------------------------------------


def test_downloads_every_file_byte_exact_without_head_requests(mast_sim, tmp_path):
    sim = mast_sim()
    rows = lc_products(sim)
    assert len(rows) >= 60
    store = planned(tmp_path, rows)
    events = Recorder()
    active_seen: list[int] = []
    original_on_file = events.on_file

    def on_file(uri: str, ok: bool, message: str | None) -> None:
        active_seen.append(store.counts()["active"][0])
        original_on_file(uri, ok, message)

    events.on_file = on_file  # type: ignore[method-assign]
    options = quick(concurrency=4, claim_batch=8)
    result = fetch(store, tmp_path, options, events)

    assert_exact(sim, tmp_path, rows)
    total = sum(r.size for r in rows)
    assert (result.done, result.errors, result.pending) == (len(rows), 0, 0)
    assert result.downloaded == len(rows) and result.adopted == 0
    assert result.bytes_downloaded == total == events.nbytes
    assert events.start == (len(rows), total, 0, 0)
    assert all(ok for _, ok, _ in events.files) and len(events.files) == len(rows)
    # The state holds each file's verified digest, and leases stayed within one batch ahead.
    recs = records(store)
    assert all(recs[r.uri].status == DONE for r in rows)
    assert all(recs[r.uri].sha256 == sim.truth(r.uri)["sha256"] for r in rows)
    assert max(active_seen) <= 2 * options.concurrency + options.claim_batch < len(rows) / 4
    # One GET per file, no HEAD, nothing else.
    stats = sim.stats()
    assert stats["requests"] == len(rows) and stats["head_requests"] == 0
    assert dict(stats["status_counts"]) == {"200": len(rows)}
    assert stats["bytes_served"] == total
    store.close()


def test_size_only_verification_records_no_digest(mast_sim, tmp_path):
    sim = mast_sim()
    rows = lc_products(sim, 5)
    store = planned(tmp_path, rows)
    assert fetch(store, tmp_path, quick(verify="size")).done == len(rows)
    assert_exact(sim, tmp_path, rows)
    assert all(r.sha256 is None and r.status == DONE for r in records(store).values())


def test_a_second_run_requests_nothing(mast_sim, tmp_path):
    sim = mast_sim()
    rows = lc_products(sim, 30)
    store = planned(tmp_path, rows)
    fetch(store, tmp_path, quick())
    sim.reset_stats()
    result = fetch(store, tmp_path, quick())
    assert sim.stats()["requests"] == 0
    assert (result.done, result.downloaded, result.adopted) == (30, 0, 0)
    assert_exact(sim, tmp_path, rows)


def test_concurrency_never_exceeds_the_knob(mast_sim, tmp_path):
    sim = mast_sim(latency=0.05)
    rows = lc_products(sim, 40)
    store = planned(tmp_path, rows)
    fetch(store, tmp_path, quick(concurrency=3))
    assert sim.stats()["peak_connections"] == 3  # used, and never more
    assert_exact(sim, tmp_path, rows)


# ------------------------------------------------------------------------------------------
# faults
# ------------------------------------------------------------------------------------------


def test_every_fault_at_once_still_gives_a_byte_exact_tree(mast_sim, tmp_path):
    faults = dict(
        fail_500=0.04,
        fail_503=0.04,
        fail_429=0.04,
        reset_rate=0.05,
        truncate_rate=0.05,
        corrupt_rate=0.05,
        stall_rate=0.04,
        html_rate=0.05,
    )
    stall_seconds = 8.0
    sim = mast_sim(retry_after=0.05, stall_seconds=stall_seconds, seed=3, **faults)
    rows = lc_products(sim)
    store = planned(tmp_path, rows)
    events = Recorder()
    started = time.monotonic()
    result = fetch(store, tmp_path, quick(stall_timeout=0.3, retries=20), events)
    elapsed = time.monotonic() - started

    assert (result.done, result.errors) == (len(rows), 0)
    assert_exact(sim, tmp_path, rows)
    injected = sim.stats()["fault_counts"]
    assert set(faults) <= set(injected), f"not every fault was exercised: {injected}"
    # Each injected failure cost one attempt, counted in the state and reported as a retry.
    recs = records(store)
    assert sum(r.attempts for r in recs.values()) == result.retries == len(events.retries)
    assert result.retries >= sum(injected.values())
    # Stalls were cut by the watchdog, not waited out (the server holds each for 8 s).
    assert elapsed < stall_seconds
    assert any("stalled" in m for _, m in events.retries)
    assert any("HTML" in m for _, m in events.retries)
    assert any("CHECKSUM" in m for _, m in events.retries)


def test_a_trickling_body_below_min_speed_is_retried(mast_sim, tmp_path):
    sim = mast_sim(conn_bandwidth=3_000)  # ~20 KB files would take ~7 s each
    rows = lc_products(sim, 6)
    store = planned(tmp_path, rows)
    timer = threading.Timer(1.0, lambda: sim.set(conn_bandwidth=None))
    timer.start()
    events = Recorder()
    started = time.monotonic()
    try:
        options = quick(min_speed=10_000, speed_window=0.4, stall_timeout=5.0)
        result = fetch(store, tmp_path, options, events)
    finally:
        timer.cancel()
    assert result.done == len(rows)
    assert_exact(sim, tmp_path, rows)
    assert events.retries and all("too slow" in m for _, m in events.retries)
    assert time.monotonic() - started < 4.0  # not the ~7 s a trickle would take


def test_missing_files_end_as_errors_with_their_status_at_once(mast_sim, tmp_path):
    sim = mast_sim(missing_rate=0.2, seed=5)
    rows = lc_products(sim, 60)
    store = planned(tmp_path, rows)
    result = fetch(store, tmp_path, quick())
    missing = [r for r in rows if sim.truth(r.uri)["missing"]]
    assert 0 < len(missing) < len(rows)
    assert (result.errors, result.done) == (len(missing), len(rows) - len(missing))
    recs = records(store)
    per_uri = sim.stats()["per_uri"]
    for row in missing:
        rec = recs[row.uri]
        assert rec.status == ERROR and rec.http_status == 404 and "404" in (rec.message or "")
        assert rec.attempts == 1 and per_uri[row.uri]["gets"] == 1  # permanent: no retry
        assert not (tmp_path / row.local_path).exists()
    assert_exact(sim, tmp_path, [r for r in rows if r not in missing])
    assert result.exit_code == 1


def test_retry_after_is_honoured(mast_sim, tmp_path):
    retry_after = 0.4
    sim = mast_sim(fail_429=1.0, retry_after=retry_after)
    rows = lc_products(sim, 12)
    store = planned(tmp_path, rows)
    rejecting = 1.0
    timer = threading.Timer(rejecting, lambda: sim.set(fail_429=0.0))
    timer.start()
    try:
        # A 1 ms backoff and a fixed concurrency (no AIMD pause to hide behind): only the
        # per-file Retry-After keeps each file from being asked for hundreds of times.
        options = quick(backoff_base=0.001, backoff_max=0.001, retries=50, adaptive=False)
        result = fetch(store, tmp_path, options)
    finally:
        timer.cancel()
    assert result.done == len(rows)
    assert_exact(sim, tmp_path, rows)
    per_uri = sim.stats()["per_uri"]
    bound = math.ceil(rejecting / retry_after) + 1
    rejected = {row.uri: per_uri[row.uri]["statuses"].count(429) for row in rows}
    assert max(rejected.values()) >= 2  # files were retried while the archive refused...
    assert max(rejected.values()) <= bound, rejected  # ...but never sooner than it asked


def test_adaptive_concurrency_settles_under_the_archive_cap(mast_sim, tmp_path):
    sim = mast_sim(max_connections=4, latency=0.05, retry_after=0.05)
    rows = lc_products(sim)
    store = planned(tmp_path, rows)
    events = Recorder()
    result = fetch(store, tmp_path, quick(concurrency=16), events)
    assert result.done == len(rows)
    assert_exact(sim, tmp_path, rows)
    stats = sim.stats()
    # The limit was halved on the 503s (visible to progress), and the archive was not hammered:
    # far fewer rejections than files, where a fixed 16 would be refused on most requests.
    assert events.limits[0] == 16 and min(events.limits) <= 4
    assert result.min_concurrency_seen <= 4
    assert stats["rejected_connections"] < len(rows) / 2
    assert stats["peak_connections"] <= 4


# ------------------------------------------------------------------------------------------
# resume
# ------------------------------------------------------------------------------------------


def _prepare_part(
    sim: MastSimulator, root: Path, row: PlannedProduct, keep: int, etag: str | None
) -> bytes:
    body, real_etag = get_body(sim, row.uri)
    part = root / (row.local_path + PART_SUFFIX)
    part.parent.mkdir(parents=True, exist_ok=True)
    part.write_bytes(body[:keep])
    if etag is not None:
        Path(str(part) + ".etag").write_text(real_etag if etag == "real" else etag)
    return body


@pytest.mark.parametrize("etag", ["real", None])
def test_a_part_file_resumes_with_a_range_request(mast_sim, tmp_path, etag):
    sim = mast_sim()
    rows = lc_products(sim, 3)
    row = rows[1]
    keep = row.size // 3 + 7  # not on a block boundary
    body = _prepare_part(sim, tmp_path, row, keep, etag)
    store = planned(tmp_path, rows)
    sim.reset_stats()
    fetch(store, tmp_path, quick())
    assert_exact(sim, tmp_path, rows)
    stat = sim.stats()["per_uri"][row.uri]
    assert stat["gets"] == 1 and stat["range_requests"] == 1
    assert stat["statuses"] == [206]
    assert stat["body_bytes"] == len(body) - keep


@pytest.mark.parametrize("how", ["server ignores Range", "ETag changed"])
def test_a_whole_body_instead_of_a_range_restarts_the_file_cleanly(mast_sim, tmp_path, how):
    sim = mast_sim(ignore_range=how == "server ignores Range")
    rows = lc_products(sim, 2)
    row = rows[0]
    etag = "real" if how == "server ignores Range" else '"an-older-version"'
    body = _prepare_part(sim, tmp_path, row, 5000, etag)
    store = planned(tmp_path, rows)
    sim.reset_stats()
    fetch(store, tmp_path, quick())
    assert_exact(sim, tmp_path, rows)
    stat = sim.stats()["per_uri"][row.uri]
    # One request answered with the whole body, written from byte 0: had it been appended to
    # the prefix, the size check would have failed and a second request would show here.
    assert stat["gets"] == 1 and stat["statuses"] == [200]
    assert stat["body_bytes"] == len(body)


def test_a_complete_part_is_verified_without_a_request_and_a_bad_one_replaced(mast_sim, tmp_path):
    sim = mast_sim()
    rows = lc_products(sim, 3)
    good, bad = rows[0], rows[1]
    body = _prepare_part(sim, tmp_path, good, 10**9, None)
    damaged = bytearray(_prepare_part(sim, tmp_path, bad, 10**9, None))
    damaged[len(damaged) // 2] ^= 0xFF
    (tmp_path / (bad.local_path + PART_SUFFIX)).write_bytes(bytes(damaged))
    store = planned(tmp_path, rows)
    sim.reset_stats()
    fetch(store, tmp_path, quick())
    assert_exact(sim, tmp_path, rows)
    per_uri = sim.stats()["per_uri"]
    assert good.uri not in per_uri and len(body) == good.size
    assert per_uri[bad.uri]["gets"] == 1 and per_uri[bad.uri]["range_requests"] == 0


def test_files_already_present_are_adopted_and_damaged_ones_replaced(mast_sim, tmp_path):
    from astroquery.mast import Observations

    from bulkfetch.testing.fixtures import use_simulator

    sim = mast_sim()
    rows = lc_products(sim, 8)
    # Fill the directory the way a user did before: astroquery's own download_file.
    with use_simulator(sim):
        for row in rows:
            path = tmp_path / row.local_path
            path.parent.mkdir(parents=True, exist_ok=True)
            status, _, _ = Observations.download_file(row.uri, local_path=str(path))
            assert status == "COMPLETE"
    flipped, truncated = tmp_path / rows[0].local_path, tmp_path / rows[1].local_path
    data = bytearray(flipped.read_bytes())
    data[-100] ^= 0x01  # same size, one bit off: only the FITS checksum can tell
    flipped.write_bytes(bytes(data))
    truncated.write_bytes(truncated.read_bytes()[:2880])
    store = planned(tmp_path, rows)
    sim.reset_stats()
    result = fetch(store, tmp_path, quick())
    assert_exact(sim, tmp_path, rows)
    assert (result.adopted, result.downloaded) == (len(rows) - 2, 2)
    per_uri = sim.stats()["per_uri"]
    assert set(per_uri) == {rows[0].uri, rows[1].uri}
    recs = records(store)
    assert all(recs[r.uri].sha256 == sim.truth(r.uri)["sha256"] for r in rows)


_RUNNER = textwrap.dedent(
    """
    import logging, sys
    from bulkfetch.fetch import FetchOptions, fetch
    from bulkfetch.store import open_store
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    store = open_store(sys.argv[1], create=False)
    options = FetchOptions(concurrency=4, backoff_base=0.01)  # default body handling
    result = fetch(store, sys.argv[1], options, install_signals=True)
    store.close()
    print(result.summary(), flush=True)
    sys.exit(result.exit_code)
    """
)


def _start_runner(root: Path) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen(
        [sys.executable, "-c", _RUNNER, str(root)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _on_disk(root: Path, rows: list[PlannedProduct]) -> tuple[set[str], dict[str, int]]:
    """(uris with a final file, {uri: .part size})."""
    final = {r.uri for r in rows if (root / r.local_path).exists()}
    parts = {}
    for r in rows:
        part = root / (r.local_path + PART_SUFFIX)
        if part.exists():
            parts[r.uri] = part.stat().st_size
    return final, parts


def _wait_for(predicate: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting for the runner"
        time.sleep(0.02)


def _slow_sim_rows(mast_sim: Any) -> tuple[MastSimulator, list[PlannedProduct]]:
    # ~200 KB light curves (large enough to go through .part) at 100 KB/s per connection: each
    # takes ~2 s, so a kill lands with files finished, files part-way, and files not started.
    sim = mast_sim(scale=0.1, conn_bandwidth=100_000, seed=11)
    return sim, lc_products(sim, 24)


def test_kill_9_mid_run_then_resume_is_byte_exact_and_refetches_nothing(mast_sim, tmp_path):
    sim, rows = _slow_sim_rows(mast_sim)
    planned(tmp_path, rows).close()
    proc = _start_runner(tmp_path)
    try:
        # Wait until some files are final and some parts hold flushed bytes (progress ticks).
        _wait_for(
            lambda: (
                len(_on_disk(tmp_path, rows)[0]) >= 4
                and any(n > 0 for n in _on_disk(tmp_path, rows)[1].values())
            )
        )
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    final_at_kill, parts_at_kill = _on_disk(tmp_path, rows)
    assert final_at_kill and any(parts_at_kill.values())

    sim.set(conn_bandwidth=None)
    sim.reset_stats()
    store = open_store(tmp_path, create=False)
    result = fetch(store, tmp_path, quick())
    assert (result.done, result.errors) == (len(rows), 0)
    assert_exact(sim, tmp_path, rows)
    per_uri = sim.stats()["per_uri"]
    # Finished files were neither downloaded nor requested again.
    assert not final_at_kill & set(per_uri)
    # Partial files continued where their .part ended; nothing else was fetched twice.
    sizes = {r.uri: r.size for r in rows}
    for uri, kept in parts_at_kill.items():
        if kept:
            assert per_uri[uri]["range_requests"] == 1
        assert per_uri[uri]["body_bytes"] == sizes[uri] - kept
    untouched = set(sizes) - final_at_kill - set(parts_at_kill)
    assert sum(s["body_bytes"] for s in per_uri.values()) == sum(
        sizes[u] - parts_at_kill.get(u, 0) for u in set(parts_at_kill) | untouched
    )


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_parks_in_flight_files_and_exits_128_plus_signal(mast_sim, tmp_path, signum):
    sim, rows = _slow_sim_rows(mast_sim)
    planned(tmp_path, rows).close()
    proc = _start_runner(tmp_path)
    try:
        _wait_for(lambda: sim.stats()["bytes_served"] > 30_000)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signum, err
    assert "interrupted by" in out and "resume" in out
    store = open_store(tmp_path, create=False)
    counts = store.counts()
    assert counts["active"][0] == 0  # every lease was returned
    recs = records(store)
    assert all(r.attempts == 0 for r in recs.values())  # a stop is not a failed attempt
    _, parts = _on_disk(tmp_path, rows)
    assert parts and all(n > 0 for n in parts.values())  # in-flight bodies kept as parts
    sim.set(conn_bandwidth=None)
    sim.reset_stats()
    fetch(store, tmp_path, quick())
    assert_exact(sim, tmp_path, rows)
    per_uri = sim.stats()["per_uri"]
    for uri, kept in parts.items():
        assert per_uri[uri]["range_requests"] == 1
        assert per_uri[uri]["body_bytes"] == next(r.size for r in rows if r.uri == uri) - kept


# ------------------------------------------------------------------------------------------
# control, options, integration
# ------------------------------------------------------------------------------------------


def test_a_second_fetch_on_the_same_directory_is_refused(mast_sim, tmp_path):
    sim = mast_sim()
    rows = lc_products(sim, 5)
    holder = planned(tmp_path, rows)
    holder.acquire_lock()
    other = open_store(tmp_path, create=False)
    with pytest.raises(StateError, match="another bulkfetch is already working"):
        fetch(other, tmp_path, quick())
    assert sim.stats()["requests"] == 0
    holder.release_lock()
    assert fetch(other, tmp_path, quick()).done == len(rows)


async def test_fetch_works_inside_a_running_event_loop(mast_sim, tmp_path):
    sim = mast_sim()
    rows = lc_products(sim, 10)
    store = planned(tmp_path, rows)
    asyncio.get_running_loop()  # as in a notebook: the synchronous call must not deadlock
    result = fetch(store, tmp_path, quick())
    assert result.done == len(rows)
    assert_exact(sim, tmp_path, rows)


async def test_request_stop_ends_an_async_run_gracefully(mast_sim, tmp_path):
    sim = mast_sim(scale=0.05, conn_bandwidth=50_000)
    rows = lc_products(sim, 12)
    store = planned(tmp_path, rows)
    fetcher = Fetcher(store, tmp_path, quick(concurrency=3, memory_limit=0))
    task = asyncio.create_task(fetcher.run())
    await asyncio.sleep(0.6)
    fetcher.request_stop(signal.SIGINT)
    result: FetchResult = await asyncio.wait_for(task, 10)
    assert result.interrupted_by == signal.SIGINT and result.exit_code == 130
    assert result.pending == len(rows) - result.done > 0
    assert store.counts()["active"][0] == 0


def test_max_rate_caps_the_total_speed(mast_sim, tmp_path):
    sim = mast_sim()
    rows = lc_products(sim, 20)
    total = sum(r.size for r in rows)
    store = planned(tmp_path, rows)
    rate = total / 1.5
    started = time.monotonic()
    fetch(store, tmp_path, quick(max_rate=rate))
    elapsed = time.monotonic() - started
    assert elapsed >= 1.2  # unthrottled this takes a fraction of a second
    assert_exact(sim, tmp_path, rows)


class _Origin:
    """A tiny web server of our own: redirects, refuses or serves, recording headers it saw."""

    BODY = b"not a FITS file, just bytes\n"

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.seen: dict[str, list[dict[str, str]]] = {}
        self.redirects: dict[str, str] = {}

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.setdefault(request.path, []).append(dict(request.headers))
        if request.path in self.redirects:
            raise web.HTTPFound(self.redirects[request.path])
        if request.path.startswith("/bad"):
            return web.Response(status=500, text="always broken\n")
        if self.status != 200:
            return web.Response(status=self.status, text="no\n")
        return web.Response(body=self.BODY, content_type="application/octet-stream")

    async def start(self) -> str:
        app = web.Application()
        app.router.add_get("/{name}", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return f"http://127.0.0.1:{port}"


def _row(url: str, name: str, size: int) -> PlannedProduct:
    return PlannedProduct(
        uri=f"mast:TESS/product/{name}",
        url=url,
        local_path=name,
        size=size,
        obs_collection="TESS",
        obs_id="x",
        product_filename=name,
    )


async def test_private_headers_stay_on_their_host_across_redirects(tmp_path):
    archive, mirror = _Origin(), _Origin()
    base_a, base_b = await archive.start(), await mirror.start()
    archive.redirects = {"/same": f"{base_a}/file", "/away": f"{base_b}/file"}
    size = len(_Origin.BODY)
    rows = [_row(f"{base_a}/same", "same.bin", size), _row(f"{base_a}/away", "away.bin", size)]
    try:
        store = planned(tmp_path, rows)
        options = quick(verify="sha256", headers={"Authorization": "token s3cret"})
        result = await Fetcher(store, tmp_path, options).run()
    finally:
        await archive.runner.cleanup()
        await mirror.runner.cleanup()
    assert result.done == 2
    assert (
        (tmp_path / "same.bin").read_bytes()
        == (tmp_path / "away.bin").read_bytes()
        == (_Origin.BODY)
    )
    token = "token s3cret"
    assert [h.get("Authorization") for h in archive.seen["/same"]] == [token]
    assert [h.get("Authorization") for h in archive.seen["/file"]] == [token]  # same origin
    assert [h.get("Authorization") for h in mirror.seen["/file"]] == [None]  # another origin


@pytest.mark.parametrize("status", [403, 410, 400])
async def test_other_4xx_are_permanent_errors_named_by_status(tmp_path, status):
    origin = _Origin(status=status)
    base = await origin.start()
    row = _row(f"{base}/f", "x_lc.fits", 2880)
    try:
        store = planned(tmp_path, [row])
        result = await Fetcher(store, tmp_path, quick()).run()
    finally:
        await origin.runner.cleanup()
    assert result.errors == 1 and len(origin.seen["/f"]) == 1  # no retry
    rec = records(store)[row.uri]
    assert rec.status == ERROR and rec.http_status == status and str(status) in rec.message


async def test_files_in_backoff_do_not_starve_the_healthy_ones(tmp_path):
    origin = _Origin()
    base = await origin.start()
    size = len(_Origin.BODY)
    # The failing files come first in the job, and outnumber the leased-work room (2 + 2).
    bad = [_row(f"{base}/bad{i}", f"bad{i}.bin", size) for i in range(10)]
    good = [_row(f"{base}/good{i}", f"good{i}.bin", size) for i in range(20)]
    events = Recorder()
    finished_at: dict[str, float] = {}
    start = time.monotonic()

    def on_file(uri: str, ok: bool, message: str | None) -> None:
        finished_at[uri] = time.monotonic() - start

    events.on_file = on_file  # type: ignore[method-assign]
    try:
        store = planned(tmp_path, bad + good)
        options = quick(concurrency=2, claim_batch=2, retries=1, backoff_base=2.0, backoff_max=2.0)
        result = await Fetcher(store, tmp_path, options, events).run()
    finally:
        await origin.runner.cleanup()
    assert (result.done, result.errors) == (len(good), len(bad))
    # Every healthy file finished before the first failing one was even retried (>= 1 s).
    assert max(finished_at[r.uri] for r in good) < 1.0
    assert all(len(origin.seen[f"/bad{i}"]) == 2 for i in range(10))
    rec = records(store)[bad[0].uri]
    assert rec.status == ERROR and rec.attempts == 2 and "500" in rec.message


def test_options_are_validated_with_usage_errors():
    for bad in (
        dict(concurrency=0),
        dict(per_host=0),
        dict(retries=-1),
        dict(timeout=0),
        dict(stall_timeout=-1),
        dict(verify="md5"),
        dict(max_rate=0),
        dict(min_concurrency=9, concurrency=8),
        dict(headers={"X": "a\nb"}),
    ):
        with pytest.raises(UsageError):
            FetchOptions(**bad).validate()
    assert FetchOptions().validate().host_limit == FetchOptions().concurrency


def test_rates_and_retry_after_values_parse():
    assert parse_rate("50M") == 50 * 1024**2
    assert parse_rate("800k") == 800 * 1024
    assert parse_rate("1.5GB/s") == 1.5 * 1024**3
    assert parse_rate("1000") == 1000
    for bad in ("fast", "-3M", "0"):
        with pytest.raises(UsageError):
            parse_rate(bad)
    assert parse_retry_after("7") == 7
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


async def test_the_limiter_snaps_to_a_cap_cuts_overloads_once_and_climbs_back():
    from bulkfetch.fetch import Slot

    limiter = AdaptiveLimiter(16, minimum=2)
    slots = [await limiter.acquire() for _ in range(16)]
    assert [s.in_flight for s in slots] == list(range(16))
    # A burst against an archive capping at 6: the first six are served, the rest refused.
    for slot in slots[:6]:
        limiter.accepted(slot)
    for slot in slots[6:]:
        limiter.congestion(slot, retry_after=0.0)
    assert limiter.limit == 6  # snapped to the cap, not halved again and again
    for _ in range(16):
        limiter.release()
    # Refused at a level that worked before: an overload, cut to 3/4 once per event.
    again = [await limiter.acquire() for _ in range(6)]
    for slot in again:
        limiter.congestion(slot, retry_after=0.0)
    assert limiter.limit == 4  # one cut (6 -> 4), though six requests reported it
    for _ in range(6):
        limiter.release()
    # Additive increase: one more slot per `limit` successes while the limit is in use...
    held = [await limiter.acquire() for _ in range(limiter.limit)]
    for _ in range(4):
        limiter.success()
    assert limiter.limit == 5 and len(held) == 4
    # ...and none while it is not: an idle client learns nothing about the archive.
    for _ in range(len(held)):
        limiter.release()
    for _ in range(50):
        limiter.success()
    assert limiter.limit == 5 and limiter.lowest == 4
    # Repeated overload drives it down geometrically, never below the minimum.
    for _ in range(20):
        limiter.congestion(Slot(math.inf, 0), None)  # each from a request after the last cut
    assert limiter.limit == 2
