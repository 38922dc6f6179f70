"""The training paths other than the default: bfloat16 compute, gradient accumulation, a batch-size ramp, and
the model's alternative implementations (Pallas and blockwise attention, the chunked loss, remat 'dots' /
'full', unrolled layers).

The code under test is the public training API (`train.make_train_step`, `train.loss_fn`, `state.init_state`,
`train.train`); each reference is the plain path (fp32, one microbatch, XLA attention, dense loss, no remat,
scanned layers) run on the same fresh random params and tokens, or a schedule written out here. Seeds are drawn
per run and printed in every failure message.
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chinchax import config
from chinchax.model import gpt
from chinchax.training import state as train_state
from chinchax.training import train
from experiments import configs

IGNORE = -1  # a target that carries no loss (the padding rows the loop adds to a microbatch)


def fresh_seed() -> int:
    return int(np.random.SeedSequence().entropy % 2**31)


def tiny(**overrides):
    """cpu_tiny (2 layers, d_model 32, byte vocabulary) with short sequences; overrides as {"a.b": value}."""
    cfg = configs.get("cpu_tiny")
    cfg.data.seq_len = 64
    cfg.train.update(batch_size=8, tokens=8 * 64 * 24, warmup_tokens=8 * 64 * 4)
    for key, value in overrides.items():
        section, field = key.split(".")
        cfg[section][field] = value
    return config.validate(cfg)


def random_params(cfg, seed):
    """Initialised params plus noise, so biases and LayerNorm parameters are not at their init values."""
    params = train_state.init_state(cfg, jax.random.key(seed)).params
    leaves, treedef = jax.tree.flatten(params)
    rng = np.random.default_rng(seed)
    noisy = [x + 0.02 * rng.standard_normal(x.shape).astype(np.float32) for x in leaves]
    return jax.tree.unflatten(treedef, [jnp.asarray(x) for x in noisy])


def random_tokens(cfg, seed, sequences, ignored_rows=()):
    """(inputs, targets) int32 (sequences, seq_len); the listed rows' targets are IGNORE (padding)."""
    rng = np.random.default_rng(seed + 1)
    tokens = rng.integers(0, cfg.model.vocab_size, (sequences, cfg.data.seq_len + 1), dtype=np.int32)
    inputs, targets = tokens[:, :-1], tokens[:, 1:].copy()
    targets[list(ignored_rows)] = IGNORE
    return jnp.asarray(inputs), jnp.asarray(targets)


def relative_error(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def metrics(workdir):
    return [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def train_run(cfg, workdir):
    summary = train.train(cfg, workdir, show_progress=False)
    return summary, metrics(workdir)


# --- bfloat16 compute ---------------------------------------------------------------------------------------

BF16_MAX_LOSS_GAP = 0.02
BF16_MEAN_LOSS_GAP = 0.005


def test_bfloat16_compute_tracks_fp32_losses_and_keeps_fp32_state(tmp_path):
    """24 steps of cpu_tiny (seq 64, batch 8) with model.compute_dtype=bfloat16 against the same run in fp32.

    Bound: every logged loss within 0.02 nats of the fp32 run's, and their mean gap within 0.005. Measured
    here over 32 steps and five seeds: largest gap 0.0027, mean gap 0.0001-0.0005 (the losses fall from 5.5 to
    about 3.7). The bf16 losses must also differ from fp32's (the bf16 path is really taken). Params and Adam's
    moments stay float32 through the jitted step.
    """
    seed = fresh_seed()
    runs = {}
    for dtype in ("float32", "bfloat16"):
        cfg = tiny(
            **{
                "model.compute_dtype": dtype,
                "train.seed": seed,
                "train.log_every": 1,
                "train.eval_batches": 1,
                "train.checkpoint_every": 1000,
            }
        )
        runs[dtype] = train_run(cfg, tmp_path / dtype)
    fp32 = np.array([r["loss"] for r in runs["float32"][1]])
    bf16 = np.array([r["loss"] for r in runs["bfloat16"][1]])
    gap = np.abs(bf16 - fp32)
    context = f"seed {seed}: fp32 {fp32.round(4).tolist()}, bf16 {bf16.round(4).tolist()}"
    assert len(fp32) == len(bf16) == 24, context
    assert np.mean(fp32[-4:]) < np.mean(fp32[:4]) - 0.5, f"the fp32 run did not learn; {context}"
    assert gap.max() <= BF16_MAX_LOSS_GAP, (gap.max(), context)
    assert gap.mean() <= BF16_MEAN_LOSS_GAP, (gap.mean(), context)
    assert gap.max() > 0, f"bfloat16 gave fp32's losses bit for bit: its path is not taken; {context}"
    gaps = {
        k: abs(runs["bfloat16"][0][k] - runs["float32"][0][k]) for k in ("final_eval_loss", "final_test_loss")
    }
    assert max(gaps.values()) <= BF16_MAX_LOSS_GAP, (gaps, context)

    cfg = tiny(**{"model.compute_dtype": "bfloat16"})
    state = train_state.init_state(cfg, jax.random.key(seed))
    step = jax.jit(train.make_train_step(cfg))
    inputs, targets = random_tokens(cfg, seed, 8)
    for _ in range(2):
        state, out = step(state, {"inputs": inputs[None], "targets": targets[None]})
    assert out["loss"].dtype == jnp.float32 and np.isfinite(out["loss"]), f"seed {seed}"
    for path, x in jax.tree_util.tree_flatten_with_path((state.params, state.opt_state))[0]:
        if jnp.issubdtype(x.dtype, jnp.floating):
            assert x.dtype == jnp.float32, (jax.tree_util.keystr(path), x.dtype, f"seed {seed}")
    adam = [
        s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda s: hasattr(s, "mu")) if hasattr(s, "mu")
    ]
    assert len(adam) == 1, "no Adam state found"
    for moments in (adam[0].mu, adam[0].nu):
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(moments)), f"seed {seed}"
        assert any(np.any(np.asarray(x) != 0) for x in jax.tree.leaves(moments)), f"seed {seed}"


# --- gradient accumulation and the batch-size ramp -----------------------------------------------------------


def test_two_microbatches_give_the_same_update_as_one():
    """One step on 8 sequences (two of them padding rows with IGNORE targets, as the loop pads a microbatch),
    as one microbatch of 8 and as train.microbatches=2 of 4: the same loss, gradient norm, gradients (Adam's
    first moment after one step is (1 - β1) · the clipped gradients), second moments and new params (where Adam's
    first step is well conditioned)."""
    seed = fresh_seed()
    one, two = tiny(), tiny(**{"train.microbatches": 2})
    params = random_params(one, seed)
    inputs, targets = random_tokens(one, seed, 8, ignored_rows=(3, 7))
    results = {}
    for name, cfg in (("one", one), ("two", two)):
        count = cfg.train.microbatches
        batch = {
            "inputs": inputs.reshape(count, 8 // count, -1),
            "targets": targets.reshape(count, 8 // count, -1),
        }
        state = train_state.new_state(cfg, params)
        results[name] = jax.jit(train.make_train_step(cfg))(state, batch)
    (state_1, metrics_1), (state_2, metrics_2) = results["one"], results["two"]
    context = f"seed {seed}"
    assert float(metrics_2["loss"]) == pytest.approx(float(metrics_1["loss"]), rel=1e-6), context
    assert float(metrics_2["grad_norm"]) == pytest.approx(float(metrics_1["grad_norm"]), rel=1e-5), context
    assert float(metrics_1["grad_norm"]) > 0, context
    adam = lambda s: [
        x for x in jax.tree.leaves(s.opt_state, is_leaf=lambda x: hasattr(x, "mu")) if hasattr(x, "mu")
    ][0]
    for what, a, b in (
        ("mu", adam(state_1).mu, adam(state_2).mu),
        ("nu", adam(state_1).nu, adam(state_2).nu),
    ):
        for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b), strict=True):
            error = relative_error(y, x)
            assert error <= 1e-5, (what, jax.tree_util.keystr(path), error, context)
    # New params where Adam's first step g / (|g| + ε) is well conditioned: a gradient within 100 ε of zero
    # turns the two summation orders' rounding into an O(1) change of its step (seed 2140868912: one element of
    # 2048, g ≈ 4e-9, moved its parameter by 3.7e-5). Also left out: zero gradients (the key bias, which softmax
    # ignores; embedding rows of bytes absent from the batch).
    conditioned = jax.tree.map(
        lambda m: np.abs(np.asarray(m)) / (1 - one.train.adam_b1) >= 100 * one.train.adam_eps,
        adam(state_1).mu,
    )
    leaves = zip(
        jax.tree_util.tree_flatten_with_path(state_1.params)[0],
        jax.tree.leaves(state_2.params),
        jax.tree.leaves(conditioned),
        strict=True,
    )
    kept = np.mean(np.concatenate([k.ravel() for k in jax.tree.leaves(conditioned)]))
    assert kept > 0.5, (kept, context)  # 85% at that seed: bytes absent from the batch have no gradient
    for (path, x), y, keep in leaves:
        error = relative_error(np.asarray(y)[keep], np.asarray(x)[keep])
        assert error <= 1e-5, ("params", jax.tree_util.keystr(path), error, context)
    assert int(state_2.step) == int(state_1.step) == 1


def expected_tokens_after_each_step(batch_size, ramp, seq_len, total):
    """The batch schedule written out: a step uses the batch size of the ramp phase whose start token has been
    reached by the tokens seen before it; the run stops once it has seen `total` tokens."""
    seen, out = 0, []
    while seen < total:
        size = batch_size
        for start, sequences in ramp:
            if seen >= start:
                size = sequences
        seen += size * seq_len
        out.append(seen)
    return out


def test_batch_ramp_switches_batch_size_at_its_token(tmp_path):
    """train.train across a ramp from 4 to 8 sequences at a token count that is not a step boundary: the
    step at the switch already uses 8 sequences (tokens in metrics.jsonl against the schedule written out
    here), losses stay finite, and the learning rate follows the token schedule (linear decay, no warmup)."""
    seq, switch = 64, 4 * 64 * 5 + 100  # after 5 steps of 256 tokens the switch is not reached: step 6 has 4
    total = 6 * 4 * seq + 4 * 8 * seq
    cfg = tiny(
        **{
            "train.batch_size": 4,
            "train.batch_ramp": ((switch, 8),),
            "train.tokens": total,
            "train.warmup_tokens": 0,
            "train.decay": "linear",
            "train.log_every": 1,
            "train.eval_batches": 1,
            "train.checkpoint_every": 1000,
            "train.seed": fresh_seed(),
        }
    )
    summary, records = train_run(cfg, tmp_path)
    expected = expected_tokens_after_each_step(4, [(switch, 8)], seq, total)
    assert expected == [256 * k for k in range(1, 7)] + [1536 + 512 * k for k in range(1, 5)]
    assert [r["tokens"] for r in records] == expected
    assert [r["step"] for r in records] == list(range(1, len(expected) + 1))
    assert summary["tokens"] == total and summary["steps"] == len(expected)
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"]) for r in records)
    for r in records:
        want = cfg.train.peak_lr * (1 - (1 - cfg.train.end_lr_fraction) * r["tokens"] / total)
        assert r["lr"] == pytest.approx(want, rel=1e-5), r


# --- the model's other paths ----------------------------------------------------------------------------------

PATHS = {
    "pallas attention": {"model.attention": "pallas"},
    "blockwise attention": {"model.attention": "blockwise"},
    "unrolled layers": {"model.layer_loop": "unroll"},
    "chunked loss": {"model.loss": "chunked"},
    "remat dots": {"model.remat": "dots"},
    "remat full": {"model.remat": "full"},
}


@pytest.mark.parametrize("parametrization", ["sp", "mup"])
@pytest.mark.parametrize("path", list(PATHS))
def test_model_paths_match_the_default_loss_and_gradients(path, parametrization):
    """loss_fn's summed loss, token count and gradients (of the mean over real targets) on fresh random
    params and tokens (seq 160: two 128-query blocks for the Pallas kernel, in interpret mode on CPU, and
    64 + 64 + 32 query rows for the blockwise one; 1,280
    tokens: two token chunks for the chunked loss; one padding row) equal the default path's within fp32
    tolerance (relative 1e-5 on the loss, 1e-4 on each gradient)."""
    seed = fresh_seed()
    common = {
        "data.seq_len": 160,
        "model.parametrization": parametrization,
        "model.attention": "xla",
        "model.layer_loop": "scan",
    }
    default, other = tiny(**common), tiny(**{**common, **PATHS[path]})
    params = random_params(default, seed)
    inputs, targets = random_tokens(default, seed, 8, ignored_rows=(5,))

    def loss_and_grads(cfg):
        loss = train.loss_fn(cfg)

        def mean(p):
            total, count = loss(p, inputs, targets)
            return total / count, (total, count)

        return jax.jit(jax.value_and_grad(mean, has_aux=True))(params)

    (mean_0, (total_0, count_0)), grads_0 = loss_and_grads(default)
    (mean_1, (total_1, count_1)), grads_1 = loss_and_grads(other)
    context = f"{path}, {parametrization}, seed {seed}"
    assert int(count_1) == int(count_0) == 7 * 160, context
    assert float(total_1) == pytest.approx(float(total_0), rel=1e-5), context
    assert float(mean_1) == pytest.approx(float(mean_0), rel=1e-5), context
    for (key, g0), g1 in zip(
        jax.tree_util.tree_flatten_with_path(grads_0)[0], jax.tree.leaves(grads_1), strict=True
    ):
        assert g1.dtype == jnp.float32 and g1.shape == g0.shape, (jax.tree_util.keystr(key), context)
        error = relative_error(g1, g0)
        assert error <= 1e-4, (jax.tree_util.keystr(key), error, context)


def test_a_run_with_auto_attention_has_the_losses_of_xla_attention(tmp_path):
    """attention='auto' (the blockwise kernel on CPU) trains with the losses of the whole-score XLA path: 24
    steps of 8 × 160 tokens (three query blocks), every step's loss within 1e-5 relative."""
    seed = fresh_seed()
    runs = {}
    for attention in ("xla", "auto"):
        cfg = tiny(
            **{
                "data.seq_len": 160,
                "model.attention": attention,
                "train.tokens": 24 * 8 * 160,
                "train.log_every": 1,
                "train.eval_batches": 1,
                "train.checkpoint_every": 1000,
                "train.seed": seed,
            }
        )
        runs[attention] = [r["loss"] for r in train_run(cfg, tmp_path / attention)[1]]
    assert gpt.attention_implementation(cfg.model) == "blockwise"  # cfg: the 'auto' run's, on this CPU
    assert len(runs["auto"]) == len(runs["xla"]) > 20, f"seed {seed}"
    np.testing.assert_allclose(runs["auto"], runs["xla"], rtol=1e-5, err_msg=f"seed {seed}")


@pytest.mark.parametrize(
    "backend,dtype,layers,attention,loop",
    [
        ("cpu", "float32", 6, "blockwise", "unroll"),
        ("cpu", "bfloat16", 12, "blockwise", "scan"),
        ("gpu", "bfloat16", 6, "cudnn", "scan"),
        ("gpu", "float32", 6, "pallas", "scan"),
        ("tpu", "bfloat16", 6, "pallas", "scan"),
    ],
)
def test_auto_resolves_per_backend(monkeypatch, backend, dtype, layers, attention, loop):
    """'auto' attention: cuDNN for bf16 on GPU, Pallas flash for fp32 on GPU and on TPU, blockwise on CPU;
    'auto' layer loop: unrolled on CPU up to 8 layers, scanned otherwise."""
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    model = tiny(**{"model.compute_dtype": dtype, "model.n_layers": layers}).model
    assert (gpt.attention_implementation(model), gpt.layer_loop(model)) == (attention, loop)
