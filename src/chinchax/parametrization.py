"""Standard (SP) and maximal-update (μP) parametrization as data: one table of rules per parameter role.

Hold this file against Cerebras-GPT (Dey et al. 2023, Table 7 / App. G). With m = d_model / 256 (μP only):

    role        params                           init σ (SP)        init σ (μP)           LR× (SP)  LR× (μP)
    embedding   token and position embeddings    σ                  σ_base                1         1
    hidden      Q, K, V, fc1, gate kernels       σ                  σ_base / √m           1         1/m
    out_proj    attn-out, fc2 kernels            σ / √(2L) or set   σ_base / √(2 m L)     1         1/m
    output      the untied head                  σ                  σ_base                1         1
    bias        every bias                       0                  0                     1         1
    norm        LayerNorm / RMSNorm gain (1)     —                  —                     1         1
                and LayerNorm bias (0)

    forward multiplier        SP                 μP
    embedding output          1                  10
    attention logits          q·k / √d_head      q·k / d_head
    output logits             1                  α / m

The Llama-style parameters take the rows of the GPT-3 parameters they stand for: SwiGLU's gate is a hidden
matrix like fc1 (width in, width out); separate Q and grouped K/V projections are hidden like the fused QKV;
RMSNorm's gain is a norm. The untied head is μP's output-weight row in its multiplier form (Yang et al. 2022,
Tensor Programs V, Table 8; the `mup` package's MuReadout with MuAdam): the α/m logit multiplier carries the
width scaling, so its init σ and Adam learning rate stay constant in width, as the tied embedding's do.

Inits are truncated normals at ±2σ without variance correction (their std is ≈ 0.88 σ). Weight decay applies
to embeddings, hidden, out_proj and output kernels, never to biases or norms.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import ml_collections
import optax

from chinchax.config import d_head, width_multiplier

ROLES = ("embedding", "hidden", "out_proj", "output", "bias", "norm")

# Which role each model parameter plays, by the name of the module (or param) that owns it: the one place roles
# are named (the model's initializers and the optimizer's multipliers and weight-decay mask all read it).
ROLE_OF_MODULE = {
    "token_embed": "embedding",
    "position_embed": "embedding",
    "qkv": "hidden",
    "q": "hidden",
    "kv": "hidden",
    "fc1": "hidden",
    "gate": "hidden",
    "attn_out": "out_proj",
    "fc2": "out_proj",
    "head": "output",
    "ln_1": "norm",
    "ln_2": "norm",
    "ln_f": "norm",
}


@dataclasses.dataclass(frozen=True)
class Rule:
    """How one parameter role is initialised and trained."""

    init_std: float | None  # σ of the ±2σ truncated normal; 0 = zeros; None = a norm (gain ones, bias zeros)
    lr_multiplier: float  # multiplies the global learning-rate schedule
    weight_decay: bool  # whether decoupled weight decay applies


@dataclasses.dataclass(frozen=True)
class ForwardMultipliers:
    """Constants the forward pass multiplies by."""

    embedding: float  # on the summed token + position embedding
    attention_scale: float  # on q·k
    logits: float  # on the logits (tied or untied head)


def rules(model: ml_collections.ConfigDict) -> dict[str, Rule]:
    """The rule of every role for this model's parametrization."""
    σ, L, m = model.init_std, model.n_layers, width_multiplier(model)
    if model.parametrization == "sp":
        out_std = model.out_proj_init_std or σ / math.sqrt(2 * L)
        return {
            "embedding": Rule(σ, 1.0, True),
            "hidden": Rule(σ, 1.0, True),
            "out_proj": Rule(out_std, 1.0, True),
            "output": Rule(σ, 1.0, True),
            "bias": Rule(0.0, 1.0, False),
            "norm": Rule(None, 1.0, False),
        }
    return {
        "embedding": Rule(σ, 1.0, True),
        "hidden": Rule(σ / math.sqrt(m), 1.0 / m, True),
        "out_proj": Rule(σ / math.sqrt(2 * m * L), 1.0 / m, True),
        "output": Rule(σ, 1.0, True),
        "bias": Rule(0.0, 1.0, False),
        "norm": Rule(None, 1.0, False),
    }


def forward_multipliers(model: ml_collections.ConfigDict) -> ForwardMultipliers:
    """The forward-pass constants for this model's parametrization."""
    if model.parametrization == "sp":
        return ForwardMultipliers(1.0, 1.0 / math.sqrt(d_head(model)), 1.0)
    m = width_multiplier(model)
    return ForwardMultipliers(model.mup_embedding_multiplier, 1.0 / d_head(model), model.mup_output_alpha / m)


def initializer(model: ml_collections.ConfigDict, role: str) -> jax.nn.initializers.Initializer:
    """Truncated normal at ±2σ for the role (σ of the untruncated normal), zeros where σ is 0."""
    std = rules(model)[role].init_std
    if std == 0.0:
        return jax.nn.initializers.zeros
    return jax.nn.initializers.truncated_normal(stddev=std, lower=-2.0, upper=2.0)


def role_of(path: tuple) -> str:
    """Role of the parameter at a pytree path such as ('blocks', 'qkv', 'kernel')."""
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    owner = next((ROLE_OF_MODULE[n] for n in reversed(names) if n in ROLE_OF_MODULE), None)
    if owner is None:
        raise KeyError(f"no parametrization role for parameter {'/'.join(names)}")
    return "bias" if owner != "norm" and names[-1] == "bias" else owner


def param_roles(params) -> object:
    """A pytree like params holding each parameter's role name."""
    return jax.tree_util.tree_map_with_path(lambda path, _: role_of(path), params)


def lr_multipliers(model: ml_collections.ConfigDict, params) -> optax.GradientTransformation:
    """An optax transform scaling each update by its role's LR multiplier (μP: hidden matrices 1/m)."""
    table = rules(model)
    return optax.multi_transform(
        {role: optax.scale(table[role].lr_multiplier) for role in ROLES}, param_roles(params)
    )


def weight_decay_mask(model: ml_collections.ConfigDict, params) -> object:
    """True where decoupled weight decay applies (embeddings and kernels; not biases or norms)."""
    table = rules(model)
    return jax.tree_util.tree_map_with_path(lambda path, _: table[role_of(path)].weight_decay, params)
