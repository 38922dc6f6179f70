"""The sparse CPU sweep's plan (dense twins at each sparse run's N_avg) and a sparse run's Hugging Face export.

N and N_avg are counted here from the paper's formula (embeddings (V + S)·d, per layer 12d² + 13d, final LN 2d;
the prunable kernels 12d² per layer) and from the geometric kept fractions (1 − s)^((k + 1)/n) after event k of
n, in plain numpy: only the event steps are taken from chinchax.training.sparsity.
"""

import json

import numpy as np
import pytest
import safetensors.numpy
import transformers

from chinchax.scaling import plan
from chinchax.training import sparsity
from experiments import configs
from experiments.configs import sparse_cpu, sweeps
from tests.test_hf_roundtrip import run_module

# A twin's N is within this of its sparse run's N_avg: widths step by 4, so neighbouring one-layer shapes from
# width 64 up differ by at most 10% in N, and the nearest is at most half of that away.
TWIN_TOLERANCE = 0.05
MATRICES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def counts(model) -> tuple[int, int]:
    """(all parameters, prunable kernel weights) of a model config, d_ffn = 4d."""
    d, layers = model.d_model, model.n_layers
    total = (model.vocab_size + model.max_positions) * d + layers * (12 * d * d + 13 * d) + 2 * d
    return total, layers * 12 * d * d


def n_avg(model, target: float, event_steps, total_steps: int) -> float:
    """Mean over steps of N − (1 − density_t)·prunable, density_t the geometric kept fraction at step t."""
    total, prunable = counts(model)
    events = len(event_steps)
    density = np.ones(total_steps)
    for k, step in enumerate(event_steps):
        density[step:] = (1.0 - target) ** ((k + 1) / events)
    return float(np.mean(total - (1.0 - density) * prunable))


@pytest.fixture(scope="module")
def planned():
    """{point name: (point, its validated config)} of the planned sweep."""
    base = configs.get(sweeps.CPU_BASE)
    sweep = sweeps.get("sparse_cpu")
    return {p.name: (p, plan.configure(base, p.overrides)) for p in sweep.points}


def test_sparse_cpu_is_registered_with_a_dense_ladder(planned):
    assert sweeps.SWEEPS["sparse_cpu"] is sparse_cpu.sparse_cpu
    dense = [cfg for p, cfg in planned.values() if p.tags["kind"] == "dense"]
    assert len(dense) >= 8
    assert len({counts(cfg.model)[0] for cfg in dense}) >= 4
    assert len({cfg.train.tokens for cfg in dense}) >= 3
    assert all(cfg.sparsity.target == 0 for p, cfg in planned.values() if p.tags["kind"] != "sparse")


def test_every_sparse_run_has_a_dense_twin_at_its_n_avg_and_tokens(planned):
    sparse = [(p, cfg) for p, cfg in planned.values() if p.tags["kind"] == "sparse"]
    assert sorted(cfg.sparsity.target for _, cfg in sparse) == [0.2, 0.4, 0.6, 0.8]
    assert len({counts(cfg.model) for _, cfg in sparse}) == 1  # one base shape
    twins = {p.tags["twin_of"]: cfg for p, cfg in planned.values() if p.tags["kind"] == "twin"}
    assert sorted(twins) == sorted(p.name for p, _ in sparse)
    for point, cfg in sparse:
        steps = cfg.train.tokens // (cfg.train.batch_size * cfg.data.seq_len)
        assert steps * cfg.train.batch_size * cfg.data.seq_len == cfg.train.tokens
        events = sparsity.schedule_for(cfg.sparsity, steps).steps
        expected = n_avg(cfg.model, cfg.sparsity.target, events, steps)
        assert point.tags["n_avg_plan"] == pytest.approx(expected, abs=1)
        twin = twins[point.name]
        assert twin.sparsity.target == 0
        assert twin.train.tokens == cfg.train.tokens
        assert counts(twin.model)[0] == pytest.approx(expected, rel=TWIN_TOLERANCE), point.name
        assert (twin.model.n_layers, twin.model.n_heads) == (cfg.model.n_layers, cfg.model.n_heads)


# The must-show run, shortened so that the default test run holds it: 64-token sequences, 40 steps, a pruning
# event every 10 (three events, at steps 7, 17 and 27, down to 50%), two evaluation batches; 8 sequences a step
# (cpu_tiny's batch).
SHORT_STEPS, SHORT_SEQ = 40, 64
SHORT = (
    f"--config.data.seq_len={SHORT_SEQ}",
    f"--config.train.tokens={8 * SHORT_SEQ * SHORT_STEPS}",
    f"--config.train.warmup_tokens={8 * SHORT_SEQ * 4}",
    "--config.train.eval_batches=2",
    "--config.sparsity.every=10",
)


def test_a_half_sparse_run_exports_matrices_half_zero(tmp_path):
    """The must-show: `experiments.run --config=cpu_tiny --config.sparsity.target=0.5` (shortened, SHORT), then
    `experiments.convert --to_hf`: 50% zeros over the attention and MLP matrices, none in the embeddings."""
    run, out = tmp_path / "run", tmp_path / "hf"
    run_module(
        "experiments.run", "--config=cpu_tiny", "--config.sparsity.target=0.5", *SHORT, f"--workdir={run}"
    )
    run_module("experiments.convert", f"--workdir={run}", f"--to_hf={out}")
    state = safetensors.numpy.load_file(out / "model.safetensors")
    matrices = [v for k, v in state.items() if k.endswith(MATRICES)]
    assert len(matrices) == 4 * 2  # cpu_tiny has two layers
    zeros = sum(int(np.sum(m == 0)) for m in matrices) / sum(m.size for m in matrices)
    assert zeros == pytest.approx(0.5, abs=0.005)
    for name in ("transformer.wte.weight", "transformer.wpe.weight"):
        assert np.count_nonzero(state[name]) == state[name].size, name
    model = transformers.GPT2LMHeadModel.from_pretrained(out)
    loaded = {k: v.numpy() for k, v in model.state_dict().items() if k.endswith(MATRICES)}
    assert sum(int(np.sum(m == 0)) for m in loaded.values()) == sum(int(np.sum(m == 0)) for m in matrices)

    summary = json.loads((run / "summary.json").read_text())
    cfg = configs.get("cpu_tiny")
    steps = summary["tokens"] // (cfg.train.batch_size * SHORT_SEQ)
    assert steps == SHORT_STEPS
    assert len(summary["pruning_steps"]) >= 2  # gradual: several events, not one shot
    assert summary["final_density"] == pytest.approx(0.5, abs=0.005)
    assert summary["n_avg"] == pytest.approx(n_avg(cfg.model, 0.5, summary["pruning_steps"], steps), rel=1e-9)
