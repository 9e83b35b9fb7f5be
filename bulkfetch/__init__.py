"""bulkfetch: download whole archive data sets (all of TESS from MAST), fast and correctly.

The pipeline, one module a stage: ``plan`` (astroquery -> product rows) -> ``sources``
(dataURI -> URL) -> ``fetch`` (asyncio pool) -> ``verify`` -> ``store`` (job state) ->
``manifest``/``progress`` (report). ``api`` ties them together; ``cli`` is a thin shell over it.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
