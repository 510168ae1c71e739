"""A hypothesis fuzz of the ``kvbm serve`` protocol (frames, lengths, orders) against a real server
process (issue 12): it never dies, never logs a traceback, answers only well-formed frames, and
a real client still stores and loads byte-exact blocks between and after the cases."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvbm.serve_protocol import (
    FRAME,
    HELLO,
    HELLO_MAGIC,
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
    PUT_HEAD,
    ST_AUTH,
    ST_BUSY,
    ST_ERR,
    ST_OK,
    U32,
    hello_body,
)
from kvbm.tiers.remote import HEADER_SIZE, encode_header, namespace_digest
from kvbm.tiers.serve_client import ServeClientTier

TOKEN = b"fuzz-token"
BB = 256
NS = namespace_digest("fuzz")
OPS = [OP_HELLO, OP_LOOKUP, OP_PUT, OP_GET, OP_STATS, OP_UCX_META, OP_PUT_PREP, OP_PUT_COMMIT, OP_GET_PIN, OP_GET_DONE]
EXAMPLES = int(os.environ.get("KVBM_FUZZ_EXAMPLES", "400"))
_counts: Counter[str] = Counter()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from kvbm.transfer import ucx_available

    d = tmp_path_factory.mktemp("serve-fuzz")
    (d / "tokens").write_text(f"{TOKEN.decode()} fuzz\n")
    data_path = "ucx" if ucx_available()[0] else "tcp"  # the ucx ops' batch orders are fuzzed too
    log = open(d / "stderr", "w+")  # noqa: SIM115 (read back at the end)
    env = dict(os.environ)
    env.pop("KVBM_SERVE_TOKEN", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvbm", "serve", "--capacity", "1MiB", "--max-block-bytes", "1KiB",
         "--max-batch", "32", "--token-file", str(d / "tokens"), "--hello-timeout", "2", "--put-timeout", "2",
         "--put-reserve", "4KiB", "--data-path", data_path], stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    line = proc.stdout.readline()
    m = re.search(r"listening on kvbm://127\.0\.0\.1:(\d+)", line)
    assert m, f"kvbm serve did not start: {line!r} {Path(d / 'stderr').read_text()}"
    yield proc, int(m.group(1)), data_path, log
    proc.terminate()
    proc.wait(30)
    log.close()


# ---- frames ----------------------------------------------------------------------------------------
hashes = st.lists(st.binary(min_size=16, max_size=16), min_size=0, max_size=6)


@st.composite
def hello_frame(draw) -> bytes:
    token = draw(st.sampled_from([TOKEN, b"", b"wrong", TOKEN + b"x"]))
    tenant = draw(st.sampled_from([b"", b"fuzz", b"default", b"other", b"\xff\xfe"]))
    bb = draw(st.sampled_from([BB, 1, 0, 1024, 1025, 2**64 - 1]))
    if draw(st.booleans()):
        body = hello_body(token, bb, NS, tenant)
    else:  # mangled fields: magic, version, lengths that disagree with the body
        body = HELLO.pack(draw(st.sampled_from([HELLO_MAGIC, b"KVBX", b"\0" * 4])),
                          draw(st.sampled_from([PROTOCOL_VERSION, 1, 0, 65535])),
                          draw(st.integers(0, 65535)), bb, NS, draw(st.integers(0, 65535))) + token + tenant
    return _frame(draw, OP_HELLO, body)


def _frame(draw, op: int, body: bytes) -> bytes:
    delta = draw(st.sampled_from([0] * 12 + [1, -1, 16, 1 << 20, 2**32 - 1 - len(body)]))
    blen = min(max(0, len(body) + delta), 2**32 - 1)
    return FRAME.pack(op, draw(st.integers(0, 255)), 0, blen) + body


@st.composite
def request_frame(draw) -> bytes:
    op = draw(st.sampled_from([*OPS, 0, 11, 255]))
    hs = draw(hashes)
    n = len(hs) if draw(st.integers(0, 5)) else draw(st.integers(0, 1 << 20))
    if op in (OP_PUT, OP_PUT_PREP):
        body = PUT_HEAD.pack(n, draw(st.integers(0, 3))) + b"".join(hs)
        if op == OP_PUT:
            for h in hs:
                payload = draw(st.binary(min_size=BB, max_size=BB)) if draw(st.booleans()) else os.urandom(BB)
                rec = bytearray(encode_header(NS, h, payload) + payload)
                if not draw(st.integers(0, 3)):  # damage: header field, CRC or length
                    i = draw(st.integers(0, len(rec) - 1))
                    rec[i] ^= 1 << draw(st.integers(0, 7))
                body += bytes(rec[:draw(st.sampled_from([len(rec)] * 6 + [HEADER_SIZE, 1]))])
    elif op in (OP_LOOKUP, OP_GET, OP_GET_PIN):
        body = U32.pack(n) + b"".join(hs)
    elif op in (OP_STATS, OP_UCX_META, OP_PUT_COMMIT, OP_GET_DONE):
        body = b"" if draw(st.booleans()) else draw(st.binary(max_size=8))
    else:
        body = draw(st.binary(max_size=64))
    return _frame(draw, op, body)


session = st.lists(st.one_of(hello_frame(), request_frame(), st.binary(min_size=1, max_size=32)), min_size=1,
                   max_size=8)
good_hello = st.just(FRAME.pack(OP_HELLO, 0, 0, len(hello_body(TOKEN, BB, NS, b""))) + hello_body(TOKEN, BB, NS, b""))


def _exchange(port: int, data: bytes) -> bytes:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    got = bytearray()
    try:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except OSError:  # the server closed first (it answers a malformed frame and hangs up)
            pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                k = s.recv(1 << 16)
            except ConnectionResetError:
                break
            if not k:
                break
            got += k
        else:
            raise AssertionError("the server kept the connection open after our end of stream")
    finally:
        s.close()
    return bytes(got)


def _check_replies(data: bytes) -> None:
    """The server's bytes are whole, well-formed frames with a known op and status."""
    i = 0
    while i < len(data):
        assert len(data) - i >= FRAME.size, f"truncated frame header at {i}: {data[i:]!r}"
        op, stt, _r, blen = FRAME.unpack_from(data, i)
        assert op in OPS or stt == ST_ERR, f"reply op {op}"
        assert stt in (ST_OK, ST_ERR, ST_AUTH, ST_BUSY), f"reply status {stt}"
        assert i + FRAME.size + blen <= len(data), f"reply body of {blen} bytes, {len(data) - i - 8} came"
        _counts[f"status {stt}"] += 1
        i += FRAME.size + blen


def _roundtrip(port: int, data_path: str) -> None:
    hs = [os.urandom(16) for _ in range(5)]
    data = np.random.default_rng().integers(0, 256, (5, BB), np.uint8)
    with ServeClientTier(f"kvbm://127.0.0.1:{port}", block_bytes=BB, namespace="fuzz", token=TOKEN.decode(),
                         data_path=data_path) as t:
        assert t.put(hs, data).all()
        out = np.zeros_like(data)
        assert t.get(hs, out).all()
        np.testing.assert_array_equal(out, data)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                         HealthCheck.function_scoped_fixture])
@given(first=st.one_of(good_hello, good_hello, good_hello, hello_frame(), request_frame()), rest=session)
def test_fuzz_protocol_against_a_server_process(server, first, rest):
    proc, port, data_path, _log = server
    frames = [first, *rest]
    _counts["cases"] += 1
    _counts["frames"] += len(frames)
    _check_replies(_exchange(port, b"".join(frames)))
    assert proc.poll() is None, "kvbm serve died"
    if _counts["cases"] % 50 == 0:
        _roundtrip(port, data_path)


def test_server_survived_the_fuzz_with_no_traceback(server, capsys):
    proc, port, data_path, log = server
    assert _counts["cases"] > 0
    assert proc.poll() is None
    _roundtrip(port, data_path)
    log.flush()
    log.seek(0)
    err = log.read()
    assert "Traceback" not in err and "connection failed" not in err, err[-4000:]
    with capsys.disabled():
        print(f"\nserve protocol fuzz ({data_path} server): {_counts['cases']} cases, {_counts['frames']} frames, "
              f"replies {dict(sorted((k, v) for k, v in _counts.items() if k.startswith('status')))}; "
              "0 crashes, 0 tracebacks, byte-exact round trips after")
