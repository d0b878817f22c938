"""GSHF iterative DPO on the online loop: optimum reached, kill-and-resume exact, enhancers, config errors."""

import importlib.util
import json
import textwrap

import numpy as np
import pytest
import torch
from conftest import ROOT, run_script
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PrinterCallback,
    TrainerCallback,
)

from klalign import IterativeDPOConfig, IterativeDPOTrainer
from klalign.data.prompts import restored_prompt
from klalign.oracles.base import BradleyTerryPreference
from klalign.testbed.bandit import SingleTokenBandit, TestbedReward
from klalign.testbed.metrics import TestbedMetricsCallback, exact_metrics
from klalign.testbed.model import off_action_mass, read_policy


def make_trainer(folder, out, bandit, oracle, callbacks=None, **overrides):
    tokenizer = AutoTokenizer.from_pretrained(folder)
    settings = dict(
        output_dir=str(out), beta=1.0, num_rounds=30, prompts_per_round=64, prompts_per_chunk=64,
        max_new_tokens=1, enhancer="temperature", enhancer_temperature=1.5, learning_rate=3e-3,
        per_device_train_batch_size=64, epochs_per_round=3, lr_scheduler_type="constant", use_cpu=True,
        report_to=[], seed=0, save_total_limit=1,
    )
    args = IterativeDPOConfig(**{**settings, **overrides})
    return IterativeDPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(folder), ref_model=AutoModelForCausalLM.from_pretrained(folder),
        args=args, train_dataset=bandit.prompt_dataset(), processing_class=tokenizer, oracle=oracle,
        callbacks=callbacks,
    )


@pytest.fixture(scope="module")
def bed(tmp_path_factory):
    bandit = SingleTokenBandit.random(num_prompts=4, num_actions=6, seed=0)
    folder = tmp_path_factory.mktemp("bed")
    bandit.save(folder)
    return bandit, folder


def test_gshf_lands_near_the_tilted_optimum(bed, tmp_path):
    """BT oracle over a known reward: KL(pi || pi_ref exp(r/beta)/Z) < 0.028 after 2560 queries (pi_ref: 0.19).

    With labels expected over the oracle's P (the default): over seeds 0-2, 0.0000-0.0004 after 2560 queries,
    first under 0.02 after 128-192, 0.061-0.10 after the first round (seed 0: 0.10). With one drawn label per
    pair (before issue 19), over seeds 0-7: 0.0085-0.015 after 2560 queries (first under 0.02 after 704-1792),
    0.094-0.19 after the first round. The bars, 0.028 and a first round above 0.05, hold for both."""
    bandit, folder = bed
    metrics = TestbedMetricsCallback(bandit, beta=1.0)
    trainer = make_trainer(folder, tmp_path, bandit, BradleyTerryPreference(TestbedReward(bandit)), [metrics],
                           num_rounds=40)
    trainer.train()
    kls = [h["testbed/kl_to_optimum"] for h in metrics.history]
    assert kls[0] > 0.05 and kls[-1] < 0.028, kls[-5:]
    assert metrics.history[-1]["testbed/off_action_mass"] < 1e-4
    assert sum(h["oracle_queries"] for h in trainer.state.log_history if "round" in h) == 40 * 64


@pytest.mark.parametrize("pair_labels", ["expected", "drawn"])
def test_ranked_pairs_reach_the_tilt_only_with_expected_labels(pair_labels, bed, tmp_path):
    """Issue 19: a reward oracle, best of 4 against worst of 4, 6 rounds. With each pair's loss averaged over its
    Bradley-Terry label sigmoid(r_best - r_worst) the policy lands on the tilt pi_ref exp(r / beta) (KL to it
    5.8e-5 to 7.2e-4 over seeds 0-4, KL to pi_ref 0.156-0.158 against the tilt's 0.157); with the deterministic
    label (the higher reward wins: the only behaviour before `pair_labels`) DPO drives every margin up and
    overshoots: KL to the tilt 1.73-1.77 over seeds 0-4, still rising (2.02 after 16 rounds), KL to pi_ref 2.6.
    Bars 0.01 and 0.5 lie between the two, an order of magnitude from each."""
    bandit, folder = bed
    metrics = TestbedMetricsCallback(bandit, beta=1.0)
    trainer = make_trainer(folder, tmp_path, bandit, TestbedReward(bandit), [metrics], num_rounds=6,
                           enhancer="best_vs_worst", samples_per_prompt=4, pair_labels=pair_labels)
    trainer.train()
    last = metrics.history[-1]
    optimum_kl_to_ref = float(exact_metrics(bandit.optimal_policy(1.0).numpy(), bandit, 1.0)["testbed/kl_to_ref"])
    if pair_labels == "expected":
        assert last["testbed/kl_to_optimum"] < 0.01, [h["testbed/kl_to_optimum"] for h in metrics.history]
        assert last["testbed/kl_to_ref"] < 2 * optimum_kl_to_ref  # no overshoot
    else:
        assert last["testbed/kl_to_optimum"] > 0.5 and last["testbed/kl_to_ref"] > 2 * optimum_kl_to_ref


def test_every_pair_of_the_samples_reaches_the_tilt(bed, tmp_path):
    """The all_pairs enhancer, expected labels, the settings above: every pair of a prompt's 4 samples (6 pairs,
    4 queries charged once) and the policy lands on the tilt, closer than best-vs-worst does: KL to it 1.1e-11
    to 1.6e-10 over seeds 0-4 (best vs worst: 5.8e-5 to 7.2e-4), KL to pi_ref 0.1572, the tilt's. The bar 1e-6
    lies between the two, nearly four orders of magnitude above every seed's value."""
    bandit, folder = bed
    metrics = TestbedMetricsCallback(bandit, beta=1.0)
    trainer = make_trainer(folder, tmp_path, bandit, TestbedReward(bandit), [metrics], num_rounds=6,
                           enhancer="all_pairs", samples_per_prompt=4, pair_labels="expected")
    trainer.train()
    rows = trainer.store.dataset().to_list()
    assert len(rows) == 6 * 64 * 6 and sum(r["oracle_queries"] for r in rows) == 6 * 64 * 4
    assert all(r["chosen_reward"] > r["rejected_reward"] for r in rows if not r["tie"])
    last = metrics.history[-1]
    optimum_kl_to_ref = float(exact_metrics(bandit.optimal_policy(1.0).numpy(), bandit, 1.0)["testbed/kl_to_ref"])
    assert last["testbed/kl_to_optimum"] < 1e-6, [h["testbed/kl_to_optimum"] for h in metrics.history]
    assert last["testbed/kl_to_ref"] < 2 * optimum_kl_to_ref


def test_bench_settings_reach_the_target_within_2048_queries(tmp_path):
    """Issue 19, item 5: bench/iterative_vs_offline.py's own iterative DPO settings, on its bed (8 actions,
    ref_scale 2.0, seed 0), reach KL(pi || pi*) < 0.02 within 2048 queries (0.5x offline DPO's 4096 from pi_ref).

    Measured at 2048 queries, lr 1e-3: 0.0064 (seed 0), 0.0158 and 0.0060 (seeds 3, 4); the old lr 3e-3: 0.038
    on seed 0 (under 0.02 on none of its 64 rounds), 0.020 and 0.021 on seeds 3, 4."""
    spec = importlib.util.spec_from_file_location("iterative_vs_offline", ROOT / "bench" / "iterative_vs_offline.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)  # defines main() without running it
    bandit = SingleTokenBandit.random(num_prompts=4, num_actions=8, seed=0, ref_scale=2.0)
    bandit.save(tmp_path)
    curve = bench.iterative_curve(bandit, tmp_path, rounds=32, beta=1.0, seed=0)
    assert curve[-1][0] == 2048
    assert bench.first_reaching(curve, 0.02) is not None, curve[-8:]


def off_action_mass_per_step(folder, out, bandit, seed, rounds):
    """The largest off-action mass of any prompt after every optimizer step of a run with this file's
    settings (full fine-tuning, Adam, lr 3e-3, 64 prompts a round, temperature enhancer) and one label drawn
    per pair: the settings the plain bed's leaks were measured at (issue 15, before `pair_labels`)."""
    trainer = make_trainer(folder, out, bandit, BradleyTerryPreference(TestbedReward(bandit)), num_rounds=rounds,
                           seed=seed, pair_labels="drawn")
    trainer.remove_callback(PrinterCallback)
    masses, step = [], trainer.optimizer_step

    def step_and_read(loss):
        step(loss)
        masses.append(off_action_mass(trainer.model, bandit).max().item())

    trainer.optimizer_step = step_and_read
    trainer.train()
    assert len(masses) == 3 * rounds * (rounds + 1) // 2  # 3 epochs over all rounds so far, batches of 64 pairs
    return masses


LEAKY_SEEDS = (1, 5, 6, 8, 9)  # on the plain Llama bed these reach 0.01-0.99 within 6 rounds (measured)


def test_full_fine_tuning_cannot_leak_mass_off_the_actions(bed, tmp_path):
    """Issue 15: on the plain Llama bed, DPO (blind to a shift of all of a prompt's action logits) with Adam on
    every weight moved whole prompts' mass to EOS in some seeds. The closed bed rules it out by construction:
    8 seeds (the plain bed's leaky ones among them), 6 rounds, off-action mass < 1e-4 after every step.
    On the plain bed (`closed=False`) this test fails: worst masses 0.46, 0.99, 0.85, 0.010, 0.037 in the
    leaky seeds (measured)."""
    bandit, folder = bed
    worst = {seed: max(off_action_mass_per_step(folder, tmp_path / str(seed), bandit, seed, rounds=6))
             for seed in (0, *LEAKY_SEEDS, 2, 3)}
    assert max(worst.values()) < 1e-4, worst


@pytest.mark.slow
def test_the_plain_llama_bed_leaks_under_the_same_settings(bed, tmp_path):
    """What the closed bed prevents: the same runs on `closed=False` (the bed before issue 15) leak."""
    bandit, _ = bed
    folder = bandit.save(tmp_path / "plain", closed=False)
    worst = {seed: max(off_action_mass_per_step(folder, tmp_path / str(seed), bandit, seed, rounds=6))
             for seed in LEAKY_SEEDS}
    assert min(worst.values()) > 1e-3, worst


KILLABLE_RUN = textwrap.dedent('''
    import json, os, sys
    sys.path.insert(0, {tests!r})
    from test_iterative_dpo import make_trainer
    from klalign.oracles.base import BradleyTerryPreference, PreferenceOracle
    from klalign.testbed.bandit import SingleTokenBandit, TestbedReward
    from klalign.testbed.model import off_action_mass, read_policy

    folder, out, log, kill_at, resume = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5] == "1"
    save_every = int(sys.argv[6])
    bandit = SingleTokenBandit.load(folder)
    inner = BradleyTerryPreference(TestbedReward(bandit))

    class Logged(PreferenceOracle):
        name = "logged"
        calls = 0
        def _preference(self, prompts, a, b):
            Logged.calls += 1
            if Logged.calls == kill_at:
                os._exit(137)  # killed mid-round, before this chunk is stored
            with open(log, "a") as f:
                f.write(json.dumps([prompts, a, b]) + "\\n")
            return inner.preference(prompts, a, b)

    trainer = make_trainer(folder, out, bandit, Logged(), num_rounds=4, prompts_per_round=16, prompts_per_chunk=8,
                           learning_rate=1e-3, enhancer_temperature=1.2, save_every_rounds=save_every)
    trainer.train(resume_from_checkpoint=resume)
''')


@pytest.mark.parametrize("save_every", [1, 3])
def test_killed_run_resumes_exactly(save_every, bed, tmp_path):
    """Killed in round 2; resumed from the round-1 checkpoint (save_every 1) or from scratch
    (save_every 3: no checkpoint yet, rounds 0-1 replayed from the store)."""
    bandit, folder = bed
    script = tmp_path / "run.py"
    script.write_text(KILLABLE_RUN.format(tests=str(ROOT / "tests")))

    def run(name, kill_at, resume):
        return run_script([str(script), str(folder), str(tmp_path / name), str(tmp_path / f"{name}.log"),
                           str(kill_at), "1" if resume else "0", str(save_every)])

    assert run("straight", 0, False).returncode == 0
    assert run("killed", 6, False).returncode == 137  # calls 1-5 stored (rounds 0-1, round 2 chunk 0)
    resumed = run("killed", 0, True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    straight = (tmp_path / "straight.log").read_text().splitlines()
    killed = (tmp_path / "killed.log").read_text().splitlines()
    assert len(straight) == 8 and len(killed) == 5 + 3  # finished chunks were never queried again
    assert killed == straight  # and the resumed run asked exactly what the uninterrupted run asked

    from klalign.runs.feedback import FeedbackStore

    rows = [FeedbackStore(tmp_path / n / "feedback").dataset().to_list() for n in ("straight", "killed")]
    assert rows[0] == rows[1] and len(rows[0]) == 4 * 16  # no collected row lost or duplicated

    weights = [AutoModelForCausalLM.from_pretrained(tmp_path / n / "checkpoint-round-00003").state_dict()
               for n in ("straight", "killed")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # the same final model


@pytest.mark.parametrize("enhancer", ["best_vs_worst", "rejection_sampling", "temperature", "previous_checkpoint",
                                      "uncertainty"])
def test_each_enhancer_runs_and_stores_its_pairs(enhancer, bed, tmp_path):
    bandit, folder = bed
    reward = TestbedReward(bandit)
    oracle = reward if enhancer in ("best_vs_worst", "rejection_sampling") else BradleyTerryPreference(reward)
    trainer = make_trainer(folder, tmp_path, bandit, oracle, enhancer=enhancer, num_rounds=2, prompts_per_round=16,
                           loss_type="hinge", samples_per_prompt=4)
    trainer.train()
    rows = trainer.store.dataset().to_list()
    assert len(rows) == 32 and {r["round"] for r in rows} == {0, 1}
    kept = [r for r in rows if not r["tie"]]
    assert kept and all(r["chosen"] != r["rejected"] or enhancer != "best_vs_worst" for r in kept)
    if enhancer in ("best_vs_worst", "rejection_sampling"):
        assert all(r["chosen_reward"] > r["rejected_reward"] for r in kept)
        assert all(r["oracle_queries"] == 4 for r in rows)
    if enhancer == "previous_checkpoint":
        assert (tmp_path / "policy_snapshots" / "round-00001.safetensors").exists()
    assert (tmp_path / "checkpoint-round-00001").is_dir()


class RoundStarts(TrainerCallback):
    """The exact policy at the start of every round: pi_ref, then the policy after each logged round."""

    def __init__(self, bandit):
        self.bandit, self.policies = bandit, [bandit.ref.numpy()]

    def on_log(self, args, state, control, model=None, logs=None, **kwargs):
        if "round" in (logs or {}):
            self.policies.append(read_policy(model, self.bandit).numpy())


def pair_logprobs(bandit, policy, rows) -> np.ndarray:
    """log policy(chosen), log policy(rejected) of every row from a (C, K) table. (N, 2)"""
    return np.array([[np.log(policy[bandit.prompt_index(restored_prompt(r["prompt"])), bandit.action_index(r[side])])
                      for side in ("chosen", "rejected")] for r in rows])


@pytest.mark.parametrize("reference", ["initial", "previous"])
def test_reference_option_sets_the_log_ratios_of_the_loss(reference, bed, tmp_path):
    """The DPO log-ratios of round t are taken against pi_ref ("initial", the paper) or against the policy at
    the round's start ("previous"): the reference log-probs the loss receives are those of that policy, and
    with "previous" every round's first step starts at margin 0. `train_on: latest` trains on the round's
    pairs only."""
    bandit, folder = bed
    starts = RoundStarts(bandit)
    trainer = make_trainer(folder, tmp_path, bandit, BradleyTerryPreference(TestbedReward(bandit)), [starts],
                           num_rounds=3, prompts_per_round=16, reference=reference, train_on="latest")
    seen, reference_fn = [], trainer._reference_pair_logps

    def spy(rows, *args):
        logps = reference_fn(rows, *args)
        seen.append((rows, logps.detach().double().cpu().numpy()))
        return logps

    trainer._reference_pair_logps = spy
    trainer.train()
    assert [h["pairs_trained"] for h in trainer.state.log_history if "round" in h] == [
        sum(not r["tie"] for r in trainer.store.round_rows(t)) for t in range(3)]
    for t, (rows, logps) in enumerate(seen):
        expected = starts.policies[t] if reference == "previous" else bandit.ref.numpy()
        np.testing.assert_allclose(logps, pair_logprobs(bandit, expected, rows), atol=1e-4)
    assert np.abs(pair_logprobs(bandit, starts.policies[2], seen[2][0])
                  - pair_logprobs(bandit, bandit.ref.numpy(), seen[2][0])).max() > 1e-2  # the two differ


def test_uncertainty_enhancer_picks_the_widest_pair(bed, tmp_path):
    """Of the n candidates of each prompt, the proposed pair maximises ||phi_i - phi_j||_{Sigma^-1}, with phi the
    reference's mean last hidden state over the response and Sigma = lam I + the outer products of every
    stored pair's difference and of the pairs proposed before it in the round (recomputed here directly)."""
    bandit, folder = bed
    trainer = make_trainer(folder, tmp_path, bandit, BradleyTerryPreference(TestbedReward(bandit)), num_rounds=2,
                           prompts_per_round=16, enhancer="uncertainty", samples_per_prompt=4)
    calls, generate = [], trainer.generate

    def recording_generate(prompts, n, temperature=None):
        out = generate(prompts, n, temperature)
        calls.append(out)
        return out

    trainer.generate = recording_generate
    trainer.train()
    reference = trainer.ref_model

    def phi(prompt_ids, completion_ids):  # (d,) float64, straight from the reference's forward pass
        ids = torch.tensor([prompt_ids + completion_ids])
        hidden = reference(input_ids=ids, output_hidden_states=True).hidden_states[-1][0].double()  # (T, d)
        return hidden[len(prompt_ids):].mean(0)

    dim = reference.config.hidden_size
    for round_index, candidates in enumerate(calls):
        past = [r for t in range(round_index) for r in trainer.store.round_rows(t)]
        sigma = torch.eye(dim, dtype=torch.float64)
        for r in past:
            d = phi(r["prompt_ids"], r["chosen_ids"]) - phi(r["prompt_ids"], r["rejected_ids"])
            sigma += torch.outer(d, d)
        proposed = trainer.store.round_rows(round_index)
        assert len(proposed) == len(candidates) == 16
        for row, group in zip(proposed, candidates):
            feats = torch.stack([phi(c.prompt_ids, c.completion_ids) for c in group])  # (n, d)
            inverse = torch.linalg.inv(sigma)
            widths = {(i, j): (feats[i] - feats[j]) @ inverse @ (feats[i] - feats[j])
                      for i in range(4) for j in range(4) if i < j}
            chosen_pair = {row["chosen_ids"][0], row["rejected_ids"][0]}
            width = next(w for (i, j), w in widths.items()
                         if {group[i].completion_ids[0], group[j].completion_ids[0]} == chosen_pair)
            assert width >= max(widths.values()) * (1 - 1e-6), (width, max(widths.values()))
            d = phi(row["prompt_ids"], row["chosen_ids"]) - phi(row["prompt_ids"], row["rejected_ids"])
            sigma += torch.outer(d, d)


def test_previous_checkpoint_enhancer_samples_the_previous_round_policy(bed, tmp_path):
    """After 3 rounds, round 3's enhancer samples pi_2 (the policy at the start of round 2), not pi_3: 4000
    samples against both policies (chi-square), while the main agent's follow pi_3."""
    from scipy.stats import chisquare

    bandit, folder = bed
    starts = RoundStarts(bandit)
    trainer = make_trainer(folder, tmp_path, bandit, BradleyTerryPreference(TestbedReward(bandit)), [starts],
                           num_rounds=3, enhancer="previous_checkpoint", learning_rate=1e-2)
    trainer.train()
    previous, current = starts.policies[2], starts.policies[3]
    assert np.abs(previous - current).max() > 0.05  # far enough apart to tell which one is sampled
    torch.manual_seed(0)
    proposals = trainer.enhancer.propose(3, bandit.prompts * 1000)
    for side, policy, other in (("b", previous, current), ("a", current, previous)):
        counts = np.zeros_like(previous)
        for proposal in proposals:
            counts[bandit.prompt_index(proposal.prompt), bandit.action_index(getattr(proposal, side).text)] += 1
        for c in range(bandit.num_prompts):
            assert chisquare(counts[c], 1000 * policy[c] / policy[c].sum()).pvalue > 1e-4, (side, c)
        assert min(chisquare(counts[c], 1000 * other[c] / other[c].sum()).pvalue for c in range(4)) < 1e-6, side
    assert {p.policy_b for p in proposals} == {"previous_checkpoint"}


def test_rejection_sampling_enhancer_accepts_at_rso_rate(bed, tmp_path, monkeypatch):
    """RSO's statistical rejection sampling (Liu et al. 2024): each of the n candidates is accepted with
    probability exp((r - max r) / beta); over 2000 prompts the accepted count is within 4 standard errors of
    that rate, candidate by candidate rank, and the pair is the best and worst accepted candidate."""
    import klalign.trainers.enhancers

    bandit, folder = bed
    trainer = make_trainer(folder, tmp_path, bandit, TestbedReward(bandit), num_rounds=1, prompts_per_round=16,
                           enhancer="rejection_sampling", samples_per_prompt=6, beta=0.3)
    masks, sample = [], klalign.inference.rejection_sampling.rejection_sample

    def recording(rewards, beta, *args, **kwargs):
        mask = sample(rewards, beta, *args, **kwargs)
        masks.append((rewards.clone(), mask.clone()))
        return mask

    monkeypatch.setattr(klalign.trainers.enhancers, "rejection_sample", recording)
    torch.manual_seed(0)
    proposals = trainer.enhancer.propose(0, bandit.prompts * 500)
    rewards = torch.stack([r for r, _ in masks])  # (N, n)
    accepted = torch.stack([m for _, m in masks]).double()  # (N, n)
    rate = torch.exp((rewards - rewards.max(1, keepdim=True).values) / 0.3)  # the rate at the config's beta
    order = rewards.argsort(1)  # rank the candidates of each prompt by reward
    for rank in range(6):
        a, p = accepted.gather(1, order[:, rank:rank + 1]), rate.gather(1, order[:, rank:rank + 1])
        z = (a - p).sum() / (p * (1 - p)).sum().clamp(min=1e-12).sqrt()
        assert abs(z) < 4 or (p == 1).all(), (rank, z.item())
    for proposal, (r, mask) in zip(proposals, masks):
        if mask.sum() >= 2:
            assert proposal.reward_a == r[mask].max().item() and proposal.reward_b == r[mask].min().item()


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        (dict(enhancer="greedy"), ValueError, "enhancer must be one of"),
        (dict(reference="frozen"), ValueError, "reference must be one of"),
        (dict(loss_type="kto"), ValueError, "loss_type 'kto'"),
        (dict(beta=0.0), ValueError, "beta must be > 0"),
        (dict(temperature=0.0), ValueError, "temperature must be > 0"),
    ],
)
def test_bad_config_is_named(overrides, error, message, tmp_path):
    with pytest.raises(error, match=message):
        IterativeDPOConfig(output_dir=str(tmp_path), use_cpu=True, **overrides)


def test_ranking_enhancer_needs_a_reward(bed, tmp_path):
    bandit, folder = bed
    with pytest.raises(TypeError, match="needs a RewardOracle"):
        make_trainer(folder, tmp_path, bandit, BradleyTerryPreference(TestbedReward(bandit)), enhancer="best_vs_worst")


def test_recipe_runs_the_tiny_config(tmp_path):
    proc = run_script(["recipes/iterative_dpo.py", "--config", "configs/tiny/iterative_dpo.yaml",
                       "--output_dir", str(tmp_path), "--num_rounds", "2", "--prompts_per_round", "8",
                       "--max_new_tokens", "6"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())["metrics"]
    assert "round 1 main_reward" in summary and "round 1 kl_k3" in summary
