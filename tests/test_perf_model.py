"""The performance model: collective bytes parsed from the HLO of a sharded train step against figures derived
by hand from the sharding rules (chinchax.parallel.mesh) and the model's shapes, and the roofline formula.

The analytic figures: FSDP gathers a block's weights per layer and per microbatch, in the forward pass every
weight and in the backward pass those it multiplies by (kernels, LayerNorm scales; an additive bias is not
needed to differentiate), each all-gather moving (n−1)/n of the gathered (f32 here) array; weights outside
the layer scan (embeddings, final LayerNorm) do not change across microbatches and are gathered once per step.
XLA on CPU sums gradients with all-reduces (2·(n−1)/n of the array) per layer and microbatch, not with
reduce-scatters. Tensor parallelism adds Megatron's activation all-reduces: after attn-out and fc2 in the
forward pass, after qkv and fc1 (their input gradients) in the backward pass.
"""

import dataclasses

import pytest

from chinchax.config import d_ffn, validate
from chinchax.dryrun import aot
from chinchax.parallel import hardware, perf_model
from experiments import configs

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
