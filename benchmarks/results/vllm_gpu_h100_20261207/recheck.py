"""Re-evaluates test_vllm_real_gpu.py's corrected hit assertions (num_cached_tokens instead of
vllm:external_prefix_cache_hits) on the figures the 2026-12-07 H100 run recorded in vllm_gpu.json.
Run on the CPU box (not a GPU run): python benchmarks/results/vllm_gpu_h100_20261207/recheck.py"""

import json
import os

with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "vllm_gpu.json")) as f:
    d = json.load(f)
c, e, HIT, BS = d["cases"], d["engines"], 250, 16
checks = []
CASES = (("host_hit_eager", "kvbm_eager", "base_eager"), ("host_hit_graphs", "kvbm_graphs", "base_graphs"))
for case, kv, base in CASES:
    h, k, b = c[case], e[kv]["phases"], e[base]["phases"]
    checks += [
        (f"{case}: reference is vLLM's own 250-block prefix-cache hit", b[1]["num_cached_tokens"] == [HIT * BS]),
        (f"{case}: repeat after reset_prefix_cache: num_cached_tokens == [4000]",
         k[1]["num_cached_tokens"] == [HIT * BS]),
        (f"{case}: kvbm hit_blocks_host 250, disk 0",
         (h["kvbm"]["hit_blocks_host"], h["kvbm"]["hit_blocks_disk"]) == (HIT, 0)),
        (f"{case}: loaded asynchronously (1 request, 250 blocks)",
         (h["kvbm"]["async_load_reqs"], h["kvbm"]["async_load_blocks"]) == (1, HIT)),
        (f"{case}: 32/32 greedy tokens equal vLLM's prefix-cache hit", h["agree_with_prefix_cache"] == h["tokens"]),
        (f"{case}: shared prefix num_cached_tokens == [1600] (kvbm and vLLM)",
         k[2]["num_cached_tokens"] == b[2]["num_cached_tokens"] == [1600]),
    ]
g, gp = c["corrupted_block"], e["corrupt_graphs"]["phases"]
checks += [
    ("corrupted: repeat num_cached_tokens == [4000], failed_loads still 1",
     gp[1]["num_cached_tokens"] == [HIT * BS] and g["repeat_kvbm"]["failed_loads"] == 1),
    ("corrupted: repeat served 250 blocks from host (recomputed blocks stored again)",
     g["repeat_kvbm"]["hit_blocks_host"] == HIT),
    ("corrupted: repeat 32/32 tokens equal vLLM's prefix-cache hit", g["repeat_agree_with_prefix_cache"] == 32),
]
for name, ok in checks:
    print("ok  " if ok else "FAIL", name)
print(f"{sum(ok for _, ok in checks)}/{len(checks)} hold")
