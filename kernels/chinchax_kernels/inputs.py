"""Argument checks both attention kernels share: (batch, seq, heads, head_dim) q, k, v and a static scale.

k and v may have fewer heads than q (grouped-query attention): kv_heads must divide heads, and query head i
attends with kv head i // (heads // kv_heads), as Hugging Face's `repeat_kv` and `jax.nn.dot_product_attention`.
"""

import math

import jax
import jax.numpy as jnp


def checked_scale(kernel: str, q: jax.Array, k: jax.Array, v: jax.Array, scale: float | None) -> float:
    """Raises a one-line error naming `kernel` unless q (b, q_len, h, d), k and v (b, kv_len, kv_h, d), kv_h a
    divisor of h, are floating arrays of one dtype; returns scale, by default 1/sqrt(head_dim), as a Python float."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"{kernel}: {name} must be (batch, seq, heads, head_dim), got shape {x.shape}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{kernel}: {name} must be floating point, got {x.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"{kernel}: k and v shapes differ: {k.shape} vs {v.shape}")
    heads, kv_heads = q.shape[2], k.shape[2]
    if (q.shape[0], q.shape[3]) != (k.shape[0], k.shape[3]) or kv_heads == 0 or heads % kv_heads:
        raise ValueError(
            f"{kernel}: q {q.shape} and k {k.shape} differ in batch, heads or head_dim"
            " (k's heads may be fewer than q's, but must divide them)"
        )
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"{kernel}: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if isinstance(scale, jax.core.Tracer):
        raise TypeError(f"{kernel}: scale must be a Python number, not a traced array")
    return float(scale)
