"""Scaling studies: compute-optimal planning (`plan`), law fits (`fit`, `fit_io`, `bootstrap`,
`batched_lbfgs`), sweep specs, gathering and analysis (`sweep`), launchers (`launch`: local, Ray, SLURM), the
μP coordinate check (`coord_check`) and the figures (`plots`).

May import: chinchax.config, chinchax.parametrization, chinchax.data, chinchax.model, chinchax.parallel.
Points train through the `experiments.run` command, never by importing chinchax.training.
"""
