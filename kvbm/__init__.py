"""kvbm — a native-accelerated KV-cache block manager for LLM serving.

``import kvbm`` never imports torch. See the README for a tour.
"""

from kvbm._version import __version__
from kvbm.errors import *
from kvbm.errors import KvbmError

__all__ = ["KvbmError", "__version__"]
