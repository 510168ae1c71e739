"""kvbm's disk tier under vLLM's own CPU tier: a secondary tier of vLLM's native offloading.

Users of vLLM's ``OffloadingConnector`` with ``spec_name: TieringOffloadingSpec`` add kvbm's
persistent, checksummed disk tier by configuration alone::

    --kv-transfer-config '{"kv_connector": "OffloadingConnector", "kv_role": "kv_both",
      "kv_connector_extra_config": {"spec_name": "KvbmTieringOffloadingSpec",
        "spec_module_path": "kvbm.integrations.vllm.secondary_tier",
        "cpu_bytes_to_use": 8589934592,
        "secondary_tiers": [{"type": "kvbm", "disk_path": "/mnt/nvme/kvbm",
                             "disk_capacity_bytes": "500GiB"}]}}'

(``KvbmTieringOffloadingSpec`` is vLLM's ``TieringOffloadingSpec``; naming it registers tier type
``kvbm``, which vLLM 0.26 needs. On 0.32+ ``"spec_name": "TieringOffloadingSpec"`` with
``{"type": "KvbmDiskTier", "module_path": "kvbm.integrations.vllm.secondary_tier", ...}`` works too.)

Note [kvbm as a vLLM secondary tier]
------------------------------------
vLLM moves every chunk GPU -> its CPU primary tier -> secondary tiers, and back the same way; a
secondary tier sees only the primary tier's shared host buffer (``primary_kv_view``: one row of
``strides[0]`` bytes per chunk) and runs in the scheduler process. :class:`KvbmDiskTier` keeps
each chunk as one record of kvbm's disk tier (slab files + LMDB catalog, the same code as the
kvbm connector's disk tier: ``open_catalog`` and ``RankDisk`` in ``disk.py``):

- a store reserves slots (victims un-listed first, in a committed txn), the native IO threads
  write the rows straight from the primary buffer (CRC32C computed on the way), and the catalog
  commits the records once the writes are done (``get_finished_jobs``): a crash mid-write leaves
  no record naming torn bytes;
- a load reads the records into the primary rows the job names, checking each record header
  (slot, length, namespace, the chunk's key) and the CRC32C; a chunk that fails is dropped from
  the catalog, reported failed (vLLM recomputes it), and never served;
- nothing blocks the scheduler: submits start native IO and return; completion is polled.

Keys are vLLM's ``OffloadKey`` bytes (block hash + group index). They persist across restarts
only when vLLM's block hashes do, as for its own ``fs`` tier: vLLM seeds them from
``PYTHONHASHSEED`` when it is set, otherwise (by release and hash algorithm) from a fixed seed or
a random one per start; set ``PYTHONHASHSEED`` to the same value on every start to be sure. The
records are namespaced by model, KV dtype, chunk geometry and parallel layout, so engines of
other models or layouts sharing ``disk_path`` never read each other's chunks (they share its
capacity, Note [Shared disk space]).

The tier's API differs across vLLM releases (0.26: ``JobMetadata.block_ids``; 0.32+:
``TransferJob.chunk_ids``, ``JobResult.successful_keys``, a backpressure detector); those
differences live in ``compat.py`` with the connector's.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from vllm.v1.kv_offload.base import LookupResult, RequestOffloadingContext
from vllm.v1.kv_offload.tiering.base import JobResult, SecondaryTierManager
from vllm.v1.kv_offload.tiering.factory import SecondaryTierFactory
from vllm.v1.kv_offload.tiering.spec import TieringOffloadingSpec

from kvbm.config import KvbmConfig
from kvbm.errors import ConfigError
from kvbm.integrations.vllm import disk
from kvbm.integrations.vllm.compat import job_chunk_ids, job_result, offloading_event
from kvbm.tiers.disk import namespace_digest

try:  # 0.32+: a tier names its medium (its hits count as disk hits in vLLM's metrics)
    from vllm.v1.kv_offload.base import Medium
except ImportError:  # pragma: no cover - vLLM 0.26
    Medium = None  # type: ignore[assignment,misc]

logger = logging.getLogger("kvbm.vllm")

#: KvbmConfig keys this tier takes from its ``secondary_tiers`` entry.
TIER_KEYS = ("disk_path", "disk_capacity_bytes", "disk_durability", "disk_io_threads", "disk_o_direct",
             "eviction_policy", "checksums")
#: A tier's own switch for KV events (on by default when vLLM publishes KV events).
_EVENT_KEY = "enable_kv_events"
#: Keys vLLM's tier factory passes through (0.32: ``locality`` stays in the config; 0.26 leaves
#: ``module_path`` in it).
_VLLM_KEYS = ("locality", "backpressure_detector", "module_path")
#: The secondary tier type kvbm's tier is registered under (see :class:`KvbmTieringOffloadingSpec`).
TIER_TYPE = "kvbm"
#: ... and kvbm's remote tier (Redis / Valkey / ``kvbm serve``).
REMOTE_TIER_TYPE = "kvbm_remote"
#: KvbmConfig keys the remote tier takes.
REMOTE_TIER_KEYS = ("remote_url", "remote_token", "remote_timeout_s", "remote_threads")


def _setup(tier: Any, spec: Any, view: memoryview, tier_type: str, config: dict[str, Any], *,
           keys: tuple[str, ...], required: str, medium_name: str, locality: str | None) -> KvbmConfig:
    """What both kvbm tiers do first: check the tier's config keys (ConfigError naming any other),
    initialise vLLM's base class (with the backpressure detector of releases that pass one), set
    locality and KV events, and map vLLM's primary rows (``tier._rows``, one per chunk)."""
    passthrough = {k: config.pop(k) for k in _VLLM_KEYS if k in config}
    events = config.pop(_EVENT_KEY, None)
    unknown = sorted(set(config) - set(keys))
    if unknown:
        raise ConfigError(f"secondary tier {tier_type!r}: unknown key(s) {unknown}; this tier takes {list(keys)}")
    if not config.get(required):
        raise ConfigError(f"secondary tier {tier_type!r}: {required!r} is required")
    cfg = KvbmConfig.from_dict(config, source=f"secondary tier {tier_type!r}")
    kw = {k: passthrough[k] for k in ("backpressure_detector",) if k in passthrough}  # 0.32+
    SecondaryTierManager.__init__(tier, spec, view, tier_type, **kw)
    tier.locality = _locality(passthrough.get("locality"), locality)
    tier._events = _Events(spec, events, medium_name)
    if not view.contiguous or view.readonly:
        raise ConfigError(f"secondary tier {tier_type!r}: the primary tier's buffer must be a writable, contiguous "
                          "memoryview")
    tier.chunk_bytes = int(view.strides[0])
    tier._flat = view.cast("B")
    tier._rows = np.frombuffer(tier._flat, dtype=np.uint8).reshape(-1, tier.chunk_bytes)
    return cfg


def _release_view(tier: Any) -> None:
    """Drop a tier's views of vLLM's primary region (vLLM unmaps it after the tiers shut down; a
    view still exported would make that fail)."""
    tier._rows = None
    with contextlib.suppress(BufferError):
        tier._flat.release()


def _locality(value: Any, default: str | None) -> Any:
    """vLLM's ``Locality`` of a tier (``LOCAL`` / ``REMOTE``), or None."""
    v = value or default
    if v is None:
        return None
    from vllm.v1.kv_offload.base import Locality  # in 0.26 and 0.32

    return Locality(v)


class _Events:
    """KV events of one tier (``take_events``): stored / removed keys, when vLLM publishes events
    (its ``kv_events_config``) and the tier's ``enable_kv_events`` is not false."""

    def __init__(self, spec: Any, enabled: Any, medium_name: str) -> None:
        cfg = getattr(spec, "kv_events_config", None)
        on = bool(getattr(cfg, "enable_kv_cache_events", False))
        self.events: list[Any] | None = [] if on and enabled is not False else None
        self.medium_name = medium_name

    def add(self, keys: list[bytes], removed: bool, locality: Any) -> None:
        if self.events is not None and keys:
            self.events.append(offloading_event(keys, removed, self.medium_name, locality))

    def take(self) -> list[Any]:
        if not self.events:
            return []
        out, self.events = self.events, []
        return out


def spec_namespace(spec: Any, chunk_bytes: int) -> bytes:
    """The 16-byte namespace of an offloading spec's chunks: model, KV dtype, tokens per hash,
    blocks per chunk, chunk bytes, the KV cache groups and the parallel layout."""
    c = spec.config
    par = c.parallel
    groups = [(g.tokens_per_block, len(g.layer_names)) for g in getattr(c, "groups", ())]
    fields_ = ["kvbm-vllm-secondary-tier/1", c.model.name, c.model.dtype, c.cache.tokens_per_hash,
               c.cache.blocks_per_chunk, chunk_bytes, groups, par.tp_size, par.pp_size,
               getattr(par, "pcp_size", 1), getattr(par, "dcp_size", 1)]
    return namespace_digest(repr(fields_))


@dataclass
class _Job:
    job_id: int
    keys: list[bytes]
    slots: list[int]
    handle: Any
    t0: float = field(default_factory=time.perf_counter)
    ok_keys: list[bytes] = field(default_factory=list)  # loads: keys that need no read (none yet)
    failed: bool = False  # a key of the job could not be stored / loaded before any IO


class KvbmDiskTier(SecondaryTierManager):
    """kvbm's disk tier as a vLLM ``SecondaryTierManager`` (Note [kvbm as a vLLM secondary tier]).

    Tier config keys: ``disk_path`` (required), ``disk_capacity_bytes`` (default 10 GiB; the whole
    ``disk_path``'s capacity, shared with other namespaces there), ``disk_durability``
    (``none``/``batch``/``always``), ``disk_io_threads``, ``disk_o_direct``, ``eviction_policy``,
    ``checksums``, ``enable_kv_events`` (KV events of stored / removed chunks, medium STORAGE, when
    vLLM publishes KV events; default on). Any other key is a :class:`kvbm.ConfigError` naming it.
    """

    if Medium is not None:
        medium = Medium.STORAGE

    def __init__(self, offloading_spec: Any, primary_kv_view: memoryview, tier_type: str, **config: Any) -> None:
        config.setdefault("disk_capacity_bytes", "10GiB")
        cfg = _setup(self, offloading_spec, primary_kv_view, tier_type, config, keys=TIER_KEYS, required="disk_path",
                     medium_name="KVBM_DISK", locality=None)
        self.disk_path = str(cfg.disk_path)
        ns = spec_namespace(offloading_spec, self.chunk_bytes)
        self._ns = disk.catalog_namespace(ns)
        self.catalog = disk.open_catalog(self.disk_path, [ns], self.chunk_bytes, cfg.disk_capacity_bytes,
                                         cfg.disk_durability, cfg.eviction_policy)
        try:
            self.disk = disk.RankDisk(self.disk_path, ns, self.chunk_bytes, self.catalog.geometry.num_slots,
                                      io_threads=cfg.disk_io_threads, o_direct=cfg.disk_o_direct,
                                      durability=cfg.disk_durability, verify=cfg.checksums)
        except BaseException:
            self.catalog.close()
            raise
        self._stores: list[_Job] = []
        self._loads: list[_Job] = []
        self._finished: list[JobResult] = []
        self.stats = {"stored": 0, "store_skipped": 0, "store_failed": 0, "loaded": 0, "load_failed": 0,
                      "checksum_failures": 0, "evicted": 0}
        self._closed = False
        atexit.register(self.shutdown)  # the catalog's access times and lock, also without vLLM's shutdown
        logger.info("kvbm secondary tier %s: %d chunks of %d bytes on disk (namespace %s)", self.catalog.path,
                    len(self.catalog), self.chunk_bytes, ns.hex()[:12])

    # -- lookups -----------------------------------------------------------------------------
    def lookup(self, key: bytes, req_context: Any) -> LookupResult:
        return LookupResult.HIT if bytes(key) in self.catalog else LookupResult.MISS

    def on_new_request(self, req_context: Any) -> RequestOffloadingContext:
        return RequestOffloadingContext()

    def touch(self, keys: Iterable[bytes], req_context: Any) -> None:
        for k in keys:
            s = self.catalog.slot_of(bytes(k))
            if s >= 0:
                self.catalog.record_hit(s)

    # -- stores: primary rows -> disk ------------------------------------------------------------
    def submit_store(self, job_metadata: Any) -> None:
        keys = [bytes(k) for k in job_metadata.keys]
        chunks = job_chunk_ids(job_metadata)
        _check_job(self.tier_type, keys, chunks, len(self._rows))
        present = [k in self.catalog or self.catalog.is_reserved(k) for k in keys]
        todo = [i for i, p in enumerate(present) if not p]
        self.stats["store_skipped"] += len(keys) - len(todo)
        evicted: list[bytes] = []
        slots = self.catalog.reserve([keys[i] for i in todo], evicted) if todo else []
        self.stats["evicted"] += len(evicted)
        self._events.add(evicted, True, self.locality)
        go = [(i, s) for i, s in zip(todo, slots, strict=True) if s >= 0]
        job = _Job(job_metadata.job_id, [keys[i] for i, _ in go], [s for _, s in go], None,
                   failed=len(go) < len(todo))  # no slot could be freed for some key
        if go:
            job.handle = self.disk.store.write(
                job.slots, [self._rows[int(chunks[i])] for i, _ in go], [self.chunk_bytes] * len(go),
                self.disk.sync, job.keys)
        self._stores.append(job)

    # -- loads: disk -> primary rows ---------------------------------------------------------------
    def submit_load(self, job_metadata: Any) -> None:
        keys = [bytes(k) for k in job_metadata.keys]
        chunks = job_chunk_ids(job_metadata)
        _check_job(self.tier_type, keys, chunks, len(self._rows))
        slots = [self.catalog.slot_of(k) for k in keys]
        go = [i for i, s in enumerate(slots) if s >= 0]
        job = _Job(job_metadata.job_id, [keys[i] for i in go], [slots[i] for i in go], None,
                   failed=len(go) < len(keys))  # evicted since the lookup
        for i in go:
            self.catalog.pin(slots[i])
        if go:
            job.handle = self.disk.store.read(
                job.slots, [self._rows[int(chunks[i])] for i in go], [self.chunk_bytes] * len(go),
                [self.catalog.shard_crcs(slots[i])[0] for i in go], self.disk.verify, job.keys)
        self._loads.append(job)

    # -- completion ------------------------------------------------------------------------------
    def _finish_store(self, job: _Job) -> None:
        ok = [False] * len(job.keys)
        crcs = [0] * len(job.keys)
        if job.handle is not None:
            codes, c, _, msgs = job.handle.results()
            ok = [x == 0 for x in codes.tolist()]
            crcs = [int(x) for x in c.tolist()]
            bad = [m for x, m in zip(codes.tolist(), msgs, strict=True) if x != 0]
            if bad:
                logger.error("kvbm secondary tier %s: %d of %d chunk writes failed (not stored): %s",
                             self.catalog.path, len(bad), len(ok), bad[0])
        stored = self.catalog.commit(job.keys, job.slots, [self.chunk_bytes] * len(job.keys), crcs, ok,
                                     self._ns) if job.keys else []
        n_ok = sum(stored)
        self._events.add([k for k, ok in zip(job.keys, stored, strict=True) if ok], False, self.locality)
        self.stats["stored"] += n_ok
        self.stats["store_failed"] += len(job.keys) - n_ok + (1 if job.failed else 0)
        self._finished.append(job_result(JobResult, job.job_id, not job.failed and n_ok == len(job.keys),
                                      seconds=time.perf_counter() - job.t0, nbytes=n_ok * self.chunk_bytes))

    def _finish_load(self, job: _Job) -> None:
        from kvbm import _native

        good: list[bytes] = []
        if job.handle is not None:
            codes, _, _, msgs = job.handle.results()
            for k, s, x, m in zip(job.keys, job.slots, codes.tolist(), msgs, strict=True):
                self.catalog.unpin(s)
                if x == 0:
                    self.catalog.record_hit(s)
                    good.append(k)
                    continue
                checksum = x == int(_native.DISK_CODE_CHECKSUM)
                self.stats["checksum_failures"] += int(checksum)
                logger.warning("kvbm secondary tier %s: chunk %s not loaded (%s): dropped, vLLM recomputes it",
                               self.catalog.path, k.hex()[:16], m or "read failed")
                if self.catalog.drop([k], "checksum_failures" if checksum else None):
                    self._events.add([k], True, self.locality)
        ok = not job.failed and len(good) == len(job.keys)
        self.stats["loaded"] += len(good)
        self.stats["load_failed"] += (len(job.keys) - len(good)) + (1 if job.failed else 0)
        self._finished.append(job_result(JobResult, job.job_id, ok, good, time.perf_counter() - job.t0,
                                      len(good) * self.chunk_bytes))

    def _poll(self, wait: bool) -> None:
        for attr, finish in (("_stores", self._finish_store), ("_loads", self._finish_load)):
            pending = []
            for job in getattr(self, attr):
                if job.handle is not None and not job.handle.done():
                    if not wait:
                        pending.append(job)
                        continue
                    job.handle.wait()
                finish(job)
            setattr(self, attr, pending)

    def take_events(self) -> Iterable[Any]:
        return self._events.take()

    def get_finished_jobs(self) -> Iterable[JobResult]:
        self._poll(wait=False)
        out, self._finished = self._finished, []
        return out

    def has_pending_work(self) -> bool:
        return bool(self._stores or self._loads)

    def drain_jobs(self) -> None:
        self._poll(wait=True)

    def shutdown(self) -> None:
        """Finish every job in flight, write the catalog's metadata and release its lock. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._poll(wait=True)
        self.disk.store.close()
        self.catalog.close()
        _release_view(self)


def _remote_key(key: bytes) -> bytes:
    """The 16-byte key a remote store holds a chunk under: BLAKE2b-128 of vLLM's OffloadKey (its
    record header repeats it, and the store's keys carry the namespace digest as well)."""
    return hashlib.blake2b(key, digest_size=16).digest()


class KvbmRemoteTier(SecondaryTierManager):
    """kvbm's remote tier (Redis / Valkey / ``kvbm serve``) as a vLLM ``SecondaryTierManager``:
    chunks vLLM stores in its CPU tier are put to a store every engine can read; a CPU-tier miss
    promotes them back. Every chunk travels as a checksummed record bound to its key and namespace
    (``kvbm/tiers/remote.py``): whatever the store returns that does not verify is a miss.

    Nothing blocks the scheduler: puts, gets and existence checks run on ``remote_threads``
    threads. A key not seen before answers RETRY; the keys of one step are checked in one round
    trip per request (``lookup_prefix``) at the end of the step; the answer is kept (hits until a
    get fails, misses for ``MISS_TTL_S``). A store that is down answers misses (its own rule).

    Tier config keys: ``remote_url`` (required), ``remote_token``, ``remote_timeout_s``,
    ``remote_threads``, ``enable_kv_events`` (stored chunks, medium STORAGE, locality REMOTE); any
    other key is a :class:`kvbm.ConfigError` naming it.
    """

    if Medium is not None:
        medium = Medium.STORAGE
    MISS_TTL_S = 2.0
    KNOWN_MAX = 1 << 20  # keys whose presence (and, apart, whose recent absence) is remembered

    def __init__(self, offloading_spec: Any, primary_kv_view: memoryview, tier_type: str, **config: Any) -> None:
        from kvbm.tiers.remote import open_remote_tier

        cfg = _setup(self, offloading_spec, primary_kv_view, tier_type, config, keys=REMOTE_TIER_KEYS,
                     required="remote_url", medium_name="KVBM_REMOTE", locality="REMOTE")
        self.remote = open_remote_tier(str(cfg.remote_url), block_bytes=self.chunk_bytes,
                                       namespace=spec_namespace(offloading_spec, self.chunk_bytes),
                                       token=cfg.remote_token, timeout_s=cfg.remote_timeout_s)
        self._pool = ThreadPoolExecutor(cfg.remote_threads, thread_name_prefix="kvbm-vllm-remote")
        self._known: OrderedDict[bytes, bool] = OrderedDict()  # key -> present (LRU-bounded)
        self._miss_until: dict[bytes, float] = {}
        self._asked: dict[str, list[bytes]] = {}  # request id -> keys to check at the step's end
        self._checking: set[bytes] = set()
        self._checks: list[tuple[list[bytes], Future]] = []
        self._jobs: list[tuple[int, list[bytes], bool, Future, float]] = []  # id, keys, is_load, future, t0
        self._finished: list[JobResult] = []
        self.stats = {"stored": 0, "store_failed": 0, "loaded": 0, "load_failed": 0, "lookups_remote": 0}
        self._closed = False
        atexit.register(self.shutdown)
        logger.info("kvbm secondary tier %s: remote %s, %d-byte chunks", tier_type, cfg.remote_url, self.chunk_bytes)

    # -- lookups -----------------------------------------------------------------------------
    def _remember(self, key: bytes, present: bool) -> None:
        if present:
            self._known[key] = True
            self._known.move_to_end(key)
            while len(self._known) > self.KNOWN_MAX:
                self._known.popitem(last=False)
            self._miss_until.pop(key, None)
        else:
            self._known.pop(key, None)
            now = time.monotonic()
            self._miss_until[key] = now + self.MISS_TTL_S
            if len(self._miss_until) > self.KNOWN_MAX:  # bounded: forget the expired, then the oldest
                self._miss_until = {k: t for k, t in self._miss_until.items() if t > now}
                while len(self._miss_until) > self.KNOWN_MAX:
                    del self._miss_until[next(iter(self._miss_until))]

    def lookup(self, key: bytes, req_context: Any) -> LookupResult:
        key = bytes(key)
        self._poll_checks()
        if self._known.get(key):
            return LookupResult.HIT
        until = self._miss_until.get(key)
        if until is not None:
            if until > time.monotonic():
                return LookupResult.MISS
            del self._miss_until[key]
        if key not in self._checking:
            self._asked.setdefault(getattr(req_context, "req_id", ""), []).append(key)
            self._checking.add(key)
        return LookupResult.RETRY

    def on_new_request(self, req_context: Any) -> RequestOffloadingContext:
        return RequestOffloadingContext()

    def on_schedule_end(self, context: Any) -> None:
        """Check this step's unknown keys: one ``lookup_prefix`` per request (keys in prefix order)."""
        asked, self._asked = self._asked, {}
        for keys in asked.values():
            hashes = [_remote_key(k) for k in keys]
            self._checks.append((keys, self._pool.submit(self.remote.lookup_prefix, hashes)))
            self.stats["lookups_remote"] += 1

    def _poll_checks(self, wait: bool = False) -> None:
        pending = []
        for keys, fut in self._checks:
            if not wait and not fut.done():
                pending.append((keys, fut))
                continue
            try:
                n = int(fut.result())
            except Exception as e:  # noqa: BLE001 - the tier counts its own failures; a miss here
                logger.warning("kvbm remote tier lookup failed (%s): treated as a miss", e)
                n = 0
            for i, k in enumerate(keys):
                self._checking.discard(k)
                if i <= n:  # present up to n; key n is the first absent one; later ones unknown
                    self._remember(k, i < n)
        self._checks = pending

    # -- stores and loads ----------------------------------------------------------------------
    def submit_store(self, job_metadata: Any) -> None:
        keys = [bytes(k) for k in job_metadata.keys]
        chunks = job_chunk_ids(job_metadata)
        _check_job(self.tier_type, keys, chunks, len(self._rows))
        todo = [i for i, k in enumerate(keys) if not self._known.get(k)]
        rows = self._rows

        def put() -> np.ndarray:
            if not todo:
                return np.ones(0, bool)
            data = np.stack([rows[int(chunks[i])] for i in todo])  # read while vLLM keeps the rows pinned
            return np.asarray(self.remote.put([_remote_key(keys[i]) for i in todo], data), bool)

        self._jobs.append((job_metadata.job_id, [keys[i] for i in todo], False, self._pool.submit(put),
                           time.perf_counter()))

    def submit_load(self, job_metadata: Any) -> None:
        keys = [bytes(k) for k in job_metadata.keys]
        chunks = job_chunk_ids(job_metadata)
        _check_job(self.tier_type, keys, chunks, len(self._rows))
        rows = self._rows

        def get() -> np.ndarray:
            out = np.empty((len(keys), self.chunk_bytes), np.uint8)
            ok = np.asarray(self.remote.get([_remote_key(k) for k in keys], out), bool)
            for i in np.flatnonzero(ok):  # only verified records reach vLLM's rows
                rows[int(chunks[i])] = out[i]
            return ok

        self._jobs.append((job_metadata.job_id, keys, True, self._pool.submit(get), time.perf_counter()))

    def _poll_jobs(self, wait: bool) -> None:
        pending = []
        for job in self._jobs:
            job_id, keys, is_load, fut, t0 = job
            if not wait and not fut.done():
                pending.append(job)
                continue
            try:
                ok = fut.result()
            except Exception as e:  # noqa: BLE001 - reported as a failed job; vLLM recomputes / skips
                logger.warning("kvbm remote tier job %d failed: %s", job_id, e)
                ok = np.zeros(len(keys), bool)
            good = [k for k, o in zip(keys, ok.tolist(), strict=True) if o]
            for k, o in zip(keys, ok.tolist(), strict=True):
                if o or is_load:  # stored: present; a load that failed: not (any more)
                    self._remember(k, o)
            n = len(good)
            if not is_load:
                self._events.add(good, False, self.locality)
            if is_load:
                self.stats["loaded"] += n
                self.stats["load_failed"] += len(keys) - n
            else:
                self.stats["stored"] += n
                self.stats["store_failed"] += len(keys) - n
            self._finished.append(job_result(JobResult, job_id, n == len(keys), good, time.perf_counter() - t0,
                                             n * self.chunk_bytes))
        self._jobs = pending

    def take_events(self) -> Iterable[Any]:
        return self._events.take()

    def get_finished_jobs(self) -> Iterable[JobResult]:
        self._poll_checks()
        self._poll_jobs(wait=False)
        out, self._finished = self._finished, []
        return out

    def has_pending_work(self) -> bool:
        return bool(self._jobs or self._checks or self._asked)

    def drain_jobs(self) -> None:
        self._poll_jobs(wait=True)

    def shutdown(self) -> None:
        """Finish the jobs in flight and close the store's connections. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._poll_jobs(wait=True)
        self._poll_checks(wait=True)
        self._pool.shutdown(wait=True)
        self.remote.close()
        _release_view(self)


def _check_job(tier_type: str, keys: list[bytes], chunks: np.ndarray, rows: int) -> None:
    if len(keys) != len(chunks):
        raise ConfigError(f"secondary tier {tier_type!r}: {len(keys)} keys but {len(chunks)} chunk ids")
    if len(chunks) and (chunks.min() < 0 or chunks.max() >= rows):
        raise ConfigError(f"secondary tier {tier_type!r}: chunk id out of range [0, {rows})")


class KvbmTieringOffloadingSpec(TieringOffloadingSpec):
    """vLLM's ``TieringOffloadingSpec``, unchanged. Naming it (``spec_name`` with
    ``spec_module_path: kvbm.integrations.vllm.secondary_tier``) makes vLLM import this module, which
    registers :class:`KvbmDiskTier` as secondary tier type ``"kvbm"`` (and :class:`KvbmRemoteTier` as
    ``"kvbm_remote"``): vLLM 0.26 finds a tier by its
    registered type only (0.32+ also by ``type`` + ``module_path``)."""


def _register() -> None:
    for tier_type, cls in ((TIER_TYPE, "KvbmDiskTier"), (REMOTE_TIER_TYPE, "KvbmRemoteTier")):
        with contextlib.suppress(ValueError):  # registered already (this module loaded under two names)
            SecondaryTierFactory.register_tier(tier_type, __name__, cls)


_register()

__all__ = ["REMOTE_TIER_KEYS", "REMOTE_TIER_TYPE", "TIER_KEYS", "TIER_TYPE", "KvbmDiskTier", "KvbmRemoteTier",
           "KvbmTieringOffloadingSpec", "spec_namespace"]
