"""The ``kvbm`` console command.

Each subcommand lives in its own module under ``kvbm.cli`` and exposes
``add_parser(subparsers)`` (which registers it and sets ``func``). Adding a subcommand means
adding a module and one name to ``_SUBCOMMANDS``.
"""

from __future__ import annotations

import argparse
import importlib
import os
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
        print(f"kvbm {args.command}: error: {type(e).__name__}: {_short(str(e))}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # a bug in kvbm: one line, not a traceback (KVBM_DEBUG=1 shows it)
        if os.environ.get("KVBM_DEBUG"):
            raise
        print(
            f"kvbm {args.command}: internal error: {type(e).__name__}: {_short(str(e))} "
            "(a kvbm bug: please report it; KVBM_DEBUG=1 shows the traceback)",
            file=sys.stderr,
        )
        return 3


def _short(msg: str, limit: int = 2000) -> str:
    return msg if len(msg) <= limit else msg[:limit] + f"... ({len(msg)} characters)"


if __name__ == "__main__":
    sys.exit(main())
