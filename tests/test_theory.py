"""Properties of klalign.theory checked on many random instances (fixed seeds, all exact or MC).

Every closed form in ALGORITHMS.md is checked against an independent computation: a brute-force
enumeration, a Monte Carlo simulation, or the identity it must satisfy.
"""

import itertools

import numpy as np
import pytest

from klalign.theory import (
    PREFERENCE_QUERIES_PER_STEP,
    LinearBandit,
    best_of_n_distribution,
    best_of_n_kl,
    best_of_n_kl_bound,
    best_of_n_kl_estimate,
    best_of_n_kl_estimate_mean,
    best_of_n_win_rate,
    egpo,
    exploitability,
    hard_bandit_instance,
    kl,
    kl_estimators,
    log_partition,
    memoryless_best_of_n,
    mirror_descent,
    nash_md,
    nash_mirror_prox,
    nash_prox,
    nash_residual,
    online_ipo,
    random_intransitive_game,
    regularized_nash,
    regularized_objective,
    rso_acceptance_rate,
    simulate_kl_ucb,
    sppo,
    tilt,
    tilt_for_kl_budget,
    tilted_frontier,
)


def random_instance(rng, K, ties=False):
    """A distribution with some near-zero masses and a reward, optionally with tied levels."""
    p = rng.dirichlet(np.full(K, rng.choice([0.2, 1.0, 5.0])))
    r = rng.integers(0, max(2, K // 3), K).astype(float) if ties else rng.normal(size=K)
    return p, r


# ---------------------------------------------------------------- tilt (ALGORITHMS.md §0)


def test_regret_identity_holds_on_random_instances():
    rng = np.random.default_rng(0)
    for _ in range(200):
        K, beta = int(rng.integers(2, 40)), float(np.exp(rng.uniform(np.log(0.02), np.log(5))))
        p, r = random_instance(rng, K)
        q = rng.dirichlet(np.ones(K))
        optimum = tilt(p, r, beta)
        gap = regularized_objective(optimum, p, r, beta) - regularized_objective(q, p, r, beta)
        assert abs(gap - beta * kl(q, optimum)) < 1e-10
        assert abs(regularized_objective(optimum, p, r, beta) - beta * log_partition(p, r, beta)) < 1e-10


def test_tilt_is_batched_stable_and_normalised():
    rng = np.random.default_rng(1)
    p, r = rng.dirichlet(np.ones(7), size=(3, 4)), 100.0 * rng.normal(size=(3, 4, 7))
    batch = tilt(p, r, 1e-3)  # r / beta ~ 1e5: would overflow without log-sum-exp
    assert np.all(np.isfinite(batch)) and np.allclose(batch.sum(-1), 1.0)
    assert np.allclose(batch[2, 1], tilt(p[2, 1], r[2, 1], 1e-3))
    assert np.allclose(batch, np.eye(7)[np.argmax(r, -1)])  # beta -> 0 picks the argmax


def test_kl_conventions():
    assert kl([0.5, 0.5, 0.0], [0.25, 0.25, 0.5]) == pytest.approx(np.log(2))  # 0 log 0 = 0
    assert kl([0.5, 0.5], [1.0, 0.0]) == np.inf
    assert kl([0.3, 0.7], [0.3, 0.7]) == 0.0


def test_kl_estimators_k1_and_k3_are_unbiased():
    rng = np.random.default_rng(2)
    for _ in range(50):
        pi, ref = rng.dirichlet(np.ones(6)), rng.dirichlet(np.ones(6))
        estimates = kl_estimators(np.log(pi) - np.log(ref))
        for name in ("k1", "k3"):
            assert np.sum(pi * estimates[name]) == pytest.approx(kl(pi, ref), abs=1e-12)
        assert np.all(estimates["k3"] >= 0) and np.all(estimates["k2"] >= 0)


def test_tilt_for_kl_budget_round_trips():
    rng = np.random.default_rng(3)
    for _ in range(100):
        p, r = random_instance(rng, int(rng.integers(2, 30)), ties=bool(rng.integers(2)))
        kl_max = -np.log(p[r == r.max()].sum())
        if kl_max < 1e-6:
            continue
        delta = float(rng.uniform(0.0, 0.999) * kl_max)
        lam = tilt_for_kl_budget(p, r, delta)
        assert kl(tilt(p, r, 1.0 / lam), p) == pytest.approx(delta, rel=1e-9, abs=1e-12)
        assert tilted_frontier(p, r, lam)[1] == pytest.approx(delta, rel=1e-9, abs=1e-12)
    assert tilt_for_kl_budget([0.5, 0.5], [0.0, 1.0], 0.0) == 0.0


def test_tilt_for_kl_budget_rejects_out_of_range():
    p, r = [0.5, 0.25, 0.25], [0.0, 1.0, 1.0]  # argmax set mass 1/2: max KL = log 2
    with pytest.raises(ValueError, match="delta"):
        tilt_for_kl_budget(p, r, -0.1)
    with pytest.raises(ValueError, match="out of range"):
        tilt_for_kl_budget(p, r, np.log(2))
    with pytest.raises(ValueError, match="out of range"):
        tilt_for_kl_budget(p, r, 5.0)
    assert tilt_for_kl_budget(p, r, 0.999 * np.log(2)) > 0


def test_rso_acceptance_rate_matches_monte_carlo():
    rng = np.random.default_rng(4)
    p, r, beta = rng.dirichlet(np.ones(8)), rng.uniform(0, 1, 8), 0.3
    rate = rso_acceptance_rate(p, r, beta, r_max=1.0)
    draws = rng.choice(8, size=400_000, p=p)
    accepted = rng.random(draws.size) < np.exp((r[draws] - 1.0) / beta)
    assert abs(accepted.mean() - rate) < 5 * np.sqrt(rate * (1 - rate) / draws.size)
    frequencies = np.bincount(draws[accepted], minlength=8) / accepted.sum()
    assert np.max(np.abs(frequencies - tilt(p, r, beta))) < 0.01  # accepted draws follow pi*
    with pytest.raises(ValueError, match="r_max"):
        rso_acceptance_rate(p, r, beta, r_max=0.5)


# ---------------------------------------------------------------- best-of-N (ALGORITHMS.md §4)


def brute_force_best_of_n(p, r, n):
    """Law of the best of n draws by enumerating all K^n tuples, ties broken uniformly at random."""
    law = np.zeros(len(p))
    for draws in itertools.product(range(len(p)), repeat=n):
        weight = np.prod(p[list(draws)])
        winners = [d for d in draws if r[d] == max(r[list(draws)])]
        for d in winners:
            law[d] += weight / len(winners)
    return law


def test_best_of_n_law_matches_enumeration_with_ties():
    rng = np.random.default_rng(5)
    for _ in range(10):
        p, r = rng.dirichlet(np.ones(5)), rng.integers(0, 3, 5).astype(float)
        for n in (1, 2, 3, 4):
            assert np.allclose(best_of_n_distribution(p, r, n), brute_force_best_of_n(p, r, n), atol=1e-13)


def test_best_of_n_ties_split_in_proportion_to_p():
    p, r = np.array([0.1, 0.3, 0.2, 0.4]), np.array([0.0, 1.0, 1.0, 0.5])
    law = best_of_n_distribution(p, r, 5)
    assert law[1] / law[2] == pytest.approx(1.5)  # p(1) / p(2)
    assert law[1] + law[2] == pytest.approx(1.0 - 0.5**5)  # F^N - F_^N for the top level


def test_best_of_n_law_is_a_distribution_and_kl_is_below_the_bound():
    rng = np.random.default_rng(6)
    n = np.array([1, 2, 3, 7, 16, 100, 1000, 10**6])
    for _ in range(100):
        p, r = random_instance(rng, int(rng.integers(1, 60)), ties=bool(rng.integers(2)))
        law = best_of_n_distribution(p, r, n)  # (8, K)
        assert np.all(law >= 0) and np.allclose(law.sum(-1), 1.0, atol=1e-12)
        assert np.all(best_of_n_kl(p, r, n) <= best_of_n_kl_bound(n) + 1e-12)
        assert np.allclose(best_of_n_kl(p, r, n), kl(law, p), atol=1e-10)
        assert np.all(best_of_n_win_rate(p, r, n) <= n / (n + 1) + 1e-12)


def test_best_of_n_matches_monte_carlo():
    rng = np.random.default_rng(7)
    p, r, n, samples = np.array([0.4, 0.3, 0.2, 0.1]), np.array([2.0, 0.0, 1.0, 3.0]), 3, 200_000
    draws = rng.choice(4, size=(samples, n), p=p)
    chosen = np.take_along_axis(draws, np.argmax(r[draws], axis=1)[:, None], axis=1)[:, 0]  # distinct rewards
    frequencies = np.bincount(chosen, minlength=4) / samples
    law = best_of_n_distribution(p, r, n)
    assert np.all(np.abs(frequencies - law) < 5 * np.sqrt(law * (1 - law) / samples))


def test_bound_is_tight_on_a_large_uniform_support():
    K = 10**5
    p, r = np.full(K, 1.0 / K), np.random.default_rng(8).permutation(K).astype(float)
    assert abs(best_of_n_kl(p, r, 10) - best_of_n_kl_bound(10)) < 1e-3
    assert best_of_n_win_rate(p, r, 10) == pytest.approx(10 / 11, abs=1e-4)


def test_estimator_lies_between_zero_and_the_bound():
    eps = np.concatenate([np.geomspace(1e-12, 1.0, 200), [0.5, 1.0 - 1e-12]])[:, None]
    n = np.array([1, 2, 3, 10, 100, 1000, 10**6])
    estimate = best_of_n_kl_estimate(eps, n)  # (202, 7)
    assert np.all(estimate >= -1e-12) and np.all(estimate <= best_of_n_kl_bound(n) + 1e-12)
    assert np.allclose(best_of_n_kl_estimate(1e-12, n), best_of_n_kl_bound(n), atol=1e-6)  # eps -> 0
    assert np.allclose(best_of_n_kl_estimate(1.0, n), 0.0)


def test_estimator_tracks_exact_kl_on_a_skewed_support():
    zipf = 1.0 / np.arange(1, 101) ** 1.5
    p, r, n = zipf / zipf.sum(), -np.arange(100.0), np.array([4, 16, 256])
    exact, estimate = best_of_n_kl(p, r, n), best_of_n_kl_estimate_mean(p, r, n)
    assert np.all(np.abs(estimate - exact) < 0.05)
    assert np.all(best_of_n_kl_bound(n) - exact > 0.05)  # where the bound itself is loose


def test_memoryless_best_of_n_matches_sequence_enumeration():
    token_probs, token_rewards, m = np.array([0.5, 0.3, 0.2]), np.array([0.0, 1.0, 3.0]), 3
    sequences = list(itertools.product(range(3), repeat=m))
    p = np.array([np.prod(token_probs[list(s)]) for s in sequences])
    r = np.array([np.sum(token_rewards[list(s)]) for s in sequences])
    for n in (1, 3, 7.5):
        law = best_of_n_distribution(p, r, n)
        reward, divergence = memoryless_best_of_n(token_probs, token_rewards, m, n)
        assert reward == pytest.approx(np.sum(law * r) / m, abs=1e-12)
        assert divergence == pytest.approx(kl(law, p) / m, abs=1e-12)


def test_memoryless_best_of_n_approaches_the_tilted_optimum():
    token_probs, token_rewards, delta = np.array([0.5, 0.3, 0.2]), np.array([0.0, 1.0, 3.0]), 0.3
    lam = tilt_for_kl_budget(token_probs, token_rewards, delta)
    tilted_reward, _ = tilted_frontier(token_probs, token_rewards, lam)
    gaps = []
    for m in (16, 64, 256):
        reward, divergence = memoryless_best_of_n(token_probs, token_rewards, m, np.round(np.exp(m * delta)))
        assert divergence <= delta + 1e-12  # the bound log N - (N-1)/N < m delta
        gaps.append(tilted_reward - reward)
    assert gaps[0] > gaps[1] > gaps[2] > 0 and gaps[2] < 0.03


# ---------------------------------------------------------------- games (ALGORITHMS.md §3)


def random_game(rng, K):
    return random_intransitive_game(K, rng), rng.dirichlet(np.full(K, rng.choice([0.3, 1.0, 3.0])))


def test_regularized_nash_is_a_fixed_point_with_zero_exploitability():
    rng = np.random.default_rng(9)
    for K, beta in [(2, 1.0), (5, 0.3), (20, 0.1), (50, 0.01), (50, 0.03), (30, 2.0)]:
        P, ref = random_game(rng, K)
        optimum = regularized_nash(P, ref, beta)
        assert nash_residual(P, ref, beta, optimum) < 1e-10
        assert abs(exploitability(P, ref, beta, optimum)) < 1e-12
        assert exploitability(P, ref, beta, ref) > 1e-6
        others = rng.dirichlet(np.ones(K), size=20)
        assert np.all(exploitability(P, ref, beta, others) > 0)  # half a duality gap


def test_exploitability_matches_its_definition_as_a_best_response_value():
    rng = np.random.default_rng(10)
    P, ref = random_game(rng, 6)
    beta, pi = 0.2, rng.dirichlet(np.ones(6))
    response = tilt(ref, P @ pi, beta)  # the maximiser of q -> P(q > pi) - beta KL(q || ref)
    value = response @ P @ pi - beta * kl(response, ref) + beta * kl(pi, ref)
    assert exploitability(P, ref, beta, pi) == pytest.approx(value - 0.5, abs=1e-14)


def prox(pi, ref, f, beta, eta):
    """ALGORITHMS.md §3's prox, written directly in probability space."""
    step = eta * beta
    weights = pi ** (1 / (1 + step)) * ref ** (step / (1 + step)) * np.exp(eta * f / (1 + step))
    return weights / weights.sum()


def test_iterations_follow_their_update_rules():
    rng = np.random.default_rng(11)
    P, ref = random_game(rng, 7)
    beta, eta = 0.2, 1.5
    mp, md, nmd = (method(P, ref, beta, eta, 3) for method in (nash_mirror_prox, mirror_descent, nash_md))
    for path in (mp, md, nmd):
        assert path.shape == (4, 7) and np.array_equal(path[0], ref)
    half = prox(mp[1], ref, P @ mp[1], beta, eta)
    assert np.allclose(mp[2], prox(mp[1], ref, P @ half, beta, eta), atol=1e-14)
    assert np.allclose(md[2], prox(md[1], ref, P @ md[1], beta, eta), atol=1e-14)
    mixture = nmd[1] ** (1 - eta * beta) * ref ** (eta * beta)
    mixture /= mixture.sum()
    expected = mixture * np.exp(eta * P @ mixture)
    assert np.allclose(nmd[2], expected / expected.sum(), atol=1e-14)
    assert PREFERENCE_QUERIES_PER_STEP == {"nash_mirror_prox": 2, "mirror_descent": 1, "nash_md": 1, "online_ipo": 1,
                                           "egpo": 2, "sppo": 1}


def test_nash_mirror_prox_meets_its_linear_rate_on_100_games():
    rng = np.random.default_rng(12)
    for _ in range(100):
        K, beta = int(rng.integers(2, 30)), float(np.exp(rng.uniform(np.log(0.02), np.log(3.0))))
        P, ref = random_game(rng, K)
        optimum = regularized_nash(P, ref, beta)
        divergence = kl(optimum, nash_mirror_prox(P, ref, beta, 2.0, 10))  # (11,)
        bound = (1 + 2 * beta) ** -np.arange(11) * divergence[0]
        assert np.all(divergence[1:] <= bound[1:] + 1e-12)


def test_egpo_is_nash_mirror_prox_with_the_kl_linearised():
    """Zhou et al.'s extragradient step `e` is exactly Nash-MP with eta = e / (1 - e beta); it is not mirror descent."""
    rng = np.random.default_rng(15)
    for K, beta, step in [(8, 0.1, 2 / 1.2), (20, 0.03, 5.0), (4, 1.0, 0.5)]:
        P, ref = random_game(rng, K)
        path = egpo(P, ref, beta, step, 12)
        assert np.allclose(path, nash_mirror_prox(P, ref, beta, step / (1 - step * beta), 12), atol=1e-12)
        assert np.abs(path - mirror_descent(P, ref, beta, step / (1 - step * beta), 12)).max() > 1e-4
    with pytest.raises(ValueError, match="step"):
        egpo(P, ref, 0.5, 2.0, 3)


def test_regularised_sppo_is_mirror_descent_and_the_original_cycles():
    """SPPO anchored at the pi_k/ref mixture is mirror descent with eta = e / (1 - e beta) and lands on pi*;
    the original (anchor pi_k alone, multiplicative weights) targets the unregularised game, and its last
    iterate keeps a large gap there (max_y P(y > pi) - 1/2) while its average iterate's gap shrinks."""
    rng = np.random.default_rng(16)
    P, ref = random_game(rng, 8)
    beta, step = 0.1, 2 / 1.2
    path = sppo(P, ref, beta, step, 300)
    assert np.allclose(path[:20], mirror_descent(P, ref, beta, step / (1 - step * beta), 19), atol=1e-12)
    assert abs(exploitability(P, ref, beta, path[-1])) < 1e-12
    original = sppo(P, ref, beta, 1.0, 2000, regularized=False)
    last_gap, average_gap = np.max(P @ original[-1]) - 0.5, np.max(P @ original.mean(0)) - 0.5
    assert last_gap > 0.1 and average_gap < 0.02, (last_gap, average_gap)
    assert exploitability(P, ref, beta, original[-1]) > 0.1


def test_online_ipo_is_stationary_at_pi_star_and_unstable_with_a_large_step():
    """Small steps land on pi* (linear rate, slow where pi is small); the stability limitation of
    self-play that the later Nash-MP paper names shows as divergence with a large step at beta = 1."""
    rng = np.random.default_rng(17)
    for K, beta in [(8, 0.1), (20, 0.1), (5, 1.0)]:
        P, ref = random_game(rng, K)
        optimum = regularized_nash(P, ref, beta)
        path = online_ipo(P, ref, beta, 4.0, 3000)
        assert kl(optimum, path[-1]) < 1e-4 and kl(optimum, path[-1]) < 1e-2 * kl(optimum, ref)
        g = P @ optimum - beta * (np.log(optimum) - np.log(ref))
        assert np.allclose(g - optimum @ g, 0, atol=1e-10)  # the update direction vanishes at pi*
    assert exploitability(P, ref, 1.0, online_ipo(P, ref, 1.0, 20.0, 3000)[-1]) > 0.1


def test_nash_prox_solves_its_inner_game_and_contracts_like_nash_mp():
    """Each step is the equilibrium of the game with beta' = beta + 1/eta and the pi_k/ref mixture as
    reference; the fixed point is pi*, and KL(pi*||pi_k) contracts about as fast as Nash-MP's."""
    rng = np.random.default_rng(18)
    P, ref = random_game(rng, 8)
    beta, eta = 0.1, 2.0
    path = nash_prox(P, ref, beta, eta, 30)
    w = eta * beta / (1 + eta * beta)
    mu = ref ** w * path[3] ** (1 - w)
    mu /= mu.sum()
    assert nash_residual(P, mu, beta + 1 / eta, path[4]) < 1e-10
    optimum = regularized_nash(P, ref, beta)
    assert kl(optimum, path[-1]) < 1e-4
    prox_rate = kl(optimum, path[11]) / kl(optimum, path[10])
    mp = nash_mirror_prox(P, ref, beta, eta, 11)
    mp_rate = kl(optimum, mp[11]) / kl(optimum, mp[10])
    assert abs(prox_rate - mp_rate) < 0.05 and prox_rate < 1 / (1 + beta), (prox_rate, mp_rate)


def test_nash_md_needs_a_mixture():
    P, ref = random_game(np.random.default_rng(13), 3)
    with pytest.raises(ValueError, match="eta"):
        nash_md(P, ref, 0.5, 4.0, 2)


# ---------------------------------------------------------------- bandits (ALGORITHMS.md §1)


def test_kl_ucb_beats_greedy_and_its_regret_flattens():
    bandit = hard_bandit_instance()
    ucb = np.array([simulate_kl_ucb(bandit, 0.1, 0.5, 4000, seed=s) for s in range(3)])  # (3, T)
    greedy = np.array([simulate_kl_ucb(bandit, 0.1, 0.0, 4000, seed=s) for s in range(3)])
    assert np.all(ucb >= -1e-12)  # beta KL(pi_t || pi*) >= 0
    assert np.median(ucb.sum(1)) < 0.5 * np.median(greedy.sum(1))
    assert np.median(ucb[:, -1000:].sum(1)) < 0.25 * np.median(ucb[:, :1000].sum(1))


def test_kl_ucb_regret_is_the_exact_kl_to_the_optimum():
    bandit = hard_bandit_instance()
    regret = simulate_kl_ucb(bandit, 0.1, 0.5, 1)  # round 1: theta_hat = 0, bonus gamma / sqrt(ridge)
    played = tilt(bandit.ref[0], np.full(10, 0.5), 0.1)
    assert regret[0] == pytest.approx(0.1 * kl(played, tilt(bandit.ref[0], bandit.rewards[0], 0.1)), rel=1e-12)


def test_kl_ucb_learns_from_rewards_and_preferences_across_contexts():
    rng = np.random.default_rng(14)
    features, ref = rng.normal(size=(4, 6, 3)), rng.dirichlet(np.ones(6), size=4)
    bandit = LinearBandit(features, ref, np.array([0.5, -0.2, 0.3]), noise_std=0.1)
    for feedback in ("reward", "preference"):
        regret = simulate_kl_ucb(bandit, 0.5, 0.5, 1000, feedback=feedback, r_max=5.0, seed=1)
        assert regret.shape == (1000,) and np.all(regret >= -1e-12)
        assert regret[-250:].mean() < 0.5 * regret[:250].mean()  # it learns from either feedback


# ---------------------------------------------------------------- argument validation


P_GOOD, REF_GOOD = np.array([[0.5, 0.8], [0.2, 0.5]]), np.array([0.5, 0.5])


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: tilt([-0.1, 1.1], [0.0, 1.0], 1.0), "p"),
        (lambda: tilt([0.5, 0.6], [0.0, 1.0], 1.0), "p"),
        (lambda: tilt([0.5, 0.5], [0.0, 1.0], 0.0), "beta"),
        (lambda: tilt([0.5, 0.5], [0.0, 1.0], -1.0), "beta"),
        (lambda: tilt([0.5, 0.5], [0.0, 1.0, 2.0], 1.0), "r"),
        (lambda: kl([0.5, 0.5], [1.0]), "q"),
        (lambda: best_of_n_distribution([0.5, 0.5], [0.0, 1.0], 0), "n"),
        (lambda: best_of_n_kl_bound(0.5), "n"),
        (lambda: best_of_n_kl_estimate(0.0, 4), "eps"),
        (lambda: regularized_nash(np.array([[0.5, 0.8], [0.3, 0.5]]), REF_GOOD, 0.1), "P"),
        (lambda: regularized_nash(np.array([[0.5, 1.2], [-0.2, 0.5]]), REF_GOOD, 0.1), "P"),
        (lambda: regularized_nash(P_GOOD, REF_GOOD, 0.0), "beta"),
        (lambda: regularized_nash(P_GOOD, np.array([0.2, 0.3, 0.5]), 0.1), "ref"),
        (lambda: nash_mirror_prox(P_GOOD, REF_GOOD, 0.1, -1.0, 3), "eta"),
        (lambda: nash_mirror_prox(P_GOOD, REF_GOOD, 0.1, 1.0, -1), "num_steps"),
        (lambda: exploitability(P_GOOD, REF_GOOD, 0.1, [0.2, 0.3, 0.5]), "pi"),
        (lambda: simulate_kl_ucb(hard_bandit_instance(), 0.1, 0.5, 10, feedback="likes"), "feedback"),
        (lambda: simulate_kl_ucb(hard_bandit_instance(), 0.0, 0.5, 10), "beta"),
        (lambda: LinearBandit(np.zeros((1, 3, 2)), np.full((1, 3), 1 / 3), np.zeros(3), 0.1), "theta"),
    ],
)
def test_bad_arguments_raise_value_errors_naming_them(call, name):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        call()
