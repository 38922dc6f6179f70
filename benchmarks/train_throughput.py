"""Train-step throughput: our jit'd step against Hugging Face's PyTorch GPT2LMHeadModel + AdamW, one run.

    python -m benchmarks.train_throughput [--d_model=256 --n_layers=6 --seq_len=256 --batch=16 --vocab=257]

Both train the same shape (exact GELU, tied head, fp32) on the same random tokens; the table gives the
median step time over --steps timed steps after warm-up, tokens/s, the ratio, and MFU against the fp32
matmul peak measured by JAX in this same run (the detailed FLOPs count of chinchax.model.flops for both).
"""

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from chinchax import config
from chinchax.model import flops
from chinchax.parallel import hardware
from chinchax.training import train

_D = flags.DEFINE_integer("d_model", 256, "Width.")
_L = flags.DEFINE_integer("n_layers", 6, "Layers.")
_HEADS = flags.DEFINE_integer("n_heads", 8, "Heads.")
_SEQ = flags.DEFINE_integer("seq_len", 256, "Sequence length.")
_BATCH = flags.DEFINE_integer("batch", 16, "Sequences per step.")
_VOCAB = flags.DEFINE_integer("vocab", 257, "Vocabulary (257 bytes + EOS; 50257 for GPT-2 BPE).")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per framework.")
_THREADS = flags.DEFINE_integer("torch_threads", 0, "torch.set_num_threads (0: torch's default).")


def benchmark_config():
    cfg = config.base_config()
    cfg.name = "bench"
    cfg.model.update(
        vocab_size=_VOCAB.value,
        max_positions=_SEQ.value,
        d_model=_D.value,
        n_layers=_L.value,
        n_heads=_HEADS.value,
    )
    cfg.data.update(tokenizer="bytes", seq_len=_SEQ.value)
    cfg.train.update(batch_size=_BATCH.value, tokens=10**9, warmup_tokens=0)
    return config.validate(cfg)


def median_step_seconds(run_step, steps: int) -> float:
    run_step()
    run_step()  # compile / allocate, then warm
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        run_step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_chinchax(cfg, tokens: np.ndarray) -> float:
    step = jax.jit(train.make_train_step(cfg), donate_argnums=0)
    state = [train.init_state(cfg, jax.random.key(0))]
    batch = {"inputs": jnp.asarray(tokens[None, :, :-1]), "targets": jnp.asarray(tokens[None, :, 1:])}

    def run():
        state[0], metrics = step(state[0], batch)
        jax.block_until_ready(metrics["loss"])

    return median_step_seconds(run, _STEPS.value)


def time_hf(cfg, tokens: np.ndarray) -> float:
    import torch
    import transformers

    if _THREADS.value:
        torch.set_num_threads(_THREADS.value)
    hf_config = transformers.GPT2Config(
        vocab_size=cfg.model.vocab_size,
        n_positions=cfg.data.seq_len,
        n_embd=cfg.model.d_model,
        n_layer=cfg.model.n_layers,
        n_head=cfg.model.n_heads,
        activation_function="gelu",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=True,
    )
    model = transformers.GPT2LMHeadModel(hf_config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    ids = torch.from_numpy(tokens[:, :-1].astype(np.int64))
    labels = torch.from_numpy(tokens[:, 1:].astype(np.int64))

    def run():
        logits = model(ids).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    return median_step_seconds(run, _STEPS.value)


def main(argv):
    del argv
    cfg = benchmark_config()
    tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (_BATCH.value, _SEQ.value + 1))
    tokens = tokens.astype(np.int32)
    per_step = _BATCH.value * _SEQ.value
    flops_per_token = flops.flops_per_token(cfg.model, cfg.data.seq_len)
    peak = hardware.measure_matmul_peak()
    ours = time_chinchax(cfg, tokens)
    hf = time_hf(cfg, tokens)
    peak_after = hardware.measure_matmul_peak()
    peak = max(peak, peak_after)
    print(
        f"shape: d{_D.value} L{_L.value} h{_HEADS.value} seq {_SEQ.value} batch {_BATCH.value} "
        f"vocab {_VOCAB.value}; {flops.param_count(cfg.model):,} params; "
        f"{flops_per_token:,} FLOPs/token; measured JAX fp32 matmul peak {peak / 1e9:.1f} GFLOP/s"
    )
    print(f"{'framework':28s} {'step (ms)':>10s} {'tokens/s':>10s} {'MFU':>7s}")
    for name, seconds in [("chinchax (JAX, jit)", ours), ("HF GPT2LMHeadModel (torch)", hf)]:
        rate = per_step / seconds
        print(f"{name:28s} {seconds * 1e3:10.1f} {rate:10.0f} {rate * flops_per_token / peak:7.1%}")
    print(f"ratio chinchax / HF tokens/s: {hf / ours:.2f}x")


if __name__ == "__main__":
    app.run(main)
