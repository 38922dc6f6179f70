"""The Cerebras optimizer against PyTorch's AdamW + clip_grad_norm_ with param groups, and the schedule."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from chinchax import config
from chinchax.model import gpt
from chinchax.training import optim
from chinchax.training.state import run_schedule
from experiments import configs


def tiny(parametrization_name="mup", decay="cosine"):
    cfg = configs.get("cpu_tiny")
    cfg.model.update(
        parametrization=parametrization_name,
        d_model=128,
        n_heads=4,
        n_layers=2,
        init_std=0.08 if parametrization_name == "mup" else 0.02,
    )
    cfg.data.seq_len = 32
    cfg.train.update(
        batch_size=4,
        tokens=4 * 32 * 10,
        warmup_tokens=4 * 32 * 3,
        decay=decay,
        peak_lr=3e-2,
        weight_decay=0.1,
        grad_clip_norm=0.5,
        adam_eps=1e-8,
    )
    return config.validate(cfg)


def expected_lr(cfg, step):
    """The schedule written out: linear warmup to peak, then linear/cosine to 10% at the last token."""
    t = cfg.train
    tokens = min((step + 1) * t.batch_size * cfg.data.seq_len, t.tokens)
    if tokens < t.warmup_tokens:
        return t.peak_lr * tokens / t.warmup_tokens
    frac = (tokens - t.warmup_tokens) / (t.tokens - t.warmup_tokens)
    end = t.end_lr_fraction
    if t.decay == "cosine":
        return t.peak_lr * (end + (1 - end) * 0.5 * (1 + math.cos(math.pi * frac)))
    return t.peak_lr * (1 - (1 - end) * frac)


@pytest.mark.parametrize("decay", ["linear", "cosine"])
def test_schedule_warmup_and_decay_to_ten_percent(decay):
    cfg = tiny(decay=decay)
    lr = optim.learning_rate(cfg, run_schedule(cfg))
    for step in range(10):
        assert float(lr(step)) == pytest.approx(expected_lr(cfg, step), rel=1e-5), step
    assert float(lr(9)) == pytest.approx(0.1 * cfg.train.peak_lr, rel=1e-5)
    assert float(lr(0)) > 0


def expected_wsd_lr(train, tokens):
    """WSD written out: linear warmup, peak, then over the last cooldown_fraction of the tokens from peak to
    end_lr_fraction · peak by the cooldown's shape (x: the fraction of the cooldown done)."""
    peak, end = train.peak_lr, train.peak_lr * train.end_lr_fraction
    if tokens < train.warmup_tokens:
        return peak * tokens / train.warmup_tokens
    start = train.tokens * (1 - train.cooldown_fraction)
    if tokens <= start:
        return peak
    x = (tokens - start) / (train.tokens - start)
    shape = {
        "linear": 1 - x,
        "1-sqrt": 1 - math.sqrt(x),
        "cosine": 0.5 * (1 + math.cos(math.pi * x)),
    }[train.cooldown_shape]
    return end + (peak - end) * shape


@pytest.mark.parametrize("shape", ["linear", "1-sqrt", "cosine"])
def test_wsd_holds_the_peak_then_cools_down_over_its_last_fraction(shape):
    """20 steps of 128 tokens, 3 of warmup, a cooldown over the last 33% (844.8 tokens: it starts inside a step)
    to 5% of the peak."""
    cfg = tiny(decay="wsd")
    cfg.train.update(tokens=128 * 20, cooldown_fraction=0.33, cooldown_shape=shape, end_lr_fraction=0.05)
    config.validate(cfg)
    lr = optim.learning_rate(cfg, run_schedule(cfg))
    rates = [float(lr(step)) for step in range(20)]
    for step, rate in enumerate(rates):
        assert rate == pytest.approx(expected_wsd_lr(cfg.train, (step + 1) * 128), rel=1e-5), (shape, step)
    assert len(set(rates[2:13])) == 1 and rates[2] == pytest.approx(cfg.train.peak_lr)  # stable: 384 … 1664
    assert rates[13] < cfg.train.peak_lr and rates[-1] == pytest.approx(0.05 * cfg.train.peak_lr, rel=1e-5)


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_a_cooldown_fraction_outside_zero_one_is_one_line(fraction):
    cfg = tiny(decay="wsd")
    cfg.train.cooldown_fraction = fraction
    with pytest.raises(config.ConfigError, match=r"train.cooldown_fraction=.* must be in \(0, 1\]$"):
        config.validate(cfg)


def test_schedule_is_in_tokens_across_a_batch_ramp():
    cfg = tiny(decay="linear")
    cfg.train.update(batch_ramp=((4 * 32 * 4, 8),), tokens=4 * 32 * 4 + 8 * 32 * 3, warmup_tokens=0)
    lr = optim.learning_rate(cfg, run_schedule(cfg))
    tokens_after = [128, 256, 384, 512, 768, 1024, 1280]
    for step, tokens in enumerate(tokens_after):
        expected = 3e-2 * (1 - 0.9 * tokens / cfg.train.tokens)
        assert float(lr(step)) == pytest.approx(expected, rel=1e-5), step


# Which row of reference/cerebras_gpt.json's μP rules each parameter falls under, by its name (module/param).
MUP_RULE_OF_NAME = {
    "token_embed/embedding": "embeddings (token + position)",
    "position_embed": "embeddings (token + position)",
    "blocks/qkv/kernel": "Q, K, V, fc1 weights",
    "blocks/fc1/kernel": "Q, K, V, fc1 weights",
    "blocks/attn_out/kernel": "attn-out, fc2 weights",
    "blocks/fc2/kernel": "attn-out, fc2 weights",
}


def torch_group_of(name, cfg, cerebras):
    """(LR multiplier, weight decay) of a parameter, from its name and the paper's rules (not chinchax's).

    μP: the rule text's "LR eta_base / m" → 1/m with m = d_model / base_width, "LR eta_base" → 1; biases and
    LayerNorm (γ, β) follow "LayerNorm, biases". Weight decay is off for biases and LayerNorm, on for the
    rest ("biases and LayerNorm params (embeddings ARE decayed)"). SP: every LR multiplier is 1.
    """
    module = name.split("/")[-2] if "/" in name else name
    is_norm = module.startswith("ln_")
    is_bias = name.endswith("/bias")
    excluded = cerebras["common"]["optimizer"]["weight_decay_excludes"]
    assert excluded.startswith("biases and LayerNorm"), excluded
    decay = cfg.train.weight_decay if not (is_bias or is_norm) else 0.0
    if cfg.model.parametrization == "sp":
        return 1.0, decay
    mup = cerebras["mup"]
    rule = "LayerNorm, biases" if (is_bias or is_norm) else MUP_RULE_OF_NAME[name]
    lr_text = mup["rules"][rule].split("LR ")[1].split(",")[0].strip()
    m = cfg.model.d_model / mup["base_width"]
    return {"eta_base": 1.0, "eta_base / m": 1.0 / m}[lr_text], decay


@pytest.mark.parametrize("parametrization_name", ["sp", "mup"])
def test_updates_match_torch_adamw_with_param_groups(parametrization_name, cerebras_reference):
    """Six steps against torch.optim.AdamW (float64) whose param groups come from the parameter names and
    the paper's μP table: per-name LR multiplier (μP hidden matrices 1/m, here m = 0.5, so ×2) and weight
    decay (off for biases and LayerNorm)."""
    cfg = tiny(parametrization_name)
    seed = int(np.random.default_rng().integers(2**31))
    rng = np.random.default_rng(seed)
    params = gpt.init_params(cfg.model, jax.random.key(seed))
    named, treedef = jax.tree_util.tree_flatten_with_path(params)
    names = [jax.tree_util.keystr(path, simple=True, separator="/") for path, _ in named]
    leaves = [x for _, x in named]
    expected_names = {
        *MUP_RULE_OF_NAME,
        *(f"blocks/{m}/bias" for m in ("qkv", "attn_out", "fc1", "fc2", "ln_1", "ln_2")),
        *(f"{ln}/scale" for ln in ("blocks/ln_1", "blocks/ln_2", "ln_f")),
        "ln_f/bias",
    }
    assert set(names) == expected_names, sorted(set(names) ^ expected_names)

    torch_params = [torch.nn.Parameter(torch.tensor(np.asarray(x), dtype=torch.float64)) for x in leaves]
    groups = []
    for p, name in zip(torch_params, names, strict=True):
        lr_mult, decay = torch_group_of(name, cfg, cerebras_reference)
        groups.append({"params": [p], "lr_mult": lr_mult, "weight_decay": decay, "name": name})
    if parametrization_name == "mup":  # the groups really differ: hidden ×2 (m = 0.5), no decay on biases/LN
        assert {g["lr_mult"] for g in groups} == {1.0, 2.0}
    assert {g["weight_decay"] for g in groups} == {0.0, 0.1}
    torch_opt = torch.optim.AdamW(groups, lr=1.0, betas=(0.9, 0.95), eps=1e-8)
    opt = optim.make_optimizer(cfg, params, run_schedule(cfg))
    state = opt.init(params)
    for step in range(6):
        grads = [rng.standard_normal(x.shape).astype(np.float32) * 0.3 for x in leaves]
        updates, state = opt.update(
            jax.tree.unflatten(treedef, [jnp.asarray(g) for g in grads]), state, params
        )
        params = jax.tree.map(lambda p, u: p + u, params, updates)

        for p, g in zip(torch_params, grads, strict=True):
            p.grad = torch.tensor(g, dtype=torch.float64)
        torch.nn.utils.clip_grad_norm_(torch_params, 0.5)
        for group in torch_opt.param_groups:
            group["lr"] = expected_lr(cfg, step) * group["lr_mult"]
        torch_opt.step()
        ours = jax.tree.leaves(params)
        for a, b, name in zip(ours, torch_params, names, strict=True):
            np.testing.assert_allclose(
                np.asarray(a),
                b.detach().numpy(),
                rtol=2e-4,
                atol=2e-6,
                err_msg=f"{name} after step {step + 1} (seed {seed})",
            )
