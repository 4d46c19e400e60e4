"""Model shapes from HF configs, checked against figures worked by hand."""

from __future__ import annotations

import json

import pytest

from tokenfab.factory.modelspec import ModelSpec, bundled_models, load_model_spec


def test_all_bundled_configs_parse():
    names = bundled_models()
    assert len(names) >= 12
    for n in names:
        m = load_model_spec(n)
        assert m.params_total >= m.params_active > 0
        assert m.n_full_attn + m.n_sliding_attn + m.n_linear_attn == m.num_layers


@pytest.mark.parametrize(
    ("name", "total_b", "active_b"),
    [
        ("deepseek-ai/DeepSeek-V3", 671, 37),  # DeepSeek-V3 report: 671B total, 37B active
        ("moonshotai/Kimi-K2.5", 1030, 32.9),  # Kimi K2: 1T total, 32B active
        ("Qwen/Qwen3-235B-A22B-FP8", 235, 22),
        ("meta-llama/Llama-3.1-70B", 70.6, 70.6),
        ("Qwen/Qwen3.5-397B-A17B", 397, 17),
        ("MiniMaxAI/MiniMax-M2.5", 229, 10.5),
    ],
)
def test_param_counts(name, total_b, active_b):
    m = load_model_spec(name)
    assert m.params_total / 1e9 == pytest.approx(total_b, rel=0.04)
    assert m.params_active / 1e9 == pytest.approx(active_b, rel=0.08)


def test_kv_bytes_gqa_by_hand():
    # Llama-3.1-70B: 80 layers x (K and V) x 8 KV heads x 128 dims x 2 bytes
    m = load_model_spec("meta-llama/Llama-3.1-70B")
    assert m.kv_bytes_per_token(2.0) == 80 * 2 * 8 * 128 * 2 == 327_680


def test_kv_bytes_mla_by_hand():
    # DeepSeek-V3 MLA caches the 512-dim latent + 64-dim rope key per layer, 61 layers
    m = load_model_spec("deepseek-ai/DeepSeek-V3")
    assert m.attention == "mla"
    assert m.kv_bytes_per_token(2.0) == 61 * (512 + 64) * 2
    assert m.n_dense_layers == 3 and m.n_moe_layers == 58 and m.shared_ffn_dim == 2048


def test_sliding_window_and_linear_state_amortize():
    oss = load_model_spec("openai/gpt-oss-120b")
    assert oss.n_sliding_attn == 18 and oss.sliding_window == 128
    # at 8k context the 18 sliding layers hold only their 128-token window
    full = oss.kv_bytes_per_token(1.0)
    assert oss.kv_bytes_per_token(1.0, ctx=8192) == pytest.approx(full * (1 + 128 / 8192))
    q35 = load_model_spec("Qwen/Qwen3.5-397B-A17B")
    assert q35.n_linear_attn == 45 and q35.n_full_attn == 15
    assert q35.kv_bytes_per_token(2.0, ctx=10**9) == pytest.approx(
        q35.kv_bytes_per_token(2.0), rel=1e-4
    )
    # each gated delta-net layer keeps a 64 heads x 128 x 128 fp32 state per sequence
    assert q35.linear_state_bytes() == 64 * 128 * 128 * 4


def test_flops_per_token_is_two_per_param():
    m = load_model_spec("meta-llama/Llama-3.1-8B-Instruct")
    matmul = m.params_total - m.vocab * m.hidden
    assert m.flops_per_token(0) == pytest.approx(2 * matmul)
    assert m.flops_per_token(4096) > m.flops_per_token(0)


def test_quantized_and_instruct_names_map_to_base_shapes():
    assert load_model_spec("nvidia/DeepSeek-R1-NVFP4").name == "deepseek-ai/DeepSeek-R1"
    assert load_model_spec("nvidia/Qwen3-32B-NVFP4").name == "Qwen/Qwen3-32B"
    with pytest.raises(KeyError, match="unknown model"):
        load_model_spec("acme/NoSuchModel-7B")


def test_from_path(tmp_path):
    cfg = {
        "model_type": "llama",
        "num_hidden_layers": 2,
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "vocab_size": 100,
        "tie_word_embeddings": True,
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    m = load_model_spec(str(tmp_path))
    attn = 64 * 64 + 2 * 64 * 32 + 64 * 64  # q, k+v (2 heads x 16), o
    assert m.params_total == 2 * (attn + 3 * 64 * 128) + 100 * 64
    assert ModelSpec.from_hf_config(cfg, "x").kv_bytes_per_token(2.0) == 2 * 2 * 2 * 16 * 2
