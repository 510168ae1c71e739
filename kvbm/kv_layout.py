"""KV layout descriptors: how an engine's paged KV tensors map to kvbm's host slots.

A :class:`KvLayout` is built from what an engine hands over (per-layer tensors, read through
``data_ptr()``/``shape``/``stride()``/``dtype``/``device`` — torch tensors, numpy arrays and
objects with ``__cuda_array_interface__`` are duck-typed; torch is never imported) or from
explicit :class:`TensorSpec` objects. The native descriptor (``csrc/kv_layout.h``, the only
place with stride math) reduces a block to a list of contiguous chunks.

Host slot format: one block is ``block_bytes`` long, the concatenation, layer-major, of each
layer's tensors in the order given (``kv_split``: K then V), each tensor's block region in the
engine's memory order. No transposition happens; the content-hash namespace binds the layout.

Kinds:

``"vllm"``      one 4-D tensor per layer ``[num_blocks, num_kv_heads, block_size, 2*head_size]``,
                any memory order (vLLM 0.32+ per-layer views, CPU and CUDA platforms).
``"kv_split"``  per layer a ``(K, V)`` pair, each ``[num_blocks, block_size, num_kv_heads,
                head_size]`` in any memory order, or one 5-D ``[2, num_blocks, ...]`` tensor.
``"mla"``       one 3-D tensor per layer ``[num_blocks, block_size, latent_dim]``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kvbm import _native
from kvbm.errors import InvalidArgumentError

__all__ = ["DTYPE_SIZES", "KINDS", "KvLayout", "TensorSpec"]

KINDS = ("vllm", "kv_split", "mla")
DTYPE_SIZES = {"bfloat16": 2, "float16": 2, "float32": 4, "float8_e4m3fn": 1, "float8_e5m2": 1, "uint8": 1}
_NUMPY_NAMES = {"float16": "float16", "float32": "float32", "uint8": "uint8", "bfloat16": "bfloat16",
                "float8_e4m3fn": "float8_e4m3fn", "float8_e5m2": "float8_e5m2"}
_TYPESTR = {"<f2": "float16", "<f4": "float32", "|u1": "uint8"}


@dataclass(frozen=True)
class TensorSpec:
    """One strided tensor: dimension 0 indexes blocks.

    ``strides`` are in elements (like ``torch.Tensor.stride()``); ``device`` is a CUDA ordinal,
    or -1 for host memory; ``dtype`` one of :data:`DTYPE_SIZES`.
    """

    data_ptr: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    dtype: str
    device: int = -1

    @classmethod
    def from_tensor(cls, t: Any, dtype: str | None = None) -> TensorSpec:
        """Describe a torch tensor, numpy array or ``__cuda_array_interface__`` object.

        ``dtype`` overrides the element type (it must have the tensor's element size), e.g.
        ``"bfloat16"`` for a numpy ``uint16`` array. Raises InvalidArgumentError for objects it
        cannot read, unsupported dtypes and byte strides that are not whole elements.
        """
        if hasattr(t, "data_ptr") and callable(getattr(t, "stride", None)):  # torch.Tensor
            dev = t.device
            if dev.type == "cuda":
                device = int(dev.index if dev.index is not None else t.get_device())
            elif dev.type == "cpu":
                device = -1
            else:
                raise InvalidArgumentError(f"tensor on device '{dev}' is not supported (cuda or cpu)")
            name = str(t.dtype).removeprefix("torch.")
            itemsize = int(t.element_size())
            spec = cls(int(t.data_ptr()), tuple(int(s) for s in t.shape), tuple(int(s) for s in t.stride()),
                       name, device)
        elif hasattr(t, "__cuda_array_interface__"):
            cai = t.__cuda_array_interface__
            name = _TYPESTR.get(cai["typestr"], cai["typestr"])
            itemsize = int(cai["typestr"][2:])
            shape = tuple(int(s) for s in cai["shape"])
            strides = cai.get("strides") or _dense_strides(shape, itemsize)
            device = int(getattr(getattr(t, "device", None), "id", 0))
            spec = cls(int(cai["data"][0]), shape, _elem_strides(strides, itemsize), name, device)
        elif hasattr(t, "__array_interface__"):  # numpy
            import numpy as np

            a = np.asarray(t)
            name = _NUMPY_NAMES.get(a.dtype.name, a.dtype.name)
            itemsize = a.dtype.itemsize
            spec = cls(int(a.__array_interface__["data"][0]), tuple(int(s) for s in a.shape),
                       _elem_strides(a.strides, itemsize), name, -1)
        else:
            raise InvalidArgumentError(
                f"cannot read a KV tensor from {type(t).__name__}: expected a torch tensor, a numpy array "
                "or an object with __cuda_array_interface__")
        if dtype is not None:
            dtype = str(dtype).removeprefix("torch.")
            if DTYPE_SIZES.get(dtype) != itemsize:
                raise InvalidArgumentError(
                    f"dtype override '{dtype}' does not match the tensor's element size {itemsize}")
            spec = cls(spec.data_ptr, spec.shape, spec.strides, dtype, spec.device)
        if spec.dtype not in DTYPE_SIZES:
            raise InvalidArgumentError(
                f"KV dtype '{spec.dtype}' is not supported ({', '.join(DTYPE_SIZES)}); pass dtype= to "
                "reinterpret a raw integer array")
        return spec


def _dense_strides(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    out, acc = [], itemsize
    for s in reversed(shape):
        out.append(acc)
        acc *= s
    return tuple(reversed(out))


def _elem_strides(byte_strides: Sequence[int], itemsize: int) -> tuple[int, ...]:
    for s in byte_strides:
        if s % itemsize:
            raise InvalidArgumentError(f"byte stride {s} is not a multiple of the element size {itemsize}")
    return tuple(int(s) // itemsize for s in byte_strides)


class KvLayout:
    """An engine's KV cache as kvbm sees it: block geometry, chunks and host slot size.

    Build with :meth:`from_tensors` or :meth:`from_specs`. The layout keeps the tensors it was
    built from alive; it does not own their memory otherwise.
    """

    def __init__(self, native: Any, owners: tuple[Any, ...] = ()) -> None:
        self._native = native
        self._owners = owners

    @classmethod
    def from_specs(cls, layers: Sequence[Sequence[TensorSpec]], kind: str = "vllm",
                   owners: tuple[Any, ...] = ()) -> KvLayout:
        """Build from explicit specs: ``layers[l]`` lists layer l's tensors (see module doc).

        Raises InvalidArgumentError naming the layer/tensor whose shape, strides, dtype or device
        is wrong (e.g. an unknown kind, mixed dtypes or devices, overlapping strides).
        """
        if kind not in KINDS:
            raise InvalidArgumentError(f"layout kind '{kind}' is not one of {', '.join(KINDS)}")
        tuples = [[(s.data_ptr, list(s.shape), list(s.strides), s.dtype, s.device) for s in layer]
                  for layer in layers]
        return cls(_native.KvLayout.create(kind, tuples), owners)

    @classmethod
    def from_tensors(cls, tensors: Sequence[Any] | Mapping[str, Any], kind: str = "vllm",
                     dtype: str | None = None) -> KvLayout:
        """Build from per-layer tensors (a sequence, or a mapping in layer order such as the dict
        vLLM passes to ``register_kv_caches``).

        ``kind="kv_split"``: each item is a ``(K, V)`` pair or one ``[2, num_blocks, ...]`` tensor.
        ``dtype`` reinterprets raw integer arrays (e.g. numpy uint16 as ``"bfloat16"``).
        Raises InvalidArgumentError as :meth:`from_specs`.
        """
        items = list(tensors.values()) if isinstance(tensors, Mapping) else list(tensors)
        layers: list[list[TensorSpec]] = []
        for item in items:
            if kind == "kv_split" and isinstance(item, (tuple, list)):
                layers.append([TensorSpec.from_tensor(t, dtype) for t in item])
            else:
                layers.append([TensorSpec.from_tensor(item, dtype)])
        return cls.from_specs(layers, kind, owners=tuple(items))

    @property
    def kind(self) -> str:
        return self._native.kind

    @property
    def dtype(self) -> str:
        return self._native.dtype

    @property
    def device(self) -> int:
        """CUDA ordinal of the KV tensors, -1 for host memory."""
        return self._native.device

    @property
    def num_blocks(self) -> int:
        return self._native.num_blocks

    @property
    def num_layers(self) -> int:
        return self._native.num_layers

    @property
    def block_bytes(self) -> int:
        """Size of one host slot: one block's bytes across all layers."""
        return self._native.block_bytes

    @property
    def layer_offsets(self) -> list[int]:
        """Byte offset of each layer inside a host slot."""
        return list(self._native.layer_offsets)

    @property
    def layer_bytes(self) -> list[int]:
        return list(self._native.layer_bytes)

    @property
    def chunks(self) -> list[tuple[int, int, int, int, int]]:
        """The coalesced chunks of one block: ``(addr_of_block0, block_stride, nbytes, host_offset,
        layer)``, in host-slot order."""
        return list(self._native.chunks)

    def __repr__(self) -> str:
        return repr(self._native)
