"""μP against reference/cerebras_gpt.json: init stds per role, forward multipliers, LR multipliers."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

from chinchax import config, parametrization
from chinchax.model import gpt
from experiments import configs

# std of a unit normal truncated at ±2 (the init has no variance correction)
TRUNCATED_STD = stats.truncnorm(-2, 2).std()

ROLE_PARAMS = {
    "embedding": [("token_embed", "embedding"), ("position_embed",)],
    "hidden": [("blocks", "qkv", "kernel"), ("blocks", "fc1", "kernel")],
    "out_proj": [("blocks", "attn_out", "kernel"), ("blocks", "fc2", "kernel")],
}


def leaf(tree, path):
    for key in path:
        tree = tree[key]
    return np.asarray(tree)


@pytest.mark.parametrize("size, depth", [("111M", None), ("2.7B", 2)])
def test_mup_init_std_per_role(size, depth, cerebras_reference):
    """Full width; 111M at full depth, 2.7B at depth 2 with the 2L factor rescaled from the real depth."""
    mup = cerebras_reference["mup"]
    ref = next(m for m in mup["models"] if m["name"] == size)
    cfg = configs.get(f"mup_{size.lower()}")
    real_depth = cfg.model.n_layers
    if depth:
        cfg.model.n_layers = depth
    cfg.model.vocab_size = 4096  # the embedding's std does not depend on the vocabulary
    params = gpt.init_params(cfg.model, jax.random.key(np.random.SeedSequence().entropy % 2**31))
    expected = {
        "embedding": mup["sigma_base"],
        "hidden": ref["hidden_init_std"],
        "out_proj": ref["out_proj_init_std"] * math.sqrt(real_depth / cfg.model.n_layers),
    }
    for role, paths in ROLE_PARAMS.items():
        for path in paths:
            values = leaf(params, path)
            std = values.std()
            assert std == pytest.approx(expected[role] * TRUNCATED_STD, rel=0.02), (role, path)
            assert np.abs(values).max() <= 2 * expected[role] * (1 + 1e-6), (role, path)
    assert np.all(leaf(params, ("blocks", "qkv", "bias")) == 0)
    assert np.all(leaf(params, ("blocks", "ln_1", "scale")) == 1)


def test_sp_init_std_per_role(cerebras_reference):
    ref = next(p for p in cerebras_reference["sp"] if p["name"] == "111M")
    cfg = configs.get("chinchilla_111m")
    cfg.model.vocab_size = 4096
    params = gpt.init_params(cfg.model, jax.random.key(3))
    for role, sigma in [("embedding", 0.02), ("hidden", 0.02), ("out_proj", ref["out_proj_init_std"])]:
        for path in ROLE_PARAMS[role]:
            assert leaf(params, path).std() == pytest.approx(sigma * TRUNCATED_STD, rel=0.02), path


def layer_norm(x, scale, bias, eps=1e-5):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + eps) * scale + bias


def hand_written_forward(p, tokens, *, d_head, embedding_mult, attention_scale, logit_mult):
    """GPT-2 with μP multipliers in plain jnp, one layer at a time, written from the paper's rules."""
    seq = tokens.shape[1]
    x = (p["token_embed"]["embedding"][tokens] + p["position_embed"][:seq]) * embedding_mult
    blocks = p["blocks"]
    for i in range(blocks["qkv"]["kernel"].shape[0]):
        b = jax.tree.map(lambda a, i=i: a[i], blocks)
        h = layer_norm(x, b["ln_1"]["scale"], b["ln_1"]["bias"])
        d = h.shape[-1]
        qkv = h @ b["qkv"]["kernel"].reshape(d, 3 * d) + b["qkv"]["bias"].reshape(3 * d)
        q, k, v = (t.reshape(*t.shape[:2], -1, d_head) for t in jnp.split(qkv, 3, axis=-1))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * attention_scale
        scores = jnp.where(jnp.tril(jnp.ones((seq, seq), bool)), scores, -jnp.inf)
        attn = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, -1), v).reshape(x.shape)
        x = x + attn @ b["attn_out"]["kernel"].reshape(d, d) + b["attn_out"]["bias"]
        h = layer_norm(x, b["ln_2"]["scale"], b["ln_2"]["bias"])
        h = jax.nn.gelu(h @ b["fc1"]["kernel"] + b["fc1"]["bias"], approximate=False)
        x = x + h @ b["fc2"]["kernel"] + b["fc2"]["bias"]
    x = layer_norm(x, p["ln_f"]["scale"], p["ln_f"]["bias"])
    return (x @ p["token_embed"]["embedding"].T) * logit_mult


@pytest.mark.parametrize("width", [128, 384])
def test_mup_forward_multipliers_in_effect(width, cerebras_reference):
    mup = cerebras_reference["mup"]
    cfg = configs.get("cpu_tiny")
    cfg.model.update(parametrization="mup", d_model=width, n_heads=width // 32, init_std=0.08)
    config.validate(cfg)
    rng = np.random.default_rng()
    params = gpt.init_params(cfg.model, jax.random.key(int(rng.integers(2**31))))
    # perturb every parameter (biases and norms included) so that no term is trivially zero or one
    params = jax.tree.map(lambda a: a + 0.05 * rng.standard_normal(a.shape, np.float32), params)
    tokens = rng.integers(0, cfg.model.vocab_size, (2, 48)).astype(np.int32)
    m = width / mup["base_width"]
    expected = hand_written_forward(
        params,
        tokens,
        d_head=32,
        embedding_mult=mup["embedding_multiplier"],
        attention_scale=1 / 32,
        logit_mult=mup["output_alpha"] / m,
    )
    ours = gpt.build(cfg.model).apply({"params": params}, tokens)
    np.testing.assert_allclose(ours, expected, atol=2e-5 * np.abs(expected).max(), rtol=1e-4)
    sp_like = hand_written_forward(
        params, tokens, d_head=32, embedding_mult=1.0, attention_scale=32**-0.5, logit_mult=1.0
    )
    assert np.abs(np.asarray(ours) - np.asarray(sp_like)).max() > 1e-2  # the multipliers matter


def test_lr_multipliers_per_role(cerebras_reference):
    mup = cerebras_reference["mup"]
    for ref in mup["models"]:
        cfg = configs.get(f"mup_{ref['name'].lower()}")
        cfg.model.update(n_layers=1, vocab_size=64, max_positions=8)
        shapes = gpt.param_shapes(cfg.model)
        updates = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), shapes)
        transform = parametrization.lr_multipliers(cfg.model, shapes)
        scaled, _ = transform.update(updates, transform.init(updates), updates)
        assert float(scaled["blocks"]["qkv"]["kernel"].max()) == pytest.approx(1 / ref["m"])
        assert float(scaled["blocks"]["fc2"]["kernel"].min()) == pytest.approx(1 / ref["m"])
        assert float(scaled["blocks"]["fc1"]["bias"].max()) == 1.0
        assert float(scaled["token_embed"]["embedding"].max()) == 1.0
        assert float(scaled["ln_f"]["scale"].max()) == 1.0
    sp = configs.get("chinchilla_111m").model
    sp.update(n_layers=1, vocab_size=64, max_positions=8)
    shapes = gpt.param_shapes(sp)
    transform = parametrization.lr_multipliers(sp, shapes)
    ones = jax.tree.map(lambda s: jnp.ones(s.shape), shapes)
    assert all(
        float(x.min()) == 1.0 for x in jax.tree.leaves(transform.update(ones, transform.init(ones))[0])
    )
    assert isinstance(transform, optax.GradientTransformation)


def test_weight_decay_mask_spares_biases_and_norms():
    cfg = configs.get("cpu_tiny")
    mask = parametrization.weight_decay_mask(cfg.model, gpt.param_shapes(cfg.model))
    assert mask["token_embed"]["embedding"] and mask["position_embed"]
    assert mask["blocks"]["qkv"]["kernel"] and mask["blocks"]["fc2"]["kernel"]
    assert not mask["blocks"]["qkv"]["bias"] and not mask["blocks"]["ln_2"]["scale"]
    assert not mask["ln_f"]["bias"]
