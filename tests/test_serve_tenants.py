"""Tenants of ``kvbm serve`` tried as an attacker would (issue 12, findings 1-3): stale bytes,
cross-tenant reads and poisoning, idle unauthenticated connections, a PUT header with no data."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from kvbm.errors import ConfigError, PeerError
from kvbm.serve import ServeConfig, StoreServer
from kvbm.serve_protocol import (
    FRAME,
    OP_GET,
    OP_HELLO,
    OP_PUT,
    PUT_HEAD,
    ST_AUTH,
    ST_OK,
    U32,
    hello_body,
)
from kvbm.serve_tenants import load_token_file, parse_tokens
from kvbm.tiers.remote import HEADER_SIZE, encode_header, namespace_digest
from kvbm.tiers.serve_client import ServeClientTier, ServerFullError

BB = 4096


def rand_hashes(n: int) -> list[bytes]:
    return [os.urandom(16) for _ in range(n)]


def rand_blocks(n: int, size: int = BB) -> np.ndarray:
    return np.random.default_rng().integers(0, 256, (n, size), np.uint8)


def reply(s: socket.socket) -> tuple[int, int, bytes]:
    op, st, _, blen = FRAME.unpack(s.recv(FRAME.size, socket.MSG_WAITALL))
    return op, st, s.recv(blen, socket.MSG_WAITALL) if blen else b""


def closed_by_server(s: socket.socket) -> bool:
    """Whether the server closed ``s`` (within 5 s); closes it."""
    s.settimeout(5)
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True
    finally:
        s.close()


def raw_hello(port: int, token: bytes, block_bytes: int, ns: bytes, tenant: bytes = b"") -> tuple[socket.socket, int]:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    body = hello_body(token, block_bytes, ns, tenant)
    s.sendall(FRAME.pack(OP_HELLO, 0, 0, len(body)) + body)
    return s, reply(s)[1]


def raw_put(s: socket.socket, ns: bytes, hs: list[bytes], rows: np.ndarray) -> bytes:
    recs = b"".join(encode_header(ns, h, r) + r.tobytes() for h, r in zip(hs, rows))
    s.sendall(FRAME.pack(OP_PUT, 0, 0, PUT_HEAD.size + 16 * len(hs) + len(recs)) + PUT_HEAD.pack(len(hs), 0)
              + b"".join(hs) + recs)
    return reply(s)[2]


def raw_get(s: socket.socket, hs: list[bytes]) -> bytes:
    s.sendall(FRAME.pack(OP_GET, 0, 0, 4 + 16 * len(hs)) + U32.pack(len(hs)) + b"".join(hs))
    return reply(s)[2]


TOKENS = {"tok-alice": ["alice"], "tok-bob": ["bob"], "tok-carol": ["carol", "shared"], "tok-dave": ["shared"]}


@pytest.fixture
def tenants():
    with StoreServer(ServeConfig(capacity_bytes=64 * (BB + HEADER_SIZE), max_block_bytes=BB, tokens=TOKENS,
                                 max_batch=64)) as srv:
        yield srv


# ---- finding 1: a GET sends exactly the stored record ------------------------------------------
def test_reader_declaring_a_larger_block_gets_no_stale_bytes_of_another_tenant():
    """A tenant stores 1-byte blocks over a victim's evicted ones, then reconnects declaring 4 KiB
    blocks and asks for its own hashes: it gets misses, never the slot's stale bytes."""
    n = 8
    with StoreServer(ServeConfig(capacity_bytes=n * (BB + HEADER_SIZE), max_block_bytes=BB,
                                 tokens={"v": ["victim"], "a": ["attacker"]})) as srv:
        secret = rand_blocks(n)
        with ServeClientTier(srv.url, block_bytes=BB, namespace="m", token="v") as victim:
            assert victim.put(rand_hashes(n), secret).all()
        port = srv.address[1]
        ns = namespace_digest("m")
        s, st = raw_hello(port, b"a", 1, ns)
        assert st == ST_OK
        hs = rand_hashes(n)
        assert raw_put(s, ns, hs, rand_blocks(n, 1)) == b"\1" * n  # evicts all of the victim's blocks
        assert srv.stats()["evictions"] == n
        s.close()
        s, st = raw_hello(port, b"a", BB, ns)
        assert st == ST_OK
        body = raw_get(s, hs)
        s.close()
        assert body == b"\0" * n, f"{len(body)} bytes came back for blocks stored with another size"
        stale = secret.tobytes()
        assert not any(stale[i:i + 32] in body for i in range(0, len(stale), 32))
        s, _ = raw_hello(port, b"a", 1, ns)  # the right size gets exactly its 57-byte records
        assert len(raw_get(s, hs)) == n + n * (HEADER_SIZE + 1)
        s.close()


def test_a_slot_whose_header_does_not_match_is_a_counted_miss(tenants):
    with ServeClientTier(tenants.url, block_bytes=BB, namespace="m", token="tok-alice") as t:
        hs, data = rand_hashes(3), rand_blocks(3)
        assert t.put(hs, data).all()
        slots = [s for s in range(tenants._arena.num_slots)
                 if bytes(memoryview(tenants._arena.view(s))[24:40]) == hs[1]]  # the header's hash field
        assert len(slots) == 1
        view = memoryview(tenants._arena.view(slots[0])).cast("B")
        view[24] ^= 1  # memory damage: the record names another block
        out = np.zeros_like(data)
        assert t.get(hs, out).tolist() == [True, False, True]
        np.testing.assert_array_equal(out[[0, 2]], data[[0, 2]])
        assert tenants.stats()["record_mismatches"] == 1


# ---- finding 2: the namespace comes from the credential -----------------------------------------
def test_another_tenant_can_neither_read_nor_poison_blocks(tenants):
    hs, mine, forged = rand_hashes(6), rand_blocks(6), rand_blocks(6)
    # same client namespace ("model"), same hashes: only the tokens differ
    with ServeClientTier(tenants.url, block_bytes=BB, namespace="model", token="tok-bob") as bob:
        assert bob.put(hs[3:], forged[3:]).all()  # forged blocks planted first
        with ServeClientTier(tenants.url, block_bytes=BB, namespace="model", token="tok-alice") as alice:
            assert alice.lookup_prefix(hs) == 0 and alice.lookup_prefix(hs[3:]) == 0
            assert alice.put(hs[:3], mine[:3]).all()
            assert bob.lookup_prefix(hs) == 0
            assert not bob.get(hs[:3], np.zeros((3, BB), np.uint8)).any()
            assert alice.put(hs[3:], mine[3:]).all()
            out = np.zeros_like(mine)
            assert alice.get(hs, out).all()
            np.testing.assert_array_equal(out, mine)
        out = np.zeros((3, BB), np.uint8)
        assert bob.get(hs[3:], out).all()
        np.testing.assert_array_equal(out, forged[3:])  # bob's own partition is his


def test_a_token_may_use_only_its_own_namespaces(tenants):
    with pytest.raises(PeerError, match="token refused for namespace 'alice'"):
        ServeClientTier(tenants.url + "/alice", block_bytes=BB, namespace="m", token="tok-bob")
    with pytest.raises(PeerError, match="token refused"):
        ServeClientTier(tenants.url, block_bytes=BB, namespace="m", token=None)
    with pytest.raises(PeerError, match="token refused"):
        ServeClientTier(tenants.url, block_bytes=BB, namespace="m", token="tok-alic")
    hs, data = rand_hashes(4), rand_blocks(4)
    with ServeClientTier(tenants.url + "/shared", block_bytes=BB, namespace="m", token="tok-carol") as carol, \
            ServeClientTier(tenants.url, block_bytes=BB, namespace="m", token="tok-dave") as dave, \
            ServeClientTier(tenants.url, block_bytes=BB, namespace="m", token="tok-carol") as carol_own:
        assert carol.put(hs, data).all()
        out = np.zeros_like(data)
        assert dave.get(hs, out).all()  # both credentials grant "shared"
        np.testing.assert_array_equal(out, data)
        assert carol_own.lookup_prefix(hs) == 0  # carol's default namespace is "carol"
    assert tenants.stats()["refused_auth"] == 3


def test_without_tokens_the_server_is_single_tenant_and_loopback_only():
    with StoreServer(ServeConfig(capacity_bytes=1 << 20, max_block_bytes=BB)) as srv:
        with pytest.raises(PeerError, match="token refused for namespace 'alice'"):
            ServeClientTier(srv.url + "/alice", block_bytes=BB, namespace="m")
        with ServeClientTier(srv.url + "/default", block_bytes=BB, namespace="m") as t:
            assert t.put(rand_hashes(1), rand_blocks(1)).all()
    with pytest.raises(ConfigError, match="requires a token"):
        ServeConfig(host="0.0.0.0").validate()
    assert "loopback only, single tenant" in ServeConfig().describe_tenancy()
    with pytest.raises(ConfigError, match="ucx"):
        ServeConfig(tokens=TOKENS, data_path="ucx").validate()


def test_token_file_format(tmp_path):
    assert parse_tokens("# comment\n\n  a1  ns1 ns2 ns1\nb2\n") == {"a1": ("ns1", "ns2"), "b2": ("default",)}
    for bad, why in [("", "no token"), ("a x\na y\n", "line 2: this token appears twice"),
                     ("a " + "n" * 300, "longer than 256")]:
        with pytest.raises(ConfigError, match=why):
            parse_tokens(bad)
    p = tmp_path / "tokens"
    p.write_bytes(b"tok\xff ns\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_token_file(p)
    with pytest.raises(ConfigError, match="cannot read"):
        load_token_file(tmp_path / "missing")


def test_cli_rejects_nan_timeouts_and_huge_sizes_and_names_the_tenancy(tmp_path, capsys, monkeypatch):
    from kvbm.cli import main

    monkeypatch.delenv("KVBM_SERVE_TOKEN", raising=False)
    env = dict(os.environ)
    bad_file = tmp_path / "latin1"
    bad_file.write_bytes(b"t\xe9 ns\n")
    for args, why in [(["--idle-timeout", "nan"], "idle_timeout_s"), (["--capacity", "9" * 400], "--capacity"),
                      (["--put-timeout", "inf"], "put_timeout_s"), (["--capacity", "1e400"], "--capacity"),
                      (["--hello-timeout", "-1"], "hello_timeout_s"), (["--token-file", str(bad_file)], "--token-file"),
                      (["--put-reserve", "1" + "0" * 300], "--put-reserve")]:
        assert main(["serve", *args]) == 2
        err = capsys.readouterr().err
        assert f"ConfigError: {why}" in err, err
    tf = tmp_path / "tokens"
    tf.write_text("tA alice\ntB bob\n")
    proc = subprocess.Popen([sys.executable, "-m", "kvbm", "serve", "--capacity", "4MiB", "--max-block-bytes", "4KiB",
                             "--token-file", str(tf)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    try:
        line = proc.stdout.readline()
        assert "per-tenant tokens: 2 credentials, 2 namespaces" in line, line
    finally:
        proc.terminate()
        proc.wait(30)


# ---- finding 3: denial of service -----------------------------------------------------------------
def test_idle_unauthenticated_connections_do_not_lock_clients_out():
    cfg = ServeConfig(capacity_bytes=1 << 20, max_block_bytes=BB, max_clients=8, max_handshakes=8,
                      hello_timeout_s=1.0, token="tok")
    with StoreServer(cfg) as srv:
        idle = [socket.create_connection(srv.address, timeout=10) for _ in range(64)]
        slow = socket.create_connection(srv.address, timeout=10)  # a HELLO trickled byte by byte
        slow.sendall(FRAME.pack(OP_HELLO, 0, 0, 200)[:3])
        t0 = time.monotonic()
        with ServeClientTier(srv.url, block_bytes=BB, namespace="m", token="tok", connections=2) as t:
            hs, data = rand_hashes(4), rand_blocks(4)
            assert t.put(hs, data).all()
            out = np.zeros_like(data)
            assert t.get(hs, out).all()
            np.testing.assert_array_equal(out, data)
        assert time.monotonic() - t0 < 5
        deadline = time.monotonic() + 10
        while srv.stats()["pending_handshakes"]:  # every waiting connection is gone by its deadline
            assert time.monotonic() < deadline, srv.stats()
            time.sleep(0.05)
        s = srv.stats()
        assert s["handshake_timeouts"] + s["handshakes_dropped"] >= 65 and s["refused_busy"] == 0
        for c in [*idle, slow]:
            assert closed_by_server(c)


def test_a_client_that_finds_the_server_full_is_told_so():
    with StoreServer(ServeConfig(capacity_bytes=1 << 20, max_block_bytes=BB, max_clients=2)) as srv:
        a = ServeClientTier(srv.url, block_bytes=BB, namespace="m", connections=1)
        b = ServeClientTier(srv.url, block_bytes=BB, namespace="m", connections=1)
        with pytest.raises(ServerFullError, match=r"is full.*max-clients.*all 2 client connections"):
            ServeClientTier(srv.url, block_bytes=BB, namespace="m")
        assert srv.stats()["refused_busy"] == 1
        a.close()
        b.close()
    with StoreServer(ServeConfig(capacity_bytes=1 << 20, max_block_bytes=BB, max_clients_per_peer=1)) as srv, \
            ServeClientTier(srv.url, block_bytes=BB, namespace="m", connections=1), \
            pytest.raises(ServerFullError, match="max_clients_per_peer"):
        ServeClientTier(srv.url, block_bytes=BB, namespace="m")


def test_a_put_header_without_data_reserves_one_window_and_times_out():
    slots = 256
    cfg = ServeConfig(capacity_bytes=slots * (BB + HEADER_SIZE), max_block_bytes=BB, max_batch=1024, token="tok",
                      put_reserve_bytes=16 * (BB + HEADER_SIZE), put_timeout_s=1.0)
    with StoreServer(cfg) as srv:
        victim = ServeClientTier(srv.url, block_bytes=BB, namespace="m", token="tok")
        hs, data = rand_hashes(180), rand_blocks(180)
        assert victim.put(hs, data).all()
        ns = namespace_digest("m")
        s, st = raw_hello(srv.address[1], b"tok", BB, ns)
        assert st == ST_OK
        n = 1024
        s.sendall(FRAME.pack(OP_PUT, 0, 0, PUT_HEAD.size + n * (16 + HEADER_SIZE + BB)) + PUT_HEAD.pack(n, 1)
                  + b"".join(rand_hashes(n)))  # ... and never the records
        time.sleep(0.2)
        assert srv.stats()["used_blocks"] <= 180 + 16 and srv.stats()["evictions"] == 0
        other = ServeClientTier(srv.url, block_bytes=BB, namespace="m2", token="tok")
        hs2, data2 = rand_hashes(40), rand_blocks(40)
        assert other.put(hs2, data2).all()  # other PUTs go on
        out = np.zeros_like(data)
        assert victim.get(hs, out).all()  # nobody was evicted
        np.testing.assert_array_equal(out, data)
        assert closed_by_server(s)  # dropped after put_timeout_s
        deadline = time.monotonic() + 5
        while srv.stats()["used_blocks"] != 220:
            assert time.monotonic() < deadline, srv.stats()
            time.sleep(0.05)
        assert srv.stats()["request_timeouts"] == 1
        victim.close()
        other.close()


def test_hello_with_another_tenants_name_but_a_valid_token_is_refused_raw(tenants):
    s, st = raw_hello(tenants.address[1], b"tok-bob", BB, namespace_digest("m"), b"alice")
    assert st == ST_AUTH
    s.close()
