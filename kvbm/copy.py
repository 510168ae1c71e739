"""Offload (gather) and onboard (scatter) of whole KV blocks between engine tensors and host slots.

A host slot is ``layout.block_bytes`` long (format: :mod:`kvbm.kv_layout`). Slots are given
either as a 1-D sequence of addresses (one per block id; the caller vouches for their size,
or passes ``slot_bytes`` to have it checked) or as a 2-D buffer (numpy array, torch tensor,
anything with ``__array_interface__`` or ``data_ptr()``) whose row i is the slot of
``block_ids[i]``.

For a layout on host memory the copy happens during the call (memcpy per chunk) and the
returned handle is already done. For a CUDA layout the work is queued on ``stream`` (an int
``cudaStream_t``, or an object with ``cuda_stream`` such as ``torch.cuda.Stream``) or, when
``stream`` is None, on kvbm's own stream for that device and direction (so an offload and an
onboard overlap); that stream is not ordered after any other, so make sure the engine's
writes to the blocks (or its reads, for an onboard) are complete, or pass the engine's stream.
The first transfer on a layout uploads its chunk table and sets up staging (one-time work that
may wait for work already queued on the device); later calls only enqueue and return.
Methods: ``"auto"`` (= ``"staged"``, chosen by measurement: see
``benchmarks/results/cuda_datapath.md``), ``"kernel"`` (16-byte loads/stores straight to mapped pinned memory),
``"copy_engine"`` (``cudaMemcpyBatchAsync`` of every chunk), ``"staged"`` (a kernel packs
blocks into device staging, copy engines move whole slots; ``stage_bytes`` per staging buffer),
``"naive"`` (one ``cudaMemcpyAsync`` per chunk; a baseline). ``max_ctas`` caps the kernel grid.

``layers`` restricts a copy to a range of layers (an int ``l``, a ``(begin, end)`` pair or a
``range`` with step 1; half-open): only those layers' bytes of each block move, to/from their
place in the slot (``layout.layer_offsets[begin]`` onwards: the slot is layer-major), so copying
every layer one range at a time gives the same slot bytes as one whole-block copy. This is what
layer-wise loads and saves use (a layer's copy can run as soon as that layer is needed or written).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from kvbm import _native
from kvbm.errors import InvalidArgumentError, KvbmError
from kvbm.kv_layout import KvLayout

__all__ = ["METHODS", "TransferHandle", "gather", "scatter", "slot_addresses"]

METHODS = ("auto", "kernel", "copy_engine", "staged", "naive")


class TransferHandle:
    """Completion of one queued batch. Keeps the slot buffer and layout alive until done."""

    def __init__(self, native: Any, keep: tuple[Any, ...]) -> None:
        self._native = native
        self._keep: tuple[Any, ...] | None = keep

    def poll(self) -> bool:
        """True once the batch finished, False while it runs. Raises the transfer's error
        (CudaError) if it failed."""
        done = self._native.poll()
        if done:
            self._keep = None
        return done

    def wait(self, timeout: float | None = None) -> bool:
        """Block (without the GIL) up to ``timeout`` seconds (None: forever). True when finished,
        False on timeout. Raises the transfer's error (CudaError) if it failed."""
        done = self._native.wait(timeout)
        if done:
            self._keep = None
        return done

    @property
    def error(self) -> KvbmError | None:
        """The failure, once the batch failed; None while running or after success."""
        try:
            self._native.check_error()
        except KvbmError as e:
            return e
        return None

    @property
    def nbytes(self) -> int:
        return self._native.bytes

    @property
    def num_blocks(self) -> int:
        return self._native.num_blocks


def _buffer_info(buf: Any) -> tuple[int, int, int, int, int] | None:
    """(address, rows, row_bytes, row_stride_bytes, device) of a 2-D buffer, or None if 1-D."""
    if hasattr(buf, "data_ptr") and callable(getattr(buf, "stride", None)):  # torch.Tensor
        if buf.dim() != 2:
            return None
        es = int(buf.element_size())
        if int(buf.stride(1)) != 1:
            raise InvalidArgumentError("slot buffer rows must be contiguous (stride(1) == 1)")
        device = int(buf.get_device()) if buf.device.type == "cuda" else -1
        return (int(buf.data_ptr()), int(buf.shape[0]), int(buf.shape[1]) * es, int(buf.stride(0)) * es, device)
    if hasattr(buf, "__array_interface__"):
        a = np.asarray(buf)
        if a.ndim != 2:
            return None
        if a.strides[1] != a.itemsize:
            raise InvalidArgumentError("slot buffer rows must be contiguous")
        if not a.flags.writeable:
            raise InvalidArgumentError("slot buffer is read-only")
        return (int(a.__array_interface__["data"][0]), a.shape[0], a.shape[1] * a.itemsize, a.strides[0], -1)
    return None


def slot_addresses(buffer: Any, n: int | None = None) -> np.ndarray:
    """Addresses (uint64) of the first ``n`` rows of a 2-D buffer (all rows when n is None)."""
    info = _buffer_info(buffer)
    if info is None:
        raise InvalidArgumentError("slot buffer must be 2-D: one row per block")
    addr, rows, _, stride, _ = info
    n = rows if n is None else n
    if n > rows:
        raise InvalidArgumentError(f"slot buffer has {rows} rows, {n} needed")
    return (addr + np.arange(n, dtype=np.uint64) * np.uint64(stride)).astype(np.uint64)


def _resolve(layout: KvLayout, block_ids: Any, slots: Any, slot_bytes: int | None,
             what: str) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(layout, KvLayout):
        raise InvalidArgumentError(f"{what}: layout must be a kvbm.kv_layout.KvLayout")
    ids = np.ascontiguousarray(np.asarray(block_ids).reshape(-1))
    if ids.size and ids.dtype.kind not in "iu":
        raise InvalidArgumentError(f"{what}: block_ids must be integers, got dtype {ids.dtype}")
    ids = ids.astype(np.int64, copy=False)
    info = _buffer_info(slots)
    if info is not None:
        addr, rows, row_bytes, stride, _ = info
        if row_bytes < layout.block_bytes:
            raise InvalidArgumentError(
                f"{what}: host slot too small: rows have {row_bytes} bytes, a block needs {layout.block_bytes}")
        if rows < ids.size:
            raise InvalidArgumentError(f"{what}: slot buffer has {rows} rows for {ids.size} block ids")
        addrs = (addr + np.arange(ids.size, dtype=np.uint64) * np.uint64(stride)).astype(np.uint64)
    else:
        if isinstance(slots, (bytes, bytearray, memoryview)):
            raise InvalidArgumentError(f"{what}: pass slot addresses (1-D ints) or a 2-D slot buffer")
        a = np.asarray(slots).reshape(-1)
        if a.size and a.dtype.kind not in "iu":
            raise InvalidArgumentError(f"{what}: slot addresses must be integers, got dtype {a.dtype}")
        if a.size and a.dtype.kind == "i" and (a < 0).any():
            raise InvalidArgumentError(f"{what}: negative slot address")
        addrs = np.ascontiguousarray(a.astype(np.uint64, copy=False))
        if slot_bytes is not None and slot_bytes < layout.block_bytes:
            raise InvalidArgumentError(
                f"{what}: host slot too small: slot_bytes={slot_bytes}, a block needs {layout.block_bytes}")
    if addrs.size != ids.size:
        raise InvalidArgumentError(f"{what}: {ids.size} block ids but {addrs.size} slot addresses")
    return ids, addrs


def _layer_range(layers: Any) -> tuple[int, int]:
    """(begin, end) for the native call; (0, -1) means every layer. Bounds are checked natively."""
    if layers is None:
        return 0, -1
    if isinstance(layers, (int, np.integer)) and not isinstance(layers, bool):
        return int(layers), int(layers) + 1
    if isinstance(layers, range):
        if layers.step != 1:
            raise InvalidArgumentError(f"layers: a range of layers must have step 1, got {layers!r}")
        return layers.start, layers.stop
    if (isinstance(layers, (tuple, list)) and len(layers) == 2
            and all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in layers)):
        return int(layers[0]), int(layers[1])
    raise InvalidArgumentError(f"layers: expected None, a layer index, a (begin, end) pair or a range, got {layers!r}")


def _stream_int(stream: Any) -> int | None:
    if stream is None:
        return None
    if hasattr(stream, "cuda_stream"):
        return int(stream.cuda_stream)
    if isinstance(stream, (int, np.integer)):
        return int(stream)
    raise InvalidArgumentError(f"stream must be None, an int cudaStream_t or have .cuda_stream, got {stream!r}")


def gather(layout: KvLayout, block_ids: Sequence[int] | np.ndarray, dst: Any, stream: Any = None, *,
           method: str = "auto", slot_bytes: int | None = None, max_ctas: int = 0,
           stage_bytes: int = 0, layers: int | tuple[int, int] | range | None = None) -> TransferHandle:
    """Offload: copy engine blocks ``block_ids`` (all layers, or ``layers``; K and V) into host slots ``dst``.

    Returns a :class:`TransferHandle`. Raises OutOfRangeError (a block id outside
    ``[0, num_blocks)``), InvalidArgumentError (slot too small, count mismatch, null address,
    method 'kernel' with pageable slots, ``layers`` not a non-empty range within
    ``[0, num_layers)``), CudaUnavailableError (CUDA layout without CUDA), CudaError (runtime errors).
    """
    ids, addrs = _resolve(layout, block_ids, dst, slot_bytes, "gather")
    begin, end = _layer_range(layers)
    native = _native.kv_gather(layout._native, ids, addrs, _stream_int(stream), method, max_ctas, 0, stage_bytes,
                               begin, end)
    return TransferHandle(native, (layout, dst))


def scatter(layout: KvLayout, block_ids: Sequence[int] | np.ndarray, src: Any, stream: Any = None, *,
            method: str = "auto", slot_bytes: int | None = None, max_ctas: int = 0,
            stage_bytes: int = 0, layers: int | tuple[int, int] | range | None = None) -> TransferHandle:
    """Onboard: copy host slots ``src`` into engine blocks ``block_ids`` (all layers, or ``layers``).
    Same errors as :func:`gather`. With repeated ids the last slot wins on the host path; on CUDA
    the order is unspecified."""
    ids, addrs = _resolve(layout, block_ids, src, slot_bytes, "scatter")
    begin, end = _layer_range(layers)
    native = _native.kv_scatter(layout._native, ids, addrs, _stream_int(stream), method, max_ctas, 0,
                                stage_bytes, begin, end)
    return TransferHandle(native, (layout, src))
