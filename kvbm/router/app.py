"""The aiohttp application of ``kvbm router`` (routes listed in server.py's docstring)."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from kvbm.router import pd
from kvbm.router.config import RouterConfig
from kvbm.router.index import TIER_NAMES
from kvbm.router.relay import err, route
from kvbm.router.server import Instance, Router

logger = logging.getLogger("kvbm.router")


async def _proxy(router: Router, request: Any, path: str) -> Any:
    raw = await request.read()
    try:
        body = json.loads(raw)
    except ValueError:
        return err(400, "request body is not JSON")
    if not isinstance(body, dict):
        return err(400, "request body must be a JSON object")
    tokens = await router.tokens_of(path, body)
    model = body.get("model") if isinstance(body.get("model"), str) else None
    if router.pd is not None:
        return await pd.serve(router, request, path, raw, body, tokens, model)
    return await route(router, request, path, raw, tokens, model)


def _metrics(router: Router) -> str:
    lines = []

    def m(name: str, kind: str, helptext: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP {name} {helptext}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, v in samples:
            lines.append(f"{name}{labels} {v}")

    def lab(i: Instance) -> str:
        return f'{{instance="{i.cfg.label}"}}'

    insts = router.instances
    m("kvbm_router_requests_total", "counter", "requests routed to each instance",
      [(lab(i), i.requests) for i in insts])
    m("kvbm_router_routed_cached_tokens_total", "counter", "prompt tokens counted as cached where routed",
      [(lab(i), i.cached_tokens_routed) for i in insts])
    m("kvbm_router_instance_up", "gauge", "1 when the instance is healthy", [(lab(i), int(i.healthy)) for i in insts])
    m("kvbm_router_active_requests", "gauge", "requests in flight", [(lab(i), i.load.active) for i in insts])
    m("kvbm_router_prefill_tokens_per_second", "gauge", "measured prefill rate",
      [(lab(i), i.rates.prefill_tokens_per_s) for i in insts])
    m("kvbm_router_retries_total", "counter", "requests sent again to another instance", [("", router.retries)])
    with router.lock:
        st = router.index.stats
        n = len(router.index)
    m("kvbm_router_index_blocks", "gauge", "block keys in the index", [("", n)])
    m("kvbm_router_events_total", "counter", "KV events applied", [("", st.events)])
    m("kvbm_router_events_unresolved_total", "counter", "event blocks whose parent or tokens were unknown",
      [("", st.unresolved)])
    m("kvbm_router_index_evicted_total", "counter", "keys dropped by the index bound", [("", st.evicted)])
    for fam in pd.metric_families(router):
        m(*fam)
    return "\n".join(lines) + "\n"


def build_app(router: Router) -> Any:
    """The aiohttp ``web.Application`` (sessions, subscriber and health loop start with it)."""
    import aiohttp
    from aiohttp import web

    app = web.Application(client_max_size=64 << 20)
    if router.cfg.disaggregated:
        router.pd = pd.PdStats()

    async def completions(request: Any) -> Any:
        return await _proxy(router, request, "/v1/completions")

    async def chat(request: Any) -> Any:
        return await _proxy(router, request, "/v1/chat/completions")

    async def models(request: Any) -> Any:
        for inst in router.instances:
            if inst.healthy:
                try:
                    async with router.session.get(inst.cfg.url + "/v1/models") as r:
                        return web.json_response(await r.json(), status=r.status)
                except aiohttp.ClientError:
                    continue
        return err(503, "no healthy instance")

    async def health(request: Any) -> Any:
        up = sum(i.healthy for i in router.instances)
        return web.json_response({"healthy_instances": up}, status=200 if up else 503)

    async def metrics(request: Any) -> Any:
        return web.Response(text=_metrics(router), content_type="text/plain")

    async def state(request: Any) -> Any:
        return web.json_response({
            "instances": [{"url": i.cfg.url, "healthy": i.healthy, "block_size": i.block_size,
                           "block_bytes": i.rates.block_bytes, "prefill_tokens_per_s": i.rates.prefill_tokens_per_s,
                           "decode_step_s": i.rates.decode_step_s, "active": i.load.active,
                           "requests": i.requests, "cached_tokens_routed": i.cached_tokens_routed,
                           "bandwidth": {TIER_NAMES[t]: b for t, b in i.rates.bandwidth.items()},
                           "role": i.cfg.role, "pull_bandwidth": i.rates.pull_bandwidth,
                           "prefills": i.prefills, "decodes": i.decodes}
                          for i in router.instances],
            "index": {"blocks": len(router.index), **router.index.stats.__dict__},
            "streams": router.subscriber.stats() if router.subscriber else [],
            "retries": router.retries,
            "pd": None if router.pd is None else {k: v for k, v in router.pd.__dict__.items() if k != "seconds"},
        })

    async def lookup(request: Any) -> Any:
        body = await request.json()
        tokens = body.get("prompt") if isinstance(body, dict) else None
        stage = body.get("stage") if isinstance(body, dict) else None
        if not (isinstance(tokens, list) and all(isinstance(t, int) for t in tokens)) or stage not in (
                None, "prefill", "decode"):
            return err(400, "expected {\"prompt\": [token ids]} (and optionally \"stage\": \"prefill\" | \"decode\")")
        if stage is None:
            ranked = router.rank(tokens, set())
        else:
            ranked = router.rank(tokens, router.slots("decode"))
            if stage == "decode":
                dec = router.rank_decode(tokens, router.slots("prefill"), None, ranked[0].slot if ranked else None)
                return web.json_response([{"instance": router.instances[e.slot].cfg.label, "ttft_s": e.ttft_s,
                                           "held_blocks": e.held_blocks, "pulled_blocks": e.pulled_blocks}
                                          for e in dec])
        return web.json_response([{"instance": router.instances[e.slot].cfg.label, "ttft_s": e.ttft_s,
                                   "cached_tokens": e.cached_tokens,
                                   "tiers": [TIER_NAMES[t] for t in e.tiers]} for e in ranked])

    async def on_start(app: Any) -> None:
        router.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=2))
        if router.subscriber is not None:
            router.subscriber.start()
        await asyncio.gather(*(router.check_health(i) for i in router.instances))
        app["monitor"] = asyncio.create_task(router.monitor())

    async def on_stop(app: Any) -> None:
        app["monitor"].cancel()
        if router.subscriber is not None:
            router.subscriber.close()
        await router.session.close()

    app.on_startup.append(on_start)
    app.on_cleanup.append(on_stop)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/debug/state", state)
    app.router.add_post("/debug/lookup", lookup)
    return app


def serve(cfg: RouterConfig, ready: Any = None) -> None:
    """Run the router until SIGINT/SIGTERM; prints ``kvbm router listening on http://HOST:PORT``."""
    from aiohttp import web

    router = Router(cfg)
    app = build_app(router)

    async def main() -> None:
        runner = web.AppRunner(app, handle_signals=True)
        await runner.setup()
        site = web.TCPSite(runner, cfg.host, cfg.port)
        await site.start()
        port = runner.addresses[0][1]
        pd_note = ", prefill/decode disaggregated" if cfg.disaggregated else ""
        print(f"kvbm router listening on http://{cfg.host}:{port} ({len(cfg.instances)} instances, "
              f"policy {cfg.policy}{pd_note})", flush=True)
        if ready is not None:
            ready(port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        import signal

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            await runner.cleanup()

    asyncio.run(main())
