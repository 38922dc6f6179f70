"""One process of tests/test_multiprocess.py: join a 2-process run on localhost, train a few steps, save and
restore a checkpoint collectively, then train a tiny run with `train.train` into OUT_DIR/run.

Process 0 writes the step losses to OUT_DIR/losses.json. Each process writes the summary `train.train`
returned to OUT_DIR/summary_<PROCESS_ID>.json, and what it wrote in OUT_DIR/run outside checkpoints/ (seen
through an audit hook) to OUT_DIR/writes_<PROCESS_ID>.json.

Usage: python tests/multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_DIR SEED
(XLA_FLAGS=--xla_force_host_platform_device_count=2 and JAX_PLATFORMS=cpu are set by the test.)
"""

import json
import os
import pathlib
import sys

import numpy as np

from chinchax import config as config_lib
from chinchax.parallel import distributed

STEPS = 3
MESH = (2, 2, 1)  # data × fsdp across both processes' 4 devices
SEQ_LEN = 32
RUN_STEPS = 4  # of the train.train run: checkpoints at steps 2 and 4


def config(seed: int):
    """cpu_tiny (fp32), 32-token sequences, 2 microbatches of 4 sequences: one per device per microbatch."""
    from experiments import configs

    cfg = configs.get("cpu_tiny")
    cfg.data.seq_len = SEQ_LEN
    cfg.train.update(batch_size=8, microbatches=2, seed=seed)
    return cfg


def run_config(seed: int):
    """cpu_tiny for RUN_STEPS steps of 8 sequences on the default (data-parallel) mesh."""
    from experiments import configs

    cfg = configs.get("cpu_tiny")
    cfg.data.seq_len = SEQ_LEN
    cfg.train.update(
        batch_size=8,
        tokens=8 * SEQ_LEN * RUN_STEPS,
        warmup_tokens=8 * SEQ_LEN,
        log_every=1,
        checkpoint_every=2,
        eval_batches=1,
        seed=seed,
    )
    return config_lib.validate(cfg)


def batches(cfg, steps: int) -> list[dict]:
    """`steps` global batches of random tokens (the same in every process: drawn from cfg.train.seed)."""
    rng = np.random.default_rng(cfg.train.seed)
    micro = cfg.train.batch_size // cfg.train.microbatches
    shape = (steps, cfg.train.microbatches, micro, cfg.data.seq_len + 1)
    tokens = rng.integers(0, 257, size=shape, dtype=np.int32)
    return [{"inputs": t[..., :-1], "targets": t[..., 1:]} for t in tokens]


def record_writes(root: pathlib.Path) -> list[str]:
    """Start recording '<event> <path>' for each write (open for writing, rename, removal, new folder) of this
    process under root, outside root/checkpoints."""
    writes = []
    root, checkpoints = f"{root.absolute()}{os.sep}", f"{root.absolute() / 'checkpoints'}{os.sep}"
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def hook(event, args):
        if event == "open":
            _, mode, flags = args
            if not (any(c in mode for c in "wax+") if mode else flags & write_flags):
                return
        elif event not in ("os.rename", "os.remove", "os.mkdir", "os.rmdir", "shutil.rmtree"):
            return
        if not isinstance(args[0], (str, bytes, os.PathLike)):
            return
        path = os.path.abspath(os.fsdecode(args[0]))
        if path.startswith(root) and not path.startswith(checkpoints):
            writes.append(f"{event} {path[len(root) :]}")

    sys.addaudithook(hook)
    return writes


def main(process_id: int, num_processes: int, port: int, out_dir: pathlib.Path, seed: int) -> None:
    launch = distributed.initialize(f"localhost:{port}", num_processes, process_id)
    import jax
    import orbax.checkpoint as ocp

    from chinchax.parallel import mesh
    from chinchax.training import train

    assert launch.mode == "explicit" and jax.process_count() == num_processes
    cfg = config(seed)
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = MESH
    devices = mesh.make_mesh(cfg.mesh)
    state = mesh.init_sharded_state(cfg, devices, train.init_state, jax.random.key(cfg.train.seed))
    step = mesh.jit_train_step(cfg, devices, train.make_train_step(cfg), jax.eval_shape(lambda: state))
    global_batches = batches(cfg, STEPS)
    sequences = global_batches[0]["inputs"].shape[1]
    rows = mesh.process_batch_rows(devices, sequences)
    local = [{k: v[:, rows] for k, v in b.items()} for b in global_batches]

    losses = []
    for b in local[:-1]:
        state, metrics = step(state, mesh.global_batch(devices, b, sequences))
        losses.append(float(metrics["loss"]))

    checkpointer = ocp.StandardCheckpointer()
    path = out_dir / "checkpoint"
    checkpointer.save(path, state)
    checkpointer.wait_until_finished()
    restored = checkpointer.restore(path, mesh.sharded_shapes(cfg, devices, jax.eval_shape(lambda: state)))

    last = mesh.global_batch(devices, local[-1], sequences)
    _, continued = step(state, last)
    _, resumed = step(restored, last)
    losses.append(float(continued["loss"]))
    if process_id == 0:
        result = {
            "losses": losses,
            "resumed_last_loss": float(resumed["loss"]),
            "rows": [rows.start, rows.stop],
            "process_count": jax.process_count(),
            "devices": jax.device_count(),
        }
        (out_dir / "losses.json").write_text(json.dumps(result))

    writes = record_writes(out_dir / "run")
    summary = train.train(run_config(seed), out_dir / "run", show_progress=False)
    (out_dir / f"writes_{process_id}.json").write_text(json.dumps(writes))
    (out_dir / f"summary_{process_id}.json").write_text(json.dumps(summary))
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), pathlib.Path(sys.argv[4]), int(sys.argv[5]))
