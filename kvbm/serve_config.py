"""Settings of ``kvbm serve`` (:class:`ServeConfig`), validated once; see :mod:`kvbm.serve`."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from kvbm.errors import ConfigError
from kvbm.serve_protocol import MAX_TOKEN
from kvbm.serve_tenants import DEFAULT_NAMESPACE, TenantTable, check_tokens
from kvbm.tiers.remote import HEADER_SIZE


@dataclass
class ServeConfig:
    """Settings of a store server (what ``kvbm serve`` takes on its command line).

    Attributes:
        host: address to bind; 127.0.0.1 by default. Anything else needs ``token`` or ``tokens``.
        port: TCP port (0 = any free port; see :attr:`StoreServer.address`).
        capacity_bytes: bytes of host memory for blocks (records, headers included).
        max_block_bytes: the largest block a client may declare at HELLO.
        token: one shared secret granting the namespace ``default`` (single tenant).
        tokens: per-tenant credentials, ``{token: [namespace, ...]}`` (the first namespace is the
            token's default); see :mod:`kvbm.serve_tenants` for the token file that gives them.
            Neither ``token`` nor ``tokens``: no check, loopback only, one namespace.
        eviction_policy: the host tier's policy (``kvbm.eviction_policies()``).
        max_batch: most blocks per request.
        max_clients: most HELLO'd connections at once; more are answered BUSY ("server full").
        max_clients_per_peer: most connections (waiting or HELLO'd) from one address.
        max_handshakes: most connections waiting for their HELLO; when full, the oldest is closed.
        hello_timeout_s: a connection must finish HELLO within this many seconds.
        idle_timeout_s: a HELLO'd connection silent this long is closed.
        put_reserve_bytes: most bytes of slots one connection's PUT (or PUT_PREP) holds reserved
            before their records arrive.
        put_timeout_s: a request's body (PUT records included) and a PUT_PREP's commit must arrive
            within this many seconds.
        pinned: pin the arena (None: when a GPU is present).
        data_path: ``"tcp"`` (records in the TCP stream only) or ``"ucx"`` (also offer the
            transfer-engine data path; needs UCX, else UnsupportedError at start; refused when
            the credentials grant several namespaces). Clients that do not take it keep using TCP.
        ucx_transports: UCX transports for the ucx data path (``"sm,tcp"``: shared memory
            between processes of one host, with endpoint error handling off).
        ucx_net_devices: UCX network devices (``"lo"``: loopback only).
    """

    host: str = "127.0.0.1"
    port: int = 0
    capacity_bytes: int = 1 << 30
    max_block_bytes: int = 4 << 20
    token: str | None = None
    tokens: Mapping[str, Sequence[str]] | None = None
    eviction_policy: str = "lru"
    max_batch: int = 1024
    max_clients: int = 64
    max_clients_per_peer: int = 64
    max_handshakes: int = 32
    hello_timeout_s: float = 5.0
    idle_timeout_s: float = 300.0
    put_reserve_bytes: int = 32 << 20
    put_timeout_s: float = 30.0
    pinned: bool | None = False
    data_path: str = "tcp"
    ucx_transports: str = "sm,tcp"
    ucx_net_devices: str = "lo"

    def validate(self) -> None:
        """Raise ConfigError naming the first bad field."""
        for name in ("port", "capacity_bytes", "max_block_bytes", "max_batch", "max_clients", "max_clients_per_peer",
                     "max_handshakes", "put_reserve_bytes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ConfigError(f"{name}: expected an int, got {v!r}")
        for name in ("hello_timeout_s", "idle_timeout_s", "put_timeout_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and 0 < v <= 1e6):
                raise ConfigError(f"{name}: must be a number of seconds in (0, 1e6], got {v!r}")
        if not 0 < self.max_block_bytes <= 1 << 40:
            raise ConfigError(f"max_block_bytes: must be 1..2**40, got {self.max_block_bytes}")
        if not self.max_block_bytes + HEADER_SIZE <= self.capacity_bytes <= 1 << 50:
            raise ConfigError(
                f"capacity_bytes: {self.capacity_bytes} bytes hold no record of {self.max_block_bytes + HEADER_SIZE}"
                if self.capacity_bytes < self.max_block_bytes + HEADER_SIZE else
                f"capacity_bytes: {self.capacity_bytes} is more than 2**50 bytes"
            )
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port: must be 0..65535, got {self.port}")
        if not 1 <= self.max_batch <= 1 << 16:
            raise ConfigError(f"max_batch: must be 1..65536, got {self.max_batch}")
        for name in ("max_clients", "max_clients_per_peer", "max_handshakes"):
            if not 1 <= getattr(self, name) <= 4096:
                raise ConfigError(f"{name}: must be 1..4096, got {getattr(self, name)}")
        if self.put_reserve_bytes <= 0:
            raise ConfigError(f"put_reserve_bytes: must be positive, got {self.put_reserve_bytes}")
        if self.token is not None and not 0 < len(self.token.encode()) <= MAX_TOKEN:
            raise ConfigError(f"token: must be 1..{MAX_TOKEN} bytes")
        if self.token is not None and self.tokens is not None:
            raise ConfigError("token, tokens: give one shared token or per-tenant tokens, not both")
        if self.tokens is not None:
            check_tokens(self.tokens)
        if self.data_path not in ("tcp", "ucx"):
            raise ConfigError(f"data_path: must be 'tcp' or 'ucx', got {self.data_path!r}")
        if self.host not in ("127.0.0.1", "localhost", "::1") and not (self.token or self.tokens):
            raise ConfigError(f"host: binding {self.host!r} (not loopback) requires a token")
        if self.data_path == "ucx" and len(self.tenant_table().namespaces) > 1:
            raise ConfigError("data_path: 'ucx' exposes the whole arena to every client; it needs credentials "
                              "that grant a single namespace (use 'tcp' with several tenants)")

    def tenant_table(self) -> TenantTable:
        """The credentials these settings give (``token`` is one credential for ``default``)."""
        if self.token is not None:
            return TenantTable({self.token: (DEFAULT_NAMESPACE,)})
        return TenantTable(self.tokens)

    def describe_tenancy(self) -> str:
        """One line for the start-up message: who may connect and which namespaces they get."""
        t = self.tenant_table()
        if t.open:
            return "no token: loopback only, single tenant (every client shares namespace 'default')"
        if self.tokens is None:
            return "shared token: single tenant (namespace 'default')"
        return f"per-tenant tokens: {len(self.tokens)} credentials, {len(t.namespaces)} namespaces"
