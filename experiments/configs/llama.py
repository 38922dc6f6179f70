"""The `llama` family preset: the Llama block (pre-norm RMSNorm, rotary positions, a SwiGLU MLP, grouped-query
attention, no biases, an untied head; Hugging Face's `LlamaForCausalLM` is its reference) on the Cerebras-GPT
shapes, trained the same way for 20 tokens per parameter of its own count.

`get_config("llama_1.3b")`; `llama_block(cfg.model)` switches any config's model to the block (each choice is
also its own `model.*` field, for ablations one at a time).
"""

from chinchax.config import LLAMA_BLOCK, kv_heads
from experiments.configs import cerebras_gpt

KV_GROUP = 4  # query heads per key/value head where n_heads allows it (Llama 3 8B: 32 heads, 8 kv heads)

POINTS = [f"llama_{size}" for size in cerebras_gpt.FAMILY]


def llama_block(model) -> None:
    """Switch a model config to the Llama block in place: LLAMA_BLOCK, and n_heads / KV_GROUP kv heads (every
    head its own when KV_GROUP does not divide n_heads)."""
    model.update(**LLAMA_BLOCK)
    model.kv_heads = model.n_heads // KV_GROUP if model.n_heads % KV_GROUP == 0 else 0


def get_config(name: str = "llama_1.3b"):
    """A Cerebras-GPT shape (SP recipe: batch, LR, warmup, decay) with the Llama block, tokens = 20 · its params."""
    size = name.partition("_")[2]
    if name not in POINTS:
        raise ValueError(f"unknown llama scale point {name!r}; known: {', '.join(POINTS)}")
    cfg = cerebras_gpt.get_config(f"chinchilla_{size}")
    cfg.name = name
    llama_block(cfg.model)
    if (
        kv_heads(cfg.model) % 2
    ):  # 111M's and 590M's 3 kv heads do not split over tensor parallelism: FSDP instead
        cfg.mesh.tensor = 1
    cfg.train.tokens = 0  # tokens_per_param (20) of this block's own parameter count
    return cfg
