"""``kvbm serve`` as a service: real processes, real sockets, real SIGTERM (see Note [Serve service])."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from kvbm.service import HEALTH_PATH, METRICS_PATH
from kvbm.tiers.serve_client import ServeClientTier

BB = 4096
REPO = Path(__file__).resolve().parent.parent


def _block(h: bytes) -> np.ndarray:
    """The content oracle: a block's bytes follow from its hash."""
    return np.frombuffer(hashlib.shake_128(h).digest(BB), np.uint8)


class Serve:
    def __init__(self, tmp: Path, disk: Path, *extra: str) -> None:
        self.pf, self.hf = tmp / f"port.{time.monotonic_ns()}", tmp / f"http.{time.monotonic_ns()}"
        self.log = tmp / f"serve.{time.monotonic_ns()}.log"
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self._logf = open(self.log, "w")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kvbm", "serve", "--port", "0", "--port-file", str(self.pf), "--http-port", "0",
             "--http-port-file", str(self.hf), "--capacity", "8MiB", "--max-block-bytes", str(BB),
             "--disk-path", str(disk), "--disk-capacity", "64MiB", *extra],
            env=env, stdout=self._logf, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while not (self.pf.exists() and self.hf.exists() and self.pf.read_text().strip()
                   and self.hf.read_text().strip()):
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, "kvbm serve did not start"
            time.sleep(0.05)
        self.url = f"kvbm://127.0.0.1:{int(self.pf.read_text())}"
        self.http = f"http://127.0.0.1:{int(self.hf.read_text())}"

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            r = urllib.request.urlopen(self.http + path, timeout=10)
            return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def wait(self, timeout: float = 60) -> int:
        rc = self.proc.wait(timeout=timeout)
        self._logf.close()
        return rc


def test_health_metrics_and_json_logs(tmp_path: Path) -> None:
    srv = Serve(tmp_path, tmp_path / "disk", "--log-format", "json")
    try:
        code, body = srv.get(HEALTH_PATH)
        assert code == 200 and json.loads(body)["status"] == "ok"
        hs = [os.urandom(16) for _ in range(8)]
        with ServeClientTier(srv.url, block_bytes=BB, namespace="m") as t:
            assert t.put(hs, np.stack([_block(h) for h in hs]), chain=False).all()
            out = np.zeros((8, BB), np.uint8)
            assert t.get(hs, out).all()
        code, text = srv.get(METRICS_PATH)
        text = text.decode()
        assert code == 200
        assert "kvbm_serve_blocks_stored_total 8.0" in text
        assert 'kvbm_hits_total{tier="host"} 8.0' in text
        assert 'kvbm_capacity_blocks{tier="disk"}' in text
        assert srv.get("/nope")[0] == 404
    finally:
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.wait() == 0
    lines = [json.loads(ln) for ln in srv.log.read_text().splitlines() if ln.startswith("{")]
    assert any(d["logger"] == "kvbm.serve" and "stopped" in d["message"] and d["level"] == "INFO" for d in lines)


def test_sigterm_during_write_behind_loses_no_acknowledged_block(tmp_path: Path) -> None:
    """Three clients store blocks as fast as they can; SIGTERM arrives mid-stream. Every block the
    server acknowledged is served, byte-exact, by a new server process on the same disk tier."""
    disk = tmp_path / "disk"
    srv = Serve(tmp_path, disk)
    acked: list[bytes] = []
    lock = threading.Lock()
    stop = threading.Event()
    started = threading.Barrier(4)

    def writer(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            with ServeClientTier(srv.url, block_bytes=BB, namespace="w", timeout_s=5.0) as t:
                started.wait()
                for _ in range(40):  # at most 40 x 8 blocks per writer: fits the host tier
                    if stop.is_set():
                        return
                    hs = [rng.bytes(16) for _ in range(8)]
                    ok = t.put(hs, np.stack([_block(h) for h in hs]), chain=False)
                    with lock:
                        acked.extend(h for h, o in zip(hs, ok, strict=True) if o)
        except Exception:
            return  # the server went away mid-request: those blocks were not acknowledged

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(3)]
    for th in threads:
        th.start()
    started.wait()
    deadline = time.monotonic() + 30
    while len(acked) < 200 and time.monotonic() < deadline:
        time.sleep(0.01)
    srv.proc.send_signal(signal.SIGTERM)  # while the writers are still putting
    n_at_signal = len(acked)
    assert srv.wait() == 0, srv.log.read_text()
    stop.set()
    for th in threads:
        th.join(30)
    assert n_at_signal >= 200
    log = srv.log.read_text()
    assert '"drained": true' in log, log

    srv2 = Serve(tmp_path, disk)
    try:
        with ServeClientTier(srv2.url, block_bytes=BB, namespace="w") as t:
            out = np.zeros((len(acked), BB), np.uint8)
            present = t.get(acked, out)
        assert present.all(), f"{int((~present.astype(bool)).sum())} of {len(acked)} acknowledged blocks lost"
        for i, h in enumerate(acked):
            assert np.array_equal(out[i], _block(h))
        assert json.loads(srv2.get(HEALTH_PATH)[1])["restored_blocks"] >= len(acked)
    finally:
        srv2.proc.send_signal(signal.SIGTERM)
        assert srv2.wait() == 0


@pytest.mark.parametrize("bad", [["--http-port", "70000"], ["--disk-capacity", "0"]])
def test_bad_service_options_fail_naming_them(tmp_path: Path, bad: list[str]) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    args = [sys.executable, "-m", "kvbm", "serve", "--disk-path", str(tmp_path / "d"), "--disk-capacity", "1MiB", *bad]
    p = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode != 0
    assert ("http_port" in p.stderr) or ("disk_capacity_bytes" in p.stderr), p.stderr


@pytest.mark.parametrize("data_path", ["tcp", "ucx"])
def test_restart_keeps_blocks_stored_over_either_data_path(tmp_path: Path, data_path: str) -> None:
    from kvbm.serve import ServeConfig, StoreServer
    from kvbm.service import Service, ServiceOptions
    from kvbm.transfer import ucx_available

    if data_path == "ucx" and not ucx_available()[0]:
        pytest.skip(f"ucx data path: {ucx_available()[1]}")
    opts = ServiceOptions(disk_path=str(tmp_path / "d"), disk_capacity_bytes=16 << 20)

    def service() -> Service:
        return Service(StoreServer(ServeConfig(capacity_bytes=4 << 20, max_block_bytes=BB, data_path=data_path)),
                       opts).start()

    hs = [os.urandom(16) for _ in range(64)]
    data = np.stack([_block(h) for h in hs])
    svc = service()
    try:
        with ServeClientTier(svc.server.url, block_bytes=BB, namespace="r", data_path=data_path) as t:
            assert t.put(hs, data, chain=False).all()
            assert t.using_ucx == (data_path == "ucx")
    finally:
        assert svc.shutdown()["drained"]
    svc = service()
    try:
        assert svc.restored == 64
        with ServeClientTier(svc.server.url, block_bytes=BB, namespace="r", data_path=data_path) as t:
            out = np.zeros_like(data)
            assert t.get(hs, out).all()
            np.testing.assert_array_equal(out, data)
    finally:
        svc.shutdown()
