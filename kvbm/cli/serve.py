"""``kvbm serve``: run a store server that keeps KV blocks for many engine instances.

Binds 127.0.0.1 by default. The shared-secret token comes from ``--token-file`` or the
``KVBM_SERVE_TOKEN`` environment variable (never the command line, where ``ps`` shows it).
Prints ``kvbm serve listening on kvbm://HOST:PORT`` once ready; SIGINT/SIGTERM stop it.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser("serve", help="run a kvbm store server (a remote tier for many engines)", description=__doc__)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; others need a token)")
    p.add_argument("--port", type=int, default=0, help="TCP port (default 0: any free port, printed)")
    p.add_argument("--capacity", default="1GiB", help="host memory for blocks, e.g. 8GiB (default 1GiB)")
    p.add_argument("--max-block-bytes", default="4MiB", help="largest block clients may store (default 4MiB)")
    p.add_argument("--token-file", help="file holding the shared secret (else $KVBM_SERVE_TOKEN, else none)")
    p.add_argument("--eviction-policy", default="lru", help="eviction policy of the server's host tier")
    p.add_argument("--max-batch", type=int, default=1024, help="most blocks per request")
    p.add_argument("--max-clients", type=int, default=64, help="most connections at once")
    p.add_argument("--idle-timeout", type=float, default=300.0, help="close connections idle this many seconds")
    p.add_argument("--data-path", choices=("tcp", "ucx"), default="tcp",
                   help="also offer the UCX transfer-engine data path (ucx), or TCP only (default)")
    p.add_argument("--port-file", help="write the bound port to this file once listening")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kvbm.config import parse_size
    from kvbm.errors import ConfigError
    from kvbm.serve import ServeConfig, StoreServer

    token = None
    if args.token_file:
        try:
            token = Path(args.token_file).read_text().strip()
        except OSError as e:
            raise ConfigError(f"--token-file: cannot read {args.token_file!r}: {e.strerror}") from None
    elif os.environ.get("KVBM_SERVE_TOKEN"):
        token = os.environ["KVBM_SERVE_TOKEN"]
    cfg = ServeConfig(
        host=args.host, port=args.port, capacity_bytes=parse_size(args.capacity, "--capacity"),
        max_block_bytes=parse_size(args.max_block_bytes, "--max-block-bytes"), token=token,
        eviction_policy=args.eviction_policy, max_batch=args.max_batch, max_clients=args.max_clients,
        idle_timeout_s=args.idle_timeout, data_path=args.data_path,
    )
    server = StoreServer(cfg).start()

    def stop(_sig: int, _frame: Any) -> None:
        server.request_stop()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    if args.port_file:
        Path(args.port_file).write_text(f"{server.address[1]}\n")
    print(f"kvbm serve listening on {server.url} ({cfg.capacity_bytes} bytes, "
          f"{server.stats()['capacity_blocks']} blocks of up to {cfg.max_block_bytes} bytes, "
          f"token {'required' if token else 'none'}, data path {cfg.data_path})", flush=True)
    try:
        server.serve_forever()
    finally:
        server.close()
        print("kvbm serve stopped", file=sys.stderr, flush=True)
    return 0
