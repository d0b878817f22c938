"""The methods of `NLHFTrainer`: what each one samples, which loss it takes, and the paper it implements.

One round of the online loop is one iteration k; pi_k is the policy at its start (ALGORITHMS.md
section 3 for the game, `klalign.ops.nash_losses` for the losses, `klalign.theory.games` for the exact
tabular iterations).

- nash_mp (Tiapkin et al. 2025, arXiv 2505.19731 v1, "Accelerating Nash Learning from Human
  Feedback via Mirror Prox"): each prox step approximately solves, by M stochastic policy-gradient
  steps from theta_k,
      L(theta) = -E_{y ~ pi_theta, y' ~ opponent}[P(y > y')] + beta KL(pi_theta||pi_ref) + c KL(pi_theta||pi_k);
  the half step (opponent pi_k) gives pi_{k+1/2}; the full step, again from theta_k, with opponent
  pi_{k+1/2}, gives pi_{k+1}. c = 1/eta. Two prox steps per iteration.
- mirror_descent: the full step alone, opponent pi_k. c = 1/eta.
- nash_md (Munos et al. 2023): one step anchored at the geometric mixture mu_k ∝ pi_k^(1-eta beta)
  pi_ref^(eta beta), which is also the opponent. Since KL(pi||mu_k) = (1 - eta beta) KL(pi||pi_k) +
  eta beta KL(pi||pi_ref) + const, this is L with opponent mu_k (sampled token by token,
  `klalign.generation.geometric_mixture`) and c = 1/eta - beta; it is exact on a single token.
- online_ipo (Calandriello et al. 2024, arXiv 2403.08635): self-play, single loop. Each inner step
  draws fresh pairs y, y' of the current policy, asks P(y > y'), and takes one step on the IPO loss
  (h(y) - h(y') - (P - 1/2)/beta)^2, h = s_theta - s_ref; no anchor, no snapshot opponent, the
  optimizer state carries over between rounds. Stationary exactly at pi*.
- egpo (Zhou, Fazel, Du 2025, arXiv 2503.08942; their code's variance-reduced form): the
  extragradient step on the online IPO objective. Half step: from theta_k, pairs of pi_k. Full step:
  pairs of pi_{k+1/2}, from theta_k again with the optimizer state saved at theta_k restored (as
  EGPO's trainer does). One optimizer step per phase is EGPO (`inner_steps: 1`); more steps move
  toward the opponent's best response, since the loss has no anchor to theta_k. Its exact tabular
  path is Nash-MP's with the KL linearised.
- sppo (Wu et al. 2024, arXiv 2405.00675, Algorithm 1, Eq. 4.7), beta-regularised: K =
  `samples_per_prompt` samples of pi_k per prompt, all K(K-1)/2 pairs queried, each sample's win rate
  against pi_k estimated leave-one-out, and M steps of regression of s_theta(y) on the prox target
  (1 - w) s_k(y) + w s_ref(y) + eta_s (P_hat(y > pi_k) - 1/2) on the round's samples (reused: it is
  a regression on pi_k's samples). eta_s = eta/(1 + eta beta), w = eta_s beta: the mixture anchor of
  INPO/MPO, so the fixed point is pi* (SPPO's own, w = 0, is the unregularised game's). Tabular: mirror
  descent with step eta.
- nash_prox (Tiapkin et al., arXiv 2505.19731 v2, retitled "Proximal Point Nash Learning from Human
  Feedback"; only its abstract was readable here, so this recipe is inferred from it): the abstract
  names a self-play policy gradient "equivalent to Online IPO", a stability limitation of it, and
  "Nash Prox", self-play embedded in a proximal point method. Here: each round is one proximal point
  step, M self-play online-IPO steps (pairs of the current policy) on the game regularised by
  beta KL(.||pi_ref) + (1/eta) KL(.||pi_k), i.e. the IPO loss with tau = beta + 1/eta and base
  ref^w pi_k^(1-w), w = eta beta/(1 + eta beta). Fixed point pi*; exact tabular path
  `klalign.theory.nash_prox`. Nash-MP (v1) is kept under its own name: v2's text, its settings and
  whether it replaces the v1 algorithm were not available.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class NashMethod:
    """How one method runs an iteration (module docstring).

    phases: the prox steps, each M inner steps; a second phase restarts from theta_k.
    pairs: what each inner step samples: "policy_vs_opponent" (y ~ pi_theta, y' ~ the phase's opponent),
        "opponent_pair" (y, y' ~ the phase's opponent), "self_play" (y, y' ~ pi_theta), "groups" (K
        samples of pi_k per prompt, all pairs; drawn once a round and reused by every inner step).
    loss: the key of the trainer's loss (`klalign.ops.nash_losses`).
    optimizer_state: "fresh" (cleared at every phase), "restore" (the state at theta_k, again for the
        second phase), "continue" (kept across rounds).
    """

    phases: tuple[str, ...]
    pairs: str
    loss: str
    optimizer_state: str
    paper: str


METHODS: dict[str, NashMethod] = {
    "nash_mp": NashMethod(("half", "full"), "policy_vs_opponent", "policy_gradient", "fresh",
                          "Tiapkin et al. 2025, arXiv 2505.19731 v1 (Nash Mirror Prox)"),
    "mirror_descent": NashMethod(("full",), "policy_vs_opponent", "policy_gradient", "fresh",
                                 "online mirror descent, the baseline of Tiapkin et al. 2025"),
    "nash_md": NashMethod(("full",), "policy_vs_opponent", "policy_gradient", "fresh",
                          "Munos et al. 2023, arXiv 2312.00886 (Nash-MD)"),
    "online_ipo": NashMethod(("full",), "self_play", "self_play_ipo", "continue",
                             "Calandriello et al. 2024, arXiv 2403.08635 (online IPO)"),
    "egpo": NashMethod(("half", "full"), "opponent_pair", "self_play_ipo", "restore",
                       "Zhou, Fazel, Du 2025, arXiv 2503.08942 (EGPO)"),
    "sppo": NashMethod(("full",), "groups", "sppo", "fresh",
                       "Wu et al. 2024, arXiv 2405.00675 (SPPO), beta-regularised as INPO/MPO"),
    "nash_prox": NashMethod(("full",), "self_play", "self_play_ipo", "fresh",
                            "Tiapkin et al., arXiv 2505.19731 v2 (Nash Prox; inferred from the abstract)"),
}
LOSS_METRIC = {"policy_gradient": "prox_loss", "self_play_ipo": "self_play_ipo_loss", "sppo": "sppo_loss"}
LOSS_FUNCTIONS = {"policy_gradient": "_policy_gradient_loss", "self_play_ipo": "_self_play_ipo_loss", "sppo": "_sppo_loss"}
