"""The performance model: collective bytes parsed from the HLO of a sharded train step against figures derived
by hand from the sharding rules (chinchax.parallel.mesh) and the model's shapes, and the roofline formula.

The analytic figures: FSDP gathers a block's weights per layer and per microbatch, in the forward pass every
weight and in the backward pass those it multiplies by (kernels, LayerNorm scales; an additive bias is not
needed to differentiate), each all-gather moving (n−1)/n of the gathered (f32 here) array; weights outside
the layer scan (embeddings, final LayerNorm) do not change across microbatches and are gathered once per step.
XLA on CPU sums gradients with all-reduces (2·(n−1)/n of the array) per layer and microbatch, not with
reduce-scatters. Tensor parallelism adds Megatron's activation all-reduces: after attn-out and fc2 in the
forward pass, after qkv and fc1 (their input gradients) in the backward pass.

Then the prediction in the commands: the memory traffic written out from the model's shapes, the dry run's step
time against the roofline of its compiled step's numbers, the budget planner against a stand-in MFU and a law's
closed-form N_opt, and the outputs of experiments.run --dry_run and experiments.plan --mesh / --budget.
"""

import dataclasses
import json
import math
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chinchax.config import d_ffn, validate
from chinchax.dryrun import aot
from chinchax.dryrun import report as dry_run
from chinchax.model import flops
from chinchax.parallel import hardware, perf_model
from chinchax.parallel import mesh as mesh_lib
from chinchax.training import train
from experiments import configs
from experiments import plan as plan_cli
from tests.conftest import REPO

F32 = 4
SCALARS = 64  # loss sums, token counts, norm partial sums: fewer than this many f32 per collective figure


def _tiny():
    """d64, 3 scanned layers (a while loop of 3 trips), 2 microbatches of 8 sequences of 64 tokens, fp32."""
    cfg = configs.get("cpu_tiny")
    cfg.model.update(vocab_size=264, d_model=64, n_heads=4, n_layers=3, layer_loop="scan", attention="xla")
    cfg.data.seq_len = 64
    cfg.train.update(batch_size=16, microbatches=2)
    return validate(cfg)


@pytest.fixture(scope="module")
def parsed() -> dict:
    cfg = _tiny()
    return {preset: aot.compile_plan(cfg, preset, devices=8) for preset in ("wse-8", "gpu-8")}


def _figures(fsdp: int, tensor: int) -> dict:
    """Elements gathered and gradients summed over 'fsdp', by hand (V vocabulary, S positions used, d, f)."""
    cfg = _tiny()
    m, M, S = cfg.model, cfg.train.microbatches, cfg.data.seq_len
    d, f, V, L = m.d_model, d_ffn(m), m.vocab_size, m.n_layers
    # qkv (d, 3, heads, hd), attn_out (heads, hd, d), fc1 (d, f), fc2 (f, d): heads / mlp split over 'tensor'
    kernels = (4 * d * d + 2 * d * f) // tensor
    forward = kernels + 6 * d  # + ln_1, ln_2 scale and bias, attn_out and fc2 biases (sharded on 'embed')
    backward = kernels + 2 * d  # + the two LayerNorm scales
    outside = (V + S) * d + 3 * d  # token embedding (tied head), positions [:S], ln_f scale twice, bias once
    gathered = M * L * (forward + backward) + outside
    # gradients: every block parameter as each device holds it after the gather over 'fsdp' (fc1 and qkv
    # biases split over 'tensor'), then the embeddings and ln_f, per microbatch
    layer_grads = kernels + 6 * d + f // tensor + 3 * d // tensor
    summed = M * (L * layer_grads + (V + S) * d + 2 * d)
    return {"gathered": gathered, "summed": summed, "M": M, "S": S, "d": d, "V": V, "L": L}


def test_wse8_fsdp_collectives_equal_the_analytic_figure(parsed):
    plan = parsed["wse-8"]
    got, n = plan["collective_bytes_per_device"], 8
    fig = _figures(fsdp=n, tensor=1)
    sequences = plan["batch"]["sequences"]
    token_ids = fig["M"] * sequences * fig["S"]  # int32 ids gathered over 'fsdp' for the embedding lookup
    assert got["all-gather on fsdp"] == (fig["gathered"] + token_ids) * F32 * (n - 1) / n
    grads = fig["summed"] * F32 * 2 * (n - 1) / n
    assert 0 <= got["all-reduce on fsdp"] - grads < SCALARS * F32 * 2 * (n - 1) / n
    assert not any("tensor" in name or "data" in name for name in got), got


def test_gpu8_fsdp_and_tensor_collectives_equal_the_analytic_figure(parsed):
    plan = parsed["gpu-8"]
    got, n, t = plan["collective_bytes_per_device"], 4, 2
    assert plan["shape"] == {"data": 1, "fsdp": n, "tensor": t}
    fig = _figures(fsdp=n, tensor=t)
    M, S, d, V, L = fig["M"], fig["S"], fig["d"], fig["V"], fig["L"]
    weights = fig["gathered"] * F32 * (n - 1) / n
    token_ids = M * plan["batch"]["sequences"] * S * F32  # at most: the ids the lookup gathers
    assert 0 <= got["all-gather on fsdp"] - weights <= token_ids
    grads = fig["summed"] * F32 * 2 * (n - 1) / n
    assert 0 <= got["all-reduce on fsdp"] - grads < SCALARS * F32 * 2 * (n - 1) / n
    # Megatron: 4 all-reduces per layer and microbatch of one device's activations (its 8 / 4 sequences)
    activations = plan["batch"]["sequences"] // n * S * d * F32
    megatron = M * L * 4 * activations * 2 * (t - 1) / t
    embedding_grad = (
        M * V * (d // n) * F32 * 2 * (t - 1) / t
    )  # the lookup's gradient, rows split over 'tensor'
    rest = got["all-reduce on tensor"] - megatron - embedding_grad
    assert 0 <= rest < SCALARS * F32 * 2 * (t - 1) / t


def test_async_pairs_count_once_and_groups_map_to_axes():
    hlo = "\n".join(
        [
            "ENTRY %main (p: f32[16]) -> f32[64] {",
            "  %p = f32[16]{0} parameter(0)",
            "  %ag = (f32[16]{0}, f32[64]{0}) all-gather-start(%p), replica_groups=[2,4]<=[8], dimensions={0}",
            "  %agd = f32[64]{0} all-gather-done(%ag)",
            "  %ar = f32[64]{0} all-reduce(%agd), replica_groups={{0,4},{1,5},{2,6},{3,7}}, to_apply=%add",
            "  ROOT %cp = f32[64]{0} collective-permute(%ar), source_target_pairs={{0,1},{1,0}}",
            "}",
        ]
    )
    got = perf_model.collective_bytes(hlo, {"data": 2, "fsdp": 4, "tensor": 1})
    assert got == {
        "all-gather on fsdp": 64 * F32 * 3 / 4,
        "all-reduce on data": 2 * 64 * F32 / 2,
        "collective-permute on fsdp": 64 * F32,
    }


@pytest.mark.parametrize(
    "groups, expected",
    [
        # devices 0..7 as (4, 2) transposed to the mesh's (2, 4): reduce over axis_0 pairs neighbours
        (
            "mesh['axis_0'=2,'axis_1'=4], device_ids=([4,2]T(1,0)) {'axis_0'}",
            [(0, 1), (2, 3), (4, 5), (6, 7)],
        ),
        # (2, 2, 2) with its first two axes swapped, read as (2, 4): pairs two apart
        (
            "mesh['axis_0'=2,'axis_1'=4], device_ids=([2,2,2]T(1,0,2)) {'axis_0'}",
            [(0, 2), (1, 3), (4, 6), (5, 7)],
        ),
        ("mesh['axis_0'=2,'axis_1'=4] {'axis_1'}", [(0, 1, 2, 3), (4, 5, 6, 7)]),
    ],
)
def test_mesh_replica_groups_read_their_device_order(groups, expected):
    """XLA writes a collective's groups as a mesh of device ids: the groups are the ids along the named axes."""
    rest = f"%p), channel_id=1, replica_groups={groups}, dimensions={{0}}"
    assert perf_model.replica_groups(rest, 8) == expected


def test_roofline_by_hand():
    device = dataclasses.replace(
        hardware.DEVICES["h100"], peak_flops=1e15, memory_bandwidth=2e12, devices_per_host=8
    )
    mesh = {"data": 2, "fsdp": 4, "tensor": 2}  # 16 devices: tensor × fsdp = 8 fit a node, data crosses
    nvlink, infiniband = device.intra_host_link[1], device.inter_host_link[1]
    flops, accessed = 3e14, 4e11  # compute 0.3 s, memory 0.2 s
    collectives = {"all-gather on fsdp": 45e9, "all-reduce on data": 5e9, "all-reduce on tensor": 9e9}
    got = perf_model.predict(device, mesh, flops, accessed, collectives, 2**20, 16 * 2e14)
    comms = 45e9 / nvlink + 5e9 / infiniband + 9e9 / nvlink  # 0.1 + 0.1 + 0.02 s
    assert got.seconds == pytest.approx(0.3 + comms)
    assert got.compute_seconds == pytest.approx(0.3) and got.memory_seconds == pytest.approx(0.2)
    assert got.bound == "compute"
    assert got.mfu == pytest.approx(16 * 2e14 / (got.seconds * 16 * 1e15))
    assert got.tokens_per_second == pytest.approx(2**20 / got.seconds)
    slow = perf_model.predict(device, mesh, flops, accessed, {"all-reduce on data": 25e9}, 2**20, 1.0)
    assert slow.bound == "all-reduce on data" and slow.seconds == pytest.approx(0.3 + 25e9 / infiniband)


H100_NVLINK = 450e9  # bytes/s per direction (hardware.DEVICES["h100"]): every axis of gpu-8 stays in the node


def _tiny_pod():
    """The tiny model in bf16 with full remat on one 8×H100 node (data 1 × fsdp 4 × tensor 2, vocab replicated)."""
    cfg = _tiny()
    cfg.model.update(compute_dtype="bfloat16", remat="full")
    cfg.mesh.preset = "gpu-8"
    return validate(cfg)


@pytest.fixture(scope="module")
def predicted() -> tuple[dict, object]:
    report, resolved = dry_run.report(_tiny_pod())
    return dry_run.add_prediction(dry_run.add_xla(report, aot.compile_plan(resolved)), resolved), resolved


def _traffic_by_hand(fsdp: int, tensor: int, holds_state: bool) -> dict:
    """Memory traffic per device per step of _tiny_pod() on data 1 × fsdp × tensor, from the model's shapes:
    the optimizer's 7 fp32 passes over the shard, the accumulator read and written per microbatch, the gathered
    weights read 4 times in bf16 (forward, remat's recompute, input and weight gradients) with their fp32
    gradient written, each block's activations written once and read twice plus once more each way for the
    recompute (full remat keeps only the bf16 block input), and the fp32 logits and gradient written once and
    read twice."""
    cfg = _tiny_pod()
    m, M, S = cfg.model, cfg.train.microbatches, cfg.data.seq_len
    d, f, V, P, L, h = m.d_model, d_ffn(m), m.vocab_size, m.max_positions, m.n_layers, m.n_heads
    bf16 = 2
    layer_gathered = (4 * d * d + 2 * d * f) / tensor + 3 * d / tensor + f / tensor + 6 * d
    gathered = L * layer_gathered + V * d + P * d + 2 * d  # vocabulary replicated on gpu-8
    # the shard: 'embed' over fsdp in every kernel, bias and norm that has it; qkv's and fc1's biases do not
    layer_shard = (4 * d * d + 2 * d * f) / (fsdp * tensor) + 3 * d / tensor + f / tensor + 6 * d / fsdp
    shard = L * layer_shard + (V + P) * d / fsdp + 2 * d / fsdp
    tokens = cfg.train.batch_size // M // fsdp * S  # one device's tokens per microbatch
    block = tokens * (
        d * (2 * bf16 + 2 * F32) + (4 * d + 2 * f) / tensor * bf16 + h / tensor * S * (2 * F32 + bf16)
    )
    kept = L * tokens * d * bf16
    return {
        "optimizer": 7 * F32 * shard if holds_state else 0,
        "gradient_accumulation": 2 * F32 * shard * M,
        "weights": M * gathered * (4 * bf16 + F32),
        "activations": M * (3 * L * block + 2 * (L * block - kept)),
        "logits": M * 3 * 2 * tokens * V * F32,
    }


def test_memory_traffic_by_hand():
    cfg = _tiny_pod()
    sizes = {"data": 1, "fsdp": 4, "tensor": 2}
    got = perf_model.memory_traffic(cfg, sizes, hardware.DEVICES["h100"])
    want = _traffic_by_hand(4, 2, holds_state=True)
    assert {k: got[k] for k in want} == pytest.approx(want, rel=1e-12)
    assert got["total"] == pytest.approx(sum(want.values()), rel=1e-12)
    streamed = perf_model.memory_traffic(cfg, sizes, hardware.DEVICES["cs2"])
    assert streamed["optimizer"] == 0 and streamed["total"] == pytest.approx(got["total"] - want["optimizer"])


def test_dry_run_prediction_is_the_roofline_of_the_compiled_step(predicted):
    """step = max(matmul FLOPs / peak, traffic / HBM bandwidth) + Σ collective bytes / NVLink, from the numbers of
    the compiled step (XLA's loop-aware FLOPs and the HLO's collectives) and the traffic written out by hand."""
    report, cfg = predicted
    aot_plan, p = report["aot"], report["prediction"]
    h100 = hardware.DEVICES["h100"]
    compute = aot_plan["flops_per_step"]["xla_matmul_per_device"] / 989.4e12
    memory = sum(_traffic_by_hand(4, 2, holds_state=True).values()) / 3.35e12
    comms = sum(aot_plan["collective_bytes_per_device"].values()) / H100_NVLINK
    assert h100.peak_flops == 989.4e12 and h100.memory_bandwidth == 3.35e12
    assert p["compute_seconds"] == pytest.approx(compute) and p["memory_seconds"] == pytest.approx(memory)
    assert comms > 0 and p["step_seconds"] == pytest.approx(max(compute, memory) + comms, rel=1e-9)
    step_tokens = cfg.train.batch_size * cfg.data.seq_len
    assert p["tokens_per_second"] == pytest.approx(step_tokens / p["step_seconds"])
    model_flops = report["flops_per_token"] * step_tokens
    assert p["mfu"] == pytest.approx(model_flops / (p["step_seconds"] * 8 * 989.4e12))
    assert p["days"] == pytest.approx(report["tokens"] / p["tokens_per_second"] / 86400)
    assert p["device_hours"] == pytest.approx(p["days"] * 24 * 8)
    terms = {"compute": compute, "memory": memory} | {
        name: moved / H100_NVLINK for name, moved in aot_plan["collective_bytes_per_device"].items()
    }
    assert p["bound"] == max(terms, key=terms.get)
    detail = {"compute": "compute: ", "memory": "memory: "}.get(p["bound"], f"{p['bound']} over NVLink 4")
    assert p["bound_detail"].startswith(detail)
    assert f"step time        {p['step_seconds']:.3g} s predicted" in dry_run.format_plan(report)


def test_prediction_says_why_it_is_unavailable(monkeypatch):
    cfg = _tiny()  # the cpu preset: nothing compiled, then a compiled step but on 8 devices sharing the CPU
    report, resolved = dry_run.report(cfg, devices=1)
    got = dry_run.add_prediction(report, resolved)["prediction"]
    assert got == {
        "unavailable": "the CPU model predicts one compiled local device's step (no compiled step)"
    }
    report, resolved = dry_run.report(cfg, devices=8)
    got = dry_run.add_prediction(report, resolved, "HloModule m")["prediction"]
    assert "(8 devices share this CPU)" in got["unavailable"]
    # a device the table has no peak for (as a new row might), and a pod step that was not compiled
    peakless = dataclasses.replace(hardware.DEVICES["cs2"], peak_flops=None)
    monkeypatch.setitem(
        mesh_lib.PRESETS, "wse-N", dataclasses.replace(mesh_lib.PRESETS["wse-N"], device=peakless)
    )
    cfg.mesh.preset = "wse-8"
    report, resolved = dry_run.report(cfg)
    assert (
        "train.peak_flops_per_device" in dry_run.add_prediction(report, resolved)["prediction"]["unavailable"]
    )
    monkeypatch.undo()
    report, resolved = dry_run.report(cfg)
    assert (
        "the step was not compiled" in dry_run.add_prediction(report, resolved)["prediction"]["unavailable"]
    )


def test_cpu_dry_run_predicts_the_compiled_step_kernel_by_kernel(monkeypatch):
    """On the cpu preset the prediction is Σ over the compiled step's kernels of max(their matmuls' time, bytes
    over the bandwidth): with the machine's measurements replaced by known figures, equal to that sum by hand;
    days from the tokens to train at the predicted rate."""
    monkeypatch.setattr(hardware, "measure_memory_bandwidth", lambda reuse=False: 6e10 if reuse else 1.5e10)
    monkeypatch.setattr(
        hardware, "measure_dot_seconds", lambda lhs, rhs, numbers: 1e-9 * (sum(lhs) + sum(rhs))
    )
    cfg = _tiny()
    cfg.train.peak_flops_per_device = 4e11
    report, resolved = dry_run.report(cfg, devices=1)
    step = aot.compile_step(resolved, devices=1)
    got = dry_run.add_prediction(report, resolved, step.compiled.as_text())["prediction"]

    kernels = perf_model.hlo_kernels(step.compiled.as_text())
    by_hand = 0.0
    for k in kernels:
        matmuls = sum(1e-9 * (sum(d.lhs) + sum(d.rhs)) for d in k.dots)
        by_hand += max(matmuls, k.bytes / 1.5e10) + (k.runs - 1) * max(matmuls, k.bytes / 6e10)
    assert got["step_seconds"] == pytest.approx(by_hand, rel=1e-12)
    tokens_per_second = 16 * 64 / by_hand
    assert got["tokens_per_second"] == pytest.approx(tokens_per_second)
    assert got["mfu"] == pytest.approx(report["flops_per_token"] * tokens_per_second / 4e11)
    assert got["days"] == pytest.approx(report["tokens"] / tokens_per_second / 86400)
    assert got["peak_source"] == "configured" and got["kernels"] == sum(k.runs for k in kernels)
    assert f"step time        {got['step_seconds']:.3g} s predicted" in dry_run.format_plan(
        {**report, "prediction": got}
    )


H100_PEAK = 989.4e12


def _fake_prediction(mfus: list[float]):
    """A stand-in for compiling a point: its device-hours at the next of `mfus` (train FLOPs / (peak · MFU))."""
    calls = iter(mfus)

    def predict(cfg) -> dict:
        mfu = next(calls)
        hours = flops.plan(cfg).train_flops / (H100_PEAK * mfu) / 3600
        return {"fits": True, "prediction": {"mfu": mfu, "device_hours": hours, "step_seconds": 1.0}}

    return predict


def test_budget_planner_spends_device_hours_at_the_predicted_mfu():
    """2000 H100-hours at a shape-independent MFU of 50 %: the first round (MFU guessed at 40 %) overshoots, the
    second plans for 2000 · 3600 · 989.4e12 · 0.5 model FLOPs at 20 tokens per parameter."""
    got = plan_cli.plan_budget(2000, "device_hours", "gpu-8", predict=_fake_prediction([0.5, 0.5]))
    rounds = got["rounds"]
    assert [r["mfu_assumed"] for r in rounds] == [plan_cli.MFU_GUESS, 0.5] and got["converged"]
    final = rounds[got["chosen"]]["planned"]
    assert got["chosen"] == 1
    assert final["train_flops"] == pytest.approx(2000 * 3600 * H100_PEAK * 0.5, rel=0.02)
    assert final["tokens_per_param"] == pytest.approx(20, rel=0.1)
    assert rounds[0]["planned"]["train_flops"] == pytest.approx(2000 * 3600 * H100_PEAK * 0.4, rel=0.02)


def test_budget_planner_takes_the_round_closest_to_the_budget_when_mfu_jumps():
    jumping = [0.8, 0.2] * plan_cli.MAX_ROUNDS  # each shape predicts an MFU that makes the next overshoot
    got = plan_cli.plan_budget(2000, "device_hours", "gpu-8", predict=_fake_prediction(jumping))
    spent = [r["spent"] for r in got["rounds"]]
    assert len(spent) == plan_cli.MAX_ROUNDS and not got["converged"]
    assert spent[0] == pytest.approx(0.4 / 0.8, rel=0.02)  # planned at MFU 40 %, predicted to run at 80 %
    assert got["chosen"] == min(range(len(spent)), key=lambda i: abs(spent[i] - 1))


def test_law_budget_follows_n_opt_and_bounds_the_loss(tmp_path):
    """With a fitted Chinchilla law (B doubled from Besiroglu et al.'s, so that it asks for about 140 tokens per
    parameter, not 20): N near the closed-form N_opt(C) (Hoffmann et al. Eq. 4) and the loss interval at the
    corners of the constants' CIs, both written out here."""
    A, B, E, alpha, beta = 482.01, 4000.0, 1.82, 0.3478, 0.3658
    ci = {"A": [400, 560], "B": [3500, 4600], "E": [1.75, 1.9], "alpha": [0.33, 0.36], "beta": [0.35, 0.38]}
    summary = {"law": "chinchilla", "A": A, "B": B, "E": E, "alpha": alpha, "beta": beta, "ci": ci}
    path = tmp_path / "fit.json"
    path.write_text(json.dumps({**summary, "counting": {"params": "total", "flops": "detailed"}}))
    law, loaded = plan_cli.load_law(str(path))
    budget = 3e20
    got = plan_cli.plan_budget(budget, "flops", None, law)
    planned = got["rounds"][0]["planned"]
    n_opt = (alpha * A / (beta * B)) ** (1 / (alpha + beta)) * (budget / 6) ** (beta / (alpha + beta))
    assert planned["params"] == pytest.approx(n_opt, rel=0.03) and got["converged"]
    assert planned["train_flops"] == pytest.approx(budget, rel=0.02)
    n, d = planned["params"], planned["tokens"]
    assert planned["tokens_per_param"] > 100
    low = 1.75 + 400 / n**0.36 + 3500 / d**0.38
    high = 1.9 + 560 / n**0.33 + 4600 / d**0.35
    interval, method = plan_cli.loss_interval(loaded, n, d)
    assert interval == pytest.approx([low, high]) and "corners" in method
    assert low < E + A / n**alpha + B / d**beta < high
    # with the fit's bootstrap refits kept: the 95 % percentile interval of L over them, here 41 refits that
    # shift E alone by −0.1, −0.095, … +0.1, whose 2.5th and 97.5th percentiles (numpy's linear rule: positions
    # 0.025 · 40 = 1 and 39) are the shifts ∓0.095
    shifts = np.linspace(-0.1, 0.1, 41)
    refits = {"A": [A] * 41, "B": [B] * 41, "E": list(E + shifts), "alpha": [alpha] * 41, "beta": [beta] * 41}
    interval, method = plan_cli.loss_interval({**loaded, "bootstrap_samples": refits, "ci_level": 0.95}, n, d)
    central = E + A / n**alpha + B / d**beta
    assert interval == pytest.approx([central - 0.095, central + 0.095]) and "bootstrap" in method


def _outputs(commands: list[list[str]]) -> list[tuple[str, dict]]:
    """(stdout, its last line as JSON) of each `python -m ...` command, run side by side."""
    runs = [
        subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, stdout=subprocess.PIPE, text=True)
        for args in commands
    ]
    outputs = [run.communicate(timeout=600)[0] for run in runs]
    assert [run.returncode for run in runs] == [0] * len(runs), outputs
    return [(out, json.loads(out.strip().splitlines()[-1])) for out in outputs]


def test_commands_print_the_prediction_and_end_with_json(tmp_path):
    """experiments.run --dry_run on a pod, experiments.plan --mesh, and --budget with a law: lines and JSON."""
    law = {"law": "chinchilla", "A": 482.01, "B": 2085.43, "E": 1.82, "alpha": 0.3478, "beta": 0.3658}
    (tmp_path / "fit.json").write_text(json.dumps(law))
    (run_out, report), (_, row), (plan_out, got) = _outputs(
        [
            ["experiments.run", "--config=cpu_tiny", "--dry_run", "--mesh=gpu-8"],
            ["experiments.plan", "--mesh=gpu-8", "--points=cpu_tiny", "--json"],
            [
                "experiments.plan",
                "--budget=1e17",
                "--unit=flops",
                "--mesh=gpu-8",
                f"--law={tmp_path / 'fit.json'}",
            ],
        ]
    )
    p = report["prediction"]
    assert f"step time        {p['step_seconds']:.3g} s predicted, bound by {p['bound_detail']}" in run_out
    assert 0 < p["mfu"] < 1 and p["days"] == pytest.approx(report["tokens"] / p["tokens_per_second"] / 86400)
    assert row["name"] == "cpu_tiny" and row["prediction"]["step_seconds"] == pytest.approx(p["step_seconds"])
    assert got["train_flops"] == pytest.approx(1e17, rel=0.02) and got["loss"]["interval"] is None
    assert got["prediction"]["step_seconds"] > 0 and got["run_args"][-1] == "--config.mesh.preset=gpu-8"
    assert "predicted loss L(N, D) =" in plan_out and plan_out.splitlines()[0].split()[:3] == [
        "round",
        "MFU",
        "used",
    ]


# A module by hand: 16 trips of a loop that slices 4 rows of x (64×16 fp32), multiplies them by w (16×32) and
# writes them back in place; then a copy of x. The loop's condition computation runs no kernel of note.
LOOP_HLO = """HloModule by_hand

%fused_slice (param_0: f32[64,16], param_1: s32[]) -> f32[4,16] {
  %param_0 = f32[64,16]{1,0} parameter(0)
  %param_1 = s32[] parameter(1)
  %zero = s32[] constant(0)
  %ds = f32[4,16]{1,0} dynamic-slice(%param_0, %param_1, %zero), dynamic_slice_sizes={4,16}
  ROOT %neg = f32[4,16]{1,0} negate(%ds)
}

%fused_dot (param_0.1: f32[4,16], param_1.1: f32[16,32]) -> f32[4,32] {
  %param_0.1 = f32[4,16]{1,0} parameter(0)
  %param_1.1 = f32[16,32]{1,0} parameter(1)
  %dot = f32[4,32]{1,0} dot(%param_0.1, %param_1.1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  ROOT %tanh = f32[4,32]{1,0} tanh(%dot)
}

%fused_update (param_0.2: f32[64,16], param_1.2: f32[4,16], param_2.2: s32[]) -> f32[64,16] {
  %param_0.2 = f32[64,16]{1,0} parameter(0)
  %param_1.2 = f32[4,16]{1,0} parameter(1)
  %param_2.2 = s32[] parameter(2)
  %zero.1 = s32[] constant(0)
  ROOT %dus = f32[64,16]{1,0} dynamic-update-slice(%param_0.2, %param_1.2, %param_2.2, %zero.1)
}

%body (state: (s32[], f32[64,16], f32[16,32])) -> (s32[], f32[64,16], f32[16,32]) {
  %state = (s32[], f32[64,16]{1,0}, f32[16,32]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%state), index=0
  %x = f32[64,16]{1,0} get-tuple-element(%state), index=1
  %w = f32[16,32]{1,0} get-tuple-element(%state), index=2
  %rows = f32[4,16]{1,0} fusion(%x, %i), kind=kLoop, calls=%fused_slice
  %y = f32[4,32]{1,0} fusion(%rows, %w), kind=kOutput, calls=%fused_dot
  %x.1 = f32[64,16]{1,0} fusion(%x, %rows, %i), kind=kLoop, calls=%fused_update
  %one = s32[] constant(1)
  %i.1 = s32[] add(%i, %one)
  ROOT %next = (s32[], f32[64,16]{1,0}, f32[16,32]{1,0}) tuple(%i.1, %x.1, %w)
}

%cond (state.1: (s32[], f32[64,16], f32[16,32])) -> pred[] {
  %state.1 = (s32[], f32[64,16]{1,0}, f32[16,32]{1,0}) parameter(0)
  %i.2 = s32[] get-tuple-element(%state.1), index=0
  %trips = s32[] constant(16)
  ROOT %more = pred[] compare(%i.2, %trips), direction=LT
}

ENTRY %main (x.2: f32[64,16], w.2: f32[16,32]) -> f32[64,16] {
  %x.2 = f32[64,16]{1,0} parameter(0)
  %w.2 = f32[16,32]{1,0} parameter(1)
  %zero.2 = s32[] constant(0)
  %init = (s32[], f32[64,16]{1,0}, f32[16,32]{1,0}) tuple(%zero.2, %x.2, %w.2)
  %loop = (s32[], f32[64,16]{1,0}, f32[16,32]{1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"16"}}
  %out = f32[64,16]{1,0} get-tuple-element(%loop), index=1
  ROOT %copy = f32[64,16]{1,0} copy(%out)
}
"""


def test_kernels_of_a_module_by_hand():
    """Each kernel's runs, matmul FLOPs and bytes: the slice fusion reads only its 4 rows (and the index), the
    matmul fusion its operands, the update fusion writes only its rows in place; the loop runs 16 times."""
    rows, w, y, x, index = 4 * 16 * F32, 16 * 32 * F32, 4 * 32 * F32, 64 * 16 * F32, 4
    got = {k.name: (k.opcode, k.runs, k.flops, k.bytes) for k in perf_model.hlo_kernels(LOOP_HLO)}
    assert got == {
        "rows": ("fusion", 16, 0.0, rows + index + rows),
        "y": ("fusion", 16, 2.0 * 4 * 32 * 16, rows + w + y),
        "x.1": ("fusion", 16, 0.0, rows + index + rows),
        "i.1": ("add", 16, 0.0, 3 * index),
        "copy": ("copy", 1, 0.0, 2 * x),
    }
    dots = {k.name: k.dots for k in perf_model.hlo_kernels(LOOP_HLO) if k.dots}
    assert dots == {"y": (perf_model.Dot((4, 16), (16, 32), (((1,), (0,)), ((), ()))),)}


def _free(rhs, dimension_numbers) -> int:
    """The product of rhs's dims that are neither contracted nor batch dims."""
    (_, contracting), (_, batch) = dimension_numbers
    return int(np.prod([d for i, d in enumerate(rhs) if i not in contracting + batch]))


def test_a_matmul_is_timed_as_a_plain_jitted_matmul_takes():
    """measure_dot_seconds against a hand timing (median of 9 jitted calls, the same statistic) of the same
    product, for a large matmul (5.4 GFLOPs: timed call by call) and a small batched one (timed in a loop):
    within a factor 2 of it, and never much faster than the large matmul's rate. The tests run two to a
    machine, so a neighbour's burst can slow either side: each figure is the best of three interleaved trials."""
    rng = np.random.default_rng(0)

    def by_hand(subscripts, lhs, rhs):
        a, b = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in (lhs, rhs))
        product = jax.jit(lambda a, b: jnp.einsum(subscripts, a, b))
        product(a, b).block_until_ready()
        times = []
        for _ in range(9):
            start = time.perf_counter()
            product(a, b).block_until_ready()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    def closest_to_one(ratios):
        return min(ratios, key=lambda r: abs(np.log(r)))

    large_dims = ((2048, 1024), (1280, 1024), (((1,), (1,)), ((), ())))
    small_dims = ((64, 96, 32), (64, 128, 32), (((2,), (2,)), ((0,), (0,))))
    large, small, rates = [], [], []
    for _ in range(3):
        large_seconds = hardware.measure_dot_seconds(*large_dims)
        large.append(large_seconds / by_hand("mk,nk->mn", *large_dims[:2]))
        small_seconds = hardware.measure_dot_seconds(*small_dims)
        small.append(small_seconds / by_hand("bqd,bkd->bqk", *small_dims[:2]))
        rates.append((small_seconds / (2 * 64 * 96 * 128 * 32)) / (large_seconds / (2 * 2048 * 1024 * 1280)))
    assert 0.5 < closest_to_one(large) < 2
    assert 0.5 < closest_to_one(small) < 2
    assert max(rates) > 0.9


def test_cpu_prediction_is_the_kernel_roofline_of_the_compiled_step():
    """The CPU step time: per kernel of the compiled tiny step (2 microbatches, 3 scanned layers: loops),
    max(FLOPs / peak, bytes / fresh bandwidth) for its first run and at the reused-buffer bandwidth for the
    others, summed; its kernels hold every matmul FLOP that XLA's loop-aware count finds."""
    cfg = _tiny()
    mesh = mesh_lib.make_mesh(cfg.mesh, jax.devices()[:1])
    shapes = jax.eval_shape(lambda: train.init_state(cfg, jax.random.key(0)))
    step = mesh_lib.jit_train_step(cfg, mesh, train.make_train_step(cfg), shapes)
    ids = jax.ShapeDtypeStruct((2, 8, cfg.data.seq_len), jnp.int32)
    hlo = step.lower(mesh_lib.sharded_shapes(cfg, mesh, shapes), {"inputs": ids, "targets": ids}).compile()
    kernels = perf_model.hlo_kernels(hlo.as_text())
    assert sum(k.runs * k.flops for k in kernels) == pytest.approx(aot.hlo_matmul_flops(hlo.as_text()))
    assert max(k.runs for k in kernels) >= cfg.train.microbatches * cfg.model.n_layers

    for k in kernels:  # each kernel's matmuls, read with their operand dims, hold its FLOPs
        assert sum(2 * np.prod(d.lhs) * _free(d.rhs, d.dimension_numbers) for d in k.dots) == k.flops

    peak, fresh, reused = 4e11, 1.5e10, 6e10
    # a matmul's time: its FLOPs at half the peak when its rhs is a matrix, at the peak otherwise
    seconds = {d: d.flops / (peak / 2 if len(d.rhs) == 2 else peak) for k in kernels for d in k.dots}
    compute = [sum(seconds[d] for d in k.dots) for k in kernels]
    first = [max(c, k.bytes / fresh) for c, k in zip(compute, kernels, strict=True)]
    later = [(k.runs - 1) * max(c, k.bytes / reused) for c, k in zip(compute, kernels, strict=True)]
    got = perf_model.predict_kernels(kernels, seconds.get, fresh, reused, peak, 16 * 64, 1e9)
    assert got.seconds == pytest.approx(sum(first) + sum(later), rel=1e-12)
    assert got.compute_seconds == pytest.approx(
        sum(k.runs * c for c, k in zip(compute, kernels, strict=True))
    )
    assert got.memory_seconds == pytest.approx(
        sum(k.bytes / fresh + (k.runs - 1) * k.bytes / reused for k in kernels)
    )
    assert got.collective_seconds == {} and got.bound in ("compute", "memory")
    assert got.mfu == pytest.approx(1e9 / (got.seconds * peak))
    assert got.tokens_per_second == pytest.approx(16 * 64 / got.seconds)
    slow = perf_model.predict_kernels(kernels, lambda d: d.flops / 1e6, fresh, reused, peak, 16 * 64, 1e9)
    assert slow.bound == "compute" and slow.seconds >= slow.compute_seconds


@pytest.mark.parametrize(
    "lhs, rhs, numbers, whole",
    [
        ((24576, 768), (768, 50257), (((1,), (0,)), ((), ())), False),  # 111M's logits
        (
            (50257, 24576),
            (24576, 768),
            (((1,), (0,)), ((), ())),
            False,
        ),  # its weight gradient: long contraction
        ((12, 8, 2048, 64), (12, 8, 2048, 64), (((3,), (3,)), ((0, 1), (0, 1))), False),  # attention scores
        ((3, 96, 40), (40, 7), (((2,), (0,)), ((), ())), True),  # small: run whole
    ],
)
def test_a_matmul_too_large_to_run_is_timed_as_a_slice_and_scaled_by_flops(
    monkeypatch, lhs, rhs, numbers, whole
):
    """dot_timer runs at most TIMED_DOT_MAX_FLOPS in arrays of at most TIMED_DOT_MAX_BYTES (a still large
    matmul, so at the matmul rate), and scales the time by FLOPs: with a stand-in timer at 1e11 FLOP/s (FLOPs
    and bytes counted here from the dims it was given), the whole matmul's time comes back."""
    ran = []

    def at_1e11(lhs, rhs, numbers):
        (lhs_contracting, rhs_contracting), (lhs_batch, rhs_batch) = numbers
        assert [lhs[i] for i in lhs_contracting + lhs_batch] == [rhs[i] for i in rhs_contracting + rhs_batch]
        free = math.prod(d for i, d in enumerate(rhs) if i not in rhs_contracting + rhs_batch)
        output = math.prod(lhs) // math.prod(lhs[i] for i in lhs_contracting) * free
        ran.append((2 * math.prod(lhs) * free, 4 * max(math.prod(lhs), math.prod(rhs), output)))
        return ran[-1][0] / 1e11

    monkeypatch.setattr(hardware, "measure_dot_seconds", at_1e11)
    (_, rhs_contracting), (_, rhs_batch) = numbers
    full = (
        2 * math.prod(lhs) * math.prod(d for i, d in enumerate(rhs) if i not in rhs_contracting + rhs_batch)
    )
    assert perf_model.dot_timer()(perf_model.Dot(lhs, rhs, numbers)) == pytest.approx(full / 1e11, rel=1e-12)
    ((flops_run, bytes_run),) = ran
    assert flops_run <= perf_model.TIMED_DOT_MAX_FLOPS and bytes_run <= perf_model.TIMED_DOT_MAX_BYTES
    assert flops_run == full if whole else perf_model.TIMED_DOT_MAX_FLOPS / 16 <= flops_run < full
