"""chinchax_kernels: attention and fused cross-entropy kernels for JAX (imports jax only, never chinchax)."""

from . import reference
from .attention import BlockSizes, flash_attention
from .blockwise_attention import blockwise_attention
from .cross_entropy import softmax_cross_entropy

__all__ = ["BlockSizes", "blockwise_attention", "flash_attention", "reference", "softmax_cross_entropy"]
