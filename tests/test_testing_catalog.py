"""The simulated archive's catalog and query API, driven by UNMODIFIED astroquery over HTTP.

What a planner relies on: a per-sector query returns every observation of the sector with every
column MAST sends; counts, paging and target lookups agree with each other; product lists have
exactly one light curve per 2-min observation, consistent with what the download server will
serve; sectors can be discovered (including the non-contiguous 1751); multi-sector DV runs
supersede each other; everything is a deterministic function of the seed; a whole-TESS-sized
catalog answers a full page quickly; injected query failures reach astroquery as HTTPError.
"""

from __future__ import annotations

import json
import re
import time
import tracemalloc
import warnings
from collections import defaultdict
from urllib.parse import quote

import numpy as np
import pytest
import requests
from astropy.coordinates import SkyCoord
from astroquery.exceptions import InvalidQueryError, NoResultsWarning, RemoteServiceError
from astroquery.mast import Observations
from astroquery.mast.discovery_portal import PortalAPI

from bulkfetch.testing.catalog import Catalog, ProductInfo
from bulkfetch.testing.config import SimConfig
from bulkfetch.testing.fixtures import default_config

# The observation columns real MAST returns for TESS, in order (reference section 3), plus
# obsid and objID; and the product columns.
OBS_COLUMNS = (
    "intentType obs_collection provenance_name instrument_name project filters wavelength_region "
    "target_name target_classification obs_id s_ra s_dec dataproduct_type proposal_pi "
    "calib_level t_min t_max t_exptime em_min em_max obs_title t_obs_release proposal_id "
    "proposal_type sequence_number s_region jpegURL dataURL dataRights mtFlag srcDen obsid objID"
).split()
PRODUCT_COLUMNS = (
    "obsID obs_collection dataproduct_type obs_id description type dataURI productType "
    "productGroupDescription productSubGroupDescription productDocumentationURL project "
    "prvversion proposal_id productFilename size parent_obsid dataRights calib_level filters"
).split()

TWO_MIN = re.compile(r"tess(\d{13})-s(\d{4})-(\d{16})-(\d{4})-s")
FAST = re.compile(r"tess(\d{13})-s(\d{4})-(\d{16})-(\d{4})-a_fast")
MULTI_DV = re.compile(r"tess(\d{13})-s(\d{4})-s(\d{4})-(\d{16})-(\d{5})")


def config(**knobs) -> SimConfig:
    """A fresh config per simulator: the simulator's ``set()`` changes its config in place."""
    return default_config(**{"fast_fraction": 0.2, "dv_fraction": 0.3, **knobs})


CONFIG = config()  # read-only reference values (sector numbers, targets per sector)


def sector_obs(sector: int, **kw):
    return Observations.query_criteria(
        obs_collection="TESS", sequence_number=sector, dataproduct_type="timeseries", **kw
    )


def raw_invoke(url: str, request: dict) -> requests.Response:
    """POST a Mashup request the way astroquery encodes it."""
    body = "request=" + quote(json.dumps(request))
    headers = {"Content-type": "application/x-www-form-urlencoded", "Accept": "text/plain"}
    return requests.post(url + "/api/v0/invoke", data=body, headers=headers, timeout=60)


# -- observations ----------------------------------------------------------------------------


def test_sector_query_has_every_column_and_every_observation(astroquery_mast) -> None:
    astroquery_mast(config())
    obs = sector_obs(2)
    assert obs.colnames == OBS_COLUMNS
    assert set(obs["sequence_number"]) == {2}
    assert set(obs["obs_collection"]) == {"TESS"}
    assert set(obs["dataproduct_type"]) == {"timeseries"}
    two_min = [r for r in obs if TWO_MIN.fullmatch(r["obs_id"])]
    assert len(two_min) == CONFIG.targets_per_sector
    for row in two_min:
        m = TWO_MIN.fullmatch(row["obs_id"])
        assert int(m.group(2)) == 2
        assert int(m.group(3)) == int(row["target_name"])
        assert row["t_exptime"] == 120.0
        assert row["dataURL"] == f"mast:TESS/product/{row['obs_id']}_lc.fits"
        assert row["t_min"] < row["t_max"] < row["t_obs_release"]
        assert -90 <= row["s_dec"] <= 90 and 0 <= row["s_ra"] < 360
    fast = [r for r in obs if FAST.fullmatch(r["obs_id"])]
    assert fast, "a fast_fraction of 0.2 gives some 20-s observations"
    assert all(r["t_exptime"] == 20.0 for r in fast)
    two_min_targets = {r["target_name"] for r in two_min}
    assert {r["target_name"] for r in fast} <= two_min_targets
    # obsid is a string column in astroquery (get_product_list joins it) and unique
    assert obs["obsid"].dtype.kind == "U"
    assert len(set(obs["obsid"])) == len(obs)
    # sector 1 starts at MAST's real first timestamp
    s1 = sector_obs(1)
    assert all(o.startswith("tess2018206045859-s0001-") for o in s1["obs_id"] if "-s0001-0" in o)
    count = Observations.query_criteria_count(
        obs_collection="TESS", sequence_number=2, dataproduct_type="timeseries"
    )
    assert count == len(obs)


def test_paging_returns_the_same_rows_as_one_page(astroquery_mast) -> None:
    sim = astroquery_mast(config())
    whole = sector_obs(3)
    before = sim.stats()["query_requests"]
    paged = sector_obs(3, pagesize=7)
    calls = sim.stats()["query_requests"] - before
    assert calls == -(-len(whole) // 7)  # one invoke per page, columns config cached
    assert len(paged) == len(whole)
    for name in OBS_COLUMNS:
        assert list(paged[name]) == list(whole[name]), name
    # page= fetches exactly that page
    second = sector_obs(3, pagesize=7, page=2)
    assert list(second["obsid"]) == list(whole["obsid"][7:14])


def test_target_name_finds_every_observation_of_a_target(astroquery_mast) -> None:
    astroquery_mast(config())
    sectors = CONFIG.sector_numbers()
    everything = [sector_obs(s) for s in sectors]
    by_target: dict[str, set[str]] = defaultdict(set)
    for table in everything:
        for row in table:
            by_target[row["target_name"]].add(row["obs_id"])
    multi = [t for t, ids in by_target.items() if len({i.split("-")[1] for i in ids}) > 1]
    assert multi, "targets recur across sectors"
    for target in multi[:3] + [next(iter(by_target))]:
        found = Observations.query_criteria(target_name=target)
        assert set(found["obs_id"]) == by_target[target]
        assert set(found["target_name"]) == {target}
        assert Observations.query_criteria_count(target_name=target) == len(by_target[target])
    # an obs_id decodes straight to its observation
    some = everything[0][0]
    one = Observations.query_criteria(obs_id=some["obs_id"])
    assert list(one["obsid"]) == [some["obsid"]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoResultsWarning)
        assert len(Observations.query_criteria(target_name="1")) == 0


def test_filters_wildcards_and_ranges_agree_with_a_full_listing(astroquery_mast) -> None:
    astroquery_mast(config())
    listing = sector_obs(1)
    fast = Observations.query_criteria(sequence_number=1, t_exptime=[10, 30])
    assert set(fast["obs_id"]) == {o for o in listing["obs_id"] if o.endswith("-a_fast")}
    wild = Observations.query_criteria(sequence_number=1, target_name="1*")
    assert set(wild["obs_id"]) == {r["obs_id"] for r in listing if r["target_name"][0] == "1"}
    # a filter no fast path resolves, paged: same rows as in one page
    paged = Observations.query_criteria(sequence_number=1, target_name="1*", pagesize=3)
    assert list(paged["obsid"]) == list(wild["obsid"])
    # case-insensitive values and several values OR-ed
    either = Observations.query_criteria(
        obs_collection="tess", sequence_number=[1, 2], dataproduct_type="TIMESERIES"
    )
    assert len(either) == len(listing) + len(sector_obs(2))


def test_sector_discovery_through_ffis_finds_non_contiguous_sectors(astroquery_mast) -> None:
    config = default_config(sectors=(1, 2, 5, 1751))
    astroquery_mast(config)
    ffis = Observations.query_criteria(obs_collection="TESS", target_name="TESS FFI")
    assert sorted(set(int(s) for s in ffis["sequence_number"])) == [1, 2, 5, 1751]
    assert len(ffis) == 16 * 4
    assert set(ffis["dataproduct_type"]) == {"image"}
    assert "tess-s1751-4-4" in set(ffis["obs_id"])
    images = Observations.query_criteria(obs_collection="TESS", dataproduct_type="image")
    assert sorted(images["obsid"]) == sorted(ffis["obsid"])
    # astroquery refuses to list FFI products; the rows are real enough for it to recognise
    with pytest.raises(InvalidQueryError):
        Observations.get_product_list(ffis)


# -- products --------------------------------------------------------------------------------


def test_products_one_light_curve_per_2min_observation(astroquery_mast) -> None:
    sim = astroquery_mast(config())
    catalog: Catalog = sim.catalog
    obs = sector_obs(4 if 4 in CONFIG.sector_numbers() else 3)
    products = Observations.get_product_list(obs)
    assert products.colnames == PRODUCT_COLUMNS
    lcs = Observations.filter_products(products, productSubGroupDescription="LC")
    two_min = [r for r in obs if TWO_MIN.fullmatch(r["obs_id"])]
    assert len(lcs) == len(two_min)
    assert sorted(lcs["productFilename"]) == sorted(r["obs_id"] + "_lc.fits" for r in two_min)
    assert set(lcs["parent_obsid"]) == {r["obsid"] for r in two_min}
    assert set(lcs["productGroupDescription"]) == {"Minimum Recommended Products"}
    kinds = set(products["productSubGroupDescription"])
    assert {"LC", "TP", "FAST-LC", "FAST-TP", "DVT", "DVR", "DVS", "DVM"} <= kinds
    assert str(products["obsID"].dtype)[1] == "U"  # strings in astroquery, like obsid
    for row in products:
        assert row["dataURI"] == "mast:TESS/product/" + row["productFilename"]
        info = catalog.product(row["dataURI"])
        assert isinstance(info, ProductInfo)
        assert (info.filename, info.size, info.kind) == (
            row["productFilename"],
            row["size"],
            row["productSubGroupDescription"],
        )
        if info.filename.endswith(".fits"):
            assert info.size % 2880 == 0 and info.size > 0
    lc_sizes = np.array(lcs["size"], dtype=float)
    tp_sizes = {
        r["obs_id"]: r["size"]
        for r in Observations.filter_products(products, productSubGroupDescription="TP")
    }
    for lc in lcs:  # a target pixel file is 10-20x its light curve (within block rounding)
        assert 8 * lc["size"] <= tp_sizes[lc["obs_id"]] <= 22 * lc["size"]
    assert lc_sizes.std() > 0
    # the products of an observation are also reachable from the catalog API
    obsid = int(two_min[0]["obsid"])
    assert {p.uri for p in catalog.products_of(obsid)} == set(
        products["dataURI"][products["parent_obsid"] == two_min[0]["obsid"]]
    )


def test_product_lookup_rejects_what_the_catalog_does_not_list() -> None:
    catalog = Catalog(config())
    uri = next(catalog.iter_products(1)).uri
    assert catalog.product(uri) is not None
    assert catalog.product(uri.replace("s0001", "s0009")) is None  # no such sector
    assert catalog.product(uri.replace("_lc.fits", "_xx.fits")) is None
    tic = re.search(r"-(\d{16})-", uri).group(1)
    assert catalog.product(uri.replace(tic, f"{int(tic) + 1:016d}")) is None
    assert catalog.product(uri.replace("mast:TESS", "mast:HST")) is None
    assert catalog.product("mast:TESS/product/../../etc/passwd") is None
    # Early sectors' FITS files lack DATASUM (documented rule the body generator follows)
    early = [p for p in catalog.iter_products(1) if p.filename.endswith(".fits")]
    late = [p for p in catalog.iter_products(1751) if p.filename.endswith(".fits")]
    assert early and not any(p.has_datasum for p in early)
    assert late and all(p.has_datasum for p in late)


def test_multi_sector_dv_runs_supersede_each_other(astroquery_mast) -> None:
    sim = astroquery_mast(config())
    last = CONFIG.sector_numbers()[-1]
    runs = [r for r in sector_obs(last) if MULTI_DV.fullmatch(r["obs_id"])]
    assert runs, "the last sector completes a multi-sector DV run"
    older_found = False
    for run in runs:
        target = run["target_name"]
        everything = Observations.query_criteria(target_name=target)
        dv = [r for r in everything if MULTI_DV.fullmatch(r["obs_id"])]
        singles = [r for r in everything if TWO_MIN.fullmatch(r["obs_id"])]
        for r in dv:  # a run needs the target in at least two of its sectors
            m = MULTI_DV.fullmatch(r["obs_id"])
            first, end = int(m.group(2)), int(m.group(3))
            assert r["sequence_number"] == end and r["dataURL"].endswith("_dvt.fits")
            assert len([s for s in singles if first <= s["sequence_number"] <= end]) >= 2
        if len(dv) >= 2:
            old, new = sorted(dv, key=lambda r: int(MULTI_DV.fullmatch(r["obs_id"]).group(3)))[:2]
            assert old["obs_id"] != new["obs_id"]
            assert MULTI_DV.fullmatch(old["obs_id"]).group(5) != MULTI_DV.fullmatch(
                new["obs_id"]
            ).group(5)
            assert old["t_obs_release"] < new["t_obs_release"]
            assert old["t_max"] < new["t_max"]
            older_found = True
            products = Observations.get_product_list(
                everything[everything["obsid"] == old["obsid"]]
            )
            assert {"DVT", "DVR", "DVS", "DVM"} == set(products["productSubGroupDescription"])
            for uri in products["dataURI"]:
                assert sim.catalog.product(uri).sector is None
    assert older_found, "some target has an older run superseded by a newer, wider one"


# -- scale, determinism, faults --------------------------------------------------------------


def test_same_seed_same_rows_different_seed_different_rows(mast_sim) -> None:
    request = {
        "service": "Mast.Caom.Filtered",
        "params": {"columns": "*", "filters": [{"paramName": "sequence_number", "values": ["2"]}]},
        "format": "json",
        "pagesize": 50000,
        "page": 1,
    }
    a, b, c = (mast_sim(default_config(seed=seed)) for seed in (7, 7, 8))
    answers = [raw_invoke(sim.url, request).json() for sim in (a, b, c)]
    assert answers[0] == answers[1]
    assert answers[0]["data"] and answers[0]["paging"]["rowsFiltered"] == len(answers[0]["data"])
    names = [{r["target_name"] for r in ans["data"]} for ans in answers]
    assert names[0] == names[1] and names[0] != names[2]
    # the fast dict API and the HTTP answer agree
    direct = Catalog(default_config(seed=7)).invoke(request)
    assert direct == answers[0]


def test_whole_tess_sized_catalog_answers_a_full_page_quickly(mast_sim) -> None:
    whole_tess = SimConfig(seed=1, n_sectors=100, targets_per_sector=20000)
    tracemalloc.start()
    try:
        Catalog(whole_tess)
        built = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert built < 5_000_000, "the catalog is derived on demand, not generated up front"
    sim = mast_sim(whole_tess)
    started = time.perf_counter()
    obs = raw_invoke(
        sim.url,
        {
            "service": "Mast.Caom.Filtered",
            "params": {
                "columns": "*",
                "filters": [{"paramName": "obs_collection", "values": ["TESS"]}],
            },
            "pagesize": 50000,
            "page": 30,
        },
    )
    obs_seconds = time.perf_counter() - started
    answer = obs.json()
    assert answer["status"] == "COMPLETE"
    assert answer["paging"]["rows"] == 50000
    assert answer["paging"]["rowsFiltered"] > 2_000_000  # 100 sectors x 20,000 targets
    assert len({r["obsid"] for r in answer["data"]}) == 50000
    obsids = ",".join(str(r["obsid"]) for r in answer["data"])
    started = time.perf_counter()
    prods = raw_invoke(
        sim.url,
        {"service": "Mast.Caom.Products", "params": {"obsid": obsids}, "pagesize": 50000},
    ).json()
    prod_seconds = time.perf_counter() - started
    assert prods["paging"]["rows"] == 50000 and prods["paging"]["rowsFiltered"] > 100000
    # Loose bounds (2 shared cores): this is about "works without generating the world".
    assert obs_seconds < 30 and prod_seconds < 30


def test_query_fail_rate_reaches_astroquery_as_http_errors(astroquery_mast) -> None:
    sim = astroquery_mast(config())
    expected = sector_obs(1)
    sim.set(query_fail_rate=1.0)
    with pytest.raises(requests.HTTPError) as info:
        sector_obs(1)
    assert info.value.response.status_code in (500, 503)
    sim.set(query_fail_rate=0.5)
    statuses = []
    result = None
    for _ in range(40):  # a caller that retries gets through: failures vary across calls
        try:
            result = sector_obs(1)
        except requests.HTTPError as exc:
            statuses.append(exc.response.status_code)
            if exc.response.status_code == 503:
                assert exc.response.headers.get("Retry-After") is not None
            continue
        break
    assert statuses and set(statuses) <= {500, 503}
    assert result is not None and list(result["obsid"]) == list(expected["obsid"])


def test_executing_answers_are_polled_through(astroquery_mast) -> None:
    sim = astroquery_mast(default_config(extra={"query_executing_polls": 2}))
    before = sim.stats()["query_requests"]
    obs = sector_obs(1)
    assert len(obs) > 0
    # columns config once, then the same invoke body three times (EXECUTING, EXECUTING, done)
    assert sim.stats()["query_requests"] - before == 1 + 3


def test_malformed_requests_get_status_error(astroquery_mast) -> None:
    sim = astroquery_mast(config())
    with pytest.raises(RemoteServiceError, match="Unknown service"):
        PortalAPI().service_request("Mast.No.Such.Service", {})
    bad_filter = {
        "service": "Mast.Caom.Filtered",
        "params": {"columns": "*", "filters": [{"paramName": "no_such_column", "values": ["1"]}]},
    }
    for request in (
        bad_filter,
        {"service": "Mast.Caom.Products", "params": {"obsid": "12,abc"}},
        {"service": "Mast.Caom.Filtered", "params": {}, "pagesize": 0},
    ):
        answer = raw_invoke(sim.url, request)
        assert answer.status_code == 200 and answer.json()["status"] == "ERROR"
        assert answer.json()["msg"]
    garbage = requests.post(sim.url + "/api/v0/invoke", data="request=%7Bnot json", timeout=10)
    assert garbage.json()["status"] == "ERROR"
    unknown = requests.post(
        sim.url + "/portal/Mashup/Mashup.asmx/columnsconfig", data="colConfigId=Nope", timeout=10
    )
    assert unknown.json() == {}


def test_metadata_tables_are_complete(astroquery_mast) -> None:
    astroquery_mast(config())
    obs_meta = Observations.get_metadata("observations")
    assert set(OBS_COLUMNS) <= set(obs_meta["Column Name"])
    assert "obs_creator_name" not in set(obs_meta["Column Name"])  # "remove" entries skipped
    types = dict(zip(obs_meta["Column Name"], obs_meta["Data Type"], strict=True))
    for name in ("s_ra", "s_dec", "t_min", "t_max", "t_exptime", "em_min", "em_max"):
        assert types[name] == "float", name  # continuous: astroquery filters them by range
    assert types["sequence_number"] == "integer" and types["target_name"] == "string"
    assert all(obs_meta["Description"])
    prod_meta = Observations.get_metadata("products")
    assert list(prod_meta["Column Name"]) == PRODUCT_COLUMNS


def test_cone_search_returns_nearby_observations_with_distances(astroquery_mast) -> None:
    astroquery_mast(config())
    target = sector_obs(1)[0]
    centre = SkyCoord(target["s_ra"], target["s_dec"], unit="deg")
    near = Observations.query_region(centre, radius=0.05)
    assert target["obs_id"] in set(near["obs_id"])
    assert (near["distance"] <= 0.05 * 3600 + 1e-6).all()
    assert set(Observations.query_criteria(target_name=target["target_name"])["obs_id"]) <= set(
        near["obs_id"]
    )
    with_filter = Observations.query_criteria(coordinates=centre, radius=0.05, t_exptime=[100, 150])
    assert set(with_filter["t_exptime"]) == {120.0}


def test_every_identifier_decodes_back_to_its_observation() -> None:
    """The O(1) inversions (obsid, obs_id, TIC, dataURI) agree with a full enumeration."""
    catalog = Catalog(config(sectors=(1, 2, 3, 9, 1751), targets_per_sector=30))
    answer = catalog.invoke(
        {
            "service": "Mast.Caom.Filtered",
            "params": {"columns": "*", "filters": [{"paramName": "project", "values": ["TESS"]}]},
            "pagesize": 100000,
        }
    )
    rows = answer["data"]
    assert answer["paging"]["rowsFiltered"] == len(rows)
    assert len({r["obs_id"] for r in rows}) == len(rows)
    by_target: dict[str, set[int]] = defaultdict(set)
    for row in rows:
        key = catalog.key_of_obsid(row["obsid"])
        assert key is not None and catalog.key_of_obs_id(row["obs_id"]) == key
        if row["target_name"] != "TESS FFI":
            by_target[row["target_name"]].add(row["obsid"])
    for target, obsids in by_target.items():
        keys = catalog.keys_of_tic(int(target))
        assert {catalog.obsid_of(k) for k in keys} == obsids
    ids = ",".join(str(r["obsid"]) for r in rows)
    request = {"service": "Mast.Caom.Products", "params": {"obsid": ids}}
    products = catalog.invoke(request)
    assert json.loads(catalog.invoke_json(request)) == products  # fast path == dict path
    uris = [p["dataURI"] for p in products["data"]]
    assert len(set(uris)) == len(uris) == products["paging"]["rowsFiltered"]
    assert {catalog.product(u).uri for u in uris} == set(uris)
    assert sorted(uris) == sorted(p.uri for p in catalog.iter_products())
    assert catalog.key_of_obsid(max(r["obsid"] for r in rows) + 1) is None
    assert catalog.key_of_obs_id(rows[0]["obs_id"].replace("-s0001-", "-s0004-")) is None


def test_query_latency_delays_every_query_call(astroquery_mast) -> None:
    sim = astroquery_mast(config())
    sector_obs(1)  # column config now cached: one invoke per query from here on
    sim.set(query_latency=0.3)
    started = time.perf_counter()
    sector_obs(1)
    assert time.perf_counter() - started >= 0.3


def test_product_list_paged_equals_one_page(astroquery_mast, monkeypatch) -> None:
    sim = astroquery_mast(config())
    obs = sector_obs(1)
    whole = Observations.get_product_list(obs)
    monkeypatch.setattr(PortalAPI, "PAGESIZE", 5)  # astroquery's own page size knob
    before = sim.stats()["query_requests"]
    paged = Observations.get_product_list(obs)
    assert sim.stats()["query_requests"] - before == -(-len(whole) // 5)
    assert list(paged["dataURI"]) == list(whole["dataURI"])
    assert list(paged["size"]) == list(whole["size"])
