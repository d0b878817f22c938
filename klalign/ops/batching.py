"""Token-id lists into padded batches: right-padded prompt + completion rows for log-probs (TRL's preference
collator's layout), left-padded prompts for generation and next-token scoring."""

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


def left_padded(rows: list[list[int]], pad_id: int, device) -> dict[str, torch.Tensor]:
    """Left-padded `input_ids` and `attention_mask`, each (B, T), so every row ends at the last column."""
    width = max(len(r) for r in rows)
    input_ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], device=device)
    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    return {"input_ids": input_ids, "attention_mask": attention_mask}
