"""A remote tier on Redis, Valkey or Redis Cluster (optional dependency: ``pip install 'kvblockmgr[redis]'``).

Layout in the store. A block is one record (see :mod:`kvbm.tiers.remote`: 56-byte header, then
the payload) cut into chunks of at most ``chunk_bytes`` payload bytes::

    kvbm:{<ns hex><hash hex>}      header + payload[0 : chunk_bytes]
    kvbm:{<ns hex><hash hex>}:1    payload[chunk_bytes : 2*chunk_bytes]
    ...

The ``{...}`` hash tag puts all chunks of a block in one Redis Cluster slot, so a lookup can ask
for the first and last chunk in one ``EXISTS``. Every call is one pipelined round trip for the
whole batch (``transaction=False``: no MULTI/EXEC). ``get`` verifies the record header (magic,
namespace, hash, length, CRC32C); a block with a missing chunk is a miss, one whose bytes do not
verify is a miss counted in ``checksum_failures``.

Eviction and TTL are the server's business: kvbm sets no expiry unless ``ttl_s`` is given.
Recommended server setting: ``maxmemory <bytes>`` with ``maxmemory-policy allkeys-lru`` (or
``allkeys-lfu``). The ``volatile-*`` policies never evict keys without a TTL, and
``noeviction`` makes writes fail once memory is full (kvbm counts them as store failures and
goes on). Redis may evict one chunk of a block and keep another; that block then reads as a
miss, never as wrong bytes.

Redis Cluster: ``redis+cluster://host:port`` uses ``redis.cluster.RedisCluster`` (pipelines are
split per node by redis-py).
"""

from __future__ import annotations

import contextlib
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from kvbm.errors import ConfigError
from kvbm.tiers.remote import (
    HEADER_SIZE,
    Availability,
    Counters,
    HashesLike,
    RemoteTier,
    as_block_rows,
    check_record,
    encode_header,
    namespace_digest,
    normalize_hashes,
)


def _import_redis() -> Any:
    try:
        import redis
    except ImportError:
        raise ConfigError(
            "remote_url is a redis:// URL but redis-py is not installed: pip install 'kvblockmgr[redis]'"
        ) from None
    return redis


class RedisTier(RemoteTier):
    """Blocks in Redis / Valkey / Redis Cluster, bound to one namespace.

    Args:
        url: ``redis://[:password@]host:port/db``, ``rediss://`` (TLS), ``unix:///path.sock``,
            ``valkey://`` (same as redis://) or ``redis+cluster://host:port`` (a cluster seed).
        block_bytes: bytes per block (> 0).
        namespace: a :class:`kvbm.Namespace`, its 16-byte digest, or a tenant name.
        timeout_s: socket connect/read timeout per round trip.
        chunk_bytes: largest payload piece stored under one key (default 1 MiB).
        ttl_s: optional expiry of stored blocks in seconds (None: the server's eviction decides).
        retry_interval_s: after a connection failure, report misses without asking the server
            for this long, then try again.
        max_batch: blocks per pipelined round trip (bigger requests are split).

    Raises:
        ConfigError: malformed URL or arguments, or redis-py missing; the message names the
            URL. Nothing is raised when the server is unreachable or misbehaves: calls degrade
            to misses and count ``errors`` (see :meth:`_store_errors`).
    """

    def __init__(
        self,
        url: str,
        *,
        block_bytes: int,
        namespace: Any,
        timeout_s: float = 2.0,
        chunk_bytes: int = 1 << 20,
        ttl_s: float | None = None,
        retry_interval_s: float = 1.0,
        max_batch: int = 256,
    ) -> None:
        redis = _import_redis()
        self._redis = redis
        if not isinstance(url, str):
            raise ConfigError(f"remote_url: expected a URL string, got {type(url).__name__}")
        shown = _url_for_errors(url)
        for name, val, lo in (("remote_timeout_s", timeout_s, 1e-6), ("retry_interval_s", retry_interval_s, 0.0)):
            if isinstance(val, bool) or not isinstance(val, (int, float)) or not lo <= val <= 3600:
                raise ConfigError(f"{name}: must be a number in [{lo}, 3600] for {shown}, got {val!r}")
        ttl_ok = ttl_s is None or (not isinstance(ttl_s, bool) and isinstance(ttl_s, (int, float)) and 0 < ttl_s < 1e9)
        if not ttl_ok:
            raise ConfigError(f"ttl_s: must be > 0 or None for {shown}, got {ttl_s!r}")
        if isinstance(block_bytes, bool) or not isinstance(block_bytes, int) or block_bytes <= 0:
            raise ConfigError(f"block_bytes: must be a positive int, got {block_bytes!r}")
        if not isinstance(chunk_bytes, int) or chunk_bytes < 4096:
            raise ConfigError(f"chunk_bytes: must be an int >= 4096, got {chunk_bytes!r}")
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch <= 0:
            raise ConfigError(f"max_batch: must be a positive int, got {max_batch!r}")
        self.block_bytes = int(block_bytes)
        self.namespace = namespace_digest(namespace)
        self.chunk_bytes = int(chunk_bytes)
        self.num_chunks = -(-self.block_bytes // self.chunk_bytes)
        self.ttl_ms = None if ttl_s is None else max(1, int(ttl_s * 1000))
        self.max_batch = max_batch
        self.url = url
        self._ns_hex = self.namespace.hex()
        self._counters = Counters()
        self._avail = Availability(retry_interval_s)
        self._closed = False

        try:
            parts = urlsplit(url)
            scheme = parts.scheme.lower()
            _ = parts.port  # a malformed port raises ValueError here, not at the first request
            db = parts.path.strip("/")
            if scheme != "unix" and db and not (db.isascii() and db.isdigit()):
                raise ValueError(f"the database must be a number, got {db[:40]!r}")
        except ValueError as e:
            raise ConfigError(f"remote_url: cannot use {shown}: {e}") from None
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        common = dict(
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 1),
        )
        self.cluster = scheme.endswith("+cluster")
        try:
            if self.cluster:
                from redis.cluster import RedisCluster

                base = scheme.split("+", 1)[0]
                self._client = RedisCluster.from_url(urlunsplit((base,) + tuple(parts[1:])), **common)
            else:
                if scheme.startswith("valkey"):
                    url = urlunsplit((scheme.replace("valkey", "redis"),) + tuple(parts[1:]))
                self._client = redis.Redis.from_url(url, **common)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"remote_url: cannot use {shown}: {e}") from None
        except redis.exceptions.RedisError as e:  # a cluster seed that cannot be reached
            raise ConfigError(f"remote_url: cannot reach the Redis Cluster seed {shown}: {e}") from None
        except Exception as e:  # anything else redis-py raises while setting up: name the URL
            msg = f"remote_url: cannot set up a Redis client for {shown}: {type(e).__name__}: {e}"
            raise ConfigError(msg) from None

    # ---- keys ---------------------------------------------------------------------------------
    def _key(self, h: bytes, chunk: int = 0) -> bytes:
        k = f"kvbm:{{{self._ns_hex}{h.hex()}}}"
        return (k if chunk == 0 else f"{k}:{chunk}").encode()

    def _batches(self, n: int) -> range:
        return range(0, n, self.max_batch)

    def _fail(self, e: BaseException) -> None:
        self._avail.failed(e)
        self._counters.add(errors=1)

    def _store_errors(self) -> tuple[type[BaseException], ...]:
        """What a misbehaving store can make redis-py raise; each one is a counted miss / failure.

        Not only connection loss: ``redis://host/99`` fails with ``ResponseError`` (no such
        database) on the first command, a peer that is not Redis makes the parser raise
        ``InvalidResponse``, ``ValueError`` or (deeply nested replies) ``RecursionError``.
        Whatever the store sends, ``lookup_prefix`` / ``get`` / ``put`` report misses, count
        ``errors`` and keep ``last_error``; the circuit breaker then spares the store for
        ``retry_interval_s``.
        """
        ex = self._redis.exceptions
        return (ex.RedisError, OSError, RecursionError, ValueError, TypeError, IndexError, UnicodeError)

    # ---- RemoteTier ---------------------------------------------------------------------------
    def lookup_prefix(self, hashes: HashesLike) -> int:
        hs = normalize_hashes(hashes)
        self._counters.add(lookups=1, lookup_blocks=len(hs))
        if not hs:
            return 0
        if self._closed or not self._avail.ok():
            self._counters.add(misses=len(hs), skipped_unavailable=1)
            return 0
        n = 0
        try:
            for start in self._batches(len(hs)):
                part = hs[start:start + self.max_batch]
                pipe = self._client.pipeline(transaction=False)
                for h in part:
                    if self.num_chunks > 1:
                        pipe.exists(self._key(h), self._key(h, self.num_chunks - 1))
                    else:
                        pipe.exists(self._key(h))
                res = pipe.execute(raise_on_error=False)
                want = 2 if self.num_chunks > 1 else 1
                stop = False
                for r in res:
                    if isinstance(r, int) and r == want:
                        n += 1
                    else:
                        stop = True
                        break
                if stop:
                    break
        except self._store_errors() as e:
            self._fail(e)
            self._counters.add(misses=len(hs))
            return 0
        self._avail.succeeded()
        self._counters.add(hits=n, misses=len(hs) - n)
        return n

    def get(self, hashes: HashesLike, out: Any) -> np.ndarray:
        hs = normalize_hashes(hashes)
        rows = as_block_rows(out, len(hs), self.block_bytes, "out", writable=True)
        ok = np.zeros(len(hs), bool)
        self._counters.add(gets=1, get_blocks=len(hs))
        if not hs:
            return ok
        if self._closed or not self._avail.ok():
            self._counters.add(get_misses=len(hs), skipped_unavailable=1)
            return ok
        cb, nc = self.chunk_bytes, self.num_chunks
        bad = 0
        try:
            for start in self._batches(len(hs)):
                part = hs[start:start + self.max_batch]
                pipe = self._client.pipeline(transaction=False)
                for h in part:
                    for c in range(nc):
                        pipe.get(self._key(h, c))
                res = pipe.execute(raise_on_error=False)
                for j, h in enumerate(part):
                    i = start + j
                    vals = res[j * nc:(j + 1) * nc]
                    if any(not isinstance(v, bytes) for v in vals):
                        continue  # a chunk is missing (evicted, expired, never stored)
                    head = vals[0]
                    row = rows[i]
                    pos, good = 0, len(head) >= HEADER_SIZE
                    for c, v in enumerate(vals):
                        piece = memoryview(v)[HEADER_SIZE:] if c == 0 else memoryview(v)
                        want = min(cb, self.block_bytes - c * cb)
                        if not good or len(piece) != want:
                            good = False
                            break
                        row[pos:pos + want] = np.frombuffer(piece, np.uint8)
                        pos += want
                    if good and check_record(head[:HEADER_SIZE], row, self.namespace, h) is None:
                        ok[i] = True
                    else:
                        bad += 1
        except self._store_errors() as e:
            self._fail(e)
            ok[:] = False
            self._counters.add(get_misses=len(hs))
            return ok
        self._avail.succeeded()
        hits = int(ok.sum())
        self._counters.add(
            get_hits=hits, get_misses=len(hs) - hits, checksum_failures=bad, bytes_loaded=hits * self.block_bytes
        )
        return ok

    def put(self, hashes: HashesLike, data: Any) -> np.ndarray:
        hs = normalize_hashes(hashes)
        rows = as_block_rows(data, len(hs), self.block_bytes, "data", writable=False)
        ok = np.zeros(len(hs), bool)
        self._counters.add(puts=1, put_blocks=len(hs))
        if not hs:
            return ok
        if self._closed or not self._avail.ok():
            self._counters.add(store_failures=len(hs), skipped_unavailable=1)
            return ok
        cb, nc = self.chunk_bytes, self.num_chunks
        try:
            for start in self._batches(len(hs)):
                part = hs[start:start + self.max_batch]
                pipe = self._client.pipeline(transaction=False)
                for j, h in enumerate(part):
                    row = memoryview(rows[start + j])
                    header = encode_header(self.namespace, h, row)
                    # The tail chunks first and the head last: a reader that sees the head
                    # (what lookups test) finds the rest already written.
                    for c in range(nc - 1, -1, -1):
                        piece = row[c * cb:(c + 1) * cb]
                        value = header + piece if c == 0 else piece
                        pipe.set(self._key(h, c), value, px=self.ttl_ms)
                res = pipe.execute(raise_on_error=False)
                for j in range(len(part)):
                    ok[start + j] = all(r is True for r in res[j * nc:(j + 1) * nc])
        except self._store_errors() as e:
            self._fail(e)
            self._counters.add(store_failures=len(hs))
            return np.zeros(len(hs), bool)
        self._avail.succeeded()
        stored = int(ok.sum())
        self._counters.add(stored=stored, store_failures=len(hs) - stored, bytes_stored=stored * self.block_bytes)
        return ok

    def stats(self) -> dict[str, Any]:
        d: dict[str, Any] = self._counters.snapshot()
        d.update(available=self._avail.ok() and not self._closed, last_error=self._avail.last_error,
                 block_bytes=self.block_bytes, kind="redis-cluster" if self.cluster else "redis")
        return d

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):  # closing a dead connection must not fail the caller
            self._client.close()


def _url_for_errors(url: str) -> str:
    """The URL for an error message, with any password replaced by ``***`` and cut short."""
    try:
        parts = urlsplit(url)
        if parts.password:
            host = parts.netloc.rsplit("@", 1)[-1]
            user = parts.username or ""
            url = urlunsplit((parts.scheme, f"{user}:***@{host}", parts.path, parts.query, parts.fragment))
    except ValueError:
        pass
    return repr(url if len(url) <= 200 else url[:200] + "...")
