"""Blockwise causal attention in plain JAX: online softmax over key blocks, a recomputing custom VJP.

For backends without a flash kernel (CPU): the (seq × seq) score matrix is never written whole. Queries are cut
into blocks of `block_q` rows; each block visits the key blocks of `block_k` keys it can see (causal: blocks
entirely above the diagonal are skipped, and the last block is cut at the query block's end), keeping a running
max, sum and output in fp32. The forward saves only the output and the per-row logsumexp; the backward
recomputes each block's probabilities. The block loops are unrolled at trace time (static shapes, any sequence
length, no padding), so XLA sees plain batched matmuls of (block_q × head_dim) · (head_dim × block_k); the
(batch · kv head) rows go through in groups (a lax.map) small enough that one block's fp32 scores stay in cache.

Layout (batch, seq, heads, head_dim) as `jax.nn.dot_product_attention`; causal masking is top-left aligned
(query i sees keys j <= i). Grouped-query attention is native: k and v may have kv_heads dividing heads, query
head i using kv head i // (heads // kv_heads). Inside, k and v are (batch, kv_heads, seq, head_dim) and q is
(batch, kv_heads, per_kv, seq, head_dim) with per_kv = heads // kv_heads query heads per kv head, contracted with
it in one matmul (dk and dv sum over them as they go); with per_kv = 1 that axis is left out, so the einsums'
`...` is either per_kv or nothing, and equal heads run the plain multi-head computation.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from .inputs import checked_scale

SCORE_CACHE_BYTES = 2**18  # one block's fp32 scores for a group of rows: well inside a core's L2


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static configuration of one call (hashable, for custom_vjp's nondiff argument)."""

    causal: bool
    scale: float
    block_q: int
    block_k: int
    group: int  # (batch · kv head) rows per loop iteration


def blockwise_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = True,
    scale: float | None = None,
    block_q: int = 64,
    block_k: int = 256,
) -> jax.Array:
    """softmax(scale · q kᵀ + causal mask) v for q (batch, q_len, heads, head_dim), k and v (batch, kv_len,
    kv_heads, head_dim), kv_heads dividing heads (query head i uses kv head i // (heads // kv_heads)); scale
    defaults to 1/sqrt(head_dim). Scores and softmax statistics are fp32; the output has q's dtype. block_q,
    block_k: rows and keys per block (any positive sizes; the last block may be shorter)."""
    scale = checked_scale("blockwise_attention", q, k, v, scale)
    if block_q < 1 or block_k < 1:
        raise ValueError(f"blockwise_attention: block sizes must be positive, got {block_q}, {block_k}")
    batch, q_len, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    per_kv = heads // kv_heads  # query heads per kv head
    rows = batch * kv_heads
    block_scores = 4 * per_kv * min(block_q, q_len) * min(block_k, k.shape[1])
    fitting = max(1, SCORE_CACHE_BYTES // block_scores)
    group = max(d for d in range(1, min(rows, fitting) + 1) if rows % d == 0)
    config = _Config(causal, scale, block_q, block_k, group)
    grouped = q.reshape(batch, q_len, kv_heads, per_kv, head_dim) if per_kv > 1 else q
    out = _attention(jnp.moveaxis(grouped, 1, -2), jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), config)
    return jnp.moveaxis(out, -2, 1).reshape(q.shape)


def _spans(end: int, size: int) -> list[tuple[int, int]]:
    """[start, stop) spans of `size` covering 0..end (the last one may be shorter)."""
    return [(start, min(start + size, end)) for start in range(0, end, size)]


def _key_spans(q_stop: int, kv_len: int, config: _Config) -> list[tuple[int, int]]:
    """The key spans a query block ending at q_stop sees: up to its last row when causal."""
    return _spans(min(q_stop, kv_len) if config.causal else kv_len, config.block_k)


def _scores(q_block, k_block, q_start: int, k_start: int, config: _Config) -> jax.Array:
    """fp32 scale · q kᵀ of one block pair (batch, kv_heads, [per_kv,] rows, keys), future keys masked to -inf."""
    scores = config.scale * jnp.einsum(
        "bh...qd,bhkd->bh...qk", q_block, k_block, preferred_element_type=jnp.float32
    )
    rows, keys = scores.shape[-2:]
    if config.causal and k_start + keys - 1 > q_start:  # the block reaches above the diagonal
        visible = jnp.arange(k_start, k_start + keys)[None, :] <= jnp.arange(q_start, q_start + rows)[:, None]
        scores = scores + jnp.where(visible, 0.0, -jnp.inf)
    return scores


def _forward(q, k, v, config: _Config):
    """Output like q (batch, kv_heads, [per_kv,] q_len, head_dim) and its per-row logsumexp (…, q_len) in fp32."""
    outputs, logsumexps = [], []
    for q_start, q_stop in _spans(q.shape[-2], config.block_q):
        q_block = q[..., q_start:q_stop, :]
        row_max = row_sum = acc = None
        for k_start, k_stop in _key_spans(q_stop, k.shape[2], config):
            scores = _scores(q_block, k[:, :, k_start:k_stop], q_start, k_start, config)
            block_max = jnp.max(scores, axis=-1)
            new_max = block_max if row_max is None else jnp.maximum(row_max, block_max)
            probs = jnp.exp(scores - new_max[..., None])
            pv = jnp.einsum(
                "bh...qk,bhkd->bh...qd",
                probs.astype(v.dtype),
                v[:, :, k_start:k_stop],
                preferred_element_type=jnp.float32,
            )
            if row_max is None:
                row_sum, acc = jnp.sum(probs, axis=-1), pv
            else:
                rescale = jnp.exp(row_max - new_max)
                row_sum = row_sum * rescale + jnp.sum(probs, axis=-1)
                acc = acc * rescale[..., None] + pv
            row_max = new_max
        outputs.append((acc / row_sum[..., None]).astype(q.dtype))
        logsumexps.append(row_max + jnp.log(row_sum))
    return jnp.concatenate(outputs, axis=-2), jnp.concatenate(logsumexps, axis=-1)


def _backward(q, k, v, out, logsumexp, d_out, config: _Config):
    """Gradients for q, k, v from the saved output and logsumexp, probabilities recomputed per block pair; dk and
    dv sum over the query heads sharing each kv head."""
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # like logsumexp
    d_q_blocks = []
    d_k = jnp.zeros(k.shape, jnp.float32)
    d_v = jnp.zeros(v.shape, jnp.float32)
    for q_start, q_stop in _spans(q.shape[-2], config.block_q):
        q_block, do_block = q[..., q_start:q_stop, :], d_out[..., q_start:q_stop, :]
        lse_block, delta_block = logsumexp[..., q_start:q_stop, None], delta[..., q_start:q_stop, None]
        d_q_block = None
        for k_start, k_stop in _key_spans(q_stop, k.shape[2], config):
            k_block, v_block = k[:, :, k_start:k_stop], v[:, :, k_start:k_stop]
            probs = jnp.exp(_scores(q_block, k_block, q_start, k_start, config) - lse_block)
            d_v = d_v.at[:, :, k_start:k_stop].add(
                jnp.einsum(
                    "bh...qk,bh...qd->bhkd",
                    probs.astype(do_block.dtype),
                    do_block,
                    preferred_element_type=jnp.float32,
                )
            )
            d_probs = jnp.einsum(
                "bh...qd,bhkd->bh...qk", do_block, v_block, preferred_element_type=jnp.float32
            )
            d_scores = (probs * (d_probs - delta_block) * config.scale).astype(q.dtype)
            d_k = d_k.at[:, :, k_start:k_stop].add(
                jnp.einsum("bh...qk,bh...qd->bhkd", d_scores, q_block, preferred_element_type=jnp.float32)
            )
            dq_part = jnp.einsum(
                "bh...qk,bhkd->bh...qd", d_scores, k_block, preferred_element_type=jnp.float32
            )
            d_q_block = dq_part if d_q_block is None else d_q_block + dq_part
        d_q_blocks.append(d_q_block)
    d_q = jnp.concatenate(d_q_blocks, axis=-2)
    return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype)


def _in_groups(fn, arrays, config: _Config):
    """fn over `config.group` (batch · kv head) rows at a time (lax.map), so each block's scores stay in cache.

    arrays are (batch, kv_heads, …); fn sees (group, 1, …) and returns arrays of that form."""
    batch, heads = arrays[0].shape[:2]
    groups = batch * heads // config.group
    grouped = [x.reshape(groups, config.group, 1, *x.shape[2:]) for x in arrays]
    results = jax.lax.map(lambda xs: fn(*xs, config), grouped)
    return [r.reshape(batch, heads, *r.shape[3:]) for r in results]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attention(q, k, v, config: _Config):
    return _in_groups(_forward, (q, k, v), config)[0]


def _attention_fwd(q, k, v, config: _Config):
    out, logsumexp = _in_groups(_forward, (q, k, v), config)
    return out, (q, k, v, out, logsumexp)


def _attention_bwd(config: _Config, residuals, d_out):
    return tuple(_in_groups(_backward, (*residuals, d_out), config))


_attention.defvjp(_attention_fwd, _attention_bwd)
