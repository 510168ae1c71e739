"""The router's upstream calls: send a request to one instance and pass its answer to the client.

:func:`relay` streams an instance's answer back chunk by chunk (the client's response starts with
the instance's first chunk); :func:`post_json` reads a whole JSON answer (the prefill half of P/D).
Both raise :class:`Retryable` when the request may go to another instance: the connection failed
(the instance is marked down, except on a timeout) or it answered 502/503/504 — and, for
:func:`relay`, no byte reached the client yet. :func:`route` is the plain placement loop (one
instance serves the whole request), also the fallback of P/D (kvbm/router/pd.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

from kvbm.router.cost import Estimate
from kvbm.router.server import Instance, Router

logger = logging.getLogger("kvbm.router")

#: Headers not forwarded in either direction (hop-by-hop, or recomputed by aiohttp).
HOP = {"content-length", "transfer-encoding", "connection", "keep-alive", "content-encoding", "host"}
_RETRY_STATUS = (502, 503, 504)


class Retryable(Exception):
    """The instance did not serve the request and nothing reached the client: try another."""


def err(status: int, msg: str) -> Any:
    """An OpenAI-style error answer."""
    from aiohttp import web

    return web.json_response({"error": {"message": msg, "type": "kvbm_router", "code": status}}, status=status)


def forward_headers(request: Any) -> dict[str, str]:
    """The client's headers that go upstream."""
    return {k: v for k, v in request.headers.items() if k.lower() not in HOP}


def _failed(router: Router, inst: Instance, e: BaseException) -> Retryable:
    why = f"{inst.cfg.label}: {type(e).__name__}: {e}"
    if not isinstance(e, asyncio.TimeoutError):
        router.mark_down(inst, why)
    return Retryable(why)


def _errors() -> tuple[type[BaseException], ...]:
    import aiohttp

    return (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError, OSError)


async def post_json(router: Router, inst: Instance, path: str, body: Mapping[str, Any],
                    headers: Mapping[str, str]) -> tuple[int, Any, bytes]:
    """POST ``body`` to ``inst`` and read the whole answer: ``(status, parsed JSON or None, raw)``.

    Raises:
        Retryable: connection failure, timeout, or a 502/503/504 answer.
    """
    import aiohttp

    try:
        async with router.session.post(inst.cfg.url + path, json=body, headers=headers,
                                       timeout=aiohttp.ClientTimeout(total=router.cfg.request_timeout_s)) as up:
            raw = await up.read()
            status = up.status
    except _errors() as e:
        raise _failed(router, inst, e) from None
    if status in _RETRY_STATUS:
        raise Retryable(f"{inst.cfg.label} answered {status}")
    try:
        return status, json.loads(raw), raw
    except ValueError:
        return status, None, raw


async def relay(router: Router, request: Any, inst: Instance, path: str, data: bytes, headers: Mapping[str, str],
                extra_headers: Mapping[str, str], on_first: Callable[[], None] | None = None) -> Any:
    """POST ``data`` to ``inst`` and stream its answer to the client unchanged (plus ``extra_headers``);
    ``on_first`` runs when its first chunk arrives. An instance failing after bytes reached the
    client ends the client's answer there (a client never sees two partial answers).

    Raises:
        Retryable: as :func:`post_json`, before any byte reached the client.
    """
    import aiohttp
    from aiohttp import web

    resp: web.StreamResponse | None = None
    try:
        async with router.session.post(inst.cfg.url + path, data=data, headers=headers,
                                       timeout=aiohttp.ClientTimeout(total=router.cfg.request_timeout_s)) as up:
            if up.status >= 500:
                text = await up.read()
                if up.status in _RETRY_STATUS:
                    raise Retryable(f"{inst.cfg.label} answered {up.status}")
                return web.Response(body=text, status=up.status, content_type=up.content_type)
            resp = web.StreamResponse(status=up.status, headers={
                k: v for k, v in up.headers.items() if k.lower() not in HOP})
            resp.headers.update(extra_headers)
            first = True
            async for chunk in up.content.iter_any():
                if first:
                    await resp.prepare(request)
                    if on_first is not None:
                        on_first()
                    first = False
                await resp.write(chunk)
            if first:
                await resp.prepare(request)
            await resp.write_eof()
            return resp
    except _errors() as e:
        failure = _failed(router, inst, e)
        if resp is not None and resp.prepared:
            logger.warning("kvbm router: %s failed mid-answer: %s", inst.cfg.label, e)
            return resp
        raise failure from None


async def send_whole(router: Router, request: Any, inst: Instance, est: Estimate, path: str, raw: bytes,
                     headers: Mapping[str, str], extra_headers: Mapping[str, str] | None = None) -> Any:
    """The whole request to ``inst`` (placed by ``est``), its answer relayed; load counted meanwhile.

    Raises:
        Retryable: as :func:`relay`.
    """
    router.placed(inst, est.uncached_tokens, est.cached_tokens)
    pending = [est.uncached_tokens]

    def first() -> None:
        inst.load.pending_prefill_tokens -= pending[0]
        pending[0] = 0

    try:
        return await relay(router, request, inst, path, raw, headers,
                           {**(extra_headers or {}), "x-kvbm-instance": inst.cfg.label,
                            "x-kvbm-cached-tokens": str(est.cached_tokens)}, first)
    finally:
        inst.load.active -= 1
        inst.load.pending_prefill_tokens -= pending[0]


async def route(router: Router, request: Any, path: str, raw: bytes, tokens: list[int] | None,
                model: str | None, exclude: set[int] | None = None,
                extra_headers: Mapping[str, str] | None = None) -> Any:
    """Place the whole request on the best instance not in ``exclude`` (Note [Routing cost model])
    and relay its answer; on a :class:`Retryable` failure the next best, until none is left (503)."""
    tried = set(exclude or ())
    last_error = "no healthy instance"
    headers = forward_headers(request)
    while True:
        ranked = router.rank(tokens, tried, model)
        if not ranked:
            return err(503, f"kvbm router: no instance could serve the request ({last_error})")
        inst = router.instances[ranked[0].slot]
        tried.add(inst.slot)
        try:
            return await send_whole(router, request, inst, ranked[0], path, raw, headers, extra_headers)
        except Retryable as e:
            last_error = str(e)
            router.retries += 1
