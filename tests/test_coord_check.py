"""μP coordinate check from the command line: activation scales stay put across widths under μP and grow under SP;
the plot and the JSON it writes."""

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO

WIDTHS = (128, 256, 512, 1024)


@pytest.mark.slow  # 82-87 s (compiles 8 models): the default run's longest; CI's second job runs it
def test_mup_keeps_activation_scales_across_widths_sp_does_not(tmp_path):
    seed = int(np.random.SeedSequence().entropy % 2**31)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.coord_check",
            f"--out={tmp_path}",
            f"--widths={','.join(map(str, WIDTHS))}",
            "--steps=3",
            f"--seed={seed}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, (seed, out.stderr[-2000:])
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    mup, sp = summary["mup"], summary["sp"]
    assert all(v < 2.0 for v in mup.values()), (seed, mup)
    assert max(sp.values()) > 2.0, (seed, sp)
    # SP's attention logits and block outputs grow with width (Adam updates ∝ width under SP)
    assert sp["attention_logits"] > 2 * mup["attention_logits"], (seed, sp, mup)
    # the JSON beside the plot: per activation, max/min over widths of the last step's mean |activation|
    saved = json.loads((tmp_path / "coord_check.json").read_text())
    for name in ("sp", "mup"):
        for activation, spread in summary[name].items():
            last = [saved["results"][name][str(w)][-1][activation] for w in WIDTHS]
            assert spread == pytest.approx(max(last) / min(last), rel=1e-12), (seed, name, activation)
    assert (tmp_path / "coord_check.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
