"""kvbm's vLLM KV connector.

Use ``"kv_connector": "KvbmConnector", "kv_connector_module_path": "kvbm.integrations.vllm"``.
``KvbmConnector`` is imported lazily (it imports vLLM and torch); the configuration, hashing,
index and disk modules import neither, so they can be used and tested without vLLM.
"""

from typing import Any

from kvbm.integrations.vllm.config import ConnectorConfig

__all__ = ["ConnectorConfig", "KvbmConnector"]


def __getattr__(name: str) -> Any:
    if name == "KvbmConnector":
        from kvbm.integrations.vllm.connector import KvbmConnector

        return KvbmConnector
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
