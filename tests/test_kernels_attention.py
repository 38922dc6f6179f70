"""chinchax_kernels' attention kernels against a float64 plain-jnp reference: flash_attention (Pallas, interpret
mode on CPU) and blockwise_attention (plain JAX, the CPU path of model.attention='auto').

Inputs are drawn from a fresh seed per test, printed in every failure message.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from chinchax_kernels import BlockSizes, blockwise_attention, flash_attention, reference
from jax import export

SMALL_BLOCKS = BlockSizes(q=16, k=16, q_backward=16, k_backward=16)  # several blocks even at toy lengths


def relative_error(actual, expected) -> float:
    """‖actual − expected‖ / ‖expected‖ over all elements, in float64."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def fresh_seed() -> int:
    return int(np.random.default_rng().integers(2**31))


def random_inputs(seed, batch, q_len, kv_len, heads, head_dim, dtype, kv_heads=None):
    """q, k, v, d_out; k and v have kv_heads heads (default: heads)."""
    rng = np.random.default_rng(seed)
    q, d_out = (rng.standard_normal((batch, q_len, heads, head_dim)) for _ in range(2))
    k, v = (rng.standard_normal((batch, kv_len, kv_heads or heads, head_dim)) for _ in range(2))
    return [jnp.asarray(x, dtype) for x in (q, k, v, d_out)]


def output_and_grads(attention, q, k, v, d_out):
    out, vjp = jax.vjp(attention, q, k, v)
    return (out, *vjp(d_out))


def float64_reference(q, k, v, d_out, causal, scale):
    with jax.enable_x64(True):
        wide = [jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v, d_out)]
        results = output_and_grads(lambda *a: reference.attention(*a, causal=causal, scale=scale), *wide)
        return [np.asarray(r) for r in results]


CASES = {
    # name: (batch, q_len, kv_len, heads, head_dim, causal, scale, block_sizes)
    "causal-ragged-d64": (2, 40, 40, 2, 64, True, None, SMALL_BLOCKS),
    "full-d80-q-shorter": (1, 33, 50, 2, 80, False, None, SMALL_BLOCKS),
    "causal-d128-mup-scale-q-longer": (1, 50, 24, 1, 128, True, 1 / 128, SMALL_BLOCKS),
    "causal-default-blocks": (1, 40, 40, 2, 64, True, None, None),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_fp32_output_and_grads_match_float64_reference(case):
    seed = fresh_seed()
    batch, q_len, kv_len, heads, head_dim, causal, scale, blocks = case
    inputs = random_inputs(seed, batch, q_len, kv_len, heads, head_dim, jnp.float32)
    kernel = jax.jit(
        lambda *a: output_and_grads(
            lambda q, k, v: flash_attention(q, k, v, causal=causal, scale=scale, block_sizes=blocks), *a
        )
    )
    results = kernel(*inputs)
    expected = float64_reference(*inputs, causal, scale)
    for name, got, want in zip(("out", "dq", "dk", "dv"), results, expected, strict=True):
        assert got.dtype == jnp.float32 and got.shape == want.shape, (name, f"seed {seed}")
        assert relative_error(got, want) <= 1e-5, (name, relative_error(got, want), f"seed {seed}")


@pytest.mark.parametrize("causal", [True, False])
def test_bf16_output_and_grads_match_reference(causal):
    seed = fresh_seed()
    inputs = random_inputs(seed, 1, 45, 45, 2, 64, jnp.bfloat16)
    kernel = jax.jit(
        lambda *a: output_and_grads(
            lambda q, k, v: flash_attention(q, k, v, causal=causal, block_sizes=SMALL_BLOCKS), *a
        )
    )
    results = kernel(*inputs)
    expected = float64_reference(*inputs, causal, None)
    for name, got, want in zip(("out", "dq", "dk", "dv"), results, expected, strict=True):
        assert got.dtype == jnp.bfloat16, (name, f"seed {seed}")
        assert relative_error(got, want) <= 1e-2, (name, relative_error(got, want), f"seed {seed}")


def test_reference_matches_jax_dot_product_attention():
    seed = fresh_seed()
    q, k, v, _ = random_inputs(seed, 2, 24, 24, 3, 16, jnp.float32)
    for causal in (True, False):
        expected = jax.nn.dot_product_attention(q, k, v, is_causal=causal, scale=0.3)
        error = relative_error(reference.attention(q, k, v, causal=causal, scale=0.3), expected)
        assert error <= 1e-6, (causal, error, f"seed {seed}")


def test_reference_grouped_query_matches_jax_dot_product_attention():
    """jax.nn.dot_product_attention's GQA (query head i with kv head i // (heads // kv_heads)) is the convention."""
    seed = fresh_seed()
    q, k, v, _ = random_inputs(seed, 2, 24, 24, 6, 16, jnp.float32, kv_heads=2)
    for causal in (True, False):
        expected = jax.nn.dot_product_attention(q, k, v, is_causal=causal, scale=0.3)
        error = relative_error(reference.attention(q, k, v, causal=causal, scale=0.3), expected)
        assert error <= 1e-6, (causal, error, f"seed {seed}")


def test_rejects_mismatched_shapes_before_work():
    q = jnp.ones((1, 8, 2, 16))
    with pytest.raises(ValueError, match="differ in batch, heads or head_dim"):
        flash_attention(q, jnp.ones((1, 8, 3, 16)), jnp.ones((1, 8, 3, 16)))
    with pytest.raises(ValueError, match="must be \\(batch, seq, heads, head_dim\\)"):
        flash_attention(q[0], q[0], q[0])
    with pytest.raises(ValueError, match="powers of two"):
        flash_attention(q, q, q, block_sizes=BlockSizes(q=24))


@pytest.mark.parametrize("attention", [flash_attention, blockwise_attention])
def test_rejects_kv_heads_not_dividing_heads(attention):
    """kv heads must divide query heads, and k and v agree: one-line errors naming the shapes."""
    q, k3, k2 = jnp.ones((1, 8, 4, 16)), jnp.ones((1, 8, 3, 16)), jnp.ones((1, 8, 2, 16))
    message = re.escape("q (1, 8, 4, 16) and k (1, 8, 3, 16) differ in batch, heads or head_dim")
    with pytest.raises(ValueError, match=message + ".*must divide them"):
        attention(q, k3, k3)
    with pytest.raises(ValueError, match=re.escape("k and v shapes differ: (1, 8, 2, 16) vs (1, 8, 4, 16)")):
        attention(q, k2, q)


GQA_CASES = {
    # name: (batch, q_len, kv_len, heads, kv_heads, head_dim, causal)
    "gqa-8-heads-2-kv": (2, 40, 40, 8, 2, 16, True),
    "mqa-4-heads-1-kv-ragged": (1, 45, 45, 4, 1, 24, True),  # padded sequence and head dim in flash
}
GQA_KERNELS = {
    "flash": lambda q, k, v: flash_attention(q, k, v, causal=True, block_sizes=SMALL_BLOCKS),
    "blockwise": lambda q, k, v: blockwise_attention(q, k, v, causal=True, block_q=16, block_k=24),
}


@pytest.mark.parametrize("attention", GQA_KERNELS.values(), ids=GQA_KERNELS.keys())
@pytest.mark.parametrize("case", GQA_CASES.values(), ids=GQA_CASES.keys())
def test_grouped_query_output_and_grads_match_float64_reference(case, attention):
    """k, v with fewer heads than q: output and dq in q's shape, dk and dv in k's (summed over each group)."""
    seed = fresh_seed()
    batch, q_len, kv_len, heads, kv_heads, head_dim, causal = case
    inputs = random_inputs(seed, batch, q_len, kv_len, heads, head_dim, jnp.float32, kv_heads=kv_heads)
    results = jax.jit(lambda *a: output_and_grads(attention, *a))(*inputs)
    expected = float64_reference(*inputs, causal, None)
    for name, got, want in zip(("out", "dq", "dk", "dv"), results, expected, strict=True):
        assert got.dtype == jnp.float32 and got.shape == want.shape, (name, got.shape, f"seed {seed}")
        assert relative_error(got, want) <= 1e-5, (name, relative_error(got, want), f"seed {seed}")


@pytest.mark.parametrize("backend,platform", [("gpu", "cuda"), ("tpu", "tpu")])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_lowers_to_triton_and_mosaic_kernels(monkeypatch, backend, platform, dtype, kv_heads):
    """Forward and backward lower for GPU (Triton) and TPU (Mosaic) from this CPU: three kernels each, with
    4 query heads and 4 or 2 (grouped-query) kv heads.

    This checks Pallas' lowering to the backend's kernel IR only; compiling and running it needs the device.
    """
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    shape = jax.ShapeDtypeStruct((2, 1000, 4, 80), dtype)
    kv_shape = jax.ShapeDtypeStruct((2, 1000, kv_heads, 80), dtype)

    def forward_backward(q, k, v, d_out):
        return output_and_grads(lambda *a: flash_attention(*a, causal=True, scale=1 / 80), q, k, v, d_out)

    kernel_calls = ("__gpu$xla.gpu.triton", "tpu_custom_call")
    exported = export.export(
        jax.jit(forward_backward),
        platforms=[platform],
        disabled_checks=[export.DisabledSafetyCheck.custom_call(name) for name in kernel_calls],
    )(shape, kv_shape, kv_shape, shape)
    module = re.sub(r'ir = "[^"]*"', "", exported.mlir_module())  # drop the serialized kernel bodies
    assert sum(module.count(f"stablehlo.custom_call @{name}(") for name in kernel_calls) == 3


# --- blockwise_attention ----------------------------------------------------------------------------------------

BLOCKWISE_CASES = {
    # name: (batch, q_len, kv_len, heads, head_dim, causal, scale, block_q, block_k)
    "causal-ragged-blocks": (2, 70, 70, 3, 16, True, None, 16, 24),  # key blocks straddle query blocks
    "causal-cpu-default-blocks-mup-scale": (1, 300, 300, 2, 32, True, 1 / 32, 64, 256),
    "causal-q-longer": (1, 50, 24, 2, 8, True, None, 16, 16),  # rows past kv_len see every key
    "full-q-shorter": (1, 33, 50, 2, 80, False, None, 16, 32),
    "one-block": (2, 20, 20, 2, 16, True, 0.3, 64, 256),
    "causal-row-groups": (4, 130, 130, 4, 16, True, None, 64, 256),  # 16 rows in 4 groups of 4
}


@pytest.mark.parametrize("case", BLOCKWISE_CASES.values(), ids=BLOCKWISE_CASES.keys())
def test_blockwise_output_and_grads_match_float64_reference(case):
    seed = fresh_seed()
    batch, q_len, kv_len, heads, head_dim, causal, scale, block_q, block_k = case
    inputs = random_inputs(seed, batch, q_len, kv_len, heads, head_dim, jnp.float32)
    kernel = jax.jit(
        lambda *a: output_and_grads(
            lambda q, k, v: blockwise_attention(
                q, k, v, causal=causal, scale=scale, block_q=block_q, block_k=block_k
            ),
            *a,
        )
    )
    results = kernel(*inputs)
    expected = float64_reference(*inputs, causal, scale)
    for name, got, want in zip(("out", "dq", "dk", "dv"), results, expected, strict=True):
        assert got.dtype == jnp.float32 and got.shape == want.shape, (name, f"seed {seed}")
        assert relative_error(got, want) <= 1e-5, (name, relative_error(got, want), f"seed {seed}")


def test_blockwise_bf16_output_and_grads_match_reference():
    seed = fresh_seed()
    inputs = random_inputs(seed, 1, 45, 45, 2, 64, jnp.bfloat16)
    kernel = jax.jit(
        lambda *a: output_and_grads(lambda q, k, v: blockwise_attention(q, k, v, block_q=16, block_k=16), *a)
    )
    expected = float64_reference(*inputs, True, None)
    for name, got, want in zip(("out", "dq", "dk", "dv"), kernel(*inputs), expected, strict=True):
        assert got.dtype == jnp.bfloat16, (name, f"seed {seed}")
        assert relative_error(got, want) <= 1e-2, (name, relative_error(got, want), f"seed {seed}")


def test_blockwise_never_writes_the_whole_score_matrix():
    """The compiled forward + backward holds no (…, q_len, kv_len) array; the plain-jnp reference does."""
    q, k, v, d_out = random_inputs(fresh_seed(), 2, 96, 96, 2, 16, jnp.float32)

    def compiled_text(attention):
        return jax.jit(lambda *a: output_and_grads(attention, *a)).lower(q, k, v, d_out).compile().as_text()

    whole_scores = re.compile(r"f32\[(\d+,)*96,96\]")
    assert whole_scores.search(compiled_text(reference.attention))
    assert not whole_scores.search(compiled_text(lambda *a: blockwise_attention(*a, block_q=32, block_k=32)))
