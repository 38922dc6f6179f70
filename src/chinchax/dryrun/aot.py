"""Ahead-of-time compile plan: lower and compile the real train step for a mesh, allocating nothing.

The state and batch enter as jax.ShapeDtypeStructs carrying their shardings, so a 13B step compiles against
16 fake CPU devices in seconds. XLA then says what one device needs (memory_analysis) and how much it computes
(cost_analysis). XLA's cost analysis counts the body of a while loop once, and the layers run as a scan (a
while loop of n_layers trips, forward and backward), so its FLOP count is per device and per *one* layer;
`hlo_matmul_flops` reads the compiled HLO instead and multiplies every dot by the known trip counts of the
loops around it (the walk chinchax.parallel.perf_model counts collectives with), which is comparable with the
analytic count (chinchax.model.flops also counts matmuls only).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections

from chinchax.config import ConfigError, microbatch_size
from chinchax.model import flops
from chinchax.parallel import mesh as mesh_lib
from chinchax.parallel import perf_model
from chinchax.training import train


def hlo_matmul_flops(hlo_text: str) -> float:
    """FLOPs of every dot in a compiled HLO module (2·output·contraction), loops counted trip-count times.

    For an SPMD-partitioned module this is per device. Dots inside fusions count once per call of the
    fusion; a while body counts `known_trip_count` times (once when XLA does not know the count).
    """

    def dot(result, shape, opcode, rest, shapes) -> dict[str, float]:
        return {"flops": perf_model.dot_of(rest, shapes).flops} if opcode == "dot" else {}

    return perf_model.hlo_loop_totals(hlo_text, dot).get("flops", 0.0)


def use_virtual_devices(count: int) -> None:
    """Ask JAX for `count` fake CPU devices to compile against, unless XLA_FLAGS already sets a count or JAX has
    started its backends (then the visible devices stay as they are)."""
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:  # backends already initialised: compile_plan says if too few devices are visible
        pass


def _devices(preset_devices: int | None, devices: int | Sequence[jax.Device] | None) -> list[jax.Device]:
    if devices is not None and not isinstance(devices, int):
        return list(devices)
    wanted = devices or preset_devices or jax.device_count()
    if wanted > jax.device_count():
        raise ConfigError(
            f"the mesh needs {wanted} devices, {jax.device_count()} are visible "
            f"(on CPU: XLA_FLAGS=--xla_force_host_platform_device_count={wanted})"
        )
    return jax.devices()[:wanted]


@dataclasses.dataclass(frozen=True)
class CompiledStep:
    """A train step compiled for a mesh, with what its analysis reads."""

    cfg: ml_collections.ConfigDict  # the config it compiled, with the preset it compiled for
    mesh: jax.sharding.Mesh
    micro: int  # sequences per microbatch as planned
    padded: int  # sequences per microbatch as compiled (padded to split over data × fsdp)
    state: object  # the sharded state's ShapeDtypeStructs
    compiled: jax.stages.Compiled
    lower_seconds: float
    compile_seconds: float


def compile_step(
    cfg: ml_collections.ConfigDict,
    preset: str | None = None,
    devices: int | Sequence[jax.Device] | None = None,
) -> CompiledStep:
    """Lower and compile cfg's train step on a mesh (`preset` replaces cfg.mesh.preset; cfg.mesh's axis
    overrides still apply), allocating nothing.

    devices: a list, a count (the first n visible devices) or None (the preset's count, else all visible).
    A microbatch that does not split over data × fsdp is padded up with rows that carry no loss, as training
    pads it.
    """
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    cfg.mesh.preset = preset or cfg.mesh.preset
    devices = _devices(mesh_lib.preset(cfg.mesh.preset).devices, devices)
    mesh = mesh_lib.make_mesh(cfg.mesh, devices)
    micro = microbatch_size(cfg.train)
    padded = mesh_lib.padded_microbatch(mesh, micro)
    microbatches = cfg.train.batch_size // micro

    start = time.perf_counter()
    state_shapes = jax.eval_shape(lambda: train.init_state(cfg, jax.random.key(0)))
    state = mesh_lib.sharded_shapes(cfg, mesh, state_shapes)
    tokens = jax.ShapeDtypeStruct(
        (microbatches, padded, cfg.data.seq_len), jnp.int32, sharding=mesh_lib.batch_sharding(mesh)
    )
    step = mesh_lib.jit_train_step(cfg, mesh, train.make_train_step(cfg), state_shapes)
    lowered = step.lower(state, {"inputs": tokens, "targets": tokens})
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    return CompiledStep(
        cfg, mesh, micro, padded, state, compiled, lowered_at - start, time.perf_counter() - lowered_at
    )


def compile_plan(
    cfg: ml_collections.ConfigDict,
    preset: str | None = None,
    devices: int | Sequence[jax.Device] | None = None,
) -> dict:
    """compile_step(cfg, preset, devices), then what XLA says of it (`analysis`)."""
    return analysis(compile_step(cfg, preset, devices))


def analysis(step: CompiledStep) -> dict:
    """What XLA says of a compiled step: memory per device, matmul FLOPs, collective bytes per mesh axis
    (a padded microbatch is reported as `padded_microbatch`)."""
    cfg, mesh, compiled, micro, padded = step.cfg, step.mesh, step.compiled, step.micro, step.padded
    microbatches = cfg.train.batch_size // micro
    devices = mesh.devices.size
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    per_device = (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        - memory.alias_size_in_bytes
        + memory.temp_size_in_bytes
    )
    hlo = compiled.as_text()
    matmul_per_device = hlo_matmul_flops(hlo)
    step_tokens = microbatches * padded * cfg.data.seq_len
    analytic = flops.flops_per_token(cfg.model, cfg.data.seq_len) * step_tokens
    return {
        "preset": cfg.mesh.preset,
        "shape": dict(mesh.shape),
        "devices": devices,
        "remat": cfg.model.remat,
        "batch": {"microbatches": microbatches, "sequences": padded, "seq_len": cfg.data.seq_len},
        "padded_microbatch": None if padded == micro else {"from": micro, "to": padded},
        "memory_per_device_bytes": {
            "total": per_device,
            "arguments": memory.argument_size_in_bytes,
            "outputs": memory.output_size_in_bytes,
            "aliased": memory.alias_size_in_bytes,
            "temporaries": memory.temp_size_in_bytes,
            "generated_code": memory.generated_code_size_in_bytes,
        },
        "state_bytes_per_device": state_bytes_per_device(step.state),
        "flops_per_step": {
            "xla_cost_analysis_per_device": float(cost.get("flops", float("nan"))),
            "xla_matmul_per_device": matmul_per_device,
            "xla_matmul_total": matmul_per_device * devices,
            "analytic": float(analytic),
            "xla_over_analytic": matmul_per_device * devices / analytic,
            "note": "cost_analysis counts each scanned layer once (per device); xla_matmul multiplies "
            "dots by loop trip counts. With remat the backward pass recomputes each block's forward "
            "(block matmuls ×4/3); replicated axes (e.g. vocab under tensor parallelism) compute twice.",
        },
        "collective_bytes_per_device": perf_model.collective_bytes(hlo, dict(mesh.shape)),
        "lower_seconds": step.lower_seconds,
        "compile_seconds": step.compile_seconds,
    }


def state_bytes_per_device(state) -> int:
    """Bytes of one device's shards of a tree of sharded ShapeDtypeStructs (or arrays)."""
    return sum(
        math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
        for x in jax.tree.leaves(state)
    )
