"""The μP coordinate check: activation scales across widths after a few Adam steps (Yang et al. 2021).

Under μP the mean |activation| of every layer stays put as the model widens; under SP some grow with width. The
check runs on either block: GPT-3's, or the Llama block (RMSNorm, rotary positions, SwiGLU, grouped-query
attention, no biases, an untied head whose logits carry μP's α/m multiplier). The untied head's logits start at
∝ 1/√width (μP's output layer vanishes at init) and, after a few steps, still fall with width rather than stay
flat (slope about −0.4 from width 128 to 1024 after 3 steps); the tied head's logits stay nearly flat (−0.14).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from chinchax import config, parametrization
from chinchax.model import gpt

ACTIVATIONS = ("embedding", "attention_logits", "block_output", "logits")
# Each block's model switches at check widths: the Llama block is config.LLAMA_BLOCK with SwiGLU's hidden width
# rounded to 16 rather than 256 (so that it stays near 8/3·d at these widths), and LLAMA_KV_GROUP query heads per
# key/value head.
BLOCKS = {"gpt3": {}, "llama": {**config.LLAMA_BLOCK, "d_ffn_multiple": 16}}
LLAMA_KV_GROUP = 2


def small_model(
    parametrization_name: str, width: int, *, d_head: int = 16, layers: int = 2, block: str = "gpt3"
):
    """A byte-level model config of the given width (heads of d_head) and block (one of BLOCKS), for the check."""
    if block not in BLOCKS:
        raise config.ConfigError(f"block={block!r} is not one of {', '.join(BLOCKS)}")
    cfg = config.base_config()
    cfg.model.update(
        vocab_size=257,
        max_positions=64,
        d_model=width,
        n_heads=width // d_head,
        n_layers=layers,
        parametrization=parametrization_name,
        init_std=0.08 if parametrization_name == "mup" else 0.02,
        attention="xla",  # the path that sows the attention logits' scale
        **BLOCKS[block],
    )
    if block == "llama":
        cfg.model.kv_heads = cfg.model.n_heads // LLAMA_KV_GROUP
    cfg.data.update(tokenizer="bytes", seq_len=64)
    return config.validate(cfg).model


def activation_scales(model_cfg, params, tokens) -> dict[str, jax.Array]:
    """Mean |activation| of each watched activation (attention logits averaged over layers, last block)."""
    _, state = gpt.build(model_cfg).apply({"params": params}, tokens, mutable=["intermediates"])
    inter = state["intermediates"]
    return {
        "embedding": inter["embedding"][0],
        "attention_logits": jnp.mean(inter["blocks"]["attention_logits"][0]),
        "block_output": inter["blocks"]["block_output"][0][-1],
        "logits": inter["logits"][0],
    }


def run(
    parametrization_name: str,
    widths,
    *,
    steps: int = 3,
    lr: float = 3e-3,
    seed: int = 0,
    d_head: int = 16,
    block: str = "gpt3",
):
    """{width: [scales at step 0, 1, …, steps]} of `block` (one of BLOCKS) training on one fixed random batch with
    Adam. Every width's config is checked before the first model is built."""
    configs = [small_model(parametrization_name, w, d_head=d_head, block=block) for w in widths]
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(0, 256, (8, 65)), jnp.int32)
    results = {}
    for width, cfg in zip(widths, configs, strict=True):
        init = jax.jit(lambda key, cfg=cfg: gpt.init_params(cfg, key))  # the eager init's values, sooner
        params = init(jax.random.key(seed))
        optimizer = optax.chain(optax.adam(lr), parametrization.lr_multipliers(cfg, params))
        state = optimizer.init(params)
        net = gpt.build(cfg)

        @jax.jit
        def step(params, state, net=net, optimizer=optimizer):
            def loss(p):
                logits = net.apply({"params": p}, tokens[:, :-1])
                return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

            grads = jax.grad(loss)(params)
            updates, state = optimizer.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        measure = jax.jit(lambda p, cfg=cfg: activation_scales(cfg, p, tokens[:, :-1]))
        scales = [measure(params)]
        for _ in range(steps):
            params, state = step(params, state)
            scales.append(measure(params))
        results[width] = [{k: float(v) for k, v in s.items()} for s in scales]
    return results


def spread(results, step: int = -1) -> dict[str, float]:
    """max / min across widths of each activation at a step: ≈ 1 when scales do not depend on width."""
    out = {}
    for name in ACTIVATIONS:
        values = [scales[step][name] for scales in results.values()]
        out[name] = max(values) / min(values)
    return out


def slopes(results, step: int = -1) -> dict[str, float]:
    """Least-squares slope of log mean |activation| against log width at a step: 0 when flat, > 0 when growing
    (e.g. 1 for ∝ width), −0.5 for ∝ 1/√width (μP's output logits at init)."""
    log_width = np.log([float(w) for w in results])
    return {
        name: float(np.polyfit(log_width, np.log([s[step][name] for s in results.values()]), 1)[0])
        for name in ACTIVATIONS
    }


def plot(results_by_parametrization: dict, path: str, block: str = "gpt3") -> None:
    """The classic coordinate-check figure of `block`: one row per parametrization, one panel per activation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = list(results_by_parametrization)
    fig, axes = plt.subplots(
        len(rows), len(ACTIVATIONS), figsize=(4 * len(ACTIVATIONS), 3.2 * len(rows)), sharey="col"
    )
    axes = np.atleast_2d(axes)
    for r, name in enumerate(rows):
        results = results_by_parametrization[name]
        widths = sorted(results)
        steps = len(results[widths[0]])
        for c, activation in enumerate(ACTIVATIONS):
            ax = axes[r, c]
            for t in range(steps):
                ax.plot(widths, [results[w][t][activation] for w in widths], marker="o", label=f"t={t}")
            ax.set(xscale="log", yscale="log", xlabel="width", title=f"{name.upper()}: {activation}")
            ax.set_xticks(widths, [str(w) for w in widths])
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        axes[r, 0].set_ylabel("mean |activation|")
    axes[0, -1].legend(fontsize=7)
    fig.suptitle(f"Coordinate check, {block} block: mean |activation| vs width after t Adam steps")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
