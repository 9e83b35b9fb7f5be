"""The PLAN stage: turn a selection into product rows in the job state.

A selection (sectors, targets, product kinds, observation criteria, product filters) becomes
rows of the job state through astroquery, unmodified:

1. sectors: the ones given, or every sector that exists, discovered from the archive's FFI
   observations (one per sector and camera/CCD), never assumed to be contiguous (1751 exists);
2. per sector ``Observations.query_criteria(obs_collection='TESS', dataproduct_type='timeseries',
   sequence_number=S, ...)``; a sector is small enough (~20,000 2-min targets) that no query
   nears MAST's ~500,000 row limit, and a result that does is split by right ascension;
3. ``get_product_list`` in batches of a few hundred obsids (astroquery 0.4.11 would otherwise put
   every obsid of the table into one POST body), several batches in flight on worker threads,
   each thread with its own ``ObservationsClass`` (an instance remembers the service of its last
   request, so one instance cannot serve two threads), each call retried with backoff;
4. ``filter_products`` by product kind and by the user's filters, dedupe by ``dataURI``;
5. rows into the job state one sector at a time, so memory does not grow with the number of
   sectors, and the sector marked planned ("unit") only after its rows are committed.

Idempotence: a unit is ``sector:S|<kind>|<fingerprint of the rest of the selection>``. A unit
planned before is not queried again, so the same command twice sends no query, an interrupted
plan resumes with the sectors it did not finish, and a wider selection (more sectors, another
kind) queries only what is new. Rows are keyed by ``dataURI`` in the store, so overlapping
selections never duplicate a product.

Tables (``--from-table``) and MAST's bulk curl scripts (``tesscurl_sector_N_lc.sh``) become the
same kind of rows without any query.

Modules, in the order the data flows: :mod:`.selection` (what to plan, parsing it),
:mod:`.archive` (astroquery calls, retries, sector discovery), :mod:`.rows` (answers and tables ->
checked rows), :mod:`.dv` (superseded DV runs), :mod:`.query` (the scheduler and :func:`plan`),
:mod:`.offline` (tables, curl scripts, export), :mod:`.summary` (what a plan found).
"""

from __future__ import annotations

from .archive import (
    DISCOVERY_MAX_AGE,
    MAX_BACKOFF,
    QUERY_TIMEOUT,
    column_names,
    discover_sectors,
    validate_columns,
)
from .dv import (
    LatestDV,
    dv_run,
    prune_superseded_dv,
)
from .offline import (
    export_plan,
    iter_planned,
    plan_curl_scripts,
    plan_table,
    product_from_filename,
    read_curl_script,
    read_table,
)
from .query import (
    MAX_QUERY_ROWS,
    OBS_PAGESIZE,
    OBS_ROWS_IN_FLIGHT,
    PRODUCT_ROWS_IN_FLIGHT,
    SECTOR_ROWS_STARTED,
    TARGETS_PER_QUERY,
    plan,
)
from .rows import (
    MAX_EXAMPLES,
    local_path,
    rows_from_table,
    sector_from_name,
)
from .selection import (
    DEFAULT_KINDS,
    DV_SUBGROUPS,
    PRODUCT_COLUMNS,
    PRODUCT_KINDS,
    Selection,
    parse_key_values,
    parse_kinds,
    parse_sectors,
    parse_targets,
    read_targets_file,
    unit_name,
)
from .summary import (
    PlanSummary,
)

__all__ = [
    "DEFAULT_KINDS",
    "DISCOVERY_MAX_AGE",
    "DV_SUBGROUPS",
    "LatestDV",
    "MAX_BACKOFF",
    "MAX_EXAMPLES",
    "MAX_QUERY_ROWS",
    "OBS_PAGESIZE",
    "OBS_ROWS_IN_FLIGHT",
    "PRODUCT_COLUMNS",
    "PRODUCT_KINDS",
    "PRODUCT_ROWS_IN_FLIGHT",
    "PlanSummary",
    "QUERY_TIMEOUT",
    "SECTOR_ROWS_STARTED",
    "Selection",
    "TARGETS_PER_QUERY",
    "column_names",
    "discover_sectors",
    "dv_run",
    "export_plan",
    "iter_planned",
    "local_path",
    "parse_key_values",
    "parse_kinds",
    "parse_sectors",
    "parse_targets",
    "plan",
    "plan_curl_scripts",
    "plan_table",
    "product_from_filename",
    "prune_superseded_dv",
    "read_curl_script",
    "read_table",
    "read_targets_file",
    "rows_from_table",
    "sector_from_name",
    "unit_name",
    "validate_columns",
]
