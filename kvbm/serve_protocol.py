"""The ``kvbm serve`` wire protocol, shared by the server (:mod:`kvbm.serve`) and its client
(:mod:`kvbm.tiers.serve_client`). Framing, constants and socket helpers only: no server or
client logic, and no kvbm import beyond errors, so both ends (and tests) depend on it alone.

Every request and reply is a frame: ``op u8, status u8, reserved u16, body_len u32`` (little
endian, 8 bytes) and a body.

Protocol (version 2). ``n`` is at most the ``max_batch`` the server announced.

    HELLO   -> b"KVBS" u16 version, u16 token_len, u64 block_bytes, 16s client namespace digest,
               u16 tenant_len, token, tenant (UTF-8; empty = the credential's default namespace)
            <- OK: u16 version, u32 max_batch, u64 max_block_bytes, u32 features, u32 put_window
               | AUTH / BUSY / ERR: UTF-8 reason, then the connection is closed
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

A record is a 56-byte header (:mod:`kvbm.tiers.remote`) and ``block_bytes`` of payload. HELLO_OK's
``features`` bit 0 says the UCX ops are offered; ``put_window`` is the most blocks one PUT_PREP
may reserve (a ucx client sizes its batches by it).
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Sequence
from typing import Any

PROTOCOL_VERSION = 2
HELLO_MAGIC = b"KVBS"
FRAME = struct.Struct("<BBHI")
HELLO = struct.Struct("<4sHHQ16sH")
HELLO_OK = struct.Struct("<HIQII")
U32 = struct.Struct("<I")
PUT_HEAD = struct.Struct("<II")
HASH_SIZE = 16

OP_HELLO, OP_LOOKUP, OP_PUT, OP_GET, OP_STATS = 1, 2, 3, 4, 5
OP_UCX_META, OP_PUT_PREP, OP_PUT_COMMIT, OP_GET_PIN, OP_GET_DONE = 6, 7, 8, 9, 10
FEATURE_UCX = 1
ST_OK, ST_ERR, ST_AUTH, ST_BUSY = 0, 1, 2, 3
PUT_CHAIN = 1
MAX_TOKEN = 4096
MAX_TENANT = 256
MAX_REASON = 1 << 16
"""Longest error reason a client reads (longer bodies mean a broken or hostile server)."""
MAX_STATS = 1 << 20
"""Longest STATS / UCX_META reply a client reads."""
_IOV_MAX = 512


def recv_exact_into(sock: socket.socket, buf: memoryview, deadline: float | None = None) -> None:
    """Fill ``buf`` from ``sock``; raises ConnectionError when the peer closes first.

    With ``deadline`` (a ``time.monotonic()`` instant) the whole buffer must arrive by then,
    however slowly the peer trickles bytes; else TimeoutError.
    """
    got, n = 0, buf.nbytes
    while got < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("deadline passed before the peer sent its data")
            sock.settimeout(left)
        k = sock.recv_into(buf[got:])
        if k == 0:
            raise ConnectionError("peer closed the connection")
        got += k


def recv_exact(sock: socket.socket, n: int, deadline: float | None = None) -> bytes:
    """``n`` bytes from ``sock`` (see :func:`recv_exact_into`)."""
    buf = bytearray(n)
    recv_exact_into(sock, memoryview(buf), deadline)
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
    """One frame: header then ``body`` buffers (sent without joining them)."""
    n = sum(memoryview(b).nbytes for b in body)
    sendmsg_all(sock, [FRAME.pack(op, status, 0, n), *body])


def hello_body(token: bytes, block_bytes: int, namespace: bytes, tenant: bytes) -> bytes:
    """The body of a HELLO request."""
    return HELLO.pack(HELLO_MAGIC, PROTOCOL_VERSION, len(token), block_bytes, namespace, len(tenant)) + token + tenant
