"""Configuration of the vLLM connector, parsed from ``kv_connector_extra_config``.

The mapping holds :class:`kvbm.KvbmConfig` keys (``host_capacity_bytes``, ``disk_path``, ...)
plus a few connector-only keys (``model_id``, ``store_decode_blocks``, ``min_hit_blocks``,
``async_load``, ``layerwise``).
Everything is checked once, at engine start-up, in the scheduler and in every worker process:
an unknown key, a key this connector does not honour, or a bad value raises
:class:`kvbm.errors.ConfigError` naming the key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kvbm.config import KvbmConfig
from kvbm.errors import ConfigError
from kvbm.integrations.vllm.pd import PD_KEYS, PdConfig

SOURCE = "kv_connector_extra_config"

#: KvbmConfig keys the connector honours.
KVBM_KEYS = ("host_capacity_bytes", "host_pinned", "eviction_policy", "hash_algorithm", "checksums",
             "index_initial_capacity", "disk_path", "disk_capacity_bytes", "disk_write_policy",
             "disk_durability", "disk_io_threads", "disk_o_direct")
#: KvbmConfig keys that are valid elsewhere but not here, with the reason.
NOT_HERE = {
    "block_size": "vLLM's block size is used",
    "block_bytes": "the block size in bytes comes from vLLM's KV cache layout",
    "metrics_port": "use vLLM's own metrics (external prefix cache hits by tier) and KV events",
}


@dataclass(frozen=True)
class ConnectorConfig:
    """What the kvbm vLLM connector does.

    Attributes:
        kvbm: the validated :class:`kvbm.KvbmConfig` (capacities are per worker, i.e. per
            tensor-parallel rank). The disk tier is write-through by default: every block stored
            to host is also written to disk in the background; with ``disk_write_policy:
            write_behind`` blocks are written to disk when the host tier evicts them.
        model_id: identity of the model in the block namespace; defaults to vLLM's model name or
            path. Set it when the same weights are served from different paths.
        store_decode_blocks: also offload full blocks produced during decode (not only prompt).
        min_hit_blocks: ignore external hits shorter than this many blocks.
        events_endpoint: also publish kvbm's tier events (vLLM's KV-event format, see
            :mod:`kvbm.events`) on this ZeroMQ PUB endpoint (bound when it holds ``*``); None: they
            go only to vLLM (``take_events``), which publishes them with its own KV events.
        events_replay_endpoint: the ROUTER endpoint that replays missed batches (needs
            ``events_endpoint``).
        pd: prefill/decode settings (``pd``, ``pd_host``, ``pd_port``, ``pd_lease_s``,
            ``pd_timeout_s``; see :class:`kvbm.integrations.vllm.pd.PdConfig`), None when off.
        async_load: load hits asynchronously (vLLM's ``load_kv_async``): the request waits in
            ``WAITING_FOR_REMOTE_KVS`` while a worker thread copies its blocks, and other requests
            keep running; with ``False`` hits are loaded synchronously before the forward pass.
        layerwise: on CUDA (with a pinned host arena), copy layer by layer on kvbm's own streams,
            overlapped with the forward: a synchronous load's layer l is waited for just before
            layer l's attention, and layer l is saved as soon as its attention wrote it. With
            ``False`` (and always on vLLM's CPU platform) whole blocks move before and after the
            forward.
    """

    kvbm: KvbmConfig = field(default_factory=lambda: KvbmConfig(_source=SOURCE))
    model_id: str | None = None
    store_decode_blocks: bool = True
    min_hit_blocks: int = 1
    async_load: bool = True
    layerwise: bool = True
    pd: PdConfig | None = None
    events_endpoint: str | None = None
    events_replay_endpoint: str | None = None

    @property
    def disk_path(self) -> str | None:
        return self.kvbm.disk_path

    @classmethod
    def from_extra_config(cls, extra: Mapping[str, Any] | None, kv_role: str | None = None) -> ConnectorConfig:
        """Build and validate from the ``kv_connector_extra_config`` mapping (``kv_role`` decides
        whether prefill/decode is on by default).

        Raises:
            ConfigError: an unknown key (named, with the list of known keys), a key this connector
                does not honour (named, with the reason), or a bad value (named).
        """
        if extra is not None and not isinstance(extra, Mapping):
            raise ConfigError(f"{SOURCE}: expected a mapping, got {type(extra).__name__}")
        data = dict(extra or {})
        own = ("model_id", "store_decode_blocks", "min_hit_blocks", "async_load", "layerwise",
               "events_endpoint", "events_replay_endpoint", *PD_KEYS)
        for key in data:
            if key in NOT_HERE:
                raise ConfigError(f"{SOURCE}[{key!r}]: not used by the vLLM connector ({NOT_HERE[key]})")
            if key in KvbmConfig.field_names() and key not in KVBM_KEYS:
                raise ConfigError(f"{SOURCE}[{key!r}]: a kvbm setting the vLLM connector does not support yet")
        unknown = sorted(str(k) for k in data if k not in KVBM_KEYS and k not in own)
        if unknown:
            raise ConfigError(
                f"{SOURCE}: unknown key(s) {', '.join(map(repr, unknown))} for the kvbm vLLM connector "
                f"(known keys: {', '.join(sorted((*KVBM_KEYS, *own)))})")
        kw: dict[str, Any] = {}
        model_id = data.pop("model_id", None)
        if model_id is not None and not (isinstance(model_id, str) and model_id):
            raise ConfigError(f"{SOURCE}['model_id']: expected a non-empty string, got {model_id!r}")
        kw["model_id"] = model_id
        for name in ("store_decode_blocks", "async_load", "layerwise"):
            if name in data:
                v = data.pop(name)
                if not isinstance(v, bool):
                    raise ConfigError(f"{SOURCE}[{name!r}]: expected true/false, got {v!r}")
                kw[name] = v
        if "min_hit_blocks" in data:
            v = data.pop("min_hit_blocks")
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{SOURCE}['min_hit_blocks']: expected an int >= 1, got {v!r}")
            kw["min_hit_blocks"] = v
        for name in ("events_endpoint", "events_replay_endpoint"):
            v = data.pop(name, None)
            if v is not None and not (isinstance(v, str) and "://" in v):
                raise ConfigError(f"{SOURCE}[{name!r}]: expected a ZeroMQ endpoint like 'tcp://*:5560', got {v!r}")
            kw[name] = v
        if kw["events_replay_endpoint"] and not kw["events_endpoint"]:
            raise ConfigError(f"{SOURCE}['events_replay_endpoint']: needs 'events_endpoint'")
        kw["pd"] = PdConfig.parse(data, kv_role, SOURCE)
        data.setdefault("disk_write_policy", "write_through")
        try:
            kcfg = KvbmConfig.from_dict(data, source=SOURCE)
        except ConfigError as e:
            raise ConfigError(f"{SOURCE}: {e}") from None
        if kcfg.disk_path is not None and kcfg.disk_capacity_bytes <= 0:
            raise ConfigError(f"{SOURCE}['disk_capacity_bytes']: must be > 0 when disk_path is set")
        return cls(kvbm=kcfg, **kw)
