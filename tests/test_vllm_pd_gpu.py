"""Prefill -> decode through kvbm's connector between two real vLLM processes on one CUDA GPU
(vLLM 0.26.0 on the GPU machine, ``scripts/gpu_all.sh vllm``). Skipped with a reason where vLLM,
CUDA, a CUDA build of kvbm or UCX is missing, so CI and the CPU box never run it.

A producer (``kv_producer``) prefills a prompt with ``max_tokens=1`` and ``do_remote_decode``; the
consumer (``kv_consumer``, another process on the same GPU) receives its ``kv_transfer_params``,
pulls the prompt's blocks from the producer's host tier over kvbm's transfer engine (UCX), checks
each block's CRC32C and scatters them into its own CUDA KV cache, then decodes.

Reference (Note [comparing greedy tokens in bf16] in test_vllm_real_gpu.py): the consumer's KV of
the full blocks was computed by the producer's prefill of the whole prompt, and the consumer
computes only the last partial block, exactly what a plain vLLM does when it serves the prompt's
full blocks from its own prefix cache. So the consumer's tokens must equal a plain vLLM's second
run of the same prompt (a prefix-cache hit of the same blocks), in the same execution mode;
agreement with the full recompute is reported, not asserted.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path
from typing import Any

import pytest
from vllm_helpers import agree as _agree
from vllm_helpers import gpu_vllm_skip_reason

_REASON = gpu_vllm_skip_reason(need_ucx=True)
pytestmark = [pytest.mark.gpu, pytest.mark.vllm, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]

BS = 16
BLOCKS = 200  # full blocks of PROMPT; the 201st holds the last 5 tokens (computed by the consumer)
MAX_TOKENS = 32
REPS = 3  # timed pulled / recomputed requests


def _tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 1000) for _ in range(n)]


PROMPT = _tokens(BLOCKS * BS + 5, seed=21)
FRESH = [_tokens(BLOCKS * BS + 5, seed=100 + i) for i in range(2 * REPS)]  # for the timed rows
LLM_KW: dict[str, Any] = {"gpu_memory_utilization": 0.08, "max_num_seqs": 8, "enforce_eager": True,
                          "kernel_config": {"enable_flashinfer_autotune": False}}
REPORT: dict[str, Any] = {}


def _pd_config(role: str, **extra: Any) -> dict[str, Any]:
    return {"kv_connector": "KvbmConnector", "kv_connector_module_path": "kvbm.integrations.vllm",
            "kv_role": role, "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": {"host_capacity_bytes": "256MiB", **extra}}


@pytest.fixture(scope="module")
def pd(tmp_path_factory: pytest.TempPathFactory) -> Any:
    import torch
    from vllm_helpers import build_tiny_llama
    from vllm_pd_peer import Instance

    d = tmp_path_factory.mktemp("pd_gpu")
    with torch.device("cuda"):
        model = build_tiny_llama(d / "model", layers=4, hidden=256, heads=4, kv_heads=2, head_dim=64,
                                 intermediate=512, vocab=1024, max_pos=8192)
    env = {"VLLM_USE_FLASHINFER_SAMPLER": "0", "VLLM_LOGGING_LEVEL": "INFO"}
    kw = {"block_size": BS, "max_model_len": 4096, "kv_cache_memory_bytes": 128 << 20, "llm_kwargs": LLM_KW}
    t0 = time.perf_counter()
    base = Instance(model, None, d / "base.log", env=env, **kw)
    prod = Instance(model, _pd_config("kv_producer", pd_lease_s=60), d / "producer.log", env=env, **kw)
    cons = Instance(model, _pd_config("kv_consumer", pd_timeout_s=20), d / "consumer.log", env=env, **kw)
    try:
        for inst in (base, prod, cons):
            inst.wait_ready(timeout=400)
        REPORT["startup_s"] = round(time.perf_counter() - t0, 1)
        yield base, prod, cons
    finally:
        for inst in (base, prod, cons):
            inst.close()
        logdir = os.environ.get("KVBM_VLLM_GPU_LOGDIR")
        if logdir:
            os.makedirs(logdir, exist_ok=True)
            for name in ("base", "producer", "consumer"):
                if (d / f"{name}.log").exists():
                    Path(logdir, f"pd_{name}.log").write_text((d / f"{name}.log").read_text(errors="replace"))


@pytest.fixture(scope="module", autouse=True)
def _write_report() -> Any:
    yield
    path = os.environ.get("KVBM_VLLM_PD_GPU_REPORT")
    if path:
        Path(path).write_text(json.dumps(REPORT, indent=1))


def _prefill(prod: Any, prompt: list[int]) -> dict:
    out = prod.call(op="generate", prompt=prompt, max_tokens=1, kv_transfer_params={"do_remote_decode": True})
    assert out["kv_transfer_params"] is not None, "the producer returned no kv_transfer_params"
    return out["kv_transfer_params"]


def test_consumer_pulls_prefill_blocks_over_the_transfer_engine(pd: Any) -> None:
    base, prod, cons = pd
    cold = base.call(op="generate", prompt=PROMPT, max_tokens=MAX_TOKENS)
    cached = base.call(op="generate", prompt=PROMPT, max_tokens=MAX_TOKENS)  # vLLM's own 200-block hit
    params = _prefill(prod, PROMPT)
    assert len(params["kvbm_pd"]["slots"]) == BLOCKS
    json.dumps(params)
    before = cons.call(op="stats")
    out = cons.call(op="generate", prompt=PROMPT, max_tokens=MAX_TOKENS, kv_transfer_params=params)
    after = cons.call(op="stats")
    k, k0 = after["kvbm"], before["kvbm"]
    REPORT["pull"] = {
        "pd_hit_blocks_remote": k["pd_hit_blocks_remote"] - k0["pd_hit_blocks_remote"],
        "pd_pulled_blocks": k["pd_pulled_blocks"] - k0["pd_pulled_blocks"],
        "failed_loads": k["failed_loads"] - k0["failed_loads"], "external_hits": out["external_hits"],
        "consumer_worker": after["worker"], "agree_with_prefix_cache": _agree(out["tokens"], cached["tokens"]),
        "agree_with_full_recompute": _agree(out["tokens"], cold["tokens"]),
        "prefix_cache_vs_full_recompute": _agree(cached["tokens"], cold["tokens"]), "tokens": MAX_TOKENS}
    assert after["worker"] is not None and after["worker"]["cuda"], "the consumer's worker is not on CUDA"
    assert k["pd_hit_blocks_remote"] - k0["pd_hit_blocks_remote"] == BLOCKS
    assert k["pd_pulled_blocks"] - k0["pd_pulled_blocks"] == BLOCKS  # verified bytes, reported by the worker
    assert k["failed_loads"] == k0["failed_loads"]
    assert out["tokens"] == cached["tokens"]
    # The producer's lease ends once its next step sees the consumer's notification.
    deadline = time.monotonic() + 30
    st = prod.call(op="stats")["kvbm"]
    while st["pd_leases_released"] < 1 and time.monotonic() < deadline:
        prod.call(op="generate", prompt=[5, 6, 7], max_tokens=1)
        st = prod.call(op="stats")["kvbm"]
    assert st["pd_leases_released"] >= 1


def test_pull_time_against_recompute(pd: Any) -> None:
    """Consumer wall time to the first token (``max_tokens=1``) of a pulled prompt against a
    recomputed one of the same length (fresh prompts, nothing cached): recorded; the pull must
    deliver every block and first tokens must equal the producer's."""
    _, prod, cons = pd
    pulled, recomputed = [], []
    for i in range(REPS):
        p = FRESH[i]
        pout = prod.call(op="generate", prompt=p, max_tokens=1, kv_transfer_params={"do_remote_decode": True})
        before = cons.call(op="stats")["kvbm"]
        out = cons.call(op="generate", prompt=p, max_tokens=1, kv_transfer_params=pout["kv_transfer_params"])
        assert out["kvbm"]["pd_pulled_blocks"] - before["pd_pulled_blocks"] == BLOCKS
        assert out["tokens"] == pout["tokens"]
        pulled.append(out["seconds"])
        recomputed.append(cons.call(op="generate", prompt=FRESH[REPS + i], max_tokens=1)["seconds"])
    REPORT["ttft_s"] = {"pulled": [round(x, 4) for x in pulled], "recomputed": [round(x, 4) for x in recomputed],
                        "blocks": BLOCKS}
