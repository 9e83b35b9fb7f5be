"""The Python API against the simulated archive: astroquery's call shape, interop both ways,
the Job steps (plan, fetch, status, verify, manifest), and use from a running event loop."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

import pytest
from astropy.io import fits
from astropy.table import Table, vstack

import bulkfetch
from bulkfetch import Job, Selection, download_products
from bulkfetch.manifest import ASTROQUERY_COLUMNS, NOT_YET_MESSAGE

QUIET = {"progress": False}


def _observations():
    from astroquery.mast import Observations

    return Observations


def lc_products(sector: int = 1, n: int = 6) -> Table:
    """Light-curve products of ``n`` 2-min targets of ``sector``, the astroquery way."""
    obs_cls = _observations()
    obs = obs_cls.query_criteria(
        obs_collection="TESS", dataproduct_type="timeseries", sequence_number=sector
    )
    obs = obs[obs["t_exptime"] == 120][:n]
    products = obs_cls.get_product_list(obs)
    return obs_cls.filter_products(products, productSubGroupDescription="LC")


def sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def downloads(sim) -> tuple[int, int]:
    """(GET requests of files, body bytes served) so far."""
    stats = sim.stats()
    return stats["requests"] - stats["head_requests"], stats["bytes_served"]


def assert_bytes_are_truth(sim, manifest: Table) -> None:
    for row in manifest:
        assert row["Status"] == "COMPLETE", (row["Status"], row["Message"])
        truth = sim.truth(row["dataURI"])
        assert os.path.getsize(row["Local Path"]) == truth["size"]
        assert sha256(row["Local Path"]) == truth["sha256"]


def test_download_products_has_astroquery_shape_and_correct_bytes(astroquery_mast, tmp_path):
    sim = astroquery_mast()
    products = lc_products(n=6)
    assert len(products) == 6
    # duplicates and filters are handled as astroquery handles them
    doubled = vstack([products, products, lc_products(n=1)])
    target = str(tmp_path / "data")
    manifest = download_products(
        doubled, download_dir=target, productSubGroupDescription="LC", concurrency=4, **QUIET
    )
    assert tuple(manifest.colnames[:4]) == ASTROQUERY_COLUMNS
    assert len(manifest) == 6
    assert list(manifest["dataURI"]) == list(products["dataURI"])  # order as given
    for row, prod in zip(manifest, products, strict=True):
        assert row["Local Path"] == os.path.join(
            target, "mastDownload", "TESS", prod["obs_id"], prod["productFilename"]
        )
        assert row["Message"] is None and row["URL"] is None
    assert_bytes_are_truth(sim, manifest)
    # the whole job's manifest is on disk too, and reads back
    on_disk = Table.read(Path(target) / "manifest.ecsv")
    assert sorted(on_disk["dataURI"]) == sorted(manifest["dataURI"])
    assert set(on_disk["Status"]) == {"COMPLETE"}

    # nothing left to download: None and astroquery's NoResultsWarning
    from astroquery.exceptions import NoResultsWarning

    with pytest.warns(NoResultsWarning):
        assert download_products(products, download_dir=target, productType="NOSUCH") is None


def test_astroquery_finds_bulkfetch_files_complete_without_downloading(astroquery_mast, tmp_path):
    sim = astroquery_mast()
    products = lc_products(n=5)
    ours = download_products(products, download_dir=str(tmp_path), **QUIET)
    gets, served = downloads(sim)
    assert gets == 5 and served == sum(sim.truth(u)["size"] for u in products["dataURI"])

    theirs = _observations().download_products(products, download_dir=str(tmp_path))
    assert list(theirs["Status"]) == ["COMPLETE"] * 5
    assert list(theirs["Local Path"]) == list(ours["Local Path"])  # identical strings
    gets_after, served_after = downloads(sim)
    assert (gets_after, served_after) == (gets, served), "astroquery transferred body bytes"


def test_directory_filled_by_astroquery_is_adopted_without_downloads(astroquery_mast, tmp_path):
    sim = astroquery_mast()
    products = lc_products(n=5)
    theirs = _observations().download_products(products, download_dir=str(tmp_path))
    assert set(theirs["Status"]) == {"COMPLETE"}
    sim.reset_stats()

    job = Job(str(tmp_path))
    job.plan(table=products)
    result = job.fetch(**QUIET)
    assert (result.done, result.errors, result.pending) == (5, 0, 0)
    assert result.adopted == 5 and result.downloaded == 0
    assert downloads(sim) == (0, 0)
    manifest = job.manifest_table()
    assert list(manifest["Local Path"]) == list(theirs["Local Path"])
    assert_bytes_are_truth(sim, manifest)
    job.close()


def test_lightkurve_layout_and_fits_files(astroquery_mast, tmp_path):
    sim = astroquery_mast()
    products = lc_products(n=2)
    manifest = download_products(products, download_dir=str(tmp_path), **QUIET)
    for row in manifest:
        # lightkurve looks exactly here before asking MAST (search.py, _download_one)
        expected = tmp_path / "mastDownload" / "TESS" / row["obs_id"] / row["productFilename"]
        assert Path(row["Local Path"]) == expected and expected.is_file()
        with fits.open(expected) as hdul:
            assert hdul[0].header["TELESCOP"] == "TESS"
            assert len(hdul[1].data) > 0
    assert_bytes_are_truth(sim, manifest)
    # lightkurve itself recognises and reads what we laid out (SPOC CREATOR, LIGHTCURVE columns).
    lk = pytest.importorskip("lightkurve")
    for row in manifest:
        lc = lk.read(row["Local Path"])
        assert type(lc).__name__ == "TessLightCurve" and len(lc) > 0


def test_flat_layout(astroquery_mast, tmp_path):
    astroquery_mast()
    products = lc_products(n=2)
    manifest = download_products(products, download_dir=str(tmp_path), flat=True, **QUIET)
    for row in manifest:
        assert row["Local Path"] == os.path.join(str(tmp_path), row["productFilename"])
        assert os.path.isfile(row["Local Path"])


def test_cache_false_downloads_again(astroquery_mast, tmp_path):
    sim = astroquery_mast()
    products = lc_products(n=3)
    download_products(products, download_dir=str(tmp_path), **QUIET)
    sim.reset_stats()
    again = download_products(products, download_dir=str(tmp_path), **QUIET)
    assert downloads(sim) == (0, 0)  # cache=True: nothing re-downloaded
    again = download_products(products, download_dir=str(tmp_path), cache=False, **QUIET)
    assert downloads(sim)[0] == 3
    assert_bytes_are_truth(sim, again)


def test_errors_are_named_in_the_manifest(astroquery_mast, tmp_path):
    sim = astroquery_mast(missing_rate=0.4)
    products = lc_products(n=8)
    missing = {u for u in products["dataURI"] if sim.truth(u)["missing"]}
    assert 0 < len(missing) < len(products), "seed gives no mix of missing and present files"
    manifest = download_products(products, download_dir=str(tmp_path), retries=1, **QUIET)
    for row in manifest:
        if row["dataURI"] in missing:
            assert row["Status"] == "ERROR"
            assert "404" in row["Message"]
            assert row["URL"] == sim.download_url(row["dataURI"])
            assert not os.path.exists(row["Local Path"])
        else:
            assert row["Status"] == "COMPLETE"
            assert sha256(row["Local Path"]) == sim.truth(row["dataURI"])["sha256"]

    # the outage ends: calling again retries exactly the failed files, and they arrive
    sim.set(missing_rate=0.0)
    sim.reset_stats()
    again = download_products(products, download_dir=str(tmp_path), **QUIET)
    assert downloads(sim)[0] == len(missing)
    assert_bytes_are_truth(sim, again)


async def test_works_inside_a_running_event_loop(astroquery_mast, tmp_path):
    """A notebook cell: the loop is running, the call still blocks and returns the manifest."""
    import asyncio

    asyncio.get_running_loop()  # we are inside one
    sim = astroquery_mast()
    products = lc_products(n=3)
    manifest = download_products(products, download_dir=str(tmp_path), **QUIET)
    assert_bytes_are_truth(sim, manifest)
    with Job(str(tmp_path)) as job:
        assert job.status().complete
        result = job.fetch(**QUIET)  # nothing left: returns at once, still from inside the loop
        assert result.downloaded == 0 and result.done == 3


def test_job_plan_fetch_status_verify_repairs_damage(astroquery_mast, tmp_path):
    sim = astroquery_mast()
    job = Job(str(tmp_path), server=sim.url)
    summary = job.plan(Selection(sectors=[1], kinds=["lc"]))
    assert summary.files > 0
    status = job.status()
    assert status.total_files == summary.files and status.done_files == 0
    assert status.manifest_counts()["SKIPPED"] == summary.files
    assert not status.running

    result = job.fetch(concurrency=4, **QUIET)
    assert result.done == summary.files and result.errors == 0
    status = job.status()
    assert status.complete and status.done_bytes == status.total_bytes > 0
    manifest = job.manifest_table()
    assert_bytes_are_truth(sim, manifest)
    assert job.verify().ok

    # damage two files on disk: flip bytes of one (same size), delete another
    damaged, deleted = manifest["Local Path"][0], manifest["Local Path"][1]
    data = bytearray(Path(damaged).read_bytes())
    data[5000:5010] = bytes(b ^ 0xFF for b in data[5000:5010])
    Path(damaged).write_bytes(bytes(data))
    os.unlink(deleted)

    report = job.verify()
    assert {u for u, _ in report.damaged} == {manifest["dataURI"][0], manifest["dataURI"][1]}
    assert report.checked == summary.files
    status = job.status()
    assert status.files["pending"] == 2 and status.done_files == summary.files - 2
    on_disk = Table.read(tmp_path / "manifest.ecsv")  # verify rewrote the manifest
    skipped = on_disk[on_disk["Status"] == "SKIPPED"]
    assert len(skipped) == 2 and all(m.startswith(NOT_YET_MESSAGE) for m in skipped["Message"])
    assert all("verify" in m for m in skipped["Message"])

    sim.reset_stats()
    result = job.fetch(**QUIET)
    assert result.downloaded == 2 and downloads(sim)[0] == 2  # only the two repaired
    assert job.verify().ok
    assert_bytes_are_truth(sim, job.manifest_table())
    job.close()


def test_status_sees_a_running_fetch_and_its_concurrency(astroquery_mast, tmp_path):
    # 4 light curves of ~23 KB at 15 KB/s, 2 at a time: about 3 s, long enough to watch (the
    # engine publishes its concurrency once a second)
    sim = astroquery_mast(conn_bandwidth=15_000)
    job = Job(str(tmp_path), server=sim.url)
    job.plan(table=lc_products(n=4))
    done = threading.Event()
    box: dict[str, object] = {}

    def run() -> None:
        with Job(str(tmp_path)) as runner:
            box["result"] = runner.fetch(concurrency=2, handle_signals=False, **QUIET)
        done.set()

    thread = threading.Thread(target=run)
    thread.start()
    seen = None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not done.is_set():
        st = job.status()
        if st.running and st.concurrency:
            seen = st
            break
        time.sleep(0.02)
    thread.join(60)
    assert seen is not None, "never saw the fetch running"
    assert seen.runner_pid == os.getpid()
    assert 1 <= seen.concurrency <= 2
    assert "running: yes" in seen.format()
    final = job.status()
    assert not final.running and final.complete
    job.close()


def test_second_fetch_into_a_running_job_is_refused(astroquery_mast, tmp_path):
    astroquery_mast()
    job = Job(str(tmp_path))
    job.plan(table=lc_products(n=1))
    other = Job(str(tmp_path))
    other.store.acquire_lock()  # another runner holds the directory
    with pytest.raises(bulkfetch.StateError, match="already working"):
        job.fetch(**QUIET)
    other.close()
    assert job.fetch(**QUIET).done == 1
    job.close()


def test_public_api_is_importable() -> None:
    from bulkfetch import api, errors, fetch, manifest, plan, progress

    modules = (api, errors, fetch, manifest, plan, progress)
    for name in bulkfetch.__all__:
        if name != "__version__":
            assert any(getattr(m, name, None) is getattr(bulkfetch, name) for m in modules), name


def test_refused_products_are_errors_in_the_returned_manifest(astroquery_mast, tmp_path):
    sim = astroquery_mast()
    products = lc_products(n=3)
    products["productFilename"] = products["productFilename"].astype(object)
    products["productFilename"][1] = "../../escape.fits"  # a hostile catalog row
    manifest = download_products(products, download_dir=str(tmp_path), **QUIET)
    assert list(manifest["dataURI"]) == list(products["dataURI"])
    bad = manifest[1]
    assert bad["Status"] == "ERROR" and "refused" in bad["Message"]
    assert bad["URL"] == sim.download_url(bad["dataURI"])
    assert not (tmp_path.parent / "escape.fits").exists()
    for i in (0, 2):
        assert manifest["Status"][i] == "COMPLETE"
        assert sha256(manifest["Local Path"][i]) == sim.truth(manifest["dataURI"][i])["sha256"]


def test_astroquery_only_arguments(astroquery_mast, tmp_path, capsys):
    astroquery_mast()
    products = lc_products(n=1)
    with pytest.raises(bulkfetch.UsageError, match="curl_flag"):
        download_products(products, download_dir=str(tmp_path), curl_flag=True)
    # verbose=False means no progress output at all, as with astroquery
    manifest = download_products(products, download_dir=str(tmp_path), verbose=False)
    assert list(manifest["Status"]) == ["COMPLETE"]
    assert capsys.readouterr().err == ""
