"""Credentials of ``kvbm serve``: which token may read and write which namespaces.

Design note — the namespace comes from the credential.
    A store server shared by tenants must not let a client *name* the partition it reads or
    writes: anyone could then read another tenant's blocks or plant forged ones there first. So
    every credential (a token) lists the namespaces it may use; at HELLO a client asks for one of
    them by name (or gets the first, its default) and the server keys every block of that
    connection by ``BLAKE2b-128(tenant namespace || client namespace digest || block_bytes ||
    block hash)``. The client's own namespace digest (model, dtype, layout...) still separates
    cooperating engines inside one tenant namespace, and the record header carries it, so
    records name themselves as everywhere in kvbm; but crossing tenant namespaces takes a token
    that lists the other one. Tokens are compared in constant time.

    Without any token the server is single-tenant: it binds only a loopback address and every
    client shares the namespace ``default`` (and says so at start-up).

Token file format (``kvbm serve --token-file PATH``), UTF-8 text, one credential per line::

    # comments and blank lines are ignored
    # TOKEN                    NAMESPACE [NAMESPACE ...]
    3f9c0e6b8d2a41c7a9e5       team-a
    77d1b0c4e9aa4f0b8c21       team-b shared
    # a token alone grants the namespace "default"
    0c5e7d9f13b24a6e

Fields are separated by blanks; a token holds no blanks. Comments are whole lines starting with
``#``. A line with a token only grants the namespace ``default`` (so a file holding one shared
secret, the old format, still works and is single-tenant). A token may appear once. Namespace
names are 1..256 bytes of UTF-8 without blanks.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping, Sequence
from pathlib import Path

from kvbm.errors import ConfigError
from kvbm.serve_protocol import HASH_SIZE, MAX_TENANT, MAX_TOKEN

DEFAULT_NAMESPACE = "default"
_MAX_TOKEN_FILE = 16 << 20


def check_namespace_name(name: object, what: str) -> str:
    """``name`` if it is a valid tenant namespace name; else ConfigError naming ``what``."""
    if not isinstance(name, str) or not name or any(c.isspace() for c in name):
        raise ConfigError(f"{what}: a namespace name must be a non-empty string without blanks, got {name!r}")
    if len(name.encode("utf-8", "surrogatepass")) > MAX_TENANT:
        raise ConfigError(f"{what}: namespace name longer than {MAX_TENANT} bytes")
    return name


def parse_tokens(text: str, source: str = "token file") -> dict[str, tuple[str, ...]]:
    """Parse the token file format (module docstring) into ``{token: namespaces}``.

    Raises ConfigError naming the line of anything malformed, a repeated token, or no token.
    """
    out: dict[str, tuple[str, ...]] = {}
    for no, raw in enumerate(text.splitlines(), 1):
        line = "" if raw.lstrip().startswith("#") else raw.strip()  # whole-line comments (a token may hold '#')
        if not line:
            continue
        token, *names = line.split()
        where = f"{source}, line {no}"
        if len(token.encode()) > MAX_TOKEN:
            raise ConfigError(f"{where}: token longer than {MAX_TOKEN} bytes")
        if token in out:
            raise ConfigError(f"{where}: this token appears twice")
        names = names or [DEFAULT_NAMESPACE]
        for n in names:
            check_namespace_name(n, where)
        out[token] = tuple(dict.fromkeys(names))
    if not out:
        raise ConfigError(f"{source}: no token in it")
    return out


def load_token_file(path: str | Path) -> dict[str, tuple[str, ...]]:
    """Read and parse a token file; ConfigError when it cannot be read, is not UTF-8 or is malformed."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            data = f.read(_MAX_TOKEN_FILE + 1)
    except OSError as e:
        raise ConfigError(f"--token-file: cannot read {str(path)!r}: {e.strerror or e}") from None
    if len(data) > _MAX_TOKEN_FILE:
        raise ConfigError(f"--token-file: {str(path)!r} is larger than {_MAX_TOKEN_FILE} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"--token-file: {str(path)!r} is not UTF-8 text (byte {e.start})") from None
    return parse_tokens(text, f"--token-file {str(path)!r}")


def check_tokens(tokens: Mapping[str, Sequence[str]]) -> dict[str, tuple[str, ...]]:
    """Validate a ``{token: namespaces}`` mapping (as :class:`kvbm.serve.ServeConfig` takes it)."""
    if not isinstance(tokens, Mapping) or not tokens:
        raise ConfigError("tokens: expected a non-empty mapping of token -> namespace names")
    out: dict[str, tuple[str, ...]] = {}
    for tok, names in tokens.items():
        if not isinstance(tok, str) or not 0 < len(tok.encode("utf-8", "surrogatepass")) <= MAX_TOKEN:
            raise ConfigError(f"tokens: every token must be a string of 1..{MAX_TOKEN} bytes")
        if isinstance(names, str) or not isinstance(names, Sequence) or not names:
            raise ConfigError("tokens: every token needs a non-empty list of namespace names")
        out[tok] = tuple(dict.fromkeys(check_namespace_name(n, "tokens") for n in names))
    return out


def tenant_prefix(name: str) -> bytes:
    """The 16-byte digest every key of tenant namespace ``name`` starts from."""
    return hashlib.blake2b(b"kvbm-serve-tenant-v1\0" + name.encode("utf-8"), digest_size=HASH_SIZE).digest()


class TenantTable:
    """The server's credentials: resolves (token, requested namespace) to a namespace name."""

    def __init__(self, tokens: Mapping[str, Sequence[str]] | None) -> None:
        self.open = tokens is None
        self._creds = [] if tokens is None else [(t.encode(), tuple(ns)) for t, ns in check_tokens(tokens).items()]

    @property
    def namespaces(self) -> set[str]:
        """Every namespace some credential grants ({"default"} without credentials)."""
        if self.open:
            return {DEFAULT_NAMESPACE}
        return {n for _t, ns in self._creds for n in ns}

    def resolve(self, token: bytes, requested: str) -> str | None:
        """The namespace this connection uses, or None when the credential does not allow it.

        Every credential is compared (constant time) so the reply time does not tell which
        token prefix matched.
        """
        if self.open:
            granted: tuple[str, ...] | None = (DEFAULT_NAMESPACE,)
        else:
            granted = None
            for t, ns in self._creds:
                if hmac.compare_digest(token, t):
                    granted = ns
        if granted is None:
            return None
        if not requested:
            return granted[0]
        return requested if requested in granted else None
