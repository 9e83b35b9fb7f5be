"""Bad input: each gives one clear error line, a non-zero exit, an intact job state, and a clean
resume once its cause is fixed.

Bad tables, bad options, a read-only or full disk, an unreachable archive and an archive whose
sizes disagree with the product table. The CLI runs in-process (``main()``) where only the exit
code and the message matter - an import of astropy per case would cost seconds - and as a real
``python -m bulkfetch`` process where the process itself is the point. Disks are real: a
read-only bind mount and a 1 MB tmpfs (skipped with the reason where mounting is not allowed).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from astropy.table import Table, vstack

from bulkfetch.cli import main
from bulkfetch.testing.catalog import Catalog, ProductInfo
from bulkfetch.testing.fixtures import default_config
from bulkfetch.testing.mast import MastSimulator

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
IS_ROOT = os.geteuid() == 0


# -- helpers -------------------------------------------------------------------------------------


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``bulkfetch ARGV`` in this process: (exit code, stdout, stderr)."""
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's usage errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def error_line(err: str) -> str:
    """The single error line of a failed command (no traceback, exactly one)."""
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("bulkfetch") and "error:" in ln]
    assert len(lines) == 1, err
    return lines[0]


def state(directory: Path) -> list[tuple[Any, ...]]:
    """The job state's rows, after SQLite's own integrity check passed."""
    db = directory / ".bulkfetch" / "state.sqlite"
    if not db.exists():
        return []
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        return conn.execute(
            "SELECT uri, local_path, size, status, sha256 FROM products ORDER BY uri"
        ).fetchall()
    finally:
        conn.close()


def final_files(directory: Path) -> list[Path]:
    """Files under DIR/mastDownload (products, and anything left half-done)."""
    base = directory / "mastDownload"
    return sorted(p for p in base.rglob("*") if p.is_file()) if base.exists() else []


def assert_complete(directory: Path, sim: MastSimulator) -> None:
    """Every manifest row COMPLETE, byte-exact, and nothing else under mastDownload."""
    manifest = Table.read(directory / "manifest.ecsv")
    assert len(manifest) and set(manifest["Status"]) == {"COMPLETE"}
    for row in manifest:
        data = Path(row["Local Path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == sim.truth(row["dataURI"])["sha256"]
    assert [p.resolve() for p in final_files(directory)] == sorted(
        Path(p).resolve() for p in manifest["Local Path"]
    )


def product_table(products: list[ProductInfo]) -> Table:
    """A product table as astroquery's get_product_list gives it (the columns bulkfetch uses)."""
    return Table(
        {
            "obs_collection": ["TESS"] * len(products),
            "obs_id": [p.filename.rsplit("_", 1)[0] for p in products],
            "dataURI": [p.uri for p in products],
            "productFilename": [p.filename for p in products],
            "size": [p.size for p in products],
            "productSubGroupDescription": [p.kind for p in products],
        }
    )


def light_curves(config: Any, n: int) -> list[ProductInfo]:
    return [p for p in Catalog(config).iter_products(1) if p.kind == "LC"][:n]


@pytest.fixture(scope="module")
def sim() -> Iterator[MastSimulator]:
    """One simulated archive for the table and option cases (they never change its knobs)."""
    with MastSimulator(default_config(targets_per_sector=4)) as server:
        yield server


@pytest.fixture
def good_table(sim: MastSimulator, tmp_path: Path) -> Path:
    path = tmp_path / "good.ecsv"
    product_table(light_curves(sim.config, 4)).write(path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True, text=True)


@contextmanager
def mounted(target: Path, *args: str) -> Iterator[None]:
    """``mount ARGS TARGET`` for the block (skip the test where mounting is not allowed)."""
    target.mkdir(parents=True, exist_ok=True)
    try:
        _mount(*args, str(target))
    except (subprocess.CalledProcessError, FileNotFoundError) as exc:
        pytest.skip(f"cannot mount here: {getattr(exc, 'stderr', exc)}")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False, capture_output=True)


# -- bad tables ----------------------------------------------------------------------------------


def _no_rows(t: Table) -> Table:
    return t[:0]


def _drop(column: str) -> Any:
    def edit(t: Table) -> Table:
        t.remove_column(column)
        return t

    return edit


def _set(column: str, row: int, value: str) -> Any:
    def edit(t: Table) -> Table:
        t[column] = t[column].astype(object)
        t[column][row] = value
        return t

    return edit


def _clash(t: Table) -> Table:
    """Row 4 claims row 3's obs_id and file name: two products, one file on disk."""
    for column in ("obs_id", "productFilename"):
        t[column] = t[column].astype(object)
        t[column][3] = t[column][2]
    return t


BAD_TABLES = {
    "empty table": (_no_rows, "has no rows"),
    "no dataURI": (_drop("dataURI"), "lacks the column(s) dataURI"),
    "no size": (_drop("size"), "lacks the column size"),
    "URI not MAST's": (_set("dataURI", 1, "https://evil.example/x_lc.fits"), "not a MAST data"),
    "obs_id with ../": (_set("obs_id", 0, "../../etc"), "refusing obs_id '../../etc'"),
    "absolute file name": (_set("productFilename", 2, "/etc/x_lc.fits"), "refusing productFile"),
    "two rows on one file": (_clash, "would be saved as"),
}


@pytest.mark.parametrize("case", list(BAD_TABLES))
def test_bad_table_is_refused_whole_and_a_fixed_one_resumes(
    case: str,
    sim: MastSimulator,
    good_table: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    edit, expected = BAD_TABLES[case]
    bad = tmp_path / "bad.ecsv"
    edit(Table.read(good_table)).write(bad)
    d = tmp_path / "job"
    # a job that already holds one finished product: its state must come through untouched
    first = Table.read(good_table)[:1]
    first.write(tmp_path / "first.ecsv")
    code, _, err = run(["tess", str(d), "--mast-url", sim.url, "--from-table",
                        str(tmp_path / "first.ecsv"), "-q"], capsys)  # fmt: skip
    assert code == 0, err
    before = state(d)
    assert [row[3] for row in before] == ["done"]

    code, out, err = run(["tess", str(d), "--mast-url", sim.url, "--from-table", str(bad)], capsys)
    assert code == 2
    assert expected in error_line(err)
    assert state(d) == before  # nothing planned, nothing changed
    assert len(final_files(d)) == 1

    code, _, err = run(
        ["tess", str(d), "--mast-url", sim.url, "--from-table", str(good_table), "-q"], capsys
    )
    assert code == 0, err
    assert_complete(d, sim)


def test_bad_table_error_in_a_real_process(good_table: Path, tmp_path: Path) -> None:
    """The same refusal from ``python -m bulkfetch``: exit status 2, one line, no DIR made."""
    bad = tmp_path / "bad.csv"
    _drop("size")(Table.read(good_table)).write(bad)
    proc = subprocess.run(
        [sys.executable, "-m", "bulkfetch", "tess", str(tmp_path / "job"), "--from-table",
         str(bad)],
        capture_output=True, text=True, timeout=120, env=ENV,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "lacks the column size" in error_line(proc.stderr)
    assert not (tmp_path / "job").exists()


def test_duplicate_rows_are_downloaded_once(
    sim: MastSimulator, good_table: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Rows repeating a dataURI are not an error: astroquery's own product lists repeat
    products shared by observations, and astroquery drops them too. Each file is fetched once."""
    table = Table.read(good_table)
    dups = tmp_path / "dups.ecsv"
    vstack([table, table[::-1], table[:1]]).write(dups)
    before = sim.stats()["per_uri"]
    d = tmp_path / "job"
    code, _, err = run(["tess", str(d), "--mast-url", sim.url, "--from-table", str(dups)], capsys)
    assert code == 0, err
    after = sim.stats()["per_uri"]
    for uri in table["dataURI"]:
        assert after[uri]["gets"] - before.get(uri, {}).get("gets", 0) == 1
    manifest = Table.read(d / "manifest.ecsv")
    assert sorted(manifest["dataURI"]) == sorted(table["dataURI"])
    assert_complete(d, sim)


# -- bad options ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--concurrency", "0"], "must be at least 1"),
        (["--concurrency=-4"], "must be at least 1"),
        (["--concurrency", "lots"], "expected a whole number"),
        (["--retries=-1"], "must be 0 or more"),
    ],
)
def test_bad_option_exits_2_and_leaves_the_job_alone(
    args: list[str],
    expected: str,
    sim: MastSimulator,
    good_table: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    d = tmp_path / "job"
    code, _, err = run(["plan", str(d), "--mast-url", sim.url, "--from-table", str(good_table),
                        "-q"], capsys)  # fmt: skip
    assert code == 0, err
    before = state(d)
    code, _, err = run(["fetch", str(d), *args], capsys)
    assert code == 2
    assert expected in error_line(err)
    assert state(d) == before and final_files(d) == []
    code, _, err = run(["fetch", str(d), "--concurrency", "2", "--no-progress"], capsys)
    assert code == 0, err
    assert_complete(d, sim)


# -- the archive ---------------------------------------------------------------------------------


def test_unreachable_archive_when_planning_then_resume(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()
    d = tmp_path / "job"
    argv = ["tess", str(d), "--mast-url", f"http://127.0.0.1:{port}", "--sectors", "1",
            "--query-retries", "0", "--no-progress"]  # fmt: skip
    code, _, err = run(argv, capsys)
    assert code == 1
    line = error_line(err)
    assert f"127.0.0.1:{port}" in line or "connect" in line.lower(), line
    assert [r[3] for r in state(d)] == []
    with MastSimulator(default_config(targets_per_sector=3), port=port) as sim:
        code, _, err = run(argv, capsys)
        assert code == 0, err
        assert_complete(d, sim)


def test_archive_gone_during_fetch_then_resume(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()
    d = tmp_path / "job"
    config = default_config(targets_per_sector=3)
    with MastSimulator(config, port=port) as sim:
        code, _, err = run(["plan", str(d), "--mast-url", sim.url, "--sectors", "1", "-q"], capsys)
        assert code == 0, err
    code, out, err = run(["fetch", str(d), "--retries", "1", "--no-progress"], capsys)
    assert code == 1
    assert "0 complete, 3 error" in out
    assert "3 x connection failed" in err  # the reason, grouped, on one line
    assert [r[3] for r in state(d)] == ["error"] * 3 and final_files(d) == []
    with MastSimulator(config, port=port) as sim:
        code, _, err = run(["fetch", str(d), "--no-progress"], capsys)
        assert code == 0, err
        assert_complete(d, sim)


class SizeLies(Catalog):
    """The simulated catalog, except that the download server's idea of each product's size
    can be made to disagree with the product table (``lie`` bytes more or fewer)."""

    lie = 0

    def product(self, uri: str) -> ProductInfo | None:
        info = super().product(uri)
        if info is None or not self.lie:
            return info
        return dataclasses.replace(info, size=info.size + self.lie)


@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        ("content_length", "server announces"),  # Content-Length says more than the table
        ("short_body", "server announces"),  # the archive's file is shorter than the table's
        ("truncated", "connection lost mid-body"),  # the body stops before its Content-Length
    ],
)
def test_archive_sizes_disagree_with_the_table_then_resume(
    fault: str, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = default_config(targets_per_sector=3)
    catalog = SizeLies(config)
    with MastSimulator(config, catalog=catalog) as sim:
        table = tmp_path / "t.ecsv"
        product_table(light_curves(config, 3)).write(table)
        d = tmp_path / "job"
        if fault == "truncated":
            sim.set(truncate_rate=1.0)
        else:
            catalog.lie = 2880 if fault == "content_length" else -2880
        code, out, err = run(["tess", str(d), "--mast-url", sim.url, "--from-table", str(table),
                              "--retries", "1", "--no-progress"], capsys)  # fmt: skip
        assert code == 1
        assert "0 complete, 3 error" in out
        # errors grouped by message, one line per group: "  N x <why>"
        groups = [ln.split(" x ", 1) for ln in err.splitlines() if ln.startswith("  ")]
        assert sum(int(n) for n, _ in groups) == 3, err
        assert all(expected in why for _, why in groups), err
        manifest = Table.read(d / "manifest.ecsv")
        assert set(manifest["Status"]) == {"ERROR"}
        assert all(expected in m for m in manifest["Message"])
        assert final_files(d) == []  # no bad file under a final name, no .part
        assert [r[3] for r in state(d)] == ["error"] * 3

        catalog.lie = 0  # the archive is fixed
        sim.set(truncate_rate=0.0)
        code, _, err = run(["fetch", str(d), "--no-progress"], capsys)
        assert code == 0, err
        assert_complete(d, sim)


# -- the local disk ------------------------------------------------------------------------------


def test_read_only_directory_then_resume(
    sim: MastSimulator, good_table: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = tmp_path / "job"
    code, _, err = run(["plan", str(d), "--mast-url", sim.url, "--from-table", str(good_table),
                        "-q"], capsys)  # fmt: skip
    assert code == 0, err
    before = state(d)
    target = d / "mastDownload"
    target.mkdir()
    if IS_ROOT:  # root writes through permission bits: make it really read-only
        ctx = mounted(target, "--bind", str(target))
    else:
        ctx = _chmod(target, 0o555)
    with ctx:
        if IS_ROOT:
            _mount("-o", "remount,ro,bind", str(target))
        code, out, err = run(["fetch", str(d), "--no-progress"], capsys)
        assert code == 1
        line = error_line(err)
        assert "Read-only file system" in line or "Permission denied" in line, line
        assert str(target) in line  # names where it could not write
        assert state(d) == before  # every row still pending, nothing marked failed
        assert final_files(d) == []
    code, _, err = run(["fetch", str(d), "--no-progress"], capsys)
    assert code == 0, err
    assert_complete(d, sim)


@pytest.mark.skipif(not IS_ROOT, reason="needs root to mount a read-only filesystem")
def test_read_only_filesystem_from_the_start(
    sim: MastSimulator, good_table: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """DIR on a read-only filesystem: one line naming the problem, exit 1, nothing created."""
    disk = tmp_path / "ro"
    with mounted(disk, "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs"):
        argv = ["tess", str(disk / "job"), "--mast-url", sim.url, "--from-table",
                str(good_table), "--no-progress"]  # fmt: skip
        code, _, err = run(argv, capsys)
        assert code == 1
        assert "Read-only file system" in error_line(err)
        assert list(disk.iterdir()) == []
        _mount("-o", "remount,rw", str(disk))
        code, _, err = run(argv, capsys)
        assert code == 0, err
        assert_complete(disk / "job", sim)


@contextmanager
def _chmod(path: Path, mode: int) -> Iterator[None]:
    old = path.stat().st_mode
    path.chmod(mode)
    try:
        yield
    finally:
        path.chmod(old)


@pytest.mark.skipif(not IS_ROOT, reason="needs root to mount a small tmpfs")
def test_disk_full_mid_job_then_resume(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A 1 MB filesystem for a 1.6 MB job: the run stops with one clear line, the state stays
    sound, no bad file sits under a final name, and after the disk grows the job completes."""
    disk = tmp_path / "disk"
    with (
        MastSimulator(default_config(targets_per_sector=8, scale=0.1)) as sim,
        mounted(disk, "-t", "tmpfs", "-o", "size=1m", "tmpfs"),
    ):
        d = disk / "job"
        argv = ["tess", str(d), "--mast-url", sim.url, "--sectors", "1", "--no-progress"]
        code, out, err = run(argv, capsys)
        assert code == 1
        line = error_line(err)
        assert "No space left on device" in line and str(d) in line, line
        rows = state(d)
        assert len(rows) == 8 and {r[3] for r in rows} <= {"pending", "done"}
        for path in final_files(d):  # only verified files carry final names
            if path.suffix == ".fits":
                uri = next(r[0] for r in rows if d / r[1] == path)
                assert hashlib.sha256(path.read_bytes()).hexdigest() == sim.truth(uri)["sha256"]
        _mount("-o", "remount,size=16m", str(disk))
        code, _, err = run(argv, capsys)
        assert code == 0, err
        assert_complete(d, sim)
