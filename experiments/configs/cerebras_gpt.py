"""The published Cerebras-GPT scale points (Dey et al. 2023, Tables 1 and 7): SP, μP, and the 40M μP proxy.

`get_config("chinchilla_2.7b")`, `get_config("mup_111m")`, `get_config("mup_40m")`. All train on GPT-2 BPE at
sequence length 2048 for ≈ 20 tokens per parameter; the schedule is in tokens (warmup = steps × batch × 2048).
"""

from chinchax.config import AUTO, base_config

SEQ = 2048

# size: (layers, d_model, heads, batch, steps, SP peak LR, warmup steps, decay, SP out-proj σ, Adam ε)
FAMILY = {
    "111m": (10, 768, 12, 120, 9037, 6e-4, 1525, "linear", 0.004472135955, 1e-8),
    "256m": (14, 1088, 17, 264, 9468, 6e-4, 693, "linear", 0.003779644730, 1e-8),
    "590m": (18, 1536, 12, 264, 21836, 2e-4, 693, "linear", 0.003333333333, 1e-8),
    "1.3b": (24, 2048, 16, 528, 24334, 2e-4, 346, "cosine", 0.0025, 1e-8),
    "2.7b": (32, 2560, 32, 528, 49041, 2e-4, 346, "cosine", 0.0025, 1e-8),
    "6.7b": (32, 4096, 32, 1040, 62522, 1.2e-4, 176, "linear", 0.0025, 1e-9),
    "13b": (40, 5120, 40, 720, None, 1.2e-4, 254, "cosine", 0.0025, 1e-9),
}
# 13B: 720 sequences for the first 57,000 steps (84.05B tokens), then 1080, for 257,067,417,600 tokens.
TOKENS_13B = 257_067_417_600
RAMP_13B = ((57_000 * 720 * SEQ, 1080),)

MUP_SIZES = ("111m", "256m", "590m", "1.3b", "2.7b")
MUP_PEAK_LR = 6e-3  # η_base
MUP_INIT_STD = 0.08  # σ_base

# How the published points run on their pods: bf16 matmuls (fp32 params, softmax and loss), remat and
# microbatches chosen per mesh to fit the device (chinchax.parallel.memory_plan), and the whole-score XLA
# attention: the path whose memory both the plan and the CPU compile of a dry run model (with 'auto' the dry
# run compiles the blockwise CPU kernel, which needs more than the plan counts on 2 of the 39 pods; pass
# --config.model.attention=auto for cuDNN / Pallas on the pod).
POD_RUN = {"compute_dtype": "bfloat16", "remat": "auto", "attention": "xla"}

# The pods each published point is planned on (experiments.plan --pods): one 8×H100 node, Andromeda-like
# 16 CS-2 systems, and a TPU slice sized to the model (v5e's 16 GiB chips up to 2.7B, then more or larger chips).
TPU_PRESET = {"6.7b": "tpu-v5e-32", "13b": "tpu-v5p-8"}  # the others: tpu-v5e-16


def pods(name: str) -> tuple[str, ...]:
    """The mesh presets a published point is planned to fit."""
    size = name.partition("_")[2]
    return ("gpu-8", TPU_PRESET.get(size, "tpu-v5e-16"), "wse-16")


POINTS = [f"chinchilla_{s}" for s in FAMILY] + [f"mup_{s}" for s in MUP_SIZES] + ["mup_40m"]


def _family_point(name: str, size: str, parametrization: str):
    layers, d, heads, batch, steps, lr, warmup, decay, out_std, eps = FAMILY[size]
    cfg = base_config()
    cfg.name = name
    cfg.model.update(n_layers=layers, d_model=d, n_heads=heads, parametrization=parametrization, **POD_RUN)
    cfg.train.update(batch_size=batch, warmup_tokens=warmup * batch * SEQ, decay=decay, adam_eps=eps)
    cfg.train.microbatches = AUTO
    if heads % 2:  # 256M's 17 heads do not split over tensor parallelism: those devices shard by FSDP instead
        cfg.mesh.tensor = 1
    if size == "13b":
        cfg.train.update(tokens=TOKENS_13B, batch_ramp=RAMP_13B)
    else:
        cfg.train.tokens = steps * batch * SEQ
    if parametrization == "sp":
        cfg.model.out_proj_init_std = out_std
        cfg.train.peak_lr = lr
    else:
        cfg.model.init_std = MUP_INIT_STD
        cfg.train.peak_lr = MUP_PEAK_LR
    return cfg


def _proxy_40m():
    cfg = base_config()
    cfg.name = "mup_40m"
    cfg.model.update(
        n_layers=24,
        d_model=256,
        n_heads=4,
        d_ffn=1024,
        parametrization="mup",
        init_std=MUP_INIT_STD,
        **POD_RUN,
    )
    cfg.train.update(
        microbatches=AUTO,
        batch_size=256,
        tokens=1525 * 256 * SEQ,
        warmup_tokens=152 * 256 * SEQ,
        decay="linear",
        peak_lr=MUP_PEAK_LR,
    )
    return cfg


def get_config(name: str = "chinchilla_111m"):
    """The config of a published scale point by name (see POINTS)."""
    if name == "mup_40m":
        return _proxy_40m()
    family, _, size = name.partition("_")
    if family == "chinchilla" and size in FAMILY:
        return _family_point(name, size, "sp")
    if family == "mup" and size in MUP_SIZES:
        return _family_point(name, size, "mup")
    raise ValueError(f"unknown Cerebras-GPT scale point {name!r}; known: {', '.join(POINTS)}")
