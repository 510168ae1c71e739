"""A standalone GPU KV block arena (for users without an engine, and for benchmarks).

One device allocation, layer-major, described by a :class:`~kvbm.kv_layout.KvLayout` so that
:func:`kvbm.copy.gather` / :func:`kvbm.copy.scatter` work on it exactly as on engine tensors.
"""

from __future__ import annotations

from kvbm import _native
from kvbm.kv_layout import KvLayout, TensorSpec

__all__ = ["GpuArena"]


class GpuArena:
    """GPU memory for ``num_blocks`` KV blocks of ``num_layers`` layers (not initialised).

    ``kind`` as in :mod:`kvbm.kv_layout`: per layer ``"kv_split"`` is ``[2, num_blocks,
    block_size, num_kv_heads, head_size]``, ``"vllm"`` ``[num_blocks, num_kv_heads, block_size,
    2*head_size]``, ``"mla"`` ``[num_blocks, block_size, latent_dim]``.
    Raises InvalidArgumentError (bad sizes, kind, dtype, device), CudaUnavailableError (no CUDA
    build or GPU), CudaError (allocation failed).
    """

    def __init__(self, num_blocks: int, num_layers: int, block_size: int, num_kv_heads: int = 1,
                 head_size: int = 128, *, dtype: str = "bfloat16", kind: str = "kv_split",
                 latent_dim: int = 0, device: int = 0) -> None:
        self._native = _native.GpuArena.create(kind, str(dtype).removeprefix("torch."), num_layers, num_blocks,
                                               block_size, num_kv_heads, head_size, latent_dim, device)
        self.layout = KvLayout(self._native.layout, owners=(self,))

    @property
    def address(self) -> int:
        """Device address of the allocation."""
        return self._native.address

    @property
    def nbytes(self) -> int:
        return self._native.nbytes

    def layer_specs(self, layer: int) -> list[TensorSpec]:
        """Layer ``layer``'s tensor(s) as specs (to view the arena from torch/CuPy)."""
        return [
            TensorSpec(p, tuple(sh), tuple(st), dt, dev) for p, sh, st, dt, dev in self._native.layer_tensors(layer)
        ]
