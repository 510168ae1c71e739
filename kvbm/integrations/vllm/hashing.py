"""Seed-stable, namespaced chained block hashes of a request's tokens.

``h_i = H(root, h_{i-1}, tokens_i)`` with ``root = H(namespace, request extras)``. ``H`` is SHA-256
(or BLAKE2b-256), so the hashes are identical across processes, restarts and machines; nothing
depends on ``PYTHONHASHSEED`` or vLLM's own ``request.block_hashes`` (whose stability depends on
vLLM's hash settings). The namespace binds what makes KV bytes differ: model identity, dtype,
block size, KV layout and the tensor-parallel world size. Each tensor-parallel rank stores its
own shard under the same logical hash, in its own rank directory (see ``disk.py``).
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Iterable, Sequence
from typing import Any

_FORMAT_VERSION = b"kvbm-vllm-v1"


def _new(algorithm: str) -> hashlib._Hash:
    if algorithm == "sha256":
        return hashlib.sha256()
    return hashlib.blake2b(digest_size=32)


def namespace_digest(fields: dict[str, Any], algorithm: str = "sha256") -> bytes:
    """Digest of the namespace fields (sorted ``key=value`` lines)."""
    h = _new(algorithm)
    h.update(_FORMAT_VERSION)
    for key in sorted(fields):
        h.update(f"\n{key}={fields[key]!r}".encode())
    return h.digest()


def request_root(namespace: bytes, extras: Iterable[tuple[str, Any]], algorithm: str = "sha256") -> bytes:
    """Root of a request's chain: the namespace plus per-request keys (LoRA, cache salt, mm hashes)."""
    h = _new(algorithm)
    h.update(namespace)
    for tag, value in extras:
        h.update(f"\x00{tag}={value!r}".encode())
    return h.digest()


def chain_hashes(root: bytes, token_ids: Sequence[int], block_size: int, start: int,
                 parent: bytes | None, algorithm: str = "sha256") -> list[bytes]:
    """Hashes of full blocks ``start, start+1, ...`` of ``token_ids``.

    ``parent`` is the hash of block ``start - 1`` (``None`` when ``start == 0``, the chain then
    starts at ``root``).
    """
    out: list[bytes] = []
    prev = root if parent is None else parent
    n_full = len(token_ids) // block_size
    for i in range(start, n_full):
        h = _new(algorithm)
        h.update(prev)
        h.update(array("i", token_ids[i * block_size:(i + 1) * block_size]).tobytes())
        prev = h.digest()
        out.append(prev)
    return out
