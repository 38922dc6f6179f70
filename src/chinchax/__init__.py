"""chinchax: compute-optimal scaling studies in JAX (the Cerebras-GPT recipe and beyond).

The folders, bottom to top; each may import only those above it in this list (its `__init__` says so):

    config.py, parametrization.py   the config schema; SP / μP as one table
    atomic.py                       write-then-rename, for every file a run or a sweep writes
    malloc.py                       glibc's allocator told to keep freed memory (CPU entry points only)
    data/                           tokenizers, corpora, the token store, the grain loader
    model/                          the GPT, the loss (dense or chunked), FLOP counts, KV-cache sampling
    parallel/                       devices, presets, the mesh and its rules, multi-host, the memory plan,
                                    the performance model (compiled HLO -> kernels, collectives -> a step time)
    scaling/                        planning, law fits, sweeps and their launchers (local, SLURM, Ray), the
                                    coordinate check, reports and plots
    training/                       optimizer and schedules, state, the step and loop, checkpoints, metrics,
                                    sparsity masks and their pruner
    dryrun/                         the dry-run report, the AOT compile of the real step, its predicted time
    evaluation/                     held-out loss, the lm-eval model, HF import / export

`lm_eval_adapter.py` is the lm-eval command (`python -m chinchax.lm_eval_adapter`).
"""

__version__ = "0.1.0"
