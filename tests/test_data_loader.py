"""The grain loader: windows read back against the store's numpy copy, epoch permutations, sharding, and an
exact resume through orbax in a fresh process."""

import subprocess
import sys

import data_resume_helper as helper
import numpy as np
import pytest

from chinchax.data import DataError, make_loader, open_store, prepare

SEQ = 16


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    """A bytes store whose windows are all distinct: numbered lines from a random start, ~600 windows."""
    corpus = tmp_path_factory.mktemp("corpus")
    start = int(np.random.default_rng().integers(0, 10**6))
    for part in range(3):
        lines = range(start + part * 400, start + (part + 1) * 400)
        (corpus / f"part{part}.txt").write_text("".join(f"{i:07d}\n" for i in lines))
    out = tmp_path_factory.mktemp("store")
    return prepare(corpus, "bytes", out, validation_fraction=0, test_fraction=0, progress=False)


@pytest.fixture(scope="module")
def train_tokens(store_path):
    return open_store(store_path).arrays["train"].read().result().astype(np.int64)


def test_batches_are_windows_and_epochs_are_fresh_permutations(store_path, train_tokens):
    num_windows = (len(train_tokens) - 1) // SEQ
    batch = 4
    loader = make_loader(store_path, "train", SEQ, batch, seed=3)
    assert loader.num_windows == num_windows
    starts = {tuple(train_tokens[w * SEQ : w * SEQ + SEQ + 1]): w for w in range(num_windows)}
    assert len(starts) == num_windows, "fixture corpus has repeated windows; pick another cap"
    order = []
    for _ in range(2 * num_windows // batch):
        b = next(loader)
        assert b["inputs"].dtype == b["targets"].dtype == np.int32 and b["inputs"].shape == (batch, SEQ)
        np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
        order.extend(
            starts[tuple(np.concatenate([i, t[-1:]]))] for i, t in zip(b["inputs"], b["targets"], strict=True)
        )
    assert loader.epochs_seen == pytest.approx(len(order) / num_windows)
    assert loader.epoch == len(order) // num_windows
    first, second = order[:num_windows], order[num_windows : 2 * num_windows]
    assert sorted(first) == list(range(num_windows)), "epoch 1 must visit every window once"
    if len(second) == num_windows:
        assert sorted(second) == list(range(num_windows))
    assert first != list(range(num_windows)), "not shuffled"
    assert second[: num_windows // 2] != first[: num_windows // 2], "epoch 2 must be reshuffled"
    other_seed = next(make_loader(store_path, "train", SEQ, batch, seed=4))
    other_windows = [
        starts[tuple(np.concatenate([i, t[-1:]]))]
        for i, t in zip(other_seed["inputs"], other_seed["targets"], strict=True)
    ]
    assert other_windows != second[:batch], (
        "seed 4's first epoch must not be seed 3's second (grain's seed + epoch)"
    )
    again = make_loader(store_path, "train", SEQ, batch, seed=3)
    first_batch = next(again)
    assert not np.array_equal(other_seed["inputs"], first_batch["inputs"])
    np.testing.assert_array_equal(
        first_batch["inputs"][0], train_tokens[order[0] * SEQ : order[0] * SEQ + SEQ]
    )


def test_shards_together_are_the_single_process_batch(store_path):
    single = make_loader(store_path, "train", SEQ, 6, seed=11)
    shards = [
        make_loader(store_path, "train", SEQ, 2, seed=11, shard_index=k, shard_count=3) for k in range(3)
    ]
    for _ in range(25):
        whole = next(single)["inputs"]
        parts = [next(s)["inputs"] for s in shards]
        # process k takes global positions k, k+3, ...: row r of shard k is row 3r+k of the single batch
        np.testing.assert_array_equal(np.stack(parts, axis=1).reshape(whole.shape), whole)
    assert shards[1].epochs_seen == pytest.approx(single.epochs_seen)


def test_one_ordered_epoch_for_evaluation(store_path, train_tokens):
    num_windows = (len(train_tokens) - 1) // SEQ
    batches = list(make_loader(store_path, "train", SEQ, 5, seed=0, num_epochs=1, shuffle=False))
    assert len(batches) == num_windows // 5
    inputs = np.concatenate([b["inputs"] for b in batches]).ravel()
    targets = np.concatenate([b["targets"] for b in batches])
    np.testing.assert_array_equal(inputs, train_tokens[: len(inputs)])
    np.testing.assert_array_equal(targets[:, -1], train_tokens[SEQ : len(inputs) + 1 : SEQ])


def test_bad_loader_arguments(store_path):
    with pytest.raises(DataError, match="unknown split 'dev'"):
        make_loader(store_path, "dev", SEQ, 2, seed=0)
    with pytest.raises(DataError, match="0 <= shard_index < shard_count"):
        make_loader(store_path, "train", SEQ, 2, seed=0, shard_index=2, shard_count=2)
    with pytest.raises(DataError, match="= 1 windows of 8192\\+1, fewer than one global batch of 2x1"):
        make_loader(store_path, "train", 8192, 2, seed=0)
    with pytest.raises(DataError, match="split 'validation' of .* has 0 tokens"):
        make_loader(store_path, "validation", SEQ, 1, seed=0)
    loader = make_loader(store_path, "train", SEQ, 2, seed=0)
    state = loader.get_state()
    with pytest.raises(DataError, match="batch_size: saved 2 vs now 3"):
        make_loader(store_path, "train", SEQ, 3, seed=0).set_state(state)


def test_resume_in_a_fresh_process_sees_the_same_batches(store_path, tmp_path):
    """N batches, checkpoint through orbax, restore in a new process, M more == batches N..N+M of one run."""
    n, m = 100, 100  # crosses the first epoch boundary (600 windows = 150 batches of 4)
    ckpt = tmp_path / "ckpt"
    for mode, count in (("save", n), ("restore", m)):
        done = subprocess.run(
            [
                sys.executable,
                helper.__file__,
                mode,
                str(store_path),
                str(ckpt),
                str(count),
                str(tmp_path / f"{mode}.npz"),
            ],
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr[-3000:]
    uninterrupted = helper.take(make_loader(store_path, **helper.LOADER), n + m)
    saved, resumed = np.load(tmp_path / "save.npz"), np.load(tmp_path / "restore.npz")
    for key in ("inputs", "targets"):
        np.testing.assert_array_equal(saved[key], uninterrupted[key][:n])
        np.testing.assert_array_equal(resumed[key], uninterrupted[key][n:])
    num_windows = make_loader(store_path, **helper.LOADER).num_windows
    assert float(resumed["restored_epochs_seen"]) == pytest.approx(n * 4 / num_windows)
    assert (
        float(resumed["epochs_seen"]) == pytest.approx((n + m) * 4 / num_windows)
        and (n + m) * 4 > num_windows
    )
