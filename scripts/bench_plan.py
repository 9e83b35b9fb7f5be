"""Plan benchmark: bulkfetch's planner against the plain sequential astroquery loop.

Issue 3 sets two targets; this script measures both against the simulated archive, which runs in
its own process (``python -m bulkfetch.testing.mast``) so it never shares our GIL:

``speed``  20 sectors, 500 ms per query call. The sequential loop a user writes
           (``query_criteria`` + ``get_product_list`` + ``filter_products`` per sector) versus
           ``bulkfetch.plan.plan`` on a fresh job; both must produce identical rows (dataURI,
           obs_id, file name, size), and the ratio of their wall times is reported.
``scale``  the whole simulated 2-min set (100 sectors x 20,000 targets: ~2,000,000 light
           curves) and its first 10 sectors (~200,000), each planned by a fresh subprocess into
           a fresh SQLite job; rows/s and the peak RSS of the planning process (``ru_maxrss``).
           Peak RSS must not grow with the number of sectors (rows are streamed per sector).

``python scripts/bench_plan.py`` runs both (the 2 M row plan takes several minutes on 2 cores);
``--scenario speed`` only the first; ``--quick`` is a tiny version for smoke tests.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _benchlib import (  # noqa: E402  (the line above makes the sibling module importable)
    SimProcess,
    emit_report,
    fmt,
    markdown_table,
    ratio,
    run_client,
)

from bulkfetch.sources import BATCH_SIZE, PLAN_WORKERS  # noqa: E402

log = logging.getLogger("bulkfetch.bench")


def sequential_loop(server: str, sectors: list[int]) -> tuple[float, dict[str, tuple]]:
    """The plain astroquery loop, timed: rows as {dataURI: (obs_id, productFilename, size)}."""
    from astroquery.exceptions import NoResultsWarning
    from astroquery.mast import Observations

    from bulkfetch.sources import point_astroquery_at

    point_astroquery_at(server)  # also empties astroquery's column-config cache: a cold start
    rows: dict[str, tuple] = {}
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoResultsWarning)
        for sector in sectors:
            obs = Observations.query_criteria(
                obs_collection="TESS", dataproduct_type="timeseries", sequence_number=sector
            )
            if len(obs) == 0:
                continue
            products = Observations.get_product_list(obs)
            products = Observations.filter_products(products, productSubGroupDescription="LC")
            # .tolist(): iterating masked columns element by element would time the loop
            # body, not astroquery
            for uri, obs_id, name, size in zip(
                products["dataURI"].tolist(),
                products["obs_id"].tolist(),
                products["productFilename"].tolist(),
                products["size"].tolist(),
                strict=True,
            ):
                rows.setdefault(str(uri), (str(obs_id), str(name), int(size)))
    return time.perf_counter() - start, rows


def bulkfetch_plan(
    server: str, sectors: list[int] | None, root: Path, *, workers: int, batch_size: int
) -> tuple[float, Any, dict[str, tuple]]:
    """bulkfetch's planner on a fresh job, timed; the rows it stored, in the loop's shape."""
    from bulkfetch.plan import Selection, plan
    from bulkfetch.sources import point_astroquery_at
    from bulkfetch.store import open_store

    point_astroquery_at(server)
    store = open_store(root)
    start = time.perf_counter()
    summary = plan(
        store, root, Selection(sectors=sectors), server=server, workers=workers,
        batch_size=batch_size,
    )  # fmt: skip
    elapsed = time.perf_counter() - start
    rows = {r.uri: (r.obs_id, r.product_filename, r.size) for r in store.iter_records()}
    store.close()
    return elapsed, summary, rows


def scenario_speed(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """20 sectors at 500 ms per query: sequential astroquery vs bulkfetch, same simulator."""
    knobs = {
        "n_sectors": args.sectors + 1,  # sectors 1..N plus 1751; we plan 1..N
        "targets_per_sector": args.targets,
        "query_latency": args.latency,
        "seed": 1,
    }
    sectors = list(range(1, args.sectors + 1))
    with SimProcess(knobs, log_path=work / "sim-speed.log") as sim:
        aq_time, aq_rows = sequential_loop(sim.url, sectors)
        aq_queries = sim.stats()["query_requests"]
        sim.reset_stats()
        bf_time, summary, bf_rows = bulkfetch_plan(
            sim.url, sectors, work / "speed-job", workers=args.workers, batch_size=args.batch_size
        )
        bf_queries = sim.stats()["query_requests"]
    identical = aq_rows == bf_rows
    return {
        "name": "speed",
        "knobs": knobs,
        "sectors": len(sectors),
        "rows": len(bf_rows),
        "identical": identical,
        "astroquery": {"seconds": aq_time, "queries": aq_queries},
        "bulkfetch": {
            "seconds": bf_time,
            "queries": bf_queries,
            "workers": args.workers,
            "batch_size": args.batch_size,
        },
        "speedup": ratio(aq_time, bf_time),
        "summary_files": summary.files,
    }


def scale_worker(args: argparse.Namespace) -> int:
    """Subprocess body of the scale scenario: plan, then report rows, time and peak RSS."""
    sectors = None if args.worker_sectors == "all" else list(range(1, int(args.worker_sectors) + 1))
    root = Path(args.worker_root)
    from bulkfetch.plan import Selection, plan
    from bulkfetch.store import open_store

    store = open_store(root)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    summary = plan(
        store, root, Selection(sectors=sectors), server=args.worker_server,
        workers=args.workers, batch_size=args.batch_size,
    )  # fmt: skip
    elapsed = time.perf_counter() - start
    rows, nbytes = store.total()
    store.close()
    emit_report(
        {
            "rows": rows,
            "bytes": nbytes,
            "sectors": len(summary.per_sector),
            "seconds": elapsed,
            "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            "rss_after_imports_kb": rss_before,
            "db_bytes": (root / ".bulkfetch" / "state.sqlite").stat().st_size,
        }
    )
    return 0


def scenario_scale(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """A fresh planning subprocess per size, one simulator for all: rows/s and peak RSS."""
    knobs = {
        "n_sectors": args.scale_sectors,
        "targets_per_sector": args.scale_targets,
        "seed": 1,
    }
    results = []
    with SimProcess(knobs, log_path=work / "sim-scale.log", startup_timeout=300) as sim:
        for label in args.scale_steps:
            command = [
                sys.executable, str(Path(__file__).resolve()), "--worker-server", sim.url,
                "--worker-sectors", label, "--worker-root", str(work / f"scale-{label}"),
                "--workers", str(args.workers), "--batch-size", str(args.batch_size),
            ]  # fmt: skip
            run = run_client(command, log_dir=work / "logs", name=f"scale-{label}")
            if run.returncode != 0 or run.report is None:
                raise RuntimeError(f"scale run {label} failed:\n{run.stderr_tail}")
            report = dict(run.report)
            report.update(label=label, wall=run.wall, cpu=run.cpu)
            results.append(report)
            log.info("scale %s: %s", label, report)
    return {"name": "scale", "knobs": knobs, "runs": results}


def print_report(report: dict[str, Any]) -> None:
    for scenario in report["scenarios"]:
        if scenario["name"] == "speed":
            aq, bf = scenario["astroquery"], scenario["bulkfetch"]
            print(
                f"\n## speed: {scenario['sectors']} sectors, "
                f"{scenario['knobs']['targets_per_sector']} targets/sector, "
                f"{scenario['knobs']['query_latency'] * 1000:.0f} ms per query call\n"
            )
            print(
                markdown_table(
                    ["planner", "seconds", "query calls", "rows", "speedup"],
                    [
                        [
                            "astroquery sequential loop",
                            fmt(aq["seconds"], 2),
                            aq["queries"],
                            f"{scenario['rows']:,}",
                            "1.0x",
                        ],
                        [
                            f"bulkfetch (workers={bf['workers']}, batch={bf['batch_size']})",
                            fmt(bf["seconds"], 2),
                            bf["queries"],
                            f"{scenario['rows']:,}",
                            f"{fmt(scenario['speedup'], 1)}x",
                        ],
                    ],  # fmt: skip
                )
            )
            print(f"\nidentical rows: {'yes' if scenario['identical'] else 'NO'}")
        else:
            print(
                f"\n## scale: {scenario['knobs']['n_sectors']} sectors x "
                f"{scenario['knobs']['targets_per_sector']:,} targets, light curves only\n"
            )
            rows = []
            for run in scenario["runs"]:
                rows.append(
                    [
                        run["label"], run["sectors"], f"{run['rows']:,}", fmt(run["seconds"], 1),
                        f"{run['rows'] / run['seconds']:,.0f}", fmt(run["cpu"], 1),
                        fmt(run["peak_rss_kb"] / 1024, 0), fmt(run["db_bytes"] / 1e6, 0),
                    ]
                )  # fmt: skip
            print(
                markdown_table(
                    [
                        "sectors arg",
                        "sectors",
                        "rows",
                        "plan s",
                        "rows/s",
                        "CPU s",
                        "peak RSS MiB",
                        "SQLite MB",
                    ],
                    rows,
                )  # fmt: skip
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", choices=("speed", "scale", "all"), default="all")
    parser.add_argument("--sectors", type=int, default=20, help="speed: sectors to plan")
    parser.add_argument("--targets", type=int, default=200, help="speed: targets per sector")
    parser.add_argument("--latency", type=float, default=0.5, help="speed: seconds per query")
    parser.add_argument("--workers", type=int, default=PLAN_WORKERS, help="bulkfetch query threads")
    parser.add_argument(
        "--batch-size", type=int, default=BATCH_SIZE, help="obsids per product query"
    )
    parser.add_argument("--scale-sectors", type=int, default=100)
    parser.add_argument("--scale-targets", type=int, default=20_000)
    parser.add_argument(
        "--scale-steps", nargs="+", default=["10", "all"],
        help="'N' plans sectors 1..N, 'all' every sector",
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for smoke tests")
    parser.add_argument("--json", type=Path, help="also write the raw report here")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--worker-server", help=argparse.SUPPRESS)
    parser.add_argument("--worker-sectors", help=argparse.SUPPRESS)
    parser.add_argument("--worker-root", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if args.worker_server:
        return scale_worker(args)
    if args.quick:
        args.sectors, args.targets, args.latency = 4, 30, 0.1
        args.scale_sectors, args.scale_targets, args.scale_steps = 4, 200, ["2", "all"]
    work = Path(tempfile.mkdtemp(prefix="bench_plan-"))
    report: dict[str, Any] = {"command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:])}
    report["cpus"] = os.cpu_count()
    scenarios = []
    try:
        if args.scenario in ("speed", "all"):
            scenarios.append(scenario_speed(args, work))
        if args.scenario in ("scale", "all"):
            scenarios.append(scenario_scale(args, work))
    finally:
        if not args.keep:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    report["scenarios"] = scenarios
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    speed = next((s for s in scenarios if s["name"] == "speed"), None)
    return 0 if speed is None or speed["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
