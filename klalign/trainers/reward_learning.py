"""Reward learners with uncertainty, for optimistic KL-regularised RLHF (ALGORITHMS.md section 1).

Zhao, Ye, Xiong, Gu, Zhang 2025 (paper 000; ICML 2025, arXiv 2502.07460, Algorithm 1 "KL-regularized
UCB") fit `r_hat` on all feedback so far, add a bonus `b_t` and play the Gibbs policy of the optimistic
reward `r_tilde = min(r_max, r_hat + b_t)`. This module holds the first three steps;
`klalign.trainers.optimistic` trains the policy toward the fourth. The paper analyses absolute
(reward) feedback; the comparison variant below (Bradley-Terry MLE, Sigma from feature differences,
as in ALGORITHMS.md section 1 and `klalign.theory.simulate_kl_ucb`) takes its bonus on a difference
of features too (see below; the exact-regime simulator still takes it on absolute features).

Reward learners (all on a frozen feature map phi, float64):

- `LinearReward`: `r_hat = theta . phi`, the elliptical bonus `gamma * ||phi||_{Sigma^-1}` with
  `Sigma = lam I + sum_s z_s z_s^T` (z = phi for scalar rewards, phi_a - phi_b for comparisons).
  Scalar rewards: ridge regression. Comparisons: the Bradley-Terry MLE (L2-regularised logistic
  regression on feature differences), solved by Newton's method.
- `EnsembleReward`: H linear heads, each fitted on its own bootstrap weights (Poisson(1) per data
  point and head) and regularised toward its own random prior (Osband et al. 2018, "randomized prior
  functions": without a prior an ensemble agrees before it sees data, so it has no optimism where it
  is needed most). `r_hat` is the heads' mean, the bonus `gamma * std over heads`: the practical
  stand-in for "the spread of the reward functions still consistent with the data".

Comparisons identify rewards only up to a constant per prompt: they inform the directions phi_a - phi_b
and nothing else, so a direction that every response shares (a constant offset of phi; MiniLM's mean
embedding, along which every phi has a large component) never enters Sigma, and the ensemble's heads keep
their priors' disagreement along it. A learner fitted on comparisons therefore measures a response's
uncertainty relative to a baseline (`bonus(phi, baseline)`, see `RewardLearner.bonus`): the width of
`r(x, y) - r(x, baseline)`, the quantity the data inform. Scalar rewards keep the absolute bonus.

Every fit is a function of the data (and a seed) only, never of earlier fits, so a resumed run
refits exactly the same reward. `gamma = 0` gives the greedy learner.

The feature maps phi they learn on are in `klalign.trainers.features`.
"""

from __future__ import annotations

import math

import torch

NEWTON_TOLERANCE = 1e-10
NEWTON_MAX_STEPS = 100


# ----------------------------------------------------------------------------- fitting


def ridge_solution(phi: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, ridge: float,
                   prior: torch.Tensor) -> torch.Tensor:
    """argmin_theta sum_i w_i (y_i - phi_i . theta)^2 + ridge ||theta - prior||^2. (N, d) -> (d,)

    Closed form `(ridge I + Phi^T W Phi)^-1 (Phi^T W y + ridge prior)`, by Cholesky.
    """
    sigma = ridge * torch.eye(phi.shape[1], dtype=phi.dtype) + (phi.T * weights) @ phi  # (d, d)
    rhs = (phi.T * weights) @ y + ridge * prior  # (d,)
    return torch.cholesky_solve(rhs[:, None], torch.linalg.cholesky(sigma)).squeeze(1)


def logistic_solution(z: torch.Tensor, wins: torch.Tensor, weights: torch.Tensor, ridge: float,
                      prior: torch.Tensor) -> torch.Tensor:
    """The regularised Bradley-Terry MLE on feature differences z = phi_a - phi_b. (N, d) -> (d,)

    Minimises `f(theta) = sum_i w_i [log(1 + e^{z_i theta}) - o_i z_i theta] + ridge/2 ||theta - prior||^2`
    (ALGORITHMS.md section 2: P(a > b) = sigmoid(r_a - r_b)) by Newton's method with backtracking,
    started at the prior every time, so the result depends on the data only. f is strongly convex
    (ridge > 0): the minimiser is unique and Newton converges to it.
    """

    def objective(theta):
        logits = z @ theta  # (N,)
        loss = (weights * (torch.nn.functional.softplus(logits) - wins * logits)).sum()
        return loss + ridge / 2 * (theta - prior).square().sum()

    theta = prior.clone()
    eye = torch.eye(z.shape[1], dtype=z.dtype)
    value = objective(theta)
    for _ in range(NEWTON_MAX_STEPS):
        p = torch.sigmoid(z @ theta)  # (N,) P(a beats b) under theta
        grad = z.T @ (weights * (p - wins)) + ridge * (theta - prior)  # (d,)
        hessian = (z.T * (weights * p * (1 - p))) @ z + ridge * eye  # (d, d)
        step = torch.cholesky_solve(grad[:, None], torch.linalg.cholesky(hessian)).squeeze(1)
        size = 1.0
        while (new_value := objective(theta - size * step)) > value and size > 1e-8:
            size /= 2  # the full Newton step can overshoot far from the optimum
        theta, value = theta - size * step, new_value
        if (size * step).abs().max() < NEWTON_TOLERANCE:
            break
    return theta


# ----------------------------------------------------------------------------- reward learners


class RewardLearner:
    """A reward estimate with an uncertainty bonus; `optimistic` is paper 000's `r_tilde`.

    Subclasses implement `fit` (scalar rewards), `fit_preferences` (comparisons), `predict` and `bonus`.
    """

    def __init__(self, dim: int, ridge: float = 1.0, gamma: float = 1.0, r_max: float | None = None):
        if dim < 1 or ridge <= 0 or gamma < 0:
            raise ValueError(f"need dim >= 1, ridge > 0, gamma >= 0; got dim={dim}, ridge={ridge}, gamma={gamma}")
        self.dim, self.ridge, self.gamma, self.r_max = dim, ridge, gamma, r_max
        self.feedback: str | None = None  # "reward" or "preference": what the last fit saw

    def fit(self, phi: torch.Tensor, rewards: torch.Tensor, weights: torch.Tensor | None = None) -> RewardLearner:
        raise NotImplementedError

    def fit_preferences(self, phi_a: torch.Tensor, phi_b: torch.Tensor, a_wins: torch.Tensor,
                        weights: torch.Tensor | None = None, temperature: float = 1.0) -> RewardLearner:
        """Fit on comparisons (1 if a won) under the link P(a > b) = sigmoid((r_a - r_b) / temperature): the
        fitted reward is in the units of r, which is what `r_max` clips (`_differences`)."""
        raise NotImplementedError

    def predict(self, phi: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def bonus(self, phi: torch.Tensor, baseline: torch.Tensor | None = None) -> torch.Tensor:
        """The uncertainty bonus b_t of each row of `phi` (N, d); with `baseline` (N, d) that of its reward
        relative to the baseline's, `b_t(x, y) = width of r(x, y) - r(x, baseline)`. (N,)

        After `fit_preferences` a baseline is required: comparisons inform only differences of features,
        so the absolute width never shrinks along a direction that every response shares (module
        docstring). Paper 000 (Zhao, Ye, Xiong, Gu, Zhang 2025, Algorithm 1) analyses absolute rewards,
        `b_t = gamma ||phi(x, y)||_{Sigma_t^-1}`; with comparisons, `Sigma_t` is built from differences
        and the bonus is taken on a difference too, as in the preference-feedback analyses it builds on
        (Xiong et al. 2024, GSHF: `||E_pi1 phi - E_pi2 phi||_{Sigma^-1}`; Zhao et al. 2024: the
        uncertainty of `r(x, a) - r(x, b)`): `b_t(x, y) = gamma ||phi(x, y) - phi_0(x)||_{Sigma_t^-1}`.
        It is still optimistic where it matters: for every theta with `||theta_hat - theta||_Sigma <= gamma`,
        `r_hat(x, y) + b_t(x, y) >= r(x, y) + (theta_hat - theta) . phi_0(x)`, and a term that is the same
        for every y of a prompt changes neither the Gibbs policy `pi_ref exp(r_tilde / beta)` nor the
        leave-one-out advantages. `klalign.trainers.optimistic` uses the mean feature of the prompt's
        k samples (`group_baselines`) as phi_0.
        """
        raise NotImplementedError

    def optimistic(self, phi: torch.Tensor, baseline: torch.Tensor | None = None) -> torch.Tensor:
        """`r_tilde = min(r_max, r_hat + bonus)`: paper 000, Algorithm 1; ALGORITHMS.md section 1, step 3. (N,)
        `baseline` as in `bonus` (required after `fit_preferences`)."""
        r = self.predict(phi) + self.bonus(phi, baseline)
        return r if self.r_max is None else r.clamp(max=self.r_max)

    def _bonus_directions(self, phi, baseline) -> torch.Tensor:
        """The rows the bonus measures: phi, or phi - baseline (see `bonus`). (N, d)"""
        phi = self._check(phi)
        if baseline is None:
            if self.feedback == "preference":
                raise ValueError("a learner fitted on comparisons measures uncertainty relative to a baseline: "
                                 "pass baseline= (N, d), e.g. group_baselines(phi) of each prompt's samples; the "
                                 "absolute bonus never shrinks along directions every response shares")
            return phi
        baseline = self._check(baseline)
        if baseline.shape != phi.shape:
            raise ValueError(f"baseline {tuple(baseline.shape)} must have the shape of phi {tuple(phi.shape)}")
        return phi - baseline

    def _differences(self, phi_a, phi_b, temperature: float) -> torch.Tensor:
        """z = (phi_a - phi_b) / temperature: the logistic model sigmoid(z . theta) is then
        sigmoid((r_a - r_b) / temperature) with r = phi . theta. (N, d)"""
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        return (self._check(phi_a) - self._check(phi_b)) / temperature

    def _check(self, phi: torch.Tensor) -> torch.Tensor:
        phi = torch.as_tensor(phi, dtype=torch.float64)
        if phi.ndim != 2 or phi.shape[1] != self.dim:
            raise ValueError(f"features must have shape (N, {self.dim}), got {tuple(phi.shape)}")
        return phi


class LinearReward(RewardLearner):
    """`r_hat = theta . phi` with the elliptical bonus `gamma * ||phi||_{Sigma^-1}` (paper 000, linear class).

    `Sigma = ridge I + sum_s z_s z_s^T` with z = phi (rewards) or phi_a - phi_b (comparisons), as in
    `klalign.theory.simulate_kl_ucb`. Before any fit: theta = 0, Sigma = ridge I.
    """

    def __init__(self, dim: int, ridge: float = 1.0, gamma: float = 1.0, r_max: float | None = None):
        super().__init__(dim, ridge, gamma, r_max)
        self.theta = torch.zeros(dim, dtype=torch.float64)
        self.sigma_cholesky = math.sqrt(ridge) * torch.eye(dim, dtype=torch.float64)

    def fit(self, phi, rewards, weights=None):
        """Ridge regression on (phi, reward) pairs; `weights` (N,) repeat data points (default 1)."""
        phi = self._check(phi)
        y = torch.as_tensor(rewards, dtype=torch.float64)
        w = _unit_weights(len(y), weights)
        self.theta = ridge_solution(phi, y, w, self.ridge, torch.zeros(self.dim, dtype=torch.float64))
        self._set_sigma(phi, w)
        self.feedback = "reward"
        return self

    def fit_preferences(self, phi_a, phi_b, a_wins, weights=None, temperature=1.0):
        """Bradley-Terry MLE on comparisons (1 if a won, 0 if b won), in reward units (see the base class)."""
        z = self._differences(phi_a, phi_b, temperature)  # (N, d)
        o = torch.as_tensor(a_wins, dtype=torch.float64)
        w = _unit_weights(len(o), weights)
        self.theta = logistic_solution(z, o, w, self.ridge, torch.zeros(self.dim, dtype=torch.float64))
        self._set_sigma(z, w)
        self.feedback = "preference"
        return self

    def _set_sigma(self, z: torch.Tensor, w: torch.Tensor) -> None:
        sigma = self.ridge * torch.eye(self.dim, dtype=torch.float64) + (z.T * w) @ z  # (d, d)
        self.sigma_cholesky = torch.linalg.cholesky(sigma)

    def predict(self, phi):
        return self._check(phi) @ self.theta  # (N,)

    def bonus(self, phi, baseline=None):
        """`gamma * ||u||_{Sigma^-1}` = gamma * ||L^-1 u|| with Sigma = L L^T, u = phi (scalar rewards) or
        u = phi - baseline (comparisons; the equation and why: `RewardLearner.bonus`). (N,)"""
        # Paper 000 (Zhao et al. 2025), Alg. 1: b_t = gamma ||phi||_{Sigma_t^-1}; comparisons (Sigma_t from
        # differences): b_t = gamma ||phi - phi_0||_{Sigma_t^-1}, the width of r(x, y) - r(x, phi_0).
        u = self._bonus_directions(phi, baseline)  # (N, d)
        v = torch.linalg.solve_triangular(self.sigma_cholesky, u.T, upper=False)  # (d, N)
        return self.gamma * v.norm(dim=0)


def group_baselines(phi: torch.Tensor) -> torch.Tensor:
    """Each sample's baseline for the preference bonus: the mean feature of its prompt's k samples, a Monte
    Carlo estimate of E_{y ~ pi_t} phi(x, y) (GSHF's uncertainty of a response against the current policy).
    The same baseline for every sample of a prompt, so the bonus's optimism is off by a per-prompt constant
    only (`RewardLearner.bonus`). (G, k, d) -> (G * k, d), rows in `phi.flatten(0, 1)`'s order."""
    phi = torch.as_tensor(phi, dtype=torch.float64)
    if phi.ndim != 3:
        raise ValueError(f"group features must have shape (G, k, d), got {tuple(phi.shape)}")
    return phi.mean(1, keepdim=True).expand_as(phi).flatten(0, 1)


def _unit_weights(n: int, weights) -> torch.Tensor:
    """Per-data-point weights (N,), all 1 unless given."""
    return torch.ones(n, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)


class EnsembleReward(RewardLearner):
    """H bootstrapped linear heads with randomized priors; bonus = gamma * their std (see module docstring).

    Head h solves the ridge (or logistic) problem on its bootstrap weights, regularised toward its
    prior `theta0_h ~ N(0, prior_scale^2 / ridge I)`, centred over heads. The scale matches
    `LinearReward`: before any data the spread along a unit phi is ~ prior_scale / sqrt(ridge),
    the elliptical bonus's `1 / sqrt(ridge)`. Centring makes the heads' mean exactly the ridge
    solution when every bootstrap weight is 1. Bootstrap weights, when not given, are Poisson(1)
    draws from a generator seeded by (seed, N).
    """

    def __init__(self, dim: int, num_heads: int = 8, ridge: float = 1.0, gamma: float = 1.0,
                 r_max: float | None = None, prior_scale: float = 1.0, seed: int = 0):
        super().__init__(dim, ridge, gamma, r_max)
        if num_heads < 2:
            raise ValueError(f"an ensemble needs num_heads >= 2, got {num_heads}")
        self.num_heads, self.seed = num_heads, seed
        g = torch.Generator().manual_seed(seed)
        priors = torch.randn(num_heads, dim, generator=g, dtype=torch.float64) * prior_scale / math.sqrt(ridge)
        self.priors = priors - priors.mean(0, keepdim=True)  # (H, d)
        self.thetas = self.priors.clone()  # (H, d)

    def bootstrap_weights(self, n: int) -> torch.Tensor:
        """Poisson(1) weights per data point and head (the online bootstrap). (n, H)"""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + n)
        return torch.poisson(torch.ones(n, self.num_heads, dtype=torch.float64), generator=g)

    def _weights(self, n: int, weights) -> torch.Tensor:
        w = self.bootstrap_weights(n) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        if w.shape != (n, self.num_heads):
            raise ValueError(f"bootstrap weights must have shape ({n}, {self.num_heads}), got {tuple(w.shape)}")
        return w

    def fit(self, phi, rewards, weights=None):
        phi = self._check(phi)
        y = torch.as_tensor(rewards, dtype=torch.float64)
        w = self._weights(len(y), weights)  # (N, H)
        self.thetas = torch.stack([ridge_solution(phi, y, w[:, h], self.ridge, self.priors[h])
                                   for h in range(self.num_heads)])
        self.feedback = "reward"
        return self

    def fit_preferences(self, phi_a, phi_b, a_wins, weights=None, temperature=1.0):
        z = self._differences(phi_a, phi_b, temperature)  # (N, d)
        o = torch.as_tensor(a_wins, dtype=torch.float64)
        w = self._weights(len(o), weights)  # (N, H)
        self.thetas = torch.stack([logistic_solution(z, o, w[:, h], self.ridge, self.priors[h])
                                   for h in range(self.num_heads)])
        self.feedback = "preference"
        return self

    def head_rewards(self, phi) -> torch.Tensor:
        return self._check(phi) @ self.thetas.T  # (N, H)

    def predict(self, phi):
        return self.head_rewards(phi).mean(1)  # (N,)

    def bonus(self, phi, baseline=None):
        """gamma * the heads' std of r_h(phi) (scalar rewards) or of r_h(phi) - r_h(baseline) (comparisons: a
        head's component along a direction no comparison informs stays at its prior, so the absolute spread
        keeps the priors' disagreement there; see `RewardLearner.bonus`). (N,)"""
        u = self._bonus_directions(phi, baseline)  # (N, d)
        return self.gamma * (u @ self.thetas.T).std(dim=1)  # (N,)


REWARD_LEARNERS = ("linear", "ensemble")


def build_reward_learner(kind: str, dim: int, ridge: float = 1.0, gamma: float = 1.0, r_max: float | None = None,
                         num_heads: int = 8, prior_scale: float = 1.0, seed: int = 0) -> RewardLearner:
    """A fresh `LinearReward` ("linear") or `EnsembleReward` ("ensemble")."""
    if kind == "linear":
        return LinearReward(dim, ridge=ridge, gamma=gamma, r_max=r_max)
    if kind == "ensemble":
        return EnsembleReward(dim, num_heads=num_heads, ridge=ridge, gamma=gamma, r_max=r_max,
                              prior_scale=prior_scale, seed=seed)
    raise ValueError(f"unknown reward_learner {kind!r}; expected one of {REWARD_LEARNERS}")
