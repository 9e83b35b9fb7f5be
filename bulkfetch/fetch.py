"""The download engine: an asyncio worker pool that turns pending job rows into verified files.

What it owns, and why each piece is shaped the way it is:

* **One aiohttp session** for the whole run, so TCP (and TLS) connections are reused across
  files; a per-host cap keeps us polite towards one archive even when several hosts are mixed.
* **Work comes from the job state in batches** (:meth:`JobStore.claim`), never as a list of every
  file, so memory does not grow with the size of the job. Only files that are failing right now
  (waiting for their backoff) are remembered in memory.
* **Adaptive concurrency (AIMD)**: a 429/503 refused just above the most requests in flight
  the archive ever accepted is a *cap*: the limit snaps to it. One refused below that level is
  an *overload*: the limit is cut to 3/4 (once per event: only a request *started after* the
  last cut can cut again, the way TCP cuts once per round trip). Each ``limit`` saturated
  successes add one back. An archive that rate-limits is therefore not hammered, one with a
  connection cap is used right up to it, and one that recovers gets the speed back.
* **Retries** with exponential backoff and full jitter, never shorter than the server's
  ``Retry-After``. The state counts every attempt; the retry budget is per run, so re-running a
  job gives failing files a fresh chance.
* **Bodies land in ``<final>.part``** and are renamed only once complete and verified, so a bad
  file never sits under a final name. Bodies above 128 KiB go through the ``.part`` as they
  arrive (flushed and recorded once a second), so a kill -9 loses at most a write buffer of
  each, and a later attempt or run continues them with
  ``Range: bytes=N-`` guarded by ``If-Range`` (the ETag lives in ``<final>.part.etag``). A server
  that answers a range request with 200 gets the file restarted from byte 0, never appended.
  Bodies up to ``memory_limit`` (the ~2 MB light curves) are also kept in memory while they
  arrive, so verifying them needs no second read of the file.
* **Verification** (``verify``): ``size`` checks bytes received == Content-Length == the product
  table's size; ``sha256`` adds the digest (compared with a known one when the state has it);
  ``fits`` (default) also checks every HDU's CHECKSUM of FITS files. The digest is taken in
  one pass over the complete body rather than chunk by chunk on the loop, because hashing on
  the loop is exactly the stall we must avoid: bodies above 128 KiB are hashed and checked in
  a thread pool (hashlib and numpy release the GIL; measured: no added loop lag at 100 MB/s,
  ~3.5 CPU s/GB with SHA-256 + FITS); smaller ones inline, since a thread hand-off costs more
  than their sub-millisecond check.
* **Stalls**: a watchdog aborts a body that delivers nothing for ``stall_timeout`` seconds or
  less than ``min_speed`` bytes/s over a window; ``timeout`` bounds connect + first byte.
* **Files already present** under their final name (a directory astroquery or lightkurve filled,
  or a file renamed just before a crash) are adopted when size and checks match, without any
  request; a present file that fails the checks is deleted and downloaded again.
* **Graceful stop** (:meth:`Fetcher.request_stop`, SIGINT/SIGTERM): no new work, in-flight
  bodies parked as ``.part`` files, leases returned, state committed.

The engine never sees SQL: it talks to the :class:`~bulkfetch.store.JobStore` interface only.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import errno
import hashlib
import heapq
import logging
import math
import os
import random
import re
import signal
import sys
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import aiohttp
from yarl import URL

from . import auth as _auth
from . import verify as _verify
from .errors import BulkfetchError, UnsafePathError, UsageError
from .layout import ETAG_SUFFIX, PART_SUFFIX
from .store import JobStore, WorkItem

log = logging.getLogger("bulkfetch")

#: Verification modes, weakest first.
VERIFY_MODES = ("size", "sha256", "fits")

#: Statuses that say "try again later" (RFC 9110 + common practice).
TRANSIENT_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
#: Statuses that mean "you are going too fast": they also lower the concurrency limit.
CONGESTION_STATUSES = frozenset({429, 503})
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 10

#: Longest Retry-After we honour: a server asking for more is treated as asking for an hour.
RETRY_AFTER_CAP = 3600.0
#: At each congestion cut, new starts pause for the server's Retry-After but never longer than
#: this: the failing file itself waits the full Retry-After; the pause only stops a stampede
#: while the requests already in flight report the same overload.
START_PAUSE_CAP = 0.25
#: Multiplicative decrease of the AIMD limit. TCP Reno halves; 3/4 (close to CUBIC's 0.7) keeps
#: an archive whose cap sits well above the link's saturation point saturated after a cut,
#: while a real overload still sees the limit fall geometrically with each new event.
AIMD_DECREASE = 0.75

#: Files waiting out a backoff held in memory at most; beyond it no new rows are leased until
#: some are due (bounds memory when a large part of a job fails for a while).
MAX_DELAYED = 10_000

#: Local filesystem errors that no retry can cure: they stop the whole run.
_FATAL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})

#: Bodies up to this size are verified and written on the event loop itself: for them the
#: hand-off to a thread (futures, a wake-up, and GIL ping-pong with the loop on every syscall)
#: costs more CPU than the work, and the work blocks the loop for well under a millisecond.
#: Bodies up to this size also stay in memory only until verified (not worth a .part).
_INLINE_LIMIT = 128 << 10
#: Files above this size are verified by streaming over them rather than reading them at once.
_READ_WHOLE_LIMIT = 64 << 20
#: Buffer of the ``.part`` writer: few, large write() calls; also the most a kill -9 can lose
#: of a partial body beyond the last progress tick (which flushes it).
_WRITE_BUFFER = 256 << 10


# ------------------------------------------------------------------------------------------
# options, events, result
# ------------------------------------------------------------------------------------------


@dataclass
class FetchOptions:
    """Every knob of the engine. The CLI maps its flags onto these one to one.

    Defaults are chosen for a shared public archive: 8 simultaneous downloads (astroquery uses
    1, parfive and aria2c use 5) already fill a typical link at MAST's latencies while staying
    far from what gets a client throttled; AIMD lowers it further when the archive pushes back.
    Going faster is one knob: ``concurrency`` (``per_host`` follows it unless set).
    """

    #: Downloads in flight at most (the AIMD limit never exceeds it).
    concurrency: int = 8
    #: Connections to one host at most; ``None`` = ``concurrency``.
    per_host: int | None = None
    #: Transient failures retried per file in this run (so ``retries + 1`` attempts).
    retries: int = 8
    #: Seconds for connecting and for the response headers (time to first byte).
    timeout: float = 60.0
    #: Seconds without any body byte before a download counts as stalled.
    stall_timeout: float = 60.0
    #: Bytes/s below which a body counts as stalled (over ``speed_window`` s); 0 disables.
    min_speed: float = 1024.0
    #: Window of the ``min_speed`` check, seconds; ``None`` = ``max(stall_timeout, 10)``.
    speed_window: float | None = None
    #: Total download rate cap in bytes/s (all files together); ``None`` = unlimited.
    max_rate: float | None = None
    #: ``size``, ``sha256`` or ``fits`` (see the module docstring).
    verify: str = "fits"
    #: Lower the concurrency on 429/503 and raise it back on success (AIMD).
    adaptive: bool = True
    #: The AIMD limit never drops below this.
    min_concurrency: int = 1
    #: First backoff delay in seconds; doubles per attempt, full jitter.
    backoff_base: float = 1.0
    #: Longest backoff delay in seconds (a Retry-After may still ask for more).
    backoff_max: float = 60.0
    #: Rows leased from the state per claim; also how far ahead of the workers we read.
    claim_batch: int = 64
    #: Bodies above 128 KiB always stream through ``.part`` (a crash loses at most the write
    #: buffer; the next run resumes with Range). Up to this many bytes they are also kept in
    #: memory, so they are verified without reading the file back; 0 = always read back.
    memory_limit: int = 4 << 20
    #: User-Agent header; ``None`` = ``bulkfetch/<version> aiohttp/<version> Python/<version>``.
    user_agent: str | None = None
    #: Extra request headers (e.g. an auth token). Never logged, and only sent to the host of
    #: each file's own URL, not across a redirect to another host.
    headers: dict[str, str] | None = None
    #: MAST API token (``bulkfetch.auth.find_token()`` finds the user's). Sent as
    #: ``Authorization: token ...`` only over verified HTTPS to ``token_hosts`` and never
    #: across a redirect to another origin (``bulkfetch.auth.token_allowed``); not in ``repr``.
    token: str | None = field(default=None, repr=False)
    #: Hosts (and their subdomains) the token may be sent to.
    token_hosts: tuple[str, ...] = (_auth.MAST_HOST,)
    #: Verify TLS certificates.
    ssl_verify: bool = True
    #: Honour HTTP(S)_PROXY / NO_PROXY from the environment, as requests and curl do.
    trust_env: bool = True
    #: fsync each file before its rename. Off by default: a killed process loses nothing the
    #: kernel already has, and ``bulkfetch verify`` finds the rare file a power cut damaged;
    #: on a spinning disk an fsync per 2 MB file would cost more than the download.
    fsync: bool = False
    #: Take the single-runner lock of the job directory (``store.acquire_lock()``) for the run.
    lock: bool = True

    def validate(self) -> FetchOptions:
        """Raise :class:`UsageError` naming the first knob that makes no sense; return self."""
        checks: list[tuple[bool, str]] = [
            (self.concurrency >= 1, f"concurrency must be at least 1, not {self.concurrency}"),
            (
                self.per_host is None or self.per_host >= 1,
                f"per-host must be at least 1, not {self.per_host}",
            ),
            (self.retries >= 0, f"retries must be 0 or more, not {self.retries}"),
            (self.timeout > 0, f"timeout must be positive, not {self.timeout}"),
            (self.stall_timeout > 0, f"stall-timeout must be positive, not {self.stall_timeout}"),
            (self.min_speed >= 0, f"min-speed must be 0 or more, not {self.min_speed}"),
            (
                self.speed_window is None or self.speed_window > 0,
                f"speed window must be positive, not {self.speed_window}",
            ),
            (
                self.max_rate is None or self.max_rate > 0,
                f"max-rate must be positive, not {self.max_rate}",
            ),
            (
                self.verify in VERIFY_MODES,
                f"verify must be one of {', '.join(VERIFY_MODES)}, not {self.verify!r}",
            ),
            (
                1 <= self.min_concurrency <= self.concurrency,
                f"min concurrency must be between 1 and concurrency ({self.concurrency}), "
                f"not {self.min_concurrency}",
            ),
            (self.backoff_base >= 0, f"backoff base must be 0 or more, not {self.backoff_base}"),
            (self.backoff_max >= 0, f"backoff max must be 0 or more, not {self.backoff_max}"),
            (self.claim_batch >= 1, f"claim batch must be at least 1, not {self.claim_batch}"),
            (self.memory_limit >= 0, f"memory limit must be 0 or more, not {self.memory_limit}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)
        for name, value in (self.headers or {}).items():
            if not isinstance(name, str) or not isinstance(value, str) or "\n" in name + value:
                raise UsageError(f"header {name!r} must be a single-line string")
        return self

    @property
    def host_limit(self) -> int:
        """Connections per host actually allowed."""
        return min(self.per_host or self.concurrency, self.concurrency)


def parse_rate(text: str) -> float:
    """Parse a rate such as ``50M``, ``1.5g``, ``800k`` or ``1000000`` into bytes per second.

    Suffixes are binary (k = 1024), as in curl's and wget's ``--limit-rate``; a trailing ``B``
    or ``/s`` is accepted. Raises :class:`UsageError` on anything else.
    """
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(?:i?b)?(?:/s)?\s*", text, re.I)
    if not match:
        raise UsageError(f"cannot read rate {text!r}: use a number with an optional k/M/G suffix")
    value = float(match.group(1)) * 1024 ** " kmgt".index(match.group(2).lower() or " ")
    if value <= 0:
        raise UsageError(f"rate must be positive, not {text!r}")
    return value


class FetchEvents(Protocol):
    """What the engine tells a progress display. Every callback runs on the event loop: be quick."""

    def on_start(
        self, total_files: int, total_bytes: int, done_files: int, done_bytes: int
    ) -> None:
        """The run begins: the job's totals and what was already done before it."""

    def on_bytes(self, n: int) -> None:
        """``n`` more body bytes arrived (of any file)."""

    def on_file(self, uri: str, ok: bool, message: str | None) -> None:
        """A file ended: ``ok`` (downloaded or adopted) or permanently failed with ``message``."""

    def on_retry(self, uri: str, message: str) -> None:
        """A file failed transiently and will be tried again."""

    def on_concurrency(self, n: int) -> None:
        """The effective concurrency limit changed (AIMD) - shown by progress and status."""


class NullEvents:
    """The do-nothing :class:`FetchEvents`, used when the caller passes none."""

    def on_start(
        self, total_files: int, total_bytes: int, done_files: int, done_bytes: int
    ) -> None:
        pass

    def on_bytes(self, n: int) -> None:
        pass

    def on_file(self, uri: str, ok: bool, message: str | None) -> None:
        pass

    def on_retry(self, uri: str, message: str) -> None:
        pass

    def on_concurrency(self, n: int) -> None:
        pass


@dataclass
class FetchResult:
    """What a run achieved. ``done``/``errors``/``pending`` are job totals at the end of the run;
    the other counters describe this run only."""

    done: int
    errors: int
    pending: int
    bytes_downloaded: int
    #: Signal number that stopped the run (SIGINT, SIGTERM), or None.
    interrupted_by: int | None
    elapsed: float
    #: Files fetched over the network in this run.
    downloaded: int = 0
    #: Files found already present and verified, recorded without a download.
    adopted: int = 0
    #: Files that ended in error in this run.
    failed: int = 0
    #: Transient failures that led to a retry in this run.
    retries: int = 0
    #: Effective concurrency limit at the end of the run.
    concurrency: int = 0
    #: Lowest concurrency limit the AIMD controller reached.
    min_concurrency_seen: int = 0
    #: Body bytes of responses that did not end as a verified file (wasted by failures).
    bytes_wasted: int = 0

    @property
    def stopped(self) -> bool:
        """Whether the run was interrupted before every file was handled."""
        return self.interrupted_by is not None

    @property
    def exit_code(self) -> int:
        """128 + signal when interrupted (130 SIGINT, 143 SIGTERM), 1 if any file is in error."""
        if self.interrupted_by is not None:
            return 128 + int(self.interrupted_by)
        return 1 if self.errors else 0

    def summary(self) -> str:
        """One line for humans: what happened and what to do next."""
        rate = self.bytes_downloaded / self.elapsed / 1e6 if self.elapsed > 0 else 0.0
        text = (
            f"{self.done} done, {self.errors} errors, {self.pending} pending; "
            f"this run: {self.downloaded} downloaded, {self.adopted} adopted, "
            f"{self.bytes_downloaded / 1e6:.1f} MB in {self.elapsed:.1f} s ({rate:.1f} MB/s)"
        )
        if self.interrupted_by is not None:
            name = _signal_name(self.interrupted_by)
            return f"interrupted by {name}: {text}; run the same command again to resume"
        return text


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


# ------------------------------------------------------------------------------------------
# failures
# ------------------------------------------------------------------------------------------


class _Failure(Exception):
    """One failed attempt, classified. ``message`` is short and stable so errors group well."""

    def __init__(
        self,
        message: str,
        *,
        transient: bool = True,
        status: int | None = None,
        retry_after: float | None = None,
        congestion: bool = False,
        keep_part: bool = False,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.transient = transient
        self.status = status
        self.retry_after = retry_after
        self.congestion = congestion
        self.keep_part = keep_part


class _CancelledWithResult(asyncio.CancelledError):
    """Cancellation that arrived while a verify thread ran: carries what the thread did."""

    def __init__(self, checked: _Checked) -> None:
        super().__init__()
        self.checked = checked


class _LocalError(Exception):
    """The local filesystem refused a write (disk full, read-only): no retry can cure it."""


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds a ``Retry-After`` header asks for (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when is None:
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if math.isnan(seconds):
        return None
    return min(max(seconds, 0.0), RETRY_AFTER_CAP)


def _status_failure(resp: aiohttp.ClientResponse) -> _Failure:
    """Classify a non-success status: the message carries the status, never the URL."""
    status = resp.status
    message = f"HTTP {status} {resp.reason or ''}".rstrip()
    if status in TRANSIENT_STATUSES or status >= 500:
        return _Failure(
            message,
            status=status,
            retry_after=parse_retry_after(resp.headers.get("Retry-After")),
            congestion=status in CONGESTION_STATUSES,
            keep_part=True,
        )
    return _Failure(message, transient=False, status=status)


# ------------------------------------------------------------------------------------------
# the adaptive limit and the rate cap
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Slot:
    """One admitted request: when it started and how many others were in flight then."""

    started_at: float
    in_flight: int


class AdaptiveLimiter:
    """How many downloads may be in flight right now: AIMD between ``minimum`` and ``maximum``.

    Workers call :meth:`acquire` before a request and :meth:`release` after its body; workers
    beyond the limit wait in FIFO order. A 429/503 (:meth:`congestion`) lowers the limit in one
    of two ways:

    * **a cap**: the refused request was sent with (about) as many requests in flight as the
      most any accepted one (:meth:`accepted`) had since the last cut, or more - the archive
      caps concurrent downloads, and the limit snaps to just that many. No deeper cut: below
      the cap the archive serves fine.
    * **an overload**: refused at a level that worked before - the limit falls to
      :data:`AIMD_DECREASE` of itself and new starts pause briefly (at most
      :data:`START_PAUSE_CAP`, the server's Retry-After if shorter); only a request started
      after the previous cut can cut again, since all the requests already in flight when the
      archive became overloaded report the same event.

    :meth:`success` adds one to the limit per ``limit`` successes while the limit is in use, so
    the engine keeps probing for more and recovers when the archive does.
    """

    def __init__(
        self,
        maximum: int,
        minimum: int = 1,
        adaptive: bool = True,
        on_change: Callable[[int], None] | None = None,
    ) -> None:
        self.maximum = maximum
        self.minimum = max(1, min(minimum, maximum))
        self.adaptive = adaptive
        self.limit = maximum
        self.lowest = maximum
        self.active = 0
        self.cuts = 0
        self._on_change = on_change
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._last_cut = -math.inf
        self._pause_until = 0.0
        self._successes = 0
        self._proven = -1  # most others in flight alongside an accepted request

    async def acquire(self) -> Slot:
        """Wait for a free slot; return it (for :meth:`accepted`/:meth:`congestion`)."""
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            if now < self._pause_until:
                await asyncio.sleep(self._pause_until - now)
                continue
            if self.active < self.limit:
                break
            fut: asyncio.Future[None] = loop.create_future()
            self._waiters.append(fut)
            try:
                await fut
            except BaseException:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(fut)
                if fut.done() and not fut.cancelled():
                    self._wake()  # we were woken but leave: pass the turn on
                raise
        slot = Slot(loop.time(), self.active)
        self.active += 1
        return slot

    def release(self) -> None:
        """Give a slot back (after the body, success or not)."""
        self.active -= 1
        self._wake()

    def accepted(self, slot: Slot) -> None:
        """The archive answered ``slot``'s request with a body: that level of concurrency works."""
        if slot.in_flight > self._proven:
            self._proven = slot.in_flight

    def success(self) -> None:
        """A download completed: additive increase while the limit is actually in use."""
        if not self.adaptive or self.limit >= self.maximum:
            return
        if self.active < self.limit - 1:  # an unused limit proves nothing about the archive
            return
        self._successes += 1
        if self._successes >= self.limit:
            self._successes = 0
            self._set(self.limit + 1)

    def congestion(self, slot: Slot, retry_after: float | None) -> None:
        """A 429/503 for ``slot``'s request: lower the limit (see the class docstring).

        With ``adaptive`` off nothing changes here (fixed concurrency); the failing file still
        waits out its Retry-After.
        """
        if not self.adaptive:
            return
        k = slot.in_flight
        if slot.started_at <= self._last_cut:
            # Sent before the last cut: old news, except that it can still place a cap more
            # precisely (the refusals of one burst arrive in any order).
            if k > self._proven and k < self.limit:
                self._set(max(self.minimum, k))
            return
        # Near the proven level counts as the cap too: the archive frees a connection a moment
        # after we have read its last byte, so a request sent right then is refused at a level
        # that just worked, by the cap and not by any overload.
        now = asyncio.get_running_loop().time()
        if k >= self._proven - max(1, self._proven // 8):
            # A cap: at the new limit nothing starts until a download ends anyway; no pause.
            target = max(self.minimum, min(self.limit, k))
        else:
            target = max(self.minimum, min(self.limit - 1, int(self.limit * AIMD_DECREASE)))
            self._proven = min(self._proven, target - 1)
            pause = START_PAUSE_CAP if retry_after is None else min(retry_after, START_PAUSE_CAP)
            self._pause_until = max(self._pause_until, now + pause)
        self._last_cut = now
        self.cuts += 1
        if target < self.limit:
            self._successes = 0
            self._set(target)

    def _set(self, value: int) -> None:
        if value == self.limit:
            return
        self.limit = value
        self.lowest = min(self.lowest, value)
        log.debug("concurrency limit now %d", value)
        if self._on_change is not None:
            self._on_change(value)
        self._wake()

    def _wake(self) -> None:
        free = self.limit - self.active
        while free > 0 and self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                free -= 1


class RateLimiter:
    """A token bucket shared by all downloads: ``rate`` bytes/s on average, small bursts."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.burst = max(rate * 0.1, 16 * 1024)
        self.level = self.burst
        self._stamp: float | None = None

    async def consume(self, n: int) -> None:
        """Account for ``n`` bytes; sleep long enough to keep the average at ``rate``."""
        now = time.monotonic()
        if self._stamp is not None:
            self.level = min(self.burst, self.level + (now - self._stamp) * self.rate)
        self._stamp = now
        self.level -= n
        if self.level < 0:
            await asyncio.sleep(-self.level / self.rate)


# ------------------------------------------------------------------------------------------
# bodies on their way to disk
# ------------------------------------------------------------------------------------------


@dataclass
class _Paths:
    """Where one product goes. Plain strings: pathlib costs more than the I/O for small files."""

    final: str
    part: str
    etag: str
    is_fits: bool


class _Sink:
    """A body being received.

    Small bodies (up to ``spool`` bytes) live in memory only until verified: a thread hand-off
    or a file per chunk would cost more than losing them to a crash. Anything larger goes
    *through* the ``.part`` as it arrives (a kill -9 loses at most the write buffer and the
    next run resumes with Range) while its chunks are also kept in memory up to ``keep``
    bytes, so verification needs no second read of the file. ``offset`` bytes are already on
    disk (a resumed part): such a body is streamed to disk only and read back to verify.
    """

    def __init__(self, paths: _Paths, offset: int, spool: int, keep: int, etag: str | None) -> None:
        self.paths = paths
        self.offset = offset
        self.spool = spool
        self.keep = keep
        self.etag = etag
        self.received = 0
        self.chunks: list[bytes] | None = [] if offset == 0 else None
        self.fh: Any = None
        if offset > 0:
            try:
                self.fh = open(paths.part, "r+b", buffering=_WRITE_BUFFER)  # noqa: SIM115
                self.fh.seek(offset)
                self.fh.truncate()
            except OSError as exc:
                raise _LocalError(f"cannot open {paths.part}: {exc}") from exc

    @property
    def total(self) -> int:
        """Bytes of the file so far (resumed prefix + this response)."""
        return self.offset + self.received

    def write(self, data: bytes) -> None:
        self.received += len(data)
        try:
            chunks = self.chunks
            if chunks is None:  # on disk only
                self.fh.write(data)
                return
            chunks.append(data)
            if self.fh is not None:
                self.fh.write(data)
            elif self.received > self.spool or self.received > self.keep:
                self._open_part()  # writes what is in memory, this chunk included
            if self.received > self.keep:
                self.chunks = None  # too big to hold as well: the .part has it all
        except OSError as exc:
            raise _LocalError(f"cannot write {self.paths.part}: {exc}") from exc

    def _open_part(self) -> None:
        """Start a fresh ``.part`` (with its ETag beside it) holding what is in memory."""
        os.makedirs(os.path.dirname(self.paths.part), exist_ok=True)
        self.fh = open(self.paths.part, "wb", buffering=_WRITE_BUFFER)  # noqa: SIM115
        self.fh.writelines(self.chunks or ())
        _write_etag(self.paths, self.etag)

    def park(self) -> None:
        """Keep what arrived as a ``.part`` for a later resume (interrupt, mid-body failure)."""
        try:
            if self.fh is None and self.received > 0:
                self._open_part()
            if self.fh is not None:
                self.fh.close()
        except OSError as exc:
            log.warning("could not keep partial %s: %s", self.paths.part, exc)
        self.fh = None
        self.chunks = None

    def discard(self) -> None:
        """Forget the body and any ``.part``: the bytes cannot be trusted."""
        if self.fh is not None:
            with contextlib.suppress(OSError):
                self.fh.close()
            self.fh = None
        self.chunks = None
        _remove_part(self.paths)


def _write_etag(paths: _Paths, etag: str | None) -> None:
    if etag:
        with open(paths.etag, "w", encoding="utf-8") as fh:
            fh.write(etag)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(paths.etag)


def _read_etag(paths: _Paths) -> str | None:
    try:
        with open(paths.etag, encoding="utf-8") as fh:
            text = fh.read().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text or None


def _remove_part(paths: _Paths) -> None:
    for path in (paths.part, paths.etag):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


@dataclass
class _Landing:
    """Everything the verifying thread needs to turn a body into a final file."""

    paths: _Paths
    chunks: list[bytes] | None  # the whole body in memory, or None: read it from the .part
    fh: Any  # open .part writer to close first, or None: the body is in memory only
    expected_size: int | None
    known_sha256: str | None
    mode: str
    fsync: bool


@dataclass
class _Checked:
    size: int
    sha256: str
    problems: list[str]


def _check_bytes(
    data: bytes | memoryview,
    expected_size: int | None,
    known_sha256: str | None,
    mode: str,
    is_fits: bool,
) -> _Checked:
    """Size, digest and FITS checks of a body held in memory."""
    size = len(data)
    problems: list[str] = []
    if expected_size is not None and size != expected_size:
        problems.append(f"size {size} differs from the product table's {expected_size}")
        return _Checked(size, "", problems)
    digest = ""
    if mode != "size":
        digest = hashlib.sha256(data).hexdigest()
        if known_sha256 and digest != known_sha256.lower():
            problems.append("SHA-256 differs from the known digest")
    if mode == "fits" and is_fits and not problems:
        problems.extend(
            _verify.check_fits_bytes(bytes(data) if isinstance(data, memoryview) else data)
        )
    return _Checked(size, digest, problems)


def _check_path(
    path: str, expected_size: int | None, known_sha256: str | None, mode: str, is_fits: bool
) -> _Checked:
    """Size, digest and FITS checks of a file on disk, reading it once when it is not huge."""
    size = os.stat(path).st_size
    if expected_size is not None and size != expected_size:
        return _Checked(size, "", [f"size {size} differs from the product table's {expected_size}"])
    if mode == "size":
        return _Checked(size, "", [])
    if size <= _READ_WHOLE_LIMIT:
        with open(path, "rb") as fh:
            data = fh.read()
        return _check_bytes(data, expected_size, known_sha256, mode, is_fits)
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(8 << 20):
            sha.update(block)
    digest = sha.hexdigest()
    problems: list[str] = []
    if known_sha256 and digest != known_sha256.lower():
        problems.append("SHA-256 differs from the known digest")
    if mode == "fits" and is_fits and not problems:
        problems.extend(_verify.check_fits(path))
    return _Checked(size, digest, problems)


def _land(job: _Landing) -> _Checked:
    """Verify a body and, if good, put it under its final name (in a thread, or inline when
    the body is small: see :data:`_INLINE_LIMIT`).

    A failed check deletes the ``.part``, so a bad file is never renamed into place.
    """
    paths = job.paths
    try:
        if job.fh is not None:  # the body went through the .part: complete it on disk
            if job.fsync:
                job.fh.flush()
                os.fsync(job.fh.fileno())
            job.fh.close()
        if job.chunks is not None:  # verify from memory, no second read
            data = job.chunks[0] if len(job.chunks) == 1 else b"".join(job.chunks)
            checked = _check_bytes(
                data, job.expected_size, job.known_sha256, job.mode, paths.is_fits
            )
            if checked.problems:
                _remove_part(paths)
                return checked
            if job.fh is None:  # memory only so far: write it now that it is known good
                os.makedirs(os.path.dirname(paths.part), exist_ok=True)
                with open(paths.part, "wb") as fh:
                    fh.write(data)
                    if job.fsync:
                        fh.flush()
                        os.fsync(fh.fileno())
        else:
            checked = _check_path(
                paths.part, job.expected_size, job.known_sha256, job.mode, paths.is_fits
            )
            if checked.problems:
                _remove_part(paths)
                return checked
        os.replace(paths.part, paths.final)
        if job.fh is not None or job.chunks is None:  # a body that went through the disk
            with contextlib.suppress(FileNotFoundError):
                os.unlink(paths.etag)
        return checked
    except OSError as exc:
        if exc.errno in _FATAL_ERRNOS:
            raise _LocalError(f"cannot write {paths.final}: {exc.strerror}") from exc
        _remove_part(paths)
        return _Checked(0, "", [f"local I/O error: {exc.strerror or exc}"])


def _adopt(
    paths: _Paths, expected_size: int | None, known_sha256: str | None, mode: str
) -> _Checked:
    """Runs in a worker thread: check a file already under its final name.

    Good -> keep it (the caller records it done). Bad -> delete it, so only verified files
    carry final names, and the caller downloads it again.
    """
    try:
        checked = _check_path(paths.final, expected_size, known_sha256, mode, paths.is_fits)
    except OSError as exc:
        return _Checked(0, "", [f"cannot read: {exc.strerror or exc}"])
    if checked.problems:
        log.info(
            "existing %s fails its checks (%s): downloading it again",
            paths.final,
            checked.problems[0],
        )
        try:
            os.unlink(paths.final)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise _LocalError(f"cannot replace damaged {paths.final}: {exc.strerror}") from exc
    return checked


# ------------------------------------------------------------------------------------------
# the engine
# ------------------------------------------------------------------------------------------


@dataclass
class _Transfer:
    """Book-keeping of one response in flight, watched by the stall detector."""

    uri: str
    last_data: float
    window_start: float
    window_bytes: int = 0
    received: int = 0
    offset: int = 0
    reported: int = 0
    response: aiohttp.ClientResponse | None = None
    sink: _Sink | None = None
    abort_reason: str | None = None


@dataclass
class SignalGuard:
    """Returned by :meth:`Fetcher.install_signal_handlers`: which signal stopped the run."""

    signum: int | None = None
    _remove: Callable[[], None] | None = field(default=None, repr=False)

    def remove(self) -> None:
        """Restore the previous handlers."""
        if self._remove is not None:
            self._remove()
            self._remove = None


def _default_user_agent() -> str:
    version = getattr(sys.modules.get("bulkfetch"), "__version__", "0")
    py = ".".join(str(v) for v in sys.version_info[:3])
    return f"bulkfetch/{version} aiohttp/{aiohttp.__version__} Python/{py}"


def _cert_reason(exc: aiohttp.ClientConnectorCertificateError) -> str:
    """The short reason of a certificate failure ("self-signed certificate", ...)."""
    cert_error = getattr(exc, "certificate_error", None)
    reason = getattr(cert_error, "verify_message", None) or getattr(cert_error, "reason", None)
    return str(reason or "certificate verify failed")


def _origin(url: str | URL) -> tuple[str, str, int | None]:
    u = url if isinstance(url, URL) else URL(url)
    return (u.scheme, (u.host or "").lower(), u.port)


async def _within(awaitable: Any, seconds: float) -> Any:
    """Await with a deadline; ``asyncio.timeout`` (3.11+) costs no extra task, unlike wait_for."""
    timeout = getattr(asyncio, "timeout", None)
    if timeout is None:  # Python 3.10
        return await asyncio.wait_for(awaitable, seconds)
    async with timeout(seconds):
        return await awaitable


def _is_fits_name(name: str) -> bool:
    return name.lower().endswith((".fits", ".fit", ".fts"))


class Fetcher:
    """Downloads every pending row of a job state into ``root``; one instance per run.

    ``await fetcher.run()`` returns a :class:`FetchResult`. :meth:`request_stop` (thread- and
    signal-safe) ends the run gracefully; :meth:`install_signal_handlers` wires it to
    SIGINT/SIGTERM.
    """

    def __init__(
        self,
        store: JobStore,
        root: str | os.PathLike[str],
        options: FetchOptions | None = None,
        events: FetchEvents | None = None,
    ) -> None:
        self.store = store
        self.root = Path(root).resolve()
        self._root = str(self.root)
        self.options = (options or FetchOptions()).validate()
        self.events: FetchEvents = events if events is not None else NullEvents()
        self.limiter = AdaptiveLimiter(
            self.options.concurrency,
            self.options.min_concurrency,
            self.options.adaptive,
            on_change=self._concurrency_changed,
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_requested = False
        self._stop_signal: int | None = None
        self._stop_event: asyncio.Event | None = None
        self._wake_feeder: asyncio.Event | None = None
        self._queue: asyncio.Queue[WorkItem | None] | None = None
        self._delayed: list[tuple[float, int, WorkItem]] = []
        self._seq = 0
        self._not_before: dict[str, float] = {}
        self._run_attempts: dict[str, int] = {}
        self._outstanding = 0
        self._may_claim = True
        self._n_workers = self.options.concurrency + max(2, self.options.concurrency // 4)
        self._transfers: dict[int, _Transfer] = {}
        self._host_sems: dict[str, asyncio.Semaphore] = {}
        self._rate = RateLimiter(self.options.max_rate) if self.options.max_rate else None
        self._session: aiohttp.ClientSession | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._fatal: BaseException | None = None
        self._worker_id = f"{os.uname().nodename}:{os.getpid()}"
        self._env_proxies: dict[str, str] = (
            urllib.request.getproxies() if self.options.trust_env else {}
        )
        self._proxy_cache: dict[tuple[str, str], str | None] = {}
        self._meta_dirty = False
        # counters of this run
        self.bytes_downloaded = 0
        self.bytes_wasted = 0
        self.downloaded = 0
        self.adopted = 0
        self.failed = 0
        self.retried = 0

    # -- control ----------------------------------------------------------------------------
    def request_stop(self, signum: int | None = None) -> None:
        """Stop gracefully: take no new work, park in-flight files as ``.part``, commit.

        Safe to call from a signal handler, from another thread, or before :meth:`run`.
        """
        if self._stop_signal is None and signum is not None:
            self._stop_signal = signum
        if self._stop_requested:
            return
        self._stop_requested = True
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._set_stop_events()
        else:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._set_stop_events)

    def _set_stop_events(self) -> None:
        if self._stop_event is not None:
            self._stop_event.set()
        if self._wake_feeder is not None:
            self._wake_feeder.set()

    def install_signal_handlers(self, loop: asyncio.AbstractEventLoop | None = None) -> SignalGuard:
        """Make SIGINT and SIGTERM call :meth:`request_stop`; the guard tells which one came.

        Only possible in the main thread (a Python rule); elsewhere nothing is installed.
        """
        guard = SignalGuard()
        if threading.current_thread() is not threading.main_thread():
            return guard
        loop = loop or asyncio.get_running_loop()
        installed: list[int] = []

        def handler(signum: int) -> None:
            if guard.signum is None:
                guard.signum = signum
            log.info("%s received: stopping after parking in-flight files", _signal_name(signum))
            self.request_stop(signum)

        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, handler, int(sig))
                installed.append(sig)
            except (NotImplementedError, RuntimeError, ValueError):
                pass

        def remove() -> None:
            for sig in installed:
                with contextlib.suppress(Exception):
                    loop.remove_signal_handler(sig)

        guard._remove = remove
        return guard

    # -- run --------------------------------------------------------------------------------
    async def run(self) -> FetchResult:
        """Download until every row is done or in error, or a stop is requested."""
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._stop_event = asyncio.Event()
        self._wake_feeder = asyncio.Event()
        self._queue = asyncio.Queue()
        if self._stop_requested:
            self._set_stop_events()
        locked = False
        acquire = getattr(self.store, "acquire_lock", None)
        if self.options.lock and acquire is not None:
            acquire()  # raises StateError when another fetch works on this directory
            locked = True
        try:
            recovered = self.store.recover()
            if recovered:
                log.info(
                    "%d files left in progress by an earlier run go back to the queue", recovered
                )
            self._announce_start()
            self.events.on_concurrency(self.limiter.limit)
            self._meta("fetch.concurrency", str(self.limiter.limit))
            await self._run_pool(loop)
        finally:
            try:
                self._meta("fetch.concurrency", "0")
                self.store.flush()
            finally:
                if locked:
                    release = getattr(self.store, "release_lock", None)
                    if release is not None:
                        release()
        if self._fatal is not None:
            raise BulkfetchError(str(self._fatal)) from self._fatal
        result = self._result(time.monotonic() - started)
        if result.interrupted_by is not None or self._stop_requested:
            log.warning("%s", result.summary())
        else:
            log.info("%s", result.summary())
        return result

    async def _run_pool(self, loop: asyncio.AbstractEventLoop) -> None:
        opts = self.options
        connector = aiohttp.TCPConnector(
            limit=opts.concurrency,
            limit_per_host=opts.host_limit,
            ssl=None if opts.ssl_verify else False,
            ttl_dns_cache=300,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=opts.timeout),
            headers={
                "User-Agent": opts.user_agent or _default_user_agent(),
                "Accept-Encoding": "identity",
            },
            auto_decompress=False,
            # Proxies from the environment are resolved once per run (_proxy_for), not by
            # aiohttp's trust_env, which reads netrc and the proxy settings in a thread on
            # every request: two thread hand-offs per file, a third of our per-file cost.
            trust_env=False,
            read_bufsize=1 << 18,
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        self._executor = ThreadPoolExecutor(
            max_workers=max(2, os.cpu_count() or 2), thread_name_prefix="bulkfetch-verify"
        )
        # More workers than the limit: a worker busy verifying, recording or opening files
        # has already given its slot back, and a spare worker fills it at once; the limiter,
        # not the worker count, is what caps the requests in flight.
        workers = [
            asyncio.create_task(self._worker(), name=f"bulkfetch-worker-{i}")
            for i in range(self._n_workers)
        ]
        feeder = asyncio.create_task(self._feed(), name="bulkfetch-feeder")
        watchdog = asyncio.create_task(self._watch(), name="bulkfetch-watchdog")
        stop_wait = asyncio.create_task(self._stop_event.wait())  # type: ignore[union-attr]
        try:
            await asyncio.wait({feeder, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
            if feeder.done() and not self._stop_requested:
                feeder.result()  # surface a feeder bug
                for _ in workers:
                    self._queue.put_nowait(None)  # type: ignore[union-attr]
                await asyncio.gather(*workers)
            else:
                self._stop_requested = True
        except BaseException:
            self._stop_requested = True
            raise
        finally:
            stop_wait.cancel()
            feeder.cancel()
            for task in workers:
                task.cancel()
            # Workers park their files and return their leases as they unwind.
            await asyncio.gather(*workers, feeder, stop_wait, return_exceptions=True)
            watchdog.cancel()
            await asyncio.gather(watchdog, return_exceptions=True)
            self._release_unstarted()
            await self._session.close()
            self._executor.shutdown(wait=True)

    def _release_unstarted(self) -> None:
        """Return leased rows nobody started (queued or waiting out a backoff) to pending."""
        items: list[WorkItem] = [entry[2] for entry in self._delayed]
        self._delayed.clear()
        queue = self._queue
        while queue is not None and not queue.empty():
            item = queue.get_nowait()
            if item is not None:
                items.append(item)
        for item in items:
            self.store.release(item.uri)
            self._outstanding -= 1

    def _announce_start(self) -> None:
        counts = self.store.counts()
        total_files = sum(n for n, _ in counts.values())
        total_bytes = sum(b or 0 for _, b in counts.values())
        done_files, done_bytes = counts.get("done", (0, 0))
        self.events.on_start(total_files, total_bytes, done_files, done_bytes or 0)

    def _result(self, elapsed: float) -> FetchResult:
        counts = self.store.counts()
        pending = sum(counts.get(s, (0, 0))[0] for s in ("pending", "active"))
        return FetchResult(
            done=counts.get("done", (0, 0))[0],
            errors=counts.get("error", (0, 0))[0],
            pending=pending,
            bytes_downloaded=self.bytes_downloaded,
            interrupted_by=self._stop_signal if self._stop_requested else None,
            elapsed=elapsed,
            downloaded=self.downloaded,
            adopted=self.adopted,
            failed=self.failed,
            retries=self.retried,
            concurrency=self.limiter.limit,
            min_concurrency_seen=self.limiter.lowest,
            bytes_wasted=self.bytes_wasted,
        )

    def _concurrency_changed(self, n: int) -> None:
        self.events.on_concurrency(n)
        self._meta_dirty = True

    def _meta(self, key: str, value: str) -> None:
        setter = getattr(self.store, "set_meta", None)
        if setter is not None:
            try:
                setter(key, value)
            except Exception as exc:  # status display only: never fail a run for it
                log.debug("could not record %s: %s", key, exc)

    # -- feeding ----------------------------------------------------------------------------
    async def _feed(self) -> None:
        """Lease rows in batches and hand them to the workers; hold back files in backoff.

        Keeps at most ``workers + claim_batch`` rows leased for work, plus at most
        :data:`MAX_DELAYED` files waiting out a backoff (these do not take the room of new
        work, so a cluster of failing files cannot starve the healthy ones), which bounds
        memory whatever the size of the job. Ends when nothing is pending or outstanding.
        """
        loop = asyncio.get_running_loop()
        opts = self.options
        capacity = self._n_workers + opts.claim_batch
        queue = self._queue
        wake = self._wake_feeder
        assert queue is not None and wake is not None
        while not self._stop_requested:
            now = loop.time()
            while self._delayed and self._delayed[0][0] <= now:
                queue.put_nowait(heapq.heappop(self._delayed)[2])
            room = capacity - (self._outstanding - len(self._delayed))
            if (
                self._may_claim
                and room > 0
                and len(self._delayed) < MAX_DELAYED
                and queue.qsize() <= opts.claim_batch // 2  # refill in batches, not one by one
            ):
                items = self.store.claim(min(room, opts.claim_batch), self._worker_id)
                if not items:
                    self._may_claim = False
                for item in items:
                    self._outstanding += 1
                    ready = self._not_before.pop(item.uri, 0.0)
                    if ready > now:
                        self._seq += 1
                        heapq.heappush(self._delayed, (ready, self._seq, item))
                    else:
                        queue.put_nowait(item)
                if items:
                    await asyncio.sleep(0)  # let workers start before claiming more
                    continue
            if self._outstanding == 0 and not self._may_claim:
                return
            timeout = self._delayed[0][0] - now if self._delayed else None
            wake.clear()
            if timeout is None:
                await wake.wait()
            else:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(wake.wait(), max(timeout, 0.001))

    # -- working ----------------------------------------------------------------------------
    async def _worker(self) -> None:
        queue = self._queue
        assert queue is not None
        while True:
            item = await queue.get()
            if item is None:
                return
            try:
                await self._process(item)
            except _LocalError as exc:
                self._fatal = exc
                log.error("%s: stopping", exc)
                self.store.release(item.uri)
                self.request_stop()
            except Exception as exc:  # a bug or an exotic error: one file, not the whole run
                log.exception("%s: unexpected error", item.uri)
                self._failed_attempt(item, _Failure(f"unexpected error: {type(exc).__name__}"))
            finally:
                self._outstanding -= 1
                if self._wake_feeder is not None:
                    self._wake_feeder.set()

    def _paths(self, item: WorkItem) -> _Paths:
        rel = item.local_path
        parts = rel.split("/")
        if rel.startswith("/") or "\\" in rel or any(p in ("", ".", "..") for p in parts):
            raise UnsafePathError(f"refusing path {rel!r}: it would leave the download directory")
        final = os.path.join(self._root, *parts)
        part = final + PART_SUFFIX
        return _Paths(final, part, part + ETAG_SUFFIX, _is_fits_name(parts[-1]))

    async def _in_thread(self, func: Callable[..., _Checked], *args: Any) -> _Checked:
        """Run ``func`` in the verify pool; if we are cancelled meanwhile, still wait for it.

        A landing that already renamed the file must be recorded, not forgotten: the result
        travels with the cancellation as :class:`_CancelledWithResult`.
        """
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self._executor, func, *args)
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            try:
                checked = await fut
            except BaseException:
                raise asyncio.CancelledError() from None
            raise _CancelledWithResult(checked) from None

    async def _process(self, item: WorkItem) -> None:
        """One file from lease to a final state (done, error, or back to pending)."""
        try:
            paths = self._paths(item)
        except UnsafePathError as exc:
            self._give_up(item, _Failure(str(exc), transient=False))
            return
        adopted = False
        try:
            checked = None
            try:
                present = os.stat(paths.final).st_size
            except FileNotFoundError:
                present = None
            if present is not None:
                args = (paths, item.size, item.sha256, self.options.verify)
                if present <= _INLINE_LIMIT:
                    checked = _adopt(*args)
                else:
                    checked = await self._in_thread(_adopt, *args)
                adopted = not checked.problems
            if not adopted:
                checked = await self._attempt(item, paths)
        except _Failure as failure:
            self._failed_attempt(item, failure)
            return
        except _CancelledWithResult as stop:
            self._record(item, stop.checked, adopted)
            raise
        except asyncio.CancelledError:
            self.store.release(item.uri)
            raise
        self._record(item, checked, adopted)

    def _record(self, item: WorkItem, checked: _Checked, adopted: bool) -> None:
        if checked.problems:
            if adopted:  # the existing file was bad (and deleted): back to the queue, no attempt
                self.store.release(item.uri)
            else:
                self._failed_attempt(
                    item, _Failure(f"integrity check failed: {checked.problems[0]}")
                )
            return
        self._succeed(item, checked, adopted=adopted)

    async def _attempt(self, item: WorkItem, paths: _Paths) -> _Checked:
        """Download (or complete) the body and land it; raise :class:`_Failure` on failure."""
        opts = self.options
        offset = 0
        with contextlib.suppress(FileNotFoundError):
            offset = os.stat(paths.part).st_size
        if offset and item.size is not None and offset >= item.size:
            if offset == item.size:  # a complete body that was never verified: check it now
                job = _Landing(paths, None, None, item.size, item.sha256, opts.verify, opts.fsync)
                return await self._in_thread(_land, job)
            _remove_part(paths)
            offset = 0
        sem = None
        if opts.host_limit < opts.concurrency:
            host = urlsplit(item.url).netloc
            sem = self._host_sems.get(host)
            if sem is None:
                sem = self._host_sems[host] = asyncio.Semaphore(opts.host_limit)
            await sem.acquire()
        try:
            slot = await self.limiter.acquire()
            try:
                sink = await self._receive(item, paths, offset, slot)
            finally:
                self.limiter.release()
        finally:
            if sem is not None:
                sem.release()
        job = _Landing(paths, sink.chunks, sink.fh, item.size, item.sha256, opts.verify, opts.fsync)
        sink.fh = None
        if job.fh is None and job.chunks is not None and sink.total <= _INLINE_LIMIT:
            checked = _land(job)
        else:
            checked = await self._in_thread(_land, job)
        if checked.problems:
            self.bytes_wasted += sink.received
        return checked

    def _proxy_for(self, url: URL) -> str | None:
        """The proxy for ``url`` from HTTP(S)_PROXY / NO_PROXY (read once per run), or None."""
        if not self._env_proxies:
            return None
        key = (url.scheme, url.host or "")
        if key not in self._proxy_cache:
            proxy = self._env_proxies.get(url.scheme)
            if proxy and url.host and urllib.request.proxy_bypass(url.host):
                proxy = None
            self._proxy_cache[key] = proxy
        return self._proxy_cache[key]

    async def _open(self, url: str, headers: dict[str, str]) -> aiohttp.ClientResponse:
        """GET ``url`` following redirects ourselves, so private headers stay on their host."""
        session = self._session
        assert session is not None
        extra = self.options.headers
        # Without certificate checks HTTPS proves nothing about the peer: no token then.
        token = self.options.token if self.options.ssl_verify else None
        origin = _origin(url) if extra or token else None
        target: str | URL = url
        for _ in range(MAX_REDIRECTS + 1):
            send = headers
            same_origin = origin is not None and _origin(target) == origin
            if extra and same_origin:
                send = {**headers, **extra}
            if token and same_origin:
                send = {**send, **_auth.auth_headers(str(target), token, self.options.token_hosts)}
            proxy = self._proxy_for(URL(target)) if self._env_proxies else None
            try:
                resp = await _within(
                    session.get(target, headers=send, allow_redirects=False, proxy=proxy),
                    self.options.timeout,
                )
            except asyncio.TimeoutError as exc:
                raise _Failure(
                    f"no response within {self.options.timeout:g} s", keep_part=True
                ) from exc
            except aiohttp.InvalidURL as exc:
                raise _Failure(f"invalid URL: {exc}", transient=False) from exc
            except aiohttp.ClientConnectorCertificateError as exc:
                # No retry cures a certificate the system does not trust: say so at once.
                host = URL(target).host
                raise _Failure(
                    f"TLS certificate of {host} not trusted "
                    f"({_cert_reason(exc)}); --insecure skips the check (unsafe)",
                    transient=False,
                ) from exc
            except (aiohttp.ClientError, OSError) as exc:
                raise _Failure(f"connection failed: {type(exc).__name__}", keep_part=True) from exc
            if resp.status in REDIRECT_STATUSES and "Location" in resp.headers:
                location = resp.headers["Location"]
                resp.release()
                try:
                    target = resp.url.join(URL(location))
                except ValueError as exc:
                    raise _Failure(f"bad redirect: {location!r}", transient=False) from exc
                if target.scheme not in ("http", "https"):
                    raise _Failure(f"redirect to unsupported URL {location!r}", transient=False)
                continue
            return resp
        raise _Failure(f"more than {MAX_REDIRECTS} redirects", transient=False)

    async def _receive(self, item: WorkItem, paths: _Paths, offset: int, slot: Slot) -> _Sink:
        """One HTTP exchange: request (resuming at ``offset``), check headers, stream the body."""
        loop = asyncio.get_running_loop()
        headers: dict[str, str] = {}
        if offset:
            headers["Range"] = f"bytes={offset}-"
            etag = _read_etag(paths)
            if etag:
                headers["If-Range"] = etag
        resp = await self._open(item.url, headers)
        sink: _Sink | None = None
        now = loop.time()
        transfer = _Transfer(item.uri, last_data=now, window_start=now, response=resp)
        key = id(transfer)
        self._transfers[key] = transfer
        try:
            status = resp.status
            if status in (200, 206):
                self.limiter.accepted(slot)
            if status == 200:
                if offset:
                    log.debug("%s: whole body instead of a range: restarting at 0", item.uri)
                    _remove_part(paths)  # never append a whole body to a prefix
                offset = 0
            elif status == 206:
                if not offset:
                    raise _Failure("HTTP 206 partial content without a range request")
                self._check_content_range(resp, offset, item.size)
            elif status == 416:
                _remove_part(paths)
                raise _Failure("HTTP 416 range not satisfiable: restarting", status=416)
            else:
                failure = _status_failure(resp)
                if failure.congestion:
                    self.limiter.congestion(slot, failure.retry_after)
                raise failure
            content_type = resp.content_type or ""
            if content_type == "text/html" and not paths.final.lower().endswith((".html", ".htm")):
                raise _Failure("HTML page instead of the file (Content-Type text/html)")
            length = resp.content_length
            if length is not None and item.size is not None and offset + length != item.size:
                raise _Failure(
                    f"server announces {offset + length} bytes, the product table {item.size}"
                )
            etag = resp.headers.get("ETag")
            # A body known to be large goes to the .part from its first byte.
            spool = 0 if (item.size or length or 0) > _INLINE_LIMIT else _INLINE_LIMIT
            sink = _Sink(paths, offset, spool, self.options.memory_limit, etag)
            transfer.sink = sink
            transfer.offset = offset
            await self._stream(resp, sink, transfer, paths, item)
            resp.release()
            return sink
        except _Failure as failure:
            resp.close()
            if sink is not None:
                self.bytes_wasted += sink.received
                # Keep good bytes of a body on disk for a Range resume; a small one is
                # cheaper to fetch again than to track.
                if failure.keep_part and sink.fh is not None:
                    sink.park()
                else:
                    sink.discard()
            raise
        except asyncio.CancelledError:
            resp.close()
            if sink is not None:
                sink.park()
            raise
        except BaseException:
            resp.close()
            if sink is not None:
                sink.discard()
            raise
        finally:
            del self._transfers[key]

    def _check_content_range(
        self, resp: aiohttp.ClientResponse, offset: int, size: int | None
    ) -> None:
        value = resp.headers.get("Content-Range", "")
        match = re.fullmatch(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", value)
        if not match or int(match.group(1)) != offset:
            raise _Failure(f"bad Content-Range {value!r} for a resume at {offset}")
        total = match.group(3)
        if size is not None and total != "*" and int(total) != size:
            raise _Failure(f"server's file has {total} bytes, the product table {size}")

    async def _stream(
        self,
        resp: aiohttp.ClientResponse,
        sink: _Sink,
        transfer: _Transfer,
        paths: _Paths,
        item: WorkItem,
    ) -> None:
        """Move the body into ``sink``, checking the first bytes of a FITS file."""
        loop = asyncio.get_running_loop()
        content = resp.content
        events = self.events
        rate = self._rate
        head = b"" if (paths.is_fits and sink.offset == 0) else None
        while True:
            try:
                chunk = await content.readany()
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
                if transfer.abort_reason:
                    raise _Failure(transfer.abort_reason, keep_part=True) from exc
                raise _Failure(
                    f"connection lost mid-body ({type(exc).__name__})", keep_part=True
                ) from exc
            if not chunk:
                break
            if head is not None:
                head += chunk[:80]
                if len(head) >= 80:
                    self._check_head(head)
                    head = None
            sink.write(chunk)
            n = len(chunk)
            transfer.received += n
            transfer.last_data = loop.time()
            self.bytes_downloaded += n
            events.on_bytes(n)
            if rate is not None:
                await rate.consume(n)
                transfer.last_data = loop.time()
        if transfer.abort_reason:
            raise _Failure(transfer.abort_reason, keep_part=True)
        if head is not None:
            self._check_head(head)
        if item.size is not None and sink.total != item.size:
            raise _Failure(
                f"body ended early: {sink.total} of {item.size} bytes",
                keep_part=sink.total < item.size,
            )

    @staticmethod
    def _check_head(head: bytes) -> None:
        if _verify.looks_like_fits(head):
            return
        if _verify.looks_like_html(head):
            raise _Failure("HTML page instead of a FITS file")
        raise _Failure("not a FITS file (bad first bytes)")

    # -- outcomes ---------------------------------------------------------------------------
    def _succeed(self, item: WorkItem, checked: _Checked, adopted: bool) -> None:
        # --verify size computes no digest: record NULL ("unknown"), not a digest that is "".
        self.store.finish(item.uri, checked.size, checked.sha256 or None)  # type: ignore[arg-type]
        self._run_attempts.pop(item.uri, None)
        if adopted:
            self.adopted += 1
        else:
            self.downloaded += 1
            self.limiter.success()
        self.events.on_file(item.uri, True, None)

    def _give_up(self, item: WorkItem, failure: _Failure, message: str | None = None) -> None:
        text = message or failure.message
        self.store.fail(item.uri, text, retry=False, http_status=failure.status)
        self._run_attempts.pop(item.uri, None)
        self.failed += 1
        log.warning("%s: %s", item.uri, text)
        self.events.on_file(item.uri, False, text)

    def _failed_attempt(self, item: WorkItem, failure: _Failure) -> None:
        """Count the attempt in the state; retry later or give up."""
        if not failure.transient:
            self._give_up(item, failure)
            return
        n = self._run_attempts.get(item.uri, 0) + 1
        if n > self.options.retries:
            self._give_up(item, failure, f"{failure.message} (gave up after {n} attempts)")
            return
        self._run_attempts[item.uri] = n
        delay = self._backoff(n, failure.retry_after)
        loop = asyncio.get_running_loop()
        self._not_before[item.uri] = loop.time() + delay
        self.store.fail(item.uri, failure.message, retry=True, http_status=failure.status)
        self._may_claim = True
        self.retried += 1
        log.debug("%s: %s; retry %d in %.2f s", item.uri, failure.message, n, delay)
        self.events.on_retry(item.uri, failure.message)

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        """Exponential backoff with full jitter, but never less than the server asked for."""
        opts = self.options
        ceiling = min(opts.backoff_max, opts.backoff_base * (2 ** (attempt - 1)))
        delay = random.uniform(ceiling / 2, ceiling)
        if retry_after is not None:
            delay = max(delay, retry_after)
        return delay

    # -- watching ---------------------------------------------------------------------------
    async def _watch(self) -> None:
        """Abort stalled bodies, record progress of large ones, keep state commits flowing."""
        loop = asyncio.get_running_loop()
        opts = self.options
        tick = max(0.02, min(1.0, opts.stall_timeout / 4))
        window = opts.speed_window or max(opts.stall_timeout, 10.0)
        check_speed = opts.min_speed > 0 and opts.max_rate is None
        last_flush = loop.time()
        while True:
            await asyncio.sleep(tick)
            now = loop.time()
            for transfer in list(self._transfers.values()):
                if transfer.abort_reason is not None:
                    continue
                idle = now - transfer.last_data
                reason = None
                if idle > opts.stall_timeout:
                    reason = f"stalled: no data for {opts.stall_timeout:g} s"
                elif check_speed and now - transfer.window_start >= window:
                    speed = (transfer.received - transfer.window_bytes) / (
                        now - transfer.window_start
                    )
                    if speed < opts.min_speed:
                        reason = f"too slow: below {opts.min_speed:g} B/s for {window:g} s"
                    transfer.window_start = now
                    transfer.window_bytes = transfer.received
                if reason is not None:
                    transfer.abort_reason = reason
                    if transfer.response is not None:
                        transfer.response.close()
            if now - last_flush >= 1.0:
                last_flush = now
                self._record_progress()
                if self._meta_dirty:
                    self._meta_dirty = False
                    self._meta("fetch.concurrency", str(self.limiter.limit))
                self.store.flush()

    def _record_progress(self) -> None:
        """Flush the ``.part`` of each streaming body and record its length in the state.

        Flushing first makes the recorded count true on disk, and bounds what a kill -9 can
        lose of a partial body to one tick of data.
        """
        for transfer in self._transfers.values():
            sink = transfer.sink
            if sink is None or sink.fh is None:
                continue
            total = transfer.offset + transfer.received
            if total == transfer.reported:
                continue
            try:
                sink.fh.flush()
            except OSError:
                continue  # the write path reports it
            transfer.reported = total
            self.store.record_progress(transfer.uri, total)


# ------------------------------------------------------------------------------------------
# synchronous entry point
# ------------------------------------------------------------------------------------------


def fetch(
    store: JobStore,
    root: str | os.PathLike[str],
    options: FetchOptions | None = None,
    events: FetchEvents | None = None,
    *,
    install_signals: bool = False,
) -> FetchResult:
    """Run a :class:`Fetcher` to completion from synchronous code; return its result.

    Works from a plain script and from a thread whose event loop is already running (Jupyter):
    then the run happens in a new thread with its own loop, and Ctrl-C in the caller's thread
    stops it gracefully. ``install_signals`` wires SIGINT/SIGTERM to a graceful stop (only
    possible in the main thread without a running loop).
    """
    fetcher = Fetcher(store, root, options, events)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(_run_with_signals(fetcher, install_signals))

    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = asyncio.run(fetcher.run())
        except BaseException as exc:  # handed to the caller's thread below
            box["error"] = exc

    thread = threading.Thread(target=target, name="bulkfetch-fetch", daemon=True)
    thread.start()
    while thread.is_alive():
        try:
            thread.join(0.2)
        except KeyboardInterrupt:
            fetcher.request_stop(int(signal.SIGINT))
    if "error" in box:
        raise box["error"]
    return box["result"]


async def _run_with_signals(fetcher: Fetcher, install: bool) -> FetchResult:
    guard = fetcher.install_signal_handlers() if install else None
    try:
        return await fetcher.run()
    finally:
        if guard is not None:
            guard.remove()


__all__ = [
    "AdaptiveLimiter",
    "FetchEvents",
    "FetchOptions",
    "FetchResult",
    "Fetcher",
    "NullEvents",
    "RateLimiter",
    "SignalGuard",
    "VERIFY_MODES",
    "fetch",
    "parse_rate",
    "parse_retry_after",
]
