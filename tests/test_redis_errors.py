"""Issue 12 finding 11: whatever a Redis server (or something pretending to be one) answers, the
Redis tier reports misses and counted failures, never a foreign exception.

Real ``redis-server`` for the ``/99`` database case; a hostile loopback TCP server that answers
every connection with protocol garbage for the parser cases.
"""

from __future__ import annotations

import socket
import threading

import numpy as np
import pytest

pytest.importorskip("redis")

from redis_server import RedisServer  # noqa: E402

from kvbm import BlockManager, KvbmConfig  # noqa: E402
from kvbm.errors import ConfigError, KvbmError  # noqa: E402
from kvbm.tiers.redis_tier import RedisTier  # noqa: E402

BB = 4096


@pytest.fixture(scope="module")
def server():
    try:
        srv = RedisServer().start()
    except RuntimeError as e:
        pytest.skip(str(e))
    yield srv
    srv.stop()


def _keys(n: int, salt: int = 0) -> list[bytes]:
    return [bytes([salt, i]) * 8 for i in range(n)]


def _exercise(t: RedisTier, n: int = 3) -> None:
    """lookup/get/put against a broken store: misses and failures, no exception."""
    keys = _keys(n)
    data = np.full((n, BB), 7, np.uint8)
    assert t.lookup_prefix(keys) == 0
    out = np.zeros((n, BB), np.uint8)
    assert not t.get(keys, out).any()
    assert not t.put(keys, data).any()


def test_missing_database_is_a_counted_miss(server):
    """``redis://.../99`` (no such DB): ResponseError on the first command escaped lookup before."""
    url = f"redis://127.0.0.1:{server.port}/99"
    t = RedisTier(url, block_bytes=BB, namespace="db99", timeout_s=1.0, retry_interval_s=0.0)
    try:
        _exercise(t)
        s = t.stats()
        assert s["errors"] >= 3 and s["misses"] == 3 and s["get_misses"] == 3 and s["store_failures"] == 3
        assert "ResponseError" in (s["last_error"] or "")
    finally:
        t.close()


def test_manager_counts_failed_background_writes(server):
    """Write-through puts run in the background; against DB 99 each failed block is counted."""
    cfg = KvbmConfig(block_bytes=BB, host_capacity_bytes=BB * 16, remote_url=f"redis://127.0.0.1:{server.port}/99",
                     remote_timeout_s=1.0)
    with BlockManager(cfg) as m:
        keys = _keys(4, salt=1)
        assert m.store(keys, np.ones((4, BB), np.uint8)) == 4
        m.flush_remote(timeout=30)
        r = m.stats()["remote"]
        assert r["store_failures"] == 4 and r["stored"] == 0 and r["errors"] >= 1
        assert m.lookup(keys).num_hits == 4  # the host tier still serves them
        assert m.lookup(_keys(2, salt=2)).num_hits == 0  # and a remote miss is just a miss


class HostileServer:
    """Accepts loopback connections and answers each with ``payload`` (after the first read), then closes."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.1)  # accept() wakes up to see _stop
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                c, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            with c:
                c.settimeout(2.0)
                try:
                    c.recv(65536)
                    c.sendall(self.payload)
                except OSError:
                    pass

    def close(self) -> None:
        self._stop = True
        self._thread.join(5)
        self.sock.close()


GARBAGE = {
    "random-bytes": bytes(np.random.default_rng(11).integers(0, 256, 4096, dtype=np.uint8)),
    "deep-nesting": b"*1\r\n" * 30000 + b":1\r\n",  # RecursionError in redis-py's parser
    "negative-length": b"$-7\r\n",
    "huge-array": b"*99999999999999999999\r\n",
    "bad-integer": b":notanumber\r\n",
    "unknown-type": b"!xyz\r\n",
    "http": b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n",
    "error-reply": b"-ERR no way\r\n",
    "empty-close": b"",
}


@pytest.mark.parametrize("kind", sorted(GARBAGE))
def test_protocol_garbage_is_a_counted_miss(kind):
    srv = HostileServer(GARBAGE[kind])
    try:
        t = RedisTier(f"redis://127.0.0.1:{srv.port}/0", block_bytes=BB, namespace="g", timeout_s=1.0,
                      retry_interval_s=0.0)
        try:
            _exercise(t)
            s = t.stats()
            assert s["errors"] >= 1, s
            assert s["hits"] == 0 and s["get_hits"] == 0 and s["stored"] == 0
            assert s["store_failures"] == 3
        finally:
            t.close()
        assert srv.connections >= 1
    finally:
        srv.close()


def test_garbage_through_the_manager():
    """A BlockManager whose remote store speaks garbage: lookups and loads of host blocks work."""
    srv = HostileServer(GARBAGE["deep-nesting"])
    try:
        cfg = KvbmConfig(block_bytes=BB, host_capacity_bytes=BB * 8, remote_url=f"redis://127.0.0.1:{srv.port}/0",
                         remote_timeout_s=1.0)
        with BlockManager(cfg) as m:
            keys = _keys(3, salt=3)
            data = np.arange(3 * BB, dtype=np.uint32).astype(np.uint8).reshape(3, BB)
            m.store(keys, data)
            m.flush_remote(timeout=30)
            out = np.zeros_like(data)
            m.load(keys, out)
            assert np.array_equal(out, data)
            assert m.lookup(keys + _keys(2, salt=4)).num_hits == 3
            assert m.prefetch(_keys(2, salt=5)).wait(30) == 0
            assert m.stats()["remote"]["store_failures"] == 3
    finally:
        srv.close()


@pytest.mark.parametrize(
    "url",
    ["redis://127.0.0.1:notaport/0", "redis://[::1/0", "redis://127.0.0.1:6379/notadb",
     "redis://u:s3cret@127.0.0.1:99999/0"],
)
def test_setup_errors_name_the_url(url):
    with pytest.raises(ConfigError) as ei:
        t = RedisTier(url, block_bytes=BB, namespace="s")
        t.close()
    msg = str(ei.value)
    assert "remote_url" in msg and ("127.0.0.1" in msg or "::1" in msg)
    assert "s3cret" not in msg  # a password in the URL is not echoed


@pytest.mark.parametrize("kw", [{"timeout_s": float("nan")}, {"timeout_s": "2"}, {"ttl_s": -1},
                                {"retry_interval_s": float("inf")}, {"max_batch": True}])
def test_bad_arguments_are_config_errors(kw):
    with pytest.raises(ConfigError):
        RedisTier("redis://127.0.0.1:1/0", block_bytes=BB, namespace="s", **kw)


def test_every_error_is_a_kvbm_error():
    assert issubclass(ConfigError, KvbmError)
