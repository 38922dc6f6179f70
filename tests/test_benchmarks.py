"""Each benchmark's entry point, as a tiny run from the command line: the table it prints has its rows and
columns, its numbers are finite and positive, its ratios are the quotients of the figures beside them (within the
printed rounding), and its JSON parses and says what the table says. (benchmarks.published_runs has its own test.)"""

import json
import math
import os
import re
import subprocess
import sys

import pytest

from benchmarks import kernels
from chinchax import config
from chinchax.model import flops
from tests.conftest import REPO


def run_benchmark(module: str, *flags: str, env: dict | None = None) -> list[str]:
    """stdout's lines of `python -m benchmarks.<module> <flags>` from the repo root, on one CPU device."""
    environ = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{module}", *flags],
        cwd=REPO,
        env=environ | (env or {}),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()


def numbers(tree) -> list[float]:
    """Every int or float in a JSON tree (booleans aside)."""
    if isinstance(tree, dict):
        return [x for v in tree.values() for x in numbers(v)]
    if isinstance(tree, list):
        return [x for v in tree for x in numbers(v)]
    return [tree] if isinstance(tree, int | float) and not isinstance(tree, bool) else []


def assert_close(got: float, want: float, tolerance: float, what: str):
    assert abs(got - want) <= tolerance, f"{what}: {got} != {want} (± {tolerance})"


@pytest.mark.slow  # 20-29 s (torch's GPT-2 beside ours)
def test_train_throughput_prints_rates_whose_ratio_and_mfu_follow():
    """One shape cut to one layer, seq 16, batch 2, one timed step: a row whose tokens/s match the JSON, whose
    ratio is ours / HF, and whose MFU is tokens/s × the detailed FLOPs per token over the peak printed above it."""
    lines = run_benchmark(
        "train_throughput",
        "--shapes=c",
        "--steps=1",
        "--seq_len=16",
        "--batch_size=2",
        "--n_layers=1",
        "--peak_size=256",
        "--torch_threads=1",
    )
    result = json.loads(lines[-1])
    peak = re.fullmatch(
        r"seq 16, batch 2, fp32; JAX fp32 matmul peak measured in this run: ([\d.]+) GFLOP/s", lines[0]
    )
    assert peak and float(peak[1]) == result["peak_gflops"] > 0, lines
    assert lines[1].split() == ["shape", "ours", "tok/s", "HF", "tok/s", "ratio", "ours", "MFU", "HF", "MFU"]
    rows = lines[2:-1]
    assert list(result["shapes"]) == ["c"] and len(rows) == 1, lines
    row = result["shapes"]["c"]
    assert all(math.isfinite(x) and x > 0 for x in numbers(result)), result

    label, printed = rows[0][:34].strip(), rows[0][34:].split()
    shape = re.fullmatch(r"c: d(\d+) L(\d+) h(\d+) vocab (\d+)", label)
    assert shape and tuple(map(int, shape.groups())) == (256, 1, 8, 257), label
    ours, peer, ratio, ours_mfu, peer_mfu = printed
    assert_close(float(ours), row["ours_tokens_per_s"], 0.55, "ours tok/s printed vs JSON")
    assert_close(float(peer), row["peer_tokens_per_s"], 0.55, "HF tok/s printed vs JSON")
    assert ratio == f"{row['ratio']:.2f}x"
    # the ratio is the quotient of the rates (each rounded to 0.1 in the JSON, the ratio to 0.001)
    quotient = row["ours_tokens_per_s"] / row["peer_tokens_per_s"]
    slack = quotient * (0.05 / row["ours_tokens_per_s"] + 0.05 / row["peer_tokens_per_s"]) + 0.0005
    assert_close(row["ratio"], quotient, slack, "ratio vs ours / HF tokens/s")

    model = config.base_config().model
    model.update(vocab_size=257, max_positions=16, d_model=256, n_layers=1, n_heads=8)
    per_token = flops.flops_per_token(model, 16)
    for rate, mfu, shown in (
        ("ours_tokens_per_s", "ours_mfu", ours_mfu),
        ("peer_tokens_per_s", "peer_mfu", peer_mfu),
    ):
        expected = row[rate] * per_token / (result["peak_gflops"] * 1e9)
        slack = expected * (0.05 / row[rate] + 0.05 / result["peak_gflops"]) + 0.00005
        assert_close(row[mfu], expected, slack, f"{mfu} vs tokens/s × FLOPs per token / peak")
        assert shown == f"{row[mfu]:.1%}"


def test_perf_model_cpu_prints_predicted_and_measured_steps_and_their_error():
    """One round, one shape, one timed step, a 4 MiB bandwidth buffer: the machine's figures, a row whose error is
    predicted / measured − 1 and whose prediction lies between the larger and the sum of its two terms, and the
    summary line and JSON built from it."""
    lines = run_benchmark(
        "perf_model_cpu", "--rounds=1", "--steps=1", "--shapes=a", "--bandwidth_mib=4", "--peak_size=256"
    )
    result = json.loads(lines[-1])
    assert set(result) == {
        "peak_gflops",
        "fresh_bandwidth_gbps",
        "reused_bandwidth_gbps",
        "shapes",
        "median_abs_error",
        "within_25_percent",
    }
    assert all(math.isfinite(x) for x in numbers(result)), result
    machine = re.search(
        r": fp32 matmul peak ([\d.]+) GFLOP/s, memory bandwidth ([\d.]+) GB/s into fresh buffers, ([\d.]+) GB/s "
        r"into reused ones \(measured in this run\); batch 16, fp32$",
        lines[0],
    )
    assert machine, lines[0]
    keys = ("peak_gflops", "fresh_bandwidth_gbps", "reused_bandwidth_gbps")
    assert [float(x) for x in machine.groups()] == [result[k] for k in keys]
    assert all(result[k] > 0 for k in keys)
    assert lines[1].split() == [
        *("shape", "predicted", "s", "measured", "s", "error", "bound", "compute", "s", "memory", "s")
    ]

    assert list(result["shapes"]) == ["a"], result
    row = result["shapes"]["a"]
    assert {
        k: row[k] for k in ("d_model", "n_layers", "n_heads", "vocab_size", "microbatches", "seq_len")
    } == {
        "d_model": 64,
        "n_layers": 2,
        "n_heads": 4,
        "vocab_size": 257,
        "microbatches": 1,
        "seq_len": 256,
    }
    assert row["attention"] == "xla" and row["bound"] in ("compute", "memory")
    seconds = ("predicted_s", "measured_s", "compute_s", "memory_s")
    assert all(row[k] > 0 for k in seconds), row
    # the error is predicted / measured − 1 (the seconds rounded to 1e-5, the error to 1e-4)
    quotient = row["predicted_s"] / row["measured_s"]
    slack = quotient * (0.5e-5 / row["predicted_s"] + 0.5e-5 / row["measured_s"]) + 0.5e-4
    assert_close(row["error"], quotient - 1, slack, "error vs predicted / measured − 1")
    # per kernel max(compute, memory), summed: at least either sum, at most both
    assert (
        max(row["compute_s"], row["memory_s"]) - 1e-5
        <= row["predicted_s"]
        <= row["compute_s"] + row["memory_s"] + 1e-5
    )

    label, printed = lines[2][:42].strip(), lines[2][42:].split()
    assert label == "a: d64 L2 h4 V257 mb1 S256 xla", lines[2]
    predicted, measured, error, bound, compute, memory = printed
    for shown, key in (
        (predicted, "predicted_s"),
        (measured, "measured_s"),
        (compute, "compute_s"),
        (memory, "memory_s"),
    ):
        assert_close(float(shown), row[key], 0.5e-4 + 0.5e-5, f"printed {key} vs JSON")
    assert_close(float(error.rstrip("%")) / 100, row["error"], 0.5e-3 + 0.5e-4, "printed error vs JSON")
    assert bound == row["bound"]

    assert result["median_abs_error"] == abs(row["error"])
    assert result["within_25_percent"] == (abs(row["error"]) <= 0.25)
    verdict = "yes" if result["within_25_percent"] else "no"
    assert lines[-2] == f"median |error| {result['median_abs_error']:.1%}; every shape within ±25%: {verdict}"
    assert len(lines) == 5, lines


def test_kernels_on_cpu_checks_one_attention_case_and_the_loss_within_tolerance():
    """`--cpu_cases=1` on CPU: it says it only checks correctness, then one attention line (out, dq, dk, dv) and
    one loss line (loss, dh, dw) whose relative errors are finite and within the fp32 tolerance it prints."""
    lines = run_benchmark("kernels", "--cpu_cases=1")
    assert (
        lines[0] == "No GPU/TPU: checking correctness only, Pallas in interpret mode on CPU (no timings)."
    ), lines
    assert lines[-1] == f"all within fp32 tolerance ({kernels.FP32_TOLERANCE})"
    checks = lines[1:-1]
    assert len(checks) == 2, lines
    expected = [
        r"flash_attention batch 1, seq 40, heads 2, head_dim 64, causal=True, scale=None \(fp32\): "
        r"relative errors out/dq/dk/dv \[(.*)\]",
        r"softmax_cross_entropy 300 tokens, vocab 1000, d 64 \(fp32, token_chunk 128, vocab_chunk 384\): "
        r"relative errors loss/dh/dw \[(.*)\]",
    ]
    for line, pattern, count in zip(checks, expected, (4, 3), strict=True):
        match = re.fullmatch(pattern, line.strip())
        assert match, line
        errors = [float(x) for x in match[1].split(",")]
        assert len(errors) == count and all(
            math.isfinite(e) and 0 <= e <= kernels.FP32_TOLERANCE for e in errors
        )


def test_loader_throughput_prints_rates_and_their_ratio(tmp_path):
    """A 100 kB byte-level store prepared into a fresh cache, 5 batches of 2 × 64 per measurement: each figure
    printed as the JSON has it, the rates positive, the ratio the quotient of the two rates it names."""
    lines = run_benchmark(
        "loader_throughput",
        "--tokenizer=bytes",
        "--seq_len=64",
        "--batch_size=2",
        "--batches=5",
        "--max_bytes=100000",
        env={"CHINCHAX_DATA": str(tmp_path)},
    )
    result = json.loads(lines[-1])
    rates = ("loader_tokens_per_s_threads_0", "loader_tokens_per_s_threads_2", "numpy_peer_tokens_per_s")
    assert list(result) == ["store", "seq_len", "batch_size", *rates, "ratio_threads_2_to_peer"]
    prepared, *figures = lines[:-1]  # the store is prepared on first use: into this fresh cache, now
    assert prepared.startswith(f"prepared {result['store']}: "), lines
    printed = dict(line.strip().split(": ", 1) for line in figures)
    assert printed == {k: f"{v:,}" if isinstance(v, int) else str(v) for k, v in result.items()}, lines
    assert result["store"].startswith(str(tmp_path)) and os.path.isdir(result["store"])
    assert (result["seq_len"], result["batch_size"]) == (64, 2)
    assert all(isinstance(result[k], int) and result[k] > 0 for k in rates), result
    # the ratio is the quotient of the rates (each rounded to 1 token/s, the ratio to 0.001)
    quotient = result["loader_tokens_per_s_threads_2"] / result["numpy_peer_tokens_per_s"]
    slack = quotient * (
        0.5 / result["loader_tokens_per_s_threads_2"] + 0.5 / result["numpy_peer_tokens_per_s"]
    )
    assert_close(result["ratio_threads_2_to_peer"], quotient, slack + 0.0005, "ratio vs threads 2 / peer")


def test_prepare_speed_prints_a_row_per_path_and_thread_count_with_its_speedup():
    """The byte tokenizer over a 100 kB corpus cap, two interleaved repeats: a row per path and thread count (1
    and all CPUs), each median inside its range (the mean of the two runs), each speedup its MB/s over the same
    path's 1-thread MB/s, the table as the JSON has it."""
    lines = run_benchmark("prepare_speed", "--tokenizer=bytes", "--max_bytes=100000", "--repeats=2")
    result = json.loads(lines[-1])
    cpus = len(os.sched_getaffinity(0))
    assert result["tokenizer"] == "bytes" and result["cpus"] == cpus and result["text_mb"] > 0
    assert lines[0] == (
        f"{result['text_mb']:.1f} MB of embedded text, tokenizer bytes, {cpus} CPUs, median of 2 interleaved runs"
    )
    assert lines[1].split() == [
        "path",
        "threads",
        "MB/s",
        "range",
        "x",
        "1",
        "thread",
        "our",
        "cores",
        "others",
    ]
    paths = [
        "tokenizer alone, in memory (peer)",
        "prepare: embedded corpus",
        "prepare: one file, one document",
    ]
    threads = sorted({1, cpus})
    table = result["table"]
    assert [(r["path"], r["threads"]) for r in table] == [(p, t) for p in paths for t in threads]
    assert len(lines) == 3 + len(table), lines
    assert all(math.isfinite(x) and x >= 0 for x in numbers(result)), result

    one_thread = {r["path"]: r["mb_per_s"] for r in table if r["threads"] == 1}
    for row, line in zip(table, lines[2:-1], strict=True):
        low, high = row["mb_per_s_range"]
        assert 0 < low <= row["mb_per_s"] <= high, row
        assert row["mb_per_s"] == pytest.approx((low + high) / 2, rel=1e-12), row  # the median of two runs
        assert row["to_1_thread"] == pytest.approx(row["mb_per_s"] / one_thread[row["path"]], rel=1e-12), row
        assert row["cores"] > 0, row
        path, cells = line[:40].strip(), line[40:].split()
        assert path == row["path"], line
        assert cells == [
            str(row["threads"]),
            f"{row['mb_per_s']:.2f}",
            f"{low:.1f}-{high:.1f}",
            f"{row['to_1_thread']:.2f}",
            f"{row['cores']:.2f}",
            f"{row['other_cores']:.2f}",
        ], line
        # the printed speedup follows from the printed MB/s too (each rounded to 0.01)
        shown_one = float(f"{one_thread[row['path']]:.2f}")
        slack = row["to_1_thread"] * 0.005 * (1 / float(cells[1]) + 1 / shown_one) + 0.005
        assert_close(float(cells[3]), float(cells[1]) / shown_one, slack, "printed speedup vs printed MB/s")


FIT_ROW = re.compile(r"(.+?)\s+(\d+)\s+(\d+\.\d\d)\s+(\d+\.\d)(\*?)\s+(\d+\.\d)")


def test_fit_speed_prints_both_methods_and_the_extrapolated_ratio():
    """Two scipy starts: our pruned batched L-BFGS over all 4,500 starts and the scipy loop over 2, extrapolated
    (starred, with its footnote); each 's / 4500' is its seconds × 4500 / starts, each 'scipy÷this' the scipy row's
    over this row's, the JSON's ratio the first row's, the objectives finite."""
    lines = run_benchmark("fit_speed", "--scipy_starts=2")
    result = json.loads(lines[-1])
    assert lines[0].startswith("Approach 3 on chinchilla_fig4_points.csv (240 points), 4,500-start grid;"), (
        lines
    )
    assert lines[1].split() == ["method", "starts", "run", "seconds", "s", "/", "4500", "scipy÷this"]
    table = result["table"]
    assert [(r["method"], r["starts_run"]) for r in table] == [
        ("batched L-BFGS, pruned ((5, 100), (25, 16))", 4500),
        ("scipy L-BFGS-B loop (analytic grad)", 2),
    ]
    assert all(math.isfinite(x) and x > 0 for x in numbers(result)), result
    scipy = table[-1]["seconds_4500"]
    rows = [FIT_ROW.fullmatch(line) for line in lines[2:4]]
    assert all(rows), lines
    scipy_shown = float(rows[-1][4])
    for row, line, match in zip(table, lines[2:4], rows, strict=True):
        assert row["seconds_4500"] == pytest.approx(row["seconds"] * 4500 / row["starts_run"], rel=1e-12)
        method, starts, seconds, per_4500, star, ratio = match.groups()
        assert (method, int(starts)) == (row["method"], row["starts_run"])
        assert seconds == f"{row['seconds']:.2f}" and per_4500 == f"{row['seconds_4500']:.1f}", line
        assert star == ("" if row["starts_run"] == 4500 else "*"), line
        assert ratio == f"{scipy / row['seconds_4500']:.1f}", line
        # and follows from the printed 's / 4500' column (each rounded to 0.1, the ratio too)
        slack = (0.05 + 0.05 * float(ratio)) / float(per_4500) + 0.05
        assert_close(float(ratio), scipy_shown / float(per_4500), slack, "printed ratio vs printed s / 4500")
    assert result["ratio"] == pytest.approx(scipy / table[0]["seconds_4500"], rel=1e-12)
    assert lines[4] == "* scipy timed on 2 random starts (seed 0), extrapolated linearly to 4,500"
    law = re.fullmatch(r"ours: A=([\d.]+) B=([\d.]+) E=([\d.]+) alpha=([\d.]+) beta=([\d.]+)", lines[5])
    assert law and all(float(x) > 0 for x in law.groups()), lines[5]
    assert list(result["objective"]) == ["ours", "scipy"]
    assert lines[6] == "best Huber objective: " + ", ".join(
        f"{k} {v:.12g}" for k, v in result["objective"].items()
    )
    assert len(lines) == 8, lines
