"""How much of the KL-regularised optimum a policy reaches, estimated from samples (ALGORITHMS.md section 5).

For J(pi) = E_x [E_pi r - beta KL(pi || pi_ref)], on a real model, with no closed form needed:

- J* = max_pi J(pi) = beta E_x log E_{y ~ pi_ref} exp(r(x, y) / beta), the value of the tilt pi*_beta: per
  prompt, beta (logsumexp(r_i / beta) - log n) over the reference's n samples (log-mean-exp: consistent,
  biased low at finite n; the bias shrinks as the effective sample size of the weights w_i = exp(r_i /
  beta), ESS = (sum w)^2 / sum w^2, grows: `bench/optimum_estimator.py` measures it on the test bed);
- J(pi) = E_x [mean reward - beta mean k1] over the policy's own samples (unbiased); J(pi_ref) is the
  reference's mean reward (its KL to itself is 0);
- the captured gain G(pi) = (J(pi) - J(pi_ref)) / (J* - J(pi_ref)): 1 at pi*, 0 at pi_ref, below 1 both
  for a policy that barely moves and for one that overshoots the KL;
- KL(pi || pi*) = (J* - J(pi)) / beta, exact for every policy (section 0's identity); at pi_ref it is
  the starting gap KL(pi_ref || pi*);
- why G falls short (`tilt_alignment`): how far (the tilt scale, 1 at pi*) and how purely (R^2, 1 for every
  tilt of pi_ref by r) the policy's log-ratio moves along the reward.

Standard errors are over the sampling of responses given the prompt set, as every other number of
`klalign evaluate`: a bootstrap that resamples each prompt's reference samples and policy samples (with
replacement, independently), recomputing every estimate from the same resamples, so the correlation of
J* and J(pi_ref) (both from the reference's samples) and the non-linearity of G are carried through.
"""

from __future__ import annotations

import numpy as np

BOOTSTRAP = 400  # resamples; the standard error of a standard error is then ~3.5%
LOW_ESS = 16.0  # below this mean effective sample size per prompt the bias of J* may exceed one SE (README)


def logsumexp(x: np.ndarray, axis: int = -1) -> np.ndarray:
    top = np.max(x, axis=axis, keepdims=True)
    return np.squeeze(top, axis=axis) + np.log(np.sum(np.exp(x - top), axis=axis))


def optimum_values(reference_rewards: np.ndarray, beta: float) -> np.ndarray:
    """J*_x = beta (logsumexp(r / beta) - log n) per prompt. (..., P, n) -> (..., P)"""
    n = reference_rewards.shape[-1]
    return beta * (logsumexp(reference_rewards / beta, axis=-1) - np.log(n))


def objective_values(rewards: np.ndarray, logratios: np.ndarray, beta: float) -> np.ndarray:
    """J_x(pi) = mean r - beta mean k1 per prompt over the policy's samples. (..., P, m) -> (..., P)"""
    return rewards.mean(axis=-1) - beta * logratios.mean(axis=-1)


def effective_sample_sizes(reference_rewards: np.ndarray, beta: float) -> np.ndarray:
    """(sum w)^2 / sum w^2 per prompt, w = exp(r / beta) over the reference's samples. (P, n) -> (P,)"""
    log_w = reference_rewards / beta
    return np.exp(2 * logsumexp(log_w, axis=-1) - logsumexp(2 * log_w, axis=-1))


def _resampled(values: np.ndarray, rng: np.random.Generator, draws: int) -> np.ndarray:
    """`draws` bootstrap copies of (P, n) values, each prompt's n resampled with replacement. (B, P, n)"""
    P, n = values.shape
    idx = rng.integers(0, n, size=(draws, P, n))
    return np.take_along_axis(np.broadcast_to(values, (draws, P, n)), idx, axis=2)


def _resampled_together(rewards: np.ndarray, logratios: np.ndarray, rng: np.random.Generator):
    """BOOTSTRAP copies of a policy's (P, m) rewards and log-ratios, each prompt's samples resampled with
    replacement, the same draws for both (a sample keeps its reward and its log-ratio). (B, P, m) each"""
    P, m = rewards.shape
    idx = rng.integers(0, m, size=(BOOTSTRAP, P, m))
    return tuple(np.take_along_axis(np.broadcast_to(x, (BOOTSTRAP, P, m)), idx, axis=2) for x in (rewards, logratios))


def optimum_estimate(reference_rewards: np.ndarray, beta: float, seed: int = 0) -> dict:
    """The reference row's numbers: J*, J(pi_ref), the starting gap KL(pi_ref || pi*) with standard errors,
    and the effective sample size of the reference's samples at this beta (mean and smallest over prompts)."""
    rewards = np.asarray(reference_rewards, dtype=np.float64)
    rng = np.random.default_rng(seed)
    boot = _resampled(rewards, rng, BOOTSTRAP)  # (B, P, n)
    j_star, j_ref = optimum_values(rewards, beta).mean(), rewards.mean()
    j_star_b, j_ref_b = optimum_values(boot, beta).mean(-1), boot.mean(axis=(-2, -1))  # (B,) each
    ess = effective_sample_sizes(rewards, beta)
    return {
        "beta": float(beta), "j_star": float(j_star), "j_star_se": float(j_star_b.std(ddof=1)),
        "objective": float(j_ref), "objective_se": float(j_ref_b.std(ddof=1)),
        "gain": 0.0, "gain_se": 0.0,
        "kl_to_optimum": float((j_star - j_ref) / beta), "kl_to_optimum_se": float(((j_star_b - j_ref_b) / beta).std(ddof=1)),
        "ess": float(ess.mean()), "ess_min": float(ess.min()),
    }


def captured_gain(reference_rewards: np.ndarray, rewards: np.ndarray, logratios: np.ndarray, beta: float,
                  seed: int = 0) -> dict:
    """A checkpoint's J(pi), captured gain G and KL(pi || pi*) with bootstrap standard errors. The reference's
    (P, n) rewards, the policy's (P, m) rewards and sequence log-ratios log pi(y) - log pi_ref(y)."""
    ref = np.asarray(reference_rewards, dtype=np.float64)
    rewards, logratios = np.asarray(rewards, dtype=np.float64), np.asarray(logratios, dtype=np.float64)
    rng = np.random.default_rng(seed)
    ref_b = _resampled(ref, rng, BOOTSTRAP)  # (B, P, n)
    rewards_b, logratios_b = _resampled_together(rewards, logratios, rng)  # (B, P, m) each

    def estimates(ref_r, r, l):
        j_star, j_ref = optimum_values(ref_r, beta).mean(-1), ref_r.mean(axis=(-2, -1))
        j = objective_values(r, l, beta).mean(-1)
        return j, (j - j_ref) / (j_star - j_ref), (j_star - j) / beta

    j, gain, kl = estimates(ref, rewards, logratios)
    j_b, gain_b, kl_b = estimates(ref_b, rewards_b, logratios_b)
    return {"objective": float(j), "objective_se": float(j_b.std(ddof=1)), "gain": float(gain),
            "gain_se": float(gain_b.std(ddof=1)), "kl_to_optimum": float(kl), "kl_to_optimum_se": float(kl_b.std(ddof=1))}


def _tilt_fit(rewards: np.ndarray, logratios: np.ndarray, beta: float) -> tuple[np.ndarray, np.ndarray]:
    """beta x the within-prompt least-squares slope of the log-ratio on the reward, and its R^2, pooled over
    prompts. (..., P, m) each -> (...,) each; NaN where the reward or the log-ratio never varies."""
    rc = rewards - rewards.mean(axis=-1, keepdims=True)  # (..., P, m)
    lc = logratios - logratios.mean(axis=-1, keepdims=True)
    srl, srr, sll = (rc * lc).sum(axis=(-2, -1)), (rc * rc).sum(axis=(-2, -1)), (lc * lc).sum(axis=(-2, -1))
    with np.errstate(divide="ignore", invalid="ignore"):
        return beta * srl / srr, srl**2 / (srr * sll)


def tilt_alignment(rewards: np.ndarray, logratios: np.ndarray, beta: float, seed: int = 0) -> dict:
    """Why a checkpoint's G is what it is: how far, and how purely, its log-ratio moves along the reward.

    Every tilt pi_a = pi_ref exp(a r / beta) / Z_a has log pi_a(y) / pi_ref(y) = a r(y) / beta - log Z_a, on
    every sample: regressing a policy's sequence log-ratios on its samples' rewards within each prompt gives
    - the tilt scale a = beta x slope: 1 at the optimum pi*_beta, below 1 for a policy that has not moved far
      enough along the reward, above 1 for one that overshoots;
    - R^2, the share of the log-ratio's within-prompt variance that the reward explains: 1 for every tilt,
      below 1 for a policy that also moves in directions the reward does not rank (KL spent for nothing).
    The policy's (P, m) rewards and log-ratios; bootstrap standard errors over each prompt's samples."""
    rewards, logratios = np.asarray(rewards, dtype=np.float64), np.asarray(logratios, dtype=np.float64)
    rewards_b, logratios_b = _resampled_together(rewards, logratios, np.random.default_rng(seed))  # (B, P, m)
    scale, r2 = _tilt_fit(rewards, logratios, beta)
    if not (np.isfinite(scale) and np.isfinite(r2)):  # pi_ref itself (log-ratio 0 on every sample): undefined,
        return {"tilt_scale": None, "tilt_scale_se": None, "tilt_r2": None, "tilt_r2_se": None}  # JSON has no NaN
    scale_b, r2_b = _tilt_fit(rewards_b, logratios_b, beta)  # (B,) each; NaN where a resample never varies
    return {"tilt_scale": float(scale), "tilt_scale_se": float(np.nanstd(scale_b, ddof=1)),
            "tilt_r2": float(r2), "tilt_r2_se": float(np.nanstd(r2_b, ddof=1))}
