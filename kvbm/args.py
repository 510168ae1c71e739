"""Argument checks for kvbm's public entry points: buffers, pointers, counts and block ids.

Design note — no bare ints as memory.
    The native core copies blocks to and from raw addresses. An ``int`` given where a buffer is
    expected used to be taken as such an address, so ``store(hashes, 5)`` (or ``True``, or a
    list of ints) wrote to address 5 and crashed the process. Memory now crosses the public API
    in two forms only: an object with the buffer protocol (numpy arrays, bytes, bytearray,
    memoryview; CPU torch tensors are viewed through their bytes), or an explicit
    :class:`Pointer` that carries its size. Both are turned into a numpy ``uint8`` view here,
    where size, writability, contiguity and dtype (no object arrays) are checked, so the native
    call only ever receives a checked view. A ``Pointer`` is the caller's promise that the
    memory is valid; nothing else is taken on trust.

Every check raises :class:`~kvbm.errors.InvalidArgumentError` (or ``OutOfRangeError``) naming
the argument; nothing here lets a ``TypeError`` or ``OverflowError`` through.
"""

from __future__ import annotations

import ctypes
import enum
import math
import sys
from typing import Any

import numpy as np

from kvbm.errors import InvalidArgumentError, OutOfRangeError

_U64_LIMIT = 1 << 64


class Pointer:
    """Memory the caller vouches for: ``nbytes`` bytes at ``address`` (e.g. from ``data_ptr()``).

    Use it where kvbm takes a buffer and the memory has no Python buffer object. kvbm cannot
    check that the range is mapped; passing a wrong pointer is undefined behaviour, exactly as
    in C.

    Args:
        address: a non-zero address below 2**64.
        nbytes: the size of the range in bytes (>= 0).
        readonly: True when kvbm may only read the range.

    Raises:
        InvalidArgumentError: address or nbytes not an int, zero/negative/too large.
    """

    __slots__ = ("address", "nbytes", "readonly")

    def __init__(self, address: int, nbytes: int, *, readonly: bool = False) -> None:
        self.address = int_arg(address, "Pointer.address", 1, _U64_LIMIT - 1)
        self.nbytes = int_arg(nbytes, "Pointer.nbytes", 0, sys.maxsize)
        self.readonly = bool(readonly)

    def __repr__(self) -> str:
        return f"Pointer(0x{self.address:x}, {self.nbytes}{', readonly=True' if self.readonly else ''})"

    def as_array(self) -> np.ndarray:
        """A numpy uint8 view of the range (read-only when ``readonly``)."""
        if self.nbytes == 0:
            return np.empty(0, np.uint8)
        arr = np.frombuffer((ctypes.c_uint8 * self.nbytes).from_address(self.address), np.uint8)
        if self.readonly:
            arr.flags.writeable = False
        return arr


def int_arg(value: Any, what: str, lo: int, hi: int) -> int:
    """``value`` as an int in ``lo..hi``; floats (even 2.0), bools and str are refused.

    Raises:
        InvalidArgumentError: not an integer; OutOfRangeError: outside ``lo..hi``.
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InvalidArgumentError(f"{what}: expected an integer, got {_describe(value)}")
    v = int(value)
    if not lo <= v <= hi:
        shown = str(v) if v.bit_length() <= 128 else f"an int of {v.bit_length()} bits"
        raise OutOfRangeError(f"{what}: must be in {lo}..{hi}, got {shown}")
    return v


def float_arg(value: Any, what: str, lo: float, hi: float, *, allow_none: bool = False) -> float | None:
    """``value`` as a finite float in ``[lo, hi]`` (None passes when ``allow_none``)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InvalidArgumentError(f"{what}: expected a number, got {_describe(value)}")
    try:
        v = float(value)
    except OverflowError:
        raise OutOfRangeError(f"{what}: must be in {lo}..{hi}, got an int of {int(value).bit_length()} bits") from None
    if math.isnan(v) or not lo <= v <= hi:
        raise OutOfRangeError(f"{what}: must be in {lo}..{hi}, got {v}")
    return v


def block_ids_arg(block_ids: Any, what: str = "block_ids") -> np.ndarray:
    """Engine block ids as a 1-D int64 array; floats are refused (no silent truncation).

    Raises:
        InvalidArgumentError: not a 1-D sequence/array of integers, or an id outside 0..2**63-1.
    """
    if isinstance(block_ids, (str, bytes, bytearray, memoryview)) or block_ids is None:
        raise InvalidArgumentError(f"{what}: expected a sequence of integer block ids, got {_describe(block_ids)}")
    if isinstance(block_ids, np.ndarray):
        if block_ids.dtype.kind not in "iu":
            raise InvalidArgumentError(f"{what}: expected an integer array, got dtype {block_ids.dtype}")
        if block_ids.ndim != 1:
            raise InvalidArgumentError(f"{what}: expected a 1-D array, got shape {block_ids.shape}")
        if block_ids.size and (int(block_ids.min()) < 0 or int(block_ids.max()) > np.iinfo(np.int64).max):
            raise OutOfRangeError(f"{what}: block ids must be in 0..2**63-1")
        return block_ids.astype(np.int64, copy=False)
    try:
        items = list(block_ids)
    except TypeError:
        msg = f"{what}: expected a sequence of integer block ids, got {_describe(block_ids)}"
        raise InvalidArgumentError(msg) from None
    return np.array([int_arg(b, f"{what}[{i}]", 0, (1 << 63) - 1) for i, b in enumerate(items)], np.int64)


def byte_view(obj: Any, what: str, *, nbytes: int | None = None, writable: bool = False) -> np.ndarray:
    """A flat numpy uint8 view of ``obj``'s memory (no copy), checked.

    ``obj``: an object with the buffer protocol, a CPU torch tensor, or a :class:`Pointer`.

    Raises:
        InvalidArgumentError: an int/bool/None or other non-buffer, an object array, a
            non-contiguous or read-only (when ``writable``) buffer, or a size other than ``nbytes``.
    """
    arr = _as_array(obj, what)
    if writable and not arr.flags.writeable:
        raise InvalidArgumentError(f"{what}: buffer must be writable")
    if nbytes is not None and arr.nbytes != nbytes:
        raise InvalidArgumentError(f"{what}: buffer has {arr.nbytes} bytes, expected {nbytes}")
    return arr


def block_rows(
    data: Any, n: int, block_bytes: int, what: str, *, writable: bool = False
) -> np.ndarray | list[np.ndarray]:
    """Checked views of ``n`` blocks of ``block_bytes``: one ``(n, block_bytes)`` uint8 array when
    ``data`` is one buffer of ``n * block_bytes`` bytes, or a list of ``n`` row views when it is
    a list/tuple of buffers (rows may then live apart). Same errors as :func:`byte_view`.
    """
    if isinstance(data, (list, tuple)):
        if len(data) != n:
            raise InvalidArgumentError(f"{what}: {len(data)} buffers for {n} blocks")
        return [byte_view(d, f"{what}[{i}]", nbytes=block_bytes, writable=writable) for i, d in enumerate(data)]
    arr = byte_view(data, what, nbytes=n * block_bytes, writable=writable)
    return arr.reshape(n, block_bytes)


def enum_arg(value: Any, enum_cls: type[enum.IntEnum], what: str) -> Any:
    """A member of the IntEnum ``enum_cls`` from a member, its int value or its name (any case)."""
    if isinstance(value, str):
        try:
            return enum_cls[value.upper()]
        except KeyError:
            names = [m.name.lower() for m in enum_cls]
            raise InvalidArgumentError(f"{what}: unknown value {value!r}; expected one of {names}") from None
    values = [int(m) for m in enum_cls]
    return enum_cls(int_arg(value, what, min(values), max(values)))


def tiers_out_arg(tiers_out: Any, n: int, what: str = "tiers_out") -> np.ndarray:
    """Check a caller-owned output array: writable, C-contiguous, 1-D uint8, at least ``n`` long."""
    if not isinstance(tiers_out, np.ndarray) or tiers_out.dtype != np.uint8 or tiers_out.ndim != 1:
        got = (f"dtype {tiers_out.dtype} shape {tiers_out.shape}" if isinstance(tiers_out, np.ndarray)
               else type(tiers_out).__name__)
        raise InvalidArgumentError(f"{what}: expected a 1-D uint8 numpy array, got {got}")
    if not tiers_out.flags.c_contiguous or not tiers_out.flags.writeable:
        raise InvalidArgumentError(f"{what}: must be writable and C-contiguous")
    if tiers_out.size < n:
        raise InvalidArgumentError(f"{what}: has {tiers_out.size} elements, need {n}")
    return tiers_out


def flags_arg(flags: Any, n: int, what: str) -> np.ndarray | None:
    """None, or ``n`` bools / 0-1 ints as a uint8 array (no float truncation)."""
    if flags is None:
        return None
    a = np.asarray(None) if isinstance(flags, (str, bytes, bytearray, memoryview)) else np.asarray(flags)
    if a.ndim != 1 or a.size != n or not (a.dtype == np.bool_ or a.dtype.kind in "iu"):
        raise InvalidArgumentError(f"{what}: expected {n} bools (one per hash)")
    if a.dtype != np.bool_ and a.size and (int(a.min()) < 0 or int(a.max()) > 1):
        raise InvalidArgumentError(f"{what}: flags must be 0/1 or bools")
    return a.astype(np.uint8)


def uint32_arg(values: Any, n: int, what: str) -> np.ndarray | None:
    """None, or ``n`` ints in 0..2**32-1 as a uint32 array (no wrap-around, no float truncation)."""
    if values is None:
        return None
    if isinstance(values, np.ndarray) and values.dtype.kind not in "iu":
        raise InvalidArgumentError(f"{what}: expected an integer array, got dtype {values.dtype}")
    if isinstance(values, (str, bytes, bytearray, memoryview)):
        raise InvalidArgumentError(f"{what}: expected {n} uint32 values, got {type(values).__name__}")
    try:
        vals = list(values)
    except TypeError:
        raise InvalidArgumentError(f"{what}: expected {n} uint32 values, got {type(values).__name__}") from None
    if len(vals) != n:
        raise InvalidArgumentError(f"{what}: {len(vals)} values for {n} hashes")
    return np.array([int_arg(c, f"{what}[{i}]", 0, 0xFFFFFFFF) for i, c in enumerate(vals)], np.uint32)


def _as_array(obj: Any, what: str) -> np.ndarray:
    if isinstance(obj, Pointer):
        return obj.as_array()
    if obj is None or isinstance(obj, (bool, int, float, str, np.integer, np.floating)):
        raise InvalidArgumentError(
            f"{what}: expected a buffer (numpy array, bytearray, memoryview, CPU tensor) or kvbm.Pointer, "
            f"got {_describe(obj)}; a bare int is not taken as an address"
        )
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.Tensor):
        return _tensor_bytes(obj, torch, what)
    if isinstance(obj, np.ndarray):
        arr = obj
    else:
        try:
            mv = memoryview(obj)
        except TypeError:
            raise InvalidArgumentError(
                f"{what}: expected a buffer (numpy array, bytearray, memoryview, CPU tensor) or kvbm.Pointer, "
                f"got {_describe(obj)}"
            ) from None
        if "O" in mv.format:
            raise InvalidArgumentError(f"{what}: a buffer of Python objects holds no raw bytes")
        if not mv.c_contiguous:
            raise InvalidArgumentError(f"{what}: buffer must be C-contiguous")
        if mv.nbytes == 0:
            return np.empty(0, np.uint8)
        return np.frombuffer(mv, np.uint8)
    if arr.dtype.hasobject:
        raise InvalidArgumentError(f"{what}: an array of Python objects holds no raw bytes")
    if not arr.flags.c_contiguous:
        raise InvalidArgumentError(f"{what}: array must be C-contiguous")
    return arr.reshape(-1).view(np.uint8)


def _tensor_bytes(t: Any, torch: Any, what: str) -> np.ndarray:
    if t.device.type != "cpu":
        raise InvalidArgumentError(
            f"{what}: a {t.device.type} tensor is not host memory (use offload/onboard for engine blocks)"
        )
    if not t.is_contiguous():
        raise InvalidArgumentError(f"{what}: tensor must be contiguous")
    flat = t.detach().reshape(-1)
    if flat.numel() == 0:
        return np.empty(0, np.uint8)
    return flat.view(torch.uint8).numpy()


def _describe(v: Any) -> str:
    if isinstance(v, (bool, float)) or v is None:
        return repr(v)
    if isinstance(v, (int, np.integer)):
        iv = int(v)
        return f"int {iv}" if iv.bit_length() <= 128 else f"an int of {iv.bit_length()} bits"
    return type(v).__name__


__all__ = [
    "Pointer",
    "block_ids_arg",
    "block_rows",
    "byte_view",
    "enum_arg",
    "flags_arg",
    "float_arg",
    "int_arg",
    "tiers_out_arg",
    "uint32_arg",
]
