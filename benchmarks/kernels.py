"""Kernel benchmark: flash attention forward+backward against jax.nn.dot_product_attention (xla, cudnn).

    python -m benchmarks.kernels [--seq_lens 512,1024,2048,4096,8192] [--head_dims 64,80,128]
                                 [--tokens 16384] [--heads 16] [--out runs/bench_kernels]

On a GPU (or TPU) it checks the kernel against XLA once, then times causal bf16 forward+backward per
(sequence length, head dim) at a fixed token count per step (batch = tokens / seq_len), and reports TFLOP/s and
the fraction of the device's dense bf16 peak; it prints a table and writes kernels.json and kernels.png to --out.
FLOPs follow the FlashAttention convention: forward 4·B·H·S²·D halved for causal masking, backward 2.5× forward.

On CPU there is nothing to time: it only checks correctness in Pallas interpret mode, and says so.
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


def peak_flops(device_kind: str) -> float | None:
    """Dense bf16 peak of the device from chinchax's device table (None when the table does not know it)."""
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
    q, k, v, d_out = random_qkv(0, 2, 1000, 4, 80, jnp.bfloat16)
    ours = forward_backward(fns["chinchax_kernels"])(q, k, v, d_out)
    xla = forward_backward(fns["xla"])(q, k, v, d_out)
    errors = {name: relative_error(a, b) for name, a, b in zip(("dq", "dk", "dv"), ours, xla, strict=True)}
    print(f"check vs xla (bf16, seq 1000, d 80, fwd+bwd): relative errors {errors}")
    if max(errors.values()) > 1e-2:
        raise SystemExit("flash_attention disagrees with XLA beyond bf16 tolerance; not timing it")


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
        except (
            Exception
        ) as error:  # an implementation may not support a shape (cudnn) or run out of memory (xla)
            row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
        else:
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
        if "error" in row:
            print(f"{row['seq']:>6} {row['head_dim']:>4} {row['impl']:>17}  n/a: {row['error']}")
            continue
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
                (r["seq"], r["tflops"])
                for r in rows
                if r["impl"] == impl and r["head_dim"] == head_dim and "tflops" in r
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


def check_correctness_in_interpret_mode() -> bool:
    """Small fp32 shapes, forward and gradients against the plain-jnp reference; True when all are within 1e-5."""
    print("No GPU/TPU: checking correctness only, Pallas in interpret mode on CPU (no timings).")
    worst = []
    cases = [(40, 64, True, None), (33, 80, False, None), (50, 128, True, 1 / 128)]
    for seq, head_dim, causal, scale in tqdm(cases, desc="attention (interpret)"):
        errors = attention_errors(seq, head_dim, causal, scale)
        worst.append(max(errors))
        print(
            f"  flash_attention seq {seq} d {head_dim} causal={causal}: relative errors out/dq/dk/dv {errors}"
        )
    errors = cross_entropy_errors(300, 1000, 64)
    worst.append(max(errors))
    print(f"  softmax_cross_entropy 300 tokens x 1000 vocab: relative errors loss/dh/dw {errors}")
    ok = max(worst) <= 1e-5
    print("all within fp32 tolerance (1e-5)" if ok else "FAILED: some error above 1e-5")
    return ok


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
    args = parser.parse_args(argv)
    for name in ("seq_lens", "head_dims"):
        if min(getattr(args, name)) < 1:
            parser.error(f"--{name} must be positive")
    return args


def main(argv=None):
    args = parse_args(argv)
    backend = jax.default_backend()
    if backend not in ("gpu", "tpu"):
        raise SystemExit(0 if check_correctness_in_interpret_mode() else 1)
    rows = benchmark(args, backend)
    write_results(rows, args.out, jax.devices()[0].device_kind)


if __name__ == "__main__":
    main()
