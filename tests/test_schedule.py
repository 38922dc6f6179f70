"""A run's schedule (`config.train_schedule`): tokens, steps, batch phases and microbatches of a batch-ramp
config, against step counts worked out here by hand from the config's numbers."""

import pytest

from chinchax import config
from experiments import configs

SEQ, FIRST, SECOND, MICROBATCHES = 64, 8, 16, 2


def ramp(**train_fields):
    """cpu_tiny at 64-token sequences: 8 sequences a step, then 16 from token 8·64·5 + 100 (not a step
    boundary: the 6th step of 8 sequences still starts before it), 2 microbatches a step."""
    cfg = configs.get("cpu_tiny")
    cfg.data.seq_len = SEQ
    cfg.train.update(
        batch_size=FIRST,
        batch_ramp=((FIRST * SEQ * 5 + 100, SECOND),),
        microbatches=MICROBATCHES,
        **train_fields,
    )
    return config.validate(cfg)


def test_a_batch_ramp_schedule_counts_steps_tokens_and_microbatches():
    tokens = 6 * FIRST * SEQ + 4 * SECOND * SEQ  # 6 steps of 512 tokens, then 4 of 1024
    schedule = config.train_schedule(ramp(tokens=tokens), params=1)
    assert schedule.tokens == 7168
    assert schedule.steps == 10
    assert schedule.phases == ((0, 0, 8), (6, 3072, 16))
    assert schedule.microbatch == 4  # the first batch size over 2 microbatches, kept through the ramp
    assert [schedule.batch_size_at(step) for step in range(10)] == [8] * 6 + [16] * 4
    assert [schedule.microbatches_at(step) for step in range(10)] == [2] * 6 + [4] * 4
    assert [schedule.tokens_before(step) for step in range(11)] == [
        0, 512, 1024, 1536, 2048, 2560, 3072, 4096, 5120, 6144, 7168,
    ]  # fmt: skip


def test_the_last_step_overshoots_a_token_count_between_steps():
    schedule = config.train_schedule(ramp(tokens=6 * FIRST * SEQ + 1), params=1)  # one token into phase two
    assert (schedule.tokens, schedule.steps) == (3073, 7)


@pytest.mark.parametrize(
    "params, tokens, steps",
    [
        (100, 2048, 4),  # 20 · 100 = 2000 tokens → 4 steps of 512 (2048), all before the ramp
        (123_457, 2_469_376, 2415),  # 2,469,140 → 4823 steps of 512; 6 of 512, then ⌈2,466,304 / 1024⌉ = 2409
    ],
)
def test_tokens_per_param_round_up_to_whole_first_phase_steps(params, tokens, steps):
    schedule = config.train_schedule(ramp(tokens=0, tokens_per_param=20.0), params=params)
    assert (schedule.tokens, schedule.steps) == (tokens, steps)


def test_auto_microbatches_leave_the_microbatch_unresolved():
    cfg = configs.get("cpu_tiny")
    cfg.train.microbatches = config.AUTO
    schedule = config.train_schedule(config.validate(cfg), params=1)
    assert schedule.microbatch == config.AUTO
