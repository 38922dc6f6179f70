"""Held-out evaluation on a tiny prepared store against a plain float64 recomputation; the command's JSON."""

import json
import math
import subprocess
import sys

import jax
import numpy as np
import pytest

from chinchax import config, data
from chinchax.evaluation import evaluate
from chinchax.model import gpt
from chinchax.training import checkpoint
from tests.conftest import REPO

WORDS = "the a river stone runs over under quiet green café naïve 東京 bright small house old".split()


@pytest.fixture(scope="module")
def text_folder(tmp_path_factory):
    """60 documents of random words (some non-ASCII), each starting with an ASCII word."""
    folder = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(int(np.random.SeedSequence().entropy % 2**31))
    for i in range(60):
        words = ["Doc"] + list(rng.choice(WORDS, int(rng.integers(20, 90))))
        (folder / f"doc{i:03d}.txt").write_text(" ".join(words) + ".\n", encoding="utf-8")
    return folder


def run_config(tokenizer: str, store_path) -> config.ml_collections.ConfigDict:
    cfg = config.base_config()
    cfg.model.update(
        vocab_size=config.TOKENIZERS[tokenizer], max_positions=64, d_model=32, n_layers=2, n_heads=2
    )
    cfg.data.update(dataset=str(store_path), tokenizer=tokenizer, seq_len=48)
    return config.validate(cfg)


def random_params(cfg, seed):
    params = jax.jit(lambda key: gpt.init_params(cfg.model, key))(jax.random.key(seed))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: x + 0.2 * rng.standard_normal(x.shape, np.float32), params)


def plain_nats(cfg, params, tokens: np.ndarray, seq_len: int) -> float:
    """Σ -log p(next token) over consecutive windows, from the dense logits in float64 numpy."""
    total = 0.0
    forward = jax.jit(gpt.build(cfg.model).apply)
    for start in range(0, len(tokens) - 1, seq_len):
        window = tokens[start : start + seq_len + 1]
        logits = np.asarray(forward({"params": params}, window[None, :-1]), np.float64)[0]
        log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        total += float((log_z - logits[np.arange(len(window) - 1), window[1:]]).sum())
    return total


@pytest.mark.parametrize("tokenizer", ["bytes", "gpt2"])
def test_loss_and_bits_per_byte_match_plain_recomputation(tmp_path, text_folder, tokenizer):
    seed = int(np.random.SeedSequence().entropy % 2**31)
    store_path = data.prepare(
        text_folder, tokenizer, tmp_path, validation_fraction=0.3, test_fraction=0.3, progress=False
    )
    store = data.open_store(store_path)
    cfg = run_config(tokenizer, store_path)
    params = random_params(cfg, seed)
    tok = data.get_tokenizer(tokenizer)
    validation = np.asarray(store.arrays["validation"].read().result(), np.int32)
    document_end = int(np.flatnonzero(validation[60:] == tok.eos_id)[0]) + 60  # cut after a whole document
    for split, max_tokens, batch_size in [("test", None, 3), ("validation", document_end, 2)]:
        tokens = np.asarray(store.arrays[split].read().result(), np.int32)
        metrics = evaluate.evaluate_split(
            cfg, params, store, split, 48, batch_size, max_tokens, progress=False
        )
        if max_tokens is not None:
            tokens = tokens[: max_tokens + 1]
        nats = plain_nats(cfg, params, tokens, 48)
        assert metrics.tokens == len(tokens) - 1
        assert metrics.loss == pytest.approx(nats / (len(tokens) - 1), rel=2e-5), (split, seed)
        assert metrics.perplexity == pytest.approx(math.exp(nats / (len(tokens) - 1)), rel=5e-5)
        if max_tokens is None:  # every document of the split: its bytes are in the manifest
            expected_bytes = store.manifest["splits"][split]["text_bytes"] - len(
                tok.decode(tokens[:1]).encode()
            )
        else:  # the documents' text, the first token left out
            expected_bytes = len(tok.decode([t for t in tokens[1:] if t != tok.eos_id]).encode())
        assert metrics.bytes == expected_bytes, split
        assert metrics.bits_per_byte == pytest.approx(nats / math.log(2) / expected_bytes, rel=2e-5)


def test_evaluate_command(tmp_path, text_folder):
    store_path = data.prepare(text_folder, "bytes", tmp_path / "stores", test_fraction=0.3, progress=False)
    cfg = run_config("bytes", store_path)
    params = random_params(cfg, 0)
    checkpoint.save_params(tmp_path / "run", cfg, params)
    done = subprocess.run(
        [sys.executable, "-m", "experiments.evaluate", f"--workdir={tmp_path / 'run'}", "--split=test"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert list(report["splits"]) == ["test"] and report["seq_len"] == 48
    tokens = np.asarray(data.open_store(store_path).arrays["test"].read().result(), np.int32)
    expected = plain_nats(cfg, params, tokens, 48) / (len(tokens) - 1)
    assert report["splits"]["test"]["loss"] == pytest.approx(expected, rel=2e-5)

    bad = subprocess.run(
        [sys.executable, "-m", "experiments.evaluate", f"--workdir={tmp_path / 'run'}", "--split=dev"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1].startswith("error: --split")
