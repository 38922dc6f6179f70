"""The dry-run plan of a config: what a run would cost, computed without allocating anything on devices.

The plan resolves 'auto' microbatches and remat for the preset's mesh (chinchax.parallel.memory_plan) and gives the
analytic per-device memory; `add_xla` puts XLA's memory analysis of the compiled step (chinchax.dryrun.aot) beside it,
and `add_prediction` the performance model's step time (chinchax.parallel.perf_model): compute from XLA's loop-aware
matmul FLOPs of the compiled step, memory from the analytic traffic estimate, collectives from the compiled HLO.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import ml_collections

from chinchax.config import d_ffn, kv_heads
from chinchax.model import flops, gpt
from chinchax.parallel import hardware, memory_plan, mesh, perf_model

GiB = 2**30
DAY = 86400.0
ASSUMPTIONS = (
    "step = max(compute, memory) + sum of collectives (collectives overlap nothing); compute = XLA's loop-aware "
    "matmul FLOPs per device of the compiled step (remat recompute and padding included) at the peak; memory = "
    "the analytic traffic of chinchax.parallel.perf_model.memory_traffic (not XLA's bytes accessed, which counts a "
    "scanned layer once) at the memory bandwidth; collectives = bytes from the compiled HLO at their axis's link "
    "(compiled on CPU, which sums gradients with all-reduce where a GPU compile reduce-scatters); days = tokens / "
    "tokens per second at the first batch size"
)

CPU_ASSUMPTIONS = (
    "one device runs the step's kernels one after another (chinchax.parallel.perf_model's CPU model): each kernel "
    "max(its matmuls' time, bytes / bandwidth), matmuls timed one by one on this machine, a kernel's first run at "
    "the bandwidth into fresh buffers and a loop body's later runs at that into reused ones; a matmul over "
    "perf_model.TIMED_DOT_MAX_FLOPS or _BYTES is timed as a slice and scaled up by FLOPs; the gaps between "
    "kernels and kernels run side by side are left out (benchmarks.perf_model_cpu measures the error per shape)"
)


def tree_param_count(model_cfg: ml_collections.ConfigDict) -> int:
    """Elements of the parameter tree, from jax.eval_shape (no allocation)."""
    shapes = gpt.param_shapes(model_cfg)
    return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))


def paper_formula(model: ml_collections.ConfigDict) -> dict:
    """{'paper_formula_params': the paper's App. E count} for the GPT-3 block it counts (LayerNorm, learned
    positions, a GELU MLP of 4·d, a K/V head per query head, biases, the head tied to the embedding); {} for any
    other block, whose parameters the formula does not count."""
    switches = (model.norm, model.position, model.mlp, model.bias, model.tie_embeddings)
    plain = kv_heads(model) == model.n_heads and d_ffn(model) == 4 * model.d_model
    if not (plain and switches == ("layernorm", "learned", "gelu", True, True)):
        return {}
    count = flops.paper_param_count(model.vocab_size, model.max_positions, model.d_model, model.n_layers)
    return {"paper_formula_params": count}


def report(
    cfg: ml_collections.ConfigDict, devices: int | None = None
) -> tuple[dict, ml_collections.ConfigDict]:
    """(the plan as a JSON-ready dict (DESIGN.md's dry-run contract), cfg with 'auto' resolved) on cfg's mesh
    preset over `devices` (default: the preset's count, else the visible devices); `paper_formula_params` only for the
    GPT-3 block (`paper_formula`)."""
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
        **paper_formula(cfg.model),
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
        xla -= sum(memory[k] for k in ("params", "optimizer", "gradients", "masks", "pruner"))
    memory.update(xla_bytes=xla, analytic_over_xla=memory["analytic_bytes"] / xla)
    fits = report["fits"] and xla <= memory["usable_bytes"]
    return {**report, "aot": aot_plan, "per_device_memory_bytes": xla, "fits": fits}


def add_prediction(report: dict, resolved: ml_collections.ConfigDict, hlo_text: str | None = None) -> dict:
    """The report with the performance model's prediction under `prediction` (step seconds, what bounds it, MFU,
    tokens/s, days and device-hours to train), from its compiled step (`add_xla`); {'unavailable': why} when the
    step was not compiled or the device table lacks a peak, a memory bandwidth or a link for the device. On the
    cpu preset the step's compiled HLO (`hlo_text`) is predicted kernel by kernel on this machine instead
    (`cpu_prediction`)."""
    device = mesh.preset(resolved.mesh.preset).device
    if device.platform == "cpu":
        return {**report, "prediction": cpu_prediction(report, resolved, hlo_text)}
    sizes = report["mesh"]["shape"]
    peak = resolved.train.peak_flops_per_device or device.peak_flops
    missing = [
        name
        for name, value in (("peak FLOP/s", peak), ("memory bandwidth", device.memory_bandwidth))
        if not value
    ]
    why = None
    if missing:
        hint = " (set --config.train.peak_flops_per_device)" if not peak else ""
        why = f"the device table has no {' or '.join(missing)} for {device.name}{hint}"
    else:
        try:
            links = perf_model.axis_links(device, sizes)
        except ValueError as error:
            why = str(error)
    if why is None and "aot" not in report:
        why = "the step was not compiled: a dry run compiles it on a pod preset (--mesh=gpu-8, wse-16, ...)"
    if why is not None:
        return {**report, "prediction": {"unavailable": why}}

    aot = report["aot"]
    flops_per_device = aot["flops_per_step"]["xla_matmul_per_device"]
    traffic = perf_model.memory_traffic(resolved, sizes, device)
    step_tokens = resolved.train.batch_size * resolved.data.seq_len
    got = perf_model.predict(
        device,
        sizes,
        flops_per_device,
        traffic["total"],
        aot["collective_bytes_per_device"],
        step_tokens,
        report["flops_per_token"] * step_tokens,
        peak,
    )
    if got.bound == "compute":
        detail = f"compute: {flops_per_device:.3g} matmul FLOPs per device at {peak / 1e12:.0f} TFLOP/s"
    elif got.bound == "memory":
        detail = (
            f"memory: {traffic['total'] / 1e9:.0f} GB per device (analytic) at "
            f"{device.memory_bandwidth / 1e12:.2f} TB/s"
        )
    else:
        axes = got.bound.split(" on ")[1].split("+")
        detail = f"{got.bound} over {min((links[a] for a in axes), key=lambda link: link[1])[0]}"
    prediction = {
        **_timing(got, detail, report["tokens"], aot["devices"]),
        "memory_bytes_per_device": traffic,
        "peak_flops": peak,
        "peak_source": "configured" if resolved.train.peak_flops_per_device else device.source,
        "links": {axis: name for axis, (name, _) in links.items()},
        "assumptions": ASSUMPTIONS,
    }
    return {**report, "prediction": prediction}


def _timing(got: perf_model.Prediction, detail: str, tokens: int, devices: int) -> dict:
    """What every prediction gives: the step, what bounds it, MFU, tokens/s, days and device-hours to train
    `tokens`, and the terms."""
    days = tokens / got.tokens_per_second / DAY
    return {
        "step_seconds": got.seconds,
        "bound": got.bound,
        "bound_detail": detail,
        "mfu": got.mfu,
        "tokens_per_second": got.tokens_per_second,
        "days": days,
        "device_hours": days * 24 * devices,
        "compute_seconds": got.compute_seconds,
        "memory_seconds": got.memory_seconds,
        "collective_seconds": got.collective_seconds,
    }


def cpu_prediction(report: dict, resolved: ml_collections.ConfigDict, hlo_text: str | None) -> dict:
    """The CPU model's prediction of one local device's step (perf_model.predict_kernels): each distinct matmul
    of the compiled step and the memory bandwidth timed on this machine now, the peak measured once per machine;
    {'unavailable': why} without a compiled step or with more than one device (they would share the cores)."""
    devices, why = math.prod(report["mesh"]["shape"].values()), None
    if hlo_text is None:
        why = (
            "no compiled step"
            if report["fits"]
            else "the step does not fit this machine, so it was not compiled"
        )
    elif devices != 1:
        why = f"{devices} devices share this CPU"
    if why:
        return {"unavailable": f"the CPU model predicts one compiled local device's step ({why})"}
    peak, peak_source = hardware.peak_flops_per_device(resolved.train.peak_flops_per_device)
    fresh, reused = hardware.measure_memory_bandwidth(), hardware.measure_memory_bandwidth(reuse=True)
    kernels = perf_model.hlo_kernels(hlo_text)
    step_tokens = resolved.train.batch_size * resolved.data.seq_len
    got = perf_model.predict_kernels(
        kernels,
        perf_model.dot_timer(),
        fresh,
        reused,
        peak,
        step_tokens,
        report["flops_per_token"] * step_tokens,
    )
    matmuls = {d for k in kernels for d in k.dots}
    sliced = sum(perf_model.timed_slice(d) != d for d in matmuls)
    if got.bound == "compute":
        detail = f"compute: {len(matmuls)} distinct matmuls, each timed here"
        if sliced:
            detail += f" ({sliced} too large to run here timed as slices and scaled up by FLOPs)"
    else:
        detail = (
            f"memory: {fresh / 1e9:.0f} GB/s into fresh buffers, {reused / 1e9:.0f} GB/s into reused ones"
        )
    return {
        **_timing(got, detail, report["tokens"], 1),
        "bandwidths": {"fresh": fresh, "reused": reused},
        "kernels": sum(k.runs for k in kernels),
        "matmuls": {"distinct": len(matmuls), "timed_as_slices": sliced},
        "peak_flops": peak,
        "peak_source": peak_source,
        "assumptions": CPU_ASSUMPTIONS,
    }


def hours(value: float) -> str:
    """Device-hours for the terminal: whole hours with separators, three digits below ten."""
    return f"{value:,.0f}" if value >= 10 else f"{value:.3g}"


def format_prediction(p: dict) -> list[str]:
    """The prediction's terminal lines."""
    if "unavailable" in p:
        return [f"prediction       unavailable: {p['unavailable']}"]
    return [
        f"step time        {p['step_seconds']:.3g} s predicted, bound by {p['bound_detail']}",
        f"throughput       MFU {100 * p['mfu']:.1f}%, {p['tokens_per_second']:,.0f} tokens/s",
        f"time to train    {p['days']:.3g} days ({hours(p['device_hours'])} device-hours)",
    ]


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
            *(
                [
                    f"sparse           block matmuls at mean density {r['average_density']:.4f}: "
                    f"{r['train_flops']:.3e} FLOPs of the dense {r['train_flops_dense']:.3e}; masks + "
                    f"pruner copy {(memory['masks'] + memory['pruner']) / GiB:.3g} GiB / device"
                ]
                if r["average_density"] < 1
                else []
            ),
            f"mesh             {r['mesh']['preset']}: {shape} of {memory['device']}",
            f"step             {r['microbatches']} microbatch(es), remat {r['remat']}, {r['compute_dtype']} "
            f"compute: {r['choice']}",
            f"memory / device  {held}{streamed}",
            f"fits             {str(r['fits']).lower()} ({memory['usable_bytes'] / GiB:.1f} GiB usable)",
            *(format_prediction(r["prediction"]) if "prediction" in r else []),
        ]
    )
