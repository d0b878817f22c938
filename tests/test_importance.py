"""The sampler/learner mismatch, measured, and its truncated importance-weight correction, on the test bed:
sampling at another temperature than the training policy's biases the KL estimates; the correction
removes the bias (HF backend: the sampler's log-probs come from generate's processed scores)."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from klalign import IterativeDPOConfig, IterativeDPOTrainer
from klalign.ops.importance import truncated_weights
from klalign.oracles.base import BradleyTerryPreference
from klalign.testbed.bandit import SingleTokenBandit, TestbedReward
from klalign.testbed.model import read_policy

TEMPERATURE = 1.6  # the sampler's; the training policy is at 1


@pytest.fixture(scope="module")
def beds(tmp_path_factory):
    """A policy and a reference that differ: KL(pi || pi_ref) is known exactly from their tables."""
    policy = SingleTokenBandit.random(num_prompts=4, num_actions=6, seed=5, ref_scale=1.5)
    reference = SingleTokenBandit(SingleTokenBandit.random(num_prompts=4, num_actions=6, seed=6).ref,
                                  reward=policy.reward)
    folders = tmp_path_factory.mktemp("pi"), tmp_path_factory.mktemp("ref")
    policy.save(folders[0])
    reference.save(folders[1])
    return policy, folders


def kl_estimates(beds, tmp_path, correction: str) -> dict:
    bandit, (pi_folder, ref_folder) = beds
    args = IterativeDPOConfig(
        output_dir=str(tmp_path / correction), num_rounds=1, prompts_per_round=1024, prompts_per_chunk=1024,
        max_new_tokens=2, temperature=TEMPERATURE, enhancer="temperature", learning_rate=0.0, beta=1.0,
        per_device_train_batch_size=1024, epochs_per_round=1, use_cpu=True, report_to=[], seed=0,
        importance_correction=correction, importance_cap=20.0,
    )
    trainer = IterativeDPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(pi_folder), ref_model=AutoModelForCausalLM.from_pretrained(ref_folder),
        args=args, train_dataset=bandit.prompt_dataset(), processing_class=AutoTokenizer.from_pretrained(pi_folder),
        oracle=BradleyTerryPreference(TestbedReward(bandit)),
    )
    trainer.train()
    return next(h for h in trainer.state.log_history if "kl_k1" in h)


def test_the_correction_removes_the_bias_of_sampling_at_another_temperature(beds, tmp_path):
    bandit, (pi_folder, ref_folder) = beds
    pi = read_policy(AutoModelForCausalLM.from_pretrained(pi_folder), bandit)
    ref = read_policy(AutoModelForCausalLM.from_pretrained(ref_folder), bandit)
    exact = (pi * (pi / ref).log()).sum(-1).mean().item()  # KL(pi || pi_ref), prompts drawn uniformly
    plain, corrected = kl_estimates(beds, tmp_path, "none"), kl_estimates(beds, tmp_path, "truncated")
    tolerance = 4 * 0.6 / math.sqrt(1024)  # ~4 standard errors of the weighted mean (per-sample sd below ~0.6)
    assert abs(corrected["kl_k1"] - exact) < tolerance, (corrected["kl_k1"], exact)
    assert abs(plain["kl_k1"] - exact) > 2 * tolerance, (plain["kl_k1"], exact)  # the bias it removed
    # The mismatch is measured every round: tempered sampling makes the sampler's log-probs differ.
    assert corrected["sampler/mismatch_mean"] > 0.05 and plain["sampler/mismatch_mean"] > 0.05


def test_truncated_weights():
    train, sampler = torch.tensor([0.0, -1.0, -3.0]), torch.tensor([0.0, -2.0, -0.5])
    torch.testing.assert_close(truncated_weights(train, sampler, cap=2.0), torch.tensor([1.0, 2.0, math.exp(-2.5)]))
