"""Prefill -> decode (disaggregated serving) through the kvbm vLLM connector.

The prefill instance (``kv_role: kv_producer``) computes a prompt and stores its full blocks in
its kvbm host tier, as any kvbm instance does. When a request asks for it (vLLM's convention:
``kv_transfer_params = {"do_remote_decode": true}``), ``request_finished`` returns
``kv_transfer_params`` that say where those blocks are; a proxy hands them to the decode instance
(``kv_role: kv_consumer``) with the same prompt, and its workers pull the blocks with one-sided
UCX gets (:mod:`kvbm.transfer`) from the producer's host arenas, rank r from rank r.

Note [P/D protocol]
-------------------
* Every producer worker rank registers its host arena and a *slot table* (32 bytes per host
  slot: the 16-byte kvbm hash of the block the slot holds, its CRC32C, a valid flag) with a
  :class:`~kvbm.transfer.TransferEngine` and serves the engine's metadata on ``pd_host``:
  ``pd_port`` (+ rank; 0 = an ephemeral port). Addresses reach the scheduler half through vLLM's
  handshake metadata (``get_handshake_metadata`` -> ``set_xfer_handshake_metadata``) at start-up.
* A store clears the slot's table entry, copies the block, then writes its hash and CRC32C.
* ``request_finished`` (producer) answers with the request's full prompt blocks that are in the
  host tier (ready, or stored in this very step: vLLM calls ``request_finished`` before it hands
  the connector the step's worker reports), their host slots, the rank addresses and a lease id.
  The blocks are pinned (not evictable) until every consumer rank has notified the lease done,
  or ``pd_lease_s`` passed.
* The consumer hashes its own prompt with its own namespace and claims the longest prefix of
  blocks whose hashes equal the producer's (another model, layout, LoRA or prompt never matches),
  minus vLLM's local prefix-cache hit and never the last prompt token; the load is asynchronous.
  Its worker gets the slots' bytes *and* table entries, and copies a block into vLLM's cache only
  when the entry holds the expected hash, is valid, and the CRC32C of the received bytes equals
  it. Anything else (peer unreachable or dead, timeout, mismatch) is a load error for that block
  and later ones: vLLM recomputes them (``kv_load_failure_policy: recompute``). Every wait is
  bounded by ``pd_timeout_s``. Then it notifies the producer rank that the lease is done.

Consumers store blocks like any kvbm instance (so a repeated prefix hits locally); pulled blocks
land in a private staging buffer, not in host slots.

This module imports neither vLLM nor torch.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvbm import Tier, _native
from kvbm.errors import ConfigError, KvbmError, UnsupportedError

logger = logging.getLogger("kvbm.vllm")

#: Key of kvbm's entry in ``kv_transfer_params``.
PARAMS_KEY = "kvbm_pd"
PARAMS_VERSION = 1
TABLE_ENTRY = 32  # bytes per slot-table entry: hash[16] | crc32c u32 | valid u32 | reserved[8]
_RELEASE = b"kvbm-pd-release:"
_HOST = int(Tier.HOST)
_STAGING_BYTES = 64 << 20  # consumer staging per rank (blocks pulled per round trip)

#: vLLM ``RequestStatus`` names of requests that did not finish normally: never offered.
_NOT_OFFERED = frozenset({"FINISHED_ABORTED", "FINISHED_ERROR", "FINISHED_IGNORED"})

#: Extra-config keys of P/D (see :class:`PdConfig`).
PD_KEYS = ("pd", "pd_host", "pd_port", "pd_lease_s", "pd_timeout_s")


# ---------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class PdConfig:
    """P/D settings of one instance.

    Attributes:
        produce: serve this instance's host tier to decode instances (``kv_producer``, or
            ``kv_both`` with ``"pd": true``).
        consume: pull blocks named by incoming ``kv_transfer_params`` (``kv_consumer``, or
            ``kv_both`` with ``"pd": true``).
        host: address the producer's ranks listen on and advertise (``pd_host``).
        port: base port (``pd_port``): rank r listens on ``port + r``; 0 = ephemeral ports.
        lease_s: how long a producer keeps a finished request's blocks pinned for a consumer
            that has not reported them pulled (``pd_lease_s``).
        timeout_s: bound on a consumer's connect and on each transfer wait (``pd_timeout_s``).
    """

    produce: bool = False
    consume: bool = False
    host: str = "127.0.0.1"
    port: int = 0
    lease_s: float = 120.0
    timeout_s: float = 10.0

    @classmethod
    def parse(cls, data: dict[str, Any], kv_role: str | None, source: str) -> PdConfig | None:
        """Pop the P/D keys from ``data``; None when P/D is off for this instance.

        P/D is on by default for ``kv_producer`` and ``kv_consumer``, off for ``kv_both`` unless
        ``"pd": true`` (then the instance does both).

        Raises:
            ConfigError: a bad value, or a ``pd_*`` key while P/D is off (the key is named).
        """
        on = data.pop("pd", None)
        if on is not None and not isinstance(on, bool):
            raise ConfigError(f"{source}['pd']: expected true/false, got {on!r}")
        if on is None:
            on = kv_role in ("kv_producer", "kv_consumer")
        kw: dict[str, Any] = {}
        given = [k for k in PD_KEYS[1:] if k in data]
        if "pd_host" in data:
            v = data.pop("pd_host")
            if not isinstance(v, str) or not v or v in ("0.0.0.0", "::"):
                raise ConfigError(f"{source}['pd_host']: expected the host name or address decode instances "
                                  f"connect to (not a wildcard), got {v!r}")
            kw["host"] = v
        if "pd_port" in data:
            v = data.pop("pd_port")
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 65535:
                raise ConfigError(f"{source}['pd_port']: expected an int in 0..65535, got {v!r}")
            kw["port"] = v
        for key, name in (("pd_lease_s", "lease_s"), ("pd_timeout_s", "timeout_s")):
            if key in data:
                v = data.pop(key)
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                    raise ConfigError(f"{source}[{key!r}]: expected a number of seconds > 0, got {v!r}")
                kw[name] = float(v)
        if not on:
            if given:
                raise ConfigError(f"{source}[{given[0]!r}]: prefill/decode is off for kv_role={kv_role!r} "
                                  f"(use kv_producer / kv_consumer, or set 'pd': true)")
            return None
        produce = kv_role in ("kv_producer", "kv_both")
        consume = kv_role in ("kv_consumer", "kv_both")
        if not (produce or consume):
            raise ConfigError(f"{source}['pd']: prefill/decode needs kv_role kv_producer, kv_consumer or "
                              f"kv_both, got {kv_role!r}")
        return cls(produce=produce, consume=consume, **kw)


# ---------------------------------------------------------------------------------------- params
@dataclass(frozen=True)
class RankAddr:
    """Where one producer rank's blocks are: its metadata socket and registered regions."""

    host: str
    port: int
    arena: int  # address of the host arena (slot s at arena + s * slot_bytes)
    table: int  # address of the slot table (entry s at table + s * TABLE_ENTRY)
    slots: int
    slot_bytes: int

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class PdSource:
    """A producer's offer as the consumer understood it (shared by the request's load ops)."""

    lease: str
    ranks: tuple[RankAddr, ...]


@dataclass(frozen=True)
class Offer:
    """Validated ``kv_transfer_params[PARAMS_KEY]``."""

    source: PdSource
    hashes: list[bytes]
    slots: list[int]


class ParamsError(ValueError):
    """``kv_transfer_params`` that this instance cannot use (the message says why)."""


def make_params(lease: str, ns_digest: bytes, block_size: int, ranks: list[RankAddr], hashes: list[bytes],
                slots: list[int], num_tokens: int) -> dict[str, Any]:
    """The producer's ``kv_transfer_params`` (JSON-serialisable; vLLM's P/D keys included)."""
    return {
        "do_remote_prefill": True,
        "do_remote_decode": False,
        PARAMS_KEY: {
            "v": PARAMS_VERSION,
            "lease": lease,
            "ns": ns_digest.hex(),
            "block_size": block_size,
            "ranks": [r.to_json() for r in ranks],
            "hashes": base64.b64encode(b"".join(hashes)).decode(),
            "slots": list(slots),
            "num_tokens": num_tokens,
        },
    }


def parse_params(params: Mapping[str, Any] | None, ns_digest: bytes, block_size: int, tp_world: int,
                 slot_bytes: int) -> Offer | None:
    """The offer in ``params``, or None when there is none (no ``PARAMS_KEY`` / not a remote prefill).

    Raises:
        ParamsError: malformed, another version, or made for a different namespace, block size,
            tensor-parallel size or block layout than this instance's.
    """
    if not isinstance(params, Mapping) or not params.get("do_remote_prefill"):
        return None
    p = params.get(PARAMS_KEY)
    if p is None:
        return None
    try:
        if not isinstance(p, Mapping):
            raise ParamsError(f"{PARAMS_KEY} is a {type(p).__name__}, not a mapping")
        if p.get("v") != PARAMS_VERSION:
            raise ParamsError(f"version {p.get('v')!r}, this kvbm speaks {PARAMS_VERSION}")
        if p["ns"] != ns_digest.hex():
            raise ParamsError("namespace differs (another model, dtype, layout, block size, TP size or hash "
                              "algorithm)")
        if int(p["block_size"]) != block_size:
            raise ParamsError(f"block size {p['block_size']} != {block_size}")
        ranks = tuple(RankAddr(str(r["host"]), int(r["port"]), int(r["arena"]), int(r["table"]), int(r["slots"]),
                               int(r["slot_bytes"])) for r in p["ranks"])
        if len(ranks) != tp_world:
            raise ParamsError(f"{len(ranks)} producer ranks, this instance has {tp_world}")
        for r in ranks:
            if r.slot_bytes != slot_bytes:
                raise ParamsError(f"producer blocks are {r.slot_bytes} bytes per rank, here {slot_bytes}")
            if not 0 < r.port < 65536:
                raise ParamsError(f"bad port {r.port}")
        raw = base64.b64decode(p["hashes"], validate=True)
        if len(raw) % 16:
            raise ParamsError(f"hashes: {len(raw)} bytes is not a multiple of 16")
        hashes = [raw[i:i + 16] for i in range(0, len(raw), 16)]
        slots = [int(s) for s in p["slots"]]
        if len(slots) != len(hashes):
            raise ParamsError(f"{len(hashes)} hashes but {len(slots)} slots")
        if any(not 0 <= s < r.slots for s in slots for r in ranks):
            raise ParamsError("a slot is outside the producer's host arena")
        lease = str(p["lease"])
    except ParamsError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise ParamsError(f"malformed {PARAMS_KEY}: {type(e).__name__}: {e}") from None
    return Offer(PdSource(lease, ranks), hashes, slots)


def match_prefix(own: list[bytes], offered: list[bytes]) -> int:
    """Number of leading blocks whose hashes are equal (chained hashes: equal => same prefix)."""
    n = 0
    for a, b in zip(own, offered):
        if a != b:
            break
        n += 1
    return n


# ------------------------------------------------------------------------------ scheduler half
@dataclass
class _Lease:
    expires: float
    pinned: list[bytes] = field(default_factory=list)
    pending: list[bytes] = field(default_factory=list)  # stored this step; pinned once ready
    reports: int = 0


@dataclass
class PdStats:
    offers: int = 0  # producer: requests answered with kv_transfer_params
    offered_blocks: int = 0
    leases_released: int = 0
    leases_expired: int = 0
    remote_reqs: int = 0  # consumer: requests with a remote hit
    hit_blocks_remote: int = 0
    rejected_params: int = 0  # consumer: params it could not use
    pulled_blocks: int = 0  # consumer: blocks pulled and verified, as reported by the workers (all ranks)
    pull_ns: int = 0  # consumer: worker time spent pulling: get, verify, copy to the load buffer (all ranks)


class PdScheduler:
    """P/D bookkeeping in the scheduler half (``index`` is the connector's TierIndex)."""

    def __init__(self, cfg: PdConfig, index: Any, ns_digest: bytes, block_size: int, tp_world: int,
                 slot_bytes: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.index = index
        self.ns_digest = ns_digest
        self.bs = block_size
        self.tp = tp_world
        self.slot_bytes = slot_bytes
        self.clock = clock
        self.ranks: list[RankAddr] | None = None
        self.leases: dict[str, _Lease] = {}
        self._waiting: set[str] = set()  # leases with blocks still being stored
        self.offers: dict[str, tuple[PdSource, list[int]]] = {}  # req id -> (source, slots) of a remote hit
        self.pulled: set[str] = set()  # requests whose remote load was planned: never claimed twice
        self._unused: dict[str, PdSource] = {}  # offers this instance will not pull: released by the workers
        self._released: set[str] = set()  # requests whose offer was released unused
        self.stats = PdStats()

    # -- addresses (vLLM handshake metadata) -----------------------------------------------
    def set_ranks(self, meta: Mapping[int, Any]) -> None:
        """Producer rank addresses from the workers' ``get_handshake_metadata``."""
        ranks = []
        for r in range(self.tp):
            m = meta.get(r)
            if not isinstance(m, Mapping) or m.get("kind") != "kvbm_pd":
                logger.warning("kvbm: no P/D address from worker rank %d; this instance cannot serve decode "
                               "instances", r)
                return
            ranks.append(RankAddr(m["host"], int(m["port"]), int(m["arena"]), int(m["table"]), int(m["slots"]),
                                  int(m["slot_bytes"])))
        self.ranks = ranks

    # -- producer --------------------------------------------------------------------------
    def request_finished(self, request: Any, hashes: list[bytes]) -> dict[str, Any] | None:
        """``kv_transfer_params`` for a finished request that asked for remote decode, else None.

        ``hashes`` are the request's kvbm hashes of its full prompt blocks. Offers the leading
        blocks that are in the host tier (ready or being stored) and leases them. A request that
        was aborted (or failed, or was ignored) gets no offer and no lease.
        """
        params = getattr(request, "kv_transfer_params", None)
        if not self.cfg.produce or not isinstance(params, Mapping) or not params.get("do_remote_decode"):
            return None
        status = getattr(getattr(request, "status", None), "name", None)
        if status in _NOT_OFFERED:
            # vLLM calls request_finished for aborted requests too; their params reach no consumer,
            # and a lease would pin their blocks for pd_lease_s for nothing.
            return None
        if self.ranks is None:
            logger.warning("kvbm: request %s asked for remote decode but the P/D addresses are unknown",
                           request.request_id)
            return None
        self.expire()
        lease = _Lease(expires=self.clock() + self.cfg.lease_s)
        slots: list[int] = []
        idx = self.index.idx
        for h in hashes:
            e = idx.get(h)
            if e is None:
                break
            st, slot = e["state"][_HOST], e["slot"][_HOST]
            if slot is None or st == "absent":
                break
            if st == "ready":
                try:
                    idx.prepare_load(_HOST, [h])  # the pin: not evictable while leased
                except KvbmError:
                    break
                lease.pinned.append(h)
            else:
                lease.pending.append(h)
            slots.append(int(slot))
        n = len(slots)
        if n == 0:
            return None
        lid = uuid.uuid4().hex
        self.leases[lid] = lease
        if lease.pending:
            self._waiting.add(lid)
        self.stats.offers += 1
        self.stats.offered_blocks += n
        return make_params(lid, self.ns_digest, self.bs, self.ranks, hashes[:n], slots, n * self.bs)

    def on_stores_reported(self) -> None:
        """Pin leased blocks whose store became ready (call after the index processed reports)."""
        idx = self.index.idx
        for lid in list(self._waiting):
            lease = self.leases.get(lid)
            if lease is None:
                self._waiting.discard(lid)
                continue
            still = []
            for h in lease.pending:
                e = idx.get(h)
                if e is None or e["state"][_HOST] == "absent":
                    continue  # the store failed: the consumer's table check rejects the block
                if e["state"][_HOST] == "ready":
                    try:
                        idx.prepare_load(_HOST, [h])
                        lease.pinned.append(h)
                    except KvbmError:
                        pass
                else:
                    still.append(h)
            lease.pending = still
            if not still:
                self._waiting.discard(lid)

    def on_pulled(self, blocks: int, ns: int) -> None:
        self.stats.pulled_blocks += blocks
        self.stats.pull_ns += ns

    def on_released(self, released: Mapping[str, int]) -> None:
        """Consumer ranks reported leases done (counts summed over this instance's ranks)."""
        for lid, n in released.items():
            lease = self.leases.get(lid)
            if lease is None:
                continue
            lease.reports += n
            if lease.reports >= self.tp:
                self._drop(lid)
                self.stats.leases_released += 1

    def expire(self) -> None:
        """Unpin leases past ``pd_lease_s`` (leases are created in expiry order)."""
        now = self.clock()
        while self.leases:
            lid, lease = next(iter(self.leases.items()))
            if lease.expires > now:
                break
            self._drop(lid)
            self.stats.leases_expired += 1

    def _drop(self, lid: str) -> None:
        lease = self.leases.pop(lid)
        self._waiting.discard(lid)
        for h in lease.pinned:
            with contextlib.suppress(KvbmError):
                self.index.idx.complete_load(_HOST, [h])

    def pinned_blocks(self) -> int:
        return sum(len(le.pinned) for le in self.leases.values())

    # -- consumer --------------------------------------------------------------------------
    def match(self, request: Any, hashes: list[bytes], start: int, local_tiers: list[str]) -> list[str]:
        """Extend the local hit ``local_tiers`` (blocks ``start..``) with remote blocks.

        ``hashes`` are the request's own hashes up to the last-token limit. Returns the tiers of
        blocks ``start..``: the local ones, then ``"remote"`` while the producer's hashes match.
        """
        self.offers.pop(request.request_id, None)
        if not self.cfg.consume or request.request_id in self.pulled:
            # One remote load per request: after a failed one vLLM recomputes (or hits locally).
            return local_tiers
        try:
            offer = parse_params(getattr(request, "kv_transfer_params", None), self.ns_digest, self.bs, self.tp,
                                 self.slot_bytes)
        except ParamsError as e:
            self.stats.rejected_params += 1
            logger.warning("kvbm: request %s: kv_transfer_params not used (%s); computing the prompt",
                           request.request_id, e)
            return local_tiers
        if offer is None:
            return local_tiers
        n = match_prefix(hashes, offer.hashes)
        have = start + len(local_tiers)
        if n <= have:
            self._release_unused(request.request_id, offer.source)
            return local_tiers
        self.offers[request.request_id] = (offer.source, offer.slots)
        return local_tiers + ["remote"] * (n - have)

    def unneeded(self, request: Any) -> None:
        """The request will not pull its producer's offer (vLLM's own prefix cache covers it, or it
        finished without a planned remote load): release the offer unused, once."""
        if not self.cfg.consume or request.request_id in self._released or request.request_id in self.pulled:
            return
        try:
            offer = parse_params(getattr(request, "kv_transfer_params", None), self.ns_digest, self.bs, self.tp,
                                 self.slot_bytes)
        except ParamsError:
            return
        if offer is not None:
            self._release_unused(request.request_id, offer.source)

    def _release_unused(self, req_id: str, source: PdSource) -> None:
        # Everything the producer offers that is needed is cached here: let it unpin the blocks now.
        if req_id not in self._released:
            self._released.add(req_id)
            self._unused[source.lease] = source

    def drop_offer(self, req_id: str) -> None:
        """The remote hit matched for ``req_id`` will not be loaded (the scheduler dropped the hit,
        or the request finished before vLLM allocated its blocks): release the offer unused."""
        got = self.offers.pop(req_id, None)
        if got is not None and req_id not in self.pulled:
            self._release_unused(req_id, got[0])

    def remote_source(self, req_id: str, block_index: int) -> tuple[PdSource, int]:
        """(source, remote slot) of block ``block_index`` of a request with a remote hit."""
        src, slots = self.offers[req_id]
        return src, slots[block_index]

    def loaded(self, req_id: str, blocks: int) -> None:
        if blocks:
            self.stats.remote_reqs += 1
            self.stats.hit_blocks_remote += blocks
            self.pulled.add(req_id)
        self.offers.pop(req_id, None)

    def forget(self, req_id: str) -> None:
        self.drop_offer(req_id)  # matched, never loaded (e.g. aborted before allocation)
        self.pulled.discard(req_id)
        self._released.discard(req_id)

    def take_unused(self) -> list[PdSource]:
        """Offers to release without pulling (for this step's connector metadata)."""
        out = list(self._unused.values())
        self._unused.clear()
        return out

    def stats_dict(self) -> dict[str, Any]:
        return {f"pd_{k}": v for k, v in self.stats.__dict__.items()} | {
            "pd_leases": len(self.leases), "pd_pinned_blocks": self.pinned_blocks()}


# --------------------------------------------------------------------------------- worker half
def _crc(row: np.ndarray) -> int:
    return int(_native.crc32c(row))


class PdServer:
    """Producer rank: registers the host arena and its slot table, serves the engine's metadata."""

    def __init__(self, arena: np.ndarray, cfg: PdConfig, rank: int) -> None:
        from kvbm.transfer import TransferEngine

        if arena.ndim != 2 or arena.dtype != np.uint8 or not arena.flags.c_contiguous:
            raise ValueError("arena must be a C-contiguous uint8 array [slots, slot_bytes]")
        self.arena = arena
        self.table = np.zeros((arena.shape[0], TABLE_ENTRY), dtype=np.uint8)
        self.engine = TransferEngine(f"kvbm-pd-p{rank}-{os.getpid()}", error_handling=True)
        self.engine.register(arena)
        self.engine.register(self.table)
        port = cfg.port + rank if cfg.port else 0
        try:
            host, port = self.engine.listen(cfg.host, port)
        except OSError as e:
            self.engine.close()
            raise ConfigError(f"kv_connector_extra_config['pd_host'/'pd_port']: rank {rank} cannot listen on "
                              f"{cfg.host}:{port}: {e}") from None
        self.addr = RankAddr(cfg.host, int(port), int(arena.ctypes.data), int(self.table.ctypes.data),
                             int(arena.shape[0]), int(arena.shape[1]))
        logger.info("kvbm: rank %d serves P/D blocks on %s:%d", rank, cfg.host, port)

    def handshake(self) -> dict[str, Any]:
        return {"kind": "kvbm_pd", **self.addr.to_json()}

    def before_store(self, slots: list[int]) -> None:
        """Mark slots invalid before their bytes are overwritten."""
        self.table[np.asarray(slots, dtype=np.int64), 16:24] = 0

    def after_store(self, slots: list[int], hashes: list[bytes]) -> None:
        """Publish hash and CRC32C of freshly stored slots (cleared by :meth:`before_store`). The
        CRCs are computed first, so each entry is written in one short burst, valid flag last."""
        crcs = [_crc(self.arena[s]) for s in slots]
        for s, h, c in zip(slots, hashes, crcs):
            row = self.table[s]
            row[16:20] = np.frombuffer(c.to_bytes(4, "little"), dtype=np.uint8)
            row[:16] = np.frombuffer(h, dtype=np.uint8)
            row[20:24] = (1, 0, 0, 0)

    def released(self) -> dict[str, int]:
        """Leases consumers reported done since the last call."""
        out: dict[str, int] = {}
        for n in self.engine.notifications():
            if n.message.startswith(_RELEASE):
                lid = n.message[len(_RELEASE):].decode(errors="replace")
                out[lid] = out.get(lid, 0) + 1
        return out

    def close(self) -> None:
        self.engine.close()


class PdClient:
    """Consumer rank: pulls blocks from producer ranks into a staging buffer and verifies them.

    Not thread-safe: one load thread per worker uses it.
    """

    def __init__(self, slot_bytes: int, rank: int, timeout_s: float, staging_bytes: int = _STAGING_BYTES) -> None:
        self.slot_bytes = slot_bytes
        self.rank = rank
        self.timeout_s = timeout_s
        self.batch = max(1, staging_bytes // slot_bytes)
        self._engine: Any = None
        self._peers: dict[tuple[str, int], Any] = {}
        # Staging a timed-out get may still write into: (rows, entries, their regions, the gets),
        # released once those gets are done (they are cancelled when the peer is force-closed).
        self._retired: list[tuple[np.ndarray, np.ndarray, tuple[Any, ...], tuple[Any, ...]]] = []
        self._regions: tuple[Any, ...] = ()
        self.pulled_blocks = 0
        self.failed_blocks = 0
        self._lock = threading.Lock()

    def _ensure(self) -> None:
        if self._engine is None:
            from kvbm.transfer import TransferEngine

            self._engine = TransferEngine(f"kvbm-pd-c{self.rank}-{os.getpid()}", error_handling=True)
            self._new_staging()

    def _new_staging(self) -> None:
        self.rows = np.empty((self.batch, self.slot_bytes), dtype=np.uint8)
        self.entries = np.empty((self.batch, TABLE_ENTRY), dtype=np.uint8)
        self._regions = (self._engine.register(self.rows), self._engine.register(self.entries))

    def _release_retired(self) -> None:
        """Deregister and drop retired staging whose timed-out gets have finished."""
        keep = []
        for rows, entries, regions, gets in self._retired:
            if all(h.done for h in gets):
                for r in regions:
                    with contextlib.suppress(KvbmError):
                        self._engine.deregister(r)
            else:
                keep.append((rows, entries, regions, gets))
        self._retired = keep

    def _peer(self, a: RankAddr) -> Any:
        key = (a.host, a.port)
        p = self._peers.get(key)
        if p is not None and not p.failed and self._covers(p, a):
            return p
        if p is not None:
            self._drop(key)
        p = self._engine.connect(a.host, a.port, timeout=self.timeout_s)
        if not self._covers(p, a):
            p.close(force=True)
            raise KvbmError(f"producer at {a.host}:{a.port} does not expose the arena/table the params name "
                            f"(restarted?)")
        self._peers[key] = p
        return p

    def _covers(self, p: Any, a: RankAddr) -> bool:
        need = ((a.arena, a.slots * a.slot_bytes), (a.table, a.slots * TABLE_ENTRY))
        return all(any(r.addr == addr and r.length == ln for r in p.remote_regions) for addr, ln in need)

    def _drop(self, key: tuple[str, int]) -> None:
        p = self._peers.pop(key, None)
        if p is not None:
            with contextlib.suppress(KvbmError):
                p.close(force=True)

    def pull(self, src: RankAddr, slots: list[int], hashes: list[bytes],
             sink: Callable[[np.ndarray, list[int]], None]) -> int:
        """Pull ``slots`` (expected to hold ``hashes``) and hand verified rows to ``sink(rows, indices)``.

        Blocks are delivered in order; the first block that cannot be pulled or verified stops the
        pull. Returns the number of leading blocks delivered (the rest failed: recompute them).
        Never raises for a transfer problem; every wait is bounded by the timeout.
        """
        with self._lock:
            return self._pull(src, slots, hashes, sink)

    def _pull(self, src: RankAddr, slots: list[int], hashes: list[bytes],
              sink: Callable[[np.ndarray, list[int]], None]) -> int:
        done = 0
        try:
            self._ensure()
            peer = self._peer(src)
            while done < len(slots):
                m = min(self.batch, len(slots) - done)
                rs = slots[done:done + m]
                h1 = peer.get_blocks(self.rows.ctypes.data, np.arange(m), src.arena, rs, src.slot_bytes)
                h2 = peer.get_blocks(self.entries.ctypes.data, np.arange(m), src.table, rs, TABLE_ENTRY)
                deadline = time.monotonic() + self.timeout_s
                try:
                    h1.wait(max(0.0, deadline - time.monotonic()))
                    h2.wait(max(0.0, deadline - time.monotonic()))
                except KvbmError:
                    self._drop((src.host, src.port))  # force-close: the gets are cancelled
                    self._retired.append((self.rows, self.entries, self._regions, (h1, h2)))
                    self._release_retired()
                    self._new_staging()
                    raise
                # One native call for all CRCs (the GIL is released and re-taken once, not per block).
                ent = self.entries[:m]
                want = np.frombuffer(b"".join(hashes[done:done + m]), dtype=np.uint8).reshape(m, 16)
                good = ((ent[:, :16] == want).all(axis=1)
                        & (ent[:, 20:24].copy().view("<u4")[:, 0] == 1)
                        & (ent[:, 16:20].copy().view("<u4")[:, 0] == _native.crc32c_rows(self.rows[:m])))
                ok = m if bool(good.all()) else int(np.argmin(good))
                if ok < m:
                    logger.warning("kvbm: rank %d: block %d from %s:%d failed verification (slot %d changed or "
                                   "corrupted); recomputing from there", self.rank, done + ok, src.host, src.port,
                                   rs[ok])
                if ok:
                    sink(self.rows[:ok], list(range(done, done + ok)))
                done += ok
                self.pulled_blocks += ok
                if ok < m:
                    break
        except KvbmError as e:
            logger.warning("kvbm: rank %d: pulling %d blocks from %s:%d failed after %d; vLLM recomputes the "
                           "rest: %s", self.rank, len(slots), src.host, src.port, done, e)
        self.failed_blocks += len(slots) - done
        return done

    def release(self, src: RankAddr, lease: str, connect: bool = False) -> None:
        """Tell the producer rank this rank is done with ``lease`` (best effort; with ``connect``
        it connects first when not connected yet)."""
        with self._lock:
            p = self._peers.get((src.host, src.port))
            try:
                if connect and (p is None or p.failed):
                    self._ensure()
                    p = self._peer(src)
                if p is None or p.failed:
                    return
                p.notify(_RELEASE + lease.encode()).wait(self.timeout_s)
            except KvbmError as e:
                logger.info("kvbm: rank %d: lease release to %s:%d not delivered: %s", self.rank, src.host, src.port,
                            e)

    def close(self) -> None:
        for key in list(self._peers):
            self._drop(key)
        if self._engine is not None:
            self._engine.close()
            self._engine = None


class PdWorker:
    """The P/D part of one worker rank: a :class:`PdServer` (producer) and/or a :class:`PdClient`."""

    def __init__(self, cfg: PdConfig, rank: int, slot_bytes: int, arena: np.ndarray) -> None:
        """Raises UnsupportedError (at engine start-up) when this build or machine has no UCX."""
        from kvbm.transfer import ucx_available

        ok, why = ucx_available()
        if not ok:
            raise UnsupportedError(f"kvbm prefill/decode needs the UCX transfer engine: {why}")
        self.rank = rank
        self.server = PdServer(arena, cfg, rank) if cfg.produce else None
        self.client = PdClient(slot_bytes, rank, cfg.timeout_s) if cfg.consume else None
        self._counters = [0, 0]  # blocks pulled and verified, nanoseconds spent pulling (taken per step)
        self._lock = threading.Lock()
        self._bg: Any = None  # background releases of unused offers

    def handshake(self) -> dict[str, Any] | None:
        return self.server.handshake() if self.server is not None else None

    def before_store(self, slots: list[int]) -> None:
        if self.server is not None:
            self.server.before_store(slots)

    def after_store(self, slots: list[int], hashes: list[bytes]) -> None:
        if self.server is not None:
            self.server.after_store(slots, hashes)

    def released(self) -> dict[str, int]:
        return self.server.released() if self.server is not None else {}

    def load(self, ops: list[Any], out: np.ndarray) -> tuple[list[int], list[Any]]:
        """Pull remote load ops (``op.remote`` a :class:`PdSource`, ``op.slot`` the producer's slot)
        into ``out`` (row i for ``ops[i]``), in order per source, verified.

        Returns (indices of the ops loaded, the ops not loaded: vLLM recomputes those blocks).
        """
        if self.client is None:
            return [], list(ops)
        groups: dict[str, tuple[PdSource, list[int]]] = {}
        for i, op in enumerate(ops):
            groups.setdefault(op.remote.lease, (op.remote, []))[1].append(i)
        loaded: list[int] = []
        failed: list[Any] = []
        for source, idx in groups.values():
            src = source.ranks[self.rank]

            def sink(rows: np.ndarray, got: list[int], idx: list[int] = idx) -> None:
                out[np.asarray([idx[k] for k in got], dtype=np.int64)] = rows

            t0 = time.perf_counter_ns()
            done = self.client.pull(src, [ops[i].slot for i in idx], [ops[i].block_hash for i in idx], sink)
            dt = time.perf_counter_ns() - t0
            loaded += idx[:done]
            failed += [ops[i] for i in idx[done:]]
            self.client.release(src, source.lease)
            with self._lock:
                self._counters[0] += done
                self._counters[1] += dt
        return loaded, failed

    def release_unused(self, sources: list[PdSource]) -> None:
        """Release offers that will not be pulled, in the background (connecting if needed)."""
        if self.client is None:
            return
        if self._bg is None:
            from concurrent.futures import ThreadPoolExecutor

            self._bg = ThreadPoolExecutor(1, thread_name_prefix=f"kvbm-pd-release-{self.rank}")
        for source in sources:
            self._bg.submit(self.client.release, source.ranks[self.rank], source.lease, True)

    def take_pull_counters(self) -> tuple[int, int]:
        """(blocks pulled and verified, nanoseconds spent pulling) since the last call."""
        with self._lock:
            out = (self._counters[0], self._counters[1])
            self._counters = [0, 0]
        return out

    def close(self) -> None:
        if self._bg is not None:
            self._bg.shutdown(wait=True)
        if self.client is not None:
            self.client.close()
        if self.server is not None:
            self.server.close()


__all__ = ["PARAMS_KEY", "PD_KEYS", "Offer", "ParamsError", "PdClient", "PdConfig", "PdScheduler", "PdServer",
           "PdSource", "PdWorker", "RankAddr", "make_params", "match_prefix", "parse_params"]
