"""Batched token sampling: logit bias, grammar masks, penalties, temperature, top-k / top-p /
min-p, seeds, logprobs.

One call handles a whole step's rows at once with vectorized torch ops; per-row Python work is
limited to building small index tensors. A step whose rows are all greedy without penalties or
logprobs (the common benchmark case) is a single argmax.

Logprobs are those of the model's *raw* distribution (log-softmax of the logits before
penalties, temperature and truncation), as vLLM returns by default; so they do not depend on
the sampling settings and a greedy token's logprob is the model's own.

Random sampling uses the exponential race: argmax(p / E) with E ~ Exp(1) i.i.d. picks index i
with probability p_i. Seeded requests draw E from their own torch.Generator, so their output
depends only on the seed and the logits, never on which other requests share the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from tokenfab.engine.structured import apply_bitmask
from tokenfab.protocol import PositionLogprobs, SamplingParams, TokenLogprob


@dataclass(slots=True)
class SampleRow:
    """What the sampler needs to know about one row of logits."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None = None
    suppress_token_ids: list[int] = field(default_factory=list)
    """Tokens forbidden this step (EOS and stop ids while below min_tokens)."""
    mask_row: int | None = None
    """This row's index into the step's grammar bitmask (None: unconstrained)."""


@dataclass(slots=True)
class SampleResult:
    token_id: int
    logprobs: PositionLogprobs | None = None


def make_generator(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


class Sampler:
    def __init__(self, seed: int = 0) -> None:
        self.generator = make_generator(seed)

    def __call__(
        self, logits: torch.Tensor, rows: list[SampleRow], bitmask: np.ndarray | None = None
    ) -> list[SampleResult]:
        """`bitmask`: the grammar masks of the rows with a `mask_row` (structured.py)."""
        if logits.shape[0] != len(rows):
            raise ValueError(f"{logits.shape[0]} logit rows for {len(rows)} requests")
        if not rows:
            return []
        logits = logits.float()
        want_lp = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        raw_lp = torch.log_softmax(logits[want_lp], dim=-1) if want_lp else None

        fast = not want_lp and all(_plain_greedy(r) for r in rows)
        # Penalties, seeded noise (CPU generators) and masks are built on the host: on a GPU
        # the step's logits come over once (a copy: _sample works in place).
        host = None if fast else logits.to("cpu", copy=True)
        tokens = _argmax(logits).tolist() if host is None else self._sample(host, rows, bitmask)

        results = [SampleResult(t) for t in tokens]
        if raw_lp is not None:
            for j, i in enumerate(want_lp):
                results[i].logprobs = position_logprobs(
                    raw_lp[j], tokens[i], rows[i].params.logprobs or 0
                )
        return results

    def _sample(
        self, logits: torch.Tensor, rows: list[SampleRow], bitmask: np.ndarray | None
    ) -> list[int]:
        _apply_logit_bias(logits, rows)
        _apply_penalties(logits, rows)
        for i, r in enumerate(rows):
            if r.suppress_token_ids:
                logits[i, r.suppress_token_ids] = float("-inf")
        _apply_token_masks(logits, rows)
        masked = [i for i, r in enumerate(rows) if r.mask_row is not None]
        if masked and bitmask is not None:
            order = [rows[i].mask_row for i in masked]
            apply_bitmask(logits, masked, bitmask[order])

        greedy = [r.params.greedy for r in rows]
        tokens = _argmax(logits)
        rand_idx = [i for i, g in enumerate(greedy) if not g]
        if rand_idx:
            sub_rows = [rows[i] for i in rand_idx]
            sub = logits[rand_idx]
            temps = torch.tensor([r.params.temperature for r in sub_rows], dtype=sub.dtype)
            sub = sub / temps.unsqueeze(1)
            sub = _top_k_top_p(sub, sub_rows)
            probs = torch.softmax(sub, dim=-1)
            probs = _min_p(probs, sub_rows)
            noise = torch.empty_like(probs)
            unseeded = [j for j, r in enumerate(sub_rows) if r.generator is None]
            if unseeded:
                noise[unseeded] = torch.empty(
                    len(unseeded), probs.shape[1], dtype=probs.dtype
                ).exponential_(generator=self.generator)
            for j, r in enumerate(sub_rows):
                if r.generator is not None:
                    noise[j].exponential_(generator=r.generator)
            tokens[rand_idx] = _argmax(probs / noise)
        return tokens.tolist()


def _argmax(x: torch.Tensor) -> torch.Tensor:
    """Row-wise argmax (first index of the maximum, like torch). numpy's is ~30x faster than
    torch's on CPU for [batch, vocab] float32, which matters once per decode step."""
    if x.device.type == "cpu" and x.dtype == torch.float32:
        return torch.from_numpy(np.argmax(x.contiguous().numpy(), axis=-1))
    return x.argmax(dim=-1)


def _plain_greedy(r: SampleRow) -> bool:
    p = r.params
    return (
        p.greedy
        and not r.suppress_token_ids
        and r.mask_row is None
        and not p.logit_bias
        and not p.allowed_token_ids
        and not p.bad_words_token_ids
        and p.repetition_penalty == 1.0
        and p.presence_penalty == 0.0
        and p.frequency_penalty == 0.0
    )


def _padded(lists: list[list[int]], pad: int) -> torch.Tensor:
    width = max((len(x) for x in lists), default=0) or 1
    out = torch.full((len(lists), width), pad, dtype=torch.long)
    for i, x in enumerate(lists):
        if x:
            out[i, : len(x)] = torch.tensor(x, dtype=torch.long)
    return out


def _apply_logit_bias(logits: torch.Tensor, rows: list[SampleRow]) -> None:
    """In place, before penalties (OpenAI's and vLLM's order). Ids past the logits' width (a
    tokenizer larger than the model's head) are ignored."""
    vocab = logits.shape[1]
    for i, r in enumerate(rows):
        bias = r.params.logit_bias
        if bias:
            ids = [t for t in bias if t < vocab]
            logits[i, ids] += torch.tensor([bias[t] for t in ids], dtype=logits.dtype)


def _apply_token_masks(logits: torch.Tensor, rows: list[SampleRow]) -> None:
    """In place: vLLM's allowed_token_ids (all else -inf) and bad_words (the word's last token
    -inf while the output ends with the word's other tokens)."""
    vocab = logits.shape[1]
    for i, r in enumerate(rows):
        allowed = r.params.allowed_token_ids
        if allowed:
            keep = torch.full((vocab,), float("-inf"), dtype=logits.dtype)
            ids = [t for t in allowed if t < vocab]
            keep[ids] = 0.0
            logits[i] += keep
        banned = [
            w[-1]
            for w in r.params.bad_words_token_ids
            if w[-1] < vocab and (len(w) == 1 or r.output_token_ids[-(len(w) - 1) :] == w[:-1])
        ]
        if banned:
            logits[i, banned] = float("-inf")


def _apply_penalties(logits: torch.Tensor, rows: list[SampleRow]) -> None:
    """In place. Repetition penalty (HF/vLLM): over prompt + generated tokens, divide positive
    logits and multiply negative ones. Presence / frequency (OpenAI): over generated tokens,
    subtract presence * [count > 0] + frequency * count."""
    vocab = logits.shape[1]
    rep = [i for i, r in enumerate(rows) if r.params.repetition_penalty != 1.0]
    if rep:
        ids = _padded([rows[i].prompt_token_ids + rows[i].output_token_ids for i in rep], vocab)
        seen = torch.zeros(len(rep), vocab + 1, dtype=torch.bool)
        seen.scatter_(1, ids, True)
        seen = seen[:, :vocab]
        pen = torch.tensor([rows[i].params.repetition_penalty for i in rep], dtype=logits.dtype)
        pen = pen.unsqueeze(1)
        sub = logits[rep]
        penalized = torch.where(sub > 0, sub / pen, sub * pen)
        logits[rep] = torch.where(seen, penalized, sub)
    freq = [
        i
        for i, r in enumerate(rows)
        if r.params.presence_penalty != 0.0 or r.params.frequency_penalty != 0.0
    ]
    if freq:
        ids = _padded([rows[i].output_token_ids for i in freq], vocab)
        counts = torch.zeros(len(freq), vocab + 1, dtype=logits.dtype)
        counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=logits.dtype))
        counts = counts[:, :vocab]
        fp = torch.tensor([rows[i].params.frequency_penalty for i in freq], dtype=logits.dtype)
        pp = torch.tensor([rows[i].params.presence_penalty for i in freq], dtype=logits.dtype)
        logits[freq] -= fp.unsqueeze(1) * counts + pp.unsqueeze(1) * (counts > 0).to(logits.dtype)


def _top_k_top_p(logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
    vocab = logits.shape[1]
    ks = [r.params.top_k if r.params.top_k > 0 else vocab for r in rows]
    ps = [r.params.top_p for r in rows]
    if all(k >= vocab for k in ks) and all(p >= 1.0 for p in ps):
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(vocab).unsqueeze(0)
    drop = rank >= torch.tensor(ks).unsqueeze(1)
    if any(p < 1.0 for p in ps):
        probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of strictly better tokens
        drop |= before >= torch.tensor(ps, dtype=probs.dtype).unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def _min_p(probs: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
    mins = [r.params.min_p for r in rows]
    if not any(m > 0.0 for m in mins):
        return probs
    threshold = probs.max(dim=-1, keepdim=True).values * torch.tensor(mins).unsqueeze(1)
    return probs.masked_fill(probs < threshold, 0.0)


def position_logprobs(row_lp: torch.Tensor, token_id: int, top_n: int) -> PositionLogprobs:
    """`token_id`'s logprob and the top `top_n` of one row of log-probabilities."""
    top: list[TokenLogprob] = []
    if top_n > 0:
        values, ids = row_lp.topk(top_n)
        top = [
            TokenLogprob(int(t), float(v))
            for t, v in zip(ids.tolist(), values.tolist(), strict=True)
        ]
    return PositionLogprobs(token_id, float(row_lp[token_id]), top)
