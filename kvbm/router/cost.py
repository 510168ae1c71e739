"""The router's cost model: expected time to first token of a request on each instance.

Note [Routing cost model]
-------------------------
For instance *i* and a request of ``n`` prompt tokens whose first blocks *i* holds (``tiers[j]``
is the best tier of block j on *i*, a shared REMOTE tier counting for every instance)::

    ttft_i = queue_i + uncached_tokens_i / prefill_rate_i + sum_j load_j
    queue_i = pending_prefill_tokens_i / prefill_rate_i + active_i * decode_step_s_i
    load_j  = min(block_bytes_i / bandwidth_i[tier_j],  block_size_i / prefill_rate_i)

``pending_prefill_tokens`` counts the uncached tokens of requests this router sent to *i* that
have not produced their first token yet, plus what *i* reports waiting; ``active_i`` the requests
in flight. GPU blocks cost nothing. A tier slower than recomputing (its load time per block
above ``block_size / prefill_rate``) is counted as recompute: a slow disk never attracts traffic.
The instance with the least expected TTFT wins; estimates within 10% of the best are ties (rates
are noisy), settled by fewer active requests, fewer requests routed so far, the lower slot.

``prefill_rate`` (tokens/s) and ``decode_step_s`` come from a start-up probe (one request of
random tokens, so nothing is cached) and are refreshed from the instance's ``/metrics``
(prefill time and computed prompt tokens since the last scrape), smoothed. ``block_bytes`` comes
from ``vllm:cache_config_info`` (KV cache bytes / blocks) unless configured; tier bandwidths are
configured per instance (defaults below: host memory over PCIe, a local NVMe, a store over a
network) and kvbm's measured figures can be put there.

Note [Decode placement]
-----------------------
With prefill and decode apart (kvbm/router/pd.py), the prefill instance is chosen as above among
the prefill-capable instances, and the decode instance *d* by the time until its first token::

    decode_d = queue_d + decode_step_s_d + sum_j held_j + pulled_blocks_d * block_bytes_d / pull_bandwidth_d

``held_j`` is the load of a prompt block *d* already holds (free on its GPU, ``block_bytes /
bandwidth[tier]`` from kvbm's host or disk tier: the connector takes its own tiers first); the rest
of the prompt's full blocks (at most ``(n - 1) // block_size``: the last token is computed) are pulled
from the prefill instance. An instance that both prefilled and may decode (role ``both``) holds
every block. ``pull_bandwidth`` is configured per instance, else measured from streamed decodes
(pulled bytes over the first byte's delay on an idle decode instance less one decode step: an
effective figure, request overheads included), starting from the router's ``pd_bandwidth``. The
measured figure is one for the whole fleet, not per instance: one slow sample must not starve an
instance of the decodes that would measure it again.

The queue term makes in-flight decodes spread in inverse proportion to the decode step: two
instances are level when ``active_a * step_a == active_b * step_b``, so an instance decoding three
times slower holds a third as many decodes (tests/test_router_pd_unit.py). Ties as above.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from kvbm.router.index import CPU, DISK, GPU, REMOTE

#: Default load bandwidth per tier, bytes/s (GPU: already in place).
DEFAULT_BANDWIDTH = {GPU: float("inf"), CPU: 20e9, DISK: 2e9, REMOTE: 1e9}


@dataclass
class Rates:
    """Measured speeds of one instance (see the note)."""

    prefill_tokens_per_s: float = 5_000.0
    decode_step_s: float = 0.01
    block_bytes: int = 0
    bandwidth: dict[int, float] = field(default_factory=lambda: dict(DEFAULT_BANDWIDTH))
    pull_bandwidth: float = 5e9  # bytes/s of KV pulled from a prefill instance (see Note [Decode placement])

    def smooth(self, prefill_tokens_per_s: float | None = None, decode_step_s: float | None = None,
               pull_bandwidth: float | None = None, alpha: float = 0.3) -> None:
        """Blend a new measurement in (exponential smoothing); non-positive values are ignored."""
        if prefill_tokens_per_s and prefill_tokens_per_s > 0:
            self.prefill_tokens_per_s += alpha * (prefill_tokens_per_s - self.prefill_tokens_per_s)
        if decode_step_s and decode_step_s > 0:
            self.decode_step_s += alpha * (decode_step_s - self.decode_step_s)
        if pull_bandwidth and pull_bandwidth > 0:
            self.pull_bandwidth += alpha * (pull_bandwidth - self.pull_bandwidth)


@dataclass
class Load:
    """Work an instance has in flight, as the router sees it."""

    active: int = 0
    pending_prefill_tokens: int = 0
    reported_waiting: int = 0  # vllm:num_requests_waiting at the last scrape
    routed: int = 0  # requests sent so far (spreads ties)


@dataclass(frozen=True)
class Estimate:
    slot: int
    ttft_s: float
    cached_tokens: int  # tokens of the prefix counted as loaded, not recomputed
    uncached_tokens: int
    tiers: tuple[int, ...]  # the blocks counted as cached, by tier


@dataclass(frozen=True)
class DecodeEstimate:
    slot: int
    ttft_s: float  # expected time until the decode instance's first token (Note [Decode placement])
    held_blocks: int  # prompt blocks it already holds (not pulled)
    pulled_blocks: int  # prompt blocks it pulls from the prefill instance


def queue_s(rates: Rates, load: Load) -> float:
    """Seconds of work ahead of a new request on an instance (see Note [Routing cost model])."""
    rate = max(rates.prefill_tokens_per_s, 1e-9)
    return (load.pending_prefill_tokens / rate + load.active * rates.decode_step_s
            + load.reported_waiting * rates.decode_step_s)


def estimate(slot: int, num_tokens: int, block_size: int, tiers: Sequence[int], rates: Rates,
             load: Load) -> Estimate:
    """Expected TTFT of a ``num_tokens`` prompt on this instance (see the note).

    The last prompt token is always computed, so at most ``(num_tokens - 1) // block_size``
    blocks count as cached.
    """
    rate = max(rates.prefill_tokens_per_s, 1e-9)
    recompute_block = block_size / rate
    usable = min(len(tiers), max(0, (num_tokens - 1) // block_size))
    load_s = 0.0
    counted: list[int] = []
    for t in tiers[:usable]:
        if t == GPU:
            counted.append(t)
            continue
        bw = rates.bandwidth.get(t, 0.0)
        per_block = rates.block_bytes / bw if bw > 0 else float("inf")
        if per_block >= recompute_block:
            break  # slower than recompute: this block and the rest are recomputed
        load_s += per_block
        counted.append(t)
    cached = len(counted) * block_size
    uncached = num_tokens - cached
    return Estimate(slot, queue_s(rates, load) + uncached / rate + load_s, cached, uncached, tuple(counted))


def decode_estimate(slot: int, num_tokens: int, block_size: int, tiers: Sequence[int], rates: Rates,
                    load: Load) -> DecodeEstimate:
    """Expected time until the first token of a decode on this instance, the prompt prefilled
    elsewhere: ``tiers`` are the prompt blocks it holds (see Note [Decode placement])."""
    blocks = max(0, (num_tokens - 1) // block_size) if block_size else 0
    pull_block = rates.block_bytes / max(rates.pull_bandwidth, 1e-9)
    held_s = 0.0
    held = 0
    for t in tiers[:blocks]:  # the connector loads what it holds, then pulls the rest
        bw = rates.bandwidth.get(t, 0.0)
        if t != GPU and bw <= 0:
            break
        held_s += 0.0 if t == GPU else rates.block_bytes / bw
        held += 1
    pulled = blocks - held
    ttft = queue_s(rates, load) + rates.decode_step_s + held_s + pulled * pull_block
    return DecodeEstimate(slot, ttft, held, pulled)


E = TypeVar("E", Estimate, DecodeEstimate)


def choose(estimates: Sequence[E], loads: dict[int, Load], tie: float = 0.1) -> E:
    """The estimate with the least TTFT; estimates within ``tie`` (relative, plus 1 ms) of the best
    are ties — measured rates are noisy — settled by fewer active requests, then fewer requests
    routed so far, then the lower slot (deterministic).

    Raises:
        kvbm.errors.StateError: no estimate (no healthy instance).
    """
    if not estimates:
        from kvbm.errors import StateError

        raise StateError("no healthy instance to route to")
    best = min(e.ttft_s for e in estimates)
    close = [e for e in estimates if e.ttft_s <= best * (1 + tie) + 1e-3]
    return min(close, key=lambda e: (loads[e.slot].active, loads[e.slot].routed, e.slot))
