"""Approach-3 fit speed: our pruned batched L-BFGS vs a plain scipy L-BFGS-B loop over the same 4,500-start grid.

`python -m benchmarks.fit_speed [--scipy_starts=200 | --full] [--unpruned]` on the digitised Chinchilla Fig. 4
points (5 highest-loss dropped). The scipy loop runs `scipy.optimize.minimize(method="L-BFGS-B")` with an
analytic gradient once per start; by default on a random subset of starts, its time extrapolated linearly to
4,500 (said so in the table), with --full on all of them. Both runs happen in this process, one after the other,
so the ratio is taken under the same machine load. BLAS runs on one thread for both: on a shared 2-core machine
OpenBLAS's threads made each scipy L-BFGS-B evaluation 12× slower (4.5 ms instead of 0.38 ms). Prints a table,
then one JSON object.
"""

import os

for _variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import json  # noqa: E402
import pathlib  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import scipy.optimize  # noqa: E402
import scipy.special  # noqa: E402
from absl import app, flags  # noqa: E402
from tqdm import tqdm  # noqa: E402

from chinchax.scaling import batched_lbfgs, fit  # noqa: E402

POINTS = pathlib.Path(__file__).resolve().parents[1] / "tests" / "reference" / "chinchilla_fig4_points.csv"

_SCIPY_STARTS = flags.DEFINE_integer(
    "scipy_starts", 200, "Random grid starts for the scipy loop.", lower_bound=1
)
_FULL = flags.DEFINE_bool("full", False, "Run the scipy loop over all 4,500 starts.")
_UNPRUNED = flags.DEFINE_bool("unpruned", False, "Also time the batched L-BFGS without pruning.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed choosing the scipy subset.")


def scipy_value_and_grad(p, log_n, log_d, log_loss):
    """Σ Huber_δ(LSE(a − α log N, b − β log D, e) − log L) and its gradient, for one start."""
    a, b, e, alpha, beta = p
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
    predicted = scipy.special.logsumexp(terms, axis=0)
    softmax = np.exp(terms - predicted)
    residual = predicted - log_loss
    slope = np.clip(residual, -fit.HUBER_DELTA, fit.HUBER_DELTA)
    grad = softmax @ slope
    return scipy.special.huber(fit.HUBER_DELTA, residual).sum(), np.array(
        [grad[0], grad[1], grad[2], -(softmax[0] * slope) @ log_n, -(softmax[1] * slope) @ log_d]
    )


def main(argv):
    del argv
    data = np.genfromtxt(POINTS, delimiter=",", names=True)
    kept = fit.keep_mask(data["loss"], 5)
    params, tokens, loss = data["params"][kept], data["tokens"][kept], data["loss"][kept]
    starts = fit.grid(fit.BESIROGLU_GRID_AXES)
    rows = []

    started = time.perf_counter()
    ours = fit.fit_chinchilla(params, tokens, loss)
    rows.append(("batched L-BFGS, pruned " + str(fit.GRID_PRUNE), len(starts), time.perf_counter() - started))
    results = {"ours": ours.objective_value}

    if _UNPRUNED.value:
        objective = fit.lse_objective(np.log(np.stack([params, tokens], axis=1)), loss)
        started = time.perf_counter()
        unpruned = batched_lbfgs.minimize(objective, starts)
        rows.append(("batched L-BFGS, no pruning", len(starts), time.perf_counter() - started))
        results["unpruned"] = float(np.nanmin(unpruned.fun))

    subset = np.arange(len(starts))
    if not _FULL.value:
        subset = np.sort(
            np.random.default_rng(_SEED.value).choice(len(starts), _SCIPY_STARTS.value, replace=False)
        )
    args = (np.log(params), np.log(tokens), np.log(loss))
    best = np.inf
    started = time.perf_counter()
    for start in tqdm(starts[subset], desc="scipy L-BFGS-B loop", leave=False):
        found = scipy.optimize.minimize(scipy_value_and_grad, start, args=args, jac=True, method="L-BFGS-B")
        best = min(best, found.fun)
    rows.append(("scipy L-BFGS-B loop (analytic grad)", len(subset), time.perf_counter() - started))
    results["scipy"] = float(best)

    table = []
    for name, ran, seconds in rows:
        table.append(
            {
                "method": name,
                "starts_run": ran,
                "seconds": seconds,
                "seconds_4500": seconds * len(starts) / ran,
            }
        )
    scipy_seconds = table[-1]["seconds_4500"]
    print(
        f"Approach 3 on {POINTS.name} (240 points), 4,500-start grid; {os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.2f}, BLAS threads {os.environ['OPENBLAS_NUM_THREADS']}"
    )
    print(f"{'method':<48}{'starts run':>11}{'seconds':>10}{'s / 4500':>10}{'scipy÷this':>12}")
    for row in table:
        extrapolated = "" if row["starts_run"] == len(starts) else "*"
        print(
            f"{row['method']:<48}{row['starts_run']:>11}{row['seconds']:>10.2f}"
            f"{row['seconds_4500']:>9.1f}{extrapolated:1}{scipy_seconds / row['seconds_4500']:>12.1f}"
        )
    if not _FULL.value:
        print(
            f"* scipy timed on {len(subset)} random starts (seed {_SEED.value}), extrapolated linearly to 4,500"
        )
    law = ours.law
    print(f"ours: A={law.A:.1f} B={law.B:.1f} E={law.E:.4f} alpha={law.alpha:.4f} beta={law.beta:.4f}")
    print("best Huber objective: " + ", ".join(f"{k} {v:.12g}" for k, v in results.items()))
    print(
        json.dumps({"table": table, "ratio": scipy_seconds / table[0]["seconds_4500"], "objective": results})
    )


if __name__ == "__main__":
    app.run(main)
