"""`tokenfab twin profile`: the least-squares fit, and the command on a tiny real model."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tokenfab.cli import app
from tokenfab.engine.core.batch import SeqChunk, StepBatch
from tokenfab.twin.profile import ProfileGrid, StepSample, features, fit
from tokenfab.twin.step_time import LinearStepTime


def test_fit_recovers_the_coefficients_of_noise_free_steps() -> None:
    truth = LinearStepTime(
        base_s=0.003, per_prefill_token_s=2e-5, per_decode_seq_s=4e-4, per_context_token_s=1e-7
    )
    rng = random.Random(0)
    samples = []
    for _ in range(40):
        p, d, c = rng.randrange(0, 600), rng.randrange(0, 40), rng.randrange(0, 20000)
        secs = truth.base_s + p * 2e-5 + d * 4e-4 + c * 1e-7
        samples.append(StepSample(p, d, c, secs))
    result = fit(samples)
    got = result.step_time
    assert got.base_s == pytest.approx(truth.base_s, rel=1e-6)
    assert got.per_prefill_token_s == pytest.approx(truth.per_prefill_token_s, rel=1e-6)
    assert got.per_decode_seq_s == pytest.approx(truth.per_decode_seq_s, rel=1e-6)
    assert got.per_context_token_s == pytest.approx(truth.per_context_token_s, rel=1e-5)
    assert result.rel_rms_error < 1e-6


def test_fit_keeps_coefficients_non_negative() -> None:
    # Decode steps that get cheaper with batch size would fit a negative slope; the step-time
    # model refuses negative coefficients, so the fit must clamp it to zero instead.
    samples = [StepSample(0, d, 0, 0.01 - d * 1e-5) for d in range(1, 20)]
    samples += [StepSample(n, 0, 0, 0.01 + n * 1e-5) for n in (64, 256, 1024)]
    st = fit(samples).step_time
    assert st.per_decode_seq_s == 0.0
    assert st.per_prefill_token_s > 0


def test_fit_needs_enough_samples() -> None:
    with pytest.raises(ValueError, match="at least 4"):
        fit([StepSample(1, 0, 0, 0.1)])


def test_features_match_what_the_step_time_model_reads() -> None:
    batch = StepBatch(
        [
            SeqChunk(list(range(10)), 32, [0, 1, 2], sample=True),
            SeqChunk([5], 100, [3], sample=True),
            SeqChunk([6], 7, [4], sample=True),
        ]
    )
    assert features(batch) == (10, 2, 139)


def test_grid_rejects_empty_sizes() -> None:
    with pytest.raises(ValueError, match="decode_batches"):
        ProfileGrid(decode_batches=())


def test_profile_command_fits_real_steps_of_a_tiny_model(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "profile.json"
    args = ["twin", "profile", "--model", str(tiny_llama), "--out", str(out), "--json",
            "--prefill-lens", "16,48", "--decode-batches", "1,3", "--context-lens", "24",
            "--decode-steps", "3", "--repeats", "1", "--num-threads", "1"]  # fmt: skip
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output.strip().splitlines()[-1])
    # 2 prefills + 2 decode points of (1 prefill step + 3 decode steps) at least.
    assert doc["samples"] >= 2 + 2 * 3
    saved = LinearStepTime.load(out)
    assert saved.base_s + saved.per_prefill_token_s > 0
    assert doc["profile"]["base_s"] == saved.base_s


def test_profile_command_rejects_a_bad_grid(tmp_path: Path) -> None:
    r = CliRunner().invoke(
        app, ["twin", "profile", "--decode-batches", "x", "--out", str(tmp_path / "p.json")]
    )
    assert r.exit_code == 2
    assert "--decode-batches" in r.output


@pytest.mark.slow
def test_profile_pools_the_steps_of_concurrent_engines(tiny_llama: Path, tmp_path: Path) -> None:
    grid = ["--prefill-lens", "16", "--decode-batches", "2", "--context-lens", "24",
            "--decode-steps", "2", "--repeats", "1", "--num-threads", "1", "--json"]  # fmt: skip
    counts = []
    for engines in (1, 2):
        out = tmp_path / f"p{engines}.json"
        args = ["twin", "profile", "--model", str(tiny_llama), "--out", str(out),
                "--engines", str(engines), *grid]  # fmt: skip
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 0, r.output
        counts.append(json.loads(r.output.strip().splitlines()[-1])["samples"])
    assert counts[1] == 2 * counts[0]
