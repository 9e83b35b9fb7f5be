"""Command line: argument parsing and exit codes only; every command is a thin call into ``api``.

Exit codes: 0 everything asked for is complete; 1 some files ended in error (named in the
manifest) or another bulkfetch error; 2 usage error; 130 interrupted by SIGINT, 143 by SIGTERM.
Errors are one clear line on stderr; ``--debug`` adds the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import fields
from typing import Any

from . import __version__
from .errors import BulkfetchError, UsageError
from .progress import is_terminal
from .sources import BATCH_SIZE, DEFAULT_MAST_URL, MAX_BATCH_SIZE, PLAN_WORKERS

log = logging.getLogger("bulkfetch")

EXIT_OK = 0
EXIT_ERRORS = 1
EXIT_USAGE = 2
EXIT_SIGINT = 130
EXIT_SIGTERM = 143

#: Shape of the archive ``--simulate`` serves when no ``--sim-*`` knob is given: small enough to
#: download in seconds, big enough to show concurrency, retries and the manifest.
SIM_DEFAULTS = {"sectors": 4, "targets": 20, "scale": 0.05, "seed": 0}
#: Meta key remembering the simulated archive of a job, so a rerun serves the same one.
META_SIMULATE = "simulate"


class Interrupted(BaseException):
    """Raised by the SIGTERM handler outside the engine, so cleanup runs and we exit 143."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


# -- argument types -----------------------------------------------------------------------------


def parse_rate(text: str) -> float:
    """``50M`` -> bytes/s, with the engine's own parser (binary suffixes, as curl's)."""
    from .fetch import parse_rate as engine_parse_rate

    try:
        return engine_parse_rate(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _batch_size(text: str) -> int:
    """``--batch-size``: refused here, before a job directory is touched, when out of range."""
    value = _positive_int(text)
    if value > MAX_BATCH_SIZE:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_BATCH_SIZE}, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return value


# -- parser -------------------------------------------------------------------------------------


def _fetch_defaults() -> dict[str, Any]:
    """The engine's defaults, shown in ``--help`` so the help never disagrees with the code."""
    try:
        from .fetch import FetchOptions
    except ImportError:  # pragma: no cover - the engine is part of the package
        return {}
    defaults = FetchOptions()
    return {f.name: getattr(defaults, f.name) for f in fields(defaults)}


def _fmt_default(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks (examples) and widens the option column."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=34, width=100)


def _add_plan_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("plan options (what to download)")
    g.add_argument(
        "--mast-url",
        metavar="URL",
        help=f"archive to query and download from (default: {DEFAULT_MAST_URL})",
    )
    g.add_argument(
        "--sectors",
        metavar="SPEC",
        help="sectors like 1-5,7,1751 (default: every sector the archive has, discovered)",
    )
    g.add_argument(
        "--targets", metavar="TICS", help="TIC IDs, comma separated (default: all targets)"
    )
    g.add_argument(
        "--targets-file",
        metavar="FILE",
        help="TIC IDs from a file, one or more per line, # comments (default: none)",
    )
    g.add_argument(
        "--products",
        metavar="KINDS",
        default="lc",
        help="product kinds: lc, tp, fast-lc, fast-tp, dv, dvt, dvr, dvs, dvm, comma separated "
        "(default: lc)",
    )
    g.add_argument(
        "--latest-dv-only",
        action="store_true",
        help="of the multi-sector DV products keep only each target's latest run (default: off)",
    )
    g.add_argument(
        "--criteria",
        metavar="K=V",
        action="append",
        default=[],
        help="extra query_criteria on observation columns, repeatable; a,b = either; "
        "lo..hi = numeric range (default: none; see 'bulkfetch columns')",
    )
    g.add_argument(
        "--filter",
        metavar="K=V",
        action="append",
        default=[],
        dest="filters",
        help="filter_products on product columns, repeatable, astroquery syntax "
        "(a,b  !x  >=n  a..b) (default: none)",
    )
    g.add_argument(
        "--from-table",
        metavar="FILE",
        help="plan the products of a table file (ECSV, VOTable, FITS, CSV) instead of querying "
        "(default: query the archive)",
    )
    g.add_argument(
        "--from-curl-script",
        metavar="FILE",
        nargs="+",
        help="plan the files of MAST bulk download scripts (tesscurl_*.sh) instead of querying "
        "(default: query the archive)",
    )
    g.add_argument(
        "--flat",
        action="store_true",
        help="put every file directly in DIR, not DIR/mastDownload/TESS/<obs_id>/ "
        "(default: off, astroquery's layout)",
    )
    g.add_argument(
        "--export",
        metavar="FILE",
        help="also write the planned products to FILE (ECSV for .ecsv, else CSV) (default: none)",
    )
    g.add_argument(
        "--rediscover",
        action="store_true",
        help="ask the archive which sectors exist even if this job learnt it in the last 24 h "
        "(only without --sectors; default: off)",
    )
    g.add_argument(
        "--dry-run",
        action="store_true",
        help="query and report files and bytes per sector, but plan nothing (default: off)",
    )
    g.add_argument(
        "--plan-workers",
        type=_positive_int,
        default=PLAN_WORKERS,
        metavar="N",
        help=f"concurrent astroquery calls while planning (default: {PLAN_WORKERS})",
    )
    g.add_argument(
        "--batch-size",
        type=_batch_size,
        default=BATCH_SIZE,
        metavar="N",
        help=f"obsids per get_product_list call, at most {MAX_BATCH_SIZE} (default: {BATCH_SIZE})",
    )
    g.add_argument(
        "--query-retries",
        type=_non_negative_int,
        default=4,
        metavar="N",
        help="retries of a failed astroquery call, with backoff (default: 4)",
    )


def _add_fetch_options(p: argparse.ArgumentParser) -> None:
    d = _fetch_defaults()
    g = p.add_argument_group("fetch options (how to download)")
    g.add_argument(
        "--concurrency",
        type=_positive_int,
        metavar="N",
        help=f"simultaneous downloads at most (default: {_fmt_default(d.get('concurrency'))})",
    )
    g.add_argument(
        "--per-host",
        type=_positive_int,
        metavar="N",
        help=f"connections per host at most (default: {_fmt_default(d.get('per_host'))})",
    )
    g.add_argument(
        "--retries",
        type=_non_negative_int,
        metavar="N",
        help=f"retries of a failed file before it is an error "
        f"(default: {_fmt_default(d.get('retries'))})",
    )
    g.add_argument(
        "--timeout",
        type=_positive_float,
        metavar="S",
        help=f"seconds to connect and get response headers "
        f"(default: {_fmt_default(d.get('timeout'))})",
    )
    g.add_argument(
        "--stall-timeout",
        type=_positive_float,
        metavar="S",
        help=f"seconds without a byte before a download is retried "
        f"(default: {_fmt_default(d.get('stall_timeout'))})",
    )
    g.add_argument(
        "--max-rate",
        type=parse_rate,
        metavar="RATE",
        help="total download rate cap in bytes/s, e.g. 50M, 800k, 1.5G (k = 1024, as curl) "
        f"(default: {_fmt_default(d.get('max_rate'))} = unlimited)",
    )
    g.add_argument(
        "--verify",
        choices=("size", "sha256", "fits"),
        help="check of each downloaded file: size; size+SHA-256; size+SHA-256+FITS "
        f"CHECKSUM (default: {_fmt_default(d.get('verify'))})",
    )
    g.add_argument(
        "--no-adaptive",
        action="store_true",
        help="keep concurrency fixed instead of backing off when the archive is overloaded "
        f"(default: adaptive {_fmt_default(d.get('adaptive', True))})",
    )
    g.add_argument(
        "--insecure",
        action="store_true",
        help="do NOT verify the archive's TLS certificate (unsafe: anyone on the way can "
        "swap the files); prints a warning (default: verify)",
    )
    g.add_argument(
        "--skip-errors",
        action="store_true",
        help="do not retry products that ended in error in an earlier run (default: retry them)",
    )
    g.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar or progress lines (default: a bar on a terminal, "
        "a line every 10 s otherwise)",
    )
    g.add_argument(
        "--progress-interval",
        type=_positive_float,
        default=10.0,
        metavar="S",
        help="seconds between progress lines when output is not a terminal (default: 10)",
    )


def _add_simulate_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("offline simulation")
    g.add_argument(
        "--simulate",
        action="store_true",
        help="start the bundled SIMULATED MAST archive on 127.0.0.1 and run against it; "
        "the files are synthetic, not real TESS data (default: off)",
    )
    g.add_argument(
        "--sim-sectors",
        type=_positive_int,
        metavar="N",
        help=f"sectors in the simulated archive (default: {SIM_DEFAULTS['sectors']})",
    )
    g.add_argument(
        "--sim-targets",
        type=_positive_int,
        metavar="N",
        help=f"2-min targets per simulated sector (default: {SIM_DEFAULTS['targets']})",
    )
    g.add_argument(
        "--sim-scale",
        type=_positive_float,
        metavar="X",
        help="file size factor of the simulated archive, 1.0 = realistic (~2 MB per LC) "
        f"(default: {SIM_DEFAULTS['scale']})",
    )
    g.add_argument(
        "--sim-seed",
        type=int,
        metavar="N",
        help=f"seed of the simulated archive (default: {SIM_DEFAULTS['seed']})",
    )


def _add_output_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    g.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="only warnings, errors and the final summary line (default: info and progress)",
    )
    g.add_argument(
        "--debug",
        action="store_true",
        help="debug logging and tracebacks on errors (default: off)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subparser per command."""
    parser = argparse.ArgumentParser(
        prog="bulkfetch",
        formatter_class=_Formatter,
        description=(
            "Download whole TESS data sets from MAST: fast (concurrent), correct (verified) "
            "and resumable.\n\n"
            "examples:\n"
            "  bulkfetch tess tess-lc                      # every 2-min light curve, all sectors\n"
            "  bulkfetch tess tess-lc --sectors 1-3 --products lc,tp --concurrency 32\n"
            "  bulkfetch tess demo --simulate              # offline, against a simulated archive\n"
            "  bulkfetch status tess-lc                    # progress of a running/finished job\n"
            "  bulkfetch verify tess-lc && bulkfetch fetch tess-lc   # re-check, then repair\n\n"
            "exit codes: 0 complete, 1 some files in error (see DIR/manifest.csv), "
            "2 usage error, 130/143 interrupted (rerun to resume)"
        ),
    )
    parser.add_argument("--version", action="version", version=f"bulkfetch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, help_text: str, description: str) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name, help=help_text, description=description, formatter_class=_Formatter
        )
        return p

    p = command(
        "tess",
        "the main job: plan, fetch and write the manifest, in one command",
        "Plan the selected TESS products into DIR, download them all, write DIR/manifest.csv "
        "and .ecsv.\nRunning the same command again resumes: planned sectors are not queried "
        "again, complete files are not downloaded again.",
    )
    p.add_argument("directory", metavar="DIR", help="download directory (created if missing)")
    _add_plan_options(p)
    _add_fetch_options(p)
    _add_simulate_options(p)
    _add_output_options(p)

    p = command(
        "plan",
        "add products to a job without downloading",
        "Query the archive (or read a table / curl scripts) and add the products to the job "
        "state in DIR.\nIdempotent: planning again adds only what is new.",
    )
    p.add_argument("directory", metavar="DIR", help="download directory (created if missing)")
    _add_plan_options(p)
    _add_simulate_options(p)
    _add_output_options(p)

    p = command(
        "fetch",
        "download every pending product of a planned job",
        "Download the pending products of the job in DIR, then write the manifest.\n"
        "Interrupt with Ctrl-C (or SIGTERM) at any time; rerun to resume.",
    )
    p.add_argument("directory", metavar="DIR", help="a directory planned before")
    _add_fetch_options(p)
    _add_simulate_options(p)
    _add_output_options(p)

    p = command(
        "status",
        "counts, bytes, running state and errors of a job",
        "Counts by status, bytes done and total, the effective concurrency of a running "
        "fetch, errors grouped by message.",
    )
    p.add_argument("directory", metavar="DIR")
    p.add_argument("--json", action="store_true", help="machine-readable output (default: text)")
    p.add_argument(
        "--errors",
        type=_positive_int,
        default=20,
        metavar="N",
        help="error groups to show at most (default: 20)",
    )
    _add_output_options(p)

    p = command(
        "verify",
        "re-check every complete file; damaged ones go back to pending",
        "Re-check every COMPLETE file against the job state. Damaged or missing files are "
        "deleted and\nreturned to pending, so the next 'bulkfetch fetch DIR' repairs them. "
        "Exit 1 when any was found.",
    )
    p.add_argument("directory", metavar="DIR")
    p.add_argument(
        "--level",
        choices=("size", "sha256", "full"),
        default="full",
        help="size only; size+SHA-256; size+SHA-256+FITS CHECKSUM/DATASUM (default: full)",
    )
    p.add_argument(
        "--workers",
        type=_positive_int,
        default=2,
        metavar="N",
        help="files checked at once (default: 2)",
    )
    _add_output_options(p)

    p = command(
        "manifest",
        "write the manifest of a job",
        "Write DIR/manifest.csv and DIR/manifest.ecsv (or FILE) from the job state: "
        "astroquery's\nLocal Path, Status, Message, URL first, then dataURI, obs_id, size, "
        "sha256, attempts, finished.",
    )
    p.add_argument("directory", metavar="DIR")
    p.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        help="write only FILE (ECSV for .ecsv, else CSV) (default: both files in DIR)",
    )
    _add_output_options(p)

    p = command(
        "columns",
        "list the column names --criteria and --filter accept",
        "List the observation columns (for --criteria) and product columns (for --filter) "
        "the archive knows.",
    )
    p.add_argument(
        "--mast-url",
        metavar="URL",
        help=f"archive to ask (default: {DEFAULT_MAST_URL})",
    )
    _add_simulate_options(p)
    _add_output_options(p)
    return parser


# -- helpers ------------------------------------------------------------------------------------


def _setup_logging(args: argparse.Namespace) -> Callable[[], None]:
    """Log ``bulkfetch`` messages to stderr at the level the flags ask for.

    Returns a function that puts the logger back as it was, so calling :func:`main` from
    Python (tests, a wrapper script) leaves that program's logging alone afterwards.
    """
    level = logging.DEBUG if args.debug else logging.WARNING if args.quiet else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[bulkfetch] %(levelname)s: %(message)s"))
    logger = logging.getLogger("bulkfetch")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False

    def restore() -> None:
        logger.handlers[:] = saved[0]
        logger.setLevel(saved[1])
        logger.propagate = saved[2]

    return restore


def _quiet_astroquery(args: argparse.Namespace) -> None:
    """Silence astroquery's INFO chatter ("N of M products were duplicates"): noise at our
    scale. Its logger is astropy's own class, created when astroquery is imported, so this
    runs just before planning rather than at start-up (a plain ``getLogger`` would break it).
    """
    from astroquery import log as aq_log

    aq_log.setLevel("DEBUG" if args.debug else "WARNING")


def _out(text: str) -> None:
    """A result line on stdout (summaries, status, columns)."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _note(text: str) -> None:
    """A notice on stderr (simulation banner)."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def _selection(args: argparse.Namespace) -> Any:
    """The plan's Selection from the plan options."""
    from .plan import (
        Selection,
        parse_key_values,
        parse_kinds,
        parse_sectors,
        parse_targets,
        read_targets_file,
    )

    targets: list[str] | None = None
    if args.targets:
        targets = parse_targets(args.targets)
    if args.targets_file:
        more = read_targets_file(args.targets_file)
        targets = list(dict.fromkeys((targets or []) + more))
    return Selection(
        sectors=parse_sectors(args.sectors) if args.sectors else None,
        targets=targets,
        kinds=parse_kinds(args.products),
        criteria=parse_key_values(args.criteria, what="criterion"),
        filters=parse_key_values(args.filters, what="filter"),
        latest_dv_only=args.latest_dv_only,
        flat=args.flat,
    )


def _fetch_options(args: argparse.Namespace) -> Any:
    """FetchOptions from the fetch options; unset ones keep the engine's defaults."""
    from .fetch import FetchOptions

    known = {f.name for f in fields(FetchOptions)}
    given: dict[str, Any] = {}
    for name in ("concurrency", "per_host", "retries", "timeout", "stall_timeout", "max_rate"):
        value = getattr(args, name, None)
        if value is not None and name in known:
            given[name] = value
    if getattr(args, "verify", None) and "verify" in known:
        given["verify"] = args.verify
    if getattr(args, "no_adaptive", False) and "adaptive" in known:
        given["adaptive"] = False
    if getattr(args, "insecure", False):
        given["ssl_verify"] = False
        _note(
            "WARNING: --insecure: TLS certificates are NOT verified; a man in the middle can "
            "replace the files (the MAST token is still never sent without verification)"
        )
    options = FetchOptions(**given)
    try:
        options.validate()
    except (ValueError, TypeError) as exc:
        raise UsageError(str(exc)) from None
    return options


def _progress_mode(args: argparse.Namespace) -> Any:
    from .progress import make_progress

    if args.quiet or args.no_progress:
        return make_progress("none")
    return make_progress("auto", interval=args.progress_interval)


@contextmanager
def _server(args: argparse.Namespace, directory: str | None) -> Iterator[str | None]:
    """The archive URL to use: ``--mast-url``, a started simulator, or None (job's/default).

    With ``--simulate`` the simulated archive runs in this process for the duration of the
    command. Its shape and port are remembered in the job, so rerunning the command serves the
    same archive at the same URL - the URLs already planned stay valid and the job resumes.
    """
    mast_url = getattr(args, "mast_url", None)
    if not getattr(args, "simulate", False):
        for knob in ("sim_sectors", "sim_targets", "sim_scale", "sim_seed"):
            if getattr(args, knob, None) is not None:
                raise UsageError(f"--{knob.replace('_', '-')} needs --simulate")
        yield mast_url
        return
    if mast_url:
        raise UsageError("--simulate and --mast-url exclude each other")
    from .testing.mast import MastSimulator

    saved: dict[str, Any] = {}
    store = None
    if directory is not None:
        from .store import db_path, open_store

        if db_path(directory).exists():
            store = open_store(directory, create=False)
            saved = json.loads(store.get_meta(META_SIMULATE) or "{}")
            if not saved and store.total()[0]:
                store.close()
                raise UsageError(
                    f"{directory} holds a job planned against a real archive; --simulate "
                    "needs a directory of its own"
                )
    shape = {k: saved.get(k, v) for k, v in SIM_DEFAULTS.items()}
    for key in SIM_DEFAULTS:
        value = getattr(args, f"sim_{key}", None)
        if value is not None:
            if saved and saved.get(key) != value:
                raise UsageError(
                    f"{directory} was planned against a simulated archive with "
                    f"--sim-{key} {saved.get(key)}; use a new directory for a different archive"
                )
            shape[key] = value
    port = int(saved.get("port", 0))
    sim = MastSimulator(
        n_sectors=shape["sectors"],
        targets_per_sector=shape["targets"],
        scale=shape["scale"],
        seed=shape["seed"],
        port=port,
    )
    try:
        sim.start()
    except OSError as exc:
        raise UsageError(
            f"cannot serve the simulated archive of {directory} on port {port} again "
            f"({exc.strerror or exc}); free that port or use a new directory"
        ) from None
    try:
        _note(
            f"NOTE: --simulate: using a SIMULATED MAST archive at {sim.url} "
            f"({shape['sectors']} sectors x {shape['targets']} targets, scale {shape['scale']}). "
            "The files are synthetic test data, NOT real TESS observations."
        )
        if directory is not None:
            if store is None:
                from .store import open_store

                os.makedirs(directory, exist_ok=True)
                store = open_store(directory)
            shape["port"] = int(sim.url.rsplit(":", 1)[1])
            store.set_meta(META_SIMULATE, json.dumps(shape))
            store.close()
            store = None
        yield sim.url
    finally:
        if store is not None:
            store.close()
        sim.stop()


# -- commands -----------------------------------------------------------------------------------


def _do_plan(args: argparse.Namespace, job: Any) -> int:
    """Run the plan step of ``plan``/``tess``; print the summary; return an exit code."""
    sources = sum(bool(x) for x in (args.from_table, args.from_curl_script))
    if sources > 1:
        raise UsageError("--from-table and --from-curl-script exclude each other")
    if sources and (args.sectors or args.targets or args.targets_file or args.criteria):
        raise UsageError(
            "--sectors/--targets/--criteria select what to query; they do not apply to "
            "--from-table or --from-curl-script"
        )
    _quiet_astroquery(args)
    options = {
        "workers": args.plan_workers,
        "batch_size": args.batch_size,
        "retries": args.query_retries,
    }
    if args.rediscover:
        options["discovery_max_age"] = 0.0
    if args.from_table:
        table = _checked_table(args.from_table, job, flat=args.flat)
        summary = job.plan(table=table, flat=args.flat, dry_run=args.dry_run)
    elif args.from_curl_script:
        summary = job.plan(curl_scripts=args.from_curl_script, flat=args.flat, dry_run=args.dry_run)
    else:
        summary = job.plan(
            _selection(args),
            dry_run=args.dry_run,
            # the planner's per-sector bar only on a terminal; its log lines otherwise
            progress=not (args.quiet or getattr(args, "no_progress", False))
            and is_terminal(sys.stderr),
            **options,
        )
    if not args.quiet or args.dry_run:
        _out(summary.format())
    if args.export and not args.dry_run:
        from .plan import export_plan

        rows = export_plan(job.store, args.export)
        _out(f"exported {rows} planned products to {args.export}")
    refused = int(getattr(summary, "refused", 0) or 0)
    if refused and not args.dry_run:
        # The catalog named files we will not write (outside DIR, or clashing): the job
        # cannot be complete, so the command must not end with 0.
        _note(
            f"bulkfetch: {refused} product(s) refused: their catalog path would leave "
            f"{job.directory} or clash with another product; they are not downloaded "
            "(see the warnings above)"
        )
        return EXIT_ERRORS
    return EXIT_OK


def _checked_table(path: str, job: Any, *, flat: bool) -> Any:
    """The product table of ``--from-table``, refused as a whole if any row is unusable.

    A table is the user's own input: better one clear error and nothing planned than a job
    that silently lacks rows. Refused: no rows, no ``size`` column (nothing to check the
    downloads against), a dataURI that is not MAST's, and every row the planner refuses
    (a path that would leave DIR, two products on one file name).
    """
    from .plan import read_table

    table = read_table(path)
    if len(table) == 0:
        raise UsageError(f"the product table {path} has no rows: nothing to download")
    if "size" not in table.colnames:
        raise UsageError(
            f"the product table {path} lacks the column size, needed to verify the downloads "
            "(a table from astroquery's get_product_list has it)"
        )
    if "dataURI" in table.colnames:
        for i, uri in enumerate(table["dataURI"]):
            if not str(uri).startswith("mast:"):
                raise UsageError(
                    f"the product table {path}, row {i + 1}: dataURI {str(uri)!r} is not a MAST "
                    "data URI (mast:...); nothing was planned"
                )
    probe = job.plan(table=table, flat=flat, dry_run=True)
    if probe.refused:
        raise UsageError(
            f"the product table {path}: {probe.refused} row(s) refused, e.g. "
            f"{probe.refused_examples[0]}; fix the table and rerun (nothing was planned)"
        )
    return table


def _signal_exit(result: Any) -> int | None:
    """130/143 when the engine stopped on a signal, else None."""
    sig = getattr(result, "interrupted_by", None)
    if not sig:
        return None
    if isinstance(sig, str):
        name = sig.upper() if sig.upper().startswith("SIG") else f"SIG{sig.upper()}"
        num = getattr(signal, name, None)
        sig = int(num) if num is not None else int(signal.SIGINT)
    return 128 + int(sig)


def _do_fetch(args: argparse.Namespace, job: Any) -> int:
    """Run the fetch step of ``fetch``/``tess``, print one summary line, return the exit code."""
    options = _fetch_options(args)
    result = job.fetch(options, progress=_progress_mode(args), retry_errors=not args.skip_errors)
    if threading_is_main():
        # The engine's loop put SIGTERM back to the default on exit; keep the clean 143 path.
        signal.signal(signal.SIGTERM, _on_sigterm)
    st = job.status()
    counts = st.manifest_counts()
    line = (
        f"{counts['COMPLETE']} complete, {counts['ERROR']} error, "
        f"{counts['SKIPPED']} not downloaded yet; manifest: "
        f"{os.path.join(job.directory, 'manifest.csv')}"
    )
    code = _signal_exit(result)
    if code is not None:
        _note(f"interrupted: {line}. Rerun the same command to resume.")
        return code
    _out(line)
    if counts["ERROR"]:
        for message, n in st.error_groups[:5]:
            _note(f"  {n} x {message}")
        return EXIT_ERRORS
    if counts["SKIPPED"]:
        return EXIT_ERRORS
    return EXIT_OK


def cmd_tess(args: argparse.Namespace) -> int:
    from .api import Job

    with _server(args, args.directory) as server, Job(args.directory, server=server) as job:
        planned = _do_plan(args, job)
        if args.dry_run:
            return EXIT_OK
        return max(planned, _do_fetch(args, job))


def cmd_plan(args: argparse.Namespace) -> int:
    from .api import Job

    with _server(args, args.directory) as server, Job(args.directory, server=server) as job:
        return _do_plan(args, job)


def cmd_fetch(args: argparse.Namespace) -> int:
    from .api import Job

    _require_job(args.directory)
    with (
        _server(args, args.directory) as server,
        Job(args.directory, server=server, create=False) as job,
    ):
        return _do_fetch(args, job)


def _require_job(directory: str) -> None:
    from .errors import StateError
    from .store import db_path

    if not db_path(directory).exists():
        raise StateError(f"no bulkfetch job in {directory}: run 'bulkfetch plan {directory}' first")


def cmd_status(args: argparse.Namespace) -> int:
    from .api import Job, status_json

    _require_job(args.directory)
    with Job(args.directory, create=False) as job:
        st = job.status(error_limit=args.errors)
    _out(status_json(st) if args.json else st.format())
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    from .api import Job

    _require_job(args.directory)
    with Job(args.directory, create=False) as job:
        report = job.verify(level=args.level, workers=args.workers)
    _out(report.format())
    return EXIT_OK if report.ok else EXIT_ERRORS


def cmd_manifest(args: argparse.Namespace) -> int:
    from .api import Job

    _require_job(args.directory)
    with Job(args.directory, create=False) as job:
        summary = job.manifest(args.output)
    counts = ", ".join(f"{n} {s}" for s, n in sorted(summary.statuses.items())) or "no rows"
    _out(f"manifest: {summary.rows} rows ({counts}) -> {', '.join(map(str, summary.paths))}")
    return EXIT_OK


def cmd_columns(args: argparse.Namespace) -> int:
    from .plan import column_names

    with _server(args, None) as server:
        observations, products = column_names(server or DEFAULT_MAST_URL)
    _out("observation columns (--criteria):")
    _out("  " + " ".join(observations))
    _out("product columns (--filter):")
    _out("  " + " ".join(products))
    return EXIT_OK


COMMANDS = {
    "tess": cmd_tess,
    "plan": cmd_plan,
    "fetch": cmd_fetch,
    "status": cmd_status,
    "verify": cmd_verify,
    "manifest": cmd_manifest,
    "columns": cmd_columns,
}


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Interrupted(signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``bulkfetch`` console script; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    restore_logging = _setup_logging(args)
    previous = None
    if threading_is_main():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return COMMANDS[args.command](args)
    except BulkfetchError as exc:
        if args.debug:
            traceback.print_exc()
        sys.stderr.write(f"bulkfetch: error: {exc}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("bulkfetch: interrupted; rerun the same command to resume\n")
        return EXIT_SIGINT
    except Interrupted as exc:
        sys.stderr.write("bulkfetch: terminated; rerun the same command to resume\n")
        return 128 + exc.signum
    except Exception as exc:  # one clear line, not a traceback, unless --debug
        if args.debug:
            traceback.print_exc()
        sys.stderr.write(
            f"bulkfetch: error: {type(exc).__name__}: {exc} (rerun with --debug for details)\n"
        )
        return EXIT_ERRORS
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        restore_logging()


def threading_is_main() -> bool:
    """Signal handlers can only be installed from the main thread (tests call main() too)."""
    import threading

    return threading.current_thread() is threading.main_thread()
