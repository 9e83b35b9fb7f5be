"""dataURI -> URL resolution matches astroquery's own, and astroquery can be redirected."""

from __future__ import annotations

from astroquery.mast import Observations
from astroquery.mast.discovery_portal import PortalAPI

from bulkfetch.sources import DEFAULT_MAST_URL, download_url, point_astroquery_at

URI = "mast:TESS/product/tess2018206045859-s0001-0000000025132999-0120-s_lc.fits"


def test_download_url_matches_astroquery_escaping() -> None:
    saved = PortalAPI.MAST_DOWNLOAD_URL
    try:
        point_astroquery_at("http://127.0.0.1:9/")
        # astroquery's download_file returns the escaped URL it requested as its third value
        # only on error; build it the same way it does, from its own class attribute.
        from urllib.parse import quote

        expected = PortalAPI.MAST_DOWNLOAD_URL + "?uri=" + quote(URI, safe=":/")
        assert download_url("http://127.0.0.1:9/", URI) == expected
        weird = "mast:TESS/product/a b&c.fits"
        assert download_url("http://h", weird) == "http://h/api/v0.1/Download/file?uri=" + quote(
            weird, safe=":/"
        )
    finally:
        point_astroquery_at(saved.rsplit("/api/", 1)[0])


def test_download_url_escapes_every_character_as_quote_does() -> None:
    """The no-escaping shortcut must agree with ``quote`` on every character, not just TESS's."""
    from urllib.parse import quote

    base = "http://h/api/v0.1/Download/file?uri="
    for code in list(range(0x20, 0x7F)) + [0x0A, 0xE9, 0x2603, 0x1F600]:
        uri = f"mast:TESS/product/x{chr(code)}y.fits"
        assert download_url("http://h", uri) == base + quote(uri, safe=":/"), repr(chr(code))
    assert download_url("http://h", "") == base


def test_point_astroquery_at_redirects_the_live_singleton() -> None:
    try:
        point_astroquery_at("http://127.0.0.1:1234")
        conn = Observations._portal_api_connection
        assert conn.MAST_REQUEST_URL == "http://127.0.0.1:1234/api/v0/invoke"
        assert conn.COLUMNS_CONFIG_URL.startswith("http://127.0.0.1:1234/portal/")
        assert conn.MAST_DOWNLOAD_URL == "http://127.0.0.1:1234/api/v0.1/Download/file"
    finally:
        point_astroquery_at(DEFAULT_MAST_URL)
    assert Observations._portal_api_connection.MAST_REQUEST_URL.startswith(DEFAULT_MAST_URL)
