"""The losses of Nash learning from human feedback, one function each (ALGORITHMS.md section 3).

`NLHFTrainer` picks one per method through `NASH_LOSSES`. Notation: s(y) is a completion's summed
log-prob, h(y) = s_theta(y) - s_base(y) its log-ratio to a base policy (pi_ref, or a geometric
mixture of pi_ref and pi_k), P(y > y') the oracle's probability (or a 0/1 label drawn from it).

Scales. Every loss is scaled so that its expected gradient at the start of a step is the policy
gradient of the same regularised objective, `-E P(y > opp) + beta KL(pi||pi_ref) (+ (1/eta) KL(pi||pi_k))`:
the same learning rate then means the same step for every method, which is what a comparison on one
tuning grid needs (ALGORITHMS.md, "Comparing methods honestly"). The papers' own losses are these
divided by the stated scale; the minimisers and fixed points are unchanged.
"""

from __future__ import annotations

import torch


def reward_to_go(x: torch.Tensor) -> torch.Tensor:
    """sum_{t' >= t} x[:, t']. (B, T) -> (B, T)"""
    return x.flip(1).cumsum(1).flip(1)


def prox_policy_gradient_loss(logps: torch.Tensor, ref_logps: torch.Tensor, anchor_logps: torch.Tensor,
                              mask: torch.Tensor, win: torch.Tensor, beta: float, anchor_coef: float,
                              weights: torch.Tensor | None = None):
    """The surrogate whose gradient estimates grad L(theta) of approximate Nash-MP (Tiapkin et al. 2025,
    "proximal steps estimated using stochastic policy gradients"; ALGORITHMS.md section 3):

        L(theta) = -E_{y ~ pi_theta, y' ~ opp} P(y > y') + beta KL(pi_theta||pi_ref) + c KL(pi_theta||pi_k).

    REINFORCE with the baseline 1/2 for the preference term; each KL by the score function with the
    per-token log-ratios' reward-to-go (unbiased for the sequence-level KL's gradient; exactly the k2
    gradient on one token). `logps` (B, T) with gradients, the others (B, T) detached, `win` (B,);
    `weights` (B, T) per token or (B,) per sequence: truncated importance weights of samples drawn by another
    sampler (klalign.ops.importance), None for samples of pi_theta itself.
    Returns the surrogate and the per-sequence parts (B, 3): win, KL to pi_ref, KL to pi_k (k1).
    """
    kl_ref = (logps.detach() - ref_logps) * mask  # (B, T) per-token log-ratios
    kl_anchor = (logps.detach() - anchor_logps) * mask
    advantage = (win - 0.5)[:, None] - beta * reward_to_go(kl_ref) - anchor_coef * reward_to_go(kl_anchor)  # (B, T)
    if weights is not None:
        advantage = (weights if weights.dim() == 2 else weights[:, None]) * advantage
    surrogate = -(advantage * logps * mask).sum(1).mean()
    return surrogate, torch.stack([win, kl_ref.sum(1), kl_anchor.sum(1)], dim=1)


def self_play_ipo_loss(logps: torch.Tensor, base_logps: torch.Tensor, label: torch.Tensor, tau: float) -> torch.Tensor:
    """Online IPO (Calandriello et al. 2024) on a pair (y, y'), per pair (B,):

        (tau / 4) * (h(y) - h(y') - (P(y > y') - 1/2) / tau)^2,   h = s_theta - s_base,

    the IPO loss of Azar et al. 2023 (Eq. 17) with the label's centred value as target: with a 0/1
    label it is exactly (h(y_w) - h(y_l) - 1/(2 tau))^2 on the winner and loser, with the probability
    it has the same expected gradient and less variance. For y, y' ~ sg(pi_theta) its expected
    gradient is the self-play policy gradient of P(pi > sg pi) - tau KL(pi||base) times -4/tau (the
    equivalence the later version of Tiapkin et al. states), hence the scale tau/4. EGPO (Zhou et al.
    2025) uses it with y, y' drawn from the phase's opponent (their variance-reduced form); Nash Prox
    with base = ref^w pi_k^(1-w) and tau = beta + 1/eta. `logps`, `base_logps`: (B, 2) for (y, y').
    """
    h = logps - base_logps  # (B, 2)
    return tau / 4 * (h[:, 0] - h[:, 1] - (label - 0.5) / tau) ** 2


def sppo_loss(logps: torch.Tensor, target: torch.Tensor, scale: float) -> torch.Tensor:
    """SPPO's regression (Wu et al. 2024, Algorithm 1, Eq. 4.7), per sample (N,): scale/2 (s_theta(y) - t(y))^2.

    With beta-regularisation (INPO, Zhang et al. 2024; MPO, Wang et al. 2024) the target is the
    mirror-descent prox step, written with SPPO's step eta_s = eta / (1 + eta beta) and w = eta_s beta:

        t(y) = (1 - w) s_k(y) + w s_ref(y) + eta_s (P_hat(y > pi_k) - 1/2),   y ~ pi_k,

    whose fixed point is the regularised Nash equilibrium (SPPO's own target, w = 0, is the
    unregularised one, and its last iterate cycles). `scale` = beta + 1/eta gives it the curvature of
    the prox objective L near its solution (module docstring).
    """
    return scale / 2 * (logps - target) ** 2


NASH_LOSSES = {
    "policy_gradient": prox_policy_gradient_loss,
    "self_play_ipo": self_play_ipo_loss,
    "sppo": sppo_loss,
}
