"""Fetch benchmark: bulkfetch against astroquery, parfive and aria2c on the simulated archive.

Issue 4 sets performance targets for the engine; this script measures them, all tools in ONE
run against the same simulator process and the same URLs, and reports ratios (absolute numbers
depend on the machine, ratios much less). Scenarios:

``equal``  300 ms first byte, 4 MB/s per connection, 80 MB/s total, ~2 MB light curves, every
           tool at concurrency 16 (astroquery is sequential by design: measured on a subset).
``cap``    the same archive refusing more than 48 concurrent downloads (503 + Retry-After):
           bulkfetch at 96 with adaptive concurrency vs aria2c at 16 and at 96 with retries.
``small``  ~3,000 files of ~30 KB, no latency or throttle: per-file overhead in files/s.
``cpu``    no throttle, ~2 MB files: client CPU seconds per GB (sha256 + FITS checks on).

Every client runs as its own subprocess (so its CPU is its own, see ``_benchlib``), downloads
into a fresh directory, and afterwards every file is checked against the simulator's SHA-256.

Run ``python scripts/bench_fetch.py`` (all scenarios, ~4 minutes on 2 cores; ``--repeat 3``
reports each tool's median run, worth it on a busy machine) or ``--scenario small --tools
bulkfetch,minimal`` while tuning the engine; ``--quick`` is the tiny mode the smoke test in
``tests/test_scripts.py`` uses. ``--json OUT`` keeps every measurement, including the engine's
own result (final and lowest adaptive limit, retries) and the simulator's counters.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import itertools
import json
import logging
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _benchlib import (  # noqa: E402  (the line above makes the sibling module importable)
    GB,
    MB,
    ActiveSampler,
    ClientRun,
    PhaseMeter,
    Product,
    SimProcess,
    check_tree,
    emit_report,
    fmt,
    markdown_table,
    ratio,
    run_client,
    select_lc_products,
    status_count,
)

log = logging.getLogger("bulkfetch.bench")

SCENARIOS = ("equal", "cap", "small", "cpu")
TOOLS = ("astroquery", "parfive", "aria2c", "bulkfetch", "minimal")


# -- parameters ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Catalog:
    """The catalog-shaping simulator knobs: scenarios sharing them share one simulator process
    (and its warm body cache, so no tool pays for generating bodies the previous one did not)."""

    scale: float
    targets_per_sector: int
    n_sectors: int = 4
    seed: int = 1


@dataclass(frozen=True)
class Scenario:
    """One benchmark situation: an archive's behaviour and which clients face it."""

    name: str
    title: str
    catalog: Catalog
    files: int
    knobs: dict[str, Any]  # run-time simulator knobs (latency, bandwidth, cap)
    runs: tuple[ToolRun, ...]
    #: Poll the simulator for in-flight downloads during runs. Only where it explains the
    #: numbers (throttled scenarios): the polling costs the server CPU that the per-file
    #: overhead and CPU scenarios must not lose.
    sample: bool = False


@dataclass(frozen=True)
class ToolRun:
    """One client configuration within a scenario."""

    tool: str  # one of TOOLS ("minimal" is the bare-aiohttp yardstick)
    label: str
    options: dict[str, Any] = field(default_factory=dict)
    files: int | None = None  # a subset (astroquery); None = all of the scenario's files
    #: Left out of ``--quick``: a configuration whose code path another quick run covers.
    full_only: bool = False


def build_scenarios(args: argparse.Namespace) -> list[Scenario]:
    """The scenarios with full-size or ``--quick`` parameters.

    Full size follows the issue text. ``--quick`` keeps every moving part (latency, throttles,
    the cap, adaptive and fixed concurrency) but shrinks files, counts and concurrency so the
    whole run takes seconds; its numbers mean nothing beyond "the script still works".
    """
    quick = args.quick
    files = args.files or (8 if quick else 300)
    small_files = args.small_files or (40 if quick else 3000)
    conc = 4 if quick else 16
    cap = 3 if quick else 48
    over = 8 if quick else 96
    aq_files = min(files, 3 if quick else 20)
    big = Catalog(scale=0.02 if quick else 1.0, targets_per_sector=math.ceil(files / 4) + 1)
    tiny = Catalog(scale=0.015, targets_per_sector=math.ceil(small_files / 4) + 1)
    if quick:
        # One simulator for everything: its start-up and the product query dominate a tiny run.
        big = tiny = Catalog(scale=0.01, targets_per_sector=math.ceil(max(files, small_files) / 4))
    # Every scenario sets every run-time knob, so none leaks from the previous scenario.
    open_archive = {
        "latency": 0.0,
        "conn_bandwidth": None,
        "total_bandwidth": None,
        "max_connections": None,
        # MAST-like whole seconds; quick mode waits less (aria2c's --retry-wait stays 1 s).
        "retry_after": 0.25 if quick else 1.0,
    }
    throttle = {
        **open_archive,
        "latency": 0.05 if quick else 0.3,
        "conn_bandwidth": (1 if quick else 4) * MB,
        "total_bandwidth": (4 if quick else 80) * MB,
    }
    return [
        Scenario(
            name="equal",
            title=f"Equal concurrency ({conc})",
            catalog=big,
            files=files,
            knobs=throttle,
            runs=(
                ToolRun("astroquery", "astroquery download_products", files=aq_files),
                ToolRun("parfive", f"parfive max_conn={conc}", {"max_conn": conc}),
                ToolRun("aria2c", f"aria2c -j{conc}", {"jobs": conc}),
                ToolRun(
                    "bulkfetch",
                    f"bulkfetch --concurrency {conc}",
                    {"concurrency": conc, "verify": "fits"},
                ),
            ),
            sample=True,
        ),
        Scenario(
            name="cap",
            title=f"Server cap ({cap} connections, 503 + Retry-After beyond)",
            catalog=big,
            files=files,
            knobs={**throttle, "max_connections": cap},
            runs=(
                ToolRun(
                    "bulkfetch",
                    f"bulkfetch --concurrency {over} (adaptive)",
                    {"concurrency": over, "adaptive": True, "verify": "fits"},
                ),
                ToolRun(
                    "bulkfetch",
                    f"bulkfetch --concurrency {over}, adaptive off",
                    {"concurrency": over, "adaptive": False, "verify": "fits"},
                ),
                ToolRun("aria2c", f"aria2c -j{conc}", {"jobs": conc}),
                ToolRun(
                    "aria2c",
                    f"aria2c -j{over} --retry-wait=1 --max-tries=0",
                    {"jobs": over, "retry": True},
                ),
            ),
            sample=True,
        ),
        Scenario(
            name="small",
            title="Per-file overhead (small files, no latency or throttle)",
            catalog=tiny,
            files=small_files,
            knobs=open_archive,
            runs=(
                ToolRun("parfive", f"parfive max_conn={conc}", {"max_conn": conc}),
                ToolRun("aria2c", f"aria2c -j{conc}", {"jobs": conc}),
                ToolRun(
                    "bulkfetch",
                    f"bulkfetch --concurrency {conc} --verify sha256",
                    {"concurrency": conc, "verify": "sha256"},
                ),
                ToolRun(
                    "bulkfetch",
                    f"bulkfetch --concurrency {conc} --verify fits",
                    {"concurrency": conc, "verify": "fits"},
                    full_only=True,
                ),
                ToolRun(
                    "minimal",
                    f"yardstick: bare aiohttp loop, {conc} tasks, no state or checks",
                    {"concurrency": conc},
                ),
            ),
        ),
        Scenario(
            name="cpu",
            title="CPU per GB (no throttle)",
            catalog=big,
            files=files,
            knobs=open_archive,
            runs=(
                ToolRun("aria2c", f"aria2c -j{conc}", {"jobs": conc}),
                ToolRun(
                    "bulkfetch",
                    f"bulkfetch --concurrency {conc} --verify fits",
                    {"concurrency": conc, "verify": "fits"},
                ),
                # What the FITS checksums cost on top of SHA-256, for the record.
                ToolRun(
                    "bulkfetch",
                    f"bulkfetch --concurrency {conc} --verify sha256",
                    {"concurrency": conc, "verify": "sha256"},
                    full_only=True,
                ),
                ToolRun(
                    "minimal",
                    f"yardstick: bare aiohttp loop, {conc} tasks, no state or checks",
                    {"concurrency": conc},
                    full_only=True,
                ),
            ),
        ),
    ]


# -- one tool run -------------------------------------------------------------------------------


@dataclass
class ToolResult:
    """What one client achieved in one scenario, as measured and as checked."""

    scenario: str
    tool: str
    label: str
    files: int  # files asked for
    bytes: int  # their expected total size
    ok: int  # files present with the simulator's SHA-256
    wrong: int
    missing: int
    ok_bytes: int
    seconds: float  # download phase (whole process for aria2c)
    cpu: float  # CPU seconds of that phase
    process_seconds: float
    process_cpu: float
    returncode: int
    peak_connections: int | None
    requests: int | None
    status_503: int
    status_429: int
    bytes_served: int | None
    mean_active: float | None = None  # in-flight downloads, time average while transferring
    server_cpu: float | None = None  # simulator CPU seconds during the client's whole run
    worker: dict[str, Any] | None = None
    note: str = ""
    #: Download-phase seconds of every repeat (this result is the median one).
    all_seconds: list[float] = field(default_factory=list)
    #: End of the client's stderr when it failed (the logs are deleted without ``--keep``).
    stderr_tail: str = ""

    @property
    def mb_per_s(self) -> float | None:
        """Throughput of CORRECT bytes: wrong or missing files earn nothing."""
        return self.ok_bytes / MB / self.seconds if self.seconds > 0 else None

    @property
    def files_per_s(self) -> float | None:
        return self.ok / self.seconds if self.seconds > 0 else None

    @property
    def cpu_per_gb(self) -> float | None:
        return self.cpu / (self.ok_bytes / GB) if self.ok_bytes else None

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.update(
            mb_per_s=self.mb_per_s, files_per_s=self.files_per_s, cpu_per_gb=self.cpu_per_gb
        )
        return data


def aria2c_command(root: Path, input_file: Path, jobs: int, retry: bool) -> list[str]:
    """aria2c with one connection per file (``-x1 -s1``) and ``jobs`` files at a time.

    By default aria2c does not retry a 503 at all (``--retry-wait`` 0 disables it); the retrying
    variant is the fair "make it cope with the cap" configuration a user would try.
    """
    cmd = [
        shutil.which("aria2c") or "aria2c",
        f"--input-file={input_file}",
        f"--dir={root}",
        f"--max-concurrent-downloads={jobs}",
        "--max-connection-per-server=1",
        "--split=1",
        "--file-allocation=none",
        "--auto-file-renaming=false",
        "--allow-overwrite=true",
        "--console-log-level=warn",
        "--summary-interval=0",
        "--show-console-readout=false",
        "--download-result=hide",
    ]
    if retry:
        cmd += ["--max-tries=0", "--retry-wait=1"]
    return cmd


def write_aria2c_input(path: Path, products: Sequence[Product]) -> None:
    """aria2c's input file: each URL, then ``out=`` with the astroquery-layout path."""
    with open(path, "w") as fh:
        for p in products:
            fh.write(f"{p.url}\n  out={p.relpath}\n")


#: Numbers the run directories, so repeats of one tool never share a directory.
_RUN_NUMBERS = itertools.count()


def worker_command(spec_path: Path, tool: str) -> list[str]:
    """This script, re-run as a worker that downloads with ``tool`` and reports measurements."""
    return [sys.executable, str(Path(__file__).resolve()), "--worker", tool, str(spec_path)]


def run_tool(
    scenario: Scenario,
    run: ToolRun,
    sim: SimProcess,
    products: Sequence[Product],
    truth: dict[str, str],
    workdir: Path,
    keep: bool,
    timeout: float,
) -> ToolResult:
    """Download ``products`` with one client into a fresh directory, then measure and check."""
    slug = f"{scenario.name}-{next(_RUN_NUMBERS)}-{run.tool}"
    root = workdir / slug
    root.mkdir(parents=True)
    logs = workdir / "logs"
    spec_path = workdir / f"{slug}.json"
    if run.tool == "aria2c":
        input_file = workdir / f"{slug}.aria2c.txt"
        write_aria2c_input(input_file, products)
        command = aria2c_command(
            root, input_file, int(run.options["jobs"]), bool(run.options.get("retry"))
        )
    else:
        spec = {
            "server": sim.url,
            "root": str(root),
            "options": run.options,
            "products": [p.to_json() for p in products],
        }
        spec_path.write_text(json.dumps(spec))
        command = worker_command(spec_path, run.tool)
    sim.reset_stats()
    server_cpu0 = sim.cpu_seconds()
    log.info("%s: %s on %d files", scenario.name, run.label, len(products))
    sampler = ActiveSampler(sim)
    if scenario.sample:
        sampler.start()
    try:
        done: ClientRun = run_client(command, log_dir=logs, name=slug, timeout=timeout)
    finally:
        sampler.stop()
    server_cpu1 = sim.cpu_seconds()
    server_cpu = None if server_cpu0 is None or server_cpu1 is None else server_cpu1 - server_cpu0
    stats = sim.stats()
    check = check_tree(root, products, truth)
    report = done.report
    note = ""
    if done.returncode != 0:
        note = f"exit status {done.returncode}"
        log.warning(
            "%s exited with %d; stderr tail:\n%s", run.label, done.returncode, done.stderr_tail
        )
    if report is None and run.tool != "aria2c":
        note = (note + "; " if note else "") + "worker gave no report"
    phase_s = float(report["wall"]) if report else done.wall
    phase_cpu = float(report["cpu"]) if report else done.cpu
    if report and report.get("note"):
        note = (note + "; " if note else "") + str(report["note"])
    recorded = (report or {}).get("state_done")
    if recorded is not None and recorded != len(products):
        # The files may be right on disk, but a job state that disagrees breaks resumption.
        note = (note + "; " if note else "") + f"job state records {recorded} done"
    result = ToolResult(
        scenario=scenario.name,
        tool=run.tool,
        label=run.label,
        files=len(products),
        bytes=sum(p.size for p in products),
        ok=check.ok,
        wrong=check.wrong,
        missing=check.missing,
        ok_bytes=check.ok_bytes,
        seconds=phase_s,
        cpu=phase_cpu,
        process_seconds=done.wall,
        process_cpu=done.cpu,
        returncode=done.returncode,
        peak_connections=stats.get("peak_connections"),
        requests=stats.get("requests"),
        status_503=status_count(stats, 503),
        status_429=status_count(stats, 429),
        bytes_served=stats.get("bytes_served"),
        mean_active=sampler.mean_active(),
        server_cpu=server_cpu,
        worker=report,
        note=note,
        stderr_tail=done.stderr_tail if done.returncode != 0 or report is None else "",
    )
    log.info(
        "%s: %s -> %d/%d correct, %.2f s, %s MB/s, %s files/s, peak %s conns, %d x 503",
        scenario.name,
        run.label,
        result.ok,
        result.files,
        result.seconds,
        fmt(result.mb_per_s),
        fmt(result.files_per_s, 0),
        result.peak_connections,
        result.status_503,
    )
    if not keep:
        shutil.rmtree(root, ignore_errors=True)
    return result


def median_result(attempts: Sequence[ToolResult]) -> ToolResult:
    """The run with the median time (the lower middle for an even count), with every repeat's
    time attached; a run with wrong or missing files wins over a correct one, so repeating
    can never hide a failure."""
    bad = [r for r in attempts if r.ok != r.files]
    pool = bad or list(attempts)
    ordered = sorted(pool, key=lambda r: r.seconds)
    chosen = dataclasses.replace(ordered[(len(ordered) - 1) // 2])
    chosen.all_seconds = [r.seconds for r in attempts]
    if len(attempts) > 1:
        times = sorted(chosen.all_seconds)
        spread = f"median of {len(times)} runs ({times[0]:.2f}-{times[-1]:.2f} s)"
        chosen.note = f"{chosen.note}; {spread}" if chosen.note else spread
    return chosen


# -- workers (run in their own process) ---------------------------------------------------------


def _load_spec(path: str) -> tuple[dict[str, Any], list[Product], Path]:
    spec = json.loads(Path(path).read_text())
    return spec, [Product.from_json(p) for p in spec["products"]], Path(spec["root"])


def worker_astroquery(spec_path: str) -> int:
    """``Observations.download_products`` exactly as a user calls it: sequential HEAD + GET."""
    from astropy.table import Table
    from astroquery.mast import Observations

    from bulkfetch.sources import point_astroquery_at

    spec, products, root = _load_spec(spec_path)
    point_astroquery_at(spec["server"])
    table = Table(
        rows=[(p.uri, p.obs_collection, p.obs_id, p.filename, p.size, p.kind) for p in products],
        names=(
            "dataURI",
            "obs_collection",
            "obs_id",
            "productFilename",
            "size",
            "productSubGroupDescription",
        ),
    )
    note = ""
    errors = 0
    with PhaseMeter() as meter:
        try:
            manifest = Observations.download_products(table, download_dir=str(root))
            errors = sum(1 for status in manifest["Status"] if status != "COMPLETE")
        except Exception as exc:  # astroquery aborts the whole call on any non-HTTP error
            note = f"download_products aborted: {type(exc).__name__}: {exc}"
    emit_report({"wall": meter.wall, "cpu": meter.cpu, "errors": errors, "note": note})
    return 0


def worker_parfive(spec_path: str) -> int:
    """parfive with one connection per file and ``max_conn`` files at a time, one pass."""
    from parfive import Downloader, SessionConfig

    spec, products, root = _load_spec(spec_path)
    max_conn = int(spec["options"]["max_conn"])
    downloader = Downloader(
        max_conn=max_conn,
        max_splits=1,
        progress=False,
        overwrite=True,
        config=SessionConfig(file_progress=False),
    )
    for p in products:
        target = root / p.relpath
        target.parent.mkdir(parents=True, exist_ok=True)
        downloader.enqueue_file(p.url, path=target.parent, filename=target.name)
    with PhaseMeter() as meter:
        results = downloader.download()
    errors = len(results.errors)
    note = f"{errors} failed (no retry pass)" if errors else ""
    emit_report({"wall": meter.wall, "cpu": meter.cpu, "errors": errors, "note": note})
    return 0


def worker_bulkfetch(spec_path: str) -> int:
    """bulkfetch through its Python API: rows into a real job state, then ``fetch``.

    Planning (astroquery queries) is not part of a download benchmark, so the rows are added
    from the same product list the other tools get; the fetch itself records every state change
    in SQLite and verifies every file, as a user's ``bulkfetch fetch DIR`` does.
    """
    from bulkfetch.fetch import FetchOptions, fetch
    from bulkfetch.store import PlannedProduct, open_store

    spec, products, root = _load_spec(spec_path)
    store = open_store(root)
    with PhaseMeter() as plan_meter:
        store.add_products(
            PlannedProduct(
                uri=p.uri,
                url=p.url,
                local_path=p.relpath,
                size=p.size,
                obs_collection=p.obs_collection,
                obs_id=p.obs_id,
                product_filename=p.filename,
                sector=p.sector,
                kind=p.kind,
            )
            for p in products
        )
        store.flush()
    options = FetchOptions(**spec["options"])
    with PhaseMeter() as meter:
        result = fetch(store, root, options)
    store.close()
    # Read the state back from disk, as the next `bulkfetch fetch DIR` would see it.
    reopened = open_store(root)
    counts = reopened.counts()
    reopened.close()
    summary = {
        key: (value if isinstance(value, int | float | str | None) else repr(value))
        for key, value in dataclasses.asdict(result).items()
    }
    errors = counts.get("error", (0, 0))[0]
    note = f"{errors} files in error" if errors else ""
    emit_report(
        {
            "wall": meter.wall,
            "cpu": meter.cpu,
            "plan_seconds": plan_meter.wall,
            "result": summary,
            "errors": errors,
            "state_done": counts.get("done", (0, 0))[0],
            "note": note,
        }
    )
    return 0


def worker_minimal(spec_path: str) -> int:
    """The least a Python downloader can do: one aiohttp session, N tasks, GET, write, next.

    No state, no retries, no checks, no ``.part`` files. It is not a competitor but a yardstick:
    the per-file cost of Python + aiohttp + the simulator on this machine, which bounds what any
    asyncio engine can reach here.
    """
    import asyncio

    import aiohttp

    spec, products, root = _load_spec(spec_path)
    concurrency = int(spec["options"]["concurrency"])
    for p in products:
        (root / p.relpath).parent.mkdir(parents=True, exist_ok=True)

    async def run() -> int:
        queue: asyncio.Queue[Product] = asyncio.Queue()
        for p in products:
            queue.put_nowait(p)
        errors = 0
        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def work() -> None:
                nonlocal errors
                while not queue.empty():
                    p = queue.get_nowait()
                    try:
                        async with session.get(p.url) as resp:
                            resp.raise_for_status()
                            with open(root / p.relpath, "wb") as fh:
                                async for chunk in resp.content.iter_chunked(1 << 18):
                                    fh.write(chunk)
                    except aiohttp.ClientError:
                        errors += 1

            await asyncio.gather(*(work() for _ in range(concurrency)))
        return errors

    with PhaseMeter() as meter:
        errors = asyncio.run(run())
    emit_report({"wall": meter.wall, "cpu": meter.cpu, "errors": errors})
    return 0


WORKERS: dict[str, Callable[[str], int]] = {
    "minimal": worker_minimal,
    "astroquery": worker_astroquery,
    "parfive": worker_parfive,
    "bulkfetch": worker_bulkfetch,
}


# -- reporting ----------------------------------------------------------------------------------


def _pick(results: Sequence[ToolResult], scenario: str, tool: str) -> ToolResult | None:
    """The first result of ``tool`` in ``scenario`` (the reference configuration)."""
    return next((r for r in results if r.scenario == scenario and r.tool == tool), None)


def _correct(r: ToolResult) -> str:
    return f"{r.ok}/{r.files}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def render(
    scenarios: Sequence[Scenario],
    results: Sequence[ToolResult],
    command: str,
    sims: dict[Catalog, str],
    quick: bool = False,
) -> str:
    """The Markdown report: one table per scenario and the issue's targets, checked."""
    out = ["## Fetch benchmark", "", f"Command: `{command}`", ""]
    out.append(
        f"Machine: {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"{_versions()}. The simulator runs as a separate process; every client too."
    )
    out.append("")
    targets: list[str] = []
    for sc in scenarios:
        rows = [r for r in results if r.scenario == sc.name]
        if not rows:
            continue
        k = sc.knobs
        sizes = sorted(r.bytes / max(r.files, 1) for r in rows)
        avg_kb = sizes[len(sizes) // 2] / 1000
        desc = f"{sc.files} LC files of ~{avg_kb:,.0f} KB"
        if k.get("latency"):
            desc += f", {k['latency'] * 1000:.0f} ms first byte"
        if k.get("conn_bandwidth"):
            desc += f", {k['conn_bandwidth'] / MB:g} MB/s per connection"
        if k.get("total_bandwidth"):
            desc += f", {k['total_bandwidth'] / MB:g} MB/s total"
        if k.get("max_connections"):
            desc += f", at most {k['max_connections']} concurrent downloads"
        ceiling = _ceiling(sc, sizes[len(sizes) // 2])
        if ceiling:
            desc += f". {ceiling}"
        out += [f"### {sc.title}", "", desc + ".", ""]
        if sc.name == "equal":
            aria, aq = _pick(rows, "equal", "aria2c"), _pick(rows, "equal", "astroquery")
            table = [
                [
                    r.label,
                    _correct(r),
                    fmt(r.seconds, 2),
                    fmt(r.mb_per_s),
                    _x(ratio(r.mb_per_s, aria.mb_per_s if aria else None)),
                    _x(ratio(r.mb_per_s, aq.mb_per_s if aq else None)),
                    r.peak_connections if r.peak_connections is not None else "-",
                    fmt(r.mean_active),
                    _per_file(r.requests, r.files),
                ]
                for r in rows
            ]
            out.append(
                markdown_table(
                    [
                        "tool",
                        "correct",
                        "seconds",
                        "MB/s",
                        "vs aria2c",
                        "vs astroquery",
                        "peak conns",
                        "mean in flight",
                        "requests/file",
                    ],
                    table,
                )
            )
            if aq:
                out += [
                    "",
                    f"astroquery fetched {aq.files} of the {sc.files} files (it is sequential, "
                    "HEAD + GET per file, so its MB/s does not depend on the count; the ratio "
                    "extrapolates it).",
                ]
            bf = _pick(rows, "equal", "bulkfetch")
            if bf:
                pf = _pick(rows, "equal", "parfive")
                targets += [
                    _target(
                        "equal: bulkfetch >= aria2c",
                        ratio(bf.mb_per_s, _rate(aria)),
                        1.0,
                        "x",
                        noise=_spread(bf, aria),
                    ),
                    _target(
                        "equal: bulkfetch >= parfive",
                        ratio(bf.mb_per_s, _rate(pf)),
                        1.0,
                        "x",
                        noise=_spread(bf, pf),
                    ),
                    _target(
                        "equal: bulkfetch >= 20x astroquery",
                        ratio(bf.mb_per_s, _rate(aq)),
                        20.0,
                        "x",
                    ),
                ]
        elif sc.name == "cap":
            link = (k.get("total_bandwidth") or 0) / MB
            table = [
                [
                    r.label,
                    _correct(r),
                    fmt(r.seconds, 2),
                    fmt(r.mb_per_s),
                    f"{ratio(r.mb_per_s, link) or 0:.0%}",
                    r.peak_connections if r.peak_connections is not None else "-",
                    fmt(r.mean_active),
                    r.status_503,
                ]
                for r in rows
            ]
            out.append(
                markdown_table(
                    [
                        "tool",
                        "correct",
                        "seconds",
                        "MB/s",
                        "of link",
                        "peak conns",
                        "mean in flight",
                        "503s",
                    ],
                    table,
                )
            )
            out += ["", *_engine_notes(rows)]
            bf = _pick(rows, "cap", "bulkfetch")
            if bf:
                targets.append(
                    _target(
                        "cap: bulkfetch (adaptive) >= 80% of the link",
                        ratio(bf.mb_per_s, link),
                        0.80,
                        "%",
                    )
                )
        elif sc.name == "small":
            aria = _pick(rows, "small", "aria2c")
            table = [
                [
                    r.label,
                    _correct(r),
                    fmt(r.seconds, 2),
                    fmt(r.files_per_s, 0),
                    _x(ratio(r.files_per_s, aria.files_per_s if aria else None)),
                    fmt(1000 * r.cpu / r.files if r.files else None, 2),
                    fmt(1000 * r.server_cpu / r.files if r.server_cpu and r.files else None, 2),
                    _per_file(r.requests, r.files),
                ]
                for r in rows
            ]
            out.append(
                markdown_table(
                    [
                        "tool",
                        "correct",
                        "seconds",
                        "files/s",
                        "vs aria2c",
                        "client CPU ms/file",
                        "server CPU ms/file",
                        "requests/file",
                    ],
                    table,
                )
            )
            out += [
                "",
                "Server and client share this machine's cores, so files/s is bounded by both; "
                "client CPU ms/file is the client's own cost (1000 / it = the files/s one core "
                "could sustain for the client alone), server CPU ms/file the simulator's.",
            ]
            bf = _pick(rows, "small", "bulkfetch")
            if bf:
                targets.append(
                    _target(
                        "small: bulkfetch >= ~1,400 files/s (sha256)",
                        bf.files_per_s,
                        1400,
                        "files/s",
                    )
                )
        elif sc.name == "cpu":
            table = [
                [
                    r.label,
                    _correct(r),
                    fmt(r.ok_bytes / GB, 2),
                    fmt(r.seconds, 2),
                    fmt(r.cpu, 2),
                    fmt(r.cpu_per_gb, 2),
                    fmt(r.process_cpu, 2),
                ]
                for r in rows
            ]
            out.append(
                markdown_table(
                    ["tool", "correct", "GB", "seconds", "CPU s", "CPU s/GB", "process CPU s"],
                    table,
                )
            )
            out += [
                "",
                "CPU s = user + system seconds of the download phase (Python clients measure "
                "themselves, imports excluded; aria2c is measured as a whole process).",
            ]
            bf = _pick(rows, "cpu", "bulkfetch")
            if bf:
                targets.append(
                    _target(
                        "cpu: bulkfetch <= ~5 CPU s/GB (sha256 + FITS)",
                        bf.cpu_per_gb,
                        5.0,
                        "s/GB",
                        lower_is_better=True,
                    )
                )
        notes = [f"{r.label}: {r.note}" for r in rows if r.note]
        if notes:
            out += ["", "Notes: " + "; ".join(notes) + "."]
        out.append("")
    if quick:
        out += [
            "Quick mode: tiny files and counts to prove the script works; the numbers mean "
            "nothing, so no targets are checked.",
            "",
        ]
    elif targets:
        out += ["### Targets (issue 4)", ""]
        out += [f"- {t}" for t in targets]
        out.append("")
    out += ["Simulator command(s):", ""]
    out += [f"    {cmd}" for cmd in sims.values()]
    return "\n".join(out)


def _engine_notes(rows: Sequence[ToolResult]) -> list[str]:
    """What bulkfetch's own result says about its adaptive limit, for tuning the engine."""
    notes = []
    for r in rows:
        res = (r.worker or {}).get("result") or {}
        if r.tool != "bulkfetch" or not res:
            continue
        notes.append(
            f"{r.label}: limit ended at {res.get('concurrency')}, lowest "
            f"{res.get('min_concurrency_seen')}, {res.get('retries')} retries, "
            f"{(res.get('bytes_wasted') or 0) / MB:.1f} MB wasted."
        )
    return [" ".join(notes)] if notes else []


def _per_file(requests: int | None, files: int) -> str:
    """HTTP requests the archive saw per file (HEAD + GET = 2; retries add to it)."""
    return fmt(requests / files, 2) if requests is not None and files else "-"


def _rate(r: ToolResult | None) -> float | None:
    return r.mb_per_s if r else None


def _ceiling(sc: Scenario, size: float) -> str:
    """The best any client can do at the scenario's concurrency, from the knobs alone.

    Each file costs one first-byte latency plus its size at the per-connection rate; ``c`` of
    them in parallel, never above the total bandwidth. A ratio near 1.0 between two tools that
    both sit near this ceiling is a tie, not a win.
    """
    k = sc.knobs
    latency, per_conn, total = k.get("latency"), k.get("conn_bandwidth"), k.get("total_bandwidth")
    if not (latency and per_conn and total):
        return ""
    parts = []
    for run in sc.runs:
        c = run.options.get("concurrency") or run.options.get("jobs") or run.options.get("max_conn")
        if not c:
            continue
        c = min(int(c), k.get("max_connections") or int(c))
        best = min(total, c * size / (latency + size / per_conn)) / MB
        text = f"{c} in flight: {best:.1f} MB/s"
        if text not in parts:
            parts.append(text)
    return "Ceiling from the knobs with " + ", ".join(parts) if parts else ""


def _spread(*results: ToolResult | None) -> float | None:
    """Largest relative spread (max - min) / median of the repeats of ``results``; None for
    single runs. A difference smaller than this is not a measured difference."""
    spreads = []
    for r in results:
        if r is None or len(r.all_seconds) < 2:
            continue
        times = sorted(r.all_seconds)
        spreads.append((times[-1] - times[0]) / times[len(times) // 2])
    return max(spreads) if spreads else None


def _target(
    name: str,
    value: float | None,
    goal: float,
    unit: str,
    lower_is_better: bool = False,
    noise: float | None = None,
) -> str:
    """One checklist line: met or missed, by how much, and whether that is within the noise."""
    if value is None:
        return f"{name}: not measured"
    met = value <= goal if lower_is_better else value >= goal
    shown = {"x": f"{value:.3f}x", "%": f"{value:.1%}"}.get(unit, f"{value:,.1f} {unit}")
    if met:
        return f"{name}: {shown} - met"
    short = (value - goal) / goal if lower_is_better else (goal - value) / goal
    line = f"{name}: {shown} - MISSED by {short:.1%}"
    if noise is not None and short < noise:
        line += f" (within the run-to-run spread of {noise:.0%}: a tie)"
    return line


def _versions() -> str:
    parts = []
    for name in ("astroquery", "parfive", "aiohttp"):
        try:
            from importlib.metadata import version

            parts.append(f"{name} {version(name)}")
        except Exception:  # a missing package is reported by its scenario, not here
            continue
    aria = shutil.which("aria2c")
    if aria:
        first = subprocess.run([aria, "--version"], capture_output=True, text=True).stdout
        parts.append(first.splitlines()[0].replace("aria2 version", "aria2c") if first else "")
    return ", ".join(p for p in parts if p)


# -- main ---------------------------------------------------------------------------------------


def available_tools() -> dict[str, str]:
    """Which clients can run here, and why not for the others."""
    missing: dict[str, str] = {}
    if shutil.which("aria2c") is None:
        missing["aria2c"] = "aria2c not on PATH"
    if importlib.util.find_spec("parfive") is None:
        missing["parfive"] = "parfive not installed"
    try:
        engine = importlib.util.find_spec("bulkfetch.fetch")
    except ModuleNotFoundError:  # bulkfetch itself is not installed
        engine = None
    if engine is None:
        missing["bulkfetch"] = "bulkfetch.fetch not importable"
    return missing


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python scripts/bench_fetch.py",
        description="Benchmark bulkfetch against astroquery, parfive and aria2c on the "
        "simulated MAST archive; prints a Markdown table.",
    )
    parser.add_argument(
        "--scenario",
        default="all",
        help="all, or one or more (comma-separated) of: " + ", ".join(SCENARIOS),
    )
    parser.add_argument("--files", type=int, help="files in equal/cap/cpu (default 300)")
    parser.add_argument("--small-files", type=int, help="files in 'small' (default 3000)")
    parser.add_argument(
        "--tools",
        default=",".join(TOOLS),
        help="comma-separated subset of: " + ", ".join(TOOLS),
    )
    parser.add_argument("--quick", action="store_true", help="tiny run for smoke tests")
    parser.add_argument("--json", type=Path, help="also write every measurement as JSON here")
    parser.add_argument("--workdir", type=Path, help="where to download (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep downloads and logs")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run every tool N times (round-robin) and report the median run",
    )
    parser.add_argument(
        "--timeout", type=float, default=1800.0, help="seconds before a client is killed"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    chosen = set(args.scenario.split(","))
    if chosen - set(("all",) + SCENARIOS):
        parser.error(f"unknown scenario: {', '.join(sorted(chosen - set(SCENARIOS)))}")
    args.scenarios = set(SCENARIOS) if "all" in chosen else chosen
    unknown = set(args.tools.split(",")) - set(TOOLS)
    if unknown:
        parser.error(f"unknown tools: {', '.join(sorted(unknown))}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the chosen scenarios and print the Markdown report (CLI entry point)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        if len(argv) != 3 or argv[1] not in WORKERS:
            sys.stderr.write("usage: bench_fetch.py --worker {astroquery,parfive,bulkfetch} SPEC\n")
            return 2
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
        return WORKERS[argv[1]](argv[2])

    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(message)s",
    )
    command = shlex.join(["python", "scripts/bench_fetch.py", *argv])
    wanted = set(args.tools.split(","))
    missing = available_tools()
    scenarios = [s for s in build_scenarios(args) if s.name in args.scenarios]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bulkfetch-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    results: list[ToolResult] = []
    sim_commands: dict[Catalog, str] = {}
    skipped: list[str] = []
    started = time.perf_counter()
    try:
        for catalog in dict.fromkeys(s.catalog for s in scenarios):
            group = [s for s in scenarios if s.catalog == catalog]
            n_files = max(s.files for s in group)
            # Bodies are generated once and served from memory: room for every file, with slack.
            est_mb = n_files * 2.2 * catalog.scale * 1.3 + 64
            sim = SimProcess(
                {**dataclasses.asdict(catalog), "body_cache_mb": max(256, int(est_mb))},
                log_path=workdir / f"sim-{catalog.scale:g}.log",
            )
            with sim:
                sim_commands[catalog] = shlex.join(sim.command)
                sectors = list(range(1, max(catalog.n_sectors, 2))) + [1751]
                products = select_lc_products(sim.url, n_files, sectors)
                # Asking for the truth also generates every body once (warms the cache).
                truth = sim.truths(p.uri for p in products)
                for sc in group:
                    sim.configure(**sc.knobs)
                    runs = []
                    for run in sc.runs:
                        if run.tool not in wanted or (args.quick and run.full_only):
                            continue
                        if run.tool in missing:
                            skipped.append(f"{sc.name}/{run.label}: {missing[run.tool]}")
                            continue
                        runs.append(run)
                    # Repeats go round-robin, so a drift in machine load hits every tool alike.
                    attempts: dict[str, list[ToolResult]] = {run.label: [] for run in runs}
                    for _ in range(args.repeat):
                        for run in runs:
                            subset = products[: run.files or sc.files]
                            attempts[run.label].append(
                                run_tool(
                                    sc, run, sim, subset, truth, workdir, args.keep, args.timeout
                                )
                            )
                    results += [median_result(attempts[run.label]) for run in runs]
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    report = render(scenarios, results, command, sim_commands, quick=args.quick)
    if skipped:
        report += "\n\nSkipped: " + "; ".join(skipped) + "\n"
    print(report)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "command": command,
                    "seconds": time.perf_counter() - started,
                    "scenarios": [
                        {
                            "name": s.name,
                            "title": s.title,
                            "files": s.files,
                            "catalog": dataclasses.asdict(s.catalog),
                            "knobs": s.knobs,
                        }
                        for s in scenarios
                    ],
                    "results": [r.to_json() for r in results],
                    "skipped": skipped,
                    "markdown": report,
                },
                indent=2,
            )
        )
    failed = [r for r in results if r.tool == "bulkfetch" and r.ok != r.files]
    if failed:
        log.error("bulkfetch left %d run(s) with wrong or missing files", len(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
