"""The simulated archive's catalog: every TESS observation and product, derived on demand.

Nothing is generated up front. Every observation is named by a *key* ``(si, cat, idx)``: sector
index ``si`` into :meth:`SimConfig.sector_numbers`, a category (2-min target, 20-s target,
multi-sector DV run, FFI) and an index inside that sector and category. Counts per (sector,
category) are O(1) arithmetic, so the whole archive is a concatenation of integer ranges; a page of
a query is a slice of those ranges, and its rows are computed from the key alone. The obsid number
encodes the key, and every obs_id, TIC id and product filename decodes back to it in O(1). This
keeps the catalog at O(page) work and O(1) memory even for the full TESS 2-min set
(``n_sectors=100, targets_per_sector=20000``: 2 M 2-min observations, 2.55 M with the 20-s ones
and DV runs, 7.6 M products with the default fractions). Only filters that no fast path resolves
(e.g. a wildcard on target_name) cost a scan of the observations the other filters leave.

Modelling choices (as close to real MAST as known, and where not, chosen to be useful):

* **Targets.** A pool of targets (pool index ``g``) is mapped to TIC ids by a seeded affine
  bijection modulo the prime 2**31-1, so TIC ids look random yet invert in O(1). The first
  ``targets_per_sector // 10`` pool entries are "continuous viewing zone" targets observed in
  every sector; the others are observed in a sliding window of about two consecutive sectors.
  So ``target_name=X`` never scans: a TIC decodes to ``g`` and ``g`` to its sectors.
* **20-s data** are separate observations, as in real MAST: obs_id ``...-<scid>-a_fast``,
  ``t_exptime`` 20, products ``_fast-lc.fits`` (FAST-LC) and ``_fast-tp.fits`` (FAST-TP). Real
  TESS only has them from sector 27 on; here any sector may have them so small test archives do.
* **Single-sector DV** results (DVT, DVR, DVM, DVS per TCE) are extra products of the target's
  2-min observation (real MAST does the same); their ``obs_id`` column is the DV id
  (``tess<dv ts>-s0001-s0001-<tic>-<run>``), so astroquery files them in their own directory.
* **Multi-sector DV** runs cover sectors ``S[0]..S[e]`` for e in 2, 5, 12, 25, 38, ... and the
  last sector. A DV target is in the first run covering two of its sectors and in the last,
  widest run (continuous-viewing-zone targets: in every run), so older, narrower runs are
  superseded by newer, wider ones (different pipeline run numbers and release dates) without
  every run repeating every target. Each run is its own observation;
  its ``sequence_number`` is the run's LAST sector, because that is when the run is produced: a
  per-sector plan (``sequence_number=S``) finds the runs that sector completed.
* **FFIs.** 16 image observations per sector (``tess-s0001-1-1`` .. ``-4-4``, target ``TESS
  FFI``) with no products; they exist so a planner can discover sectors by querying them.
* **Checksums.** Files of sectors <= :data:`EARLY_SECTOR_MAX` carry CHECKSUM but no DATASUM, as
  early SPOC products do (``has_datasum=False``); multi-sector DV files follow their last sector.
  Non-FITS files (PDF, XML) have no FITS checksums at all, so ``has_datasum`` is False for them.
"""

from __future__ import annotations

import json
import math
import re
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from itertools import accumulate
from typing import Any, NamedTuple

from .config import SimConfig

# -- constants ------------------------------------------------------------------------------------

#: Files of sectors up to this one lack the DATASUM keyword (CHECKSUM only), like early SPOC files.
EARLY_SECTOR_MAX = 3
#: Smallest FITS file the catalog ever lists, in 2880-byte blocks (headers of a few HDUs).
MIN_FITS_BLOCKS = 4
FITS_BLOCK = 2880
#: Smallest non-FITS file (PDF/XML) in bytes.
MIN_OTHER_BYTES = 4096

URI_PREFIX = "mast:TESS/product/"

#: Observation categories, in the order they appear inside a sector.
CAT_2MIN, CAT_FAST, CAT_MDV, CAT_FFI = 0, 1, 2, 3
N_CATS = 4
FFI_PER_SECTOR = 16

#: obsid = (si + 1) * SECTOR_SPAN + cat * CAT_SPAN + idx: decodable by integer division.
CAT_SPAN = 10**7
SECTOR_SPAN = 10 * CAT_SPAN  # room for 10 categories per sector

_MASK64 = (1 << 64) - 1
_TIC_PRIME = 2**31 - 1  # TIC ids in 1 .. 2**31-1, as real TIC 8 ids (up to ~2.0e9)
_SPREAD_DEN = 10**6
_SECTOR1_START = datetime(2018, 7, 25, 4, 58, 59)  # tess2018206045859
_MJD_EPOCH = datetime(1858, 11, 17)
_SECTOR_DAYS = 27.4
_DV_DELAY = timedelta(hours=14, minutes=2, seconds=43)  # tess2018206045859 -> tess2018206190142
_MDV_ENDS = (2, 5, 12)  # then every 13 sectors, like SPOC's s1-s3, s1-s6, s1-s13, ...
_CLASSIFICATIONS = ("", "", "", "", "", "STAR", "EB", "Exoplanet host;STAR", "VARIABLE", "RR Lyr")
_PROPOSALS = (
    "G011112_G011183",
    "G011154",
    "G011176_G011180",
    "G022071",
    "G022197_G022254",
    "G03221",
    "G04242",
    "G05038_G05154",
)

# -- column definitions ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    """One catalog column: its JSON ``fields`` type, and what columnsconfig says about it."""

    name: str
    field_type: str  # type in the invoke answer's "fields" (astroquery parse_type)
    vot_type: str  # vot.datatype in columnsconfig ("double" makes astroquery filter by range)
    text: str
    description: str
    unit: str = ""
    separator: str = ""
    example: str = ""


_S, _F, _I, _B = "string", "float", "int", "boolean"

OBS_COLUMNS: tuple[Column, ...] = (
    Column(
        "intentType",
        _S,
        "char",
        "Observation Type",
        "Whether observation is for science or calibration.",
        example="science",
    ),
    Column(
        "obs_collection",
        _S,
        "char",
        "Mission",
        "Collection name, e.g. the mission.",
        separator=";",
        example="TESS",
    ),
    Column(
        "provenance_name",
        _S,
        "char",
        "Provenance Name",
        "Provenance name, or source of data.",
        example="SPOC",
    ),
    Column(
        "instrument_name",
        _S,
        "char",
        "Instrument",
        "Instrument name.",
        separator=";",
        example="Photometer",
    ),
    Column("project", _S, "char", "Project", "Processing project.", example="TESS"),
    Column(
        "filters", _S, "char", "Filters", "Filters or bandpass used.", separator=";", example="TESS"
    ),
    Column(
        "wavelength_region",
        _S,
        "char",
        "Waveband",
        "Energy band.",
        separator=";",
        example="Optical",
    ),
    Column(
        "target_name",
        _S,
        "char",
        "Target Name",
        "Target name designated by the observer.",
        example="25132999",
    ),
    Column(
        "target_classification",
        _S,
        "char",
        "Target Classification",
        "Type of target.",
        separator=";",
        example="STAR",
    ),
    Column(
        "obs_id",
        _S,
        "char",
        "Observation ID",
        "Observation identifier, given by mission.",
        example="tess2018206045859-s0001-0000000025132999-0120-s",
    ),
    Column(
        "s_ra",
        _F,
        "double",
        "RA",
        "Observation Right Ascension (ICRS).",
        unit="deg",
        example="120.5",
    ),
    Column(
        "s_dec", _F, "double", "Dec", "Observation Declination (ICRS).", unit="deg", example="-60.2"
    ),
    Column(
        "dataproduct_type",
        _S,
        "char",
        "Product Type",
        "Data product type: image, spectrum, timeseries, ...",
        example="timeseries",
    ),
    Column(
        "proposal_pi",
        _S,
        "char",
        "Principal Investigator",
        "Principal investigator's last name.",
        example="Ricker, George",
    ),
    Column(
        "calib_level",
        _I,
        "int",
        "Calibration Level",
        "Product level: 0 raw .. 4 high-level science products.",
        example="3",
    ),
    Column(
        "t_min",
        _F,
        "double",
        "Start Time",
        "Observation start datetime.",
        unit="MJD",
        example="58324.2076",
    ),
    Column(
        "t_max",
        _F,
        "double",
        "End Time",
        "Observation end datetime.",
        unit="MJD",
        example="58352.6826",
    ),
    Column(
        "t_exptime", _F, "double", "Exposure Length", "Exposure time.", unit="sec", example="120"
    ),
    Column(
        "em_min", _F, "double", "Min. Wavelength", "Minimum wavelength.", unit="nm", example="600"
    ),
    Column(
        "em_max", _F, "double", "Max. Wavelength", "Maximum wavelength.", unit="nm", example="1000"
    ),
    Column("obs_title", _S, "char", "Observation Title", "Observation description from PI."),
    Column(
        "t_obs_release",
        _F,
        "double",
        "Release Date",
        "Dataset release date.",
        unit="MJD",
        example="58383.5",
    ),
    Column("proposal_id", _S, "char", "Proposal ID", "Proposal ID.", example="G011112_G011183"),
    Column(
        "proposal_type", _S, "char", "Proposal Type", "Type of telescope proposal.", example="GI"
    ),
    Column(
        "sequence_number",
        _I,
        "int",
        "Sequence Number",
        "Sequence number, e.g. the TESS sector.",
        example="1",
    ),
    Column(
        "s_region",
        _S,
        "char",
        "s_region",
        "ICRS shape describing the observation footprint.",
        example="CIRCLE ICRS 120.5 -60.2 0.00138889",
    ),
    Column("jpegURL", _S, "char", "Preview Image", "Preview image URL."),
    Column(
        "dataURL",
        _S,
        "char",
        "Product URL",
        "Data product URL (the main product).",
        example="mast:TESS/product/tess2018206045859-s0001-0000000025132999-0120-s_lc.fits",
    ),
    Column(
        "dataRights",
        _S,
        "char",
        "Data Rights",
        "Data rights: PUBLIC, EXCLUSIVE_ACCESS.",
        example="PUBLIC",
    ),
    Column("mtFlag", _B, "boolean", "Moving Target", "Moving target flag."),
    Column(
        "srcDen",
        _F,
        "double",
        "Number of Catalog Objects",
        "Number of cataloged objects found in the observation footprint.",
    ),
    Column(
        "obsid",
        _S,
        "long",
        "Product Group ID",
        "Database identifier of the observation; pass it to get_product_list.",
        example="100000000",
    ),
    Column("objID", _S, "long", "Object ID", "Internal object identifier.", example="200100000000"),
)

PRODUCT_COLUMNS: tuple[Column, ...] = (
    Column("obsID", _S, "char", "Product Group ID", "Database identifier of the product group."),
    Column("obs_collection", _S, "char", "Mission", "Collection name.", example="TESS"),
    Column(
        "dataproduct_type",
        _S,
        "char",
        "Product Type",
        "Observation product type.",
        example="timeseries",
    ),
    Column("obs_id", _S, "char", "Observation ID", "Observation identifier, given by mission."),
    Column("description", _S, "char", "Description", "Description of the product."),
    Column("type", _S, "char", "Type", "S = simple product, C = composite."),
    Column("dataURI", _S, "char", "URI", "Data product URI; append to the download URL."),
    Column("productType", _S, "char", "Product Type", "SCIENCE, CALIBRATION, AUXILIARY, INFO."),
    Column(
        "productGroupDescription",
        _S,
        "char",
        "Product Group",
        "Product group, e.g. Minimum Recommended Products.",
    ),
    Column(
        "productSubGroupDescription",
        _S,
        "char",
        "Product Subgroup",
        "Product subgroup, e.g. LC, TP, DVT.",
        example="LC",
    ),
    Column(
        "productDocumentationURL",
        _S,
        "char",
        "Product Documentation",
        "Link to documentation for the product.",
    ),
    Column("project", _S, "char", "Project", "Processing project.", example="TESS"),
    Column("prvversion", _S, "char", "Product Version", "Version of the pipeline that made it."),
    Column("proposal_id", _S, "char", "Proposal ID", "Proposal ID."),
    Column("productFilename", _S, "char", "Filename", "Product file name."),
    Column("size", _I, "long", "Size", "File size.", unit="bytes"),
    Column(
        "parent_obsid",
        _S,
        "char",
        "Parent Observation ID",
        "obsid of the observation this product belongs to.",
    ),
    Column("dataRights", _S, "char", "Data Rights", "Data rights.", example="PUBLIC"),
    Column("calib_level", _I, "int", "Calibration Level", "Product calibration level."),
    Column("filters", _S, "char", "Filters", "Filters or bandpass used.", example="TESS"),
)

#: Added after objID by the positional services (Filtered.Position, Cone).
DISTANCE_COLUMN = Column(
    "distance",
    _F,
    "float",
    'Distance (")',
    "Angular separation between searched coordinates and center of observation.",
    unit="arcsec",
)
#: Retired columns real MAST still lists in its column config, flagged "remove".
_REMOVED_COLUMNS = (
    ("obs_creator_name", "Creator"),
    ("s_fov", "FOV"),
    ("obs_release_date", "Release Date"),
)
#: Real MAST ends every row with a "_selected_": null column that astroquery drops.
_SELECTED_FIELD = {"name": "_selected_", "type": "boolean"}
_SELECTED_TAIL = ',"_selected_":null}'

OBS_COLUMN_NAMES = tuple(c.name for c in OBS_COLUMNS)
PRODUCT_COLUMN_NAMES = tuple(c.name for c in PRODUCT_COLUMNS)
_OBS_BY_LOWER = {c.name.lower(): c for c in OBS_COLUMNS}
#: Columns whose exact values decode straight to observation keys.
_EXPLICIT_COLUMNS = ("target_name", "obs_id", "obsid")

#: Per product kind: (description, productType, productGroupDescription).
_KINDS: dict[str, tuple[str, str, str | None]] = {
    "LC": ("Light curves", "SCIENCE", "Minimum Recommended Products"),
    "TP": ("Target pixel files", "SCIENCE", None),
    "FAST-LC": ("Fast-cadence light curves", "SCIENCE", "Minimum Recommended Products"),
    "FAST-TP": ("Fast-cadence target pixel files", "SCIENCE", None),
    "DVT": ("Data validation time series", "AUXILIARY", None),
    "DVR": ("Data validation full report", "INFO", None),
    "DVM": ("Data validation report (XML)", "INFO", None),
    "DVS": ("TCE summary report", "INFO", None),
}

Key = tuple[int, int, int]


@dataclass(frozen=True)
class ProductInfo:
    """What the download server needs to serve one product: its name, size and kind."""

    uri: str  # dataURI
    filename: str  # productFilename
    size: int  # bytes; a multiple of 2880 for .fits files
    kind: str  # productSubGroupDescription
    sector: int | None  # single sector, or None for multi-sector DV
    has_datasum: bool  # False for early sectors' FITS files and for non-FITS files


# -- small deterministic helpers ------------------------------------------------------------------


def _mix(x: int) -> int:
    """splitmix64 finaliser: a cheap, well-spread 64-bit hash of an integer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _hash(seed: int, *values: int) -> int:
    """Hash of the seed and integers; every random-looking choice in the catalog comes from it."""
    h = _mix(seed & _MASK64)
    for v in values:
        h = _mix(h ^ (v & _MASK64))
    return h


def _unit(h: int) -> float:
    """Map a 64-bit hash to a float in [0, 1)."""
    return (h >> 11) / 9007199254740992.0


class _Spread:
    """An even, phase-shifted selection of a fraction of the integers 0, 1, 2, ...

    Membership, rank (members below x) and the i-th member are all O(1): that is what lets the
    catalog enumerate "the 20-s targets of a sector" or "the DV targets of a run" without a scan.
    """

    def __init__(self, fraction: float, phase: int) -> None:
        self.q = max(0, min(_SPREAD_DEN, round(fraction * _SPREAD_DEN)))
        self.phase = phase % _SPREAD_DEN
        self.c0 = self.phase * self.q // _SPREAD_DEN

    def below(self, x: int) -> int:
        """Number of members in [0, x)."""
        return (x + self.phase) * self.q // _SPREAD_DEN - self.c0

    def count(self, lo: int, hi: int) -> int:
        """Number of members in [lo, hi)."""
        return self.below(hi) - self.below(lo) if hi > lo else 0

    def member(self, x: int) -> bool:
        return self.below(x + 1) - self.below(x) == 1

    def select(self, i: int) -> int:
        """The i-th member (0-based) counting from 0."""
        need = (i + 1 + self.c0) * _SPREAD_DEN
        return -(-need // self.q) - 1 - self.phase


def _timestamp(dt: datetime) -> str:
    """TESS file-name timestamp: YYYYDDDHHMMSS (day of year)."""
    return f"{dt.year:04d}{dt.timetuple().tm_yday:03d}{dt.hour:02d}{dt.minute:02d}{dt.second:02d}"


def _mjd(dt: datetime) -> float:
    return round((dt - _MJD_EPOCH).total_seconds() / 86400.0, 6)


def _fits_size(nbytes: float) -> int:
    return max(MIN_FITS_BLOCKS, int(nbytes) // FITS_BLOCK) * FITS_BLOCK


def _like(pattern: str) -> re.Pattern[str]:
    """Compile an SQL LIKE pattern (% and _ wildcards), case-insensitive as MAST's database."""
    out = []
    for ch in pattern:
        if ch == "%":
            out.append(".*")
        elif ch == "_":
            out.append(".")
        else:
            out.append(re.escape(ch))
    return re.compile("".join(out), re.IGNORECASE | re.DOTALL)


class QueryError(ValueError):
    """A malformed request; the query API answers it with status ERROR and this message."""


# -- filters --------------------------------------------------------------------------------------


class _Filter:
    """One entry of a Mashup ``filters`` list, evaluated against python row values."""

    def __init__(self, entry: Any, columns: dict[str, Column]) -> None:
        if not isinstance(entry, dict) or "paramName" not in entry:
            raise QueryError(f"Malformed filter {entry!r}: need an object with paramName")
        name = str(entry["paramName"])
        col = columns.get(name.lower())
        if col is None:
            raise QueryError(f"Unknown filter column '{name}'")
        self.column = col.name
        values = entry.get("values", [])
        if not isinstance(values, list):
            raise QueryError(f"Filter '{name}': values must be a list")
        self.separator = entry.get("separator") or None
        self.ranges: list[tuple[float, float]] = []
        self.exact: set[str] = set()
        self.numbers: set[float] = set()
        for v in values:
            if isinstance(v, dict):
                try:
                    self.ranges.append((float(v["min"]), float(v["max"])))
                except (KeyError, TypeError, ValueError) as exc:
                    raise QueryError(f"Filter '{name}': bad range {v!r}") from exc
            else:
                text = str(v).strip()
                self.exact.add(text.lower())
                try:
                    self.numbers.add(float(text))
                except ValueError:
                    pass
        free = entry.get("freeText")
        self.free = _like(str(free)) if free not in (None, "") else None
        if not (self.exact or self.ranges) and self.free is None:
            raise QueryError(f"Filter '{name}' has no values")

    @property
    def exact_only(self) -> bool:
        """True when only exact values are given: the fast paths can resolve these."""
        return not self.ranges and self.free is None

    def matches(self, value: Any) -> bool:
        """Does a row's value satisfy this filter (OR across values, ranges and freeText)?"""
        if value is None:
            return False
        if isinstance(value, bool):
            parts = ["true" if value else "false"]
        elif isinstance(value, (int, float)):
            if self.ranges and any(lo <= value <= hi for lo, hi in self.ranges):
                return True
            if value in self.numbers:
                return True
            return self.free is not None and self.free.fullmatch(_num_text(value)) is not None
        else:
            text = str(value)
            parts = [p.strip() for p in text.split(self.separator)] if self.separator else [text]
            if self.separator and text not in parts:
                parts.append(text)
        for part in parts:
            low = part.lower()
            if low in self.exact:
                return True
            if self.free is not None and self.free.fullmatch(part):
                return True
            if self.ranges:
                try:
                    num = float(part)
                except ValueError:
                    continue
                if any(lo <= num <= hi for lo, hi in self.ranges):
                    return True
        return False


def _num_text(value: int | float) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


# -- JSON row templates ---------------------------------------------------------------------------


def _template(columns: Iterable[Column], const: dict[str, Any], fmt: dict[str, str]) -> str:
    """A %-format string producing one JSON row; constant columns are baked in.

    Variable values are inserted raw, so they must never contain ``"`` or ``\\``: every value the
    catalog generates (digits, file names, fixed words) satisfies that.
    """
    parts = []
    for col in columns:
        if col.name in const:
            baked = json.dumps(const[col.name]).replace("%", "%%")
            parts.append(f'"{col.name}":{baked}')
        else:
            parts.append(f'"{col.name}":{fmt[col.name]}')
    return "{" + ",".join(parts) + "}"


def _obs_template(const: dict[str, Any], fmt: dict[str, str]) -> str:
    """Observation row template, ending with the ``_selected_`` column like real MAST's rows."""
    return _template(OBS_COLUMNS, const, fmt)[:-1] + _SELECTED_TAIL


_OBS_VAR_FMT = {  # mapping placeholders: floats as repr (valid JSON), ints as %d
    "target_name": '"%(target_name)s"',
    "target_classification": '"%(target_classification)s"',
    "obs_id": '"%(obs_id)s"',
    "s_ra": "%(s_ra)r",
    "s_dec": "%(s_dec)r",
    "proposal_id": '"%(proposal_id)s"',
    "s_region": '"%(s_region)s"',
    "dataURL": '"%(dataURL)s"',
    "obsid": "%(obsid)d",
    "objID": "%(objID)d",
}
#: Variable columns of a target's observation, in column order (positional templates).
_OBS_VARS = tuple(_OBS_VAR_FMT)
_OBS_POS_FMT = {name: fmt.replace(f"%({name})", "%") for name, fmt in _OBS_VAR_FMT.items()}
#: Variable product columns, in column order: product templates take them positionally.
_PROD_VARS = (
    "obsID",
    "obs_id",
    "dataURI",
    "prvversion",
    "proposal_id",
    "productFilename",
    "size",
    "parent_obsid",
)
# obsID and parent_obsid are typed "string" in fields but sent as JSON numbers, like real MAST.
_PROD_VAR_FMT = {
    name: ("%d" if name in ("size", "obsID", "parent_obsid") else '"%s"') for name in _PROD_VARS
}
_KIND_SALT = {kind: _mix(i + 1000) for i, kind in enumerate(_KINDS)}
assert _PROD_VARS == tuple(c.name for c in PRODUCT_COLUMNS if c.name in _PROD_VARS)


def _prod_values(p: _Prod, obsid: int, proposal: str, prv: str) -> tuple[Any, ...]:
    """Values of the variable product columns, in :data:`_PROD_VARS` order."""
    return (obsid, p.obs_id, URI_PREFIX + p.filename, prv, proposal, p.filename, p.size, obsid)


# -- the catalog ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Sector:
    """Per-sector facts, precomputed once (a few hundred bytes per sector)."""

    number: int
    ts: str  # file-name timestamp of the sector's products
    dv_ts: str  # timestamp of the sector's DV run
    t_min: float
    t_max: float
    release: float
    scid: int
    dv_run: int
    prvversion: str
    ffi_exptime: float


class _Prod(NamedTuple):
    """A product as generated (before it becomes a JSON row or a ProductInfo)."""

    kind: str
    filename: str
    obs_id: str
    size: int
    sector: int | None
    has_datasum: bool


class Catalog:
    """The whole simulated TESS archive, computed on demand from a :class:`SimConfig`."""

    #: Entries kept in the caches of scanned queries and product lists (bounded memory).
    CACHE_ENTRIES = 4

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.seed = int(config.seed)
        self._scale = float(config.scale)  # catalog-shaping: fixed for the catalog's lifetime
        nums = config.sector_numbers()
        if not nums:
            raise ValueError("the catalog needs at least one sector")
        if any(not 0 < s <= 9999 for s in nums):
            raise ValueError("sector numbers must be in 1..9999")
        self._nums = nums
        self._sector_index = {s: i for i, s in enumerate(nums)}
        self.n_sectors = len(nums)
        n = max(0, int(config.targets_per_sector))
        if n >= CAT_SPAN:
            raise ValueError(f"targets_per_sector must be below {CAT_SPAN}")
        self.n_targets = n
        self.n_cvz = n // 10
        self.window = n - self.n_cvz
        self.stride = self.window // 2 if self.window >= 2 else self.window
        self.n_moving = (self.n_sectors - 1) * self.stride + self.window if self.window else 0
        self.pool_size = self.n_cvz + self.n_moving
        self._tic_a = 1 + _hash(self.seed, 1) % (_TIC_PRIME - 1)
        self._tic_b = _hash(self.seed, 2) % _TIC_PRIME
        self._tic_a_inv = pow(self._tic_a, -1, _TIC_PRIME)
        self._dv = _Spread(config.dv_fraction, _hash(self.seed, 3))
        self._fast = [
            _Spread(config.fast_fraction, _hash(self.seed, 4, i)) for i in range(self.n_sectors)
        ]
        self._target_salt = _hash(self.seed, 6)
        self._sector_salt = [_hash(self.seed, 9, s) for s in nums]
        self._sectors = [self._make_sector(i, s) for i, s in enumerate(nums)]
        self._mdv_ends = self._make_mdv_ends()
        self._mdv_parts: dict[int, list[tuple[int, int]]] = {}
        # Observations per (sector index, category): the whole archive is these ranges.
        self._counts = [
            [self._count(si, cat) for cat in range(N_CATS)] for si in range(self.n_sectors)
        ]
        self._seg_const: dict[tuple[int, int], dict[str, Any]] = {}
        self._seg_tmpl: dict[tuple[int, int], str] = {}
        self._always_const = set.intersection(
            *(set(self._segment_const(0, cat)) for cat in range(N_CATS))
        )
        self._prod_tmpl = {
            kind: _template(PRODUCT_COLUMNS, self._product_const(kind), _PROD_VAR_FMT)
            for kind in _KINDS
        }
        self._scan_cache: OrderedDict[str, array] = OrderedDict()
        self._plist_cache: OrderedDict[int, tuple[str, array, array]] = OrderedDict()

    # ---------------------------------------------------------------- geometry ---------------

    def sectors(self) -> list[int]:
        """Sector numbers the archive holds, ascending (not contiguous: includes e.g. 1751)."""
        return list(self._nums)

    def _make_sector(self, si: int, number: int) -> _Sector:
        # A special sector (1751) is no orbit count: date it by its place among the sectors,
        # so its file names carry a plausible year instead of the 22nd century.
        ordinal = number if number < 1000 else si + 1
        start = _SECTOR1_START + timedelta(days=_SECTOR_DAYS * (ordinal - 1))
        start = start.replace(microsecond=0)
        end = start + timedelta(days=_SECTOR_DAYS - 0.6)
        release = end + timedelta(days=30 + _hash(self.seed, 5, number) % 20)
        if number <= 26:
            ffi_exp = 1800.0
        elif number <= 55:
            ffi_exp = 600.0
        else:
            ffi_exp = 200.0
        version = f"spoc-{3 + min(number, 60) // 20}.{number % 10}.{10 + number % 37}"
        return _Sector(
            number=number,
            ts=_timestamp(start),
            dv_ts=_timestamp(start + _DV_DELAY),
            t_min=_mjd(start),
            t_max=_mjd(end),
            release=_mjd(release),
            scid=(120 + si) % 10000,
            dv_run=106 + 4 * si,
            prvversion=f"{version}-{release:%Y%m%d}",
            ffi_exptime=ffi_exp,
        )

    def _make_mdv_ends(self) -> dict[int, int]:
        """Sector index e -> pipeline run number, for each multi-sector DV run S[0]..S[e]."""
        last = self.n_sectors - 1
        ends = set()
        if last >= 1:
            ends.add(last)
            for e in _MDV_ENDS:
                if e < last:
                    ends.add(e)
            e = _MDV_ENDS[-1] + 13
            while e < last:
                ends.add(e)
                e += 13
        return {e: 106 + 4 * e + 2 for e in sorted(ends)}

    def tic(self, g: int) -> int:
        """TIC id of pool target ``g`` (a seeded bijection, so it inverts in O(1))."""
        return 1 + (self._tic_a * g + self._tic_b) % _TIC_PRIME

    def _pool_of_tic(self, tic: int) -> int | None:
        if not 1 <= tic <= _TIC_PRIME:
            return None
        g = ((tic - 1 - self._tic_b) * self._tic_a_inv) % _TIC_PRIME
        return g if g < self.pool_size else None

    def _sector_range(self, g: int) -> tuple[int, int]:
        """Indices (lo, hi) of the first and last sector observing pool target g (inclusive)."""
        if g < self.n_cvz:
            return 0, self.n_sectors - 1
        j = g - self.n_cvz
        lo = max(0, -(-(j - self.window + 1) // self.stride))
        hi = min(self.n_sectors - 1, j // self.stride)
        return lo, hi

    def _slot_to_pool(self, si: int, k: int) -> int:
        if k < self.n_cvz:
            return k
        return self.n_cvz + si * self.stride + (k - self.n_cvz)

    def _pool_to_slot(self, si: int, g: int) -> int | None:
        if g < self.n_cvz:
            return g
        lo, hi = self._sector_range(g)
        if not lo <= si <= hi:
            return None
        return g - si * self.stride

    def _mdv_pool_ranges(self, e: int) -> list[tuple[int, int]]:
        """Pool ranges of the targets run S[0]..S[e] searches (DV ones among them get a result).

        Continuous-viewing-zone targets are in every run. A moving target (observed in about two
        consecutive sectors) is in the first run that covers two of its sectors and in the
        last, widest run: so superseded runs exist without every run repeating every target.
        """
        ranges = []
        if self.n_cvz:
            ranges.append((0, self.n_cvz))
        if self.window >= 2:
            ends = list(self._mdv_ends)
            at = ends.index(e)
            # j (moving index) has >= 2 sectors among S[0]..S[e] iff stride <= j < _mdv_top(e)
            lo = self.stride if at == 0 or e == ends[-1] else self._mdv_top(ends[at - 1])
            hi = self._mdv_top(e)
            if hi > lo:
                ranges.append((self.n_cvz + lo, self.n_cvz + hi))
        return ranges

    def _mdv_top(self, e: int) -> int:
        """End of the moving-target range with >= 2 observed sectors among S[0]..S[e]."""
        return min(self.n_moving, (e - 1) * self.stride + self.window)

    def _mdv_select(self, e: int, idx: int) -> int:
        """Pool index of run e's idx-th DV target (the run's (lo, below(lo), count) cached)."""
        parts = self._mdv_parts.get(e)
        if parts is None:
            parts = [
                (self._dv.below(lo), self._dv.count(lo, hi)) for lo, hi in self._mdv_pool_ranges(e)
            ]
            self._mdv_parts[e] = parts
        for base, c in parts:
            if idx < c:
                return self._dv.select(base + idx)
            idx -= c
        raise IndexError(idx)

    def _mdv_rank(self, e: int, g: int) -> int | None:
        """Index of target g among run e's DV targets, or None if it is not one."""
        if e not in self._mdv_ends or not self._dv.member(g):
            return None
        before = 0
        for lo, hi in self._mdv_pool_ranges(e):
            if lo <= g < hi:
                return before + self._dv.count(lo, g)
            before += self._dv.count(lo, hi)
        return None

    def _count(self, si: int, cat: int) -> int:
        if cat == CAT_2MIN:
            return self.n_targets
        if cat == CAT_FAST:
            return self._fast[si].count(0, self.n_targets)
        if cat == CAT_MDV:
            if si not in self._mdv_ends:
                return 0
            return sum(self._dv.count(lo, hi) for lo, hi in self._mdv_pool_ranges(si))
        return FFI_PER_SECTOR

    def count(self, si: int, cat: int) -> int:
        """Number of observations of category ``cat`` in sector index ``si``."""
        return self._counts[si][cat]

    def _fast_slot(self, si: int, idx: int) -> int:
        return self._fast[si].select(idx)

    # ---------------------------------------------------------------- keys & ids -------------

    @staticmethod
    def obsid_of(key: Key) -> int:
        si, cat, idx = key
        return (si + 1) * SECTOR_SPAN + cat * CAT_SPAN + idx

    def key_of_obsid(self, obsid: int) -> Key | None:
        """Decode an obsid; None if this catalog has no such observation."""
        si, rest = divmod(int(obsid), SECTOR_SPAN)
        si -= 1
        cat, idx = divmod(rest, CAT_SPAN)
        if not 0 <= si < self.n_sectors or cat >= N_CATS or not 0 <= idx < self._counts[si][cat]:
            return None
        return si, cat, idx

    def _target_of(self, key: Key) -> int:
        """Pool index of the target of a 2-min, 20-s or multi-sector DV observation."""
        si, cat, idx = key
        if cat == CAT_2MIN:
            return self._slot_to_pool(si, idx)
        if cat == CAT_FAST:
            return self._slot_to_pool(si, self._fast_slot(si, idx))
        if cat == CAT_MDV:
            return self._mdv_select(si, idx)
        raise ValueError("FFI observations have no target")

    def obs_id(self, key: Key) -> str:
        si, cat, idx = key
        sec = self._sectors[si]
        if cat == CAT_FFI:
            return f"tess-s{sec.number:04d}-{idx // 4 + 1}-{idx % 4 + 1}"
        tic = self.tic(self._target_of(key))
        if cat == CAT_2MIN:
            return f"tess{sec.ts}-s{sec.number:04d}-{tic:016d}-{sec.scid:04d}-s"
        if cat == CAT_FAST:
            return f"tess{sec.ts}-s{sec.number:04d}-{tic:016d}-{sec.scid:04d}-a_fast"
        return self._dv_id(0, si, tic, self._mdv_ends[si])

    def _dv_id(self, first: int, last: int, tic: int, run: int) -> str:
        a, b = self._sectors[first], self._sectors[last]
        return f"tess{a.dv_ts}-s{a.number:04d}-s{b.number:04d}-{tic:016d}-{run:05d}"

    _RE_TS = re.compile(r"tess(\d{13})-s(\d{4})-(\d{16})-(\d{4})-(s|a_fast)")
    _RE_DV = re.compile(r"tess(\d{13})-s(\d{4})-s(\d{4})-(\d{16})-(\d{5})")
    _RE_FFI = re.compile(r"tess-s(\d{4})-([1-4])-([1-4])")

    def key_of_obs_id(self, obs_id: str) -> Key | None:
        """Decode an observation's obs_id in O(1); None if the catalog has none such."""
        key = self._decode_obs_id(obs_id)
        if key is None or self.obs_id(key) != obs_id:
            return None
        return key

    def _decode_obs_id(self, obs_id: str) -> Key | None:
        m = self._RE_TS.fullmatch(obs_id)
        if m:
            si = self._sector_index.get(int(m.group(2)))
            g = self._pool_of_tic(int(m.group(3)))
            if si is None or g is None:
                return None
            k = self._pool_to_slot(si, g)
            if k is None:
                return None
            if m.group(5) == "s":
                return si, CAT_2MIN, k
            if not self._fast[si].member(k):
                return None
            return si, CAT_FAST, self._fast[si].below(k)
        m = self._RE_DV.fullmatch(obs_id)
        if m:
            first = self._sector_index.get(int(m.group(2)))
            last = self._sector_index.get(int(m.group(3)))
            g = self._pool_of_tic(int(m.group(4)))
            if first != 0 or last is None or last == 0 or g is None:
                return None
            rank = self._mdv_rank(last, g)
            return None if rank is None else (last, CAT_MDV, rank)
        m = self._RE_FFI.fullmatch(obs_id)
        if m:
            si = self._sector_index.get(int(m.group(1)))
            if si is None:
                return None
            return si, CAT_FFI, (int(m.group(2)) - 1) * 4 + int(m.group(3)) - 1
        return None

    def keys_of_tic(self, tic: int) -> list[Key]:
        """Every observation of one target, in catalog order, without scanning."""
        g = self._pool_of_tic(tic)
        if g is None:
            return []
        keys: list[Key] = []
        lo, hi = self._sector_range(g)
        for si in range(lo, hi + 1):
            k = self._pool_to_slot(si, g)
            if k is None:
                continue
            keys.append((si, CAT_2MIN, k))
            if self._fast[si].member(k):
                keys.append((si, CAT_FAST, self._fast[si].below(k)))
        for e in self._mdv_ends:
            rank = self._mdv_rank(e, g)
            if rank is not None:
                keys.append((e, CAT_MDV, rank))
        keys.sort()
        return keys

    # ---------------------------------------------------------------- observation rows -------

    def _segment_const(self, si: int, cat: int) -> dict[str, Any]:
        """Columns that are the same for every observation of one (sector, category)."""
        cached = self._seg_const.get((si, cat))
        if cached is not None:
            return cached
        sec = self._sectors[si]
        const: dict[str, Any] = {
            "intentType": "science",
            "obs_collection": "TESS",
            "provenance_name": "SPOC",
            "instrument_name": "Photometer",
            "project": "TESS",
            "filters": "TESS",
            "wavelength_region": "Optical",
            "dataproduct_type": "timeseries",
            "proposal_pi": "Ricker, George",
            "calib_level": 3,
            "t_min": sec.t_min,
            "t_max": sec.t_max,
            "t_exptime": 120.0,
            "em_min": 600.0,
            "em_max": 1000.0,
            "obs_title": None,
            "t_obs_release": sec.release,
            "proposal_type": "GI",
            "sequence_number": sec.number,
            "jpegURL": None,
            "dataRights": "PUBLIC",
            "mtFlag": False,
            "srcDen": 5885.0,
        }
        if cat == CAT_FAST:
            const["t_exptime"] = 20.0
        elif cat == CAT_MDV:
            const["t_min"] = self._sectors[0].t_min
            const["t_obs_release"] = round(sec.release + 15.0, 6)
            const["proposal_type"] = None
        elif cat == CAT_FFI:
            const.update(
                target_name="TESS FFI",
                target_classification=None,
                dataproduct_type="image",
                calib_level=2,
                t_exptime=sec.ffi_exptime,
                proposal_id="N/A",
                proposal_type=None,
                dataURL=None,
            )
        self._seg_const[(si, cat)] = const
        return const

    def _segment_template(self, si: int, cat: int) -> str:
        tmpl = self._seg_tmpl.get((si, cat))
        if tmpl is None:
            const = self._segment_const(si, cat)
            if cat == CAT_FFI:  # few rows, fewer variable columns: a mapping template
                tmpl = _obs_template(const, _OBS_VAR_FMT)
            else:  # the bulk of every answer: positional, in _OBS_VARS order
                assert [c.name for c in OBS_COLUMNS if c.name not in const] == list(_OBS_VARS)
                tmpl = _obs_template(const, _OBS_POS_FMT)
            self._seg_tmpl[(si, cat)] = tmpl
        return tmpl

    def _obs_vars(self, key: Key) -> dict[str, Any]:
        """The columns that differ between observations of one (sector, category)."""
        si, cat, idx = key
        obsid = self.obsid_of(key)
        sec = self._sectors[si]
        if cat == CAT_FFI:
            camera, ccd = idx // 4 + 1, idx % 4 + 1
            ra = round((sec.number * 27.7 + 60.0 + (ccd - 2.5) * 6.0) % 360.0, 6)
            dec = round(-66.0 + camera * 24.0 - 12.0 + (ccd % 2) * 6.0, 6)
            dec = max(-89.0, min(89.0, dec))
            corners = " ".join(
                f"{(ra + dx) % 360.0:.6f} {max(-90.0, min(90.0, dec + dy)):.6f}"
                for dx, dy in ((-6, -6), (6, -6), (6, 6), (-6, 6))
            )
            return {
                "obs_id": f"tess-s{sec.number:04d}-{camera}-{ccd}",
                "s_ra": ra,
                "s_dec": dec,
                "s_region": f"POLYGON ICRS {corners}",
                "obsid": obsid,
                "objID": obsid + 200 * SECTOR_SPAN,
            }
        return dict(zip(_OBS_VARS, self._obs_values(key), strict=True))

    def _obs_values(self, key: Key) -> tuple[Any, ...]:
        """Variable columns of a target's observation, in :data:`_OBS_VARS` order (not FFIs)."""
        si, cat, _ = key
        sec = self._sectors[si]
        obsid = self.obsid_of(key)
        g = self._target_of(key)
        tic = self.tic(g)
        h = self._target_hash(g)
        ra, dec = self._target_position(g)
        if cat == CAT_2MIN:
            obs_id = f"tess{sec.ts}-s{sec.number:04d}-{tic:016d}-{sec.scid:04d}-s"
            data_url = URI_PREFIX + obs_id + "_lc.fits"
        elif cat == CAT_FAST:
            obs_id = f"tess{sec.ts}-s{sec.number:04d}-{tic:016d}-{sec.scid:04d}-a_fast"
            data_url = URI_PREFIX + obs_id + "-lc.fits"
        else:
            obs_id = self._dv_id(0, si, tic, self._mdv_ends[si])
            data_url = URI_PREFIX + obs_id + "_dvt.fits"
        return (
            str(tic),
            _CLASSIFICATIONS[h % len(_CLASSIFICATIONS)],
            obs_id,
            ra,
            dec,
            "N/A" if cat == CAT_MDV else self._proposal(si, g),
            f"CIRCLE ICRS {ra:.6f} {dec:.6f} 0.00138889",
            data_url,
            obsid,
            obsid + 200 * SECTOR_SPAN,
        )

    def observation(self, key: Key) -> dict[str, Any]:
        """One observation row as a dict, columns in MAST's order."""
        const = self._segment_const(key[0], key[1])
        var = self._obs_vars(key)
        return {name: const[name] if name in const else var[name] for name in OBS_COLUMN_NAMES}

    def observation_json(self, key: Key) -> str:
        """The same row as :meth:`observation`, serialized straight from a template (fast)."""
        if key[1] == CAT_FFI:
            return self._segment_template(key[0], key[1]) % self._obs_vars(key)
        return self._segment_template(key[0], key[1]) % self._obs_values(key)

    # ---------------------------------------------------------------- products ---------------

    def _product_const(self, kind: str) -> dict[str, Any]:
        desc, ptype, group = _KINDS[kind]
        return {
            "obs_collection": "TESS",
            "dataproduct_type": "timeseries",
            "description": desc,
            "type": "S",
            "productType": ptype,
            "productGroupDescription": group,
            "productSubGroupDescription": kind,
            "productDocumentationURL": "",
            "project": "TESS",
            "dataRights": "PUBLIC",
            "calib_level": 3,
            "filters": "TESS",
        }

    def _target_hash(self, g: int) -> int:
        """One hash per target: position, classification and TCE count derive from it."""
        return _mix(self._target_salt ^ g)

    def _sector_target_hash(self, si: int, g: int) -> int:
        """One hash per (sector, target): sizes and proposal derive from it without rehashing."""
        return _mix(self._sector_salt[si] ^ g)

    def _size(self, kind: str, h: int, extra: int = 0) -> int:
        """Deterministic, plausible file size for one product (scaled by config.scale).

        ``h`` is the (sector, target) hash: the LC size jitters by +-10% with it, and the other
        kinds are multiples of it (TP 10-20x, 20-s files several times more) or independent.
        """
        scale = self._scale
        u = _unit(((h ^ _KIND_SALT[kind] ^ extra) * 0xD6E8FEB86659FD93) & _MASK64)
        lc = 2_000_000 * scale * (0.9 + 0.2 * _unit(h))
        if kind == "LC":
            return _fits_size(lc)
        if kind == "TP":
            return _fits_size(lc * (10.0 + 10.0 * u))
        if kind == "FAST-LC":
            return _fits_size(lc * (5.5 + u))
        if kind == "FAST-TP":
            return _fits_size(lc * (60.0 + 60.0 * u))
        if kind == "DVT":
            return _fits_size(1_500_000 * scale * (1.0 + 2.0 * u))
        if kind == "DVR":
            return max(MIN_OTHER_BYTES, int(2_500_000 * scale * (0.5 + 1.5 * u)))
        if kind == "DVS":
            return max(MIN_OTHER_BYTES, int(600_000 * scale * (0.7 + 0.6 * u)))
        return max(MIN_OTHER_BYTES, int(150_000 * scale * (0.5 + u)))  # DVM (XML)

    def _n_tce(self, g: int) -> int:
        """Number of TCEs (hence DVS reports) of a DV target: 1 or 2."""
        return 1 + ((self._target_hash(g) >> 20) % 3 == 0)

    def _dv_products(
        self, dv_id: str, g: int, sector: int | None, h: int, datasum: bool
    ) -> list[_Prod]:
        extra = 0 if sector is not None else 1 << 40  # a run's files differ from a sector's
        run = dv_id[-5:]
        stem = dv_id[:-6]
        prods = [
            _Prod("DVT", dv_id + "_dvt.fits", dv_id, self._size("DVT", h, extra), sector, datasum),
            _Prod("DVR", dv_id + "_dvr.pdf", dv_id, self._size("DVR", h, extra), sector, False),
            _Prod("DVM", dv_id + "_dvr.xml", dv_id, self._size("DVM", h, extra), sector, False),
        ]
        for tce in range(1, self._n_tce(g) + 1):
            name = f"{stem}-{tce:02d}-{run}_dvs.pdf"
            size = self._size("DVS", h, extra + tce)
            prods.append(_Prod("DVS", name, dv_id, size, sector, False))
        return prods

    def _products(self, key: Key) -> list[_Prod]:
        """All products of one observation, in the order the answer lists them."""
        si, cat, _ = key
        if cat == CAT_FFI:
            return []
        sec = self._sectors[si]
        s = sec.number
        g = self._target_of(key)
        tic = self.tic(g)
        h = self._sector_target_hash(si, g)
        datasum = s > EARLY_SECTOR_MAX
        if cat == CAT_MDV:
            dv_id = self._dv_id(0, si, tic, self._mdv_ends[si])
            return self._dv_products(dv_id, g, None, h, datasum)
        base = f"tess{sec.ts}-s{s:04d}-{tic:016d}-{sec.scid:04d}"
        if cat == CAT_2MIN:
            obs_id = base + "-s"
            prods = [
                _Prod("LC", obs_id + "_lc.fits", obs_id, self._size("LC", h), s, datasum),
                _Prod("TP", obs_id + "_tp.fits", obs_id, self._size("TP", h), s, datasum),
            ]
            if self._dv.member(g):
                dv_id = self._dv_id(si, si, tic, sec.dv_run)
                prods.extend(self._dv_products(dv_id, g, s, h, datasum))
            return prods
        obs_id = base + "-a_fast"
        return [
            _Prod("FAST-LC", obs_id + "-lc.fits", obs_id, self._size("FAST-LC", h), s, datasum),
            _Prod("FAST-TP", obs_id + "-tp.fits", obs_id, self._size("FAST-TP", h), s, datasum),
        ]

    def _n_products(self, key: Key) -> int:
        """How many products an observation has, without generating them."""
        si, cat, idx = key
        if cat == CAT_FFI:
            return 0
        if cat == CAT_FAST:
            return 2
        g = self._target_of(key)
        if cat == CAT_MDV:
            return 3 + self._n_tce(g)
        return 2 + (3 + self._n_tce(g) if self._dv.member(g) else 0)

    def products_of(self, obsid: int) -> list[ProductInfo]:
        """The products of one observation (empty for FFIs and unknown obsids)."""
        key = self.key_of_obsid(obsid)
        return [] if key is None else [self._info(p) for p in self._products(key)]

    @staticmethod
    def _info(p: _Prod) -> ProductInfo:
        return ProductInfo(
            uri=URI_PREFIX + p.filename,
            filename=p.filename,
            size=p.size,
            kind=p.kind,
            sector=p.sector,
            has_datasum=p.has_datasum,
        )

    def _product_context(self, key: Key) -> tuple[int, str, str]:
        """(obsid, proposal_id, prvversion) shared by all products of one observation."""
        si, cat, _ = key
        sec = self._sectors[si]
        if cat == CAT_MDV:
            proposal = "N/A"
        else:
            proposal = self._proposal(si, self._target_of(key))
        return self.obsid_of(key), proposal, sec.prvversion

    def _proposal(self, si: int, g: int) -> str:
        return _PROPOSALS[(self._sector_target_hash(si, g) >> 13) % len(_PROPOSALS)]

    def product_rows(self, key: Key) -> list[dict[str, Any]]:
        """Product rows of one observation as dicts, columns in MAST's order."""
        obsid, proposal, prv = self._product_context(key)
        rows = []
        for p in self._products(key):
            const = self._product_const(p.kind)
            var = dict(zip(_PROD_VARS, _prod_values(p, obsid, proposal, prv), strict=True))
            rows.append({n: const[n] if n in const else var[n] for n in PRODUCT_COLUMN_NAMES})
        return rows

    def product_rows_json(self, key: Key) -> list[str]:
        """The same rows as :meth:`product_rows`, serialized from templates (fast)."""
        obsid, proposal, prv = self._product_context(key)
        tmpl = self._prod_tmpl
        # _prod_values inlined (this is the hot loop of every product list); the dict path
        # uses _prod_values itself and a test holds the two answers equal.
        return [
            tmpl[kind] % (obsid, obs_id, URI_PREFIX + name, prv, proposal, name, size, obsid)
            for kind, name, obs_id, size, _, _ in self._products(key)
        ]

    _RE_PRODUCT = re.compile(
        r"(tess\d{13}-s\d{4}-\d{16}-\d{4}-(?:s|a_fast))(?:_lc|_tp|-lc|-tp)\.fits"
        r"|(tess\d{13}-s\d{4}-s\d{4}-\d{16})(?:-\d{2})?(-\d{5})_(?:dvt\.fits|dvr\.pdf|dvr\.xml|dvs\.pdf)"
    )

    def product(self, uri: str) -> ProductInfo | None:
        """Decode ANY dataURI this catalog lists, in O(1); None if it lists no such product."""
        if not uri.startswith(URI_PREFIX):
            return None
        filename = uri[len(URI_PREFIX) :]
        m = self._RE_PRODUCT.fullmatch(filename)
        if m is None:
            return None
        if m.group(1):
            key = self._decode_obs_id(m.group(1))
        else:
            key = self._decode_dv_product(m.group(2) + m.group(3))
        if key is None:
            return None
        for p in self._products(key):
            if p.filename == filename:
                return self._info(p)
        return None

    def _decode_dv_product(self, dv_id: str) -> Key | None:
        """The observation owning a DV product: a 2-min obs (single sector) or a DV run."""
        m = self._RE_DV.fullmatch(dv_id)
        if m is None:
            return None
        if m.group(2) != m.group(3):
            return self._decode_obs_id(dv_id)
        si = self._sector_index.get(int(m.group(2)))
        g = self._pool_of_tic(int(m.group(4)))
        if si is None or g is None:
            return None
        k = self._pool_to_slot(si, g)
        return None if k is None else (si, CAT_2MIN, k)

    def iter_products(self, sector: int | None = None) -> Iterator[ProductInfo]:
        """Every product of one sector (or of the whole archive): for tests and benchmarks.

        Lazy, but it does visit every observation: O(sector), not O(page).
        """
        indices = range(self.n_sectors) if sector is None else [self._sector_index[sector]]
        for si in indices:
            for cat in (CAT_2MIN, CAT_FAST, CAT_MDV):
                for idx in range(self._counts[si][cat]):
                    for p in self._products((si, cat, idx)):
                        yield self._info(p)

    # ---------------------------------------------------------------- column configs ---------

    def column_config(self, colconfig_id: str) -> dict:
        """Body of a columnsconfig answer ({} when unknown, which astroquery reads as an error)."""
        ident = colconfig_id.strip().lower()
        if ident in ("mast.caom.cone", "mast.caom.filtered", "mast.caom.filtered.position"):
            cols = OBS_COLUMNS
        elif ident == "mast.caom.products":
            cols = PRODUCT_COLUMNS
        else:
            return {}
        # Shaped like real MAST's: a hidden _selected_ column, vot.* keys, MJD in "unit", and
        # a few retired columns flagged "remove" (astroquery's get_metadata skips those).
        out: dict[str, dict[str, Any]] = {
            "_selected_": {"text": "selected", "add": True, "type": "boolean", "hidden": True}
        }
        for order, c in enumerate(cols):
            entry: dict[str, Any] = {
                "text": c.text,
                "order": order,
                "vot.datatype": c.vot_type,
                "vot.arraysize": "*" if c.vot_type == "char" else None,
                "vot.ID": c.name,
                "vot.name": c.name,
                "vot.description": c.description,
            }
            if entry["vot.arraysize"] is None:
                del entry["vot.arraysize"]
            if c.unit == "MJD":
                entry["unit"] = "MJD"
                entry["vot.unit"] = "d"
            elif c.unit:
                entry["vot.unit"] = c.unit
            if c.separator:
                entry["separator"] = c.separator
            if c.example:
                entry["example"] = c.example
            out[c.name] = entry
        if cols is OBS_COLUMNS:
            out["distance"] = {
                "text": DISTANCE_COLUMN.text,
                "vot.datatype": DISTANCE_COLUMN.vot_type,
                "vot.unit": DISTANCE_COLUMN.unit,
                "vot.description": DISTANCE_COLUMN.description,
            }
            for name, text in _REMOVED_COLUMNS:
                out[name] = {"text": text, "remove": True}
        return out

    # ---------------------------------------------------------------- queries ----------------

    def invoke(self, request: dict) -> dict:
        """Answer a decoded ``request=`` JSON of ``POST /api/v0/invoke`` as a dict."""
        try:
            return self._answer(request, as_json=False)  # type: ignore[return-value]
        except QueryError as exc:
            return error_answer(str(exc))

    def invoke_json(self, request: dict) -> bytes:
        """The same answer as :meth:`invoke`, serialized fast (row templates, no dict per row)."""
        try:
            return self._answer(request, as_json=True)  # type: ignore[return-value]
        except QueryError as exc:
            return json.dumps(error_answer(str(exc))).encode()

    def _answer(self, request: dict, as_json: bool) -> dict | bytes:
        if not isinstance(request, dict):
            raise QueryError("The request must be a JSON object")
        service = request.get("service")
        params = request.get("params", {})
        if not isinstance(service, str) or not service:
            raise QueryError("Missing service name")
        if not isinstance(params, dict):
            raise QueryError("params must be a JSON object")
        pagesize, page = _paging_args(request)
        if service == "Mast.Caom.Filtered":
            return self._filtered(params, pagesize, page, as_json)
        if service == "Mast.Caom.Products":
            return self._product_list(params, pagesize, page, as_json)
        if service == "Mast.Caom.Filtered.Position":
            position = _parse_position(params.get("position"))
            return self._filtered(params, pagesize, page, as_json, position)
        if service == "Mast.Caom.Cone":
            try:
                position = (float(params["ra"]), float(params["dec"]), float(params["radius"]))
            except (KeyError, TypeError, ValueError) as exc:
                raise QueryError("Mast.Caom.Cone needs numeric ra, dec and radius") from exc
            _check_position(position)
            return self._filtered({"columns": "*"}, pagesize, page, as_json, position)
        raise QueryError(f"Unknown service '{service}'")

    # Filtered ---------------------------------------------------------------------------------

    def _filtered(
        self,
        params: dict,
        pagesize: int,
        page: int,
        as_json: bool,
        position: tuple[float, float, float] | None = None,
    ) -> dict | bytes:
        """Mast.Caom.Filtered (and, with ``position``, Filtered.Position and Cone)."""
        columns = str(params.get("columns", "*")).strip()
        raw_filters = params.get("filters", [])
        if not isinstance(raw_filters, list):
            raise QueryError("filters must be a list")
        filters = [_Filter(f, _OBS_BY_LOWER) for f in raw_filters]
        selection = self._select(filters, position)
        total = selection.total()
        if columns.upper() == "COUNT_BIG(*)":
            # Real MAST types the count as a string; astroquery converts it with astype(int).
            answer = {
                "status": "COMPLETE",
                "msg": "",
                "fields": [{"name": "Column1", "type": "string"}],
                "data": [{"Column1": total}],
                "paging": _paging(1, pagesize, 1, 1),
            }
            return json.dumps(answer).encode() if as_json else answer
        all_columns = OBS_COLUMNS + ((DISTANCE_COLUMN,) if position else ())
        wanted = None
        if columns != "*":
            by_lower = {c.name.lower(): c for c in all_columns}
            wanted = []
            for name in columns.split(","):
                col = by_lower.get(name.strip().lower())
                if col is None:
                    raise QueryError(f"Unknown column '{name.strip()}'")
                wanted.append(col)
        keys = selection.page((page - 1) * pagesize, pagesize)
        fields = [{"name": c.name, "type": c.field_type} for c in (wanted or all_columns)]
        paging = _paging(page, pagesize, len(keys), total)
        if wanted is not None:
            names = [c.name for c in wanted]
            data = [{n: row[n] for n in names} for row in self._obs_rows(keys, position)]
            answer = {"status": "COMPLETE", "msg": "", "fields": fields, "data": data}
            answer["paging"] = paging
            return json.dumps(answer).encode() if as_json else answer
        fields.append(_SELECTED_FIELD)
        if as_json:
            if position is None:
                rows = [self.observation_json(k) for k in keys]
            else:
                rows = [
                    self.observation_json(k)[: -len(_SELECTED_TAIL)]
                    + f',"distance":{self._distance(k, position)!r}{_SELECTED_TAIL}'
                    for k in keys
                ]
            return _json_answer(fields, rows, paging)
        data = list(self._obs_rows(keys, position))
        for row in data:
            row["_selected_"] = None
        return {"status": "COMPLETE", "msg": "", "fields": fields, "data": data, "paging": paging}

    def _obs_rows(
        self, keys: list[Key], position: tuple[float, float, float] | None
    ) -> Iterator[dict[str, Any]]:
        for key in keys:
            row = self.observation(key)
            if position is not None:
                row["distance"] = self._distance(key, position)
            yield row

    def _position_of(self, key: Key) -> tuple[float, float]:
        """(s_ra, s_dec) of an observation: per target, or per FFI CCD."""
        if key[1] == CAT_FFI:
            v = self._obs_vars(key)
            return v["s_ra"], v["s_dec"]
        return self._target_position(self._target_of(key))

    def _target_position(self, g: int) -> tuple[float, float]:
        """Sky position of pool target g: uniform on the sphere, from the target's hash."""
        h = self._target_hash(g)
        ra = round(360.0 * _unit(h), 6)
        dec = round(math.degrees(math.asin(2.0 * _unit(_mix(h)) - 1.0)), 6)
        return ra, dec

    def _distance(self, key: Key, position: tuple[float, float, float]) -> float:
        """Separation from the searched position in arcsec (MAST's ``distance`` column)."""
        ra, dec = self._position_of(key)
        return round(_separation(ra, dec, position[0], position[1]) * 3600.0, 6)

    def _cone_keys(self, position: tuple[float, float, float]) -> set[Key]:
        """Observations within a cone. Scans the target pool (not the observations): O(pool)."""
        ra0, dec0, radius = position
        keys: set[Key] = set()
        for g in range(self.pool_size):
            ra, dec = self._target_position(g)
            if _separation(ra, dec, ra0, dec0) <= radius:
                keys.update(self.keys_of_tic(self.tic(g)))
        for si in range(self.n_sectors):
            for idx in range(FFI_PER_SECTOR):
                ra, dec = self._position_of((si, CAT_FFI, idx))
                if _separation(ra, dec, ra0, dec0) <= radius:
                    keys.add((si, CAT_FFI, idx))
        return keys

    def _select(
        self, filters: list[_Filter], position: tuple[float, float, float] | None = None
    ) -> _Selection:
        """Turn filters into key ranges; only filters no fast path resolves are checked per row.

        A filter on a column that is constant within every (sector, category) segment
        (sequence_number, dataproduct_type, obs_collection, t_exptime, ...) prunes whole
        segments. Exact target_name / obs_id / obsid values decode straight to keys, and so
        does a cone (through the target pool). Anything else is evaluated row by row over what
        is left, and the matches are cached so paging through them does not rescan.
        """
        explicit: _Filter | None = None
        residual: list[_Filter] = []
        for f in filters:
            if f.column in self._always_const:
                continue  # resolved per segment below
            if explicit is None and f.exact_only and f.column in _EXPLICIT_COLUMNS:
                explicit = f
            else:
                residual.append(f)
        allowed: list[tuple[int, int]] = []
        for si in range(self.n_sectors):
            for cat in range(N_CATS):
                if not self._counts[si][cat]:
                    continue
                const = self._segment_const(si, cat)
                # Filters on columns constant here prune the segment (residual ones too: a
                # target_name filter can never match the 'TESS FFI' rows unless it names them).
                if all(f.matches(const[f.column]) for f in filters if f.column in const):
                    allowed.append((si, cat))
        if explicit is None and position is None:
            segments = [(si, cat, 0, self._counts[si][cat]) for si, cat in allowed]
            return _Selection(self, segments, residual)
        ok = set(allowed)
        chosen: set[Key] | None = None
        if explicit is not None:
            keys, ffi = self._explicit_keys(explicit)
            chosen = set(keys)
            if ffi:
                chosen.update(
                    (si, cat, i) for si, cat in ok if cat == CAT_FFI for i in range(FFI_PER_SECTOR)
                )
        if position is not None:
            cone = self._cone_keys(position)
            chosen = cone if chosen is None else chosen & cone
        assert chosen is not None
        segments = sorted((k[0], k[1], k[2], k[2] + 1) for k in chosen if k[:2] in ok)
        return _Selection(self, segments, residual)

    def _explicit_keys(self, f: _Filter) -> tuple[list[Key], bool]:
        """Keys named directly by exact target_name / obs_id / obsid values (no scan).

        The flag says whether the filter also selects every FFI ('TESS FFI' target name).
        """
        keys: set[Key] = set()
        ffi = False
        for value in f.exact:  # lower-cased; all catalog ids are lower case or digits
            key: Key | None = None
            if f.column == "target_name":
                if value == "tess ffi":
                    ffi = True
                elif value.isdigit():
                    keys.update(self.keys_of_tic(int(value)))
            elif f.column == "obsid":
                key = self.key_of_obsid(int(value)) if value.isdigit() else None
            else:
                key = self.key_of_obs_id(value)
            if key is not None:
                keys.add(key)
        return sorted(keys), ffi

    # Products ---------------------------------------------------------------------------------

    def _product_list(self, params: dict, pagesize: int, page: int, as_json: bool) -> dict | bytes:
        raw = params.get("obsid")
        if raw is None:
            raise QueryError("Mast.Caom.Products needs params.obsid")
        text = raw if isinstance(raw, str) else ",".join(str(x) for x in raw)
        obsids, cumulative = self._product_index(text)
        total = cumulative[-1] if len(cumulative) else 0
        start = (page - 1) * pagesize
        stop = min(total, start + pagesize)
        fields = [{"name": c.name, "type": c.field_type} for c in PRODUCT_COLUMNS]
        rows: list[Any] = []
        if start < stop:
            # first observation whose products reach past `start` (binary search)
            lo, hi = 0, len(cumulative)
            while lo < hi:
                mid = (lo + hi) // 2
                if cumulative[mid] <= start:
                    lo = mid + 1
                else:
                    hi = mid
            i = lo
            pos = cumulative[i - 1] if i else 0
            while pos < stop and i < len(obsids):
                key = self.key_of_obsid(obsids[i])
                assert key is not None
                part = self.product_rows_json(key) if as_json else self.product_rows(key)
                lo_cut = max(0, start - pos)
                hi_cut = min(len(part), stop - pos)
                rows.extend(part[lo_cut:hi_cut])
                pos += len(part)
                i += 1
        paging = _paging(page, pagesize, len(rows), total)
        if as_json:
            return _json_answer(fields, rows, paging)
        return {"status": "COMPLETE", "msg": "", "fields": fields, "data": rows, "paging": paging}

    def _product_index(self, text: str) -> tuple[array, array]:
        """Known obsids of a product request (deduplicated, in order) and cumulative counts.

        astroquery re-sends the whole obsid list for every page, so the index of the last few
        lists is cached: paging through 5 M products parses the list, not the products.
        """
        cache_key = hash(text)
        hit = self._plist_cache.get(cache_key)
        if hit is not None and hit[0] == text:
            self._plist_cache.move_to_end(cache_key)
            return hit[1], hit[2]
        obsids = array("q")
        counts = array("q")
        seen: set[int] = set()
        for token in text.split(","):
            token = token.strip()
            if not token:
                continue
            try:
                value = int(token)
            except ValueError as exc:
                raise QueryError(f"Malformed obsid '{token[:40]}'") from exc
            if value in seen:
                continue
            seen.add(value)
            key = self.key_of_obsid(value)
            if key is None:
                continue
            n = self._n_products(key)
            if n:
                obsids.append(value)
                counts.append(n)
        cumulative = array("q", accumulate(counts))
        self._plist_cache[cache_key] = (text, obsids, cumulative)
        while len(self._plist_cache) > self.CACHE_ENTRIES:
            self._plist_cache.popitem(last=False)
        return obsids, cumulative


class _Selection:
    """The observations a Filtered query selects: key ranges, plus filters checked per row."""

    def __init__(
        self,
        catalog: Catalog,
        segments: list[tuple[int, int, int, int]],
        residual: list[_Filter],
    ) -> None:
        self.catalog = catalog
        self.segments = segments
        self.residual = residual
        self._matched: array | None = None

    def _keys(self) -> Iterator[Key]:
        for si, cat, lo, hi in self.segments:
            for idx in range(lo, hi):
                yield si, cat, idx

    def _scan(self) -> array:
        """obsids of all rows passing the residual filters (cached per filter set)."""
        if self._matched is not None:
            return self._matched
        cat = self.catalog
        sig = repr((self.segments, [vars(f) for f in self.residual]))
        hit = cat._scan_cache.get(sig)
        if hit is None:
            hit = array("q")
            for key in self._keys():
                row = cat.observation(key)
                if all(f.matches(row[f.column]) for f in self.residual):
                    hit.append(cat.obsid_of(key))
            cat._scan_cache[sig] = hit
            while len(cat._scan_cache) > cat.CACHE_ENTRIES:
                cat._scan_cache.popitem(last=False)
        else:
            cat._scan_cache.move_to_end(sig)
        self._matched = hit
        return hit

    def total(self) -> int:
        if self.residual:
            return len(self._scan())
        return sum(hi - lo for _, _, lo, hi in self.segments)

    def page(self, offset: int, limit: int) -> list[Key]:
        if self.residual:
            matched = self._scan()[offset : offset + limit]
            keys = [self.catalog.key_of_obsid(o) for o in matched]
            return [k for k in keys if k is not None]
        out: list[Key] = []
        for si, cat, lo, hi in self.segments:
            n = hi - lo
            if offset >= n:
                offset -= n
                continue
            take = min(n - offset, limit - len(out))
            out.extend((si, cat, idx) for idx in range(lo + offset, lo + offset + take))
            offset = 0
            if len(out) >= limit:
                break
        return out


# -- answer helpers -------------------------------------------------------------------------------


def _paging_args(request: dict) -> tuple[int, int]:
    try:
        pagesize = int(request.get("pagesize", 50000))
        page = int(request.get("page", 1))
    except (TypeError, ValueError) as exc:
        raise QueryError("pagesize and page must be integers") from exc
    if pagesize < 1 or page < 1:
        raise QueryError("pagesize and page must be positive")
    return pagesize, page


def _paging(page: int, pagesize: int, rows: int, total: int) -> dict[str, int]:
    return {
        "page": page,
        "pageSize": pagesize,
        "pagesFiltered": -(-total // pagesize),
        "rows": rows,
        "rowsFiltered": total,
        "rowsTotal": total,
    }


def _json_answer(fields: list[dict[str, str]], rows: list[str], paging: dict[str, int]) -> bytes:
    head = json.dumps({"status": "COMPLETE", "msg": "", "fields": fields})[:-1]
    tail = json.dumps(paging)
    return f'{head},"data":[{",".join(rows)}],"paging":{tail}}}'.encode()


def _parse_position(text: Any) -> tuple[float, float, float]:
    """Parse astroquery's ``position`` parameter: "ra, dec, radius" in degrees."""
    try:
        ra, dec, radius = (float(x) for x in str(text).split(","))
    except ValueError as exc:
        raise QueryError(f"Malformed position {text!r}: expected 'ra, dec, radius'") from exc
    position = (ra, dec, radius)
    _check_position(position)
    return position


def _check_position(position: tuple[float, float, float]) -> None:
    ra, dec, radius = position
    if not (math.isfinite(ra) and -90.0 <= dec <= 90.0 and 0.0 <= radius <= 180.0):
        raise QueryError(f"Position out of range: {position}")


def _separation(ra1: float, dec1: float, ra2: float, dec2: float) -> float:
    """Angular separation in degrees (haversine: accurate at small separations)."""
    r1, d1, r2, d2 = map(math.radians, (ra1, dec1, ra2, dec2))
    h = math.sin((d2 - d1) / 2) ** 2 + math.cos(d1) * math.cos(d2) * math.sin((r2 - r1) / 2) ** 2
    return math.degrees(2.0 * math.asin(min(1.0, math.sqrt(h))))


def error_answer(msg: str) -> dict[str, Any]:
    """An answer with status ERROR: astroquery raises RemoteServiceError(msg) on it."""
    return {"status": "ERROR", "msg": msg, "fields": [], "data": []}
