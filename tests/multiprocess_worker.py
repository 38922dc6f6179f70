"""One process of tests/test_multiprocess.py: join a 2-process run on localhost, train a few steps, save and
restore a checkpoint collectively, and (process 0) write the losses as JSON.

Usage: python tests/multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_DIR
(XLA_FLAGS=--xla_force_host_platform_device_count=4 and JAX_PLATFORMS=cpu are set by the test.)
"""

import json
import pathlib
import sys

import numpy as np

from chinchax import distributed

STEPS = 3
MESH = (2, 4, 1)  # data × fsdp across both processes' 8 devices


def config():
    """cpu_tiny (fp32) with 2 microbatches of 8 sequences: one sequence per device per microbatch."""
    from experiments import configs

    cfg = configs.get("cpu_tiny")
    cfg.train.update(batch_size=16, microbatches=2)
    return cfg


def batches(cfg, steps: int) -> list[dict]:
    """`steps` global batches of fresh random tokens (the same in every process: seeded)."""
    rng = np.random.default_rng(1234)
    micro = cfg.train.batch_size // cfg.train.microbatches
    shape = (steps, cfg.train.microbatches, micro, cfg.data.seq_len + 1)
    tokens = rng.integers(0, 257, size=shape, dtype=np.int32)
    return [{"inputs": t[..., :-1], "targets": t[..., 1:]} for t in tokens]


def main(process_id: int, num_processes: int, port: int, out_dir: pathlib.Path) -> None:
    launch = distributed.initialize(f"localhost:{port}", num_processes, process_id)
    import jax
    import orbax.checkpoint as ocp

    from chinchax import mesh, train

    assert launch.mode == "explicit" and jax.process_count() == num_processes
    cfg = config()
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
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), pathlib.Path(sys.argv[4]))
