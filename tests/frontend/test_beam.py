"""Beam search's step and ranking (pure)."""

from __future__ import annotations

from tokenfab.frontend.beam import Beam, advance, best

EOS = frozenset([0])


def test_advance_keeps_the_best_width_by_cumulative_logprob() -> None:
    live = [Beam((5,), -1.0), Beam((6,), -0.5)]
    alternatives = [[(7, -0.1), (8, -2.0)], [(9, -1.0), (0, -0.2)]]
    new_live, finished = advance(live, alternatives, 2, EOS)
    # Candidates: (5,7) -1.1, (5,8) -3.0, (6,9) -1.5, (6,0) -0.7 (EOS: finished).
    assert finished == [Beam((6, 0), -0.7, True)]
    assert new_live == [Beam((5, 7), -1.1)]


def test_best_normalises_by_length_and_ignores_a_final_eos() -> None:
    short = Beam((1, 0), -2.0, finished=True)  # length 10 + 1
    long = Beam((1, 2, 3), -2.0)  # length 10 + 3: -0.154 beats -2/11
    assert best([long, short], 1, 10) == [long]
    assert best([long, short], 2, 10) == [long, short]
