"""HF GPT-2 checkpoints ↔ chinchax: import (safetensors, shards, .bin), export, the convert command."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from chinchax import config
from chinchax.evaluation import hf
from chinchax.model import gpt
from chinchax.training import checkpoint
from tests.conftest import REPO
from tests.test_hf_parity import random_hf_gpt2

SHAPE = dict(vocab_size=50257, n_positions=48, n_embd=4 * 16, n_layer=2, n_head=4)


def fresh_seed() -> int:
    return int(np.random.SeedSequence().entropy % 2**31)


def hf_logits(hf_model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return hf_model(torch.from_numpy(tokens)).logits.numpy()


def our_logits(cfg, params, tokens: np.ndarray) -> np.ndarray:
    return np.asarray(gpt.build(cfg.model).apply({"params": params}, tokens.astype(np.int32)))


@pytest.mark.parametrize("layout", ["safetensors", "sharded_safetensors", "pytorch_bin"])
def test_import_gives_hf_logits(tmp_path, layout):
    seed = fresh_seed()
    hf_model = random_hf_gpt2(seed, **SHAPE)
    folder = tmp_path / "hf"
    if layout == "pytorch_bin":  # as the Cerebras-GPT checkpoints are published (lm_head tied, stored too)
        folder.mkdir()
        hf_model.config.to_json_file(folder / "config.json")
        torch.save(hf_model.state_dict(), folder / "pytorch_model.bin")
    else:
        hf_model.save_pretrained(folder, max_shard_size="1MB" if layout == "sharded_safetensors" else "5GB")
    if layout == "sharded_safetensors":
        assert (folder / "model.safetensors.index.json").is_file()

    cfg, params = hf.load_hf_folder(folder)
    assert cfg.data.tokenizer == "gpt2" and cfg.model.max_positions == SHAPE["n_positions"]
    assert jax.tree.structure(params) == jax.tree.structure(gpt.param_shapes(cfg.model))
    tokens = np.random.default_rng(seed).integers(0, SHAPE["vocab_size"], (2, SHAPE["n_positions"]))
    expected = hf_logits(hf_model, tokens)
    assert np.abs(expected).max() > 1.0
    np.testing.assert_allclose(
        our_logits(cfg, params, tokens), expected, atol=1e-4, rtol=0, err_msg=f"seed {seed}"
    )


def random_cerebras_gpt(seed: int, n_inner_per_d: int = 4, **shape) -> transformers.GPT2Model:
    """A random-weight GPT2Model with every parameter perturbed, configured as cerebras/Cerebras-GPT-* are
    published: exact GELU, no dropout, n_inner set explicitly (4·d in the family). Saved, it has the published
    layout: config.json with architectures ["GPT2Model"], weights without the 'transformer.' prefix and no
    lm_head."""
    torch.manual_seed(seed)
    hf_config = transformers.GPT2Config(
        activation_function="gelu",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        n_inner=n_inner_per_d * shape["n_embd"],
        **shape,
    )
    model = transformers.GPT2Model(hf_config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def write_cerebras_gpt_folder(model: transformers.GPT2Model, folder, weights: str) -> None:
    """safetensors: `save_pretrained`. pytorch_bin: config.json + pytorch_model.bin as transformers 4.27 (the
    version Cerebras-GPT was published with) saved a GPT2Model, the causal-mask buffers
    h.N.attn.bias / h.N.attn.masked_bias stored next to the parameters."""
    if weights == "safetensors":
        model.save_pretrained(folder)
        return
    folder.mkdir()
    model.config.architectures = ["GPT2Model"]
    model.config.to_json_file(folder / "config.json")
    positions = model.config.n_positions
    mask = torch.tril(torch.ones(positions, positions, dtype=torch.bool)).view(1, 1, positions, positions)
    state = dict(model.state_dict())
    for i in range(model.config.n_layer):
        state[f"h.{i}.attn.bias"], state[f"h.{i}.attn.masked_bias"] = mask, torch.tensor(-1e4)
    torch.save(state, folder / "pytorch_model.bin")


def stored_names(folder) -> list[str]:
    if (folder / "model.safetensors").is_file():
        return list(safetensors.numpy.load_file(folder / "model.safetensors"))
    return list(torch.load(folder / "pytorch_model.bin", weights_only=True))


def tied_gpt2_lm_head(folder) -> transformers.GPT2LMHeadModel:
    """transformers' own causal LM over the folder's GPT2Model weights, its head tied to wte (the reference)."""
    model, info = transformers.GPT2LMHeadModel.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr(), "head not tied"
    return model.eval()


@pytest.mark.parametrize(
    "weights, n_inner_per_d",
    [("safetensors", 4), ("pytorch_bin", 4), ("safetensors", 3)],
    ids=["safetensors", "pytorch_bin", "safetensors-n_inner-3d"],
)
def test_import_of_the_published_cerebras_gpt_layout_gives_tied_head_logits(tmp_path, weights, n_inner_per_d):
    seed = fresh_seed()
    why = f"seed {seed}"
    print(why)  # shown with any failure, exceptions included
    folder = tmp_path / "Cerebras-GPT-tiny"
    write_cerebras_gpt_folder(random_cerebras_gpt(seed, n_inner_per_d, **SHAPE), folder, weights)
    published = json.loads((folder / "config.json").read_text())
    d_ffn = n_inner_per_d * SHAPE["n_embd"]
    assert published["architectures"] == ["GPT2Model"] and published["n_inner"] == d_ffn
    names = stored_names(folder)
    assert "wte.weight" in names and not any(n.startswith(("transformer.", "lm_head")) for n in names)

    cfg, params = hf.load_hf_folder(folder)
    assert config.d_ffn(cfg.model) == d_ffn and cfg.data.tokenizer == "gpt2", why
    assert jax.tree.structure(params) == jax.tree.structure(gpt.param_shapes(cfg.model)), why
    tokens = np.random.default_rng(seed).integers(0, SHAPE["vocab_size"], (2, SHAPE["n_positions"]))
    expected = hf_logits(tied_gpt2_lm_head(folder), tokens)
    assert np.abs(expected).max() > 1.0, why
    np.testing.assert_allclose(our_logits(cfg, params, tokens), expected, atol=1e-4, rtol=0, err_msg=why)


def random_sp_params(cfg, seed):
    """Fresh init with every parameter perturbed (biases and LayerNorms away from 0 and 1)."""
    params = gpt.init_params(cfg.model, jax.random.key(seed))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: x + 0.05 * rng.standard_normal(x.shape, np.float32), params)


def test_export_loads_in_transformers_with_our_logits(tmp_path):
    seed = fresh_seed()
    cfg = config.base_config()
    cfg.model.update(vocab_size=50257, max_positions=40, d_model=48, n_layers=3, n_heads=3, d_ffn=80)
    cfg.data.seq_len = 40
    params = random_sp_params(cfg, seed)
    hf.save_hf_folder(tmp_path / "out", cfg, params)

    loaded, info = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    tokens = np.random.default_rng(seed).integers(0, 50257, (2, 40))
    ours = our_logits(cfg, params, tokens)
    assert np.abs(ours).max() > 1.0
    np.testing.assert_allclose(
        hf_logits(loaded.eval(), tokens), ours, atol=1e-4, rtol=0, err_msg=f"seed {seed}"
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tokenizer("Hello world")["input_ids"] == [15496, 995]
    assert tokenizer.eos_token_id == 50256


def test_export_refuses_mup(tmp_path):
    cfg = config.base_config()
    cfg.model.update(
        vocab_size=300, max_positions=16, d_model=32, n_layers=1, n_heads=2, parametrization="mup"
    )
    cfg.data.update(tokenizer="bytes", seq_len=16)
    params = gpt.init_params(cfg.model, jax.random.key(0))
    with pytest.raises(hf.HFConversionError, match="μP"):
        hf.save_hf_folder(tmp_path / "out", cfg, params)
    assert not (tmp_path / "out").exists()


def test_import_rejects_what_gpt2_cannot_hold(tmp_path):
    hf_model = random_hf_gpt2(0, vocab_size=300, n_positions=16, n_embd=32, n_layer=1, n_head=2)
    hf_model.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").unlink()
    with pytest.raises(hf.HFConversionError, match="no model.safetensors"):
        hf.load_hf_folder(tmp_path / "hf")
    untied = dict(hf_model.config.to_dict(), activation_function="gelu_new")
    with pytest.raises(hf.HFConversionError, match="activation_function"):
        hf.config_from_hf(untied, "x")


def run_module(*args: str) -> dict:
    """`python -m args...` from the repo root; its last stdout line as JSON."""
    done = subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_convert_command_round_trip(tmp_path):
    """HF folder → chinchax run (checkpoint) → HF folder: transformers gives the original model's logits."""
    seed = fresh_seed()
    original = random_hf_gpt2(seed, **SHAPE)
    original.save_pretrained(tmp_path / "hf")
    imported = run_module(
        "experiments.convert", f"--from_hf={tmp_path / 'hf'}", f"--workdir={tmp_path / 'run'}"
    )
    assert imported["direction"] == "import"
    assert imported["params"] == sum(p.numel() for p in original.transformer.parameters())
    run_module("experiments.convert", f"--workdir={tmp_path / 'run'}", f"--to_hf={tmp_path / 'out'}")
    exported = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    tokens = np.random.default_rng(seed).integers(0, SHAPE["vocab_size"], (2, SHAPE["n_positions"]))
    np.testing.assert_allclose(
        hf_logits(exported, tokens), hf_logits(original, tokens), atol=1e-4, rtol=0, err_msg=f"seed {seed}"
    )


def test_convert_command_imports_the_published_cerebras_gpt_layout(tmp_path):
    """`python -m experiments.convert --from_hf` on a GPT2Model folder: the run's checkpoint gives the tied-head
    logits of transformers' GPT2LMHeadModel over the same weights."""
    seed = fresh_seed()
    why = f"seed {seed}"
    print(why)  # shown with any failure, exceptions included
    original = random_cerebras_gpt(seed, **SHAPE)
    write_cerebras_gpt_folder(original, tmp_path / "hf", "safetensors")
    imported = run_module(
        "experiments.convert", f"--from_hf={tmp_path / 'hf'}", f"--workdir={tmp_path / 'run'}"
    )
    assert imported["direction"] == "import", why
    assert imported["params"] == sum(p.numel() for p in original.parameters()), why
    cfg, params = checkpoint.load_params(tmp_path / "run")
    tokens = np.random.default_rng(seed).integers(0, SHAPE["vocab_size"], (2, SHAPE["n_positions"]))
    np.testing.assert_allclose(
        our_logits(cfg, params, tokens),
        hf_logits(tied_gpt2_lm_head(tmp_path / "hf"), tokens),
        atol=1e-4,
        rtol=0,
        err_msg=why,
    )
