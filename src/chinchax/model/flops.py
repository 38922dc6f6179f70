"""Parameter counts, FLOPs per token and training FLOPs of a config (analytic, no devices).

Counts follow Cerebras-GPT App. E: embeddings V·d + S·d, per layer 12d² + 13d (with d_ffn = 4d), final LN 2d.
FLOPs count multiply-adds as 2 and training as 3× the forward pass (forward + backward), as Chinchilla and
PaLM do; the detailed count adds attention (q·kᵀ and weights·v over the full sequence) and the logits matmul
to the non-embedding matmuls, and leaves out LayerNorm, GELU, softmax and the embedding lookup.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from chinchax.config import d_ffn, steps_for, train_tokens


def paper_param_count(vocab: int, positions: int, d: int, layers: int) -> int:
    """Cerebras-GPT App. E: V·d + S·d + L·(12d² + 13d) + 2d (assumes d_ffn = 4d)."""
    return vocab * d + positions * d + layers * (12 * d * d + 13 * d) + 2 * d


def layer_params(model: ml_collections.ConfigDict) -> int:
    """Parameters of one block: QKV, attn-out, fc1, fc2 (weights + biases) and two LayerNorms."""
    d, f = model.d_model, d_ffn(model)
    return 4 * d * d + 2 * d * f + 9 * d + f


def embedding_params(model: ml_collections.ConfigDict) -> int:
    """Token and position embeddings (the tied head adds none)."""
    return (model.vocab_size + model.max_positions) * model.d_model


def param_count(model: ml_collections.ConfigDict) -> int:
    """All parameters: embeddings, blocks, final LayerNorm."""
    return embedding_params(model) + model.n_layers * layer_params(model) + 2 * model.d_model


def matmul_params(model: ml_collections.ConfigDict) -> int:
    """Weights of the block matmuls (what each token multiplies through once, excluding the head)."""
    d, f = model.d_model, d_ffn(model)
    return model.n_layers * (4 * d * d + 2 * d * f)


def flops_per_token(model: ml_collections.ConfigDict, seq_len: int) -> int:
    """Training FLOPs per token, detailed: 6·matmul params + 12·L·S·d (attention) + 6·d·V (logits)."""
    attention = 12 * model.n_layers * seq_len * model.d_model
    logits = 6 * model.d_model * model.vocab_size
    return 6 * matmul_params(model) + attention + logits


@dataclasses.dataclass(frozen=True)
class Plan:
    """The analytic budget of a training run."""

    params: int
    non_embedding_params: int
    tokens: int
    steps: int
    flops_per_token: int  # detailed count
    flops_per_token_6n: int  # 6 · params
    train_flops: float  # tokens · flops_per_token
    tokens_per_param: float


def plan(cfg: ml_collections.ConfigDict) -> Plan:
    """Parameters, tokens, steps and FLOPs of a config."""
    params = param_count(cfg.model)
    tokens = train_tokens(cfg, params)
    per_token = flops_per_token(cfg.model, cfg.data.seq_len)
    return Plan(
        params=params,
        non_embedding_params=params - embedding_params(cfg.model),
        tokens=tokens,
        steps=steps_for(cfg, tokens),
        flops_per_token=per_token,
        flops_per_token_6n=6 * params,
        train_flops=float(tokens) * per_token,
        tokens_per_param=tokens / params,
    )
