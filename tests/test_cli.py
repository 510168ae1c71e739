"""The `kvbm` command: info and bench (the README's main job) produce what they promise."""

from __future__ import annotations

import json
import subprocess
import sys

import kvbm


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvbm", *args], capture_output=True, text=True, timeout=300)


def test_info_json_reports_build_policies_and_config() -> None:
    p = run_cli("info", "--json")
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    assert info["version"] == kvbm.__version__
    assert set(info["eviction_policies"]) >= {"lru", "prefix_freq", "prefix_ghost"}
    assert info["eviction_policies"][0] == info["config"]["eviction_policy"]
    assert {"cuda_compiled", "cuda_available", "ucx_compiled"} <= set(info)


def test_bench_json_rows_carry_same_run_baselines() -> None:
    p = run_cli("bench", "--suite", "host", "--json", "--no-progress")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    rows = out["rows"]
    assert {r["case"] for r in rows} == {
        "store 64 KiB blocks", "load 64 KiB blocks", "store 2048 KiB blocks", "load 2048 KiB blocks"}
    for r in rows:
        assert r["value"] > 0 and r["baseline"] > 0 and r["ratio"] > 0 and r["unit"] == "GB/s"
    assert out["meta"]["kvbm"]["version"] == kvbm.__version__


def test_bench_table_and_bad_suite() -> None:
    p = run_cli("bench", "--suite", "cuda", "--no-progress")
    assert p.returncode == 0, p.stderr
    assert "suite" in p.stdout.splitlines()[1]
    bad = run_cli("bench", "--suite", "nope")
    assert bad.returncode != 0 and "invalid choice" in bad.stderr
