"""Our predicted step time beside measured ones published for the same model shapes on the same GPUs.

    python -m benchmarks.published_runs [--rows=1.7,3.6,7.5,18.4]

The published runs are Megatron-LM's on A100s (benchmarks/reference/megatron_a100_runs.csv, whose README gives the
source): GPT models of sequence 2,048 and vocabulary 51,200. For each row without pipeline parallelism (which
chinchax does not have) this builds the chinchax model of the same shape (GPT-3 style: 4h MLP, learned
positions, tied embedding), the row's global batch, bf16 with full rematerialisation (Megatron recomputes
activations) and whole-score attention (as in those runs), on as many A100 80 GB as the row (preset
gpu-a100-8xN) with the row's tensor-parallel size and FSDP over the rest of a node, data parallel across nodes.
It compiles the step on a virtual mesh of that size (the dry run) and predicts its time with
chinchax.parallel.perf_model. Megatron's measured step is its FLOPs per iteration (the paper's Eq. 3) over its
GPUs' achieved FLOP/s. The table gives both steps, their ratio, both tokens/s per GPU, and what bounds our
prediction; last on stdout, one JSON object {"rows": {params: {...}}}.
"""

from chinchax import malloc

if __name__ == "__main__":  # before the heavy imports: glibc reads its tunables at process start
    malloc.keep_freed_memory()

import csv
import json
import os
import pathlib

# virtual devices for the largest run without pipeline parallelism (256 GPUs); each row compiles on its first N
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=256")

from absl import app, flags

from chinchax import config
from experiments import plan as plan_cli

RUNS = pathlib.Path(__file__).parent / "reference" / "megatron_a100_runs.csv"
SEQ, VOCAB = 2048, 51200

_ROWS = flags.DEFINE_list(
    "rows", ["1.7", "3.6", "7.5", "18.4"], "Published runs (params_billion) to compare."
)


def published_runs() -> dict[str, dict]:
    """The CSV's rows by params_billion, numbers as numbers."""
    with RUNS.open() as f:
        return {row["params_billion"]: {k: float(v) for k, v in row.items()} for row in csv.DictReader(f)}


def megatron_step_seconds(run: dict) -> float:
    """Seconds per iteration: Eq. 3's FLOPs over the GPUs' achieved FLOP/s."""
    batch, layers, hidden = run["batch"], run["layers"], run["hidden"]
    flops = 96 * batch * SEQ * layers * hidden**2 * (1 + SEQ / (6 * hidden) + VOCAB / (16 * layers * hidden))
    return flops / (run["gpus"] * run["teraflops_per_gpu"] * 1e12)


def run_config(run: dict):
    """The chinchax config of a published run: its shape, batch and parallelism on A100s."""
    if run["pipeline_parallel"] != 1:
        raise ValueError(
            f"the {run['params_billion']:g}B run uses pipeline parallelism, which chinchax has not"
        )
    cfg = config.base_config()
    cfg.name = f"megatron_{run['params_billion']:g}b"
    cfg.model.update(
        vocab_size=VOCAB,
        max_positions=SEQ,
        d_model=int(run["hidden"]),
        n_layers=int(run["layers"]),
        n_heads=int(run["heads"]),
        compute_dtype="bfloat16",
        remat="full",
        attention="xla",
    )
    cfg.data.update(tokenizer="gpt2", seq_len=SEQ)
    gpus, tensor = int(run["gpus"]), int(run["tensor_parallel"])
    cfg.train.update(
        batch_size=int(run["batch"]), tokens=int(run["batch"]) * SEQ * 1000, microbatches=config.AUTO
    )
    cfg.mesh.update(preset=f"gpu-a100-8x{gpus // 8}", tensor=tensor, fsdp=8 // tensor)
    return config.validate(cfg)


def main(argv):
    del argv
    runs = published_runs()
    unknown = sorted(set(_ROWS.value) - set(runs))
    if unknown:
        raise app.UsageError(f"--rows: no published run {', '.join(unknown)}; known: {', '.join(runs)}")
    print(
        f"{'run':>6s} {'GPUs':>5s} {'TP':>3s} {'batch':>5s} {'Megatron s':>10s} {'ours s':>8s} {'ours/theirs':>11s} "
        f"{'their tok/s/GPU':>15s} {'our tok/s/GPU':>13s}  bound (ours)"
    )
    results = {}
    for name in _ROWS.value:
        run = runs[name]
        cfg = run_config(run)
        prediction = plan_cli.compiled(cfg)["prediction"]
        theirs, ours = megatron_step_seconds(run), prediction["step_seconds"]
        per_gpu = run["batch"] * SEQ / run["gpus"]
        results[name] = {
            "gpus": int(run["gpus"]),
            "tensor_parallel": int(run["tensor_parallel"]),
            "batch": int(run["batch"]),
            "megatron_step_s": round(theirs, 3),
            "predicted_step_s": round(ours, 3),
            "ratio": round(ours / theirs, 3),
            "megatron_tokens_per_s_per_gpu": round(per_gpu / theirs),
            "predicted_tokens_per_s_per_gpu": round(per_gpu / ours),
            "bound": prediction["bound_detail"],
        }
        r = results[name]
        print(
            f"{name + 'B':>6s} {r['gpus']:>5d} {r['tensor_parallel']:>3d} {r['batch']:>5d} {theirs:>10.2f} "
            f"{ours:>8.2f} {r['ratio']:>10.2f}x {r['megatron_tokens_per_s_per_gpu']:>15,} "
            f"{r['predicted_tokens_per_s_per_gpu']:>13,}  {r['bound']}",
            flush=True,
        )
    print(json.dumps({"source": str(RUNS.relative_to(RUNS.parents[2])), "rows": results}))


if __name__ == "__main__":
    app.run(main)
