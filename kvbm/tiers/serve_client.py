"""A remote tier on a ``kvbm serve`` store server (protocol: :mod:`kvbm.serve_protocol`).

The client keeps a small pool of TCP connections (one request in flight per connection, so
threads of one process — e.g. a prefetch pool — run requests in parallel). Records are sent
without a joining copy (``sendmsg`` of the header and the caller's row) and received straight
into the caller's output rows, then verified (namespace, hash, length, CRC32C).

Data path. By default (``data_path="auto"``) the client moves records over the transfer engine
(UCX one-sided put/get into the server's registered arena, shared memory on one host) when the
server offers it and UCX is installed here, and over the TCP stream otherwise
(``data_path="tcp"`` forces TCP; ``"ucx"`` requires UCX and raises if either side lacks it).
Each pooled connection has its own UCX endpoint and registered staging buffer; records are
staged there (one copy on each side of the wire).

A server that is down or restarting degrades the tier to misses, like :class:`RedisTier`; a
server that *refuses* us (wrong token, block size it cannot hold), is full, or does not speak
the protocol raises :class:`~kvbm.errors.PeerError` when the tier is created, saying which.

Design note — the store is not trusted.
    Every reply field is checked before it is used: frame op and status, body lengths against
    what the request implies, flag values, counts (a LOOKUP cannot report more hits than asked),
    HELLO's version, ``max_batch`` and ``put_window`` ranges, reason and STATS sizes. Anything
    malformed raises :class:`MalformedReply` (a :class:`~kvbm.errors.PeerError`) inside the
    tier, the connection is dropped, and the request degrades to misses counted in
    ``stats()["errors"]`` and ``stats()["protocol_errors"]``, like a store that went away;
    records themselves are verified (namespace, hash, length, CRC32C) as for every remote tier.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from kvbm.errors import ConfigError, KvbmError, PeerError
from kvbm.serve_protocol import (
    FEATURE_UCX,
    FRAME,
    HELLO_OK,
    MAX_REASON,
    MAX_STATS,
    MAX_TENANT,
    MAX_TOKEN,
    OP_GET,
    OP_GET_DONE,
    OP_GET_PIN,
    OP_HELLO,
    OP_LOOKUP,
    OP_PUT,
    OP_PUT_COMMIT,
    OP_PUT_PREP,
    OP_STATS,
    OP_UCX_META,
    PROTOCOL_VERSION,
    PUT_CHAIN,
    PUT_HEAD,
    ST_AUTH,
    ST_BUSY,
    ST_OK,
    U32,
    hello_body,
    recv_exact,
    recv_exact_into,
    sendmsg_all,
)
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

log = logging.getLogger("kvbm.serve_client")


class _Refused(PeerError):
    """The server answered HELLO with a refusal."""


class ServerFullError(_Refused):
    """The server has no free client connection (its ``max_clients``) for us; try again later."""


class MalformedReply(PeerError):
    """A reply that breaks the protocol (wrong sizes, values out of range, unknown status)."""


def _need(cond: bool, what: str) -> None:
    if not cond:
        raise MalformedReply(f"malformed reply from kvbm serve: {what}")


class ServeClientTier(RemoteTier):
    """Blocks on a ``kvbm serve`` server, bound to one namespace.

    Args:
        url: ``kvbm://host:port``, or ``kvbm://host:port/NAME`` to use the tenant namespace NAME
            of the credential (else its first, default namespace; see :mod:`kvbm.serve_tenants`).
        block_bytes: bytes per block (the server must accept it: at most its ``max_block_bytes``).
        namespace: a :class:`kvbm.Namespace`, its 16-byte digest, or a tenant name.
        token: the credential (a token of the server's token file, or its shared secret).
        timeout_s: connect timeout and per-request socket timeout.
        connections: most pooled connections (parallel requests from threads).
        retry_interval_s: after a connection failure, report misses for this long, then retry.
        data_path: ``"auto"``, ``"tcp"`` or ``"ucx"`` (see the module docstring).
        ucx_transports: UCX transports for the ucx data path (default ``"sm,tcp"``).
        ucx_staging_bytes: most bytes of records per ucx batch (staging buffer per connection).

    Raises:
        ConfigError: malformed URL or arguments.
        PeerError: the server refused the HELLO (wrong token or namespace, unsupported block
            size/protocol), is full (:class:`ServerFullError`), or its reply is malformed.
            An unreachable server does not raise: the tier starts degraded and retries.
    """

    accepts_token = True

    def __init__(
        self,
        url: str,
        *,
        block_bytes: int,
        namespace: Any,
        token: str | None = None,
        timeout_s: float = 5.0,
        connections: int = 4,
        retry_interval_s: float = 1.0,
        data_path: str = "auto",
        ucx_transports: str = "sm,tcp",
        ucx_staging_bytes: int = 64 << 20,
    ) -> None:
        try:
            parts = urlsplit(url)
            port = parts.port
        except (ValueError, TypeError, AttributeError):
            raise ConfigError(f"remote_url: expected kvbm://host:port[/namespace], got {url!r}") from None
        tenant = parts.path.strip("/") if parts.path else ""
        if (parts.scheme != "kvbm" or not parts.hostname or port is None or parts.query or parts.fragment
                or "/" in tenant or any(c.isspace() for c in tenant) or len(tenant.encode()) > MAX_TENANT):
            raise ConfigError(f"remote_url: expected kvbm://host:port[/namespace], got {url!r}")
        self.tenant = tenant
        if isinstance(block_bytes, bool) or not isinstance(block_bytes, int) or block_bytes <= 0:
            raise ConfigError(f"block_bytes: must be a positive int, got {block_bytes!r}")
        if not isinstance(timeout_s, (int, float)) or not 0 < timeout_s <= 3600:
            raise ConfigError(f"remote_timeout_s: must be > 0, got {timeout_s!r}")
        if not isinstance(connections, int) or not 1 <= connections <= 256:
            raise ConfigError(f"connections: must be 1..256, got {connections!r}")
        if data_path not in ("auto", "tcp", "ucx"):
            raise ConfigError(f"data_path: must be 'auto', 'tcp' or 'ucx', got {data_path!r}")
        self.data_path = data_path
        self._ucx_transports = ucx_transports
        self._ucx_staging_bytes = int(ucx_staging_bytes)
        self._engine: Any = None
        self._ucx: dict[socket.socket, _UcxConn] = {}
        self.ucx_offered = False
        if data_path == "ucx":
            from kvbm.transfer import ucx_available

            ok, why = ucx_available()
            if not ok:
                from kvbm.errors import UnsupportedError

                raise UnsupportedError(f"data_path='ucx': {why}")
        tok = (token or "").encode()
        if len(tok) > MAX_TOKEN:
            raise ConfigError(f"remote_token: longer than {MAX_TOKEN} bytes")
        self.url = url
        self.address = (parts.hostname, port)
        self.block_bytes = int(block_bytes)
        self.record_bytes = self.block_bytes + HEADER_SIZE
        self.namespace = namespace_digest(namespace)
        self.timeout_s = float(timeout_s)
        self.max_batch = 1
        self.put_window = 1
        self._token = tok
        self._idle: list[socket.socket] = []
        self._open = 0
        self._max_conns = connections
        self._cv = threading.Condition()
        self._counters = Counters()
        self._avail = Availability(retry_interval_s)
        self._closed = False
        try:
            with self._conn() as _:
                pass
        except PeerError:  # refused, full or not a kvbm server: say so now
            raise
        except (OSError, ConnectionError) as e:
            self._avail.failed(e)
            self._counters.add(errors=1)
            log.warning("kvbm serve at %s is not reachable (%s); the tier reports misses until it is", url, e)

    # ---- connections --------------------------------------------------------------------------
    def _connect(self) -> socket.socket:
        s = socket.create_connection(self.address, timeout=self.timeout_s)
        try:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            body = hello_body(self._token, self.block_bytes, self.namespace, self.tenant.encode())
            sendmsg_all(s, [FRAME.pack(OP_HELLO, 0, 0, len(body)), body])
            op, st, _r, blen = FRAME.unpack(recv_exact(s, FRAME.size))
            _need(op == OP_HELLO, f"HELLO answered with op {op}")
            if st != ST_OK:
                _need(blen <= MAX_REASON, f"refusal reason of {blen} bytes")
                reason = recv_exact(s, blen).decode("utf-8", "replace")
                if st == ST_BUSY:
                    raise ServerFullError(f"kvbm serve at {self.url} is full, try again later or raise its "
                                          f"--max-clients: {reason}")
                if st == ST_AUTH:
                    raise _Refused(f"kvbm serve at {self.url} refused the connection: {reason or 'token refused'}")
                raise _Refused(f"kvbm serve at {self.url} refused the connection: {reason}")
            _need(blen == HELLO_OK.size, f"HELLO_OK of {blen} bytes (expected {HELLO_OK.size}; not a kvbm serve "
                  f"server of protocol version {PROTOCOL_VERSION}?)")
            ver, max_batch, max_bb, features, put_window = HELLO_OK.unpack(recv_exact(s, blen))
            _need(ver == PROTOCOL_VERSION, f"protocol version {ver}")
            _need(1 <= max_batch <= 1 << 16, f"max_batch {max_batch}")
            _need(1 <= put_window <= max_batch, f"put_window {put_window} (max_batch {max_batch})")
            _need(self.block_bytes <= max_bb, f"max_block_bytes {max_bb} below our accepted {self.block_bytes}")
            self.max_batch = int(max_batch)
            self.put_window = int(put_window)
            self.ucx_offered = bool(features & FEATURE_UCX)
            if self._want_ucx():
                try:
                    self._ucx[s] = self._ucx_attach(s)
                except KvbmError as e:  # UCX failed here: TCP for this connection, or a failure
                    if self.data_path == "ucx":
                        raise ConnectionError(f"ucx data path to {self.url}: {e}") from None
                    log.warning("kvbm serve at %s: ucx data path unavailable (%s); using TCP", self.url, e)
            return s
        except BaseException:
            s.close()
            raise

    @contextlib.contextmanager
    def _conn(self) -> Iterator[socket.socket]:
        """A pooled connection; it is discarded (not returned) when the request failed."""
        with self._cv:
            if not self._cv.wait_for(lambda: self._idle or self._open < self._max_conns, self.timeout_s):
                raise TimeoutError(f"no free connection to {self.url} within {self.timeout_s} s")
            s = self._idle.pop() if self._idle else None
            self._open += 1 if s is None else 0
        if s is not None and not self._alive(s):
            self._drop(s)  # the server closed it while idle (idle timeout, restart): reconnect
            s = None
        try:
            if s is None:
                s = self._connect()
        except BaseException:
            with self._cv:
                self._open -= 1
                self._cv.notify()
            raise
        ok = False
        try:
            yield s
            ok = True
        finally:
            with self._cv:
                if ok and not self._closed:
                    self._idle.append(s)
                else:
                    self._drop(s)
                    self._open -= 1
                self._cv.notify()

    def _alive(self, s: socket.socket) -> bool:
        """Whether an idle pooled connection is still open (nothing to read, no FIN/RST)."""
        try:
            s.setblocking(False)
            s.recv(1, socket.MSG_PEEK)
            return False  # end of stream, or bytes nobody asked for: not usable
        except BlockingIOError:
            return True
        except OSError:
            return False
        finally:
            with contextlib.suppress(OSError):
                s.settimeout(self.timeout_s)

    # ---- the transfer-engine data path --------------------------------------------------------
    def _want_ucx(self) -> bool:
        if self.data_path == "tcp":
            return False
        if not self.ucx_offered:
            if self.data_path == "ucx":
                raise _Refused(f"kvbm serve at {self.url} does not offer the ucx data path (data_path='ucx')")
            return False
        if self.data_path == "auto":
            from kvbm.transfer import ucx_available

            return ucx_available()[0]
        return True

    @property
    def using_ucx(self) -> bool:
        """Whether requests currently move records over the transfer engine."""
        return self._engine is not None and self.ucx_offered and self.data_path != "tcp"

    def _ucx_attach(self, s: socket.socket) -> _UcxConn:
        import os

        from kvbm.transfer import TransferEngine

        with self._cv:
            if self._engine is None:
                self._engine = TransferEngine(
                    f"kvbm-client-{os.getpid()}-{id(self):x}", transports=self._ucx_transports, net_devices="lo",
                    error_handling="sm" not in self._ucx_transports.split(","))
        sendmsg_all(s, [FRAME.pack(OP_UCX_META, 0, 0, 0)])
        blen = self._reply(s, OP_UCX_META)
        _need(blen <= MAX_STATS, f"UCX_META of {blen} bytes")
        peer = self._engine.add_peer(recv_exact(s, blen))
        rows = max(1, min(self.put_window, self._ucx_staging_bytes // self.record_bytes))
        staging = np.zeros((rows, self.record_bytes), np.uint8)
        region = self._engine.register(staging)
        return _UcxConn(peer, staging, region)

    def _drop(self, s: socket.socket) -> None:
        u = self._ucx.pop(s, None)
        s.close()  # the server drops this connection's open batch
        if u is not None:
            u.close(self._engine)

    def _batch(self, s: socket.socket) -> int:
        u = self._ucx.get(s)
        return self.max_batch if u is None else len(u.staging)

    def _ucx_put(self, s: socket.socket, u: _UcxConn, part: list[bytes], rows: np.ndarray, chain: bool) -> np.ndarray:
        n = len(part)
        sendmsg_all(s, [FRAME.pack(OP_PUT_PREP, 0, 0, PUT_HEAD.size + 16 * n),
                        PUT_HEAD.pack(n, PUT_CHAIN if chain else 0), *part])
        _need(self._reply(s, OP_PUT_PREP) == 9 * n, f"PUT_PREP reply size for {n} blocks")
        body = recv_exact(s, 9 * n)
        state = np.frombuffer(body, np.uint8, n)
        _need(bool((state <= 2).all()), "PUT_PREP state outside 0..2")
        addrs = np.frombuffer(body, np.uint64, n, offset=n) if n else np.zeros(0, np.uint64)
        sel = np.flatnonzero(state == 2)
        for j in sel:
            u.staging[j, :HEADER_SIZE] = np.frombuffer(encode_header(self.namespace, part[j], rows[j]), np.uint8)
            u.staging[j, HEADER_SIZE:] = rows[j]
        if len(sel):
            local = np.uint64(u.region.addr) + sel.astype(np.uint64) * np.uint64(self.record_bytes)
            u.peer.put(local, addrs[sel], self.record_bytes).wait(self.timeout_s)
        sendmsg_all(s, [FRAME.pack(OP_PUT_COMMIT, 0, 0, 0)])
        _need(self._reply(s, OP_PUT_COMMIT) == n, f"PUT_COMMIT reply size for {n} blocks")
        return self._flags(recv_exact(s, n), "PUT_COMMIT") & (state > 0)

    def _ucx_get(self, s: socket.socket, u: _UcxConn, part: list[bytes], rows: np.ndarray,
                 ok: np.ndarray) -> int:
        n = len(part)
        sendmsg_all(s, [FRAME.pack(OP_GET_PIN, 0, 0, 4 + 16 * n), U32.pack(n), *part])
        _need(self._reply(s, OP_GET_PIN) == 9 * n, f"GET_PIN reply size for {n} blocks")
        body = recv_exact(s, 9 * n)
        present = np.frombuffer(body, np.uint8, n)
        _need(bool((present <= 1).all()), "GET_PIN present flag outside 0..1")
        addrs = np.frombuffer(body, np.uint64, n, offset=n) if n else np.zeros(0, np.uint64)
        sel = np.flatnonzero(present)
        try:
            if len(sel):
                local = np.uint64(u.region.addr) + sel.astype(np.uint64) * np.uint64(self.record_bytes)
                u.peer.get(local, addrs[sel], self.record_bytes).wait(self.timeout_s)
        finally:
            sendmsg_all(s, [FRAME.pack(OP_GET_DONE, 0, 0, 0)])
        bad = 0
        for j in sel:
            rec = u.staging[j]
            if check_record(rec[:HEADER_SIZE], rec[HEADER_SIZE:], self.namespace, part[j]) is None:
                rows[j] = rec[HEADER_SIZE:]
                ok[j] = True
            else:
                bad += 1
        return bad

    def _reply(self, s: socket.socket, op: int) -> int:
        """Read a reply frame to ``op``: its body length (an error reply raises, reason read)."""
        rop, st, _r, blen = FRAME.unpack(recv_exact(s, FRAME.size))
        _need(rop == op, f"op {rop} in reply to op {op}")
        if st != ST_OK:
            _need(blen <= MAX_REASON, f"error reason of {blen} bytes")
            msg = recv_exact(s, blen).decode("utf-8", "replace")
            raise ConnectionError(f"kvbm serve answered op {rop} status {st}: {msg}")
        return blen

    @staticmethod
    def _flags(body: bytes, what: str) -> np.ndarray:
        """A reply's per-block 0/1 flags as bools; MalformedReply for any other value."""
        f = np.frombuffer(body, np.uint8)
        _need(bool((f <= 1).all()), f"{what} flag outside 0..1")
        return f == 1

    def _usable(self, n: int, miss_key: str) -> bool:
        if self._closed or not self._avail.ok():
            self._counters.add(skipped_unavailable=1, **{miss_key: n})
            return False
        return True

    def _fail(self, e: BaseException) -> None:
        self._avail.failed(e)
        self._counters.add(errors=1, protocol_errors=int(isinstance(e, MalformedReply)))
        if isinstance(e, PeerError):
            log.warning("kvbm serve at %s: %s", self.url, e)

    # ---- RemoteTier ---------------------------------------------------------------------------
    def lookup_prefix(self, hashes: HashesLike) -> int:
        hs = normalize_hashes(hashes)
        self._counters.add(lookups=1, lookup_blocks=len(hs))
        if not hs or not self._usable(len(hs), "misses"):
            return 0
        total = 0
        try:
            with self._conn() as s:
                for start in range(0, len(hs), self.max_batch):
                    part = hs[start:start + self.max_batch]
                    sendmsg_all(s, [FRAME.pack(OP_LOOKUP, 0, 0, 4 + 16 * len(part)), U32.pack(len(part)), *part])
                    _need(self._reply(s, OP_LOOKUP) == 4, "LOOKUP reply size")
                    (k,) = U32.unpack(recv_exact(s, 4))
                    _need(k <= len(part), f"LOOKUP of {len(part)} blocks answered {k} hits")
                    total += k
                    if k < len(part):
                        break
        except (OSError, ConnectionError, KvbmError) as e:
            self._fail(e)
            self._counters.add(misses=len(hs))
            return 0
        self._avail.succeeded()
        self._counters.add(hits=total, misses=len(hs) - total)
        return total

    def put(self, hashes: HashesLike, data: Any, *, chain: bool = True) -> np.ndarray:
        """Store blocks; ``chain`` says hash i's parent is hash i-1 (the server's eviction uses it)."""
        hs = normalize_hashes(hashes)
        rows = as_block_rows(data, len(hs), self.block_bytes, "data", writable=False)
        ok = np.zeros(len(hs), bool)
        self._counters.add(puts=1, put_blocks=len(hs))
        if not hs or not self._usable(len(hs), "store_failures"):
            return ok
        try:
            with self._conn() as s:
                u = self._ucx.get(s)
                step = self._batch(s)
                for start in range(0, len(hs), step):
                    part = hs[start:start + step]
                    n = len(part)
                    if u is not None:
                        ok[start:start + n] = self._ucx_put(s, u, part, rows[start:start + n], chain)
                        continue
                    bufs: list[Any] = [
                        FRAME.pack(OP_PUT, 0, 0, PUT_HEAD.size + n * (16 + self.record_bytes)),
                        PUT_HEAD.pack(n, PUT_CHAIN if chain else 0), *part,
                    ]
                    for j in range(n):
                        row = rows[start + j]
                        bufs += [encode_header(self.namespace, part[j], row), row]
                    sendmsg_all(s, bufs)
                    _need(self._reply(s, OP_PUT) == n, f"PUT reply size for {n} blocks")
                    ok[start:start + n] = self._flags(recv_exact(s, n), "PUT")
        except (OSError, ConnectionError, KvbmError) as e:
            self._fail(e)
            self._counters.add(store_failures=len(hs))
            return np.zeros(len(hs), bool)
        self._avail.succeeded()
        k = int(ok.sum())
        self._counters.add(stored=k, store_failures=len(hs) - k, bytes_stored=k * self.block_bytes)
        return ok

    def get(self, hashes: HashesLike, out: Any) -> np.ndarray:
        hs = normalize_hashes(hashes)
        rows = as_block_rows(out, len(hs), self.block_bytes, "out", writable=True)
        ok = np.zeros(len(hs), bool)
        self._counters.add(gets=1, get_blocks=len(hs))
        if not hs or not self._usable(len(hs), "get_misses"):
            return ok
        bad = 0
        header = bytearray(HEADER_SIZE)
        hv = memoryview(header)
        try:
            with self._conn() as s:
                u = self._ucx.get(s)
                step = self._batch(s)
                for start in range(0, len(hs), step):
                    part = hs[start:start + step]
                    n = len(part)
                    if u is not None:
                        bad += self._ucx_get(s, u, part, rows[start:start + n], ok[start:start + n])
                        continue
                    sendmsg_all(s, [FRAME.pack(OP_GET, 0, 0, 4 + 16 * n), U32.pack(n), *part])
                    blen = self._reply(s, OP_GET)
                    _need(blen >= n, f"GET reply of {blen} bytes for {n} blocks")
                    present = self._flags(recv_exact(s, n), "GET present")
                    _need(blen == n + int(present.sum()) * self.record_bytes, "GET reply size")
                    for j in np.flatnonzero(present):
                        i = start + int(j)
                        row = memoryview(rows[i])
                        recv_exact_into(s, hv)
                        recv_exact_into(s, row)
                        if check_record(hv, row, self.namespace, hs[i]) is None:
                            ok[i] = True
                        else:
                            bad += 1
        except (OSError, ConnectionError, KvbmError) as e:
            self._fail(e)
            self._counters.add(get_misses=len(hs))
            return np.zeros(len(hs), bool)
        self._avail.succeeded()
        k = int(ok.sum())
        self._counters.add(get_hits=k, get_misses=len(hs) - k, checksum_failures=bad,
                           bytes_loaded=k * self.block_bytes)
        return ok

    def server_stats(self) -> dict[str, Any]:
        """The server's own counters (raises PeerError when it cannot be reached)."""
        import json

        try:
            with self._conn() as s:
                sendmsg_all(s, [FRAME.pack(OP_STATS, 0, 0, 0)])
                blen = self._reply(s, OP_STATS)
                _need(blen <= MAX_STATS, f"STATS of {blen} bytes")
                body = recv_exact(s, blen)
        except PeerError:
            raise
        except (OSError, ConnectionError) as e:
            raise PeerError(f"kvbm serve at {self.url}: {e}") from None
        try:
            d = json.loads(body)
        except (ValueError, RecursionError):
            d = None
        if not isinstance(d, dict):
            raise MalformedReply(f"malformed reply from kvbm serve at {self.url}: STATS is not a JSON object")
        return d

    def stats(self) -> dict[str, Any]:
        d: dict[str, Any] = self._counters.snapshot()
        d.update(available=self._avail.ok() and not self._closed, last_error=self._avail.last_error,
                 block_bytes=self.block_bytes, kind="kvbm-serve")
        return d

    def close(self) -> None:
        with self._cv:
            if self._closed:
                return
            self._closed = True
            idle, self._idle = self._idle, []
            self._open -= len(idle)
            self._cv.notify_all()
        for s in idle:
            self._drop(s)
        if self._engine is not None:
            self._engine.close()
            self._engine = None


class _UcxConn:
    """A pooled connection's transfer-engine state: its endpoint and registered staging rows."""

    __slots__ = ("peer", "region", "staging")

    def __init__(self, peer: Any, staging: np.ndarray, region: Any) -> None:
        self.peer = peer
        self.staging = staging
        self.region = region

    def close(self, engine: Any) -> None:
        with contextlib.suppress(Exception):  # a dead peer or a closed engine: nothing left to release
            self.peer.close(force=True, timeout=0.5)
        if engine is not None:
            with contextlib.suppress(Exception):
                engine.deregister(self.region)
