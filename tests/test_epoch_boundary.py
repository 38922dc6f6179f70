"""The trainer across an epoch boundary of the token store: a train split that runs out mid-run wraps into a
fresh pass over the same windows, and a run SIGKILLed after the boundary resumes bit-identically.

The corpus is drawn from a fresh seed per run (printed in every failure message), the store made with
chinchax.data.prepare; the reference for "the store's sequences" is the store's train split read back as numpy,
the reference for the resume is the uninterrupted run.
"""

import hashlib
import json
import pathlib
import signal
import string
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from chinchax import config
from chinchax.data import loader as loader_lib
from chinchax.data import open_store, prepare, split_of
from chinchax.training import checkpoint, train
from experiments import configs

SEQ, BATCH, MICROBATCHES = 32, 8, 2  # 2 loader batches of 4 windows per step
STEPS, CHECKPOINT_EVERY = 32, 4  # ~6 passes over the train split; a kill at ~8 leaves 24 steps to go
DOC_CHARS = 63  # + EOS = 64 tokens per document (bytes tokenizer)
DOCS = {"train": 21, "validation": 4, "test": 4}  # 21 × 64 tokens = 41 train windows of 32+1
FRACTIONS = {"validation_fraction": 0.25, "test_fraction": 0.25}
OVERRIDES = {
    "data.seq_len": SEQ,
    "train.batch_size": BATCH,
    "train.microbatches": MICROBATCHES,
    "train.tokens": BATCH * SEQ * STEPS,
    "train.warmup_tokens": BATCH * SEQ * 2,
    "train.log_every": 1,
    "train.checkpoint_every": CHECKPOINT_EVERY,
    "train.eval_batches": 1,
}


def fresh_seed() -> int:
    return int(np.random.default_rng().integers(2**31))


@pytest.fixture(scope="module")
def seed() -> int:
    return fresh_seed()


@pytest.fixture(scope="module")
def store(tmp_path_factory, seed) -> pathlib.Path:
    """A bytes store of random-letter documents, DOCS[split] in each split (routed by the store's own rule,
    the BLAKE2b digest of the text), so that the train split holds a known, small number of windows."""
    rng = np.random.default_rng(seed)
    letters = np.array(list(string.ascii_lowercase + " "))
    docs = {split: [] for split in DOCS}
    while any(len(docs[s]) < n for s, n in DOCS.items()):
        text = "".join(rng.choice(letters, DOC_CHARS))
        split = split_of(hashlib.blake2b(text.encode(), digest_size=16).digest(), *FRACTIONS.values())
        if len(docs[split]) < DOCS[split]:
            docs[split].append(text)
    lines = [json.dumps({"text": t}) for split in DOCS for t in docs[split]]
    corpus = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    corpus.write_text("\n".join(rng.permutation(lines)) + "\n")
    return prepare(corpus, "bytes", tmp_path_factory.mktemp("store"), **FRACTIONS, progress=False)


@pytest.fixture(scope="module")
def windows(store, seed) -> dict[tuple, int]:
    """Every train window of the store (its seq_len + 1 tokens, read back as numpy) → its index."""
    tokens = open_store(store).arrays["train"].read().result().astype(np.int64)
    assert len(tokens) == DOCS["train"] * (DOC_CHARS + 1), f"seed {seed}"
    count = (len(tokens) - 1) // SEQ
    found = {tuple(tokens[w * SEQ : w * SEQ + SEQ + 1]): w for w in range(count)}
    assert len(found) == count, f"repeated windows in the random corpus (seed {seed})"
    return found


def tiny_config(store, seed):
    cfg = configs.get("cpu_tiny")
    for key, value in {**OVERRIDES, "data.dataset": str(store), "train.seed": seed}.items():
        section, field = key.split(".")
        cfg[section][field] = value
    return config.validate(cfg)


def run_args(workdir, store, seed):
    overrides = {**OVERRIDES, "data.dataset": store, "train.seed": seed}
    flags = [f"--config.{k}={v}" for k, v in overrides.items()]
    return [sys.executable, "-m", "experiments.run", "--config=cpu_tiny", f"--workdir={workdir}", *flags]


def losses(workdir) -> list[float]:
    lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


def complete_checkpoints(workdir) -> list[int]:
    folder = pathlib.Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


def batches_seen(workdir, step: int) -> int:
    """The train loader's batch count saved in the checkpoint at `step` (grain's JSON of its state)."""
    (saved,) = (pathlib.Path(workdir) / "checkpoints" / str(step) / "data").glob("*.json")
    return json.loads(saved.read_text())["batches_seen"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, store, seed):
    """One run in this process, every train batch the trainer drew recorded with the iterator it came from."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    drawn = []
    original = loader_lib.TokenBatchIterator.__next__

    def recording_next(iterator):
        batch = original(iterator)
        if iterator._identity["split"] == "train":
            drawn.append((iterator, batch))
        return batch

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loader_lib.TokenBatchIterator, "__next__", recording_next)
        summary = train.train(tiny_config(store, seed), workdir, show_progress=False)
    return workdir, summary, drawn


def test_the_run_wraps_into_fresh_passes_over_the_stores_windows(uninterrupted, windows, seed):
    workdir, summary, drawn = uninterrupted
    why = f"seed {seed}"
    print(why)  # shown with any failure, exceptions included
    num_windows = len(windows)
    assert summary is not None and summary["steps"] == STEPS, why
    assert summary["tokens"] == BATCH * SEQ * STEPS and len(losses(workdir)) == STEPS, why
    assert np.isfinite(losses(workdir)).all(), why
    assert BATCH * STEPS > 3 * num_windows and num_windows % (BATCH // MICROBATCHES) != 0, (
        f"the run must wrap more than once, a batch straddling a boundary ({why})"
    )

    iterators = {id(it) for it, _ in drawn}
    assert len(iterators) == 1, f"one train loader for the whole run, got {len(iterators)} ({why})"
    iterator = drawn[0][0]
    assert len(drawn) == iterator.batches_seen == STEPS * MICROBATCHES, why
    assert iterator.num_windows == num_windows, why
    assert iterator.epochs_seen == pytest.approx(STEPS * BATCH / num_windows), why
    assert iterator.epoch == STEPS * BATCH // num_windows, why

    order = []
    for _, batch in drawn:
        assert batch["inputs"].shape == (BATCH // MICROBATCHES, SEQ), why
        for inputs, targets in zip(batch["inputs"], batch["targets"], strict=True):
            window = tuple(np.concatenate([inputs, targets[-1:]]).astype(np.int64))
            assert window in windows, f"a batch row is not a window of the store's train split ({why})"
            order.append(windows[window])
    passes = [order[e * num_windows : (e + 1) * num_windows] for e in range(iterator.epoch + 1)]
    for e, visited in enumerate(passes[:-1]):
        assert sorted(visited) == list(range(num_windows)), f"pass {e} must visit every window once ({why})"
    assert len(set(passes[-1])) == len(passes[-1]) == len(order) - iterator.epoch * num_windows, why
    full = passes[:-1]
    assert all(a != b for a, b in zip(full, full[1:], strict=False)), f"each pass must be reshuffled ({why})"


def test_sigkill_after_the_boundary_then_resume_is_bit_identical(
    uninterrupted, store, windows, seed, tmp_path
):
    workdir, summary, _ = uninterrupted
    boundary_step = len(windows) // BATCH + 1  # the first step that draws a window of the second pass
    kill_at = 2 * CHECKPOINT_EVERY
    why = f"seed {seed}, first epoch boundary in step {boundary_step}"
    print(why)  # shown with any failure, exceptions included
    assert boundary_step < kill_at, why

    run, log = tmp_path / "run", tmp_path / "killed.stderr"
    with log.open("w") as stderr:
        process = subprocess.Popen(run_args(run, store, seed), stdout=subprocess.DEVNULL, stderr=stderr)
        deadline = time.time() + 300
        while not [s for s in complete_checkpoints(run) if s >= kill_at]:
            assert process.poll() is None, f"exited early ({why}): {log.read_text()[-3000:]}"
            assert time.time() < deadline, f"training did not progress ({why})"
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert not (run / "summary.json").exists(), f"the run finished before the kill ({why})"
    resume_from = max(complete_checkpoints(run))
    assert boundary_step < resume_from < STEPS, why
    assert batches_seen(run, resume_from) == resume_from * MICROBATCHES, why

    resumed = subprocess.run(run_args(run, store, seed), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, f"{why}: {resumed.stderr[-3000:]}"
    assert f"resumed from step {resume_from}" in resumed.stderr, why
    assert losses(run) == losses(workdir), f"killed after checkpoint {resume_from} ({why})"
    final = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert final["final_eval_loss"] == summary["final_eval_loss"], why
    assert batches_seen(run, STEPS) == STEPS * MICROBATCHES, f"the loader's count continued ({why})"
    _, ours = checkpoint.load_params(run)
    _, reference = checkpoint.load_params(workdir)
    for got, want in zip(jax.tree.leaves(ours), jax.tree.leaves(reference), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=why)
