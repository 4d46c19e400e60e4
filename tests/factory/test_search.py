"""The deployment search: valid layouts, GPU budget, limits, frontier."""

from __future__ import annotations

import pytest

from tokenfab.factory.catalog import get_system
from tokenfab.factory.modelspec import load_model_spec
from tokenfab.factory.search import (
    PlanError,
    PlanQuery,
    checkpoint_precision,
    enumerate_layouts,
    run_search,
)
from tokenfab.factory.serving import AggDeployment, DisaggDeployment


@pytest.fixture(scope="module")
def r1_gb200():
    q = PlanQuery(
        load_model_spec("deepseek-ai/DeepSeek-R1"),
        get_system("gb200"),
        72,
        1024,
        1024,
        ttft_ms=2000,
        tpot_ms=30,
        precision="fp8",
    )
    return run_search(q)


def test_layouts_are_valid_for_model_and_system() -> None:
    llama = load_model_spec("meta-llama/Llama-3.1-70B")
    h200 = get_system("h200")
    lays = enumerate_layouts(llama, h200, 16, "bf16")
    assert lays
    for lay in lays:
        assert lay.num_gpus <= 16
        assert lay.tp <= h200.scaleup_size
        assert llama.num_heads % lay.tp == 0
        assert llama.num_kv_heads % lay.tp == 0 or lay.tp % llama.num_kv_heads == 0
        assert lay.attn_dp == 1 and lay.ep == 1  # dense: replicas, not attention-DP
    r1 = load_model_spec("deepseek-ai/DeepSeek-R1")
    for lay in enumerate_layouts(r1, get_system("gb200"), 72, "fp8"):
        assert r1.num_experts % lay.ep == 0
        assert lay.moe_tp_size * lay.ep == lay.tp * lay.attn_dp
        assert lay.num_gpus <= 72


def test_search_respects_gpu_budget_and_limits(r1_gb200) -> None:
    r = r1_gb200
    assert r.candidates and r.best is not None
    for c in r.candidates:
        assert c.gpus_used <= 72
        d = c.deployment
        if isinstance(d, AggDeployment):
            assert d.layout.num_gpus * c.replicas <= 72
        else:
            assert isinstance(d, DisaggDeployment)
            unit = d.prefill_layout.num_gpus * d.prefill_workers
            unit += d.decode_layout.num_gpus * d.decode_workers
            assert unit * c.replicas <= 72
    b = r.best
    assert b.prediction.ttft_ms <= 2000 and b.prediction.tpot_ms <= 30
    # the best is the most productive point within the limits
    within = [c for c in r.candidates if c.meets(2000, 30)]
    assert b.tokens_per_s_per_gpu == max(c.tokens_per_s_per_gpu for c in within)
    assert {c.mode for c in r.candidates} == {"agg", "disagg"}


def test_frontier_is_not_dominated(r1_gb200) -> None:
    front = r1_gb200.frontier
    assert len(front) >= 3
    for f in front:
        for c in r1_gb200.candidates:
            better = (
                c.tokens_per_s_per_user >= f.tokens_per_s_per_user
                and c.tokens_per_s_per_gpu >= f.tokens_per_s_per_gpu
                and (
                    c.tokens_per_s_per_user > f.tokens_per_s_per_user
                    or c.tokens_per_s_per_gpu > f.tokens_per_s_per_gpu
                )
            )
            assert not better
    # tokens/s per MW is tokens/s per GPU over the all-in power per GPU
    f = front[0]
    assert f.tokens_per_s_per_mw == pytest.approx(f.tokens_per_s_per_gpu * 1e6 / 1830.0, rel=0.05)


def test_tight_limits_change_the_best() -> None:
    spec, sysm = load_model_spec("meta-llama/Llama-3.1-8B-Instruct"), get_system("h100")
    loose = run_search(PlanQuery(spec, sysm, 8, 1024, 256, precision="bf16"))
    tight = run_search(PlanQuery(spec, sysm, 8, 1024, 256, tpot_ms=8.0, precision="bf16"))
    assert tight.best is not None and tight.best.prediction.tpot_ms <= 8.0
    assert loose.best is not None
    assert tight.best.tokens_per_s_per_gpu <= loose.best.tokens_per_s_per_gpu
    impossible = run_search(PlanQuery(spec, sysm, 8, 1024, 256, tpot_ms=0.01, precision="bf16"))
    assert impossible.best is None and impossible.notes


def test_one_gpu_is_aggregated_only() -> None:
    spec, sysm = load_model_spec("meta-llama/Llama-3.1-8B-Instruct"), get_system("h100")
    r = run_search(PlanQuery(spec, sysm, 1, 512, 128, precision="bf16"))
    assert {c.mode for c in r.candidates} == {"agg"}
    assert all(c.gpus_used == 1 for c in r.candidates)
    assert any("2 GPUs" in n for n in r.notes)


def test_bad_questions_raise_plan_error() -> None:
    r1 = load_model_spec("deepseek-ai/DeepSeek-R1")
    with pytest.raises(PlanError, match="does not fit"):
        run_search(PlanQuery(r1, get_system("h100"), 4, 1024, 1024, precision="fp8"))
    with pytest.raises(PlanError, match="gpus"):
        run_search(PlanQuery(r1, get_system("gb200"), 0, 1024, 1024))
    with pytest.raises(PlanError, match="precision"):
        run_search(PlanQuery(r1, get_system("gb200"), 8, 1024, 1024, precision="int3"))


def test_checkpoint_precision() -> None:
    assert checkpoint_precision("deepseek-ai/DeepSeek-R1") == "fp8"
    assert checkpoint_precision("meta-llama/Llama-3.1-70B") == "bf16"
    assert checkpoint_precision("openai/gpt-oss-120b") == "fp4"
    assert checkpoint_precision("nvidia/DeepSeek-V3.1-NVFP4") == "fp4"


def test_best_batch_is_refined_to_the_limit() -> None:
    from tokenfab.factory.params import bundled_calibration
    from tokenfab.factory.search import Candidate, _with_batch
    from tokenfab.factory.serving import predict

    spec, sysm = load_model_spec("meta-llama/Llama-3.1-70B"), get_system("h200")
    q = PlanQuery(spec, sysm, 8, 1024, 1024, ttft_ms=2000, tpot_ms=30, precision="bf16")
    r = run_search(q, bundled_calibration())
    b = r.best
    assert b is not None and b.meets(2000, 30)
    d = b.deployment
    dp = (d.layout if isinstance(d, AggDeployment) else d.decode_layout).attn_dp
    size = d.concurrency if isinstance(d, AggDeployment) else d.decode_batch
    nxt = _with_batch(d, size + dp)  # one more sequence per rank
    p = predict(spec, sysm, nxt, bundled_calibration())
    c = Candidate(b.mode, nxt, p, b.replicas, 8, sysm.allin_power_w)
    assert not (p.fits and c.meets(2000, 30) and c.tokens_per_s_per_gpu > b.tokens_per_s_per_gpu)
