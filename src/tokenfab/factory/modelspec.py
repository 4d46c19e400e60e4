"""Model shapes from a Hugging Face `config.json`: parameter counts, FLOPs and KV bytes.

Covers dense Llama/Qwen, MoE (Qwen3, Qwen3.5 hybrid linear attention, gpt-oss with sliding
windows, MiniMax, GLM with DSA sparse attention) and DeepSeek V3/R1/Kimi (MLA, shared experts,
first dense layers). Counts are per layer kind so the performance model can split them over
tensor, expert and pipeline parallel ranks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path


def _cached(fn):
    """Memoize a no-argument method of a frozen ModelSpec in its instance dict (the perf
    model asks for the same counts millions of times during a search or a fit)."""
    key = "_c_" + fn.__name__

    def get(self):
        d = self.__dict__
        if key not in d:
            d[key] = fn(self)
        return d[key]

    get.__name__, get.__doc__ = fn.__name__, fn.__doc__
    return get


@dataclass(frozen=True)
class ModelSpec:
    name: str
    model_type: str
    num_layers: int
    hidden: int
    vocab: int
    num_heads: int
    num_kv_heads: int
    head_dim: int  # q/k head dim for GQA; for MLA the q/k dim = nope + rope
    v_head_dim: int
    ffn_dim: int  # dense FFN intermediate size (dense layers only)
    tied_embeddings: bool = False
    # attention kind: "gqa" (MHA/GQA/MQA) or "mla"
    attention: str = "gqa"
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_rope_dim: int = 0
    q_gate: bool = False  # Qwen3.5: attention output gate doubles the q projection
    # layer kinds (sum = num_layers)
    n_full_attn: int = 0
    n_sliding_attn: int = 0
    n_linear_attn: int = 0
    sliding_window: int = 0
    sparse_topk: int = 0  # DSA: each query attends to at most this many keys (0 = dense)
    indexer_heads: int = 0
    indexer_dim: int = 0
    # linear attention (gated delta-net) shape
    lin_k_heads: int = 0
    lin_v_heads: int = 0
    lin_k_dim: int = 0
    lin_v_dim: int = 0
    # MoE (n_moe_layers = 0 for dense models)
    n_moe_layers: int = 0
    num_experts: int = 0
    top_k: int = 0
    moe_ffn_dim: int = 0
    shared_ffn_dim: int = 0  # total intermediate size of the always-active shared expert(s)

    # ---- constructors ---------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, cfg: dict, name: str) -> ModelSpec:
        """Build from a config.json dict (multimodal configs use their `text_config`)."""
        top = cfg
        if "text_config" in cfg and "num_hidden_layers" not in cfg:
            cfg = {**cfg["text_config"]}
        mt = str(cfg.get("model_type", top.get("model_type", "")))
        layers = int(cfg["num_hidden_layers"])
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        kv = int(cfg.get("num_key_value_heads") or heads)
        hd = int(cfg.get("head_dim") or hidden // heads)
        tied = bool(cfg.get("tie_word_embeddings", top.get("tie_word_embeddings", False)))
        f: dict = dict(
            name=name,
            model_type=mt,
            num_layers=layers,
            hidden=hidden,
            vocab=int(cfg["vocab_size"]),
            num_heads=heads,
            num_kv_heads=kv,
            head_dim=hd,
            v_head_dim=hd,
            ffn_dim=int(cfg.get("intermediate_size") or 0),
            tied_embeddings=tied,
        )
        if cfg.get("kv_lora_rank"):
            nope = int(cfg.get("qk_nope_head_dim", 128))
            rope = int(cfg.get("qk_rope_head_dim", 64))
            f.update(
                attention="mla",
                q_lora_rank=int(cfg.get("q_lora_rank") or 0),
                kv_lora_rank=int(cfg["kv_lora_rank"]),
                qk_rope_dim=rope,
                head_dim=nope + rope,
                v_head_dim=int(cfg.get("v_head_dim", nope)),
                num_kv_heads=heads,
            )
            if cfg.get("index_topk"):
                f.update(
                    sparse_topk=int(cfg["index_topk"]),
                    indexer_heads=int(cfg.get("index_n_heads", 0)),
                    indexer_dim=int(cfg.get("index_head_dim", 0)),
                )
        # layer kinds
        types = cfg.get("layer_types")
        if types:
            f["n_full_attn"] = sum(t == "full_attention" for t in types)
            f["n_sliding_attn"] = sum(t == "sliding_attention" for t in types)
            f["n_linear_attn"] = sum(t == "linear_attention" for t in types)
        else:
            f["n_full_attn"] = layers
        if f.get("n_sliding_attn"):
            f["sliding_window"] = int(cfg.get("sliding_window") or 0)
        if f.get("n_linear_attn"):
            f.update(
                lin_k_heads=int(cfg["linear_num_key_heads"]),
                lin_v_heads=int(cfg["linear_num_value_heads"]),
                lin_k_dim=int(cfg["linear_key_head_dim"]),
                lin_v_dim=int(cfg["linear_value_head_dim"]),
                q_gate=bool(cfg.get("attn_output_gate", False)),
            )
        # MoE
        n_exp = int(
            cfg.get("n_routed_experts")
            or cfg.get("num_experts")
            or cfg.get("num_local_experts")
            or 0
        )
        if n_exp:
            dense_first = int(cfg.get("first_k_dense_replace", 0) or 0)
            only_mlp = len(cfg.get("mlp_only_layers") or [])
            moe_ffn = int(cfg.get("moe_intermediate_size") or cfg.get("intermediate_size"))
            shared = 0
            if cfg.get("n_shared_experts"):
                shared = int(cfg["n_shared_experts"]) * moe_ffn
            shared = int(
                cfg.get("shared_expert_intermediate_size")
                or cfg.get("shared_intermediate_size")
                or shared
            )
            f.update(
                n_moe_layers=layers - dense_first - only_mlp,
                num_experts=n_exp,
                top_k=int(cfg.get("num_experts_per_tok") or cfg.get("experts_per_token")),
                moe_ffn_dim=moe_ffn,
                shared_ffn_dim=shared,
            )
        return cls(**f)

    # ---- parameter counts (per layer, in parameters) --------------------------------------
    @property
    def n_dense_layers(self) -> int:
        return self.num_layers - self.n_moe_layers

    @property
    def n_softmax_attn(self) -> int:
        return self.n_full_attn + self.n_sliding_attn

    @_cached
    def attn_params(self) -> int:
        """Weights of one softmax-attention layer (q, k, v, o projections)."""
        h = self.hidden
        if self.attention == "mla":
            nh, qk, v = self.num_heads, self.head_dim, self.v_head_dim
            q = (
                h * self.q_lora_rank + self.q_lora_rank * nh * qk
                if self.q_lora_rank
                else h * nh * qk
            )
            kv_a = h * (self.kv_lora_rank + self.qk_rope_dim)
            kv_b = self.kv_lora_rank * nh * (qk - self.qk_rope_dim + v)
            idx = 0
            if self.sparse_topk:
                idx = (
                    h * self.indexer_dim + self.q_lora_rank * self.indexer_heads * self.indexer_dim
                )
            return q + kv_a + kv_b + nh * v * h + idx
        q = h * self.num_heads * self.head_dim * (2 if self.q_gate else 1)
        kv = 2 * h * self.num_kv_heads * self.head_dim
        return q + kv + self.num_heads * self.head_dim * h

    @_cached
    def linear_attn_params(self) -> int:
        """Weights of one gated delta-net layer (Qwen3.5)."""
        h = self.hidden
        k = self.lin_k_heads * self.lin_k_dim
        v = self.lin_v_heads * self.lin_v_dim
        return h * (2 * k + 2 * v) + h * 2 * self.lin_v_heads + v * h

    @_cached
    def dense_ffn_params(self) -> int:
        return 3 * self.hidden * self.ffn_dim

    @_cached
    def expert_params(self) -> int:
        return 3 * self.hidden * self.moe_ffn_dim

    @_cached
    def shared_params(self) -> int:
        return 3 * self.hidden * self.shared_ffn_dim + self.hidden * self.num_experts

    @_cached
    def embed_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    @_cached
    def attn_total(self) -> int:
        return self.n_softmax_attn * self.attn_params() + self.n_linear_attn * (
            self.linear_attn_params()
        )

    @property
    @_cached
    def params_total(self) -> int:
        moe = self.n_moe_layers * (self.num_experts * self.expert_params() + self.shared_params())
        dense = self.n_dense_layers * self.dense_ffn_params()
        return self.attn_total() + moe + dense + self.embed_params()

    @property
    @_cached
    def params_active(self) -> int:
        """Parameters touched per token (routed top-k experts only)."""
        moe = self.n_moe_layers * (self.top_k * self.expert_params() + self.shared_params())
        dense = self.n_dense_layers * self.dense_ffn_params()
        return self.attn_total() + moe + dense + self.embed_params()

    def flops_per_token(self, ctx: int = 0) -> float:
        """Forward FLOPs of one token attending `ctx` keys: 2 per active matmul weight (the
        input embedding is a lookup) plus QK^T and PV over the softmax layers."""
        matmul = self.params_active - self.vocab * self.hidden
        attn = 2.0 * ctx * self.num_heads * (self.head_dim + self.v_head_dim)
        return 2.0 * matmul + self.n_softmax_attn * attn

    @property
    def is_moe(self) -> bool:
        return self.n_moe_layers > 0

    # ---- KV cache ------------------------------------------------------------------------
    @_cached
    def kv_elems_per_token_layer(self) -> int:
        """KV-cache elements one token stores in one softmax-attention layer."""
        if self.attention == "mla":
            extra = self.indexer_dim if self.sparse_topk else 0
            return self.kv_lora_rank + self.qk_rope_dim + extra
        return 2 * self.num_kv_heads * self.head_dim

    def kv_bytes_per_token(self, kv_bytes: float = 2.0, ctx: int | None = None) -> float:
        """KV bytes per token over all layers (sliding layers cap at their window).

        With `ctx` given, returns the average per token of a sequence of that length (sliding
        windows and constant linear-attention states amortized); without, the full-attention
        per-token growth rate.
        """
        per = self.kv_elems_per_token_layer() * kv_bytes
        full = self.n_full_attn * per
        if ctx is None:
            return full
        ctx = max(ctx, 1)
        sw = self.n_sliding_attn * per * min(ctx, self.sliding_window or ctx) / ctx
        lin = self.n_linear_attn * self.linear_state_bytes() / ctx
        return full + sw + lin

    @_cached
    def linear_state_bytes(self) -> float:
        """Recurrent state of one gated delta-net layer per sequence (fp32 state)."""
        return self.lin_v_heads * self.lin_k_dim * self.lin_v_dim * 4.0


_SUFFIXES = ("-nvfp4", "-fp4", "-mxfp4", "-fp8", "-awq", "-int4", "-bf16", "-instruct", "-base")


def _canonical(name: str) -> str:
    """Short name without org, quantization and instruct suffixes: a quantized or instruct
    checkpoint has the base model's shape (e.g. nvidia/DeepSeek-R1-NVFP4 -> deepseek-r1)."""
    n = name.lower().split("/")[-1]
    n = n.removeprefix("meta-")
    changed = True
    while changed:
        changed = False
        for suf in _SUFFIXES:
            if n.endswith(suf):
                n, changed = n[: -len(suf)], True
    return n


def _match_bundled(want: str) -> str | None:
    models = bundled_models()
    for hf in models:
        if want in (hf.lower(), hf.split("/")[-1].lower()):
            return hf
    canon = _canonical(want)
    for hf in models:
        if _canonical(hf) == canon:
            return hf
    return None


def _data_dir():
    return resources.files("tokenfab.factory").joinpath("data/model_configs")


def bundled_models() -> list[str]:
    """HF ids of the bundled configs (file `org--name_config.json` -> `org/name`)."""
    out = []
    for p in _data_dir().iterdir():
        if p.name.endswith("_config.json"):
            out.append(p.name[: -len("_config.json")].replace("--", "/"))
    return sorted(out)


@cache
def load_model_spec(name_or_path: str) -> ModelSpec:
    """A bundled model by HF id (case-insensitive; the short name also works) or a path to a
    config.json / a folder containing one."""
    p = Path(name_or_path)
    if p.is_dir():
        p = p / "config.json"
    if p.suffix == ".json" and p.exists():
        return ModelSpec.from_hf_config(json.loads(p.read_text()), p.parent.name or p.stem)
    want = name_or_path.strip().lower()
    hf = _match_bundled(want)
    if hf is not None:
        fn = hf.replace("/", "--") + "_config.json"
        cfg = json.loads(_data_dir().joinpath(fn).read_text())
        return ModelSpec.from_hf_config(cfg, hf)
    if p.suffix == ".json":
        raise KeyError(f"no such config file: {name_or_path}")
    raise KeyError(
        f"unknown model {name_or_path!r}: not in the bundled catalog; pass the model's "
        f"Hugging Face config.json instead (--model path/to/config.json or a folder holding "
        f"one); bundled: {', '.join(bundled_models())}"
    )
