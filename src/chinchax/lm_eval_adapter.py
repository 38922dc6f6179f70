"""The lm-eval command: lm-eval's own command line with the `chinchax` model registered and the Cerebras-GPT
task presets expanded (lm-eval 0.4.x has no entry-point discovery of models, so its own `lm_eval` cannot see it):

    python -m chinchax.lm_eval_adapter --model chinchax --model_args workdir=DIR[,step=N] --tasks cerebras_gpt_0shot

The model itself is chinchax.evaluation.lm_eval_model.
"""

from __future__ import annotations

import sys

from chinchax.evaluation.lm_eval_model import PRESETS


def expand_presets(argv: list[str]) -> list[str]:
    """lm-eval arguments with `--tasks PRESET` replaced by its tasks and `--num_fewshot N`."""
    expanded = []
    args = iter(argv)
    for arg in args:
        key, eq, value = arg.partition("=")
        if key == "--tasks" and not eq:
            value = next(args, "")
        if key == "--tasks" and value in PRESETS:
            tasks, shots = PRESETS[value]
            if any(a.partition("=")[0] == "--num_fewshot" for a in argv):
                raise ValueError(f"--tasks {value} sets --num_fewshot {shots}; do not give --num_fewshot too")
            expanded += ["--tasks", ",".join(tasks), "--num_fewshot", str(shots)]
        elif key == "--tasks" and not eq:
            expanded += [arg, value]
        else:
            expanded.append(arg)
    return expanded


def main() -> None:
    """lm-eval's command line with the `chinchax` model registered and the presets expanded."""
    from lm_eval.__main__ import cli_evaluate

    try:
        sys.argv = [sys.argv[0], *expand_presets(sys.argv[1:])]
    except ValueError as error:
        sys.exit(f"error: {error}")
    cli_evaluate()


if __name__ == "__main__":
    main()
