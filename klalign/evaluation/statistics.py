"""The statistics `klalign evaluate` reports (ALGORITHMS.md section 4): mean reward, KL (k1, k3) and win
rate with standard errors, and the tilted frontier from the reference's samples."""

from __future__ import annotations

import numpy as np
import torch

from klalign.ops.kl import kl_k1, kl_k3


def mean_and_se(values: np.ndarray) -> tuple[float, float]:
    """Mean of a (P, n) array and its standard error over the n samples per prompt, given the prompts."""
    P, n = values.shape
    return float(values.mean()), float(np.sqrt(values.var(axis=1, ddof=1).sum() / n) / P)


def win_rate(rewards: np.ndarray, reference_rewards: np.ndarray) -> tuple[float, float]:
    """P(r(y) > r(y_ref)) + P(=)/2 by the reward, every sample against every reference sample of the same
    prompt, and its standard error over the prompts. (P, n), (P, m) -> (mean, se)"""
    a, b = rewards[:, :, None], reference_rewards[:, None, :]  # (P, n, 1), (P, 1, m)
    per_prompt = ((a > b) + 0.5 * (a == b)).mean(axis=(1, 2))  # (P,)
    se = per_prompt.std(ddof=1) / np.sqrt(len(per_prompt)) if len(per_prompt) > 1 else float("nan")
    return float(per_prompt.mean()), float(se)


def summarize(name: str, samples: dict, step: int | None = None, path: str | None = None,
              reference_rewards: np.ndarray | None = None) -> dict:
    """One table row: mean reward, KL (k1, k3) and the win rate against the reference, with standard
    errors, and the mean response length."""
    rewards = np.asarray(samples["rewards"])  # (P, n)
    row = {"name": name, "step": step, "path": path}
    row["reward"], row["reward_se"] = mean_and_se(rewards)
    reference_rewards = rewards if reference_rewards is None else reference_rewards
    row["win_rate"], row["win_rate_se"] = win_rate(rewards, reference_rewards)
    if "logratios" in samples:
        logratio = torch.as_tensor(samples["logratios"], dtype=torch.float64)  # (P, n)
        row["kl_k1"], row["kl_k1_se"] = mean_and_se(kl_k1(logratio).numpy())
        row["kl_k3"], row["kl_k3_se"] = mean_and_se(kl_k3(logratio).numpy())
    else:  # the reference itself: KL(pi_ref || pi_ref) = 0 exactly
        row.update(kl_k1=0.0, kl_k1_se=0.0, kl_k3=0.0, kl_k3_se=0.0)
    row["response_tokens"] = float(np.mean([len(ids) for per in samples["completion_ids"] for ids in per]))
    return row


def tilted_frontier_estimate(rewards: np.ndarray, lambdas: list[float], scores: np.ndarray | None = None) -> list[dict]:
    """Reward and KL of phi_lam ∝ pi_ref exp(lam s) by self-normalised weights over (P, n) samples of pi_ref,
    s = the reward itself (the tilted frontier) or any other score of the same samples (`scores`, (P, n); e.g. a
    checkpoint's log-ratio, to ask how far along its own direction the reward goes).

    Per prompt, w = softmax(lam * s) over its n samples: reward = sum w r, KL = sum w log(w n)
    (ALGORITHMS.md section 0). ess = 1 / sum w^2, the effective number of samples left (n at lam = 0).
    """
    rows = []
    n = rewards.shape[1]
    scores = rewards if scores is None else scores
    for lam in lambdas:
        w = torch.softmax(torch.as_tensor(lam * scores, dtype=torch.float64), dim=1).numpy()  # (P, n)
        kl = np.sum(w * np.log(np.maximum(w * n, np.finfo(np.float64).tiny)), axis=1)  # 0 log 0 = 0
        rows.append({
            "lam": float(lam),
            "reward": float(np.sum(w * rewards, axis=1).mean()),
            "kl": float(np.maximum(kl, 0.0).mean()),
            "ess": float((1.0 / np.sum(w**2, axis=1)).mean()),
        })
    return rows
