"""Planning by query: the scheduler that runs astroquery calls on threads, sector by sector,
and writes each sector to the job state once all of its product batches have answered."""

from __future__ import annotations

import functools
import heapq
import json
import logging
import math
import queue
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ..errors import ArchiveError, UsageError
from ..sources import (
    BATCH_SIZE,
    DEFAULT_MAST_URL,
    MAX_BATCH_SIZE,
    PLAN_WORKERS,
    normalize_server,
    point_astroquery_at,
)
from ..store import JobStore, PlannedProduct
from .archive import (
    _META_DISCOVERY,
    DISCOVERY_MAX_AGE,
    QUERY_TIMEOUT,
    _Astroquery,
    _cached_sectors,
    _discover,
    validate_columns,
)
from .dv import LatestDV, prune_superseded_dv
from .rows import MAX_EXAMPLES, _Refusals, _rows_from_json, rows_from_table
from .selection import DV_SUBGROUPS, PRODUCT_KINDS, Selection, unit_name
from .summary import PlanSummary, _finish_summary

log = logging.getLogger("bulkfetch")

T = TypeVar("T")

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

_META_UNIT = "plan.unit."


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
