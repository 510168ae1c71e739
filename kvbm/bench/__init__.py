"""kvbm's quick microbenchmarks, run by ``kvbm bench``.

Each suite is a module in this package with ``run(ctx) -> list[Row]``. Every figure is
measured in the run that prints it, and where a limit or a peer applies the row carries it
(``baseline``) and the ratio, measured side by side (see ../shared/BENCHMARKS.md's rules).
"""

from __future__ import annotations

import importlib
import platform
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

SUITES = ["hashing", "index", "host", "eviction", "disk", "cuda"]


@dataclass
class Row:
    suite: str
    case: str
    value: float
    unit: str
    baseline: float | None = None
    baseline_name: str = ""
    ratio: float | None = None
    note: str = ""
    #: What the row varies (e.g. ``{"block_kib": 64, "op": "store"}``): the axes of the report's plots.
    params: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Context:
    quick: bool = True
    progress: Callable[[Iterable[Any], str], Iterable[Any]] = lambda it, desc: it
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def skip(self, suite: str, reason: str) -> list[Row]:
        self.skipped.append((suite, reason))
        return []


def median_time(fn: Callable[[], Any], repeat: int = 5, number: int = 1) -> float:
    """Median wall time of ``number`` calls of fn, over ``repeat`` runs, after one warm-up."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        times.append((time.perf_counter() - t0) / number)
    times.sort()
    return times[len(times) // 2]


def machine() -> str:
    import os

    return (
        f"{platform.machine()} {os.cpu_count()} cores, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}"
    )


def run_suites(names: list[str], ctx: Context) -> list[Row]:
    rows: list[Row] = []
    for name in names:
        try:
            mod = importlib.import_module(f"kvbm.bench.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"kvbm.bench.{name}":
                ctx.skipped.append((name, "suite not part of this build"))
                continue
            raise
        rows.extend(mod.run(ctx))
    return rows


def format_table(rows: list[Row]) -> str:
    headers = ["suite", "case", "value", "unit", "baseline", "ratio"]
    body = []
    for r in rows:
        base = "" if r.baseline is None else f"{r.baseline:.4g} ({r.baseline_name})"
        ratio = "" if r.ratio is None else f"{r.ratio:.2f}x"
        body.append([r.suite, r.case, f"{r.value:.4g}", r.unit, base, ratio])
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths)) for b in body]
    return "\n".join(lines)
