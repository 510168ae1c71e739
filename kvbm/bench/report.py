"""``kvbm bench --report DIR``: one Markdown report of a run, with PNG plots.

The plots come from the rows' ``params`` (what each row varies), so they show exactly what the
run measured: bandwidth vs block size for the host and disk tiers with their limits (numpy copy,
raw O_DIRECT), prefix-hit ratio vs capacity per eviction policy with LRU and the clairvoyant
replay, hashing ns/token against vLLM's hasher and Python's hashlib, index ns/block vs index size.
matplotlib is optional (``pip install 'kvblockmgr[report]'``); without it the report holds the
tables and says why it has no plots.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from kvbm.bench import Row, format_table


def _by(rows: list[Row], key: Callable[[Row], str], order: str) -> dict[str, list[Row]]:
    """Rows grouped by ``key(row)``, each group sorted by ``params[order]``."""
    out: dict[str, list[Row]] = defaultdict(list)
    for r in rows:
        out[key(r)].append(r)
    for rs in out.values():
        rs.sort(key=lambda r: r.params[order])
    return dict(sorted(out.items()))


def _save(plt: Any, fig: Any, ax: Any, path: str, title: str, xlabel: str, ylabel: str | None = None) -> bool:
    ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _plot_bandwidth(plt: Any, rows: list[Row], path: str) -> bool:
    rows = [r for r in rows if r.suite in ("host", "disk") and "block_kib" in r.params]
    if not rows:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.2))
    limits_drawn = set()
    for i, (name, rs) in enumerate(_by(rows, lambda r: f"{r.suite} {r.params['op']}", "block_kib").items()):
        xs = [r.params["block_kib"] for r in rs]
        ax.plot(xs, [r.value for r in rs], "o-", label=f"kvbm {name}", color=f"C{i}")
        limit = rs[0].baseline_name
        if all(r.baseline is not None for r in rs) and limit not in limits_drawn:  # e.g. one numpy copy line
            limits_drawn.add(limit)
            ax.plot(xs, [r.baseline for r in rs], "x--", color="grey", alpha=0.8, label=f"{limit} (limit)")
    ax.set_xscale("log", base=2)
    return _save(plt, fig, ax, path, "Tier bandwidth vs block size, against the raw copy of the same bytes",
                 "block size (KiB)", "GB/s")


def _plot_eviction(plt: Any, rows: list[Row], path: str) -> bool:
    rows = [r for r in rows if r.suite == "eviction" and "capacity" in r.params]
    if not rows:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, rs in _by(rows, lambda r: r.params["policy"], "capacity").items():
        style = {"lru": dict(color="black", ls="--"), "clairvoyant": dict(color="grey", ls=":")}.get(name, {})
        ax.plot([100 * r.params["capacity"] for r in rs], [r.value for r in rs], marker="o", label=name, **style)
    caps = sorted({100 * r.params["capacity"] for r in rows})
    ax.set_xscale("log")
    ax.set_xticks(caps, [f"{c:g}%" for c in caps])
    ax.minorticks_off()
    return _save(plt, fig, ax, path, "Eviction policies on the Mooncake conversation trace",
                 "capacity (share of the trace's distinct blocks)", "prefix hit ratio")


def _plot_hashing(plt: Any, rows: list[Row], path: str) -> bool:
    rows = [r for r in rows if r.suite == "hashing" and "algo" in r.params]
    if not rows:
        return False
    rows = sorted(rows, key=lambda r: r.value)
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.2))
    ax.barh([f"{r.params['algo']}, {r.params['input']} input" for r in rows], [r.value for r in rows],
            color=["C0" if r.params["algo"] in ("sha256", "fast128") else "C7" for r in rows])
    for i, r in enumerate(rows):
        ax.text(r.value, i, f" {r.value:.3g}", va="center", fontsize=8)
    ax.set_xscale("log")
    return _save(plt, fig, ax, path, "Hashing 128k tokens: kvbm vs vLLM's hasher vs Python hashlib",
                 "ns per token (hash the chain, then look it up; log scale)")


def _plot_index(plt: Any, rows: list[Row], path: str) -> bool:
    rows = [r for r in rows if r.suite == "index" and "kind" in r.params]
    if not rows:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, rs in _by(rows, lambda r: r.params["kind"], "blocks").items():
        ax.plot([r.params["blocks"] for r in rs], [r.value for r in rs], "o-", label=f"{name} ({rs[0].unit})")
    ax.set_xscale("log")
    return _save(plt, fig, ax, path, "Index lookup cost vs index size", "blocks in the index", "ns per block")


PLOTS = (("bandwidth.png", "Tier bandwidth", _plot_bandwidth), ("eviction.png", "Eviction", _plot_eviction),
         ("hashing.png", "Hashing", _plot_hashing), ("index.png", "Index scale", _plot_index))


def write_report(out_dir: str, meta: dict[str, Any], rows: list[Row], skipped: list[tuple[str, str]]) -> str:
    """Write ``out_dir/report.md`` (and its PNGs); returns the report's path.

    Raises: OSError when ``out_dir`` cannot be created or written (the CLI turns it into one line).
    """
    from kvbm.bench.provenance import cpu_model, git_commit

    os.makedirs(out_dir, exist_ok=True)
    commit = git_commit(short=True)
    lines = [f"# kvbm bench report ({meta['date']})", "",
             f"kvbm {meta['kvbm'].get('version', '?')} at commit {commit} on {cpu_model()}, "
             f"{meta['machine']}; "
             f"{'quick sizes' if meta.get('quick') else 'full sizes (--full)'}. Every figure below was measured "
             "in this run; a baseline is measured side by side in the same run.", ""]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        plt = None
        lines += ["Plots: none — matplotlib is not installed (`pip install 'kvblockmgr[report]'`).", ""]
    if plt is not None:
        for name, title, fn in PLOTS:
            if fn(plt, rows, os.path.join(out_dir, name)):
                lines += [f"## {title}", "", f"![{title}]({name})", ""]
    lines += ["## All rows", "", "```", format_table(rows), "```", ""]
    if skipped:
        lines += ["## Skipped", ""] + [f"- {s}: {r}" for s, r in skipped] + [""]
    path = os.path.join(out_dir, "report.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    return path
