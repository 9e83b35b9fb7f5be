"""Fault soak: one whole bulkfetch job against a simulated archive that misbehaves on purpose.

The simulator runs in its own process with a fault mix modelled on a bad day at a public archive
(10% 503/429 with Retry-After, 5% connection resets mid-body, 3% corrupted bodies with the right
length, 2% stalls, 2% HTML error pages served as 200, 1% of the files permanently 404). The
real command line (``python -m bulkfetch tess DIR --mast-url URL ...``) plans and downloads the
light curves of a few sectors through unmodified astroquery, exactly as a user runs it. Then the
script checks, from outside, what a user relies on:

* every available file is byte-exact (its SHA-256 equals the simulator's truth);
* no ``.part``, ``.etag`` or ``.tmp`` is left, and nothing but verified products sits under
  their final names (an HTML page or a corrupt body saved as ``.fits`` counts as corrupt);
* every permanently missing file is an ``ERROR`` row of the manifest whose Message carries the
  HTTP status, and the command exits 1 (so a cron job notices);
* the bytes the simulator served stay within ``--max-ratio`` (1.3) of the payload: retries do
  not re-download the world.

It prints the figures (files good / corrupt / missing, bytes served over payload, requests by
status, faults injected, duration) and exits 0 only if every check passed. The test suite runs
the same code on 200 files (``tests/test_reliability.py``); the README quotes a 2,000-file run:

    python scripts/soak.py --files 2000 --seed 1
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _benchlib import SimProcess, run_client, sha256_file  # noqa: E402

#: The fault mix of the issue, as simulator knobs (probabilities per download request).
FAULT_MIX: dict[str, float] = {
    "fail_503": 0.05,
    "fail_429": 0.05,
    "reset_rate": 0.05,
    "corrupt_rate": 0.03,
    "stall_rate": 0.02,
    "html_rate": 0.02,
    "missing_rate": 0.01,
}

#: Light curves per simulated sector at most: a sector of the real archive has ~20,000, but a
#: few hundred keep the catalog (and its start-up) small while the job still spans sectors.
MAX_TARGETS_PER_SECTOR = 500

#: Files a finished job may leave under DIR besides the products (state, manifest).
OWN_FILES = ("manifest.csv", "manifest.ecsv")
OWN_DIR = ".bulkfetch"


# -- talking to the simulator ---------------------------------------------------------------------


def sim_json(url: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """GET (or POST ``body`` to) one of the simulator's ``/_sim/`` endpoints; decoded JSON."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        url + path,
        data=data,
        headers={"Content-Type": "application/json"} if data else {},
        method="POST" if data else "GET",
    )
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.load(resp)


def truths(url: str, uris: Iterable[str], workers: int = 8) -> dict[str, dict[str, Any]]:
    """``/_sim/truth`` of every uri: size, SHA-256 and whether it is permanently missing."""

    def one(uri: str) -> tuple[str, dict[str, Any]]:
        return uri, sim_json(url, "/_sim/truth?uri=" + urllib.parse.quote(uri, safe=""))

    with ThreadPoolExecutor(workers) as pool:
        return dict(pool.map(one, list(uris)))


def read_manifest(directory: Path) -> list[dict[str, str]]:
    """The rows of ``DIR/manifest.csv`` as dicts (the file a user opens)."""
    with open(directory / "manifest.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


# -- checking a download directory ----------------------------------------------------------------


@dataclass
class TreeReport:
    """What is under a download directory compared with the simulator's truth.

    ``good``: available products present with the right bytes. ``corrupt``: a file under a
    product's final name whose bytes are wrong (the failure mode of curl, parfive, aria2c).
    ``absent``: available products with no file. ``ghosts``: files of permanently missing
    products (an error page saved under the product's name). ``stray``: anything else - a
    ``.part``, ``.etag`` or ``.tmp`` left behind, or a file no product accounts for.
    """

    good: int = 0
    corrupt: list[str] = field(default_factory=list)
    absent: list[str] = field(default_factory=list)
    ghosts: list[str] = field(default_factory=list)
    stray: list[str] = field(default_factory=list)


def check_tree(
    directory: Path, rows: list[dict[str, str]], truth: dict[str, dict[str, Any]]
) -> TreeReport:
    """Walk ``directory`` once and classify every file against the manifest and the truth."""
    report = TreeReport()
    expected: dict[str, str] = {}  # absolute final path -> uri
    for row in rows:
        expected[os.path.abspath(row["Local Path"])] = row["dataURI"]
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(directory):
        if Path(dirpath) == directory and OWN_DIR in dirnames:
            dirnames.remove(OWN_DIR)
        for name in filenames:
            path = os.path.abspath(os.path.join(dirpath, name))
            if Path(dirpath) == directory and name in OWN_FILES:
                continue
            uri = expected.get(path)
            if uri is None:
                report.stray.append(os.path.relpath(path, directory))
                continue
            seen.add(path)
            if truth[uri]["missing"]:
                report.ghosts.append(uri)
            elif sha256_file(Path(path)) == truth[uri]["sha256"]:
                report.good += 1
            else:
                report.corrupt.append(uri)
    for path, uri in expected.items():
        if path not in seen and not truth[uri]["missing"]:
            report.absent.append(uri)
    return report


# -- the soak -------------------------------------------------------------------------------------


@dataclass
class SoakResult:
    """Every figure of one soak run and the verdict of each check."""

    files: int
    sectors: int
    targets_per_sector: int
    concurrency: int
    seed: int
    exit_code: int
    duration: float
    available: int
    missing: int
    good: int
    corrupt: list[str]
    absent: list[str]
    ghosts: list[str]
    stray: list[str]
    #: Missing products whose manifest row is ERROR with the HTTP status in its Message.
    errors_reported: int
    #: Manifest rows that are not COMPLETE although the file is available (should be none).
    unexpected_errors: list[str]
    payload_bytes: int
    bytes_served: int
    requests: int
    status_counts: dict[str, int]
    fault_counts: dict[str, int]
    stderr_tail: str = ""
    command: list[str] = field(default_factory=list)
    sim_command: list[str] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        """Bytes served over the payload (the bytes of the available files)."""
        return self.bytes_served / self.payload_bytes if self.payload_bytes else math.inf

    def failures(self, max_ratio: float) -> list[str]:
        """Each check that failed, in words; empty when the soak passed."""
        out: list[str] = []
        if self.good != self.available:
            out.append(f"{self.good} of {self.available} available files are good")
        for name in ("corrupt", "absent", "ghosts", "stray", "unexpected_errors"):
            items = getattr(self, name)
            if items:
                out.append(f"{len(items)} {name}: {items[:3]}")
        if self.errors_reported != self.missing:
            out.append(f"{self.errors_reported} of {self.missing} 404s are ERROR rows with 404")
        want = 1 if self.missing else 0
        if self.exit_code != want:
            out.append(f"exit code {self.exit_code}, expected {want}")
        if self.ratio > max_ratio:
            out.append(f"bytes served {self.ratio:.3f}x the payload, above {max_ratio}x")
        return out

    def format(self) -> str:
        """The figures, for a human."""
        mb = 1e6
        lines = [
            f"fault soak: {self.files} files ({self.sectors} sectors x {self.targets_per_sector} "
            f"light curves), concurrency {self.concurrency}, seed {self.seed}",
            "  faults injected: "
            + ", ".join(f"{k} {v}" for k, v in sorted(self.fault_counts.items())),
            f"  requests: {self.requests} ("
            + ", ".join(f"{k}: {v}" for k, v in sorted(self.status_counts.items()))
            + ")",
            f"  result: {self.good} good, {len(self.corrupt)} corrupt, {len(self.absent)} "
            f"missing of {self.available} available; {self.errors_reported} of {self.missing} "
            "permanent 404s reported as ERROR rows",
            f"  left behind: {len(self.stray)} stray files (.part/.etag/.tmp/unknown), "
            f"{len(self.ghosts)} error pages under a product name",
            f"  bytes served {self.bytes_served / mb:.1f} MB for a payload of "
            f"{self.payload_bytes / mb:.1f} MB: {self.ratio:.3f}x",
            f"  exit code {self.exit_code}; {self.duration:.1f} s",
        ]
        return "\n".join(lines)


def catalog_shape(files: int) -> tuple[int, int]:
    """(sectors, light curves per sector) so that ``sectors * per_sector >= files``, close."""
    sectors = max(1, math.ceil(files / MAX_TARGETS_PER_SECTOR))
    return sectors, math.ceil(files / sectors)


def run_soak(
    *,
    files: int = 2000,
    seed: int = 1,
    concurrency: int = 16,
    scale: float = 0.01,
    retry_after: float = 1.0,
    stall_timeout: float = 2.0,
    faults: dict[str, float] | None = None,
    workdir: Path | None = None,
    keep: bool = False,
) -> SoakResult:
    """Run one soak and return its figures (the checks are :meth:`SoakResult.failures`).

    ``stall_timeout`` is the client's ``--stall-timeout``: the simulator's stalled bodies
    never resume, so the watchdog is what ends them; the default 60 s would only make the
    soak slow, not different.
    """
    sectors, per_sector = catalog_shape(files)
    knobs: dict[str, Any] = {
        "sectors": sectors + 1,  # 1..sectors plus the special sector 1751 (not planned here)
        "targets": per_sector,
        "scale": scale,
        "seed": seed,
        "retry_after": retry_after,
        "stall_seconds": 60.0,
        **(FAULT_MIX if faults is None else faults),
    }
    own_tmp = workdir is None
    base = Path(tempfile.mkdtemp(prefix="bulkfetch-soak-")) if workdir is None else workdir
    base.mkdir(parents=True, exist_ok=True)
    directory = base / "job"
    try:
        with SimProcess(knobs, log_path=base / "simulator.log") as sim:
            command = [
                sys.executable,
                "-m",
                "bulkfetch",
                "tess",
                str(directory),
                "--mast-url",
                sim.url,
                "--products",
                "lc",
                "--sectors",
                f"1-{sectors}",
                "--concurrency",
                str(concurrency),
                "--stall-timeout",
                str(stall_timeout),
                "--no-progress",
            ]
            started = time.monotonic()
            run = run_client(command, log_dir=base / "logs", name="bulkfetch", timeout=3600)
            duration = time.monotonic() - started
            stats = sim_json(sim.url, "/_sim/stats")
            rows = read_manifest(directory) if (directory / "manifest.csv").exists() else []
            truth = truths(sim.url, [r["dataURI"] for r in rows])
            sim_command = sim.command
        tree = check_tree(directory, rows, truth)
        missing = [r for r in rows if truth[r["dataURI"]]["missing"]]
        reported = [r for r in missing if r["Status"] == "ERROR" and "404" in r["Message"]]
        unexpected = [
            r["dataURI"]
            for r in rows
            if not truth[r["dataURI"]]["missing"] and r["Status"] != "COMPLETE"
        ]
        payload = sum(
            int(truth[r["dataURI"]]["size"]) for r in rows if not truth[r["dataURI"]]["missing"]
        )
        return SoakResult(
            files=len(rows),
            sectors=sectors,
            targets_per_sector=per_sector,
            concurrency=concurrency,
            seed=seed,
            exit_code=run.returncode,
            duration=duration,
            available=len(rows) - len(missing),
            missing=len(missing),
            good=tree.good,
            corrupt=tree.corrupt,
            absent=tree.absent,
            ghosts=tree.ghosts,
            stray=tree.stray,
            errors_reported=len(reported),
            unexpected_errors=unexpected,
            payload_bytes=payload,
            bytes_served=int(stats["bytes_served"]),
            requests=int(stats["requests"]),
            status_counts=dict(stats["status_counts"]),
            fault_counts=dict(stats["fault_counts"]),
            stderr_tail=run.stderr_tail,
            command=command,
            sim_command=sim_command,
        )
    finally:
        if own_tmp and not keep:
            shutil.rmtree(base, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """Command line: run one soak, print the figures, exit 0 only if every check passed."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=2000, help="light curves in the job (2000)")
    p.add_argument("--seed", type=int, default=1, help="seed of the archive and its faults (1)")
    p.add_argument("--concurrency", type=int, default=16, help="bulkfetch --concurrency (16)")
    p.add_argument("--scale", type=float, default=0.01, help="file size factor (0.01: ~20 KB)")
    p.add_argument("--retry-after", type=float, default=1.0, help="simulator Retry-After (1 s)")
    p.add_argument("--max-ratio", type=float, default=1.3, help="allowed served/payload (1.3)")
    p.add_argument("--workdir", type=Path, help="keep the job and the logs here")
    p.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = p.parse_args(argv)
    result = run_soak(
        files=args.files,
        seed=args.seed,
        concurrency=args.concurrency,
        scale=args.scale,
        retry_after=args.retry_after,
        workdir=args.workdir,
    )
    print(result.format())
    print("  command: " + " ".join(result.command[1:]).replace(str(result.command[4]), "DIR"))
    failures = result.failures(args.max_ratio)
    if args.json:
        print(json.dumps({**asdict(result), "ratio": result.ratio, "failures": failures}))
    if failures:
        print("FAILED:\n  " + "\n  ".join(failures))
        print(result.stderr_tail)
        return 1
    print("PASSED: every check")
    return 0


if __name__ == "__main__":
    sys.exit(main())
