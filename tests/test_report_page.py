"""The sweep report page, built by `python -m experiments.report` from a sweep root that the real analyses filled
(results.csv of synthetic points from a known compute law with fresh noise, then report.analyse for the compute
law and for μTransfer), and parsed back: every point with its loss, every PNG embedded byte for byte, the fitted
and published constants as printed, a new fit.json field shown; a bad root is one line of error.
"""

import base64
import csv
import html.parser
import json
import subprocess
import sys
from typing import NamedTuple

import numpy as np
import pytest

from chinchax.scaling import fit, report
from chinchax.scaling import sweep as sweep_lib
from tests.conftest import REPO

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LAW = fit.ComputeLaw(C_c=3e8, alpha=0.12, E=0.9)


class _Page(html.parser.HTMLParser):
    """Tables by id (rows of cell texts; nested tables count as text of their cell) and images as (alt, src)."""

    def __init__(self):
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.images: list[tuple[str, str]] = []
        self.text: list[str] = []
        self._stack: list[tuple[str | None, list[list[str]]]] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self._stack.append((attrs.get("id"), []))
        elif tag == "tr" and self._stack:
            self._stack[-1][1].append([])
        elif tag in ("td", "th") and self._stack:
            self._stack[-1][1][-1].append("")
        elif tag == "img":
            self.images.append((attrs["alt"], attrs["src"]))

    def handle_endtag(self, tag):
        if tag == "table":
            ident, rows = self._stack.pop()
            if ident:
                self.tables[ident] = [[cell.strip() for cell in row] for row in rows]

    def handle_data(self, data):
        self.text.append(data)
        for _, rows in self._stack:  # the cell of every enclosing table holds the text
            if rows and rows[-1]:
                rows[-1][-1] += data

    def rows(self, table: str) -> dict[str, list[str]]:
        """Rows of `table` keyed by their first cell."""
        return {row[0]: row for row in self.tables[table][1:]}


class SweepRoot(NamedTuple):
    """The filled sweep root, what went into it, and the seed of its random numbers (for failure messages)."""

    root: object
    rows: list[dict]
    saved: dict
    best: dict
    seed: int


def _report(root) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "experiments.report", f"--root={root}"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )


@pytest.fixture(scope="module")
def sweep_root(tmp_path_factory) -> SweepRoot:
    """A sweep root as experiments.sweep leaves it: results.csv, fit.json with its plots, mutransfer.json (two
    seeds a point) with its plot, sweep.json, and one run's config.json (byte-level data)."""
    seed = int(np.random.SeedSequence().entropy % 2**31)
    print(f"seed {seed}")
    rng = np.random.default_rng(seed)
    root = tmp_path_factory.mktemp("sweep")
    flops = np.geomspace(1e10, 1e14, 7) * rng.uniform(0.9, 1.1, 7)
    params = np.sqrt(flops / 120.0)  # 20 tokens per parameter: C = 6·N·20N
    loss = LAW.loss(flops) * np.exp(rng.normal(0.0, 0.01, flops.size))
    rows = [
        {
            "point": f"p{i}_c{c:.1e}",
            "budget": float(f"{c:.2g}"),
            "params": round(n),
            "non_embedding_params": round(0.6 * n),
            "tokens": round(20 * n),
            "train_flops": c,
            "wall_seconds": float(rng.uniform(5, 50)),
            "train_seconds": float(rng.uniform(1, 5)),
            "flops": c,
            "loss": float(l),
        }
        for i, (c, n, l) in enumerate(zip(flops, params, loss, strict=True))
    ]
    with open(root / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    sweep = sweep_lib.Sweep("synthetic_ladder", "points from a known compute law", (), "compute_law")
    sweep_lib.write_manifest(sweep, root)
    report.analyse(sweep, root, rows, resamples=20)
    saved = json.loads((root / "fit.json").read_text())
    saved["a_field_added_later"] = {"note": "shown without code changes", "count": 3}
    (root / "fit.json").write_text(json.dumps(saved))
    lr_rows = [
        {"parametrization": p, "width": w, "lr": lr, "seed": s, "loss": float(rng.uniform(2, 4))}
        for p in ("sp", "mup")
        for w in (32, 64)
        for lr in (1e-3, 1e-2, 1e-1)
        for s in (0, 1)
    ]
    report.analyse(sweep_lib.Sweep("lr", "μTransfer", (), "mutransfer"), root, lr_rows)
    (root / "runs" / rows[0]["point"]).mkdir(parents=True)
    (root / "runs" / rows[0]["point"] / "config.json").write_text(
        json.dumps({"data": {"tokenizer": "bytes"}})
    )
    return SweepRoot(root, rows, saved, report.best_learning_rates(lr_rows), seed)


@pytest.fixture(scope="module")
def page(sweep_root):
    root, seed = sweep_root.root, sweep_root.seed
    out = _report(root)
    assert out.returncode == 0, f"seed {seed}: {out.stderr[-2000:]}"
    assert out.stdout.strip() == f"report: {(root / 'report.html').resolve()}", f"seed {seed}"
    parsed = _Page()
    parsed.feed((root / "report.html").read_text())
    return parsed


def test_every_point_appears_with_its_loss(sweep_root, page):
    rows, seed = sweep_root.rows, sweep_root.seed
    header, *table = page.tables["points"]
    assert "loss (nats / byte)" in header and "tokens / param" in header, f"seed {seed}: {header}"
    by_name = {cells[0]: dict(zip(header, cells, strict=True)) for cells in table}
    assert set(by_name) == {row["point"] for row in rows}, f"seed {seed}"
    for row in rows:
        printed = by_name[row["point"]]
        context = f"seed {seed}: {row} printed as {printed}"
        assert float(printed["loss (nats / byte)"]) == pytest.approx(row["loss"], abs=5e-5), context
        assert float(printed["tokens / param"]) == pytest.approx(row["tokens"] / row["params"], abs=0.05), (
            context
        )
        assert printed["params"] == f"{row['params']:,}", context
    total = sum(row["wall_seconds"] for row in rows)
    assert f"{total:,.1f} s of trainer wall time" in "".join(page.text), f"seed {seed}"


def test_every_png_is_embedded_byte_for_byte(sweep_root, page):
    root, seed = sweep_root.root, sweep_root.seed
    pngs = sorted(root.glob("*.png")) + sorted((root / "fit").glob("*.png"))
    # the compute law's band, loss vs FLOPs, residuals; the μTransfer figure
    assert len(pngs) >= 4, f"seed {seed}: {pngs}"
    embedded = dict(page.images)
    assert len(embedded) == len(page.images), f"seed {seed}"  # each image once
    assert sorted(embedded) == sorted(str(path.relative_to(root)) for path in pngs), f"seed {seed}"
    prefix = "data:image/png;base64,"
    for path in pngs:
        src = embedded[str(path.relative_to(root))]
        assert src.startswith(prefix), f"seed {seed}: {path}"
        data = base64.b64decode(src[len(prefix) :], validate=True)
        assert data[:8] == PNG_SIGNATURE and data == path.read_bytes(), f"seed {seed}: {path}"


def test_fitted_constants_are_fit_json_as_printed(sweep_root, page):
    saved, best, seed = sweep_root.saved, sweep_root.best, sweep_root.seed
    constants = page.rows("constants")
    assert set(constants) == {"C_c", "alpha", "E"}, f"seed {seed}"
    for name, (_, value, low, high) in constants.items():
        context = f"seed {seed}: {name} printed as {value} [{low}, {high}], fit.json {saved[name]} {saved['ci'][name]}"
        assert float(value) == float(f"{saved[name]:.5g}"), context
        assert [float(low), float(high)] == [float(f"{x:.5g}") for x in saved["ci"][name]], context
    ours = page.rows("published_compute")["this sweep"]
    assert [float(x) for x in ours[2:]] == [float(f"{saved[n]:.5g}") for n in ("C_c", "alpha", "E")], (
        f"seed {seed}: {ours}"
    )
    other = page.rows("other")
    assert "shown without code changes" in other["a_field_added_later"][1], f"seed {seed}"
    widths = page.rows("best_lr")
    header = page.tables["best_lr"][0]
    for parametrization, by_width in best.items():
        column = header.index(parametrization)
        for width, lr in by_width.items():
            assert float(widths[width][column]) == float(f"{lr:.3g}"), f"seed {seed}: {widths} vs {best}"


def test_published_constants_are_beside_ours_with_their_units(sweep_root, page):
    seed = sweep_root.seed
    compute = page.rows("published_compute")
    cerebras = compute["Cerebras-GPT (Dey et al. 2023, Eq. 1)"]
    assert "GPT-2 BPE" in cerebras[1] and "byte" in compute["this sweep"][1], f"seed {seed}: {compute}"
    law = fit.CEREBRAS_GPT_COMPUTE_LAW
    assert [float(x) for x in cerebras[2:]] == [law.C_c, law.alpha, law.E], f"seed {seed}: {cerebras}"
    chinchilla = page.rows("published_chinchilla")
    for source, law in (
        ("Chinchilla (Hoffmann et al. 2022), approach 3", fit.HOFFMANN_2022_LAW),
        ("Besiroglu et al. 2024, refit of approach 3", fit.BESIROGLU_2024_LAW),
    ):
        cells = chinchilla[source]
        assert "SentencePiece" in cells[1], f"seed {seed}: {cells}"
        assert [float(x) for x in cells[2:7]] == [law.A, law.B, law.E, law.alpha, law.beta], (
            f"seed {seed}: {cells}"
        )
    approaches = [chinchilla[f"Chinchilla (Hoffmann et al. 2022), approach {i}"][7:] for i in (1, 2)]
    assert approaches == [["0.50", "0.50"], ["0.49", "0.51"]], f"seed {seed}: {approaches}"


def test_a_bad_root_is_one_line_of_error(tmp_path):
    (tmp_path / "empty").mkdir()
    for root, expected in (
        (tmp_path / "missing", "no such sweep folder"),
        (tmp_path / "empty", "results.csv"),
    ):
        out = _report(root)
        assert out.returncode == 1, out.stderr[-2000:]
        assert out.stderr.strip().splitlines() == [f"error: {out.stderr.strip()[7:]}"]
        assert expected in out.stderr and "Traceback" not in out.stderr
        assert not (root / "report.html").exists()


def test_a_sparse_sweep_shows_its_runs_on_the_dense_law(tmp_path):
    """report.sparse on runs drawn from a known L(N, D) (sparse ones at their N_avg), then the page: every sparse
    run with its N_avg, loss and the law's prediction as sparse.json has them, and its plot embedded."""
    from tests.test_fit import sparse_rows

    seed = int(np.random.SeedSequence().entropy % 2**31)
    print(f"seed {seed}")
    rows = sparse_rows(
        fit.ChinchillaLaw(A=400.0, B=1500.0, E=1.8, alpha=0.34, beta=0.3), np.random.default_rng(seed)
    )
    with open(tmp_path / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        writer.writeheader()
        writer.writerows(rows)
    summary = report.sparse(tmp_path, rows, resamples=0)
    out = _report(tmp_path)
    assert out.returncode == 0, f"seed {seed}: {out.stderr[-2000:]}"
    page = _Page()
    page.feed((tmp_path / "report.html").read_text())
    table = page.rows("sparse_runs")
    for run in summary["runs"]:
        row = table[run["point"]]
        context = f"seed {seed}: {run} printed as {row}"
        assert row[2] == f"{run['n_avg']:,.0f}" and row[4] == f"{run['loss']:.4f}", context
        assert row[5] == f"{run['predicted_n_avg']:.4f}", context
    assert [alt for alt, _ in page.images] == ["sparse_law.png"], f"seed {seed}"
    embedded = base64.b64decode(page.images[0][1].split(",", 1)[1])
    assert embedded == (tmp_path / "sparse_law.png").read_bytes(), f"seed {seed}"
