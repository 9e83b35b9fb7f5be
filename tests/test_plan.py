"""The PLAN stage against the simulated MAST archive and real job states on disk.

What a user relies on: the planned rows are exactly what astroquery itself returns for the same
selection (same dataURIs, URLs, sizes, astroquery's local paths); planning twice sends no query;
an interrupted plan resumes without redoing finished sectors; unsafe names never leave DIR;
every sector that exists is found, whatever its number.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from astropy.table import Table

from bulkfetch.errors import ArchiveError, UsageError
from bulkfetch.plan import (
    PRODUCT_KINDS,
    PlanSummary,
    Selection,
    column_names,
    discover_sectors,
    dv_run,
    export_plan,
    parse_key_values,
    parse_kinds,
    parse_sectors,
    parse_targets,
    plan,
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


# ------------------------------------------------------------------------------------------------
# planning by query, against the simulated archive
# ------------------------------------------------------------------------------------------------

FAST = {"retries": 2, "backoff": 0.01}


def astroquery_products(
    sectors: list[int],
    subgroups: list[str],
    *,
    criteria: dict | None = None,
    filters: dict | None = None,
    targets: list[str] | None = None,
) -> dict[str, tuple[str, str, int, int]]:
    """What plain astroquery returns for a selection: {dataURI: (obs_id, file, size, sector)}.

    The sequential loop a user would write: query_criteria per sector, get_product_list,
    filter_products, first occurrence of each dataURI wins.
    """
    from astroquery.mast import Observations

    out: dict[str, tuple[str, str, int, int]] = {}
    for sector in sectors:
        crit = {
            "obs_collection": "TESS",
            "dataproduct_type": "timeseries",
            "sequence_number": sector,
            **(criteria or {}),
        }
        if targets:
            crit["target_name"] = targets
        obs = Observations.query_criteria(**crit)
        if len(obs) == 0:
            continue
        products = Observations.get_product_list(obs)
        products = Observations.filter_products(
            products, productSubGroupDescription=subgroups, **(filters or {})
        )
        for row in products:
            out.setdefault(
                str(row["dataURI"]),
                (str(row["obs_id"]), str(row["productFilename"]), int(row["size"]), sector),
            )
    return out


def assert_rows_match(store, expected: dict[str, tuple[str, str, int, int]]) -> None:
    rows = _rows(store)
    assert set(rows) == set(expected)
    for uri, (obs_id, name, size, sector) in expected.items():
        rec = rows[uri]
        assert (rec.obs_id, rec.product_filename, rec.size, rec.sector) == (
            obs_id,
            name,
            size,
            sector,
        )
        assert rec.local_path == f"mastDownload/TESS/{obs_id}/{name}"


def test_discovery_finds_every_sector_including_1751(astroquery_mast) -> None:
    sim = astroquery_mast(n_sectors=5)
    found = discover_sectors(sim.url)
    assert found == sim.config.sector_numbers()
    assert 1751 in found and 5 not in found


def test_plan_equals_astroquery_and_urls_serve_the_files(astroquery_mast, tmp_path: Path) -> None:
    import requests

    sim = astroquery_mast(dv_fraction=0.3, fast_fraction=0.3)
    store = open_store(tmp_path)
    kinds = ["lc", "tp", "fast-lc", "dv"]
    # a small batch size forces several get_product_list batches per sector
    summary = plan(
        store, tmp_path, Selection(kinds=kinds), server=sim.url, batch_size=7, workers=3, **FAST
    )
    sectors = sim.config.sector_numbers()
    expected = astroquery_products(sectors, Selection(kinds=kinds).subgroups())
    assert_rows_match(store, expected)
    assert summary.new_files == len(expected) == summary.files
    assert summary.total_bytes == sum(v[2] for v in expected.values())
    assert set(summary.per_sector) == set(sectors)
    assert summary.per_sector[1751][0] == sum(1 for v in expected.values() if v[3] == 1751)
    assert {r.kind for r in _rows(store).values()} >= {"LC", "TP", "FAST-LC", "DVT", "DVR"}
    # The stored URL serves exactly the archive's bytes for that product.
    for rec in list(_rows(store).values())[:3]:
        body = requests.get(rec.url, timeout=30).content
        truth = sim.truth(rec.uri)
        assert len(body) == truth["size"] == rec.size
        assert hashlib.sha256(body).hexdigest() == truth["sha256"]
        assert rec.url == sim.download_url(rec.uri)


def test_local_paths_are_where_astroquery_puts_files(astroquery_mast, tmp_path: Path) -> None:
    from astroquery.mast import Observations

    sim = astroquery_mast(dv_fraction=0.5)
    store = open_store(tmp_path / "job")
    plan(store, tmp_path / "job", Selection(sectors=[2], kinds=["lc", "dv"]), server=sim.url)
    obs = Observations.query_criteria(
        obs_collection="TESS", dataproduct_type="timeseries", sequence_number=2
    )
    products = Observations.get_product_list(obs[:3])
    products = Observations.filter_products(products, productSubGroupDescription=["LC", "DVT"])
    manifest = Observations.download_products(
        products, download_dir=str(tmp_path / "aq"), cache=False, verbose=False
    )
    rows = _rows(store)
    for row, local in zip(products, manifest["Local Path"], strict=True):
        relative = Path(local).resolve().relative_to((tmp_path / "aq").resolve())
        assert rows[str(row["dataURI"])].local_path == relative.as_posix()


def test_second_plan_sends_no_query_and_changes_nothing(astroquery_mast, tmp_path: Path) -> None:
    sim = astroquery_mast()
    store = open_store(tmp_path)
    selection = Selection(kinds=["lc", "tp"])  # sectors discovered
    first = plan(store, tmp_path, selection, server=sim.url)
    before = _rows(store)
    sim.reset_stats()
    second = plan(store, tmp_path, Selection(kinds=["lc", "tp"]), server=sim.url)
    assert sim.stats()["query_requests"] == 0
    assert second.new_files == 0 and second.queried_sectors == []
    assert second.files == first.files and second.per_sector == first.per_sector
    assert _rows(store) == before


def test_wider_selection_adds_only_what_is_new(astroquery_mast, tmp_path: Path) -> None:
    sim = astroquery_mast()
    store = open_store(tmp_path)
    plan(store, tmp_path, Selection(sectors=[1], kinds=["lc"]), server=sim.url)
    sim.reset_stats()
    wider = plan(store, tmp_path, Selection(sectors=[1, 2], kinds=["lc"]), server=sim.url)
    assert wider.queried_sectors == [2] and wider.skipped_sectors == [1]
    one_sector_queries = sim.stats()["query_requests"]
    sim.reset_stats()
    more_kinds = plan(
        store, tmp_path, Selection(sectors=[1, 2], kinds=["lc", "tp"]), server=sim.url
    )
    assert more_kinds.queried_sectors == [1, 2]
    assert sim.stats()["query_requests"] <= 2 * one_sector_queries
    lc = astroquery_products([1, 2], ["LC"])
    tp = astroquery_products([1, 2], ["TP"])
    assert wider.new_files == sum(1 for v in lc.values() if v[3] == 2)
    assert more_kinds.new_files == len(tp)
    assert_rows_match(store, {**lc, **tp})


def test_failed_query_names_sector_keeps_earlier_sectors_rerun_continues(
    astroquery_mast, tmp_path: Path
) -> None:
    sim = astroquery_mast(retry_after=0)  # 503s say "Retry-After: 0": keep the test fast
    store = open_store(tmp_path)
    plan(store, tmp_path, Selection(sectors=[1, 2]), server=sim.url)
    planned = _rows(store)
    sim.set(query_fail_rate=1.0)
    with pytest.raises(ArchiveError) as err:
        plan(store, tmp_path, Selection(sectors=[1, 2, 3]), server=sim.url, **FAST)
    message = str(err.value)
    assert "sector 3" in message and "\n" not in message
    assert _rows(store) == planned
    sim.set(query_fail_rate=0.0)
    again = plan(store, tmp_path, Selection(sectors=[1, 2, 3]), server=sim.url)
    assert again.queried_sectors == [3]
    assert_rows_match(store, astroquery_products([1, 2, 3], ["LC"]))


def test_transient_query_failures_are_retried(astroquery_mast, tmp_path: Path, caplog) -> None:
    sim = astroquery_mast(query_fail_rate=0.3, seed=3, retry_after=0)
    store = open_store(tmp_path)
    caplog.set_level("WARNING", logger="bulkfetch")
    plan(
        store, tmp_path, Selection(kinds=["lc", "tp"]), server=sim.url, batch_size=5,
        retries=10, backoff=0.01,
    )  # fmt: skip
    retried = [r for r in caplog.records if "retry" in r.getMessage()]
    assert retried, "no query failed: the test would prove nothing"
    sim.set(query_fail_rate=0.0)
    assert_rows_match(store, astroquery_products(sim.config.sector_numbers(), ["LC", "TP"]))


def test_killed_plan_resumes_without_redoing_sectors(astroquery_mast, tmp_path: Path) -> None:
    import subprocess
    import sys
    import time

    sim = astroquery_mast(query_latency=0.2, n_sectors=6)
    sectors = sim.config.sector_numbers()
    code = (
        "import sys\n"
        "from bulkfetch.plan import Selection, plan\n"
        "from bulkfetch.store import open_store\n"
        "root = sys.argv[1]\n"
        f"plan(open_store(root), root, Selection(sectors={sectors!r}), server={sim.url!r},"
        " workers=1)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)])
    try:
        deadline = time.monotonic() + 60
        done_units: list[tuple[str, int]] = []
        while time.monotonic() < deadline and proc.poll() is None:
            with open_store(tmp_path) as peek:
                done_units = peek.planned_units()
            if done_units:
                break
            time.sleep(0.05)
        proc.kill()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert done_units, "the subprocess planned nothing before it was killed"
    finished = {int(u.split("|")[0].split(":")[1]) for u, _ in done_units}
    assert finished < set(sectors)
    store = open_store(tmp_path)
    resumed = plan(store, tmp_path, Selection(sectors=sectors), server=sim.url)
    assert not finished & set(resumed.queried_sectors)
    assert_rows_match(store, astroquery_products(sectors, ["LC"]))


def test_criteria_filters_and_targets_match_astroquery(astroquery_mast, tmp_path: Path) -> None:
    sim = astroquery_mast(fast_fraction=0.5)
    kinds = ["lc", "fast-lc"]
    subgroups = Selection(kinds=kinds).subgroups()
    # criteria: only 2-min observations (t_exptime 120 s), filter: only the larger files
    sizes = sorted(v[2] for v in astroquery_products([1], subgroups).values())
    cut = sizes[len(sizes) // 2]
    crit = {"t_exptime": [100.0, 200.0]}
    filt = {"size": f">={cut}"}
    store = open_store(tmp_path / "a")
    sel = Selection(sectors=[1, 2], kinds=kinds, criteria=crit, filters=filt)
    plan(store, tmp_path / "a", sel, server=sim.url)
    expected = astroquery_products([1, 2], subgroups, criteria=crit, filters=filt)
    assert expected and all(v[2] >= cut for v in expected.values())
    assert not any(v[1].endswith("fast-lc.fits") for v in expected.values())
    assert_rows_match(store, expected)
    # targets: three TICs of sector 2, given the way users write them
    tics = sorted({v[0].split("-")[2] for v in expected.values() if v[3] == 2})[:3]
    store = open_store(tmp_path / "b")
    sel = Selection(sectors=[1, 2], targets=parse_targets([f"TIC {t}" for t in tics]))
    plan(store, tmp_path / "b", sel, server=sim.url)
    expected = astroquery_products([1, 2], ["LC"], targets=[t.lstrip("0") for t in tics])
    assert len({v[0] for v in expected.values()}) >= 3
    assert_rows_match(store, expected)


def test_unknown_names_suggest_close_ones(astroquery_mast, tmp_path: Path) -> None:
    sim = astroquery_mast()
    obs_cols, prod_cols = column_names(sim.url)
    assert "t_exptime" in obs_cols and "productSubGroupDescription" in prod_cols
    store = open_store(tmp_path)
    with pytest.raises(UsageError, match="t_exptime"):
        plan(store, tmp_path, Selection(sectors=[1], criteria={"t_exptim": [1, 2]}), server=sim.url)
    with pytest.raises(UsageError, match="productType"):
        plan(
            store,
            tmp_path,
            Selection(sectors=[1], filters={"productTyp": "SCIENCE"}),
            server=sim.url,
        )
    with pytest.raises(UsageError, match="MIN..MAX"):
        plan(store, tmp_path, Selection(sectors=[1], criteria={"t_exptime": "120"}), server=sim.url)
    assert _rows(store) == {}


def test_latest_dv_only_keeps_the_newest_widest_run(astroquery_mast, tmp_path: Path) -> None:
    sim = astroquery_mast(n_sectors=8, dv_fraction=0.5)
    sectors = sim.config.sector_numbers()
    every = astroquery_products(sectors, ["DVT", "DVR", "DVS", "DVM"])

    def runs(names) -> dict[str, set[tuple[int, int]]]:
        out: dict[str, set[tuple[int, int]]] = {}
        for name in names:
            run = dv_run(name)
            if run and run[1] != run[2]:
                out.setdefault(run[0], set()).add((run[1], run[2]))
        return out

    all_runs = runs(v[1] for v in every.values())
    assert any(len(r) > 1 for r in all_runs.values()), "catalog has no superseded runs"
    store = open_store(tmp_path)
    plan(store, tmp_path, Selection(kinds=["dv"], latest_dv_only=True), server=sim.url)
    kept = runs(r.product_filename for r in _rows(store).values())
    assert set(kept) == set(all_runs)
    for tic, options in all_runs.items():
        newest = max(options, key=lambda r: (r[1], -r[0]))
        assert kept[tic] == {newest}
    # single-sector DV results all stay
    single = {u for u, v in every.items() if (r := dv_run(v[1])) and r[1] == r[2]}
    assert single <= set(_rows(store))


def test_latest_dv_only_later_removes_runs_an_earlier_plan_stored(
    astroquery_mast, tmp_path: Path
) -> None:
    """A run stored by an earlier plan leaves the job once a newer run supersedes it.

    Not yet downloaded: removed, partial body included. Downloaded: kept, file and row.
    """
    sim = astroquery_mast(n_sectors=8, dv_fraction=0.5)
    sectors = sim.config.sector_numbers()
    store = open_store(tmp_path)
    dv = Selection(kinds=["dv"], latest_dv_only=True)
    plan(store, tmp_path, Selection(kinds=["dv"], sectors=sectors[:4], latest_dv_only=True),
         server=sim.url)  # fmt: skip
    early = [r for r in _rows(store).values() if (run := dv_run(r.product_filename))
             and run[1] != run[2]]  # fmt: skip
    assert len({dv_run(r.product_filename)[1:] for r in early}) == 1  # one run, s1-s3
    done, partial = early[0], early[1]
    store.claim(10**6)
    store.finish(done.uri, done.size or 0, "0" * 64)
    store.release(partial.uri)
    part = tmp_path / (partial.local_path + ".part")
    part.parent.mkdir(parents=True, exist_ok=True)
    part.write_bytes(b"half a body")
    store.recover()

    summary = plan(store, tmp_path, dv, server=sim.url)
    rows = _rows(store)
    stale = {r.uri for r in early} - {done.uri}
    assert not stale & set(rows), "superseded rows not downloaded must leave the job"
    assert rows[done.uri].status == "done"
    assert not part.exists()
    assert summary.superseded_removed == len(stale)
    assert summary.superseded_kept == 1
    assert "superseded DV runs" in summary.format()
    # what is left equals a fresh latest-only plan, plus the one downloaded file
    fresh_root = tmp_path / "fresh"
    fresh = open_store(fresh_root)
    plan(fresh, fresh_root, dv, server=sim.url)
    assert set(rows) == set(_rows(fresh)) | {done.uri}
    again = plan(store, tmp_path, dv, server=sim.url)  # idempotent
    assert again.superseded_removed == 0 and set(_rows(store)) == set(rows)


def test_dry_run_counts_without_writing(astroquery_mast, tmp_path: Path) -> None:
    sim = astroquery_mast()
    store = open_store(tmp_path)
    summary = plan(store, tmp_path, Selection(sectors=[1, 2]), server=sim.url, dry_run=True)
    expected = astroquery_products([1, 2], ["LC"])
    assert summary.files == len(expected)
    assert summary.total_bytes == sum(v[2] for v in expected.values())
    assert summary.needed_bytes == summary.total_bytes
    assert summary.free_bytes and summary.free_bytes > 0
    assert _rows(store) == {} and store.planned_units() == []
    text = summary.format()
    assert "Dry run" in text and f"{len(expected):,} files" in text


def test_empty_selection_says_so_and_plans_nothing(astroquery_mast, tmp_path: Path) -> None:
    sim = astroquery_mast()
    store = open_store(tmp_path)
    summary = plan(store, tmp_path, Selection(sectors=[1], targets=["1"]), server=sim.url)
    assert summary.empty and "nothing matches" in summary.format()
    assert _rows(store) == {}


def test_unsafe_names_from_the_archive_are_refused(mast_sim, tmp_path: Path) -> None:
    from bulkfetch.testing.catalog import CAT_2MIN, Catalog
    from bulkfetch.testing.fixtures import default_config, use_simulator

    class EvilCatalog(Catalog):
        """Names the first 2-min light curve of every sector '../../evil_lc.fits'."""

        def product_rows_json(self, key):
            rows = super().product_rows_json(key)
            if key[1] == CAT_2MIN and key[2] == 0:
                row = json.loads(rows[0])
                row["productFilename"] = "../../evil_lc.fits"
                rows[0] = json.dumps(row)
            return rows

    config = default_config()
    sim = mast_sim(config, catalog=EvilCatalog(config))
    with use_simulator(sim):
        store = open_store(tmp_path / "job")
        summary = plan(store, tmp_path / "job", Selection(sectors=[1, 2]), server=sim.url)
        expected = astroquery_products([1, 2], ["LC"])
    evil = {u for u, v in expected.items() if v[1] == "../../evil_lc.fits"}
    assert len(evil) == 2
    assert summary.refused == 2 and "evil_lc.fits" in summary.format()
    assert set(_rows(store)) == set(expected) - evil
    assert not list(tmp_path.glob("**/evil*"))


def test_answers_near_the_row_limit_are_split_by_ra(astroquery_mast, tmp_path: Path, caplog):
    """With the limit set to 8 rows, each sector is re-asked in RA slices: same rows."""
    sim = astroquery_mast(targets_per_sector=30)
    caplog.set_level("INFO", logger="bulkfetch")
    store = open_store(tmp_path)
    plan(store, tmp_path, Selection(sectors=[1, 2], kinds=["lc", "tp"]), server=sim.url, max_rows=8)
    assert any("splitting" in r.getMessage() for r in caplog.records)
    assert_rows_match(store, astroquery_products([1, 2], ["LC", "TP"]))


# ------------------------------------------------------------------------------------------------
# the JSON fast path equals astroquery's table path
# ------------------------------------------------------------------------------------------------


def _table_path_rows(results: list[dict], col_config: dict | None, subgroups: list[str]) -> list:
    """Rows the way astroquery builds them: _json_to_table, vstack, filter_products."""
    from astropy.table import vstack
    from astroquery.mast import Observations
    from astroquery.mast.discovery_portal import _json_to_table

    from bulkfetch.plan import rows_from_table
    from bulkfetch.plan.rows import _Refusals

    table = vstack([_json_to_table(r, col_config) for r in results])
    table = Observations.filter_products(table, productSubGroupDescription=subgroups)
    return rows_from_table(table, server=SERVER, flat=False, refusals=_Refusals(), sector=3)


def _fast_path_rows(results: list[dict], col_config: dict | None, subgroups: list[str]) -> list:
    from bulkfetch.plan.rows import _Refusals, _rows_from_json

    rows = _rows_from_json(
        results, col_config, subgroups, server=SERVER, flat=False, refusals=_Refusals(), sector=3
    )
    assert rows is not None
    return rows


def test_json_fast_path_equals_astroquery_tables_on_archive_answers(astroquery_mast) -> None:
    """Every field, extras included, of real get_product_list answers (several pages)."""
    from astroquery.mast import Observations

    from bulkfetch.plan.rows import _json_pages

    astroquery_mast(dv_fraction=0.3, fast_fraction=0.3)
    obs = Observations.query_criteria(
        obs_collection="TESS", dataproduct_type="timeseries", sequence_number=1
    )
    obsids = [str(v) for v in obs["obsid"]]
    responses = Observations._portal_api_connection.service_request_async(
        "Mast.Caom.Products", {"obsid": ",".join(obsids)}, pagesize=7
    )
    assert len(responses) > 1  # paging is exercised
    results, col_config = _json_pages(Observations, responses)
    for kinds in (["lc"], ["lc", "tp", "fast-lc", "dv"]):
        subgroups = Selection(kinds=kinds).subgroups()
        fast = _fast_path_rows(results, col_config, subgroups)
        assert fast, "the archive should hold products of these kinds"
        assert fast == _table_path_rows(results, col_config, subgroups)


def test_planner_sessions_parse_each_answer_once_and_skip_the_debug_hook(astroquery_mast) -> None:
    """Our astroquery instances: same answers, one JSON parse per response, no DEBUG dump.

    astroquery's ``_response_hook`` formats every body for DEBUG logging even when DEBUG is off;
    the planner drops it unless astroquery logs at DEBUG, where it must stay.
    """
    import logging

    from astroquery import log as astroquery_log
    from astroquery.mast import Observations

    from bulkfetch.plan.archive import _new_observations

    astroquery_mast()
    obs = _new_observations(timeout=30)
    assert obs._response_hook not in obs._session.hooks["response"]
    criteria = {"obs_collection": "TESS", "dataproduct_type": "timeseries", "sequence_number": 2}
    responses = obs.query_criteria_async(**criteria)
    assert responses[0].json() is responses[0].json()  # parsed once, shared
    assert responses[0].json(parse_float=str) is not responses[0].json()  # odd arguments: fresh
    ours = obs._portal_api_connection._parse_result(responses)
    theirs = Observations.query_criteria(**criteria)
    assert len(ours) > 0 and ours.pformat_all() == theirs.pformat_all()
    # freed as soon as the last reference goes, not at the next full garbage collection:
    # an answer is megabytes, and a plan makes thousands of them
    import gc
    import weakref

    gone = weakref.ref(responses[0])
    gc.disable()
    try:
        del responses, ours
        assert gone() is None, "a reference cycle keeps the answer alive"
    finally:
        gc.enable()

    saved = astroquery_log.level
    try:
        astroquery_log.setLevel(logging.DEBUG)
        debugging = _new_observations(timeout=30)
        assert debugging._response_hook in debugging._session.hooks["response"]
    finally:
        astroquery_log.setLevel(saved)


def test_json_fast_path_types_nulls_like_astroquery() -> None:
    """Missing keys, nulls, ignore values, ints in string columns, NaN: typed as astroquery."""
    fields = [
        {"name": "_selected_", "type": "boolean"},
        {"name": "obsID", "type": "string"},
        {"name": "obs_collection", "type": "string"},
        {"name": "obs_id", "type": "string"},
        {"name": "dataURI", "type": "string"},
        {"name": "productSubGroupDescription", "type": "string"},
        {"name": "productFilename", "type": "string"},
        {"name": "size", "type": "int"},
        {"name": "calib_level", "type": "int"},
        {"name": "t_exptime", "type": "float"},
        {"name": "dataRights", "type": "string"},
        {"name": "flag", "type": "boolean"},
    ]
    base = {"obs_collection": "TESS", "productSubGroupDescription": "LC"}
    data = [
        {**base, "obsID": 123, "obs_id": "a", "dataURI": "mast:TESS/a_lc.fits",
         "productFilename": "a_lc.fits", "size": 10, "calib_level": 3, "t_exptime": 120.0,
         "dataRights": "PUBLIC", "flag": True},
        {**base, "obsID": "124", "obs_id": "b", "dataURI": "mast:TESS/b_lc.fits",
         "productFilename": "b_lc.fits", "size": -999, "calib_level": None, "t_exptime": None,
         "dataRights": None, "flag": None},
        {**base, "obs_id": "c", "dataURI": "mast:TESS/c_lc.fits", "productFilename": "c_lc.fits",
         "size": 12.0, "t_exptime": 20, "dataRights": 7},
        {**base, "productSubGroupDescription": "TP", "obsID": 1, "obs_id": "d",
         "dataURI": "mast:TESS/d_tp.fits", "productFilename": "d_tp.fits", "size": 5},
        {**base, "productSubGroupDescription": None, "obs_id": "e",
         "dataURI": "mast:TESS/e.fits", "productFilename": "e.fits", "size": 5},
        {**base, "obsID": 123, "obs_id": "a", "dataURI": "mast:TESS/a_lc.fits",
         "productFilename": "a_lc.fits", "size": 10},  # a duplicate: the first one wins
    ]  # fmt: skip
    pages = [{"status": "COMPLETE", "fields": fields, "data": data[:3]},
             {"status": "COMPLETE", "fields": fields, "data": data[3:]}]  # fmt: skip
    config = {"calib_level": {"ignoreValue": 3}}
    for subgroups in (["LC"], ["LC", "TP"], ["DVT"]):
        fast = _fast_path_rows(pages, config, subgroups)
        assert fast == _table_path_rows(pages, config, subgroups)
    rows = _fast_path_rows(pages, config, ["LC"])
    assert [r.uri for r in rows] == ["mast:TESS/a_lc.fits", "mast:TESS/b_lc.fits",
                                     "mast:TESS/c_lc.fits"]  # fmt: skip
    assert rows[0].extra["obsID"] == "123" and rows[1].size is None and rows[2].size == 12
