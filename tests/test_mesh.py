"""Meshes, sharding rules and the AOT plan on 8 fake CPU devices (conftest sets XLA_FLAGS).

Golden PartitionSpecs per preset (MaxText style), sharded training equal to one device, one-line errors for
meshes and shapes that do not fit, and XLA's per-device memory and FLOPs against analytic counts.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from chinchax.config import ConfigError, d_ffn, validate
from chinchax.dryrun import aot
from chinchax.model import flops
from chinchax.parallel import mesh, perf_model
from chinchax.training import train
from experiments import configs

# The sharding of every parameter of a Cerebras-GPT model, by preset. Weight streaming (cpu / wse-N) and the
# tensor-parallel pods differ only in the tied embedding: GPT-2's 50257-token vocabulary does not split in 2.
WEIGHT_STREAMING_SPECS = {
    "blocks/attn_out/bias": P(None, "fsdp"),
    "blocks/attn_out/kernel": P(None, "tensor", None, "fsdp"),
    "blocks/fc1/bias": P(None, "tensor"),
    "blocks/fc1/kernel": P(None, "fsdp", "tensor"),
    "blocks/fc2/bias": P(None, "fsdp"),
    "blocks/fc2/kernel": P(None, "tensor", "fsdp"),
    "blocks/ln_1/bias": P(None, "fsdp"),
    "blocks/ln_1/scale": P(None, "fsdp"),
    "blocks/ln_2/bias": P(None, "fsdp"),
    "blocks/ln_2/scale": P(None, "fsdp"),
    "blocks/qkv/bias": P(None, None, "tensor", None),
    "blocks/qkv/kernel": P(None, "fsdp", None, "tensor", None),
    "ln_f/bias": P("fsdp"),
    "ln_f/scale": P("fsdp"),
    "position_embed": P(None, "fsdp"),
    "token_embed/embedding": P("tensor", "fsdp"),
}
TENSOR_PARALLEL_SPECS = {
    "blocks/attn_out/bias": P(None, "fsdp"),
    "blocks/attn_out/kernel": P(None, "tensor", None, "fsdp"),
    "blocks/fc1/bias": P(None, "tensor"),
    "blocks/fc1/kernel": P(None, "fsdp", "tensor"),
    "blocks/fc2/bias": P(None, "fsdp"),
    "blocks/fc2/kernel": P(None, "tensor", "fsdp"),
    "blocks/ln_1/bias": P(None, "fsdp"),
    "blocks/ln_1/scale": P(None, "fsdp"),
    "blocks/ln_2/bias": P(None, "fsdp"),
    "blocks/ln_2/scale": P(None, "fsdp"),
    "blocks/qkv/bias": P(None, None, "tensor", None),
    "blocks/qkv/kernel": P(None, "fsdp", None, "tensor", None),
    "ln_f/bias": P("fsdp"),
    "ln_f/scale": P("fsdp"),
    "position_embed": P(None, "fsdp"),
    "token_embed/embedding": P(None, "fsdp"),
}
GOLDEN = [
    ("cpu", 8, {"data": 8, "fsdp": 1, "tensor": 1}, WEIGHT_STREAMING_SPECS),
    ("wse-16", 16, {"data": 1, "fsdp": 16, "tensor": 1}, WEIGHT_STREAMING_SPECS),
    ("gpu-8", 8, {"data": 1, "fsdp": 4, "tensor": 2}, TENSOR_PARALLEL_SPECS),
    ("tpu-v5e-16", 16, {"data": 1, "fsdp": 8, "tensor": 2}, TENSOR_PARALLEL_SPECS),
]


def _flat(tree) -> dict:
    leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: isinstance(x, P))
    return {"/".join(k.key for k in path): leaf for path, leaf in leaves}


@pytest.mark.parametrize("preset, devices, shape, expected", GOLDEN)
def test_golden_param_specs(preset, devices, shape, expected):
    cfg = validate(configs.get("chinchilla_2.7b"))
    cfg.mesh.preset = preset
    abstract = mesh.abstract_mesh(cfg.mesh, devices)
    assert dict(abstract.shape) == shape
    assert _flat(mesh.param_specs(cfg, abstract)) == expected


def _tiny(shape=(0, 0, 0)):
    """d64 cpu_tiny with an even vocabulary (264, splits over 'tensor'), 64-token sequences, 2 microbatches of 8."""
    cfg = configs.get("cpu_tiny")
    cfg.model.update(vocab_size=264, d_model=64, n_heads=4)
    cfg.data.seq_len = 64
    cfg.train.update(batch_size=16, microbatches=2)
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = shape
    return validate(cfg)


def _batches(cfg, seed, steps=3):
    rng = np.random.default_rng(seed)
    shape = (steps, cfg.train.microbatches, 8, cfg.data.seq_len + 1)
    tokens = rng.integers(0, cfg.model.vocab_size, size=shape, dtype=np.int32)
    return [{"inputs": t[..., :-1], "targets": t[..., 1:]} for t in tokens]


@pytest.fixture(scope="module")
def seed() -> int:
    """Fresh per run (printed in failure messages): initialisation and batches of the sharded-vs-one-device runs."""
    return int(np.random.default_rng().integers(2**31))


@pytest.fixture(scope="module")
def single_device_losses(seed):
    cfg = _tiny()
    step = jax.jit(train.make_train_step(cfg))  # one device, nothing sharded: the reference
    state = train.init_state(cfg, jax.random.key(seed))
    losses = []
    for batch in _batches(cfg, seed):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return losses


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_sharded_training_equals_one_device(shape, seed, single_device_losses):
    cfg = _tiny(shape)
    devices = mesh.make_mesh(cfg.mesh)
    assert tuple(devices.shape.values()) == shape
    state = mesh.init_sharded_state(cfg, devices, train.init_state, jax.random.key(seed))
    step = mesh.jit_train_step(cfg, devices, train.make_train_step(cfg), jax.eval_shape(lambda: state))
    losses = []
    for batch in _batches(cfg, seed):
        state, metrics = step(state, jax.device_put(batch, mesh.batch_sharding(devices)))
        losses.append(float(metrics["loss"]))
    np.testing.assert_allclose(losses, single_device_losses, rtol=0, atol=1e-5, err_msg=f"seed {seed}")
    assert losses[0] != losses[-1], f"the state must change between steps (seed {seed})"
    kernel = state.params["blocks"]["fc1"]["kernel"]
    assert kernel.sharding.spec == P(None, "fsdp", "tensor")
    assert kernel.addressable_shards[0].data.shape == (2, 64 // shape[1], 256 // shape[2])
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.shape == kernel.shape]
    assert moments and all(m.sharding == kernel.sharding for m in moments), "Adam moments follow params"
    scalars = [x for x in jax.tree.leaves(state.opt_state) if x.ndim == 0]
    assert scalars and all(s.sharding.is_fully_replicated for s in scalars)


def test_activation_constraints_reach_the_compiled_step():
    cfg = _tiny((2, 2, 2))
    devices = mesh.make_mesh(cfg.mesh)
    shapes = jax.eval_shape(lambda: train.init_state(cfg, jax.random.key(0)))
    tokens = jax.ShapeDtypeStruct((2, 8, cfg.data.seq_len), jnp.int32, sharding=mesh.batch_sharding(devices))
    step = mesh.jit_train_step(cfg, devices, train.make_train_step(cfg), shapes)
    text = step.lower(shapes, {"inputs": tokens, "targets": tokens}).as_text()
    # Five with_logical_constraint calls in the forward pass (embedding, qkv, mlp, block output, logits).
    assert text.count("sharding_constraint") >= 5


@pytest.mark.parametrize("attention", ["blockwise", "pallas"])
def test_attention_kernels_run_on_each_devices_own_rows(attention):
    """On a data-parallel mesh the step's one collective is the gradient all-reduce: a kernel XLA cannot split
    (a loop over rows, a Pallas call) must not gather the batch's activations onto every device."""
    cfg = _tiny((8, 1, 1))
    cfg.model.attention = attention
    compiled = aot.compile_step(cfg, devices=8).compiled
    moved = perf_model.collective_bytes(compiled.as_text(), {"data": 8, "fsdp": 1, "tensor": 1})
    assert set(moved) == {"all-reduce on data"}, moved


def test_fsdp_gathers_weights_within_each_data_replica():
    """With data replicas beside FSDP, each replica gathers its weights over 'fsdp' alone: read from the
    compiled step (XLA names these groups as a mesh of device ids), no gather crosses 'data'."""
    cfg = _tiny((4, 2, 1))
    cfg.train.microbatches = 1
    moved = perf_model.collective_bytes(
        aot.compile_step(cfg, devices=8).compiled.as_text(), {"data": 4, "fsdp": 2, "tensor": 1}
    )
    assert {kind for kind in moved if kind.startswith("all-gather")} == {"all-gather on fsdp"}, moved


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2)])
def test_gradients_cross_data_once_a_step_whatever_the_microbatches(shape):
    """Each replica sums its own microbatches' gradients: the bytes that cross 'data' in a step are the same
    for 2 and 4 microbatches (XLA left alone reduces every microbatch's gradients where they are made)."""
    sizes = dict(zip(("data", "fsdp", "tensor"), shape, strict=True))
    crossing_data = []
    for microbatches in (2, 4):
        cfg = _tiny(shape)
        cfg.train.update(batch_size=8 * microbatches, microbatches=microbatches)
        moved = perf_model.collective_bytes(aot.compile_step(cfg, devices=8).compiled.as_text(), sizes)
        crossing_data.append(sum(b for kind, b in moved.items() if "data" in kind.split(" on ")[1]))
    assert crossing_data[0] > 0
    assert crossing_data[1] == pytest.approx(crossing_data[0], rel=0.01), crossing_data


@pytest.mark.parametrize(
    "spec, devices, match",
    [
        ("gpu-8", 4, "needs 8 devices, 4 are given"),
        ("tpu-v5e-16", 8, "needs 16 devices, 8 are given"),
        ("cpu", 6, None),
        ("h100-9000", 8, "unknown mesh preset 'h100-9000'"),
        ("wse-0", 8, "unknown mesh preset"),
    ],
)
def test_mesh_that_does_not_fit_fails_in_one_line(spec, devices, match):
    if match is None:
        assert mesh.mesh_shape(spec, devices) == {"data": 6, "fsdp": 1, "tensor": 1}
        return
    with pytest.raises(ConfigError, match=match) as error:
        mesh.make_mesh(spec, jax.devices()[:devices])
    assert "\n" not in str(error.value)


def test_config_overrides_that_do_not_fit_fail_in_one_line():
    cfg = _tiny((3, 0, 0))
    with pytest.raises(ConfigError, match=r"needs 3 devices, 8 are given|do not split") as error:
        mesh.make_mesh(cfg.mesh)
    assert "\n" not in str(error.value)
    cfg.mesh.update(data=-1)
    with pytest.raises(ConfigError, match="mesh.data=-1 must be an int >= 0"):
        validate(cfg)


def test_shapes_that_do_not_divide_fail_before_compiling():
    cfg = _tiny((2, 2, 2))
    cfg.model.vocab_size = 257  # odd: cannot split over tensor = 2
    devices = mesh.make_mesh(cfg.mesh)
    with pytest.raises(ConfigError, match=r"token_embed/embedding dim 0 \('vocab'\) = 257 .* tensor = 2"):
        mesh.param_shardings(cfg, devices)


@pytest.mark.parametrize("shape", [(8, 1, 1), (1, 8, 1)])
def test_a_microbatch_that_does_not_split_is_padded_and_trains_as_the_exact_batch(shape):
    """12 sequences per microbatch over 8 batch shards: 4 padding rows per microbatch carry no loss, so the
    losses and parameters equal one device training on the 12 real sequences."""
    seed = int(np.random.default_rng().integers(2**31))
    reference_cfg = _tiny()
    reference_cfg.train.update(batch_size=24, microbatches=2)
    cfg = _tiny(shape)
    cfg.train.update(batch_size=24, microbatches=2)
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg.model.vocab_size, size=(3, 2, 12, cfg.data.seq_len + 1), dtype=np.int32)
    batches = [{"inputs": t[..., :-1], "targets": t[..., 1:]} for t in tokens]

    step = jax.jit(train.make_train_step(reference_cfg))
    expected = train.init_state(reference_cfg, jax.random.key(seed))
    expected_losses = []
    for batch in batches:
        expected, metrics = step(expected, batch)
        expected_losses.append(float(metrics["loss"]))

    devices = mesh.make_mesh(cfg.mesh)
    assert mesh.padded_microbatch(devices, 12) == 16
    state = mesh.init_sharded_state(cfg, devices, train.init_state, jax.random.key(seed))
    sharded_step = mesh.jit_train_step(
        cfg, devices, train.make_train_step(cfg), jax.eval_shape(lambda: state)
    )
    losses = []
    for batch in batches:
        micro = [{key: batch[key][i] for key in batch} for i in range(2)]
        global_batch = train._global_batch(devices, micro, 12)
        assert global_batch["targets"].shape == (2, 16, cfg.data.seq_len)
        state, metrics = sharded_step(state, global_batch)
        losses.append(float(metrics["loss"]))
    np.testing.assert_allclose(losses, expected_losses, rtol=0, atol=1e-5, err_msg=f"seed {seed}")
    for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(expected.params), strict=True):
        np.testing.assert_allclose(
            np.asarray(got), np.asarray(want), rtol=0, atol=1e-5, err_msg=f"seed {seed}"
        )


def test_process_rows_cover_the_batch_in_one_process():
    devices = mesh.make_mesh(_tiny((2, 4, 1)).mesh)
    assert mesh.process_batch_rows(devices, 16) == slice(0, 16)


def test_hlo_matmul_flops_counts_loop_trips():
    def layers(w, x):
        return jax.lax.scan(lambda c, wi: (jnp.tanh(c @ wi), None), x, w)[0].sum()

    w, x = jnp.ones((10, 48, 48)), jnp.ones((32, 48))
    compiled = jax.jit(layers).lower(w, x).compile()
    expected = 10 * 2 * 32 * 48 * 48  # ten (32×48)·(48×48) matmuls
    assert aot.hlo_matmul_flops(compiled.as_text()) == expected
    assert compiled.cost_analysis()["flops"] < expected / 5, "XLA's own count sees the loop body once"


def test_aot_plan_memory_and_flops_match_analytic_counts():
    cfg = _tiny()
    cfg.model.vocab_size = 257
    cfg.model.attention = "xla"  # the whole-score matmuls the analytic count describes (blockwise recomputes)
    plan = aot.compile_plan(cfg, "wse-8", devices=8)
    assert plan["shape"] == {"data": 1, "fsdp": 8, "tensor": 1}
    # Analytic: every parameter is split 8 ways except the qkv and fc1 biases (their 'heads' / 'mlp' axes
    # map to the unused tensor axis); params, Adam μ and ν are fp32; step and two optax counts are int32.
    m = cfg.model
    replicated = m.n_layers * (3 * m.d_model + d_ffn(m))
    per_device_params = replicated + (flops.param_count(m) - replicated) // 8
    state = 3 * 4 * per_device_params + 3 * 4
    batch = 2 * cfg.train.microbatches * (8 // 8) * cfg.data.seq_len * 4  # inputs + targets, int32
    memory = plan["memory_per_device_bytes"]
    assert plan["state_bytes_per_device"] == state
    assert memory["arguments"] == state + batch
    assert memory["aliased"] == state, "the state is donated"
    assert memory["total"] >= memory["arguments"] + memory["temporaries"] - memory["aliased"]
    # FSDP computes nothing twice: XLA's matmuls over all devices are exactly the analytic count.
    step_tokens = cfg.train.batch_size * cfg.data.seq_len
    analytic = flops.flops_per_token(m, cfg.data.seq_len) * step_tokens
    assert plan["flops_per_step"]["analytic"] == analytic
    assert plan["flops_per_step"]["xla_matmul_total"] == analytic
    assert plan["flops_per_step"]["xla_cost_analysis_per_device"] < analytic / 8
    assert plan["compile_seconds"] > 0 and plan["padded_microbatch"] is None


def test_aot_plan_pads_a_microbatch_that_does_not_split():
    cfg = _tiny()
    cfg.model.vocab_size = 257
    cfg.train.update(batch_size=12, microbatches=1)
    plan = aot.compile_plan(cfg, "cpu", devices=8)
    assert plan["padded_microbatch"] == {"from": 12, "to": 16}
    assert plan["batch"]["sequences"] == 16
