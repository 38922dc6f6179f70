"""Our model against Hugging Face transformers' GPT-2 on the same random weights."""

import jax
import numpy as np
import pytest
import torch
import transformers

from chinchax.evaluation import hf
from chinchax.model import gpt


def random_hf_gpt2(seed: int, **shape):
    """A random-weight GPT2LMHeadModel with exact GELU and every parameter perturbed (no zeros)."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        activation_function="gelu",
        tie_word_embeddings=True,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        **shape,
    )
    hf_model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in hf_model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return hf_model


@pytest.mark.parametrize(
    "shape",
    [
        dict(vocab_size=1031, n_positions=96, n_embd=17 * 64, n_layer=2, n_head=17),  # 256M heads
        dict(vocab_size=515, n_positions=64, n_embd=3 * 80, n_layer=3, n_head=3),  # d_head 80
    ],
)
@pytest.mark.parametrize(
    "attention", ["xla", "auto"]
)  # auto: the blockwise kernel here (2 query blocks at 96)
def test_logits_match_hf_gpt2(shape, attention):
    seed = int(np.random.SeedSequence().entropy % 2**31)
    hf_model = random_hf_gpt2(seed, **shape)
    state = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    cfg = hf.model_config_from_hf(hf_model.config.to_dict())
    cfg.attention = attention
    params = hf.params_from_hf(state, cfg)
    assert jax.tree.structure(params) == jax.tree.structure(gpt.param_shapes(cfg)), (
        "converted tree differs from the model's"
    )

    tokens = np.random.default_rng(seed).integers(0, shape["vocab_size"], (3, shape["n_positions"]))
    with torch.no_grad():
        expected = hf_model(torch.from_numpy(tokens)).logits.numpy()
    ours = np.asarray(gpt.build(cfg).apply({"params": params}, tokens.astype(np.int32)))
    assert np.abs(expected).max() > 1.0  # logits of a non-trivial scale
    np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0, err_msg=f"seed {seed}")
