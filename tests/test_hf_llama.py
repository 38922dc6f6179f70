"""HF LlamaForCausalLM ↔ chinchax against transformers on random weights: imported logits, the export round trip,
greedy decoding, held-out loss and lm-eval loglikelihoods of an imported Llama, and bad input."""

import json
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from lm_eval.api.instance import Instance

from chinchax import config, data
from chinchax.data.tokenizers import EOS_TEXT
from chinchax.evaluation import evaluate, hf, lm_eval_model
from chinchax.model import gpt, sample
from chinchax.training import checkpoint
from tests.conftest import REPO
from tests.test_hf_parity import random_hf_gpt2
from tests.test_hf_roundtrip import run_module

SHAPE = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=8,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
)
VARIANTS = {  # each Llama switch away from GPT-3's, and the ones HF's defaults leave off
    "gqa-untied-theta": dict(num_key_value_heads=2, tie_word_embeddings=False, rope_theta=500000.0),
    "mha-tied-bias": dict(
        num_key_value_heads=8,
        tie_word_embeddings=True,
        attention_bias=True,
        mlp_bias=True,
        rope_theta=12345.0,
    ),
}


def fresh_seed() -> int:
    return int(np.random.SeedSequence().entropy % 2**31)


def random_hf_llama(seed: int, variant: str, scale: float = 0.02) -> transformers.LlamaForCausalLM:
    """A random-weight LlamaForCausalLM with every parameter perturbed by N(0, scale) (norms off 1, biases off 0)."""
    torch.manual_seed(seed)
    # no end-of-sequence id: transformers' generate stops only where a test tells it to
    hf_config = transformers.LlamaConfig(**SHAPE, **VARIANTS[variant], eos_token_id=None)
    model = transformers.LlamaForCausalLM(hf_config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model


def hf_logits(hf_model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return hf_model(torch.from_numpy(tokens)).logits.numpy()


def our_logits(model, params, tokens: np.ndarray) -> np.ndarray:
    return np.asarray(gpt.build(model).apply({"params": params}, tokens.astype(np.int32)))


def imported(tmp_path, hf_model, **save):
    hf_model.save_pretrained(tmp_path / "hf", **save)
    return hf.load_hf_folder(tmp_path / "hf")


@pytest.mark.parametrize("attention", ["xla", "auto"])  # auto: the blockwise kernel here
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_imported_llama_gives_transformers_logits(tmp_path, variant, attention):
    seed = fresh_seed()
    print(f"seed {seed}")  # shown with any failure, exceptions included
    hf_model = random_hf_llama(seed, variant)
    cfg, params = imported(tmp_path, hf_model)
    model, switches = cfg.model, VARIANTS[variant]
    assert (model.norm, model.position, model.mlp) == ("rmsnorm", "rope", "swiglu")
    assert model.rope_theta == switches["rope_theta"] and model.layer_norm_eps == SHAPE["rms_norm_eps"]
    assert config.kv_heads(model) == switches["num_key_value_heads"] and config.d_ffn(model) == 160
    assert model.tie_embeddings == switches["tie_word_embeddings"]
    assert model.bias == switches.get("attention_bias", False)
    assert cfg.data.tokenizer == "bytes" and cfg.data.seq_len == model.max_positions == 128
    assert jax.tree.structure(params) == jax.tree.structure(gpt.param_shapes(model))

    model.attention = attention
    tokens = np.random.default_rng(seed).integers(0, SHAPE["vocab_size"], (2, 128))
    expected = hf_logits(hf_model, tokens)
    assert np.abs(expected).max() > 0.5  # logits of a non-trivial scale
    diff = np.abs(our_logits(model, params, tokens) - expected).max()
    print(f"{variant} {attention}: max |logit diff| {diff:.2e} (max |logit| {np.abs(expected).max():.2f})")
    assert diff < 1e-4, f"seed {seed}: max |logit diff| {diff}"


def test_import_reads_bf16_shards(tmp_path):
    """A bf16 checkpoint in shards (as Llamas are published) imports exactly the bf16 values, in fp32."""
    seed = fresh_seed()
    hf_model = random_hf_llama(seed, "gqa-untied-theta").to(torch.bfloat16)
    cfg, params = imported(tmp_path, hf_model, max_shard_size="50KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype(np.float32)}
    np.testing.assert_array_equal(params["head"], hf_model.lm_head.weight.detach().float().numpy())
    tokens = np.random.default_rng(seed).integers(0, SHAPE["vocab_size"], (2, 64))
    np.testing.assert_allclose(
        our_logits(cfg.model, params, tokens),
        hf_logits(hf_model.float(), tokens),
        atol=1e-4,
        rtol=0,
        err_msg=f"seed {seed}",
    )


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_export_round_trip_gives_the_original_tensors_and_logits(tmp_path, variant):
    """HF → chinchax → HF: every stored tensor equal to the original, and transformers loads the folder."""
    seed = fresh_seed()
    original = random_hf_llama(seed, variant)
    cfg, params = imported(tmp_path, original)
    hf.save_hf_folder(tmp_path / "out", cfg, params)

    before = safetensors.numpy.load_file(tmp_path / "hf" / "model.safetensors")
    after = safetensors.numpy.load_file(tmp_path / "out" / "model.safetensors")
    assert sorted(after) == sorted(before)
    for name, tensor in before.items():
        np.testing.assert_array_equal(after[name], tensor, err_msg=f"{name}, seed {seed}")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["architectures"] == ["LlamaForCausalLM"] and written["model_type"] == "llama"
    assert written["head_dim"] == 8 and written["hidden_act"] == "silu" and written["rope_scaling"] is None

    loaded, info = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    assert loaded.config.rope_parameters["rope_theta"] == VARIANTS[variant]["rope_theta"]
    tokens = np.random.default_rng(seed).integers(0, SHAPE["vocab_size"], (2, 128))
    expected = hf_logits(original, tokens)
    diff = np.abs(hf_logits(loaded.eval(), tokens) - expected).max()
    print(f"{variant} round trip: max |logit diff| {diff:.2e}")
    assert diff < 1e-4, f"seed {seed}: max |logit diff| {diff}"


def test_convert_command_round_trip(tmp_path):
    """`experiments.convert --from_hf` then `--to_hf` on a GQA, untied Llama: transformers' logits again."""
    seed = fresh_seed()
    original = random_hf_llama(seed, "gqa-untied-theta")
    original.save_pretrained(tmp_path / "hf")
    report = run_module(
        "experiments.convert", f"--from_hf={tmp_path / 'hf'}", f"--workdir={tmp_path / 'run'}"
    )
    assert report["direction"] == "import"
    assert report["params"] == sum(p.numel() for p in original.parameters())
    run_module("experiments.convert", f"--workdir={tmp_path / 'run'}", f"--to_hf={tmp_path / 'out'}")
    exported = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    tokens = np.random.default_rng(seed).integers(0, SHAPE["vocab_size"], (2, 128))
    np.testing.assert_allclose(
        hf_logits(exported, tokens), hf_logits(original, tokens), atol=1e-4, rtol=0, err_msg=f"seed {seed}"
    )


def hf_greedy(hf_model, prompt: list[int], steps: int, **generation) -> list[int]:
    """transformers' greedy continuation (do_sample=False, its KV cache), stopping only where told."""
    settings = transformers.GenerationConfig(
        **{"max_new_tokens": steps, "do_sample": False, "pad_token_id": 0, **generation}
    )
    ids = torch.tensor([prompt])  # the whole prompt attended, pad id or not
    out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=settings)
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_decoding_equals_transformers_generate(tmp_path, variant):
    seed = fresh_seed()
    hf_model = random_hf_llama(seed, variant, scale=0.3)  # confident, varied predictions
    cfg, params = imported(tmp_path, hf_model)
    prompt = np.random.default_rng(seed).integers(0, SHAPE["vocab_size"], 11).tolist()
    ours = sample.generate(cfg.model, params, prompt, 16, sample.Sampling(temperature=0))[0]
    expected = hf_greedy(hf_model, prompt, 16)
    assert len(set(expected)) > 4, expected  # not collapsed onto one token
    assert ours == expected, f"seed {seed}"


# slow as its twin in test_sample (24-33 s there; 5 s on a fast 2-core day): a process that restores and compiles.
# Greedy tokens are checked in-process above.
@pytest.mark.slow
def test_sample_command_greedy_equals_transformers(tmp_path):
    """`experiments.sample --temperature=0` on an imported Llama prints transformers' greedy continuation under
    the same rules: ids the bytes tokenizer lacks (257…) never drawn, the sample ending at EOS (256)."""
    seed = fresh_seed()
    hf_model = random_hf_llama(seed, "gqa-untied-theta", scale=0.3)
    checkpoint.save_params(tmp_path / "run", *imported(tmp_path, hf_model))
    prompt = "Once upon"
    report = run_module(
        "experiments.sample",
        f"--workdir={tmp_path / 'run'}",
        f"--prompt={prompt}",
        "--max_new_tokens=16",
        "--temperature=0",
    )
    expected = hf_greedy(
        hf_model, list(prompt.encode()), 16, suppress_tokens=list(range(257, 300)), eos_token_id=256
    )
    text = bytes(t for t in expected if t != 256).decode("utf-8", "replace") + EOS_TEXT * expected.count(256)
    assert report["tokens"] == len(expected), (seed, expected)
    assert report["samples"] == [text], (seed, expected)


@pytest.fixture(scope="module")
def byte_store(tmp_path_factory):
    """A bytes token store of 40 random-word documents."""
    folder = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(fresh_seed())
    words = "the a river stone runs over under quiet green café naïve bright small house old".split()
    for i in range(40):
        (folder / f"doc{i:02d}.txt").write_text(
            " ".join(rng.choice(words, int(rng.integers(20, 60)))) + ".\n"
        )
    return data.prepare(folder, "bytes", folder.parent / "store", test_fraction=0.3, progress=False)


def hf_nats(hf_model, tokens: np.ndarray, seq_len: int) -> float:
    """Σ -log p(next token) by transformers over consecutive windows of seq_len inputs, in float64."""
    total = 0.0
    for start in range(0, len(tokens) - 1, seq_len):
        window = tokens[start : start + seq_len + 1].astype(np.int64)
        logits = hf_logits(hf_model, window[None, :-1])[0].astype(np.float64)
        log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        total += float((log_z - logits[np.arange(len(window) - 1), window[1:]]).sum())
    return total


def test_evaluate_on_an_imported_llama_gives_transformers_loss(tmp_path, byte_store):
    seed = fresh_seed()
    hf_model = random_hf_llama(seed, "gqa-untied-theta", scale=0.1)
    cfg, params = imported(tmp_path, hf_model)
    store = data.open_store(byte_store)
    metrics = evaluate.evaluate_split(cfg, params, store, "test", 96, 3, progress=False)
    tokens = np.asarray(store.arrays["test"].read().result(), np.int32)
    assert metrics.tokens == len(tokens) - 1
    expected = hf_nats(hf_model, tokens, 96) / (len(tokens) - 1)
    assert expected > 1.0
    assert metrics.loss == pytest.approx(expected, rel=2e-5), f"seed {seed}"


def test_evaluate_command_on_an_imported_llama(tmp_path, byte_store):
    seed = fresh_seed()
    hf_model = random_hf_llama(seed, "mha-tied-bias", scale=0.1)
    checkpoint.save_params(tmp_path / "run", *imported(tmp_path, hf_model))
    report = run_module(
        "experiments.evaluate", f"--workdir={tmp_path / 'run'}", f"--store={byte_store}", "--split=test"
    )
    tokens = np.asarray(data.open_store(byte_store).arrays["test"].read().result(), np.int32)
    expected = hf_nats(hf_model, tokens, 128) / (len(tokens) - 1)
    assert report["seq_len"] == 128
    assert report["splits"]["test"]["loss"] == pytest.approx(expected, rel=2e-5), f"seed {seed}"


def test_lm_eval_loglikelihoods_of_an_imported_llama(tmp_path):
    """The `chinchax` lm-eval model's (log P(continuation | context), is greedy) against transformers' softmax over
    the same byte ids."""
    seed = fresh_seed()
    hf_model = random_hf_llama(seed, "gqa-untied-theta", scale=0.3)
    cfg, params = imported(tmp_path, hf_model)
    lm = lm_eval_model.ChinchaxLM(cfg=cfg, params=params, batch_size=2)
    requests = [("The river runs", " over the stone"), ("Once", " upon a time there was"), ("a", "b")]
    instances = [Instance("loglikelihood", {}, r, i) for i, r in enumerate(requests)]
    ours = lm.loglikelihood(instances, disable_tqdm=True)
    for (context, continuation), (log_p, greedy) in zip(requests, ours, strict=True):
        ids = np.array([list((context + continuation).encode())])
        log_probs = torch.log_softmax(torch.from_numpy(hf_logits(hf_model, ids)).double(), -1)[0]
        scored = range(len(context.encode()), ids.shape[1])
        expected = sum(float(log_probs[i - 1, ids[0, i]]) for i in scored)
        assert log_p == pytest.approx(expected, abs=1e-4), (context, seed)
        assert greedy == all(int(log_probs[i - 1].argmax()) == ids[0, i] for i in scored)
    assert min(lp for lp, _ in ours) < -5  # non-trivial log-probabilities


def write_config(folder, hf_config) -> None:
    (folder / "config.json").write_text(json.dumps(hf_config.to_dict()))


def test_weights_of_another_architecture_are_refused_before_reading_them(tmp_path, monkeypatch):
    def never(path):
        raise AssertionError(f"read {path} before checking its tensor names")

    monkeypatch.setattr(hf, "_read_weight_file", never)
    gpt2 = random_hf_gpt2(0, vocab_size=300, n_positions=32, n_embd=32, n_layer=1, n_head=2)
    gpt2.save_pretrained(tmp_path / "gpt2")
    write_config(tmp_path / "gpt2", random_hf_llama(0, "gqa-untied-theta").config)
    with pytest.raises(
        hf.HFConversionError, match=r"no tensor 'model.embed_tokens.weight'.*model_type='llama'"
    ):
        hf.load_hf_folder(tmp_path / "gpt2")

    random_hf_llama(0, "mha-tied-bias").save_pretrained(tmp_path / "llama")
    write_config(tmp_path / "llama", gpt2.config)
    with pytest.raises(hf.HFConversionError, match=r"no tensor 'wte.weight'.*model_type='gpt2'"):
        hf.load_hf_folder(tmp_path / "llama")


def test_bad_import_is_one_line_from_the_command(tmp_path):
    random_hf_llama(0, "mha-tied-bias").save_pretrained(tmp_path / "llama")
    hf_config = json.loads((tmp_path / "llama" / "config.json").read_text())
    (tmp_path / "llama" / "config.json").write_text(json.dumps({**hf_config, "mlp_bias": False}))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.convert",
            f"--from_hf={tmp_path / 'llama'}",
            f"--workdir={tmp_path}/run",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        "error: HF config attention_bias=True but mlp_bias=False: chinchax's model.bias switches both"
    )
    assert not (tmp_path / "run").exists()


LLAMA_CONFIG = {"model_type": "llama", **SHAPE, "num_key_value_heads": 2}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"attention_bias": True}, "attention_bias=True but mlp_bias=False"),
        ({"head_dim": 16}, "head_dim=16: chinchax heads are hidden_size/num_attention_heads = 64/8"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling="),
        (
            {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}},
            "rope_parameters.rope_type='llama3'",
        ),
        ({"hidden_size": None}, "no 'hidden_size', which model_type='llama' needs"),
        ({"model_type": "mistral"}, "model_type='mistral'"),
    ],
)
def test_llama_configs_chinchax_cannot_hold_are_refused(change, message):
    with pytest.raises(hf.HFConversionError, match=re.escape(message)):
        hf.config_from_hf({**LLAMA_CONFIG, **change}, "x")


def test_rope_theta_from_either_config_generation():
    old = hf.model_config_from_hf({**LLAMA_CONFIG, "rope_theta": 5e5, "rope_scaling": None})
    new = hf.model_config_from_hf(
        {**LLAMA_CONFIG, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}
    )
    assert old.rope_theta == new.rope_theta == 5e5
    assert hf.model_config_from_hf(LLAMA_CONFIG).rope_theta == 10000.0  # LlamaConfig's default


def llama_block_run(**model):
    cfg = config.base_config()
    cfg.model.update(vocab_size=300, max_positions=32, d_model=32, n_layers=1, n_heads=4)
    cfg.model.update({"norm": "rmsnorm", "position": "rope", "mlp": "swiglu", **model})
    cfg.data.update(tokenizer="bytes", seq_len=32)
    return config.validate(cfg)


@pytest.mark.parametrize(
    "model, message",
    [
        (
            dict(position="learned"),
            "model.position='learned': LlamaForCausalLM has rotary positions only; "
            "model.norm='rmsnorm': GPT2LMHeadModel has LayerNorm only",
        ),
        (
            dict(norm="layernorm", position="learned", mlp="gelu", bias=False),
            "model.bias=False: GPT2LMHeadModel has biases on every layer; "
            "model.norm='layernorm': LlamaForCausalLM has RMSNorm only",
        ),
        (
            dict(norm="layernorm", position="learned", mlp="gelu", kv_heads=2),
            "model.kv_heads=2: GPT2LMHeadModel has one key/value head per head; "
            "model.norm='layernorm': LlamaForCausalLM has RMSNorm only",
        ),
        (dict(parametrization="mup"), "model.parametrization='mup': HF GPT-2 and Llama have no μP"),
    ],
)
def test_export_refuses_a_block_neither_class_holds(tmp_path, model, message):
    cfg = llama_block_run(**model)
    params = gpt.param_shapes(cfg.model)  # refused before any value is read
    with pytest.raises(hf.HFConversionError, match=f"^{re.escape(message)}"):
        hf.save_hf_folder(tmp_path / "out", cfg, params)
    assert not (tmp_path / "out").exists()
