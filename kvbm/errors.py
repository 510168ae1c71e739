"""The kvbm exception family.

Every error kvbm raises derives from :class:`KvbmError`. Native status codes are mapped to these
classes in one place (``bindings/module.cpp``); Python code raises them directly. Where a
built-in exception fits, the class also derives from it (``ValueError``, ``KeyError``, ...), so
``except ValueError`` keeps working for callers that expect it.
"""

from __future__ import annotations


class KvbmError(Exception):
    """Base class of every kvbm error."""


class InvalidArgumentError(KvbmError, ValueError):
    """A caller-supplied value is wrong (size, dtype, alignment, block_size <= 0, ...)."""


class OutOfRangeError(InvalidArgumentError, IndexError):
    """An index, block id or slot lies outside its valid range."""


class ConfigError(InvalidArgumentError):
    """The configuration is invalid; the message names the offending key."""


class TraceFormatError(InvalidArgumentError):
    """A trace file line is malformed; the message names the line number."""


class CapacityError(KvbmError):
    """No room in a tier and nothing evictable (everything pinned or in flight)."""


class StateError(KvbmError):
    """The block state machine refused a transition (e.g. loading a block still being stored)."""


class AlreadyExistsError(StateError):
    """The block is already present in that tier."""


class BlockNotFoundError(KvbmError, KeyError):
    """A block hash (or handle) that is not present."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class StorageIOError(KvbmError, OSError):
    """A file system or device error while reading or writing blocks."""


class ChecksumError(KvbmError):
    """Stored bytes failed verification (checksum, length or namespace mismatch)."""


class CudaUnavailableError(KvbmError, RuntimeError):
    """A GPU feature was used on a build without CUDA or a machine without a GPU."""


class CudaError(KvbmError, RuntimeError):
    """The CUDA runtime reported an error."""


class TransferTimeoutError(KvbmError, TimeoutError):
    """A transfer or wait ran past its deadline."""


class PeerError(KvbmError, ConnectionError):
    """A remote peer failed, refused, or vanished."""


class ClosedError(KvbmError):
    """The object was closed (``BlockManager.close()``); every later call raises this."""


class UnsupportedError(KvbmError, NotImplementedError):
    """A valid request this build or tier cannot perform."""


class InternalError(KvbmError, RuntimeError):
    """A broken invariant inside kvbm: please report it."""


__all__ = [name for name, obj in globals().items() if isinstance(obj, type) and issubclass(obj, KvbmError)]
