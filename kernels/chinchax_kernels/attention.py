"""Flash attention in Pallas: blockwise online softmax forward, two-kernel backward (dq; dk and dv).

Public layout is that of `jax.nn.dot_product_attention`: (batch, seq, heads, head_dim). Inside, arrays are
transposed to (batch, heads, seq, head_dim), the head dim is zero-padded to a power of two (exact: zero columns
add nothing to q·k and give zero output columns that are sliced off) and the sequences are zero-padded to a
multiple of the block size; padded keys are masked, padded query rows are sliced off (their cotangent is zero).
Causal masking is top-left aligned, as `jnp.tril` in `jax.nn.dot_product_attention`: query i sees keys j <= i.

Grouped-query attention is native: k and v may have kv_heads dividing heads, query head h using kv head
h // per_kv (per_kv = heads // kv_heads). The forward and dq kernels run per query head and fetch kv head
h // per_kv through their BlockSpec; the dk/dv kernel runs per kv head and loops over its per_kv query heads,
accumulating dk and dv in fp32.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from .inputs import checked_scale

_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite, so fully masked rows never produce inf - inf
_MIN_BLOCK = 16  # Triton's tl.dot needs every dimension >= 16


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes along the sequences (powers of two, >= 16); clipped to the padded sequence length."""

    q: int = 128  # query rows per forward program
    k: int = 128  # keys per forward loop step
    q_backward: int = 64  # query rows per step of both backward kernels
    k_backward: int = 64  # keys per step of both backward kernels

    @classmethod
    def for_backend(cls, backend: str) -> "BlockSizes":
        """Defaults per backend: smaller backward tiles on GPU (register pressure of the dk/dv accumulators)."""
        if backend == "gpu":
            return cls(q=128, k=64, q_backward=64, k_backward=64)
        return cls(q=128, k=128, q_backward=128, k_backward=128)


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static configuration of one call, hashable for custom_vjp's nondiff argument."""

    causal: bool
    scale: float
    q_len: int  # unpadded query length
    kv_len: int  # unpadded key/value length
    blocks: BlockSizes
    interpret: bool
    backend: str


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = True,
    scale: float | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """softmax(scale · q kᵀ + causal mask) v for q (batch, q_len, heads, head_dim), k and v (batch, kv_len,
    kv_heads, head_dim), kv_heads dividing heads: query head i uses kv head i // (heads // kv_heads) (grouped-query
    attention; dk and dv come back in k's and v's shape).

    scale defaults to 1/sqrt(head_dim) (μP passes 1/head_dim). Scores, softmax statistics and accumulators are
    fp32; the output has q's dtype. interpret=None picks Pallas' interpreter on backends other than GPU and TPU.
    """
    scale = checked_scale("flash_attention", q, k, v, scale)
    backend = jax.default_backend()
    if interpret is None:
        interpret = backend not in ("gpu", "tpu")
    head_dim = q.shape[-1]
    q_len, kv_len = q.shape[1], k.shape[1]
    blocks = _clip_blocks(block_sizes or BlockSizes.for_backend(backend), q_len, kv_len)
    config = _Config(causal, scale, q_len, kv_len, blocks, bool(interpret), backend)

    padded_dim = max(_MIN_BLOCK, pl.next_power_of_2(head_dim))
    q_pad = _round_up(q_len, max(blocks.q, blocks.q_backward)) - q_len
    kv_pad = _round_up(kv_len, max(blocks.k, blocks.k_backward)) - kv_len

    def to_kernel_layout(x, seq_pad):
        x = jnp.swapaxes(x, 1, 2)  # (batch, heads, seq, head_dim)
        return jnp.pad(x, ((0, 0), (0, 0), (0, seq_pad), (0, padded_dim - head_dim)))

    out = _attention(
        to_kernel_layout(q, q_pad), to_kernel_layout(k, kv_pad), to_kernel_layout(v, kv_pad), config
    )
    return jnp.swapaxes(out[:, :, :q_len, :head_dim], 1, 2)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _clip_blocks(blocks: BlockSizes, q_len: int, kv_len: int) -> BlockSizes:
    for size in dataclasses.astuple(blocks):
        if size < _MIN_BLOCK or size & (size - 1):
            raise ValueError(
                f"flash_attention: block sizes must be powers of two >= {_MIN_BLOCK}, got {blocks}"
            )
    q_cap = max(_MIN_BLOCK, pl.next_power_of_2(q_len))
    kv_cap = max(_MIN_BLOCK, pl.next_power_of_2(kv_len))
    return BlockSizes(
        q=min(blocks.q, q_cap),
        k=min(blocks.k, kv_cap),
        q_backward=min(blocks.q_backward, q_cap),
        k_backward=min(blocks.k_backward, kv_cap),
    )


def _matmul(a, b, contract, precision):
    """a·b contracting a's axis contract[0] with b's axis contract[1], accumulated in fp32."""
    return lax.dot_general(
        a,
        b,
        (((contract[0],), (contract[1],)), ((), ())),
        precision=precision,
        preferred_element_type=jnp.float32,
    )


def _precision(dtype):
    """Full fp32 products for fp32 inputs (no TF32), the native MXU/tensor-core path otherwise."""
    return lax.Precision.HIGHEST if dtype == jnp.float32 else None


def _visible(q_start, k_start, shape, config: _Config):
    """Boolean (block_q, block_k): which (query, key) pairs take part (key inside kv_len, causal if asked)."""
    q_index = q_start + lax.broadcasted_iota(jnp.int32, shape, 0)
    k_index = k_start + lax.broadcasted_iota(jnp.int32, shape, 1)
    visible = k_index < config.kv_len
    if config.causal:
        visible = jnp.logical_and(visible, q_index >= k_index)
    return visible


def _kv_block_count(q_start, block_q, block_k, config: _Config):
    """How many key blocks a query block starting at q_start must visit (causal skips those above the diagonal)."""
    real_blocks = pl.cdiv(config.kv_len, block_k)
    if not config.causal:
        return real_blocks
    return jnp.minimum(real_blocks, lax.div(q_start + block_q + block_k - 1, block_k))


def _forward_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, *, config: _Config):
    block_q, block_k = config.blocks.q, config.blocks.k
    q_start = pl.program_id(2) * block_q
    q = q_ref[...]
    precision = _precision(q.dtype)

    def step(j, carry):
        acc, row_max, row_sum = carry
        k_start = j * block_k
        k = k_ref[pl.ds(k_start, block_k), :]
        v = v_ref[pl.ds(k_start, block_k), :]
        scores = config.scale * _matmul(q, k, (1, 1), precision)
        visible = _visible(q_start, k_start, scores.shape, config)
        scores = jnp.where(visible, scores, _MASKED)
        new_max = jnp.maximum(row_max, jnp.max(scores, axis=1, keepdims=True))
        rescale = jnp.exp(row_max - new_max)
        probs = jnp.where(visible, jnp.exp(scores - new_max), 0.0)
        row_sum = rescale * row_sum + jnp.sum(probs, axis=1, keepdims=True)
        acc = rescale * acc + _matmul(probs.astype(v.dtype), v, (1, 0), precision)
        return acc, new_max, row_sum

    init = (
        jnp.zeros(q.shape, jnp.float32),
        jnp.full((block_q, 1), _MASKED, jnp.float32),
        jnp.zeros((block_q, 1), jnp.float32),
    )
    acc, row_max, row_sum = lax.fori_loop(0, _kv_block_count(q_start, block_q, block_k, config), step, init)
    o_ref[...] = (acc / row_sum).astype(o_ref.dtype)
    lse_ref[...] = row_max + jnp.log(row_sum)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, config: _Config):
    block_q, block_k = config.blocks.q_backward, config.blocks.k_backward
    q_start = pl.program_id(2) * block_q
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
    precision = _precision(q.dtype)

    def step(j, dq):
        k_start = j * block_k
        k = k_ref[pl.ds(k_start, block_k), :]
        v = v_ref[pl.ds(k_start, block_k), :]
        scores = config.scale * _matmul(q, k, (1, 1), precision)
        visible = _visible(q_start, k_start, scores.shape, config)
        probs = jnp.where(visible, jnp.exp(scores - lse), 0.0)
        dprobs = _matmul(do, v, (1, 1), precision)
        dscores = probs * (dprobs - delta)
        return dq + _matmul(dscores.astype(k.dtype), k, (1, 0), precision)

    dq = lax.fori_loop(
        0, _kv_block_count(q_start, block_q, block_k, config), step, jnp.zeros(q.shape, jnp.float32)
    )
    dq_ref[...] = (config.scale * dq).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, config: _Config):
    """dk, dv of one key block, summed over the per_kv query heads (the leading axis of q_ref … delta_ref)."""
    block_q, block_k = config.blocks.q_backward, config.blocks.k_backward
    k_start = pl.program_id(2) * block_k
    k, v = k_ref[...], v_ref[...]
    precision = _precision(k.dtype)

    def step(head, i, carry):
        dk, dv = carry
        q_start = i * block_q
        rows = pl.ds(q_start, block_q)
        q, do = q_ref[head, rows, :], do_ref[head, rows, :]
        lse, delta = lse_ref[head, rows, :], delta_ref[head, rows, :]
        scores = config.scale * _matmul(q, k, (1, 1), precision)
        visible = _visible(q_start, k_start, scores.shape, config)
        probs = jnp.where(visible, jnp.exp(scores - lse), 0.0)
        dv = dv + _matmul(probs.astype(do.dtype), do, (0, 0), precision)
        dprobs = _matmul(do, v, (1, 1), precision)
        dscores = probs * (dprobs - delta)
        dk = dk + _matmul(dscores.astype(q.dtype), q, (0, 0), precision)
        return dk, dv

    first = lax.div(k_start, block_q) if config.causal else 0  # earlier query blocks cannot see these keys
    dk = dv = jnp.zeros(k.shape, jnp.float32)
    for head in range(q_ref.shape[0]):  # the query heads sharing this kv head (one without grouped queries)
        step_head = functools.partial(step, head)
        dk, dv = lax.fori_loop(first, pl.cdiv(config.q_len, block_q), step_head, (dk, dv))
    dk_ref[...] = (config.scale * dk).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _compiler_params(config: _Config, head_dim: int):
    """Backend-specific launch parameters; none for the interpreter."""
    if config.interpret:
        return None
    if config.backend == "gpu":
        from jax.experimental.pallas import triton as pltriton

        return pltriton.CompilerParams(num_warps=4 if head_dim <= 64 else 8, num_stages=2)
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel"))


def _row_block(block, dim):
    """BlockSpec of one (block, dim) tile of a (batch, heads, seq, dim) array, walked by the third grid axis."""
    return pl.BlockSpec((None, None, block, dim), lambda b, h, i: (b, h, i, 0))


def _whole_sequence(seq, dim, per_kv=1):
    """BlockSpec of a whole (seq, dim) slice of a (batch, kv_heads, seq, dim) array, for in-kernel loops, in a
    grid over query heads h: kv head h // per_kv (lax.div, exact for h >= 0: jnp's floor division adds a sign op
    whose Mosaic lowering needs a TPU at hand)."""
    return pl.BlockSpec((None, None, seq, dim), lambda b, h, i: (b, lax.div(h, per_kv), 0, 0))


def _head_group(per_kv, seq, dim):
    """BlockSpec of the per_kv query heads' whole (per_kv, seq, dim) slice of a (batch, heads, seq, dim) array in a
    grid over kv heads: kv head h serves query heads h·per_kv … h·per_kv + per_kv - 1."""
    return pl.BlockSpec((None, per_kv, seq, dim), lambda b, h, i: (b, h, 0, 0))


def _forward(q, k, v, config: _Config):
    batch, heads, q_seq, dim = q.shape
    kv_heads, kv_seq = k.shape[1:3]
    per_kv = heads // kv_heads
    block_q = config.blocks.q
    kv_spec = _whole_sequence(kv_seq, dim, per_kv)
    return pl.pallas_call(
        functools.partial(_forward_kernel, config=config),
        grid=(batch, heads, q_seq // block_q),
        in_specs=[_row_block(block_q, dim), kv_spec, kv_spec],
        out_specs=[_row_block(block_q, dim), _row_block(block_q, 1)],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((batch, heads, q_seq, 1), jnp.float32),  # logsumexp of each query row
        ],
        compiler_params=_compiler_params(config, dim),
        interpret=config.interpret,
        name="flash_attention_forward",
    )(q, k, v)


def _backward(q, k, v, out, lse, d_out, config: _Config):
    batch, heads, q_seq, dim = q.shape
    kv_heads, kv_seq = k.shape[1:3]
    per_kv = heads // kv_heads
    block_q, block_k = config.blocks.q_backward, config.blocks.k_backward
    delta = jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32), axis=-1, keepdims=True)
    params = _compiler_params(config, dim)

    dq = pl.pallas_call(
        functools.partial(_dq_kernel, config=config),
        grid=(batch, heads, q_seq // block_q),
        in_specs=[
            _row_block(block_q, dim),
            _whole_sequence(kv_seq, dim, per_kv),
            _whole_sequence(kv_seq, dim, per_kv),
            _row_block(block_q, dim),
            _row_block(block_q, 1),
            _row_block(block_q, 1),
        ],
        out_specs=_row_block(block_q, dim),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=params,
        interpret=config.interpret,
        name="flash_attention_dq",
    )(q, k, v, d_out, lse, delta)

    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, config=config),
        grid=(batch, kv_heads, kv_seq // block_k),
        in_specs=[
            _head_group(per_kv, q_seq, dim),
            _row_block(block_k, dim),
            _row_block(block_k, dim),
            _head_group(per_kv, q_seq, dim),
            _head_group(per_kv, q_seq, 1),
            _head_group(per_kv, q_seq, 1),
        ],
        out_specs=[_row_block(block_k, dim), _row_block(block_k, dim)],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=params,
        interpret=config.interpret,
        name="flash_attention_dkv",
    )(q, k, v, d_out, lse, delta)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attention(q, k, v, config: _Config):
    return _forward(q, k, v, config)[0]


def _attention_fwd(q, k, v, config: _Config):
    out, lse = _forward(q, k, v, config)
    return out, (q, k, v, out, lse)


def _attention_bwd(config: _Config, residuals, d_out):
    return _backward(*residuals, d_out, config)


_attention.defvjp(_attention_fwd, _attention_bwd)
