"""The job state: every planned product, its status, and what is known about its bytes.

The engine and the planner see only the :class:`JobStore` interface below, never SQL. SQLite in
``DIR/.bulkfetch/state.sqlite`` is the embedded default (:class:`SQLiteStore`); a PostgreSQL store
with ``FOR UPDATE SKIP LOCKED`` leases is the planned second implementation, for several hosts
working through one job, and must slot in without touching the engine.

Statuses: ``pending`` (to do, possibly with a ``.part`` on disk), ``active`` (leased by a
worker), ``done`` (verified and under its final name), ``error`` (permanent failure, or retries
exhausted). A crash leaves rows ``active``; :meth:`JobStore.recover` returns them to ``pending``.

Decisions of the SQLite store, in short (details on :class:`SQLiteStore`): a ``uri`` is planned
once (re-adding is a no-op); two uris that would land on one ``local_path`` are refused with a
:class:`~bulkfetch.errors.StateError` naming both, and the whole ``add_products`` call is rolled
back; fetch-side updates are committed in batches, so a kill -9 loses at most the last ~0.5 s of
bookkeeping, never consistency; one fetching process per directory, enforced with ``flock``.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import math
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import orjson

from .errors import StateError

PENDING = "pending"
ACTIVE = "active"
DONE = "done"
ERROR = "error"
STATUSES = (PENDING, ACTIVE, DONE, ERROR)


@dataclass(frozen=True)
class PlannedProduct:
    """One product row as the planner hands it to the store. ``uri`` (dataURI) is the key."""

    uri: str
    url: str
    local_path: str  # relative to DIR, POSIX separators
    size: int | None
    obs_collection: str
    obs_id: str
    product_filename: str
    sector: int | None = None
    kind: str = ""  # productSubGroupDescription, e.g. "LC"
    extra: dict[str, Any] = field(default_factory=dict)  # other product columns, JSON-able


@dataclass(frozen=True)
class WorkItem:
    """A leased product, what a worker needs to download it."""

    uri: str
    url: str
    local_path: str
    size: int | None
    attempts: int
    sha256: str | None = None  # known digest, if the table or an earlier run gave one


@dataclass
class ProductRecord:
    """A full row, for reports (manifest, status, verify)."""

    uri: str
    url: str
    local_path: str
    size: int | None
    obs_collection: str
    obs_id: str
    product_filename: str
    sector: int | None
    kind: str
    status: str
    bytes_done: int
    sha256: str | None
    attempts: int
    message: str | None
    http_status: int | None
    started_at: float | None
    finished_at: float | None
    extra: dict[str, Any]


class JobStore(Protocol):
    """What the planner, the engine and the reports need from a job state."""

    # -- planning ---------------------------------------------------------------------------
    def add_products(self, rows: Iterable[PlannedProduct]) -> int:
        """Insert rows whose uri is new; return how many were new. Existing rows are untouched."""

    def is_unit_planned(self, unit: str) -> bool:
        """Whether a planning unit (e.g. ``"sector:1|lc"``) was completed before."""

    def mark_unit_planned(self, unit: str, rows: int) -> None:
        """Record that a planning unit finished, with how many rows it produced."""

    def get_meta(self, key: str, default: str | None = None) -> str | None: ...

    def set_meta(self, key: str, value: str) -> None: ...

    # -- fetching ---------------------------------------------------------------------------
    def recover(self) -> int:
        """Return rows left ``active`` by a crashed run to ``pending``; return how many."""

    def claim(self, n: int, worker: str = "") -> list[WorkItem]:
        """Lease up to ``n`` pending rows (pending -> active), oldest first."""

    def record_progress(self, uri: str, bytes_done: int) -> None:
        """Remember how many bytes of ``uri`` are on disk (batched, may be lost in a crash)."""

    def finish(self, uri: str, size: int, sha256: str) -> None:
        """Mark ``uri`` done with its verified size and digest."""

    def fail(self, uri: str, message: str, *, retry: bool, http_status: int | None = None) -> None:
        """Count an attempt. ``retry``: back to pending; otherwise the row ends in ``error``."""

    def release(self, uri: str) -> None:
        """Give a leased row back as pending without counting an attempt (interrupt, shutdown)."""

    def reset(self, uris: Iterable[str], message: str | None = None) -> int:
        """Return rows (done or error) to pending, e.g. after ``verify`` found them damaged."""

    def drop_unfinished(self, uris: Iterable[str]) -> int:
        """Remove rows not downloaded (pending or error) that a plan no longer wants."""

    def flush(self) -> None:
        """Commit whatever is batched."""

    # -- reporting --------------------------------------------------------------------------
    def counts(self) -> dict[str, tuple[int, int]]:
        """Per status: (number of rows, sum of expected sizes)."""

    def iter_records(
        self, status: str | None = None, batch: int = 10_000, kinds: Iterable[str] | None = None
    ) -> Iterator[ProductRecord]:
        """Every row (or those with ``status`` / of ``kinds``), streamed in ``batch`` chunks."""

    def error_groups(self, limit: int = 20) -> list[tuple[str, int]]:
        """Error messages with how many rows carry each, most frequent first."""

    def close(self) -> None: ...

    # -- added with SQLiteStore: locking and plan summaries --------------------------------
    def acquire_lock(self) -> None:
        """Become the only process fetching into this job; raise StateError naming the holder."""

    def release_lock(self) -> None:
        """Give the runner lock up (no-op if not held)."""

    def total(self) -> tuple[int, int]:
        """(rows, sum of expected sizes) over the whole job."""

    def sector_summary(self) -> list[tuple[int | None, int, int]]:
        """Per sector: (sector, rows, sum of expected sizes), for ``plan --dry-run``."""


# ------------------------------------------------------------------------------------------------
# SQLite implementation
# ------------------------------------------------------------------------------------------------

#: Bumped whenever the schema changes; stored in ``PRAGMA user_version``.
SCHEMA_VERSION = 1

#: Where the job state lives under DIR.
STATE_DIRNAME = ".bulkfetch"
DB_FILENAME = "state.sqlite"
LOCK_FILENAME = "lock"

#: Batched fetch-side writes are committed after this many operations ...
COMMIT_EVERY_OPS = 500
#: ... or once the oldest uncommitted operation is this old (seconds), whichever comes first.
COMMIT_EVERY_SECONDS = 0.5
#: How long a writer waits for another connection's write lock before giving up (ms).
BUSY_TIMEOUT_MS = 30_000
#: SQLite page size of a new DB, and page cache per connection (KiB; bounded, not per row).
PAGE_SIZE = 16_384
CACHE_KIB = 32_768
#: Rows per executemany chunk in add_products: big transactions, bounded memory.
ADD_CHUNK = 50_000

_log = logging.getLogger("bulkfetch")

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS products (
    id INTEGER PRIMARY KEY,             -- insertion order, the order claim hands rows out in
    uri TEXT NOT NULL UNIQUE,
    url TEXT NOT NULL,
    local_path TEXT NOT NULL UNIQUE,    -- two products may never share one file on disk
    size INTEGER,
    obs_collection TEXT NOT NULL,
    obs_id TEXT NOT NULL,
    product_filename TEXT NOT NULL,
    sector INTEGER,
    kind TEXT NOT NULL DEFAULT '',
    extra TEXT NOT NULL DEFAULT '{{}}',  -- JSON
    -- no CHECK (status IN ...): it cost ~30% of bulk-insert speed, and only this module
    -- writes statuses, always from the constants above
    status TEXT NOT NULL DEFAULT '{PENDING}',
    bytes_done INTEGER NOT NULL DEFAULT 0,
    sha256 TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    message TEXT,
    http_status INTEGER,
    started_at REAL,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS products_status_id ON products (status, id);
CREATE TABLE IF NOT EXISTS units (
    unit TEXT PRIMARY KEY,
    rows INTEGER NOT NULL,
    planned_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


class _Operation:
    """``with store._op:`` one public store call: serialised, on an open store, and with any
    sqlite3 error turned into a :class:`StateError` (a plain class, not @contextmanager: this
    wraps every engine call, so it should cost next to nothing)."""

    __slots__ = ("_store",)

    def __init__(self, store: SQLiteStore) -> None:
        self._store = store

    def __enter__(self) -> None:
        self._store._mutex.acquire()
        if self._store._closed:
            self._store._mutex.release()
            self._store._check_open()

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        try:
            if isinstance(exc, sqlite3.Error):
                raise self._store._failed(exc) from exc
        finally:
            self._store._mutex.release()


#: id, then ProductRecord's fields in declaration order (see _record).
_RECORD_COLUMNS = (
    "id, uri, url, local_path, size, obs_collection, obs_id, product_filename, sector, kind, "
    "status, bytes_done, sha256, attempts, message, http_status, started_at, finished_at, extra"
)


def state_dir(root: str | os.PathLike[str]) -> Path:
    """``DIR/.bulkfetch``: the job state's directory (database and lock file)."""
    return Path(root) / STATE_DIRNAME


def db_path(root: str | os.PathLike[str]) -> Path:
    """``DIR/.bulkfetch/state.sqlite``."""
    return state_dir(root) / DB_FILENAME


def open_store(root: str | os.PathLike[str], *, create: bool = True) -> SQLiteStore:
    """Open (and with ``create``, make) the job state of the download directory ``root``.

    Without ``create`` a missing state is an error that tells the user to plan first, because
    every command but ``plan`` is meaningless on a directory that was never planned.
    """
    return SQLiteStore(root, create=create)


class SQLiteStore:
    """The embedded job state: one SQLite file in WAL mode, written by one process at a time.

    sqlite3 directly rather than an ORM: the hot paths (claim, batched updates, keyset scans)
    are a handful of statements whose exact SQL and transaction boundaries matter.

    Durability model. Planning calls (``add_products``, ``mark_unit_planned``, ``set_meta``,
    ``reset``) commit before returning. Fetch-side calls (``claim``, ``record_progress``,
    ``finish``, ``fail``, ``release``) run inside one open write transaction that is committed
    every :data:`COMMIT_EVERY_OPS` operations or :data:`COMMIT_EVERY_SECONDS` seconds, whichever
    comes first (checked on each call; ``flush()`` forces it, ``close()`` flushes), so no call
    pays for a commit of its own. ``synchronous=NORMAL`` in WAL mode never corrupts the file; a
    kill -9 or power cut loses at most the uncommitted batch. What that costs is harmless:

    * a lost ``claim`` leaves the row ``pending`` (or ``active`` if committed), and
      :meth:`recover` at the start of every run turns ``active`` back into ``pending``; with a
      single runner (see :meth:`acquire_lock`) no other process can be holding that lease, so a
      claim does not need its own durable commit;
    * a lost ``finish`` leaves a verified file under its final name that the state still calls
      pending; the engine re-adopts it by checksum instead of downloading it again;
    * a lost ``record_progress`` only understates what a ``.part`` holds; the engine trusts the
      file's length on disk, not this number.

    Progress reports are coalesced in memory (only the last byte count per uri matters) and
    written at commit time, so a chatty worker does not cost one UPDATE per chunk.

    Every method takes an internal lock, so the planner's worker threads and the engine's event
    loop thread may share one store; the calls are short, none waits on the network.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        create: bool = True,
        commit_every_ops: int = COMMIT_EVERY_OPS,
        commit_every_seconds: float = COMMIT_EVERY_SECONDS,
        busy_timeout_ms: int = BUSY_TIMEOUT_MS,
    ) -> None:
        self.root = Path(root)
        self.busy_timeout_ms = busy_timeout_ms
        self.commit_every_ops = commit_every_ops
        self.commit_every_seconds = commit_every_seconds
        self.path = db_path(root)
        self._mutex = threading.RLock()
        self._in_tx = False
        self._tx_ops = 0
        self._tx_started = 0.0
        self._progress: dict[str, int] = {}
        self._lock_fd: int | None = None
        self._closed = False
        self._op = _Operation(self)
        self._conn = self._connect(create)

    # -- opening ----------------------------------------------------------------------------
    def _connect(self, create: bool) -> sqlite3.Connection:
        """Open the DB, check that it is ours and writable, and bring the schema up to date."""
        where = str(self.root)
        if not self.path.exists():
            if not create:
                raise StateError(f"no bulkfetch job in {where}: run 'bulkfetch plan {where}' first")
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StateError(
                    f"cannot create the job state in {self.path.parent}: {exc.strerror or exc}"
                ) from exc
        try:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves, batching many calls per
            # transaction; check_same_thread=False: our own RLock serialises access instead.
            conn = sqlite3.connect(
                str(self.path),
                isolation_level=None,
                check_same_thread=False,
                timeout=self.busy_timeout_ms / 1000,
            )
        except sqlite3.Error as exc:
            raise StateError(f"cannot open the job state {self.path}: {exc}") from exc
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
            # Bigger pages and a bounded 32 MiB cache: ~40% faster bulk inserts with long uri
            # keys (page_size only takes effect on a new, still empty DB, before WAL).
            conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")
            conn.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StateError(
                    f"the job state {self.path} cannot use WAL journaling (got {mode!r}); "
                    "is the directory on a network file system?"
                )
            conn.execute("PRAGMA synchronous = NORMAL")
            self._migrate(conn)
        except sqlite3.Error as exc:
            conn.close()
            raise StateError(_explain_open_error(self.path, exc)) from exc
        except BaseException:
            conn.close()
            raise
        return conn

    def _migrate(self, conn: sqlite3.Connection) -> None:
        """Create the schema in a new DB; refuse one written by a newer bulkfetch.

        An up-to-date DB is opened without taking the write lock, so ``bulkfetch status`` never
        waits for a running fetch's open batch; writability is checked with ``os.access``
        instead, to fail now with a clear message rather than at the first write.
        """
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version == SCHEMA_VERSION:
            for target in (self.path, self.path.parent):
                if not os.access(target, os.W_OK):
                    raise StateError(
                        f"cannot write the job state {self.path} ({target} is read-only): "
                        "check the directory's permissions"
                    )
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]  # may have changed
            if version > SCHEMA_VERSION:
                raise StateError(
                    f"the job state {self.path} has schema version {version}, newer than this "
                    f"bulkfetch understands ({SCHEMA_VERSION}): upgrade bulkfetch"
                )
            if version == 0:
                has_tables = conn.execute(
                    "SELECT count(*) FROM sqlite_master WHERE type = 'table'"
                ).fetchone()[0]
                if has_tables:
                    raise StateError(f"{self.path} is an SQLite file but not a bulkfetch job state")
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                _log.debug("created job state %s (schema %d)", self.path, SCHEMA_VERSION)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    # -- transactions -----------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise StateError(f"the job state {self.path} is closed")

    def _failed(self, exc: sqlite3.Error) -> StateError:
        """Turn an SQLite failure mid-operation (disk full, I/O error, locked) into one line."""
        self._in_tx = self._conn.in_transaction  # SQLite may have rolled the batch back itself
        if not self._in_tx:
            self._tx_ops = 0
        text = str(exc)
        if "locked" in text or "busy" in text:
            hint = "another process is writing to it"
        elif "full" in text:
            hint = "the disk is full"
        elif "readonly" in text:
            hint = "check the directory's permissions"
        else:
            hint = "the file may be damaged; 'bulkfetch verify' can rebuild trust in the files"
        return StateError(f"job state {self.path}: {text} ({hint})")

    def _begin(self) -> None:
        """Start the batch transaction if none is open (IMMEDIATE: take the write lock now)."""
        if not self._in_tx:
            self._conn.execute("BEGIN IMMEDIATE")
            if not self._progress:  # else the batch already began with a progress report
                self._tx_started = time.monotonic()
            self._in_tx = True
            self._tx_ops = 0

    def _commit(self) -> None:
        """Write coalesced progress and commit the batch transaction, if any."""
        if self._progress:
            self._begin()
            self._conn.executemany(
                "UPDATE products SET bytes_done = ? WHERE uri = ? AND status IN (?, ?)",
                [(n, uri, PENDING, ACTIVE) for uri, n in self._progress.items()],
            )
            self._progress.clear()
        if self._in_tx:
            self._conn.execute("COMMIT")
            self._in_tx = False
            self._tx_ops = 0

    def _batched(self) -> None:
        """Count one fetch-side operation; commit when the batch is big or old enough."""
        self._tx_ops += 1
        self._due()

    def _due(self) -> None:
        """Commit if the batch holds enough operations or has waited long enough."""
        if (
            self._tx_ops + len(self._progress) >= self.commit_every_ops
            or time.monotonic() - self._tx_started >= self.commit_every_seconds
        ):
            self._commit()

    def flush(self) -> None:
        """Commit whatever is batched."""
        with self._op:
            self._commit()

    def close(self) -> None:
        """Flush, release the runner lock if we hold it, and close the DB. Idempotent."""
        with self._mutex:
            if self._closed:
                return
            try:
                self._commit()
            except sqlite3.Error as exc:
                raise self._failed(exc) from exc
            finally:
                self._closed = True
                self._conn.close()
                self.release_lock()

    def __enter__(self) -> SQLiteStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the single-runner lock -------------------------------------------------------------
    def acquire_lock(self) -> None:
        """Become the only process fetching into this directory, until :meth:`release_lock`.

        An exclusive ``flock`` on ``DIR/.bulkfetch/lock``: the kernel drops it when the process
        dies, even by kill -9, so a crash never leaves a stale lock behind. The holder's pid is
        written into the file so the refusal can name it.
        """
        with self._mutex:
            if self._lock_fd is not None:
                return
            lock_path = state_dir(self.root) / LOCK_FILENAME
            try:
                fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise StateError(f"cannot open the lock file {lock_path}: {exc.strerror}") from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                try:
                    holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
                finally:
                    os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise StateError(
                        f"another bulkfetch is already working on {self.root} (pid {holder})"
                    ) from exc
                raise StateError(f"cannot lock {lock_path}: {exc.strerror}") from exc
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
            self._lock_fd = fd

    def release_lock(self) -> None:
        """Give up the runner lock (no-op if not held)."""
        with self._mutex:
            fd, self._lock_fd = self._lock_fd, None
            if fd is None:
                return
            try:
                os.ftruncate(fd, 0)
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)

    def lock_holder(self) -> int | None:
        """The pid of the process holding the runner lock right now (maybe us), or ``None``.

        Probes with a fresh descriptor and a shared, non-blocking ``flock``, never taking the
        lock for longer than the probe. ``-1`` if it is held but the pid is not (yet) written.
        """
        lock_path = state_dir(self.root) / LOCK_FILENAME
        try:
            fd = os.open(lock_path, os.O_RDONLY)
        except OSError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
                return int(text) if text.isdigit() else -1
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    @contextmanager
    def locked(self) -> Iterator[SQLiteStore]:
        """``with store.locked():`` hold the runner lock for the block."""
        self.acquire_lock()
        try:
            yield self
        finally:
            self.release_lock()

    # -- planning ---------------------------------------------------------------------------
    def add_products(self, rows: Iterable[PlannedProduct]) -> int:
        """Insert rows whose uri is new; return how many were new. Existing rows are untouched.

        Rows go in with executemany in chunks of :data:`ADD_CHUNK`, all in one transaction, so a
        call is atomic: either every new row is planned or (on error) none is. The write lock
        is held while ``rows`` is consumed, so pass rows already fetched, not a generator that
        waits on the network.

        A row whose ``local_path`` is already taken by a *different* uri is refused with
        :class:`StateError` naming both uris, and nothing from the call is kept: silently
        keeping one of them would leave the user believing both products were downloaded.
        """
        with self._op:
            self._commit()
            before = self._conn.total_changes
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                chunk: list[tuple[Any, ...]] = []
                for row in rows:
                    chunk.append(_product_params(row))
                    if len(chunk) >= ADD_CHUNK:
                        self._insert_chunk(chunk)
                        chunk = []
                if chunk:
                    self._insert_chunk(chunk)
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            return self._conn.total_changes - before

    # OR IGNORE rather than ON CONFLICT (uri) DO NOTHING: measured ~25% faster here. It also
    # swallows a local_path clash, so a short chunk is checked for that on the slow path.
    _INSERT_SQL = (
        "INSERT OR IGNORE INTO products (uri, url, local_path, size, obs_collection, obs_id, "
        "product_filename, sector, kind, extra) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    )

    def _insert_chunk(self, chunk: list[tuple[Any, ...]]) -> None:
        """executemany one chunk; refuse it if a row lost its local_path to another uri."""
        before = self._conn.total_changes
        self._conn.executemany(self._INSERT_SQL, chunk)
        if self._conn.total_changes - before < len(chunk):
            self._check_clashes(chunk)

    def _check_clashes(self, chunk: list[tuple[Any, ...]]) -> None:
        """Raise if a row of ``chunk`` was ignored for its local_path rather than its uri.

        Rows ignored because their uri is already planned are the normal re-planning case. A
        row whose uri is still absent after the insert can only have lost to another uri that
        holds the same local_path.
        """
        for params in chunk:
            uri, local_path = params[0], params[2]
            if self._conn.execute("SELECT 1 FROM products WHERE uri = ?", (uri,)).fetchone():
                continue
            hit = self._conn.execute(
                "SELECT uri FROM products WHERE local_path = ?", (local_path,)
            ).fetchone()
            other = hit[0] if hit else "another product"
            raise StateError(
                f"two products would be saved as {local_path}: {other} and {uri}; "
                "nothing from this batch was planned (a flat layout cannot hold both)"
            )

    def is_unit_planned(self, unit: str) -> bool:
        """Whether a planning unit (e.g. ``"sector:1|lc"``) was completed before."""
        with self._op:
            hit = self._conn.execute("SELECT 1 FROM units WHERE unit = ?", (unit,)).fetchone()
            return hit is not None

    def mark_unit_planned(self, unit: str, rows: int) -> None:
        """Record that a planning unit finished, with how many rows it produced (committed)."""
        with self._op:
            self._begin()
            self._conn.execute(
                "INSERT INTO units (unit, rows, planned_at) VALUES (?, ?, ?) "
                "ON CONFLICT (unit) DO UPDATE SET rows = excluded.rows, "
                "planned_at = excluded.planned_at",
                (unit, int(rows), time.time()),
            )
            self._commit()

    def planned_units(self) -> list[tuple[str, int]]:
        """Every completed planning unit with its row count, in name order."""
        with self._op:
            return [
                (str(u), int(n))
                for u, n in self._conn.execute("SELECT unit, rows FROM units ORDER BY unit")
            ]

    def get_meta(self, key: str, default: str | None = None) -> str | None:
        """A job-wide setting (layout, selection, ...) recorded by ``set_meta``."""
        with self._op:
            hit = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
            return default if hit is None else str(hit[0])

    def set_meta(self, key: str, value: str) -> None:
        """Record a job-wide setting (committed)."""
        with self._op:
            self._begin()
            self._conn.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, str(value)),
            )
            self._commit()

    # -- fetching ---------------------------------------------------------------------------
    def recover(self) -> int:
        """Return rows left ``active`` by a crashed run to ``pending``; return how many.

        Attempts are not counted: a crash says nothing about the product.
        """
        with self._op:
            self._begin()
            cur = self._conn.execute(
                "UPDATE products SET status = ? WHERE status = ?", (PENDING, ACTIVE)
            )
            self._commit()
            if cur.rowcount:
                _log.info("recovered %d interrupted downloads as pending", cur.rowcount)
            return cur.rowcount

    def claim(self, n: int, worker: str = "") -> list[WorkItem]:
        """Lease up to ``n`` pending rows (pending -> active), oldest first.

        Uses the (status, id) index: O(log n + k) however many rows are already done. The lease
        rides in the current batch (see the class docstring for why that is safe). ``worker`` is
        accepted for interface compatibility; a single runner has no use for it.
        """
        if n <= 0:
            return []
        with self._op:
            self._begin()
            rows = self._conn.execute(
                "SELECT id, uri, url, local_path, size, attempts, sha256 FROM products "
                "WHERE status = ? ORDER BY id LIMIT ?",
                (PENDING, int(n)),
            ).fetchall()
            if rows:
                # The rows just read are exactly the pending ones up to the last id (same
                # transaction), so one range UPDATE over the index leases them all.
                self._conn.execute(
                    "UPDATE products SET status = ?, started_at = ? WHERE status = ? AND id <= ?",
                    (ACTIVE, time.time(), PENDING, rows[-1][0]),
                )
            self._batched()
            return [
                WorkItem(uri=r[1], url=r[2], local_path=r[3], size=r[4], attempts=r[5], sha256=r[6])
                for r in rows
            ]

    def record_progress(self, uri: str, bytes_done: int) -> None:
        """Remember how many bytes of ``uri`` are on disk (batched, may be lost in a crash)."""
        with self._op:
            if not self._in_tx and not self._progress:
                self._tx_started = time.monotonic()  # this report opens a new batch
            self._progress[uri] = int(bytes_done)
            self._due()

    def finish(self, uri: str, size: int, sha256: str) -> None:
        """Mark ``uri`` done with its verified size and digest.

        An unknown expected size is filled in with the verified one so totals become exact.
        """
        with self._op:
            self._progress.pop(uri, None)
            self._begin()
            self._conn.execute(
                "UPDATE products SET status = ?, bytes_done = ?, size = coalesce(size, ?), "
                "sha256 = ?, finished_at = ?, message = NULL, http_status = NULL WHERE uri = ?",
                (DONE, int(size), int(size), sha256, time.time(), uri),
            )
            self._batched()

    def fail(self, uri: str, message: str, *, retry: bool, http_status: int | None = None) -> None:
        """Count an attempt. ``retry``: back to pending; otherwise the row ends in ``error``.

        The message is kept either way, so ``status`` can say why a pending row is still pending.
        """
        with self._op:
            self._progress.pop(uri, None)
            self._begin()
            if retry:
                self._conn.execute(
                    "UPDATE products SET status = ?, attempts = attempts + 1, message = ?, "
                    "http_status = ? WHERE uri = ?",
                    (PENDING, message, http_status, uri),
                )
            else:  # finished_at: when the row reached its final status
                self._conn.execute(
                    "UPDATE products SET status = ?, attempts = attempts + 1, message = ?, "
                    "http_status = ?, finished_at = ? WHERE uri = ?",
                    (ERROR, message, http_status, time.time(), uri),
                )
            self._batched()

    def release(self, uri: str) -> None:
        """Give a leased row back as pending without counting an attempt (interrupt, shutdown)."""
        with self._op:
            flushed = self._progress.pop(uri, None)
            self._begin()
            if flushed is not None:
                self._conn.execute(
                    "UPDATE products SET bytes_done = ? WHERE uri = ? AND status = ?",
                    (flushed, uri, ACTIVE),
                )
            self._conn.execute(
                "UPDATE products SET status = ? WHERE uri = ? AND status = ?",
                (PENDING, uri, ACTIVE),
            )
            self._batched()

    def reset(self, uris: Iterable[str], message: str | None = None) -> int:
        """Return rows to pending with a fresh start, e.g. after ``verify`` found them damaged.

        Clears the digest, byte count and attempt counter (a damaged file deserves full
        retries) and stores ``message`` as the reason. Rows currently ``active`` are left alone:
        they belong to a running download. Committed before returning; returns how many rows
        changed.
        """
        return self._each_uri(
            uris,
            "UPDATE products SET status = ?, sha256 = NULL, bytes_done = 0, attempts = 0, "
            "message = ?, http_status = NULL, started_at = NULL, finished_at = NULL "
            "WHERE uri = ? AND status != ?",
            lambda uri: (PENDING, message, uri, ACTIVE),
        )

    def drop_unfinished(self, uris: Iterable[str]) -> int:
        """Remove rows not downloaded (``pending`` or ``error``) from the job; return how many.

        For rows a plan no longer wants, e.g. an older DV run that a newer one supersedes.
        ``done`` rows stay (their files are the user's and the manifest keeps listing them)
        and ``active`` rows belong to a running download. Committed before returning.
        """
        return self._each_uri(
            uris,
            "DELETE FROM products WHERE uri = ? AND status IN (?, ?)",
            lambda uri: (uri, PENDING, ERROR),
        )

    def _each_uri(
        self, uris: Iterable[str], sql: str, params: Callable[[str], tuple[Any, ...]]
    ) -> int:
        """Run ``sql`` for every uri in one transaction; return the rows it changed.

        Also forgets the uris' batched progress, which would otherwise be written back.
        """
        with self._op:
            self._begin()
            before = self._conn.total_changes
            batch: list[tuple[Any, ...]] = []
            for uri in uris:
                self._progress.pop(uri, None)
                batch.append(params(uri))
                if len(batch) >= ADD_CHUNK:
                    self._conn.executemany(sql, batch)
                    batch = []
            if batch:
                self._conn.executemany(sql, batch)
            changed = self._conn.total_changes - before
            self._commit()
            return changed

    # -- reporting --------------------------------------------------------------------------
    def counts(self) -> dict[str, tuple[int, int]]:
        """Per status (every status present, zeros included): (rows, sum of expected sizes)."""
        with self._op:
            self._commit()
            out = {s: (0, 0) for s in STATUSES}
            for status, n, nbytes in self._conn.execute(
                "SELECT status, count(*), coalesce(sum(size), 0) FROM products GROUP BY status"
            ):
                out[str(status)] = (int(n), int(nbytes))
            return out

    def total(self) -> tuple[int, int]:
        """(rows, sum of expected sizes) over the whole job."""
        with self._op:
            n, nbytes = self._conn.execute(
                "SELECT count(*), coalesce(sum(size), 0) FROM products"
            ).fetchone()
            return int(n), int(nbytes)

    def sector_summary(self) -> list[tuple[int | None, int, int]]:
        """Per sector, ascending (unknown sector last): (sector, rows, sum of expected sizes)."""
        with self._op:
            rows = self._conn.execute(
                "SELECT sector, count(*), coalesce(sum(size), 0) FROM products GROUP BY sector "
                "ORDER BY sector IS NULL, sector"
            ).fetchall()
            return [(None if s is None else int(s), int(n), int(b)) for s, n, b in rows]

    def get_record(self, uri: str) -> ProductRecord | None:
        """One full row by uri, or ``None``."""
        with self._op:
            self._commit()
            row = self._conn.execute(
                f"SELECT {_RECORD_COLUMNS} FROM products WHERE uri = ?", (uri,)
            ).fetchone()
            return None if row is None else _record(row)

    def iter_records(
        self, status: str | None = None, batch: int = 10_000, kinds: Iterable[str] | None = None
    ) -> Iterator[ProductRecord]:
        """Every row (or those with ``status`` / of ``kinds``) in insertion order, in batches.

        Keyset pagination (``id > last``) rather than one open cursor: memory stays at one batch
        whatever the job size, and no read cursor is held open across the caller's work, so the
        caller may update the store (e.g. ``reset``) while iterating. ``kinds`` are
        ``productSubGroupDescription`` values (``PlannedProduct.kind``).
        """
        if status is not None and status not in STATUSES:
            raise ValueError(f"unknown status {status!r}; expected one of {', '.join(STATUSES)}")
        batch = max(1, int(batch))
        where: list[str] = []
        fixed: list[Any] = []
        if kinds is not None:
            wanted = sorted(set(kinds))
            if not wanted:
                return
            where.append(f"kind IN ({', '.join('?' * len(wanted))})")
            fixed += wanted
        if status is not None:
            where.append("status = ?")
            fixed.append(status)
        where.append("id > ?")
        sql = (
            f"SELECT {_RECORD_COLUMNS} FROM products WHERE {' AND '.join(where)} "
            "ORDER BY id LIMIT ?"
        )
        last = 0
        while True:
            with self._op:
                self._commit()
                rows = self._conn.execute(sql, (*fixed, last, batch)).fetchall()
            for row in rows:
                yield _record(row)
            if len(rows) < batch:
                return
            last = rows[-1][0]

    def error_groups(self, limit: int = 20) -> list[tuple[str, int]]:
        """Error messages with how many ``error`` rows carry each, most frequent first."""
        with self._op:
            self._commit()
            rows = self._conn.execute(
                "SELECT coalesce(message, ''), count(*) AS n FROM products WHERE status = ? "
                "GROUP BY message ORDER BY n DESC, message LIMIT ?",
                (ERROR, int(limit)),
            ).fetchall()
            return [(str(m), int(n)) for m, n in rows]

    def integrity_check(self) -> str:
        """SQLite's own ``PRAGMA integrity_check`` verdict (``"ok"`` when healthy)."""
        with self._op:
            self._commit()
            return "; ".join(str(r[0]) for r in self._conn.execute("PRAGMA integrity_check"))


#: One reusable encoder: json.dumps with options builds a new encoder per call (slow per row).
_std_encode = json.JSONEncoder(separators=(",", ":"), default=str).encode


def _encode_json(value: dict[str, Any]) -> str:
    """``extra`` as compact JSON (hot: once per planned row).

    orjson is four times faster than the json module here; what it will not encode the same
    way (NaN and infinities, which it would turn into null; integers beyond 64 bits) goes
    through the json module, so a value always reads back as it was written.
    """
    for v in value.values():
        if type(v) is float and not math.isfinite(v):
            return _std_encode(value)
    try:
        return orjson.dumps(value, default=_orjson_default).decode()
    except (TypeError, _NotPlainJSON):
        return _std_encode(value)


class _NotPlainJSON(Exception):
    """A value orjson would encode differently from the json module."""


def _orjson_default(value: Any) -> Any:
    raise _NotPlainJSON


def _product_params(row: PlannedProduct) -> tuple[Any, ...]:
    """The INSERT parameters of one planned product (hot: called once per planned row).

    Sizes and sectors go through ``int()``: astropy tables hand out numpy integers, which
    sqlite3 cannot bind, and numpy floats, which it would store as REAL.
    """
    size = row.size
    sector = row.sector
    extra = row.extra
    return (
        row.uri,
        row.url,
        row.local_path,
        None if size is None else int(size),
        row.obs_collection,
        row.obs_id,
        row.product_filename,
        None if sector is None else int(sector),
        row.kind,
        _encode_json(extra) if extra else "{}",
    )


def _record(row: tuple[Any, ...]) -> ProductRecord:
    """A SELECT of :data:`_RECORD_COLUMNS` as a :class:`ProductRecord`.

    Positional: the column list follows the dataclass's field order (id first, extra last),
    which keeps streaming millions of records cheap.
    """
    extra = row[18]
    return ProductRecord(*row[1:18], json.loads(extra) if extra and extra != "{}" else {})


def _explain_open_error(path: Path, exc: sqlite3.Error) -> str:
    """One line a user can act on, for the ways opening the state DB fails."""
    text = str(exc)
    low = text.lower()
    if "readonly" in low or "read-only" in low or "unable to open" in low:
        return f"cannot write the job state {path} ({text}): check the directory's permissions"
    if "not a database" in low or "malformed" in low:
        return f"{path} is damaged or not a bulkfetch job state ({text})"
    if "locked" in low or "busy" in low:
        return f"the job state {path} is locked by another process ({text})"
    return f"cannot open the job state {path}: {text}"
