"""``kvbm router``'s HTTP side: an OpenAI-compatible proxy that places each request by expected TTFT.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true`` passed through
chunk by chunk), ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text),
``GET /debug/state``, ``POST /debug/lookup`` (``{"prompt": [ids]}``: the ranking). A request's
prompt tokens are its ``prompt`` when that is a list of token ids, else the instance's ``/tokenize``
answer (text prompts and chat messages). They are hashed with each instance's block size (see
Note [Router block keys] in index.py) and scored by the cost model (Note [Routing cost model] in
cost.py).

Faults: an instance whose ``/health`` fails, or whose connection fails while a request is sent,
is marked down at once (its GPU/CPU/DISK blocks leave the index) and the request goes to the next
best instance. A request is retried only before any byte of its answer reached the client, so a
client never sees two partial answers. A down instance is polled and comes back when healthy.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from kvbm.errors import InvalidArgumentError
from kvbm.router.config import InstanceConfig, RouterConfig
from kvbm.router.cost import DecodeEstimate, Estimate, Load, Rates, choose, decode_estimate, estimate
from kvbm.router.events import Subscriber, kvbm_stream, vllm_stream
from kvbm.router.index import CPU, DISK, GPU, BlockIndex, chain_keys

logger = logging.getLogger("kvbm.router")


@dataclass
class Instance:
    slot: int
    cfg: InstanceConfig
    rates: Rates = field(default_factory=Rates)
    load: Load = field(default_factory=Load)
    healthy: bool = False
    block_size: int = 0
    model: str | None = None
    requests: int = 0
    failures: int = 0
    cached_tokens_routed: int = 0
    prefills: int = 0  # P/D: prefill halves sent here
    decodes: int = 0  # P/D: decode halves sent here
    _scrape: dict[str, float] = field(default_factory=dict)


class Router:
    """State shared by the HTTP handlers, the health loop and the event subscriber."""

    def __init__(self, cfg: RouterConfig) -> None:
        self.cfg = cfg
        self.instances = [Instance(i, c) for i, c in enumerate(cfg.instances)]
        for inst in self.instances:
            inst.rates.bandwidth.update(inst.cfg.bandwidth)
            if inst.cfg.block_bytes is not None:
                inst.rates.block_bytes = inst.cfg.block_bytes
            inst.rates.pull_bandwidth = inst.cfg.pull_bandwidth or cfg.pd_bandwidth
        self.index = BlockIndex(cfg.max_blocks)
        self.lock = threading.Lock()  # the index: subscriber thread vs request handlers
        streams = []
        for inst in self.instances:
            if inst.cfg.events:
                streams.append(vllm_stream(inst.slot, inst.cfg.events, inst.cfg.replay))
            if inst.cfg.kvbm_events:
                streams.append(kvbm_stream(inst.slot, inst.cfg.kvbm_events, inst.cfg.kvbm_replay))
        self.subscriber = Subscriber(streams, self._apply, self._clear) if streams else None
        self._rr = itertools.count()
        self.retries = 0
        self.routed = 0
        self.session: Any = None
        self._probe_lock: asyncio.Lock | None = None  # made in the event loop, on first use
        self.pd: Any = None  # kvbm.router.pd.PdStats when prefill and decode run apart (set by the app)

    # -- index (called on the subscriber thread) --------------------------------------------
    def _apply(self, slot: int, events: list[Any], clears: tuple[int, ...]) -> None:
        with self.lock:
            self.index.apply(slot, events, clears)

    def _clear(self, slot: int, tiers: tuple[int, ...]) -> None:
        with self.lock:
            self.index.clear(slot, tiers)

    # -- instance state ----------------------------------------------------------------------
    def mark_down(self, inst: Instance, why: str) -> None:
        if inst.healthy:
            logger.warning("kvbm router: instance %s down (%s)", inst.cfg.label, why)
        inst.healthy = False
        inst.failures += 1
        with self.lock:
            self.index.clear(inst.slot, (GPU, CPU, DISK))  # a shared REMOTE tier outlives it

    async def check_health(self, inst: Instance) -> None:
        import aiohttp

        try:
            async with self.session.get(inst.cfg.url + "/health",
                                        timeout=aiohttp.ClientTimeout(total=max(1.0, self.cfg.health_interval_s))) as r:
                ok = r.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            ok = False
            why = f"{type(e).__name__}: {e}"
        else:
            why = f"/health answered {r.status}"
        if not ok:
            self.mark_down(inst, why)
            return
        if not inst.healthy:
            await self._discover(inst)

    async def _discover(self, inst: Instance) -> None:
        """Model name, block size and bytes per block, then a probe of its speed."""
        try:
            async with self.session.get(inst.cfg.url + "/v1/models") as r:
                models = await r.json()
            inst.model = models["data"][0]["id"]
            await self.scrape(inst)
            if self.cfg.probe:
                # One instance at a time: instances may share cores or a GPU, and probes that run
                # together rate the one the other slows most as the slower (seen on a 2-core box)
                if self._probe_lock is None:
                    self._probe_lock = asyncio.Lock()
                async with self._probe_lock:
                    await self.probe(inst)
        except Exception as e:  # noqa: BLE001 - not ready yet: stays down, polled again
            logger.info("kvbm router: instance %s not ready: %s", inst.cfg.label, e)
            return
        inst.healthy = True
        logger.info("kvbm router: instance %s up (block size %d, %d bytes/block, %.0f prefill tok/s)",
                    inst.cfg.label, inst.block_size, inst.rates.block_bytes, inst.rates.prefill_tokens_per_s)

    async def probe(self, inst: Instance, tokens: int = 256) -> None:
        """Time a cold prefill (random tokens) and a few decode steps; sets the instance's rates."""
        rng = random.Random()
        body = {"model": inst.model, "temperature": 0, "ignore_eos": True}

        async def timed(n: int, max_tokens: int) -> float:
            prompt = [rng.randrange(10, 1000) for _ in range(n)]
            t = time.perf_counter()
            async with self.session.post(inst.cfg.url + "/v1/completions",
                                         json=dict(body, prompt=prompt, max_tokens=max_tokens)) as r:
                await r.read()
                if r.status != 200:
                    raise RuntimeError(f"probe answered {r.status}")
            return time.perf_counter() - t

        await timed(16, 1)  # warm-up
        t1 = min(await timed(tokens, 1), await timed(tokens, 1))  # the better of two: its unloaded speed
        t5 = await timed(tokens, 5)
        inst.rates.prefill_tokens_per_s = tokens / max(t1, 1e-6)
        inst.rates.decode_step_s = max(t5 - t1, 0.0) / 4 or inst.rates.decode_step_s

    async def scrape(self, inst: Instance) -> None:
        """Refresh load and rates from the instance's ``/metrics``."""
        async with self.session.get(inst.cfg.url + "/metrics") as r:
            text = await r.text()
        vals: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("vllm:cache_config_info") and not inst.block_size:
                lab = dict(re.findall(r'(\w+)="([^"]*)"', line))
                inst.block_size = int(lab.get("block_size", "0") or 0)
                if inst.cfg.block_bytes is None:
                    with contextlib.suppress(KeyError, ValueError, ZeroDivisionError):
                        inst.rates.block_bytes = int(lab["kv_cache_memory_bytes"]) // int(lab["num_gpu_blocks"])
                continue
            for name in ("vllm:num_requests_waiting{", "vllm:request_prefill_time_seconds_sum",
                         "vllm:request_time_per_output_token_seconds_sum",
                         "vllm:request_time_per_output_token_seconds_count"):
                if line.startswith(name):
                    vals[name] = vals.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
            if line.startswith("vllm:prompt_tokens_by_source_total") and 'source="local_compute"' in line:
                vals["computed"] = vals.get("computed", 0.0) + float(line.rsplit(" ", 1)[1])
        if not inst.block_size:
            raise RuntimeError("no vllm:cache_config_info block_size in /metrics")
        inst.load.reported_waiting = int(vals.get("vllm:num_requests_waiting{", 0))
        prev = inst._scrape
        if prev:
            key = "vllm:request_prefill_time_seconds_sum"
            dt = vals.get(key, 0) - prev.get(key, 0)
            dtok = vals.get("computed", 0) - prev.get("computed", 0)
            if dt > 0 and dtok >= 64:
                inst.rates.smooth(prefill_tokens_per_s=dtok / dt)
            ds = (vals.get("vllm:request_time_per_output_token_seconds_sum", 0)
                  - prev.get("vllm:request_time_per_output_token_seconds_sum", 0))
            dn = (vals.get("vllm:request_time_per_output_token_seconds_count", 0)
                  - prev.get("vllm:request_time_per_output_token_seconds_count", 0))
            if ds > 0 and dn > 0:
                inst.rates.smooth(decode_step_s=ds / dn)
        inst._scrape = vals

    async def monitor(self) -> None:
        """Health every ``health_interval_s``; metrics every ``metrics_interval_s``."""
        last_scrape = 0.0
        while True:
            await asyncio.gather(*(self.check_health(i) for i in self.instances))
            if time.monotonic() - last_scrape >= self.cfg.metrics_interval_s:
                last_scrape = time.monotonic()
                for inst in self.instances:
                    if inst.healthy:
                        try:
                            await self.scrape(inst)
                        except Exception as e:  # noqa: BLE001 - counted as a failed health check next
                            logger.info("kvbm router: scrape of %s failed: %s", inst.cfg.label, e)
            await asyncio.sleep(self.cfg.health_interval_s)

    # -- placement ---------------------------------------------------------------------------
    def placed(self, inst: Instance, pending_tokens: int, cached_tokens: int) -> None:
        """Count a request (or one half of a P/D request) sent to ``inst``; the caller takes
        ``active`` and ``pending_prefill_tokens`` back when it is done."""
        inst.load.active += 1
        inst.load.pending_prefill_tokens += pending_tokens
        inst.load.routed += 1
        inst.requests += 1
        inst.cached_tokens_routed += cached_tokens
        self.routed += 1

    def slots(self, *roles: str) -> set[int]:
        """Slots of the instances with one of ``roles``."""
        return {i.slot for i in self.instances if i.cfg.role in roles}

    def _overlaps(self, live: list[Instance], tokens: list[int], model: str | None) -> dict[int, list[int]]:
        """Per instance the tiers of the prompt's leading blocks it holds, hashed with its block size.
        A ``model`` that is not an instance's base model is a LoRA adapter (vLLM serves adapters
        under their name): its blocks are keyed apart, as vLLM's events name them (``lora_name``)."""
        by_bs: dict[int, list[Instance]] = {}
        for i in live:
            by_bs.setdefault(i.block_size, []).append(i)
        extra = model if model is not None and model not in {i.model for i in live} else None
        out: dict[int, list[int]] = {}
        with self.lock:
            for bs, group in by_bs.items():
                try:
                    keys = chain_keys(tokens, bs, extra)
                except InvalidArgumentError:  # token ids outside 0..2**32-1 (or no block size yet): no block matches
                    keys = []
                out.update(self.index.overlap(keys, [i.slot for i in group]))
        return out

    def _ranked(self, ests: list[Any]) -> list[Any]:
        loads = {i.slot: i.load for i in self.instances}
        ranked: list[Any] = []
        while ests:
            best = choose(ests, loads)
            ranked.append(best)
            ests.remove(best)
        return ranked

    def rank(self, tokens: list[int] | None, exclude: set[int], model: str | None = None) -> list[Estimate]:
        """Healthy instances not in ``exclude``, best first by expected TTFT (Note [Routing cost model])."""
        live = [i for i in self.instances if i.healthy and i.slot not in exclude]
        if not live:
            return []
        if self.cfg.policy == "round_robin" or tokens is None:
            k = next(self._rr)
            order = [live[(k + j) % len(live)] for j in range(len(live))]
            return [Estimate(i.slot, 0.0, 0, len(tokens or ()), ()) for i in order]
        over = self._overlaps(live, tokens, model)
        return self._ranked([estimate(i.slot, len(tokens), i.block_size, over[i.slot], i.rates, i.load)
                             for i in live])

    def rank_decode(self, tokens: list[int] | None, exclude: set[int], model: str | None = None,
                    prefilled_on: int | None = None) -> list[DecodeEstimate]:
        """Healthy decode-capable instances not in ``exclude``, best first by the time to their first
        token when the prompt was prefilled on slot ``prefilled_on`` (Note [Decode placement])."""
        live = [i for i in self.instances
                if i.healthy and i.slot not in exclude and i.cfg.role in ("decode", "both")]
        if not live:
            return []
        toks = tokens or []
        over = self._overlaps(live, toks, model) if tokens and self.cfg.policy == "kv" else {}
        ests = []
        for i in live:
            held = [GPU] * len(toks) if i.slot == prefilled_on else over.get(i.slot, [])
            ests.append(decode_estimate(i.slot, len(toks), i.block_size, held, i.rates, i.load))
        return self._ranked(ests)

    async def tokens_of(self, path: str, body: dict[str, Any]) -> list[int] | None:
        """The request's prompt token ids, or None when they cannot be known (routed without)."""
        prompt = body.get("prompt")
        if path.endswith("/completions") and "chat" not in path:
            if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
                return prompt
            if not isinstance(prompt, str):
                return None
            req: dict[str, Any] = {"model": body.get("model"), "prompt": prompt}
        else:
            if not isinstance(body.get("messages"), list):
                return None
            req = {"model": body.get("model"), "messages": body["messages"]}
        for inst in self.instances:
            if not inst.healthy:
                continue
            try:
                async with self.session.post(inst.cfg.url + "/tokenize", json=req) as r:
                    if r.status == 200:
                        return list((await r.json())["tokens"])
                    return None
            except Exception:  # noqa: BLE001 - try the next instance
                continue
        return None
