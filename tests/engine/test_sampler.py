"""Sampler: greedy, temperature statistics, truncation, seeds, penalty semantics, logprobs."""

from __future__ import annotations

import math

import torch

from tokenfab.engine.sampler import Sampler, SampleRow, make_generator
from tokenfab.protocol import SamplingParams

LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])


def rows(n: int, **params: object) -> list[SampleRow]:
    return [SampleRow(SamplingParams(**params), [], []) for _ in range(n)]  # type: ignore[arg-type]


def histogram(tokens: list[int], vocab: int) -> torch.Tensor:
    return torch.bincount(torch.tensor(tokens), minlength=vocab).float() / len(tokens)


def test_greedy_is_argmax() -> None:
    logits = torch.randn(5, 50)
    out = Sampler()(logits, rows(5, temperature=0.0))
    assert [r.token_id for r in out] == logits.argmax(-1).tolist()


def test_temperature_sampling_follows_softmax() -> None:
    n = 20000
    out = Sampler(seed=1)(LOGITS.repeat(n, 1), rows(n, temperature=0.7))
    freq = histogram([r.token_id for r in out], 6)
    expected = torch.softmax(LOGITS / 0.7, -1)
    assert torch.allclose(freq, expected, atol=0.015), (freq, expected)


def test_top_k_top_p_min_p_truncate() -> None:
    n = 4000
    s = Sampler(seed=2)
    top_k = {r.token_id for r in s(LOGITS.repeat(n, 1), rows(n, temperature=1.0, top_k=2))}
    assert top_k == {0, 1}
    probs = torch.softmax(LOGITS, -1)  # ~[.56, .21, .13, .08, .03, .004]
    top_p = {r.token_id for r in s(LOGITS.repeat(n, 1), rows(n, temperature=1.0, top_p=0.8))}
    assert top_p == {0, 1, 2}  # 0.56 + 0.21 < 0.8, so the third is still needed
    min_p = {r.token_id for r in s(LOGITS.repeat(n, 1), rows(n, temperature=1.0, min_p=0.2))}
    assert min_p == {i for i in range(6) if probs[i] >= 0.2 * probs[0]}


def test_seeded_rows_do_not_depend_on_batch_mates() -> None:
    logits = torch.randn(1, 100)

    def draw(batch: int) -> list[int]:
        gen = make_generator(42)
        toks = []
        for _ in range(5):
            rs = rows(batch, temperature=1.0)
            rs[0].generator = gen
            toks.append(Sampler(seed=batch)(logits.repeat(batch, 1), rs)[0].token_id)
        return toks

    assert draw(1) == draw(7)
    assert len(set(draw(1))) > 1  # really random


def test_repetition_penalty_divides_positive_and_multiplies_negative() -> None:
    logits = torch.tensor([[3.0, 2.5, -0.5, -0.6]])
    row = SampleRow(SamplingParams(temperature=0.0, repetition_penalty=2.0), [0], [2])
    # token 0: 3.0 -> 1.5 (< 2.5), token 2: -0.5 -> -1.0 (< -0.6)
    assert Sampler()(logits, [row])[0].token_id == 1
    row = SampleRow(SamplingParams(temperature=0.0, repetition_penalty=2.0), [0, 1], [])
    assert Sampler()(logits, [row])[0].token_id == 0  # 1.5 vs 1.25
    row = SampleRow(SamplingParams(temperature=0.0, repetition_penalty=2.0), [0, 1, 2, 3], [])
    out = Sampler()(torch.tensor([[-1.0, -2.0, -0.9, -5.0]]), [row])[0].token_id
    assert out == 2  # -2.0, -4.0, -1.8, -10.0


def test_presence_and_frequency_penalties_use_generated_tokens_only() -> None:
    logits = torch.tensor([[5.0, 4.0, 3.5]])
    # prompt tokens do not count: token 0 repeated in the prompt stays best.
    row = SampleRow(SamplingParams(temperature=0.0, frequency_penalty=2.0), [0, 0, 0], [])
    assert Sampler()(logits, [row])[0].token_id == 0
    # generated twice: 5 - 2*0.6 = 3.8 < 4.0
    row = SampleRow(SamplingParams(temperature=0.0, frequency_penalty=0.6), [], [0, 0])
    assert Sampler()(logits, [row])[0].token_id == 1
    # presence counts once: 5 - 0.9 = 4.1 > 4.0 however often it appeared
    row = SampleRow(SamplingParams(temperature=0.0, presence_penalty=0.9), [], [0, 0, 0])
    assert Sampler()(logits, [row])[0].token_id == 0
    row = SampleRow(SamplingParams(temperature=0.0, presence_penalty=1.1), [], [0])
    assert Sampler()(logits, [row])[0].token_id == 1


def test_suppressed_tokens_are_never_sampled() -> None:
    rs = rows(500, temperature=1.0)
    for r in rs:
        r.suppress_token_ids = [0, 1]
    out = Sampler()(LOGITS.repeat(500, 1), rs)
    assert all(r.token_id not in (0, 1) for r in out)


def test_logprobs_are_raw_and_top_n_sorted() -> None:
    out = Sampler()(LOGITS.unsqueeze(0), rows(1, temperature=0.0, logprobs=3))[0]
    raw = torch.log_softmax(LOGITS, -1)
    assert out.logprobs is not None and out.logprobs.token_id == 0
    assert math.isclose(out.logprobs.logprob, float(raw[0]), rel_tol=1e-5)
    assert [t.token_id for t in out.logprobs.top] == [0, 1, 2]
    assert math.isclose(out.logprobs.top[2].logprob, float(raw[2]), rel_tol=1e-5)
    # raw: temperature does not change the reported logprobs
    hot = Sampler()(LOGITS.unsqueeze(0), rows(1, temperature=2.0, logprobs=0))[0]
    assert hot.logprobs is not None and hot.logprobs.top == []
    assert math.isclose(hot.logprobs.logprob, float(raw[hot.token_id]), rel_tol=1e-5)


def test_logit_bias_bans_and_forces_tokens() -> None:
    logits = torch.randn(4, 50)
    top = logits.argmax(-1).tolist()
    banned = Sampler()(
        logits,
        [SampleRow(SamplingParams(temperature=0.0, logit_bias={t: -100.0}), [], []) for t in top],
    )
    assert all(r.token_id != t for r, t in zip(banned, top, strict=True))
    forced = Sampler(seed=3)(
        logits, [SampleRow(SamplingParams(temperature=1.0, logit_bias={7: 100.0}), [], [])] * 4
    )
    assert [r.token_id for r in forced] == [7] * 4


def test_logit_bias_leaves_logprobs_raw() -> None:
    logits = torch.randn(1, 50)
    out = Sampler()(
        logits,
        [SampleRow(SamplingParams(temperature=0.0, logprobs=0, logit_bias={3: 100.0}), [], [])],
    )
    assert out[0].token_id == 3
    assert math.isclose(
        out[0].logprobs.logprob, torch.log_softmax(logits[0], -1)[3].item(), rel_tol=1e-5
    )


def test_grammar_bitmask_restricts_rows() -> None:
    import numpy as np

    logits = torch.randn(3, 70)
    mask = np.zeros((2, 3), dtype=np.int32)  # 96 bits >= 70 tokens
    mask[0, 0] = 1 << 5  # row 0 may only pick token 5
    mask[1, 1] = 1 << 2  # row 2 only token 34
    rows = [
        SampleRow(SamplingParams(temperature=1.0), [], [], mask_row=0),
        SampleRow(SamplingParams(temperature=0.0), [], []),
        SampleRow(SamplingParams(temperature=0.0), [], [], mask_row=1),
    ]
    out = Sampler(seed=4)(logits, rows, mask)
    assert [r.token_id for r in out] == [5, int(logits[1].argmax()), 34]
