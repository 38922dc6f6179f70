"""Fused tied-head softmax cross-entropy: per-token loss without the whole (tokens, vocab) logit matrix.

Plain JAX (no Pallas), so it runs unchanged on CPU, GPU and TPU and under any sharding XLA understands. Tokens
are processed in chunks (`lax.map` / `lax.scan`), and within a chunk the vocabulary in chunks with an online
logsumexp, so at most one (token_chunk, vocab_chunk) fp32 logit tile is live. The custom VJP keeps only the
per-token logsumexp and recomputes each tile in the backward pass, accumulating d hidden per token chunk and
d weight (fp32) across chunks.

The last vocabulary chunk is read at a start clamped to vocab - vocab_chunk (no padded copy of the weight); the
columns it shares with the previous chunk are masked out.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static configuration of one call, hashable for custom_vjp's nondiff argument."""

    logit_scale: float
    token_chunk: int
    vocab_chunk: int


def softmax_cross_entropy(
    hidden: jax.Array,
    weight: jax.Array,
    targets: jax.Array,
    *,
    logit_scale: float = 1.0,
    token_chunk: int = 1024,
    vocab_chunk: int = 8192,
) -> jax.Array:
    """fp32 per-token loss logsumexp(z) - z[target], z = logit_scale · hidden · weightᵀ, differentiable in hidden and weight.

    hidden (tokens, d), weight (vocab, d) (the tied embedding), targets (tokens,) int in [0, vocab). The
    chunk sizes bound the live logit tile to token_chunk × vocab_chunk fp32 values (32 MiB by default).
    """
    _check_inputs(hidden, weight, targets, logit_scale, token_chunk, vocab_chunk)
    tokens, vocab = hidden.shape[0], weight.shape[0]
    config = _Config(float(logit_scale), min(token_chunk, tokens), min(vocab_chunk, vocab))
    pad = -tokens % config.token_chunk
    hidden = jnp.pad(hidden, ((0, pad), (0, 0)))
    targets = jnp.pad(targets.astype(jnp.int32), (0, pad))
    return _cross_entropy(hidden, weight, targets, config)[:tokens]


def _check_inputs(hidden, weight, targets, logit_scale, token_chunk, vocab_chunk):
    if hidden.ndim != 2 or weight.ndim != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"softmax_cross_entropy: need hidden (tokens, d) and weight (vocab, d), got {hidden.shape}, {weight.shape}"
        )
    if targets.shape != hidden.shape[:1] or not jnp.issubdtype(targets.dtype, jnp.integer):
        raise ValueError(
            f"softmax_cross_entropy: targets must be integer ({hidden.shape[0]},), got {targets.dtype}{targets.shape}"
        )
    if hidden.dtype != weight.dtype or not jnp.issubdtype(hidden.dtype, jnp.floating):
        raise TypeError(
            f"softmax_cross_entropy: hidden and weight must share a float dtype, got {hidden.dtype}, {weight.dtype}"
        )
    if isinstance(logit_scale, jax.core.Tracer):
        raise TypeError("softmax_cross_entropy: logit_scale must be a Python number, not a traced array")
    if token_chunk < 1 or vocab_chunk < 1:
        raise ValueError(
            f"softmax_cross_entropy: chunk sizes must be positive, got {token_chunk}, {vocab_chunk}"
        )


def _precision(dtype):
    """Full fp32 products for fp32 inputs (no TF32), the native matmul path otherwise."""
    return lax.Precision.HIGHEST if dtype == jnp.float32 else None


def _vocab_tile(hidden_chunk, weight, chunk_index, config: _Config):
    """fp32 logits of one vocabulary chunk: (start, weight rows, logits, which columns are new to this chunk)."""
    vocab, size = weight.shape[0], config.vocab_chunk
    nominal_start = chunk_index * size
    start = jnp.minimum(nominal_start, vocab - size)
    rows = lax.dynamic_slice_in_dim(weight, start, size, axis=0)
    logits = config.logit_scale * lax.dot_general(
        hidden_chunk,
        rows,
        (((1,), (1,)), ((), ())),
        precision=_precision(weight.dtype),
        preferred_element_type=jnp.float32,
    )
    columns = start + lax.broadcasted_iota(jnp.int32, (1, size), 1)
    return start, rows, logits, columns, columns >= nominal_start


def _vocab_chunks(vocab, config: _Config):
    return jnp.arange(-(-vocab // config.vocab_chunk))


def _chunk_loss(hidden_chunk, target_chunk, weight, config: _Config):
    """(loss, logsumexp) of one token chunk, streaming over vocabulary chunks."""

    def step(carry, chunk_index):
        row_max, row_sum, target_logit = carry
        _, _, logits, columns, new = _vocab_tile(hidden_chunk, weight, chunk_index, config)
        logits = jnp.where(new, logits, -jnp.inf)
        new_max = jnp.maximum(row_max, jnp.max(logits, axis=1))
        row_sum = row_sum * jnp.exp(row_max - new_max) + jnp.sum(jnp.exp(logits - new_max[:, None]), axis=1)
        is_target = jnp.logical_and(new, columns == target_chunk[:, None])
        target_logit = target_logit + jnp.sum(jnp.where(is_target, logits, 0.0), axis=1)
        return (new_max, row_sum, target_logit), None

    n = hidden_chunk.shape[0]
    init = (jnp.full((n,), -jnp.inf, jnp.float32), jnp.zeros((n,), jnp.float32), jnp.zeros((n,), jnp.float32))
    (row_max, row_sum, target_logit), _ = lax.scan(step, init, _vocab_chunks(weight.shape[0], config))
    lse = row_max + jnp.log(row_sum)
    return lse - target_logit, lse


def _by_token_chunk(x, config: _Config):
    return x.reshape(-1, config.token_chunk, *x.shape[1:])


def _forward(hidden, weight, targets, config: _Config):
    loss, lse = lax.map(
        lambda chunk: _chunk_loss(chunk[0], chunk[1], weight, config),
        (_by_token_chunk(hidden, config), _by_token_chunk(targets, config)),
    )
    return loss.reshape(-1), lse.reshape(-1)


def _backward(hidden, weight, targets, lse, d_loss, config: _Config):
    """d hidden and d weight of sum(d_loss · loss): d logits = logit_scale · d_loss · (softmax - onehot)."""
    precision = _precision(weight.dtype)

    def token_step(d_weight, chunk):
        hidden_chunk, target_chunk, lse_chunk, d_loss_chunk = chunk

        def vocab_step(carry, chunk_index):
            d_hidden, d_weight = carry
            start, rows, logits, columns, new = _vocab_tile(hidden_chunk, weight, chunk_index, config)
            probs = jnp.exp(logits - lse_chunk[:, None])
            onehot = (columns == target_chunk[:, None]).astype(jnp.float32)
            d_logits = jnp.where(new, (probs - onehot) * (config.logit_scale * d_loss_chunk[:, None]), 0.0)
            d_logits = d_logits.astype(weight.dtype)
            d_hidden = d_hidden + lax.dot_general(
                d_logits,
                rows,
                (((1,), (0,)), ((), ())),
                precision=precision,
                preferred_element_type=jnp.float32,
            )
            d_rows = lax.dot_general(
                d_logits,
                hidden_chunk,
                (((0,), (0,)), ((), ())),
                precision=precision,
                preferred_element_type=jnp.float32,
            )
            d_weight = lax.dynamic_update_slice_in_dim(
                d_weight,
                lax.dynamic_slice_in_dim(d_weight, start, config.vocab_chunk, axis=0) + d_rows,
                start,
                axis=0,
            )
            return (d_hidden, d_weight), None

        init = (jnp.zeros(hidden_chunk.shape, jnp.float32), d_weight)
        (d_hidden, d_weight), _ = lax.scan(vocab_step, init, _vocab_chunks(weight.shape[0], config))
        return d_weight, d_hidden

    chunks = tuple(_by_token_chunk(x, config) for x in (hidden, targets, lse, d_loss))
    d_weight, d_hidden = lax.scan(token_step, jnp.zeros(weight.shape, jnp.float32), chunks)
    return d_hidden.reshape(hidden.shape).astype(hidden.dtype), d_weight.astype(weight.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _cross_entropy(hidden, weight, targets, config: _Config):
    return _forward(hidden, weight, targets, config)[0]


def _cross_entropy_fwd(hidden, weight, targets, config: _Config):
    loss, lse = _forward(hidden, weight, targets, config)
    return loss, (hidden, weight, targets, lse)


def _cross_entropy_bwd(config: _Config, residuals, d_loss):
    d_hidden, d_weight = _backward(*residuals, d_loss, config)
    return d_hidden, d_weight, None


_cross_entropy.defvjp(_cross_entropy_fwd, _cross_entropy_bwd)
