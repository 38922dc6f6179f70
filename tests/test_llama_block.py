"""The Llama-style switches: parameter counts against transformers' LlamaForCausalLM, the forward pass against a
plain-numpy float64 block written from the rules (RMSNorm, rotary pairs as complex numbers, grouped K/V,
SwiGLU, the untied head, μP's multipliers), every attention path and the KV cache with grouped kv heads, and
μP's roles for the new parameters against reference/cerebras_gpt.json."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from scipy import stats

from chinchax import config, parametrization
from chinchax.model import flops, gpt

TRUNCATED_STD = stats.truncnorm(-2, 2).std()  # std of a unit normal truncated at ±2


def llama_model(**overrides):
    """A small validated model config with every Llama switch on (GQA 8 query / 2 kv heads, untied head)."""
    cfg = config.base_config()
    cfg.model.update(
        vocab_size=301,
        max_positions=64,
        d_model=64,
        n_layers=2,
        n_heads=8,
        kv_heads=2,
        d_ffn=96,
        norm="rmsnorm",
        position="rope",
        rope_theta=12345.0,
        mlp="swiglu",
        bias=False,
        tie_embeddings=False,
        attention="xla",
    )
    cfg.model.update(**overrides)
    cfg.data.update(tokenizer="bytes", seq_len=32)
    return config.validate(cfg).model


@pytest.mark.parametrize(
    "overrides",
    [{}, {"kv_heads": 0, "bias": True, "tie_embeddings": True}, {"kv_heads": 1, "d_ffn": 0}],
    ids=["gqa-untied", "mha-tied-bias", "mqa-default-ffn"],
)
def test_param_count_equals_transformers_llama(overrides):
    model = llama_model(**overrides)
    hf = transformers.LlamaConfig(
        vocab_size=model.vocab_size,
        hidden_size=model.d_model,
        intermediate_size=config.d_ffn(model),
        num_hidden_layers=model.n_layers,
        num_attention_heads=model.n_heads,
        num_key_value_heads=config.kv_heads(model),
        max_position_embeddings=model.max_positions,
        attention_bias=model.bias,
        mlp_bias=model.bias,
        tie_word_embeddings=model.tie_embeddings,
    )
    expected = sum(p.numel() for p in transformers.LlamaForCausalLM(hf).parameters())
    assert flops.param_count(model) == expected
    assert sum(x.size for x in jax.tree.leaves(gpt.param_shapes(model))) == expected


def _rms_norm(x, gain, eps=1e-5):
    return x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * gain


def _rotate(x, theta):
    """x (batch, seq, heads, d_head): dims i and i + d_head/2 as one complex number, times e^{i·pos·θ^(−2i/d)}."""
    half = x.shape[-1] // 2
    angle = np.arange(x.shape[1])[:, None] * theta ** (-2.0 * np.arange(half) / x.shape[-1])
    turned = (x[..., :half] + 1j * x[..., half:]) * np.exp(1j * angle)[None, :, None, :]
    return np.concatenate([turned.real, turned.imag], axis=-1)


def _silu(x):
    return x / (1 + np.exp(-x))


def numpy_llama(p, tokens, model, *, embedding_mult, attention_scale, logit_mult):
    """The Llama block in float64 numpy, written from the rules (each query head group repeats its kv head)."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    heads, kv = model.n_heads, model.kv_heads
    seq = tokens.shape[1]
    x = p["token_embed"]["embedding"][tokens] * embedding_mult
    blocks = p["blocks"]
    for i in range(model.n_layers):
        b = jax.tree.map(lambda a, i=i: a[i], blocks)
        h = _rms_norm(x, b["ln_1"]["scale"])
        q = np.einsum("bsd,dhe->bshe", h, b["q"]["kernel"])
        k = np.einsum("bsd,dhe->bshe", h, b["kv"]["kernel"][:, 0])
        v = np.einsum("bsd,dhe->bshe", h, b["kv"]["kernel"][:, 1])
        q, k = _rotate(q, model.rope_theta), _rotate(k, model.rope_theta)
        k, v = np.repeat(k, heads // kv, axis=2), np.repeat(v, heads // kv, axis=2)
        scores = np.einsum("bqhd,bkhd->bhqk", q, k) * attention_scale
        scores = np.where(np.tril(np.ones((seq, seq), bool)), scores, -np.inf)
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        attended = np.einsum("bhqk,bkhd->bqhd", weights, v)
        x = x + np.einsum("bqhd,hde->bqe", attended, b["attn_out"]["kernel"])
        h = _rms_norm(x, b["ln_2"]["scale"])
        x = x + (_silu(h @ b["gate"]["kernel"]) * (h @ b["fc1"]["kernel"])) @ b["fc2"]["kernel"]
    x = _rms_norm(x, p["ln_f"]["scale"])
    return x @ p["head"].T * logit_mult


@pytest.mark.parametrize("parametrization_name", ["sp", "mup"])
def test_llama_forward_equals_a_float64_reference(parametrization_name, cerebras_reference):
    mup = cerebras_reference["mup"]
    model = llama_model(parametrization=parametrization_name, mup_base_width=16, init_std=0.08)
    rng = np.random.default_rng()
    params = gpt.init_params(model, jax.random.key(int(rng.integers(2**31))))
    # perturb every parameter (norm gains included) so that no term is trivially zero or one
    params = jax.tree.map(lambda a: a + 0.05 * rng.standard_normal(a.shape, np.float32), params)
    tokens = rng.integers(0, model.vocab_size, (2, 24)).astype(np.int32)
    d_head = model.d_model // model.n_heads
    if parametrization_name == "mup":
        m = model.d_model / model.mup_base_width
        multipliers = dict(
            embedding_mult=mup["embedding_multiplier"],
            attention_scale=1 / d_head,
            logit_mult=mup["output_alpha"] / m,
        )
    else:
        multipliers = dict(embedding_mult=1.0, attention_scale=d_head**-0.5, logit_mult=1.0)
    expected = numpy_llama(params, tokens, model, **multipliers)
    ours = np.asarray(gpt.build(model).apply({"params": params}, tokens))
    np.testing.assert_allclose(ours, expected, atol=1e-4 * np.abs(expected).max(), rtol=1e-4)


@pytest.mark.parametrize("implementation", ["blockwise", "pallas"])
def test_every_attention_path_reads_grouped_kv_heads(implementation):
    """Logits and gradients of the GQA + rope model by each kernel equal the whole-score XLA path's."""
    model = llama_model()
    rng = np.random.default_rng()
    params = gpt.init_params(model, jax.random.key(int(rng.integers(2**31))))
    tokens = jnp.asarray(rng.integers(0, model.vocab_size, (2, 32)), jnp.int32)

    def loss_and_grads(m):
        net = gpt.build(m)
        return jax.value_and_grad(lambda p: jnp.mean(net.apply({"params": p}, tokens) ** 2))(params)

    (reference_loss, reference_grads) = loss_and_grads(model)
    model_k = llama_model(attention=implementation)
    (loss, grads) = loss_and_grads(model_k)
    assert float(loss) == pytest.approx(float(reference_loss), rel=1e-5)
    for ours, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(reference_grads), strict=True):
        np.testing.assert_allclose(ours, ref, atol=1e-5 * float(jnp.abs(ref).max()) + 1e-8, rtol=1e-3)


def test_the_kv_cache_holds_kv_heads_and_decodes_as_the_whole_forward():
    model = llama_model()
    rng = np.random.default_rng()
    params = gpt.init_params(model, jax.random.key(int(rng.integers(2**31))))
    tokens = jnp.asarray(rng.integers(0, model.vocab_size, (2, 20)), jnp.int32)
    whole = gpt.build(model).apply({"params": params}, tokens)

    cache = gpt.init_cache(model, batch=2, length=32)
    d_head = model.d_model // model.n_heads
    assert cache["blocks"]["key"].shape == (model.n_layers, 2, 32, model.kv_heads, d_head)
    net = gpt.build(model, decode=True)
    prompt, state = 12, {"cache": cache}
    logits, state = net.apply({"params": params, **state}, tokens[:, :prompt], mutable=["cache"])
    steps = [logits]
    for t in range(prompt, tokens.shape[1]):
        logits, state = net.apply({"params": params, **state}, tokens[:, t : t + 1], mutable=["cache"])
        steps.append(logits)
    np.testing.assert_allclose(np.concatenate(steps, axis=1), whole, atol=2e-5, rtol=1e-4)


def test_mup_roles_of_the_llama_parameters(cerebras_reference):
    """Width 1024 (m = 4): q / kv / gate are hidden (σ_base/√m, LR 1/m), the untied head is an output weight
    (σ_base, LR 1), RMSNorm gains are norms (1, LR 1), and no biases exist."""
    mup = cerebras_reference["mup"]
    cfg = config.base_config()
    cfg.model.update(
        d_model=1024,
        n_heads=16,
        kv_heads=4,
        n_layers=2,
        vocab_size=4096,
        max_positions=8,
        norm="rmsnorm",
        position="rope",
        mlp="swiglu",
        bias=False,
        tie_embeddings=False,
        parametrization="mup",
        init_std=mup["sigma_base"],
    )
    cfg.data.update(tokenizer="bytes", seq_len=8)
    model = config.validate(cfg).model
    m = model.d_model / mup["base_width"]
    params = gpt.init_params(model, jax.random.key(np.random.SeedSequence().entropy % 2**31))
    blocks = params["blocks"]
    sigma = mup["sigma_base"]
    expected = {
        "q": (blocks["q"]["kernel"], sigma / math.sqrt(m)),
        "kv": (blocks["kv"]["kernel"], sigma / math.sqrt(m)),
        "gate": (blocks["gate"]["kernel"], sigma / math.sqrt(m)),
        "fc1": (blocks["fc1"]["kernel"], sigma / math.sqrt(m)),
        "fc2": (blocks["fc2"]["kernel"], sigma / math.sqrt(2 * m * model.n_layers)),
        "head": (params["head"], sigma),
    }
    for name, (values, std) in expected.items():
        assert float(np.std(values)) == pytest.approx(std * TRUNCATED_STD, rel=0.02), name
    assert np.all(np.asarray(blocks["ln_1"]["scale"]) == 1) and np.all(
        np.asarray(params["ln_f"]["scale"]) == 1
    )
    assert not [path for path, _ in jax.tree_util.tree_leaves_with_path(params) if "bias" in str(path)]

    shapes = gpt.param_shapes(model)
    ones = jax.tree.map(lambda s: jnp.ones(s.shape), shapes)
    transform = parametrization.lr_multipliers(model, shapes)
    scaled = transform.update(ones, transform.init(ones))[0]
    for name in ("q", "kv", "gate", "fc2"):
        assert float(scaled["blocks"][name]["kernel"].max()) == pytest.approx(1 / m), name
    assert float(scaled["head"].min()) == 1.0 and float(scaled["blocks"]["ln_2"]["scale"].min()) == 1.0
    mask = parametrization.weight_decay_mask(model, shapes)
    assert mask["head"] and mask["blocks"]["gate"]["kernel"] and not mask["ln_f"]["scale"]


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"kv_heads": 3}, "model.kv_heads=3 must divide model.n_heads=8"),
        ({"d_model": 72, "position": "rope"}, "model.position='rope'"),
        ({"norm": "batchnorm"}, "model.norm='batchnorm'"),
        ({"mlp": "relu"}, "model.mlp='relu'"),
    ],
)
def test_a_block_that_cannot_run_is_one_line_naming_the_field(overrides, field):
    cfg = config.base_config()
    cfg.model.update(**{"d_model": 64, "n_heads": 8, **overrides})
    with pytest.raises(config.ConfigError, match="^config .*" + field.replace("(", r"\(")) as error:
        config.validate(cfg)
    assert "\n" not in str(error.value)


def test_swiglu_default_width_is_llamas_rule():
    """8/3·d rounded up to a multiple of d_ffn_multiple: Llama 2 7B's 11008 at d 4096 (multiple 256)."""
    cfg = config.base_config()
    cfg.model.update(d_model=4096, n_heads=32, mlp="swiglu")
    assert config.d_ffn(cfg.model) == 11008
    cfg.model.update(d_model=64, n_heads=4, d_ffn_multiple=16)
    assert config.d_ffn(cfg.model) == 176
