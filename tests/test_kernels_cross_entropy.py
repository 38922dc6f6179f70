"""chinchax_kernels.softmax_cross_entropy against a float64 plain-jnp reference, and its memory against the naive one.

Inputs are drawn from a fresh seed per test, printed in every failure message.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from chinchax_kernels import reference, softmax_cross_entropy


def relative_error(actual, expected) -> float:
    """‖actual − expected‖ / ‖expected‖ over all elements, in float64."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def fresh_seed() -> int:
    return int(np.random.default_rng().integers(2**31))


def random_inputs(seed, tokens, vocab, d, dtype):
    """Targets include the first and last vocabulary entries; weight at the tied-embedding scale (σ ≈ 0.1)."""
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.standard_normal((tokens, d)), dtype)
    weight = jnp.asarray(0.1 * rng.standard_normal((vocab, d)), dtype)
    targets = rng.integers(0, vocab, tokens)
    targets[:3] = [0, vocab - 1, vocab - 2]
    d_loss = jnp.asarray(rng.standard_normal(tokens), jnp.float32)
    return hidden, weight, jnp.asarray(targets, jnp.int32), d_loss


def loss_and_grads(loss_fn, hidden, weight, targets, d_loss):
    """Per-token loss and the gradients of Σ d_loss · loss for hidden and weight."""
    loss, vjp = jax.vjp(lambda h, w: loss_fn(h, w, targets), hidden, weight)
    return (loss, *vjp(d_loss))


def float64_reference(hidden, weight, targets, d_loss, logit_scale):
    with jax.enable_x64(True):
        wide = [jnp.asarray(np.asarray(x, np.float64)) for x in (hidden, weight)]
        fn = lambda h, w, t: reference.softmax_cross_entropy(h, w, t, logit_scale=logit_scale)  # noqa: E731
        return [np.asarray(r) for r in loss_and_grads(fn, *wide, targets, jnp.asarray(d_loss, np.float64))]


CASES = {
    # name: (tokens, vocab, d, logit_scale, token_chunk, vocab_chunk)
    "ragged-chunks-mup-scale": (300, 1000, 64, 0.25, 128, 384),  # last vocab chunk overlaps the previous one
    "single-chunk-defaults": (96, 500, 32, 1.0, 1024, 8192),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_fp32_loss_and_grads_match_float64_reference(case):
    seed = fresh_seed()
    tokens, vocab, d, logit_scale, token_chunk, vocab_chunk = case
    inputs = random_inputs(seed, tokens, vocab, d, jnp.float32)
    fused = lambda h, w, t: softmax_cross_entropy(  # noqa: E731
        h, w, t, logit_scale=logit_scale, token_chunk=token_chunk, vocab_chunk=vocab_chunk
    )
    results = jax.jit(lambda *a: loss_and_grads(fused, *a))(*inputs)
    expected = float64_reference(*inputs, logit_scale)
    for name, got, want in zip(("loss", "d_hidden", "d_weight"), results, expected, strict=True):
        assert got.dtype == jnp.float32 and got.shape == want.shape, (name, f"seed {seed}")
        assert relative_error(got, want) <= 1e-5, (name, relative_error(got, want), f"seed {seed}")


def test_bf16_loss_and_grads_match_reference():
    seed = fresh_seed()
    inputs = random_inputs(seed, 200, 700, 64, jnp.bfloat16)
    fused = lambda h, w, t: softmax_cross_entropy(h, w, t, logit_scale=0.5, token_chunk=64, vocab_chunk=256)  # noqa: E731
    loss, d_hidden, d_weight = jax.jit(lambda *a: loss_and_grads(fused, *a))(*inputs)
    expected = float64_reference(*inputs, 0.5)
    assert loss.dtype == jnp.float32 and d_hidden.dtype == d_weight.dtype == jnp.bfloat16, f"seed {seed}"
    for name, got, want in zip(
        ("loss", "d_hidden", "d_weight"), (loss, d_hidden, d_weight), expected, strict=True
    ):
        assert relative_error(got, want) <= 1e-2, (name, relative_error(got, want), f"seed {seed}")


def peak_bytes(loss_fn, tokens, vocab, d) -> tuple[int, object]:
    """XLA's compiled peak for loss + grads: arguments + outputs + temporaries − aliased buffers (bytes)."""
    shapes = (
        jax.ShapeDtypeStruct((tokens, d), jnp.float32),
        jax.ShapeDtypeStruct((vocab, d), jnp.float32),
        jax.ShapeDtypeStruct((tokens,), jnp.int32),
        jax.ShapeDtypeStruct((tokens,), jnp.float32),
    )
    stats = jax.jit(lambda *a: loss_and_grads(loss_fn, *a)).lower(*shapes).compile().memory_analysis()
    total = stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
    return total - stats.alias_size_in_bytes, stats


def test_fused_peak_memory_is_4x_below_naive_at_gpt2_vocab():
    tokens, vocab, d = 8192, 50257, 768
    fused, fused_stats = peak_bytes(softmax_cross_entropy, tokens, vocab, d)
    naive, naive_stats = peak_bytes(reference.softmax_cross_entropy, tokens, vocab, d)
    mib = 2**20
    print(
        f"\nloss+grads, {tokens} tokens x {vocab} vocab, d={d}, fp32 (XLA CPU memory_analysis):"
        f"\n  fused: peak {fused / mib:.0f} MiB (temp {fused_stats.temp_size_in_bytes / mib:.0f} MiB)"
        f"\n  naive: peak {naive / mib:.0f} MiB (temp {naive_stats.temp_size_in_bytes / mib:.0f} MiB)"
        f"\n  ratio {naive / fused:.1f}x (temp alone {naive_stats.temp_size_in_bytes / fused_stats.temp_size_in_bytes:.0f}x)"
    )
    assert naive >= tokens * vocab * 4, "the naive version should hold at least the fp32 logits"
    assert naive / fused >= 4


def test_rejects_bad_inputs_before_work():
    hidden, weight, targets = jnp.ones((4, 8)), jnp.ones((10, 8)), jnp.zeros((4,), jnp.int32)
    with pytest.raises(ValueError, match="weight \\(vocab, d\\)"):
        softmax_cross_entropy(hidden, jnp.ones((10, 6)), targets)
    with pytest.raises(ValueError, match="targets must be integer"):
        softmax_cross_entropy(hidden, weight, targets.astype(jnp.float32))
    with pytest.raises(TypeError, match="share a float dtype"):
        softmax_cross_entropy(hidden, weight.astype(jnp.bfloat16), targets)
