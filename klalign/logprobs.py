"""Sequence log-probabilities and KL estimators (ALGORITHMS.md, Notation and section 0).

`s(y) = sum_t log pi(y_t | x, y_<t)` over completion tokens only. Logits are only built for the
positions from the shortest prompt on (`logits_to_keep`), in float32, and the log-softmax is never
materialised: `log p(token) = logit[token] - logsumexp(logits)`.
"""

from __future__ import annotations

import torch


def completion_batch(
    prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_token_id: int, device=None
) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask`, `completion_mask`, each (B, T), from token-id lists.

    The same layout as TRL's preference collator, so `token_logprobs` reads either.
    """
    rows = [p + c for p, c in zip(prompt_ids, completion_ids)]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    completion_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        input_ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        attention_mask[i, : len(p) + len(c)] = 1
        completion_mask[i, len(p) : len(p) + len(c)] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}
    return {k: v.to(device) for k, v in batch.items()} if device is not None else batch


def token_logprobs(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor
) -> torch.Tensor:
    """Per-token log-probs of the completion tokens, zero elsewhere. (B, T) -> (B, T-1).

    Position t of the output scores token t+1 of `input_ids`, as in a shifted LM loss.
    `completion_mask` marks completion tokens with 1 (prompt and padding 0).
    """
    seq_len = input_ids.size(1)
    first = int(completion_mask.float().argmax(dim=1).min().clamp(min=1))  # earliest completion token
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
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor
) -> torch.Tensor:
    """`s(y)`: the summed log-prob of each row's completion. (B, T) -> (B,)"""
    return token_logprobs(model, input_ids, attention_mask, completion_mask).sum(dim=1)


def kl_k1(logratio: torch.Tensor) -> torch.Tensor:
    """k1 = l, with l = log pi(y) - log pi_ref(y), y ~ pi: unbiased, can be negative per sample."""
    return logratio


def kl_k2(logratio: torch.Tensor) -> torch.Tensor:
    """k2 = l^2 / 2: biased, low variance."""
    return logratio.pow(2) / 2


def kl_k3(logratio: torch.Tensor) -> torch.Tensor:
    """k3 = exp(-l) - 1 + l: unbiased and >= 0 (Schulman's estimator)."""
    return torch.expm1(-logratio) + logratio


KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}
