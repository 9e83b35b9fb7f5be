"""Shared helpers for the benchmark scripts: a simulator in its own process, measured clients.

Benchmarks compare download tools against the simulated MAST archive. Two rules shape this file:

* The simulator runs as a SEPARATE process (``python -m bulkfetch.testing.mast --port 0``), and
  so does every client. A client sharing the server's interpreter would share its GIL and event
  loop, and the numbers would measure that contention rather than the client.
* Every client is measured the same way from outside: wall time and the user+sys CPU seconds of
  its process (``os.wait4`` gives the rusage of exactly that child). Python clients additionally
  report their own download-phase time and CPU (interpreter start-up and imports excluded), so a
  1.5 s ``import astropy`` does not count as per-file overhead.

After each run the benchmark checks the result: every file's SHA-256 against the simulator's
truth (``GET /_sim/truth?uri=``). A fast tool that writes wrong bytes is not fast.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import requests

log = logging.getLogger("bulkfetch.bench")

#: Prefix of the one stdout line in which a worker subprocess reports its own measurements.
RESULT_MARKER = "BENCH_RESULT "

MB = 1_000_000
GB = 1_000_000_000


# -- the product list ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Product:
    """One file every tool downloads: the same URL and the same relative path for all of them."""

    uri: str
    url: str
    relpath: str  # astroquery's layout, relative to the tool's download dir
    size: int
    obs_collection: str
    obs_id: str
    filename: str
    sector: int | None
    kind: str

    def to_json(self) -> dict[str, Any]:
        """Plain dict, for the spec file handed to worker subprocesses."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Product:
        """Inverse of :meth:`to_json`."""
        return cls(**data)


def select_lc_products(server: str, n: int, sectors: Sequence[int]) -> list[Product]:
    """Pick ``n`` light curves from the simulator's catalog the way a user would.

    Uses unmodified astroquery (``query_criteria`` per sector, ``get_product_list``,
    ``filter_products(productSubGroupDescription='LC')``) against the simulator, so the benchmark
    also exercises the path real users take to obtain their product list. Sectors are taken in
    order until ``n`` files are found; the result is sorted by dataURI within a sector, so every
    run of the benchmark with the same knobs downloads the same files.
    """
    from astroquery.mast import Observations

    from bulkfetch.layout import relative_path
    from bulkfetch.sources import download_url, point_astroquery_at

    point_astroquery_at(server)
    picked: list[Product] = []
    for sector in sectors:
        if len(picked) >= n:
            break
        obs = Observations.query_criteria(
            obs_collection="TESS", dataproduct_type="timeseries", sequence_number=sector
        )
        if len(obs) == 0:
            continue
        products = Observations.get_product_list(obs)
        lcs = Observations.filter_products(products, productSubGroupDescription="LC")
        rows = sorted(lcs, key=lambda r: str(r["dataURI"]))
        for row in rows:
            if len(picked) >= n:
                break
            uri = str(row["dataURI"])
            collection, obs_id, name = (
                str(row["obs_collection"]),
                str(row["obs_id"]),
                str(row["productFilename"]),
            )
            picked.append(
                Product(
                    uri=uri,
                    url=download_url(server, uri),
                    relpath=relative_path(collection, obs_id, name, flat=False),
                    size=int(row["size"]),
                    obs_collection=collection,
                    obs_id=obs_id,
                    filename=name,
                    sector=sector,
                    kind=str(row["productSubGroupDescription"]),
                )
            )
    if len(picked) < n:
        raise RuntimeError(
            f"the simulator's catalog holds only {len(picked)} LC products in sectors "
            f"{list(sectors)}; ask for more targets per sector"
        )
    return picked


# -- the simulator as a subprocess ---------------------------------------------------------------


def knob_flags(knobs: dict[str, Any]) -> list[str]:
    """Turn ``SimConfig`` field names into the simulator CLI's flags (``conn_bandwidth`` ->
    ``--conn-bandwidth``); ``None`` means "leave the default", ``True`` is a bare flag."""
    flags: list[str] = []
    for key, value in knobs.items():
        if value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            flags.append(flag)
        else:
            flags += [flag, str(value)]
    return flags


class SimProcess:
    """``python -m bulkfetch.testing.mast --port 0 [knobs]`` in its own process group.

    The simulator prints its base URL on one line when ready; we read that line (with a
    timeout, so a broken simulator fails the benchmark instead of hanging it) and keep draining
    stdout in a thread so a chatty server can never block on a full pipe. Its stderr (logs) goes
    to ``log_path`` for post-mortems.
    """

    def __init__(
        self, knobs: dict[str, Any], *, log_path: Path | None = None, startup_timeout: float = 60.0
    ) -> None:
        self.knobs = dict(knobs)
        self.log_path = log_path
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""
        self._session_obj: requests.Session | None = None

    def __enter__(self) -> SimProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def command(self) -> list[str]:
        """The exact command line, for the report."""
        return [sys.executable, "-m", "bulkfetch.testing.mast", "--port", "0"] + knob_flags(
            self.knobs
        )

    def start(self) -> str:
        """Start the process and return its base URL once it serves."""
        stderr = open(self.log_path, "w") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            self.command,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            start_new_session=True,  # our SIGINT must not reach it before we stop it cleanly
        )
        if stderr is not subprocess.DEVNULL:
            stderr.close()
        lines: queue.Queue[str | None] = queue.Queue()

        def drain(stream: Any) -> None:
            for line in stream:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=drain, args=(self.proc.stdout,), daemon=True).start()
        deadline = time.monotonic() + self.startup_timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                line = lines.get(timeout=max(remaining, 0.01))
            except queue.Empty:
                self.stop()
                raise RuntimeError(
                    f"simulator printed no URL within {self.startup_timeout:.0f} s"
                ) from None
            if line is None:
                code = self.proc.wait()
                raise RuntimeError(
                    f"simulator exited with status {code} before serving:\n{self._log_tail()}"
                )
            line = line.strip()
            if line.startswith("http://") or line.startswith("https://"):
                self.url = line.rstrip("/")
                log.info("simulator at %s (%s)", self.url, " ".join(knob_flags(self.knobs)))
                return self.url

    def cpu_seconds(self) -> float | None:
        """User + system CPU seconds the simulator has used so far (Linux ``/proc``; None
        elsewhere). Server and client share the machine's cores, so the server's cost per file
        is needed to read the client's files/s."""
        if self.proc is None:
            return None
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        ticks = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) / ticks  # utime, stime (fields 14 and 15)

    def _log_tail(self, chars: int = 3000) -> str:
        """The end of the simulator's stderr, for an error message that explains itself."""
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not go within a few seconds."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    # -- introspection (not part of MAST) --------------------------------------------------------

    @property
    def _session(self) -> requests.Session:
        # requests is imported lazily: worker subprocesses import this module and never need it.
        if self._session_obj is None:
            import requests

            self._session_obj = requests.Session()
        return self._session_obj

    def stats(self) -> dict[str, Any]:
        """Counters since the last reset: peak connections, status counts, bytes served ..."""
        resp = self._session.get(self.url + "/_sim/stats", timeout=60)
        resp.raise_for_status()
        return resp.json()

    def reset_stats(self) -> None:
        """Zero the counters so each tool's run is reported on its own."""
        self._session.post(self.url + "/_sim/reset", timeout=60).raise_for_status()

    def configure(self, **knobs: Any) -> None:
        """Change realism knobs of the running server (latency, bandwidth, cap ...)."""
        resp = self._session.post(self.url + "/_sim/config", json=knobs, timeout=60)
        resp.raise_for_status()
        applied = resp.json()
        wrong = {k: applied.get(k) for k, v in knobs.items() if applied.get(k) != v}
        if wrong:  # a scenario must never run against knobs other than those it reports
            raise RuntimeError(f"simulator did not take knobs {knobs}: it has {wrong}")
        self.knobs.update(knobs)

    def truths(self, uris: Iterable[str], workers: int = 8) -> dict[str, str]:
        """SHA-256 the simulator will serve for each uri, asked over HTTP in parallel."""
        local = threading.local()

        def one(uri: str) -> tuple[str, str]:
            session = getattr(local, "session", None)
            if session is None:
                import requests

                session = local.session = requests.Session()
            resp = session.get(self.url + "/_sim/truth", params={"uri": uri}, timeout=60)
            resp.raise_for_status()
            return uri, str(resp.json()["sha256"])

        with ThreadPoolExecutor(workers) as pool:
            return dict(pool.map(one, list(uris)))


class ActiveSampler:
    """Polls ``/_sim/stats`` in a thread to see how many downloads are in flight over time.

    The peak counter says a client never exceeded the cap; the time-weighted MEAN of in-flight
    downloads says whether it kept the archive busy, which is what throughput under a cap
    depends on (an AIMD limit that halves too far shows up here, not in the peak).
    """

    def __init__(self, sim: SimProcess, interval: float = 0.2) -> None:
        self.sim = sim
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop polling (harmless if never started)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        import requests

        session = requests.Session()
        while not self._stop.is_set():
            try:
                stats = session.get(self.sim.url + "/_sim/stats", timeout=10).json()
            except (requests.RequestException, ValueError):
                stats = None
            if stats is not None:
                self.samples.append((time.monotonic(), int(stats.get("active_connections", 0))))
            self._stop.wait(self.interval)

    def mean_active(self, skip_idle: bool = True) -> float | None:
        """Mean of the samples; leading and trailing idle samples (client start-up, checks)
        are left out so the figure describes the transfer itself."""
        values = [v for _, v in self.samples]
        if skip_idle:
            while values and values[0] == 0:
                values.pop(0)
            while values and values[-1] == 0:
                values.pop()
        return sum(values) / len(values) if values else None


def status_count(stats: dict[str, Any], code: int) -> int:
    """How many download responses had ``code`` (JSON turns the int keys into strings)."""
    counts = stats.get("status_counts") or {}
    return int(counts.get(str(code), counts.get(code, 0)) or 0)  # type: ignore[call-overload]


# -- running and measuring a client --------------------------------------------------------------


@dataclass
class ClientRun:
    """What one client subprocess did: exit status, wall time, CPU, and its own report."""

    command: list[str]
    returncode: int
    wall: float  # seconds, whole process
    cpu_user: float  # whole process (and children it waited for)
    cpu_sys: float
    report: dict[str, Any] | None  # the worker's BENCH_RESULT line, if any
    stdout_tail: str
    stderr_tail: str

    @property
    def cpu(self) -> float:
        """User + system CPU seconds of the whole process."""
        return self.cpu_user + self.cpu_sys


def run_client(
    command: Sequence[str], *, log_dir: Path, name: str, timeout: float = 3600.0
) -> ClientRun:
    """Run ``command`` to completion and measure it from outside.

    ``os.wait4`` returns the rusage of exactly this child (and what it reaped), which is immune
    to whatever else the benchmark process does meanwhile. Output goes to files in ``log_dir``
    rather than pipes: a client writing a lot (aria2c's progress, tqdm) must never block on us.
    A client exceeding ``timeout`` is killed with its whole process group.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    out_path, err_path = log_dir / f"{name}.out", log_dir / f"{name}.err"
    with open(out_path, "w") as out, open(err_path, "w") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(
            list(command), stdout=out, stderr=err, stdin=subprocess.DEVNULL, start_new_session=True
        )

        def kill() -> None:
            log.error("%s exceeded %.0f s; killing it", name, timeout)
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        timer = threading.Timer(timeout, kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    stdout = out_path.read_text(errors="replace")
    stderr = err_path.read_text(errors="replace")
    report = None
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            report = json.loads(line[len(RESULT_MARKER) :])
            break
    return ClientRun(
        command=list(command),
        returncode=proc.returncode,
        wall=wall,
        cpu_user=usage.ru_utime,
        cpu_sys=usage.ru_stime,
        report=report,
        stdout_tail=stdout[-2000:],
        stderr_tail=stderr[-2000:],
    )


@dataclass
class PhaseMeter:
    """Wall and CPU seconds of a phase inside a worker process (self + reaped children).

    Children matter: an engine may hash in a process pool, and that CPU is the engine's too.
    """

    wall: float = 0.0
    cpu: float = 0.0
    _t0: float = field(default=0.0, repr=False)
    _c0: float = field(default=0.0, repr=False)

    @staticmethod
    def _cpu_now() -> float:
        import resource

        me = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime

    def __enter__(self) -> PhaseMeter:
        self._t0, self._c0 = time.perf_counter(), self._cpu_now()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self._t0
        self.cpu = self._cpu_now() - self._c0


def emit_report(report: dict[str, Any]) -> None:
    """Hand a worker's measurements to the parent: one marked JSON line on stdout."""
    sys.stdout.write(RESULT_MARKER + json.dumps(report) + "\n")
    sys.stdout.flush()


# -- checking the result -------------------------------------------------------------------------


@dataclass
class TreeCheck:
    """How many of the expected files are present with the right bytes."""

    ok: int
    wrong: int
    missing: int
    ok_bytes: int = 0  # sizes of the correct files: what a throughput may count

    @property
    def total(self) -> int:
        return self.ok + self.wrong + self.missing


def sha256_file(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB chunks (hashlib releases the GIL on big buffers)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def check_tree(
    root: Path, products: Sequence[Product], truth: dict[str, str], workers: int = 2
) -> TreeCheck:
    """Compare every expected file under ``root`` with the simulator's truth."""

    def one(product: Product) -> str:
        path = root / product.relpath
        if not path.is_file():
            return "missing"
        return "ok" if sha256_file(path) == truth[product.uri] else "wrong"

    with ThreadPoolExecutor(workers) as pool:
        outcomes = list(pool.map(one, products))
    return TreeCheck(
        ok=outcomes.count("ok"),
        wrong=outcomes.count("wrong"),
        missing=outcomes.count("missing"),
        ok_bytes=sum(p.size for p, o in zip(products, outcomes, strict=True) if o == "ok"),
    )


# -- presenting ----------------------------------------------------------------------------------


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub-flavoured Markdown table; numbers right-aligned, text left-aligned."""
    body = [[str(cell) for cell in row] for row in rows]
    numeric = [
        all(_looks_numeric(row[i]) for row in body) if body else False for i in range(len(headers))
    ]
    widths = [max([len(h)] + [len(row[i]) for row in body]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        parts = [
            c.rjust(w) if num else c.ljust(w)
            for c, w, num in zip(cells, widths, numeric, strict=True)
        ]
        return "| " + " | ".join(parts) + " |"

    rule = "|" + "|".join(
        ("-" * (w + 1) + ":") if num else ("-" * (w + 2))
        for w, num in zip(widths, numeric, strict=True)
    )
    return "\n".join([line(list(headers)), rule + "|"] + [line(row) for row in body])


def _looks_numeric(text: str) -> bool:
    stripped = text.rstrip("x%").replace(",", "")
    try:
        float(stripped)
    except ValueError:
        return text in ("-", "n/a")
    return True


def fmt(value: float | None, digits: int = 1) -> str:
    """A number for a table: fixed digits, ``-`` when not measured."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def ratio(num: float | None, den: float | None) -> float | None:
    """``num / den``, or None when either is missing or the denominator is zero."""
    if num is None or den is None or den == 0:
        return None
    return num / den
