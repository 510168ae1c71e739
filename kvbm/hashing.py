"""Content hashes of KV-cache blocks: the identity kvbm uses for every block in every tier.

A block's hash chains over the whole prefix::

    h_i = H16(LE32(tokens_i) || [H16(extra_i)] || ns_digest || h_{i-1} || flag)

so equal hashes mean equal prefixes (same model, dtype, layout, block size, tensor-parallel
rank, tokens and extra keys). ``H16`` is SHA-256 truncated to 16 bytes (default, collision
resistant) or ``fast128``, a faster non-cryptographic hash for trusted single-tenant use.
Hashes are deterministic across processes, restarts and machines: no random seed, no
``hash()``. docs/hashing.md is the byte-exact specification, with test vectors.
"""

from __future__ import annotations

import functools
import hashlib
import struct
from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass

import numpy as np

from kvbm.errors import ConfigError, InvalidArgumentError

BLOCK_HASH_SIZE = 16
"""Bytes in one block hash."""

HASH_ALGORITHMS = ("sha256", "fast128")
"""Accepted values of ``Namespace.hash_algorithm``."""

MAX_BLOCK_SIZE = 1 << 24
"""Largest accepted block_size (tokens per block)."""

NAMESPACE_TAG = "kvbm-namespace-v1"
"""Version tag that starts every namespace encoding; a new encoding gets a new tag."""

_U32_MAX = 0xFFFFFFFF

TokenIds = Sequence[int] | np.ndarray  # list/tuple of int, 1-D integer array, array.array
Extra = bytes | Sequence[bytes | None] | None


def _check_str(name: str, value: object, *, allow_empty: bool) -> bytes:
    if not isinstance(value, str):
        raise ConfigError(f"Namespace.{name} must be a str, got {type(value).__name__}")
    if not allow_empty and not value:
        raise ConfigError(f"Namespace.{name} must not be empty")
    try:
        raw = value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ConfigError(f"Namespace.{name} is not valid Unicode text: {e}") from None
    if len(raw) > _U32_MAX:
        raise ConfigError(f"Namespace.{name} is too long ({len(raw)} bytes)")
    return raw


def _check_int(name: str, value: object, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"Namespace.{name} must be an int, got {type(value).__name__}")
    v = int(value)
    if not lo <= v <= hi:
        raise ConfigError(f"Namespace.{name} = {v} is out of range: expected {lo}..{hi}")
    return v


@dataclass(frozen=True)
class Namespace:
    """Everything that makes the KV bytes of equal tokens differ; part of every block hash.

    Blocks hashed under different namespaces never share a hash, so a cache can hold blocks of
    several models, dtypes, layouts or tensor-parallel ranks side by side.

    Raises:
        ConfigError: a field has the wrong type or value (empty ``model_id``/``dtype``/
            ``kv_layout``, ``block_size`` outside 1..2**24, ``tp_size < 1``, ``tp_rank`` outside
            ``0..tp_size-1``, unknown ``hash_algorithm``). ``ConfigError`` is an
            ``InvalidArgumentError``.
    """

    model_id: str
    dtype: str
    kv_layout: str
    block_size: int
    tp_rank: int = 0
    tp_size: int = 1
    revision: str = ""
    hash_algorithm: str = "sha256"

    def __post_init__(self) -> None:
        self._encode()  # validates every field

    def _encode(self) -> bytes:
        def field(raw: bytes) -> bytes:
            return struct.pack("<I", len(raw)) + raw

        model = _check_str("model_id", self.model_id, allow_empty=False)
        revision = _check_str("revision", self.revision, allow_empty=True)
        dtype = _check_str("dtype", self.dtype, allow_empty=False)
        layout = _check_str("kv_layout", self.kv_layout, allow_empty=False)
        block_size = _check_int("block_size", self.block_size, 1, MAX_BLOCK_SIZE)
        tp_size = _check_int("tp_size", self.tp_size, 1, _U32_MAX)
        tp_rank = _check_int("tp_rank", self.tp_rank, 0, tp_size - 1)
        algo = _check_str("hash_algorithm", self.hash_algorithm, allow_empty=False)
        if self.hash_algorithm not in HASH_ALGORITHMS:
            raise ConfigError(
                f"Namespace.hash_algorithm = {self.hash_algorithm!r} is unknown; expected one of {HASH_ALGORITHMS}"
            )
        return b"".join(
            [
                field(NAMESPACE_TAG.encode("ascii")),
                field(model),
                field(revision),
                field(dtype),
                field(layout),
                struct.pack("<III", block_size, tp_rank, tp_size),
                field(algo),
            ]
        )

    @property
    def encoding(self) -> bytes:
        """The canonical byte encoding hashed into :attr:`digest` (see docs/hashing.md)."""
        return self._encode()

    @functools.cached_property
    def digest(self) -> bytes:
        """16 bytes: the first half of SHA-256 over :attr:`encoding`, whatever the hash algorithm."""
        return hashlib.sha256(self._encode()).digest()[:BLOCK_HASH_SIZE]


TIER_NAMESPACE_TAG = b"kvbm-tier-namespace-v1"


def tier_namespace_digest(namespace: Namespace | bytes | None, block_bytes: int, tenant: str = "") -> bytes:
    """The one 16-byte namespace digest a BlockManager gives every tier below the host.

    Disk records and remote keys/records are stamped with it, and a block stamped otherwise is
    a miss. It binds everything that makes the bytes stored under one hash differ: the user's
    :class:`Namespace` (its :attr:`Namespace.digest`, or a 16-byte digest; ``None`` for raw
    hashes), the block size in bytes and the tenant name (``remote_namespace``). Built like
    :attr:`Namespace.digest`: the first half of SHA-256 over a length-prefixed encoding.

    Raises InvalidArgumentError for a namespace that is neither, a block size < 1 or a
    tenant that is not a str.
    """
    if namespace is None:
        ns = bytes(BLOCK_HASH_SIZE)
    elif isinstance(namespace, Namespace):
        ns = namespace.digest
    elif isinstance(namespace, (bytes, bytearray, memoryview)) and len(bytes(namespace)) == BLOCK_HASH_SIZE:
        ns = bytes(namespace)
    else:
        raise InvalidArgumentError(
            f"namespace: expected a kvbm.Namespace, its {BLOCK_HASH_SIZE}-byte digest or None, "
            f"got {type(namespace).__name__}"
        )
    if isinstance(block_bytes, bool) or not isinstance(block_bytes, (int, np.integer)) or block_bytes < 1:
        raise InvalidArgumentError(f"block_bytes: must be a positive int, got {block_bytes!r}")
    if not isinstance(tenant, str):
        raise InvalidArgumentError(f"tenant: must be a str, got {type(tenant).__name__}")
    t = tenant.encode("utf-8")
    enc = b"".join(
        struct.pack("<I", len(f)) + f for f in (TIER_NAMESPACE_TAG, ns, struct.pack("<Q", int(block_bytes)), t)
    )
    return hashlib.sha256(enc).digest()[:BLOCK_HASH_SIZE]


def _resolve(block_size: object, namespace: object) -> tuple[int, bytes, str]:
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)):
        raise InvalidArgumentError(f"block_size must be an int, got {type(block_size).__name__}")
    bs = int(block_size)
    if bs <= 0:
        raise InvalidArgumentError(f"block_size = {bs} must be > 0")
    if isinstance(namespace, Namespace):
        if namespace.block_size != bs:
            raise InvalidArgumentError(
                f"block_size = {bs} differs from namespace.block_size = {namespace.block_size}"
            )
        return bs, namespace.digest, namespace.hash_algorithm
    if isinstance(namespace, (bytes, bytearray, memoryview)):
        raw = bytes(namespace)
        if len(raw) != BLOCK_HASH_SIZE:
            raise InvalidArgumentError(
                f"namespace digest must be exactly {BLOCK_HASH_SIZE} bytes, got {len(raw)}"
            )
        return bs, raw, "sha256"
    raise InvalidArgumentError(
        f"namespace must be a kvbm.Namespace or its 16-byte digest, got {type(namespace).__name__}"
    )


def block_hashes_array(
    token_ids: TokenIds,
    block_size: int,
    namespace: Namespace | bytes,
    extra: Extra = None,
    *,
    parent: bytes | None = None,
) -> np.ndarray:
    """Chained hashes of the full blocks of ``token_ids`` as a ``uint8`` array of shape ``(n, 16)``.

    The fast path: no Python object per block, and the hashing runs with the GIL released.
    ``n = len(token_ids) // block_size``; tokens after the last full block are checked but not
    hashed. Row ``i`` equals ``block_hashes(...)[i]``.

    Args:
        token_ids: a list/tuple of ints, a 1-D numpy array of any integer dtype (strided and
            big-endian arrays too), or an ``array.array`` of an integer type. Every id must
            satisfy ``0 <= t < 2**32``.
        block_size: tokens per block; must equal ``namespace.block_size`` for a Namespace.
        namespace: a :class:`Namespace`, or a 16-byte namespace digest (then the algorithm is
            ``"sha256"``).
        extra: ``None``; one bytes-like for every block (LoRA name, cache salt ...); or a
            sequence with one bytes-like or ``None`` per full block. ``b""`` differs from None.
        parent: the 16-byte hash of the block before ``token_ids[0]``, to continue a chain;
            ``None`` starts one.

    Raises:
        InvalidArgumentError: block_size <= 0 or not matching the namespace; token_ids not
            1-D, not integer (bool included), or an id outside ``0 <= t < 2**32`` (the message
            names the index); extra of the wrong length or type; parent or a digest not 16 bytes.
    """
    from kvbm import _native

    bs, ns_digest, algo = _resolve(block_size, namespace)
    return _native.block_hashes(token_ids, bs, ns_digest, algo, extra, parent)


def block_hashes(
    token_ids: TokenIds,
    block_size: int,
    namespace: Namespace | bytes,
    extra: Extra = None,
    *,
    parent: bytes | None = None,
) -> list[bytes]:
    """Chained 16-byte hashes of the full blocks of ``token_ids``, one ``bytes`` per block.

    Same arguments, promises and errors as :func:`block_hashes_array`, which is faster when
    the caller can keep the hashes in an array.
    """
    from kvbm import _native

    bs, ns_digest, algo = _resolve(block_size, namespace)
    return _native.block_hashes(token_ids, bs, ns_digest, algo, extra, parent, as_list=True)


# ---- the one hash normaliser ---------------------------------------------------------------
# Every public entry point that takes block hashes (BlockManager, the disk tier, the remote
# tiers) goes through the three functions below, so one set of forms is accepted and one set of
# errors is raised everywhere:
#   * one hash: 16 bytes (bytes, bytearray, memoryview, a (16,) uint8 array) or an int in
#     0 .. 2**128-1 (16 big-endian bytes);
#   * many: a sequence of those, or a C-contiguous (n, 16) uint8 array.
# Anything else -- None, bools, floats, str, negative or too-large ints, other lengths or
# dtypes -- is an InvalidArgumentError naming the argument (and the index within it).

_HASH_INT_LIMIT = 1 << (8 * BLOCK_HASH_SIZE)


def hash_key(h: object, what: str = "hash", *, variable_length: bool = False) -> bytes:
    """One block hash as 16 ``bytes``.

    Accepts 16 bytes (``bytes``, ``bytearray``, ``memoryview``, a ``(16,)`` uint8 array) or an
    int in ``0 .. 2**128-1`` (encoded big-endian). With ``variable_length`` (the disk tier's
    catalog keys) bytes of 1..256 bytes are kept as they are and ints up to ``2**256-1`` become
    32 bytes when they do not fit 16.

    Raises:
        InvalidArgumentError: anything else (None, bool, float, str, an int out of range, a
            buffer of another length or dtype); the message names ``what``.
    """
    if type(h) is bytes and len(h) == BLOCK_HASH_SIZE:
        return h
    if isinstance(h, bool) or h is None:
        raise InvalidArgumentError(f"{what}: expected a {BLOCK_HASH_SIZE}-byte block hash, got {h!r}")
    if isinstance(h, (int, np.integer)):
        v = int(h)
        limit = _HASH_INT_LIMIT**2 if variable_length else _HASH_INT_LIMIT
        if not 0 <= v < limit:
            bound = "2**256-1" if variable_length else "2**128-1"
            raise InvalidArgumentError(f"{what}: an int block hash must be in 0..{bound}, got {_short(v)}")
        return v.to_bytes(BLOCK_HASH_SIZE if v < _HASH_INT_LIMIT else 2 * BLOCK_HASH_SIZE, "big")
    if isinstance(h, np.ndarray):
        if h.dtype != np.uint8 or h.ndim != 1 or (h.shape[0] != BLOCK_HASH_SIZE and not variable_length):
            raise InvalidArgumentError(
                f"{what}: expected a ({BLOCK_HASH_SIZE},) uint8 array, got shape {h.shape} dtype {h.dtype}"
            )
        b = h.tobytes()
    elif isinstance(h, (bytes, bytearray, memoryview)):
        mv = memoryview(h)
        if mv.itemsize != 1:
            raise InvalidArgumentError(f"{what}: a block hash is bytes, got a buffer of item size {mv.itemsize}")
        b = mv.tobytes()
    else:
        raise InvalidArgumentError(f"{what}: expected a {BLOCK_HASH_SIZE}-byte block hash, got {type(h).__name__}")
    if variable_length:
        if not 0 < len(b) <= 256:
            raise InvalidArgumentError(f"{what}: a block hash must be 1..256 bytes, got {len(b)}")
    elif len(b) != BLOCK_HASH_SIZE:
        raise InvalidArgumentError(f"{what}: a block hash is {BLOCK_HASH_SIZE} bytes, got {len(b)}")
    return b


def _short(v: int) -> str:
    return str(v) if v.bit_length() <= 256 else f"an int of {v.bit_length()} bits"


def hashes_arg(hashes: object, what: str = "hashes") -> np.ndarray | list[bytes]:
    """Validate many block hashes; returns them in a form the native core takes without copying.

    A C-contiguous ``(n, 16)`` uint8 array is returned as is; a sequence becomes a list of
    16-byte ``bytes`` (each element as :func:`hash_key` accepts).

    Raises:
        InvalidArgumentError: not a sequence of hashes (None, one bytes object, str, a set or
            mapping), an array of another dtype or shape, or a bad element (named by index).
    """
    if isinstance(hashes, np.ndarray):
        if hashes.dtype != np.uint8 or hashes.ndim != 2 or hashes.shape[1] != BLOCK_HASH_SIZE:
            raise InvalidArgumentError(
                f"{what}: expected an (n, {BLOCK_HASH_SIZE}) uint8 array, got shape {hashes.shape} dtype {hashes.dtype}"
            )
        return hashes if hashes.flags.c_contiguous else np.ascontiguousarray(hashes)
    if isinstance(hashes, list) and all(type(h) is bytes and len(h) == BLOCK_HASH_SIZE for h in hashes):
        return hashes  # the common case, checked without building a new list
    if hashes is None or isinstance(hashes, (bytes, bytearray, memoryview, str, Mapping, Set)):
        raise InvalidArgumentError(
            f"{what}: expected a sequence of {BLOCK_HASH_SIZE}-byte hashes or an (n, {BLOCK_HASH_SIZE}) uint8 "
            f"array, got {type(hashes).__name__}"
        )
    try:
        items = list(hashes)  # type: ignore[call-overload]
    except TypeError:
        raise InvalidArgumentError(
            f"{what}: expected a sequence of {BLOCK_HASH_SIZE}-byte hashes, got {type(hashes).__name__}"
        ) from None
    return [hash_key(h, f"{what}[{i}]") for i, h in enumerate(items)]


def normalize_hashes(hashes: object, what: str = "hashes") -> list[bytes]:
    """Many block hashes as a list of 16-byte ``bytes`` (same forms and errors as :func:`hashes_arg`)."""
    h = hashes_arg(hashes, what)
    return [bytes(r) for r in h] if isinstance(h, np.ndarray) else list(h)


__all__ = [
    "BLOCK_HASH_SIZE",
    "HASH_ALGORITHMS",
    "MAX_BLOCK_SIZE",
    "NAMESPACE_TAG",
    "TIER_NAMESPACE_TAG",
    "Namespace",
    "block_hashes",
    "block_hashes_array",
    "hash_key",
    "hashes_arg",
    "normalize_hashes",
    "tier_namespace_digest",
]
