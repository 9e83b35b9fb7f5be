"""What a user selects (sectors, targets, product kinds, criteria, filters), and parsing it."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UsageError
from ..sources import (
    normalize_server,
)

log = logging.getLogger("bulkfetch")

#: Product kinds a user names (``--products``) -> MAST ``productSubGroupDescription`` values.
PRODUCT_KINDS: dict[str, tuple[str, ...]] = {
    "lc": ("LC",),
    "tp": ("TP",),
    "fast-lc": ("FAST-LC",),
    "fast-tp": ("FAST-TP",),
    "dv": ("DVT", "DVR", "DVS", "DVM"),
    "dvt": ("DVT",),
    "dvr": ("DVR",),
    "dvs": ("DVS",),
    "dvm": ("DVM",),
}

#: Subgroups that are Data Validation products (the only ones ``latest_dv_only`` touches).
DV_SUBGROUPS = frozenset({"DVT", "DVR", "DVS", "DVM"})

DEFAULT_KINDS = ("lc",)

#: Product columns in the order astroquery's ``get_product_list`` returns them (export order).
PRODUCT_COLUMNS: tuple[str, ...] = (
    "obsID",
    "obs_collection",
    "dataproduct_type",
    "obs_id",
    "description",
    "type",
    "dataURI",
    "productType",
    "productGroupDescription",
    "productSubGroupDescription",
    "productDocumentationURL",
    "project",
    "prvversion",
    "proposal_id",
    "productFilename",
    "size",
    "parent_obsid",
    "dataRights",
    "calib_level",
    "filters",
)

#: Columns of a product table that go into dedicated fields of a row, not into ``extra``.
_CORE_COLUMNS = frozenset(
    {"dataURI", "obs_collection", "obs_id", "productFilename", "size", "productSubGroupDescription"}
)

#: Columns :func:`export_plan` adds; a re-read export recomputes them, so they are not ``extra``.
_EXPORT_ONLY_COLUMNS = ("url", "local_path", "sector", "status")

#: Observation criteria the planner sets itself; the selection's fields say them instead.
_RESERVED_CRITERIA = {
    "obs_collection": "bulkfetch plans TESS only",
    "dataproduct_type": "bulkfetch plans time series only",
    "sequence_number": "use --sectors",
    "target_name": "use --targets",
}

_TIC_RE = re.compile(r"^(?:TIC)?\s*-?\s*0*(\d+)$", re.IGNORECASE)


# ------------------------------------------------------------------------------------------------
# the selection
# ------------------------------------------------------------------------------------------------


@dataclass
class Selection:
    """What to plan. ``sectors=None`` means every sector the archive has.

    ``criteria`` go to ``query_criteria`` (observation columns), ``filters`` to
    ``filter_products`` (product columns, astroquery's value syntax), both as given.
    """

    sectors: list[int] | None = None
    targets: list[str] | None = None
    kinds: list[str] = field(default_factory=lambda: list(DEFAULT_KINDS))
    criteria: dict[str, Any] = field(default_factory=dict)
    filters: dict[str, Any] = field(default_factory=dict)
    latest_dv_only: bool = False
    flat: bool = False

    def subgroups(self, kinds: Iterable[str] | None = None) -> list[str]:
        """The ``productSubGroupDescription`` values of ``kinds`` (default: all selected)."""
        out: list[str] = []
        for kind in self.kinds if kinds is None else kinds:
            for sub in PRODUCT_KINDS[kind]:
                if sub not in out:
                    out.append(sub)
        return out

    def fingerprint(self, server: str) -> str:
        """A short digest of everything but sectors and kinds: those are the units themselves.

        Two selections with the same fingerprint ask the same question of each sector, so a
        unit planned under one is planned for the other.
        """
        doc = {
            "server": normalize_server(server),
            "targets": sorted(self.targets) if self.targets is not None else None,
            "criteria": {k: _jsonable(v) for k, v in sorted(self.criteria.items())},
            "filters": {k: _jsonable(v) for k, v in sorted(self.filters.items())},
            "latest_dv_only": bool(self.latest_dv_only),
            "flat": bool(self.flat),
        }
        text = json.dumps(doc, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def validate(self) -> None:
        """Refuse what cannot be planned, before any query is sent; normalise kinds and TICs.

        Normalising here (``"LC"`` -> ``"lc"``, ``"TIC 0025155310"`` -> ``"25155310"``) makes
        two spellings of one selection share a fingerprint, hence their planned units.
        """
        if not self.kinds:
            raise UsageError("no product kinds selected; valid kinds: " + ", ".join(PRODUCT_KINDS))
        self.kinds = parse_kinds(",".join(self.kinds))
        if self.sectors is not None:
            bad = [s for s in self.sectors if type(s) is not int or s < 1]
            if bad:
                raise UsageError(f"invalid sector number(s): {bad}")
        if self.targets is not None:
            self.targets = parse_targets(self.targets)
        for name in self.criteria:
            reason = _RESERVED_CRITERIA.get(name.lower())
            if reason:
                raise UsageError(f"criterion {name!r} is set by bulkfetch: {reason}")


def unit_name(sector: int, kind: str, fingerprint: str) -> str:
    """The planning unit of one sector and one product kind under one selection fingerprint."""
    return f"sector:{sector}|{kind}|{fingerprint}"


def _jsonable(value: Any) -> Any:
    """A stable JSON form of a criterion value (tuples, numpy scalars) for fingerprints."""
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


# ------------------------------------------------------------------------------------------------
# parsing user input (the CLI calls these)
# ------------------------------------------------------------------------------------------------


def parse_sectors(spec: str) -> list[int]:
    """``"1-5,7,1751"`` -> ``[1, 2, 3, 4, 5, 7, 1751]`` (sorted, unique)."""
    out: set[int] = set()
    for part in (p.strip() for p in str(spec).split(",")):
        if not part:
            continue
        try:
            if "-" in part:
                lo_text, hi_text = part.split("-", 1)
                lo, hi = int(lo_text), int(hi_text)
                if lo > hi:
                    raise UsageError(f"sector range {part!r} runs backwards")
                out.update(range(lo, hi + 1))
            else:
                out.add(int(part))
        except ValueError:
            raise UsageError(
                f"invalid sector spec {part!r}: use numbers and ranges like 1-5,7,1751"
            ) from None
    if not out:
        raise UsageError(f"no sectors in {spec!r}: use numbers and ranges like 1-5,7,1751")
    if min(out) < 1:
        raise UsageError(f"sector numbers start at 1, got {min(out)}")
    return sorted(out)


def parse_kinds(spec: str) -> list[str]:
    """``"lc,tp"`` -> ``["lc", "tp"]``; an unknown kind is a usage error listing the valid ones."""
    kinds: list[str] = []
    for part in (p.strip().lower() for p in str(spec).split(",")):
        if not part:
            continue
        if part not in PRODUCT_KINDS:
            raise UsageError(
                f"unknown product kind {part!r}; valid kinds: {', '.join(PRODUCT_KINDS)}"
            )
        if part not in kinds:
            kinds.append(part)
    if not kinds:
        raise UsageError(f"no product kinds in {spec!r}; valid kinds: {', '.join(PRODUCT_KINDS)}")
    return kinds


def parse_targets(spec: str | Iterable[str]) -> list[str]:
    """TIC IDs as MAST's ``target_name`` spells them: ``"TIC 0025155310"`` -> ``"25155310"``.

    Accepts a comma/whitespace separated string or an iterable of strings.
    """
    items = re.split(r"[,\s]+", spec) if isinstance(spec, str) else list(spec)
    out: list[str] = []
    seen: set[str] = set()
    pending_prefix = False
    for raw in items:
        text = str(raw).strip()
        if not text:
            continue
        if text.upper() == "TIC":  # "TIC 123" split on whitespace
            pending_prefix = True
            continue
        match = _TIC_RE.match(text)
        if not match:
            raise UsageError(f"invalid TIC ID {text!r}: expected digits like 25155310")
        pending_prefix = False
        tic = match.group(1)
        if tic not in seen:
            seen.add(tic)
            out.append(tic)
    if pending_prefix:
        raise UsageError("a 'TIC' without a number in the target list")
    if not out:
        raise UsageError("the target list is empty")
    return out


def read_targets_file(path: str | Path) -> list[str]:
    """TIC IDs from a text file: one or more per line, ``#`` starts a comment."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read targets file {path}: {exc.strerror or exc}") from exc
    body = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    try:
        return parse_targets(body)
    except UsageError as exc:
        raise UsageError(f"{path}: {exc}") from None


def parse_key_values(items: Iterable[str], *, what: str = "criterion") -> dict[str, Any]:
    """``["t_exptime=100..130", "proposal_id=G1,G2"]`` -> dict for astroquery.

    ``a,b`` becomes a list (OR); for criteria ``lo..hi`` with numbers becomes ``[lo, hi]``
    (astroquery's form for a numeric range). Filters keep astroquery's string syntax (``!x``,
    ``>=n``, ``a..b``), which ``filter_products`` interprets itself.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = str(item).partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"invalid {what} {item!r}: expected KEY=VALUE")
        value = value.strip()
        parsed: Any
        if what == "criterion" and ".." in value and "," not in value:
            lo, _, hi = value.partition("..")
            try:
                parsed = [float(lo), float(hi)]
            except ValueError:
                raise UsageError(f"invalid range in {what} {item!r}: expected lo..hi") from None
        elif "," in value:
            parsed = [v.strip() for v in value.split(",") if v.strip()]
        else:
            parsed = value
        if key in out:
            raise UsageError(f"{what} {key!r} given twice; give several values as {key}=a,b")
        out[key] = parsed
    return out
