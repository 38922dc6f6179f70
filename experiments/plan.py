"""The dry-run plan of many scale points in one table: `python -m experiments.plan [--points=a,b,...]`.

With no --points it plans the whole published family (SP, μP, the 40M proxy) and the CPU points on one device.
`--pods` instead plans every published point on its pods (cerebras_gpt.pods: 8×H100, a TPU slice, 16 CS-2s):
the chosen microbatches and remat, the analytic per-device memory and XLA's memory analysis of the real step
compiled against a virtual mesh of fake CPU devices, and whether it fits; `--write=BUILD.md` puts that table
between the file's `pod-table` markers.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=32")  # virtual meshes for --pods
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json  # noqa: E402
import pathlib  # noqa: E402
import time  # noqa: E402

from absl import app, flags  # noqa: E402
from tqdm import tqdm  # noqa: E402

from chinchax import atomic, config
from chinchax.dryrun import aot
from chinchax.dryrun import report as dry_run
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

COLUMNS = ("name", "params", "non_embedding_params", "tokens", "steps", "train_flops", "flops_per_token")
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


def main(argv):
    del argv
    if _PODS.value:
        pods_table(_POINTS.value or cerebras_gpt.POINTS)
    else:
        family_table(_POINTS.value or configs.names())


if __name__ == "__main__":
    app.run(main)
