"""The simulated MAST download server, tested over real sockets on 127.0.0.1.

What users of the simulator rely on: unmodified astroquery downloads byte-exact, checksummed
FITS files from it; HTTP semantics (HEAD, Range, 416, If-Range, ETag) are those of a careful
server; every fault knob does what it says on the wire and varies across attempts so retries
can win; the counters tell a test the truth about what a client did; the CLI serves.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
import requests

from bulkfetch import verify
from bulkfetch.testing.fitsgen import product_body
from bulkfetch.testing.fixtures import default_config
from bulkfetch.testing.mast import MastSimulator

# -------------------------------------------------------------------------------------------------
# helpers


@dataclass
class Raw:
    """One HTTP exchange read straight off a socket, so resets, short bodies and stalls show."""

    status: int
    headers: dict[str, str]
    body: bytes
    ending: str  # "eof", "reset" or "timeout"
    elapsed: float
    #: Seconds between the last body byte (or the headers) and the end of the exchange.
    silence_before_end: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def raw_request(
    url: str, method: str = "GET", headers: dict[str, str] | None = None, timeout: float = 10.0
) -> Raw:
    """Send one request with ``Connection: close`` and read until EOF, reset or timeout."""
    parts = urlsplit(url)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    lines = [f"{method} {target} HTTP/1.1", f"Host: {parts.netloc}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode()
    started = time.monotonic()
    data = bytearray()
    last_data = started
    ending = "eof"
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as sock:
        sock.sendall(request)
        while True:
            try:
                chunk = sock.recv(1 << 16)
            except ConnectionResetError:
                ending = "reset"
                break
            except TimeoutError:
                ending = "timeout"
                break
            if not chunk:
                break
            data += chunk
            last_data = time.monotonic()
    ended = time.monotonic()
    head, sep, body = bytes(data).partition(b"\r\n\r\n")
    assert sep, f"no complete response head from {url}: {bytes(data[:200])!r}"
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    hdrs = {}
    for line in header_lines:
        key, _, value = line.partition(":")
        hdrs[key.strip().lower()] = value.strip()
    return Raw(
        status=int(status_line.split()[1]),
        headers=hdrs,
        body=body,
        ending=ending,
        elapsed=ended - started,
        silence_before_end=ended - last_data,
    )


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def lc_uris(sim: MastSimulator, sector: int | None = None) -> list[str]:
    """The 2-min light-curve dataURIs of one sector, straight from the simulator's catalog."""
    sector = sector if sector is not None else sim.catalog.sectors()[0]
    return sorted(p.uri for p in sim.catalog.iter_products(sector) if p.kind == "LC")


def astroquery_lc_uris(url: str, sector: int) -> list[str]:
    """The same uris found the way a user finds them: unmodified astroquery against ``url``."""
    from astroquery.mast import Observations

    from bulkfetch.testing.fixtures import use_simulator

    with use_simulator(url):
        obs = Observations.query_criteria(obs_collection="TESS", sequence_number=sector)
        products = Observations.get_product_list(obs)
        lc = Observations.filter_products(products, productSubGroupDescription="LC")
    return sorted(str(u) for u in lc["dataURI"])


def expected_body(sim: MastSimulator, uri: str) -> bytes:
    """The true bytes of ``uri``, cross-checked against the server's own ``/_sim/truth``."""
    info = sim.catalog.product(uri)
    assert info is not None
    body = product_body(info, sim.config.seed)
    truth = requests.get(f"{sim.url}/_sim/truth", params={"uri": uri}, timeout=10).json()
    assert truth["size"] == len(body) and truth["sha256"] == sha256(body)
    return body


@pytest.fixture
def one(mast_sim: Callable[..., MastSimulator]) -> tuple[MastSimulator, str, bytes]:
    """A simulator with defaults, one LC uri and its true bytes."""
    sim = mast_sim()
    uri = lc_uris(sim)[0]
    return sim, uri, expected_body(sim, uri)


# -------------------------------------------------------------------------------------------------
# unmodified astroquery


def test_astroquery_download_file_is_byte_exact(astroquery_mast, tmp_path: Path) -> None:
    from astroquery.mast import Observations

    sim = astroquery_mast()
    uri = lc_uris(sim)[0]
    local = tmp_path / "one.fits"
    status, msg, url = Observations.download_file(uri, local_path=str(local))
    assert (status, msg, url) == ("COMPLETE", None, None)
    truth = sim.truth(uri)
    data = local.read_bytes()
    assert len(data) == truth["size"] and sha256(data) == truth["sha256"]
    assert verify.check_fits(local) == []
    # astroquery asks HEAD first, then GET: the server saw both and served the body once.
    per = sim.stats()["per_uri"][uri]
    assert per["heads"] == 1 and per["gets"] == 1 and per["body_bytes"] == truth["size"]


def test_astroquery_download_products_one_sector(astroquery_mast, tmp_path: Path) -> None:
    from astroquery.mast import Observations

    sim = astroquery_mast()
    sector = sim.catalog.sectors()[0]
    obs = Observations.query_criteria(obs_collection="TESS", sequence_number=sector)
    products = Observations.get_product_list(obs)
    lc = Observations.filter_products(products, productSubGroupDescription="LC")
    assert len(lc) >= 5
    manifest = Observations.download_products(lc, download_dir=str(tmp_path), verbose=False)
    assert len(manifest) == len(lc)
    assert set(manifest["Status"]) == {"COMPLETE"}
    total = 0
    for row in lc:
        path = (
            tmp_path
            / "mastDownload"
            / row["obs_collection"]
            / row["obs_id"]
            / os.path.basename(row["productFilename"])
        )
        truth = sim.truth(row["dataURI"])
        data = path.read_bytes()
        assert sha256(data) == truth["sha256"], path
        assert int(row["size"]) == truth["size"]
        assert verify.check_fits(path) == [], path
        total += len(data)
    assert sim.stats()["bytes_served"] == total


def test_astropy_checksum_flags_correct_file_without_datasum(
    astroquery_mast, tmp_path: Path
) -> None:
    """Early TESS files carry CHECKSUM but no DATASUM; astropy then assumes DATASUM = 0 and
    reports a correct file as corrupt. That is why bulkfetch checks FITS sums itself."""
    from astropy.io import fits
    from astroquery.mast import Observations

    sim = astroquery_mast()
    uri = next(
        (
            u
            for sector in sim.catalog.sectors()
            for u in lc_uris(sim, sector)
            if not sim.catalog.product(u).has_datasum
        ),
        None,
    )
    assert uri is not None, "the simulated catalog has no LC product without DATASUM"
    local = tmp_path / "early.fits"
    assert Observations.download_file(uri, local_path=str(local))[0] == "COMPLETE"
    assert sha256(local.read_bytes()) == sim.truth(uri)["sha256"]
    assert verify.check_fits(local) == []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with fits.open(local, checksum=True) as hdul:
            assert "DATASUM" not in hdul[1].header and "CHECKSUM" in hdul[1].header
    assert any("Checksum verification failed" in str(w.message) for w in caught)


# -------------------------------------------------------------------------------------------------
# HTTP semantics


def test_head_and_get_headers(one) -> None:
    sim, uri, body = one
    url = sim.download_url(uri)
    head = raw_request(url, "HEAD")
    get = raw_request(url)
    info = sim.catalog.product(uri)
    assert head.status == get.status == 200
    assert head.body == b"" and get.body == body and get.ending == "eof"
    for resp in (head, get):
        assert int(resp.headers["content-length"]) == len(body)
        assert resp.headers["accept-ranges"] == "bytes"
        assert resp.headers["content-type"] == "application/fits"
        assert resp.headers["content-disposition"] == f"attachment; filename={info.filename}"
    assert head.headers["etag"] == get.headers["etag"]
    stats = sim.stats()
    assert stats["requests"] == 2 and stats["head_requests"] == 1
    assert stats["bytes_served"] == len(body)
    assert stats["status_counts"][200] == 2 and stats["status_counts"]["200"] == 2


def test_etag_stable_across_restarts_and_distinct_per_uri(mast_sim) -> None:
    first = mast_sim()
    uris = lc_uris(first)[:2]
    tags1 = [requests.head(first.download_url(u), timeout=10).headers["ETag"] for u in uris]
    second = mast_sim()
    tags2 = [requests.head(second.download_url(u), timeout=10).headers["ETag"] for u in uris]
    assert tags1 == tags2
    assert tags1[0] != tags1[1]


def test_range_requests(one) -> None:
    sim, uri, body = one
    url = sim.download_url(uri)
    size = len(body)
    cases = {
        "bytes=100-": (100, size - 1),
        "bytes=5-2884": (5, 2884),
        f"bytes={size - 10}-{size + 500}": (size - 10, size - 1),
        "bytes=-300": (size - 300, size - 1),
    }
    for spec, (start, end) in cases.items():
        resp = raw_request(url, headers={"Range": spec})
        assert resp.status == 206, spec
        assert resp.headers["content-range"] == f"bytes {start}-{end}/{size}", spec
        assert int(resp.headers["content-length"]) == end - start + 1
        assert resp.body == body[start : end + 1], spec
    assert sim.stats()["range_requests"] == len(cases)


def test_unsatisfiable_range_is_416(one) -> None:
    sim, uri, body = one
    resp = raw_request(sim.download_url(uri), headers={"Range": f"bytes={len(body)}-"})
    assert resp.status == 416
    assert resp.headers["content-range"] == f"bytes */{len(body)}"


def test_if_range(one) -> None:
    sim, uri, body = one
    url = sim.download_url(uri)
    etag = requests.head(url, timeout=10).headers["ETag"]
    match = raw_request(url, headers={"Range": "bytes=1000-", "If-Range": etag})
    assert match.status == 206 and match.body == body[1000:]
    stale = raw_request(url, headers={"Range": "bytes=1000-", "If-Range": '"someotherversion"'})
    assert stale.status == 200 and stale.body == body and "content-range" not in stale.headers


def test_ignore_range_serves_whole_body(mast_sim) -> None:
    sim = mast_sim(ignore_range=True)
    uri = lc_uris(sim)[0]
    body = expected_body(sim, uri)
    resp = raw_request(sim.download_url(uri), headers={"Range": "bytes=1000-"})
    assert resp.status == 200 and resp.body == body
    assert sim.stats()["range_requests"] == 1


def test_curl_script_form_and_unknown_uri(one) -> None:
    sim, uri, body = one
    resp = requests.get(f"{sim.url}/api/v0.1/Download/file/?uri={uri}", timeout=10)
    assert resp.status_code == 200 and resp.content == body
    unknown = sim.download_url("mast:TESS/product/no_such_file_lc.fits")
    assert requests.get(unknown, timeout=10).status_code == 404
    assert requests.head(unknown, timeout=10).status_code == 404
    assert requests.get(f"{sim.url}/api/v0.1/Download/file", timeout=10).status_code == 400
    assert requests.get(f"{sim.url}/_sim/truth?uri=mast:nope", timeout=10).status_code == 404


# -------------------------------------------------------------------------------------------------
# faults: each does what it says, and a retry of the same uri can succeed


def _attempts(sim: MastSimulator, uri: str, n: int, **kw: Any) -> list[Raw]:
    return [raw_request(sim.download_url(uri), **kw) for _ in range(n)]


def _split(responses: list[Raw], body: bytes) -> tuple[list[Raw], list[Raw]]:
    good = [r for r in responses if r.status == 200 and r.body == body and r.ending == "eof"]
    bad = [r for r in responses if r not in good]
    return good, bad


@pytest.mark.parametrize(
    ("knob", "status", "retry_after"),
    [("fail_500", 500, None), ("fail_503", 503, "0.25"), ("fail_429", 429, "0.25")],
)
def test_status_faults(mast_sim, knob: str, status: int, retry_after: str | None) -> None:
    sim = mast_sim(**{knob: 0.5}, retry_after=0.25)
    uri = lc_uris(sim)[0]
    body = expected_body(sim, uri)
    good, bad = _split(_attempts(sim, uri, 16), body)
    assert good and bad, "faults must vary across attempts of one uri"
    for resp in bad:
        assert resp.status == status
        assert resp.headers.get("retry-after") == retry_after
    assert sim.stats()["fault_counts"][knob] == len(bad)
    # HEAD draws status faults too (astroquery's HEAD then fails with an HTTPError).
    heads = _attempts(sim, uri, 16, method="HEAD")
    assert {r.status for r in heads} == {200, status}


def test_reset_fault(mast_sim) -> None:
    sim = mast_sim(reset_rate=0.5)
    uri = lc_uris(sim)[0]
    body = expected_body(sim, uri)
    good, bad = _split(_attempts(sim, uri, 16), body)
    assert good and bad
    for resp in bad:
        assert resp.status == 200 and int(resp.headers["content-length"]) == len(body)
        assert resp.ending == "reset"
        assert len(resp.body) < len(body) and body.startswith(resp.body)


def test_truncate_fault(mast_sim) -> None:
    sim = mast_sim(truncate_rate=0.5)
    uri = lc_uris(sim)[0]
    body = expected_body(sim, uri)
    good, bad = _split(_attempts(sim, uri, 16), body)
    assert good and bad
    for resp in bad:
        assert resp.status == 200 and int(resp.headers["content-length"]) == len(body)
        assert resp.ending == "eof"  # a clean close, not a reset: only the length tells
        assert 0 < len(resp.body) < len(body) and body.startswith(resp.body)


def test_corrupt_fault(mast_sim) -> None:
    sim = mast_sim(corrupt_rate=0.5)
    uri = lc_uris(sim)[0]
    body = expected_body(sim, uri)
    good, bad = _split(_attempts(sim, uri, 16), body)
    assert good and bad
    for resp in bad:
        assert resp.status == 200 and resp.ending == "eof"
        assert len(resp.body) == len(body) == int(resp.headers["content-length"])
        flipped = sum(a != b for a, b in zip(resp.body, body, strict=True))
        assert 1 <= flipped <= 3
        assert verify.check_fits_bytes(resp.body), "a flipped FITS body must fail its checksums"


def test_stall_fault(mast_sim) -> None:
    sim = mast_sim(stall_rate=0.5, stall_seconds=0.4)
    uri = lc_uris(sim)[0]
    body = expected_body(sim, uri)
    good, bad = _split(_attempts(sim, uri, 8), body)
    assert good and bad
    for resp in bad:
        assert resp.status == 200 and resp.ending == "eof"
        assert len(resp.body) < len(body) and body.startswith(resp.body)
        assert resp.silence_before_end >= 0.35
    # A client with a read timeout shorter than the stall sees the stall as a timeout.
    sim.set(stall_rate=1.0, stall_seconds=5.0)
    stalled = raw_request(sim.download_url(uri), timeout=0.3)
    assert stalled.ending == "timeout" and len(stalled.body) < len(body)


def test_html_fault(mast_sim) -> None:
    sim = mast_sim(html_rate=0.5)
    uri = lc_uris(sim)[0]
    body = expected_body(sim, uri)
    good, bad = _split(_attempts(sim, uri, 16), body)
    assert good and bad
    for resp in bad:
        assert resp.status == 200 and resp.headers["content-type"].startswith("text/html")
        assert int(resp.headers["content-length"]) == len(resp.body) != len(body)
        assert verify.looks_like_html(resp.body[:512])
        assert not verify.looks_like_fits(resp.body[:512])


def test_head_never_gets_body_faults(mast_sim) -> None:
    sim = mast_sim(reset_rate=0.2, truncate_rate=0.2, corrupt_rate=0.2, html_rate=0.2)
    uri = lc_uris(sim)[0]
    size = sim.truth(uri)["size"]
    for resp in _attempts(sim, uri, 10, method="HEAD"):
        assert resp.status == 200 and resp.ending == "eof" and resp.body == b""
        assert int(resp.headers["content-length"]) == size
        assert resp.headers["content-type"] == "application/fits"


def test_missing_is_a_fixed_subset(mast_sim) -> None:
    sim = mast_sim(missing_rate=0.3)
    uris = lc_uris(sim)
    missing = [u for u in uris if sim.truth(u)["missing"]]
    assert 0 < len(missing) < len(uris)
    present = next(u for u in uris if u not in missing)
    for resp in _attempts(sim, missing[0], 5) + _attempts(sim, missing[0], 2, method="HEAD"):
        assert resp.status == 404
    assert raw_request(sim.download_url(present)).status == 200
    again = mast_sim(missing_rate=0.3)
    assert [u for u in uris if again.truth(u)["missing"]] == missing


def test_faults_replay_with_the_same_seed(mast_sim) -> None:
    """Same seed, same uri, same attempt number: the same fault (runs can be replayed)."""
    knobs = {"fail_500": 0.3, "truncate_rate": 0.3}
    outcomes = []
    for _ in range(2):
        sim = mast_sim(**knobs)
        uri = lc_uris(sim)[1]
        outcomes.append([(r.status, len(r.body)) for r in _attempts(sim, uri, 10)])
        sim.stop()
    assert outcomes[0] == outcomes[1]
    assert len(set(outcomes[0])) >= 2


# -------------------------------------------------------------------------------------------------
# capacity, latency, bandwidth


async def _concurrent_gets(urls: list[str]) -> list[tuple[int, dict[str, str], bytes]]:
    async with aiohttp.ClientSession() as session:

        async def get(url: str) -> tuple[int, dict[str, str], bytes]:
            async with session.get(url) as resp:
                return resp.status, dict(resp.headers), await resp.read()

        return await asyncio.gather(*(get(u) for u in urls))


async def test_max_connections_caps_with_503(mast_sim) -> None:
    sim = mast_sim(max_connections=2, latency=0.4, retry_after=0.5)
    uris = lc_uris(sim)[:5]
    results = await _concurrent_gets([sim.download_url(u) for u in uris])
    statuses = sorted(status for status, _, _ in results)
    assert statuses == [200, 200, 503, 503, 503]
    for status, headers, _ in results:
        if status == 503:
            assert headers["Retry-After"] == "0.5"
    stats = sim.stats()
    assert stats["peak_connections"] == 2 and stats["active_connections"] == 0
    assert stats["rejected_connections"] == 3
    # Once the burst is over the same uris are served again.
    assert all(s == 200 for s, _, _ in await _concurrent_gets([sim.download_url(uris[4])]))


async def test_peak_connections_counts_concurrency(mast_sim) -> None:
    sim = mast_sim(latency=0.3)
    uris = lc_uris(sim)[:4]
    started = time.monotonic()
    results = await _concurrent_gets([sim.download_url(u) for u in uris])
    elapsed = time.monotonic() - started
    assert [s for s, _, _ in results] == [200] * 4
    assert 0.3 <= elapsed < 1.2  # latency applies per request, concurrently
    stats = sim.stats()
    assert stats["peak_connections"] == 4 and stats["active_connections"] == 0


def test_latency_and_conn_bandwidth_slow_responses(mast_sim) -> None:
    sim = mast_sim()
    uri = lc_uris(sim)[0]
    size = sim.truth(uri)["size"]
    url = sim.download_url(uri)
    fast = raw_request(url).elapsed
    sim.set(latency=0.3)
    slow = raw_request(url)
    assert slow.elapsed >= 0.3 and slow.elapsed > fast
    rate = size / 0.5  # the whole body should take about 0.5 s
    sim.set(latency=0.0, conn_bandwidth=rate)
    paced = raw_request(url)
    assert paced.status == 200 and len(paced.body) == size
    assert 0.4 <= paced.elapsed < 2.5


async def test_total_bandwidth_is_shared(mast_sim) -> None:
    sim = mast_sim()
    uris = lc_uris(sim)[:4]
    sizes = [sim.truth(u)["size"] for u in uris]
    rate = sum(sizes) / 0.6  # four bodies together should take about 0.6 s
    sim.set(total_bandwidth=rate)
    started = time.monotonic()
    results = await _concurrent_gets([sim.download_url(u) for u in uris])
    elapsed = time.monotonic() - started
    assert [len(b) for _, _, b in results] == sizes
    assert 0.45 <= elapsed < 3.0


# -------------------------------------------------------------------------------------------------
# introspection and control


def test_sim_endpoints_reset_and_config(one) -> None:
    sim, uri, body = one
    url = sim.download_url(uri)
    assert requests.get(url, timeout=10).content == body
    stats = requests.get(f"{sim.url}/_sim/stats", timeout=10).json()
    assert stats["per_uri"][uri]["gets"] == 1 and stats["per_uri"][uri]["statuses"] == [200]
    assert requests.post(f"{sim.url}/_sim/reset", timeout=10).ok
    after = requests.get(f"{sim.url}/_sim/stats", timeout=10).json()
    assert after["requests"] == 0 and after["bytes_served"] == 0 and after["per_uri"] == {}

    changed = requests.post(f"{sim.url}/_sim/config", json={"fail_500": 1.0}, timeout=10)
    assert changed.ok and changed.json()["fail_500"] == 1.0
    assert requests.get(url, timeout=10).status_code == 500
    refused = requests.post(f"{sim.url}/_sim/config", json={"scale": 2.0}, timeout=10)
    assert refused.status_code == 400
    assert requests.post(f"{sim.url}/_sim/config", json={"nope": 1}, timeout=10).status_code == 400
    sim.set(fail_500=0.0)
    assert requests.get(url, timeout=10).content == body
    with pytest.raises(ValueError):
        sim.set(seed=3)


def test_query_requests_are_counted(astroquery_mast) -> None:
    sim = astroquery_mast()
    sector = sim.catalog.sectors()[-1]
    assert astroquery_lc_uris(sim.url, sector) == lc_uris(sim, sector)
    assert sim.stats()["query_requests"] >= 3  # 2 column configs, filtered + products
    assert sim.stats()["requests"] == 0


# -------------------------------------------------------------------------------------------------
# command line


def test_cli_prints_url_and_serves(tmp_path: Path) -> None:
    cfg = default_config()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bulkfetch.testing.mast",
            "--port",
            "0",
            "--scale",
            str(cfg.scale),
            "--sectors",
            str(cfg.n_sectors),
            "--targets",
            str(cfg.targets_per_sector),
            "--fail-500",
            "0",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line.startswith("http://127.0.0.1:")
        in_process = MastSimulator(cfg)  # same knobs, not started: the truth to compare with
        uri = astroquery_lc_uris(line, in_process.catalog.sectors()[0])[0]
        resp = requests.get(f"{line}/api/v0.1/Download/file?uri={uri}", timeout=10)
        assert resp.status_code == 200
        assert sha256(resp.content) == in_process.truth(uri)["sha256"]
        stats = json.loads(requests.get(f"{line}/_sim/stats", timeout=10).text)
        assert stats["requests"] == 1
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0
