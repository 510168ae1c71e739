"""Hashing + lookup of 128k tokens (8k blocks of 16), ns per token, vs vLLM's own chained
sha256 block hashing of the same tokens measured in the same run (when vllm is importable)."""

from __future__ import annotations

import importlib.util

import numpy as np

from kvbm import BlockManager, KvbmConfig
from kvbm.bench import Context, Row, median_time
from kvbm.hashing import Namespace, block_hashes_array

NUM_TOKENS = 128 * 1024
BLOCK_SIZE = 16


def _vllm_time(tokens: list[int]) -> float | None:
    if importlib.util.find_spec("vllm") is None:
        return None
    from vllm import SamplingParams
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core import kv_cache_utils
    from vllm.v1.request import Request

    fn = get_hash_fn_by_name("sha256")
    kv_cache_utils.init_none_hash(fn)
    hasher = kv_cache_utils.get_request_block_hasher(BLOCK_SIZE, fn)

    def run() -> None:
        request = Request("bench", tokens, SamplingParams(max_tokens=1), None)
        assert len(hasher(request)) == NUM_TOKENS // BLOCK_SIZE

    return median_time(run, repeat=5)


def run(ctx: Context) -> list[Row]:
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 128_000, NUM_TOKENS, dtype=np.int64)
    token_list = tokens.tolist()
    t_vllm = _vllm_time(token_list)
    rows: list[Row] = []
    for algo in ctx.progress(["sha256", "fast128"], "hashing"):
        ns = Namespace("bench-model", "bf16", "NHD", BLOCK_SIZE, hash_algorithm=algo)
        mgr = BlockManager(KvbmConfig(block_bytes=1, host_capacity_bytes=NUM_TOKENS), allocate_memory=False)
        hashes = block_hashes_array(tokens, BLOCK_SIZE, ns)
        plan = mgr.prepare_store(hashes)
        mgr.complete_store(plan.new_hashes(hashes))
        out = np.empty(len(hashes), np.uint8)

        def hash_and_lookup(src=tokens, ns=ns, mgr=mgr, out=out) -> None:
            h = block_hashes_array(src, BLOCK_SIZE, ns)
            assert mgr.lookup_into(h, out) == len(h)

        for label, src in (("numpy", tokens), ("list", token_list)):
            t = median_time(lambda src=src: hash_and_lookup(src), repeat=7)
            ns_tok = t / NUM_TOKENS * 1e9
            if t_vllm is not None:
                vllm_ns = t_vllm / NUM_TOKENS * 1e9
                rows.append(Row("hashing", f"{algo} hash+lookup, {label} input", ns_tok, "ns/token",
                                vllm_ns, "vLLM sha256 hashing only", vllm_ns / ns_tok,
                                params={"algo": algo, "input": label}))
            else:
                rows.append(Row("hashing", f"{algo} hash+lookup, {label} input", ns_tok, "ns/token",
                                note="vllm not importable: no peer figure", params={"algo": algo, "input": label}))
    # Python's own hashlib, chaining sha256 over each block's token bytes (what a pure-Python
    # connector would do), on the same tokens.
    import hashlib

    def hashlib_chain() -> None:
        h = b""
        for i in range(0, NUM_TOKENS, BLOCK_SIZE):
            h = hashlib.sha256(h + tokens[i:i + BLOCK_SIZE].tobytes()).digest()

    ns_hl = median_time(hashlib_chain, repeat=5) / NUM_TOKENS * 1e9
    rows.append(Row("hashing", "Python hashlib sha256 chain, numpy input", ns_hl, "ns/token",
                    params={"algo": "hashlib", "input": "numpy"}))
    if t_vllm is not None:
        rows.append(Row("hashing", "vLLM request_block_hasher (sha256), list input", t_vllm / NUM_TOKENS * 1e9,
                        "ns/token", params={"algo": "vLLM sha256", "input": "list"}))
    if t_vllm is None:
        ctx.skipped.append(("hashing: vLLM peer", "vllm is not importable in this environment"))
    return rows
