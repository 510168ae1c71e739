"""``kvbm replay TRACE``: replay a Mooncake-format trace through the index and a policy.

Prints the prefix-hit ratio and the replay's figures (``--json`` for machine-readable output).
Errors (bad trace line, unknown policy, capacity out of range) exit with status 2 and a message
naming the problem; see :func:`kvbm.replay.replay` for the semantics.
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def _fraction(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction such as 0.1, got {text!r}") from None


def add_parser(sub: Any) -> None:
    """Register the ``replay`` subcommand on an argparse subparsers object."""
    p = sub.add_parser(
        "replay",
        help="replay a request trace through the block index and an eviction policy",
        description="Replay a Mooncake-format JSONL trace (hash_ids per request) through a real "
        "BlockIndex with one tier and report the prefix-hit ratio.",
    )
    p.add_argument("trace", help="path to the JSONL trace")
    p.add_argument(
        "--capacity",
        type=_fraction,
        default=0.1,
        metavar="FRACTION",
        help="tier size as a fraction of the trace's distinct blocks, in (0, 1] (default 0.1)",
    )
    p.add_argument("--policy", default=None, metavar="NAME", help="eviction policy (default: the default policy)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from kvbm.replay import replay

    r = replay(args.trace, capacity=args.capacity, policy=args.policy).to_dict()
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"trace            {r['trace']}")
    print(f"policy           {r['policy']}")
    print(f"capacity         {r['capacity_blocks']} blocks ({r['capacity_fraction']:.2%} of "
          f"{r['distinct_blocks']} distinct)")
    print(f"requests         {r['requests']}")
    print(f"blocks           {r['blocks']} ({r['hit_blocks']} hit, {r['evictions']} evictions)")
    print(f"prefix hit ratio {r['prefix_hit_ratio']:.4f}")
    print(f"replay time      {r['seconds']:.2f} s (+ {r['parse_seconds']:.2f} s parsing)")
    return 0
