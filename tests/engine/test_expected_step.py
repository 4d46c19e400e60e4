"""The engine says how long its step in progress should take (from the step's tokens and its
measured seconds per token), so a health check does not call a long prefill a hang."""

from __future__ import annotations

from tokenfab.clock import ManualClock
from tokenfab.engine.core.batch import SampledToken, StepResult
from tokenfab.engine.core.scheduler import SchedulerConfig
from tokenfab.engine.core.step import EngineCore
from tokenfab.protocol import GenerateRequest, SamplingParams


class LinearRunner:
    """Steps cost 5 ms plus 1 ms per token (2 s for the first step of the process: set-up);
    records what the engine expected while each step ran."""

    block_size, num_blocks = 16, 512

    def __init__(self) -> None:
        self.core: EngineCore | None = None
        self.seen: list[tuple[int, float]] = []
        self.steps = 0

    def validate(self, params: SamplingParams) -> None:
        pass

    def add(self, seq: object) -> None:
        pass

    def drop(self, seq: object) -> None:
        pass

    def execute(self, sched):  # type: ignore[no-untyped-def]
        assert self.core is not None
        self.seen.append((sched.num_batched_tokens, self.core.expected_step_seconds()))
        self.steps += 1
        seconds = 2.0 if self.steps == 1 else 0.005 + 0.001 * sched.num_batched_tokens
        tokens = [SampledToken(s.seq, 7) for s in sched.scheduled if s.sample]
        return StepResult(tokens=tokens, seconds=seconds)


def _core() -> tuple[EngineCore, LinearRunner]:
    runner = LinearRunner()
    core = EngineCore(
        runner,
        vocab_size=100,
        eos_token_ids=[0],
        max_model_len=4096,
        scheduler_config=SchedulerConfig(max_num_batched_tokens=4096),
        clock=ManualClock(),
    )
    runner.core = core
    return core, runner


def _run(core: EngineCore, request_id: str, prompt_tokens: int) -> None:
    core.add_request(
        GenerateRequest(
            request_id=request_id,
            prompt_token_ids=[1 + i % 90 for i in range(prompt_tokens)],
            sampling=SamplingParams(max_tokens=2, ignore_eos=True),
        )
    )
    while core.has_unfinished():
        core.step()


def test_a_warmed_up_engine_expects_a_long_prefill_to_take_long() -> None:
    core, runner = _core()
    assert core.expected_step_seconds() == 0.0  # no step running
    core.warm_up(prompt_tokens=96)
    assert core.stats().step_expected_s == 0.0  # idle again
    assert core.stats().step_time_ema == 0.0
    # The set-up step (2 s for 96 tokens) did not set the per-token cost; the second
    # warm-up prefill (0.101 s for 96 tokens) did.
    runner.seen.clear()
    _run(core, "long", 2000)
    tokens, expected = runner.seen[0]
    assert tokens == 2000
    actual = 0.005 + 0.001 * tokens
    assert actual <= expected <= 1.2 * actual
    # warm-up left no trace in the step average (its set-up step took 2 s)
    assert core.stats().num_steps == len(runner.seen)


def test_without_a_measurement_the_step_average_is_the_expectation() -> None:
    core, runner = _core()
    _run(core, "short", 8)  # first step (set-up) and decode steps: no per-token cost
    ema = core.stats().step_time_ema
    assert ema > 0
    runner.seen.clear()
    _run(core, "long", 1000)
    assert runner.seen[0] == (1000, ema)
