"""Subprocess half of the loader-resume test: take batches from a loader, then save or restore its state.

    python tests/data_resume_helper.py save    STORE CKPT_DIR N OUT.npz   # N batches, then checkpoint at step N
    python tests/data_resume_helper.py restore STORE CKPT_DIR M OUT.npz   # restore the latest step, M batches
OUT.npz holds the batches taken ('inputs', 'targets': (count, batch, seq_len)) and 'epochs_seen' after each.
"""

import sys

import grain
import numpy as np
import orbax.checkpoint as ocp

from chinchax.data import make_loader

LOADER = {"split": "train", "seq_len": 16, "batch_size": 4, "seed": 7}


def take(iterator, count: int) -> dict[str, np.ndarray]:
    batches = [next(iterator) for _ in range(count)]
    return {
        "inputs": np.stack([b["inputs"] for b in batches]),
        "targets": np.stack([b["targets"] for b in batches]),
    }


def main(mode: str, store: str, ckpt_dir: str, count: int, out: str) -> None:
    iterator = make_loader(store, **LOADER)
    with ocp.CheckpointManager(ckpt_dir, item_names=("data",)) as manager:
        if mode == "restore":
            manager.restore(
                manager.latest_step(),
                args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(iterator)),
            )
        restored_epochs = iterator.epochs_seen
        batches = take(iterator, count)
        if mode == "save":
            manager.save(count, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
            manager.wait_until_finished()
    np.savez(out, **batches, restored_epochs_seen=restored_epochs, epochs_seen=iterator.epochs_seen)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
