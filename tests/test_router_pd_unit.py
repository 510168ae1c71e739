"""Fast tests of kvbm router's prefill/decode placement (no vLLM): roles in the config, the decode
cost (pull, held prefix, unlike decode speeds), the prefill request, and the whole flow against
fake OpenAI upstreams on loopback (params forwarded, retries of either half, fallbacks, /metrics)."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from typing import Any

import pytest

pytest.importorskip("aiohttp")
pytest.importorskip("msgspec")
pytest.importorskip("zmq")

from kvbm.errors import ConfigError  # noqa: E402
from kvbm.router.config import RouterConfig, load_yaml, parse_instance  # noqa: E402
from kvbm.router.cost import CPU, GPU, Load, Rates, decode_estimate  # noqa: E402
from kvbm.router.index import chain_keys  # noqa: E402
from kvbm.router.pd import prefill_body, splittable  # noqa: E402
from kvbm.router.server import Router  # noqa: E402

BS = 4


def test_roles_from_the_command_line_and_yaml(tmp_path) -> None:
    inst = parse_instance("http://h:1,role=prefill,pull_bandwidth=2e9")
    assert inst.role == "prefill" and inst.pull_bandwidth == 2e9
    assert parse_instance("http://h:1").role == "both"
    for bad, word in [("http://h:1,role=prefil", "role"), ("http://h:1,pull_bandwidth=fast", "pull_bandwidth"),
                      ("http://h:1,pull_bandwidth=0", "pull_bandwidth")]:
        with pytest.raises(ConfigError, match=word):
            parse_instance(bad)
    with pytest.raises(ConfigError, match="role"):
        parse_instance({"url": "http://h:1", "role": 1})
    with pytest.raises(ConfigError, match="pd_bandwidth"):
        RouterConfig(instances=(inst,), pd_bandwidth=0)
    p = tmp_path / "r.yaml"
    p.write_text("pd_bandwidth: 2e9\ninstances:\n  - {url: 'http://a:1', role: prefill}\n"
                 "  - {url: 'http://b:1', role: decode, pull_bandwidth: 1e9}\n  - http://c:1\n")
    cfg = load_yaml(p)
    assert [i.role for i in cfg.instances] == ["prefill", "decode", "both"]
    assert cfg.pd_bandwidth == 2e9 and cfg.instances[1].pull_bandwidth == 1e9 and cfg.disaggregated
    p.write_text("instances:\n  - {url: 'http://a:1', role: decoder}\n")
    with pytest.raises(ConfigError, match="role"):
        load_yaml(p)
    p.write_text("pd_bandwidth: lots\ninstances: [http://a:1]\n")
    with pytest.raises(ConfigError, match="pd_bandwidth"):
        load_yaml(p)
    # P/D needs a prefill and a decode instance; 'both' alone routes as before.
    assert not RouterConfig(instances=(parse_instance("http://a:1,role=prefill"),
                                       parse_instance("http://b:1"))).disaggregated


def test_decode_cost_counts_the_pull_and_what_the_instance_holds() -> None:
    r = Rates(decode_step_s=0.01, block_bytes=1 << 20, pull_bandwidth=1e9)
    n = 10 * BS + 1
    cold = decode_estimate(0, n, BS, [], r, Load())
    assert cold.pulled_blocks == 10 and cold.held_blocks == 0
    assert cold.ttft_s == pytest.approx(0.01 + 10 * (1 << 20) / 1e9)
    warm = decode_estimate(0, n, BS, [GPU] * 6 + [CPU] * 2, r, Load())
    assert (warm.held_blocks, warm.pulled_blocks) == (8, 2)
    assert warm.ttft_s == pytest.approx(0.01 + 2 * (1 << 20) / 20e9 + 2 * (1 << 20) / 1e9)
    # Active requests queue: each costs a decode step.
    assert decode_estimate(0, n, BS, [], r, Load(active=3)).ttft_s == pytest.approx(cold.ttft_s + 0.03)
    # The last prompt token is always computed: a block-aligned prompt pulls one block less.
    assert decode_estimate(0, 2 * BS, BS, [], r, Load()).pulled_blocks == 1


def _router(roles: list[str], steps: list[float], **kw: Any) -> Router:
    cfg = RouterConfig(instances=tuple(parse_instance(f"http://h{i}:1,role={r}") for i, r in enumerate(roles)),
                       probe=False, **kw)
    router = Router(cfg)
    for inst, step in zip(router.instances, steps, strict=True):
        inst.healthy, inst.block_size, inst.model = True, BS, "m"
        inst.rates.decode_step_s = step
        inst.rates.block_bytes = 4096
    return router


def test_a_slower_decoder_holds_fewer_decodes_in_proportion() -> None:
    """Decodes in flight spread in inverse proportion to the measured decode step (3x slower: a third)."""
    router = _router(["prefill", "decode", "decode"], [0.001, 0.01, 0.03])
    tokens = list(range(8 * BS + 1))
    for _ in range(60):
        d = router.rank_decode(tokens, router.slots("prefill"), None, prefilled_on=0)[0]
        router.placed(router.instances[d.slot], 0, 0)
    fast, slow = router.instances[1].load.active, router.instances[2].load.active
    assert fast + slow == 60
    assert 2.5 <= fast / slow <= 3.5, (fast, slow)
    # Unlike prefill speeds: the faster prefill instance takes the cold prompts.
    router = _router(["prefill", "prefill", "decode"], [0.01, 0.01, 0.01])
    router.instances[0].rates.prefill_tokens_per_s = 1_000.0
    router.instances[1].rates.prefill_tokens_per_s = 4_000.0
    assert router.rank(tokens, router.slots("decode"))[0].slot == 1


def test_a_decoder_holding_the_prefix_wins_and_both_role_keeps_its_own_prefill() -> None:
    from kvbm.events import BlockStored

    router = _router(["prefill", "decode", "decode"], [0.001, 0.01, 0.01], pd_bandwidth=1e6)
    tokens = list(range(100, 100 + 8 * BS + 1))
    # Instance 2 reported the prompt's first 8 blocks on its GPU: it pulls nothing.
    router.index.apply(2, [BlockStored(block_hashes=list(range(8)), parent_block_hash=None,
                                       token_ids=tokens[:8 * BS], block_size=BS, medium="GPU", lora_id=None,
                                       lora_name=None)])
    assert len(router.index.overlap(chain_keys(tokens, BS), [2])[2]) == 8
    ranked = router.rank_decode(tokens, router.slots("prefill"), None, prefilled_on=0)
    assert [(e.slot, e.pulled_blocks) for e in ranked] == [(2, 0), (1, 8)]
    # A 'both' instance that did the prefill holds every block: it decodes itself unless busy.
    router = _router(["both", "decode"], [0.01, 0.01], pd_bandwidth=1e6)
    assert router.rank_decode(tokens, set(), None, prefilled_on=0)[0].slot == 0
    router.instances[0].load.active = 50
    assert router.rank_decode(tokens, set(), None, prefilled_on=0)[0].slot == 1


def test_prefill_request_and_what_is_split() -> None:
    body = {"model": "m", "prompt": "t5 t6", "max_tokens": 40, "stream": True,
            "stream_options": {"include_usage": True}, "min_tokens": 4, "temperature": 0}
    pb = prefill_body("/v1/completions", body)
    assert pb["max_tokens"] == 1 and pb["stream"] is False and "stream_options" not in pb and "min_tokens" not in pb
    assert pb["kv_transfer_params"]["do_remote_decode"] is True and pb["temperature"] == 0
    assert body["max_tokens"] == 40 and body["stream"]  # the client's request is not changed
    chat = prefill_body("/v1/chat/completions", {"messages": [], "max_completion_tokens": 9})
    assert chat["max_completion_tokens"] == 1 and chat["max_tokens"] == 1
    assert splittable("/v1/completions", {"prompt": [1, 2, 3]})
    assert splittable("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})
    for path, b in [("/v1/completions", {"prompt": ["a", "b"]}), ("/v1/completions", {"prompt": [[1], [2]]}),
                    ("/v1/completions", {"prompt": "a", "n": 2}),
                    ("/v1/completions", {"prompt": "a", "kv_transfer_params": {"do_remote_prefill": True}})]:
        assert not splittable(path, b), b


# -- the flow against fake upstreams ------------------------------------------------------------
def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Fake:
    """A fake vLLM OpenAI server: prefills answer params naming it; decodes echo the params they got.
    ``fail`` = "prefill" / "decode": answers 503 to that half."""

    def __init__(self, name: str, fail: str | None = None, busy: dict | None = None) -> None:
        self.name, self.fail = name, fail
        self.busy = busy  # shared by fakes: requests in flight now / at most, across all of them
        self.port = _port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.seen: list[dict] = []

    async def start(self) -> None:
        from aiohttp import web

        async def completions(request: Any) -> Any:
            body = await request.json()
            self.seen.append(body)
            kv = body.get("kv_transfer_params") or {}
            half = "prefill" if kv.get("do_remote_decode") else "decode" if kv else "whole"
            if self.fail == half:
                return web.json_response({"error": "down"}, status=503)
            if self.busy is not None:  # a slow answer, counting overlap with the other fakes
                self.busy["now"] += 1
                self.busy["max"] = max(self.busy["max"], self.busy["now"])
                await asyncio.sleep(0.05)
                self.busy["now"] -= 1
            if half == "prefill":
                assert body["max_tokens"] == 1 and body["stream"] is False
                return web.json_response({"choices": [{"text": "x"}],
                                          "kv_transfer_params": {"do_remote_prefill": True, "from": self.name}})
            text = f"{half}@{self.name} from={kv.get('from')}"
            if not body.get("stream"):
                return web.json_response({"choices": [{"text": text}]})
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            for word in text.split():
                await resp.write(f"data: {json.dumps({'choices': [{'text': word + ' '}]})}\n\n".encode())
            await resp.write(b"data: [DONE]\n\n")
            return resp

        async def health(request: Any) -> Any:
            return web.Response(text="ok")

        async def models(request: Any) -> Any:
            return web.json_response({"data": [{"id": "m"}]})

        async def metrics(request: Any) -> Any:
            return web.Response(text='vllm:cache_config_info{block_size="4",kv_cache_memory_bytes="4096",'
                                     'num_gpu_blocks="1"} 1.0\n')

        app = web.Application()
        app.router.add_post("/v1/completions", completions)
        app.router.add_post("/v1/chat/completions", completions)
        app.router.add_get("/health", health)
        app.router.add_get("/v1/models", models)
        app.router.add_get("/metrics", metrics)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()


async def _with_router(fakes: list[Fake], specs: list[str], body: Any, probe: bool = False) -> None:
    import aiohttp
    from aiohttp import web

    from kvbm.router.app import build_app

    for f in fakes:
        await f.start()
    cfg = RouterConfig(instances=tuple(parse_instance(s) for s in specs), probe=probe, health_interval_s=30,
                       metrics_interval_s=30)
    router = Router(cfg)
    runner = web.AppRunner(build_app(router))
    await runner.setup()
    port = _port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with aiohttp.ClientSession() as s:
            await body(s, f"http://127.0.0.1:{port}", router)
    finally:
        await runner.cleanup()
        for f in fakes:
            if hasattr(f, "runner"):
                await f.runner.cleanup()


def _metric(text: str, sample: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(sample + " "))


def test_flow_forwards_params_and_retries_either_half() -> None:
    p_bad, p_ok = Fake("p_bad", fail="prefill"), Fake("p_ok")
    d_bad, d_ok = Fake("d_bad", fail="decode"), Fake("d_ok")
    dead = f"http://127.0.0.1:{_port()}"  # nobody listens: a decode instance that is gone
    fakes = [p_bad, p_ok, d_bad, d_ok]

    async def body(s: Any, url: str, router: Router) -> None:
        assert sum(i.healthy for i in router.instances) == 4  # the dead one never came up
        router.instances[4].healthy = True  # as if it died after its last health check
        router.instances[4].block_size = BS
        for i in router.instances:  # d_bad and the dead instance look best: both are tried first
            i.rates.decode_step_s = {"d_ok": 0.05}.get(i.cfg.name, 0.001)
        req = {"model": "m", "prompt": [1, 2, 3, 4, 5, 6, 7, 8, 9], "max_tokens": 5}
        async with s.post(url + "/v1/completions", json=req) as r:
            assert r.status == 200, await r.text()
            out = await r.json()
            assert r.headers["x-kvbm-instance"] == "d_ok" and r.headers["x-kvbm-prefill-instance"] == "p_ok"
        assert out["choices"][0]["text"] == "decode@d_ok from=p_ok"
        # The decode got the client's request unchanged plus the prefill's params.
        got = d_ok.seen[-1]
        assert got["max_tokens"] == 5 and got["kv_transfer_params"] == {"do_remote_prefill": True, "from": "p_ok"}
        async with s.post(url + "/v1/chat/completions", json={"model": "m", "stream": True, "max_tokens": 3,
                                                              "messages": [{"role": "user", "content": "hi"}]}) as r:
            streamed = (await r.read()).decode()
        assert streamed.count("data: ") == 3 and streamed.endswith("data: [DONE]\n\n")
        assert d_ok.seen[-1]["stream"] is True and d_ok.seen[-1]["kv_transfer_params"]["from"] == "p_ok"
        # A streamed decode of a known prompt measures the pull bandwidth of every unconfigured instance.
        async with s.post(url + "/v1/completions", json={**req, "stream": True}) as r:
            assert (await r.read()).decode().endswith("data: [DONE]\n\n")
        bw = {i.cfg.name: i.rates.pull_bandwidth for i in router.instances}
        assert bw["d_bad"] == 1e9 and bw["d_ok"] == bw["dead"] != 5e9
        async with s.get(url + "/metrics") as r:
            text = await r.text()
        assert _metric(text, "kvbm_router_pd_requests_total") == 3
        assert _metric(text, 'kvbm_router_pd_retries_total{stage="prefill"}') >= 1
        assert _metric(text, 'kvbm_router_pd_retries_total{stage="decode"}') >= 2  # d_bad, then the dead one
        assert _metric(text, 'kvbm_router_pd_seconds_count{stage="prefill"}') == 3
        assert _metric(text, 'kvbm_router_pd_seconds_count{stage="decode"}') == 3
        assert _metric(text, 'kvbm_router_pd_placements_total{instance="d_ok",stage="decode"}') == 3
        assert not router.instances[4].healthy  # its refused connection marked it down

    specs = [f"{p_bad.url},role=prefill,name=p_bad", f"{p_ok.url},role=prefill,name=p_ok",
             f"{d_bad.url},role=decode,name=d_bad,pull_bandwidth=1e9", f"{d_ok.url},role=decode,name=d_ok",
             f"{dead},role=decode,name=dead"]
    asyncio.run(_with_router(fakes, specs, body))


def test_without_a_working_half_the_request_is_served_whole() -> None:
    p, d = Fake("p", fail="prefill"), Fake("d", fail="decode")

    async def body(s: Any, url: str, router: Router) -> None:
        req = {"model": "m", "prompt": "t1 t2 t3", "max_tokens": 2}
        # The only prefill instance fails: the decode instance serves the whole request.
        async with s.post(url + "/v1/completions", json=req) as r:
            assert (await r.json())["choices"][0]["text"] == "whole@d from=None"
        p.fail, d.fail = None, "decode"
        # The prefill works, the only decode instance fails: the prefill instance serves it whole.
        async with s.post(url + "/v1/completions", json=req) as r:
            assert (await r.json())["choices"][0]["text"] == "whole@p from=None"
        # Batch prompts are not split.
        d.fail = None
        async with s.post(url + "/v1/completions", json={**req, "prompt": ["t1", "t2"]}) as r:
            assert r.status == 200 and (await r.json())["choices"][0]["text"].startswith("whole@")
        st = router.pd
        assert (st.fallbacks, st.unsplit, st.requests) == (2, 1, 0)

    asyncio.run(_with_router([p, d], [f"{p.url},role=prefill,name=p", f"{d.url},role=decode,name=d"], body))


def test_start_up_probes_run_one_instance_at_a_time() -> None:
    """Instances may share cores or a GPU: the router probes their speed one after the other, never
    two at once (probes run together rated a 2-thread vLLM slower than a 1-thread one on 2 cores)."""
    busy = {"now": 0, "max": 0}
    fakes = [Fake(n, busy=busy) for n in ("a", "b", "c")]

    async def body(s: Any, url: str, router: Router) -> None:
        deadline = time.monotonic() + 20
        while not all(i.healthy for i in router.instances) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert all(i.healthy for i in router.instances)
        assert all(i.rates.prefill_tokens_per_s > 0 for i in router.instances)

    asyncio.run(_with_router(fakes, [f.url for f in fakes], body, probe=True))
    assert busy["max"] == 1
    assert sum(len(f.seen) for f in fakes) >= 3 * 4  # warm-up, two prefills, one decode probe each
