"""kvbm — a native-accelerated KV-cache block manager for LLM serving.

``import kvbm`` never imports torch. See the README for a tour.
"""

from __future__ import annotations

from kvbm import _native
from kvbm._version import __version__
from kvbm.args import Pointer
from kvbm.errors import *
from kvbm.errors import KvbmError
from kvbm.hashing import Namespace, block_hashes


def eviction_policies() -> list[str]:
    """Names of the available eviction policies; the first is the default."""
    return list(_native.eviction_policy_names())


def build_info() -> dict:
    """What this build can do: version, CUDA compiled/available, UCX, eviction policies."""
    return {
        "version": __version__,
        "cuda_compiled": bool(_native.cuda_compiled()),
        "cuda_available": bool(_native.cuda_available()),
        "cuda_device_count": int(_native.cuda_device_count()),
        "ucx_compiled": bool(_native.ucx_compiled),
        "eviction_policies": eviction_policies(),
    }


from kvbm.config import KvbmConfig
from kvbm.manager import BlockManager, EngineTransfer, LookupResult, StorePlan, Tier

__all__ = [
    "BlockManager",
    "EngineTransfer",
    "KvbmConfig",
    "KvbmError",
    "LookupResult",
    "Namespace",
    "Pointer",
    "StorePlan",
    "Tier",
    "__version__",
    "block_hashes",
    "build_info",
    "eviction_policies",
]
