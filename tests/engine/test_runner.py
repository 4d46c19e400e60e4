"""ModelRunner against transformers' own forward on the same tiny models (float32), on CPU
and (where present) CUDA; transformers' reference always runs on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tokenfab.engine.core.batch import SeqChunk, StepBatch
from tokenfab.engine.model.loader import load_model
from tokenfab.engine.model.runner import ModelRunner, kv_bytes_per_block

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
BLOCK = 16


def _tol(device: str) -> dict[str, float]:
    """CPU float32 mirrors transformers op for op; on CUDA, cuBLAS and the attention kernels
    sum in other orders (still float32, so differences stay ~1e-6 relative)."""
    return {"atol": 2e-5, "rtol": 1e-5} if device == "cpu" else {"atol": 2e-4, "rtol": 1e-4}


def _hf(path: Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def _hf_logits(hf: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_steps_match_transformers(
    tiny_models: dict[str, Path], family: str, device: str
) -> None:
    path = tiny_models[family]
    loaded = load_model(path, dtype="float32", device=device)
    runner = ModelRunner(loaded, num_blocks=40, block_size=BLOCK)
    hf = _hf(path)
    gen = torch.Generator().manual_seed(1)
    a = torch.randint(3, 500, (75,), generator=gen).tolist()  # > mistral's 48-token window
    b = torch.randint(3, 500, (37,), generator=gen).tolist()
    c = torch.randint(3, 500, (5,), generator=gen).tolist()
    ta, tb, tc = [7, 3, 11, 20, 5], [30, 1, 2], [9]
    # Step 1: a non-final prefill chunk (no logits), a full prefill, a one-token prompt.
    out1 = runner.execute(
        StepBatch(
            [
                SeqChunk(a[:50], 0, ta[:4], sample=False),
                SeqChunk(b[:36], 0, tb[:3], sample=True),
                SeqChunk(c[:1], 0, tc, sample=True),
            ]
        )
    )
    # Step 2: decodes mixed with a prefill chunk continuing a cached, non-block-aligned prefix.
    out2 = runner.execute(
        StepBatch(
            [
                SeqChunk(b[36:37], 36, tb, sample=True),
                SeqChunk(a[50:], 50, ta, sample=True),
                SeqChunk(c[1:2], 1, tc, sample=True),
            ]
        )
    )
    # Step 3: the rest of c as a chunk continuing a 2-token prefix.
    out3 = runner.execute(StepBatch([SeqChunk(c[2:], 2, tc, sample=True)]))
    assert out1.shape == (2, 512) and out1.dtype == torch.float32
    assert out2.shape == (3, 512) and out3.shape == (1, 512)
    la, lb, lc = _hf_logits(hf, a), _hf_logits(hf, b), _hf_logits(hf, c)
    pairs = [
        (out1[0], lb[35]),
        (out1[1], lc[0]),
        (out2[0], lb[36]),
        (out2[1], la[74]),
        (out2[2], lc[1]),
        (out3[0], lc[4]),
    ]
    for ours, theirs in pairs:
        torch.testing.assert_close(ours.cpu(), theirs, **_tol(device))


def test_sliding_window_is_applied(tiny_models: dict[str, Path], device: str) -> None:
    """mistral's 48-token window changes logits past 48 tokens (the comparison above means
    something only if the window is honoured by both)."""
    path = tiny_models["mistral"]
    loaded = load_model(path, dtype="float32", device=device)
    ids = torch.randint(3, 500, (70,), generator=torch.Generator().manual_seed(2)).tolist()
    table = list(range(5))
    windowed = ModelRunner(loaded, num_blocks=8, block_size=BLOCK)
    out_w = windowed.execute(StepBatch([SeqChunk(ids, 0, table, sample=True)]))
    for layer in loaded.model.layers:
        layer.window = None
    full = ModelRunner(loaded, num_blocks=8, block_size=BLOCK)
    out_f = full.execute(StepBatch([SeqChunk(ids, 0, table, sample=True)]))
    assert (out_w - out_f).abs().max() > 1e-3
    want = _hf_logits(_hf(path), ids)[-1]
    torch.testing.assert_close(out_w[0].cpu(), want, **_tol(device))


@pytest.mark.parametrize("family", ["qwen3", "mistral"])
def test_batched_greedy_decode_matches_generate(
    tiny_models: dict[str, Path], family: str, device: str
) -> None:
    """Decode-only steps (on CUDA: graph replays, padded 3 -> 4 rows) up to 70 tokens, so
    mistral's 48-token window slides during decode."""
    path = tiny_models[family]
    loaded = load_model(path, dtype="float32", device=device)
    runner = ModelRunner(loaded, num_blocks=32, block_size=BLOCK)
    hf = _hf(path)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 500, (n,), generator=gen).tolist() for n in (3, 17, 40)]
    tables = [list(range(i, i + 5)) for i in (0, 5, 10)]
    seqs = [list(p) for p in prompts]
    logits = runner.execute(
        StepBatch([SeqChunk(p, 0, t, sample=True) for p, t in zip(prompts, tables, strict=True)])
    )
    for _ in range(30):
        nxt = logits.argmax(-1).tolist()
        chunks = []
        for s, t, tok in zip(seqs, tables, nxt, strict=True):
            s.append(tok)
            chunks.append(SeqChunk([tok], len(s) - 1, t, sample=True))
        logits = runner.execute(StepBatch(chunks))
    for p, s in zip(prompts, seqs, strict=True):
        ref = hf.generate(
            torch.tensor([p]), max_new_tokens=30, do_sample=False, eos_token_id=None, pad_token_id=0
        )
        assert s == ref[0].tolist()


def test_bfloat16_close_to_transformers(tiny_models: dict[str, Path], device: str) -> None:
    path = tiny_models["llama"]
    loaded = load_model(path, dtype="bfloat16", device=device)
    runner = ModelRunner(loaded, num_blocks=8, block_size=BLOCK)
    assert runner.kv.dtype == torch.bfloat16
    ids = list(range(3, 60))
    ours = runner.execute(StepBatch([SeqChunk(ids, 0, [0, 1, 2, 3], sample=True)]))[0].cpu()
    theirs = _hf_logits(_hf(path, torch.float32), ids)[-1]
    assert (ours - theirs).abs().max() < 0.05 * theirs.abs().max()


def test_empty_batch_and_bad_block_table(tiny_llama: Path) -> None:
    runner = ModelRunner(load_model(tiny_llama, dtype="float32"), num_blocks=4, block_size=BLOCK)
    assert runner.execute(StepBatch([])).shape == (0, 512)
    with pytest.raises(ValueError, match="block_table"):
        runner.execute(StepBatch([SeqChunk(list(range(20)), 0, [0], sample=True)]))


def test_kv_bytes_per_block(tiny_llama: Path) -> None:
    cfg = load_model(tiny_llama, dtype="float32").config
    # 2 (K and V) * 4 layers * 2 kv heads * 32 head_dim * 4 bytes * 16 tokens
    assert kv_bytes_per_block(cfg, 16) == 2 * 4 * 2 * 32 * 4 * 16
    assert kv_bytes_per_block(cfg, 16, torch.bfloat16) == 2 * 4 * 2 * 32 * 2 * 16


def test_fast_cpu_path_matches_plain_torch(tiny_models: dict[str, Path]) -> None:
    """bfloat16 with C kernels and packed weights vs the same model on plain torch ops."""
    from tokenfab.engine.model.model import build_model

    path = tiny_models["qwen2"]
    fast = load_model(path, dtype="bfloat16")
    plain = load_model(path, dtype="bfloat16")
    plain.model = build_model(path, plain.config, use_kernels=False)
    ids = list(range(3, 50))
    outs = []
    for loaded in (fast, plain):
        runner = ModelRunner(loaded, num_blocks=8, block_size=BLOCK)
        first = runner.execute(StepBatch([SeqChunk(ids, 0, [0, 1, 2, 3], sample=True)]))
        nxt = runner.execute(StepBatch([SeqChunk([9], len(ids), [0, 1, 2, 3], sample=True)]))
        outs.append(torch.cat([first, nxt]))
    scale = outs[1].abs().max()
    assert (outs[0] - outs[1]).abs().max() < 0.03 * scale
    assert torch.equal(outs[0].argmax(-1), outs[1].argmax(-1))


def test_equal_length_fresh_prompts_batched(tiny_models: dict[str, Path], device: str) -> None:
    """Fresh prompts of one length share one causal attention call; each must still only see
    itself."""
    path = tiny_models["llama"]
    loaded = load_model(path, dtype="float32", device=device)
    runner = ModelRunner(loaded, num_blocks=16, block_size=BLOCK)
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 500, (20,), generator=gen).tolist() for _ in range(3)]
    tables = [[0, 1], [2, 3], [4, 5]]
    out = runner.execute(
        StepBatch([SeqChunk(p, 0, t, sample=True) for p, t in zip(prompts, tables, strict=True)])
    )
    hf = _hf(path)
    for row, p in zip(out, prompts, strict=True):
        torch.testing.assert_close(row.cpu(), _hf_logits(hf, p)[-1], **_tol(device))
