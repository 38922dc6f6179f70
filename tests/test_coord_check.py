"""μP coordinate check from the command line, for GPT-3's block and the Llama block: activation scales stay put
across widths under μP and grow under SP; the plot and the JSON it writes."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from chinchax import config
from chinchax.scaling import coord_check
from tests.conftest import REPO

WIDTHS = (128, 256, 512, 1024)


def run_cli(out, block: str, seed: int, widths=WIDTHS) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.coord_check",
            f"--out={out}",
            f"--widths={','.join(map(str, widths))}",
            "--steps=3",
            f"--seed={seed}",
            f"--block={block}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow  # about 60 s (compiles 8 models): the default run's longest; CI's second job runs it
def test_mup_keeps_activation_scales_across_widths_sp_does_not(tmp_path):
    seed = int(np.random.SeedSequence().entropy % 2**31)
    out = run_cli(tmp_path, "gpt3", seed)
    assert out.returncode == 0, (seed, out.stderr[-2000:])
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    mup, sp = summary["mup"], summary["sp"]
    assert all(v < 2.0 for v in mup.values()), (seed, mup)
    assert max(sp.values()) > 2.0, (seed, sp)
    # SP's attention logits and block outputs grow with width (Adam updates ∝ width under SP)
    assert sp["attention_logits"] > 2 * mup["attention_logits"], (seed, sp, mup)
    # the JSON beside the plot: per activation, max/min over widths of the last step's mean |activation|
    saved = json.loads((tmp_path / "coord_check.json").read_text())
    for name in ("sp", "mup"):
        for activation, spread in summary[name].items():
            last = [saved["results"][name][str(w)][-1][activation] for w in WIDTHS]
            assert spread == pytest.approx(max(last) / min(last), rel=1e-12), (seed, name, activation)
    assert (tmp_path / "coord_check.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow  # about 60-70 s (compiles 8 models); the default run checks the Llama check's models below
def test_the_llama_block_keeps_activation_scales_across_widths_under_mup(tmp_path):
    """GPT-3's criterion on the Llama block (RMSNorm, rotary positions, SwiGLU, two query heads per kv head, no
    biases) from width 128 to 1024: under μP the embedding, attention logits and block outputs spread less than 2×,
    under SP some spread more. The logits come from the untied head, whose μP init makes them fall as 1/√width at
    init (test_the_untied_heads_mup_logits_at_init_fall_as_one_over_root_width); after 3 steps they still fall with width
    (measured slope −0.42, spread 2.4×: not flat, but not growing), where SP's grow."""
    seed = int(np.random.SeedSequence().entropy % 2**31)
    out = run_cli(tmp_path, "llama", seed)
    assert out.returncode == 0, (seed, out.stderr[-2000:])
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    mup, sp, slope = summary["mup"], summary["sp"], summary["slope"]
    assert summary["block"] == "llama", summary
    assert all(v < 2.0 for k, v in mup.items() if k != "logits"), (seed, mup)
    assert -0.6 < slope["mup"]["logits"] < 0.1, (seed, slope)  # between μP's init (−0.5) and flat: no growth
    assert max(sp.values()) > 2.0 and slope["sp"]["logits"] > 0.3, (seed, sp, slope)
    assert sp["attention_logits"] > 2 * mup["attention_logits"], (seed, sp, mup)
    saved = json.loads((tmp_path / "coord_check_llama.json").read_text())
    for name in ("sp", "mup"):
        for activation, spread in summary[name].items():
            last = [saved["results"][name][str(w)][-1][activation] for w in WIDTHS]
            assert spread == pytest.approx(max(last) / min(last), rel=1e-12), (seed, name, activation)
    assert (tmp_path / "coord_check_llama.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_llama_checks_models_are_the_llama_block():
    """Every check width gets the Llama switches and half as many kv heads as query heads; an unknown block and a
    width its heads do not divide fail in one line before any model is built."""
    for width in WIDTHS:
        model = coord_check.small_model("mup", width, block="llama")
        assert (model.norm, model.position, model.mlp, model.bias, model.tie_embeddings) == (
            "rmsnorm",
            "rope",
            "swiglu",
            False,
            False,
        )
        assert model.n_heads == width // 16 == 2 * model.kv_heads, width
        assert config.d_ffn(model) == -(-8 * width // 48) * 16, width  # 8/3·d up to a multiple of 16
    gpt3 = coord_check.small_model("sp", 128)
    assert (gpt3.norm, gpt3.mlp, gpt3.kv_heads, gpt3.tie_embeddings) == ("layernorm", "gelu", 0, True)
    with pytest.raises(config.ConfigError, match="block='mamba' is not one of gpt3, llama"):
        coord_check.run("mup", [128], block="mamba")
    with pytest.raises(config.ConfigError, match="n_heads"):
        coord_check.run("mup", [128, 100], block="llama")


def test_the_untied_heads_mup_logits_at_init_fall_as_one_over_root_width():
    """At init a logit is multiplier · Σ_d h_d W_vd, h the final RMSNorm's output (rms 1, gain 1) and W the untied
    head's ±2σ truncated normal (std c·σ, c from scipy): a centred normal of std multiplier·c·σ·√d, so mean
    |logit| = √(2/π) times that. Under μP (σ 0.08, multiplier α/m = 256/d) that is ∝ 1/√width, vanishing as μP's
    output layer should. Checked at width 512, away from the base width 256 where every multiplier rule agrees
    (1/m, 1/√m and 1 differ by 2× and √2 there)."""
    seed = int(np.random.SeedSequence().entropy % 2**31)
    c = stats.truncnorm(-2, 2).std()
    ((scales,),) = coord_check.run("mup", (512,), steps=0, seed=seed, block="llama").values()
    expected = math.sqrt(2 / math.pi) * (256 / 512) * c * 0.08 * math.sqrt(512)
    assert scales["logits"] == pytest.approx(expected, rel=0.03), (seed, scales)
