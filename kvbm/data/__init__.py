"""Data files shipped inside the package (see ``README.md`` here for provenance and licences).

Benchmarks and tests use these instead of anything outside the repository, so a fresh clone or
a ``pip install`` runs every suite.
"""

from __future__ import annotations

import os
from pathlib import Path

_HERE = Path(__file__).resolve().parent

#: File name of the bundled Mooncake conversation trace (xz-compressed JSON Lines).
MOONCAKE_CONVERSATION = "mooncake_conversation.jsonl.xz"


def mooncake_conversation() -> Path:
    """Path of the Mooncake conversation trace (12,031 requests, 182,790 distinct blocks).

    ``KVBM_TRACE``, when set, overrides it (a path to another Mooncake-format trace).

    Raises:
        InvalidArgumentError: the bundled file is missing (a broken install).
    """
    override = os.environ.get("KVBM_TRACE")
    if override:
        return Path(override)
    p = _HERE / MOONCAKE_CONVERSATION
    if not p.is_file():
        from kvbm.errors import InvalidArgumentError

        raise InvalidArgumentError(f"bundled trace {p} is missing: reinstall kvbm (it ships in kvbm/data/)")
    return p
