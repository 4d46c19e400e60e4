"""The planner's inputs: load-report reduction, forecasters, capacity."""

from __future__ import annotations

import random

import pytest

from tokenfab.planner import Capacity, Ewma, Holt, WorkerView, learn, reduce_reports
from tokenfab.planner.capacity import factory_capacity
from tokenfab.planner.forecast import choose, one_step_errors, scaled_error
from tokenfab.planner.forecast_eval import evaluate
from tokenfab.protocol import LoadReport

VIEWS = (WorkerView("p", "prefill"), WorkerView("d", "decode"))


def test_reports_reduce_to_rates_means_and_queues():
    prev = {
        "p": LoadReport(worker_id="p", requests_finished=10, prompt_tokens=1000,
                        prefix_cache_queries=1000, prefix_cache_hits=100,
                        prefill_tokens_computed=900),
        "d": LoadReport(worker_id="d", requests_finished=10, generation_tokens=500),
    }  # fmt: skip
    cur = {
        "p": LoadReport(worker_id="p", requests_finished=30, prompt_tokens=5000,
                        prefix_cache_queries=5000, prefix_cache_hits=1100,
                        prefill_tokens_computed=3900, queued_prefill_tokens=300, running=2),
        "d": LoadReport(worker_id="d", requests_finished=30, generation_tokens=2500,
                        waiting=4, running=7),
    }  # fmt: skip
    obs = reduce_reports(prev, cur, 10.0, VIEWS, ttft_ms=120.0)
    assert obs.request_rate == pytest.approx(4.0)  # 40 finished in 10 s
    assert obs.prompt_tokens_mean == pytest.approx(100.0)
    assert obs.output_tokens_mean == pytest.approx(50.0)
    assert obs.prefix_hit_rate == pytest.approx(0.25)
    assert obs.prefill_tokens_rate == pytest.approx(300.0)  # 400 tok/s, a quarter cached
    assert obs.decode_tokens_rate == pytest.approx(200.0)
    assert obs.prefill_queue_tokens == 300 and obs.decode_waiting == 4
    assert [w.running for w in obs.workers] == [2, 7]
    assert obs.ttft_ms == 120.0 and obs.count("decode") == 1


def test_prefill_work_is_counted_where_it_ran_not_where_requests_finished():
    # 10 disaggregated requests of 100 prompt tokens: each finishes on the prefill worker
    # (1 token) and on the decode worker, which counts the imported prompt again
    prev = {"p": LoadReport(worker_id="p"), "d": LoadReport(worker_id="d")}
    cur = {
        "p": LoadReport(worker_id="p", requests_finished=10, prompt_tokens=1000,
                        prefill_tokens_computed=1000, generation_tokens=10),
        "d": LoadReport(worker_id="d", requests_finished=10, prompt_tokens=1000,
                        generation_tokens=500),
    }  # fmt: skip
    obs = reduce_reports(prev, cur, 10.0, VIEWS)
    assert obs.prefill_tokens_rate == pytest.approx(100.0)  # not 200
    assert obs.decode_tokens_rate == pytest.approx(51.0)


def test_a_restarted_worker_counts_from_zero_and_a_new_one_whole():
    prev = {"p": LoadReport(worker_id="p", requests_finished=50, prompt_tokens=9000)}
    cur = {
        "p": LoadReport(worker_id="p", requests_finished=5, prompt_tokens=500),  # restarted
        "d": LoadReport(worker_id="d", requests_finished=5, generation_tokens=100),  # new
    }
    obs = reduce_reports(prev, cur, 5.0, VIEWS)
    assert obs.request_rate == pytest.approx(2.0)
    with pytest.raises(ValueError, match="interval"):
        reduce_reports(prev, cur, 0.0, VIEWS)


def test_holt_follows_a_ramp_and_ewma_wins_on_noise():
    ramp = [10.0 * i for i in range(1, 40)]
    assert scaled_error(Holt(0.5, 0.3), ramp) < scaled_error(Ewma(0.5), ramp) / 3
    rng = random.Random(1)
    noise = [100 + rng.gauss(0, 20) for _ in range(200)]
    assert scaled_error(Ewma(0.2), noise) < scaled_error(Holt(0.7, 0.3), noise)
    models = [Ewma(0.2), Holt(0.7, 0.3)]
    assert choose([ramp], models) == models[1]
    assert choose([noise], models) == models[0]


def test_forecasts_seed_from_the_first_value_and_never_go_negative():
    assert one_step_errors(Ewma(0.5), [4.0, 4.0, 4.0]) == [0.0, 0.0]
    h = Holt(0.9, 0.9)
    for x in (100.0, 50.0, 0.0, 0.0):
        h = h.update(x)
    assert h.forecast() == 0.0  # the falling trend would say < 0


def test_forecaster_choice_on_the_bundled_traces():
    res = evaluate(["azure-conv", "azure-code", "mooncake"], 10.0)
    assert res["series"] == 9
    assert res["best"] in res["scaled_mae"]
    assert res["scaled_mae"][res["best"]] == min(res["scaled_mae"].values())


def test_capacity_learns_from_saturated_rates_only():
    cap = Capacity(prefill_tokens_per_s=1000, decode_tokens_per_s=100)
    c2 = learn(cap, prefill_tokens_per_s=2000, decode_tokens_per_s=None)
    assert c2.prefill_tokens_per_s == pytest.approx(1300)
    assert c2.decode_tokens_per_s == 100 and c2.source == "measured"
    with pytest.raises(ValueError, match="> 0"):
        Capacity(prefill_tokens_per_s=0, decode_tokens_per_s=1)


def test_factory_capacity_plans_gpu_pools_before_they_exist():
    cap, pre, dec = factory_capacity("llama-3.1-70b", "h200", 8, 4000, 300, 1000, 30)
    assert cap.source == "factory" and pre.gpus == dec.gpus == 8
    assert pre.latency_ms <= 1000 and dec.latency_ms <= 30
    assert cap.prefill_tokens_per_s > cap.decode_tokens_per_s  # prompts go in parallel
    small, _, _ = factory_capacity("llama-3.1-70b", "h200", 2, 4000, 300, 1000, 30)
    assert small.decode_tokens_per_s < cap.decode_tokens_per_s
    with pytest.raises(ValueError, match="meets"):
        factory_capacity("llama-3.1-70b", "h200", 1, 4000, 300, 1000, 0.5)
