"""Reading a run's weights restores the parameters alone: no optimizer, schedule or FLOPs plan is built."""

import jax
import numpy as np

from chinchax import config
from chinchax.model import gpt
from chinchax.training import checkpoint, optim
from experiments import configs


def test_load_params_builds_no_optimizer_and_returns_the_saved_weights(tmp_path, monkeypatch):
    seed = int(np.random.default_rng().integers(2**31))
    cfg = config.validate(configs.get("cpu_tiny"))
    saved = gpt.init_params(cfg.model, jax.random.key(seed))
    checkpoint.save_params(tmp_path, cfg, saved)

    def refuse(*args, **kwargs):
        raise AssertionError("loading weights built the optimizer")

    monkeypatch.setattr(optim, "make_optimizer", refuse)
    loaded_cfg, loaded = checkpoint.load_params(tmp_path)
    assert loaded_cfg.to_json() == cfg.to_json()
    assert jax.tree.structure(loaded) == jax.tree.structure(saved)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(saved), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f"seed {seed}")
    _, at_step = checkpoint.load_params(tmp_path, step=0)
    for a, b in zip(jax.tree.leaves(at_step), jax.tree.leaves(saved), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f"seed {seed}")
