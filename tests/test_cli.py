"""The command line, run as a user runs it: ``python -m bulkfetch ...`` subprocesses talking HTTP
to a simulated archive (``python -m bulkfetch.testing.mast`` or ``--simulate``)."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from astropy.table import Table

from bulkfetch.api import Job
from bulkfetch.cli import build_parser, main
from bulkfetch.errors import StateError
from bulkfetch.manifest import ASTROQUERY_COLUMNS, NOT_YET_MESSAGE
from bulkfetch.testing.mast import MastSimulator

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
#: A small archive: sector 1 has 4 two-minute targets; light curves are ~46 KB.
SIM_FLAGS = ["--sectors", "2", "--targets", "4", "--scale", "0.01"]


def bulkfetch(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bulkfetch", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ENV,
    )


def start(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "bulkfetch", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )


@contextmanager
def simulator(*flags: str) -> Iterator[str]:
    """``python -m bulkfetch.testing.mast --port 0 FLAGS`` in a subprocess; yields its URL."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "bulkfetch.testing.mast", "--port", "0", *SIM_FLAGS, *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), proc.stderr.read() if proc.stderr else url
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


def sim_get(url: str, path: str) -> dict:
    with urllib.request.urlopen(url + path, timeout=10) as resp:
        return json.load(resp)


def sim_post(url: str, path: str, doc: dict) -> dict:
    req = urllib.request.Request(
        url + path,
        data=json.dumps(doc).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.load(resp)


def truth(url: str, uri: str) -> dict:
    return sim_get(url, "/_sim/truth?uri=" + urllib.request.quote(uri, safe=""))


def sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    """The error output must be one line starting 'bulkfetch: error:' and no traceback."""
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("bulkfetch: error:") or "error:" in ln]
    assert len(errors) == 1, proc.stderr
    return errors[0]


# -- help and usage -----------------------------------------------------------------------------


def test_every_option_of_every_command_explains_its_default() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == {"tess", "plan", "fetch", "status", "verify", "manifest", "columns"}
    flagless = {"help", "version"}
    for name, p in sub.choices.items():
        for action in p._actions:
            if not action.option_strings or action.dest in flagless:
                continue
            help_text = action.help or ""
            assert "default" in help_text, f"{name} {action.option_strings}: {help_text!r}"
    out = bulkfetch("tess", "--help")
    assert out.returncode == 0
    for flag in ("--sectors", "--concurrency", "--max-rate", "--simulate", "--sim-scale"):
        assert flag in out.stdout


USAGE_ERRORS = [
    ["tess", "d", "--sectors", "one"],
    ["tess", "d", "--products", "movies"],
    ["fetch", "d", "--max-rate", "fast"],
    ["fetch", "d", "--concurrency", "0"],
    ["plan", "d", "--batch-size", "5000"],  # more obsids per call than MAST should get
    ["plan", "d", "--sim-scale", "0.1"],  # needs --simulate
    ["plan", "d", "--simulate", "--mast-url", "http://127.0.0.1:9"],
    ["tess", "d", "--from-table", "t.ecsv", "--sectors", "1"],
    ["nosuchcommand"],
    [],
]


@pytest.mark.parametrize("args", USAGE_ERRORS, ids=lambda a: " ".join(a) or "nothing")
def test_usage_errors_exit_2_with_one_line(
    args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [str(tmp_path / a) if a == "d" else a for a in args]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and err.strip()
    assert not (tmp_path / "d").exists()


def test_usage_error_exit_code_of_the_real_process(tmp_path: Path) -> None:
    proc = bulkfetch("tess")  # no DIR
    assert proc.returncode == 2 and "DIR" in proc.stderr and "Traceback" not in proc.stderr


def test_commands_on_an_unplanned_directory_fail_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for command in ("fetch", "status", "verify", "manifest"):
        assert main([command, str(tmp_path / "nothing")]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("bulkfetch: error:")
        assert "run 'bulkfetch plan" in err
        assert not (tmp_path / "nothing").exists()


# -- the main job -------------------------------------------------------------------------------


def test_tess_simulate_completes_and_rerun_downloads_nothing(tmp_path: Path) -> None:
    d = str(tmp_path / "job")
    flags = ["--simulate", "--sim-sectors", "2", "--sim-targets", "4", "--sim-scale", "0.01"]
    first = bulkfetch("tess", d, *flags, "--no-progress")
    assert first.returncode == 0, first.stderr
    assert "SIMULATED" in first.stderr and "NOT real TESS" in first.stderr
    manifest = Table.read(Path(d) / "manifest.ecsv")
    assert tuple(manifest.colnames[:4]) == ASTROQUERY_COLUMNS
    assert len(manifest) > 0 and set(manifest["Status"]) == {"COMPLETE"}
    # bytes equal what the archive serves (the same seeded archive, started here)
    with MastSimulator(n_sectors=2, targets_per_sector=4, scale=0.01, seed=0) as sim:
        for row in manifest:
            assert sha256(row["Local Path"]) == sim.truth(row["dataURI"])["sha256"]
    mtimes = {p: os.stat(p).st_mtime_ns for p in manifest["Local Path"]}

    again = bulkfetch("tess", d, "--simulate", "--no-progress")  # same archive remembered
    assert again.returncode == 0, again.stderr
    assert "0 downloaded" in again.stderr
    assert {p: os.stat(p).st_mtime_ns for p in manifest["Local Path"]} == mtimes

    status = json.loads(bulkfetch("status", d, "--json").stdout)
    assert status["complete"] and status["manifest"]["COMPLETE"] == len(manifest)
    assert status["files"]["done"] == len(manifest) and not status["running"]


def test_errors_exit_1_named_in_manifest_and_status(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = str(tmp_path / "job")
    with simulator("--missing-rate", "0.3") as url:
        proc = bulkfetch(
            "tess", d, "--mast-url", url, "--sectors", "1", "--retries", "1", "--no-progress"
        )
        assert proc.returncode == 1, proc.stderr
        manifest = Table.read(Path(d) / "manifest.csv")
        errors = manifest[manifest["Status"] == "ERROR"]
        assert 0 < len(errors) < len(manifest)
        for row in manifest:
            missing = truth(url, row["dataURI"])["missing"]
            assert (row["Status"] == "ERROR") == missing
            if missing:
                assert "404" in row["Message"] and row["URL"].startswith(url)
            else:
                assert sha256(row["Local Path"]) == truth(url, row["dataURI"])["sha256"]
        assert f"{len(errors)} error" in proc.stdout

        status = json.loads(bulkfetch("status", d, "--json").stdout)
        assert status["files"]["error"] == len(errors)
        assert sum(g["count"] for g in status["error_groups"]) == len(errors)
        assert all("404" in g["message"] for g in status["error_groups"])
        assert main(["status", d]) == 0
        text = capsys.readouterr().out
        assert "errors by message" in text and "404" in text

        # --skip-errors leaves them alone: no download request at all, still exit 1
        requests_before = sim_get(url, "/_sim/stats")["requests"]
        proc = bulkfetch("fetch", d, "--skip-errors", "--no-progress")
        assert proc.returncode == 1
        assert sim_get(url, "/_sim/stats")["requests"] == requests_before

        out = tmp_path / "copy.ecsv"
        assert main(["manifest", d, "-o", str(out)]) == 0
        assert str(out) in capsys.readouterr().out
        copy = Table.read(out)
        assert list(copy["dataURI"]) == list(manifest["dataURI"])
        assert list(copy["Status"]) == list(manifest["Status"])


def _wait_running(d: str, proc: subprocess.Popen[str]) -> None:
    """Poll the job state until the fetch runs, has published its concurrency and finished a
    file (read-only, in this process: the fetch owns the directory)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            with Job(d, create=False) as job:
                st = job.status()
        except StateError:  # not planned yet
            st = None
        if st is not None and st.running and st.concurrency and st.done_files >= 1:
            return
        time.sleep(0.1)
    raise AssertionError("the fetch never got going")


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_writes_manifest_and_rerun_resumes(
    sig: signal.Signals, code: int, tmp_path: Path
) -> None:
    d = str(tmp_path / "job")
    # 12 light curves of ~19 KB at 12 KB/s per connection, 2 at a time: ~10 s if not stopped
    with simulator("--targets", "12", "--conn-bandwidth", "12000") as url:
        proc = start("tess", d, "--mast-url", url, "--sectors", "1", "--concurrency", "2")
        _wait_running(d, proc)
        if sig == signal.SIGINT:  # the CLI's view of a running job
            seen = json.loads(bulkfetch("status", d, "--json").stdout)
            assert seen["running"] and seen["runner_pid"] == proc.pid
            assert 1 <= seen["concurrency"] <= 2
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == code, err
        assert "Traceback" not in err and "rerun" in err.lower()

        manifest = Table.read(Path(d) / "manifest.ecsv")
        complete = manifest[manifest["Status"] == "COMPLETE"]
        skipped = manifest[manifest["Status"] == "SKIPPED"]
        assert len(complete) >= 1 and len(skipped) >= 1
        assert len(complete) + len(skipped) == len(manifest)
        assert all(m.startswith(NOT_YET_MESSAGE) for m in skipped["Message"])
        for row in complete:
            assert sha256(row["Local Path"]) == truth(url, row["dataURI"])["sha256"]
        if sig == signal.SIGINT:
            return  # resuming is the same after either signal; prove it once
        before = sim_get(url, "/_sim/stats")["per_uri"]

        sim_post(url, "/_sim/config", {"conn_bandwidth": None})  # full speed for the rerun
        again = bulkfetch("tess", d, "--mast-url", url, "--sectors", "1", "--no-progress")
        assert again.returncode == 0, again.stderr
        after = sim_get(url, "/_sim/stats")["per_uri"]
        for row in complete:  # finished files were not fetched again
            uri = row["dataURI"]
            assert after[uri]["gets"] == before[uri]["gets"]
        final = Table.read(Path(d) / "manifest.ecsv")
        assert set(final["Status"]) == {"COMPLETE"} and len(final) == len(manifest)
        for row in final:
            assert sha256(row["Local Path"]) == truth(url, row["dataURI"])["sha256"]


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_plan_exits_at_once_and_rerun_completes(
    sig: signal.Signals, code: int, tmp_path: Path
) -> None:
    """Ctrl-C while queries are in flight: out in seconds, not after the archive answers."""
    d = str(tmp_path / "job")
    latency = 30.0
    with simulator("--query-latency", str(latency)) as url:
        proc = start("plan", d, "--mast-url", url, "--sectors", "1,2")
        deadline = time.monotonic() + 20
        while sim_get(url, "/_sim/stats")["query_requests"] < 2:  # both column configs asked
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr
            time.sleep(0.1)
        time.sleep(0.5)
        sent = time.monotonic()
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=latency)
        waited = time.monotonic() - sent
        assert proc.returncode == code, err
        assert waited < latency / 3, f"exit took {waited:.1f}s: it waited for the queries"
        assert "Traceback" not in err and "rerun" in err.lower()

        sim_post(url, "/_sim/config", {"query_latency": 0})
        again = bulkfetch("plan", d, "--mast-url", url, "--sectors", "1,2")
        assert again.returncode == 0, again.stderr
        status = json.loads(bulkfetch("status", d, "--json").stdout)
        assert status["total_files"] > 0


def test_plan_remembers_discovered_sectors_unless_rediscover(tmp_path: Path) -> None:
    d = str(tmp_path / "job")
    with simulator() as url:

        def queries() -> int:
            return sim_get(url, "/_sim/stats")["query_requests"]

        assert bulkfetch("plan", d, "--mast-url", url).returncode == 0
        before = queries()
        again = bulkfetch("plan", d, "--mast-url", url)
        assert again.returncode == 0 and queries() == before  # sectors known, all planned
        fresh = bulkfetch("plan", d, "--mast-url", url, "--rediscover")
        assert fresh.returncode == 0, fresh.stderr
        assert queries() > before  # the archive was asked which sectors exist
        assert "new in the job: 0 file(s)" in fresh.stdout


def test_verify_finds_damage_and_fetch_repairs_it(tmp_path: Path) -> None:
    d = str(tmp_path / "job")
    with simulator() as url:
        proc = bulkfetch("tess", d, "--mast-url", url, "--sectors", "1", "--no-progress")
        assert proc.returncode == 0, proc.stderr
        manifest = Table.read(Path(d) / "manifest.ecsv")
        victim, gone = manifest[0], manifest[1]
        data = bytearray(Path(victim["Local Path"]).read_bytes())
        data[-100] ^= 0xFF  # one flipped byte, same size
        Path(victim["Local Path"]).write_bytes(bytes(data))
        os.unlink(gone["Local Path"])

        proc = bulkfetch("verify", d)
        assert proc.returncode == 1
        assert "2 damaged" in proc.stdout
        assert victim["dataURI"] in proc.stdout and gone["dataURI"] in proc.stdout
        with Job(d, create=False) as job:
            assert job.status().files["pending"] == 2

        stats0 = sim_get(url, "/_sim/stats")
        proc = bulkfetch("fetch", d, "--no-progress")
        assert proc.returncode == 0, proc.stderr
        stats1 = sim_get(url, "/_sim/stats")
        assert stats1["requests"] - stats0["requests"] == 2  # only the two bad files
        for row in (victim, gone):
            uri = row["dataURI"]
            assert stats1["per_uri"][uri]["gets"] == stats0["per_uri"][uri]["gets"] + 1
            assert sha256(row["Local Path"]) == truth(url, uri)["sha256"]
        with Job(d, create=False) as job:
            assert job.verify().ok and job.status().complete


def test_plan_dry_run_export_and_from_table(tmp_path: Path) -> None:
    d = str(tmp_path / "job")
    with simulator() as url:
        dry = bulkfetch(
            "plan", str(tmp_path / "dry"), "--mast-url", url, "--sectors", "1", "--dry-run"
        )
        assert dry.returncode == 0 and "Dry run" in dry.stdout
        assert not (tmp_path / "dry").exists()
        export = tmp_path / "plan.ecsv"
        proc = bulkfetch(
            "plan", d, "--mast-url", url, "--sectors", "1", "--export", str(export), "-q"
        )
        assert proc.returncode == 0, proc.stderr
        planned = Table.read(export)
        assert len(planned) > 0
        # the exported table plans an identical job elsewhere, without a query
        other = str(tmp_path / "other")
        before = sim_get(url, "/_sim/stats")["query_requests"]
        proc = bulkfetch(
            "tess", other, "--mast-url", url, "--from-table", str(export), "--no-progress"
        )
        assert proc.returncode == 0, proc.stderr
        assert sim_get(url, "/_sim/stats")["query_requests"] == before
        manifest = Table.read(Path(other) / "manifest.ecsv")
        assert sorted(manifest["dataURI"]) == sorted(planned["dataURI"])
        assert set(manifest["Status"]) == {"COMPLETE"}


def test_columns_lists_observation_and_product_columns() -> None:
    proc = bulkfetch("columns", "--simulate")
    assert proc.returncode == 0, proc.stderr
    assert "sequence_number" in proc.stdout and "productSubGroupDescription" in proc.stdout
    assert "SIMULATED" in proc.stderr


def test_simulate_refuses_a_directory_of_a_real_job(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from bulkfetch.store import PlannedProduct, open_store

    uri = "mast:TESS/product/x_lc.fits"
    with open_store(tmp_path) as store:
        store.add_products(
            [
                PlannedProduct(
                    uri=uri,
                    url="https://mast.stsci.edu/api/v0.1/Download/file?uri=" + uri,
                    local_path="mastDownload/TESS/x/x_lc.fits",
                    size=2880,
                    obs_collection="TESS",
                    obs_id="x",
                    product_filename="x_lc.fits",
                )
            ]
        )
    assert main(["fetch", str(tmp_path), "--simulate", "--no-progress"]) == 2
    assert "real archive" in capsys.readouterr().err
