"""``kvbm info``: version, build features, eviction policies and the effective config."""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser("info", help="show version, build features and the effective config", description=__doc__)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--config", help="a YAML config file (default: KVBM_* environment variables)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import kvbm
    from kvbm.config import KvbmConfig

    cfg = KvbmConfig.from_yaml(args.config) if args.config else KvbmConfig.from_env()
    info = kvbm.build_info()
    info["config"] = cfg.to_dict()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"kvbm {info['version']}")
    print(f"  cuda compiled: {info['cuda_compiled']}  cuda available: {info['cuda_available']}"
          f"  ucx compiled: {info['ucx_compiled']}")
    print(f"  eviction policies: {', '.join(info['eviction_policies'])}")
    print("  config:")
    for k, v in info["config"].items():
        print(f"    {k}: {v}")
    return 0
