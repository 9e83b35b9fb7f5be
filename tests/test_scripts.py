"""Smoke tests for the benchmark scripts, so they cannot silently rot.

``scripts/bench_fetch.py --quick`` runs every scenario for real (the simulator in its own
process, every client in its own process, files on disk), only tiny. The assertions are about
what a reader of the benchmark table relies on: each number comes from a run that really
downloaded the files, the correctness column really detects wrong bytes, and the archive
really behaved as the scenario says (the cap produced 503s, latency slowed astroquery down).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))

from _benchlib import Product, check_tree, markdown_table  # noqa: E402

HAVE_ARIA2C = shutil.which("aria2c") is not None
HAVE_ENGINE = importlib.util.find_spec("bulkfetch.fetch") is not None


def _product(uri: str, relpath: str, size: int) -> Product:
    return Product(
        uri=uri,
        url=f"http://127.0.0.1:9/api/v0.1/Download/file?uri={uri}",
        relpath=relpath,
        size=size,
        obs_collection="TESS",
        obs_id=relpath.split("/")[-2],
        filename=relpath.split("/")[-1],
        sector=1,
        kind="LC",
    )


def test_check_tree_counts_wrong_and_missing_files(tmp_path: Path) -> None:
    """The "correct" column must catch a flipped byte and an absent file, not just count files."""
    good, bad = b"SIMPLE  =" + b"\x00" * 100, b"SIMPLE  =" + b"\x00" * 99 + b"\x01"
    products = [
        _product("mast:TESS/product/a.fits", "mastDownload/TESS/obs_a/a.fits", len(good)),
        _product("mast:TESS/product/b.fits", "mastDownload/TESS/obs_b/b.fits", len(good)),
        _product("mast:TESS/product/c.fits", "mastDownload/TESS/obs_c/c.fits", len(good)),
    ]
    truth = {p.uri: hashlib.sha256(good).hexdigest() for p in products}
    for p, body in zip(products[:2], (good, bad), strict=True):
        path = tmp_path / p.relpath
        path.parent.mkdir(parents=True)
        path.write_bytes(body)
    check = check_tree(tmp_path, products, truth)
    assert (check.ok, check.wrong, check.missing) == (1, 1, 1)
    assert check.ok_bytes == len(good)  # only the correct file counts towards a rate


def test_markdown_table_is_well_formed() -> None:
    """The README pastes this verbatim: every row must have the header's column count."""
    text = markdown_table(["tool", "MB/s"], [["aria2c -j16", "40.1"], ["bulkfetch", "77.0"]])
    lines = text.splitlines()
    assert len(lines) == 4
    assert {line.count("|") for line in lines} == {3}
    assert lines[1].replace(" ", "").startswith("|---")
    assert lines[1].rstrip().endswith(":|")  # numeric column right-aligned


@pytest.fixture(scope="module")
def quick_bench(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One ``--quick`` run of every scenario, shared by the assertions below."""
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / "bench_fetch.py"), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    data["stdout"] = proc.stdout
    return data


def _results(data: dict[str, Any], scenario: str, tool: str) -> list[dict[str, Any]]:
    return [r for r in data["results"] if r["scenario"] == scenario and r["tool"] == tool]


def test_quick_bench_prints_every_scenario_table(quick_bench: dict[str, Any]) -> None:
    stdout = quick_bench["stdout"]
    assert quick_bench["markdown"] in stdout
    for scenario in quick_bench["scenarios"]:
        assert f"### {scenario['title']}" in stdout
    assert "Command: `python scripts/bench_fetch.py --quick" in stdout
    names = {s["name"] for s in quick_bench["scenarios"]}
    assert names == {"equal", "cap", "small", "cpu"}


def test_quick_bench_baselines_really_downloaded(quick_bench: dict[str, Any]) -> None:
    """On a healthy archive every baseline gets every file right: proves URLs and paths are
    wired correctly, so their numbers are for real downloads."""
    equal = next(s for s in quick_bench["scenarios"] if s["name"] == "equal")
    tools = ["astroquery", "parfive"] + (["aria2c"] if HAVE_ARIA2C else [])
    for tool in tools:
        (r,) = _results(quick_bench, "equal", tool)
        assert r["ok"] == r["files"] > 0, r
        assert r["requests"] >= r["files"]  # the simulator saw them
        assert r["mb_per_s"] > 0
    (aq,) = _results(quick_bench, "equal", "astroquery")
    assert aq["files"] < equal["files"]  # measured on a subset, as the table says
    # HEAD and GET each wait for the first-byte latency, one file after another.
    assert aq["seconds"] >= 2 * aq["files"] * equal["knobs"]["latency"]
    (small,) = _results(quick_bench, "small", "parfive")
    assert small["ok"] == small["files"] and small["files_per_s"] > 0


@pytest.mark.skipif(not HAVE_ARIA2C, reason="aria2c not installed")
def test_quick_bench_cap_scenario_really_capped(quick_bench: dict[str, Any]) -> None:
    """The cap knob reached the simulator: over-cap clients met 503s, nobody exceeded it."""
    cap = next(s for s in quick_bench["scenarios"] if s["name"] == "cap")
    limit = cap["knobs"]["max_connections"]
    runs = _results(quick_bench, "cap", "aria2c")
    assert len(runs) == 2
    for r in runs:
        assert r["peak_connections"] <= limit
    (over,) = [r for r in runs if "retry" in r["label"]]
    assert over["status_503"] > 0
    assert over["ok"] == over["files"]  # with retries on, aria2c gets there eventually


@pytest.mark.skipif(not HAVE_ENGINE, reason="bulkfetch.fetch not written yet")
def test_quick_bench_bulkfetch_is_always_byte_exact(quick_bench: dict[str, Any]) -> None:
    """bulkfetch must be 100% correct in every scenario, including against the cap."""
    runs = [r for r in quick_bench["results"] if r["tool"] == "bulkfetch"]
    assert {r["scenario"] for r in runs} == {"equal", "cap", "small", "cpu"}
    for r in runs:
        assert r["ok"] == r["files"] > 0, r
        assert r["worker"]["state_done"] == r["files"]  # the job state, read back, agrees
        assert r["cpu"] > 0 and r["seconds"] > 0
    cpu = _results(quick_bench, "cpu", "bulkfetch")[0]
    assert cpu["cpu_per_gb"] is not None and cpu["cpu_per_gb"] > 0


def test_bench_plan_quick_runs_and_agrees_with_astroquery(tmp_path: Path) -> None:
    """``scripts/bench_plan.py --quick``: the planner benchmark still runs, and its speed
    comparison is between two planners that produced the same rows (else it would be moot)."""
    out = tmp_path / "plan.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / "bench_plan.py"), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    scenarios = {s["name"]: s for s in json.loads(out.read_text())["scenarios"]}
    speed = scenarios["speed"]
    assert speed["identical"] is True
    assert speed["rows"] > 0
    assert speed["astroquery"]["seconds"] > 0 and speed["bulkfetch"]["seconds"] > 0
    runs = scenarios["scale"]["runs"]
    assert all(r["rows"] > 0 and r["db_bytes"] > 0 for r in runs)
    by_sectors = sorted(runs, key=lambda r: r["sectors"])
    assert by_sectors[-1]["rows"] > by_sectors[0]["rows"]  # more sectors, more rows planned
    assert "| planner" in proc.stdout
