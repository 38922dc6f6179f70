"""Train-step throughput: our jit'd step against Hugging Face's PyTorch GPT2LMHeadModel + AdamW, one run.

    python -m benchmarks.train_throughput [--shapes=a,b,c] [--steps=10] [--seq_len=256] [--batch_size=16]
                                          [--n_layers=N] [--peak_size=2048]

Shapes (seq 256, batch 16 by default, fp32): a = d128 L4 h4 vocab 50304, b = d256 L6 h8 vocab 50304, c = d256 L6
h8 vocab 257 (the CPU configs' byte regime); --n_layers sets every shape's depth (for a tiny run). For each shape
both frameworks train the same model (exact GELU, tied head) on the same random tokens, back to back; the table
gives the median step time over --steps timed steps after warm-up, tokens/s, the ratio, and MFU against the fp32
matmul peak JAX measures in this same run (on a --peak_size square, before and after the shapes; the higher
counts), with chinchax.model.flops' detailed count for both. Last on stdout, one JSON object: {"peak_gflops": P,
"shapes": {"a": {"ours_tokens_per_s", "peer_tokens_per_s", "ratio", "ours_mfu", "peer_mfu"}, …}}.
"""

from chinchax import malloc

if __name__ == "__main__":  # before the heavy imports: glibc reads its tunables at process start
    malloc.keep_freed_memory()

import json

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks import timing
from chinchax import config
from chinchax.model import flops
from chinchax.parallel import hardware
from chinchax.training import train

SHAPES = {  # name: (d_model, n_layers, n_heads, vocab)
    "a": (128, 4, 4, 50304),
    "b": (256, 6, 8, 50304),
    "c": (256, 6, 8, 257),
}

_SHAPES = flags.DEFINE_list("shapes", list(SHAPES), "Shapes to measure, from a, b, c.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per framework and shape.")
_THREADS = flags.DEFINE_integer("torch_threads", 0, "torch.set_num_threads (0: torch's default).")
_SEQ = flags.DEFINE_integer("seq_len", 256, "Tokens per sequence.", lower_bound=1)
_BATCH = flags.DEFINE_integer("batch_size", 16, "Sequences per step.", lower_bound=1)
_LAYERS = flags.DEFINE_integer("n_layers", 0, "Layers of every shape (0: each shape's own).", lower_bound=0)
_PEAK_SIZE = flags.DEFINE_integer(
    "peak_size", 2048, "Side of the square matmul the peak is measured on.", lower_bound=1
)


def benchmark_config(d_model: int, n_layers: int, n_heads: int, vocab: int, seq: int, batch: int):
    """A chinchax config of the shape, with the defaults a user gets (attention 'auto', dense loss)."""
    cfg = config.base_config()
    cfg.name = "bench"
    cfg.model.update(vocab_size=vocab, max_positions=seq, d_model=d_model, n_layers=n_layers, n_heads=n_heads)
    cfg.data.update(tokenizer="bytes", seq_len=seq)
    cfg.train.update(batch_size=batch, tokens=10**9, warmup_tokens=0)
    return config.validate(cfg)


def time_chinchax(cfg, tokens: np.ndarray) -> float:
    step = jax.jit(train.make_train_step(cfg), donate_argnums=0)
    state = [train.init_state(cfg, jax.random.key(0))]
    batch = {"inputs": jnp.asarray(tokens[None, :, :-1]), "targets": jnp.asarray(tokens[None, :, 1:])}

    def run():
        state[0], metrics = step(state[0], batch)
        jax.block_until_ready(metrics["loss"])

    return timing.median_step_seconds(run, _STEPS.value)


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
        bos_token_id=None,
        eos_token_id=None,
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

    return timing.median_step_seconds(run, _STEPS.value)


def main(argv):
    del argv
    timing.check_shapes(_SHAPES.value, SHAPES)
    seq, batch = _SEQ.value, _BATCH.value
    peak = hardware.measure_matmul_peak(_PEAK_SIZE.value)
    seconds = {}
    for name in _SHAPES.value:
        d_model, n_layers, n_heads, vocab = SHAPES[name]
        cfg = benchmark_config(d_model, _LAYERS.value or n_layers, n_heads, vocab, seq, batch)
        tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (batch, seq + 1)).astype(np.int32)
        seconds[name] = (time_chinchax(cfg, tokens), time_hf(cfg, tokens), cfg)
    peak = max(peak, hardware.measure_matmul_peak(_PEAK_SIZE.value))

    print(
        f"seq {seq}, batch {batch}, fp32; JAX fp32 matmul peak measured in this run: {peak / 1e9:.1f} GFLOP/s"
    )
    print(
        f"{'shape':34s} {'ours tok/s':>10s} {'HF tok/s':>10s} {'ratio':>6s} {'ours MFU':>9s} {'HF MFU':>7s}"
    )
    results = {}
    for name, (ours, peer, cfg) in seconds.items():
        m = cfg.model
        per_token = flops.flops_per_token(m, seq)
        ours_rate, peer_rate = batch * seq / ours, batch * seq / peer
        results[name] = {
            "ours_tokens_per_s": round(ours_rate, 1),
            "peer_tokens_per_s": round(peer_rate, 1),
            "ratio": round(ours_rate / peer_rate, 3),
            "ours_mfu": round(ours_rate * per_token / peak, 4),
            "peer_mfu": round(peer_rate * per_token / peak, 4),
        }
        r = results[name]
        label = f"{name}: d{m.d_model} L{m.n_layers} h{m.n_heads} vocab {m.vocab_size}"
        print(
            f"{label:34s} {ours_rate:10.0f} {peer_rate:10.0f} {r['ratio']:5.2f}x "
            f"{r['ours_mfu']:9.1%} {r['peer_mfu']:7.1%}"
        )
    print(json.dumps({"peak_gflops": round(peak / 1e9, 1), "shapes": results}))


if __name__ == "__main__":
    app.run(main)
