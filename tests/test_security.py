"""Security: nothing is written outside DIR, the MAST token goes only where it must, TLS is on.

Everything here runs against real servers on 127.0.0.1: the simulated archive (with a hostile
catalog), and small recording servers (``tests/_httpd.py``) that log every request's headers,
answer with cross-host redirects, or speak HTTPS with a self-signed certificate.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any

import pytest
from _httpd import (
    Server,
    file_handler,
    product_table_rows,
    redirect_handler,
    sample_products,
    server_tls,
)
from astropy.table import Table

from bulkfetch.api import Job, download_products
from bulkfetch.auth import auth_headers, find_token, host_matches, token_allowed
from bulkfetch.fetch import FetchOptions
from bulkfetch.testing.catalog import Catalog
from bulkfetch.testing.fixtures import default_config
from bulkfetch.testing.mast import MastSimulator

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
ENV.pop("MAST_API_TOKEN", None)
TOKEN = "tok-" + uuid.uuid4().hex  # unique: a grep hit can only be a leak


def bulkfetch(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bulkfetch", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env or ENV,
    )


def files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def grep_tree(root: Path, needle: str) -> list[Path]:
    """Every file under ``root`` whose bytes contain ``needle`` (SQLite, WAL, manifest...)."""
    data = needle.encode()
    return [p for p in files_under(root) if data in p.read_bytes()]


def snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# -- where the token may go: the decision ------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("https://mast.stsci.edu/api/v0.1/Download/file?uri=mast:TESS/x", True),
        ("https://MAST.STSCI.EDU./api/v0.1/Download/file", True),
        ("https://archive.mast.stsci.edu/file", True),  # a subdomain of MAST
        ("http://mast.stsci.edu/api/v0.1/Download/file", False),  # clear text
        ("https://evilmast.stsci.edu/file", False),  # no dot boundary
        ("https://mast.stsci.edu.evil.example/file", False),  # MAST's name as a prefix
        ("https://stsci.edu/file", False),  # the parent is not MAST
        ("https://mast.stsci.edu@evil.example/file", False),  # userinfo trick: host is evil
        ("https://user@mast.stsci.edu/file", False),  # credentials in a URL: refused
        ("https://127.0.0.1:8443/file", False),
        ("ftp://mast.stsci.edu/file", False),
        ("not a url", False),
    ],
)
def test_token_goes_only_to_https_mast_hosts(url: str, allowed: bool) -> None:
    assert token_allowed(url) is allowed
    header = auth_headers(url, TOKEN)
    assert header == ({"Authorization": f"token {TOKEN}"} if allowed else {})


def test_token_decision_edge_cases() -> None:
    assert auth_headers("https://mast.stsci.edu/x", None) == {}
    assert auth_headers("https://mast.stsci.edu/x", "") == {}
    assert token_allowed("https://127.0.0.1:1/x", hosts=("127.0.0.1",))
    assert not token_allowed("http://127.0.0.1:1/x", hosts=("127.0.0.1",))
    assert not host_matches("", "mast.stsci.edu")
    assert TOKEN not in repr(FetchOptions(token=TOKEN))


def test_token_comes_from_the_environment_or_an_astroquery_login() -> None:
    assert find_token({"MAST_API_TOKEN": f"  {TOKEN}\n"}) == TOKEN
    assert find_token({}) is None
    # astroquery's Observations.login() keeps the token as the session's mast_token cookie
    from astroquery.mast import Observations

    Observations._session.cookies.set("mast_token", TOKEN)
    try:
        assert find_token({}) == TOKEN
        assert find_token({"MAST_API_TOKEN": "from-env"}) == "from-env"  # env first
    finally:
        Observations._session.cookies.clear()
    assert find_token({}) is None


# -- where the token goes: real requests ---------------------------------------------------------


def _plan(directory: Path, server: str, products: list[Any], **kwargs: Any) -> Job:
    job = Job(directory, server=server)
    job.plan(table=Table(product_table_rows(products)), **kwargs)
    return job


def test_token_is_never_sent_over_http_even_to_an_allowed_host(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    products = sample_products(2)
    with Server(file_handler({p.uri: b for p, b in products})) as archive:
        job = _plan(tmp_path / "job", archive.url, products)
        with job, caplog.at_level(logging.DEBUG):
            result = job.fetch(
                token=TOKEN, token_hosts=("127.0.0.1",), progress=False, handle_signals=False
            )
        assert result.done == 2
        assert len(archive.requests) == 2
        assert archive.header_values("Authorization") == [None, None]
    assert TOKEN not in caplog.text
    assert grep_tree(tmp_path, TOKEN) == []


HTTPS_CLIENT = textwrap.dedent(
    """
    import logging, sys
    from bulkfetch.api import Job
    logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
    with Job(sys.argv[1], create=False) as job:
        result = job.fetch(token_hosts=("127.0.0.1",), progress=False)
    print("done", result.done, "errors", result.errors)
    """
)


def test_token_goes_to_the_https_archive_but_never_across_a_redirect(tmp_path: Path) -> None:
    """Verified HTTPS to an allowed host gets the token (so the test can fail); the host a
    redirect leads to never does; and the token is in no file and no log line."""
    products = sample_products(3)
    bodies = {p.uri: b for p, b in products}
    context = server_tls(tmp_path)  # both servers present this self-signed certificate...
    cert = tmp_path / "cert.pem"  # ...which the client trusts through SSL_CERT_FILE
    direct_uri = products[0][0].uri
    elsewhere = Server(file_handler(bodies), ssl_context=context, url_host="localhost").start()

    async def archive_handler(request: Any) -> Any:  # the "MAST" host redirects two of three
        if request.query.get("uri") == direct_uri:
            return await file_handler(bodies)(request)
        return await redirect_handler(lambda: elsewhere.url)(request)

    try:
        with Server(archive_handler, ssl_context=context) as archive:
            _plan(tmp_path / "job", archive.url, products).close()
            env = {**ENV, "SSL_CERT_FILE": str(cert), "MAST_API_TOKEN": TOKEN}
            proc = subprocess.run(
                [sys.executable, "-c", HTTPS_CLIENT, str(tmp_path / "job")],
                capture_output=True,
                text=True,
                timeout=120,
                env=env,
            )
            assert proc.returncode == 0, proc.stderr
            assert "done 3 errors 0" in proc.stdout
            assert archive.header_values("Authorization") == [f"token {TOKEN}"] * 3
            assert len(elsewhere.requests) == 2
            assert elsewhere.header_values("Authorization") == [None, None]
    finally:
        elsewhere.stop()
    with Job(tmp_path / "job", create=False) as job:
        for row in job.manifest_table():
            assert Path(row["Local Path"]).read_bytes() == bodies[row["dataURI"]]
    assert TOKEN not in proc.stderr and TOKEN not in proc.stdout
    assert grep_tree(tmp_path / "job", TOKEN) == []


def test_cli_with_a_token_in_the_environment_leaks_it_nowhere(tmp_path: Path) -> None:
    """The whole CLI path with $MAST_API_TOKEN set and debug logging: the simulator is plain
    HTTP, so it must not see the token, and no file under DIR nor any output may hold it."""
    with MastSimulator(default_config(targets_per_sector=3)) as sim:
        env = {**ENV, "MAST_API_TOKEN": TOKEN}
        proc = bulkfetch(
            "tess", str(tmp_path / "job"), "--mast-url", sim.url, "--sectors", "1", "--debug",
            "--no-progress", env=env,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "DEBUG" in proc.stderr  # the debug log really was on
        assert sim.stats()["requests"] == 3
    assert TOKEN not in proc.stdout + proc.stderr
    assert grep_tree(tmp_path, TOKEN) == []


# -- TLS -----------------------------------------------------------------------------------------


def test_tls_is_verified_by_default_and_insecure_needs_a_flag_and_warns(tmp_path: Path) -> None:
    products = sample_products(2)
    bodies = {p.uri: b for p, b in products}
    table = tmp_path / "products.ecsv"
    Table(product_table_rows(products)).write(table)
    d = str(tmp_path / "job")
    with Server(file_handler(bodies), ssl_context=server_tls(tmp_path)) as archive:
        proc = bulkfetch("tess", d, "--mast-url", archive.url, "--from-table", str(table), "-q")
        assert proc.returncode == 1
        assert "TLS certificate of 127.0.0.1 not trusted" in proc.stderr
        assert "--insecure" in proc.stderr  # the way out is named
        assert archive.requests == []  # no request went over the unverified connection
        manifest = Table.read(Path(d) / "manifest.ecsv")
        assert set(manifest["Status"]) == {"ERROR"}
        assert all("TLS certificate" in m for m in manifest["Message"])
        assert not any(Path(p).exists() for p in manifest["Local Path"])

        proc = bulkfetch("fetch", d, "--insecure", "--no-progress")
        assert proc.returncode == 0, proc.stderr
        warning = [ln for ln in proc.stderr.splitlines() if "--insecure" in ln]
        assert len(warning) == 1 and "NOT verified" in warning[0]
        manifest = Table.read(Path(d) / "manifest.ecsv")
        assert set(manifest["Status"]) == {"COMPLETE"}
        for row in manifest:
            assert Path(row["Local Path"]).read_bytes() == bodies[row["dataURI"]]


# -- nothing outside DIR -------------------------------------------------------------------------


class HostileCatalog(Catalog):
    """The simulated catalog, with hostile obs_id/productFilename in some product rows.

    ``overrides`` maps a product's real file name to the columns its rows should claim. The
    download server still serves the products by dataURI, so only the names are hostile.
    """

    def __init__(self, config: Any, overrides: dict[str, dict[str, str]]) -> None:
        super().__init__(config)
        self.overrides = overrides

    def product_rows_json(self, key: Any) -> list[str]:
        rows = []
        for text in super().product_rows_json(key):
            row = json.loads(text)
            row.update(self.overrides.get(row["productFilename"], {}))
            rows.append(json.dumps(row))
        return rows

    def product_rows(self, key: Any) -> list[dict[str, Any]]:
        rows = super().product_rows(key)
        for row in rows:
            row.update(self.overrides.get(row["productFilename"], {}))
        return rows


def test_hostile_catalog_names_never_write_outside_dir(tmp_path: Path) -> None:
    config = default_config(targets_per_sector=6)
    lcs = [p for p in Catalog(config).iter_products(1) if p.kind == "LC"]
    assert len(lcs) == 6
    marker = "escaped-" + uuid.uuid4().hex
    outside = tmp_path / "outside"
    outside.mkdir()
    hostile = {
        lcs[0].filename: {"obs_id": "../../../outside"},
        lcs[1].filename: {"obs_id": ".."},
        lcs[2].filename: {"productFilename": f"../../../{marker}.fits"},
        lcs[3].filename: {"productFilename": str(outside / f"{marker}.fits")},  # absolute
        lcs[4].filename: {"productFilename": f"..\\..\\{marker}.fits"},
    }
    good = lcs[5]
    root = tmp_path / "deep" / "job"
    before = snapshot(tmp_path)
    with MastSimulator(config, catalog=HostileCatalog(config, hostile)) as sim:
        proc = bulkfetch("tess", str(root), "--mast-url", sim.url, "--sectors", "1", "-q")
        downloads = sim.stats()["requests"]
        good_sha = sim.truth(good.uri)["sha256"]
    # nothing new anywhere but under DIR
    after = snapshot(tmp_path)
    new_outside = {p for p in after - before if not p.startswith("deep")}
    assert new_outside == set()
    assert not list(Path("/").glob(f"*{marker}*")) and not list(Path("/tmp").glob(f"*{marker}*"))
    assert not any(marker in str(p) for p in files_under(tmp_path / "deep"))
    # the five hostile rows are refused and said so; the good one is downloaded
    assert proc.returncode == 1, proc.stderr
    assert "5 product(s) refused" in proc.stderr
    assert downloads == 1
    manifest = Table.read(root / "manifest.ecsv")
    assert list(manifest["dataURI"]) == [good.uri]
    assert hashlib.sha256(Path(manifest["Local Path"][0]).read_bytes()).hexdigest() == good_sha


def test_download_products_with_hostile_names_writes_only_inside(tmp_path: Path) -> None:
    products = sample_products(3)
    bodies = {p.uri: b for p, b in products}
    columns = product_table_rows(products)
    marker = "escaped-" + uuid.uuid4().hex
    columns["productFilename"][0] = f"/{marker}.fits"
    columns["obs_id"][1] = "../.."
    before = snapshot(tmp_path)
    with Server(file_handler(bodies)) as archive:
        manifest = download_products(
            Table(columns), download_dir=str(tmp_path / "dl"), server=archive.url, progress=False
        )
        assert len(archive.requests) == 1  # only the harmless product was requested
    assert manifest is not None
    assert list(manifest["Status"]) == ["ERROR", "ERROR", "COMPLETE"]
    assert all("refused" in m for m in manifest["Message"][:2])
    assert not Path(f"/{marker}.fits").exists()
    assert {p for p in snapshot(tmp_path) - before if not p.startswith("dl")} == set()
    assert Path(manifest["Local Path"][2]).read_bytes() == bodies[products[2][0].uri]


def test_a_tampered_state_cannot_send_a_file_outside(tmp_path: Path) -> None:
    """Paths read back from the job state are checked again: a state edited (or written by
    an older version) to say ``../x`` fails that product instead of writing there."""
    import sqlite3

    products = sample_products(2)
    bodies = {p.uri: b for p, b in products}
    with Server(file_handler(bodies)) as archive:
        _plan(tmp_path / "job", archive.url, products).close()
        db = tmp_path / "job" / ".bulkfetch" / "state.sqlite"
        with sqlite3.connect(db) as conn:
            cols = [r[1] for r in conn.execute("PRAGMA table_info(products)")]
            assert "local_path" in cols
            conn.execute(
                "UPDATE products SET local_path = ? WHERE uri = ?",
                ("../../escaped.fits", products[0][0].uri),
            )
        with Job(tmp_path / "job", create=False) as job:
            result = job.fetch(progress=False, handle_signals=False)
            records = {r.uri: r for r in job.store.iter_records()}
        assert (result.done, result.errors) == (1, 1)
        assert len(archive.requests) == 1
    assert "leave the download directory" in (records[products[0][0].uri].message or "")
    assert not (tmp_path.parent / "escaped.fits").exists()
    assert not (tmp_path / "escaped.fits").exists()
