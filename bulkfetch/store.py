"""The job state: every planned product, its status, and what is known about its bytes.

The engine and the planner see only the :class:`JobStore` interface below, never SQL. SQLite in
``DIR/.bulkfetch/state.sqlite`` is the embedded default (:class:`SQLiteStore`); a PostgreSQL store
with ``FOR UPDATE SKIP LOCKED`` leases is the planned second implementation, for several hosts
working through one job, and must slot in without touching the engine.

Statuses: ``pending`` (to do, possibly with a ``.part`` on disk), ``active`` (leased by a
worker), ``done`` (verified and under its final name), ``error`` (permanent failure, or retries
exhausted). A crash leaves rows ``active``; :meth:`JobStore.recover` returns them to ``pending``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

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

    def flush(self) -> None:
        """Commit whatever is batched."""

    # -- reporting --------------------------------------------------------------------------
    def counts(self) -> dict[str, tuple[int, int]]:
        """Per status: (number of rows, sum of expected sizes)."""

    def iter_records(
        self, status: str | None = None, batch: int = 10_000
    ) -> Iterator[ProductRecord]:
        """Every row (or those with ``status``), streamed in ``batch``-sized chunks."""

    def error_groups(self, limit: int = 20) -> list[tuple[str, int]]:
        """Error messages with how many rows carry each, most frequent first."""

    def close(self) -> None: ...
