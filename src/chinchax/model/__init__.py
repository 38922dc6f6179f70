"""The model: the Flax GPT (`gpt`: pure functions of params and tokens), FLOP and parameter counts
(`flops`), KV-cache sampling (`sample`).

May import: chinchax.config, chinchax.parametrization, chinchax_kernels.
"""
