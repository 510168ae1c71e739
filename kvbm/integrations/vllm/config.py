"""Configuration of the vLLM connector, parsed from ``kv_connector_extra_config``.

Every key is checked once, at engine start-up, in both the scheduler and the worker processes;
an unknown key or a value of the wrong type raises :class:`kvbm.errors.ConfigError` naming the
key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kvbm.errors import ConfigError

_SIZE_SUFFIXES = {
    "": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1 << 10, "m": 1000**2, "mb": 1000**2, "mib": 1 << 20,
    "g": 1000**3, "gb": 1000**3, "gib": 1 << 30, "t": 1000**4, "tb": 1000**4, "tib": 1 << 40,
}


def parse_size(key: str, value: Any) -> int:
    """Parse a byte count: an int, or a string like ``"512MiB"`` / ``"4GB"``.

    Raises:
        ConfigError: naming ``key`` when the value is not a non-negative size.
    """
    if isinstance(value, bool):
        raise ConfigError(f"kv_connector_extra_config[{key!r}]: expected a byte size, got {value!r}")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str):
        s = value.strip().lower().replace(" ", "")
        num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
        suffix = s[len(num):]
        if suffix not in _SIZE_SUFFIXES or not num:
            raise ConfigError(f"kv_connector_extra_config[{key!r}]: cannot parse size {value!r} "
                              f"(use an int or e.g. '512MiB', '4GB')")
        try:
            n = int(float(num) * _SIZE_SUFFIXES[suffix])
        except ValueError:
            raise ConfigError(f"kv_connector_extra_config[{key!r}]: cannot parse size {value!r}") from None
    else:
        raise ConfigError(f"kv_connector_extra_config[{key!r}]: expected a byte size, got {value!r}")
    if n < 0:
        raise ConfigError(f"kv_connector_extra_config[{key!r}]: must be >= 0, got {value!r}")
    return n


@dataclass(frozen=True)
class ConnectorConfig:
    """What the kvbm vLLM connector does, from ``kv_connector_extra_config``.

    Attributes:
        host_bytes: capacity of the host (CPU memory) tier per worker (tensor-parallel rank).
        disk_path: directory of the disk tier; ``None`` disables it. Blocks are written through
            to disk in the background, so a block evicted from host stays loadable from disk and
            a new engine over the same directory finds them.
        disk_bytes: capacity of the disk tier per worker.
        hash_algorithm: ``"sha256"`` (default, collision resistant) or ``"blake2b"``.
        model_id: identity of the model in the block namespace; defaults to vLLM's model name
            or path plus revision. Set it when the same weights are served from different paths.
        verify_checksums: verify a block's checksum when it is read back from disk.
        store_decode_blocks: also offload full blocks produced during decode (not only prompt).
        min_hit_blocks: ignore external hits shorter than this many blocks.
    """

    host_bytes: int = 1 << 30
    disk_path: str | None = None
    disk_bytes: int = 16 << 30
    hash_algorithm: str = "sha256"
    model_id: str | None = None
    verify_checksums: bool = True
    store_decode_blocks: bool = True
    min_hit_blocks: int = 1

    @classmethod
    def from_extra_config(cls, extra: Mapping[str, Any] | None) -> ConnectorConfig:
        """Build and validate from the ``kv_connector_extra_config`` mapping.

        Raises:
            ConfigError: an unknown key (named, with the list of known keys) or a bad value.
        """
        extra = dict(extra or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in extra if k not in known)
        if unknown:
            raise ConfigError(
                f"kv_connector_extra_config: unknown key(s) {', '.join(repr(k) for k in unknown)} "
                f"for the kvbm connector (known keys: {', '.join(sorted(known))})")
        kw: dict[str, Any] = {}
        for key, value in extra.items():
            if key in ("host_bytes", "disk_bytes"):
                kw[key] = parse_size(key, value)
            elif key in ("disk_path", "model_id"):
                if value is not None and not (isinstance(value, (str, os.PathLike)) and str(value)):
                    raise ConfigError(f"kv_connector_extra_config[{key!r}]: expected a non-empty string "
                                      f"or null, got {value!r}")
                kw[key] = None if value is None else os.fspath(value)
            elif key == "hash_algorithm":
                if value not in ("sha256", "blake2b"):
                    raise ConfigError(f"kv_connector_extra_config['hash_algorithm']: expected 'sha256' or "
                                      f"'blake2b', got {value!r}")
                kw[key] = value
            elif key in ("verify_checksums", "store_decode_blocks"):
                if not isinstance(value, bool):
                    raise ConfigError(f"kv_connector_extra_config[{key!r}]: expected true/false, got {value!r}")
                kw[key] = value
            elif key == "min_hit_blocks":
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ConfigError(f"kv_connector_extra_config['min_hit_blocks']: expected an int >= 1, "
                                      f"got {value!r}")
                kw[key] = value
        cfg = cls(**kw)
        if cfg.host_bytes == 0:
            raise ConfigError("kv_connector_extra_config['host_bytes']: must be > 0 (the host tier also "
                              "stages blocks written through to disk)")
        if cfg.disk_path is not None and cfg.disk_bytes == 0:
            raise ConfigError("kv_connector_extra_config['disk_bytes']: must be > 0 when disk_path is set")
        return cfg
