"""The beta-regularised preference game: its Nash equilibrium, exploitability, exact iterations.

ALGORITHMS.md §3; Tiapkin et al. 2025 (Nash Mirror Prox; its later version "Proximal Point Nash
Learning from Human Feedback": Nash Prox), Munos et al. 2023 (Nash-MD), Calandriello et al. 2024
(online IPO), Zhou, Fazel, Du 2025 (EGPO), Wu et al. 2024 (SPPO).

A preference matrix `P[i, j]` is the probability that action i beats action j, with
`P + P.T = 1`. `P @ pi` is the vector `P(. > pi)`: each action's win rate against a policy.
The regularised game `P_beta(pi > pi') = P(pi > pi') - beta KL(pi||ref) + beta KL(pi'||ref)` has
a unique, symmetric equilibrium `pi* ∝ ref * exp(P(. > pi*) / beta)`.

Iterations run in log space so a reference mass of 1e-30 or a beta of 0.01 stays exact.
"""

from __future__ import annotations

import numpy as np

from klalign.theory._checks import (
    as_distribution,
    as_preference_matrix,
    check_count,
    check_positive,
)
from klalign.theory.tilt import kl, log_partition, safe_log, tilt

# Opponent evaluations `P(. > opponent)` one iteration spends; in a sampled implementation each
# is one batch of preference queries. Nash-MP's half step and full step each need one.
# Nash Prox solves an inner game per step: its count depends on the inner solver, so it is not listed.
PREFERENCE_QUERIES_PER_STEP = {"nash_mirror_prox": 2, "mirror_descent": 1, "nash_md": 1, "online_ipo": 1,
                               "egpo": 2, "sppo": 1}

NASH_TOLERANCE = 1e-13  # fixed-point residual regularized_nash solves to
NASH_MAX_STEPS = 200_000  # enough for beta = 0.01: Nash-MP contracts by 1/(1+2 beta) per step


def _checked_game(P, ref, beta) -> tuple[np.ndarray, np.ndarray, float]:
    P = as_preference_matrix(P)
    ref = as_distribution("ref", ref)
    if ref.shape != (P.shape[0],):
        raise ValueError(f"ref must have shape ({P.shape[0]},) to match P, got {ref.shape}")
    return P, ref, check_positive("beta", beta)


def _normalize_log(logits: np.ndarray) -> np.ndarray:
    """Shift log-weights so they exponentiate to a distribution."""
    top = np.max(logits)
    return logits - (top + np.log(np.sum(np.exp(logits - top))))


def _prox_log(log_pi, log_ref, opponent_value, beta, eta) -> np.ndarray:
    """log prox(pi, f) ∝ [log pi + eta beta log ref + eta f] / (1 + eta beta).

    ALGORITHMS.md §3: the maximiser of eta (<q, f> - beta KL(q||ref)) - KL(q||pi).
    """
    return _normalize_log((log_pi + eta * beta * log_ref + eta * opponent_value) / (1.0 + eta * beta))


def _checked_policies(pi, K: int) -> np.ndarray:
    pi = as_distribution("pi", pi)
    if pi.shape[-1] != K:
        raise ValueError(f"pi must have shape (..., {K}) to match P, got {pi.shape}")
    return pi


def best_response(P, ref, beta, pi) -> np.ndarray:
    """The regularised best response ref * exp(P(. > pi) / beta) / Z, shape (..., K).

    ALGORITHMS.md §3; pi may be a batch of policies (..., K), e.g. a whole iteration path.
    """
    P, ref, beta = _checked_game(P, ref, beta)
    pi = _checked_policies(pi, P.shape[0])
    return tilt(np.broadcast_to(ref, pi.shape), pi @ P.T, beta)


def nash_residual(P, ref, beta, pi) -> np.ndarray:
    """max_y |pi(y) - best_response(pi)(y)|, shape (...): zero exactly at the equilibrium."""
    return np.max(np.abs(np.asarray(pi) - best_response(P, ref, beta, pi)), axis=-1)


def exploitability(P, ref, beta, pi) -> np.ndarray:
    """`beta log E_ref exp(P(. > pi)/beta) + beta KL(pi||ref) - 1/2`, shape (...), zero at pi* only.

    ALGORITHMS.md §3; Tiapkin et al. 2025: the best response's value against pi minus the game's
    value 1/2 (pi^T P pi = 1/2 because P + P.T = 1), i.e. half the duality gap.
    """
    P, ref, beta = _checked_game(P, ref, beta)
    pi = _checked_policies(pi, P.shape[0])
    ref = np.broadcast_to(ref, pi.shape)
    return beta * log_partition(ref, pi @ P.T, beta) + beta * kl(pi, ref) - 0.5


def _nash_mirror_prox_log_step(P, log_ref, beta, eta, log_pi) -> np.ndarray:
    """One exact Nash-MP iteration (ALGORITHMS.md §3): half step, then full step from pi_k."""
    log_half = _prox_log(log_pi, log_ref, P @ np.exp(log_pi), beta, eta)  # opponent pi_k
    return _prox_log(log_pi, log_ref, P @ np.exp(log_half), beta, eta)  # opponent pi_half


def regularized_nash(P, ref, beta) -> np.ndarray:
    """The symmetric equilibrium pi* ∝ ref * exp(P(. > pi*)/beta), shape (K,).

    ALGORITHMS.md §3; Tiapkin et al. 2025. Runs exact Nash-MP with eta = 2, whose KL to pi*
    contracts by 1/(1+2 beta) per step for any K, until the fixed-point residual is below 1e-13.
    """
    P, ref, beta = _checked_game(P, ref, beta)
    log_ref = safe_log(ref)
    log_pi = log_ref.copy()
    for _ in range(NASH_MAX_STEPS):
        log_pi = _nash_mirror_prox_log_step(P, log_ref, beta, 2.0, log_pi)
        pi = np.exp(log_pi)
        if np.max(np.abs(pi - tilt(ref, P @ pi, beta))) < NASH_TOLERANCE:
            return pi
    raise RuntimeError(f"regularized_nash did not reach residual {NASH_TOLERANCE} in {NASH_MAX_STEPS} steps")


def _checked_path_args(P, ref, beta, eta, num_steps):
    P, ref, beta = _checked_game(P, ref, beta)
    return P, ref, beta, check_positive("eta", eta), check_count("num_steps", num_steps, 0)


def _run_path(log_step, ref: np.ndarray, num_steps: int) -> np.ndarray:
    """Policies pi_0 = ref, ..., pi_num_steps of a log-space iteration, shape (num_steps+1, K)."""
    log_pi = safe_log(ref)
    path = [ref.copy()]
    for _ in range(num_steps):
        log_pi = log_step(log_pi)
        path.append(np.exp(log_pi))
    return np.stack(path)


def nash_mirror_prox(P, ref, beta, eta, num_steps) -> np.ndarray:
    """Exact Nash-MP path from ref, shape (num_steps+1, K). 2 preference queries per step.

    ALGORITHMS.md §3; Tiapkin et al. 2025: pi_half = prox(pi_k, P(. > pi_k)), then
    pi_{k+1} = prox(pi_k, P(. > pi_half)). With eta = 2, KL(pi*||pi_k) <= (1+2beta)^-k KL(pi*||pi_0).
    """
    P, ref, beta, eta, num_steps = _checked_path_args(P, ref, beta, eta, num_steps)
    log_ref = safe_log(ref)
    return _run_path(lambda log_pi: _nash_mirror_prox_log_step(P, log_ref, beta, eta, log_pi), ref, num_steps)


def mirror_descent(P, ref, beta, eta, num_steps) -> np.ndarray:
    """Exact online mirror descent path, pi_{k+1} = prox(pi_k, P(. > pi_k)). 1 query per step.

    ALGORITHMS.md §3, the baseline of Tiapkin et al. 2025: Nash-MP without the half step.
    """
    P, ref, beta, eta, num_steps = _checked_path_args(P, ref, beta, eta, num_steps)
    log_ref = safe_log(ref)
    return _run_path(lambda log_pi: _prox_log(log_pi, log_ref, P @ np.exp(log_pi), beta, eta), ref, num_steps)


def nash_md(P, ref, beta, eta, num_steps) -> np.ndarray:
    """Exact Nash-MD path (Munos et al. 2023), shape (num_steps+1, K). 1 query per step.

    mu_k ∝ pi_k^(1 - eta beta) * ref^(eta beta) (the geometric mixture), then
    pi_{k+1} ∝ mu_k * exp(eta P(. > mu_k)). Needs eta * beta <= 1 for the mixture to be one.
    """
    P, ref, beta, eta, num_steps = _checked_path_args(P, ref, beta, eta, num_steps)
    if eta * beta > 1:
        raise ValueError(f"eta * beta must be <= 1 for Nash-MD's mixture, got {eta * beta:.3g}")
    log_ref = safe_log(ref)

    def step(log_pi):
        log_mixture = _normalize_log((1.0 - eta * beta) * log_pi + eta * beta * log_ref)
        return _normalize_log(log_mixture + eta * (P @ np.exp(log_mixture)))

    return _run_path(step, ref, num_steps)


def random_intransitive_game(K: int, rng: np.random.Generator) -> np.ndarray:
    """A random (K, K) preference matrix: P[i, j] ~ U(0, 1) for i < j, P[j, i] = 1 - P[i, j].

    A random tournament of this kind has preference cycles (i > j > k > i) with high probability,
    so no single action is a Condorcet winner: a test bed for Nash learning (Tiapkin et al. 2025).
    """
    K = check_count("K", K, 1)
    upper = np.triu(rng.uniform(-0.5, 0.5, size=(K, K)), k=1)  # skew-symmetric part above the diagonal
    return 0.5 + upper - upper.T


# ----------------------------------------------------------------------------- self-play methods


def online_ipo(P, ref, beta, step, num_steps) -> np.ndarray:
    """Online IPO in expectation on tabular softmax logits, shape (num_steps+1, K). 1 query per step.

    Calandriello et al. 2024: the IPO loss (Azar et al. 2023, Eq. 17) on pairs y, y' of the current
    policy, (h(y) - h(y') - (P(y > y') - 1/2)/beta)^2 with h = log pi - log ref. Its expected gradient
    is -(4/beta) times the self-play policy gradient of P(pi > sg(pi)) - beta KL(pi||ref) (the
    equivalence Tiapkin et al.'s later version states), so one step of size `step` on the loss
    scaled by beta/4 is
        theta <- theta + step * pi ⊙ (g - <pi, g>),   g = P(. > pi) - beta (log pi - log ref).
    Stationary exactly at pi*; a step that is too large oscillates (small beta needs small steps).
    """
    P, ref, beta = _checked_game(P, ref, beta)
    step, num_steps = check_positive("step", step), check_count("num_steps", num_steps, 0)
    log_ref = safe_log(ref)

    def update(log_pi):
        pi = np.exp(log_pi)
        g = P @ pi - beta * (log_pi - log_ref)
        return _normalize_log(log_pi + step * pi * (g - pi @ g))

    return _run_path(update, ref, num_steps)


def egpo(P, ref, beta, step, num_steps) -> np.ndarray:
    """Exact EGPO path (Zhou, Fazel, Du 2025), shape (num_steps+1, K). 2 queries per step.

    The extragradient step on the online IPO objective with y, y' uniform (their tabular simulation):
        log pi_half = (1 - step beta) log pi_k + step beta log ref + step P(. > pi_k)    + c
        log pi_k+1  = (1 - step beta) log pi_k + step beta log ref + step P(. > pi_half) + c
    i.e. Nash-MP with the KL linearised; it is exactly `nash_mirror_prox` with
    eta = step / (1 - step beta). Needs step * beta < 1.
    """
    P, ref, beta = _checked_game(P, ref, beta)
    step, num_steps = check_positive("step", step), check_count("num_steps", num_steps, 0)
    if step * beta >= 1:
        raise ValueError(f"step * beta must be < 1 for EGPO, got {step * beta:.3g}")
    log_ref = safe_log(ref)

    def linear(log_pi, opponent):
        return _normalize_log((1 - step * beta) * log_pi + step * beta * log_ref + step * (P @ opponent))

    return _run_path(lambda log_pi: linear(log_pi, np.exp(linear(log_pi, np.exp(log_pi)))), ref, num_steps)


def sppo(P, ref, beta, step, num_steps, regularized: bool = True) -> np.ndarray:
    """Exact SPPO path (Wu et al. 2024), shape (num_steps+1, K). 1 opponent evaluation per step.

    SPPO regresses log pi_{k+1}(y) - log pi_k(y) on step (P(y > pi_k) - 1/2) (its Algorithm 1,
    Eq. 4.7), the multiplicative-weights update log pi_{k+1} = log pi_k + step P(. > pi_k) + c
    (`regularized=False`): it targets the unregularised game, and its last iterate cycles.
    `regularized=True` anchors the regression at the geometric mixture of pi_k and ref (INPO,
    Zhang et al. 2024; MPO, Wang et al. 2024):
        log pi_{k+1} = (1 - step beta) log pi_k + step beta log ref + step P(. > pi_k) + c,
    whose fixed point is pi*: it is exactly `mirror_descent` with eta = step / (1 - step beta).
    """
    P, ref, beta = _checked_game(P, ref, beta)
    step, num_steps = check_positive("step", step), check_count("num_steps", num_steps, 0)
    anchor = step * beta if regularized else 0.0
    if anchor >= 1:
        raise ValueError(f"step * beta must be < 1 for regularised SPPO, got {anchor:.3g}")
    log_ref = safe_log(ref)
    return _run_path(lambda log_pi: _normalize_log((1 - anchor) * log_pi + anchor * log_ref
                                                   + step * (P @ np.exp(log_pi))), ref, num_steps)


def nash_prox(P, ref, beta, eta, num_steps) -> np.ndarray:
    """Exact proximal-point path ("Nash Prox", Tiapkin et al., the later version of the Nash-MP
    paper), shape (num_steps+1, K); each step solves an inner game exactly.

    pi_{k+1} is the equilibrium of the game regularised by beta KL(.||ref) + (1/eta) KL(.||pi_k):
    the two KLs merge into beta' KL(.||mu_k) with beta' = beta + 1/eta and
    mu_k ∝ ref^w pi_k^(1-w), w = eta beta / (1 + eta beta), so pi_{k+1} = regularized_nash(P, mu_k,
    beta'). Its fixed point is pi* (w beta' = beta). The form is inferred from the abstract: the
    paper's own text was not available (docs, "Nash learning from human feedback").
    """
    P, ref, beta, eta, num_steps = _checked_path_args(P, ref, beta, eta, num_steps)
    log_ref = safe_log(ref)
    w = eta * beta / (1 + eta * beta)

    def step(log_pi):
        mu = np.exp(_normalize_log(w * log_ref + (1 - w) * log_pi))
        return safe_log(regularized_nash(P, mu, beta + 1 / eta))

    return _run_path(step, ref, num_steps)
