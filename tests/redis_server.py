"""A throwaway ``redis-server`` on 127.0.0.1 for tests and benchmarks (no persistence, temp dir).

``RedisServer.start()`` raises ``RuntimeError`` when the binary is missing (callers turn that
into a skip with the reason); scripts/install_redis.sh installs the Debian package.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """One redis-server process bound to loopback; ``stop()`` and ``start()`` again keep the port."""

    def __init__(self, port: int | None = None, maxmemory: str | None = None, policy: str = "allkeys-lru",
                 extra: list[str] | None = None) -> None:
        self.binary = shutil.which("redis-server")
        self.port = port or free_port()
        self.maxmemory = maxmemory
        self.policy = policy
        self.extra = extra or []
        self.dir = tempfile.mkdtemp(prefix="kvbm-redis-")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        if self.binary is None:
            raise RuntimeError("redis-server is not installed (scripts/install_redis.sh installs it)")
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", self.dir, "--protected-mode", "yes", "--maxmemory-policy", self.policy, *self.extra]
        if self.maxmemory:
            args += ["--maxmemory", self.maxmemory]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode} (port {self.port})")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on 127.0.0.1:{self.port} within {timeout} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def _free_cluster_port() -> int:
    """A port p with p and its cluster bus port p+10000 both free on loopback."""
    for _ in range(200):
        p = free_port()
        if p + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p + 10000))
            except OSError:
                continue
        return p
    raise RuntimeError("no free port pair for a Redis Cluster node")


class RedisCluster:
    """A 3-master Redis Cluster on 127.0.0.1 (no replicas), made with ``redis-cli --cluster create``."""

    def __init__(self, masters: int = 3) -> None:
        self.nodes = [RedisServer(port=_free_cluster_port(), extra=["--cluster-enabled", "yes",
                                                                   "--cluster-node-timeout", "2000"])
                      for _ in range(masters)]

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    def start(self, timeout: float = 30.0) -> RedisCluster:
        cli = shutil.which("redis-cli")
        if cli is None:
            raise RuntimeError("redis-cli is not installed (scripts/install_redis.sh installs it)")
        for n in self.nodes:
            n.start()
        addrs = [f"127.0.0.1:{n.port}" for n in self.nodes]
        r = subprocess.run([cli, "--cluster", "create", *addrs, "--cluster-replicas", "0", "--cluster-yes"],
                           capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            self.close()
            raise RuntimeError(f"redis-cli --cluster create failed: {r.stdout[-500:]} {r.stderr[-500:]}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ok = all("cluster_state:ok" in subprocess.run([cli, "-p", str(n.port), "cluster", "info"],
                                                          capture_output=True, text=True).stdout
                     for n in self.nodes)
            if ok:
                return self
            time.sleep(0.1)
        self.close()
        raise RuntimeError("the Redis Cluster did not reach cluster_state:ok")

    def close(self) -> None:
        for n in self.nodes:
            n.close()


def stop_process(pid: int, timeout: float = 5.0) -> None:
    """SIGSTOP ``pid`` and wait until the kernel reports it stopped (state T in /proc)."""
    import os
    import signal

    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "T":
                return
        time.sleep(0.005)
    raise RuntimeError(f"process {pid} did not stop within {timeout} s")
