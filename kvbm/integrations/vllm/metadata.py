"""Plain picklable plans between the scheduler half and the worker halves (see index.py)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

try:
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata, KVConnectorWorkerMetadata
except ImportError:  # no vLLM: the worker's copy paths still run (GPU tests and benchmarks on machines without it)

    class KVConnectorMetadata:  # type: ignore[no-redef]
        """Stand-in base when vLLM is not installed (vLLM's is an empty ABC as well)."""

    class KVConnectorWorkerMetadata:  # type: ignore[no-redef]
        """Stand-in base when vLLM is not installed."""


@dataclass
class LoadOp:
    """Copy block ``block_hash`` from ``tier`` ("host" slot ``slot`` or "disk" slot ``slot``) into vLLM
    block ``block_id``. ``crcs`` (disk only): the CRC32C each tensor-parallel rank's shard must have.

    ``is_async``: the request waits in vLLM's ``WAITING_FOR_REMOTE_KVS``; the worker loads the block
    in the background and reports the request through ``get_finished``.
    """

    block_id: int
    tier: str
    slot: int
    block_hash: bytes
    req_id: str = ""
    is_async: bool = False
    crcs: tuple[int, ...] = ()
    remote: Any = None  # tier "remote": the producer (a pd.PdSource); ``slot`` is the producer's slot


@dataclass
class StoreOp:
    """Copy vLLM block ``block_id`` into host slot ``slot``; then write it to disk slot ``disk_slot``
    if ``to_disk``.

    ``slot == -1`` (only with ``to_disk``): no host slot was free; the block is copied to a
    private buffer and written to disk from there.
    """

    block_id: int
    slot: int
    block_hash: bytes
    to_disk: bool
    req_id: str = ""
    disk_slot: int = -1


@dataclass
class KvbmConnectorMetadata(KVConnectorMetadata):
    """One step's plan: loads run before the forward, stores after it.

    ``demotes`` (``disk_write_policy: write_behind``): host slots whose blocks the host tier just
    evicted, written to disk slot ``disk_slot`` (``block_id`` unused); the worker copies them out
    before this step's stores reuse the slots.
    """

    loads: list[LoadOp] = field(default_factory=list)
    stores: list[StoreOp] = field(default_factory=list)
    demotes: list[StoreOp] = field(default_factory=list)
    pd_unused: list[Any] = field(default_factory=list)  # P/D offers not pulled (pd.PdSource): release them


@dataclass
class KvbmWorkerMetadata(KVConnectorWorkerMetadata):
    """What workers report back per step; counts are summed over tensor-parallel ranks.

    ``disk_crcs``: per hash written to disk, ``{rank: crc32c of that rank's shard}``.
    ``load_corrupt``: the subset of ``load_failed`` whose bytes failed their checksum.
    """

    stored: Counter = field(default_factory=Counter)
    store_failed: Counter = field(default_factory=Counter)
    disk_written: Counter = field(default_factory=Counter)
    disk_failed: Counter = field(default_factory=Counter)
    disk_crcs: dict = field(default_factory=dict)
    load_failed: Counter = field(default_factory=Counter)
    load_corrupt: Counter = field(default_factory=Counter)
    load_bytes: int = 0
    store_bytes: int = 0
    pd_released: Counter = field(default_factory=Counter)  # P/D lease id -> ranks that saw it released
    pd_pulled_blocks: int = 0  # P/D consumer: blocks pulled and verified (summed over ranks)
    pd_pull_ns: int = 0  # time spent pulling them (summed over ranks)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KvbmWorkerMetadata:
        if not isinstance(other, KvbmWorkerMetadata):
            return self
        out = KvbmWorkerMetadata()
        for name in ("stored", "store_failed", "disk_written", "disk_failed", "load_failed", "load_corrupt",
                     "pd_released"):
            c = Counter(getattr(self, name))
            c.update(getattr(other, name))
            setattr(out, name, c)
        crcs = {h: dict(v) for h, v in self.disk_crcs.items()}
        for h, v in other.disk_crcs.items():
            crcs.setdefault(h, {}).update(v)
        out.disk_crcs = crcs
        out.load_bytes = self.load_bytes + other.load_bytes
        out.store_bytes = self.store_bytes + other.store_bytes
        out.pd_pulled_blocks = self.pd_pulled_blocks + other.pd_pulled_blocks
        out.pd_pull_ns = self.pd_pull_ns + other.pd_pull_ns
        return out

    def empty(self) -> bool:
        return not (self.stored or self.store_failed or self.disk_written or self.disk_failed
                    or self.load_failed or self.pd_released or self.pd_pull_ns)
