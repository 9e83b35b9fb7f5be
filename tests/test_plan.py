"""The PLAN stage against the simulated MAST archive and real job states on disk.

What a user relies on: the planned rows are exactly what astroquery itself returns for the same
selection (same dataURIs, URLs, sizes, astroquery's local paths); planning twice sends no query;
an interrupted plan resumes without redoing finished sectors; unsafe names never leave DIR;
every sector that exists is found, whatever its number.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from astropy.table import Table

from bulkfetch.errors import UsageError
from bulkfetch.plan import (
    PRODUCT_KINDS,
    PlanSummary,
    Selection,
    export_plan,
    parse_key_values,
    parse_kinds,
    parse_sectors,
    parse_targets,
    plan_curl_scripts,
    plan_table,
    product_from_filename,
    read_table,
    read_targets_file,
)
from bulkfetch.sources import download_url
from bulkfetch.store import PlannedProduct, open_store

SERVER = "http://127.0.0.1:9"  # never contacted by the offline tests


def _rows(store) -> dict[str, PlannedProduct]:
    """Every row of a job state as {uri: record}."""
    return {r.uri: r for r in store.iter_records()}


# ------------------------------------------------------------------------------------------------
# parsing what a user types
# ------------------------------------------------------------------------------------------------


def test_parse_sectors_ranges_lists_and_errors() -> None:
    assert parse_sectors("1-5,7,1751") == [1, 2, 3, 4, 5, 7, 1751]
    assert parse_sectors(" 3, 1-2 ,3") == [1, 2, 3]
    for bad in ("", "a", "5-1", "0", "1-x", ","):
        with pytest.raises(UsageError):
            parse_sectors(bad)


def test_parse_kinds_lists_valid_kinds_on_error() -> None:
    assert parse_kinds("lc,TP,lc") == ["lc", "tp"]
    with pytest.raises(UsageError) as err:
        parse_kinds("lc,ffi")
    message = str(err.value)
    assert "'ffi'" in message
    for kind in PRODUCT_KINDS:
        assert kind in message


def test_parse_targets_normalises_tic_ids(tmp_path: Path) -> None:
    assert parse_targets("TIC 0025155310, 261136679,tic123 25155310") == [
        "25155310",
        "261136679",
        "123",
    ]
    with pytest.raises(UsageError):
        parse_targets("12x")
    with pytest.raises(UsageError):
        parse_targets(" , ")
    path = tmp_path / "targets.txt"
    path.write_text("# my targets\n25155310\nTIC 0000000007  # comment\n\n")
    assert read_targets_file(path) == ["25155310", "7"]
    with pytest.raises(UsageError, match="cannot read"):
        read_targets_file(tmp_path / "missing.txt")


def test_parse_key_values_follows_astroquery_value_syntax() -> None:
    crit = parse_key_values(["t_exptime=100..130", "proposal_id=G1,G2", "project=TESS"])
    assert crit == {"t_exptime": [100.0, 130.0], "proposal_id": ["G1", "G2"], "project": "TESS"}
    filt = parse_key_values(["size=>=1000", "productType=!AUXILIARY"], what="filter")
    assert filt == {"size": ">=1000", "productType": "!AUXILIARY"}
    with pytest.raises(UsageError):
        parse_key_values(["noequals"])
    with pytest.raises(UsageError):
        parse_key_values(["a=1", "a=2"])


def test_reserved_criteria_are_refused() -> None:
    with pytest.raises(UsageError, match="--sectors"):
        Selection(criteria={"sequence_number": 3}).validate()
    with pytest.raises(UsageError, match="--targets"):
        Selection(criteria={"target_name": "1"}).validate()


def test_product_from_filename_matches_mast_obs_ids() -> None:
    obs = "tess2018206045859-s0001-0000000025155310-0120-s"
    assert product_from_filename(obs + "_lc.fits") == (obs, "LC")
    assert product_from_filename(obs + "_tp.fits") == (obs, "TP")
    fast = "tess2020186164531-s0027-0000000025155310-0189-a"
    assert product_from_filename(fast + "_fast-lc.fits") == (fast + "_fast", "FAST-LC")


# ------------------------------------------------------------------------------------------------
# planning from a table
# ------------------------------------------------------------------------------------------------


def _product_table(n: int = 5) -> Table:
    obs_ids = [f"tess2018206045859-s0002-{i:016d}-0120-s" for i in range(n)]
    names = [f"{o}_lc.fits" for o in obs_ids]
    return Table(
        {
            "obsID": [str(1000 + i) for i in range(n)],
            "obs_collection": ["TESS"] * n,
            "obs_id": obs_ids,
            "dataURI": [f"mast:TESS/product/{f}" for f in names],
            "productSubGroupDescription": ["LC"] * n,
            "productFilename": names,
            "size": [2880 * (i + 1) for i in range(n)],
            "description": ["Light curves"] * n,
        }
    )


def test_plan_table_stores_astroquery_paths_urls_and_extra(tmp_path: Path) -> None:
    table = _product_table(5)
    store = open_store(tmp_path)
    summary = plan_table(store, tmp_path, table, server=SERVER)
    assert summary.new_files == 5 and summary.files == 5
    assert summary.total_bytes == sum(2880 * (i + 1) for i in range(5))
    assert summary.per_sector == {2: (5, summary.total_bytes)}
    rows = _rows(store)
    for row in table:
        rec = rows[row["dataURI"]]
        assert rec.url == download_url(SERVER, row["dataURI"])
        assert rec.local_path == f"mastDownload/TESS/{row['obs_id']}/{row['productFilename']}"
        assert rec.size == row["size"]
        assert rec.kind == "LC"
        assert rec.extra["obsID"] == row["obsID"]
        assert rec.extra["description"] == "Light curves"
    # the same table again adds nothing
    again = plan_table(store, tmp_path, table, server=SERVER)
    assert again.new_files == 0
    assert len(_rows(store)) == 5
    flat_store = open_store(tmp_path / "flat")
    plan_table(flat_store, tmp_path / "flat", table, server=SERVER, flat=True)
    assert {r.local_path for r in _rows(flat_store).values()} == set(table["productFilename"])


def test_plan_table_refuses_paths_that_leave_dir_and_plans_the_rest(tmp_path: Path) -> None:
    table = _product_table(4)
    table["productFilename"] = table["productFilename"].astype(object)
    table["obs_id"] = table["obs_id"].astype(object)
    table["productFilename"][1] = "../../evil.fits"
    table["obs_id"][2] = ".."
    store = open_store(tmp_path / "job")
    summary = plan_table(store, tmp_path / "job", table, server=SERVER)
    assert summary.refused == 2
    assert any("../../evil.fits" in m for m in summary.refused_examples)
    assert "refused: 2" in summary.format()
    rows = _rows(store)
    assert set(rows) == {table["dataURI"][0], table["dataURI"][3]}
    for rec in rows.values():
        assert ".." not in Path(rec.local_path).parts


def test_plan_table_names_missing_columns(tmp_path: Path) -> None:
    table = _product_table(2)
    table.remove_columns(["dataURI", "obs_id"])
    with pytest.raises(UsageError) as err:
        plan_table(open_store(tmp_path), tmp_path, table, server=SERVER)
    assert "dataURI" in str(err.value) and "obs_id" in str(err.value)


@pytest.mark.parametrize(
    ("suffix", "fmt"),
    [(".ecsv", "ascii.ecsv"), (".csv", "ascii.csv"), (".xml", "votable"), (".fits", "fits")],
)
def test_read_table_formats_plan_identically(tmp_path: Path, suffix: str, fmt: str) -> None:
    table = _product_table(3)
    path = tmp_path / f"products{suffix}"
    table.write(path, format=fmt)
    store = open_store(tmp_path / "job")
    plan_table(store, tmp_path / "job", read_table(path), server=SERVER)
    rows = _rows(store)
    assert set(rows) == set(table["dataURI"])
    assert {r.size for r in rows.values()} == set(int(s) for s in table["size"])


def test_read_table_refuses_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no such table"):
        read_table(tmp_path / "nope.ecsv")
    bad = tmp_path / "bad.fits"
    bad.write_bytes(b"not a fits file")
    with pytest.raises(UsageError, match="cannot read table"):
        read_table(bad)


def test_export_round_trips_through_read_table(tmp_path: Path) -> None:
    store = open_store(tmp_path / "a")
    plan_table(store, tmp_path / "a", _product_table(6), server=SERVER)
    for suffix in (".ecsv", ".csv"):
        out = tmp_path / f"plan{suffix}"
        assert export_plan(store, out) == 6
        back = read_table(out)
        assert back.colnames[:3] == ["obsID", "obs_collection", "obs_id"]
        again = open_store(tmp_path / f"b{suffix}")
        plan_table(again, tmp_path / f"b{suffix}", back, server=SERVER)
        orig, copy = _rows(store), _rows(again)
        assert set(orig) == set(copy)
        for uri, rec in orig.items():
            other = copy[uri]
            assert (other.url, other.local_path, other.size, other.kind, other.sector) == (
                rec.url,
                rec.local_path,
                rec.size,
                rec.kind,
                rec.sector,
            )
            assert str(other.extra["obsID"]) == rec.extra["obsID"]


# ------------------------------------------------------------------------------------------------
# planning from MAST's bulk curl scripts
# ------------------------------------------------------------------------------------------------


def _curl_script(path: Path, names: list[str], bad_lines: dict[int, str] | None = None) -> None:
    lines = ["#!/bin/sh"]
    for name in names:
        lines.append(
            f"curl -C - -L -o {name} "
            f"https://mast.stsci.edu/api/v0.1/Download/file/?uri=mast:TESS/product/{name}"
        )
    for index, text in sorted((bad_lines or {}).items()):
        lines.insert(index - 1, text)
    path.write_text("\n".join(lines) + "\n")


def test_curl_scripts_become_jobs_without_queries(tmp_path: Path) -> None:
    obs = [f"tess2018206045859-s0001-{i:016d}-0120-s" for i in range(3)]
    names = [f"{o}_lc.fits" for o in obs]
    script = tmp_path / "tesscurl_sector_1_lc.sh"
    # line 3 lacks -o, line 5 is not curl at all
    _curl_script(script, names, {3: "curl -C - -L https://x/?uri=a", 5: "wget something"})
    store = open_store(tmp_path / "job")
    summary = plan_curl_scripts(store, tmp_path / "job", [script])
    assert summary.new_files == 3
    assert summary.refused == 2
    assert any(f"{script}:3:" in m for m in summary.refused_examples)
    assert any(f"{script}:5:" in m for m in summary.refused_examples)
    rows = _rows(store)
    for o, name in zip(obs, names, strict=True):
        rec = rows[f"mast:TESS/product/{name}"]
        assert rec.obs_id == o
        assert rec.local_path == f"mastDownload/TESS/{o}/{name}"
        assert rec.sector == 1 and rec.kind == "LC"
        assert rec.url.startswith("https://mast.stsci.edu/api/v0.1/Download/file/?uri=")
    # --mast-url rewrites the URLs the way astroquery builds them
    other = open_store(tmp_path / "job2")
    plan_curl_scripts(other, tmp_path / "job2", [script], server=SERVER, flat=True)
    for rec in _rows(other).values():
        assert rec.url == download_url(SERVER, rec.uri)
        assert rec.local_path == rec.product_filename


def test_curl_script_with_unsafe_names_and_no_curl_lines(tmp_path: Path) -> None:
    script = tmp_path / "evil.sh"
    script.write_text(
        "#!/bin/sh\n"
        "curl -C - -L -o ../escape.fits https://h/api/v0.1/Download/file/?uri=mast:TESS/product/x\n"
        "curl -C - -L -o ok_lc.fits https://h/api/v0.1/Download/file/?uri=mast:TESS/product/ok\n"
    )
    store = open_store(tmp_path / "job")
    summary = plan_curl_scripts(store, tmp_path / "job", [script])
    assert summary.refused == 1 and summary.new_files == 1
    assert "escape" in summary.refused_examples[0]
    empty = tmp_path / "empty.sh"
    empty.write_text("#!/bin/sh\necho hello\n")
    with pytest.raises(UsageError, match="empty.sh"):
        plan_curl_scripts(store, tmp_path / "job", [empty])


def test_summary_warns_when_the_job_does_not_fit(tmp_path: Path) -> None:
    summary = PlanSummary(root=str(tmp_path))
    summary.add(1, 10, 5_000_000)
    summary.needed_bytes = 5_000_000
    summary.free_bytes = 1_000
    text = summary.format()
    assert not summary.fits
    assert "WARNING" in text and "will not fit" in text
    summary.free_bytes = 10**12
    assert summary.fits and "WARNING" not in summary.format()
    empty = PlanSummary(root=str(tmp_path))
    assert empty.empty and "nothing matches" in empty.format()


def test_summary_json_free_of_numpy(tmp_path: Path) -> None:
    """Extra columns are stored as JSON: numpy scalars and masked values must not leak in."""
    table = _product_table(2)
    table["calib_level"] = np.array([3, 3], dtype=np.int16)
    table["score"] = np.ma.MaskedArray([1.5, 0.0], mask=[False, True])
    store = open_store(tmp_path)
    plan_table(store, tmp_path, table, server=SERVER)
    for rec in _rows(store).values():
        json.dumps(rec.extra)
        assert isinstance(rec.extra["calib_level"], int)
    values = sorted((r.extra["score"] is None) for r in _rows(store).values())
    assert values == [False, True]
