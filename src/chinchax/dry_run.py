"""The dry-run plan of a config: what a run would cost, computed without allocating anything on devices."""

from __future__ import annotations

import dataclasses
import math

import jax
import ml_collections

from chinchax import flops, model

STATE_BYTES_PER_PARAM = 16  # fp32 params + fp32 grads + two fp32 Adam moments


def tree_param_count(model_cfg: ml_collections.ConfigDict) -> int:
    """Elements of the parameter tree, from jax.eval_shape (no allocation)."""
    shapes = model.param_shapes(model_cfg)
    return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))


def activation_bytes(cfg: ml_collections.ConfigDict, sequences: int) -> int:
    """Rough activation memory of one forward+backward over `sequences` sequences, in bytes.

    Per block, stored activations take s·b·d·(34 + 5·a·s/d) bytes in 16-bit (Korthikanti et al. 2022), twice
    that in fp32; with remat only each block's input is kept, plus one block's working set. Logits and their
    gradient are fp32 (b·s·V·4 bytes each).
    """
    m, s = cfg.model, cfg.data.seq_len
    width = 2 if m.compute_dtype == "bfloat16" else 4
    per_block = s * sequences * m.d_model * (34 + 5 * m.n_heads * s / m.d_model) * width / 2
    if m.remat:
        blocks = m.n_layers * s * sequences * m.d_model * width + per_block
    else:
        blocks = m.n_layers * per_block
    logits = 2 * sequences * s * m.vocab_size * 4
    return int(blocks + logits)


def report(cfg: ml_collections.ConfigDict, devices: int | None = None) -> dict:
    """The plan as a JSON-ready dict (DESIGN.md's dry-run contract), for data-parallel `devices`."""
    devices = devices or jax.device_count()
    plan = flops.plan(cfg)
    params = tree_param_count(cfg.model)
    sequences_per_device = max(1, cfg.train.batch_size // (cfg.train.microbatches * devices))
    state = params * STATE_BYTES_PER_PARAM
    per_device = state + activation_bytes(cfg, sequences_per_device)
    return {
        "name": cfg.name,
        "parametrization": cfg.model.parametrization,
        **dataclasses.asdict(plan),
        "params": params,
        "paper_formula_params": flops.paper_param_count(
            cfg.model.vocab_size, cfg.model.max_positions, cfg.model.d_model, cfg.model.n_layers
        ),
        "per_device_memory_bytes": per_device,
        "mesh": {"preset": "cpu", "shape": {"data": devices, "fsdp": 1, "tensor": 1}},
    }


def format_plan(r: dict) -> str:
    """A few human-readable lines for the terminal."""
    shape = " × ".join(f"{k} {v}" for k, v in r["mesh"]["shape"].items())
    return "\n".join(
        [
            f"scale point      {r['name']} ({r['parametrization']})",
            f"parameters       {r['params']:,} ({r['non_embedding_params']:,} non-embedding)",
            f"tokens           {r['tokens']:,} ({r['tokens_per_param']:.2f} per parameter), "
            f"{r['steps']:,} steps",
            f"FLOPs            {r['train_flops']:.3e} ({r['flops_per_token']:,} per token; "
            f"6N gives {r['flops_per_token_6n']:,})",
            f"memory / device  {r['per_device_memory_bytes'] / 2**30:.2f} GiB "
            f"({'XLA memory analysis' if 'aot' in r else 'analytic estimate'})",
            f"mesh             {r['mesh']['preset']}: {shape}",
        ]
    )
