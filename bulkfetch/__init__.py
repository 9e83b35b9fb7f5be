"""bulkfetch: download whole archive data sets (all of TESS from MAST), fast and correctly.

The pipeline, one module a stage: ``plan`` (astroquery -> product rows) -> ``sources``
(dataURI -> URL) -> ``fetch`` (asyncio pool) -> ``verify`` -> ``store`` (job state) ->
``manifest``/``progress`` (report). ``api`` ties them together; ``cli`` is a thin shell over it.

The public API is re-exported here lazily (PEP 562): ``from bulkfetch import download_products``
works, while ``bulkfetch status DIR`` does not pay for importing astropy, aiohttp and astroquery
it never uses.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Public name -> module that defines it.
_EXPORTS: dict[str, str] = {
    "download_products": "api",
    "Job": "api",
    "JobStatus": "api",
    "VerifyReport": "api",
    "Selection": "plan",
    "PlanSummary": "plan",
    "FetchOptions": "fetch",
    "FetchResult": "fetch",
    "write_manifest": "manifest",
    "read_manifest": "manifest",
    "make_progress": "progress",
    "BulkfetchError": "errors",
    "UsageError": "errors",
    "ArchiveError": "errors",
    "IntegrityError": "errors",
    "StateError": "errors",
}

__all__ = [
    "__version__",
    "download_products",
    "Job",
    "JobStatus",
    "VerifyReport",
    "Selection",
    "PlanSummary",
    "FetchOptions",
    "FetchResult",
    "write_manifest",
    "read_manifest",
    "make_progress",
    "BulkfetchError",
    "UsageError",
    "ArchiveError",
    "IntegrityError",
    "StateError",
]

if TYPE_CHECKING:
    from .api import Job, JobStatus, VerifyReport, download_products
    from .errors import ArchiveError, BulkfetchError, IntegrityError, StateError, UsageError
    from .fetch import FetchOptions, FetchResult
    from .manifest import read_manifest, write_manifest
    from .plan import PlanSummary, Selection
    from .progress import make_progress


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'bulkfetch' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
