"""Hugging Face GPT-2-architecture checkpoints ↔ chinchax parameters (numpy; torch only to read .bin files).

HF's GPT-2 stores Conv1D weights as (in, out), the same orientation as our Dense kernels; its fused c_attn
output is laid out [q | k | v], each heads × d_head, which is our (3, heads, d_head) QKV kernel flattened.
The head is tied to `wte` in both, so HF's `lm_head.weight` is not stored separately.

A Hugging Face folder holds config.json and the weights as model.safetensors or pytorch_model.bin, either one
file or shards listed in a `*.index.json` (as cerebras/Cerebras-GPT-* are published). Exports write
config.json + model.safetensors through safetensors' numpy API, and the GPT-2 BPE tokenizer files when the run
used it, so `GPT2LMHeadModel.from_pretrained` and `AutoTokenizer.from_pretrained` load the folder.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
from collections.abc import Mapping

import ml_collections
import numpy as np
import safetensors.numpy

from chinchax import atomic
from chinchax import config as config_lib
from chinchax.data.tokenizers import EOS_TEXT, get_tokenizer, gpt2_files

CONFIG = "config.json"
SAFETENSORS = "model.safetensors"
TORCH_BIN = "pytorch_model.bin"


class HFConversionError(ValueError):
    """A Hugging Face folder or a chinchax run that cannot be converted; the message says what and where."""


def model_config_from_hf(hf: Mapping) -> ml_collections.ConfigDict:
    """Our model config for a transformers GPT2Config dict (SP, as Cerebras-GPT checkpoints are published)."""
    if hf.get("model_type", "gpt2") != "gpt2":
        raise HFConversionError(f"HF config model_type={hf.get('model_type')!r}: only 'gpt2' converts")
    if hf.get("activation_function", "gelu_new") != "gelu":
        raise HFConversionError(
            f"HF config activation_function={hf.get('activation_function')!r}: chinchax models use "
            "exact 'gelu'"
        )
    unsupported = {
        "scale_attn_weights": (False, "attention without the 1/sqrt(d_head) scale"),
        "scale_attn_by_inverse_layer_idx": (True, "attention scaled by 1/layer"),
        "tie_word_embeddings": (False, "a head untied from the token embedding"),
        "add_cross_attention": (True, "cross-attention"),
    }
    for key, (value, meaning) in unsupported.items():
        if hf.get(key, not value) == value:
            raise HFConversionError(f"HF config {key}={value}: chinchax has no {meaning}")
    model = config_lib.base_config().model
    model.update(
        vocab_size=hf["vocab_size"],
        max_positions=hf["n_positions"],
        d_model=hf["n_embd"],
        n_layers=hf["n_layer"],
        n_heads=hf["n_head"],
        d_ffn=hf.get("n_inner") or 0,
        layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        init_std=hf.get("initializer_range", 0.02),
    )
    return model


def config_from_hf(hf: Mapping, name: str) -> ml_collections.ConfigDict:
    """A whole validated run config around `model_config_from_hf`: GPT-2 BPE when the vocabulary holds it."""
    cfg = config_lib.base_config()
    cfg.name = name
    cfg.model.update(model_config_from_hf(hf).to_dict())
    vocab = cfg.model.vocab_size
    tokenizer = next((t for t, ids in config_lib.TOKENIZERS.items() if vocab >= ids), None)
    if tokenizer is None:
        raise HFConversionError(f"HF config vocab_size={vocab} is smaller than every chinchax tokenizer")
    cfg.data.tokenizer = tokenizer
    cfg.data.seq_len = min(cfg.data.seq_len, cfg.model.max_positions)
    return config_lib.validate(cfg)


def params_from_hf(state: Mapping[str, np.ndarray], model: ml_collections.ConfigDict) -> dict:
    """Our parameter tree from a GPT2LMHeadModel state dict (names with or without 'transformer.'); only the
    tensors used are converted to fp32 (not, e.g., old checkpoints' attention-mask buffers)."""
    state = {k.removeprefix("transformer."): v for k, v in state.items()}
    d, heads = model.d_model, model.n_heads
    if "lm_head.weight" in state and not np.array_equal(state["lm_head.weight"], state["wte.weight"]):
        raise HFConversionError("HF lm_head.weight differs from wte.weight: chinchax ties the head")

    def get(name: str) -> np.ndarray:
        if name not in state:
            raise HFConversionError(f"HF state dict has no {name!r} (is this a GPT-2 checkpoint?)")
        return np.asarray(state[name], np.float32)

    def stacked(name: str) -> np.ndarray:
        return np.stack([get(f"h.{i}.{name}") for i in range(model.n_layers)])

    layers = model.n_layers
    return {
        "token_embed": {"embedding": get("wte.weight")},
        "position_embed": get("wpe.weight"),
        "blocks": {
            "ln_1": {"scale": stacked("ln_1.weight"), "bias": stacked("ln_1.bias")},
            "qkv": {
                "kernel": stacked("attn.c_attn.weight").reshape(layers, d, 3, heads, d // heads),
                "bias": stacked("attn.c_attn.bias").reshape(layers, 3, heads, d // heads),
            },
            "attn_out": {
                "kernel": stacked("attn.c_proj.weight").reshape(layers, heads, d // heads, d),
                "bias": stacked("attn.c_proj.bias"),
            },
            "ln_2": {"scale": stacked("ln_2.weight"), "bias": stacked("ln_2.bias")},
            "fc1": {"kernel": stacked("mlp.c_fc.weight"), "bias": stacked("mlp.c_fc.bias")},
            "fc2": {"kernel": stacked("mlp.c_proj.weight"), "bias": stacked("mlp.c_proj.bias")},
        },
        "ln_f": {"scale": get("ln_f.weight"), "bias": get("ln_f.bias")},
    }


def _refuse_mup(model: ml_collections.ConfigDict) -> None:
    if model.parametrization != "sp":
        raise HFConversionError(
            f"model.parametrization={model.parametrization!r}: HF GPT-2 has no μP multipliers (embedding "
            "output, attention 1/d_head, logits alpha/m), so only SP checkpoints export"
        )


def params_to_hf(params: Mapping, model: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
    """A GPT2LMHeadModel state dict ('transformer.*' names, fp32, no separate lm_head) from our params."""
    _refuse_mup(model)
    p = {k: np.asarray(v, np.float32) for k, v in config_lib.flatten(params, sep="/").items()}
    layers, d = model.n_layers, model.d_model
    per_layer = {
        "ln_1.weight": p["blocks/ln_1/scale"],
        "ln_1.bias": p["blocks/ln_1/bias"],
        "attn.c_attn.weight": p["blocks/qkv/kernel"].reshape(layers, d, 3 * d),
        "attn.c_attn.bias": p["blocks/qkv/bias"].reshape(layers, 3 * d),
        "attn.c_proj.weight": p["blocks/attn_out/kernel"].reshape(layers, d, d),
        "attn.c_proj.bias": p["blocks/attn_out/bias"],
        "ln_2.weight": p["blocks/ln_2/scale"],
        "ln_2.bias": p["blocks/ln_2/bias"],
        "mlp.c_fc.weight": p["blocks/fc1/kernel"],
        "mlp.c_fc.bias": p["blocks/fc1/bias"],
        "mlp.c_proj.weight": p["blocks/fc2/kernel"],
        "mlp.c_proj.bias": p["blocks/fc2/bias"],
    }
    state = {
        "wte.weight": p["token_embed/embedding"],
        "wpe.weight": p["position_embed"],
        "ln_f.weight": p["ln_f/scale"],
        "ln_f.bias": p["ln_f/bias"],
    }
    for name, stacked in per_layer.items():
        for i in range(layers):
            state[f"h.{i}.{name}"] = stacked[i]
    return {f"transformer.{k}": np.ascontiguousarray(v) for k, v in state.items()}


def config_to_hf(cfg: ml_collections.ConfigDict) -> dict:
    """The transformers GPT2Config dict of a run config (SP only): exact GELU, tied head, no dropout."""
    model = cfg.model
    _refuse_mup(model)
    eos = get_tokenizer(cfg.data.tokenizer).eos_id
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": model.vocab_size,
        "n_positions": model.max_positions,
        "n_embd": model.d_model,
        "n_layer": model.n_layers,
        "n_head": model.n_heads,
        "n_inner": config_lib.d_ffn(model),
        "activation_function": "gelu",
        "layer_norm_epsilon": model.layer_norm_eps,
        "initializer_range": model.init_std,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "bos_token_id": eos,
        "eos_token_id": eos,
        "torch_dtype": "float32",
    }


def _read_weight_file(path: pathlib.Path) -> dict[str, np.ndarray]:
    if path.suffix == ".safetensors":
        return safetensors.numpy.load_file(path)
    try:
        import torch
    except ImportError as error:
        raise HFConversionError(
            f"reading {path} needs torch (pip install torch), or convert it to safetensors first"
        ) from error
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v.float().numpy() for k, v in state.items() if hasattr(v, "numpy")}


def _weight_files(folder: pathlib.Path) -> list[pathlib.Path]:
    for name in (SAFETENSORS, TORCH_BIN):
        if (folder / name).is_file():
            return [folder / name]
        index = folder / f"{name}.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise HFConversionError(f"{index} lists shard {missing[0]} that is not in {folder}")
            return [folder / s for s in shards]
    raise HFConversionError(
        f"{folder} has no {SAFETENSORS}, {TORCH_BIN} or their .index.json: not a Hugging Face checkpoint"
    )


def load_hf_folder(folder: str | os.PathLike) -> tuple[ml_collections.ConfigDict, dict]:
    """(run config, our params) of a Hugging Face GPT-2-architecture checkpoint folder."""
    folder = pathlib.Path(folder).expanduser()
    if not (folder / CONFIG).is_file():
        raise HFConversionError(f"{folder / CONFIG} does not exist: not a Hugging Face checkpoint folder")
    cfg = config_from_hf(json.loads((folder / CONFIG).read_text()), folder.name)
    files = _weight_files(folder)  # fail on a folder without weights before reading any
    state: dict[str, np.ndarray] = {}
    for path in files:
        state.update(_read_weight_file(path))
    return cfg, params_from_hf(state, cfg.model)


def save_hf_folder(
    folder: str | os.PathLike, cfg: ml_collections.ConfigDict, params: Mapping
) -> pathlib.Path:
    """Writes config.json, model.safetensors (and the GPT-2 tokenizer files for gpt2 runs) into `folder`."""
    folder = pathlib.Path(folder).expanduser()
    hf_config = config_to_hf(cfg)  # refuses μP before anything is written
    state = params_to_hf(params, cfg.model)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic.replacing(folder / SAFETENSORS) as temporary:
        safetensors.numpy.save_file(state, temporary, metadata={"format": "pt"})
    if cfg.data.tokenizer == "gpt2":
        files = gpt2_files()
        for source, target in (("encoder.json", "vocab.json"), ("vocab.bpe", "merges.txt")):
            with atomic.replacing(folder / target) as temporary:
                shutil.copyfile(files[source], temporary)
        tokenizer_config = {
            "tokenizer_class": "GPT2Tokenizer",
            "model_max_length": cfg.model.max_positions,
            "bos_token": EOS_TEXT,
            "eos_token": EOS_TEXT,
            "unk_token": EOS_TEXT,
            "add_prefix_space": False,
        }
        atomic.write_json(folder / "tokenizer_config.json", tokenizer_config)
    atomic.write_json(folder / CONFIG, hf_config)
    return folder
