"""The μP coordinate check: activation scales across widths after a few Adam steps (Yang et al. 2021).

Under μP the mean |activation| of every layer stays put as the model widens; under SP some grow with width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from chinchax import config, parametrization
from chinchax.model import gpt

ACTIVATIONS = ("embedding", "attention_logits", "block_output", "logits")


def small_model(parametrization_name: str, width: int, *, d_head: int = 16, layers: int = 2):
    """A byte-level model config of the given width (heads of d_head), for the check."""
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
    )
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
    parametrization_name: str, widths, *, steps: int = 3, lr: float = 3e-3, seed: int = 0, d_head: int = 16
):
    """{width: [scales at step 0, 1, …, steps]} training on one fixed random batch with Adam."""
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(0, 256, (8, 65)), jnp.int32)
    results = {}
    for width in widths:
        cfg = small_model(parametrization_name, width, d_head=d_head)
        params = gpt.init_params(cfg, jax.random.key(seed))
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


def plot(results_by_parametrization: dict, path: str) -> None:
    """The classic coordinate-check figure: one row per parametrization, one panel per activation."""
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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
