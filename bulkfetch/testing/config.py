"""Every knob of the simulated MAST archive, in one dataclass shared by its parts.

The catalog (``catalog.py``), the query API (``query_api.py``) and the download server
(``mast.py``) all read the same :class:`SimConfig`, so a test, a benchmark or ``--simulate``
describes a whole archive in one value. Rates are probabilities per request in [0, 1]; every
random choice is derived from ``seed`` so a run can be replayed.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SimConfig:
    """Catalog shape, realism knobs and fault-injection rates of one simulated archive."""

    # -- catalog ------------------------------------------------------------------------------
    seed: int = 0
    #: Explicit sector numbers; when None: ``1 .. n_sectors-1`` plus the special sector 1751.
    sectors: tuple[int, ...] | None = None
    n_sectors: int = 4
    #: 2-min targets (single-sector time-series observations) per sector.
    targets_per_sector: int = 20
    #: Multiplies every product size (1.0 = realistic, LC about 2 MB). Sizes stay multiples of
    #: 2880 bytes (FITS blocks) with a floor of a few blocks, so tiny scales still give valid FITS.
    scale: float = 1.0
    #: Fraction of targets that also have 20-s (FAST-LC/FAST-TP) products in a sector.
    fast_fraction: float = 0.1
    #: Fraction of targets with a single-sector DV result (and multi-sector DV runs).
    dv_fraction: float = 0.2

    # -- realism ------------------------------------------------------------------------------
    #: Seconds before the first byte of a download response.
    latency: float = 0.0
    #: Bytes per second per connection (None: unlimited).
    conn_bandwidth: float | None = None
    #: Bytes per second for all download bodies together (None: unlimited).
    total_bandwidth: float | None = None
    #: Concurrent download requests allowed; beyond it 503 with Retry-After (None: no cap).
    max_connections: int | None = None
    #: Seconds added to every query API call (invoke, columnsconfig).
    query_latency: float = 0.0
    #: When True the server ignores Range headers and always answers 200 with the whole body.
    ignore_range: bool = False

    # -- faults (per download request unless said otherwise) ----------------------------------
    fail_500: float = 0.0
    fail_503: float = 0.0
    fail_429: float = 0.0
    #: Value of the Retry-After header sent with 429 and 503, in seconds.
    retry_after: float = 1.0
    #: Connection reset part-way through the body.
    reset_rate: float = 0.0
    #: Body ends early (fewer bytes than Content-Length), connection closed.
    truncate_rate: float = 0.0
    #: Status 200, correct length, some bytes flipped.
    corrupt_rate: float = 0.0
    #: Body stops mid-way for ``stall_seconds`` (then the connection is closed).
    stall_rate: float = 0.0
    stall_seconds: float = 30.0
    #: Status 200 with an HTML error page instead of the file.
    html_rate: float = 0.0
    #: Fraction of URIs that are permanently missing (404 on every attempt): a fixed subset.
    missing_rate: float = 0.0
    #: Fraction of query API calls (invoke) that fail with HTTP 500/503.
    query_fail_rate: float = 0.0

    #: Extra free-form knobs for experiments, ignored by the parts that do not know them.
    extra: dict[str, float] = field(default_factory=dict)

    def sector_numbers(self) -> list[int]:
        """The sectors this archive holds, ascending; deliberately not contiguous."""
        if self.sectors is not None:
            return sorted(set(self.sectors))
        return list(range(1, max(self.n_sectors, 2))) + [1751]
