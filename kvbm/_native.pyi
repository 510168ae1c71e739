"""Type stub for kvbm._native, the native core (C++/CUDA/UCX), generated from the full build with
pybind11-stubgen. Use the kvbm package API rather than this module directly."""
from __future__ import annotations

import collections.abc
import typing

import numpy
import numpy.typing

__all__: list[str] = ['BlockIndex', 'DISK_ALIGNMENT', 'DISK_CODE_CHECKSUM', 'DISK_CODE_IO', 'DISK_MAX_KEY_BYTES', 'DISK_RECORD_HEADER', 'DISK_RECORD_VERSION', 'DiskIoHandle', 'DiskStore', 'EvictionPolicy', 'GpuArena', 'HostArena', 'HostBuffer', 'KvLayout', 'MemoryRegion', 'NO_TIER', 'RouterIndex', 'TransferHandle', 'TransferRequest', 'UcxEndpoint', 'UcxEngine', 'alloc_host', 'block_hashes', 'copy_bytes', 'crc32c', 'crc32c_impl', 'crc32c_rows', 'cuda_available', 'cuda_compiled', 'cuda_device_count', 'eviction_policy_names', 'fast128', 'kv_gather', 'kv_scatter', 'raw_direct_io', 'router_chain_keys', 'sha256', 'sha256_impl', 'ucx_compiled']
class BlockIndex:
    """
    Hash -> block entry index with per-tier slot bookkeeping.
    """
    def __init__(self, initial_capacity: typing.SupportsInt | typing.SupportsIndex = 1024) -> None:
        ...
    def __len__(self) -> int:
        ...
    def complete_load(self, tier: typing.SupportsInt | typing.SupportsIndex, hashes: typing.Any) -> None:
        ...
    def complete_store(self, tier: typing.SupportsInt | typing.SupportsIndex, hashes: typing.Any, ok: typing.Any = None, checksums: typing.Any = None) -> None:
        ...
    def configure_tier(self, tier: typing.SupportsInt | typing.SupportsIndex, num_slots: typing.SupportsInt | typing.SupportsIndex, slot_bytes: typing.SupportsInt | typing.SupportsIndex, policy: str) -> None:
        ...
    def count_checksum_failure(self, tier: typing.SupportsInt | typing.SupportsIndex, n: typing.SupportsInt | typing.SupportsIndex = 1) -> None:
        ...
    def counters(self, tier: typing.SupportsInt | typing.SupportsIndex) -> dict:
        ...
    def evict(self, tier: typing.SupportsInt | typing.SupportsIndex, count: typing.SupportsInt | typing.SupportsIndex, hold: bool = False) -> list:
        """
        Evict up to count blocks. hold=True keeps their slots draining (not reusable) until release_slots() says the copies out of them are done (Note [Slot lifetime]).
        """
    def get(self, hash: typing.Any) -> typing.Any:
        ...
    def lookup(self, hashes: typing.Any) -> tuple[int, numpy.typing.NDArray[numpy.uint8]]:
        ...
    def lookup_into(self, hashes: typing.Any, tiers_out: typing.Annotated[numpy.typing.ArrayLike, numpy.uint8]) -> int:
        """
        Longest cached prefix; writes the tier of each hit block into tiers_out (no allocation).
        """
    def peek(self, hashes: typing.Any) -> tuple[int, numpy.typing.NDArray[numpy.uint8]]:
        ...
    def prepare_load(self, tier: typing.SupportsInt | typing.SupportsIndex, hashes: typing.Any) -> numpy.typing.NDArray[numpy.int64]:
        ...
    def prepare_store(self, tier: typing.SupportsInt | typing.SupportsIndex, hashes: typing.Any, parent: typing.Any = None) -> tuple[numpy.typing.NDArray[numpy.int64], list]:
        ...
    def release_slots(self, tier: typing.SupportsInt | typing.SupportsIndex, slots: typing.Any) -> None:
        """
        Return draining slots (from evict(hold=True)) to the free list once copies out of them ended.
        """
    def remove(self, tier: typing.SupportsInt | typing.SupportsIndex, hashes: typing.Any, ignore_missing: bool = False) -> list:
        ...
    def restore(self, tier: typing.SupportsInt | typing.SupportsIndex, hash: typing.Any, parent: typing.Any, slot: typing.SupportsInt | typing.SupportsIndex, checksum: typing.Any = None) -> None:
        ...
    def set_checksum(self, hash: typing.Any, checksum: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    def tier_info(self, tier: typing.SupportsInt | typing.SupportsIndex) -> dict:
        ...
    def validate(self) -> None:
        """
        Check every invariant; raises InternalError naming the first violation.
        """
    @property
    def memory_bytes(self) -> int:
        ...
class EvictionPolicy:
    """
    An eviction policy over ids 0..capacity-1.
    """
    def __init__(self, name: str, capacity: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    def __len__(self) -> int:
        ...
    def insert(self, id: typing.SupportsInt | typing.SupportsIndex, parent: typing.SupportsInt | typing.SupportsIndex = -1) -> None:
        ...
    def remove(self, id: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    def set_pinned(self, id: typing.SupportsInt | typing.SupportsIndex, pinned: bool) -> None:
        ...
    def touch(self, id: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    def victim(self) -> int:
        """
        Next victim id, or -1 when nothing is evictable.
        """
    @property
    def name(self) -> str:
        ...
class HostBuffer:
    """
    One host allocation (pinned or pageable), writable buffer.
    """
    def __len__(self) -> int:
        ...
    @property
    def address(self) -> int:
        ...
    @property
    def pinned(self) -> bool:
        ...
    @property
    def size(self) -> int:
        ...
class KvLayout:
    """
    Native KV layout descriptor (see kvbm.kv_layout).
    """
    @staticmethod
    def create(kind: str, layers: collections.abc.Sequence[collections.abc.Sequence[tuple[typing.SupportsInt | typing.SupportsIndex, collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex], collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex], str, typing.SupportsInt | typing.SupportsIndex]]]) -> KvLayout:
        ...
    def __repr__(self) -> str:
        ...
    @property
    def block_bytes(self) -> int:
        ...
    @property
    def chunks(self) -> list[tuple[int, int, int, int, int]]:
        ...
    @property
    def device(self) -> int:
        ...
    @property
    def dtype(self) -> str:
        ...
    @property
    def kind(self) -> str:
        ...
    @property
    def layer_bytes(self) -> list[int]:
        ...
    @property
    def layer_offsets(self) -> list[int]:
        ...
    @property
    def num_blocks(self) -> int:
        ...
    @property
    def num_layers(self) -> int:
        ...
class RouterIndex:
    """
    The router's block index (kvbm.router.index.BlockIndex wraps it).
    """
    def __init__(self, max_blocks: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    def __len__(self) -> int:
        ...
    def apply(self, slot: typing.SupportsInt, events: collections.abc.Iterable[typing.Any], clears: collections.abc.Iterable[int]) -> None:
        ...
    def clear(self, slot: typing.SupportsInt, tiers: collections.abc.Iterable[int]) -> None:
        ...
    def holders(self, key: int) -> dict[int, int]:
        """
        slot -> tier bits (bit t = tier t) of every slot holding key.
        """
    def memory_bytes(self) -> int:
        """
        Bytes the index's tables hold (capacity, not only what is used).
        """
    def overlap(self, keys: collections.abc.Sequence[int], slots: collections.abc.Iterable[int]) -> dict[int, list[int]]:
        ...
    def remove(self, slot: typing.SupportsInt, tier: typing.SupportsInt, hashes: collections.abc.Iterable[typing.Any]) -> None:
        ...
    def stats(self) -> dict[str, int]:
        ...
    def store(self, slot: typing.SupportsInt, tier: typing.SupportsInt, hashes: collections.abc.Sequence[typing.Any], parent: typing.Any, token_ids: typing.Any, block_size: typing.SupportsInt | typing.SupportsIndex, extra: str | bytes | None = None) -> None:
        ...
    @property
    def max_blocks(self) -> int:
        ...
class TransferHandle:
    """
    Completion of one queued gather/scatter batch.
    """
    def check_error(self) -> None:
        ...
    def poll(self) -> bool:
        ...
    def wait(self, timeout: typing.SupportsFloat | typing.SupportsIndex | None = None) -> bool:
        ...
    @property
    def bytes(self) -> int:
        ...
    @property
    def num_blocks(self) -> int:
        ...
class HostArena:
    """
    Fixed-slot host memory arena (pinned when a GPU is present).
    """
    def __init__(self, num_slots: typing.SupportsInt | typing.SupportsIndex, slot_bytes: typing.SupportsInt | typing.SupportsIndex, pinned: typing.Any = None) -> None:
        ...
    def address(self, slot: typing.SupportsInt | typing.SupportsIndex) -> int:
        ...
    def addresses(self, slots: typing.Any) -> numpy.typing.NDArray[numpy.uint64]:
        """
        Host addresses of slots (uint64), e.g. for GPU gather/scatter.
        """
    def read(self, slots: typing.Any, out: typing.Any) -> None:
        """
        Copy slots into caller buffers.
        """
    def view(self, slot: typing.SupportsInt | typing.SupportsIndex) -> numpy.typing.NDArray[numpy.uint8]:
        """
        A numpy view of one slot (keeps the arena alive).
        """
    def write(self, slots: typing.Any, data: typing.Any) -> None:
        """
        Copy blocks into slots (slot -1 = skip that row).
        """
    @property
    def num_slots(self) -> int:
        ...
    @property
    def pinned(self) -> bool:
        ...
    @property
    def slot_bytes(self) -> int:
        ...
class DiskIoHandle:
    """
    A batch of disk slot transfers in flight. Keeps its buffers alive until done.
    """
    def __len__(self) -> int:
        ...
    def done(self) -> bool:
        """
        True once every op finished.
        """
    def results(self) -> tuple[numpy.typing.NDArray[numpy.int32], numpy.typing.NDArray[numpy.uint32], numpy.typing.NDArray[numpy.int32], list]:
        """
        (codes int32[n] (0 = ok, else a kvbm status code), crcs uint32[n], errnos int32[n], messages list[str]). Raises StateError before done().
        """
    def wait(self, timeout: typing.SupportsFloat | typing.SupportsIndex | None = None) -> None:
        """
        Block until done (TransferTimeoutError after `timeout` seconds). IO errors are per op: see results().
        """
class DiskStore:
    """
    Fixed-size slots in slab files with O_DIRECT IO on a thread pool (no catalog: see kvbm.tiers.disk).
    """
    def __init__(self, dir: str, slot_size: typing.SupportsInt | typing.SupportsIndex, num_slots: typing.SupportsInt | typing.SupportsIndex, slots_per_slab: typing.SupportsInt | typing.SupportsIndex = 0, io_threads: typing.SupportsInt | typing.SupportsIndex = 4, o_direct: bool = True, read_only: bool = False, preallocate: bool = True, namespace: bytes = b'', grow_bytes: typing.SupportsInt | typing.SupportsIndex = 0) -> None:
        ...
    def close(self) -> None:
        """
        Finish queued IO, stop the threads, close the files. Idempotent.
        """
    def read(self, slots: collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex], buffers: collections.abc.Sequence, lengths: collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex] = [], expected_crcs: collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex] = [], verify: bool = True, keys: collections.abc.Sequence[str | bytes] = []) -> DiskIoHandle:
        """
        Queue reads of slots[i] into buffers[i]; with verify, an op whose CRC32C differs from expected_crcs[i] fails with the checksum code (its buffer then holds garbage).
        """
    def scan_headers(self, first: typing.SupportsInt | typing.SupportsIndex = 0, count: typing.SupportsInt | typing.SupportsIndex = ...) -> tuple[list[tuple[int, bytes, int, int, int]], int]:
        ...
    def slab_path(self, slab: typing.SupportsInt | typing.SupportsIndex) -> str:
        ...
    def stats(self) -> dict:
        ...
    def sync(self) -> None:
        """
        fdatasync every slab file.
        """
    def write(self, slots: collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex], buffers: collections.abc.Sequence, lengths: collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex] = [], sync: typing.SupportsInt | typing.SupportsIndex = 0, keys: collections.abc.Sequence[str | bytes] = []) -> DiskIoHandle:
        """
        Queue writes of buffers[i] (lengths[i] bytes, default its size) to slots[i]; returns a DiskIoHandle. sync: 0 none, 1 fdatasync each slab touched before done, 2 fdatasync after every op. results() crcs are CRC32C of the bytes written.
        """
    @property
    def fallback_reason(self) -> str:
        ...
    @property
    def num_slabs(self) -> int:
        ...
    @property
    def num_slots(self) -> int:
        ...
    @property
    def o_direct_active(self) -> bool:
        ...
    @property
    def prealloc_error(self) -> str:
        """
        Why slabs were not (all) preallocated; empty when they were or it was off.
        """
    @property
    def slot_size(self) -> int:
        ...
    @property
    def slots_per_slab(self) -> int:
        ...
    @property
    def slot_stride(self) -> int:
        ...
class GpuArena:
    """
    A standalone GPU KV block arena.
    """
    @staticmethod
    def create(kind: str, dtype: str, num_layers: typing.SupportsInt | typing.SupportsIndex, num_blocks: typing.SupportsInt | typing.SupportsIndex, block_size: typing.SupportsInt | typing.SupportsIndex, num_kv_heads: typing.SupportsInt | typing.SupportsIndex, head_size: typing.SupportsInt | typing.SupportsIndex, latent_dim: typing.SupportsInt | typing.SupportsIndex, device: typing.SupportsInt | typing.SupportsIndex) -> GpuArena:
        ...
    def layer_tensors(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> list[tuple[int, list[int], list[int], str, int]]:
        ...
    @property
    def address(self) -> int:
        ...
    @property
    def layout(self) -> KvLayout:
        ...
    @property
    def nbytes(self) -> int:
        ...
class TransferRequest:
    """
    Completion of one batch of puts/gets, a flush or a notification.
    """
    def test(self) -> bool:
        """
        True when complete; raises the request's error if it failed; False while in flight.
        """
    def wait(self, timeout: typing.SupportsFloat | typing.SupportsIndex | None = None) -> None:
        """
        Wait for completion; raises TransferTimeoutError past `timeout` s, PeerError if the peer failed.
        """
    @property
    def bytes(self) -> int:
        ...
    @property
    def count(self) -> int:
        ...
    @property
    def cuda_ipc(self) -> bool:
        """
        True when the bytes moved through the CUDA IPC path.
        """
    @property
    def done(self) -> bool:
        ...
    @property
    def error(self) -> typing.Any:
        ...
class MemoryRegion:
    """
    Memory registered with the UCX context.
    """
    @property
    def addr(self) -> int:
        ...
    @property
    def device(self) -> int:
        ...
    @property
    def id(self) -> int:
        ...
    @property
    def ipc(self) -> bytes:
        """
        Encoded CUDA IPC descriptor for peers (empty: not exported).
        """
    @property
    def ipc_note(self) -> str:
        """
        Why the region was not exported for CUDA IPC.
        """
    @property
    def length(self) -> int:
        ...
    @property
    def memory(self) -> str:
        ...
    @property
    def rkey(self) -> bytes:
        ...
class UcxEndpoint:
    """
    A connection to one peer engine.
    """
    def add_remote_region(self, addr: typing.SupportsInt | typing.SupportsIndex, length: typing.SupportsInt | typing.SupportsIndex, rkey: bytes, ipc: bytes = b'') -> int:
        ...
    def check_health(self) -> None:
        """
        Raises PeerError if the peer failed or the endpoint was closed.
        """
    def close(self, force: bool = False, timeout: typing.SupportsFloat | typing.SupportsIndex = 5.0) -> None:
        ...
    def cuda_ipc_states(self) -> list[tuple[int, str]]:
        """
        (addr, state) of each remote region's CUDA IPC side: none, other host, not mapped, mapped, failed: ...
        """
    def flush(self) -> TransferRequest:
        ...
    def get(self, local: typing.Any, remote: typing.Any, lengths: typing.Any, notify: typing.Any = None) -> TransferRequest:
        ...
    def notify(self, message: bytes) -> TransferRequest:
        ...
    def put(self, local: typing.Any, remote: typing.Any, lengths: typing.Any, notify: typing.Any = None) -> TransferRequest:
        ...
    @property
    def cuda_ipc(self) -> bool:
        """
        Whether transfers to this peer can take the CUDA IPC path (some region mappable).
        """
    @property
    def failed(self) -> bool:
        ...
    @property
    def num_remote_regions(self) -> int:
        ...
    @property
    def peer_name(self) -> str:
        ...
class UcxEngine:
    """
    A UCP context + worker (see transfer/engine.h).
    """
    def __init__(self, lib_dir: str, name: str, transports: str = '', net_devices: str = '', error_handling: bool = True, progress_thread: bool = True, spin_us: typing.SupportsInt | typing.SupportsIndex = 200, cuda: bool = False, cuda_ipc: bool = True) -> None:
        ...
    def connect(self, address: bytes, peer_name: str) -> UcxEndpoint:
        ...
    def deregister(self, region_id: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    def progress(self) -> int:
        ...
    def register(self, addr: typing.SupportsInt | typing.SupportsIndex, length: typing.SupportsInt | typing.SupportsIndex, memory: str = 'host') -> MemoryRegion:
        ...
    def shutdown(self) -> None:
        ...
    def take_notifications(self, max: typing.SupportsInt | typing.SupportsIndex = 0) -> list:
        ...
    def wait_notification(self, timeout: typing.SupportsFloat | typing.SupportsIndex | None = None) -> bool:
        ...
    @property
    def address(self) -> bytes:
        ...
    @property
    def closed(self) -> bool:
        ...
    @property
    def cuda_ipc(self) -> bool:
        """
        Whether this engine runs the same-host CUDA IPC path (option on and a GPU present).
        """
    @property
    def ucx_version(self) -> str:
        ...
def _cuda_ipc_descriptor(handle: bytes, offset: typing.SupportsInt | typing.SupportsIndex = 0, host: str | None = None, same_process: bool = False, device: typing.SupportsInt | typing.SupportsIndex = 0) -> bytes:
    """
    Test hook: an encoded CUDA IPC descriptor (host None = this host) as a region's metadata carries it.
    """
def _raise_status(arg0: typing.SupportsInt | typing.SupportsIndex, arg1: str) -> None:
    """
    Test hook: raise the exception a native status code maps to.
    """
def alloc_host(nbytes: typing.SupportsInt | typing.SupportsIndex, pinned: bool = True) -> HostBuffer:
    """
    Allocate nbytes of host memory: pinned+mapped when CUDA is usable and pinned=True, else 4096-aligned pageable. Raises InvalidArgumentError (nbytes 0), CudaError, CapacityError.
    """
def block_hashes(token_ids: typing.Any, block_size: typing.SupportsInt | typing.SupportsIndex, ns_digest: typing.Any, algorithm: str = 'sha256', extra: typing.Any = None, parent: typing.Any = None, sha256_impl: str = 'auto', as_list: bool = False) -> typing.Any:
    """
    Chained 16-byte hashes of the full blocks of token_ids as a uint8 array of shape (n, 16), or as a
    list of 16-byte bytes objects with as_list=True.
    Use kvbm.block_hashes / kvbm.hashing.block_hashes_array rather than this directly.
    """
def copy_bytes(dst: typing.Any, src: typing.Any, impl: str = 'auto') -> None:
    """
    Copy src into dst (same size, not overlapping) as the host tier copies blocks (Note [Host copies]); impl 'memcpy' or 'sse2' forces one path (tests and benchmarks).
    """
def crc32c(data: typing.Any, crc: typing.SupportsInt | typing.SupportsIndex = 0, impl: str = 'auto') -> int:
    """
    CRC32C (Castagnoli) of a bytes-like object, continuing from `crc` (0 to start).
    """
def crc32c_rows(rows: typing.Annotated[numpy.typing.ArrayLike, numpy.uint8]) -> numpy.typing.NDArray[numpy.uint32]:
    """
    CRC32C of each row of a 2-D uint8 array (rows contiguous), as uint32[rows].
    """
def crc32c_impl() -> str:
    """
    The CRC32C implementation in use: 'sse4.2' or 'table'.
    """
def cuda_available() -> bool:
    """
    True if CUDA is compiled in and a GPU is usable now.
    """
def cuda_compiled() -> bool:
    """
    True if this build compiled the CUDA kernels.
    """
def cuda_device_count() -> int:
    """
    Number of usable GPUs (0 without CUDA).
    """
def eviction_policy_names() -> list[str]:
    """
    Names of the eviction policies (first = default).
    """
def fast128(data: typing.Any) -> bytes:
    """
    fast128 digest (16 bytes, non-cryptographic; see docs/hashing.md).
    """
def kv_gather(layout: KvLayout, block_ids: typing.Annotated[numpy.typing.ArrayLike, numpy.int64], dst_addresses: typing.Annotated[numpy.typing.ArrayLike, numpy.uint64], stream: typing.SupportsInt | typing.SupportsIndex | None = None, method: str = 'auto', max_ctas: typing.SupportsInt | typing.SupportsIndex = 0, piece_bytes: typing.SupportsInt | typing.SupportsIndex = 0, stage_bytes: typing.SupportsInt | typing.SupportsIndex = 0, layer_begin: typing.SupportsInt | typing.SupportsIndex = 0, layer_end: typing.SupportsInt | typing.SupportsIndex = -1) -> TransferHandle:
    """
    Queue engine blocks -> host slots; see kvbm.copy.gather.
    """
def kv_scatter(layout: KvLayout, block_ids: typing.Annotated[numpy.typing.ArrayLike, numpy.int64], src_addresses: typing.Annotated[numpy.typing.ArrayLike, numpy.uint64], stream: typing.SupportsInt | typing.SupportsIndex | None = None, method: str = 'auto', max_ctas: typing.SupportsInt | typing.SupportsIndex = 0, piece_bytes: typing.SupportsInt | typing.SupportsIndex = 0, stage_bytes: typing.SupportsInt | typing.SupportsIndex = 0, layer_begin: typing.SupportsInt | typing.SupportsIndex = 0, layer_end: typing.SupportsInt | typing.SupportsIndex = -1) -> TransferHandle:
    """
    Queue host slots -> engine blocks; see kvbm.copy.scatter.
    """
def raw_direct_io(path: str, total_bytes: typing.SupportsInt | typing.SupportsIndex, chunk_bytes: typing.SupportsInt | typing.SupportsIndex, fsync_after: bool = True, sync_every: typing.SupportsInt | typing.SupportsIndex = 0) -> dict:
    """
    Benchmark baseline: sequential O_DIRECT write then read of total_bytes in chunk_bytes requests (queue depth 1, one thread) through a temporary file at path; fdatasync at the end (fsync_after) and every sync_every chunks (> 0). Returns write_s, read_s, o_direct.
    """
def router_chain_keys(token_ids: typing.Any, block_size: typing.SupportsInt | typing.SupportsIndex, extra: str | bytes | None = None, parent: int | None = None, limit: int | None = None) -> list[int]:
    """
    Router keys (ints) of the full blocks of token_ids (at most limit), chained from parent or from the root
    of (block_size, extra). Use kvbm.router.index.chain_keys.
    """
def sha256(data: typing.Any, impl: str = 'auto') -> bytes:
    """
    SHA-256 digest (32 bytes) of a bytes-like object. impl: 'auto', 'portable' or 'sha-ni'.
    """
def sha256_impl() -> str:
    """
    The SHA-256 implementation in use: 'sha-ni' or 'portable'.
    """
DISK_ALIGNMENT: int = 4096
DISK_CODE_CHECKSUM: int = 8
DISK_CODE_IO: int = 7
DISK_MAX_KEY_BYTES: int = 256
DISK_RECORD_HEADER: int = 4096
DISK_RECORD_VERSION: int = 1
NO_TIER: int = 255
ucx_compiled: bool = True
