"""Write one self-contained HTML page of a sweep: `python -m experiments.report --root=DIR [--out=FILE]`.

DIR is a sweep folder (experiments.sweep's --root, by default runs/sweeps/NAME) holding results.csv and, after
its analysis, fit.json or mutransfer.json with their plots. The page (default DIR/report.html) embeds every plot
and holds the points, the fitted constants with their CIs, and the published laws beside them; its path is
printed.
"""

from absl import app, flags

from chinchax.scaling import report_page
from experiments import cli as cli_lib

_ROOT = flags.DEFINE_string("root", None, "Sweep folder holding results.csv.", required=True)
_OUT = flags.DEFINE_string("out", None, "Where to write the page (default: ROOT/report.html).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    print(f"report: {report_page.write(_ROOT.value, _OUT.value).resolve()}")


def cli():
    """Entry point: one-line errors (experiments.cli)."""
    cli_lib.run(main, (report_page.ReportPageError,))


if __name__ == "__main__":
    cli()
