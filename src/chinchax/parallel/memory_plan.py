"""What one device holds during a train step on a mesh, and the automatic microbatch / remat choice.

The plan follows the shard shapes the logical-axis rules give on the preset's mesh: parameters, Adam moments and
gradients are the device's shards (fp32); inside the layer scan each block's weights are all-gathered over
'fsdp' in the compute dtype, with their fp32 gradients before the reduce-scatter; activations are those one
microbatch keeps for the backward pass under the remat policy; logits and their gradient are fp32. A sparse run
(sparsity.target > 0, chinchax.training.sparsity) adds its boolean masks (1 byte per prunable weight, sharded
like the Dense kernels, in the optimizer state) and the fp32 copy of the kernels the pruner ranks each step
(the candidate weights params + updates). On a
Cerebras CS-2 (weight streaming) parameters and optimizer state live in MemoryX, so the wafer holds only what
one layer and the activations need.

`train.microbatches = "auto"` (0) takes the smallest gradient-accumulation count whose microbatch splits evenly
over data × fsdp (if none does, microbatches are padded with sequences that carry no loss), and with
`model.remat = "auto"` the lightest remat policy at that count, that fits the device's memory less `MARGIN`.
The global batch and its schedule are never changed.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import ml_collections
from jax.sharding import NamedSharding

from chinchax.config import AUTO, REMATS, ConfigError, batch_schedule, d_ffn, d_head, kv_heads
from chinchax.model import gpt
from chinchax.parallel import hardware, mesh

MARGIN = 0.10  # of device memory kept free for the runtime, fragmentation and what the model leaves out
FP32 = 4
MASK = 1  # bytes per element of a boolean mask
GiB = 2**30


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes per device of one train step (one microbatch's activations), by what holds them."""

    params: int  # fp32 parameter shards
    optimizer: int  # fp32 Adam μ and ν shards
    gradients: int  # fp32 gradient shards, the accumulator when microbatches > 1, the update
    # one block's weights gathered over fsdp (compute dtype, two buffers) + their fp32 grads; the logits' matrix
    # (tied embedding or untied head) and a position table in the compute dtype + fp32 grads. An untied token
    # embedding is not counted on top: it is looked up and its gradient made at the other end of the step, when
    # the head's are gone (measured on the CPU compile: XLA holds one vocabulary-sized matrix and gradient)
    gathered_weights: int
    activations: int  # kept for the backward pass under the remat policy, plus one block's working set
    logits: int  # fp32 logits and their gradient (dense loss; the log-softmax fuses into them)
    inputs: int  # int32 tokens and targets of the step
    masks: int  # a sparse run's boolean masks of the prunable kernel shards (0 when dense)
    pruner: (
        int  # a sparse run's fp32 candidate kernel shards (params + updates) the pruner ranks (0 when dense)
    )
    holds_state: bool  # False on weight-streaming devices: `state_and_update` lives elsewhere

    @property
    def state(self) -> int:
        """Params + optimizer state (a sparse run's masks included): what XLA sees as the step's (donated)
        state arguments."""
        return self.params + self.optimizer + self.masks

    @property
    def state_and_update(self) -> int:
        """The state, gradients and a sparse run's pruner copy: what a weight-streaming device leaves to MemoryX."""
        return self.state + self.gradients + self.pruner

    @property
    def total(self) -> int:
        """What the device itself holds."""
        computed = self.gathered_weights + self.activations + self.logits + self.inputs
        return computed + (self.state_and_update if self.holds_state else 0)


def _shard_elements(cfg: ml_collections.ConfigDict, sizes: dict[str, int]) -> list[tuple[tuple, int]]:
    """(path keys, elements one device holds) of every parameter on a mesh of these axis sizes (by the rules)."""
    abstract = mesh.abstract_mesh_of(sizes)
    specs = mesh.leaves(mesh.param_specs(cfg, abstract))
    shapes = jax.tree_util.tree_leaves_with_path(gpt.param_shapes(cfg.model))
    return [
        (
            tuple(getattr(k, "key", None) for k in path),
            math.prod(NamedSharding(abstract, spec).shard_shape(shape.shape)),
        )
        for spec, (path, shape) in zip(specs, shapes, strict=True)
    ]


def param_shard_elements(
    cfg: ml_collections.ConfigDict, sizes: dict[str, int], kernels_only: bool = False
) -> int:
    """Parameter elements one device holds on a mesh of these axis sizes (by the logical-axis rules); with
    kernels_only, those of the Dense kernels (what a sparse run prunes)."""
    return sum(n for path, n in _shard_elements(cfg, sizes) if not kernels_only or path[-1] == "kernel")


@dataclasses.dataclass(frozen=True)
class Gathered:
    """Parameter elements one device holds once they are gathered over 'fsdp' (split over 'tensor' alone),
    from the real parameter shapes, so every switch counts: GQA's smaller K/V, SwiGLU's gate, no biases,
    RMSNorm's gain alone, a position table or none, an untied head."""

    block: int  # one block's
    outside: int  # the logits' matrix (tied embedding or untied head), a position table, the final norm
    lookup: int  # an untied model's token embedding, only looked up and its gradient written (0 when tied)


def gathered_elements(cfg: ml_collections.ConfigDict, tensor: int) -> Gathered:
    """What one device gathers of cfg's parameters on a mesh whose tensor axis has this size."""
    by_path = _shard_elements(cfg, {"data": 1, "fsdp": 1, "tensor": tensor})
    blocks = sum(n for path, n in by_path if path[0] == "blocks")
    lookup = 0 if cfg.model.tie_embeddings else sum(n for path, n in by_path if path[0] == "token_embed")
    rest = sum(n for _, n in by_path) - blocks - lookup
    return Gathered(blocks // cfg.model.n_layers, rest, lookup)


def _compute_bytes(model: ml_collections.ConfigDict) -> int:
    """Bytes per element of activations and gathered weights in the compute dtype."""
    return 2 if model.compute_dtype == "bfloat16" else FP32


def activation_bytes(cfg: ml_collections.ConfigDict, sequences: int, tensor: int, remat: str) -> int:
    """Activations one device keeps for the backward pass of `sequences` sequences, and one block's working set.

    Per token and block: the residual stream and the two norms' outputs (fp32; RMSNorm keeps what LayerNorm
    does), Q, K and V (K and V for kv_heads heads: fewer under grouped-query attention; under rotary
    positions the rotated Q and K, which take their place: the rotation's backward needs only its cos/sin
    tables), the attention output, the MLP's hidden activations (GELU's input and output, or SwiGLU's gate,
    up and their product), all split over `tensor`; for the 'xla' attention the fp32 logits and softmax with
    the compute-dtype weights (heads × seq per token). 'dots' keeps only the weight matmuls' outputs (Q, K/V,
    fc1 and a SwiGLU gate split over `tensor`; attn-out and fc2) and the block input; 'full' keeps the block
    input; both recompute one block.
    """
    m, s = cfg.model, cfg.data.seq_len
    width = _compute_bytes(m)
    d, f, tokens = m.d_model, d_ffn(m), sequences * s
    kv = 2 * kv_heads(m) * d_head(m)  # K and V per token
    mlp_inputs, mlp_hidden = (2, 3) if m.mlp == "swiglu" else (1, 2)  # matmuls into the hidden width; kept
    scores = m.n_heads / tensor * s * (2 * FP32 + width) if m.attention == "xla" else 0
    split = 2 * d + kv + mlp_hidden * f  # Q, K/V, the attention output, the MLP's hidden activations
    block = tokens * (d * (2 * width + 2 * FP32) + split / tensor * width + scores)
    block_input = tokens * d * width
    matmul_outputs = tokens * ((d + kv + mlp_inputs * f) / tensor * width + 2 * d * width)
    kept = {"none": block, "dots": block_input + matmul_outputs, "full": block_input}[remat]
    return int(m.n_layers * kept + (0 if remat == "none" else block))


def plan(
    cfg: ml_collections.ConfigDict,
    sizes: dict[str, int],
    device: hardware.Device,
    shard_elements: int,
    gathered: Gathered | None = None,
) -> MemoryPlan:
    """The memory plan of cfg (concrete microbatches and remat) on a mesh of these axis sizes.

    shard_elements: `param_shard_elements(cfg, sizes)`; gathered: `gathered_elements(cfg, sizes["tensor"])`,
    computed when not given (both independent of microbatches and remat: pass them in).
    """
    m = cfg.model
    width = _compute_bytes(m)
    tensor = sizes["tensor"]
    if gathered is None:
        gathered = gathered_elements(cfg, tensor)
    vocab_split = 1 if "vocab" in mesh.preset(cfg.mesh.preset).replicated else tensor
    shards = sizes["data"] * sizes["fsdp"]
    micro = cfg.train.batch_size // cfg.train.microbatches
    sequences = -(-micro // shards)  # per device; a ramp keeps the microbatch size
    largest_step = max(size for _, size in batch_schedule(cfg.train))
    shard_bytes = shard_elements * FP32
    logits_width = m.vocab_size / vocab_split if m.loss == "dense" else 0
    kernels = param_shard_elements(cfg, sizes, kernels_only=True) if cfg.sparsity.target > 0 else 0
    return MemoryPlan(
        params=shard_bytes,
        optimizer=2 * shard_bytes,
        gradients=shard_bytes * (3 if cfg.train.microbatches > 1 else 2),
        gathered_weights=(2 * width + FP32) * gathered.block + (width + FP32) * gathered.outside,
        activations=activation_bytes(cfg, sequences, tensor, m.remat),
        logits=int(2 * sequences * cfg.data.seq_len * logits_width * FP32),
        inputs=2 * largest_step // shards * cfg.data.seq_len * 4,
        masks=kernels * MASK,
        pruner=kernels * FP32,
        holds_state=device.holds_state,
    )


def usable_bytes(device: hardware.Device, local_devices: int = 1) -> int:
    """Device memory less MARGIN (a CPU host's available RAM over its local devices)."""
    memory = device.memory_bytes or hardware.host_memory_per_device(local_devices)
    return int(memory * (1 - MARGIN))


@dataclasses.dataclass(frozen=True)
class Choice:
    """Microbatches and remat for a run, the plan they give, and why."""

    microbatches: int
    remat: str
    plan: MemoryPlan
    budget: int
    reason: str

    @property
    def fits(self) -> bool:
        return self.plan.total <= self.budget


def microbatch_counts(cfg: ml_collections.ConfigDict, shards: int) -> list[int]:
    """Gradient-accumulation counts (ascending) whose microbatch divides every batch size of the schedule: those
    whose microbatch also splits evenly over `shards` batch shards, or if none does, all of them (training then
    pads each microbatch with rows that carry no loss)."""
    common = math.gcd(*(size for _, size in batch_schedule(cfg.train)))
    first = cfg.train.batch_size
    counts = [k for k in range(1, first + 1) if first % k == 0 and common % (first // k) == 0]
    return [k for k in counts if (first // k) % shards == 0] or counts


def choose(
    cfg: ml_collections.ConfigDict, sizes: dict[str, int], device: hardware.Device, budget: int
) -> tuple[ml_collections.ConfigDict, Choice]:
    """cfg with train.microbatches and model.remat resolved ('auto' → chosen), and the choice.

    Candidates in order: the smallest count first, at each count the lightest remat ('none' → 'dots' →
    'full'); the first that fits is taken. A config that fixes both just gets its plan. When nothing fits,
    the candidate needing least memory is returned with fits = False and a reason saying so.
    """
    shards = sizes["data"] * sizes["fsdp"]
    auto_count = cfg.train.microbatches == AUTO
    counts = microbatch_counts(cfg, shards) if auto_count else [cfg.train.microbatches]
    remats = REMATS if cfg.model.remat == "auto" else (cfg.model.remat,)
    first = _with(cfg, counts[0], remats[0])
    elements, gathered = param_shard_elements(first, sizes), gathered_elements(first, sizes["tensor"])
    tried = []  # (count, remat, total bytes, resolved config, plan)
    for count in counts:
        for remat in remats:
            candidate = _with(cfg, count, remat)
            memory = plan(candidate, sizes, device, elements, gathered)
            tried.append((count, remat, memory.total, candidate, memory))
            if memory.total <= budget:
                return candidate, Choice(
                    count, remat, memory, budget, _reason(tried, budget, device, shards, cfg)
                )
    count, remat, least, candidate, memory = min(tried, key=lambda t: t[2])
    reason = (
        f"nothing fits {budget / GiB:.1f} GiB per device ({device.name} less {MARGIN:.0%}): the lightest plan, "
        f"{count} microbatch(es) with remat {remat}, needs {least / GiB:.1f} GiB"
    )
    return candidate, Choice(count, remat, memory, budget, reason)


def _with(cfg: ml_collections.ConfigDict, microbatches: int, remat: str) -> ml_collections.ConfigDict:
    resolved = ml_collections.ConfigDict(cfg.to_dict())
    resolved.train.microbatches = microbatches
    resolved.model.remat = remat
    resolved.lock()
    return resolved


def _reason(tried: list, budget: int, device: hardware.Device, shards: int, cfg) -> str:
    count, remat, total, *_ = tried[-1]
    micro = cfg.train.batch_size // count
    padded = -(-micro // shards) * shards
    text = (
        f"{count} microbatch(es) of {micro} sequences ({padded // shards} per device), remat {remat}: "
        f"{total / GiB:.1f} GiB of {budget / GiB:.1f} GiB usable ({device.name} less {MARGIN:.0%})"
    )
    if len(tried) > 1:
        lighter = tried[-2]
        text += f"; the candidate before it ({lighter[0]} with remat {lighter[1]}) needs {lighter[2] / GiB:.1f} GiB"
    if padded != micro:
        sizes = [size for _, size in batch_schedule(cfg.train)]
        text += (
            f"; no microbatch of {sizes} splits over {shards} batch shards: each is padded to {padded} with "
            f"sequences that carry no loss ({1 - micro / padded:.1%} of the compute)"
        )
    return text


def check(choice: Choice, cfg: ml_collections.ConfigDict) -> None:
    """ConfigError (one line) when the chosen plan does not fit."""
    if not choice.fits:
        raise ConfigError(
            f"{cfg.name} needs about {choice.plan.total / GiB:.1f} GiB per device, "
            f"{choice.budget / GiB:.1f} GiB are usable: {choice.reason}; see `python -m experiments.run "
            f"--config={cfg.name} --dry_run` and run it on a larger mesh (--mesh)"
        )


def run_budget(preset) -> int:
    """Usable bytes per device for a run on this machine: the accelerator's own limit where it reports one,
    a CPU host's available RAM over its local devices, else the preset's device table entry."""
    device = jax.local_devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"] * (1 - MARGIN))
    if device.platform == "cpu":
        return usable_bytes(hardware.DEVICES["cpu"], jax.local_device_count())
    return usable_bytes(preset.device)
