"""Generation: the KV cache against full recomputation, sampling filters against numpy, seeds, the command."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chinchax import config
from chinchax.model import gpt, sample
from chinchax.training import checkpoint
from tests.conftest import REPO


def fresh_seed() -> int:
    return int(np.random.SeedSequence().entropy % 2**31)


def tiny_model(vocab_size=211, max_positions=96):
    cfg = config.base_config().model
    cfg.update(vocab_size=vocab_size, max_positions=max_positions, d_model=48, n_layers=3, n_heads=4)
    return cfg


def random_params(cfg, seed, scale=0.3):
    """Fresh init plus N(0, scale) on every parameter, so greedy decoding does not collapse to one token."""
    params = jax.jit(lambda key: gpt.init_params(cfg, key))(jax.random.key(seed))  # eager init is slow
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: x + scale * rng.standard_normal(x.shape, np.float32), params)


def test_cached_decoding_gives_the_full_forward_logits():
    seed = fresh_seed()
    cfg = tiny_model()
    params = random_params(cfg, seed)
    tokens = np.random.default_rng(seed).integers(0, cfg.vocab_size, (2, 37)).astype(np.int32)
    full = np.asarray(gpt.build(cfg).apply({"params": params}, tokens))

    decoder = gpt.build(cfg, decode=True)
    step = jax.jit(lambda cache, t: decoder.apply({"params": params, "cache": cache}, t, mutable=["cache"]))
    cache = gpt.init_cache(cfg, batch=2, length=48)
    pieces = []
    for start, stop in [(0, 11), *((t, t + 1) for t in range(11, 37))]:  # a prompt, then one token at a time
        logits, variables = step(cache, tokens[:, start:stop])
        cache = variables["cache"]
        pieces.append(np.asarray(logits))
    assert int(cache["position"]) == 37
    # fp32 sums in another order: 40 seeds differed by at most 2.3e-6 of the largest logit (~10)
    tolerance = 1e-5 * np.abs(full).max()
    np.testing.assert_allclose(
        np.concatenate(pieces, axis=1), full, atol=tolerance, rtol=0, err_msg=f"seed {seed}"
    )


def test_greedy_with_cache_equals_without():
    seed = fresh_seed()
    cfg = tiny_model()
    params = random_params(cfg, seed)
    prompt = np.random.default_rng(seed).integers(0, cfg.vocab_size, 13).tolist()
    greedy = sample.Sampling(temperature=0)
    cached = sample.generate(cfg, params, prompt, 50, greedy, num_samples=2)
    uncached = sample.generate(cfg, params, prompt, 50, greedy, num_samples=2, use_cache=False)
    assert cached == uncached, f"seed {seed}"
    assert len(cached[0]) == 50 and cached[0] == cached[1]

    full = prompt + cached[0]  # each greedy token is the argmax of the plain forward pass
    logits = np.asarray(gpt.build(cfg).apply({"params": params}, np.array([full], np.int32)))[0]
    np.testing.assert_array_equal(logits[len(prompt) - 1 : -1].argmax(-1), cached[0])


def reference_probs(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """The sampling distribution written out directly in float64: scale, keep top-k, keep the nucleus."""
    z = logits.astype(np.float64) / temperature
    order = np.argsort(-z)
    keep = np.zeros(z.shape, bool)
    keep[order[: top_k or len(z)]] = True
    p = np.exp(z - z.max()) * keep
    p /= p.sum()
    mass = 0.0
    nucleus = np.zeros(z.shape, bool)
    for i in order:
        if not keep[i] or mass >= top_p:
            break
        nucleus[i] = True
        mass += p[i]
    p = p * nucleus
    return p / p.sum()


@pytest.mark.parametrize(
    "temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 9, 1.0), (1.3, 0, 0.6), (0.9, 20, 0.8)]
)
def test_filtered_distribution_matches_reference(temperature, top_k, top_p):
    seed = fresh_seed()
    logits = np.random.default_rng(seed).normal(0, 2.0, (4, 50)).astype(np.float32)
    sampling = sample.Sampling(temperature, top_k, top_p)
    ours = np.asarray(jax.nn.softmax(sample.filter_logits(jnp.asarray(logits), sampling), axis=-1))
    for row in range(4):
        expected = reference_probs(logits[row], temperature, top_k, top_p)
        np.testing.assert_allclose(ours[row], expected, atol=1e-6, err_msg=f"seed {seed}")


def test_sampled_first_tokens_follow_the_model_distribution():
    """4000 draws of the first token after a prompt (cached prefill) against softmax of the plain forward."""
    seed = fresh_seed()
    cfg = tiny_model(vocab_size=23)
    params = random_params(cfg, seed, scale=0.1)
    prompt = np.random.default_rng(seed).integers(0, 23, 9).tolist()
    sampling = sample.Sampling(temperature=1.0, top_p=0.9)
    draws = sample.generate(cfg, params, prompt, 1, sampling, seed=seed, num_samples=4000)
    counts = np.bincount([d[0] for d in draws], minlength=23)
    logits = np.asarray(gpt.build(cfg).apply({"params": params}, np.array([prompt], np.int32)))[0, -1]
    expected = reference_probs(logits, 1.0, 0, 0.9) * 4000
    assert counts[expected == 0].sum() == 0  # nothing outside the nucleus
    chi2 = ((counts - expected)[expected > 0] ** 2 / expected[expected > 0]).sum()
    assert chi2 < 3 * (expected > 0).sum() + 30, (chi2, counts, expected.round(1), seed)


def test_seed_reproduces_and_stops():
    cfg = tiny_model()
    params = random_params(cfg, 0)
    sampling = sample.Sampling(temperature=1.0, top_k=40)
    a = sample.generate(cfg, params, [1, 2, 3], 20, sampling, seed=7, num_samples=3)
    b = sample.generate(cfg, params, [1, 2, 3], 20, sampling, seed=7, num_samples=3, use_cache=False)
    c = sample.generate(cfg, params, [1, 2, 3], 20, sampling, seed=8, num_samples=3)
    assert a == b and a != c
    stopped = sample.generate(
        cfg, params, [1, 2, 3], 20, sampling, seed=7, stop_when=lambda ids: len(ids) == 4
    )
    assert stopped == [a[0][:4]]
    ended = sample.generate(cfg, params, [1, 2, 3], 20, sampling, seed=7, stop_tokens=[a[0][2]])
    assert ended[0] == a[0][: a[0].index(a[0][2]) + 1]
    with pytest.raises(ValueError, match="max_positions"):
        sample.generate(cfg, params, [1] * 90, 10)


def greedy_by_full_forward(cfg, params, prompt: list[int], steps: int, stop: int) -> list[int]:
    """Greedy decoding without a cache or the sampler: rerun the whole sequence, take the last position's argmax,
    stop after the `stop` token."""
    forward = jax.jit(gpt.build(cfg).apply)
    ids = list(prompt)
    for _ in range(steps):
        logits = np.asarray(forward({"params": params}, np.array([ids], np.int32)))[0, -1]
        ids.append(int(np.argmax(logits)))
        if ids[-1] == stop:
            break
    return ids[len(prompt) :]


@pytest.mark.slow  # 24-33 s (a process that restores a checkpoint and compiles); greedy decoding is checked in-process above
def test_sample_command_greedy(tmp_path):
    """`experiments.sample --temperature=0` on a saved run prints the plain greedy continuation (bytes decoded
    here: UTF-8 with replacement, EOS as <|endoftext|>)."""
    seed = fresh_seed()
    cfg = config.base_config()
    cfg.model.update(tiny_model(vocab_size=257).to_dict())
    cfg.data.update(tokenizer="bytes", seq_len=64)
    params = random_params(cfg.model, seed)
    checkpoint.save_params(tmp_path / "run", cfg, params)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.sample",
            f"--workdir={tmp_path / 'run'}",
            "--prompt=Once upon",
            "--max_new_tokens=12",
            "--temperature=0",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    expected = greedy_by_full_forward(cfg.model, params, list(b"Once upon"), 12, stop=256)
    text = bytes(t for t in expected if t != 256).decode("utf-8", "replace")
    text += "<|endoftext|>" * expected.count(256)
    assert report["tokens"] == len(expected), (seed, expected)
    assert report["samples"] == [text], (seed, expected)
