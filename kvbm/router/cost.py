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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

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

    def smooth(self, prefill_tokens_per_s: float | None = None, decode_step_s: float | None = None,
               alpha: float = 0.3) -> None:
        """Blend a new measurement in (exponential smoothing); non-positive values are ignored."""
        if prefill_tokens_per_s and prefill_tokens_per_s > 0:
            self.prefill_tokens_per_s += alpha * (prefill_tokens_per_s - self.prefill_tokens_per_s)
        if decode_step_s and decode_step_s > 0:
            self.decode_step_s += alpha * (decode_step_s - self.decode_step_s)


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
    queue = (load.pending_prefill_tokens / rate + load.active * rates.decode_step_s
             + load.reported_waiting * rates.decode_step_s)
    return Estimate(slot, queue + uncached / rate + load_s, cached, uncached, tuple(counted))


def choose(estimates: Sequence[Estimate], loads: dict[int, Load], tie: float = 0.1) -> Estimate:
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
