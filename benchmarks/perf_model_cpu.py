"""The CPU performance model against measured train steps: predicted and measured step time per shape.

    python -m benchmarks.perf_model_cpu [--shapes=a,b,...] [--steps=7] [--rounds=3] [--bandwidth_mib=256]
                                        [--peak_size=2048]

A round measures this machine's fp32 matmul peak (on a --peak_size square) and its memory bandwidth into fresh and
into reused buffers (over a --bandwidth_mib buffer; chinchax.parallel.hardware), then for each shape compiles the
train step as the trainer does (one device, the step jitted with its shardings and the state donated; batch 16,
fp32, layers unrolled; run, like experiments.run, under chinchax.malloc's kept-memory allocator), predicts its time
from the compiled HLO with chinchax.parallel.perf_model's kernel-by-kernel roofline (`predict_kernels`: per kernel
max(its matmuls' time, bytes / bandwidth), a loop body's later iterations at the reused-buffer bandwidth; each
distinct matmul of the HLO, by operand dims and dimension numbers, timed once by itself with
hardware.measure_dot_seconds), and times the step: the median of --steps timed steps after two warm-up steps. The
shapes vary width (64–256), depth (1–6), vocabulary (257 bytes vs 50,304 GPT-2 ids), microbatches (1, 2), sequence
length (128, 256) and attention ('xla': whole score matrix; 'auto': blockwise on CPU). Each round runs in a fresh
process, since on a shared machine a process's figures drift together by ±15% (bandwidth, matmuls and steps alike),
and the figures that count are the medians over rounds of the predicted and of the measured seconds.

Each round prints its table: the predicted and measured seconds, the error (predicted / measured − 1), what
bounds the prediction and its two terms; then the table of medians with each round's error, and the median
|error|; last on stdout, one JSON object: {"peak_gflops", "fresh_bandwidth_gbps", "reused_bandwidth_gbps" (the
rounds' medians), "median_abs_error", "within_25_percent", "shapes": {name: {"predicted_s", "measured_s",
"error", ...}}, "rounds": [each round's own object]}.
"""

from chinchax import malloc

if __name__ == "__main__":  # before the heavy imports: glibc reads its tunables at process start
    malloc.keep_freed_memory()

import json
import statistics
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks import timing
from chinchax.model import flops
from chinchax.parallel import hardware, perf_model
from chinchax.parallel import mesh as mesh_lib
from chinchax.scaling import plan
from chinchax.training import train
from experiments import configs

BATCH = 16
SHAPES = {  # name: (d_model, n_layers, n_heads, tokenizer, microbatches, seq_len, attention)
    "a": (64, 2, 4, "bytes", 1, 256, "xla"),
    "b": (128, 4, 4, "bytes", 1, 256, "xla"),
    "c": (256, 6, 8, "bytes", 1, 256, "xla"),
    "d": (128, 1, 4, "gpt2", 1, 256, "xla"),
    "e": (128, 4, 4, "bytes", 2, 256, "xla"),
    "f": (256, 2, 8, "bytes", 1, 128, "xla"),
    "g": (64, 6, 4, "gpt2", 2, 256, "xla"),
    "h": (128, 4, 4, "bytes", 1, 256, "auto"),
    "i": (256, 6, 8, "bytes", 2, 256, "auto"),
}
VOCAB = {"bytes": 257, "gpt2": 50304}

_SHAPES = flags.DEFINE_list("shapes", list(SHAPES), f"Shapes to measure, from {', '.join(SHAPES)}.")
_STEPS = flags.DEFINE_integer("steps", 7, "Timed steps per shape (the median counts).")
_ROUNDS = flags.DEFINE_integer(
    "rounds", 3, "Rounds, each in a fresh process (the median of their figures counts)."
)
_BANDWIDTH_MIB = flags.DEFINE_integer(
    "bandwidth_mib", 256, "Memory-bandwidth buffer, MiB (default: far above CPU caches).", lower_bound=1
)
_PEAK_SIZE = flags.DEFINE_integer(
    "peak_size", 2048, "Side of the square matmul the peak is measured on.", lower_bound=1
)


def shape_config(d_model, n_layers, n_heads, tokenizer, microbatches, seq_len, attention):
    """cpu_tiny with the shape's overrides, batch 16, fp32."""
    return plan.configure(
        configs.get("cpu_tiny"),
        {
            "model.d_model": d_model,
            "model.n_layers": n_layers,
            "model.n_heads": n_heads,
            "model.vocab_size": VOCAB[tokenizer],
            "model.max_positions": seq_len,
            "model.attention": attention,
            "data.tokenizer": tokenizer,
            "data.seq_len": seq_len,
            "train.batch_size": BATCH,
            "train.microbatches": microbatches,
        }.items(),
    )


def compiled_step(cfg):
    """(the compiled train step, its initial state, a batch of random tokens), built as the trainer builds them."""
    mesh = mesh_lib.make_mesh(cfg.mesh)
    schedule = train.run_schedule(cfg)

    def init(c, rng):
        return train.init_state(c, rng, schedule)

    rng = jax.random.key(0)
    target = mesh_lib.sharded_shapes(cfg, mesh, jax.eval_shape(lambda: init(cfg, rng)))
    step = mesh_lib.jit_train_step(cfg, mesh, train.make_train_step(cfg, schedule), target)
    state = mesh_lib.init_sharded_state(cfg, mesh, init, rng, target)
    microbatches = cfg.train.microbatches
    ids = np.random.default_rng(0).integers(
        0, cfg.model.vocab_size, (microbatches, BATCH // microbatches, cfg.data.seq_len + 1)
    )
    ids = jnp.asarray(ids, jnp.int32)
    batch = {"inputs": ids[..., :-1], "targets": ids[..., 1:]}
    return step.lower(state, batch).compile(), state, batch


def one_round(shapes, steps, bandwidth_mib, peak_size):
    """Measure this machine, then predict and time each shape, printing a row as each is done: the round's
    figures, the module docstring's JSON object but for the median error and the rounds."""
    peak = hardware.measure_matmul_peak(peak_size)
    elements = bandwidth_mib * 2**20 // 4
    fresh = hardware.measure_memory_bandwidth(elements)
    reused = hardware.measure_memory_bandwidth(elements, reuse=True)
    dot_seconds = perf_model.dot_timer()  # one timer for every shape: each distinct matmul timed once
    print(
        f"{jax.devices()[0].device_kind}: fp32 matmul peak {peak / 1e9:.1f} GFLOP/s, memory bandwidth "
        f"{fresh / 1e9:.2f} GB/s into fresh buffers, {reused / 1e9:.2f} GB/s into reused ones (measured in this "
        f"run); batch {BATCH}, fp32"
    )
    print(
        f"{'shape':42s} {'predicted s':>11s} {'measured s':>10s} {'error':>7s} {'bound':>7s} "
        f"{'compute s':>9s} {'memory s':>8s}"
    )
    results = {}
    for name in shapes:
        cfg = shape_config(*SHAPES[name])
        compiled, state, batch = compiled_step(cfg)
        step_tokens = BATCH * cfg.data.seq_len
        model_flops = flops.flops_per_token(cfg.model, cfg.data.seq_len) * step_tokens
        got = perf_model.predict_kernels(
            perf_model.hlo_kernels(compiled.as_text()),
            dot_seconds,
            fresh,
            reused,
            peak,
            step_tokens,
            model_flops,
        )
        carried = [state]

        def run(compiled=compiled, carried=carried, batch=batch):
            carried[0], metrics = compiled(carried[0], batch)
            jax.block_until_ready(metrics)

        measured = timing.median_step_seconds(run, steps)
        error = got.seconds / measured - 1
        results[name] = {
            **described(name),
            "predicted_s": round(got.seconds, 5),
            "measured_s": round(measured, 5),
            "error": round(error, 4),
            "bound": got.bound,
            "compute_s": round(got.compute_seconds, 5),
            "memory_s": round(got.memory_seconds, 5),
        }
        print(
            f"{label(name):42s} {got.seconds:11.4f} {measured:10.4f} {error:+7.1%} {got.bound:>7s} "
            f"{got.compute_seconds:9.4f} {got.memory_seconds:8.4f}",
            flush=True,
        )
    return {
        "peak_gflops": round(peak / 1e9, 1),
        "fresh_bandwidth_gbps": round(fresh / 1e9, 2),
        "reused_bandwidth_gbps": round(reused / 1e9, 2),
        "shapes": results,
    }


def described(name):
    """A shape's settings by name, as the JSON gives them."""
    d, layers, heads, tokenizer, microbatches, seq, attention = SHAPES[name]
    return {
        "d_model": d,
        "n_layers": layers,
        "n_heads": heads,
        "vocab_size": VOCAB[tokenizer],
        "microbatches": microbatches,
        "seq_len": seq,
        "attention": attention,
    }


def label(name):
    """'b: d128 L4 h4 V257 mb1 S256 xla'."""
    d, layers, heads, tokenizer, microbatches, seq, attention = SHAPES[name]
    return f"{name}: d{d} L{layers} h{heads} V{VOCAB[tokenizer]} mb{microbatches} S{seq} {attention}"


def rounds_in_fresh_processes(shapes, steps, rounds, bandwidth_mib, peak_size):
    """Each round's JSON object, every round run by a fresh process of this module (its table passed through)."""
    command = [sys.executable, "-m", "benchmarks.perf_model_cpu", "--rounds=1", f"--steps={steps}"]
    command += [
        f"--shapes={','.join(shapes)}",
        f"--bandwidth_mib={bandwidth_mib}",
        f"--peak_size={peak_size}",
    ]
    results = []
    for number in range(rounds):
        print(f"round {number + 1} of {rounds}, in a fresh process:", flush=True)
        out = subprocess.run(command, capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(
                f"error: round {number + 1} failed (exit {out.returncode}): {out.stderr[-2000:]}"
            )
        *table, last = out.stdout.strip().splitlines()
        print("\n".join(table), flush=True)
        results.append(json.loads(last))
    return results


def medians(rounds):
    """The rounds' figures as one round's object: per shape the median predicted and measured seconds and the
    error between them (each round's error beside it in the printed table), the machine's medians."""
    print(f"median of {len(rounds)} rounds")
    print(f"{'shape':42s} {'predicted s':>11s} {'measured s':>10s} {'error':>7s}   errors by round")
    shapes = {}
    for name in rounds[0]["shapes"]:
        per_round = [r["shapes"][name] for r in rounds]
        predicted = round(statistics.median(r["predicted_s"] for r in per_round), 5)
        measured = round(statistics.median(r["measured_s"] for r in per_round), 5)
        error = predicted / measured - 1
        shapes[name] = {
            **described(name),
            "predicted_s": predicted,
            "measured_s": measured,
            "error": round(error, 4),
        }
        by_round = " ".join(f"{r['error']:+.1%}" for r in per_round)
        print(f"{label(name):42s} {predicted:11.4f} {measured:10.4f} {error:+7.1%}   {by_round}")
    machine = ("peak_gflops", "fresh_bandwidth_gbps", "reused_bandwidth_gbps")
    return {key: round(statistics.median(r[key] for r in rounds), 2) for key in machine} | {"shapes": shapes}


def main(argv):
    del argv
    timing.check_shapes(_SHAPES.value, SHAPES)
    if _ROUNDS.value == 1:
        summary = one_round(_SHAPES.value, _STEPS.value, _BANDWIDTH_MIB.value, _PEAK_SIZE.value)
    else:
        rounds = rounds_in_fresh_processes(
            _SHAPES.value, _STEPS.value, _ROUNDS.value, _BANDWIDTH_MIB.value, _PEAK_SIZE.value
        )
        summary = medians(rounds) | {"rounds": rounds}
    errors = [abs(r["error"]) for r in summary["shapes"].values()]
    summary["median_abs_error"] = round(statistics.median(errors), 4)
    summary["within_25_percent"] = all(e <= 0.25 for e in errors)
    print(
        f"median |error| {summary['median_abs_error']:.1%}; every shape within ±25%: "
        f"{'yes' if summary['within_25_percent'] else 'no'}"
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    app.run(main)
