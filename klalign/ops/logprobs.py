"""Sequence log-probabilities (ALGORITHMS.md, Notation).

`s(y) = sum_t log pi(y_t | x, y_<t)` over completion tokens only.

Lean by default: the (B, T, V) logits are never kept. The model runs with `logits_to_keep=1` and
returns its last hidden states; the LM head is applied to the completion positions only, a chunk of
positions at a time under activation checkpointing (the chunked selective log-softmax that TRL's
fused LM head and Liger's fused linear losses also use): backward recomputes a chunk's logits
instead of keeping them (a frozen head, LoRA's, needs no recomputation: each position's gradient with
respect to its hidden state is formed in the forward from the logits it has, `_FrozenHeadLogprobs`).
For a Qwen-size vocabulary (152k) at B 16, T 512 that is the difference
between ~5 GB of fp32 logits kept for backward and one (256, V) chunk at a time. The model and the
head are called as modules, through their wrappers, so DDP's gradient hooks and DeepSpeed's ZeRO-3
gathering work as for any forward. `lean=False` gives the plain path (logits for the positions from
the shortest prompt on, float32, log-softmax never materialised), used where a model's head is not a
plain linear map (soft-capped or scaled logits).
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from klalign.ops.attention import GROUPED_SDPA
from klalign.ops.batching import completion_batch, pack_pairs
from klalign.ops.modules import base_model, text_config, unwrap

TOKEN_CHUNK = 256  # completion tokens whose logits exist at once: (256, V) floats, ~155 MB at V = 152k


def _plain_head(model) -> bool:
    """The lean path computes `head(hidden)`: true for transformers' own forward (a subclass that rewrites the
    logits, such as the test bed's `ClosedActionLlamaForCausalLM`, is not) and heads without soft-capping or
    scaling of the logits."""
    forward = type(base_model(model)).forward
    if not forward.__module__.startswith("transformers."):
        return False
    config = text_config(model)
    return not any(getattr(config, name, None) for name in
                   ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling"))


def _chunk_logprobs(head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) for a chunk of positions: (n, H), (n,) -> (n,). Logits in float32, then freed."""
    logits = head(hidden).float()  # (n, V)
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _lean_token_logprobs(model, input_ids, attention_mask, completion_mask, first: int) -> torch.Tensor:
    """log p of the completion tokens from position `first` on, without the (B, T, V) logits. (B, T-first)

    The head runs on chunks of completion positions under activation checkpointing: only the chunk's
    hidden states are kept, and backward recomputes its logits. The head is called as a module, so
    DeepSpeed's ZeRO-3 hooks gather its weight for each call, in forward and in the recomputation."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=1,
                output_hidden_states=True)
    hidden = out.hidden_states[-1][:, first - 1 : -1]  # (B, T-first, H): the states that predict tokens first..T-1
    targets = input_ids[:, first:]  # (B, T-first)
    scored = completion_mask[:, first:].bool()  # only completion tokens are scored
    head = unwrap(model).get_output_embeddings()
    picked = torch.zeros(targets.shape, dtype=torch.float32, device=input_ids.device)
    return picked.masked_scatter(scored, _head_logprobs(head, hidden[scored], targets[scored]))


def _head_logprobs(head, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """log p(y) from hidden states through the LM head, TOKEN_CHUNK positions at a time. (N, H), (N,) -> (N,) float32

    With gradients, a frozen head (LoRA's) takes `_FrozenHeadLogprobs`: each position's gradient is formed in the
    forward from the chunk's logits, so the head's matmul runs once, not a second time to recompute them in backward.
    Any other head (trained, sharded, adapted) runs each chunk under activation checkpointing."""
    from torch.utils.checkpoint import checkpoint

    if not torch.is_grad_enabled() or not h.requires_grad:
        return _chunked(lambda i: _chunk_logprobs(head, h[i : i + TOKEN_CHUNK], y[i : i + TOKEN_CHUNK]), h, y)
    if _frozen_plain_head(head):
        return _FrozenHeadLogprobs.apply(h, y, head)
    return _chunked(lambda i: checkpoint(_chunk_logprobs, head, h[i : i + TOKEN_CHUNK], y[i : i + TOKEN_CHUNK],
                                         use_reentrant=False), h, y)


def _chunked(fn, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    chunks = [fn(i) for i in range(0, len(y), TOKEN_CHUNK)]
    return torch.cat(chunks) if chunks else h.new_zeros(0, dtype=torch.float32)


def _frozen_plain_head(head) -> bool:
    """A plain `nn.Linear` none of whose parameters is trained, with its weight whole on this process (not a
    ZeRO-3 partition, which its hooks gather only for the module's own call, nor an FSDP2 DTensor shard)."""
    weight = getattr(head, "weight", None)
    return (type(head) is torch.nn.Linear and not any(p.requires_grad for p in head.parameters())
            and type(weight.data) is torch.Tensor and not hasattr(weight, "ds_id"))


class _FrozenHeadLogprobs(torch.autograd.Function):
    """log p(y) = (W h)_y - logsumexp(W h + b) through a frozen head W, b, with d log p(y) / dh = W_y - p^T W
    (p = softmax) computed in the forward from the logits it already has, one chunk at a time, and kept: (N, H),
    the size of the hidden states the checkpointed path keeps. Backward only scales it by the incoming
    gradient, so the head costs two (n, V) x (V, H)-sized matmuls per chunk instead of three (the checkpointed
    path's forward, recomputation and input gradient), at the same peak memory (one chunk's logits)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, y: torch.Tensor, head: torch.nn.Linear) -> torch.Tensor:
        weight = head.weight  # (V, H)
        ctx.h_dtype = h.dtype
        picked, slopes = [], []
        for i in range(0, len(y), TOKEN_CHUNK):
            targets = y[i : i + TOKEN_CHUNK]
            logits = head(h[i : i + TOKEN_CHUNK]).float()  # (n, V)
            norm = torch.logsumexp(logits, dim=-1)  # (n,)
            picked.append(logits.gather(-1, targets[:, None]).squeeze(-1) - norm)
            probs = logits.sub_(norm[:, None]).exp_()  # (n, V), in place: one chunk of logits at a time
            slopes.append(weight[targets].float() - (probs.to(weight.dtype) @ weight).float())  # (n, H)
            del logits, probs
        if not picked:
            ctx.save_for_backward(h.new_zeros(0, h.size(-1), dtype=torch.float32))
            return h.new_zeros(0, dtype=torch.float32)
        ctx.save_for_backward(torch.cat(slopes))
        return torch.cat(picked)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (slopes,) = ctx.saved_tensors  # (N, H)
        return (grad[:, None] * slopes).to(ctx.h_dtype), None, None


def _packable(model, length: int) -> bool:
    """A custom (B, 1, L, L) mask reaches attention as given: transformers' SDPA and eager paths take it (other
    kernels build their own masks; `GROUPED_SDPA` is SDPA), and no sliding window shorter than the packed row would
    be dropped."""
    config = text_config(model)
    window = getattr(config, "sliding_window", None)
    takes_mask = getattr(config, "_attn_implementation", None) in ("sdpa", GROUPED_SDPA, "eager")
    return takes_mask and not (window and window < length)


def _paired_token_logprobs(model, packed: dict, input_ids, completion_mask, lean: bool) -> torch.Tensor:
    """`token_logprobs` of TRL's pair layout from `pack_pairs`' rows: each pair's prompt runs once, with
    gradients. (2B, T) -> (2B, T-1)"""
    n = packed["input_ids"].size(0)
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    mask = torch.zeros(packed["attention_mask"].shape, dtype=dtype, device=input_ids.device)
    mask = mask.masked_fill(~packed["attention_mask"], torch.finfo(dtype).min)[:, None]  # (B, 1, L, L) additive
    scored = completion_mask[:, 1:].bool()  # (2B, T-1)
    pair = torch.arange(2 * n, device=input_ids.device).remainder(n)[:, None].expand_as(scored)[scored]  # (N,)
    source, targets = packed["source"][scored], input_ids[:, 1:][scored]  # (N,), (N,)
    inputs = dict(input_ids=packed["input_ids"], attention_mask=mask, position_ids=packed["position_ids"],
                  use_cache=False)
    if lean and _plain_head(model):
        hidden = model(**inputs, logits_to_keep=1, output_hidden_states=True).hidden_states[-1]  # (B, L, H)
        picked = _head_logprobs(unwrap(model).get_output_embeddings(), hidden[pair, source], targets)  # (N,)
    else:
        logits = model(**inputs).logits[pair, source].float()  # (N, V)
        picked = logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    out = torch.zeros(scored.shape, dtype=torch.float32, device=input_ids.device)
    return out.masked_scatter(scored, picked)  # (2B, T-1)


def token_logprobs(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor, lean: bool = True,
    pairs: bool = False,
) -> torch.Tensor:
    """Per-token log-probs of the completion tokens, zero elsewhere. (B, T) -> (B, T-1).

    Position t of the output scores token t+1 of `input_ids`, as in a shifted LM loss.
    `completion_mask` marks completion tokens with 1 (prompt and padding 0). `lean`: without the
    (B, T, V) logits (see the module docstring); equal to the plain path to float rounding.
    `pairs`: the rows are TRL's pair layout (chosen rows, then the rejected rows of the same prompts), and each
    pair runs as one row with its prompt once (`klalign.ops.batching.pack_pairs`), with gradients; equal to
    the plain path to float rounding, which it falls back to where the layout or the attention kernel does not
    allow packing.
    """
    if pairs:
        packed = pack_pairs(input_ids, attention_mask, completion_mask)
        if packed is not None and _packable(model, packed["input_ids"].size(1)):
            return _paired_token_logprobs(model, packed, input_ids, completion_mask, lean)
    seq_len = input_ids.size(1)
    first = int(completion_mask.float().argmax(dim=1).min().clamp(min=1))  # earliest completion token
    if lean and _plain_head(model):
        out = torch.zeros(input_ids.size(0), seq_len - 1, dtype=torch.float32, device=input_ids.device)
        out[:, first - 1 :] = _lean_token_logprobs(model, input_ids, attention_mask, completion_mask, first)
        return out  # (B, T-1)
    keep = seq_len - first + 1  # logits for positions first-1 .. T-1 predict tokens first .. T
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=keep).logits
    logits = logits[:, :-1].float()  # (B, keep-1, V): the last position predicts nothing
    targets = input_ids[:, first:]  # (B, keep-1)
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    mask = completion_mask[:, first:].to(picked.dtype)
    out = picked.new_zeros(input_ids.size(0), seq_len - 1)
    out[:, first - 1 :] = picked * mask
    return out  # (B, T-1)


def sequence_logprobs(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor, lean: bool = True,
    pairs: bool = False,
) -> torch.Tensor:
    """`s(y)`: the summed log-prob of each row's completion (`pairs`: see `token_logprobs`). (B, T) -> (B,)"""
    return token_logprobs(model, input_ids, attention_mask, completion_mask, lean, pairs).sum(dim=1)


@torch.no_grad()
def shared_prompt_token_logprobs(model, prompt_ids: list[int], completion_ids: list[list[int]], pad_token_id: int,
                                 batch_size: int | None = None) -> torch.Tensor:
    """Per-token log-probs of n completions of one prompt, the prompt run once. (n, W), zero past each end.

    The prompt's KV cache is computed once and repeated over the completions, which run on it (`batch_size`
    at a time), instead of n rows that each recompute the prompt: the prefix sharing GPU peers use for DPO's
    chosen and rejected (issue 22, item 1). Equal to `token_logprobs` on the n full rows to float rounding.
    No gradients: for evaluation and other frozen scoring. W is the longest completion; a head that is not
    a plain linear map (see `_plain_head`) takes the plain path on full rows."""
    device = next(model.parameters()).device
    n, width, p = len(completion_ids), max((len(c) for c in completion_ids), default=0), len(prompt_ids)
    if p == 0:
        raise ValueError("shared_prompt_token_logprobs: the prompt has no tokens (the first token needs a context)")
    if width == 0:
        return torch.zeros(n, 0, device=device)
    if not _plain_head(model):
        batch = completion_batch([prompt_ids] * n, completion_ids, pad_token_id, device)
        return token_logprobs(model, **batch, lean=False)[:, p - 1 : p - 1 + width]  # (n, W)
    prompt = model(input_ids=torch.tensor([prompt_ids], device=device), use_cache=True, logits_to_keep=1,
                   output_hidden_states=True)
    first = prompt.hidden_states[-1][:, -1:]  # (1, 1, H): the state that predicts every completion's first token
    head = unwrap(model).get_output_embeddings()
    out = []
    step = batch_size or n
    for start in range(0, n, step):
        rows = completion_ids[start : start + step]
        b = len(rows)
        ids = torch.full((b, width), pad_token_id, dtype=torch.long, device=device)  # (b, W)
        mask = torch.zeros((b, width), dtype=torch.long, device=device)  # (b, W)
        for i, c in enumerate(rows):
            ids[i, : len(c)], mask[i, : len(c)] = torch.tensor(c, device=device), 1
        cache = copy.deepcopy(prompt.past_key_values) if start + step < n else prompt.past_key_values
        cache.batch_repeat_interleave(b)
        body = model(input_ids=ids, attention_mask=torch.cat([mask.new_ones(b, p), mask], dim=1),
                     position_ids=torch.arange(p, p + width, device=device).expand(b, -1), past_key_values=cache,
                     use_cache=True, logits_to_keep=1, output_hidden_states=True)
        hidden = torch.cat([first.expand(b, 1, -1), body.hidden_states[-1][:, :-1]], dim=1)  # (b, W, H)
        scored = mask.bool()
        h, y = hidden[scored], ids[scored]  # (N, H), (N,)
        chunks = [_chunk_logprobs(head, h[i : i + TOKEN_CHUNK], y[i : i + TOKEN_CHUNK])
                  for i in range(0, len(y), TOKEN_CHUNK)]
        out.append(torch.zeros(b, width, device=device).masked_scatter(scored, torch.cat(chunks)))
    return torch.cat(out)  # (n, W)


@torch.no_grad()
def completion_logprobs(model, completions: list, pad_token_id: int, batch_size: int) -> np.ndarray:
    """s(y) under `model` for each completion (anything with `prompt_ids` and `completion_ids`, such as
    `klalign.generation.types.Completion`), on its exact token ids. (N,) float64

    Consecutive completions of one prompt share one pass over it (`shared_prompt_token_logprobs`)."""
    out, start = [], 0
    for end in range(1, len(completions) + 1):
        if end == len(completions) or completions[end].prompt_ids != completions[start].prompt_ids:
            group = completions[start:end]
            out.append(shared_prompt_token_logprobs(model, group[0].prompt_ids, [c.completion_ids for c in group],
                                                    pad_token_id, batch_size).double().sum(1).cpu())  # (g,)
            start = end
    return torch.cat(out).numpy() if out else np.zeros(0)
