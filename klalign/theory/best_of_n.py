"""Best-of-N: its exact law, its KL to the reference, Beirami's bound and estimator, win rate.

ALGORITHMS.md §4; Beirami et al. 2024 ("Theoretical guarantees on the best-of-n alignment
policy") and Yang et al. 2024 ("Asymptotics of language model alignment").

Best-of-N draws N outcomes from p and keeps the one with the highest reward. Outcomes with equal
reward form a level; the level's mass under BoN is F^N - F_^N (F = P(r <= level), F_ = P(r <
level)) and it is split among the level's outcomes in proportion to p, so every outcome of a
level has the same ratio pi_N / p. All functions accept a real N >= 1 (the formula extends to it)
and broadcast N against the leading axes of p, r of shape (..., K).
"""

from __future__ import annotations

import numpy as np

from klalign.theory._checks import (
    as_distribution,
    as_finite,
    as_sample_count,
    check_count,
    check_same_shape,
)
from klalign.theory.tilt import safe_log


def _levels(p: np.ndarray, r: np.ndarray) -> dict[str, np.ndarray]:
    """Per outcome, in the input order: log F, log F_ and the mass of its reward level.

    Cumulative sums are taken from both ends and each quantity is read from the end where it
    is small, so an upper tail of mass 1e-200 (long sequences) keeps its relative precision.
    """
    order = np.argsort(r, axis=-1, kind="stable")  # (..., K) ascending reward
    r_sorted = np.take_along_axis(r, order, axis=-1)
    p_sorted = np.take_along_axis(p, order, axis=-1)
    p_sorted = p_sorted / p_sorted.sum(axis=-1, keepdims=True)  # absorb the 1e-8 slack
    below_incl = np.cumsum(p_sorted, axis=-1)  # P(position <= i)
    below_excl = below_incl - p_sorted
    above_incl = np.cumsum(p_sorted[..., ::-1], axis=-1)[..., ::-1]  # P(position >= i)
    above_excl = above_incl - p_sorted

    # First and last sorted position of each outcome's tie group.
    K = r.shape[-1]
    position = np.broadcast_to(np.arange(K), r.shape)
    new_level = r_sorted[..., 1:] != r_sorted[..., :-1]  # (..., K-1)
    is_first = np.concatenate([np.ones_like(new_level[..., :1]), new_level], axis=-1)
    is_last = np.concatenate([new_level, np.ones_like(new_level[..., :1])], axis=-1)
    first = np.maximum.accumulate(np.where(is_first, position, 0), axis=-1)
    last = np.minimum.accumulate(np.where(is_last, position, K - 1)[..., ::-1], axis=-1)[..., ::-1]

    def at(values, index):
        return np.take_along_axis(values, index, axis=-1)

    F, F_strict = at(below_incl, last), at(below_excl, first)  # P(r <= level), P(r < level)
    G, G_strict = at(above_incl, first), at(above_excl, last)  # P(r >= level) = 1 - F_, P(r > level)
    level_mass = np.where(F < 0.5, F - F_strict, G - G_strict)
    with np.errstate(divide="ignore"):
        log_F = np.where(F < 0.5, safe_log(F), np.log1p(-np.minimum(G_strict, 1.0)))
        log_F_strict = np.where(F_strict < 0.5, safe_log(F_strict), np.log1p(-np.minimum(G, 1.0)))

    unsort = np.argsort(order, axis=-1)
    return {
        "log_F": at(log_F, unsort),
        "log_F_strict": at(log_F_strict, unsort),
        "level_mass": at(level_mass, unsort),
        "F_strict": at(F_strict, unsort),
    }


def _checked(p, r, n) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    p = as_distribution("p", p)
    r = as_finite("r", r)
    check_same_shape("p", p, "r", r)
    n = as_sample_count("n", n)[..., None]  # broadcasts against p's leading axes
    return p, r, n


def _log_ratio(p: np.ndarray, levels: dict[str, np.ndarray], n: np.ndarray) -> np.ndarray:
    """log(pi_N(y) / p(y)) = log(F^N - F_^N) - log(level mass), -inf where p(y) = 0.

    F^N - F_^N = F^N * (1 - exp(N (log F_ - log F))), evaluated with expm1 so a level with tiny
    mass (a large near-uniform support) keeps full precision.
    """
    log_F, log_F_strict = levels["log_F"], levels["log_F_strict"]
    with np.errstate(divide="ignore", invalid="ignore"):
        log_level_bon = n * log_F + np.log(-np.expm1(n * (log_F_strict - log_F)))
        log_ratio = log_level_bon - np.log(levels["level_mass"])
    return np.where(p > 0, log_ratio, -np.inf)


def best_of_n_distribution(p, r, n) -> np.ndarray:
    """Exact law of the best-of-N outcome, shape (..., K).

    ALGORITHMS.md §4; Beirami et al. 2024, Lemma 1: pi_N(y) = F(y)^N - F_(y)^N for distinct
    rewards; tied outcomes share their level's mass in proportion to p.
    """
    p, r, n = _checked(p, r, n)
    log_ratio = _log_ratio(p, _levels(p, r), n)
    return np.where(p > 0, p * np.exp(log_ratio), 0.0)


def best_of_n_kl(p, r, n) -> np.ndarray:
    """Exact KL(pi_N || p), shape (...) (Beirami et al. 2024, §3), from the log ratio directly."""
    p, r, n = _checked(p, r, n)
    log_ratio = _log_ratio(p, _levels(p, r), n)
    pi_n = np.where(p > 0, p * np.exp(log_ratio), 0.0)
    return np.sum(pi_n * np.where(p > 0, log_ratio, 0.0), axis=-1)  # 0 log 0 = 0 off the support


def best_of_n_kl_bound(n) -> np.ndarray:
    """The classical `log N - (N-1)/N`, an upper bound on KL(pi_N || p) (Beirami et al. 2024, Thm 1)."""
    n = as_sample_count("n", n)
    return np.log(n) - (n - 1.0) / n


def best_of_n_kl_estimate(eps, n) -> np.ndarray:
    """Beirami et al. 2024's KL estimator D(eps), eps = p(selected outcome); ALGORITHMS.md §4.

    D(eps) = (1-eps)^N [log N + (N-1) log(1-eps) - (N-1)/N]
             + (1 - (1-eps)^N) log((1 - (1-eps)^N) / eps),
    which lies in [0, log N - (N-1)/N]. eps in (0, 1] and n broadcast against each other.
    """
    eps = as_finite("eps", eps)
    if np.any(eps <= 0) or np.any(eps > 1):
        raise ValueError("eps must lie in (0, 1]")
    n = as_sample_count("n", n)
    with np.errstate(divide="ignore", invalid="ignore"):  # eps = 1: log(1 - eps) = -inf, weight 0
        log_miss = np.log1p(-eps)
        miss_all = np.exp(n * log_miss)  # (1-eps)^N: no draw hits the outcome's mass
        hit = -np.expm1(n * log_miss)  # 1 - (1-eps)^N, exact for tiny eps
        spread_term = np.log(n) + np.where(miss_all > 0, (n - 1.0) * log_miss, 0.0) - (n - 1.0) / n
    return miss_all * spread_term + hit * (np.log(hit) - np.log(eps))


def best_of_n_kl_estimate_mean(p, r, n) -> np.ndarray:
    """E_{y ~ pi_N} D(p(y)): the exact mean of Beirami's estimator over best-of-N samples."""
    pi_n = best_of_n_distribution(p, r, n)
    p = np.broadcast_to(np.asarray(p, dtype=np.float64), pi_n.shape)
    eps = np.where(p > 0, p, 1.0)  # p = 0 outcomes have pi_N = 0 and drop out
    n = np.asarray(n, dtype=np.float64)[..., None]
    return np.sum(pi_n * best_of_n_kl_estimate(eps, n), axis=-1)


def best_of_n_win_rate(p, r, n) -> np.ndarray:
    """P(r(Y_N) > r(Y)) + 1/2 P(r(Y_N) = r(Y)), Y_N ~ pi_N and Y ~ p independent, shape (...).

    Convention: a tie counts as half a win. With it the win rate is at most N/(N+1), with
    equality only when no outcome has noticeable mass (Beirami et al. 2024, §5).
    """
    p, r, n = _checked(p, r, n)
    levels = _levels(p, r)
    log_ratio = _log_ratio(p, levels, n)
    pi_n = np.where(p > 0, p * np.exp(log_ratio), 0.0)
    mid_rank = levels["F_strict"] + 0.5 * levels["level_mass"]  # P(r(Y) < r(y)) + P(tie) / 2
    return np.sum(pi_n * mid_rank, axis=-1)


def sum_reward_distribution(token_probs, token_rewards, num_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Law of the total reward of `num_tokens` i.i.d. tokens with integer rewards: (probs, totals).

    The memoryless model of Yang et al. 2024 (§4 of ALGORITHMS.md): the total is a sum of i.i.d.
    integer rewards, whose law is the num_tokens-fold convolution of the per-token law. Direct
    (not FFT) convolution of nonnegative terms keeps tail masses far below 1e-16 exact.
    """
    token_probs = as_distribution("token_probs", token_probs)
    token_rewards = as_finite("token_rewards", token_rewards)
    check_same_shape("token_probs", token_probs, "token_rewards", token_rewards)
    if token_probs.ndim != 1 or np.any(token_rewards != np.round(token_rewards)):
        raise ValueError("token_rewards must be a 1-D array of integers")
    num_tokens = check_count("num_tokens", num_tokens, 1)
    offset = int(token_rewards.min())
    per_token = np.zeros(int(token_rewards.max()) - offset + 1)  # law of one token's reward
    np.add.at(per_token, token_rewards.astype(int) - offset, token_probs)
    total = per_token
    for _ in range(num_tokens - 1):
        total = np.convolve(total, per_token)
    totals = np.arange(total.size, dtype=np.float64) + offset * num_tokens
    return total, totals


def memoryless_best_of_n(token_probs, token_rewards, num_tokens: int, n) -> tuple[np.ndarray, np.ndarray]:
    """Per-token reward and per-token KL(pi_N || p^m) of best-of-N over sequences of m tokens.

    Yang et al. 2024, memoryless model with additive reward. Sequences with the same total reward
    tie, so pi_N / p depends on the sequence only through its total: both the expected reward
    and the KL are therefore exact computations on the law of the total (ties split ∝ p).
    """
    probs, totals = sum_reward_distribution(token_probs, token_rewards, num_tokens)
    pi_n = best_of_n_distribution(probs, totals, n)
    return np.sum(pi_n * totals, axis=-1) / num_tokens, best_of_n_kl(probs, totals, n) / num_tokens
