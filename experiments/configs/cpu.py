"""CPU-sized scale points: byte-level vocabulary, short sequences, Chinchilla-optimal token counts; and the CPU
recipe every CPU sweep (experiments/configs/sweeps.py, sparse_cpu.py) trains its points with.

`get_config("cpu_default")` is what `python -m experiments.run` trains with no --config.
"""

from chinchax.config import base_config

SEQ = 256

# CPU sweeps start from CPU_BASE (bytes, 256-token sequences) with CPU_RECIPE (8 × 256 tokens a step), pinned
# here so a sweep's points do not move when the base point's defaults change.
CPU_BASE = "cpu_tiny"
CPU_RECIPE = (
    ("train.batch_size", 8),
    ("train.warmup_tokens", 20 * 8 * SEQ),
    ("train.peak_lr", 3e-3),
    ("train.decay", "cosine"),
)
# Every sweep's analysis (and the smoke check) reads a point's validation loss only (final_eval_loss, the
# results' `loss`): its runs skip the test split's final evaluation (experiments.run alone does both).
FINAL_EVAL = (("train.final_eval", "validation"),)

# name: (layers, d_model, heads, batch, peak LR)
POINTS_TABLE = {
    "cpu_tiny": (2, 32, 2, 8, 3e-3),
    "cpu_default": (2, 64, 4, 16, 3e-3),
    "cpu_small": (4, 128, 4, 16, 2e-3),
}
POINTS = tuple(POINTS_TABLE)


def get_config(name: str = "cpu_default"):
    """A CPU-sized, byte-level point trained for 20 tokens per parameter on the embedded corpus."""
    if name not in POINTS_TABLE:
        raise ValueError(f"unknown CPU scale point {name!r}; known: {', '.join(POINTS)}")
    layers, d, heads, batch, lr = POINTS_TABLE[name]
    cfg = base_config()
    cfg.name = name
    cfg.model.update(vocab_size=257, max_positions=SEQ, n_layers=layers, d_model=d, n_heads=heads)
    cfg.data.update(dataset="embedded", tokenizer="bytes", seq_len=SEQ)
    cfg.train.update(
        batch_size=batch,
        tokens_per_param=20.0,
        peak_lr=lr,
        warmup_tokens=20 * batch * SEQ,
        decay="cosine",
    )
    return cfg
