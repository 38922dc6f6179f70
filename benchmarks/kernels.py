"""Kernel benchmark: flash attention forward+backward against jax.nn.dot_product_attention (xla, cudnn).

    python -m benchmarks.kernels [--seq_lens 512,1024,2048,4096,8192] [--head_dims 64,80,128]
                                 [--tokens 16384] [--heads 16] [--out runs/bench_kernels] [--cpu_cases 3]

On a GPU (or TPU) it checks the kernel against XLA once, then times causal bf16 forward+backward per
(sequence length, head dim) at a fixed token count per step (batch = tokens / seq_len), and reports TFLOP/s and
the fraction of the device's dense bf16 peak; it prints a table and writes kernels.json and kernels.png to --out.
FLOPs follow the FlashAttention convention: forward 4·B·H·S²·D halved for causal masking, backward 2.5× forward.

On CPU there is nothing to time: it only checks correctness in Pallas interpret mode (the first --cpu_cases of its
three attention cases, then the fused loss), and says so.

A kernel that fails (raises, or disagrees with its reference beyond tolerance) ends the benchmark with exit
status 1 and one line on stderr naming the kernel and the shape; no row is quietly left out. An implementation
that does not support a shape (cudnn at some head dims) fails it too: leave such shapes out with --seq_lens /
--head_dims. The peak is the device's entry in chinchax.parallel.hardware (the one device table).
"""

import argparse
import json
import os
import pathlib
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from chinchax_kernels import BlockSizes, flash_attention, reference, softmax_cross_entropy
from tqdm import tqdm

from chinchax.parallel import hardware

FP32_TOLERANCE = 1e-5  # relative error of the interpreted kernels against the reference (fp32)
BF16_TOLERANCE = 1e-2  # relative error of the compiled kernel against XLA's attention (bf16)


class KernelFailure(SystemExit):
    """Exit status 1 with one line: which kernel failed, at which shape, and how."""

    def __init__(self, kernel: str, shape: str, reason: str):
        super().__init__(f"error: {kernel} failed at {shape}: {reason}")


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:200] if text else '(no message)'}"


def peak_flops(device_kind: str) -> float | None:
    """Dense bf16 peak of the device from chinchax.parallel.hardware's table (None when it does not know it)."""
    device = hardware.by_kind(device_kind)
    return device.peak_flops if device else None


def attention_flops(batch, seq, heads, head_dim, causal=True) -> float:
    """Forward + backward FLOPs: 4·B·H·S²·D forward (halved when causal), backward 2.5× forward."""
    forward = 4 * batch * heads * seq * seq * head_dim / (2 if causal else 1)
    return 3.5 * forward


def relative_error(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def attention_fns(backend: str) -> dict:
    """name → attention(q, k, v), all causal with the default 1/sqrt(d) scale."""
    fns = {
        "chinchax_kernels": lambda q, k, v: flash_attention(q, k, v, causal=True),
        "xla": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla"),
    }
    if backend == "gpu":
        fns["cudnn"] = lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation="cudnn"
        )
    return fns


def forward_backward(attention):
    """jit'd (q, k, v, d_out) → (dq, dk, dv): one forward and one backward pass."""

    def step(q, k, v, d_out):
        _, vjp = jax.vjp(attention, q, k, v)
        return vjp(d_out)

    return jax.jit(step)


def random_qkv(seed, batch, seq, heads, head_dim, dtype):
    keys = jax.random.split(jax.random.key(seed), 4)
    return [jax.random.normal(key, (batch, seq, heads, head_dim), dtype) for key in keys]


def time_seconds(fn, args, repeats: int) -> float:
    """Median wall time of fn(*args) after one compile-and-warm-up call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def check_against_xla(backend: str):
    """One bf16 forward+backward comparison with XLA's attention before any timing (relative error ≤ 1e-2)."""
    fns = attention_fns(backend)
    shape = "batch 2, seq 1000, heads 4, head_dim 80 (bf16, causal, fwd+bwd)"
    q, k, v, d_out = random_qkv(0, 2, 1000, 4, 80, jnp.bfloat16)
    try:
        ours = forward_backward(fns["chinchax_kernels"])(q, k, v, d_out)
    except Exception as error:
        raise KernelFailure("flash_attention", shape, first_line(error)) from error
    xla = forward_backward(fns["xla"])(q, k, v, d_out)
    errors = {name: relative_error(a, b) for name, a, b in zip(("dq", "dk", "dv"), ours, xla, strict=True)}
    print(f"check vs xla ({shape}): relative errors {errors}")
    if not max(errors.values()) <= BF16_TOLERANCE:  # NaN fails too
        raise KernelFailure(
            "flash_attention", shape, f"relative errors vs XLA {errors} above {BF16_TOLERANCE}; not timing it"
        )


def benchmark(args, backend: str) -> list[dict]:
    device = jax.devices()[0]
    peak = peak_flops(device.device_kind)
    check_against_xla(backend)
    fns = attention_fns(backend)
    grid = [(d, s, name) for d in args.head_dims for s in args.seq_lens for name in fns]
    rows = []
    for head_dim, seq, name in tqdm(grid, desc="attention fwd+bwd"):
        batch = max(1, args.tokens // seq)
        row = {"impl": name, "seq": seq, "head_dim": head_dim, "batch": batch, "heads": args.heads}
        try:
            inputs = random_qkv(seq + head_dim, batch, seq, args.heads, head_dim, jnp.bfloat16)
            seconds = time_seconds(forward_backward(fns[name]), inputs, args.repeats)
        except Exception as error:  # unsupported shape, out of memory, a compile error: the run fails
            shape = (
                f"batch {batch}, seq {seq}, heads {args.heads}, head_dim {head_dim} (bf16, causal, fwd+bwd)"
            )
            raise KernelFailure(f"{name} attention", shape, first_line(error)) from error
        flops = attention_flops(batch, seq, args.heads, head_dim)
        row |= {"ms": 1e3 * seconds, "tflops": flops / seconds / 1e12}
        row["fraction_of_peak"] = flops / seconds / peak if peak else None
        rows.append(row)
    print_table(rows, device.device_kind, peak)
    return rows


def print_table(rows, device_kind, peak):
    peak_text = f"{peak / 1e12:.0f} TFLOP/s bf16 dense" if peak else "unknown peak"
    print(f"\ncausal bf16 attention, forward+backward on {device_kind} ({peak_text})")
    print(f"{'seq':>6} {'d':>4} {'impl':>17} {'ms':>9} {'TFLOP/s':>8} {'of peak':>8}")
    for row in rows:
        fraction = f"{100 * row['fraction_of_peak']:.1f}%" if row["fraction_of_peak"] is not None else "n/a"
        print(
            f"{row['seq']:>6} {row['head_dim']:>4} {row['impl']:>17} {row['ms']:>9.2f} {row['tflops']:>8.1f} {fraction:>8}"
        )


def write_results(rows, out: pathlib.Path, device_kind: str):
    """kernels.json and kernels.png (TFLOP/s against sequence length, one panel per head dim), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=out, suffix=".json", delete=False) as tmp:
        json.dump({"device": device_kind, "rows": rows}, tmp, indent=1)
    os.chmod(tmp.name, 0o644)
    os.replace(tmp.name, out / "kernels.json")

    head_dims = sorted({row["head_dim"] for row in rows})
    fig, axes = plt.subplots(
        1, len(head_dims), figsize=(4.5 * len(head_dims), 3.6), sharey=True, squeeze=False
    )
    for ax, head_dim in zip(axes[0], head_dims, strict=True):
        for impl in dict.fromkeys(row["impl"] for row in rows):
            points = [
                (r["seq"], r["tflops"]) for r in rows if r["impl"] == impl and r["head_dim"] == head_dim
            ]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=impl)
        ax.set(xlabel="sequence length", title=f"head dim {head_dim}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["seq"] for r in rows if r["head_dim"] == head_dim}))
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    axes[0][0].set_ylabel("TFLOP/s (causal fwd+bwd)")
    axes[0][-1].legend()
    fig.suptitle(device_kind)
    fig.tight_layout()
    tmp_png = out / ".kernels.png.tmp"
    fig.savefig(tmp_png, format="png", dpi=120)
    os.replace(tmp_png, out / "kernels.png")
    print(f"wrote {out / 'kernels.json'} and {out / 'kernels.png'}")


def attention_errors(seq, head_dim, causal, scale) -> list[float]:
    """fp32 relative errors of the kernel's (out, dq, dk, dv) against the reference, Pallas interpreted."""
    blocks = BlockSizes(q=16, k=16, q_backward=16, k_backward=16)  # several blocks at toy lengths
    q, k, v, d_out = random_qkv(seq, 1, seq, 2, head_dim, jnp.float32)

    def with_output(attention):
        out, vjp = jax.vjp(attention, q, k, v)
        return (out, *vjp(d_out))

    ours = with_output(lambda *a: flash_attention(*a, causal=causal, scale=scale, block_sizes=blocks))
    expected = with_output(lambda *a: reference.attention(*a, causal=causal, scale=scale))
    return [relative_error(a, b) for a, b in zip(ours, expected, strict=True)]


def cross_entropy_errors(tokens, vocab, d) -> list[float]:
    """fp32 relative errors of the fused loss's (loss, d hidden, d weight) against the reference (ragged chunks)."""
    hidden = jax.random.normal(jax.random.key(0), (tokens, d))
    weight = 0.1 * jax.random.normal(jax.random.key(1), (vocab, d))
    targets = jax.random.randint(jax.random.key(2), (tokens,), 0, vocab)

    def with_loss(loss_fn):
        loss, vjp = jax.vjp(lambda h, w: loss_fn(h, w, targets), hidden, weight)
        return (loss, *vjp(jnp.ones_like(loss)))

    ours = with_loss(lambda *a: softmax_cross_entropy(*a, token_chunk=128, vocab_chunk=384))
    expected = with_loss(reference.softmax_cross_entropy)
    return [relative_error(a, b) for a, b in zip(ours, expected, strict=True)]


def check_correctness_in_interpret_mode(attention_cases: int = 3) -> None:
    """Small fp32 shapes, forward and gradients against the plain-jnp reference, Pallas interpreted; a kernel that
    raises or misses FP32_TOLERANCE ends the run (KernelFailure: exit 1, one line naming it and the shape). Checks
    the first `attention_cases` attention cases."""
    print("No GPU/TPU: checking correctness only, Pallas in interpret mode on CPU (no timings).")
    cases = [(40, 64, True, None), (33, 80, False, None), (50, 128, True, 1 / 128)]
    for seq, head_dim, causal, scale in tqdm(cases[:attention_cases], desc="attention (interpret)"):
        shape = f"batch 1, seq {seq}, heads 2, head_dim {head_dim}, causal={causal}, scale={scale} (fp32)"
        try:
            errors = attention_errors(seq, head_dim, causal, scale)
        except Exception as error:
            raise KernelFailure("flash_attention", shape, first_line(error)) from error
        print(f"  flash_attention {shape}: relative errors out/dq/dk/dv {errors}")
        if not max(errors) <= FP32_TOLERANCE:  # NaN fails too
            raise KernelFailure(
                "flash_attention", shape, f"relative errors out/dq/dk/dv {errors} above {FP32_TOLERANCE}"
            )
    shape = "300 tokens, vocab 1000, d 64 (fp32, token_chunk 128, vocab_chunk 384)"
    try:
        errors = cross_entropy_errors(300, 1000, 64)
    except Exception as error:
        raise KernelFailure("softmax_cross_entropy", shape, first_line(error)) from error
    print(f"  softmax_cross_entropy {shape}: relative errors loss/dh/dw {errors}")
    if not max(errors) <= FP32_TOLERANCE:
        raise KernelFailure(
            "softmax_cross_entropy", shape, f"relative errors loss/dh/dw {errors} above {FP32_TOLERANCE}"
        )
    print(f"all within fp32 tolerance ({FP32_TOLERANCE})")


def parse_args(argv=None):
    ints = lambda text: [int(x) for x in text.split(",")]  # noqa: E731
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seq_lens", type=ints, default=[512, 1024, 2048, 4096, 8192])
    parser.add_argument("--head_dims", type=ints, default=[64, 80, 128])
    parser.add_argument(
        "--tokens", type=int, default=16384, help="batch × seq per step (batch = tokens / seq)"
    )
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per point (median)")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("runs/bench_kernels"))
    parser.add_argument("--cpu_cases", type=int, default=3, help="on CPU: attention cases to check (0-3)")
    args = parser.parse_args(argv)
    for name in ("seq_lens", "head_dims"):
        if min(getattr(args, name)) < 1:
            parser.error(f"--{name} must be positive")
    if not 0 <= args.cpu_cases <= 3:
        parser.error("--cpu_cases must be 0 to 3")
    return args


def main(argv=None):
    args = parse_args(argv)
    backend = jax.default_backend()
    if backend not in ("gpu", "tpu"):
        check_correctness_in_interpret_mode(args.cpu_cases)
        return
    rows = benchmark(args, backend)
    write_results(rows, args.out, jax.devices()[0].device_kind)


if __name__ == "__main__":
    main()
