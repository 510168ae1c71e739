"""The ``kvbm`` console command.

Each subcommand lives in its own module under ``kvbm.cli`` and exposes
``add_parser(subparsers)`` (which registers it and sets ``func``). Adding a subcommand means
adding a module and one name to ``_SUBCOMMANDS``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from kvbm.errors import KvbmError

_SUBCOMMANDS = ["info", "replay", "bench", "inspect", "serve", "router"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvbm", description="kvbm: KV-cache block manager for LLM serving")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in _SUBCOMMANDS:
        importlib.import_module(f"kvbm.cli.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KvbmError as e:
        print(f"kvbm {args.command}: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
