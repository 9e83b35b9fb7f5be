"""What scripts and notebooks call: :func:`download_products` and the :class:`Job` object.

``download_products`` has astroquery's call shape (``Observations.download_products``) so a
script can switch by changing one import; underneath it plans the product Table into a job
state in ``download_dir``, runs the concurrent engine, and returns astroquery's manifest
columns first. :class:`Job` exposes the same steps separately - plan, fetch, status, verify,
manifest - for long jobs that are resumed, inspected and repaired over days; the CLI is a thin
shell over it.

Both work from a plain script and from a notebook: when an event loop is already running in
the calling thread (Jupyter), the engine runs on its own loop in a worker thread and the call
blocks, as astroquery's does.

Imports of astroquery and the engine are done inside the functions that need them: ``status``
and ``manifest`` on a job of millions of files should not pay a second of astroquery import.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import threading
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from astropy.table import Table

from .errors import StateError, UsageError
from .layout import resolve_inside
from .manifest import (
    COMPLETE,
    ERROR_STATUS,
    SKIPPED,
    ManifestSummary,
    manifest_table,
    write_manifest,
)
from .progress import Progress, format_bytes, make_progress
from .sources import DEFAULT_MAST_URL, DOWNLOAD_PATH, download_url, normalize_server
from .store import (
    ACTIVE,
    DONE,
    ERROR,
    PENDING,
    ProductRecord,
    SQLiteStore,
    db_path,
    open_store,
)

if TYPE_CHECKING:
    from .fetch import FetchOptions, FetchResult
    from .plan import PlanSummary, Selection

log = logging.getLogger("bulkfetch")

T = TypeVar("T")

#: Meta key under which the engine publishes its current effective concurrency.
META_CONCURRENCY = "fetch.concurrency"
#: Meta key recording the server a job was planned against (used by ``fetch`` when not given).
META_SERVER = "server"

#: Verification levels of :meth:`Job.verify`, cheapest first.
VERIFY_LEVELS = ("size", "sha256", "full")


def astroquery_server() -> str:
    """The server astroquery is pointed at now (config file or ``point_astroquery_at``).

    ``download_products`` follows astroquery's own setting by default, so code that redirected
    astroquery (a mirror, the simulator) downloads from the same place with bulkfetch.
    """
    try:
        from astroquery.mast.discovery_portal import PortalAPI
    except ImportError:  # pragma: no cover - astroquery is a dependency
        return DEFAULT_MAST_URL
    url = str(PortalAPI.MAST_DOWNLOAD_URL)
    if url.endswith(DOWNLOAD_PATH):
        return normalize_server(url[: -len(DOWNLOAD_PATH)])
    return DEFAULT_MAST_URL


# -- status -----------------------------------------------------------------------------------


@dataclass
class JobStatus:
    """A snapshot of a job: counts per state, bytes, whether a fetch runs, errors grouped."""

    directory: str
    files: dict[str, int]
    bytes: dict[str, int]
    total_files: int
    total_bytes: int
    running: bool
    runner_pid: int | None
    concurrency: int | None
    server: str | None
    error_groups: list[tuple[str, int]] = field(default_factory=list)

    @property
    def done_files(self) -> int:
        """Files verified on disk."""
        return self.files.get(DONE, 0)

    @property
    def done_bytes(self) -> int:
        """Bytes of the files verified on disk."""
        return self.bytes.get(DONE, 0)

    @property
    def complete(self) -> bool:
        """Every planned file is on disk and verified (vacuously False for an empty job)."""
        return self.total_files > 0 and self.done_files == self.total_files

    def manifest_counts(self) -> dict[str, int]:
        """The same counts in the manifest's (astroquery's) words."""
        return {
            COMPLETE: self.files.get(DONE, 0),
            ERROR_STATUS: self.files.get(ERROR, 0),
            SKIPPED: self.files.get(PENDING, 0) + self.files.get(ACTIVE, 0),
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``bulkfetch status --json``)."""
        out = asdict(self)
        out["error_groups"] = [{"message": m, "count": n} for m, n in self.error_groups]
        out["manifest"] = self.manifest_counts()
        out["complete"] = self.complete
        return out

    def format(self) -> str:
        """Human-readable lines (``bulkfetch status``)."""
        pct = f" ({100 * self.done_bytes / self.total_bytes:.1f}%)" if self.total_bytes else ""
        lines = [
            f"job {self.directory}" + (f" (server {self.server})" if self.server else ""),
            f"  files: {self.total_files} planned, {self.files.get(DONE, 0)} done, "
            f"{self.files.get(PENDING, 0)} pending, {self.files.get(ACTIVE, 0)} active, "
            f"{self.files.get(ERROR, 0)} error",
            f"  bytes: {format_bytes(self.done_bytes)} of {format_bytes(self.total_bytes)} "
            f"done{pct}",
        ]
        if self.running:
            conc = f", effective concurrency {self.concurrency}" if self.concurrency else ""
            lines.append(f"  running: yes (pid {self.runner_pid or '?'}){conc}")
        else:
            lines.append("  running: no")
        if self.error_groups:
            lines.append("  errors by message:")
            lines.extend(f"    {n:>8}  {m}" for m, n in self.error_groups)
        return "\n".join(lines)


# -- verify -----------------------------------------------------------------------------------


@dataclass
class VerifyReport:
    """What :meth:`Job.verify` found: files checked, and the damaged ones sent back to pending."""

    level: str
    checked: int = 0
    bytes_checked: int = 0
    damaged: list[tuple[str, str]] = field(default_factory=list)  # (uri, first problem)
    elapsed: float = 0.0

    @property
    def ok(self) -> bool:
        """No damaged or missing file."""
        return not self.damaged

    def format(self) -> str:
        """Human summary (``bulkfetch verify``)."""
        head = (
            f"verified {self.checked} complete files ({format_bytes(self.bytes_checked)}, "
            f"level {self.level}) in {self.elapsed:.1f} s: "
        )
        if self.ok:
            return head + "all good"
        lines = [
            head + f"{len(self.damaged)} damaged or missing, returned to pending "
            "(run fetch to repair)"
        ]
        lines.extend(f"  {uri}: {problem}" for uri, problem in self.damaged[:50])
        if len(self.damaged) > 50:
            lines.append(f"  ... and {len(self.damaged) - 50} more")
        return "\n".join(lines)


def _check_record(root: Path, record: ProductRecord, level: str) -> str | None:
    """The first problem of one COMPLETE file at ``level``, or None when it is good."""
    from .verify import verify_file

    try:
        path = resolve_inside(root, record.local_path)
    except UsageError as exc:
        return str(exc)
    problems = verify_file(
        path,
        size=record.size,
        sha256=record.sha256 if level in ("sha256", "full") else None,
        fits=None if level == "full" else False,
    )
    return problems[0] if problems else None


# -- the job ----------------------------------------------------------------------------------


class Job:
    """A download directory and its job state: plan, fetch, status, verify, manifest.

    ``Job("tess")`` opens (or, with ``create``, makes) ``tess/.bulkfetch/state.sqlite``. The
    directory string is kept as given: the manifest's ``Local Path`` is joined onto it, as
    astroquery joins its ``download_dir``.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] = ".",
        *,
        create: bool = True,
        server: str | None = None,
    ) -> None:
        self.directory = os.fspath(directory)
        self.root = Path(self.directory)
        self._create = create
        self._server = normalize_server(server) if server else None
        self._store: SQLiteStore | None = None

    # -- plumbing ---------------------------------------------------------------------------
    @property
    def store(self) -> SQLiteStore:
        """The job state, opened on first use."""
        if self._store is None:
            if self._create:
                self.root.mkdir(parents=True, exist_ok=True)
            self._store = open_store(self.root, create=self._create)
        return self._store

    @property
    def server(self) -> str:
        """The archive this job talks to: the one given, else the one it was planned against,
        else wherever astroquery points (MAST unless its config file redirects it)."""
        if self._server:
            return self._server
        saved = self.store.get_meta(META_SERVER)
        return saved or astroquery_server()

    def close(self) -> None:
        """Flush and close the job state. The Job can be used again (it reopens)."""
        if self._store is not None:
            self._store.close()
            self._store = None

    def __enter__(self) -> Job:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Job({self.directory!r})"

    # -- plan -------------------------------------------------------------------------------
    def plan(
        self,
        selection: Selection | None = None,
        *,
        table: Table | str | os.PathLike[str] | None = None,
        curl_scripts: Sequence[str | os.PathLike[str]] = (),
        flat: bool = False,
        progress: bool | str = False,
        dry_run: bool = False,
        **plan_options: Any,
    ) -> PlanSummary:
        """Add products to the job: from a ``Selection`` (queries MAST), a product ``table``
        (an astropy Table or a file ``read_table`` reads) or MAST ``curl_scripts``.

        Planning is idempotent: products already in the job are left as they are, so planning
        the same selection again after an interrupt only adds what was missing. Returns the
        planner's :class:`~bulkfetch.plan.PlanSummary` (``.format()`` for humans).
        ``plan_options`` go to :func:`bulkfetch.plan.plan` (``workers``, ``batch_size``,
        ``retries``, ``discovery_max_age``: 0 asks the archive again which sectors exist).
        """
        from . import plan as planner

        server = self.server
        given = sum(x is not None and x != () for x in (selection, table, tuple(curl_scripts)))
        if given != 1:
            raise UsageError("plan needs exactly one of: a selection, a table, curl scripts")
        # A dry run of a directory that was never planned creates nothing.
        store: SQLiteStore | None = None
        if not dry_run or db_path(self.root).exists():
            store = self.store
            if not dry_run:
                store.set_meta(META_SERVER, server)
        if selection is not None:
            summary = planner.plan(
                store,
                self.root,
                selection,
                server=server,
                progress=progress,
                dry_run=dry_run,
                **plan_options,
            )
            return summary
        if table is not None:
            if not isinstance(table, Table):
                table = planner.read_table(table)
            return planner.plan_table(
                store, self.root, table, server=server, flat=flat, dry_run=dry_run
            )
        # Curl scripts carry their own URLs; rebuild them only for an explicitly given server.
        return planner.plan_curl_scripts(
            store, self.root, list(curl_scripts), flat=flat, server=self._server, dry_run=dry_run
        )

    # -- fetch ------------------------------------------------------------------------------
    def fetch(
        self,
        options: FetchOptions | None = None,
        *,
        progress: bool | str | Progress = "auto",
        manifest: bool = True,
        handle_signals: bool | None = None,
        retry_errors: bool = True,
        **option_kwargs: Any,
    ) -> FetchResult:
        """Download every pending product; write the manifest at the end, whatever happens.

        With ``retry_errors`` (the default) products that ended in error in an earlier run are
        tried again with a fresh retry budget, as rerunning astroquery would: an archive outage
        that outlasted the retries must not need manual repair. A permanent 404 costs one
        request per run.

        ``options`` or keyword options (``concurrency=16, retries=5, ...``) configure the
        engine. ``progress`` is a :class:`Progress` or a mode for :func:`make_progress`.
        ``handle_signals`` (default: when called from the main thread) turns SIGINT/SIGTERM
        into a graceful stop: downloads in flight are parked, leases returned, and the result's
        ``interrupted_by`` names the signal. From a notebook (a loop already running) the
        engine runs in its own thread and the stop button stops it the same way.

        The runner lock is held from before the engine starts until the manifest is written,
        so a second ``fetch`` into the same directory fails at once instead of racing, and the
        manifest describes the state this run left.
        """
        from .fetch import FetchOptions
        from .fetch import fetch as run_engine

        if options is None:
            options = FetchOptions(**option_kwargs)
        elif option_kwargs:
            options = replace(options, **option_kwargs)
        options.validate()
        if options.token is None:
            # $MAST_API_TOKEN or astroquery's login; the engine decides where it may go.
            from .auth import find_token

            token = find_token()
            if token:
                options = replace(options, token=token)
        if handle_signals is None:
            handle_signals = threading.current_thread() is threading.main_thread()
        store = self.store
        store.acquire_lock()
        try:
            if retry_errors:
                self._retry_errors()
        except BaseException:
            store.release_lock()
            raise
        events = progress if isinstance(progress, Progress) else make_progress(progress)
        stopped_by: BaseException | None = None
        try:
            # We hold the lock already; the engine must not release it under our feet.
            engine_options = replace(options, lock=False)
            result = run_engine(
                store, self.root, engine_options, events, install_signals=handle_signals
            )
        except BaseException as exc:
            stopped_by = exc
            raise
        finally:
            events.close()
            try:
                if manifest:
                    self._final_manifest(stopped_by)
            finally:
                store.release_lock()
        return result

    def _final_manifest(self, stopped_by: BaseException | None) -> None:
        """Write the manifest after a run; never let its failure hide why the run stopped.

        A full or read-only disk stops the engine with a clear error, and then the manifest
        cannot be written either: the user must see the first error, not the second.
        """
        try:
            self.manifest()
        except OSError as exc:
            if stopped_by is None:
                raise StateError(
                    f"cannot write the manifest in {self.directory}: {exc.strerror or exc}"
                ) from exc
            log.warning("could not write the manifest: %s", exc.strerror or exc)

    def _retry_errors(self) -> int:
        """Return every ``error`` row to pending (keeping why it failed last time)."""
        store = self.store
        groups: dict[str, list[str]] = {}
        for record in store.iter_records(status=ERROR):
            groups.setdefault(record.message or "error", []).append(record.uri)
        n = 0
        for message, uris in groups.items():
            n += store.reset(uris, message=f"retrying after an earlier error: {message}")
        if n:
            log.info("%d products that failed in an earlier run are tried again", n)
        return n

    # -- reports ----------------------------------------------------------------------------
    def status(self, *, error_limit: int = 20) -> JobStatus:
        """Counts by state, bytes done and total, whether a fetch is running and with what
        effective concurrency, and error messages grouped."""
        store = self.store
        counts = store.counts()
        pid = store.lock_holder()
        conc_text = store.get_meta(META_CONCURRENCY) if pid is not None else None
        try:
            concurrency = int(conc_text) if conc_text else None
        except ValueError:
            concurrency = None
        return JobStatus(
            directory=self.directory,
            files={k: v[0] for k, v in counts.items()},
            bytes={k: v[1] for k, v in counts.items()},
            total_files=sum(v[0] for v in counts.values()),
            total_bytes=sum(v[1] for v in counts.values()),
            running=pid is not None,
            runner_pid=pid if pid and pid > 0 else None,
            concurrency=concurrency,
            server=store.get_meta(META_SERVER),
            error_groups=store.error_groups(limit=error_limit),
        )

    def verify(
        self, *, level: str = "full", workers: int = 2, batch: int = 256, repair: bool = True
    ) -> VerifyReport:
        """Re-check every COMPLETE file; send damaged or missing ones back to pending.

        ``level``: ``size`` (stat only), ``sha256`` (size and the digest recorded when it was
        downloaded), ``full`` (also the FITS CHECKSUM/DATASUM of every HDU). With ``repair``
        a damaged file is deleted and its row reset, so the next ``fetch`` downloads it again
        instead of trusting (or resuming from) bad bytes. Files are checked ``workers`` at a
        time: hashing releases the GIL, so threads use the cores.
        """
        if level not in VERIFY_LEVELS:
            raise UsageError(
                f"unknown verify level {level!r}: use one of {', '.join(VERIFY_LEVELS)}"
            )
        store = self.store
        # A fetch writing into the directory would race our deletes and resets.
        if repair:
            store.acquire_lock()
        report = VerifyReport(level=level)
        started = time.monotonic()
        try:
            with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
                for chunk in _chunks(store.iter_records(status=DONE, batch=batch), batch):
                    problems = pool.map(lambda r: _check_record(self.root, r, level), chunk)
                    for record, problem in zip(chunk, problems, strict=True):
                        report.checked += 1
                        report.bytes_checked += record.size or 0
                        if problem is None:
                            continue
                        report.damaged.append((record.uri, problem))
                        log.warning("verify: %s", problem)
                        if repair:
                            self._send_back(record, problem)
        finally:
            if repair:
                store.release_lock()
        report.elapsed = time.monotonic() - started
        if repair and report.damaged:
            self.manifest()
        return report

    def _send_back(self, record: ProductRecord, problem: str) -> None:
        """Delete a damaged file and return its row to pending with the reason."""
        try:
            path = resolve_inside(self.root, record.local_path)
            path.unlink(missing_ok=True)
        except (OSError, UsageError) as exc:
            log.warning("verify: could not remove damaged %s: %s", record.local_path, exc)
        self.store.reset([record.uri], message=f"verify: {problem}")

    def manifest(self, output: str | os.PathLike[str] | None = None) -> ManifestSummary:
        """Write the manifest (``DIR/manifest.csv`` and ``.ecsv``, or one ``output`` file),
        streamed from the job state; ``Table.read`` gives it back."""
        return write_manifest(self.store, self.directory, output=output)

    def manifest_table(self, uris: Iterable[str] | None = None) -> Table:
        """The manifest as an in-memory Table: every product, or those of ``uris`` in that
        order (unknown uris are left out)."""
        records = self.store.iter_records()
        if uris is None:
            return manifest_table(records, self.directory)
        order = {u: i for i, u in enumerate(dict.fromkeys(uris))}
        picked: list[ProductRecord | None] = [None] * len(order)
        for record in records:
            i = order.get(record.uri)
            if i is not None:
                picked[i] = record
        return manifest_table((r for r in picked if r is not None), self.directory)


def _chunks(items: Iterable[T], n: int) -> Iterable[list[T]]:
    """``items`` in lists of up to ``n``."""
    chunk: list[T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# -- astroquery's call shape ------------------------------------------------------------------


def download_products(
    products: Any,
    download_dir: str | os.PathLike[str] | None = None,
    flat: bool = False,
    cache: bool = True,
    *,
    curl_flag: bool = False,
    mrp_only: bool = False,
    cloud_only: bool = False,
    verbose: bool = True,
    concurrency: int | None = None,
    retries: int | None = None,
    progress: bool | str | Progress | None = None,
    server: str | None = None,
    options: FetchOptions | None = None,
    **filters: Any,
) -> Table | None:
    """Download a product Table the way ``Observations.download_products`` does, concurrently.

    Same call shape and semantics as astroquery 0.4.11: ``products`` is a product Table (or a
    Row, or obsid(s) whose product lists are fetched), ``filters`` and ``mrp_only`` are applied
    with astroquery's own ``filter_products``, duplicate dataURIs are dropped, files land in
    ``download_dir/mastDownload/<obs_collection>/<obs_id>/`` (or flat), and ``cache=True`` keeps
    files already there. Returns the manifest Table - ``Local Path``, ``Status``, ``Message``,
    ``URL`` first, one row per requested product in the order given - or None (with astroquery's
    ``NoResultsWarning``) when nothing is left to download.

    Differences, on purpose: downloads run ``concurrency`` at a time with retries, resume and
    integrity checks; the job state in ``download_dir/.bulkfetch`` makes a repeated call resume
    instead of starting over; and the full manifest is also written to
    ``download_dir/manifest.csv``/``.ecsv``. ``server`` defaults to wherever astroquery points.
    ``verbose=False`` turns the progress display off unless ``progress`` says otherwise;
    ``cloud_only`` is accepted and ignored (there is no cloud source yet); ``curl_flag`` is
    refused: MAST's curl scripts are what bulkfetch replaces (``--from-curl-script`` reads
    them). Products the planner refuses (a file name that would leave ``download_dir``) are
    listed as ``ERROR`` rows saying so, never silently dropped.
    """
    from astropy.table import Row, vstack
    from astroquery.exceptions import NoResultsWarning
    from astroquery.mast import Observations
    from astroquery.mast import utils as mast_utils

    if curl_flag:
        raise UsageError(
            "curl_flag=True is not supported: bulkfetch downloads the files itself; use "
            "astroquery for a curl script, or plan one with 'bulkfetch plan --from-curl-script'"
        )
    if cloud_only:
        log.info("cloud_only has no effect: bulkfetch downloads from %s", server or "MAST")
    if progress is None:
        progress = "auto" if verbose else False
    if isinstance(products, Row):
        products = Table(products, masked=True)
    if not isinstance(products, Table):
        obsids = [products] if isinstance(products, str) else list(products)
        products = vstack([Observations.get_product_list(oid) for oid in obsids])
    products = Observations.filter_products(products, mrp_only=mrp_only, **filters)
    products = mast_utils.remove_duplicate_products(products, "dataURI")
    if not len(products):
        warnings.warn("No products to download.", NoResultsWarning, stacklevel=2)
        return None

    download_dir = os.fspath(download_dir) if download_dir else "."
    knobs: dict[str, Any] = {}
    if concurrency is not None:
        knobs["concurrency"] = concurrency
    if retries is not None:
        knobs["retries"] = retries
    job = Job(download_dir, server=server or astroquery_server())
    try:
        job.plan(table=products, flat=flat)
        uris = [str(u) for u in products["dataURI"]]
        if not cache:
            _forget(job, uris)
        job.fetch(options, progress=progress, **knobs)
        table = job.manifest_table(uris)
        if len(table) < len(set(uris)):
            table = _with_refused(table, products, download_dir, flat, job.server)
        return table
    finally:
        job.close()


def _with_refused(
    table: Table, products: Table, download_dir: str, flat: bool, server: str
) -> Table:
    """Add an ``ERROR`` row for every requested product the planner refused, in order."""
    present = set(table["dataURI"])
    rows: list[ProductRecord] = []
    for prod in products:
        uri = str(prod["dataURI"])
        if uri in present:
            continue
        name = os.path.basename(str(prod["productFilename"]))
        coll, obs = str(prod["obs_collection"]), str(prod["obs_id"])
        rel = name if flat else f"mastDownload/{coll}/{obs}/{name}"
        rows.append(
            ProductRecord(
                uri=uri,
                url=download_url(server, uri),
                local_path=rel,
                size=None,
                obs_collection=coll,
                obs_id=obs,
                product_filename=str(prod["productFilename"]),
                sector=None,
                kind="",
                status=ERROR,
                bytes_done=0,
                sha256=None,
                attempts=0,
                message="refused by bulkfetch: its catalog path would leave the download "
                "directory or clash with another product (see the log)",
                http_status=None,
                started_at=None,
                finished_at=None,
                extra={},
            )
        )
    extra = manifest_table(rows, download_dir)
    merged = vstack_manifest(table, extra)
    order = {u: i for i, u in enumerate(dict.fromkeys(str(u) for u in products["dataURI"]))}
    merged = merged[sorted(range(len(merged)), key=lambda i: order[str(merged["dataURI"][i])])]
    return merged


def vstack_manifest(a: Table, b: Table) -> Table:
    """Stack two manifest Tables keeping ``Message``/``URL`` as object columns of None."""
    from astropy.table import vstack

    if not len(b):
        return a
    if not len(a):
        return b
    return vstack([a, b], join_type="exact", metadata_conflicts="silent")


def _forget(job: Job, uris: Sequence[str]) -> None:
    """``cache=False``: delete the files of ``uris`` and return them to pending."""
    wanted = set(uris)
    done: list[str] = []
    for record in job.store.iter_records():
        if record.uri not in wanted:
            continue
        try:
            resolve_inside(job.root, record.local_path).unlink(missing_ok=True)
        except OSError as exc:
            raise StateError(f"cannot remove {record.local_path} for cache=False: {exc}") from exc
        if record.status in (DONE, ERROR):
            done.append(record.uri)
    if done:
        job.store.reset(done, message="cache=False: downloading again")


def status_json(status: JobStatus) -> str:
    """``status`` as indented JSON text."""
    return json.dumps(status.to_dict(), indent=2, sort_keys=False)


__all__ = [
    "Job",
    "JobStatus",
    "VerifyReport",
    "download_products",
    "astroquery_server",
    "status_json",
    "VERIFY_LEVELS",
]
