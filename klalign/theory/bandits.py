"""KL-regularised UCB on a linear contextual bandit, with its regret computed exactly.

ALGORITHMS.md §1; Zhao, Ye, Xiong, Gu, Zhang 2025 (online KL-regularised RLHF), who write
eta = 1/beta. Round t: fit theta, add the bonus gamma * ||phi||_{Sigma^-1}, clip at r_max,
play the Gibbs policy ref * exp(r_tilde / beta). The per-round regret is J_x(pi*) - J_x(pi_t)
= beta * KL(pi_t || pi*_x) (ALGORITHMS.md §0), exact because both policies are known in closed
form. gamma = 0 is the greedy learner the paper's optimism is compared against.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from klalign.theory._checks import (
    as_distribution,
    as_finite,
    check_count,
    check_nonnegative,
    check_positive,
)

FEEDBACK_KINDS = ("reward", "preference")


@dataclass(frozen=True)
class LinearBandit:
    """r(x, a) = features[x, a] @ theta, observed with Gaussian noise or through Bradley-Terry.

    features: (C, K, d), ref: (C, K) with full support, theta: (d,), noise_std >= 0.
    """

    features: np.ndarray
    ref: np.ndarray
    theta: np.ndarray
    noise_std: float

    def __post_init__(self):
        features = as_finite("features", self.features)
        ref = as_distribution("ref", self.ref)
        theta = as_finite("theta", self.theta)
        if features.ndim != 3 or ref.shape != features.shape[:2] or theta.shape != features.shape[2:]:
            raise ValueError(
                f"features (C, K, d), ref (C, K) and theta (d,) disagree: "
                f"{features.shape}, {ref.shape}, {theta.shape}"
            )
        if np.any(ref <= 0):
            raise ValueError("ref must give every action positive mass (the regret is a KL to it)")
        object.__setattr__(self, "features", features)
        object.__setattr__(self, "ref", ref)
        object.__setattr__(self, "theta", theta)
        object.__setattr__(self, "noise_std", check_nonnegative("noise_std", self.noise_std))

    @property
    def rewards(self) -> np.ndarray:
        return self.features @ self.theta  # (C, K)


def hard_bandit_instance(
    num_actions: int = 10, log_ref_best: float = -8.0, noise_std: float = 0.3
) -> LinearBandit:
    """One context, one-hot features; the best action (reward 1) has reference mass e^log_ref_best.

    ALGORITHMS.md §1: the others' rewards are spread over [0, 0.2], so with beta = 0.1 the optimum
    puts 0.69 of its mass on the best action, whose reward is learned only by playing it: the
    reference almost never does, which is where optimism separates from greedy.
    """
    num_actions = check_count("num_actions", num_actions, 2)
    theta = np.concatenate([[1.0], np.linspace(0.0, 0.2, num_actions - 1)])  # (d,) = (K,)
    ref = np.full(num_actions, -np.expm1(log_ref_best) / (num_actions - 1))
    ref[0] = np.exp(log_ref_best)
    return LinearBandit(np.eye(num_actions)[None], ref[None], theta, noise_std)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max()
    return shifted - np.log(np.exp(shifted).sum())


def _sherman_morrison(sigma_inv: np.ndarray, z: np.ndarray) -> np.ndarray:
    """(Sigma + z z^T)^-1 from Sigma^-1 in O(d^2), so each round costs no matrix inversion."""
    v = sigma_inv @ z
    return sigma_inv - np.outer(v, v) / (1.0 + z @ v)


def _logistic_newton_step(theta, diffs, outcomes, ridge) -> np.ndarray:
    """One Newton step on sum_i [log(1 + e^{z_i.theta}) - o_i z_i.theta] + ridge/2 ||theta||^2.

    The Bradley-Terry MLE of ALGORITHMS.md §2, warm-started each round from the last estimate.
    """
    win_prob = 1.0 / (1.0 + np.exp(-(diffs @ theta)))  # (n,)
    grad = diffs.T @ (win_prob - outcomes) + ridge * theta  # (d,)
    hessian = (diffs.T * (win_prob * (1.0 - win_prob))) @ diffs + ridge * np.eye(theta.size)
    return theta - np.linalg.solve(hessian, grad)


def simulate_kl_ucb(
    bandit: LinearBandit,
    beta: float,
    gamma: float,
    num_rounds: int,
    ridge: float = 1.0,
    feedback: str = "reward",
    r_max: float = 1.0,
    seed: int = 0,
) -> np.ndarray:
    """Per-round regularised regret J_x(pi*) - J_x(pi_t) of KL-regularised UCB, shape (T,).

    ALGORITHMS.md §1; Zhao et al. 2025, Algorithm 1 with a linear class. feedback="reward":
    a noisy reward of one action from pi_t, fitted by ridge regression. feedback="preference":
    a Bradley-Terry comparison of two actions drawn from pi_t, fitted by regularised logistic
    MLE, with Sigma built from feature differences. gamma = 0 gives the greedy learner.
    """
    beta, ridge = check_positive("beta", beta), check_positive("ridge", ridge)
    gamma = check_nonnegative("gamma", gamma)
    num_rounds = check_count("num_rounds", num_rounds, 1)
    r_max = float(as_finite("r_max", r_max))
    if feedback not in FEEDBACK_KINDS:
        raise ValueError(f"feedback must be one of {FEEDBACK_KINDS}, got {feedback!r}")
    rng = np.random.default_rng(seed)
    C, K, d = bandit.features.shape
    true_rewards, log_ref = bandit.rewards, np.log(bandit.ref)  # (C, K)
    log_optimum = np.stack([_log_softmax(row) for row in log_ref + true_rewards / beta])  # (C, K)
    contexts = rng.integers(C, size=num_rounds)

    theta_hat, sigma_inv = np.zeros(d), np.eye(d) / ridge
    targets = np.zeros(d)  # sum_s y_s phi_s (ridge regression's right-hand side)
    diffs, outcomes = np.zeros((num_rounds, d)), np.zeros(num_rounds)  # comparison data
    regret = np.empty(num_rounds)
    for t, x in enumerate(contexts):
        phi = bandit.features[x]  # (K, d)
        bonus = gamma * np.sqrt(np.einsum("kd,de,ke->k", phi, sigma_inv, phi))  # (K,)
        optimistic = np.minimum(r_max, phi @ theta_hat + bonus)  # (K,)
        log_policy = _log_softmax(log_ref[x] + optimistic / beta)  # (K,)
        policy = np.exp(log_policy)
        regret[t] = beta * np.sum(policy * (log_policy - log_optimum[x]))  # beta KL(pi_t || pi*)

        if feedback == "reward":
            action = rng.choice(K, p=policy)
            reward = true_rewards[x, action] + bandit.noise_std * rng.standard_normal()
            sigma_inv = _sherman_morrison(sigma_inv, phi[action])
            targets += reward * phi[action]
            theta_hat = sigma_inv @ targets
        else:
            first, second = rng.choice(K, size=2, p=policy)
            gap = true_rewards[x, first] - true_rewards[x, second]
            diffs[t] = phi[first] - phi[second]
            outcomes[t] = rng.random() < 1.0 / (1.0 + np.exp(-gap))
            sigma_inv = _sherman_morrison(sigma_inv, diffs[t])
            theta_hat = _logistic_newton_step(theta_hat, diffs[: t + 1], outcomes[: t + 1], ridge)
    return regret
