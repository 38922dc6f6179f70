"""μP coordinate check: activation scales stay put across widths under μP and grow under SP."""

import numpy as np

from chinchax.scaling import coord_check

WIDTHS = (128, 256, 512, 1024)


def test_mup_keeps_activation_scales_across_widths_sp_does_not():
    seed = int(np.random.SeedSequence().entropy % 2**31)
    mup = coord_check.spread(coord_check.run("mup", WIDTHS, steps=3, lr=3e-3, seed=seed))
    sp = coord_check.spread(coord_check.run("sp", WIDTHS, steps=3, lr=3e-3, seed=seed))
    assert all(v < 2.0 for v in mup.values()), (seed, mup)
    assert max(sp.values()) > 2.0, (seed, sp)
    # SP's attention logits and block outputs grow with width (Adam updates ∝ width under SP)
    assert sp["attention_logits"] > 2 * mup["attention_logits"], (seed, sp, mup)
