"""The dry-run plan of a config: what a run would cost, computed without allocating anything on devices.

The plan resolves 'auto' microbatches and remat for the preset's mesh (chinchax.parallel.memory_plan) and gives the
analytic per-device memory; `add_xla` puts XLA's memory analysis of the compiled step (chinchax.dryrun.aot) beside it.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import ml_collections

from chinchax.model import flops, gpt
from chinchax.parallel import memory_plan, mesh

GiB = 2**30


def tree_param_count(model_cfg: ml_collections.ConfigDict) -> int:
    """Elements of the parameter tree, from jax.eval_shape (no allocation)."""
    shapes = gpt.param_shapes(model_cfg)
    return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))


def report(
    cfg: ml_collections.ConfigDict, devices: int | None = None
) -> tuple[dict, ml_collections.ConfigDict]:
    """(the plan as a JSON-ready dict (DESIGN.md's dry-run contract), cfg with 'auto' resolved) on cfg's mesh
    preset over `devices` (default: the preset's count, else the visible devices)."""
    preset = mesh.preset(cfg.mesh.preset)
    count = devices or preset.devices or jax.device_count()
    sizes = mesh.mesh_shape(cfg.mesh, count)
    budget = memory_plan.usable_bytes(preset.device, count)
    resolved, choice = memory_plan.choose(cfg, sizes, preset.device, budget)
    plan = flops.plan(resolved)
    memory = {k: v for k, v in dataclasses.asdict(choice.plan).items() if k != "holds_state"}
    return {
        "name": cfg.name,
        "parametrization": cfg.model.parametrization,
        **dataclasses.asdict(plan),
        "params": tree_param_count(resolved.model),
        "paper_formula_params": flops.paper_param_count(
            cfg.model.vocab_size, cfg.model.max_positions, cfg.model.d_model, cfg.model.n_layers
        ),
        "microbatches": choice.microbatches,
        "remat": choice.remat,
        "compute_dtype": cfg.model.compute_dtype,
        "choice": choice.reason,
        "memory": {
            **memory,
            "device": preset.device.name,
            "weights_streamed": not preset.device.holds_state,
            "analytic_bytes": choice.plan.total,
            "usable_bytes": budget,
        },
        "per_device_memory_bytes": choice.plan.total,
        "fits": choice.fits,
        "mesh": {"preset": cfg.mesh.preset, "shape": sizes},
    }, resolved


def add_xla(report: dict, aot_plan: dict) -> dict:
    """The report with XLA's memory analysis of the compiled step beside the analytic figure (like with like:
    on weight-streaming devices both leave out params, optimizer state and gradients) and `fits` by both."""
    memory = report["memory"]
    xla = aot_plan["memory_per_device_bytes"]["total"]
    if memory["weights_streamed"]:
        xla -= memory["params"] + memory["optimizer"] + memory["gradients"]
    memory.update(xla_bytes=xla, analytic_over_xla=memory["analytic_bytes"] / xla)
    fits = report["fits"] and xla <= memory["usable_bytes"]
    return {**report, "aot": aot_plan, "per_device_memory_bytes": xla, "fits": fits}


def format_plan(r: dict) -> str:
    """A few human-readable lines for the terminal."""
    shape = " × ".join(f"{k} {v}" for k, v in r["mesh"]["shape"].items())
    memory = r["memory"]
    held = f"{memory['analytic_bytes'] / GiB:.2f} GiB analytic"
    if "xla_bytes" in memory:
        held += f", {memory['xla_bytes'] / GiB:.2f} GiB XLA memory analysis (ratio {memory['analytic_over_xla']:.2f})"
    streamed = " (weights and optimizer state streamed: not counted)" if memory["weights_streamed"] else ""
    return "\n".join(
        [
            f"scale point      {r['name']} ({r['parametrization']})",
            f"parameters       {r['params']:,} ({r['non_embedding_params']:,} non-embedding)",
            f"tokens           {r['tokens']:,} ({r['tokens_per_param']:.2f} per parameter), "
            f"{r['steps']:,} steps",
            f"FLOPs            {r['train_flops']:.3e} ({r['flops_per_token']:,} per token; "
            f"6N gives {r['flops_per_token_6n']:,})",
            f"mesh             {r['mesh']['preset']}: {shape} of {memory['device']}",
            f"step             {r['microbatches']} microbatch(es), remat {r['remat']}, {r['compute_dtype']} "
            f"compute: {r['choice']}",
            f"memory / device  {held}{streamed}",
            f"fits             {str(r['fits']).lower()} ({memory['usable_bytes'] / GiB:.1f} GiB usable)",
        ]
    )
