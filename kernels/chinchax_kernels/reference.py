"""Plain-jnp references for the kernels: the whole score / logit matrix at once, in (at least) fp32.

They compute in the wider of the input dtype and fp32, so float64 inputs (under `jax.enable_x64`) give a float64
reference. Gradients come from JAX autodiff.
"""

import math

import jax
import jax.numpy as jnp


def _compute_dtype(dtype):
    return jnp.promote_types(dtype, jnp.float32)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = True, scale: float | None = None):
    """softmax(scale · q kᵀ) v with (batch, seq, heads, head_dim) inputs; causal = top-left `tril` mask.

    k and v may have fewer heads (grouped-query attention): each kv head is repeated for heads // kv_heads
    consecutive query heads, as Hugging Face's `repeat_kv` (so their gradients sum over those query heads)."""
    dtype = _compute_dtype(q.dtype)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    k, v = (jnp.repeat(x, q.shape[2] // k.shape[2], axis=2) for x in (k, v))
    scores = scale * jnp.einsum("bqhd,bkhd->bhqk", q.astype(dtype), k.astype(dtype))
    if causal:
        visible = jnp.tril(jnp.ones(scores.shape[-2:], dtype=bool))
        scores = jnp.where(visible, scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v.astype(dtype)).astype(q.dtype)


def softmax_cross_entropy(
    hidden: jax.Array, weight: jax.Array, targets: jax.Array, *, logit_scale: float = 1.0
):
    """Per-token loss logsumexp(z) - z[target] with z = logit_scale · hidden · weightᵀ (tokens, vocab)."""
    dtype = _compute_dtype(hidden.dtype)
    logits = logit_scale * (hidden.astype(dtype) @ weight.astype(dtype).T)
    target_logits = jnp.take_along_axis(logits, targets[:, None], axis=1)[:, 0]
    return jax.nn.logsumexp(logits, axis=1) - target_logits
