"""Remote tiers: block stores outside this process (Redis/Valkey, a ``kvbm serve`` server).

Every remote tier implements :class:`RemoteTier`: ``lookup_prefix`` (how many leading blocks of
a chain the store holds), ``get`` (copy blocks into a caller array, one ok flag per block),
``put`` (store blocks, one ok flag per block), ``stats`` and ``close``.

Design note — a remote store is a cache we do not trust.
    Whatever sits behind the network may evict, lose, truncate or mix up what we gave it, and
    several tenants may share it. So every block travels as a *record*: a fixed header followed
    by the block's bytes. The header carries a magic and version, the namespace fingerprint
    (the 16-byte digest of the tenant's namespace), the block's own hash, the payload length
    and the CRC32C of the payload. ``get`` verifies all of them; any mismatch makes that block
    a miss, counted in ``stats()["checksum_failures"]``, and its bytes are never handed out.
    Keys are prefixed with the namespace digest as well, so tenants never even address each
    other's blocks; the header check is the second line of defence.

    A remote store being down is not an error for the engine: lookups and gets become misses
    and puts become "not stored", counted in ``stats()["errors"]``. After a failure a tier
    stops asking the store for ``retry_interval_s`` seconds (so an engine step does not wait
    on one timeout per call) and then tries again, which is how it recovers when the store
    comes back. Only misconfiguration (a malformed URL, a refused token, a block size the
    server cannot hold) raises.

Record header (little endian, 56 bytes)::

    magic      4s   b"KVBR"
    version    u16  1
    hdr_len    u16  56
    namespace  16s  namespace digest
    hash       16s  block hash
    length     u64  payload bytes
    crc32c     u32  CRC32C of the payload
    reserved   u32  0
"""

from __future__ import annotations

import abc
import struct
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from kvbm import _native
from kvbm.errors import InvalidArgumentError
from kvbm.hashing import normalize_hashes as normalize_hashes  # the one hash normaliser, re-exported
from kvbm.tier_registry import remote_tier_class

HASH_SIZE = 16
RECORD_MAGIC = b"KVBR"
RECORD_VERSION = 1
_HEADER = struct.Struct("<4sHH16s16sQII")
HEADER_SIZE = _HEADER.size
assert HEADER_SIZE == 56

HashesLike = Sequence[bytes] | np.ndarray



def namespace_digest(namespace: Any) -> bytes:
    """The 16-byte fingerprint of a :class:`kvbm.Namespace`, a 16-byte digest or a tenant name (str)."""
    import hashlib

    from kvbm.hashing import Namespace

    if isinstance(namespace, Namespace):
        return namespace.digest
    if isinstance(namespace, (bytes, bytearray, memoryview)):
        b = bytes(namespace)
        if len(b) != HASH_SIZE:
            raise InvalidArgumentError(f"namespace: a digest must be {HASH_SIZE} bytes, got {len(b)}")
        return b
    if isinstance(namespace, str):
        if not namespace:
            raise InvalidArgumentError("namespace: must not be empty")
        return hashlib.sha256(b"kvbm-remote-namespace-v1\0" + namespace.encode("utf-8")).digest()[:HASH_SIZE]
    raise InvalidArgumentError(
        f"namespace: expected a kvbm.Namespace, a 16-byte digest or a name, got {type(namespace).__name__}"
    )


def as_block_rows(data: Any, n: int, block_bytes: int, what: str, *, writable: bool) -> np.ndarray:
    """View ``data`` as a C-contiguous ``(n, block_bytes)`` uint8 array (no copy for arrays/buffers).

    Accepts a numpy array of any dtype whose bytes are n*block_bytes, a bytes-like object, or
    (read-only use) a sequence of n buffers of block_bytes each (copied then).
    """
    if isinstance(data, np.ndarray):
        if not data.flags.c_contiguous:
            raise InvalidArgumentError(f"{what}: the array must be C-contiguous")
        if writable and not data.flags.writeable:
            raise InvalidArgumentError(f"{what}: the array is read-only")
        if data.nbytes != n * block_bytes:
            raise InvalidArgumentError(
                f"{what}: expected {n} blocks of {block_bytes} bytes ({n * block_bytes} bytes), got {data.nbytes}"
            )
        return data.reshape(-1).view(np.uint8).reshape(n, block_bytes)
    if isinstance(data, (bytes, bytearray, memoryview)):
        mv = memoryview(data).cast("B")
        if writable and mv.readonly:
            raise InvalidArgumentError(f"{what}: the buffer is read-only")
        if mv.nbytes != n * block_bytes:
            raise InvalidArgumentError(
                f"{what}: expected {n} blocks of {block_bytes} bytes ({n * block_bytes} bytes), got {mv.nbytes}"
            )
        return np.frombuffer(mv, np.uint8).reshape(n, block_bytes)
    if writable:
        raise InvalidArgumentError(f"{what}: expected a writable numpy array or buffer, got {type(data).__name__}")
    rows = list(data)
    if len(rows) != n:
        raise InvalidArgumentError(f"{what}: expected {n} buffers, got {len(rows)}")
    out = np.empty((n, block_bytes), np.uint8)
    for i, r in enumerate(rows):
        b = np.frombuffer(memoryview(r).cast("B"), np.uint8)
        if b.size != block_bytes:
            raise InvalidArgumentError(f"{what}[{i}]: expected {block_bytes} bytes, got {b.size}")
        out[i] = b
    return out


def encode_header(ns: bytes, block_hash: bytes, payload: Any) -> bytes:
    """The 56-byte record header of ``payload`` (CRC32C computed here)."""
    mv = memoryview(payload).cast("B")
    return _HEADER.pack(RECORD_MAGIC, RECORD_VERSION, HEADER_SIZE, ns, block_hash, mv.nbytes, _native.crc32c(mv), 0)


_HEADER_ID = struct.Struct("<4sHH16s16sQ")
HEADER_ID_SIZE = _HEADER_ID.size
"""Leading bytes of a header that name the record (all but CRC32C and reserved)."""


def header_id(ns: bytes, block_hash: bytes, length: int) -> bytes:
    """The first :data:`HEADER_ID_SIZE` bytes a valid header of this record holds (magic,
    version, size, namespace, hash, length): a reader that knows what it asked for compares them."""
    return _HEADER_ID.pack(RECORD_MAGIC, RECORD_VERSION, HEADER_SIZE, ns, block_hash, length)


def check_record(header: Any, payload: Any, ns: bytes, block_hash: bytes) -> str | None:
    """None when ``header`` describes ``payload`` for (ns, block_hash); else why not (for logs/tests)."""
    hb = memoryview(header).cast("B")
    if hb.nbytes < HEADER_SIZE:
        return f"record shorter than its header ({hb.nbytes} bytes)"
    magic, version, hlen, rns, rhash, length, crc, _ = _HEADER.unpack_from(hb)
    if magic != RECORD_MAGIC:
        return f"bad magic {magic!r}"
    if version != RECORD_VERSION or hlen != HEADER_SIZE:
        return f"unknown record version {version} (header {hlen} bytes)"
    if rns != ns:
        return "namespace fingerprint differs"
    if rhash != block_hash:
        return "block hash differs"
    pb = memoryview(payload).cast("B")
    if length != pb.nbytes:
        return f"length {length} differs from the {pb.nbytes} bytes expected"
    if _native.crc32c(pb) != crc:
        return "CRC32C mismatch"
    return None


class Counters:
    """Thread-safe counters of one remote tier (what ``stats()`` reports)."""

    NAMES = (
        "lookups", "lookup_blocks", "hits", "misses", "gets", "get_blocks", "get_hits", "get_misses",
        "puts", "put_blocks", "stored", "store_failures", "bytes_stored", "bytes_loaded",
        "checksum_failures", "errors", "protocol_errors", "skipped_unavailable",
    )

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._c = dict.fromkeys(self.NAMES, 0)

    def add(self, **kw: int) -> None:
        with self._lock:
            for k, v in kw.items():
                self._c[k] += v

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._c)


class Availability:
    """Circuit breaker: after a failure, report "unavailable" for ``retry_interval_s`` seconds."""

    def __init__(self, retry_interval_s: float) -> None:
        self.retry_interval_s = float(retry_interval_s)
        self._down_until = 0.0
        self.last_error: str | None = None

    def ok(self) -> bool:
        return time.monotonic() >= self._down_until

    def failed(self, err: BaseException) -> None:
        self.last_error = f"{type(err).__name__}: {err}"
        self._down_until = time.monotonic() + self.retry_interval_s

    def succeeded(self) -> None:
        self._down_until = 0.0

    @property
    def up(self) -> bool:
        return self._down_until == 0.0


class RemoteTier(abc.ABC):
    """A block store outside this process. Implementations are thread-safe.

    Attributes:
        block_bytes: bytes of every block this tier stores and returns.
        namespace: the 16-byte namespace fingerprint keys and records are bound to.

    Contract: ``lookup_prefix``, ``get`` and ``put`` never raise because the store is
    unreachable or returned bad data; they report misses / failures and count them. They raise
    :class:`~kvbm.errors.InvalidArgumentError` for malformed arguments (hash sizes, buffer sizes).
    """

    block_bytes: int
    namespace: bytes
    accepts_token: bool = False
    """Whether the tier takes a ``token=`` credential (``remote_token``)."""

    @abc.abstractmethod
    def lookup_prefix(self, hashes: HashesLike) -> int:
        """How many leading blocks of ``hashes`` the store holds (0 when unreachable)."""

    @abc.abstractmethod
    def get(self, hashes: HashesLike, out: Any) -> np.ndarray:
        """Copy blocks into ``out`` (a writable ``(n, block_bytes)`` buffer); bool array of which arrived.

        Rows whose flag is False are left unspecified (possibly partly written).
        """

    @abc.abstractmethod
    def put(self, hashes: HashesLike, data: Any) -> np.ndarray:
        """Store blocks (``data``: ``(n, block_bytes)`` bytes); bool array of which are stored."""

    @abc.abstractmethod
    def stats(self) -> dict[str, Any]:
        """Counters (see :class:`Counters`) plus ``available`` and ``last_error``."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release connections. Idempotent."""

    def __enter__(self) -> RemoteTier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_remote_tier(
    url: str,
    *,
    block_bytes: int,
    namespace: Any,
    token: str | None = None,
    timeout_s: float = 2.0,
    **kwargs: Any,
) -> RemoteTier:
    """Open the remote tier a URL names.

    ``redis://host:port/db``, ``rediss://...``, ``unix:///path`` and ``valkey://host:port/db`` open a
    :class:`~kvbm.tiers.redis_tier.RedisTier`; ``redis+cluster://host:port`` a Redis Cluster one;
    ``kvbm://host:port[/namespace]`` a :class:`~kvbm.tiers.serve_client.ServeClientTier` (``token``
    is its credential). Schemes are looked up in :mod:`kvbm.tier_registry`, which imports the
    tier's module only now. Extra keyword arguments go to the tier's constructor.

    Raises:
        ConfigError: unknown scheme or malformed URL.
        PeerError: a ``kvbm serve`` server refused the connection (wrong token, block size).
    """
    cls = remote_tier_class(url)  # ConfigError for a malformed URL or an unknown scheme
    if token is not None and getattr(cls, "accepts_token", False):
        kwargs["token"] = token  # tiers without credentials (Redis: a password in the URL) ignore it
    return cls(url, block_bytes=block_bytes, namespace=namespace, timeout_s=timeout_s, **kwargs)
