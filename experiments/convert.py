"""Convert between Hugging Face checkpoints (GPT-2 and Llama architectures) and chinchax runs.

    python -m experiments.convert --from_hf=HF_DIR --workdir=DIR      # import (e.g. cerebras/Cerebras-GPT-*)
    python -m experiments.convert --workdir=DIR --to_hf=HF_DIR [--step=N]   # export an SP run

Import reads a GPT2LMHeadModel / GPT2Model or a LlamaForCausalLM folder (config.json's model_type says which;
safetensors or .bin, one file or shards) and writes DIR/config.json and a step-0 checkpoint that
`experiments.run`, `experiments.evaluate` and `experiments.sample` read. Export writes config.json,
model.safetensors (and the GPT-2 tokenizer files for gpt2 runs): a GPT-3 block as GPT2LMHeadModel, a block with
RMSNorm, rotary positions and a SwiGLU MLP as LlamaForCausalLM; μP runs and blocks neither class holds are
refused. Prints one JSON line last: direction, paths, config name, parameter count.
"""

import json
import pathlib

import jax
from absl import app, flags

from chinchax.evaluation import hf
from chinchax.training import checkpoint
from experiments import cli as cli_lib

_FROM_HF = flags.DEFINE_string("from_hf", None, "Hugging Face checkpoint folder to import.")
_TO_HF = flags.DEFINE_string("to_hf", None, "Folder to export the run's checkpoint into.")
_WORKDIR = flags.DEFINE_string("workdir", None, "The chinchax run directory.", required=True)
_STEP = flags.DEFINE_integer("step", None, "Export this step's checkpoint (default: the newest).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if (_FROM_HF.value is None) == (_TO_HF.value is None):
        raise app.UsageError("give exactly one of --from_hf=HF_DIR (import) or --to_hf=HF_DIR (export)")
    workdir = pathlib.Path(_WORKDIR.value)
    if _FROM_HF.value is not None:
        if (workdir / "checkpoints").exists():
            raise hf.HFConversionError(f"{workdir} already holds checkpoints; import into an empty run dir")
        cfg, params = hf.load_hf_folder(_FROM_HF.value)
        checkpoint.save_params(workdir, cfg, params)
        report = {"direction": "import", "from_hf": _FROM_HF.value, "workdir": str(workdir)}
    else:
        cfg, params = checkpoint.load_params(workdir, _STEP.value)
        hf.save_hf_folder(_TO_HF.value, cfg, params)
        report = {"direction": "export", "workdir": str(workdir), "to_hf": _TO_HF.value}
    report.update(name=cfg.name, params=int(sum(x.size for x in jax.tree.leaves(params))))
    print(json.dumps(report))


def cli():
    """Entry point: one-line errors (experiments.cli)."""
    cli_lib.run(main, (hf.HFConversionError, checkpoint.CheckpointError))


if __name__ == "__main__":
    cli()
