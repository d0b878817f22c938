"""Samples not drawn from the training model itself: the mismatch, measured, and its correction.

vLLM's kernels and dtype (bf16 on most hardware) do not give exactly the training model's
probabilities, and a sampler at another temperature gives other ones by design. Every sample keeps
the sampler's log-probs of its tokens (`Completion.sampler_logprobs`); the trainers score the same
token ids with the training model anyway, and compare (HF at temperature 1 and top_p 1 samples from the
training model itself: its log-probs are kept in place of that pass, and nothing is compared or weighted,
`Completion.importance_logprobs`):

- the mismatch, logged every round: mean and max over the sampled tokens of
  |log p_sampler(y_t | .) - log p_train(y_t | .)|, the fraction of tokens and of sequences whose
  importance ratio exceeds the cap, and the sequence weights' effective sample size per sample;
- the correction (truncated importance sampling: Ionides 2008; what TRL and OpenRLHF apply to vLLM
  samples), at one of two levels (`importance_correction`):
  - `token` (the default): each token's policy-gradient and KL terms are weighted by
    w_t = min(p_train(y_t | x, y_<t) / p_sampler(y_t | x, y_<t), cap). Exact for each token's
    conditional law; it ignores that the prefix was drawn by the sampler, a bias of the order of the
    per-token mismatch, which stays small on long responses where the sequence form collapses.
  - `sequence`: a whole sample's terms weighted by w = min(exp(s_train(y) - s_sampler(y)), cap):
    unbiased without the cap, but log w sums T per-token mismatches, so on 512-token responses the
    weights saturate at the cap or vanish and their effective sample size collapses.
"""

from __future__ import annotations

import torch

from klalign.ops.kl import kl_k3

LEVELS = ("token", "sequence")


def at_scored_positions(values: list[list[float] | None], completion_mask: torch.Tensor) -> torch.Tensor | None:
    """Per-token values of each sample's completion (e.g. the sampler's log-probs) placed at the batch's scored
    positions (position t scores token t+1, as `klalign.ops.logprobs.token_logprobs`), zero elsewhere:
    (B, T-1) float64; None if any sample has none."""
    if any(v is None for v in values):
        return None
    mask = completion_mask[:, 1:].bool()  # (B, T-1)
    out = torch.zeros(mask.shape, dtype=torch.float64, device=mask.device)
    out[mask] = torch.tensor([x for v in values for x in v], dtype=torch.float64, device=mask.device)
    return out


def importance_weights(train: torch.Tensor, sampler: torch.Tensor | None, mask: torch.Tensor, correction: str,
                       cap: float) -> torch.Tensor | None:
    """Truncated importance weights toward the training model, detached; None without a correction or
    without sampler log-probs. `train`, `sampler` (B, T-1) per-token log-probs, `mask` (B, T-1) the scored
    positions. `token`: (B, T-1), 1 off the mask; `sequence`: (B,)."""
    if correction == "none" or sampler is None:
        return None
    logratio = (train.detach().double() - sampler.to(train.device)) * mask  # (B, T-1)
    if correction == "token":
        return torch.where(mask.bool(), logratio.exp().clamp(max=cap), torch.ones_like(logratio)).to(train.dtype)
    return logratio.sum(1).exp().clamp(max=cap).to(train.dtype)  # (B,)


def weighted_kl(logratio: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor | None):
    """Per-sample k1 and k3 estimates of KL(pi || pi_ref) from per-token log-ratios (B, T-1), each (B,).

    Without weights, or with sequence weights (B,): the sequence-level k1 = l and k3 = exp(-l) - 1 + l,
    l = sum_t l_t (ALGORITHMS.md section 0), times the weight. With token weights (B, T-1): sum_t w_t l_t
    and sum_t w_t k3(l_t): per token, E[exp(-l_t) | prefix] = 1 makes sum_t k3(l_t) unbiased too."""
    logratio = logratio * mask
    if weights is None or weights.dim() == 1:
        total = logratio.sum(1)
        w = 1.0 if weights is None else weights
        return w * total, w * kl_k3(total)
    return (weights * logratio).sum(1), (weights * kl_k3(logratio) * mask).sum(1)


def sample_statistics(train_token_logps: torch.Tensor, completion_mask: torch.Tensor,
                      sampler_logprobs: list[list[float] | None], cap: float | None = None) -> list[dict]:
    """Per sample: the sampler's sequence log-prob, the token-level mismatch and, with `cap`, how many of its
    tokens' ratios exceed the cap (None without sampler log-probs).

    `train_token_logps` (B, T-1) are the training model's log-probs of the batch's tokens (position t scores
    token t+1, as `klalign.ops.logprobs.token_logprobs` returns them); `completion_mask` (B, T) marks completions;
    `sampler_logprobs` the sampler's per-token log-probs of each sample's completion (None: none reported)."""
    mask = completion_mask[:, 1:].bool()  # (B, T-1): the scored positions
    out = []
    for row, logps in enumerate(sampler_logprobs):
        if logps is None:
            out.append({"sampler_logprob": None, "mismatch_sum": None, "mismatch_max": None, "mismatch_tokens": 0,
                        "train_logprob": None, "clipped_tokens": None})
            continue
        train = train_token_logps[row][mask[row]].double().cpu()  # (n,) in completion order
        sampler = torch.tensor(logps, dtype=torch.float64)  # (n,)
        diff = (sampler - train).abs()
        clipped = None if cap is None else int((train - sampler > torch.log(torch.tensor(cap))).sum())
        out.append({"sampler_logprob": sampler.sum().item(), "mismatch_sum": diff.sum().item(),
                    "mismatch_max": diff.max().item() if len(diff) else 0.0, "mismatch_tokens": len(diff),
                    "train_logprob": train.sum().item(), "clipped_tokens": clipped})
    return out


def mismatch_metrics(rows: list[dict], prefix: str = "", cap: float | None = None) -> dict[str, float]:
    """The round's mismatch from rows carrying `sample_statistics` fields (under `prefix`); {} without any.
    With `cap`: the fractions of tokens and of sequences whose ratio exceeds it, and the effective sample
    size of the (untruncated) sequence weights as a fraction of the samples, (sum w)^2 / (n sum w^2)."""
    stats = [r for r in rows if r.get(f"{prefix}mismatch_sum") is not None]
    tokens = sum(r[f"{prefix}mismatch_tokens"] for r in stats)
    if not tokens:
        return {}
    out = {"sampler/mismatch_mean": sum(r[f"{prefix}mismatch_sum"] for r in stats) / tokens,
           "sampler/mismatch_max": max(r[f"{prefix}mismatch_max"] for r in stats)}
    if cap is not None and all(r.get(f"{prefix}clipped_tokens") is not None for r in stats):
        logw = torch.tensor([r[f"{prefix}train_logprob"] - r[f"{prefix}sampler_logprob"] for r in stats],
                            dtype=torch.float64)
        w = (logw - logw.max()).exp()
        out.update({"sampler/clipped_tokens": sum(r[f"{prefix}clipped_tokens"] for r in stats) / tokens,
                    "sampler/clipped_sequences": (logw > torch.log(torch.tensor(cap))).double().mean().item(),
                    "sampler/sequence_ess": (w.sum() ** 2 / (len(w) * (w**2).sum())).item()})
    return out


def truncated_weights(train_logps: torch.Tensor, sampler_logps: torch.Tensor, cap: float) -> torch.Tensor:
    """Sequence-level w = min(exp(s_train - s_sampler), cap), detached. (N,), (N,) -> (N,)"""
    return torch.exp(train_logps.detach() - sampler_logps.to(train_logps)).clamp(max=cap)
