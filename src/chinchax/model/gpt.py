"""The Cerebras-GPT model (GPT-2/3 architecture) in Flax Linen, with each Llama-style choice as a switch.

By default: learned absolute positions, pre-LN blocks with a final LayerNorm, exact causal attention with fused
biased Q/K/V, an exact-GELU MLP, the head tied to the token embedding without a bias, no dropout. The switches
(config.model, each independent): `norm` 'rmsnorm', `position` 'rope' (rotary, rotate-half pairs as HF Llama),
`mlp` 'swiglu', `kv_heads` < n_heads (grouped-query attention: separate Q and K/V projections, query head i
reads kv head i // (n_heads / kv_heads)), `bias` False (no biases anywhere), `tie_embeddings` False (a separate
(vocab, d_model) 'head'). Blocks run under `nn.scan`, parameters stacked on a leading `layers` axis: one compiled
body, or unrolled (`model.layer_loop`). Attention is whole-score XLA einsums or a kernel that never writes the
(seq × seq) scores (`model.attention`). Every parameter carries logical axis names for the sharding rules.
Params are fp32; matmuls run in `compute_dtype`; norms, rotations, softmax and logits are fp32.
Init and forward multipliers come from `parametrization` (SP or μP). With `mutable=["intermediates"]` the
forward pass also returns the mean |activation| of the embedding output, attention logits, every block's
output and the logits (the μP coordinate check); otherwise those cost nothing.

Decoding (`build(model, decode=True)`): a 'cache' collection holds every layer's keys and values (kv_heads of
them) and the next position. `init_cache` makes an empty one; each apply with `mutable=["cache"]` appends its
tokens at that position (a prompt at once, then one token at a time) and attends over everything written so far.
"""

from __future__ import annotations

import functools

import chinchax_kernels
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from chinchax import parametrization
from chinchax.config import d_ffn, d_head, kv_heads


def _init(model: ml_collections.ConfigDict, path: tuple[str, ...], axes: tuple):
    """The initializer of the parameter at `path` (its role from parametrization's one table), with axes."""
    role = parametrization.role_of(path)
    return nn.with_logical_partitioning(parametrization.initializer(model, role), axes, rules=())


def _norm(model: ml_collections.ConfigDict, name: str) -> nn.Module:
    """The block / final norm in fp32: LayerNorm (with a bias unless model.bias is off) or RMSNorm."""
    scale_init = nn.with_logical_partitioning(nn.initializers.ones, ("embed",))
    if model.norm == "rmsnorm":
        return nn.RMSNorm(epsilon=model.layer_norm_eps, dtype=jnp.float32, scale_init=scale_init, name=name)
    return nn.LayerNorm(
        epsilon=model.layer_norm_eps,
        dtype=jnp.float32,
        use_bias=model.bias,
        scale_init=scale_init,
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
        name=name,
    )


def rotary(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary positions (rotate-half layout, as HF Llama): x (batch, seq, heads, d_head) at `positions` (seq,);
    dimensions i and i + d_head/2 turn together by position · θ^(−2i/d_head) radians, in fp32."""
    half = x.shape[-1] // 2
    frequencies = 1.0 / theta ** (jnp.arange(0, 2 * half, 2, dtype=jnp.float32) / (2 * half))
    angles = positions.astype(jnp.float32)[:, None] * frequencies  # (seq, half)
    cos, sin = jnp.cos(angles)[None, :, None, :], jnp.sin(angles)[None, :, None, :]
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def _grouped(q: jax.Array, kv_head_count: int) -> jax.Array:
    """q (batch, seq, heads, d_head) as (batch, seq, kv_heads, heads per kv head, d_head)."""
    b, s, h, d = q.shape
    return q.reshape(b, s, kv_head_count, h // kv_head_count, d)


def attention_logits(q: jax.Array, k: jax.Array, scale: float) -> jax.Array:
    """scale · q·kᵀ in fp32: q (batch, q_seq, heads, d_head), k (batch, k_seq, kv_heads, d_head) →
    (batch, heads, q_seq, k_seq); query head i reads kv head i // (heads / kv_heads)."""
    if k.shape[2] == q.shape[2]:
        return jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    logits = jnp.einsum("bqhgd,bkhd->bhgqk", _grouped(q, k.shape[2]), k, preferred_element_type=jnp.float32)
    return logits.reshape(q.shape[0], q.shape[2], q.shape[1], k.shape[1]) * scale


def attend_with_logits(logits: jax.Array, v: jax.Array, query_offset: jax.Array | int = 0) -> jax.Array:
    """softmax(logits + causal mask) · v, softmax in fp32: logits (batch, heads, q_seq, k_seq), v (batch, k_seq,
    kv_heads, d_head) → (batch, q_seq, heads, d_head).

    Query i sits at position query_offset + i and key j at position j; a query sees keys at or before it.
    """
    batch, heads, q_seq, k_seq = logits.shape
    causal = jnp.arange(k_seq)[None, :] <= jnp.arange(q_seq)[:, None] + query_offset
    logits = jnp.where(causal, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    if v.shape[2] == heads:
        return jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    grouped = weights.reshape(batch, v.shape[2], heads // v.shape[2], q_seq, k_seq)
    return jnp.einsum("bhgqk,bkhd->bqhgd", grouped, v).reshape(batch, q_seq, heads, v.shape[-1])


def per_shard(kernel, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """kernel(q, k, v) on each device's own (batch, heads) block under a mesh (shard_map by the logical rules).

    Attention is independent per sequence and head, and XLA cannot split a kernel it does not see into (a
    loop over rows, a custom call): left to itself it gathers the whole batch onto every device. Keys and values
    split by the 'kv_heads' rule, so each device holds the kv heads its query heads read."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return kernel(q, k, v)
    spec = nn.logical_to_mesh_axes(("batch", "length", "heads", "head_dim"))
    kv_spec = nn.logical_to_mesh_axes(("batch", "length", "kv_heads", "head_dim"))
    # check_vma off: a Pallas call's output shape does not say how it varies over the mesh, and the kernels
    # run no collectives for the check to follow.
    sharded = jax.shard_map(
        kernel, mesh=mesh, in_specs=(spec, kv_spec, kv_spec), out_specs=spec, check_vma=False
    )
    return sharded(q, k, v)


def attention_implementation(model: ml_collections.ConfigDict) -> str:
    """model.attention with 'auto' resolved for this backend: a kernel that never writes the whole score
    matrix (cuDNN for bf16/fp16 on GPU, Pallas flash for fp32 on GPU and on TPU, blockwise JAX on CPU)."""
    if model.attention != "auto":
        return model.attention
    backend = jax.default_backend()
    if backend == "cpu":
        return "blockwise"
    if backend == "gpu" and model.compute_dtype != "float32":
        return "cudnn"
    return "pallas"


def layer_loop(model: ml_collections.ConfigDict) -> str:
    """model.layer_loop with 'auto' resolved: unrolled on CPU up to 8 layers (no stacking of the scan's saved
    activations: faster steps there, still quick to compile), one scanned body otherwise."""
    if model.layer_loop != "auto":
        return model.layer_loop
    return "unroll" if jax.default_backend() == "cpu" and model.n_layers <= 8 else "scan"


def blockwise_blocks(seq_len: int) -> tuple[int, int]:
    """(query rows, keys) per block of the blockwise path: at most 8 query blocks, each at least 64 rows."""
    block_q = max(64, -(-seq_len // 8))
    return block_q, max(256, block_q)


class Block(nn.Module):
    """One pre-norm transformer block: x + attn(norm_1(x)), then x + mlp(norm_2(x))."""

    model: ml_collections.FrozenConfigDict
    decode: bool = False

    def dense(self, features, name: str, axes: tuple, axis=-1) -> nn.DenseGeneral:
        """A Dense layer of the block (its role from the parametrization table, biases unless model.bias is
        off); `axes`: the kernel's logical axes, the bias takes the output's."""
        cfg = self.model
        output_axes = axes[-1:] if isinstance(features, int) else axes[-len(features) :]
        return nn.DenseGeneral(
            features,
            axis=axis,
            dtype=jnp.dtype(cfg.compute_dtype),
            use_bias=cfg.bias,
            kernel_init=_init(cfg, (name, "kernel"), axes),
            bias_init=_init(cfg, (name, "bias"), output_axes),
            name=name,
        )

    @nn.compact
    def __call__(self, x: jax.Array, start: jax.Array | None) -> tuple[jax.Array, None]:
        """x (batch, seq, d_model); start: position of x's first token in the KV cache (decode only)."""
        cfg = self.model
        heads, kv, width = cfg.n_heads, kv_heads(cfg), d_head(cfg)

        h = _norm(cfg, "ln_1")(x)
        if kv == heads:  # every head its own keys and values: one fused projection
            qkv = self.dense((3, heads, width), "qkv", ("embed", None, "heads", "head_dim"))(h)
            qkv = nn.with_logical_constraint(qkv, ("batch", "length", None, "heads", "head_dim"))
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        else:
            q = self.dense((heads, width), "q", ("embed", "heads", "head_dim"))(h)
            q = nn.with_logical_constraint(q, ("batch", "length", "heads", "head_dim"))
            keys_values = self.dense((2, kv, width), "kv", ("embed", None, "kv_heads", "head_dim"))(h)
            keys_values = nn.with_logical_constraint(
                keys_values, ("batch", "length", None, "kv_heads", "head_dim")
            )
            k, v = keys_values[:, :, 0], keys_values[:, :, 1]
        if cfg.position == "rope":
            positions = jnp.arange(x.shape[1]) + (start if self.decode else 0)
            q, k = rotary(q, positions, cfg.rope_theta), rotary(k, positions, cfg.rope_theta)
        scale = parametrization.forward_multipliers(cfg).attention_scale
        if self.decode:
            y = self.attend_cached(q, k, v, scale, start)
        else:
            y = self.attention(q, k, v, scale)
        y = self.dense(cfg.d_model, "attn_out", ("heads", "head_dim", "embed"), axis=(-2, -1))(y)
        x = x + y

        h = _norm(cfg, "ln_2")(x)
        up = self.dense(d_ffn(cfg), "fc1", ("embed", "mlp"))(h)
        if cfg.mlp == "swiglu":
            gate = self.dense(d_ffn(cfg), "gate", ("embed", "mlp"))(h)
            h = nn.silu(gate) * up
        else:
            h = nn.gelu(up, approximate=False)
        h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
        h = self.dense(cfg.d_model, "fc2", ("mlp", "embed"))(h)
        x = nn.with_logical_constraint(x + h, ("batch", "length", "embed"))
        self.sow("intermediates", "block_output", jnp.mean(jnp.abs(x)))
        return x, None

    def attention(self, q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
        """Causal attention by the configured implementation; 'xla' also sows its logits' scale."""
        implementation = attention_implementation(self.model)
        if implementation == "blockwise":
            block_q, block_k = blockwise_blocks(q.shape[1])
            kernel = functools.partial(
                chinchax_kernels.blockwise_attention,
                causal=True,
                scale=scale,
                block_q=block_q,
                block_k=block_k,
            )
            return per_shard(kernel, q, k, v)
        if implementation == "pallas":
            kernel = functools.partial(chinchax_kernels.flash_attention, causal=True, scale=scale)
            return per_shard(kernel, q, k, v)
        if implementation == "cudnn":
            return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, implementation="cudnn")
        logits = attention_logits(q, k, scale)
        self.sow("intermediates", "attention_logits", jnp.mean(jnp.abs(logits)))
        return attend_with_logits(logits, v)

    def attend_cached(self, q: jax.Array, k: jax.Array, v: jax.Array, scale: float, start: jax.Array):
        """Writes k, v into the cache at `start`, then attends causally over the whole cache.

        The cache is created with the shape of the first k, v seen (at init: (batch, cache_len, ...)).
        Keys past the newest query are masked, so stale entries there are never read.
        """
        cached_k = self.variable("cache", "key", jnp.zeros, k.shape, k.dtype)
        cached_v = self.variable("cache", "value", jnp.zeros, v.shape, v.dtype)
        at = (0, start, 0, 0)
        cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, k.astype(cached_k.value.dtype), at)
        cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, v.astype(cached_v.value.dtype), at)
        logits = attention_logits(q, cached_k.value, scale)
        return attend_with_logits(logits, cached_v.value, query_offset=start)


# What a remat'd block keeps for the backward pass: the outputs of its weight matmuls, or only its input.
REMAT_POLICIES = {"dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable, "full": None}


class GPT(nn.Module):
    """tokens (batch, seq) int32 → logits (batch, seq, vocab) fp32."""

    model: ml_collections.FrozenConfigDict
    decode: bool = False

    def setup(self):
        cfg = self.model
        self.token_embed = nn.Embed(
            cfg.vocab_size,
            cfg.d_model,
            embedding_init=_init(cfg, ("token_embed", "embedding"), ("vocab", "embed")),
            name="token_embed",
        )
        if cfg.position == "learned":
            self.position_embed = self.param(
                "position_embed",
                _init(cfg, ("position_embed",), (None, "embed")),
                (cfg.max_positions, cfg.d_model),
            )
        if not cfg.tie_embeddings:  # laid out as the embedding (and HF's lm_head): (vocab, d_model)
            self.head = self.param(
                "head", _init(cfg, ("head",), ("vocab", "embed")), (cfg.vocab_size, cfg.d_model)
            )
        block = (
            Block
            if cfg.remat == "none"
            else nn.remat(Block, prevent_cse=False, policy=REMAT_POLICIES[cfg.remat])
        )
        self.blocks = nn.scan(
            block,
            variable_axes={"params": 0, "intermediates": 0, "cache": 0},
            split_rngs={"params": True},
            in_axes=nn.broadcast,
            length=cfg.n_layers,
            unroll=cfg.n_layers if layer_loop(cfg) == "unroll" else 1,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(cfg, self.decode, name="blocks")
        self.ln_f = _norm(cfg, "ln_f")
        if self.decode:
            self.next_position = self.variable("cache", "position", lambda: jnp.zeros((), jnp.int32))

    def features(self, tokens: jax.Array) -> jax.Array:
        """The final-norm hidden states (batch, seq, d_model), fp32."""
        multipliers = parametrization.forward_multipliers(self.model)
        start = None
        if self.decode:  # tokens continue the cached sequence at its next position
            start = self.next_position.value
            self.next_position.value = start + tokens.shape[1]
        x = self.token_embed(tokens)
        if self.model.position == "learned":
            if self.decode:
                x = x + jax.lax.dynamic_slice_in_dim(self.position_embed, start, tokens.shape[1])
            else:
                x = x + self.position_embed[: tokens.shape[1]]
        x = x * multipliers.embedding
        self.sow("intermediates", "embedding", jnp.mean(jnp.abs(x)))
        x = nn.with_logical_constraint(x.astype(self.model.compute_dtype), ("batch", "length", "embed"))
        x, _ = self.blocks(x, start)
        return self.ln_f(x)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """(hidden × the logit multiplier) · headᵀ, fp32; the head is token_embed's table unless untied.

        The multiplier (μP's 1/m) scales the hidden states rather than the logits, so no second
        vocabulary-sized fp32 buffer is written.
        """
        dtype = jnp.dtype(self.model.compute_dtype)
        head = self.token_embed.embedding if self.model.tie_embeddings else self.head
        multiplier = parametrization.forward_multipliers(self.model).logits
        scaled = hidden if multiplier == 1.0 else hidden * multiplier
        logits = jnp.einsum(
            "bsd,vd->bsv", scaled.astype(dtype), head.astype(dtype), preferred_element_type=jnp.float32
        )
        return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        logits = self.logits(self.features(tokens))
        self.sow("intermediates", "logits", jnp.mean(jnp.abs(logits)))
        return logits


def head_weight(model: ml_collections.ConfigDict, params: dict) -> jax.Array:
    """The (vocab, d_model) matrix the logits are taken against: the token embedding, or the untied head."""
    return params["token_embed"]["embedding"] if model.tie_embeddings else params["head"]


def build(model: ml_collections.ConfigDict, decode: bool = False) -> GPT:
    """The Flax module for a model config; decode=True reads and extends a KV cache (see `init_cache`)."""
    return GPT(ml_collections.FrozenConfigDict(model), decode)


def init_cache(model: ml_collections.ConfigDict, batch: int, length: int) -> dict:
    """An empty KV cache for `batch` sequences of up to `length` <= max_positions tokens (position 0)."""
    if not 0 < length <= model.max_positions:
        raise ValueError(f"cache length {length} must be in 1..max_positions={model.max_positions}")
    tokens = jnp.zeros((batch, length), dtype=jnp.int32)
    shapes = jax.eval_shape(lambda: build(model, decode=True).init(jax.random.key(0), tokens)["cache"])
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _for_init(model: ml_collections.ConfigDict) -> GPT:
    """The module for creating parameters: they do not depend on remat (which may still be 'auto')."""
    return build(ml_collections.ConfigDict({**model.to_dict(), "remat": "none"}))


def init_params(model: ml_collections.ConfigDict, rng: jax.Array) -> dict:
    """Initialised fp32 parameters (plain arrays, logical-axis boxes removed)."""
    tokens = jnp.zeros((1, 1), dtype=jnp.int32)
    return nn.unbox(_for_init(model).init(rng, tokens)["params"])


def param_shapes(model: ml_collections.ConfigDict) -> dict:
    """Parameter ShapeDtypeStructs without allocating anything (jax.eval_shape)."""
    return jax.eval_shape(lambda: init_params(model, jax.random.key(0)))


def logical_axes(model: ml_collections.ConfigDict) -> dict:
    """PartitionSpecs of logical axis names, one per parameter (for the sharding rules)."""
    tokens = jnp.zeros((1, 1), dtype=jnp.int32)
    boxed = jax.eval_shape(lambda: _for_init(model).init(jax.random.key(0), tokens)["params"])
    return nn.get_partition_spec(boxed)
