"""OptimisticKLTrainer on the single-token test bed (exact regret), resume, and the recipe end to end."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
from conftest import run_script
from transformers import PrinterCallback

from klalign.oracles.base import BradleyTerryPreference
from klalign.testbed.bandit import SingleTokenBandit, TestbedReward
from klalign.testbed.metrics import TestbedMetricsCallback, exact_metrics
from klalign.testbed.model import read_policy
from klalign.trainers.features import TabularFeatures
from klalign.trainers.optimistic import OptimisticKLConfig, OptimisticKLTrainer

BETA = 0.1


def linear_bandit(seed: int = 0) -> SingleTokenBandit:
    """A random 3-prompt, 6-action test bed with one-hot (tabular) linear features."""
    base = SingleTokenBandit.random(num_prompts=3, num_actions=6, seed=seed)
    features = torch.eye(18, dtype=torch.float64).view(3, 6, 18)
    return SingleTokenBandit(base.ref, features=features, theta=0.3 * base.reward.flatten())


def make_trainer(bandit, output_dir, gamma=0.5, rounds=10, seed=0, oracle=None, samples=8, features=None, **overrides):
    """The trainer on the test bed: tabular features (the bandit's own, or the table `features`), one round =
    every prompt x `samples` samples.

    The policy trains its output layer only: the hidden states at the prompts are then fixed,
    nearly orthogonal features and the policy a softmax over them (full fine-tuning with Adam moves
    the hidden states that the test bed's output layer was solved on, and mass leaks to EOS).
    """
    policy, reference = bandit.build_model(seed=0), bandit.build_model(seed=0)
    policy.requires_grad_(False)
    policy.lm_head.requires_grad_(True)
    settings = dict(
        output_dir=str(output_dir), beta=BETA, num_rounds=rounds, prompts_per_round=bandit.num_prompts,
        prompts_per_chunk=bandit.num_prompts, samples_per_prompt=samples,
        per_device_train_batch_size=bandit.num_prompts * samples, max_new_tokens=1, generation_batch_size=256,
        learning_rate=0.01, lr_scheduler_type="constant", gamma=gamma, ridge=1.0, r_max=1.0, seed=seed,
        use_cpu=True, bf16=False, report_to="none", save_total_limit=1, disable_tqdm=True,
    )
    metrics = TestbedMetricsCallback(bandit, BETA)
    trainer = OptimisticKLTrainer(
        model=policy, ref_model=reference, args=OptimisticKLConfig(**{**settings, **overrides}),
        train_dataset=bandit.prompt_dataset(), processing_class=bandit.tokenizer,
        oracle=oracle or TestbedReward(bandit, noise_std=0.3, seed=seed),
        feature_map=TabularFeatures(bandit.features if features is None else features, bandit.prompts, bandit.actions),
        callbacks=[metrics],
    )
    trainer.remove_callback(PrinterCallback)
    return trainer, metrics


def played_regret(bandit, metrics) -> np.ndarray:
    """Exact regret of the policies that collected rounds 0..T-1: pi_ref, then the policy after each round. (T,)"""
    first = exact_metrics(bandit.ref.numpy(), bandit, BETA)["testbed/regret"]
    return np.array([first] + [h["testbed/regret"] for h in metrics.history[:-1]])


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("bad, match", [
    (dict(samples_per_prompt=1, per_device_train_batch_size=4), "samples_per_prompt"),
    (dict(samples_per_prompt=4, per_device_train_batch_size=6), "multiple"),
    (dict(kl_penalty="k2"), "kl_penalty"),
    (dict(reward_learner="gp"), "reward_learner"),
    (dict(feature_map="clip"), "feature_map"),
    (dict(gamma=-1.0), "gamma"),
    (dict(update_reward="sampled"), "update_reward"),
])
def test_config_rejects_bad_settings(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        OptimisticKLConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", **bad)


def test_trainer_needs_a_feature_map(tmp_path):
    bandit = linear_bandit()
    with pytest.raises(TypeError, match="feature_map"):
        OptimisticKLTrainer(model=bandit.build_model(), ref_model=bandit.build_model(),
                            args=OptimisticKLConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none",
                                                    per_device_train_batch_size=8),
                            train_dataset=bandit.prompt_dataset(), processing_class=bandit.tokenizer,
                            oracle=TestbedReward(bandit))


# ----------------------------------------------------------------------------- the test bed


def test_lands_on_the_tilted_optimum(tmp_path):
    """Known-support instance, noiseless reward: the policy approaches pi_ref * exp(r / beta) / Z.

    KL(pi || pi*) after 60 rounds over seeds 0-7: 0.024-0.043, seed 0 (the test's) the worst (2 threads and
    ATEN_CPU_CAPABILITY=default on seeds 0-2: identical). With the KL penalty at 2 beta: 0.40-0.46 (seeds 0-3).
    The bar, 0.12, sits midway in log scale."""
    bandit = linear_bandit()
    trainer, metrics = make_trainer(bandit, tmp_path, gamma=0.5, rounds=60,
                                    oracle=TestbedReward(bandit, noise_std=0.0))
    trainer.train()
    final = metrics.history[-1]
    assert final["testbed/kl_to_optimum"] < 0.12, final
    assert final["testbed/off_action_mass"] < 1e-6
    logged = [h for h in trainer.state.log_history if "round" in h]
    assert len(logged) == 60
    for key in ("reward_optimistic", "reward_fitted", "bonus", "oracle_reward", "kl_k1", "kl_k3", "loss"):
        assert all(math.isfinite(h[key]) for h in logged), key
    assert logged[-1]["bonus"] < logged[0]["bonus"]  # the bonus shrinks as the data grows
    assert all(h["reward_optimistic"] >= h["reward_fitted"] - 1e-12 for h in logged)


def test_observed_rewards_reach_the_optimum_where_the_features_cannot_express_the_reward(tmp_path):
    """Features with one constant column: r_hat is the same for every action of a prompt, so the fitted reward's
    leave-one-out advantages are zero but for the KL term, and the greedy learner stays at pi_ref. With
    `update_reward: observed` the step takes the oracle's (noiseless) reward of each sample and lands on the tilt.
    KL(pi || pi*) after 40 rounds over seeds 0-3, as a share of pi_ref's: fitted 0.96-1.01, observed 0.014-0.027;
    the bars (0.5 and 0.1) sit between."""
    bandit = linear_bandit()
    constant = torch.ones(3, 6, 1, dtype=torch.float64)
    start = exact_metrics(bandit.ref.numpy(), bandit, BETA)["testbed/kl_to_optimum"]
    final = {}
    for update_reward in ("fitted", "observed"):
        trainer, metrics = make_trainer(bandit, tmp_path / update_reward, gamma=0.0, rounds=40, features=constant,
                                        oracle=TestbedReward(bandit, noise_std=0.0), update_reward=update_reward)
        trainer.train()
        final[update_reward] = metrics.history[-1]["testbed/kl_to_optimum"]
    assert final["fitted"] > 0.5 * start, (start, final)
    assert final["observed"] < 0.1 * start, (start, final)


def test_observed_rewards_need_a_reward_oracle(tmp_path):
    bandit = linear_bandit()
    with pytest.raises(ValueError, match="update_reward 'observed'"):
        make_trainer(bandit, tmp_path, oracle=BradleyTerryPreference(TestbedReward(bandit, noise_std=0.0)),
                     update_reward="observed")


def underexplored() -> SingleTokenBandit:
    """The bench's instance (bench/optimistic_regret.py): 4 prompts x 10 actions, one-hot features;
    each prompt's best action (reward 1; the others U(0, 0.5)) has reference mass e^-5, so greedy
    samples it rarely and learns its value slowly; at e^-6 neither learner samples it within 300
    rounds in most prompts (an LLM's optimism acts on sampled responses only)."""
    return SingleTokenBandit.underexplored(num_prompts=4, num_actions=10, seed=0, best_mass=math.exp(-5))


@pytest.mark.parametrize("learner, kl_penalty, gamma", [("linear", "k1_in_reward", 0.5),
                                                       ("ensemble", "k3_in_loss", 1.0)])
def test_optimism_beats_greedy_where_the_reference_underexplores(tmp_path, learner, kl_penalty, gamma):
    """Seed 0, 100 rounds, lr 0.01, one step a round (the bench's grid point), the greedy learner (gamma 0) on
    the same settings as the baseline. Measured cumulative regret on seed 0: linear 10.1 against 17.4; ensemble
    with the GRPO-style k3 penalty 11.3 against 19.5 (ratios 0.58). Seed 0 is the luckiest: over seeds 0-7 the
    ratio is 0.54-0.88 (linear) and 0.56-0.96 (ensemble), and 300 rounds do not narrow it (0.39-0.85). The
    greedy learner in the optimistic slot runs the very same updates: ratio exactly 1. So the bar is 0.98,
    just under 1: on one seed this test can only tell optimism from none, not measure its gain (the slow
    test below takes a median over seeds)."""
    bandit = underexplored()
    regret = {}
    for g in (0.0, gamma):
        trainer, metrics = make_trainer(bandit, tmp_path / f"gamma-{g}", gamma=g, rounds=100, seed=0,
                                        reward_learner=learner, kl_penalty=kl_penalty)
        trainer.train()
        regret[g] = played_regret(bandit, metrics)
    assert regret[gamma].sum() < 0.98 * regret[0.0].sum(), (regret[gamma].sum(), regret[0.0].sum())


@pytest.mark.slow
def test_regret_goals_over_three_seeds(tmp_path):
    """The issue's goals at T = 300, seeds 0-2, both learners at lr 0.01 and one step a round: optimism's
    cumulative regret at most half of greedy's, its per-round regret keeps falling (block means of 50
    rounds: each at most 10% above the one before, where the tail flattens at the bonus's floor of ~0.003,
    and the last under 5% of the first), and its final policy close to pi*.

    Measured over seeds 0-7 (2 threads and ATEN_CPU_CAPABILITY=default leave this trainer's runs identical,
    checked on the tests above): the regret ratio is 0.47 on each of seeds 0-2 but 0.39-0.85 over 0-7
    (median 0.49), so "at most half" holds for the median seed only; three seeds' median reaches 0.60 and
    their max 0.85; without the bonus the ratio is exactly 1. Bars: median < 0.75, max < 0.95. Blocks: at
    most 2.1% above the one before, the last 1.2-2.1% of the first. Final KL 0.017-0.040; greedy's 0.083,
    with the KL penalty at 2 beta 1.4: bar 0.057, midway in log scale to greedy's."""
    bandit = underexplored()
    ratios = []
    for seed in range(3):
        regret = {}
        for gamma in (0.0, 0.5):
            trainer, metrics = make_trainer(bandit, tmp_path / f"{gamma}-{seed}", gamma=gamma, rounds=300, seed=seed)
            trainer.train()
            regret[gamma] = played_regret(bandit, metrics)
        ratios.append(regret[0.5].sum() / regret[0.0].sum())
        blocks = regret[0.5].reshape(6, 50).mean(1)  # (6,) mean per-round regret of rounds 0-49, 50-99, ...
        assert (np.diff(blocks) <= 0.1 * blocks[:-1]).all() and blocks[-1] < 0.05 * blocks[0], blocks
        assert metrics.history[-1]["testbed/kl_to_optimum"] < 0.057
    assert max(ratios) < 0.95 and np.median(ratios) < 0.75, ratios


def test_preference_feedback_is_learned_in_reward_units(tmp_path):
    """Bradley-Terry feedback with temperature 0.1 on the under-explored bed (rewards in [0, 1], r_max 1): the
    learner fits P(a > b) = sigmoid((r_a - r_b) / 0.1), read from the oracle, so r_hat is in reward units and
    r_tilde = min(r_max, r_hat + bonus) can lead the policy to pi*: KL(pi || pi*) after 100 rounds 0.083 at
    seed 0, 0.08-1.13 over seeds 0-4 (measured; greedy: 0.11-1.13). Fitted with T = 1, as before issue 15,
    r_hat estimates r / 0.1 and the clip flattens every reward above 0.1: KL 2.93-3.33 over seeds 0-4
    (measured), and this test fails. The bar 1.8 lies between the two spreads (it was 0.3 when seed 0's
    0.113 was the one value measured; seeds 1-4 exceed 0.3 with the code before issue 20 too: 0.52-1.13).
    Comparison counts: k neighbours a prompt.

    Optimism barely beats greedy here (cumulative regret at gamma 0.5 over greedy's: 0.88 at seed 0,
    0.88-0.99 over seeds 0-4, median 0.98; measured; with the bonus on absolute features 0.97-1.00): one
    comparison at T = 0.1 already shrinks the elliptical bonus along it to ~T, whatever the outcome."""
    bandit = underexplored()
    oracle = BradleyTerryPreference(TestbedReward(bandit), temperature=0.1)
    trainer, metrics = make_trainer(bandit, tmp_path, rounds=100, oracle=oracle, gamma=0.5)
    assert trainer.preference_temperature == 0.1
    trainer.train()
    rows = trainer.store.round_rows(0)
    assert rows[0]["rewards"] is None and len(rows[0]["pairs"]) == len(rows[0]["a_wins"]) == 8
    assert all(h["oracle_queries"] == 4 * 8 for h in trainer.state.log_history if "round" in h)
    assert metrics.history[-1]["testbed/kl_to_optimum"] < 1.8, metrics.history[-1]
    learner = trainer.fit_reward(99, trainer.store.round_rows(99))
    best = bandit.reward_table().argmax(-1)  # (C,) each prompt's best response, reward 1
    phi = bandit.features[torch.arange(4), best]  # (C, d)
    assert (learner.predict(phi) > 0.5).all(), learner.predict(phi)  # in reward units: 10 r would clip at r_max


@pytest.mark.parametrize("learner, gamma", [("linear", 0.5), ("ensemble", 1.0)])
def test_a_direction_every_response_shares_neither_clips_groups_to_r_max_nor_holds_up_the_bonus(tmp_path, learner,
                                                                                               gamma):
    """Preference feedback on the under-explored bed, the one-hot features plus a constant 4 in an extra
    coordinate: a direction every response shares (as every MiniLM embedding shares the mean embedding), in
    no comparison's feature difference. Taken on absolute features (the code before this test), the bonus
    kept its prior value along it, gamma * 4 / sqrt(ridge) = 2.0 for the linear learner: every sample's
    r_hat + bonus was clipped to r_max = 1 (logged reward_optimistic 1.0 in every round), so round 0's
    leave-one-out advantages (policy = pi_ref: r_tilde's alone) were float noise, at most 1.0e-6, and the
    policy learned nothing from the feedback. Taken on the difference from the group's mean feature, the
    bonus shrinks along the compared directions and the group keeps its signal.

    Measured, seeds 0-4 x both learners, 5 rounds: round 0's largest |advantage| 0.415-1.07 (before: 6e-7 to
    1.0e-6); logged reward_optimistic at most 0.544 in any round (before: 1.0 in every round); the last
    round's bonus linear 0.0098-0.0151, ensemble 0.18-0.23 (before: 2.007-2.008 and 1.8-5.1)."""
    bandit, offset = underexplored(), 4.0
    C, K, _ = bandit.features.shape
    shared = torch.cat([bandit.features, torch.full((C, K, 1), offset, dtype=torch.float64)], dim=2)
    oracle = BradleyTerryPreference(TestbedReward(bandit), temperature=0.1)
    trainer, _ = make_trainer(bandit, tmp_path, rounds=5, oracle=oracle, gamma=gamma, features=shared,
                              reward_learner=learner)
    advantages, policy_loss = [], trainer._policy_loss

    def recording(rows, advantage, ref):  # the advantages every optimizer step is given
        advantages.append(advantage.clone())
        return policy_loss(rows, advantage, ref)

    trainer._policy_loss = recording
    trainer.train()
    logged = [h for h in trainer.state.log_history if "round" in h]
    assert advantages[0].abs().max() > 0.1, advantages[0]  # round 0: the policy is pi_ref, the k1 term 0
    assert max(h["reward_optimistic"] for h in logged) < 0.8, [h["reward_optimistic"] for h in logged]
    assert logged[-1]["bonus"] < 0.15 * gamma * offset, [h["bonus"] for h in logged]


def test_resume_is_exact(tmp_path):
    """Killed after round 2's feedback was stored but before its checkpoint, then resumed: round 2
    is replayed from the store (no new oracle query), the reward refitted from the stored rows, and
    the run ends where an uninterrupted one does.

    The oracle is noiseless: `TestbedReward`'s noise comes from one generator advanced call by call,
    so a restarted process would draw other noise (a deterministic oracle, like VADER, has no such state).
    """
    bandit = linear_bandit(seed=2)
    setup = dict(reward_learner="ensemble", ensemble_size=4, oracle=TestbedReward(bandit), save_total_limit=2)
    straight, _ = make_trainer(bandit, tmp_path / "straight", rounds=4, **setup)
    straight.train()
    first, _ = make_trainer(bandit, tmp_path / "resumed", rounds=3, **setup)
    first.train()
    shutil.rmtree(tmp_path / "resumed" / "checkpoint-round-00002")  # the kill
    stored = tmp_path / "resumed" / "feedback" / "round-00002" / "part-00000.parquet"
    written = stored.stat().st_mtime_ns
    resumed, _ = make_trainer(bandit, tmp_path / "resumed", rounds=4, **setup)
    resumed.train(resume_from_checkpoint=True)
    assert stored.stat().st_mtime_ns == written  # replayed from the store, not collected again
    assert resumed.state.global_step == straight.state.global_step == 4
    for r in range(4):
        assert resumed.store.round_rows(r) == straight.store.round_rows(r)
    torch.testing.assert_close(read_policy(resumed.model, bandit), read_policy(straight.model, bandit), rtol=0, atol=0)
    logged = [h for h in resumed.state.log_history if "round" in h]
    assert [h["round"] for h in logged] == [0, 1, 2, 3]  # round 2 logged once, by the replay
    expected = [h for h in straight.state.log_history if "round" in h]
    assert [h["reward_optimistic"] for h in logged] == [h["reward_optimistic"] for h in expected]


# ----------------------------------------------------------------------------- the recipe


def test_recipe_runs_two_rounds_writes_the_summary_and_resumes(tmp_path):
    common = ["recipes/optimistic_kl.py", "--config", "configs/tiny/optimistic_kl.yaml", "--output_dir",
              str(tmp_path / "run"), "--prompts_per_round", "8", "--prompts_per_chunk", "8", "--max_new_tokens", "8"]
    proc = run_script([*common, "--num_rounds", "2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())["metrics"]
    for r in (0, 1):
        assert summary[f"round {r} oracle_queries"] == 8 * 4
        assert summary[f"round {r} bonus"] > 0 and math.isfinite(summary[f"round {r} oracle_reward"])
    assert "Optimistic KL-regularised RLHF" in proc.stdout

    proc = run_script([*common, "--num_rounds", "3", "--resume_from_checkpoint", "true"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())["metrics"]
    assert "round 2 reward_optimistic" in summary
    state = json.loads((tmp_path / "run" / "checkpoint-round-00002" / "trainer_state.json").read_text())
    assert [h["round"] for h in state["log_history"] if "round" in h] == [0, 1, 2]
