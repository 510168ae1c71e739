"""kvbm's connector inside real vLLM on a CUDA GPU (vLLM 0.26.0 on the GPU machine; see
``scripts/gpu_all.sh vllm``). Skipped with a reason where vLLM, CUDA or a CUDA build of kvbm is
missing, so CI and the CPU box never run it.

A random-weight Llama (bf16, built here with transformers) is served offline (``vllm.LLM``,
token-id prompts, greedy). Every engine runs in its own process (``tests/vllm_helpers.py``'s
harness, in-process engine core so the harness reads both connector halves' counters), small
(64 MiB of KV cache, low ``gpu_memory_utilization``), and independent engines run side by side
on the one GPU to fit one device call:

- wave 1: vLLM without a connector, eager and with CUDA graphs (the references), and kvbm
  (host tier + write-through disk tier, asynchronous loads), eager and with CUDA graphs, each over
  its own disk directory;
- wave 2, new processes over those directories: an eager engine with synchronous (layer-wise)
  loads, and a CUDA-graph engine after block 0 of the prompt was corrupted on disk.

Note [comparing greedy tokens in bf16]
A prefix served from a cache and the same prefix recomputed differ in bf16's low bits (other
GEMM shapes and attention splits), and a random model has near-ties, so outputs are compared like
with like: a kvbm hit of N blocks against vLLM serving the same N blocks from its own prefix
cache, in the same execution mode (eager / CUDA graphs), the cached KV computed by the same
prefill in both; agreement with full recompute is reported (``KVBM_VLLM_GPU_REPORT``), not
asserted. Hence the corrupted block is block 0: vLLM recomputes from the first failed block, so
the whole prompt is recomputed, exactly as without any cache (a middle block would leave no exact
reference: its prefix was computed by another prefill than vLLM's own cache's; the CPU tests
corrupt a middle block, where kernels do not depend on the batch shape).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from vllm_helpers import HERE, REPO, build_tiny_llama, gpu_vllm_skip_reason, kvbm_transfer_config
from vllm_helpers import agree as _agree

_REASON = gpu_vllm_skip_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.vllm, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]

BS = 16  # vLLM's default block size on CUDA
LAYERS = 4
HIT = 250  # full blocks of LONG that a hit serves (the 251st holds the last prompt token)
J = 0  # the block of LONG corrupted on disk (see the Note)
MAX_TOKENS = 32
DEVICE = "cuda"  # where the model's weights are drawn


def _tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 1000) for _ in range(n)]


LONG = _tokens(HIT * BS + 5, seed=1)
SHARED = LONG[:100 * BS + 7] + _tokens(40 * BS, seed=2)  # shares 100 full blocks with LONG
OTHER = _tokens(60 * BS + 3, seed=3)  # shares nothing

COMMON: dict[str, Any] = {
    "gpu_memory_utilization": 0.08, "max_num_seqs": 8,
    "kernel_config": {"enable_flashinfer_autotune": False},  # ~90 s at start-up, useless here
}
EAGER = {**COMMON, "enforce_eager": True}
# CUDA graphs (vLLM 0.26's default FULL_AND_PIECEWISE); the "eager" compile backend keeps the
# piecewise split and the graphs but skips Inductor's code generation.
GRAPHS = {**COMMON, "enforce_eager": False,
          "compilation_config": {"backend": "eager", "cudagraph_capture_sizes": [1, 2, 4, 8]}}

# vLLM's prefix cache answers first; every phase but the cache-hit ones starts from an empty one.
BASE_PHASES = [
    {"prompts": [LONG]},  # b0: full recompute
    {"prompts": [LONG], "reset_prefix_cache": False},  # b1: 250 blocks from vLLM's prefix cache
    {"prompts": [SHARED], "reset_prefix_cache": False},  # b2: 100 blocks from vLLM's prefix cache
    {"prompts": [OTHER]},  # b3: no hits
]

REPORT: dict[str, Any] = {"cases": {}}
ONLY = os.environ.get("KVBM_VLLM_GPU_ONLY", "")  # run only the engines whose names start with this


def _out(run: dict, phase: int) -> list[int]:
    return run["phases"][phase]["outputs"][0]


def _record(case: str, **kv: Any) -> None:
    REPORT["cases"].setdefault(case, {}).update(kv)


def _engine(name: str, spec: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """One engine in a fresh process (the harness of ``vllm_helpers.py``); its whole log is kept
    in ``workdir/<name>.log``. Returns the harness result, or ``{"error": ...}``."""
    spec = {"max_tokens": MAX_TOKENS, "block_size": BS, "kv_cache_memory_bytes": 64 << 20,
            "max_model_len": 4608, **spec, "out": str(workdir / f"{name}.json")}
    spec_path = workdir / f"{name}.spec.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               VLLM_LOGGING_LEVEL="INFO", VLLM_LOGGING_STREAM="ext://sys.stderr",
               # FlashInfer's top-k/top-p sampler is JIT-compiled at warm-up (~100 s the first time on
               # the GPU machine); greedy sampling never uses it.
               VLLM_USE_FLASHINFER_SAMPLER="0",
               # vLLM's block hashes (the keys of a secondary tier) must repeat across processes
               PYTHONHASHSEED="0",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    log = workdir / f"{name}.log"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        try:
            proc = subprocess.run([sys.executable, str(HERE / "vllm_helpers.py"), str(spec_path)], env=env,
                                  stdout=f, stderr=subprocess.STDOUT, timeout=420, check=False)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = -9
    text = log.read_text(errors="replace")
    if rc != 0:
        return {"error": f"engine {name} failed (rc={rc}):\n{text[-6000:]}", "wall_s": time.perf_counter() - t0}
    result = json.loads(Path(spec["out"]).read_text())
    result["log"] = text
    result["wall_s"] = time.perf_counter() - t0
    return result


def _parallel(jobs: dict[str, dict[str, Any]], workdir: Path) -> dict[str, dict[str, Any]]:
    with ThreadPoolExecutor(len(jobs)) as pool:
        futs = {name: pool.submit(_engine, name, spec, workdir) for name, spec in jobs.items()}
        return {name: f.result() for name, f in futs.items()}


def _need(run: dict[str, Any]) -> dict[str, Any]:
    if "error" in run:
        pytest.fail(run["error"], pytrace=False)
    return run


def _flip_block(disk_dir: str, block_hash: str) -> None:
    """Flip the last 4096 bytes of the block ``block_hash`` in its slab file (offset from the catalog)."""
    from kvbm.cli.inspect import inspect_dir
    from kvbm.tiers.disk import RECORD_HEADER

    info = inspect_dir(disk_dir, list_n=1 << 20)
    spp, stride = info["slots_per_slab"], RECORD_HEADER + info["slot_bytes"]  # a record header before each block
    (b,) = [b for b in info.get("recent_blocks", []) if b["hash"] == block_hash]
    path = os.path.join(info["dir"], f"slab-{b['slot'] // spp:05d}.kvbm")
    off = (b["slot"] % spp) * stride + RECORD_HEADER + b["length"] - 4096
    with open(path, "r+b") as f:
        f.seek(off)
        data = f.read(4096)
        f.seek(off)
        f.write(bytes(x ^ 0x5A for x in data))


# vLLM's native offloading (its CPU tier, 32 MiB) with kvbm's disk tier as its secondary tier.
NATIVE_PHASES = [
    {"prompts": [LONG]},  # n0: cold; the prompt's chunks go GPU -> vLLM's CPU tier -> kvbm's disk
    {"prompts": [LONG]},  # n1: after reset_prefix_cache: from vLLM's CPU tier (or kvbm after a restart)
]


def native_tier_config(disk_path: str | None, remote_url: str | None = None) -> dict[str, Any]:
    tiers = ([{"type": "kvbm", "disk_path": disk_path, "disk_capacity_bytes": "256MiB"}] if disk_path else []) + (
        [{"type": "kvbm_remote", "remote_url": remote_url, "remote_token": "tok"}] if remote_url else [])
    return {"kv_connector": "OffloadingConnector", "kv_role": "kv_both",
            "kv_connector_extra_config": {
                "spec_name": "KvbmTieringOffloadingSpec", "spec_module_path": "kvbm.integrations.vllm.secondary_tier",
                "cpu_bytes_to_use": 32 << 20, "secondary_tiers": tiers}}


def _flip_slot(disk_path: str, slot: int) -> str:
    """Flip the last 4096 data bytes of the record in ``slot`` of kvbm's tier under ``disk_path``
    (slots are handed out lowest first, in the order of a store job's keys: slot 0 holds the
    prompt's first chunk); returns the key of the chunk there."""
    from kvbm.cli.inspect import inspect_dir
    from kvbm.tiers.disk import RECORD_HEADER

    info = inspect_dir(disk_path, list_n=1 << 20)
    spp, stride = info["slots_per_slab"], RECORD_HEADER + info["slot_bytes"]
    (b,) = [b for b in info.get("recent_blocks", []) if b["slot"] == slot]
    path = os.path.join(info["dir"], f"slab-{slot // spp:05d}.kvbm")
    off = (slot % spp) * stride + RECORD_HEADER + b["length"] - 4096
    with open(path, "r+b") as f:
        f.seek(off)
        data = f.read(4096)
        f.seek(off)
        f.write(bytes(x ^ 0x5A for x in data))
    return b["hash"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """All engines of this module (two waves of side-by-side processes)."""
    import torch

    root = tmp_path_factory.mktemp("vllm_gpu")
    t0 = time.perf_counter()
    with torch.device(DEVICE):  # weights drawn on the GPU machine, saved as bf16
        model = build_tiny_llama(root / "model", layers=LAYERS, hidden=256, heads=4, kv_heads=2, head_dim=64,
                                 intermediate=512, vocab=1024, max_pos=8192)
    kv_a, kv_b = str(root / "kv_a"), str(root / "kv_b")
    kv_c, kv_d = str(root / "kv_c"), str(root / "kv_d")
    from kvbm.serve import ServeConfig, StoreServer

    # Slots are max_block_bytes wide whatever a record holds: 256 KiB slots for the 32 KiB chunks,
    # 1023 of them, so the 250 chunks of one prompt are never evicted (1 MiB slots held only 63)
    serve = StoreServer(ServeConfig(capacity_bytes=256 << 20, max_block_bytes=256 << 10, token="tok"))
    serve.start()  # kvbm's remote store, for vLLM's native offloading with kvbm_remote under its CPU tier
    disk = {"host_capacity_bytes": "64MiB", "disk_capacity_bytes": "256MiB"}
    kvbm_phases = [{"prompts": [LONG]}, {"prompts": [LONG]}, {"prompts": [SHARED]}, {"prompts": [OTHER]}]
    jobs1 = {
        "base_eager": {"model": model, "kv_transfer_config": None, "phases": BASE_PHASES, "llm_kwargs": EAGER},
        "base_graphs": {"model": model, "kv_transfer_config": None, "phases": BASE_PHASES, "llm_kwargs": GRAPHS},
        "kvbm_eager": {"model": model, "kv_transfer_config": kvbm_transfer_config(**disk, disk_path=kv_a),
                       "hash_prompts": [LONG], "phases": kvbm_phases, "llm_kwargs": EAGER},
        "kvbm_graphs": {"model": model, "kv_transfer_config": kvbm_transfer_config(**disk, disk_path=kv_b),
                        "hash_prompts": [LONG], "phases": kvbm_phases, "llm_kwargs": GRAPHS},
        # vLLM's native offloading with kvbm's disk tier under its CPU tier (two directories: one
        # restarted clean, one restarted after its first chunk was corrupted)
        "native_tier": {"model": model, "kv_transfer_config": native_tier_config(kv_c), "phases": NATIVE_PHASES,
                        "llm_kwargs": EAGER},
        "native_tier_d": {"model": model, "kv_transfer_config": native_tier_config(kv_d), "phases": NATIVE_PHASES[:1],
                          "llm_kwargs": EAGER},
        "native_tier_remote": {"model": model, "kv_transfer_config": native_tier_config(None, serve.url),
                               "phases": NATIVE_PHASES[:1], "llm_kwargs": EAGER},
    }
    if ONLY:  # KVBM_VLLM_GPU_ONLY=native: the reference and the native-offloading engines only
        jobs1 = {n: j for n, j in jobs1.items() if n == "base_eager" or n.startswith(ONLY)}
    wave1 = _parallel(jobs1, root)
    for n in ("kvbm_eager", "kvbm_graphs", "native_tier", "native_tier_d", "native_tier_remote", "base_graphs"):
        wave1.setdefault(n, {"error": f"{n} not run (KVBM_VLLM_GPU_ONLY={ONLY})"})
    t1 = time.perf_counter()
    out = dict(wave1)
    wave2: dict[str, dict[str, Any]] = {}
    if "error" not in wave1["kvbm_eager"]:
        wave2["restart_sync"] = {"model": model, "phases": [{"prompts": [LONG]}], "llm_kwargs": EAGER,
                                 "kv_transfer_config": kvbm_transfer_config(**disk, disk_path=kv_a, async_load=False)}
    flipped = False
    if "error" not in wave1["kvbm_graphs"]:
        try:
            _flip_block(kv_b, wave1["kvbm_graphs"]["hashes"][0][J])
            flipped = True
        except (ValueError, KeyError, OSError) as e:
            out["corrupt_graphs"] = {"error": f"could not corrupt block {J} in {kv_b}: {e!r}"}
    if flipped:
        wave2["corrupt_graphs"] = {"model": model, "llm_kwargs": GRAPHS,
                                   "kv_transfer_config": kvbm_transfer_config(**disk, disk_path=kv_b),
                                   "phases": [{"prompts": [LONG]}, {"prompts": [LONG]}]}
    if "error" not in wave1["native_tier"]:
        wave2["native_tier_restart"] = {"model": model, "kv_transfer_config": native_tier_config(kv_c),
                                        "phases": NATIVE_PHASES, "llm_kwargs": EAGER}
    if "error" not in wave1["native_tier_remote"]:  # another process, served from the kvbm serve store
        wave2["native_tier_remote_b"] = {"model": model, "kv_transfer_config": native_tier_config(None, serve.url),
                                         "phases": NATIVE_PHASES[:1], "llm_kwargs": EAGER}
    if "error" not in wave1["native_tier_d"]:
        try:
            REPORT["native_tier_corrupted_slot"] = _flip_slot(kv_d, 0)
            wave2["native_tier_corrupt"] = {"model": model, "kv_transfer_config": native_tier_config(kv_d),
                                            "phases": NATIVE_PHASES, "llm_kwargs": EAGER}
        except (ValueError, KeyError, OSError) as e:
            out["native_tier_corrupt"] = {"error": f"could not corrupt slot 0 in {kv_d}: {e!r}"}
    if wave2:
        out.update(_parallel(wave2, root))
    serve.close()
    for name in ("restart_sync", "corrupt_graphs", "native_tier_restart", "native_tier_corrupt",
                 "native_tier_remote_b"):
        out.setdefault(name, {"error": f"{name} not run: the wave-1 kvbm engine it restarts from failed"})
    if "error" not in out["corrupt_graphs"]:
        from kvbm.cli.inspect import inspect_dir

        REPORT["kv_b_after"] = {k: v for k, v in inspect_dir(kv_b).items() if k in ("blocks", "checksum_failures")}
    REPORT["waves_s"] = [round(t1 - t0, 1), round(time.perf_counter() - t1, 1)]
    REPORT["engines"] = {n: {"wall_s": round(r.get("wall_s", 0), 1), "startup_s": round(r.get("startup_s", 0), 1),
                             "cudagraph_mode": r.get("cudagraph_mode"), "error": r.get("error", "")[-1500:],
                             "phases": [{k: p.get(k) for k in ("external_hits", "num_cached_tokens", "seconds",
                                                               "secondary_tier")}
                                        for p in r.get("phases", [])]}
                         for n, r in out.items()}
    some = next((r for r in out.values() if "vllm_version" in r), {})
    REPORT["vllm_version"] = some.get("vllm_version")
    REPORT["device"] = torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE
    for line in some.get("log", "").splitlines():
        if "attention backend" in line or "FlashAttention version" in line:
            REPORT.setdefault("attention", []).append(line.split("] ", 1)[-1][:200])
    logdir = os.environ.get("KVBM_VLLM_GPU_LOGDIR")
    if logdir:
        os.makedirs(logdir, exist_ok=True)
        for n in out:
            if (root / f"{n}.log").exists():
                shutil.copy(root / f"{n}.log", os.path.join(logdir, f"{n}.log"))
    return out


@pytest.fixture(scope="module", autouse=True)
def _write_report() -> Any:
    yield
    path = os.environ.get("KVBM_VLLM_GPU_REPORT")
    if path:
        Path(path).write_text(json.dumps(REPORT, indent=1))


def _host_hit(base: dict, k: dict, case: str) -> None:
    cold, warm = k["phases"][0], k["phases"][1]
    _record(case, external_hits=warm["external_hits"], kvbm=warm["kvbm"], tokens=MAX_TOKENS,
            agree_with_prefix_cache=_agree(_out(k, 1), _out(base, 1)),
            agree_with_full_recompute=_agree(_out(k, 1), _out(base, 0)),
            prefix_cache_vs_full_recompute=_agree(_out(base, 1), _out(base, 0)))
    assert base["phases"][1]["num_cached_tokens"] == [HIT * BS]  # the reference really is a cache hit
    assert cold["external_hits"] == 0 and cold["kvbm"]["hit_blocks_host"] == 0
    # vLLM 0.26 leaves asynchronously loaded hits out of vllm:external_prefix_cache_hits (0.32 counts
    # them): the request's own count of tokens it did not compute says it, after reset_prefix_cache.
    assert warm["num_cached_tokens"] == [HIT * BS]
    assert warm["kvbm"]["hit_blocks_host"] == HIT and warm["kvbm"]["hit_blocks_disk"] == 0
    assert (warm["kvbm"]["async_load_reqs"], warm["kvbm"]["async_load_blocks"]) == (1, HIT)
    assert warm["worker"]["async_loads_done"] == 1
    assert _out(k, 1) == _out(base, 1)
    # A shared prefix: exactly the 100 shared full blocks, tokens equal vLLM's own 100-block hit.
    shared = k["phases"][2]
    _record(case, shared_external_hits=shared["external_hits"],
            shared_agree_with_prefix_cache=_agree(_out(k, 2), _out(base, 2)))
    assert base["phases"][2]["num_cached_tokens"] == [100 * BS]
    assert shared["num_cached_tokens"] == [100 * BS]
    assert _out(k, 2) == _out(base, 2)


def test_host_tier_hit_equals_vllm_prefix_cache_hit(runs: dict) -> None:
    """Eager: a repeated prompt after ``reset_prefix_cache`` gets 250 blocks from kvbm's host tier
    (asynchronously); greedy tokens equal vLLM serving the same 250 blocks from its own prefix cache."""
    _host_hit(_need(runs["base_eager"]), _need(runs["kvbm_eager"]), "host_hit_eager")


def test_host_tier_hit_with_cuda_graphs(runs: dict) -> None:
    """The same with CUDA graphs (FULL_AND_PIECEWISE: decode steps replay full graphs, where vLLM
    calls no per-layer hook)."""
    bg, kg = _need(runs["base_graphs"]), _need(runs["kvbm_graphs"])
    _record("host_hit_graphs", mode=kg["cudagraph_mode"], base_mode=bg["cudagraph_mode"],
            eager_vs_graphs_cold=_agree(_out(_need(runs["base_eager"]), 0), _out(bg, 0)))
    assert kg["cudagraph_mode"] not in ("NONE", "None") and bg["cudagraph_mode"] == kg["cudagraph_mode"]
    assert _need(runs["kvbm_eager"])["cudagraph_mode"] == "NONE"
    _host_hit(bg, kg, "host_hit_graphs")


def test_no_hits_outputs_equal_plain_vllm(runs: dict) -> None:
    for mode in ("eager", "graphs"):
        base, k = _need(runs[f"base_{mode}"]), _need(runs[f"kvbm_{mode}"])
        other = k["phases"][3]
        _record(f"no_hits_{mode}", external_hits=other["external_hits"], equal_cold=_out(k, 0) == _out(base, 0),
                equal_other=_out(k, 3) == _out(base, 3))
        assert other["external_hits"] == 0
        assert _out(k, 3) == _out(base, 3)
        assert _out(k, 0) == _out(base, 0)  # the cold run with the connector (it stores) == without


def test_disk_hit_after_engine_restart(runs: dict) -> None:
    """A new process over the same disk directory: an empty host tier, all 250 blocks from disk
    (synchronous loads here), tokens equal vLLM's own 250-block prefix-cache hit."""
    base, r = _need(runs["base_eager"]), _need(runs["restart_sync"])
    p = r["phases"][0]
    _record("disk_hit_after_restart", external_hits=p["external_hits"], kvbm=p["kvbm"],
            agree_with_prefix_cache=_agree(_out(r, 0), _out(base, 1)),
            agree_with_full_recompute=_agree(_out(r, 0), _out(base, 0)))
    assert p["external_hits"] == HIT * BS
    assert (p["kvbm"]["hit_blocks_host"], p["kvbm"]["hit_blocks_disk"]) == (0, HIT)
    assert p["kvbm"]["failed_loads"] == 0 and p["kvbm"]["async_load_reqs"] == 0
    assert _out(r, 0) == _out(base, 1)


def test_corrupted_disk_block_is_recomputed(runs: dict) -> None:
    """Block 0's slab bytes flipped on disk, a new CUDA-graph engine: the block fails its checksum,
    is reported to vLLM as a load error and recomputed (from block 0: the whole prompt), so tokens
    equal vLLM's full recompute; the block counts as a failed load, is dropped, stored afresh, and
    the next repeat is a full hit equal to vLLM's own cache hit."""
    base, g = _need(runs["base_graphs"]), _need(runs["corrupt_graphs"])
    p0, p1 = g["phases"][0], g["phases"][1]
    _record("corrupted_block", kvbm=p0["kvbm"], mismatch_logged="checksum mismatch" in g["log"],
            agree_with_full_recompute=_agree(_out(g, 0), _out(base, 0)),
            repeat_external_hits=p1["external_hits"], repeat_kvbm=p1["kvbm"],
            repeat_agree_with_prefix_cache=_agree(_out(g, 1), _out(base, 1)))
    assert p0["kvbm"]["hit_blocks_disk"] == HIT  # claimed from disk, then block 0 failed its checksum
    assert p0["kvbm"]["failed_loads"] == 1
    assert "checksum mismatch" in g["log"]
    assert _out(g, 0) == _out(base, 0)
    assert p1["kvbm"]["failed_loads"] == 1 and p1["num_cached_tokens"] == [HIT * BS]
    assert p1["kvbm"]["hit_blocks_host"] == HIT  # the recomputed blocks were stored again
    assert _out(g, 1) == _out(base, 1)


def test_layerwise_path_active(runs: dict) -> None:
    """On CUDA the worker copies layer by layer: every store is gathered one layer at a time as the
    forward passes it (``save_kv_layer``), and the restarted engine's synchronous disk load is
    scattered per layer with the forward waiting on each layer's event (``wait_for_layer_load``)."""
    k, kg, r = _need(runs["kvbm_eager"]), _need(runs["kvbm_graphs"]), _need(runs["restart_sync"])
    w, wg, wr = k["phases"][-1]["worker"], kg["phases"][-1]["worker"], r["phases"][0]["worker"]
    _record("layerwise", kvbm_eager_worker=w, kvbm_graphs_worker=wg, restart_sync_worker=wr)
    assert w["cuda"] and w["layerwise"] and wr["layerwise"] and wg["layerwise"]
    assert w["save_layer"] >= LAYERS and w["save_all"] == 0
    assert wg["save_layer"] >= LAYERS  # prompt blocks; decode blocks of full-graph steps go whole
    assert wr["load_layer"] >= LAYERS and wr["load_all"] == 0
    assert wr["layer_waits"] >= LAYERS


def _tier(run: dict, phase: int) -> dict[str, int]:
    st = run["phases"][phase]["secondary_tier"]
    assert st, "no kvbm secondary tier found under vLLM's OffloadingConnector"
    return st[0]


def test_native_offloading_with_kvbm_disk_tier_after_restart(runs: dict) -> None:
    """vLLM's OffloadingConnector (TieringOffloadingSpec) with kvbm's disk tier under its CPU tier:
    the prompt's chunks cascade to kvbm's disk; a new process (empty GPU and CPU tiers) promotes
    all 250 from kvbm's disk and serves them: tokens equal vLLM's own 250-block prefix-cache hit."""
    base, first, r = _need(runs["base_eager"]), _need(runs["native_tier"]), _need(runs["native_tier_restart"])
    p0 = r["phases"][0]
    _record("native_tier_restart", first_run_tier=_tier(first, 1), restart_tier=_tier(r, 0),
            num_cached_tokens=p0["num_cached_tokens"],
            agree_with_prefix_cache=_agree(_out(r, 0), _out(base, 1)),
            agree_with_full_recompute=_agree(_out(r, 0), _out(base, 0)),
            first_run_cpu_hit_agree_with_prefix_cache=_agree(_out(first, 1), _out(base, 1)))
    assert _tier(first, 1)["stored"] >= HIT and _tier(first, 1)["chunks"] >= HIT
    assert _tier(r, 0)["chunks"] >= HIT  # reopened from the catalog: nothing lost by the restart
    assert p0["num_cached_tokens"] == [HIT * BS]
    assert _tier(r, 0)["loaded"] >= HIT and _tier(r, 0)["load_failed"] == 0
    assert _out(r, 0) == _out(base, 1)


def test_native_offloading_corrupted_kvbm_chunk_is_recomputed(runs: dict) -> None:
    """The bytes of the chunk in kvbm's slot 0 flipped on disk: its promotion fails the CRC32C
    check, vLLM serves the chunks before it and recomputes from it on (tokens equal its full
    recompute); the chunk is dropped from kvbm's catalog and stored afresh.

    Which chunk slot 0 holds depends on the order vLLM hands chunks to its secondary tiers: the
    prompt's first on the CPU platform, whichever finished first on a GPU (in the H100 run of
    2026-12-08 a chunk 25 chunks in: vLLM reported 400 cached tokens and recomputed the rest). So
    the test asserts what holds wherever the chunk is: one checksum failure, one failed load, a
    served prefix that stops short of the whole prompt, the recompute's tokens, the chunk stored
    afresh and the next request served in full."""
    base, c = _need(runs["base_eager"]), _need(runs["native_tier_corrupt"])
    p0 = c["phases"][0]
    t = _tier(c, 1)  # the tier's counters after both phases
    (cached,) = p0["num_cached_tokens"]
    k = cached // BS
    _record("native_tier_corrupt", tier=_tier(c, 0), repeat_tier=t, num_cached_tokens=p0["num_cached_tokens"],
            cached_chunks_reported=k,
            mismatch_logged="not loaded" in c["log"], agree_with_full_recompute=_agree(_out(c, 0), _out(base, 0)))
    assert t["checksum_failures"] == 1 and t["load_failed"] == 1
    assert cached % BS == 0 and cached < HIT * BS  # a prefix up to the corrupted chunk, never past it
    assert t["stored"] >= 1  # the recomputed chunk stored afresh
    assert _out(c, 0) == _out(base, 0)
    assert c["phases"][1]["num_cached_tokens"] == [HIT * BS]


def test_native_offloading_with_kvbm_remote_tier(runs: dict) -> None:
    """kvbm's remote tier (an in-process ``kvbm serve`` on loopback) under vLLM's CPU tier: one
    engine's chunks go to the store; another process (empty GPU and CPU tiers) is served all 250
    from it: tokens equal vLLM's own 250-block prefix-cache hit."""
    base, a, b = _need(runs["base_eager"]), _need(runs["native_tier_remote"]), _need(runs["native_tier_remote_b"])
    p0 = b["phases"][0]
    _record("native_tier_remote", writer_tier=_tier(a, 0), reader_tier=_tier(b, 0),
            num_cached_tokens=p0["num_cached_tokens"], agree_with_prefix_cache=_agree(_out(b, 0), _out(base, 1)))
    assert p0["num_cached_tokens"] == [HIT * BS]
    assert _tier(b, 0)["loaded"] >= HIT and _tier(b, 0)["load_failed"] == 0
    assert _out(b, 0) == _out(base, 1)
