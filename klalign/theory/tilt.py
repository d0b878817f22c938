"""The KL-regularised optimum: exponential tilting of a reference distribution.

Everything here is exact and vectorised over leading axes: a distribution `p` and a reward `r`
have shape (..., K), the last axis being the outcomes (responses, actions, tokens).

ALGORITHMS.md §0 (all four papers): `pi* = p * exp(r/beta) / Z`, `J(pi*) = beta * log Z`,
and `J(pi*) - J(pi) = beta * KL(pi || pi*)` for every `pi`.
"""

from __future__ import annotations

import numpy as np

from klalign.theory._checks import (
    as_distribution,
    as_finite,
    broadcast_pair,
    check_nonnegative,
    check_positive,
    check_same_shape,
)

BISECTION_STEPS = 200  # far more than the ~60 halvings that float64 can resolve; stops early


def safe_log(p: np.ndarray) -> np.ndarray:
    """log with log(0) = -inf and no warning (zero-probability outcomes drop out of every sum)."""
    with np.errstate(divide="ignore"):
        return np.log(p)


def _logsumexp(logits: np.ndarray) -> np.ndarray:
    """log sum exp over the last axis; an all -inf row gives -inf."""
    top = np.max(logits, axis=-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return np.log(np.sum(np.exp(logits - top), axis=-1)) + top[..., 0]


def _checked(p, r) -> tuple[np.ndarray, np.ndarray]:
    p = as_distribution("p", p)
    r = as_finite("r", r)
    check_same_shape("p", p, "r", r)
    return p, r


def log_partition(p, r, beta) -> np.ndarray:
    """log Z = log sum_y p(y) exp(r(y)/beta), shape (...).

    ALGORITHMS.md §0: `J(pi*) = beta * log Z` is the optimal value of the regularised objective.
    """
    p, r = _checked(p, r)
    beta = check_positive("beta", beta)
    return _logsumexp(safe_log(p) + r / beta)


def _tilt_log_probs(log_p: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """log of p * exp(scores) / Z over the last axis (scores = r/beta, or lam * r)."""
    logits = log_p + scores
    return logits - _logsumexp(logits)[..., None]


def tilt(p, r, beta) -> np.ndarray:
    """The KL-regularised optimum `pi* = p * exp(r/beta) / Z`, shape (..., K).

    ALGORITHMS.md §0; Xiong et al. 2024 (GSHF) and Zhao et al. 2025 write it with eta = 1/beta.
    Computed by log-sum-exp, so beta may be tiny and r large without overflow.
    """
    p, r = _checked(p, r)
    beta = check_positive("beta", beta)
    return np.exp(_tilt_log_probs(safe_log(p), r / beta))


def kl(q, p) -> np.ndarray:
    """KL(q || p) = sum_y q log(q/p) over the last axis, shape (...).

    Convention: 0 log 0 = 0 (outcomes with q = 0 add nothing) and the divergence is +inf when
    q puts mass where p has none. q and p broadcast over leading axes (one q against a path of p).
    """
    q, p = broadcast_pair("q", as_distribution("q", q), "p", as_distribution("p", p))
    with np.errstate(divide="ignore", invalid="ignore"):
        log_ratio = np.log(q) - np.log(p)  # +inf where p = 0 < q; nan where both are 0
        terms = np.where(q > 0, q * log_ratio, 0.0)
    return np.sum(terms, axis=-1)


def regularized_objective(q, p, r, beta) -> np.ndarray:
    """J(q) = E_q r - beta * KL(q || p), shape (...). ALGORITHMS.md Notation and §0."""
    p, r = _checked(p, r)
    q = as_distribution("q", q)
    check_same_shape("q", q, "p", p)
    beta = check_positive("beta", beta)
    return np.sum(q * r, axis=-1) - beta * kl(q, p)


def tilted_frontier(p, r, lam) -> tuple[np.ndarray, np.ndarray]:
    """Reward and KL of `phi_lam ∝ p * exp(lam * r)`: (R(lam), KL(phi_lam || p)).

    ALGORITHMS.md §0; Yang et al. 2024, the optimal KL-constrained solution. `lam` (>= 0)
    broadcasts against the leading axes of p and r, so one call traces the whole frontier.
    The KL uses `log(phi/p) = lam * (r - r_top) - log Z'` with rewards shifted by their top
    value, which stays exact as lam grows (KL -> -log p(argmax set)).
    """
    p, r = _checked(p, r)
    lam = np.asarray(lam, dtype=np.float64)
    if not np.all(np.isfinite(lam)) or np.any(lam < 0):
        raise ValueError("lam must be finite and >= 0")
    r_top = np.max(np.where(p > 0, r, -np.inf), axis=-1, keepdims=True)  # (..., 1)
    scores = lam[..., None] * (r - r_top)  # (..., K), <= 0 on the support
    log_phi = _tilt_log_probs(safe_log(p), scores)
    phi = np.exp(log_phi)
    log_ratio = scores - _logsumexp(safe_log(p) + scores)[..., None]
    reward = np.sum(phi * r, axis=-1)
    divergence = np.sum(np.where(phi > 0, phi * log_ratio, 0.0), axis=-1)
    return reward, np.maximum(divergence, 0.0)


def max_tilted_kl(p, r) -> np.ndarray:
    """sup_lam KL(phi_lam || p) = -log p(argmax set), shape (...): the tilt ends on the best outcomes."""
    p, r = _checked(p, r)
    r_top = np.max(np.where(p > 0, r, -np.inf), axis=-1, keepdims=True)
    return -np.log(np.sum(np.where((r == r_top) & (p > 0), p, 0.0), axis=-1))


def tilt_for_kl_budget(p, r, delta) -> float:
    """The `lam >= 0` with KL(phi_lam || p) = delta, where phi_lam ∝ p * exp(lam * r).

    ALGORITHMS.md §0: KL(lam) = lam * R(lam) - log Z(lam) increases in lam, so bisection finds
    the root; the tilted optimum at KL budget delta is `tilt(p, r, 1/lam)` (Yang et al. 2024).
    p and r have shape (K,). delta must lie in [0, -log p(argmax set)); delta = 0 gives 0.
    """
    p, r = _checked(p, r)
    if p.ndim != 1:
        raise ValueError(f"p must have shape (K,), got {p.shape}")
    delta = check_nonnegative("delta", delta)
    if delta == 0.0:
        return 0.0
    kl_max = float(max_tilted_kl(p, r))
    if delta >= kl_max:
        raise ValueError(
            f"delta={delta:.6g} is out of range: the largest KL a tilt reaches is "
            f"-log p(argmax set) = {kl_max:.6g}"
        )

    def tilted_kl(lam: float) -> float:
        return float(tilted_frontier(p, r, lam)[1])

    lo, hi = 0.0, 1.0
    while tilted_kl(hi) < delta:  # grow the bracket; KL(hi) -> kl_max > delta
        lo, hi = hi, 2.0 * hi
        if hi > 1e300:
            raise ValueError(f"delta={delta:.6g} is too close to the maximum {kl_max:.6g} to resolve")
    for _ in range(BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):  # the bracket is one float wide
            break
        lo, hi = (mid, hi) if tilted_kl(mid) < delta else (lo, mid)
    return 0.5 * (lo + hi)


def kl_estimators(log_ratio) -> dict[str, np.ndarray]:
    """Per-sample KL estimators from `l = log pi(y) - log pi_ref(y)` with `y ~ pi`.

    ALGORITHMS.md §0: k1 = l (unbiased, can be negative), k2 = l^2 / 2 (biased, low variance),
    k3 = exp(-l) - 1 + l (unbiased since E_pi exp(-l) = 1, and >= 0). Average over samples.
    """
    log_ratio = as_finite("log_ratio", log_ratio)
    return {
        "k1": log_ratio,
        "k2": 0.5 * log_ratio**2,
        "k3": np.expm1(-log_ratio) + log_ratio,
    }


def rso_acceptance_rate(p, r, beta, r_max) -> np.ndarray:
    """Expected acceptance of RSO's rejection sampler, `Z * exp(-r_max/beta)`, shape (...).

    ALGORITHMS.md §2; Xiong et al. 2024 (GSHF), statistical rejection sampling: a draw y ~ p is
    accepted with probability exp((r(y) - r_max)/beta), which yields samples of tilt(p, r, beta).
    r_max must bound the reward on the support of p, or that is not a probability.
    """
    p, r = _checked(p, r)
    beta = check_positive("beta", beta)
    r_max = as_finite("r_max", r_max)
    r_top = np.max(np.where(p > 0, r, -np.inf), axis=-1)
    if np.any(r_top > r_max):
        raise ValueError("r_max must be >= the largest reward on the support of p")
    return np.exp(_logsumexp(safe_log(p) + r / beta) - r_max / beta)
