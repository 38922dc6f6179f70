"""The experiment config: one schema with a docstring per field, strict validation, derived quantities.

A config is an `ml_collections.ConfigDict` built from `SCHEMA` and locked, so a misspelt key fails at once.
Scale points (experiments/configs/) start from `base_config()` and set what differs. A run's tokens, steps and
batches are derived once into a `TrainSchedule` (`train_schedule`) that the optimizer, the pruner, the state and
the training loop take.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable

import ml_collections

# Every field: dotted key -> (default, one-line docstring). Units are in the docstring.
# fmt: off
SCHEMA: dict[str, tuple[object, str]] = {
    "name": ("custom", "Name of the scale point, used in plans and results."),
    # The model (Cerebras-GPT / GPT-2 architecture by default; each Llama-style choice is its own switch).
    "model.vocab_size": (50257, "Vocabulary size: 50257 for GPT-2 BPE, 257 for bytes + EOS."),
    "model.max_positions": (2048, "Maximum sequence length (the number of learned positions when position='learned')."),
    "model.d_model": (768, "Width of the residual stream."),
    "model.n_layers": (12, "Number of transformer blocks."),
    "model.n_heads": (12, "Attention heads per block; must divide d_model."),
    "model.kv_heads": (0, "Key/value heads (grouped-query attention); must divide n_heads; 0 means n_heads."),
    "model.d_ffn": (0, "Hidden width of the MLP; 0: 4 * d_model (gelu), 8/3 * d_model up to a multiple of d_ffn_multiple (swiglu)."),
    "model.d_ffn_multiple": (256, "swiglu's default d_ffn is rounded up to a multiple of this (Llama's multiple_of)."),
    "model.norm": ("layernorm", "Block and final norm: 'layernorm' (GPT-2/3) or 'rmsnorm' (Llama)."),
    "model.position": ("learned", "Positions: 'learned' absolute embeddings (GPT-2/3) or 'rope' (rotary, Llama)."),
    "model.rope_theta": (10000.0, "Rotary base θ: pair i of a head turns at position·θ^(-2i/d_head) radians."),
    "model.mlp": ("gelu", "MLP: 'gelu' (exact GELU, GPT-2/3) or 'swiglu' (fc2(silu(gate(x)) · fc1(x)), Llama)."),
    "model.bias": (True, "Biases on every Dense layer and LayerNorm (GPT-2/3); False: none anywhere (Llama)."),
    "model.tie_embeddings": (True, "Logits from the token embedding (GPT-2/3); False: a separate 'head' matrix (Llama)."),
    "model.parametrization": ("sp", "'sp' (standard, GPT-2/3) or 'mup' (Cerebras maximal-update rules)."),
    "model.init_std": (0.02, "Init σ of embeddings and hidden matrices (SP), or σ_base (μP)."),
    "model.out_proj_init_std": (0.0, "SP init σ of attn-out and fc2; 0 means init_std / sqrt(2 n_layers)."),
    "model.mup_base_width": (256, "μP base width: the width multiplier is m = d_model / mup_base_width."),
    "model.mup_embedding_multiplier": (10.0, "μP: the summed embedding output is multiplied by this."),
    "model.mup_output_alpha": (1.0, "μP: logits are multiplied by mup_output_alpha / m."),
    "model.layer_norm_eps": (1e-5, "LayerNorm / RMSNorm epsilon."),
    "model.compute_dtype": ("float32", "Matmul dtype, 'float32' or 'bfloat16'; params, softmax, loss fp32."),
    "model.remat": ("none", "Backward-pass recomputation: 'none', 'dots' (keep weight-matmul outputs), 'full', 'auto'."),
    "model.attention": ("auto", "Attention: 'xla' (einsum, whole scores), 'blockwise', 'cudnn', 'pallas' or 'auto'."),
    "model.loss": ("dense", "Loss head: 'dense' (whole logits) or 'chunked' (fused, never all logits)."),
    "model.layer_loop": ("auto", "Blocks as 'scan' (one compiled body), 'unroll', or 'auto' (unroll on CPU up to 8 layers)."),
    # Data.
    "data.dataset": ("embedded", "Corpus name or path of a corpus / prepared token store."),
    "data.tokenizer": ("gpt2", "'gpt2' (BPE, 50257 ids) or 'bytes' (256 bytes + EOS)."),
    "data.seq_len": (2048, "Tokens per training sequence; at most model.max_positions."),
    # Optimisation (the Cerebras-GPT recipe; the schedule is defined in tokens).
    "train.batch_size": (120, "Sequences per optimizer step (the first batch size if batch_ramp is set)."),
    "train.batch_ramp": ((), "Later batch sizes as ((start_token, sequences), ...); () for constant."),
    "train.tokens": (0, "Training tokens; 0 means tokens_per_param * params."),
    "train.tokens_per_param": (20.0, "Tokens per parameter when train.tokens is 0 (Chinchilla: 20)."),
    "train.peak_lr": (6e-4, "Peak learning rate (μP: η_base, scaled per parameter role)."),
    "train.end_lr_fraction": (0.1, "Learning rate at the last step as a fraction of peak_lr."),
    "train.warmup_tokens": (0, "Tokens of linear warmup from 0 to peak_lr."),
    "train.decay": ("linear", "After warmup: 'linear' or 'cosine' decay to end_lr_fraction * peak, or 'wsd' (constant, then a cooldown)."),
    "train.cooldown_fraction": (0.2, "wsd: fraction of the training tokens spent cooling down to end_lr_fraction * peak (in (0, 1])."),
    "train.cooldown_shape": ("1-sqrt", "wsd cooldown: 'linear', '1-sqrt' (peak·(1 − √x), Hägele et al. 2024) or 'cosine'."),
    "train.adam_b1": (0.9, "AdamW β1."),
    "train.adam_b2": (0.95, "AdamW β2."),
    "train.adam_eps": (1e-8, "AdamW ε."),
    "train.weight_decay": (0.1, "Decoupled weight decay (not applied to biases and LayerNorm)."),
    "train.grad_clip_norm": (1.0, "Global gradient-norm clip; 0 disables."),
    "train.microbatches": (1, "Gradient-accumulation microbatches per step (divides batch sizes); AUTO (0, 'auto'): fewest that fit."),
    "train.seed": (0, "Seed for initialisation and data order."),
    # The training loop.
    "train.log_every": (10, "Steps between metrics.jsonl / TensorBoard records and progress-bar updates."),
    "train.eval_every": (0, "Steps between validation-loss evaluations; 0 means at the end only."),
    "train.eval_batches": (16, "Batches (of train.batch_size / microbatches sequences) per evaluation."),
    "train.final_eval": ("validation,test", "Splits evaluated at the end, comma-separated: 'validation,test', 'validation', or '' (none)."),
    "train.checkpoint_every": (500, "Steps between checkpoints; one is always written at the end."),
    "train.keep_checkpoints": (3, "Newest checkpoints kept in workdir/checkpoints."),
    "train.checkpoint_steps": ((), "Steps also checkpointed and never pruned (a cooldown ladder's branch points); () for none."),
    "train.peak_flops_per_device": (0.0, "Peak FLOP/s per device for MFU; 0: the device table, or measured on CPU."),
    # Sparse pre-training (chinchax.training.sparsity): gradual global magnitude pruning of the Dense kernels.
    "sparsity.target": (0.0, "Final fraction of the Dense-kernel weights set to zero; 0 trains dense (no pruning)."),
    "sparsity.schedule": ("geometric", "Kept fraction per pruning event: 'geometric', 'cubic' (Zhu & Gupta) or 'one_shot'."),
    "sparsity.start_fraction": (0.25, "Fraction of the run's compute (Σ density over steps) spent before the first event."),
    "sparsity.end_fraction": (0.75, "Fraction of the run's compute spent before the last event (unused by one_shot)."),
    "sparsity.every": (100, "Optimizer steps between pruning events."),
    # The device mesh (chinchax.parallel.mesh): a cluster preset, optionally with its axis sizes overridden.
    "mesh.preset": ("cpu", "Cluster preset (chinchax.parallel.mesh.PRESETS): cpu, gpu-8, gpu-h200-8, gpu-a100-8, gpu-8xN, gpu-a100-8xN, tpu-v5e-N, tpu-v5p-N, tpu-v4-N, wse-N."),
    "mesh.data": (0, "Replicas on the 'data' mesh axis; 0 keeps the preset's size."),
    "mesh.fsdp": (0, "Parameter/optimizer-state shards on the 'fsdp' axis (weight streaming); 0: the preset's."),
    "mesh.tensor": (0, "Tensor-parallel shards (heads, mlp) on the 'tensor' axis; 0 keeps the preset's size."),
}
# fmt: on

PARAMETRIZATIONS = ("sp", "mup")
COMPUTE_DTYPES = ("float32", "bfloat16")
TOKENIZERS = {"gpt2": 50257, "bytes": 257}
DECAYS = ("linear", "cosine", "wsd")
COOLDOWN_SHAPES = ("linear", "1-sqrt", "cosine")
ATTENTIONS = ("xla", "blockwise", "cudnn", "pallas", "auto")
LOSSES = ("dense", "chunked")
LAYER_LOOPS = ("scan", "unroll", "auto")
NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("learned", "rope")
MLPS = ("gelu", "swiglu")
# The Llama block's switches (HF LlamaForCausalLM's layout; kv_heads is each config's own): the `llama` family
# preset (experiments/configs/llama.py), the coordinate check's and the CPU sweeps' Llama blocks start from it.
LLAMA_BLOCK = {"norm": "rmsnorm", "position": "rope", "mlp": "swiglu", "bias": False, "tie_embeddings": False}
REMATS = ("none", "dots", "full")  # lightest first: what 'auto' tries in this order
AUTO = 0  # train.microbatches = 0 (on the command line also 'auto'): the fewest that fit the device
EVAL_SPLITS = ("validation", "test")  # what train.final_eval may name
SPARSITY_SCHEDULES = ("geometric", "cubic", "one_shot")  # kept fraction per event: chinchax.training.sparsity


class ConfigError(ValueError):
    """A config that cannot describe a valid run; the message is one line naming the field."""


def _nest(flat: dict[str, object]) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def base_config() -> ml_collections.ConfigDict:
    """The schema's defaults as a locked ConfigDict: adding a key that is not in SCHEMA raises."""
    cfg = ml_collections.ConfigDict(_nest({k: v for k, (v, _) in SCHEMA.items()}))
    cfg.lock()
    return cfg


def from_json(text: str) -> ml_collections.ConfigDict:
    """The validated config written as JSON by `cfg.to_json()` (JSON has no tuples: the ramp's pairs come back
    as lists and are made tuples again)."""
    cfg = base_config()
    cfg.unlock()
    cfg.update_from_flattened_dict(flatten(json.loads(text)))
    cfg.train.batch_ramp = tuple(tuple(pair) for pair in cfg.train.batch_ramp)
    cfg.train.checkpoint_steps = tuple(cfg.train.checkpoint_steps)
    cfg.lock()
    return validate(cfg)


def describe() -> str:
    """Every field with its default and docstring, one per line (for --help style listings)."""
    return "\n".join(f"{k:32s} {v!r:12} {doc}" for k, (v, doc) in SCHEMA.items())


def d_ffn(model: ml_collections.ConfigDict) -> int:
    """MLP hidden width: model.d_ffn, else 4·d (gelu) or Llama's 8/3·d rounded up to d_ffn_multiple (swiglu,
    which has three matrices to gelu's two: about the same parameters)."""
    if model.d_ffn:
        return model.d_ffn
    if model.mlp == "swiglu":
        multiple = model.d_ffn_multiple
        return -(-(8 * model.d_model) // (3 * multiple)) * multiple
    return 4 * model.d_model


def d_head(model: ml_collections.ConfigDict) -> int:
    """Width of one attention head."""
    return model.d_model // model.n_heads


def kv_heads(model: ml_collections.ConfigDict) -> int:
    """Key/value heads: model.kv_heads, or one per query head (0)."""
    return model.kv_heads or model.n_heads


def flatten(tree, prefix: str = "", sep: str = ".") -> dict:
    """A nested mapping as {"a.b.c": leaf} (keys joined with `sep`)."""
    flat = {}
    for key, value in tree.items():
        if hasattr(value, "items"):
            flat.update(flatten(value, f"{prefix}{key}{sep}", sep))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


_Need = Callable[[bool, str], None]  # need(ok, message): ConfigError naming the config unless ok


def validate(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Raise ConfigError (one line, naming the field) for anything that cannot run; return cfg."""
    unknown = sorted(set(flatten(cfg)) - set(SCHEMA))
    if unknown:
        raise ConfigError(f"unknown config key(s): {', '.join(unknown)}")

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(f"config {cfg.name!r}: {message}")

    _check_model(cfg.model, need)
    _check_data(cfg.model, cfg.data, need)
    _check_optimizer(cfg.train, need)
    _check_loop(cfg.train, need)
    _check_mesh(cfg.mesh, need)
    _check_sparsity(cfg.sparsity, need)
    _check_batches(cfg.train, need)
    return cfg


def _check_model(m: ml_collections.ConfigDict, need: _Need) -> None:
    """model.*: positive sizes, heads that divide the width, names from their lists, positive init scales."""
    for key in ("vocab_size", "max_positions", "d_model", "n_layers", "n_heads"):
        need(isinstance(m[key], int) and m[key] > 0, f"model.{key}={m[key]!r} must be a positive int")
    need(m.d_ffn >= 0, f"model.d_ffn={m.d_ffn} must be >= 0")
    need(m.d_ffn_multiple >= 1, f"model.d_ffn_multiple={m.d_ffn_multiple} must be >= 1")
    need(
        m.d_model % m.n_heads == 0,
        f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}",
    )
    need(
        isinstance(m.kv_heads, int) and m.kv_heads >= 0 and m.n_heads % kv_heads(m) == 0,
        f"model.kv_heads={m.kv_heads!r} must divide model.n_heads={m.n_heads} (0 means n_heads)",
    )
    need(m.norm in NORMS, f"model.norm={m.norm!r} is not one of {NORMS}")
    need(m.position in POSITIONS, f"model.position={m.position!r} is not one of {POSITIONS}")
    need(m.mlp in MLPS, f"model.mlp={m.mlp!r} is not one of {MLPS}")
    need(
        m.position != "rope" or d_head(m) % 2 == 0,
        f"model.position='rope' rotates pairs of a head's dimensions: the head width d_model/n_heads = "
        f"{m.d_model}/{m.n_heads} = {d_head(m)} must be even",
    )
    need(m.rope_theta > 0, f"model.rope_theta={m.rope_theta} must be > 0")
    for key in ("bias", "tie_embeddings"):
        need(isinstance(m[key], bool), f"model.{key}={m[key]!r} must be true or false")
    need(
        m.parametrization in PARAMETRIZATIONS,
        f"model.parametrization={m.parametrization!r} is not one of {PARAMETRIZATIONS}",
    )
    need(
        m.compute_dtype in COMPUTE_DTYPES,
        f"model.compute_dtype={m.compute_dtype!r} is not one of {COMPUTE_DTYPES}",
    )
    need(m.attention in ATTENTIONS, f"model.attention={m.attention!r} is not one of {ATTENTIONS}")
    need(m.loss in LOSSES, f"model.loss={m.loss!r} is not one of {LOSSES}")
    need(m.layer_loop in LAYER_LOOPS, f"model.layer_loop={m.layer_loop!r} is not one of {LAYER_LOOPS}")
    need(m.remat in (*REMATS, "auto"), f"model.remat={m.remat!r} is not one of {(*REMATS, 'auto')}")
    need(m.init_std > 0, f"model.init_std={m.init_std} must be > 0")
    need(m.out_proj_init_std >= 0, f"model.out_proj_init_std={m.out_proj_init_std} must be >= 0")
    need(m.mup_base_width > 0, f"model.mup_base_width={m.mup_base_width} must be > 0")


def _check_data(m: ml_collections.ConfigDict, d: ml_collections.ConfigDict, need: _Need) -> None:
    """data.*: a known tokenizer whose ids fit the vocabulary, sequences no longer than the positions."""
    need(
        d.tokenizer in TOKENIZERS,
        f"data.tokenizer={d.tokenizer!r} is not one of {list(TOKENIZERS)}",
    )
    need(
        m.vocab_size >= TOKENIZERS[d.tokenizer],
        f"model.vocab_size={m.vocab_size} is smaller than the {d.tokenizer} tokenizer's "
        f"{TOKENIZERS[d.tokenizer]} ids",
    )
    need(
        0 < d.seq_len <= m.max_positions,
        f"data.seq_len={d.seq_len} must be in 1..model.max_positions={m.max_positions}",
    )


def _check_optimizer(t: ml_collections.ConfigDict, need: _Need) -> None:
    """train.* of the optimisation: the learning-rate schedule, the token budget, the microbatch count."""
    need(t.decay in DECAYS, f"train.decay={t.decay!r} is not one of {DECAYS}")
    need(
        0 < t.cooldown_fraction <= 1,
        f"train.cooldown_fraction={t.cooldown_fraction} must be in (0, 1]",
    )
    need(
        t.cooldown_shape in COOLDOWN_SHAPES,
        f"train.cooldown_shape={t.cooldown_shape!r} is not one of {COOLDOWN_SHAPES}",
    )
    need(t.peak_lr > 0, f"train.peak_lr={t.peak_lr} must be > 0")
    need(0 <= t.end_lr_fraction <= 1, f"train.end_lr_fraction={t.end_lr_fraction} must be in [0, 1]")
    need(t.tokens >= 0 and t.warmup_tokens >= 0, "train.tokens and train.warmup_tokens must be >= 0")
    need(
        t.tokens > 0 or t.tokens_per_param > 0,
        "one of train.tokens or train.tokens_per_param must be > 0",
    )
    need(
        isinstance(t.microbatches, int) and t.microbatches >= AUTO,
        f"train.microbatches={t.microbatches!r} must be an int >= 1, or 0 / 'auto'",
    )


def _check_loop(t: ml_collections.ConfigDict, need: _Need) -> None:
    """train.* of the loop: positive intervals and counts, final-evaluation splits named at most once."""
    for key in ("log_every", "checkpoint_every", "keep_checkpoints", "eval_batches"):
        need(t[key] >= 1, f"train.{key}={t[key]} must be >= 1")
    need(
        all(isinstance(s, int) and s >= 1 for s in t.checkpoint_steps),
        f"train.checkpoint_steps={t.checkpoint_steps!r} must be steps >= 1",
    )
    need(isinstance(t.final_eval, str), f"train.final_eval={t.final_eval!r} must be a comma-separated string")
    splits = final_eval_splits(t)
    need(
        set(splits) <= set(EVAL_SPLITS) and len(set(splits)) == len(splits),
        f"train.final_eval={t.final_eval!r} must name each of {EVAL_SPLITS} at most once, comma-separated",
    )


def _check_mesh(mesh: ml_collections.ConfigDict, need: _Need) -> None:
    """mesh.*: a preset name and axis sizes >= 0."""
    need(isinstance(mesh.preset, str) and mesh.preset, f"mesh.preset={mesh.preset!r} must name a preset")
    for key in ("data", "fsdp", "tensor"):
        need(
            isinstance(mesh[key], int) and mesh[key] >= 0,
            f"mesh.{key}={mesh[key]!r} must be an int >= 0 (0 keeps the preset's size)",
        )


def _check_sparsity(sp: ml_collections.ConfigDict, need: _Need) -> None:
    """sparsity.*: a target in [0, 1), a known schedule, ordered compute fractions, a positive event interval."""
    need(0 <= sp.target < 1, f"sparsity.target={sp.target} must be in [0, 1)")
    need(
        sp.schedule in SPARSITY_SCHEDULES,
        f"sparsity.schedule={sp.schedule!r} is not one of {SPARSITY_SCHEDULES}",
    )
    need(0 < sp.start_fraction < 1, f"sparsity.start_fraction={sp.start_fraction} must be in (0, 1)")
    need(
        sp.start_fraction <= sp.end_fraction < 1,
        f"sparsity.end_fraction={sp.end_fraction} must be in [sparsity.start_fraction, 1)",
    )
    need(isinstance(sp.every, int) and sp.every >= 1, f"sparsity.every={sp.every!r} must be an int >= 1")


def _check_batches(t: ml_collections.ConfigDict, need: _Need) -> None:
    """The batch schedule: positive sizes that split into whole microbatches, ramp starts in order."""
    last_start = 0
    for start, size in batch_schedule(t):
        need(size > 0, f"train batch size {size} must be > 0")
        if t.microbatches != AUTO:  # 'auto' counts are chosen to divide (memory_plan.microbatch_counts)
            need(
                size % t.microbatches == 0 and size % microbatch_size(t) == 0,
                f"train batch size {size} is not a positive multiple of train.microbatches={t.microbatches} "
                f"and of the microbatch size {microbatch_size(t)}",
            )
        need(start >= last_start, f"train.batch_ramp starts must increase, got {start}")
        last_start = start


def final_eval_splits(train: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The splits train.final_eval names (in its order; () for none)."""
    return tuple(part.strip() for part in train.final_eval.split(",") if part.strip())


def microbatch_size(train: ml_collections.ConfigDict) -> int:
    """Sequences per microbatch: the first batch size over train.microbatches (fixed through a ramp)."""
    if train.microbatches == AUTO:
        raise ConfigError("train.microbatches='auto' must be resolved on a mesh first (memory_plan.choose)")
    return max(train.batch_size // train.microbatches, 1)


def batch_schedule(train: ml_collections.ConfigDict) -> list[tuple[int, int]]:
    """((start_token, sequences_per_step), ...) starting at token 0."""
    return [(0, train.batch_size)] + [(int(s), int(b)) for s, b in train.batch_ramp]


def width_multiplier(model: ml_collections.ConfigDict) -> float:
    """μP width multiplier m = d_model / base width (1 under SP)."""
    if model.parametrization == "mup":
        return model.d_model / model.mup_base_width
    return 1.0


def train_tokens(cfg: ml_collections.ConfigDict, params: int) -> int:
    """Training tokens: train.tokens, else tokens_per_param * params rounded up to whole steps."""
    if cfg.train.tokens:
        return int(cfg.train.tokens)
    step_tokens = cfg.train.batch_size * cfg.data.seq_len
    wanted = cfg.train.tokens_per_param * params
    return int(math.ceil(wanted / step_tokens)) * step_tokens


def batch_phases(cfg: ml_collections.ConfigDict) -> list[tuple[int, int, int]]:
    """(first_step, tokens_seen_before_it, sequences_per_step) for each phase of the batch schedule."""
    schedule, per_token = batch_schedule(cfg.train), cfg.data.seq_len
    phases, step, seen = [], 0, 0
    for i, (_, size) in enumerate(schedule):
        phases.append((step, seen, size))
        if i + 1 < len(schedule):
            steps_here = max(0, math.ceil((schedule[i + 1][0] - seen) / (size * per_token)))
            step, seen = step + steps_here, seen + steps_here * size * per_token
    return phases


def steps_for(cfg: ml_collections.ConfigDict, tokens: int) -> int:
    """Optimizer steps needed to see `tokens` under the batch schedule (the last step may overshoot)."""
    for first, seen, size in reversed(batch_phases(cfg)):
        if seen < tokens or first == 0:
            return first + math.ceil((tokens - seen) / (size * cfg.data.seq_len))
    raise AssertionError("the first phase starts at step 0")


@dataclasses.dataclass(frozen=True)
class TrainSchedule:
    """A run's tokens, steps and batches, derived once from its config (`train_schedule`) and handed to the
    optimizer, the pruner, the state and the loop."""

    tokens: int  # training tokens the run is planned for: what the learning-rate schedule spans
    steps: int  # optimizer steps that see them under the batch schedule (the last one may overshoot)
    # per batch size: (first step, tokens seen before it, sequences per step)
    phases: tuple[tuple[int, int, int], ...]
    seq_len: int  # tokens per sequence
    # sequences per microbatch, fixed through a ramp; AUTO (0) until train.microbatches is resolved
    microbatch: int

    def batch_size_at(self, step: int) -> int:
        """Sequences in (0-based) step `step`."""
        return [size for first, _, size in self.phases if first <= step][-1]

    def microbatches_at(self, step: int) -> int:
        """Microbatches in (0-based) step `step`."""
        return self.batch_size_at(step) // self.microbatch

    def tokens_before(self, step: int) -> int:
        """Tokens seen before (0-based) step `step`, exactly."""
        first, seen, size = [phase for phase in self.phases if phase[0] <= step][-1]
        return seen + (step - first) * size * self.seq_len


def train_schedule(cfg: ml_collections.ConfigDict, params: int) -> TrainSchedule:
    """The schedule of cfg's run; params: its parameter count (chinchax.model.flops.param_count), which sets the
    tokens when train.tokens is 0."""
    tokens = train_tokens(cfg, params)
    t = cfg.train
    return TrainSchedule(
        tokens=tokens,
        steps=steps_for(cfg, tokens),
        phases=tuple(batch_phases(cfg)),
        seq_len=cfg.data.seq_len,
        microbatch=AUTO if t.microbatches == AUTO else microbatch_size(t),
    )
