"""``kvbm serve``: a store server that keeps KV blocks for many engine instances.

The server holds blocks in its own host tier (a :class:`kvbm.BlockManager`: block index,
eviction policy, host arena) and answers LOOKUP, PUT and GET requests from clients
(:class:`kvbm.tiers.serve_client.ServeClientTier`) over TCP. It binds to 127.0.0.1 unless told
otherwise. Credentials are per tenant: a token file maps each token to the namespaces it may read
and write (:mod:`kvbm.serve_tenants`); a connection's namespace comes from its credential, and
blocks of different namespaces never meet. Without tokens the server is loopback-only and
single-tenant.

Design note — control plane and data path.
    Every request and reply is a frame (:mod:`kvbm.serve_protocol`). The control fields (counts,
    hashes, flags) always travel in the body; the *data path* is where record bytes go. Here
    they travel in the same TCP stream, straight between the socket and the server's arena slots
    (``recv_into`` a reserved slot, ``sendmsg`` from pinned slots, so the server copies nothing
    in user space). A slot holds the whole record (56-byte header, then the payload), so what a
    client wrote is exactly what a later GET sends back, and the client verifies it end to end.
    A one-sided transfer-engine path (server registers its arena, client gets its remote key and
    puts/gets into slot addresses) replaces only those record loops: with ``data_path="ucx"``
    the server registers its whole arena with a :class:`kvbm.transfer.TransferEngine` and offers
    it at HELLO; a client that takes it asks for the slot addresses of a batch (PUT_PREP /
    GET_PIN), moves the records with one batched one-sided put or get, and closes the batch
    (PUT_COMMIT: verify and publish; GET_DONE: unpin). Reserved and pinned slots belong to the
    connection: if it drops, its reservations are dropped and its pins released. The TCP control
    connection is also how a dead client is noticed, so UCX may run with endpoint error handling
    off (what shared memory between processes needs).
    Limit: a remote key covers the whole registered arena, so the ucx path trusts every
    authenticated client with every slot; the server therefore refuses ``data_path="ucx"`` when
    its credentials grant more than one namespace (per-slot keys or a server-side copy would be
    needed against hostile tenants).

Protocol: :mod:`kvbm.serve_protocol` (imported by the server and the client alike). Tenants and
the token file: :mod:`kvbm.serve_tenants`.

Design note — limits against clients that do not play along.
    A connection that has not finished HELLO holds no client slot: it waits in a small pool of
    ``max_handshakes`` and must finish HELLO within ``hello_timeout_s`` (a deadline for the whole
    HELLO, however slowly it trickles); when the pool is full the oldest waiting connection is
    closed for the newcomer, so idle sockets cannot lock clients out. ``max_clients_per_peer``
    caps the connections of one address. A PUT reserves slots for at most
    ``put_reserve_bytes`` of records at a time, just before they arrive (a PUT header for 1,024
    blocks and no data holds one window, evicting nothing more), and every request body, PUT
    records included, and every PUT_PREP's commit must arrive within ``put_timeout_s``; else the
    connection is dropped and its reservations with it. A GET sends exactly the stored record:
    the server checks the slot's header (magic, namespace, hash, length) before sending it, a
    mismatch is a counted miss (``record_mismatches``), and no byte past the record leaves a slot.

A record is ``56 + block_bytes`` bytes (header as in :mod:`kvbm.tiers.remote`). The server checks
each PUT record's header and CRC32C before publishing it; a bad one is answered 0 and never
becomes visible. A malformed frame gets an ERR reply and the connection is closed.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import logging
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from kvbm.config import KvbmConfig
from kvbm.errors import CapacityError, KvbmError
from kvbm.serve_config import ServeConfig
from kvbm.serve_protocol import (
    FEATURE_UCX,
    FRAME,
    HELLO,
    HELLO_MAGIC,
    HELLO_OK,
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
    ST_ERR,
    ST_OK,
    U32,
    recv_exact,
    recv_exact_into,
    send_frame,
)
from kvbm.serve_tenants import tenant_prefix
from kvbm.tiers.remote import HASH_SIZE, HEADER_ID_SIZE, HEADER_SIZE, check_record, header_id

log = logging.getLogger("kvbm.serve")

__all__ = ["ServeConfig", "StoreServer"]


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
        # the whole arena as (slot, byte) rows, to check many slot headers in one numpy step
        nbytes = self._arena.num_slots * self.slot_bytes
        self._rows = np.frombuffer((ctypes.c_uint8 * nbytes).from_address(self._arena.address(0)),
                                   np.uint8).reshape(self._arena.num_slots, self.slot_bytes)
        self._lock = threading.Lock()  # makes multi-step index updates atomic; bytes move outside it
        self._stats_lock = threading.Lock()
        self._stats = dict.fromkeys(
            ("connections", "refused_auth", "refused_busy", "refused_peer", "handshake_timeouts", "handshakes_dropped",
             "protocol_errors", "request_timeouts", "lookups", "puts", "gets", "blocks_stored", "blocks_rejected",
             "blocks_served", "block_misses", "record_mismatches", "bytes_in", "bytes_out"), 0)
        self._sock: socket.socket | None = None
        self._threads: set[threading.Thread] = set()
        self._conns: set[socket.socket] = set()  # every open connection (for close())
        self._pending: dict[socket.socket, str] = {}  # waiting for HELLO, oldest first -> peer address
        self._active: set[socket.socket] = set()  # HELLO'd: these hold the max_clients slots
        self._per_peer: Counter[str] = Counter()
        self._put_window = max(1, min(self.config.max_batch, self.config.put_reserve_bytes // self.slot_bytes))
        self._closing = threading.Event()
        self._stop = threading.Event()
        self._accept_thread: threading.Thread | None = None
        self._tenants = self.config.tenant_table()
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
            evictions=host.get("evictions"), slot_bytes=self.slot_bytes, active_connections=len(self._active),
            pending_handshakes=len(self._pending), put_window=self._put_window,
        )
        return d

    def _count(self, **kw: int) -> None:
        with self._stats_lock:
            for k, v in kw.items():
                self._stats[k] += v

    # ---- connections --------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        assert self._sock is not None
        c = self.config
        while not self._closing.is_set():
            try:
                conn, addr = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._closing.is_set():
                    return
                time.sleep(0.05)
                continue
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            peer = str(addr[0])
            with self._lock:
                refused = self._per_peer[peer] >= c.max_clients_per_peer
                if not refused:
                    if len(self._pending) >= c.max_handshakes:  # make room: the oldest waiter goes
                        victim = next(iter(self._pending))
                        del self._pending[victim]
                        self._count(handshakes_dropped=1)
                        with contextlib.suppress(OSError):
                            victim.shutdown(socket.SHUT_RDWR)
                    self._pending[conn] = peer
                    self._per_peer[peer] += 1
                    self._conns.add(conn)
            if refused:
                self._count(refused_peer=1)
                with contextlib.suppress(OSError):
                    conn.settimeout(1.0)
                    send_frame(conn, OP_HELLO, ST_BUSY, f"server full for {peer}: max_clients_per_peer "
                               f"({c.max_clients_per_peer}) connections from this address are open".encode())
                conn.close()
                continue
            t = threading.Thread(target=self._serve_conn, args=(conn, peer), name="kvbm-serve-conn", daemon=True)
            self._threads.add(t)
            t.start()

    def _serve_conn(self, conn: socket.socket, peer: str) -> None:
        self._count(connections=1)
        sess: _Session | None = None
        try:
            sess = self._hello(conn)
            if sess is None:
                return
            head = bytearray(FRAME.size)
            c = self.config
            while not self._closing.is_set():
                # an open ucx batch holds slots: its commit / done must come within put_timeout_s
                conn.settimeout(c.put_timeout_s if (sess.put is not None or sess.pins) else c.idle_timeout_s)
                recv_exact_into(conn, memoryview(head))
                op, _st, _r, blen = FRAME.unpack(head)
                try:
                    self._dispatch(conn, sess, op, blen, time.monotonic() + c.put_timeout_s)
                except _ProtocolError as e:
                    self._count(protocol_errors=1)
                    send_frame(conn, op, ST_ERR, str(e).encode())
                    return
        except TimeoutError:
            self._count(**{"handshake_timeouts" if sess is None else "request_timeouts": 1})
        except (OSError, ConnectionError):
            pass  # the client went away (or close() shut us down); nothing is half-published
        except Exception:  # a bug: log it, drop only this connection
            log.exception("kvbm serve: connection failed")
        finally:
            if sess is not None:
                self._release(sess)
            with self._lock:
                self._conns.discard(conn)
                self._pending.pop(conn, None)
                self._active.discard(conn)
                self._per_peer[peer] -= 1
                if self._per_peer[peer] <= 0:
                    del self._per_peer[peer]
            conn.close()
            self._threads.discard(threading.current_thread())

    def _hello(self, conn: socket.socket) -> _Session | None:
        """Read and answer HELLO (within ``hello_timeout_s``); the session, or None when refused."""
        deadline = time.monotonic() + self.config.hello_timeout_s
        op, _st, _r, blen = FRAME.unpack(recv_exact(conn, FRAME.size, deadline))
        if op != OP_HELLO or not HELLO.size <= blen <= HELLO.size + MAX_TOKEN + MAX_TENANT:
            self._count(protocol_errors=1)
            send_frame(conn, OP_HELLO, ST_ERR, b"expected HELLO")
            return None
        body = recv_exact(conn, blen, deadline)
        magic, version, tlen, block_bytes, ns, nlen = HELLO.unpack_from(body)
        token, tenant_raw = body[HELLO.size:HELLO.size + tlen], body[HELLO.size + tlen:]
        if magic != HELLO_MAGIC or version != PROTOCOL_VERSION or HELLO.size + tlen + nlen != blen:
            self._count(protocol_errors=1)
            send_frame(conn, OP_HELLO, ST_ERR,
                       f"unsupported protocol (magic {magic!r}, version {version}; this server speaks "
                       f"version {PROTOCOL_VERSION})".encode())
            return None
        try:
            requested = tenant_raw.decode("utf-8")
        except UnicodeDecodeError:
            requested = "\ufffd"  # never a granted name
        tenant = self._tenants.resolve(token, requested)
        if tenant is None:
            self._count(refused_auth=1)
            why = "token refused" if requested == "" or self._tenants.resolve(token, "") is None else (
                f"token refused for namespace {requested!r}")
            send_frame(conn, OP_HELLO, ST_AUTH, why.encode())
            return None
        if not 0 < block_bytes <= self.config.max_block_bytes:
            send_frame(conn, OP_HELLO, ST_ERR,
                       f"block_bytes {block_bytes} is outside 1..{self.config.max_block_bytes} (server's max)".encode())
            return None
        with self._lock:
            full = len(self._active) >= self.config.max_clients
            if not full and self._pending.pop(conn, None) is not None:
                self._active.add(conn)
            elif not full:
                return None  # dropped from the waiting pool for a newer connection meanwhile
        if full:
            self._count(refused_busy=1)
            send_frame(conn, OP_HELLO, ST_BUSY,
                       f"server full: all {self.config.max_clients} client connections (max_clients) are in use"
                       .encode())
            return None
        features = FEATURE_UCX if self._engine is not None else 0
        send_frame(conn, OP_HELLO, ST_OK, HELLO_OK.pack(PROTOCOL_VERSION, self.config.max_batch,
                                                       self.config.max_block_bytes, features, self._put_window))
        return _Session(tenant, ns, int(block_bytes))

    # ---- requests -----------------------------------------------------------------------------
    def _read_hashes(self, conn: socket.socket, sess: _Session, blen: int, per_block: int,
                     head: struct.Struct, deadline: float) -> tuple[tuple[int, ...], list[bytes], list[bytes]]:
        if blen < head.size:
            raise _ProtocolError(f"body of {blen} bytes is shorter than its {head.size}-byte head")
        fields = head.unpack(recv_exact(conn, head.size, deadline))
        n = fields[0]
        if n > self.config.max_batch:
            raise _ProtocolError(f"batch of {n} blocks exceeds max_batch {self.config.max_batch}")
        if blen != head.size + n * (HASH_SIZE + per_block):
            raise _ProtocolError(f"body length {blen} does not match {n} blocks")
        raw = recv_exact(conn, n * HASH_SIZE, deadline)
        hs = [raw[i * HASH_SIZE:(i + 1) * HASH_SIZE] for i in range(n)]
        keys = [sess.key(h) for h in hs]
        return fields, hs, keys

    def _dispatch(self, conn: socket.socket, sess: _Session, op: int, blen: int, deadline: float) -> None:
        if op == OP_LOOKUP:
            _f, _hs, keys = self._read_hashes(conn, sess, blen, 0, U32, deadline)
            n = self._mgr.lookup(keys).num_hits if keys else 0
            self._count(lookups=1)
            send_frame(conn, op, ST_OK, U32.pack(n))
        elif op == OP_PUT:
            (_n, flags), hs, keys = self._read_hashes(conn, sess, blen, sess.record_bytes, PUT_HEAD, deadline)
            ok = self._put(conn, sess, hs, keys, bool(flags & PUT_CHAIN), deadline)
            self._count(puts=1, blocks_stored=int(ok.sum()), blocks_rejected=int(len(ok) - ok.sum()),
                        bytes_in=len(hs) * sess.record_bytes)
            send_frame(conn, op, ST_OK, ok.astype(np.uint8))
        elif op == OP_GET:
            _f, hs, keys = self._read_hashes(conn, sess, blen, 0, U32, deadline)
            self._get(conn, sess, op, hs, keys)
        elif op in (OP_UCX_META, OP_PUT_PREP, OP_PUT_COMMIT, OP_GET_PIN, OP_GET_DONE):
            self._dispatch_ucx(conn, sess, op, blen, deadline)
        elif op == OP_STATS:
            if blen:
                raise _ProtocolError("STATS takes no body")
            send_frame(conn, op, ST_OK, json.dumps(self.stats()).encode())
        else:
            raise _ProtocolError(f"unknown op {op}")

    def _prepare_store(self, keys: list[bytes], chain: bool, parent: bytes | None = None) -> np.ndarray:
        """Reserve slots (-1: present already, -2: could not be stored)."""
        slots = np.full(len(keys), -1, np.int64)
        with self._lock:
            if chain:
                try:
                    return self._mgr.prepare_store(keys, parent=parent).slots
                except (CapacityError, KvbmError):
                    pass  # e.g. everything pinned: store what fits, one by one
            for i, k in enumerate(keys):
                try:
                    slots[i] = self._mgr.prepare_store([k]).slots[0]
                except (CapacityError, KvbmError):
                    slots[i] = -2
        return slots

    def _put(self, conn: socket.socket, sess: _Session, hs: list[bytes], keys: list[bytes],
             chain: bool, deadline: float) -> np.ndarray:
        """Receive and publish a PUT's records, reserving one window of slots at a time."""
        rb = sess.record_bytes
        scratch = None
        ok = np.zeros(len(keys), bool)
        parent = None
        for a in range(0, len(keys), self._put_window):
            wk = keys[a:a + self._put_window]
            slots = self._prepare_store(wk, chain, parent)
            good = np.zeros(len(wk), np.uint8)
            new = [i for i in range(len(wk)) if slots[i] >= 0]
            try:
                # data path (TCP): each record goes straight from the socket into its reserved slot
                for i in range(len(wk)):
                    if slots[i] >= 0:
                        view = memoryview(self._arena.view(int(slots[i])))[:rb]
                        recv_exact_into(conn, view, deadline)
                        good[i] = check_record(view[:HEADER_SIZE], view[HEADER_SIZE:], sess.ns, hs[a + i]) is None
                    else:
                        if scratch is None:
                            scratch = memoryview(bytearray(rb))
                        recv_exact_into(conn, scratch, deadline)
            finally:
                self._persist(wk, slots, good, new, rb)
                with self._lock:
                    if new:
                        self._mgr.complete_store([wk[i] for i in new], good[new])
            # already present (-1) counts as stored; refused for capacity (-2) or bad record does not
            ok[a:a + len(wk)] = (slots == -1) | (good.astype(bool) & (slots >= 0))
            parent = wk[-1] if chain else None
        return ok

    def _persist(self, keys: list[bytes], slots: np.ndarray, good: np.ndarray, new: list[int], rb: int) -> None:
        """Hand verified records, still reserved, to the ``on_records`` hook (before they publish)."""
        if self.on_records is not None and good.any():
            kept = [i for i in new if good[i]]
            self.on_records([keys[i] for i in kept], [memoryview(self._arena.view(int(slots[i])))[:rb] for i in kept])

    def _get(self, conn: socket.socket, sess: _Session, op: int, hs: list[bytes], keys: list[bytes]) -> None:
        present, pinned, slots = self._pin(sess, hs, keys)
        try:
            rb = sess.record_bytes
            # data path (TCP): exactly the stored records (checked by _pin) go from the pinned slots
            # to the socket, no copy
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
    def _dispatch_ucx(self, conn: socket.socket, sess: _Session, op: int, blen: int, deadline: float) -> None:
        if self._engine is None:
            raise _ProtocolError("this server does not offer the ucx data path")
        if op == OP_UCX_META:
            if blen:
                raise _ProtocolError("UCX_META takes no body")
            send_frame(conn, op, ST_OK, self._ucx_md)
        elif op == OP_PUT_PREP:
            if sess.put is not None or sess.pins:
                raise _ProtocolError("PUT_PREP while a batch is open")
            (_n, flags), hs, keys = self._read_hashes(conn, sess, blen, 0, PUT_HEAD, deadline)
            if len(keys) > self._put_window:
                raise _ProtocolError(f"PUT_PREP of {len(keys)} blocks exceeds put_window {self._put_window}")
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
            _f, hs, keys = self._read_hashes(conn, sess, blen, 0, U32, deadline)
            present, pinned, slots = self._pin(sess, hs, keys)
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

    def _pin(self, sess: _Session, hs: list[bytes], keys: list[bytes]) -> tuple[np.ndarray, list[bytes], list[int]]:
        """Pin the present blocks whose slot holds exactly the record asked for.

        A slot's header must name this session's namespace digest, the block's hash and its
        ``block_bytes``; anything else (which the keys make impossible unless memory was damaged)
        is a counted miss and is never sent.
        """
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
        if slots:  # pinned: the headers cannot change under us now
            idx = np.flatnonzero(present)
            want = b"".join(header_id(sess.ns, hs[i], sess.block_bytes) for i in idx)
            got = self._rows[np.asarray(slots, np.int64), :HEADER_ID_SIZE]
            bad = np.flatnonzero(~(got == np.frombuffer(want, np.uint8).reshape(len(idx), -1)).all(axis=1))
            if len(bad):
                with self._lock:
                    self._mgr.complete_load([pinned[j] for j in bad])
                present[idx[bad]] = 0
                keep = np.ones(len(slots), bool)
                keep[bad] = False
                pinned = [k for k, ok in zip(pinned, keep) if ok]
                slots = [s for s, ok in zip(slots, keep) if ok]
                self._count(record_mismatches=len(bad))
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
    """One HELLO'd connection: its tenant namespace, client namespace, record size, open ucx batch."""

    __slots__ = ("block_bytes", "ns", "pins", "prefix", "put", "record_bytes", "tenant")

    def __init__(self, tenant: str, ns: bytes, block_bytes: int) -> None:
        self.tenant = tenant
        self.ns = ns
        self.block_bytes = block_bytes
        self.record_bytes = block_bytes + HEADER_SIZE
        # the key binds the credential's namespace, the client's digest and the record size
        self.prefix = tenant_prefix(tenant) + ns + block_bytes.to_bytes(8, "little")
        self.pins: list[bytes] = []
        self.put: tuple[list[bytes], list[bytes], np.ndarray] | None = None

    def key(self, h: bytes) -> bytes:
        return hashlib.blake2b(self.prefix + h, digest_size=HASH_SIZE).digest()
