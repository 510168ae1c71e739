"""Configuration of ``kvbm router``: the instances behind it, from the command line or YAML.

YAML::

    host: 127.0.0.1
    port: 8000
    policy: kv            # kv (cost model) | round_robin
    max_blocks: 2000000   # bound of the block index
    pd_bandwidth: 5e9     # bytes/s of a decode instance's KV pull, unless measured or set per instance
    instances:
      - url: http://127.0.0.1:8001
        role: both                          # prefill | decode | both (default); see docs/router.md
        events: tcp://127.0.0.1:5557        # vLLM's --kv-events-config endpoint (GPU, and kvbm's tiers)
        replay: tcp://127.0.0.1:5558        # its replay_endpoint
        kvbm_events: tcp://127.0.0.1:5567   # optional: the connector's own events_endpoint
        kvbm_replay: tcp://127.0.0.1:5568
        block_bytes: 16384                  # optional: else from vllm:cache_config_info
        bandwidth: {CPU: 20e9, DISK: 2e9, REMOTE: 1e9}   # bytes/s, optional
        pull_bandwidth: 10e9                # optional: bytes/s this instance pulls prefilled KV at

On the command line: ``--instance URL[,events=EP][,replay=EP][,kvbm_events=EP][,kvbm_replay=EP][,role=R]``.
With at least one ``prefill`` and one ``decode`` instance the router disaggregates (kvbm/router/pd.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvbm.errors import ConfigError
from kvbm.router.index import TIER_NAMES

_INSTANCE_KEYS = ("url", "events", "replay", "kvbm_events", "kvbm_replay", "block_bytes", "bandwidth", "name",
                  "role", "pull_bandwidth")
#: What an instance does when the router disaggregates prefill and decode.
ROLES = ("prefill", "decode", "both")


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
    role: str = "both"  # one of ROLES
    pull_bandwidth: float | None = None  # bytes/s of its KV pulls as a decode instance; None: measured

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
    pd_bandwidth: float = 5e9  # bytes/s of a KV pull before one is measured (instances without pull_bandwidth)

    @property
    def disaggregated(self) -> bool:
        """Whether prefill and decode run apart: at least one ``prefill`` and one ``decode`` instance."""
        roles = {i.role for i in self.instances}
        return "prefill" in roles and "decode" in roles

    def __post_init__(self) -> None:
        if not self.instances:
            raise ConfigError("kvbm router: no instances (give --instance URL or a YAML 'instances' list)")
        if self.policy not in ("kv", "round_robin"):
            raise ConfigError(f"kvbm router: policy must be 'kv' or 'round_robin', got {self.policy!r}")
        if isinstance(self.max_blocks, bool) or not isinstance(self.max_blocks, int) or self.max_blocks < 1:
            raise ConfigError(f"kvbm router: max_blocks must be an int >= 1, got {self.max_blocks!r}")
        if len({i.url for i in self.instances}) != len(self.instances):
            raise ConfigError("kvbm router: an instance URL is listed twice")
        if not _positive(self.pd_bandwidth):
            raise ConfigError(f"kvbm router: pd_bandwidth must be a number of bytes/s > 0, got {self.pd_bandwidth!r}")


def _positive(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and v > 0


def _number(data: Mapping[str, Any], key: str, where: str, kind: type, what: str, positive: bool) -> Any:
    """``data[key]`` as ``kind`` (None when absent); a ConfigError naming the key otherwise."""
    v = data.get(key)
    if v is None:
        return None
    try:
        n = kind(v)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {key!r} must be {what}, got {v!r}") from None
    if n < 0 or (positive and not n > 0):
        raise ConfigError(f"{where}: {key!r} must be {'> 0' if positive else '>= 0'}, got {n}")
    return n


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
    bb = _number(data, "block_bytes", where, int, "an int", positive=False)
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
    role = data.get("role", "both")
    if role not in ROLES:
        raise ConfigError(f"{where}: 'role' must be one of {', '.join(ROLES)}, got {role!r}")
    pull = _number(data, "pull_bandwidth", where, float, "a number of bytes/s", positive=True)
    return InstanceConfig(url=url.rstrip("/"), events=data.get("events"), replay=data.get("replay"),
                          kvbm_events=data.get("kvbm_events"), kvbm_replay=data.get("kvbm_replay"),
                          block_bytes=bb, bandwidth=bw, name=data.get("name"), role=role, pull_bandwidth=pull)


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
    known = ("host", "port", "policy", "max_blocks", "instances", "health_interval_s", "metrics_interval_s", "probe",
             "pd_bandwidth")
    unknown = sorted(str(k) for k in data if k not in known)
    if unknown:
        raise ConfigError(f"kvbm router: {str(path)!r}: unknown key(s) {', '.join(map(repr, unknown))}")
    insts = tuple(parse_instance(s, f"{path}: instances[{i}]") for i, s in enumerate(data.get("instances") or []))
    kw = {k: data[k] for k in known if k in data and k != "instances"}
    if isinstance(kw.get("pd_bandwidth"), str):  # YAML 1.1 reads 5e9 (no dot) as a string
        try:
            kw["pd_bandwidth"] = float(kw["pd_bandwidth"])
        except ValueError:
            raise ConfigError(f"kvbm router: {str(path)!r}: pd_bandwidth must be a number, "
                              f"got {kw['pd_bandwidth']!r}") from None
    kw.update({k: v for k, v in overrides.items() if v is not None})
    return RouterConfig(instances=insts, **kw)
