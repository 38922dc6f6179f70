"""The dry-run plan of many scale points in one table: `python -m experiments.plan [--points=a,b,...]`.

With no --points it plans the whole published family (SP, μP, the 40M proxy) and the CPU points on one device.
`--pods` instead plans every published point on its pods (cerebras_gpt.pods: 8×H100, a TPU slice, 16 CS-2s):
the chosen microbatches and remat, the analytic per-device memory and XLA's memory analysis of the real step
compiled against a virtual mesh of fake CPU devices, and whether it fits; `--write=BUILD.md` puts that table
between the file's `pod-table` markers. `--mesh=PRESET` compiles each published SP point (or --points) on that
preset's virtual mesh and adds the performance model's prediction (chinchax.parallel.perf_model): step time, what
bounds it, MFU, days to train.

`--budget=X --unit=device_hours --mesh=PRESET` plans the compute-optimal point for X device-hours on the preset:
the model-FLOP budget is X · 3600 · the device's peak · MFU, and MFU depends on the shape, so it iterates: assume
MFU (MFU_GUESS first), plan the shape for that budget, compile it, predict its MFU and device-hours, and re-plan
at the predicted MFU until the point's device-hours are within BUDGET_TOLERANCE of the budget (discrete shapes can
make MFU jump between neighbours, so after MAX_ROUNDS the round closest to the budget is taken). `--unit=flops`
takes a raw model-FLOP budget (one round; with --mesh its time is predicted). The allocation is 20 tokens per
parameter (chinchax.scaling.plan), or with `--law=fit.json` (a chinchilla fit written by experiments.fit) the
law's N_opt(C), evaluated at the detailed FLOP budget (its closed form assumes C = 6ND; the detailed count is a
few per cent above it), with the loss L(N, D) the law predicts for the planned point. Each point takes the batch,
learning rate and schedule of the published SP point nearest in parameters.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=32")  # virtual meshes for --pods
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json  # noqa: E402
import pathlib  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from absl import flags  # noqa: E402
from tqdm import tqdm  # noqa: E402

from chinchax import atomic, config
from chinchax.dryrun import aot
from chinchax.dryrun import report as dry_run
from chinchax.model import flops
from chinchax.parallel import mesh
from chinchax.scaling import bootstrap, fit, fit_io
from chinchax.scaling import plan as planner
from experiments import cli as cli_lib  # noqa: E402
from experiments import configs  # noqa: E402
from experiments.configs import cerebras_gpt  # noqa: E402

_POINTS = flags.DEFINE_list(
    "points", None, "Scale-point names (default: all; with --pods the published ones)."
)
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object per point (per pod with --pods).")
_PODS = flags.DEFINE_bool(
    "pods", False, "Plan the published points on their pods, with XLA's memory analysis."
)
_WRITE = flags.DEFINE_string(
    "write", None, "With --pods: a Markdown file whose pod-table section to replace."
)

_MESH = flags.DEFINE_string(
    "mesh", None, "A preset (gpu-8, tpu-v5e-16, wse-16, ...): predict each point's step time on it."
)
_BUDGET = flags.DEFINE_float("budget", None, "Plan the compute-optimal point for this budget (see --unit).")
_UNIT = flags.DEFINE_enum(
    "unit", "device_hours", ["device_hours", "flops"], "--budget in device-hours on --mesh or in model FLOPs."
)
_LAW = flags.DEFINE_string(
    "law",
    None,
    "A chinchilla-law fit.json (experiments.fit): its N_opt(C) and loss instead of 20 tokens/param.",
)

MFU_GUESS = 0.4  # the first round's MFU
BUDGET_TOLERANCE = 0.05  # stop when the point's predicted device-hours are within this fraction of the budget
MAX_ROUNDS = 4  # then the round that comes closest (discrete shapes can make MFU jump between neighbours)
LAW_CONSTANTS = fit_io.CONSTANT_NAMES["chinchilla"]

MARKERS = (
    "<!-- pod-table:start (python -m experiments.plan --pods --write=BUILD.md) -->",
    "<!-- pod-table:end -->",
)
GiB = 2**30


def family_table(names: list[str]) -> None:
    rows = [dry_run.report(config.validate(configs.get(n)), devices=1)[0] for n in names]
    if _JSON.value:
        for row in rows:
            print(json.dumps(row))
        return
    print(
        f"{'scale point':18s} {'params':>15s} {'non-embedding':>15s} {'tokens':>17s} {'steps':>8s} "
        f"{'FLOPs':>10s} {'FLOPs/token':>15s}"
    )
    for r in rows:
        print(
            f"{r['name']:18s} {r['params']:>15,} {r['non_embedding_params']:>15,} {r['tokens']:>17,} "
            f"{r['steps']:>8,} {r['train_flops']:>10.3e} {r['flops_per_token']:>15,}"
        )


def pod_row(name: str, preset: str) -> dict:
    """The plan of one point on one pod, XLA's figure included; a point that cannot run there says why."""
    cfg = config.validate(configs.get(name))
    cfg.mesh.preset = preset
    start = time.perf_counter()
    try:
        report, resolved = dry_run.report(cfg)
    except config.ConfigError as error:
        return {"name": name, "preset": preset, "fits": False, "why": str(error)}
    report = dry_run.add_xla(report, aot.compile_plan(resolved))
    memory = report["memory"]
    return {
        "name": name,
        "preset": preset,
        "devices": report["aot"]["devices"],
        "microbatches": report["microbatches"],
        "sequences": report["aot"]["batch"]["sequences"],
        "padded_from": (report["aot"]["padded_microbatch"] or {}).get("from"),
        "remat": report["remat"],
        "analytic_gib": memory["analytic_bytes"] / GiB,
        "xla_gib": memory["xla_bytes"] / GiB,
        "usable_gib": memory["usable_bytes"] / GiB,
        "fits": report["fits"],
        "seconds": time.perf_counter() - start,
    }


def markdown(rows: list[dict]) -> str:
    lines = [
        "| scale point | preset | devices | microbatches × sequences | remat | analytic GiB | XLA GiB | analytic/XLA "
        "| usable GiB | fits |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "why" in r:
            lines.append(f"| {r['name']} | {r['preset']} | | | | | | | | no: {r['why']} |")
            continue
        sequences = f"{r['padded_from']} padded to {r['sequences']}" if r["padded_from"] else r["sequences"]
        lines.append(
            f"| {r['name']} | {r['preset']} | {r['devices']} | {r['microbatches']} × {sequences} | {r['remat']} | "
            f"{r['analytic_gib']:.1f} | {r['xla_gib']:.1f} | {r['analytic_gib'] / r['xla_gib']:.2f} | "
            f"{r['usable_gib']:.1f} | {'yes' if r['fits'] else 'no'} |"
        )
    return "\n".join(lines)


def pods_table(names: list[str]) -> None:
    jobs = [(name, preset) for name in names for preset in cerebras_gpt.pods(name)]
    rows = [pod_row(name, preset) for name, preset in tqdm(jobs, desc="pods", unit="plan")]
    if _JSON.value:
        for row in rows:
            print(json.dumps(row))
    else:
        print(markdown(rows))
    if _WRITE.value:
        path = pathlib.Path(_WRITE.value)
        text = path.read_text()
        if not all(marker in text for marker in MARKERS):
            raise config.ConfigError(f"{path} has no pod-table markers: {MARKERS[0]} … {MARKERS[1]}")
        head, rest = text.split(MARKERS[0])
        tail = rest.split(MARKERS[1])[1]
        atomic.write_text(path, f"{head}{MARKERS[0]}\n{markdown(rows)}\n{MARKERS[1]}{tail}")


def compiled(cfg) -> dict:
    """The dry-run report of cfg (its mesh preset) with XLA's analysis of the compiled step and the prediction."""
    report, resolved = dry_run.report(cfg)
    report = dry_run.add_xla(report, aot.compile_plan(resolved))
    return dry_run.add_prediction(report, resolved)


def mesh_table(names: list[str], preset: str) -> None:
    """Each point's plan and predicted step time, MFU and days on the preset."""
    rows = []
    for name in tqdm(names, desc=preset, unit="point"):
        cfg = config.validate(configs.get(name))
        cfg.mesh.preset = preset
        rows.append(compiled(cfg))
    if _JSON.value:
        for row in rows:
            print(json.dumps(row))
        return
    print(
        f"{'scale point':16s} {'params':>14s} {'tokens':>16s} {'micro × remat':>13s} {'fits':>4s} {'step s':>7s} "
        f"{'MFU':>6s} {'tokens/s':>10s} {'days':>7s}  bound"
    )
    for r in rows:
        p = r["prediction"]
        head = (
            f"{r['name']:16s} {r['params']:>14,} {r['tokens']:>16,} {r['microbatches']:>5} × {r['remat']:5s} "
            f"{'yes' if r['fits'] else 'no':>4s}"
        )
        if "unavailable" in p:
            print(f"{head}  prediction unavailable: {p['unavailable']}")
            continue
        print(
            f"{head} {p['step_seconds']:>7.3g} {100 * p['mfu']:>5.1f}% {p['tokens_per_second']:>10,.0f} "
            f"{p['days']:>7.3g}  {p['bound_detail']}"
        )


def load_law(path: str) -> tuple[fit.ChinchillaLaw, dict]:
    """(the law, the fit's JSON) of a chinchilla fit written by experiments.fit."""
    summary = json.loads(pathlib.Path(path).read_text())
    if not all(name in summary for name in LAW_CONSTANTS):
        raise config.ConfigError(
            f"{path} is not a chinchilla-law fit (needs {', '.join(LAW_CONSTANTS)}; law is {summary.get('law')!r})"
        )
    return fit.ChinchillaLaw(**{name: float(summary[name]) for name in LAW_CONSTANTS}), summary


def loss_interval(summary: dict, params: float, tokens: float) -> tuple[list[float] | None, str]:
    """([low, high] of L(N, D), how): the central `ci_level` percentile interval of L over the fit's joint
    bootstrap refits when fit.json keeps them (`bootstrap_samples`: {constant: [one per refit]}); else L at the
    corners of the constants' own CIs (L grows with A, B, E and falls with alpha, beta for N, D > 1, so the corners
    bound it), which ignores the constants' correlations and so is wider; None without either."""
    samples = summary.get("bootstrap_samples") or {}
    if all(name in samples for name in LAW_CONSTANTS):
        law = fit.ChinchillaLaw(
            **{name: np.asarray(samples[name], dtype=np.float64) for name in LAW_CONSTANTS}
        )
        level = summary.get("ci_level", fit.CI_LEVEL)
        interval = bootstrap.percentile_intervals({"L": law.loss(params, tokens)}, level).get("L")
        return (
            list(interval) if interval else None
        ), f"{level:.0%} percentile of L over the bootstrap refits"
    ci = summary.get("ci") or {}
    if not all(name in ci for name in LAW_CONSTANTS):
        return None, "the fit has no CIs"
    corner = {True: {}, False: {}}
    for name in LAW_CONSTANTS:
        low, high = ci[name]
        grows = name in ("A", "B", "E")
        corner[True][name], corner[False][name] = (high, low) if grows else (low, high)
    interval = [float(fit.ChinchillaLaw(**corner[high]).loss(params, tokens)) for high in (False, True)]
    return interval, "L at the corners of the constants' CIs (conservative: ignores their correlations)"


def nearest_family_base(params: float) -> str:
    """The published SP point nearest (in log) to this many parameters: its batch, learning rate and schedule."""
    names = [f"chinchilla_{size}" for size in cerebras_gpt.FAMILY]
    return min(names, key=lambda n: abs(np.log(flops.plan(configs.get(n)).params / params)))


def plan_point(
    budget: float, allocation, params_count: str, preset: str | None
) -> tuple[planner.Point, dict]:
    """The compute-optimal point for `budget` model FLOPs on the nearest family member's recipe (its heads split
    over the preset's tensor axis, else tensor = 1), and its described numbers."""
    shape = planner.solve_shape(configs.get("chinchilla_111m"), budget, allocation, params_count=params_count)
    base_name = nearest_family_base(
        flops.param_count(planner.configure(configs.get("chinchilla_111m"), shape.overrides()).model)
    )
    tensor = mesh.preset(preset).shape[2] if preset else 1
    extra = [("mesh.tensor", 0 if shape.n_heads % max(tensor, 1) == 0 else 1)]
    if preset:
        extra.append(("mesh.preset", preset))
    base = configs.get(base_name)
    point = planner.compute_optimal(
        base, base_name, budget, allocation, params_count=params_count, extra=extra
    )
    return point, planner.describe(base, point)


def plan_budget(
    budget: float,
    unit: str,
    preset: str | None,
    law: fit.ChinchillaLaw | None = None,
    params_count: str = "total",
    predict=compiled,
) -> dict:
    """Rounds of (MFU → FLOP budget → point → its predicted MFU and device-hours) until the point's predicted
    device-hours are within BUDGET_TOLERANCE of the budget, else the closest of MAX_ROUNDS rounds (`chosen`).

    predict(cfg) → a dry-run report with `prediction` (default: compile cfg on its preset and predict)."""
    if not (np.isfinite(budget) and budget > 0):
        raise config.ConfigError(f"--budget must be finite and > 0, got {budget!r}")
    if unit == "device_hours" and not preset:
        raise config.ConfigError("--unit=device_hours needs --mesh=PRESET (its device's peak and the model)")
    peak = mesh.preset(preset).device.peak_flops if preset else None
    if unit == "device_hours" and not peak:
        raise config.ConfigError(f"the device table has no peak FLOP/s for {mesh.preset(preset).device.name}")
    allocation = law.optimal_params() if law else planner.TOKENS_PER_PARAM
    mfu, rounds = MFU_GUESS, []
    for _ in range(MAX_ROUNDS if unit == "device_hours" else 1):
        flop_budget = budget * 3600 * peak * mfu if unit == "device_hours" else budget
        point, described = plan_point(flop_budget, allocation, params_count, preset)
        report = predict(planner.configure(configs.get(point.base), point.overrides)) if preset else {}
        prediction = report.get("prediction", {})
        spent = (
            prediction["device_hours"] / budget if unit == "device_hours" and "mfu" in prediction else None
        )
        rounds.append(
            {
                "mfu_assumed": mfu if unit == "device_hours" else None,
                "flop_budget": flop_budget,
                "point": point,
                "planned": described,
                "prediction": prediction,
                "fits": report.get("fits"),
                "spent": spent,
            }
        )
        if spent is None or abs(spent - 1) <= BUDGET_TOLERANCE:
            break
        mfu = prediction["mfu"]
    if unit == "flops" or rounds[-1]["spent"] is None:
        return {"rounds": rounds, "chosen": len(rounds) - 1, "converged": unit == "flops"}
    chosen = min(range(len(rounds)), key=lambda i: abs(rounds[i]["spent"] - 1))
    return {
        "rounds": rounds,
        "chosen": chosen,
        "converged": abs(rounds[chosen]["spent"] - 1) <= BUDGET_TOLERANCE,
    }


def budget_plan() -> None:
    """--budget: the rounds as a table, the final point, and one JSON line last."""
    law, summary = load_law(_LAW.value) if _LAW.value else (None, {})
    params_count = (summary.get("counting") or {}).get("params") or "total"
    result = plan_budget(_BUDGET.value, _UNIT.value, _MESH.value, law, params_count)
    rounds = result["rounds"]
    print(
        f"{'round':>5s} {'MFU used':>8s} {'FLOP budget':>11s} {'d_model':>7s} {'layers':>6s} {'params':>14s} "
        f"{'tokens':>16s} {'tok/param':>9s} {'step s':>7s} {'MFU pred.':>9s}  bound"
    )
    for i, r in enumerate(rounds, 1):
        d, p = r["planned"], r["prediction"]
        used = f"{100 * r['mfu_assumed']:.1f}%" if r["mfu_assumed"] else "-"
        predicted = (
            f"{p['step_seconds']:>7.3g} {100 * p['mfu']:>8.1f}%  {p['bound_detail']}"
            if "mfu" in p
            else f"{'-':>7s} {'-':>9s}  {p.get('unavailable', 'no --mesh: not predicted')}"
        )
        print(
            f"{i:>5d} {used:>8s} {r['flop_budget']:>11.3e} {d['d_model']:>7d} {d['n_layers']:>6d} "
            f"{d['params']:>14,} {d['tokens']:>16,} {d['tokens_per_param']:>9.2f} {predicted}"
        )
    final = rounds[result["chosen"]]
    planned, prediction = final["planned"], final["prediction"]
    out = {
        "budget": _BUDGET.value,
        "unit": _UNIT.value,
        "mesh": _MESH.value,
        "law": _LAW.value or f"{planner.TOKENS_PER_PARAM:g} tokens per parameter",
        "converged": result["converged"],
        "rounds": len(rounds),
        "chosen_round": result["chosen"] + 1,
        "fits": final["fits"],
        "predicted_over_budget": final["spent"],
        "flop_budget": final["flop_budget"],
        "run_args": final["point"].run_args(),
        **{
            k: planned[k]
            for k in (
                "d_model",
                "n_layers",
                "n_heads",
                "params",
                "non_embedding_params",
                "tokens",
                "tokens_per_param",
                "train_flops",
                "steps",
            )
        },
        "prediction": {
            k: v for k, v in prediction.items() if k not in ("assumptions", "memory_bytes_per_device")
        },
    }
    if law:
        n = planned["params"] if params_count == "total" else planned["non_embedding_params"]
        interval, method = loss_interval(summary, n, planned["tokens"])
        out["loss"] = {
            "predicted": float(law.loss(n, planned["tokens"])),
            "interval": interval,
            "interval_method": method,
            "params_counted": params_count,
        }
    print(f"point: python -m experiments.run {' '.join(out['run_args'])}")
    if "days" in prediction:
        print(
            f"predicted on {_MESH.value}: {prediction['days']:.3g} days, "
            f"{dry_run.hours(prediction['device_hours'])} device-hours, MFU {100 * prediction['mfu']:.1f}%"
            f"{'' if result['converged'] else f' (not within {BUDGET_TOLERANCE:.0%} of the budget)'}"
            f"{'' if final['fits'] else '; it does not fit the device memory (see experiments.run --dry_run)'}"
        )
    if "loss" in out:
        interval = out["loss"]["interval"]
        band = f" ({interval[0]:.3f}–{interval[1]:.3f}: {out['loss']['interval_method']})" if interval else ""
        print(f"predicted loss L(N, D) = {out['loss']['predicted']:.3f}{band}")
    print(json.dumps(out))


def main(argv):
    del argv
    if _BUDGET.value is not None:
        budget_plan()
    elif _MESH.value:
        mesh_table(_POINTS.value or [f"chinchilla_{size}" for size in cerebras_gpt.FAMILY], _MESH.value)
    elif _PODS.value:
        pods_table(_POINTS.value or cerebras_gpt.POINTS)
    else:
        family_table(_POINTS.value or configs.names())


def cli():
    """Entry point: one-line errors (experiments.cli)."""
    cli_lib.run(main, (config.ConfigError, planner.PlanError))


if __name__ == "__main__":
    cli()
