"""The block comparison: the blocks_cpu sweep's points, one compute law per block (each against a scipy fit of
the same rows) drawn together, and the report page's table and figures of both laws.

Fast tests analyse synthetic rows (two known compute laws with fresh noise, written as results.csv); the slow one
trains a real mini ladder of both blocks (4 budgets each) and analyses it the same way.
"""

import base64
import csv
import html.parser
import json
import math

import numpy as np
import pytest
from scipy import optimize

from chinchax.scaling import launch, plan, report, report_page
from chinchax.scaling import sweep as sweep_lib
from experiments import configs
from experiments.configs import cpu, sweeps
from tests.conftest import REPO

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# (C_c, alpha, E) of each block's synthetic law
LAWS = {"gpt3": (3e8, 0.12, 0.9), "llama": (1e8, 0.10, 0.8)}


def scipy_compute_law(flops, loss) -> tuple[dict, float]:
    """L = (C/C_c)^-alpha + E, E ≥ 0, by least squares on the loss (Cerebras-GPT's objective), by variable
    projection: at a fixed alpha, L = a·C^-alpha + E is linear in (a, E) ≥ 0 (scipy's nnls); alpha from a grid over
    (0, 2], then scipy's bounded scalar minimum around the best grid point. Returns ({C_c, alpha, E},
    Σ (L̂ − L)² / 2)."""
    flops, loss = np.asarray(flops, dtype=np.float64), np.asarray(loss, dtype=np.float64)
    x = flops / flops.mean()  # C^-alpha in a well-scaled unit

    def solve(alpha):
        design = np.column_stack([x**-alpha, np.ones_like(x)])
        (a, e), norm = optimize.nnls(design, loss)
        return 0.5 * norm**2, a, e

    grid = np.linspace(1e-3, 2.0, 2000)
    i = int(np.argmin([solve(alpha)[0] for alpha in grid]))
    found = optimize.minimize_scalar(
        lambda alpha: solve(alpha)[0],
        bounds=(grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]),
        method="bounded",
        options={"xatol": 1e-12},
    )
    cost, a, e = solve(found.x)
    # a·(C/mean)^-alpha = (C/C_c)^-alpha with C_c = mean · a^(1/alpha)
    return {"C_c": flops.mean() * a ** (1.0 / found.x), "alpha": float(found.x), "E": float(e)}, cost


def lsq_cost(constants: dict, flops, loss) -> float:
    flops, loss = np.asarray(flops, dtype=np.float64), np.asarray(loss, dtype=np.float64)
    predicted = (flops / constants["C_c"]) ** (-constants["alpha"]) + constants["E"]
    return 0.5 * float(((predicted - loss) ** 2).sum())


class _Page(html.parser.HTMLParser):
    """Tables by id (rows of cell texts) and images as {alt: src}."""

    def __init__(self):
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.images: dict[str, str] = {}
        self._table: list[list[str]] | None = None
        self._in_cell = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table" and attrs.get("id"):
            self._table = self.tables.setdefault(attrs["id"], [])
        elif tag == "tr" and self._table is not None:
            self._table.append([])
        elif tag in ("td", "th") and self._table is not None:
            self._table[-1].append("")
            self._in_cell = True
        elif tag == "img":
            self.images[attrs["alt"]] = attrs["src"]

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = None
        self._in_cell = self._in_cell and tag not in ("td", "th")

    def handle_data(self, data):
        if self._in_cell:
            self._table[-1][-1] += data


def write_results(root, rows: list[dict]) -> None:
    with open(root / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def check_analysis(root, rows: list[dict], context: str) -> dict:
    """blocks.json's law of each block is the scipy fit of that block's rows (its least-squares cost no higher,
    its constants the same), its CIs the percentiles of its refits, with numpy's log-log line as its pure power law; the figure of
    both laws is a PNG; returns blocks.json."""
    saved = json.loads((root / "blocks.json").read_text())
    assert list(saved["blocks"]) == list(dict.fromkeys(r["block"] for r in rows)), context
    for block, law in saved["blocks"].items():
        own = [r for r in rows if r["block"] == block]
        flops, loss = [r["flops"] for r in own], [r["loss"] for r in own]
        reference, cost = scipy_compute_law(flops, loss)
        ours = {k: law[k] for k in ("C_c", "alpha", "E")}
        where = f"{context}: {block}: ours {ours} (cost {lsq_cost(ours, flops, loss):.6g}), scipy {reference} ({cost:.6g})"
        assert law["points"] == len(own), where
        assert lsq_cost(ours, flops, loss) <= cost * (1 + 1e-4) + 1e-14, where
        assert ours["alpha"] == pytest.approx(reference["alpha"], rel=2e-3), where
        assert ours["E"] == pytest.approx(reference["E"], rel=2e-3, abs=1e-6), (
            where
        )  # E may sit at its bound 0
        assert math.log(ours["C_c"]) == pytest.approx(math.log(reference["C_c"]), rel=2e-3), where
        slope, intercept = np.polyfit(np.log(flops), np.log(loss), 1)  # the pure power law beside it
        assert law["power_law"]["a"] == pytest.approx(-slope, rel=1e-9), where
        assert law["power_law"]["k"] == pytest.approx(math.exp(intercept), rel=1e-9), where
        for name in ("C_c", "alpha", "E"):  # 95% percentile intervals of its bootstrap refits
            refits = np.array(law["bootstrap_samples"][name])
            expected = np.percentile(refits[np.isfinite(refits)], [2.5, 97.5])
            assert law["ci"][name] == pytest.approx(expected, rel=1e-12), (where, name)
    assert (root / "compute_laws.png").read_bytes()[:8] == PNG_SIGNATURE, context
    assert saved["plot"] == str(root / "compute_laws.png"), context
    return saved


def check_page(root, saved: dict, context: str) -> None:
    """The page's block_laws table prints each block's constants and CIs as blocks.json holds them; the figure
    of both laws and each block's own figures are embedded byte for byte."""
    text = report_page.page(root)
    parsed = _Page()
    parsed.feed(text)
    header, *table = parsed.tables["block_laws"]
    printed = {cells[0]: dict(zip(header, cells, strict=True)) for cells in table}
    assert list(printed) == list(saved["blocks"]), (context, header, table)
    for block, law in saved["blocks"].items():
        cells = printed[block]
        for name in ("C_c", "alpha", "E"):
            low, high = law["ci"][name]
            shown = [cells[name], cells[f"{name} 95% CI low"], cells[f"{name} 95% CI high"]]
            assert [float(x) for x in shown] == [float(f"{v:.5g}") for v in (law[name], low, high)], (
                context,
                block,
                cells,
            )
        assert int(cells["points"]) == law["points"], (context, cells)
        power = law["power_law"]
        assert [float(cells["power law k"]), float(cells["power law a"])] == [
            float(f"{power['k']:.4g}"),
            float(f"{power['a']:.4f}"),
        ], (context, cells)
    figures = ["compute_laws.png"] + [f"fit_{block}/compute_law_ci.png" for block in saved["blocks"]]
    section = text.split("<h2>Compute law per block</h2>")[1].split("<h2>")[0]
    prefix = "data:image/png;base64,"
    for name in figures:
        assert f'alt="{name}"' in section, (context, name)  # shown in the block section
        src = parsed.images[name]
        assert src.startswith(prefix), (context, name)
        assert base64.b64decode(src[len(prefix) :]) == (root / name).read_bytes(), (context, name)


def test_each_block_gets_its_own_compute_law_and_the_page_shows_both(tmp_path):
    seed = int(np.random.SeedSequence().entropy % 2**31)
    rng = np.random.default_rng(seed)
    rows = []
    for block, (c_c, alpha, e) in LAWS.items():
        flops = np.geomspace(2e10, 4e12, 6) * rng.uniform(0.95, 1.05, 6)
        loss = ((flops / c_c) ** (-alpha) + e) * np.exp(rng.normal(0.0, 0.005, flops.size))
        params = np.sqrt(flops / 120.0)
        rows += [
            {
                "point": f"{block}_p{i}",
                "block": block,
                "budget": float(f"{c:.2g}"),
                "params": round(n),
                "non_embedding_params": round(0.5 * n),
                "tokens": round(20 * n),
                "train_flops": c,
                "wall_seconds": 10.0,
                "train_seconds": 8.0,
                "flops": c,
                "loss": float(l),
            }
            for i, (c, n, l) in enumerate(zip(flops, params, loss, strict=True))
        ]
    write_results(tmp_path, rows)
    sweep = sweep_lib.Sweep("blocks", "two blocks", (), "compute_law_by_block")
    sweep_lib.write_manifest(sweep, tmp_path)
    summary = report.analyse(sweep, tmp_path, rows, resamples=20)
    assert "block gpt3:" in summary["text"] and "block llama:" in summary["text"]
    saved = check_analysis(tmp_path, rows, f"seed {seed}")
    check_page(tmp_path, saved, f"seed {seed}")


def test_points_without_a_block_tag_are_refused_in_one_line(tmp_path):
    rows = [
        {"point": "p0", "block": "gpt3", "flops": 1e10, "loss": 3.0},
        {"point": "p1", "flops": 1e11, "loss": 2.5},
    ]
    sweep = sweep_lib.Sweep("blocks", "two blocks", (), "compute_law_by_block")
    with pytest.raises(sweep_lib.SweepError, match="needs a 'block' tag; p1 lack"):
        report.analyse(sweep, tmp_path, rows, resamples=0)


def test_blocks_cpu_plans_both_blocks_on_the_same_budgets_and_widths():
    """Each block's points spend the same six ladder budgets (20 tokens per own parameter) at the same widths;
    the Llama points carry its switches with two query heads per kv head, the GPT-3 points the defaults."""
    sweep = sweeps.blocks_cpu()
    assert sweep.analysis == "compute_law_by_block"
    base = configs.get(cpu.CPU_BASE)
    by_block: dict[str, list] = {}
    for point in sweep.points:
        cfg = plan.configure(base, point.overrides)
        row = plan.describe(base, point)
        by_block.setdefault(point.tags["block"], []).append((row["budget"], cfg.model.d_model))
        assert point.name.startswith(point.tags["block"] + "_"), point.name
        assert row["train_flops"] == pytest.approx(row["budget"], rel=0.02), point.name
        assert row["tokens_per_param"] == pytest.approx(20.0, rel=0.15), point.name
        m = cfg.model
        if point.tags["block"] == "llama":
            assert (m.norm, m.position, m.mlp, m.bias, m.tie_embeddings) == (
                "rmsnorm",
                "rope",
                "swiglu",
                False,
                False,
            )
            assert m.n_heads == 2 * m.kv_heads and m.d_ffn_multiple == 16, point.name
        else:
            assert (m.norm, m.position, m.mlp, m.bias, m.tie_embeddings, m.kv_heads) == (
                "layernorm",
                "learned",
                "gelu",
                True,
                True,
                0,
            )
    assert sorted(by_block) == ["gpt3", "llama"]
    assert by_block["gpt3"] == by_block["llama"]
    assert [budget for budget, _ in by_block["gpt3"]] == list(sweeps.LADDER_BUDGETS[:6])


@pytest.mark.slow  # eight real training runs: 60 s on 2 idle cores, 144 s shared with other jobs
def test_a_real_mini_ladder_of_both_blocks_is_analysed_and_reported(tmp_path):
    """Both blocks on four small budgets (heads of 4: the Llama block's widths step by 8), trained by
    experiments.run through the local launcher, then the same analysis and page as the shipped sweep."""
    base = configs.get(cpu.CPU_BASE)
    short = (
        cpu.CPU_RECIPE + cpu.FINAL_EVAL + (("train.eval_batches", 2), ("train.warmup_tokens", 4 * 8 * 256))
    )
    points = tuple(
        plan.Point(f"{block}_{p.name}", p.base, p.overrides, {**p.tags, "block": block})
        for block, switches in sweeps.BLOCKS.items()
        for p in plan.ladder(base, cpu.CPU_BASE, (3e9, 1.6e10, 5e10, 1e11), d_head=4, extra=short + switches)
    )
    sweep = sweep_lib.Sweep("mini_blocks", "both blocks, four budgets", points, "compute_law_by_block")
    outcomes = launch.run_local(sweep, tmp_path, REPO, progress=False)
    assert [o.status for o in outcomes] == ["done"] * 8, [(o.point, o.message) for o in outcomes]
    rows = sweep_lib.gather(sweep, tmp_path)
    for row in rows:
        saved_config = json.loads((tmp_path / "runs" / row["point"] / "config.json").read_text())["model"]
        if row["block"] == "llama":
            assert (
                saved_config["n_heads"] == 2 * saved_config["kv_heads"] and not saved_config["tie_embeddings"]
            )
        assert row["loss"] < math.log(257), row  # trained below the untrained model's uniform guess
    sweep_lib.write_manifest(sweep, tmp_path)
    report.analyse(sweep, tmp_path, rows, resamples=20)
    saved = check_analysis(tmp_path, rows, "mini ladder")
    check_page(tmp_path, saved, "mini ladder")
