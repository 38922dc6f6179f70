"""Autoregressive generation: temperature, top-k and top-p (nucleus) sampling, with or without a KV cache.

With the cache the prompt runs once (right-padded to a power-of-two length so few shapes compile; the cache
position is then rewound to the prompt's end, and the causal mask never lets a query see the padding) and
every further step feeds one token. Without it every step reruns the model on a fixed-size buffer; both
give the same tokens. Temperature 0 is greedy decoding.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from chinchax.model import gpt

MIN_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is drawn from the logits (hashable: it is a static argument of the jitted steps)."""

    temperature: float = 1.0  # 0: greedy (argmax)
    top_k: int = 0  # keep the k most likely tokens; 0: all
    top_p: float = 1.0  # keep the smallest most-likely set with probability >= top_p; 1: all
    vocab_size: int | None = None  # draw only ids below this (the tokenizer's; a model may pad its vocab)

    def __post_init__(self):
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1 or (self.vocab_size or 1) < 1:
            raise ValueError(
                f"sampling needs temperature >= 0, top_k >= 0, 0 < top_p <= 1, vocab_size >= 1; got {self}"
            )


def filter_logits(logits: jax.Array, sampling: Sampling) -> jax.Array:
    """logits / temperature with tokens outside the top-k and the top-p nucleus set to -inf (fp32)."""
    logits = logits.astype(jnp.float32) / sampling.temperature
    if sampling.top_k and sampling.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1:
        descending = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(descending, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # probability of the strictly more likely tokens
        last_kept = jnp.sum(before < sampling.top_p, axis=-1, keepdims=True) - 1
        threshold = jnp.take_along_axis(descending, last_kept, axis=-1)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return logits


def next_token(logits: jax.Array, sampling: Sampling, rng: jax.Array) -> jax.Array:
    """(batch, vocab) logits → (batch,) int32 tokens."""
    if sampling.vocab_size is not None:
        logits = jnp.where(jnp.arange(logits.shape[-1]) < sampling.vocab_size, logits, -jnp.inf)
    if sampling.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(rng, filter_logits(logits, sampling), axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _cached_step(model, sampling, params, cache, tokens, last, rng):
    """Feeds `tokens` (batch, n) to the cache; samples from the logits at index `last` of them."""
    logits, variables = gpt.build(model, decode=True).apply(
        {"params": params, "cache": cache}, tokens, mutable=["cache"]
    )
    return next_token(logits[:, last], sampling, rng), variables["cache"]


@functools.partial(jax.jit, static_argnums=(0, 1))
def _uncached_step(model, sampling, params, buffer, last, rng):
    """Reruns the model on the whole buffer; samples from the logits at position `last`."""
    logits = gpt.build(model).apply({"params": params}, buffer)
    return next_token(logits[:, last], sampling, rng)


def bucket(length: int, cap: int) -> int:
    """The power of two >= length (at least MIN_BUCKET), at most `cap`: padded lengths that compile once each."""
    return min(cap, max(MIN_BUCKET, 1 << (length - 1).bit_length()))


def generate(
    model: ml_collections.ConfigDict,
    params,
    prompt: Sequence[int],
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    seed: int = 0,
    num_samples: int = 1,
    stop_tokens: Sequence[int] = (),
    stop_when: Callable[[list[int]], bool] | None = None,
    use_cache: bool = True,
) -> list[list[int]]:
    """`num_samples` continuations of `prompt` (token ids), each at most `max_new_tokens` long.

    A sample ends after a token in `stop_tokens` (kept) or once `stop_when(its tokens so far)` is true;
    generation stops when every sample has ended. The same seed gives the same samples.
    """
    prompt = [int(t) for t in prompt]
    if not prompt:
        raise ValueError("generate needs a non-empty prompt (start with the EOS token for none)")
    total = len(prompt) + max_new_tokens
    if max_new_tokens < 1 or total > model.max_positions:
        raise ValueError(
            f"prompt of {len(prompt)} tokens + max_new_tokens={max_new_tokens} must fit "
            f"model.max_positions={model.max_positions} (and max_new_tokens >= 1)"
        )
    frozen = ml_collections.FrozenConfigDict(model)
    rngs = jax.random.split(jax.random.key(seed), max_new_tokens)
    length = bucket(total, model.max_positions)
    if use_cache:
        cache = gpt.init_cache(model, num_samples, length)
        first = np.zeros((num_samples, bucket(len(prompt), length)), np.int32)
        first[:, : len(prompt)] = prompt
        token, cache = _cached_step(frozen, sampling, params, cache, first, len(prompt) - 1, rngs[0])
        cache["position"] = jnp.asarray(len(prompt), jnp.int32)  # rewind past the padding
    else:
        buffer = np.zeros((num_samples, length), np.int32)
        buffer[:, : len(prompt)] = prompt
        token = _uncached_step(frozen, sampling, params, buffer, len(prompt) - 1, rngs[0])
    samples: list[list[int]] = [[] for _ in range(num_samples)]
    done = [False] * num_samples
    stop_tokens = set(stop_tokens)
    for i in range(max_new_tokens):
        for row, t in enumerate(np.asarray(token).tolist()):
            if not done[row]:
                samples[row].append(t)
                done[row] = t in stop_tokens or (stop_when is not None and stop_when(samples[row]))
        if all(done) or i + 1 == max_new_tokens:
            break
        position = len(prompt) + i  # where the token just drawn goes
        if use_cache:
            token, cache = _cached_step(frozen, sampling, params, cache, token[:, None], 0, rngs[i + 1])
        else:
            buffer[:, position] = np.asarray(token)
            token = _uncached_step(frozen, sampling, params, buffer, position, rngs[i + 1])
    return samples
