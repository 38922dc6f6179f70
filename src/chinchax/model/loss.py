"""The loss: next-token cross-entropy through the (tied or untied) head, dense or chunked, in fp32.

One function for training and evaluation. Targets equal to IGNORE (padding rows of a microbatch, the masked
tail of an evaluation window) carry no loss and no gradient; the loss is the sum over the other targets, with
their count, so callers average over exactly the tokens they mean. 'dense' writes the whole logit matrix
(optax's cross-entropy); 'chunked' never does (chinchax_kernels.softmax_cross_entropy, a fused custom VJP).
"""

from __future__ import annotations

import chinchax_kernels
import jax
import jax.numpy as jnp
import ml_collections
import optax

from chinchax import parametrization
from chinchax.model import gpt

IGNORE = -1  # a target that carries no loss


def summed_cross_entropy(model: ml_collections.ConfigDict, head: str | None = None):
    """(params, inputs, targets) → (cross-entropy in fp32 nats summed over targets that are not IGNORE, their
    count); inputs and targets are int32 (batch, seq). head: 'dense' or 'chunked' (default: model.loss)."""
    net = gpt.build(model)
    logit_scale = parametrization.forward_multipliers(model).logits
    head = head or model.loss

    def loss(params, inputs: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
        real = targets != IGNORE
        labels = jnp.where(real, targets, 0)
        if head == "chunked":
            hidden = net.apply({"params": params}, inputs, method=gpt.GPT.features)
            per_token = chinchax_kernels.softmax_cross_entropy(
                hidden.reshape(-1, hidden.shape[-1]),
                gpt.head_weight(model, params),
                labels.reshape(-1),
                logit_scale=logit_scale,
            ).reshape(labels.shape)
        else:
            logits = net.apply({"params": params}, inputs)
            per_token = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        return jnp.sum(jnp.where(real, per_token.astype(jnp.float32), 0.0)), jnp.sum(real)

    return loss
