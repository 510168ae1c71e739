"""``kvbm serve`` and ServeClientTier over loopback TCP (the data path tested here is TCP)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from kvbm.errors import ConfigError, PeerError
from kvbm.serve import ServeConfig, StoreServer
from kvbm.serve_protocol import FRAME, OP_GET, OP_HELLO, ST_AUTH, ST_ERR, ST_OK
from kvbm.tiers import open_remote_tier
from kvbm.tiers import serve_client as sc
from kvbm.tiers.serve_client import ServeClientTier

HERE = Path(__file__).parent


def rand_hashes(n: int) -> list[bytes]:
    return [os.urandom(16) for _ in range(n)]


def rand_blocks(n: int, size: int) -> np.ndarray:
    return np.random.default_rng().integers(0, 256, (n, size), np.uint8)


def _ucx_skip() -> str | None:
    from kvbm.transfer import ucx_available

    ok, why = ucx_available()
    return None if ok else why


@pytest.fixture(params=["tcp", "ucx"])
def data_path(request):
    if request.param == "ucx" and _ucx_skip():
        pytest.skip(f"ucx data path: {_ucx_skip()}")
    return request.param


@pytest.fixture
def server(data_path):
    with StoreServer(ServeConfig(capacity_bytes=8 << 20, max_block_bytes=4096, token="sesame",
                                 max_batch=64, data_path=data_path)) as srv:
        yield srv


def client(srv: StoreServer, **kw) -> ServeClientTier:
    kw.setdefault("data_path", srv.config.data_path)
    kw.setdefault("block_bytes", 4096)
    kw.setdefault("namespace", "t")
    kw.setdefault("token", "sesame")
    return ServeClientTier(srv.url, **kw)


def test_roundtrip_prefix_and_batches_larger_than_max_batch(server):
    with client(server) as t:
        assert t.using_ucx == (server.config.data_path == "ucx")
        hs, data = rand_hashes(150), rand_blocks(150, 4096)  # 150 > max_batch 64: split
        assert t.put(hs, data).all()
        assert t.lookup_prefix(hs) == 150
        out = np.zeros_like(data)
        assert t.get(hs, out).all()
        np.testing.assert_array_equal(out, data)
        missing = rand_hashes(1)
        assert t.lookup_prefix(hs[:70] + missing + hs[70:]) == 70
        ok = t.get(hs[:3] + missing + hs[3:5], np.zeros((6, 4096), np.uint8))
        assert ok.tolist() == [True, True, True, False, True, True]
        s = server.stats()
        assert s["blocks_stored"] == 150 and s["used_blocks"] == 150 and s["refused_auth"] == 0
    assert isinstance(open_remote_tier(server.url, block_bytes=64, namespace="x", token="sesame"), ServeClientTier)


def test_wrong_or_missing_token_is_refused(server):
    with pytest.raises(PeerError, match="token refused"):
        client(server, token="wrong")
    with pytest.raises(PeerError, match="token refused"):
        client(server, token=None)
    assert server.stats()["refused_auth"] == 2


def test_block_size_the_server_cannot_hold_is_refused(server):
    with pytest.raises(PeerError, match="outside 1..4096"):
        client(server, block_bytes=4097)


def test_namespaces_are_isolated(server):
    a, b = client(server, namespace="tenant-a"), client(server, namespace="tenant-b")
    hs = rand_hashes(5)
    da, db = rand_blocks(5, 4096), rand_blocks(5, 4096)
    assert a.put(hs, da).all()
    assert b.lookup_prefix(hs) == 0
    assert not b.get(hs, np.zeros_like(db)).any()
    assert b.put(hs, db).all()
    oa, ob = np.zeros_like(da), np.zeros_like(db)
    assert a.get(hs, oa).all() and b.get(hs, ob).all()
    np.testing.assert_array_equal(oa, da)
    np.testing.assert_array_equal(ob, db)
    a.close()
    b.close()


def test_bad_records_are_refused_and_never_visible(server, monkeypatch):
    t = client(server)
    hs, data = rand_hashes(4), rand_blocks(4, 4096)
    real = sc.encode_header

    def bad_crc_for_second(ns, h, row):
        hdr = bytearray(real(ns, h, row))
        if h == hs[1]:
            hdr[48] ^= 0xFF  # the CRC32C field
        return bytes(hdr)

    monkeypatch.setattr(sc, "encode_header", bad_crc_for_second)
    assert t.put(hs, data).tolist() == [True, False, True, True]
    assert t.lookup_prefix(hs) == 1
    assert server.stats()["blocks_rejected"] == 1
    monkeypatch.setattr(sc, "encode_header", real)
    assert t.put(hs, data).all()  # a good retry is accepted
    out = np.zeros_like(data)
    assert t.get(hs, out).all()
    np.testing.assert_array_equal(out, data)
    t.close()


def test_eviction_never_serves_wrong_bytes():
    with StoreServer(ServeConfig(capacity_bytes=40 * (4096 + 56), max_block_bytes=4096)) as srv:
        t = ServeClientTier(srv.url, block_bytes=4096, namespace="e")
        hs, data = rand_hashes(100), rand_blocks(100, 4096)
        for i in range(0, 100, 10):
            assert t.put(hs[i:i + 10], data[i:i + 10]).all()
        out = np.zeros_like(data)
        ok = t.get(hs, out)
        assert ok.sum() == 40 and ok[-10:].all()  # LRU kept the newest
        np.testing.assert_array_equal(out[ok], data[ok])
        assert srv.stats()["evictions"] == 60
        t.close()


def test_server_down_degrades_to_misses_then_recovers(data_path):
    srv = StoreServer(ServeConfig(capacity_bytes=1 << 20, max_block_bytes=4096, data_path=data_path)).start()
    port = srv.address[1]
    t = ServeClientTier(srv.url, block_bytes=4096, namespace="d", timeout_s=1.0, retry_interval_s=0.2,
                        data_path=data_path)
    hs, data = rand_hashes(8), rand_blocks(8, 4096)
    assert t.put(hs, data).all()
    srv.close()
    for _ in range(10):
        assert t.lookup_prefix(hs) == 0
        assert not t.get(hs, np.zeros_like(data)).any()
        assert not t.put(hs, data).any()
    assert t.stats()["errors"] >= 1 and not t.stats()["available"]
    srv2 = StoreServer(ServeConfig(port=port, capacity_bytes=1 << 20, max_block_bytes=4096,
                                   data_path=data_path)).start()
    try:
        deadline = time.monotonic() + 10
        while not t.put(hs, data).all():
            assert time.monotonic() < deadline, "did not recover"
            time.sleep(0.05)
        out = np.zeros_like(data)
        assert t.get(hs, out).all()
        np.testing.assert_array_equal(out, data)
        assert t.using_ucx == (data_path == "ucx")  # fresh transfer-engine metadata from the new server
    finally:
        t.close()
        srv2.close()


def test_unreachable_server_at_start_is_a_degraded_tier_not_an_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = ServeClientTier(f"kvbm://127.0.0.1:{port}", block_bytes=64, namespace="x", timeout_s=0.5)
    assert t.lookup_prefix(rand_hashes(2)) == 0 and not t.stats()["available"]
    t.close()


def _raw_hello(port: int, token: bytes = b"sesame") -> socket.socket:
    from kvbm.serve_protocol import hello_body

    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    body = hello_body(token, 4096, b"n" * 16, b"")
    s.sendall(FRAME.pack(OP_HELLO, 0, 0, len(body)) + body)
    op, st, _, blen = FRAME.unpack(s.recv(FRAME.size, socket.MSG_WAITALL))
    s.recv(blen, socket.MSG_WAITALL)
    assert st == (ST_OK if token == b"sesame" else ST_AUTH)
    return s


def _reply(s: socket.socket) -> tuple[int, bytes]:
    op, st, _, blen = FRAME.unpack(s.recv(FRAME.size, socket.MSG_WAITALL))
    return st, s.recv(blen, socket.MSG_WAITALL)


def test_malformed_requests_get_an_error_and_the_server_goes_on(server):
    port = server.address[1]
    s = _raw_hello(port)
    s.sendall(FRAME.pack(99, 0, 0, 0))
    assert _reply(s) == (ST_ERR, b"unknown op 99")
    assert s.recv(1) == b""  # closed
    s = _raw_hello(port)
    s.sendall(FRAME.pack(OP_GET, 0, 0, 4) + (1000).to_bytes(4, "little"))
    st, msg = _reply(s)
    assert st == ST_ERR and b"exceeds max_batch 64" in msg
    s = _raw_hello(port)
    s.sendall(FRAME.pack(OP_GET, 0, 0, 20) + (2).to_bytes(4, "little") + b"x" * 16)
    st, msg = _reply(s)
    assert st == ST_ERR and b"does not match 2 blocks" in msg
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(b"GET / HTTP/1.1\r\n\r\n")
    st, msg = _reply(s)
    assert st == ST_ERR
    _raw_hello(port, token=b"nope").close()
    with client(server) as t:  # still serving
        hs, d = rand_hashes(2), rand_blocks(2, 4096)
        assert t.put(hs, d).all() and t.lookup_prefix(hs) == 2
    assert server.stats()["protocol_errors"] == 4


def test_bad_config():
    with pytest.raises(ConfigError, match="requires a token"):
        StoreServer(ServeConfig(host="0.0.0.0"))
    with pytest.raises(ConfigError, match="capacity_bytes"):
        StoreServer(ServeConfig(capacity_bytes=100, max_block_bytes=4096))
    with pytest.raises(ConfigError, match="kvbm://host:port"):
        ServeClientTier("kvbm://127.0.0.1", block_bytes=64, namespace="x")


def _start_cli(tmp_path: Path, token: str, *extra: str) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, KVBM_SERVE_TOKEN=token)
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvbm", "serve", "--port", "0", "--capacity", "64MiB", "--max-block-bytes", "4KiB",
         *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    m = re.search(r"listening on (kvbm://127\.0\.0\.1:\d+)", line)
    if not m:
        proc.kill()
        raise AssertionError(f"kvbm serve did not start: {line!r} {proc.stderr.read()}")
    return proc, m.group(1)


def test_cli_serve_with_8_client_processes(tmp_path, data_path):
    """8 clients x 1,000 mixed ops at once: no errors, no lost or wrong blocks; a wrong token is refused."""
    proc, url = _start_cli(tmp_path, "s3cret", "--data-path", data_path)
    try:
        env = dict(os.environ, KVBM_SERVE_TOKEN="s3cret")
        clients = [subprocess.Popen([sys.executable, str(HERE / "serve_load.py"), "--url", url, "--client", str(i),
                                     "--ops", "1000", "--pool", "2000", "--seconds", "240", "--data-path", data_path],
                                    env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                   for i in range(8)]
        bad = subprocess.run([sys.executable, str(HERE / "serve_load.py"), "--url", url, "--ops", "1"],
                             env=dict(os.environ, KVBM_SERVE_TOKEN="guess"), capture_output=True, text=True,
                             timeout=60)
        assert bad.returncode != 0 and "token refused" in bad.stderr
        results = []
        for c in clients:
            out, err = c.communicate(timeout=300)
            assert c.returncode == 0, err
            results.append(json.loads(out))
        assert [r["ops"] for r in results] == [1000] * 8
        assert all(r["using_ucx"] == (data_path == "ucx") for r in results)
        assert sum(r["errors"] for r in results) == 0
        assert sum(r["wrong"] for r in results) == 0
        assert sum(r["lost"] for r in results) == 0
        # every block any client stored is there, with its bytes, for a fresh client too
        sys.path.insert(0, str(HERE))
        from serve_load import block_data, block_hash

        stored = sorted({i for r in results for i in r["stored"]})
        assert len(stored) > 1000
        t = ServeClientTier(url, block_bytes=4096, namespace="load-4096", token="s3cret", data_path=data_path)
        hs = [block_hash(i) for i in stored]
        out = np.zeros((len(hs), 4096), np.uint8)
        assert t.get(hs, out).all()
        for row, h in zip(out, hs):
            np.testing.assert_array_equal(row, block_data(h, 4096))
        st = t.server_stats()
        assert st["refused_auth"] == 1 and st["protocol_errors"] == 0 and st["evictions"] == 0
        t.close()
    finally:
        proc.terminate()
        proc.wait(30)
    assert proc.returncode == 0


def test_ucx_client_vanishing_mid_batch_releases_its_slots():
    if _ucx_skip():
        pytest.skip(f"ucx data path: {_ucx_skip()}")
    from kvbm.serve_protocol import OP_GET_PIN, OP_PUT_PREP, PUT_HEAD, U32

    with StoreServer(ServeConfig(capacity_bytes=1 << 20, max_block_bytes=4096, token="sesame",
                                 data_path="ucx")) as srv:
        hs, data = rand_hashes(4), rand_blocks(4, 4096)
        with ServeClientTier(srv.url, block_bytes=4096, namespace=b"n" * 16, token="sesame") as t:
            assert t.using_ucx and t.put(hs[:2], data[:2]).all()
        s = _raw_hello(srv.address[1])  # namespace b"n"*16, block_bytes 4096, like t
        s.sendall(FRAME.pack(OP_PUT_PREP, 0, 0, PUT_HEAD.size + 32) + PUT_HEAD.pack(2, 1) + b"".join(hs[2:]))
        st, body = _reply(s)
        assert st == ST_OK and list(body[:2]) == [2, 2]  # two slots reserved for writing
        s2 = _raw_hello(srv.address[1])
        s2.sendall(FRAME.pack(OP_GET_PIN, 0, 0, 4 + 32) + U32.pack(2) + b"".join(hs[:2]))
        st, body = _reply(s2)
        assert st == ST_OK and list(body[:2]) == [1, 1]
        assert srv._mgr.stats()["host"]["pinned_blocks"] == 2
        s.close()  # vanish without PUT_COMMIT / GET_DONE
        s2.close()
        deadline = time.monotonic() + 5
        while srv._mgr.stats()["host"]["pinned_blocks"] or srv._mgr.stats()["host"]["used_blocks"] != 2:
            assert time.monotonic() < deadline, srv._mgr.stats()["host"]
            time.sleep(0.02)
        with ServeClientTier(srv.url, block_bytes=4096, namespace=b"n" * 16, token="sesame") as t:
            assert t.lookup_prefix(hs) == 2  # the reserved, never-committed blocks are not visible
            assert t.put(hs, data).all()
            out = np.zeros_like(data)
            assert t.get(hs, out).all()
            np.testing.assert_array_equal(out, data)


def test_ucx_required_but_not_offered_is_refused():
    if _ucx_skip():
        pytest.skip(f"ucx data path: {_ucx_skip()}")
    with StoreServer(ServeConfig(capacity_bytes=1 << 20, max_block_bytes=4096)) as srv:
        with pytest.raises(PeerError, match="does not offer the ucx data path"):
            ServeClientTier(srv.url, block_bytes=64, namespace="x", data_path="ucx")
        with ServeClientTier(srv.url, block_bytes=64, namespace="x") as t:  # auto: TCP
            assert not t.using_ucx and t.put(rand_hashes(1), rand_blocks(1, 64)).all()


def test_frozen_server_process_times_out_to_misses_and_recovers(tmp_path):
    import signal

    from redis_server import stop_process

    proc, url = _start_cli(tmp_path, "tok")
    try:
        t = ServeClientTier(url, block_bytes=4096, namespace="f", token="tok", timeout_s=0.5, retry_interval_s=0.3)
        hs, data = rand_hashes(4), rand_blocks(4, 4096)
        assert t.put(hs, data).all()
        stop_process(proc.pid)
        try:
            t0 = time.monotonic()
            for _ in range(10):
                assert t.lookup_prefix(hs) == 0
                assert not t.get(hs, np.zeros_like(data)).any()
            assert time.monotonic() - t0 < 5
            assert t.stats()["errors"] >= 1
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        deadline = time.monotonic() + 10
        out = np.zeros_like(data)
        while not t.get(hs, out).all():
            assert time.monotonic() < deadline, "did not recover after SIGCONT"
            time.sleep(0.1)
        np.testing.assert_array_equal(out, data)
        t.close()
    finally:
        proc.terminate()
        proc.wait(30)


def test_pooled_connection_closed_by_the_server_while_idle_is_replaced(data_path):
    with StoreServer(ServeConfig(capacity_bytes=1 << 20, max_block_bytes=4096, idle_timeout_s=0.2,
                                 data_path=data_path)) as srv:
        t = ServeClientTier(srv.url, block_bytes=4096, namespace="i", data_path=data_path)
        hs, data = rand_hashes(3), rand_blocks(3, 4096)
        assert t.put(hs, data).all()
        time.sleep(0.6)  # the server closes the idle connection
        out = np.zeros_like(data)
        assert t.get(hs, out).all()
        np.testing.assert_array_equal(out, data)
        assert t.stats()["errors"] == 0 and srv.stats()["connections"] == 2
        t.close()
