"""Crash and resume: kill -9 one bulkfetch job again and again, resume it each time, check it.

The simulated archive runs in its own process, paced to a fixed total bandwidth so the job
lasts long enough to be killed at random moments. The job is the real command line
(``python -m bulkfetch tess DIR --mast-url URL --products lc,tp ...``): light curves (held in
memory until verified) and target pixel files large enough to stream to ``.part`` files, the
ones a Range request resumes. The script then:

1. kills the command with SIGKILL once while it is still **planning** (the archive's query
   API is slowed down for that), and checks the state;
2. kills it ``--kills`` times at random moments while it **downloads**, rerunning the same
   command each time; after every kill SQLite's ``PRAGMA integrity_check`` must say ``ok``,
   every file under a final name must be byte-exact, and every row marked done must have its
   file;
3. stops it once with **SIGINT** and once with **SIGTERM**: exit codes 130 and 143, the state
   sound and a manifest written whose COMPLETE rows are byte-exact;
4. lets the last run finish, and checks the final tree byte for byte against the simulator's
   truth, that nothing is left behind (``.part``, ``.etag``, ``.tmp``), that no file recorded
   as done before a kill was ever requested again, that partial files were resumed with Range
   requests, and that the archive served at most ``--max-ratio`` (1.1) times the payload.

It prints the figures and exits 0 only if every check passed. The test suite runs a short
version (``tests/test_reliability.py``); the README quotes:

    python scripts/crash_resume.py --kills 10 --seed 1
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _benchlib import SimProcess  # noqa: E402
from soak import check_tree, read_manifest, sha256_file, sim_json, truths  # noqa: E402

#: Seconds each query API call of the archive takes while we want to kill during planning.
PLANNING_LATENCY = 1.0


@dataclass
class CrashResult:
    """The figures of one crash-and-resume run, and every check's evidence."""

    seed: int
    files: int
    payload_bytes: int
    kills_asked: int
    kills_done: int = 0
    #: Products in the job state when the planning kill landed (of ``files``), or -1.
    planned_at_kill: int = -1
    planning_kill_before_downloads: bool = False
    #: Seconds after the first downloaded byte of each run at which it was killed.
    kill_moments: list[float] = field(default_factory=list)
    #: Files recorded as done at each kill (cumulative).
    done_at_kill: list[int] = field(default_factory=list)
    integrity: list[str] = field(default_factory=list)
    #: Broken invariants seen after some kill ("kill 3: wrong bytes under final name ...").
    invariant_failures: list[str] = field(default_factory=list)
    sigint_exit: int | None = None
    sigterm_exit: int | None = None
    signal_manifest_failures: list[str] = field(default_factory=list)
    final_exit: int | None = None
    good: int = 0
    corrupt: list[str] = field(default_factory=list)
    absent: list[str] = field(default_factory=list)
    stray: list[str] = field(default_factory=list)
    #: Files downloaded again after the state had recorded them done.
    refetched: list[str] = field(default_factory=list)
    bytes_served: int = 0
    range_requests: int = 0
    partial_responses: int = 0
    duration: float = 0.0
    runs: int = 0
    log_tail: str = ""

    @property
    def ratio(self) -> float:
        """Bytes served over the payload."""
        return self.bytes_served / self.payload_bytes if self.payload_bytes else math.inf

    def failures(self, max_ratio: float) -> list[str]:
        """Each failed check in words; empty when everything held."""
        out: list[str] = []
        if self.kills_done < self.kills_asked:
            out.append(f"only {self.kills_done} of {self.kills_asked} kills landed in a download")
        if not self.planning_kill_before_downloads or not 0 <= self.planned_at_kill < self.files:
            out.append("the planning kill did not land during planning")
        bad = [v for v in self.integrity if v != "ok"]
        if bad:
            out.append(f"integrity_check failed: {bad[:3]}")
        out.extend(self.invariant_failures[:5])
        if self.sigint_exit != 130:
            out.append(f"SIGINT exit code {self.sigint_exit}, expected 130")
        if self.sigterm_exit != 143:
            out.append(f"SIGTERM exit code {self.sigterm_exit}, expected 143")
        out.extend(self.signal_manifest_failures[:5])
        if self.final_exit != 0:
            out.append(f"final run exit code {self.final_exit}")
        if self.good != self.files:
            out.append(f"{self.good} of {self.files} files good")
        for name in ("corrupt", "absent", "stray", "refetched"):
            items = getattr(self, name)
            if items:
                out.append(f"{len(items)} {name}: {items[:3]}")
        if self.range_requests == 0 or self.partial_responses == 0:
            out.append("no partial file was resumed with a Range request")
        if self.ratio > max_ratio:
            out.append(f"bytes served {self.ratio:.3f}x the payload, above {max_ratio}x")
        return out

    def format(self) -> str:
        """The figures, for a human."""
        mb = 1e6
        moments = ", ".join(f"{t:.2f}" for t in self.kill_moments)
        return "\n".join(
            [
                f"crash and resume: {self.files} files, {self.payload_bytes / mb:.1f} MB, "
                f"seed {self.seed}",
                f"  planning: killed with {self.planned_at_kill} of {self.files} products "
                f"planned, before any download: {self.planning_kill_before_downloads}",
                f"  kill -9 during downloads: {self.kills_done} (at {moments} s after the "
                "first byte of each run)",
                f"  files done at each kill: {self.done_at_kill}",
                f"  PRAGMA integrity_check after every kill: "
                f"{'all ok' if set(self.integrity) == {'ok'} else self.integrity}",
                f"  invariants after every kill (final names byte-exact, done rows have their "
                f"file): {'held' if not self.invariant_failures else self.invariant_failures}",
                f"  SIGINT exit {self.sigint_exit}, SIGTERM exit {self.sigterm_exit}; manifests "
                f"after them: {'ok' if not self.signal_manifest_failures else 'BAD'}",
                f"  final: exit {self.final_exit}; {self.good} good, {len(self.corrupt)} corrupt, "
                f"{len(self.absent)} missing, {len(self.stray)} left-over files; "
                f"{len(self.refetched)} finished files fetched again",
                f"  resumed by Range: {self.range_requests} range requests, "
                f"{self.partial_responses} answered 206",
                f"  bytes served {self.bytes_served / mb:.1f} MB for a payload of "
                f"{self.payload_bytes / mb:.1f} MB: {self.ratio:.3f}x",
                f"  {self.runs} runs of the command in {self.duration:.1f} s",
            ]
        )


# -- the job state, read from outside ------------------------------------------------------------


def read_state(directory: Path) -> tuple[str, list[tuple[str, str, str]]]:
    """(integrity_check verdict, [(uri, status, local_path)]) of the job state on disk."""
    db = directory / ".bulkfetch" / "state.sqlite"
    if not db.exists():
        return "ok", []
    conn = sqlite3.connect(db, timeout=30)
    try:
        verdict = "; ".join(str(r[0]) for r in conn.execute("PRAGMA integrity_check"))
        rows = conn.execute("SELECT uri, status, local_path FROM products").fetchall()
    finally:
        conn.close()
    return verdict, [(str(u), str(s), str(p)) for u, s, p in rows]


class Checker:
    """Byte-exactness of final names, with each verified file remembered by (size, mtime)."""

    def __init__(self, truth: dict[str, dict[str, Any]]) -> None:
        self.truth = truth
        self._ok: dict[str, tuple[int, int]] = {}

    def problems(self, directory: Path, rows: list[tuple[str, str, str]]) -> list[str]:
        """Invariants a kill must never break: every file under a product's final name is
        byte-exact, and every row marked done has its file."""
        out: list[str] = []
        for uri, status, rel in rows:
            path = directory / rel
            try:
                st = path.stat()
            except FileNotFoundError:
                if status == "done":
                    out.append(f"{uri} is done but its file is missing")
                continue
            stamp = (st.st_size, st.st_mtime_ns)
            if self._ok.get(str(path)) == stamp:
                continue
            if sha256_file(path) != self.truth[uri]["sha256"]:
                out.append(f"wrong bytes under the final name of {uri} ({status})")
            else:
                self._ok[str(path)] = stamp
        return out


# -- driving the command -------------------------------------------------------------------------


class Runner:
    """Starts the same bulkfetch command again and again, logging each run's output."""

    def __init__(self, command: list[str], log_dir: Path) -> None:
        self.command = command
        self.log_dir = log_dir
        self.runs = 0
        log_dir.mkdir(parents=True, exist_ok=True)

    def start(self) -> subprocess.Popen[bytes]:
        self.runs += 1
        log = open(self.log_dir / f"run{self.runs:02d}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            self.command,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        return proc

    def last_log(self, chars: int = 2000) -> str:
        path = self.log_dir / f"run{self.runs:02d}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def wait_for(predicate: Any, timeout: float, proc: subprocess.Popen[bytes]) -> bool:
    """Poll ``predicate`` every 20 ms until true (True), the process ends or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    return False


def kill9(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the command (and anything it started) and reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


# -- the experiment ------------------------------------------------------------------------------


def run_crash_resume(
    *,
    kills: int = 10,
    seed: int = 1,
    targets: int = 8,
    sectors: int = 2,
    scale: float = 0.5,
    products: str = "lc,tp",
    concurrency: int = 4,
    bandwidth: float = 20e6,
    kill_window: float = 1.0,
    workdir: Path | None = None,
    keep: bool = False,
) -> CrashResult:
    """Run the whole experiment once; the checks are :meth:`CrashResult.failures`.

    ``kill_window``: each download run is killed at a uniformly random moment within this
    many seconds after its first byte arrived at the archive's side.
    """
    rng = random.Random(seed)
    own_tmp = workdir is None
    base = Path(tempfile.mkdtemp(prefix="bulkfetch-crash-")) if workdir is None else workdir
    base.mkdir(parents=True, exist_ok=True)
    directory = base / "job"
    started = time.monotonic()
    knobs = {
        "sectors": sectors + 1,
        "targets": targets,
        "scale": scale,
        "seed": seed,
        "fast_fraction": 0.0,
        "total_bandwidth": bandwidth,
        "query_latency": PLANNING_LATENCY,
    }
    try:
        with SimProcess(knobs, log_path=base / "simulator.log") as sim:
            command = [
                sys.executable, "-m", "bulkfetch", "tess", str(directory),
                "--mast-url", sim.url, "--sectors", f"1-{sectors}", "--products", products,
                "--concurrency", str(concurrency), "--no-progress",
            ]  # fmt: skip
            runner = Runner(command, base / "logs")
            result = CrashResult(seed=seed, files=0, payload_bytes=0, kills_asked=kills)

            # 1. a kill while planning (the query API is slow on purpose)
            proc = runner.start()
            db = directory / ".bulkfetch" / "state.sqlite"
            wait_for(db.exists, 60, proc)
            time.sleep(rng.uniform(0.2, 1.5 * PLANNING_LATENCY))
            served = sim_json(sim.url, "/_sim/stats")["bytes_served"]
            kill9(proc)
            verdict, rows = read_state(directory)
            result.integrity.append(verdict)
            result.planned_at_kill = len(rows)
            result.planning_kill_before_downloads = served == 0 and proc.returncode == -9
            sim.configure(query_latency=0.0)

            # the job's products, known once planning can finish: run until the first byte
            truth: dict[str, dict[str, Any]] = {}
            checker: Checker | None = None
            done_gets: dict[str, int] = {}  # uri -> GETs it had when first seen done
            for k in range(kills):
                before = sim_json(sim.url, "/_sim/stats")["bytes_served"]
                proc = runner.start()

                def moving(before: int = before) -> bool:
                    return sim_json(sim.url, "/_sim/stats")["bytes_served"] > before

                if not wait_for(moving, 120, proc):
                    proc.wait()
                    result.invariant_failures.append(
                        f"run {runner.runs} ended (exit {proc.returncode}) before it was killed"
                    )
                    break
                moment = rng.uniform(0.0, kill_window)
                time.sleep(moment)
                kill9(proc)
                result.kills_done += 1
                result.kill_moments.append(moment)
                verdict, rows = read_state(directory)
                result.integrity.append(verdict)
                if checker is None:
                    truth = truths(sim.url, [u for u, _, _ in rows])
                    checker = Checker(truth)
                stats = sim_json(sim.url, "/_sim/stats")
                for uri, status, _ in rows:
                    if status == "done" and uri not in done_gets:
                        done_gets[uri] = stats["per_uri"].get(uri, {}).get("gets", 0)
                result.done_at_kill.append(sum(1 for _, s, _ in rows if s == "done"))
                for problem in checker.problems(directory, rows):
                    result.invariant_failures.append(f"kill {k + 1}: {problem}")

            # 3. graceful stops: SIGINT, then SIGTERM
            for sig, attr in ((signal.SIGINT, "sigint_exit"), (signal.SIGTERM, "sigterm_exit")):
                before = sim_json(sim.url, "/_sim/stats")["bytes_served"]
                proc = runner.start()
                if wait_for(lambda b=before: sim_json(sim.url, "/_sim/stats")["bytes_served"] > b,
                            120, proc):  # fmt: skip
                    time.sleep(rng.uniform(0.0, kill_window))
                    proc.send_signal(sig)
                try:
                    setattr(result, attr, proc.wait(timeout=60))
                except subprocess.TimeoutExpired:
                    kill9(proc)
                    setattr(result, attr, proc.returncode)
                verdict, rows = read_state(directory)
                result.integrity.append(verdict)
                result.signal_manifest_failures.extend(
                    _manifest_problems(directory, truth, sig.name)
                )

            # 4. the last run, to the end
            proc = runner.start()
            result.final_exit = proc.wait(timeout=3600)
            result.log_tail = runner.last_log()
            stats = sim_json(sim.url, "/_sim/stats")
            rows_m = read_manifest(directory)
            if not truth:
                truth = truths(sim.url, [r["dataURI"] for r in rows_m])
        tree = check_tree(directory, rows_m, truth)
        result.files = len(rows_m)
        result.payload_bytes = sum(int(truth[r["dataURI"]]["size"]) for r in rows_m)
        result.good, result.corrupt, result.absent = tree.good, tree.corrupt, tree.absent
        result.stray = tree.stray + tree.ghosts
        per_uri = stats["per_uri"]
        result.refetched = [
            uri for uri, gets in done_gets.items() if per_uri.get(uri, {}).get("gets", 0) != gets
        ]
        result.bytes_served = int(stats["bytes_served"])
        result.range_requests = int(stats["range_requests"])
        result.partial_responses = int(stats["status_counts"].get("206", 0))
        result.runs = runner.runs
        result.duration = time.monotonic() - started
        return result
    finally:
        if own_tmp and not keep:
            shutil.rmtree(base, ignore_errors=True)


def _manifest_problems(directory: Path, truth: dict[str, dict[str, Any]], when: str) -> list[str]:
    """What is wrong with the manifest a signal left: missing, or a COMPLETE row that lies."""
    try:
        rows = read_manifest(directory)
    except (OSError, ValueError) as exc:
        return [f"after {when}: no readable manifest ({exc})"]
    out = []
    statuses = {r["Status"] for r in rows}
    if not rows or not statuses <= {"COMPLETE", "SKIPPED"}:
        out.append(f"after {when}: manifest statuses {sorted(statuses)}")
    for row in rows:
        if row["Status"] != "COMPLETE":
            continue
        path = Path(row["Local Path"])
        if not path.is_file() or (truth and sha256_file(path) != truth[row["dataURI"]]["sha256"]):
            out.append(f"after {when}: COMPLETE row {row['dataURI']} has no good file")
    return out


def main(argv: list[str] | None = None) -> int:
    """Command line: run the experiment, print the figures, exit 0 only if all checks held."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=10, help="kill -9 during downloads (10)")
    p.add_argument("--seed", type=int, default=1, help="seed of the archive and the kills (1)")
    p.add_argument("--files", type=int, default=32, help="products in the job, ~ (32)")
    p.add_argument("--scale", type=float, default=0.5, help="size factor (0.5: TP 9-22 MB)")
    p.add_argument("--concurrency", type=int, default=4, help="bulkfetch --concurrency (4)")
    p.add_argument("--bandwidth", type=float, default=20e6, help="archive bytes/s (20e6)")
    p.add_argument("--max-ratio", type=float, default=1.1, help="allowed served/payload (1.1)")
    p.add_argument("--workdir", type=Path, help="keep the job and the logs here")
    p.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = p.parse_args(argv)
    sectors = 2
    targets = max(1, math.ceil(args.files / (2 * sectors)))  # an LC and a TP per observation
    result = run_crash_resume(
        kills=args.kills,
        seed=args.seed,
        targets=targets,
        sectors=sectors,
        scale=args.scale,
        concurrency=args.concurrency,
        bandwidth=args.bandwidth,
        workdir=args.workdir,
    )
    print(result.format())
    failures = result.failures(args.max_ratio)
    if args.json:
        print(json.dumps({**asdict(result), "ratio": result.ratio, "failures": failures}))
    if failures:
        print("FAILED:\n  " + "\n  ".join(failures))
        print(result.log_tail)
        return 1
    print("PASSED: every check")
    return 0


if __name__ == "__main__":
    sys.exit(main())
