"""Running on many devices: the device table (`hardware`), cluster presets, the mesh and the logical-axis
rules (`mesh`), multi-host start-up (`distributed`), the per-device memory plan with the automatic
microbatch / remat choice (`memory_plan`), and the performance model (`perf_model`: a compiled step's
collectives per mesh axis, a roofline step time).

May import: chinchax.config, chinchax.parametrization, chinchax.data, chinchax.model.
"""
