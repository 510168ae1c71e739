"""kvbm's vLLM KV connector. Importing this package imports vLLM and torch (``import kvbm`` does not).

Use ``"kv_connector": "KvbmConnector", "kv_connector_module_path": "kvbm.integrations.vllm"``.
"""

from kvbm.integrations.vllm.config import ConnectorConfig
from kvbm.integrations.vllm.connector import KvbmConnector

__all__ = ["ConnectorConfig", "KvbmConnector"]
