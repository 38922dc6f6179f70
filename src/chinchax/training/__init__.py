"""Training: the optax chain and schedules (`optim`: linear, cosine, WSD), pruning during training (`sparsity`),
the train state (`state`), the train step and loop (`train`), orbax checkpoints (`checkpoint`), runs branched off
another run's checkpoint (`branch`), metrics and summaries (`metrics`).

May import: chinchax.config, chinchax.parametrization, chinchax.data, chinchax.model, chinchax.parallel,
chinchax.scaling.
"""
