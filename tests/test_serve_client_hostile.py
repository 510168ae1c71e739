"""ServeClientTier against a hostile server (issue 12, finding 4): every malformed reply field is a
PeerError at start-up or a counted miss later, never struct.error, ValueError or IndexError."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hostile_serve import HostileServer, frame, hello_ok
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvbm.errors import KvbmError, PeerError
from kvbm.serve_protocol import OP_GET, OP_HELLO, OP_LOOKUP, OP_PUT, OP_STATS, ST_BUSY, ST_ERR, ST_OK, U32
from kvbm.tiers.remote import HEADER_SIZE
from kvbm.tiers.serve_client import MalformedReply, ServeClientTier

BB = 64


def client(srv: HostileServer, **kw) -> ServeClientTier:
    kw.setdefault("timeout_s", 2.0)
    kw.setdefault("retry_interval_s", 0.0)
    return ServeClientTier(srv.url, block_bytes=BB, namespace="h", **kw)


def n_of(body: bytes) -> int:
    return U32.unpack_from(body)[0]


HELLO_CASES = {
    "short HELLO_OK": frame(OP_HELLO, ST_OK, b"\2\0\0"),
    "max_batch 0": hello_ok(max_batch=0),
    "max_batch 2**32-1": hello_ok(max_batch=2**32 - 1),
    "put_window 0": hello_ok(put_window=0),
    "put_window above max_batch": hello_ok(max_batch=4, put_window=5),
    "max_block_bytes below ours": hello_ok(max_block_bytes=BB - 1),
    "protocol version 9": hello_ok(version=9),
    "reply to another op": frame(OP_LOOKUP, ST_OK, b""),
    "unknown status": frame(OP_HELLO, 77, b"?"),
    "2 GiB refusal reason": frame(OP_HELLO, ST_ERR, b"", blen=1 << 31),
    "an HTTP server": b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n",
}


@pytest.mark.parametrize("case", sorted(HELLO_CASES))
def test_malformed_hello_reply_is_a_peer_error(case):
    with HostileServer(hello=HELLO_CASES[case]) as srv, pytest.raises(PeerError, match="kvbm serve"):
        client(srv)


def test_busy_hello_says_the_server_is_full():
    with HostileServer(hello=frame(OP_HELLO, ST_BUSY, b"all 64 in use")) as srv, \
            pytest.raises(PeerError, match="is full"):
        client(srv)


def _lookup(k_extra: int):
    return lambda op, body: frame(op, ST_OK, U32.pack(n_of(body) + k_extra))


def _get(flag: int, extra: int = 0):
    def reply(op, body):
        n = n_of(body)
        recs = b"".join(b"\0" * (HEADER_SIZE + BB) for _ in range(n)) if flag else b""
        return frame(op, ST_OK, bytes([flag]) * n + recs, blen=n + (n * (HEADER_SIZE + BB) if flag else 0) + extra)
    return reply


REQUEST_CASES = {
    "LOOKUP: more hits than asked": _lookup(5),
    "LOOKUP: 3-byte reply": lambda op, body: frame(op, ST_OK, b"\1\0\0"),
    "LOOKUP: reply to another op": lambda op, body: frame(OP_GET, ST_OK, U32.pack(0)),
    "LOOKUP: 2 GiB error reason": lambda op, body: frame(op, ST_ERR, b"", blen=1 << 31),
    "PUT: flag value 7": lambda op, body: frame(op, ST_OK, b"\7" * n_of(body)),
    "PUT: reply one byte short": lambda op, body: frame(op, ST_OK, b"\1" * (n_of(body) - 1)),
    "GET: present flag 2": _get(2),
    "GET: body longer than its records": _get(1, extra=7),
    "GET: body shorter than its flags": lambda op, body: frame(op, ST_OK, b"", blen=1),
    "GET: all-zero records (bad headers)": _get(1),
}


@pytest.mark.parametrize("case", sorted(REQUEST_CASES))
def test_malformed_request_reply_is_a_counted_miss(case):
    with HostileServer(reply=REQUEST_CASES[case]) as srv, client(srv) as t:
        hs = [os.urandom(16) for _ in range(3)]
        data = np.ones((3, BB), np.uint8)
        op = case.split(":")[0]
        if op == "LOOKUP":
            assert t.lookup_prefix(hs) == 0
        elif op == "PUT":
            assert not t.put(hs, data).any()
        else:
            out = np.full((3, BB), 9, np.uint8)
            assert not t.get(hs, out).any()
        s = t.stats()
        if case == "GET: all-zero records (bad headers)":
            assert s["checksum_failures"] == 3 and s["protocol_errors"] == 0
        else:
            assert s["errors"] == 1 and (s["protocol_errors"] == 1 or "error reason" not in case)


@pytest.mark.parametrize("body", [b"not json", b"[1, 2]", b"[" * 100000, b"\xff\xfe"])
def test_malformed_stats_is_a_peer_error(body):
    with HostileServer(reply=lambda op, _b: frame(op, ST_OK, body)) as srv, client(srv) as t, \
            pytest.raises(PeerError, match="STATS"):
        t.server_stats()
    with HostileServer(reply=lambda op, _b: frame(op, ST_OK, b"", blen=1 << 30)) as srv, client(srv) as t, \
            pytest.raises(MalformedReply):
        t.server_stats()


def test_block_manager_on_a_server_claiming_more_hits_than_asked():
    from kvbm import BlockManager, KvbmConfig

    def reply(op, body):
        return frame(op, ST_OK, U32.pack(n_of(body) + 3) if op == OP_LOOKUP else b"")

    with HostileServer(reply=reply) as srv, BlockManager(
            KvbmConfig(block_bytes=BB, host_capacity_bytes=64 * BB, remote_url=srv.url, remote_timeout_s=2.0)) as m:
        r = m.lookup([os.urandom(16) for _ in range(4)])
        assert r.num_hits == 0
        assert m.remote.stats()["protocol_errors"] == 1


# ---- fuzz: random reply bytes for every request ---------------------------------------------------
_counts = {"cases": 0, "start_refused": 0, "ops": 0}
_reply_bytes = st.one_of(
    st.binary(max_size=64),
    st.builds(lambda op, status, body, extra: frame(op, status, body, blen=max(0, len(body) + extra)),
              st.sampled_from([OP_LOOKUP, OP_PUT, OP_GET, OP_STATS, 0, 255]), st.sampled_from([ST_OK, ST_ERR, 9]),
              st.binary(max_size=2 * (HEADER_SIZE + BB) + 8), st.sampled_from([0, 0, 1, -1, 1 << 30])),
)


@settings(max_examples=int(os.environ.get("KVBM_FUZZ_EXAMPLES", "150")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(hello=st.one_of(st.just(None), st.binary(max_size=40),
                       st.builds(hello_ok, st.integers(0, 70), st.integers(0, 1 << 20), st.integers(0, 3),
                                 st.integers(0, 70), st.sampled_from([2, 1, 3]))),
       replies=st.lists(_reply_bytes, min_size=4, max_size=4), n=st.integers(1, 3))
def test_fuzz_client_against_random_replies(hello, replies, n):
    """No exception but PeerError at start; lookups, puts and gets never raise afterwards."""
    it = iter(replies * 4)

    def reply(op, body):
        return next(it, None)

    _counts["cases"] += 1
    with HostileServer(hello=hello, reply=reply, close_after_reply=True) as srv:
        try:
            t = client(srv, timeout_s=0.5)
        except PeerError:
            _counts["start_refused"] += 1
            return
        except KvbmError as e:  # any other kvbm error at start would still be a finding
            raise AssertionError(f"start raised {type(e).__name__}: {e}") from None
        with t:
            hs = [os.urandom(16) for _ in range(n)]
            assert 0 <= t.lookup_prefix(hs) <= n
            t.put(hs, np.ones((n, BB), np.uint8))
            out = np.zeros((n, BB), np.uint8)
            ok = t.get(hs, out)
            assert not ok.any()  # random bytes never verify as a record of ours
            _counts["ops"] += 3


def test_fuzz_counts_printed(capsys):
    with capsys.disabled():
        print(f"\nserve client fuzz: {_counts['cases']} cases, {_counts['start_refused']} refused at start "
              f"(PeerError), "
              f"{_counts['ops']} operations on random replies; 0 crashes, 0 non-KvbmError exceptions")
    assert _counts["cases"] > 0
