"""The μP coordinate check: `python -m experiments.coord_check [--out=DIR] [--widths=128,256,512,1024]`.

Trains byte-level models of several widths for a few Adam steps under SP and μP, draws mean |activation|
against width per step (PNG) and prints, last on stdout, the max/min spread across widths per activation.
"""

import json
import pathlib

from absl import app, flags

from chinchax import atomic
from chinchax.scaling import coord_check

_OUT = flags.DEFINE_string("out", "runs/coord_check", "Folder for coord_check.png and coord_check.json.")
_WIDTHS = flags.DEFINE_list("widths", ["128", "256", "512", "1024"], "Model widths (multiples of 16).")
_STEPS = flags.DEFINE_integer("steps", 3, "Adam steps after init.")
_LR = flags.DEFINE_float("lr", 3e-3, "Adam learning rate (μP: η_base, scaled per role).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for init and the batch.")


def main(argv):
    del argv
    out = pathlib.Path(_OUT.value)
    out.mkdir(parents=True, exist_ok=True)
    widths = [int(w) for w in _WIDTHS.value]
    results = {
        name: coord_check.run(name, widths, steps=_STEPS.value, lr=_LR.value, seed=_SEED.value)
        for name in ("sp", "mup")
    }
    plot_path = out / "coord_check.png"
    coord_check.plot(results, str(plot_path))
    summary = {name: coord_check.spread(r) for name, r in results.items()}
    summary["plot"] = str(plot_path)
    atomic.write_json(out / "coord_check.json", {"summary": summary, "results": results}, indent=1)
    for name in ("sp", "mup"):
        print(
            f"{name:4s} spread across widths: " + ", ".join(f"{k} {v:.2f}×" for k, v in summary[name].items())
        )
    print(json.dumps(summary))


if __name__ == "__main__":
    app.run(main)
