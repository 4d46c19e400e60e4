"""Convert a llama.cpp GGUF file into a Hugging Face folder, once, and cache it.

Weights are dequantized with the `gguf` package. llama.cpp's converter permutes the rows of the
Q and K projections of Llama-architecture models (it rotates interleaved pairs, HF rotates
halves); that permutation is undone here so the folder loads in transformers and vLLM as the
original checkpoint would. The tokenizer (with the chat template from the GGUF metadata) is
rebuilt by transformers' GGUF tokenizer converter.

Dtype: the folder holds bfloat16. The 4-bit blocks of Q4_1 carry far less precision than
bfloat16's 8-bit mantissa, so bfloat16 loses nothing that matters, halves memory and disk, is
the original SmolLM2 checkpoint's own dtype, and is the fast matmul type on AMX/AVX512-BF16 CPUs.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

CONVERTER_VERSION = "2"

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_ARCH_TO_MODEL_TYPE = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


def models_cache_dir() -> Path:
    """<user cache dir>/tokenfab/models (TOKENFAB_CACHE_DIR overrides the base)."""
    from platformdirs import user_cache_dir

    base = os.environ.get("TOKENFAB_CACHE_DIR") or user_cache_dir("tokenfab")
    return Path(base) / "models"


def _file_digest(path: Path) -> str:
    import xxhash

    h = xxhash.xxh3_64()
    h.update(CONVERTER_VERSION.encode())
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()[:12]


def display_name(gguf_path: Path) -> str:
    """ "SmolLM2-135M-Instruct.Q4_1.gguf" -> "SmolLM2-135M-Instruct"."""
    return gguf_path.name.split(".")[0]


def converted_dir(gguf_path: Path) -> Path:
    return models_cache_dir() / f"{display_name(gguf_path)}-{_file_digest(gguf_path)}"


def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def unpermute_rope(w: Any, n_head: int) -> Any:
    """Undo llama.cpp's Q/K row permutation (interleaved pairs -> rotate-half layout)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_config(reader: Any) -> dict[str, Any]:
    arch = _field(reader, "general.architecture")
    model_type = _ARCH_TO_MODEL_TYPE.get(arch)
    if model_type is None:
        raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: llama, qwen2, qwen3")

    def a(key: str, default: Any = None) -> Any:
        return _field(reader, f"{arch}.{key}", default)

    heads = a("attention.head_count")
    hidden = a("embedding_length")
    head_dim = a("attention.key_length") or hidden // heads
    n_vocab = a("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    tied = not any(t.name == "output.weight" for t in reader.tensors)
    cfg: dict[str, Any] = {
        "architectures": [
            {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[
                model_type
            ]
        ],
        "model_type": model_type,
        "vocab_size": int(n_vocab),
        "hidden_size": int(hidden),
        "intermediate_size": int(a("feed_forward_length")),
        "num_hidden_layers": int(a("block_count")),
        "num_attention_heads": int(heads),
        "num_key_value_heads": int(a("attention.head_count_kv", heads)),
        "head_dim": int(head_dim),
        "max_position_embeddings": int(a("context_length", 2048)),
        "rms_norm_eps": float(a("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(a("rope.freq_base", 10000.0)),
        "tie_word_embeddings": tied,
        "hidden_act": "silu",
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
        "torch_dtype": "bfloat16",
        "attention_bias": model_type == "qwen2",
    }
    scaling_type = a("rope.scaling.type")
    if scaling_type == "linear":
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": float(a("rope.scaling.factor"))}
    return cfg


def _weights(reader: Any, cfg: dict[str, Any], progress: Any) -> dict[str, Any]:
    import numpy as np
    import torch
    from gguf import quants

    out: dict[str, torch.Tensor] = {}
    permute = cfg["model_type"] == "llama"
    for t in progress(reader.tensors):
        if t.name in _TOP_NAMES:
            name = _TOP_NAMES[t.name]
        else:
            parts = t.name.split(".", 2)
            if parts[0] != "blk" or parts[2] not in _LAYER_NAMES:
                raise ValueError(f"unexpected GGUF tensor {t.name!r}")
            name = f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
        w = np.asarray(quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        w = w.reshape([int(d) for d in reversed(t.shape)])
        if permute and name.endswith(("q_proj.weight", "q_proj.bias")):
            w = unpermute_rope(w, cfg["num_attention_heads"])
        elif permute and name.endswith(("k_proj.weight", "k_proj.bias")):
            w = unpermute_rope(w, cfg["num_key_value_heads"])
        out[name] = torch.tensor(w, dtype=torch.float32).to(torch.bfloat16)  # copies
    return out


def _progress_iter(items: list[Any], description: str) -> Any:
    from rich.progress import track

    return track(items, description=description, transient=True, disable=not sys.stderr.isatty())


def _portable_tokenizer_config(folder: Path, template: str | None, max_len: int) -> None:
    """Make tokenizer_config.json loadable by older transformers too (vLLM's virtualenv pins its
    own): the generic fast-tokenizer class instead of transformers 5's "TokenizersBackend",
    the chat template inline (older versions ignore chat_template.jinja), a real max length."""
    path = folder / "tokenizer_config.json"
    data = json.loads(path.read_text())
    for key in ("backend", "is_local", "local_files_only"):
        data.pop(key, None)
    data["tokenizer_class"] = "PreTrainedTokenizerFast"
    data["model_max_length"] = max_len
    if template:
        data["chat_template"] = template
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False))


def convert_gguf(gguf_path: str | Path, out_dir: Path | None = None) -> Path:
    """Convert (or reuse the cached conversion of) `gguf_path`; returns the HF folder."""
    gguf_path = Path(gguf_path).resolve()
    target = out_dir or converted_dir(gguf_path)
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    from gguf import GGUFReader
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    reader = GGUFReader(gguf_path)
    cfg = _hf_config(reader)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        weights = _weights(reader, cfg, lambda xs: _progress_iter(xs, "Dequantizing GGUF"))
        save_file(weights, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        template = _field(reader, "tokenizer.chat_template")
        if template:
            tok.chat_template = template
        tok.save_pretrained(tmp)
        _portable_tokenizer_config(tmp, template, cfg["max_position_embeddings"])
        source = {"gguf": str(gguf_path), "name": display_name(gguf_path)}
        (tmp / "tokenfab_source.json").write_text(json.dumps(source, indent=2))
        try:
            tmp.rename(target)
        except OSError:
            # Another process finished the same conversion first; use theirs.
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
