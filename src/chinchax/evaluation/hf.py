"""Hugging Face checkpoints ↔ chinchax parameters, in two layouts: GPT-2 (GPT2LMHeadModel, or GPT2Model as
cerebras/Cerebras-GPT-* are published) and Llama (LlamaForCausalLM). numpy; torch only to read .bin files.

GPT-2 stores Conv1D weights as (in, out), the same orientation as our Dense kernels; its fused c_attn output
is laid out [q | k | v], each heads × d_head, which is our (3, heads, d_head) QKV kernel flattened. The head is
tied to `wte` in both, so HF's `lm_head.weight` is not stored separately.

Llama stores torch Linear weights as (out, in): each is transposed into our (in, out) kernel. q_proj is our
`q` (embed, heads, head_dim) under grouped-query attention, else the first of the fused `qkv`'s three; k_proj
and v_proj are `kv`'s two (or `qkv`'s other two); o_proj is attn_out; gate_proj, up_proj, down_proj are
`gate`, `fc1`, `fc2`; the RMSNorm weights are our norm scales; an untied lm_head.weight is our `head` (vocab,
d_model) as it is. Both rotate q and k in halves (rotate-half), so no rows are permuted. HF's attention_bias and
mlp_bias together are our model.bias.

The layout is config.json's model_type on import, and the run's block on export: the GPT-3 switches export as
GPT-2; RMSNorm, rotary positions and a SwiGLU MLP as Llama (any bias, tie or kv_heads). A block neither class
holds, and μP, are refused with the switch named. The checkpoint's tensor names are checked against what the
layout needs before any safetensors weight is read (a .bin file must be read to list its names).

A Hugging Face folder holds config.json and the weights as model.safetensors or pytorch_model.bin, either one
file or shards listed in a `*.index.json`; any float dtype (bf16 included) is read into fp32. Exports write
config.json + fp32 model.safetensors through safetensors' numpy API, and the GPT-2 BPE tokenizer files when the
run used it, so `GPT2LMHeadModel` / `LlamaForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained`
load the folder.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
from collections.abc import Iterable, Mapping

import ml_collections
import ml_dtypes  # noqa: F401  (gives numpy the bfloat16 dtype that bf16 safetensors checkpoints need)
import numpy as np
import safetensors
import safetensors.numpy

from chinchax import atomic
from chinchax import config as config_lib
from chinchax.config import d_ffn, d_head, kv_heads
from chinchax.data.tokenizers import EOS_TEXT, get_tokenizer, gpt2_files

CONFIG = "config.json"
SAFETENSORS = "model.safetensors"
TORCH_BIN = "pytorch_model.bin"
GPT2, LLAMA = "gpt2", "llama"  # model_type of each layout
ARCHITECTURES = {GPT2: "GPT2LMHeadModel", LLAMA: "LlamaForCausalLM"}


class HFConversionError(ValueError):
    """A Hugging Face folder or a chinchax run that cannot be converted; the message says what and where."""


def _model_type(hf: Mapping) -> str:
    model_type = hf.get("model_type", GPT2)
    if model_type not in ARCHITECTURES:
        raise HFConversionError(f"HF config model_type={model_type!r}: only {list(ARCHITECTURES)} convert")
    return model_type


def _field(hf: Mapping, key: str):
    """A config.json field the conversion cannot default."""
    if hf.get(key) is None:
        raise HFConversionError(f"HF config has no {key!r}, which model_type={_model_type(hf)!r} needs")
    return hf[key]


def model_config_from_hf(hf: Mapping) -> ml_collections.ConfigDict:
    """Our model config for a transformers GPT2Config or LlamaConfig dict (SP, as both are published)."""
    return _llama_model_config(hf) if _model_type(hf) == LLAMA else _gpt2_model_config(hf)


def _gpt2_model_config(hf: Mapping) -> ml_collections.ConfigDict:
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
        vocab_size=_field(hf, "vocab_size"),
        max_positions=_field(hf, "n_positions"),
        d_model=_field(hf, "n_embd"),
        n_layers=_field(hf, "n_layer"),
        n_heads=_field(hf, "n_head"),
        d_ffn=hf.get("n_inner") or 0,
        layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        init_std=hf.get("initializer_range", 0.02),
    )
    return model


def _rope_theta(hf: Mapping) -> float:
    """θ of plain rotary positions: transformers 5's rope_parameters, or the older top-level rope_theta."""
    if hf.get("rope_scaling") is not None:
        raise HFConversionError(
            f"HF config rope_scaling={hf['rope_scaling']!r}: chinchax rotary positions are unscaled "
            "(rope_scaling must be null)"
        )
    parameters = hf.get("rope_parameters") or {}
    if parameters.get("rope_type", "default") != "default":
        raise HFConversionError(
            f"HF config rope_parameters.rope_type={parameters['rope_type']!r}: chinchax rotary positions are "
            "unscaled ('default')"
        )
    extra = sorted(set(parameters) - {"rope_type", "rope_theta"})
    if extra:
        raise HFConversionError(
            f"HF config rope_parameters.{extra[0]}: chinchax rotary positions have θ only"
        )
    return float(parameters.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _llama_model_config(hf: Mapping) -> ml_collections.ConfigDict:
    if hf.get("hidden_act", "silu") != "silu":
        raise HFConversionError(
            f"HF config hidden_act={hf['hidden_act']!r}: chinchax's SwiGLU gates with 'silu'"
        )
    attention_bias, mlp_bias = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
    if attention_bias != mlp_bias:
        raise HFConversionError(
            f"HF config attention_bias={attention_bias} but mlp_bias={mlp_bias}: chinchax's model.bias "
            "switches both"
        )
    width, heads = _field(hf, "hidden_size"), _field(hf, "num_attention_heads")
    head_dim = hf.get("head_dim") or width // heads
    if head_dim * heads != width:
        raise HFConversionError(
            f"HF config head_dim={head_dim}: chinchax heads are hidden_size/num_attention_heads = "
            f"{width}/{heads} wide"
        )
    model = config_lib.base_config().model
    model.update(
        vocab_size=_field(hf, "vocab_size"),
        max_positions=_field(hf, "max_position_embeddings"),
        d_model=width,
        n_layers=_field(hf, "num_hidden_layers"),
        n_heads=heads,
        kv_heads=hf.get("num_key_value_heads") or 0,
        d_ffn=_field(hf, "intermediate_size"),
        norm="rmsnorm",
        position="rope",
        rope_theta=_rope_theta(hf),
        mlp="swiglu",
        bias=attention_bias,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        layer_norm_eps=hf.get("rms_norm_eps", 1e-6),
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


# The switches each HF class fixes: (field, the class's value, what the class has).
_BLOCKS = {
    LLAMA: (
        ("norm", "rmsnorm", "RMSNorm only"),
        ("position", "rope", "rotary positions only"),
        ("mlp", "swiglu", "a SwiGLU MLP only"),
    ),
    GPT2: (
        ("norm", "layernorm", "LayerNorm only"),
        ("position", "learned", "learned positions only"),
        ("mlp", "gelu", "a GELU MLP only"),
        ("bias", True, "biases on every layer"),
        ("tie_embeddings", True, "its head tied to the token embedding"),
    ),
}


def layout(model: ml_collections.ConfigDict) -> str:
    """GPT2 or LLAMA: the HF class that holds the model's block; a block neither holds is refused, naming for
    each class the first switch it lacks."""
    lacks = {}
    for layout_name, switches in _BLOCKS.items():
        lacks[layout_name] = [
            f"model.{key}={model[key]!r}: {ARCHITECTURES[layout_name]} has {meaning}"
            for key, value, meaning in switches
            if model[key] != value
        ]
    if kv_heads(model) != model.n_heads:
        lacks[GPT2].append(
            f"model.kv_heads={model.kv_heads}: GPT2LMHeadModel has one key/value head per head"
        )
    for layout_name, reasons in lacks.items():
        if not reasons:
            return layout_name
    closest = sorted(lacks.values(), key=len)
    raise HFConversionError("; ".join(reasons[0] for reasons in closest))


_GPT2_LAYER = (
    "ln_1.weight",
    "ln_1.bias",
    "attn.c_attn.weight",
    "attn.c_attn.bias",
    "attn.c_proj.weight",
    "attn.c_proj.bias",
    "ln_2.weight",
    "ln_2.bias",
    "mlp.c_fc.weight",
    "mlp.c_fc.bias",
    "mlp.c_proj.weight",
    "mlp.c_proj.bias",
)
_LLAMA_LINEAR = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


def tensor_names(model: ml_collections.ConfigDict) -> list[str]:
    """The HF tensor names a conversion of `model` reads or writes (GPT-2's without 'transformer.')."""
    if layout(model) == GPT2:
        per_layer, top = _GPT2_LAYER, ["wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"]
        prefix = "h"
    else:
        suffixes = ("weight", "bias") if model.bias else ("weight",)
        per_layer = [f"{linear}.{s}" for linear in _LLAMA_LINEAR for s in suffixes]
        per_layer += ["input_layernorm.weight", "post_attention_layernorm.weight"]
        top = ["model.embed_tokens.weight", "model.norm.weight"]
        top += [] if model.tie_embeddings else ["lm_head.weight"]
        prefix = "model.layers"
    return top + [f"{prefix}.{i}.{name}" for i in range(model.n_layers) for name in per_layer]


def _check_names(names: Iterable[str], model: ml_collections.ConfigDict) -> None:
    """Refuses a checkpoint without a tensor the layout needs (e.g. GPT-2 weights under a Llama config)."""
    names = {n.removeprefix("transformer.") for n in names}
    missing = next((n for n in tensor_names(model) if n not in names), None)
    if missing is not None:
        raise HFConversionError(
            f"HF checkpoint has no tensor {missing!r}, which config.json's model_type={layout(model)!r} needs "
            "(are these another architecture's weights?)"
        )


def params_from_hf(state: Mapping[str, np.ndarray], model: ml_collections.ConfigDict) -> dict:
    """Our parameter tree from a GPT2LMHeadModel (names with or without 'transformer.') or LlamaForCausalLM
    state dict, by `model`'s layout; only the tensors used are converted to fp32 (not, e.g., old checkpoints'
    attention-mask buffers)."""
    state = {k.removeprefix("transformer."): v for k, v in state.items()}
    _check_names(state, model)
    if layout(model) == LLAMA:
        return _llama_params_from_hf(state, model)
    return _gpt2_params_from_hf(state, model)


def _fp32(x) -> np.ndarray:
    return np.asarray(x, np.float32)


def _tied_head_check(state: Mapping, embedding: str) -> None:
    if "lm_head.weight" in state and not np.array_equal(
        _fp32(state["lm_head.weight"]), _fp32(state[embedding])
    ):
        raise HFConversionError(f"HF lm_head.weight differs from {embedding}, but the config ties the head")


def _gpt2_params_from_hf(state: Mapping[str, np.ndarray], model: ml_collections.ConfigDict) -> dict:
    d, heads = model.d_model, model.n_heads
    _tied_head_check(state, "wte.weight")

    def stacked(name: str) -> np.ndarray:
        return np.stack([_fp32(state[f"h.{i}.{name}"]) for i in range(model.n_layers)])

    layers = model.n_layers
    return {
        "token_embed": {"embedding": _fp32(state["wte.weight"])},
        "position_embed": _fp32(state["wpe.weight"]),
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
        "ln_f": {"scale": _fp32(state["ln_f.weight"]), "bias": _fp32(state["ln_f.bias"])},
    }


# Where the (3 | 2, ...) axis of the fused qkv / kv sits in a stacked-layers kernel and bias.
_STACKED = {"kernel": 2, "bias": 1}


def _llama_params_from_hf(state: Mapping[str, np.ndarray], model: ml_collections.ConfigDict) -> dict:
    layers, heads, kv, width = model.n_layers, model.n_heads, kv_heads(model), d_head(model)
    if model.tie_embeddings:
        _tied_head_check(state, "model.embed_tokens.weight")

    def stacked(name: str) -> np.ndarray:
        return np.stack([_fp32(state[f"model.layers.{i}.{name}"]) for i in range(layers)])

    def dense(linear: str, *out_shape: int) -> dict:
        """A Linear's (layers, out, in) weight as our (layers, in, *out_shape) kernel, and its bias."""
        weight = stacked(f"{linear}.weight")
        params = {"kernel": weight.transpose(0, 2, 1).reshape(layers, weight.shape[2], *out_shape)}
        if model.bias:
            params["bias"] = stacked(f"{linear}.bias").reshape(layers, *out_shape)
        return params

    q = dense("self_attn.q_proj", heads, width)
    k, v = dense("self_attn.k_proj", kv, width), dense("self_attn.v_proj", kv, width)
    if kv == heads:  # the stacked axis follows the input axis in kernels, leads in biases
        attention = {"qkv": {n: np.stack([q[n], k[n], v[n]], axis=_STACKED[n]) for n in q}}
    else:
        attention = {"q": q, "kv": {n: np.stack([k[n], v[n]], axis=_STACKED[n]) for n in k}}
    o_proj = stacked("self_attn.o_proj.weight")  # (layers, d_model, heads · width)
    attn_out = {"kernel": o_proj.transpose(0, 2, 1).reshape(layers, heads, width, model.d_model)}
    if model.bias:
        attn_out["bias"] = stacked("self_attn.o_proj.bias")
    params = {
        "token_embed": {"embedding": _fp32(state["model.embed_tokens.weight"])},
        "blocks": {
            "ln_1": {"scale": stacked("input_layernorm.weight")},
            **attention,
            "attn_out": attn_out,
            "ln_2": {"scale": stacked("post_attention_layernorm.weight")},
            "gate": dense("mlp.gate_proj", d_ffn(model)),
            "fc1": dense("mlp.up_proj", d_ffn(model)),
            "fc2": dense("mlp.down_proj", model.d_model),
        },
        "ln_f": {"scale": _fp32(state["model.norm.weight"])},
    }
    if not model.tie_embeddings:
        params["head"] = _fp32(state["lm_head.weight"])
    return params


def _refuse_mup(model: ml_collections.ConfigDict) -> None:
    if model.parametrization != "sp":
        raise HFConversionError(
            f"model.parametrization={model.parametrization!r}: HF GPT-2 and Llama have no μP multipliers "
            "(embedding output, attention 1/d_head, logits alpha/m), so only SP checkpoints export"
        )


def params_to_hf(params: Mapping, model: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
    """A GPT2LMHeadModel ('transformer.*' names, no separate lm_head) or LlamaForCausalLM state dict (fp32)
    from our params, by the model's layout."""
    _refuse_mup(model)
    p = {k: _fp32(v) for k, v in config_lib.flatten(params, sep="/").items()}
    if layout(model) == LLAMA:
        state = _llama_params_to_hf(p, model)
    else:
        state = {f"transformer.{k}": v for k, v in _gpt2_params_to_hf(p, model).items()}
    return {k: np.ascontiguousarray(v) for k, v in state.items()}


def _per_layer(state: dict, prefix: str, stacked: Mapping[str, np.ndarray]) -> None:
    for name, values in stacked.items():
        for i, value in enumerate(values):
            state[f"{prefix}.{i}.{name}"] = value


def _gpt2_params_to_hf(p: Mapping[str, np.ndarray], model: ml_collections.ConfigDict) -> dict:
    layers, d = model.n_layers, model.d_model
    state = {
        "wte.weight": p["token_embed/embedding"],
        "wpe.weight": p["position_embed"],
        "ln_f.weight": p["ln_f/scale"],
        "ln_f.bias": p["ln_f/bias"],
    }
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
    _per_layer(state, "h", per_layer)
    return state


def _llama_params_to_hf(p: Mapping[str, np.ndarray], model: ml_collections.ConfigDict) -> dict:
    layers = model.n_layers

    def dense(name: str) -> dict[str, np.ndarray]:
        return {t: p[f"blocks/{name}/{t}"] for t in ("kernel", "bias") if f"blocks/{name}/{t}" in p}

    def split(fused: dict[str, np.ndarray], count: int) -> list[dict[str, np.ndarray]]:
        return [{t: x.take(i, axis=_STACKED[t]) for t, x in fused.items()} for i in range(count)]

    if kv_heads(model) == model.n_heads:
        q, k, v = split(dense("qkv"), 3)
    else:
        q, (k, v) = dense("q"), split(dense("kv"), 2)
    # HF Linear: (our dense, its input axes after the layers axis)
    linears = {
        "self_attn.q_proj": (q, 1),
        "self_attn.k_proj": (k, 1),
        "self_attn.v_proj": (v, 1),
        "self_attn.o_proj": (dense("attn_out"), 2),
        "mlp.gate_proj": (dense("gate"), 1),
        "mlp.up_proj": (dense("fc1"), 1),
        "mlp.down_proj": (dense("fc2"), 1),
    }
    per_layer = {
        "input_layernorm.weight": p["blocks/ln_1/scale"],
        "post_attention_layernorm.weight": p["blocks/ln_2/scale"],
    }
    for name, (params, inputs) in linears.items():
        kernel = params["kernel"]  # (layers, *in, *out) → (layers, out, in)
        flat = kernel.reshape(layers, int(np.prod(kernel.shape[1 : 1 + inputs])), -1)
        per_layer[f"{name}.weight"] = flat.transpose(0, 2, 1)
        if "bias" in params:
            per_layer[f"{name}.bias"] = params["bias"].reshape(layers, -1)
    state = {"model.embed_tokens.weight": p["token_embed/embedding"], "model.norm.weight": p["ln_f/scale"]}
    if not model.tie_embeddings:
        state["lm_head.weight"] = p["head"]
    _per_layer(state, "model.layers", per_layer)
    return state


def config_to_hf(cfg: ml_collections.ConfigDict) -> dict:
    """The transformers config dict of a run config (SP only): GPT2Config (exact GELU, tied head) or
    LlamaConfig (unscaled rotary θ, silu gate), by the block's layout; no dropout."""
    model = cfg.model
    _refuse_mup(model)
    eos = get_tokenizer(cfg.data.tokenizer).eos_id
    common = {
        "vocab_size": model.vocab_size,
        "initializer_range": model.init_std,
        "tie_word_embeddings": model.tie_embeddings,
        "bos_token_id": eos,
        "eos_token_id": eos,
        "torch_dtype": "float32",
    }
    if layout(model) == LLAMA:
        return {
            "architectures": [ARCHITECTURES[LLAMA]],
            "model_type": LLAMA,
            "hidden_size": model.d_model,
            "intermediate_size": d_ffn(model),
            "num_hidden_layers": model.n_layers,
            "num_attention_heads": model.n_heads,
            "num_key_value_heads": kv_heads(model),
            "head_dim": d_head(model),
            "hidden_act": "silu",
            "max_position_embeddings": model.max_positions,
            "rms_norm_eps": model.layer_norm_eps,
            "rope_theta": model.rope_theta,
            "rope_scaling": None,
            "attention_bias": model.bias,
            "mlp_bias": model.bias,
            "attention_dropout": 0.0,
            "pretraining_tp": 1,
            **common,
        }
    return {
        "architectures": [ARCHITECTURES[GPT2]],
        "model_type": GPT2,
        "n_positions": model.max_positions,
        "n_embd": model.d_model,
        "n_layer": model.n_layers,
        "n_head": model.n_heads,
        "n_inner": d_ffn(model),
        "activation_function": "gelu",
        "layer_norm_epsilon": model.layer_norm_eps,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        **common,
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


def _stored_names(files: list[pathlib.Path]) -> list[str] | None:
    """The tensor names of safetensors files (headers only); None for .bin files, read whole to know."""
    if any(path.suffix != ".safetensors" for path in files):
        return None
    names = []
    for path in files:
        with safetensors.safe_open(path, framework="numpy") as handle:
            names.extend(handle.keys())
    return names


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
    """(run config, our params) of a Hugging Face GPT-2 or Llama checkpoint folder."""
    folder = pathlib.Path(folder).expanduser()
    if not (folder / CONFIG).is_file():
        raise HFConversionError(f"{folder / CONFIG} does not exist: not a Hugging Face checkpoint folder")
    cfg = config_from_hf(json.loads((folder / CONFIG).read_text()), folder.name)
    files = _weight_files(folder)  # fail on a folder without weights before reading any
    names = _stored_names(files)
    if names is not None:  # fail on another architecture's weights before reading any
        _check_names(names, cfg.model)
    state: dict[str, np.ndarray] = {}
    for path in files:
        state.update(_read_weight_file(path))
    return cfg, params_from_hf(state, cfg.model)


def save_hf_folder(
    folder: str | os.PathLike, cfg: ml_collections.ConfigDict, params: Mapping
) -> pathlib.Path:
    """Writes config.json, model.safetensors (and the GPT-2 tokenizer files for gpt2 runs) into `folder`."""
    folder = pathlib.Path(folder).expanduser()
    hf_config = config_to_hf(cfg)  # refuses μP and blocks neither class holds before anything is written
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
