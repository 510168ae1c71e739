"""Block hashing and CRC32C throughput, each against a peer measured in the same run.

* kvbm chained block hashes (sha256, fast128; numpy and list input) vs vLLM's own chained
  block hashing (``vllm.v1.core.kv_cache_utils.get_request_block_hasher`` with its ``sha256``
  and ``sha256_cbor``) of the same 128k random tokens in 8k blocks of 16. The vLLM cases are
  skipped with a reason when vllm is not importable.
* kvbm CRC32C (hardware and table paths) vs a single-thread memcpy of the same 64 MiB.

Run (from the repository root, with the built extension importable)::

    pytest benchmarks/bench_hashing.py --benchmark-columns=median,iqr,rounds
    python benchmarks/bench_hashing.py --write-results   # also writes benchmarks/results/hashing.{md,json}
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

import kvbm
from kvbm import _native
from kvbm.hashing import block_hashes_array

NUM_TOKENS = 128 * 1024
BLOCK_SIZE = 16
NUM_BLOCKS = NUM_TOKENS // BLOCK_SIZE
VOCAB = 128_256  # Llama 3 vocabulary size
CRC_BYTES = 64 << 20  # well above L2 and L3 per core share

NS_SHA = kvbm.Namespace("bench/model", "bfloat16", "NHD", BLOCK_SIZE)
NS_FAST = kvbm.Namespace("bench/model", "bfloat16", "NHD", BLOCK_SIZE, hash_algorithm="fast128")


@pytest.fixture(scope="module")
def tokens() -> dict[str, object]:
    rng = np.random.default_rng(20261124)
    arr = rng.integers(0, VOCAB, size=NUM_TOKENS, dtype=np.int64)
    return {"int64": arr, "uint32": arr.astype(np.uint32), "list": arr.tolist()}


def _pedantic(benchmark, fn, *args, rounds: int, per: int = NUM_TOKENS):
    out = benchmark.pedantic(fn, args=args, rounds=rounds, iterations=1, warmup_rounds=2)
    benchmark.extra_info["units"] = per
    return out


# ---- kvbm block hashes -----------------------------------------------------------------------

@pytest.mark.parametrize("algo", ["sha256", "fast128"])
@pytest.mark.parametrize("kind", ["int64", "uint32"])
def test_kvbm_numpy(benchmark, tokens, algo, kind):
    ns = NS_SHA if algo == "sha256" else NS_FAST
    benchmark.group = "block hashes, 128k tokens"
    out = _pedantic(benchmark, block_hashes_array, tokens[kind], BLOCK_SIZE, ns, rounds=60)
    assert out.shape == (NUM_BLOCKS, 16)
    assert out.tobytes() == block_hashes_array(tokens["list"], BLOCK_SIZE, ns).tobytes()


@pytest.mark.parametrize("algo", ["sha256", "fast128"])
def test_kvbm_list(benchmark, tokens, algo):
    """The list[int] -> list[bytes] path a vLLM connector would use with request.all_token_ids."""
    ns = NS_SHA if algo == "sha256" else NS_FAST
    benchmark.group = "block hashes, 128k tokens"
    out = _pedantic(benchmark, kvbm.block_hashes, tokens["list"], BLOCK_SIZE, ns, rounds=40)
    assert len(out) == NUM_BLOCKS and b"".join(out) == block_hashes_array(tokens["int64"], BLOCK_SIZE, ns).tobytes()


# ---- vLLM's own block hashing -------------------------------------------------------------------

def _vllm_hasher(hash_name: str, token_list: list[int]):
    vllm = pytest.importorskip("vllm", reason="vllm is not importable in this interpreter")
    from vllm import SamplingParams
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core import kv_cache_utils
    from vllm.v1.request import Request

    fn = get_hash_fn_by_name(hash_name)
    kv_cache_utils.init_none_hash(fn)
    request = Request("bench", token_list, SamplingParams(max_tokens=1), None)
    hasher = kv_cache_utils.get_request_block_hasher(BLOCK_SIZE, fn)
    return vllm, hasher, request


@pytest.mark.parametrize("hash_name", ["sha256", "sha256_cbor"])
def test_vllm(benchmark, tokens, hash_name):
    vllm, hasher, request = _vllm_hasher(hash_name, tokens["list"])
    benchmark.group = "block hashes, 128k tokens"
    benchmark.extra_info["vllm_version"] = vllm.__version__
    out = _pedantic(benchmark, hasher, request, rounds=12)
    assert len(out) == NUM_BLOCKS and len(set(out)) == NUM_BLOCKS


# ---- CRC32C ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def crc_data() -> np.ndarray:
    return np.random.default_rng(7).integers(0, 256, size=CRC_BYTES, dtype=np.uint8)


@pytest.mark.parametrize("impl", ["sse4.2", "table"])
def test_crc32c(benchmark, crc_data, impl):
    if impl == "sse4.2" and _native.crc32c_impl() != "sse4.2":
        pytest.skip("this CPU or build has no crc32 instruction")
    benchmark.group = "crc32c, 64 MiB"
    got = _pedantic(benchmark, _native.crc32c, crc_data, 0, impl, rounds=15, per=CRC_BYTES)
    assert got == _native.crc32c(crc_data, 0, "table")


def test_memcpy_limit(benchmark, crc_data):
    """The peer for CRC32C: one single-threaded copy of the same bytes (numpy -> memcpy)."""
    dst = np.empty_like(crc_data)
    benchmark.group = "crc32c, 64 MiB"
    _pedantic(benchmark, np.copyto, dst, crc_data, rounds=15, per=CRC_BYTES)
    assert np.array_equal(dst, crc_data)


# ---- results writer ----------------------------------------------------------------------------

def _git(*args: str) -> str:
    root = Path(__file__).resolve().parents[1]
    return subprocess.run(["git", "-C", str(root), *args], check=False, capture_output=True,
                          text=True).stdout.strip()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def write_results(extra_args: list[str]) -> int:
    """Runs this file under pytest-benchmark and writes benchmarks/results/hashing.{md,json}."""
    out_dir = Path(__file__).resolve().parent / "results"
    out_dir.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.json"
        args = [__file__, "-q", f"--benchmark-json={raw}",
                "--benchmark-columns=median,iqr,rounds", *extra_args]
        rc = pytest.main(args)
        if rc != 0 or not raw.exists():
            return int(rc) or 1
        data = json.loads(raw.read_text())
    rows = {}
    for b in data["benchmarks"]:
        s = b["stats"]
        units = b["extra_info"]["units"]
        rows[b["name"]] = {
            "median_s": s["median"], "iqr_s": s["iqr"], "min_s": s["min"], "rounds": s["rounds"], "units": units,
            "vllm_version": b["extra_info"].get("vllm_version"),
        }
    vllm_ref = rows.get("test_vllm[sha256]")
    lines = []
    head = _git("rev-parse", "HEAD")
    dirty = " (with uncommitted changes)" if _git("status", "--porcelain", "--untracked-files=no") else ""
    vllm_version = vllm_ref["vllm_version"] if vllm_ref else None
    lines += [
        "# Block hashing and CRC32C",
        "",
        f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- Git commit: `{head}`{dirty}",
        (f"- Machine: {_cpu_model()}, {os.cpu_count()} CPUs visible, load average "
        f"{', '.join(f'{x:.1f}' for x in os.getloadavg())} at the end (shared machine: read ratios, not seconds)"),
        (f"- Python {platform.python_version()}, numpy {np.__version__}, vllm {vllm_version or 'not importable'}; "
        f"kvbm SHA-256 path `{_native.sha256_impl()}`, CRC32C path `{_native.crc32c_impl()}`"),
        (f"- Command: `{' '.join([Path(sys.executable).name, 'benchmarks/bench_hashing.py', '--write-results', *extra_args])}`"
        " (pytest-benchmark, `benchmark.pedantic`, inputs built outside the timed function, 2 warm-up rounds)"),
        (f"- Workload: {NUM_TOKENS} random token ids (uniform in [0, {VOCAB})), {NUM_BLOCKS} full blocks of "
        f"{BLOCK_SIZE}; one call hashes the whole chain."),
        "",
        "## Chained block hashes, 128k tokens",
        "",
        "| case | median ms | IQR ms | ns/token | vs vLLM sha256 (same run) |",
        "|---|---|---|---|---|",
    ]
    labels = {
        "test_kvbm_numpy[int64-sha256]": "kvbm sha256, numpy int64 -> (n,16) array",
        "test_kvbm_numpy[uint32-sha256]": "kvbm sha256, numpy uint32 -> (n,16) array",
        "test_kvbm_list[sha256]": "kvbm sha256, list[int] -> list[bytes]",
        "test_kvbm_numpy[int64-fast128]": "kvbm fast128, numpy int64 -> (n,16) array",
        "test_kvbm_numpy[uint32-fast128]": "kvbm fast128, numpy uint32 -> (n,16) array",
        "test_kvbm_list[fast128]": "kvbm fast128, list[int] -> list[bytes]",
        "test_vllm[sha256]": "vLLM `get_request_block_hasher`, `sha256` (pickle + hashlib)",
        "test_vllm[sha256_cbor]": "vLLM `get_request_block_hasher`, `sha256_cbor`",
    }
    for name, label in labels.items():
        r = rows.get(name)
        if r is None:
            lines.append(f"| {label} | skipped | | | |")
            continue
        ratio = f"{vllm_ref['median_s'] / r['median_s']:.1f}x faster" if vllm_ref else "n/a (vllm not importable)"
        if name == "test_vllm[sha256]":
            ratio = "1.0x (reference)"
        lines.append(f"| {label} | {r['median_s'] * 1e3:.3f} | {r['iqr_s'] * 1e3:.3f} | "
                     f"{r['median_s'] / r['units'] * 1e9:.2f} | {ratio} |")
    lines += ["", "## CRC32C, 64 MiB of random bytes", "", "| case | median ms | GB/s | of memcpy (same run) |",
              "|---|---|---|---|"]
    memcpy = rows.get("test_memcpy_limit")
    for name, label in (("test_crc32c[sse4.2]", "kvbm crc32c, SSE4.2, 3 interleaved streams"),
                        ("test_crc32c[table]", "kvbm crc32c, slicing-by-8 table"),
                        ("test_memcpy_limit", "single-thread memcpy of the same bytes (np.copyto)")):
        r = rows.get(name)
        if r is None:
            lines.append(f"| {label} | skipped | | |")
            continue
        gbs = r["units"] / r["median_s"] / 1e9
        of = f"{memcpy['median_s'] / r['median_s'] * 100:.0f}%" if memcpy else "n/a"
        lines.append(f"| {label} | {r['median_s'] * 1e3:.2f} | {gbs:.1f} | {of} |")
    lines.append("")
    (out_dir / "hashing.md").write_text("\n".join(lines))
    (out_dir / "hashing.json").write_text(json.dumps({"commit": head + dirty, "rows": rows}, indent=2) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    if "--write-results" in sys.argv:
        sys.exit(write_results([a for a in sys.argv[1:] if a != "--write-results"]))
    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
