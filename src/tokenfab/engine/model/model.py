"""Llama-family decoder (Llama, Mistral, Qwen2, Qwen3) running over a paged KV cache.

Weights come from a Hugging Face folder; Q/K/V and gate/up projections are fused at load so a
layer does three large matmuls instead of seven. The float32 arithmetic mirrors transformers'
modeling code op for op (RMSNorm in float32, RoPE tables, SDPA), so greedy outputs match.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from tokenfab.engine.model.attention import AttentionMetadata, paged_attention

if TYPE_CHECKING:
    from tokenfab.engine.model.cpu_kernels import CpuKernels
    from tokenfab.engine.model.triton_kernels import TritonKernels

FAMILIES = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
}
"""HF `model_type` -> family served by this module."""


@dataclass
class ModelConfig:
    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    dtype: torch.dtype
    """The dtype the weights are held and computed in."""
    eos_token_ids: list[int]
    bos_token_id: int | None
    intermediate_size: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    attention_bias: bool
    qk_norm: bool
    layer_windows: list[int | None]
    """Sliding-window size of each layer (None: full causal attention)."""
    native_dtype: torch.dtype
    """The dtype the checkpoint declares (what dtype="auto" means)."""
    hf_config: Any = field(repr=False, default=None)


def _dtype_from_name(name: str | None) -> torch.dtype:
    if not name:
        return torch.float32
    dt = getattr(torch, str(name).replace("torch.", ""), None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown torch dtype in config: {name!r}")
    return dt


def resolve_dtype(requested: str | torch.dtype, native: torch.dtype) -> torch.dtype:
    """ "auto" -> the checkpoint's dtype; otherwise the named dtype."""
    if isinstance(requested, torch.dtype):
        return requested
    if requested == "auto":
        return native
    if requested not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, not {requested!r}")
    return getattr(torch, requested)


def _eos_ids(path: Path, hf_config: Any) -> list[int]:
    ids: list[int] = []
    gen = path / "generation_config.json"
    sources = [json.loads(gen.read_text()).get("eos_token_id")] if gen.exists() else []
    sources.append(getattr(hf_config, "eos_token_id", None))
    for src in sources:
        for i in src if isinstance(src, list) else [src]:
            if isinstance(i, int) and i not in ids:
                ids.append(i)
    return ids


def load_model_config(path: Path, dtype: str | torch.dtype = "auto") -> ModelConfig:
    """Read config.json (+ generation_config.json) of an HF folder."""
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(path)
    family = FAMILIES.get(hf.model_type)
    if family is None:
        raise ValueError(
            f"unsupported model_type {hf.model_type!r} in {path}; supported: {sorted(FAMILIES)}"
        )
    heads = hf.num_attention_heads
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
    window = getattr(hf, "sliding_window", None)
    if family in ("qwen2", "qwen3") and not getattr(hf, "use_sliding_window", False):
        window = None
    layer_types = getattr(hf, "layer_types", None) or ["full_attention"] * hf.num_hidden_layers
    if family == "mistral":
        windows = [window] * hf.num_hidden_layers
    else:
        windows = [window if t == "sliding_attention" else None for t in layer_types]
    native = _dtype_from_name(
        getattr(hf, "dtype", None) or getattr(hf, "torch_dtype", None) or "float32"
    )
    return ModelConfig(
        family=family,
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        num_layers=hf.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(hf, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        max_position_embeddings=hf.max_position_embeddings,
        dtype=resolve_dtype(dtype, native),
        eos_token_ids=_eos_ids(path, hf),
        bos_token_id=getattr(hf, "bos_token_id", None),
        intermediate_size=hf.intermediate_size,
        rms_norm_eps=hf.rms_norm_eps,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        attention_bias=family == "qwen2" or bool(getattr(hf, "attention_bias", False)),
        qk_norm=family == "qwen3",
        layer_windows=windows,
        native_dtype=native,
        hf_config=hf,
    )


def rope_tables(cfg: ModelConfig, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [max_positions, head_dim] in float32, computed exactly as transformers does."""
    hf = cfg.hf_config
    params = getattr(hf, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        base = params.get("rope_theta", getattr(hf, "rope_theta", 10000.0))
        dim = cfg.head_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        scaling = 1.0
    else:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        if rope_type not in ROPE_INIT_FUNCTIONS:
            raise ValueError(f"unsupported rope_type {rope_type!r}")
        # dynamic NTK would change with sequence length; within the original context it equals
        # its initial frequencies, which is what this table holds.
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf, None)
    positions = torch.arange(cfg.max_position_embeddings, dtype=torch.float)
    freqs = positions[:, None] * inv_freq.float()[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scaling).to(device), (emb.sin() * scaling).to(device)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, window: int | None) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.window = window
        self.scale = cfg.head_dim**-0.5
        q_out = cfg.num_heads * cfg.head_dim
        kv_out = cfg.num_kv_heads * cfg.head_dim
        self.q_size, self.kv_size = q_out, kv_out
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.qkv = nn.Linear(cfg.hidden_size, q_out + 2 * kv_out, bias=cfg.attention_bias)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.o_proj = nn.Linear(q_out, cfg.hidden_size, bias=False)
        self.post_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gate_up = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.intermediate = cfg.intermediate_size

    def forward(
        self, x: torch.Tensor, step: StepInputs, k_cache: torch.Tensor, v_cache: torch.Tensor
    ) -> torch.Tensor:
        if step.fused is not None:
            return self._forward_fused(x, step, step.fused, k_cache, v_cache)
        if step.gpu is not None:
            return self._forward_gpu(x, step, step.gpu, k_cache, v_cache)
        t = x.shape[0]
        h = self.input_norm(x)
        q, k, v = self._split_qkv(self.qkv(h), t)
        assert step.cos is not None and step.sin is not None
        q = _rotate(q, step.cos, step.sin)
        k = _rotate(k, step.cos, step.sin)
        attn = paged_attention(
            q, k, v, k_cache, v_cache, step.meta, self.scale, self.window, step.kernels
        )
        x = x + self.o_proj(attn)
        h = self.gate_up(self.post_norm(x))
        gate, up = h[:, : self.intermediate], h[:, self.intermediate :]
        return x + self.down(F.silu(gate) * up)

    def _split_qkv(
        self, qkv: torch.Tensor, t: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q = qkv[:, : self.q_size].view(t, self.num_heads, self.head_dim)
        k = qkv[:, self.q_size : self.q_size + self.kv_size].view(t, self.num_kv_heads, -1)
        v = qkv[:, self.q_size + self.kv_size :].view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q = self.q_norm(q)
            k = self.k_norm(k)
        return q, k, v

    def _forward_gpu(
        self,
        x: torch.Tensor,
        step: StepInputs,
        kern: TritonKernels,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
    ) -> torch.Tensor:
        """On GPUs: the torch path's math with its elementwise chains fused into Triton
        kernels (a decode step's time is mostly kernel count); `x` is updated in place."""
        t = x.shape[0]
        h = kern.add_rms_norm(x, None, self.input_norm.weight, self.input_norm.eps)
        q, k, v = self._split_qkv(self.qkv(h), t)
        q = kern.rope(q, step.positions, step.cos_table, step.sin_table)
        k = kern.rope(k, step.positions, step.cos_table, step.sin_table)
        attn = paged_attention(q, k, v, k_cache, v_cache, step.meta, self.scale, self.window, kern)
        h = kern.add_rms_norm(x, self.o_proj(attn), self.post_norm.weight, self.post_norm.eps)
        x.add_(self.down(kern.silu_mul(self.gate_up(h))))
        return x

    def _forward_fused(
        self,
        x: torch.Tensor,
        step: StepInputs,
        kern: CpuKernels,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
    ) -> torch.Tensor:
        """bfloat16 on CPU: the same math with fused C kernels for the elementwise chains;
        `x` (the residual stream, owned by this step) is updated in place."""
        t = x.shape[0]
        h = kern.add_rms_norm(x, None, self.input_norm.weight, self.input_norm.eps)
        q, k, v = self._split_qkv(self.qkv(h), t)
        kern.rope(q, step.positions, step.cos_table, step.sin_table)
        kern.rope(k, step.positions, step.cos_table, step.sin_table)
        attn = paged_attention(q, k, v, k_cache, v_cache, step.meta, self.scale, self.window, kern)
        h = kern.add_rms_norm(x, self.o_proj(attn), self.post_norm.weight, self.post_norm.eps)
        x.add_(self.down(kern.silu_mul(self.gate_up(h))))
        return x


@dataclass
class StepInputs:
    """Per-step tensors every layer reads."""

    positions: torch.Tensor
    meta: AttentionMetadata
    cos: torch.Tensor | None
    """Per-token cos [T, 1, D] in the model dtype (torch path only)."""
    sin: torch.Tensor | None
    cos_table: torch.Tensor
    """Full float32 tables [max_positions, D] (fused path)."""
    sin_table: torch.Tensor
    kernels: CpuKernels | TritonKernels | None
    """Decode-attention kernels reading the paged cache in place (C on CPU, Triton on
    CUDA), or None for the torch path."""
    fused: CpuKernels | None
    """C kernels for the whole layer (CPU bfloat16 only), or None."""
    gpu: TritonKernels | None = None
    """Triton kernels for the whole layer (CUDA), or None."""


class CausalLM(nn.Module):
    """The whole decoder; `forward` runs one step of flattened tokens over the paged cache."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, w) for w in cfg.layer_windows)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.lm_head_packed: nn.Module | None = None
        """A pre-packed copy of lm_head for the full-vocabulary matmul (see PackedLinear)."""
        self.kernels: CpuKernels | None = None
        """Set by `build_model` on CPU when the C kernels are available."""
        self.gpu_kernels: TritonKernels | None = None
        """Set by `build_model` on CUDA when triton is available (decode attention)."""

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        logit_rows: torch.Tensor,
    ) -> torch.Tensor:
        """input_ids/positions [T]; returns float32 logits [len(logit_rows), vocab]."""
        return self.logits(self.hidden(input_ids, positions, meta, kv_caches)[logit_rows])

    def hidden(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        """The decoder stack: final hidden states [T, hidden] before the last norm. Free of
        host synchronisation, so a CUDA graph can capture it for decode steps."""
        x = self.embed(input_ids)
        fused = self.kernels if x.dtype == torch.bfloat16 else None
        tables_only = fused is not None or self.gpu_kernels is not None  # kernels index them
        step = StepInputs(
            positions=positions,
            meta=meta,
            cos=None if tables_only else self.rope_cos[positions].to(x.dtype)[:, None, :],
            sin=None if tables_only else self.rope_sin[positions].to(x.dtype)[:, None, :],
            cos_table=self.rope_cos,
            sin_table=self.rope_sin,
            kernels=self.kernels or self.gpu_kernels,
            fused=fused,
            gpu=self.gpu_kernels,
        )
        for layer, (kc, vc) in zip(self.layers, kv_caches, strict=True):
            x = layer(x, step, kc, vc)
        return x

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Float32 logits of final hidden states `x` [N, hidden]."""
        if x.dtype == torch.float32:
            return self.lm_head(self.norm(x))
        return self._refined_logits(x)

    def _refined_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Float32 logits for a low-precision model: the full vocabulary from the fast
        low-precision matmul, then every candidate close to the row's maximum recomputed in
        float32 from the unrounded final norm.

        Why: bfloat16 logits near 25 are rounded to steps of 0.125, so close candidates often
        tie and greedy decoding picks by token id (SmolLM2 then answers the capital of France
        with "L'Étoile" instead of "The capital ... is Paris"). Recomputing the few candidates
        within a few bfloat16 steps of the maximum costs a handful of dot products per row.
        """
        w = self.norm.weight.float()
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.norm.eps) * w
        head = self.lm_head if self.lm_head_packed is None else self.lm_head_packed
        low = head(h.to(x.dtype))
        rel = 2.0**-5  # several bfloat16 steps (2**-8 relative) below the row maximum
        if self.kernels is not None and low.dtype == torch.bfloat16 and low.is_contiguous():
            logits, rows, cols = self.kernels.logits_candidates(low, rel)
        else:
            logits = low.float()
            top = logits.max(dim=-1, keepdim=True).values
            tol = top.abs().clamp(min=1.0) * rel
            rows, cols = torch.nonzero(logits >= top - tol, as_tuple=True)
        exact = (h[rows] * self.lm_head.weight[cols].float()).sum(-1)
        logits[rows, cols] = exact
        return logits


class PackedLinear(nn.Module):
    """A bias-optional linear layer whose weight is pre-packed in oneDNN's blocked layout.

    Why: a plain bfloat16 `F.linear` on CPU re-packs the weight on every call; with 30 layers
    of weights streaming through the caches each decode step, packing once at load makes the
    small-batch (decode) matmuls about 1.6x faster. The packed copy replaces the plain weight.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 2048)
        self.bias = linear.bias
        self.out_features = linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def _pack_linears(model: CausalLM) -> None:
    """Swap every layer's projections for pre-packed ones (CPU bfloat16 with oneDNN)."""
    for layer in model.layers:
        for name in ("qkv", "o_proj", "gate_up", "down"):
            setattr(layer, name, PackedLinear(getattr(layer, name)))
    model.lm_head_packed = PackedLinear(model.lm_head)


def _can_pack(device: torch.device | str, dtype: torch.dtype) -> bool:
    if torch.device(device).type != "cpu" or dtype != torch.bfloat16:
        return False
    try:
        return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):
        return False


def _hf_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {path}")
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        weights.update(load_file(f))
    return {k.removeprefix("model."): v for k, v in weights.items()}


def _fused_state(cfg: ModelConfig, w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map HF parameter names onto this module's fused layout."""
    out: dict[str, torch.Tensor] = {
        "embed.weight": w["embed_tokens.weight"],
        "norm.weight": w["norm.weight"],
    }
    head = w.get("lm_head.weight")
    out["lm_head.weight"] = w["embed_tokens.weight"] if head is None else head
    for i in range(cfg.num_layers):
        p, a, m = f"layers.{i}.", f"layers.{i}.self_attn.", f"layers.{i}.mlp."
        out[p + "input_norm.weight"] = w[p + "input_layernorm.weight"]
        out[p + "post_norm.weight"] = w[p + "post_attention_layernorm.weight"]
        out[p + "qkv.weight"] = torch.cat(
            [w[a + "q_proj.weight"], w[a + "k_proj.weight"], w[a + "v_proj.weight"]]
        )
        if cfg.attention_bias:
            out[p + "qkv.bias"] = torch.cat(
                [w[a + "q_proj.bias"], w[a + "k_proj.bias"], w[a + "v_proj.bias"]]
            )
        if cfg.qk_norm:
            out[p + "q_norm.weight"] = w[a + "q_norm.weight"]
            out[p + "k_norm.weight"] = w[a + "k_norm.weight"]
        out[p + "o_proj.weight"] = w[a + "o_proj.weight"]
        out[p + "gate_up.weight"] = torch.cat([w[m + "gate_proj.weight"], w[m + "up_proj.weight"]])
        out[p + "down.weight"] = w[m + "down_proj.weight"]
    return out


def build_model(
    path: Path, cfg: ModelConfig, device: torch.device | str = "cpu", use_kernels: bool = True
) -> CausalLM:
    """Instantiate the decoder and load an HF folder's safetensors into it."""
    with torch.device("meta"):
        model = CausalLM(cfg)
    state = _fused_state(cfg, _hf_weights(path))
    converted: dict[int, torch.Tensor] = {}  # keeps tied embeddings one tensor
    for k, v in state.items():
        if id(v) not in converted:
            converted[id(v)] = v.to(device=device, dtype=cfg.dtype)
        state[k] = converted[id(v)]
    model.load_state_dict(state, strict=True, assign=True)
    cos, sin = rope_tables(cfg, device)
    model.rope_cos, model.rope_sin = cos, sin
    for p in model.parameters():
        p.requires_grad_(False)
    if use_kernels and _can_pack(device, cfg.dtype):
        _pack_linears(model)
    if torch.device(device).type == "cpu" and use_kernels:
        from tokenfab.engine.model import cpu_kernels

        fits = (
            cfg.head_dim <= 256
            and cfg.num_heads // cfg.num_kv_heads <= 32
            and cfg.hidden_size <= 8192
        )  # the kernels' fixed per-thread buffers
        model.kernels = cpu_kernels.load() if fits else None
    if torch.device(device).type == "cuda" and use_kernels:
        from tokenfab.engine.model import triton_kernels

        model.gpu_kernels = triton_kernels.load(device)
    del state, converted
    _release_freed_memory()
    return model.eval()


def _release_freed_memory() -> None:
    """Hand the loader's freed temporaries back to the OS (glibc keeps freed heap otherwise;
    measured ~140 MB of resident memory for SmolLM2)."""
    import contextlib
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return
    with contextlib.suppress(OSError, AttributeError):  # AttributeError: not glibc
        ctypes.CDLL(name).malloc_trim(0)
