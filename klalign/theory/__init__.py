"""Exact, tabular theory of KL-regularised alignment (numpy, float64).

- `tilt`: the KL-regularised optimum, its value, the tilted frontier, KL estimators, RSO's rate.
- `best_of_n`: the exact best-of-N law, its KL, Beirami's bound and estimator, win rate, and
  the memoryless-sequence model of Yang et al. 2024.
- `games`: the regularised preference game, its Nash equilibrium, exploitability, and the exact
  Nash-MP / mirror-descent / Nash-MD / online IPO / EGPO / SPPO / Nash Prox iterations.
- `bandits`: KL-regularised UCB on a linear contextual bandit with exact regret.
- `reproduce`: the tables and plots that check the papers' claims (`klalign theory`).

The math is ALGORITHMS.md, one section per module.
"""

from klalign.theory.bandits import LinearBandit, hard_bandit_instance, simulate_kl_ucb
from klalign.theory.best_of_n import (
    best_of_n_distribution,
    best_of_n_kl,
    best_of_n_kl_bound,
    best_of_n_kl_estimate,
    best_of_n_kl_estimate_mean,
    best_of_n_win_rate,
    memoryless_best_of_n,
    sum_reward_distribution,
)
from klalign.theory.games import (
    PREFERENCE_QUERIES_PER_STEP,
    best_response,
    egpo,
    exploitability,
    mirror_descent,
    nash_md,
    nash_mirror_prox,
    nash_prox,
    nash_residual,
    online_ipo,
    random_intransitive_game,
    regularized_nash,
    sppo,
)
from klalign.theory.tilt import (
    kl,
    kl_estimators,
    log_partition,
    max_tilted_kl,
    regularized_objective,
    rso_acceptance_rate,
    tilt,
    tilt_for_kl_budget,
    tilted_frontier,
)

__all__ = [
    "LinearBandit",
    "PREFERENCE_QUERIES_PER_STEP",
    "best_of_n_distribution",
    "best_of_n_kl",
    "best_of_n_kl_bound",
    "best_of_n_kl_estimate",
    "best_of_n_kl_estimate_mean",
    "best_of_n_win_rate",
    "best_response",
    "egpo",
    "exploitability",
    "hard_bandit_instance",
    "kl",
    "kl_estimators",
    "log_partition",
    "max_tilted_kl",
    "memoryless_best_of_n",
    "mirror_descent",
    "nash_md",
    "nash_mirror_prox",
    "nash_prox",
    "nash_residual",
    "online_ipo",
    "random_intransitive_game",
    "regularized_nash",
    "regularized_objective",
    "rso_acceptance_rate",
    "simulate_kl_ucb",
    "sppo",
    "sum_reward_distribution",
    "tilt",
    "tilt_for_kl_budget",
    "tilted_frontier",
]
