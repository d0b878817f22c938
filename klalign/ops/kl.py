"""KL estimators from samples (ALGORITHMS.md section 0): with l = log pi(y) - log pi_ref(y) for y ~ pi,
sequence level (or per token, summed), k1 = l, k2 = l^2 / 2, k3 = exp(-l) - 1 + l (Schulman 2020)."""

from __future__ import annotations

import torch


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
