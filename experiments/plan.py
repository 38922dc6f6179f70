"""The dry-run plan of many scale points in one table: `python -m experiments.plan [--points=a,b,...]`.

With no --points it plans the whole published family (SP, μP, the 40M proxy) and the CPU points.
"""

import json

from absl import app, flags

from chinchax import config, dry_run
from experiments import configs

_POINTS = flags.DEFINE_list("points", None, "Scale-point names (default: all).")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object per point instead of the table.")

COLUMNS = ("name", "params", "non_embedding_params", "tokens", "steps", "train_flops", "flops_per_token")


def main(argv):
    del argv
    rows = [dry_run.report(config.validate(configs.get(n))) for n in (_POINTS.value or configs.names())]
    if _JSON.value:
        for row in rows:
            print(json.dumps(row))
        return
    print(
        f"{'scale point':18s} {'params':>15s} {'non-embedding':>15s} {'tokens':>17s} {'steps':>8s} "
        f"{'FLOPs':>10s} {'FLOPs/token':>15s}"
    )
    for r in rows:
        print(
            f"{r['name']:18s} {r['params']:>15,} {r['non_embedding_params']:>15,} {r['tokens']:>17,} "
            f"{r['steps']:>8,} {r['train_flops']:>10.3e} {r['flops_per_token']:>15,}"
        )


if __name__ == "__main__":
    app.run(main)
