"""The manifest: astroquery's four columns first, streamed from a real job state, read back."""

from __future__ import annotations

import hashlib
import os
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from astropy.table import Table

from bulkfetch.manifest import (
    ASTROQUERY_COLUMNS,
    COLUMN_NAMES,
    NOT_YET_MESSAGE,
    iter_rows,
    manifest_table,
    read_manifest,
    write_manifest,
    write_rows,
)
from bulkfetch.sources import download_url
from bulkfetch.store import PlannedProduct, open_store

SERVER = "http://127.0.0.1:9"


def _product(i: int, *, name: str | None = None, obs_id: str | None = None) -> PlannedProduct:
    obs = obs_id or f"tess2018206045859-s0001-{i:016d}-0120-s"
    fname = name or f"{obs}_lc.fits"
    uri = f"mast:TESS/product/{fname}"
    return PlannedProduct(
        uri=uri,
        url=download_url(SERVER, uri),
        local_path=f"mastDownload/TESS/{obs}/{fname}",
        size=2880 * (i + 1),
        obs_collection="TESS",
        obs_id=obs,
        product_filename=fname,
        sector=1,
        kind="LC",
    )


@pytest.fixture()
def job(tmp_path: Path):
    """A real job state with one product in each interesting state."""
    store = open_store(tmp_path)
    products = [_product(i) for i in range(4)]
    # a file name with a space, a quote and a leading '#': the ECSV quoting must survive it
    products.append(_product(4, name='#odd "name" x.fits', obs_id="obs with space"))
    store.add_products(products)
    by_uri = {p.uri: p for p in products}
    items = store.claim(10)
    assert len(items) == 5
    digest = hashlib.sha256(b"x").hexdigest()
    store.finish(products[0].uri, products[0].size, digest)
    store.finish(products[4].uri, products[4].size, digest)
    store.fail(products[1].uri, 'HTTPError: 404 "Not Found"\nfor url', retry=False, http_status=404)
    store.fail(products[2].uri, "connection reset", retry=True)  # back to pending, 1 attempt
    store.release(products[3].uri)  # interrupted: pending, no attempt
    store.flush()
    yield store, tmp_path, by_uri, products, digest
    store.close()


def test_round_trip_ecsv_and_csv_have_astroquery_columns_first(job) -> None:
    store, root, _, products, digest = job
    summary = write_manifest(store, str(root))
    assert sorted(p.name for p in summary.paths) == ["manifest.csv", "manifest.ecsv"]
    assert summary.statuses == {"COMPLETE": 2, "ERROR": 1, "SKIPPED": 2}

    for name in ("manifest.ecsv", "manifest.csv"):
        table = read_manifest(root / name)
        assert tuple(table.colnames[:4]) == ASTROQUERY_COLUMNS
        assert tuple(table.colnames) == COLUMN_NAMES
        assert len(table) == 5
        rows = {str(r["dataURI"]): r for r in table}
        done, err, retry, interrupted, odd = (rows[p.uri] for p in products)

        # Local Path joins the directory as given, like astroquery's os.path.join
        assert done["Local Path"] == os.path.join(
            str(root), "mastDownload", "TESS", products[0].obs_id, products[0].product_filename
        )
        assert odd["Local Path"] == os.path.join(
            str(root), "mastDownload", "TESS", "obs with space", '#odd "name" x.fits'
        )
        assert odd["productFilename"] == '#odd "name" x.fits'
        # COMPLETE: Message and URL empty, digest and size kept
        for r in (done, odd):
            assert r["Status"] == "COMPLETE"
            assert np.ma.is_masked(r["Message"]) or r["Message"] == ""
            assert np.ma.is_masked(r["URL"]) or r["URL"] == ""
            assert r["sha256"] == digest
            assert r["finished"].endswith("Z")
        assert int(done["size"]) == products[0].size
        # ERROR: reason on one line, including the HTTP status, and the URL to retry by hand
        assert err["Status"] == "ERROR"
        assert "404" in err["Message"] and "\n" not in err["Message"]
        assert err["URL"] == products[1].url
        assert int(err["http_status"]) == 404
        assert int(err["attempts"]) == 1
        # not downloaded yet: SKIPPED with a message saying a rerun resumes, URL set
        for r in (retry, interrupted):
            assert r["Status"] == "SKIPPED"
            assert r["Message"].startswith(NOT_YET_MESSAGE)
            assert r["URL"] in (products[2].url, products[3].url)
        assert "connection reset" in retry["Message"]

    ecsv = Table.read(root / "manifest.ecsv")  # format guessed from the extension
    assert str(ecsv["size"].unit) == "byte"
    assert ecsv["size"].dtype == np.int64 and ecsv["attempts"].dtype == np.int64


def test_in_memory_table_matches_the_file_and_astroquery_types(job, monkeypatch) -> None:
    store, root, _, products, _ = job
    monkeypatch.chdir(root)
    write_manifest(store, ".")  # astroquery's default download_dir
    table = manifest_table(store.iter_records(), ".")
    from_file = read_manifest("manifest.ecsv")
    assert tuple(table.colnames) == tuple(from_file.colnames) == COLUMN_NAMES
    # astroquery: Message and URL are object columns holding None on success
    assert table["Message"].dtype == object and table["URL"].dtype == object
    complete = table[table["Status"] == "COMPLETE"]
    assert len(complete) == 2
    assert all(m is None for m in complete["Message"]) and all(u is None for u in complete["URL"])
    # same Local Path strings as astroquery builds for download_dir='.'
    assert list(table["Local Path"]) == list(from_file["Local Path"])
    assert table["Local Path"][0] == os.path.join(
        ".", "mastDownload", "TESS", products[0].obs_id, products[0].product_filename
    )
    for mem, disk in zip(table, from_file, strict=True):
        assert mem["Status"] == disk["Status"] and mem["dataURI"] == disk["dataURI"]
        assert (mem["Message"] is None) == np.ma.is_masked(disk["Message"])
        if mem["Message"] is not None:
            assert mem["Message"] == disk["Message"]


def test_single_output_file_by_extension(job, tmp_path: Path) -> None:
    store, root, *_ = job
    out = tmp_path / "elsewhere" / "m.ecsv"
    summary = write_manifest(store, str(root), output=out)
    assert summary.paths == [out]
    assert len(read_manifest(out)) == 5
    out_csv = tmp_path / "elsewhere" / "m.txt"
    write_manifest(store, str(root), output=out_csv)
    assert open(out_csv).readline().startswith("Local Path,Status,Message,URL,")
    assert not (root / "manifest.csv").exists()


def test_failed_write_keeps_the_previous_manifest(job) -> None:
    store, root, *_ = job
    write_manifest(store, str(root))
    before = (root / "manifest.ecsv").read_bytes()

    def broken():
        yield from iter_rows(store.iter_records(), str(root))
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_rows(broken(), csv_path=root / "manifest.csv", ecsv_path=root / "manifest.ecsv")
    assert (root / "manifest.ecsv").read_bytes() == before
    assert not list(root.glob("*.tmp"))


def test_streaming_memory_does_not_grow_with_rows(tmp_path: Path) -> None:
    """12 000 rows are written with memory bounded by one store batch, not by the row count."""
    store = open_store(tmp_path)
    n = 12_000
    store.add_products(_product(i) for i in range(n))
    tracemalloc.start()
    t0 = time.perf_counter()
    summary = write_manifest(store, str(tmp_path), batch=1_000)
    elapsed = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    store.close()
    assert summary.rows == n and summary.statuses == {"SKIPPED": n}
    # Holding these rows as lists peaks near 13 MB, as a Table near 45 MB (measured); one
    # 1 000-row batch stays near 2.5 MB.
    assert peak < 5 * 1024 * 1024, f"peak {peak / 1e6:.1f} MB"
    table = Table.read(tmp_path / "manifest.ecsv")
    assert len(table) == n
    assert table["dataURI"][-1] == _product(n - 1).uri
    assert (table["size"] == 2880 * (np.arange(n) + 1)).all()
    print(f"manifest: {n} rows in {elapsed:.2f} s (tracemalloc on), peak {peak / 1e6:.1f} MB")
