"""``kvbm router``: an OpenAI-compatible, KV-aware proxy in front of several vLLM instances.

Instances come from ``--instance URL[,events=tcp://H:P][,replay=tcp://H:P][,kvbm_events=...]``
(repeatable) or a YAML file (``--config``; see :mod:`kvbm.router.config`). Each instance should run
vLLM with ``--kv-events-config '{"enable_kv_cache_events": true, "publisher": "zmq",
"endpoint": "tcp://*:P", "replay_endpoint": "tcp://*:P+1"}'``. With ``role=prefill`` and
``role=decode`` instances it runs the prefill and the decode of each request on different instances
(docs/router.md, "Prefill/decode through the router"). Prints
``kvbm router listening on http://HOST:PORT`` once ready; SIGINT/SIGTERM stop it.
"""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser("router", help="run a KV-aware router in front of vLLM instances", description=__doc__)
    p.add_argument("--config", help="YAML file with the instances (and any of the options below)")
    p.add_argument("--instance", action="append", default=[], metavar="URL[,key=value...]",
                   help="a vLLM instance (repeatable): URL plus events=, replay=, kvbm_events=, kvbm_replay=, "
                        "block_bytes=, role=prefill|decode|both, pull_bandwidth=")
    p.add_argument("--host", default=None, help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="TCP port (default 8000; 0: any free port)")
    p.add_argument("--policy", choices=("kv", "round_robin"), default=None, help="placement (default kv)")
    p.add_argument("--max-blocks", type=int, default=None, help="bound of the block index (default 2000000)")
    p.add_argument("--pd-bandwidth", type=float, default=None,
                   help="bytes/s of a decode instance's KV pull until measured (default 5e9)")
    p.add_argument("--no-probe", action="store_true", help="skip the start-up speed probe of each instance")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        import aiohttp  # noqa: F401
        import msgspec  # noqa: F401
        import zmq  # noqa: F401
    except ImportError as e:
        from kvbm.errors import ConfigError

        raise ConfigError(f"kvbm router needs the 'router' extra (pip install 'kvblockmgr[router]'): {e}") from None
    from kvbm.router.app import serve
    from kvbm.router.config import RouterConfig, load_yaml, parse_instance

    over = {"host": args.host, "port": args.port, "policy": args.policy, "max_blocks": args.max_blocks,
            "probe": False if args.no_probe else None, "pd_bandwidth": args.pd_bandwidth}
    if args.config:
        cfg = load_yaml(args.config, **over)
        if args.instance:
            cfg = RouterConfig(**{**cfg.__dict__, "instances": cfg.instances + tuple(
                parse_instance(s) for s in args.instance)})
    else:
        cfg = RouterConfig(instances=tuple(parse_instance(s) for s in args.instance),
                           **{k: v for k, v in over.items() if v is not None})
    serve(cfg)
    return 0
