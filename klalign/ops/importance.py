"""Samples not drawn from the training model itself: the mismatch, measured, and its correction.

vLLM's kernels and dtype (bf16 on most hardware) do not give exactly the training model's
probabilities, and a sampler at another temperature gives other ones by design. Every sample keeps
the sampler's log-probs of its tokens (`Completion.sampler_logprobs`); the trainers score the same
token ids with the training model anyway, and compare:

- the mismatch, logged every round: mean and max over the sampled tokens of
  |log p_sampler(y_t | .) - log p_train(y_t | .)|;
- with `importance_correction: truncated`, each sample's policy-gradient and KL-estimate terms are
  weighted by w = min(exp(s_train(y) - s_sampler(y)), cap), s the sequence log-prob: E_sampler[w f]
  = E_train[f] for an uncapped weight, and the cap bounds its variance (truncated importance
  sampling: Ionides 2008; the correction TRL and OpenRLHF apply to vLLM samples).
"""

from __future__ import annotations

import torch


def sample_statistics(train_token_logps: torch.Tensor, completion_mask: torch.Tensor, completions: list) -> list[dict]:
    """Per sample: the sampler's sequence log-prob and the token-level mismatch (None without sampler log-probs).

    `train_token_logps` (B, T-1) are the training model's log-probs of the batch's tokens (position t scores
    token t+1, as `klalign.ops.logprobs.token_logprobs` returns them); `completion_mask` (B, T) marks completions."""
    mask = completion_mask[:, 1:].bool()  # (B, T-1): the scored positions
    out = []
    for row, completion in enumerate(completions):
        if completion.sampler_logprobs is None:
            out.append({"sampler_logprob": None, "mismatch_sum": None, "mismatch_max": None, "mismatch_tokens": 0})
            continue
        train = train_token_logps[row][mask[row]].double().cpu()  # (n,) in completion order
        sampler = torch.tensor(completion.sampler_logprobs, dtype=torch.float64)  # (n,)
        diff = (sampler - train).abs()
        out.append({"sampler_logprob": sampler.sum().item(), "mismatch_sum": diff.sum().item(),
                    "mismatch_max": diff.max().item() if len(diff) else 0.0, "mismatch_tokens": len(diff)})
    return out


def mismatch_metrics(rows: list[dict], prefix: str = "") -> dict[str, float]:
    """The round's mismatch from rows carrying `sample_statistics` fields (under `prefix`); {} without any."""
    stats = [r for r in rows if r.get(f"{prefix}mismatch_sum") is not None]
    tokens = sum(r[f"{prefix}mismatch_tokens"] for r in stats)
    if not tokens:
        return {}
    return {"sampler/mismatch_mean": sum(r[f"{prefix}mismatch_sum"] for r in stats) / tokens,
            "sampler/mismatch_max": max(r[f"{prefix}mismatch_max"] for r in stats)}


def truncated_weights(train_logps: torch.Tensor, sampler_logps: torch.Tensor, cap: float) -> torch.Tensor:
    """w = min(exp(s_train - s_sampler), cap), detached. (N,), (N,) -> (N,)"""
    return torch.exp(train_logps.detach() - sampler_logps.to(train_logps)).clamp(max=cap)


def estimate_weights(rows: list[dict], train_key: str, sampler_key: str, correction: str, cap: float):
    """The weights of a round's samples for its estimates: truncated importance weights with
    `correction: truncated` and sampler log-probs in every row, else None (plain means)."""
    if correction == "none" or any(r.get(sampler_key) is None for r in rows):
        return None
    train = torch.tensor([r[train_key] for r in rows], dtype=torch.float64)
    sampler = torch.tensor([r[sampler_key] for r in rows], dtype=torch.float64)
    return truncated_weights(train, sampler, cap)
