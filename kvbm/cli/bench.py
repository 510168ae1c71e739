"""``kvbm bench``: run the quick microbenchmarks and print a table (or JSON)."""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from typing import Any

from kvbm.errors import ConfigError, InvalidArgumentError


def add_parser(sub: Any) -> None:
    from kvbm.bench import SUITES

    p = sub.add_parser("bench", help="run the quick microbenchmarks", description=__doc__)
    p.add_argument("--suite", action="append", choices=SUITES, help="run only these suites (repeatable)")
    p.add_argument("--full", action="store_true", help="larger sizes (e.g. a 10M-block index); takes minutes")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--report", metavar="DIR", help="also write DIR/report.md with PNG plots (matplotlib: the "
                   "'report' extra)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import kvbm
    from kvbm.bench import SUITES, Context, format_table, machine, run_suites

    names = args.suite or SUITES
    unknown = [n for n in names if n not in SUITES]
    if unknown:
        raise InvalidArgumentError(f"unknown suite(s) {unknown}; known: {SUITES}")

    def progress(it: Any, desc: str) -> Any:
        if args.no_progress:
            return it
        from tqdm import tqdm

        return tqdm(it, desc=desc, file=sys.stderr, leave=False, mininterval=0.5)

    ctx = Context(quick=not args.full, progress=progress)
    rows = run_suites(list(names), ctx)
    meta = {
        "kvbm": kvbm.build_info(),
        "machine": machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "quick": ctx.quick,
    }
    if args.json:
        print(json.dumps({"meta": meta, "rows": [r.as_dict() for r in rows],
                          "skipped": [{"suite": s, "reason": r} for s, r in ctx.skipped]}, indent=2))
    else:
        print(f"kvbm {meta['kvbm']['version']} on {meta['machine']} ({meta['date']})")
        print(format_table(rows))
        for s, r in ctx.skipped:
            print(f"skipped {s}: {r}")
    if args.report:
        from kvbm.bench.report import write_report

        try:
            path = write_report(args.report, meta, rows, ctx.skipped)
        except OSError as e:
            raise ConfigError(f"--report {args.report!r}: cannot write the report: {e.strerror or e}") from e
        print(f"report: {path}", file=sys.stderr)
    return 0
