"""kvbm — a native-accelerated KV-cache block manager for LLM serving.

``import kvbm`` never imports torch. See the README for a tour.
"""

from kvbm._version import __version__
from kvbm.errors import *  # noqa: F401,F403
from kvbm.errors import KvbmError
from kvbm.hashing import Namespace, block_hashes

__all__ = ["KvbmError", "Namespace", "__version__", "block_hashes"]
