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


SHARE_PROMPT_HELP = ("Score each chosen/rejected pair as one row with its prompt once (a mask keeps the two replies "
                     "apart), with gradients: equal log-probs, fewer tokens through the model. Falls back to one row "
                     "per reply where the prompts differ or the attention kernel takes no custom mask (only SDPA and "
                     "eager do).")


def pack_pairs(input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor,
               pad_token_id: int = 0) -> dict[str, torch.Tensor] | None:
    """TRL's pair layout, chosen rows then rejected rows `(2B, T)`, as B rows [prompt, chosen, rejected] with
    the prompt once (issue 22, item 1: the prefix sharing GPU peers use for DPO). None where the layout does
    not allow it (a pair whose two rows' prompts differ, as after `keep_end` truncation; left padding; an empty
    prompt): the caller then takes the plain path.

    Returns `input_ids` and `position_ids` (B, L), where the rejected reply's positions restart after the
    prompt; `attention_mask` (B, L, L) bool, causal except that the rejected reply does not see the chosen one
    and no token sees padding (a padding query sees itself, so no row is empty); and `source` (2B, T-1): for
    each position t of the plain layout's shifted output (which scores token t+1), the packed position whose
    hidden state predicts that token. Every token then has exactly the context it has in the plain layout.
    """
    rows, width = input_ids.shape
    n = rows // 2
    if rows != 2 * n or n == 0:
        return None
    pos = torch.arange(width, device=input_ids.device)
    seen, scored = attention_mask.bool(), completion_mask.bool()
    lengths = seen.sum(1)  # (2B,)
    prompt = (seen & ~scored).sum(1)  # (2B,)
    right_padded = torch.equal(seen, pos < lengths[:, None])
    prompt_first = torch.equal(scored & seen, (pos >= prompt[:, None]) & (pos < lengths[:, None]))
    if not (right_padded and prompt_first and torch.equal(prompt[:n], prompt[n:]) and bool((prompt[:n] > 0).all())):
        return None
    p = prompt[:n, None]  # (B, 1)
    if not bool(((input_ids[:n] == input_ids[n:]) | (pos >= p)).all()):
        return None
    c, r = lengths[:n, None] - p, lengths[n:, None] - p  # (B, 1) reply lengths
    total = p + c + r  # (B, 1)
    packed = torch.arange(int(total.max()), device=input_ids.device)  # (L,)
    segment = torch.where(packed < p, 0, torch.where(packed < p + c, 1, torch.where(packed < total, 2, 3)))  # (B, L)
    chosen_ids = input_ids[:n].gather(1, packed.clamp(max=width - 1).expand(n, -1))
    rejected_ids = input_ids[n:].gather(1, (packed - c).clamp(0, width - 1))
    ids = torch.where(segment <= 1, chosen_ids, torch.where(segment == 2, rejected_ids, pad_token_id))  # (B, L)
    positions = torch.where(segment == 2, packed - c, torch.where(segment == 3, 0, packed))  # (B, L)
    causal = packed[:, None] >= packed[None, :]  # (L, L): query >= key
    allowed = causal & (segment[:, None, :] != 3) & ~((segment[:, :, None] == 2) & (segment[:, None, :] == 1))
    allowed |= torch.eye(len(packed), dtype=torch.bool, device=input_ids.device)  # (B, L, L)
    t = pos[: width - 1]  # (T-1,): output position t scores token t+1
    source = torch.cat([t.expand(n, -1), torch.where(t + 1 > p, t + c, t)]).clamp(max=len(packed) - 1)  # (2B, T-1)
    return {"input_ids": ids, "position_ids": positions, "attention_mask": allowed, "source": source}
