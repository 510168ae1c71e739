"""``kvbm serve`` as a service: HTTP health and metrics, a persistent disk tier, graceful shutdown.

Note [Serve service]
--------------------
:class:`Service` runs a :class:`kvbm.serve.StoreServer` (the block protocol, unchanged) with:

* an HTTP endpoint on its own port (``--http-port``): ``GET /health`` (200 ``{"status": "ok"}``
  while serving, 503 ``{"status": "draining"}`` once shutdown began: readiness probes stop routing
  to it) and ``GET /metrics`` (Prometheus text: the server's counters as ``kvbm_serve_*`` and its
  tiers as the ``kvbm_*{tier=...}`` families of :mod:`kvbm.metrics`);
* a disk tier (``--disk-path``, a :class:`kvbm.tiers.disk.DiskTier`), written behind: every record
  the server verified is copied out of its slot *before* the server publishes and acknowledges it
  (the ``on_records`` hook), queued, and written to disk by one background thread, so no request
  waits for the disk. At start-up the disk tier's most recently written blocks are put back into
  the host tier (up to its capacity): a restart keeps the blocks;
* graceful shutdown on SIGTERM/SIGINT: health turns 503, the server stops accepting and closes its
  connections (a request in flight is either acknowledged, and then its records are queued, or not
  acknowledged), then the write-behind queue is drained to disk, the disk tier's writes waited for
  and its catalog closed. Acknowledged blocks are therefore on disk when the process exits; a block
  is lost only on SIGKILL or power loss between its acknowledgement and its disk write.

Blocks are served from host memory only; the disk tier is what survives a restart (and what a
restart reloads), not a second serving tier.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import signal
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

from kvbm.errors import ConfigError

log = logging.getLogger("kvbm.serve")

#: Counters of :meth:`StoreServer.stats` exported as ``kvbm_serve_<name>_total``.
SERVE_COUNTERS = ("connections", "refused_auth", "refused_busy", "protocol_errors", "lookups", "puts", "gets",
                  "blocks_stored", "blocks_rejected", "blocks_served", "block_misses", "bytes_in", "bytes_out")
#: Gauges exported as ``kvbm_serve_<name>``.
SERVE_GAUGES = ("active_connections", "write_behind_queue_blocks", "draining")
#: Every sample name the service's /metrics writes besides :data:`kvbm.metrics.METRIC_NAMES`.
SERVE_METRIC_NAMES = (*(f"kvbm_serve_{n}_total" for n in SERVE_COUNTERS), *(f"kvbm_serve_{n}" for n in SERVE_GAUGES))
HEALTH_PATH = "/health"
METRICS_PATH = "/metrics"


@dataclass
class ServiceOptions:
    """What ``kvbm serve`` adds around the store server.

    Attributes:
        http_host: address of the HTTP endpoint (``/health``, ``/metrics``).
        http_port: its port (0: any free port; None: no HTTP endpoint).
        disk_path: directory of the write-behind disk tier (None: host memory only).
        disk_capacity_bytes: its capacity (> 0 with ``disk_path``).
        drain_timeout_s: longest wait for the write-behind queue at shutdown.
    """

    http_host: str = "127.0.0.1"
    http_port: int | None = None
    disk_path: str | None = None
    disk_capacity_bytes: int = 0
    drain_timeout_s: float = 60.0

    def validate(self) -> None:
        """Raise ConfigError naming the first bad field."""
        if self.http_port is not None and not 0 <= self.http_port <= 65535:
            raise ConfigError(f"http_port: must be 0..65535, got {self.http_port}")
        if self.disk_path is not None and self.disk_capacity_bytes <= 0:
            raise ConfigError("disk_capacity_bytes: must be > 0 when disk_path is set")
        if self.drain_timeout_s <= 0:
            raise ConfigError(f"drain_timeout_s: must be > 0, got {self.drain_timeout_s}")


class _WriteBehind:
    """Copies of acknowledged records, written to a DiskTier by one thread."""

    def __init__(self, disk: Any) -> None:
        self.disk = disk
        self.q: queue.Queue = queue.Queue()
        self.written = 0
        self.failed = 0
        self._thread = threading.Thread(target=self._run, name="kvbm-serve-disk", daemon=True)
        self._thread.start()

    def add(self, keys: list[bytes], views: list[memoryview]) -> None:
        """Called on the connection thread while the slots are reserved: copy, then queue."""
        if keys:
            self.q.put((keys, [np.frombuffer(v, np.uint8).copy() for v in views]))

    def _run(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                self.q.task_done()
                return
            keys, recs = item
            try:
                ok = self.disk.put_async(keys, recs).wait()
                self.written += sum(ok)
                self.failed += len(ok) - sum(ok)
            except Exception:  # a full or broken disk must not stop the server
                log.exception("kvbm serve: disk write of %d blocks failed", len(keys))
                self.failed += len(keys)
            finally:
                self.q.task_done()

    def close(self, timeout: float) -> bool:
        """Write everything queued, then stop the thread; False if ``timeout`` ran out first."""
        self.q.put(None)
        self._thread.join(timeout)
        return not self._thread.is_alive()


class Service:
    """A store server with its HTTP endpoint and disk tier; see Note [Serve service].

    Raises (constructor): ConfigError for bad options; StorageIOError when the disk tier is
    held by another process.
    """

    def __init__(self, server: Any, options: ServiceOptions | None = None) -> None:
        self.server = server
        self.options = options or ServiceOptions()
        self.options.validate()
        self.draining = threading.Event()
        self.restored = 0
        self._wb: _WriteBehind | None = None
        self._disk: Any = None
        self._http: ThreadingHTTPServer | None = None
        self._stopped = threading.Event()
        if self.options.disk_path:
            from kvbm.tiers.disk import ALIGNMENT, DiskTier

            try:
                os.makedirs(self.options.disk_path, exist_ok=True)
            except OSError as e:
                raise ConfigError(f"disk_path {self.options.disk_path!r}: cannot create it: {e.strerror}") from None
            slot = -(-server.slot_bytes // ALIGNMENT) * ALIGNMENT
            self._disk = DiskTier(self.options.disk_path, slot_bytes=slot,
                                  capacity_bytes=self.options.disk_capacity_bytes,
                                  namespace="kvbm-serve", eviction="lru")
            self.restored = self._restore()
            self._wb = _WriteBehind(self._disk)
            server.on_records = self._wb.add

    def _restore(self) -> int:
        """Put the disk tier's newest blocks back into the host tier (before the server starts)."""
        disk = self._disk
        cat = disk.catalog
        keys = disk.keys()
        room = int(self.server.stats()["capacity_blocks"] or 0)
        keys.sort(key=lambda k: cat.record(cat.slot_of(k))["created_us"], reverse=True)
        keys = keys[:room]
        if not keys:
            return 0
        outs = [np.empty(disk.length_of(k), np.uint8) for k in keys]
        ok = disk.get(keys, outs)
        good = [(k, o) for k, o, g in zip(keys, outs, ok, strict=True) if g]
        n = self.server.restore([k for k, _ in good], [o for _, o in good])
        log.info("kvbm serve: disk tier %s holds %d blocks; %d put back into host memory",
                 self.options.disk_path, len(cat), n)
        return n

    # ---- lifecycle ----------------------------------------------------------------------------
    def start(self) -> Service:
        """Start the store server and the HTTP endpoint."""
        if self.options.http_port is not None:
            self._http = ThreadingHTTPServer((self.options.http_host, self.options.http_port), _handler(self))
            self._http.daemon_threads = True
            threading.Thread(target=self._http.serve_forever, name="kvbm-serve-http", daemon=True).start()
        self.server.start()
        return self

    @property
    def http_address(self) -> tuple[str, int] | None:
        return self._http.server_address[:2] if self._http is not None else None

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT begin the graceful shutdown (main thread only)."""
        def stop(_sig: int, _frame: Any) -> None:
            self.draining.set()
            self.server.request_stop()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)

    def wait(self) -> None:
        """Block until a signal (or :meth:`request_stop`) asked to stop."""
        self.server.serve_forever()

    def request_stop(self) -> None:
        self.draining.set()
        self.server.request_stop()

    def shutdown(self) -> dict[str, Any]:
        """Drain and close everything (idempotent); returns what the drain did."""
        if self._stopped.is_set():
            return {}
        self.draining.set()
        t0 = time.monotonic()
        self.server.close()  # stop accepting, close connections, free the arena
        queued = self._wb.q.qsize() if self._wb is not None else 0
        complete = self._wb.close(self.options.drain_timeout_s) if self._wb is not None else True
        if not complete:
            log.error("kvbm serve: write-behind queue not drained in %.0f s", self.options.drain_timeout_s)
        if self._disk is not None:
            self._disk.close()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        self._stopped.set()
        out = {"drain_seconds": time.monotonic() - t0, "queued_at_stop": queued, "drained": complete,
               "disk_written": self._wb.written if self._wb else 0}
        log.info("kvbm serve: stopped (%s)", json.dumps(out))
        return out

    # ---- HTTP ---------------------------------------------------------------------------------
    def health(self) -> tuple[int, dict[str, Any]]:
        if self.draining.is_set():
            return 503, {"status": "draining"}
        return 200, {"status": "ok", "restored_blocks": self.restored}

    def metrics_text(self) -> bytes:
        """The Prometheus exposition of the server and its tiers."""
        from kvbm.metrics import render_stats

        st = self.server.stats()
        lines: list[str] = []
        for name in SERVE_COUNTERS:
            lines += [f"# HELP kvbm_serve_{name}_total kvbm serve: {name.replace('_', ' ')}",
                      f"# TYPE kvbm_serve_{name}_total counter", f"kvbm_serve_{name}_total {float(st.get(name) or 0)}"]
        gauges = {"active_connections": st.get("active_connections") or 0,
                  "write_behind_queue_blocks": self._wb.q.qsize() if self._wb else 0,
                  "draining": 1 if self.draining.is_set() else 0}
        for name in SERVE_GAUGES:
            lines += [f"# HELP kvbm_serve_{name} kvbm serve: {name.replace('_', ' ')}",
                      f"# TYPE kvbm_serve_{name} gauge", f"kvbm_serve_{name} {float(gauges[name])}"]
        tiers: dict[str, dict[str, Any]] = {"host": {
            "hits": st.get("blocks_served") or 0, "misses": st.get("block_misses") or 0,
            "stores": st.get("blocks_stored") or 0, "evictions": st.get("evictions") or 0,
            "bytes_stored": st.get("bytes_in") or 0, "bytes_loaded": st.get("bytes_out") or 0,
            "capacity_blocks": st.get("capacity_blocks") or 0, "used_blocks": st.get("used_blocks") or 0}}
        if self._disk is not None:
            d = self._disk.stats()
            tiers["disk"] = {"stores": self._wb.written if self._wb else 0,
                             "store_failures": self._wb.failed if self._wb else 0,
                             "checksum_failures": d.get("checksum_failures", 0), "evictions": d.get("evictions", 0),
                             "capacity_blocks": d.get("slots_total", 0), "used_blocks": d.get("blocks", 0),
                             "capacity_bytes": d.get("capacity_bytes", 0), "used_bytes": d.get("bytes_used", 0),
                             "write_queue_blocks": gauges["write_behind_queue_blocks"]}
        return ("\n".join(lines) + "\n").encode() + render_stats(tiers)


def _handler(service: Service) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            path = self.path.split("?", 1)[0]
            if path == HEALTH_PATH:
                code, body = service.health()
                self._send(code, json.dumps(body).encode(), "application/json")
            elif path == METRICS_PATH:
                self._send(200, service.metrics_text(), "text/plain; version=0.0.4; charset=utf-8")
            else:
                self._send(404, b'{"error": "not found"}', "application/json")

        def _send(self, code: int, body: bytes, ctype: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            with contextlib.suppress(OSError):
                self.wfile.write(body)

        def log_message(self, fmt: str, *args: Any) -> None:
            log.debug("http: " + fmt, *args)

    return Handler


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message (and exc when there is one)."""

    def format(self, record: logging.LogRecord) -> str:
        d = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
             "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            d["exc"] = self.formatException(record.exc_info)
        return json.dumps(d)


def setup_logging(fmt: str = "text", level: int = logging.INFO) -> None:
    """Configure the ``kvbm`` logger for the ``kvbm serve`` process (``text`` or ``json`` lines on stderr)."""
    if fmt not in ("text", "json"):
        raise ConfigError(f"--log-format: must be 'text' or 'json', got {fmt!r}")
    h = logging.StreamHandler()
    h.setFormatter(JsonFormatter() if fmt == "json" else
                   logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    lg = logging.getLogger("kvbm")
    lg.handlers[:] = [h]
    lg.setLevel(level)
    lg.propagate = False
