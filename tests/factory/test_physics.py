"""Roofline physics on cases worked by hand: the calibrated model must never beat physics."""

from __future__ import annotations

import pytest

from tokenfab.factory.catalog import get_system
from tokenfab.factory.modelspec import load_model_spec
from tokenfab.factory.perf import (
    BYTES,
    Layout,
    decode_step_time,
    expected_unique,
    kv_capacity_tokens,
    prefill_time,
    weight_bytes_per_gpu,
)
from tokenfab.factory.serving import AggDeployment, DisaggDeployment, predict, size_disagg_pools


@pytest.fixture(scope="module")
def llama70():
    return load_model_spec("meta-llama/Llama-3.1-70B")


@pytest.fixture(scope="module")
def dsv3():
    return load_model_spec("deepseek-ai/DeepSeek-V3")


def test_decode_batch1_bounded_by_weight_streaming(llama70):
    # Llama-3.1-70B fp8 on one H200: every step streams all 70.6 GB of weights through
    # 4.8 TB/s of HBM, so a token takes at least 14.7 ms.
    h200 = get_system("h200")
    lay = Layout(tp=1, precision="fp8")
    wbytes = weight_bytes_per_gpu(llama70, lay)
    assert wbytes == pytest.approx(llama70.params_total * 1.0)
    bound = wbytes / (h200.hbm_tbps * 1e12)
    assert bound == pytest.approx(0.0147, rel=0.01)
    t = decode_step_time(llama70, h200, lay, batch=1, ctx=1024)
    assert bound < t < 2.0 * bound  # physics floor; not wildly above it either


def test_tp_shares_weight_streaming(llama70):
    h200 = get_system("h200")
    t1 = decode_step_time(llama70, h200, Layout(tp=1), 1, 1024)
    t4 = decode_step_time(llama70, h200, Layout(tp=4), 1, 1024)
    assert t4 < t1  # four GPUs stream a quarter each, minus allreduce and fixed costs
    assert t4 > t1 / 4


def test_prefill_bounded_by_two_flops_per_param(llama70):
    # prefill FLOPs ~ 2 * params * tokens; at fp8 peak of 8 H100s 16k tokens need >= this
    h100 = get_system("h100_sxm")
    tokens = 16 * 1024
    flops = 2 * llama70.params_total * tokens
    bound = flops / (8 * h100.tflops["fp8"] * 1e12)
    t = prefill_time(llama70, h100, Layout(tp=8, precision="fp8"), batch=16, isl=1024)
    assert t > bound
    assert t < 4 * bound  # large prefill is compute bound


def test_moe_active_weights(dsv3):
    # one token touches 8 of 256 experts per MoE layer; a big batch touches them all
    assert expected_unique(256, 8, 1) == pytest.approx(8)
    assert expected_unique(256, 8, 10_000) == pytest.approx(256, rel=1e-6)
    assert 8 < expected_unique(256, 8, 4) < 32
    # DeepSeek-V3 decode at batch 1 on 8 GB200s streams ~active params, far less than total
    gb200 = get_system("gb200")
    lay = Layout(tp=8, ep=8, precision="fp4")
    t1 = decode_step_time(dsv3, gb200, lay, 1, 2048)
    floor_total = dsv3.params_total * BYTES["fp4"] / 8 / (gb200.hbm_tbps * 1e12)
    assert t1 < floor_total  # did not stream all experts
    t256 = decode_step_time(dsv3, gb200, lay, 256, 2048)
    assert t256 > t1


def test_mla_kv_not_split_by_tp_but_gqa_is(dsv3, llama70):
    h200 = get_system("h200")
    # GQA: 8 KV heads split over tp=8 -> 8x the tokens of one GPU's share
    c1 = kv_capacity_tokens(llama70, h200, Layout(tp=8), ctx=2048)
    free = h200.hbm_gb * 1e9 * 0.9 - weight_bytes_per_gpu(llama70, Layout(tp=8)) - 2e9
    assert c1 == pytest.approx(free / (llama70.kv_bytes_per_token(1.0) / 8), rel=1e-6)
    # MLA latent is replicated on every TP rank; attention DP multiplies the capacity
    tp8 = kv_capacity_tokens(dsv3, h200, Layout(tp=8, ep=8), ctx=2048)
    dp8 = kv_capacity_tokens(dsv3, h200, Layout(tp=1, attn_dp=8, ep=8), ctx=2048)
    # (less than 8x: each DP rank also holds a full copy of the attention weights)
    assert 4 * tp8 < dp8 < 8 * tp8


def test_weights_that_do_not_fit(llama70):
    h100 = get_system("h100_sxm")
    assert kv_capacity_tokens(llama70, h100, Layout(tp=1, precision="bf16")) == 0
    p = predict(llama70, h100, AggDeployment(Layout(tp=1, precision="bf16"), 8, 1024, 256))
    assert not p.fits and "weights do not fit" in p.reason
    assert p.tpot_ms > 0  # still predicted


def test_agg_latency_and_throughput_grow_with_concurrency(llama70):
    h200 = get_system("h200")
    lay = Layout(tp=4, precision="fp8")
    p = [predict(llama70, h200, AggDeployment(lay, c, 1024, 1024)) for c in (1, 16, 128)]
    assert p[0].fits and p[2].fits
    assert p[0].ttft_ms < p[1].ttft_ms < p[2].ttft_ms
    assert p[0].tpot_ms < p[1].tpot_ms < p[2].tpot_ms
    assert p[0].tokens_per_s_per_gpu < p[1].tokens_per_s_per_gpu < p[2].tokens_per_s_per_gpu
    assert p[0].tokens_per_s_per_user == pytest.approx(1000 / p[0].tpot_ms)


def test_disagg_rate_matching(dsv3):
    gb200 = get_system("gb200")
    pl = Layout(tp=1, attn_dp=4, ep=4, precision="fp4")
    dl = Layout(tp=1, attn_dp=16, ep=16, precision="fp4")
    small = size_disagg_pools(dsv3, gb200, pl, dl, 64, 8192, 1024)
    big = size_disagg_pools(dsv3, gb200, pl, dl, 4096, 8192, 1024)
    assert big.prefill_workers > small.prefill_workers >= 1
    assert big.decode_workers >= small.decode_workers >= 1
    # too few prefill workers for the load: the prompts queue and TTFT explodes
    starved = DisaggDeployment(
        pl, 1, 1, dl, big.decode_workers, big.decode_batch, 8192, 1024, concurrency=4096
    )
    assert predict(dsv3, gb200, starved).ttft_ms > 5 * predict(dsv3, gb200, big).ttft_ms
    p = predict(dsv3, gb200, big)
    assert p.num_gpus == 4 * big.prefill_workers + 16 * big.decode_workers


def test_host_cost_per_sequence_does_not_shrink_with_tp(llama70):
    # the host prepares, samples and streams every running sequence of a rank each step:
    # 60 more sequences cost at least 60 x seq_us whatever the TP degree, while the GPU work
    # of those rows is split over the TP ranks
    from dataclasses import replace

    from tokenfab.factory.perf import DEFAULT_CAL

    h200 = get_system("h200")
    no_host = replace(DEFAULT_CAL, seq_us=0.0)
    host = replace(DEFAULT_CAL, seq_us=100.0)
    for tp in (1, 8):
        lay = Layout(tp=tp, precision="fp8")
        grow = [
            decode_step_time(llama70, h200, lay, 64, 2048, cal)
            - decode_step_time(llama70, h200, lay, 4, 2048, cal)
            for cal in (no_host, host)
        ]
        assert grow[1] - grow[0] == pytest.approx(60 * 100e-6, rel=1e-9)
    # under attention DP each rank carries its own sequences: the busiest rank's count
    dp = Layout(tp=1, attn_dp=8, precision="fp8")
    t0 = decode_step_time(llama70, h200, dp, 64, 2048, no_host)
    t1 = decode_step_time(llama70, h200, dp, 64, 2048, host)
    assert t1 - t0 == pytest.approx(8 * 100e-6, rel=1e-9)


def test_decode_kernel_costs_per_layer_kind(dsv3, llama70):
    # DeepSeek-V3: 61 MLA layers, 58 of them MoE; Llama-3.1-70B: 80 GQA dense layers. The
    # extra fixed kernel time of MoE and MLA layers lands on decode steps of the models that
    # have them, once per such layer, and not on prefill-free dense GQA steps
    from dataclasses import replace

    from tokenfab.factory.perf import DEFAULT_CAL

    h200 = get_system("h200")
    base = replace(DEFAULT_CAL, moe_layer_us=0.0, mla_layer_us=0.0)
    extra = replace(DEFAULT_CAL, moe_layer_us=7.0, mla_layer_us=11.0)
    lay = Layout(tp=8, precision="fp8")
    d = [decode_step_time(dsv3, h200, lay, 16, 2048, cal) for cal in (base, extra)]
    assert d[1] - d[0] == pytest.approx((58 * 7.0 + 61 * 11.0) * 1e-6, rel=1e-9)
    ll = [decode_step_time(llama70, h200, lay, 16, 2048, cal) for cal in (base, extra)]
    assert ll[1] == pytest.approx(ll[0], rel=1e-12)


def test_first_token_waits_whole_steps_and_the_wave_shrinks_with_few_users(llama70):
    # each step a request waits before its first token adds one decode step to TTFT and
    # nothing to TPOT; with few users each sends many of a benchmark's requests, so the
    # synchronized first wave (queue_weight) is capped at users / bench_requests
    from dataclasses import replace

    from tokenfab.factory.perf import DEFAULT_CAL

    h200 = get_system("h200")
    lay = Layout(tp=4, precision="fp8")
    dep = AggDeployment(lay, 32, 1024, 1024)
    one = replace(DEFAULT_CAL, first_steps=1.0)
    three = replace(DEFAULT_CAL, first_steps=3.0)
    p1, p3 = predict(llama70, h200, dep, one), predict(llama70, h200, dep, three)
    step = decode_step_time(llama70, h200, lay, 32, 1024 + 512, one)
    assert p3.ttft_ms - p1.ttft_ms == pytest.approx(2 * step * 1e3, rel=1e-9)
    assert p3.tpot_ms == pytest.approx(p1.tpot_ms, rel=1e-12)
    # 32 users of a 3,200-request benchmark: a wave share of 1%, well under queue_weight
    big = replace(DEFAULT_CAL, queue_weight=0.25, bench_requests=3200.0)
    none = replace(big, queue_weight=0.01)
    assert predict(llama70, h200, dep, big).ttft_ms == pytest.approx(
        predict(llama70, h200, dep, none).ttft_ms, rel=1e-12
    )
    small = replace(big, bench_requests=32.0)  # one request per user: the cap is queue_weight
    assert predict(llama70, h200, dep, small).ttft_ms > predict(llama70, h200, dep, big).ttft_ms
