"""Configuration of ``kvbm router``: the instances behind it, from the command line or YAML.

YAML::

    host: 127.0.0.1
    port: 8000
    policy: kv            # kv (cost model) | round_robin
    max_blocks: 2000000   # bound of the block index
    instances:
      - url: http://127.0.0.1:8001
        events: tcp://127.0.0.1:5557        # vLLM's --kv-events-config endpoint (GPU, and kvbm's tiers)
        replay: tcp://127.0.0.1:5558        # its replay_endpoint
        kvbm_events: tcp://127.0.0.1:5567   # optional: the connector's own events_endpoint
        kvbm_replay: tcp://127.0.0.1:5568
        block_bytes: 16384                  # optional: else from vllm:cache_config_info
        bandwidth: {CPU: 20e9, DISK: 2e9, REMOTE: 1e9}   # bytes/s, optional

On the command line: ``--instance URL[,events=EP][,replay=EP][,kvbm_events=EP][,kvbm_replay=EP]``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvbm.errors import ConfigError
from kvbm.router.index import TIER_NAMES

_INSTANCE_KEYS = ("url", "events", "replay", "kvbm_events", "kvbm_replay", "block_bytes", "bandwidth", "name")


@dataclass(frozen=True)
class InstanceConfig:
    """One vLLM instance behind the router."""

    url: str
    events: str | None = None
    replay: str | None = None
    kvbm_events: str | None = None
    kvbm_replay: str | None = None
    block_bytes: int | None = None
    bandwidth: dict[int, float] = field(default_factory=dict)  # tier -> bytes/s
    name: str | None = None

    @property
    def label(self) -> str:
        return self.name or self.url


@dataclass(frozen=True)
class RouterConfig:
    """Everything ``kvbm router`` needs."""

    instances: tuple[InstanceConfig, ...]
    host: str = "127.0.0.1"
    port: int = 8000
    policy: str = "kv"
    max_blocks: int = 2_000_000
    health_interval_s: float = 1.0
    metrics_interval_s: float = 2.0
    probe: bool = True
    request_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if not self.instances:
            raise ConfigError("kvbm router: no instances (give --instance URL or a YAML 'instances' list)")
        if self.policy not in ("kv", "round_robin"):
            raise ConfigError(f"kvbm router: policy must be 'kv' or 'round_robin', got {self.policy!r}")
        if isinstance(self.max_blocks, bool) or not isinstance(self.max_blocks, int) or self.max_blocks < 1:
            raise ConfigError(f"kvbm router: max_blocks must be an int >= 1, got {self.max_blocks!r}")
        if len({i.url for i in self.instances}) != len(self.instances):
            raise ConfigError("kvbm router: an instance URL is listed twice")


def parse_instance(spec: str | Mapping[str, Any], where: str = "--instance") -> InstanceConfig:
    """An :class:`InstanceConfig` from ``URL[,key=value...]`` or a YAML mapping.

    Raises:
        ConfigError: an unknown key, a URL that is not http(s), a bad number (all named).
    """
    if isinstance(spec, str):
        parts = [p.strip() for p in spec.split(",") if p.strip()]
        if not parts:
            raise ConfigError(f"{where}: empty instance")
        data: dict[str, Any] = {"url": parts[0]}
        for p in parts[1:]:
            if "=" not in p:
                raise ConfigError(f"{where}: expected key=value after the URL, got {p!r}")
            k, v = p.split("=", 1)
            data[k.strip()] = v.strip()
    elif isinstance(spec, Mapping):
        data = dict(spec)
    else:
        raise ConfigError(f"{where}: expected a URL or a mapping, got {type(spec).__name__}")
    unknown = sorted(str(k) for k in data if k not in _INSTANCE_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))} "
                          f"(known: {', '.join(_INSTANCE_KEYS)})")
    url = data.get("url")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise ConfigError(f"{where}: 'url' must be an http(s) URL, got {url!r}")
    for k in ("events", "replay", "kvbm_events", "kvbm_replay"):
        v = data.get(k)
        if v is not None and not (isinstance(v, str) and "://" in v):
            raise ConfigError(f"{where}: {k!r} must be a ZeroMQ endpoint like tcp://host:port, got {v!r}")
    bb = data.get("block_bytes")
    if bb is not None:
        try:
            bb = int(bb)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: 'block_bytes' must be an int, got {bb!r}") from None
        if bb < 0:
            raise ConfigError(f"{where}: 'block_bytes' must be >= 0, got {bb}")
    bw: dict[int, float] = {}
    raw_bw = data.get("bandwidth") or {}
    if not isinstance(raw_bw, Mapping):
        raise ConfigError(f"{where}: 'bandwidth' must be a mapping tier -> bytes/s, got {raw_bw!r}")
    for tier, v in raw_bw.items():
        name = str(tier).upper()
        if name not in TIER_NAMES:
            raise ConfigError(f"{where}: bandwidth tier {tier!r} is not one of {', '.join(TIER_NAMES)}")
        try:
            bw[TIER_NAMES.index(name)] = float(v)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: bandwidth[{tier!r}] must be a number, got {v!r}") from None
    return InstanceConfig(url=url.rstrip("/"), events=data.get("events"), replay=data.get("replay"),
                          kvbm_events=data.get("kvbm_events"), kvbm_replay=data.get("kvbm_replay"),
                          block_bytes=bb, bandwidth=bw, name=data.get("name"))


def load_yaml(path: str | Path, **overrides: Any) -> RouterConfig:
    """A :class:`RouterConfig` from a YAML file (``overrides`` that are not None win).

    Raises:
        ConfigError: the file cannot be read or parsed, or holds a bad value (named).
    """
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"kvbm router: cannot read {str(path)!r}: {e}") from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"kvbm router: {str(path)!r} must hold a mapping")
    known = ("host", "port", "policy", "max_blocks", "instances", "health_interval_s", "metrics_interval_s", "probe")
    unknown = sorted(str(k) for k in data if k not in known)
    if unknown:
        raise ConfigError(f"kvbm router: {str(path)!r}: unknown key(s) {', '.join(map(repr, unknown))}")
    insts = tuple(parse_instance(s, f"{path}: instances[{i}]") for i, s in enumerate(data.get("instances") or []))
    kw = {k: data[k] for k in known if k in data and k != "instances"}
    kw.update({k: v for k, v in overrides.items() if v is not None})
    return RouterConfig(instances=insts, **kw)
