"""Named scale points. `--config=NAME` resolves to `<file>.py:NAME` (the config_flags convention)."""

from __future__ import annotations

from experiments.configs import cerebras_gpt, cpu, llama

DEFAULT = "cpu_default"
_FILES = (cerebras_gpt, cpu, llama)


def names() -> list[str]:
    """Every named scale point."""
    return [name for module in _FILES for name in module.POINTS]


def config_path(name: str) -> str:
    """`path/to/file.py:NAME` for a scale-point name; a path (ends in .py or holds .py:) is returned as is."""
    if ".py" in name:
        return name
    for module in _FILES:
        if name in module.POINTS:
            return f"{module.__file__}:{name}"
    raise ValueError(f"unknown scale point {name!r}; known: {', '.join(names())}")


def get(name: str):
    """The (unvalidated) config of a named scale point."""
    for module in _FILES:
        if name in module.POINTS:
            return module.get_config(name)
    raise ValueError(f"unknown scale point {name!r}; known: {', '.join(names())}")
