"""One self-contained HTML page per sweep: its points, fitted laws with the published ones beside them, and every
figure, so a sweep's outcome can be read (or mailed) as a single file.

Reads what a sweep root holds (results.csv, fit.json, blocks.json, mutransfer.json, sparse.json, sweep.json, one
run's config.json for the tokenizer, the PNGs in the root and root/fit/, and those the JSON files name) and embeds
each PNG as a base64 data URI. Fields of fit.json or mutransfer.json this module does not know are shown as
key/value rows, so a new field appears on the page without a change here; a missing field is left out.
"""

from __future__ import annotations

import base64
import csv
import datetime
import html
import json
import pathlib
import struct

from chinchax import atomic
from chinchax.scaling import fit, fit_io
from chinchax.scaling.sweep import OVERHEAD_COLUMNS, SPARSITY_COLUMNS, SUMMARY_COLUMNS

PAGE_NAME = "report.html"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Hoffmann et al. 2022, Table 2: N_opt ∝ C^a and D_opt ∝ C^b from approaches 1 and 2.
HOFFMANN_2022_ALLOCATION = {"approach 1": (0.50, 0.50), "approach 2": (0.49, 0.51)}

# fit.json fields drawn by _law_section itself; any other field goes to its key/value table.
LAW_FIELDS = {
    "law",
    "ci",
    "ci_level",
    "r2",
    "rmse_log_loss",
    "points",
    "dropped",
    "bootstrap",
    "seed",
    "huber_objective",
    "objective",
    "counting",
    "identifiability",
    "allocation",
    "plots",
    "source",
    "other_counting",
    "bootstrap_samples",
}
OBJECTIVE_FIELDS = {"name", "delta", "space", "value"}
OBJECTIVE_NAMES = {"lsq": "least squares", "huber": "Huber"}
COUNTING_TITLES = {"params": "N counted as", "flops": "C counted as"}
COUNTING_MEANINGS = {
    "total": "total: all parameters, embeddings included",
    "non_embedding": "non_embedding: parameters less the embeddings (Kaplan et al.)",
    "detailed": "detailed: the model's FLOPs count, attention and logits included",
    "6nd": "6nd: 6·N·D",
}
# fit.json fields shown generically, each under its own heading.
TITLED_FIELDS = {
    "power_law": "Pure power law beside it (no irreducible loss E)",
    "optimum_per_budget": "Compute-optimal size per isoFLOP budget (approach 2)",
}
# results.csv columns that are a point's summary rather than its tags.
SUMMARY_FIELDS = {
    "point",
    "overhead_seconds",
    "flops",
    "loss",
    *SUMMARY_COLUMNS,
    *OVERHEAD_COLUMNS,
    *SPARSITY_COLUMNS,
}

STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; color: #1c1c1c; max-width: 1200px; margin: 24px auto;
       padding: 0 24px; }
h1 { margin-bottom: 4px; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 4px; margin-top: 36px; }
.meta { color: #555; margin: 2px 0; }
table { border-collapse: collapse; margin: 8px 0 16px; }
th, td { border: 1px solid #d4d4d4; padding: 3px 9px; text-align: right; vertical-align: top; }
th { background: #f1f1f1; } td.text, th.text { text-align: left; } td:not(.text) { white-space: nowrap; }
tr.ours td { background: #eef5ff; font-weight: 600; }
.warn { background: #fff4d6; border-left: 4px solid #e0a800; padding: 6px 12px; margin: 8px 0; }
.note { color: #444; font-size: 14px; }
code { font-size: 13px; }
.figures { display: grid; grid-template-columns: repeat(auto-fill, minmax(540px, 1fr)); gap: 16px; }
figure { margin: 0; } figure.wide { grid-column: 1 / -1; max-width: 1000px; }
figure img { width: 100%; height: auto; border: 1px solid #e4e4e4; }
figcaption { color: #555; font-size: 13px; }
"""


class ReportPageError(ValueError):
    """A sweep root the page cannot be built from; the message is one line."""


def write(root: str | pathlib.Path, out: str | pathlib.Path | None = None) -> pathlib.Path:
    """Build the page of the sweep in `root` and write it atomically to `out` (default root/report.html)."""
    root = pathlib.Path(root)
    text = page(root)
    path = pathlib.Path(out) if out else root / PAGE_NAME
    atomic.write_text(path, text)
    return path


def page(root: pathlib.Path) -> str:
    """The HTML of the sweep in `root`: header and timing, the fitted law (or one per block), μTransfer's best
    learning rates, sparse runs on the dense law, the published laws, the points, the figures no section showed;
    the time it is written at stands in its header."""
    if not root.is_dir():
        raise ReportPageError(f"{root}: no such sweep folder")
    root = root.resolve()
    rows = _results(root / "results.csv")
    manifest = _json(root / "sweep.json") or {}
    unit = _token_unit(root)
    figures = _Figures(root)
    fitted = _json(root / "fit.json")
    mutransfer = _json(root / "mutransfer.json")
    name = manifest.get("sweep", root.name)
    body = [_header(root, name, manifest), _timing(rows)]
    if fitted is not None:
        body.append(_law_section(fitted, figures, unit))
        if isinstance(fitted.get("other_counting"), dict):
            body.append(_law_section(fitted["other_counting"], figures, unit))
    blocks = _json(root / "blocks.json")
    if blocks is not None:
        body.append(_blocks(blocks, figures, unit))
    if mutransfer is not None:
        body.append(_mutransfer(mutransfer, figures))
    sparse = _json(root / "sparse.json")
    if sparse is not None:
        body.append(_sparse(sparse, figures))
    body += [_published(fitted, unit), _points(rows, unit), figures.rest()]
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(name)} — sweep report</title>'
        f"<style>{STYLE}</style></head><body>\n" + "\n".join(b for b in body if b) + "\n</body></html>\n"
    )


def _results(path: pathlib.Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise ReportPageError(f"{path}: no such file (run the sweep first: it gathers results.csv)")
    rows = [row for row in csv.DictReader(path.read_text().splitlines()) if any(row.values())]
    if not rows:
        raise ReportPageError(f"{path}: no data rows")
    return rows


def _json(path: pathlib.Path) -> dict | None:
    """The JSON object in `path`; None when there is no such file."""
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ReportPageError(f"{path}: not JSON ({error.msg})") from None
    if not isinstance(value, dict):
        raise ReportPageError(f"{path}: not a JSON object")
    return value


def _token_unit(root: pathlib.Path) -> str | None:
    """'byte' or '<tokenizer> token', from the first run's config.json; None when no run config is there."""
    for config in sorted(root.glob("runs/*/config.json")):
        tokenizer = (_json(config) or {}).get("data", {}).get("tokenizer")
        if tokenizer:
            return "byte" if tokenizer == "bytes" else f"{tokenizer} token"
    return None


def _e(value) -> str:
    return html.escape(str(value))


def _number(value, spec: str = ".5g") -> str:
    """A JSON or CSV value as text: numbers by `spec`, integers whole, anything else as it is."""
    if value is None or value == "":
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return format(number, spec)


def _table(header, rows, table_id: str | None = None, text_columns: int = 1, row_class=None) -> str:
    """An HTML table (no header row when `header` is None); the first `text_columns` columns are left-aligned;
    cells are already HTML."""

    def cells(tag, values):
        return "".join(
            f"<{tag}{' class=text' if i < text_columns else ''}>{v}</{tag}>" for i, v in enumerate(values)
        )

    ident = f' id="{table_id}"' if table_id else ""
    lines = [f"<table{ident}>" + (f"<tr>{cells('th', header)}</tr>" if header else "")]
    for i, row in enumerate(rows):
        css = f' class="{row_class(i)}"' if row_class and row_class(i) else ""
        lines.append(f"<tr{css}>{cells('td', row)}</tr>")
    return "\n".join(lines) + "</table>"


def _generic(value) -> str:
    """Any JSON value as HTML: scalars as text, lists of scalars joined, dicts as nested key/value tables, a
    list of dicts as one table with a column per key."""
    if isinstance(value, dict):
        return _table(("field", "value"), [(_e(k), _generic(v)) for k, v in value.items()], text_columns=2)
    if isinstance(value, list):
        if all(not isinstance(v, (dict, list)) for v in value):
            return ", ".join(_e(_number(v)) for v in value)
        if all(isinstance(v, dict) for v in value):
            keys = list(dict.fromkeys(k for v in value for k in v))
            return _table(
                [_e(k) for k in keys], [[_generic(v.get(k)) for k in keys] for v in value], text_columns=0
            )
        return "<br>".join(_generic(v) for v in value)
    return _e(_number(value))


def _header(root: pathlib.Path, name: str, manifest: dict) -> str:
    now = datetime.datetime.now(datetime.timezone.utc)
    gathered = datetime.datetime.fromtimestamp((root / "results.csv").stat().st_mtime, datetime.timezone.utc)
    lines = [f"<h1>Sweep {_e(name)}</h1>"]
    if manifest.get("description"):
        lines.append(f'<p class="meta">{_e(manifest["description"])}</p>')
    if manifest.get("analysis"):
        lines.append(f'<p class="meta">analysis: {_e(manifest["analysis"])}</p>')
    lines.append(
        f'<p class="meta">folder <code>{_e(root.resolve())}</code> · results gathered '
        f"{gathered:%Y-%m-%d %H:%M} UTC · page written {now:%Y-%m-%d %H:%M} UTC</p>"
    )
    return "\n".join(lines)


def _timing(rows: list[dict[str, str]]) -> str:
    """Total trainer wall time summed over the points (they may have run side by side), and its overhead."""
    walls = [float(row["wall_seconds"]) for row in rows if row.get("wall_seconds")]
    if not walls:
        return ""
    wall = sum(walls)
    text = f"{len(walls)} points, {wall:,.1f} s of trainer wall time summed over points ({wall / 60:.1f} min)"
    trains = [float(row["train_seconds"]) for row in rows if row.get("train_seconds")]
    if len(trains) == len(walls) and wall > 0:
        train = sum(trains)
        text += f"; {train:,.1f} s training, {wall - train:,.1f} s overhead ({(wall - train) / wall:.0%})"
    return f"<h2>Timing</h2><p>{_e(text)}.</p>"


def _points(rows: list[dict[str, str]], unit: str | None) -> str:
    """Every row of results.csv: name, tags, sizes, FLOPs, loss, tokens per parameter, wall seconds."""
    tags = [c for c in rows[0] if c not in SUMMARY_FIELDS]
    loss_unit = f" (nats / {unit})" if unit else ""
    header = ["point", *tags, "params", "non-emb. params", "tokens", "train FLOPs", f"loss{loss_unit}"]
    header += ["tokens / param", "wall s"]
    table = []
    for i, row in enumerate(rows):
        loss = row.get("loss") or row.get("final_eval_loss")
        flops = row.get("train_flops") or row.get("flops")
        try:
            ratio = float(row["tokens"]) / float(row["params"])
        except (KeyError, TypeError, ValueError, ZeroDivisionError):
            ratio = None
        cells = [row.get("point") or f"row {i + 1}", *(_number(row.get(t)) for t in tags)]
        cells += [
            _count(row.get("params")),
            _count(row.get("non_embedding_params")),
            _count(row.get("tokens")),
        ]
        cells += [_number(flops, ".3e"), _number(loss, ".4f"), _number(ratio, ".1f")]
        cells.append(_number(row.get("wall_seconds"), ".1f"))
        table.append([_e(c) for c in cells])
    return "<h2>Points</h2>\n" + _table(header, table, "points")


def _count(value) -> str:
    try:
        return f"{round(float(value)):,}"
    except (TypeError, ValueError):
        return _number(value)


def _law_section(summary: dict, figures: _Figures, unit: str | None) -> str:
    """A fitted law: formula, warnings, constants with CIs, objective and goodness, allocation, the pure power
    law beside it, figures, and every other field as key/value rows."""
    law = summary.get("law")
    names = fit_io.CONSTANT_NAMES.get(law) or tuple(summary.get("ci", {}))
    counting = summary.get("counting") if isinstance(summary.get("counting"), dict) else {}
    counted = ", ".join(f"{k} {v}" for k, v in counting.items() if v)
    lines = [f"<h2>Fitted law: {_e(law or 'unnamed')}{_e(f' ({counted})' if counted else '')}</h2>"]
    if law in fit_io.FORMULAS:
        lines.append(f"<p><b>{_e(fit_io.FORMULAS[law])}</b></p>")
    if "points" in summary:
        source = f" of <code>{_e(summary['source'])}</code>" if summary.get("source") else ""
        lines.append(
            f"<p>Fitted on {_e(summary['points'])} points{source} ({_e(summary.get('dropped', 0))} highest-loss "
            f"dropped); {_e(summary.get('bootstrap', '–'))} bootstrap resamples, seed {_e(summary.get('seed', '–'))}."
            "</p>"
        )
    warnings = summary.get("identifiability") or []
    lines += [f'<p class="warn">{_e(w)}</p>' for w in ([warnings] if isinstance(warnings, str) else warnings)]
    level = summary.get("ci_level")
    ci_title = f"{100 * level:.0f}% CI" if isinstance(level, (int, float)) else "CI"
    ci = summary.get("ci", {})
    constants = [
        [_e(n), _e(_number(summary.get(n))), *(_e(_number(v)) for v in (ci.get(n) or (None, None)))]
        for n in names
    ]
    if constants:
        header = ("constant", "value", f"{ci_title} low", f"{ci_title} high")
        lines.append(_table(header, constants, "constants"))
    lines.append(_quality(summary, unit))
    if isinstance(summary.get("allocation"), dict):
        lines.append(_allocation(summary["allocation"]))
    for key, heading in TITLED_FIELDS.items():
        if summary.get(key) is not None:
            lines += [f"<h3>{_e(heading)}</h3>", _generic(summary[key])]
    plots = summary.get("plots") or {}
    lines.append(figures.take(plots.values() if isinstance(plots, dict) else plots))
    other = {k: v for k, v in summary.items() if k not in {*LAW_FIELDS, *TITLED_FIELDS, *names}}
    if other:
        lines.append("<h3>Other fields of fit.json</h3>")
        lines.append(_table(("field", "value"), [(_e(k), _generic(v)) for k, v in other.items()], "other", 2))
    return "\n".join(lines)


def _quality(summary: dict, unit: str | None) -> str:
    """Objective, goodness of fit and counting conventions as key/value rows."""
    rows = []
    objective = summary.get("objective")
    if isinstance(objective, dict):
        text = OBJECTIVE_NAMES.get(objective.get("name"), str(objective.get("name", "?")))
        if objective.get("delta") is not None:
            text += f" (δ = {_number(objective['delta'], 'g')})"
        if objective.get("space"):
            text += f" on {objective['space'].replace('_', ' ')}"
        rows.append(("objective", _e(text)))
        if "value" in objective:
            rows.append(("objective at the fit", _e(_number(objective["value"]))))
        rows += [
            (_e(f"objective: {k}"), _generic(v)) for k, v in objective.items() if k not in OBJECTIVE_FIELDS
        ]
    elif objective is not None:
        rows.append(("objective", _generic(objective)))
    if "huber_objective" in summary:
        rows.append(("objective value at the fit (Huber)", _e(_number(summary["huber_objective"]))))
    if "r2" in summary:
        rows.append(("R² of log loss", _e(_number(summary["r2"], ".5f"))))
    if "rmse_log_loss" in summary:
        rows.append(("RMSE of log loss", _e(_number(summary["rmse_log_loss"], ".5f"))))
    counting = summary.get("counting")
    if isinstance(counting, dict):
        rows += [
            (_e(COUNTING_TITLES.get(k, f"counting: {k}")), _e(COUNTING_MEANINGS.get(v, v)))
            for k, v in counting.items()
        ]
    elif counting is not None:
        rows.append(("counting", _generic(counting)))
    rows.append(
        ("loss unit", _e(f"nats per {unit}" if unit else "nats per token of this sweep (tokenizer unknown)"))
    )
    return _table(None, rows, "quality", 2)


def _allocation(allocation: dict) -> str:
    """N_opt = k_N·C^a and D_opt = k_D·C^b per approach, with the exponents' CIs when bootstrapped."""
    rows = []
    for approach, fitted in allocation.items():
        if not isinstance(fitted, dict):
            rows.append([_e(_approach(approach)), "not applicable to these points", "", "", "", "", ""])
            continue
        ci = fitted.get("ci", {})
        interval = {n: (f"[{ci[n][0]:.3f}, {ci[n][1]:.3f}]" if n in ci else "–") for n in ("a", "b")}
        rows.append(
            [
                _e(_approach(approach)),
                _e(_number(fitted.get("k_N"), ".4g")),
                _e(_number(fitted.get("a"), ".4f")),
            ]
            + [_e(interval["a"]), _e(_number(fitted.get("k_D"), ".4g")), _e(_number(fitted.get("b"), ".4f"))]
            + [_e(interval["b"])]
        )
    header = ("approach", "k_N", "a (N_opt ∝ C^a)", "a CI", "k_D", "b (D_opt ∝ C^b)", "b CI")
    return "<h3>Compute-optimal allocation</h3>\n" + _table(header, rows, "allocation")


def _approach(key: str) -> str:
    """'approach3' as 'approach 3'."""
    return key.replace("approach", "approach ").strip()


def _blocks(summary: dict, figures: _Figures, unit: str | None) -> str:
    """One compute law per model block: each law's constants with their CIs and goodness in one table, each law's
    warnings, the figure of every law together, then each block's own figures."""
    laws = {k: v for k, v in (summary.get("blocks") or {}).items() if isinstance(v, dict)}
    names = fit_io.CONSTANT_NAMES["compute"]
    level = next((law["ci_level"] for law in laws.values() if "ci_level" in law), None)
    ci_title = f"{100 * level:.0f}% CI" if isinstance(level, (int, float)) else "CI"
    header = ["block", "points"]
    header += [f"{n}{suffix}" for n in names for suffix in ("", f" {ci_title} low", f" {ci_title} high")]
    header += ["R² of log loss", "RMSE of log loss", "power law k", "power law a"]
    rows = []
    for block, law in laws.items():
        ci = law.get("ci", {})
        power = law.get("power_law") if isinstance(law.get("power_law"), dict) else {}
        cells = [_e(block), _e(_number(law.get("points")))]
        for n in names:
            cells += [_e(_number(v)) for v in (law.get(n), *(ci.get(n) or (None, None)))]
        cells += [_e(_number(law.get("r2"), ".5f")), _e(_number(law.get("rmse_log_loss"), ".5f"))]
        cells += [_e(_number(power.get("k"), ".4g")), _e(_number(power.get("a"), ".4f"))]
        rows.append(cells)
    loss = f"nats per {unit}" if unit else "nats per token of this sweep"
    lines = [
        "<h2>Compute law per block</h2>",
        f"<p><b>{_e(fit_io.FORMULAS['compute'])}</b>, fitted on each block's points alone (loss in {_e(loss)}, "
        "C the detailed FLOPs count); beside it the pure power law L = k·C^(-a) of the same points.</p>",
        _table(header, rows, "block_laws"),
    ]
    for block, law in laws.items():
        warnings = law.get("identifiability") or []
        warnings = [warnings] if isinstance(warnings, str) else warnings
        lines += [f'<p class="warn">{_e(block)}: {_e(w)}</p>' for w in warnings]
    plot = summary.get("plot")
    lines.append(figures.take([plot] if plot else []))
    for law in laws.values():
        plots = law.get("plots") or {}
        lines.append(figures.take(plots.values() if isinstance(plots, dict) else plots))
    return "\n".join(lines)


def _mutransfer(summary: dict, figures: _Figures) -> str:
    """The best learning rate per width, one column per parametrization; diverged points listed."""
    best = summary.get("best_lr", {})
    parametrizations = list(best)
    widths = sorted({w for by_width in best.values() for w in by_width}, key=lambda w: float(w))
    rows = [[_e(w), *(_e(_number(best[p].get(w), ".3g")) for p in parametrizations)] for w in widths]
    lines = ["<h2>μTransfer: best learning rate per width</h2>"]
    lines.append(_table(["width", *(_e(p) for p in parametrizations)], rows, "best_lr"))
    diverged = summary.get("diverged") or []
    lines.append(f"<p>Diverged points: {_e(', '.join(map(str, diverged)) or 'none')}.</p>")
    plot = summary.get("plot")
    lines.append(figures.take([plot] if plot else []))
    other = {k: v for k, v in summary.items() if k not in ("best_lr", "diverged", "plot")}
    if other:
        lines.append(_table(("field", "value"), [(_e(k), _generic(v)) for k, v in other.items()], None, 2))
    return "\n".join(lines)


def _sparse(summary: dict, figures: _Figures) -> str:
    """Sparse runs against the law of the dense ones: prediction error per choice of N, each run and its twin."""
    lines = ["<h2>Sparse runs on the dense runs' law</h2>"]
    law = summary.get("law") or {}
    lines.append(
        f"<p>L(N, D) fitted on {_e(law.get('dense_points', '–'))} dense runs: "
        + ", ".join(f"{_e(k)} {_e(_number(law.get(k)))}" for k in fit_io.CONSTANT_NAMES["chinchilla"])
        + "</p>"
    )
    rmse = summary.get("rmse_log_loss") or {}
    lines.append(
        _table(
            ("N taken as", "RMSE of log-loss"),
            [(_e(k), _e(_number(v, ".4f"))) for k, v in rmse.items()],
            "rmse",
        )
    )
    rows = []
    for run in summary.get("runs", []):
        twin = run.get("twin") or {}
        rows.append(
            [
                _e(run.get("point")),
                *(_e(_number(run.get(k), ",.0f")) for k in ("n_initial", "n_avg", "n_final")),
                _e(_number(run.get("loss"), ".4f")),
                _e(_number(run.get("predicted_n_avg"), ".4f")),
                _e(twin.get("point", "–")),
                _e(_number(twin.get("loss"), ".4f")),
            ]
        )
    header = (
        "sparse run",
        "N initial",
        "N_avg",
        "N final",
        "loss",
        "law at N_avg",
        "dense twin",
        "twin loss",
    )
    lines.append(_table(header, rows, "sparse_runs"))
    plot = summary.get("plot")
    lines.append(figures.take([plot] if plot else []))
    return "\n".join(lines)


def _published(fitted: dict | None, unit: str | None) -> str:
    """Our constants beside Cerebras-GPT's compute law and Chinchilla's L(N, D), each row with its units; our
    rows are highlighted."""
    fitted = fitted or {}
    law = fitted.get("law")
    ours = f"nats per {unit}, D in {unit}s" if unit else "nats per token of this sweep's tokenizer"
    counting = fitted.get("counting")
    if isinstance(counting, dict) and counting:
        ours += f" (N {counting.get('params', '?')}, C {counting.get('flops', '?')})"
    compute = []  # (cells, ours?)
    if law == "compute":
        compute.append((["this sweep", _e(ours), *_values(fitted, fit_io.CONSTANT_NAMES["compute"])], True))
    compute.append(
        (
            ["Cerebras-GPT (Dey et al. 2023, Eq. 1)", "nats per GPT-2 BPE token, the Pile"]
            + _values(vars(fit.CEREBRAS_GPT_COMPUTE_LAW), fit_io.CONSTANT_NAMES["compute"], ""),
            False,
        )
    )
    blank = ["–"] * len(fit_io.CONSTANT_NAMES["chinchilla"])
    chinchilla = []
    allocation = fitted.get("allocation") or {}
    if law == "chinchilla":
        third = allocation.get("approach3") or {}
        cells = ["this sweep, approach 3", _e(ours), *_values(fitted, fit_io.CONSTANT_NAMES["chinchilla"])]
        chinchilla.append((cells + _values(third, ("a", "b"), ".3f"), True))
    for approach, summary in allocation.items():
        if approach != "approach3" and isinstance(summary, dict):
            name = f"this sweep, {_approach(approach)}"
            chinchilla.append(([_e(name), _e(ours), *blank, *_values(summary, ("a", "b"), ".3f")], True))
    massive = "nats per SentencePiece token, MassiveText"
    for source, published in (
        ("Chinchilla (Hoffmann et al. 2022), approach 3", fit.HOFFMANN_2022_LAW),
        ("Besiroglu et al. 2024, refit of approach 3", fit.BESIROGLU_2024_LAW),
    ):
        derived = [f"{published.optimal_params().exponent:.3f}", f"{published.optimal_tokens().exponent:.3f}"]
        cells = [source, massive, *_values(vars(published), fit_io.CONSTANT_NAMES["chinchilla"], "")]
        chinchilla.append((cells + [f"{x} (derived)" for x in derived], False))
    for approach, exponents in HOFFMANN_2022_ALLOCATION.items():
        cells = [f"Chinchilla (Hoffmann et al. 2022), {approach}", massive, *blank]
        chinchilla.append((cells + [f"{x:.2f}" for x in exponents], False))
    allocation_header = ("a (N_opt ∝ C^a)", "b (D_opt ∝ C^b)")
    return "\n".join(
        [
            "<h2>Published laws beside this sweep's</h2>",
            '<p class="note"><b>Units differ.</b> Loss of this sweep: '
            f"{_e(ours)}. Cerebras-GPT: nats per GPT-2 BPE token on the Pile. Chinchilla: nats per SentencePiece "
            "token on MassiveText. E, A, B and C_c carry these units and are not comparable number for number; "
            "the exponents have no unit but still depend on the data and the tokenizer.</p>",
            "<h3>Compute law L(C) = (C / C_c)^(−α) + E</h3>",
            _rows_table(("source", "units", *fit_io.CONSTANT_NAMES["compute"]), compute, "published_compute"),
            "<h3>Chinchilla L(N, D) = E + A / N^α + B / D^β and its allocation</h3>",
            _rows_table(
                ("source", "units", *fit_io.CONSTANT_NAMES["chinchilla"], *allocation_header),
                chinchilla,
                "published_chinchilla",
            ),
        ]
    )


def _rows_table(header, rows: list[tuple[list[str], bool]], table_id: str) -> str:
    """A table of (cells, ours?) rows, ours highlighted."""
    return _table(header, [cells for cells, _ in rows], table_id, 2, lambda i: "ours" if rows[i][1] else None)


def _values(source: dict, names, spec: str = ".5g") -> list[str]:
    return [_e(_number(source.get(n), spec)) for n in names]


class _Figures:
    """The sweep's PNGs (root/*.png, root/fit/*.png), each embedded once: by the section that names it, the
    rest at the end."""

    def __init__(self, root: pathlib.Path):
        self.root = root
        self.pending = sorted(root.glob("*.png")) + sorted((root / "fit").glob("*.png"))
        self.skipped: list[str] = []  # 'path (why)' of each figure left out

    def take(self, paths) -> str:
        """Figures of the named paths; one recorded outside the root (the root was moved or copied) is looked up
        by name in the root's folder of its folder's name (e.g. root/fit/), root/fit/ and the root first."""
        chosen = []
        for recorded in paths:
            path = pathlib.Path(recorded)
            inside = path.is_relative_to(self.root)
            candidates = [path] * inside + [
                self.root / path.parent.name / path.name,
                self.root / "fit" / path.name,
                self.root / path.name,
                path,
            ]
            found = next((p for p in candidates if p.is_file()), None)
            if found is None:
                self.skipped.append(f"{recorded} (not found)")
                continue
            self.pending = [p for p in self.pending if not p.samefile(found)]
            chosen.append(found)
        return self.html(chosen)

    def rest(self) -> str:
        """The figures no section named, and the ones left out (recorded but not found, or not a PNG)."""
        lines = []
        if self.pending:
            lines += ["<h2>Other figures</h2>", self.html(self.pending)]
        if self.skipped:
            lines.append(f'<p class="warn">Figures left out: {_e(", ".join(self.skipped))}</p>')
        return "\n".join(lines)

    def html(self, paths) -> str:
        """The PNGs as inline images, each captioned (and alt-texted) by its path in the root."""
        if not paths:
            return ""
        items = []
        for path in paths:
            name = str(path.relative_to(self.root) if path.is_relative_to(self.root) else path.name)
            content = path.read_bytes()
            if content[:8] != PNG_SIGNATURE:
                self.skipped.append(f"{name} (not a PNG)")
                continue
            name = _e(name)
            width, height = struct.unpack(">II", content[16:24])  # the PNG header's IHDR chunk
            wide = ' class="wide"' if width > 2 * height else ""  # a row of panels spans the page
            data = base64.b64encode(content).decode("ascii")
            image = f'<img alt="{name}" src="data:image/png;base64,{data}">'
            items.append(f"<figure{wide}>{image}<figcaption>{name}</figcaption></figure>")
        return '<div class="figures">' + "".join(items) + "</div>"
