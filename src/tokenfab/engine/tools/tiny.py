"""Tiny random-weight models in Hugging Face format, for tests and demos.

`make_tiny_model(dir, family)` writes config.json, generation_config.json, model.safetensors and
a byte-level BPE tokenizer (trained on a small built-in text, so any text round-trips) with a
ChatML template. The configs exercise each family's quirks: qwen2 has q/k/v biases, qwen3 q/k
RMSNorm, llama uses llama3 RoPE scaling, mistral a sliding window; some tie their embeddings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TINY_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB_SIZE = 512

_CORPUS = """
The quick brown fox jumps over the lazy dog. What is the capital of France? Paris is the
capital of France. A paged attention engine stores keys and values in fixed-size blocks.
Hello, world! How are you today? I am fine, thank you. Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 2024.
Tokens flow from the prompt through the model, one step at a time, until the end of text.
The factory turns GPUs into tokens; the planner sizes the prefill and decode pools.
def main(): return sum(range(10))  # code is text too
Once upon a time there was a small model that answered every question with care.
"""


def _tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
        pad_token="<|endoftext|>",
        unk_token=None,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)


def _config(family: str, vocab_size: int, eos: int, bos: int, **overrides: Any) -> Any:
    from transformers import AutoConfig

    common: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rms_norm_eps=1e-6,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=0,
        initializer_range=0.05,
    )
    per_family: dict[str, dict[str, Any]] = {
        "llama": dict(
            tie_word_embeddings=False,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 256,
            },
        ),
        "mistral": dict(tie_word_embeddings=False, rope_theta=10000.0, sliding_window=48),
        "qwen2": dict(tie_word_embeddings=True, rope_theta=1000000.0, num_key_value_heads=4),
        "qwen3": dict(tie_word_embeddings=True, rope_theta=1000000.0, head_dim=48),
    }
    return AutoConfig.for_model(family, **{**common, **per_family[family], **overrides})


def make_tiny_model(
    dir: str | Path,
    family: str,
    seed: int = 0,
    dtype: str = "float32",
    device: str = "cpu",
    **overrides: Any,
) -> Path:
    """Write a random-weight HF model of `family` (a few million parameters) into `dir`.

    `overrides` replace config fields (e.g. a real model's shapes, for benchmarks: the weights
    are then initialised on `device` in `dtype`, far faster on a GPU than on a CPU). The
    tokenizer keeps its 512 tokens; ids beyond them decode to nothing."""
    if family not in TINY_FAMILIES:
        raise ValueError(f"family must be one of {', '.join(TINY_FAMILIES)}, not {family!r}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    path = Path(dir)
    path.mkdir(parents=True, exist_ok=True)
    _tokenizer(path)
    tok = AutoTokenizer.from_pretrained(path)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    bos = tok.convert_tokens_to_ids("<|im_start|>")
    cfg = _config(family, overrides.pop("vocab_size", VOCAB_SIZE), eos, bos, **overrides)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
    with torch.no_grad():
        # Default init leaves norms at 1 and biases at 0; perturb them so the
        # family-specific parameters actually matter in the equality tests.
        gen = torch.Generator().manual_seed(seed + 1)
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_((torch.randn(p.shape, generator=gen) * 0.1).to(p.device, p.dtype))
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model.save_pretrained(path, safe_serialization=True)
    GenerationConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=0).save_pretrained(path)
    return path
