"""Running on many devices: the device table (`hardware`), cluster presets, the mesh and the logical-axis
rules (`mesh`), multi-host start-up (`distributed`), and the per-device memory plan with the automatic
microbatch / remat choice (`memory_plan`).

May import: chinchax.config, chinchax.parametrization, chinchax.data, chinchax.model.
"""
