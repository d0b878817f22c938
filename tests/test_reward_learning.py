"""Reward learners with uncertainty and the feature maps behind them (klalign.trainers.reward_learning)."""

import numpy as np
import pytest
import torch

from klalign.trainers.features import (
    HiddenStateFeatures,
    SentenceEmbeddingFeatures,
    TabularFeatures,
    build_feature_map,
)
from klalign.trainers.reward_learning import (
    EnsembleReward,
    LinearReward,
    build_reward_learner,
    group_baselines,
    logistic_solution,
)


def synthetic(n: int, d: int = 5, seed: int = 0, noise: float = 0.1):
    g = torch.Generator().manual_seed(seed)
    phi = torch.randn(n, d, generator=g, dtype=torch.float64)
    theta = torch.randn(d, generator=g, dtype=torch.float64)
    return phi, phi @ theta + noise * torch.randn(n, generator=g, dtype=torch.float64), theta


def test_ridge_solution_equals_the_closed_form():
    phi, y, _ = synthetic(50)
    learner = LinearReward(5, ridge=0.7).fit(phi, y)
    X, t = phi.numpy(), y.numpy()
    expected = np.linalg.solve(0.7 * np.eye(5) + X.T @ X, X.T @ t)
    np.testing.assert_allclose(learner.theta.numpy(), expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(learner.predict(phi).numpy(), X @ expected, rtol=1e-10, atol=1e-12)
    # A weight of 2 is the same data point twice.
    weights = torch.ones(50, dtype=torch.float64)
    weights[:10] = 2
    doubled = LinearReward(5, ridge=0.7).fit(torch.cat([phi, phi[:10]]), torch.cat([y, y[:10]]))
    np.testing.assert_allclose(LinearReward(5, ridge=0.7).fit(phi, y, weights).theta, doubled.theta, rtol=1e-10)


def test_bonus_shrinks_along_observed_directions_only():
    ridge, gamma, n = 2.0, 0.5, 40
    e = torch.eye(3, dtype=torch.float64)
    learner = LinearReward(3, ridge=ridge, gamma=gamma)
    np.testing.assert_allclose(learner.bonus(e).numpy(), gamma / np.sqrt(ridge))  # no data: gamma ||phi|| / sqrt(lam)
    learner.fit(e[:1].repeat(n, 1), torch.ones(n, dtype=torch.float64))
    bonus = learner.bonus(e).numpy()
    np.testing.assert_allclose(bonus[0], gamma / np.sqrt(ridge + n), rtol=1e-12)  # Sigma = (lam + n) along e1
    np.testing.assert_allclose(bonus[1:], gamma / np.sqrt(ridge), rtol=1e-12)  # untouched elsewhere
    mixed = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)
    assert bonus[0] < learner.bonus(mixed).item() < np.sqrt(2) * bonus[1]


def test_logistic_fit_recovers_theta_on_bradley_terry_data():
    g = torch.Generator().manual_seed(1)
    d, n = 3, 6000
    theta = torch.tensor([1.5, -1.0, 0.5], dtype=torch.float64)
    phi_a = torch.randn(n, d, generator=g, dtype=torch.float64)
    phi_b = torch.randn(n, d, generator=g, dtype=torch.float64)
    a_wins = torch.bernoulli(torch.sigmoid((phi_a - phi_b) @ theta), generator=g)
    learner = LinearReward(d, ridge=1e-3).fit_preferences(phi_a, phi_b, a_wins)
    assert (learner.theta - theta).abs().max() < 0.12, learner.theta
    # The fit is the regularised MLE itself: the gradient vanishes there.
    z = phi_a - phi_b
    grad = z.T @ (torch.sigmoid(z @ learner.theta) - a_wins) + 1e-3 * learner.theta
    assert grad.abs().max() < 1e-6
    # Sigma is built from the feature differences.
    np.testing.assert_allclose(learner.sigma_cholesky @ learner.sigma_cholesky.T, 1e-3 * torch.eye(d) + z.T @ z,
                               rtol=1e-10)


def test_a_bradley_terry_temperature_keeps_the_fit_in_reward_units():
    """Data from P(a > b) = sigmoid((r_a - r_b) / 0.2): told the temperature, both learners recover theta itself
    (not theta / 0.2), which is what r_max clips."""
    g = torch.Generator().manual_seed(2)
    d, n, T = 3, 6000, 0.2
    theta = torch.tensor([0.6, -0.3, 0.2], dtype=torch.float64)
    phi_a = torch.randn(n, d, generator=g, dtype=torch.float64)
    phi_b = torch.randn(n, d, generator=g, dtype=torch.float64)
    a_wins = torch.bernoulli(torch.sigmoid((phi_a - phi_b) @ theta / T), generator=g)
    linear = LinearReward(d, ridge=1e-3).fit_preferences(phi_a, phi_b, a_wins, temperature=T)
    assert (linear.theta - theta).abs().max() < 0.05, linear.theta
    unscaled = LinearReward(d, ridge=1e-3).fit_preferences(phi_a, phi_b, a_wins)
    assert (unscaled.theta - theta / T).abs().max() < 0.25, unscaled.theta
    ensemble = EnsembleReward(d, num_heads=4, ridge=1e-3, seed=0).fit_preferences(phi_a, phi_b, a_wins, temperature=T)
    assert (ensemble.thetas.mean(0) - theta).abs().max() < 0.05
    with pytest.raises(ValueError, match="temperature"):
        linear.fit_preferences(phi_a, phi_b, a_wins, temperature=0.0)


def test_logistic_solution_is_regularised_toward_the_prior():
    z = torch.zeros(4, 2, dtype=torch.float64)  # no information: the answer is the prior
    prior = torch.tensor([0.3, -2.0], dtype=torch.float64)
    wins = torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    theta = logistic_solution(z, wins, torch.ones(4, dtype=torch.float64), 1.0, prior)
    np.testing.assert_allclose(theta, prior)


def test_ensemble_spread_shrinks_with_data():
    phi, y, _ = synthetic(2000, d=4, seed=2, noise=0.3)
    test = torch.randn(200, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    spreads = []
    for n in (0, 20, 200, 2000):
        learner = EnsembleReward(4, num_heads=16, ridge=1.0, gamma=1.0, seed=0)
        if n:
            learner.fit(phi[:n], y[:n])
        spreads.append(learner.bonus(test).mean().item())
    assert all(a > b for a, b in zip(spreads, spreads[1:])), spreads
    # Before data the spread is the prior's, on the elliptical bonus's scale gamma ||phi|| / sqrt(ridge).
    linear = LinearReward(4, ridge=1.0, gamma=1.0).bonus(test).mean().item()
    assert 0.5 * linear < spreads[0] < 1.5 * linear
    assert spreads[-1] < 0.1 * spreads[0]


def test_ensemble_mean_is_the_ridge_solution_without_resampling():
    phi, y, _ = synthetic(60, d=4)
    ensemble = EnsembleReward(4, num_heads=5, ridge=0.5, seed=7).fit(phi, y, torch.ones(60, 5, dtype=torch.float64))
    linear = LinearReward(4, ridge=0.5).fit(phi, y)
    np.testing.assert_allclose(ensemble.predict(phi).numpy(), linear.predict(phi).numpy(), rtol=1e-9, atol=1e-12)


def test_ensemble_bootstrap_is_seeded_and_fits_preferences():
    phi, y, _ = synthetic(100, d=3)
    a = EnsembleReward(3, num_heads=4, seed=1).fit(phi, y)
    b = EnsembleReward(3, num_heads=4, seed=1).fit(phi, y)
    torch.testing.assert_close(a.thetas, b.thetas, rtol=0, atol=0)
    assert not torch.equal(a.thetas, EnsembleReward(3, num_heads=4, seed=2).fit(phi, y).thetas)
    wins = (y[:50] > y[50:]).double()
    ensemble = EnsembleReward(3, num_heads=4, seed=1, gamma=1.0).fit_preferences(phi[:50], phi[50:], wins)
    assert ensemble.thetas.shape == (4, 3) and (ensemble.bonus(phi, phi.flip(0)) > 0).all()
    with pytest.raises(ValueError, match="baseline"):  # comparisons: the bonus is relative to a baseline
        ensemble.optimistic(phi)


def shared_offset_groups(n: int, generator, k: int = 4, d: int = 5, offset: float = 3.0) -> torch.Tensor:
    """n prompts' k responses: random features in d - 1 coordinates and the same `offset` in the last, a
    direction every response shares (as every MiniLM embedding shares the mean embedding). (n, k, d)"""
    x = torch.randn(n, k, d - 1, generator=generator, dtype=torch.float64)
    return torch.cat([x, torch.full((n, k, 1), offset, dtype=torch.float64)], dim=2)


@pytest.mark.parametrize("kind, bar", [("linear", 0.02), ("ensemble", 0.1)])
def test_preference_bonus_shrinks_although_every_response_shares_a_direction(kind, bar):
    """Comparisons inform only differences phi_a - phi_b, which never contain the shared offset: the bonus
    relative to the group's mean feature (what the trainer takes with comparisons) falls toward 0 as
    comparisons come in, while the absolute bonus (the trainer's before this test) stays at its prior value
    along the shared direction, gamma * offset / sqrt(ridge) = 3.000 for the linear learner (exactly, at
    every n) and gamma * offset * std_h(prior_h . u) for the ensemble (its heads' priors never move along u).

    Measured over seeds 0-5 (seed 0 here), mean relative bonus at 8000 comparisons / with no data: linear
    0.0079-0.0080, ensemble 0.020-0.045 (bars 0.02 and 0.1); the ensemble's absolute bonus at 8000
    comparisons / its prior value along u: 0.999-1.001."""
    g = torch.Generator().manual_seed(0)
    d, k, offset, gamma = 5, 4, 3.0, 1.0
    theta = torch.randn(d, generator=g, dtype=torch.float64)
    data, test = shared_offset_groups(2000, g), shared_offset_groups(50, g)
    phi_a, phi_b = data.flatten(0, 1), data[:, (torch.arange(k) + 1) % k].flatten(0, 1)  # neighbours, as the trainer
    a_wins = torch.bernoulli(torch.sigmoid((phi_a - phi_b) @ theta), generator=g)
    phi, baseline = test.flatten(0, 1), group_baselines(test)
    relative, absolute = [], []
    for n in (0, 20, 200, 2000):
        learner = build_reward_learner(kind, d, ridge=1.0, gamma=gamma, num_heads=8, seed=0)
        if n:
            learner.fit_preferences(phi_a[: n * k], phi_b[: n * k], a_wins[: n * k])
        relative.append(learner.bonus(phi, baseline).mean().item())
        absolute.append(learner.bonus(phi, torch.zeros_like(phi)))  # phi - 0: the bonus on absolute features
    assert all(a > b for a, b in zip(relative, relative[1:])), relative
    assert relative[-1] < bar * relative[0], relative
    if kind == "linear":  # u is an eigenvector of Sigma with eigenvalue ridge: ||phi||_{Sigma^-1} >= offset / 1
        assert all((b >= gamma * offset - 1e-9).all() for b in absolute), [b.min().item() for b in absolute]
    else:
        along_u = gamma * offset * learner.priors[:, -1].std().item()
        assert absolute[-1].mean().item() == pytest.approx(along_u, rel=0.01), (absolute[-1].mean(), along_u)


def test_group_baselines_are_the_mean_feature_of_each_prompts_samples():
    phi = torch.arange(2 * 3 * 2, dtype=torch.float64).view(2, 3, 2)
    torch.testing.assert_close(group_baselines(phi), phi.mean(1, keepdim=True).expand(2, 3, 2).reshape(6, 2))
    learner = LinearReward(2, ridge=2.0, gamma=0.5)
    torch.testing.assert_close(learner.bonus(phi.flatten(0, 1), group_baselines(phi)),
                               0.5 * (phi - phi.mean(1, keepdim=True)).flatten(0, 1).norm(dim=1) / np.sqrt(2.0))
    with pytest.raises(ValueError, match="shape"):
        group_baselines(phi[0])


def test_optimistic_reward_clips_at_r_max():
    phi, y, _ = synthetic(30)
    learner = LinearReward(5, ridge=1.0, gamma=2.0, r_max=0.5).fit(phi, 10 * y)
    raw = learner.predict(phi) + learner.bonus(phi)
    assert (raw > 0.5).any() and (raw < 0.5).any()
    torch.testing.assert_close(learner.optimistic(phi), raw.clamp(max=0.5))


@pytest.mark.parametrize("kind", ["linear", "ensemble"])
def test_gamma_zero_is_the_greedy_estimate(kind):
    phi, y, _ = synthetic(40)
    learner = build_reward_learner(kind, 5, gamma=0.0, r_max=None, num_heads=4).fit(phi, y)
    torch.testing.assert_close(learner.optimistic(phi), learner.predict(phi), rtol=0, atol=0)
    assert (learner.bonus(phi) == 0).all()


def test_learner_inputs_are_checked():
    with pytest.raises(ValueError, match="shape"):
        LinearReward(3).predict(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="ridge"):
        LinearReward(3, ridge=0.0)
    with pytest.raises(ValueError, match="num_heads"):
        EnsembleReward(3, num_heads=1)
    with pytest.raises(ValueError, match="bootstrap weights"):
        EnsembleReward(3, num_heads=2).fit(torch.zeros(4, 3), torch.zeros(4), torch.ones(4, 3))
    with pytest.raises(ValueError, match="reward_learner"):
        build_reward_learner("gp", 3)


# ----------------------------------------------------------------------------- feature maps


def test_tabular_features_look_up_strings():
    table = torch.arange(2 * 3 * 4, dtype=torch.float64).view(2, 3, 4)
    features = TabularFeatures(table, ["prompt 0", "prompt 1"], ["a0", "a1", "a2"])
    out = features(["prompt 1", " prompt 0 ", "prompt 1"], ["a2", "a0", " a1"])
    torch.testing.assert_close(out, torch.stack([table[1, 2], table[0, 0], table[1, 1]]))
    assert features.dim == 4
    with pytest.raises(KeyError, match="a9"):
        features(["prompt 0"], ["a9"])


def test_minilm_features_are_unit_embeddings_of_response_and_product():
    features = build_feature_map("minilm")
    assert isinstance(features, SentenceEmbeddingFeatures) and features.dim == 768
    prompts = ["How was the movie?", [{"role": "user", "content": "How was the movie?"}], "Describe the city."]
    responses = ["It was wonderful!", "It was terrible.", "Busy and bright."]
    phi = features(prompts, responses)
    assert phi.shape == (3, 768) and phi.dtype == torch.float64
    e_response, product = phi[:, :384], phi[:, 384:]
    torch.testing.assert_close(e_response.norm(dim=1), torch.ones(3, dtype=torch.float64))
    cosine = features.embed(["How was the movie?"]) @ features.embed(["It was wonderful!"]).T
    torch.testing.assert_close(product[0].sum(), cosine[0, 0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(features(prompts[:1], responses[:1]), phi[:1], rtol=1e-6, atol=1e-6)  # batch-invariant
    assert (phi[0] - phi[1]).abs().max() > 0.1  # different responses, different features


def test_hidden_state_features_of_a_causal_lm_and_a_reward_model(tiny_tokenizer):
    from klalign.models.tiny import build_causal_lm, build_reward_model

    policy = build_causal_lm(tiny_tokenizer, seed=0)
    features = build_feature_map("reference", reference=policy, tokenizer=tiny_tokenizer)
    prompts = ["How was the movie?", [{"role": "user", "content": "Describe the city."}]]
    phi = features(prompts, ["It was great.", "Busy and very bright today."])
    assert phi.shape == (2, policy.config.hidden_size) and phi.dtype == torch.float64
    torch.testing.assert_close(features(prompts[1:], ["Busy and very bright today."]), phi[1:], rtol=1e-5, atol=1e-5)

    reward = build_reward_model(tiny_tokenizer, seed=0)
    last = HiddenStateFeatures(reward, tiny_tokenizer, pooling="last")
    phi = last(prompts, ["It was great.", "Busy."])
    assert phi.shape == (2, reward.config.hidden_size)
    torch.testing.assert_close(last(prompts[:1], ["It was great."]), phi[:1], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="reward-model oracle"):
        build_feature_map("reward_model", oracle=object())
    with pytest.raises(ValueError, match="feature_map"):
        build_feature_map("clip")
