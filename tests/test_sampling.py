"""RSO's statistical rejection sampler on a single-token task with a known reward.

Candidates are drawn with `generate()` from the test bed's reference model; the acceptance rate
must match `Z exp(-r_max / beta)` and the accepted samples must follow pi_ref exp(r / beta).
"""

import json

import numpy as np
import pytest
import torch
from scipy import stats
from transformers import AutoModelForCausalLM, AutoTokenizer

from klalign.generation.sample import sample_completions
from klalign.generation.types import GenerationArguments
from klalign.inference.rejection_sampling import (
    RejectionSamplingArguments,
    build_rso_dataset,
    pair_by_reward,
    rejection_sample,
)
from klalign.oracles.base import CallableReward
from klalign.testbed.bandit import SingleTokenBandit, TestbedReward
from klalign.theory import rso_acceptance_rate, tilt

BETA, R_MAX = 0.5, 1.5


@pytest.fixture(scope="module")
def bed(tmp_path_factory):
    bandit = SingleTokenBandit.random(num_prompts=1, num_actions=6, seed=3)
    folder = tmp_path_factory.mktemp("bed")
    bandit.save(folder)
    return bandit, AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)


def test_acceptance_rate_and_accepted_law(bed):
    bandit, model, tokenizer = bed
    n = 6000
    samples = sample_completions(model, tokenizer, bandit.prompts, n, GenerationArguments(max_new_tokens=1),
                                 seed=0, progress=False)[0]
    actions = torch.tensor([bandit.action_index(c.text) for c in samples])  # (n,)
    reward = bandit.reward_table()[0]  # (K,)
    assert reward.max() <= R_MAX
    accepted = rejection_sample(reward[actions], BETA, R_MAX, torch.Generator().manual_seed(1))

    expected_rate = rso_acceptance_rate(bandit.ref[0].numpy(), reward.numpy(), BETA, R_MAX)
    rate = accepted.float().mean().item()
    assert abs(rate - expected_rate) < 4 * np.sqrt(expected_rate * (1 - expected_rate) / n)

    target = tilt(bandit.ref[0].numpy(), reward.numpy(), BETA)  # (K,)
    counts = np.bincount(actions[accepted].numpy(), minlength=len(target))
    assert stats.chisquare(counts, target * counts.sum()).pvalue > 1e-3
    # The same test rejects the reference law, so it has the power to fail.
    assert stats.chisquare(counts, bandit.ref[0].numpy() * counts.sum()).pvalue < 1e-6


def test_rejection_sample_validates():
    with pytest.raises(ValueError, match="beta must be > 0"):
        rejection_sample(torch.zeros(3), 0.0)
    with pytest.raises(ValueError, match="below a candidate's reward"):
        rejection_sample(torch.tensor([0.0, 2.0]), 1.0, r_max=1.0)
    assert rejection_sample(torch.tensor([1.0, 1.0]), 0.1).all()  # r = r_max is always kept


def test_pairs_are_labelled_by_reward_and_ties_dropped():
    pairs = pair_by_reward(["a", "b", "c", "d", "e"], [0.1, 0.9, 0.5, 0.5, 1.0])
    assert pairs == [("b", "a", 0.9, 0.1)]


def test_all_pairing_compares_every_two_accepted_responses():
    """pairing 'all': each of K responses is compared with the K - 1 others (ties still dropped), so a query
    buys K - 1 comparisons instead of one; an unknown pairing is refused by name, before any sampling."""
    pairs = pair_by_reward(["a", "b", "c", "d"], [0.1, 0.9, 0.5, 0.5], pairing="all")
    assert sorted(pairs) == sorted([("b", "a", 0.9, 0.1), ("c", "a", 0.5, 0.1), ("d", "a", 0.5, 0.1),
                                    ("b", "c", 0.9, 0.5), ("b", "d", 0.9, 0.5)])
    with pytest.raises(ValueError, match="pairing must be one of"):
        RejectionSamplingArguments(reward_fn="vader", pairing="tournament")


def test_rso_dataset_is_written_as_it_goes_and_resumes(bed, tmp_path):
    bandit, model, tokenizer = bed
    calls = []
    oracle = TestbedReward(bandit)
    counting = CallableReward(lambda p, r: (calls.append(len(r)), oracle.score(p, r))[1], name="counting")
    args = RejectionSamplingArguments(num_candidates=8, sampling_beta=2.0, reward_fn="vader")
    out = tmp_path / "pairs.jsonl"
    gen = GenerationArguments(max_new_tokens=1)
    stats1 = build_rso_dataset(model, tokenizer, bandit.prompts * 3, counting, out, args, gen)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert stats1["sampled"] == 1 and rows and all(r["chosen_reward"] > r["rejected_reward"] for r in rows)
    calls.clear()
    stats2 = build_rso_dataset(model, tokenizer, bandit.prompts, counting, out, args, gen)
    assert stats2["sampled"] == 0 and calls == []  # done prompts are not sampled or scored again


def test_dpo_trains_on_the_sampled_tokens_of_rso_pairs(bed, tmp_path):
    """Replies cut at max_new_tokens (1 here: an action and no EOS) are trained on as sampled: the RSO rows carry
    their token ids and `klalign.DPOTrainer` takes them, where tokenizing the text would end each reply with an
    EOS it never sampled (TRL appends one to every non-conversational reply; a chat template closes every
    assistant turn). Ids written with another tokenizer fall back to the text."""
    import copy

    from datasets import Dataset

    from klalign import DPOConfig, DPOTrainer, load_preference_dataset

    bandit, model, tokenizer = bed
    args = RejectionSamplingArguments(num_candidates=8, sampling_beta=2.0, reward_fn="vader", pairing="all")
    out = tmp_path / "pairs.jsonl"
    build_rso_dataset(model, tokenizer, bandit.prompts, TestbedReward(bandit), out, args,
                      GenerationArguments(max_new_tokens=1))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    actions = set(bandit.action_token_ids)
    assert rows and all(len(r["chosen_ids"]) == 1 and r["chosen_ids"][0] in actions for r in rows)  # no EOS
    config = DPOConfig(output_dir=str(tmp_path / "dpo"), use_cpu=True, report_to=[], max_steps=1,
                       per_device_train_batch_size=4, pair_labels="expected")

    def trained_rows(data):
        trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=config, train_dataset=data,
                             processing_class=tokenizer)
        return [(row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]) for row in trainer.train_dataset]

    data = load_preference_dataset(out)
    assert trained_rows(data) == [(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in rows]
    other = Dataset.from_list([{**r, "token_ids_vocab": "vocab:another"} for r in rows])
    assert all(chosen[-1] == tokenizer.eos_token_id for _, chosen, _ in trained_rows(other))  # the text, retokenized
