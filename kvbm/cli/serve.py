"""``kvbm serve``: run a store server that keeps KV blocks for many engine instances.

Binds 127.0.0.1 by default. Credentials come from ``--token-file`` (one line per token:
``TOKEN NAMESPACE [NAMESPACE ...]``, see ``kvbm.serve_tenants``; a file holding one token is one
shared secret) or the ``KVBM_SERVE_TOKEN`` environment variable (one shared secret), never the
command line, where ``ps`` shows it. Without either the server is loopback-only and
single-tenant. Prints ``kvbm serve listening on kvbm://HOST:PORT`` once ready, with who may
connect; SIGINT/SIGTERM stop it gracefully (health turns 503, connections close, the write-behind
disk queue is drained, the catalog closed). ``--http-port`` serves ``GET /health`` and
``GET /metrics``; ``--disk-path`` keeps blocks across restarts (see Note [Serve service] in
:mod:`kvbm.service`).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser("serve", help="run a kvbm store server (a remote tier for many engines)", description=__doc__)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; others need a token)")
    p.add_argument("--port", type=int, default=0, help="TCP port (default 0: any free port, printed)")
    p.add_argument("--capacity", default="1GiB", help="host memory for blocks, e.g. 8GiB (default 1GiB)")
    p.add_argument("--max-block-bytes", default="4MiB", help="largest block clients may store (default 4MiB)")
    p.add_argument("--token-file", help="per-tenant credentials, one 'TOKEN NAMESPACE...' per line "
                   "(else $KVBM_SERVE_TOKEN, one shared secret; else none: loopback, single tenant)")
    p.add_argument("--eviction-policy", default="lru", help="eviction policy of the server's host tier")
    p.add_argument("--max-batch", type=int, default=1024, help="most blocks per request")
    p.add_argument("--max-clients", type=int, default=64, help="most connections at once")
    p.add_argument("--max-clients-per-peer", type=int, default=64, help="most connections from one address")
    p.add_argument("--idle-timeout", type=float, default=300.0, help="close connections idle this many seconds")
    p.add_argument("--hello-timeout", type=float, default=5.0,
                   help="a connection must authenticate within this many seconds (default 5)")
    p.add_argument("--put-reserve", default="32MiB",
                   help="most bytes one connection's PUT holds reserved before its data arrives (default 32MiB)")
    p.add_argument("--put-timeout", type=float, default=30.0,
                   help="a request's data must arrive within this many seconds (default 30)")
    p.add_argument("--data-path", choices=("tcp", "ucx"), default="tcp",
                   help="also offer the UCX transfer-engine data path (ucx), or TCP only (default)")
    p.add_argument("--port-file", help="write the bound port to this file once listening")
    p.add_argument("--http-port", type=int, default=None,
                   help="serve GET /health and /metrics (Prometheus) on this port (0: any free port)")
    p.add_argument("--http-host", default="127.0.0.1", help="address of the HTTP endpoint (default 127.0.0.1)")
    p.add_argument("--http-port-file", help="write the HTTP endpoint's port to this file once listening")
    p.add_argument("--disk-path", help="directory of a write-behind disk tier that survives restarts")
    p.add_argument("--disk-capacity", default="0", help="disk tier capacity, e.g. 100GiB (needed with --disk-path)")
    p.add_argument("--drain-timeout", type=float, default=60.0,
                   help="seconds SIGTERM waits for the write-behind queue (default 60)")
    p.add_argument("--log-format", choices=("text", "json"), default="text", help="log lines on stderr")
    p.set_defaults(func=run)


def _size(text: str, flag: str) -> int:
    """A byte size from the command line; ConfigError naming ``flag`` (never OverflowError)."""
    from kvbm.config import parse_size
    from kvbm.errors import ConfigError

    if not isinstance(text, str) or len(text) > 32:
        raise ConfigError(f"{flag}: expected a byte size such as 1GiB, got {text[:40]!r}")
    try:
        return parse_size(text, flag)
    except (OverflowError, ValueError):
        raise ConfigError(f"{flag}: expected a byte size such as 1GiB, got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    from kvbm.serve import ServeConfig, StoreServer
    from kvbm.serve_tenants import load_token_file

    token, tokens = None, None
    if args.token_file:
        tokens = load_token_file(args.token_file)
    elif os.environ.get("KVBM_SERVE_TOKEN"):
        token = os.environ["KVBM_SERVE_TOKEN"]
    cfg = ServeConfig(
        host=args.host, port=args.port, capacity_bytes=_size(args.capacity, "--capacity"),
        max_block_bytes=_size(args.max_block_bytes, "--max-block-bytes"), token=token, tokens=tokens,
        eviction_policy=args.eviction_policy, max_batch=args.max_batch, max_clients=args.max_clients,
        max_clients_per_peer=args.max_clients_per_peer, idle_timeout_s=args.idle_timeout,
        hello_timeout_s=args.hello_timeout, put_reserve_bytes=_size(args.put_reserve, "--put-reserve"),
        put_timeout_s=args.put_timeout, data_path=args.data_path,
    )
    from kvbm.service import Service, ServiceOptions, setup_logging

    setup_logging(args.log_format)
    service = Service(StoreServer(cfg), ServiceOptions(
        http_host=args.http_host, http_port=args.http_port, disk_path=args.disk_path,
        disk_capacity_bytes=_size(args.disk_capacity, "--disk-capacity"), drain_timeout_s=args.drain_timeout))
    service.install_signal_handlers()
    server = service.start().server
    if args.port_file:
        Path(args.port_file).write_text(f"{server.address[1]}\n")
    if args.http_port_file and service.http_address is not None:
        Path(args.http_port_file).write_text(f"{service.http_address[1]}\n")
    print(f"kvbm serve listening on {server.url} ({cfg.capacity_bytes} bytes, "
          f"{server.stats()['capacity_blocks']} blocks of up to {cfg.max_block_bytes} bytes, "
          f"{cfg.describe_tenancy()}, data path {cfg.data_path})", flush=True)
    try:
        service.wait()
    finally:
        service.shutdown()
        print("kvbm serve stopped", file=sys.stderr, flush=True)
    return 0
