"""Where a product comes from: dataURI -> download URL, and pointing astroquery at a server.

MAST is the only source today; a cloud mirror (S3 ``stpubdata``) is the obvious next one, and it
slots in here without touching the planner or the engine.
"""

from __future__ import annotations

import re
from urllib.parse import quote

#: The real archive. ``--mast-url`` replaces it everywhere (queries and downloads).
DEFAULT_MAST_URL = "https://mast.stsci.edu"

#: Path of MAST's single-file download endpoint, relative to the server.
DOWNLOAD_PATH = "/api/v0.1/Download/file"

# How hard the planner queries the archive (here, not in bulkfetch.plan, so the CLI can show
# them in --help without importing astroquery and astropy).
#: Largest batch of obsids one ``get_product_list`` call may carry.
MAX_BATCH_SIZE = 1000
#: Default obsids per ``get_product_list`` call: a few hundred keeps each request and answer
#: small (a ~1 MB page that the archive builds in well under a second, retried cheaply),
#: while a 20,000-target sector still needs only 40 calls.
BATCH_SIZE = 500
#: Default number of astroquery calls in flight. Each call waits ~0.5 s or more on the
#: archive, so the plan's speed is calls in flight / latency: 16 threads plan 20 sectors of
#: 1,000 targets 6x faster than one at a time; fewer are gentler on a busy archive.
PLAN_WORKERS = 16

#: Characters ``quote(uri, safe=":/")`` leaves alone: its always-safe set plus ``:`` and ``/``.
_UNQUOTED = re.compile(r"[A-Za-z0-9_.~:/-]*")


def normalize_server(server: str) -> str:
    """Return ``server`` without a trailing slash, so URLs join the way astroquery joins them."""
    return server.rstrip("/")


def download_url(server: str, data_uri: str) -> str:
    """Resolve a MAST ``dataURI`` to its download URL exactly as astroquery 0.4.11 does.

    astroquery builds ``MAST_DOWNLOAD_URL + "?uri=" + quote(uri, safe=":/")``; using the same
    escaping means our manifest's URL column matches astroquery's byte for byte. TESS URIs
    hold no character that needs escaping; recognising that with one regex match is several
    times cheaper than ``quote``, which mattered at two million rows per plan.
    """
    escaped = data_uri if _UNQUOTED.fullmatch(data_uri) else quote(data_uri, safe=":/")
    return f"{normalize_server(server)}{DOWNLOAD_PATH}?uri={escaped}"


def point_astroquery_at(server: str) -> None:
    """Make the imported astroquery talk to ``server`` for queries and downloads.

    astroquery 0.4.11 copies ``conf.server`` into class attributes of ``PortalAPI`` at import
    time, so setting ``conf.server`` later does nothing. We overwrite those class attributes
    (instances do not shadow them) and also set ``conf.server`` for code that reads it afresh.
    """
    from astroquery.mast import conf
    from astroquery.mast.discovery_portal import PortalAPI

    server = normalize_server(server)
    conf.server = server
    PortalAPI.MAST_REQUEST_URL = server + "/api/v0/invoke"
    PortalAPI.COLUMNS_CONFIG_URL = server + "/portal/Mashup/Mashup.asmx/columnsconfig"
    PortalAPI.MAST_DOWNLOAD_URL = server + DOWNLOAD_PATH
    PortalAPI.MAST_BUNDLE_URL = server + "/api/v0.1/Download/bundle"
    # Column configs are cached per process; a different server may describe columns differently.
    PortalAPI._column_configs = {}
