"""``kvbm serve``: a store server that keeps KV blocks for many engine instances.

The server holds blocks in its own host tier (a :class:`kvbm.BlockManager`: block index,
eviction policy, host arena) and answers LOOKUP, PUT and GET requests from clients
(:class:`kvbm.tiers.serve_client.ServeClientTier`) over TCP. It binds to 127.0.0.1 unless told
otherwise; an optional shared-secret token is checked at HELLO; every connection names a
namespace, and blocks of different namespaces never meet (the index key of a block is
``BLAKE2b-128(namespace || block hash)``).

Design note — control plane and data path.
    Every request and reply is a frame: ``op u8, status u8, reserved u16, body_len u32`` (little
    endian, 8 bytes) and a body. The control fields (counts, hashes, flags) always travel in
    the body; the *data path* is where record bytes go. Here they travel in the same TCP
    stream, straight between the socket and the server's arena slots (``recv_into`` a reserved
    slot, ``sendmsg`` from pinned slots, so the server copies nothing in user space). A slot
    holds the whole record (56-byte header, then the payload), so what a client wrote is
    exactly what a later GET sends back, and the client verifies it end to end. A one-sided
    transfer-engine path (server registers its arena, client gets its remote key and
    puts/gets into slot addresses) replaces only those record loops: with ``data_path="ucx"``
    the server registers its whole arena with a :class:`kvbm.transfer.TransferEngine` and
    offers it at HELLO; a client that takes it asks for the slot addresses of a batch
    (PUT_PREP / GET_PIN), moves the records with one batched one-sided put or get, and closes
    the batch (PUT_COMMIT: verify and publish; GET_DONE: unpin). Reserved and pinned slots
    belong to the connection: if it drops, its reservations are dropped and its pins released.
    The TCP control connection is also how a dead client is noticed, so UCX may run with
    endpoint error handling off (what shared memory between processes needs).
    Limit: a remote key covers the whole registered arena, so the ucx path trusts every
    authenticated client with every slot (namespaces then separate cooperating tenants only);
    per-slot keys or a server-side copy would be needed against hostile tenants.

Protocol (version 1). ``n`` is at most the ``max_batch`` the server announced.

    HELLO   -> b"KVBS" u16 version, u16 token_len, u64 block_bytes, 16s namespace, token
            <- OK: u16 version, u32 max_batch, u64 max_block_bytes | ERR: UTF-8 reason, closed
    LOOKUP  -> u32 n, n*16 hashes                   <- u32 leading blocks present
    PUT     -> u32 n, u32 flags (1 = chain), n*16 hashes, n records
            <- n bytes: 1 stored (or already there), 0 not stored
    GET     -> u32 n, n*16 hashes                   <- n bytes present flags, then the present records
    STATS   -> (empty)                              <- UTF-8 JSON
    UCX_META -> (empty)                             <- the server's transfer-engine metadata
    PUT_PREP -> u32 n, u32 flags, n*16 hashes       <- n bytes (0 refused, 1 present, 2 write), n*u64 slot addresses
    PUT_COMMIT -> (empty)                           <- n bytes: 1 stored (or already there), 0 not
    GET_PIN -> u32 n, n*16 hashes                   <- n bytes present flags, n*u64 addresses (0 if absent)
    GET_DONE -> (empty)                             (no reply: unpins the last GET_PIN)

HELLO_OK's ``features`` bit 0 says the UCX ops are offered.

A record is ``56 + block_bytes`` bytes (header as in :mod:`kvbm.tiers.remote`). The server checks
each PUT record's header and CRC32C before publishing it; a bad one is answered 0 and never
becomes visible. A malformed frame gets an ERR reply and the connection is closed.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import socket
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvbm.config import KvbmConfig
from kvbm.errors import CapacityError, ConfigError, KvbmError
from kvbm.tiers.remote import HASH_SIZE, HEADER_SIZE, check_record

log = logging.getLogger("kvbm.serve")

PROTOCOL_VERSION = 1
HELLO_MAGIC = b"KVBS"
FRAME = struct.Struct("<BBHI")
HELLO = struct.Struct("<4sHHQ16s")
HELLO_OK = struct.Struct("<HIQI")
U32 = struct.Struct("<I")
PUT_HEAD = struct.Struct("<II")

OP_HELLO, OP_LOOKUP, OP_PUT, OP_GET, OP_STATS = 1, 2, 3, 4, 5
OP_UCX_META, OP_PUT_PREP, OP_PUT_COMMIT, OP_GET_PIN, OP_GET_DONE = 6, 7, 8, 9, 10
FEATURE_UCX = 1
ST_OK, ST_ERR, ST_AUTH, ST_BUSY = 0, 1, 2, 3
PUT_CHAIN = 1
MAX_TOKEN = 4096
_IOV_MAX = 512


def recv_exact_into(sock: socket.socket, buf: memoryview) -> None:
    """Fill ``buf`` from ``sock``; raises ConnectionError when the peer closes first."""
    got, n = 0, buf.nbytes
    while got < n:
        k = sock.recv_into(buf[got:])
        if k == 0:
            raise ConnectionError("peer closed the connection")
        got += k


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    recv_exact_into(sock, memoryview(buf))
    return bytes(buf)


def sendmsg_all(sock: socket.socket, bufs: Sequence[Any]) -> None:
    """Send every buffer in order (scatter-gather, no joining copy), handling partial sends."""
    views = [memoryview(b).cast("B") for b in bufs]
    views = [v for v in views if v.nbytes]
    i = 0
    while i < len(views):
        sent = sock.sendmsg(views[i:i + _IOV_MAX])
        while sent and i < len(views):
            if sent >= views[i].nbytes:
                sent -= views[i].nbytes
                i += 1
            else:
                views[i] = views[i][sent:]
                sent = 0


def send_frame(sock: socket.socket, op: int, status: int, *body: Any) -> None:
    n = sum(memoryview(b).nbytes for b in body)
    sendmsg_all(sock, [FRAME.pack(op, status, 0, n), *body])


@dataclass
class ServeConfig:
    """Settings of a store server (what ``kvbm serve`` takes on its command line).

    Attributes:
        host: address to bind; 127.0.0.1 by default. Anything else needs ``token``.
        port: TCP port (0 = any free port; see :attr:`StoreServer.address`).
        capacity_bytes: bytes of host memory for blocks (records, headers included).
        max_block_bytes: the largest block a client may declare at HELLO.
        token: shared secret clients must present (None: no check; loopback only).
        eviction_policy: the host tier's policy (``kvbm.eviction_policies()``).
        max_batch: most blocks per request.
        max_clients: most connections at once; more are refused with BUSY.
        idle_timeout_s: a connection silent this long is closed.
        pinned: pin the arena (None: when a GPU is present).
        data_path: ``"tcp"`` (records in the TCP stream only) or ``"ucx"`` (also offer the
            transfer-engine data path; needs UCX, else UnsupportedError at start). Clients
            that do not take it keep using TCP.
        ucx_transports: UCX transports for the ucx data path (``"sm,tcp"``: shared memory
            between processes of one host, with endpoint error handling off).
        ucx_net_devices: UCX network devices (``"lo"``: loopback only).
    """

    host: str = "127.0.0.1"
    port: int = 0
    capacity_bytes: int = 1 << 30
    max_block_bytes: int = 4 << 20
    token: str | None = None
    eviction_policy: str = "lru"
    max_batch: int = 1024
    max_clients: int = 64
    idle_timeout_s: float = 300.0
    pinned: bool | None = False
    data_path: str = "tcp"
    ucx_transports: str = "sm,tcp"
    ucx_net_devices: str = "lo"

    def validate(self) -> None:
        """Raise ConfigError naming the first bad field."""
        if self.max_block_bytes <= 0:
            raise ConfigError(f"max_block_bytes: must be positive, got {self.max_block_bytes}")
        if self.capacity_bytes < self.max_block_bytes + HEADER_SIZE:
            raise ConfigError(
                f"capacity_bytes: {self.capacity_bytes} bytes hold no record of {self.max_block_bytes + HEADER_SIZE}"
            )
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port: must be 0..65535, got {self.port}")
        if not 1 <= self.max_batch <= 1 << 16:
            raise ConfigError(f"max_batch: must be 1..65536, got {self.max_batch}")
        if not 1 <= self.max_clients <= 4096:
            raise ConfigError(f"max_clients: must be 1..4096, got {self.max_clients}")
        if self.idle_timeout_s <= 0:
            raise ConfigError(f"idle_timeout_s: must be > 0, got {self.idle_timeout_s}")
        if self.token is not None and not 0 < len(self.token.encode()) <= MAX_TOKEN:
            raise ConfigError(f"token: must be 1..{MAX_TOKEN} bytes")
        if self.data_path not in ("tcp", "ucx"):
            raise ConfigError(f"data_path: must be 'tcp' or 'ucx', got {self.data_path!r}")
        if self.host not in ("127.0.0.1", "localhost", "::1") and not self.token:
            raise ConfigError(f"host: binding {self.host!r} (not loopback) requires a token")


class _ProtocolError(Exception):
    """A malformed request: answered with ERR, then the connection is closed."""


class StoreServer:
    """A running store server. Use as a context manager, or :meth:`start` / :meth:`close`.

    Raises:
        ConfigError: bad settings. OSError: the address cannot be bound.
    """

    def __init__(self, config: ServeConfig | None = None) -> None:
        self.config = config or ServeConfig()
        self.config.validate()
        from kvbm.manager import BlockManager

        self.slot_bytes = self.config.max_block_bytes + HEADER_SIZE
        kc = KvbmConfig(
            block_bytes=self.slot_bytes,
            host_capacity_bytes=self.config.capacity_bytes,
            eviction_policy=self.config.eviction_policy,
            host_pinned=self.config.pinned,
            index_initial_capacity=min(1 << 20, max(1024, self.config.capacity_bytes // self.slot_bytes)),
        )
        self._mgr = BlockManager(kc)
        self._arena = self._mgr.host_arena
        self._lock = threading.Lock()  # makes multi-step index updates atomic; bytes move outside it
        self._stats_lock = threading.Lock()
        self._stats = dict.fromkeys(
            ("connections", "refused_auth", "refused_busy", "protocol_errors", "lookups", "puts", "gets",
             "blocks_stored", "blocks_rejected", "blocks_served", "block_misses", "bytes_in", "bytes_out"), 0)
        self._sock: socket.socket | None = None
        self._threads: set[threading.Thread] = set()
        self._conns: set[socket.socket] = set()
        self._closing = threading.Event()
        self._stop = threading.Event()
        self._accept_thread: threading.Thread | None = None
        self._token = self.config.token.encode() if self.config.token else None
        self._engine: Any = None
        self._ucx_md = b""
        # Persistence hook (kvbm.service): called with (keys, record views) of verified records
        # while their slots are still reserved, i.e. before they are published and acknowledged.
        self.on_records: Any = None

    # ---- lifecycle ----------------------------------------------------------------------------
    def start(self) -> StoreServer:
        """Bind and start accepting connections (in background threads).

        Raises UnsupportedError when ``data_path="ucx"`` and UCX is not available here.
        """
        if self.config.data_path == "ucx" and self._engine is None:
            from kvbm.transfer import TransferEngine

            c = self.config
            self._engine = TransferEngine("kvbm-serve", transports=c.ucx_transports, net_devices=c.ucx_net_devices,
                                          error_handling="sm" not in c.ucx_transports.split(","))
            self._engine.register(self._arena.address(0), self._arena.num_slots * self.slot_bytes)
            self._ucx_md = self._engine.metadata()
        fam = socket.AF_INET6 if ":" in self.config.host else socket.AF_INET
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((self.config.host, self.config.port))
        s.listen(128)
        s.settimeout(0.2)
        self._sock = s
        self._accept_thread = threading.Thread(target=self._accept_loop, name="kvbm-serve-accept", daemon=True)
        self._accept_thread.start()
        return self

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) actually bound."""
        assert self._sock is not None, "server not started"
        return self._sock.getsockname()[:2]

    @property
    def url(self) -> str:
        host, port = self.address
        return f"kvbm://{host}:{port}"

    def close(self, timeout: float = 5.0) -> None:
        """Stop accepting, close every connection, free the arena. Idempotent."""
        if self._closing.is_set():
            return
        self._closing.set()
        if self._accept_thread is not None:
            self._accept_thread.join(timeout)
        if self._sock is not None:
            self._sock.close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        for t in list(self._threads):
            t.join(timeout)
        if self._engine is not None:
            self._engine.close()
            self._engine = None
        self._mgr.close()

    def __enter__(self) -> StoreServer:
        return self if self._sock is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def serve_forever(self) -> None:
        """Block until :meth:`request_stop` or :meth:`close` is called (e.g. from a signal handler)."""
        while not (self._stop.wait(0.5) or self._closing.is_set()):
            pass

    def request_stop(self) -> None:
        """Make :meth:`serve_forever` return (safe in a signal handler); then call :meth:`close`."""
        self._stop.set()

    def restore(self, keys: Sequence[bytes], records: Sequence[Any]) -> int:
        """Put records (index key, whole record) back into the host tier before :meth:`start`,
        e.g. from a disk tier at restart; returns how many were stored (stops when full)."""
        n = 0
        for k, rec in zip(keys, records, strict=True):
            rec = memoryview(rec).cast("B")
            try:
                slot = int(self._mgr.prepare_store([k]).slots[0])
            except KvbmError:
                break
            if slot < 0:
                continue
            memoryview(self._arena.view(slot))[:rec.nbytes] = rec
            self._mgr.complete_store([k])
            n += 1
        return n

    def stats(self) -> dict[str, Any]:
        """Server counters plus the host tier's occupancy."""
        with self._stats_lock:
            d: dict[str, Any] = dict(self._stats)
        host = self._mgr.stats().get("host", {})
        d.update(
            capacity_blocks=host.get("capacity_blocks"), used_blocks=host.get("used_blocks"),
            evictions=host.get("evictions"), slot_bytes=self.slot_bytes, active_connections=len(self._conns),
        )
        return d

    def _count(self, **kw: int) -> None:
        with self._stats_lock:
            for k, v in kw.items():
                self._stats[k] += v

    # ---- connections --------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._closing.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._closing.is_set():
                    return
                time.sleep(0.05)
                continue
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                busy = len(self._conns) >= self.config.max_clients
                if not busy:
                    self._conns.add(conn)
            if busy:
                self._count(refused_busy=1)
                with contextlib.suppress(OSError):
                    conn.settimeout(1.0)
                    send_frame(conn, OP_HELLO, ST_BUSY, b"server busy: max_clients connections open")
                conn.close()
                continue
            t = threading.Thread(target=self._serve_conn, args=(conn,), name="kvbm-serve-conn", daemon=True)
            self._threads.add(t)
            t.start()

    def _serve_conn(self, conn: socket.socket) -> None:
        self._count(connections=1)
        sess: _Session | None = None
        try:
            conn.settimeout(self.config.idle_timeout_s)
            sess = self._hello(conn)
            if sess is None:
                return
            head = bytearray(FRAME.size)
            while not self._closing.is_set():
                recv_exact_into(conn, memoryview(head))
                op, _st, _r, blen = FRAME.unpack(head)
                try:
                    self._dispatch(conn, sess, op, blen)
                except _ProtocolError as e:
                    self._count(protocol_errors=1)
                    send_frame(conn, op, ST_ERR, str(e).encode())
                    return
        except (OSError, ConnectionError):
            pass  # the client went away (or close() shut us down); nothing is half-published
        except Exception:  # a bug: log it, drop only this connection
            log.exception("kvbm serve: connection failed")
        finally:
            if sess is not None:
                self._release(sess)
            with self._lock:
                self._conns.discard(conn)
            conn.close()
            self._threads.discard(threading.current_thread())

    def _hello(self, conn: socket.socket) -> _Session | None:
        op, _st, _r, blen = FRAME.unpack(recv_exact(conn, FRAME.size))
        if op != OP_HELLO or not HELLO.size <= blen <= HELLO.size + MAX_TOKEN:
            self._count(protocol_errors=1)
            send_frame(conn, OP_HELLO, ST_ERR, b"expected HELLO")
            return None
        body = recv_exact(conn, blen)
        magic, version, tlen, block_bytes, ns = HELLO.unpack_from(body)
        token = body[HELLO.size:]
        if magic != HELLO_MAGIC or version != PROTOCOL_VERSION or tlen != len(token):
            self._count(protocol_errors=1)
            send_frame(conn, OP_HELLO, ST_ERR, f"unsupported protocol (magic {magic!r}, version {version})".encode())
            return None
        if self._token is not None and not hmac.compare_digest(token, self._token):
            self._count(refused_auth=1)
            send_frame(conn, OP_HELLO, ST_AUTH, b"token refused")
            return None
        if not 0 < block_bytes <= self.config.max_block_bytes:
            send_frame(conn, OP_HELLO, ST_ERR,
                       f"block_bytes {block_bytes} is outside 1..{self.config.max_block_bytes} (server's max)".encode())
            return None
        features = FEATURE_UCX if self._engine is not None else 0
        send_frame(conn, OP_HELLO, ST_OK,
                   HELLO_OK.pack(PROTOCOL_VERSION, self.config.max_batch, self.config.max_block_bytes, features))
        return _Session(ns, int(block_bytes))

    # ---- requests -----------------------------------------------------------------------------
    def _read_hashes(self, conn: socket.socket, sess: _Session, blen: int, per_block: int,
                     head: struct.Struct) -> tuple[tuple[int, ...], list[bytes], list[bytes]]:
        if blen < head.size:
            raise _ProtocolError(f"body of {blen} bytes is shorter than its {head.size}-byte head")
        fields = head.unpack(recv_exact(conn, head.size))
        n = fields[0]
        if n > self.config.max_batch:
            raise _ProtocolError(f"batch of {n} blocks exceeds max_batch {self.config.max_batch}")
        if blen != head.size + n * (HASH_SIZE + per_block):
            raise _ProtocolError(f"body length {blen} does not match {n} blocks")
        raw = recv_exact(conn, n * HASH_SIZE)
        hs = [raw[i * HASH_SIZE:(i + 1) * HASH_SIZE] for i in range(n)]
        keys = [sess.key(h) for h in hs]
        return fields, hs, keys

    def _dispatch(self, conn: socket.socket, sess: _Session, op: int, blen: int) -> None:
        if op == OP_LOOKUP:
            _f, _hs, keys = self._read_hashes(conn, sess, blen, 0, U32)
            n = self._mgr.lookup(keys).num_hits if keys else 0
            self._count(lookups=1)
            send_frame(conn, op, ST_OK, U32.pack(n))
        elif op == OP_PUT:
            (_n, flags), hs, keys = self._read_hashes(conn, sess, blen, sess.record_bytes, PUT_HEAD)
            ok = self._put(conn, sess, hs, keys, bool(flags & PUT_CHAIN))
            self._count(puts=1, blocks_stored=int(ok.sum()), blocks_rejected=int(len(ok) - ok.sum()),
                        bytes_in=len(hs) * sess.record_bytes)
            send_frame(conn, op, ST_OK, ok.astype(np.uint8))
        elif op == OP_GET:
            _f, hs, keys = self._read_hashes(conn, sess, blen, 0, U32)
            self._get(conn, sess, op, keys)
        elif op in (OP_UCX_META, OP_PUT_PREP, OP_PUT_COMMIT, OP_GET_PIN, OP_GET_DONE):
            self._dispatch_ucx(conn, sess, op, blen)
        elif op == OP_STATS:
            if blen:
                raise _ProtocolError("STATS takes no body")
            send_frame(conn, op, ST_OK, json.dumps(self.stats()).encode())
        else:
            raise _ProtocolError(f"unknown op {op}")

    def _prepare_store(self, keys: list[bytes], chain: bool) -> np.ndarray:
        """Reserve slots (-1: present already or could not be stored)."""
        slots = np.full(len(keys), -1, np.int64)
        with self._lock:
            if chain:
                try:
                    return self._mgr.prepare_store(keys).slots
                except (CapacityError, KvbmError):
                    pass  # e.g. everything pinned: store what fits, one by one
            for i, k in enumerate(keys):
                try:
                    slots[i] = self._mgr.prepare_store([k]).slots[0]
                except (CapacityError, KvbmError):
                    slots[i] = -2
        return slots

    def _put(self, conn: socket.socket, sess: _Session, hs: list[bytes], keys: list[bytes],
             chain: bool) -> np.ndarray:
        slots = self._prepare_store(keys, chain)
        rb = sess.record_bytes
        scratch = None
        good = np.zeros(len(keys), np.uint8)
        new = [i for i in range(len(keys)) if slots[i] >= 0]
        try:
            # data path (TCP): each record goes straight from the socket into its reserved slot
            for i in range(len(keys)):
                if slots[i] >= 0:
                    view = memoryview(self._arena.view(int(slots[i])))[:rb]
                    recv_exact_into(conn, view)
                    good[i] = check_record(view[:HEADER_SIZE], view[HEADER_SIZE:], sess.ns, hs[i]) is None
                else:
                    if scratch is None:
                        scratch = memoryview(bytearray(rb))
                    recv_exact_into(conn, scratch)
        finally:
            self._persist(keys, slots, good, new, rb)
            with self._lock:
                if new:
                    self._mgr.complete_store([keys[i] for i in new], good[new])
        # already present (-1) counts as stored; refused for capacity (-2) or bad record does not
        ok = (slots == -1) | (good.astype(bool) & (slots >= 0))
        return ok

    def _persist(self, keys: list[bytes], slots: np.ndarray, good: np.ndarray, new: list[int], rb: int) -> None:
        """Hand verified records, still reserved, to the ``on_records`` hook (before they publish)."""
        if self.on_records is not None and good.any():
            kept = [i for i in new if good[i]]
            self.on_records([keys[i] for i in kept], [memoryview(self._arena.view(int(slots[i])))[:rb] for i in kept])

    def _get(self, conn: socket.socket, sess: _Session, op: int, keys: list[bytes]) -> None:
        present, pinned, slots = self._pin(keys)
        try:
            rb = sess.record_bytes
            # data path (TCP): records go from the pinned slots to the socket, no copy
            bufs: list[Any] = [present]
            bufs += [memoryview(self._arena.view(s))[:rb] for s in slots]
            send_frame(conn, op, ST_OK, *bufs)
        finally:
            if pinned:
                with self._lock:
                    self._mgr.complete_load(pinned)
        self._count(gets=1, blocks_served=len(slots), block_misses=len(keys) - len(slots),
                    bytes_out=len(slots) * sess.record_bytes)


    # ---- the transfer-engine data path --------------------------------------------------------
    def _dispatch_ucx(self, conn: socket.socket, sess: _Session, op: int, blen: int) -> None:
        if self._engine is None:
            raise _ProtocolError("this server does not offer the ucx data path")
        if op == OP_UCX_META:
            if blen:
                raise _ProtocolError("UCX_META takes no body")
            send_frame(conn, op, ST_OK, self._ucx_md)
        elif op == OP_PUT_PREP:
            if sess.put is not None or sess.pins:
                raise _ProtocolError("PUT_PREP while a batch is open")
            (_n, flags), hs, keys = self._read_hashes(conn, sess, blen, 0, PUT_HEAD)
            slots = self._prepare_store(keys, bool(flags & PUT_CHAIN))
            sess.put = (hs, keys, slots)
            state = np.where(slots >= 0, 2, np.where(slots == -1, 1, 0)).astype(np.uint8)
            addrs = np.zeros(len(keys), np.uint64)
            base, sb = self._arena.address(0), self.slot_bytes
            addrs[slots >= 0] = base + slots[slots >= 0].astype(np.uint64) * np.uint64(sb)
            send_frame(conn, op, ST_OK, state, addrs)
        elif op == OP_PUT_COMMIT:
            if blen or sess.put is None:
                raise _ProtocolError("PUT_COMMIT without an open PUT_PREP (or with a body)")
            hs, keys, slots = sess.put
            sess.put = None
            good = np.zeros(len(keys), np.uint8)
            rb = sess.record_bytes
            new = [i for i in range(len(keys)) if slots[i] >= 0]
            try:
                for i in new:
                    view = memoryview(self._arena.view(int(slots[i])))[:rb]
                    good[i] = check_record(view[:HEADER_SIZE], view[HEADER_SIZE:], sess.ns, hs[i]) is None
            finally:
                self._persist(keys, slots, good, new, rb)
                with self._lock:
                    if new:
                        self._mgr.complete_store([keys[i] for i in new], good[new])
            ok = (slots == -1) | (good.astype(bool) & (slots >= 0))
            self._count(puts=1, blocks_stored=int(ok.sum()), blocks_rejected=int(len(ok) - ok.sum()),
                        bytes_in=len(new) * rb)
            send_frame(conn, op, ST_OK, ok.astype(np.uint8))
        elif op == OP_GET_PIN:
            if sess.put is not None or sess.pins:
                raise _ProtocolError("GET_PIN while a batch is open")
            _f, _hs, keys = self._read_hashes(conn, sess, blen, 0, U32)
            present, pinned, slots = self._pin(keys)
            sess.pins = pinned
            addrs = np.zeros(len(keys), np.uint64)
            idx = np.flatnonzero(present)
            addrs[idx] = self._arena.address(0) + np.asarray(slots, np.uint64) * np.uint64(self.slot_bytes)
            self._count(gets=1, blocks_served=len(slots), block_misses=len(keys) - len(slots),
                        bytes_out=len(slots) * sess.record_bytes)
            send_frame(conn, op, ST_OK, present, addrs)
        elif op == OP_GET_DONE:
            if blen:
                raise _ProtocolError("GET_DONE takes no body")
            self._release(sess)

    def _pin(self, keys: list[bytes]) -> tuple[np.ndarray, list[bytes], list[int]]:
        present = np.zeros(len(keys), np.uint8)
        pinned: list[bytes] = []
        slots: list[int] = []
        with self._lock:
            for i, k in enumerate(keys):
                if self._mgr.contains(k) is None:
                    continue
                try:
                    s = self._mgr.prepare_load([k])
                except KvbmError:
                    continue
                present[i] = 1
                pinned.append(k)
                slots.append(int(s[0]))
        return present, pinned, slots

    def _release(self, sess: _Session) -> None:
        """Unpin a connection's open GET batch and drop its open PUT reservations."""
        with self._lock:
            if sess.pins:
                self._mgr.complete_load(sess.pins)
                sess.pins = []
            if sess.put is not None:
                _hs, keys, slots = sess.put
                new = [keys[i] for i in range(len(keys)) if slots[i] >= 0]
                if new:
                    self._mgr.complete_store(new, np.zeros(len(new), np.uint8))
                sess.put = None


class _Session:
    """One HELLO'd connection: its namespace, record size and open ucx batch."""

    __slots__ = ("block_bytes", "ns", "pins", "put", "record_bytes")

    def __init__(self, ns: bytes, block_bytes: int) -> None:
        self.ns = ns
        self.block_bytes = block_bytes
        self.record_bytes = block_bytes + HEADER_SIZE
        self.pins: list[bytes] = []
        self.put: tuple[list[bytes], list[bytes], np.ndarray] | None = None

    def key(self, h: bytes) -> bytes:
        return hashlib.blake2b(self.ns + h, digest_size=HASH_SIZE).digest()
