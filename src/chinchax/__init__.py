"""chinchax: compute-optimal scaling studies in JAX (the Cerebras-GPT recipe and beyond)."""

__version__ = "0.1.0"
