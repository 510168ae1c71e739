"""kvbm configuration: one dataclass, validated once.

Build it from Python (``KvbmConfig(host_capacity_bytes=...)``), a YAML file
(:meth:`KvbmConfig.from_yaml`), ``KVBM_*`` environment variables (:meth:`KvbmConfig.from_env`)
or a mapping (:meth:`KvbmConfig.from_dict`, what the vLLM connector's extra config uses).
Unknown keys and bad values raise :class:`kvbm.errors.ConfigError` naming the key. Sizes accept
integers or strings such as ``"4GiB"``, ``"512MB"``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from kvbm.errors import ConfigError

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": 1 << 10, "ki": 1 << 10,
    "m": 1000**2, "mb": 1000**2, "mib": 1 << 20, "mi": 1 << 20,
    "g": 1000**3, "gb": 1000**3, "gib": 1 << 30, "gi": 1 << 30,
    "t": 1000**4, "tb": 1000**4, "tib": 1 << 40, "ti": 1 << 40,
}


MAX_SIZE_BYTES = 1 << 60
"""Largest byte size a config key accepts (1 EiB): bigger ones are typos, and would overflow."""

_MAX_DIGITS = 30  # a size string longer than this is refused before any arithmetic


def parse_size(value: int | str, key: str = "size") -> int:
    """Parse a byte size (``1048576``, ``"1MiB"``, ``"1.5GB"``); raise ConfigError naming ``key``.

    Sizes are exact (no float rounding) and at most :data:`MAX_SIZE_BYTES`; negative ints are
    returned as they are (the validation of each key says what it allows).
    """
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a byte size, got {value!r}")
    if isinstance(value, int):
        return _bounded_size(value, key)
    if isinstance(value, float) and value.is_integer():
        return _bounded_size(int(value), key)
    if isinstance(value, str):
        m = _SIZE_RE.match(value) if len(value) <= 64 else None
        if m and (m.group(2) or "").lower() in _SIZE_UNITS and len(m.group(1)) <= _MAX_DIGITS:
            whole, _, frac = m.group(1).partition(".")
            unit = _SIZE_UNITS[(m.group(2) or "").lower()]
            scaled = int(whole + frac) * unit // 10 ** len(frac)  # exact: no float
            return _bounded_size(scaled, key)
    raise ConfigError(f"{key}: expected a byte size such as 1073741824 or '1GiB', got {_shown(value)}")


MAX_YAML_NESTING = 64
"""Deepest ``[``/``{`` nesting a YAML config may have (a kvbm config needs 1; deep ones are slow to parse)."""


def _flow_depth(text: str) -> int:
    """Upper bound of the flow-collection nesting of a YAML text (brackets inside strings count too)."""
    depth = deepest = 0
    for ch in text:
        if ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}" and depth:
            depth -= 1
    return deepest


def _bounded_size(v: int, key: str) -> int:
    if v > MAX_SIZE_BYTES:
        raise ConfigError(f"{key}: {_shown(v)} is more than the 2**60 bytes (1 EiB) kvbm accepts")
    return v


def _shown(v: object) -> str:
    """A value for an error message, cut short (a 5,000-digit int or string stays readable)."""
    if isinstance(v, int) and not isinstance(v, bool) and v.bit_length() > 128:
        return f"an integer of {len(str(abs(v))) if v.bit_length() < 10000 else 'over 3000'} digits"
    r = repr(v)
    return r if len(r) <= 80 else r[:60] + f"... ({len(r)} characters)"


def _default_eviction_policy() -> str:
    from kvbm import _native

    return str(_native.eviction_policy_names()[0])


MAX_BLOCK_SIZE = 1 << 24
"""Largest block_size (tokens per block); equals ``kvbm.hashing.MAX_BLOCK_SIZE`` (config imports no hashing)."""

MAX_BLOCK_BYTES = 1 << 36
"""Largest block_bytes accepted (64 GiB per block)."""

MAX_INDEX_INITIAL_CAPACITY = 1 << 22
"""Largest index_initial_capacity accepted: what the index reserves up front (it grows past it)."""

_SIZE_FIELDS = {"host_capacity_bytes", "block_bytes", "disk_capacity_bytes"}


@dataclass
class KvbmConfig:
    """Everything kvbm can be configured with. Validated when constructed.

    Attributes:
        block_size: tokens per KV block (what the engine pages by); > 0.
        block_bytes: bytes one block takes in host/disk slots (all layers, K and V); 0 means
            "set later" by the engine integration when it registers its KV layout.
        host_capacity_bytes: bytes of host DRAM for the host tier; > 0.
        host_pinned: pin host memory (None: pin when a GPU is present; True: require it).
        eviction_policy: name from ``kvbm.eviction_policies()`` (default: the first, the default policy).
        hash_algorithm: ``"sha256"`` (default, collision resistant) or ``"fast128"``
            (non-cryptographic; for trusted single-tenant deployments only).
        checksums: compute and verify CRC32C for blocks stored below the GPU.
        index_initial_capacity: entries the block index reserves up front.
        metrics_port: serve Prometheus metrics on this port (needs prometheus_client).
        disk_path: directory of the local disk tier (None: no disk tier).
        disk_capacity_bytes: bytes of slab files the disk tier may use.
        disk_write_policy: ``"write_behind"`` (host evictions are written to disk) or
            ``"write_through"`` (every host store is also written to disk).
        disk_durability: ``"none"`` (page cache / device order only), ``"batch"`` (fdatasync
            before each catalog commit) or ``"always"`` (fdatasync after every block).
        disk_io_threads: IO threads of the disk tier.
        disk_o_direct: use O_DIRECT (falls back, with a warning, where the file system refuses).
        remote_url: the remote tier after disk (None: none): ``redis://host:port/db`` (also
            ``rediss://``, ``unix://``, ``valkey://``), ``redis+cluster://host:port`` or
            ``kvbm://host:port`` (a ``kvbm serve`` server). See kvbm/tiers/remote.py.
        remote_token: shared secret of a ``kvbm serve`` server (Redis: put the password in the URL).
        remote_namespace: tenant name; blocks of other namespaces are invisible (keys and record
            headers carry its digest, bound to ``block_bytes``).
        remote_write_policy: ``"write_through"`` (every new host block is also put to the remote
            tier, asynchronously), ``"write_behind"`` (host evictions are), or ``"read_only"``.
        remote_timeout_s: per-request timeout of the remote tier; a store that does not answer
            is treated as down (misses) and retried after a second.
        remote_threads: threads that run remote prefetches and writes.
    """

    block_size: int = 16
    block_bytes: int = 0
    host_capacity_bytes: int = 1 << 30
    host_pinned: bool | None = None
    eviction_policy: str = field(default_factory=lambda: _default_eviction_policy())
    hash_algorithm: str = "sha256"
    checksums: bool = True
    index_initial_capacity: int = 1024
    metrics_port: int | None = None
    disk_path: str | None = None
    disk_capacity_bytes: int = 0
    disk_write_policy: str = "write_behind"
    disk_durability: str = "batch"
    disk_io_threads: int = 4
    disk_o_direct: bool = True
    remote_url: str | None = None
    remote_token: str | None = None
    remote_namespace: str = "default"
    remote_write_policy: str = "write_through"
    remote_timeout_s: float = 2.0
    remote_threads: int = 2
    _source: str = field(default="python", repr=False, compare=False)

    def __post_init__(self) -> None:
        self._coerce()
        self.validate()

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls) if not f.name.startswith("_")]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "dict") -> KvbmConfig:
        """Build from a mapping; unknown keys raise ConfigError naming them."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: expected a mapping of config keys, got {type(data).__name__}")
        known = set(cls.field_names())
        unknown = sorted(str(k) for k in data if k not in known)
        if unknown:
            raise ConfigError(
                f"{source}: unknown kvbm config key(s) {', '.join(map(repr, unknown))}; "
                f"known keys: {', '.join(sorted(known))}"
            )
        return cls(**dict(data), _source=source)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> KvbmConfig:
        """Build from a YAML file holding a mapping of config keys."""
        p = Path(path)
        try:
            raw = p.read_bytes()
        except OSError as e:
            raise ConfigError(f"cannot read config file {str(p)!r}: {e.strerror or e}") from None
        except ValueError as e:  # e.g. an embedded NUL in the path
            raise ConfigError(f"cannot read config file {str(p)!r}: {e}") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {str(p)!r} is not UTF-8 text (byte {e.start}: {e.reason})") from None
        return cls.from_yaml_text(text, source=str(p))

    @classmethod
    def from_yaml_text(cls, text: str, *, source: str = "yaml") -> KvbmConfig:
        """Build from YAML text holding a mapping of config keys.

        Raises ConfigError for YAML that does not parse, nests too deeply or holds no mapping.
        """
        import yaml

        if _flow_depth(text) > MAX_YAML_NESTING:
            raise ConfigError(f"config file {source!r} nests more than {MAX_YAML_NESTING} levels deep")
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {source!r} is not valid YAML: {_shown(str(e))}") from None
        except RecursionError:
            raise ConfigError(f"config file {source!r} nests too deeply to be a kvbm config") from None
        except ValueError as e:  # e.g. an integer of more digits than Python converts
            raise ConfigError(f"config file {source!r} holds a value kvbm cannot read: {_shown(str(e))}") from None
        return cls.from_dict({} if data is None else data, source=source)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> KvbmConfig:
        """Build from ``KVBM_<FIELD>`` environment variables (e.g. ``KVBM_HOST_CAPACITY_BYTES=4GiB``).

        ``KVBM_CONFIG`` may name a YAML file applied first. Other ``KVBM_*`` variables that are
        not config fields (build switches such as ``KVBM_CUDA``) are ignored.
        """
        env = os.environ if environ is None else environ
        data: dict[str, Any] = {}
        if env.get("KVBM_CONFIG"):
            data.update(dataclasses.asdict(cls.from_yaml(env["KVBM_CONFIG"])))
            data.pop("_source", None)
        for name in cls.field_names():
            raw = env.get(f"KVBM_{name.upper()}")
            if raw is not None:
                data[name] = raw
        data.update(overrides)
        return cls.from_dict(data, source="environment")

    # ---- validation ---------------------------------------------------------------------------
    def _coerce(self) -> None:
        hints = get_type_hints(type(self))
        for f in fields(self):
            if f.name.startswith("_"):
                continue
            v = getattr(self, f.name)
            t = hints[f.name]
            optional = get_origin(t) in (Union, types.UnionType) and type(None) in get_args(t)
            base = next((a for a in get_args(t) if a is not type(None)), t) if optional else t
            if v is None:
                if optional:
                    continue
                raise ConfigError(f"{f.name}: must not be None")
            if f.name in _SIZE_FIELDS:
                setattr(self, f.name, parse_size(v, f.name))
            elif base is bool:
                if isinstance(v, str):
                    lv = v.strip().lower()
                    if lv in ("1", "true", "yes", "on"):
                        v = True
                    elif lv in ("0", "false", "no", "off"):
                        v = False
                    elif optional and lv in ("", "none", "auto"):
                        v = None
                if v is not None and not isinstance(v, bool):
                    raise ConfigError(f"{f.name}: expected true/false, got {v!r}")
                setattr(self, f.name, v)
            elif base is int:
                if isinstance(v, str):
                    try:
                        v = int(v.strip()) if len(v) <= 64 else None
                    except ValueError:
                        v = None
                    if v is None:
                        raise ConfigError(f"{f.name}: expected an integer, got {_shown(getattr(self, f.name))}")
                if isinstance(v, bool) or not isinstance(v, int):
                    raise ConfigError(f"{f.name}: expected an integer, got {_shown(v)}")
                if not -MAX_SIZE_BYTES <= v <= MAX_SIZE_BYTES:
                    raise ConfigError(f"{f.name}: {_shown(v)} is out of range")
                setattr(self, f.name, v)
            elif base is float:
                if isinstance(v, str):
                    try:
                        v = float(v.strip()) if len(v) <= 64 else None
                    except ValueError:
                        v = None
                    if v is None:
                        raise ConfigError(f"{f.name}: expected a number, got {_shown(getattr(self, f.name))}")
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise ConfigError(f"{f.name}: expected a number, got {_shown(v)}")
                if isinstance(v, int) and abs(v) > MAX_SIZE_BYTES:
                    raise ConfigError(f"{f.name}: {_shown(v)} is out of range")
                if v != v:  # NaN compares false with every bound: refuse it by name
                    raise ConfigError(f"{f.name}: expected a number, got nan")
                setattr(self, f.name, float(v))
            elif base is str and not isinstance(v, str):
                raise ConfigError(f"{f.name}: expected a string, got {_shown(v)}")

    def validate(self) -> None:
        """Check every value; raise ConfigError naming the first bad key."""
        from kvbm import _native

        if not 0 < self.block_size <= MAX_BLOCK_SIZE:
            raise ConfigError(f"block_size: must be 1..{MAX_BLOCK_SIZE}, got {self.block_size}")
        if not 0 <= self.block_bytes <= MAX_BLOCK_BYTES:
            raise ConfigError(
                f"block_bytes: must be 0..{MAX_BLOCK_BYTES} (0 = set by the engine), got {self.block_bytes}"
            )
        if self.host_capacity_bytes <= 0:
            raise ConfigError(f"host_capacity_bytes: must be positive, got {self.host_capacity_bytes}")
        if self.block_bytes and self.host_capacity_bytes < self.block_bytes:
            raise ConfigError(
                f"host_capacity_bytes: {self.host_capacity_bytes} bytes hold no block of {self.block_bytes} bytes"
            )
        policies = list(_native.eviction_policy_names())
        if self.eviction_policy not in policies:
            raise ConfigError(f"eviction_policy: unknown policy {self.eviction_policy!r}; known: {', '.join(policies)}")
        if self.hash_algorithm not in ("sha256", "fast128"):
            raise ConfigError(f"hash_algorithm: must be 'sha256' or 'fast128', got {self.hash_algorithm!r}")
        if not 0 < self.index_initial_capacity <= MAX_INDEX_INITIAL_CAPACITY:
            raise ConfigError(
                f"index_initial_capacity: must be 1..{MAX_INDEX_INITIAL_CAPACITY} (the index grows as needed), "
                f"got {self.index_initial_capacity}"
            )
        if self.metrics_port is not None and not (0 <= self.metrics_port <= 65535):
            raise ConfigError(f"metrics_port: must be 0..65535, got {self.metrics_port}")
        if self.disk_capacity_bytes < 0:
            raise ConfigError(f"disk_capacity_bytes: must be >= 0, got {self.disk_capacity_bytes}")
        if self.disk_write_policy not in ("write_behind", "write_through"):
            raise ConfigError(
                f"disk_write_policy: must be 'write_behind' or 'write_through', got {self.disk_write_policy!r}"
            )
        if self.disk_durability not in ("none", "batch", "always"):
            raise ConfigError(f"disk_durability: must be 'none', 'batch' or 'always', got {self.disk_durability!r}")
        if self.disk_io_threads <= 0 or self.disk_io_threads > 256:
            raise ConfigError(f"disk_io_threads: must be 1..256, got {self.disk_io_threads}")
        if self.remote_url is not None:
            from kvbm.tier_registry import url_scheme

            url_scheme(self.remote_url)  # a registered scheme (no tier is imported)
        if self.remote_write_policy not in ("write_through", "write_behind", "read_only"):
            raise ConfigError(
                "remote_write_policy: must be 'write_through', 'write_behind' or 'read_only', "
                f"got {self.remote_write_policy!r}"
            )
        if not 0 < self.remote_timeout_s <= 3600:
            raise ConfigError(f"remote_timeout_s: must be in (0, 3600], got {self.remote_timeout_s}")
        if not 1 <= self.remote_threads <= 64:
            raise ConfigError(f"remote_threads: must be 1..64, got {self.remote_threads}")
        if not self.remote_namespace:
            raise ConfigError("remote_namespace: must not be empty")
        # disk tier (kvbm.tiers.disk): the directory itself is checked when the tier opens.
        if self.disk_path is not None and self.disk_capacity_bytes <= 0:
            raise ConfigError(
                f"disk_capacity_bytes: must be positive when disk_path is set, got {self.disk_capacity_bytes}"
            )
        if self.disk_path is not None and self.block_bytes and self.disk_capacity_bytes < self.block_bytes:
            raise ConfigError(
                f"disk_capacity_bytes: {self.disk_capacity_bytes} bytes hold no block of {self.block_bytes} bytes"
            )

    def to_dict(self) -> dict[str, Any]:
        """The effective configuration as plain data."""
        return {name: getattr(self, name) for name in self.field_names()}
