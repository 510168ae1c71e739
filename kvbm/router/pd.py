"""Prefill/decode disaggregation in ``kvbm router``: the proxy vLLM users otherwise write by hand.

Note [P/D flow]
---------------
With at least one ``prefill`` and one ``decode`` instance (``role`` in the config; ``both`` may do
either), a request is served in two halves:

1. Prefill: the instance with the least expected TTFT among the prefill-capable ones (Note
   [Routing cost model]: its cached prefix counts) gets the client's request with
   ``max_tokens: 1``, ``stream: false`` and ``kv_transfer_params: {"do_remote_decode": true}``
   (``stream_options`` and ``min_tokens`` dropped, ``max_completion_tokens`` 1 where given). kvbm's
   connector on a ``kv_producer`` answers with ``kv_transfer_params`` saying where the prompt's
   blocks are (docs/vllm.md, "Prefill/decode").
2. Decode: the decode-capable instance with the least expected time to its first token (Note
   [Decode placement] in cost.py) gets the client's request unchanged plus those params; its
   answer (streamed or not, as the client asked) is relayed unchanged. Its connector pulls the
   blocks from the prefill instance (or recomputes them when the pull fails: the output is the same).

When the instance chosen to decode is the prefill instance itself (role ``both``: it holds the
whole prompt, so nothing beats it) the request is served whole there. A prefill instance that
fails before answering (connection, 502/503/504) is replaced by the next one; a decode instance
that fails before its first byte reached the client by the next decode instance, with the same
params (the producer keeps the blocks pinned for its lease). With no prefill instance left, or no
decode instance left, the request is served whole by the best remaining instance (plain routing).
A 4xx (or other) answer to the prefill goes back to the client: the decode would fail alike.

Not split (served whole, counted): batch prompts (a list of prompts), ``n`` or ``best_of`` above 1,
and requests that carry their own ``kv_transfer_params`` (a proxy in front of the router).

Counted on ``/metrics``: requests split, served whole (and why), retries per half, prefill answers
without params, and latency histograms of the prefill, the decode's first byte and the decode.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from kvbm.router.cost import Estimate
from kvbm.router.relay import Retryable, forward_headers, post_json, relay, route, send_whole
from kvbm.router.server import Router

logger = logging.getLogger("kvbm.router")

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: Latency histograms, by ``stage`` label.
STAGES = ("prefill", "decode_first_byte", "decode")


@dataclass
class Histogram:
    """A Prometheus histogram (cumulative buckets rendered by :meth:`samples`)."""

    buckets: tuple[float, ...] = _BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * len(_BUCKETS))
    total: float = 0.0
    count: int = 0

    def observe(self, v: float) -> None:
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1
                break
        self.total += v
        self.count += 1

    def samples(self, labels: str) -> list[tuple[str, float]]:
        """``(suffix{labels}, value)`` pairs: ``_bucket`` per bound and ``+Inf``, ``_sum``, ``_count``."""
        out, run = [], 0
        for b, c in zip(self.buckets, self.counts, strict=True):
            run += c
            out.append((f'_bucket{{{labels},le="{b}"}}', run))
        out.append((f'_bucket{{{labels},le="+Inf"}}', self.count))
        out.append((f"_sum{{{labels}}}", self.total))
        out.append((f"_count{{{labels}}}", self.count))
        return out


@dataclass
class PdStats:
    """The router's P/D counters (see Note [P/D flow])."""

    requests: int = 0  # split: prefill on one instance, decode on another
    local: int = 0  # the prefill instance was also the best decode instance: served whole there
    fallbacks: int = 0  # no prefill or no decode instance left: served whole
    unsplit: int = 0  # not splittable (batch prompt, n > 1, own kv_transfer_params): served whole
    prefill_retries: int = 0
    decode_retries: int = 0
    no_params: int = 0  # prefill answers without kv_transfer_params (the decode computed the prompt)
    seconds: dict[str, Histogram] = field(default_factory=lambda: {s: Histogram() for s in STAGES})


def splittable(path: str, body: dict[str, Any]) -> bool:
    """Whether a request can be served as prefill + decode (see Note [P/D flow])."""
    if "kv_transfer_params" in body:
        return False
    for k in ("n", "best_of"):
        if body.get(k) not in (None, 1):
            return False
    if path.endswith("/chat/completions"):
        return isinstance(body.get("messages"), list)
    prompt = body.get("prompt")
    return isinstance(prompt, str) or (isinstance(prompt, list) and bool(prompt)
                                       and all(isinstance(t, int) for t in prompt))


def prefill_body(path: str, body: dict[str, Any]) -> dict[str, Any]:
    """The prefill half of ``body``: one token, not streamed, its KV offered to a decode instance."""
    out = {k: v for k, v in body.items() if k not in ("stream_options", "min_tokens")}
    out.update(max_tokens=1, stream=False,
               kv_transfer_params={"do_remote_decode": True, "do_remote_prefill": False})
    if "max_completion_tokens" in out:
        out["max_completion_tokens"] = 1
    return out


async def serve(router: Router, request: Any, path: str, raw: bytes, body: dict[str, Any],
                tokens: list[int] | None, model: str | None) -> Any:
    """Serve one client request as prefill + decode (Note [P/D flow]); returns the client's response."""
    from aiohttp import web

    st: PdStats = router.pd
    if not splittable(path, body):
        st.unsplit += 1
        return await route(router, request, path, raw, tokens, model)
    headers = forward_headers(request)
    # -- prefill ------------------------------------------------------------------------------
    not_prefill = router.slots("decode")
    tried: set[int] = set()
    while True:
        ranked = router.rank(tokens, tried | not_prefill, model)
        decoders = router.rank_decode(tokens, set(), model, ranked[0].slot) if ranked else []
        if not decoders:
            st.fallbacks += 1
            return await route(router, request, path, raw, tokens, model, exclude=tried)
        est = ranked[0]
        p = router.instances[est.slot]
        tried.add(p.slot)
        if decoders[0].slot == p.slot:
            st.local += 1
            try:
                return await send_whole(router, request, p, est, path, raw, headers)
            except Retryable as e:
                logger.info("kvbm router: %s", e)
                st.prefill_retries += 1
                router.retries += 1
                continue
        router.placed(p, est.uncached_tokens, est.cached_tokens)
        p.prefills += 1
        t0 = time.perf_counter()
        try:
            status, answer, praw = await post_json(router, p, path, prefill_body(path, body), headers)
        except Retryable as e:
            logger.info("kvbm router: prefill failed, trying another instance: %s", e)
            st.prefill_retries += 1
            router.retries += 1
            continue
        finally:
            p.load.active -= 1
            p.load.pending_prefill_tokens -= est.uncached_tokens
        st.seconds["prefill"].observe(time.perf_counter() - t0)
        if status != 200:
            return web.Response(body=praw, status=status, content_type="application/json")
        params = answer.get("kv_transfer_params") if isinstance(answer, dict) else None
        if not isinstance(params, dict):
            logger.warning("kvbm router: %s answered the prefill without kv_transfer_params (is its kvbm "
                           "connector a kv_producer?); the decode instance computes the prompt", p.cfg.label)
            st.no_params += 1
        break
    # -- decode -------------------------------------------------------------------------------
    data = json.dumps({**body, "kv_transfer_params": params} if isinstance(params, dict) else body).encode()
    stream = bool(body.get("stream"))
    not_decode = router.slots("prefill")
    tried = set()
    last_error = "no healthy decode instance"
    while True:
        ranked_d = router.rank_decode(tokens, tried | not_decode, model, p.slot)
        if not ranked_d:
            st.fallbacks += 1
            logger.info("kvbm router: no decode instance left (%s); serving the request whole", last_error)
            return await route(router, request, path, raw, tokens, model, exclude=tried)
        de = ranked_d[0]
        d = router.instances[de.slot]
        tried.add(d.slot)
        if d.slot == p.slot:  # holds the whole prompt: no params needed
            try:
                return await send_whole(router, request, d, Estimate(d.slot, 0.0, 0, 0, ()), path, raw, headers)
            except Retryable as e:
                last_error = str(e)
                continue
        router.placed(d, 0, de.held_blocks * d.block_size)
        d.decodes += 1
        idle = d.load.active == 1
        t0 = time.perf_counter()

        def first(d: Any = d, de: Any = de, idle: bool = idle, t0: float = t0) -> None:
            ttfb = time.perf_counter() - t0
            st.seconds["decode_first_byte"].observe(ttfb)
            if stream and idle and de.pulled_blocks:
                spent = max(ttfb - d.rates.decode_step_s, 1e-4)
                sample = de.pulled_blocks * d.rates.block_bytes / spent
                for i in router.instances:  # one figure for the fleet (see Note [Decode placement])
                    if i.cfg.pull_bandwidth is None:
                        i.rates.smooth(pull_bandwidth=sample)

        extra = {"x-kvbm-instance": d.cfg.label, "x-kvbm-prefill-instance": p.cfg.label,
                 "x-kvbm-cached-tokens": str(est.cached_tokens), "x-kvbm-pulled-blocks": str(de.pulled_blocks)}
        try:
            resp = await relay(router, request, d, path, data, headers, extra, first)
        except Retryable as e:
            logger.info("kvbm router: decode failed, trying another instance: %s", e)
            last_error = str(e)
            st.decode_retries += 1
            router.retries += 1
            continue
        finally:
            d.load.active -= 1
        st.seconds["decode"].observe(time.perf_counter() - t0)
        st.requests += 1
        return resp


def metric_families(router: Router) -> list[tuple[str, str, str, list[tuple[str, float]]]]:
    """``(name, kind, help, samples)`` of the P/D families for ``/metrics`` (none when P/D is off)."""
    st: PdStats | None = router.pd
    if st is None:
        return []
    lab = [(i, f'instance="{i.cfg.label}"') for i in router.instances]
    hist: list[tuple[str, float]] = []
    for stage, h in st.seconds.items():
        hist += h.samples(f'stage="{stage}"')
    return [
        ("kvbm_router_pd_requests_total", "counter", "requests served as prefill on one instance, decode on another",
         [("", st.requests)]),
        ("kvbm_router_pd_whole_total", "counter", "requests served whole in P/D mode, by reason",
         [('{reason="local"}', st.local), ('{reason="fallback"}', st.fallbacks),
          ('{reason="unsplittable"}', st.unsplit)]),
        ("kvbm_router_pd_retries_total", "counter", "P/D halves sent again to another instance",
         [('{stage="prefill"}', st.prefill_retries), ('{stage="decode"}', st.decode_retries)]),
        ("kvbm_router_pd_missing_params_total", "counter", "prefill answers without kv_transfer_params",
         [("", st.no_params)]),
        ("kvbm_router_pd_placements_total", "counter", "P/D halves sent to each instance",
         [(f'{{{lb},stage="prefill"}}', i.prefills) for i, lb in lab]
         + [(f'{{{lb},stage="decode"}}', i.decodes) for i, lb in lab]),
        ("kvbm_router_pd_pull_bandwidth_bytes_per_second", "gauge", "KV pull bandwidth of decode instances "
         "(configured or measured)", [(f"{{{lb}}}", i.rates.pull_bandwidth) for i, lb in lab
                                      if i.cfg.role != "prefill"]),
        ("kvbm_router_pd_seconds", "histogram", "P/D latencies: the prefill answer, the decode's first byte, "
         "the whole decode", hist),
    ]
