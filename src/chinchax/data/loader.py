"""The grain pipeline: shuffled (seq_len+1)-token windows of a store split, sharded, batched, checkpointable.

Window w covers tokens [w*seq_len, w*seq_len + seq_len + 1) of the split (documents joined by EOS, windows
cross document boundaries); inputs are its first seq_len tokens, targets its last seq_len. An epoch visits
every window once in an order drawn from `seed` and the epoch number, so each epoch is reshuffled.
Process k of K takes positions k, k+K, k+2K, ... of that global order, so the K processes' batches at step s
together are exactly the batch of size K*batch_size a single process would see.

The iterator's state (grain get_state/set_state) is saved through orbax with grain's handler:
    manager.save(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator), ...))
    manager.restore(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(iterator), ...))
and a restored iterator continues with exactly the batches an uninterrupted run would have produced.
"""

import hashlib
import os
from typing import Any

import grain
import numpy as np

from chinchax.data.errors import DataError
from chinchax.data.store import SPLITS, open_store


def _grain_seed(seed: int) -> int:
    """A 32-bit shuffle seed derived from `seed` by hashing.

    grain reseeds epoch e with seed + e, so seeds s and s+1 would share permutations one epoch apart;
    hashing the run seed first keeps runs with nearby seeds independent.
    """
    digest = hashlib.blake2b(f"chinchax-data-order:{seed}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


class _ReadWindows(grain.transforms.Map):
    """Window indices -> {'inputs', 'targets'}: int32 arrays of shape (batch, seq_len), read concurrently."""

    def __init__(self, array, seq_len: int, num_windows: int):
        self._array = array
        self._seq_len = seq_len
        self._num_windows = num_windows

    def map(self, windows: np.ndarray) -> dict[str, np.ndarray]:
        starts = (np.asarray(windows, np.int64) % self._num_windows) * self._seq_len
        reads = [self._array[s : s + self._seq_len + 1].read() for s in starts.tolist()]
        tokens = np.stack([r.result() for r in reads]).astype(np.int32)
        return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}


class TokenBatchIterator(grain.DatasetIterator):
    """Batches of a store split; grain-checkpointable; counts batches and epochs seen (globally)."""

    def __init__(self, parent: grain.DatasetIterator, identity: dict[str, Any], windows_per_batch: int):
        super().__init__(parent)
        self._identity = identity
        self._windows_per_batch = windows_per_batch  # over all processes
        self.batches_seen = 0

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._parent)
        self.batches_seen += 1
        return batch

    @property
    def num_windows(self) -> int:
        """Windows in one epoch of the split."""
        return self._identity["num_windows"]

    @property
    def epochs_seen(self) -> float:
        """Epochs consumed so far by all processes together (2.5 = two full passes and half of the third)."""
        return self.batches_seen * self._windows_per_batch / self.num_windows

    @property
    def epoch(self) -> int:
        """The current epoch, counting from 0 (= whole epochs completed)."""
        return self.batches_seen * self._windows_per_batch // self.num_windows

    def get_state(self) -> dict[str, Any]:
        return {
            "loader": self._identity,
            "batches_seen": self.batches_seen,
            "pipeline": self._parent.get_state(),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        saved = state.get("loader", {})
        differing = sorted(
            k for k in set(saved) | set(self._identity) if saved.get(k) != self._identity.get(k)
        )
        if differing:
            diffs = ", ".join(
                f"{k}: saved {saved.get(k)!r} vs now {self._identity.get(k)!r}" for k in differing
            )
            raise DataError(f"data iterator state belongs to another loader ({diffs})")
        self._parent.set_state(state["pipeline"])
        self.batches_seen = int(state["batches_seen"])

    def __str__(self) -> str:
        return f"TokenBatchIterator({self._identity['store']}, split={self._identity['split']})"


def make_loader(
    store_path: str | os.PathLike,
    split: str,
    seq_len: int,
    batch_size: int,
    seed: int,
    shard_index: int = 0,
    shard_count: int = 1,
    num_epochs: int | None = None,
    shuffle: bool = True,
    read_threads: int = 2,
    prefetch_batches: int = 8,
) -> TokenBatchIterator:
    """An iterator of {'inputs', 'targets'}: int32 (batch_size, seq_len) batches of this process's share.

    num_epochs: None repeats forever (reshuffled every epoch); n stops after n epochs (the last partial
    batch dropped). shuffle=False reads windows in order (for evaluation). read_threads / prefetch_batches
    size grain's in-process prefetch (no worker processes).
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
    if min(seq_len, batch_size, shard_count) < 1 or not 0 <= shard_index < shard_count:
        raise DataError(
            f"need seq_len, batch_size, shard_count >= 1 and 0 <= shard_index < shard_count; got "
            f"seq_len={seq_len}, batch_size={batch_size}, shard_index={shard_index}, shard_count={shard_count}"
        )
    if num_epochs is not None and num_epochs < 1:
        raise DataError(f"num_epochs must be None (repeat forever) or >= 1, got {num_epochs}")
    store = open_store(store_path)
    tokens = store.tokens(split)
    num_windows = max(tokens - 1, 0) // seq_len
    if num_windows < batch_size * shard_count:
        raise DataError(
            f"split {split!r} of {store.path} has {tokens} tokens = {num_windows} windows of {seq_len}+1, "
            f"fewer than one global batch of {batch_size}x{shard_count}"
        )
    m = store.manifest
    identity = {
        # Where the store lives may change between runs; what it holds may not.
        "store": f"{m['content_hash']}/{m['tokenizer']['name']}/{m['validation_fraction']}/{m['test_fraction']}",
        "split": split,
        "num_windows": num_windows,
        "seq_len": seq_len,
        "batch_size": batch_size,
        "seed": seed,
        "shuffle": shuffle,
        "num_epochs": num_epochs,
        "shard_index": shard_index,
        "shard_count": shard_count,
    }
    windows = grain.MapDataset.range(num_windows)
    if shuffle:
        windows = windows.shuffle(seed=_grain_seed(seed))
    # Repeat passes indices beyond one epoch to the shuffle, which reseeds per epoch: a fresh order each epoch.
    windows = windows.repeat(num_epochs)
    batches = windows[shard_index::shard_count].batch(batch_size, drop_remainder=True)
    batches = batches.map(_ReadWindows(store.arrays[split], seq_len, num_windows))
    read_options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch_batches)
    pipeline = iter(batches.to_iter_dataset(read_options))
    return TokenBatchIterator(pipeline, identity, batch_size * shard_count)
