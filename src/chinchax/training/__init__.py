"""Training: the optax chain and schedule (`optim`), pruning during training (`sparsity`), the train state
(`state`), the train step and loop (`train`), orbax checkpoints (`checkpoint`), metrics and summaries (`metrics`).

May import: chinchax.config, chinchax.parametrization, chinchax.data, chinchax.model, chinchax.parallel,
chinchax.scaling.
"""
