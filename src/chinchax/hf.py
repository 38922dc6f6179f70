"""Hugging Face GPT-2-architecture weights ↔ chinchax parameters (numpy in, numpy out; no torch import).

HF's GPT-2 stores Conv1D weights as (in, out), the same orientation as our Dense kernels; its fused c_attn
output is laid out [q | k | v], each heads × d_head, which is our (3, heads, d_head) QKV kernel flattened.
"""

from __future__ import annotations

from collections.abc import Mapping

import ml_collections
import numpy as np

from chinchax.config import base_config


def model_config_from_hf(hf: Mapping) -> ml_collections.ConfigDict:
    """Our model config for a transformers GPT2Config dict (SP, as Cerebras-GPT checkpoints are published)."""
    if hf.get("activation_function", "gelu_new") != "gelu":
        raise ValueError(
            f"HF config activation_function={hf.get('activation_function')!r}: chinchax models use "
            "exact 'gelu'"
        )
    model = base_config().model
    model.update(
        vocab_size=hf["vocab_size"],
        max_positions=hf["n_positions"],
        d_model=hf["n_embd"],
        n_layers=hf["n_layer"],
        n_heads=hf["n_head"],
        d_ffn=hf.get("n_inner") or 0,
        layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
    )
    return model


def params_from_hf(state: Mapping[str, np.ndarray], model: ml_collections.ConfigDict) -> dict:
    """Our parameter tree from a GPT2LMHeadModel state dict (names with or without 'transformer.')."""
    state = {k.removeprefix("transformer."): np.asarray(v, np.float32) for k, v in state.items()}
    d, heads = model.d_model, model.n_heads

    def stacked(name: str) -> np.ndarray:
        return np.stack([state[f"h.{i}.{name}"] for i in range(model.n_layers)])

    layers = model.n_layers
    return {
        "token_embed": {"embedding": state["wte.weight"]},
        "position_embed": state["wpe.weight"],
        "blocks": {
            "ln_1": {"scale": stacked("ln_1.weight"), "bias": stacked("ln_1.bias")},
            "qkv": {
                "kernel": stacked("attn.c_attn.weight").reshape(layers, d, 3, heads, d // heads),
                "bias": stacked("attn.c_attn.bias").reshape(layers, 3, heads, d // heads),
            },
            "attn_out": {
                "kernel": stacked("attn.c_proj.weight").reshape(layers, heads, d // heads, d),
                "bias": stacked("attn.c_proj.bias"),
            },
            "ln_2": {"scale": stacked("ln_2.weight"), "bias": stacked("ln_2.bias")},
            "fc1": {"kernel": stacked("mlp.c_fc.weight"), "bias": stacked("mlp.c_fc.bias")},
            "fc2": {"kernel": stacked("mlp.c_proj.weight"), "bias": stacked("mlp.c_proj.bias")},
        },
        "ln_f": {"scale": state["ln_f.weight"], "bias": state["ln_f.bias"]},
    }
